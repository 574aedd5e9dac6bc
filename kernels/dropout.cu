// Inverted dropout with the counter-based mask of src/rng.rs: element i is dropped when
// uniform(seed, i) < p. The same call is its own backward. (In the model's step the masks are
// applied inside residual_rmsnorm_forward and rmsnorm_backward; this is the standalone op.)
// Thread t takes elements [VEC t, VEC t + VEC) with 16-byte accesses (len / VEC groups); the
// last len % VEC elements go one per thread. 32-bit indices: the host checks len fits.
#include "common.cuh"

extern "C" __global__ void dropout_bf16(__nv_bfloat16* x, int len, float p, float scale, uint64_t seed) {
    int groups = len / VEC, stride = gridDim.x * blockDim.x;
    int t0 = blockIdx.x * blockDim.x + threadIdx.x;
    for (int t = t0; t < groups; t += stride) {
        float v[VEC];
        load8(v, x + t * VEC);
        for (int i = 0; i < VEC; i++) v[i] = dropout_keep(v[i], p, scale, seed, (uint64_t)t * VEC + i);
        store8(x + t * VEC, v);
    }
    for (int i = groups * VEC + t0; i < len; i += stride) x[i] = to_bf(dropout_keep(bf(x[i]), p, scale, seed, i));
}

extern "C" __global__ void dropout_f32(float* x, int len, float p, float scale, uint64_t seed) {
    int groups = len / VEC, stride = gridDim.x * blockDim.x;
    int t0 = blockIdx.x * blockDim.x + threadIdx.x;
    for (int t = t0; t < groups; t += stride) {
        float v[VEC];
        load8(v, x + t * VEC);
        for (int i = 0; i < VEC; i++) v[i] = dropout_keep(v[i], p, scale, seed, (uint64_t)t * VEC + i);
        store8(x + t * VEC, v);
    }
    for (int i = groups * VEC + t0; i < len; i += stride) x[i] = dropout_keep(x[i], p, scale, seed, i);
}
