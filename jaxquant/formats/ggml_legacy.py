"""llama.cpp's legacy 32-element block formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Without importance weights the quantizers are ``quantize_row_*_ref``; with them, the
``quantize_row_*_impl`` variants of ggml-quants.c (a weighted scale search per block:
``make_qx_quants`` for the symmetric types, ``make_qkx3_quants`` for the ones with a min).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant.formats.ggml_k import make_qkx_quants
from jaxquant.formats.numerics import F32, div, first_argmax_abs, mul, nearest_int, roundf, seqsum, to_f16
from jaxquant.formats.registry import Field, Format, register

QK = 32


def _blocks(x: jax.Array) -> jax.Array:
    """[R, K] -> [R, K/32, 32]."""
    return x.reshape(x.shape[0], -1, QK)


def inv_or_zero(d: jax.Array) -> jax.Array:
    """C's ``d ? 1.0f/d : 0.0f``."""
    nz = d != 0
    return jnp.where(nz, 1 / jnp.where(nz, d, F32(1)), F32(0))


def _row_weights(x: jax.Array, qw: jax.Array) -> jax.Array:
    """``weight[j] = qw[j] * sqrtf(sigma2 + x[j]*x[j])`` with sigma2 the row's mean square."""
    sigma2 = div(seqsum(mul(x, x), axis=-1), F32(x.shape[-1]))
    return _blocks(mul(qw, jnp.sqrt(sigma2[:, None] + mul(x, x))))


def _first_extreme(x: jax.Array, reduce) -> jax.Array:
    """``jnp.min``/``jnp.max`` over the last axis keeping C's first of equal values: for a zero
    result, -0.0 if a -0.0 comes before the first +0.0."""
    v = reduce(x, axis=-1)
    bits = lax.bitcast_convert_type(x, jnp.int32)
    idx = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    neg = jnp.min(jnp.where(bits == np.int32(-2**31), idx, QK), -1) < jnp.min(jnp.where(bits == 0, idx, QK), -1)
    return jnp.where(v == 0, jnp.where(neg, F32(-0.0), F32(0)), v)


def make_qx_quants(x: jax.Array, nmax: int, rmse_type: int, qw: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """ggml's ``make_qx_quants`` over the last axis: (scale, L in [0, 2*nmax)).

    The 18 trial scales run in a ``lax.fori_loop`` that keeps the winning ``iscale``; L is then
    rebuilt from it once, as the C does when a trial wins (unrolled, XLA recomputes the chain).
    """
    amax, mx = first_argmax_abs(x)
    zero = amax < F32(1e-15)  # GROUP_MAX_EPS
    safe = jnp.where(zero, F32(1), mx)[..., None]

    def quants(iscale):
        return jnp.clip(nearest_int(mul(iscale, x)), -nmax, nmax - 1)

    iscale = F32(-nmax) / safe
    if rmse_type == 0:
        return jnp.where(zero, F32(0), 1 / iscale[..., 0]), jnp.where(zero[..., None], 0, quants(iscale) + nmax)
    if qw is None:
        qw = {1: mul(x, x), 2: jnp.ones_like(x), 3: jnp.abs(x)}.get(rmse_type, jnp.sqrt(jnp.abs(x)))
    wx = mul(qw, x)

    def sums(iscale):
        lf = quants(iscale).astype(F32)
        # the barrier keeps XLA from recomputing the 32-term sums inside each consumer's fusion
        return lax.optimization_barrier((seqsum(mul(wx, lf)), seqsum(mul(mul(qw, lf), lf))))

    sumlx, suml2 = sums(iscale)
    scale = jnp.where(suml2 != 0, sumlx / jnp.where(suml2 != 0, suml2, 1), F32(0))

    def trial(k, state):
        scale, best, best_iscale = state
        step = (k - 9 + (k >= 9)).astype(F32)  # is = -9..-1, 1..9
        iscale = -(F32(nmax) + mul(F32(0.1), step)) / safe
        sumlx, suml2 = sums(iscale)
        take = (suml2 > 0) & (mul(sumlx, sumlx) > mul(best, suml2))
        scale2 = sumlx / jnp.where(take, suml2, 1)
        return (jnp.where(take, scale2, scale), jnp.where(take, mul(scale2, sumlx), best),
                jnp.where(take[..., None], iscale, best_iscale))

    scale, _, iscale = lax.fori_loop(0, 18, trial, (scale, mul(scale, sumlx), iscale))
    return jnp.where(zero, F32(0), scale), jnp.where(zero[..., None], 0, quants(iscale) + nmax)


def _symmetric(x: jax.Array, nmax: int, qw: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Q4_0 / Q5_0: (d, q in [0, 2*nmax)) with ``x ~ d*(q - nmax)``."""
    xb = _blocks(x)
    if qw is not None:  # quantize_row_q{4,5}_0_impl
        return make_qx_quants(xb, nmax, 1, _row_weights(x, qw))
    _, mx = first_argmax_abs(xb)  # quantize_row_q{4,5}_0_ref: d from the signed absmax
    d = div(mx, F32(-nmax))
    q = jnp.trunc(mul(xb, inv_or_zero(d)[..., None]) + F32(nmax + 0.5)).astype(jnp.int32)
    return d, jnp.minimum(2 * nmax - 1, q)


def _affine(x: jax.Array, nmax: int, qw: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Q4_1 / Q5_1: (d, m, q in [0, nmax]) with ``x ~ d*q + m``."""
    xb = _blocks(x)
    if qw is not None:  # quantize_row_q{4,5}_1_impl
        d, the_min, q = make_qkx_quants(xb, _row_weights(x, qw), nmax, -0.9, 0.05, 36)
        return d, -the_min, q
    mn, mx = _first_extreme(xb, jnp.min), _first_extreme(xb, jnp.max)  # quantize_row_q{4,5}_1_ref
    d = div(mx - mn, F32(nmax))
    q = jnp.trunc(mul(xb - mn[..., None], inv_or_zero(d)[..., None]) + F32(0.5)).astype(jnp.int32)
    return d, mn, jnp.minimum(nmax, q)


def pack_nibbles(q: jax.Array) -> jax.Array:
    """32 quants -> 16 bytes: ``qs[j] = q[j] | q[j+16] << 4`` (low nibbles only)."""
    return (q[..., :16].astype(jnp.uint8) & 0xF) | (q[..., 16:].astype(jnp.uint8) << 4)


def _pack_high_bits(q: jax.Array) -> jax.Array:
    """The 5th bits of q as the little-endian uint32 ``qh`` (bit j = q[j] >> 4), in 4 bytes."""
    bits = ((q >> 4) & 1).astype(jnp.uint8).reshape(*q.shape[:-1], 4, 8)
    return jnp.sum(bits << jnp.arange(8, dtype=jnp.uint8), axis=-1, dtype=jnp.uint8)


def unpack_nibbles(qs: jax.Array) -> jax.Array:
    """16 bytes -> 32 quants (int32), the inverse of ``pack_nibbles``. Shifts of int32 broadcast
    over a new axis: XLA's CPU dot fuses them into a vectorized loop (a concatenate, or uint8
    shifts, which AVX2 lacks, made it 5-10x slower)."""
    nibbles = (qs.astype(jnp.int32)[..., None, :] >> jnp.array([[0], [4]], jnp.int32)) & 0xF
    return nibbles.reshape(*qs.shape[:-1], 2 * qs.shape[-1])


def _unpack5(qh: jax.Array, qs: jax.Array) -> jax.Array:
    """Nibbles plus the 5th bits from ``qh`` -> 32 quants in [0, 32)."""
    high = (qh.astype(jnp.int32)[..., :, None] >> jnp.arange(8, dtype=jnp.int32)) & 1
    return unpack_nibbles(qs) | (high.reshape(*qh.shape[:-1], QK) << 4)


def _rows(y: jax.Array) -> jax.Array:
    """[..., nb, 32] -> [..., nb*32]."""
    return y.reshape(*y.shape[:-2], -1)


def _q4_0_quantize(x: jax.Array, qw: jax.Array | None) -> dict[str, jax.Array]:
    d, q = _symmetric(x, 8, qw)
    return {"d": to_f16(d), "qs": pack_nibbles(q)}


def _dequantize(q: jax.Array, a: dict[str, jax.Array]) -> jax.Array:
    """``q*d`` (``+ m`` where the block has one). An f16 d times |q| <= 128 is exact in f32, so an
    FMA rounds alike, and a plain multiply keeps a NaN d's payload as C does (mul() would not)."""
    y = q.astype(F32) * a["d"].astype(F32)[..., None]
    if "m" in a:  # C's x0*d + m returns the product's NaN when both are NaN; XLA may pick m's
        y = jnp.where(y != y, y, y + a["m"].astype(F32)[..., None])
    return _rows(y)


def _q4_0_dequantize(a: dict[str, jax.Array]) -> jax.Array:
    return _dequantize(unpack_nibbles(a["qs"]) - 8, a)


def _q4_1_quantize(x: jax.Array, qw: jax.Array | None) -> dict[str, jax.Array]:
    d, m, q = _affine(x, 15, qw)
    return {"d": to_f16(d), "m": to_f16(m), "qs": pack_nibbles(q)}


def _q4_1_dequantize(a: dict[str, jax.Array]) -> jax.Array:
    return _dequantize(unpack_nibbles(a["qs"]), a)


def _q5_0_quantize(x: jax.Array, qw: jax.Array | None) -> dict[str, jax.Array]:
    d, q = _symmetric(x, 16, qw)
    return {"d": to_f16(d), "qh": _pack_high_bits(q), "qs": pack_nibbles(q)}


def _q5_0_dequantize(a: dict[str, jax.Array]) -> jax.Array:
    return _dequantize(_unpack5(a["qh"], a["qs"]) - 16, a)


def _q5_1_quantize(x: jax.Array, qw: jax.Array | None) -> dict[str, jax.Array]:
    d, m, q = _affine(x, 31, qw)
    return {"d": to_f16(d), "m": to_f16(m), "qh": _pack_high_bits(q), "qs": pack_nibbles(q)}


def _q5_1_dequantize(a: dict[str, jax.Array]) -> jax.Array:
    return _dequantize(_unpack5(a["qh"], a["qs"]), a)


def _q8_0_quantize(x: jax.Array, qw: jax.Array | None) -> dict[str, jax.Array]:
    del qw  # llama.cpp's quantize_q8_0 ignores importance weights
    xb = _blocks(x)
    d = div(jnp.max(jnp.abs(xb), axis=-1), F32(127))
    return {"d": to_f16(d), "qs": roundf(mul(xb, inv_or_zero(d)[..., None])).astype(jnp.int8)}


def _q8_0_dequantize(a: dict[str, jax.Array]) -> jax.Array:
    return _dequantize(a["qs"], a)


def _half(name: str) -> Field:
    return Field(name, "float16")


QH, QS = Field("qh", "uint8", 4), Field("qs", "uint8", 16)
Q4_0 = register(Format("Q4_0", QK, (_half("d"), QS), _q4_0_dequantize, _q4_0_quantize, "ggml_legacy"))
Q4_1 = register(Format("Q4_1", QK, (_half("d"), _half("m"), QS), _q4_1_dequantize, _q4_1_quantize, "ggml_legacy"))
Q5_0 = register(Format("Q5_0", QK, (_half("d"), QH, QS), _q5_0_dequantize, _q5_0_quantize, "ggml_legacy"))
Q5_1 = register(Format("Q5_1", QK, (_half("d"), _half("m"), QH, QS), _q5_1_dequantize, _q5_1_quantize,
                       "ggml_legacy"))
Q8_0 = register(Format("Q8_0", QK, (_half("d"), Field("qs", "int8", 32)), _q8_0_dequantize, _q8_0_quantize,
                       "ggml_legacy"))
