"""The Gemma-3-270M layout for devices the 241 MB shipped file cannot reach: its config and
per-tensor shapes and formats (data/gemma3_270m_layout.json, written from the GGUF), with random
weights quantized on the default device as they load."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxquant as jq
from jaxquant import models
from jaxquant.config import ModelConfig
from jaxquant.formats import get_format
from jaxquant.io.source import TensorInfo
from jaxquant.model import Model

LAYOUT = Path(__file__).resolve().parent / "data" / "gemma3_270m_layout.json"
CONFIG = ModelConfig(
    arch="gemma3", vocab_size=262144, hidden_size=640, n_layers=18, n_heads=4, n_kv_heads=1, head_dim=256,
    ffn_dim=2048, norm_eps=float(np.float32(1e-6)), rope_theta=1000000.0, rope_theta_local=10000.0, rope_dim=256, rope_neox=True,
    sliding_window=512, swa_layers=tuple((i % 6) != 5 for i in range(18)), query_pre_attn_scalar=256.0,
    embed_scale=25.298221281347036, qk_norm=True, activation="gelu_tanh", tie_embeddings=True, context_length=32768,
    bos_id=2, eos_ids=(1,))


def layout(matrices: str | None = None) -> dict[str, tuple[list[int], str]]:
    """name -> (shape, format) of the shipped Q4_K_M file; ``matrices``: every 2-D tensor in this
    format instead (the embeddings included)."""
    out = {name: (shape, fmt) for name, (shape, fmt) in json.loads(LAYOUT.read_text()).items()}
    if matrices is not None:
        out = {name: (shape, matrices if len(shape) == 2 else fmt) for name, (shape, fmt) in out.items()}
    return out


class RandomSource:
    """A model source with the layout's tensors: random normal weights (x0.02 for matrices),
    quantized to the layout's format on the default device when loaded."""

    def __init__(self, tensors: dict[str, tuple[list[int], str]]):
        self.tensors = tensors

    @property
    def tensor_names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        shape, fmt = self.tensors[name]
        rows = int(np.prod(shape[:-1]))
        return TensorInfo(name, tuple(shape), fmt, rows * (4 * shape[-1] if fmt == "F32" else
                                                            get_format(fmt).row_bytes(shape[-1])))

    def load(self, name: str):
        shape, fmt = self.tensors[name]
        x = jax.random.normal(jax.random.PRNGKey(zlib.crc32(name.encode())), shape, jnp.float32)
        x = x * (0.02 if len(shape) > 1 else 1.0)
        return x if fmt == "F32" else jq.quantize(x, fmt, name=name)


def random_model(matrices: str | None = None) -> Model:
    """A token-id-only Model of the layout (no tokenizer), float32 activations and KV cache."""
    return Model(models.load_params(RandomSource(layout(matrices)), CONFIG), CONFIG, None, np.dtype(np.float32))
