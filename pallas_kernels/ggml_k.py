"""Kernel decoders of llama.cpp's 256-element K-quants: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

A step is one block; lane slot ``c`` takes the ``c``-th quarter of the block's quant bytes (a unit
is one uint32 word of them). Sub-block scales are unpacked per (row, block), then applied to a
pair of weights at once: ``(1024 + q - 1024 - offset) * scale (+ min)`` in packed half2.
Q4_K/Q5_K: slot ``c`` is 64-element group ``c`` (low nibbles: sub-block ``2c``, high: ``2c + 1``).
Q6_K: slot ``c`` is the ``c % 2``-th 32 bytes of ``ql``'s half ``c // 2``. Q2_K/Q3_K: slot ``c``
is 16 bytes of ``qs``'s half ``c // 2``, each byte holding four 2-bit codes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.halfpack import MAGIC2, U32, dup, f16_bits, splat, sub_fma, sub_mul
from pallas_kernels.tile import Decoder, Loader, stack

QK_K = 256
F32 = jnp.float32
ONE = dup(f16_bits(1024))


def _byte(w: jax.Array, k: int) -> jax.Array:
    return (w >> U32(8 * k)) & U32(0xFF)


def _slot(v: jax.Array) -> jax.Array:
    """Iota over the lane-slot axis ``[1, 4, 1]``."""
    del v
    return jnp.arange(4, dtype=U32)[None, :, None]


def _per_slot(s: jax.Array, units: int) -> jax.Array:
    """``[BN, 4 * G]`` packed scales (``G`` per slot) -> ``[BN, 4, G * units]``."""
    s = s.reshape(s.shape[0], 4, -1, 1)
    return jnp.broadcast_to(s, (*s.shape[:3], units)).reshape(s.shape[0], 4, -1)


def _elems(fn, units: int, pairs: int) -> np.ndarray:
    c, u, p, e = np.meshgrid(np.arange(4), np.arange(units), np.arange(pairs), np.arange(2), indexing="ij")
    return fn(c, u, p, e)


def _k4_scales(ld: Loader) -> tuple[list, list]:
    """``get_scale_min_k4`` of the 8 sub-blocks: (scale, min) codes as ``[BN, 1]`` uint32."""
    w0, w1, w2 = (ld("scales", j, 3) for j in range(3))
    sc = [_byte(w0, j) & U32(63) for j in range(4)]
    mn = [_byte(w1, j) & U32(63) for j in range(4)]
    sc += [_byte(w2, j) & U32(0xF) | (_byte(w0, j) >> U32(6)) << U32(4) for j in range(4)]
    mn += [_byte(w2, j) >> U32(4) | (_byte(w1, j) >> U32(6)) << U32(4) for j in range(4)]
    return sc, mn


def _q45_k(high_bit: bool):
    def decode(ld: Loader, bb: int, interpret: bool) -> list[jax.Array]:
        w = ld("qs").reshape(-1, 4, 8)
        d, dmin = ld("d").astype(F32), ld("dmin").astype(F32)
        sc, mn = _k4_scales(ld)
        # sub-block 2c + hi of slot c: scale d * sc, min -dmin * m, per nibble half
        scale = [_per_slot(splat(d * stack([sc[2 * g + hi] for g in range(4)]).reshape(-1, 4).astype(F32)), 8)
                 for hi in range(2)]
        mins = [_per_slot(splat(-dmin * stack([mn[2 * g + hi] for g in range(4)]).reshape(-1, 4).astype(F32)), 8)
                for hi in range(2)]
        if high_bit:
            qh = jnp.broadcast_to(ld("qh").reshape(-1, 1, 8), w.shape)  # byte l of qh: bit 2c + hi
        out = []
        for p in range(4):
            hi = p % 2
            t = (w >> U32(4 * p)) & U32(0x000F000F) | U32(MAGIC2)
            if high_bit:
                sb = 2 * _slot(w) + U32(hi)
                hb = ((qh << U32(4)) >> sb) if p < 2 else (qh >> (sb + U32(4)))
                t = t | hb & U32(0x00100010)
            out.append(sub_fma(t, ONE, scale[hi], mins[hi], interpret))
        return out
    return decode


def _q45_k_elems(bb: int) -> np.ndarray:
    return _elems(lambda c, u, p, e: 64 * c + 32 * (p % 2) + 4 * u + p // 2 + 2 * e, 8, 4)


def _q6_k(ld: Loader, bb: int, interpret: bool) -> list[jax.Array]:
    w = ld("ql").reshape(-1, 4, 8)
    qh = ld("qh").reshape(-1, 2, 1, 8)  # qh word 8n + u serves both slots of half n
    qh = jnp.broadcast_to(qh, (qh.shape[0], 2, 2, 8)).reshape(w.shape)
    d = ld("d").astype(F32)
    first = jnp.arange(8, dtype=U32)[None, None, :] < U32(4)  # units 0-3 hold bytes 0-15 (is = 0)
    scale = []
    for hi in range(2):  # scales[8n + 2q + 4hi + is]: word 2n + hi, byte 2q + is
        wv = ld("scales", hi, 2)  # [BN, 2(n)]
        s = [splat(d * ((stack([_byte(wv, 2 * q + i) for q in range(2)]) ^ U32(0x80)).astype(jnp.int32) - 128)
                   .astype(F32).reshape(-1, 4)) for i in range(2)]  # [BN, 4(c = 2n + q)] per is
        # a select, not a reshape of a broadcast: keeps the decode in the MMA fragment's register
        # layout (else Triton stages the whole tile through shared memory)
        scale.append(jnp.where(first, s[0][:, :, None], s[1][:, :, None]))
    out = []
    for p in range(4):
        hi = p % 2
        sh = 2 * (_slot(w) % U32(2)) + U32(4 * hi)  # bits 2(q + 2hi) of each qh byte
        hb = ((qh << U32(4)) >> sh) if p < 2 else (qh >> (sh + U32(4)))
        t = (w >> U32(4 * p)) & U32(0x000F000F) | hb & U32(0x00300030) | U32(MAGIC2)
        out.append(sub_mul(t, dup(f16_bits(1056)), scale[hi], interpret))
    return out


def _q6_k_elems(bb: int) -> np.ndarray:
    return _elems(lambda c, u, p, e: 128 * (c // 2) + 32 * (c % 2) + 64 * (p % 2) + 4 * u + p // 2 + 2 * e, 8, 4)


def _two_bit_pairs(ld: Loader) -> tuple[jax.Array, list[jax.Array]]:
    """``qs`` words ``[BN, 4, 4]`` and ``1024 + q`` of the 8 pairs of each word: pair ``p`` holds
    the codes at bits ``2 j`` (``j = p // 2``) of bytes ``p % 2`` and ``p % 2 + 2``."""
    w = ld("qs").reshape(-1, 4, 4)
    return w, [(w >> U32(2 * (p // 2) + 8 * (p % 2))) & U32(0x00030003) | U32(MAGIC2) for p in range(8)]


def _two_bit_elems(bb: int) -> np.ndarray:
    return _elems(lambda c, u, p, e: 128 * (c // 2) + 32 * (p // 2) + 16 * (c % 2) + 4 * u + p % 2 + 2 * e, 4, 8)


def _q2_k(ld: Loader, bb: int, interpret: bool) -> list[jax.Array]:
    _, pairs = _two_bit_pairs(ld)
    d, dmin = ld("d").astype(F32), ld("dmin").astype(F32)
    out = []
    for p, t in enumerate(pairs):
        j = p // 2  # sub-block 8n + 2j + c % 2: scales word 2n + j // 2, byte c % 2 + 2 (j % 2)
        b = stack([_byte(ld("scales", j // 2, 2), (j % 2) * 2 + q) for q in range(2)]).reshape(-1, 4)
        s = _per_slot(splat(d * (b & U32(0xF)).astype(F32)), 4)
        o = _per_slot(splat(-dmin * (b >> U32(4)).astype(F32)), 4)
        out.append(sub_fma(t, ONE, s, o, interpret))
    return out


def _q3_k_scale(w: list, k: int) -> jax.Array:
    """Code of 6-bit sub-block scale ``k`` (ggml's packing of 16 scales in 12 bytes)."""
    lo = (_byte(w[(k % 8) // 4], k % 4) >> U32(4 * (k // 8))) & U32(0xF)
    hi = (_byte(w[2], k % 4) >> U32(2 * (k // 4))) & U32(3)
    return lo | hi << U32(4)


def _q3_k(ld: Loader, bb: int, interpret: bool) -> list[jax.Array]:
    w, pairs = _two_bit_pairs(ld)
    hm = ld("hmask").reshape(-1, 1, 2, 4)  # hmask byte l = 16 (c % 2) + 4 u + byte: word 4 (c % 2) + u
    hm = jnp.broadcast_to(hm, (hm.shape[0], 2, 2, 4)).reshape(w.shape)
    d = ld("d").astype(F32)
    words = [ld("scales", j, 3) for j in range(3)]
    out = []
    for p, t in enumerate(pairs):
        j = p // 2
        codes = stack([_q3_k_scale(words, 8 * (c // 2) + 2 * j + c % 2) for c in range(4)]).reshape(-1, 4)
        s = _per_slot(splat(d * (codes.astype(jnp.int32) - 32).astype(F32)), 4)
        sh = 4 * (_slot(w) // U32(2)) + U32(j)  # hmask bit 4n + j of each byte -> bits 2, 18
        hb = ((hm << U32(2)) >> sh) if p % 2 == 0 else (hm >> (sh + U32(6)))
        out.append(sub_mul(t | hb & U32(0x00040004), dup(f16_bits(1028)), s, interpret))
    return out


DECODERS = (
    Decoder("Q2_K", QK_K, _q2_k, _two_bit_elems, ("qs", "scales")),
    Decoder("Q3_K", QK_K, _q3_k, _two_bit_elems, ("qs", "hmask", "scales")),
    Decoder("Q4_K", QK_K, _q45_k(False), _q45_k_elems, ("qs", "scales")),
    Decoder("Q5_K", QK_K, _q45_k(True), _q45_k_elems, ("qs", "qh", "scales")),
    Decoder("Q6_K", QK_K, _q6_k, _q6_k_elems, ("ql", "qh", "scales")),
)
