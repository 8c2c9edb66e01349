"""Lattice formats IQ1_S ... IQ3_S: quantized bytes equal llama.cpp's on adversarial rows (with and
without an imatrix where llama.cpp allows it), the imatrix refusal; blocks written by llama.cpp's
own quantizers and random bytes dequantized bit for bit as gguf-py does; bytes -> QTensor -> bytes."""

from __future__ import annotations

import gguf
import jax
import llama_oracle
import numpy as np
import pytest
from edge_cases import edge_matrix, imatrix

from jaxquant.errors import QuantizeInputError
from jaxquant.formats import get_format, quantize

TYPES = ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S"]
NEEDS_IMATRIX = {"IQ1_S", "IQ2_XXS", "IQ2_XS"}  # ggml_quantize_requires_imatrix
K = 512


def _dequantize(name: str, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ours, gguf-py's) dequantization of the bytes ``raw`` [rows, row_bytes]."""
    q = get_format(name).from_bytes(raw, (raw.shape[0], raw.shape[1] // get_format(name).type_size * 256))
    ours = np.asarray(jax.jit(lambda t: t.dequantize())(q))
    with np.errstate(invalid="ignore", over="ignore"):  # random bytes hold NaN/Inf f16 scales
        ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name])
    return ours, ref


def _assert_same_floats(ours: np.ndarray, ref: np.ndarray) -> None:
    """Equal bits, except that a NaN may carry another payload (XLA's f16->f32 drops it)."""
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(ours), nan)
    assert np.array_equal(ours.view(np.uint32)[~nan], ref.view(np.uint32)[~nan])


def _matrix(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((12, K)) * np.array([1e-3, 1.0, 30.0])[np.arange(12) % 3, None]
    x[0, :256] = 0  # an all-zero super-block
    x[1, rng.integers(0, K)] = 1e3  # one huge value
    x[2] = -np.abs(x[2])
    x[4] = rng.laplace(size=K)
    x[5, ::5] = 1e-20
    return x.astype(np.float32)


@pytest.mark.oracle
@pytest.mark.parametrize("name,with_imatrix", [(n, w) for n in TYPES for w in (True, False)
                                               if w or n not in NEEDS_IMATRIX])
def test_dequantize_llama_cpp_blocks(name, with_imatrix):
    imatrix = np.random.default_rng(1).uniform(0.01, 10, K).astype(np.float32) if with_imatrix else None
    x = _matrix(seed=2)
    raw = llama_oracle.quantize(x, name, imatrix)
    ours, ref = _dequantize(name, raw)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
    assert np.abs(ref - x)[3].mean() < np.abs(x[3]).mean()  # real blocks, not zeros


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_random_bytes(name):
    # every bit pattern is a valid block; 1024 blocks reach every index of the largest grid
    fmt = get_format(name)
    raw = np.random.default_rng(3).integers(0, 256, (128, 8 * fmt.type_size), dtype=np.uint8)
    _assert_same_floats(*_dequantize(name, raw))


@pytest.mark.parametrize("name", TYPES)
def test_bytes_round_trip(name):
    fmt = get_format(name)
    raw = np.random.default_rng(4).integers(0, 256, (3, 2 * fmt.type_size), dtype=np.uint8)
    assert np.array_equal(fmt.to_bytes(fmt.from_bytes(raw, (3, 512))), raw)


def _adversarial(seed: int) -> np.ndarray:
    """The shared edge-case rows (zeros, outliers, tiny values, ties, a constant block...) and more ties
    for IQ1's value sort. Row 2's 3e38 is dropped: its squares overflow and llama.cpp aborts on it."""
    rng = np.random.default_rng(seed)
    x = edge_matrix(K, 256, seed)
    x[2] = rng.standard_normal(K) * 1e-6
    x[14] = rng.choice(np.array([-1, -0.5, 0, 0.5, 1], np.float32), K)  # few distinct values
    x[15, :256] = -0.0
    x[16] = rng.standard_normal(K) * 1e-10  # subnormal squares and products
    x[17, :16] = 0  # an all-zero sub-block inside a super-block
    return x.astype(np.float32)


def _imatrix(seed: int) -> np.ndarray:
    w = imatrix(K, seed)
    w[:40] = 0  # zero importance: a whole sub-block and part of the next
    w[300:302] = 0
    return w


@pytest.mark.oracle
@pytest.mark.parametrize("name,with_imatrix", [(n, w) for n in TYPES for w in (True, False)
                                               if w or n not in NEEDS_IMATRIX])
def test_bytes_equal_llama_cpp(name, with_imatrix):
    x = _adversarial(seed=5)
    w = _imatrix(seed=6) if with_imatrix else None
    fmt = get_format(name)
    ours = fmt.to_bytes(quantize(x, name, w, check=False))
    assert llama_oracle.block_mismatch(ours, llama_oracle.quantize(x, name, w), fmt.type_size)[0] == 0


def test_quantize_under_jit():
    x = _adversarial(seed=7)[:4]
    traced = jax.jit(lambda a: quantize(a, "IQ3_S").arrays)(x)
    eager = quantize(x, "IQ3_S", check=False).arrays
    assert all(np.array_equal(traced[k], eager[k]) for k in eager)


@pytest.mark.parametrize("name", sorted(NEEDS_IMATRIX))
def test_needs_imatrix(name):
    with pytest.raises(QuantizeInputError, match=f"{name} needs importance weights"):
        quantize(np.ones((1, 256), np.float32), name)
