"""NVFP4 against MLX's nvfp4 mode (blocks at global scale 1) and hand-computed vectors of the
published recipe (global scale 448*6/amax, E4M3 block scales, E2M1 ties to even)."""

from __future__ import annotations

import jax.numpy as jnp
import mlx.core as mx
import numpy as np
from edge_cases import edge_matrix

import jaxquant as jq
from jaxquant.formats.nvfp4 import _dequantize, nvfp4_blocks


def test_blocks_match_mlx():
    x = np.clip(edge_matrix(256, 16, 0), -400, 400)  # block scales within E4M3 at global scale 1
    wq, s = mx.quantize(mx.array(x), mode="nvfp4")
    s8, q = nvfp4_blocks(jnp.asarray(x).reshape(24, -1, 16), jnp.float32(1))
    qs = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(jnp.uint8)
    assert np.array_equal(np.asarray(qs).reshape(24, -1).view(np.uint32), np.array(wq))
    assert np.array_equal(np.asarray(s8).view(np.uint8).reshape(24, -1), np.array(s))
    y = _dequantize({"qs": qs, "scales": s8, "global_scale": jnp.float32(1)}).reshape(24, -1)
    ref = np.array(mx.dequantize(wq, s, mode="nvfp4", dtype=mx.float32))
    assert np.array_equal(np.asarray(y).view(np.uint32), ref.view(np.uint32))


def test_hand_computed():
    # global amax 268.8 -> global scale 448 * 6 / 268.8 = 10; block 0: amax 12 -> s = e4m3(12 / 6 * 10) = 20,
    # step s / 10 = 2: x / 2 = 0.125 -> 0, 0.375 -> 0.5, 0.75 -> 1 and 1.25 -> 1 (ties to even), 2.5 -> 2,
    # 5 -> 4, 6, -6, -0.125 -> 0, -1.75 -> -2, 3.5 -> 4, -3.5 -> -4
    row0 = np.array([0.25, 0.75, 1.5, 2.5, 5, 10, 12, -12, -0.25, -3.5, 7, -7, 0, 0, 0, 0], np.float32)
    row1 = np.full(16, 268.8, np.float32)  # s = e4m3(268.8 / 6 * 10) = 448, step 44.8: x / step = 6
    q = jq.quantize(np.stack([row0, row1]), "NVFP4")
    g = float(q.arrays["global_scale"])
    assert g == np.float32(448 * 6) / np.float32(268.8)
    assert np.asarray(q.arrays["scales"]).astype(np.float32).tolist() == [[20.0], [448.0]]
    want = np.array([0, 0.5, 1, 1, 2, 4, 6, -6, 0, -2, 4, -4, 0, 0, 0, 0], np.float32) * np.float32(20 / g)
    got = np.asarray(q.dequantize())
    np.testing.assert_allclose(got[0], want, rtol=1e-6)
    np.testing.assert_allclose(got[1], row1, rtol=1e-6)
    assert abs(q.format.bits_per_weight - 4.5) < 1e-5  # plus 4 bytes per tensor
