"""Large-M kernel family: dequantize to float16 in one pass, then XLA's (cuBLAS) dot.

At thousands of activation rows the matmul is bound by the tensor cores and the weights are
read once per output tile; writing one transient f16 copy (in the joined element order, with
the activations permuted to match) costs one pass over the weights and lets the dot run at
the library's full rate. The copy lives only inside the jitted computation.
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
from pallas_kernels.common import block_loader, field_arrays, field_specs, joined_x, pow2_divisor, weight_tile
from pallas_kernels.unpack import BlockSpec


@dataclasses.dataclass(frozen=True)
class DequantConfig:
    block_n: int = 32
    block_b: int = 8
    num_warps: int = 4


def default_config(spec: BlockSpec, n: int, k: int) -> DequantConfig:
    """Tiles of 32 rows x 256 elements (legacy) or x 512 (K-quants)."""
    nb = k // spec.block_size
    return DequantConfig(pow2_divisor(n, 32), pow2_divisor(nb, max(2, 256 // spec.block_size)))


def _kernel(*refs, spec: BlockSpec, names: tuple[str, ...]):
    fields = dict(zip(names, refs[:-1]))
    o_ref = refs[-1]
    o_ref[...] = weight_tile(spec, block_loader(fields, slice(None), slice(None)), jnp.float16)


@functools.partial(jax.jit, static_argnames=("spec", "config", "interpret"))
def dequantize_f16(w: QTensor, spec: BlockSpec, config: DequantConfig | None = None,
                   interpret: bool = False) -> jax.Array:
    """``[N, K]`` float16 weights, each block in ``common.joined_order``."""
    n, k = w.shape
    cfg = config or default_config(spec, n, k)
    if n % cfg.block_n or (k // spec.block_size) % cfg.block_b:
        raise JaxquantError(f"tiling {cfg} does not divide {n} rows x {k // spec.block_size} blocks")
    names, arrays = field_arrays(spec, w)
    bk = cfg.block_b * spec.block_size
    return pl.pallas_call(
        functools.partial(_kernel, spec=spec, names=names),
        grid=(n // cfg.block_n, k // bk),
        in_specs=field_specs(arrays, cfg.block_n, cfg.block_b, lambda j, b: (j, b)),
        out_specs=pl.BlockSpec((cfg.block_n, bk), lambda j, b: (j, b)),
        out_shape=jax.ShapeDtypeStruct((n, k), jnp.float16),
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=1),
        interpret=interpret,
        name="qdequant",
    )(*arrays)


@functools.partial(jax.jit, static_argnames=("spec", "config", "interpret"))
def dequant_dot(x: jax.Array, w: QTensor, spec: BlockSpec, config: DequantConfig | None = None,
                interpret: bool = False) -> jax.Array:
    """``x [M, K] @ dequantize(w).T`` -> ``[M, N]`` float32 through a transient f16 copy."""
    wf = dequantize_f16(w, spec, config, interpret)
    return lax.dot_general(joined_x(spec, x, jnp.float16), wf, (((1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32)


def supports(spec: BlockSpec, m: int, n: int, k: int) -> bool:
    return pow2_divisor(n, 32) >= 8
