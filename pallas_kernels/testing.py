"""Random packed weights for kernel checks and benchmarks (built on the device)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxquant.formats import get_format, quantize
from jaxquant.qtensor import QTensor


def random_qtensor(fmt: str, n: int, k: int, key: jax.Array, dtype: str = "float32") -> QTensor:
    """A ``[n, k]`` QTensor of random bytes: every bit pattern of a block is valid, so kernels
    must match ``dequantize`` on all of them; float16 scales are normal * 0.01. Formats quantized
    whole-tensor (HQQ, FP8) are quantized from normal weights instead, their arrays shaped as
    their quantizers make them (FP8 bytes include NaN codes)."""
    f = get_format(fmt)
    if f.scope == "tensor":  # HQQ, FP8: arrays shaped as their quantizer makes them, from normal weights
        return quantize(jax.random.normal(key, (n, k), jnp.float32) * 0.02, fmt)
    nb = k // f.block_size
    arrays = {}
    for i, fld in enumerate(f.fields):
        if fld.layout != "rows":  # per-tensor extras (GPTQ's act-order perm): none in a random weight
            continue
        shape = (n, nb, fld.count) if fld.count > 1 else (n, nb)
        sub = jax.random.fold_in(key, i)
        dt = jnp.dtype(fld.dtype)
        if jnp.issubdtype(dt, jnp.floating):
            arrays[fld.name] = (jax.random.normal(sub, shape, jnp.float32) * 0.01).astype(dt)
        else:
            bits = jax.random.bits(sub, shape, jnp.dtype(f"uint{8 * dt.itemsize}"))
            arrays[fld.name] = jax.lax.bitcast_convert_type(bits, dt)
    return QTensor(arrays, f.name, (n, k), dtype)
