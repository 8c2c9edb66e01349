"""Parity of jaxquant.models.forward with transformers (CPU torch, float32) on small random models.

Each case builds an HF config, randomizes the weights (larger than HF's init so that attention
and norms matter), saves the checkpoint, opens it with jaxquant.io.open_model and runs a
right-padded batch of two sequences of different lengths: a prefill, then 8 decode steps with the
cache. The reference is transformers' full forward on each unpadded sequence. Sequences are longer
than the sliding window wherever the model has one.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxquant import QTensor, dequantize, models, ops, quantize
from jaxquant.io import open_model
from jaxquant.models import base
from jaxquant.qtensor import take_rows

TOL = 1e-4
PREFILL, DECODE, LENGTHS = 12, 8, (12, 7)  # prefill width, decode steps, prompt length of each row
WINDOW = 5
SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=False,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0, "rope_theta": 10000.0}

CASES = {
    "llama": (transformers.LlamaConfig, {}),
    "llama-bias": (transformers.LlamaConfig, dict(attention_bias=True, tie_word_embeddings=True)),
    "llama3.1-rope": (transformers.LlamaConfig, dict(rope_parameters=LLAMA3_ROPE)),
    "llama-linear-rope": (transformers.LlamaConfig, dict(rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                                          "rope_theta": 500.0})),
    "mistral": (transformers.MistralConfig, dict(sliding_window=WINDOW)),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen2-output": (transformers.Qwen2Config, {}),  # a separate output matrix, as Qwen2.5-Coder's GGUF has
    "qwen3": (transformers.Qwen3Config, {}),
    "phi3": (transformers.Phi3Config, dict(sliding_window=WINDOW, partial_rotary_factor=0.5)),
    "gemma2": (transformers.Gemma2Config, dict(sliding_window=WINDOW, attn_logit_softcapping=2.0,
                                               final_logit_softcapping=3.0, query_pre_attn_scalar=24,
                                               tie_word_embeddings=True)),
    "gemma3": (transformers.Gemma3TextConfig, dict(
        sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=24, rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}})),
}


def _randomize(model: torch.nn.Module, gemma: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 2:
                p.copy_(noise * (1.0 if "embed" in name else p.shape[1] ** -0.5))
            elif "norm" in name:  # Gemma stores w of (1 + w)
                p.copy_((0.0 if gemma else 1.0) + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)


@functools.cache
def _model(case: str, tmp_root: str):
    cls, extra = CASES[case]
    config = cls(**{**SMALL, **extra, "attn_implementation": "eager"})
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    _randomize(model, case.startswith("gemma"), seed=len(case))
    path = f"{tmp_root}/{case}"
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("hf"))


def _reference(model, tokens: np.ndarray) -> list[np.ndarray]:
    """transformers' logits of each row's unpadded sequence (prompt + decoded tokens)."""
    with torch.no_grad():
        return [model(torch.tensor(row[None, :n + DECODE])).logits[0].numpy() for row, n in zip(tokens, LENGTHS)]


def _run(params, cfg, tokens: np.ndarray, dtype=jnp.float32) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Prefill (rows right-padded, padding at position -1) then DECODE steps, each row at its own
    position, computing in ``dtype`` (the cache's). Returns per row: prefill logits of its prompt,
    and the decode logits."""
    fwd = jax.jit(models.forward, static_argnames="cfg", donate_argnames="cache")
    b = len(LENGTHS)
    lengths = np.array(LENGTHS)
    cache = models.init_cache(cfg, b, PREFILL + DECODE, dtype)
    pos = np.where(np.arange(PREFILL) < lengths[:, None], np.arange(PREFILL), -1).astype(np.int32)
    prefill, cache = fwd(params, jnp.asarray(tokens[:, :PREFILL]), jnp.asarray(pos), cache, cfg=cfg)
    steps = []
    for j in range(DECODE):
        p = (lengths + j).astype(np.int32)[:, None]
        out, cache = fwd(params, jnp.asarray(np.take_along_axis(tokens, p, 1)), jnp.asarray(p), cache, cfg=cfg)
        steps.append(np.asarray(out[:, 0]))
    prefill = np.asarray(prefill)
    return [prefill[i, :n] for i, n in enumerate(LENGTHS)], [np.stack(s) for s in zip(*steps)]


def _rel(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _check(params, cfg, model, case: str) -> None:
    tokens = np.random.default_rng(len(case)).integers(0, cfg.vocab_size, (len(LENGTHS), PREFILL + DECODE))
    tokens = tokens.astype(np.int32)
    refs = _reference(model, tokens)
    prefill, decode = _run(params, cfg, tokens)
    for row, (n, ref) in enumerate(zip(LENGTHS, refs)):
        p, d = _rel(prefill[row], ref[:n]), _rel(decode[row], ref[n:])
        print(f"{case} row {row}: prefill {p:.2e} decode {d:.2e}")
        assert p < TOL and d < TOL, f"{case} row {row} (length {n}): prefill {p:.2e}, decode {d:.2e}"


@pytest.mark.parametrize("case", list(CASES))
def test_parity(case: str, tmp_root: str):
    model, path = _model(case, tmp_root)
    source = open_model(path)
    cfg = source.config
    if "sliding_window" in CASES[case][1]:
        assert cfg.sliding_window == WINDOW and any(cfg.swa_layers)
    _check(models.load_params(source, cfg), cfg, model, case)


@pytest.mark.parametrize("case", ["llama", "gemma3"])
def test_bfloat16_compute(case: str, tmp_root: str):
    """The GPU default: matmul inputs and the KV cache in bfloat16 (plain weights too), products
    accumulated in float32, residual stream and norms in float32. Logits stay within bfloat16
    rounding of transformers' float32 ones, and every matmul really gets bfloat16 inputs."""
    model, path = _model(case, tmp_root)
    source = open_model(path)
    cfg = source.config
    params = models.load_params(source, cfg, jnp.bfloat16)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (len(LENGTHS), PREFILL + DECODE)).astype(np.int32)
    refs = _reference(model, tokens)
    seen = set()
    with ops.tap(lambda x, w: seen.add((x.dtype.name, w.dtype.name))):
        prefill, decode = _run(params, cfg, tokens, jnp.bfloat16)
    assert seen == {("bfloat16", "bfloat16")}
    for row, (n, ref) in enumerate(zip(LENGTHS, refs)):
        assert _rel(prefill[row], ref[:n]) < 5e-2 and _rel(decode[row], ref[n:]) < 5e-2


@pytest.mark.parametrize("case,fmt,v_fmt", [("llama-bias", None, None), ("qwen2", "Q8_0", None),
                                            ("gemma3", "Q4_0", None), ("qwen2", "Q4_0", "Q8_0")])
def test_fused_projections(case: str, fmt, v_fmt, tmp_root: str):
    """q/k/v and gate/up stacked into one matmul each (the GPU default) compute the same logits,
    for plain weights and for QTensors (stacked row-wise, still packed); biases are stacked too.
    With v in another format than q and k, q and k alone are stacked."""
    _, path = _model(case, tmp_root)
    source = open_model(path)
    cfg = source.config
    params = models.load_params(source, cfg)
    if fmt is not None:
        params = jax.tree.map(lambda a: quantize(a, fmt) if a.ndim == 2 else a, params)
    if v_fmt is not None:
        params = dataclasses.replace(params, layers=[
            dataclasses.replace(layer, attn_v=quantize(layer.attn_v.dequantize(jnp.float32), v_fmt))
            for layer in params.layers])
    fused = models.fuse_projections(params)
    layer = fused.layers[0]
    stacked, nq = (layer.attn_qk, 1) if v_fmt else (layer.attn_qkv, 2)
    assert layer.attn_q is None and layer.attn_k is None and layer.ffn_gate is None
    assert (layer.attn_v is None) == (v_fmt is None) and (layer.attn_qkv is None) == (v_fmt is not None)
    assert stacked.shape[0] == (cfg.n_heads + nq * cfg.n_kv_heads) * cfg.head_dim
    bias = layer.attn_qk_bias if v_fmt else layer.attn_qkv_bias
    assert (bias is not None) == (params.layers[0].attn_q_bias is not None)
    assert isinstance(layer.ffn_up, QTensor) == (fmt is not None)
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (len(LENGTHS), PREFILL + DECODE)).astype(np.int32)
    for a, b in zip(_run(params, cfg, tokens), _run(fused, cfg, tokens)):
        for x, y in zip(a, b):
            assert _rel(y, x) < 1e-5


def test_rope_freqs_tensor(tmp_root: str):
    """GGUF Llama 3.1 files carry the llama3 rope scaling as a rope_freqs tensor of frequency
    divisors (llama.cpp's converter computes it); the config then has no scaling."""
    model, path = _model("llama3.1-rope", tmp_root)
    source = open_model(path)
    cfg = source.config
    plain = dataclasses.replace(cfg, rope_scaling=None)
    s = cfg.rope_scaling
    dim = cfg.head_dim
    freqs = 10000.0 ** -(np.arange(0, dim, 2) / dim)
    wavelen = 2 * np.pi / freqs
    smooth = (s.original_context_length / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    factors = np.where(wavelen < s.original_context_length / s.high_freq_factor, 1.0,
                       np.where(wavelen > s.original_context_length / s.low_freq_factor, s.factor,
                                1 / ((1 - smooth) / s.factor + smooth)))
    params = models.load_params(source, plain)
    params = base.Params(**{**vars(params), "rope_freqs": jnp.asarray(factors, jnp.float32)})
    _check(params, plain, model, "rope_freqs")


def test_quantized_embeddings_and_weights(tmp_root: str):
    """QTensor leaves: the embedding lookup dequantizes only the gathered rows and equals the
    dequantized table's rows; forward equals forward on the dequantized weights."""
    model, path = _model("gemma3", tmp_root)
    source = open_model(path)
    cfg = source.config
    params = models.load_params(source, cfg)
    q = jax.tree.map(lambda w: quantize(w, "Q8_0") if w.ndim == 2 else w, params)
    deq = jax.tree.map(dequantize, q, is_leaf=lambda w: isinstance(w, QTensor))
    ids = jnp.array([[0, 5, 95], [3, 3, 1]], jnp.int32)
    np.testing.assert_array_equal(take_rows(q.token_embd, ids).dequantize(), deq.token_embd[ids])
    cache = models.init_cache(cfg, 2, 8)
    pos = jnp.broadcast_to(jnp.arange(3, dtype=jnp.int32), (2, 3))
    fwd = jax.jit(models.forward, static_argnames="cfg")
    a, _ = fwd(q, ids, pos, cache, cfg=cfg)
    b, _ = fwd(deq, ids, pos, cache, cfg=cfg)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(jnp.abs(b).max()))


def test_unsupported_arch():
    from jaxquant.config import ModelConfig
    from jaxquant.errors import JaxquantError

    cfg = ModelConfig("llama", 8, 8, 1, 1, 1, 8, 8, 1e-6)
    object.__setattr__(cfg, "arch", "mamba")
    with pytest.raises(JaxquantError, match="supported: llama, qwen2, qwen3, phi3, gemma2, gemma3"):
        models.forward(None, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32), None, cfg)


def test_load_errors(tmp_root: str):
    """A missing or unknown tensor is named before anything is loaded."""
    from jaxquant.errors import FileFormatError

    _, path = _model("qwen3", tmp_root)
    source = open_model(path)

    class Edited:
        def __init__(self, names):
            self.path, self.tensor_names = path, names

        def load(self, name):
            raise AssertionError("loaded before checking")

    with pytest.raises(FileFormatError, match=r"lacks tensor\(s\) blk.1.attn_k_norm.weight"):
        models.load_params(Edited([n for n in source.tensor_names if n != "blk.1.attn_k_norm.weight"]), source.config)
    with pytest.raises(FileFormatError, match="'blk.0.ffn_up.bias' is not used by the qwen3"):
        models.load_params(Edited([*source.tensor_names, "blk.0.ffn_up.bias"]), source.config)
