// Kernels with known defects, run by `emulate` before the real ones: the shared-memory checks
// must find them, or the run fails (a check that cannot fail proves nothing). Compiled like a
// kernel file (emu.h, instrumented), never by nvcc.

// Each thread writes its slot, then reads its neighbour's with no __syncthreads between.
extern "C" __global__ void selftest_missing_barrier(float* out) {
    __shared__ float slot[256];
    slot[threadIdx.x] = (float)threadIdx.x;
    out[threadIdx.x] = slot[(threadIdx.x + 32) % blockDim.x];
}

// The same with the barrier: no race.
extern "C" __global__ void selftest_with_barrier(float* out) {
    __shared__ float slot[256];
    slot[threadIdx.x] = (float)threadIdx.x;
    __syncthreads();
    out[threadIdx.x] = slot[(threadIdx.x + 32) % blockDim.x];
}

// Lane l reads row l of a 32 × 32 tile: a stride of 32 words puts every lane in one bank.
extern "C" __global__ void selftest_bank_conflict(float* out) {
    __shared__ float tile[32][32];
    for (int c = 0; c < 32; c++) tile[threadIdx.x % 32][c] = (float)c;
    __syncthreads();
    out[threadIdx.x] = tile[threadIdx.x % 32][0];
}
