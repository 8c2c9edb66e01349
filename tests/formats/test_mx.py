"""MXFP4: bytes against llama.cpp (which ignores an imatrix for it) and gguf-py's quantize, the
shared exponent at every floorf(log2f()) breakpoint and in subnormal blocks, dequantize against
gguf-py bit for bit, and the bytes -> QTensor -> bytes trip."""

from __future__ import annotations

import gguf
import jax
import numpy as np
import pytest

import llama_oracle
from edge_cases import ROWS, edge_matrix, imatrix
from jaxquant.formats import get_format, quantize

K = 96
FMT = get_format("MXFP4")
_dequantize = jax.jit(lambda q: q.dequantize())


def _bytes_mismatch(x: np.ndarray, weights: np.ndarray | None = None) -> tuple[int, int]:
    ours = FMT.to_bytes(quantize(x, "MXFP4", weights))
    return llama_oracle.block_mismatch(ours, llama_oracle.quantize(x, "MXFP4", weights), FMT.type_size)


@pytest.mark.oracle
@pytest.mark.parametrize("k", [K, 1376])
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_bytes_equal_llama_cpp(k, with_imatrix):
    x = edge_matrix(k, 32, seed=k)
    assert _bytes_mismatch(x, imatrix(k, seed=k + 1) if with_imatrix else None) == (0, ROWS * k // 32)


@pytest.mark.oracle
def test_exponent_at_log2_breakpoints_and_subnormal_blocks():
    """Block maxima on the 64 floats below each power of two and on it, where log2f rounds up to the
    next integer (subnormals and the wrap of (uint8_t) below 2^-125 included); the rest of each
    block spread below its maximum."""
    powers = np.ldexp(np.float32(1), np.arange(-149, 128)).view(np.int32)
    bits = (powers[:, None] + np.arange(-64, 1)).reshape(-1)
    amax = bits[bits > 0].view(np.float32)
    rng = np.random.default_rng(3)
    x = (rng.uniform(-1, 1, (amax.size, 32)) * amax[:, None]).astype(np.float32)
    x[np.arange(amax.size), rng.integers(0, 32, amax.size)] = amax * rng.choice([-1, 1], amax.size)
    x = np.concatenate([x, np.zeros((-amax.size % 3, 32), np.float32)]).reshape(-1, K)
    assert _bytes_mismatch(x)[0] == 0


@pytest.mark.oracle
def test_bytes_equal_gguf_py_quantize():
    x = np.random.default_rng(4).standard_normal((ROWS, K)).astype(np.float32)
    assert np.array_equal(FMT.to_bytes(quantize(x, "MXFP4")), gguf.quants.quantize(x, gguf.GGMLQuantizationType.MXFP4))


@pytest.mark.oracle
def test_dequantize_equals_gguf_py():
    raw = llama_oracle.quantize(edge_matrix(K, 32, seed=5), "MXFP4")
    random = np.random.default_rng(6).integers(0, 256, raw.shape, dtype=np.uint8)  # subnormal scales too
    for data in (raw, random):
        ours = np.asarray(_dequantize(FMT.from_bytes(data, (ROWS, K))))
        with np.errstate(over="ignore"):  # 12 * 2^127 is inf in C too
            ref = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.MXFP4)
        assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


def test_bytes_round_trip():
    raw = np.random.default_rng(7).integers(0, 256, (3, 4 * FMT.type_size), dtype=np.uint8)
    assert np.array_equal(FMT.to_bytes(FMT.from_bytes(raw, (3, 4 * FMT.block_size))), raw)
