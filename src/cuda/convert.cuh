// Internal: float32 <-> the token dtype (float16 / bfloat16); to the token dtype
// rounds to nearest even, to float32 is exact.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace qmoe::cuda {

template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

}  // namespace qmoe::cuda
