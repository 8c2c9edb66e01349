"""Decode attention of one sequence (one new query) over its KV cache as CUDA kernels called through
the XLA FFI (``attention_cuda.cu``, built into ``cuda_lib``'s library): the query's rope, the scores,
softmax and weighted values in two kernels (chunks of the cache, then their combination), in place
of XLA's rope of q and cuDNN's attention with its memset.

``models.base.self_attention`` takes it for a batch-1 decode step where ``supports`` holds and it is
selected: not yet (``JAXQUANT_CUDA_ATTENTION=1`` selects it), until timed against cuDNN on the GPU.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import cuda_lib

NAME = "jq_decode_attention"
CHUNK = 64  # cache slots a thread block (attention_cuda.cu's kChunk)
DIMS = (64, 128, 256)
MAX_GROUP = 16  # query heads a KV head


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered (first call on a GPU compiles the library)."""
    lib = cuda_lib.load()
    if lib is None:
        return False
    jax.ffi.register_ffi_target(NAME, jax.ffi.pycapsule(lib.jq_decode_attention), platform="CUDA")
    return True


def selected() -> bool:
    return os.environ.get("JAXQUANT_CUDA_ATTENTION", "0") == "1"


def supports(heads: int, kv_heads: int, head_dim: int, rope_dim: int, dtype) -> bool:
    return (head_dim in DIMS and heads % kv_heads == 0 and heads // kv_heads <= MAX_GROUP and rope_dim <= head_dim
            and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and available())


def decode_attention(q: jax.Array, cache_k: jax.Array, cache_v: jax.Array, position: jax.Array, inv_freq: jax.Array,
                     *, scale: float, neox: bool) -> jax.Array:
    """Attention of one query ``q [H * D]`` (before its rope; float32) over the cache's slots 0 ..
    ``position`` (``cache_k``, ``cache_v [1, S, KV, D]`` bf16 / f16, the position's slot already
    written; a position < 0 attends to slot 0), ``q`` roped by ``inv_freq [R / 2]`` (NEOX or NORM
    pairs) -> ``[H * D]`` in the cache's dtype."""
    *_, slots, kv, d = cache_k.shape
    heads, chunks = q.size // d, -(-slots // CHUNK)
    call = jax.ffi.ffi_call(NAME, (jax.ShapeDtypeStruct((heads * d,), cache_k.dtype),
                                   jax.ShapeDtypeStruct((heads * chunks * d,), jnp.float32),
                                   jax.ShapeDtypeStruct((heads * chunks * 2,), jnp.float32)))
    out, _, _ = call(q.reshape(-1).astype(jnp.float32), cache_k, cache_v, jnp.asarray(position, jnp.int32).reshape(()),
                     jnp.asarray(inv_freq, jnp.float32), scale=np.float32(scale), neox=np.int64(neox))
    return out
