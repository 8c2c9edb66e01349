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
    lookups)."""
    if len(q.shape) != 2:
        raise FormatError(f"take_rows needs a 2-D QTensor, got shape {q.shape}")
    ids = jnp.asarray(ids)
    arrays = {k: jnp.take(a, ids, axis=0, mode="clip") for k, a in q.arrays.items()}
    return QTensor(arrays, q.fmt, (*ids.shape, q.shape[1]), q.dtype)
