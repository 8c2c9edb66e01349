"""jaxquant against llama.cpp CUDA on the same GGUF files, on the GPU: one table from one run.

On the device machine (no network): builds llama.cpp's ``llama-bench`` with CUDA from the pruned
source tarball that ``--prepare`` makes here from the llama-cpp-python sdist (about 6 minutes, in
the background while the rest runs); writes a Llama-3-8B-shaped F16 GGUF of random weights (a
dummy vocabulary); quantizes it with ``jaxquant quantize`` on the GPU (Q4_K_M, Q8_0: the time of
whole-model ISQ from an F16 file); then times on each file llama-bench (tg128, pp512) and jaxquant
(greedy decode at batch 1 and 8, a 512-token prefill), plus the F16 file as bfloat16 through XLA.

    python benchmarks/gpu_vs_llamacpp.py --prepare            # here: writes .scratch/llama.cpp.tar.gz
    python benchmarks/gpu_vs_llamacpp.py --src .scratch/llama.cpp.tar.gz [--layers 32] [--work /tmp/g]
    python benchmarks/gpu_vs_llamacpp.py --layers 1 --small --no-llama   # CPU smoke test of the pipeline

It resumes: each finished stage (the build, each file, each row) is kept under ``--work``, so a run
cut at the device's 10-minute limit goes on where it stopped when called again on a warm machine.
``--build-only`` starts the build and returns, for other measurements to fill its six minutes;
``--llama-bench PATH`` takes a binary built beforehand instead (benchmarks/NOTES-gpu.md, session 8:
built on the 2-core CPU machine in ~50 minutes and carried, it saves the device's six).
"""

from __future__ import annotations

import argparse
import functools
import glob
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SDIST = "llama-cpp-python==0.3.36"
KEEP = ("CMakeLists.txt", "cmake/", "ggml/", "src/", "include/", "common/", "tools/", "vendor/", "licenses/",
        "LICENSE")
GGML_BACKENDS = ("ggml-cuda", "ggml-cpu")  # of ggml/src/ggml-*/: the others are dropped
CMAKE = ["-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=90", "-DGGML_CUDA_NCCL=OFF", "-DLLAMA_BUILD_SERVER=OFF",
         "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=OFF"]
LLAMA_8B = {"vocab": 128256, "hidden": 4096, "ffn": 14336, "heads": 32, "kv_heads": 8, "head_dim": 128}
SMALL = {"vocab": 4096, "hidden": 256, "ffn": 512, "heads": 4, "kv_heads": 2, "head_dim": 64}


def prepare(out: str) -> None:
    """The sdist's vendored llama.cpp with only the CPU and CUDA backends, as a .tar.gz."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", tmp,
                        SDIST], check=True)
        [sdist] = glob.glob(f"{tmp}/*.tar.gz")
        with tarfile.open(sdist) as src, tarfile.open(out, "w:gz") as dst:
            for m in src.getmembers():
                _, _, rel = m.name.partition("/vendor/llama.cpp/")
                sub = rel.split("/")
                if not rel or not rel.startswith(KEEP) or (
                        rel.startswith("ggml/src/ggml-") and len(sub) > 3 and sub[2] not in GGML_BACKENDS):
                    continue
                m.name = "llama.cpp/" + rel
                m.pax_headers = {}  # a long name's PAX "path" record would override the new name
                dst.addfile(m, src.extractfile(m) if m.isfile() else None)
    print(f"{out}: {os.path.getsize(out) / 1e6:.1f} MB")


def _alive(pid_file: str) -> bool:
    try:
        with open(pid_file) as f:
            os.kill(int(f.read()), 0)
        return True
    except (OSError, ValueError):
        return False


def start_build(src: str, work: str) -> str:
    """Configure and build llama-bench in a new process session (it outlives this command, and a
    later call finds it running or done); returns the binary's path."""
    root = os.path.join(work, "llama.cpp")
    binary = os.path.join(root, "build", "bin", "llama-bench")
    pid_file = os.path.join(work, "build.pid")
    if os.path.exists(binary) or _alive(pid_file):
        return binary
    with tarfile.open(src) as t:
        t.extractall(work, filter="data")
    cmd = (f"cmake -S {root} -B {root}/build {' '.join(CMAKE)} > {work}/build.log 2>&1 && "
           f"cmake --build {root}/build -j 15 --target llama-bench >> {work}/build.log 2>&1")
    proc = subprocess.Popen(["bash", "-c", cmd], start_new_session=True)
    with open(pid_file, "w") as f:
        f.write(str(proc.pid))
    return binary


def wait_build(binary: str, work: str) -> None:
    while not os.path.exists(binary):
        if not _alive(os.path.join(work, "build.pid")):
            with open(os.path.join(work, "build.log")) as f:
                raise SystemExit(f"llama.cpp build failed ({work}/build.log):\n{f.read()[-3000:]}")
        time.sleep(5)


def stage(work: str, key: str, fn):
    """``fn()``'s result, computed once per ``--work`` folder (kept in its results.json)."""
    path = os.path.join(work, "results.json")
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            done = json.load(f)
    if key not in done:
        done[key] = fn()
        with open(path + ".part", "w") as f:
            json.dump(done, f, indent=1)
        os.replace(path + ".part", path)
    print(key, done[key], flush=True)
    return done[key]


def write_f16_gguf(path: str, dims: dict, n_layers: int) -> None:
    """A Llama-shaped F16 GGUF of random weights (normal * 0.02, generated on the default device)
    with a dummy SentencePiece vocabulary, loadable by llama.cpp and jaxquant."""
    import gguf
    import jax
    import jax.numpy as jnp
    import numpy as np

    h, kv = dims["hidden"], dims["kv_heads"] * dims["head_dim"]
    w = gguf.GGUFWriter(path + ".part", "llama")
    w.add_block_count(n_layers)
    w.add_context_length(8192)
    w.add_embedding_length(h)
    w.add_feed_forward_length(dims["ffn"])
    w.add_head_count(dims["heads"])
    w.add_head_count_kv(dims["kv_heads"])
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(dims["head_dim"])
    w.add_vocab_size(dims["vocab"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("llama")
    n = dims["vocab"] - 259  # after 3 specials and the 256 byte-fallback tokens
    w.add_token_list([b"<unk>", b"<s>", b"</s>"] + [f"<0x{b:02X}>".encode() for b in range(256)]
                     + [f"t{i}".encode() for i in range(n)])
    w.add_token_scores([0.0] * dims["vocab"])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * n)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    key = iter(jax.random.split(jax.random.key(0), 16 * n_layers + 8))

    def rand(rows: int, cols: int) -> np.ndarray:
        return np.asarray((jax.random.normal(next(key), (rows, cols), jnp.float32) * 0.02).astype(jnp.float16))

    w.add_tensor("token_embd.weight", rand(dims["vocab"], h))
    w.add_tensor("output_norm.weight", np.ones(h, np.float32))
    w.add_tensor("output.weight", rand(dims["vocab"], h))
    for i in range(n_layers):
        for name, shape in (("attn_q", (h, h)), ("attn_k", (kv, h)), ("attn_v", (kv, h)), ("attn_output", (h, h)),
                            ("ffn_gate", (dims["ffn"], h)), ("ffn_up", (dims["ffn"], h)),
                            ("ffn_down", (h, dims["ffn"]))):
            w.add_tensor(f"blk.{i}.{name}.weight", rand(*shape))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(h, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(h, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(path + ".part", path)


def quantize(src: str, dst: str, mix: str) -> float:
    """Seconds of ``jaxquant quantize`` (a fresh process: imports and compiles included)."""
    start = time.perf_counter()
    # this process already holds most of the GPU (JAX preallocates): the child takes what it needs
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    subprocess.run([sys.executable, "-m", "jaxquant.cli", "quantize", src, dst, "--type", mix, "--no-progress"],
                   check=True, env=env)
    return round(time.perf_counter() - start, 1)


def llama_bench(binary: str, path: str) -> dict[str, float]:
    """llama-bench's mean tokens/s of pp512 and tg128, all layers on the GPU."""
    out = subprocess.run([binary, "-m", path, "-ngl", "99", "-p", "512", "-n", "128", "-r", "3", "-o", "json"],
                         capture_output=True, text=True, check=True).stdout
    res = {}
    for row in json.loads(out):
        res["pp512" if row["n_prompt"] else "tg128"] = row["avg_ts"]
    return res


def ours(path: str, dtype, tokens: int, prefill: int) -> dict[str, float]:
    """jaxquant on a file: decode tok/s at batch 1 and 8, prefill tok/s, weight bytes."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from decode import _ours  # a sibling benchmark's timing helper

    import jaxquant as jq
    from jaxquant import models

    model = jq.load(path, dtype=dtype)
    weights = sum(x.nbytes for x in jax.tree.leaves(model.params))
    res = {"GB": weights / 1e9}
    prompt = list(range(1000, 1024))
    for batch in (1, 8):
        step, _ = _ours(model, [prompt] * batch, tokens)
        res[f"decode{batch}"] = batch / step

    @jax.jit
    def run(params, toks):
        cache = models.init_cache(model.cfg, 1, toks.shape[1], model.compute_dtype)
        x, _ = models.hidden_states(params, toks, jnp.arange(toks.shape[1], dtype=jnp.int32)[None], cache, model.cfg)
        return models.logits(params, x[:, -1], model.cfg)

    toks = jnp.asarray(np.random.default_rng(0).integers(3, model.cfg.vocab_size, (1, prefill)), jnp.int32)
    jax.block_until_ready(run(model.params, toks))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(run(model.params, toks))
        best = min(best, time.perf_counter() - start)
    res["prefill"] = prefill / best
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prepare", action="store_true", help="write the llama.cpp source tarball (here, with pip)")
    p.add_argument("--src", default=".scratch/llama.cpp.tar.gz")
    p.add_argument("--work", default=".scratch/gpu_vs_llamacpp")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--small", action="store_true", help="tiny dimensions (a smoke test of the pipeline)")
    p.add_argument("--no-llama", action="store_true", help="skip building and running llama.cpp")
    p.add_argument("--llama-bench", help="a llama-bench built elsewhere (same source, CUDA, sm_90): no build here")
    p.add_argument("--build-only", action="store_true",
                   help="start the llama.cpp build in the background and return (measure other things meanwhile)")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--prefill", type=int, default=512)
    args = p.parse_args()
    if args.prepare:
        os.makedirs(os.path.dirname(args.src) or ".", exist_ok=True)
        prepare(args.src)
        return
    import jax

    os.makedirs(args.work, exist_ok=True)
    binary = None if args.no_llama else args.llama_bench or start_build(args.src, args.work)
    if args.build_only:
        return
    f16 = os.path.join(args.work, "model-f16.gguf")
    if not os.path.exists(f16):
        start = time.perf_counter()
        write_f16_gguf(f16, SMALL if args.small else LLAMA_8B, args.layers)
        print(f"wrote {f16} ({os.path.getsize(f16) / 1e9:.1f} GB) in {time.perf_counter() - start:.0f} s", flush=True)
    files = {"F16": f16}
    for mix in ("Q4_K_M", "Q8_0"):
        files[mix] = os.path.join(args.work, f"model-{mix}.gguf")
        stage(args.work, f"quantize {mix} s", functools.partial(quantize, f16, files[mix], mix))
    rows = {name: stage(args.work, f"jaxquant {name}", functools.partial(
                ours, path, "bfloat16" if name == "F16" else None, args.tokens, args.prefill))
            for name, path in files.items()}
    if binary is not None:
        if not args.llama_bench:
            wait_build(binary, args.work)
        for name, path in files.items():
            rows[name].update(stage(args.work, f"llama.cpp {name}", functools.partial(llama_bench, binary, path)))
    out = io.StringIO()
    out.write(f"{time.strftime('%Y-%m-%d')}, {jax.devices()[0].device_kind}, JAX {jax.__version__}, "
              f"{args.layers} layers\n\n| file | weights GB | jaxquant decode b1 | b8 (total) | "
              f"prefill {args.prefill} | llama.cpp tg128 | pp512 | decode x llama.cpp | prefill x llama.cpp |\n"
              "|---|---|---|---|---|---|---|---|---|\n")
    for name, r in rows.items():
        lc = (r.get("tg128"), r.get("pp512"))
        ratios = [f"{a / b:.2f}" if b else "-" for a, b in ((r["decode1"], lc[0]), (r["prefill"], lc[1]))]
        out.write(f"| {name} | {r['GB']:.2f} | {r['decode1']:.1f} | {r['decode8']:.1f} | {r['prefill']:.0f} | "
                  f"{lc[0] or 0:.1f} | {lc[1] or 0:.0f} | {ratios[0]} | {ratios[1]} |\n")
    print(out.getvalue())


if __name__ == "__main__":
    main()
