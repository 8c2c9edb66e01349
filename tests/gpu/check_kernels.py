"""GPU check of every kernel against dequantize + f32 dot (run on a GPU machine; not pytest).

    python tests/gpu/check_kernels.py [--formats Q4_0,Q4_K] [--m 1,3,16,128,2048]

Each registered format, M and shape (``KxN``, not powers of two by default) gets random packed
bytes and bf16 activations; the kernel ``qdot`` selects (and, at M = 1, every tiling of the CUDA
gemv of the format, and the Triton gemv where the CUDA one displaces it; up to 8 rows, every split of
the CUDA batch kernel) must match the float32 reference to a relative error (Frobenius norm) below 2e-3;
the batch kernel, exact products summed in float32, below 1e-5, also with float32 activations that
bf16 does not hold (its hi + lo path).
The CUDA gemv and batch kernel also run fused, as a decoder calls them: their input an RMS norm
(bf16) with a residual added, a gated unit (SiLU, bf16), or an RMS norm shared by the weight and a
Q6_K one (one call, as q/k and v), against the reference products of ``Activation.value()``.
Exits non-zero on any failure or a missing kernel.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import sys
import time
import zlib

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from jaxquant.ops import Activation
from pallas_kernels import batch_cuda, gemv_cuda
from pallas_kernels.testing import random_qtensor

TOL = 2e-3
TOL_BATCH = 1e-5
TOL_BATCH_FUSED = 1e-4  # its input computed in the kernel: a bf16 rounding may fall the other way
FUSED = ("rms_norm+residual", "silu", "shared")


def operands(variant: str | None, x: jax.Array):
    """(the kernel's input, the reference's input, whether a residual is added) of a case: x itself,
    or an Activation made from it (the norm's input scaled as a residual stream, a [gate | up] pair)."""
    if variant is None:
        return x, x, False
    if variant == "f32":  # 12 more mantissa bits than bf16 holds
        xf = x.astype(jnp.float32) * (1 + 2.0 ** -12)
        return xf, xf, False
    if variant == "silu":  # in bf16, the compute dtype (the batch kernel takes it only so)
        act = Activation(jnp.concatenate([x, x[:, ::-1]], -1).astype(jnp.float32) * 2, "silu",
                         dtype=jnp.dtype(jnp.bfloat16))
        return act, act.value(), False
    weight = jnp.linspace(0.2, 3, x.shape[1])
    act = Activation(x.astype(jnp.float32) * 40, "rms_norm", weight, 1e-6, jnp.dtype(jnp.bfloat16))
    return act, act.value(), variant != "shared"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default=",".join(sorted(pk.DECODERS)))
    ap.add_argument("--shapes", default="2048x640,10240x2560,2560x10240")
    ap.add_argument("--m", default="1,3,16,128,2048")
    args = ap.parse_args()
    if jax.default_backend() != "gpu":
        print("check_kernels.py needs a GPU")
        return 2
    cases = []
    for fmt in args.formats.split(","):
        for shape in args.shapes.split(","):
            k, n = (int(v) for v in shape.split("x"))
            key = jax.random.key(zlib.crc32(f"{fmt} {shape}".encode()))
            w = random_qtensor(fmt, n, k, key)
            for m in (int(v) for v in args.m.split(",")):
                x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.float32).astype(jnp.bfloat16)
                kern = pk.select(w, m)
                if kern is None:
                    print(f"FAIL {fmt} {shape} M={m}: no kernel selected")
                    return 1
                cases.append((fmt, shape, m, x, w, kern, None))
                if m == 1 and fmt in gemv_cuda.FORMATS and gemv_cuda.available():  # each tiling, selected or not
                    cuda = pk.lookup(fmt, "gemv", "cuda")
                    for t in gemv_cuda.TILINGS:
                        fn = functools.partial(gemv_cuda.gemv, tiling=t)
                        cases.append((fmt, shape, m, x, w, dataclasses.replace(cuda, fmt=f"{fmt} {t}", fn=fn), None))
                    for variant in FUSED:
                        cases.append((fmt, shape, m, x, w, dataclasses.replace(cuda, fmt=f"{fmt} {variant}"), variant))
                    if kern.backend == "cuda":  # and the Triton gemv it displaces
                        cases.append((fmt, shape, m, x, w, pk.lookup(fmt, "gemv", "triton"), None))
                if m <= batch_cuda.MAX_M and fmt in batch_cuda.FORMATS and batch_cuda.available():  # each split
                    cuda = pk.lookup(fmt, "batch", "cuda")
                    for s in batch_cuda.WARPS:
                        fn = functools.partial(batch_cuda.batch, warps=s)
                        cases.append((fmt, shape, m, x, w, dataclasses.replace(cuda, fmt=f"{fmt} batch/{s}", fn=fn),
                                      None))
                    cases.append((fmt, shape, m, x, w, dataclasses.replace(cuda, fmt=f"{fmt} f32"), "f32"))
                    for variant in FUSED:
                        cases.append((fmt, shape, m, x, w, dataclasses.replace(cuda, fmt=f"{fmt} {variant}"), variant))

    # K -> the second weight of "shared" cases (an argument of every case's program, used by those)
    second = {k: random_qtensor("Q6_K", 1024, k, jax.random.key(k)) for k in {c[4].shape[1] for c in cases}}

    def compile_case(case):
        *_, x, w, kern, variant = case

        def both(x, w, w2):  # the kernel and the reference, compiled together
            xk, xr, residual = operands(variant, x)
            ref = jnp.dot(xr.astype(jnp.float32), w.dequantize(jnp.float32).T, precision=jax.lax.Precision.HIGHEST)
            if variant == "shared":  # and a second weight of another format and height
                ref2 = jnp.dot(xr.astype(jnp.float32), w2.dequantize(jnp.float32).T, precision=jax.lax.Precision.HIGHEST)
                return jnp.concatenate(kern.fn(xk, (w, w2)), -1), jnp.concatenate([ref, ref2], -1)
            if not residual:
                return kern.fn(xk, w, interpret=False).astype(jnp.float32), ref
            res = jnp.linspace(-1, 1, ref.shape[1]) * jnp.sqrt(jnp.mean(ref * ref))  # as large as the product
            return kern.fn(xk, w, residual=jnp.broadcast_to(res, ref.shape), interpret=False), ref + res

        return jax.jit(both).lower(x, w, second[w.shape[1]]).compile()

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # Triton/XLA compiles overlap
        futures = [pool.submit(compile_case, c) for c in cases]
    print(f"compiled {len(cases)} cases in {time.perf_counter() - t0:.0f} s", flush=True)

    failures = 0
    worst: dict[str, float] = {}
    for case, fut in zip(cases, futures):
        _, shape, m, x, w, kern, variant = case
        fmt = f"{kern.fmt} {kern.op}/{kern.backend}"
        try:
            y, ref = fut.result()(x, w, second[w.shape[1]])
            err = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
            tol = TOL if kern.op != "batch" else TOL_BATCH if variant in (None, "f32") else TOL_BATCH_FUSED
            ok = err < tol and bool(jnp.isfinite(y).all())
        except Exception as e:  # a kernel that fails to compile or run is a failure too
            err, ok = float("nan"), False
            print(f"{fmt} {shape} M={m}: {type(e).__name__}: {str(e)[:400]}")
        worst[fmt] = max(worst.get(fmt, 0.0), err) if ok else float("nan")
        failures += not ok
        if not ok:
            print(f"FAIL {fmt} {shape} M={m} rel err {err:.2e}", flush=True)
    for fmt, e in worst.items():
        print(f"{fmt}: worst rel err {e:.2e} over {args.shapes} x M={args.m}")
    print(f"{len(cases) - failures}/{len(cases)} passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
