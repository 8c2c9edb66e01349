"""FP8 weights (E4M3FN, E5M2) with float32 scales per tensor, per output channel (row) or per
128x128 block (the layout of DeepSeek-V3 / Qwen3 FP8 checkpoints, ``weight_scale_inv``).

``scale = amax / max_finite`` over the tensor, row or block; ``q = fp8(x / scale)`` with the cast
rounding to nearest even, as ``torch.Tensor.to(torch.float8_e4m3fn)``; dequantized ``q * scale``.
An all-zero tensor, row or block gets scale 0 and zero codes. 128x128 blocks need rows whose length
is a multiple of 128; the last block of rows may be partial (its scale covers the rows present).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxquant.formats.numerics import F32, div, mul
from jaxquant.formats.registry import Field, Format, register

TYPES = {"E4M3": (jnp.float8_e4m3fn, "float8_e4m3fn"), "E5M2": (jnp.float8_e5m2, "float8_e5m2")}
BLOCK = 128


def _cast(x: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """fp8(x / scale), zeros where the scale is 0."""
    zero = scale == 0
    return jnp.where(zero, F32(0), div(x, jnp.where(zero, F32(1), scale))).astype(dtype)


def _quantize(x: jax.Array, dtype, granularity: str) -> dict[str, jax.Array]:
    fmax = F32(float(jnp.finfo(dtype).max))
    if granularity == "tensor":
        scale = div(jnp.max(jnp.abs(x)), fmax)
        return {"q": _cast(x, scale, dtype), "scale": scale}
    if granularity == "channel":
        scale = div(jnp.max(jnp.abs(x), axis=-1), fmax)
        return {"q": _cast(x, scale[:, None], dtype), "scale": scale}
    n, k = x.shape
    xb = jnp.pad(x, ((0, -n % BLOCK), (0, 0))).reshape(-1, BLOCK, k // BLOCK, BLOCK)
    scale = div(jnp.max(jnp.abs(xb), axis=(1, 3)), fmax)
    q = _cast(xb, scale[:, None, :, None], dtype).reshape(-1, k)[:n]
    return {"q": q, "scale": scale}


def _dequantize(a: dict[str, jax.Array], granularity: str) -> jax.Array:
    q = a["q"].astype(F32)
    if granularity == "tensor":
        return mul(q, a["scale"])
    if granularity == "channel":
        return mul(q, a["scale"][:, None])
    n, k = q.shape
    scale = jnp.repeat(jnp.repeat(a["scale"], BLOCK, axis=0)[:n], BLOCK, axis=1)
    return mul(q, scale)


def _register(kind: str, granularity: str, suffix: str) -> Format:
    dtype, dtype_name = TYPES[kind]
    layout = {"tensor": "tensor", "channel": "rows", "block": "mixed"}[granularity]
    fields = (Field("q", dtype_name), Field("scale", "float32", layout=layout))
    return register(Format(f"FP8_{kind}{suffix}", BLOCK if granularity == "block" else 1, fields,
                           lambda a: _dequantize(a, granularity), lambda x, qw: _quantize(x, dtype, granularity),
                           "fp8", gguf=False, scope="tensor"))


FORMATS = {(kind, g): _register(kind, g, suffix) for kind in TYPES
           for g, suffix in (("tensor", ""), ("channel", "_CH"), ("block", "_B128"))}
