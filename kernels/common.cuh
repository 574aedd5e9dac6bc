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

// ---- 16-byte vectors: eight bf16 (or four/eight fp32) per load or store ------------------------
// The element-wise kernels move 16 bytes per memory instruction where the row width (or the
// flat length) is a multiple of VEC; a scalar path covers the rest. Pointers handed to these
// must be 16-byte aligned: buffers are (cudaMalloc aligns to 256 bytes) and a row offset of a
// multiple of VEC bf16 keeps them so.
#define VEC 8

// A bf16 is the upper half of an fp32: widening is a shift, so two of them unpack from a 32-bit
// word without reinterpreting memory as another type (which the C++ build of the emulation,
// at -O2, is entitled to miscompile).
__device__ __forceinline__ float float_of_bits(uint32_t b) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(b);
#else
    float f;
    __builtin_memcpy(&f, &b, 4);
    return f;
#endif
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    return (uint32_t)__bfloat16_as_ushort(to_bf(lo)) | ((uint32_t)__bfloat16_as_ushort(to_bf(hi)) << 16);
}

// Eight bf16 as loaded in one 16-byte access (kept raw where a kernel loads ahead of use).
__device__ __forceinline__ void unpack8(float v[VEC], uint4 u) {
    uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < VEC / 2; i++) {
        v[2 * i] = float_of_bits(w[i] << 16);
        v[2 * i + 1] = float_of_bits(w[i] & 0xffff0000u);
    }
}

__device__ __forceinline__ void load8(float v[VEC], const __nv_bfloat16* p) {
    unpack8(v, *reinterpret_cast<const uint4*>(p));
}

__device__ __forceinline__ void store8(__nv_bfloat16* p, const float v[VEC]) {
    *reinterpret_cast<uint4*>(p) =
        make_uint4(pack_bf16x2(v[0], v[1]), pack_bf16x2(v[2], v[3]), pack_bf16x2(v[4], v[5]), pack_bf16x2(v[6], v[7]));
}

__device__ __forceinline__ void load8(float v[VEC], const float* p) {
    float4 a = *reinterpret_cast<const float4*>(p), b = *reinterpret_cast<const float4*>(p + 4);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

__device__ __forceinline__ void store8(float* p, const float v[VEC]) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
    *reinterpret_cast<float4*>(p + 4) = make_float4(v[4], v[5], v[6], v[7]);
}

// Inverted dropout of one element: 0 where uniform(seed, index) < p, else v * scale. p = 0
// means no dropout (the callers pass it so rather than a second kernel).
__device__ __forceinline__ float dropout_keep(float v, float p, float scale, uint64_t seed, uint64_t index) {
    if (p <= 0.0f) return v;
    return uniform(seed, index) < p ? 0.0f : v * scale;
}

// A compile-time vector width, passed to the generic lambdas of for_own_columns.
template <int N>
struct Width {
    static constexpr int value = N;
};

// Calls f(k, Width<W>) for the column groups of a row of width d that this thread owns: groups
// of VEC columns when d is a multiple of VEC (16-byte accesses), single columns otherwise. A
// thread owns the same columns in every row, so it may keep per-column sums of its own.
template <class F>
__device__ __forceinline__ void for_own_columns(int d, F f) {
    if (d % VEC == 0) {
        for (int k = threadIdx.x * VEC; k < d; k += blockDim.x * VEC) f(k, Width<VEC>());
    } else {
        for (int k = threadIdx.x; k < d; k += blockDim.x) f(k, Width<1>());
    }
}

template <int W>
__device__ __forceinline__ void load_w(float v[W], const __nv_bfloat16* p) {
    if constexpr (W == VEC) {
        load8(v, p);
    } else {
#pragma unroll
        for (int i = 0; i < W; i++) v[i] = bf(p[i]);
    }
}

template <int W>
__device__ __forceinline__ void store_w(__nv_bfloat16* p, const float v[W]) {
    if constexpr (W == VEC) {
        store8(p, v);
    } else {
#pragma unroll
        for (int i = 0; i < W; i++) p[i] = to_bf(v[i]);
    }
}

// v rounded to bf16 and back: what a bf16 buffer holds after storing v.
__device__ __forceinline__ float round_bf(float v) { return bf(to_bf(v)); }

// RMSNorm's 1/sqrt(mean(x²) + eps) from a row's sum of squares. A row whose mean square overflows
// fp32 (an element past about 1.8e19) gets NaN, not rsqrt(inf) = 0: zero would normalize the row
// to nothing, and a model with one absurd weight would evaluate to a uniform distribution and
// train on zero gradients without a word; NaN reaches the checks on the outputs instead.
// The twin: rmsnorm_rstd in src/backend/cpu/rmsnorm.rs.
__device__ __forceinline__ float rmsnorm_rstd(float ss, int d, float eps) {
    float ms = ss / (float)d;
    return ms <= 3.4028235e38f ? rsqrtf(ms + eps) : float_of_bits(0x7fc00000u);
}
