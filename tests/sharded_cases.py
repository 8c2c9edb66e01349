"""Tensor-parallel inference (``jaxquant.sharding``) on 8 simulated CPU devices.

Run by tests/test_sharding.py in a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``,
which JAX reads once, when it starts (this file is not named test_*.py, so the main test run does
not import it with one device). Each architecture family is saved as a small random transformers
checkpoint, loaded with ISQ to one format per family, once on one device and once per mesh of 1,
2, 4 and 8 devices (each tensor placed as it is requantized). The mesh runs must reproduce the
one-device logits (prefill and decode steps against the sharded KV cache) to 1e-5 relative, and
greedy generation token for token. The one-device path itself is checked against transformers
and llama.cpp elsewhere (tests/models).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jaxquant as jq
from jaxquant import models, ops, sharding
from jaxquant.eval.perplexity import perplexity
from jaxquant.isq import Policy
from jaxquant.qtensor import QTensor

TOL = 1e-5
MESHES = (1, 2, 4, 8)
PREFILL, DECODE, LENGTHS = 12, 1, (12, 7)  # prefill width, decode steps, prompt length of each row
# 8 query heads split on every mesh; 4 KV heads split on meshes up to 4 and replicated on 8. One
# layer (two for Gemma 3's local + global pair) keeps the 24 compilations short.
DIMS = {"vocab_size": 256, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 1,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32, "max_position_embeddings": 64,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
TOKENIZER = ('{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null, '
             '"pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null, "model": '
             '{"type": "WordLevel", "vocab": {"<unk>": 0, "hello": 1, "world": 2}, "unk_token": "<unk>"}}')
# family -> (config class, its settings, ISQ format: None keeps the float32 weights)
FAMILIES = {
    # ffn 2048: Q4_K's 256-weight blocks of ffn_down split over 8 devices (its attn_output, 1 block, stays whole)
    "llama": (transformers.LlamaConfig, {"intermediate_size": 2048}, "Q4_K"),
    "qwen2": (transformers.Qwen2Config, {"tie_word_embeddings": True}, "Q8_0"),
    "qwen3": (transformers.Qwen3Config, {}, "IQ4_NL"),
    "phi3": (transformers.Phi3Config, {"sliding_window": 5, "partial_rotary_factor": 0.5}, "Q5_0"),  # stacked qkv
    "gemma2": (transformers.Gemma2Config, {"sliding_window": 5, "attn_logit_softcapping": 2.0,
                                           "final_logit_softcapping": 3.0, "query_pre_attn_scalar": 24,
                                           "tie_word_embeddings": True}, "AFQ4_G64"),
    "gemma3": (transformers.Gemma3TextConfig, {"sliding_window": 5, "query_pre_attn_scalar": 24, "num_hidden_layers": 2,
                                               "layer_types": ["sliding_attention", "full_attention"]}, None),
}


@pytest.fixture(scope="session")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("sharded"))


@functools.cache
def _checkpoint(family: str, root: str) -> str:
    cls, extra, _ = FAMILIES[family]
    model = transformers.AutoModelForCausalLM.from_config(cls(**{**DIMS, **extra})).float().eval()
    g = torch.Generator().manual_seed(len(family))
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise * p.shape[-1] ** -0.5 if p.ndim == 2 else (0.0 if "gemma" in family else 1.0) + 0.2 * noise)
    path = f"{root}/{family}"
    model.save_pretrained(path)
    with open(f"{path}/tokenizer.json", "w") as f:
        f.write(TOKENIZER)
    return path


def _mesh(tp: int) -> jax.sharding.Mesh:
    return jax.make_mesh((tp,), ("tp",), devices=jax.devices()[:tp])


def _policy(family: str) -> Policy | None:
    fmt = FAMILIES[family][2]
    return None if fmt is None else Policy(default=fmt)


@functools.cache
def _one_device(family: str, root: str) -> jq.Model:
    return jq.load(_checkpoint(family, root), isq=_policy(family))


@functools.cache
def _on_mesh(family: str, root: str, tp: int) -> jq.Model:
    """The one-device model's tensors placed by the plan (loading with a mesh is checked apart)."""
    model = _one_device(family, root)
    return dataclasses.replace(model, params=sharding.shard(model.params, model.cfg, _mesh(tp)))


def _tokens(cfg) -> np.ndarray:
    return np.random.default_rng(7).integers(3, cfg.vocab_size, (len(LENGTHS), PREFILL + DECODE)).astype(np.int32)


def _prompts(cfg) -> list[list[int]]:
    tokens = _tokens(cfg)
    return [list(tokens[0, :9]), list(tokens[1, :4])]


@functools.partial(jax.jit, static_argnames=("cfg", "cache_sharding"))
def _logits(params, tokens, cfg, cache_sharding):
    """Prefill (rows right-padded) and DECODE single-token steps on the cache: float32 logits
    [B, PREFILL + DECODE, vocab]."""
    lengths = jnp.asarray(LENGTHS)
    cache = models.init_cache(cfg, len(LENGTHS), PREFILL + DECODE, jnp.float32, cache_sharding)
    t = jnp.arange(PREFILL)
    out, cache = models.forward(params, tokens[:, :PREFILL], jnp.where(t < lengths[:, None], t, -1), cache, cfg)
    steps = [out]
    for j in range(DECODE):
        p = (lengths + j)[:, None]
        out, cache = models.forward(params, jnp.take_along_axis(tokens, p, 1), p, cache, cfg)
        steps.append(out)
    return jnp.concatenate(steps, axis=1)


@functools.cache
def _reference_logits(family: str, root: str) -> np.ndarray:
    model = _one_device(family, root)
    assert sharding.mesh_of(model.params) is None
    return np.asarray(_logits(model.params, _tokens(model.cfg), model.cfg, None))


@functools.cache
def _reference_tokens(family: str, root: str) -> list[list[int]]:
    model = _one_device(family, root)
    return jq.generate_tokens(model, _prompts(model.cfg), max_tokens=6)


def _rel(ours: np.ndarray, ref: np.ndarray) -> float:
    valid = np.concatenate([np.arange(PREFILL) < n for n in LENGTHS]).reshape(len(LENGTHS), PREFILL)
    valid = np.concatenate([valid, np.ones((len(LENGTHS), DECODE), bool)], axis=1)  # padding rows are junk
    return float(np.abs(ours - ref)[valid].max() / np.abs(ref[valid]).max())


@pytest.mark.parametrize("tp", MESHES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_equal_one_device(family: str, tp: int, root: str):
    ref = _reference_logits(family, root)
    model = _on_mesh(family, root, tp)
    cfg = model.cfg
    layer = model.params.layers[0]
    assert layer.attn_qkv is None and layer.ffn_gate is not None  # kept apart on a mesh (phi3's file stacks them)
    q = layer.attn_q.arrays[next(iter(layer.attn_q.arrays))] if isinstance(layer.attn_q, QTensor) else layer.attn_q
    assert len(q.sharding.device_set) == tp and q.sharding.shard_shape(q.shape)[0] == q.shape[0] // tp
    cache = sharding.cache_sharding(model.params, cfg)
    assert (cache is None) == (tp == 1)
    if cache is not None:
        assert cache.spec == jax.sharding.PartitionSpec(None, None, "tp" if tp <= cfg.n_kv_heads else None)
    rel = _rel(np.asarray(_logits(model.params, _tokens(cfg), cfg, cache)), ref)
    print(f"{family} mesh {tp}: {rel:.2e}")
    assert rel < TOL, f"{family} on {tp} devices: logits differ from one device by {rel:.2e} (relative)"


FAST_GENERATION = {("llama", 8), ("gemma3", 4)}  # KV heads replicated / split; the rest in the slow suite


@pytest.mark.parametrize("family,tp", [
    pytest.param(f, tp, marks=() if (f, tp) in FAST_GENERATION else pytest.mark.slow)
    for f in FAMILIES for tp in MESHES])
def test_generation_identical(family: str, tp: int, root: str):
    model = _on_mesh(family, root, tp)
    assert jq.generate_tokens(model, _prompts(model.cfg), max_tokens=6) == _reference_tokens(family, root)


def test_stacked_projections_kept_apart(root: str):
    """Params fused for one GPU (q/k/v, or q/k where v's format differs, and gate/up stacked) are
    split again on a mesh, each device holding its heads, with the one-device logits."""
    model = _one_device("qwen2", root)
    layers = [dataclasses.replace(layer, attn_v=jq.quantize(layer.attn_v.dequantize(jnp.float32), "Q5_0"))
              for layer in model.params.layers]
    params = dataclasses.replace(model.params, layers=layers)
    fused = models.fuse_projections(params)
    assert fused.layers[0].attn_qk is not None and fused.layers[0].attn_qk_bias is not None
    sharded = sharding.shard(fused, model.cfg, _mesh(2))
    layer = sharded.layers[0]
    assert layer.attn_qk is None and layer.attn_qk_bias is None and layer.ffn_gate is not None
    assert layer.attn_q.arrays["qs"].sharding.spec == jax.sharding.PartitionSpec("tp")
    cache = sharding.cache_sharding(sharded, model.cfg)
    ref = np.asarray(_logits(params, _tokens(model.cfg), model.cfg, None))
    rel = _rel(np.asarray(_logits(sharded, _tokens(model.cfg), model.cfg, cache)), ref)
    assert rel < TOL, rel


@pytest.mark.slow
def test_mesh_with_a_replica_axis(root: str):
    """A 2 x 4 mesh ("dp", "tp"): the weights split over "tp" and repeat over "dp"."""
    model = _one_device("qwen2", root)
    mesh = jax.make_mesh((2, 4), ("dp", "tp"))
    params = sharding.shard(model.params, model.cfg, mesh)
    q = params.layers[0].attn_q.arrays["qs"]
    assert q.sharding.spec == jax.sharding.PartitionSpec("tp") and len(q.sharding.device_set) == 8
    cache = sharding.cache_sharding(params, model.cfg)
    rel = _rel(np.asarray(_logits(params, _tokens(model.cfg), model.cfg, cache)), _reference_logits("qwen2", root))
    assert rel < TOL, rel


@pytest.mark.slow
def test_imatrix_on_a_mesh(root: str):
    """llama-imatrix's statistics (the squared inputs of every block matrix) collected on a mesh."""
    from jaxquant.isq.imatrix import collect_imatrix

    text = "hello world world hello " * 24
    one = collect_imatrix(_one_device("llama", root), text, n_ctx=16, show_progress=False)
    four = collect_imatrix(_on_mesh("llama", root, 4), text, n_ctx=16, show_progress=False)
    assert one.sums.keys() == four.sums.keys() and len(one.sums) == 7
    for name in one.sums:
        assert np.abs(four.sums[name] - one.sums[name]).max() < TOL * np.abs(one.sums[name]).max(), name
        assert four.counts[name] == one.counts[name]


def test_load_places_each_tensor_as_it_is_requantized(root: str):
    """jq.load(mesh=...): phi3's stacked file tensors, requantized one at a time, each put on its
    devices before the next is read: device 0 never holds more than its share of what is loaded
    so far plus one tensor. The result is the plan's placement of the one-device model, bit for bit."""
    from jaxquant.io import open_model
    from jaxquant.isq.apply import quantized_source

    family, tp = "phi3", 4
    path, mesh = _checkpoint(family, root), _mesh(tp)
    source = quantized_source(open_model(path), _policy(family))
    put, held = sharding.placer(source.config, mesh), []
    total = sum(a.nbytes for a in jax.tree.leaves(_one_device(family, root).params))

    def new_on_device0() -> int:  # bytes on device 0 of arrays made since loading began
        return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.live_arrays()
                   if id(a) not in before and mesh.devices[0] in a.sharding.device_set)

    def place(field, x):
        out = put(field, x)
        held.append(new_on_device0() - sum(a.nbytes for a in jax.tree.leaves(x)))  # x: the tensor in hand
        return out

    gc.collect()
    before = {id(a) for a in jax.live_arrays()}
    models.load_params(source, source.config, place=place)
    assert 0 < max(held) < total / tp * 1.1
    loaded = jq.load(path, isq=_policy(family), mesh=mesh)
    want = _on_mesh(family, root, tp).params
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(want), strict=True):
        assert a.sharding == b.sharding and np.array_equal(np.asarray(a), np.asarray(b))


def test_perplexity_on_a_mesh(root: str):
    one, four = _one_device("qwen2", root), _on_mesh("qwen2", root, 4)
    tokens = list(np.random.default_rng(3).integers(3, one.cfg.vocab_size, 64))
    a = perplexity(one, tokens=tokens, n_ctx=16, batch=2, show_progress=False)
    b = perplexity(four, tokens=tokens, n_ctx=16, batch=2, show_progress=False)
    np.testing.assert_allclose(b.nll, a.nll, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("split", ["rows", "blocks"])
def test_kernels_run_per_shard(split: str):
    """The Pallas kernels (run by the Pallas interpreter) on each device's shards: rows split ->
    output columns split; blocks split -> partial products summed. Against dequantize + a float64
    dot, within the kernels' float16 rounding."""
    rng = np.random.default_rng(0)
    fmt, n, k, tp = "Q4_0", 256, 2048, 4
    w = jq.quantize(rng.standard_normal((n, k), np.float32), fmt)
    x = rng.standard_normal((3, k), np.float32)
    mesh = jax.make_mesh((tp,), ("tp",), devices=jax.devices()[:tp], axis_types=(jax.sharding.AxisType.Auto,))
    spec = jax.sharding.PartitionSpec("tp") if split == "rows" else jax.sharding.PartitionSpec(None, "tp")
    ws = sharding.place(w, spec, mesh)
    local = jax.tree.map(lambda a: a[: n // tp] if split == "rows" else a[:, : a.shape[1] // tp], w)
    local = QTensor(local.arrays, fmt, (n // tp, k) if split == "rows" else (n, k // tp))
    import pallas_kernels

    assert pallas_kernels.select(local, x.shape[0]) is not None  # each shard is a kernel's shape
    f = jax.jit(lambda x, w: ops.qdot(x, w, backend="interpret"))
    hlo = f.lower(x, ws).compile().as_text()
    assert f"qmm_{fmt.lower()}" in hlo and ("all-reduce(" in hlo) == (split == "blocks")
    assert "all-gather(" not in hlo  # no device gathers the weight
    y = np.asarray(f(x, ws))
    ref = x.astype(np.float64) @ np.asarray(w.dequantize(), np.float64).T
    assert np.abs(y - ref).max() / np.abs(ref).max() < 2e-3


LLAMA_FIELDS = models.FAMILIES["llama"].REQUIRED


def _abstract(cfg, field: str, mesh, fmt: str | None):
    """A tensor of ``field`` as shapes and dtypes only (a QTensor of format ``fmt``, or float32),
    carrying the plan's shardings: what ``jit.lower`` needs, without the memory."""
    shape = cfg.tensor_shape(f"blk.0.{field}.weight" if field in LLAMA_FIELDS else f"{field}.weight")
    if fmt is None or len(shape) == 1:
        x = jax.ShapeDtypeStruct(shape, jnp.float32)
    else:
        f = jq.get_format(fmt)
        x = QTensor({fld.name: jax.ShapeDtypeStruct((shape[0], shape[1] // f.block_size)
                                                    + ((fld.count,) if fld.count > 1 else ()), fld.dtype)
                     for fld in f.fields}, fmt, shape)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), x,
                        sharding.target(field, x, cfg, mesh))


@pytest.mark.parametrize("shape,tp", [("8b", 2), ("70b", 8)])
def test_decode_step_communication(shape: str, tp: int):
    """A Llama-3-8B / 70B-shaped layer in llama.cpp's Q4_K_M formats (Q6_K attn_v, ffn_down and
    output), compiled for a decode step and a 512-token prefill on a mesh: two all-reduces of the
    hidden state per layer (after attn_output and ffn_down) plus the vocabulary-split embedding
    lookup; no weight is gathered, no activation resharded."""
    import re

    from jaxquant.config import ModelConfig

    dims = {"8b": (4096, 32, 14336), "70b": (8192, 64, 28672)}[shape]
    cfg = ModelConfig(arch="llama", vocab_size=128256, hidden_size=dims[0], n_layers=1, n_heads=dims[1], n_kv_heads=8,
                      head_dim=128, ffn_dim=dims[2], norm_eps=1e-5, rope_neox=False)
    mesh = _mesh(tp)
    fmt = {"attn_v": "Q6_K", "ffn_down": "Q6_K", "output": "Q6_K"}
    layer = models.Layer(**{f: _abstract(cfg, f, mesh, fmt.get(f, "Q4_K")) for f in LLAMA_FIELDS})
    params = models.Params(**{f: _abstract(cfg, f, mesh, fmt.get(f, "Q4_K")) for f in ("token_embd", "output_norm",
                                                                                        "output")}, layers=[layer])
    kv = jax.ShapeDtypeStruct((1, 1024, cfg.n_kv_heads, cfg.head_dim), jnp.bfloat16,
                              sharding=jax.sharding.NamedSharding(sharding.auto_mesh(mesh)[0],
                                                                  jax.sharding.PartitionSpec(None, None, "tp")))
    for t in (1, 512):
        tokens = jax.ShapeDtypeStruct((1, t), jnp.int32)
        hlo = jax.jit(models.forward, static_argnames="cfg").lower(
            params, tokens, tokens, models.KVCache([kv], [kv]), cfg=cfg).compile().as_text()
        found = re.findall(r"= (?:\([^)]*\)|\S+) (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)\(",
                           hlo)
        reduces = re.findall(r"= (\S+) all-reduce\(.*custom_partitioning", hlo)
        assert set(found) == {"all-reduce"}, found
        assert reduces == [f"f32[{t},{cfg.hidden_size}]{{1,0}}"] * 2, reduces
