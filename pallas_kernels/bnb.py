"""Kernel decoders of bitsandbytes' NF4 and FP4 (blocks of 64, a float32 absmax each) and LLM.int8
weights (INT8: int8 codes, ``q * scb / 127`` with a float32 ``scb`` per row).

A nibble pair becomes two float16 table values through four byte permutes (``halfpack.lut16_f16``),
then one product with the block's absmax (rounded to float16). Bytes hold two elements, the high
nibble first. A part of 128 weights is two blocks; lane slot ``c`` decodes words ``2c, 2c + 1`` of
each (one absmax a pair tensor). Pair ``p`` of a word holds the nibbles at bits ``4p`` and
``16 + 4p``: elements ``2 (p // 2) + 1 - p % 2`` and 4 more.

INT8 decodes as Q8_0 does (two bytes to ``1024 + 128 + q`` by one mask-and-xor-or, minus 1152:
exact); ``scb / 127`` multiplies the float32 product (``Decoder.out_scale``). Slot ``c`` decodes
words ``8c ..`` of a part; pair ``p`` holds bytes ``p`` and ``p + 2``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.formats.bnb import BLOCK, FP4_DEQUANT_TABLE, INT8_INV, NF4_TABLE
from pallas_kernels.ggml_legacy import byte_pair_elems
from pallas_kernels.halfpack import OFFSET2, U32, dup, f16_bits, int8_pairs, lut16_f16, mul2, splat, sub_mul
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


def _int8_scale(a: dict[str, jax.Array]) -> jax.Array:
    return a["scb"].astype(jnp.float32) * INT8_INV


def _int8(ld: Loader, bb: int, interpret: bool) -> list[list[jax.Array]]:
    return [[sub_mul(t, OFFSET2, U32(dup(f16_bits(1.0))), interpret)
             for t in int8_pairs(ld("q", 32 * q, 1, 32).reshape(-1, 4, 8))] for q in range(bb // PART)]


DECODERS = (_decoder("NF4", NF4_TABLE), _decoder("FP4", FP4_DEQUANT_TABLE),
            Decoder("INT8", 1, _int8, lambda bb: byte_pair_elems(bb // PART), ("q",), min_blocks=PART,
                    out_scale=_int8_scale, out_fields=("scb",)))
