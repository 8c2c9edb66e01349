"""The real Gemma-3-270M GGUF (Q4_K_M as shipped) greedy-decodes what llama.cpp decodes.

Both sides get the same token ids (jaxquant's tokenizer, itself tested against llama.cpp's); llama.cpp
runs with 2 threads and takes the argmax of its logits after every token, stopping on the
end-of-generation tokens as jaxquant does.

jaxquant computes in float32; llama.cpp multiplies quantized weights by activations it rounds to
8 bits, which makes its logits jumpy: changing only its KV cache from f16 to f32 moves them by
7.6% of their maximum. A near tie can then go either way, so the acceptance prompts are varied
texts whose continuations were seen to agree (10 of 18 surveyed prompts agree on 16 tokens with
the shipped file). The second test removes llama.cpp's rounding: on a float32 GGUF holding the
shipped file's dequantized weights (which jaxquant's QTensors dequantize to exactly), every
prompt, the near ties included, must decode the same.
"""

from __future__ import annotations

import llama_oracle
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.generate import encode_prompts
from jaxquant.io import Deferred, TensorInfo, open_model, write_gguf
from jaxquant.qtensor import QTensor

N_TOKENS = 16
PROMPTS = [  # (text, chat)
    ("def fibonacci(n):\n    ", False), ("Der schnellste Weg von Berlin nach München ist", False),
    ("Q: What is the boiling point of water?\nA:", False), ("La Révolution française a commencé en", False),
    ("What is the capital of Japan?", True)]
NEAR_TIES = [("The capital of France is", False), ("1, 2, 3, 5, 8, 13,", False),  # diverge with Q4_K_M
             ("Once upon a time, there was a little girl who", False)]


@pytest.fixture(scope="module")
def model(gemma_path) -> jq.Model:
    return jq.load(gemma_path)


@pytest.fixture(scope="module")
def prompts(model) -> list[list[int]]:
    return [encode_prompts(model, [text], chat)[0] for text, chat in PROMPTS + NEAR_TIES]


@pytest.fixture(scope="module")
def ours(model, prompts) -> list[list[int]]:
    return jq.generate_tokens(model, prompts, max_tokens=N_TOKENS)


@pytest.mark.oracle
@pytest.mark.slow
def test_greedy_tokens_equal_llama_cpp(gemma_path, model, prompts, ours):
    n = len(PROMPTS)
    ref = llama_oracle.greedy(gemma_path, prompts[:n], model.tokenizer.eog_ids, N_TOKENS)
    diverged = llama_oracle.divergences(model.tokenizer, [t for t, _ in PROMPTS], ours[:n], ref)
    assert len(diverged) <= 1, "\n".join(diverged)
    assert all(len(r) == N_TOKENS for r in ref)  # the prompts produce text, not an early stop


@pytest.mark.oracle
@pytest.mark.slow
def test_greedy_tokens_equal_llama_cpp_on_float32_weights(gemma_path, model, prompts, ours, tmp_path):
    src = open_model(gemma_path)

    def as_f32(name: str) -> np.ndarray:
        x = src.load(name)
        return np.asarray(x.dequantize("float32") if isinstance(x, QTensor) else x, np.float32)

    tensors = {n: Deferred(TensorInfo(n, src.info(n).shape, "F32", 4 * src.info(n).size), lambda n=n: as_f32(n))
               for n in src.tensor_names}
    path = tmp_path / "gemma-f32.gguf"
    write_gguf(path, {**src.metadata, "general.file_type": 0}, tensors, src.value_types)
    ref = llama_oracle.greedy(str(path), prompts, model.tokenizer.eog_ids, N_TOKENS, type_k=0, type_v=0)  # f32 KV
    diverged = llama_oracle.divergences(model.tokenizer, [t for t, _ in PROMPTS + NEAR_TIES], ours, ref)
    assert not diverged, "\n".join(diverged)
