// SwiGLU: out = silu(gate) * up from gate_up rows [gate (hidden) | up (hidden)].
// Items are groups of VEC columns (16-byte accesses) when hidden is a multiple of VEC, single
// columns otherwise (`vec`, chosen by the host); indices are 32-bit (the host checks that
// n * hidden fits), with one division per item, not per element.
#include "common.cuh"

template <int W>
__device__ __forceinline__ void swiglu_forward_item(__nv_bfloat16* out, const __nv_bfloat16* gate_up, int row,
                                                    int k, int hidden) {
    const __nv_bfloat16* gr = gate_up + (size_t)row * 2 * hidden;
    float g[W], u[W];
    load_w<W>(g, gr + k);
    load_w<W>(u, gr + hidden + k);
    for (int i = 0; i < W; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    store_w<W>(out + (size_t)row * hidden + k, g);
}

extern "C" __global__ void swiglu_forward(__nv_bfloat16* out, const __nv_bfloat16* gate_up, int n, int hidden,
                                          int vec) {
    int w = vec ? VEC : 1;
    int per_row = hidden / w;
    int total = n * per_row;
    for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < total; t += gridDim.x * blockDim.x) {
        int row = t / per_row, k = (t - row * per_row) * w;
        if (vec)
            swiglu_forward_item<VEC>(out, gate_up, row, k, hidden);
        else
            swiglu_forward_item<1>(out, gate_up, row, k, hidden);
    }
}

template <int W>
__device__ __forceinline__ void swiglu_backward_item(__nv_bfloat16* dgate_up, const __nv_bfloat16* dout,
                                                     const __nv_bfloat16* gate_up, int row, int k, int hidden) {
    size_t gi = (size_t)row * 2 * hidden + k, ui = gi + hidden;
    float g[W], u[W], dy[W];
    load_w<W>(g, gate_up + gi);
    load_w<W>(u, gate_up + ui);
    load_w<W>(dy, dout + (size_t)row * hidden + k);
    for (int i = 0; i < W; i++) {
        float sig = 1.0f / (1.0f + expf(-g[i]));
        float silu = g[i] * sig;
        float dg = dy[i] * u[i] * sig * (1.0f + g[i] * (1.0f - sig));
        u[i] = dy[i] * silu;
        g[i] = dg;
    }
    store_w<W>(dgate_up + gi, g);
    store_w<W>(dgate_up + ui, u);
}

extern "C" __global__ void swiglu_backward(__nv_bfloat16* dgate_up, const __nv_bfloat16* dout,
                                           const __nv_bfloat16* gate_up, int n, int hidden, int vec) {
    int w = vec ? VEC : 1;
    int per_row = hidden / w;
    int total = n * per_row;
    for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < total; t += gridDim.x * blockDim.x) {
        int row = t / per_row, k = (t - row * per_row) * w;
        if (vec)
            swiglu_backward_item<VEC>(dgate_up, dout, gate_up, row, k, hidden);
        else
            swiglu_backward_item<1>(dgate_up, dout, gate_up, row, k, hidden);
    }
}
