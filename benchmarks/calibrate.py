"""Calibration time of a real model, layer by layer: GPTQ or AWQ (``jaxquant.calib.calibrate``)
runs one jitted call per decoder layer; this prints each layer's wall time (the call and the
transfer of its results), how many XLA compilations it caused (layers of the same kind and formats
share one), and the totals.

    python benchmarks/calibrate.py --method gptq --policy Q4_0 --ctx 256 --chunks 8      # CPU, small
    python benchmarks/calibrate.py --method gptq --policy Q4_K_M --ctx 512 --chunks 128 --batch 8  # GPU

The calibration text defaults to tests/data/shakespeare.txt (31,921 Gemma tokens: 62 chunks of
512; more chunks than the text holds are cut to what it holds).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax

from jaxquant.calib import Calibration, calibrate
from jaxquant.eval.sweep import compile_count
from jaxquant.io import open_model

TEXT = Path(__file__).resolve().parents[1] / "tests" / "data" / "shakespeare.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="GGUF file or HF directory (default: the embedded Gemma)")
    ap.add_argument("--policy", default="Q4_0", help="the formats (a mix, a YAML policy)")
    ap.add_argument("--method", choices=("gptq", "awq"), default="gptq")
    ap.add_argument("--text", default=str(TEXT), help="calibration text file")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4, help="chunks per step inside a layer's call")
    ap.add_argument("--act-order", action="store_true")
    args = ap.parse_args()

    source = open_model(args.model)
    text = Path(args.text).read_text(encoding="utf-8")
    calib = Calibration(args.method, n_ctx=args.ctx, n_chunks=args.chunks, batch=args.batch, act_order=args.act_order)
    rows, last = [], [time.perf_counter(), compile_count()]

    def log(message: str) -> None:  # called after each layer, its output ready
        now, compiles = time.perf_counter(), compile_count()
        rows.append((message.split(":")[0], now - last[0], compiles - last[1]))
        last[:] = [now, compiles]

    start, compiles = time.perf_counter(), compile_count()
    calibrate(source, args.policy, text, calib, show_progress=False, log=log)
    total = time.perf_counter() - start
    print(f"{args.method} of {source.path} for {args.policy} on {jax.devices()[0].device_kind} "
          f"({jax.default_backend()}), JAX {jax.__version__}: chunks of {args.ctx} tokens, batch {calib.batch}")
    print(f"{'layer':<10} {'seconds':>9} {'compiles':>9}")
    for name, seconds, n in rows:
        print(f"{name:<10} {seconds:>9.2f} {n:>9}")
    warm = [s for _, s, n in rows if n == 0]
    print(f"total {total:.1f} s (setup, embedding and tokenization included), {compile_count() - compiles} "
          f"compilations; layers without a compilation: {len(warm)}, {sum(warm) / max(len(warm), 1):.2f} s each")


if __name__ == "__main__":
    main()
