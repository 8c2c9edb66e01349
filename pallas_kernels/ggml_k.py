"""Kernel views of llama.cpp's 256-element K-quants: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

Quant bytes are read as uint32 words; byte ``l`` of a 32-byte group is byte ``l % 4`` of word
``l // 4``, so a term takes one bit field from each of ``c`` consecutive words, and every term
stays inside one sub-block (one scale). Scales are unpacked per (row, block), not per weight.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.unpack import BlockSpec, Loader, Term, bits_f32, u_to_f32, with_high_bits

F32 = jnp.float32


def _byte(words: list, i: int):
    """Byte ``i`` of a little-endian word list, as uint32 (per row and block)."""
    return (words[i // 4] >> jnp.uint32(8 * (i % 4))) & jnp.uint32(0xFF)


def _elems(first: int, count: int) -> tuple[int, ...]:
    return tuple(first + 4 * t for t in range(count))


def _q2_k_terms(ld: Loader) -> list[Term]:
    d, dmin = ld("d").astype(F32), ld("dmin").astype(F32)
    terms = []
    for half in range(2):
        for k in range(2):
            w = ld("qs", slice(8 * half + 4 * k, 8 * half + 4 * k + 4))  # bytes 32 half + 16 k + l
            for j in range(4):
                sc = ld("scales", 8 * half + 2 * j + k).astype(jnp.uint32)
                scale, offset = d * u_to_f32(sc & jnp.uint32(0xF)), -dmin * u_to_f32(sc >> jnp.uint32(4))
                for u in range(4):
                    q, s = bits_f32(w, 8 * u + 2 * j, 2)
                    terms.append(Term(q, scale, offset, _elems(128 * half + 32 * j + 16 * k + u, 4), s))
    return terms


def _q3_k_scales(ld: Loader, d) -> list:
    """The 16 sub-block scales ``d * (ls - 32)`` of ggml's 6-bit packing (12 bytes)."""
    words = [ld("scales", i) for i in range(3)]
    out = []
    for k in range(16):
        lo = (_byte(words, k % 8) >> jnp.uint32(4 * (k // 8))) & jnp.uint32(0xF)
        hi = (_byte(words, 8 + k % 4) >> jnp.uint32(2 * (k // 4))) & jnp.uint32(3)
        out.append(d * (u_to_f32(lo | (hi << jnp.uint32(4))) - 32))
    return out


def _q3_k_terms(ld: Loader) -> list[Term]:
    d = ld("d").astype(F32)
    scales = _q3_k_scales(ld, d)
    offsets = [-4 * s for s in scales]
    terms = []
    for half in range(2):
        for tt in range(2):  # words 4tt..4tt+3 of a 32-byte group: sub-block 2j + tt
            qs = ld("qs", slice(8 * half + 4 * tt, 8 * half + 4 * tt + 4))
            hm = ld("hmask", slice(4 * tt, 4 * tt + 4))
            for j in range(4):
                sb = 8 * half + 2 * j + tt
                for u in range(4):
                    q, s = with_high_bits(qs, 8 * u + 2 * j, 2, hm, 8 * u + 4 * half + j, 1)
                    terms.append(Term(q, scales[sb], offsets[sb], _elems(128 * half + 32 * j + 16 * tt + u, 4), s))
    return terms


def _k4_scales(ld: Loader) -> list[tuple]:
    """``get_scale_min_k4`` for the 8 sub-blocks: (d * sc, -dmin * m) each."""
    d, dmin = ld("d").astype(F32), ld("dmin").astype(F32)
    words = [ld("scales", i) for i in range(3)]
    out = []
    for j in range(8):
        if j < 4:
            sc, m = _byte(words, j) & jnp.uint32(63), _byte(words, j + 4) & jnp.uint32(63)
        else:
            sc = (_byte(words, j + 4) & jnp.uint32(0xF)) | ((_byte(words, j - 4) >> jnp.uint32(6)) << jnp.uint32(4))
            m = (_byte(words, j + 4) >> jnp.uint32(4)) | ((_byte(words, j) >> jnp.uint32(6)) << jnp.uint32(4))
        out.append((d * u_to_f32(sc), -dmin * u_to_f32(m)))
    return out


def _q45_k_terms(ld: Loader, high_bit: bool) -> list[Term]:
    scales = _k4_scales(ld)
    qh = ld("qh") if high_bit else None  # [BN, BB, 8]: byte l of qh holds bit j of sub-block j
    terms = []
    for j in range(4):  # 64 elements: low nibbles -> sub-block 2j, high nibbles -> 2j + 1
        w = ld("qs", slice(8 * j, 8 * j + 8))
        for p in range(8):
            u, hi = p // 2, p % 2
            if high_bit:
                q, s = with_high_bits(w, 4 * p, 4, qh, 8 * u + 2 * j + hi, 1)
            else:
                q, s = bits_f32(w, 4 * p, 4)
            scale, offset = scales[2 * j + hi]
            terms.append(Term(q, scale, offset, _elems(64 * j + 32 * hi + u, 8), s))
    return terms


def _q6_k_terms(ld: Loader) -> list[Term]:
    d = ld("d").astype(F32)
    scales = [d * ld("scales", i).astype(F32) for i in range(16)]
    offsets = [-32 * s for s in scales]
    terms = []
    for half in range(2):
        for tt in range(2):  # words 4tt..4tt+3 of each 32-byte group: sub-block + tt
            qh = ld("qh", slice(8 * half + 4 * tt, 8 * half + 4 * tt + 4))
            for g in range(2):  # ql bytes 64 half + 32 g + l
                ql = ld("ql", slice(16 * half + 8 * g + 4 * tt, 16 * half + 8 * g + 4 * tt + 4))
                for hi in range(2):
                    sb = 8 * half + 2 * g + 4 * hi + tt
                    for u in range(4):
                        q, s = with_high_bits(ql, 8 * u + 4 * hi, 4, qh, 8 * u + 2 * (g + 2 * hi), 2)
                        first = 128 * half + 32 * g + 64 * hi + 16 * tt + u
                        terms.append(Term(q, scales[sb], offsets[sb], _elems(first, 4), s))
    return terms


SPECS = (
    BlockSpec("Q2_K", 256, _q2_k_terms, (("qs", "u32"),)),
    BlockSpec("Q3_K", 256, _q3_k_terms, (("qs", "u32"), ("hmask", "u32"), ("scales", "u32"))),
    BlockSpec("Q4_K", 256, lambda ld: _q45_k_terms(ld, False), (("qs", "u32"), ("scales", "u32"))),
    BlockSpec("Q5_K", 256, lambda ld: _q45_k_terms(ld, True), (("qs", "u32"), ("qh", "u32"), ("scales", "u32"))),
    BlockSpec("Q6_K", 256, _q6_k_terms, (("ql", "u32"), ("qh", "u32"))),
)
