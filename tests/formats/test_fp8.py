"""FP8 formats against torch's float8 casts: the published recipe (scale = amax / max finite per
tensor, row or 128x128 block; q = (x / scale).to(float8); x = q * scale) computed in torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from edge_cases import edge_matrix

import jaxquant as jq

TORCH = {"E4M3": torch.float8_e4m3fn, "E5M2": torch.float8_e5m2}


def _torch_reference(t: torch.Tensor, dtype, granularity: str) -> tuple[torch.Tensor, ...]:
    fmax = torch.finfo(dtype).max
    if granularity == "":
        s = t.abs().max() / fmax
        full = s.expand_as(t)
    elif granularity == "_CH":
        s = t.abs().amax(1) / fmax
        full = s[:, None].expand_as(t)
    else:
        n, k = t.shape
        padded = torch.nn.functional.pad(t, (0, 0, 0, -n % 128))
        s = padded.reshape(-1, 128, k // 128, 128).abs().amax((1, 3)) / fmax
        full = s.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)
    q = torch.where(full == 0, 0, t / torch.where(full == 0, 1, full)).to(dtype)
    return q, s, q.float() * full


@pytest.mark.parametrize("kind", ["E4M3", "E5M2"])
@pytest.mark.parametrize("granularity", ["", "_CH", "_B128"])
def test_fp8_matches_torch(kind, granularity):
    x = edge_matrix(640, 128, 1)
    x[2] = np.clip(x[2], -1e30, 1e30)
    x = np.concatenate([x, x[:7] * 0.3, x[:150] * 2])  # 181 rows: a partial last block of 128 rows
    x[20] = 0  # an all-zero row (and 128x128 block parts)
    q = jq.quantize(x, f"FP8_{kind}{granularity}")
    ref_q, ref_s, ref_y = _torch_reference(torch.from_numpy(x), TORCH[kind], granularity)
    assert np.array_equal(np.asarray(q.arrays["q"]).view(np.uint8), ref_q.view(torch.uint8).numpy())
    assert np.array_equal(np.asarray(q.arrays["scale"]).view(np.uint32), ref_s.numpy().view(np.uint32))
    assert np.array_equal(np.asarray(q.dequantize()).view(np.uint32), ref_y.numpy().view(np.uint32))


def test_fp8_rows():
    """Per-tensor and per-channel scales take rows still packed; 128x128 blocks do not."""
    x = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    ids = np.array([[5, 200], [0, 7]])
    for name in ("FP8_E4M3", "FP8_E4M3_CH", "FP8_E4M3_B128"):
        q = jq.quantize(x, name)
        assert np.array_equal(np.asarray(jq.qtensor.lookup(q, ids)), np.asarray(q.dequantize())[ids])
    assert jq.qtensor.take_rows(jq.quantize(x, "FP8_E4M3"), ids).arrays["scale"].shape == ()
