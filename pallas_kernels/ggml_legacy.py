"""Kernel decoders of llama.cpp's 32-element formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

A part is 4 blocks, lane slot ``c`` decoding block ``c``; a unit is one uint32 word of ``qs``.
Nibble formats: pair ``p`` of a word holds the nibbles at bits ``4p`` and ``16 + 4p`` (bytes
``p // 2`` and ``p // 2 + 2``; low nibble -> element ``byte``, high -> ``byte + 16``), turned into
``1024 + q`` by one mask-and-or (``halfpack``). Q8_0: pair ``p`` holds bytes ``p`` and ``p + 2``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.halfpack import MAGIC2, OFFSET2, U32, dup, f16_bits, int8_pairs, splat, sub_fma, sub_mul
from pallas_kernels.tile import Decoder, Loader

QK = 32
PART = 4  # blocks a part


def per_block(ld: Loader, name: str, part: int, units: int) -> jax.Array:
    """Part ``part``'s per-block float16 field as packed pairs over each block's ``units``:
    ``[BN, 4, units]`` (slot = block)."""
    v = splat(ld(name, PART * part, 1, PART))[:, :, None]
    return jnp.broadcast_to(v, (*v.shape[:2], units))


def _nibble_pairs(ld: Loader, part: int, high_bits: bool) -> list[jax.Array]:
    """``1024 + q`` for the 4 nibble pairs of every word (``q`` 5 bits with ``qh``)."""
    w = ld("qs", 4 * PART * part, 1, 4 * PART).reshape(-1, 4, 4)  # slot c: the 4 words of block c
    if high_bits:  # the block's qh, shifted once per word t so that bit 4t + j lands at bit j
        qh = ld("qh", PART * part, 1, PART)[:, :, None] >> (U32(4) * jnp.arange(4, dtype=U32))
    out = []
    for p in range(4):
        t = (w >> U32(4 * p)) & U32(0x000F000F) | U32(MAGIC2)
        if high_bits:  # bits el, el + 2 of qh (this pair's elements) -> 4, 20
            y = (qh >> U32(p // 2 + 16 * (p % 2))) & U32(5)
            t = t | (y * U32(0x40010)) & U32(0x00100010)
        out.append(t)
    return out


def _parts(bb: int) -> range:
    return range(bb // PART)


def _nibble_elems(bb: int) -> np.ndarray:
    q, c, t, p, e = np.meshgrid(*(np.arange(n) for n in (bb // PART, 4, 4, 4, 2)), indexing="ij")
    return QK * (PART * q + c) + 4 * t + p // 2 + 2 * e + 16 * (p % 2)


def _symmetric(offset: int, high_bits: bool):
    """``(q - offset) * d``: Q4_0 (8), Q5_0 (16)."""
    def decode(ld: Loader, bb: int, interpret: bool) -> list[list[jax.Array]]:
        c = dup(f16_bits(1024 + offset))
        return [[sub_mul(t, c, per_block(ld, "d", q, 4), interpret) for t in _nibble_pairs(ld, q, high_bits)]
                for q in _parts(bb)]
    return decode


def _with_min(high_bits: bool):
    """``q * d + m``: Q4_1, Q5_1."""
    def decode(ld: Loader, bb: int, interpret: bool) -> list[list[jax.Array]]:
        return [[sub_fma(t, MAGIC2, per_block(ld, "d", q, 4), per_block(ld, "m", q, 4), interpret)
                 for t in _nibble_pairs(ld, q, high_bits)] for q in _parts(bb)]
    return decode


def _q8_0(ld: Loader, bb: int, interpret: bool) -> list[list[jax.Array]]:
    out = []
    for q in _parts(bb):
        w = ld("qs", 8 * PART * q, 1, 8 * PART).reshape(-1, 4, 8)  # slot c: the 8 words of block c
        d = per_block(ld, "d", q, 8)
        out.append([sub_mul(t, OFFSET2, d, interpret) for t in int8_pairs(w)])
    return out


def byte_pair_elems(parts: int) -> np.ndarray:
    """Elements of ``parts`` parts of 128 bytes, slot ``c`` decoding words ``8c ..`` and pair ``p``
    of a word bytes ``p`` and ``p + 2`` (Q8_0, and INT8 and FP8 codes)."""
    q, c, t, p, e = np.meshgrid(*(np.arange(n) for n in (parts, 4, 8, 2, 2)), indexing="ij")
    return 128 * q + 32 * c + 4 * t + p + 2 * e


DECODERS = (
    Decoder("Q4_0", QK, _symmetric(8, False), _nibble_elems, ("qs",), min_blocks=PART),
    Decoder("Q4_1", QK, _with_min(False), _nibble_elems, ("qs",), min_blocks=PART),
    Decoder("Q5_0", QK, _symmetric(16, True), _nibble_elems, ("qs", "qh"), min_blocks=PART),
    Decoder("Q5_1", QK, _with_min(True), _nibble_elems, ("qs", "qh"), min_blocks=PART),
    Decoder("Q8_0", QK, _q8_0, lambda bb: byte_pair_elems(bb // PART), ("qs",), min_blocks=PART),
)
