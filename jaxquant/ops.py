"""``qdot``: the one matmul of jaxquant, for plain and quantized weights.

On GPU a QTensor goes to a fused Pallas kernel (``pallas_kernels``) that reads the packed
bytes once; elsewhere, and for formats or shapes without a kernel, XLA dequantizes and runs
``dot`` in float32. The backend is chosen when a function is traced (under ``jax.jit``: at
compile time) from, in order: the ``backend=`` argument, the innermost ``use_backend(...)``
block, the ``JAXQUANT_QDOT_BACKEND`` environment variable, and ``"auto"``. Its input may be an
``Activation`` (an RMS norm or gated unit that a GPU kernel computes as it reads its input), and a
residual may be added to the product (which that kernel does as it writes).

On several devices a QTensor product is one ``custom_partitioning`` op: whatever sharding the
weight's arrays carry (rows = output features, axis 1 = input blocks, see ``jaxquant.sharding``),
each device runs the same product (kernel or XLA) on its own shards, and a split input dimension
is summed with one ``psum``. Shardings are not known while tracing under ``jit`` (Auto mesh
axes), so ``shard_map`` could not be told them; the partitioner is, when it compiles.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import itertools
import math
import os
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from jaxquant.errors import JaxquantError
from jaxquant.qtensor import QTensor

BACKENDS = ("auto", "xla", "pallas", "interpret")
_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("qdot_backend", default=None)
_taps: contextvars.ContextVar[tuple[Callable[[jax.Array, object], None], ...]] = contextvars.ContextVar(
    "qdot_taps", default=())


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``qdot``'s backend inside the block: ``"auto"`` (Pallas on GPU where the kernel has
    been checked on one, XLA elsewhere),
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
    """The backend ``qdot`` uses now: ``"xla"``, ``"pallas"``, ``"interpret"``, or ``"gpu"`` ("auto"
    on a GPU: the Pallas kernel where one takes the format and shape, XLA for the rest)."""
    name = _check(backend or _backend.get() or os.environ.get("JAXQUANT_QDOT_BACKEND") or "auto")
    if name == "auto":
        return "gpu" if jax.default_backend() == "gpu" else "xla"
    return name


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """x / rms(x) * w over the last axis, in float32 (Gemma's 1 + w is already folded into w)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu, "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}


@functools.partial(jax.tree_util.register_dataclass, data_fields=["x", "weight"], meta_fields=["kind", "eps", "dtype"])
@dataclasses.dataclass(frozen=True)
class Activation:
    """A matmul input that ``qdot`` computes from ``x``: ``kind="rms_norm"``, ``rms_norm(x, weight,
    eps)``; or a gated unit (``kind`` one of ``ACTIVATIONS``), ``act(gate) * up`` of ``x = [gate |
    up]`` in x's dtype (``weight`` None); either cast to ``dtype``, the compute dtype. The CUDA gemv
    computes it in the kernel that quantizes its activations (one kernel where XLA's norm takes two
    and the gated unit one); every other path multiplies ``value()``, the ops the model ran before."""

    x: jax.Array
    kind: str
    weight: jax.Array | None = None
    eps: float = 0.0
    dtype: jnp.dtype = jnp.dtype(jnp.float32)

    def __post_init__(self):
        if self.kind != "rms_norm" and self.kind not in ACTIVATIONS:
            raise JaxquantError(f"Activation: unknown kind {self.kind!r}; valid: rms_norm, {', '.join(ACTIVATIONS)}")

    def value(self) -> jax.Array:
        if self.kind == "rms_norm":
            return rms_norm(self.x, self.weight, self.eps).astype(self.dtype)
        gate, up = jnp.split(self.x, 2, axis=-1)
        return (ACTIVATIONS[self.kind](gate) * up).astype(self.dtype)


def qdot(x: jax.Array | Activation, w, *, residual: jax.Array | None = None, backend: str | None = None) -> jax.Array:
    """``x [..., K] @ w.T`` for ``w`` a plain ``[N, K]`` array or a QTensor of shape ``[N, K]``,
    plus ``residual [..., N]`` if given; ``x`` may be an ``Activation`` (the input it computes).

    Accumulates in float32; the product has the dtype ``x`` and ``w`` promote to (a QTensor
    counts as its ``dtype``), and is then added to ``residual``.
    """
    xin = x.value() if isinstance(x, Activation) else x  # unused (and dropped by XLA) where a kernel fuses it
    is_q = isinstance(w, QTensor)
    shape = tuple(w.shape)
    if len(shape) != 2 or xin.shape[-1] != shape[1]:
        raise JaxquantError(f"qdot: x of shape {tuple(xin.shape)} cannot multiply a weight of shape {shape} "
                            "(expected x [..., K] and w [N, K])")
    if residual is not None and tuple(residual.shape) != (*xin.shape[:-1], shape[0]):
        raise JaxquantError(f"qdot: residual of shape {tuple(residual.shape)} cannot be added to the product "
                            f"{(*xin.shape[:-1], shape[0])}")
    for fn in _taps.get():
        fn(xin, w)
    out_dtype = jnp.result_type(xin.dtype, w.dtype)
    lead = xin.shape[:-1]
    x2 = xin.reshape(-1, shape[1])
    if is_q and "perm" in w.arrays:  # act order: gather x's columns once, not the weight's (registry doc)
        x2 = jnp.take(x2, w.arrays["perm"], axis=1)
        w = QTensor({k: a for k, a in w.arrays.items() if k != "perm"}, w.fmt, w.shape, w.dtype)
        x = x2  # a fusing kernel gets the gathered input, computed here
    name = resolve_backend(backend)
    if is_q and jax.device_count() > 1 and splittable(w):
        names = tuple(w.arrays)
        y = _on_shards(name, w.fmt, w.dtype, names, shape[1], x2, *(w.arrays[k] for k in names))
    else:
        # the unfused sum rounds the product to out_dtype first: a kernel adds only a float32 one
        plain_sum = residual is not None and (residual.dtype != jnp.float32 or out_dtype != jnp.float32)
        fused = None if plain_sum or (residual is None and not isinstance(x, Activation)) else \
            _fused(x, (w,), name, math.prod(lead), residual)
        if fused is not None:
            return fused[0].reshape(*lead, shape[0]).astype(out_dtype)
        y = _product(x2, w, name)
    y = y.reshape(*lead, shape[0]).astype(out_dtype)
    return y if residual is None else y + residual


def qdots(x: jax.Array | Activation, ws) -> list[jax.Array]:
    """``[qdot(x, w) for w in ws]``: the products of one input (q/k and v where v's format differs).
    Where one kernel that fuses takes them all (the CUDA gemv), one call prepares the input (norm,
    quantization) once for every weight."""
    xin = x.value() if isinstance(x, Activation) else x
    if len(ws) > 1 and not _taps.get() and jax.device_count() == 1 and \
            all(isinstance(w, QTensor) and "perm" not in w.arrays and w.shape[1:] == xin.shape[-1:] for w in ws):
        lead = xin.shape[:-1]
        fused = _fused(x, tuple(ws), resolve_backend(), math.prod(lead), None)
        if fused is not None:
            return [y.reshape(*lead, w.shape[0]).astype(jnp.result_type(xin.dtype, w.dtype)) for y, w in zip(fused, ws)]
    return [qdot(x, w) for w in ws]


def _fused(x, ws: tuple[QTensor, ...], name: str, m: int, residual: jax.Array | None) -> list[jax.Array] | None:
    """The float32 products ``[m, N]`` of QTensors ``ws`` by one kernel that computes an
    ``Activation`` input and adds a float32 residual itself (the CUDA gemv, which also takes
    several weights), or None where no such kernel takes them all."""
    if name != "gpu" or not all(isinstance(w, QTensor) for w in ws):
        return None
    import pallas_kernels

    kerns = [pallas_kernels.select(w, m) for w in ws]
    if any(k is None or not k.fuses or k.fn is not kerns[0].fn for k in kerns):
        return None
    flat = dataclasses.replace(x, x=x.x.reshape(m, -1)) if isinstance(x, Activation) else x.reshape(m, -1)
    if len(ws) > 1:
        return list(kerns[0].fn(flat, ws))
    return [kerns[0].fn(flat, ws[0], residual=None if residual is None else residual.reshape(m, -1))]


def splittable(w: QTensor) -> bool:
    """Whether each array of ``w`` is ``(N, n_blocks[, count])``, so that any whole rows and whole
    blocks of it form a QTensor of their own (every GGUF format; not per-tensor scales)."""
    f = w.format
    return len(w.shape) == 2 and f.scope == "row" and all(fld.layout == "rows" for fld in f.fields)


def _product(x2: jax.Array, w, name: str) -> jax.Array:
    """float32 ``x2 [M, K] @ w.T`` on one device: the format's kernel where there is one, else XLA."""
    if isinstance(w, QTensor) and name != "xla":
        import pallas_kernels

        kern = pallas_kernels.select(w, x2.shape[0], interpret=name == "interpret")
        if kern is not None:
            return kern.fn(x2, w, interpret=name == "interpret")
        if name == "pallas" and pallas_kernels.lookup(w.fmt, "qmm") is None:
            raise JaxquantError(f"qdot: no Pallas kernel for format {w.fmt}; kernels exist for "
                                f"{sorted({k[0] for k in pallas_kernels.kernels()})} (use backend='auto')")
    return _xla_dot(x2, w)


# jit: a format's constant tables stay inside its own jaxpr (custom_partitioning takes no constants)
@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _local(backend: str, fmt: str, dtype: str, names: tuple[str, ...], x2: jax.Array, *arrays) -> jax.Array:
    """``_product`` on the arrays of a splittable QTensor (whole, or one device's shards)."""
    w = QTensor(dict(zip(names, arrays)), fmt, (arrays[0].shape[0], x2.shape[1]), dtype)
    return _product(x2, w, backend)


@functools.partial(custom_partitioning, static_argnums=(0, 1, 2, 3, 4))
def _on_shards(backend: str, fmt: str, dtype: str, names: tuple[str, ...], k: int, x2: jax.Array, *arrays):
    """``_local`` as one op that the partitioner splits with ``_partition`` (``k``: the row length)."""
    return _local(backend, fmt, dtype, names, x2, *arrays)


def _rule(backend, fmt, dtype, names, k, mesh, value_types, result_types):
    """Shardy's view: x [m, (b s)], arrays [n, b(, c_i)] -> [m, n]; the blocks b are summed over."""
    from jaxquant.formats import get_format

    f = get_format(fmt)
    counts = {fld.name: fld.count for fld in f.fields}
    extra = tuple(f"c{i}" for i, name in enumerate(names) if counts[name] > 1)
    arrays = ", ".join("n b" + (f" c{i}" if counts[name] > 1 else "") for i, name in enumerate(names))
    factors = {"reduction_factors": ("b",), "need_replication_factors": ("s", *extra)}
    if k == f.block_size:  # one block: Shardy refuses a size-1 factor inside a compound one
        return f"m s, {arrays} -> m n", factors
    return f"m (b s), {arrays} -> m n", {"s": f.block_size, **factors}


def _spec(sharding, ndim: int, mesh) -> tuple:
    """(axis of dim 0, axis of dim 1) of an operand's sharding, each one mesh axis or None; an
    operand split otherwise (e.g. over sub-axes) counts as whole and is gathered."""
    for a, b in itertools.product((None, *mesh.axis_names), repeat=2):
        if (a is None or a != b) and sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec(a, b)), ndim):
            return a, b
    return None, None


def _partition(backend, fmt, dtype, names, k, mesh, arg_shapes, result_shape):
    """Each device multiplies its shards: rows split -> output columns split; blocks split -> the
    partial products are summed (psum). Axes that do not divide evenly are gathered instead."""
    x, first = arg_shapes[0], arg_shapes[1]
    n_ax, k_ax = (ax if ax is None or size % mesh.shape[ax] == 0 else None
                  for ax, size in zip(_spec(first.sharding, first.ndim, mesh), first.shape))
    m_ax = _spec(x.sharding, 2, mesh)[0]
    if m_ax is not None and (m_ax in (n_ax, k_ax) or x.shape[0] % mesh.shape[m_ax]):
        m_ax = None

    def lower(x2, *arrays):
        y = _local(backend, fmt, dtype, names, x2, *arrays)
        return y if k_ax is None else jax.lax.psum(y, k_ax)

    args = (NamedSharding(mesh, PartitionSpec(m_ax, k_ax)),
            *(NamedSharding(mesh, PartitionSpec(n_ax, k_ax)) for _ in arg_shapes[1:]))
    return mesh, lower, NamedSharding(mesh, PartitionSpec(m_ax, n_ax)), args


_on_shards.def_partition(_partition, sharding_rule=_rule, decode_shardings=False)


def _xla_dot(x: jax.Array, w) -> jax.Array:
    """Reference path: dequantize, then a float32 dot at full precision (no TF32 on GPU)."""
    wf = w.dequantize(jnp.float32) if isinstance(w, QTensor) else w
    return jnp.dot(x, wf.T, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)
