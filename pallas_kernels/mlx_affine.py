"""Kernel decoders of MLX's affine formats with 4 and 8 bits: AFQ4_G{32,64,128}, AFQ8_G{32,64,128}.

Codes are a little-endian bit stream in uint32 words (8 nibbles or 4 bytes a word). A part of 128
weights spans 1, 2 or 4 groups. With 4 (groups of 32), lane slot ``c`` decodes group ``c`` and its
scale and bias come from one load, as in Q4_1. With 1 or 2, slot ``c`` decodes the ``c``-th quarter
of each group's words, so each packed-pair tensor has one scale and one bias a row: choosing between
two groups' values per slot made Triton route them through shared memory. AFQ4 pair ``p`` of a word holds the nibbles
at bits ``4p`` and ``16 + 4p`` (elements ``p`` and ``p + 4``), AFQ8 pair ``p`` bytes ``p`` and
``p + 2``; one mask-and-or makes ``1024 + q`` of both (``halfpack``), one fused multiply-add
``q * scale + bias`` the weights.
"""

from __future__ import annotations

import jax
import numpy as np

from pallas_kernels.halfpack import MAGIC2, U32, dup, f16_bits, splat, sub_fma
from pallas_kernels.tile import Decoder, Loader

PART = 128  # weights a part
ONE = dup(f16_bits(1024))


def _decoder(bits: int, group: int) -> Decoder:
    per_word = 32 // bits  # codes a word
    groups = PART // group  # groups a part
    words = group // per_word  # words a group
    pairs = per_word // 2  # pairs a word
    mask = (1 << bits) - 1
    by_slot = groups == 4  # slot c decodes group c: its scales are one [BN, 4] load, as Q4_1's

    def pairs_of(w: jax.Array, s: jax.Array, b: jax.Array, interpret: bool) -> list[jax.Array]:
        return [sub_fma((w >> U32(bits * p)) & U32(mask | mask << 16) | U32(MAGIC2), ONE, s, b, interpret)
                for p in range(pairs)]

    def decode(ld: Loader, bb: int, interpret: bool) -> list[list[jax.Array]]:
        out = []
        for q in range(bb // groups):
            if by_slot:
                w = ld("q", PART // per_word * q, 1, PART // per_word).reshape(-1, 4, words)
                s, b = (splat(ld(name, 4 * q, 1, 4))[:, :, None] for name in ("scales", "biases"))
                out.append(pairs_of(w, s, b, interpret))
                continue
            part = []  # 1 or 2 groups: a quarter of each group's words a slot, one scale a pair tensor
            for g in range(groups * q, groups * (q + 1)):
                w = ld("q", words * g, 1, words).reshape(-1, 4, words // 4)
                s, b = (splat(ld(name, g, 1, 1))[:, :, None] for name in ("scales", "biases"))
                part += pairs_of(w, s, b, interpret)
            out.append(part)
        return out

    def elems(bb: int) -> np.ndarray:
        if by_slot:
            q, c, u, p, e = np.meshgrid(*(np.arange(n) for n in (bb // 4, 4, words, pairs, 2)), indexing="ij")
            return PART * q + group * c + per_word * u + p + pairs * e
        units = words // 4
        q, c, u, g, p, e = np.meshgrid(*(np.arange(n) for n in (bb // groups, 4, units, groups, pairs, 2)),
                                       indexing="ij")
        el = PART * q + group * g + per_word * (units * c + u) + p + pairs * e
        return el.reshape(*el.shape[:3], groups * pairs, 2)

    return Decoder(f"AFQ{bits}_G{group}", group, decode, elems, min_blocks=groups)


DECODERS = tuple(_decoder(bits, group) for bits in (4, 8) for group in (32, 64, 128))
