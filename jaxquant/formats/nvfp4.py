"""NVFP4: E2M1 values in blocks of 16 along the row, an E4M3 scale per block and a float32
global scale per tensor (NVIDIA's recipe, as compressed-tensors / ModelOpt write it).

``global_scale = 448 * 6 / amax(tensor)`` (1 for an all-zero tensor); per block
``s = e4m3(amax(block) / 6 * global_scale)``; ``q = e2m1(x / (s / global_scale))`` rounded to
nearest, ties to even, saturating at 6; dequantized ``e2m1(q) * (s / global_scale)``. Codes are
nibbles (sign in bit 3; a value that rounds to zero gets +0, as MLX), element 0 of each byte in
the low nibble. With ``global_scale = 1`` this is ``mx.quantize(mode="nvfp4")`` bit for bit
(MLX's own ``global_scale`` argument follows another convention). MXFP4 (E8M0 scales per 32) is
the GGUF format in ``mx.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.formats.numerics import F32, div, mul
from jaxquant.formats.registry import Field, Format, register

BLOCK = 16
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
FP8_MAX, FP4_MAX = F32(448), F32(6)


def e2m1_code(v: jax.Array) -> jax.Array:
    """Nearest E2M1 code (ties to the even mantissa, saturating) of float32 ``v``: 4-bit ints."""
    a = jnp.abs(v)
    # the midpoints 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5 round to the even neighbour: 0, 1, 1, 2, 2, 4, 4
    mag = ((a > 0.25).astype(jnp.int32) + (a >= 0.75) + (a > 1.25) + (a >= 1.75) + (a > 2.5) + (a >= 3.5) + (a > 5))
    return jnp.where((v < 0) & (mag > 0), mag + 8, mag)


def nvfp4_blocks(xb: jax.Array, global_scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Blocks ``xb [..., 16]`` -> (E4M3 scales [...], codes [..., 16])."""
    s = mul(div(jnp.max(jnp.abs(xb), axis=-1), FP4_MAX), global_scale)
    s8 = jnp.minimum(s, FP8_MAX).astype(jnp.float8_e4m3fn)
    step = div(s8.astype(F32), global_scale)
    zero = step == 0
    v = div(xb, jnp.where(zero, F32(1), step)[..., None])
    return s8, jnp.where(zero[..., None], 0, e2m1_code(jnp.clip(v, -FP4_MAX, FP4_MAX)))


def _quantize(x: jax.Array, qw: jax.Array | None) -> dict[str, jax.Array]:
    del qw
    amax = jnp.max(jnp.abs(x))
    global_scale = jnp.where(amax == 0, F32(1), div(mul(FP8_MAX, FP4_MAX), jnp.where(amax == 0, F32(1), amax)))
    s8, q = nvfp4_blocks(x.reshape(x.shape[0], -1, BLOCK), global_scale)
    qs = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(jnp.uint8)
    return {"qs": qs, "scales": s8, "global_scale": global_scale}


def _dequantize(a: dict[str, jax.Array]) -> jax.Array:
    qs = a["qs"]
    q = jnp.stack([qs & 0xF, qs >> 4], axis=-1).reshape(*qs.shape[:-1], BLOCK).astype(jnp.int32)
    step = div(a["scales"].astype(F32), a["global_scale"])
    y = mul(jnp.asarray(E2M1)[q], step[..., None])
    return y.reshape(*y.shape[:-2], -1)


NVFP4 = register(Format("NVFP4", BLOCK, (Field("qs", "uint8", BLOCK // 2), Field("scales", "float8_e4m3fn"),
                                         Field("global_scale", "float32", layout="tensor")),
                        _dequantize, _quantize, "mx", gguf=False, scope="tensor"))
