"""Orbax checkpoints of quantized models: every tensor (QTensors field by field, plain arrays as
they are) plus what it takes to use them again (tensor specs, the model's GGUF metadata or HF
config and tokenizer files), restored bit for bit without requantizing.

A checkpoint directory holds numbered steps written by orbax's CheckpointManager: each save
goes to a temporary directory renamed into place once complete, and the previous step is
deleted only after that, so an interrupted save leaves the earlier checkpoint loadable, and the
next save to the same path (after a kill during the first one, too) goes through.
"""

from __future__ import annotations

import base64
import functools
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxquant.errors import FileFormatError
from jaxquant.io.output import check_output_path
from jaxquant.io.source import Tensor, TensorInfo
from jaxquant.qtensor import QTensor

KIND, VERSION = "jaxquant-checkpoint", 1
ORBAX_TMP = ".orbax-checkpoint-tmp"  # in the name of a step directory being written
HF_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "chat_template.jinja", "generation_config.json")


def _manager(path: Path, read_only: bool = False):
    import orbax.checkpoint as ocp

    if read_only:
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    else:  # one step kept: the previous one is deleted once the new one is complete
        options = ocp.CheckpointManagerOptions(max_to_keep=1, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(path.absolute(), options=options)


def _spec(name: str, x: Tensor) -> dict[str, Any]:
    if isinstance(x, QTensor):
        return {"name": name, "fmt": x.fmt, "shape": list(x.shape), "dtype": x.dtype,
                "fields": {k: [list(a.shape), np.dtype(a.dtype).name] for k, a in x.arrays.items()}}
    return {"name": name, "shape": list(x.shape), "dtype": np.dtype(x.dtype).name,
            "numpy": isinstance(x, np.ndarray)}


def _to_json(value: Any) -> Any:
    """GGUF metadata values as JSON: bytes (non-UTF-8 strings) tagged, floats exact (repr)."""
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"$bytes"}:
        return base64.b64decode(value["$bytes"])
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def model_record(source) -> dict[str, Any]:
    """What a checkpoint keeps of the model besides its tensors: a GGUF source's metadata and
    value types, or a HF source's config and tokenizer files."""
    base = getattr(source, "source", source)  # the file a QuantizedSource reads
    if hasattr(base, "value_types"):
        return {"kind": "gguf", "metadata": {k: _to_json(v) for k, v in source.metadata.items()},
                "value_types": {k: [int(t) for t in v] for k, v in source.value_types.items()}}
    root = Path(base.path)
    files = {f: (root / f).read_text(encoding="utf-8") for f in HF_FILES if (root / f).is_file()}
    return {"kind": "hf", "files": files}


def save_checkpoint(path: str | os.PathLike, tensors: Mapping[str, Tensor], model: Mapping[str, Any] | None = None,
                    extra: Mapping[str, Any] | None = None) -> int:
    """Save ``tensors`` (name -> QTensor or array) as a new step of the checkpoint at ``path``;
    ``model``: ``model_record(source)``; ``extra``: JSON-able notes (e.g. the policy). Returns the
    step. The previous step stays until this one is complete."""
    import orbax.checkpoint as ocp

    path = check_output_path(path, directory=True)
    # A save killed before its first step was complete leaves only orbax's temporary directory,
    # which the manager removes (cleanup_tmp_directories): the path is then as good as new.
    if path.exists() and not is_checkpoint(path) and any(ORBAX_TMP not in p.name for p in path.iterdir()):
        raise FileFormatError(f"{path}: exists and is not a jaxquant checkpoint directory; choose a new path")
    names = list(tensors)
    tree = [dict(x.arrays) if isinstance(x, QTensor) else x for x in tensors.values()]
    meta = {"kind": KIND, "version": VERSION, "tensors": [_spec(n, tensors[n]) for n in names],
            "model": dict(model or {}), "extra": dict(extra or {})}
    mngr = _manager(path)
    try:
        latest = mngr.latest_step()
        step = 0 if latest is None else latest + 1
        mngr.save(step, args=ocp.args.Composite(tensors=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))
        mngr.wait_until_finished()
    finally:
        mngr.close()
    return step


def is_checkpoint(path: Path) -> bool:
    """A directory holding at least one complete jaxquant checkpoint step."""
    return path.is_dir() and any(p.is_dir() and p.name.isdigit() and (p / "meta").is_dir() for p in path.iterdir())


def restore_checkpoint(path: str | os.PathLike, step: int | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors (name -> QTensor or array, on the default device; numpy ones stay numpy) and the
    metadata of the latest complete step (or ``step``)."""
    import orbax.checkpoint as ocp

    path = Path(path)
    if not path.is_dir() or not is_checkpoint(path):
        raise FileFormatError(f"{path}: not a jaxquant checkpoint (no complete step directory)")
    mngr = _manager(path, read_only=True)
    try:
        step = mngr.latest_step() if step is None else step
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if meta.get("kind") != KIND or meta.get("version") != VERSION:
            raise FileFormatError(f"{path}: step {step} is not a version-{VERSION} jaxquant checkpoint")
        abstract = [{k: jax.ShapeDtypeStruct(tuple(s), np.dtype(d)) for k, (s, d) in spec["fields"].items()}
                    if "fmt" in spec else (np.empty(spec["shape"], spec["dtype"]) if spec["numpy"]
                                           else jax.ShapeDtypeStruct(tuple(spec["shape"]), np.dtype(spec["dtype"])))
                    for spec in meta["tensors"]]
        tree = mngr.restore(step, args=ocp.args.Composite(tensors=ocp.args.StandardRestore(abstract)))["tensors"]
    finally:
        mngr.close()
    tensors = {}
    for spec, x in zip(meta["tensors"], tree):
        tensors[spec["name"]] = QTensor(dict(x), spec["fmt"], tuple(spec["shape"]), spec["dtype"]) if "fmt" in spec else x
    return tensors, meta


class CheckpointSource:
    """A checkpoint as a model source (``open_model``): its tensors, and the config and tokenizer
    of the model they came from."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._tensors, self._meta = restore_checkpoint(self.path)
        model = self._meta.get("model", {})
        self._kind = model.get("kind")
        self.metadata: dict[str, Any] = {k: _from_json(v) for k, v in model.get("metadata", {}).items()}
        if self._kind == "gguf":  # what GGUF writers look for: only a GGUF model's checkpoint has it
            from gguf import GGUFValueType

            self.value_types = {k: tuple(GGUFValueType(t) for t in v) for k, v in model["value_types"].items()}
        elif self._kind == "hf":
            import json

            self.metadata = json.loads(model["files"]["config.json"])

    @property
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        x = self._tensors[name]
        if isinstance(x, QTensor):
            return TensorInfo(name, x.shape, x.fmt, x.nbytes)
        from jaxquant.io.gguf import tensor_info

        return tensor_info(name, x)

    def load(self, name: str) -> Tensor:
        return self._tensors[name]

    @functools.cached_property
    def config(self):
        from jaxquant.config import ModelConfig

        if self._kind == "gguf":
            return ModelConfig.from_gguf(self.metadata, self.tensor_names)
        if self._kind == "hf":
            return ModelConfig.from_hf(self.metadata)
        raise FileFormatError(f"{self.path}: the checkpoint records no model config")

    @functools.cached_property
    def tokenizer(self):
        from jaxquant.io import tokenizer

        if self._kind == "gguf":
            return tokenizer.from_gguf(self.metadata)
        files = self._meta.get("model", {}).get("files", {})
        if "tokenizer.json" not in files:
            raise FileFormatError(f"{self.path}: the checkpoint holds no tokenizer")
        with tempfile.TemporaryDirectory(prefix="jaxquant-tokenizer-") as directory:  # read eagerly
            for name, text in files.items():
                (Path(directory) / name).write_text(text, encoding="utf-8")
            return tokenizer.from_hf(directory)

    def __repr__(self) -> str:
        return f"CheckpointSource({str(self.path)!r}, {len(self._tensors)} tensors)"

