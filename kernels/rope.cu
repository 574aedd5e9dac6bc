// Rotary position embeddings on the q and k parts of qkv rows, both pairing conventions.
// freq_j = theta^(-2j/hd), scaled, is computed in double and rounded to float, the angle is
// position * freq in float, and sin/cos are taken in double (fast-math sinf is inaccurate
// for the large angles of long sequences).
#include "common.cuh"

// The CPU twin is Rope::inv_freq (src/backend/mod.rs). scaling: 0 none, 1 linear (every
// frequency / factor), 2 llama3 (long wavelengths / factor, short ones kept, a blend between).
__device__ float rope_inv_freq(int j, int head_dim, float theta, int scaling, float factor, float low_freq_factor,
                               float high_freq_factor, float original_context) {
    double base = pow((double)theta, -2.0 * (double)j / (double)head_dim);
    if (scaling == 1) return (float)(base / (double)factor);
    if (scaling == 2) {
        double f = factor, low = low_freq_factor, high = high_freq_factor, original = original_context;
        double wavelen = 2.0 * 3.141592653589793 / base;
        if (wavelen < original / high) return (float)base;
        if (wavelen > original / low) return (float)(base / f);
        double smooth = (original / wavelen - low) / (high - low);
        return (float)((1.0 - smooth) * base / f + smooth * base);
    }
    return (float)base;
}

// One thread per (row, head of q|k, pair). style 0: adjacent pairs (2j, 2j+1); 1: half split (j, j+hd/2).
// direction +1 rotates (forward), -1 rotates back (backward).
extern "C" __global__ void rope_apply(__nv_bfloat16* qkv, const uint32_t* positions, int n, int n_rot_heads,
                                      int head_dim, int row_width, float theta, int style, float direction,
                                      int scaling, float factor, float low_freq_factor, float high_freq_factor,
                                      float original_context) {
    int half = head_dim / 2;
    size_t total = (size_t)n * n_rot_heads * half;
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < total;
         t += (size_t)gridDim.x * blockDim.x) {
        int j = (int)(t % half);
        size_t rest = t / half;
        int h = (int)(rest % n_rot_heads);
        size_t row = rest / n_rot_heads;
        float freq = rope_inv_freq(j, head_dim, theta, scaling, factor, low_freq_factor, high_freq_factor,
                                   original_context);
        float angle = (float)positions[row] * freq;
        double s, c;
        sincos((double)angle, &s, &c);
        float sn = (float)s * direction, cs = (float)c;
        __nv_bfloat16* base = qkv + row * row_width + (size_t)h * head_dim;
        int i0 = style == 0 ? 2 * j : j;
        int i1 = style == 0 ? 2 * j + 1 : j + half;
        float x0 = bf(base[i0]), x1 = bf(base[i1]);
        base[i0] = to_bf(x0 * cs - x1 * sn);
        base[i1] = to_bf(x0 * sn + x1 * cs);
    }
}
