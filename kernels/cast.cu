// Precision casts between the fp32 master copies and the bf16 working copies. 16-byte accesses
// over len / VEC groups, then the last len % VEC elements one per thread; 32-bit indices (the
// host checks len fits).
#include "common.cuh"

extern "C" __global__ void cast_f32_to_bf16(__nv_bfloat16* out, const float* in, int n) {
    int groups = n / VEC, stride = gridDim.x * blockDim.x;
    int t0 = blockIdx.x * blockDim.x + threadIdx.x;
    for (int t = t0; t < groups; t += stride) {
        float v[VEC];
        load8(v, in + t * VEC);
        store8(out + t * VEC, v);
    }
    for (int i = groups * VEC + t0; i < n; i += stride) out[i] = __float2bfloat16_rn(in[i]);
}

extern "C" __global__ void cast_bf16_to_f32(float* out, const __nv_bfloat16* in, int n) {
    int groups = n / VEC, stride = gridDim.x * blockDim.x;
    int t0 = blockIdx.x * blockDim.x + threadIdx.x;
    for (int t = t0; t < groups; t += stride) {
        float v[VEC];
        load8(v, in + t * VEC);
        store8(out + t * VEC, v);
    }
    for (int i = groups * VEC + t0; i < n; i += stride) out[i] = __bfloat162float(in[i]);
}
