"""Where a decode step's GPU time goes: a per-kernel breakdown of greedy generation on the
Llama-3-8B shape (random weights, ``decode.py --llama8b``), from JAX's own profiler trace.

Each format's generate program is compiled, then run once under ``jax.profiler.trace``; the GPU
kernels in the trace are summed by name and divided by the number of decode steps (the
prefill of the short prompt is included and small). Launch gaps and host work are not counted.

    python benchmarks/profile_decode.py [--formats Q4_K_M-like,Q8_0,bf16] [--layers 32] [--tokens 64] [--batch 1]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from decode import _llama8b
from gpu_trace import traced

from jaxquant.generate import generate_tokens


def profile(fmt: str, layers: int, tokens: int, top: int, batch: int) -> None:
    model = _llama8b(fmt, layers)
    prompt = [list(range(1000, 1024))] * batch
    times = traced(lambda: generate_tokens(model, prompt, max_tokens=tokens))
    total = sum(sum(v) for v in times.values())
    print(f"\n### {fmt}, {layers} layers, batch {batch}, {tokens} steps: kernels {total / 1e3 / tokens:.2f} ms/step, "
          f"{sum(map(len, times.values())) / tokens:.0f} kernels/step\n")
    print("| kernel | calls/step | us/call | us/step | share |\n|---|---|---|---|---|")
    for name, v in sorted(times.items(), key=lambda kv: -sum(kv[1]))[:top]:
        print(f"| {name[:70]} | {len(v) / tokens:.1f} | {sum(v) / len(v):.1f} | {sum(v) / tokens:.1f} | "
              f"{sum(v) / total:.1%} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="Q4_K_M-like,Q8_0,bf16")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    ap.add_argument("--attention", choices=("auto", "xla"), default="auto",
                    help="xla: decode attention through the XLA kernels, not the fused (cuDNN) one")
    args = ap.parse_args()
    if args.attention == "xla":
        from jaxquant.models import base
        base._fused_decode = lambda *a: False
    print(jax.devices()[0].device_kind, "JAX", jax.__version__)
    for fmt in args.formats.split(","):
        profile(fmt, args.layers, args.tokens, args.top, args.batch)


if __name__ == "__main__":
    main()
