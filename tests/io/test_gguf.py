"""GGUF in and out, checked against gguf-py's own writer and reader, the original Gemma file and
llama.cpp; every bad file must give a FileFormatError that names the file and the problem."""

from __future__ import annotations

import filecmp
import os
import struct
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import gguf
import gguf_samples as gs
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGUFValueType as V
from time_limit import time_limit

import jaxquant as jq
import jaxquant.io.gguf as jgguf
from jaxquant.errors import FileFormatError, JaxquantError
from jaxquant.io import Deferred, GGUFSource, TensorInfo, open_model, write_gguf


def _same_value(ours, ref, vtype, sub) -> bool:
    if V.FLOAT32 in (vtype, sub):
        return np.array_equal(np.float32(ours), np.float32(ref))
    return ours == ref


@pytest.fixture
def sample(tmp_path):
    path = tmp_path / "sample.gguf"
    gs.write_sample(path)
    return path


def test_reads_what_gguf_py_wrote(sample):
    src = open_model(sample)
    assert isinstance(src, GGUFSource)
    assert list(src.metadata) == list(gs.METADATA)
    for key, (value, vtype, sub) in gs.METADATA.items():
        assert _same_value(src.metadata[key], value, vtype, sub), key
        assert src.value_types[key] == ((vtype,) if sub is None else (vtype, sub)), key
    tensors = gs.sample_tensors()
    assert src.tensor_names == list(tensors)
    for name, (type_name, shape, data) in tensors.items():
        assert src.info(name) == TensorInfo(name, shape, type_name, data.nbytes)
        assert np.array_equal(src.raw(name), data)
        x = src.load(name)
        if type_name in ("F32", "F16"):
            assert x.dtype == jnp.dtype(type_name.lower().replace("f", "float")) and x.shape == shape
            assert np.array_equal(np.asarray(x).reshape(-1).view(np.uint8), data)
        else:  # packed as it is in the file, never through floats
            assert isinstance(x, jq.QTensor) and (x.fmt, x.shape) == (type_name, shape)
            assert np.array_equal(jq.get_format(type_name).to_bytes(x).reshape(-1), data)
    cfg = src.config
    assert (cfg.arch, cfg.vocab_size, cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == \
        ("llama", 32, 64, 4, 2, 16)
    assert (cfg.rope_theta, cfg.rope_neox, cfg.bos_id, cfg.eos_ids, cfg.tie_embeddings) == \
        (500000.0, False, 29, (30,), True)


def test_custom_alignment(tmp_path):
    path = tmp_path / "aligned.gguf"
    gs.write_sample(path, alignment=256)
    src = open_model(path)
    assert src.alignment == 256 and all(src.offset(n) % 256 == 0 for n in src.tensor_names)
    out = tmp_path / "back.gguf"
    write_gguf(out, src.metadata, {n: src.load(n) for n in src.tensor_names}, src.value_types)
    assert filecmp.cmp(path, out, shallow=False)


def test_chunked_loading_equals_one_piece(sample, monkeypatch):
    monkeypatch.setattr(jgguf, "CHUNK_BYTES", 100)  # every tensor goes through several row chunks
    src = open_model(sample)
    for name in src.tensor_names:
        info = src.info(name)
        whole = jq.get_format(info.type).from_bytes(src.raw(name), info.shape)
        chunked = src.load(name)
        pairs = [(chunked, whole)] if not isinstance(whole, jq.QTensor) else \
            [(chunked.arrays[k], whole.arrays[k]) for k in whole.arrays]
        for a, b in pairs:
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8)), name


def test_gguf_py_reads_what_we_wrote(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    q4k = jq.quantize(x, "Q4_K")
    tensors = {"a.weight": jnp.asarray(x[:2, :64]), "b.weight": jnp.asarray(x[0], jnp.bfloat16),
               "c.weight": q4k, "d.weight": Deferred(TensorInfo("d.weight", (4, 256), "Q4_K", q4k.nbytes), lambda: q4k),
               "e.weight": np.arange(6, dtype=np.int32).reshape(2, 3)}
    metadata = {"general.architecture": "llama", "x.u": 7, "x.neg": -3, "x.big": 2**40, "x.f": 0.5, "x.s": "é",
                "x.b": True, "x.ints": [1, -2], "x.strs": ["a", "bc"], "x.floats": [0.25, 1.0], "x.typed": 9}
    path = tmp_path / "ours.gguf"
    write_gguf(path, metadata, tensors, {"x.typed": (V.UINT8,)})
    r = gguf.GGUFReader(path)
    want_types = {"general.architecture": [V.STRING], "x.u": [V.UINT32], "x.neg": [V.INT32], "x.big": [V.INT64],
                  "x.f": [V.FLOAT32], "x.s": [V.STRING], "x.b": [V.BOOL], "x.ints": [V.ARRAY, V.INT32],
                  "x.strs": [V.ARRAY, V.STRING], "x.floats": [V.ARRAY, V.FLOAT32], "x.typed": [V.UINT8]}
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert list(fields) == list(metadata)
    for key, field in fields.items():
        assert field.types == want_types[key], key
        assert field.contents() == metadata[key], key
    q_bytes = jq.get_format("Q4_K").to_bytes(q4k).reshape(-1)
    want = {"a.weight": ("F32", (2, 64), x[:2, :64].view(np.uint8).reshape(-1)),
            "b.weight": ("BF16", (256,), np.asarray(jnp.asarray(x[0], jnp.bfloat16)).view(np.uint8)),
            "c.weight": ("Q4_K", (4, 256), q_bytes), "d.weight": ("Q4_K", (4, 256), q_bytes),
            "e.weight": ("I32", (2, 3), np.arange(6, dtype=np.int32).view(np.uint8))}
    assert [t.name for t in r.tensors] == list(want)
    for t in r.tensors:
        type_name, shape, data = want[t.name]
        assert t.tensor_type.name == type_name and tuple(reversed(t.shape.tolist())) == shape, t.name
        assert np.array_equal(np.asarray(t.data).reshape(-1).view(np.uint8), data), t.name
        assert t.data_offset % gguf.GGUF_DEFAULT_ALIGNMENT == 0
    assert not list(tmp_path.glob("*.tmp"))


def test_write_rejects_inconsistent_input(tmp_path):
    q = jq.quantize(np.ones((2, 32), np.float32), "Q8_0")
    with pytest.raises(JaxquantError, match="general.architecture"):
        write_gguf(tmp_path / "x.gguf", {}, {})
    lying = Deferred(TensorInfo("t", (4, 32), "Q8_0", 4 * 34), lambda: q)
    with pytest.raises(JaxquantError, match=r"'t': loaded as Q8_0 \(2, 32\) \(68 bytes\), its info says Q8_0 "
                       r"\(4, 32\) \(136 bytes\)"):
        write_gguf(tmp_path / "x.gguf", {"general.architecture": "llama"}, {"t": lying})
    with pytest.raises(JaxquantError, match="empty array"):
        write_gguf(tmp_path / "x.gguf", {"general.architecture": "llama", "k": []}, {}, {"k": (V.ARRAY, V.INT32)})
    assert not list(tmp_path.iterdir())  # nothing half-written is left behind


def test_the_next_tensor_loads_while_one_is_written(tmp_path, monkeypatch):
    """Writing tensor 0 waits until tensor 1 has started loading: a writer that loaded only after
    writing would time out here. The file still holds every tensor, in order."""
    started = [threading.Event() for _ in range(3)]

    def deferred(i):
        def load():
            started[i].set()
            return np.full((2, 32), i, np.float32)
        return Deferred(TensorInfo(f"t{i}", (2, 32), "F32", 256), load)

    orig = gguf.GGUFWriter.write_tensor_data
    written = []

    def write(self, data, *args, **kwargs):
        i = len(written)
        if i + 1 < len(started):
            assert started[i + 1].wait(10), f"tensor {i + 1} did not start loading while tensor {i} was written"
        written.append(i)
        return orig(self, data, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", write)
    write_gguf(tmp_path / "x.gguf", {"general.architecture": "llama"}, {f"t{i}": deferred(i) for i in range(3)})
    src = open_model(tmp_path / "x.gguf")
    assert written == [0, 1, 2]
    assert [float(np.asarray(src.load(f"t{i}"))[0, 0]) for i in range(3)] == [0.0, 1.0, 2.0]


# ---- the real model --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def written_gemma(gemma_path, tmp_path_factory):
    src = open_model(gemma_path)
    out = tmp_path_factory.mktemp("roundtrip") / "gemma.gguf"
    write_gguf(out, src.metadata, {n: src.deferred(n) for n in src.tensor_names}, src.value_types)
    return out


def test_gemma_round_trip(gemma_path, written_gemma):
    src, back = open_model(gemma_path), open_model(written_gemma)
    assert list(back.metadata) == list(src.metadata) and back.metadata == src.metadata
    assert back.value_types == src.value_types
    assert back.tensor_names == src.tensor_names
    for name in src.tensor_names:
        assert back.info(name) == src.info(name) and back.offset(name) == src.offset(name)
        assert np.array_equal(back.raw(name), src.raw(name)), name
    assert filecmp.cmp(gemma_path, written_gemma, shallow=False)  # the whole file, byte for byte
    # the tensors went through QTensors, packed as in the file
    assert {type(src.load(n)).__name__ for n in src.tensor_names if src.info(n).type != "F32"} == {"QTensor"}


@pytest.mark.oracle
@pytest.mark.slow
def test_llama_cpp_gives_the_same_logits(gemma_path, written_gemma):
    import llama_cpp

    def logits(path) -> np.ndarray:
        llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=64, n_threads=2, verbose=False)
        tokens = llm.tokenize(b"The capital of France is Paris; 2 + 2 = 4.\n  def f(x):", add_bos=True)
        llm.eval(tokens)
        return np.array(llm.scores[:len(tokens)])

    ref, ours = logits(gemma_path), logits(written_gemma)
    assert ref.shape[1] == 262144 and np.isfinite(ref).all()
    assert np.array_equal(ours, ref)


def test_gemma_peak_memory_under_1_5x_file_size(gemma_path):
    """Loading every tensor of the Gemma GGUF: peak resident memory above the process's baseline
    (python + jax) stays below 1.5x the file size."""
    script = textwrap.dedent(f"""
        import jax.numpy as jnp
        from jaxquant.io import open_model
        def kib(key):
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))
        jnp.zeros(8).block_until_ready()
        base = kib("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")  # restart the VmHWM peak from here
        src = open_model({str(gemma_path)!r})
        params = {{n: src.load(n) for n in src.tensor_names}}
        print(base, kib("VmHWM"))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    base, peak = map(int, out.stdout.split())
    ratio = (peak - base) * 1024 / os.path.getsize(gemma_path)
    print(f"peak above baseline: {(peak - base) / 1024:.0f} MiB = {ratio:.2f}x the file")
    assert ratio < 1.5


# ---- bad files ---------------------------------------------------------------------------------------

def _patch(blob: bytes, offset: int, new: bytes) -> bytes:
    return blob[:offset] + new + blob[offset + len(new):]


def _ti(blob: bytes, name: str, field: str, n_dims: int = 2) -> int:
    """Offset of a field of a tensor's info record."""
    pos = gs.tensor_info_offset(blob, name) + 8 + len(name)
    return {"n_dims": pos, "ne0": pos + 4, "type": pos + 4 + 8 * n_dims, "offset": pos + 8 + 8 * n_dims}[field]


def _kv(blob: bytes, key: str) -> int:
    """Offset of the value type of a metadata key."""
    return blob.index(len(key).to_bytes(8, "little") + key.encode()) + 8 + len(key)


def _bad_cases(blob: bytes) -> dict[str, tuple[bytes, str]]:
    q, k = "blk.0.attn_q.weight", "blk.0.attn_k.weight"
    u32, u64 = (lambda v: struct.pack("<I", v)), (lambda v: struct.pack("<Q", v))
    where_q = f"tensor {q!r} (tensor info at offset {gs.tensor_info_offset(blob, q)})"
    return {
        "empty": (b"", "truncated"),
        "truncated header": (blob[:20], "runs past the end of the file (20 bytes)"),
        "truncated metadata": (blob[:_kv(blob, "tokenizer.ggml.scores") + 100], "runs past the end"),
        "truncated tensor info": (blob[:_ti(blob, k, "type")], "runs past the end"),
        "truncated data": (blob[:-100], f"tensor {k!r}"),
        "wrong magic": (b"GGUX" + blob[4:], "wrong magic b'GGUX' at offset 0"),
        "not gguf": (b"hello, world\n" * 10, "wrong magic"),
        "version 1": (_patch(blob, 4, u32(1)), "unsupported GGUF version 1 at offset 4"),
        "version 4": (_patch(blob, 4, u32(4)), "unsupported GGUF version 4"),
        "big-endian": (_patch(blob, 4, (3).to_bytes(4, "big")), "big-endian"),
        "unknown type id": (_patch(blob, _ti(blob, q, "type"), u32(99)), f"tensor {q!r}"),
        "removed type id": (_patch(blob, _ti(blob, q, "type"), u32(4)), "unknown type id 4 at offset"),
        "duplicate tensor names": (blob.replace(k.encode(), q.encode()), f"duplicate tensor name {q!r}"),
        "data past the end": (_patch(blob, _ti(blob, q, "offset"), u64(1 << 20)),
                              f"{where_q}: data offset 1048576, expected 2432"),
        "misaligned data": (_patch(blob, _ti(blob, k, "offset"), u64(
            struct.unpack_from("<Q", blob, _ti(blob, k, "offset"))[0] + 2)), "not a multiple of the alignment 32"),
        "overlapping data": (_patch(blob, _ti(blob, k, "offset"), u64(0)), "data offset 0, expected 4736"),
        "bad row length": (_patch(blob, _ti(blob, q, "ne0"), u64(48)),
                           "row length 48 is not a multiple of the Q4_0 block size 32"),
        "too many dims": (_patch(blob, _ti(blob, "output_norm.weight", "n_dims"), u32(7)), "7 dimensions"),
        "huge dims": (_patch(blob, _ti(blob, q, "ne0"), u64(2**63 + 32)), "overflow"),
        "unknown value type": (_patch(blob, _kv(blob, "general.name"), u32(99)), "unknown metadata value type 99"),
        "huge array": (_patch(blob, _kv(blob, "tokenizer.ggml.scores") + 8, u64(2**62)), "runs past the end"),
        "huge string array": (_patch(blob, _kv(blob, "tokenizer.ggml.tokens") + 8, u64(2**62)),
                              f"{2**62} strings need at least {2**65} bytes"),
        "huge string": (_patch(blob, _kv(blob, "general.name") + 4, u64(2**40)), "runs past the end"),
        "nested array": (_patch(blob, _kv(blob, "test.bytes") + 4, u32(V.ARRAY)), "nested metadata array"),
        "duplicate key": (blob.replace(b"test.bytes", b"test.int64"), "Duplicate test.int64"),
        "bad key utf-8": (blob.replace(b"test.int8", b"test.\xffnt8"), "metadata key b'test.\\xffnt8' (the one after"),
        "bad name utf-8": (blob.replace(q.encode(), b"blk.0.attn_\xff.weight"), "not valid UTF-8"),
        "huge tensor count": (_patch(blob, 8, u64(2**40)), f"{2**40} tensor infos (tensor count at offset 8) need"),
        "huge kv count": (_patch(blob, 16, u64(2**40)), f"{2**40} metadata entries (kv count at offset 16) need"),
        # each empty tensor info would take 24 bytes: 2M of them were parsed before failing
        "huge tensor count, zero bytes": (blob[:8] + u64(2**40) + u64(0) + bytes(48 << 20),
                                          "tensor infos (tensor count at offset 8) need at least"),
        "empty tensor name": (blob[:8] + u64(1) + u64(0) + bytes(64), "empty tensor name (tensor info at offset 24)"),
    }


BAD_CASES = [
    "empty", "truncated header", "truncated metadata", "truncated tensor info", "truncated data", "wrong magic",
    "not gguf", "version 1", "version 4", "big-endian", "unknown type id", "removed type id",
    "duplicate tensor names", "data past the end", "misaligned data", "overlapping data", "bad row length",
    "too many dims", "huge dims", "unknown value type", "huge array", "huge string array", "huge string",
    "nested array", "duplicate key", "bad key utf-8", "bad name utf-8", "huge tensor count", "huge kv count",
    "huge tensor count, zero bytes", "empty tensor name"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_file(sample, tmp_path, case):
    blob, message = _bad_cases(sample.read_bytes())[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(blob)
    with pytest.raises(FileFormatError) as e:
        src = open_model(path)
        for name in src.tensor_names:
            src.load(name)
    assert str(path) in str(e.value) and message in str(e.value), str(e.value)


def test_bad_cases_change_the_file(sample):
    blob = sample.read_bytes()
    cases = _bad_cases(blob)
    assert list(cases) == BAD_CASES and all(bad != blob for bad, _ in cases.values())


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    path = tmp_path / "x.gguf"
    write_gguf(path, {"general.architecture": "mamba"}, {})
    src = open_model(path)  # opening and inspecting work for any architecture
    with pytest.raises(JaxquantError, match=r"'mamba' is not supported; supported architectures: llama, qwen2"):
        _ = src.config


# ---- files that used to hang, or to fail with a raw exception -------------------------------------------

def _tiny(tmp_path, **kwargs) -> tuple[Path, bytes]:
    path = tmp_path / "tiny.gguf"
    gs.write_tiny_llama(path, **kwargs)
    return path, path.read_bytes()


def test_huge_block_count_fails_at_once(tmp_path):
    """block_count 2**32 - 1 once made load_params list 40 billion tensor names (a hang, memory growing)."""
    path, blob = _tiny(tmp_path)
    path.write_bytes(_patch(blob, _kv(blob, "llama.block_count") + 4, struct.pack("<I", 2**32 - 1)))
    with time_limit(30), pytest.raises(FileFormatError, match=r"llama model of 4294967295 layers has tensors for 1 "
                                                              r"of them \(none for layer 1\)"):
        jq.load(path)


def test_changed_alignment_is_refused_or_harmless(tmp_path):
    """A file written with general.alignment 64 whose key now says otherwise: where that moves the
    start of the data (every tensor would shift), the file is refused; where it does not, the
    tensors read as written."""
    path, blob = _tiny(tmp_path, alignment=64)
    src = open_model(path)
    written = {n: bytes(src.raw(n)) for n in src.tensor_names}
    refused = []
    for alignment in (1, 2, 8, 16, 32, 128, 256, 512, 4096):
        path = tmp_path / f"a{alignment}.gguf"
        path.write_bytes(_patch(blob, _kv(blob, "general.alignment") + 4, struct.pack("<I", alignment)))
        try:
            other = open_model(path)
        except FileFormatError as e:
            assert "alignment" in str(e), str(e)
            refused.append(alignment)
        else:
            assert {n: bytes(other.raw(n)) for n in other.tensor_names} == written, alignment
    assert len(refused) >= 5, refused


def test_llama_cpp_nvfp4_is_not_jaxquants(tmp_path):
    """GGML type 40 (llama.cpp's NVFP4, blocks of 64) is not jaxquant's NVFP4 (blocks of 16)."""
    tensors = gs.sample_tensors()
    tensors["blk.0.attn_v.weight"] = ("NVFP4", (32, 64), np.zeros(32 * 36, np.uint8))  # 36-byte blocks of 64
    gs.write_sample(tmp_path / "nv.gguf", tensors)
    src = open_model(tmp_path / "nv.gguf")
    assert src.info("blk.0.attn_v.weight").type == "NVFP4"  # inspecting it works
    with pytest.raises(JaxquantError, match=r"'blk.0.attn_v.weight' has GGML type NVFP4 \(id 40\), which jaxquant "
                                            r"cannot load"):
        src.load("blk.0.attn_v.weight")


def test_zero_dimension_loads_dequantizes_and_inspects(tmp_path, capsys):
    """A tensor with no rows is valid for llama.cpp: it loads with its blocks' shape, dequantizes as
    gguf-py does, and inspect counts it (it was ZeroDivisionError in both)."""
    from jaxquant.cli import main

    tensors = gs.sample_tensors()
    tensors["blk.0.attn_v.weight"] = ("Q5_1", (0, 64), np.zeros(0, np.uint8))
    gs.write_sample(tmp_path / "zero.gguf", tensors)
    q = open_model(tmp_path / "zero.gguf").load("blk.0.attn_v.weight")
    assert {k: a.shape for k, a in q.arrays.items()} == {"d": (0, 2), "m": (0, 2), "qh": (0, 2, 4), "qs": (0, 2, 16)}
    assert gguf.GGUFReader(tmp_path / "zero.gguf").tensors[-1].data.shape == (0, 48)  # gguf-py agrees: no rows
    y = q.dequantize()
    assert (y.shape, y.dtype) == ((0, 64), np.float32)
    assert main(["inspect", str(tmp_path / "zero.gguf")]) == 0
    assert "\nQ5_1             1             0  0.0000            0\n" in capsys.readouterr().out


def test_tensor_name_without_a_dot(tmp_path):
    tensors = gs.sample_tensors()
    tensors["nodot"] = ("F32", (64,), np.zeros(64, np.float32).view(np.uint8))
    gs.write_sample(tmp_path / "nodot.gguf", tensors)
    with pytest.raises(FileFormatError, match="tensor 'nodot' is not used by the llama architecture"):
        jq.load(tmp_path / "nodot.gguf")


def test_a_failed_write_leaves_nothing_and_a_write_over_a_file_replaces_it(tmp_path):
    out = tmp_path / "x.gguf"
    out.write_bytes(b"old")
    meta = {"general.architecture": "llama"}
    with pytest.raises(JaxquantError, match="'t': loaded as"):
        lying = Deferred(TensorInfo("t", (2, 32), "F32", 256), lambda: np.zeros((1, 32), np.float32))
        write_gguf(out, meta, {"t": lying})
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf"]
    write_gguf(out, meta, {"t": np.ones((2, 32), np.float32)})
    assert open_model(out).tensor_names == ["t"] and sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf"]
