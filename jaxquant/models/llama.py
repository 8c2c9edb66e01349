"""Llama 2, 3, 3.1, 3.2 and Mistral; Qwen2 (the same plus q/k/v biases) and Qwen3 (plus per-head
q/k RMS norm). Their differences are tensors that are present or not, so one block serves all.

Pre-norm decoder layer: h = x + attn(norm(x)); out = h + ffn(norm(h)). HF Llama q/k rows are
permuted on load as llama.cpp's converter does, so its rope pairs adjacent dims (NORM layout).
"""

from __future__ import annotations

import jax

from jaxquant.config import ModelConfig
from jaxquant.models.base import KV, Layer, LayerCtx, glu, heads, linear, qk_norm, rms_norm, self_attention

REQUIRED = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


def qkv(layer: Layer, x: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [B, T, E] -> q [B, T, H, D], k, v [B, T, KV, D]; biases where present (Qwen2), q/k norm
    when the config has it (Qwen3, Gemma 3)."""
    q = heads(linear(x, layer.attn_q, layer.attn_q_bias), cfg.n_heads)
    k = heads(linear(x, layer.attn_k, layer.attn_k_bias), cfg.n_kv_heads)
    v = heads(linear(x, layer.attn_v, layer.attn_v_bias), cfg.n_kv_heads)
    if cfg.qk_norm:
        q, k = qk_norm(q, k, layer, cfg)
    return q, k, v


def ffn(layer: Layer, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Gated FFN [B, T, E] -> [B, T, E]: down(act(gate(x)) * up(x))."""
    return linear(glu(linear(x, layer.ffn_gate), linear(x, layer.ffn_up), cfg), layer.ffn_down)


def attention(layer: Layer, x: jax.Array, kv: KV, ctx: LayerCtx, qkv=qkv) -> tuple[jax.Array, KV]:
    """Self-attention of normed x [B, T, E] -> [B, T, E], updated cache of this layer."""
    q, k, v = qkv(layer, x, ctx.cfg)
    out, kv = self_attention(q, k, v, kv, ctx)
    return linear(out, layer.attn_output, layer.attn_output_bias), kv


def block(layer: Layer, x: jax.Array, kv: KV, ctx: LayerCtx, qkv=qkv, ffn=ffn) -> tuple[jax.Array, KV]:
    """One decoder layer on the residual stream x [B, T, E]."""
    eps = ctx.cfg.norm_eps
    a, kv = attention(layer, rms_norm(x, layer.attn_norm, eps), kv, ctx, qkv)
    h = x + a
    return h + ffn(layer, rms_norm(h, layer.ffn_norm, eps), ctx.cfg), kv
