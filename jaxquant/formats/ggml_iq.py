"""llama.cpp non-linear 4-bit formats: IQ4_NL (blocks of 32) and IQ4_XS (super-blocks of 256).

Both store indices into the 16-value table ``kvalues_iq4nl``. The quantizer is
``quantize_row_iq4_nl_impl`` of ggml-quants.c as ``quantize_iq4_nl`` / ``quantize_iq4_xs`` call it
(``ntry = 7``), which is what ggml_quantize_chunk and llama-quantize use with and without an
imatrix. (``quantize_row_iq4_nl_ref`` passes ``ntry = -1`` instead; nothing that writes model
files calls it.)

Bytes equal llama.cpp's except where the C's arithmetic goes subnormal, which XLA's CPU flushes
to zero: blocks of |x| ~ 1e-8 without an imatrix. Their f16 scale underflows to 0 in both, so
such blocks dequantize to the same zeros; only their (meaningless) index bits may differ.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant.formats.numerics import F32, first_argmax_abs, mul, nearest_int, seqsum, to_f16
from jaxquant.formats.registry import Field, Format, register

QK = 32  # elements per (sub-)block
QK_K = 256  # elements per IQ4_XS super-block
NTRY = 7  # the scale search tries (itry - 127) / max for itry in [-NTRY, NTRY]
GROUP_MAX_EPS = 1e-15

KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)
# best_index_int8 returns the nearer neighbour, ties going up: 15 minus the number of midpoints > x
# (so NaN gives 15, as in the C). ``x - val[mu-1] < val[mu] - x`` is exact near a midpoint
# (small-integer table), so the two agree.
_MIDS = (KVALUES[:-1].astype(np.float32) + KVALUES[1:]) / 2
_STEPS = np.diff(KVALUES.astype(np.float32))


def best_index(x: jax.Array) -> jax.Array:
    """``best_index_int8(16, kvalues_iq4nl, x)`` elementwise (int32 in [0, 16))."""
    return len(_MIDS) - sum((x < F32(m)).astype(jnp.int32) for m in _MIDS)


def _best_value(x: jax.Array) -> jax.Array:
    """``(float)kvalues_iq4nl[best_index_int8(16, kvalues_iq4nl, x)]``, without a gather."""
    return F32(KVALUES[-1]) - sum(jnp.where(x < F32(m), F32(s), F32(0)) for m, s in zip(_MIDS, _STEPS))


def _block_scales(x: jax.Array, weight: jax.Array) -> jax.Array:
    """The per-block scale search of ``quantize_row_iq4_nl_impl`` (ntry = 7).

    ``x``, ``weight``: [32, ...] with the block's elements on axis 0 (contiguous slices for the
    sequential sums). Returns the scale ``d`` of each block, 0 where ``amax < GROUP_MAX_EPS``.
    """
    amax, mx = first_argmax_abs(x, axis=0)
    zero = amax < F32(GROUP_MAX_EPS)
    mx = jnp.where(zero, F32(1), mx)

    def sums(iscale):
        q = _best_value(mul(iscale, x))
        wq = mul(weight, q)
        return seqsum(mul(wq, x), axis=0), seqsum(mul(wq, q), axis=0)

    sumqx, sumq2 = sums(1 / (-mx / F32(KVALUES[0])))
    d = jnp.where(sumq2 > 0, sumqx / jnp.where(sumq2 > 0, sumq2, 1), F32(0))
    best = mul(d, sumqx)

    def step(itry, carry):  # a loop, not unrolled: keeps the compiled graph small
        d, best = carry
        sumqx, sumq2 = sums((itry + int(KVALUES[0])).astype(F32) / mx)
        take = (sumq2 > 0) & (mul(sumqx, sumqx) > mul(best, sumq2))
        d = jnp.where(take, sumqx / jnp.where(take, sumq2, 1), d)
        return d, jnp.where(take, mul(d, sumqx), best)

    d, _ = lax.fori_loop(-NTRY, NTRY + 1, step, (d, best))
    return jnp.where(zero, F32(0), d)


def _inverse(d: jax.Array) -> jax.Array:
    """``d ? 1/d : 0``."""
    return jnp.where(d != 0, 1 / jnp.where(d != 0, d, 1), F32(0))


def _pack_nibbles(idx: jax.Array) -> jax.Array:
    """Indices [32, sub, R, n] -> q4 bytes [R, n, sub*16]: element j low, j + 16 high nibble."""
    return _rows(jnp.swapaxes(idx[:16] | (idx[16:] << 4), 0, 1).astype(jnp.uint8))


def _superblocks(x: jax.Array, qw: jax.Array | None, size: int) -> tuple[jax.Array, jax.Array]:
    """x [R, K] -> (x, weight) as [32, size/32, R, K/size]: element, sub-block, row, super-block.

    ``weight`` is ``qw[j] * sqrtf(sigma2 + x[j]^2)`` with ``sigma2 = 2/size * sum(x^2)`` over the
    super-block, or ``x[j]^2`` without importance weights.
    """
    r, k = x.shape
    xs = x.reshape(r, k // size, size).transpose(2, 0, 1)  # [size, R, n]
    x2 = mul(xs, xs)
    if qw is None:
        weight = x2
    else:
        sigma2 = mul(seqsum(x2, axis=0), F32(2 / size))
        weight = mul(qw.reshape(k // size, size).T[:, None, :], jnp.sqrt(sigma2 + x2))

    def split(a: jax.Array) -> jax.Array:
        return a.reshape(size // QK, QK, r, k // size).transpose(1, 0, 2, 3)

    return split(xs), split(weight)


def _rows(a: jax.Array) -> jax.Array:
    """[count, (sub,) R, n] -> [R, n, count] (the registry's field layout)."""
    return a.reshape(-1, *a.shape[-2:]).transpose(1, 2, 0)


def _iq4_nl_quantize(x: jax.Array, qw: jax.Array | None) -> dict[str, jax.Array]:
    xb, weight = _superblocks(x, qw, QK)  # [32, 1, R, nb]
    d = _block_scales(xb, weight)
    idx = best_index(mul(_inverse(d), xb))
    return {"d": to_f16(d[0]), "qs": _pack_nibbles(idx)}


def _iq4_xs_quantize(x: jax.Array, qw: jax.Array | None) -> dict[str, jax.Array]:
    xb, weight = _superblocks(x, qw, QK_K)  # [32, 8, R, nb]
    scales = _block_scales(xb, weight)  # [8, R, nb]
    # ``if (fabsf(d) > amax_scale)`` never takes a NaN scale (overflowed sums)
    _, max_scale = first_argmax_abs(jnp.where(jnp.isnan(scales), F32(0), scales), axis=0)
    d = -max_scale / F32(32)  # an all-zero super-block stores -0.0, as the C does
    s = mul(_inverse(d), scales)
    ls = jnp.clip(jnp.where(jnp.isnan(s), 0, nearest_int(s)), -32, 31)  # ggml's nearest_int(NaN) is 0
    idx = best_index(mul(_inverse(mul(d, ls.astype(F32))), xb))
    ls = (ls + 32).astype(jnp.uint16)
    scales_h = sum((ls[ib] >> 4) << (2 * ib) for ib in range(QK_K // QK)).astype(jnp.uint16)
    scales_l = (ls[0::2] & 0xF) | ((ls[1::2] & 0xF) << 4)
    return {"d": to_f16(d), "scales_h": scales_h, "scales_l": _rows(scales_l.astype(jnp.uint8)),
            "qs": _pack_nibbles(idx)}


def _kvalues(qs: jax.Array) -> jax.Array:
    """q4 bytes [..., 16] -> table values f32 [..., 32] (low nibbles first)."""
    q = jnp.concatenate([qs & 0xF, qs >> 4], axis=-1)
    return jnp.asarray(KVALUES.astype(np.float32))[q]


def _iq4_nl_dequantize(a: dict[str, jax.Array]) -> jax.Array:
    qs = a["qs"]
    return mul(a["d"].astype(F32)[..., None], _kvalues(qs)).reshape(*qs.shape[:-2], -1)


def _iq4_xs_dequantize(a: dict[str, jax.Array]) -> jax.Array:
    qs = a["qs"].reshape(*a["qs"].shape[:-1], QK_K // QK, 16)  # [..., nb, 8, 16]
    ib = np.arange(QK_K // QK)
    lo = (a["scales_l"][..., ib // 2] >> (4 * (ib % 2))) & 0xF
    hi = (a["scales_h"][..., None] >> (2 * ib)) & 3
    ls = (lo.astype(jnp.int32) | (hi.astype(jnp.int32) << 4)) - 32
    dl = mul(a["d"].astype(F32)[..., None], ls.astype(F32))
    return mul(dl[..., None], _kvalues(qs)).reshape(*qs.shape[:-3], -1)


IQ4_NL = register(Format("IQ4_NL", QK, (Field("d", "float16"), Field("qs", "uint8", QK // 2)),
                         _iq4_nl_dequantize, _iq4_nl_quantize, "ggml_iq"))
IQ4_XS = register(Format("IQ4_XS", QK_K, (Field("d", "float16"), Field("scales_h", "uint16"),
                                          Field("scales_l", "uint8", QK_K // 64), Field("qs", "uint8", QK_K // 2)),
                         _iq4_xs_dequantize, _iq4_xs_quantize, "ggml_iq"))
