"""Perplexity vs llama.cpp: the same tokens, chunks and formula on llama.cpp's own logits, on a
real English text (tests/data/shakespeare.txt: 31,921 Gemma tokens of Shakespeare, public domain,
from karpathy/char-rnn's tinyshakespeare)."""

from __future__ import annotations

import ctypes
import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import llama_cpp
import numpy as np
import pytest
from llama_oracle import compare_perplexity
from tiny_model import TINY, tiny_model

import jaxquant
from jaxquant import cli
from jaxquant import text as text_chunks
from jaxquant.errors import JaxquantError
from jaxquant.eval import perplexity as pp
from jaxquant.eval.synthetic import english_text

N_CTX = 512
FAST_CHUNKS = 3
TEXT = (Path(__file__).resolve().parents[1] / "data" / "shakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def model():
    return jaxquant.load()


@pytest.fixture(scope="module")
def llm(model):
    return llama_cpp.Llama(str(model.path), n_ctx=N_CTX, n_batch=N_CTX, logits_all=True, n_threads=2,
                           verbose=False)


@pytest.mark.slow  # the 30k-token test below covers it; kept for a quick check with -m slow -k fast
def test_perplexity_vs_llama_cpp_fast(model, llm):
    compare_perplexity(model, llm, TEXT, N_CTX, FAST_CHUNKS)


@pytest.mark.slow
def test_perplexity_vs_llama_cpp_30k_tokens(model, llm):
    """The shipped Q4_K_M file on the whole text (62 chunks of 512)."""
    res, _, _ = compare_perplexity(model, llm, TEXT, N_CTX, None)
    assert res.n_tokens >= 30000 and res.n_chunks == 62


@pytest.fixture(scope="module")
def float_gguf(model, tmp_path_factory) -> str:
    """The shipped model dequantized into an F32 GGUF (the float model llama-quantize starts from)."""
    from jaxquant.io import open_model
    from jaxquant.isq import Policy
    from jaxquant.isq.apply import write_quantized_gguf

    path = str(tmp_path_factory.mktemp("ppl") / "f32.gguf")
    write_quantized_gguf(open_model(model.path), Policy(default="F32"), path, show_progress=False)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("mix", ["Q8_0", "Q4_0"])
def test_perplexity_vs_llama_cpp_quantized_by_llama_cpp(mix, float_gguf, tmp_path):
    """Two other quantizations of the model, made by llama_model_quantize from the float file; the
    whole text."""
    from jaxquant.isq.mixes import FTYPES

    path = str(tmp_path / f"{mix}.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = FTYPES[mix][0], 2
    assert llama_cpp.llama_model_quantize(float_gguf.encode(), path.encode(), ctypes.byref(params)) == 0
    other = jaxquant.load(path)
    assert {t for t in (other.params.layers[0].attn_q.fmt, other.params.layers[5].ffn_down.fmt)} == {mix}
    llm = llama_cpp.Llama(path, n_ctx=N_CTX, n_batch=N_CTX, logits_all=True, n_threads=2, verbose=False)
    res, _, _ = compare_perplexity(other, llm, TEXT, N_CTX, None)
    assert res.n_chunks == 62


def test_chunks_and_formula():
    chunks = text_chunks.make_chunks(list(range(100, 1100)), 8, None, 2)
    assert chunks.shape == (125, 8) and (chunks[:, 0] == 2).all() and chunks[1, 1] == 109
    assert (pp.scored_targets(chunks)[0] == [105, 106, 107]).all()
    assert text_chunks.make_chunks(list(range(100)), 8, 3, None).shape == (3, 8)
    with pytest.raises(JaxquantError, match="at least 16"):
        text_chunks.make_chunks(list(range(15)), 8, None, 2)
    nll = np.array([1.0, 2.0, 3.0])
    ppl, err = pp.ppl_and_error(nll)
    assert ppl == pytest.approx(np.exp(2)) and err == pytest.approx(np.sqrt((14 / 3 - 4) / 2) * np.exp(2))


def test_nan_logits_raise():
    """A broken model (NaN in the embedding row of token 7) raises at the chunk that meets it, instead
    of reporting a NaN or empty perplexity."""
    tiny = tiny_model()
    embd = tiny.params.token_embd  # kept as the output matrix, so that only sequences holding 7 meet the NaN
    broken = jaxquant.Model(dataclasses.replace(tiny.params, token_embd=embd.at[7].set(jnp.nan), output=embd), TINY,
                            None)
    tokens = list(range(100, 148))
    assert np.isfinite(pp.perplexity(broken, tokens=tokens, n_ctx=16, show_progress=False).ppl)
    tokens[40] = 7  # in the third chunk of 16
    with pytest.raises(JaxquantError, match="chunk 2 has NaN/Inf log-likelihoods"):
        pp.perplexity(broken, tokens=tokens, n_ctx=16, show_progress=False)


def test_cli_json(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(english_text(300, seed=3))
    assert cli.main(["perplexity", "default", "--file", str(text), "--ctx", "64", "--chunks", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_chunks"] == 2 and out["count"] == 2 * 31 and out["ppl"] > 1
