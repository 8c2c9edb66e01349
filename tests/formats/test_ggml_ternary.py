"""TQ1_0 and TQ2_0: bytes against llama.cpp (which ignores an imatrix for them) and gguf-py's
quantize, dequantize against gguf-py bit for bit, and the bytes -> QTensor -> bytes trip."""

from __future__ import annotations

import gguf
import jax
import numpy as np
import pytest

import llama_oracle
from edge_cases import ROWS, edge_matrix, imatrix
from jaxquant.formats import get_format, quantize

TYPES = ["TQ1_0", "TQ2_0"]
K = 768
_dequantize = jax.jit(lambda q: q.dequantize())


def _bytes_mismatch(name: str, x: np.ndarray, weights: np.ndarray | None) -> tuple[int, int]:
    fmt = get_format(name)
    ours = fmt.to_bytes(quantize(x, name, weights, check=False))  # llama.cpp's bytes, out-of-range rows too
    return llama_oracle.block_mismatch(ours, llama_oracle.quantize(x, name, weights), fmt.type_size)


@pytest.mark.oracle
@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_bytes_equal_llama_cpp(name, with_imatrix):
    x = edge_matrix(K, 256, seed=1)
    assert _bytes_mismatch(name, x, imatrix(K, seed=2) if with_imatrix else None) == (0, ROWS * K // 256)


@pytest.mark.oracle
@pytest.mark.parametrize("name", TYPES)
def test_subnormal_inverse_scale(name):
    """Block maxima in [2^126, 2^128): C's 1/d is subnormal, which XLA would flush to zero."""
    rng = np.random.default_rng(3)
    amax = np.exp2(rng.uniform(126, 128, ROWS * K // 256)).astype(np.float32)
    x = (rng.uniform(-1, 1, (ROWS * K // 256, 256)) * amax[:, None]).astype(np.float32)
    x[np.arange(x.shape[0]), rng.integers(0, 256, x.shape[0])] = amax
    assert _bytes_mismatch(name, x.reshape(ROWS, K), None) == (0, ROWS * K // 256)


@pytest.mark.oracle
@pytest.mark.parametrize("name", TYPES)
def test_bytes_equal_gguf_py_quantize(name):
    fmt = get_format(name)
    x = np.random.default_rng(4).standard_normal((ROWS, K)).astype(np.float32)
    ours = fmt.to_bytes(quantize(x, name))
    assert np.array_equal(ours, gguf.quants.quantize(x, gguf.GGMLQuantizationType[name]))


@pytest.mark.oracle
@pytest.mark.parametrize("name", TYPES)
def test_dequantize_equals_gguf_py(name):
    fmt = get_format(name)
    raw = llama_oracle.quantize(edge_matrix(K, 256, seed=5), name)
    # every byte pattern: TQ1_0's qs/qh bytes above 242 decode to trits too
    random = np.random.default_rng(6).integers(0, 256, raw.shape, dtype=np.uint8)
    for data in (raw, random):
        ours = np.asarray(_dequantize(fmt.from_bytes(data, (ROWS, K))))
        with np.errstate(all="ignore"):  # 0 * inf scales in the random blocks: NaN in C too
            ref = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[name])
        assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("name", TYPES)
def test_bytes_round_trip(name):
    fmt = get_format(name)
    raw = np.random.default_rng(7).integers(0, 256, (3, 2 * fmt.type_size), dtype=np.uint8)
    assert np.array_equal(fmt.to_bytes(fmt.from_bytes(raw, (3, 2 * fmt.block_size))), raw)
