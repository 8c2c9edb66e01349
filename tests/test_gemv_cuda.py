"""The CUDA gemv on a machine without a GPU: nvcc compiles it for Hopper with no spills, the library
exports its XLA FFI handlers, and its lanes' code, run one lane after another on the host
(``jq_gemv_host``), equals dequantize + dot, and so does its activations' preparation (RMS norm,
gated unit) with the residual added; qdot keeps to Triton's kernels where it cannot run.
(The kernels themselves run in tests/gpu/check_kernels.py on the GPU.)"""

from __future__ import annotations

import ctypes
import re
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from jaxquant.ops import Activation
from pallas_kernels import attention_cuda, batch_cuda, cuda_lib, gemv_cuda
from pallas_kernels.gemv import quantize_activations
from pallas_kernels.testing import random_qtensor


@pytest.fixture(scope="module")
def lib(cuda_library):
    handle = ctypes.CDLL(str(cuda_library))
    handle.jq_gemv_host.argtypes = [ctypes.c_char_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_void_p),
                                    *[ctypes.c_void_p] * 5, ctypes.c_int, ctypes.c_int]
    handle.jq_prepare_host.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float,
                                       ctypes.c_int, *[ctypes.c_void_p] * 4]
    return handle


def test_library_builds_for_hopper_without_spills(lib, tmp_path):
    for name in (*gemv_cuda.FORMATS.values(), *batch_cuda.FORMATS.values(), attention_cuda.NAME):
        assert getattr(lib, name)
    report = subprocess.run(cuda_lib.compile_command(cuda_lib.nvcc(), "90", tmp_path / "v.so", "-Xptxas", "-v"),
                            capture_output=True, text=True, check=True).stderr
    kernels = re.findall(r"Compiling entry function '(\w+)'", report)
    assert len(kernels) == (len(gemv_cuda.FORMATS) * len(gemv_cuda.TILINGS)
                            + len(batch_cuda.FORMATS) * len(batch_cuda.WARPS)
                            + 1 + 1 + 2 * 2  # its prepare_kernel: bf16 as is, the norm on f32, 2 gated units x 2 dtypes
                            + 3 * 3 + 1  # prepare_kernel: 3 dtypes x (as is, 2 gated units), and the norm on f32
                            + 2 * 2 * len(attention_cuda.DIMS))  # attend and combine: 2 cache dtypes x head dims
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert len(spills) == len(kernels) and all(s == ("0", "0") for s in spills)
    registers = [int(r) for r in re.findall(r"Used (\d+) registers", report)]
    assert max(registers) <= 128  # 4 blocks of 128 threads an SM at least


def host_gemv(lib, acts, w, tiling: tuple[int, int], residual: np.ndarray | None = None) -> np.ndarray:
    """The kernel's lanes run on the host, fed as the FFI call feeds the kernel: ``acts``, the
    activations quantized (words, scales, sums)."""
    acts = [np.ascontiguousarray(np.asarray(a)) for a in acts]
    arrays = [np.ascontiguousarray(np.asarray(w.arrays[k])) for k in sorted(w.arrays)]
    n, nb = w.shape[0], w.shape[1] // gemv_cuda.UNIT[w.fmt]
    out = np.full(n, np.nan, np.float32)
    rows, warps = tiling
    pointers = (ctypes.c_void_p * len(arrays))(*(a.ctypes.data for a in arrays))
    res = None if residual is None else np.ascontiguousarray(residual, np.float32)
    rc = lib.jq_gemv_host(w.fmt.encode(), 10 * rows + warps, pointers, *(a.ctypes.data for a in acts),
                          None if res is None else res.ctypes.data, out.ctypes.data, n, nb)
    assert rc == 0
    return out


def host_prepare(lib, kind: str | None, x: np.ndarray, weight: np.ndarray | None = None, eps: float = 0.0,
                 dtype=jnp.float32) -> tuple[np.ndarray, list[np.ndarray]]:
    """The call's first kernel on the host: x (float32 [K], gated [2K]) -> (the product's inputs,
    those quantized: words, scales, sums)."""
    blocks = (x.size // 2 if kind in ("silu", "gelu_tanh") else x.size) // 32
    x = np.ascontiguousarray(x, np.float32)
    weight = None if weight is None else np.ascontiguousarray(weight, np.float32)
    values = np.full(32 * blocks, np.nan, np.float32)
    acts = [np.zeros((blocks, c), t) for c, t in ((16, np.uint32), (1, np.float32), (4, np.int32))]
    rc = lib.jq_prepare_host(gemv_cuda.PROLOGUES[kind], gemv_cuda.ROUNDING[jnp.dtype(dtype)], x.ctypes.data,
                             None if weight is None else weight.ctypes.data, eps, blocks, values.ctypes.data,
                             *(a.ctypes.data for a in acts))
    assert rc == 0
    return values, acts


def test_quantize_x_equals_quantize_activations(lib):
    """The CUDA activation quantizer's code, run on the host, gives the Pallas quantizer's words,
    scales and sums bit for bit: blocks of magnitudes 1e-30 to 1e30, a zero block, rounding ties."""
    k = 64 * 32
    x = np.array(jax.random.normal(jax.random.key(3), (k // 32, 32), jnp.float32))
    x *= np.logspace(-30, 30, k // 32, dtype=np.float32)[:, None]
    x[5] = 0.0
    x[6] = np.arange(32) - 15.5  # dx = 16.5 / 32767: ties of x / dx + 1/2 where it is exact
    x[7, 0] = -np.abs(x[7]).max() * 1.5  # the largest magnitude, negative: -32767
    x = np.ascontiguousarray(x.reshape(-1))
    values, acts = host_prepare(lib, None, x)
    np.testing.assert_array_equal(values, x)
    want = [np.asarray(a) for a in quantize_activations(jnp.asarray(x), interpret=True)]
    for got, ref in zip(acts, want):
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize(("kind", "dtype"), [("rms_norm", jnp.bfloat16), ("rms_norm", jnp.float32),
                                             ("rms_norm", jnp.float16), ("silu", jnp.float32),
                                             ("gelu_tanh", jnp.float32)])
def test_prepared_activations_equal_activation_value(lib, kind, dtype):
    """The call's first kernel computes what ``ops.Activation.value()`` does in XLA (the model's
    norm, cast to the compute dtype; the gated unit), up to float32 rounding (the norm's sum, exp and
    tanh in another order or implementation: 16 ulps, or 2^-20 of the block's largest value where
    gelu's 1 + tanh cancels, 1/32 of the int16 quantization's step) and one step of the compute dtype
    (a cast's tie falling the other way); it quantizes them as quantize_activations does."""
    k = 2560
    key = jax.random.key(len(kind) + jnp.dtype(dtype).itemsize)
    x = jax.random.normal(key, (2 * k if kind != "rms_norm" else k,), jnp.float32) * 3
    weight = jax.random.uniform(jax.random.fold_in(key, 1), (k,), jnp.float32, 0.5, 2) if kind == "rms_norm" else None
    act = Activation(x, kind, weight, 1e-6, jnp.dtype(dtype)) if kind == "rms_norm" else Activation(x, kind)
    want = np.asarray(act.value().astype(jnp.float32))
    values, acts = host_prepare(lib, kind, np.asarray(x), None if weight is None else np.asarray(weight), 1e-6, dtype)
    block_max = np.repeat(np.abs(want).reshape(-1, 32).max(1), 32)
    tol = np.maximum.reduce([np.abs(want) * 2.0 ** -jnp.finfo(dtype).nmant, 16 * np.spacing(np.abs(want)),
                             block_max * 2.0 ** -20])
    assert (np.abs(values - want) <= tol).all()
    assert (values == want).mean() > (0.99 if dtype != jnp.float32 else 0.1)  # mostly the same float
    for got, ref in zip(acts, quantize_activations(jnp.asarray(values), interpret=True)):
        np.testing.assert_array_equal(got, np.asarray(ref))


@pytest.mark.parametrize("kind", ["rms_norm", "silu"])
def test_fused_call_equals_dequantize_dot(lib, kind):
    """The whole FFI call on the host: prepared activations, the product, the residual added,
    against XLA's dequantize + dot of ``Activation.value()`` plus the residual."""
    n, k = 64, 4096
    key = jax.random.key(7 + len(kind))
    w = random_qtensor("Q4_K", n, k, key)
    x = jax.random.normal(jax.random.fold_in(key, 1), (2 * k if kind == "silu" else k,), jnp.float32)
    weight = jax.random.uniform(jax.random.fold_in(key, 2), (k,), jnp.float32, 0.5, 2)
    act = Activation(x, kind, weight, 1e-5, jnp.dtype(jnp.bfloat16)) if kind == "rms_norm" else Activation(x, kind)
    residual = np.asarray(jax.random.normal(jax.random.fold_in(key, 3), (n,), jnp.float32)) * 10
    ref = np.asarray(jnp.dot(act.value().astype(jnp.float32), w.dequantize(jnp.float32).T,
                             precision=jax.lax.Precision.HIGHEST))
    _, acts = host_prepare(lib, kind, np.asarray(x), np.asarray(weight) if kind == "rms_norm" else None, 1e-5,
                           jnp.bfloat16 if kind == "rms_norm" else jnp.float32)
    y = host_gemv(lib, acts, w, gemv_cuda.default_tiling(n), residual)
    assert np.linalg.norm(y - residual - ref) / np.linalg.norm(ref) < 2e-3
    np.testing.assert_allclose(y, host_gemv(lib, acts, w, gemv_cuda.default_tiling(n)) + residual, rtol=0, atol=0)


@pytest.mark.parametrize("tiling", gemv_cuda.TILINGS)
@pytest.mark.parametrize("fmt", sorted(gemv_cuda.FORMATS))
def test_lanes_equal_dequantize_dot(lib, fmt, tiling):
    """37 super-blocks a row (74 units of Q8_0): every warp of a row takes 2 or more steps, the last
    stopping part-way (4, 8 or 16 units a step)."""
    n, k = 48, 37 * 256
    key = jax.random.key(len(fmt) + tiling[0] + 10 * tiling[1])
    w = random_qtensor(fmt, n, k, key)
    x = jax.random.normal(jax.random.fold_in(key, 1), (1, k), jnp.float32)
    ref = np.asarray(jnp.dot(x, w.dequantize(jnp.float32).T, precision=jax.lax.Precision.HIGHEST))[0]
    y = host_gemv(lib, quantize_activations(x[0], interpret=True), w, tiling)
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 2e-3


def test_host_entry_rejects_unknown_format_and_tiling(lib):
    null = (ctypes.c_void_p * 4)()
    assert lib.jq_gemv_host(b"Q2_K", 41, null, None, None, None, None, None, 0, 0) == 1
    assert lib.jq_gemv_host(b"Q4_K", 44, null, None, None, None, None, None, 0, 0) == 2
    assert lib.jq_prepare_host(4, 0, None, None, 0.0, 0, None, None, None, None) == 1


@pytest.mark.parametrize("fmt", sorted(gemv_cuda.FORMATS))
def test_selected_only_where_it_runs(fmt):
    """The CUDA gemv (timed faster than the Triton one for every format it has) is qdot's choice at
    M = 1 where it is built (a GPU with nvcc), never under the Pallas interpreter."""
    w = random_qtensor(fmt, 64, 512, jax.random.key(0))
    assert pallas_kernels.lookup(fmt, "gemv", "cuda") is not None
    cuda = gemv_cuda.available()
    assert pallas_kernels.select(w, 1).backend == ("cuda" if cuda else "triton")
    assert pallas_kernels.select(w, 1, interpret=True).backend == "triton"


def test_no_interpreter():
    w = random_qtensor("Q4_K", 64, 512, jax.random.key(0))
    with pytest.raises(Exception, match="no interpreter"):
        gemv_cuda.gemv(jax.numpy.zeros((1, 512)), w, interpret=True)
