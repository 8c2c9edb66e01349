"""Kernel decoders of FP8 weights with a scale per tensor, per row (``_CH``) or per 128x128 block
(``_B128``): FP8_E4M3 and FP8_E5M2.

The codes become float16 exactly (``halfpack.fp8_pair``: E5M2 by a shift, E4M3 by Hopper's
conversion, two weights an instruction). A scale per tensor or per row multiplies the float32
product (``Decoder.out_scale``); a block's scale multiplies the float32 product of the part it
covers (``tile.Scaled``; a 64-row program lies inside one 128-row block: ``Decoder.row_groups``).
A part of 128 weights is 32 words of codes, lane slot ``c`` decoding words ``8c ..``; pair ``p``
of a word holds bytes ``p`` and ``p + 2`` (``ggml_legacy.byte_pair_elems``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.ggml_legacy import byte_pair_elems
from pallas_kernels.halfpack import fp8_pair
from pallas_kernels.tile import Decoder, Loader, Scaled

PART = 128  # weights a part


def _scale(a: dict[str, jax.Array]) -> jax.Array:
    return a["scale"].astype(jnp.float32)


def _decoder(kind: str, suffix: str) -> Decoder:
    e4m3, blocks = kind == "E4M3", suffix == "_B128"
    size = PART if blocks else 1  # weights a block

    def decode(ld: Loader, bb: int, interpret: bool) -> list[list[jax.Array]]:
        out = []
        for q in range(bb * size // PART):
            pairs = [fp8_pair(ld("q", 32 * q, 1, 32).reshape(-1, 4, 8), p, e4m3, interpret) for p in range(2)]
            # a block's scale can lie below float16's normal range (E5M2: amax / 57344): on the product
            out.append(Scaled(pairs, ld("scale", q, 1, 1)) if blocks else pairs)
        return out

    def elems(bb: int) -> np.ndarray:
        return byte_pair_elems(bb * size // PART)

    if blocks:
        return Decoder(f"FP8_{kind}{suffix}", PART, decode, elems, words=("q",), row_groups=(("scale", PART),))
    return Decoder(f"FP8_{kind}{suffix}", 1, decode, elems, words=("q",), min_blocks=PART, out_scale=_scale,
                   out_fields=("scale",))


DECODERS = tuple(_decoder(kind, suffix) for kind in ("E4M3", "E5M2") for suffix in ("", "_CH", "_B128"))
