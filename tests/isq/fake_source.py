"""A model source with names and shapes only (what a policy reads), for policy tests."""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxquant.io.source import TensorInfo


@dataclasses.dataclass
class FakeSource:
    """GGUF-style metadata and tensor shapes; every tensor counts as F32."""

    metadata: dict
    shapes: dict[str, tuple[int, ...]]
    path: str = "fake.gguf"

    @property
    def tensor_names(self) -> list[str]:
        return list(self.shapes)

    def info(self, name: str) -> TensorInfo:
        shape = self.shapes[name]
        return TensorInfo(name, shape, "F32", 4 * int(np.prod(shape)))


def llama_like(n_layer: int = 8, hidden: int = 256, ff: int = 512, tied: bool = False, arch: str = "llama",
               n_head: int = 8, n_head_kv: int = 2) -> FakeSource:
    """A dense Llama-shaped model."""
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (1000, hidden), "output_norm.weight": (hidden,)}
    if not tied:
        shapes["output.weight"] = (1000, hidden)
    for i in range(n_layer):
        p = f"blk.{i}."
        shapes.update({p + "attn_norm.weight": (hidden,), p + "attn_q.weight": (hidden, hidden),
                       p + "attn_k.weight": (hidden // 4, hidden), p + "attn_v.weight": (hidden // 4, hidden),
                       p + "attn_output.weight": (hidden, hidden), p + "ffn_norm.weight": (hidden,),
                       p + "ffn_gate.weight": (ff, hidden), p + "ffn_up.weight": (ff, hidden),
                       p + "ffn_down.weight": (hidden, ff)})
    metadata = {"general.architecture": arch, f"{arch}.block_count": n_layer, f"{arch}.attention.head_count": n_head,
                f"{arch}.attention.head_count_kv": n_head_kv}
    return FakeSource(metadata, shapes)
