"""llama.cpp's legacy 32-element block formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Without importance weights the quantizers are ``quantize_row_*_ref``; with them, the
``quantize_row_*_impl`` variants of ggml-quants.c (a weighted scale search per block).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxquant.formats.numerics import F32, first_argmax_abs, mul, nearest_int, roundf, seqsum, to_f16
from jaxquant.formats.registry import Field, Format, register

QK = 32


def _blocks(x: jax.Array) -> jax.Array:
    """[R, K] -> [R, K/32, 32]."""
    return x.reshape(x.shape[0], -1, QK)


def _row_weights(x: jax.Array, qw: jax.Array) -> jax.Array:
    """``weight[j] = qw[j] * sqrtf(sigma2 + x[j]*x[j])`` with sigma2 the row's mean square."""
    sigma2 = seqsum(mul(x, x), axis=-1) / F32(x.shape[-1])
    return _blocks(mul(qw, jnp.sqrt(sigma2[:, None] + mul(x, x))))


def make_qx_quants(x: jax.Array, nmax: int, rmse_type: int, qw: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """ggml's ``make_qx_quants`` over the last axis: (scale, L in [0, 2*nmax))."""
    amax, mx = first_argmax_abs(x)
    zero = amax < F32(1e-15)  # GROUP_MAX_EPS
    safe = jnp.where(zero, F32(1), mx)[..., None]

    def weight():
        if qw is not None:
            return qw
        return {1: mul(x, x), 2: jnp.ones_like(x), 3: jnp.abs(x)}.get(rmse_type, jnp.sqrt(jnp.abs(x)))

    def trial(iscale):
        l = jnp.clip(nearest_int(mul(iscale, x)), -nmax, nmax - 1)
        lf = l.astype(F32)
        w = weight()
        sumlx = seqsum(mul(mul(w, x), lf))
        suml2 = seqsum(mul(mul(w, lf), lf))
        return l, sumlx, suml2

    iscale = F32(-nmax) / safe
    if rmse_type == 0:
        l = jnp.clip(nearest_int(mul(iscale, x)), -nmax, nmax - 1)
        return jnp.where(zero, F32(0), 1 / iscale[..., 0]), jnp.where(zero[..., None], 0, l + nmax)
    l, sumlx, suml2 = trial(iscale)
    scale = jnp.where(suml2 != 0, sumlx / jnp.where(suml2 != 0, suml2, 1), F32(0))
    best = mul(scale, sumlx)
    for i in [i for i in range(-9, 10) if i != 0]:
        l2, sumlx2, suml22 = trial(-(F32(nmax) + mul(F32(0.1), F32(i))) / safe)
        take = (suml22 > 0) & (mul(sumlx2, sumlx2) > mul(best, suml22))
        scale2 = sumlx2 / jnp.where(take, suml22, 1)
        l = jnp.where(take[..., None], l2, l)
        scale = jnp.where(take, scale2, scale)
        best = jnp.where(take, mul(scale2, sumlx2), best)
    return jnp.where(zero, F32(0), scale), jnp.where(zero[..., None], 0, l + nmax)


def _nibbles(lo: jax.Array, hi: jax.Array) -> jax.Array:
    return (lo.astype(jnp.uint8) & 0xF) | (hi.astype(jnp.uint8) << 4)


def _q4_0_quantize(x: jax.Array, qw: jax.Array | None) -> dict[str, jax.Array]:
    xb = _blocks(x)
    if qw is None:
        _, mx = first_argmax_abs(xb)
        d = mx / F32(-8)
        idv = jnp.where(d != 0, 1 / jnp.where(d != 0, d, 1), F32(0))
        q = jnp.minimum(15, jnp.trunc(mul(xb, idv[..., None]) + F32(8.5)).astype(jnp.int32))
    else:
        d, q = make_qx_quants(xb, 8, 1, _row_weights(x, qw))
    return {"d": to_f16(d), "qs": _nibbles(q[..., :16], q[..., 16:])}


def _q4_0_dequantize(a: dict[str, jax.Array]) -> jax.Array:
    d = a["d"].astype(F32)[..., None]
    qs = a["qs"]
    q = jnp.concatenate([qs & 0xF, qs >> 4], axis=-1).astype(jnp.int32) - 8
    return mul(d, q.astype(F32)).reshape(*qs.shape[:-2], -1)


def _q8_0_quantize(x: jax.Array, qw: jax.Array | None) -> dict[str, jax.Array]:
    del qw  # llama.cpp's quantize_q8_0 ignores importance weights
    xb = _blocks(x)
    d = jnp.max(jnp.abs(xb), axis=-1) / F32(127)
    idv = jnp.where(d != 0, 1 / jnp.where(d != 0, d, 1), F32(0))
    return {"d": to_f16(d), "qs": roundf(mul(xb, idv[..., None])).astype(jnp.int8)}


def _q8_0_dequantize(a: dict[str, jax.Array]) -> jax.Array:
    qs = a["qs"]
    return mul(qs.astype(F32), a["d"].astype(F32)[..., None]).reshape(*qs.shape[:-2], -1)


Q4_0 = register(Format("Q4_0", QK, (Field("d", "float16"), Field("qs", "uint8", 16)),
                       _q4_0_dequantize, _q4_0_quantize, "ggml_legacy"))
Q8_0 = register(Format("Q8_0", QK, (Field("d", "float16"), Field("qs", "int8", 32)),
                       _q8_0_dequantize, _q8_0_quantize, "ggml_legacy"))
