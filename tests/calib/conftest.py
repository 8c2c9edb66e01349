"""A tiny random Llama (HF safetensors checkpoint with a word-level tokenizer) and a calibration
text it tokenizes without unknown words, for the calibration pipeline's fast tests."""

from __future__ import annotations

import json
import re

import pytest

from jaxquant.eval.synthetic import english_text


@pytest.fixture(scope="session")
def tiny_text() -> str:
    return english_text(1500, seed=3)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tiny_text) -> str:
    """A 2-layer Llama (hidden 64, GQA 4/2, FFN 128) whose vocabulary is the words of ``tiny_text``."""
    import torch
    import transformers

    words = sorted(set(re.findall(r"\w+|[^\w\s]", tiny_text)))
    vocab = {"<unk>": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, bos_token_id=1, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path, safe_serialization=True)
    tokenizer = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
                 "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
                 "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    return str(path)
