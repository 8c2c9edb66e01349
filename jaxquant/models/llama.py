"""Llama 2, 3, 3.1, 3.2 and Mistral; Qwen2 (the same plus q/k/v biases) and Qwen3 (plus per-head
q/k RMS norm). Their differences are tensors that are present or not, so one block serves all.

Pre-norm decoder layer: h = x + attn(norm(x)); out = h + ffn(norm(h)). HF Llama q/k rows are
permuted on load as llama.cpp's converter does, so its rope pairs adjacent dims (NORM layout).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxquant.config import ModelConfig
from jaxquant.models.base import KV, Layer, LayerCtx, heads, linear, qk_norm, self_attention
from jaxquant.ops import Activation, qdots

REQUIRED = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


def qkv(layer: Layer, x: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [B, T, E] -> q [B, T, H, D], k, v [B, T, KV, D]; biases where present (Qwen2), q/k norm
    when the config has it (Qwen3, Gemma 3). q, k, v may be one stacked matrix (``attn_qkv``), or
    q, k one (``attn_qk``)."""
    nq, nkv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    if layer.attn_qkv is not None:
        q, k, v = jnp.split(linear(x, layer.attn_qkv, layer.attn_qkv_bias), [nq, nq + nkv], axis=-1)
    else:  # one input, prepared once for all where the kernel can
        ws, bs = ((layer.attn_qk, layer.attn_v), (layer.attn_qk_bias, layer.attn_v_bias)) if layer.attn_qk is not None \
            else ((layer.attn_q, layer.attn_k, layer.attn_v), (layer.attn_q_bias, layer.attn_k_bias, layer.attn_v_bias))
        ys = [y if b is None else y + b for y, b in zip(qdots(x, ws), bs)]
        q, k, v = (*jnp.split(ys[0], [nq], axis=-1), ys[1]) if len(ys) == 2 else ys
    q, k, v = heads(q, cfg.n_heads), heads(k, cfg.n_kv_heads), heads(v, cfg.n_kv_heads)
    if cfg.qk_norm:
        q, k = qk_norm(q, k, layer, cfg)
    return q, k, v


def ffn(layer: Layer, x: jax.Array | Activation, cfg: ModelConfig, residual: jax.Array | None = None) -> jax.Array:
    """Gated FFN [B, T, E] -> [B, T, E] (+ ``residual``): down(act(gate(x)) * up(x)); without
    ``ffn_gate``, ``ffn_up`` holds the gate rows, then the up rows."""
    if layer.ffn_gate is None:
        gate_up = linear(x, layer.ffn_up)
    else:  # one input, prepared once for both where the kernel can
        gate_up = jnp.concatenate(qdots(x, (layer.ffn_gate, layer.ffn_up)), -1)
    # the hidden units in the compute dtype, as the norm gives x (a bf16 batch kernel input: one call)
    return linear(Activation(gate_up, cfg.activation, dtype=x.dtype), layer.ffn_down, residual=residual)


def attention(layer: Layer, x: jax.Array | Activation, kv: KV, ctx: LayerCtx, qkv=qkv,
              residual: jax.Array | None = None) -> tuple[jax.Array, KV]:
    """Self-attention of normed x [B, T, E] -> [B, T, E] (+ ``residual``), updated cache of this layer."""
    q, k, v = qkv(layer, x, ctx.cfg)
    out, kv = self_attention(q, k, v, kv, ctx)
    return linear(out, layer.attn_output, layer.attn_output_bias, residual), kv


def block(layer: Layer, x: jax.Array, kv: KV, ctx: LayerCtx, qkv=qkv, ffn=ffn) -> tuple[jax.Array, KV]:
    """One decoder layer on the residual stream x [B, T, E]; the residual sums are the matmuls'
    (a CUDA gemv adds them as it writes)."""
    h, kv = attention(layer, ctx.norm(x, layer.attn_norm), kv, ctx, qkv, residual=x)
    return ffn(layer, ctx.norm(h, layer.ffn_norm), ctx.cfg, residual=h), kv
