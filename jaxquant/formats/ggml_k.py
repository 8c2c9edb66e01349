"""llama.cpp K-quants with per-sub-block minimums: Q2_K, Q4_K, Q5_K (256-element super-blocks).

A super-block holds sub-blocks (16 of 16 for Q2_K, 8 of 32 for Q4_K/Q5_K), each ``x ~ d*sc*q - dmin*m``
with small integer scale ``sc`` and min ``m`` quantized against the super-block's f16 ``d``/``dmin``.
Without importance weights the quantizers are ``quantize_row_q*_K_ref`` (``make_qkx2_quants`` per
sub-block, max-based scale quantization); with them ``quantize_row_q*_K_impl`` (``make_qkx3_quants``,
then ``make_qp_quants`` for the scales and mins). Both re-derive the quants from the rounded d/dmin.

Bytes equal llama.cpp's except where the C's arithmetic goes subnormal, which XLA's CPU flushes to
zero: sub-blocks whose values all lie below about 1e-10 in magnitude (their sums of products do;
there d*sc and dmin*m round to 0 in both, so they dequantize to the same zeros and only meaningless
bits differ), and Q2_K super-blocks spanning more than about 2e38 (the C's 3/(max-min) is
subnormal; llama.cpp itself stores an inf or NaN d or dmin there).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant.formats.numerics import F32, div, mul, nearest_int, seqsum, to_f16
from jaxquant.formats.registry import Field, Format, register

QK_K = 256
GROUP_MAX_EPS = F32(1e-15)
# On CPU the searches run over slices of about this many weights, whose working set stays in cache.
CPU_SLICE_ELEMENTS = 1 << 18


def _step_factors(rmin: float, rdelta: float, steps, nmax: int) -> jax.Array:
    """C's ``rmin + rdelta*is + nmax`` for each ``is`` in ``steps``, in f32 (numpy never fuses it to an FMA)."""
    return jnp.asarray(np.float32(rmin) + np.float32(rdelta) * np.asarray(steps, np.float32) + np.float32(nmax))


def _group_major(x: jax.Array) -> jax.Array:
    """[..., n] -> [n, groups]: each step of the C loops over i is then one vector op across all groups."""
    return x.reshape(-1, x.shape[-1]).T


def _materialize(*values: jax.Array) -> tuple[jax.Array, ...]:
    """Per-group results (each a chain of n adds) computed once: XLA duplicates cheap producers
    into every consumer, but not a division (``v / 1`` by a divisor it cannot fold is exact)."""
    return tuple(div(v, F32(1)) for v in values)


def make_qkx_quants(x: jax.Array, weights: jax.Array, nmax: int, rmin: float, rdelta: float, nstep: int,
                    use_mad: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """ggml's ``make_qkx2_quants`` over the last axis (= ``make_qkx3_quants`` when weights are given).

    Fits ``x ~ scale * L - the_min`` with ``L`` in [0, nmax] by a search over ``nstep + 1`` trial
    inverse scales, each refined by weighted least squares. Returns (scale, the_min, L int32).
    """
    batch = x.shape[:-1]
    x, w = _group_major(x), _group_major(weights)
    # C's running minimum keeps the first of equal values (the sign of a zero min reaches Q4_1's m)
    first_min = x[0]
    for xi in x[1:]:
        first_min = jnp.where(xi < first_min, xi, first_min)
    mn0 = jnp.where(first_min > 0, F32(0), first_min)
    mx = jnp.max(x, axis=0)
    flat = mx <= mn0  # all equal (after min is clamped to <= 0): L = 0, scale 0
    sum_w = seqsum(w, 0)
    sum_x = seqsum(mul(w, x), 0)

    def quants(iscale, mn):  # C's MAX(0, MIN(nmax, nearest_int(...))), kept in f32
        return jnp.clip(jnp.round(iscale * (x - mn)), F32(0), F32(nmax))

    def error(scale, mn, lf):
        diff = mul(scale, lf) + mn - x
        return seqsum(mul(w, jnp.abs(diff) if use_mad else diff * diff), 0)

    iscale = div(F32(nmax), jnp.where(flat, F32(1), mx - mn0))
    scale = div(F32(1), iscale)
    best = error(scale, mn0, quants(iscale, mn0))

    def step(carry, factor):
        # The winning L is not carried: it is quants(l_iscale, l_min) again after the search
        # (a per-element select here would make XLA recompute the group's sums per element).
        best, scale, mn, l_iscale, l_min = carry  # C updates min on success; later trials start from it
        iscale = div(factor, mx - mn)
        lf = quants(iscale, mn)
        wl = mul(w, lf)
        sum_l, sum_l2, sum_xl = _materialize(seqsum(wl, 0), seqsum(mul(wl, lf), 0), seqsum(mul(wl, x), 0))
        det = mul(sum_w, sum_l2) - mul(sum_l, sum_l)
        ok = det > 0
        det = jnp.where(ok, det, F32(1))
        this_scale = div(mul(sum_w, sum_xl) - mul(sum_x, sum_l), det)
        this_min = div(mul(sum_l2, sum_x) - mul(sum_l, sum_xl), det)
        pos = this_min > 0
        this_scale = jnp.where(pos, div(sum_xl, jnp.where(pos, sum_l2, F32(1))), this_scale)
        this_min = jnp.where(pos, F32(0), this_min)
        (cur,) = _materialize(error(this_scale, this_min, lf))
        take = ok & (cur < best)
        pick = lambda new, old: jnp.where(take, new, old)  # noqa: E731
        return (pick(cur, best), pick(this_scale, scale), pick(this_min, mn), pick(iscale, l_iscale),
                pick(mn, l_min)), None

    factors = _step_factors(rmin, rdelta, range(nstep + 1), nmax)
    (_, scale, mn, l_iscale, l_min), _ = lax.scan(step, (best, scale, mn0, iscale, mn0), factors)
    scale = jnp.where(flat, F32(0), scale)
    l = jnp.where(flat, 0, quants(l_iscale, l_min).astype(jnp.int32))
    return scale.reshape(batch), -mn.reshape(batch), l.T.reshape(*batch, -1)


def make_qp_quants(x: jax.Array, quant_weights: jax.Array, nmax: int) -> tuple[jax.Array, jax.Array]:
    """ggml's ``make_qp_quants`` over the last axis: (scale, L) with ``x ~ scale * L``.

    ``L`` holds what C stores in its ``uint8_t`` array (0..255, int32).
    """
    batch = x.shape[:-1]
    x, w = _group_major(x), _group_major(quant_weights)
    n = x.shape[0]
    mx = jnp.maximum(jnp.max(x, axis=0), F32(0))
    zero = mx < GROUP_MAX_EPS
    mx = jnp.where(zero, F32(1), mx)

    def mse(scale, lf):
        diff = x - mul(scale, lf)
        return seqsum(mul(mul(w, diff), diff), 0)

    iscale = div(F32(nmax), mx)
    (best,) = _materialize(mse(div(F32(1), iscale), (nearest_int(mul(iscale, x)) & 0xFF).astype(F32)))

    def trial(carry, factor):
        best, iscale = carry
        iscale_is = div(factor, mx)
        cur = mse(div(F32(1), iscale_is), jnp.minimum(nmax, nearest_int(mul(iscale_is, x))).astype(F32))
        take = cur < best
        return (jnp.where(take, cur, best), jnp.where(take, iscale_is, iscale)), None

    factors = _step_factors(0, 0.1, [i for i in range(-4, 5) if i], nmax)
    (_, iscale), _ = lax.scan(trial, (best, iscale), factors)

    l = jnp.minimum(nmax, nearest_int(mul(iscale, x)))
    lf = l.astype(F32)
    sumlx = seqsum(mul(mul(w, x), lf), 0)
    suml2 = seqsum(mul(mul(w, lf), lf), 0)

    def refine(carry, i):
        # One element of C's refinement pass; the sums change after each element, so it is sequential.
        big_l, sumlx, suml2 = carry
        wi, xi, old = w[i], x[i], big_l[i]
        wx, li = mul(wi, xi), old.astype(F32)
        slx = sumlx - mul(wx, li)
        sl2 = suml2 - mul(mul(wi, li), li)
        ok = (slx > 0) & (sl2 > 0)
        new_l = jnp.minimum(nmax, nearest_int(div(xi * sl2, jnp.where(ok, slx, F32(1)))))
        nf = new_l.astype(F32)
        slx = slx + mul(wx, nf)
        sl2 = sl2 + mul(mul(wi, nf), nf)
        take = ok & (new_l != old) & (mul(mul(slx, slx), suml2) > mul(mul(sumlx, sumlx), sl2))
        big_l = big_l.at[i].set(jnp.where(take, new_l & 0xFF, old))
        return (big_l, jnp.where(take, slx, sumlx), jnp.where(take, sl2, suml2)), None

    # 5 passes; C stops after a pass that changes nothing, and a further pass would change nothing.
    order = jnp.tile(jnp.arange(n), 5)
    (big_l, sumlx, suml2), _ = lax.scan(refine, (l & 0xFF, sumlx, suml2), order)
    scale = jnp.where(suml2 > 0, div(sumlx, jnp.where(suml2 > 0, suml2, F32(1))), F32(0))
    return jnp.where(zero, F32(0), scale).reshape(batch), jnp.where(zero, 0, big_l).T.reshape(*batch, -1)


# ---- scale/min byte layouts -------------------------------------------------------------------

def _pack_scale_min_k4(ls: jax.Array, lm: jax.Array) -> jax.Array:
    """Inverse of ``get_scale_min_k4``: 8 six-bit scales and mins (0..255 as C's uint8) -> 12 bytes."""
    lo = ls[..., :4] | ((ls[..., 4:] >> 4) << 6)
    mid = lm[..., :4] | ((lm[..., 4:] >> 4) << 6)
    hi = (ls[..., 4:] & 0xF) | ((lm[..., 4:] & 0xF) << 4)
    return (jnp.concatenate([lo, mid, hi], axis=-1) & 0xFF).astype(jnp.uint8)


def _unpack_scale_min_k4(scales: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``get_scale_min_k4`` for j = 0..7: 12 bytes -> (sc, m), int32 [..., 8]."""
    # Selects over the bytes tiled to 8 rather than concatenates: fused into XLA's CPU dot, a
    # concatenate made the whole loop ~10x slower.
    s = jnp.tile(scales.astype(jnp.int32).reshape(*scales.shape[:-1], 3, 4), 2)
    lo, mid, hi = s[..., 0, :], s[..., 1, :], s[..., 2, :]
    first = jnp.arange(8) < 4
    sc = jnp.where(first, lo & 63, (hi & 0xF) | ((lo >> 6) << 4))
    m = jnp.where(first, mid & 63, (hi >> 4) | ((mid >> 6) << 4))
    return sc, m


def _unpack_scale_min_q2(scales: jax.Array) -> tuple[jax.Array, jax.Array]:
    s = scales.astype(jnp.int32)
    return s & 0xF, s >> 4


@dataclasses.dataclass(frozen=True)
class _Spec:
    """What differs between Q2_K, Q4_K and Q5_K in the C quantizers."""

    sub: int  # elements per sub-block
    nmax: int  # largest quant
    ref_search: tuple[float, float, int]  # (rmin, rdelta, nstep) of make_qkx2_quants in *_ref
    scale_bits: int  # 4 (Q2_K) or 6 bits per sub-block scale/min
    ref_mad: bool  # Q2_K's *_ref: weights |x| and absolute errors (else sqrt(mean x^2) + |x|, squares)
    sigma2_factor: float  # *_impl: sigma2 = factor * sum(x^2) / 256
    clamp_impl: bool  # the _impl variant clamps make_qp_quants' uint8 results to 63 (Q5_K only)
    pack: Callable[[jax.Array], dict[str, jax.Array]]  # quants [..., 256] -> qs (and qh) fields

    @property
    def scale_max(self) -> int:
        return (1 << self.scale_bits) - 1


def _super_blocks(x: jax.Array, sub: int) -> jax.Array:
    """[R, K] -> [R, K/256, 256/sub, sub]."""
    return x.reshape(x.shape[0], -1, QK_K // sub, sub)


def _ref_scales(spec: _Spec, scales: jax.Array, mins: jax.Array) -> tuple[jax.Array, ...]:
    """``*_ref``: sub-block scales/mins quantized against the super-block maxima -> (d, dmin, ls, lm)."""
    q = F32(spec.scale_max)

    def positive_max(v):  # C starts from +0.0f and keeps only larger values
        vmax = jnp.max(v, axis=-1)
        return jnp.where(vmax > 0, vmax, F32(0))

    max_scale, max_min = positive_max(scales), positive_max(mins)

    def levels(v, vmax):
        inv = jnp.where(vmax > 0, div(q, jnp.where(vmax > 0, vmax, F32(1))), F32(0))
        l = nearest_int(mul(inv[..., None], v)) & 0xFF  # C stores into uint8_t
        return jnp.minimum(spec.scale_max, l) if spec.scale_bits == 6 else l

    return to_f16(div(max_scale, q)), to_f16(div(max_min, q)), levels(scales, max_scale), levels(mins, max_min)


def _requantize(spec: _Spec, xb: jax.Array, big_l: jax.Array, d: jax.Array, dmin: jax.Array,
                sc: jax.Array, m: jax.Array) -> jax.Array:
    """Quants recomputed from the stored f16 d/dmin and integer sc/m; sub-blocks with d*sc == 0 keep L."""
    dd = mul(d.astype(F32)[..., None], sc.astype(F32))[..., None]
    dm = mul(dmin.astype(F32)[..., None], m.astype(F32))[..., None]
    q = jnp.clip(nearest_int(div(xb + dm, jnp.where(dd != 0, dd, F32(1)))), 0, spec.nmax)
    return jnp.where(dd != 0, q, big_l)


def _quantize(spec: _Spec, x: jax.Array, qw: jax.Array | None) -> dict[str, jax.Array]:
    """The shared body of quantize_row_q{2,4,5}_K_ref / _impl: [R, K] -> block fields."""
    xb = _super_blocks(x, spec.sub)
    if qw is None:
        if spec.ref_mad:
            weights = jnp.abs(xb)
        else:
            weights = jnp.sqrt(div(seqsum(mul(xb, xb)), F32(spec.sub)))[..., None] + jnp.abs(xb)
        scales, mins, big_l = make_qkx_quants(xb, weights, spec.nmax, *spec.ref_search, spec.ref_mad)
        d, dmin, ls, lm = _ref_scales(spec, scales, mins)
    else:
        xs = x.reshape(x.shape[0], -1, QK_K)
        sum_x2 = seqsum(mul(xs, xs))
        sigma2 = div(F32(spec.sigma2_factor) * sum_x2, F32(QK_K))
        weights = mul(_super_blocks(qw[None], spec.sub), jnp.sqrt(sigma2[..., None, None] + mul(xb, xb)))
        sw = seqsum(weights)
        scales, mins, big_l = make_qkx_quants(xb, weights, spec.nmax, -0.9, 0.05, 36)
        # scales and mins through one make_qp_quants call (one graph to compile)
        (d_block, m_block), (ls, lm) = make_qp_quants(jnp.stack([scales, mins]), jnp.stack([sw, sw]), spec.scale_max)
        if spec.clamp_impl:
            ls, lm = jnp.minimum(63, ls), jnp.minimum(63, lm)
        d, dmin = to_f16(d_block), to_f16(m_block)

    if spec.scale_bits == 4:
        packed = ((ls | (lm << 4)) & 0xFF).astype(jnp.uint8)
        sc, m = _unpack_scale_min_q2(packed)
    else:
        packed = _pack_scale_min_k4(ls, lm)
        sc, m = _unpack_scale_min_k4(packed)
    big_l = _requantize(spec, xb, big_l, d, dmin, sc, m)
    return {"d": d, "dmin": dmin, "scales": packed, **spec.pack(big_l.reshape(*x.shape[:1], -1, QK_K))}


def _quantize_rows(spec: _Spec, x: jax.Array, qw: jax.Array | None) -> dict[str, jax.Array]:
    """Quantize [R, K] rows; on CPU in slices of rows small enough for the search to run in cache."""
    rows, k = x.shape
    per_slice = max(1, CPU_SLICE_ELEMENTS // k)
    if jax.default_backend() != "cpu" or rows <= per_slice:
        return _quantize(spec, x, qw)
    n = -(-rows // per_slice)
    xs = jnp.pad(x, ((0, n * per_slice - rows), (0, 0))).reshape(n, per_slice, k)
    out = lax.map(lambda xi: _quantize(spec, xi, qw), xs)
    return {name: a.reshape(n * per_slice, *a.shape[2:])[:rows] for name, a in out.items()}


def _shifted_or(q: jax.Array, bits: int) -> jax.Array:
    """OR ``q[..., s, :] << (bits*s)`` over axis -2 into uint8."""
    out = q[..., 0, :]
    for s in range(1, q.shape[-2]):
        out = out | (q[..., s, :] << (bits * s))
    return out.astype(jnp.uint8)


def _unshift(packed: jax.Array, bits: int, count: int) -> jax.Array:
    """Inverse of ``_shifted_or``: [..., n] uint8 -> [..., count, n] int32."""
    shifts = jnp.arange(count, dtype=jnp.int32)[:, None] * bits
    return (packed.astype(jnp.int32)[..., None, :] >> shifts) & ((1 << bits) - 1)


# ---- Q2_K ---------------------------------------------------------------------------------------

def _pack_q2(q: jax.Array) -> dict[str, jax.Array]:
    # qs[32h + l] holds L[128h + 32s + l] at bits 2s
    return {"qs": _shifted_or(q.reshape(*q.shape[:-1], 2, 4, 32), 2).reshape(*q.shape[:-1], 64)}


Q2 = _Spec(sub=16, nmax=3, ref_search=(-0.5, 0.1, 15), scale_bits=4, ref_mad=True, sigma2_factor=1,
           clamp_impl=False, pack=_pack_q2)


def _dequant(d, dmin, sc, m, q):
    """``d*sc * q - dmin*m`` per sub-block as gguf-py computes it: q [..., S, n] -> f32 [..., S*n].

    f16 d times a 6-bit sc times a 5-bit q needs at most 22 bits: every product is exact, so an
    FMA rounds alike, and plain multiplies keep NaN payloads as numpy does (mul() would not).
    A NaN operand of the subtraction is returned as x86 returns it (first operand first, sign kept);
    XLA may compute it as an FMA or as an addition of the negated min."""
    dl = (d.astype(F32)[..., None] * sc.astype(F32))[..., None]
    ml = (dmin.astype(F32)[..., None] * m.astype(F32))[..., None]
    y = dl * q.astype(F32)
    return jnp.where(y != y, y, jnp.where(ml != ml, ml, y - ml)).reshape(*q.shape[:-2], -1)


def _q2_k_dequantize(a: dict[str, jax.Array]) -> jax.Array:
    qs = a["qs"]
    q = _unshift(qs.reshape(*qs.shape[:-1], 2, 32), 2, 4).reshape(*qs.shape[:-1], 16, 16)
    sc, m = _unpack_scale_min_q2(a["scales"])
    return _dequant(a["d"], a["dmin"], sc, m, q).reshape(*qs.shape[:-2], -1)


# ---- Q4_K / Q5_K --------------------------------------------------------------------------------

def _pack_q4(q: jax.Array) -> dict[str, jax.Array]:
    # qs[32c + l] = L[64c + l] | L[64c + 32 + l] << 4
    return {"qs": _shifted_or(q.reshape(*q.shape[:-1], 4, 2, 32), 4).reshape(*q.shape[:-1], 128)}


def _pack_q5(q: jax.Array) -> dict[str, jax.Array]:
    # low nibbles as Q4_K; qh[l] bit 2c+h is the fifth bit of L[64c + 32h + l]
    return {**_pack_q4(q & 0xF), "qh": _shifted_or((q >> 4).reshape(*q.shape[:-1], 8, 32), 1)}


Q4 = _Spec(sub=32, nmax=15, ref_search=(-1.0, 0.1, 20), scale_bits=6, ref_mad=False, sigma2_factor=2,
           clamp_impl=False, pack=_pack_q4)
Q5 = _Spec(sub=32, nmax=31, ref_search=(-0.5, 0.1, 15), scale_bits=6, ref_mad=False, sigma2_factor=2,
           clamp_impl=True, pack=_pack_q5)


def _k4_dequantize(a: dict[str, jax.Array], q: jax.Array) -> jax.Array:
    sc, m = _unpack_scale_min_k4(a["scales"])
    return _dequant(a["d"], a["dmin"], sc, m, q).reshape(*q.shape[:-3], -1)


def _q4_k_dequantize(a: dict[str, jax.Array]) -> jax.Array:
    qs = a["qs"]
    q = _unshift(qs.reshape(*qs.shape[:-1], 4, 32), 4, 2).reshape(*qs.shape[:-1], 8, 32)
    return _k4_dequantize(a, q)


def _q5_k_dequantize(a: dict[str, jax.Array]) -> jax.Array:
    qs = a["qs"]
    low = _unshift(qs.reshape(*qs.shape[:-1], 4, 32), 4, 2).reshape(*qs.shape[:-1], 8, 32)
    return _k4_dequantize(a, low | (_unshift(a["qh"], 1, 8) << 4))


_HALF = (Field("d", "float16"), Field("dmin", "float16"))
Q2_K = register(Format("Q2_K", QK_K, (Field("scales", "uint8", 16), Field("qs", "uint8", 64), *_HALF),
                       _q2_k_dequantize, partial(_quantize_rows, Q2), "ggml_k"))
Q4_K = register(Format("Q4_K", QK_K, (*_HALF, Field("scales", "uint8", 12), Field("qs", "uint8", 128)),
                       _q4_k_dequantize, partial(_quantize_rows, Q4), "ggml_k"))
Q5_K = register(Format("Q5_K", QK_K, (*_HALF, Field("scales", "uint8", 12), Field("qh", "uint8", 32),
                                      Field("qs", "uint8", 128)),
                       _q5_k_dequantize, partial(_quantize_rows, Q5), "ggml_k"))
