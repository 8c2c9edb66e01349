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

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#define JQ_HD __host__ __device__ __forceinline__

constexpr unsigned kAll = 0xFFFFFFFFu;  // every lane of a warp

// The sum and the max of v over a warp's lanes, in every lane (an xor butterfly: each lane adds the
// same pairs, so all hold the same float).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kAll, v, o);
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

}  // namespace
