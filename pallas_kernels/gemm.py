"""Prefill kernel family: dequantize weight tiles in registers straight into the tensor cores.

Each program owns a ``block_m x block_n`` output tile (and one of ``splits`` K-slices, for
small M). Per loop step it unpacks ``block_b`` blocks of its weight rows into exact float
terms (``unpack``), scales them to float16 (the scale and offset are per block, the rounding
to f16 is the only one) and multiplies each term's ``[block_n, block_b * c]`` tile with the
matching slice of the permuted activations (float16) on the tensor cores, accumulating in f32.
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
from pallas_kernels.common import block_loader, field_arrays, field_specs, permute_x, pow2_divisor
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


def _min_block_b(spec: BlockSpec) -> int:
    """Blocks per step that give each term's dot the K >= 16 a tensor-core dot needs."""
    return max(1, 16 // int(spec.layout[0].shape[1]))


def default_config(spec: BlockSpec, m: int, n: int, k: int) -> GemmConfig:
    nb = k // spec.block_size
    block_m = max(16, min(128, pl.next_power_of_2(m)))
    block_n = pow2_divisor(n, 128)
    block_b = max(_min_block_b(spec), pow2_divisor(nb, max(1, 256 // spec.block_size)))
    splits = 1
    tiles = pl.cdiv(m, block_m) * (n // block_n)
    while tiles * splits < 264 and nb % (splits * 2 * block_b) == 0:
        splits *= 2
    return GemmConfig(block_m, block_n, block_b, splits, num_warps=4 if block_m <= 64 else 8)


def _kernel(*refs, spec: BlockSpec, names: tuple[str, ...], cfg: GemmConfig, steps: int, c: int,
            shifts: tuple[int, ...]):
    fields = dict(zip(names, refs[:len(names)]))
    x_ref, o_ref = refs[len(names):]
    bn, bb = cfg.block_n, cfg.block_b

    def step(i, acc):
        blocks = pl.ds(pl.multiple_of(i * bb, bb), bb)
        cols = pl.ds(pl.multiple_of(i * bb * c, bb * c), bb * c)
        for p, t in enumerate(spec.terms(block_loader(fields, slice(None), blocks))):
            w = t.q * (t.scale * 2.0 ** -shifts[p])[..., None]
            if t.offset is not None:
                w = w + t.offset[..., None]
            w = w.astype(jnp.float16).reshape(bn, bb * c)
            acc = acc + lax.dot_general(x_ref[p, :, cols], w, (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32)
        return acc

    acc = jnp.zeros((cfg.block_m, bn), jnp.float32)
    acc = lax.fori_loop(0, steps, step, acc) if steps > 1 else step(0, acc)
    o_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("spec", "config", "interpret"))
def gemm(x: jax.Array, w: QTensor, spec: BlockSpec, config: GemmConfig | None = None,
         interpret: bool = False) -> jax.Array:
    """``x [M, K] @ dequantize(w).T`` -> ``[M, N]`` float32 (activations rounded to f16)."""
    m, k = x.shape
    n = w.shape[0]
    cfg = config or default_config(spec, m, n, k)
    nb = k // spec.block_size
    nbs = nb // cfg.splits
    mp = pl.cdiv(m, cfg.block_m) * cfg.block_m
    names, arrays = field_arrays(spec, w)
    xp = permute_x(spec, jnp.pad(x, ((0, mp - m), (0, 0))), jnp.float16, prescale=False)
    p, _, _, c = xp.shape
    xp = xp.reshape(p, mp, nb * c)
    call = pl.pallas_call(
        functools.partial(_kernel, spec=spec, names=names, cfg=cfg, steps=nbs // cfg.block_b, c=c,
                          shifts=tuple(int(s) for s in spec.layout[1])),
        grid=(mp // cfg.block_m, n // cfg.block_n, cfg.splits),
        in_specs=[*field_specs(arrays, cfg.block_n, nbs, lambda i, j, s: (j, s)),
                  pl.BlockSpec((p, cfg.block_m, nbs * c), lambda i, j, s: (0, i, s))],
        out_specs=pl.BlockSpec((None, cfg.block_m, cfg.block_n), lambda i, j, s: (s, i, j)),
        out_shape=jax.ShapeDtypeStruct((cfg.splits, mp, n), jnp.float32),
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
    )
    out = call(*arrays, xp)
    out = out[0] if cfg.splits == 1 else out.sum(0)
    return out[:m]


def supports(spec: BlockSpec, m: int, n: int, k: int) -> bool:
    return pow2_divisor(n, 128) >= 16 and (k // spec.block_size) % _min_block_b(spec) == 0
