"""Model definitions as pure functions over parameter pytrees.

``forward(params, tokens, positions, cache, cfg)`` runs any supported architecture; ``cfg`` (a
``ModelConfig``) is static under ``jax.jit``. Each token writes its keys and values into the cache
at slot = its position and attends to the slots at or before it (within the window on
sliding-window layers), so right-padded batches of different lengths work; positions < 0 mark
padding, which writes nothing.
"""

from __future__ import annotations

from types import ModuleType

import jax
import jax.numpy as jnp

from jaxquant.config import ModelConfig
from jaxquant.errors import JaxquantError
from jaxquant.models import base, gemma, llama, phi3
from jaxquant.models.base import KVCache, Layer, Params, fuse_projections, init_cache

__all__ = ["forward", "hidden_states", "logits", "init_cache", "load_params", "fuse_projections", "Params", "Layer",
           "KVCache", "FAMILIES"]

# llama.cpp architecture name -> the module defining its decoder layer (``block``, ``REQUIRED``).
FAMILIES: dict[str, ModuleType] = {"llama": llama, "qwen2": llama, "qwen3": llama, "phi3": phi3,
                                   "gemma2": gemma, "gemma3": gemma}


def _family(cfg: ModelConfig) -> ModuleType:
    family = FAMILIES.get(cfg.arch)
    if family is None:
        raise JaxquantError(f"no model definition for architecture {cfg.arch!r}; supported: "
                            f"{', '.join(FAMILIES)}")
    return family


def load_params(source, cfg: ModelConfig | None = None, dtype=jnp.float32, place=None) -> Params:
    """The parameters of an opened model (``jaxquant.io.open_model``). Quantized tensors stay
    QTensors exactly as ``source.load`` returns them; plain matrices are cast to ``dtype``, norms
    and biases to float32; ``place(field, tensor)`` puts each where it belongs as it is loaded."""
    cfg = cfg or source.config
    required = _family(cfg).REQUIRED + (("attn_q_norm", "attn_k_norm") if cfg.qk_norm else ())
    return base.load_params(source, cfg, required, dtype, place)


def hidden_states(params: Params, tokens: jax.Array, positions: jax.Array, cache: KVCache,
                  cfg: ModelConfig) -> tuple[jax.Array, KVCache]:
    """The final-normed hidden states [B, T, E] (in the cache's dtype) and the updated cache; ``logits`` of
    a subset of them (e.g. each prompt's last token) avoids the full [B, T, vocab] product."""
    family = _family(cfg)
    if tokens.ndim != 2 or tokens.shape != positions.shape:
        raise JaxquantError(f"tokens {tokens.shape} and positions {positions.shape} must both be [batch, time]")
    if len(cache.k) != cfg.n_layers or cache.k[0].shape[0] != tokens.shape[0]:
        raise JaxquantError(f"cache of {len(cache.k)} layers x batch {cache.k[0].shape[0]} does not fit a "
                            f"{cfg.n_layers}-layer model run on batch {tokens.shape[0]} (use init_cache)")
    return base.hidden_states(params, tokens, positions, cache, cfg, family.block)


def logits(params: Params, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Hidden states [..., E] from ``hidden_states`` -> float32 logits [..., vocab]."""
    return base.logits(params, x, cfg)


def forward(params: Params, tokens: jax.Array, positions: jax.Array, cache: KVCache,
            cfg: ModelConfig) -> tuple[jax.Array, KVCache]:
    """tokens, positions int32 [B, T] -> (float32 logits [B, T, vocab], updated cache)."""
    x, cache = hidden_states(params, tokens, positions, cache, cfg)
    return base.logits(params, x, cfg), cache
