// Masked cross-entropy on the lm_head side. The host compacts the supervised rows; for each chunk
// of them cuBLASLt computes fp32 logits, then one block per row computes logsumexp, the loss,
// and dlogits (bf16, scaled) for the two backward GEMMs. Rows move 16 bytes per access where
// their width allows (`vec`, chosen by the host), one element otherwise.
#include "common.cuh"

// dst[r, :] = src[idx[r], :] for r < n_rows. vec: d is a multiple of VEC, items are groups of
// VEC columns; 32-bit item indices (the host checks n_rows * d fits).
extern "C" __global__ void cross_entropy_gather_rows(__nv_bfloat16* dst, const __nv_bfloat16* src, const uint32_t* idx,
                                                     int n_rows, int d, int vec) {
    int w = vec ? VEC : 1;
    int per_row = d / w, total = n_rows * per_row;
    for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < total; t += gridDim.x * blockDim.x) {
        int r = t / per_row, k = (t - r * per_row) * w;
        const __nv_bfloat16* from = src + (size_t)idx[r] * d + k;
        __nv_bfloat16* to = dst + (size_t)r * d + k;
        if (vec)
            *reinterpret_cast<uint4*>(to) = *reinterpret_cast<const uint4*>(from);
        else
            *to = *from;
    }
}

// dst[idx[r], :] = src[r, :] for r < n_rows (indices are distinct). Items as in gather_rows.
extern "C" __global__ void cross_entropy_scatter_rows(__nv_bfloat16* dst, const __nv_bfloat16* src,
                                                      const uint32_t* idx, int n_rows, int d, int vec) {
    int w = vec ? VEC : 1;
    int per_row = d / w, total = n_rows * per_row;
    for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < total; t += gridDim.x * blockDim.x) {
        int r = t / per_row, k = (t - r * per_row) * w;
        const __nv_bfloat16* from = src + (size_t)r * d + k;
        __nv_bfloat16* to = dst + (size_t)idx[r] * d + k;
        if (vec)
            *reinterpret_cast<uint4*>(to) = *reinterpret_cast<const uint4*>(from);
        else
            *to = *from;
    }
}

// A running logsumexp: max m and sum s of exp(x - m).
struct Lse {
    float m, s;
};

__device__ __forceinline__ Lse lse_add(Lse a, float x) {
    if (x > a.m) return {x, a.s * expf(a.m - x) + 1.0f};
    return {a.m, a.s + expf(x - a.m)};
}

__device__ __forceinline__ Lse lse_merge(Lse a, Lse b) {
    float m = fmaxf(a.m, b.m);
    return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

// Merges every thread's Lse over the block (blockDim.x a multiple of 32); every thread gets it.
__device__ __forceinline__ Lse block_lse(Lse v) {
    __shared__ float part_m[32], part_s[32];
    int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
#pragma unroll
    for (int o = WARP_SIZE / 2; o > 0; o >>= 1)
        v = lse_merge(v, {__shfl_xor_sync(0xffffffff, v.m, o), __shfl_xor_sync(0xffffffff, v.s, o)});
    __syncthreads();
    if (lane == 0) part_m[warp] = v.m, part_s[warp] = v.s;
    __syncthreads();
    int n_warps = blockDim.x / WARP_SIZE;
    v = lane < n_warps ? Lse{part_m[lane], part_s[lane]} : Lse{-3.0e38f, 0.0f};
#pragma unroll
    for (int o = WARP_SIZE / 2; o > 0; o >>= 1)
        v = lse_merge(v, {__shfl_xor_sync(0xffffffff, v.m, o), __shfl_xor_sync(0xffffffff, v.s, o)});
    return v;
}

// One block per row r < n_rows of `logits` [n_rows, vocab] (fp32). losses[r] = lse - logit[target];
// when dlogits is not null, dlogits[r, k] = loss_scale * (softmax_k - [k == target]). Two passes
// over the row: an online logsumexp, then dlogits. vec: vocab is a multiple of VEC (16-byte
// rows of fp32 in two float4 and of bf16 in one uint4).
extern "C" __global__ void cross_entropy_rows(float* losses, __nv_bfloat16* dlogits, const float* logits,
                                              const uint32_t* targets, int n_rows, int vocab, float loss_scale,
                                              int vec) {
    int r = blockIdx.x;
    if (r >= n_rows) return;
    const float* row = logits + (size_t)r * vocab;
    Lse acc = {-3.0e38f, 0.0f};
    if (vec) {
        for (int k = threadIdx.x * VEC; k < vocab; k += blockDim.x * VEC) {
            float v[VEC];
            load8(v, row + k);
            for (int i = 0; i < VEC; i++) acc = lse_add(acc, v[i]);
        }
    } else {
        for (int k = threadIdx.x; k < vocab; k += blockDim.x) acc = lse_add(acc, row[k]);
    }
    acc = block_lse(acc);
    float lse = acc.m + logf(acc.s);
    uint32_t t = targets[r];
    if (threadIdx.x == 0) losses[r] = lse - row[t];
    if (dlogits == nullptr) return;
    __nv_bfloat16* drow = dlogits + (size_t)r * vocab;
    if (vec) {
        for (int k = threadIdx.x * VEC; k < vocab; k += blockDim.x * VEC) {
            float v[VEC];
            load8(v, row + k);
            for (int i = 0; i < VEC; i++) v[i] = loss_scale * (expf(v[i] - lse) - (k + i == (int)t ? 1.0f : 0.0f));
            store8(drow + k, v);
        }
    } else {
        for (int k = threadIdx.x; k < vocab; k += blockDim.x)
            drow[k] = to_bf(loss_scale * (expf(row[k] - lse) - (k == (int)t ? 1.0f : 0.0f)));
    }
}
