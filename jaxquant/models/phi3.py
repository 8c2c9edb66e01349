"""Phi-3: Llama's block. Its files store q, k, v as one stacked projection (``attn_qkv``) and gate,
up as another (``ffn_up``, no ``ffn_gate``), the stacked forms ``llama.qkv`` and ``llama.ffn`` take."""

from __future__ import annotations

from jaxquant.models.llama import block

REQUIRED = ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")

__all__ = ["REQUIRED", "block"]
