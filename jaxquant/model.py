"""``jaxquant.load``: a model file opened and its parameters loaded, ready for generate and eval."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import models, sharding
from jaxquant.config import ModelConfig
from jaxquant.errors import JaxquantError
from jaxquant.io import DEFAULT_MODEL, open_model
from jaxquant.io.tokenizer import Tokenizer

# Gemma's chat format (google/gemma-3 tokenizer_config.json), for Gemma GGUF files that carry no
# chat template; llama.cpp applies the same built-in "gemma" template to them.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\\n'}}\n{%- endif -%}\n")
FALLBACK_CHAT_TEMPLATES = {"gemma2": GEMMA_CHAT_TEMPLATE, "gemma3": GEMMA_CHAT_TEMPLATE}


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded model: ``params`` (a pytree whose weights are arrays or QTensors), the static
    ``cfg``, the ``tokenizer`` (None for a model driven by token ids only), ``dtype``, the dtype of
    plain weights, and ``compute_dtype``, that of matmul inputs and the KV cache (None:
    ``default_dtype()``)."""

    params: models.Params
    cfg: ModelConfig
    tokenizer: Tokenizer | None
    dtype: np.dtype = np.dtype(np.float32)
    path: Path | None = None
    compute_dtype: np.dtype | None = None

    def __post_init__(self):
        cd = self.compute_dtype
        object.__setattr__(self, "compute_dtype", default_dtype() if cd is None else jnp.dtype(cd))


def default_dtype() -> np.dtype:
    """bfloat16 on GPU (products still accumulate in float32); float32 elsewhere, where the
    parity tests against llama.cpp run."""
    return jnp.dtype(jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32)


def load(path: str | os.PathLike | None = None, *, dtype=None, compute_dtype=None, fuse=None, isq=None,
         imatrix=None, mesh=None) -> Model:
    """Load a GGUF file or a Hugging Face checkpoint directory (None: the embedded Gemma-3-270M), or
    an opened model source (``jaxquant.io.open_model``, ``jaxquant.calib.calibrate``).

    Quantized tensors stay packed QTensors in their file format; plain matrices become ``dtype``;
    activations entering matmuls and the KV cache are ``compute_dtype`` (both default to
    ``default_dtype()``: bfloat16 on GPU, float32 elsewhere). ``fuse`` (default: on GPU) stacks q/k/v
    (q/k where v's format differs) and gate/up into one matmul each where their formats match
    (``models.fuse_projections``).
    ``isq``: quantize at load by a policy (a ``jaxquant.isq.Policy``, a llama.cpp mix such as
    ``"Q4_K_M"`` or a policy YAML), one tensor at a time, with ``imatrix`` (a file or ``Imatrix``).
    ``mesh`` (a ``jax.sharding.Mesh``): tensor-parallel over it (``jaxquant.sharding``), each tensor
    placed on its devices as it is loaded or requantized; q/k/v and gate/up stay apart there.
    A Gemma model without a chat template gets Gemma's official one.
    """
    source = path if hasattr(path, "tensor_names") else open_model(DEFAULT_MODEL if path is None else path)
    cfg, tokenizer = source.config, source.tokenizer
    loading = contextlib.nullcontext()
    if isq is not None:
        from jaxquant.isq.apply import progress, quantized_source

        source = quantized_source(source, isq, imatrix)
        loading = progress(source)
    dtype = default_dtype() if dtype is None else jnp.dtype(dtype)
    if mesh is not None and fuse:
        raise JaxquantError("load: fuse=True with a mesh; q/k/v and gate/up stay apart on a mesh so that each device "
                            "holds its heads (jaxquant.sharding); leave fuse unset")
    with loading:
        params = models.load_params(source, cfg, dtype, None if mesh is None else sharding.placer(cfg, mesh))
    if mesh is not None:
        params = sharding.unfuse(params, cfg, mesh)
    elif fuse if fuse is not None else jax.default_backend() == "gpu":
        params = models.fuse_projections(params)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATES.get(cfg.arch)
    return Model(params, cfg, tokenizer, dtype, Path(source.path), compute_dtype)
