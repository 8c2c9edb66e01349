"""Per-tensor error report vs llama.cpp's quantized bytes dequantized by gguf-py."""

from __future__ import annotations

import os
import sys

import gguf
import llama_oracle
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "isq"))
from fake_source import llama_like  # noqa: E402

from jaxquant.eval.error import format_errors, tensor_errors  # noqa: E402


class RandomSource:
    """A small Llama-shaped F32 model with deterministic random weights of varied scales."""

    def __init__(self):
        self.fake = llama_like(n_layer=2, hidden=256, ff=512)
        self.metadata, self.path, self.tensor_names, self.info = (
            self.fake.metadata, self.fake.path, self.fake.tensor_names, self.fake.info)

    @property
    def config(self):
        raise AssertionError("not needed")

    def load(self, name: str) -> np.ndarray:
        rng = np.random.default_rng(abs(hash(name)) % 2**32)
        shape = self.fake.shapes[name]
        return (rng.standard_normal(shape) * rng.uniform(0.01, 2)).astype(np.float32)


def _oracle(x: np.ndarray, fmt: str, imp: np.ndarray | None) -> tuple[float, float]:
    q = gguf.quants.dequantize(llama_oracle.quantize(x, fmt, imp), gguf.GGMLQuantizationType[fmt]).reshape(x.shape)
    d2, w2 = (x.astype(np.float64) - q) ** 2, x.astype(np.float64) ** 2
    imp = np.ones(x.shape[-1]) if imp is None else imp.astype(np.float64)
    return float(np.sqrt(d2.sum() / w2.sum())), float(np.sqrt((d2 * imp).sum() / (w2 * imp).sum()))


@pytest.mark.parametrize(("mix", "with_imatrix"),
                         [("Q4_0", False), pytest.param("Q4_K_M", True, marks=pytest.mark.slow)])
def test_errors_vs_llama_cpp(mix, with_imatrix):
    src = RandomSource()
    rng = np.random.default_rng(1)
    imatrix = {n: rng.uniform(0.1, 4, src.fake.shapes[n][-1]).astype(np.float32)
               for n in src.tensor_names if len(src.fake.shapes[n]) == 2} if with_imatrix else None
    errors = tensor_errors(src, mix, imatrix, show_progress=False)
    assert len(errors) == sum(len(s) == 2 for s in src.fake.shapes.values())
    keys = [e.key for e in errors]
    assert keys == sorted(keys, reverse=True)
    for e in errors:
        imp = None if imatrix is None else imatrix[e.name]
        rel, weighted = _oracle(src.load(e.name), e.format, imp)
        assert e.rel_rmse == pytest.approx(rel, rel=1e-4), e.name
        assert (e.weighted_rmse is None) == (imp is None)
        if imp is not None:
            assert e.weighted_rmse == pytest.approx(weighted, rel=1e-4), e.name
        assert e.bits_per_weight == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[e.format]][1] * 8 / \
            gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[e.format]][0]
    table = format_errors(errors, top=3)
    assert table.splitlines()[1].startswith(errors[0].name) and len(table.splitlines()) == 4
