"""Q2_K, Q4_K, Q5_K: bytes against llama.cpp (with and without an imatrix), dequantize against gguf-py
bit for bit, and the bytes -> QTensor -> bytes trip."""

from __future__ import annotations

import gguf
import jax
import numpy as np
import pytest

import llama_oracle
from edge_cases import ROWS, edge_matrix, imatrix
from jaxquant.formats import get_format, quantize
from jaxquant.formats.ggml_k import CPU_SLICE_ELEMENTS, QK_K

TYPES = ["Q2_K", "Q4_K", "Q5_K"]
SUB = {"Q2_K": 16, "Q4_K": 32, "Q5_K": 32}
_dequantize = jax.jit(lambda q: q.dequantize())

# (type, row length, imatrix, rows): one compiled search each. Q4_K without an imatrix has more rows
# than one CPU slice holds (and not a multiple of it), so it runs the sliced, padded path.
CASES = [("Q2_K", 11 * QK_K, False, 40), ("Q2_K", 3 * QK_K, True, 40),
         ("Q4_K", 3 * QK_K, False, CPU_SLICE_ELEMENTS // (3 * QK_K) + 7), ("Q4_K", 11 * QK_K, True, 40),
         ("Q5_K", QK_K, False, 40), ("Q5_K", 5 * QK_K, True, 40)]


def k_matrix(k: int, rows: int, sub: int, seed: int) -> np.ndarray:
    """The shared edge cases plus what the K-quants' sub-block searches handle specially."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([edge_matrix(k, QK_K, seed), rng.standard_normal((rows - ROWS, k)).astype(np.float32)])
    subs = x[ROWS:].reshape(rows - ROWS, -1, sub)  # a view: the edits below land in x
    subs[0] *= np.float32(10.0) ** rng.uniform(-4, 2, (subs.shape[1], 1))  # sub-block scales far apart
    subs[1, ::3] = 0.5  # constant sub-blocks among random ones
    subs[2, ::2] = -3.0  # constant negative sub-blocks: min < 0, scale 0
    subs[3] = rng.uniform(5, 6, subs[3].shape)  # positive offsets: the fitted min is clamped to 0
    subs[4] = rng.uniform(-101, -99, subs[4].shape)  # large negative offsets
    subs[5, ::2] = 0  # zero sub-blocks
    subs[6, ::4] *= np.float32(1e-20)  # tiny sub-blocks among normal ones (see exempt_blocks)
    subs[7, ::4] *= np.float32(1e-38)  # subnormal values
    subs[8] = np.round(subs[8] * 4) / 4  # ties of the rounding
    subs[9, :, 0] = 1e4  # one outlier per sub-block
    return x


def exempt_blocks(x: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The super-blocks where ggml_k documents that XLA's flush-to-zero changes the C's arithmetic:
    (tiny: a sub-block with 0 < max|x| < 1e-10; huge: a Q2_K range above 2e38)."""
    sb = x.reshape(x.shape[0], -1, QK_K)
    amax = np.abs(sb.reshape(*sb.shape[:2], -1, SUB[name])).max(-1)
    tiny = ((amax > 0) & (amax < 1e-10)).any(-1)
    huge = (sb.max(-1) - np.minimum(sb.min(-1), 0) > 2e38) & (name == "Q2_K")
    return tiny.reshape(-1), huge.reshape(-1)


def _dequantize_gguf(raw: np.ndarray, name: str) -> np.ndarray:
    with np.errstate(all="ignore"):  # inf scales: NaN in C too
        return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name])


@pytest.mark.oracle
@pytest.mark.parametrize("name,k,with_imatrix,rows", CASES)
def test_bytes_equal_llama_cpp(name, k, with_imatrix, rows):
    fmt = get_format(name)
    x = k_matrix(k, rows, SUB[name], seed=k)
    weights = imatrix(k, seed=k + 1) if with_imatrix else None
    ours = fmt.to_bytes(quantize(x, name, weights, check=False)).reshape(-1, fmt.type_size)  # out-of-range rows too
    ref = llama_oracle.quantize(x, name, weights).reshape(-1, fmt.type_size)
    tiny, huge = exempt_blocks(x, name)
    exact = ~(tiny | huge)
    assert exact.sum() > 0.9 * exact.size
    differ = np.flatnonzero(exact & (ours != ref).any(1))
    assert differ.size == 0, f"{differ.size} of {exact.sum()} blocks differ, first {differ[:5]}"
    # tiny sub-blocks: only bits that dequantize to nothing may differ (d*sc and dmin*m are 0)
    assert np.array_equal(_dequantize_gguf(ours[tiny], name), _dequantize_gguf(ref[tiny], name))
    # Q2_K over a range > 2e38 (the C's 3/(max-min) is subnormal): llama.cpp's own block has an inf
    # or NaN d or dmin (its last 4 bytes), and so has ours
    for blocks in (ours[huge], ref[huge]):
        assert not np.isfinite(blocks[:, -4:].copy().view(np.float16)).all(1).any()


@pytest.mark.oracle
@pytest.mark.parametrize("name", TYPES)
def test_dequantize_equals_gguf_py(name):
    fmt = get_format(name)
    x = k_matrix(4 * QK_K, 40, SUB[name], seed=7)
    raw = llama_oracle.quantize(x, name, imatrix(4 * QK_K, seed=8))
    random = np.random.default_rng(9).integers(0, 256, raw.shape, dtype=np.uint8)  # NaN and inf scales too
    # f16 (d, dmin) pairs that meet in d*sc*q - dmin*m: two NaN payloads, NaN and inf, inf - inf
    pairs = np.array([[0x7E01, 0xFE02], [0x7C00, 0x7E03], [0xFE04, 0xFC00], [0x7C00, 0x7C00], [0xFC00, 0x7C00]],
                     np.uint16)
    at = fmt.type_size - 4 if name == "Q2_K" else 0
    random.reshape(-1, fmt.type_size)[:len(pairs), at:at + 4] = pairs.view(np.uint8)
    for data in (raw, random):
        ours = np.asarray(_dequantize(fmt.from_bytes(data, x.shape)))
        assert np.array_equal(ours.view(np.uint32), _dequantize_gguf(data, name).view(np.uint32))


@pytest.mark.parametrize("name", TYPES)
def test_bytes_round_trip(name):
    fmt = get_format(name)
    raw = np.random.default_rng(10).integers(0, 256, (3, 4 * fmt.type_size), dtype=np.uint8)
    q = fmt.from_bytes(raw, (3, 4 * fmt.block_size))
    assert np.array_equal(fmt.to_bytes(q), raw)
