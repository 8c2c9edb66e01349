"""llama.cpp's Unicode tables (codepoint categories, whitespace, lowercase), shipped as an npz.

BPE pre-tokenizers classify codepoints with llama.cpp's own tables (src/unicode-data.cpp,
generated from a newer UnicodeData.txt than Python's ``unicodedata``); using the same tables is
what makes the splits identical. Regenerate with
``python -m jaxquant.io.unicode_data path/to/llama.cpp/src/unicode-data.cpp``.
"""

from __future__ import annotations

import functools
import re
import sys
from pathlib import Path

import numpy as np

# Bits of llama.cpp's unicode_cpt_flags (src/unicode.h).
UNDEFINED, NUMBER, LETTER, SEPARATOR, MARK, PUNCTUATION, SYMBOL, CONTROL = (1 << i for i in range(8))
CATEGORIES = 0x00FF
WHITESPACE = 0x0100
MAX_CODEPOINTS = 0x110000

_NPZ = Path(__file__).with_name("unicode_data.npz")


@functools.cache
def tables() -> tuple[np.ndarray, dict[int, int]]:
    """(flags uint16[MAX_CODEPOINTS] with the WHITESPACE bit set, lowercase map {cpt: lower})."""
    with np.load(_NPZ) as z:
        starts, range_flags = z["range_starts"], z["range_flags"]
        flags = np.repeat(range_flags, np.diff(np.append(starts, MAX_CODEPOINTS))).astype(np.uint16)
        flags[z["whitespace"]] |= WHITESPACE
        lower = dict(zip(z["lower_from"].tolist(), z["lower_to"].tolist()))
    return flags, lower


def _cpp_block(source: str, name: str) -> str:
    """The text between the braces of the C++ initializer of ``name``."""
    start = source.index("{", source.index(f" {name} ="))
    return source[start + 1:source.index("};", start)]


def _cpp_pairs(source: str, name: str) -> np.ndarray:
    """The ``{0x..., 0x...}`` rows of a C++ initializer list as uint32[N, 2]."""
    rows = re.findall(r"\{(0x[0-9A-Fa-f]+), (0x[0-9A-Fa-f]+)\}", _cpp_block(source, name))
    return np.array([(int(a, 16), int(b, 16)) for a, b in rows], dtype=np.uint32)


def main(unicode_data_cpp: str) -> None:
    """Parse llama.cpp's unicode-data.cpp and write unicode_data.npz next to this module."""
    source = Path(unicode_data_cpp).read_text()
    ranges = _cpp_pairs(source, "unicode_ranges_flags")
    lower = _cpp_pairs(source, "unicode_map_lowercase")
    whitespace = [int(x, 16) for x in re.findall(r"0x[0-9A-Fa-f]+", _cpp_block(source, "unicode_set_whitespace"))]
    if ranges[0, 0] != 0 or ranges[-1, 0] != MAX_CODEPOINTS:
        raise ValueError(f"{unicode_data_cpp}: unicode_ranges_flags must run from 0 to {MAX_CODEPOINTS:#x}")
    np.savez_compressed(_NPZ, range_starts=ranges[:-1, 0], range_flags=ranges[:-1, 1].astype(np.uint16),
                        whitespace=np.array(whitespace, dtype=np.uint32),
                        lower_from=lower[:, 0], lower_to=lower[:, 1])


if __name__ == "__main__":
    main(sys.argv[1])
