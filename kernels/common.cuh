// Shared helpers for every kernel family: bf16 conversions, warp reductions, and the
// counter-based hash that the CPU reference (src/rng.rs) mirrors bit for bit.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

#define WARP_SIZE 32

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = WARP_SIZE / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = WARP_SIZE / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

// Sum over a whole block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[32];
    int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    int n_warps = blockDim.x / WARP_SIZE;
    v = lane < n_warps ? partial[lane] : 0.0f;
    return warp_sum(v);
}

// SplitMix64 finalizer, identical to rng::mix64.
__device__ __forceinline__ uint64_t mix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// rng::uniform: uniform in [0, 1) from draw `index` of stream `seed`.
__device__ __forceinline__ float uniform(uint64_t seed, uint64_t index) {
    uint32_t h = (uint32_t)(mix64(seed ^ mix64(index)) >> 32);
    return (float)(h >> 8) * (1.0f / 16777216.0f);
}

// Max over a whole block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ __forceinline__ float block_max(float v) {
    __shared__ float partial_max[32];
    int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) partial_max[warp] = v;
    __syncthreads();
    int n_warps = blockDim.x / WARP_SIZE;
    v = lane < n_warps ? partial_max[lane] : -3.0e38f;
    return warp_max(v);
}

__device__ __forceinline__ float bf(const __nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ __nv_bfloat16 to_bf(float x) { return __float2bfloat16_rn(x); }
