// SwiGLU: out = silu(gate) * up from gate_up rows [gate (hidden) | up (hidden)].
#include "common.cuh"

extern "C" __global__ void swiglu_forward(__nv_bfloat16* out, const __nv_bfloat16* gate_up, int n, int hidden) {
    size_t total = (size_t)n * hidden;
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < total;
         t += (size_t)gridDim.x * blockDim.x) {
        size_t row = t / hidden, k = t % hidden;
        float g = bf(gate_up[row * 2 * hidden + k]);
        float u = bf(gate_up[row * 2 * hidden + hidden + k]);
        float sig = 1.0f / (1.0f + expf(-g));
        out[t] = to_bf(g * sig * u);
    }
}

extern "C" __global__ void swiglu_backward(__nv_bfloat16* dgate_up, const __nv_bfloat16* dout,
                                           const __nv_bfloat16* gate_up, int n, int hidden) {
    size_t total = (size_t)n * hidden;
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < total;
         t += (size_t)gridDim.x * blockDim.x) {
        size_t row = t / hidden, k = t % hidden;
        size_t gi = row * 2 * hidden + k, ui = gi + hidden;
        float g = bf(gate_up[gi]), u = bf(gate_up[ui]), dy = bf(dout[t]);
        float sig = 1.0f / (1.0f + expf(-g));
        float silu = g * sig;
        dgate_up[gi] = to_bf(dy * u * sig * (1.0f + g * (1.0f - sig)));
        dgate_up[ui] = to_bf(dy * silu);
    }
}
