"""ModelConfig from GGUF metadata and from HF config.json: agrees with llama.cpp's reading of the
Gemma GGUF and with the published HF config of the same model; errors name what is wrong, and a model
whose config cannot be right (values, block count, tensor shapes) is refused at load."""

from __future__ import annotations

import math

import gguf_samples as gs
import llama_model
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.config import SUPPORTED_ARCHS, ModelConfig, RopeScaling
from jaxquant.errors import FileFormatError, JaxquantError
from jaxquant.io import open_model, write_gguf
from jaxquant.models import FAMILIES

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
    with pytest.raises(FileFormatError, match="key .num_attention_heads. is 0; it must be a positive integer"):
        ModelConfig.from_hf({**GEMMA3_270M_HF, "num_attention_heads": 0})
    with pytest.raises(FileFormatError, match="18 layers"):
        ModelConfig.from_hf({**GEMMA3_270M_HF, "layer_types": ["full_attention"] * 3})


@pytest.mark.parametrize("change, message", [
    ({"rms_norm_eps": float("nan")}, "key 'rms_norm_eps' is nan; it must be a finite number >= 0"),
    ({"rms_norm_eps": -1e-6}, "key 'rms_norm_eps' is -1e-06; it must be a finite number >= 0"),
    ({"rope_theta": -1.0}, "key 'rope_theta' is -1.0; it must be a finite number > 0"),
    ({"rope_theta": None, "rope_parameters": {"rope_type": "default", "rope_theta": float("inf")}},
     "config.json rope parameters: key 'rope_theta' is inf"),
    ({"rope_local_base_freq": float("nan")}, "key 'rope_local_base_freq' is nan"),
    ({"final_logit_softcapping": -30.0}, "key 'final_logit_softcapping' is -30.0"),
    ({"vocab_size": 0}, "key 'vocab_size' is 0; it must be a positive integer")])
def test_bad_hf_values_name_the_key(change, message):
    with pytest.raises(FileFormatError, match=message.replace("(", r"\(")):
        ModelConfig.from_hf({k: v for k, v in {**GEMMA3_270M_HF, **change}.items() if v is not None})


def _tiny_llama(path, metadata=None, shapes=None) -> str:
    """A complete one-layer llama GGUF: the metadata and 32-token vocabulary of gguf_samples, random F32
    tensors of the shapes its config implies (tied embeddings); ``metadata`` and ``shapes`` override."""
    meta = {k: v for k, (v, _, _) in gs.METADATA.items() if not k.startswith("test.")}
    cfg = ModelConfig.from_gguf(meta, ["token_embd.weight"])
    names = ["token_embd.weight", "output_norm.weight"] + [f"blk.0.{f}.weight" for f in FAMILIES["llama"].REQUIRED]
    rng = np.random.default_rng(0)
    shapes = {n: cfg.tensor_shape(n) for n in names} | (shapes or {})
    write_gguf(path, meta | (metadata or {}), {n: rng.standard_normal(shapes[n]).astype(np.float32) for n in names})
    return str(path)


def test_tiny_llama_loads(tmp_path):
    model = jq.load(_tiny_llama(tmp_path / "ok.gguf"))
    assert (model.cfg.arch, model.cfg.vocab_size, model.cfg.n_layers, model.cfg.tie_embeddings) == ("llama", 32, 1, True)


@pytest.mark.parametrize("metadata, shapes, message", [
    ({"llama.attention.layer_norm_rms_epsilon": float("nan")}, None,
     "key 'llama.attention.layer_norm_rms_epsilon' is nan; it must be a finite number >= 0"),
    ({"llama.attention.layer_norm_rms_epsilon": -0.25}, None,
     "key 'llama.attention.layer_norm_rms_epsilon' is -0.25; it must be a finite number >= 0"),
    ({"llama.rope.freq_base": float("nan")}, None, "key 'llama.rope.freq_base' is nan; it must be a finite number > 0"),
    ({"llama.rope.freq_base": -500000.0}, None, "key 'llama.rope.freq_base' is -500000.0"),
    ({"llama.rope.freq_base": 0.0}, None, "key 'llama.rope.freq_base' is 0.0"),
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": -4.0}, None,
     "key 'llama.rope.scaling.factor' is -4.0"),
    ({"llama.block_count": 0}, None, "key 'llama.block_count' is 0; it must be a positive integer"),
    ({"llama.attention.head_count": 0}, None, "key 'llama.attention.head_count' is 0"),
    ({"llama.block_count": 3}, None, "llama model of 3 layers has tensors for 1 of them .none for layer 1."),
    ({"llama.vocab_size": 20}, None, "key 'llama.vocab_size' is 20, but tokenizer.ggml.tokens holds 32 tokens"),
    (None, {"token_embd.weight": (20, 64)}, "tensor 'token_embd.weight' has 20 rows, fewer than the 32 tokens"),
    (None, {"blk.0.attn_q.weight": (48, 64)},
     r"tensor 'blk.0.attn_q.weight' has shape \(48, 64\), but the config implies \(64, 64\)"),
    (None, {"blk.0.ffn_down.weight": (64, 96)}, r"tensor 'blk.0.ffn_down.weight' has shape \(64, 96\)"),
    (None, {"output_norm.weight": (32,)}, r"tensor 'output_norm.weight' has shape \(32,\)"),
    ({"llama.embedding_length": 48}, None,
     r"tensor 'token_embd.weight' has shape \(32, 64\), but the config implies \(32, 48\)")])
def test_a_config_that_cannot_be_right_is_refused_at_load(tmp_path, metadata, shapes, message):
    """jq.load of the tiny model with one value, block count or tensor shape made wrong: a JaxquantError
    naming the file and the key or tensor, before any tensor is loaded."""
    path = _tiny_llama(tmp_path / "bad.gguf", metadata, shapes)
    with pytest.raises(JaxquantError, match=message) as e:
        jq.load(path)
    assert str(e.value).startswith(path)
