"""Pre-quantized Hugging Face checkpoints, read straight into QTensors (no float round trip).

``config.json``'s ``quantization_config`` names the method; each quantized linear layer is a group
of tensors under its module name (``...q_proj.qweight``, ``.qzeros``, ``.scales``, ``.g_idx``) that
loads as one QTensor under the canonical name of its weight (``blk.0.attn_q.weight``). Everything
else (embeddings, norms, an unquantized lm_head) loads as in ``HFSource``.

- GPTQ (``quant_method: gptq``): 2/3/4/8 bits, any group size (-1: one group per row), act-order
  (``desc_act`` with ``g_idx``), sym/asym, ``checkpoint_format`` 'gptq' (v1: zeros stored minus
  one) or 'gptq_v2'.
- AWQ (``quant_method: awq``, version 'gemm'): 4 bits, packed along the outputs.
- FP8 (``quant_method: fp8``): float8 e4m3/e5m2 weights with ``weight_scale_inv`` per 128x128
  block or per tensor, as FP8_* formats.
- MLX (mlx-lm's ``quantization``: ``{bits, group_size}`` plus per-module overrides, ``false`` for a
  module left in float): affine ``weight``/``scales``/``biases`` as AFQ formats, embeddings included.
- bitsandbytes (``quant_method: bitsandbytes``): ``load_in_4bit`` NF4/FP4 (blocks of 64, with or
  without ``bnb_4bit_use_double_quant``) as NF4/FP4(_DQ), ``load_in_8bit`` (LLM.int8, ``SCB``) as
  INT8. Part names hold dots (``weight.absmax``, ``weight.quant_state.bitsandbytes__nf4``).

Llama's q/k rows are reordered to llama.cpp's rope order (``_permute_rows``). Double-quantized
absmax blocks of 256 span rows, so such q/k layers load as NF4/FP4 with their absmax dequantized
to float32 exactly as bitsandbytes does before its 4-bit dequantization: the same weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError

from jaxquant.errors import FileFormatError, FormatError
from jaxquant.formats import Format, bnb, get_format, gptq
from jaxquant.io import hf_names
from jaxquant.io.safetensors import DTYPES, HFSource, _permute, _read_json
from jaxquant.io.source import TensorInfo
from jaxquant.qtensor import QTensor

FP8_BLOCK = 128
RAW = ("F8_E4M3", "F8_E5M2")
SEPARABLE = {"NF4_DQ": "NF4", "FP4_DQ": "FP4"}  # what a double-quantized layer loads as when its rows move


class Scheme:
    """How a checkpoint stores its quantized layers: the tensor suffixes of one layer (``parts``,
    which may hold dots; ``primary`` marks a quantized layer and gives its shape) and how they
    become a QTensor."""

    parts: tuple[str, ...] = ()
    primary: str = ""
    optional: tuple[str, ...] = ()

    def split(self, hf_name: str) -> tuple[str, str]:
        """(module, part) of a tensor name: the longest of ``parts`` it ends with, else its last name."""
        for part in sorted(self.parts, key=len, reverse=True):
            if hf_name.endswith("." + part):
                return hf_name[:-len(part) - 1], part
        module, _, part = hf_name.rpartition(".")
        return module, part

    def owns(self, part: str, dtype: str) -> bool:
        """Whether a tensor ``module.part`` of ``dtype`` belongs to a quantized layer."""
        return part in self.parts and not (part == "weight" and dtype in DTYPES)

    def layout(self, module: str, shape: tuple[int, ...], want: tuple[int, ...] | None
               ) -> tuple[tuple[int, int], Format]:
        """The layer's (N, K) and format, from its primary tensor's shape (``want``: the shape
        config.json implies for the weight, None if it does not say)."""
        raise NotImplementedError

    def build(self, module: str, parts: dict[str, np.ndarray], where: str) -> QTensor:
        raise NotImplementedError

    def extra_bytes(self, module: str, k: int, read) -> int:
        """Bytes a layer's QTensor holds beyond its format's per-row fields (``read(part)``)."""
        return 0


def _ints(qc: dict[str, Any], where: Path, *keys: str, default: int) -> int:
    for key in keys:
        if key in qc:
            try:
                return int(qc[key])
            except (TypeError, ValueError):
                raise FileFormatError(f"{where}: quantization setting {key!r} is {qc[key]!r}, not an integer") from None
    return default


@dataclasses.dataclass(frozen=True)
class GPTQ(Scheme):
    """``quant_method: gptq``: qweight packed along K; ``v1``: zeros stored minus one."""

    bits: int = 4
    group_size: int = 128
    v1: bool = True
    parts: tuple[str, ...] = ("qweight", "qzeros", "scales", "g_idx")
    primary: str = "qweight"
    optional: tuple[str, ...] = ("g_idx",)

    def group(self, k: int) -> int:
        return k if self.group_size == -1 else self.group_size

    def layout(self, module, shape, want=None):
        n, k = shape[1], shape[0] * 32 // self.bits
        return (n, k), gptq.gptq_format(self.bits, self.group(k))

    def build(self, module, parts, where):
        return gptq.from_gptq(parts["qweight"], parts["qzeros"], parts["scales"], parts.get("g_idx"),
                              bits=self.bits, group_size=self.group_size, v1=self.v1, where=where)

    def extra_bytes(self, module, k, read):
        g_idx = read("g_idx")  # act-order layers carry their column order
        return 4 * k if g_idx is not None and gptq.is_act_order(g_idx, k, self.group(k)) else 0


@dataclasses.dataclass(frozen=True)
class AWQ(GPTQ):
    """``quant_method: awq`` (GEMM): qweight and qzeros packed along N in AWQ's order."""

    parts: tuple[str, ...] = ("qweight", "qzeros", "scales")
    optional: tuple[str, ...] = ()

    def layout(self, module, shape, want=None):
        n, k = shape[1] * 32 // self.bits, shape[0]
        return (n, k), gptq.gptq_format(self.bits, self.group(k))

    def build(self, module, parts, where):
        return gptq.from_awq(parts["qweight"], parts["qzeros"], parts["scales"], bits=self.bits,
                             group_size=self.group_size, where=where)

    def extra_bytes(self, module, k, read):
        return 0


@dataclasses.dataclass(frozen=True)
class MLX(Scheme):
    """mlx-lm's ``quantization``: affine (AFQ) ``weight`` (uint32), ``scales``, ``biases`` per layer,
    with per-layer ``{bits, group_size}`` overrides keyed by module path."""

    quantization: dict = dataclasses.field(default_factory=dict)
    parts: tuple[str, ...] = ("weight", "scales", "biases")
    primary: str = "weight"

    def settings(self, module: str) -> tuple[int, int]:
        override = self.quantization.get(module)
        qc = override if isinstance(override, dict) else self.quantization
        mode = qc.get("mode", "affine")
        if mode != "affine":
            raise FileFormatError(f"MLX quantization mode {mode!r} of {module!r} is not supported (supported: affine)")
        return int(qc.get("bits", 4)), int(qc.get("group_size", 64))

    def layout(self, module, shape, want=None):
        bits, group = self.settings(module)
        return (shape[0], shape[1] * 32 // bits), get_format(f"AFQ{bits}_G{group}")

    def build(self, module, parts, where):
        bits, group = self.settings(module)
        fmt = get_format(f"AFQ{bits}_G{group}")
        words = np.asarray(parts["weight"]).view(np.uint32)
        n, k = words.shape[0], words.shape[1] * 32 // bits
        arrays = {"q": words.reshape(n, k // group, -1), "scales": parts["scales"], "biases": parts["biases"]}
        for key in ("scales", "biases"):
            if arrays[key].shape != (n, k // group):
                raise FormatError(f"{where}: {key} of shape {arrays[key].shape}, expected {(n, k // group)} "
                                  f"for a [{n}, {k}] weight in groups of {group}")
        return QTensor({key: jnp.asarray(a) for key, a in arrays.items()}, fmt.name, (n, k))


@dataclasses.dataclass(frozen=True)
class FP8(Scheme):
    """``quant_method: fp8`` (transformers' fine-grained FP8): float8 ``weight`` and float32
    ``weight_scale_inv`` per 128x128 block (``weight_block_size``) or per tensor (None)."""

    kind: str = "E4M3"
    blocks: bool = True
    parts: tuple[str, ...] = ("weight", "weight_scale_inv")
    primary: str = "weight"

    def layout(self, module, shape, want=None):
        return (shape[0], shape[1]), get_format(f"FP8_{self.kind}{'_B128' if self.blocks else ''}")

    def build(self, module, parts, where):
        (n, k), fmt = self.layout(module, parts["weight"].shape, None)
        q = parts["weight"].view(jnp.dtype(fmt.fields[0].dtype))
        scale = np.asarray(parts["weight_scale_inv"], np.float32)
        want = (-(-n // FP8_BLOCK), k // FP8_BLOCK) if self.blocks else ()
        if scale.shape != want or (self.blocks and k % FP8_BLOCK):
            raise FormatError(f"{where}: weight_scale_inv of shape {scale.shape}, expected {want} for a [{n}, {k}] "
                              "weight" + (" in 128x128 blocks" if self.blocks else ""))
        return QTensor({"q": jnp.asarray(q), "scale": jnp.asarray(scale)}, fmt.name, (n, k))


@dataclasses.dataclass(frozen=True)
class BNB4(Scheme):
    """``quant_method: bitsandbytes``, ``load_in_4bit``: ``weight`` holds the codes of the flattened
    matrix (uint8 ``[N*K/2, 1]``, two per byte, the even element high), ``weight.absmax`` one float32
    per 64 elements (double quantization: uint8 codes, with ``weight.nested_absmax`` per 256 of them
    and the offset in the JSON ``weight.quant_state.bitsandbytes__<type>``), ``weight.quant_map`` the
    16 values (nested: ``weight.nested_quant_map``, the 8-bit dynamic map)."""

    quant_type: str = "nf4"
    double: bool = False
    primary: str = "weight"

    @property
    def parts(self) -> tuple[str, ...]:
        nested = ("weight.nested_absmax", "weight.nested_quant_map") if self.double else ()
        return ("weight", "weight.absmax", "weight.quant_map", self.state_part, *nested)

    @property
    def state_part(self) -> str:
        return f"weight.quant_state.bitsandbytes__{self.quant_type}"

    def layout(self, module, shape, want=None):
        fmt = get_format(self.quant_type.upper() + ("_DQ" if self.double else ""))
        if want is None or len(want) != 2 or 2 * shape[0] * (shape[1] if len(shape) > 1 else 1) != want[0] * want[1]:
            raise FormatError(f"weight of shape {shape} does not hold the packed 4-bit codes of the {want} weight "
                              "config.json implies (bnb_4bit_quant_storage other than uint8 is not supported)")
        fmt.check_row_length(want)
        return (want[0], want[1]), fmt

    def build(self, module, parts, where):
        state = _bnb_state(parts[self.state_part], where)
        n, k = (int(d) for d in state.get("shape", ()))
        if (state.get("quant_type"), state.get("blocksize")) != (self.quant_type, bnb.BLOCK):
            raise FormatError(f"{where}: bitsandbytes quant_type {state.get('quant_type')!r} in blocks of "
                              f"{state.get('blocksize')}; supported: {self.quant_type!r} (as config.json says) in "
                              f"blocks of {bnb.BLOCK}")
        table = bnb.NF4_TABLE if self.quant_type == "nf4" else bnb.FP4_TABLE
        _check_map(parts["weight.quant_map"], table, "weight.quant_map", where)
        qs = np.asarray(parts["weight"])
        absmax = np.asarray(parts["weight.absmax"])
        nb = n * k // bnb.BLOCK
        if qs.dtype != np.uint8 or qs.size != n * k // 2 or absmax.size != nb:
            raise FormatError(f"{where}: weight {qs.dtype} {qs.shape} / weight.absmax {absmax.shape} do not hold a "
                              f"[{n}, {k}] weight in blocks of {bnb.BLOCK}")
        arrays = {"qs": qs.reshape(n, k // bnb.BLOCK, bnb.BLOCK // 2)}
        if not self.double:
            arrays["absmax"] = absmax.astype(np.float32, copy=False).reshape(n, -1)
        else:
            _check_map(parts["weight.nested_quant_map"], bnb.DYNAMIC_MAP, "weight.nested_quant_map", where)
            absmax2 = np.asarray(parts["weight.nested_absmax"], np.float32)
            if (state.get("nested_blocksize") != bnb.NESTED_BLOCK or absmax.dtype != np.uint8
                    or absmax2.shape != (-(-nb // bnb.NESTED_BLOCK),)):
                raise FormatError(f"{where}: nested absmax {absmax2.shape} in blocks of "
                                  f"{state.get('nested_blocksize')} does not fit {nb} uint8 absmax codes in blocks "
                                  f"of {bnb.NESTED_BLOCK}")
            arrays.update(absmax_q=absmax.reshape(n, -1), absmax2=absmax2,
                          offset=np.float32(state["nested_offset"]))
        fmt = self.layout(module, qs.shape, (n, k))[1]
        # bitsandbytes dequantizes to the model's dtype (the quant state's)
        return QTensor({key: jnp.asarray(a) for key, a in arrays.items()}, fmt.name, (n, k),
                       str(state.get("dtype", "float32")))


@dataclasses.dataclass(frozen=True)
class BNB8(Scheme):
    """``quant_method: bitsandbytes``, ``load_in_8bit`` (LLM.int8): int8 ``weight [N, K]`` and its
    row absmax ``SCB [N]``; ``weight_format`` 0 is the row-major layout (the only one written now)."""

    parts: tuple[str, ...] = ("weight", "SCB", "weight_format")
    primary: str = "weight"
    optional: tuple[str, ...] = ("weight_format",)

    def layout(self, module, shape, want=None):
        return (shape[0], shape[1]), bnb.INT8

    def build(self, module, parts, where):
        q, scb = np.asarray(parts["weight"]), np.asarray(parts["SCB"]).astype(np.float32)
        fmt_code = parts.get("weight_format")
        if fmt_code is not None and int(np.asarray(fmt_code).reshape(-1)[0]) != 0:
            raise FormatError(f"{where}: int8 weight_format {int(np.asarray(fmt_code).reshape(-1)[0])} is not "
                              "supported (supported: 0, row-major)")
        if q.dtype != np.int8 or q.ndim != 2 or scb.shape != q.shape[:1]:
            raise FormatError(f"{where}: int8 weight {q.dtype} {q.shape} with SCB {scb.shape}; expected int8 [N, K] "
                              "and float SCB [N]")
        return QTensor({"q": jnp.asarray(q), "scb": jnp.asarray(scb)}, bnb.INT8.name, q.shape)


def _bnb_state(raw: np.ndarray, where: str) -> dict[str, Any]:
    """bitsandbytes' packed quant state: a JSON object as uint8 bytes."""
    try:
        state = json.loads(np.asarray(raw, np.uint8).tobytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{where}: unreadable bitsandbytes quant_state ({e})") from None
    if not isinstance(state, dict):
        raise FormatError(f"{where}: bitsandbytes quant_state is not a JSON object")
    return state


def _check_map(got: np.ndarray, table: np.ndarray, part: str, where: str) -> None:
    if np.asarray(got).shape != table.shape or not np.array_equal(np.asarray(got, np.float32), table):
        raise FormatError(f"{where}: {part} differs from bitsandbytes' table; custom code maps are not supported")


def scheme_of(config: dict[str, Any], where: Path) -> Scheme:
    """The scheme a config.json describes (mlx-lm's ``quantization`` or HF's ``quantization_config``)."""
    if isinstance(config.get("quantization"), dict):
        return MLX(quantization=config["quantization"])
    qc = config["quantization_config"]
    method = str(qc.get("quant_method", "")).lower()
    bits = _ints(qc, where, "bits", "w_bit", default=4)
    group = _ints(qc, where, "group_size", "q_group_size", default=128)
    if method == "gptq":
        fmt = str(qc.get("checkpoint_format", "gptq")).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise FileFormatError(f"{where}: GPTQ checkpoint_format {fmt!r} is not supported (supported: 'gptq', "
                                  "'gptq_v2')")
        return GPTQ(bits=bits, group_size=group, v1=fmt == "gptq")
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise FileFormatError(f"{where}: AWQ version {version!r} is not supported (supported: 'gemm')")
        if qc.get("zero_point", True) is False:
            raise FileFormatError(f"{where}: AWQ without zero points is not supported")
        return AWQ(bits=bits, group_size=group)
    if method == "fp8":
        kind = {"e4m3": "E4M3", "float8_e4m3fn": "E4M3", "e5m2": "E5M2"}.get(str(qc.get("fmt", "e4m3")).lower())
        block = qc.get("weight_block_size")
        if kind is None or block not in (None, [FP8_BLOCK, FP8_BLOCK]) or qc.get("scale_fmt", "float") != "float":
            raise FileFormatError(f"{where}: FP8 with fmt {qc.get('fmt')!r}, weight_block_size {block!r}, scale_fmt "
                                  f"{qc.get('scale_fmt')!r} is not supported (e4m3/e5m2, 128x128 blocks or per tensor, "
                                  "float32 scales)")
        return FP8(kind=kind, blocks=block is not None)
    if method == "bitsandbytes":
        if qc.get("load_in_8bit"):
            return BNB8()
        quant_type = str(qc.get("bnb_4bit_quant_type", "fp4")).lower()
        storage = str(qc.get("bnb_4bit_quant_storage", "uint8")).lower()
        if not qc.get("load_in_4bit") or quant_type not in ("nf4", "fp4") or storage not in ("uint8", "torch.uint8"):
            raise FileFormatError(f"{where}: bitsandbytes with load_in_4bit {qc.get('load_in_4bit')!r}, quant type "
                                  f"{quant_type!r}, quant storage {storage!r} is not supported (load_in_8bit, or "
                                  "load_in_4bit nf4/fp4 stored as uint8)")
        return BNB4(quant_type=quant_type, double=bool(qc.get("bnb_4bit_use_double_quant", False)))
    raise FileFormatError(f"{where}: quantization method {method!r} is not supported (supported: gptq, awq, fp8, "
                          "bitsandbytes, mlx-lm's 'quantization')")


class QuantizedHFSource(HFSource):
    """An ``HFSource`` whose linear layers are stored quantized (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike):
        self._layers: dict[str, tuple[str, dict[str, tuple[str, str]]]] = {}  # name -> (module, part -> where)
        config = Path(directory) / "config.json"
        self.scheme = scheme_of(_read_json(config), config)
        super().__init__(directory)
        for name, (module, parts) in self._layers.items():
            missing = [p for p in self.scheme.parts if p not in parts and p not in self.scheme.optional]
            if missing:
                raise FileFormatError(f"{self.path}: quantized layer {module!r} lacks {', '.join(missing)}")
            if name in self._infos:
                info = self._infos[name]
                extra = self.scheme.extra_bytes(module, info.shape[1], lambda p: self._part(name, p))
                self._infos[name] = dataclasses.replace(info, nbytes=info.nbytes + extra)

    def _add(self, hf_name: str, shard: str) -> None:
        module, part = self.scheme.split(hf_name)
        handle = self._open(shard)[0]
        if hf_name not in self._open(shard)[1] or not self.scheme.owns(part, handle.get_slice(hf_name).get_dtype()):
            return super()._add(hf_name, shard)
        where = self.path / shard
        try:
            name = hf_names.canonical_name(self.config.arch, f"{module}.weight")
        except KeyError:
            raise FileFormatError(f"{where}: tensor {hf_name!r} is not part of a {self.config.arch} model") from None
        if name is None:
            return None
        self._layers.setdefault(name, (module, {}))[1][part] = (shard, hf_name)
        if part == self.scheme.primary:
            try:
                shape, fmt = self.scheme.layout(module, tuple(int(d) for d in handle.get_slice(hf_name).get_shape()),
                                                self.config.tensor_shape(name))
            except FormatError as e:
                raise FileFormatError(f"{where}: {module}: {e}") from None
            if hf_names.transform(self.config.arch, name) in ("permute_q", "permute_k"):
                fmt = get_format(SEPARABLE.get(fmt.name, fmt.name))
            self._where[name] = (shard, hf_name)
            self._infos[name] = TensorInfo(name, shape, fmt.name, fmt.nbytes(shape))
        return None

    def _part(self, name: str, part: str) -> np.ndarray | None:
        where = self._layers[name][1].get(part)
        return None if where is None else self._read(*where)

    def load(self, name: str):
        """The tensor under its canonical name; quantized layers as QTensors."""
        if name not in self._layers:
            return super().load(name)
        self.info(name)
        module, parts = self._layers[name]
        where = f"{self.path}: {module}"
        try:
            q = self.scheme.build(module, {p: self._read(*w) for p, w in parts.items()}, where)
        except FormatError as e:
            raise FileFormatError(str(e)) from None
        if q.shape != self.info(name).shape:
            raise FileFormatError(f"{where}: loads as {q.shape}, expected {self.info(name).shape}")
        kind = hf_names.transform(self.config.arch, name)
        if kind in ("permute_q", "permute_k"):
            q = _permute_rows(q, self.config.n_heads if kind == "permute_q" else self.config.n_kv_heads, where)
        return q

    def _read(self, shard: str, hf_name: str) -> np.ndarray:
        try:
            handle = self._open(shard)[0]
            if handle.get_slice(hf_name).get_dtype() in RAW:  # dtypes safetensors' numpy side cannot give
                return _raw_tensor(self.path / shard, hf_name)
            return handle.get_tensor(hf_name)
        except (SafetensorError, OSError) as e:
            raise FileFormatError(f"{self.path / shard}: cannot read tensor {hf_name!r}: {e}") from None


def _permute_rows(q: QTensor, n_head: int, where: str, inverse: bool = False) -> QTensor:
    """Llama's q/k row order (``safetensors._permute``; ``inverse``: back to HF's) applied to a
    QTensor: per-row arrays are permuted; per-tensor ones (and GPTQ's column order) kept; FP8's
    128-row scale blocks kept when every row stays in its block (head sizes dividing 128); bnb's
    nested absmax dequantized first."""
    if q.fmt in SEPARABLE:
        q = QTensor({"qs": q.arrays["qs"], "absmax": bnb.dequantize_absmax(q.arrays)}, SEPARABLE[q.fmt], q.shape,
                    q.dtype)
    order = _permute(np.arange(q.shape[0]), n_head, inverse)
    layouts = {f.name: f.layout for f in q.format.fields}
    arrays = {}
    for key, a in q.arrays.items():
        layout = layouts.get(key, "tensor")
        if layout == "mixed" and not (q.fmt.startswith("FP8_") and np.array_equal(order // FP8_BLOCK,
                                                                                 np.arange(len(order)) // FP8_BLOCK)):
            raise FileFormatError(f"{where}: the rope row order of Llama's q/k would move rows across the "
                                  f"blocks of {q.fmt}'s {key!r}; such a checkpoint cannot be loaded")
        arrays[key] = jnp.asarray(np.asarray(a)[order]) if layout == "rows" else a
    return QTensor(arrays, q.fmt, q.shape, q.dtype)


def _raw_tensor(path: Path, name: str) -> np.ndarray:
    """A tensor of one-byte elements, as uint8 of its shape, read through the safetensors header."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    begin, end = header[name]["data_offsets"]
    return np.fromfile(path, np.uint8, count=end - begin, offset=8 + size + begin).reshape(header[name]["shape"])


def open_hf(directory: str | os.PathLike) -> HFSource:
    """An HF checkpoint directory: a ``QuantizedHFSource`` when config.json has a
    ``quantization_config`` (or mlx-lm's ``quantization``), else an ``HFSource``."""
    config = _read_json(Path(directory) / "config.json")
    quantized = "quantization_config" in config or "quantization" in config
    return QuantizedHFSource(directory) if quantized else HFSource(directory)
