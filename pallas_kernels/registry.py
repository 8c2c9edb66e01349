"""Kernel registry: (format, op, backend) -> kernel.

``op`` is ``"gemv"`` (decode: a few activation rows, split-K on the CUDA cores), ``"gemm"``
(weight tiles dequantized in registers and fed to the tensor cores) or ``"dequant"`` (large M:
one pass to a transient float16 copy, then XLA's dot). ``jaxquant.ops.qdot`` asks ``select``
for a kernel and falls back to XLA (dequantize + dot) where none applies.

Backend: Pallas' Triton lowering (``backend="triton"``), chosen deliberately on JAX 0.11.2:
- These kernels are per-thread integer work: bit-field extraction from uint32 words, exact
  int->float tricks and in-thread reductions over [rows, blocks, words] tiles with 16-byte
  vector loads. Triton picks register layouts for such arrays itself; Mosaic GPU (the default
  since JAX 0.11) is a warpgroup/TMA/wgmma model whose register layouts are built around
  tensor-core tiles and whose ``pallas_call`` entry point is itself deprecated in favour of
  ``plgpu.kernel``: a GEMV there is hand-written per layout, for little gain at M = 1.
- Triton lowering works and was measured on the H100 with JAX 0.11.2 (benchmarks/RESULTS.md);
  it warns that it is deprecated (the warning is filtered in ``common.py``). When JAX removes
  it, a Mosaic GPU kernel registers under ``backend="mosaic_gpu"`` with no change to callers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from jaxquant.errors import JaxquantError
from jaxquant.qtensor import QTensor

# Up to GEMV_MAX_M activation rows the CUDA-core GEMV beats padding to a tensor-core tile
# (its per-row accumulators spill beyond; measured 360+ us at M=16 against 60 for gemm);
# above GEMM_MAX_M one f16 copy plus the library dot beats re-dequantizing per row tile.
GEMV_MAX_M = 4
GEMM_MAX_M = 256


@dataclasses.dataclass(frozen=True)
class Kernel:
    """``fn(x [M, K], w: QTensor, interpret: bool) -> [M, N] float32`` for shapes ``supports`` accepts."""

    fmt: str
    op: str
    backend: str
    fn: Callable[..., jax.Array]
    supports: Callable[[int, int, int], bool]


_KERNELS: dict[tuple[str, str, str], Kernel] = {}


def register(kernel: Kernel) -> Kernel:
    key = (kernel.fmt, kernel.op, kernel.backend)
    if key in _KERNELS:
        raise JaxquantError(f"kernel {key} registered twice")
    _KERNELS[key] = kernel
    return kernel


def lookup(fmt: str, op: str, backend: str = "triton") -> Kernel | None:
    return _KERNELS.get((fmt.upper(), op, backend))


def kernels() -> list[tuple[str, str, str]]:
    """Every registered (format, op, backend)."""
    return sorted(_KERNELS)


def select(w: QTensor, m: int, backend: str = "triton") -> Kernel | None:
    """The kernel for ``x [m, K] @ w.T``, or None where XLA should run it."""
    if len(w.shape) != 2:
        return None
    n, k = w.shape
    op = "gemv" if m <= GEMV_MAX_M else "gemm" if m <= GEMM_MAX_M else "dequant"
    kern = lookup(w.fmt, op, backend)
    return kern if kern is not None and kern.supports(m, n, k) else None
