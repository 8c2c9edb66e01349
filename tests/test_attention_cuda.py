"""The CUDA decode attention (``pallas_kernels/attention_cuda.cu``) on the CPU: its kernels' code run
warp by warp on the host (``jq_attention_host``) against ``models.base.self_attention``'s XLA path:
the same output, and the same caches after both wrote the new (roped) key and value."""

from __future__ import annotations

import ctypes

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.config import ModelConfig
from jaxquant.models import base
from pallas_kernels import attention_cuda


@pytest.fixture(scope="module")
def lib(cuda_library):
    handle = ctypes.CDLL(str(cuda_library))
    handle.jq_attention_host.argtypes = [ctypes.c_char_p, ctypes.c_int, *[ctypes.c_void_p] * 5, ctypes.c_int,
                                         ctypes.c_void_p, *[ctypes.c_int] * 5, ctypes.c_float, ctypes.c_void_p]
    return handle


def host_attention(lib, q, k, v, cache_k, cache_v, pos: int, inv_freq, scale: float, neox: bool,
                   dim: int | None = None):
    """The kernels on the host: q [H, D] and the new k, v [KV, D] (float32, q and k before their rope),
    caches [S, KV, D] -> (rc, [H * D], the caches after the kernels' writes), in the caches' dtype."""
    s, kv, d = cache_k.shape
    name = {jnp.dtype(jnp.bfloat16): b"bf16", jnp.dtype(jnp.float16): b"f16"}.get(cache_k.dtype, b"f32")
    q, k, v, inv = (np.ascontiguousarray(a, np.float32) for a in (q, k, v, inv_freq))
    ck, cv = (np.array(np.asarray(c).view(np.uint16)) for c in (cache_k, cache_v))
    out = np.zeros(q.size, np.uint16)
    rc = lib.jq_attention_host(name, dim or d, q.ctypes.data, k.ctypes.data, v.ctypes.data, ck.ctypes.data,
                               cv.ctypes.data, pos, inv.ctypes.data, inv.size, q.size // d, kv, s, neox, scale,
                               out.ctypes.data)
    return rc, out.view(cache_k.dtype), ck.view(cache_k.dtype), cv.view(cache_k.dtype)


CASES = [  # heads, kv heads, head dim, cache slots, position, neox, rope dims, dtype
    (32, 8, 128, 301, 150, False, 0, jnp.bfloat16),  # 3 chunks, the last part-full
    (8, 2, 64, 77, 0, True, 0, jnp.float16),
    (4, 4, 256, 130, 128, False, 128, jnp.bfloat16),  # a chunk of one slot; rope on half the dims
    (14, 2, 64, 200, 63, True, 32, jnp.bfloat16),  # group of 7 (Qwen2.5-0.5B's), one whole chunk
]


@pytest.mark.parametrize("heads,kv,d,slots,pos,neox,rope_dim,dtype", CASES)
def test_host_kernels_equal_xla_attention(lib, heads, kv, d, slots, pos, neox, rope_dim, dtype):
    cfg = ModelConfig(arch="llama", vocab_size=32, hidden_size=heads * d, n_layers=1, n_heads=heads, n_kv_heads=kv,
                      head_dim=d, ffn_dim=64, norm_eps=1e-5, rope_theta=10000.0, rope_neox=neox, rope_dim=rope_dim,
                      context_length=slots)
    keys = jax.random.split(jax.random.key(heads + d + pos), 5)
    q = jax.random.normal(keys[0], (1, 1, heads, d), jnp.float32) * 2
    k, v = (jax.random.normal(kk, (1, 1, kv, d), jnp.float32) for kk in keys[1:3])
    cache = tuple(jax.random.normal(kk, (1, slots, kv, d), jnp.float32).astype(dtype) for kk in keys[3:5])
    inv = jnp.asarray(base.rope_inv_freq(cfg, 0))
    ctx = base.LayerCtx(cfg, jnp.full((1, 1), pos, jnp.int32), inv, None, jnp.dtype(dtype))
    want, (ck, cv) = base.self_attention(q, k, v, cache, ctx)
    rc, got, gk, gv = host_attention(lib, np.asarray(q[0, 0]), np.asarray(k[0, 0]), np.asarray(v[0, 0]), cache[0][0],
                                     cache[1][0], pos, inv, d ** -0.5, neox)
    assert rc == 0
    np.testing.assert_array_equal(gv, np.asarray(cv[0]))
    # k's rope: cos, sin and the products may differ by a float32 ulp from XLA's, its rounding by a 16-bit one
    ulp = 2.0 ** -(jnp.finfo(dtype).nmant)
    np.testing.assert_allclose(np.asarray(gk, np.float32), np.asarray(ck[0], np.float32), rtol=ulp, atol=1e-6)
    want, got = np.asarray(want, np.float32).reshape(-1), np.asarray(got, np.float32)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 5e-3  # both round to 16 bits, XLA its weights too


def test_padding_position_attends_to_the_first_slot(lib):
    """A padding position (< 0) writes the new key and value into the last slot and attends to slot 0
    alone, as self_attention's update and cuDNN's path do: each head's output is slot 0's value row."""
    heads, kv, d, slots = 8, 2, 128, 70
    cache = [jax.random.normal(jax.random.key(i), (slots, kv, d), jnp.float32).astype(jnp.bfloat16) for i in (1, 2)]
    q, k, v = (np.asarray(jax.random.normal(jax.random.key(i), (n, d), jnp.float32)) for i, n in ((3, heads), (4, kv),
                                                                                               (5, kv)))
    rc, got, gk, gv = host_attention(lib, q, k, v, *cache, -1, np.zeros(d // 2, np.float32), 0.1, False)
    assert rc == 0
    np.testing.assert_array_equal(np.asarray(got).reshape(heads, d), np.repeat(np.asarray(cache[1][0]), heads // kv, 0))
    np.testing.assert_array_equal(gk[-1], k.astype(jnp.bfloat16))  # angle 0: k as it is
    np.testing.assert_array_equal(gv[-1], v.astype(jnp.bfloat16))
    np.testing.assert_array_equal(gv[:-1], np.asarray(cache[1][:-1]))


def test_host_entry_rejects_unknown_dtype_and_dim(lib):
    cache, q, kv = jnp.zeros((4, 1, 128), jnp.bfloat16), np.zeros((1, 128)), np.zeros((1, 128))
    assert host_attention(lib, q, kv, kv, cache.astype(jnp.float32), cache, 0, np.ones(64), 1.0, False)[0] == 1
    assert host_attention(lib, q, kv, kv, cache, cache, 0, np.ones(64), 1.0, False, dim=96)[0] == 2


def test_selected_only_when_asked(monkeypatch):
    """The decode step keeps cuDNN's attention unless JAXQUANT_CUDA_ATTENTION=1: the CUDA kernels
    were not faster in the model on the H200 (RESULTS.md, session 11)."""
    monkeypatch.delenv("JAXQUANT_CUDA_ATTENTION", raising=False)
    assert not attention_cuda.selected()
    monkeypatch.setenv("JAXQUANT_CUDA_ATTENTION", "1")
    assert attention_cuda.selected()
