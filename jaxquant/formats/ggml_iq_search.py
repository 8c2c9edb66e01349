"""Quantizers of llama.cpp's lattice formats (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S).

A line-by-line port of ``quantize_row_*_impl`` in ggml-quants.c, compiled by numba: each group of
8 (4) weights is rounded onto a grid point, and a point off the grid is replaced by the best of
its nearest grid points, a neighbour list whose length runs from 1 to ~300. Such ragged searches
have no fast fixed-shape form in XLA (padding every list to the longest costs 5-10x llama.cpp's
time), so they run on the host as compiled loops, one row per thread, as llama-quantize splits rows.

Exactness: every value is float32 and every operation is the C's, in its order; numba emits no
FMA (LLVM contracts only with fast-math flags, which are off) and, unlike XLA's CPU backend,
keeps subnormals, so the bytes are llama.cpp's bit for bit. The grid maps and neighbour lists are
those of ``iq2xs_init_impl`` / ``iq3xs_init_impl``, rebuilt here from the grids of ggml-common.h
(data/iq_grids.npz): a point's neighbours are the grid points at its ``nwant`` smallest squared
distances, ordered by (distance, index).
"""

from __future__ import annotations

import functools
import math
import pathlib
import platform

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

F = np.float32
QK_K = 256
FLT_MAX = F(3.4028234663852886e38)
GROUP_MAX_EPS = F(1e-15)
GROUP_MAX_EPS_IQ3_XXS = F(1e-8)
GROUP_MAX_EPS_IQ2_S = F(1e-8)
GROUP_MAX_EPS_IQ1_M = F(1e-7)
GROUP_MAX_EPS_IQ1_S = F(1e-12)
IQ1_DELTA = F(0.125)

# grid name in iq_grids.npz -> (bits per coordinate in the map index, nwant of the init)
_GRIDS = {"IQ2_XXS": ("iq2xxs_grid", 2, 2), "IQ2_XS": ("iq2xs_grid", 2, 2), "IQ2_S": ("iq2s_grid", 2, 1),
          "IQ1_S": ("iq1s_grid", 2, 3), "IQ1_M": ("iq1s_grid", 2, 3), "IQ3_XXS": ("iq3xxs_grid", 3, 2),
          "IQ3_S": ("iq3s_grid", 3, 3)}


@functools.cache
def tables(type_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(grid, kmap, neighbours)`` of ``iq2xs_init_impl`` / ``iq3xs_init_impl`` for a type.

    ``grid[j]``: the point's coordinates ``2l + 1`` (int8 [n, 8 or 4]); ``kmap[u]``: the grid index
    of the point whose levels ``l_i`` are packed in ``u`` (``bits`` per coordinate), or
    ``-(offset + 1)`` of its neighbour list ``neighbours[offset] = count``, then the indices.
    Only points whose levels are all < 3 (IQ1/IQ2) are listed: the quantizers reach no others.
    """
    name, bits, nwant = _GRIDS[type_name]
    with np.load(pathlib.Path(__file__).with_name("data") / "iq_grids.npz") as z:
        table = z[name]
    n = 8 if table.dtype == np.uint64 else 4
    raw = table.astype(table.dtype.newbyteorder("<")).view(np.int8 if name == "iq1s_grid" else np.uint8)
    levels = np.unique(raw, return_inverse=True)[1].reshape(table.size, n)  # byte values are increasing in l
    grid = (2 * levels + 1).astype(np.int8)
    shifts = bits * np.arange(n)
    kmap = np.full(1 << (bits * n), -1, np.int32)
    kmap[(levels << shifts).sum(1)] = np.arange(table.size)
    reach = 3 if bits == 2 else 8
    points = np.stack(np.meshgrid(*[np.arange(reach)] * n, indexing="ij"), -1).reshape(-1, n)[:, ::-1]
    u = (points << shifts).sum(1)
    off = kmap[u] < 0
    points, u = points[off], u[off]
    d2 = np.zeros((len(u), table.size), np.int32)
    for k in range(n):
        d2 += (2 * points[:, k:k + 1] + 1 - grid[None, :, k].astype(np.int32)) ** 2
    neighbours = []
    offset = 0
    for i in range(len(u)):
        order = np.argsort(d2[i], kind="stable")  # by (distance, index), as the C's qsort
        near = order[d2[i, order] <= np.unique(d2[i])[:nwant][-1]]
        kmap[u[i]] = -(offset + 1)
        neighbours += [len(near), *near]
        offset += 1 + len(near)
    return grid, kmap, np.array(neighbours, np.int32)


# ---------------------------------------------------------------------------------------------
# helpers shared by the kernels (all arithmetic float32, in the C's order)

MXCSR_DEFAULT = np.uint32(0x1F80)  # x86 SSE control: all exceptions masked, nearest, no FTZ/DAZ
_X86 = platform.machine().lower() in ("x86_64", "amd64")


@intrinsic
def _swap_mxcsr(typingctx, value):
    """Set the SSE control register to ``value`` and return the old one (x86; elsewhere a no-op).

    XLA's CPU runtime flushes subnormals (FTZ/DAZ), and its threads -- a ``pure_callback`` among
    them -- hand that mode to the code they call, so each row runs under C's default mode."""
    def codegen(context, builder, signature, args):
        if not _X86:
            return args[0]
        slot = cgutils.alloca_once(builder, ir.IntType(32))
        ptr = builder.bitcast(slot, ir.IntType(8).as_pointer())
        fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer()])
        builder.call(cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse.stmxcsr"), [ptr])
        old = builder.load(slot)
        builder.store(args[0], slot)
        builder.call(cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse.ldmxcsr"), [ptr])
        return old
    return types.uint32(types.uint32), codegen


@njit(cache=True)
def _c_max(a, b):
    """The C's ``MAX(a, b)``: ``a > b ? a : b``."""
    return a if a > b else b  # noqa: FURB136  (the C's order of operands, not Python's max)


@njit(cache=True)
def _nearest_int(fval):
    """ggml's ``nearest_int``: the mantissa of ``fval + 1.5*2^23`` (round half to even in range)."""
    val = fval + F(12582912.0)
    if abs(fval) <= F(4194303.0):
        return int(val) - 12582912
    if math.isnan(val):
        return 0  # a quiet NaN's mantissa is 0x400000
    if val == F(0.0) or abs(val) == np.inf:
        return -0x400000
    m, _ = math.frexp(abs(float(val)))
    return int((2.0 * m - 1.0) * 8388608.0) - 0x400000


@njit(cache=True)
def _make_qp_quants(n, nmax, x, L, qw):
    """``make_qp_quants``: levels 0..nmax for ``x`` and their weighted best scale. ``L`` is uint8 as in
    the C: a negative level (IQ2_XXS hands it a sign-flipped, negative value) wraps to 255."""
    mx = F(0.0)
    for i in range(n):
        mx = _c_max(mx, x[i])
    if mx < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return F(0.0)
    iscale = F(nmax) / mx
    for i in range(n):
        L[i] = _nearest_int(iscale * x[i])
    scale = F(1.0) / iscale
    best_mse = F(0.0)
    for i in range(n):
        diff = x[i] - scale * F(L[i])
        best_mse += qw[i] * diff * diff
    for is_ in range(-4, 5):
        if is_ == 0:
            continue
        iscale_is = (F(0.1) * F(is_) + F(nmax)) / mx
        scale_is = F(1.0) / iscale_is
        mse = F(0.0)
        for i in range(n):
            l = min(nmax, _nearest_int(iscale_is * x[i]))
            diff = x[i] - scale_is * F(l)
            mse += qw[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = F(0.0)
    suml2 = F(0.0)
    for i in range(n):
        l = min(nmax, _nearest_int(iscale * x[i]))
        L[i] = l
        sumlx += qw[i] * x[i] * F(l)
        suml2 += qw[i] * F(l) * F(l)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = qw[i]
            slx = sumlx - w * x[i] * F(L[i])
            sl2 = suml2 - w * F(L[i]) * F(L[i])
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, _nearest_int(x[i] * sl2 / slx))
                if new_l != L[i]:
                    slx += w * x[i] * F(new_l)
                    sl2 += w * F(new_l) * F(new_l)
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > F(0.0) else F(0.0)


@njit(cache=True)
def _best_neighbour(nbrs, start, grid, xval, w, off, scale, L, n):
    """``iq2_find_best_neighbour`` / ``iq3_find_best_neighbour`` on ``xval[off:off+n]``."""
    best_d2 = FLT_MAX
    gi = -1
    for j in range(1, nbrs[start] + 1):
        idx = nbrs[start + j]
        d2 = F(0.0)
        for i in range(n):
            diff = scale * F(grid[idx, i]) - xval[off + i]
            d2 += w[off + i] * diff * diff
        if d2 < best_d2:
            best_d2 = d2
            gi = idx
    for i in range(n):
        L[off + i] = (grid[gi, i] - 1) // 2
    return gi


@njit(cache=True)
def _round_group(xval, off, n, bits, idv, kmax, L):
    """Levels ``max(0, min(kmax - 1, nearest_int(0.5 (id x - 1))))`` of one group and their map key."""
    u = 0
    for i in range(n):
        l = _nearest_int(F(0.5) * (idv * xval[off + i] - F(1.0)))
        l = max(0, min(kmax - 1, l))
        L[off + i] = l
        u |= l << (bits * i)
    return u


@njit(cache=True)
def _place(kmap, nbrs, grid, xval, waux, off, n, bits, idv, scale, kmax, L):
    """Round a group at ``1/idv`` and move it onto the grid (the best neighbour if off it).
    Returns (grid index, whether the rounded point was on the grid)."""
    u = _round_group(xval, off, n, bits, idv, kmax, L)
    gi = kmap[u]
    if gi >= 0:
        return gi, True
    return _best_neighbour(nbrs, -kmap[u] - 1, grid, xval, waux, off, scale, L, n), False


@njit(cache=True)
def _sums(weight, xval, L, n):
    """``sumqx += w*xval*q; sumq2 += w*q*q`` with ``q = 2L + 1``."""
    sumqx = F(0.0)
    sumq2 = F(0.0)
    for i in range(n):
        w = weight[i]
        q = F(2 * L[i] + 1)
        sumqx += w * xval[i] * q
        sumq2 += w * q * q
    return sumqx, sumq2


@njit(cache=True)
def _sumx2(xbl):
    s = F(0.0)
    for i in range(QK_K):
        s += xbl[i] * xbl[i]
    return s


@njit(cache=True)
def _weights(xb, qw, has_qw, sigma2, weight, n, fallback_sigma):
    """``qw * sqrtf(sigma2 + x^2)``; without an imatrix ``x^2`` (or ``0.25 sigma2 + x^2`` for IQ2_S)."""
    for i in range(n):
        if has_qw:
            weight[i] = qw[i] * np.sqrt(sigma2 + xb[i] * xb[i])
        elif fallback_sigma:
            weight[i] = F(0.25) * sigma2 + xb[i] * xb[i]
        else:
            weight[i] = xb[i] * xb[i]


@njit(cache=True)
def _abs_signs(xb, weight, xval, k, parity):
    """Group k of 8: ``xval = |x|`` and its sign bits; with ``parity`` the sign-parity trick (an odd
    number of negatives flips back the element of least ``w x^2``) and the 7 stored bits."""
    nflip = 0
    s = 0
    for i in range(8):
        if xb[8 * k + i] >= 0:
            xval[8 * k + i] = xb[8 * k + i]
        else:
            xval[8 * k + i] = -xb[8 * k + i]
            nflip += 1
            s |= 1 << i
    if parity:
        if nflip % 2:
            imin = 0
            mn = weight[8 * k] * xb[8 * k] * xb[8 * k]
            for i in range(1, 8):
                ax = weight[8 * k + i] * xb[8 * k + i] * xb[8 * k + i]
                if ax < mn:
                    mn = ax
                    imin = i
            xval[8 * k + imin] = -xval[8 * k + imin]
            s ^= 1 << imin
        return s & 127
    return s


@njit(cache=True)
def _max(a, n):
    m = a[0]
    for i in range(1, n):
        m = _c_max(m, a[i])
    return m


@njit(cache=True)
def _block_scale_index(idv, scale, top):
    """``MAX(0, MIN(top, nearest_int(0.5f*(id*scale - 1))))``."""
    return max(0, min(top, _nearest_int(F(0.5) * (idv * scale - F(1.0)))))


@njit(cache=True)
def _scratch(n_blocks, n, n_signs):
    """Per-row work arrays of the IQ2/IQ3 kernels: scales, weight, xval, waux, L, Laux, signs."""
    return (np.zeros(n_blocks, F), np.zeros(n, F), np.zeros(n, F), np.zeros(n, F), np.zeros(n, np.int64),
            np.zeros(n, np.int64), np.zeros(n_signs, np.int64))


@njit(cache=True)
def _group_index(L, off, n, bits, kmap):
    """The map entry of the levels ``L[off:off+n]`` packed ``bits`` apiece."""
    u = 0
    for i in range(n):
        u |= L[off + i] << (bits * i)
    return kmap[u]


# ---------------------------------------------------------------------------------------------
# IQ2_XXS, IQ2_XS, IQ2_S (the kernels write into zeroed output arrays: the C's memsets are implied)

@njit(parallel=True, cache=True)
def _iq2_xxs(x, qw, grid, kmap, nbrs, d_out, q2_out):
    nrows, n = x.shape
    for r in prange(nrows):
        old = _swap_mxcsr(MXCSR_DEFAULT)
        scales, weight, xval, waux, L, Laux, signs = _scratch(8, 32, 4)
        L8 = np.zeros(32, np.uint8)
        for ibl in range(n // QK_K):
            q2 = q2_out[r, ibl]
            max_scale = F(0.0)
            xbl = x[r, QK_K * ibl:QK_K * (ibl + 1)]
            sigma2 = _sumx2(xbl) / F(QK_K)
            for ib in range(8):
                xb = xbl[32 * ib:32 * ib + 32]
                _weights(xb, qw[QK_K * ibl + 32 * ib:], True, sigma2, weight, 32, False)
                for i in range(32):
                    waux[i] = np.sqrt(weight[i])
                for k in range(4):
                    signs[k] = _abs_signs(xb, weight, xval, k, True)
                if _max(xval, 32) < GROUP_MAX_EPS:
                    scales[ib] = 0
                    continue
                scale = _make_qp_quants(32, 4, xval, L8, weight)
                for i in range(32):
                    L[i] = np.int8(L8[i])
                eff_max = scale * F(3)
                if eff_max <= 0:
                    scales[ib] = 0
                    continue
                best = F(0.0)
                for is_ in range(-6, 7):
                    idv = (F(5) + F(is_) * F(0.1)) / eff_max
                    this_scale = F(1.0) / idv
                    for k in range(4):
                        _place(kmap, nbrs, grid, xval, waux, 8 * k, 8, 2, idv, this_scale, 3, Laux)
                    sumqx, sumq2 = _sums(weight, xval, Laux, 32)
                    if sumq2 > 0 and sumqx * sumqx > best * sumq2:
                        scale = sumqx / sumq2
                        best = scale * sumqx
                        L[:] = Laux
                if scale > 0:
                    idv = F(1.0) / scale
                    for k in range(4):
                        gi, _ = _place(kmap, nbrs, grid, xval, waux, 8 * k, 8, 2, idv, scale, 3, L)
                        for i in range(8):
                            L[8 * k + i] = (grid[gi, i] - 1) // 2
                    sumqx, sumq2 = _sums(weight, xval, L, 32)
                    if sumq2 > 0:
                        scale = sumqx / sumq2
                if scale < 0:
                    scale = -scale
                    for k in range(4):
                        signs[k] = (~signs[k]) & 127
                for k in range(4):
                    q2[2 * ib] |= np.uint32(_group_index(L, 8 * k, 8, 2, kmap)) << np.uint32(8 * k)
                    q2[2 * ib + 1] |= np.uint32(signs[k]) << np.uint32(7 * k)
                scales[ib] = scale
                max_scale = _c_max(max_scale, scale)
            if max_scale == 0:
                q2[:] = 0
                continue
            d = max_scale / F(31)
            d_out[r, ibl] = d
            idv = F(1.0) / d
            for ib in range(8):
                q2[2 * ib + 1] |= np.uint32(_block_scale_index(idv, scales[ib], 15)) << np.uint32(28)
        _swap_mxcsr(old)


@njit(cache=True)
def _iq2_xs_s_block(xb, qw, has_qw, sigma2, grid, kmap, nbrs, is_s, weight, xval, waux, L, Laux, signs):
    """One 16-weight sub-block of IQ2_XS (``is_s`` False) or IQ2_S: fills L and signs; returns
    (scale, False) or, for a sub-block below the zero threshold, (0, True)."""
    _weights(xb, qw, has_qw, sigma2, weight, 16, True)
    for i in range(16):
        waux[i] = np.sqrt(weight[i])
    for k in range(2):
        signs[k] = _abs_signs(xb, weight, xval, k, not is_s)
    L[:] = 0
    mx = _max(xval, 16)
    if mx < (GROUP_MAX_EPS_IQ2_S if is_s else GROUP_MAX_EPS):
        return F(0.0), True
    best = F(0.0)
    scale = mx / F(5)
    on_grid = np.ones(2, np.bool_)
    on_grid_aux = np.ones(2, np.bool_)
    for is_ in range(-9, 10):
        idv = (F(5) + F(is_) * F(0.1)) / mx
        this_scale = F(1.0) / idv
        for k in range(2):
            _, on_grid_aux[k] = _place(kmap, nbrs, grid, xval, waux, 8 * k, 8, 2, idv, this_scale, 3, Laux)
        sumqx, sumq2 = _sums(weight, xval, Laux, 16)
        if sumq2 > 0 and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            L[:] = Laux
            on_grid[:] = on_grid_aux
    if (not on_grid[0] or not on_grid[1]) and scale > 0:
        idv = F(1.0) / scale
        for k in range(2):
            if not on_grid[k]:
                _place(kmap, nbrs, grid, xval, waux, 8 * k, 8, 2, idv, scale, 3, L)
        sumqx, sumq2 = _sums(weight, xval, L, 16)
        if sumq2 > 0:
            scale = sumqx / sumq2
    if scale < 0:
        scale = -scale
        for k in range(2):
            signs[k] = (~signs[k]) & (255 if is_s else 127)
    return scale, False


@njit(parallel=True, cache=True)
def _iq2_xs_s(x, qw, has_qw, is_s, grid, kmap, nbrs, d_out, qs_out, qh_out, scales_out):
    """IQ2_XS: qs_out uint16 [.., 32] (grid index | signs << 9). IQ2_S: qs_out uint8 [.., 64]
    (index low bytes, then sign bytes), qh_out uint8 [.., 8]."""
    nrows, n = x.shape
    for r in prange(nrows):
        old = _swap_mxcsr(MXCSR_DEFAULT)
        scales, weight, xval, waux, L, Laux, signs = _scratch(16, 16, 2)
        for ibl in range(n // QK_K):
            qs = qs_out[r, ibl]
            max_scale = F(0.0)
            xbl = x[r, QK_K * ibl:QK_K * (ibl + 1)]
            sumx2 = _sumx2(xbl)
            sigma2 = F(2) * sumx2 / F(QK_K) if is_s else sumx2 / F(QK_K)
            for ib in range(16):
                scale, skip = _iq2_xs_s_block(xbl[16 * ib:16 * ib + 16], qw[QK_K * ibl + 16 * ib:], has_qw, sigma2,
                                        grid, kmap, nbrs, is_s, weight, xval, waux, L, Laux, signs)
                if skip:
                    scales[ib] = 0
                    continue
                for k in range(2):
                    gi = _group_index(L, 8 * k, 8, 2, kmap)
                    i8 = 2 * ib + k
                    if is_s:
                        qs[i8] = gi & 255
                        qh_out[r, ibl, i8 // 4] |= (gi >> 8) << (2 * (i8 % 4))
                        qs[QK_K // 8 + i8] = signs[k]
                    else:
                        qs[i8] = gi | (signs[k] << 9)
                scales[ib] = scale
                max_scale = _c_max(max_scale, scale)
            if max_scale == 0:
                if not is_s:
                    qs[:] = 0
                continue
            d = max_scale / F(31)
            d_out[r, ibl] = d * F(0.9875) if is_s else d
            idv = F(1.0) / d
            for ib in range(16):
                l = _block_scale_index(idv, scales[ib], 15)
                if ib % 2 == 0:
                    scales_out[r, ibl, ib // 2] = l
                else:
                    scales_out[r, ibl, ib // 2] |= l << 4
        _swap_mxcsr(old)


# ---------------------------------------------------------------------------------------------
# IQ3_XXS, IQ3_S

@njit(cache=True)
def _iq3_block(xb, qw, has_qw, sigma2, grid, kmap, nbrs, is_s, weight, xval, waux, L, Laux, signs):
    """One 32-weight sub-block of IQ3_XXS (``is_s`` False) or IQ3_S: fills L and signs; returns
    (scale, False) or, for a sub-block below the zero threshold, (0, True)."""
    _weights(xb, qw, has_qw, sigma2, weight, 32, False)
    for i in range(32):
        waux[i] = np.sqrt(weight[i])
    for k in range(4):
        signs[k] = _abs_signs(xb, weight, xval, k, not is_s)
    mx = _max(xval, 32)
    L[:] = 0
    if (mx == 0) if is_s else (mx < GROUP_MAX_EPS_IQ3_XXS):
        return F(0.0), True
    best = F(0.0)
    scale = mx / F(15)
    on_grid = np.full(8, not is_s)
    on_grid_aux = np.ones(8, np.bool_)
    for is_ in range(-9 if is_s else -15, 10 if is_s else 16):
        idv = (F(15) + F(is_) * F(0.2)) / mx
        this_scale = F(1.0) / idv
        for k in range(8):
            _, on_grid_aux[k] = _place(kmap, nbrs, grid, xval, waux, 4 * k, 4, 3, idv, this_scale, 8, Laux)
        sumqx, sumq2 = _sums(weight, xval, Laux, 32)
        if sumq2 > 0 and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            L[:] = Laux
            on_grid[:] = on_grid_aux
    if not on_grid.all() and scale > 0:
        idv = F(1.0) / scale
        for k in range(8):
            if is_s or not on_grid[k]:  # IQ3_S re-rounds every group (its `continue` is commented out)
                gi, _ = _place(kmap, nbrs, grid, xval, waux, 4 * k, 4, 3, idv, scale, 8, L)
                for i in range(4):
                    L[4 * k + i] = (grid[gi, i] - 1) // 2
        sumqx, sumq2 = _sums(weight, xval, L, 32)
        if sumq2 > 0:
            scale = sumqx / sumq2
    if scale < 0:
        scale = -scale
        for k in range(4):
            signs[k] = (~signs[k]) & (255 if is_s else 127)
    return scale, False


@njit(parallel=True, cache=True)
def _iq3(x, qw, has_qw, is_s, grid, kmap, nbrs, d_out, qs_out, sas_out, qh_out, signs_out, scales_out):
    """IQ3_XXS: qs_out [.., 64] grid indices, sas_out uint32 [.., 8] (signs | scale << 28).
    IQ3_S: qs_out [.., 64] low index bytes, qh_out [.., 8], signs_out [.., 32], scales_out [.., 4]."""
    nrows, n = x.shape
    for r in prange(nrows):
        old = _swap_mxcsr(MXCSR_DEFAULT)
        scales, weight, xval, waux, L, Laux, signs = _scratch(8, 32, 4)
        for ibl in range(n // QK_K):
            qs = qs_out[r, ibl]
            max_scale = F(0.0)
            xbl = x[r, QK_K * ibl:QK_K * (ibl + 1)]
            sigma2 = F(2) * _sumx2(xbl) / F(QK_K)
            qpos = 0  # IQ3_S advances its qs/signs pointers only past sub-blocks it quantizes
            for ib in range(8):
                scale, skip = _iq3_block(xbl[32 * ib:32 * ib + 32], qw[QK_K * ibl + 32 * ib:], has_qw, sigma2,
                                         grid, kmap, nbrs, is_s, weight, xval, waux, L, Laux, signs)
                if skip:
                    scales[ib] = 0
                    continue
                for k in range(8):
                    gi = _group_index(L, 4 * k, 4, 3, kmap)
                    if is_s:
                        qs[8 * qpos + k] = gi & 255
                        qh_out[r, ibl, ib] |= (gi >> 8) << k
                    else:
                        qs[8 * ib + k] = gi
                if is_s:
                    for k in range(4):
                        signs_out[r, ibl, 4 * qpos + k] = signs[k]
                    qpos += 1
                else:
                    sas_out[r, ibl, ib] = signs[0] | (signs[1] << 7) | (signs[2] << 14) | (signs[3] << 21)
                scales[ib] = scale
                max_scale = _c_max(max_scale, scale)
            if max_scale == 0:
                if not is_s:
                    qs[:] = 0
                    sas_out[r, ibl, :] = 0
                continue
            d = max_scale / F(31)
            d_out[r, ibl] = d * (F(1.033) if is_s else F(1.0125))
            idv = F(1.0) / d
            for ib in range(8):
                l = _block_scale_index(idv, scales[ib], 15)
                if is_s:
                    scales_out[r, ibl, ib // 2] |= l << (4 * (ib % 2))
                else:
                    sas_out[r, ibl, ib] |= np.uint32(l) << np.uint32(28)
        _swap_mxcsr(old)


# ---------------------------------------------------------------------------------------------
# IQ1_S, IQ1_M

@njit(cache=True)
def _stable_order(xb, n, idx):
    """``qsort`` of (value, index) pairs by value with glibc's stable merge sort: ties keep index order."""
    for j in range(n):
        idx[j] = j
    for j in range(1, n):
        v = idx[j]
        i = j
        while i > 0 and xb[idx[i - 1]] > xb[v]:
            idx[i] = idx[i - 1]
            i -= 1
        idx[i] = v


@njit(cache=True)
def _best_neighbour2(nbrs, start, grid, xb, weight, off, scale, xx, L):
    """``iq1_find_best_neighbour2``: least weighted squared error of ``scale * xx[level]`` to ``xb``."""
    best = FLT_MAX
    gi = -1
    for j in range(1, nbrs[start] + 1):
        idx = nbrs[start + j]
        d2 = F(0.0)
        for i in range(8):
            q = xx[(grid[idx, i] - 1) // 2]
            diff = scale * q - xb[off + i]
            d2 += weight[off + i] * diff * diff
        if d2 < best:
            best = d2
            gi = idx
    for i in range(8):
        L[off + i] = (grid[gi, i] - 1) // 2
    return gi


@njit(cache=True)
def _iq1_split(idx, L, n, besti1, besti2):
    """Levels 0, 1, 2 for the sorted values below ``besti1``, below ``besti2``, and the rest."""
    for j in range(n):
        L[idx[j]] = 0 if j < besti1 else (1 if j < besti2 else 2)


@njit(cache=True)
def _iq1_prologue(xb, qw, has_qw, sigma2, weight, n):
    """A sub-block's importance weights (into ``weight``) and its max |x| (the C's MAX order)."""
    _weights(xb, qw, has_qw, sigma2, weight, n, False)
    mx = abs(xb[0])
    for i in range(1, n):
        mx = _c_max(mx, abs(xb[i]))
    return mx


@njit(cache=True)
def _iq1_onto_grid(kmap, nbrs, grid, xb, weight, L, scale, minus, x_p, x_m, index):
    """Each group of 8 levels onto the grid (``iq1_find_best_neighbour2`` where it is off) with the
    shifted values ``x_m`` where ``minus[k]`` else ``x_p``; if any group was off, the scale refitted."""
    all_on_grid = True
    for k in range(len(minus)):
        gi = _group_index(L, 8 * k, 8, 2, kmap)
        if gi < 0:
            all_on_grid = False
            gi = _best_neighbour2(nbrs, -gi - 1, grid, xb, weight, 8 * k, scale, x_m if minus[k] else x_p, L)
        index[k] = gi
    if not all_on_grid:
        sumqx = F(0.0)
        sumq2 = F(0.0)
        for k in range(len(minus)):
            xx = x_m if minus[k] else x_p
            for j in range(8):
                w = weight[8 * k + j]
                q = xx[(grid[index[k], j] - 1) // 2]
                sumqx += w * q * xb[8 * k + j]
                sumq2 += w * q * q
        if sumqx > 0 and sumq2 > 0:
            scale = sumqx / sumq2
    return scale


@njit(parallel=True, cache=True)
def _iq1_s(x, qw, grid, kmap, nbrs, d_out, qs_out, qh_out):
    x_p = np.array([-1 + IQ1_DELTA, IQ1_DELTA, 1 + IQ1_DELTA], F)
    x_m = np.array([-1 - IQ1_DELTA, -IQ1_DELTA, 1 - IQ1_DELTA], F)
    nrows, n = x.shape
    for r in prange(nrows):
        old = _swap_mxcsr(MXCSR_DEFAULT)
        scales = np.zeros(8, F)
        shifts = np.zeros(8, np.int64)
        weight = np.zeros(32, F)
        sumx = np.zeros(33, F)
        sumw = np.zeros(33, F)
        idx = np.zeros(32, np.int64)
        L = np.zeros(32, np.int64)
        index = np.zeros(4, np.int64)
        minus = np.zeros(4, np.bool_)
        for ibl in range(n // QK_K):
            qs = qs_out[r, ibl]
            qh = qh_out[r, ibl]
            max_scale = F(0.0)
            xbl = x[r, QK_K * ibl:QK_K * (ibl + 1)]
            sigma2 = F(2) * _sumx2(xbl) / F(QK_K)
            for ib in range(8):
                xb = xbl[32 * ib:32 * ib + 32]
                mx = _iq1_prologue(xb, qw[QK_K * ibl + 32 * ib:], True, sigma2, weight, 32)
                if mx < GROUP_MAX_EPS_IQ1_S:
                    scales[ib] = 0
                    shifts[ib] = 1
                    continue
                _stable_order(xb, 32, idx)
                for j in range(32):
                    i = idx[j]
                    sumx[j + 1] = sumx[j] + weight[i] * xb[i]
                    sumw[j + 1] = sumw[j] + weight[i]
                best_score = -FLT_MAX
                scale = mx
                besti1 = -1
                besti2 = -1
                best_shift = 0
                for i1 in range(33):
                    for i2 in range(i1, 33):
                        for sh in (1, -1):
                            xx = x_p if sh == 1 else x_m
                            sumqx = ((sumx[i1] - sumx[0]) * xx[0] + (sumx[i2] - sumx[i1]) * xx[1]
                                     + (sumx[32] - sumx[i2]) * xx[2])
                            sumq2 = ((sumw[i1] - sumw[0]) * xx[0] * xx[0] + (sumw[i2] - sumw[i1]) * xx[1] * xx[1]
                                     + (sumw[32] - sumw[i2]) * xx[2] * xx[2])
                            if sumq2 > 0 and sumqx * sumqx > best_score * sumq2:
                                scale = sumqx / sumq2
                                best_score = scale * sumqx
                                besti1 = i1
                                besti2 = i2
                                best_shift = sh
                if besti1 < 0 or besti2 < 0 or best_shift == 0:
                    scales[ib] = 0
                    shifts[ib] = 1
                    continue
                _iq1_split(idx, L, 32, besti1, besti2)
                if scale < 0:
                    for j in range(32):
                        L[j] = 2 - L[j]
                    scale = -scale
                    best_shift = -best_shift
                minus[:] = best_shift != 1
                scale = _iq1_onto_grid(kmap, nbrs, grid, xb, weight, L, scale, minus, x_p, x_m, index)
                h = 0
                for k in range(4):
                    qs[4 * ib + k] = index[k] & 255
                    h |= (index[k] >> 8) << (3 * k)
                qh[ib] = h
                scales[ib] = scale
                shifts[ib] = best_shift
                max_scale = _c_max(max_scale, scale)
            if max_scale == 0:
                continue
            d = max_scale / F(15)
            d_out[r, ibl] = d * F(1.125)
            idv = F(1.0) / d
            for ib in range(8):
                l = max(0, min(7, _nearest_int(F(0.5) * (idv * scales[ib] - F(1.0)))))
                if shifts[ib] == -1:
                    l |= 8
                qh[ib] |= l << 12
        _swap_mxcsr(old)


@njit(parallel=True, cache=True)
def _iq1_m(x, qw, has_qw, grid, kmap, nbrs, d_out, qs_out, qh_out, sc_out):
    """IQ1_M: ``d_out`` gets ``d * 1.1125f`` (its f16 bits go into the top nibbles of sc_out, on the host)."""
    x_p = np.array([-1 + IQ1_DELTA, IQ1_DELTA, 1 + IQ1_DELTA], F)
    x_m = np.array([-1 - IQ1_DELTA, -IQ1_DELTA, 1 - IQ1_DELTA], F)
    masks = np.array([0x00, 0x80, 0x08, 0x88], np.int64)
    p2 = x_p[2]
    m2 = x_m[2]
    cp1 = x_p[0] * x_p[0] - x_p[1] * x_p[1]
    cp2 = x_p[1] * x_p[1] - x_p[2] * x_p[2]
    cm1 = x_m[0] * x_m[0] - x_m[1] * x_m[1]
    cm2 = x_m[1] * x_m[1] - x_m[2] * x_m[2]
    nrows, n = x.shape
    for r in prange(nrows):
        old = _swap_mxcsr(MXCSR_DEFAULT)
        scales = np.zeros(16, F)
        shifts = np.zeros(16, np.int64)
        weight = np.zeros(16, F)
        idx = np.zeros(16, np.int64)
        L = np.zeros(16, np.int64)
        index = np.zeros(2, np.int64)
        minus = np.zeros(2, np.bool_)
        px = np.zeros((2, 17), F)
        pw = np.zeros((2, 17), F)
        sumqx = np.zeros(4, F)
        sumq2 = np.zeros(4, F)
        for ibl in range(n // QK_K):
            qs = qs_out[r, ibl]
            qh = qh_out[r, ibl]
            sc = sc_out[r, ibl]
            max_scale = F(0.0)
            xbl = x[r, QK_K * ibl:QK_K * (ibl + 1)]
            sigma2 = F(2) * _sumx2(xbl) / F(QK_K)
            for ib in range(16):
                xb = xbl[16 * ib:16 * ib + 16]
                mx = _iq1_prologue(xb, qw[QK_K * ibl + 16 * ib:], has_qw, sigma2, weight, 16)
                if mx < GROUP_MAX_EPS_IQ1_M:
                    scales[ib] = 0
                    shifts[ib] = 0
                    continue
                _stable_order(xb, 16, idx)
                best_score = -FLT_MAX
                scale = mx
                besti1 = -1
                besti2 = -1
                best_k = -1
                for j in range(16):
                    i = idx[j]
                    h = 0 if i < 8 else 1
                    px[h, j + 1] = px[h, j] + weight[i] * xb[i]
                    px[1 - h, j + 1] = px[1 - h, j]
                    pw[h, j + 1] = pw[h, j] + weight[i]
                    pw[1 - h, j + 1] = pw[1 - h, j]
                for i1 in range(17):
                    for i2 in range(i1, 17):
                        sx0 = px[0, i1] + px[0, i2]
                        sx1 = px[1, i1] + px[1, i2]
                        qx_p0 = px[0, 16] * p2 - sx0
                        qx_m0 = px[0, 16] * m2 - sx0
                        qx_p1 = px[1, 16] * p2 - sx1
                        qx_m1 = px[1, 16] * m2 - sx1
                        q2_p0 = pw[0, 16] * p2 * p2 + pw[0, i1] * cp1 + pw[0, i2] * cp2
                        q2_m0 = pw[0, 16] * m2 * m2 + pw[0, i1] * cm1 + pw[0, i2] * cm2
                        q2_p1 = pw[1, 16] * p2 * p2 + pw[1, i1] * cp1 + pw[1, i2] * cp2
                        q2_m1 = pw[1, 16] * m2 * m2 + pw[1, i1] * cm1 + pw[1, i2] * cm2
                        sumqx[0] = qx_p0 + qx_p1
                        sumqx[1] = qx_p0 + qx_m1
                        sumqx[2] = qx_m0 + qx_p1
                        sumqx[3] = qx_m0 + qx_m1
                        sumq2[0] = q2_p0 + q2_p1
                        sumq2[1] = q2_p0 + q2_m1
                        sumq2[2] = q2_m0 + q2_p1
                        sumq2[3] = q2_m0 + q2_m1
                        for k in range(4):
                            if sumq2[k] > 0 and sumqx[k] * sumqx[k] > best_score * sumq2[k]:
                                scale = sumqx[k] / sumq2[k]
                                best_score = scale * sumqx[k]
                                besti1 = i1
                                besti2 = i2
                                best_k = k
                if besti1 < 0 or besti2 < 0 or best_k < 0:
                    scales[ib] = 0
                    shifts[ib] = 0
                    continue
                _iq1_split(idx, L, 16, besti1, besti2)
                if scale < 0:
                    for j in range(16):
                        L[j] = 2 - L[j]
                    scale = -scale
                    best_k = 3 - best_k
                minus[0], minus[1] = best_k >= 2, best_k % 2 == 1  # best_k: (first half, second half) signs
                scale = _iq1_onto_grid(kmap, nbrs, grid, xb, weight, L, scale, minus, x_p, x_m, index)
                qs[2 * ib] = index[0] & 255
                qs[2 * ib + 1] = index[1] & 255
                qh[ib] = (index[0] >> 8) | ((index[1] >> 8) << 4)
                scales[ib] = scale
                shifts[ib] = best_k
                max_scale = _c_max(max_scale, scale)
            if max_scale == 0:
                continue
            d = max_scale / F(15)
            idv = F(1.0) / d
            sqx = F(0.0)
            sq2 = F(0.0)
            for ib in range(16):
                l = max(0, min(7, _nearest_int(F(0.5) * (idv * scales[ib] - F(1.0)))))
                sc[ib // 4] |= l << (3 * (ib % 4))
                qh[ib] |= masks[shifts[ib]]
                xb = xbl[16 * ib:16 * ib + 16]
                _weights(xb, qw[QK_K * ibl + 16 * ib:], has_qw, sigma2, weight, 16, False)
                for k in range(2):
                    xx = (x_p if shifts[ib] < 2 else x_m) if k == 0 else (x_p if shifts[ib] % 2 == 0 else x_m)
                    gi = qs[2 * ib + k] + ((np.int64(qh[ib]) << (8 - 4 * k)) & 0x700)
                    for j in range(8):
                        w = weight[8 * k + j]
                        q = xx[(grid[gi, j] - 1) // 2] * F(2 * l + 1)
                        sqx += w * q * xb[8 * k + j]
                        sq2 += w * q * q
            if sq2 > 0:
                d = sqx / sq2
            d_out[r, ibl] = d * F(1.1125)
        _swap_mxcsr(old)


# ---------------------------------------------------------------------------------------------

REQUIRES_IMATRIX = ("IQ2_XXS", "IQ2_XS", "IQ1_S")  # ggml_quantize_requires_imatrix


def quantize(type_name: str, x: np.ndarray, qw: np.ndarray | None) -> dict[str, np.ndarray]:
    """Rows ``x`` (float32 [R, K], K a multiple of 256) -> the block fields of ``type_name``
    ([R, K/256, count] arrays), as llama.cpp's ``quantize_<type>`` writes them."""
    x = np.ascontiguousarray(x, F)
    r, k = x.shape
    nb = k // QK_K
    has_qw = qw is not None
    if not has_qw and type_name in REQUIRES_IMATRIX:
        raise ValueError(f"{type_name} needs importance weights (llama.cpp asserts quant_weights)")
    qw = np.array(qw, F) if has_qw else np.zeros(k, F)  # writable either way: one compiled signature
    grid, kmap, nbrs = tables(type_name)
    d = np.zeros((r, nb), F)
    u8 = functools.partial(np.zeros, dtype=np.uint8)
    if type_name == "IQ2_XXS":
        q2 = np.zeros((r, nb, 16), np.uint32)
        _iq2_xxs(x, qw, grid, kmap, nbrs, d, q2)
        out = {"qs": q2.view(np.uint16)}
    elif type_name in ("IQ2_XS", "IQ2_S"):
        is_s = type_name == "IQ2_S"
        qs = u8((r, nb, 64)) if is_s else np.zeros((r, nb, 32), np.uint16)
        qh, scales = u8((r, nb, 8)), u8((r, nb, 8))
        _iq2_xs_s(x, qw, has_qw, is_s, grid, kmap, nbrs, d, qs, qh, scales)
        out = {"qs": qs, "qh": qh, "scales": scales} if is_s else {"qs": qs, "scales": scales}
    elif type_name in ("IQ3_XXS", "IQ3_S"):
        is_s = type_name == "IQ3_S"
        qs, sas, qh, signs, scales = u8((r, nb, 64)), np.zeros((r, nb, 8), np.uint32), u8((r, nb, 8)), \
            u8((r, nb, 32)), u8((r, nb, 4))
        _iq3(x, qw, has_qw, is_s, grid, kmap, nbrs, d, qs, sas, qh, signs, scales)
        out = ({"qs": qs, "qh": qh, "signs": signs, "scales": scales} if is_s
               else {"qs": np.concatenate([qs, sas.view(np.uint8)], axis=-1)})
    elif type_name == "IQ1_S":
        qs, qh = u8((r, nb, 32)), np.zeros((r, nb, 8), np.uint16)
        _iq1_s(x, qw, grid, kmap, nbrs, d, qs, qh)
        out = {"qs": qs, "qh": qh}
    elif type_name == "IQ1_M":
        qs, qh, sc = u8((r, nb, 32)), u8((r, nb, 16)), np.zeros((r, nb, 4), np.uint16)
        _iq1_m(x, qw, has_qw, grid, kmap, nbrs, d, qs, qh, sc)
        # the f16 block scale is spread over the top nibbles of the four uint16 scale words
        with np.errstate(over="ignore"):
            bits = d.astype(np.float16).view(np.uint16)[..., None]
        sc |= ((bits >> np.array([0, 4, 8, 12], np.uint16)) & 0xF) << 12
        return {"qs": qs, "qh": qh, "scales": sc.view(np.uint8)}
    else:
        raise ValueError(f"no lattice quantizer for {type_name}")
    with np.errstate(over="ignore"):  # an overflowing scale is +-inf in f16, as GGML_FP32_TO_FP16 makes it
        return {"d": d.astype(np.float16), **out}
