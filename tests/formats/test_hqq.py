"""HQQ against the hqq library (``Quantizer.quantize(optimize=True)`` on CPU, float32): the same
codes, scale and zero after the same iterations, and hqq's float16 dequantization bit for bit.

``hqq_quantize`` sums as torch does on CPU, so codes and scale agree bit for bit and zero does
too except through one operation: torch's ``pow`` (Sleef's ``powf_u10``, within 1 ulp) differs by
one ulp from XLA's (correctly rounded) on ~2% of values. It enters zero through hqq's shrink term,
which is non-zero only where the error ``|x - x_r|`` exceeds ~0.17, so mainly at 1-2 bits (see
ZERO_RTOL); no code and no float16 zero has moved in any input measured.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

with warnings.catch_warnings():  # hqq imports deprecated torch.jit APIs
    warnings.simplefilter("ignore", DeprecationWarning)
    from hqq.core.quantize import Quantizer

import jaxquant as jq
from jaxquant.formats.hqq import BITS, GROUPS, hqq_arrays, hqq_quantize

# Worst per-element relative zero error measured over 18 inputs of 14,976 to 163,840 values (normal,
# Student-t, uniform rows of log-normal scale; every configuration): 1.96e-6 at 1 bit, 1.27e-6 at
# 2 bits, 2.7e-7 from 3 bits on -- torch's one-ulp pow errors (module doc); 1e-6 where that holds.
ZERO_RTOL = {1: 5e-6, 2: 5e-6, 3: 1e-6, 4: 1e-6, 8: 1e-6}


def _matrix(n: int, k: int, seed: int = 0) -> np.ndarray:
    """Rows of several scales: outliers, constant and tiny groups, heavy tails, wide uniform rows."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    x[3] *= 20
    x[5, :128] = 0  # constant groups (hqq's small-range branch)
    x[6, 128:256] = rng.standard_normal(128) * 1e-20
    x[7] = rng.laplace(size=k) * 0.01
    x[8:12] = rng.uniform(-1, 1, (4, k)) * np.exp(rng.standard_normal((4, 1)))  # shrink term active
    x[12] = -np.abs(x[12])
    return x


# 14,976 values: under 2^15, so torch sums the whole-tensor error on one thread whatever its thread
# count; groups of 32/64/128 along axis 0 give 468/234/117 columns, so torch's column sums take
# their 32-column, 8-lane and scalar paths.
X = _matrix(39, 384)
_solve = jax.jit(jax.vmap(hqq_quantize, in_axes=(None, 0, None, None, None)), static_argnums=(2, 3, 4))


def _hqq(x: np.ndarray, bits: int, group: int, axis: int):
    return Quantizer.quantize(torch.from_numpy(x.copy()), nbits=bits, group_size=group, axis=axis,
                              bitpack=False, device="cpu")


def _hqq_dequantize(ref_q, meta) -> np.ndarray:
    """hqq's dequantization with HQQLinear's float16 meta and compute dtype. HQQLinear keeps the codes
    as packed integers, so a -0.0 code (the round of a tiny negative) is 0 (``+ 0``)."""
    half = dict(meta, scale=meta["scale"].half(), zero=meta["zero"].half(), compute_dtype=torch.float16)
    return Quantizer.dequantize(ref_q.half() + 0, half).float().numpy()


def _name(bits: int, group: int, axis: int) -> str:
    return f"HQQ{bits}_G{group}" + ("_AX0" if axis == 0 else "")


def _check_solver(x: np.ndarray, group: int, axis: int, threads: int = 1) -> None:
    """Every bit width in one compiled call: codes and scale bit for bit, zero to ZERO_RTOL and
    equal in float16; our dequantize of hqq's stored arrays equals hqq's, bit for bit."""
    qs, ss, zs = _solve(jnp.asarray(x), jnp.asarray(BITS), group, axis, threads)
    for i, bits in enumerate(BITS):
        ref_q, meta = _hqq(x, bits, group, axis)
        ref_scale, ref_zero = meta["scale"].numpy(), meta["zero"].numpy()
        name = _name(bits, group, axis)
        assert np.array_equal(np.asarray(qs[i]).reshape(ref_q.shape), ref_q.numpy()), name
        assert np.array_equal((1 / np.asarray(ss[i])).view(np.uint32), ref_scale.view(np.uint32)), name
        z = np.asarray(zs[i])
        assert np.all(np.abs(z - ref_zero) <= ZERO_RTOL[bits] * np.abs(ref_zero)), name
        assert np.array_equal(z.astype(np.float16), ref_zero.astype(np.float16)), name

        arrays = hqq_arrays(jnp.asarray(ref_q.numpy(), jnp.int32), jnp.asarray(ref_scale), jnp.asarray(ref_zero),
                            x.shape, bits, group, axis)
        ours = np.asarray(jq.get_format(name).dequantize_rows(arrays))
        assert np.array_equal(ours.view(np.uint32), _hqq_dequantize(ref_q, meta).view(np.uint32)), name


@pytest.mark.parametrize("axis", [1, 0])
@pytest.mark.parametrize("group", GROUPS)
def test_matches_hqq(group, axis):
    _check_solver(X, group, axis)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_matches_hqq_large(seed):
    """Tensors of more than 2^15 values: torch sums the error on its threads; passed along."""
    x = _matrix(256, 640, seed)
    if seed == 2:
        x[16:] = np.random.default_rng(seed).standard_t(3, (240, 640)) * 0.02
    for axis in (1, 0):
        for group in GROUPS:
            _check_solver(x, group, axis, torch.get_num_threads())


def _check_format(name: str, bits: int, group: int, axis: int) -> None:
    """The registered format end to end: dequantize(quantize(x)) equals hqq's, bit for bit."""
    ours = np.asarray(jq.quantize(X, name, check=False).dequantize())  # hqq's result, even 1-bit's >100% error
    assert np.array_equal(ours.view(np.uint32), _hqq_dequantize(*_hqq(X, bits, group, axis)).view(np.uint32)), name


@pytest.mark.parametrize("bits,group,axis", [(4, 64, 1), (2, 32, 0)])
def test_format_matches_hqq(bits, group, axis):
    _check_format(_name(bits, group, axis), bits, group, axis)


@pytest.mark.slow
def test_every_format_matches_hqq():
    for name, (bits, group, axis) in {_name(*c): c for c in
                                      [(b, g, a) for b in BITS for g in GROUPS for a in (1, 0)]}.items():
        _check_format(name, bits, group, axis)


def test_rows():
    """axis=1 groups take rows still packed; axis=0 groups span rows (lookup dequantizes)."""
    for name in ("HQQ4_G64", "HQQ2_G32_AX0"):
        q = jq.quantize(X, name)
        assert q.format.separable == (name == "HQQ4_G64")
        ids = np.array([9, 3])
        assert np.array_equal(np.asarray(jq.qtensor.lookup(q, ids)), np.asarray(q.dequantize())[ids])
    assert jq.get_format("HQQ4_G64").bits_per_weight == 4.5
