"""GPTQ and AWQ: b-bit affine integers (b = 2, 3, 4, 8) in groups of g along the input dim,
``w = s * (q - z)`` with an fp16 scale and an integer zero point per (output row, group).

Compute layout of a weight of shape ``(N, K)`` (N outputs, K inputs):

- ``qs``    uint32 ``(N, K/g, g*b/32)``: a group's codes as one little-endian bit stream (code i at
  bits ``b*i ..``, spilling into the next word for b = 3), exactly how GPTQ packs ``qweight`` along K;
- ``scale`` float16 ``(N, K/g)``; ``zero`` uint8 ``(N, K/g)``, the true zero point (GPTQ v2 / AWQ);
- ``perm``  int32 ``(K,)``, act-order tensors only (a per-tensor field, see the registry): stored
  column j holds input column ``perm[j]``, so every group is contiguous and ``qdot`` multiplies
  ``x[..., perm]`` by the stored weight; ``take_rows`` keeps it whole.

GPTQ's ``qweight [K*b/32, N]`` is ``qs`` transposed, so a plain GPTQ tensor loads by a transpose;
AWQ (packed along N, nibble order 0 2 4 6 1 3 5 7), act-order tensors and GPTQ v1 zeros (stored
minus one) are unpacked and repacked once at load. All conversions are lossless, and ``to_gptq`` /
``to_awq`` are the exact inverses of ``from_gptq`` / ``from_awq`` (what ``io.hf_export`` writes). ``dequantize`` is
what the reference libraries compute in fp16: ``fp16(s * (q - z))``. The quantizer is AutoGPTQ's
round-to-nearest (``minmax_params``); ``jaxquant.calib`` makes GPTQ and AWQ tensors of these formats.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.errors import FormatError
from jaxquant.formats.numerics import div
from jaxquant.formats.packing import pack_bits, unpack_bits
from jaxquant.formats.registry import Field, Format, get_format, register
from jaxquant.qtensor import QTensor

BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128)  # registered at import; other group sizes (-1: the row length) on first use
AWQ_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])  # word position p holds column AWQ_ORDER[p] of its 8
AWQ_REVERSE_ORDER = np.argsort(AWQ_ORDER)  # column c sits at word position AWQ_REVERSE_ORDER[c]


def gptq_format(bits: int, group: int) -> Format:
    """The format ``GPTQ{bits}_G{group}``: b-bit codes in groups of ``group`` inputs."""
    if bits not in BITS:
        raise FormatError(f"GPTQ/AWQ: {bits}-bit codes are not supported; supported: {BITS}")
    if group <= 0 or group * bits % 32:
        raise FormatError(f"GPTQ/AWQ: group size {group} at {bits} bits does not fill whole 32-bit words "
                          "(group * bits must be a multiple of 32)")
    name = f"GPTQ{bits}_G{group}"
    try:
        return get_format(name)
    except FormatError:
        fields = (Field("qs", "uint32", group * bits // 32), Field("scale", "float16"), Field("zero", "uint8"),
                  Field("perm", "int32", layout="tensor"))
        return register(Format(name, group, fields, functools.partial(_dequantize, bits=bits),
                               functools.partial(_quantize, bits=bits, group=group), "gptq", gguf=False))


def minmax_params(wg: jax.Array, bits: int, sym: bool = False) -> tuple[jax.Array, jax.Array]:
    """AutoGPTQ's ``Quantizer.find_params(perchannel=True, weight=True)`` (no MSE search) over the
    last axis: (scale, zero) in ``wg``'s dtype. The range always includes 0; ``sym``: centered zero."""
    maxq = (1 << bits) - 1
    xmin, xmax = jnp.minimum(wg.min(-1), 0), jnp.maximum(wg.max(-1), 0)
    if sym:
        xmax = jnp.maximum(jnp.abs(xmin), xmax)
        xmin = jnp.where(xmin < 0, -xmax, xmin)
    both = (xmin == 0) & (xmax == 0)
    xmin, xmax = jnp.where(both, -1, xmin), jnp.where(both, 1, xmax)
    scale = div(xmax - xmin, maxq)
    return scale, (jnp.full_like(scale, (maxq + 1) / 2) if sym else jnp.round(div(-xmin, scale)))


def _quantize(x: jax.Array, qw: jax.Array | None, bits: int, group: int) -> dict[str, jax.Array]:
    """Round-to-nearest as AutoGPTQ's quantizer (asymmetric): ``clamp(round(x / s) + z, 0, 2^b - 1)``
    per group with the float32 scale, stored in float16 as its packers store it."""
    del qw  # no importance weights in AutoGPTQ's quantizer
    xg = x.reshape(x.shape[0], -1, group)
    scale, zero = minmax_params(xg, bits)
    q = jnp.clip(jnp.round(div(xg, scale[..., None])) + zero[..., None], 0, (1 << bits) - 1)
    return {"qs": pack_bits(q.astype(jnp.uint32), bits), "scale": scale.astype(jnp.float16),
            "zero": zero.astype(jnp.uint8)}


def _dequantize(a: dict[str, jax.Array], bits: int) -> jax.Array:
    q = unpack_bits(a["qs"], bits).astype(jnp.float32)  # [..., G, g]
    s, z = a["scale"][..., None], a["zero"][..., None].astype(jnp.float32)
    # s * (q - z) is exact in f32 (11 + 9 bits); one rounding to the scale's dtype as torch's fp16 op
    w = ((q - z) * s.astype(jnp.float32)).astype(s.dtype).astype(jnp.float32)
    w = w.reshape(*w.shape[:-2], -1)
    if "perm" in a:  # back to the input order: column perm[j] is stored column j
        inverse = jnp.zeros_like(a["perm"]).at[a["perm"]].set(jnp.arange(a["perm"].shape[0], dtype=a["perm"].dtype))
        w = jnp.take(w, inverse, axis=-1)
    return w


def _check_group(k: int, group: int, where: str) -> int:
    group = k if group in (-1, None) else int(group)
    if group <= 0 or k % group:
        raise FormatError(f"{where}: {k} input features are not a whole number of groups of {group}")
    return group


def is_act_order(g_idx: np.ndarray, k: int, group: int) -> bool:
    """Whether ``g_idx`` scatters the groups (loads with a column permutation)."""
    return not np.array_equal(np.asarray(g_idx).reshape(-1), np.arange(k) // group)


def _act_order(g_idx: np.ndarray | None, k: int, group: int, where: str) -> np.ndarray | None:
    """The column permutation that makes act-order groups contiguous (None when they already are)."""
    if g_idx is None:
        return None
    g_idx = np.asarray(g_idx).astype(np.int64).reshape(-1)
    if g_idx.shape != (k,):
        raise FormatError(f"{where}: g_idx has {g_idx.size} entries, the weight has {k} input features")
    if not is_act_order(g_idx, k, group):
        return None
    if g_idx.min() < 0 or g_idx.max() >= k // group or np.any(np.bincount(g_idx, minlength=k // group) != group):
        raise FormatError(f"{where}: g_idx does not put exactly {group} input features in each of the "
                          f"{k // group} groups; such a checkpoint cannot be loaded")
    return np.argsort(g_idx, kind="stable").astype(np.int32)


def _qtensor(codes_t: np.ndarray | None, words_t: np.ndarray | None, scales: np.ndarray, zeros: np.ndarray,
             bits: int, group: int, perm: np.ndarray | None, where: str) -> QTensor:
    """QTensor from codes ``[N, K]`` (or, already packed, words ``[N, K*b/32]``), scales and zeros
    ``[K/g, N]`` as stored."""
    if scales.dtype != np.float16:
        raise FormatError(f"{where}: scales of dtype {scales.dtype}; GPTQ/AWQ checkpoints store float16 scales")
    fmt = gptq_format(bits, group)
    if words_t is None:
        words_t = pack_bits(codes_t, bits, np)
    n, kw = words_t.shape
    k = kw * 32 // bits
    if scales.shape != (k // group, n) or zeros.shape != scales.shape:
        raise FormatError(f"{where}: scales {scales.shape} / zeros {zeros.shape} do not fit a [{n}, {k}] weight "
                          f"in groups of {group} (expected {(k // group, n)})")
    arrays = {"qs": jnp.asarray(np.ascontiguousarray(words_t.reshape(n, k // group, -1))),
              "scale": jnp.asarray(np.ascontiguousarray(scales.T)),
              "zero": jnp.asarray(np.ascontiguousarray(zeros.T.astype(np.uint8)))}
    if perm is not None:
        arrays["perm"] = jnp.asarray(perm)
    return QTensor(arrays, fmt.name, (n, k))


def from_gptq(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray | None, *,
              bits: int, group_size: int, v1: bool, where: str = "GPTQ tensor") -> QTensor:
    """A GPTQ linear layer (``qweight [K*b/32, N]``, ``qzeros [K/g, N*b/32]``, ``scales [K/g, N]``,
    optional ``g_idx [K]``) -> QTensor ``(N, K)``. ``v1``: the zeros were stored minus one
    (checkpoint_format 'gptq'); a v1 code of 2^b - 1 (a zero point of 0, which v1 cannot store)
    wraps to 0 as the reference kernels read it."""
    words = np.asarray(qweight).view(np.uint32)
    k, n = words.shape[0] * 32 // bits, words.shape[1]
    group = _check_group(k, group_size, where)
    zeros = unpack_bits(np.asarray(qzeros).view(np.uint32), bits, np)[:, :n]
    if v1:
        zeros = ((zeros.astype(np.int32) + 1) & ((1 << bits) - 1)).astype(np.uint8)
    perm = _act_order(g_idx, k, group, where)
    if perm is None:
        return _qtensor(None, words.T, np.asarray(scales), zeros, bits, group, None, where)
    codes = unpack_bits(words.T, bits, np)[:, perm]  # [N, K] in act order
    return _qtensor(codes, None, np.asarray(scales), zeros, bits, group, perm, where)


def from_awq(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, *, bits: int, group_size: int,
             where: str = "AWQ tensor") -> QTensor:
    """An AutoAWQ GEMM layer (``qweight [K, N*b/32]`` and ``qzeros [K/g, N*b/32]`` packed along N in
    the order 0 2 4 6 1 3 5 7, ``scales [K/g, N]``) -> QTensor ``(N, K)``."""
    if bits != 4:
        raise FormatError(f"{where}: AWQ GEMM packs 4-bit codes, the config says {bits} bits")

    def columns(words: np.ndarray) -> np.ndarray:
        codes = unpack_bits(np.asarray(words).view(np.uint32), bits, np)
        codes = codes.reshape(*codes.shape[:-1], -1, 8)[..., AWQ_REVERSE_ORDER]
        return codes.reshape(*codes.shape[:-2], -1)

    codes = columns(qweight)
    group = _check_group(codes.shape[0], group_size, where)
    return _qtensor(codes.T, None, np.asarray(scales), columns(qzeros), bits, group, None, where)


def bits_of(q: QTensor) -> int:
    """The code width of a ``GPTQ{b}_G{g}`` QTensor."""
    fmt = q.format
    if fmt.family != "gptq":
        raise FormatError(f"{q.fmt} is not a GPTQ/AWQ format (GPTQ{{b}}_G{{g}})")
    return fmt.fields[0].count * 32 // fmt.block_size


def _pad_columns(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes ``[R, N]`` padded with zeros to whole 32-bit words (how ``qzeros`` rows end)."""
    per = 32 // np.gcd(32, bits)
    return np.pad(codes, ((0, 0), (0, -codes.shape[1] % per)))


def to_gptq(q: QTensor, *, v1: bool, where: str = "GPTQ tensor") -> dict[str, np.ndarray]:
    """The inverse of ``from_gptq``: ``qweight [K*b/32, N]`` (int32, input order), ``qzeros
    [K/g, ceil(N*b/32)]`` (int32; ``v1``: zeros minus one), ``scales [K/g, N]`` (float16) and
    ``g_idx [K]`` (int32; an act-order tensor's column order). v1 cannot store a zero point of 0:
    FormatError (write v2)."""
    bits, group = bits_of(q), q.format.block_size
    n, k = q.shape
    words = np.asarray(q.arrays["qs"]).reshape(n, -1)
    g_idx = (np.arange(k) // group).astype(np.int32)
    if "perm" in q.arrays:  # stored column j is input column perm[j]: back to the input order
        perm = np.asarray(q.arrays["perm"])
        codes = np.empty((n, k), np.uint8)
        codes[:, perm] = unpack_bits(words, bits, np)
        words, g_idx = pack_bits(codes, bits, np), g_idx[np.argsort(perm)]
    zeros = np.asarray(q.arrays["zero"]).T.astype(np.int32)
    if v1:
        if (zeros == 0).any():
            g, row = (int(i[0]) for i in np.nonzero(zeros == 0))
            raise FormatError(f"{where}: zero point 0 (group {g}, row {row}) cannot be stored in GPTQ v1, whose "
                              "zeros are stored minus one; write checkpoint_format 'gptq_v2'")
        zeros = zeros - 1
    return {"qweight": np.ascontiguousarray(words.T).view(np.int32),
            "qzeros": pack_bits(_pad_columns(zeros, bits), bits, np).view(np.int32),
            "scales": np.ascontiguousarray(np.asarray(q.arrays["scale"]).T), "g_idx": g_idx}


def to_awq(q: QTensor, where: str = "AWQ tensor") -> dict[str, np.ndarray]:
    """The inverse of ``from_awq``: ``qweight [K, N/8]`` and ``qzeros [K/g, N/8]`` (int32, packed
    along N in the order 0 2 4 6 1 3 5 7), ``scales [K/g, N]`` (float16)."""
    bits = bits_of(q)
    n, k = q.shape
    if bits != 4 or "perm" in q.arrays or n % 8:
        raise FormatError(f"{where}: AWQ GEMM packs 4-bit codes in input order with a multiple of 8 outputs; this "
                          f"is {q.fmt} [{n}, {k}]{' in act order' if 'perm' in q.arrays else ''} (write it as GPTQ)")

    def pack(codes: np.ndarray) -> np.ndarray:  # [R, N] -> [R, N/8]: word position p holds column AWQ_ORDER[p]
        codes = codes.reshape(codes.shape[0], -1, 8)[..., AWQ_ORDER].reshape(codes.shape[0], -1)
        return pack_bits(codes, bits, np).view(np.int32)

    codes = unpack_bits(np.asarray(q.arrays["qs"]).reshape(n, -1), bits, np)
    return {"qweight": pack(np.ascontiguousarray(codes.T)), "qzeros": pack(np.asarray(q.arrays["zero"]).T),
            "scales": np.ascontiguousarray(np.asarray(q.arrays["scale"]).T)}


FORMATS = {(b, g): gptq_format(b, g) for b in BITS for g in GROUPS}
