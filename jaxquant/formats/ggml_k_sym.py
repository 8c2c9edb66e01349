"""llama.cpp symmetric K-quants (scale only, no minimum): Q3_K, Q6_K (256-element super-blocks).

A super-block holds 16 sub-blocks of 16 values, each with its own integer scale times the f16
super-block scale ``d``. Without importance weights the quantizers are ``quantize_row_q3_K_ref``
/ ``quantize_row_q6_K_ref``; with them, ``quantize_row_q3_K_impl`` / ``quantize_row_q6_K_impl``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from jaxquant.formats.ggml_legacy import make_qx_quants
from jaxquant.formats.numerics import F32, div, f16_round, first_argmax_abs, mul, nearest_int, seqsum, to_f16
from jaxquant.formats.registry import Field, Format, register

QK_K = 256
SUB = 16  # values per sub-block; also sub-blocks per super-block
GROUP_MAX_EPS = F32(1e-15)


# Super-blocks per loop step (512 KiB of floats): the scale searches and sweeps then work on
# arrays that stay in cache; over a whole 4M-float chunk at once they run several times slower.
STEP_SUPER_BLOCKS = 512
REFINE_BATCH = 1024  # sub-blocks per step of make_q3_quants' refinement


def _sub_blocks(x: jax.Array) -> jax.Array:
    """[R, K] -> [R, K/256, 16 sub-blocks, 16 values]."""
    return x.reshape(x.shape[0], -1, SUB, SUB)


def _by_super_blocks(fn: Callable[[jax.Array, jax.Array | None], tuple[jax.Array, ...]], x: jax.Array,
                     qw: jax.Array | None) -> tuple[jax.Array, ...]:
    """Run ``fn(x [S, 256], weights [S, 256] | None) -> arrays [S, 1, ...]`` over all super-blocks of
    ``x`` [R, K] in steps of S; returns the arrays shaped (R, K/256, ...)."""
    r, k = x.shape
    nb, n = k // QK_K, r * k // QK_K
    s = min(n, STEP_SUPER_BLOCKS)
    pad = -n % s

    def steps(a):
        return jnp.pad(a.reshape(n, QK_K), ((0, pad), (0, 0))).reshape(-1, s, QK_K)

    w = None if qw is None else steps(jnp.broadcast_to(qw, x.shape))
    out = lax.map(lambda a: fn(*a), (steps(x), w))
    return tuple(v.reshape(-1, *v.shape[3:])[:n].reshape(r, nb, *v.shape[3:]) for v in out)


def _or_shifted(v: jax.Array, bits: int) -> jax.Array:
    """(..., G, N) small ints -> (..., N) uint8 holding ``v[..., g, :] << (bits*g)`` for every g."""
    v = v.astype(jnp.uint8)
    out = v[..., 0, :]
    for g in range(1, v.shape[-2]):
        out = out | (v[..., g, :] << (bits * g))
    return out


def _unpack_bits(v: jax.Array, bits: int, groups: int) -> jax.Array:
    """Inverse of ``_or_shifted``: (..., N) uint8 -> (..., groups, N) int32."""
    shifts = jnp.arange(groups, dtype=jnp.int32)[:, None] * bits  # int32: AVX2 has no uint8 shifts
    return (v.astype(jnp.int32)[..., None, :] >> shifts) & ((1 << bits) - 1)


def _requantize(xs: jax.Array, d: jax.Array, L: jax.Array, nmax: int) -> jax.Array:
    """``d = d_super * sc; if (!d) continue; L = nearest_int(x/d)`` clipped, per sub-block.

    Sub-blocks whose effective scale is zero keep the quants of the first pass, as in the C.
    """
    keep = d == 0
    l = jnp.clip(nearest_int(div(xs, jnp.where(keep, F32(1), d)[..., None])), -nmax, nmax - 1) + nmax
    return jnp.where(keep[..., None], L, l)


def _q3_sweeps(x: jax.Array, w: jax.Array, wx: jax.Array, L: jax.Array, sumlx: jax.Array, suml2: jax.Array,
               nmax: int, sweeps: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``sweeps`` passes of make_q3_quants' greedy loop over the 16 values of rows [B, 16]:
    (L, sumlx, suml2, whether the last pass changed anything). Each step sees the sums left by
    the previous one, so the values are a scan."""

    def step(sums, v):
        sumlx, suml2, changed = sums
        xi, w, wxi, li = v
        slx = sumlx - mul(wxi, li)
        sl2 = suml2 - mul(w * li, li)
        pos = slx > 0
        new_l = jnp.clip(nearest_int(xi * sl2 / jnp.where(pos, slx, F32(1))), -nmax, nmax - 1).astype(F32)
        slx = slx + mul(wxi, new_l)
        sl2 = sl2 + mul(w * new_l, new_l)
        take = pos & (new_l != li) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
        return (jnp.where(take, slx, sumlx), jnp.where(take, sl2, suml2), changed | take), jnp.where(take, new_l, li)

    xt, wt, wxt, L = x.T, w.T, wx.T, L.T
    for _ in range(sweeps):
        (sumlx, suml2, changed), L = lax.scan(step, (sumlx, suml2, jnp.zeros(sumlx.shape, bool)), (xt, wt, wxt, L))
    return L.T, sumlx, suml2, changed


def make_q3_quants(x: jax.Array, nmax: int) -> tuple[jax.Array, jax.Array]:
    """ggml's ``make_q3_quants(..., do_rmse=true)`` over the last axis: (scale, L in [0, 2*nmax)).

    The greedy refinement is sequential within a sub-block (each step sees the sums left by the
    previous), so a sweep is a scan over the 16 values, vectorized over sub-blocks. A sweep that
    changes nothing leaves a sub-block as it was, where the C stops; for random data only ~20%
    of the sub-blocks change in the first sweep (~5%, 1%, 0.1% in the next), so the first sweep
    runs over all and the other four only over those, gathered into batches of REFINE_BATCH.
    """
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    m = x.shape[0]
    amax, mx = first_argmax_abs(x)
    zero = amax < GROUP_MAX_EPS
    iscale = div(F32(-nmax), jnp.where(zero, F32(1), mx))
    w = mul(x, x)
    wx = mul(w, x)
    L = jnp.clip(nearest_int(mul(iscale[:, None], x)), -nmax, nmax - 1).astype(F32)
    L, sumlx, suml2, changed = _q3_sweeps(x, w, wx, L, seqsum(mul(wx, L)), seqsum(mul(w * L, L)), nmax, 1)
    b = min(m, REFINE_BATCH)
    idx = jnp.nonzero(changed, size=-(-m // b) * b, fill_value=m)[0]

    def batch(k, state):
        L, sumlx, suml2 = state
        ids = lax.dynamic_slice_in_dim(idx, k * b, b)  # == m past the changed ones: dropped below
        g = jnp.minimum(ids, m - 1)
        Lb, slx, sl2, _ = _q3_sweeps(x[g], w[g], wx[g], L[g], sumlx[g], suml2[g], nmax, 4)
        return L.at[ids].set(Lb, mode="drop"), sumlx.at[ids].set(slx, mode="drop"), suml2.at[ids].set(sl2, mode="drop")

    n_batches = (jnp.sum(changed, dtype=jnp.int32) + b - 1) // b
    L, sumlx, suml2 = lax.fori_loop(0, n_batches, batch, (L, sumlx, suml2))
    scale = jnp.where(suml2 > 0, sumlx / jnp.where(suml2 > 0, suml2, F32(1)), F32(0))
    L = L.astype(jnp.int32) + nmax
    return jnp.where(zero, F32(0), scale).reshape(lead), jnp.where(zero[:, None], 0, L).reshape(*lead, -1)


# ---------------------------------------------------------------- Q3_K

def _q3_pack(d: jax.Array, ls: jax.Array, L: jax.Array) -> dict[str, jax.Array]:
    """d f32 [R, nb]; ls 6-bit scales [R, nb, 16] in [0, 64); L quants [R, nb, 256] in [0, 8)."""
    lead = L.shape[:-1]
    lo = ls & 0xF
    scales = jnp.concatenate([_or_shifted(lo.reshape(*lead, 2, 8), 4),
                              _or_shifted((ls >> 4).reshape(*lead, 4, 4), 2)], axis=-1)
    # high bit of value 32*b + m goes to bit b of hmask[m]; 2-bit quants of 32*s + l (per half) to qs[l]
    hmask = _or_shifted((L >> 2).reshape(*lead, 8, 32), 1)
    qs = _or_shifted((L & 3).reshape(*lead, 2, 4, 32), 2).reshape(*lead, 64)
    return {"hmask": hmask, "qs": qs, "scales": scales, "d": to_f16(d)}


def _q3_finish(xs: jax.Array, L: jax.Array, d: jax.Array, ls: jax.Array) -> tuple[jax.Array, ...]:
    """Re-quantize every sub-block with its stored scale ``f16(d) * (ls - 32)``: (d, ls, L [.., 256])."""
    d_eff = mul(f16_round(d)[..., None], (ls - 32).astype(F32))
    L = _requantize(xs, d_eff, L, 4)
    return d, ls.astype(jnp.uint8), L.reshape(*L.shape[:-2], QK_K).astype(jnp.uint8)


def _q3_k_blocks(x: jax.Array, qw: jax.Array | None) -> tuple[jax.Array, ...]:
    """``quantize_row_q3_K_ref`` (qw None) or ``quantize_row_q3_K_impl`` of rows ``x`` [R, K]."""
    xs = _sub_blocks(x)
    if qw is None:
        scales, L = make_q3_quants(xs, 4)
        _, max_scale = first_argmax_abs(scales)
        nz = max_scale != 0
        iscale = div(F32(-32), jnp.where(nz, max_scale, F32(1)))
        ls = jnp.clip(nearest_int(mul(iscale[..., None], scales)), -32, 31) + 32
        # all scales zero: memset scales to 0 (read back as -32) and d = 0
        return _q3_finish(xs, L, jnp.where(nz, div(F32(1), iscale), F32(0)), jnp.where(nz[..., None], ls, 0))
    x2 = mul(xs, xs)
    sigma2 = div(F32(2) * seqsum(x2.reshape(*x2.shape[:-2], QK_K)), F32(QK_K))
    weight = mul(_sub_blocks(qw), jnp.sqrt(sigma2[..., None, None] + x2))
    scales, L = make_qx_quants(xs, 4, 1, weight)
    d_block, ls = make_qx_quants(scales, 32, 1, seqsum(weight))
    return _q3_finish(xs, L, d_block, ls)


def _q3_k_quantize(x: jax.Array, qw: jax.Array | None) -> dict[str, jax.Array]:
    # bit packing after the loop: fused into the loop's output updates it runs several times slower
    return _q3_pack(*_by_super_blocks(_q3_k_blocks, x, qw))


def _q3_k_dequantize(a: dict[str, jax.Array]) -> jax.Array:
    hmask, qs, sc = a["hmask"], a["qs"], a["scales"]
    lead = qs.shape[:-1]
    low = _unpack_bits(qs.reshape(*lead, 2, 32), 2, 4).reshape(*lead, QK_K)
    high = _unpack_bits(hmask, 1, 8).reshape(*lead, QK_K)
    q = (low - 4 * (1 - high)).astype(F32).reshape(*lead, SUB, SUB)
    ls = _unpack_bits(sc[..., :8], 4, 2).reshape(*lead, SUB) | (_unpack_bits(sc[..., 8:], 2, 4).reshape(*lead, SUB) << 4)
    # (d * sc) * q with no add after it: plain multiplies, which also keep NaN payloads as numpy does
    dl = a["d"].astype(F32)[..., None] * (ls - 32).astype(F32)
    return (dl[..., None] * q).reshape(*lead[:-1], -1)


# ---------------------------------------------------------------- Q6_K

def _q6_k_blocks(x: jax.Array, qw: jax.Array | None) -> tuple[jax.Array, ...]:
    """``quantize_row_q6_K_ref`` (qw None) or ``quantize_row_q6_K_impl`` of rows ``x`` [R, K]:
    (d, int8 scales, L [.., 256] in [0, 64))."""
    xs = _sub_blocks(x)
    scales, L = make_qx_quants(xs, 32, 1, None if qw is None else _sub_blocks(qw))
    amax, max_scale = first_argmax_abs(scales)
    live = amax >= GROUP_MAX_EPS  # otherwise the whole block is zero bytes
    iscale = div(F32(-128), jnp.where(live, max_scale, F32(1)))
    d = jnp.where(live, div(F32(1), iscale), F32(0))
    sc = jnp.where(live[..., None], jnp.minimum(127, nearest_int(mul(iscale[..., None], scales))), 0)
    L = _requantize(xs, mul(f16_round(d)[..., None], sc.astype(F32)), L, 32)
    L = jnp.where(live[..., None, None], L, 0)
    return d, sc.astype(jnp.int8), L.reshape(*L.shape[:-2], QK_K).astype(jnp.uint8)


def _q6_pack(d: jax.Array, sc: jax.Array, L: jax.Array) -> dict[str, jax.Array]:
    """d f32 [R, nb]; sc int8 [R, nb, 16]; L quants [R, nb, 256] in [0, 64)."""
    lead = L.shape[:-1]
    L = L.reshape(*lead, 2, 4, 32)  # [half][quarter s][l]
    lo = (L & 0xF).reshape(*lead, 2, 2, 2, 32).swapaxes(-3, -2)  # [half][s & 1][s >> 1][l]
    return {"ql": _or_shifted(lo, 4).reshape(*lead, 128),
            "qh": _or_shifted(L >> 4, 2).reshape(*lead, 64),
            "scales": sc, "d": to_f16(d)}


def _q6_k_quantize(x: jax.Array, qw: jax.Array | None) -> dict[str, jax.Array]:
    return _q6_pack(*_by_super_blocks(_q6_k_blocks, x, qw))


def _q6_k_dequantize(a: dict[str, jax.Array]) -> jax.Array:
    ql, qh = a["ql"], a["qh"]
    lead = ql.shape[:-1]
    # [half][s >> 1][s & 1][l] by broadcasting the nibble shift over a new axis -3 (a swapaxes
    # here made XLA's CPU dot, which fuses this, several times slower)
    nibble = jnp.array([0, 4], jnp.int32)[:, None, None]
    lo = (ql.astype(jnp.int32).reshape(*lead, 2, 1, 2, 32) >> nibble) & 0xF
    hi = _unpack_bits(qh.reshape(*lead, 2, 32), 2, 4)
    q = ((lo.reshape(*lead, 2, 4, 32) | (hi << 4)) - 32).astype(F32).reshape(*lead, SUB, SUB)
    dl = a["d"].astype(F32)[..., None] * a["scales"].astype(F32)
    return (dl[..., None] * q).reshape(*lead[:-1], -1)


Q3_K = register(Format("Q3_K", QK_K, (Field("hmask", "uint8", 32), Field("qs", "uint8", 64),
                                      Field("scales", "uint8", 12), Field("d", "float16")),
                       _q3_k_dequantize, _q3_k_quantize, "ggml_k"))
Q6_K = register(Format("Q6_K", QK_K, (Field("ql", "uint8", 128), Field("qh", "uint8", 64),
                                      Field("scales", "int8", 16), Field("d", "float16")),
                       _q6_k_dequantize, _q6_k_quantize, "ggml_k"))
