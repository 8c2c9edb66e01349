"""Where a decode step's GPU time goes: a per-kernel breakdown of greedy generation on the
Llama-3-8B shape (random weights, ``decode.py --llama8b``), from JAX's own profiler trace.

Each format's generate program is compiled, then run once under ``jax.profiler.trace``; the GPU
kernels in the trace are summed by name and divided by the number of generated tokens (the
prefill of the short prompt is included and small). Wall time per token is printed beside the
summed kernel time: the difference is launch gaps and host work.

    python benchmarks/profile_decode.py [--formats Q4_K_M-like,Q8_0,bf16] [--layers 32] [--tokens 64] [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from decode import _llama8b

from jaxquant.generate import generate_tokens


def kernel_times(trace_dir: str) -> dict[str, list[float]]:
    """Durations (us) of every GPU kernel in the trace, by kernel name (the stream lines of the GPU
    planes; the derived "XLA Ops" / "XLA Modules" lines would count them twice)."""
    from jax.profiler import ProfileData

    out: dict[str, list[float]] = collections.defaultdict(list)
    for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
        for plane in ProfileData.from_file(path).planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            for line in plane.lines:
                if "stream" not in line.name.lower():
                    continue
                for ev in line.events:
                    out[ev.name].append(ev.duration_ns / 1e3)
    return out


def profile(fmt: str, layers: int, tokens: int, top: int) -> None:
    model = _llama8b(fmt, layers)
    prompt = [list(range(1000, 1024))]
    generate_tokens(model, prompt, max_tokens=tokens)  # compiles
    with tempfile.TemporaryDirectory() as d:
        start = time.perf_counter()
        with jax.profiler.trace(d):
            generate_tokens(model, prompt, max_tokens=tokens)
        wall = time.perf_counter() - start
        times = kernel_times(d)
    total = sum(sum(v) for v in times.values())
    print(f"\n### {fmt}, {layers} layers, {tokens} tokens: wall {1e3 * wall / tokens:.2f} ms/token (traced), "
          f"kernels {total / 1e3 / tokens:.2f} ms/token, {sum(map(len, times.values())) / tokens:.0f} kernels/token\n")
    print("| kernel | calls/token | us/call | us/token | share |\n|---|---|---|---|---|")
    for name, v in sorted(times.items(), key=lambda kv: -sum(kv[1]))[:top]:
        print(f"| {name[:70]} | {len(v) / tokens:.1f} | {sum(v) / len(v):.1f} | {sum(v) / tokens:.1f} | "
              f"{sum(v) / total:.1%} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="Q4_K_M-like,Q8_0,bf16")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    print(jax.devices()[0].device_kind, "JAX", jax.__version__)
    for fmt in args.formats.split(","):
        profile(fmt, args.layers, args.tokens, args.top)


if __name__ == "__main__":
    main()
