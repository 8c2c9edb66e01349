"""Kernel decoder of NVFP4: E2M1 nibbles in blocks of 16, an E4M3 scale per block, a float32
global scale per tensor.

A nibble pair becomes ``1152 + 2 v`` through the byte-permute table lookup (``halfpack.lut16``: twice
the E2M1 values are the integers 0..12), then ``(t - 1152) * scale``: exact in float16 up to the
product's one rounding. The block scales (E4M3) become float16 exactly as they load. The global
scale and the factor 1/2 multiply the float32 product (``Decoder.out_scale``).

A part of 128 weights is 8 blocks in two groups of 4; lane slot ``c`` decodes block ``c`` of each
group (2 words of 8 nibbles, element ``j`` of a word at bits ``4j``), so a group's 4 scales are one
load, scale ``c`` for slot ``c`` (as Q4_0's). Pair ``p`` of a word holds elements ``p`` and ``p + 4``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.formats.nvfp4 import E2M1
from pallas_kernels.halfpack import OFFSET2, U32, lut16, splat, sub_mul
from pallas_kernels.tile import Decoder, Loader

PART = 128  # weights a part
TABLE = (2 * E2M1).astype(np.int8)  # -0 becomes 0: it adds nothing to a sum


def _scale(a: dict[str, jax.Array]) -> jax.Array:
    return 0.5 / a["global_scale"].astype(jnp.float32)


def _decode(ld: Loader, bb: int, interpret: bool) -> list[list[jax.Array]]:
    out = []
    for q in range(bb // 8):
        part = []
        for g in range(2):
            w = ld("qs", 16 * q + 8 * g, 1, 8).reshape(-1, 4, 2)
            s = splat(ld("scales", 8 * q + 4 * g, 1, 4))[:, :, None]  # slot c: block 4g + c's scale
            part += [sub_mul(lut16((w >> U32(4 * p)) & U32(0x000F000F), TABLE, interpret), OFFSET2, s, interpret)
                     for p in range(4)]
        out.append(part)
    return out


def _elems(bb: int) -> np.ndarray:
    q, c, u, g, p, e = np.meshgrid(*(np.arange(n) for n in (bb // 8, 4, 2, 2, 4, 2)), indexing="ij")
    return (PART * q + 16 * (4 * g + c) + 8 * u + p + 4 * e).reshape(bb // 8, 4, 2, 8, 2)


DECODERS = (Decoder("NVFP4", 16, _decode, _elems, ("qs",), min_blocks=8, out_scale=_scale,
                    out_fields=("global_scale",)),)
