"""Kernel registry: (format, op, backend) -> kernel.

``op`` is ``"gemv"`` (one activation row, integer dot products on the CUDA cores, ``gemv.py``, for
the formats it has; ``gemv_cuda.py`` for its 4- to 8-bit formats), ``"batch"`` (2 to 8
rows, bf16 tensor-core products, ``batch_cuda.batch``), ``"qmm"`` (up to ``QMM_MAX_M`` activation
rows: packed weights decoded into the tensor cores' registers, ``qmm.py``) or ``"dequant"`` (more
rows: one pass to a transient float16 copy, then XLA's dot). ``jaxquant.ops.qdot`` asks ``select``
for a kernel and falls back to XLA (dequantize + dot) where none applies.

Backend: Pallas' Triton lowering (``backend="triton"``), chosen deliberately on JAX 0.11.2:
- The work per weight is bit-field extraction and packed half2 arithmetic in registers, laid out
  to match the MMA operand fragment (``tile.py``). Triton's linear layouts turn that layout match
  into register renaming, inline PTX (``elementwise_inline_asm``) gives the half2 instructions, and
  Hopper's ``wgmma`` comes from a plain ``dot``. Mosaic GPU (the default since JAX 0.11) is a
  warpgroup/TMA model with its own register layouts and no inline PTX; ``jax-triton`` needs a
  wheel the device image lacks and has no CPU interpreter for the tests.
- Where Triton's code generation stood in the way, an XLA FFI kernel in CUDA (``backend="cuda"``,
  compiled with the machine's nvcc at first use): the gemv of 10 formats, whose Triton version
  left its loads waiting one at a time and could not keep the activations in L1 (``gemv_cuda.py``).
- Pallas Triton runs in the Pallas interpreter on any platform, so the CPU suite tests every
  decoder bit for bit (``halfpack`` has a jnp twin of each PTX line), and ``benchmarks/sass.py``
  compiles the kernels for sm_90 without a GPU.
- It warns that it is deprecated (the warning is filtered in ``halfpack.py``). When JAX removes
  it, a Mosaic GPU kernel registers under ``backend="mosaic_gpu"`` with no change to callers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from jaxquant.errors import JaxquantError
from jaxquant.qtensor import QTensor

# Above QMM_MAX_M rows one float16 copy plus the library dot beats re-decoding per row tile.
QMM_MAX_M = 256


@dataclasses.dataclass(frozen=True)
class Kernel:
    """``fn(x [M, K], w: QTensor, interpret: bool) -> [M, N] float32`` for shapes ``supports`` accepts.
    A kernel that ``fuses`` also takes ``x`` as a ``jaxquant.ops.Activation`` (which it computes),
    ``residual=`` (float32 ``[M, N]``, added to the product), and ``w`` as a tuple of weights that
    its ``fn`` takes each (their products, the input prepared once)."""

    fmt: str
    op: str
    backend: str
    fn: Callable[..., jax.Array]
    supports: Callable[[int, int, int], bool]
    fuses: bool = False


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


def select(w: QTensor, m: int, interpret: bool = False) -> Kernel | None:
    """The kernel for ``x [m, K] @ w.T``, or None where XLA should run it: at ``m == 1`` the CUDA
    gemv where it is built for the format (not under the Pallas interpreter), then Triton's; for a
    few rows the CUDA batch kernel where selected; then qmm up to ``QMM_MAX_M`` rows; then dequant."""
    if len(w.shape) != 2:
        return None
    n, k = w.shape
    ops = ("gemv", "qmm") if m == 1 else ("batch", "qmm") if m <= QMM_MAX_M else ("dequant",)
    for op in ops:
        for backend in ("cuda", "triton") if op in ("gemv", "batch") and not interpret else ("triton",):
            kern = lookup(w.fmt, op, backend)
            if kern is not None and kern.supports(m, n, k):
                return kern
    return None
