"""Kernel views of llama.cpp's non-linear 4-bit formats: IQ4_NL (32) and IQ4_XS (256).

Nibbles index the 16-value table ``kvalues_iq4nl``; the kernel looks up ``value + 128`` (a
byte, exact as a float) and folds the ``-128`` into the block's offset. Nibble ``p`` of word
``t`` of a 16-byte group is element ``4t + p//2`` (low) or ``16 + 4t + p//2`` (high).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxquant.formats.ggml_iq import KVALUES
from pallas_kernels.unpack import BlockSpec, Loader, Term, as_f32, lookup16, u_to_f32

F32 = jnp.float32
_TABLE = (KVALUES.astype(np.int32) + 128).tolist()


def _group_terms(w, scale, first: int) -> list[Term]:
    """The 8 terms of 16 bytes (4 words ``w``) holding 32 table indices."""
    offset = -128 * scale
    terms = []
    for p in range(8):
        v = (w >> jnp.uint32(4 * p)) & jnp.uint32(0xF)
        elems = tuple(first + 4 * t + p // 2 + 16 * (p % 2) for t in range(4))
        terms.append(Term(as_f32(lookup16(v, _TABLE)), scale, offset, elems, 0))
    return terms


def _iq4_nl_terms(ld: Loader) -> list[Term]:
    return _group_terms(ld("qs"), ld("d").astype(F32), 0)


def _iq4_xs_terms(ld: Loader) -> list[Term]:
    d = ld("d").astype(F32)
    sh, sl = ld("scales_h").astype(jnp.uint32), ld("scales_l", 0)
    terms = []
    for ib in range(8):
        lo = (sl >> jnp.uint32(8 * (ib // 2) + 4 * (ib % 2))) & jnp.uint32(0xF)
        hi = (sh >> jnp.uint32(2 * ib)) & jnp.uint32(3)
        scale = d * (u_to_f32(lo | (hi << jnp.uint32(4))) - 32)
        terms += _group_terms(ld("qs", slice(4 * ib, 4 * ib + 4)), scale, 32 * ib)
    return terms


SPECS = (
    BlockSpec("IQ4_NL", 32, _iq4_nl_terms, (("qs", "u32"),)),
    BlockSpec("IQ4_XS", 256, _iq4_xs_terms, (("qs", "u32"), ("scales_l", "u32"))),
)
