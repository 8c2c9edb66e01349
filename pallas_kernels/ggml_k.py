"""Kernel decoders of llama.cpp's 256-element K-quants: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

A step is one block, in two parts of 128 weights (``h`` = 0, 1); lane slot ``c`` takes the
``c``-th quarter of a part's quant bytes (a unit is one uint32 word of them). Sub-block scales are
unpacked per (row, block), then applied to a pair of weights at once in packed half2:
``(1024 + q - 1024 - offset) * scale (+ min)``.
- Q4_K/Q5_K: part ``h`` is groups ``2h``, ``2h + 1`` (64 weights each: 32 bytes, low nibbles in
  sub-block ``2g``, high in ``2g + 1``); slot ``c`` has 16 bytes of group ``2h + c // 2``.
- Q6_K: part ``h`` is the ``h``-th 128 weights (ql bytes ``64h..``, qh bytes ``32h..``); slot ``c``
  has ql bytes ``64h + 16c ..``, i.e. quarter ``c // 2`` of the half, bytes ``16 (c % 2) ..``.
- Q2_K/Q3_K: part ``h`` is ``qs`` bytes ``32h..`` (four 2-bit codes a byte); slot ``c`` has 8 bytes.
Per-slot values (scales, qh words) come from the slot index, by variable shifts or ``where``, not
by stacking or reshaping a broadcast: that keeps Triton's layout the MMA fragment's (else it
redistributes them, or the whole tile, through shared memory).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.halfpack import MAGIC2, U32, dup, f16_bits, splat, sub_fma, sub_mul
from pallas_kernels.tile import Decoder, Loader

QK_K = 256
F32 = jnp.float32


def _slot() -> jax.Array:
    """Iota over the lane-slot axis ``[1, 4, 1]``."""
    return jnp.arange(4, dtype=U32)[None, :, None]


def _field(w: jax.Array, shift: jax.Array, bits: int) -> jax.Array:
    """Per slot, ``bits`` bits of the per-row word ``w [BN, 1]`` from bit ``shift [1, 4, 1]``:
    ``[BN, 4, 1]``, each slot extracting its own (no cross-lane movement)."""
    return (w[:, :, None] >> shift) & U32((1 << bits) - 1)


def _elems(fn, units: int, pairs: int) -> np.ndarray:
    h, c, u, p, e = np.meshgrid(*(np.arange(n) for n in (2, 4, units, pairs, 2)), indexing="ij")
    return fn(h, c, u, p, e)


def _k4_scale_min(w: list[jax.Array], h: int, hi: int) -> tuple[jax.Array, jax.Array]:
    """``get_scale_min_k4`` of sub-block ``j = 4h + 2 (c // 2) + hi`` of each slot: (scale, min)
    codes ``[BN, 4, 1]``. Byte ``k = j % 4`` of the 12: j < 4 in words 0, 1; j >= 4 split."""
    sh = U32(8 * hi) + U32(16) * (_slot() // U32(2))  # 8 k
    if h == 0:
        return _field(w[0], sh, 6), _field(w[1], sh, 6)
    up = sh + U32(6)
    return (_field(w[2], sh, 4) | _field(w[0], up, 2) << U32(4),
            _field(w[2], sh + U32(4), 4) | _field(w[1], up, 2) << U32(4))


def _q45_k(high_bit: bool):
    def decode(ld: Loader, bb: int, interpret: bool) -> list[list[jax.Array]]:
        d, dmin = ld("d").astype(F32)[:, :, None], ld("dmin").astype(F32)[:, :, None]
        words = [ld("scales", j, 3) for j in range(3)]
        if high_bit:  # qh byte l (of a group's 32): bit j is the 5th bit of sub-block j; slot c's word 4 (c % 2) + u
            first = _slot() % U32(2) == 0
            qh = jnp.where(first, ld("qh", 0, 1, 4)[:, None, :], ld("qh", 4, 1, 4)[:, None, :])
        parts = []
        for h in range(2):
            w = ld("qs", 16 * h, 1, 16).reshape(-1, 4, 4)
            out = []
            for p in range(4):
                hi = p % 2  # sub-block 2g + hi of group g = 2h + c // 2
                sc, mn = _k4_scale_min(words, h, hi)
                scale, mins = splat(d * sc.astype(F32)), splat(-dmin * mn.astype(F32))
                t = (w >> U32(4 * p)) & U32(0x000F000F) | U32(MAGIC2)
                if high_bit:
                    sb = U32(4 * h + hi) + 2 * (_slot() // U32(2))
                    hb = ((qh << U32(4)) >> sb) if p < 2 else (qh >> (sb + U32(4)))
                    t = t | hb & U32(0x00100010)
                out.append(sub_fma(t, MAGIC2, scale, mins, interpret))
            parts.append(out)
        return parts
    return decode


def _q45_k_elems(bb: int) -> np.ndarray:
    return _elems(lambda h, c, u, p, e: 64 * (2 * h + c // 2) + 32 * (p % 2) + 16 * (c % 2) + 4 * u + p // 2 + 2 * e,
                  4, 4)


def _q6_k(ld: Loader, bb: int, interpret: bool) -> list[list[jax.Array]]:
    d = ld("d").astype(F32)
    first = _slot() % U32(2) == 0
    parts = []
    for h in range(2):
        w = ld("ql", 16 * h, 1, 16).reshape(-1, 4, 4)
        # qh byte 32h + l serves ql bytes 64h + l and 64h + 32 + l: slot c's words 8h + 4 (c % 2) + u
        qh = jnp.where(first, ld("qh", 8 * h, 1, 4)[:, None, :], ld("qh", 8 * h + 4, 1, 4)[:, None, :])
        out = []
        for p in range(4):
            hi = p % 2
            wv = ld("scales", 2 * h + hi, 1, 1)  # scales[8h + 4hi + c]: byte c of word 2h + hi
            sc = (_field(wv, U32(8) * _slot(), 8) ^ U32(0x80)).astype(jnp.int32) - 128
            sh = 2 * (_slot() // U32(2)) + U32(4 * hi)  # bits 2 (q + 2hi) of each qh byte, q = c // 2
            hb = ((qh << U32(4)) >> sh) if p < 2 else (qh >> (sh + U32(4)))
            t = (w >> U32(4 * p)) & U32(0x000F000F) | hb & U32(0x00300030) | U32(MAGIC2)
            out.append(sub_mul(t, dup(f16_bits(1056)), splat(d[:, :, None] * sc.astype(F32)), interpret))
        parts.append(out)
    return parts


def _q6_k_elems(bb: int) -> np.ndarray:
    return _elems(lambda h, c, u, p, e: 128 * h + 32 * (c // 2) + 64 * (p % 2) + 16 * (c % 2) + 4 * u + p // 2 + 2 * e,
                  4, 4)


def _two_bit_pairs(ld: Loader, h: int) -> list[jax.Array]:
    """``1024 + q`` of the 8 pairs of each of a slot's 2 ``qs`` words: pair ``p`` holds the codes
    at bits ``2 j`` (``j = p // 2``) of bytes ``p % 2`` and ``p % 2 + 2``."""
    w = ld("qs", 8 * h, 1, 8).reshape(-1, 4, 2)
    return [(w >> U32(2 * (p // 2) + 8 * (p % 2))) & U32(0x00030003) | U32(MAGIC2) for p in range(8)]


def _two_bit_elems(bb: int) -> np.ndarray:
    return _elems(lambda h, c, u, p, e: 128 * h + 32 * (p // 2) + 8 * c + 4 * u + p % 2 + 2 * e, 2, 8)


def _q2_k(ld: Loader, bb: int, interpret: bool) -> list[list[jax.Array]]:
    d, dmin = ld("d").astype(F32), ld("dmin").astype(F32)
    parts = []
    for h in range(2):
        out = []
        for p, t in enumerate(_two_bit_pairs(ld, h)):
            j = p // 2  # sub-block 8h + 2j + c // 2: scales word 2h + j // 2, byte 2 (j % 2) + c // 2
            wv = ld("scales", 2 * h + j // 2, 1, 1)
            b = _field(wv, U32(16 * (j % 2)) + U32(8) * (_slot() // U32(2)), 8)
            s = splat(d[:, :, None] * (b & U32(0xF)).astype(F32))
            o = splat(-dmin[:, :, None] * (b >> U32(4)).astype(F32))
            out.append(sub_fma(t, MAGIC2, s, o, interpret))
        parts.append(out)
    return parts


def _q3_k_scale(w: list, h: int, j: int) -> jax.Array:
    """6-bit code of sub-block scale ``k = 8h + 2j + c // 2`` per slot (ggml's packing of 16 scales
    in 12 bytes: low 4 bits in nibble ``k // 8`` of byte ``k % 8``, high 2 at bits ``2 (k // 4)`` of
    byte ``8 + k % 4``), ``[BN, 4, 1]``."""
    byte = U32(2 * (j % 2)) + _slot() // U32(2)  # k % 4; k % 8 = 4 (j // 2) + k % 4
    lo = _field(w[j // 2], U32(8) * byte + U32(4 * h), 4)
    hi = _field(w[2], U32(8) * byte + U32(2 * (2 * h + j // 2)), 2)
    return lo | hi << U32(4)


def _q3_k(ld: Loader, bb: int, interpret: bool) -> list[list[jax.Array]]:
    hm = ld("hmask").reshape(-1, 4, 2)  # hmask byte l = 8c + 4u + byte: word 2c + u; bit 4h + j
    d = ld("d").astype(F32)
    words = [ld("scales", j, 3) for j in range(3)]
    parts = []
    for h in range(2):
        out = []
        for p, t in enumerate(_two_bit_pairs(ld, h)):
            j = p // 2
            codes = _q3_k_scale(words, h, j)
            s = splat(d[:, :, None] * (codes.astype(jnp.int32) - 32).astype(F32))
            sh = U32(4 * h + j)  # hmask bit 4h + j of each byte -> bits 2, 18
            hb = ((hm << U32(2)) >> sh) if p % 2 == 0 else (hm >> (sh + U32(6)))
            out.append(sub_mul(t | hb & U32(0x00040004), dup(f16_bits(1028)), s, interpret))
        parts.append(out)
    return parts


DECODERS = (
    Decoder("Q2_K", QK_K, _q2_k, _two_bit_elems, ("qs", "scales")),
    Decoder("Q3_K", QK_K, _q3_k, _two_bit_elems, ("qs", "hmask", "scales")),
    Decoder("Q4_K", QK_K, _q45_k(False), _q45_k_elems, ("qs", "scales")),
    Decoder("Q5_K", QK_K, _q45_k(True), _q45_k_elems, ("qs", "qh", "scales")),
    Decoder("Q6_K", QK_K, _q6_k, _q6_k_elems, ("ql", "qh", "scales")),
)
