"""Pallas GPU kernels for quantized matmuls, reached through ``jaxquant.ops.qdot``."""

from __future__ import annotations

import functools

from pallas_kernels import dequant, gemm, gemv, ggml_iq, ggml_k, ggml_legacy
from pallas_kernels.registry import GEMM_MAX_M, GEMV_MAX_M, Kernel, kernels, lookup, register, select

SPECS = {s.fmt: s for s in (*ggml_legacy.SPECS, *ggml_k.SPECS, *ggml_iq.SPECS)}

for _spec in SPECS.values():
    for _op, _fn, _supports in (("gemv", gemv.gemv, gemv.supports), ("gemm", gemm.gemm, gemm.supports),
                                ("dequant", dequant.dequant_dot, dequant.supports)):
        register(Kernel(_spec.fmt, _op, "triton", functools.partial(_fn, spec=_spec),
                        functools.partial(_supports, _spec)))

__all__ = ["GEMM_MAX_M", "GEMV_MAX_M", "Kernel", "SPECS", "kernels", "lookup", "register", "select"]
