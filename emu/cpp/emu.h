// The CUDA built-ins that kernels/*.cu use, for compiling a kernel file as host C++ (g++
// -std=c++20) and running it on the CPU: one std::thread per CUDA thread, a CTA at a time
// (runtime.cpp). The kernel files are compiled with -fsanitize=thread, but against our own
// __tsan_* hooks (runtime.cpp), not ThreadSanitizer's runtime: every load and store of the
// kernel code reaches the hooks, and those that touch `__shared__` arrays (static arrays, in
// the executable's .bss) go through the shared-memory race check and the bank conflict count. This header declares only: the runtime itself is compiled uninstrumented.
#pragma once
#include <cuda_bf16.h>
#include <math.h>
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <utility>

using std::max;
using std::min;

#undef __global__
#undef __device__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#undef __align__
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One CTA runs at a time, so a static array is the CTA's shared memory (uninitialized: the
// runtime's check reports a read of a word the CTA has not written).
#define __shared__ static
#define __align__(n) alignas(n)

struct EmuDim {
    unsigned x, y, z;
};
extern thread_local EmuDim threadIdx, blockIdx, blockDim, gridDim;

void __syncthreads();
float __shfl_xor_sync(unsigned mask, float v, int lane_mask);
float __shfl_sync(unsigned mask, float v, int src_lane);
[[noreturn]] void __trap();
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }

// A launch as cuLaunchKernel takes it: grid, block, dynamic shared memory, and one pointer per
// kernel argument (to the argument's value).
struct EmuLaunch {
    unsigned grid[3], block[3];
    unsigned smem;
};
void emu_run_grid(const EmuLaunch* cfg, void (*body)(void*), void* ctx);

template <class... A, size_t... I>
void emu_apply(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_reference_t<A>*>(args[I])...);
}

template <class... A>
void emu_call(void (*kernel)(A...), const EmuLaunch* cfg, void** args) {
    struct Ctx {
        void (*kernel)(A...);
        void** args;
    } ctx{kernel, args};
    emu_run_grid(
        cfg,
        [](void* p) {
            Ctx* c = static_cast<Ctx*>(p);
            emu_apply(c->kernel, c->args, std::index_sequence_for<A...>{});
        },
        &ctx);
}

// The host entry of kernel NAME: emu_NAME(launch, args).
#define EMU_ENTRY(kernel, name) \
    extern "C" void emu_##name(const EmuLaunch* cfg, void** args) { emu_call(kernel, cfg, args); }
