// Decode attention in CUDA (one new query of one sequence over its KV cache), called from JAX
// through the XLA FFI: the rope of the new query and key, the new key and value written into the
// cache, scores, softmax and the weighted sum of values, in place of XLA's rope of q, its two cache
// updates (k's with its rope), cuDNN's fused attention and the memset cuDNN launches with it
// (1.0 + 1.1 + 1.0 + 4.3 + 0.9 us a layer of the 8B shape on the H200, NOTES-gpu.md session 10).
//
// Flash-decoding: the cache's slots in chunks of kChunk, a thread block a (KV head, chunk), a warp
// a query head of the KV head's group. A lane takes the chunk's slots lane, lane + 32 (a whole key
// row each: the query is in shared memory), the warp the chunk's max and sum of exponentials; for
// the values a lane owns D / 32 consecutive dimensions. Each block writes its heads' (max, sum,
// unnormalised output); a second kernel, launched early, combines a head's chunks. The position is
// on the device: the grid covers the whole cache and chunks past the position return at once. The
// block whose chunk holds the position writes the new key and value of its KV head first (the
// caches are read with coherent loads: they are written in the same kernel).
//
// The pieces are host code too (JQ_HD): jq_attention_host runs them warp by warp on the CPU, the
// lanes' reductions as loops (tests/test_attention_cuda.py).

#include "cuda_common.cuh"

namespace {

constexpr int kChunk = 64;     // cache slots a thread block
constexpr int kMaxGroup = 16;  // query heads a KV head (warps a block)

struct Geometry {
  int heads, kv_heads, slots, rope_pairs, chunks;
  bool neox;
  float scale;
};

// The last slot attended to: the position (slots 0 .. pos hold the sequence), within the cache; a
// padding position (< 0) attends to slot 0, as cuDNN's path (sequence length max(pos + 1, 1)).
JQ_HD int last_slot(int pos, int slots) { return pos < 0 ? 0 : pos < slots ? pos : slots - 1; }

// The slot the new key and value go to: the position's, padding's (< 0) the last, as
// self_attention's update (whose start index XLA clamps into the cache).
JQ_HD int write_slot(int pos, int slots) { return pos < 0 || pos >= slots ? slots - 1 : pos; }

// Element d of a head's row (D floats) roped by the position (NEOX pairs d with d +- R / 2 below
// R = 2 rope_pairs; NORM pairs 2i with 2i + 1) and rounded to the cache's dtype T, as XLA rounds
// q before its product with the keys and k into the cache.
template <class T>
JQ_HD float roped(const float* __restrict__ row, const float* __restrict__ inv_freq, int pos, const Geometry& g,
                  int d) {
  float v = row[d];
  if (d < 2 * g.rope_pairs) {
    const int half = g.rope_pairs;
    const bool second = g.neox ? d >= half : d % 2 == 1;
    const int i = g.neox ? d % half : d / 2, other = g.neox ? (second ? d - half : d + half) : d ^ 1;
    const float angle = static_cast<float>(pos) * inv_freq[i], c = cosf(angle), s = sinf(angle);
    v = second ? v * c + row[other] * s : v * c - row[other] * s;
  }
  return to_float(cast<T>(v));
}

// The new key (roped) and value of a KV head into the cache's slot, elements from `from` by `step`.
template <class T, int D>
JQ_HD void write_new(const float* __restrict__ k_new, const float* __restrict__ v_new, T* k, T* v,
                     const float* __restrict__ inv_freq, int pos, const Geometry& g, int kv_head, int from, int step) {
  const size_t at = (static_cast<size_t>(write_slot(pos, g.slots)) * g.kv_heads + kv_head) * D;
  for (int d = from; d < D; d += step) {
    k[at + d] = cast<T>(roped<T>(k_new + static_cast<size_t>(kv_head) * D, inv_freq, pos, g, d));
    v[at + d] = cast<T>(v_new[static_cast<size_t>(kv_head) * D + d]);
  }
}

// The scaled score of a key row (D elements of T, 16-byte aligned) against the query qs.
template <class T, int D>
JQ_HD float score(const float* qs, const T* k, float scale) {
  float acc = 0.f;
#pragma unroll
  for (int d = 0; d < D; d += 8) {
    const uint4 u = *reinterpret_cast<const uint4*>(k + d);
    T e[8];
    memcpy(e, &u, sizeof(u));
#pragma unroll
    for (int i = 0; i < 8; ++i) acc += qs[d + i] * to_float(e[i]);
  }
  return acc * scale;
}

// A lane's D / 32 consecutive dimensions of a value row (one load).
template <class T, int D>
struct ValuePart {
  T e[D / 32];
};

template <class T, int D>
JQ_HD ValuePart<T, D> value_part(const T* v, int lane) {
  constexpr int kBytes = D / 32 * sizeof(T);
  ValuePart<T, D> x;
  if constexpr (kBytes == 16) {
    const uint4 u = reinterpret_cast<const uint4*>(v)[lane];
    memcpy(x.e, &u, sizeof(u));
  } else if constexpr (kBytes == 8) {
    const uint2 u = reinterpret_cast<const uint2*>(v)[lane];
    memcpy(x.e, &u, sizeof(u));
  } else {
    const uint32_t u = reinterpret_cast<const uint32_t*>(v)[lane];
    memcpy(x.e, &u, sizeof(u));
  }
  return x;
}

template <class T, int D>
JQ_HD void add_value(float p, const ValuePart<T, D>& x, float (&o)[D / 32]) {
#pragma unroll
  for (int i = 0; i < D / 32; ++i) o[i] += p * to_float(x.e[i]);
}

template <class T, int D>
JQ_HD const T* cache_row(const T* cache, const Geometry& g, int slot, int kv_head) {
  return cache + (static_cast<size_t>(slot) * g.kv_heads + kv_head) * D;
}

// Element d of a head's output from its first `live` chunks' (max, sum) and outputs.
JQ_HD float combined(const float* __restrict__ o, const float2* __restrict__ ml, int live, int dim, int d) {
  float m = -INFINITY;
  for (int c = 0; c < live; ++c) m = fmaxf(m, ml[c].x);
  float num = 0.f, den = 0.f;
  for (int c = 0; c < live; ++c) {
    const float w = expf(ml[c].x - m);
    num += w * o[static_cast<size_t>(c) * dim + d];
    den += w * ml[c].y;
  }
  return num / den;
}

template <class T, int D>
__global__ void __launch_bounds__(kMaxGroup * 32)
    attend_kernel(const float* __restrict__ q, const float* __restrict__ k_new, const float* __restrict__ v_new, T* k,
                  T* v, const int* __restrict__ position, const float* __restrict__ inv_freq, Geometry g,
                  float* __restrict__ part_o, float2* __restrict__ part_ml) {
  release_dependents();  // the combine kernel may launch; it waits for this one to end
  wait_for_previous_kernel();
  const int kv_head = blockIdx.x, chunk = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int pos = *position, last = last_slot(pos, g.slots), first = chunk * kChunk;
  if (first > last) return;
  if (chunk == last / kChunk) {  // the block that reads the new slot writes it
    write_new<T, D>(k_new, v_new, k, v, inv_freq, pos, g, kv_head, threadIdx.x, blockDim.x);
    __syncthreads();
  }
  const int h = kv_head * (g.heads / g.kv_heads) + warp;
  __shared__ float qs[kMaxGroup][D];
  for (int d = lane; d < D; d += 32) qs[warp][d] = roped<T>(q + static_cast<size_t>(h) * D, inv_freq, pos, g, d);
  __syncwarp();
  constexpr int J = kChunk / 32;
  float p[J], m = -INFINITY;
#pragma unroll
  for (int j = 0; j < J; ++j) {
    const int s = first + lane + 32 * j;
    p[j] = s <= last ? score<T, D>(qs[warp], cache_row<T, D>(k, g, s, kv_head), g.scale) : -INFINITY;
    m = fmaxf(m, p[j]);
  }
  m = warp_max(m);
  float l = 0.f;
#pragma unroll
  for (int j = 0; j < J; ++j) {
    p[j] = first + lane + 32 * j <= last ? expf(p[j] - m) : 0.f;
    l += p[j];
  }
  l = warp_sum(l);
  float out[D / 32] = {};
  const int n = last - first + 1 < kChunk ? last - first + 1 : kChunk;
  constexpr int kBatch = 8;  // value rows loaded together before their products (else one L2 trip a slot)
#pragma unroll
  for (int j = 0; j < J; ++j) {
    for (int t0 = 0; t0 < 32 && 32 * j + t0 < n; t0 += kBatch) {
      ValuePart<T, D> x[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {  // past the chunk's end: its last row again, weighted 0
        const int t = 32 * j + t0 + u < n ? 32 * j + t0 + u : n - 1;
        x[u] = value_part<T, D>(cache_row<T, D>(v, g, first + t, kv_head), lane);
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const float w = __shfl_sync(kAll, p[j], t0 + u);
        if (32 * j + t0 + u < n) add_value<T, D>(w, x[u], out);
      }
    }
  }
  const size_t at = static_cast<size_t>(h) * g.chunks + chunk;
#pragma unroll
  for (int i = 0; i < D / 32; ++i) part_o[at * D + lane * (D / 32) + i] = out[i];
  if (lane == 0) part_ml[at] = make_float2(m, l);
}

template <class T, int D>
__global__ void __launch_bounds__(D) combine_kernel(const float* __restrict__ part_o, const float2* __restrict__ ml,
                                                    const int* __restrict__ position, Geometry g, T* __restrict__ out) {
  release_dependents();
  wait_for_previous_kernel();
  const int h = blockIdx.x, live = last_slot(*position, g.slots) / kChunk + 1;
  const size_t at = static_cast<size_t>(h) * g.chunks;
  out[static_cast<size_t>(h) * D + threadIdx.x] = cast<T>(combined(part_o + at * D, ml + at, live, D, threadIdx.x));
}

// The head dims built: fn(std::integral_constant<int, D>{}), false if none.
template <class Fn>
bool with_dim(int64_t dim, Fn&& fn) {
  switch (dim) {
    case 64: fn(std::integral_constant<int, 64>{}); return true;
    case 128: fn(std::integral_constant<int, 128>{}); return true;
    case 256: fn(std::integral_constant<int, 256>{}); return true;
    default: return false;
  }
}

// The cache's dtypes: fn(T{}), false if none.
template <class Fn>
bool with_cache_type(ffi::DataType type, Fn&& fn) {
  switch (type) {
    case ffi::DataType::BF16: fn(__nv_bfloat16{}); return true;
    case ffi::DataType::F16: fn(__half{}); return true;
    default: return false;
  }
}

// q [H * D], the new key and value [KV * D] (f32, q and k before their rope), the caches
// [..., S, KV, D] (bf16 or f16), the position (s32, one), the rope's frequencies [R / 2] (f32).
// Results: the output [H * D] in the cache's dtype, the chunks' outputs [H, chunks, D] and (max,
// sum) [H, chunks, 2] (f32 scratch), and the caches (aliased to the operands: the new slot written
// in place).
ffi::Error attend(cudaStream_t stream, float scale, int64_t neox, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_new,
                  ffi::Buffer<ffi::F32> v_new, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::Buffer<ffi::S32> position,
                  ffi::Buffer<ffi::F32> inv_freq, ffi::Result<ffi::AnyBuffer> out,
                  ffi::Result<ffi::Buffer<ffi::F32>> part_o, ffi::Result<ffi::Buffer<ffi::F32>> part_ml,
                  ffi::Result<ffi::AnyBuffer> k_out, ffi::Result<ffi::AnyBuffer> v_out) {
  const auto dims = k.dimensions();
  if (dims.size() < 3) return ffi::Error::InvalidArgument("attention_cuda: the cache must be [..., S, KV, D]");
  const int64_t slots = dims[dims.size() - 3], kv = dims[dims.size() - 2], dim = dims[dims.size() - 1];
  const int64_t heads = dim ? static_cast<int64_t>(q.element_count()) / dim : 0;
  const int64_t chunks = (slots + kChunk - 1) / kChunk;
  if (kv < 1 || heads % kv || heads / kv > kMaxGroup || heads * dim != static_cast<int64_t>(q.element_count()) ||
      k_new.element_count() != static_cast<size_t>(kv * dim) || v_new.element_count() != k_new.element_count() ||
      v.element_count() != k.element_count() || v.element_type() != k.element_type() ||
      out->element_type() != k.element_type() || out->element_count() != q.element_count() ||
      k_out->untyped_data() != k.untyped_data() || v_out->untyped_data() != v.untyped_data() ||
      position.element_count() != 1 || 2 * static_cast<int64_t>(inv_freq.element_count()) > dim ||
      part_o->element_count() != static_cast<size_t>(heads * chunks * dim) ||
      part_ml->element_count() != static_cast<size_t>(heads * chunks * 2) ||
      reinterpret_cast<uintptr_t>(k.untyped_data()) % 16 || reinterpret_cast<uintptr_t>(v.untyped_data()) % 16) {
    return ffi::Error::InvalidArgument("attention_cuda: operand shapes do not match (or the caches not aliased)");
  }
  const Geometry g{static_cast<int>(heads), static_cast<int>(kv), static_cast<int>(slots),
                   static_cast<int>(inv_freq.element_count()), static_cast<int>(chunks), neox != 0, scale};
  cudaError_t err = cudaSuccess;
  bool built = false;
  const bool known = with_cache_type(k.element_type(), [&](auto t) {
    using T = decltype(t);
    built = with_dim(dim, [&](auto d) {
      constexpr int D = decltype(d)::value;
      auto* ml = reinterpret_cast<float2*>(part_ml->typed_data());
      err = launch_early(stream, dim3(kv, chunks), dim3(32 * (heads / kv)), attend_kernel<T, D>, q.typed_data(),
                         k_new.typed_data(), v_new.typed_data(), static_cast<T*>(k_out->untyped_data()),
                         static_cast<T*>(v_out->untyped_data()), position.typed_data(), inv_freq.typed_data(), g,
                         part_o->typed_data(), ml);
      if (err == cudaSuccess) {
        err = launch_early(stream, dim3(heads), dim3(D), combine_kernel<T, D>, part_o->typed_data(), ml,
                           position.typed_data(), g, static_cast<T*>(out->untyped_data()));
      }
    });
  });
  if (!known) return ffi::Error::InvalidArgument("attention_cuda: the cache must be bf16 or f16");
  if (!built) return ffi::Error::InvalidArgument("attention_cuda: the head dim must be 64, 128 or 256");
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("attention_cuda: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

// The two kernels on the host, a warp's lanes one after another (their sums in another order).
template <class T, int D>
void attend_host(const float* q, const float* k_new, const float* v_new, T* k, T* v, int pos, const float* inv_freq,
                 const Geometry& g, T* out) {
  const int last = last_slot(pos, g.slots), live = last / kChunk + 1, group = g.heads / g.kv_heads;
  for (int kv_head = 0; kv_head < g.kv_heads; ++kv_head) {
    write_new<T, D>(k_new, v_new, k, v, inv_freq, pos, g, kv_head, 0, 1);
  }
  float* part_o = new float[static_cast<size_t>(live) * D];
  float2* part_ml = new float2[live];
  for (int h = 0; h < g.heads; ++h) {
    float qs[D];
    for (int d = 0; d < D; ++d) qs[d] = roped<T>(q + static_cast<size_t>(h) * D, inv_freq, pos, g, d);
    for (int c = 0; c < live; ++c) {
      const int first = c * kChunk, n = last - first + 1 < kChunk ? last - first + 1 : kChunk;
      float p[kChunk], m = -INFINITY, l = 0.f;
      for (int t = 0; t < n; ++t) {
        m = fmaxf(m, p[t] = score<T, D>(qs, cache_row<T, D>(k, g, first + t, h / group), g.scale));
      }
      for (int t = 0; t < n; ++t) l += p[t] = expf(p[t] - m);
      for (int lane = 0; lane < 32; ++lane) {
        float o[D / 32] = {};
        for (int t = 0; t < n; ++t) {
          add_value<T, D>(p[t], value_part<T, D>(cache_row<T, D>(v, g, first + t, h / group), lane), o);
        }
        for (int i = 0; i < D / 32; ++i) part_o[static_cast<size_t>(c) * D + lane * (D / 32) + i] = o[i];
      }
      part_ml[c] = make_float2(m, l);
    }
    for (int d = 0; d < D; ++d) out[static_cast<size_t>(h) * D + d] = cast<T>(combined(part_o, part_ml, live, D, d));
  }
  delete[] part_o;
  delete[] part_ml;
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jq_decode_attention, attend,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("neox")
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

// The attention on the CPU (tests), caches [S, KV, D] as 16-bit words of `type` ("bf16", "f16"),
// written in place: 0, or 1 for an unknown dtype, 2 for an unknown head dim.
extern "C" int jq_attention_host(const char* type, int dim, const float* q, const float* k_new, const float* v_new,
                                 void* k, void* v, int pos, const float* inv_freq, int rope_pairs, int heads,
                                 int kv_heads, int slots, int neox, float scale, void* out) {
  const Geometry g{heads, kv_heads, slots, rope_pairs, (slots + kChunk - 1) / kChunk, neox != 0, scale};
  const std::string_view name(type);
  const ffi::DataType t = name == "bf16" ? ffi::DataType::BF16
                          : name == "f16"  ? ffi::DataType::F16
                                           : ffi::DataType::F32;
  int rc = 2;
  const bool known = with_cache_type(t, [&](auto e) {
    using T = decltype(e);
    rc = with_dim(dim, [&](auto d) {
           attend_host<T, decltype(d)::value>(q, k_new, v_new, static_cast<T*>(k), static_cast<T*>(v), pos, inv_freq,
                                              g, static_cast<T*>(out));
         })
             ? 0
             : 2;
  });
  return known ? rc : 1;
}
