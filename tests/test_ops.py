"""qdot's XLA path (the CPU path, and the GPU fallback) against float64 numpy, every format.

Weights are random packed bytes, so every bit pattern a block can hold is exercised; the
reference is ``dequantize`` (checked bit-exact against gguf-py in tests/formats) then a float64
dot. The Pallas kernels also run in the Pallas interpreter to check their decoders on the CPU (the
GPU runs them compiled: tests/gpu/check_kernels.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
import pallas_kernels
from jaxquant import ops
from jaxquant.errors import JaxquantError
from jaxquant.formats import Format, get_format
from pallas_kernels.testing import random_qtensor

BLOCKED = [f for f in jq.list_formats() if isinstance(get_format(f), Format) and get_format(f).gguf]


def _ref(x, w) -> np.ndarray:
    wf = np.asarray(w.dequantize(jnp.float32), np.float64) if isinstance(w, jq.QTensor) else np.asarray(w, np.float64)
    return np.asarray(x, np.float64) @ wf.T


def _rel(y, ref) -> float:
    return float(np.linalg.norm(np.asarray(y, np.float64) - ref) / np.linalg.norm(ref))


def _finite_rows(w: jq.QTensor) -> jq.QTensor:
    """The rows of ``w`` whose random bytes decode to weights a float32 dot can sum (IQ1_M
    spreads an f16 scale over integer fields, MXFP4 has power-of-two scales up to 2**127)."""
    keep = np.flatnonzero((np.abs(np.asarray(w.dequantize())) < 1e30).all(1))
    assert keep.size >= 4
    return jq.QTensor({k: v[keep] for k, v in w.arrays.items()}, w.fmt, (int(keep.size), w.shape[1]), w.dtype)


@pytest.mark.parametrize("fmt", BLOCKED)
def test_xla_qdot_matches_float64(fmt):
    bs = get_format(fmt).block_size
    k = 2 * max(bs, 256)
    w = _finite_rows(random_qtensor(fmt, 64, k, jax.random.key(len(fmt) * 7919 + bs)))
    n = w.shape[0]
    x = jax.random.normal(jax.random.key(3), (2, 3, k), jnp.float32)
    y = ops.qdot(x, w, backend="xla")
    assert y.shape == (2, 3, n) and y.dtype == jnp.float32
    assert _rel(y, _ref(x.reshape(-1, k), w).reshape(2, 3, n)) < 1e-6


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_xla_qdot_low_precision_activations(dtype):
    w = random_qtensor("Q8_0", 16, 512, jax.random.key(0), dtype="bfloat16")
    x = jax.random.normal(jax.random.key(1), (5, 512), jnp.float32).astype(dtype)
    y = ops.qdot(x, w, backend="xla")
    assert y.dtype == jnp.result_type(dtype, jnp.bfloat16)
    assert _rel(y.astype(jnp.float32), _ref(x.astype(jnp.float32), w)) < 1e-2  # only the output rounding


def test_plain_weight():
    w = jax.random.normal(jax.random.key(4), (7, 40), jnp.float32)
    x = jax.random.normal(jax.random.key(5), (3, 40), jnp.float32)
    assert _rel(ops.qdot(x, w), _ref(x, w)) < 1e-6


def test_backend_switch(monkeypatch):
    assert ops.resolve_backend() == ("gpu" if jax.default_backend() == "gpu" else "xla")
    with ops.use_backend("interpret"):
        assert ops.resolve_backend() == "interpret"
        assert ops.resolve_backend("xla") == "xla"  # the argument wins over the block
    monkeypatch.setenv("JAXQUANT_QDOT_BACKEND", "xla")
    assert ops.resolve_backend() == "xla"
    with pytest.raises(JaxquantError, match="unknown qdot backend"):
        ops.resolve_backend("cuda")


def test_shape_errors():
    w = random_qtensor("Q8_0", 8, 64, jax.random.key(0))
    with pytest.raises(JaxquantError, match="cannot multiply"):
        ops.qdot(jnp.ones((2, 32)), w)


def test_pallas_forced_without_kernel():
    fmt = next(f for f in BLOCKED if pallas_kernels.lookup(f, "qmm") is None)
    w = random_qtensor(fmt, 8, 256, jax.random.key(0))
    with pytest.raises(JaxquantError, match="no Pallas kernel"):
        ops.qdot(jnp.ones((1, 256)), w, backend="pallas")


KERNEL_CASES = [(fmt, 1) for fmt in sorted(pallas_kernels.DECODERS)] + [("Q4_0", 16), ("Q6_K", 3), ("Q4_K", 300),
                                                                           ("AFQ8_G32", 3), ("AFQ4_G64", 300), ("GPTQ4_G128", 16),
                                                                           ("HQQ8_G64", 300), ("FP8_E4M3_CH", 300),
                                                                           ("NVFP4", 16), ("NF4", 300),
                                                                           ("FP8_E5M2_B128", 300), ("FP8_E4M3_B128", 16)]


@pytest.mark.parametrize("fmt,m", KERNEL_CASES)
def test_kernels_in_interpreter(fmt, m):
    """Every decoder and the tile/activation permutation of the Pallas kernels, run by the Pallas
    interpreter (the PTX lines have jnp twins): ``gemv`` for M = 1 where the format has one, ``qmm``
    for M <= 256, dequantize + dot above."""
    w = random_qtensor(fmt, 64, 512, jax.random.key(m))
    x = jax.random.normal(jax.random.key(9), (m, 512), jnp.float32).astype(jnp.bfloat16)
    gemv = m == 1 and pallas_kernels.lookup(fmt, "gemv") is not None
    assert pallas_kernels.select(w, m).op == ("gemv" if gemv else "qmm" if m <= pallas_kernels.QMM_MAX_M else "dequant")
    y = ops.qdot(x, w, backend="interpret")
    assert _rel(y.astype(jnp.float32), _ref(x.astype(jnp.float32), w)) < 2e-3


@pytest.mark.parametrize("fmt,runs", [("AFQ4_G64", True), ("IQ2_XS", False)])
def test_auto_backend_on_a_gpu_runs_a_kernel_where_one_exists(monkeypatch, fmt, runs):
    """"auto" on a GPU (resolved "gpu") runs the format's kernel, or XLA for a format without one;
    backend="pallas" refuses the latter."""
    calls = []
    real = pallas_kernels.select

    def select(w, m, interpret=False):
        kern = real(w, m, interpret)
        return kern and dataclasses.replace(
            kern, fn=lambda x, w, interpret: calls.append(w.fmt) or kern.fn(x, w, interpret=True))

    monkeypatch.setattr(pallas_kernels, "select", select)
    w = random_qtensor(fmt, 64, 256, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (1, 256), jnp.float32)
    assert _rel(ops._product(x, w, "gpu"), _ref(x, w)) < 2e-3
    assert calls == ([fmt] if runs else [])
    if not runs:
        with pytest.raises(JaxquantError, match="no Pallas kernel"):
            ops._product(x, w, "pallas")


@pytest.mark.parametrize("kind", ["rms_norm", "silu", "gelu_tanh"])
def test_activation_input_and_residual(kind):
    """An ``Activation`` input is multiplied as its ``value()`` (the model's norm or gated unit, bit
    for bit) and a residual is added to the product after its cast, as the model added it before."""
    w = random_qtensor("Q4_K", 48, 512, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, 3, 512 if kind == "rms_norm" else 1024), jnp.float32)
    act = ops.Activation(x, kind, jnp.linspace(0.5, 2, 512), 1e-6, jnp.dtype(jnp.bfloat16)) if kind == "rms_norm" \
        else ops.Activation(x, kind)
    r = jax.random.normal(jax.random.key(2), (2, 3, 48), jnp.float32)
    plain = ops.qdot(act.value(), w)
    np.testing.assert_array_equal(ops.qdot(act, w), plain)
    np.testing.assert_array_equal(ops.qdot(act, w, residual=r), plain + r)
    w2 = random_qtensor("Q6_K", 32, 512, jax.random.key(3))
    for got, want in zip(ops.qdots(act, [w, w2]), [plain, ops.qdot(act.value(), w2)]):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(JaxquantError, match="residual of shape"):
        ops.qdot(act, w, residual=r[..., :47])
    with pytest.raises(JaxquantError, match="unknown kind"):
        ops.Activation(x, "relu")


def test_fusing_kernel_gets_the_activation_and_residual(monkeypatch):
    """On a GPU, a kernel that ``fuses`` receives the ``Activation`` itself (rows flattened) and a
    float32 residual [M, N]; a residual it could not add as the unfused sum does (bfloat16) is added
    by XLA, and the kernel gets the computed input. ``qdots`` hands it all its weights at once."""
    calls = []

    def fn(x, w, residual=None, interpret=False):
        calls.append((type(x).__name__, x.x.shape if isinstance(x, ops.Activation) else x.shape,
                      None if residual is None else residual.shape, len(w) if isinstance(w, tuple) else 1))
        xin = x.value() if isinstance(x, ops.Activation) else x
        if isinstance(w, tuple):
            return tuple(ops._xla_dot(xin, v) for v in w)
        y = ops._xla_dot(xin, w)
        return y if residual is None else y + residual

    kern = pallas_kernels.Kernel("Q4_K", "gemv", "cuda", fn, lambda m, n, k: True, fuses=True)
    monkeypatch.setattr(pallas_kernels, "select", lambda w, m, interpret=False: kern)
    monkeypatch.setattr(ops, "resolve_backend", lambda backend=None: "gpu")
    w = random_qtensor("Q4_K", 48, 512, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (1, 1, 512), jnp.float32)
    act = ops.Activation(x, "rms_norm", jnp.linspace(0.5, 2, 512), 1e-6, jnp.dtype(jnp.float32))
    r = jax.random.normal(jax.random.key(2), (1, 1, 48), jnp.float32)
    want = ops._xla_dot(act.value()[0], w)[None] + r
    np.testing.assert_array_equal(ops.qdot(act, w, residual=r), want)
    np.testing.assert_array_equal(ops.qdot(act, w, residual=r.astype(jnp.bfloat16)),
                                  ops._xla_dot(act.value()[0], w)[None] + r.astype(jnp.bfloat16))
    w2 = random_qtensor("Q6_K", 32, 512, jax.random.key(3))
    for got, v in zip(ops.qdots(act, [w, w2]), [w, w2]):
        np.testing.assert_array_equal(got, ops._xla_dot(act.value()[0], v)[None])
    assert calls == [("Activation", (1, 512), (1, 48), 1), ("ArrayImpl", (1, 512), None, 1),
                     ("Activation", (1, 512), None, 2)]


def test_kernel_activations_beyond_float16_range():
    """Rows past float16's range are scaled by a power of two before the float16 MMA, not
    overflowed; NaN stays NaN."""
    w = random_qtensor("Q8_0", 64, 256, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (3, 256), jnp.float32) * jnp.array([[1e6], [1.0], [3e-3]])
    y = np.asarray(ops.qdot(x, w, backend="interpret"))
    assert np.isfinite(y).all() and _rel(y, _ref(x, w)) < 2e-3
    y = np.asarray(ops.qdot(x.at[1, 5].set(jnp.nan), w, backend="interpret"))
    assert np.isnan(y[1]).all() and np.isfinite(y[[0, 2]]).all()


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_K", "Q6_K"])
def test_gemv_activation_blocks_of_any_magnitude(fmt):
    """gemv's int16 activations take a scale per block of 32: blocks 1e6 and 1e-4 apart, and a
    zero block, keep the 2e-3 bound; NaN and inf give non-finite outputs, not numbers."""
    w = random_qtensor(fmt, 64, 512, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (1, 512), jnp.float32)
    x = x * jnp.repeat(jnp.array([1e4, 1e-2, 0.0, 1.0] * 4), 32)[None]
    assert pallas_kernels.select(w, 1).op == "gemv"
    y = np.asarray(ops.qdot(x, w, backend="interpret"))
    assert np.isfinite(y).all() and _rel(y, _ref(x, w)) < 2e-3
    for bad in (jnp.nan, jnp.inf):
        y = np.asarray(ops.qdot(x.at[0, 40].set(bad), w, backend="interpret"))
        assert not np.isfinite(y).any()


NON_GGUF = ["AFQ4_G64", "AFQ3_G32", "HQQ4_G64", "HQQ2_G32_AX0", "NF4", "FP4_DQ", "INT8", "FP8_E4M3", "FP8_E5M2_CH",
            "FP8_E4M3_B128", "NVFP4"]


@pytest.mark.parametrize("fmt", NON_GGUF)
def test_xla_qdot_non_gguf_formats(fmt):
    """Formats without a GGML type (quantized from real data: their scales need not be random
    bytes' values): qdot equals dequantize + a float64 dot."""
    w = jq.quantize(jax.random.normal(jax.random.key(2), (256, 512), jnp.float32), fmt)
    x = jax.random.normal(jax.random.key(3), (2, 3, 512), jnp.float32)
    y = ops.qdot(x, w, backend="xla")
    assert y.shape == (2, 3, 256) and y.dtype == jnp.float32
    assert _rel(y, _ref(x.reshape(-1, 512), w).reshape(2, 3, 256)) < 1e-6


def test_xla_qdot_gptq_act_order():
    """GPTQ act order (a per-tensor ``perm`` field): qdot multiplies x's permuted columns by the
    stored weight and equals dequantize (input order) + a float64 dot; take_rows keeps ``perm``."""
    rng = np.random.default_rng(0)
    n, k, group = 48, 256, 32
    w = jq.QTensor({"qs": jnp.asarray(rng.integers(0, 2**32, (n, k // group, group * 4 // 32), dtype=np.uint32)),
                    "scale": jnp.asarray(rng.uniform(1e-3, 1e-2, (n, k // group)).astype(np.float16)),
                    "zero": jnp.asarray(rng.integers(0, 16, (n, k // group), dtype=np.uint8)),
                    "perm": jnp.asarray(rng.permutation(k).astype(np.int32))}, f"GPTQ4_G{group}", (n, k))
    stored = np.asarray(jq.QTensor({a: v for a, v in w.arrays.items() if a != "perm"}, w.fmt, w.shape).dequantize())
    full = np.asarray(w.dequantize())
    assert np.array_equal(full[:, np.asarray(w.arrays["perm"])], stored)  # column perm[j] is stored column j
    x = jax.random.normal(jax.random.key(3), (2, 3, k), jnp.float32)
    y = ops.qdot(x, w, backend="xla")
    assert y.shape == (2, 3, n) and _rel(y, _ref(x.reshape(-1, k), w).reshape(2, 3, n)) < 1e-6
    rows = jq.qtensor.take_rows(w, jnp.array([5, 0, 47]))
    assert np.array_equal(rows.arrays["perm"], w.arrays["perm"])
    assert np.array_equal(np.asarray(rows.dequantize()), full[[5, 0, 47]])
    assert w.nbytes == get_format(w.fmt).nbytes(w.shape) + 4 * k
