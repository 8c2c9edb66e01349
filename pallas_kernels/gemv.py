"""Decode kernel family: split-K GEMV on the CUDA cores for a few activation rows.

Each program owns ``block_n`` weight rows and one of ``splits`` slices of K; it walks its slice
``block_b`` blocks at a time, turns the packed fields into exact float terms (``unpack``), and
keeps a ``[block_n, block_b]`` accumulator per activation row so that the only reduction across
threads happens once, at the end. Per-block scales multiply a term's sum, not each weight. A
term's activations are a strided slice of the raw ``x`` (its elements are ``first + 4 t``), so
nothing runs before the kernel; the K-splits' partial sums are added by XLA.
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
from pallas_kernels.common import block_loader, field_arrays, field_specs, pow2_divisor, step_blocks
from pallas_kernels.unpack import BlockSpec


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """Tiling: rows per program, blocks per loop step, K-splits, warps, pipeline stages."""

    block_n: int = 64
    block_b: int = 8
    splits: int = 4
    num_warps: int = 4
    num_stages: int = 2


def default_config(spec: BlockSpec, m: int, n: int, k: int) -> GemvConfig:
    """Steps of 256 (legacy) or 1024 (K-quants) elements per row, so each thread holds whole
    16-byte words; the fewest K-splits (any divisor of the block count) giving >= 512 programs."""
    nb = k // spec.block_size
    want_b = max(4, 256 // spec.block_size)
    block_n = pow2_divisor(n, 64)
    fits = [s for s in range(1, nb + 1) if nb % s == 0 and (nb // s) % want_b == 0] or [1]
    splits = next((s for s in fits if n // block_n * s >= 512), fits[-1])
    return GemvConfig(block_n, pow2_divisor(nb // splits, want_b), splits)


def check_config(cfg, n: int, nb: int) -> None:
    """Tilings must cover the matrix exactly (Pallas-Triton blocks are not masked here)."""
    if n % cfg.block_n or nb % cfg.splits or (nb // cfg.splits) % cfg.block_b:
        raise JaxquantError(f"tiling {cfg} does not divide {n} rows x {nb} blocks")


def _kernel(*refs, spec: BlockSpec, names: tuple[str, ...], m: int, cfg: GemvConfig, steps: int):
    fields = dict(zip(names, refs[:len(names)]))
    x_ref, o_ref = refs[len(names):]
    elems, shifts = spec.layout

    def step(i, acc):
        blocks = step_blocks(i, cfg.block_b, steps)
        terms = spec.terms(block_loader(fields, slice(None), blocks))
        groups: dict[tuple[int, int], list[int]] = {}  # terms sharing one scale and offset
        for p, t in enumerate(terms):
            groups.setdefault((id(t.scale), id(t.offset)), []).append(p)
        out = []
        for r in range(m):
            # [1, BB, c]; the row as a size-1 slice (the interpreter rejects ints next to strides)
            xs = [x_ref[pl.ds(r, 1), blocks, pl.ds(int(e[0]), len(e), int(e[1] - e[0]))].astype(jnp.float32)
                  for e in elems]
            a = acc[r]
            for members in groups.values():
                head = terms[members[0]]
                s = sum(jnp.sum(terms[p].q * (xs[p] * float(2.0 ** -int(shifts[p]))), axis=-1) for p in members)
                a = a + head.scale * s
                if head.offset is not None:
                    a = a + head.offset * sum(jnp.sum(xs[p], axis=-1) for p in members)
            out.append(a)
        return tuple(out)

    acc = tuple(jnp.zeros((cfg.block_n, cfg.block_b), jnp.float32) for _ in range(m))
    acc = lax.fori_loop(0, steps, step, acc) if steps > 1 else step(0, acc)
    for r in range(m):
        o_ref[r, :] = jnp.sum(acc[r], axis=1)


@functools.partial(jax.jit, static_argnames=("spec", "config", "interpret"))
def gemv(x: jax.Array, w: QTensor, spec: BlockSpec, config: GemvConfig | None = None,
         interpret: bool = False) -> jax.Array:
    """``x [M, K] @ dequantize(w).T`` -> ``[M, N]`` float32, for small M."""
    m, k = x.shape
    n = w.shape[0]
    nb = k // spec.block_size
    cfg = config or default_config(spec, m, n, k)
    check_config(cfg, n, nb)
    nbs = nb // cfg.splits
    names, arrays = field_arrays(spec, w)
    call = pl.pallas_call(
        functools.partial(_kernel, spec=spec, names=names, m=m, cfg=cfg, steps=nbs // cfg.block_b),
        grid=(n // cfg.block_n, cfg.splits),
        in_specs=[*field_specs(arrays, cfg.block_n, nbs, lambda j, s: (j, s)),
                  pl.BlockSpec((m, nbs, spec.block_size), lambda j, s: (0, s, 0))],
        out_specs=pl.BlockSpec((None, m, cfg.block_n), lambda j, s: (s, 0, j)),
        out_shape=jax.ShapeDtypeStruct((cfg.splits, m, n), jnp.float32),
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="qgemv",
    )
    out = call(*arrays, x.reshape(m, nb, spec.block_size))
    return out[0] if cfg.splits == 1 else out.sum(0)


def supports(spec: BlockSpec, m: int, n: int, k: int) -> bool:
    """Shapes the default tiling handles well (otherwise qdot falls back to XLA)."""
    return pow2_divisor(n, 64) >= 16
