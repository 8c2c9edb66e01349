"""Kernel decoders of llama.cpp's 32-element formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

A step of ``bb`` blocks gives each lane slot ``bb / 4`` whole blocks; a unit is one uint32 word of
``qs``. Nibble formats: pair ``p`` of a word holds the nibbles at bits ``4p`` and ``16 + 4p`` (bytes
``p // 2`` and ``p // 2 + 2``; low nibble -> element ``byte``, high -> ``byte + 16``), turned into
``1024 + q`` by one mask-and-or (``halfpack``). Q8_0: pair ``p`` holds bytes ``p`` and ``p + 2``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.halfpack import MAGIC2, U32, dup, f16_bits, splat, sub_fma, sub_mul
from pallas_kernels.tile import Decoder, Loader

QK = 32


def per_block(ld: Loader, name: str, bb: int, units: int) -> jax.Array:
    """A per-block float16 field as packed pairs broadcast over each block's ``units`` words:
    ``[BN, 4, bb / 4 * units]``."""
    v = splat(ld(name)).reshape(-1, 4, bb // 4, 1)
    return jnp.broadcast_to(v, (v.shape[0], 4, bb // 4, units)).reshape(v.shape[0], 4, bb // 4 * units)


def _nibble_pairs(ld: Loader, bb: int, high_bits: bool) -> list[jax.Array]:
    """``1024 + q`` for the 4 nibble pairs of every word (``q`` 5 bits with ``qh``)."""
    w = ld("qs").reshape(-1, 4, bb)  # 4 words per block, bb / 4 blocks per slot
    if high_bits:  # the block's qh, shifted once per word t so that bit 4t + j lands at bit j
        qh = ld("qh").reshape(-1, 4, bb // 4, 1)
        qh = jnp.broadcast_to(qh, (qh.shape[0], 4, bb // 4, 4)).reshape(w.shape)
        qh = qh >> (U32(4) * (jnp.arange(bb, dtype=U32) % U32(4)))
    out = []
    for p in range(4):
        t = (w >> U32(4 * p)) & U32(0x000F000F) | U32(MAGIC2)
        if high_bits:  # bits el, el + 2 of qh (this pair's elements) -> 4, 20
            y = (qh >> U32(p // 2 + 16 * (p % 2))) & U32(5)
            t = t | (y * U32(0x40010)) & U32(0x00100010)
        out.append(t)
    return out


def _nibble_elems(bb: int) -> np.ndarray:
    c, u, p, e = np.meshgrid(np.arange(4), np.arange(bb), np.arange(4), np.arange(2), indexing="ij")
    block, word = c * (bb // 4) + u // 4, u % 4
    byte = 4 * word + p // 2 + 2 * e
    return QK * block + byte + 16 * (p % 2)


def _q4_0(ld: Loader, bb: int, interpret: bool) -> list[jax.Array]:
    d = per_block(ld, "d", bb, 4)
    return [sub_mul(t, dup(f16_bits(1032)), d, interpret) for t in _nibble_pairs(ld, bb, False)]


def _q5_0(ld: Loader, bb: int, interpret: bool) -> list[jax.Array]:
    d = per_block(ld, "d", bb, 4)
    return [sub_mul(t, dup(f16_bits(1040)), d, interpret) for t in _nibble_pairs(ld, bb, True)]


def _with_min(high_bits: bool):
    def decode(ld: Loader, bb: int, interpret: bool) -> list[jax.Array]:
        d, m = per_block(ld, "d", bb, 4), per_block(ld, "m", bb, 4)
        return [sub_fma(t, dup(f16_bits(1024)), d, m, interpret) for t in _nibble_pairs(ld, bb, high_bits)]
    return decode


def _q8_0(ld: Loader, bb: int, interpret: bool) -> list[jax.Array]:
    w = ld("qs").reshape(-1, 4, 2 * bb)  # 8 words per block
    d = per_block(ld, "d", bb, 8)
    # int8 b -> 1024 + (b + 128): the sign bit flipped inside the mask-and-or
    return [sub_mul((w >> U32(8 * p)) & U32(0x00FF00FF) ^ U32(MAGIC2 | 0x00800080), dup(f16_bits(1152)), d, interpret)
            for p in range(2)]


def _q8_0_elems(bb: int) -> np.ndarray:
    c, u, p, e = np.meshgrid(np.arange(4), np.arange(2 * bb), np.arange(2), np.arange(2), indexing="ij")
    block, word = c * (bb // 4) + u // 8, u % 8
    return QK * block + 4 * word + p + 2 * e


DECODERS = (
    Decoder("Q4_0", QK, _q4_0, _nibble_elems, ("qs",), min_blocks=4),
    Decoder("Q4_1", QK, _with_min(False), _nibble_elems, ("qs",), min_blocks=4),
    Decoder("Q5_0", QK, _q5_0, _nibble_elems, ("qs", "qh"), min_blocks=4),
    Decoder("Q5_1", QK, _with_min(True), _nibble_elems, ("qs", "qh"), min_blocks=4),
    Decoder("Q8_0", QK, _q8_0, _q8_0_elems, ("qs",), min_blocks=4),
)
