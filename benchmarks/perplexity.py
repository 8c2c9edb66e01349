"""Perplexity throughput (tokens/s) on the Gemma-3-270M layout (benchmarks/gemma_layout.py: the
shipped file's shapes and formats, random weights quantized on the device), as `jaxquant
perplexity` runs it: chunks of --ctx tokens from an empty cache, --batch chunks per jitted call,
the second half of each chunk scored. A first pass compiles; the tokens/s are those of a second
pass over all chunks (every evaluated token counted, n_chunks * ctx, as llama-perplexity does).

    python benchmarks/perplexity.py [--ctx 512] [--chunks 64] [--batch 8[,32]] [--weights shipped,Q8_0]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gemma_layout import CONFIG, random_model  # noqa: E402

from jaxquant.eval import perplexity as pp  # noqa: E402


def measure(weights: str, ctx: int, n_chunks: int, batches: list[int]) -> None:
    """Print one markdown row per batch size: weights, ctx, chunks, batch, model build s, first
    pass s (compiles), second pass s, tokens/s of the second pass."""
    t = time.perf_counter()
    model = random_model(None if weights == "shipped" else weights)
    jax.block_until_ready(model.params)
    build = time.perf_counter() - t
    note = "shipped Q4_K_M mix" if weights == "shipped" else f"{weights} (every matrix)"
    tokens = np.random.default_rng(0).integers(3, CONFIG.vocab_size, n_chunks * ctx).tolist()
    for batch in batches:
        first = pp.perplexity(model, tokens=tokens[:max(batch, 2) * ctx], n_ctx=ctx, batch=batch, show_progress=False)
        res = pp.perplexity(model, tokens=tokens, n_ctx=ctx, batch=batch, show_progress=False)
        if not math.isfinite(res.ppl) or res.n_chunks != n_chunks:
            raise SystemExit(f"{weights}: bad result {res.as_dict()}")
        print(f"| {note} | {ctx} | {n_chunks} | {batch} | {build:.1f} | {first.seconds:.1f} | {res.seconds:.2f} | "
              f"{n_chunks * ctx / res.seconds:.0f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", type=int, default=pp.DEFAULT_CTX)
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--batch", default="8", help="chunks per jitted call; a comma-separated list measures each")
    ap.add_argument("--weights", default="shipped,Q8_0", help="'shipped' (the file's mix) and/or a format for every matrix")
    args = ap.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    if any(args.chunks % b for b in batches):
        ap.error("--chunks must be a multiple of each --batch (no padded batch in the timing)")
    print(f"{jax.devices()[0].device_kind}, JAX {jax.__version__}", flush=True)
    print("| weights | ctx | chunks | batch | build s | first pass s (compiles) | second pass s | tokens/s |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for w in args.weights.split(","):
        measure(w, args.ctx, args.chunks, batches)


if __name__ == "__main__":
    main()
