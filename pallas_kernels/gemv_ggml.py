"""``gemv`` decoders of llama.cpp's formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL (blocks of 32),
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS (256).

Each weight word's 4 bytes are 4 consecutive elements (a nibble plane of Q4_0 / Q4_K with Q5's
fifth bits, a 2-bit plane of Q2_K / Q3_K with Q3_K's third bits, Q6_K's 4 low bits with its 2 high
ones, Q8_0's bytes, IQ4's table values), so
``xpair`` pairs it with its activations without a permutation. Offsets (Q4_0's 8, Q6_K's 32) and mins come off the integer sums through the
activations' sums per 16 or 32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxquant.formats.ggml_iq import KVALUES
from pallas_kernels.gemv import GemvDecoder, idot, lut_bytes

U32 = jnp.uint32
F32 = jnp.float32
LOW = 0x0F0F0F0F


def _nibbles(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A word's low and high nibble planes, one byte a nibble."""
    return w & U32(LOW), (w >> U32(4)) & U32(LOW)


def _bit4(v: jax.Array, k: int) -> jax.Array:
    """Bit ``k`` of each byte of ``v`` moved to bit 4 (the fifth bit of a 5-bit code), others 0."""
    v = v << U32(4 - k) if k < 4 else v >> U32(k - 4)
    return v & U32(0x10101010)


def _spread4(bits: jax.Array) -> jax.Array:
    """Bits 0-3 of ``bits`` (others 0) to bit 4 of bytes 0-3: four shifted copies that do not overlap."""
    return (bits * U32(0x02040810)) & U32(0x10101010)


def _q5_32(ld, xpair, interpret) -> jax.Array:
    """Integer sums of a block of 32 5-bit codes: nibbles as ``_q4_32``, bit i of qh the fifth bit
    of element i."""
    w, qh = ld("qs"), ld("qh")  # [BN, S, 4], [BN, S, 1]
    shift = U32(4) * jnp.arange(4, dtype=U32)  # word j: elements 4j .. and 16 + 4j ..
    lo = w & U32(LOW) | _spread4((qh >> shift) & U32(0xF))
    hi = (w >> U32(4)) & U32(LOW) | _spread4((qh >> (shift + U32(16))) & U32(0xF))
    return (idot(lo, *xpair(0, 4), interpret) + idot(hi, *xpair(16, 4), interpret)).sum(-1).astype(F32)


def _q4_32(ld, xpair, interpret) -> jax.Array:
    """Integer sums ``[BN, S]`` of a block of 32 nibbles: word j holds elements 4j.. (low) and 16 + 4j.. (high)."""
    lo, hi = _nibbles(ld("qs"))
    return (idot(lo, *xpair(0, 4), interpret) + idot(hi, *xpair(16, 4), interpret)).sum(-1).astype(F32)


def _q4_0(ld, xpair, xs, interpret) -> jax.Array:
    return ld("d").astype(F32) * xs("dx", 0) * (_q4_32(ld, xpair, interpret) - 8 * xs("sum", 0).astype(F32))


def _q4_1(ld, xpair, xs, interpret) -> jax.Array:
    dx = xs("dx", 0)
    return dx * (ld("d").astype(F32) * _q4_32(ld, xpair, interpret) + ld("m").astype(F32) * xs("sum", 0).astype(F32))


def _q5_0(ld, xpair, xs, interpret) -> jax.Array:
    return ld("d").astype(F32) * xs("dx", 0) * (_q5_32(ld, xpair, interpret) - 16 * xs("sum", 0).astype(F32))


def _q5_1(ld, xpair, xs, interpret) -> jax.Array:
    dx = xs("dx", 0)
    return dx * (ld("d").astype(F32) * _q5_32(ld, xpair, interpret) + ld("m").astype(F32) * xs("sum", 0).astype(F32))


def _q8_0(ld, xpair, xs, interpret) -> jax.Array:
    isum = idot(ld("qs"), *xpair(0, 8), interpret).sum(-1).astype(F32)
    return ld("d").astype(F32) * xs("dx", 0) * isum


def _scale_min_k4(w: list[jax.Array], j: int) -> tuple[jax.Array, jax.Array]:
    """ggml's ``get_scale_min_k4`` of sub-block ``j`` from the 3 scale words, as float32."""
    if j < 4:
        sc, mn = (w[0] >> U32(8 * j)) & U32(63), (w[1] >> U32(8 * j)) & U32(63)
    else:
        k = 8 * (j - 4)
        sc = (w[2] >> U32(k)) & U32(0xF) | ((w[0] >> U32(k + 6)) & U32(3)) << U32(4)
        mn = (w[2] >> U32(k + 4)) & U32(0xF) | ((w[1] >> U32(k + 6)) & U32(3)) << U32(4)
    return sc.astype(F32), mn.astype(F32)


def _q45_k(high_bit: bool):
    def step(ld, xpair, xs, interpret) -> jax.Array:
        """Group g (64 weights, qs words 8g ..): low nibbles are sub-block 2g, high ones 2g + 1 (Q5_K:
        fifth bits 2g, 2g + 1 of qh byte l, l the qs byte's index in its group)."""
        sw = [ld("scales", i, 1)[..., 0] for i in range(3)]
        qh = ld("qh", 0, 8) if high_bit else None
        acc_s = acc_m = 0.0
        for g in range(4):
            planes = _nibbles(ld("qs", 8 * g, 8))
            if high_bit:
                planes = [p | _bit4(qh, 2 * g + h) for h, p in enumerate(planes)]
            for h, plane in enumerate(planes):
                j = 2 * g + h
                isum = idot(plane, *xpair(32 * j, 8), interpret).sum(-1).astype(F32)
                sc, mn = _scale_min_k4(sw, j)
                dx = xs("dx", j)
                acc_s = acc_s + sc * (dx * isum)
                acc_m = acc_m + mn * (dx * xs("sum", j).astype(F32))
        return ld("d").astype(F32) * acc_s - ld("dmin").astype(F32) * acc_m
    return step


def _q6_k(ld, xpair, xs, interpret) -> jax.Array:
    """Half h, quarter j (elements 128h + 32j + l): ql byte 64h + 32 (j % 2) + l, nibble j // 2;
    qh byte 32h + l, bits 2j, 2j + 1; scale 8h + 2j + l // 16."""
    sw = [ld("scales", i, 1)[..., 0] for i in range(4)]
    acc = 0.0
    for h in range(2):
        for half in range(2):
            qh = ld("qh", 8 * h + 4 * half, 4)
            ql = [ld("ql", 16 * h + 8 * src + 4 * half, 4) for src in range(2)]
            for j in range(4):
                s = 4 - 2 * j  # qh bits 2j, 2j + 1 -> bits 4, 5 of each byte
                hb = qh << U32(s) if s > 0 else qh >> U32(-s) if s < 0 else qh
                q = (ql[j % 2] >> U32(4 * (j // 2))) & U32(LOW) | hb & U32(0x30303030)
                g = 8 * h + 2 * j + half
                isum = idot(q, *xpair(128 * h + 32 * j + 16 * half, 4), interpret).sum(-1)
                sc = (((sw[g // 4] >> U32(8 * (g % 4))) & U32(0xFF)) ^ U32(0x80)).astype(jnp.int32) - 128
                acc = acc + sc.astype(F32) * xs("dx", 4 * h + j) * (isum - 32 * xs("sum16", g)).astype(F32)
    return ld("d").astype(F32) * acc


def _byte(w: list[jax.Array], k: int) -> jax.Array:
    """Byte ``k`` of a field read as words ``w``."""
    return (w[k // 4] >> U32(8 * (k % 4))) & U32(0xFF)


def _two_bit(ld, xpair, interpret, high: bool):
    """Q2_K / Q3_K: element 128n + 32j + l is bits 2j of qs byte 32n + l (Q3_K: plus bit 4n + j of
    hmask byte l as bit 2); one scale per 16 (sub-block 8n + 2j + l // 16)."""
    for n in range(2):
        for j in range(4):
            for half in range(2):
                q = (ld("qs", 8 * n + 4 * half, 4) >> U32(2 * j)) & U32(0x03030303)
                if high:
                    q = q | ((ld("hmask", 4 * half, 4) >> U32(4 * n + j)) & U32(0x01010101)) << U32(2)
                isum = idot(q, *xpair(128 * n + 32 * j + 16 * half, 4), interpret).sum(-1)
                yield 8 * n + 2 * j + half, 4 * n + j, isum


def _q2_k(ld, xpair, xs, interpret) -> jax.Array:
    sw = [ld("scales", i, 1)[..., 0] for i in range(4)]
    acc_s = acc_m = 0.0
    for g, blk, isum in _two_bit(ld, xpair, interpret, False):
        b = _byte(sw, g)
        dx = xs("dx", blk)
        acc_s = acc_s + (b & U32(0xF)).astype(F32) * dx * isum.astype(F32)
        acc_m = acc_m + (b >> U32(4)).astype(F32) * dx * xs("sum16", g).astype(F32)
    return ld("d").astype(F32) * acc_s - ld("dmin").astype(F32) * acc_m


def _q3_k(ld, xpair, xs, interpret) -> jax.Array:
    """Codes 0..7 with offset 4; 6-bit scales minus 32: low 4 bits in nibble k // 8 of byte k % 8,
    high 2 at bits 2 (k // 4) of byte 8 + k % 4."""
    sw = [ld("scales", i, 1)[..., 0] for i in range(3)]
    acc = 0.0
    for g, blk, isum in _two_bit(ld, xpair, interpret, True):
        sc = (_byte(sw, g % 8) >> U32(4 * (g // 8))) & U32(0xF) | ((_byte(sw, 8 + g % 4) >> U32(2 * (g // 4))) & U32(3)) << U32(4)
        acc = acc + (sc.astype(jnp.int32) - 32).astype(F32) * xs("dx", blk) * (isum - 4 * xs("sum16", g)).astype(F32)
    return ld("d").astype(F32) * acc


def _iq4_nl(ld, xpair, xs, interpret) -> jax.Array:
    lo, hi = (lut_bytes(p, KVALUES, interpret) for p in _nibbles(ld("qs")))
    isum = (idot(lo, *xpair(0, 4), interpret) + idot(hi, *xpair(16, 4), interpret)).sum(-1).astype(F32)
    return ld("d").astype(F32) * xs("dx", 0) * isum


def _iq4_xs(ld, xpair, xs, interpret) -> jax.Array:
    """Sub-block ib (32 weights, qs words 4 ib ..): scale ``ls - 32``, low 4 bits of ``ls`` in
    nibble ib of scales_l, high 2 at bits 2 ib of scales_h."""
    sl, sh = ld("scales_l")[..., 0], ld("scales_h").astype(U32)
    acc = 0.0
    for ib in range(8):
        lo, hi = (lut_bytes(p, KVALUES, interpret) for p in _nibbles(ld("qs", 4 * ib, 4)))
        isum = (idot(lo, *xpair(32 * ib, 4), interpret) + idot(hi, *xpair(32 * ib + 16, 4), interpret)).sum(-1)
        ls = (sl >> U32(4 * ib)) & U32(0xF) | ((sh >> U32(2 * ib)) & U32(3)) << U32(4)
        acc = acc + (ls.astype(jnp.int32) - 32).astype(F32) * xs("dx", ib) * isum.astype(F32)
    return ld("d").astype(F32) * acc


DECODERS = (
    GemvDecoder("Q4_0", 32, _q4_0, ("qs",)),
    GemvDecoder("Q4_1", 32, _q4_1, ("qs",)),
    GemvDecoder("Q5_0", 32, _q5_0, ("qs", "qh")),
    GemvDecoder("Q5_1", 32, _q5_1, ("qs", "qh")),
    GemvDecoder("Q8_0", 32, _q8_0, ("qs",)),
    GemvDecoder("Q2_K", 256, _q2_k, ("qs", "scales")),
    GemvDecoder("Q3_K", 256, _q3_k, ("qs", "hmask", "scales")),
    GemvDecoder("Q4_K", 256, _q45_k(False), ("qs", "scales")),
    GemvDecoder("Q5_K", 256, _q45_k(True), ("qs", "qh", "scales")),
    GemvDecoder("Q6_K", 256, _q6_k, ("ql", "qh", "scales")),
    GemvDecoder("IQ4_NL", 32, _iq4_nl, ("qs",)),
    GemvDecoder("IQ4_XS", 256, _iq4_xs, ("qs", "scales_l")),
)
