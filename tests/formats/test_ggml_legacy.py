"""Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: bytes against llama.cpp (with and without an imatrix) and against
gguf-py's quantize, dequantize against gguf-py bit for bit, and the bytes -> QTensor -> bytes trip."""

from __future__ import annotations

import gguf
import jax
import numpy as np
import pytest

import llama_oracle
from edge_cases import ROWS, edge_matrix, imatrix
from jaxquant.formats import get_format, quantize

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
_dequantize = jax.jit(lambda q: q.dequantize())


# (type, row length, imatrix): rows of 3 and 43 blocks (the imatrix path divides by the row length);
# each imatrix search compiles for seconds, so it runs at one length per type
CASES = ([(name, k, False) for name in TYPES for k in (96, 1376)]
         + [("Q4_0", 96, True), ("Q4_1", 96, True), ("Q5_0", 1376, True), ("Q5_1", 1376, True), ("Q8_0", 96, True)])


@pytest.mark.oracle
@pytest.mark.parametrize("name,k,with_imatrix", CASES)
def test_bytes_equal_llama_cpp(name, k, with_imatrix):
    fmt = get_format(name)
    x = edge_matrix(k, fmt.block_size, seed=k)
    weights = imatrix(k, seed=k + 1) if with_imatrix else None
    ours = fmt.to_bytes(quantize(x, name, weights, check=False))  # llama.cpp's bytes, out-of-range rows too
    ref = llama_oracle.quantize(x, name, weights)
    assert llama_oracle.block_mismatch(ours, ref, fmt.type_size) == (0, ROWS * k // fmt.block_size)


@pytest.mark.oracle
@pytest.mark.parametrize("name", TYPES)
def test_bytes_equal_gguf_py_quantize(name):
    fmt = get_format(name)
    x = np.random.default_rng(3).standard_normal((ROWS, 96)).astype(np.float32)  # shapes compiled above
    ours = fmt.to_bytes(quantize(x, name))
    assert np.array_equal(ours, gguf.quants.quantize(x, gguf.GGMLQuantizationType[name]))


@pytest.mark.oracle
@pytest.mark.parametrize("name,with_imatrix", [("Q4_1", False), ("Q5_1", False), ("Q4_1", True)])
def test_sign_of_a_zero_min(name, with_imatrix):
    """m is the first of equal minima: +0.0 before -0.0 gives m = +0, -0.0 before +0.0 gives -0."""
    x = np.random.default_rng(4).standard_normal((ROWS, 96)).astype(np.float32)  # shapes compiled above
    x[:2, :32] = 0
    x[0, 5] = -0.0
    x[1, :5] = -0.0
    weights = imatrix(96, seed=4) if with_imatrix else None
    fmt = get_format(name)
    ours = fmt.to_bytes(quantize(x, name, weights))
    assert np.array_equal(ours, llama_oracle.quantize(x, name, weights))


@pytest.mark.oracle
@pytest.mark.parametrize("name", TYPES)
def test_dequantize_equals_gguf_py(name):
    fmt = get_format(name)
    x = edge_matrix(512, fmt.block_size, seed=7)
    raw = llama_oracle.quantize(x, name, imatrix(512, seed=8))
    random = np.random.default_rng(9).integers(0, 256, raw.shape, dtype=np.uint8)  # NaN and inf scales too
    # f16 pairs at each block's start (d and m where there is an m): NaN payloads meet in x0*d + m
    pairs = np.array([[0x7E01, 0xFE02], [0x7C00, 0x7E03], [0xFE04, 0xFC00], [0x7C00, 0xFC00]], np.uint16)
    random.reshape(ROWS, -1, fmt.type_size)[:4, 0, :4] = pairs.view(np.uint8)
    for data in (raw, random):
        ours = np.asarray(_dequantize(fmt.from_bytes(data, (ROWS, 512))))
        with np.errstate(all="ignore"):  # 0 * inf scales in the random blocks: NaN in C too
            ref = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[name])
        assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("name", TYPES)
def test_bytes_round_trip(name):
    fmt = get_format(name)
    raw = np.random.default_rng(10).integers(0, 256, (3, 4 * fmt.type_size), dtype=np.uint8)
    q = fmt.from_bytes(raw, (3, 4 * fmt.block_size))
    assert np.array_equal(fmt.to_bytes(q), raw)
