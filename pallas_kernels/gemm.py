"""Prefill kernel family: weight tiles dequantized in registers straight into the tensor cores.

Each program owns a ``block_m x block_n`` output tile (and one of ``splits`` K-slices, for
small M). Per loop step it unpacks ``block_b`` blocks of its weight rows into exact float
terms (``unpack``), scales them to float16 (the only rounding of a weight), joins the terms
into one ``[block_n, block_b * block_size]`` tile and multiplies it with the activations
(float16, permuted once in XLA to the tile's element order) on the tensor cores, in f32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from jaxquant.qtensor import QTensor
from pallas_kernels.common import (block_loader, field_arrays, field_specs, joined_x, pow2_divisor, step_blocks,
                                   weight_tile)
from pallas_kernels.gemv import check_config
from pallas_kernels.unpack import BlockSpec


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Tiling: output tile, blocks per loop step, K-splits, warps, pipeline stages."""

    block_m: int = 64
    block_n: int = 128
    block_b: int = 8
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 2


def default_config(spec: BlockSpec, m: int, n: int, k: int) -> GemmConfig:
    """128-element K steps of 128-row weight tiles; K-splits until 2 programs per SM."""
    nb = k // spec.block_size
    block_m = max(16, min(128, pl.next_power_of_2(m)))
    block_n = pow2_divisor(n, 128)
    block_b = pow2_divisor(nb, max(1, 128 // spec.block_size))
    splits = 1
    tiles = pl.cdiv(m, block_m) * (n // block_n)
    while tiles * splits < 264 and nb % (splits * 2 * block_b) == 0:
        splits *= 2
    return GemmConfig(block_m, block_n, block_b, splits, num_warps=4 if block_m <= 64 else 8)


def _kernel(*refs, spec: BlockSpec, names: tuple[str, ...], cfg: GemmConfig, steps: int):
    fields = dict(zip(names, refs[:len(names)]))
    x_ref, o_ref = refs[len(names):]
    bk = cfg.block_b * spec.block_size

    def step(i, acc):
        w = weight_tile(spec, block_loader(fields, slice(None), step_blocks(i, cfg.block_b, steps)), jnp.float16)
        x = x_ref[:, pl.ds(pl.multiple_of(i * bk, bk) if steps > 1 else 0, bk)]
        return acc + lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    acc = jnp.zeros((cfg.block_m, cfg.block_n), jnp.float32)
    acc = lax.fori_loop(0, steps, step, acc) if steps > 1 else step(0, acc)
    o_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("spec", "config", "interpret"))
def gemm(x: jax.Array, w: QTensor, spec: BlockSpec, config: GemmConfig | None = None,
         interpret: bool = False) -> jax.Array:
    """``x [M, K] @ dequantize(w).T`` -> ``[M, N]`` float32 (activations rounded to f16)."""
    m, k = x.shape
    n = w.shape[0]
    cfg = config or default_config(spec, m, n, k)
    check_config(cfg, n, k // spec.block_size)
    nbs = k // spec.block_size // cfg.splits
    mp = pl.cdiv(m, cfg.block_m) * cfg.block_m
    names, arrays = field_arrays(spec, w)
    xp = joined_x(spec, jnp.pad(x, ((0, mp - m), (0, 0))), jnp.float16)
    call = pl.pallas_call(
        functools.partial(_kernel, spec=spec, names=names, cfg=cfg, steps=nbs // cfg.block_b),
        grid=(mp // cfg.block_m, n // cfg.block_n, cfg.splits),
        in_specs=[*field_specs(arrays, cfg.block_n, nbs, lambda i, j, s: (j, s)),
                  pl.BlockSpec((cfg.block_m, nbs * spec.block_size), lambda i, j, s: (i, s))],
        out_specs=pl.BlockSpec((None, cfg.block_m, cfg.block_n), lambda i, j, s: (s, i, j)),
        out_shape=jax.ShapeDtypeStruct((cfg.splits, mp, n), jnp.float32),
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="qgemm",
    )
    out = call(*arrays, xp)
    out = out[0] if cfg.splits == 1 else out.sum(0)
    return out[:m]


def supports(spec: BlockSpec, m: int, n: int, k: int) -> bool:
    return pow2_divisor(n, 128) >= 16
