"""GGUF in and out through gguf-py: lazy, memory-mapped reading and exact writing.

Shapes: gguf-py reports a tensor's ``ne`` (row length first); our logical shape is numpy order
(row length last), ``tuple(reversed(ne))``. Quantized tensors load as QTensors straight from
their block bytes (never through floats), so writing them back reproduces the file's bytes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import mmap
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from jaxquant.errors import FileFormatError, FormatError, JaxquantError
from jaxquant.formats import Format, PlainFormat, get_format
from jaxquant.io.output import atomic_output
from jaxquant.io.source import Deferred, Tensor, TensorInfo
from jaxquant.qtensor import QTensor

SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
HEADER_BYTES = 24  # magic, version, tensor count, kv count
# The fewest bytes one metadata entry (key length, 1-byte key, type, 1-byte value) and one tensor
# info (name length, 1-byte name, n_dims, type, offset) take: counts are checked against the bytes
# left before anything is parsed, so a huge count fails at once instead of after millions of entries.
MIN_KV_BYTES, MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 1, 8 + 1 + 4 + 4 + 8
CHUNK_BYTES = 1 << 24  # tensors load in row chunks of about this size

# GGUF tensor types that are plain numpy arrays with no jaxquant format (64-bit ones stay numpy:
# JAX without x64 would narrow them).
NUMPY_TYPES = {"I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64, "F64": np.float64}

ValueTypes = tuple[GGUFValueType, ...]  # (UINT32,) or (ARRAY, STRING)


class _Reader(gguf.GGUFReader):
    """gguf-py's reader with every read bounded by the file size, metadata arrays read in one
    piece (gguf-py makes numpy views per element: 49 s and 700 MB for Gemma-3's 262k-token
    vocabulary) and tensor infos validated before gguf-py builds its views."""

    def __init__(self, path: Path):
        self.path = path
        super().__init__(path, mode="r")

    def _fail(self, what: str) -> FileFormatError:
        return FileFormatError(f"{self.path}: {what}")

    def _get(self, offset, dtype, count=1, override_order=None):
        offset, count = int(offset), int(count)
        end = offset + np.dtype(dtype).itemsize * count
        if end > self.data.size:
            raise self._fail(f"reading {count} x {np.dtype(dtype).name} at offset {offset} runs past the end "
                             f"of the file ({self.data.size} bytes): truncated file or corrupt length/count field")
        return super()._get(offset, dtype, count, override_order)

    def _value_type(self, raw: int, offset: int) -> GGUFValueType:
        try:
            return GGUFValueType(int(raw))
        except ValueError:
            raise self._fail(f"unknown metadata value type {int(raw)} at offset {offset}") from None

    def _get_field_parts(self, orig_offs, raw_type):
        gtype = self._value_type(raw_type, orig_offs - 4)
        if gtype != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype, alen = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
        itype, n = self._value_type(raw_itype[0], orig_offs), int(alen[0])
        if itype == GGUFValueType.STRING:  # each string is at least its 8-byte length
            self._check_count(n, 8, orig_offs + 12, f"metadata array at offset {orig_offs}: {n} strings")
        if itype == GGUFValueType.ARRAY:
            raise self._fail(f"nested metadata array at offset {orig_offs} (llama.cpp does not support them)")
        if itype != GGUFValueType.STRING:
            values = self._get(orig_offs + 12, self.gguf_scalar_to_np[itype], n)
            return 12 + int(values.nbytes), [raw_itype, alen, values], [2], [gtype, itype]
        # The strings are decoded here into one object array: gguf-py's part per string would cost
        # ~100 bytes each (and fragment the heap) for nothing, as the metadata dict holds the strings.
        values, offs = [], orig_offs + 12
        view, size = memoryview(self.data.view(np.ndarray)), int(self.data.size)
        for _ in range(n):
            if offs + 8 > size:
                self._get(offs, np.uint64)  # raises the truncation error
            end = offs + 8 + struct.unpack_from("<Q", view, offs)[0]
            if end > size:
                self._get(offs + 8, np.uint8, end - offs - 8)
            values.append(_string(view[offs + 8:end]))
            offs = end
        strings = np.empty(len(values), dtype=object)
        strings[:] = values
        return offs - orig_offs, [raw_itype, alen, strings], [2], [gtype, itype]

    def _check_count(self, count: int, min_bytes: int, offset: int, what: str) -> None:
        left = int(self.data.size) - offset
        if count > left // min_bytes:
            raise self._fail(f"{what} need at least {count * min_bytes} bytes from offset {offset}, the file has "
                             f"{left} left: a corrupt count field or a truncated file")

    def _get_tensor_info_field(self, orig_offs):
        # Name and n_dims checked first: a wrong n_dims would shift every field after it.
        name_len = int(self._get(orig_offs, np.uint64)[0])
        if name_len == 0:
            raise self._fail(f"empty tensor name (tensor info at offset {orig_offs})")
        raw_name = bytes(self._get(orig_offs + 8, np.uint8, name_len))
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self._fail(f"tensor name {raw_name!r} at offset {orig_offs + 8} is not valid UTF-8 "
                             f"({e.reason} at byte {e.start})") from None
        n_dims = int(self._get(orig_offs + 8 + name_len, np.uint32)[0])
        if n_dims > MAX_DIMS:
            raise self._fail(f"tensor {name!r} (tensor info at offset {orig_offs}): {n_dims} dimensions at offset "
                             f"{orig_offs + 8 + name_len}, GGUF allows at most {MAX_DIMS}")
        return super()._get_tensor_info_field(orig_offs)

    def _build_fields(self, offs, count):
        self.kv_start = offs
        self._check_count(int(count), MIN_KV_BYTES, offs, f"{int(count)} metadata entries (kv count at offset 16)")
        try:
            self.kv_end = super()._build_fields(offs, count)
        except UnicodeDecodeError as e:  # gguf-py decodes the keys
            last = next(reversed(self.fields.values()))
            raise self._fail(f"metadata key {e.object!r} (the one after {last.name!r} at offset {last.offset}) is "
                             f"not valid UTF-8") from None
        return self.kv_end

    def _build_tensor_info(self, offs, count):
        self._check_count(int(count), MIN_TENSOR_INFO_BYTES, offs, f"{int(count)} tensor infos (tensor count at "
                          "offset 8)")
        offs, fields = super()._build_tensor_info(offs, count)
        self.info_end = offs
        return offs, fields

    def _build_tensors(self, start_offs, fields):
        seen: dict[str, int] = {}
        align = int(self.alignment)  # a numpy uint32 when the file sets it
        expected = 0  # llama.cpp's rule: each tensor's data follows the previous one's, padded to the alignment
        for field in fields:
            _, name_data, _, dims, raw_type, rel = field.parts
            name = bytes(name_data).decode("utf-8")  # checked in _get_tensor_info_field
            if name in seen:
                raise self._fail(f"duplicate tensor name {name!r} (tensor infos at offsets {seen[name]} and "
                                 f"{field.offset})")
            seen[name] = field.offset
            where = f"tensor {name!r} (tensor info at offset {field.offset})"
            type_offset = field.offset + 8 + len(name_data) + 4 + 8 * len(dims)
            try:
                ggml_type = GGMLQuantizationType(int(raw_type[0]))
            except ValueError:
                raise self._fail(f"{where}: unknown type id {int(raw_type[0])} at offset {type_offset}") from None
            ne = [int(d) for d in dims]
            block, type_size = GGML_QUANT_SIZES[ggml_type]
            if any(d >= 2**63 for d in ne) or math.prod(ne) >= 2**63:
                raise self._fail(f"{where}: dimensions {ne} overflow int64")
            if (ne[0] if ne else 1) % block:
                raise self._fail(f"{where}: row length {ne[0] if ne else 1} is not a multiple of the {ggml_type.name} "
                                 f"block size {block}")
            start, nbytes = start_offs + int(rel[0]), math.prod(ne) // block * type_size
            if int(rel[0]) % align:
                raise self._fail(f"{where}: data offset {int(rel[0])} is not a multiple of the alignment {align}")
            if int(rel[0]) != expected:
                raise self._fail(f"{where}: data offset {int(rel[0])}, expected {expected}: tensor data must follow "
                                 f"in tensor-info order, each padded to the alignment {align} (as llama.cpp "
                                 "requires); a wrong general.alignment or a corrupt offset")
            if start + nbytes > self.data.size:
                raise self._fail(f"{where}: data [{start}, {start + nbytes}) of {ggml_type.name} "
                                 f"{tuple(reversed(ne))} runs past the end of the file ({self.data.size} bytes)")
            expected += -(-nbytes // align) * align
            end = start + nbytes
        # What lies around the data is zero padding (as llama.cpp and gguf-py write it): a wrong
        # general.alignment moves where the data starts, and then it is not.
        end = start_offs if not fields else end
        if self.data[self.info_end:min(start_offs, self.data.size)].any():
            raise self._fail(f"the padding before the tensor data [{self.info_end}, {start_offs}) is not zero: the "
                             f"data does not start where the alignment {align} puts it (a wrong general.alignment?)")
        tail = self.data[min(end, self.data.size):]
        if tail.size >= align or tail.any():
            raise self._fail(f"{tail.size} bytes after the last tensor's data (offset {end}) where at most {align - 1} "
                             f"zero bytes of padding belong: a wrong general.alignment or extra data")
        super()._build_tensors(start_offs, fields)


def _aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised array on a 64-byte boundary: jax.device_put adopts such a host buffer on CPU
    instead of copying it."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    buf = np.empty(nbytes + 64, np.uint8)
    off = -buf.ctypes.data % 64
    return buf[off:off + nbytes].view(dtype).reshape(shape)


def _string(raw) -> str | bytes:
    """A metadata string (from any buffer); bytes when it is not UTF-8, so that writing it back
    stays exact."""
    try:
        return str(raw, "utf-8")
    except UnicodeDecodeError:
        return bytes(raw)


def _open_reader(path: Path) -> _Reader:
    if path.exists() and not path.is_file():  # opening a FIFO would wait for a writer forever
        raise FileFormatError(f"{path}: not a regular file (a directory, FIFO or device); give a GGUF file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise FileFormatError(f"{path}: cannot open ({e.strerror})") from None
    if len(head) < 8:
        raise FileFormatError(f"{path}: truncated: {len(head)} bytes, a GGUF header needs at least {HEADER_BYTES}")
    if head[:4] != b"GGUF":
        raise FileFormatError(f"{path}: wrong magic {head[:4]!r} at offset 0, expected b'GGUF' (not a GGUF file)")
    version = int.from_bytes(head[4:8], "little")
    if version & 0xFFFF == 0 and version:
        raise FileFormatError(f"{path}: big-endian GGUF (version field {head[4:8].hex()} at offset 4) is not supported")
    if version not in SUPPORTED_VERSIONS:
        raise FileFormatError(f"{path}: unsupported GGUF version {version} at offset 4 "
                              f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
    try:
        return _Reader(path)
    except JaxquantError:
        raise
    except (ValueError, KeyError, IndexError, OverflowError, TypeError, UnicodeDecodeError, struct.error) as e:
        raise FileFormatError(f"{path}: invalid GGUF: {e}") from None


class GGUFSource:
    """A GGUF file, memory-mapped: metadata and tensor infos at once, tensor data on ``load``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._reader = _open_reader(self.path)
        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, ValueTypes] = {}
        for key, field in self._reader.fields.items():
            if key.startswith("GGUF."):  # version and counts, not metadata
                continue
            self.metadata[key] = _field_value(field)
            self.value_types[key] = tuple(field.types)
        self._reader.fields.clear()  # the metadata dict holds the values now
        self._tensors = {t.name: t for t in self._reader.tensors}
        with open(self.path, "rb") as f:  # our own map of the data, so that pages can be dropped after a load
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    @property
    def alignment(self) -> int:
        return int(self._reader.alignment)

    @property
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        t = self._tensor(name)
        return TensorInfo(name, tuple(int(d) for d in reversed(t.shape)), t.tensor_type.name, int(t.n_bytes))

    def offset(self, name: str) -> int:
        """Absolute file offset of the tensor's data."""
        return int(self._tensor(name).data_offset)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes in the file (uint8, a read-only view of the memory map)."""
        t = self._tensor(name)
        return np.frombuffer(self._map, np.uint8, int(t.n_bytes), int(t.data_offset))

    def load(self, name: str) -> Tensor:
        """The tensor as a QTensor (quantized types), a jax array (F32/F16/BF16) or, for the integer
        and F64 types, a numpy array. Nothing is dequantized.

        The layout is ``Format.from_bytes``'s (the block struct's fields, planar), built here in row
        chunks straight from the memory map into 64-byte-aligned buffers that jax adopts without a
        copy, each chunk's file pages dropped once copied: loading costs the tensor's size once.
        (from_bytes holds the bytes, a numpy copy and a jax copy at once: the Gemma GGUF then peaks
        at 1.3-1.7x its size instead of 1.2x.)"""
        info = self.info(name)
        fmt = None if info.type in NUMPY_TYPES else self._format(info)
        rows = math.prod(info.shape[:-1])
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[info.type]]
        row_bytes = (info.shape[-1] if info.shape else 1) // block * type_size  # also when there are no rows
        by_row = self.raw(name).reshape(rows, row_bytes)
        if isinstance(fmt, Format):
            blocks = by_row.view(fmt.block_dtype)
            views = {f.name: blocks[f.name] for f in fmt.fields}
        else:
            views = {"": by_row.view(NUMPY_TYPES[info.type] if fmt is None else jnp.dtype(fmt.dtype))}
        bufs = {key: _aligned_empty(v.shape, v.dtype) for key, v in views.items()}
        step, start = max(1, CHUNK_BYTES // max(row_bytes, 1)), self.offset(name)
        for r in range(0, rows, step):
            for key, v in views.items():
                bufs[key][r:r + step] = v[r:r + step]
            self._release(start + r * row_bytes, min(step, rows - r) * row_bytes)
        if fmt is None:
            return bufs[""].reshape(info.shape)
        if not isinstance(fmt, Format):
            return jax.device_put(bufs[""].reshape(info.shape))
        return QTensor({key: jax.device_put(b.reshape(*info.shape[:-1], *b.shape[1:])) for key, b in bufs.items()},
                       fmt.name, info.shape)

    def _format(self, info: TensorInfo) -> Format | PlainFormat:
        try:
            fmt = get_format(info.type)
        except FormatError:
            fmt = None
        if fmt is None or not fmt.gguf:  # e.g. GGML's NVFP4 (blocks of 64) is not jaxquant's NVFP4 (blocks of 16)
            raise FormatError(f"{self.path}: tensor {info.name!r} has GGML type {info.type} (id "
                              f"{int(GGMLQuantizationType[info.type])}), which jaxquant cannot load yet (no "
                              "GGUF format of that name is registered)") from None
        return fmt

    def _release(self, start: int, nbytes: int) -> None:
        """Drop the mapped pages of a loaded tensor from this process (they stay in the page cache
        and are read again on the next access), so that loading a model costs its size only once."""
        page = mmap.PAGESIZE
        lo, hi = -(-start // page) * page, (start + nbytes) // page * page
        if hi > lo:
            self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def deferred(self, name: str) -> Deferred:
        """The tensor for ``write_gguf``, read only when written."""
        return Deferred(self.info(name), functools.partial(self.load, name))

    def layout(self) -> dict[str, int]:
        """Where the file's bytes go: header, metadata, tensor infos, padding, tensor data."""
        r = self._reader
        data = sum(int(t.n_bytes) for t in r.tensors)
        size = int(r.data.size)
        return {"header": r.kv_start, "metadata": r.kv_end - r.kv_start, "tensor_info": r.info_end - r.kv_end,
                "padding": size - r.info_end - data, "tensor_data": data, "file": size}

    @functools.cached_property
    def config(self):
        from jaxquant.config import ModelConfig

        try:
            return ModelConfig.from_gguf(self.metadata, self.tensor_names)
        except JaxquantError as e:
            raise type(e)(f"{self.path}: {e}") from None

    @functools.cached_property
    def tokenizer(self):
        from jaxquant.io import tokenizer

        return tokenizer.from_gguf(self.metadata)

    def _tensor(self, name: str) -> gguf.ReaderTensor:
        t = self._tensors.get(name)
        if t is None:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        return t

    def __repr__(self) -> str:
        return f"GGUFSource({str(self.path)!r}, {len(self._tensors)} tensors)"


def _field_value(field: gguf.ReaderField) -> Any:
    if field.types[0] == GGUFValueType.STRING:
        return _string(field.parts[-1])
    if field.types[0] == GGUFValueType.ARRAY:
        return field.parts[field.data[0]].tolist()
    return field.parts[-1].tolist()[0]


# ---- writing ------------------------------------------------------------------------------------

_ARRAY_TYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(jnp.bfloat16): "BF16",
                **{np.dtype(v): k for k, v in NUMPY_TYPES.items()}}


def tensor_info(name: str, value: Tensor | Deferred) -> TensorInfo:
    """Shape, GGML type and byte size of a tensor about to be written."""
    if isinstance(value, Deferred):
        return dataclasses.replace(value.info, name=name)
    if isinstance(value, QTensor):
        return TensorInfo(name, value.shape, value.fmt, value.nbytes)
    dt = np.dtype(value.dtype)
    if dt not in _ARRAY_TYPES:
        raise FormatError(f"tensor {name!r}: dtype {dt} has no GGUF type; quantize it or cast it to "
                          "float32/float16/bfloat16")
    return TensorInfo(name, tuple(value.shape), _ARRAY_TYPES[dt], int(np.prod(value.shape)) * dt.itemsize)


def tensor_bytes(value: Tensor) -> np.ndarray:
    """The GGUF data bytes of a QTensor or array (uint8)."""
    if isinstance(value, QTensor):
        return get_format(value.fmt).to_bytes(value).reshape(-1)
    return np.ascontiguousarray(np.asarray(value)).reshape(-1).view(np.uint8)


def infer_value_types(value: Any) -> ValueTypes:
    """GGUF value type for a python value: ints as UINT32 where they fit (llama.cpp's usual type),
    arrays of ints as INT32 where they fit, floats as FLOAT32."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return (GGUFValueType.BOOL,)
    if isinstance(value, int):
        for t, lo, hi in ((GGUFValueType.UINT32, 0, 2**32), (GGUFValueType.INT32, -2**31, 2**31),
                          (GGUFValueType.INT64, -2**63, 2**63), (GGUFValueType.UINT64, 0, 2**64)):
            if lo <= value < hi:
                return (t,)
        raise FormatError(f"integer {value} does not fit any GGUF type")
    if isinstance(value, float):
        return (GGUFValueType.FLOAT32,)
    if isinstance(value, (str, bytes)):
        return (GGUFValueType.STRING,)
    if isinstance(value, (list, tuple)):
        if not value:
            raise FormatError("cannot infer the element type of an empty array; pass its value type")
        kinds = {infer_value_types(v)[0] for v in value}
        if kinds <= {GGUFValueType.UINT32, GGUFValueType.INT32}:
            return (GGUFValueType.ARRAY, GGUFValueType.INT32 if all(-2**31 <= v < 2**31 for v in value)
                    else GGUFValueType.INT64)
        if len(kinds) != 1:
            raise FormatError(f"array mixes value types {sorted(k.name for k in kinds)}")
        return (GGUFValueType.ARRAY, kinds.pop())
    raise FormatError(f"value {value!r} of type {type(value).__name__} has no GGUF type")


def write_gguf(path: str | os.PathLike, metadata: Mapping[str, Any], tensors: Mapping[str, Tensor | Deferred],
               value_types: Mapping[str, ValueTypes] | None = None) -> None:
    """Write a GGUF file with gguf-py's writer: ``metadata`` in order (``value_types`` gives each
    key's GGUF type, e.g. ``GGUFSource.value_types``; missing ones are inferred), then the tensors
    in order. ``Deferred`` tensors are loaded while writing, the next one while one is written, so
    a model streams through with about two tensors in memory. The file appears atomically at
    ``path``: an error or a kill on the way leaves nothing (``jaxquant.io.output.atomic_output``)."""
    path = Path(path)
    value_types = value_types or {}
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise FormatError("GGUF metadata needs a string 'general.architecture'")
    infos = [tensor_info(name, value) for name, value in tensors.items()]
    for info in infos:
        if info.type not in GGMLQuantizationType.__members__:
            raise FormatError(f"tensor {info.name!r}: format {info.type} has no GGML type, so it cannot go into a "
                              "GGUF file; save an orbax checkpoint instead (jaxquant quantize SRC DIR) or pick "
                              "GGUF formats")
    with atomic_output(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.kv_data[0].clear()  # the constructor adds general.architecture; keep the caller's order
        try:
            _write(writer, tmp, metadata, value_types, infos, tensors)
        finally:
            writer.close()


def _write(writer: gguf.GGUFWriter, tmp: str, metadata: Mapping[str, Any], value_types: Mapping[str, ValueTypes],
           infos: list[TensorInfo], tensors: Mapping[str, Tensor | Deferred]) -> None:
    for key, value in metadata.items():
        vt = value_types.get(key) or infer_value_types(value)
        if vt[0] == GGUFValueType.ARRAY and not len(value):
            raise FormatError(f"metadata key {key!r}: gguf-py cannot write an empty array")
        writer.add_key_value(key, list(value) if vt[0] == GGUFValueType.ARRAY else value, vt[0],
                             vt[1] if len(vt) > 1 else None)
    if "general.alignment" in metadata:
        alignment = int(metadata["general.alignment"])
        if alignment <= 0 or alignment & (alignment - 1):
            raise FormatError(f"general.alignment {alignment} is not a power of two")
        writer.data_alignment = alignment
    for info in infos:
        qtype = GGMLQuantizationType[info.type]
        block, type_size = GGML_QUANT_SIZES[qtype]
        byte_shape = (*info.shape[:-1], info.shape[-1] // block * type_size)
        writer.add_tensor_info(info.name, byte_shape, np.dtype(np.uint8), info.nbytes, raw_dtype=qtype)
    writer.write_header_to_file(tmp)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()

    def load(info: TensorInfo, value: Tensor | Deferred) -> Tensor:
        if isinstance(value, Deferred):
            value = value.load()
            got = tensor_info(info.name, value)
            if got != info:
                raise FormatError(f"tensor {info.name!r}: loaded as {got.type} {got.shape} ({got.nbytes} bytes), "
                                  f"its info says {info.type} {info.shape} ({info.nbytes} bytes)")
        return value

    # The next tensor loads (reads, quantizes on the device) while this one is packed and written.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gguf-load") as pool:
        items = list(zip(infos, tensors.values()))
        pending = pool.submit(load, *items[0]) if items else None
        for i in range(len(items)):
            value = pending.result()
            pending = pool.submit(load, *items[i + 1]) if i + 1 < len(items) else None
            writer.write_tensor_data(tensor_bytes(value))
