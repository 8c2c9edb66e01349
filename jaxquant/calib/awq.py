"""AWQ (Lin et al. 2023) as AutoAWQ 0.2.9's ``AwqQuantizer`` computes it, one jitted call per layer.

Every layer sees the float model's activations. Its matrices fall into scaling groups, each with
the operation before it (AutoAWQ's ``get_layers_for_scaling`` for Llama-like and Gemma layers):
``attn_norm -> q, k, v`` judged on the attention output, ``attn_v -> attn_output`` (only where the
two have the same shape: no GQA), ``ffn_norm -> gate, up`` judged on the FFN output and
``ffn_up -> ffn_down``. For each group, per input channel: ``x_mean`` (mean |x| over tokens) and
``w_mean`` (mean over the group's rows of |w| relative to its quantization group's max); for each
of ``n_grid`` ratios r, ``s = x_mean^r / (w_mean^(1-r) + 1e-4)`` (``duo_scaling``; else
``x_mean^r``), clamped to 1e-4 and divided by ``sqrt(max s * min s)``; the group's weights become
``Q(W * s) / s`` and the ratio with the least mean squared error of the judged output wins (the
first on ties). All searches use the original weights; then the scales are folded: the previous
norm's weight or linear's rows divided by s, the group's columns multiplied. Then the clipping
search (all matrices but q and k): per (row, quantization group), the maximum |w| shrunk by
``1 - i/20`` for i < 10, the one with the least error of the group's partial dot products over
512 sampled tokens of the (scaled) input wins, and the weights are clamped to it.

``Q`` is the target's round-to-nearest: AutoAWQ's ``pseudo_quantize_tensor`` for GPTQ formats
(``IntTarget(style="awq")``), the format's own quantizer for llama.cpp and MLX formats.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxquant.calib.layerwise import MATRICES, LayerRun, forward, inputs
from jaxquant.calib.targets import IntTarget, Target
from jaxquant.errors import JaxquantError
from jaxquant.formats import get_format
from jaxquant.formats.numerics import div
from jaxquant.models import llama
from jaxquant.models.base import Layer

HIGHEST = jax.lax.Precision.HIGHEST
NO_CLIP = ("attn_q", "attn_k")  # AutoAWQ skips them: the q.k product makes clipping them hard to judge
FAMILIES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3")


@dataclasses.dataclass(frozen=True)
class ScaleGroup:
    """Matrices ``fields`` sharing an input whose channels the operation ``prev`` (a norm or a
    linear's rows) can absorb a scale of; ``judge``: whose output the search compares."""

    prev: str
    fields: tuple[str, ...]
    judge: str  # "attention", "ffn" or "linear"


def scale_groups(layer: Layer, arch: str) -> tuple[ScaleGroup, ...]:
    """AutoAWQ's scaling groups of a Llama-like or Gemma layer."""
    if arch not in FAMILIES:
        raise JaxquantError(f"AWQ: no scaling groups for architecture {arch!r}; supported: {', '.join(FAMILIES)}")
    groups = [ScaleGroup("attn_norm", ("attn_q", "attn_k", "attn_v"), "attention")]
    if layer.attn_v.shape == layer.attn_output.shape:
        groups.append(ScaleGroup("attn_v", ("attn_output",), "linear"))
    return (*groups, ScaleGroup("ffn_norm", ("ffn_gate", "ffn_up"), "ffn"), ScaleGroup("ffn_up", ("ffn_down",), "linear"))


def rtn(target: Target | None) -> Callable[[jax.Array], jax.Array]:
    """The search's quantizer ``Q``: quantize and dequantize (identity for a matrix kept in float)."""
    if target is None:
        return lambda w: w
    if isinstance(target, IntTarget):
        return target.values
    fmt = get_format(target.fmt)
    return lambda w: fmt.dequantize_rows(fmt.quantize_rows(w.astype(jnp.float32), None)).reshape(w.shape).astype(
        w.dtype)


def group_size(target: Target | None, k: int) -> int:
    return k if target is None else target.group


def w_mean(ws: list[jax.Array], groups: list[int]) -> jax.Array:
    """Mean over all rows of |w| relative to the max |w| of its quantization group (+1e-6)."""
    parts = []
    for w, g in zip(ws, groups):
        wg = jnp.abs(w.reshape(-1, g))
        parts.append(div(wg, wg.max(1, keepdims=True) + 1e-6).reshape(w.shape))
    ws = jnp.concatenate(parts)
    return div(ws.sum(0), ws.shape[0])


def scale_candidates(x_mean: jax.Array, wm: jax.Array, n_grid: int, duo: bool) -> jax.Array:
    """The ``n_grid`` candidate scale vectors [n_grid, K]."""
    def one(i):
        r = div(i, n_grid)
        s = div(x_mean ** r, wm ** (1 - r) + 1e-4) if duo else x_mean ** r
        s = jnp.maximum(s, 1e-4)
        s = div(s, jnp.sqrt(s.max() * s.min()))
        return jnp.where(jnp.isinf(s) | jnp.isnan(s), 1, s)

    return jax.vmap(one)(jnp.arange(n_grid, dtype=x_mean.dtype))


def search_scale(x: jax.Array, ws: list[jax.Array], quantizers: list, groups: list[int],
                 judge: Callable[[list[jax.Array]], jax.Array], n_grid: int, duo: bool) -> tuple[jax.Array, jax.Array]:
    """(best scales [K], loss per ratio [n_grid]) of one group: ``x`` its input [..., K], ``ws`` its
    weights, ``judge(ws)`` the output compared."""
    x2 = jnp.abs(x).reshape(-1, x.shape[-1])
    x_mean = div(x2.sum(0), x2.shape[0])
    cands = scale_candidates(x_mean, w_mean(ws, groups), n_grid, duo)
    ref = judge(ws)

    def loss(s):
        out = judge([div(q(w * s), s) for w, q in zip(ws, quantizers)])
        return div(jnp.sum((ref - out) ** 2), ref.size)

    losses = jax.lax.map(loss, cands)
    return cands[jnp.argmin(jnp.where(jnp.isnan(losses), jnp.inf, losses))], losses


def search_clip(w: jax.Array, x: jax.Array, quantizer, group: int, n_grid: int = 20, max_shrink: float = 0.5,
                n_tokens: int = 512) -> jax.Array:
    """AutoAWQ's ``_compute_best_clip``: the clipping bound [R, K/group] of ``w [R, K]`` for inputs
    ``x [..., K]`` (every ``n / n_tokens``-th token)."""
    x = x.reshape(-1, x.shape[-1])
    x = x[::max(1, x.shape[0] // n_tokens)]
    r, k = w.shape
    xg, wg = x.reshape(x.shape[0], k // group, group), w.reshape(r, k // group, group)
    org_out = jnp.einsum("tgj,rgj->rtg", xg, wg, precision=HIGHEST)
    org_max = jnp.abs(wg).max(-1)

    def step(state, i):
        best_err, best_max = state
        max_val = org_max * (1 - div(i, n_grid))
        cur = jnp.clip(wg, -max_val[..., None], max_val[..., None])
        q = quantizer(cur.reshape(r, k)).reshape(wg.shape)
        err = div(((jnp.einsum("tgj,rgj->rtg", xg, q, precision=HIGHEST) - org_out) ** 2).sum(1), xg.shape[0])
        better = err < best_err
        return (jnp.where(better, err, best_err), jnp.where(better, max_val, best_max)), None

    steps = jnp.arange(int(max_shrink * n_grid), dtype=w.dtype)
    (_, best), _ = jax.lax.scan(step, (jnp.full_like(org_max, 1e9), org_max), steps)
    return best


def _judge(run: LayerRun, layer: Layer, group: ScaleGroup, x: jax.Array, freqs: jax.Array):
    """``ws -> output`` of what the group's search compares, on inputs ``x [N, T, K]``."""
    def with_weights(ws):
        return dataclasses.replace(layer, **dict(zip(group.fields, ws)))

    if group.judge == "linear":
        return lambda ws: jnp.einsum("ntk,rk->ntr", x, ws[0], precision=HIGHEST)
    if group.judge == "ffn":
        return lambda ws: llama.ffn(with_weights(ws), x, run.cfg)

    def attention(ws):
        lw = with_weights(ws)

        def one(xb):
            b, t = xb.shape[:2]
            return llama.attention(lw, xb, run.cache(b, t, xb.dtype), run.ctx(freqs, b, t))[0]

        return jax.lax.map(one, run.batches(x)).reshape(*x.shape[:-1], -1)

    return attention


@functools.partial(jax.jit, static_argnames=("run", "targets", "n_grid", "duo_scaling", "clip", "clip_tokens"))
def transform_layer(run: LayerRun, layer: Layer, x: jax.Array, freqs: jax.Array,
                    targets: tuple[tuple[str, Target], ...], n_grid: int = 20, duo_scaling: bool = True,
                    clip: bool = True, clip_tokens: int = 512) -> tuple[Layer, dict[str, jax.Array], jax.Array]:
    """AWQ of one float layer fed ``x [N, T, E]``: (the layer with scales folded in and weights
    clipped, the best scales of each group by its ``prev``, the float layer's output)."""
    tmap = dict(targets)
    fields = tuple(f for f in MATRICES if getattr(layer, f) is not None)
    feats = {f: v.reshape(*x.shape[:2], -1)
             for f, v in inputs(run, layer, x, freqs, fields, lambda xin: xin, reduce="stack").items()}
    y = forward(run, layer, x, freqs)
    groups = scale_groups(layer, run.cfg.arch)
    scales = {}
    for g in groups:
        ws = [getattr(layer, f) for f in g.fields]
        scales[g.prev], _ = search_scale(feats[g.fields[0]], ws, [rtn(tmap.get(f)) for f in g.fields],
                                         [group_size(tmap.get(f), w.shape[1]) for f, w in zip(g.fields, ws)],
                                         _judge(run, layer, g, feats[g.fields[0]], freqs), n_grid, duo_scaling)
    for g in groups:  # AutoAWQ's apply_scale, in the same order
        s = scales[g.prev]
        prev = getattr(layer, g.prev)
        new = {g.prev: div(prev, s) if prev.ndim == 1 else prev.at[-s.shape[0]:].set(div(prev[-s.shape[0]:], s[:, None]))}
        bias = getattr(layer, f"{g.prev}_bias", None) if prev.ndim == 2 else None
        if bias is not None:
            new[f"{g.prev}_bias"] = div(bias, s)
        new.update({f: getattr(layer, f) * s for f in g.fields})
        layer = dataclasses.replace(layer, **new)
        feats.update({f: div(feats[f], s) for f in g.fields})
    if clip:
        for f in fields:
            if f in NO_CLIP or f not in tmap:
                continue
            w = getattr(layer, f)
            t = tmap[f]
            bound = search_clip(w, feats[f], rtn(t), t.group, n_tokens=clip_tokens)
            wg = w.reshape(*bound.shape, -1)
            layer = dataclasses.replace(layer, **{f: jnp.clip(wg, -bound[..., None], bound[..., None]).reshape(w.shape)})
    return layer, scales, y


def calibrate_layer(run: LayerRun, layer: Layer, x: jax.Array, freqs: jax.Array,
                    targets: tuple[tuple[str, Target], ...], calib) -> tuple[dict[str, jax.Array], jax.Array]:
    """AWQ of one layer for ``calibrate``: the changed tensors by field (float weights and norms;
    QTensors for GPTQ formats, which ISQ cannot quantize) and the next layer's input."""
    new, _, y = transform_layer(run, layer, x, freqs, targets, calib.n_grid, calib.duo_scaling, calib.clip,
                                calib.clip_tokens)
    out = {}
    for f in (*MATRICES, "attn_norm", "ffn_norm", "attn_v_bias"):
        v = getattr(new, f, None)
        if v is None:
            continue
        t = dict(targets).get(f)
        out[f] = t.pack(*t.rtn(v)) if isinstance(t, IntTarget) else v
    return out, y


__all__ = ["ScaleGroup", "calibrate_layer", "scale_groups", "search_clip", "search_scale", "transform_layer"]
