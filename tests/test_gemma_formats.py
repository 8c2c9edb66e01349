"""Every format against the real Gemma-3-270M GGUF: gguf-py's dequantize, exact round trips, and
llama.cpp's own quantization of the dequantized (float) model, with and without an imatrix."""

from __future__ import annotations

import hashlib

import gguf
import numpy as np
import pytest

import jaxquant as jq
import llama_oracle
from float_model import dequantized_gguf
from jaxquant.isq.imatrix import Imatrix, read_imatrix, write_imatrix

# quantizable type -> llama_ftype whose default type it is (llama_ftype_get_default_type)
FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K": 11, "Q4_K": 15,
          "Q5_K": 17, "Q6_K": 18, "IQ4_NL": 25, "IQ4_XS": 30, "TQ1_0": 36, "TQ2_0": 37, "MXFP4": 38,
          "IQ2_XXS": 19, "IQ2_XS": 20, "IQ3_XXS": 23, "IQ1_S": 24, "IQ3_S": 26, "IQ2_S": 29, "IQ1_M": 31}
# types llama-quantize refuses to write without an imatrix (tensor_requires_imatrix)
NEEDS_IMATRIX = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS")
MIN_MATCH = 0.999  # the bar: >= 99.9% of the blocks of every tensor byte-identical


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
def float_model(gemma_path, tmp_path_factory) -> str:
    """The shipped model dequantized to an F32 GGUF (the source llama-quantize starts from)."""
    return dequantized_gguf(gemma_path, str(tmp_path_factory.mktemp("gemma") / "gemma-f32.gguf"))


@pytest.fixture(scope="module")
def float_tensors(float_model) -> dict:
    return {t.name: t for t in gguf.GGUFReader(float_model).tensors}


@pytest.fixture(scope="module")
def imatrix(float_tensors, tmp_path_factory) -> dict[str, np.ndarray]:
    """An imatrix GGUF of random positive values for every blk.* matrix (the inputs llama-imatrix
    collects; not the embedding), read back as llama-quantize reads it: name -> weights."""
    rng = np.random.default_rng(7)
    im = Imatrix(datasets=["random"], chunk_count=10, chunk_size=512)
    for name, t in float_tensors.items():
        shape = _logical_shape(t)
        if name.startswith("blk.") and len(shape) == 2:
            im.sums[name] = rng.gamma(1.0, 1.0, (1, shape[-1])).astype(np.float32) * 5120
            im.counts[name] = np.array([5120], np.float32)
    path = str(tmp_path_factory.mktemp("imatrix") / "random.imatrix.gguf")
    write_imatrix(im, path)
    return read_imatrix(path).weights()


# (tensor, type, imatrix?) -> (digest of llama.cpp's bytes, differing blocks, total blocks). Another
# ftype's fallback can give a tensor the same type (the 640-wide ones are Q4_0 under Q2_K, Q3_K,
# TQ1_0 and TQ2_0); llama.cpp's bytes are then identical and jaxquant's need not be computed again.
_RESULTS: dict[tuple[str, str, bool], tuple[bytes, int, int]] = {}


def _check(label: str, results: dict[str, tuple[str, int, int]]) -> None:
    """Print the totals, the worst tensor and every inexact one (shown with ``-rP`` or ``-s``), then
    hold every tensor to the bar."""
    bad, total = sum(r[1] for r in results.values()), sum(r[2] for r in results.values())
    worst = max(results, key=lambda n: results[n][1] / results[n][2])
    print(f"{label}: {bad}/{total} blocks differ; worst {worst} {results[worst]}")
    for name, (type_name, b, t) in results.items():
        if b:
            print(f"  {name} ({type_name}): {b}/{t}")
    for name, (type_name, b, t) in results.items():
        assert b <= (1 - MIN_MATCH) * t, f"{name} ({type_name}): {b}/{t} blocks differ"


def _quantize_model_and_compare(type_name: str, float_model: str, float_tensors: dict, out: str,
                                imatrix: dict[str, np.ndarray] | None) -> None:
    """llama_model_quantize --pure of the float model to ``type_name`` (with ``imatrix``), then every
    quantized tensor against jq.quantize of the same floats to the type llama.cpp chose for it."""
    llama_oracle.model_quantize(float_model, out, FTYPES[type_name], pure=True, imatrix=imatrix)
    results = {}
    for t in gguf.GGUFReader(out).tensors:
        if t.tensor_type.name in ("F32", "F16", "BF16"):
            continue
        weights = None if imatrix is None else imatrix.get(t.name)
        ref = np.ascontiguousarray(t.data).view(np.uint8).reshape(-1)
        digest, key = hashlib.sha256(ref).digest(), (t.name, t.tensor_type.name, weights is not None)
        if _RESULTS.get(key, (None,))[0] != digest:
            x = np.asarray(float_tensors[t.name].data).reshape(_logical_shape(t))
            q = jq.quantize(x, t.tensor_type.name, weights, name=t.name)
            _RESULTS[key] = (digest, *llama_oracle.block_mismatch(q.format.to_bytes(q), ref, q.format.type_size))
        results[t.name] = (t.tensor_type.name + ("+imatrix" if weights is not None else ""), *_RESULTS[key][1:])
    assert type_name in {v[0].split("+")[0] for v in results.values()}
    assert imatrix is None or any(v[0].endswith("+imatrix") for v in results.values())
    _check(f"{type_name} {'imatrix' if imatrix else 'pure'}", results)


@pytest.mark.oracle
@pytest.mark.slow
@pytest.mark.parametrize("type_name", sorted(set(FTYPES) - set(NEEDS_IMATRIX)))
def test_quantize_equals_llama_quantize_pure(type_name, float_model, float_tensors, tmp_path):
    _quantize_model_and_compare(type_name, float_model, float_tensors, str(tmp_path / "ref.gguf"), None)


@pytest.mark.oracle
@pytest.mark.slow
@pytest.mark.parametrize("type_name", sorted(FTYPES))
def test_quantize_with_imatrix_equals_llama_quantize(type_name, float_model, float_tensors, imatrix, tmp_path):
    """The same with an imatrix file's weights (tensors without an entry, the embedding, have none)."""
    _quantize_model_and_compare(type_name, float_model, float_tensors, str(tmp_path / "ref.gguf"), imatrix)
