"""GPU kernels for quantized matmuls (Pallas, and CUDA through the XLA FFI), reached through
``jaxquant.ops.qdot``; and a CUDA decode attention (``attention_cuda``) that
``jaxquant.models.base.self_attention`` reaches for one sequence's decode step."""

from __future__ import annotations

import functools

from pallas_kernels import (
    batch_cuda,
    bitstream,
    bnb,
    dequant,
    fp8,
    gemv,
    gemv_cuda,
    gemv_ggml,
    ggml_iq,
    ggml_k,
    ggml_legacy,
    nvfp4,
    qmm,
)
from pallas_kernels.registry import QMM_MAX_M, Kernel, kernels, lookup, register, select

# Every decoder passes tests/gpu/check_kernels.py on the H200 (benchmarks/RESULTS.md).
DECODERS = {d.fmt: d for mod in (ggml_legacy, ggml_k, ggml_iq, bitstream, fp8, nvfp4, bnb) for d in mod.DECODERS}

for _dec in DECODERS.values():
    register(Kernel(_dec.fmt, "qmm", "triton", functools.partial(qmm.qmm, dec=_dec),
                    functools.partial(qmm.supports, _dec)))
    register(Kernel(_dec.fmt, "dequant", "triton", functools.partial(dequant.dequant_dot, dec=_dec),
                    functools.partial(qmm.supports, _dec)))
for _gdec in gemv_ggml.DECODERS:
    register(Kernel(_gdec.fmt, "gemv", "triton", functools.partial(gemv.gemv, dec=_gdec),
                    functools.partial(gemv.supports, _gdec)))
for _fmt in gemv_cuda.FORMATS:
    register(Kernel(_fmt, "gemv", "cuda", gemv_cuda.gemv, functools.partial(gemv_cuda.supports, _fmt),
                    fuses=gemv_cuda.fuses()))
for _fmt in batch_cuda.FORMATS:
    register(Kernel(_fmt, "batch", "cuda", batch_cuda.batch, functools.partial(batch_cuda.supports, _fmt),
                    fuses=gemv_cuda.fuses()))

__all__ = ["DECODERS", "QMM_MAX_M", "Kernel", "kernels", "lookup", "register", "select"]
