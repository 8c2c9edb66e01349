"""ModelConfig from GGUF metadata and from HF config.json: agrees with llama.cpp's reading of the
Gemma GGUF and with the published HF config of the same model; errors name what is wrong."""

from __future__ import annotations

import math

import llama_model
import pytest

from jaxquant.config import SUPPORTED_ARCHS, ModelConfig, RopeScaling
from jaxquant.errors import FileFormatError, JaxquantError
from jaxquant.io import open_model

# google/gemma-3-270m config.json (text model), as published
GEMMA3_270M_HF = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640,
    "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1,
    "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": None,
    "sliding_window": 512, "query_pre_attn_scalar": 256, "attn_logit_softcapping": None,
    "final_logit_softcapping": None, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
}


@pytest.fixture(scope="module")
def gemma(gemma_path):
    return open_model(gemma_path)


def test_gemma_gguf_config(gemma):
    c = gemma.config
    assert (c.arch, c.vocab_size, c.hidden_size, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim) == \
        ("gemma3", 262144, 640, 18, 4, 1, 256, 2048)
    assert c.swa_layers == tuple(i % 6 != 5 for i in range(18)) and c.sliding_window == 512
    assert (c.rope_theta, c.rope_theta_local, c.rope_neox, c.rope_scaling) == (1e6, 1e4, True, None)
    assert (c.query_pre_attn_scalar, c.embed_scale, c.qk_norm, c.activation) == (256.0, math.sqrt(640), True,
                                                                                   "gelu_tanh")
    assert (c.tie_embeddings, c.bos_id, c.eos_id, c.context_length) == (True, 2, 1, 32768)
    hash(c)  # static argument of jit


def test_gemma_gguf_and_hf_configs_agree(gemma):
    assert ModelConfig.from_hf(GEMMA3_270M_HF) == gemma.config
    # transformers 5 writes the rope settings per layer type
    v5 = {k: v for k, v in GEMMA3_270M_HF.items() if k not in ("rope_theta", "rope_local_base_freq", "rope_scaling")}
    v5["rope_parameters"] = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    assert ModelConfig.from_hf(v5) == gemma.config
    old = {k: v for k, v in GEMMA3_270M_HF.items() if k != "layer_types"} | {"sliding_window_pattern": 6}
    assert ModelConfig.from_hf(old) == gemma.config


@pytest.mark.oracle
def test_gemma_config_agrees_with_llama_cpp(gemma, gemma_path):
    facts, c = llama_model.facts(gemma_path), gemma.config
    assert (facts["n_embd"], facts["n_layer"], facts["n_head"], facts["n_head_kv"], facts["n_ctx_train"],
            facts["n_vocab"]) == (c.hidden_size, c.n_layers, c.n_heads, c.n_kv_heads, c.context_length, c.vocab_size)
    assert facts["n_swa"] == c.sliding_window and facts["rope_type"] == 2 and c.rope_neox  # LLAMA_ROPE_TYPE_NEOX


def test_gguf_defaults_follow_llama_cpp():
    base = {"general.architecture": "gemma2", "gemma2.context_length": 8192, "gemma2.embedding_length": 2304,
            "gemma2.block_count": 26, "gemma2.feed_forward_length": 9216, "gemma2.attention.head_count": 8,
            "gemma2.attention.head_count_kv": 4, "gemma2.attention.key_length": 256,
            "gemma2.attention.layer_norm_rms_epsilon": 1e-6, "tokenizer.ggml.tokens": ["a"] * 256000}
    c = ModelConfig.from_gguf(base)
    assert (c.sliding_window, c.attn_softcap, c.final_softcap) == (4096, 50.0, 30.0)  # llama.cpp's defaults
    assert c.swa_layers == tuple(i % 2 == 0 for i in range(26)) and c.rope_theta_local == c.rope_theta == 10000.0
    assert c.vocab_size == 256000 and not c.tie_embeddings  # no tensor names: untied
    big = ModelConfig.from_gguf({**base, "gemma2.block_count": 46, "gemma2.embedding_length": 4608,
                                 "gemma2.attention.head_count": 32, "gemma2.attention.head_count_kv": 16,
                                 "gemma2.attention.key_length": 128})
    assert big.query_pre_attn_scalar == 144.0  # 27B: n_embd / n_head, as llama.cpp
    llama = {"general.architecture": "llama", "llama.context_length": 131072, "llama.embedding_length": 64,
             "llama.block_count": 2, "llama.feed_forward_length": 128, "llama.attention.head_count": [4, 4],
             "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": 100,
             "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    c = ModelConfig.from_gguf(llama, ["token_embd.weight", "output.weight"])
    assert (c.n_kv_heads, c.head_dim, c.rope_neox, c.rope_scaling, c.tie_embeddings) == \
        (4, 16, False, RopeScaling("linear", 4.0), False)


def test_errors_name_the_problem():
    with pytest.raises(JaxquantError, match="'mamba' is not supported; supported architectures: " +
                       ", ".join(SUPPORTED_ARCHS)):
        ModelConfig.from_gguf({"general.architecture": "mamba"})
    with pytest.raises(FileFormatError, match="missing key 'llama.embedding_length'"):
        ModelConfig.from_gguf({"general.architecture": "llama"})
    with pytest.raises(FileFormatError, match="key 'hidden_size' is 'big', expected int"):
        ModelConfig.from_hf({"model_type": "llama", "hidden_size": "big"})
    with pytest.raises(JaxquantError, match="unsupported HF model_type 'gpt2'; supported: gemma2"):
        ModelConfig.from_hf({"model_type": "gpt2"})
    with pytest.raises(JaxquantError, match="rope scaling 'yarn' is not supported"):
        ModelConfig.from_hf({**GEMMA3_270M_HF, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(FileFormatError, match="sizes must be positive"):
        ModelConfig.from_hf({**GEMMA3_270M_HF, "num_attention_heads": 0})
    with pytest.raises(FileFormatError, match="18 layers"):
        ModelConfig.from_hf({**GEMMA3_270M_HF, "layer_types": ["full_attention"] * 3})
