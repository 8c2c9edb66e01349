"""Kernel decoders of llama.cpp's non-linear 4-bit formats: IQ4_NL (32) and IQ4_XS (256).

Nibbles index the 16-value table ``kvalues_iq4nl``; a pair of nibbles becomes ``1152 + value``
through two byte permutes (``halfpack.lut16``), then ``(v - 1152) * scale``. Bytes hold elements
as in Q4_0 (low nibble ``j``, high ``j + 16`` of a 16-byte group); units are ``qs`` words.
IQ4_NL: each slot takes ``bb / 4`` blocks; IQ4_XS (one block a step): slot ``c`` takes sub-blocks
``2c`` and ``2c + 1``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.formats.ggml_iq import KVALUES
from pallas_kernels.ggml_legacy import per_block
from pallas_kernels.halfpack import U32, dup, f16_bits, lut16, splat, sub_mul
from pallas_kernels.tile import Decoder, Loader, stack

F32 = jnp.float32
OFFSET = dup(f16_bits(1152))


def _pairs(w: jax.Array, scale: jax.Array, interpret: bool) -> list[jax.Array]:
    return [sub_mul(lut16((w >> U32(4 * p)) & U32(0x000F000F), KVALUES, interpret), OFFSET, scale, interpret)
            for p in range(4)]


def _group_elems(c, u, p, e, words_per_slot: int) -> np.ndarray:
    """Element of a slot's word ``u`` whose 16-byte groups run on from slot to slot."""
    word = c * words_per_slot + u
    return 32 * (word // 4) + 4 * (word % 4) + p // 2 + 2 * e + 16 * (p % 2)


def _iq4_nl(ld: Loader, bb: int, interpret: bool) -> list[jax.Array]:
    return _pairs(ld("qs").reshape(-1, 4, bb), per_block(ld, "d", bb, 4), interpret)


def _iq4_xs(ld: Loader, bb: int, interpret: bool) -> list[jax.Array]:
    w = ld("qs").reshape(-1, 4, 8)
    d = ld("d").astype(F32)
    sl, sh = ld("scales_l"), ld("scales_h").astype(U32)
    # sub-block 2c + k: low 4 bits in nibble k of scales_l byte c, high 2 at bits 2 (2c + k) of scales_h
    ls = [(sl >> U32(8 * (ib // 2) + 4 * (ib % 2))) & U32(0xF) | ((sh >> U32(2 * ib)) & U32(3)) << U32(4)
          for ib in range(8)]
    ls = stack(ls).reshape(-1, 4, 2, 1)
    scale = splat(d[:, :, None, None] * (ls.astype(jnp.int32) - 32).astype(F32))
    return _pairs(w, jnp.broadcast_to(scale, (w.shape[0], 4, 2, 4)).reshape(w.shape), interpret)


def _elems(words: Callable[[int], int]) -> Callable[[int], np.ndarray]:
    def elems(bb: int) -> np.ndarray:
        n = words(bb)
        return _group_elems(*np.meshgrid(np.arange(4), np.arange(n), np.arange(4), np.arange(2), indexing="ij"), n)
    return elems


DECODERS = (
    Decoder("IQ4_NL", 32, _iq4_nl, _elems(lambda bb: bb), ("qs",), min_blocks=4),
    Decoder("IQ4_XS", 256, _iq4_xs, _elems(lambda bb: 8), ("qs", "scales_l")),
)
