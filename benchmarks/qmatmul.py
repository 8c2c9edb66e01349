"""Quantized matmul on the GPU: device time per call, GB/s of bytes read, ratio to XLA's bf16 dot.

Shapes are ``KxN`` (in x out features: ``x [M, K] @ W.T`` with ``W [N, K]``), Llama-3-8B's by
default. Each timing runs one jitted function over enough distinct weights to exceed the 60 MB
L2 (at least ``--min-mb`` per call) and sums its GPU kernels' durations from the profiler
(``gpu_trace``), divided by the number of weights: host dispatch and timer jitter (which made
single wall-clock timings wander by 2x) do not count. XLA's bf16 dot of the same shapes is timed
the same way in the same run. Weights hold random bytes (``pallas_kernels.testing``);
each result is checked against dequantize + f32 dot.

    python benchmarks/qmatmul.py [--formats Q4_0,Q4_K] [--shapes 4096x14336,14336x4096] [--m 1,16,2048]
    python benchmarks/qmatmul.py --sweep --formats Q4_0 --shapes 4096x14336 --m 1   # tiling sweep
    python benchmarks/qmatmul.py --sweep gemv --formats Q8_0 --m 1   # the CUDA gemv's tilings and Triton's default
    XLA_FLAGS=--xla_gpu_autotune_level=0 timeout 300 ncu --clock-control none -k regex:qmm -c 2 --set full \
        python benchmarks/qmatmul.py --once --formats Q4_K --shapes 4096x14336 --m 1    # hardware counters
    python benchmarks/qmatmul.py --cpu --formats Q4_K,IQ2_XS --shapes 1024x2048     # XLA's CPU path, M = 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time

import jax
import jax.numpy as jnp
from gpu_trace import traced

from jaxquant import ops
from jaxquant.formats import get_format

SHAPES = ("4096x4096", "4096x1024", "4096x14336", "14336x4096", "4096x128256")
FORMATS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "AFQ4_G64",
           "AFQ8_G64", "GPTQ4_G128", "HQQ4_G64", "FP8_E4M3_CH", "NVFP4", "NF4")
DOT = (((1,), (1,)), ((), ()))


def device_us(matmul, x, ws, reps: int) -> tuple[float, list]:
    """Microseconds of GPU kernels per matmul over the distinct weights ``ws`` (profiler
    timestamps, mean over ``reps`` calls): the kernel and the XLA work around it, no dispatch."""
    full = jax.jit(lambda x, ws: tuple(matmul(x, w) for w in ws))
    times = traced(full, x, ws, reps=reps)
    return sum(map(sum, times.values())) / reps / len(ws), full(x, ws)


def rel_err(y, x, w) -> float:
    ref = jnp.dot(x.astype(jnp.float32), w.dequantize(jnp.float32).T, precision=jax.lax.Precision.HIGHEST)
    return float(jnp.linalg.norm(y.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))


def bench(fmt: str, k: int, n: int, m: int, args, matmul=None) -> dict:
    """One format, shape and M: time, GB/s and error of ``matmul`` (default: ``qdot`` on Pallas)."""
    import pallas_kernels as pk
    from pallas_kernels.testing import random_qtensor

    nbytes = get_format(fmt).row_bytes(k) * n
    count = max(2, math.ceil(args.min_mb * 1e6 / nbytes))
    key = jax.random.key(1)
    ws = [random_qtensor(fmt, n, k, jax.random.fold_in(key, i)) for i in range(count)]
    x = jax.random.normal(jax.random.key(2), (m, k), jnp.float32).astype(jnp.bfloat16)
    if matmul is None:  # qdot as models call it; JAXQUANT_QDOT_BACKEND=interpret dry-runs it on a CPU
        kern, backend = pk.select(ws[0], m), ops.resolve_backend()
        op = kern.op if kern is not None and backend != "xla" else "xla"
        matmul = ops.qdot
    else:
        op = "sweep"
    t0 = time.perf_counter()
    us, outs = device_us(matmul, x, ws, args.reps)
    moved = nbytes + 2 * m * k + 4 * m * n  # weights, bf16 x, f32 out
    return dict(format=fmt, shape=f"{k}x{n}", m=m, op=op, us=us, gbs=moved / us / 1e3,
                err=rel_err(outs[0], x, ws[0]), wall_s=time.perf_counter() - t0)


def bench_bf16(k: int, n: int, m: int, args) -> dict:
    nbytes = 2 * n * k
    count = max(2, math.ceil(args.min_mb * 1e6 / nbytes))
    ws = [jax.random.normal(jax.random.key(10 + i), (n, k), jnp.float32).astype(jnp.bfloat16) for i in range(count)]
    x = jax.random.normal(jax.random.key(2), (m, k), jnp.float32).astype(jnp.bfloat16)
    us, _ = device_us(lambda x, w: jax.lax.dot_general(x, w, DOT), x, ws, args.reps)
    return dict(format="bf16", shape=f"{k}x{n}", m=m, us=us, gbs=(nbytes + 2 * m * k + 2 * m * n) / us / 1e3)


def sweep_configs(fmt: str, k: int, n: int, m: int, which: str = "all"):
    """Tilings tried by ``--sweep``: (label, matmul) pairs: the CUDA gemv's tilings, then around
    the default of the Triton ``gemv`` (M = 1; ``which="gemv"``: the default only) or
    ``qmm`` (large M runs the dequantize + dot path, which has no tiling to sweep)."""
    import pallas_kernels as pk
    from pallas_kernels import batch_cuda, gemv, gemv_cuda, gemv_ggml, qmm

    if m == 1 and fmt in gemv_cuda.FORMATS and gemv_cuda.available():
        for tiling in gemv_cuda.TILINGS:
            yield f"cuda (rows, warps)={tiling}", (lambda x, w, t=tiling: gemv_cuda.gemv(x, w, tiling=t))
    if 1 < m <= batch_cuda.MAX_M and fmt in batch_cuda.FORMATS and batch_cuda.available():
        for warps in batch_cuda.WARPS:
            yield f"cuda batch warps={warps}", (lambda x, w, s=warps: batch_cuda.batch(x, w, warps=s))
    gdec = {d.fmt: d for d in gemv_ggml.DECODERS}.get(fmt)
    if m == 1 and gdec is not None and which == "gemv":
        yield "triton default", (lambda x, w: gemv.gemv(x, w, gdec))
        return
    if m == 1 and gdec is not None:
        g = gemv.default_config(gdec, n, k)
        for v in ({}, {"prefetch": True}, {"prefetch": False}, {"block_n": 64}, {"block_n": 64, "prefetch": False},
                  {"block_n": 128}, {"block_n": 64, "num_warps": 8}, {"steps_blocks": 2 * g.steps_blocks},
                  {"block_n": 64, "steps_blocks": 2 * g.steps_blocks},
                  {"block_n": 64, "steps_blocks": max(1, g.steps_blocks // 2)}, {"block_n": 16, "num_warps": 2},
                  {"block_n": 128, "steps_blocks": max(1, g.steps_blocks // 2)},
                  {"splits": 2 * g.splits}, {"splits": 4 * g.splits}, {}):
            tiling = {key: v.pop(key) for key in ("block_n", "steps_blocks") if key in v}
            cfg = dataclasses.replace(gemv.default_config(gdec, n, k, **tiling), **v)
            yield str(cfg), (lambda x, w, cfg=cfg: gemv.gemv(x, w, gdec, config=cfg))
        return
    dec = pk.DECODERS[fmt]
    base = qmm.default_config(dec, m, n, k)
    for v in ({}, {"num_stages": 3}, {"num_stages": 4}, {"num_warps": 8}, {"splits": 2 * base.splits},
              {"splits": max(1, base.splits // 2)}, {"block_b": 2 * base.block_b},
              {"block_n": 128, "num_warps": 8}, {"splits": max(1, base.splits // 2), "num_stages": 4}):
        cfg = dataclasses.replace(base, **v)
        yield str(cfg), (lambda x, w, cfg=cfg: qmm.qmm(x, w, dec, config=cfg))


def once(args) -> None:
    """Each format, shape and M through qdot three times on one weight: little else for a profiler
    to wade through (no baseline, no autotuned library dots)."""
    from pallas_kernels.testing import random_qtensor

    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        for fmt in args.formats.split(","):
            w = random_qtensor(fmt, n, k, jax.random.key(1))
            for m in (int(v) for v in args.m.split(",")):
                x = jax.random.normal(jax.random.key(2), (m, k), jnp.float32).astype(jnp.bfloat16)
                f = jax.jit(ops.qdot)
                for _ in range(3):
                    jax.block_until_ready(f(x, w))
                print(f"{fmt} {shape} M={m}: ran", flush=True)


def cpu(formats: list[str], shapes: list[str], reps: int) -> None:
    """qdot's CPU path at M = 1 against an f32 dot of the same shape in the same run, in CPU time of
    all threads (steadier than wall time on a shared machine); random packed weights."""
    from pallas_kernels.testing import random_qtensor

    f = jax.jit(lambda x, w: ops.qdot(x, w, backend="xla"))

    def cpu_ms(x, w) -> float:
        jax.block_until_ready(f(x, w))
        t = time.process_time()
        for _ in range(reps):
            jax.block_until_ready(f(x, w))
        return (time.process_time() - t) / reps * 1e3

    print("| format | shape KxN | CPU ms | f32 dot CPU ms | x f32 dot |")
    print("|---|---|---|---|---|")
    for shape in shapes:
        k, n = (int(v) for v in shape.split("x"))
        x = jax.random.normal(jax.random.key(1), (1, k), jnp.float32)
        wf = jax.random.normal(jax.random.key(2), (n, k), jnp.float32)
        for fmt in formats:
            ms, base = cpu_ms(x, random_qtensor(fmt, n, k, jax.random.key(3))), cpu_ms(x, wf)
            print(f"| {fmt} | {shape} | {ms:.2f} | {base:.2f} | {ms / base:.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--shapes", default="4096x14336,14336x4096")
    ap.add_argument("--m", default="1,16,2048")
    ap.add_argument("--min-mb", type=float, default=150.0, help="weight bytes per timed call")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--sweep", nargs="?", const="all", choices=("all", "gemv"),
                    help="time tiling variants instead of the defaults (gemv: at M = 1 the CUDA gemv's tilings "
                         "and the Triton gemv's default only)")
    ap.add_argument("--json", help="write all rows to this file")
    ap.add_argument("--once", action="store_true", help="run each kernel a few times, untimed (for ncu)")
    args = ap.parse_args()
    if args.once:
        once(args)
        return
    ap.add_argument("--cpu", action="store_true", help="qdot's XLA CPU path at M = 1 against an f32 dot")
    args = ap.parse_args()
    if args.cpu:
        return cpu(args.formats.split(","), args.shapes.split(","), args.reps)
    print(jax.devices()[0].device_kind, "jax", jax.__version__, flush=True)
    rows = []
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        for m in (int(v) for v in args.m.split(",")):
            base = bench_bf16(k, n, m, args)
            rows.append(base)
            print(f"bf16 {shape} M={m}: {base['us']:.1f} us {base['gbs']:.0f} GB/s", flush=True)
            for fmt in args.formats.split(","):
                if args.sweep:
                    cands = list(sweep_configs(fmt, k, n, m, args.sweep))
                else:
                    cands = [("default", None)]
                for label, mm in cands:
                    try:
                        r = bench(fmt, k, n, m, args, mm)
                    except Exception as e:  # a config the compiler rejects: report, go on
                        print(f"{fmt} {shape} M={m} {label}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                        continue
                    r.update(config=label, ratio=base["us"] / r["us"])
                    rows.append(r)
                    print(f"{fmt} {shape} M={m} {r['op']} {label}: {r['us']:.1f} us {r['gbs']:.0f} GB/s "
                          f"x{r['ratio']:.2f} err={r['err']:.1e} ({r['wall_s']:.0f}s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print("\n| format | shape KxN | M | kernel | us | GB/s | bf16 us | x bf16 | rel err |")
    print("|---|---|---|---|---|---|---|---|---|")
    bf = {(r["shape"], r["m"]): r for r in rows if r["format"] == "bf16"}
    for r in rows:
        if r["format"] != "bf16":
            b = bf[(r["shape"], r["m"])]
            print(f"| {r['format']} | {r['shape']} | {r['m']} | {r['op']} | {r['us']:.1f} | {r['gbs']:.0f} | "
                  f"{b['us']:.1f} | {r['ratio']:.2f} | {r['err']:.1e} |" + (f" {r['config']}" if args.sweep else ""))


if __name__ == "__main__":
    main()
