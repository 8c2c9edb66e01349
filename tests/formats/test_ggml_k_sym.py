"""Q3_K and Q6_K against llama.cpp (quantize bytes) and gguf-py (dequantize), bit for bit."""

import functools

import gguf
import jax
import llama_oracle
import numpy as np
import pytest

import jaxquant.formats as F
from jaxquant.errors import QuantizeInputError
from jaxquant.formats.registry import get_format
from jaxquant.qtensor import QTensor

FORMATS = ["Q3_K", "Q6_K"]


def _matrix(rows: int, k: int, seed: int) -> np.ndarray:
    """Random rows of several scales plus the cases that take special paths in the C."""
    rng = np.random.default_rng(seed)
    scale = rng.choice([1e-4, 1e-2, 1.0, 50.0, 3e3], size=(rows, 1))
    x = rng.standard_normal((rows, k)) * scale
    x[::7] = rng.uniform(-1, 1, (len(x[::7]), k)) * scale[::7]  # flat tails
    x[0] = 0  # all-zero super-blocks
    x[1, :256] = 0
    x[1, 272:288] = 0  # one all-zero sub-block
    x[2, 5] = 1e4  # a single huge value per super-block: most sub-block scales round to 0
    x[2, 300] = -2e3
    x[3, :] = rng.standard_normal(k) * 1e-20  # tiny: below GROUP_MAX_EPS
    x[3, 40] = 0.5  # ... except one value
    x[4] = -np.abs(x[4])  # negative maxima: make_q3_quants' refinement runs
    x[5] = np.abs(x[5])
    x[6] = rng.integers(-4, 4, k)  # exact small integers: rounding ties
    x[7, 16:32] = 0
    x[7, 20] = -3.0  # a sub-block with one value
    x[8, ::2] *= 1e-30  # tiny values mixed with normal ones
    return x.astype(np.float32)


@functools.cache
def _imatrix(k: int) -> np.ndarray:
    return np.random.default_rng(k).uniform(0.01, 5.0, k).astype(np.float32)


# The longer rows also cover the padded last step of the super-block loop (2200 = 4*512 + 152).
@pytest.mark.parametrize("shape, weighted", [((40, 768), False), ((40, 768), True), ((200, 2816), True)],
                         ids=["ref", "imatrix", "imatrix-long-rows"])
@pytest.mark.parametrize("name", FORMATS)
def test_quantize_bytes_match_llama_cpp(name, shape, weighted):
    x = _matrix(*shape, seed=shape[1])
    qw = _imatrix(shape[1]) if weighted else None
    fmt = get_format(name)
    ours = fmt.to_bytes(F.quantize(x, name, qw))
    ref = llama_oracle.quantize(x, name, qw)
    assert ours.shape == ref.shape
    bad, total = llama_oracle.block_mismatch(ours, ref, fmt.type_size)
    assert bad == 0, f"{name}: {bad}/{total} blocks differ from llama.cpp"


_dequantize = jax.jit(QTensor.dequantize)  # one compiled call instead of op-by-op dispatch


def _gguf_dequantize(raw: np.ndarray, name: str, shape) -> np.ndarray:
    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name]).reshape(shape)


@pytest.mark.parametrize("name", FORMATS)
def test_dequantize_matches_gguf_py(name):
    fmt = get_format(name)
    x = _matrix(24, 512, seed=3)
    ref_bytes = llama_oracle.quantize(x, name)
    ours = np.asarray(_dequantize(fmt.from_bytes(ref_bytes, x.shape)))
    np.testing.assert_array_equal(ours.view(np.uint32), _gguf_dequantize(ref_bytes, name, x.shape).view(np.uint32))
    # arbitrary bit patterns, with finite f16 super-block scales of every magnitude (subnormal too)
    rng = np.random.default_rng(7)
    blocks = rng.integers(0, 256, (64, fmt.type_size), dtype=np.uint8).view(fmt.block_dtype).reshape(64)
    d = rng.integers(0, 0x7C00, 64, dtype=np.uint16) | (rng.integers(0, 2, 64, dtype=np.uint16) << 15)
    blocks["d"] = d.view(np.float16)
    raw = blocks.view(np.uint8).reshape(4, -1)
    shape = (4, 16 * fmt.block_size)
    ours = np.asarray(_dequantize(fmt.from_bytes(raw, shape)))
    np.testing.assert_array_equal(ours.view(np.uint32), _gguf_dequantize(raw, name, shape).view(np.uint32))


@pytest.mark.parametrize("name", FORMATS)
def test_bytes_round_trip(name):
    fmt = get_format(name)
    x = _matrix(12, 1024, seed=11)
    raw = llama_oracle.quantize(x, name, _imatrix(1024))
    q = fmt.from_bytes(raw, x.shape)
    assert q.nbytes == raw.nbytes
    np.testing.assert_array_equal(fmt.to_bytes(q), raw)


@pytest.mark.parametrize("name", FORMATS)
def test_rejects_rows_not_multiple_of_256(name):
    with pytest.raises(QuantizeInputError, match="multiple of the block size 256"):
        F.quantize(np.ones((2, 300), np.float32), name)
