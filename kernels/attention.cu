// Causal softmax attention over packed segments (cu_seqlens), GQA, head_dim 32, 64 or 128.
//
// Flash-style and simple on purpose (scalar fp32 math; the tensor-core version is later work):
// - one warp owns one query row (forward, dQ) or one key row (dK/dV); a block of ATT_WARPS
//   warps shares tiles of KT rows of the other side, staged in shared memory as fp32;
// - lane j scores row j of the tile (so a tile costs one warp max and one warp sum), and each
//   lane accumulates HD/32 output columns;
// - T×T scores never exist in global memory; the forward saves lse [n_heads, n] and the
//   backward recomputes P = exp(s - lse);
// - dQ (per query row) and dK/dV (per key row, summing the q heads of its group) are
//   separate kernels, so every output element has one writer: no atomics, deterministic.
#include "common.cuh"

#define ATT_WARPS 8
#define KT 32
#define NEG_BIG (-1.0e30f)
#define FULL_MASK 0xffffffffu

// Segment [start, end) of the flat token axis that contains token i.
__device__ __forceinline__ void segment_of(const uint32_t* cu, int n_seg, int i, int& start, int& end) {
    int lo = 0, hi = n_seg - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if ((int)cu[mid] <= i) lo = mid;
        else hi = mid - 1;
    }
    start = (int)cu[lo];
    end = (int)cu[lo + 1];
}

// Keys that query row i may attend: [lo, hi]. Training (cu != null): its segment up to itself;
// decode (cu == null): cache rows 0..=decode_start + i.
__device__ __forceinline__ void key_range(const uint32_t* cu, int n_seg, int decode_start, int i, int& lo,
                                          int& hi) {
    if (cu != nullptr) {
        int end;
        segment_of(cu, n_seg, i, lo, end);
        hi = i;
    } else {
        lo = 0;
        hi = decode_start + i;
    }
}

// q rows: q + row * q_stride + h * HD; k/v rows: k + key * kv_stride + g * HD.
template <int HD>
__device__ void attention_forward_impl(__nv_bfloat16* out, int out_stride, float* lse,
                                       const __nv_bfloat16* q, int q_stride, const __nv_bfloat16* k,
                                       const __nv_bfloat16* v, int kv_stride, int n_rows, int group,
                                       const uint32_t* cu, int n_seg, int decode_start) {
    constexpr int PER = HD / 32;
    __shared__ float qs[ATT_WARPS][HD];
    __shared__ float ks[KT][HD + 1];
    __shared__ float vs[KT][HD];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int h = blockIdx.y, g = h / group;
    int r0 = blockIdx.x * ATT_WARPS;
    int i = r0 + warp;
    bool row_ok = i < n_rows;
    int lo = 0, hi = -1;
    if (row_ok) key_range(cu, n_seg, decode_start, i, lo, hi);
    // Key ranges are monotonic in the row, so the block needs [lo(first row), hi(last row)].
    int blk_lo, blk_hi, unused;
    key_range(cu, n_seg, decode_start, r0, blk_lo, unused);
    key_range(cu, n_seg, decode_start, min(r0 + ATT_WARPS, n_rows) - 1, unused, blk_hi);

    for (int t = lane; t < HD; t += 32) qs[warp][t] = row_ok ? bf(q[(size_t)i * q_stride + h * HD + t]) : 0.0f;
    const float scale = rsqrtf((float)HD);
    float m = NEG_BIG, l = 0.0f;
    float acc[PER];
#pragma unroll
    for (int c = 0; c < PER; c++) acc[c] = 0.0f;

    for (int kt = blk_lo; kt <= blk_hi; kt += KT) {
        __syncthreads();
        for (int e = threadIdx.x; e < KT * HD; e += blockDim.x) {
            int j = e / HD, t = e % HD, key = kt + j;
            float kv = 0.0f, vv = 0.0f;
            if (key <= blk_hi) {
                size_t off = (size_t)key * kv_stride + g * HD + t;
                kv = bf(k[off]);
                vv = bf(v[off]);
            }
            ks[j][t] = kv;
            vs[j][t] = vv;
        }
        __syncthreads();
        int key = kt + lane;
        bool valid = row_ok && key >= lo && key <= hi;
        float s = NEG_BIG;
        if (valid) {
            float dot = 0.0f;
#pragma unroll 16
            for (int t = 0; t < HD; t++) dot += qs[warp][t] * ks[lane][t];
            s = dot * scale;
        }
        float m_new = fmaxf(m, warp_max(s));
        float p = valid ? __expf(s - m_new) : 0.0f;
        float corr = __expf(m - m_new);
        l = l * corr + warp_sum(p);
        m = m_new;
#pragma unroll
        for (int c = 0; c < PER; c++) acc[c] *= corr;
        for (int j = 0; j < KT; j++) {
            float pj = __shfl_sync(FULL_MASK, p, j);
#pragma unroll
            for (int c = 0; c < PER; c++) acc[c] += pj * vs[j][lane + 32 * c];
        }
    }
    if (row_ok) {
        float inv = 1.0f / l;
#pragma unroll
        for (int c = 0; c < PER; c++) out[(size_t)i * out_stride + h * HD + lane + 32 * c] = to_bf(acc[c] * inv);
        if (lse != nullptr && lane == 0) lse[(size_t)h * n_rows + i] = m + logf(l);
    }
}

// Grid: (ceil(n / ATT_WARPS), n_heads); block: ATT_WARPS * 32.
#define ATTN_FORWARD(HD)                                                                                        \
    extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)                                                \
        attention_forward_##HD(__nv_bfloat16* out, float* lse, const __nv_bfloat16* qkv, const uint32_t* cu,   \
                               int n_seg, int n, int n_heads, int n_kv_heads) {                                 \
        int width = (n_heads + 2 * n_kv_heads) * HD;                                                            \
        attention_forward_impl<HD>(out, n_heads * HD, lse, qkv, width, qkv + n_heads * HD,                      \
                                   qkv + (n_heads + n_kv_heads) * HD, width, n, n_heads / n_kv_heads, cu,       \
                                   n_seg, 0);                                                                   \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)                                                \
        attention_decode_##HD(__nv_bfloat16* out, const __nv_bfloat16* qkv, const __nv_bfloat16* k_cache,      \
                              const __nv_bfloat16* v_cache, int start, int n_new, int n_heads,                  \
                              int n_kv_heads) {                                                                 \
        attention_forward_impl<HD>(out, n_heads * HD, nullptr, qkv, (n_heads + 2 * n_kv_heads) * HD, k_cache,   \
                                   v_cache, n_kv_heads * HD, n_new, n_heads / n_kv_heads, nullptr, 0, start);   \
    }
ATTN_FORWARD(32)
ATTN_FORWARD(64)
ATTN_FORWARD(128)

// k_cache/v_cache rows start + i <- the k/v parts of qkv row i. Grid-stride over n_new * kv_width.
extern "C" __global__ void attention_kv_cache_write(__nv_bfloat16* k_cache, __nv_bfloat16* v_cache, const __nv_bfloat16* qkv,
                                          int start, int n_new, int n_heads, int n_kv_heads, int head_dim) {
    int kv_width = n_kv_heads * head_dim;
    int width = (n_heads + 2 * n_kv_heads) * head_dim;
    size_t total = (size_t)n_new * kv_width;
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < total;
         t += (size_t)gridDim.x * blockDim.x) {
        size_t i = t / kv_width, c = t % kv_width;
        const __nv_bfloat16* row = qkv + i * width;
        k_cache[(start + i) * kv_width + c] = row[n_heads * head_dim + c];
        v_cache[(start + i) * kv_width + c] = row[(n_heads + n_kv_heads) * head_dim + c];
    }
}

// D[h, i] = sum_t dout[i, h, t] * out[i, h, t]. head_dim / VEC lanes per (i, h) (4, 8 or 16:
// head_dim is 32, 64 or 128, checked on the host), one 16-byte load of each tensor per lane,
// summed across the lane group. (A warp per (i, h) with 2-byte loads moved 1.2 TB/s on an H200.)
// Thread indices are 32-bit (the host checks that n · head_dim / VEC · n_heads fits an int) and
// the lane group is a shift: no 64-bit division per thread.
extern "C" __global__ void attention_backward_d(float* D, const __nv_bfloat16* dout, const __nv_bfloat16* out,
                                                int n, int n_heads, int head_dim) {
    const int per = head_dim / VEC, shift = per == 4 ? 2 : per == 8 ? 3 : 4;
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    const int w = t >> shift;  // i * n_heads + h: row i's head h starts at w * head_dim
    const int part = t & (per - 1);
    const bool ok = w < n * n_heads;
    float acc = 0.0f;
    if (ok) {
        float a[VEC], b[VEC];
        load8(a, dout + (size_t)w * head_dim + part * VEC);
        load8(b, out + (size_t)w * head_dim + part * VEC);
#pragma unroll
        for (int k = 0; k < VEC; k++) acc += a[k] * b[k];
    }
    // Every lane shuffles (no early return): groups of `per` lanes are aligned powers of two.
    for (int s = per / 2; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, s);
    if (ok && part == 0) D[(size_t)(w % n_heads) * n + w / n_heads] = acc;
}

// dQ[i, h] = scale * sum_j dS_ij K_j with dS = P (dO_i·V_j - D_i). Warp per query row.
// Grid: (ceil(n / ATT_WARPS), n_heads).
template <int HD>
__device__ void attention_backward_dq_impl(__nv_bfloat16* dqkv, const __nv_bfloat16* dout,
                                           const __nv_bfloat16* qkv, const float* lse, const float* D,
                                           const uint32_t* cu, int n_seg, int n, int n_heads, int n_kv_heads) {
    constexpr int PER = HD / 32;
    __shared__ float qs[ATT_WARPS][HD];
    __shared__ float dos[ATT_WARPS][HD];
    __shared__ float ks[KT][HD + 1];
    __shared__ float vs[KT][HD + 1];
    int width = (n_heads + 2 * n_kv_heads) * HD;
    int group = n_heads / n_kv_heads;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int h = blockIdx.y, g = h / group;
    const __nv_bfloat16* k = qkv + n_heads * HD;
    const __nv_bfloat16* v = qkv + (n_heads + n_kv_heads) * HD;
    int r0 = blockIdx.x * ATT_WARPS;
    int i = r0 + warp;
    bool row_ok = i < n;
    int lo = 0, hi = -1;
    if (row_ok) key_range(cu, n_seg, 0, i, lo, hi);
    int blk_lo, blk_hi, unused;
    key_range(cu, n_seg, 0, r0, blk_lo, unused);
    key_range(cu, n_seg, 0, min(r0 + ATT_WARPS, n) - 1, unused, blk_hi);

    for (int t = lane; t < HD; t += 32) {
        qs[warp][t] = row_ok ? bf(qkv[(size_t)i * width + h * HD + t]) : 0.0f;
        dos[warp][t] = row_ok ? bf(dout[(size_t)i * n_heads * HD + h * HD + t]) : 0.0f;
    }
    float lse_i = row_ok ? lse[(size_t)h * n + i] : 0.0f;
    float d_i = row_ok ? D[(size_t)h * n + i] : 0.0f;
    const float scale = rsqrtf((float)HD);
    float acc[PER];
#pragma unroll
    for (int c = 0; c < PER; c++) acc[c] = 0.0f;

    for (int kt = blk_lo; kt <= blk_hi; kt += KT) {
        __syncthreads();
        for (int e = threadIdx.x; e < KT * HD; e += blockDim.x) {
            int j = e / HD, t = e % HD, key = kt + j;
            float kv = 0.0f, vv = 0.0f;
            if (key <= blk_hi) {
                size_t off = (size_t)key * width + g * HD + t;
                kv = bf(k[off]);
                vv = bf(v[off]);
            }
            ks[j][t] = kv;
            vs[j][t] = vv;
        }
        __syncthreads();
        int key = kt + lane;
        bool valid = row_ok && key >= lo && key <= hi;
        float ds = 0.0f;
        if (valid) {
            float s = 0.0f, dp = 0.0f;
#pragma unroll 16
            for (int t = 0; t < HD; t++) {
                s += qs[warp][t] * ks[lane][t];
                dp += dos[warp][t] * vs[lane][t];
            }
            float p = __expf(s * scale - lse_i);
            ds = p * (dp - d_i);
        }
        for (int j = 0; j < KT; j++) {
            float dsj = __shfl_sync(FULL_MASK, ds, j);
#pragma unroll
            for (int c = 0; c < PER; c++) acc[c] += dsj * ks[j][lane + 32 * c];
        }
    }
    if (row_ok) {
#pragma unroll
        for (int c = 0; c < PER; c++) dqkv[(size_t)i * width + h * HD + lane + 32 * c] = to_bf(acc[c] * scale);
    }
}

// dK[j, g] = scale * sum_{h in group g} sum_i dS_ij Q_i; dV[j, g] = sum_h sum_i P_ij dO_i.
// Warp per key row; query rows i in [j, end of j's segment). Grid: (ceil(n / ATT_WARPS), n_kv_heads).
template <int HD>
__device__ void attention_backward_dkdv_impl(__nv_bfloat16* dqkv, const __nv_bfloat16* dout,
                                             const __nv_bfloat16* qkv, const float* lse, const float* D,
                                             const uint32_t* cu, int n_seg, int n, int n_heads, int n_kv_heads) {
    constexpr int PER = HD / 32;
    __shared__ float kr[ATT_WARPS][HD];
    __shared__ float vr[ATT_WARPS][HD];
    __shared__ float qs[KT][HD + 1];
    __shared__ float dos[KT][HD + 1];
    __shared__ float lse_s[KT];
    __shared__ float d_s[KT];
    int width = (n_heads + 2 * n_kv_heads) * HD;
    int group = n_heads / n_kv_heads;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int g = blockIdx.y;
    int r0 = blockIdx.x * ATT_WARPS;
    int j = r0 + warp;
    bool row_ok = j < n;
    int seg_start, end_j = 0;
    if (row_ok) segment_of(cu, n_seg, j, seg_start, end_j);
    int blk_end;
    segment_of(cu, n_seg, min(r0 + ATT_WARPS, n) - 1, seg_start, blk_end);

    for (int t = lane; t < HD; t += 32) {
        kr[warp][t] = row_ok ? bf(qkv[(size_t)j * width + (n_heads + g) * HD + t]) : 0.0f;
        vr[warp][t] = row_ok ? bf(qkv[(size_t)j * width + (n_heads + n_kv_heads + g) * HD + t]) : 0.0f;
    }
    const float scale = rsqrtf((float)HD);
    float dk[PER], dv[PER];
#pragma unroll
    for (int c = 0; c < PER; c++) dk[c] = dv[c] = 0.0f;

    for (int hh = 0; hh < group; hh++) {
        int h = g * group + hh;
        for (int qt = r0; qt < blk_end; qt += KT) {
            __syncthreads();
            for (int e = threadIdx.x; e < KT * HD; e += blockDim.x) {
                int r = e / HD, t = e % HD, qi = qt + r;
                float qv = 0.0f, dov = 0.0f;
                if (qi < blk_end) {
                    qv = bf(qkv[(size_t)qi * width + h * HD + t]);
                    dov = bf(dout[(size_t)qi * n_heads * HD + h * HD + t]);
                }
                qs[r][t] = qv;
                dos[r][t] = dov;
            }
            if (threadIdx.x < KT) {
                int qi = qt + threadIdx.x;
                lse_s[threadIdx.x] = qi < blk_end ? lse[(size_t)h * n + qi] : 0.0f;
                d_s[threadIdx.x] = qi < blk_end ? D[(size_t)h * n + qi] : 0.0f;
            }
            __syncthreads();
            int qi = qt + lane;
            bool valid = row_ok && qi >= j && qi < end_j;
            float p = 0.0f, ds = 0.0f;
            if (valid) {
                float s = 0.0f, dp = 0.0f;
#pragma unroll 16
                for (int t = 0; t < HD; t++) {
                    s += kr[warp][t] * qs[lane][t];
                    dp += vr[warp][t] * dos[lane][t];
                }
                p = __expf(s * scale - lse_s[lane]);
                ds = p * (dp - d_s[lane]);
            }
            for (int r = 0; r < KT; r++) {
                float pr = __shfl_sync(FULL_MASK, p, r);
                float dsr = __shfl_sync(FULL_MASK, ds, r);
#pragma unroll
                for (int c = 0; c < PER; c++) {
                    dv[c] += pr * dos[r][lane + 32 * c];
                    dk[c] += dsr * qs[r][lane + 32 * c];
                }
            }
        }
    }
    if (row_ok) {
#pragma unroll
        for (int c = 0; c < PER; c++) {
            dqkv[(size_t)j * width + (n_heads + g) * HD + lane + 32 * c] = to_bf(dk[c] * scale);
            dqkv[(size_t)j * width + (n_heads + n_kv_heads + g) * HD + lane + 32 * c] = to_bf(dv[c]);
        }
    }
}

#define ATTN_BACKWARD(HD)                                                                                       \
    extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)                                                \
        attention_backward_dq_##HD(__nv_bfloat16* dqkv, const __nv_bfloat16* dout, const __nv_bfloat16* qkv,   \
                                   const float* lse, const float* D, const uint32_t* cu, int n_seg, int n,      \
                                   int n_heads, int n_kv_heads) {                                               \
        attention_backward_dq_impl<HD>(dqkv, dout, qkv, lse, D, cu, n_seg, n, n_heads, n_kv_heads);             \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)                                                \
        attention_backward_dkdv_##HD(__nv_bfloat16* dqkv, const __nv_bfloat16* dout, const __nv_bfloat16* qkv, \
                                     const float* lse, const float* D, const uint32_t* cu, int n_seg, int n,    \
                                     int n_heads, int n_kv_heads) {                                             \
        attention_backward_dkdv_impl<HD>(dqkv, dout, qkv, lse, D, cu, n_seg, n, n_heads, n_kv_heads);           \
    }
ATTN_BACKWARD(32)
ATTN_BACKWARD(64)
ATTN_BACKWARD(128)
