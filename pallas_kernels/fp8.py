"""Kernel decoders of FP8 weights with a scale per tensor or per row: FP8_E4M3, FP8_E5M2 and their
``_CH`` forms.

The codes become float16 exactly (``halfpack.fp8_pair``: E5M2 by a shift, E4M3 by Hopper's
conversion, two weights an instruction); the scale multiplies the float32 product, not the
weights (``Decoder.out_scale``). A part of 128 weights is 32 words of codes, lane slot ``c``
decoding words ``8c ..``; pair ``p`` of a word holds bytes ``p`` and ``p + 2``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.halfpack import fp8_pair
from pallas_kernels.tile import Decoder, Loader

PART = 128  # weights a part


def _scale(a: dict[str, jax.Array]) -> jax.Array:
    return a["scale"].astype(jnp.float32)


def _decoder(kind: str, suffix: str) -> Decoder:
    e4m3 = kind == "E4M3"

    def decode(ld: Loader, bb: int, interpret: bool) -> list[list[jax.Array]]:
        return [[fp8_pair(ld("q", 32 * q, 1, 32).reshape(-1, 4, 8), p, e4m3, interpret) for p in range(2)]
                for q in range(bb // PART)]

    def elems(bb: int) -> np.ndarray:
        q, c, u, p, e = np.meshgrid(*(np.arange(n) for n in (bb // PART, 4, 8, 2, 2)), indexing="ij")
        return PART * q + 32 * c + 4 * u + p + 2 * e

    return Decoder(f"FP8_{kind}{suffix}", 1, decode, elems, words=("q",), min_blocks=PART, out_scale=_scale,
                   out_fields=("scale",))


DECODERS = tuple(_decoder(kind, suffix) for kind in ("E4M3", "E5M2") for suffix in ("", "_CH"))
