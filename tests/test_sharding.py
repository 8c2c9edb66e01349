"""Tensor-parallel inference on simulated devices: tests/sharded_cases.py in a subprocess whose
JAX starts with 8 CPU devices (``--xla_force_host_platform_device_count`` is read once, at start).
The fast suite runs every family on meshes of 1, 2, 4 and 8 devices (logits), generation on three
of them, perplexity, the per-shard kernels and the communication of a decode step; the slow suite
adds generation on every family and mesh."""

import os
import subprocess
import sys

import pytest

CASES = os.path.join(os.path.dirname(__file__), "sharded_cases.py")
# Unoptimized LLVM code generation: the cases compile ~40 programs and run each once.
FLAGS = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 " \
        "--xla_llvm_disable_expensive_passes=true"


def _run(marker: str, tmp_path) -> None:
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {FLAGS}".strip(), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker,
                           f"--basetemp={tmp_path}", CASES], check=False, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


def test_sharded_cases(tmp_path):
    _run("not slow", tmp_path)


@pytest.mark.slow
def test_sharded_cases_slow(tmp_path):
    _run("slow", tmp_path)
