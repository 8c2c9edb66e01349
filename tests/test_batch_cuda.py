"""The CUDA batch kernels (``pallas_kernels/batch_cuda.cu``) on a machine without a GPU: their
prepare kernel's arithmetic and their lanes' code, run one lane after another on the host with an
emulated MMA (``jq_batch_host``, the PTX fragment layout), equal dequantize + dot; qdot takes them
only where they were timed. (The kernels themselves run in tests/gpu/check_kernels.py.)"""

from __future__ import annotations

import ctypes
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from jaxquant import ops
from jaxquant.ops import Activation
from pallas_kernels import batch_cuda, gemv_cuda
from pallas_kernels.testing import random_qtensor


@pytest.fixture(scope="module")
def lib(cuda_library):
    handle = ctypes.CDLL(str(cuda_library))
    handle.jq_batch_host.argtypes = [ctypes.c_char_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_void_p),
                                     ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float,
                                     ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return handle


def host_batch(lib, fmt: str, warps: int, w, x: np.ndarray, prologue: int = 0,
               weight: np.ndarray | None = None, eps: float = 0.0,
               residual: np.ndarray | None = None) -> tuple[int, np.ndarray]:
    """The call's kernels on the host: x as the FFI call takes it (float32 here), the Activation
    ``prologue`` (gemv_cuda.PROLOGUES, rounded to bf16) and a residual as batch_cuda.batch passes them."""
    arrays = [np.ascontiguousarray(np.asarray(w.arrays[name])) for name in sorted(w.arrays)]
    x = np.ascontiguousarray(x, np.float32)
    m, n = x.shape[0], w.shape[0]
    out = np.full((m, n), np.nan, np.float32)
    keep = [None if a is None else np.ascontiguousarray(a, np.float32) for a in (weight, residual)]
    rc = lib.jq_batch_host(fmt.encode(), warps, (ctypes.c_void_p * len(arrays))(*(a.ctypes.data for a in arrays)),
                           prologue, gemv_cuda.ROUNDING[jnp.dtype(jnp.bfloat16)], x.ctypes.data,
                           *(None if a is None else a.ctypes.data for a in keep[:1]), eps,
                           *(None if a is None else a.ctypes.data for a in keep[1:]), out.ctypes.data, n,
                           w.shape[1] // 256, m)
    return rc, out


@pytest.mark.parametrize("warps", batch_cuda.WARPS)
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("fmt", sorted(batch_cuda.FORMATS))
def test_lanes_equal_dequantize_dot(lib, fmt, m, warps):
    """2 row groups, 11 super-blocks (every warp's last step stops part-way, odd step counts end on
    the first of the two weight sets), M bf16 activation rows of mixed magnitude: float32 sums of
    exact products, so within 1e-5 of the float32 dot of the same bf16 values."""
    n, k = 32, 11 * 256
    key = jax.random.key(m + 10 * warps + len(fmt))
    w = random_qtensor(fmt, n, k, key)
    x = (jax.random.normal(jax.random.fold_in(key, 1), (m, k), jnp.float32) * jnp.logspace(-2, 3, m)[:, None])
    x = np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32))
    ref = np.asarray(jnp.dot(x, w.dequantize(jnp.float32).T, precision=jax.lax.Precision.HIGHEST))
    rc, out = host_batch(lib, fmt, warps, w, x)
    assert rc == 0
    for row, want in zip(out, ref):
        assert np.linalg.norm(row - want) / np.linalg.norm(want) < 1e-5


@pytest.mark.parametrize("kind", ["rms_norm", "silu", "gelu_tanh"])
@pytest.mark.parametrize("fmt", sorted(batch_cuda.FORMATS))
def test_fused_input_and_residual_equal_activation_value_dot(lib, fmt, kind):
    """The call computes an Activation input (the model's norm or gated unit, in bf16) in its prepare
    kernel and adds a float32 residual as it writes: equal to the product of ``value()`` plus the
    residual, up to a bf16 rounding that falls the other way where the norm's sum or exp differ in
    their last bits (rare: within 1e-4)."""
    n, k, m = 32, 5 * 256, 5
    key = jax.random.key(len(kind) + len(fmt))
    w = random_qtensor(fmt, n, k, key)
    width = k if kind == "rms_norm" else 2 * k
    x = jax.random.normal(jax.random.fold_in(key, 1), (m, width), jnp.float32) * 3
    weight = jax.random.uniform(jax.random.fold_in(key, 2), (k,), jnp.float32, 0.5, 2) if kind == "rms_norm" else None
    act = Activation(x, kind, weight, 1e-6, jnp.dtype(jnp.bfloat16))
    residual = np.asarray(jax.random.normal(jax.random.fold_in(key, 3), (m, n), jnp.float32)) * 30
    ref = np.asarray(jnp.dot(act.value().astype(jnp.float32), w.dequantize(jnp.float32).T,
                             precision=jax.lax.Precision.HIGHEST)) + residual
    rc, out = host_batch(lib, fmt, 2, w, np.asarray(x), gemv_cuda.PROLOGUES[kind], None if weight is None else np.asarray(weight), 1e-6,
                         residual)
    assert rc == 0
    for row, want, res in zip(out, ref, residual):
        assert np.linalg.norm(row - want) / np.linalg.norm(want - res) < 1e-4


def test_host_entry_rejects_unknown_format_warps_rows_and_prologue(lib):
    w = random_qtensor("Q4_K", 16, 256, jax.random.key(0))
    x = np.ones((2, 256), np.float32)
    assert host_batch(lib, "Q8_0", 1, w, x)[0] == 1
    assert host_batch(lib, "Q4_K", 3, w, x)[0] == 2
    assert host_batch(lib, "Q4_K", 1, w, np.ones((9, 256), np.float32))[0] == 2
    assert host_batch(lib, "Q4_K", 1, w, x, max(gemv_cuda.PROLOGUES.values()) + 1)[0] == 3


def test_selected_where_timed(monkeypatch):
    """qdot takes them (where built) for an 8B model's FFN and q/k, o matrices at M = 2..8: they
    tied or beat qmm there on the H200, and lost at 4096x1024 (RESULTS.md, sessions 11 and 12);
    the warps splitting K as timed best there."""
    monkeypatch.setattr(batch_cuda, "available", lambda: True)
    for fmt in ("Q4_K", "Q6_K"):
        for n, k in ((14336, 4096), (4096, 14336), (28672, 4096), (4096, 4096), (5120, 4096)):
            assert batch_cuda.supports(fmt, 8, n, k) and batch_cuda.supports(fmt, 2, n, k)
            assert not batch_cuda.supports(fmt, 9, n, k) and not batch_cuda.supports(fmt, 1, n, k)
        assert not batch_cuda.supports(fmt, 8, 1024, 4096)
    assert not batch_cuda.supports("Q8_0", 8, 14336, 4096)
    w = random_qtensor("Q4_K", 14336, 4096, jax.random.key(0))
    assert pallas_kernels.select(w, 8).backend == "cuda" and pallas_kernels.select(w, 9).op == "qmm"
    assert [batch_cuda.default_warps(n, k) for n, k in ((5120, 4096), (4096, 4096), (14336, 4096), (4096, 14336),
                                                        (128256, 4096), (4096, 3072), (512, 256))] == [4, 4, 4, 8, 1, 2, 1]


@pytest.mark.parametrize(("kind", "fmt", "n", "k"), [("rms_norm", "Q4_K", 14336, 4096), ("silu", "Q6_K", 4096, 14336)])
def test_qdot_hands_activation_and_residual_to_the_call(monkeypatch, kind, fmt, n, k):
    """At M = 2..8 on a GPU, qdot gives the batch kernel the model's norm or gated unit (bf16) and
    the residual: one FFI call and no XLA norm, SiLU or sum around it (lowered for CUDA: no GPU
    needed)."""
    monkeypatch.setattr(batch_cuda, "available", lambda: True)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    w = random_qtensor(fmt, n, k, jax.random.key(0))
    width = k if kind == "rms_norm" else 2 * k
    weight = jnp.ones((k,), jnp.float32) if kind == "rms_norm" else None

    def step(x, w, residual):
        return ops.qdot(Activation(x, kind, weight, 1e-6, jnp.dtype(jnp.bfloat16)), w, residual=residual)

    text = jax.jit(step).trace(jnp.zeros((8, width), jnp.float32), w, jnp.zeros((8, n), jnp.float32)).lower(
        lowering_platforms=("cuda",)).as_text()
    calls = [line for line in text.splitlines() if "stablehlo.custom_call" in line]
    assert len(calls) == 1 and f"@jq_batch_{fmt.lower()}(" in calls[0]
    assert f"prologue = {gemv_cuda.PROLOGUES[kind]} : i64" in calls[0]
    assert len(re.search(r": \((.*)\) ->", calls[0]).group(1).split(", ")) == len(w.arrays) + 2 + (kind == "rms_norm")
    assert not any(op in text for op in ("rsqrt", "logistic", "exponential", "stablehlo.add"))


def test_no_interpreter():
    w = random_qtensor("Q4_K", 64, 512, jax.random.key(0))
    with pytest.raises(Exception, match="no interpreter"):
        batch_cuda.batch(jnp.ones((2, 512), jnp.bfloat16), w, interpret=True)


def test_split_bf16_keeps_float32_bits_under_jit():
    """hi + lo holds float32 x to 2^-16 relative, compiled as the FFI caller compiles it (a round
    trip through bf16 there would let XLA's excess precision make lo 0: the GPU's f32 case did)."""
    x = np.asarray(jax.random.normal(jax.random.key(1), (8, 4096), jnp.float32)) * np.float32(1 + 2.0 ** -12)
    hi, lo = jax.jit(batch_cuda.split_bf16)(jnp.asarray(x))
    assert hi.dtype == lo.dtype == jnp.bfloat16
    total = np.asarray(hi, np.float64) + np.asarray(lo, np.float64)
    assert np.all(np.abs(total - x) <= 2.0 ** -16 * np.abs(x))
    assert np.abs(np.asarray(lo, np.float32)).max() > 2.0 ** -14  # the rest is carried, not dropped
