"""Tensor parallelism on ``jax.sharding``: how each tensor of a model splits over a mesh axis.

The Megatron layout, decided per tensor by ``spec`` (tp = the mesh's size along its axis):

- column-parallel, rows (output features) split: ``attn_q``, ``attn_k``, ``attn_v`` and their
  biases by whole heads, ``ffn_gate`` and ``ffn_up``; the KV cache by KV heads (``cache_sharding``);
- row-parallel, the input dimension split (a QTensor's axis 1, whole blocks): ``attn_output`` and
  ``ffn_down``, whose partial products ``ops.qdot`` sums with one ``psum`` per matmul;
- by vocabulary rows: ``token_embd`` and ``output``;
- replicated: norms, ``rope_freqs``, ``attn_output_bias``, and any tensor whose split would not
  fall on whole heads, whole blocks or equal parts (e.g. KV heads fewer than devices).

Only the weights carry shardings; JAX's partitioner (Shardy) carries them through the model's
plain ``jnp`` code, and ``ops.qdot`` runs each quantized product (the Pallas kernels on GPU) on
each device's shards. Stacked projections are kept apart on a mesh: ``attn_qkv`` (Phi-3 files,
``models.fuse_projections``) becomes ``attn_q``/``attn_k``/``attn_v`` and ``ffn_up`` holding
gate and up rows becomes ``ffn_gate`` + ``ffn_up`` (``unfuse``). Split naively by rows a stacked
``attn_qkv`` would put all of q on the first devices; kept apart, each device holds its heads of
q, k and v, at the price of three kernel launches instead of one per layer at decode.

Mesh axes are used as ``Auto`` (partitioner-propagated) whatever the mesh says: with
``Explicit`` axes (``jax.make_mesh``'s default) the model's einsums would need an output
sharding at every contraction over a split dimension.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxquant.config import ModelConfig
from jaxquant.errors import JaxquantError
from jaxquant.models.base import Layer, Params, Weight
from jaxquant.ops import splittable
from jaxquant.qtensor import QTensor, take_rows

AXIS = "tp"  # the tensor-parallel axis of a mesh with several axes
COLUMN = ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up")
ROW = ("attn_output", "ffn_down")
VOCAB = ("token_embd", "output")


def auto_mesh(mesh: Mesh) -> tuple[Mesh, str]:
    """``mesh`` with Auto axes, and its tensor-parallel axis: its only axis, or the one named ``AXIS``."""
    if not isinstance(mesh, Mesh):
        raise JaxquantError(f"mesh must be a jax.sharding.Mesh, not {type(mesh).__name__}")
    names = mesh.axis_names
    if len(names) != 1 and AXIS not in names:
        raise JaxquantError(f"mesh axes {names}: a mesh of several axes needs one named {AXIS!r}, the tensor-parallel "
                            "one (the others hold replicas)")
    axis = names[0] if len(names) == 1 else AXIS
    return Mesh(mesh.devices, names, axis_types=(AxisType.Auto,) * len(names)), axis


def spec(field: str, shape: tuple[int, ...], cfg: ModelConfig, tp: int, axis: str,
         blocks: int | None = None) -> PartitionSpec:
    """The logical partition of one model tensor: ``field`` (a ``Layer``/``Params`` field name),
    its logical shape, and for a row-parallel QTensor its blocks per row (None: plain, any column
    split is whole). Stacked fields (``attn_qkv``, ``attn_qk``, a gate+up ``ffn_up``) split by plain rows here;
    ``unfuse`` regroups them."""
    if tp == 1:
        return PartitionSpec()
    name = field.removesuffix("_bias")
    heads = {"attn_q": cfg.n_heads, "attn_k": cfg.n_kv_heads, "attn_v": cfg.n_kv_heads}
    if field in COLUMN + VOCAB + ("attn_qkv", "attn_qk") or (field.endswith("_bias") and name in heads):
        rows_ok = shape[0] % tp == 0 and (name not in heads or heads[name] % tp == 0)
        return PartitionSpec(axis) if rows_ok else PartitionSpec()
    if field in ROW:
        k = shape[1]
        units = cfg.n_heads if field == "attn_output" else k  # whole heads of attn_output's input
        cols_ok = units % tp == 0 and k % tp == 0 and (blocks is None or blocks % tp == 0)
        return PartitionSpec(None, axis) if cols_ok else PartitionSpec()
    return PartitionSpec()


def shardings(x, p: PartitionSpec, mesh: Mesh):
    """Where ``x`` (array, QTensor, or their ``jax.eval_shape``) goes when ``p`` partitions its
    logical shape: a NamedSharding, or a QTensor of them. A QTensor's ``(N, blocks[, count])``
    arrays take the partition as it is (rows, then blocks); per-tensor fields stay whole on every
    device, and formats whose blocks span rows are replicated."""
    if not isinstance(x, QTensor):
        return NamedSharding(mesh, p if len(x.shape) >= len(p) else PartitionSpec())
    layouts = {f.name: f.layout for f in x.format.fields}
    if len(p) > 1 and not splittable(x) or "mixed" in layouts.values():
        p = PartitionSpec()
    return QTensor({k: NamedSharding(mesh, p if layouts.get(k, "rows") == "rows" else PartitionSpec())
                    for k in x.arrays}, x.fmt, x.shape, x.dtype)


def place(x, p: PartitionSpec, mesh: Mesh):
    """``x`` (array or QTensor) put on ``mesh`` by ``shardings``."""
    return jax.device_put(x, shardings(x, p, mesh))


def target(field: str, x, cfg: ModelConfig, mesh: Mesh):
    """Where the plan puts tensor ``x`` (or its ``jax.eval_shape``) of ``field``: ``shardings`` of
    its ``spec``. Lets a tensor be created in place, e.g. ``jax.jit(make, out_shardings=...)``."""
    mesh, axis = auto_mesh(mesh)
    blocks = x.arrays[next(iter(x.arrays))].shape[1] if isinstance(x, QTensor) and x.ndim == 2 else None
    return shardings(x, spec(field, tuple(x.shape), cfg, mesh.shape[axis], axis, blocks), mesh)


def placer(cfg: ModelConfig, mesh: Mesh):
    """``(field, tensor) -> tensor`` placed on ``mesh`` by the plan: ``models.load_params``' hook,
    so that each tensor reaches its devices as it is loaded (or requantized), one at a time."""
    return lambda field, x: jax.device_put(x, target(field, x, cfg, mesh))


def shard(params: Params, cfg: ModelConfig, mesh: Mesh) -> Params:
    """Params (loaded anywhere) placed on ``mesh`` by the plan, stacked projections kept apart."""
    put = placer(cfg, mesh)
    fields = {f.name for f in dataclasses.fields(Params)} - {"layers"}
    top = {f: None if getattr(params, f) is None else put(f, getattr(params, f)) for f in fields}
    layers = [Layer(**{f.name: None if getattr(layer, f.name) is None else put(f.name, getattr(layer, f.name))
                       for f in dataclasses.fields(Layer)}) for layer in params.layers]
    return unfuse(Params(layers=layers, **top), cfg, mesh)


def _rows(w: Weight, lo: int, hi: int) -> Weight:
    if isinstance(w, QTensor):
        return take_rows(w, jnp.arange(lo, hi))
    return w[lo:hi]


def unfuse(params: Params, cfg: ModelConfig, mesh: Mesh) -> Params:
    """Stacked ``attn_qkv`` (``attn_qk``) split into q, k, v (q, k) rows and a gate+up ``ffn_up`` into
    ``ffn_gate`` and ``ffn_up``, each placed by the plan (formats whose blocks span rows stay stacked)."""
    put = placer(cfg, mesh)
    nq, nkv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    layers = []
    for layer in params.layers:
        new = {}
        bounds = {"attn_q": (0, nq), "attn_k": (nq, nq + nkv), "attn_v": (nq + nkv, nq + 2 * nkv)}
        for fused, parts in (("attn_qkv", 3), ("attn_qk", 2)):
            w, bias, split = getattr(layer, fused), getattr(layer, f"{fused}_bias"), list(bounds.items())[:parts]
            if w is not None and (not isinstance(w, QTensor) or w.format.separable):
                new.update({f: put(f, _rows(w, lo, hi)) for f, (lo, hi) in split}, **{fused: None})
                if bias is not None:
                    new.update({f"{f}_bias": put(f"{f}_bias", bias[lo:hi]) for f, (lo, hi) in split},
                               **{f"{fused}_bias": None})
        up = layer.ffn_up
        if layer.ffn_gate is None and up is not None and (not isinstance(up, QTensor) or up.format.separable):
            new.update(ffn_gate=put("ffn_gate", _rows(up, 0, cfg.ffn_dim)),
                       ffn_up=put("ffn_up", _rows(up, cfg.ffn_dim, 2 * cfg.ffn_dim)))
        layers.append(dataclasses.replace(layer, **new))
    return dataclasses.replace(params, layers=layers)


def mesh_of(params: Params) -> Mesh | None:
    """The mesh the params are placed on (None: one device)."""
    for leaf in jax.tree.leaves(params):
        s = getattr(leaf, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh.size > 1:
            return s.mesh
    return None


def cache_sharding(params: Params, cfg: ModelConfig) -> NamedSharding | None:
    """The KV cache's sharding for params on a mesh: by KV heads along the mesh axis that splits
    ``attn_k``'s rows (whole heads), else replicated; None for params on one device."""
    mesh = mesh_of(params)
    if mesh is None:
        return None
    k = params.layers[0].attn_k
    k = k.arrays[next(iter(k.arrays))] if isinstance(k, QTensor) else k
    s = getattr(k, "sharding", None)
    axis = s.spec[0] if isinstance(s, NamedSharding) and len(s.spec) else None
    size = int(np.prod([mesh.shape[a] for a in ((axis,) if isinstance(axis, str) else axis or ())]))
    return NamedSharding(mesh, PartitionSpec(None, None, axis if cfg.n_kv_heads % size == 0 else None))


__all__ = ["AXIS", "auto_mesh", "cache_sharding", "mesh_of", "place", "placer", "shard", "shardings", "spec", "target",
           "unfuse"]
