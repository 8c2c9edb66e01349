// Matrix-vector products of llama.cpp's 4- to 8-bit block formats at M = 1 in CUDA, called from JAX
// through the XLA FFI (cuda_lib.py builds this file with the machine's nvcc at first use).
//
// Same arithmetic as gemv.py (int16 activations per 32 with float32 scales and integer sums, dp2a
// on the weights' integer codes, scales and mins per group in float32); what Triton would not give:
// - a warp's 32 lanes read 4 consecutive units of 128 code bytes of a row (a K-quant super-block,
//   4 or 8 legacy blocks) with one 16-byte load each (512 contiguous bytes per warp instruction),
//   R rows a warp, each step's loads issued before the previous step's arithmetic; where rows are
//   few, S warps split K (~2048 warps in all);
// - weights bypass L1 (ld.global.nc.L1::no_allocate) and the launch prefers L1 over shared memory
//   (carveout 0), so the activations (<= 64 KB for K = 14336) stay in L1 for every warp of an SM;
// - the activation loads are shared by the R rows of a warp.
//
// A format is a struct: kArrays (its QTensor's arrays, sorted by name, as args() takes them),
// kUnitBlocks / kUnitX32 (format blocks / activation blocks of 32 in a unit), W (a lane's loads of
// one row and unit: load_w), X (its activations: load_x) and dot(W, X, chunk) -> float.
#include "cuda_common.cuh"

namespace {

constexpr int kWarps = 4;  // per block

// A lane's work is host code too (JQ_HD): jq_gemv_host runs it lane by lane on the CPU, so the CPU
// suite checks the kernels' indexing and arithmetic against dequantize + dot (tests/test_gemv_cuda.py).

// dp2a: two int16 of a (packed) times bytes 0, 1 (HI: 2, 3) of b, signed, plus c.
template <bool HI>
JQ_HD int dp2a(uint32_t a, uint32_t b, int c) {
#ifdef __CUDA_ARCH__
  const int sa = static_cast<int>(a), sb = static_cast<int>(b);
  return HI ? __dp2a_hi(sa, sb, c) : __dp2a_lo(sa, sb, c);
#else
  const int k = HI ? 16 : 0;
  return c + static_cast<int16_t>(a) * static_cast<int8_t>(b >> k) +
         static_cast<int16_t>(a >> 16) * static_cast<int8_t>(b >> (k + 8));
#endif
}

// prmt: byte k of the result is byte (selector nibble k & 7) of the 8 bytes y:x.
JQ_HD uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t s) {
#ifdef __CUDA_ARCH__
  return __byte_perm(x, y, s);
#else
  const uint64_t v = (static_cast<uint64_t>(y) << 32) | x;
  uint32_t r = 0;
  for (int k = 0; k < 4; ++k) r |= static_cast<uint32_t>((v >> (8 * ((s >> (4 * k)) & 7))) & 0xFF) << (8 * k);
  return r;
#endif
}

// Activations of one block of 32, half h (elements 16 h .. 16 h + 15): the int16 pairs (4i, 4i + 1)
// and (4i + 2, 4i + 3) of i = 4h .. 4h + 3, its float32 scale and the integer sum of the half.
struct XHalf {
  uint4 lo, hi;
  float dx;
  int sum;
};

JQ_HD XHalf x_half(const uint4* xw, const float* dx, const int* xsum, int block, int h) {
  return {ldg(xw + 4 * block + h), ldg(xw + 4 * block + 2 + h), ldg(dx + block), ldg(xsum + 4 * block + h)};
}

// The two half blocks a lane's 16 code bytes pair with (which ones: the format's load_x).
struct XPair {
  XHalf a, b;
};

// The int32 dot of 16 byte codes (4 words, element 4i + k in byte k of word i) with a half block.
JQ_HD int dot16(const uint32_t (&q)[4], const XHalf& x) {
  int s = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    s = dp2a<false>(comp(x.lo, i), q[i], s);
    s = dp2a<true>(comp(x.hi, i), q[i], s);
  }
  return s;
}

// Q4_K: a super-block of 256 is 4 groups of 64 (qs bytes 32 g ..): low nibbles sub-block 2g, high
// nibbles 2g + 1, 6-bit scales and mins packed in 12 bytes (ggml's get_scale_min_k4). Lane chunk c
// (16 qs bytes) is group c / 2, elements 16 (c % 2) .. + 15 of both sub-blocks.
struct Q4K {
  static constexpr int kArrays = 4, kUnitBlocks = 1, kUnitX32 = 8;  // a unit: one super-block
  using Args = Q4KArgs;
  static Args args(const void* const* a) { return Args::from(a); }
  // One row's block as the loop carries it a step ahead. Scalars are converted when loaded: with
  // __half / int8_t members nvcc 13.0 dropped every row after the first of Q6K's carried array
  // (their scales read as 0 in the PTX).
  struct W {
    uint4 q;
    uint32_t s0, s1, s2;
    float d, dmin;
  };
  using X = XPair;
  static JQ_HD W load_w(const Args& w, size_t blk, int c) {
    const uint32_t* s = w.scales + 3 * blk;
    return {ld_stream(w.qs + 8 * blk + c), ldg(s), ldg(s + 1), ldg(s + 2), __half2float(w.d[blk]),
            __half2float(w.dmin[blk])};
  }
  static JQ_HD X load_x(const uint4* xw, const float* dx, const int* xs, int sb, int c) {
    const int b = 8 * sb + 2 * (c >> 1);
    return {x_half(xw, dx, xs, b, c & 1), x_half(xw, dx, xs, b + 1, c & 1)};
  }
  static JQ_HD float dot(const W& w, const X& x, int c) {
    uint32_t lo[4], hi[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t v = comp(w.q, i);
      lo[i] = v & 0x0F0F0F0Fu;
      hi[i] = (v >> 4) & 0x0F0F0F0Fu;
    }
    return dot_codes(w, lo, hi, x, c);
  }
  // The codes of sub-blocks 2g (a) and 2g + 1 (b), g = c / 2, times the activations, scaled.
  static JQ_HD float dot_codes(const W& w, const uint32_t (&a)[4], const uint32_t (&b)[4], const X& x, int c) {
    // sub-blocks j = 2g, 2g + 1 are bytes k, k + 1 of the scale words, k = 2 (g % 2); g >= 2
    // takes 4 bits from word 2 and the top 2 from words 0 / 1.
    const int g = c >> 1, sh = 16 * (g & 1);
    const uint32_t t0 = w.s0 >> sh, t1 = w.s1 >> sh, t2 = w.s2 >> sh;
    const bool upper = g >= 2;
    const uint32_t sc = upper ? (t2 & 0x0F0Fu) | ((t0 >> 2) & 0x3030u) : t0 & 0x3F3Fu;
    const uint32_t mn = upper ? ((t2 >> 4) & 0x0F0Fu) | ((t1 >> 2) & 0x3030u) : t1 & 0x3F3Fu;
    const float s = static_cast<float>(sc & 0xFF) * x.a.dx * static_cast<float>(dot16(a, x.a)) +
                    static_cast<float>(sc >> 8) * x.b.dx * static_cast<float>(dot16(b, x.b));
    const float m = static_cast<float>(mn & 0xFF) * x.a.dx * static_cast<float>(x.a.sum) +
                    static_cast<float>(mn >> 8) * x.b.dx * static_cast<float>(x.b.sum);
    return w.d * s - w.dmin * m;
  }
};

// Q6_K: element 128 h + 32 j + l (h < 2, j < 4, l < 32) is nibble j / 2 of ql byte 64 h + 32 (j % 2)
// + l with bits 2j, 2j + 1 of qh byte 32 h + l on top, minus 32; int8 scale 8 h + 2 j + l / 16.
// Lane chunk c (16 ql bytes, c = 4 h + 2 (j % 2) + l / 16) holds quarters j = c / 2 % 2 (low
// nibbles) and j + 2 (high), 16 elements each.
struct Q6K {
  static constexpr int kArrays = 4, kUnitBlocks = 1, kUnitX32 = 8;
  using Args = Q6KArgs;
  static Args args(const void* const* a) { return Args::from(a); }
  struct W {
    uint4 ql, qh;
    float sa, sb, d;
  };
  using X = XPair;
  static JQ_HD W load_w(const Args& w, size_t blk, int c) {
    const int h = c >> 2, lh = c & 1, g = 8 * h + 2 * ((c >> 1) & 1) + lh;
    const int8_t* s = w.scales + 16 * blk;
    return {ld_stream(w.ql + 8 * blk + c), ld_stream(w.qh + 4 * blk + 2 * h + lh), static_cast<float>(ldg(s + g)),
            static_cast<float>(ldg(s + g + 4)), __half2float(w.d[blk])};
  }
  static JQ_HD X load_x(const uint4* xw, const float* dx, const int* xs, int sb, int c) {
    const int b = 8 * sb + 4 * (c >> 2) + ((c >> 1) & 1);
    return {x_half(xw, dx, xs, b, c & 1), x_half(xw, dx, xs, b + 2, c & 1)};
  }
  static JQ_HD float dot(const W& w, const X& x, int c) {
    const int jj = (c >> 1) & 1;
    uint32_t qa[4], qb[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t l = comp(w.ql, i), h = comp(w.qh, i);
      qa[i] = (l & 0x0F0F0F0Fu) | ((h << (4 - 2 * jj)) & 0x30303030u);
      qb[i] = ((l >> 4) & 0x0F0F0F0Fu) | ((h >> (2 * jj)) & 0x30303030u);
    }
    const float s = w.sa * x.a.dx * static_cast<float>(dot16(qa, x.a) - 32 * x.a.sum) +
                    w.sb * x.b.dx * static_cast<float>(dot16(qb, x.b) - 32 * x.b.sum);
    return w.d * s;
  }
};

// Q8_0: blocks of 32 int8 codes with a float16 scale. A unit is 4 blocks (128 qs bytes); lane chunk
// c is half c % 2 of block c / 2.
struct Q80 {
  static constexpr int kArrays = 2, kUnitBlocks = 4, kUnitX32 = 4;
  struct Args {
    const __half* d;
    const uint4* qs;
  };
  static Args args(const void* const* a) {
    return {static_cast<const __half*>(a[0]), static_cast<const uint4*>(a[1])};
  }
  struct W {
    uint4 q;
    float d;
  };
  using X = XHalf;
  static JQ_HD W load_w(const Args& w, size_t unit, int c) {
    return {ld_stream(w.qs + 8 * unit + c), __half2float(w.d[4 * unit + (c >> 1)])};
  }
  static JQ_HD X load_x(const uint4* xw, const float* dx, const int* xs, int unit, int c) {
    return x_half(xw, dx, xs, 4 * unit + (c >> 1), c & 1);
  }
  static JQ_HD float dot(const W& w, const X& x, int) {
    const uint32_t q[4] = {w.q.x, w.q.y, w.q.z, w.q.w};
    return w.d * x.dx * static_cast<float>(dot16(q, x));
  }
};

// Blocks of 32 with 16 nibble bytes (Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL): byte j holds element j (low
// nibble) and j + 16 (high). A unit is 8 blocks; lane chunk c is block c of the unit, whole.
struct Nibbles32 {
  static constexpr int kUnitBlocks = 8, kUnitX32 = 8;
  using X = XPair;
  static JQ_HD X load_x(const uint4* xw, const float* dx, const int* xs, int unit, int c) {
    return {x_half(xw, dx, xs, 8 * unit + c, 0), x_half(xw, dx, xs, 8 * unit + c, 1)};
  }
  static JQ_HD void planes(const uint4& q, uint32_t (&lo)[4], uint32_t (&hi)[4]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      lo[i] = comp(q, i) & 0x0F0F0F0Fu;
      hi[i] = (comp(q, i) >> 4) & 0x0F0F0F0Fu;
    }
  }
  // Bits 4i .. 4i + 3 of b at bit 4 of bytes 0 .. 3 (the fifth bits of elements 4i ..): four
  // shifted copies that do not overlap.
  static JQ_HD uint32_t fifth_bits(uint32_t b, int i) { return (((b >> (4 * i)) & 0xFu) * 0x02040810u) & 0x10101010u; }
};

// Q4_0: d * (q - 8).  Q4_1: d * q + m.
template <bool kMin>
struct Q4Legacy : Nibbles32 {
  static constexpr int kArrays = kMin ? 3 : 2;  // d[, m], qs
  struct Args {
    const __half* d;
    const __half* m;
    const uint4* qs;
  };
  static Args args(const void* const* a) {
    return {static_cast<const __half*>(a[0]), kMin ? static_cast<const __half*>(a[1]) : nullptr,
            static_cast<const uint4*>(a[kMin ? 2 : 1])};
  }
  struct W {
    uint4 q;
    float d, m;
  };
  static JQ_HD W load_w(const Args& w, size_t unit, int c) {
    const size_t b = 8 * unit + c;
    return {ld_stream(w.qs + b), __half2float(w.d[b]), kMin ? __half2float(w.m[b]) : 0.f};
  }
  static JQ_HD float dot(const W& w, const X& x, int) {
    uint32_t lo[4], hi[4];
    planes(w.q, lo, hi);
    const float q = x.a.dx * static_cast<float>(dot16(lo, x.a) + dot16(hi, x.b));  // a.dx == b.dx: one block
    const float sum = x.a.dx * static_cast<float>(x.a.sum + x.b.sum);
    return kMin ? w.d * q + w.m * sum : w.d * (q - 8.f * sum);
  }
};

// Q5_0: d * (q - 16), Q5_1: d * q + m, q's fifth bit j in bit j of the block's 32-bit qh.
template <bool kMin>
struct Q5Legacy : Nibbles32 {
  static constexpr int kArrays = kMin ? 4 : 3;  // d[, m], qh, qs
  struct Args {
    const __half* d;
    const __half* m;
    const uint32_t* qh;
    const uint4* qs;
  };
  static Args args(const void* const* a) {
    return {static_cast<const __half*>(a[0]), kMin ? static_cast<const __half*>(a[1]) : nullptr,
            static_cast<const uint32_t*>(a[kMin ? 2 : 1]), static_cast<const uint4*>(a[kMin ? 3 : 2])};
  }
  struct W {
    uint4 q;
    uint32_t h;
    float d, m;
  };
  static JQ_HD W load_w(const Args& w, size_t unit, int c) {
    const size_t b = 8 * unit + c;
    return {ld_stream(w.qs + b), ldg(w.qh + b), __half2float(w.d[b]), kMin ? __half2float(w.m[b]) : 0.f};
  }
  static JQ_HD float dot(const W& w, const X& x, int) {
    uint32_t lo[4], hi[4];
    planes(w.q, lo, hi);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      lo[i] |= fifth_bits(w.h, i);
      hi[i] |= fifth_bits(w.h >> 16, i);
    }
    const float q = x.a.dx * static_cast<float>(dot16(lo, x.a) + dot16(hi, x.b));
    const float sum = x.a.dx * static_cast<float>(x.a.sum + x.b.sum);
    return kMin ? w.d * q + w.m * sum : w.d * (q - 16.f * sum);
  }
};

// IQ4's 16 non-linear values (kvalues_iq4nl) for 4 nibble bytes: two byte permutes of the table
// (entries 0-7, 8-15), bit 3 of each nibble picks one.
JQ_HD uint32_t iq4_values(uint32_t n) {
  constexpr uint32_t t0 = 0xbfad9881u, t1 = 0xf6eaddcfu, t2 = 0x26190d01u, t3 = 0x71594535u;  // -127 .. 113, 4 a word
  const uint32_t low3 = n & 0x07070707u, packed = low3 | (low3 >> 4);
  const uint32_t sel = byte_perm(packed, 0, 0x3320);  // nibble k: element k's low 3 bits
  const uint32_t upper = ((n >> 3) & 0x01010101u) * 0xFFu;
  return (byte_perm(t0, t1, sel) & ~upper) | (byte_perm(t2, t3, sel) & upper);
}

// IQ4_NL: d * kvalues[q].
struct IQ4NL : Nibbles32 {
  static constexpr int kArrays = 2;  // d, qs
  struct Args {
    const __half* d;
    const uint4* qs;
  };
  static Args args(const void* const* a) { return {static_cast<const __half*>(a[0]), static_cast<const uint4*>(a[1])}; }
  struct W {
    uint4 q;
    float d;
  };
  static JQ_HD W load_w(const Args& w, size_t unit, int c) {
    const size_t b = 8 * unit + c;
    return {ld_stream(w.qs + b), __half2float(w.d[b])};
  }
  static JQ_HD float dot(const W& w, const X& x, int) {
    uint32_t lo[4], hi[4];
    planes(w.q, lo, hi);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      lo[i] = iq4_values(lo[i]);
      hi[i] = iq4_values(hi[i]);
    }
    return w.d * x.a.dx * static_cast<float>(dot16(lo, x.a) + dot16(hi, x.b));
  }
};

// IQ4_XS: super-blocks of 256, sub-block j (qs bytes 16 j ..) as an IQ4_NL block with a 6-bit scale
// minus 32 (low 4 bits: nibble j of scales_l, high 2: bits 2j of scales_h). A unit is one super-
// block; lane chunk c is sub-block c.
struct IQ4XS {
  static constexpr int kArrays = 4, kUnitBlocks = 1, kUnitX32 = 8;  // d, qs, scales_h, scales_l
  struct Args {
    const __half* d;
    const uint4* qs;
    const uint16_t* scales_h;
    const uint32_t* scales_l;
  };
  static Args args(const void* const* a) {
    return {static_cast<const __half*>(a[0]), static_cast<const uint4*>(a[1]), static_cast<const uint16_t*>(a[2]),
            static_cast<const uint32_t*>(a[3])};
  }
  struct W {
    uint4 q;
    float scale;  // d * (ls - 32)
  };
  using X = XPair;
  static JQ_HD W load_w(const Args& w, size_t blk, int c) {
    const uint32_t ls = ((ldg(w.scales_l + blk) >> (4 * c)) & 0xFu) | ((ldg(w.scales_h + blk) >> (2 * c)) & 3u) << 4;
    return {ld_stream(w.qs + 8 * blk + c), __half2float(w.d[blk]) * static_cast<float>(static_cast<int>(ls) - 32)};
  }
  static JQ_HD X load_x(const uint4* xw, const float* dx, const int* xs, int sb, int c) {
    return {x_half(xw, dx, xs, 8 * sb + c, 0), x_half(xw, dx, xs, 8 * sb + c, 1)};
  }
  static JQ_HD float dot(const W& w, const X& x, int c) {
    return IQ4NL::dot({w.q, w.scale}, x, c);
  }
};

// Q5_K: Q4_K with a fifth bit a weight: element l of group g (sub-blocks 2g, 2g + 1) takes bits 2g,
// 2g + 1 of qh byte l.
struct Q5K {
  static constexpr int kArrays = 5, kUnitBlocks = 1, kUnitX32 = 8;  // d, dmin, qh, qs, scales
  struct Args {
    Q4K::Args q4;
    const uint4* qh;
  };
  static Args args(const void* const* a) {
    const void* q4[] = {a[0], a[1], a[3], a[4]};
    return {Q4K::args(q4), static_cast<const uint4*>(a[2])};
  }
  struct W {
    Q4K::W q4;
    uint4 h;
  };
  using X = XPair;
  static JQ_HD W load_w(const Args& w, size_t blk, int c) {
    return {Q4K::load_w(w.q4, blk, c), ld_stream(w.qh + 2 * blk + (c & 1))};
  }
  static JQ_HD X load_x(const uint4* xw, const float* dx, const int* xs, int sb, int c) {
    return Q4K::load_x(xw, dx, xs, sb, c);
  }
  static JQ_HD float dot(const W& w, const X& x, int c) {
    const int g = c >> 1;
    uint32_t a[4], b[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t v = comp(w.q4.q, i), h = comp(w.h, i);
      a[i] = (v & 0x0F0F0F0Fu) | (((h >> (2 * g)) & 0x01010101u) << 4);
      b[i] = ((v >> 4) & 0x0F0F0F0Fu) | (((h >> (2 * g + 1)) & 0x01010101u) << 4);
    }
    return Q4K::dot_codes(w.q4, a, b, x, c);
  }
};

// A group of S warps owns rows row0 .. row0 + R - 1 and splits K: a step of a warp reads 4 units of
// 128 code bytes of each row (lane = 8 (unit within 4) + chunk), the group's warps interleaved; the
// next step's weights are loaded before this step's are used. This is one lane's share: part
// ``part`` of the group, its partial sum of each row (0 where the rows are past N: not ``live``).
template <class F, int R, int S>
JQ_HD void lane_sums(const typename F::Args& w, const uint4* __restrict__ xw, const float* __restrict__ dx,
                     const int* __restrict__ xs, int nb, int row0, bool live, int part, int lane, float (&acc)[R]) {
  constexpr int kStep = 4 * S;
  const int c = lane & 7, first = 4 * part + (lane >> 3);
  const auto load = [&](int r, int sb) {  // past the row's end: its last block again, not used
    return F::load_w(w, static_cast<size_t>(row0 + r) * nb + (sb < nb ? sb : nb - 1), c);
  };
  typename F::W cur[R], nxt[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    acc[r] = 0.f;
    if (live) cur[r] = load(r, first);
  }
  wait_for_previous_kernel();  // the activations come from it
  for (int sb = first; live && sb < nb; sb += kStep) {
#pragma unroll
    for (int r = 0; r < R; ++r) nxt[r] = load(r, sb + kStep);
    const typename F::X x = F::load_x(xw, dx, xs, sb, c);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      acc[r] += F::dot(cur[r], x, c);
      cur[r] = nxt[r];
    }
  }
}

// The lanes' partial sums meet through shuffles, the S warps' in shared memory (fixed order).
template <class F, int R, int S>
__global__ void __launch_bounds__(kWarps * 32) gemv_kernel(typename F::Args w, const uint4* __restrict__ xw,
                                                             const float* __restrict__ dx,
                                                             const int* __restrict__ xs,
                                                             const float* __restrict__ res, float* __restrict__ out,
                                                             int n, int nb) {
  static_assert(kWarps % S == 0);
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32, part = warp % S;
  const int row0 = (blockIdx.x * (kWarps / S) + warp / S) * R;
  const bool live = row0 < n;  // n % R == 0: a group's rows are all in or all out
  float acc[R];
  lane_sums<F, R, S>(w, xw, dx, xs, nb, row0, live, part, lane, acc);
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = warp_sum(acc[r]);
  if constexpr (S > 1) {
    __shared__ float parts[kWarps][R];
    if (lane < R) {
#pragma unroll
      for (int r = 0; r < R; ++r) parts[warp][r] = acc[r];
    }
    __syncthreads();
    if (part != 0) return;
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int q = 1; q < S; ++q) acc[r] += parts[warp + q][r];
    }
  }
  if (live && lane < R) {
    float v = acc[0];
#pragma unroll
    for (int r = 1; r < R; ++r) v = lane == r ? acc[r] : v;
    out[row0 + lane] = res != nullptr ? v + res[row0 + lane] : v;  // res: written before x (see run)
  }
}

struct Operands {
  const void *xw, *dx, *xs;
  const float* res;  // added to the product, or nullptr
  float* out;
  int n, nb;
};

template <int R_, int S_>
struct Tiling {
  static constexpr int R = R_, S = S_;
};

// The tilings built, rows a warp x warps a row (gemv_cuda.TILINGS): fn(Tiling<R, S>{}), false if none.
template <class Fn>
bool with_tiling(int64_t tiling, Fn&& fn) {
  switch (tiling) {
    case 41: fn(Tiling<4, 1>{}); return true;
    case 42: fn(Tiling<4, 2>{}); return true;
    case 24: fn(Tiling<2, 4>{}); return true;
    default: return false;
  }
}

template <class F, int R, int S>
cudaError_t launch(cudaStream_t stream, const typename F::Args& w, const Operands& o) {
  static const cudaError_t attr =  // L1 over shared memory: the kernel uses next to none
      cudaFuncSetAttribute(gemv_kernel<F, R, S>, cudaFuncAttributePreferredSharedMemoryCarveout, 0);
  if (attr != cudaSuccess) return attr;
  constexpr int kRows = R * kWarps / S;  // a block's
  return launch_early(stream, (o.n + kRows - 1) / kRows, kWarps * 32, gemv_kernel<F, R, S>, w,
                      static_cast<const uint4*>(o.xw), static_cast<const float*>(o.dx), static_cast<const int*>(o.xs),
                      o.res, o.out, o.n, o.nb);
}

// The kernel's lanes one after another on the host (the lanes' sums added in another order).
template <class F, int R, int S>
void host_gemv(const typename F::Args& w, const Operands& o) {
  for (int row0 = 0; row0 < o.n; row0 += R) {
    float total[R] = {};
    for (int part = 0; part < S; ++part) {
      for (int lane = 0; lane < 32; ++lane) {
        float acc[R];
        lane_sums<F, R, S>(w, static_cast<const uint4*>(o.xw), static_cast<const float*>(o.dx),
                           static_cast<const int*>(o.xs), o.nb, row0, true, part, lane, acc);
        for (int r = 0; r < R; ++r) total[r] += acc[r];
      }
    }
    for (int r = 0; r < R; ++r) o.out[row0 + r] = o.res != nullptr ? total[r] + o.res[row0 + r] : total[r];
  }
}

// ---------------------------------------------------------------------------------------------
// The gemvs' activations by gemv.quantize_activations' rule: int16 values floor(x / dx + 1/2) with
// dx = amax / 32767 (NaN where a value is NaN) per block of 32, as 16 words (word i: elements 4i,
// 4i + 1; word 8 + i: 4i + 2, 4i + 3), dx, and the integer sums of each half, of both, and a 0.
// A small kernel in the gemv's FFI call (in place of XLA's and Pallas' kernels), so that the gemv
// launched after it may start reading its weights at once.
//
// Before quantizing, the kernel computes the product's input from the call's x (a Prologue of
// cuda_common.cuh, as ops.Activation defines it).

JQ_HD float block_scale(float amax, bool nan) { return nan ? NAN : amax * (1.0f / 32767.0f); }  // as XLA: amax / 32767

JQ_HD int quantized(float v, float dx) {
  const float inv = dx > 0.f ? 1.0f / dx : 0.f;
#ifdef __CUDA_ARCH__
  const float r = __fadd_rn(__fmul_rn(v, inv), 0.5f);  // two roundings (no FMA), as XLA
#else
  const float r = v * inv + 0.5f;
#endif
  return static_cast<int>(fminf(fmaxf(floorf(r), -32767.f), 32767.f));
}

// One block on the host (jq_prepare_host). fmaxf is exact in any order (NaN is counted apart).
void quantize_block(const float (&v)[32], uint32_t* __restrict__ words, float& dx, int4& sums) {
  float amax = 0.f;
  bool nan = false;
  for (int i = 0; i < 32; ++i) {
    amax = fmaxf(amax, fabsf(v[i]));
    nan |= std::isnan(v[i]);
  }
  dx = block_scale(amax, nan);
  int q[32], half[2] = {0, 0};
  for (int i = 0; i < 32; ++i) half[i / 16] += q[i] = quantized(v[i], dx);
  for (int i = 0; i < 8; ++i) {
    words[i] = (static_cast<uint32_t>(q[4 * i]) & 0xFFFFu) | (static_cast<uint32_t>(q[4 * i + 1]) << 16);
    words[8 + i] = (static_cast<uint32_t>(q[4 * i + 2]) & 0xFFFFu) | (static_cast<uint32_t>(q[4 * i + 3]) << 16);
  }
  sums = make_int4(half[0], half[1], half[0] + half[1], 0);
}

// A warp a block of 32, a lane an element: the scale and sums through shuffles; kPrepWarps blocks
// a thread block. The norm's scale needs all of x: each thread block sums the squares of the whole
// of x itself (16 KB from L2 at K = 4096) rather than wait for another kernel.
constexpr int kPrepWarps = 8;

// Releases the gemv after it at once (it may start reading its weights) and waits for the kernel
// before it, which wrote x.
template <class T, int P>
__global__ void __launch_bounds__(kPrepWarps * 32)
    prepare_kernel(const T* __restrict__ x, const float* __restrict__ weight, float eps, int64_t round,
                   uint32_t* __restrict__ words, float* __restrict__ dx, int4* __restrict__ sums, int blocks) {
  release_dependents();
  wait_for_previous_kernel();
  const int lane = threadIdx.x % 32, b = blockIdx.x * kPrepWarps + threadIdx.x / 32, k = 32 * blocks;
  float scale = 0.f;
  if constexpr (P == kRmsNorm) scale = norm_scale(sum_squares<kPrepWarps>(x, k), k, eps);
  if (b >= blocks) return;
  const float v = prologue_value<P>(x, weight, scale, round, k, 32 * static_cast<size_t>(b) + lane);
  const bool nan = __any_sync(kAll, std::isnan(v));
  const float amax = warp_max(fabsf(v));
  const float d = block_scale(amax, nan);
  const int q = quantized(v, d), next = __shfl_down_sync(kAll, q, 1);
  if (lane % 2 == 0) {  // lanes 4i and 4i + 2 write words i and 8 + i
    words[16 * static_cast<size_t>(b) + lane / 4 + (lane % 4 ? 8 : 0)] =
        (static_cast<uint32_t>(q) & 0xFFFFu) | (static_cast<uint32_t>(next) << 16);
  }
  const int half = warp_sum<16>(q), other = __shfl_xor_sync(kAll, half, 16);
  if (lane == 0) {
    dx[b] = d;
    sums[b] = make_int4(half, other, half + other, 0);
  }
}

// The product's K / 32 blocks of activations from x (K or, gated, 2K elements; f32, bf16 or f16;
// the norm's f32) into words, dx, sums. Launched early: it reads nothing before it waits.
ffi::Error prepare_x(cudaStream_t stream, int64_t prologue, int64_t round, float eps, const ffi::AnyBuffer& x,
                     const float* weight, int blocks, uint32_t* words, float* dx, int* sums) {
  if (reinterpret_cast<uintptr_t>(x.untyped_data()) % 16) {
    return ffi::Error::InvalidArgument("gemv_cuda: activations must be 16-byte aligned");
  }
  if (prologue == kRmsNorm && x.element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument("gemv_cuda: the norm's x must be f32");
  }
  cudaError_t err = cudaSuccess;
  const bool known = with_input(x, prologue, [&](const auto* typed, auto p) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(typed)>>;
    err = launch_early(stream, (blocks + kPrepWarps - 1) / kPrepWarps, kPrepWarps * 32,
                       prepare_kernel<T, decltype(p)::value>, typed, weight, eps, round, words, dx,
                       reinterpret_cast<int4*>(sums), blocks);
  });
  if (!known) return ffi::Error::InvalidArgument("gemv_cuda: activations must be f32, bf16 or f16 (a known prologue)");
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("gemv_cuda prepare_x: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

// The formats by name (gemv_cuda.FORMATS): fn(F{}), false if none.
template <class Fn>
bool with_format(std::string_view name, Fn&& fn) {
  if (name == "Q4_K") return fn(Q4K{}), true;
  if (name == "Q5_K") return fn(Q5K{}), true;
  if (name == "Q6_K") return fn(Q6K{}), true;
  if (name == "Q8_0") return fn(Q80{}), true;
  if (name == "Q4_0") return fn(Q4Legacy<false>{}), true;
  if (name == "Q4_1") return fn(Q4Legacy<true>{}), true;
  if (name == "Q5_0") return fn(Q5Legacy<false>{}), true;
  if (name == "Q5_1") return fn(Q5Legacy<true>{}), true;
  if (name == "IQ4_NL") return fn(IQ4NL{}), true;
  if (name == "IQ4_XS") return fn(IQ4XS{}), true;
  return false;
}

// A QTensor of format F at args[first ..] (its arrays in sorted field order, d: [N, blocks]) and
// the product's operands for it: launched early with `tiling` into out [N]; `x32` checks its K.
template <class F>
ffi::Error launch_weight(cudaStream_t stream, int64_t tiling, const ffi::RemainingArgs& args, size_t first, int64_t x32,
                         Operands o, ffi::Result<ffi::Buffer<ffi::F32>> out) {
  const void* data[F::kArrays];
  int64_t n = 0, blocks = 0;
  for (int i = 0; i < F::kArrays; ++i) {
    const auto b = args.get<ffi::AnyBuffer>(first + i);
    if (b.has_error()) return b.error();
    data[i] = b->untyped_data();
    if (i == 0) {
      const auto dims = b->dimensions();
      if (dims.size() != 2) return ffi::Error::InvalidArgument("gemv_cuda: scales must be [N, blocks]");
      n = dims[0];
      blocks = dims[1];
    }
  }
  if (blocks % F::kUnitBlocks || blocks / F::kUnitBlocks * F::kUnitX32 != x32 || tiling < 10 || n % (tiling / 10) ||
      out->element_count() != static_cast<size_t>(n)) {
    return ffi::Error::InvalidArgument("gemv_cuda: operand shapes do not match");
  }
  o.out = out->typed_data();
  o.n = static_cast<int>(n);
  o.nb = static_cast<int>(blocks / F::kUnitBlocks);
  cudaError_t err = cudaSuccess;
  const auto go = [&](auto t) { err = launch<F, decltype(t)::R, decltype(t)::S>(stream, F::args(data), o); };
  if (!with_tiling(tiling, go)) return ffi::Error::InvalidArgument("gemv_cuda: no kernel for this tiling");
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("gemv_cuda: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

// The QTensor's arrays in sorted field order, the call's x (see prepare_x), the norm's weight [K]
// (f32) for kRmsNorm, then either a residual [N] (f32) added to the product, or the arrays of the
// weights `more` names ("Q6_K:24,...": format and tiling of each), products of the same input.
// Results: the product [N], the activations quantized (words, scales, sums: scratch, for the
// gemvs), then the products of `more`'s weights. Each gemv, launched early, may start once the
// kernel before it has (prepare_x's, after every block of the kernel before the call has ended; or
// the previous gemv): its early weight reads overlap no kernel that could write weights (as one
// that requantizes them inside the same jit). It reads x's quantization and the residual after
// griddepcontrol.wait: prepare_x's kernel has then ended, and it ended after waiting for the
// kernels before it, which wrote the residual.
template <class F>
ffi::Error run(cudaStream_t stream, int64_t tiling, int64_t prologue, int64_t round, float eps, std::string_view more,
               ffi::RemainingArgs args, ffi::Result<ffi::Buffer<ffi::F32>> out, ffi::Result<ffi::Buffer<ffi::U32>> words,
               ffi::Result<ffi::Buffer<ffi::F32>> dx, ffi::Result<ffi::Buffer<ffi::S32>> sums,
               ffi::RemainingRets more_outs) {
  const size_t fixed = F::kArrays + 1 + (prologue == kRmsNorm ? 1 : 0);
  const int64_t x32 = static_cast<int64_t>(dx->element_count());  // activation blocks of 32 (K / 32)
  const auto x = args.get<ffi::AnyBuffer>(F::kArrays);
  if (x.has_error()) return x.error();
  const bool gated = prologue == kSilu || prologue == kGeluTanh;
  const float* weight = nullptr;
  if (prologue == kRmsNorm) {
    const auto w = args.get<ffi::AnyBuffer>(F::kArrays + 1);
    if (w.has_error()) return w.error();
    if (w->element_type() != ffi::DataType::F32 || w->element_count() != static_cast<size_t>(32 * x32)) {
      return ffi::Error::InvalidArgument("gemv_cuda: the norm's weight must be f32 [K]");
    }
    weight = static_cast<const float*>(w->untyped_data());
  }
  const float* res = nullptr;
  if (more.empty() && args.size() == fixed + 1) {
    const auto r = args.get<ffi::AnyBuffer>(fixed);
    if (r.has_error()) return r.error();
    if (r->element_type() != ffi::DataType::F32 || r->element_count() != out->element_count()) {
      return ffi::Error::InvalidArgument("gemv_cuda: the residual must be f32 [N]");
    }
    res = static_cast<const float*>(r->untyped_data());
  } else if (more.empty() && args.size() != fixed) {
    return ffi::Error::InvalidArgument("gemv_cuda: wrong number of operands");
  }
  if (x->element_count() != static_cast<size_t>((gated ? 64 : 32) * x32) ||
      words->element_count() != static_cast<size_t>(16 * x32) || sums->element_count() != static_cast<size_t>(4 * x32)) {
    return ffi::Error::InvalidArgument("gemv_cuda: operand shapes do not match");
  }
  if (const ffi::Error e = prepare_x(stream, prologue, round, eps, *x, weight, static_cast<int>(x32),
                                     words->typed_data(), dx->typed_data(), sums->typed_data());
      e.failure()) {
    return e;
  }
  const Operands o{words->typed_data(), dx->typed_data(), sums->typed_data(), res, nullptr, 0, 0};
  if (const ffi::Error e = launch_weight<F>(stream, tiling, args, 0, x32, o, out); e.failure()) return e;
  size_t first = fixed, index = 0;
  for (std::string_view rest = more; !rest.empty(); ++index) {  // "FMT:tiling" items, comma-separated
    const size_t comma = rest.find(','), colon = rest.find(':');
    const std::string_view item = rest.substr(0, comma);
    rest = comma == std::string_view::npos ? std::string_view() : rest.substr(comma + 1);
    if (colon == std::string_view::npos || colon >= item.size()) {
      return ffi::Error::InvalidArgument("gemv_cuda: `more` items are FORMAT:tiling");
    }
    const int64_t t = std::atoll(std::string(item.substr(colon + 1)).c_str());
    const auto o_i = more_outs.get<ffi::Buffer<ffi::F32>>(index);
    if (o_i.has_error()) return o_i.error();
    ffi::Error e = ffi::Error::Success();
    const bool known = with_format(item.substr(0, colon), [&](auto format) {
      using G = decltype(format);
      e = first + G::kArrays > args.size() ? ffi::Error::InvalidArgument("gemv_cuda: wrong number of operands")
                                           : launch_weight<G>(stream, t, args, first, x32, o, *o_i);
      first += G::kArrays;
    });
    if (!known) return ffi::Error::InvalidArgument("gemv_cuda: unknown format in `more`");
    if (e.failure()) return e;
  }
  if (first != args.size() && !more.empty()) return ffi::Error::InvalidArgument("gemv_cuda: wrong number of operands");
  return ffi::Error::Success();
}

}  // namespace

#define JQ_GEMV_HANDLER(name, F)                                                                          \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, run<F>,                                                             \
                                ffi::Ffi::Bind()                                                          \
                                    .Ctx<ffi::PlatformStream<cudaStream_t>>()                             \
                                    .Attr<int64_t>("tiling")                                              \
                                    .Attr<int64_t>("prologue")                                            \
                                    .Attr<int64_t>("round")                                               \
                                    .Attr<float>("eps")                                                   \
                                    .Attr<std::string_view>("more")                                       \
                                    .RemainingArgs()                                                      \
                                    .Ret<ffi::Buffer<ffi::F32>>()                                         \
                                    .Ret<ffi::Buffer<ffi::U32>>()                                         \
                                    .Ret<ffi::Buffer<ffi::F32>>()                                         \
                                    .Ret<ffi::Buffer<ffi::S32>>()                                         \
                                    .RemainingRets());

JQ_GEMV_HANDLER(jq_gemv_q4_k, Q4K)
JQ_GEMV_HANDLER(jq_gemv_q6_k, Q6K)
JQ_GEMV_HANDLER(jq_gemv_q8_0, Q80)
JQ_GEMV_HANDLER(jq_gemv_q5_k, Q5K)
JQ_GEMV_HANDLER(jq_gemv_q4_0, Q4Legacy<false>)
JQ_GEMV_HANDLER(jq_gemv_q4_1, Q4Legacy<true>)
JQ_GEMV_HANDLER(jq_gemv_q5_0, Q5Legacy<false>)
JQ_GEMV_HANDLER(jq_gemv_q5_1, Q5Legacy<true>)
JQ_GEMV_HANDLER(jq_gemv_iq4_nl, IQ4NL)
JQ_GEMV_HANDLER(jq_gemv_iq4_xs, IQ4XS)

// The same product on the CPU (tests), nb in units, res nullable: 0, or 1 for an unknown format, 2
// for an unknown tiling.
extern "C" int jq_gemv_host(const char* fmt, int64_t tiling, const void* const* arrays, const void* xw,
                            const void* dx, const void* xs, const float* res, float* out, int n, int nb) {
  const Operands o{xw, dx, xs, res, out, n, nb};
  int rc = 2;
  const auto on = [&](auto format) {
    using F = decltype(format);
    const auto go = [&](auto t) { host_gemv<F, decltype(t)::R, decltype(t)::S>(F::args(arrays), o); };
    rc = with_tiling(tiling, go) ? 0 : 2;
  };
  return with_format(fmt, on) ? rc : 1;
}

// prepare_x on the CPU (tests): x (f32) -> the product's inputs (the prologue's values, before
// quantizing; the norm's sum in another order), and those quantized: words, scales, sums. 0, or 1
// for an unknown prologue.
extern "C" int jq_prepare_host(int64_t prologue, int64_t round, const float* x, const float* weight, float eps,
                               int blocks, float* values, uint32_t* words, float* dx, int* sums) {
  const int k = 32 * blocks;
  return with_prologue(prologue, [&](auto p) {
           constexpr int P = decltype(p)::value;
           float sum_sq = 0.f;
           for (int i = 0; P == kRmsNorm && i < k; ++i) sum_sq += x[i] * x[i];
           const float scale = norm_scale(sum_sq, k, eps);
           for (int b = 0; b < blocks; ++b) {
             float v[32];
             for (int i = 0; i < 32; ++i) v[i] = prologue_value<P>(x, weight, scale, round, k, 32 * b + i);
             memcpy(values + 32 * static_cast<size_t>(b), v, sizeof(v));
             quantize_block(v, words + 16 * static_cast<size_t>(b), dx[b], reinterpret_cast<int4*>(sums)[b]);
           }
         })
             ? 0
             : 1;
}
