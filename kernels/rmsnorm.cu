// RMSNorm forward, residual add fused with the forward, and backward.
// One block per token row for the row-wise parts; the weight gradient is reduced
// deterministically: per-chunk partial sums, then a second kernel sums the chunks in order.
#include "common.cuh"

// out = x * rstd * w; rstd[row] = 1/sqrt(mean(x^2) + eps). Block: one row.
extern "C" __global__ void rmsnorm_forward(__nv_bfloat16* out, float* rstd, const __nv_bfloat16* x,
                                           const __nv_bfloat16* w, int n, int d, float eps) {
    int row = blockIdx.x;
    if (row >= n) return;
    const __nv_bfloat16* xr = x + (size_t)row * d;
    float ss = 0.0f;
    for (int k = threadIdx.x; k < d; k += blockDim.x) {
        float v = bf(xr[k]);
        ss += v * v;
    }
    ss = block_sum(ss);
    float r = rsqrtf(ss / (float)d + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    __nv_bfloat16* o = out + (size_t)row * d;
    for (int k = threadIdx.x; k < d; k += blockDim.x) o[k] = to_bf(bf(xr[k]) * r * bf(w[k]));
}

// x_out = x_in + delta (rounded to bf16, which is what the backward will read), then the norm.
extern "C" __global__ void residual_rmsnorm_forward(__nv_bfloat16* x_out, __nv_bfloat16* out, float* rstd,
                                                    const __nv_bfloat16* x_in, const __nv_bfloat16* delta,
                                                    const __nv_bfloat16* w, int n, int d, float eps) {
    int row = blockIdx.x;
    if (row >= n) return;
    size_t base = (size_t)row * d;
    float ss = 0.0f;
    for (int k = threadIdx.x; k < d; k += blockDim.x) {
        __nv_bfloat16 s = to_bf(bf(x_in[base + k]) + bf(delta[base + k]));
        x_out[base + k] = s;
        float v = bf(s);
        ss += v * v;
    }
    ss = block_sum(ss);
    float r = rsqrtf(ss / (float)d + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    // Each thread re-reads only the elements it wrote itself, so no barrier is needed.
    for (int k = threadIdx.x; k < d; k += blockDim.x) out[base + k] = to_bf(bf(x_out[base + k]) * r * bf(w[k]));
}

// dx += rstd * (g - x * rstd^2 * mean(g * x)), g = dout * w. Block: one row.
extern "C" __global__ void rmsnorm_backward_dx(__nv_bfloat16* dx, const __nv_bfloat16* dout,
                                               const __nv_bfloat16* x, const __nv_bfloat16* w,
                                               const float* rstd, int n, int d) {
    int row = blockIdx.x;
    if (row >= n) return;
    size_t base = (size_t)row * d;
    float r = rstd[row];
    float dot = 0.0f;
    for (int k = threadIdx.x; k < d; k += blockDim.x) dot += bf(dout[base + k]) * bf(w[k]) * bf(x[base + k]);
    dot = block_sum(dot);
    float c = r * r * dot / (float)d;
    for (int k = threadIdx.x; k < d; k += blockDim.x) {
        float g = bf(dout[base + k]) * bf(w[k]);
        float v = r * (g - bf(x[base + k]) * c);
        dx[base + k] = to_bf(bf(dx[base + k]) + v);
    }
}

// partial[chunk * d + k] = sum over the rows of this chunk of dout[i,k] * x[i,k] * rstd[i].
// Grid: (ceil(d / blockDim.x), n_chunks); thread = one column, rows in a fixed order.
extern "C" __global__ void rmsnorm_backward_dw_partial(float* partial, const __nv_bfloat16* dout,
                                                       const __nv_bfloat16* x, const float* rstd, int n,
                                                       int d, int rows_per_chunk) {
    int k = blockIdx.x * blockDim.x + threadIdx.x;
    int chunk = blockIdx.y;
    if (k >= d) return;
    int r0 = chunk * rows_per_chunk;
    int r1 = min(n, r0 + rows_per_chunk);
    float acc = 0.0f;
    for (int i = r0; i < r1; i++) acc += bf(dout[(size_t)i * d + k]) * bf(x[(size_t)i * d + k]) * rstd[i];
    partial[(size_t)chunk * d + k] = acc;
}

// dw[k] += sum over chunks (in order) of partial[chunk * d + k].
extern "C" __global__ void rmsnorm_backward_dw_reduce(float* dw, const float* partial, int d, int n_chunks) {
    int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= d) return;
    float acc = 0.0f;
    for (int c = 0; c < n_chunks; c++) acc += partial[(size_t)c * d + k];
    dw[k] += acc;
}
