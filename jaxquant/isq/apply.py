"""Streaming ISQ: a model's tensors quantized one at a time by a policy's plan.

``QuantizedSource`` wraps an opened model (``jaxquant.io.open_model``) so that ``load(name)``
returns the tensor in its planned format: the source tensor is read (a quantized one is
dequantized first, exactly), quantized on the default device (the GPU when there is one) and
only the packed result is returned. Anything that reads a source tensor by tensor (the models'
``load_params``, ``write_gguf``, orbax export) thus streams the model through ISQ, holding at
most one float tensor besides what it keeps.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGUFValueType

from jaxquant.errors import JaxquantError, PolicyError
from jaxquant.formats import quantize
from jaxquant.io.source import Deferred, Tensor, TensorInfo
from jaxquant.isq import mixes
from jaxquant.isq.imatrix import as_weights
from jaxquant.isq.policy import Plan, Policy, load_policy
from jaxquant.qtensor import QTensor

GGML_QNT_VERSION = 2  # general.quantization_version of the current block layouts
Weights = Mapping[str, np.ndarray]  # tensor name -> llama.cpp's quant_weights ([n_expert * K])


class QuantizedSource:
    """``source`` as ``plan`` quantizes it: same names, infos of the planned formats, and
    ``load(name)`` quantizing that tensor. ``imatrix``: per-tensor importance (an ``Imatrix``, its
    file, or a mapping name -> llama.cpp's quant weights), used as llama-quantize uses it."""

    def __init__(self, source, plan: Plan, imatrix: Any = None):
        self.source, self.plan = source, plan
        self.weights: Weights = as_weights(imatrix)
        if plan.has_imatrix != (imatrix is not None):
            raise PolicyError(f"the plan was made {'with' if plan.has_imatrix else 'without'} an imatrix, "
                              f"the quantization runs {'with' if imatrix is not None else 'without'} one")
        self.path = getattr(source, "path", None)
        self.on_load = None  # called with (index, choice) after each tensor; the progress bar hooks here
        # The per-tensor quantizer (x, format, weights, name) -> tensor: row chunks by default;
        # benchmarks/isq.py --whole swaps in one jitted call per tensor.
        self.quantize = functools.partial(_quantize, check=plan.policy.check)
        self._index = {c.name: i for i, c in enumerate(plan.choices)}

    @property
    def config(self):
        return self.source.config

    @property
    def tokenizer(self):
        return self.source.tokenizer

    @property
    def metadata(self) -> dict[str, Any]:
        """A GGUF source's metadata with llama.cpp's quantization keys (removed, then appended last,
        as llama_model_quantize does); other sources' metadata as it is."""
        if not hasattr(self.source, "value_types"):
            return self.source.metadata
        meta = {k: v for k, v in self.source.metadata.items()
                if k not in ("general.quantization_version", "general.file_type")}
        return {**meta, "general.quantization_version": GGML_QNT_VERSION, "general.file_type": self.plan.policy.ftype}

    @property
    def value_types(self) -> dict[str, tuple[GGUFValueType, ...]]:
        """The GGUF value type of each metadata key (GGUF sources only)."""
        types = dict(self.source.value_types)
        types.update({"general.quantization_version": (GGUFValueType.UINT32,),
                      "general.file_type": (GGUFValueType.UINT32,)})
        return types

    @property
    def tensor_names(self) -> list[str]:
        """In llama.cpp's order (the order llama-quantize writes)."""
        return [c.name for c in self.plan.choices]

    def info(self, name: str) -> TensorInfo:
        c = self.plan[name]
        if not c.requantize:
            return self.source.info(name)
        return TensorInfo(name, c.shape, c.format, c.nbytes)

    def load(self, name: str) -> Tensor:
        """The tensor in its planned format (kept tensors exactly as the source loads them)."""
        c = self.plan[name]
        x = self.source.load(name)
        if c.requantize:
            if isinstance(x, QTensor):
                x = _dequantize(x)  # bit-exact with ggml's to_float
            weights = self._weights_for(name, c.shape)
            if weights is None and mixes.requires_imatrix(name, c.format, self.plan.policy.mix):
                raise PolicyError(f"Missing importance matrix for tensor {name} in a very low-bit quantization "
                                  f"({c.format}): the result would be garbage, so llama-quantize bails out; use an "
                                  "imatrix with an entry for every such tensor")
            x = self.quantize(x, c.format, weights, name)
        if self.on_load is not None:
            self.on_load(self._index[name], c)
        return x

    def deferred(self, name: str) -> Deferred:
        return Deferred(self.info(name), functools.partial(self.load, name))

    def _weights_for(self, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """llama.cpp's lookup: the entry must hold ne[0] * ne[2] values (row length x experts);
        a mismatch is an error except for the token embeddings, which then go without."""
        w = self.weights.get(name)
        if w is None:
            return None
        want = shape[-1] * (shape[-3] if len(shape) >= 3 else 1)
        if w.size != want:
            if name in ("token_embd.weight", "per_layer_token_embd.weight"):
                return None
            raise JaxquantError(f"imatrix entry {name!r} has {w.size} values, tensor {list(shape)} needs {want} "
                                "(an imatrix of another model?)")
        return w.reshape(-1, shape[-1]) if len(shape) >= 3 else w

    def __repr__(self) -> str:
        return f"QuantizedSource({self.source!r}, {self.plan.policy.name or self.plan.policy.default_type})"


# one compiled call per format and shape: op-by-op dispatch of a dequantization is ~10x slower
_dequantize = jax.jit(lambda q: q.dequantize(jnp.float32))


def _quantize(x: jax.Array, fmt: str, weights: np.ndarray | None, name: str, check: bool = True) -> Tensor:
    """One tensor; experts (3-D, one imatrix row each) one expert at a time, as llama.cpp."""
    if weights is None or weights.ndim == 1:
        return quantize(x, fmt, weights, name=name, check=check)
    parts = [quantize(x[e], fmt, weights[e], name=f"{name}[{e}]", check=check) for e in range(x.shape[0])]
    if not isinstance(parts[0], QTensor):
        return jnp.stack(parts)
    arrays = {k: jnp.stack([p.arrays[k] for p in parts]) for k in parts[0].arrays}
    return QTensor(arrays, parts[0].fmt, tuple(x.shape), parts[0].dtype)


def quantized_source(source, policy: Policy | str, imatrix: Any = None) -> QuantizedSource:
    """Plan ``policy`` for ``source`` (checked before any work) and wrap it."""
    policy = load_policy(policy)
    weights = None if imatrix is None else as_weights(imatrix)
    return QuantizedSource(source, policy.plan(source, has_imatrix=weights is not None), weights)


@contextlib.contextmanager
def progress(qsource: QuantizedSource, enabled: bool | None = None) -> Iterator[None]:
    """A tqdm bar over ``qsource``'s loads: tensor count and name, weights done, ETA (by weights:
    the embeddings dominate small models). ``enabled`` None: only on a terminal."""
    from tqdm.auto import tqdm

    choices = qsource.plan.choices
    bar = tqdm(total=sum(math.prod(c.shape) for c in choices), unit="w", unit_scale=True,
               disable=None if enabled is None else not enabled, dynamic_ncols=True, desc="quantize")

    def update(i: int, c) -> None:
        bar.set_description_str(f"[{i + 1}/{len(choices)}] {c.name} -> {c.format}", refresh=False)
        bar.update(math.prod(c.shape))

    qsource.on_load = update
    try:
        yield
    finally:
        qsource.on_load = None
        bar.close()


def quantize_model(source, policy: Policy | str, imatrix: Any = None, show_progress: bool | None = None
                   ) -> dict[str, Tensor]:
    """Every tensor of ``source`` in its planned format: name -> QTensor or array, in llama.cpp's
    order. Only the packed results stay in memory."""
    qs = quantized_source(source, policy, imatrix)
    with progress(qs, show_progress):
        return {name: qs.load(name) for name in qs.tensor_names}


def write_quantized_gguf(source, policy: Policy | str, path: str | os.PathLike, imatrix: Any = None,
                         show_progress: bool | None = None, metadata: Mapping[str, Any] | None = None) -> Plan:
    """Quantize a GGUF model into a GGUF file as llama-quantize would write it (its metadata,
    ``general.file_type`` and tensor order), about two tensors in memory at a time. ``metadata``:
    extra keys appended last (the imatrix provenance llama-quantize adds)."""
    from jaxquant.io import write_gguf

    if not hasattr(source, "value_types"):  # a GGUF (or checkpoint of one) carries its metadata
        raise PolicyError(f"{source.path}: writing GGUF needs a GGUF source (its metadata holds the tokenizer and "
                          "hyperparameters); convert a HF checkpoint with llama.cpp's convert_hf_to_gguf.py, or save "
                          "an orbax checkpoint instead")
    qs = quantized_source(source, policy, imatrix)
    with progress(qs, show_progress):
        write_gguf(path, {**qs.metadata, **(metadata or {})}, {n: qs.deferred(n) for n in qs.tensor_names},
                   value_types=qs.value_types)
    return qs.plan


def save_quantized_checkpoint(source, policy: Policy | str, path: str | os.PathLike, imatrix: Any = None,
                              show_progress: bool | None = None) -> Plan:
    """Quantize ``source`` into an orbax checkpoint directory (``jaxquant.io.checkpoint``): the
    packed tensors, the model's metadata and the plan's types."""
    from jaxquant.io.checkpoint import model_record, save_checkpoint

    qs = quantized_source(source, policy, imatrix)
    with progress(qs, show_progress):
        tensors = {name: qs.load(name) for name in qs.tensor_names}
    p = qs.plan.policy
    save_checkpoint(path, tensors, model_record(qs), extra={"policy": p.name or p.default_type, "ftype": p.ftype})
    return qs.plan


def save_quantized_hf(source, policy: Policy | str, path: str | os.PathLike, method: str = "gptq", imatrix: Any = None,
                      show_progress: bool | None = None, **kw) -> Plan:
    """Quantize ``source`` into a Hugging Face GPTQ or AWQ checkpoint directory
    (``jaxquant.io.hf_export.save_hf``, which takes ``kw``): the policy must give every block
    matrix one GPTQ{b}_G{g} format; the other tensors are written in float."""
    from jaxquant.io.hf_export import save_hf

    qs = quantized_source(source, policy, imatrix)
    with progress(qs, show_progress):
        save_hf(qs, path, method, **kw)
    return qs.plan


def imatrix_metadata(imatrix, file: str | Path) -> dict[str, Any]:
    """The keys llama-quantize adds when given an imatrix file (tools/quantize/quantize.cpp)."""
    meta: dict[str, Any] = {"quantize.imatrix.file": str(file)[:127]}
    if imatrix.datasets:
        meta["quantize.imatrix.dataset"] = imatrix.datasets[0][:127]
    meta["quantize.imatrix.entries_count"] = len(imatrix.entries)
    if imatrix.chunk_count > 0:
        meta["quantize.imatrix.chunks_count"] = imatrix.chunk_count
    return meta


__all__ = ["QuantizedSource", "imatrix_metadata", "progress", "quantize_model", "quantized_source",
           "save_quantized_checkpoint", "save_quantized_hf", "write_quantized_gguf"]
