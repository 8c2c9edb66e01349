"""GPU check of the fused decode attention (cuDNN, ``models.base._fused_decode``; and for one
sequence jaxquant's CUDA kernels, ``pallas_kernels.attention_cuda``) against the XLA path of
``self_attention`` in float32 (run on a GPU machine; not pytest).

    python tests/gpu/check_attention.py

Random queries, keys, values and caches in bfloat16 / float16, grouped-query heads, batch rows at
different positions (one at position 0; one sequence at the cache's last position), caches of
lengths that are not powers of two. The fused output must match the float32 reference to a
relative error (Frobenius norm) below 1e-2 (the inputs' own rounding is 4e-3), and the updated
caches must be identical (the CUDA kernels' roped keys within a 16-bit ulp). Exits non-zero on a
failure.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.config import ModelConfig
from jaxquant.models import base

TOL = 1e-2


def case(b: int, h: int, kv: int, d: int, s: int, dtype, seed: int, cuda: bool) -> float:
    cfg = ModelConfig(arch="llama", vocab_size=32, hidden_size=h * d, n_layers=1, n_heads=h, n_kv_heads=kv,
                      head_dim=d, ffn_dim=64, norm_eps=1e-5, rope_theta=10000.0, rope_neox=False, context_length=s)
    keys = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(keys[0], (b, 1, h, d), jnp.float32)
    k, v = (jax.random.normal(kk, (b, 1, kv, d), jnp.float32) for kk in keys[1:3])
    cache = tuple(jax.random.normal(kk, (b, s, kv, d), jnp.float32).astype(dtype) for kk in keys[3:5])
    # the cache's last slot is padding's (base.KVCache): positions 0 .. s - 2; one sequence at the last
    pos = jnp.asarray(np.r_[0, jax.random.randint(keys[5], (b - 1,), 1, s - 1)][:b, None] if b > 1 else [[s - 2]],
                      jnp.int32)
    inv = jnp.asarray(base.rope_inv_freq(cfg, 0))

    def run(fused: bool, dt):
        ctx = base.LayerCtx(cfg, pos, inv, None, jnp.dtype(dt))
        orig = base._fused_decode
        base._fused_decode = orig if fused else (lambda *a: False)
        try:
            return jax.jit(lambda q, k, v, c: base.self_attention(q, k, v, c, ctx))(q, k, v, tuple(x.astype(dt) for x in cache))
        finally:
            base._fused_decode = orig

    ctx = base.LayerCtx(cfg, pos, inv, None, jnp.dtype(dtype))
    os.environ["JAXQUANT_CUDA_ATTENTION"] = "1" if cuda else "0"
    assert base._fused_decode(q, cache[0], ctx), "the fused path is not taken"
    assert base._cuda_decode(q, cache[0], ctx) == cuda, "the CUDA kernels are not taken"
    out, (ck, cv) = run(True, dtype)
    ref, (rk, rv) = run(False, jnp.float32)
    # the CUDA kernels rope k with their own cos, sin and products: a 16-bit ulp apart at most
    np.testing.assert_allclose(np.asarray(ck.astype(jnp.float32)), np.asarray(rk.astype(dtype).astype(jnp.float32)),
                               rtol=2.0 ** -jnp.finfo(dtype).nmant if cuda else 0, atol=1e-6 if cuda else 0)
    assert np.array_equal(np.asarray(cv.astype(jnp.float32)), np.asarray(rv.astype(dtype).astype(jnp.float32)))
    out = out.astype(jnp.float32)
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def main() -> int:
    if jax.default_backend() != "gpu":
        print("check_attention.py needs a GPU")
        return 2
    failed = total = 0
    cases = [(1, 32, 8, 128, 300, jnp.bfloat16), (4, 32, 8, 128, 1000, jnp.bfloat16), (3, 8, 2, 64, 77, jnp.float16),
             (2, 4, 4, 256, 129, jnp.bfloat16), (1, 28, 4, 128, 2049, jnp.bfloat16), (1, 14, 2, 64, 65, jnp.float16)]
    for i, (b, h, kv, d, s, dtype) in enumerate(cases):
        for cuda in (False, True) if b == 1 else (False,):
            err = case(b, h, kv, d, s, dtype, i, cuda)
            ok = err < TOL
            failed += not ok
            total += 1
            print(f"{'ok  ' if ok else 'FAIL'} {'cuda ' if cuda else 'cudnn'} B={b} heads {h}/{kv} D={d} cache {s} "
                  f"{jnp.dtype(dtype).name}: rel err {err:.1e}", flush=True)
    print(f"{total - failed}/{total} passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
