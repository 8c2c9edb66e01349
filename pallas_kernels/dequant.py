"""Large-M path: dequantize to float16 in one pass, then XLA's (cuBLAS) dot.

At thousands of activation rows the matmul is bound by the tensor cores and each weight tile is
read by many output tiles; one transient float16 copy (in tile order, the activations permuted to
match, ``tile``) costs one pass over the weights and lets the dot run at the library's rate. The
copy lives only inside the jitted computation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from jaxquant.qtensor import QTensor
from pallas_kernels import tile
from pallas_kernels.qmm import step_blocks
from pallas_kernels.tile import Decoder

BLOCK_N = 64


def _kernel(*refs, dec: Decoder, names: tuple[str, ...], bb: int, interpret: bool):
    fields = dict(zip(names, refs[:-1]))
    col = 0
    for t, scale in tile.step_tiles(dec, tile.step_loader(fields, 0, 1), bb, interpret):
        if scale is not None:
            t = (t.astype(jnp.float32) * scale).astype(jnp.float16)
        refs[-1][:, pl.ds(col, t.shape[1])] = t
        col += t.shape[1]


@functools.partial(jax.jit, static_argnames=("dec", "interpret"))
def dequantize_f16(w: QTensor, dec: Decoder, interpret: bool = False) -> jax.Array:
    """``[N, K]`` float16 weights, each step's columns in tile order (``tile.activation_perm``)."""
    n, k = w.shape
    nb = k // dec.block_size
    bb = step_blocks(dec, nb)
    names, arrays = tile.field_arrays(dec, w)
    return pl.pallas_call(
        functools.partial(_kernel, dec=dec, names=names, bb=bb, interpret=interpret),
        grid=(n // BLOCK_N, nb // bb),
        in_specs=[tile.field_spec(dec, name, a, BLOCK_N, nb // bb, lambda j, b: (j, b))
                  for name, a in zip(names, arrays)],
        out_specs=pl.BlockSpec((BLOCK_N, bb * dec.block_size), lambda j, b: (j, b)),
        out_shape=jax.ShapeDtypeStruct((n, k), jnp.float16),
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name=f"dequant_{dec.fmt.lower()}",
    )(*arrays)


@functools.partial(jax.jit, static_argnames=("dec", "interpret"))
def dequant_dot(x: jax.Array, w: QTensor, dec: Decoder, interpret: bool = False) -> jax.Array:
    """``x [M, K] @ dequantize(w).T`` -> ``[M, N]`` float32 through a transient float16 copy."""
    wf = dequantize_f16(w, dec, interpret)
    xp, scale = tile.prepare_activations(x, dec, step_blocks(dec, w.shape[1] // dec.block_size), x.shape[0])
    y = lax.dot_general(xp, wf, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return y * scale * tile.output_scale(dec, w)
