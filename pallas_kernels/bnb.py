"""Kernel decoders of bitsandbytes' 4-bit formats: NF4 and FP4 (blocks of 64, a float32 absmax each).

A nibble pair becomes two float16 table values through four byte permutes (``halfpack.lut16_f16``),
then one product with the block's absmax (rounded to float16). Bytes hold two elements, the high
nibble first. A part of 128 weights is two blocks; lane slot ``c`` decodes words ``2c, 2c + 1`` of
each (one absmax a pair tensor). Pair ``p`` of a word holds the nibbles at bits ``4p`` and
``16 + 4p``: elements ``2 (p // 2) + 1 - p % 2`` and 4 more.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxquant.formats.bnb import BLOCK, FP4_DEQUANT_TABLE, NF4_TABLE
from pallas_kernels.halfpack import U32, lut16_f16, mul2, splat
from pallas_kernels.tile import Decoder, Loader

PART = 128  # weights a part


def _decoder(name: str, table: np.ndarray) -> Decoder:
    def decode(ld: Loader, bb: int, interpret: bool) -> list[list[jax.Array]]:
        out = []
        for q in range(bb // 2):
            part = []
            for blk in (2 * q, 2 * q + 1):
                w = ld("qs", 8 * blk, 1, 8).reshape(-1, 4, 2)
                s = splat(ld("absmax", blk, 1, 1))[:, :, None]
                part += [mul2(lut16_f16((w >> U32(4 * p)) & U32(0x000F000F), table, interpret), s, interpret)
                         for p in range(4)]
            out.append(part)
        return out

    def elems(bb: int) -> np.ndarray:
        q, c, u, g, p, e = np.meshgrid(*(np.arange(n) for n in (bb // 2, 4, 2, 2, 4, 2)), indexing="ij")
        el = PART * q + BLOCK * g + 8 * (2 * c + u) + 2 * (p // 2) + 1 - p % 2 + 4 * e
        return el.reshape(bb // 2, 4, 2, 8, 2)

    return Decoder(name, BLOCK, decode, elems, ("qs",), min_blocks=2)


DECODERS = (_decoder("NF4", NF4_TABLE), _decoder("FP4", FP4_DEQUANT_TABLE))
