"""How a block format's packed tile becomes numbers a kernel can multiply: exact float terms.

A format's ``terms(ld)`` reads its fields through ``ld`` (tiles of ``BN`` rows x ``BB`` blocks)
and returns ``Term``s. Each term covers ``c`` elements of every block: ``q`` (``[BN, BB, c]``,
exact small integers times ``2**shift``), a per-(row, block) ``scale`` and optional ``offset``,
so that ``weight[n, b, elems[t]] = scale * q * 2**-shift + offset``. A term's elements are
``first + 4 t``: the GEMV reads its activations as one strided slice, and the tensor-core kernels
join the terms into a tile whose element order the activations are permuted to once, so no
kernel ever interleaves nibbles.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

MAGIC = 0x4B000000  # float32 2**23: its mantissa holds an integer field exactly
TWO23 = 8388608.0

# ld(field, idx=None): the field's tile [BN, BB] (scalar fields), [BN, BB, words], one word
# column [BN, BB] (int idx) or a power-of-two slice [BN, BB, n] (slice idx).
Loader = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Term:
    """``c`` weights of every block: ``scale * q * 2**-shift + offset`` (see module doc)."""

    q: jax.Array
    scale: jax.Array
    offset: jax.Array | None
    elems: tuple[int, ...]
    shift: int


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """A format's kernel view: fields as kernel dtypes plus its ``terms`` function.

    ``views`` maps a field to ``"u32"`` (bytes regrouped into little-endian uint32 words),
    or leaves it out (loaded with its own dtype).
    """

    fmt: str
    block_size: int
    terms: Callable[[Loader], list[Term]]
    views: tuple[tuple[str, str], ...] = ()

    def view(self, name: str, a: jax.Array) -> jax.Array:
        """A field array ``(N, nb[, count])`` as the kernel reads it (a free XLA bitcast)."""
        if dict(self.views).get(name) == "u32":
            a = lax.bitcast_convert_type(a.reshape(*a.shape[:-1], a.shape[-1] // 4, 4), jnp.uint32)
        return a

    @functools.cached_property
    def layout(self) -> tuple[np.ndarray, np.ndarray]:
        """``(elems [P, c], shift [P])`` of the terms, found by running ``terms`` on one zero block."""
        from jaxquant.formats import get_format

        fmt = get_format(self.fmt)
        zeros = {f.name: jnp.zeros((1, 1, f.count) if f.count > 1 else (1, 1), f.dtype) for f in fmt.fields}
        tiles = {k: self.view(k, v) for k, v in zeros.items()}
        terms = self.terms(_array_loader(tiles))
        elems = np.array([t.elems for t in terms], np.int32)
        if sorted(elems.ravel().tolist()) != list(range(self.block_size)):
            raise AssertionError(f"{self.fmt}: kernel terms do not cover each block element once")
        if elems.shape[1] > 1 and len({tuple(np.diff(e)) for e in elems} - {(4,) * (elems.shape[1] - 1)}):
            raise AssertionError(f"{self.fmt}: a term's elements must be first + 4 t (strided loads)")
        return elems, np.array([t.shift for t in terms], np.int32)


def _array_loader(tiles: dict[str, jax.Array]) -> Loader:
    def ld(name, idx=None):
        a = tiles[name]
        if idx is None:
            return a
        return a[..., idx]
    return ld


def field(w: jax.Array, pos: int, bits: int) -> tuple[jax.Array, int]:
    """Bits ``[pos, pos+bits)`` of uint32 ``w``, masked in place: ``(value << shift, shift)``.

    Fields that reach past bit 22 are first shifted down, by the same amount for every high
    field of a word so the compiler shares that shift, to stay inside a float's mantissa.
    """
    if pos + bits > 23:
        sh = 12 if bits <= 4 else 16
        w, pos = w >> jnp.uint32(sh), pos - sh
    return w & jnp.uint32(((1 << bits) - 1) << pos), pos


def move(v: jax.Array, src: int, dst: int) -> jax.Array:
    """``v`` (an in-place field at bit ``src``) moved to bit ``dst``."""
    return v << jnp.uint32(dst - src) if dst >= src else v >> jnp.uint32(src - dst)


def as_f32(v: jax.Array) -> jax.Array:
    """Exact float32 of a uint32 below 2**23.

    OR-ing it into the mantissa of 2**23 and subtracting 2**23 costs one logic op (merged with
    the field mask) and one add, where an int->float convert runs at a quarter of the FMA rate.
    """
    return lax.bitcast_convert_type(v | jnp.uint32(MAGIC), jnp.float32) - jnp.float32(TWO23)


def bits_f32(w: jax.Array, pos: int, bits: int) -> tuple[jax.Array, int]:
    """Bits ``[pos, pos+bits)`` of uint32 ``w`` as an exact float32 ``value * 2**shift``."""
    v, s = field(w, pos, bits)
    return as_f32(v), s


def with_high_bits(lo: jax.Array, lo_pos: int, lo_bits: int, hi: jax.Array, hi_pos: int, hi_bits: int
                   ) -> tuple[jax.Array, int]:
    """``lo_field | hi_field << lo_bits`` of two uint32 words as an exact float32 (Q5/Q6/Q3)."""
    v, s = field(lo, lo_pos, lo_bits)
    h, hs = field(hi, hi_pos, hi_bits)
    return as_f32(v | move(h, hs, s + lo_bits)), s


def u_to_f32(v: jax.Array) -> jax.Array:
    """Small unsigned ints (per row and block, not per weight) -> float32."""
    return v.astype(jnp.int32).astype(jnp.float32)


def lookup16(v: jax.Array, table) -> jax.Array:
    """``table[v]`` for uint32 ``v`` in [0, 16) and 16 byte values, without a gather.

    The table sits in four uint32 constants: two selects pick the word, a shift the byte.
    """
    t = [int(b) & 0xFF for b in table]
    words = [jnp.uint32(sum(t[4 * k + i] << (8 * i) for i in range(4))) for k in range(4)]
    b2 = (v & jnp.uint32(4)) != 0
    word = jnp.where((v & jnp.uint32(8)) != 0, jnp.where(b2, words[3], words[2]), jnp.where(b2, words[1], words[0]))
    return (word >> ((v & jnp.uint32(3)) << jnp.uint32(3))) & jnp.uint32(0xFF)
