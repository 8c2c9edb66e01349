"""Perplexity vs llama.cpp: the same tokens, chunks and formula on llama.cpp's own logits, on a
real English text (tests/data/shakespeare.txt: 31,921 Gemma tokens of Shakespeare, public domain,
from karpathy/char-rnn's tinyshakespeare)."""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from jaxquant.eval.synthetic import english_text

import jaxquant
from jaxquant import cli
from jaxquant import text as text_chunks
from jaxquant.eval import perplexity as pp
from jaxquant.errors import JaxquantError

N_CTX = 512
FAST_CHUNKS = 3
TEXT = (Path(__file__).resolve().parents[1] / "data" / "shakespeare.txt").read_text(encoding="utf-8")


def llama_cpp_nll(llm: llama_cpp.Llama, chunks: np.ndarray) -> np.ndarray:
    """llama-perplexity's per-token NLL (log_softmax in perplexity.cpp: float max, expf, double
    sum) on llama.cpp's logits for each chunk run from an empty cache."""
    first = chunks.shape[1] // 2
    out = []
    for chunk in chunks:
        llm.reset()
        llm.eval(chunk.tolist())
        logits = np.array(llm.scores[first:chunks.shape[1] - 1], np.float32)
        m = logits.max(-1)
        sum_exp = np.exp(logits - m[:, None]).astype(np.float64).sum(-1)
        tok = chunk[first + 1:]
        out.append(-((logits[np.arange(len(tok)), tok] - m).astype(np.float64) - np.log(sum_exp)))
    return np.concatenate(out)


@pytest.fixture(scope="module")
def model():
    return jaxquant.load()


@pytest.fixture(scope="module")
def llm(model):
    return llama_cpp.Llama(str(model.path), n_ctx=N_CTX, n_batch=N_CTX, logits_all=True, n_threads=2,
                           verbose=False)


def _compare(model, llm, text: str, n_chunks: int | None) -> pp.PerplexityResult:
    tokens = text_chunks.tokenize(model.tokenizer, text)
    assert tokens == llm.tokenize(text.encode(), add_bos=True, special=False)
    ours = pp.perplexity(model, text, n_ctx=N_CTX, n_chunks=n_chunks, batch=4, show_progress=False)
    chunks = text_chunks.make_chunks(tokens, N_CTX, n_chunks, model.tokenizer.bos_id)
    ppl, err = pp.ppl_and_error(llama_cpp_nll(llm, chunks))
    print(f"\n{len(tokens)} tokens, {ours.n_chunks} chunks: jaxquant PPL {ours.ppl:.4f} +/- {ours.error:.5f}, "
          f"llama.cpp {ppl:.4f} +/- {err:.5f} ({ours.ppl / ppl - 1:+.4%}); {ours.tokens_per_s:.0f} tokens/s")
    assert ours.count == len(chunks) * (N_CTX // 2 - 1)
    assert abs(ours.ppl / ppl - 1) < 0.005 and abs(ours.error / err - 1) < 0.05
    return ours


@pytest.mark.slow  # the 30k-token test below covers it; kept for a quick check with -m slow -k fast
def test_perplexity_vs_llama_cpp_fast(model, llm):
    _compare(model, llm, TEXT, FAST_CHUNKS)


@pytest.mark.slow
def test_perplexity_vs_llama_cpp_30k_tokens(model, llm):
    """The shipped Q4_K_M file on the whole text (62 chunks of 512)."""
    res = _compare(model, llm, TEXT, None)
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
    res = _compare(other, llm, TEXT, None)
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


def test_cli_json(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(english_text(300, seed=3))
    assert cli.main(["perplexity", "default", "--file", str(text), "--ctx", "64", "--chunks", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_chunks"] == 2 and out["count"] == 2 * 31 and out["ppl"] > 1
