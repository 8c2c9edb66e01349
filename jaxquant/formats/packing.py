"""b-bit codes as a little-endian bit stream in uint32 words (code i at bits ``b*i .. b*i+b-1``,
spilling into the next word when b does not divide 32): how GPTQ packs ``qweight``, MLX its
affine quants and HQQ its codes. One implementation for jnp (inside formats) and numpy (loaders).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def pack_bits(codes, bits: int, xp=jnp):
    """Codes ``[..., n]`` in [0, 2^bits) (n*bits a multiple of 32) -> uint32 words ``[..., n*bits/32]``;
    ``xp`` is jnp or np."""
    codes = xp.asarray(codes).astype(xp.uint32)
    lead = codes.shape[:-1]
    if 32 % bits == 0:  # whole codes per word
        shifted = codes.reshape(*lead, -1, 32 // bits) << xp.asarray(np.arange(0, 32, bits, dtype=np.uint32))
    else:  # codes straddle words: through the bit stream
        stream = (codes[..., None] >> xp.asarray(np.arange(bits, dtype=np.uint32))) & xp.uint32(1)
        shifted = stream.reshape(*lead, -1, 32) << xp.asarray(np.arange(32, dtype=np.uint32))
    return xp.sum(shifted, axis=-1, dtype=xp.uint32)  # disjoint bits: the sum is their OR


def unpack_bits(words, bits: int, xp=jnp):
    """The inverse of ``pack_bits``: uint32 words ``[..., W]`` -> codes ``[..., W*32/bits]`` (uint8)."""
    words = xp.asarray(words).astype(xp.uint32)
    n = words.shape[-1] * 32 // bits
    mask = xp.uint32((1 << bits) - 1)
    if 32 % bits == 0:
        codes = (words[..., None] >> xp.asarray(np.arange(0, 32, bits, dtype=np.uint32))) & mask
        return codes.reshape(*words.shape[:-1], n).astype(xp.uint8)
    pos = np.arange(n) * bits
    word, off = pos // 32, pos % 32
    nxt = np.minimum(word + 1, words.shape[-1] - 1)
    spill = xp.asarray(off + bits > 32)
    # codes that straddle two words take their high bits from the next one
    hi = xp.where(spill, words[..., nxt] << xp.asarray(((32 - off) % 32).astype(np.uint32)), xp.uint32(0))
    codes = (words[..., word] >> xp.asarray(off.astype(np.uint32))) | hi
    return (codes & mask).astype(xp.uint8)
