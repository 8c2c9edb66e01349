"""Plumbing shared by the kernel families: field views, activation permutation, tiling helpers."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxquant.qtensor import QTensor
from pallas_kernels.unpack import BlockSpec, Loader

# JAX >= 0.11 warns at every lowering of a Triton kernel; registry.py says why we use it anyway.
warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*", category=DeprecationWarning)


def field_arrays(spec: BlockSpec, w: QTensor) -> tuple[tuple[str, ...], list[jax.Array]]:
    """The QTensor's fields as the kernel reads them, each ``(N, nb[, words])``."""
    names = tuple(sorted(w.arrays))
    return names, [spec.view(n, w.arrays[n]) for n in names]


def permute_x(spec: BlockSpec, x: jax.Array, dtype, prescale: bool) -> jax.Array:
    """``x [M, K]`` -> ``[P, M, nb, c]``: term ``p`` of every block, in its ``elems`` order.

    With ``prescale`` each term is multiplied by ``2**-shift`` (exact), undoing the power of two
    that ``unpack.as_f32`` leaves on in-place fields.
    """
    elems, shift = spec.layout
    m, k = x.shape
    xb = x.reshape(m, k // spec.block_size, spec.block_size)[:, :, elems]  # [M, nb, P, c]
    xb = jnp.moveaxis(xb, 2, 0)
    if prescale:
        xb = xb.astype(jnp.float32) * jnp.exp2(-shift.astype(jnp.float32))[:, None, None, None]
    return xb.astype(dtype)


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
