"""The CUDA gemv's build on a machine without a GPU: nvcc compiles it for Hopper with no spills, the
library exports XLA FFI handlers, and qdot keeps to Triton's kernels where it cannot run (the
kernels' numbers are checked on the GPU: tests/gpu/check_kernels.py)."""

from __future__ import annotations

import ctypes
import re
import subprocess

import jax
import pytest

import pallas_kernels
from pallas_kernels import gemv_cuda
from pallas_kernels.testing import random_qtensor


def test_builds_for_hopper_without_spills(tmp_path):
    assert gemv_cuda.nvcc() is not None, "nvcc is part of this machine's image (and of the GPU's)"
    lib = gemv_cuda.build("90", tmp_path)
    assert gemv_cuda.build("90", tmp_path) == lib  # cached
    handlers = ctypes.CDLL(str(lib))
    for name in gemv_cuda.FORMATS.values():
        assert getattr(handlers, name)
    report = subprocess.run(gemv_cuda.compile_command(gemv_cuda.nvcc(), "90", tmp_path / "v.so", "-Xptxas", "-v"),
                            capture_output=True, text=True, check=True).stderr
    kernels = re.findall(r"Compiling entry function '(\w+)'", report)
    assert len(kernels) == len(gemv_cuda.FORMATS) * len(gemv_cuda.TILINGS)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert len(spills) == len(kernels) and all(s == ("0", "0") for s in spills)
    registers = [int(r) for r in re.findall(r"Used (\d+) registers", report)]
    assert max(registers) <= 128  # 4 blocks of 128 threads an SM at least


@pytest.mark.parametrize("fmt", sorted(gemv_cuda.FORMATS))
def test_selected_only_where_it_runs(fmt):
    """The CUDA gemv is qdot's choice at M = 1 only where it is built (a GPU with nvcc), never
    under the Pallas interpreter."""
    w = random_qtensor(fmt, 64, 512, jax.random.key(0))
    assert pallas_kernels.lookup(fmt, "gemv", "cuda") is not None
    assert pallas_kernels.select(w, 1).backend == ("cuda" if gemv_cuda.available() else "triton")
    assert pallas_kernels.select(w, 1, interpret=True).backend == "triton"


def test_no_interpreter():
    w = random_qtensor("Q4_K", 64, 512, jax.random.key(0))
    with pytest.raises(Exception, match="no interpreter"):
        gemv_cuda.gemv(jax.numpy.zeros((1, 512)), w, interpret=True)
