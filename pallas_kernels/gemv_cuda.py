"""Matrix-vector products (M = 1) of llama.cpp's 4- to 8-bit block formats, and of Q4_K / Q6_K for
up to 8 activation rows (``batch``), as CUDA kernels called through the XLA FFI.

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
from pallas_kernels.gemv import quantize_activations

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
    for name in (*FORMATS.values(), *BATCH_FORMATS.values()):
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
    else:  # the gated unit of [gate | up], in x's dtype as jnp computes it
        prologue, eps, operands, rounding = PROLOGUES[x.kind], 0.0, [x.x[0]], x.x.dtype
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


# Batch decoding (2 to 8 activation rows) of Q4_K and Q6_K on the tensor cores (IMMA, exact integer sums),
# checked on the CPU by tests/test_gemv_cuda.py through its lanes' emulation and on the H200 (60/60).
# qdot selects it for Q4_K's large matrices only: at M = 8 on the H200 it beat qmm at K = 14336,
# N = 4096 (27.0 against 34.0 us) and 4096x14336 (29.0 against 33.1), not at 4096x1024 (6.8 against
# 5.5); Q6_K's lost or tied (43.8 / 46.5 against 43.2 / 47.3) (benchmarks/RESULTS.md, session 10).
BATCH_FORMATS = {"Q4_K": "jq_batch_q4_k", "Q6_K": "jq_batch_q6_k"}
BATCH_SELECTED: frozenset[str] = frozenset({"Q4_K"})
BATCH_MIN_WEIGHTS = 1 << 25  # N x K: the FFN's matrices of an 8B model, not its attention's
BATCH_WARPS = (1, 2, 4, 8)  # warps of a block splitting K, one block a 16-row group


def batch_supports(fmt: str, m: int, n: int, k: int) -> bool:
    return (fmt in BATCH_SELECTED and 2 <= m <= 8 and n * k >= BATCH_MIN_WEIGHTS and k % 256 == 0 and n % 16 == 0
            and available())


def batch_warps(n: int) -> int:
    """Warps splitting K so that the grid holds about 2048 warps (16 an SM)."""
    return next((s for s in BATCH_WARPS if n // 16 * s >= 2048), BATCH_WARPS[-1])


def batch_activations(x: jax.Array, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """``x [M <= 8, K]`` -> the batch kernel's activations, quantized by ``quantize_activations``
    (rows padded to 8 with zeros): per row and block of 32, its int16 values as 4 x 16 bytes (lane
    t: the high bytes of elements 8t .. 8t + 7, then their low bytes) ``[8, K / 32, 64]`` uint8; and
    float32 ``[K / 32, 8, 4]``: each block's scale, and the scale times the sum of its values, of
    its first and of its second 16."""
    m, k = x.shape
    words, dx, sums = quantize_activations(jnp.zeros((8, k), x.dtype).at[:m].set(x).reshape(-1), interpret)

    def int16(v: jax.Array) -> jax.Array:
        return jax.lax.bitcast_convert_type((v & 0xFFFF).astype(jnp.uint16), jnp.int16).astype(jnp.int32)

    pairs, more = words[:, :8], words[:, 8:]  # elements 4i, 4i + 1 and 4i + 2, 4i + 3
    q = jnp.stack([int16(pairs), int16(pairs >> 16), int16(more), int16(more >> 16)], -1).reshape(8, k // 32, 4, 8)
    hi = jax.lax.bitcast_convert_type((q >> 8).astype(jnp.int8), jnp.uint8)
    xb = jnp.concatenate([hi, (q & 0xFF).astype(jnp.uint8)], -1).reshape(8, k // 32, 64)
    xs = dx * jnp.concatenate([jnp.ones_like(dx), sums[:, 2:3], sums[:, :2]], -1).astype(jnp.float32)
    return xb, jnp.transpose(xs.reshape(8, k // 32, 4), (1, 0, 2))


@functools.partial(jax.jit, static_argnames=("warps", "interpret"))
def batch(x: jax.Array, w: QTensor, warps: int | None = None, interpret: bool = False) -> jax.Array:
    """``x [M, K] @ dequantize(w).T`` -> ``[M, N]`` float32 for a Q4_K or Q6_K ``w`` and 1 <= M <= 8."""
    if interpret:
        raise JaxquantError("gemv_cuda has no interpreter; use the Triton kernels")
    m, n = x.shape[0], w.shape[0]
    if not 1 <= m <= 8 or w.fmt not in BATCH_FORMATS:
        raise JaxquantError(f"gemv_cuda.batch: {w.fmt} with {m} activation rows "
                            f"({', '.join(BATCH_FORMATS)}; 1 to 8 rows)")
    warps = warps or batch_warps(n)
    if warps not in BATCH_WARPS:
        raise JaxquantError(f"gemv_cuda.batch: warps must be one of {BATCH_WARPS}, not {warps}")
    xb, xs = batch_activations(x)
    call = jax.ffi.ffi_call(BATCH_FORMATS[w.fmt], jax.ShapeDtypeStruct((m * n,), jnp.float32))
    return call(*(w.arrays[k] for k in sorted(w.arrays)), xb, xs, warps=np.int64(warps)).reshape(m, n)
