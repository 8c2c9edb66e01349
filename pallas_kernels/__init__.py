"""Pallas GPU kernels for quantized matmuls, reached through ``jaxquant.ops.qdot``."""

from __future__ import annotations

import functools

from pallas_kernels import gemm, gemv, ggml_k, ggml_legacy
from pallas_kernels.registry import GEMV_MAX_M, Kernel, kernels, lookup, register, select

SPECS = {s.fmt: s for s in (*ggml_legacy.SPECS, *ggml_k.SPECS)}

for _spec in SPECS.values():
    register(Kernel(_spec.fmt, "gemv", "triton", functools.partial(gemv.gemv, spec=_spec),
                    functools.partial(gemv.supports, _spec)))
    register(Kernel(_spec.fmt, "gemm", "triton", functools.partial(gemm.gemm, spec=_spec),
                    functools.partial(gemm.supports, _spec)))

__all__ = ["GEMV_MAX_M", "Kernel", "SPECS", "kernels", "lookup", "register", "select"]
