"""Building blocks shared by every architecture: parameter and cache pytrees, RMS norm, rope,
attention over a preallocated KV cache (GQA, sliding window, softcap), gated FFN, and the decoder
loop that a family drives with its own ``block``.

Conventions: the residual stream, norms and softmax are float32; matmul inputs and the KV cache
are in the compute dtype, which is the KV cache's dtype (float32 on CPU, where the llama.cpp parity
tests run; bfloat16 by default on GPU), every product accumulating in float32. Every weight matmul
is ``ops.qdot`` (any weight may be a QTensor); tensor names and value conventions are GGUF's
(``Layer`` fields are the GGUF names with ``.weight`` dropped and ``.bias`` -> ``_bias``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.config import ModelConfig
from jaxquant.errors import FileFormatError
from jaxquant.ops import Activation, qdot, rms_norm
from jaxquant.qtensor import QTensor, lookup

Weight = jax.Array | QTensor
KV = tuple[jax.Array, jax.Array]  # one layer's (keys, values) cache
HIGHEST = jax.lax.Precision.HIGHEST


def _pytree(cls):
    """A dataclass whose fields are all pytree children (None fields are empty subtrees)."""
    cls = dataclasses.dataclass(cls)
    return jax.tree_util.register_dataclass(cls, data_fields=[f.name for f in dataclasses.fields(cls)],
                                            meta_fields=[])


@_pytree
class Layer:
    """One decoder layer's tensors; architectures use a subset, the rest stay None."""

    attn_norm: jax.Array | None = None
    attn_q: Weight | None = None
    attn_k: Weight | None = None
    attn_v: Weight | None = None
    attn_qkv: Weight | None = None  # Phi-3, and fuse_projections: q, k, v rows stacked
    attn_qkv_bias: jax.Array | None = None
    attn_qk: Weight | None = None  # fuse_projections where v's format differs: q, k rows stacked
    attn_qk_bias: jax.Array | None = None
    attn_q_bias: jax.Array | None = None
    attn_k_bias: jax.Array | None = None
    attn_v_bias: jax.Array | None = None
    attn_q_norm: jax.Array | None = None
    attn_k_norm: jax.Array | None = None
    attn_output: Weight | None = None
    attn_output_bias: jax.Array | None = None
    post_attention_norm: jax.Array | None = None
    ffn_norm: jax.Array | None = None
    ffn_gate: Weight | None = None
    ffn_up: Weight | None = None  # Phi-3, and fuse_projections (ffn_gate None): gate rows then up rows
    ffn_down: Weight | None = None
    post_ffw_norm: jax.Array | None = None


@_pytree
class Params:
    """A model's tensors. ``output`` is None for tied embeddings; ``rope_freqs`` holds the rope
    frequency divisors of GGUF Llama 3.1+ files (None elsewhere)."""

    token_embd: Weight
    output_norm: jax.Array
    layers: list[Layer]
    output: Weight | None = None
    rope_freqs: jax.Array | None = None


@_pytree
class KVCache:
    """Per-layer keys and values ``[B, max_len + 1, n_kv_heads, head_dim]``; slot s holds the token
    at position s (written by ``forward``), so no separate length is kept. The last slot takes the
    writes of padding (positions < 0) and is never attended to: a decode step's write is then one
    in-place update, where dropping it would take a read, a select and the update (3 kernels)."""

    k: list[jax.Array]
    v: list[jax.Array]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1] - 1


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32, sharding=None) -> KVCache:
    """An empty cache for ``batch`` sequences of up to ``max_len`` positions, created with
    ``sharding`` (``jaxquant.sharding.cache_sharding``; None: the default device)."""
    shape = (batch, max_len + 1, cfg.n_kv_heads, cfg.head_dim)
    return KVCache([jnp.zeros(shape, dtype, device=sharding) for _ in range(cfg.n_layers)],
                   [jnp.zeros(shape, dtype, device=sharding) for _ in range(cfg.n_layers)])


def load_params(source, cfg: ModelConfig, required: tuple[str, ...], dtype=jnp.float32, place=None) -> Params:
    """Tensors of ``source`` (canonical names) into ``Params``. QTensors stay packed; plain
    matrices are cast to ``dtype``; vectors (norms, biases) to float32. ``required`` lists the
    ``Layer`` fields the architecture cannot do without. ``place(field, tensor)``, if given, puts
    each tensor where it belongs as soon as it is loaded (``jaxquant.sharding.placer``)."""
    where = getattr(source, "path", source)
    fields = {f.name for f in dataclasses.fields(Layer)}
    top_names = ("token_embd.weight", "output_norm.weight", "output.weight", "rope_freqs.weight")
    plan: dict[str, tuple[int | None, str]] = {}  # tensor -> (layer or None, field), checked before loading
    for name in source.tensor_names:
        parts = name.split(".")
        field = parts[-2] + ("_bias" if parts[-1] == "bias" else "") if len(parts) > 1 else ""
        if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and int(parts[1]) < cfg.n_layers \
                and field in fields:
            plan[name] = (int(parts[1]), field)
        elif name in top_names:
            plan[name] = (None, parts[0])
        else:
            raise FileFormatError(f"{where}: tensor {name!r} is not used by the {cfg.arch} architecture "
                                  f"({cfg.n_layers} layers)")
    # Only layers that have tensors are listed name by name: a corrupt block count (2**32 - 1) must
    # not build a list of that size; the layers that have none are counted.
    present = sorted({i for i, _ in plan.values() if i is not None})
    need = [f"blk.{i}.{f}.weight" for i in present for f in required]
    need += ["token_embd.weight", "output_norm.weight"] + ([] if cfg.tie_embeddings else ["output.weight"])
    missing = [name for name in need if name not in plan]
    if missing:
        raise FileFormatError(f"{where}: {cfg.arch} model lacks tensor(s) {', '.join(missing[:8])}"
                              + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    if len(present) < cfg.n_layers:
        first = next(i for i in range(cfg.n_layers) if i not in present)  # at most len(present) steps
        raise FileFormatError(f"{where}: {cfg.arch} model of {cfg.n_layers} layers has tensors for {len(present)} "
                              f"of them (none for layer {first}): a wrong block_count or missing tensors")
    for name in plan:
        _check_shape(where, name, tuple(source.info(name).shape), cfg)

    def load(name: str):
        x = source.load(name)
        if isinstance(x, QTensor):
            return x
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise FileFormatError(f"{where}: tensor {name!r} has dtype {x.dtype}, expected a float type")
        return x.astype(dtype if x.ndim > 1 else jnp.float32)

    layers: list[dict] = [{} for _ in range(cfg.n_layers)]
    top = {}
    for name, (i, field) in plan.items():
        x = load(name)
        (top if i is None else layers[i])[field] = x if place is None else place(field, x)
    return Params(layers=[Layer(**layer) for layer in layers], **top)


def _check_shape(where, name: str, shape: tuple[int, ...], cfg: ModelConfig) -> None:
    """Refuse a tensor whose shape does not fit the config (before anything is loaded)."""
    want = cfg.tensor_shape(name)
    if want is None or shape == want:
        return
    if name == "token_embd.weight" and len(shape) == 2 and shape[0] < cfg.vocab_size:
        raise FileFormatError(f"{where}: tensor {name!r} has {shape[0]} rows, fewer than the {cfg.vocab_size} tokens "
                              "of the vocabulary (a truncated embedding, or a vocabulary that does not belong to it)")
    raise FileFormatError(f"{where}: tensor {name!r} has shape {shape}, but the config implies {want} (hidden "
                          f"{cfg.hidden_size}, {cfg.n_heads} heads / {cfg.n_kv_heads} KV heads of {cfg.head_dim}, "
                          f"FFN {cfg.ffn_dim}, vocabulary {cfg.vocab_size}): the metadata does not describe these "
                          "tensors")


def _stackable(ws: list) -> bool:
    """Weights whose rows can be stacked into one matrix with the same meaning per row: plain
    arrays of one dtype, or QTensors of one row-wise format (no per-tensor fields) and width."""
    if all(isinstance(w, QTensor) for w in ws):
        f = ws[0].format
        return (len({(w.fmt, w.shape[1], w.dtype) for w in ws}) == 1 and f.scope == "row"
                and all(fld.layout == "rows" for fld in f.fields))
    return all(isinstance(w, jax.Array) for w in ws) and len({(w.dtype, w.shape[1]) for w in ws}) == 1


def _stack_rows(ws: list) -> Weight:
    if isinstance(ws[0], QTensor):
        arrays = {k: jnp.concatenate([w.arrays[k] for w in ws]) for k in ws[0].arrays}
        return QTensor(arrays, ws[0].fmt, (sum(w.shape[0] for w in ws), ws[0].shape[1]), ws[0].dtype)
    return jnp.concatenate(ws)


def fuse_projections(params: Params) -> Params:
    """q, k, v stacked into ``attn_qkv`` and gate, up into ``ffn_up`` (gate rows first), as Phi-3
    stores them, wherever the formats allow: one matmul kernel instead of three and two per layer
    at decode. Where v's format differs from q's and k's (llama.cpp's Q4_K_M gives v Q6_K), q and
    k alone are stacked into ``attn_qk``. Each output row is computed exactly as before."""
    layers = []
    for layer in params.layers:
        new = {}
        names = ("attn_q", "attn_k", "attn_v")
        for fused, n in (("attn_qkv", 3), ("attn_qk", 2)):
            ws = [getattr(layer, f) for f in names[:n]]
            biases = [getattr(layer, f"{f}_bias") for f in names[:n]]
            if all(w is not None for w in ws) and _stackable(ws) and len({b is None for b in biases}) == 1:
                new.update({f: None for f in names[:n]}, **{f"{f}_bias": None for f in names[:n]})
                new.update({fused: _stack_rows(ws),
                            f"{fused}_bias": None if biases[0] is None else jnp.concatenate(biases)})
                break
        gate_up = [layer.ffn_gate, layer.ffn_up]
        if all(w is not None for w in gate_up) and _stackable(gate_up):
            new.update(ffn_up=_stack_rows(gate_up), ffn_gate=None)
        layers.append(dataclasses.replace(layer, **new))
    return dataclasses.replace(params, layers=layers)


# ---------------------------------------------------------------------------------------------
# Elementwise pieces


def linear(x: jax.Array | Activation, w: Weight, bias: jax.Array | None = None,
           residual: jax.Array | None = None) -> jax.Array:
    """``x @ w.T`` (+ ``bias``) (+ ``residual``); ``x`` may be an ``ops.Activation``."""
    if bias is None:
        return qdot(x, w, residual=residual)
    y = qdot(x, w) + bias
    return y if residual is None else y + residual


def heads(x: jax.Array, n: int) -> jax.Array:
    """[B, T, n * D] -> [B, T, n, D]."""
    return x.reshape(*x.shape[:-1], n, x.shape[-1] // n)


def qk_norm(q: jax.Array, k: jax.Array, layer: Layer, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Per-head RMS norm of queries and keys (Qwen3, Gemma 3), before rope."""
    return rms_norm(q, layer.attn_q_norm, cfg.norm_eps), rms_norm(k, layer.attn_k_norm, cfg.norm_eps)


# ---------------------------------------------------------------------------------------------
# Rope


def rope_inv_freq(cfg: ModelConfig, layer: int) -> np.ndarray:
    """Rotation frequencies [rope_dim / 2] of a layer. Sliding-window layers use the local base;
    Gemma 3's local layers also skip rope scaling (llama.cpp's rope_freq_scale_train_swa = 1)."""
    dim = cfg.rope_dim or cfg.head_dim
    swa = cfg.is_swa(layer)
    theta = cfg.rope_theta_local if swa else cfg.rope_theta
    scaling = None if swa and cfg.arch == "gemma3" else cfg.rope_scaling
    inv = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if scaling is not None and scaling.kind == "linear":
        inv = inv / scaling.factor
    elif scaling is not None and scaling.kind == "llama3":  # transformers' _compute_llama3_parameters
        low_wavelen = scaling.original_context_length / scaling.low_freq_factor
        high_wavelen = scaling.original_context_length / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (scaling.original_context_length / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, (1 - smooth) * scaled / scaling.factor + smooth * scaled, scaled)
    return inv.astype(np.float32)


def rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array, neox: bool) -> jax.Array:
    """Rotate the first 2 * len(inv_freq) dims of each head of x [B, T, H, D] by position [B, T].
    NEOX pairs dim i with i + R/2; NORM (GGUF Llama) pairs adjacent dims 2i, 2i + 1."""
    r = 2 * inv_freq.shape[0]
    angle = positions[..., None, None].astype(jnp.float32) * inv_freq  # [B, T, 1, R/2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    xr, rest = x[..., :r], x[..., r:]
    x1, x2 = (xr[..., :r // 2], xr[..., r // 2:]) if neox else (xr[..., 0::2], xr[..., 1::2])
    y1, y2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    rotated = jnp.concatenate([y1, y2], -1) if neox else jnp.stack([y1, y2], -1).reshape(xr.shape)
    return jnp.concatenate([rotated, rest], -1)


# ---------------------------------------------------------------------------------------------
# Attention


@dataclasses.dataclass(frozen=True)
class LayerCtx:
    """What a layer needs besides its tensors: config, positions [B, T] (< 0: padding), its rope
    frequencies, sliding window (None: global attention) and the compute dtype of matmul inputs."""

    cfg: ModelConfig
    positions: jax.Array
    inv_freq: jax.Array
    window: int | None
    dtype: jnp.dtype = jnp.dtype(jnp.float32)

    def norm(self, x: jax.Array, w: jax.Array) -> Activation:
        """RMS norm of the residual stream (float32) as the next matmuls' input (compute dtype),
        left to them (``ops.Activation``: a CUDA gemv norms while it quantizes)."""
        return Activation(x, "rms_norm", w, self.cfg.norm_eps, self.dtype)


def _fused_decode(q: jax.Array, cache_k: jax.Array, ctx: LayerCtx) -> bool:
    """Whether one decode step (T = 1) attends through cuDNN's fused attention (one kernel in place
    of the ~8 XLA kernels of scores, mask, softmax and weighted sum): on a GPU, 16-bit cache,
    global attention (cuDNN's window counts from the query's index in its own sequence, 0 here,
    not from its position) and no softcap. The visible keys are slots 0..position, as the mask
    below makes them."""
    return (q.shape[1] == 1 and jax.default_backend() == "gpu" and cache_k.dtype in (jnp.bfloat16, jnp.float16)
            and ctx.window is None and not ctx.cfg.attn_softcap)


def _cuda_decode(q: jax.Array, cache_k: jax.Array, ctx: LayerCtx) -> bool:
    """Whether one sequence's decode step attends through jaxquant's CUDA kernels (which rope q and
    k and write the cache themselves): where cuDNN's would serve, and the kernels are selected and
    built for the shape."""
    if not (q.shape[0] == 1 and _fused_decode(q, cache_k, ctx)):
        return False
    from pallas_kernels import attention_cuda

    return attention_cuda.selected() and attention_cuda.supports(q.shape[2], cache_k.shape[2], q.shape[3],
                                                                   2 * ctx.inv_freq.shape[0], cache_k.dtype)


def self_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv: KV, ctx: LayerCtx) -> tuple[jax.Array, KV]:
    """Rope q [B, T, H, D] and k [B, T, KV, D], write k and v into the cache at slot = position
    (padding into the last slot), attend over the cache. Returns ([B, T, H * D], updated (k, v) cache)."""
    cfg, pos = ctx.cfg, ctx.positions
    cache_k, cache_v = kv
    b, t, n_heads, d = q.shape
    scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5  # 0: head_dim, as the config says
    if _cuda_decode(q, cache_k, ctx):
        from pallas_kernels import attention_cuda

        out, cache_k, cache_v = attention_cuda.decode_attention(q, k, v, cache_k, cache_v, pos, ctx.inv_freq,
                                                                scale=scale, neox=cfg.rope_neox)
        return out.reshape(b, t, n_heads * d), (cache_k, cache_v)
    q, k = rope(q, pos, ctx.inv_freq, cfg.rope_neox), rope(k, pos, ctx.inv_freq, cfg.rope_neox)
    s, n_kv = cache_k.shape[1], cache_k.shape[2]
    slot = jnp.where(pos >= 0, pos, s - 1)
    if b == t == 1:  # one sequence decoding: an in-place update (a scatter would check its bounds)
        cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, slot[0, 0], 0, 0))
        cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, slot[0, 0], 0, 0))
    else:  # positions past the cache (a caller's error) are dropped
        rows = jnp.arange(b)[:, None]
        cache_k = cache_k.at[rows, slot].set(k.astype(cache_k.dtype), mode="drop")
        cache_v = cache_v.at[rows, slot].set(v.astype(cache_v.dtype), mode="drop")

    if _fused_decode(q, cache_k, ctx):
        out = jax.nn.dot_product_attention(q.astype(cache_k.dtype), cache_k, cache_v, scale=scale,
                                           key_value_seq_lengths=jnp.maximum(pos[:, 0] + 1, 1), implementation="cudnn")
        return out.reshape(b, t, n_heads * d), (cache_k, cache_v)
    qg = q.reshape(b, t, n_kv, n_heads // n_kv, d).astype(cache_k.dtype)  # query head h uses kv head h // group
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, cache_k, preferred_element_type=jnp.float32, precision=HIGHEST)
    scores = scores * scale
    if cfg.attn_softcap:
        scores = jnp.tanh(scores / cfg.attn_softcap) * cfg.attn_softcap
    slots, p = jnp.arange(s), pos[:, None, None, :, None]  # p [B, 1, 1, T, 1]
    visible = slots <= p
    if ctx.window is not None:
        visible &= slots > p - ctx.window
    # A finite fill keeps padding rows (nothing visible) free of NaN.
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(cache_v.dtype), cache_v, preferred_element_type=jnp.float32,
                     precision=HIGHEST)
    return out.reshape(b, t, n_heads * d).astype(cache_v.dtype), (cache_k, cache_v)


# ---------------------------------------------------------------------------------------------
# The decoder

Block = Callable[[Layer, jax.Array, KV, LayerCtx], tuple[jax.Array, KV]]


def embed(params: Params, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Token embeddings [B, T, E] (float32, times cfg.embed_scale); only the rows of a quantized
    table that are looked up get dequantized."""
    x = lookup(params.token_embd, tokens, jnp.float32)
    return x * cfg.embed_scale if cfg.embed_scale != 1.0 else x


def hidden_states(params: Params, tokens: jax.Array, positions: jax.Array, cache: KVCache, cfg: ModelConfig,
                  block: Block) -> tuple[jax.Array, KVCache]:
    """Embed, run every layer's ``block``, final norm: [B, T, E] in the compute dtype (the cache's),
    updated cache."""
    x = embed(params, tokens, cfg)
    ks, vs = [], []
    for i, layer in enumerate(params.layers):
        inv_freq = jnp.asarray(rope_inv_freq(cfg, i))
        if params.rope_freqs is not None:
            inv_freq = inv_freq / params.rope_freqs
        ctx = LayerCtx(cfg, positions, inv_freq, cfg.sliding_window if cfg.is_swa(i) else None, cache.k[i].dtype)
        x, (k, v) = block(layer, x, (cache.k[i], cache.v[i]), ctx)
        ks.append(k)
        vs.append(v)
    return rms_norm(x, params.output_norm, cfg.norm_eps).astype(cache.k[0].dtype), KVCache(ks, vs)


def logits(params: Params, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Normed hidden states [..., E] -> float32 logits [..., vocab] (tied or separate output,
    final softcap)."""
    out = linear(x, params.output if params.output is not None else params.token_embd).astype(jnp.float32)
    if cfg.final_softcap:
        out = jnp.tanh(out / cfg.final_softcap) * cfg.final_softcap
    return out
