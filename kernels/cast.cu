// Precision casts between the fp32 master copies and the bf16 working copies.
#include "common.cuh"

extern "C" __global__ void cast_f32_to_bf16(__nv_bfloat16* out, const float* in, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = __float2bfloat16_rn(in[i]);
}

extern "C" __global__ void cast_bf16_to_f32(float* out, const __nv_bfloat16* in, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = __bfloat162float(in[i]);
}
