"""Decode throughput of jaxquant's generate loop: against llama.cpp on the CPU, or on the default device.

Decode time is what generating N tokens adds to the prefill: each setting runs twice through the
same compiled program, once for N tokens and once stopped after the first token (its first token
made a stop id), and the difference is divided by the N - 1 decode steps. llama.cpp decodes the
same token ids one `eval` at a time, greedy, with the same thread count.

    python benchmarks/decode.py --cpu [--tokens 64] [--threads 2]
    python benchmarks/decode.py --gpu [--batch 1,8] [--tokens 128]
    python benchmarks/decode.py --gpu --llama8b --formats bf16,Q8_0,Q4_K_M-like [--layers 32]
"""

from __future__ import annotations

import argparse
import os
import time

PROMPT = "The history of the printing press begins"


def _ours(model, prompts: list[list[int]], tokens: int, streamed: bool = False) -> tuple[float, int]:
    """(seconds per decode step, decode steps) of greedy generation, compilation excluded;
    ``streamed``: through ``stream_tokens`` (a host callback per step) rather than one result."""
    from jaxquant.generate import generate_tokens, stream_tokens

    def run(stop: list[int]) -> tuple[float, list[list[int]]]:
        start = time.perf_counter()
        if streamed:
            out = [[] for _ in prompts]
            for new in stream_tokens(model, prompts, max_tokens=tokens, stop=stop):
                for row, t in zip(out, new):
                    row.extend(t)
        else:
            out = generate_tokens(model, prompts, max_tokens=tokens, stop=stop)
        return time.perf_counter() - start, out

    _, out = run([])  # compiles
    firsts = sorted({row[0] for row in out})
    run(firsts)  # compiles too if the stop ids outgrow their padding
    full = min(run([])[0] for _ in range(2))
    prefill = min(run(firsts)[0] for _ in range(2))
    steps = max(len(row) for row in out) - 1
    return (full - prefill) / steps, steps


def _llama_cpp(path: str, prompt: list[int], tokens: int, threads: int) -> float:
    """Seconds per decode step of llama.cpp (greedy, one token per eval)."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)
    best = float("inf")
    for _ in range(2):
        llm.reset()
        llm.eval(prompt)
        start = time.perf_counter()
        for _ in range(tokens - 1):
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
            llm.eval([int(np.argmax(logits))])
        best = min(best, (time.perf_counter() - start) / (tokens - 1))
    return best


def _dequantize_layers(model):
    """The model with every quantized layer weight (not the Q8_0 embedding table, which XLA's CPU
    matvec reads packed) turned into a float32 array: the CPU's speed without per-step dequantize."""
    import dataclasses

    import jax

    from jaxquant.qtensor import QTensor

    def f32(x):
        return jax.block_until_ready(x.dequantize("float32")) if isinstance(x, QTensor) else x

    layers = [jax.tree.map(f32, layer, is_leaf=lambda x: isinstance(x, QTensor)) for layer in model.params.layers]
    return dataclasses.replace(model, params=dataclasses.replace(model.params, layers=layers))


def cpu(tokens: int, threads: int) -> None:
    import jax

    import jaxquant as jq
    from jaxquant.generate import encode_prompts

    model = jq.load()
    prompt = encode_prompts(model, [PROMPT])[0]
    print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs (affinity {threads}), load average "
          f"{os.getloadavg()[0]:.1f}, JAX {jax.__version__}, {model.path.name}, prompt {len(prompt)} tokens, "
          f"{tokens} new tokens, greedy\n")
    ref = _llama_cpp(str(model.path), prompt, tokens, threads)
    print(f"| engine | setting | tok/s | x llama.cpp |\n|---|---|---|---|\n"
          f"| llama.cpp | {threads} threads | {1 / ref:.2f} | 1.00 |", flush=True)
    rows = [("QTensors as shipped", model, False), ("QTensors as shipped, streamed", model, True),
            ("layer weights dequantized to f32 at load", _dequantize_layers(model), False)]
    for name, m, streamed in rows:
        step, _ = _ours(m, [prompt], tokens, streamed)
        print(f"| jaxquant | {name} | {1 / step:.2f} | {ref / step:.2f} |", flush=True)


def _random_qtensor(key, fmt: str, shape: tuple[int, int]):
    """A QTensor of random packed bytes (scales small and finite), built on the device."""
    import jax
    import jax.numpy as jnp

    import jaxquant as jq
    from jaxquant.qtensor import QTensor

    f = jq.get_format(fmt)
    n_blocks = shape[1] // f.block_size
    arrays = {}
    for field, k in zip(f.fields, jax.random.split(key, len(f.fields))):
        dims = (shape[0], n_blocks) + ((field.count,) if field.count > 1 else ())
        if field.dtype in ("float16", "float32"):
            arrays[field.name] = (jax.random.uniform(k, dims, jnp.float32, 1e-4, 1e-3)).astype(field.dtype)
        else:
            arrays[field.name] = jax.lax.bitcast_convert_type(jax.random.bits(k, dims, jnp.uint8), field.dtype)
    return QTensor(arrays, fmt, shape)


# Q4_K_M-like: llama.cpp's mix keeps attn_v, ffn_down and the output in Q6_K (it does so for some layers).
_MIXES = {"Q4_K_M-like": lambda name: "Q6_K" if name in ("attn_v", "ffn_down", "output") else "Q4_K"}


def _llama8b(fmt: str, n_layers: int):
    """A Llama-3-8B-shaped model with random weights, built on the default device."""
    import jax
    import jax.numpy as jnp

    import jaxquant as jq
    from jaxquant.config import ModelConfig
    from jaxquant import models
    from jaxquant.models import FAMILIES, Layer, Params

    cfg = ModelConfig(arch="llama", vocab_size=128256, hidden_size=4096, n_layers=n_layers, n_heads=32, n_kv_heads=8,
                      head_dim=128, ffn_dim=14336, norm_eps=1e-5, rope_theta=500000.0, rope_neox=False,
                      context_length=8192)
    keys = iter(jax.random.split(jax.random.key(0), 16 * n_layers + 8))
    dtype = jnp.bfloat16 if fmt == "bf16" else jnp.float32

    def weight(name: str):
        shape = cfg.tensor_shape(name)
        if len(shape) == 1:
            return jnp.ones(shape, jnp.float32)
        field = name.split(".")[-2]
        kind = _MIXES[fmt](field) if fmt in _MIXES else fmt
        if kind == "bf16":
            return (jax.random.normal(next(keys), shape, jnp.bfloat16) * 0.02).astype(dtype)
        return _random_qtensor(next(keys), kind, shape)

    layers = [Layer(**{f: weight(f"blk.{i}.{f}.weight") for f in FAMILIES["llama"].REQUIRED}) for i in range(n_layers)]
    params = Params(token_embd=weight("token_embd.weight"), output_norm=weight("output_norm.weight"), layers=layers,
                    output=weight("output.weight"))
    if jax.default_backend() == "gpu":  # as jq.load does there
        params = models.fuse_projections(params)
    return jq.Model(jax.block_until_ready(params), cfg, None, jnp.dtype(dtype))


def gpu(tokens: int, batches: list[int], llama8b: bool, formats: list[str], n_layers: int) -> None:
    import jax

    import jaxquant as jq
    from jaxquant.generate import encode_prompts

    print(f"{time.strftime('%Y-%m-%d')}, {jax.devices()[0].device_kind}, JAX {jax.__version__}, {tokens} new tokens, "
          "greedy\n")
    if llama8b:
        models = [(f"Llama-3-8B-shaped {fmt}, {n_layers} layers, random", _llama8b(fmt, n_layers)) for fmt in formats]
        prompt = list(range(1000, 1024))
    else:
        model = jq.load()
        models = [(model.path.name, model)]
        prompt = encode_prompts(model, [PROMPT])[0]
    print("| model | batch | tok/s per sequence | tok/s total | ms per step |\n|---|---|---|---|---|")
    for name, model in models:
        for batch in batches:
            step, _ = _ours(model, [prompt] * batch, tokens)
            print(f"| {name} | {batch} | {1 / step:.1f} | {batch / step:.1f} | {1e3 * step:.2f} |", flush=True)
        del model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--cpu", action="store_true", help="the Gemma GGUF against llama.cpp, same threads")
    where.add_argument("--gpu", action="store_true", help="the default device, batch sizes --batch")
    p.add_argument("--tokens", type=int, default=None, help="new tokens (default: 64 on CPU, 128 on GPU)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of both engines (--cpu)")
    p.add_argument("--batch", default="1,8", help="batch sizes (--gpu)")
    p.add_argument("--llama8b", action="store_true", help="a Llama-3-8B-shaped model with random weights (--gpu)")
    p.add_argument("--formats", default="bf16,Q8_0,Q4_K_M-like", help="weight formats of --llama8b")
    p.add_argument("--layers", type=int, default=32, help="layers of --llama8b")
    args = p.parse_args()
    if args.cpu:
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:args.threads]))  # before XLA sizes its pool
        cpu(args.tokens or 64, args.threads)
    else:
        gpu(args.tokens or 128, [int(b) for b in args.batch.split(",")], args.llama8b, args.formats.split(","),
            args.layers)


if __name__ == "__main__":
    main()
