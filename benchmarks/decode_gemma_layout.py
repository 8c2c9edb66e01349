"""Decode tokens/s for the Gemma-3-270M layout on any device: the shipped file's per-tensor shapes
and formats (benchmarks/data/gemma3_270m_layout.json, written from the GGUF) with random weights
quantized on the device, for machines the 241 MB file cannot reach. Batch 1 and 8, a 128-token
prompt, 256 greedy tokens in one on-device loop per call.

    python benchmarks/decode_gemma_layout.py
"""
import json
import zlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import jaxquant as jq
from jaxquant.config import ModelConfig
from jaxquant import models
from jaxquant.model import Model
from jaxquant.generate import generate_tokens

layout = json.load(open("benchmarks/data/gemma3_270m_layout.json"))
cfg = ModelConfig(arch='gemma3', vocab_size=262144, hidden_size=640, n_layers=18, n_heads=4, n_kv_heads=1, head_dim=256,
    ffn_dim=2048, norm_eps=1e-6, rope_theta=1000000.0, rope_theta_local=10000.0, rope_dim=256, rope_neox=True,
    sliding_window=512, swa_layers=tuple((i % 6) != 5 for i in range(18)), query_pre_attn_scalar=256.0,
    embed_scale=25.298221281347036, qk_norm=True, activation='gelu_tanh', tie_embeddings=True, context_length=32768,
    bos_id=2, eos_ids=(1,))

class Src:
    tensor_names = list(layout)
    def load(self, name):
        shape, t = layout[name]
        key = jax.random.PRNGKey(zlib.crc32(name.encode()))
        x = jax.random.normal(key, shape, jnp.float32) * (0.02 if len(shape) > 1 else 1.0)
        return jq.quantize(x, t, name=name) if t not in ("F32",) else x

def run(fmt_note, params):
    model = Model(params, cfg, None, np.dtype(np.float32))
    for batch in (1, 8):
        prompts = [[2] + list(range(100 + r, 100 + r + 127)) for r in range(batch)]
        generate_tokens(model, prompts, max_tokens=256, stop=())  # compile
        t = time.perf_counter(); out = generate_tokens(model, prompts, max_tokens=256); dt = time.perf_counter() - t
        n = sum(len(o) for o in out)
        print(f"| {fmt_note} | {batch} | {n} | {dt:.3f} | {n / dt:.0f} | {n / dt / batch:.0f} |", flush=True)

print(jax.devices()[0].device_kind, jax.__version__)
print("| weights | batch | new tokens | s (prefill 128 + decode 256) | tokens/s | tokens/s per sequence |")
print("|---|---|---|---|---|---|")
run("shipped Q4_K_M mix", models.load_params(Src(), cfg))
for n, (shape, t) in layout.items():
    if len(shape) == 2:
        layout[n][1] = "Q8_0"
run("Q8_0", models.load_params(Src(), cfg))
