"""Rounding targets: how a calibration algorithm rounds weights into one format.

A ``Target`` rounds a weight matrix ``[R, K]`` group by group (``group`` columns share their
parameters): ``fit`` derives a group's parameters from its (possibly already error-corrected)
weights, ``round`` maps one column to codes and the values they dequantize to, ``pack`` builds the
QTensor from all codes and parameters. GPTQ calls ``fit`` at each group start on the partly
updated weights and ``round`` column by column; round-to-nearest (``rtn``) fits and rounds each
group of the original weights; AWQ's scale and clip searches use ``rtn`` as their quantizer.

Two kinds:

- ``IntTarget``: ``GPTQ{b}_G{g}`` codes with a float scale and an integer zero per (row, group),
  fitted as AutoGPTQ's ``Quantizer.find_params`` (``style="gptq"``: the range always includes 0,
  optionally symmetric) or AutoAWQ's ``pseudo_quantize_tensor`` (``style="awq"``: min..max, the
  range clamped to 1e-5, the zero point clamped to the codes). The float scale rounds; the
  QTensor stores it in float16 as the reference packers do.
- ``FormatTarget``: any format with an affine view (``AFFINE``: llama.cpp's legacy and K-quants,
  MLX affine, GPTQ): the format's own quantizer fits each block, and a column rounds to the
  nearest value those stored parameters can express (``value = a * code + b`` per element, codes
  in ``[lo, hi]``), so the values GPTQ feeds its error back from are the dequantized ones.

``AFFINE`` is also what DWQ learns through: the float fields (``scales``) stay differentiable and
the integer codes stay fixed.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxquant.errors import FormatError
from jaxquant.formats import get_format, ggml_k, ggml_k_sym, ggml_legacy
from jaxquant.formats.gptq import gptq_format, minmax_params
from jaxquant.formats.numerics import div
from jaxquant.formats.packing import pack_bits
from jaxquant.qtensor import QTensor

F32 = jnp.float32
Arrays = dict[str, jax.Array]


# ---- affine views of formats -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Affine:
    """A format whose element values are ``a * code + b``: ``scale_offset(arrays) -> (a, b)``, each
    f32 ``[..., nb, block]``, differentiable in the float fields ``scales``; integer codes in
    ``[lo, hi]``; ``with_codes(arrays, codes [..., nb, block])`` -> the arrays holding those codes."""

    lo: int
    hi: int
    scales: tuple[str, ...]
    scale_offset: Callable[[Arrays], tuple[jax.Array, jax.Array]]
    with_codes: Callable[[Arrays, jax.Array], Arrays]


def _f(a: Arrays, name: str) -> jax.Array:
    return a[name].astype(F32)


def _legacy(offset: Callable[[Arrays], jax.Array], lo: int, hi: int, pack: Callable[[jax.Array], Arrays],
            scales: tuple[str, ...]) -> Affine:
    def scale_offset(a: Arrays):
        shape = (*a["d"].shape, ggml_legacy.QK)
        return jnp.broadcast_to(_f(a, "d")[..., None], shape), jnp.broadcast_to(offset(a)[..., None], shape)

    return Affine(lo, hi, scales, scale_offset, lambda a, q: {**a, **pack(q)})


def _nibbles(q):
    return {"qs": ggml_legacy.pack_nibbles(q & 0xF)}


def _five_bits(q):
    return {"qs": ggml_legacy.pack_nibbles(q & 0xF), "qh": ggml_legacy._pack_high_bits(q)}


def _k4(pack: Callable[[jax.Array], Arrays], hi: int) -> Affine:
    """Q4_K / Q5_K: ``d*sc * q - dmin*m`` per 32-value sub-block."""
    def scale_offset(a: Arrays):
        sc, m = ggml_k._unpack_scale_min_k4(a["scales"])
        dl = _f(a, "d")[..., None] * sc.astype(F32)
        ml = _f(a, "dmin")[..., None] * m.astype(F32)
        shape = (*dl.shape[:-1], ggml_k.QK_K)
        return (jnp.broadcast_to(dl[..., None], (*dl.shape, 32)).reshape(shape),
                jnp.broadcast_to(-ml[..., None], (*ml.shape, 32)).reshape(shape))

    return Affine(0, hi, ("d", "dmin"), scale_offset, lambda a, q: {**a, **pack(q)})


def _q6_k() -> Affine:
    def scale_offset(a: Arrays):
        dl = _f(a, "d")[..., None] * a["scales"].astype(F32)
        shape = (*dl.shape[:-1], ggml_k_sym.QK_K)
        dl = jnp.broadcast_to(dl[..., None], (*dl.shape, ggml_k_sym.SUB)).reshape(shape)
        return dl, -32 * dl

    def with_codes(a: Arrays, q: jax.Array) -> Arrays:
        return {**a, **ggml_k_sym._q6_pack(_f(a, "d"), a["scales"], q)}

    return Affine(0, 63, ("d",), scale_offset, with_codes)


def _bitstream(bits: int, code: str, scale: str, offset: Callable[[Arrays], jax.Array]) -> Affine:
    """MLX affine (``scales * q + biases``) and GPTQ (``scale * (q - zero)``): codes as a bit stream."""
    def scale_offset(a: Arrays):
        s = _f(a, scale)[..., None]
        g = a[code].shape[-1] * 32 // bits
        return jnp.broadcast_to(s, (*s.shape[:-1], g)), jnp.broadcast_to(offset(a)[..., None], (*s.shape[:-1], g))

    return Affine(0, (1 << bits) - 1, (scale,) + (("biases",) if scale == "scales" else ()), scale_offset,
                  lambda a, q: {**a, code: pack_bits(q, bits)})


AFFINE: dict[str, Affine] = {
    "Q4_0": _legacy(lambda a: -8 * _f(a, "d"), 0, 15, _nibbles, ("d",)),
    "Q4_1": _legacy(lambda a: _f(a, "m"), 0, 15, _nibbles, ("d", "m")),
    "Q5_0": _legacy(lambda a: -16 * _f(a, "d"), 0, 31, _five_bits, ("d",)),
    "Q5_1": _legacy(lambda a: _f(a, "m"), 0, 31, _five_bits, ("d", "m")),
    "Q8_0": _legacy(lambda a: jnp.zeros_like(_f(a, "d")), -128, 127, lambda q: {"qs": q.astype(jnp.int8)}, ("d",)),
    "Q4_K": _k4(ggml_k._pack_q4, 15),
    "Q5_K": _k4(ggml_k._pack_q5, 31),
    "Q6_K": _q6_k(),
}
_AFQ, _GPTQ = re.compile(r"AFQ(\d)_G(\d+)$"), re.compile(r"GPTQ(\d)_G(\d+)$")


def affine(fmt: str) -> Affine:
    """The affine view of format ``fmt``; FormatError for formats without one."""
    fmt = str(fmt).upper()
    if fmt in AFFINE:
        return AFFINE[fmt]
    if m := _AFQ.match(fmt):
        return _bitstream(int(m.group(1)), "q", "scales", lambda a: _f(a, "biases"))
    if m := _GPTQ.match(fmt):
        return _bitstream(int(m.group(1)), "qs", "scale", lambda a: -_f(a, "scale") * _f(a, "zero"))
    raise FormatError(f"{fmt}: no affine view (value = a * code + b) for calibration; formats with one: "
                      f"{', '.join(sorted(AFFINE))}, AFQ{{b}}_G{{g}}, GPTQ{{b}}_G{{g}}")


def codes_of(q: QTensor) -> jax.Array:
    """The integer codes ``[..., nb, block]`` of a QTensor of an affine format (rounded back from its
    dequantized values; exact wherever ``a != 0``, else the lowest code)."""
    view = affine(q.fmt)
    a, b = view.scale_offset(q.arrays)
    w = q.format.dequantize_rows({k: v for k, v in q.arrays.items() if k != "perm"}).reshape(a.shape)
    nz = a != 0
    return jnp.where(nz, jnp.clip(jnp.round(div(w - b, jnp.where(nz, a, 1))), view.lo, view.hi), view.lo).astype(
        jnp.int32)


# ---- targets -------------------------------------------------------------------------------------

class Target:
    """A format's rounding, group by group (see the module doc)."""

    fmt: str
    group: int

    def fit(self, wg: jax.Array) -> Any:
        """Parameters of one group from its weights ``wg [R, group]``."""
        raise NotImplementedError

    def round(self, x: jax.Array, p: Any, j: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Column ``j`` of a group (``x [R]``) -> (int32 codes, values)."""
        raise NotImplementedError

    def pack(self, codes: jax.Array, params: Any, perm: jax.Array | None = None) -> QTensor:
        """Codes ``[R, K]`` (stored column order) and the groups' parameters stacked along a new
        leading axis -> QTensor ``(R, K)``; ``perm``: act order (GPTQ formats only)."""
        raise NotImplementedError

    def rtn(self, w: jax.Array) -> tuple[jax.Array, Any]:
        """Round to nearest: each group fitted on ``w`` and rounded -> (codes [R, K], stacked params)."""
        r, k = w.shape
        groups = w.reshape(r, k // self.group, self.group).swapaxes(0, 1)

        def one(wg):
            p = self.fit(wg)
            cols = jax.vmap(lambda x, j: self.round(x, p, j)[0], in_axes=(1, 0), out_axes=1)
            return cols(wg, jnp.arange(self.group)), p

        codes, params = jax.lax.map(one, groups)
        return codes.swapaxes(0, 1).reshape(r, k), params

    def values(self, w: jax.Array) -> jax.Array:
        """``w`` rounded to nearest and dequantized as this target computes values (float)."""
        r, k = w.shape
        groups = w.reshape(r, k // self.group, self.group).swapaxes(0, 1)

        def one(wg):
            p = self.fit(wg)
            return jax.vmap(lambda x, j: self.round(x, p, j)[1], in_axes=(1, 0), out_axes=1)(wg, jnp.arange(self.group))

        return jax.lax.map(one, groups).swapaxes(0, 1).reshape(r, k)


@dataclasses.dataclass(frozen=True)
class IntTarget(Target):
    """``GPTQ{bits}_G{group}``: ``scale * (q - zero)``, fitted as AutoGPTQ (``style="gptq"``, with
    ``sym``) or AutoAWQ (``style="awq"``) fit them. ``group``: columns per group (a whole row: its length)."""

    bits: int
    group: int
    sym: bool = False
    style: str = "gptq"

    def __post_init__(self):
        if self.style not in ("gptq", "awq"):
            raise FormatError(f"IntTarget: style {self.style!r}; valid: 'gptq', 'awq'")
        if self.style == "awq" and self.sym:
            raise FormatError("IntTarget: AutoAWQ's symmetric mode stores no zero point; use style 'gptq' with sym")

    @property
    def fmt(self) -> str:
        return f"GPTQ{self.bits}_G{self.group}"

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def fit(self, wg):
        """AutoGPTQ ``Quantizer.find_params(perchannel=True, weight=True)`` (no MSE search) or AutoAWQ's
        ``pseudo_quantize_tensor`` parameters: (scale, zero) per row, in ``wg``'s dtype."""
        if self.style == "awq":
            mx, mn = wg.max(1), wg.min(1)
            scale = div(jnp.maximum(mx - mn, 1e-5), self.maxq)
            return scale, jnp.clip(-jnp.round(div(mn, scale)), 0, self.maxq)
        return minmax_params(wg, self.bits, self.sym)

    def round(self, x, p, j):
        scale, zero = p
        q = jnp.clip(jnp.round(div(x, scale)) + zero, 0, self.maxq)
        return q.astype(jnp.int32), scale * (q - zero)

    def pack(self, codes, params, perm=None):
        scale, zero = (a.T for a in params)  # [n_groups, R] -> [R, n_groups]
        r, k = codes.shape
        fmt = gptq_format(self.bits, self.group)
        arrays = {"qs": pack_bits(codes.reshape(r, k // self.group, self.group), self.bits),
                  "scale": scale.astype(jnp.float16), "zero": zero.astype(jnp.uint8)}
        if perm is not None:
            arrays["perm"] = perm.astype(jnp.int32)
        return QTensor(arrays, fmt.name, (r, k))


@dataclasses.dataclass(frozen=True)
class FormatTarget(Target):
    """A format's own quantizer fits each block; columns round to the nearest value of the stored
    parameters (see the module doc). ``weights``: importance per column passed to the quantizer."""

    fmt: str

    @property
    def group(self) -> int:
        return get_format(self.fmt).block_size

    def fit(self, wg):
        fmt = get_format(self.fmt)
        arrays = fmt.quantize_rows(wg.astype(F32), None)  # [R, 1, ...] per field
        a, b = affine(self.fmt).scale_offset(arrays)
        return arrays, a[:, 0].astype(wg.dtype), b[:, 0].astype(wg.dtype)

    def round(self, x, p, j):
        view = affine(self.fmt)
        _, a, b = p
        aj, bj = a[:, j], b[:, j]
        nz = aj != 0
        q = jnp.where(nz, jnp.clip(jnp.round(div(x - bj, jnp.where(nz, aj, 1))), view.lo, view.hi), view.lo)
        return q.astype(jnp.int32), aj * q + bj

    def pack(self, codes, params, perm=None):
        if perm is not None:
            raise FormatError(f"{self.fmt}: act order needs a format that stores a column permutation (GPTQ{{b}}_G{{g}})")
        arrays = jax.tree.map(lambda v: jnp.moveaxis(v[:, :, 0], 0, 1), params[0])  # [R, n_groups, ...]
        r, k = codes.shape
        arrays = affine(self.fmt).with_codes(arrays, codes.reshape(r, k // self.group, self.group))
        fmt = get_format(self.fmt)
        arrays = {f.name: arrays[f.name].astype(f.dtype) for f in fmt.fields}
        return QTensor(arrays, fmt.name, (r, k))


def target_for(fmt: str, *, style: str = "gptq", sym: bool = False) -> Target:
    """The target of format ``fmt``: an ``IntTarget`` for ``GPTQ{b}_G{g}`` (AutoGPTQ's or AutoAWQ's
    fit, by ``style``), else the format's own quantizer (``FormatTarget``)."""
    fmt = get_format(fmt).name
    if m := _GPTQ.match(fmt):
        return IntTarget(int(m.group(1)), int(m.group(2)), sym, style)
    affine(fmt)  # FormatError now for formats without an affine view
    fmt_obj = get_format(fmt)
    if not fmt_obj.can_quantize or fmt_obj.scope != "row":
        raise FormatError(f"{fmt}: calibration needs a row-wise quantizer")
    return FormatTarget(fmt)
