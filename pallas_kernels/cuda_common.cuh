// What the CUDA kernels' files share (cuda_lib.py compiles them into one library): headers, the
// JQ_HD marker of code that runs on the device and, in the CPU tests, on the host, warp reductions,
// cached loads and the programmatic dependent launch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#define JQ_HD __host__ __device__ __forceinline__

constexpr unsigned kAll = 0xFFFFFFFFu;  // every lane of a warp

// The sum and the max of v over a warp's lanes (warp_sum<16>: over each half warp), in every lane
// (an xor butterfly: each lane adds the same pairs, so all hold the same float).
template <int kLanes = 32, class T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kLanes / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kAll, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kAll, v, o));
  return v;
}

template <class T>
JQ_HD T ldg(const T* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}

// A float16 as its 16 bits, for a loop to carry and convert where used (half_float).
JQ_HD uint32_t ld_half(const __half* p) { return ldg(reinterpret_cast<const unsigned short*>(p)); }

JQ_HD float half_float(uint32_t bits) {
  __half_raw r;
  r.x = static_cast<unsigned short>(bits);
  return __half2float(__half(r));
}

JQ_HD uint4 ld_stream(const uint4* p) {  // read once: keep L1 for the activations
#ifdef __CUDA_ARCH__
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
#else
  return *p;
#endif
}

JQ_HD uint2 ld_stream(const uint2* p) {
#ifdef __CUDA_ARCH__
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
#else
  return *p;
#endif
}

JQ_HD uint32_t ld_stream(const uint32_t* p) {
#ifdef __CUDA_ARCH__
  uint32_t v;
  asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
#else
  return *p;
#endif
}

JQ_HD uint32_t comp(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// The QTensor arrays of Q4_K and Q6_K in sorted field order (as the FFI calls pass them).
struct Q4KArgs {
  const __half* d;
  const __half* dmin;
  const uint4* qs;
  const uint32_t* scales;
  static Q4KArgs from(const void* const* a) {
    return {static_cast<const __half*>(a[0]), static_cast<const __half*>(a[1]), static_cast<const uint4*>(a[2]),
            static_cast<const uint32_t*>(a[3])};
  }
};

struct Q6KArgs {
  const __half* d;
  const uint4* qh;
  const uint4* ql;
  const int8_t* scales;
  static Q6KArgs from(const void* const* a) {
    return {static_cast<const __half*>(a[0]), static_cast<const uint4*>(a[1]), static_cast<const uint4*>(a[2]),
            static_cast<const int8_t*>(a[3])};
  }
};

// Programmatic dependent launch (sm_90): a kernel launched with launch_early() may start while the
// kernel before it in the stream runs (once that one has released its dependents, or ended), read
// what the previous kernel cannot have written (the weights), and waits before anything else.
JQ_HD void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

JQ_HD void release_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// JAXQUANT_CUDA_PDL=0 launches every kernel after the previous one has ended (for comparison).
template <class... Params, class... Args>
cudaError_t launch_early(cudaStream_t stream, dim3 grid, dim3 block, void (*kernel)(Params...), Args... args) {
  static const bool early = [] {
    const char* v = std::getenv("JAXQUANT_CUDA_PDL");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = early ? 1 : 0;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...);
}

JQ_HD float to_float(float v) { return v; }
JQ_HD float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
JQ_HD float to_float(__half v) { return __half2float(v); }

template <class T>  // rounded to nearest even
JQ_HD T cast(float v);
template <>
JQ_HD __nv_bfloat16 cast(float v) {
  return __float2bfloat16_rn(v);
}
template <>
JQ_HD __half cast(float v) {
  return __float2half_rn(v);
}

// A product's input computed from the call's x (gemv_cuda.PROLOGUES, as ops.Activation defines it):
// x as it is; x's RMS norm times a weight, rounded to the compute dtype (XLA's two kernels of a
// norm); or the gated unit act(gate) * up of x = [gate | up] (XLA's one kernel). The gemv's and the
// batch kernel's prepare kernels compute it before they quantize or lay out the activations.

enum Prologue : int64_t { kAsIs = 0, kRmsNorm = 1, kSilu = 2, kGeluTanh = 3 };
enum Rounding : int64_t { kToF32 = 0, kToBF16 = 1, kToF16 = 2 };

// The prologues by code: fn(std::integral_constant<int, P>{}), false if none.
template <class Fn>
bool with_prologue(int64_t prologue, Fn&& fn) {
  switch (prologue) {
    case kAsIs: fn(std::integral_constant<int, kAsIs>{}); return true;
    case kRmsNorm: fn(std::integral_constant<int, kRmsNorm>{}); return true;
    case kSilu: fn(std::integral_constant<int, kSilu>{}); return true;
    case kGeluTanh: fn(std::integral_constant<int, kGeluTanh>{}); return true;
    default: return false;
  }
}

// fn(x's data as const T*, std::integral_constant<int, P>{}) for x's element type T (f32, bf16 or
// f16) and the prologue code P, but not for a norm of x other than f32 (the norms take f32): the
// prepare kernels' instances, chosen by a call's operands. False where there is none.
template <class Fn>
bool with_input(const ffi::AnyBuffer& x, int64_t prologue, Fn&& fn) {
  bool found = false;
  const auto typed = [&](const auto* data) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(data)>>;
    with_prologue(prologue, [&](auto p) {
      if constexpr (decltype(p)::value != kRmsNorm || std::is_same_v<T, float>) {
        fn(data, p);
        found = true;
      }
    });
  };
  switch (x.element_type()) {
    case ffi::DataType::F32: typed(static_cast<const float*>(x.untyped_data())); break;
    case ffi::DataType::BF16: typed(static_cast<const __nv_bfloat16*>(x.untyped_data())); break;
    case ffi::DataType::F16: typed(static_cast<const __half*>(x.untyped_data())); break;
    default: break;
  }
  return found;
}

JQ_HD float rounded(float v, int64_t to) {  // to the compute dtype and back, as XLA's cast
  return to == kToBF16 ? to_float(cast<__nv_bfloat16>(v)) : to == kToF16 ? to_float(cast<__half>(v)) : v;
}

JQ_HD float norm_scale(float sum_sq, int k, float eps) {  // rsqrt(mean(x * x) + eps)
#ifdef __CUDA_ARCH__
  return rsqrtf(sum_sq / static_cast<float>(k) + eps);
#else
  return 1.0f / sqrtf(sum_sq / static_cast<float>(k) + eps);
#endif
}

template <int P>
JQ_HD float gated(float g, float u) {  // jax.nn.silu / gelu(approximate=True) of g, times u
  if constexpr (P == kSilu) {
    return g * (1.0f / (1.0f + expf(-g))) * u;
  } else {
    return g * (0.5f * (1.0f + tanhf(0.7978845608f * (g + 0.044715f * (g * g * g))))) * u;
  }
}

// The product's input i (of k): x's own (kAsIs), or the prologue's, rounded to ``round``. kRmsNorm
// takes float32 x, its weight and the norm's scale.
template <int P, class T>
JQ_HD float prologue_value(const T* __restrict__ x, const float* __restrict__ weight, float scale, int64_t round,
                           int k, size_t i) {
  const float v = to_float(ldg(x + i));
  if constexpr (P == kRmsNorm) {
    return rounded(v * scale * ldg(weight + i), round);
  } else if constexpr (P == kAsIs) {
    return v;
  } else {
    return rounded(gated<P>(v, to_float(ldg(x + k + i))), round);
  }
}

// The sum of x[0 .. k)^2 (16-byte aligned, k % 4 == 0) in every thread of a block of kWarps warps:
// a norm's, summed by each thread block that needs it rather than by a kernel of its own.
template <int kWarps>
__device__ float sum_squares(const float* __restrict__ x, int k) {
  __shared__ float part[kWarps];
  float s = 0.f;
  for (int i = 4 * threadIdx.x; i < k; i += 4 * kWarps * 32) {
    const float4 v = ldg(reinterpret_cast<const float4*>(x + i));
    s += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
  }
  s = warp_sum(s);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = s;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += part[w];
  return total;
}

}  // namespace
