"""Every format against the real Gemma-3-270M GGUF: gguf-py's dequantize, exact round trips, and
llama.cpp's own quantization of the dequantized (float) model, with and without an imatrix."""

from __future__ import annotations

import ctypes

import gguf
import jax
import numpy as np
import pytest

import jaxquant as jq
import llama_oracle

# quantizable type -> llama_ftype whose default type it is (llama_ftype_get_default_type)
FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K": 11, "Q4_K": 15,
          "Q5_K": 17, "Q6_K": 18, "IQ4_NL": 25, "IQ4_XS": 30, "TQ1_0": 36, "TQ2_0": 37, "MXFP4": 38}
MIN_MATCH = 0.999  # the bar: >= 99.9% of the blocks of every tensor byte-identical

_dequant = jax.jit(lambda q: q.dequantize())


@pytest.fixture(scope="module")
def reader(gemma_path) -> gguf.GGUFReader:
    return gguf.GGUFReader(gemma_path)


def _logical_shape(t) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(t.shape.tolist()))  # gguf-py lists ne0 (row length) first


def test_dequantize_equals_gguf_py_on_every_tensor(reader):
    assert {t.tensor_type.name for t in reader.tensors} == {"F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"}
    for t in reader.tensors:
        fmt = jq.get_format(t.tensor_type.name)
        ours = np.asarray(jq.dequantize(fmt.from_bytes(t.data, _logical_shape(t)), "float32"))
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours.shape)
        assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), t.name


def test_bytes_round_trip_on_every_tensor(reader):
    for t in reader.tensors:
        fmt = jq.get_format(t.tensor_type.name)
        back = fmt.to_bytes(fmt.from_bytes(t.data, _logical_shape(t)))
        assert np.array_equal(back.reshape(-1).view(np.uint8), np.asarray(t.data).reshape(-1).view(np.uint8)), t.name


@pytest.fixture(scope="module")
def float_model(reader, tmp_path_factory) -> str:
    """The shipped model dequantized to an F32 GGUF (the source llama-quantize starts from)."""
    path = str(tmp_path_factory.mktemp("gemma") / "gemma-f32.gguf")
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(path, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(key, field.contents(), vtype)
    w.add_file_type(0)  # ALL_F32 replaces general.file_type
    for t in reader.tensors:
        w.add_tensor(t.name, gguf.quants.dequantize(t.data, t.tensor_type).reshape(_logical_shape(t)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _llama_quantize(src: str, dst: str, ftype: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.pure = True
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) == 0


@pytest.mark.oracle
@pytest.mark.slow
@pytest.mark.parametrize("type_name", sorted(FTYPES))
def test_quantize_equals_llama_quantize_pure(type_name, float_model, tmp_path):
    out = str(tmp_path / f"{type_name}.gguf")
    _llama_quantize(float_model, out, FTYPES[type_name])
    src = {t.name: t for t in gguf.GGUFReader(float_model).tensors}
    checked = set()
    for t in gguf.GGUFReader(out).tensors:
        if t.tensor_type.name in ("F32", "F16", "BF16"):
            continue
        x = np.asarray(src[t.name].data).reshape(_logical_shape(t))
        q = jq.quantize(x, t.tensor_type.name, name=t.name)
        bad, total = llama_oracle.block_mismatch(q.format.to_bytes(q), np.asarray(t.data), q.format.type_size)
        assert bad <= (1 - MIN_MATCH) * total, f"{t.name} ({t.tensor_type.name}): {bad}/{total} blocks differ"
        checked.add(t.tensor_type.name)
    assert type_name in checked


@pytest.mark.oracle
@pytest.mark.slow
@pytest.mark.parametrize("type_name", sorted(FTYPES))
def test_quantize_with_imatrix_equals_llama_cpp(type_name, float_model):
    """llama_model_quantize takes its imatrix as a C++ map, so the oracle here is the function it
    calls per tensor, ggml_quantize_chunk, given the same random positive importance weights."""
    rng = np.random.default_rng(7)
    fmt = jq.get_format(type_name)
    for t in gguf.GGUFReader(float_model).tensors:
        shape = _logical_shape(t)
        if len(shape) != 2 or t.name == "token_embd.weight" or shape[-1] % fmt.block_size:
            continue  # llama.cpp's imatrix has entries for matmul inputs only
        x = np.asarray(t.data).reshape(shape)
        imatrix = rng.gamma(1.0, 1.0, shape[-1]).astype(np.float32)
        q = jq.quantize(x, fmt, imatrix, name=t.name)
        bad, total = llama_oracle.block_mismatch(q.format.to_bytes(q), llama_oracle.quantize(x, type_name, imatrix),
                                                 fmt.type_size)
        assert bad <= (1 - MIN_MATCH) * total, f"{t.name} ({type_name}+imatrix): {bad}/{total} blocks differ"
