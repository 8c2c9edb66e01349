"""Float arithmetic that reproduces llama.cpp's C code bit for bit under XLA.

ggml-quants.c is compiled without FMA (ggml-base has no -march flags) and sums left to right.
XLA's CPU backend contracts ``a*b + c`` into an FMA and reductions run as trees, so the
quantizers use these helpers wherever the rounding of an intermediate decides a result.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

F32 = jnp.float32


# x86's default NaN (sign set), what C's invalid operations (inf - inf, 0/0) produce there.
X86_NAN = np.uint32(0xFFC00000).view(np.float32)


def rnd(p: jax.Array) -> jax.Array:
    """Pin ``p`` as a rounded f32 value: a select the compiler cannot fold into an FMA."""
    return jnp.where(p == p, p, X86_NAN)


def mul(a, b) -> jax.Array:
    """``a*b`` rounded to f32, never fused with a following add (C's ``a*b`` without FMA)."""
    return rnd(jnp.multiply(a, b))


def nearest_int(x: jax.Array) -> jax.Array:
    """ggml's ``nearest_int``: the 1.5*2^23 trick, i.e. round half to even (|x| < 2^22)."""
    return jnp.round(x).astype(jnp.int32)


def roundf(x: jax.Array) -> jax.Array:
    """C ``roundf``: round half away from zero (returns f32)."""
    t = jnp.trunc(x)
    return jnp.where(jnp.abs(x - t) >= 0.5, t + jnp.sign(x), t)


def to_f16(x: jax.Array) -> jax.Array:
    """``GGML_FP32_TO_FP16``: round to nearest even."""
    return x.astype(jnp.float16)


def f16_round(x: jax.Array) -> jax.Array:
    """``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(x))``."""
    return x.astype(jnp.float16).astype(F32)


def seqsum(x: jax.Array, axis: int = -1) -> jax.Array:
    """``float s = 0; for (i...) s += x[i];`` along ``axis``: strictly left to right."""
    x = jnp.moveaxis(x, axis, 0)
    if x.shape[0] <= 64:  # unrolled; products among the terms must come from mul()
        s = jnp.zeros(x.shape[1:], x.dtype)
        for i in range(x.shape[0]):
            s = s + x[i]
        return s
    return lax.scan(lambda s, v: (s + v, None), jnp.zeros(x.shape[1:], x.dtype), x)[0]


def first_argmax_abs(x: jax.Array, axis: int = -1) -> tuple[jax.Array, jax.Array]:
    """``if (amax < fabsf(v)) {amax = fabsf(v); max = v;}``: (amax, signed value at first max).
    A NaN never compares greater, so NaNs are skipped (the K-quants' scales are NaN where squares
    overflow) and an all-NaN row gives (0, +0.0f) as in C."""
    ax = jnp.abs(x)
    amax = jnp.max(jnp.where(ax == ax, ax, F32(0)), axis=axis)
    a = jnp.expand_dims(amax, axis)
    idx = lax.broadcasted_iota(jnp.int32, x.shape, axis % x.ndim)
    n = x.shape[axis]
    # which of +-amax comes first: two index minima, several times faster than argmax + gather on
    # CPU; for an all-zero block both are 0 and max stays +0.0f, as in C
    neg = jnp.min(jnp.where(x == -a, idx, n), axis) < jnp.min(jnp.where(x == a, idx, n), axis)
    return amax, jnp.where(neg, -amax, amax)


def div(a, b) -> jax.Array:
    """C's ``a / b`` as a true IEEE division. XLA rewrites a division by a constant or a broadcast
    scalar into a multiplication by its rounded reciprocal; a divisor that depends on ``a`` (the
    NaN numerator itself where ``a`` is NaN, which C's quotient would be anyway) cannot be. The
    quotient is pinned too: XLA also merges chained divisions (``1/(c/s)`` -> ``s/c``, ``(a/b)/c``
    -> ``a/(b*c)``). In float32, or float64 where an operand is (calibration's float64 tests)."""
    dt = jnp.float64 if jnp.float64 in (getattr(a, "dtype", None), getattr(b, "dtype", None)) else F32
    a, b = jnp.broadcast_arrays(jnp.asarray(a, dt), jnp.asarray(b, dt))
    return rnd(a / jnp.where(a != a, a, b))
