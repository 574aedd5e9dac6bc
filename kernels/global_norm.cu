// Sum of squares for the global gradient norm, deterministic: each block writes one partial
// (fixed grid, fixed per-thread striding, tree reduction), and `sum_split` adds the partials in
// double on the device; the loss sums go through `sum_split` too. The host reads the results
// once per optimizer step.
#include "common.cuh"

__device__ __forceinline__ float as_float(float v) { return v; }
__device__ __forceinline__ float as_float(__nv_bfloat16 v) { return bf(v); }

// 16-byte loads (VEC elements each) from an aligned start, then the scalar tail: the grid is
// several blocks per SM (global_norm.rs, `sum_squares_blocks`), so that enough loads are in
// flight to reach the memory's bandwidth. (128 blocks of scalar loads, as before, ran at a
// tenth of it on an H200: 15.6 ms per 1.3B step for 5 GB.)
template <typename T>
__device__ __forceinline__ void sum_squares_impl(float* partial, const T* x, size_t len) {
    const size_t tid = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    float acc = 0.0f;
    size_t head = 0;
    if ((reinterpret_cast<uintptr_t>(x) & 15) == 0) {
        const size_t nv = len / VEC;
        for (size_t i = tid; i < nv; i += stride) {
            float v[VEC];
            load8(v, x + i * VEC);
#pragma unroll
            for (int k = 0; k < VEC; k++) acc += v[k] * v[k];
        }
        head = nv * VEC;
    }
    for (size_t i = head + tid; i < len; i += stride) {
        float v = as_float(x[i]);
        acc += v * v;
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

extern "C" __global__ void sum_squares_f32(float* partial, const float* x, size_t len) {
    sum_squares_impl(partial, x, len);
}

extern "C" __global__ void sum_squares_bf16(float* partial, const __nv_bfloat16* x, size_t len) {
    sum_squares_impl(partial, x, len);
}

// Sums x[0..count) in double in a fixed order (per-thread strides, then a fixed tree) and stores
// the total split into out[0..3): out[0] = (float)total, out[1] the rounding of what is left,
// out[2] of what is left then, so that the f32 buffer (which the host reads) carries the f64
// sum whole (src/backend/mod.rs, `stats`). With accumulate != 0 the value already there is added
// first. One block of SUM_SPLIT_THREADS threads.
#define SUM_SPLIT_THREADS 256
extern "C" __global__ void sum_split(float* out, const float* x, int count, int accumulate) {
    __shared__ double part[SUM_SPLIT_THREADS];
    double acc = 0.0;
    for (int i = threadIdx.x; i < count; i += SUM_SPLIT_THREADS) acc += (double)x[i];
    part[threadIdx.x] = acc;
    __syncthreads();
    for (int s = SUM_SPLIT_THREADS / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        double total = part[0];
        if (accumulate) total += ((double)out[0] + (double)out[1]) + (double)out[2];
        float a = (float)total;
        double rest = total - (double)a;
        float b = (float)rest;
        out[0] = a;
        out[1] = b;
        out[2] = (float)(rest - (double)b);
    }
}
