"""Gemma 2 and Gemma 3: Llama's attention and FFN inside "sandwich" norms (each sublayer's output
is normed again before the residual add), GELU-tanh FFN, embeddings scaled by sqrt(hidden).
The rest comes through the config into the shared code: alternating sliding window and softcaps
(Gemma 2), q/k norm and a local rope base on sliding layers (Gemma 3).
"""

from __future__ import annotations

import jax

from jaxquant.models import llama
from jaxquant.models.base import KV, Layer, LayerCtx, rms_norm

REQUIRED = llama.REQUIRED + ("post_attention_norm", "post_ffw_norm")


def block(layer: Layer, x: jax.Array, kv: KV, ctx: LayerCtx) -> tuple[jax.Array, KV]:
    """One decoder layer on the residual stream x [B, T, E]."""
    eps = ctx.cfg.norm_eps
    a, kv = llama.attention(layer, ctx.norm(x, layer.attn_norm), kv, ctx)
    h = x + rms_norm(a, layer.post_attention_norm, eps)
    f = llama.ffn(layer, ctx.norm(h, layer.ffn_norm), ctx.cfg)
    return h + rms_norm(f, layer.post_ffw_norm, eps), kv
