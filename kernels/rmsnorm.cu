// RMSNorm forward, the residual add (with the branch's dropout) fused with the forward, and the
// backward in one pass over its inputs. One block per token row in the forward; the backward
// runs one block per chunk of rows and sums the weight gradient deterministically: per-chunk
// partial sums (each column summed by one thread, rows in order), then a second kernel sums the
// chunks in order. Rows whose width is a multiple of VEC move 16 bytes per access.
#include "common.cuh"

// The widest row the backward's shared per-column sums hold (32 KB of static shared memory);
// RMSNORM_MAX_D in src/backend/cuda/rmsnorm.rs.
#define RMSNORM_MAX_D 8192

// out = x * rstd * w; rstd[row] = 1/sqrt(mean(x^2) + eps). Block: one row.
extern "C" __global__ void rmsnorm_forward(__nv_bfloat16* out, float* rstd, const __nv_bfloat16* x,
                                           const __nv_bfloat16* w, int n, int d, float eps) {
    int row = blockIdx.x;
    if (row >= n) return;
    const __nv_bfloat16* xr = x + (size_t)row * d;
    __nv_bfloat16* o = out + (size_t)row * d;
    float ss = 0.0f;
    for_own_columns(d, [&](int k, auto width) {
        constexpr int W = decltype(width)::value;
        float v[W];
        load_w<W>(v, xr + k);
        for (int i = 0; i < W; i++) ss += v[i] * v[i];
    });
    ss = block_sum(ss);
    float r = rmsnorm_rstd(ss, d, eps);
    if (threadIdx.x == 0) rstd[row] = r;
    for_own_columns(d, [&](int k, auto width) {
        constexpr int W = decltype(width)::value;
        float v[W], wv[W];
        load_w<W>(v, xr + k);
        load_w<W>(wv, w + k);
        for (int i = 0; i < W; i++) v[i] = v[i] * r * wv[i];
        store_w<W>(o + k, v);
    });
}

// x_out = x_in + dropout(delta) (rounded to bf16, which is what the backward will read), then
// the norm. dropout: element i of the flat [n, d] delta is dropped when uniform(seed, i) < p,
// kept ones scaled by `scale`; p = 0 adds delta as it is.
extern "C" __global__ void residual_rmsnorm_forward(__nv_bfloat16* x_out, __nv_bfloat16* out, float* rstd,
                                                    const __nv_bfloat16* x_in, const __nv_bfloat16* delta,
                                                    const __nv_bfloat16* w, int n, int d, float eps, float p,
                                                    float scale, uint64_t seed) {
    int row = blockIdx.x;
    if (row >= n) return;
    size_t base = (size_t)row * d;
    float ss = 0.0f;
    for_own_columns(d, [&](int k, auto width) {
        constexpr int W = decltype(width)::value;
        float a[W], b[W];
        load_w<W>(a, x_in + base + k);
        load_w<W>(b, delta + base + k);
        for (int i = 0; i < W; i++) {
            float s = round_bf(a[i] + dropout_keep(b[i], p, scale, seed, base + k + i));
            a[i] = s;
            ss += s * s;
        }
        store_w<W>(x_out + base + k, a);
    });
    ss = block_sum(ss);
    float r = rmsnorm_rstd(ss, d, eps);
    if (threadIdx.x == 0) rstd[row] = r;
    // Each thread re-reads only the elements it wrote itself, so no barrier is needed.
    for_own_columns(d, [&](int k, auto width) {
        constexpr int W = decltype(width)::value;
        float v[W], wv[W];
        load_w<W>(v, x_out + base + k);
        load_w<W>(wv, w + k);
        for (int i = 0; i < W; i++) v[i] = v[i] * r * wv[i];
        store_w<W>(out + base + k, v);
    });
}

// Backward, one block per chunk of `rows_per_chunk` rows, rows in order:
//   dx += rstd * (g - x * rstd^2 * mean(g * x)), g = dout * w;
//   partial[chunk * d + k] = sum over the chunk's rows of dout[i,k] * x[i,k] * rstd[i];
//   when dbranch is not null, dbranch = dropout(dx) over the updated (bf16) dx with the mask of
//   (p, scale, seed) at the flat index: the gradient of a branch that joined the residual
//   stream through dropout.
// Rows whose width is a multiple of VEC take rmsnorm_backward_vec_rows (the host launches a
// thread per group of VEC columns: every row of the 1.3B); other widths take the general loop
// below it.

// The row's dot product over the block with one barrier: warp sums into partial[buf], where buf
// alternates by row, so a row's writes never meet the previous row's reads (a barrier lies
// between them). The same additions in the same order as block_sum.
__device__ __forceinline__ float block_sum_alternating(float v, float (*partial)[32], int buf) {
    int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    v = warp_sum(v);
    if (lane == 0) partial[buf][warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x / WARP_SIZE) ? partial[buf][lane] : 0.0f;
    return warp_sum(v);
}

// Thread t owns columns k = t·VEC .. k + VEC - 1 of every row (none when k >= d): w stays in
// registers for the chunk, so do the columns' weight-gradient sums, and the next row's dout, x
// and dx are loaded while this row's dot product is summed. (The general loop reloads g and x
// after the sum and fetches dx only then: on an H200 it ran at about 2.8 TB/s, 91 µs per call
// of the 1.3B, two dependent trips to memory per row.)
__device__ void rmsnorm_backward_vec_rows(__nv_bfloat16* dx, float* partial, __nv_bfloat16* dbranch,
                                          const __nv_bfloat16* dout, const __nv_bfloat16* x,
                                          const __nv_bfloat16* w, const float* rstd, int d, int r0, int r1,
                                          float p, float scale, uint64_t seed) {
    __shared__ float warp_partial[2][32];
    const int k = threadIdx.x * VEC;
    const bool own = k < d;
    float wv[VEC], dw[VEC];
    for (int e = 0; e < VEC; e++) wv[e] = dw[e] = 0.0f;
    if (own) load8(wv, w + k);
    // The current row's groups as loaded (bf16); the next row's arrive in *_next meanwhile.
    uint4 g_raw{}, x_raw{}, dx_raw{}, g_next{}, x_next{}, dx_next{};
    auto fetch = [&](int row, uint4& g, uint4& xr, uint4& dr) {
        if (!own) return;
        size_t at = (size_t)row * d + k;
        g = *reinterpret_cast<const uint4*>(dout + at);
        xr = *reinterpret_cast<const uint4*>(x + at);
        dr = *reinterpret_cast<const uint4*>(dx + at);
    };
    if (r0 < r1) fetch(r0, g_raw, x_raw, dx_raw);
    for (int row = r0; row < r1; row++) {
        if (row + 1 < r1) fetch(row + 1, g_next, x_next, dx_next);
        float r = rstd[row];
        float g[VEC], xv[VEC];
        unpack8(g, g_raw);
        unpack8(xv, x_raw);
        float dot = 0.0f;
        if (own)
            for (int e = 0; e < VEC; e++) dot += g[e] * wv[e] * xv[e];
        dot = block_sum_alternating(dot, warp_partial, (row - r0) & 1);
        float c = r * r * dot / (float)d;
        if (own) {
            size_t at = (size_t)row * d + k;
            float acc[VEC];
            unpack8(acc, dx_raw);
            for (int e = 0; e < VEC; e++) {
                dw[e] += g[e] * xv[e] * r;
                acc[e] += r * (g[e] * wv[e] - xv[e] * c);
            }
            store8(dx + at, acc);
            if (dbranch != nullptr) {
                for (int e = 0; e < VEC; e++) acc[e] = dropout_keep(round_bf(acc[e]), p, scale, seed, at + e);
                store8(dbranch + at, acc);
            }
        }
        g_raw = g_next, x_raw = x_next, dx_raw = dx_next;
    }
    if (own) store8(partial + (size_t)blockIdx.x * d + k, dw);
}

// Each column's sum stays with the thread that owns the column (for_own_columns), in shared
// memory laid out so that a warp's lanes hit consecutive words.
extern "C" __global__ void rmsnorm_backward(__nv_bfloat16* dx, float* partial, __nv_bfloat16* dbranch,
                                            const __nv_bfloat16* dout, const __nv_bfloat16* x,
                                            const __nv_bfloat16* w, const float* rstd, int n, int d,
                                            int rows_per_chunk, float p, float scale, uint64_t seed) {
    __shared__ float dw_acc[RMSNORM_MAX_D];
    int chunk = blockIdx.x;
    int r0 = chunk * rows_per_chunk;
    int r1 = min(n, r0 + rows_per_chunk);
    if (d % VEC == 0 && d <= VEC * (int)blockDim.x)
        return rmsnorm_backward_vec_rows(dx, partial, dbranch, dout, x, w, rstd, d, r0, r1, p, scale, seed);
    int groups = d / VEC;
    // Column k + i of a group of width W: element i of every group is a contiguous run.
    auto slot = [&](int k, int i, int W) { return W == VEC ? i * groups + k / VEC : k; };
    for_own_columns(d, [&](int k, auto width) {
        constexpr int W = decltype(width)::value;
        for (int i = 0; i < W; i++) dw_acc[slot(k, i, W)] = 0.0f;
    });
    for (int row = r0; row < r1; row++) {
        size_t base = (size_t)row * d;
        float r = rstd[row];
        float dot = 0.0f;
        for_own_columns(d, [&](int k, auto width) {
            constexpr int W = decltype(width)::value;
            float g[W], xv[W], wv[W];
            load_w<W>(g, dout + base + k);
            load_w<W>(xv, x + base + k);
            load_w<W>(wv, w + k);
            for (int i = 0; i < W; i++) dot += g[i] * wv[i] * xv[i];
        });
        dot = block_sum(dot);
        float c = r * r * dot / (float)d;
        for_own_columns(d, [&](int k, auto width) {
            constexpr int W = decltype(width)::value;
            float g[W], xv[W], wv[W], acc[W];
            load_w<W>(g, dout + base + k);
            load_w<W>(xv, x + base + k);
            load_w<W>(wv, w + k);
            load_w<W>(acc, dx + base + k);
            for (int i = 0; i < W; i++) {
                dw_acc[slot(k, i, W)] += g[i] * xv[i] * r;
                acc[i] += r * (g[i] * wv[i] - xv[i] * c);
            }
            store_w<W>(dx + base + k, acc);
            if (dbranch != nullptr) {
                for (int i = 0; i < W; i++) acc[i] = dropout_keep(round_bf(acc[i]), p, scale, seed, base + k + i);
                store_w<W>(dbranch + base + k, acc);
            }
        });
    }
    for_own_columns(d, [&](int k, auto width) {
        constexpr int W = decltype(width)::value;
        for (int i = 0; i < W; i++) partial[(size_t)chunk * d + k + i] = dw_acc[slot(k, i, W)];
    });
}

// dw[k] += sum over chunks (in order) of partial[chunk * d + k]. Block (32, 8): lane x takes a
// column, the 8 rows of threads take every 8th chunk in order, then one row adds the 8 sums
// in order, so the result does not depend on scheduling.
extern "C" __global__ void rmsnorm_backward_dw_reduce(float* dw, const float* partial, int d, int n_chunks) {
    __shared__ float sums[8][32];
    int k = blockIdx.x * 32 + threadIdx.x;
    float acc = 0.0f;
    if (k < d)
        for (int c = threadIdx.y; c < n_chunks; c += 8) acc += partial[(size_t)c * d + k];
    sums[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && k < d) {
        float total = 0.0f;
        for (int y = 0; y < 8; y++) total += sums[y][threadIdx.x];
        dw[k] += total;
    }
}
