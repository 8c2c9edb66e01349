"""MLX affine quantization (AFQ): ``mx.quantize(w, group_size, bits, mode="affine")``.

Per group of ``g`` elements along a row: ``scale = max((max - min) / (2^b - 1), 1e-7)``, negated
unless the minimum is the larger in magnitude; the end of larger magnitude (``edge``) is then
snapped, ``scale = edge / rint(edge / scale)`` with ``bias = edge`` (``bias = 0`` if that rounds
to 0), and ``q = clamp(rint((w - bias) / scale), 0, 2^b - 1)`` with the float32 scale. Scales
and biases are stored in float16 (MLX stores the input's dtype; a loader keeps bfloat16 ones).
Quants form a little-endian bit stream per row (element i at bit ``i*b``) held in uint32 words,
as MLX packs them for every ``b`` (for 3, 5, 6 bits it writes 3 or 5 bytes per 8 or 4 elements,
which is the same stream). Dequantization is MLX's: ``scale * q + bias`` with each operation
rounded to the scales' dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxquant.formats.numerics import F32, div, mul
from jaxquant.formats.packing import pack_bits, unpack_bits
from jaxquant.formats.registry import Field, Format, register

BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128)


def round_to(x: jax.Array, dtype) -> jax.Array:
    """``x`` rounded to ``dtype`` (RNE) and back to float32: one operation of MLX in that dtype."""
    return x.astype(dtype).astype(F32)


def affine_params(xg: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
    """MLX's float32 (scale, bias) of each group ``xg[..., g]``; ``bits`` may be an integer array."""
    n_bins = (jnp.left_shift(1, bits) - 1).astype(F32)
    w_min, w_max = jnp.min(xg, axis=-1), jnp.max(xg, axis=-1)
    mask = jnp.abs(w_min) > jnp.abs(w_max)
    scale = jnp.maximum(div(w_max - w_min, n_bins), F32(1e-7))
    scale = jnp.where(mask, scale, -scale)
    edge = jnp.where(mask, w_min, w_max)
    q0 = jnp.round(div(edge, scale))
    snap = q0 != 0
    return jnp.where(snap, div(edge, jnp.where(snap, q0, 1)), scale), jnp.where(snap, edge, F32(0))


def affine_codes(x: jax.Array, bits: int, group: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``x f32[R, K]`` -> (int32 codes ``[R, K/g, g]``, float32 scale, bias ``[R, K/g]``); ``bits``
    may be an integer array (vmapped over)."""
    xg = x.reshape(x.shape[0], -1, group)
    scale, bias = affine_params(xg, bits)
    q = jnp.clip(jnp.round(div(xg - bias[..., None], scale[..., None])), 0, jnp.left_shift(1, bits) - 1)
    return q.astype(jnp.int32), scale, bias


def affine_quantize(x: jax.Array, bits: int, group: int, dtype=jnp.float16) -> dict[str, jax.Array]:
    """``x f32[R, K]`` -> {"q": uint32 [R, K/g, g*b/32], "scales", "biases": dtype [R, K/g]}."""
    q, scale, bias = affine_codes(x, bits, group)
    return {"q": pack_bits(q, bits), "scales": scale.astype(dtype), "biases": bias.astype(dtype)}


def affine_dequantize(a: dict[str, jax.Array], bits: int) -> jax.Array:
    """MLX's ``scales * q + biases``, each operation rounded to the scales' dtype."""
    dt = a["scales"].dtype
    s, b = a["scales"].astype(F32)[..., None], a["biases"].astype(F32)[..., None]
    y = round_to(round_to(mul(s, unpack_bits(a["q"], bits).astype(F32)), dt) + b, dt)
    return y.reshape(*y.shape[:-2], -1)


def _register(bits: int, group: int) -> Format:
    fields = (Field("q", "uint32", group * bits // 32), Field("scales", "float16"), Field("biases", "float16"))
    return register(Format(f"AFQ{bits}_G{group}", group, fields, lambda a: affine_dequantize(a, bits),
                           lambda x, qw: affine_quantize(x, bits, group), "mlx_affine", gguf=False))


FORMATS = {(b, g): _register(b, g) for b in BITS for g in GROUPS}
