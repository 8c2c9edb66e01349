"""Whole-model ISQ speed.

CPU: `jaxquant quantize` of the float (F32) Gemma-3-270M GGUF to a mix, against llama.cpp's
llama_model_quantize on the same file with the same thread count; a cold run (compiles included)
and a warm one (same process, compiled already).
GPU: an 8B-shaped Llama (Llama-3-8B's tensors, random bf16 weights made on the device) quantized
by a mix tensor by tensor on the device; wall time of the whole model, the first pass (compiles
included) and a second.

    python benchmarks/isq.py --cpu [--mix Q4_K_M] [--threads 2] [--float FILE]
    python benchmarks/isq.py --gpu [--mix Q4_K_M]
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import math
import os
import sys
import tempfile
import time
import zlib
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.io.source import TensorInfo
from jaxquant.isq import mixes, preset
from jaxquant.isq.apply import QuantizedSource, write_quantized_gguf

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


class RandomLlama8B:
    """Llama-3-8B's tensor names and shapes; each tensor random normal bf16, made on the default
    device when loaded."""

    def __init__(self, n_layers: int = 32):
        h, kv, ff, vocab = 4096, 1024, 14336, 128256
        self.shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (vocab, h), "output_norm.weight": (h,),
                                                   "output.weight": (vocab, h)}
        for i in range(n_layers):
            p = f"blk.{i}."
            self.shapes.update({p + "attn_norm.weight": (h,), p + "attn_q.weight": (h, h), p + "attn_k.weight": (kv, h),
                                p + "attn_v.weight": (kv, h), p + "attn_output.weight": (h, h),
                                p + "ffn_norm.weight": (h,), p + "ffn_gate.weight": (ff, h),
                                p + "ffn_up.weight": (ff, h), p + "ffn_down.weight": (h, ff)})
        self.metadata = {"general.architecture": "llama", "llama.block_count": n_layers,
                         "llama.attention.head_count": 32, "llama.attention.head_count_kv": 8}
        self.path = "random-llama-8b"

    @property
    def tensor_names(self) -> list[str]:
        return list(self.shapes)

    def info(self, name: str) -> TensorInfo:
        return TensorInfo(name, self.shapes[name], "BF16", 2 * math.prod(self.shapes[name]))

    def load(self, name: str) -> jax.Array:
        key = jax.random.PRNGKey(zlib.crc32(name.encode()))
        return (jax.random.normal(key, self.shapes[name], jnp.bfloat16) * 0.02).astype(jnp.bfloat16)


def gpu(mix: str, whole: bool) -> None:
    src = RandomLlama8B()
    plan = preset(mix).plan(src)
    n = sum(math.prod(s) for s in src.shapes.values())
    print(f"{jax.devices()[0].device_kind}, JAX {jax.__version__}: {mix} of an 8B-shaped Llama "
          f"({n / 1e9:.2f}G weights, bf16 made on the device){' (one jitted call per tensor)' if whole else ''}")
    for attempt in ("first (compiles)", "second"):
        qs = QuantizedSource(src, plan)
        if whole:
            qs.quantize = _whole
        per_type: dict[str, float] = defaultdict(float)
        start = time.perf_counter()
        for c in plan.choices:
            t = time.perf_counter()
            jax.block_until_ready(qs.load(c.name))
            per_type[c.format] += time.perf_counter() - t
        total = time.perf_counter() - start
        split = ", ".join(f"{k} {v:.2f} s" for k, v in sorted(per_type.items(), key=lambda kv: -kv[1]))
        print(f"  {attempt}: {total:.2f} s for the whole model ({split})")


@functools.partial(jax.jit, static_argnums=(1, 3))
def _whole(x, fmt, weights, name):
    from jaxquant.formats import quantize

    return quantize(x, fmt, weights, name=name)


def cpu(mix: str, threads: int, float_path: str | None) -> None:
    import llama_cpp
    import llama_cpp._logger

    from jaxquant.io import open_model

    llama_cpp._logger.set_verbose(False)
    tmp = tempfile.mkdtemp()
    if float_path is None:
        from float_model import dequantized_gguf  # the tests' float model

        from jaxquant.io import default_model_path

        float_path = dequantized_gguf(str(default_model_path()), f"{tmp}/gemma-f32.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = mixes.FTYPES[mix][0], threads
    t = time.perf_counter()
    assert llama_cpp.llama_model_quantize(float_path.encode(), f"{tmp}/ref.gguf".encode(), ctypes.byref(params)) == 0
    ref = time.perf_counter() - t
    times = []
    for _ in range(2):
        t = time.perf_counter()
        write_quantized_gguf(open_model(float_path), mix, f"{tmp}/ours.gguf", show_progress=False)
        times.append(time.perf_counter() - t)
    same = open(f"{tmp}/ours.gguf", "rb").read() == open(f"{tmp}/ref.gguf", "rb").read()
    mb = os.path.getsize(float_path) / 1e6
    print(f"| {mix} | {ref:.1f} s ({mb / ref:.0f} MB/s) | {times[0]:.1f} s ({ref / times[0]:.2f}x) | "
          f"{times[1]:.1f} s ({ref / times[1]:.2f}x) | {same} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--cpu", action="store_true")
    where.add_argument("--gpu", action="store_true")
    ap.add_argument("--mix", default="Q4_K_M")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--whole", action="store_true", help="GPU: each tensor in one jitted call (no row chunks)")
    ap.add_argument("--float", dest="float_path", help="the F32 Gemma GGUF (default: made from the shipped one)")
    args = ap.parse_args()
    if args.gpu:
        gpu(args.mix, args.whole)
    else:
        cpu(args.mix, args.threads, args.float_path)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
