// Masked cross-entropy on the lm_head side. The host compacts the supervised rows; for each chunk
// of them cuBLASLt computes fp32 logits, then one block per row computes logsumexp, the loss,
// and dlogits (bf16, scaled) for the two backward GEMMs.
#include "common.cuh"

// dst[r, :] = src[idx[r], :] for r < n_rows.
extern "C" __global__ void cross_entropy_gather_rows(__nv_bfloat16* dst, const __nv_bfloat16* src, const uint32_t* idx,
                                       int n_rows, int d) {
    size_t total = (size_t)n_rows * d;
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < total;
         t += (size_t)gridDim.x * blockDim.x) {
        size_t r = t / d, k = t % d;
        dst[t] = src[(size_t)idx[r] * d + k];
    }
}

// dst[idx[r], :] = src[r, :] for r < n_rows (indices are distinct).
extern "C" __global__ void cross_entropy_scatter_rows(__nv_bfloat16* dst, const __nv_bfloat16* src, const uint32_t* idx,
                                        int n_rows, int d) {
    size_t total = (size_t)n_rows * d;
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < total;
         t += (size_t)gridDim.x * blockDim.x) {
        size_t r = t / d, k = t % d;
        dst[(size_t)idx[r] * d + k] = src[t];
    }
}

// One block per row r < n_rows of `logits` [n_rows, vocab] (fp32). losses[r] = lse - logit[target];
// when dlogits is not null, dlogits[r, k] = loss_scale * (softmax_k - [k == target]).
extern "C" __global__ void cross_entropy_rows(float* losses, __nv_bfloat16* dlogits, const float* logits,
                                              const uint32_t* targets, int n_rows, int vocab, float loss_scale) {
    int r = blockIdx.x;
    if (r >= n_rows) return;
    const float* row = logits + (size_t)r * vocab;
    float mx = -3.0e38f;
    for (int k = threadIdx.x; k < vocab; k += blockDim.x) mx = fmaxf(mx, row[k]);
    mx = block_max(mx);
    float s = 0.0f;
    for (int k = threadIdx.x; k < vocab; k += blockDim.x) s += expf(row[k] - mx);
    s = block_sum(s);
    float lse = mx + logf(s);
    uint32_t t = targets[r];
    if (threadIdx.x == 0) losses[r] = lse - row[t];
    if (dlogits != nullptr) {
        __nv_bfloat16* drow = dlogits + (size_t)r * vocab;
        for (int k = threadIdx.x; k < vocab; k += blockDim.x) {
            float p = expf(row[k] - lse);
            drow[k] = to_bf(loss_scale * (p - (k == (int)t ? 1.0f : 0.0f)));
        }
    }
}
