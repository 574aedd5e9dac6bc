// Rotary position embeddings on the q and k parts of qkv rows, both pairing conventions, from a
// per-micro-batch table of cos/sin in fp32 (rope_table), so the rotation itself is a few FMAs per
// element: no pow, no double, no transcendental per head.
#include "common.cuh"

// sin and cos of an fp32 angle, to about 1e-7 absolute for |a| up to 1e7, with fp32 arithmetic
// only (the kernels are built with --use_fast_math, whose sinf is inaccurate for large angles).
// Cody-Waite reduction by pi/2 in three parts (each product exact inside its FMA), then the
// Cephes minimax polynomials on [-pi/4, pi/4].
__device__ __forceinline__ void sincos_f32(float a, float* s, float* c) {
    float q = rintf(a * 0.636619772367581343f);
    float r = fmaf(q, -1.5707962512969971e+00f, a);
    r = fmaf(q, -7.5497894158615964e-08f, r);
    r = fmaf(q, -5.3903029534742384e-15f, r);
    float r2 = r * r;
    float sp = fmaf(fmaf(fmaf(-1.9515295891e-4f, r2, 8.3321608736e-3f), r2, -1.6666654611e-1f), r2 * r, r);
    float cp = fmaf(fmaf(fmaf(fmaf(2.443315711809948e-5f, r2, -1.388731625493765e-3f), r2, 4.166664568298827e-2f),
                         r2, -0.5f),
                    r2, 1.0f);
    int quadrant = (int)((long long)q & 3);
    float sv = (quadrant & 1) ? cp : sp, cv = (quadrant & 1) ? sp : cp;
    *s = (quadrant & 2) ? -sv : sv;
    *c = ((quadrant + 1) & 2) ? -cv : cv;
}

// table[row * half + j] = (cos, sin) of positions[row] * inv_freq[j]; the angle is the fp32
// product, as the CPU twin computes it. inv_freq (half values) comes from the host
// (Rope::inv_freq). One thread per (row, pair).
extern "C" __global__ void rope_table(float* table_out, const uint32_t* positions, const float* inv_freq, int n,
                                      int half) {
    float2* table = reinterpret_cast<float2*>(table_out);
    int total = n * half;
    for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < total; t += gridDim.x * blockDim.x) {
        int row = t / half, j = t - row * half;
        float s, c;
        sincos_f32((float)positions[row] * inv_freq[j], &s, &c);
        table[t] = make_float2(c, s);
    }
}

// Rotates one group of W pairs (x0[i], x1[i]) of pair indices j..j+W-1 by direction * angle.
template <int W>
__device__ __forceinline__ void rotate(float* x0, float* x1, const float2* cs, float direction) {
#pragma unroll
    for (int i = 0; i < W; i++) {
        float2 t = cs[i];
        float sn = t.y * direction;
        float a = x0[i], b = x1[i];
        x0[i] = a * t.x - b * sn;
        x1[i] = a * sn + b * t.x;
    }
}

// Block: one row; its threads take the (head, group) items of the n_rot_heads q|k heads.
// style 0 (adjacent pairs (2j, 2j+1)): a group is VEC contiguous elements, VEC/2 pairs; style 1
// (half split (j, j + hd/2)): a group is VEC elements of the first half and their partners.
// `vec` (host-chosen: head_dim a multiple of 2*VEC and row_width of VEC) selects 16-byte groups,
// otherwise one pair per item. direction +1 rotates (forward), -1 rotates back (backward).
extern "C" __global__ void rope_apply(__nv_bfloat16* qkv, const float* table_in, int n, int n_rot_heads, int head_dim,
                                      int row_width, int style, float direction, int vec) {
    int row = blockIdx.x;
    if (row >= n) return;
    int half = head_dim / 2;
    const float2* table = reinterpret_cast<const float2*>(table_in);
    const float2* cs_row = table + (size_t)row * half;
    __nv_bfloat16* qkv_row = qkv + (size_t)row * row_width;
    int per_head = vec ? (style == 0 ? head_dim / VEC : half / VEC) : half;
    int items = n_rot_heads * per_head;
    for (int t = threadIdx.x; t < items; t += blockDim.x) {
        int h = t / per_head, g = t - h * per_head;
        __nv_bfloat16* base = qkv_row + h * head_dim;
        if (vec && style == 0) {
            // Elements 8g..8g+7: pairs 4g..4g+3, interleaved (x0, x1).
            float v[VEC], x0[VEC / 2], x1[VEC / 2];
            load8(v, base + g * VEC);
            for (int i = 0; i < VEC / 2; i++) x0[i] = v[2 * i], x1[i] = v[2 * i + 1];
            rotate<VEC / 2>(x0, x1, cs_row + g * (VEC / 2), direction);
            for (int i = 0; i < VEC / 2; i++) v[2 * i] = x0[i], v[2 * i + 1] = x1[i];
            store8(base + g * VEC, v);
        } else if (vec) {
            float x0[VEC], x1[VEC];
            load8(x0, base + g * VEC);
            load8(x1, base + half + g * VEC);
            rotate<VEC>(x0, x1, cs_row + g * VEC, direction);
            store8(base + g * VEC, x0);
            store8(base + half + g * VEC, x1);
        } else {
            int i0 = style == 0 ? 2 * g : g;
            int i1 = style == 0 ? 2 * g + 1 : g + half;
            float x0 = bf(base[i0]), x1 = bf(base[i1]);
            rotate<1>(&x0, &x1, cs_row + g, direction);
            base[i0] = to_bf(x0);
            base[i1] = to_bf(x1);
        }
    }
}
