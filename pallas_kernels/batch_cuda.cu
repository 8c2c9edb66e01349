// Products of Q4_K and Q6_K weights with 2 to 8 activation rows (batched decoding) on the tensor
// cores, called from JAX through the XLA FFI (cuda_lib.py builds this file into its library).
//
// bf16 MMA (m16n8k16, float32 accumulation) with the weights' codes exact in bf16: a code q < 128
// ORed into 0x4300 is the bfloat16 of 128 + q, one LOP3 for two codes and no subtraction; each
// scale group's scale, min and the 128 apply to the group's float32 sums after the MMA:
//   Q4_K, a sub-block of 32: d sc (C - 128 S) - dmin m S = d sc C - (128 d sc + dmin m) S,
//   Q6_K, a group of 16 (weights d sc (q - 32)): d sc (C - 160 S),
// with C the group's MMA sum and S the activations' sum over the group. No per-block activation
// scale: x (bf16) enters the MMA exactly (batch_cuda.py splits another dtype into bf16 hi + lo).
//
// A prepare kernel in the same call computes the activations (x, or its Prologue: the model's RMS
// norm or gated unit, in bf16), writes them in the MMA's pair order with their sums per 16 and
// releases the product, launched early (PDL), which reads its first weights meanwhile and adds a
// residual as it writes.
// A warp owns 16 weight rows (MMA rows g and g + 8 a lane, g = lane / 4) and the 8 activation
// columns (B column g a lane, zeros past M); the S warps of a block split K by super-blocks. A
// lane's work is host code too (JQ_HD): jq_batch_host runs it lane by lane with an emulated MMA
// (tests/test_batch_cuda.py).

#include "cuda_common.cuh"

namespace {

// Fragments of mma.m16n8k16 (PTX, .bf16), lane = 4 g + t, two bf16 a register (the lower index in
// the low half): a[0] row g, k 2t, 2t + 1; a[1] row g + 8, same k; a[2], a[3] the same rows at k
// 2t + 8, 2t + 9; b[0] k 2t, 2t + 1 of column g, b[1] k 2t + 8, 2t + 9; c[0], c[1] row g, columns
// 2t, 2t + 1; c[2], c[3] row g + 8.
struct Frags {
  uint32_t a[4], b[2];
};

JQ_HD float bf16_bits(uint32_t v) {  // the bfloat16 in v's low 16 bits
  const uint32_t f = v << 16;
  float r;
  memcpy(&r, &f, 4);
  return r;
}

// c += the warp's 16 x 8 product of one k16 tile: on the GPU from each lane's `mine`; on the host
// from every lane's `all(lane)`, placed as the PTX layout says.
template <class All>
JQ_HD void mma(const Frags& mine, const All& all, int lane, float (&c)[4]) {
#ifdef __CUDA_ARCH__
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(mine.a[0]), "r"(mine.a[1]), "r"(mine.a[2]), "r"(mine.a[3]), "r"(mine.b[0]), "r"(mine.b[1]));
#else
  float a[16][16], b[16][8];
  for (int q = 0; q < 32; ++q) {
    const Frags f = all(q);
    const int g = q >> 2, t = q & 3;
    for (int i = 0; i < 2; ++i) {
      const int k = 2 * t + i, sh = 16 * i;
      a[g][k] = bf16_bits(f.a[0] >> sh);
      a[g + 8][k] = bf16_bits(f.a[1] >> sh);
      a[g][k + 8] = bf16_bits(f.a[2] >> sh);
      a[g + 8][k + 8] = bf16_bits(f.a[3] >> sh);
      b[k][g] = bf16_bits(f.b[0] >> sh);
      b[k + 8][g] = bf16_bits(f.b[1] >> sh);
    }
  }
  const int g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    double s = 0.0;
    for (int k = 0; k < 16; ++k) s += static_cast<double>(a[row][k]) * b[k][col];
    c[i] += static_cast<float>(s);
  }
#endif
}

// The fragments of rows g and g + 8 from 4 codes each (bytes of r0, r1; kMask keeps a code's bits:
// 4 for Q4_K, 6 for Q6_K) and their activations v: codes (0, 2) and (1, 3) as bf16 pairs of 128 + q.
template <uint32_t kMask>
JQ_HD Frags code_frags(uint32_t r0, uint32_t r1, uint2 v) {
  const auto bf16 = [](uint32_t c) { return (c & kMask) | 0x43004300u; };
  return {{bf16(r0), bf16(r1), bf16(r0 >> 8), bf16(r1 >> 8)}, {v.x, v.y}};
}

// Activations (prepare_kernel): per column and block of 32, its 32 bf16 with elements 4i + 1 and
// 4i + 2 swapped, so that a lane's 4 consecutive code bytes (pairs 0, 2 and 1, 3 by a mask) meet
// their activations in one 8-byte load; per block, column and half its float32 sum (a float4 of
// columns 2t, 2t + 1: both halves of each).
struct Acts {
  const uint2* xb;  // 4 elements a uint2
  const float4* xs;
  int blocks;  // K / 32
  JQ_HD uint2 quad(int col, int block, int i) const {  // elements 4i .. 4i + 3
    return ldg(xb + (static_cast<size_t>(col) * blocks + block) * 8 + i);
  }
  JQ_HD float4 sums(int block, int t) const { return ldg(xs + 4 * static_cast<size_t>(block) + t); }
};

// The block of super-block sb (past the row's end: its last, loaded and not used) of the lane's row
// r of the 16 (g + 8 r, g = lane / 4).
JQ_HD size_t lane_block(int row0, int lane, int r, int nb, int sb) {
  return static_cast<size_t>(row0 + (lane >> 2) + 8 * r) * nb + (sb < nb ? sb : nb - 1);
}

// ggml's get_scale_min_k4 of sub-block j from a row's 3 scale words.
JQ_HD void scale_min_k4(const uint32_t (&s)[3], int j, float& sc, float& mn) {
  const int k = 8 * (j & 3);
  const uint32_t lo = j < 4 ? (s[0] >> k) & 63u : ((s[2] >> k) & 0xFu) | ((s[0] >> (k + 6)) & 3u) << 4;
  const uint32_t hi = j < 4 ? (s[1] >> k) & 63u : ((s[2] >> (k + 4)) & 0xFu) | ((s[1] >> (k + 6)) & 3u) << 4;
  sc = static_cast<float>(lo);
  mn = static_cast<float>(hi);
}

// Q4_K: super-block of 256 = 4 groups of 32 qs bytes, byte l of group G holding element l of
// sub-block 2G (low nibble) and of 2G + 1 (high). A lane holds qs bytes 8t .. 8t + 7 of group G of
// rows g, g + 8 (elements 8t .. 8t + 7 of both sub-blocks): for each sub-block two k16 tiles, codes
// (0, 2) and (1, 3) of bytes 8t .. (tile 0) and of 8t + 4 .. (tile 1).
struct Q4KBatch {
  using Args = Q4KArgs;
  struct W {
    uint2 q[2][4];  // [row][group]
    uint32_t s[2][3], d[2], dmin[2];  // d, dmin: float16 bits, converted where used
  };
  static JQ_HD W load(const Args& w, int row0, int nb, int sb, int lane) {
    W o;
    const int t = lane & 3;
    for (int r = 0; r < 2; ++r) {
      const size_t blk = lane_block(row0, lane, r, nb, sb);
      const uint2* q = reinterpret_cast<const uint2*>(w.qs + 8 * blk);
      for (int p = 0; p < 4; ++p) o.q[r][p] = ld_stream(q + 4 * p + t);
      for (int i = 0; i < 3; ++i) o.s[r][i] = ldg(w.scales + 3 * blk + i);
      o.d[r] = ld_half(w.d + blk);
      o.dmin[r] = ld_half(w.dmin + blk);
    }
    return o;
  }
  static JQ_HD Frags frags(const W& w, const Acts& x, int col, int sb, int j, int tile, int lane) {
    const int sh = 4 * (j & 1);
    const uint32_t r0 = (tile ? w.q[0][j >> 1].y : w.q[0][j >> 1].x) >> sh;
    const uint32_t r1 = (tile ? w.q[1][j >> 1].y : w.q[1][j >> 1].x) >> sh;
    return code_frags<0x000F000Fu>(r0, r1, x.quad(col, 8 * sb + j, 2 * (lane & 3) + tile));
  }
  static JQ_HD void step(const Args& w, const W& cur, const Acts& x, int nb, int row0, int sb, int lane,
                         float (&acc)[4]) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      float c[4] = {0.f, 0.f, 0.f, 0.f};
      for (int tile = 0; tile < 2; ++tile) {
        mma(frags(cur, x, g, sb, j, tile, lane),
            [&](int l) { return frags(load(w, row0, nb, sb, l), x, l >> 2, sb, j, tile, l); }, lane, c);
      }
      const float4 s = x.sums(8 * sb + j, t);
      const float s0 = s.x + s.y, s1 = s.z + s.w;  // columns 2t, 2t + 1
      for (int r = 0; r < 2; ++r) {
        float sc, mn;
        scale_min_k4(cur.s[r], j, sc, mn);
        const float ds = half_float(cur.d[r]) * sc, e = 128.f * ds + half_float(cur.dmin[r]) * mn;
        acc[2 * r] += ds * c[2 * r] - e * s0;
        acc[2 * r + 1] += ds * c[2 * r + 1] - e * s1;
      }
    }
  }
};

// Q6_K: element 128 h + 32 j + l (h < 2, j < 4, l < 32) is nibble j / 2 of ql byte 64 h + 32 (j % 2)
// + l with bits 2j, 2j + 1 of qh byte 32 h + l on top; int8 scale 8 h + 2 j + l / 16. Tile (h, j,
// l16) is the 16 elements of one scale; a lane's are l = 16 l16 + 4t .. + 3: one ql word (for j and
// j + 2) and one qh word.
struct Q6KBatch {
  using Args = Q6KArgs;
  struct W {
    uint32_t ql[2][4][2], qh[2][4];  // [row][2 h + l16][j % 2]
    uint4 sc[2];
    uint32_t d[2];
  };
  static JQ_HD W load(const Args& w, int row0, int nb, int sb, int lane) {
    W o;
    const int t = lane & 3;
    for (int r = 0; r < 2; ++r) {
      const size_t blk = lane_block(row0, lane, r, nb, sb);
      const uint32_t* ql = reinterpret_cast<const uint32_t*>(w.ql + 8 * blk);
      const uint32_t* qh = reinterpret_cast<const uint32_t*>(w.qh + 4 * blk);
      for (int hl = 0; hl < 4; ++hl) {
        const int h = hl >> 1, l16 = hl & 1;
        o.ql[r][hl][0] = ld_stream(ql + 16 * h + 4 * l16 + t);
        o.ql[r][hl][1] = ld_stream(ql + 16 * h + 8 + 4 * l16 + t);
        o.qh[r][hl] = ld_stream(qh + 8 * h + 4 * l16 + t);
      }
      o.sc[r] = ldg(reinterpret_cast<const uint4*>(w.scales) + blk);
      o.d[r] = ld_half(w.d + blk);
    }
    return o;
  }
  static JQ_HD uint32_t codes(const W& w, int r, int hl, int j) {
    return ((w.ql[r][hl][j & 1] >> (4 * (j >> 1))) & 0x0F0F0F0Fu) | (((w.qh[r][hl] >> (2 * j)) & 0x03030303u) << 4);
  }
  static JQ_HD Frags frags(const W& w, const Acts& x, int col, int sb, int hl, int j, int lane) {
    return code_frags<0x003F003Fu>(codes(w, 0, hl, j), codes(w, 1, hl, j),
                                   x.quad(col, 8 * sb + 4 * (hl >> 1) + j, 4 * (hl & 1) + (lane & 3)));
  }
  static JQ_HD void step(const Args& w, const W& cur, const Acts& x, int nb, int row0, int sb, int lane,
                         float (&acc)[4]) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float4 s = x.sums(8 * sb + 4 * h + j, t);
#pragma unroll
        for (int l16 = 0; l16 < 2; ++l16) {
          const int hl = 2 * h + l16, group = 8 * h + 2 * j + l16;
          float c[4] = {0.f, 0.f, 0.f, 0.f};
          mma(frags(cur, x, g, sb, hl, j, lane),
              [&](int l) { return frags(load(w, row0, nb, sb, l), x, l >> 2, sb, hl, j, l); }, lane, c);
          const float s0 = l16 ? s.y : s.x, s1 = l16 ? s.w : s.z;  // columns 2t, 2t + 1
          for (int r = 0; r < 2; ++r) {
            const int8_t sc = static_cast<int8_t>(comp(cur.sc[r], group >> 2) >> (8 * (group & 3)));
            const float ds = half_float(cur.d[r]) * static_cast<float>(sc);
            acc[2 * r] += ds * (c[2 * r] - 160.f * s0);
            acc[2 * r + 1] += ds * (c[2 * r + 1] - 160.f * s1);
          }
        }
      }
    }
  }
};

// One lane's share of its block's rows: part ``part`` of the S warps splitting K. Two sets of weights
// in turn, each loaded a step before its use, and scalars kept as loaded (converted where used): with
// `cur = next` after each step, or scalars converted when loaded, the loop waited at each step's end
// for the loads it had just issued (register moves and conversions of them; SASS and ncu, session
// 11: Q4_K at M = 8, 4096x14336, 33.2 -> 26.4 us). The first weights are read before waiting for
// the prepare kernel.
template <class B, int S>
JQ_HD void batch_lane(const typename B::Args& w, const Acts& x, int nb, int row0, int part, int lane, float (&acc)[4]) {
  for (int i = 0; i < 4; ++i) acc[i] = 0.f;
  typename B::W a = B::load(w, row0, nb, part, lane), b;
  wait_for_previous_kernel();
#pragma unroll 1
  for (int sb = part; sb < nb; sb += 2 * S) {
    b = B::load(w, row0, nb, sb + S, lane);
    B::step(w, a, x, nb, row0, sb, lane, acc);
    if (sb + S >= nb) break;
    a = B::load(w, row0, nb, sb + 2 * S, lane);
    B::step(w, b, x, nb, row0, sb + S, lane, acc);
  }
}

// Writes the lane's values (plus res's, if any): value i to row g + 8 (i / 2) of its block, column
// 2t + i % 2 where that is < m.
JQ_HD void store_lane(const float (&v)[4], int lane, int row0, int n, int m, const float* res, float* out) {
  for (int i = 0; i < 4; ++i) {
    const int col = 2 * (lane & 3) + (i & 1);
    const size_t o = static_cast<size_t>(col) * n + row0 + (lane >> 2) + 8 * (i >> 1);
    if (col < m) out[o] = res != nullptr ? v[i] + res[o] : v[i];
  }
}

template <class B, int S>
__global__ void __launch_bounds__(S * 32, 16 / S)  // 16 warps an SM: at most 128 registers
    batch_kernel(typename B::Args w, Acts x, const float* __restrict__ res, float* __restrict__ out, int n, int nb,
                 int m) {
  const int lane = threadIdx.x & 31, part = threadIdx.x / 32, row0 = 16 * blockIdx.x;
  float acc[4];
  batch_lane<B, S>(w, x, nb, row0, part, lane, acc);
  if constexpr (S > 1) {
    __shared__ float parts[S][32][4];
    for (int i = 0; i < 4; ++i) parts[part][lane][i] = acc[i];
    __syncthreads();
    if (part != 0) return;
    for (int q = 1; q < S; ++q) {
      for (int i = 0; i < 4; ++i) acc[i] += parts[q][lane][i];
    }
  }
  store_lane(acc, lane, row0, n, m, res, out);  // res: written before x (the prepare kernel waited for it)
}

JQ_HD int swapped(int e) { return (e & ~3) | ((e & 1) << 1) | ((e >> 1) & 1); }  // 4i + 1 <-> 4i + 2

// The activations of column (row of x) `col` < 8 of the product: the Prologue P of its row of x
// (zeros past M) in bf16, exact there: batch_cuda.py passes x as it is only in bf16, and a
// prologue's value rounded to bf16. A thread block a column and kPrepBlocks blocks of 32 of it,
// kPrepWarps warps, a lane an element; the norm's sum of squares of the whole row by each thread
// block (16 KB at K = 4096, from L2). Releases the product at once and waits for the kernel before
// it, which wrote x.
constexpr int kPrepWarps = 8, kPrepBlocks = 32;

JQ_HD size_t prepared_row(int p, int k) { return p == kSilu || p == kGeluTanh ? 2 * static_cast<size_t>(k) : k; }

template <class T, int P>
__global__ void __launch_bounds__(kPrepWarps * 32)
    prepare_kernel(const T* __restrict__ x, const float* __restrict__ weight, float eps, int64_t round, int m, int k,
                   __nv_bfloat16* __restrict__ xb, float* __restrict__ xs) {
  release_dependents();
  wait_for_previous_kernel();
  const int col = blockIdx.y, blocks = k / 32, lane = threadIdx.x % 32;
  const int last = min(static_cast<int>(blockIdx.x + 1) * kPrepBlocks, blocks);
  const T* row = x + (col < m ? col : 0) * prepared_row(P, k);
  float scale = 0.f;
  if constexpr (P == kRmsNorm) scale = norm_scale(sum_squares<kPrepWarps>(row, k), k, eps);
  for (int b = blockIdx.x * kPrepBlocks + threadIdx.x / 32; b < last; b += kPrepWarps) {
    const float v = col < m ? prologue_value<P>(row, weight, scale, round, k, 32 * static_cast<size_t>(b) + lane) : 0.f;
    const __nv_bfloat16 h = cast<__nv_bfloat16>(v);
    xb[(static_cast<size_t>(col) * blocks + b) * 32 + swapped(lane)] = h;
    const float s = warp_sum<16>(to_float(h));
    if (lane % 16 == 0) xs[(static_cast<size_t>(b) * 8 + col) * 2 + lane / 16] = s;
  }
}

// The warps splitting K (batch_cuda.WARPS): fn(std::integral_constant<int, S>{}), false if none.
template <class Fn>
bool with_warps(int64_t warps, Fn&& fn) {
  switch (warps) {
    case 1: return fn(std::integral_constant<int, 1>{}), true;
    case 2: return fn(std::integral_constant<int, 2>{}), true;
    case 4: return fn(std::integral_constant<int, 4>{}), true;
    case 8: return fn(std::integral_constant<int, 8>{}), true;
    default: return false;
  }
}

template <class B, int S>
void batch_host(const typename B::Args& w, const Acts& x, const float* res, float* out, int n, int nb, int m) {
  for (int row0 = 0; row0 < n; row0 += 16) {
    float total[32][4] = {};
    for (int part = 0; part < S; ++part) {
      for (int lane = 0; lane < 32; ++lane) {
        float acc[4];
        batch_lane<B, S>(w, x, nb, row0, part, lane, acc);
        for (int i = 0; i < 4; ++i) total[lane][i] += acc[i];
      }
    }
    for (int lane = 0; lane < 32; ++lane) store_lane(total[lane], lane, row0, n, m, res, out);
  }
}

// The format's 4 arrays (sorted by name), x, then the norm's weight [K] (f32, kRmsNorm) and a
// residual [M, N] (f32) added to the product, if any. x: [M <= 8, K] bf16 as it is, f32 [M, K] to
// norm, or [M, 2K] (f32 or bf16) [gate | up]. Results: out [M, N], then the prepared activations
// (scratch: bf16 [8, K] and f32 [K / 16, 8]).
template <class B>
ffi::Error batch(cudaStream_t stream, int64_t warps, int64_t prologue, int64_t round, float eps, ffi::AnyBuffer a0,
                 ffi::AnyBuffer a1, ffi::AnyBuffer a2, ffi::AnyBuffer a3, ffi::AnyBuffer x, ffi::RemainingArgs rest,
                 ffi::Result<ffi::Buffer<ffi::F32>> out, ffi::Result<ffi::Buffer<ffi::BF16>> xb,
                 ffi::Result<ffi::Buffer<ffi::F32>> xs) {
  const auto dims = a0.dimensions(), xdims = x.dimensions();  // d: [N, super-blocks]
  if (dims.size() != 2 || xdims.size() != 2) {
    return ffi::Error::InvalidArgument("batch_cuda: d must be [N, blocks], x [M, K]");
  }
  const int64_t n = dims[0], nb = dims[1], m = xdims[0], k = 256 * nb;
  const bool norm = prologue == kRmsNorm;
  if (m < 1 || m > 8 || n % 16 || static_cast<size_t>(xdims[1]) != prepared_row(prologue, k) ||
      out->element_count() != static_cast<size_t>(m * n) || xb->element_count() != static_cast<size_t>(8 * k) ||
      xs->element_count() != static_cast<size_t>(k / 2) || rest.size() < (norm ? 1u : 0u) ||
      rest.size() > (norm ? 2u : 1u)) {
    return ffi::Error::InvalidArgument("batch_cuda: operand shapes do not match");
  }
  const float* weight = nullptr;
  const float* res = nullptr;
  for (size_t i = 0; i < rest.size(); ++i) {
    const auto b = rest.get<ffi::AnyBuffer>(i);
    if (b.has_error()) return b.error();
    const size_t want = norm && i == 0 ? static_cast<size_t>(k) : static_cast<size_t>(m * n);
    if (b->element_type() != ffi::DataType::F32 || b->element_count() != want) {
      return ffi::Error::InvalidArgument("batch_cuda: the norm's weight must be f32 [K], the residual f32 [M, N]");
    }
    (norm && i == 0 ? weight : res) = static_cast<const float*>(b->untyped_data());
  }
  const int blocks = static_cast<int>(k / 32);
  auto* xbf = reinterpret_cast<__nv_bfloat16*>(xb->untyped_data());
  cudaError_t err = cudaErrorInvalidValue;  // as left where x's dtype takes no kernel here
  with_input(x, prologue, [&](const auto* typed, auto p) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(typed)>>;
    constexpr int P = decltype(p)::value;
    if constexpr (!std::is_same_v<T, __half> && (P != kAsIs || std::is_same_v<T, __nv_bfloat16>)) {
      err = launch_early(stream, dim3((blocks + kPrepBlocks - 1) / kPrepBlocks, 8), kPrepWarps * 32,
                         prepare_kernel<T, P>, typed, weight, eps, round, static_cast<int>(m), static_cast<int>(k),
                         xbf, xs->typed_data());
    }
  });
  if (err == cudaErrorInvalidValue) {
    return ffi::Error::InvalidArgument("batch_cuda: x must be bf16 as it is, f32 to norm, f32 or bf16 gated");
  }
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("batch_cuda prepare: ") + cudaGetErrorString(err));
  const void* a[] = {a0.untyped_data(), a1.untyped_data(), a2.untyped_data(), a3.untyped_data()};
  const Acts acts{reinterpret_cast<const uint2*>(xbf), reinterpret_cast<const float4*>(xs->typed_data()), blocks};
  const bool known = with_warps(warps, [&](auto sw) {
    constexpr int S = decltype(sw)::value;
    err = launch_early(stream, static_cast<int>(n / 16), S * 32, batch_kernel<B, S>, B::Args::from(a), acts, res,
                       out->typed_data(), static_cast<int>(n), static_cast<int>(nb), static_cast<int>(m));
  });
  if (!known) return ffi::Error::InvalidArgument("batch_cuda: no kernel for this many warps");
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("batch_cuda: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

}  // namespace

#define JQ_BATCH_HANDLER(name, B)                                                                         \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, batch<B>,                                                           \
                                ffi::Ffi::Bind()                                                          \
                                    .Ctx<ffi::PlatformStream<cudaStream_t>>()                             \
                                    .Attr<int64_t>("warps")                                               \
                                    .Attr<int64_t>("prologue")                                            \
                                    .Attr<int64_t>("round")                                               \
                                    .Attr<float>("eps")                                                   \
                                    .Arg<ffi::AnyBuffer>()                                                \
                                    .Arg<ffi::AnyBuffer>()                                                \
                                    .Arg<ffi::AnyBuffer>()                                                \
                                    .Arg<ffi::AnyBuffer>()                                                \
                                    .Arg<ffi::AnyBuffer>()                                                \
                                    .RemainingArgs()                                                      \
                                    .Ret<ffi::Buffer<ffi::F32>>()                                         \
                                    .Ret<ffi::Buffer<ffi::BF16>>()                                        \
                                    .Ret<ffi::Buffer<ffi::F32>>());

JQ_BATCH_HANDLER(jq_batch_q4_k, Q4KBatch)
JQ_BATCH_HANDLER(jq_batch_q6_k, Q6KBatch)

// The batch kernels on the CPU (tests): x (float32; as it is, bf16 values) through the prepare
// kernel's arithmetic (its Prologue, the norm's sum in another order), then the lanes one by one
// with an emulated MMA into out [M, N] (+ res, nullable). 0, or 1 for an unknown format, 2 for an
// unknown number of warps or more than 8 rows, 3 for an unknown prologue.
extern "C" int jq_batch_host(const char* fmt, int64_t warps, const void* const* arrays, int64_t prologue,
                             int64_t round, const float* x, const float* weight, float eps, const float* res,
                             float* out, int n, int nb, int m) {
  if (m < 1 || m > 8) return 2;
  const int k = 256 * nb, blocks = k / 32;
  std::vector<uint16_t> xb(static_cast<size_t>(8) * k);
  std::vector<float> xs(static_cast<size_t>(blocks) * 16);
  const bool known_prologue = with_prologue(prologue, [&](auto p) {
    constexpr int P = decltype(p)::value;
    for (int col = 0; col < 8; ++col) {
      const float* row = x + (col < m ? col : 0) * prepared_row(P, k);
      float sum_sq = 0.f;
      for (int i = 0; P == kRmsNorm && i < k; ++i) sum_sq += row[i] * row[i];
      const float scale = norm_scale(sum_sq, k, eps);
      for (int b = 0; b < blocks; ++b) {
        float half[2] = {0.f, 0.f};
        for (int e = 0; e < 32; ++e) {
          const size_t i = 32 * static_cast<size_t>(b) + e;
          const float v = col < m ? prologue_value<P>(row, weight, scale, round, k, i) : 0.f;
          const __nv_bfloat16 h = cast<__nv_bfloat16>(v);
          memcpy(&xb[(static_cast<size_t>(col) * blocks + b) * 32 + swapped(e)], &h, 2);
          half[e / 16] += to_float(h);
        }
        for (int i = 0; i < 2; ++i) xs[(static_cast<size_t>(b) * 8 + col) * 2 + i] = half[i];
      }
    }
  });
  if (!known_prologue) return 3;
  const Acts acts{reinterpret_cast<const uint2*>(xb.data()), reinterpret_cast<const float4*>(xs.data()), blocks};
  const auto on = [&](auto format) {
    using B = decltype(format);
    const bool known = with_warps(warps, [&](auto sw) {
      batch_host<B, decltype(sw)::value>(B::Args::from(arrays), acts, res, out, n, nb, m);
    });
    return known ? 0 : 2;
  };
  const std::string name(fmt);
  return name == "Q4_K" ? on(Q4KBatch{}) : name == "Q6_K" ? on(Q6KBatch{}) : 1;
}
