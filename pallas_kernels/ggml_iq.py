"""Kernel decoders of llama.cpp's non-linear 4-bit formats: IQ4_NL (32) and IQ4_XS (256).

Nibbles index the 16-value table ``kvalues_iq4nl``; a pair of nibbles becomes ``1152 + value``
through two byte permutes (``halfpack.lut16``), then ``(v - 1152) * scale``. Bytes hold elements
as in Q4_0 (low nibble ``j``, high ``j + 16`` of a 16-byte group); units are ``qs`` words.
IQ4_NL: parts of 4 blocks, slot ``c`` decoding block ``c``; IQ4_XS (one block a step): part ``h``,
slot ``c`` decodes sub-block ``4h + c``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.formats.ggml_iq import KVALUES
from pallas_kernels.ggml_legacy import PART, per_block
from pallas_kernels.halfpack import OFFSET2, U32, lut16, splat, sub_mul
from pallas_kernels.tile import Decoder, Loader

F32 = jnp.float32


def _pairs(w: jax.Array, scale: jax.Array, interpret: bool) -> list[jax.Array]:
    return [sub_mul(lut16((w >> U32(4 * p)) & U32(0x000F000F), KVALUES, interpret), OFFSET2, scale, interpret)
            for p in range(4)]


def _iq4_nl(ld: Loader, bb: int, interpret: bool) -> list[list[jax.Array]]:
    return [_pairs(ld("qs", 4 * PART * q, 1, 4 * PART).reshape(-1, 4, 4), per_block(ld, "d", q, 4), interpret)
            for q in range(bb // PART)]


def _iq4_xs(ld: Loader, bb: int, interpret: bool) -> list[list[jax.Array]]:
    d = ld("d").astype(F32)[:, :, None]
    sl, sh = ld("scales_l")[:, :, None], ld("scales_h").astype(U32)[:, :, None]
    parts = []
    for h in range(2):  # part h: slot c decodes sub-block ib = 4h + c (16 bytes)
        ib = U32(4 * h) + jnp.arange(4, dtype=U32)[None, :, None]
        # low 4 bits: nibble ib of scales_l's word; high 2: bits 2 ib of scales_h
        ls = (sl >> (U32(4) * ib)) & U32(0xF) | ((sh >> (U32(2) * ib)) & U32(3)) << U32(4)
        scale = splat(d * (ls.astype(jnp.int32) - 32).astype(F32))
        parts.append(_pairs(ld("qs", 16 * h, 1, 16).reshape(-1, 4, 4), scale, interpret))
    return parts


def _nl_elems(bb: int) -> np.ndarray:
    q, c, u, p, e = np.meshgrid(*(np.arange(n) for n in (bb // PART, 4, 4, 4, 2)), indexing="ij")
    return 32 * (PART * q + c) + 4 * u + p // 2 + 2 * e + 16 * (p % 2)


def _xs_elems(bb: int) -> np.ndarray:
    h, c, u, p, e = np.meshgrid(*(np.arange(n) for n in (2, 4, 4, 4, 2)), indexing="ij")
    return 32 * (4 * h + c) + 4 * u + p // 2 + 2 * e + 16 * (p % 2)


DECODERS = (
    Decoder("IQ4_NL", 32, _iq4_nl, _nl_elems, ("qs",), min_blocks=PART),
    Decoder("IQ4_XS", 256, _iq4_xs, _xs_elems, ("qs", "scales_l")),
)
