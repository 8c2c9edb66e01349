"""Per-tensor quantization error: how far each tensor's quantized values are from the source's.

For every tensor a policy requantizes: relative RMSE ``||W - Q||_F / ||W||_F``, the same weighted
by llama.cpp's importance (imatrix) per input column, ``sum_j imp_j (W - Q)_ij^2 / sum_j imp_j W_ij^2``
under a square root, and bits per weight. The report lists the worst tensors first.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.isq.apply import progress, quantized_source
from jaxquant.qtensor import QTensor


@dataclasses.dataclass(frozen=True)
class TensorError:
    """One tensor's error; ``weighted_rmse`` is None without an imatrix entry for it."""

    name: str
    shape: tuple[int, ...]
    source_type: str
    format: str
    bits_per_weight: float
    rel_rmse: float
    weighted_rmse: float | None

    @property
    def key(self) -> float:
        """What the report sorts by: the imatrix-weighted error when there is one."""
        return self.rel_rmse if self.weighted_rmse is None else self.weighted_rmse


@jax.jit
def _errors(w: jax.Array, q: jax.Array, imp: jax.Array) -> tuple[jax.Array, jax.Array]:
    # w, q [..., K]; imp [K] or [..., 1, K] (ones without an imatrix): both relative RMSEs in one pass.
    d2, w2 = jnp.square(w - q), jnp.square(w)
    return jnp.sqrt(d2.sum() / w2.sum()), jnp.sqrt((d2 * imp).sum() / (w2 * imp).sum())


def _importance(weights: dict[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray | None:
    w = weights.get(name)
    if w is None or w.size != shape[-1] * (shape[-3] if len(shape) >= 3 else 1):
        return None
    return w.reshape(-1, 1, shape[-1]) if len(shape) >= 3 else w.reshape(shape[-1])


def _float(x) -> jax.Array:
    return x.dequantize(jnp.float32) if isinstance(x, QTensor) else jnp.asarray(x, jnp.float32)


def tensor_errors(source, policy, imatrix: Any = None, show_progress: bool | None = None) -> list[TensorError]:
    """Quantize ``source`` by ``policy`` tensor by tensor and measure each requantized tensor
    against the source's values (a quantized source tensor dequantized); worst first."""
    qs = quantized_source(source, policy, imatrix)
    out = []
    with progress(qs, show_progress):
        for c in qs.plan.choices:
            if not c.requantize:
                continue
            w = _float(source.load(c.name))
            q = _float(qs.load(c.name))
            imp = _importance(qs.weights, c.name, c.shape)
            rel, weighted = _errors(w, q, jnp.ones(c.shape[-1]) if imp is None else jnp.asarray(imp, jnp.float32))
            out.append(TensorError(c.name, c.shape, c.source_type, c.format, 8 * c.nbytes / math.prod(c.shape),
                                   float(rel), None if imp is None else float(weighted)))
    return sorted(out, key=lambda e: -e.key)


def format_errors(errors: list[TensorError], top: int | None = None) -> str:
    """A table, worst first: tensor, shape, source -> format, bpw, relative RMSE, weighted RMSE."""
    rows = errors[:top] if top else errors
    width = max([len(e.name) for e in rows] + [6])
    lines = [f"{'tensor':<{width}}  {'shape':<18} {'format':<16} {'bpw':>7} {'rel RMSE':>10} {'imatrix':>10}"]
    for e in rows:
        weighted = "-" if e.weighted_rmse is None else f"{e.weighted_rmse:.5f}"
        lines.append(f"{e.name:<{width}}  {str(list(e.shape)):<18} {e.source_type + '->' + e.format:<16} "
                     f"{e.bits_per_weight:>7.4f} {e.rel_rmse:>10.5f} {weighted:>10}")
    return "\n".join(lines)


__all__ = ["TensorError", "tensor_errors", "format_errors"]
