"""Pre-quantized Hugging Face checkpoints, read straight into QTensors (no float round trip).

``config.json``'s ``quantization_config`` names the method; each quantized linear layer is a group
of tensors under its module name (``...q_proj.qweight``, ``.qzeros``, ``.scales``, ``.g_idx``) that
loads as one QTensor under the canonical name of its weight (``blk.0.attn_q.weight``). Everything
else (embeddings, norms, an unquantized lm_head) loads as in ``HFSource``.

- GPTQ (``quant_method: gptq``): 2/3/4/8 bits, any group size (-1: one group per row), act-order
  (``desc_act`` with ``g_idx``), sym/asym, ``checkpoint_format`` 'gptq' (v1: zeros stored minus
  one) or 'gptq_v2'.
- AWQ (``quant_method: awq``, version 'gemm'): 4 bits, packed along the outputs.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError

from jaxquant.errors import FileFormatError, FormatError
from jaxquant.formats import gptq
from jaxquant.io import hf_names
from jaxquant.io.safetensors import HFSource, _permute, _read_json
from jaxquant.io.source import TensorInfo
from jaxquant.qtensor import QTensor


@dataclasses.dataclass(frozen=True)
class Scheme:
    """How a checkpoint's quantized layers are stored, from its ``quantization_config``."""

    method: str  # 'gptq' | 'awq'
    bits: int
    group_size: int
    parts: tuple[str, ...]  # tensor suffixes of one quantized layer; the first gives the shape
    v1: bool = False  # GPTQ zeros stored minus one

    @classmethod
    def from_config(cls, qc: dict[str, Any], where: Path) -> Scheme:
        method = str(qc.get("quant_method", "")).lower()
        try:
            bits, group = int(qc.get("bits", qc.get("w_bit", 4))), int(qc.get("group_size", qc.get("q_group_size", -1)))
        except (TypeError, ValueError):
            raise FileFormatError(f"{where}: quantization_config has non-integer bits or group_size") from None
        if method == "gptq":
            fmt = str(qc.get("checkpoint_format", "gptq")).lower()
            if fmt not in ("gptq", "gptq_v2"):
                raise FileFormatError(f"{where}: GPTQ checkpoint_format {fmt!r} is not supported "
                                      "(supported: 'gptq', 'gptq_v2')")
            return cls(method, bits, group, ("qweight", "qzeros", "scales", "g_idx"), v1=fmt == "gptq")
        if method == "awq":
            version = str(qc.get("version", "gemm")).lower()
            if version != "gemm":
                raise FileFormatError(f"{where}: AWQ version {version!r} is not supported (supported: 'gemm')")
            if qc.get("zero_point", True) is False:
                raise FileFormatError(f"{where}: AWQ without zero points is not supported")
            return cls(method, bits, group, ("qweight", "qzeros", "scales"))
        raise FileFormatError(f"{where}: quantization method {method!r} is not supported (supported: gptq, awq)")

    def shape(self, qweight_shape: tuple[int, ...]) -> tuple[int, int]:
        """The (N, K) of a layer from its qweight's shape."""
        rows, cols = qweight_shape
        if self.method == "gptq":
            return cols, rows * 32 // self.bits
        return cols * 32 // self.bits, rows


class QuantizedHFSource(HFSource):
    """An ``HFSource`` whose linear layers are stored quantized (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike):
        self._layers: dict[str, dict[str, tuple[str, str]]] = {}  # canonical name -> part -> (shard, HF name)
        self.scheme = Scheme.from_config(_read_json(Path(directory) / "config.json")["quantization_config"],
                                         Path(directory) / "config.json")
        super().__init__(directory)
        for name, parts in self._layers.items():
            missing = [p for p in self.scheme.parts if p not in parts and p != "g_idx"]
            if missing:
                raise FileFormatError(f"{self.path}: quantized layer {parts[next(iter(parts))][1].rpartition('.')[0]!r} "
                                      f"lacks {', '.join(missing)}")
            if "g_idx" in parts and gptq.is_act_order(self._read(*parts["g_idx"]), *self._layer_geometry(name)):
                info = self._infos[name]  # act-order layers carry their column order
                self._infos[name] = dataclasses.replace(info, nbytes=info.nbytes + 4 * info.shape[1])

    def _add(self, hf_name: str, shard: str) -> None:
        module, _, part = hf_name.rpartition(".")
        if part not in self.scheme.parts:
            return super()._add(hf_name, shard)
        where = self.path / shard
        try:
            name = hf_names.canonical_name(self.config.arch, f"{module}.weight")
        except KeyError:
            raise FileFormatError(f"{where}: tensor {hf_name!r} is not part of a {self.config.arch} model") from None
        if name is None:
            return None
        self._layers.setdefault(name, {})[part] = (shard, hf_name)
        if part == self.scheme.parts[0]:
            shape = self.scheme.shape(tuple(int(d) for d in self._open(shard)[0].get_slice(hf_name).get_shape()))
            fmt = gptq.gptq_format(self.scheme.bits, self._group(shape[1]))
            self._where[name] = (shard, hf_name)
            self._infos[name] = TensorInfo(name, shape, fmt.name, shape[0] * fmt.row_bytes(shape[1]))
        return None

    def _group(self, k: int) -> int:
        return k if self.scheme.group_size == -1 else self.scheme.group_size

    def _layer_geometry(self, name: str) -> tuple[int, int]:
        k = self._infos[name].shape[1]
        return k, self._group(k)

    def load(self, name: str):
        """The tensor under its canonical name; quantized layers as QTensors."""
        if name not in self._layers:
            return super().load(name)
        parts = {p: self._read(*where) for p, where in self._layers[name].items()}
        where = f"{self.path}: {self._layers[name][self.scheme.parts[0]][1].rpartition('.')[0]}"
        s = self.scheme
        try:
            if s.method == "gptq":
                q = gptq.from_gptq(parts["qweight"], parts["qzeros"], parts["scales"], parts.get("g_idx"),
                                   bits=s.bits, group_size=s.group_size, v1=s.v1, where=where)
            else:
                q = gptq.from_awq(parts["qweight"], parts["qzeros"], parts["scales"], bits=s.bits,
                                  group_size=s.group_size, where=where)
        except FormatError as e:
            raise FileFormatError(str(e)) from None
        if q.shape != self.info(name).shape:
            raise FileFormatError(f"{where}: loads as {q.shape}, expected {self.info(name).shape}")
        kind = hf_names.transform(self.config.arch, name)
        if kind in ("permute_q", "permute_k"):
            heads = self.config.n_heads if kind == "permute_q" else self.config.n_kv_heads
            q = QTensor({k: a if k == "perm" else jnp.asarray(_permute(np.asarray(a), heads)) for k, a in q.arrays.items()},
                        q.fmt, q.shape, q.dtype)
        return q

    def _read(self, shard: str, hf_name: str) -> np.ndarray:
        try:
            return self._open(shard)[0].get_tensor(hf_name)
        except (SafetensorError, OSError) as e:
            raise FileFormatError(f"{self.path / shard}: cannot read tensor {hf_name!r}: {e}") from None


def open_hf(directory: str | os.PathLike) -> HFSource:
    """An HF checkpoint directory: a ``QuantizedHFSource`` when config.json has a
    ``quantization_config``, else an ``HFSource``."""
    config = _read_json(Path(directory) / "config.json")
    return QuantizedHFSource(directory) if "quantization_config" in config else HFSource(directory)
