"""llama.cpp ternary formats: TQ1_0 and TQ2_0 (256-element blocks, values d * {-1, 0, 1}).

``d`` is the block's absmax and each weight becomes the trit ``lroundf(x * (1/d)) + 1``. TQ1_0 packs
five trits per byte as a fixed-point base-3 fraction (240 weights) plus four per byte for the
last 16; TQ2_0 stores two bits per trit. llama.cpp's quantize_tq{1,2}_0 ignore importance weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxquant.formats.ggml_legacy import inv_or_zero
from jaxquant.formats.numerics import F32, mul, roundf, to_f16
from jaxquant.formats.registry import Field, Format, register

QK_K = 256
_POW3 = jnp.array([81, 27, 9, 3, 1], jnp.int32)  # first trit is the most significant


def _times_inverse(x: jax.Array, d: jax.Array) -> jax.Array:
    """C's ``x * (d ? 1.0f/d : 0.0f)`` for d >= 0, also where 1/d is subnormal (d >= 2^126).

    XLA flushes subnormals to zero, so there ``id = n * 2^-149`` is found in integers
    (``n = RNE(2^(299-e) / m)`` for d = m * 2^(e-150)) and used scaled up by 2^64.
    """
    bits = lax.bitcast_convert_type(d, jnp.int32)
    e, m = bits >> 23, (bits & 0x7FFFFF) | 0x800000
    num = jnp.where(e == 253, F32(2.0**46), F32(2.0**45))  # 2^(299-e) for the two subnormal binades
    n = (num / m.astype(F32)).astype(jnp.int32)  # within 1 of the quotient's floor
    rem = -(n * m)  # 2^(299-e) - n*m: 2^45 and 2^46 vanish mod 2^32 and |rem| < 2^31
    n, rem = jnp.where(rem < 0, n - 1, n), jnp.where(rem < 0, rem + m, rem)
    n, rem = jnp.where(rem >= m, n + 1, n), jnp.where(rem >= m, rem - m, rem)
    n = n + ((2 * rem > m) | ((2 * rem == m) & (n % 2 == 1)))
    tiny = mul(mul(x, (n.astype(F32) * F32(2.0**-85))[..., None]), F32(2.0**-64))
    return jnp.where((e >= 253)[..., None], tiny, mul(x, inv_or_zero(d)[..., None]))


def _trits(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(d, trits 0..2 as int32 [R, K/256, 256]) as quantize_row_tq{1,2}_0_ref computes them."""
    xb = x.reshape(x.shape[0], -1, QK_K)
    d = jnp.max(jnp.abs(xb), axis=-1)
    return d, roundf(_times_inverse(xb, d)).astype(jnp.int32) + 1


def _base3(t: jax.Array, n: int, width: int, pad: int = 1) -> jax.Array:
    """``n`` groups of ``width`` trits -> ``width`` bytes, trit i of a byte from group i, as
    ``ceil(256 * q * pad / 243)`` (``pad = 3`` shifts 4 trits up to 5 digits)."""
    q = jnp.sum(t.reshape(*t.shape[:-1], n, width) * _POW3[5 - n:, None], axis=-2) * pad
    return ((q * 256 + 242) // 243).astype(jnp.uint8)


def _tq1_0_quantize(x: jax.Array, qw: jax.Array | None) -> dict[str, jax.Array]:
    del qw  # quantize_tq1_0 ignores importance weights
    d, t = _trits(x)
    qs = jnp.concatenate([_base3(t[..., :160], 5, 32), _base3(t[..., 160:240], 5, 16)], axis=-1)
    return {"qs": qs, "qh": _base3(t[..., 240:], 4, 4, pad=3), "d": to_f16(d)}


def _unbase3(q: jax.Array, n: int) -> jax.Array:
    """Bytes [..., w] -> trits [..., n*w]: digit i = (uint8)(q * 3^i) * 3 >> 8."""
    shifted = (q[..., None, :].astype(jnp.int32) * _POW3[::-1][:n, None]) & 0xFF
    return ((shifted * 3) >> 8).reshape(*q.shape[:-1], -1)


def _ternary(trits: jax.Array, d: jax.Array) -> jax.Array:
    """(float)(t - 1) * d, rows flattened."""
    y = (trits - 1).astype(F32) * d.astype(F32)[..., None]
    return y.reshape(*y.shape[:-2], -1)


def _tq1_0_dequantize(a: dict[str, jax.Array]) -> jax.Array:
    qs, qh = a["qs"], a["qh"]
    trits = jnp.concatenate([_unbase3(qs[..., :32], 5), _unbase3(qs[..., 32:], 5), _unbase3(qh, 4)], axis=-1)
    return _ternary(trits, a["d"])


def _tq2_0_quantize(x: jax.Array, qw: jax.Array | None) -> dict[str, jax.Array]:
    del qw  # quantize_tq2_0 ignores importance weights
    d, t = _trits(x)
    # qs[32*j + m] holds trit n of weight 128*j + 32*n + m in bits 2n..2n+1
    t = t.reshape(*t.shape[:-1], 2, 4, 32) << (2 * jnp.arange(4, dtype=jnp.int32))[:, None]
    return {"qs": jnp.sum(t, axis=-2).astype(jnp.uint8).reshape(*d.shape, 64), "d": to_f16(d)}


def _tq2_0_dequantize(a: dict[str, jax.Array]) -> jax.Array:
    qs = a["qs"].astype(jnp.int32).reshape(*a["qs"].shape[:-1], 2, 1, 32)
    trits = (qs >> (2 * jnp.arange(4, dtype=jnp.int32))[:, None]) & 3
    return _ternary(trits.reshape(*qs.shape[:-3], QK_K), a["d"])


TQ1_0 = register(Format("TQ1_0", QK_K, (Field("qs", "uint8", 48), Field("qh", "uint8", 4), Field("d", "float16")),
                        _tq1_0_dequantize, _tq1_0_quantize, "ggml_ternary"))
TQ2_0 = register(Format("TQ2_0", QK_K, (Field("qs", "uint8", 64), Field("d", "float16")),
                        _tq2_0_dequantize, _tq2_0_quantize, "ggml_ternary"))
