// Token embedding forward and a deterministic backward.
#include "common.cuh"

// out[i, :] = table[ids[i], :]. Grid-stride over n * d.
extern "C" __global__ void embedding_forward(__nv_bfloat16* out, const uint32_t* ids, const __nv_bfloat16* table,
                                             int n, int d) {
    size_t total = (size_t)n * d;
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < total;
         t += (size_t)gridDim.x * blockDim.x) {
        size_t row = t / d, k = t % d;
        out[t] = table[(size_t)ids[row] * d + k];
    }
}

// dtable[group_id[g], k] += sum of dout[order[t], k] for t in group_start[g]..group_start[g+1].
// The host groups the tokens by id (stable, so the summation order is fixed): each table row is
// owned by one block column, there are no atomics, and the result does not depend on scheduling.
// Grid: (n_groups, ceil(d / blockDim.x)).
extern "C" __global__ void embedding_backward_grouped(float* dtable, const __nv_bfloat16* dout,
                                                      const uint32_t* order, const uint32_t* group_start,
                                                      const uint32_t* group_id, int d) {
    int g = blockIdx.x;
    int k = blockIdx.y * blockDim.x + threadIdx.x;
    if (k >= d) return;
    float acc = 0.0f;
    for (uint32_t t = group_start[g]; t < group_start[g + 1]; t++) acc += bf(dout[(size_t)order[t] * d + k]);
    dtable[(size_t)group_id[g] * d + k] += acc;
}

// Same, for a table gradient kept in bf16.
extern "C" __global__ void embedding_backward_grouped_bf16(__nv_bfloat16* dtable, const __nv_bfloat16* dout,
                                                           const uint32_t* order, const uint32_t* group_start,
                                                           const uint32_t* group_id, int d) {
    int g = blockIdx.x;
    int k = blockIdx.y * blockDim.x + threadIdx.x;
    if (k >= d) return;
    float acc = 0.0f;
    for (uint32_t t = group_start[g]; t < group_start[g + 1]; t++) acc += bf(dout[(size_t)order[t] * d + k]);
    size_t i = (size_t)group_id[g] * d + k;
    dtable[i] = to_bf(bf(dtable[i]) + acc);
}
