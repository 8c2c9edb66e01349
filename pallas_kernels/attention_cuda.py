"""Decode attention of one sequence (one new query) over its KV cache as CUDA kernels called through
the XLA FFI (``attention_cuda.cu``, built into ``cuda_lib``'s library): the rope of the new query
and key, the cache writes, the scores, softmax and weighted values in two kernels (chunks of the
cache, then their combination), in place of XLA's rope of q, its cache updates and cuDNN's attention
with its memset.

``models.base.self_attention`` takes it for a batch-1 decode step where ``supports`` holds and
``JAXQUANT_CUDA_ATTENTION=1`` selects it. Not by default: on the H200 it cut the 8B-shaped Q4_K_M
decode from 492 kernels a token to 397 but not its time (388.9-405.7 tok/s in five runs against
cuDNN's 412.7 in the one run not first on its machine, benchmarks/RESULTS.md, session 11).
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


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, cache_k: jax.Array, cache_v: jax.Array,
                     position: jax.Array, inv_freq: jax.Array, *, scale: float,
                     neox: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decode step's attention: the new key ``k`` and value ``v [KV * D]`` written into the
    caches (``[1, S, KV, D]`` bf16 / f16) at ``position``'s slot (padding's, < 0: the last), ``k``
    and the query ``q [H * D]`` roped by ``inv_freq [R / 2]`` (NEOX or NORM pairs), then ``q``'s
    attention over the slots 0 .. position (a padding position: slot 0) -> (``[H * D]`` in the
    cache's dtype, the updated caches: the operands' buffers, written in place where XLA donates them)."""
    *_, slots, _, d = cache_k.shape
    heads, chunks = q.size // d, -(-slots // CHUNK)
    call = jax.ffi.ffi_call(NAME, (jax.ShapeDtypeStruct((heads * d,), cache_k.dtype),
                                   jax.ShapeDtypeStruct((heads * chunks * d,), jnp.float32),
                                   jax.ShapeDtypeStruct((heads * chunks * 2,), jnp.float32),
                                   jax.ShapeDtypeStruct(cache_k.shape, cache_k.dtype),
                                   jax.ShapeDtypeStruct(cache_v.shape, cache_v.dtype)),
                            input_output_aliases={3: 3, 4: 4})
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    out, _, _, cache_k, cache_v = call(f32(q).reshape(-1), f32(k).reshape(-1), f32(v).reshape(-1), cache_k, cache_v,
                                       jnp.asarray(position, jnp.int32).reshape(()), f32(inv_freq),
                                       scale=np.float32(scale), neox=np.int64(neox))
    return out, cache_k, cache_v
