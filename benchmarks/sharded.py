"""Tensor-parallel decode and prefill (``jaxquant.sharding``) against one device, and a model that
fits only when split: random weights in llama.cpp's Q4_K_M-like mix (Q6_K attn_v, ffn_down and
output, Q4_K elsewhere), each tensor created in place on its devices (no full copy anywhere).

- ``8b``: a Llama-3-8B-shaped model on 1 device (q/k/v and gate/up fused where the formats match,
  ``jq.load``'s GPU default; and unfused, as on a mesh) and on a mesh of each ``--devices`` count:
  greedy decode tokens/s at batch 1 and 8 (``decode.py``'s timing: the difference of two runs) and
  prefill tokens/s of one ``--prefill``-token prompt.
- ``70b``: a Llama-3-70B-shaped model (``--layers``, default 80) under a forced per-device memory
  budget (``--budget-gb``: the rest of each device is taken by a ballast buffer first): on one
  device it must fail to load, on the mesh it runs; parameter bytes and peak memory per device.

    python benchmarks/sharded.py --devices 2                         # GPUs: both parts, ~10 min
    python benchmarks/sharded.py --devices 2 --only 8b               # or one part per command
    python benchmarks/sharded.py --only 70b --devices 2 --budget-gb 40
    python benchmarks/sharded.py --small --cpu-devices 4 --devices 2,4 --budget-gb 0.001   # CPU smoke test
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

LLAMA = {  # Llama 3 8B and 70B dimensions, and a tiny one for the CPU
    "8b": {"vocab_size": 128256, "hidden_size": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "head_dim": 128,
           "ffn_dim": 14336},
    "70b": {"vocab_size": 128256, "hidden_size": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "head_dim": 128,
            "ffn_dim": 28672},
    "small": {"vocab_size": 4096, "hidden_size": 512, "n_layers": 2, "n_heads": 8, "n_kv_heads": 4, "head_dim": 64,
              "ffn_dim": 2048}}


def config(shape: str, layers: int | None):
    from jaxquant.config import ModelConfig

    dims = {**LLAMA[shape], **({"n_layers": layers} if layers else {})}
    return ModelConfig(arch="llama", norm_eps=1e-5, rope_theta=500000.0, rope_neox=False, context_length=8192, **dims)


def build(cfg, mesh, fuse: bool = False):
    """A jaxquant.Model of random Q4_K_M-like weights, each tensor generated where the plan puts it
    (``mesh`` None: the default device)."""
    import jax
    import jax.numpy as jnp
    from decode import _MIXES, _random_qtensor

    import jaxquant as jq
    from jaxquant import models, sharding
    from jaxquant.models import FAMILIES, Layer, Params

    keys = iter(jax.random.split(jax.random.key(0), 16 * cfg.n_layers + 8))
    mix = _MIXES["Q4_K_M-like"]

    def tensor(name: str):
        shape, field = cfg.tensor_shape(name), name.split(".")[-2]
        make = (lambda k: jnp.ones(shape, jnp.float32)) if len(shape) == 1 else (
            lambda k: _random_qtensor(k, mix(field), shape))
        key = next(keys)
        out = None if mesh is None else sharding.target(field, jax.eval_shape(make, key), cfg, mesh)
        return jax.block_until_ready(jax.jit(make, out_shardings=out)(key))

    layers = [Layer(**{f: tensor(f"blk.{i}.{f}.weight") for f in FAMILIES["llama"].REQUIRED})
              for i in range(cfg.n_layers)]
    params = Params(token_embd=tensor("token_embd.weight"), output_norm=tensor("output_norm.weight"), layers=layers,
                    output=tensor("output.weight"))
    return jq.Model(models.fuse_projections(params) if fuse else params, cfg, None)


def prefill_rate(model, n: int) -> float:
    """Tokens/s of one n-token prompt through every layer and the last token's logits (best of 3)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxquant import models, sharding

    cfg, cache_sharding = model.cfg, sharding.cache_sharding(model.params, model.cfg)

    @jax.jit
    def run(params, tokens):
        cache = models.init_cache(cfg, 1, n, model.compute_dtype, cache_sharding)
        x, _ = models.hidden_states(params, tokens, jnp.arange(n, dtype=jnp.int32)[None], cache, cfg)
        return models.logits(params, x[:, -1], cfg)

    tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (1, n)), jnp.int32)
    jax.block_until_ready(run(model.params, tokens))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(run(model.params, tokens))
        times.append(time.perf_counter() - start)
    return n / min(times)


def per_device_gb(tree) -> list[float]:
    """GB of ``tree``'s arrays held by each device (its shards, replicas counted on every device)."""
    import jax

    held = {d: 0 for d in jax.devices()}
    for a in jax.tree.leaves(tree):
        for d in a.sharding.device_set:
            held[d] += a.dtype.itemsize * math.prod(a.sharding.shard_shape(a.shape))
    return [held[d] / 1e9 for d in sorted(held, key=lambda d: d.id) if held[d]]


def in_use_gb(devices, ballast_bytes: int = 0) -> str:
    """GB in use on each device (the ballast excluded), or "-" on CPU (no statistics kept)."""
    stats = [d.memory_stats() for d in devices]
    if any(s is None for s in stats):
        return "-"
    return " / ".join(f"{(s['bytes_in_use'] - ballast_bytes) / 1e9:.1f}" for s in stats)


def measure(model, args, devices, ballast_bytes: int = 0) -> str:
    """Table cells: parameter GB per device, decode tokens/s at batch 1 and 8, GB in use per device."""
    from decode import _ours

    prompt = list(range(1000, 1000 + args.prompt))
    rates = [b / _ours(model, [prompt] * b, args.tokens)[0] for b in (1, 8)]
    gb = " / ".join(f"{g:.3g}" for g in per_device_gb(model.params))
    return f"{gb} | {rates[0]:.1f} | {rates[1]:.1f} | {in_use_gb(devices, ballast_bytes)}"


def mesh_of(n: int):
    import jax

    return None if n == 1 else jax.make_mesh((n,), ("tp",), devices=jax.devices()[:n])


def part_8b(args) -> None:
    import jax

    cfg = config("small" if args.small else "8b", args.layers)
    print(f"\n{cfg.n_layers} layers, hidden {cfg.hidden_size}, prompt {args.prompt} tokens, {args.tokens} new tokens, "
          f"prefill {args.prefill}\n\n| devices | q/k/v, gate/up | params GB per device | decode b1 tok/s | b8 tok/s "
          "(total) | GB in use per device | prefill tok/s |\n|---|---|---|---|---|---|---|", flush=True)
    for n, fuse in [(1, True), (1, False)] + [(n, False) for n in args.devices if n > 1]:
        model = build(cfg, mesh_of(n), fuse)
        cells = measure(model, args, jax.devices()[:n])
        print(f"| {n} | {'fused' if fuse else 'apart'} | {cells} | {prefill_rate(model, args.prefill):.0f} |", flush=True)
        del model
        gc.collect()


def ballast(devices, budget_gb: float) -> tuple[list, int]:
    """Fill each device up to ``budget_gb`` of free memory (what its allocator allows minus the
    budget), so that a model larger than the budget cannot be placed: (buffers, bytes each). No
    buffers on CPU (no limit known)."""
    import jax
    import jax.numpy as jnp

    stats = [d.memory_stats() for d in devices]
    if any(s is None for s in stats):
        return [], 0
    size = min(s["bytes_limit"] - s["bytes_in_use"] for s in stats) - int(budget_gb * 1e9)
    if size <= 0:
        return [], 0
    return jax.block_until_ready([jnp.zeros(size, jnp.uint8, device=d) for d in devices]), size


def part_70b(args) -> None:
    import jax

    cfg = config("small" if args.small else "70b", args.layers)
    print(f"\n{cfg.n_layers} layers, hidden {cfg.hidden_size}, ffn {cfg.ffn_dim}, budget {args.budget_gb} GB per "
          f"device\n\n| devices | result | params GB per device | decode b1 tok/s | b8 tok/s (total) | GB in use per "
          "device |\n|---|---|---|---|---|---|", flush=True)
    for n in [1] + [n for n in args.devices if n > 1]:
        devices = jax.devices()[:n]
        held, size = ballast(devices, args.budget_gb)
        try:
            model = build(cfg, mesh_of(n))
            if not held and max(per_device_gb(model.params)) > args.budget_gb:  # CPU: checked by arithmetic only
                raise MemoryError(f"{max(per_device_gb(model.params)):.3g} GB per device > budget")
            print(f"| {n} | runs | {measure(model, args, devices, size)} |", flush=True)
            del model
        except (MemoryError, jax.errors.JaxRuntimeError) as e:
            if not isinstance(e, MemoryError) and "RESOURCE_EXHAUSTED" not in str(e):
                raise
            print(f"| {n} | does not fit: {str(e).splitlines()[0][:80]} | - | - | - | {in_use_gb(devices, size)} |",
                  flush=True)
        del held
        gc.collect()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", default="2", help="mesh sizes besides 1 device, comma-separated")
    p.add_argument("--only", choices=("8b", "70b"), help="run one part")
    p.add_argument("--layers", type=int, default=None, help="layers (default: the model's, 32 or 80)")
    p.add_argument("--budget-gb", type=float, default=40.0, help="forced memory budget per device for 70b")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per decode run")
    p.add_argument("--prompt", type=int, default=24, help="prompt tokens of the decode runs")
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--small", action="store_true", help="tiny dimensions (a smoke test of the pipeline)")
    p.add_argument("--cpu-devices", type=int, default=0, help="simulate this many CPU devices (before JAX starts)")
    args = p.parse_args()
    args.devices = [int(n) for n in args.devices.split(",")]
    if args.cpu_devices:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} " \
                                  f"--xla_force_host_platform_device_count={args.cpu_devices}"
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    print(f"{time.strftime('%Y-%m-%d')}, {len(jax.devices())} x {jax.devices()[0].device_kind}, JAX {jax.__version__}",
          flush=True)
    if args.only in (None, "8b"):
        part_8b(args)
    if args.only in (None, "70b"):
        part_70b(args)


if __name__ == "__main__":
    main()
