"""GPTQ against AutoGPTQ 0.7.1's ``GPTQ.fasterquant`` on the same weights and activations, in float64.

AutoGPTQ casts to float32 (``.float()``) and synchronizes CUDA; ``reference_float64`` runs it with
``.float()`` made a float64 cast, float64 as torch's default dtype and no synchronization, so both
sides compute in float64. Its Hessian comes from ``add_batch`` on the activations; ours from
``hessian`` on the same ones. Compared: integer codes (recovered from AutoGPTQ's dequantized weight
and its scale and zero), scales and zeros, act-order permutation. Codes could differ only where a
value lies within rounding error of a tie (a flip), after which a row's later columns diverge; the
flip rate is reported and none occurs in these cases. Round-to-nearest into the GPTQ formats
(``jq.quantize``) is AutoGPTQ's ``Quantizer`` per group.

GPTQ into llama.cpp formats (``FormatTarget``) has no reference implementation; there the packed
bytes are checked by gguf-py's ``dequantize`` (it must give GPTQ's values) and the output error on
the calibration activations must fall below the format's own round-to-nearest quantizer's.
"""

from __future__ import annotations

import contextlib

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference_modules import submodule

import jaxquant as jq
from jaxquant.calib import gptq
from jaxquant.calib.targets import IntTarget, target_for
from jaxquant.formats.packing import unpack_bits

AUTO_GPTQ = submodule("auto_gptq", "quantization.gptq")


@contextlib.contextmanager
def reference_float64():
    """AutoGPTQ's ``fasterquant`` / ``add_batch`` computing in float64 on a CPU-only torch."""
    saved = torch.Tensor.float, torch.cuda.synchronize, torch.get_default_dtype()
    torch.Tensor.float = lambda self, *a, **k: self.double()
    torch.cuda.synchronize = lambda *a, **k: None
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.Tensor.float, torch.cuda.synchronize = saved[:2]
        torch.set_default_dtype(saved[2])


def activations(rng, k: int, n_seq: int = 4, t: int = 96, dead: int | None = 5) -> np.ndarray:
    """[n_seq, t, k] with per-channel scales spread over 30x (act order matters) and one dead column."""
    x = rng.standard_normal((n_seq, t, k)) * rng.uniform(0.1, 3.0, k)
    if dead is not None:
        x[..., dead] = 0
    return x


def autogptq(w: np.ndarray, x: np.ndarray, bits: int, group: int, act: bool, sym: bool, block: int = 128):
    """AutoGPTQ: (dequantized weight [R, K], scale [R, G], zero [R, G], g_idx [K], Hessian)."""
    with reference_float64():
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data = torch.tensor(w)
        g = AUTO_GPTQ.GPTQ(lin)
        g.quantizer.configure(bits, perchannel=True, sym=sym, mse=False)
        for seq in x:  # one sequence per call, as AutoGPTQ's calibration loop with batch_size 1
            g.add_batch(torch.tensor(seq[None]), None)
        h = g.H.clone().numpy()
        scale, zero, g_idx = g.fasterquant(blocksize=block, percdamp=0.01, group_size=group, actorder=act)
        return lin.weight.data.numpy(), scale.numpy(), zero.numpy(), g_idx.numpy(), h


CASES = [  # bits, group (-1: the row), act order, sym, K; groups inside, across and beyond 128-column blocks
    (4, 32, False, False, 512), (4, 128, False, False, 512), (3, 64, True, False, 512), (4, -1, False, True, 512),
    (2, 256, True, False, 512), (8, 32, False, True, 512), (4, 64, True, True, 320)]


@pytest.mark.parametrize("bits,group,act,sym,k", CASES[:1] + [pytest.param(*c, marks=pytest.mark.slow) for c in CASES[1:]])
def test_gptq_equals_autogptq(bits, group, act, sym, k):
    rng = np.random.default_rng(bits * 1000 + k + (group % 97))
    w = rng.standard_normal((48, k))
    x = activations(rng, k)
    ref_w, ref_s, ref_z, g_idx, ref_h = autogptq(w, x, bits, group, act, sym)
    with jax.enable_x64(True):
        h = gptq.hessian(jnp.asarray(x)) * (2 / len(x))
        np.testing.assert_allclose(np.asarray(h), ref_h, rtol=1e-12, atol=1e-12 * np.abs(ref_h).max())
        res = gptq.gptq(jnp.asarray(w), jnp.asarray(ref_h), IntTarget(bits, k if group == -1 else group, sym),
                        act_order=act)
        codes, values = np.asarray(res.codes), np.asarray(res.values)
        scale, zero = (np.asarray(a).T for a in res.params)  # [R, G]
    order = np.asarray(res.perm) if act else np.arange(k)
    if act:
        np.testing.assert_array_equal(order, np.argsort(-np.diag(ref_h) - (np.diag(ref_h) == 0), kind="stable"))
        np.testing.assert_array_equal(g_idx[order], np.arange(k) // (k if group == -1 else group))
    ref_codes = np.round(ref_w / ref_s[:, g_idx] + ref_z[:, g_idx])[:, order]
    flips = np.count_nonzero(ref_codes != codes)
    print(f"flip rate {flips / codes.size:.2e} ({flips} of {codes.size} codes)")
    assert flips == 0
    np.testing.assert_allclose(scale, ref_s, rtol=1e-6)
    np.testing.assert_array_equal(zero, ref_z)
    np.testing.assert_allclose(values, ref_w, rtol=0, atol=1e-9 * np.abs(ref_w).max())


@pytest.mark.parametrize("fmt", ["Q4_0"] + [pytest.param(f, marks=pytest.mark.slow) for f in ("Q5_1", "Q8_0", "Q4_K", "Q6_K")])
def test_gptq_into_gguf_formats(fmt):
    """The packed bytes dequantize (gguf-py) to GPTQ's values; the output error beats the format's RTN."""
    rng = np.random.default_rng(7)
    k = 512
    w = rng.standard_normal((32, k)).astype(np.float32)
    x = activations(rng, k, n_seq=2, t=256, dead=None).reshape(-1, k).astype(np.float32)
    h = gptq.hessian(jnp.asarray(x)) * (2 / 2)
    q, values = gptq.quantize(jnp.asarray(w), h, target_for(fmt))
    qtype = gguf.GGMLQuantizationType[fmt]
    ref = gguf.quants.dequantize(q.format.to_bytes(q), qtype)
    np.testing.assert_array_equal(ref, np.asarray(values))

    def output_error(v):
        return float(np.mean(((v - w) @ x.T) ** 2))

    rtn = np.asarray(jq.quantize(w, fmt).dequantize())
    print(f"{fmt}: output error GPTQ / RTN {output_error(ref) / output_error(rtn):.3f}")
    assert output_error(ref) < 0.8 * output_error(rtn)


AUTO_GPTQ_QUANTIZER = submodule("auto_gptq", "quantization.quantizer")


@pytest.mark.parametrize("bits,group", [(4, 128), (3, 32)])
def test_gptq_format_rtn_equals_autogptq_quantizer(bits, group):
    """``jq.quantize(w, "GPTQ{b}_G{g}")``: AutoGPTQ's ``Quantizer`` (find_params, quantize) per group,
    float32; scales stored in float16 as AutoGPTQ's packer stores them."""
    w = np.random.default_rng(bits).standard_normal((64, 256)).astype(np.float32)
    w[3, :group] = 0  # an all-zero group: AutoGPTQ's range -1..1
    q = jq.quantize(w, f"GPTQ{bits}_G{group}")
    quantizer = AUTO_GPTQ_QUANTIZER.Quantizer()
    quantizer.configure(bits, perchannel=True, sym=False, mse=False)
    ref_codes, ref_scale = [], []
    for g in range(256 // group):
        part = torch.tensor(w[:, g * group:(g + 1) * group])
        quantizer.find_params(part, weight=True)
        ref_codes.append(torch.clamp(torch.round(part / quantizer.scale) + quantizer.zero, 0, (1 << bits) - 1))
        ref_scale.append(quantizer.scale[:, 0].numpy())
    ref = torch.cat(ref_codes, 1).numpy()
    codes = np.asarray(unpack_bits(q.arrays["qs"], bits)).reshape(q.shape)
    np.testing.assert_array_equal(codes, ref)
    np.testing.assert_array_equal(np.asarray(q.arrays["scale"]), np.stack(ref_scale, 1).astype(np.float16))
