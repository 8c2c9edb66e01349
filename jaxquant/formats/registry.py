"""Format registry: a format is a block layout (its fields) plus quantize/dequantize functions.

The planar compute layout keeps each field of the GGUF block struct as its own array, so the
conversion to and from GGUF bytes is a lossless re-view of the same bits in both directions.

Formats without a GGML type (MLX affine, HQQ, bitsandbytes, FP8, NVFP4) declare themselves with
``Format(..., gguf=False)``: they quantize, dequantize, run in ``qdot`` and go into orbax
checkpoints, but have no GGUF bytes (``from_bytes``/``to_bytes`` and ``write_gguf`` raise
``FormatError``). Such a format picks one of two scopes:

- ``scope="row"`` (the default, as every GGUF format): ``quantize_rows`` sees any chunk of rows
  and returns ``(R, K // block_size, count)`` arrays, one per field. A non-GGUF format may also
  declare ``layout="tensor"`` fields: arrays of the whole tensor outside its blocks, which a
  QTensor may lack (its quantizer never makes them). One such field has a meaning of its own: ``perm`` (int32
  ``[K]``, GPTQ's act order) says that stored column j holds input column ``perm[j]``;
  ``dequantize`` returns the input order and ``qdot`` multiplies ``x[..., perm]`` by the stored
  columns.
- ``scope="tensor"``: ``quantize_rows`` sees the whole matrix ``[N, K]`` at once (quantizers
  with per-tensor statistics: FP8 per-tensor scales, bitsandbytes' double quantization, HQQ's
  early stop on the tensor's error) and returns arrays of any shape; ``dequantize_rows(arrays)``
  must rebuild ``[N, K]`` from them alone. Leading axes (experts) are mapped over with ``vmap``.
  Each ``Field`` then says how its array relates to rows (``Field.layout``): ``"rows"`` (its
  leading axis is the tensor's rows, e.g. FP8 values, per-row scales), ``"tensor"`` (one array
  for the whole tensor: a per-tensor scale) or ``"mixed"`` (blocks spanning rows: 128x128 FP8
  scales, nested absmax). ``take_rows`` slices "rows" arrays and keeps "tensor" ones; a format
  with a "mixed" field is dequantized whole before its rows are taken (``lookup``).

``block_size`` is what the row length must be a multiple of. A field's ``dtype`` is what the
quantizer produces; a non-GGUF format's dequantize may accept other float dtypes for its scale
arrays (MLX checkpoints store bfloat16 or float16 scales), so a loader stores what it reads.
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
    """One member of a block struct, in GGUF byte order: ``count`` elements of ``dtype``.
    ``layout`` (non-GGUF formats): "rows", "tensor" or "mixed" (see the module doc)."""

    name: str
    dtype: str
    count: int = 1
    layout: str = "rows"


QuantizeFn = Callable[[jax.Array, "jax.Array | None"], dict[str, jax.Array]]
DequantizeFn = Callable[[dict[str, jax.Array]], jax.Array]


@dataclasses.dataclass(frozen=True)
class Format:
    """A block format. ``quantize_rows(x f32[R, K], weights f32[K] | None) -> arrays`` with
    arrays shaped ``(R, K // block_size, count)``; ``dequantize_rows(arrays) -> f32[..., K]``.
    ``gguf=False``: no GGML type (no GGUF bytes); ``scope="tensor"``: the quantizer sees whole
    matrices and the arrays may have any shape (see the module doc)."""

    name: str
    block_size: int
    fields: tuple[Field, ...]
    dequantize_rows: DequantizeFn
    quantize_rows: QuantizeFn | None = None
    family: str = ""
    gguf: bool = True
    scope: str = "row"

    def __post_init__(self):
        if self.scope not in ("row", "tensor") or (self.gguf and self.scope != "row"):
            raise FormatError(f"{self.name}: scope {self.scope!r}; GGUF formats are 'row', others 'row' or 'tensor'")
        row_ok = ("rows",) if self.gguf else ("rows", "tensor")
        bad = [f.name for f in self.fields if f.layout not in ("rows", "tensor", "mixed")
               or (self.scope == "row" and f.layout not in row_ok)]
        if bad:
            raise FormatError(f"{self.name}: field {bad[0]!r} has a bad layout (row-scope fields are 'rows', or "
                              "'tensor' in non-GGUF formats; tensor-scope fields 'rows', 'tensor' or 'mixed')")

    @property
    def type_size(self) -> int:
        return self.block_dtype.itemsize

    @property
    def block_dtype(self) -> np.dtype:
        """The block struct; a row-scope format's per-tensor fields lie outside its blocks."""
        fields = [f for f in self.fields if self.scope == "tensor" or f.layout == "rows"]
        return np.dtype([(f.name, f.dtype, (f.count,)) if f.count > 1 else (f.name, f.dtype) for f in fields])

    @property
    def bits_per_weight(self) -> float:
        """Bits per weight; for a tensor-scope format, those of a 4096 x 4096 matrix."""
        if self.scope == "tensor":
            return 8.0 * self.nbytes((4096, 4096)) / 4096**2
        return 8.0 * self.type_size / self.block_size

    @property
    def can_quantize(self) -> bool:
        return self.quantize_rows is not None

    @property
    def separable(self) -> bool:
        """Whether ``take_rows`` can slice rows out still packed (no field spans rows)."""
        return all(f.layout != "mixed" for f in self.fields)

    def row_bytes(self, k: int) -> int:
        return k // self.block_size * self.type_size

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of a tensor of ``shape`` in this format (row formats: whole blocks per row)."""
        if self.scope == "row":
            return math.prod(shape[:-1]) * self.row_bytes(shape[-1])
        out = jax.eval_shape(lambda x: _quantize_tensor(self, x), jax.ShapeDtypeStruct(tuple(shape), jnp.float32))
        return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in out.values())

    def check_row_length(self, shape: tuple[int, ...], name: str | None = None) -> None:
        if not shape or shape[-1] % self.block_size:
            where = f" tensor {name!r}" if name else ""
            raise FormatError(
                f"{self.name}:{where} row length {shape[-1] if shape else None} (shape {tuple(shape)}) is not a "
                f"multiple of the block size {self.block_size}; pick a format with a smaller block "
                f"(llama.cpp falls back to Q5_0/Q8_0/IQ4_NL for such rows)")

    def dequantize(self, q: QTensor) -> jax.Array:
        if not math.prod(q.shape):  # no blocks to reshape (a GGUF tensor may have a zero dimension)
            return jnp.zeros(q.shape, jnp.float32)
        fn = self.dequantize_rows
        if self.scope == "tensor":  # one matrix per call; experts and other leading axes mapped
            for _ in range(len(q.shape) - 2):
                fn = jax.vmap(fn)
        return fn(q.arrays).reshape(q.shape)

    def _check_gguf(self) -> None:
        if not self.gguf:
            raise FormatError(f"{self.name} has no GGML type, so no GGUF bytes; save an orbax checkpoint "
                              "(jaxquant quantize SRC DIR) or pick a GGUF format")

    def from_bytes(self, raw: np.ndarray, shape: tuple[int, ...], dtype: str = "float32") -> QTensor:
        """GGUF block bytes (any array of uint8 holding the tensor's data) -> QTensor."""
        self._check_gguf()
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
        self._check_gguf()
        lead, nb = q.shape[:-1], q.shape[-1] // self.block_size
        arrays = tuple(q.arrays[f.name] for f in self.fields)
        return np.asarray(_interleave(arrays, tuple(f.dtype for f in self.fields), (*lead, nb)))


@partial(jax.jit, static_argnums=(1, 2))
def _interleave(arrays: tuple, dtypes: tuple[str, ...], blocks: tuple[int, ...]) -> jax.Array:
    """The fields' bytes side by side, block by block: ``(*lead, nb * type_size)`` uint8, built where
    the arrays are (one transfer of finished bytes; numpy's strided struct stores ran at 0.3 GB/s)."""
    parts = [jax.lax.bitcast_convert_type(jnp.asarray(a).astype(dt), jnp.uint8).reshape(*blocks, -1)
             for a, dt in zip(arrays, dtypes)]
    return jnp.concatenate(parts, axis=-1).reshape(*blocks[:-1], -1)


@dataclasses.dataclass(frozen=True)
class PlainFormat:
    """F32 / F16 / BF16: leaves stay plain arrays; 'quantize' is a cast (RNE, as ggml)."""

    name: str
    dtype: str
    family: str = "plain"
    block_size: int = 1
    gguf = True
    scope = "row"

    @property
    def type_size(self) -> int:
        return jnp.dtype(self.dtype).itemsize

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size

    can_quantize = True

    def row_bytes(self, k: int) -> int:
        return k * self.type_size

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return math.prod(shape) * self.type_size

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


def _check_input(x, fmt, weights, name) -> tuple[np.ndarray | jax.Array, jax.Array | None]:
    """Dtype, shape and importance-weight checks; ``x`` comes back as an array, not yet float32 (the
    conversion and the finiteness check of ``x`` happen per chunk, see ``_quantize_chunked``)."""
    where = _where(name)
    dt = getattr(x, "dtype", None)
    if dt is None or not jnp.issubdtype(dt, jnp.floating):
        raise QuantizeInputError(f"{fmt.name}: {where} has dtype {dt}; quantize takes float32, float16 or bfloat16")
    if x.ndim < 1:
        raise QuantizeInputError(f"{fmt.name}: {where} is a scalar; quantize takes arrays of rows")
    if not math.prod(x.shape):
        raise QuantizeInputError(f"{fmt.name}: {where} has no elements (shape {tuple(x.shape)}); nothing to quantize")
    try:
        fmt.check_row_length(tuple(x.shape), name)
    except FormatError as e:
        raise QuantizeInputError(str(e)) from None
    if not isinstance(x, jax.Array):
        x = np.asarray(x)
    if weights is not None:
        weights = jnp.asarray(weights, jnp.float32)
        if weights.shape != (x.shape[-1],):
            raise QuantizeInputError(
                f"{fmt.name}: importance weights for {where} have shape {weights.shape}, expected ({x.shape[-1]},)")
        if not isinstance(weights, jax.core.Tracer):
            _check_finite(np.asarray(weights), fmt, where, "importance weight")
    return x, weights


def _where(name: str | None) -> str:
    return f"tensor {name!r}" if name else "input"


def _check_finite(a: np.ndarray, fmt, where: str, label: str, bad: int | None = None) -> None:
    """Raise naming the first non-finite element of ``a`` (float32); ``bad``: its flat index, if known."""
    if bad is None:
        finite = np.isfinite(a)
        if finite.all():
            return
        bad = int(np.argmin(finite.reshape(-1)))
    idx = tuple(int(i) for i in np.unravel_index(bad, a.shape))
    raise QuantizeInputError(
        f"{fmt.name}: {where} has a non-finite {label} ({float(a[idx])}) at index {idx}; "
        "fix or drop the tensor before quantizing")


@partial(jax.jit, static_argnums=0)
def _quantize_chunk(fmt: Format, x: jax.Array, weights: jax.Array | None):
    """One chunk of rows quantized, and whether all of them are finite (checked here, in one pass
    of the compiled code, rather than on the host)."""
    x = x.astype(jnp.float32)
    # x * 0 is NaN exactly where x is NaN or +-inf, and a sum propagates NaN: one vectorized pass
    # (a boolean all() reduction costs XLA's CPU backend a third of a Q4_0 quantization)
    return fmt.quantize_rows(x, weights), jnp.isfinite(jnp.sum(x * 0))


def _result_stats(x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row of a finite input ``x`` and its dequantized result ``y``: the squared error and the
    squared norm (float32). A non-finite ``y`` makes the error non-finite; inputs beyond ~1e19
    overflow both, and ``_check_result`` then looks again in float64."""
    x = x.astype(jnp.float32)
    d = x - y.reshape(x.shape)
    return jnp.sum(d * d, axis=-1), jnp.sum(x * x, axis=-1)


# Compiled apart from the quantizer: fused into it, XLA's CPU backend made Q4_0 7x slower.
_chunk_stats = jax.jit(lambda fmt, x, arrays: _result_stats(x, fmt.dequantize_rows(arrays)), static_argnums=0)
_tensor_stats = jax.jit(lambda x, out: _result_stats(x, out.dequantize(jnp.float32) if isinstance(out, QTensor)
                                                     else out.astype(jnp.float32)))


def _check_result(fmt, x, result, stats: list[tuple[jax.Array, jax.Array]], where: str) -> None:
    """Raise when the quantized values are non-finite (a scale overflowed) or the error is 100%
    (every value lost, e.g. a scale that underflowed), naming the first element affected."""
    err = sum(float(np.asarray(e, np.float64).sum()) for e, _ in stats)
    norm = sum(float(np.asarray(n, np.float64).sum()) for _, n in stats)
    if math.isfinite(err) and math.isfinite(norm) and not (norm > 0 and err >= norm):
        return
    # rare: look again on the host, in float64 (no overflow)
    x = np.asarray(x, np.float64)
    y = np.asarray(result.dequantize(jnp.float32) if isinstance(result, QTensor) else result, np.float64)
    y = y.reshape(x.shape)
    finite = np.isfinite(y)
    err, norm = float(((x - y) ** 2).sum()) if finite.all() else math.inf, float((x * x).sum())
    if finite.all() and not (norm > 0 and err >= norm):
        return
    if not finite.all():
        what, at = "quantizes to a non-finite value, first", int(np.argmin(finite.reshape(-1)))
    else:
        what = f"loses all its values (relative RMS error {math.sqrt(err / norm):.0%}), the largest error"
        at = int(np.argmax(np.abs(x - y).reshape(-1)))
    idx = tuple(int(i) for i in np.unravel_index(at, x.shape))
    raise QuantizeInputError(
        f"{fmt.name}: {where} {what} at index {idx} ({float(x[idx])!r} -> {float(y[idx])!r}): its values "
        "are out of the format's range (scales overflow or underflow); pick another format, scale the tensor, or "
        "keep the result anyway with check=False (ISQ: Policy(check=False))")


def quantize(x, fmt: str | Format | PlainFormat, weights=None, *, name: str | None = None,
             dtype: str = "float32", check: bool = True) -> QTensor | jax.Array:
    """Quantize ``x`` (``[..., K]``, blocks along the last axis) to ``fmt``.

    ``weights``: optional per-column importance (llama.cpp's imatrix ``quant_weights``, shape ``[K]``).
    Concrete inputs are checked (dtype, row length, NaN/Inf) and processed in row chunks; under
    ``jax.jit`` the whole array is quantized in one traced computation.
    ``check``: raise ``QuantizeInputError`` when the result of a concrete input is garbage: a
    non-finite value (finite inputs too large for the format's scales: AFQ4 at 7e4, Q4_0 at 5e5)
    or a relative error of 100% (all values lost: Q6_K at 1e30). The bytes are llama.cpp's either
    way; ``check=False`` returns them.
    """
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    if not fmt.can_quantize:
        raise FormatError(f"{fmt.name} can be loaded and dequantized but not quantized; "
                          f"quantizable formats: {', '.join(list_formats(True))}")
    x, weights = _check_input(x, fmt, weights, name)
    shape, traced = tuple(x.shape), isinstance(x, jax.core.Tracer)
    if isinstance(fmt, PlainFormat) or fmt.scope == "tensor":  # whole tensors, no row chunks
        x = jnp.asarray(x, jnp.float32)
        if not traced:
            _check_finite(np.asarray(x), fmt, _where(name), "weight")
        out = x.astype(fmt.dtype) if isinstance(fmt, PlainFormat) else QTensor(
            _quantize_tensor(fmt, x), fmt.name, shape, dtype)
        if check and not traced:
            _check_result(fmt, x, out, [_tensor_stats(x, out)], _where(name))
        return out
    k = shape[-1]
    rows = x.reshape(-1, k)
    if traced:
        arrays = fmt.quantize_rows(rows.astype(jnp.float32), weights)
    else:
        arrays, bad, stats = _quantize_chunked(fmt, rows, weights, check)
        if bad is not None:
            _check_finite(np.asarray(x, np.float32), fmt, _where(name), "weight", bad)
    nb = k // fmt.block_size
    arrays = {f.name: arrays[f.name].reshape(*shape[:-1], nb, *((f.count,) if f.count > 1 else ()))
              for f in fmt.fields if f.layout == "rows"}
    out = QTensor(arrays, fmt.name, shape, dtype)
    if check and not traced:
        _check_result(fmt, x, out, stats, _where(name))
    return out


def _quantize_chunked(fmt: Format, rows, weights, check: bool
                      ) -> tuple[dict[str, jax.Array], int | None, list[tuple[jax.Array, jax.Array]]]:
    """``rows`` quantized chunk by chunk, the flat index of the first non-finite value (or None) and
    each chunk's ``_result_stats`` (if ``check``; zero-padded rows add nothing to them). Only the
    padded tail is sliced; one concatenation."""
    n, k = rows.shape
    step = max(1, min(n, CHUNK_ELEMENTS // k))
    staging = _Staging(step, k) if isinstance(rows, np.ndarray) and jax.devices()[0].platform == "cpu" else None
    parts, flags, stats = [], [], []
    for i, start in enumerate(range(0, n, step)):
        chunk = rows[start:start + step]
        if staging is not None:
            chunk = staging.put(i, chunk, stats if check else parts)  # the stats read the chunk last
        elif chunk.shape[0] < step:  # pad the tail so every chunk reuses one compiled function
            chunk = jnp.pad(chunk, ((0, step - chunk.shape[0]), (0, 0)))
        out, finite = _quantize_chunk(fmt, chunk, weights)
        parts.append(out)
        flags.append(finite)
        if check:
            stats.append(_chunk_stats(fmt, chunk, out))
    for i, finite in enumerate(flags):
        if not finite:  # rare: find the first bad value of that chunk on the host
            chunk = np.asarray(rows[i * step:(i + 1) * step]).astype(np.float32)
            return {}, i * step * k + int(np.argmin(np.isfinite(chunk).reshape(-1))), []
    if n % step:
        parts[-1] = {key: v[:n % step] for key, v in parts[-1].items()}
    arrays = {key: jnp.concatenate([p[key] for p in parts]) if len(parts) > 1 else parts[0][key] for key in parts[0]}
    return arrays, None, stats


class _Staging:
    """Host chunks for the CPU backend without jax's host-to-device copy (~1 GB/s into freshly
    faulted memory): two reused 64-byte-aligned float32 buffers that the device arrays alias
    (DLPack), a buffer being refilled only once the call that read it two chunks ago is done."""

    def __init__(self, step: int, k: int):
        raw = [np.empty(step * k * 4 + 64, np.uint8) for _ in range(2)]
        self.bufs = [r[-r.ctypes.data % 64:][:step * k * 4].view(np.float32).reshape(step, k) for r in raw]

    def put(self, i: int, chunk: np.ndarray, parts: list) -> jax.Array:
        buf = self.bufs[i % 2]
        if i >= 2:
            jax.block_until_ready(parts[i - 2])
        buf[:len(chunk)] = chunk  # numpy's cast to float32 (RNE) where the input is f16/bf16/f64
        buf[len(chunk):] = 0
        return jax.dlpack.from_dlpack(buf)


@partial(jax.jit, static_argnums=0)
def _quantize_tensor(fmt: Format, x: jax.Array) -> dict[str, jax.Array]:
    """A tensor-scope format: one call per matrix (a 1-D tensor is one row); leading axes mapped.
    Importance weights do not apply (they weigh the columns of llama.cpp's row quantizers)."""
    def fn(m):
        return fmt.quantize_rows(m, None)

    for _ in range(x.ndim - 2):
        fn = jax.vmap(fn)
    return fn(x[None] if x.ndim == 1 else x)
