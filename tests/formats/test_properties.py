"""Properties over every registered format: llama.cpp's bytes for any shape and values the format
admits (zeros, huge and tiny values included), and clear errors for bad input."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import jaxquant as jq
import llama_oracle
from jaxquant.errors import QuantizeInputError

# llama.cpp's block types; the formats without a GGML type are tested against their own references
QUANTIZABLE = [n for n in jq.list_formats(quantizable_only=True)
               if n not in ("F32", "F16", "BF16") and jq.get_format(n).gguf]
NEEDS_IMATRIX = ("IQ1_S", "IQ2_XXS", "IQ2_XS")  # ggml_quantize_requires_imatrix
# llama.cpp's lattice quantizers abort (GGML_ASSERT) once a weighted squared error overflows to inf:
# |x|^4 (no imatrix) or ~|x|^3 (imatrix) past FLT_MAX; below this every input is theirs to quantize
LATTICE_MAX = 1e9


def _lattice(name: str) -> bool:
    return jq.get_format(name).family == "ggml_iq_lattice"


@st.composite
def matrices(draw, block: int) -> np.ndarray:
    rows = draw(st.sampled_from([1, 3]))
    k = block * draw(st.sampled_from([1, 2]))
    scale = draw(st.sampled_from([1e-20, 1e-3, 1.0, 1e3, 1e30]))
    x = draw(st.integers(0, 2**32 - 1).map(lambda s: np.random.default_rng(s).standard_normal((rows, k))))
    x = (x * scale).astype(np.float32)
    kind = draw(st.sampled_from(["plain", "zero_block", "outlier", "sparse", "constant"]))
    if kind == "zero_block":
        x[0, :block] = 0
    elif kind == "outlier":
        x[-1, draw(st.integers(0, k - 1))] = draw(st.sampled_from([-6e4, 1e10, 1e30]))
    elif kind == "sparse":
        x[np.abs(x) < np.median(np.abs(x))] = 0
    elif kind == "constant":
        x[:] = np.float32(scale)
    return x


@pytest.mark.oracle
@pytest.mark.parametrize("name", QUANTIZABLE)
def test_quantize_matches_llama_cpp_on_any_input(name):
    fmt = jq.get_format(name)

    @settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(x=matrices(fmt.block_size), with_imatrix=st.booleans())
    def check(x, with_imatrix):
        if _lattice(name):
            assume(np.abs(x).max() < LATTICE_MAX)
            with_imatrix = with_imatrix or name in NEEDS_IMATRIX
        imatrix = np.random.default_rng(1).uniform(0.01, 4.0, x.shape[-1]).astype(np.float32) if with_imatrix else None
        q = jq.quantize(x, name, imatrix)
        ref = llama_oracle.quantize(x, name, imatrix)
        # Byte equality is the spec, NaN scales included: llama.cpp writes them where squares overflow
        # or underflow (e.g. 1e-21 beside 6e4 zeroes every weight of a 0/0 scale search).
        assert np.array_equal(fmt.to_bytes(q), ref)

    check()


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_zero_and_outlier_blocks_get_finite_scales(name):
    fmt = jq.get_format(name)
    x = np.random.default_rng(3).standard_normal((4, 2 * fmt.block_size)).astype(np.float32)
    x[0] = 0  # all-zero blocks
    x[1, 3] = 6e4  # a huge value among ordinary ones
    x[2, :fmt.block_size] = 1e8 if _lattice(name) else 1e10
    for imatrix in (None, np.linspace(0.1, 2, x.shape[-1], dtype=np.float32))[name in NEEDS_IMATRIX:]:
        q = jq.quantize(x, name, imatrix)
        assert np.array_equal(fmt.to_bytes(q), llama_oracle.quantize(x, name, imatrix))
        scales = [np.asarray(a, np.float32) for a in q.arrays.values() if a.dtype == jnp.float16]
        assert not any(np.isnan(s).any() for s in scales), "NaN scale"
        assert np.isfinite(np.asarray(q.dequantize())[[0, 1]]).all()


def test_nan_and_inf_name_the_tensor_and_first_index():
    x = np.ones((4, 64), np.float32)
    x[2, 17] = np.nan
    x[3, 0] = np.inf
    with pytest.raises(QuantizeInputError, match=r"'blk\.3\.attn_q\.weight'.*index \(2, 17\)"):
        jq.quantize(x, "Q4_0", name="blk.3.attn_q.weight")
    w = np.ones(64, np.float32)
    w[5] = np.inf
    with pytest.raises(QuantizeInputError, match=r"importance weight.*index \(5,\)"):
        jq.quantize(np.ones((4, 64), np.float32), "Q4_0", w)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "IQ4_XS"])
def test_row_length_not_divisible(name):
    block = jq.get_format(name).block_size
    with pytest.raises(QuantizeInputError, match=f"row length {block + 16}.*block size {block}"):
        jq.quantize(np.ones((2, block + 16), np.float32), name, name="t")


def test_wrong_dtypes_and_shapes():
    with pytest.raises(QuantizeInputError, match="dtype int32"):
        jq.quantize(np.ones((2, 32), np.int32), "Q8_0")
    with pytest.raises(QuantizeInputError, match=r"importance weights.*shape \(16,\), expected \(32,\)"):
        jq.quantize(np.ones((2, 32), np.float32), "Q4_0", np.ones(16, np.float32))
    with pytest.raises(jq.FormatError, match="unknown format 'Q9_9'; valid: .*Q4_K"):
        jq.quantize(np.ones((2, 32), np.float32), "Q9_9")


def test_dequantize_only_formats_refuse_to_quantize():
    with pytest.raises(jq.FormatError, match="IQ2_XXS can be loaded and dequantized but not quantized"):
        jq.quantize(np.ones((1, 256), np.float32), "IQ2_XXS")


def test_bf16_and_f16_round_like_ggml():
    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    assert np.array_equal(np.asarray(jq.quantize(x, "F16")).view(np.uint16), llama_oracle.quantize(x, "F16").view(np.uint16).reshape(8, 64))
    assert np.array_equal(np.asarray(jq.quantize(x, "BF16")).view(np.uint16), llama_oracle.quantize(x, "BF16").view(np.uint16).reshape(8, 64))
