"""Hugging Face tensor names -> canonical names (llama.cpp's GGUF names), one table per architecture.

ISQ rules and llama.cpp's quantization mixes are keyed on the GGUF names, so every source speaks
them. A few tensors also change value to match the GGUF convention, exactly as llama.cpp's
converter does (``transform``): Llama's q/k rows are permuted for its adjacent-pair rope, and
Gemma's norm weights become ``1 + w`` (in float32, as HF computes it).
"""

from __future__ import annotations

import re

_EMBED = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight"}
_ATTN = {f"model.layers.{{i}}.self_attn.{hf}_proj.{p}": f"blk.{{i}}.attn_{gg}.{p}"
         for hf, gg in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output")) for p in ("weight", "bias")}
_MLP = {f"model.layers.{{i}}.mlp.{hf}_proj.weight": f"blk.{{i}}.ffn_{hf}.weight" for hf in ("gate", "up", "down")}
_QK_NORM = {"model.layers.{i}.self_attn.q_norm.weight": "blk.{i}.attn_q_norm.weight",
            "model.layers.{i}.self_attn.k_norm.weight": "blk.{i}.attn_k_norm.weight"}
_PRE_NORMS = {"model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
              "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight"}
_GEMMA_NORMS = {"model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
                "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.post_attention_norm.weight",
                "model.layers.{i}.pre_feedforward_layernorm.weight": "blk.{i}.ffn_norm.weight",
                "model.layers.{i}.post_feedforward_layernorm.weight": "blk.{i}.post_ffw_norm.weight"}
_PHI3 = {"model.layers.{i}.self_attn.qkv_proj.weight": "blk.{i}.attn_qkv.weight",
         "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
         "model.layers.{i}.mlp.gate_up_proj.weight": "blk.{i}.ffn_up.weight",
         "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight"}

TABLES: dict[str, dict[str, str]] = {
    "llama": {**_EMBED, **_ATTN, **_MLP, **_PRE_NORMS},
    "qwen2": {**_EMBED, **_ATTN, **_MLP, **_PRE_NORMS},
    "qwen3": {**_EMBED, **_ATTN, **_MLP, **_PRE_NORMS, **_QK_NORM},
    "phi3": {**_EMBED, **_PHI3, **_PRE_NORMS},
    "gemma2": {**_EMBED, **_ATTN, **_MLP, **_GEMMA_NORMS},
    "gemma3": {**_EMBED, **_ATTN, **_MLP, **_GEMMA_NORMS, **_QK_NORM},
}

# Wrappers of multimodal checkpoints around the text model, and tensors that are not weights of it.
_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
             ("language_model.lm_head.", "lm_head."))
_IGNORED = re.compile(r"(\.rotary_emb\.inv_freq$|^(model\.)?(vision_tower|multi_modal_projector|vision_model)\.)")


def _compile(table: dict[str, str]) -> list[tuple[re.Pattern, str]]:
    return [(re.compile(re.escape(hf).replace(r"\{i\}", r"(?P<i>\d+)") + "$"), gg) for hf, gg in table.items()]


_COMPILED = {arch: _compile(t) for arch, t in TABLES.items()}
_INVERSE = {arch: _compile({gg: hf for hf, gg in t.items()}) for arch, t in TABLES.items()}


def canonical_name(arch: str, hf_name: str) -> str | None:
    """The GGUF name of an HF tensor; None for tensors that are not part of the text model.
    Raises KeyError for a tensor the architecture's table does not know."""
    if _IGNORED.search(hf_name):
        return None
    for old, new in _PREFIXES:
        if hf_name.startswith(old):
            hf_name = new + hf_name[len(old):]
    for pattern, gg in _COMPILED[arch]:
        m = pattern.match(hf_name)
        if m:
            return gg.replace("{i}", m.group("i")) if "i" in pattern.groupindex else gg
    raise KeyError(hf_name)


def hf_name(arch: str, name: str) -> str:
    """The HF name of a canonical tensor (the inverse of ``canonical_name``); KeyError for a name
    the architecture's table does not know."""
    for pattern, hf in _INVERSE[arch]:
        m = pattern.match(name)
        if m:
            return hf.replace("{i}", m.group("i")) if "i" in pattern.groupindex else hf
    raise KeyError(name)


def transform(arch: str, name: str) -> str | None:
    """How llama.cpp's converter changes a tensor's values: 'permute_q' / 'permute_k' (Llama's rope
    row order), 'plus_one' (Gemma norms), or None."""
    if arch == "llama" and re.search(r"\.attn_q\.(weight|bias)$", name):
        return "permute_q"
    if arch == "llama" and re.search(r"\.attn_k\.(weight|bias)$", name):
        return "permute_k"
    if arch.startswith("gemma") and name.endswith("norm.weight"):
        return "plus_one"
    return None
