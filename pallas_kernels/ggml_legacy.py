"""Kernel views of llama.cpp's 32-element formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

``qs`` is read as 4 (8 for Q8_0) uint32 words per block. Nibble ``p`` of word ``t`` is byte
``p // 2`` of that word, low (element ``4t + p//2``) or high (element ``16 + 4t + p//2``).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.unpack import BlockSpec, Loader, Term, as_f32, bits_f32, field, move

F32 = jnp.float32


def _nibble_elems(p: int) -> tuple[int, ...]:
    return tuple(4 * t + p // 2 + 16 * (p % 2) for t in range(4))


def _nibble_terms(ld: Loader, offset_of, high_bit: bool) -> list[Term]:
    """Q4_0/Q4_1/Q5_0/Q5_1: ``d * q + offset`` with q a nibble (plus bit 4 from ``qh``)."""
    w, d = ld("qs"), ld("d").astype(F32)
    offset = offset_of(d)
    terms = []
    for p in range(8):
        elems = _nibble_elems(p)
        if high_bit:  # bit e of the 32-bit qh holds bit 4 of element e
            v, s = field(w, 4 * p, 4)
            qh = ld("qh", 0)[..., None] >> (lax.broadcasted_iota(jnp.uint32, (1, 1, 4), 2) * 4 + elems[0])
            q = as_f32(v | move(qh & jnp.uint32(1), 0, s + 4))
        else:
            q, s = bits_f32(w, 4 * p, 4)
        terms.append(Term(q, d, offset, elems, s))
    return terms


def _q8_0_terms(ld: Loader) -> list[Term]:
    w = ld("qs") ^ jnp.uint32(0x80808080)  # int8 b -> unsigned b + 128
    d = ld("d").astype(F32)
    offset = -128 * d
    terms = []
    for u in range(4):
        q, s = bits_f32(w, 8 * u, 8)
        terms.append(Term(q, d, offset, tuple(4 * t + u for t in range(8)), s))
    return terms


SPECS = (
    BlockSpec("Q4_0", 32, lambda ld: _nibble_terms(ld, lambda d: -8 * d, False), (("qs", "u32"),)),
    BlockSpec("Q4_1", 32, lambda ld: _nibble_terms(ld, lambda d: ld("m").astype(F32), False), (("qs", "u32"),)),
    BlockSpec("Q5_0", 32, lambda ld: _nibble_terms(ld, lambda d: -16 * d, True), (("qs", "u32"), ("qh", "u32"))),
    BlockSpec("Q5_1", 32, lambda ld: _nibble_terms(ld, lambda d: ld("m").astype(F32), True),
              (("qs", "u32"), ("qh", "u32"))),
    BlockSpec("Q8_0", 32, _q8_0_terms, (("qs", "u32"),)),
)
