"""Running a model one decoder layer at a time on calibration activations.

Calibration algorithms quantize layer ``i`` from the activations that reach it: the residual
stream ``x [N, T, E]`` of ``N`` calibration chunks of ``T`` tokens, each run from an empty cache.
``LayerRun`` holds what a layer needs besides its tensors (its family's ``block``, rope
frequencies, sliding window); ``forward`` runs a layer over all chunks, ``batch`` of them per step
of a ``lax.map``, and ``inputs`` collects, through the ``qdot`` tap, a statistic of the input of
each named weight (the matrices are recognized by identity while tracing, as the imatrix
collector does). Both are meant to run inside one jitted function per layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import models, ops
from jaxquant.config import ModelConfig
from jaxquant.models import base
from jaxquant.qtensor import QTensor

# Calibration order within a layer (AutoGPTQ's true_sequential): each stage's inputs come from a
# layer whose earlier stages are already quantized.
STAGES = (("attn_q", "attn_k", "attn_v", "attn_qkv"), ("attn_output",), ("ffn_gate", "ffn_up"), ("ffn_down",))
MATRICES = tuple(f for stage in STAGES for f in stage)


def tensor_name(index: int, field: str) -> str:
    """The GGUF name of ``Layer`` field ``field`` of layer ``index`` (``attn_v_bias`` -> ``blk.i.attn_v.bias``)."""
    return f"blk.{index}.{field.removesuffix('_bias')}.{'bias' if field.endswith('_bias') else 'weight'}"


@dataclasses.dataclass(frozen=True)
class LayerRun:
    """Static facts of layer ``index`` of a ``cfg`` model; hashable, so jitted functions take it
    as a static argument (layers of the same kind share their compiled code)."""

    cfg: ModelConfig
    window: int | None
    batch: int

    @property
    def block(self) -> base.Block:
        return models.FAMILIES[self.cfg.arch].block

    def ctx(self, inv_freq: jax.Array, b: int, t: int) -> base.LayerCtx:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        return base.LayerCtx(self.cfg, positions, inv_freq, self.window)

    def cache(self, b: int, t: int, dtype) -> base.KV:
        shape = (b, t, self.cfg.n_kv_heads, self.cfg.head_dim)
        return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)

    def batches(self, x: jax.Array) -> jax.Array:
        """[N, T, E] -> [N / batch, batch, T, E]."""
        return x.reshape(x.shape[0] // self.batch, self.batch, *x.shape[1:])


def layer_run(cfg: ModelConfig, index: int, n: int, batch: int) -> LayerRun:
    """The ``LayerRun`` of layer ``index`` for ``n`` chunks: ``batch`` is cut down to a divisor of ``n``."""
    batch = max(d for d in range(1, min(batch, n) + 1) if n % d == 0)
    return LayerRun(cfg, cfg.sliding_window if cfg.is_swa(index) else None, batch)


def inv_freq(params: models.Params, cfg: ModelConfig, index: int) -> jax.Array:
    """Layer ``index``'s rope frequencies, as ``models.base.hidden_states`` computes them."""
    f = jnp.asarray(base.rope_inv_freq(cfg, index))
    return f / params.rope_freqs if params.rope_freqs is not None else f


def forward(run: LayerRun, layer: base.Layer, x: jax.Array, freqs: jax.Array) -> jax.Array:
    """The layer's output ``[N, T, E]`` for inputs ``x [N, T, E]``."""
    def one(xb):
        b, t = xb.shape[:2]
        return run.block(layer, xb, run.cache(b, t, xb.dtype), run.ctx(freqs, b, t))[0]

    y = jax.lax.map(one, run.batches(x))
    return y.reshape(x.shape)


def inputs(run: LayerRun, layer: base.Layer, x: jax.Array, freqs: jax.Array, fields: tuple[str, ...],
           stat: Callable[[jax.Array], jax.Array], reduce: str = "sum") -> dict[str, jax.Array]:
    """``stat`` of the input ``[b, T, K]`` of each weight in ``fields``, per batch, over all chunks:
    summed (``reduce="sum"``) or stacked along axis 0 (``"stack"``). Weights that share an input
    (q, k, v) share one computation."""
    ids = {id(getattr(layer, f)): f for f in fields}

    def one(xb):
        b, t = xb.shape[:2]
        seen: dict[int, jax.Array] = {}
        out: dict[str, jax.Array] = {}

        def record(xin: jax.Array, w) -> None:
            f = ids.get(id(w))
            if f is not None and f not in out:
                if id(xin) not in seen:
                    seen[id(xin)] = stat(xin)
                out[f] = seen[id(xin)]

        with ops.tap(record):
            run.block(layer, xb, run.cache(b, t, xb.dtype), run.ctx(freqs, b, t))
        return out

    if reduce == "stack":
        return jax.lax.map(one, run.batches(x))
    xs = run.batches(x)
    first = jax.eval_shape(one, xs[0])
    zero = {f: jnp.zeros(s.shape, s.dtype) for f, s in first.items()}
    total, _ = jax.lax.scan(lambda acc, xb: (jax.tree.map(jnp.add, acc, one(xb)), None), zero, xs)
    return total


def matrix_paths(params: models.Params) -> dict[str, tuple]:
    """GGUF tensor name -> path in ``params`` of each matrix (token embeddings, output, layers')."""
    out = {"token_embd.weight": ("token_embd",)}
    if params.output is not None:
        out["output.weight"] = ("output",)
    for i, layer in enumerate(params.layers):
        for f in dataclasses.fields(layer):
            v = getattr(layer, f.name)
            if v is not None and getattr(v, "ndim", 0) == 2:
                out[tensor_name(i, f.name)] = ("layers", i, f.name)
    return out


def get_path(params: models.Params, path: tuple):
    """The leaf at ``path`` (from ``matrix_paths``)."""
    for p in path:
        params = params[p] if isinstance(p, int) else getattr(params, p)
    return params


def with_matrices(params: models.Params, matrices: dict) -> models.Params:
    """``params`` with the matrices named in ``matrices`` (GGUF name -> array or QTensor) replaced."""
    paths = matrix_paths(params)
    layers = [dataclasses.replace(layer, **{paths[n][2]: w for n, w in matrices.items()
                                            if len(paths[n]) == 3 and paths[n][1] == i})
              for i, layer in enumerate(params.layers)]
    top = {paths[n][0]: w for n, w in matrices.items() if len(paths[n]) == 1}
    return dataclasses.replace(params, layers=layers, **top)


def float_layer(layer: base.Layer) -> base.Layer:
    """The layer with every QTensor dequantized to float32 (the float model calibration starts from)."""
    return jax.tree.map(lambda v: v.dequantize(jnp.float32) if isinstance(v, QTensor) else v, layer,
                        is_leaf=lambda v: isinstance(v, QTensor))


def embed(params: models.Params, chunks: np.ndarray, cfg: ModelConfig) -> jax.Array:
    """The first layer's input: the chunks' token embeddings ``[N, T, E]`` (float32)."""
    return jax.jit(base.embed, static_argnums=2)(params, jnp.asarray(chunks), cfg)
