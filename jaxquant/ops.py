"""``qdot``: the one matmul of jaxquant, for plain and quantized weights.

On GPU a QTensor goes to a fused Pallas kernel (``pallas_kernels``) that reads the packed
bytes once; elsewhere, and for formats or shapes without a kernel, XLA dequantizes and runs
``dot`` in float32. The backend is chosen when a function is traced (under ``jax.jit``: at
compile time) from, in order: the ``backend=`` argument, the innermost ``use_backend(...)``
block, the ``JAXQUANT_QDOT_BACKEND`` environment variable, and ``"auto"``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

from jaxquant.errors import JaxquantError
from jaxquant.qtensor import QTensor

BACKENDS = ("auto", "xla", "pallas", "interpret")
_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("qdot_backend", default=None)
_taps: contextvars.ContextVar[tuple[Callable[[jax.Array, object], None], ...]] = contextvars.ContextVar(
    "qdot_taps", default=())


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``qdot``'s backend inside the block: ``"auto"`` (Pallas on GPU, XLA elsewhere),
    ``"xla"``, ``"pallas"`` (error for a format without kernels; shapes a kernel does not
    take still run in XLA) or ``"interpret"`` (the Pallas
    kernels run by the Pallas interpreter, on any platform: slow, for tests)."""
    token = _backend.set(_check(name))
    try:
        yield
    finally:
        _backend.reset(token)


@contextlib.contextmanager
def tap(fn: Callable[[jax.Array, object], None]) -> Iterator[None]:
    """Call ``fn(x, w)`` with the input and the weight of every ``qdot`` inside the block. Under
    ``jax.jit`` it runs while tracing: ``fn`` sees tracers and may keep values derived from them
    for the traced function to return (how ``jaxquant.isq.imatrix`` collects activations)."""
    token = _taps.set((*_taps.get(), fn))
    try:
        yield
    finally:
        _taps.reset(token)


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise JaxquantError(f"unknown qdot backend {name!r}; valid: {', '.join(BACKENDS)}")
    return name


def resolve_backend(backend: str | None = None) -> str:
    """The backend ``qdot`` uses now: ``"xla"``, ``"pallas"`` or ``"interpret"``."""
    name = _check(backend or _backend.get() or os.environ.get("JAXQUANT_QDOT_BACKEND") or "auto")
    if name == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "xla"
    return name


def qdot(x: jax.Array, w, *, backend: str | None = None) -> jax.Array:
    """``x [..., K] @ w.T`` for ``w`` a plain ``[N, K]`` array or a QTensor of shape ``[N, K]``.

    Accumulates in float32; the result has the dtype ``x`` and ``w`` promote to (a QTensor
    counts as its ``dtype``).
    """
    is_q = isinstance(w, QTensor)
    shape = tuple(w.shape)
    if len(shape) != 2 or x.shape[-1] != shape[1]:
        raise JaxquantError(f"qdot: x of shape {tuple(x.shape)} cannot multiply a weight of shape {shape} "
                            "(expected x [..., K] and w [N, K])")
    for fn in _taps.get():
        fn(x, w)
    out_dtype = jnp.result_type(x.dtype, w.dtype)
    x2 = x.reshape(-1, shape[1])
    if is_q and "perm" in w.arrays:  # act order: gather x's columns once, not the weight's (registry doc)
        x2 = jnp.take(x2, w.arrays["perm"], axis=1)
        w = QTensor({k: a for k, a in w.arrays.items() if k != "perm"}, w.fmt, w.shape, w.dtype)
    name = resolve_backend(backend)
    y = None
    if is_q and name != "xla":
        import pallas_kernels

        kern = pallas_kernels.select(w, x2.shape[0])
        if kern is not None:
            y = kern.fn(x2, w, interpret=name == "interpret")
        elif name == "pallas" and pallas_kernels.lookup(w.fmt, "qmm") is None:
            raise JaxquantError(f"qdot: no Pallas kernel for format {w.fmt}; kernels exist for "
                                f"{sorted({k[0] for k in pallas_kernels.kernels()})} (use backend='auto')")
    if y is None:
        y = _xla_dot(x2, w)
    return y.reshape(*x.shape[:-1], shape[0]).astype(out_dtype)


def _xla_dot(x: jax.Array, w) -> jax.Array:
    """Reference path: dequantize, then a float32 dot at full precision (no TF32 on GPU)."""
    wf = w.dequantize(jnp.float32) if isinstance(w, QTensor) else w
    return jnp.dot(x, wf.T, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)
