"""MLX affine (AFQ) formats against MLX itself (``mx.quantize`` / ``mx.dequantize`` on its CPU)."""

from __future__ import annotations

import jax.numpy as jnp
import mlx.core as mx
import numpy as np
import pytest
from edge_cases import edge_matrix

import jaxquant as jq
from jaxquant.formats.mlx_affine import BITS, GROUPS, affine_dequantize, affine_quantize


def _mlx(x: np.ndarray, bits: int, group: int, dtype) -> tuple[np.ndarray, ...]:
    wq, s, b = mx.quantize(mx.array(x).astype(dtype), group_size=group, bits=bits)
    y = mx.dequantize(wq, s, b, group_size=group, bits=bits)
    return tuple(np.array(a.astype(mx.float32) if a.dtype != mx.uint32 else a) for a in (wq, s, b, y))


def _same(ours, ref) -> None:
    ours = np.asarray(ours, np.float32) if np.asarray(ours).dtype != np.uint32 else np.asarray(ours)
    ours = ours.reshape(ref.shape)
    assert (ours.view(np.uint32) != ref.view(np.uint32)).sum() == 0


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", GROUPS)
def test_float16_matches_mlx(bits, group):
    """The registered formats (float16 scales) are MLX on a float16 weight: same words, scales,
    biases and dequantized values, bit for bit."""
    x = np.clip(edge_matrix(256, group, bits * group), -6e4, 6e4).astype(np.float16).astype(np.float32)
    q = jq.quantize(x, f"AFQ{bits}_G{group}")
    wq, s, b, y = _mlx(x, bits, group, mx.float16)
    for ours, ref in ((q.arrays["q"], wq), (q.arrays["scales"], s), (q.arrays["biases"], b), (q.dequantize(), y)):
        _same(ours, ref)
    assert q.bits_per_weight == bits + 32 / group


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
