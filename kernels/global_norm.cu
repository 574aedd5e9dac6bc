// Sum of squares for the global gradient norm, deterministic: each block writes one partial
// (fixed grid, fixed per-thread striding, tree reduction), and the host adds the partials in f64.
#include "common.cuh"

extern "C" __global__ void sum_squares_f32(float* partial, const float* x, size_t len) {
    float acc = 0.0f;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < len; i += (size_t)gridDim.x * blockDim.x)
        acc += x[i] * x[i];
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

extern "C" __global__ void sum_squares_bf16(float* partial, const __nv_bfloat16* x, size_t len) {
    float acc = 0.0f;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < len; i += (size_t)gridDim.x * blockDim.x) {
        float v = bf(x[i]);
        acc += v * v;
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}
