"""IQ4_NL and IQ4_XS: bytes against llama.cpp (with and without an imatrix), dequantize against
gguf-py bit for bit, and the bytes -> QTensor -> bytes round trip."""

from __future__ import annotations

import gguf
import jax
import numpy as np
import pytest

import llama_oracle
from jaxquant.formats import get_format, quantize

# (type, row length): a row of 3 blocks and one of 16 for IQ4_NL, 5 super-blocks for IQ4_XS
CASES = [("IQ4_NL", 96), ("IQ4_NL", 512), ("IQ4_XS", 1280)]
ROWS = 24


def _matrix(k: int, seed: int) -> np.ndarray:
    """Rows of several scales and distributions, with the edge cases llama.cpp handles specially."""
    rng = np.random.default_rng(seed)
    scales = np.array([1e-3, 0.02, 1.0, 30.0, 1e4], np.float32)
    x = rng.standard_normal((ROWS, k)).astype(np.float32) * scales[np.arange(ROWS) % 5, None]
    x[0, :256] = 0  # all-zero (super-)blocks: -0.0 super-block scale in IQ4_XS
    x[1] = 0
    x[2, rng.integers(0, k)] = 1e4  # one huge value
    x[3] = 1e-20  # below GROUP_MAX_EPS
    x[4, ::7] = 1e-20  # tiny values among normal ones
    x[5] = -np.abs(x[5])  # all negative
    x[6] = np.abs(x[6])
    x[7] = rng.laplace(size=k)  # heavy tails
    x[8] = rng.standard_cauchy(size=k)
    x[9, :32] = 0.5  # a constant block
    x[12, 32:64] *= 1e-5  # a small block among values of scale 1
    return x.astype(np.float32)


def _imatrix(k: int, seed: int) -> np.ndarray:
    return np.exp(np.random.default_rng(seed).normal(0, 2, k)).astype(np.float32)


def _dequantize_gguf(raw: np.ndarray, name: str) -> np.ndarray:
    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name])


@pytest.mark.oracle
@pytest.mark.parametrize("name,k", CASES)
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_bytes_equal_llama_cpp(name, k, with_imatrix):
    fmt = get_format(name)
    x = _matrix(k, seed=k)
    imatrix = _imatrix(k, seed=k + 1) if with_imatrix else None
    ours = fmt.to_bytes(quantize(x, name, imatrix, check=False))  # llama.cpp's bytes, out-of-range rows too
    ref = llama_oracle.quantize(x, name, imatrix)
    assert llama_oracle.block_mismatch(ours, ref, fmt.type_size)[0] == 0


@pytest.mark.oracle
@pytest.mark.parametrize("name", ["IQ4_NL", "IQ4_XS"])
def test_dequantize_equals_gguf_py(name):
    fmt = get_format(name)
    x = _matrix(512, seed=7)
    raw = llama_oracle.quantize(x, name, _imatrix(512, seed=8))
    random = np.random.default_rng(9).integers(0, 256, (16, raw.shape[1]), dtype=np.uint8)
    d = random.reshape(16, -1, fmt.type_size)[..., :2].view(np.uint16)
    d &= 0xFBFF  # a finite f16 super-block scale (every other bit pattern is a valid block)
    for data in (raw, random):
        ours = np.asarray(jax.jit(lambda q: q.dequantize())(fmt.from_bytes(data, (data.shape[0], 512))))
        assert np.array_equal(ours.view(np.uint32), _dequantize_gguf(data, name).view(np.uint32))


@pytest.mark.parametrize("name", ["IQ4_NL", "IQ4_XS"])
def test_bytes_round_trip(name):
    fmt = get_format(name)
    raw = np.random.default_rng(10).integers(0, 256, (3, 4 * fmt.type_size), dtype=np.uint8)
    q = fmt.from_bytes(raw, (3, 4 * fmt.block_size))
    assert np.array_equal(fmt.to_bytes(q), raw)


@pytest.mark.oracle
@pytest.mark.parametrize("name,k", CASES[1:])
def test_subnormal_blocks_dequantize_alike(name, k):
    # XLA's CPU flushes subnormal floats, the C does not: for |x| ~ 1e-8 the C's sums go subnormal
    # and the index bits may differ, but the f16 scale underflows to 0 in both, so values agree.
    fmt = get_format(name)
    x = (np.random.default_rng(11).standard_normal((ROWS, k)) * 1e-8).astype(np.float32)
    x[1] = 1e-14  # constant blocks just above GROUP_MAX_EPS
    ours = _dequantize_gguf(fmt.to_bytes(quantize(x, name, check=False)), name)  # all lost, as in llama.cpp
    ref = _dequantize_gguf(llama_oracle.quantize(x, name), name)
    assert np.array_equal(ours, ref) and not ref.any()
