"""Microscaling formats: MXFP4 (E2M1 values, E8M0 shared exponent per 32).

llama.cpp's block: ``e`` (E8M0) then 16 bytes of nibbles (``qs[j]``: element j low, j+16 high).
Values are ``kvalues_mxfp4[q] * 2^(e-128)``: the E2M1 table is stored doubled, so the scale is
halved (``GGML_E8M0_TO_FP32_HALF``). quantize_mxfp4 ignores importance weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant.formats.ggml_legacy import pack_nibbles, unpack_nibbles
from jaxquant.formats.numerics import F32
from jaxquant.formats.registry import Field, Format, register

QK_MXFP4 = 32
KVALUES_MXFP4 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.int8)  # ggml-common.h


def e8m0_to_fp32_half(e: np.ndarray) -> np.ndarray:
    """ggml_e8m0_to_fp32_half: 2^(e-128) as f32 bits (subnormal for e < 2)."""
    e = np.asarray(e, np.uint32)
    return np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << 23).astype(np.uint32).view(np.float32)


def _floor_log2f_breakpoints() -> np.ndarray:
    """Bit patterns b[k] of the least positive f32 with ``floorf(log2f(x)) >= k - 149``.

    log2f (glibc's, correctly rounded here) rounds up to the integer k when log2(x) is within
    half an ulp below it: x >= 2^(k - ulp/2). Checked against glibc 2.36 for every positive float.
    """
    k = np.arange(-149, 129, dtype=np.float32)
    half_ulp = (k.astype(np.float64) - np.nextafter(k, np.float32(-np.inf)).astype(np.float64)) / 2
    t = np.exp2(k.astype(np.float64) - half_ulp)
    f = t.astype(np.float32)
    f = np.where(f.astype(np.float64) < t, np.nextafter(f, np.float32(np.inf)), f)
    return f.view(np.int32)


_LOG2_BREAKS = _floor_log2f_breakpoints()
# kvalues[q] * 2^(e-128) for every (e, q), as numpy (and C) compute it, subnormals included
with np.errstate(over="ignore"):  # 12 * 2^127 is inf, in C too
    _VALUES = KVALUES_MXFP4.astype(np.float32)[None, :] * e8m0_to_fp32_half(np.arange(256))[:, None]


def _mxfp4_quantize(x: jax.Array, qw: jax.Array | None) -> dict[str, jax.Array]:
    del qw  # quantize_mxfp4 ignores importance weights
    xb = x.reshape(x.shape[0], -1, QK_MXFP4)
    # amax and floorf(log2f(amax)) on the bits: exact for subnormal amax, which XLA would flush
    amax = jnp.max(lax.bitcast_convert_type(xb, jnp.int32) & 0x7FFFFFFF, axis=-1)
    floor_log2 = jnp.searchsorted(jnp.asarray(_LOG2_BREAKS), amax, side="right") - 150
    # (uint8_t)(floor - 2 + 127): C's conversion keeps the low byte of the int (floor < -125 wraps)
    e = jnp.where(amax > 0, (floor_log2 + 125) & 0xFF, 0)
    # best_index_mxfp4: first index of the least |kvalues[i]*d - x|. Tiny blocks are scaled by
    # 2^64 (x from its bits where subnormal), which rounds alike and keeps XLA from flushing d or x.
    tiny = (e < 66)[..., None]
    d = lax.bitcast_convert_type((e - 1 + jnp.where(tiny[..., 0], 64, 0)) << 23, F32)
    bits = lax.bitcast_convert_type(xb, jnp.int32)
    sub = jnp.where(bits < 0, F32(-2.0**-85), F32(2.0**-85)) * (bits & 0x7FFFFF).astype(F32)
    x = jnp.where(tiny, jnp.where((bits & 0x7F800000) == 0, sub, xb * F32(2.0**64)), xb)
    # For x < 0 the C's errors of indices 0, 9..15 are those of 0..7 for |x| (and 8, -0, never
    # beats 0), so one strict running minimum over the 8 magnitudes finds the same first index.
    # kvalues[i]*d is exact, so an FMA of the product and the subtraction would round the same.
    mag = jnp.abs(x)
    best, idx = mag, jnp.zeros(x.shape, jnp.int32)
    for i, k in enumerate(KVALUES_MXFP4[1:8], start=1):
        err = jnp.abs(F32(k) * d[..., None] - mag)
        best, idx = jnp.where(err < best, err, best), jnp.where(err < best, i, idx)
    idx = jnp.where((x < 0) & (idx > 0), idx + 8, idx)
    return {"e": e.astype(jnp.uint8), "qs": pack_nibbles(idx)}


def _mxfp4_dequantize(a: dict[str, jax.Array]) -> jax.Array:
    # a table lookup, not kvalues*d: XLA would flush the subnormal d of e < 2 to zero
    y = jnp.asarray(_VALUES)[a["e"].astype(jnp.int32)[..., None], unpack_nibbles(a["qs"])]
    return y.reshape(*y.shape[:-2], -1)


MXFP4 = register(Format("MXFP4", QK_MXFP4, (Field("e", "uint8"), Field("qs", "uint8", 16)),
                        _mxfp4_dequantize, _mxfp4_quantize, "mx"))
