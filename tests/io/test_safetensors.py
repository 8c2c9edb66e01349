"""Hugging Face checkpoints written by transformers' save_pretrained: names (against gguf-py's
tensor name map, which llama.cpp's converter uses), shapes, dtypes and values (against the torch
model), sharded = single file, and the bad-checkpoint errors."""

from __future__ import annotations

import json
import math
import shutil

import gguf
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from jaxquant.config import ModelConfig, RopeScaling
from jaxquant.errors import FileFormatError, JaxquantError
from jaxquant.io import HFSource, open_model

COMMON = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
# name -> (config class, extra arguments, gguf-py architecture, torch dtype)
SPECS = {
    "llama": ("LlamaConfig", {}, "LLAMA", torch.bfloat16),
    "mistral": ("MistralConfig", {"sliding_window": 32}, "LLAMA", torch.bfloat16),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}, "QWEN2", torch.float32),
    "qwen3": ("Qwen3Config", {"head_dim": 16}, "QWEN3", torch.float16),
    "phi3": ("Phi3Config", {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}, "PHI3", torch.bfloat16),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": 32}, "GEMMA2", torch.bfloat16),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 32, "num_hidden_layers": 6}, "GEMMA3",
               torch.bfloat16),
}
TYPE_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def _save(model, path, **kwargs):
    model.save_pretrained(path, **kwargs)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (directory, torch model); llama and qwen2 also sharded (name + '-sharded')."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, (cls, extra, _, dtype) in SPECS.items():
        config = getattr(transformers, cls)(**{**COMMON, **extra})
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        with torch.no_grad():  # norms are initialised to 0 or 1; random values catch transform mistakes
            for p in model.parameters():
                p.copy_(torch.randn_like(p))
        out[name] = (_save(model, root / name), model)
        if name in ("llama", "qwen2"):
            out[name + "-sharded"] = (_save(model, root / (name + "-sharded"), max_shard_size="20KB"), model)
    return out


def _expected_names(name: str, model) -> dict[str, str]:
    """gguf-py's (llama.cpp's converter's) name for every tensor the checkpoint holds."""
    arch = SPECS[name.removesuffix("-sharded")][2]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch], model.config.num_hidden_layers)
    out = {}
    for hf in model.state_dict():
        if hf == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        out[names.get_name(hf, try_suffixes=(".weight", ".bias"))] = hf
    return out


@pytest.mark.parametrize("name", [*SPECS, "llama-sharded", "qwen2-sharded"])
def test_names_shapes_dtypes_values(checkpoints, name):
    path, model = checkpoints[name]
    if name.endswith("-sharded"):
        assert (path / "model.safetensors.index.json").exists() and len(list(path.glob("*.safetensors"))) > 2
    src = open_model(path)
    assert isinstance(src, HFSource)
    expected = _expected_names(name, model)
    assert sorted(src.tensor_names) == sorted(expected)
    state = model.state_dict()
    arch = src.config.arch
    for gg, hf in expected.items():
        ref = state[hf]
        info, x = src.info(gg), src.load(gg)
        assert info.shape == tuple(ref.shape) == x.shape, gg
        if arch.startswith("gemma") and gg.endswith("norm.weight"):
            # GGUF keeps Gemma's norm as 1 + w, computed in float32 as Gemma's RMSNorm does
            want = (1.0 + ref.float()).numpy()
            assert info.type == "F32" and np.array_equal(np.asarray(x), want), gg
            continue
        assert info.type == TYPE_NAMES[ref.dtype] and info.nbytes == ref.numel() * ref.element_size(), gg
        if arch == "llama" and (".attn_q." in gg or ".attn_k." in gg):
            continue  # permuted: test_llama_rope_permutation_keeps_attention_scores
        assert np.array_equal(np.asarray(x).view(np.uint8), ref.view(torch.uint8).numpy()), gg


def test_sharded_equals_single_file(checkpoints):
    for name in ("llama", "qwen2"):
        single, sharded = open_model(checkpoints[name][0]), open_model(checkpoints[name + "-sharded"][0])
        assert sharded.config == single.config
        assert sorted(sharded.tensor_names) == sorted(single.tensor_names)
        for n in single.tensor_names:
            assert sharded.info(n) == single.info(n)
            assert np.array_equal(np.asarray(sharded.load(n)), np.asarray(single.load(n))), n


def test_tied_embeddings(checkpoints):
    src = open_model(checkpoints["qwen2"][0])
    assert src.config.tie_embeddings and "output.weight" not in src.tensor_names
    assert "token_embd.weight" in src.tensor_names
    untied = open_model(checkpoints["llama"][0])
    assert not untied.config.tie_embeddings and "output.weight" in untied.tensor_names


def _rope_norm(x: np.ndarray, pos: np.ndarray, theta: float) -> np.ndarray:
    """llama.cpp's NORM rope (GGUF Llama): dims (2i, 2i+1) rotate by pos * theta^(-2i/d)."""
    d = x.shape[-1]
    angle = pos[:, None] * theta ** (-np.arange(0, d, 2) / d)
    cos, sin = np.cos(angle), np.sin(angle)
    out = np.empty_like(x)
    out[..., 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
    out[..., 1::2] = x[..., 1::2] * cos + x[..., 0::2] * sin
    return out


def test_llama_rope_permutation_keeps_attention_scores(checkpoints):
    """The permuted q/k with llama.cpp's adjacent-pair rope give transformers' attention scores."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    path, model = checkpoints["llama"]
    src, cfg = open_model(path), model.config
    attn, rotary = model.model.layers[1].self_attn, model.model.rotary_emb
    x = torch.randn(1, 7, cfg.hidden_size, dtype=torch.float64)
    pos = torch.arange(7)[None]
    hd, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    q = (x @ attn.q_proj.weight.double().T).view(1, 7, nh, hd).transpose(1, 2)
    k = (x @ attn.k_proj.weight.double().T).view(1, 7, nkv, hd).transpose(1, 2)
    cos, sin = rotary(x, pos)
    q, k = apply_rotary_pos_emb(q, k, cos.double(), sin.double())
    ref = q @ k.repeat_interleave(nh // nkv, dim=1).transpose(-1, -2)

    xs = x[0].numpy()
    wq = np.asarray(src.load("blk.1.attn_q.weight"), np.float64)
    wk = np.asarray(src.load("blk.1.attn_k.weight"), np.float64)
    theta = src.config.rope_theta
    q2 = np.stack([_rope_norm(xs @ wq[h * hd:(h + 1) * hd].T, np.arange(7.0), theta) for h in range(nh)])
    k2 = np.stack([_rope_norm(xs @ wk[h * hd:(h + 1) * hd].T, np.arange(7.0), theta) for h in range(nkv)])
    ours = q2 @ np.repeat(k2, nh // nkv, axis=0).transpose(0, 2, 1)
    np.testing.assert_allclose(ours, ref[0].detach().numpy(), rtol=1e-5, atol=1e-3)  # HF rope is float32
    assert not np.array_equal(wq, attn.q_proj.weight.detach().double().numpy())  # it really was permuted


def test_config_matches_transformers(checkpoints):
    for name, (path, model) in checkpoints.items():
        c, hf = open_model(path).config, model.config
        assert (c.vocab_size, c.hidden_size, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim) == (
            hf.vocab_size, hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads,
            hf.intermediate_size), name
        assert c.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads), name
        assert c.norm_eps == float(np.float32(hf.rms_norm_eps)) and c.tie_embeddings == hf.tie_word_embeddings
        if not name.startswith("gemma3"):
            assert c.rope_theta == hf.rope_parameters["rope_theta"], name
    gemma3 = open_model(checkpoints["gemma3"][0]).config
    hf = checkpoints["gemma3"][1].config
    assert gemma3.swa_layers == tuple(t == "sliding_attention" for t in hf.layer_types)
    assert gemma3.sliding_window == 32 and gemma3.qk_norm and gemma3.embed_scale == math.sqrt(64)
    assert (gemma3.rope_theta, gemma3.rope_theta_local) == (1e6, 1e4)
    gemma2 = open_model(checkpoints["gemma2"][0]).config
    assert (gemma2.attn_softcap, gemma2.final_softcap) == (50.0, 30.0) and gemma2.swa_layers == (True, False)
    mistral = open_model(checkpoints["mistral"][0]).config
    assert mistral.arch == "llama" and mistral.sliding_window == 32 and mistral.swa_layers == (True, True)


def test_llama3_rope_scaling_from_transformers_config():
    hf = transformers.LlamaConfig(**COMMON, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    c = ModelConfig.from_hf(hf.to_dict())
    assert c.rope_theta == 500000.0 and c.rope_scaling == RopeScaling("llama3", 8.0, 8192, 1.0, 4.0)
    old_style = {**hf.to_dict(), "rope_parameters": None, "rope_theta": 500000.0,
                 "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}}
    assert ModelConfig.from_hf(old_style) == c


# ---- bad checkpoints ---------------------------------------------------------------------------------

@pytest.fixture
def sharded(checkpoints, tmp_path):
    return shutil.copytree(checkpoints["llama-sharded"][0], tmp_path / "ckpt")


def _index(path) -> dict:
    return json.loads((path / "model.safetensors.index.json").read_text())


def _rewrite(path, name: str, edit) -> None:
    value = json.loads((path / name).read_text())
    edit(value)
    (path / name).write_text(json.dumps(value))


def _raises(path, *fragments):
    with pytest.raises(FileFormatError) as e:
        src = open_model(path)
        for n in src.tensor_names:
            src.load(n)
    for fragment in fragments:
        assert fragment in str(e.value), str(e.value)


def test_missing_shard(sharded):
    weight_map = _index(sharded)["weight_map"]
    shard = weight_map["model.layers.1.mlp.down_proj.weight"]
    (sharded / shard).unlink()
    _raises(sharded, "model.safetensors.index.json", f"missing shard {shard!r}")


def test_index_names_the_wrong_shard(sharded):
    weight_map = _index(sharded)["weight_map"]
    other = next(v for k, v in weight_map.items() if v != weight_map["model.norm.weight"])
    _rewrite(sharded, "model.safetensors.index.json", lambda v: v["weight_map"].update({"model.norm.weight": other}))
    _raises(sharded, "'model.norm.weight'", f"in shard {other!r}, which does not hold it")


def test_shape_disagrees_with_config(sharded):
    _rewrite(sharded, "config.json", lambda v: v.update(intermediate_size=96))
    _raises(sharded, "tensor 'model.layers.0.mlp.", "config.json implies (", "96")


def test_corrupt_shard_header(sharded):
    shard = sharded / _index(sharded)["weight_map"]["model.embed_tokens.weight"]
    blob = shard.read_bytes()
    bad = blob.replace(b'"shape":[256,64]', b'"shape":[512,64]', 1)  # no longer fits its data offsets
    assert bad != blob
    shard.write_bytes(bad)
    _raises(sharded, str(shard), "invalid safetensors file")


def test_truncated_shard(sharded):
    shard = sharded / _index(sharded)["weight_map"]["model.embed_tokens.weight"]
    shard.write_bytes(shard.read_bytes()[:-10])
    _raises(sharded, str(shard))


def test_other_bad_checkpoints(checkpoints, tmp_path):
    path = checkpoints["llama"][0]
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(FileFormatError, match="config.json: cannot read"):
        open_model(bad)
    (bad / "config.json").write_text("{not json")
    _raises(bad, "config.json: invalid JSON")
    (bad / "config.json").write_text(json.dumps({**_config(path), "model_type": "mamba"}))
    with pytest.raises(JaxquantError, match="unsupported HF model_type 'mamba'; supported: gemma2, gemma3"):
        open_model(bad)
    (bad / "config.json").write_text(json.dumps(_config(path)))
    (bad / "pytorch_model.bin").write_bytes(b"")
    _raises(bad, "no model.safetensors", "pytorch_model.bin")
    tensors = load_file(path / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if k != "lm_head.weight"}, bad / "model.safetensors")
    _raises(bad, "tie_word_embeddings false", "no lm_head.weight")
    save_file({**tensors, "model.layers.0.mlp.extra.weight": tensors["model.norm.weight"]}, bad / "model.safetensors")
    _raises(bad, "'model.layers.0.mlp.extra.weight' is not part of a llama model")
    save_file({**tensors, "model.norm.weight": np.zeros(64, np.int8)}, bad / "model.safetensors")
    _raises(bad, "'model.norm.weight' has dtype I8")


def _config(path) -> dict:
    return json.loads((path / "config.json").read_text())
