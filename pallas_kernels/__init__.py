"""Pallas GPU kernels for quantized matmuls, reached through ``jaxquant.ops.qdot``."""

from __future__ import annotations

import functools

from pallas_kernels import bitstream, bnb, dequant, fp8, ggml_iq, ggml_k, ggml_legacy, nvfp4, qmm
from pallas_kernels.registry import QMM_MAX_M, Kernel, kernels, lookup, register, select

# Kernels tested in interpret mode and compiled for sm_90 but not yet run by tests/gpu/check_kernels.py
# on a GPU: qdot's "auto" backend leaves them to XLA, backend="pallas" runs them. A format moves to
# the checked ones once check_kernels has passed it on the device.
_CHECKED = (*ggml_legacy.DECODERS, *ggml_k.DECODERS, *ggml_iq.DECODERS)
_PENDING = (*bitstream.DECODERS, *fp8.DECODERS, *nvfp4.DECODERS, *bnb.DECODERS)
DECODERS = {d.fmt: d for d in (*_CHECKED, *_PENDING)}
PENDING_GPU_CHECK = frozenset(d.fmt for d in _PENDING)

for _dec in DECODERS.values():
    register(Kernel(_dec.fmt, "qmm", "triton", functools.partial(qmm.qmm, dec=_dec),
                    functools.partial(qmm.supports, _dec)))
    register(Kernel(_dec.fmt, "dequant", "triton", functools.partial(dequant.dequant_dot, dec=_dec),
                    functools.partial(qmm.supports, _dec)))

__all__ = ["DECODERS", "PENDING_GPU_CHECK", "QMM_MAX_M", "Kernel", "kernels", "lookup", "register", "select"]
