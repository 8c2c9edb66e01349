"""HQQ against the hqq library (``Quantizer.quantize(optimize=True)`` on CPU, float32): same codes,
same scale and zero to ~1e-6 after the same iterations; dequantization against hqq's with its
float16 meta. torch's pow and mean round differently from XLA's, so zero agrees to float32 noise
and a float16 zero can land on the other side of a rounding boundary (the whole group then moves
by one float16 ulp)."""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch

with warnings.catch_warnings():  # hqq imports deprecated torch.jit APIs
    warnings.simplefilter("ignore", DeprecationWarning)
    from hqq.core.quantize import Quantizer

import jaxquant as jq
from jaxquant.formats.hqq import hqq_quantize


def _matrix() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((256, 640)) * 0.05).astype(np.float32)
    x[3] *= 20  # a row of outliers
    x[5, :64] = 0  # constant groups (hqq's small-range branch)
    x[7] = rng.laplace(size=640) * 0.01
    return x


@pytest.mark.parametrize("bits,group,axis", [(4, 64, 1), (4, 64, 0), (2, 32, 1), (3, 64, 0), (8, 128, 1)])
def test_matches_hqq(bits, group, axis):
    x = _matrix()
    ref_q, meta = Quantizer.quantize(torch.from_numpy(x.copy()), nbits=bits, group_size=group, axis=axis,
                                     bitpack=False, device="cpu")
    q, s, z = hqq_quantize(jnp.asarray(x), bits, group, axis)
    assert np.array_equal(np.asarray(q).reshape(ref_q.shape), ref_q.numpy())
    ref_scale, ref_zero = meta["scale"].numpy(), meta["zero"].numpy()
    assert np.max(np.abs(1 / np.asarray(s) - ref_scale) / np.abs(ref_scale)) < 1e-6
    assert np.linalg.norm(np.asarray(z) - ref_zero) / np.linalg.norm(ref_zero) < 1e-6

    name = f"HQQ{bits}_G{group}" + ("_AX0" if axis == 0 else "")
    ours = np.asarray(jq.quantize(x, name).dequantize())
    half = dict(meta, scale=meta["scale"].half(), zero=meta["zero"].half(), compute_dtype=torch.float16)
    ref = Quantizer.dequantize(ref_q.half(), half).float().numpy()
    assert (ours != ref).mean() < 0.01
    assert np.max(np.abs(ours - ref)) <= 2e-3 * np.max(np.abs(ref))


def test_rows():
    """axis=1 groups take rows still packed; axis=0 groups span rows (lookup dequantizes)."""
    x = _matrix()
    for name in ("HQQ4_G64", "HQQ4_G64_AX0"):
        q = jq.quantize(x, name)
        assert q.format.separable == (name == "HQQ4_G64")
        ids = np.array([9, 3])
        assert np.array_equal(np.asarray(jq.qtensor.lookup(q, ids)), np.asarray(q.dequantize())[ids])
    assert jq.get_format("HQQ4_G64").bits_per_weight == 4.5
