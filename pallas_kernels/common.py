"""Plumbing shared by the kernel families: field views, activation permutation, tiling helpers."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from jaxquant.qtensor import QTensor
from pallas_kernels.unpack import BlockSpec, Loader

# JAX >= 0.11 warns at every lowering of a Triton kernel; registry.py says why we use it anyway.
warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*", category=DeprecationWarning)


def field_arrays(spec: BlockSpec, w: QTensor) -> tuple[tuple[str, ...], list[jax.Array]]:
    """The QTensor's fields as the kernel reads them, each ``(N, nb[, words])``."""
    names = tuple(sorted(w.arrays))
    return names, [spec.view(n, w.arrays[n]) for n in names]


def join_terms(parts: list, stack=jnp.stack):
    """Stack ``2**k`` arrays along new trailing axes, pairwise (Triton joins two at a time).

    ``stack`` is ``jnp.stack`` in kernels and ``np.stack`` to find the resulting element order.
    """
    while len(parts) > 1:
        parts = [stack([parts[i], parts[i + 1]], axis=-1) for i in range(0, len(parts), 2)]
    return parts[0]


def joined_order(spec: BlockSpec) -> np.ndarray:
    """Block element at each position of a joined tile ``[c, 2, ..., 2]`` flattened."""
    elems = spec.layout[0]
    return join_terms([elems[p] for p in range(len(elems))], np.stack).reshape(-1)


def joined_x(spec: BlockSpec, x: jax.Array, dtype) -> jax.Array:
    """``x [M, K]`` permuted within each block to ``joined_order`` (for one dot per tile)."""
    m, k = x.shape
    xb = x.reshape(m, k // spec.block_size, spec.block_size)[:, :, joined_order(spec)]
    return xb.reshape(m, k).astype(dtype)


def weight_tile(spec: BlockSpec, ld: Loader, dtype) -> jax.Array:
    """Dequantized ``[BN, BB * block]`` tile in ``joined_order``: ``scale * q + offset``, one
    rounding to ``dtype``."""
    shifts = spec.layout[1]
    parts = []
    for p, t in enumerate(spec.terms(ld)):
        w = t.q * (t.scale * float(2.0 ** -int(shifts[p])))[..., None]
        if t.offset is not None:
            w = w + t.offset[..., None]
        parts.append(w.astype(dtype))
    tile = join_terms(parts)
    return tile.reshape(tile.shape[0], -1)


def step_blocks(i, bb: int, steps: int):
    """Blocks of loop step ``i`` (a Python 0 when the loop is unrolled away)."""
    return pl.ds(pl.multiple_of(i * bb, bb) if steps > 1 else 0, bb)


def block_loader(refs: dict, rows, blocks) -> Loader:
    """``ld`` over kernel refs shaped ``(rows, blocks[, words])`` (see ``unpack.Loader``)."""
    def ld(name, idx=None):
        r = refs[name]
        if len(r.shape) == 2:
            return r[rows, blocks]
        if idx is None:
            return r[rows, blocks, :]
        if isinstance(idx, slice):
            return r[rows, blocks, pl.ds(idx.start, idx.stop - idx.start)]
        return r[rows, blocks, idx]
    return ld


def pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two that divides ``n`` and is at most ``cap``."""
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def field_specs(arrays, block_rows: int, block_blocks: int, index_map) -> list[pl.BlockSpec]:
    """BlockSpecs taking ``block_rows`` rows and ``block_blocks`` blocks of every field array."""
    specs = []
    for a in arrays:
        shape = (block_rows, block_blocks, *a.shape[2:])
        specs.append(pl.BlockSpec(shape, lambda *g, _r=a.ndim: (*index_map(*g), *(0,) * (_r - 2))))
    return specs
