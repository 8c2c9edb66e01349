"""Products of Q4_K and Q6_K weights with 2 to 8 activation rows (batched decoding) as CUDA
kernels on the tensor cores (``batch_cuda.cu``, built into ``cuda_lib``'s library), called
through the XLA FFI: bf16 MMA with float32 sums, the weights' codes exact in bf16 and every scale
and min applied to a scale group's sums, so that a bf16 x gives dequantize + dot up to the order of
float32 sums. The call prepares the activations in a kernel of its own (computing an
``ops.Activation`` input there: the model's RMS norm or gated unit, as the gemv's call does) and
launches the product to start reading its weights meanwhile; the product adds a residual as it
writes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.errors import JaxquantError
from jaxquant.ops import Activation
from jaxquant.qtensor import QTensor
from pallas_kernels import cuda_lib, gemv_cuda

FORMATS = {"Q4_K": "jq_batch_q4_k", "Q6_K": "jq_batch_q6_k"}
# qdot takes them for the matrices of an 8B model with N x K >= MIN_WEIGHTS, where at M = 8 on the
# H200 they tied or beat qmm (us): the FFN's (session 11) Q4_K 4096x14336 33.2 against 32.8,
# 14336x4096 30.6 against 33.6, Q6_K 41.5 against 43.1, 46.7 against 46.7; the attention's (session
# 12, 4 warps) Q4_K 4096x4096 11.2 against 13.4, 4096x5120 12.9 against 15.0, Q6_K 16.6 against
# 17.0, 18.7 against 18.6. Not at 4096x1024 (8.9 / 9.1 against 5.5 / 6.2: 64 blocks of 16 rows),
# nor above 8 rows (no kernel).
SELECTED = frozenset(FORMATS)
MIN_WEIGHTS = 1 << 24
WARPS = (1, 2, 4, 8)  # warps of a block splitting K, one block a 16-row group
MAX_M = 8


@functools.cache
def available() -> bool:
    """Whether the kernels are built and registered (first call on a GPU compiles them)."""
    if not gemv_cuda.available():  # JAXQUANT_CUDA_GEMV=0 switches off both
        return False
    lib = cuda_lib.load()
    for name in FORMATS.values():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="CUDA")
    return True


def supports(fmt: str, m: int, n: int, k: int) -> bool:
    return (fmt in SELECTED and 2 <= m <= MAX_M and n * k >= MIN_WEIGHTS and k % 256 == 0 and n % 16 == 0
            and available())


def default_warps(n: int, k: int) -> int:
    """Warps splitting K so that the grid holds about 2048 warps (16 an SM), each warp at least 4
    super-blocks (at K = 4096, 4 warps beat 8: 12.9 against 14.1 us at 4096x5120)."""
    most = max(s for s in WARPS if s == 1 or 1024 * s <= k)
    return min(next((s for s in WARPS if n // 16 * s >= 2048), WARPS[-1]), most)


def split_bf16(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """bf16 ``hi``, ``lo`` with ``hi + lo`` = x to 2^-16 relative: hi x's upper 16 bits, lo the
    rest rounded. Bit operations, not ``x.astype(bf16).astype(f32)``, whose round trip XLA may drop
    (excess precision allowed), making lo 0."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    hi = jax.lax.bitcast_convert_type((bits >> 16).astype(jnp.uint16), jnp.bfloat16)
    rest = x.astype(jnp.float32) - jax.lax.bitcast_convert_type(bits & np.uint32(0xFFFF0000), jnp.float32)
    return hi, rest.astype(jnp.bfloat16)


@functools.partial(jax.jit, static_argnames=("warps", "interpret"))
def batch(x: jax.Array | Activation, w: QTensor | tuple[QTensor, ...], residual: jax.Array | None = None,
          warps: int | None = None, interpret: bool = False) -> jax.Array | tuple[jax.Array, ...]:
    """``x [M, K] @ dequantize(w).T`` (+ ``residual [M, N]`` float32) -> ``[M, N]`` float32 for a
    Q4_K or Q6_K ``w`` and 1 <= M <= 8. A bf16 x enters the kernels as it is; another dtype as two
    products (``split_bf16``), a rare path (on GPU activations are bf16 by default). ``x`` may be an
    ``ops.Activation`` with dtype bf16 (the model's norm, gated unit), which the call computes in its
    prepare kernel; ``w`` a tuple of weights (their products, no residual)."""
    if interpret:
        raise JaxquantError("batch_cuda has no interpreter; use the Triton kernels")
    if isinstance(w, tuple):
        if residual is not None:
            raise JaxquantError("batch_cuda: a residual is added to one weight's product, not to several")
        return tuple(batch(x, v, warps=warps) for v in w)
    if isinstance(x, Activation) and jnp.dtype(x.dtype) != jnp.bfloat16:  # its value is not exact in bf16
        x = x.value()
    m = x.x.shape[0] if isinstance(x, Activation) else x.shape[0]
    k, n = w.shape[1], w.shape[0]
    if w.fmt not in FORMATS or not 1 <= m <= MAX_M:
        raise JaxquantError(f"batch_cuda: {w.fmt} with {m} activation rows ({', '.join(FORMATS)}; 1 to {MAX_M} rows)")
    warps = warps or default_warps(n, k)
    if warps not in WARPS:
        raise JaxquantError(f"batch_cuda: warps must be one of {WARPS}, not {warps}")
    if not isinstance(x, Activation) and x.dtype != jnp.bfloat16:
        hi, lo = split_bf16(x)
        return batch(hi, w, residual, warps) + batch(lo, w, warps=warps)
    if not isinstance(x, Activation):
        prologue, eps, operands = gemv_cuda.PROLOGUES[None], 0.0, [x]
    elif x.kind == "rms_norm":
        prologue, eps = gemv_cuda.PROLOGUES["rms_norm"], x.eps
        operands = [x.x.astype(jnp.float32), x.weight.astype(jnp.float32)]
    else:  # the gated unit in x's dtype (f32 or bf16), rounded to bf16
        prologue, eps, operands = gemv_cuda.PROLOGUES[x.kind], 0.0, [x.x if x.x.dtype == jnp.bfloat16
                                                                     else x.x.astype(jnp.float32)]
    if residual is not None:
        operands.append(residual.astype(jnp.float32))
    results = (jax.ShapeDtypeStruct((m * n,), jnp.float32), jax.ShapeDtypeStruct((8, k), jnp.bfloat16),
               jax.ShapeDtypeStruct((k // 16, 8), jnp.float32))
    out, _, _ = jax.ffi.ffi_call(FORMATS[w.fmt], results)(
        *(w.arrays[a] for a in sorted(w.arrays)), *operands, warps=np.int64(warps), prologue=np.int64(prologue),
        round=np.int64(gemv_cuda.ROUNDING[jnp.dtype(jnp.bfloat16)]), eps=np.float32(eps))
    return out.reshape(m, n)
