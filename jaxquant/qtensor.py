"""QTensor: a packed quantized tensor as a pytree of plain arrays plus static metadata."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.errors import FormatError


@dataclasses.dataclass(frozen=True)
class QTensor:
    """A quantized tensor of logical shape ``shape`` (last axis = row length, blocks along it).

    ``arrays`` holds the format's fields in a planar compute layout: one array per field of the
    format's block (quants apart from scales), each shaped ``(*shape[:-1], n_blocks, count)``
    (``count == 1`` drops the last axis). jit, vmap, sharding and orbax see ordinary arrays;
    ``fmt``, ``shape`` and ``dtype`` are static.
    """

    arrays: dict[str, jax.Array]
    fmt: str
    shape: tuple[int, ...]
    dtype: str = "float32"  # what dequantize() and qdot produce

    @property
    def format(self):
        from jaxquant.formats import get_format

        return get_format(self.fmt)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed data (equals the GGUF tensor size)."""
        return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in self.arrays.values())

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.size

    def dequantize(self, dtype=None) -> jax.Array:
        """The format's reference semantics (bit-exact with llama.cpp / gguf-py)."""
        out = self.format.dequantize(self)
        return out.astype(dtype or self.dtype)

    def __repr__(self) -> str:
        return f"QTensor({self.fmt}, shape={self.shape}, {self.bits_per_weight:.4g} bpw)"


jax.tree_util.register_dataclass(QTensor, data_fields=["arrays"], meta_fields=["fmt", "shape", "dtype"])


def is_qtensor(x) -> bool:
    return isinstance(x, QTensor)


def dequantize(x, dtype=None) -> jax.Array:
    """Dequantize a QTensor; a plain array is returned as is (cast to ``dtype`` if given)."""
    if isinstance(x, QTensor):
        return x.dequantize(dtype)
    x = jnp.asarray(x)
    return x.astype(dtype) if dtype is not None else x


def take_rows(q: QTensor, ids: jax.Array) -> QTensor:
    """Rows ``ids`` (int array of any shape; out-of-range ids are clipped) of a 2-D QTensor, still
    packed: shape ``(*ids.shape, K)``. Dequantizing the result touches only those rows (embedding
    lookups). Arrays shared by the whole tensor (per-tensor scales) are kept as they are; formats
    whose blocks span rows cannot be sliced (see ``lookup``)."""
    if len(q.shape) != 2:
        raise FormatError(f"take_rows needs a 2-D QTensor, got shape {q.shape}")
    fmt = q.format
    if not fmt.separable:
        raise FormatError(f"take_rows: {q.fmt} has blocks spanning rows; use lookup() to get dequantized rows")
    ids = jnp.asarray(ids)
    shared = {f.name for f in fmt.fields if f.layout == "tensor"}
    arrays = {k: a if k in shared else jnp.take(a, ids, axis=0, mode="clip") for k, a in q.arrays.items()}
    if fmt.scope == "tensor":  # its dequantize sees one matrix: keep the taken rows 2-D
        arrays = {k: a if k in shared else a.reshape(-1, *a.shape[ids.ndim:]) for k, a in arrays.items()}
        return QTensor(arrays, q.fmt, (ids.size, q.shape[1]), q.dtype)
    return QTensor(arrays, q.fmt, (*ids.shape, q.shape[1]), q.dtype)


def lookup(q, ids: jax.Array, dtype=None) -> jax.Array:
    """Rows ``ids`` of a 2-D QTensor or array, dequantized: ``(*ids.shape, K)``. Only those rows
    are dequantized where the format allows (``take_rows``); else the whole tensor."""
    ids = jnp.asarray(ids)
    if not isinstance(q, QTensor):
        return dequantize(jnp.take(q, ids, axis=0, mode="clip"), dtype)
    if q.format.separable:
        return take_rows(q, ids).dequantize(dtype).reshape(*ids.shape, q.shape[1])
    return jnp.take(q.dequantize(dtype), ids, axis=0, mode="clip")
