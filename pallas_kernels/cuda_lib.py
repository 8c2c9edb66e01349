"""The CUDA kernels' shared library: ``gemv_cuda.cu``, ``batch_cuda.cu`` and ``attention_cuda.cu`` (with their common
header) compiled with the machine's ``nvcc`` at first use (15-20 s), cached under
``$JAXQUANT_CACHE/cuda`` by the sources' and the toolchain's hash; ``load()`` opens it once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import jax

from jaxquant.errors import JaxquantError

HERE = Path(__file__).parent
SOURCES = (HERE / "gemv_cuda.cu", HERE / "batch_cuda.cu", HERE / "attention_cuda.cu")
HEADERS = (HERE / "cuda_common.cuh",)


def nvcc() -> str | None:
    found = shutil.which("nvcc")
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return found or (str(Path(home) / "bin" / "nvcc") if (Path(home) / "bin" / "nvcc").exists() else None)


def compile_command(compiler: str, arch: str, out: Path, *extra: str) -> list[str]:
    return [compiler, "-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-shared",
            "-maxrregcount=128",  # else ptxas held Q6_K's 2-row kernel to 64 registers and spilled in its loop
            "-Xcompiler", "-fPIC,-Wno-return-type", "-diag-suppress", "940,2473",  # warnings in XLA's FFI headers
            "-I", jax.ffi.include_dir(), *extra, *map(str, SOURCES), "-o", str(out)]


def build(arch: str, cache: Path | None = None) -> Path:
    """The shared library for compute capability ``arch`` ("90"), compiled unless cached."""
    compiler = nvcc()
    if compiler is None:
        raise JaxquantError("cuda_lib: nvcc not found (PATH or $CUDA_HOME/bin)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    text = b"".join(p.read_bytes() for p in (*SOURCES, *HEADERS))
    key = hashlib.sha256(text + version.encode() + jax.ffi.include_dir().encode()).hexdigest()[:16]
    cache = cache or Path(os.environ.get("JAXQUANT_CACHE", Path.home() / ".cache" / "jaxquant")) / "cuda"
    lib = cache / f"jaxquant_cuda-sm{arch}-{key}.so"
    if not lib.exists():
        cache.mkdir(parents=True, exist_ok=True)
        print(f"jaxquant: compiling the CUDA kernels for sm_{arch} (once, ~20 s) into {lib}", file=sys.stderr,
              flush=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            part = Path(tmp) / lib.name
            done = subprocess.run(compile_command(compiler, arch, part), capture_output=True, text=True, check=False)
            if done.returncode:
                raise JaxquantError(f"cuda_lib: nvcc failed:\n{done.stderr[-4000:]}")
            part.replace(lib)  # atomic: concurrent builders leave one complete file
    return lib


@functools.cache
def load() -> ctypes.CDLL | None:
    """The library on a GPU (built at the first call), or None (with a warning where the build or
    load failed: the callers fall back to their Triton or XLA kernels)."""
    if jax.default_backend() != "gpu":
        return None
    try:
        return ctypes.CDLL(str(build(jax.devices()[0].compute_capability.replace(".", ""))))
    except (JaxquantError, OSError, AttributeError, subprocess.SubprocessError) as e:
        warnings.warn(f"jaxquant's CUDA kernels unavailable: {e}", RuntimeWarning, stacklevel=2)
        return None
