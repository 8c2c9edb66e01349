"""Properties over every registered format: llama.cpp's bytes for any shape and values the format
admits (zeros, huge and tiny values included), and clear errors for bad input."""

from __future__ import annotations

import dataclasses

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
        q = jq.quantize(x, name, imatrix, check=False)  # llama.cpp's bytes, out-of-range inputs too
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
        q = jq.quantize(x, name, imatrix, check=False)  # row 2 is out of the f16 scales' range
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


# Finite inputs out of a format's range: a scale overflows (non-finite values) or underflows (all lost).
OUT_OF_RANGE = [("AFQ4_G64", 7e4, "quantizes to a non-finite value"), ("HQQ4_G64", 7e4, "non-finite"),
                ("Q4_0", 5e5, "non-finite"), ("F16", 7e4, "non-finite"),
                ("Q6_K", 1e30, r"loses all its values \(relative RMS error 100%\)"), ("IQ4_XS", 1e30, "loses all")]


@pytest.mark.parametrize("name,scale,what", OUT_OF_RANGE)
def test_values_out_of_the_formats_range_are_reported(name, scale, what):
    x = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32)
    x[1] *= np.float32(scale)  # one row out of range; the first element it spoils is in that row
    with pytest.raises(QuantizeInputError, match=rf"{name}: tensor 'blk\.0\.ffn_up\.weight' .*{what}.* at index "
                                                 r"\(1, \d+\).*check=False"):
        jq.quantize(x, name, name="blk.0.ffn_up.weight")
    y = np.asarray(jq.dequantize(jq.quantize(x, name, check=False), jnp.float32))  # the opt-out keeps the result
    assert not np.isfinite(y[1]).all() or not y[1].any()


def test_the_opt_out_keeps_gguf_pys_bytes():
    import gguf

    x = (np.random.default_rng(1).standard_normal((4, 64)) * 5e5).astype(np.float32)  # f16 scales overflow
    q = jq.quantize(x, "Q4_0", check=False)
    with np.errstate(over="ignore"):
        ref = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q4_0)
    assert np.array_equal(jq.get_format("Q4_0").to_bytes(q), ref)


@pytest.mark.parametrize("name,scale", [("FP8_E4M3", 1e30), ("Q8_0", 1e6), ("BF16", 1e30), ("Q4_0", 1e-3)])
def test_large_and_small_values_within_range_pass(name, scale):
    """Squares of 1e30 overflow float32: the check then looks again in float64, and passes."""
    x = (np.random.default_rng(2).standard_normal((2, 256)) * scale).astype(np.float32)
    y = np.asarray(jq.dequantize(jq.quantize(x, name), jnp.float32), np.float64)
    assert np.isfinite(y).all() and np.sqrt(((y - x) ** 2).sum() / (x.astype(np.float64) ** 2).sum()) < 0.2


@pytest.mark.parametrize("name", jq.list_formats(quantizable_only=True))
def test_empty_input_is_refused(name):
    k = 128 * jq.get_format(name).block_size
    for shape in ((0, k), (4, 0), (2, 0, k)):
        with pytest.raises(QuantizeInputError, match=rf"{name}: tensor 'e' has no elements \(shape"):
            jq.quantize(np.zeros(shape, np.float32), name, name="e")


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
    """Every registered format quantizes today; a format registered without a quantizer (one a
    file can hold that jaxquant cannot make) is refused by name."""
    q4 = jq.get_format("Q4_0")
    load_only = dataclasses.replace(q4, name="Q4_0_LOAD_ONLY", quantize_rows=None)
    with pytest.raises(jq.FormatError, match="Q4_0_LOAD_ONLY can be loaded and dequantized but not quantized"):
        jq.quantize(np.ones((1, 256), np.float32), load_only)


def test_bf16_and_f16_round_like_ggml():
    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    assert np.array_equal(np.asarray(jq.quantize(x, "F16")).view(np.uint16), llama_oracle.quantize(x, "F16").view(np.uint16).reshape(8, 64))
    assert np.array_equal(np.asarray(jq.quantize(x, "BF16")).view(np.uint16), llama_oracle.quantize(x, "BF16").view(np.uint16).reshape(8, 64))
