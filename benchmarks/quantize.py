"""Quantization throughput: jaxquant vs llama.cpp (CPU), or jaxquant on the GPU.

CPU: each type on the same float matrix, llama.cpp's ggml_quantize_chunk run as llama-quantize
runs it (rows split over --threads workers); jaxquant on the same XLA CPU threads.
GPU: device time of one jitted quantize of a bf16 matrix, timed over distinct inputs in one loop.

    python benchmarks/quantize.py --cpu [--types Q4_0,Q4_K] [--shape 4096,4096] [--imatrix]
    python benchmarks/quantize.py --gpu [--types Q4_K,Q8_0] [--shape 4096,14336]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxquant as jq

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "formats"))


def _best(fn, repeat: int) -> float:
    return _best_wall_cpu(fn, repeat)[0]


def _best_wall_cpu(fn, repeat: int) -> tuple[float, float]:
    """The least wall time and the least CPU time (all threads of this process) over ``repeat`` runs."""
    walls, cpus = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return min(walls), min(cpus)


def cpu(types: list[str], shape: tuple[int, int], threads: int, repeat: int, imatrix: bool = False) -> None:
    import llama_oracle
    from edge_cases import imatrix as random_imatrix

    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    w = random_imatrix(shape[1], seed=1) if imatrix else None  # the tests' recipe: log-normal importances
    mb = x.nbytes / 1e6
    pool = concurrent.futures.ThreadPoolExecutor(threads)
    parts = np.array_split(x, threads)

    # CPU time (all threads) next to wall time: on a machine shared with other jobs it is the steadier measure
    print(f"| type | jaxquant MB/s | llama.cpp MB/s ({threads} threads) | ratio | ratio of CPU time | compile s | "
          "bytes equal |")
    print("|---|---|---|---|---|---|---|")
    for name in types:
        t0 = time.perf_counter()
        q = jq.quantize(x, name, w)
        jax.block_until_ready(q)
        compile_s = time.perf_counter() - t0
        ours, ours_cpu = _best_wall_cpu(lambda: jax.block_until_ready(jq.quantize(x, name, w)), repeat)
        ref, ref_cpu = _best_wall_cpu(lambda: list(pool.map(lambda p: llama_oracle.quantize(p, name, w), parts)),
                                      repeat)
        equal = np.array_equal(q.format.to_bytes(q), llama_oracle.quantize(x, name, w))
        print(f"| {name} | {mb / ours:.1f} | {mb / ref:.1f} | {ref / ours:.2f}x | {ref_cpu / ours_cpu:.2f}x | "
              f"{compile_s - ours:.1f} | {equal} |")


def gpu(types: list[str], shape: tuple[int, int], n_inputs: int) -> None:
    key = jax.random.PRNGKey(0)
    xs = [jax.random.normal(k, shape, jnp.bfloat16) for k in jax.random.split(key, n_inputs)]
    gb = shape[0] * shape[1] * 2 / 1e9
    print(f"device: {jax.devices()[0].device_kind}; input {shape} bf16, {n_inputs} distinct inputs per timed call")
    print("| type | device ms / matrix | GB/s of bf16 input | blocks identical to the CPU's |")
    print("|---|---|---|---|")
    for name in types:
        fmt = jq.get_format(name)

        @jax.jit
        def many(xs):
            return [fmt.quantize_rows(x.astype(jnp.float32), None) for x in xs]

        @jax.jit
        def empty(xs):
            return [x[:1, :1] for x in xs]

        jax.block_until_ready(many(xs))
        jax.block_until_ready(empty(xs))
        t = _best(lambda: jax.block_until_ready(many(xs)), 5) - _best(lambda: jax.block_until_ready(empty(xs)), 5)
        per = t / n_inputs
        rows = np.asarray(xs[0][:256].astype(jnp.float32))
        on_gpu = fmt.to_bytes(jq.quantize(rows, name)).reshape(-1, fmt.type_size)
        with jax.default_device(jax.devices("cpu")[0]):
            on_cpu = fmt.to_bytes(jq.quantize(rows, name)).reshape(-1, fmt.type_size)
        same = (on_gpu == on_cpu).all(axis=1).mean()
        print(f"| {name} | {per * 1e3:.3f} | {gb / per:.1f} | {same:.2%} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--cpu", action="store_true")
    g.add_argument("--gpu", action="store_true")
    p.add_argument("--types", default=None)
    p.add_argument("--shape", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--inputs", type=int, default=8)
    p.add_argument("--imatrix", action="store_true", help="--cpu: random importance weights (IQ1_S, IQ2_XXS and "
                   "IQ2_XS need them)")
    a = p.parse_args()
    if a.cpu:
        types = a.types.split(",") if a.types else [n for n in jq.list_formats(True) if n not in ("F32", "F16", "BF16")]
        cpu(types, tuple(int(s) for s in (a.shape or "4096,4096").split(",")), a.threads, a.repeat, a.imatrix)
    else:
        types = a.types.split(",") if a.types else ["Q4_K", "Q8_0"]
        gpu(types, tuple(int(s) for s in (a.shape or "4096,14336").split(",")), a.inputs)


if __name__ == "__main__":
    main()
