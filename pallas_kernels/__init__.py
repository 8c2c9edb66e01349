"""Pallas GPU kernels for quantized matmuls, reached through ``jaxquant.ops.qdot``."""

from __future__ import annotations

import functools

from pallas_kernels import bitstream, bnb, dequant, fp8, ggml_iq, ggml_k, ggml_legacy, nvfp4, qmm
from pallas_kernels.registry import QMM_MAX_M, Kernel, kernels, lookup, register, select

DECODERS = {d.fmt: d for d in (*ggml_legacy.DECODERS, *ggml_k.DECODERS, *ggml_iq.DECODERS, *bitstream.DECODERS,
                                *fp8.DECODERS, *nvfp4.DECODERS, *bnb.DECODERS)}

for _dec in DECODERS.values():
    register(Kernel(_dec.fmt, "qmm", "triton", functools.partial(qmm.qmm, dec=_dec),
                    functools.partial(qmm.supports, _dec)))
    register(Kernel(_dec.fmt, "dequant", "triton", functools.partial(dequant.dequant_dot, dec=_dec),
                    functools.partial(qmm.supports, _dec)))

__all__ = ["DECODERS", "QMM_MAX_M", "Kernel", "kernels", "lookup", "register", "select"]
