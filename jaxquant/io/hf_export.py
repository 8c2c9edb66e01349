"""Quantized models written as Hugging Face GPTQ or AWQ (GEMM) checkpoints that transformers loads.

``save_hf(source, directory, method)`` writes ``config.json`` (``ModelConfig.to_hf`` plus a
``quantization_config``), one ``model.safetensors`` and the tokenizer. Every matrix of the decoder
blocks must be a ``GPTQ{b}_G{g}`` QTensor, all of one bit width and group size (``calibrate`` with
method gptq or awq makes them, ``jaxquant.quantize`` rounds to them, a GPTQ/AWQ checkpoint loads as
them); ``formats.gptq.to_gptq`` / ``to_awq`` pack them, the exact inverses of the loaders, with
Llama's q/k rows back in HF's order. Every other tensor (embeddings, norms, biases, an lm_head) is
written in float ``dtype``, dequantized first when the source holds it quantized, Gemma's norms
back to HF's ``w`` of ``1 + w``.

GPTQ's ``checkpoint_format``: 'gptq' (v1, zeros stored minus one) is transformers' default and
what every GPTQ runtime reads (gptqmodel, vLLM, TGI, exllama, AutoGPTQ), so "auto" writes it. v1
cannot store a zero point of 0 (an asymmetric group with nothing below zero), so a model that has
one is written as 'gptq_v2' (true zeros), which gptqmodel, transformers' GPTQ backend, reads.

Tokenizer: an HF source's tokenizer files are copied. A GGUF source's tokenizer is converted by
transformers' GGUF converter (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``) when
transformers is installed; otherwise none is written and the original model's files are to be
copied beside the checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from jaxquant.errors import FormatError, JaxquantError
from jaxquant.formats import gptq
from jaxquant.io import hf_names
from jaxquant.io.hf_quantized import _permute_rows
from jaxquant.io.output import atomic_output, check_output_path
from jaxquant.io.safetensors import _permute
from jaxquant.qtensor import QTensor

METHODS = ("gptq", "awq")
FORMATS = ("auto", "gptq", "gptq_v2")
DTYPES = {"float16": np.float16, "bfloat16": jnp.bfloat16, "float32": np.float32}
MATRIX = re.compile(r"^blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight$")
BIASES = ("attn_q", "attn_k", "attn_v", "attn_output")
TOKENIZERS = ("tokenizer.json", "tokenizer.model", "vocab.json")  # an HF tokenizer has one of these
TOKENIZER_FILES = (*TOKENIZERS, "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "merges.txt", "generation_config.json")

_dequantize = jax.jit(lambda q: q.dequantize(jnp.float32))


def save_hf(source, directory: str | os.PathLike, method: str = "gptq", *, dtype: str = "float16",
            checkpoint_format: str = "auto", log: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Write ``source`` (an opened or calibrated model whose block matrices are GPTQ{b}_G{g}
    QTensors) to ``directory`` as a transformers checkpoint: GPTQ (``method`` "gptq") or AWQ GEMM
    ("awq"); see the module doc. ``dtype``: of the float tensors. Returns the written config.json."""
    if method not in METHODS or checkpoint_format not in FORMATS or dtype not in DTYPES:
        raise JaxquantError(f"save_hf: method {method!r}, checkpoint_format {checkpoint_format!r}, dtype {dtype!r}; "
                            f"valid: {METHODS}, {FORMATS}, {tuple(DTYPES)}")
    directory = check_output_path(directory, directory=True)
    cfg = source.config
    names = list(source.tensor_names)
    bias = any(n.endswith(".attn_q.bias") for n in names)
    config = cfg.to_hf(attention_bias=bias)  # what cannot be written fails before any work
    hf = {name: _hf_name(cfg.arch, name, source.path) for name in names}
    layers = {n: source.load(n) for n in names if MATRIX.match(n)}
    quant = _quantization_config(layers, method, checkpoint_format, f"{source.path}")
    tensors: dict[str, np.ndarray] = {}
    for name, q in layers.items():
        kind = hf_names.transform(cfg.arch, name)
        if kind in ("permute_q", "permute_k"):
            q = _permute_rows(q, cfg.n_heads if kind == "permute_q" else cfg.n_kv_heads, name, inverse=True)
        packed = (gptq.to_gptq(q, v1=quant.get("checkpoint_format") == "gptq", where=name) if method == "gptq"
                  else gptq.to_awq(q, where=name))
        tensors.update({f"{hf[name].removesuffix('.weight')}.{part}": a for part, a in packed.items()})
    for name in names:
        if name not in layers:
            tensors[hf[name]] = _float(source.load(name), cfg, name, dtype)
    if bias or cfg.arch == "qwen2":  # the HF class has every bias of its attention: absent ones are zero
        _zero_biases(tensors, cfg, dtype)
    config.update(torch_dtype=dtype, quantization_config=quant)
    directory.mkdir(exist_ok=True)
    # safetensors writes an array's memory as it lies: C order first; save_file is itself atomic
    tensors = {k: np.ascontiguousarray(a) for k, a in tensors.items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with atomic_output(directory / "config.json") as out, open(out, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    missing = _write_tokenizer(source.path, directory)
    if missing and log is not None:
        log(f"{directory}: no tokenizer written ({missing}); copy the original model's tokenizer files there")
    return config


def _quantization_config(layers: dict[str, Any], method: str, checkpoint_format: str, where: str) -> dict[str, Any]:
    """The ``quantization_config`` that describes every block matrix: one bit width and group
    size (-1 where each group is a whole row), act order when any matrix has it."""
    if not layers:
        raise FormatError(f"{where}: no decoder block matrices to write")
    settings = {}
    for name, q in layers.items():
        if not isinstance(q, QTensor) or q.format.family != "gptq":
            raise FormatError(f"{where}: tensor {name!r} is {q.fmt if isinstance(q, QTensor) else 'float'}; a "
                              f"{method.upper()} checkpoint needs every block matrix in a GPTQ{{b}}_G{{g}} format "
                              "(calibrate or quantize with such a policy)")
        settings[name] = (gptq.bits_of(q), q.format.block_size)
    if all(g == layers[n].shape[1] for n, (_, g) in settings.items()):  # one group per row: -1
        settings = {n: (b, -1) for n, (b, _) in settings.items()}
    first, (bits, group) = next(iter(settings.items()))
    for name, (b, g) in settings.items():
        if (b, g) != (bits, group):
            raise FormatError(f"{where}: {first!r} has {bits} bits in groups of {group}, {name!r} {b} bits in groups "
                              f"of {g}; a {method.upper()} checkpoint holds one bit width and group size")
    if method == "awq":
        return {"quant_method": "awq", "bits": bits, "group_size": group, "zero_point": True, "version": "gemm"}
    zeros = [np.asarray(q.arrays["zero"]) for q in layers.values()]
    if checkpoint_format == "auto":
        checkpoint_format = "gptq_v2" if any((z == 0).any() for z in zeros) else "gptq"
    return {"quant_method": "gptq", "bits": bits, "group_size": group,
            "desc_act": any("perm" in q.arrays for q in layers.values()),
            "sym": all((z == 1 << (bits - 1)).all() for z in zeros), "checkpoint_format": checkpoint_format}


def _hf_name(arch: str, name: str, where) -> str:
    try:
        return hf_names.hf_name(arch, name)
    except KeyError:
        raise JaxquantError(f"{where}: tensor {name!r} has no place in a Hugging Face {arch} checkpoint (GGUF's "
                            "rope_freqs, llama3 rope factors as a tensor, cannot be written to config.json)") from None


def _float(x, cfg, name: str, dtype: str) -> np.ndarray:
    """A tensor as HF stores it: float ``dtype``, HF's row order and norm convention."""
    x = np.asarray(_dequantize(x) if isinstance(x, QTensor) else x, np.float32)
    kind = hf_names.transform(cfg.arch, name)
    if kind == "plus_one":
        x = x - np.float32(1)
    elif kind is not None:
        x = _permute(x, cfg.n_heads if kind == "permute_q" else cfg.n_kv_heads, inverse=True)
    return x.astype(DTYPES[dtype])


def _zero_biases(tensors: dict[str, np.ndarray], cfg, dtype: str) -> None:
    biases = BIASES if cfg.arch != "qwen2" else BIASES[:3]  # Qwen2's o_proj has none
    for i in range(cfg.n_layers):
        for role in biases:
            name = hf_names.hf_name(cfg.arch, f"blk.{i}.{role}.bias")
            rows = cfg.tensor_shape(f"blk.{i}.{role}.bias")
            tensors.setdefault(name, np.zeros(rows, DTYPES[dtype]))


def _write_tokenizer(path, directory: Path) -> str | None:
    """Copy an HF source's tokenizer files, or convert a GGUF source's tokenizer with transformers;
    why none was written, or None."""
    path = Path(str(path))
    if path.is_dir():
        found = [path / f for f in TOKENIZER_FILES if (path / f).is_file()]
        for f in found:
            shutil.copyfile(f, directory / f.name)
        return None if any(f.name in TOKENIZERS for f in found) else f"{path} holds no tokenizer files"
    try:
        import transformers
    except ImportError:
        return "converting a GGUF tokenizer needs transformers"
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 (transformers' GGUF converter knows fewer tokenizers than llama.cpp)
        return f"transformers cannot convert the tokenizer of {path.name}: {e}"
    tokenizer.save_pretrained(str(directory))
    return None


__all__ = ["save_hf"]
