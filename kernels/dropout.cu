// Inverted dropout with the counter-based mask of src/rng.rs: element i is dropped when
// uniform(seed, i) < p. The same call is its own backward.
#include "common.cuh"

extern "C" __global__ void dropout_bf16(__nv_bfloat16* x, size_t len, float p, float scale, uint64_t seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < len; i += (size_t)gridDim.x * blockDim.x)
        x[i] = uniform(seed, i) < p ? to_bf(0.0f) : to_bf(bf(x[i]) * scale);
}

extern "C" __global__ void dropout_f32(float* x, size_t len, float p, float scale, uint64_t seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < len; i += (size_t)gridDim.x * blockDim.x)
        x[i] = uniform(seed, i) < p ? 0.0f : x[i] * scale;
}
