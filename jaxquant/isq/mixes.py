"""llama.cpp's quantization mixes ("Q4_K_M", ...): which type each tensor gets, as llama-quantize
decides it (``src/llama-quant.cpp``: ``llama_tensor_get_type`` and ``llama_tensor_get_type_impl``,
ported branch by branch).

The mixes live here as code, not as YAML policies: llama.cpp's rules hinge on per-category
counters that advance in its tensor order (``i_attention_wv``, ``i_ffn_down``, ...), on the
tensor's row length, on earlier choices (tied embeddings take the output's type) and on
model facts (GQA, expert count, Falcon, 70B). A declarative rule language would reproduce
them only approximately; a port is exact and can be read side by side with the C++.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

from jaxquant.errors import FormatError

# Mix name -> (llama_ftype, its default tensor type: llama_ftype_get_default_type).
FTYPES: dict[str, tuple[int, str]] = {
    "F32": (0, "F32"), "F16": (1, "F16"), "Q4_0": (2, "Q4_0"), "Q4_1": (3, "Q4_1"), "Q8_0": (7, "Q8_0"),
    "Q5_0": (8, "Q5_0"), "Q5_1": (9, "Q5_1"), "Q2_K": (10, "Q2_K"), "Q3_K_S": (11, "Q3_K"), "Q3_K_M": (12, "Q3_K"),
    "Q3_K_L": (13, "Q3_K"), "Q4_K_S": (14, "Q4_K"), "Q4_K_M": (15, "Q4_K"), "Q5_K_S": (16, "Q5_K"),
    "Q5_K_M": (17, "Q5_K"), "Q6_K": (18, "Q6_K"), "IQ2_XXS": (19, "IQ2_XXS"), "IQ2_XS": (20, "IQ2_XS"),
    "Q2_K_S": (21, "Q2_K"), "IQ3_XS": (22, "IQ3_S"), "IQ3_XXS": (23, "IQ3_XXS"), "IQ1_S": (24, "IQ1_S"),
    "IQ4_NL": (25, "IQ4_NL"), "IQ3_S": (26, "IQ3_S"), "IQ3_M": (27, "IQ3_S"), "IQ2_S": (28, "IQ2_XS"),
    "IQ2_M": (29, "IQ2_S"), "IQ4_XS": (30, "IQ4_XS"), "IQ1_M": (31, "IQ1_M"), "BF16": (32, "BF16"),
    "TQ1_0": (36, "TQ1_0"), "TQ2_0": (37, "TQ2_0"), "MXFP4_MOE": (38, "MXFP4"),
}
# The mixes whose every type jaxquant can quantize.
PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M", "Q5_0", "Q5_1", "Q5_K_S",
           "Q5_K_M", "Q6_K", "Q8_0", "IQ4_NL", "IQ4_XS", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M",
           "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M")

# llama_model_loader's file type for a model whose most common tensor type is this one.
GUESSED_FTYPES = {"F32": 0, "F16": 1, "BF16": 32, "Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9, "Q8_0": 7,
                  "Q2_K": 10, "Q3_K": 12, "Q4_K": 15, "Q5_K": 17, "Q6_K": 18, "TQ1_0": 36, "TQ2_0": 37,
                  "IQ2_XXS": 19, "IQ2_XS": 20, "IQ2_S": 28, "IQ3_XXS": 23, "IQ1_S": 24, "IQ1_M": 31,
                  "IQ4_NL": 25, "IQ4_XS": 30, "IQ3_S": 26, "MXFP4": 38}

# Block sizes of ggml's types (ggml_blck_size); the plain types count as 1.
BLOCK_SIZES = {"F32": 1, "F16": 1, "BF16": 1, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32,
               "IQ4_NL": 32, "MXFP4": 32, "Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256,
               "IQ4_XS": 256, "IQ1_S": 256, "IQ1_M": 256, "IQ2_XXS": 256, "IQ2_XS": 256, "IQ2_S": 256,
               "IQ3_XXS": 256, "IQ3_S": 256, "TQ1_0": 256, "TQ2_0": 256}

# tensor_type_fallback: a type for rows that do not divide into the wanted type's blocks.
FALLBACKS = {**dict.fromkeys(("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS"), "IQ4_NL"),
             **dict.fromkeys(("Q2_K", "Q3_K", "TQ1_0", "TQ2_0"), "Q4_0"),
             "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

# The "is this tensor quantized at all" name checks of tensor_allows_quantization.
_NEVER_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
                    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
                    "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight",
                    "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight",
                    "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight",
                    "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight",
                    "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.",
                    "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd")
_GLM5_NEXT_NEVER = ("hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
                    "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight", "ssm_g_b.weight",
                    "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight", "attn_v_b.weight")
# Layer counts that make llama.cpp call a model "70B" (only that size changes a mix).
_70B_LAYERS = {"llama": 80, "qwen2": 80, "deci": 80, "olmo": 80, "jais2": 68}
_LOW_IQ = ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")  # ftypes with their own branch


def mix_names() -> list[str]:
    return list(FTYPES)


def check_mix(name: str) -> str:
    """The canonical (upper-case) mix name; unknown names fail listing the valid ones."""
    key = str(name).upper()
    if key not in FTYPES:
        raise FormatError(f"unknown llama.cpp mix {name!r}; valid: {', '.join(FTYPES)}")
    return key


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """The model facts llama.cpp's mixes depend on."""

    arch: str
    n_layers: int
    n_head: int = 1
    n_head_kv: int = 1
    n_expert: int = 0

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        if self.arch == "llama":
            return self.n_expert != 8 and self.n_layers == 80 and self.n_head != self.n_head_kv
        return _70B_LAYERS.get(self.arch) == self.n_layers

    @classmethod
    def from_source(cls, source) -> ModelInfo:
        """From GGUF metadata (any architecture llama.cpp knows) or, for other sources, ``source.config``."""
        meta: Mapping[str, Any] = getattr(source, "metadata", {}) or {}
        arch = meta.get("general.architecture")
        if isinstance(arch, str) and f"{arch}.block_count" in meta:
            def first(key: str, default: int) -> int:
                value = meta.get(f"{arch}.{key}", default)
                return int(value[0] if isinstance(value, list) else value)

            n_head = first("attention.head_count", 0)
            return cls(arch, first("block_count", 0), n_head, first("attention.head_count_kv", n_head),
                       first("expert_count", 0))
        cfg = source.config
        return cls(cfg.arch, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads)


def layer_of(name: str) -> int | None:
    """The block index of ``blk.{i}.…`` tensors, else None."""
    m = re.match(r"blk\.(-?\d+)\.", name)
    return int(m.group(1)) if m else None


def tensor_order(names: Iterable[str]) -> list[str]:
    """llama.cpp's order (weight_name_comparer): tensors outside blocks first, then by block index,
    by name within each; its counters advance in this order."""
    return sorted(names, key=lambda n: (-1 if layer_of(n) is None else layer_of(n), n))


def category(name: str) -> str:
    """tensor_get_category: output, token_embd, attn_qkv, attn_kv_b, attn_v, attn_k, attn_q,
    attn_output, ffn_up, ffn_gate, ffn_down or other (substring tests, in llama.cpp's order)."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key in ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight", "attn_k.weight", "attn_q.weight",
                "attn_output.weight", "ffn_up", "ffn_gate", "ffn_down"):
        if key in name:
            return key.removesuffix(".weight")
    return "other"


def is_attn_v(cat: str) -> bool:
    return cat in ("attn_v", "attn_qkv", "attn_kv_b")


def allows_quantization(name: str, ndim: int, arch: str, quantize_output: bool = True) -> bool:
    """tensor_allows_quantization: 2-D+ tensors named ``*weight``, except norms, tiny or positional
    tensors and the others llama.cpp keeps as they are."""
    if ndim < 2 or not name.endswith("weight"):
        return False
    if any(s in name for s in _NEVER_QUANTIZED) or (arch == "glm5-next" and any(s in name for s in _GLM5_NEXT_NEVER)):
        return False
    if name == "output.weight" and not quantize_output:
        return False
    return name not in ("position_embd.weight", "token_types.weight")


def requires_imatrix(name: str, type_name: str, mix: str | None) -> bool:
    """tensor_requires_imatrix: the very-low-bit types (and Q2_K in a Q2_K_S file), except for the
    embeddings and the output, which llama-quantize lets go without an imatrix."""
    if category(name) in ("token_embd", "output"):
        return False
    return type_name in ("IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S") or (
        type_name == "Q2_K" and mix == "Q2_K_S")


def fallback(type_name: str, row_len: int) -> tuple[str, str | None]:
    """tensor_type_fallback: ``(type, note)``; the note says why the type changed (None: it fits).
    Formats llama.cpp does not know (no GGML type) have no fallback: they fit or the plan refuses them."""
    if type_name not in BLOCK_SIZES:
        return type_name, None
    block = BLOCK_SIZES[type_name]
    if row_len % block == 0:
        return type_name, None
    if type_name in FALLBACKS:
        new = FALLBACKS[type_name]
    elif block <= 32:
        new = type_name  # no smaller block to demote to: becomes F16 below
    else:
        raise FormatError(f"no tensor type fallback is defined for type {type_name}")
    note = f"row length {row_len} not a multiple of {type_name}'s block {block}"
    if row_len % BLOCK_SIZES[new]:
        return "F16", note + f" (nor of {new}'s): F16"
    return new, note + f": {new}"


@dataclasses.dataclass
class MixState:
    """quantize_state_impl: the counters a mix advances tensor by tensor, and what it knows of the model."""

    model: ModelInfo
    has_imatrix: bool = False
    has_tied_embeddings: bool = True
    n_attention_wv: int = 0
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0

    @classmethod
    def start(cls, model: ModelInfo, names: Iterable[str], has_imatrix: bool = False) -> MixState:
        """init_quantize_state_counters over all tensor names."""
        cats = [category(n) for n in names]
        return cls(model, has_imatrix, "output" not in cats, sum(is_attn_v(c) for c in cats))

    @property
    def n_layer(self) -> int:  # n_ffn_down = n_ffn_gate = n_ffn_up = n_layer_all
        return self.model.n_layers


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers that get more bits: the first and last eighth, and every
    third layer in between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or _cmod(i_layer - n_layers // 8, 3) == 2


def _cmod(a: int, b: int) -> int:
    """C's ``%`` (the sign of the dividend)."""
    return a - b * int(a / b)


def mix_type(qs: MixState, new_type: str, name: str, shape: tuple[int, ...], ftype: str, cat: str,
             output_type: str | None = None) -> tuple[str, str]:
    """llama_tensor_get_type_impl: ``(type, reason)`` for a tensor of logical ``shape`` (row length
    last) in the mix ``ftype`` whose default type is ``new_type``; ``output_type`` is llama.cpp's
    ``--output-tensor-type``, which tied embeddings follow. Advances ``qs``'s counters as llama.cpp does."""
    m, arch, row_len = qs.model, qs.model.arch, shape[-1]
    n_expert = max(1, m.n_expert)

    def layer_info(i_counter: int) -> tuple[int, int]:
        if n_expert > 1:  # experts are not consecutive: llama.cpp reads the layer from the name
            i = layer_of(name)
            if i is None or not 0 <= i < qs.n_layer:
                raise FormatError(f"tensor {name!r}: cannot determine its layer in [0, {qs.n_layer})")
            return i, qs.n_layer
        return i_counter, qs.n_layer

    if arch == "glm5-next" and any(s in name for s in ("attn_q_a", "attn_q_b", "nextn.eh_proj")) \
            and new_type not in ("F32", "BF16", "F16"):
        return "Q8_0", "glm5-next attention projections: at least Q8_0"

    if cat == "output" or (qs.has_tied_embeddings and cat == "token_embd"):
        what = "output" if cat == "output" else "tied embeddings (used as output)"
        if output_type is not None:
            return output_type, f"{what}: the output type"
        if ftype == "MXFP4_MOE":
            return "Q8_0", f"{what}: Q8_0"
        if arch == "falcon" or row_len % BLOCK_SIZES[new_type]:
            return "Q8_0", f"{what}: row length {row_len} not a multiple of {new_type}'s block: Q8_0"
        if ftype in ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"):
            return "Q5_K", f"{what}: Q5_K"
        if new_type != "Q8_0":
            return "Q6_K", f"{what}: Q6_K"
        return new_type, f"{what}: {new_type}"

    if ftype == "MXFP4_MOE":
        experts = len(shape) >= 3 and shape[-3] > 1 and (arch != "bailingmoe3" or cat in ("ffn_up", "ffn_gate", "ffn_down"))
        return ("MXFP4", "expert tensor: MXFP4") if experts else ("Q8_0", "not an expert tensor: Q8_0")

    if cat == "token_embd":
        if ftype in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
            return "Q2_K", "token embeddings: Q2_K"
        if ftype in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
            return "IQ3_S", "token embeddings: IQ3_S"
        if ftype in ("TQ1_0", "TQ2_0"):
            return "Q4_K", "token embeddings: Q4_K"
        return new_type, "token embeddings: the default"

    gqa = m.n_gqa
    if ftype in _LOW_IQ:
        iq2sm = ftype in ("IQ2_S", "IQ2_M")
        if is_attn_v(cat):
            if gqa >= 4 or m.n_expert >= 4:
                new_type, why = "Q4_K", f"{cat}: GQA {gqa} >= 4 or >= 4 experts"
            else:
                new_type, why = ("IQ3_S" if iq2sm else "Q2_K"), cat
            qs.i_attention_wv += 1
            return new_type, why
        if m.n_expert == 8 and cat == "attn_k":
            return "Q4_K", "attn_k of an 8-expert model"
        if cat == "ffn_down":
            why = "ffn_down"
            if qs.i_ffn_down < qs.n_layer // 8:
                new_type, why = ("IQ3_S" if iq2sm else "Q2_K"), f"ffn_down {qs.i_ffn_down} in the first eighth"
            qs.i_ffn_down += 1
            return new_type, why
        if cat == "attn_output":
            if m.n_expert == 8:
                return "Q5_K", "attn_output of an 8-expert model"
            if ftype in ("IQ1_S", "IQ1_M"):
                return "IQ2_XXS", "attn_output"
            if iq2sm:
                return "IQ3_S", "attn_output"
        return new_type, "the default"

    if is_attn_v(cat):
        i, n = qs.i_attention_wv, qs.n_attention_wv
        why = f"{cat} {i}: the default"
        if ftype == "Q2_K":
            new_type, why = ("Q4_K", f"{cat}: GQA {gqa} >= 4") if gqa >= 4 else ("Q3_K", cat)
        elif ftype == "Q2_K_S" and gqa >= 4:
            new_type, why = "Q4_K", f"{cat}: GQA {gqa} >= 4"
        elif ftype == "IQ3_XXS":
            new_type = "Q4_K" if gqa >= 4 else "IQ3_S" if not qs.has_imatrix else "IQ3_XXS"
            why = f"{cat}: GQA {gqa}, imatrix {qs.has_imatrix}"
        elif ftype in ("IQ3_XS", "IQ3_S") and gqa >= 4:
            new_type, why = "Q4_K", f"{cat}: GQA {gqa} >= 4"
        elif ftype == "IQ3_M":
            new_type, why = "Q4_K", cat
        elif ftype == "Q3_K_M":
            new_type, why = ("Q5_K", f"{cat} {i} < 2") if i < 2 else ("Q4_K", f"{cat} {i} >= 2")
        elif ftype == "Q3_K_L":
            new_type, why = "Q5_K", cat
        elif ftype in ("IQ4_NL", "IQ4_XS") and gqa >= 4:
            new_type, why = "Q5_K", f"{cat}: GQA {gqa} >= 4"
        elif ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
            new_type, why = "Q6_K", f"{cat} {i}/{n}: use_more_bits"
        elif ftype == "Q4_K_S" and i < 4:
            new_type, why = "Q5_K", f"{cat} {i} < 4"
        if m.is_70b and new_type in ("Q3_K", "Q4_K"):
            new_type, why = "Q5_K", f"{cat} of a 70B model (8 heads share it)"
        if m.n_expert == 8:
            new_type, why = "Q8_0", f"{cat} of an 8-expert model"
        qs.i_attention_wv += 1
        return new_type, why

    if cat == "attn_k":
        if m.n_expert == 8:
            return "Q8_0", "attn_k of an 8-expert model"
        if ftype == "IQ3_XS":
            return "IQ3_XXS", "attn_k"
        if ftype == "IQ3_XXS":
            return "IQ2_S", "attn_k"
        return new_type, "the default"

    if cat == "attn_q":
        if ftype == "IQ3_XS":
            return "IQ3_XXS", "attn_q"
        if ftype == "IQ3_XXS":
            return "IQ2_S", "attn_q"
        return new_type, "the default"

    if cat == "ffn_down":
        i_layer, n_layer = layer_info(qs.i_ffn_down)
        at = f"ffn_down {i_layer}/{n_layer}"
        why = f"{at}: the default"
        if ftype == "Q2_K":
            new_type, why = "Q3_K", at
        elif ftype == "Q2_K_S":
            if i_layer < n_layer // 8:
                new_type, why = "Q4_K", f"{at}: first eighth"
        elif ftype == "IQ3_XXS" and not qs.has_imatrix:
            new_type, why = ("Q4_K", f"{at}: first eighth, no imatrix") if i_layer < n_layer // 8 \
                else ("Q3_K", f"{at}: no imatrix")
        elif ftype == "Q3_K_M":
            if i_layer < n_layer // 16:
                new_type, why = "Q5_K", f"{at}: first sixteenth"
            elif arch != "falcon" or use_more_bits(i_layer, n_layer):
                new_type, why = "Q4_K", at
            else:
                new_type, why = "Q3_K", f"{at}: falcon"
        elif ftype == "IQ3_M" and (i_layer < n_layer // 8 or (m.n_expert == 8 and use_more_bits(i_layer, n_layer))):
            new_type, why = "Q4_K", at
        elif ftype == "Q3_K_L":
            new_type, why = ("Q4_K" if arch == "falcon" else "Q5_K"), at
        elif ftype == "Q4_K_M":
            if arch == "falcon":
                new_type = "Q6_K" if i_layer < n_layer // 16 else "Q5_K" if use_more_bits(i_layer, n_layer) else "Q4_K"
                why = f"{at}: falcon"
            elif use_more_bits(i_layer, n_layer):
                new_type, why = "Q6_K", f"{at}: use_more_bits"
        elif i_layer < n_layer // 8 and ftype in ("IQ4_NL", "IQ4_XS") and not qs.has_imatrix:
            new_type, why = "Q5_K", f"{at}: first eighth, no imatrix"
        elif ftype == "Q5_K_M" and use_more_bits(i_layer, n_layer):
            new_type, why = "Q6_K", f"{at}: use_more_bits"
        elif ftype == "Q4_K_S" and arch != "falcon" and i_layer < n_layer // 8:
            new_type, why = "Q5_K", f"{at}: first eighth"
        elif ftype in ("Q4_0", "Q5_0") and qs.has_imatrix and i_layer < n_layer // 8:
            new_type, why = ("Q4_1" if ftype == "Q4_0" else "Q5_1"), f"{at}: first eighth, with imatrix"
        qs.i_ffn_down += 1
        return new_type, why

    if cat == "attn_output":
        if arch != "falcon":
            if m.n_expert == 8:
                if ftype in ("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ3_S",
                             "IQ3_M", "IQ4_XS"):
                    return "Q5_K", "attn_output of an 8-expert model"
            else:
                promoted = {"Q2_K": "Q3_K", "IQ3_XXS": "IQ3_S", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K", "IQ3_M": "Q4_K"}
                if ftype in promoted:
                    return promoted[ftype], "attn_output"
        elif ftype == "Q3_K_L":
            return "Q4_K", "attn_output: falcon"
        return new_type, "the default"

    if cat in ("ffn_gate", "ffn_up"):
        counter = "i_ffn_gate" if cat == "ffn_gate" else "i_ffn_up"
        i_layer, n_layer = layer_info(getattr(qs, counter))
        why = "the default"
        if ftype == "IQ3_XS" and n_layer // 8 <= i_layer < 7 * n_layer // 8:
            new_type, why = "IQ3_XXS", f"{cat} {i_layer}/{n_layer}: middle layers"
        setattr(qs, counter, getattr(qs, counter) + 1)
        return new_type, why

    return new_type, "the default"

