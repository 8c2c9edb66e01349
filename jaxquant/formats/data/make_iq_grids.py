"""Write iq_grids.npz: the lattice tables of llama.cpp's ggml-common.h, as the header spells them.

Usage: python make_iq_grids.py path/to/ggml/src/ggml-common.h [out.npz]
(out defaults to iq_grids.npz next to this script). The tables are copied from the header, not
from gguf-py, which serves as the independent oracle of the dequantizers.
"""

from __future__ import annotations

import pathlib
import re
import sys

import numpy as np

# name -> numpy dtype of the C table
TABLES = {
    "kmask_iq2xs": np.uint8,
    "ksigns_iq2xs": np.uint8,
    "iq2xxs_grid": np.uint64,
    "iq2xs_grid": np.uint64,
    "iq2s_grid": np.uint64,
    "iq3xxs_grid": np.uint32,
    "iq3s_grid": np.uint32,
    "iq1s_grid": np.uint64,
}
SIZES = {"NGRID_IQ1S": 2048}  # the one size the header gives as a macro


def parse(header: str) -> dict[str, np.ndarray]:
    """Every table of TABLES found in the text of ggml-common.h."""
    out = {}
    table = re.compile(r"GGML_TABLE_BEGIN\(\s*(\w+)\s*,\s*(\w+)\s*,\s*(\w+)\s*\)(.*?)GGML_TABLE_END\(\)", re.S)
    for m in table.finditer(header):
        _, name, size, body = m.groups()
        if name not in TABLES:
            continue
        values = [int(v, 0) for v in re.findall(r"-?0x[0-9a-fA-F]+|-?\d+", re.sub(r"//[^\n]*", "", body))]
        want = SIZES[size] if size in SIZES else int(size)
        if len(values) != want:
            raise ValueError(f"{name}: {len(values)} values, header says {want}")
        out[name] = np.array(values, dtype=TABLES[name])
    missing = set(TABLES) - set(out)
    if missing:
        raise ValueError(f"tables not found in the header: {sorted(missing)}")
    return out


def main(argv: list[str]) -> None:
    if len(argv) not in (2, 3):
        raise SystemExit(__doc__)
    header = pathlib.Path(argv[1]).read_text()
    out = pathlib.Path(argv[2]) if len(argv) == 3 else pathlib.Path(__file__).with_name("iq_grids.npz")
    np.savez_compressed(out, **parse(header))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv)
