"""bitsandbytes formats (NF4, FP4, their double-quantized variants, INT8) against bitsandbytes'
CPU backend: packed codes, absmax (and nested absmax, offset) and dequantized values bit for bit."""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import numpy as np
import pytest
import torch
from edge_cases import edge_matrix

import jaxquant as jq


def _bits(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a)).reshape(-1).view(np.uint8)


def _matrix(k: int, seed: int) -> np.ndarray:
    x = edge_matrix(k, 64, seed)
    x[2] = np.clip(x[2], -1e30, 1e30)  # bnb's mean of the absmax overflows at 3e38
    return x


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double", [False, True])
@pytest.mark.parametrize("k", [640, 64 * 300])
def test_4bit_matches_bitsandbytes(quant_type, double, k):
    x = _matrix(k, k + double)
    packed, state = bnbf.quantize_4bit(torch.from_numpy(x.copy()), blocksize=64, quant_type=quant_type,
                                       compress_statistics=double)
    q = jq.quantize(x, quant_type.upper() + ("_DQ" if double else ""))
    assert np.array_equal(_bits(q.arrays["qs"]), _bits(packed.numpy()))
    if double:  # 8-bit codes of absmax - offset in blocks of 256 across rows (several nested blocks at k=19200)
        assert np.array_equal(_bits(q.arrays["absmax_q"]), _bits(state.absmax.numpy()))
        assert np.array_equal(_bits(q.arrays["absmax2"]), _bits(state.state2.absmax.numpy()))
        assert np.array_equal(_bits(q.arrays["offset"]), _bits(state.offset.numpy()))
    else:
        assert np.array_equal(_bits(q.arrays["absmax"]), _bits(state.absmax.numpy()))
    ours, ref = np.asarray(q.dequantize()), bnbf.dequantize_4bit(packed, state).numpy()
    # bitsandbytes' backends disagree on the sign of FP4's zero code (its native CPU kernel gives
    # -0.0, its torch fallback +0.0): every other value bit for bit, zeros by value
    nz = ref != 0
    assert np.array_equal(ours, ref) and np.array_equal(_bits(ours[nz]), _bits(ref[nz]))


def test_int8_matches_bitsandbytes():
    x = _matrix(1024, 7)
    x[1] = 0  # an all-zero row
    codes, stats, _ = bnbf.int8_vectorwise_quant(torch.from_numpy(x.copy()))
    q = jq.quantize(x, "INT8")
    assert np.array_equal(np.asarray(q.arrays["q"]), codes.numpy())
    assert np.array_equal(_bits(q.arrays["scb"]), _bits(stats.numpy()))
    assert np.array_equal(_bits(q.dequantize()), _bits(bnbf.int8_vectorwise_dequant(codes, stats).numpy()))


def test_double_quant_rows_and_sizes():
    """Nested blocks span rows: take_rows refuses, lookup dequantizes; bytes are bnb's."""
    x = _matrix(640, 3)
    q = jq.quantize(x, "NF4_DQ")
    assert q.nbytes == x.size // 2 + x.size // 64 + 4 * -(-x.size // 64 // 256) + 4
    assert not q.format.separable
    rows = np.asarray(jq.qtensor.lookup(q, np.array([3, 0])))
    assert np.array_equal(rows, np.asarray(q.dequantize())[[3, 0]])
    with pytest.raises(jq.FormatError, match="spanning rows"):
        jq.qtensor.take_rows(q, np.array([0]))
