"""Decode kernel family: split-K GEMV on the CUDA cores for a few activation rows (M <= 8).

Each program owns ``block_n`` weight rows and one of ``splits`` slices of K; it walks its slice
``block_b`` blocks at a time, turns the packed fields into exact float terms (``unpack``), and
keeps a ``[block_n, block_b]`` accumulator per activation row so that the only reduction across
threads happens once, at the end. Per-block scales multiply a term's sum, not each weight.
Partial sums of the K-splits are added by XLA.
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
class GemvConfig:
    """Tiling: rows per program, blocks per loop step, K-splits, warps, pipeline stages."""

    block_n: int = 64
    block_b: int = 8
    splits: int = 8
    num_warps: int = 4
    num_stages: int = 2


def default_config(spec: BlockSpec, m: int, n: int, k: int) -> GemvConfig:
    """About 4 KiB of packed weights per row tile and step; enough programs to fill 132 SMs."""
    nb = k // spec.block_size
    block_b = pow2_divisor(nb, max(1, 256 // spec.block_size))
    block_n = pow2_divisor(n, 64)
    splits = 1
    while n // block_n * splits < 1024 and nb % (splits * 2 * block_b) == 0:
        splits *= 2
    return GemvConfig(block_n, block_b, splits)


def _kernel(*refs, spec: BlockSpec, names: tuple[str, ...], m: int, cfg: GemvConfig, steps: int):
    fields = dict(zip(names, refs[:len(names)]))
    x_ref, xs_ref, o_ref = refs[len(names):]
    bn, bb = cfg.block_n, cfg.block_b

    def step(i, acc):
        blocks = pl.ds(pl.multiple_of(i * bb, bb), bb)
        terms = spec.terms(block_loader(fields, slice(None), blocks))
        groups: dict[tuple[int, int], list[int]] = {}  # terms sharing one scale and offset
        for p, t in enumerate(terms):
            groups.setdefault((id(t.scale), id(t.offset)), []).append(p)
        out = []
        for r in range(m):
            a = acc[r]
            for members in groups.values():
                head = terms[members[0]]
                s = sum(jnp.sum(terms[p].q * x_ref[p, r, blocks, :][None], axis=-1) for p in members)
                a = a + head.scale * s
                if head.offset is not None:
                    a = a + head.offset * sum(xs_ref[p, r, blocks] for p in members)[None]
            out.append(a)
        return tuple(out)

    acc = tuple(jnp.zeros((bn, bb), jnp.float32) for _ in range(m))
    acc = lax.fori_loop(0, steps, step, acc) if steps > 1 else step(0, acc)
    for r in range(m):
        o_ref[r, :] = jnp.sum(acc[r], axis=1)


@functools.partial(jax.jit, static_argnames=("spec", "config", "interpret"))
def gemv(x: jax.Array, w: QTensor, spec: BlockSpec, config: GemvConfig | None = None,
         interpret: bool = False) -> jax.Array:
    """``x [M, K] @ dequantize(w).T`` -> ``[M, N]`` float32, for small M."""
    m, k = x.shape
    n = w.shape[0]
    cfg = config or default_config(spec, m, n, k)
    nb = k // spec.block_size
    nbs = nb // cfg.splits
    names, arrays = field_arrays(spec, w)
    xp = permute_x(spec, x, jnp.float32, prescale=True)  # [P, M, nb, c]
    xs = permute_x(spec, x, jnp.float32, prescale=False).sum(-1)  # [P, M, nb]
    p = xp.shape[0]
    call = pl.pallas_call(
        functools.partial(_kernel, spec=spec, names=names, m=m, cfg=cfg, steps=nbs // cfg.block_b),
        grid=(n // cfg.block_n, cfg.splits),
        in_specs=[*field_specs(arrays, cfg.block_n, nbs, lambda j, s: (j, s)),
                  pl.BlockSpec((p, m, nbs, xp.shape[-1]), lambda j, s: (0, 0, s, 0)),
                  pl.BlockSpec((p, m, nbs), lambda j, s: (0, 0, s))],
        out_specs=pl.BlockSpec((None, m, cfg.block_n), lambda j, s: (s, 0, j)),
        out_shape=jax.ShapeDtypeStruct((cfg.splits, m, n), jnp.float32),
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
    )
    out = call(*arrays, xp, xs)
    return out[0] if cfg.splits == 1 else out.sum(0)


def supports(spec: BlockSpec, m: int, n: int, k: int) -> bool:
    """Shapes the default tiling handles well (otherwise qdot falls back to XLA)."""
    return m <= 8 and pow2_divisor(n, 64) >= 16
