"""Quantized matmul on the tensor cores for decode and small prefill (M <= 256).

Swap-AB: the weights are the MMA's A operand (``BN`` rows of W per program, the M=64 side of a
Hopper ``wgmma``) and the activations its B operand (``block_m`` columns, at least 16), so even
M=1 runs on the tensor cores. Each step decodes ``block_b`` blocks of packed weights straight into
A's register fragment (``tile``: no shuffles, no shared-memory staging of weights, two weights per
half2 instruction), and accumulates ``W_tile @ x_tile.T`` in float32. Split-K over ``splits``
programs fills the GPU when N is small; their partial sums are added by XLA.

Activations are rounded to float16 (after a per-row power-of-two scale that keeps them in range;
exact for bfloat16 inputs of normal magnitude), weights to float16 once.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from jaxquant.errors import JaxquantError
from jaxquant.qtensor import QTensor
from pallas_kernels.tile import (
    Decoder,
    field_arrays,
    field_spec,
    output_scale,
    prepare_activations,
    step_loader,
    step_tiles,
)

NUM_SMS = 132  # H100 / H200


@dataclasses.dataclass(frozen=True)
class QmmConfig:
    """Tiling: weight rows per program, activation columns per program, blocks per step, K-splits,
    warps, pipeline stages."""

    block_n: int = 64
    block_m: int = 16
    block_b: int = 8
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 2


def step_blocks(dec: Decoder, nb: int) -> int | None:
    """Blocks per step: 256 weights (the measured sweet spot), or the fewest the decoder takes."""
    for bb in sorted({max(dec.min_blocks, 256 // dec.block_size), dec.min_blocks}, reverse=True):
        if nb % bb == 0:
            return bb
    return None


def default_config(dec: Decoder, m: int, n: int, k: int) -> QmmConfig:
    """64-row programs over 256-weight steps; the fewest K-splits giving 4 programs per SM."""
    nb = k // dec.block_size
    bb = step_blocks(dec, nb)
    block_m = min(128, max(16, pl.next_power_of_2(m)))
    tiles = (n // 64) * pl.cdiv(m, block_m)
    splits = 1
    while tiles * splits < 4 * NUM_SMS and splits < 16 and nb % (2 * splits * bb) == 0:
        splits *= 2
    return QmmConfig(64, block_m, bb, splits, num_warps=4 if block_m <= 64 else 8)


def supports(dec: Decoder, m: int, n: int, k: int) -> bool:
    return n % 64 == 0 and k % dec.block_size == 0 and step_blocks(dec, k // dec.block_size) is not None


def _kernel(*refs, dec: Decoder, names: tuple[str, ...], cfg: QmmConfig, steps: int, interpret: bool,
            reduce_cols: bool):
    fields = dict(zip(names, refs[:len(names)]))
    x_ref, o_ref = refs[len(names):]
    bk = cfg.block_b * dec.block_size

    def step(i, acc):
        start = pl.multiple_of(i * bk, bk) if steps > 1 else 0
        col = 0
        for w, scale in step_tiles(dec, step_loader(fields, i, steps), cfg.block_b, interpret):
            x = x_ref[:, pl.ds(start + col, w.shape[1])]
            d = lax.dot_general(w, x, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            acc = acc + (d if scale is None else d * scale)
            col += w.shape[1]
        return acc

    acc = jnp.zeros((cfg.block_n, cfg.block_m), jnp.float32)
    acc = lax.fori_loop(0, steps, step, acc) if steps > 1 else step(0, acc)
    # one activation row (the rest zero padding): store only its column
    o_ref[...] = jnp.sum(acc, axis=1, keepdims=True) if reduce_cols else acc


@functools.partial(jax.jit, static_argnames=("dec", "config", "interpret"))
def qmm(x: jax.Array, w: QTensor, dec: Decoder, config: QmmConfig | None = None,
        interpret: bool = False) -> jax.Array:
    """``x [M, K] @ dequantize(w).T`` -> ``[M, N]`` float32."""
    m, k = x.shape
    n = w.shape[0]
    cfg = config or default_config(dec, m, n, k)
    nb = k // dec.block_size
    if n % cfg.block_n or nb % (cfg.splits * cfg.block_b):
        raise JaxquantError(f"qmm tiling {cfg} does not divide {n} rows x {nb} blocks of {dec.fmt}")
    mp = pl.cdiv(m, cfg.block_m) * cfg.block_m
    xp, scale = prepare_activations(x, dec, cfg.block_b, mp)
    names, arrays = field_arrays(dec, w)
    nbs = nb // cfg.splits
    cols = 1 if m == 1 else cfg.block_m
    call = pl.pallas_call(
        functools.partial(_kernel, dec=dec, names=names, cfg=cfg, steps=nbs // cfg.block_b, interpret=interpret,
                          reduce_cols=m == 1),
        grid=(n // cfg.block_n, mp // cfg.block_m, cfg.splits),
        in_specs=[*(field_spec(dec, name, a, cfg.block_n, cfg.splits, lambda j, i, s: (j, s))
                    for name, a in zip(names, arrays)),
                  pl.BlockSpec((cfg.block_m, nbs * dec.block_size), lambda j, i, s: (i, s))],
        out_specs=pl.BlockSpec((None, cfg.block_n, cols), lambda j, i, s: (s, j, i)),
        out_shape=jax.ShapeDtypeStruct((cfg.splits, n, cols if m == 1 else mp), jnp.float32),
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"qmm_{dec.fmt.lower()}",
    )
    y = call(*arrays, xp).sum(0)[:, :m].T
    return y * scale * output_scale(dec, w)
