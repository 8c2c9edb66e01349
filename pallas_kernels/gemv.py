"""Matrix-vector products (M = 1: decoding one sequence) on the CUDA cores, with integer dot products.

At M = 1 ``qmm`` keeps the tensor cores' tiles 1/16 used, and turning every weight into float16
costs ~3.4 instructions a weight. Here, as in llama.cpp's ``mmvq``, the activations are quantized
once per call and the weights' codes stay integers:
- activations: per block of 32, int16 with a float32 scale (rounding error <= 1.5e-5 of the
  block's largest value, so the 2e-3 check holds; int8, as llama.cpp uses, would not), and the
  integer sums of each 16 of them, for the formats' offsets and mins; one small kernel, the same
  for every format, so the q/k/v products of one input share it;
- weights: a nibble plane is one mask (and a shift), and ``dp2a`` multiplies two int16 activations
  by two int8 codes and adds: about one instruction a weight;
- scales, mins and offsets apply per group to the integer sums, in float32.

The weight rows are spread over the threads and ``S`` blocks are taken per step; the ``splits``
programs of a row block sum K slices, added by XLA.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from jaxquant.errors import JaxquantError
from jaxquant.qtensor import QTensor
from pallas_kernels.halfpack import asm_i32

NUM_SMS = 132
F32 = jnp.float32
XB = 32  # activation block


@dataclasses.dataclass(frozen=True)
class GemvDecoder:
    """A block format's integer view.

    ``step(ld, xpair, xs, interpret)`` -> float32 ``[BN, S]``: each row's product with the
    activations over each of the step's ``S`` blocks. ``ld(name, start=0, size=None)`` gives a
    field's ``[BN, S]`` (one value a block) or ``[BN, S, size]`` (uint32 words of byte fields in
    ``words``); ``xpair(elem, n)`` the int16 activations of elements ``elem + 4 i .. + 3``
    (``i < n``, within one block of 32) as two packed words ``(lo, hi)`` of ``[1, S, n]``;
    ``xs("dx" | "sum" | "sum16", i)`` a ``[1, S]`` per-block column: the scale of activation
    block ``i`` (of 32) of the weight block, the integer sum of that block, or of its ``i``-th 16
    (each one load: the sums of 32 are stored, not added from two of 16).
    """

    fmt: str
    block_size: int
    step: Callable
    words: tuple[str, ...]


def idot(b: jax.Array, lo: jax.Array, hi: jax.Array, interpret: bool) -> jax.Array:
    """Per word, the int32 dot of the 4 signed bytes of ``b`` with 4 int16 values packed two a word
    in ``lo`` (for bytes 0, 1) and ``hi`` (bytes 2, 3): two ``dp2a``."""
    if interpret:
        def byte(k):
            return lax.bitcast_convert_type(((b >> (8 * k)) & 0xFF).astype(jnp.uint8), jnp.int8).astype(jnp.int32)

        def half(v, k):
            return lax.bitcast_convert_type(((v >> (16 * k)) & 0xFFFF).astype(jnp.uint16), jnp.int16).astype(jnp.int32)
        return byte(0) * half(lo, 0) + byte(1) * half(lo, 1) + byte(2) * half(hi, 0) + byte(3) * half(hi, 1)
    return asm_i32("{ .reg .b32 t; dp2a.lo.s32.s32 t, $1, $3, 0; dp2a.hi.s32.s32 $0, $2, $3, t; }", lo, hi, b)


def _quantize_kernel(x_ref, w_ref, dx_ref, s_ref):
    """Rows of 32 activations -> 16 words (int16 pairs 4i, 4i + 1, then 4i + 2, 4i + 3), a scale,
    and the integer sums of each half, of both, and a 0 (4 columns: blocks are powers of two)."""
    # parts[hf][k]: elements 16 hf + 4 i + k (i < 4)
    parts = [[x_ref[:, pl.ds(16 * hf + k, 4, 4)].astype(F32) for k in range(4)] for hf in range(2)]
    flat = [p for half in parts for p in half]
    amax = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(p), axis=1) for p in flat])
    nan = functools.reduce(jnp.add, [jnp.sum(jnp.isnan(p).astype(jnp.int32), axis=1) for p in flat]) > 0
    dx = jnp.where(nan, jnp.nan, amax / 32767.0)  # a NaN the max may skip still reaches the output
    inv = jnp.where(dx > 0, 1.0 / dx, 0.0)[:, None]
    q = [[jnp.clip(jnp.floor(p * inv + 0.5), -32767.0, 32767.0).astype(jnp.int32) for p in half] for half in parts]
    for hf in range(2):
        u = [v.astype(jnp.uint32) & 0xFFFF for v in q[hf]]
        w_ref[:, pl.ds(4 * hf, 4)] = u[0] | u[1] << 16
        w_ref[:, pl.ds(8 + 4 * hf, 4)] = u[2] | u[3] << 16
    sums = [sum(jnp.sum(v, axis=1) for v in half) for half in q]
    dx_ref[...] = dx[:, None]
    for col, v in enumerate((sums[0], sums[1], sums[0] + sums[1], jnp.zeros_like(sums[0]))):
        s_ref[:, pl.ds(col, 1)] = v[:, None]


def lut_bytes(n: jax.Array, table, interpret: bool) -> jax.Array:
    """Each byte of ``n`` (a value 0..15) replaced by ``table[value]`` (16 int8): two byte permutes
    (``prmt``) read entries 0-7 and 8-15, bit 3 picks one."""
    tb = [int(v) & 0xFF for v in table]
    if interpret:  # selects, not a gather: a kernel may not capture a table array
        out = jnp.zeros_like(n)
        for k in range(4):
            b = (n >> (8 * k)) & 0xF
            v = functools.reduce(lambda acc, i: jnp.where(b == i, jnp.uint32(tb[i]), acc), range(16), jnp.zeros_like(n))
            out = out | v << (8 * k)
        return out
    words = [jnp.full(n.shape, sum(tb[4 * w + i] << 8 * i for i in range(4)), jnp.uint32) for w in range(4)]
    return lax.bitcast_convert_type(asm_i32(
        "{ .reg .b32 s, m, lo, hi; and.b32 s, $1, 0x07070707; shr.b32 m, s, 4; or.b32 s, s, m;"
        " prmt.b32 s, s, 0, 0x3320;"  # selector nibbles: bytes 0-3's low 3 bits
        " prmt.b32 lo, $2, $3, s; prmt.b32 hi, $4, $5, s;"
        " and.b32 m, $1, 0x08080808; shr.b32 m, m, 3; mul.lo.u32 m, m, 0xFF;"  # bit 3 of each byte: upper table
        " lop3.b32 $0, lo, hi, m, 0xD8; }", n, *words), jnp.uint32)


def quantize_activations(x: jax.Array, interpret: bool = False) -> tuple[jax.Array, ...]:
    """``x [K]`` -> per block of 32: (uint32 words ``[K / 32, 16]``: int16 pairs, the 8 words of
    pairs ``4i, 4i + 1`` then the 8 of ``4i + 2, 4i + 3``; float32 scales ``[K / 32, 1]``; int32
    sums ``[K / 32, 4]`` of each half, of the block, and a 0), in one small kernel. Non-finite activations give
    non-finite scales, so non-finite outputs."""
    rows = x.shape[0] // XB
    r = 64
    while rows % r:
        r //= 2
    return pl.pallas_call(
        _quantize_kernel,
        grid=(rows // r,),
        in_specs=[pl.BlockSpec((r, XB), lambda i: (i, 0))],
        out_specs=[pl.BlockSpec((r, 16), lambda i: (i, 0)), pl.BlockSpec((r, 1), lambda i: (i, 0)),
                   pl.BlockSpec((r, 4), lambda i: (i, 0))],
        out_shape=[jax.ShapeDtypeStruct((rows, 16), jnp.uint32), jax.ShapeDtypeStruct((rows, 1), F32),
                   jax.ShapeDtypeStruct((rows, 4), jnp.int32)],
        compiler_params=plt.CompilerParams(num_warps=2, num_stages=1),
        interpret=interpret,
        name="gemv_quantize_x",
    )(x.reshape(rows, XB))


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    block_n: int = 32
    steps_blocks: int = 1  # S
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 3
    prefetch: bool | None = None  # None: when the decoder reads a field in pieces (``_kernel``)


def default_config(dec: GemvDecoder, n: int, k: int, block_n: int = 32, steps_blocks: int | None = None) -> GemvConfig:
    """32 rows a program, 512 weights a step, the fewest K-splits giving 4 programs per SM (the
    splits for other ``block_n`` / ``steps_blocks`` when given). 64- and 128-row programs, 8 warps
    and other step sizes measured within 3% or slower on the H200 (benchmarks/RESULTS.md)."""
    nb = k // dec.block_size
    s = steps_blocks or max(1, 512 // dec.block_size)
    while nb % s:
        s //= 2
    splits = 1
    while (n // block_n) * splits < 4 * NUM_SMS and nb % (2 * splits * s) == 0:
        splits *= 2
    return GemvConfig(block_n, s, splits)


def supports(dec: GemvDecoder, m: int, n: int, k: int) -> bool:
    return m == 1 and n % 32 == 0 and k % dec.block_size == 0


def _views(dec: GemvDecoder, w: QTensor) -> tuple[tuple[str, ...], list[jax.Array]]:
    names = tuple(sorted(w.arrays))
    out = []
    for name in names:
        a = w.arrays[name]
        if name in dec.words:
            a = lax.bitcast_convert_type(a.reshape(*a.shape[:2], -1, 4), jnp.uint32)
        out.append(a)
    return names, out


def _weight_loads(dec: GemvDecoder, names: tuple[str, ...], arrays: list[jax.Array], cfg: GemvConfig) -> tuple:
    """The ``(name, start, size)`` weight reads of one step of ``dec``, in its order, found by
    tracing the step abstractly, so that the kernel can read them a step ahead (``_kernel``)."""
    fields = dict(zip(names, arrays))
    keys = {}

    def ld(name, start=0, size=None):
        keys[(name, start, size)] = None
        a = fields[name]
        tail = () if a.ndim == 2 else (size or a.shape[2],)
        return jnp.zeros((cfg.block_n, cfg.steps_blocks, *tail), a.dtype)

    s = cfg.steps_blocks
    jax.eval_shape(lambda: dec.step(ld, lambda elem, n: (jnp.zeros((1, s, n), jnp.uint32),) * 2,
                                    lambda name, col: jnp.zeros((1, s), F32 if name == "dx" else jnp.int32), True))
    return tuple(keys)


def _kernel(*refs, dec: GemvDecoder, names: tuple[str, ...], keys: tuple, cfg: GemvConfig, steps: int,
            interpret: bool):
    """A decoder that reads a field in pieces (the K-quants: a group of sub-blocks at a time) gets
    each step's weights read one step ahead, into registers carried by the loop. Read in the step,
    the compiler interleaves each piece's load with its uses and a thread waits on few loads at a
    time (H200: Q6_K 14336 x 4096 in 48.8 us against 37.3 prefetched, Q4_K 4096 x 28672 52.2
    against 48.1). A decoder that reads whole fields (Q8_0, Q4_0, ...) has its loads issued
    together anyway, and the extra registers slow it (Q8_0 4096 x 28672: 39.5 us against 35.8)."""
    fields = dict(zip(names, refs[:len(names)]))
    xw_ref, dx_ref, sum_ref, o_ref = refs[len(names):]
    s = cfg.steps_blocks

    def first_block(i) -> int | jax.Array:
        return i * s if isinstance(i, int) else pl.multiple_of(i * s, s)

    def load(i) -> tuple:
        b0 = first_block(i)
        out = []
        for name, start, size in keys:
            r = fields[name]
            view = r.at[:, pl.ds(b0, s)] if len(r.shape) == 2 else r.at[:, pl.ds(b0, s), pl.ds(start, size or r.shape[2])]
            out.append(plt.load(view, eviction_policy="evict_first"))  # read once: keep x in cache
        return tuple(out)

    def step(i, acc, words):
        b0 = first_block(i)
        table = dict(zip(keys, words))

        def ld(name: str, start: int = 0, size: int | None = None) -> jax.Array:
            return table[(name, start, size)]

        def xpair(elem: int, n: int) -> tuple[jax.Array, jax.Array]:
            base = 16 * (elem // XB) + (elem % XB) // 4
            return xw_ref[pl.ds(b0, s), pl.ds(base, n)][None], xw_ref[pl.ds(b0, s), pl.ds(base + 8, n)][None]

        def xs(name: str, col: int) -> jax.Array:
            r, c = {"dx": (dx_ref, col), "sum": (sum_ref, 4 * col + 2), "sum16": (sum_ref, 4 * (col // 2) + col % 2)}[name]
            return r[pl.ds(b0, s), pl.ds(c, 1)].reshape(1, s)

        return acc + jnp.sum(dec.step(ld, xpair, xs, interpret), axis=1)

    acc = jnp.zeros((cfg.block_n,), F32)
    if steps == 1:
        o_ref[...] = step(0, acc, load(0))
        return
    prefetch = cfg.prefetch if cfg.prefetch is not None else any(size is not None for _, _, size in keys)
    if not prefetch:
        o_ref[...] = lax.fori_loop(0, steps, lambda i, acc: step(i, acc, load(i)), acc)
        return

    def body(i, carry):
        acc, words = carry
        ahead = load(jnp.minimum(i + 1, steps - 1))  # the last step reads its own blocks again
        return step(i, acc, words), ahead

    o_ref[...] = lax.fori_loop(0, steps, body, (acc, load(0)))[0]


@functools.partial(jax.jit, static_argnames=("dec", "config", "interpret"))
def gemv(x: jax.Array, w: QTensor, dec: GemvDecoder, config: GemvConfig | None = None,
         interpret: bool = False) -> jax.Array:
    """``x [1, K] @ dequantize(w).T`` -> ``[1, N]`` float32."""
    _, k = x.shape
    n = w.shape[0]
    cfg = config or default_config(dec, n, k)
    nb = k // dec.block_size
    if n % cfg.block_n or nb % (cfg.splits * cfg.steps_blocks):
        raise JaxquantError(f"gemv tiling {cfg} does not divide {n} rows x {nb} blocks of {dec.fmt}")
    xw, dx, sums = (a.reshape(nb, -1) for a in quantize_activations(x[0], interpret))
    names, arrays = _views(dec, w)
    nbs = nb // cfg.splits

    def spec(a):
        if a.ndim == 2:
            return pl.BlockSpec((cfg.block_n, nbs), lambda j, sp: (j, sp))
        return pl.BlockSpec((cfg.block_n, nbs, a.shape[2]), lambda j, sp: (j, sp, 0))

    call = pl.pallas_call(
        functools.partial(_kernel, dec=dec, names=names, keys=_weight_loads(dec, names, arrays, cfg), cfg=cfg,
                          steps=nbs // cfg.steps_blocks, interpret=interpret),
        grid=(n // cfg.block_n, cfg.splits),
        in_specs=[*(spec(a) for a in arrays),
                  *(pl.BlockSpec((nbs, a.shape[1]), lambda j, sp: (sp, 0)) for a in (xw, dx, sums))],
        out_specs=pl.BlockSpec((None, cfg.block_n), lambda j, sp: (sp, j)),
        out_shape=jax.ShapeDtypeStruct((cfg.splits, n), F32),
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"gemv_{dec.fmt.lower()}",
    )
    return call(*arrays, xw, dx, sums).sum(0)[None]
