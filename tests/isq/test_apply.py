"""Streaming ISQ on small checkpoints: a bf16 Hugging Face model quantized by a mix equals llama.cpp's
quantization of the same float rows (with and without an imatrix), kept tensors stay as stored,
the progress bar, imatrix checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import jaxquant as jq
import llama_oracle
from jaxquant.errors import JaxquantError, PolicyError, QuantizeInputError
from jaxquant.io import open_model
from jaxquant.isq import Policy, Rule, preset
from jaxquant.isq.apply import QuantizedSource, quantize_model, quantized_source
from jaxquant.qtensor import QTensor

# Every matrix 256 x 256: one compiled quantizer per format (compiles dominate on a model this small).
SMALL = dict(vocab_size=256, hidden_size=256, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, head_dim=64, max_position_embeddings=64, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> str:
    """A Qwen2-shaped bf16 checkpoint with random weights (transformers' save_pretrained)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen2Config(**SMALL), dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.02 if p.ndim == 2 else 1.0))
    path = tmp_path_factory.mktemp("hf") / "qwen2"
    model.save_pretrained(path)
    return str(path)


def _imatrix(src) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {n: rng.gamma(1.0, 1.0, src.info(n).shape[-1]).astype(np.float32)
            for n in src.tensor_names if n.startswith("blk.") and len(src.info(n).shape) == 2}


@pytest.mark.oracle
@pytest.mark.parametrize("mix, with_imatrix", [("Q4_K_M", False), pytest.param("Q3_K_M", True, marks=pytest.mark.slow),
                                               pytest.param("IQ4_XS", True, marks=pytest.mark.slow)])
def test_hf_bf16_model_quantizes_as_llama_cpp(hf_model, mix, with_imatrix):
    src = open_model(hf_model)
    imatrix = _imatrix(src) if with_imatrix else None
    out = quantize_model(src, mix, imatrix, show_progress=False)
    plan = preset(mix).plan(src, has_imatrix=with_imatrix)
    assert list(out) == [c.name for c in plan.choices]
    seen = set()
    for c in plan.choices:
        x = np.asarray(src.load(c.name))
        if not c.requantize:
            assert np.array_equal(np.asarray(out[c.name]), x) and out[c.name].dtype == x.dtype, c.name
            continue
        q = out[c.name]
        assert isinstance(q, QTensor) and q.fmt == c.format and q.shape == c.shape
        w = imatrix.get(c.name) if imatrix else None
        ref = llama_oracle.quantize(x.astype(np.float32), c.format, w)  # bf16 -> f32 is exact, as in llama.cpp
        assert np.array_equal(q.format.to_bytes(q), ref), (c.name, c.format)
        seen.add(c.format)
    assert len(seen) >= 2, seen  # the mix really mixes


def test_kept_tensors_are_the_stored_ones_and_progress_is_shown(hf_model, capsys):
    src = open_model(hf_model)
    out = quantize_model(src, Policy(default="Q8_0", rules=[Rule("skip", role="ffn_down")]), show_progress=True)
    for name in src.tensor_names:
        if "ffn_down" in name or name.endswith("norm.weight"):
            assert np.array_equal(np.asarray(out[name]), np.asarray(src.load(name)))
    err = capsys.readouterr().err
    assert f"[{len(src.tensor_names)}/{len(src.tensor_names)}]" in err and "-> Q8_0" in err


def test_requantizing_a_quantized_tensor_dequantizes_it_first(hf_model):
    """A source holding Q4_K tensors, requantized to Q8_0: the Q8_0 bytes are llama.cpp's for the
    dequantized Q4_K values (what llama-quantize --allow-requantize does)."""
    base = open_model(hf_model)
    q4 = QuantizedSource(base, Policy(default="Q4_K").plan(base))
    again = quantize_model(q4, Policy(default="Q8_0"), show_progress=False)
    name = "blk.0.ffn_up.weight"
    x = np.asarray(q4.load(name).dequantize())
    q = again[name]
    assert np.array_equal(q.format.to_bytes(q), llama_oracle.quantize(x, "Q8_0"))


def test_imatrix_checks(hf_model):
    src = open_model(hf_model)
    bad = {"blk.0.attn_q.weight": np.ones(100, np.float32)}
    with pytest.raises(JaxquantError, match=r"imatrix entry 'blk\.0\.attn_q\.weight' has 100 values, tensor "
                                            r"\[256, 256\] needs 256"):
        quantized_source(src, "Q4_K_M", bad).load("blk.0.attn_q.weight")
    embd = {"token_embd.weight": np.ones(7, np.float32)}  # llama.cpp ignores a wrong-sized embeddings entry
    q = quantized_source(src, "Q8_0", embd).load("token_embd.weight")
    assert np.array_equal(np.asarray(q.dequantize()), np.asarray(jq.quantize(src.load("token_embd.weight"),
                                                                              "Q8_0").dequantize()))
    with pytest.raises(JaxquantError, match="non-finite"):
        quantized_source(src, "Q4_K_M", {"blk.0.attn_q.weight": np.full(256, np.nan, np.float32)})
    with pytest.raises(PolicyError, match="plan was made without an imatrix"):
        QuantizedSource(src, preset("Q4_K_M").plan(src), {"blk.0.attn_q.weight": np.ones(256, np.float32)})
    # an imatrix without an entry for a tensor that needs one: llama-quantize bails out on that tensor
    partial = {"blk.0.attn_q.weight": np.ones(256, np.float32)}
    with pytest.raises(PolicyError, match=r"Missing importance matrix for tensor blk\.0\.attn_k\.weight in a very "
                                          r"low-bit quantization \(IQ3_XXS\)"):
        quantized_source(src, "IQ3_XS", partial).load("blk.0.attn_k.weight")


def test_a_tensor_out_of_the_formats_range_is_an_error_unless_the_policy_keeps_it(tmp_path):
    """ffn_down at 1e30: Q6_K's f16 scale underflows and every value is lost (llama.cpp writes those
    bytes silently); ISQ reports it by default, Policy(check=False) keeps llama.cpp's result."""
    import gguf_samples as gs

    rng = np.random.default_rng(0)
    tensors = {}
    for name, _, shape in gs.TINY_LLAMA_TENSORS:
        x = rng.standard_normal(shape).astype(np.float32) * (1e30 if name == "blk.0.ffn_down.weight" else 0.05)
        tensors[name] = ("F32", shape, x.view(np.uint8).reshape(-1))
    path = tmp_path / "f32.gguf"
    gs.write_sample(path, tensors, metadata={"llama.feed_forward_length": (256, gs.V.UINT32, None)})
    with pytest.raises(QuantizeInputError, match=r"Q6_K: tensor 'blk.0.ffn_down.weight' loses all its values "
                                                 r"\(relative RMS error 100%\)"):
        jq.load(path, isq=Policy(default="Q6_K"))
    kept = jq.load(path, isq=Policy.from_dict({"default": "Q6_K", "check": False}))
    down = kept.params.layers[0].ffn_down
    assert down.fmt == "Q6_K" and not np.asarray(down.dequantize()).any()
    with pytest.raises(PolicyError, match="'check' must be true or false"):
        Policy.from_dict({"default": "Q6_K", "check": "no"})
