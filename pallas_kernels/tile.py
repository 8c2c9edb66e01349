"""Weight tiles decoded straight into the tensor cores' register layout.

A kernel step multiplies a ``[BN, BK]`` float16 weight tile (the A operand, in registers) by the
activations. In the MMA's A-operand fragment (``mma.sync`` m16n8k16 and Hopper's ``wgmma`` alike)
the thread in lane slot ``c = lane % 4`` holds, in every 8 columns, the pair ``2c, 2c + 1``. The
weights' order along K inside a tile is ours to choose, so long as the activations are permuted the
same way once (``activation_perm``). So each lane slot decodes a quarter of a part's packed words,
contiguous in memory, and every pair of float16 values it makes lands in one fragment register: no
shuffles, no shared-memory round trip for the weights.

A format's ``Decoder`` returns, for one step, its weights in parts of 128 (one tile and one MMA
each, so that only one part's fragment is live in registers): per part ``P`` uint32 tensors
``[BN, 4, U]`` of packed half2 pairs (``halfpack``): axis 1 is the lane slot, ``U`` the units of a
slot, ``P`` a power of two. ``elems[part, c, u, p, e]`` says which weight of the step (0 .. BK-1, in
the format's element order) half ``e`` of pair ``p`` of unit ``u`` holds.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from jaxquant.errors import JaxquantError
from jaxquant.qtensor import QTensor
from pallas_kernels.halfpack import halves

# ld(field, start=0, stride=1, size=None) -> the field's step tile [BN, count * bb] (bytes regrouped
# as uint32 words where the decoder's ``words`` says so), or a strided part of it (``step_loader``).
Loader = Callable[..., jax.Array]


class Scaled(NamedTuple):
    """A part whose product (or dequantized tile) a float32 factor multiplies, ``[BN, 1]`` or
    ``[1, 1]``: for scales float16 cannot hold exactly (FP8 block scales)."""

    pairs: list[jax.Array]
    scale: jax.Array


@dataclasses.dataclass(frozen=True)
class Decoder:
    """A block format's kernel view.

    ``decode(ld, bb, interpret)`` -> per part of 128 weights, ``P`` packed-pair tensors
    ``[BN, 4, U]`` (or a ``Scaled`` of them), for a step of ``bb`` blocks; ``elems(bb)`` -> int
    array ``[parts, 4, U, P, 2]`` of the weights they hold; ``words`` names the byte fields read as
    little-endian uint32 words; ``min_blocks`` is the smallest step; ``out_scale(arrays)`` -> one
    value per tensor or per row that multiplies the output instead of the weights, made from the
    fields in ``out_fields`` (which the kernel does not read); ``row_groups`` pairs a field with the
    weight rows each of its rows covers (FP8_B128's scale: 128).
    """

    fmt: str
    block_size: int
    decode: Callable[[Loader, int, bool], list[list[jax.Array]]]
    elems: Callable[[int], np.ndarray]
    words: tuple[str, ...] = ()
    min_blocks: int = 1
    out_scale: Callable[[dict[str, jax.Array]], jax.Array] | None = None
    out_fields: tuple[str, ...] = ()
    row_groups: tuple[tuple[str, int], ...] = ()

    def view(self, name: str, a: jax.Array) -> jax.Array:
        """A field array ``(N, nb[, count])`` as the kernel reads it: ``(N, nb * count)``, byte
        fields in ``words`` as uint32 (free XLA bitcasts and reshapes)."""
        a = a.reshape(a.shape[0], -1)
        if name in self.words:
            a = jax.lax.bitcast_convert_type(a.reshape(a.shape[0], -1, 4), jnp.uint32)
        return a


def stack(parts: list[jax.Array]) -> jax.Array:
    """``jnp.stack(parts, -1)`` for ``2**k`` parts, as Triton joins: two at a time."""
    n = len(parts)
    k = n.bit_length() - 1
    if n != 1 << k:
        raise ValueError(f"stack needs a power of two of parts, got {n}")
    while len(parts) > 1:
        parts = [jnp.stack([parts[i], parts[i + 1]], axis=-1) for i in range(0, len(parts), 2)]
    out = parts[0]  # trailing axes: part index bit 0, bit 1, ...
    if k > 1:
        nd = out.ndim
        out = jnp.transpose(out, (*range(nd - k), *range(nd - 1, nd - k - 1, -1)))
    return out.reshape(*out.shape[:out.ndim - k], n)


def fragment_tile(pairs: list[jax.Array]) -> jax.Array:
    """Packed pairs ``[BN, 4, U]`` x P -> the float16 tile ``[BN, U * P * 8]`` in fragment order:
    column ``8 w + 2 c + e`` holds value ``e`` of slot ``c``'s pair ``w = u * P + p``."""
    bn, _, u = pairs[0].shape
    p, k = len(pairs), len(pairs).bit_length() - 1
    t = stack([jnp.stack(halves(v), axis=-1) for v in pairs])  # [BN, 4, U, 2(e), P]
    t = t.reshape(bn, 4, u, 2, *(2,) * k)  # P as bits, high first
    t = jnp.transpose(t, (0, 2, *range(4, 4 + k), 1, 3))  # [BN, U, p bits, c, e]
    return t.reshape(bn, u * p * 8)


def step_tiles(dec: Decoder, ld: Loader, bb: int, interpret: bool) -> list[tuple[jax.Array, jax.Array | None]]:
    """A step's parts as (float16 tile ``[BN, 128]`` in fragment order, float32 factor or None)."""
    out = []
    for part in dec.decode(ld, bb, interpret):
        pairs, scale = (part.pairs, part.scale) if isinstance(part, Scaled) else (part, None)
        out.append((fragment_tile(pairs), scale))
    return out


@functools.cache
def activation_perm(dec: Decoder, bb: int) -> np.ndarray:
    """``perm[col]``: the weight (index within the step's ``bb * block_size``) at tile column
    ``col``; the activations are gathered with it once, outside the kernel."""
    el = dec.elems(bb)  # [parts, 4, U, P, 2]
    parts, _, u, p, _ = el.shape
    q, c, uu, pp, e = np.meshgrid(*(np.arange(n) for n in (parts, 4, u, p, 2)), indexing="ij")
    col = 8 * u * p * q + 8 * (uu * p + pp) + 2 * c + e  # parts one after the other
    perm = np.full(bb * dec.block_size, -1, np.int64)
    perm[col.ravel()] = el.ravel()
    if sorted(perm.tolist()) != list(range(bb * dec.block_size)):
        raise AssertionError(f"{dec.fmt}: decoder elements do not cover the step's {bb * dec.block_size} weights once")
    return perm


def field_arrays(dec: Decoder, w: QTensor) -> tuple[tuple[str, ...], list[jax.Array]]:
    """The QTensor's fields as the kernels read them, each ``(N, nb * count)``."""
    names = tuple(sorted(n for n in w.arrays if n not in dec.out_fields))
    return names, [dec.view(name, w.arrays[name]) for name in names]


def field_spec(dec: Decoder, name: str, a: jax.Array, block_n: int, parts: int, index) -> pl.BlockSpec:
    """A field's BlockSpec: ``block_n`` rows (or the one row of a ``row_groups`` field that covers
    them) and ``1 / parts`` of its columns; ``index(*grid)`` -> (row block, column block)."""
    rows = dict(dec.row_groups).get(name, 1)
    if rows == 1:
        return pl.BlockSpec((block_n, a.shape[1] // parts), index)
    if rows % block_n:
        raise JaxquantError(f"{dec.fmt}: programs of {block_n} rows straddle the {rows}-row groups of {name!r}")
    return pl.BlockSpec((1, a.shape[1] // parts), lambda *g: (index(*g)[0] * block_n // rows, index(*g)[1]))


def output_scale(dec: Decoder, w: QTensor) -> jax.Array | float:
    """What the ``[M, N]`` product is multiplied by (one value, or one per row)."""
    return 1.0 if dec.out_scale is None else jnp.reshape(dec.out_scale(w.arrays), (-1,))


def step_loader(refs: dict, i, steps: int) -> Loader:
    """``ld(name, start=0, stride=1, size=None)``: step ``i`` of a field ref ``(BN, steps * per)``,
    or ``size`` of its elements from ``start``, every ``stride``-th (one word of several per block)."""
    def ld(name: str, start: int = 0, stride: int = 1, size: int | None = None) -> jax.Array:
        r = refs[name]
        per = r.shape[1] // steps
        base = pl.multiple_of(i * per, per) if steps > 1 else 0
        size = size or (per - start + stride - 1) // stride
        return r[:, pl.ds(base + start, size, stride)] if stride > 1 else r[:, pl.ds(base + start, size)]
    return ld


def prepare_activations(x: jax.Array, dec: Decoder, bb: int, rows: int) -> tuple[jax.Array, jax.Array]:
    """``x [M, K]`` -> (float16 ``[rows, K]``, zero-padded rows, columns in tile order; ``[M, 1]``
    power-of-two factors to multiply the product by). Rows whose magnitude passes 2**15 are scaled
    down first, so float16 cannot overflow; NaN and inf propagate."""
    m, k = x.shape
    bk = bb * dec.block_size
    idx = (np.arange(k // bk)[:, None] * bk + activation_perm(dec, bb)[None]).reshape(-1)
    x = x.astype(jnp.float32)
    e = jnp.maximum(jnp.ceil(jnp.log2(jnp.max(jnp.abs(x), axis=1, keepdims=True))) - 15, 0)
    xs = jnp.take(x * jnp.exp2(-e), idx, axis=1)
    return jnp.pad(xs, ((0, rows - m), (0, 0))).astype(jnp.float16), jnp.exp2(e)
