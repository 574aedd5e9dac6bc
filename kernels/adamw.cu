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

// bc1 = 1 - beta1^step, bc2 = 1 - beta2^step (computed on the host in f64).
extern "C" __global__ void adamw_multi(const AdamTensor* tensors, float lr, float beta1, float beta2, float eps,
                                       float weight_decay, float bc1, float bc2, float grad_scale) {
    AdamTensor t = tensors[blockIdx.y];
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < t.len; i += (size_t)gridDim.x * blockDim.x) {
        float g = t.grad[i] * grad_scale;
        float m = beta1 * t.m[i] + (1.0f - beta1) * g;
        float v = beta2 * t.v[i] + (1.0f - beta2) * g * g;
        t.m[i] = m;
        t.v[i] = v;
        float p = t.master[i];
        p -= lr * weight_decay * p;
        p -= lr * (m / bc1) / (sqrtf(v / bc2) + eps);
        t.master[i] = p;
        t.param[i] = to_bf(p);
    }
}
