"""llama.cpp lattice (grid) formats: IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S.

Each group of 8 (IQ1/IQ2) or 4 (IQ3) weights is an index into a fixed grid of byte vectors from
ggml-common.h (shipped as data/iq_grids.npz, written by data/make_iq_grids.py); signs come
from ``ksigns_iq2xs`` (7 bits + parity) or a plain sign bit per weight. The dequantizers follow
``dequantize_row_*`` of ggml-quants.c operation for operation. The quantizers are llama.cpp's
grid searches, compiled on the host (ggml_iq_search.py) and called from jitted code through
``jax.pure_callback``; IQ1_S, IQ2_XXS and IQ2_XS need importance weights, as in llama.cpp.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.errors import QuantizeInputError
from jaxquant.formats import ggml_iq_search
from jaxquant.formats.numerics import F32, mul
from jaxquant.formats.registry import Field, Format, register

QK_K = 256
IQ1S_DELTA = 0.125  # IQ1M_DELTA is the same


def _load_grids() -> dict[str, np.ndarray]:
    """The header's grids: the 8-wide ones as float rows [n, 8], the 4-wide (IQ3) ones as their
    entries' uint32 words [n]."""
    with np.load(pathlib.Path(__file__).with_name("data") / "iq_grids.npz") as z:
        t = {k: z[k] for k in z.files}
    out = {}
    for g in ("iq1s", "iq2xxs", "iq2xs", "iq2s", "iq3xxs", "iq3s"):
        table = t[f"{g}_grid"].astype(t[f"{g}_grid"].dtype.newbyteorder("<"))
        out[g] = table.astype(np.uint32) if table.dtype.itemsize == 4 else \
            table.view(np.int8 if g == "iq1s" else np.uint8).reshape(table.size, 8).astype(np.float32)
    return out


_T = _load_grids()


def _grid(name: str, idx: jax.Array) -> jax.Array:
    """Grid rows as f32: idx [...] -> [..., 8 or 4]. A 4-byte entry is one word gather and shifts
    (in XLA's CPU dot fusion 5x faster than a gather of float rows; for 8-byte entries the row
    gather is the faster of the two)."""
    idx = idx.astype(jnp.int32)
    table = _T[name]
    if table.ndim == 2:
        return jnp.asarray(table)[idx]
    return ((jnp.asarray(table)[idx][..., None] >> np.array([0, 8, 16, 24], np.uint32)) & 0xFF).astype(F32)


def _sign_bits(signs: jax.Array) -> jax.Array:
    """Sign bytes [...] -> bools [..., 8]: ``signs & kmask_iq2xs[j]`` (int32 shifts: AVX2 has no byte shifts)."""
    return ((signs.astype(jnp.int32)[..., None] >> np.arange(8, dtype=np.int32)) & 1) != 0


def _ksigns(bits7: jax.Array) -> jax.Array:
    """7-bit sign indices [...] -> bools [..., 8]: ``ksigns_iq2xs`` sets bit 7 to the parity of the 7."""
    b = bits7.astype(jnp.int32) & 127
    return _sign_bits(b | ((jax.lax.population_count(b) & 1) << 7))


def _signed(db: jax.Array, grid: jax.Array, neg: jax.Array) -> jax.Array:
    """``db * grid[j] * (neg ? -1.f : 1.f)`` with db broadcast over the last axis."""
    p = mul(db[..., None], grid)
    return jnp.where(neg, -p, p)


def _d(a: dict[str, jax.Array]) -> jax.Array:
    return a["d"].astype(F32)


def _flat(y: jax.Array, nb_axes: int) -> jax.Array:
    """[..., nb, (per-block dims)] -> [..., nb * 256]."""
    return y.reshape(*y.shape[:-nb_axes - 1], -1)


def _half_db(d: jax.Array, ls: jax.Array, tail: float) -> jax.Array:
    """``d * (0.5f + ls) * tail`` (IQ2_XXS/XS/S: tail 0.25; IQ3_XXS: 0.5)."""
    return mul(mul(d, F32(0.5) + ls.astype(F32)), F32(tail))


def _iq2_xxs_dequantize(a: dict[str, jax.Array]) -> jax.Array:
    qs = a["qs"].astype(jnp.uint32).reshape(*a["qs"].shape[:-1], 8, 4)  # [..., nb, ib32, 4 x u16]
    aux0, aux1 = qs[..., 0] | (qs[..., 1] << 16), qs[..., 2] | (qs[..., 3] << 16)
    db = _half_db(_d(a)[..., None], aux1 >> 28, 0.25)  # [..., nb, 8]
    l = np.arange(4)
    grid = _grid("iq2xxs", (aux0[..., None] >> (8 * l)) & 0xFF)  # [..., nb, 8, 4, 8]
    neg = _ksigns(aux1[..., None] >> (7 * l))
    return _flat(_signed(db[..., None], grid, neg), 3)


def _iq2_xs_dequantize(a: dict[str, jax.Array]) -> jax.Array:
    qs = a["qs"].reshape(*a["qs"].shape[:-1], 8, 4)  # [..., nb, ib32, l]
    sc = a["scales"][..., None]
    db = _half_db(_d(a)[..., None, None], (sc >> np.array([0, 4], np.uint8)) & 0xF, 0.25)  # [..., nb, 8, 2]
    db = jnp.repeat(db, 2, axis=-1)  # l -> db[l/2]
    return _flat(_signed(db, _grid("iq2xs", qs & 511), _ksigns(qs >> 9)), 3)


def _iq2_s_dequantize(a: dict[str, jax.Array]) -> jax.Array:
    qs = a["qs"].astype(jnp.int32)
    lo, signs = qs[..., :QK_K // 8], qs[..., QK_K // 8:]  # grid index low bytes, then sign bytes
    l = np.arange(4)
    hi = ((a["qh"][..., None].astype(jnp.int32) >> (2 * l)) & 3) << 8  # [..., nb, ib32, l]
    idx = lo.reshape(hi.shape) | hi
    sc = a["scales"][..., None]
    db = jnp.repeat(_half_db(_d(a)[..., None, None], (sc >> np.array([0, 4], np.uint8)) & 0xF, 0.25), 2, axis=-1)
    return _flat(_signed(db, _grid("iq2s", idx), _sign_bits(signs.reshape(hi.shape))), 3)


def _iq3_xxs_dequantize(a: dict[str, jax.Array]) -> jax.Array:
    qs = a["qs"]
    idx = qs[..., :QK_K // 4].reshape(*qs.shape[:-1], 8, 4, 2)  # [..., nb, ib32, l, grid1/grid2]
    b = qs[..., QK_K // 4:].astype(jnp.uint32).reshape(*qs.shape[:-1], 8, 4)
    aux = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)  # [..., nb, 8]
    db = _half_db(_d(a)[..., None], aux >> 28, 0.5)
    neg = _ksigns(aux[..., None] >> (7 * np.arange(4))).reshape(idx.shape + (4,))  # bits j, j+4
    grid = _grid("iq3xxs", idx)  # [..., nb, 8, 4, 2, 4]
    return _flat(_signed(db[..., None, None], grid, neg), 4)


def _iq3_s_dequantize(a: dict[str, jax.Array]) -> jax.Array:
    qs = a["qs"].astype(jnp.int32)  # one index per 4 weights
    g = np.arange(QK_K // 4)
    idx = qs | (((a["qh"][..., g // 8].astype(jnp.int32) >> (g % 8)) & 1) << 8)
    ib32 = np.arange(QK_K // 32)
    db = mul(_d(a)[..., None], (1 + 2 * ((a["scales"][..., ib32 // 2] >> (4 * (ib32 % 2))) & 0xF)).astype(F32))
    neg = _sign_bits(a["signs"]).reshape(*idx.shape[:-1], 8, 8, 4)  # [..., nb, ib32, 8 groups, 4]
    grid = _grid("iq3s", idx).reshape(neg.shape)
    return _flat(_signed(db[..., None], grid, neg), 3)


def _iq1_values(dl: jax.Array, idx: jax.Array, negative_delta: jax.Array) -> jax.Array:
    """``dl * (grid[j] + delta)`` with delta = -+IQ1S_DELTA per group of 8."""
    delta = jnp.where(negative_delta, F32(-IQ1S_DELTA), F32(IQ1S_DELTA))
    return mul(dl[..., None], _grid("iq1s", idx) + delta[..., None])


def _iq1_s_dequantize(a: dict[str, jax.Array]) -> jax.Array:
    qh = a["qh"].astype(jnp.int32)  # [..., nb, 8]
    dl = mul(_d(a)[..., None], (2 * ((qh >> 12) & 7) + 1).astype(F32))
    l = np.arange(4)
    idx = a["qs"].astype(jnp.int32).reshape(*qh.shape, 4) | (((qh[..., None] >> (3 * l)) & 7) << 8)
    y = _iq1_values(dl[..., None], idx, (qh[..., None] & 0x8000) != 0)
    return _flat(y, 3)


def _iq1_m_dequantize(a: dict[str, jax.Array]) -> jax.Array:
    b = a["scales"].astype(jnp.uint16)
    sc = b[..., 0::2] | (b[..., 1::2] << 8)  # [..., nb, 4] as the C's uint16 view
    # the f16 super-block scale lives in the top nibbles of the four uint16
    bits = (sc[..., 0] >> 12) | ((sc[..., 1] >> 8) & 0x00F0) | ((sc[..., 2] >> 4) & 0x0F00) | (sc[..., 3] & 0xF000)
    d = jax.lax.bitcast_convert_type(bits, jnp.float16).astype(F32)
    f = np.arange(QK_K // 16)  # 3-bit sub-scale f covers groups 2f, 2f + 1
    dl = mul(d[..., None], (2 * ((sc[..., f // 4] >> (3 * (f % 4))) & 7) + 1).astype(F32))
    qh = a["qh"].astype(jnp.int32)[..., None] >> np.array([0, 4])  # [..., nb, 16, 2]: group 2k + n
    idx = a["qs"].astype(jnp.int32).reshape(qh.shape) | ((qh & 7) << 8)
    return _flat(_iq1_values(jnp.repeat(dl, 2, axis=-1).reshape(qh.shape), idx, (qh & 8) != 0), 3)


def _quantizer(name: str, fields: tuple[Field, ...]):
    """``quantize_rows`` of a lattice format: llama.cpp's search on the host, one call per chunk."""
    def quantize_rows(x: jax.Array, qw: jax.Array | None) -> dict[str, jax.Array]:
        if qw is None and name in ggml_iq_search.REQUIRES_IMATRIX:
            raise QuantizeInputError(
                f"{name} needs importance weights: llama.cpp refuses to quantize it without an imatrix "
                "(ggml_quantize_requires_imatrix); pass weights= (jaxquant imatrix makes them)")
        r, nb = x.shape[0], x.shape[1] // QK_K
        shapes = {f.name: jax.ShapeDtypeStruct((r, nb, f.count) if f.count > 1 else (r, nb), f.dtype)
                  for f in fields}

        def host(x, *qw):
            out = ggml_iq_search.quantize(name, np.asarray(x), np.asarray(qw[0]) if qw else None)
            return {k: v.reshape(shapes[k].shape) for k, v in out.items()}

        return jax.pure_callback(host, shapes, x, *(() if qw is None else (qw,)))
    return quantize_rows


def _lattice(name: str, fields: tuple[Field, ...], dequantize) -> Format:
    return register(Format(name, QK_K, fields, dequantize, _quantizer(name, fields), "ggml_iq_lattice"))


_D = Field("d", "float16")
IQ2_XXS = _lattice("IQ2_XXS", (_D, Field("qs", "uint16", QK_K // 8)), _iq2_xxs_dequantize)
IQ2_XS = _lattice("IQ2_XS", (_D, Field("qs", "uint16", QK_K // 8), Field("scales", "uint8", QK_K // 32)),
                  _iq2_xs_dequantize)
IQ2_S = _lattice("IQ2_S", (_D, Field("qs", "uint8", QK_K // 4), Field("qh", "uint8", QK_K // 32),
                           Field("scales", "uint8", QK_K // 32)), _iq2_s_dequantize)
IQ3_XXS = _lattice("IQ3_XXS", (_D, Field("qs", "uint8", 3 * QK_K // 8)), _iq3_xxs_dequantize)
IQ3_S = _lattice("IQ3_S", (_D, Field("qs", "uint8", QK_K // 4), Field("qh", "uint8", QK_K // 32),
                           Field("signs", "uint8", QK_K // 8), Field("scales", "uint8", QK_K // 64)),
                 _iq3_s_dequantize)
IQ1_S = _lattice("IQ1_S", (_D, Field("qs", "uint8", QK_K // 8), Field("qh", "uint16", QK_K // 32)),
                 _iq1_s_dequantize)
IQ1_M = _lattice("IQ1_M", (Field("qs", "uint8", QK_K // 8), Field("qh", "uint8", QK_K // 16),
                           Field("scales", "uint8", QK_K // 32)), _iq1_m_dequantize)
