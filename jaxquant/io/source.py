"""What every model source (GGUF file, HF checkpoint) exposes: tensor infos and a lazy loader."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Protocol

import jax
import numpy as np

from jaxquant.qtensor import QTensor

Tensor = QTensor | jax.Array | np.ndarray


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """A tensor's description without its data: logical shape (numpy order, row length last),
    GGML type name ('Q4_K', 'F32', 'BF16', ...) and bytes of its packed data."""

    name: str
    shape: tuple[int, ...]
    type: str
    nbytes: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.size if self.size else 0.0


@dataclasses.dataclass(frozen=True)
class Deferred:
    """A tensor to be produced on demand (``load()``), described by ``info`` beforehand; lets a
    writer stream a model one tensor at a time."""

    info: TensorInfo
    load: Callable[[], Tensor]


class Source(Protocol):
    """A model opened by ``jaxquant.io.open_model``."""

    path: Any
    metadata: dict[str, Any]

    @property
    def config(self): ...

    @property
    def tokenizer(self): ...

    @property
    def tensor_names(self) -> list[str]: ...

    def info(self, name: str) -> TensorInfo: ...

    def load(self, name: str) -> Tensor: ...
