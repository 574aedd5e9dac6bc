// A plain GEMM for the shapes cuBLASLt has no algorithm for (and for cross-checking it, with
// SFT_GEMM_FALLBACK=1). Column-major, cuBLASLt conventions: D[m×n] = alpha·op(A)·op(B) + beta·C,
// C and D in one layout (c_in may be c itself: each thread reads its element before writing it),
// bf16 A and B, fp32 accumulation. One thread per element of D: slow, simple, correct.
#include "common.cuh"

__device__ __forceinline__ float gemm_dot(const __nv_bfloat16* a, const __nv_bfloat16* b, int transa, int transb,
                                          int i, int j, int k, long long lda, long long ldb) {
    float acc = 0.0f;
    for (int l = 0; l < k; l++) {
        float av = bf(transa ? a[l + (long long)i * lda] : a[i + (long long)l * lda]);
        float bv = bf(transb ? b[j + (long long)l * ldb] : b[l + (long long)j * ldb]);
        acc += av * bv;
    }
    return acc;
}

// Grid: (ceil(m / 16), ceil(n / 16)); block (16, 16).
extern "C" __global__ void matmul_fallback_f32out(float* c, const float* c_in, const __nv_bfloat16* a,
                                                const __nv_bfloat16* b, int transa, int transb, int m, int n, int k,
                                                long long lda, long long ldb, long long ldc, float alpha, float beta) {
    int i = blockIdx.x * 16 + threadIdx.x, j = blockIdx.y * 16 + threadIdx.y;
    if (i >= m || j >= n) return;
    float acc = alpha * gemm_dot(a, b, transa, transb, i, j, k, lda, ldb);
    long long o = i + (long long)j * ldc;
    c[o] = beta == 0.0f ? acc : acc + beta * c_in[o];
}

extern "C" __global__ void matmul_fallback_bf16out(__nv_bfloat16* c, const __nv_bfloat16* c_in,
                                                 const __nv_bfloat16* a, const __nv_bfloat16* b, int transa,
                                                 int transb, int m, int n, int k, long long lda, long long ldb,
                                                 long long ldc, float alpha, float beta) {
    int i = blockIdx.x * 16 + threadIdx.x, j = blockIdx.y * 16 + threadIdx.y;
    if (i >= m || j >= n) return;
    float acc = alpha * gemm_dot(a, b, transa, transb, i, j, k, lda, ldb);
    long long o = i + (long long)j * ldc;
    c[o] = to_bf(beta == 0.0f ? acc : acc + beta * bf(c_in[o]));
}
