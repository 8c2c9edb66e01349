"""jaxquant.generate: batching, sampling, stopping, streaming and bad input.

Most checks run a tiny random Gemma-3-shaped model (compiles in seconds); batching is also checked
on the real Gemma-3-270M GGUF (slow: two compilations of the full model on CPU). Sampling filters
are checked against a numpy reference written from their definitions.
"""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_model import TINY, tiny_model

import jaxquant as jq
from jaxquant.config import ModelConfig
from jaxquant.generate import Sampling, encode_prompts, filter_logits, stream, stream_tokens

gen = importlib.import_module("jaxquant.generate")  # the module; jaxquant.generate is the function

PROMPTS = [[5, 17, 9], list(range(20, 33)), [7], list(range(100, 109))]  # 3, 13, 1 and 9 tokens
N = 16  # new tokens; most tests share this batch and length, so they share one compiled program
SAMPLING = Sampling(temperature=1.3, top_k=50, top_p=0.95, min_p=0.01)


@pytest.fixture(scope="module")
def tiny() -> jq.Model:
    return tiny_model()


@pytest.fixture(scope="module")
def gemma() -> jq.Model:
    return jq.load()


# ---- batching and stopping ------------------------------------------------------------------------

def test_batched_greedy_equals_each_prompt_alone(tiny):
    batched = jq.generate_tokens(tiny, PROMPTS, max_tokens=N)
    alone = [jq.generate_tokens(tiny, [p], max_tokens=N)[0] for p in PROMPTS]
    assert batched == alone
    assert all(len(row) == N for row in batched) and len({tuple(r) for r in batched}) == len(PROMPTS)


@pytest.mark.slow
def test_batched_greedy_equals_each_prompt_alone_gemma(gemma):
    texts = ["The capital of France is", "def fibonacci(n):", "In 1969, the first humans to walk on the Moon were",
             "Rain"]
    prompts = encode_prompts(gemma, texts)
    assert len({len(p) for p in prompts}) == len(prompts)
    batched = jq.generate_tokens(gemma, prompts, max_tokens=8)
    alone = [jq.generate_tokens(gemma, [p], max_tokens=8)[0] for p in prompts]
    assert batched == alone, [(t, b, a) for t, b, a in zip(texts, batched, alone) if b != a]


def test_context_end_stops_rows(tiny):
    # A 48-token context: a prompt of n tokens gets 48 - n new tokens.
    out = jq.generate_tokens(tiny, PROMPTS, max_tokens=40)
    assert [len(r) for r in out] == [40, 35, 40, 39]


def test_stop_ids_end_a_row_which_then_stops_changing(tiny):
    free = jq.generate_tokens(tiny, PROMPTS, max_tokens=N)
    stop = free[1][4]
    first = free[1].index(stop)
    out = jq.generate_tokens(tiny, PROMPTS, max_tokens=N, stop=[stop])
    for row, ref in zip(out, free):
        assert row == (ref[:ref.index(stop)] if stop in ref else ref)
    assert out[1] == free[1][:first]
    # Streamed, the stopped row yields nothing from its stop on while the others go on.
    steps = list(stream_tokens(tiny, PROMPTS, max_tokens=N, stop=[stop]))
    assert [sum((s[r] for s in steps), []) for r in range(len(PROMPTS))] == out
    assert all(s[1] == [] for s in steps[first:])


def test_stop_set_holds_config_eos_tokenizer_eog_and_stop(gemma):
    model = jq.Model(None, ModelConfig(**{**vars(gemma.cfg), "eos_ids": (7,)}), gemma.tokenizer)
    ids = set(gen._stop_ids(model, [9, 7]).tolist()) - {-1}
    assert ids == {7, 9} | gemma.tokenizer.eog_ids
    assert {gemma.tokenizer.token_to_id[t] for t in ("<eos>", "<end_of_turn>")} <= ids


def test_streamed_tokens_equal_one_call(tiny):
    whole = jq.generate_tokens(tiny, PROMPTS, max_tokens=N, seed=7, **vars(SAMPLING))
    steps = list(stream_tokens(tiny, PROMPTS, max_tokens=N, sampling=SAMPLING, seed=7))
    assert len(steps) == N and all(len(row) == 1 for s in steps for row in s)
    assert [sum((s[r] for s in steps), []) for r in range(len(PROMPTS))] == whole


def test_nan_logits_raise(tiny):
    """A broken model (NaN in the embedding row of token 7, the prompt of row 2) raises instead of
    returning a made-up or empty continuation; streamed, at the step that met the NaN."""
    embd = tiny.params.token_embd  # kept as the output matrix, so that only sequences holding 7 meet the NaN
    broken = jq.Model(dataclasses.replace(tiny.params, token_embd=embd.at[7].set(jnp.nan), output=embd), TINY, None)
    with pytest.raises(jq.JaxquantError, match=r"logits are NaN for prompt\(s\) \[2\] after \[0\] new tokens"):
        jq.generate_tokens(broken, PROMPTS, max_tokens=N)
    steps = stream_tokens(broken, PROMPTS, max_tokens=N)
    with pytest.raises(jq.JaxquantError, match=r"logits are NaN for prompt\(s\) \[2\]"):
        next(steps)


# ---- sampling ---------------------------------------------------------------------------------------

def test_top_k_1_equals_greedy(tiny):
    greedy = jq.generate_tokens(tiny, PROMPTS, max_tokens=N)
    assert jq.generate_tokens(tiny, PROMPTS, max_tokens=N, temperature=5.0, top_k=1, seed=3) == greedy


def test_seed_decides_the_sample(tiny):
    def run(seed: int, sampling: Sampling = SAMPLING) -> list[list[int]]:
        return jq.generate_tokens(tiny, PROMPTS, max_tokens=N, seed=seed, **vars(sampling))

    assert run(1) == run(1)
    assert run(1) != run(2)
    assert run(1) != run(1, Sampling())
    # The sampling values are traced: new ones reuse the compiled program and change the draw.
    assert run(1) != run(1, Sampling(temperature=0.5, top_k=50, top_p=0.9, min_p=0.02))


def _reference_filter(logits: np.ndarray, s: Sampling) -> np.ndarray:
    """transformers' order: temperature, top-k, top-p, min-p; -inf marks excluded tokens."""
    x = logits.astype(np.float64) / s.temperature
    out = []
    for row in x:
        keep = np.ones(row.shape, bool)
        if s.top_k:
            keep &= row >= np.sort(row)[::-1][s.top_k - 1]
        if s.top_p < 1:
            order = np.argsort(-np.where(keep, row, -np.inf), kind="stable")
            p = np.exp(row[order] - row[order][0]) * keep[order]
            p /= p.sum()
            before = np.cumsum(p) - p
            kept = order[before < s.top_p]
            keep &= row >= row[kept].min()
        if s.min_p:
            p = np.where(keep, np.exp(row - row.max()), 0.0)
            keep &= p >= s.min_p * p.max()
        out.append(np.where(keep, row, -np.inf))
    return np.array(out)


@pytest.mark.parametrize("sampling", [
    Sampling(1.0, top_k=10), Sampling(0.7, top_p=0.9), Sampling(1.0, top_p=0.5), Sampling(2.0, min_p=0.1),
    Sampling(0.8, top_k=40, top_p=0.8, min_p=0.05), Sampling(1.0, top_p=1e-6), Sampling(1.0, min_p=1.0),
    Sampling(1.0, top_k=1000), Sampling(0.5)])
def test_filter_logits_equals_numpy_reference(sampling):
    logits = np.random.default_rng(0).standard_normal((5, 1000)).astype(np.float32) * 3
    ours = np.asarray(filter_logits(logits, sampling))
    ref = _reference_filter(logits, sampling)
    assert np.array_equal(np.isinf(ours), np.isinf(ref))
    np.testing.assert_allclose(ours[~np.isinf(ours)], ref[~np.isinf(ref)], rtol=1e-6)
    assert (~np.isinf(ours)).sum(1).min() >= 1


def test_sampling_draws_only_kept_tokens(tiny):
    sampling = Sampling(1.3, top_k=50, top_p=0.6, min_p=1e-9)  # the filters of SAMPLING: its program
    firsts = {row[0] for seed in range(4)
              for row in jq.generate_tokens(tiny, [PROMPTS[0]] * 4, max_tokens=N, seed=seed, **vars(sampling))}
    logits, _ = jax.jit(jq.models.forward, static_argnums=4)(
        tiny.params, jnp.array([PROMPTS[0]]), jnp.arange(3)[None], jq.models.init_cache(TINY, 1, 16), TINY)
    allowed = set(np.flatnonzero(~np.isinf(np.asarray(filter_logits(logits[0, -1], sampling)))).tolist())
    assert 1 < len(allowed) < 50 and len(firsts) > 1 and firsts <= allowed


# ---- text and chat ---------------------------------------------------------------------------------

def test_chat_prompt_uses_the_gemma_template(gemma):
    ids = encode_prompts(gemma, ["Hi there"], chat=True)[0]
    text = [gemma.tokenizer.token_text(t) for t in ids]
    assert text[:4] == ["<bos>", "<start_of_turn>", "user", "\n"]
    assert text[-5:] == ["<end_of_turn>", "\n", "<start_of_turn>", "model", "\n"]
    assert gemma.tokenizer.token_to_id["<end_of_turn>"] in gemma.tokenizer.eog_ids


@pytest.mark.slow
def test_stream_text_joins_to_generate(gemma):
    parts = list(stream(gemma, ["The capital of France is"], max_tokens=6))
    assert len(parts) == 6
    text = "".join(p[0] for p in parts)
    assert text == jq.generate(gemma, "The capital of France is", max_tokens=6)[0]
    assert text == " the capital of the country of"  # greedy; llama.cpp decodes the same


# ---- bad input, rejected before anything compiles ---------------------------------------------------

@pytest.fixture
def no_compile(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("reached the device loop")

    monkeypatch.setattr(gen, "_run", fail)
    monkeypatch.setattr(gen, "_init_state", fail)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(min_p=-0.1), "min_p"), (dict(min_p=2.0), "min_p"), (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(temperature="hot"), "temperature"), (dict(max_tokens=0), "max_tokens"), (dict(seed=1.5), "seed"),
    (dict(stop=[300]), "stop"), (dict(stop=[-1]), "stop"), (dict(top_p=float("nan")), "top_p"),
    (dict(min_p=float("nan")), "min_p"), (dict(top_k=True), "top_k"), (dict(max_tokens=-5), "max_tokens"),
    (dict(max_tokens=True), "max_tokens"), (dict(max_tokens=2.0), "max_tokens")])
def test_bad_parameters(tiny, no_compile, kwargs, message):
    with pytest.raises(jq.JaxquantError, match=message):
        jq.generate_tokens(tiny, PROMPTS, **kwargs)


@pytest.mark.parametrize("prompts, message", [
    ([], "non-empty"), ([[1, 2], []], "prompt 1 is empty"), ([[1, 300]], "outside the vocabulary"),
    ([list(range(48))], "context is 48 tokens"), ("abc", "non-empty list")])
def test_bad_prompts(tiny, no_compile, prompts, message):
    with pytest.raises(jq.JaxquantError, match=message):
        jq.generate_tokens(tiny, prompts)


@pytest.mark.parametrize("prompts, kwargs, message", [
    ([[1, 2], []], {}, "prompt 1 is empty"), ([list(range(48))], {}, "context is 48 tokens"),
    (PROMPTS, dict(max_tokens=0), "max_tokens"), (PROMPTS, dict(sampling=dict(temperature=1.0)), "jaxquant.Sampling")])
def test_streaming_rejects_bad_input_at_the_call(tiny, no_compile, prompts, kwargs, message):
    with pytest.raises(jq.JaxquantError, match=message):
        stream_tokens(tiny, prompts, **kwargs)  # raises without being iterated


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.01), "top_p"),
    (dict(top_k=-3), "top_k"), (dict(min_p=-0.01), "min_p"), (dict(min_p=1.5), "min_p")])
def test_sampling_rejects_bad_values(kwargs, message):
    with pytest.raises(jq.JaxquantError, match=rf"sampling: {message}="):
        Sampling(**kwargs)


def test_bad_text_prompts(tiny, gemma, no_compile):
    cfg = ModelConfig(**{**vars(TINY), "vocab_size": gemma.cfg.vocab_size})  # a 48-token context
    model = jq.Model(tiny.params, cfg, gemma.tokenizer)
    with pytest.raises(jq.JaxquantError, match="prompt 0 is empty"):
        jq.generate(model, "")
    with pytest.raises(jq.JaxquantError, match=r"prompt 1 has \d+ tokens; the model's context is 48"):
        jq.generate(model, ["hello", "word " * 60])
    with pytest.raises(jq.JaxquantError, match="top_p"):
        jq.generate(model, "hello", top_p=2.0)
    with pytest.raises(jq.JaxquantError, match="no tokenizer"):
        jq.generate(tiny, "hello")
    with pytest.raises(jq.JaxquantError, match=r"prompt 0 has \d+ tokens; the model's context is 48"):
        stream(model, ["word " * 60])  # at the call, before the first step
    with pytest.raises(jq.JaxquantError, match="prompt 0 is empty"):
        stream(model, [""])
    with pytest.raises(jq.JaxquantError, match="max_tokens"):
        stream(model, ["hello"], max_tokens=0)
