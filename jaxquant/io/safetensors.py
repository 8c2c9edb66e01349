"""Hugging Face checkpoints: ``config.json`` + ``model.safetensors`` or a sharded
``model.safetensors.index.json``, read lazily per tensor through the safetensors library.

Tensors are exposed under canonical (GGUF) names with the GGUF value conventions (see hf_names);
tied embeddings show as a ``token_embd.weight`` without ``output.weight``, as in GGUF.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from jaxquant.config import ModelConfig
from jaxquant.errors import FileFormatError, JaxquantError
from jaxquant.io import hf_names
from jaxquant.io.source import TensorInfo

INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"
DTYPES = {"BF16": jnp.bfloat16, "F16": np.float16, "F32": np.float32}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except OSError as e:
        raise FileFormatError(f"{path}: cannot read ({e.strerror})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise FileFormatError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(value, dict):
        raise FileFormatError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def _safe_open(path: Path):
    try:
        return safe_open(str(path), framework="numpy")
    except (SafetensorError, OSError) as e:
        raise FileFormatError(f"{path}: invalid safetensors file: {e}") from None


class HFSource:
    """A Hugging Face checkpoint directory: config and tensor infos at once, data on ``load``."""

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory)
        self.metadata: dict[str, Any] = _read_json(self.path / "config.json")
        try:
            self.config = ModelConfig.from_hf(self.metadata)
        except JaxquantError as e:
            raise type(e)(f"{self.path / 'config.json'}: {e}") from None
        self._files: dict[str, tuple[Any, set[str]]] = {}  # shard file -> (open handle, its tensor names)
        self._where: dict[str, tuple[str, str]] = {}  # canonical name -> (shard, HF name)
        self._infos: dict[str, TensorInfo] = {}
        for hf_name, shard in self._weight_map().items():
            self._add(hf_name, shard)
        self._tie_embeddings()
        self._check_shapes()

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX
        if index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise FileFormatError(f"{index}: no 'weight_map' of tensor name -> shard file")
        elif (self.path / SINGLE).exists():
            weight_map = dict.fromkeys(sorted(self._open(SINGLE)[1]), SINGLE)
        else:
            found = sorted(p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
            raise FileFormatError(f"{self.path}: no {SINGLE} or {INDEX}"
                                  + (f" (found {', '.join(found)}; only safetensors checkpoints are read)"
                                     if found else ""))
        for shard in sorted(set(weight_map.values())):
            if not (self.path / shard).is_file():
                example = next(k for k, v in weight_map.items() if v == shard)
                raise FileFormatError(f"{index}: missing shard {shard!r} (holds e.g. tensor {example!r})")
        return weight_map

    def _open(self, shard: str) -> tuple[Any, set[str]]:
        if shard not in self._files:
            handle = _safe_open(self.path / shard)
            self._files[shard] = handle, set(handle.keys())
        return self._files[shard]

    def _add(self, hf_name: str, shard: str) -> None:
        arch, where = self.config.arch, self.path / shard
        try:
            name = hf_names.canonical_name(arch, hf_name)
        except KeyError:
            raise FileFormatError(f"{where}: tensor {hf_name!r} is not part of a {arch} model "
                                  f"(known names: jaxquant.io.hf_names.TABLES[{arch!r}])") from None
        if name is None:
            return
        if name in self._where:
            raise FileFormatError(f"{where}: tensors {self._where[name][1]!r} and {hf_name!r} both map to {name!r}")
        handle, names = self._open(shard)
        if hf_name not in names:
            raise FileFormatError(f"{self.path / INDEX}: lists tensor {hf_name!r} in shard {shard!r}, "
                                  "which does not hold it")
        s = handle.get_slice(hf_name)
        shape, dtype = tuple(int(d) for d in s.get_shape()), s.get_dtype()
        if dtype not in DTYPES:
            raise FileFormatError(f"{where}: tensor {hf_name!r} has dtype {dtype}; supported: {', '.join(DTYPES)}")
        if hf_names.transform(arch, name) == "plus_one":
            dtype = "F32"
        self._where[name] = (shard, hf_name)
        self._infos[name] = TensorInfo(name, shape, dtype, int(np.prod(shape)) * np.dtype(DTYPES[dtype]).itemsize)

    def _tie_embeddings(self) -> None:
        if self.config.tie_embeddings:  # transformers ties lm_head to the embeddings whatever the file holds
            self._where.pop("output.weight", None)
            self._infos.pop("output.weight", None)
        elif "output.weight" not in self._infos:
            raise FileFormatError(f"{self.path}: config.json has tie_word_embeddings false but the checkpoint "
                                  "has no lm_head.weight")

    def _check_shapes(self) -> None:
        for name, info in self._infos.items():
            want = self.config.tensor_shape(name)
            if want is not None and want != info.shape:
                shard, hf_name = self._where[name]
                raise FileFormatError(f"{self.path / shard}: tensor {hf_name!r} has shape {info.shape}, "
                                      f"config.json implies {want}")

    @property
    def tensor_names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        if name not in self._infos:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        return self._infos[name]

    def load(self, name: str) -> jax.Array:
        """The tensor (bf16/f16/f32 as stored; Gemma norms f32) under its canonical name."""
        self.info(name)  # KeyError naming the source for an unknown name
        shard, hf_name = self._where[name]
        try:
            x = self._open(shard)[0].get_tensor(hf_name)
        except (SafetensorError, OSError) as e:
            raise FileFormatError(f"{self.path / shard}: cannot read tensor {hf_name!r}: {e}") from None
        kind = hf_names.transform(self.config.arch, name)
        if kind == "plus_one":
            x = x.astype(np.float32) + np.float32(1)
        elif kind is not None:
            x = _permute(x, self.config.n_heads if kind == "permute_q" else self.config.n_kv_heads)
        return jnp.asarray(x)

    @functools.cached_property
    def tokenizer(self):
        from jaxquant.io import tokenizer

        return tokenizer.from_hf(self.path)

    def __repr__(self) -> str:
        return f"HFSource({str(self.path)!r}, {len(self._infos)} tensors)"


def _permute(w: np.ndarray, n_head: int, inverse: bool = False) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: within each head, rows (i, i + d/2) become adjacent
    (``inverse``: back to HF's order)."""
    half = w.shape[0] // n_head // 2
    heads = (n_head, half, 2) if inverse else (n_head, 2, half)
    return w.reshape(*heads, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
