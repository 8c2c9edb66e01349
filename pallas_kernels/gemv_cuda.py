"""Matrix-vector products (M = 1) of llama.cpp's 4- to 8-bit block formats as CUDA kernels called
through the XLA FFI.

``gemv_cuda.cu`` holds the kernels (built into ``cuda_lib``'s library); this module registers its
handlers with XLA, and ``pallas_kernels`` registers them as kernels of backend ``"cuda"``.
Triton would not issue a row block's loads together ahead of their use, nor keep the activations
in L1 (its launches carve 233 KB of shared memory out of it): NOTES-gpu.md, session 6. The arithmetic
is ``gemv.py``'s (same activation quantization, integer dot products, per-group float32 scales), so
results equal the Triton kernel's up to the order of float32 sums.

A gemv's FFI call quantizes the activations itself (``quantize_activations``' rule in a CUDA
kernel, a warp a block of 32) and launches the product to start while that runs (programmatic
dependent launch: the first weights are read before it waits for the activations);
``JAXQUANT_CUDA_PDL=0`` launches each kernel after the previous one ends. That kernel also computes
an ``ops.Activation`` input (RMS norm, gated unit) before quantizing it, and the product adds a
residual as it is written: a decoder layer's norms, gated unit and residual sums take no kernels
of their own (``JAXQUANT_CUDA_FUSE=0``: XLA computes them, for comparison).

Without ``nvcc`` or a GPU the kernels are unavailable and ``qdot`` uses the Triton ones.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.errors import JaxquantError
from jaxquant.ops import Activation
from jaxquant.qtensor import QTensor
from pallas_kernels import cuda_lib

FORMATS = {f: f"jq_gemv_{f.lower()}" for f in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K",
                                               "IQ4_NL", "IQ4_XS")}
# weights a lane group's 128 code bytes hold (4 blocks of Q8_0, 8 of the other legacy formats, one
# super-block of the K-quants): K must be whole units
UNIT = {**dict.fromkeys(("Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL"), 256), "Q8_0": 128,
        **dict.fromkeys(("Q4_K", "Q5_K", "Q6_K", "IQ4_XS"), 256)}
# (rows a warp, warps splitting a row's K): the template instances, each some shape's fastest
TILINGS = ((4, 1), (4, 2), (2, 4))
# what the call computes from its x before quantizing (gemv_cuda.cu's Prologue), and the dtype it
# rounds that to (Rounding)
PROLOGUES = {None: 0, "rms_norm": 1, "silu": 2, "gelu_tanh": 3}
ROUNDING = {jnp.dtype(jnp.float32): 0, jnp.dtype(jnp.bfloat16): 1, jnp.dtype(jnp.float16): 2}


@functools.cache
def available() -> bool:
    """Whether the kernels are built and registered (first call on a GPU compiles them)."""
    lib = cuda_lib.load() if os.environ.get("JAXQUANT_CUDA_GEMV", "1") != "0" else None
    if lib is None:
        return False
    for name in FORMATS.values():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="CUDA")
    return True


def fuses() -> bool:
    """Whether qdot hands the gemv its ``Activation`` inputs and residuals (``JAXQUANT_CUDA_FUSE``)."""
    return os.environ.get("JAXQUANT_CUDA_FUSE", "1") != "0"


def supports(fmt: str, m: int, n: int, k: int) -> bool:
    return fmt in FORMATS and m == 1 and k % UNIT[fmt] == 0 and n % 4 == 0 and available()


def default_tiling(n: int) -> tuple[int, int]:
    """About 2048 warps (16 an SM), from 4 rows a warp and K split over 1, 2 or 4 warps. The fastest
    of 7 tilings for Q4_K and Q6_K on the H200 at N = 1024, 4096 (K = 4096, 14336) and N >= 14336
    (benchmarks/RESULTS.md, session 7; Q6_K at N >= 14336 within 3% of 2 rows a warp), and of the
    3 built for each other format at N = 4096 and 14336 (session 8)."""
    return (4, 1) if n >= 8192 else (4, 2) if n >= 4096 else (2, 4)


def _tiling_code(tiling: tuple[int, int] | None, n: int) -> int:
    tiling = tiling or default_tiling(n)
    if tiling not in TILINGS:
        raise JaxquantError(f"gemv_cuda: tiling {tiling} is not one of {TILINGS}")
    rows, warps = tiling
    return 10 * rows + warps


@functools.partial(jax.jit, static_argnames=("tiling", "interpret"))
def gemv(x: jax.Array | Activation, w: QTensor | tuple[QTensor, ...], residual: jax.Array | None = None,
         tiling: tuple[int, int] | None = None, interpret: bool = False) -> jax.Array | tuple[jax.Array, ...]:
    """``x [1, K] @ dequantize(w).T`` (+ ``residual [1, N]`` float32) -> ``[1, N]`` float32 for a ``w``
    of one of ``FORMATS``; ``x`` may be an ``ops.Activation`` (the norm's x float32); ``tiling``: one of
    ``TILINGS`` (default ``default_tiling``). ``w`` may be a tuple of weights (no residual): their
    products, in one call that prepares ``x`` once (each further weight at its default tiling)."""
    if interpret:
        raise JaxquantError("gemv_cuda has no interpreter; use the Triton gemv")
    w, *more = w if isinstance(w, tuple) else (w,)
    if more and residual is not None:
        raise JaxquantError("gemv_cuda: a residual is added to one weight's product, not to several")
    n = w.shape[0]
    if not isinstance(x, Activation):
        prologue, eps, operands, rounding = PROLOGUES[None], 0.0, [x[0]], jnp.float32
    elif x.kind == "rms_norm":
        prologue, eps, rounding = PROLOGUES["rms_norm"], x.eps, x.dtype
        operands = [x.x[0].astype(jnp.float32), x.weight.astype(jnp.float32)]
    else:  # the gated unit of [gate | up], in x's dtype as jnp computes it, then in the compute dtype
        narrow = min(jnp.dtype(x.x.dtype), jnp.dtype(x.dtype), key=lambda d: d.itemsize)
        prologue, eps, operands, rounding = PROLOGUES[x.kind], 0.0, [x.x[0]], narrow
    if residual is not None:
        operands.append(residual[0].astype(jnp.float32))
    blocks = w.shape[1] // 32
    # the product, then the activations as quantize_activations gives them (scratch of the call)
    results = (jax.ShapeDtypeStruct((n,), jnp.float32), jax.ShapeDtypeStruct((blocks, 16), jnp.uint32),
               jax.ShapeDtypeStruct((blocks, 1), jnp.float32), jax.ShapeDtypeStruct((blocks, 4), jnp.int32))
    results += tuple(jax.ShapeDtypeStruct((v.shape[0],), jnp.float32) for v in more)
    call = jax.ffi.ffi_call(FORMATS[w.fmt], results)
    operands += [v.arrays[name] for v in more for name in sorted(v.arrays)]
    out, _, _, _, *outs = call(*(w.arrays[name] for name in sorted(w.arrays)), *operands,
                               tiling=np.int64(_tiling_code(tiling, n)), prologue=np.int64(prologue),
                               round=np.int64(ROUNDING[jnp.dtype(rounding)]), eps=np.float32(eps),
                               more=",".join(f"{v.fmt}:{_tiling_code(None, v.shape[0])}" for v in more))
    return tuple(y[None] for y in (out, *outs)) if more else out[None]
