"""Kernel decoders of the formats whose codes are a little-endian bit stream in uint32 words (8
nibbles or 4 bytes a word) with two values per group of 32, 64 or 128 along the row:
- MLX affine, AFQ{4,8}_G{g}: ``q * scale + bias``;
- HQQ along rows, HQQ{4,8}_G{g}: ``(q - zero) * scale`` with a float16 zero;
- GPTQ/AWQ, GPTQ{4,8}_G{g}: ``(q - zero) * scale`` with an integer zero.

A part of 128 weights spans 1, 2 or 4 groups.
- With 4 (groups of 32), lane slot ``c`` decodes group ``c``; its two values come from one load,
  as in Q4_1.
- With 1 or 2 groups, slot ``c`` decodes the ``c``-th quarter of each group's words, so each
  packed-pair tensor has one scale and one offset a row. Choosing between two groups' values per
  slot made Triton route them through shared memory.

Pairs and arithmetic:
- A 4-bit pair ``p`` of a word holds the nibbles at bits ``4p`` and ``16 + 4p`` (elements ``p``
  and ``p + 4``); an 8-bit pair ``p`` holds bytes ``p`` and ``p + 2``.
- One mask-and-or makes ``1024 + q`` of both (``halfpack``). Then AFQ takes one fused multiply-add,
  HQQ two subtractions and a product, GPTQ one subtraction of ``1024 + zero`` (exact for its integer
  zero) and a product: float16, as the reference libraries round them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.halfpack import MAGIC2, U32, splat, sub2_mul, sub_fma, sub_mul
from pallas_kernels.tile import Decoder, Loader

PART = 128  # weights a part


def _affine(t, s, b, interpret):
    return sub_fma(t, MAGIC2, s, b, interpret)


def _zero_point(t, s, z, interpret):
    return sub2_mul(t, MAGIC2, z, s, interpret)


def _int_zero_point(t, s, z, interpret):  # z packed as 1024 + zero: exact for an integer zero
    return sub_mul(t, z, s, interpret)


def _as_is(v: jax.Array) -> jax.Array:
    return v


def _plus_1024(z: jax.Array) -> jax.Array:
    return z.astype(jnp.float32) + 1024


# family -> (name prefix, code field, scale field, offset field, offset before packing, arithmetic)
FAMILIES = {"afq": ("AFQ", "q", "scales", "biases", _as_is, _affine),
            "hqq": ("HQQ", "q", "scale", "zero", _as_is, _zero_point),
            "gptq": ("GPTQ", "qs", "scale", "zero", _plus_1024, _int_zero_point)}


def _decoder(family: str, bits: int, group: int) -> Decoder:
    prefix, code, scale, offset, prep, apply = FAMILIES[family]
    per_word = 32 // bits  # codes a word
    groups = PART // group  # groups a part
    words = group // per_word  # words a group
    pairs = per_word // 2  # pairs a word
    mask = (1 << bits) - 1
    by_slot = groups == 4  # slot c decodes group c: its scales are one [BN, 4] load, as Q4_1's

    def pairs_of(w: jax.Array, s: jax.Array, o: jax.Array, interpret: bool) -> list[jax.Array]:
        return [apply((w >> U32(bits * p)) & U32(mask | mask << 16) | U32(MAGIC2), s, o, interpret)
                for p in range(pairs)]

    def decode(ld: Loader, bb: int, interpret: bool) -> list[list[jax.Array]]:
        out = []
        for q in range(bb // groups):
            if by_slot:
                w = ld(code, PART // per_word * q, 1, PART // per_word).reshape(-1, 4, words)
                s, o = splat(ld(scale, 4 * q, 1, 4))[:, :, None], splat(prep(ld(offset, 4 * q, 1, 4)))[:, :, None]
                out.append(pairs_of(w, s, o, interpret))
                continue
            part = []  # 1 or 2 groups: a quarter of each group's words a slot, one scale a pair tensor
            for g in range(groups * q, groups * (q + 1)):
                w = ld(code, words * g, 1, words).reshape(-1, 4, words // 4)
                s, o = splat(ld(scale, g, 1, 1))[:, :, None], splat(prep(ld(offset, g, 1, 1)))[:, :, None]
                part += pairs_of(w, s, o, interpret)
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

    return Decoder(f"{prefix}{bits}_G{group}", group, decode, elems, min_blocks=groups)


DECODERS = tuple(_decoder(f, bits, group) for f in FAMILIES for bits in (4, 8) for group in (32, 64, 128))
