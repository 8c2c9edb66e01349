"""HQQ (half-quadratic quantization, mobiusml/hqq ``Quantizer.quantize(optimize=True)``).

Groups of ``g``: ``axis=1`` (formats ``HQQ{b}_G{g}``) cuts each row into runs of ``g`` along the
input; ``axis=0`` (``HQQ{b}_G{g}_AX0``, hqq's default) reshapes the flattened tensor to
``[g, N*K/g]`` and groups its columns. Per group ``s = (2^b - 1) / (max - min)`` (1 where
``|max - min| <= 1e-4``, at most 2e4), ``z = -min * s``; then hqq's proximal solver on CPU
(float32, ``optimize_weights_proximal_legacy``: lp norm 0.7, beta 10 -- its kappa is unused --
at most 20 iterations): ``q = clamp(round(x s + z))``, ``x_r = (q - z) / s``,
``e = shrink(x - x_r)``, ``z = mean(q - (x - e) s)``; it stops after the first iteration whose
mean ``|x - x_r|`` over the whole tensor does not improve (keeping that iteration's ``z``), so
every format here quantizes whole tensors. Stored like ``HQQLinear`` with a float16 compute
dtype: codes packed ``b`` bits per code (a little-endian bit stream in uint32 words), float16
``scale = 1/s`` and ``zero``; dequantized ``(q - zero) * scale`` in float16 arithmetic.

Every operation rounds as torch's CPU kernels do (its means are sums in ATen's cascade order,
``torch_sum``), so codes, ``s`` and ``z`` are hqq's bit for bit, but for one: torch's ``pow``
(Sleef's ``powf_u10``, within 1 ulp) differs by an ulp from XLA's on ~2% of values, which moves
the last bits of a few ``z`` where the shrink term is active (measured <= 2e-6 relative, at 1-2
bits; no code or float16 zero moved).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxquant.formats.mlx_affine import round_to
from jaxquant.formats.numerics import F32, div, mul, seqsum
from jaxquant.formats.packing import pack_bits, unpack_bits
from jaxquant.formats.registry import Field, Format, register

BITS = (1, 2, 3, 4, 8)
GROUPS = (32, 64, 128)
LP_NORM, BETA, ITERS = 0.7, 10.0, 20


# torch's CPU sum (ATen SumKernel.cpp ``cascade_sum``, AVX2's 8 float lanes): hqq's means are
# ``sum / n``, and their rounding decides zero's last bits and the early stop.
LANES = 8


def _cascade(rows: jax.Array) -> jax.Array:
    """``multi_row_sum``: rows ``[n, ...]`` summed in runs of 2^p rows (p = max(4, ceil(log2 n) / 4)),
    run sums accumulated over three levels, each flushed to the next after 2^p of its own."""
    n, rest = rows.shape[0], rows.shape[1:]
    step = 1 << max(4, (n - 1).bit_length() // 4)
    accs, level = [], rows
    for _ in range(3):
        full = level.shape[0] // step * step
        accs.append(seqsum(level[full:], 0))
        level = seqsum(level[:full].reshape(full // step, step, *rest), 1)
    return ((accs[0] + accs[1]) + accs[2]) + seqsum(level, 0)


def _row_sum(rows: jax.Array) -> jax.Array:
    """``row_sum``: four interleaved cascades (rows ``4i + k``), the leftover rows, then the four."""
    n = rows.shape[0] // 4 * 4
    p = _cascade(rows[:n].reshape(n // 4, 4, *rows.shape[1:]))
    return seqsum(jnp.concatenate([p[:1], rows[n:], p[1:]]), 0)


def torch_sum(x: jax.Array, axis: int, threads: int = 1) -> jax.Array:
    """torch's float32 ``x.sum(axis)`` on CPU for a contiguous ``x[R, C]``; ``axis=None`` sums
    everything as ``threads`` OpenMP threads do (chunks of at least 2^15, then their sums)."""
    if axis is None:
        flat = x.reshape(1, -1)
        chunks = min(threads, max(1, -(-flat.size // 32768)))
        size = -(-flat.size // chunks)
        parts = [torch_sum(flat[:, i:i + size], 1) for i in range(0, flat.size, size)]
        return seqsum(jnp.concatenate(parts), 0)
    r, c = x.shape
    if axis == 1 and c < LANES:
        return _row_sum(x.T)
    if axis == 1:  # contiguous: vectors of 8 down the row, then the leftover and the 8 lanes
        v = c // LANES * LANES
        lanes = _row_sum(jnp.moveaxis(x[:, :v].reshape(r, -1, LANES), 1, 0))
        return seqsum(jnp.concatenate([x[:, v:], lanes], 1), 1)
    # down the columns: blocks of 4 vectors (>= 8 columns) or 4 columns as plain cascades,
    # the remaining columns as row_sum
    v = c // (4 * LANES) * 4 * LANES if c >= LANES else c // 4 * 4
    return jnp.concatenate([_cascade(x[:, :v]), _row_sum(x[:, v:])])


def _shrink(x: jax.Array) -> jax.Array:
    """hqq's ``shrink_lp_op``: sign(x) * relu(|x| - (1/beta) |x|^(p-1))."""
    a = jnp.abs(x)
    return mul(jnp.maximum(a - mul(F32(1 / BETA), a ** F32(LP_NORM - 1)), 0), jnp.sign(x))


def hqq_quantize(x: jax.Array, bits: int, group: int, axis: int,
                 threads: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``x f32[N, K]`` -> (codes in hqq's grouped shape, float32 ``s``, ``z``) as hqq computes them
    (``s`` before hqq inverts it). Groups run along ``axis`` of the grouped matrix; ``bits`` may be
    an integer array (vmapped over). ``threads``: torch's thread count, which orders the sum of the
    whole-tensor error (the early stop) for tensors of more than 2^15 values."""
    w = x.reshape(-1, group) if axis == 1 else x.reshape(group, -1)
    max_v = (jnp.left_shift(1, bits) - 1).astype(F32)
    lo, hi = jnp.min(w, axis=axis, keepdims=True), jnp.max(w, axis=axis, keepdims=True)
    denom = hi - lo
    # torch's ``int / tensor`` is ``tensor.reciprocal() * int``
    scale = jnp.minimum(jnp.where(jnp.abs(denom) <= 1e-4, F32(1), mul(div(F32(1), denom), max_v)), F32(2e4))
    zero = -mul(lo, scale)

    def quant(zero):
        return jnp.clip(jnp.round(mul(w, scale) + zero), 0, max_v)

    def step(_, state):
        zero, best, done = state
        q = quant(zero)
        w_r = div(q - zero, scale)
        w_e = _shrink(w - w_r)
        new_zero = div(jnp.expand_dims(torch_sum(q - mul(w - w_e, scale), axis), axis), F32(group))
        err = div(torch_sum(jnp.abs(w - w_r), None, threads), F32(w.size))
        better = err < best
        return (jnp.where(done, zero, new_zero), jnp.where(done | ~better, best, err), done | ~better)

    zero, _, _ = lax.fori_loop(0, ITERS, step, (zero, F32(jnp.inf), jnp.asarray(False)))
    return quant(zero).astype(jnp.int32), scale, zero


def hqq_arrays(q: jax.Array, scale: jax.Array, zero: jax.Array, shape: tuple[int, int], bits: int, group: int,
               axis: int) -> dict[str, jax.Array]:
    """hqq's codes and float32 meta (``scale`` inverted, as ``meta["scale"]``) of an ``[N, K]``
    tensor -> the stored arrays: packed codes, float16 scale and zero as ``HQQLinear`` keeps them."""
    n, k = shape
    meta = (n, k // group) if axis == 1 else (-1,)
    codes = q.reshape(n, k // group, group) if axis == 1 else q.reshape(n, k)
    return {"q": pack_bits(codes, bits), "scale": scale.astype(jnp.float16).reshape(meta),
            "zero": zero.astype(jnp.float16).reshape(meta)}


def _quantize(x: jax.Array, bits: int, group: int, axis: int) -> dict[str, jax.Array]:
    q, scale, zero = hqq_quantize(x, bits, group, axis)
    return hqq_arrays(q, div(F32(1), scale), zero, x.shape, bits, group, axis)


def _dequantize(a: dict[str, jax.Array], bits: int, group: int, axis: int) -> jax.Array:
    q = unpack_bits(a["q"], bits).astype(F32)
    s, z = a["scale"].astype(F32), a["zero"].astype(F32)
    dt = a["scale"].dtype
    if axis == 1:
        y = round_to(mul(round_to(q - z[..., None], dt), s[..., None]), dt)
        return y.reshape(y.shape[0], -1)
    n = q.shape[0]
    qg = q.reshape(group, -1)
    return round_to(mul(round_to(qg - z, dt), s), dt).reshape(n, -1)


def _register(bits: int, group: int, axis: int) -> Format:
    if axis == 1:
        fields = (Field("q", "uint32", group * bits // 32), Field("scale", "float16"), Field("zero", "float16"))
    else:
        fields = (Field("q", "uint32"), Field("scale", "float16", layout="mixed"),
                  Field("zero", "float16", layout="mixed"))
    return register(Format(f"HQQ{bits}_G{group}" + ("_AX0" if axis == 0 else ""), group if axis == 1 else 32,
                           fields, lambda a: _dequantize(a, bits, group, axis),
                           lambda x, qw: _quantize(x, bits, group, axis), "hqq", gguf=False, scope="tensor"))


FORMATS = {(b, g, axis): _register(b, g, axis) for b in BITS for g in GROUPS for axis in (1, 0)}
