"""Acceptance of the llama.cpp mixes on the real model: for every preset, `jaxquant quantize` of the
float Gemma-3-270M GGUF chooses llama_model_quantize's type for every tensor and writes the same
blocks (>= 99.9%), as a mix, with --pure and with an imatrix file; the written GGUF gives
llama.cpp's logits; requantizing the shipped Q4_K_M file equals llama-quantize --allow-requantize;
peak memory of streaming ISQ."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import textwrap

import gguf
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.cli import main as cli
from jaxquant.errors import PolicyError
from jaxquant.io import open_model
from jaxquant.isq import PRESETS, mixes, preset
from jaxquant.isq.imatrix import Imatrix, read_imatrix, write_imatrix

pytestmark = [pytest.mark.oracle, pytest.mark.slow]
MIN_MATCH = 0.999


def llama_quantize(src: str, dst: str, mix: str, pure: bool = False, imatrix: dict[str, np.ndarray] | None = None,
                   requantize: bool = False, refused: bool = False) -> None:
    """llama_model_quantize (2 threads) with llama-quantize's imatrix values (name -> sums / counts);
    ``refused``: expect it to fail (a mix that needs an imatrix it was not given)."""
    import llama_cpp
    import llama_cpp._logger

    llama_cpp._logger.set_verbose(False)  # its per-tensor log would drown the numbers printed here
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.pure, params.nthread, params.allow_requantize = mixes.FTYPES[mix][0], pure, 2, requantize
    keep = []
    if imatrix is not None:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, w) in enumerate(sorted(imatrix.items())):
            w = np.ascontiguousarray(w, np.float32)
            keep.append(w)
            entries[i].name, entries[i].size = name.encode(), w.size
            entries[i].data = w.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        params.imatrix = entries
    assert (llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) != 0) == refused


def block_digests(raw: np.ndarray, type_size: int) -> np.ndarray:
    """A 64-bit hash per block (to compare against many reference files without keeping bytes)."""
    blocks = np.asarray(raw).reshape(-1).view(np.uint8).reshape(-1, type_size)
    mult = np.random.default_rng(type_size).integers(1, 2**63, type_size, dtype=np.uint64) | np.uint64(1)
    out = np.empty(blocks.shape[0], np.uint64)
    for i in range(0, blocks.shape[0], 1 << 16):
        out[i:i + (1 << 16)] = (blocks[i:i + (1 << 16)].astype(np.uint64) * mult).sum(axis=1, dtype=np.uint64)
    return out


class Ours:
    """jaxquant's blocks for (tensor, format, imatrix?), each computed once per session, kept as digests."""

    def __init__(self, path: str):
        self.source = open_model(path)
        self.cache: dict[tuple[str, str, bool], np.ndarray] = {}

    def digests(self, name: str, fmt: str, weights: np.ndarray | None) -> np.ndarray:
        key = (name, fmt, weights is not None)
        if key not in self.cache:
            q = jq.quantize(self.source.load(name), fmt, weights, name=name)
            self.cache[key] = block_digests(q.format.to_bytes(q), q.format.type_size)
        return self.cache[key]


@pytest.fixture(scope="session")
def ours(float_gemma) -> Ours:
    return Ours(float_gemma)


@pytest.fixture(scope="session")
def imatrix_file(float_gemma, tmp_path_factory) -> str:
    """A llama-imatrix-shaped file with random positive sums for every blk.* matrix (as llama-imatrix
    collects: matmul inputs of the blocks, not the embeddings)."""
    src, rng = open_model(float_gemma), np.random.default_rng(11)
    im = Imatrix(datasets=["random"], chunk_count=10, chunk_size=512)
    for name in src.tensor_names:
        shape = src.info(name).shape
        if name.startswith("blk.") and len(shape) == 2:
            im.sums[name] = rng.gamma(1.0, 1.0, (1, shape[-1])).astype(np.float32) * 5120
            im.counts[name] = np.array([5120], np.float32)
    path = str(tmp_path_factory.mktemp("imatrix") / "random.imatrix.gguf")
    write_imatrix(im, path)
    return path


@pytest.mark.parametrize("variant", ["mix", "pure", "imatrix"])
@pytest.mark.parametrize("mix", PRESETS)
def test_preset_types_and_blocks_equal_llama_quantize(mix, variant, float_gemma, ours, imatrix_file, tmp_path):
    weights = read_imatrix(imatrix_file).weights() if variant == "imatrix" else None
    ref_path = str(tmp_path / "ref.gguf")
    policy = preset(mix, pure=variant == "pure")
    needs = policy.plan(ours.source, has_imatrix=weights is not None, check=False).needs_imatrix
    llama_quantize(float_gemma, ref_path, mix, pure=variant == "pure", imatrix=weights, refused=needs is not None)
    if needs is not None:  # both refuse, before any work
        with pytest.raises(PolicyError, match=f"requires an importance matrix! offending tensor: {needs.name}"):
            policy.plan(ours.source)
        return
    plan = policy.plan(ours.source, has_imatrix=weights is not None)
    ref = gguf.GGUFReader(ref_path)
    assert plan.types == {t.name: t.tensor_type.name for t in ref.tensors}
    assert [c.name for c in plan.choices] == [t.name for t in ref.tensors]  # llama.cpp's order
    bad = total = 0
    for t in ref.tensors:
        c = plan[t.name]
        if not c.requantize:
            continue
        fmt = jq.get_format(c.format)
        mine = ours.digests(t.name, c.format, None if weights is None else weights.get(t.name))
        d = int((mine != block_digests(t.data, fmt.type_size)).sum())
        assert d <= (1 - MIN_MATCH) * mine.size, f"{t.name} ({c.format}): {d}/{mine.size} blocks differ"
        bad, total = bad + d, total + mine.size
    print(f"{mix}/{variant}: {bad} / {total} blocks differ")
    assert bad <= (1 - MIN_MATCH) * total


def test_cli_writes_llama_quantizes_file_byte_for_byte(float_gemma, tmp_path):
    """`jaxquant quantize F32.gguf out.gguf --type Q4_K_M`: the very file llama_model_quantize writes
    (metadata, general.file_type, tensor order, alignment, every byte)."""
    ref, out = str(tmp_path / "ref.gguf"), str(tmp_path / "out.gguf")
    llama_quantize(float_gemma, ref, "Q4_K_M")
    assert cli(["quantize", float_gemma, out, "--type", "Q4_K_M", "--no-progress"]) == 0
    assert open(out, "rb").read() == open(ref, "rb").read()


def _logits(path: str) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(path, logits_all=True, n_ctx=64, n_threads=2, verbose=False)
    tokens = llm.tokenize(b"The capital of France is Paris; 2 + 2 = 4.\n  def f(x):", add_bos=True)
    llm.eval(tokens)
    return np.array(llm.scores[:len(tokens)])


@pytest.mark.parametrize("mix", ["IQ4_XS", "Q3_K_M", "IQ2_XXS", "IQ1_M", "IQ3_M"])
def test_written_gguf_gives_llama_cpps_logits(mix, float_gemma, imatrix_file, tmp_path):
    """With an imatrix file: the GGUF jaxquant writes loads in llama.cpp and gives the logits of
    llama.cpp's own quantization of that type."""
    ref, out = str(tmp_path / "ref.gguf"), str(tmp_path / "out.gguf")
    llama_quantize(float_gemma, ref, mix, imatrix=read_imatrix(imatrix_file).weights())
    assert cli(["quantize", float_gemma, out, "--type", mix, "--imatrix", imatrix_file, "--no-progress"]) == 0
    meta = gguf.GGUFReader(out).fields
    assert meta["quantize.imatrix.file"].contents() == imatrix_file  # provenance, as llama-quantize writes it
    assert meta["quantize.imatrix.entries_count"].contents() == 18 * 7
    want, got = _logits(ref), _logits(out)
    assert got.shape == want.shape and np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * np.abs(want).max())


def test_requantizing_the_shipped_file_equals_llama_quantize(gemma_path, tmp_path):
    """Q4_K_M GGUF -> Q4_0: every quantized tensor dequantized and quantized again, as
    llama-quantize --allow-requantize (tensors already of the target type are copied)."""
    ref, out = str(tmp_path / "ref.gguf"), str(tmp_path / "out.gguf")
    llama_quantize(gemma_path, ref, "Q4_0", requantize=True)
    assert cli(["quantize", gemma_path, out, "--type", "Q4_0", "--no-progress"]) == 0
    a, b = gguf.GGUFReader(out), gguf.GGUFReader(ref)
    assert [(t.name, t.tensor_type) for t in a.tensors] == [(t.name, t.tensor_type) for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors):
        size = gguf.GGML_QUANT_SIZES[y.tensor_type][1]
        d = int((block_digests(x.data, size) != block_digests(y.data, size)).sum())
        assert d <= (1 - MIN_MATCH) * (x.data.nbytes // size), (x.name, d)


def test_streaming_peak_memory(float_gemma):
    """quantize_model on the float model: peak resident memory above the baseline (python, jax, the
    opened file) stays under the quantized model plus two float tensors."""
    script = textwrap.dedent(f"""
        import json, math
        import jax
        from jaxquant.io import open_model
        from jaxquant.isq.apply import quantize_model
        def kib(key):
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))
        src = open_model({float_gemma!r})
        jax.numpy.zeros(1).block_until_ready()
        base = kib("VmRSS")
        out = quantize_model(src, "Q4_K_M", show_progress=False)
        jax.block_until_ready(out)
        packed = sum(x.nbytes for x in out.values())
        biggest = max(4 * math.prod(src.info(n).shape) for n in src.tensor_names)
        print(json.dumps({{"peak": (kib("VmHWM") - base) * 1024, "packed": packed, "float": biggest}}))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    r = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"peak {r['peak'] / 2**20:.0f} MiB, packed {r['packed'] / 2**20:.0f} MiB, float {r['float'] / 2**20:.0f} MiB")
    assert r["peak"] <= r["packed"] + 2 * r["float"]

