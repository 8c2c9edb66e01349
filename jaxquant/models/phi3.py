"""Phi-3: Llama's block with q, k, v in one fused projection and gate, up in another."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxquant.config import ModelConfig
from jaxquant.models import llama
from jaxquant.models.base import Layer, glu, heads, linear

REQUIRED = ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")


def qkv(layer: Layer, x: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [B, T, E] -> q [B, T, H, D], k, v [B, T, KV, D] from the stacked rows of attn_qkv."""
    nq, nkv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    q, k, v = jnp.split(linear(x, layer.attn_qkv), [nq, nq + nkv], axis=-1)
    return heads(q, cfg.n_heads), heads(k, cfg.n_kv_heads), heads(v, cfg.n_kv_heads)


def ffn(layer: Layer, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Gated FFN whose ffn_up holds the gate rows, then the up rows."""
    gate, up = jnp.split(linear(x, layer.ffn_up), 2, axis=-1)
    return linear(glu(gate, up, cfg), layer.ffn_down)


block = functools.partial(llama.block, qkv=qkv, ffn=ffn)
