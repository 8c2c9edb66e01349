"""Linear layers packed by the reference libraries themselves, for the GPTQ/AWQ loader and export
tests: AutoGPTQ's ``QuantLinear.pack`` (qlinear_cuda, the act-order-aware layer; it writes v1
zeros) and AutoAWQ's ``WQLinear_GEMM.from_linear``, with the references' dequantized weights.
Only the packages' pure-torch modules are imported (``reference_modules.submodule``)."""

from __future__ import annotations

import numpy as np
import torch
from reference_modules import submodule

AUTO_GPTQ = submodule("auto_gptq", "nn_modules.qlinear.qlinear_cuda")
AWQ_GEMM = submodule("awq", "modules.linear.gemm")
AWQ_PACKING = submodule("awq", "utils.packing_utils")


def _codes(rng, n: int, k: int, bits: int, group: int, act: bool, sym: bool, zero_min: int):
    """Random codes [N, K], zeros and fp16 scales [K/g, N], g_idx [K], and the float weight they encode."""
    maxq = (1 << bits) - 1
    q = rng.integers(0, maxq + 1, (n, k))
    shape = (k // group, n)
    z = np.full(shape, (maxq + 1) // 2) if sym else rng.integers(zero_min, maxq + 1, shape)
    s = (rng.uniform(0.2, 1.0, shape) * 0.1 / maxq).astype(np.float16)
    g_idx = np.arange(k) // group
    if act:
        g_idx = np.empty(k, np.int64)
        g_idx[rng.permutation(k)] = np.arange(k) // group
    w = (q - z[g_idx].T) * s[g_idx].T.astype(np.float32)
    return q, z, s, g_idx, w


def _linear(w: np.ndarray) -> torch.nn.Linear:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = torch.tensor(w, dtype=torch.float32)
    return lin


def gptq_layer(rng, n, k, *, bits, group, act, sym, v2):
    """AutoGPTQ-packed tensors of one layer and the reference's dequantized weight [N, K] (float32)."""
    g = k if group == -1 else group
    # zero points >= 1: v1 cannot store 0, and the reference forward reads v1 zeros
    _, z, s, g_idx, w = _codes(rng, n, k, bits, g, act, sym, zero_min=1)
    args = (_linear(w), torch.tensor(s.astype(np.float32)).T, None, torch.tensor(g_idx, dtype=torch.int32))
    layer = AUTO_GPTQ.QuantLinear(bits, g, k, n, False)
    layer.pack(args[0], args[1], torch.tensor(z).T, args[3])
    layer = layer.half()
    with torch.no_grad():
        ref = layer(torch.eye(k, dtype=torch.float16)).T.float().numpy()
    tensors = {"qweight": layer.qweight.numpy(), "qzeros": layer.qzeros.numpy(), "scales": layer.scales.numpy(),
               "g_idx": layer.g_idx.numpy()}
    if v2:  # pack() stores zero - 1, so packing zero + 1 stores the v2 zeros (its codes are not used)
        other = AUTO_GPTQ.QuantLinear(bits, g, k, n, False)
        other.pack(args[0], args[1], torch.tensor(z + 1).T, args[3])
        tensors["qzeros"] = other.qzeros.numpy()
    return tensors, ref


def awq_layer(rng, n, k, *, bits, group, **_):
    """AutoAWQ GEMM-packed tensors of one layer and ``dequantize_gemm``'s weight [N, K] (float32)."""
    _, z, s, _, w = _codes(rng, n, k, bits, group, act=False, sym=False, zero_min=0)
    layer = AWQ_GEMM.WQLinear_GEMM.from_linear(_linear(w), bits, group, scales=torch.tensor(s.astype(np.float32)),
                                               zeros=torch.tensor(z))
    ref = AWQ_PACKING.dequantize_gemm(layer.qweight, layer.qzeros, layer.scales, bits, group)
    tensors = {"qweight": layer.qweight.numpy(), "qzeros": layer.qzeros.numpy(), "scales": layer.scales.numpy()}
    return tensors, ref.T.float().numpy()
