"""MLX affine (AFQ) formats against MLX itself (``mx.quantize`` / ``mx.dequantize`` on its CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import mlx.core as mx
import numpy as np
import pytest
from edge_cases import edge_matrix

import jaxquant as jq
from jaxquant.formats.mlx_affine import BITS, GROUPS, affine_codes, affine_dequantize, affine_quantize
from jaxquant.formats.packing import pack_bits


def _mlx(x: np.ndarray, bits: int, group: int, dtype) -> tuple[np.ndarray, ...]:
    wq, s, b = mx.quantize(mx.array(x).astype(dtype), group_size=group, bits=bits)
    y = mx.dequantize(wq, s, b, group_size=group, bits=bits)
    return tuple(np.array(a.astype(mx.float32) if a.dtype != mx.uint32 else a) for a in (wq, s, b, y))


def _same(ours, ref) -> None:
    ours = np.asarray(ours, np.float32) if np.asarray(ours).dtype != np.uint32 else np.asarray(ours)
    ours = ours.reshape(ref.shape)
    assert (ours.view(np.uint32) != ref.view(np.uint32)).sum() == 0


_codes = jax.jit(jax.vmap(affine_codes, in_axes=(None, 0, None)), static_argnums=2)


def _f16_matrix(group: int) -> np.ndarray:
    return np.clip(edge_matrix(256, group, group), -6e4, 6e4).astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("group", GROUPS)
def test_float16_matches_mlx(group):
    """The registered formats (float16 scales) are MLX on a float16 weight: same words, scales,
    biases and dequantized values, bit for bit. Every bit width from one compiled call (codes
    packed here as the formats pack them); the formats end to end in test_formats_end_to_end."""
    x = _f16_matrix(group)
    qs, ss, bs = _codes(jnp.asarray(x), jnp.asarray(BITS), group)
    for i, bits in enumerate(BITS):
        wq, s, b, y = _mlx(x, bits, group, mx.float16)
        a = {"q": pack_bits(qs[i], bits), "scales": ss[i].astype(jnp.float16), "biases": bs[i].astype(jnp.float16)}
        for ours, ref in ((a["q"], wq), (a["scales"], s), (a["biases"], b), (affine_dequantize(a, bits), y)):
            _same(ours, ref)
        assert jq.get_format(f"AFQ{bits}_G{group}").bits_per_weight == bits + 32 / group


@pytest.mark.parametrize("bits,group", [(4, 64), (3, 32), (6, 128)])
def test_formats_end_to_end(bits, group):
    """jq.quantize through the registry: the same arrays and dequantization as MLX."""
    x = _f16_matrix(group)
    q = jq.quantize(x, f"AFQ{bits}_G{group}")
    wq, s, b, y = _mlx(x, bits, group, mx.float16)
    for ours, ref in ((q.arrays["q"], wq), (q.arrays["scales"], s), (q.arrays["biases"], b), (q.dequantize(), y)):
        _same(ours, ref)


@pytest.mark.slow
@pytest.mark.parametrize("group", GROUPS)
def test_every_format_end_to_end(group):
    for bits in BITS:
        test_formats_end_to_end(bits, group)


@pytest.mark.parametrize("bits", [3, 4, 6])
def test_float32_and_bfloat16_scales_match_mlx(bits):
    """MLX on a float32 weight keeps float32 scales (arithmetic in float32); bfloat16 scales, as an
    MLX checkpoint may hold, dequantize with bfloat16 rounding."""
    x = edge_matrix(512, 64, bits)
    a = affine_quantize(jnp.asarray(x), bits, 64, jnp.float32)
    wq, s, b, y = _mlx(x, bits, 64, mx.float32)
    for ours, ref in ((a["q"], wq), (a["scales"], s), (a["biases"], b), (affine_dequantize(a, bits), y)):
        _same(ours, ref)
    wq, s, b, y = _mlx(x, bits, 64, mx.bfloat16)
    a = {"q": jnp.asarray(wq).reshape(a["q"].shape), "scales": jnp.asarray(s, jnp.bfloat16),
         "biases": jnp.asarray(b, jnp.bfloat16)}
    _same(affine_dequantize(a, bits), y)


def test_no_gguf_bytes():
    q = jq.quantize(np.ones((2, 64), np.float32), "AFQ4_G64")
    with pytest.raises(jq.JaxquantError, match="no GGML type"):
        q.format.to_bytes(q)
