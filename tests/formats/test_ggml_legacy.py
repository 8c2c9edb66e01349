"""Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: bytes against llama.cpp (with and without an imatrix) and against
gguf-py's quantize, dequantize against gguf-py bit for bit, and the bytes -> QTensor -> bytes trip."""

from __future__ import annotations

import gguf
import jax
import numpy as np
import pytest

import llama_oracle
from jaxquant.formats import get_format, quantize

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
ROWS = 24
_dequantize = jax.jit(lambda q: q.dequantize())


def edge_matrix(k: int, block: int, seed: int) -> np.ndarray:
    """Rows of several scales with the edge cases the C handles specially (row length ``k``)."""
    rng = np.random.default_rng(seed)
    scales = np.array([1e-3, 0.02, 1.0, 30.0, 1e4], np.float32)
    x = rng.standard_normal((ROWS, k)).astype(np.float32) * scales[np.arange(ROWS) % 5, None]
    x[0, :block] = 0  # an all-zero block
    x[1] = 0
    x[2, rng.integers(0, k)] = 3e38  # one huge value
    x[3] = rng.standard_normal(k) * 1e-20  # tiny values
    x[4, ::7] = 1e-20  # tiny values among normal ones
    x[5] = -np.abs(x[5])  # all negative
    x[6] = np.abs(x[6])
    x[7] = rng.laplace(size=k)  # heavy tails
    x[8] = rng.standard_cauchy(size=k)
    x[9, :block] = 0.5  # a constant block
    x[10, :block] = rng.integers(-8, 8, block)  # exact ties of the rounding
    x[11, :block] = rng.integers(-16, 16, block) + 0.5
    x[12, block:2 * block] *= 1e-5  # a small block among values of scale 1
    x[13, block - 1] = -6e4  # a value that overflows the f16 scale
    return x


def imatrix(k: int, seed: int) -> np.ndarray:
    return np.exp(np.random.default_rng(seed).normal(0, 2, k)).astype(np.float32)


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
    ours = fmt.to_bytes(quantize(x, name, weights))
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
@pytest.mark.parametrize("name,with_imatrix", [
    ("Q4_1", False), ("Q5_1", False), pytest.param("Q4_1", True, marks=pytest.mark.xfail(strict=True, reason=(
        "ggml_k.make_qkx_quants clamps jnp.min(x) with jnp.minimum, not C's first of equal minima")))])
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
