"""Packed half2 arithmetic on uint32 tensors: two float16 weights per 32-bit register.

Quantized codes become exact float16 values with one logic op: a code OR-ed into the mantissa of
1024.0 (0x6400) reads as ``1024 + code`` for codes below 1024, two per word (``MAGIC2``). The
arithmetic that turns them into weights then runs on both halves at once (``sub.f16x2``,
``mul.f16x2``, ``fma.rn.f16x2``: one instruction per two weights). Pallas cannot bitcast a uint32
to two float16, so under Triton each op is one line of inline PTX; in interpret mode (tests, any
platform) the same op runs on a ``[..., 2]`` float16 view, with the same single rounding.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.pallas import triton as plt

# JAX >= 0.11 warns at every lowering of a Triton kernel; registry.py says why we use it anyway.
warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*", category=DeprecationWarning)

MAGIC2 = 0x64006400  # 1024.0 in both halves
OFFSET2 = 0x64806480  # 1152.0 in both halves: lut16's values and int8_pairs' bytes sit 1152 above their own
U32 = jnp.uint32


def f16_bits(v: float) -> int:
    """The float16 bit pattern of ``v`` (exactly representable)."""
    return int(np.float16(v).view(np.uint16))


def dup(h: int) -> int:
    """A 16-bit pattern in both halves."""
    return h | h << 16


def splat(x: jax.Array) -> jax.Array:
    """A float16 (or float32, rounded once) tensor -> uint32 with the value in both halves."""
    b = lax.bitcast_convert_type(x.astype(jnp.float16), jnp.uint16).astype(U32)
    return b | b << U32(16)


def halves(v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """uint32 -> (low, high) float16 halves."""
    lo = lax.bitcast_convert_type(v.astype(jnp.uint16), jnp.float16)
    hi = lax.bitcast_convert_type((v >> U32(16)).astype(jnp.uint16), jnp.float16)
    return lo, hi


def _view(v: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(v, jnp.float16)  # [..., 2]


def _pack(h: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(h, U32)


def asm_i32(body: str, *args: jax.Array) -> jax.Array:
    """int32 ``$0 = body($1, $2, ...)`` on 32-bit registers, elementwise (pack 1)."""
    shape = jnp.broadcast_shapes(*(a.shape for a in args))
    args = [jnp.broadcast_to(a, shape) for a in args]
    return plt.elementwise_inline_asm(body, args=args, constraints="=r" + ",r" * len(args), pack=1,
                                      result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.int32)])[0]


def _asm(body: str, *args: jax.Array) -> jax.Array:
    """``asm_i32`` as uint32."""
    return lax.bitcast_convert_type(asm_i32(body, *args), U32)


def sub_mul(t: jax.Array, c: int | jax.Array, s: jax.Array, interpret: bool) -> jax.Array:
    """``(t - c) * s`` per half: ``t - c`` exact (small integers), one rounding in the product.
    ``c`` is a packed constant or packed per-row values, ``s`` packed scales."""
    if interpret:
        return _pack((_view(t) - _view(jnp.asarray(c, U32))) * _view(s))
    if not isinstance(c, int):
        return _asm("sub.rn.f16x2 $0, $1, $3; mul.rn.f16x2 $0, $0, $2;", t, s, c)
    return _asm(f"{{ .reg .b32 c; mov.b32 c, {c:#x}; sub.rn.f16x2 $0, $1, c; mul.rn.f16x2 $0, $0, $2; }}", t, s)


def sub_fma(t: jax.Array, c: int, s: jax.Array, o: jax.Array, interpret: bool) -> jax.Array:
    """``(t - c) * s + o`` per half: ``t - c`` exact, one rounding in the fused multiply-add."""
    if interpret:
        q = (_view(t) - _view(jnp.asarray(c, U32))).astype(jnp.float32)
        return _pack((q * _view(s).astype(jnp.float32) + _view(o).astype(jnp.float32)).astype(jnp.float16))
    return _asm(f"{{ .reg .b32 c; mov.b32 c, {c:#x}; sub.rn.f16x2 $0, $1, c; fma.rn.f16x2 $0, $0, $2, $3; }}",
                t, s, o)


def sub2_mul(t: jax.Array, c: int, z: jax.Array, s: jax.Array, interpret: bool) -> jax.Array:
    """``((t - c) - z) * s`` per half: ``t - c`` exact, then float16 ``(q - z) * s`` with its two
    roundings. ``z`` and ``s`` packed."""
    if interpret:
        return _pack(((_view(t) - _view(jnp.asarray(c, U32))) - _view(z)) * _view(s))
    return _asm(f"{{ .reg .b32 c; mov.b32 c, {c:#x}; sub.rn.f16x2 $0, $1, c; sub.rn.f16x2 $0, $0, $2; "
                "mul.rn.f16x2 $0, $0, $3; }", t, z, s)


def fp8_pair(w: jax.Array, p: int, e4m3: bool, interpret: bool) -> jax.Array:
    """Bytes ``p`` and ``p + 2`` of each word, FP8 codes, as two float16 values (exact: float16
    holds every E4M3 and E5M2 value). E5M2 is float16's upper byte; E4M3 takes Hopper's
    ``cvt.rn.f16x2.e4m3x2``."""
    if not e4m3:
        return ((w >> U32(8 * p)) & U32(0x00FF00FF)) << U32(8)
    if interpret:
        def half(b):
            f = lax.bitcast_convert_type(b.astype(jnp.uint8), jnp.float8_e4m3fn).astype(jnp.float16)
            return lax.bitcast_convert_type(f, jnp.uint16).astype(U32)
        return half((w >> U32(8 * p)) & U32(0xFF)) | half((w >> U32(8 * p + 16)) & U32(0xFF)) << U32(16)
    return _asm(f"{{ .reg .b32 t; .reg .b16 lo, hi; prmt.b32 t, $1, 0, {p | (p + 2) << 4:#x}; mov.b32 {{lo, hi}}, t; "
                "cvt.rn.f16x2.e4m3x2 $0, lo; }", w)


def int8_pairs(w: jax.Array) -> list[jax.Array]:
    """The int8 bytes ``p`` and ``p + 2`` of each word (``p`` = 0, 1) as ``1152 + b`` per half: the
    sign bit flipped inside the mask-and-or."""
    return [(w >> U32(8 * p)) & U32(0x00FF00FF) ^ U32(MAGIC2 | 0x00800080) for p in range(2)]


def lut16(t: jax.Array, table, interpret: bool) -> jax.Array:
    """``1024 + 128 + table[n]`` per half, for the nibbles ``n`` at bits 0-3 and 16-19 of ``t``
    (other bits zero) and a table of 16 int8 values: byte permutes (``prmt``) read the table."""
    tb = [(int(v) + 128) & 0xFF for v in table]
    if interpret:  # selects, not a gather: a kernel may not capture a table array
        def look(n):
            out = jnp.zeros_like(n)
            for i, v in enumerate(tb):
                out = jnp.where(n == U32(i), U32(v), out)
            return out
        return look(t & U32(0xF)) | look((t >> U32(16)) & U32(0xF)) << U32(16) | U32(MAGIC2)
    words = [sum(tb[4 * k + i] << 8 * i for i in range(4)) for k in range(4)]
    return _asm(
        "{ .reg .b32 s, m, lo, hi, t0, t1, t2, t3; "
        f"mov.b32 t0, {words[0]:#x}; mov.b32 t1, {words[1]:#x}; mov.b32 t2, {words[2]:#x}; mov.b32 t3, {words[3]:#x};"
        " and.b32 s, $1, 0x00070007; shr.b32 m, s, 8; and.b32 s, s, 0x7; or.b32 s, s, m;"  # selector nibbles 0, 2
        " prmt.b32 lo, t0, t1, s; prmt.b32 hi, t2, t3, s;"
        " shr.b32 m, $1, 3; and.b32 m, m, 0x00010001; mul.lo.u32 m, m, 0xFF;"  # bit 3 of each nibble: upper half
        " lop3.b32 lo, lo, hi, m, 0xD8; lop3.b32 $0, lo, 0x00FF00FF, 0x64006400, 0xEA; }", t)


def mul2(a: jax.Array, b: jax.Array, interpret: bool) -> jax.Array:
    """``a * b`` per half, one rounding."""
    if interpret:
        return _pack(_view(a) * _view(b))
    return _asm("mul.rn.f16x2 $0, $1, $2;", a, b)


def lut16_f16(t: jax.Array, table, interpret: bool) -> jax.Array:
    """``table[n]`` per half as float16, for the nibbles ``n`` at bits 0-3 and 16-19 of ``t`` (other
    bits zero) and a table of 16 floats: four byte permutes each read four entries (their two bytes
    side by side), bits 2 and 3 of ``n`` choose among them."""
    bits = [f16_bits(float(v)) for v in np.asarray(table, np.float32).astype(np.float16)]
    if interpret:
        def look(n):
            out = jnp.zeros_like(n)
            for i, v in enumerate(bits):
                out = jnp.where(n == U32(i), U32(v), out)
            return out
        return look(t & U32(0xF)) | look((t >> U32(16)) & U32(0xF)) << U32(16)
    words = [bits[2 * i] | bits[2 * i + 1] << 16 for i in range(8)]
    movs = " ".join(f"mov.b32 t{i}, {w:#x};" for i, w in enumerate(words))
    return _asm(
        "{ .reg .b32 a, x, y, s, r0, r1, r2, r3, m2, m3, lo, hi, t0, t1, t2, t3, t4, t5, t6, t7; " + movs +
        " and.b32 a, $1, 0x00030003; shl.b32 a, a, 1; shr.b32 x, a, 8; and.b32 x, x, 0xF00; and.b32 a, a, 0xF;"
        " or.b32 x, x, a; shl.b32 y, x, 4; or.b32 s, x, y; or.b32 s, s, 0x1010;"  # bytes 2n, 2n + 1 of each half
        " prmt.b32 r0, t0, t1, s; prmt.b32 r1, t2, t3, s; prmt.b32 r2, t4, t5, s; prmt.b32 r3, t6, t7, s;"
        " shr.b32 m2, $1, 2; and.b32 m2, m2, 0x00010001; mul.lo.u32 m2, m2, 0xFFFF;"
        " shr.b32 m3, $1, 3; and.b32 m3, m3, 0x00010001; mul.lo.u32 m3, m3, 0xFFFF;"
        " lop3.b32 lo, r0, r1, m2, 0xD8; lop3.b32 hi, r2, r3, m2, 0xD8; lop3.b32 $0, lo, hi, m3, 0xD8; }", t)

