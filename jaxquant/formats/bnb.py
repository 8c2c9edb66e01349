"""bitsandbytes' formats: NF4 and FP4 (blocks of 64 along the row, optionally with double-quantized
absmax) and LLM.int8 (row-wise absmax int8).

4-bit (``bnb.functional.quantize_4bit``, the PyTorch path it takes on CPU, the CUDA kernel's
semantics): ``absmax`` per block, ``v = clamp(x * (1 / absmax), -1, 1)``, the code is the number of
midpoints of the sorted 16-value table below ``v`` (mapped back through the sort for FP4); two
codes per byte, the even element in the high nibble. Dequantized: ``table[q] * absmax``.

Double quantization (``compress_statistics=True``, formats ``*_DQ``): the float32 absmax of all
blocks of the tensor, minus their mean ``offset``, are quantized to the 8-bit dynamic map in blocks
of 256 (``quantize_blockwise``, on CPU a 65536-entry lookup table from ``[-1, 1]`` to the nearest
code, reproduced here); dequantized ``absmax = code[q] * absmax2 + offset``. The blocks of 256
run over the whole tensor, so these formats are tensor-scope and their rows are not separable.

INT8 (``int8_vectorwise_quant``): ``q = round(x * (127 / absmax_row))``, dequantized
``q * absmax_row * (1/127)`` (bitsandbytes' constant 7.874015718698502e-3).

bnb flattens the tensor before cutting blocks; rows that are a multiple of 64 make those blocks
the rows' blocks, which jaxquant requires.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.formats.numerics import F32, div, mul
from jaxquant.formats.registry import Field, Format, register

BLOCK = 64
NESTED_BLOCK = 256
NF4_TABLE = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                      -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                      0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                      0.7229568362236023, 1.0], np.float32)
# bitsandbytes' FP4 (E2M1 with its own exponent bias), divided by its largest magnitude (12) in float32
FP4_TABLE = (np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3], np.float32)
             / np.float32(12)).astype(np.float32)
# the CPU kernel dequantizes code 8 to -0.0 (its fp4_lut); the quantizer's table has +0.0 there
FP4_DEQUANT_TABLE = np.where(np.arange(16) == 8, np.float32(-0.0), FP4_TABLE).astype(np.float32)
with np.load(pathlib.Path(__file__).with_name("data") / "bnb_codes.npz") as _z:
    DYNAMIC_MAP = _z["dynamic"].astype(np.float32)  # written by data/make_bnb_codes.py
INT8_INV = np.float32(7.874015718698502e-3)
LUT_SIZE = 65536


def _bounds(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Midpoints of the sorted table (float32, as torch computes them) and the sort order."""
    order = np.argsort(table, kind="stable")
    s = table[order]
    return ((s[:-1] + s[1:]) / np.float32(2)).astype(np.float32), order.astype(np.int32)


def _dynamic_lut() -> np.ndarray:
    """bitsandbytes' CPU ``build_quantize_lut``: LUT index i (value ``-1 + 2i/65535``) -> the number
    of midpoints ``0.5f * (code[j] + code[j+1])`` below that value."""
    c = DYNAMIC_MAP
    mid = (np.float32(0.5) * (c[:-1] + c[1:])).astype(np.float32)
    i = np.arange(LUT_SIZE, dtype=np.float32)
    val = (np.float32(-1) + (np.float32(2) * i) / np.float32(LUT_SIZE - 1)).astype(np.float32)
    return np.searchsorted(mid, val, side="left").astype(np.uint8)


_DYNAMIC_LUT = _dynamic_lut()


def _absmax_scaled(xb: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(absmax, clamp(x * (1 / absmax), -1, 1)) per block of the last axis (zero blocks give 0)."""
    absmax = jnp.max(jnp.abs(xb), axis=-1)
    zero = absmax == 0
    inv = div(F32(1), jnp.where(zero, F32(1), absmax))
    return absmax, jnp.where(zero[..., None], F32(0), jnp.clip(mul(xb, inv[..., None]), -1, 1))


def _quantize_4bit(x: jax.Array, table: np.ndarray) -> dict[str, jax.Array]:
    absmax, v = _absmax_scaled(x.reshape(x.shape[0], -1, BLOCK))
    bounds, order = _bounds(table)
    q = jnp.asarray(order)[jnp.searchsorted(jnp.asarray(bounds), v, side="left")].astype(jnp.uint8)
    return {"qs": (q[..., 0::2] << 4) | q[..., 1::2], "absmax": absmax}


def _table_values(qs: jax.Array, table: np.ndarray) -> jax.Array:
    """Packed bytes [..., 32] -> table values [..., 64] (high nibble first)."""
    q = jnp.stack([qs >> 4, qs & 0xF], axis=-1).reshape(*qs.shape[:-1], -1)
    return jnp.asarray(table)[q.astype(jnp.int32)]


def _dequantize_4bit(a: dict[str, jax.Array], table: np.ndarray) -> jax.Array:
    y = mul(_table_values(a["qs"], table), a["absmax"][..., None])
    return y.reshape(*y.shape[:-2], -1)


def _quantize_dynamic(v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``quantize_blockwise(v, blocksize=256)`` on CPU: (uint8 codes [n], absmax2 [ceil(n/256)])."""
    n = v.shape[0]
    pad = -n % NESTED_BLOCK
    absmax2, s = _absmax_scaled(jnp.pad(v, (0, pad)).reshape(-1, NESTED_BLOCK))
    # norm_to_lut_index: (val + 1.0f) * 0.5f * 65535 + 0.5f, truncated
    idx = (mul(mul(s + F32(1), F32(0.5)), F32(LUT_SIZE - 1)) + F32(0.5)).astype(jnp.int32)
    codes = jnp.asarray(_DYNAMIC_LUT)[idx].reshape(-1)[:n]
    return codes, absmax2


def _quantize_4bit_dq(x: jax.Array, table: np.ndarray) -> dict[str, jax.Array]:
    a = _quantize_4bit(x, table)
    absmax = a["absmax"].reshape(-1)
    offset = div(jnp.sum(absmax), F32(absmax.size))  # torch's float32 mean (summed in another order)
    codes, absmax2 = _quantize_dynamic(absmax - offset)
    return {"qs": a["qs"], "absmax_q": codes.reshape(a["absmax"].shape), "absmax2": absmax2, "offset": offset}


def dequantize_absmax(a: dict[str, jax.Array]) -> jax.Array:
    """The float32 absmax of a double-quantized tensor's blocks (shaped as ``absmax_q``), as bnb
    computes it before the 4-bit dequantization: ``code[q] * absmax2 + offset``."""
    codes = a["absmax_q"].reshape(-1)
    blocks = jnp.arange(codes.shape[0]) // NESTED_BLOCK
    absmax = mul(jnp.asarray(DYNAMIC_MAP)[codes.astype(jnp.int32)], a["absmax2"][blocks]) + a["offset"]
    return absmax.reshape(a["absmax_q"].shape)


def _dequantize_4bit_dq(a: dict[str, jax.Array], table: np.ndarray) -> jax.Array:
    return _dequantize_4bit({"qs": a["qs"], "absmax": dequantize_absmax(a)}, table)


def _quantize_int8(x: jax.Array, qw: jax.Array | None) -> dict[str, jax.Array]:
    del qw
    scb = jnp.max(jnp.abs(x), axis=-1)
    q = jnp.round(mul(x, div(F32(127), scb)[:, None]))
    return {"q": jnp.where(scb[:, None] == 0, 0, q).astype(jnp.int8), "scb": scb}


def _dequantize_int8(a: dict[str, jax.Array]) -> jax.Array:
    return mul(mul(a["q"].astype(F32), a["scb"][..., None]), INT8_INV)


def _register_4bit(name: str, table: np.ndarray, dequant_table: np.ndarray) -> None:
    register(Format(name, BLOCK, (Field("qs", "uint8", BLOCK // 2), Field("absmax", "float32")),
                    lambda a: _dequantize_4bit(a, dequant_table), lambda x, qw: _quantize_4bit(x, table), "bnb",
                    gguf=False))
    fields = (Field("qs", "uint8", BLOCK // 2), Field("absmax_q", "uint8"), Field("absmax2", "float32", layout="mixed"),
              Field("offset", "float32", layout="tensor"))
    register(Format(f"{name}_DQ", BLOCK, fields, lambda a: _dequantize_4bit_dq(a, dequant_table),
                    lambda x, qw: _quantize_4bit_dq(x, table), "bnb", gguf=False, scope="tensor"))


_register_4bit("NF4", NF4_TABLE, NF4_TABLE)
_register_4bit("FP4", FP4_TABLE, FP4_DEQUANT_TABLE)
INT8 = register(Format("INT8", 1, (Field("q", "int8"), Field("scb", "float32")), _dequantize_int8, _quantize_int8,
                       "bnb", gguf=False, scope="tensor"))
