"""A tiny random Gemma-3-shaped model (2 layers, 300 tokens, 48-token context) that compiles in seconds,
for tests of generate and eval that need a model but not a real one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxquant as jq
from jaxquant.config import ModelConfig
from jaxquant.models import FAMILIES, Layer, Params

TINY = ModelConfig(arch="gemma3", vocab_size=300, hidden_size=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
                   ffn_dim=48, norm_eps=1e-6, rope_theta=10000.0, rope_theta_local=100.0, sliding_window=4,
                   swa_layers=(True, False), query_pre_attn_scalar=16.0, embed_scale=32 ** 0.5, qk_norm=True,
                   activation="gelu_tanh", tie_embeddings=True, context_length=48)


def tiny_model(seed: int = 0) -> jq.Model:
    """Random weights large enough that different prompts and positions give different tokens."""
    rng = np.random.default_rng(seed)
    fields = FAMILIES["gemma3"].REQUIRED + ("attn_q_norm", "attn_k_norm")

    def tensor(name: str) -> jax.Array:
        shape = TINY.tensor_shape(name)
        noise = rng.standard_normal(shape, np.float32)
        return jnp.asarray(1.0 + 0.1 * noise if len(shape) == 1 else noise / np.sqrt(shape[-1]))

    layers = [Layer(**{f: tensor(f"blk.{i}.{f}.weight") for f in fields}) for i in range(TINY.n_layers)]
    params = Params(token_embd=tensor("token_embd.weight"), output_norm=tensor("output_norm.weight"), layers=layers)
    return jq.Model(params, TINY, None)
