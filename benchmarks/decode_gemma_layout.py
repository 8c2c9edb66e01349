"""Decode tokens/s for the Gemma-3-270M layout on any device: the shipped file's per-tensor shapes
and formats (benchmarks/data/gemma3_270m_layout.json, written from the GGUF) with random weights
quantized on the device, for machines the 241 MB file cannot reach. Batch 1 and 8, a 128-token
prompt, 256 greedy tokens in one on-device loop per call.

    python benchmarks/decode_gemma_layout.py
"""
import os
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gemma_layout import CONFIG as cfg, random_model  # noqa: E402

from jaxquant.generate import generate_tokens  # noqa: E402


def run(fmt_note, model):
    for batch in (1, 8):
        prompts = [[2] + list(range(100 + r, 100 + r + 127)) for r in range(batch)]
        generate_tokens(model, prompts, max_tokens=256, stop=())  # compile
        t = time.perf_counter(); out = generate_tokens(model, prompts, max_tokens=256); dt = time.perf_counter() - t
        n = sum(len(o) for o in out)
        print(f"| {fmt_note} | {batch} | {n} | {dt:.3f} | {n / dt:.0f} | {n / dt / batch:.0f} |", flush=True)

print(jax.devices()[0].device_kind, jax.__version__)
print("| weights | batch | new tokens | s (prefill 128 + decode 256) | tokens/s | tokens/s per sequence |")
print("|---|---|---|---|---|---|")
run("shipped Q4_K_M mix", random_model())
run("Q8_0", random_model("Q8_0"))
