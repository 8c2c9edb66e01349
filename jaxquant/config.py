"""ModelConfig: the static hyperparameters of a model, from GGUF metadata or a HF config.json.

Semantics follow llama.cpp (the reference our logits must match): names are llama.cpp's
architecture names, tensors are the GGUF ones (``blk.{i}.attn_q.weight``), and the rules that
GGUF leaves implicit (Gemma's sliding-window pattern, attention scale, softcap defaults) are
llama.cpp's ``load_arch_hparams``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxquant.errors import FileFormatError, JaxquantError

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3")

# HF config.json model_type -> our (llama.cpp) architecture.
HF_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
                  "gemma2": "gemma2", "gemma3": "gemma3", "gemma3_text": "gemma3"}

# Our architecture -> the HF model_type and class that to_hf writes (the text-only model).
HF_CLASSES = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM"),
              "qwen3": ("qwen3", "Qwen3ForCausalLM"), "gemma2": ("gemma2", "Gemma2ForCausalLM"),
              "gemma3": ("gemma3_text", "Gemma3ForCausalLM")}

# llama.cpp applies the NORM (adjacent pairs) rope to llama and NEOX (halves) to the others; the HF
# Llama q/k weights are permuted on load so that the GGUF convention holds for every source.
_NEOX_ARCHS = ("qwen2", "qwen3", "phi3", "gemma2", "gemma3")
# llama.cpp's default sliding-window pattern (every n-th layer is global) and window.
_SWA_PATTERN = {"gemma2": 2, "gemma3": 6}
_GEMMA2_WINDOW = 4096
# Layer counts of the 27B Gemmas, whose attention scale is 1/sqrt(n_embd/n_head) in llama.cpp.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rope frequency scaling: 'linear' (positions / factor) or 'llama3' (Llama 3.1 smooth
    frequency-dependent scaling). GGUF files carry llama3 factors as the ``rope_freqs.weight``
    tensor instead, so configs from GGUF only ever hold 'linear'."""

    kind: str
    factor: float
    original_context_length: int = 0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def __post_init__(self):
        _check_number("rope scaling factor", self.factor, positive=True)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static (hashable) model hyperparameters; pass it to jit as a static argument.

    ``swa_layers[i]`` says whether layer i uses sliding-window attention of ``sliding_window``
    tokens and the local rope base ``rope_theta_local``; global layers use ``rope_theta`` and
    ``rope_scaling``. Softcaps are None when absent. Norm weights follow the GGUF convention
    (Gemma's ``1 + w`` already folded in), as the sources deliver them.
    """

    arch: str
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float
    rope_theta: float = 10000.0
    rope_theta_local: float = 10000.0
    rope_dim: int = 0  # rotated dimensions per head (0: head_dim)
    rope_neox: bool = True  # rotate halves (NEOX) rather than adjacent pairs (NORM)
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None
    swa_layers: tuple[bool, ...] = ()
    attn_softcap: float | None = None
    final_softcap: float | None = None
    query_pre_attn_scalar: float = 0.0  # attention scores scale 1/sqrt(this); 0: head_dim
    embed_scale: float = 1.0  # token embeddings are multiplied by this (Gemma: sqrt(hidden_size))
    qk_norm: bool = False
    activation: str = "silu"  # of the gated FFN: 'silu' or 'gelu_tanh'
    tie_embeddings: bool = False
    context_length: int = 0
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()

    def __post_init__(self):
        _check_arch(self.arch, "architecture")
        dims = {k: getattr(self, k) for k in ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads",
                                              "head_dim", "ffn_dim")}
        bad = {k: v for k, v in dims.items() if v <= 0}
        if bad or self.n_heads % self.n_kv_heads:
            raise FileFormatError(f"invalid model config: {bad or dims} (sizes must be positive, n_heads a "
                                  "multiple of n_kv_heads)")
        for name, positive in (("norm_eps", False), ("rope_theta", True), ("rope_theta_local", True),
                               ("query_pre_attn_scalar", False), ("embed_scale", True)):
            _check_number(f"model config {name}", getattr(self, name), positive)
        for name in ("attn_softcap", "final_softcap"):
            if getattr(self, name) is not None:
                _check_number(f"model config {name}", getattr(self, name), positive=True)
        if self.swa_layers and len(self.swa_layers) != self.n_layers:
            raise FileFormatError(f"sliding-window pattern has {len(self.swa_layers)} entries for "
                                  f"{self.n_layers} layers")

    @property
    def eos_id(self) -> int | None:
        return self.eos_ids[0] if self.eos_ids else None

    def is_swa(self, layer: int) -> bool:
        return bool(self.swa_layers) and self.swa_layers[layer]

    def tensor_shape(self, name: str) -> tuple[int, ...] | None:
        """The logical shape (numpy order) this config implies for a canonical tensor, or None for
        names it does not determine."""
        h, q, kv = self.hidden_size, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        phi3 = self.arch == "phi3"
        shapes = {
            "token_embd.weight": (self.vocab_size, h), "output.weight": (self.vocab_size, h),
            "attn_q.weight": (q, h), "attn_k.weight": (kv, h), "attn_v.weight": (kv, h),
            "attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,),
            "attn_qkv.weight": (q + 2 * kv, h), "attn_output.weight": (h, q), "attn_output.bias": (h,),
            "attn_q_norm.weight": (self.head_dim,), "attn_k_norm.weight": (self.head_dim,),
            "ffn_gate.weight": (self.ffn_dim, h), "ffn_up.weight": ((2 if phi3 else 1) * self.ffn_dim, h),
            "ffn_down.weight": (h, self.ffn_dim), "rope_freqs.weight": ((self.rope_dim or self.head_dim) // 2,),
        }
        key = name.split(".", 2)[2] if name.startswith("blk.") else name
        if key.endswith("norm.weight") and key not in shapes:
            return (h,)
        return shapes.get(key)

    @classmethod
    def from_gguf(cls, metadata: Mapping[str, Any], tensor_names: Sequence[str] | None = None) -> ModelConfig:
        """From GGUF metadata (``GGUFSource.metadata``). ``tensor_names`` decide tied embeddings
        (no ``output.weight``); without them the embeddings count as untied."""
        m = _Keys(metadata, "GGUF metadata")
        arch = m.get("general.architecture", str)
        _check_arch(arch, "GGUF general.architecture")  # before the keys, which depend on it
        p = f"{arch}."
        hidden, n_layers = m.size(p + "embedding_length"), m.size(p + "block_count")
        n_heads = m.per_layer(p + "attention.head_count", n_layers)
        n_kv = m.per_layer(p + "attention.head_count_kv", n_layers, n_heads)
        head_dim = m.size(p + "attention.key_length", hidden // n_heads)
        vocab = m.size(p + "vocab_size", None)
        n_tokens = len(m.get("tokenizer.ggml.tokens", list, [])) or None
        if vocab is not None and n_tokens is not None and vocab < n_tokens:
            raise FileFormatError(f"{m.where}: key {p + 'vocab_size'!r} is {vocab}, but tokenizer.ggml.tokens holds "
                                  f"{n_tokens} tokens, whose ids would run past the embedding rows (a corrupt or "
                                  "mis-converted file)")
        if vocab is None and n_tokens is None:
            raise FileFormatError(f"{m.where}: no vocabulary size: neither {p + 'vocab_size'!r} nor a non-empty "
                                  "'tokenizer.ggml.tokens'")
        vocab = vocab or n_tokens
        scaling = None
        kind = m.get(p + "rope.scaling.type", str, "none")
        factor = m.number(p + "rope.scaling.factor", 0.0)
        if kind == "linear" and factor not in (0.0, 1.0):
            scaling = RopeScaling("linear", _f32(factor))
        elif kind not in ("none", "linear"):
            raise JaxquantError(f"rope scaling {kind!r} is not supported (supported: linear, and llama3 through "
                                "the rope_freqs.weight tensor)")
        rope_theta = m.number(p + "rope.freq_base", 10000.0, positive=True)
        window, swa = None, ()
        if arch in _SWA_PATTERN:
            window = m.get(p + "attention.sliding_window", int, _GEMMA2_WINDOW if arch == "gemma2" else 0) or None
            if window:
                swa = _swa_layers(m.get(p + "attention.sliding_window_pattern", (int, list), _SWA_PATTERN[arch]),
                                  n_layers)
        local_default = rope_theta if arch == "gemma2" else 10000.0
        softcap_defaults = {"gemma2": (50.0, 30.0)}.get(arch, (None, None))
        bos = m.get("tokenizer.ggml.bos_token_id", int, None)
        eos = m.get("tokenizer.ggml.eos_token_id", int, None)
        return cls(
            arch=arch, vocab_size=vocab, hidden_size=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
            head_dim=head_dim, ffn_dim=m.per_layer(p + "feed_forward_length", n_layers),
            norm_eps=_f32(m.number(p + "attention.layer_norm_rms_epsilon")),
            rope_theta=_f32(rope_theta),
            rope_theta_local=_f32(m.number(p + "rope.freq_base_swa", local_default, positive=True)),
            rope_dim=m.get(p + "rope.dimension_count", int, head_dim), rope_neox=arch in _NEOX_ARCHS,
            rope_scaling=scaling, sliding_window=window, swa_layers=swa,
            attn_softcap=_opt_f32(m.number(p + "attn_logit_softcapping", softcap_defaults[0])),
            final_softcap=_opt_f32(m.number(p + "final_logit_softcapping", softcap_defaults[1])),
            query_pre_attn_scalar=_attention_scalar(arch, n_layers, hidden, n_heads, head_dim),
            embed_scale=_embed_scale(arch, hidden), qk_norm=arch in ("qwen3", "gemma3"),
            activation="gelu_tanh" if arch.startswith("gemma") else "silu",
            tie_embeddings=tensor_names is not None and "output.weight" not in tensor_names,
            context_length=m.get(p + "context_length", int), bos_id=bos, eos_ids=() if eos is None else (eos,))

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> ModelConfig:
        """From a Hugging Face ``config.json`` (as a dict). Multimodal configs use their
        ``text_config``."""
        model_type = config.get("model_type")
        if "text_config" in config:
            config = {**config["text_config"], "model_type": config["text_config"].get("model_type", model_type)}
            model_type = config["model_type"]
        arch = HF_MODEL_TYPES.get(model_type)
        if arch is None:
            raise JaxquantError(f"unsupported HF model_type {model_type!r}; supported: "
                                f"{', '.join(sorted(HF_MODEL_TYPES))}")
        c = _Keys(config, "config.json")
        hidden, n_layers = c.size("hidden_size"), c.size("num_hidden_layers")
        n_heads = c.size("num_attention_heads")
        n_kv = c.size("num_key_value_heads", n_heads)
        head_dim = c.size("head_dim", hidden // n_heads)
        rope = _hf_rope(config)
        r = _Keys(rope, "config.json rope parameters")
        rope_theta = r.number("rope_theta", 10000.0, positive=True)
        window, swa = None, ()
        layer_types = config.get("layer_types")
        if arch in _SWA_PATTERN:
            window = c.get("sliding_window", int, _GEMMA2_WINDOW if arch == "gemma2" else 0) or None
            if window:
                pattern = layer_types or c.get("sliding_window_pattern", int, _SWA_PATTERN[arch])
                swa = _swa_layers(pattern, n_layers)
        elif c.get("sliding_window", int, None) and config.get("use_sliding_window", True):
            window = c.get("sliding_window", int)  # Mistral, Phi-3: every layer
            swa = _swa_layers(layer_types or 0, n_layers)
        local = r.number("rope_local_base_freq", c.number("rope_local_base_freq", 10000.0, positive=True),
                         positive=True)
        eos = config.get("eos_token_id")
        eos_ids = tuple(int(e) for e in eos) if isinstance(eos, list) else () if eos is None else (int(eos),)
        default_tie = arch.startswith("gemma")
        return cls(
            arch=arch, vocab_size=c.size("vocab_size"), hidden_size=hidden, n_layers=n_layers,
            n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, ffn_dim=c.size("intermediate_size"),
            norm_eps=_f32(c.number("rms_norm_eps")), rope_theta=_f32(rope_theta),
            rope_theta_local=_f32(local if arch == "gemma3" else rope_theta),
            rope_dim=int(head_dim * rope.get("partial_rotary_factor", 1.0)), rope_neox=arch in _NEOX_ARCHS,
            rope_scaling=_hf_rope_scaling(rope), sliding_window=window, swa_layers=swa,
            attn_softcap=_opt_f32(c.number("attn_logit_softcapping", None)),
            final_softcap=_opt_f32(c.number("final_logit_softcapping", None)),
            query_pre_attn_scalar=float(c.number("query_pre_attn_scalar", head_dim, positive=True)),
            embed_scale=_embed_scale(arch, hidden), qk_norm=arch in ("qwen3", "gemma3"),
            activation="gelu_tanh" if arch.startswith("gemma") else "silu",
            tie_embeddings=c.get("tie_word_embeddings", bool, default_tie),
            context_length=c.get("max_position_embeddings", int, 0),
            bos_id=c.get("bos_token_id", int, None), eos_ids=eos_ids)

    def to_hf(self, attention_bias: bool = False) -> dict[str, Any]:
        """The Hugging Face ``config.json`` (as a dict) of this model, which ``from_hf`` reads back
        as the same config; in transformers 4's keys (``rope_theta``, ``rope_scaling``), which 5
        reads too. ``attention_bias``: whether q/k/v (and o) carry biases (Qwen2's always do)."""
        if self.arch not in HF_CLASSES:
            raise JaxquantError(f"writing a {self.arch} config.json is not supported (supported: "
                                f"{', '.join(HF_CLASSES)})")
        gemma = self.arch.startswith("gemma")
        if (self.rope_dim or self.head_dim) != self.head_dim or (self.sliding_window and not gemma):
            raise JaxquantError(f"a {self.arch} model with partial rope or a sliding window has no config.json "
                                "jaxquant can write")
        model_type, cls = HF_CLASSES[self.arch]
        out: dict[str, Any] = {
            "architectures": [cls], "model_type": model_type, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.ffn_dim, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta, "rope_scaling": _rope_scaling_to_hf(self),
            "tie_word_embeddings": self.tie_embeddings, "bos_token_id": self.bos_id,
            "eos_token_id": list(self.eos_ids) if len(self.eos_ids) > 1 else self.eos_id}
        if self.context_length:
            out["max_position_embeddings"] = self.context_length
        if gemma:
            layer_types = ["sliding_attention" if self.is_swa(i) else "full_attention" for i in range(self.n_layers)]
            scalar = self.query_pre_attn_scalar  # transformers' Gemma configs take an int when it is one
            out.update(hidden_activation="gelu_pytorch_tanh", sliding_window=self.sliding_window or 4096,
                       query_pre_attn_scalar=int(scalar) if scalar.is_integer() else scalar, layer_types=layer_types,
                       attn_logit_softcapping=self.attn_softcap, final_logit_softcapping=self.final_softcap)
            if self.arch == "gemma3":
                out["rope_local_base_freq"] = self.rope_theta_local
        else:
            out.update(hidden_act="silu", use_sliding_window=False)
            if self.arch != "qwen2":
                out["attention_bias"] = attention_bias
        return out


def _rope_scaling_to_hf(cfg: ModelConfig) -> dict[str, Any] | None:
    s = cfg.rope_scaling
    if s is None:
        return None
    if s.kind == "linear":
        return {"rope_type": "linear", "factor": s.factor}
    return {"rope_type": "llama3", "factor": s.factor, "original_max_position_embeddings": s.original_context_length,
            "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor}


class _Keys:
    """Typed lookups with errors that name the missing or mistyped key."""

    def __init__(self, values: Mapping[str, Any], where: str):
        self.values, self.where = values, where

    _MISSING = object()

    def get(self, key: str, kind, default=_MISSING):
        if key not in self.values or self.values[key] is None:
            if default is self._MISSING:
                raise FileFormatError(f"{self.where}: missing key {key!r}")
            return default
        value = self.values[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = "/".join(k.__name__ for k in kinds)
            raise FileFormatError(f"{self.where}: key {key!r} is {value!r}, expected {names}")
        return value

    def number(self, key: str, default=_MISSING, *, positive: bool = False) -> float | None:
        """A real value that must be finite and >= 0 (> 0 with ``positive``); None only as the default."""
        value = self.get(key, float, default)
        if value is not None:
            _check_number(f"{self.where}: key {key!r}", value, positive)
        return value

    def size(self, key: str, default=_MISSING) -> int | None:
        """A count or dimension that must be a positive integer; None only as the default."""
        value = self.get(key, int, default)
        return self._positive(key, value) if self.values.get(key) is not None else value  # a default is not checked

    def _positive(self, key: str, value: int) -> int:
        if value <= 0:
            raise FileFormatError(f"{self.where}: key {key!r} is {value}; it must be a positive integer")
        return value

    def per_layer(self, key: str, n_layers: int, default=_MISSING) -> int:
        """A count that GGUF may store per layer (an array); jaxquant needs it uniform and positive."""
        value = self.get(key, (int, list), default)
        if isinstance(value, list):
            if len(set(value)) != 1 or not isinstance(value[0], int):
                raise JaxquantError(f"{self.where}: key {key!r} varies per layer ({value[:8]}...), which is "
                                    "not supported")
            value = value[0]
        return self._positive(key, value)


def _check_number(what: str, value: float, positive: bool) -> None:
    """Refuse a NaN, infinite or negative (or, with ``positive``, zero) value: eps, rope bases, scales."""
    if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
        raise FileFormatError(f"{what} is {value!r}; it must be a finite number {'> 0' if positive else '>= 0'} "
                              "(a corrupt or mis-converted config)")


def _check_arch(arch: str, where: str) -> None:
    if arch not in SUPPORTED_ARCHS:
        raise JaxquantError(f"{where} {arch!r} is not supported; supported architectures: "
                            f"{', '.join(SUPPORTED_ARCHS)}")


def _f32(x: float) -> float:
    """llama.cpp holds these as float32; round so that GGUF and HF configs agree."""
    return float(np.float32(x))


def _opt_f32(x: float | None) -> float | None:
    return None if not x else _f32(x)


def _swa_layers(pattern: int | list, n_layers: int) -> tuple[bool, ...]:
    """Per-layer sliding-window flags from llama.cpp's pattern (every n-th layer global; 0: all
    sliding), a per-layer bool list, or HF's ``layer_types`` strings."""
    if isinstance(pattern, list):
        return tuple(p == "sliding_attention" if isinstance(p, str) else bool(p) for p in pattern)
    return tuple(pattern == 0 or i % pattern < pattern - 1 for i in range(n_layers))


def _attention_scalar(arch: str, n_layers: int, hidden: int, n_heads: int, head_dim: int) -> float:
    if _GEMMA_27B_LAYERS.get(arch) == n_layers:
        return float(hidden // n_heads)
    return float(head_dim)


def _embed_scale(arch: str, hidden: int) -> float:
    return math.sqrt(hidden) if arch.startswith("gemma") else 1.0


def _hf_rope(config: Mapping[str, Any]) -> dict[str, Any]:
    """Rope settings from either transformers 4 (``rope_theta`` + ``rope_scaling``) or 5
    (``rope_parameters``, per layer type for Gemma 3)."""
    params = config.get("rope_parameters") or {}
    if "full_attention" in params:
        local = params.get("sliding_attention", {}).get("rope_theta")
        params = {**params["full_attention"], **({"rope_local_base_freq": local} if local else {})}
    out = {**(config.get("rope_scaling") or {}), **params}
    for key in ("rope_theta", "partial_rotary_factor"):
        if key not in out and config.get(key) is not None:
            out[key] = config[key]
    return out


def _hf_rope_scaling(rope: Mapping[str, Any]) -> RopeScaling | None:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind == "linear":
        return RopeScaling("linear", _f32(rope["factor"]))
    if kind == "llama3":
        return RopeScaling("llama3", _f32(rope["factor"]), int(rope["original_max_position_embeddings"]),
                           _f32(rope.get("low_freq_factor", 1.0)), _f32(rope.get("high_freq_factor", 4.0)))
    raise JaxquantError(f"rope scaling {kind!r} is not supported (supported: linear, llama3)")
