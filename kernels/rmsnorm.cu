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
