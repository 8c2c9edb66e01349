"""GPTQ (Frantar et al. 2022) as AutoGPTQ's ``GPTQ.fasterquant`` computes it, under ``jax.jit``.

Given a weight ``W [R, K]`` and the Hessian ``H = 2/n * sum x x^T`` of its inputs (``hessian``):
columns whose input is always zero ("dead", ``H[i, i] == 0``) are zeroed and get ``H[i, i] = 1``;
with act order the columns go in order of decreasing ``H[i, i]``; ``H`` is damped by ``percdamp``
times its mean diagonal, inverted through Cholesky, and the upper Cholesky factor ``U`` of the
inverse drives the updates. Columns are quantized one at a time inside blocks of ``block``
columns: each column's error, divided by ``U[i, i]``, is spread over the rest of its block at once
and over the columns after the block lazily, one matrix product per block. A group's parameters
are fitted (``Target.fit``) when its first column comes up, on the weights as they are then:
updated by every earlier block, but not yet by the earlier columns of the current block (AutoGPTQ
reads the full matrix there, which the block's lazy update has not reached yet).

Everything runs in the dtype of ``H`` (float32 for calibration, float64 in the tests against AutoGPTQ).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxquant.calib.layerwise import STAGES, LayerRun, forward, inputs
from jaxquant.calib.targets import Target
from jaxquant.errors import JaxquantError
from jaxquant.formats.numerics import div
from jaxquant.models.base import Layer
from jaxquant.qtensor import QTensor

HIGHEST = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class GPTQResult:
    """``codes [R, K]`` int32 in stored column order (``perm[j]`` is the input column of stored column
    j under act order, else None), the groups' parameters stacked along a new leading axis, and the
    quantized ``values [R, K]`` in input order (the target's values, before packing)."""

    codes: jax.Array
    params: object
    values: jax.Array
    perm: jax.Array | None


def hessian(x: jax.Array) -> jax.Array:
    """``sum x x^T`` over all leading axes of activations ``x [..., K]`` (HIGHEST precision)."""
    x2 = x.reshape(-1, x.shape[-1])
    return jnp.dot(x2.T, x2, precision=HIGHEST)


def inverse_factor(h: jax.Array, percdamp: float, act_order: bool) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(upper Cholesky factor of the damped inverse Hessian, dead columns (bool [K]), act-order
    permutation or None). The factor holds NaN when the damped Hessian is not positive definite."""
    k = h.shape[0]
    diag = jnp.diagonal(h)
    dead = diag == 0
    idx = jnp.arange(k)
    h = h.at[idx, idx].set(jnp.where(dead, 1, diag))
    perm = None
    if act_order:
        perm = jnp.argsort(-jnp.diagonal(h), stable=True)
        h = h[perm][:, perm]
    h = h.at[idx, idx].add(percdamp * div(jnp.sum(jnp.diagonal(h)), k))
    lower = jnp.linalg.cholesky(h)
    hinv = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(k, dtype=h.dtype))
    return jnp.linalg.cholesky(hinv).T, dead, perm


@functools.partial(jax.jit, static_argnames=("target", "block", "percdamp", "act_order"))
def gptq(w: jax.Array, h: jax.Array, target: Target, *, block: int = 128, percdamp: float = 0.01,
         act_order: bool = False) -> GPTQResult:
    """Quantize ``w [R, K]`` given the Hessian ``h [K, K]`` of its inputs (see the module doc)."""
    r, k = w.shape
    g = target.group
    if k % g:
        raise JaxquantError(f"GPTQ: a row of {k} values is not a whole number of groups of {g} ({target.fmt})")
    u, dead, perm = inverse_factor(h, percdamp, act_order)
    w = jnp.where(dead[None, :], 0, w.astype(h.dtype))
    if perm is not None:
        w = w[:, perm]
    p0 = target.fit(w[:, :g])
    state = (w, jnp.zeros((r, k), jnp.int32), jnp.zeros((r, k), w.dtype), p0,
             jax.tree.map(lambda v: jnp.zeros((k // g, *v.shape), v.dtype), p0))

    def run_block(i1, bs: int, state):
        w, codes, values, p, params = state
        w1 = lax.dynamic_slice_in_dim(w, i1, bs, 1)
        u1 = lax.dynamic_slice(u, (i1, i1), (bs, bs))

        def column(i, st):
            w1, e1, codes, values, p, params = st
            c = i1 + i

            def refit(p, params):  # the group's first column: fit on the full matrix as it is now
                p = target.fit(lax.dynamic_slice_in_dim(w, c, g, 1))
                return p, jax.tree.map(lambda a, v: a.at[c // g].set(v), params, p)

            p, params = lax.cond(c % g == 0, refit, lambda p, params: (p, params), p, params)
            x = lax.dynamic_index_in_dim(w1, i, 1, keepdims=False)
            code, q = target.round(x, p, c % g)
            err = div(x - q, u1[i, i])
            w1 = w1 - err[:, None] * u1[i][None, :]  # u1 is upper triangular: columns < i stay
            return (w1, e1.at[:, i].set(err), codes.at[:, c].set(code), values.at[:, c].set(q), p, params)

        e1 = jnp.zeros((r, bs), w.dtype)
        _, e1, codes, values, p, params = lax.fori_loop(0, bs, column, (w1, e1, codes, values, p, params))
        # the lazy update of every later column (earlier ones get exact zeros: u is upper triangular)
        w = w - jnp.dot(e1, lax.dynamic_slice_in_dim(u, i1, bs, 0), precision=HIGHEST)
        return w, codes, values, p, params

    full = k // block
    if full:
        state = lax.fori_loop(0, full, lambda b, s: run_block(b * block, block, s), state)
    if k % block:
        state = run_block(full * block, k % block, state)
    _, codes, values, _, params = state
    if perm is not None:
        values = values[:, jnp.argsort(perm)]
    return GPTQResult(codes, params, values, perm)


def quantize(w: jax.Array, h: jax.Array, target: Target, **kw) -> tuple[QTensor, jax.Array]:
    """``gptq`` packed: (QTensor in the target's format, the quantized values in input order)."""
    res = gptq(w, h, target, **kw)
    return target.pack(res.codes, res.params, res.perm), res.values


jax.tree_util.register_dataclass(GPTQResult, data_fields=["codes", "params", "values", "perm"], meta_fields=[])


@functools.partial(jax.jit, static_argnames=("run", "targets", "block", "percdamp", "act_order"))
def calibrate_layer(run: LayerRun, layer: Layer, x: jax.Array, freqs: jax.Array, targets: tuple[tuple[str, Target], ...],
                    block: int = 128, percdamp: float = 0.01, act_order: bool = False
                    ) -> tuple[dict[str, QTensor], dict[str, jax.Array], jax.Array]:
    """GPTQ of one float layer fed ``x [N, T, E]``, stage by stage (``layerwise.STAGES``): each
    stage's Hessians come from the layer with the earlier stages already quantized. Returns the
    QTensors of the ``targets`` fields, whether each came out finite (a Hessian that is not positive
    definite even after damping gives NaN), and the quantized layer's output (the next layer's input)."""
    tmap, out, ok = dict(targets), {}, {}
    for stage in STAGES:
        fields = tuple(f for f in stage if f in tmap)
        if not fields:
            continue
        hs = inputs(run, layer, x, freqs, fields, lambda xin: hessian(xin.astype(jnp.float32)))
        for f in fields:
            res = gptq(getattr(layer, f), hs[f] * (2 / x.shape[0]), tmap[f], block=block, percdamp=percdamp,
                       act_order=act_order)
            out[f] = tmap[f].pack(res.codes, res.params, res.perm)
            ok[f] = jnp.all(jnp.isfinite(res.values))
            layer = dataclasses.replace(layer, **{f: out[f].dequantize(jnp.float32)})
    return out, ok, forward(run, layer, x, freqs)
