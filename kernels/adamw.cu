// Multi-tensor AdamW: one launch updates every tensor. The host uploads one descriptor per
// tensor; grid.y picks the tensor, grid.x blocks stride over its elements.
#include "common.cuh"

struct AdamTensor {
    float* master;
    const float* grad;
    float* m;
    float* v;
    __nv_bfloat16* param;
    unsigned long long len;
};

// The same descriptor with the moments stored in bf16 (--optimizer-state bf16).
struct AdamTensorBf16 {
    float* master;
    const float* grad;
    __nv_bfloat16* m;
    __nv_bfloat16* v;
    __nv_bfloat16* param;
    unsigned long long len;
};

__device__ __forceinline__ float load_moment(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float load_moment(const __nv_bfloat16* p, size_t i) { return bf(p[i]); }
__device__ __forceinline__ void store_moment(float* p, size_t i, float x) { p[i] = x; }
// Round to nearest even: deterministic, and unbiased enough at betas (0.9, 0.95); the update
// of this step uses the unrounded value (see adamw_multi_bf16).
__device__ __forceinline__ void store_moment(__nv_bfloat16* p, size_t i, float x) { p[i] = to_bf(x); }

// bc1 = 1 - beta1^step, bc2 = 1 - beta2^step (computed on the host in f64).
// Gradient clipping is read from device memory, so the host need not wait for the norm: with
// sumsq non-null, sumsq[0] + sumsq[1] + sumsq[2] is the gradients' sum of squares (an f64 split
// by sum_split) and the gradients are scaled by min(1, max_norm / norm) (max_norm <= 0: no
// clipping); a norm that is not finite skips the whole update, which the host reports after.
// Desc is AdamTensor or AdamTensorBf16: the arithmetic is fp32 either way.
template <typename Desc>
__device__ __forceinline__ void adamw_body(const Desc* tensors, float lr, float beta1, float beta2, float eps,
                                           float weight_decay, float bc1, float bc2, float grad_scale,
                                           const float* sumsq, float max_norm) {
    // One thread per block works the factor out in double (as the CPU twin does): FP64 is slow
    // on consumer GPUs, and every thread needs the same value.
    __shared__ float scale_s;
    __shared__ int skip_s;
    if (threadIdx.x == 0) {
        float scale = grad_scale;
        int skip = 0;
        if (sumsq) {
            double norm = sqrt(((double)sumsq[0] + (double)sumsq[1]) + (double)sumsq[2]);
            if (!isfinite(norm)) skip = 1;
            else if (max_norm > 0.0f && norm > (double)max_norm) scale = grad_scale * (float)((double)max_norm / norm);
        }
        scale_s = scale;
        skip_s = skip;
    }
    __syncthreads();
    if (skip_s) return;
    const float gscale = scale_s;
    Desc t = tensors[blockIdx.y];
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < t.len; i += (size_t)gridDim.x * blockDim.x) {
        float g = t.grad[i] * gscale;
        float m = beta1 * load_moment(t.m, i) + (1.0f - beta1) * g;
        float v = beta2 * load_moment(t.v, i) + (1.0f - beta2) * g * g;
        store_moment(t.m, i, m);
        store_moment(t.v, i, v);
        float p = t.master[i];
        p -= lr * weight_decay * p;
        p -= lr * (m / bc1) / (sqrtf(v / bc2) + eps);
        t.master[i] = p;
        t.param[i] = to_bf(p);
    }
}

extern "C" __global__ void adamw_multi(const AdamTensor* tensors, float lr, float beta1, float beta2, float eps,
                                       float weight_decay, float bc1, float bc2, float grad_scale,
                                       const float* sumsq, float max_norm) {
    adamw_body(tensors, lr, beta1, beta2, eps, weight_decay, bc1, bc2, grad_scale, sumsq, max_norm);
}

// m and v in bf16: loaded to fp32, updated, used unrounded in this step's update, stored rounded
// to nearest even (a bf16 has f32's exponent range, so v flushes to zero only for gradients
// under about 1e-19, where the update is bounded by m / eps; see docs/optimizer-state.md).
extern "C" __global__ void adamw_multi_bf16(const AdamTensorBf16* tensors, float lr, float beta1, float beta2,
                                            float eps, float weight_decay, float bc1, float bc2, float grad_scale,
                                            const float* sumsq, float max_norm) {
    adamw_body(tensors, lr, beta1, beta2, eps, weight_decay, bc1, bc2, grad_scale, sumsq, max_norm);
}
