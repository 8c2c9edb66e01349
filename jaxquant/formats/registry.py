"""Format registry: a format is a block layout (its fields) plus quantize/dequantize functions.

The planar compute layout keeps each field of the GGUF block struct as its own array, so the
conversion to and from GGUF bytes is a lossless re-view of the same bits in both directions.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.errors import FormatError, QuantizeInputError
from jaxquant.qtensor import QTensor

# Quantizers see at most this many floats at once, so a large matrix never costs more than a
# few float copies of one chunk; rows are independent in every format.
CHUNK_ELEMENTS = 1 << 22


@dataclasses.dataclass(frozen=True)
class Field:
    """One member of a block struct, in GGUF byte order: ``count`` elements of ``dtype``."""

    name: str
    dtype: str
    count: int = 1


QuantizeFn = Callable[[jax.Array, "jax.Array | None"], dict[str, jax.Array]]
DequantizeFn = Callable[[dict[str, jax.Array]], jax.Array]


@dataclasses.dataclass(frozen=True)
class Format:
    """A block format. ``quantize_rows(x f32[R, K], weights f32[K] | None) -> arrays`` with
    arrays shaped ``(R, K // block_size, count)``; ``dequantize_rows(arrays) -> f32[..., K]``."""

    name: str
    block_size: int
    fields: tuple[Field, ...]
    dequantize_rows: DequantizeFn
    quantize_rows: QuantizeFn | None = None
    family: str = ""

    @property
    def type_size(self) -> int:
        return self.block_dtype.itemsize

    @property
    def block_dtype(self) -> np.dtype:
        return np.dtype([(f.name, f.dtype, (f.count,)) if f.count > 1 else (f.name, f.dtype) for f in self.fields])

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    @property
    def can_quantize(self) -> bool:
        return self.quantize_rows is not None

    def row_bytes(self, k: int) -> int:
        return k // self.block_size * self.type_size

    def check_row_length(self, shape: tuple[int, ...], name: str | None = None) -> None:
        if not shape or shape[-1] % self.block_size:
            where = f" tensor {name!r}" if name else ""
            raise FormatError(
                f"{self.name}:{where} row length {shape[-1] if shape else None} (shape {tuple(shape)}) is not a "
                f"multiple of the block size {self.block_size}; pick a format with a smaller block "
                f"(llama.cpp falls back to Q5_0/Q8_0/IQ4_NL for such rows)")

    def dequantize(self, q: QTensor) -> jax.Array:
        return self.dequantize_rows(q.arrays).reshape(q.shape)

    def from_bytes(self, raw: np.ndarray, shape: tuple[int, ...], dtype: str = "float32") -> QTensor:
        """GGUF block bytes (any array of uint8 holding the tensor's data) -> QTensor."""
        shape = tuple(int(s) for s in shape)
        self.check_row_length(shape)
        lead, nb = shape[:-1], shape[-1] // self.block_size
        raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
        want = math.prod(lead) * nb * self.type_size
        if raw.size != want:
            raise FormatError(f"{self.name}: {raw.size} bytes of data for shape {shape}, expected {want}")
        blocks = raw.view(self.block_dtype).reshape(*lead, nb)
        arrays = {f.name: jnp.asarray(np.ascontiguousarray(blocks[f.name])) for f in self.fields}
        return QTensor(arrays, self.name, shape, dtype)

    def to_bytes(self, q: QTensor) -> np.ndarray:
        """QTensor -> GGUF block bytes, shape ``(*shape[:-1], row_bytes)``."""
        lead, nb = q.shape[:-1], q.shape[-1] // self.block_size
        blocks = np.empty((*lead, nb), self.block_dtype)
        for f in self.fields:
            blocks[f.name] = np.asarray(q.arrays[f.name]).astype(f.dtype, copy=False)
        return blocks.view(np.uint8).reshape(*lead, nb * self.type_size)


@dataclasses.dataclass(frozen=True)
class PlainFormat:
    """F32 / F16 / BF16: leaves stay plain arrays; 'quantize' is a cast (RNE, as ggml)."""

    name: str
    dtype: str
    family: str = "plain"
    block_size: int = 1

    @property
    def type_size(self) -> int:
        return jnp.dtype(self.dtype).itemsize

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size

    can_quantize = True

    def row_bytes(self, k: int) -> int:
        return k * self.type_size

    def check_row_length(self, shape, name=None) -> None:
        pass

    def from_bytes(self, raw: np.ndarray, shape: tuple[int, ...], dtype: str | None = None) -> jax.Array:
        return jnp.asarray(np.ascontiguousarray(raw).reshape(-1).view(jnp.dtype(self.dtype)).reshape(shape))

    def to_bytes(self, x: jax.Array) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype != jnp.dtype(self.dtype):
            raise FormatError(f"{self.name}: array of dtype {x.dtype}, expected {self.dtype}")
        return x.reshape(*x.shape[:-1], -1).view(np.uint8)


_REGISTRY: dict[str, Format | PlainFormat] = {}


def register(fmt: Format | PlainFormat) -> Format | PlainFormat:
    if fmt.name in _REGISTRY:
        raise FormatError(f"format {fmt.name!r} registered twice")
    _REGISTRY[fmt.name] = fmt
    return fmt


def get_format(name: str) -> Format | PlainFormat:
    """The format called ``name`` (case-insensitive, e.g. 'q4_k' or 'Q4_K')."""
    fmt = _REGISTRY.get(str(name).upper())
    if fmt is None:
        raise FormatError(f"unknown format {name!r}; valid: {', '.join(sorted(_REGISTRY))}")
    return fmt


def list_formats(quantizable_only: bool = False) -> list[str]:
    return sorted(n for n, f in _REGISTRY.items() if f.can_quantize or not quantizable_only)


def _check_input(x, fmt, weights, name) -> tuple[jax.Array, jax.Array | None]:
    where = f"tensor {name!r}" if name else "input"
    dt = getattr(x, "dtype", None)
    if dt is None or not jnp.issubdtype(dt, jnp.floating):
        raise QuantizeInputError(f"{fmt.name}: {where} has dtype {dt}; quantize takes float32, float16 or bfloat16")
    if x.ndim < 1:
        raise QuantizeInputError(f"{fmt.name}: {where} is a scalar; quantize takes arrays of rows")
    try:
        fmt.check_row_length(tuple(x.shape), name)
    except FormatError as e:
        raise QuantizeInputError(str(e)) from None
    x = jnp.asarray(x, jnp.float32)
    if weights is not None:
        weights = jnp.asarray(weights, jnp.float32)
        if weights.shape != (x.shape[-1],):
            raise QuantizeInputError(
                f"{fmt.name}: importance weights for {where} have shape {weights.shape}, expected ({x.shape[-1]},)")
    for label, a in (("weight", x), ("importance weight", weights)):
        if a is None or isinstance(a, jax.core.Tracer):
            continue
        finite = np.asarray(jnp.isfinite(a))
        if not finite.all():
            idx = tuple(int(i) for i in np.argwhere(~finite)[0])
            raise QuantizeInputError(
                f"{fmt.name}: {where} has a non-finite {label} ({float(a[idx])}) at index {idx}; "
                "fix or drop the tensor before quantizing")
    return x, weights


@partial(jax.jit, static_argnums=0)
def _quantize_rows(fmt: Format, x: jax.Array, weights: jax.Array | None):
    return fmt.quantize_rows(x, weights)


def quantize(x, fmt: str | Format | PlainFormat, weights=None, *, name: str | None = None,
             dtype: str = "float32") -> QTensor | jax.Array:
    """Quantize ``x`` (``[..., K]``, blocks along the last axis) to ``fmt``.

    ``weights``: optional per-column importance (llama.cpp's imatrix ``quant_weights``, shape ``[K]``).
    Concrete inputs are checked (dtype, row length, NaN/Inf) and processed in row chunks; under
    ``jax.jit`` the whole array is quantized in one traced computation.
    """
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    if not fmt.can_quantize:
        raise FormatError(f"{fmt.name} can be loaded and dequantized but not quantized; "
                          f"quantizable formats: {', '.join(list_formats(True))}")
    x, weights = _check_input(x, fmt, weights, name)
    if isinstance(fmt, PlainFormat):
        return x.astype(fmt.dtype)
    shape = tuple(x.shape)
    k = shape[-1]
    rows = x.reshape(-1, k)
    if isinstance(x, jax.core.Tracer):
        arrays = fmt.quantize_rows(rows, weights)
    else:
        arrays = _quantize_chunked(fmt, rows, weights)
    nb = k // fmt.block_size
    arrays = {f.name: arrays[f.name].reshape(*shape[:-1], nb, *((f.count,) if f.count > 1 else ()))
              for f in fmt.fields}
    return QTensor(arrays, fmt.name, shape, dtype)


def _quantize_chunked(fmt: Format, rows: jax.Array, weights) -> dict[str, jax.Array]:
    n, k = rows.shape
    step = max(1, min(n, CHUNK_ELEMENTS // k))
    parts = []
    for start in range(0, n, step):
        chunk = rows[start:start + step]
        if chunk.shape[0] < step:  # pad the tail so every chunk reuses one compiled function
            chunk = jnp.pad(chunk, ((0, step - chunk.shape[0]), (0, 0)))
        out = _quantize_rows(fmt, chunk, weights)
        parts.append({key: v[: n - start] for key, v in out.items()})
    return {key: jnp.concatenate([p[key] for p in parts]) if len(parts) > 1 else parts[0][key] for key in parts[0]}
