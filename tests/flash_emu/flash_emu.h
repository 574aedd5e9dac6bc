// Host emulation of the CUDA built-ins that kernels/flash_attention.cu uses, so that the real
// kernel source runs on a CPU (no GPU on the development machine). One std::thread per CUDA
// thread; a CTA at a time. Collective operations follow the PTX ISA:
// - __syncthreads: a barrier of the CTA's threads; __shfl_xor_sync: a warp exchange.
// - ldmatrix.x4 (.trans): every lane posts its row address, then reads the 8×8 matrices'
//   elements as the PTX ISA assigns them (asserting 16-byte aligned, in-bounds rows).
// - mma.m16n8k16.row.col bf16 → fp32: every lane posts its A/B/C fragments, the 16×16 and 16×8
//   operands are rebuilt from the ISA's fragment tables, and each lane computes its own D.
// - cp.async: recorded per thread and performed only at the cp.async.wait_group that retires
//   its group, so a read of a tile before its wait sees stale data and the check fails.
// Two checks on shared memory beyond the values (main.cpp prints them after the cases):
// - races: every 4-byte word keeps who last read it (ldmatrix, per warp) and which async copy
//   writes it, in "epochs" counted by __syncthreads. A copy that another warp's ldmatrix reads
//   in an epoch between the copy's issue and its wait, or in the same epoch as the issue before
//   it, is a race that no barrier orders; so is a second pending copy to the same word. Plain
//   C++ loads in the kernel (the lse/D rows of dK/dV) are not seen.
//   Plain stores through st_shared_u32 (the dSᵀ tile of the backward) are tracked too: an
//   ldmatrix of a word that another warp stored in the same epoch, or a store over a word that
//   another warp read in the same epoch, is a race.
// - bank conflicts: each 8-row phase of an ldmatrix should hit 8 distinct 16-byte bank groups.
// - wgmma.mma_async m64n64k16 and m64n32k16 (bf16 → fp32; A from shared memory or registers, B
//   from shared memory, either K-major or MN-major in the 128-byte swizzle): the 4 warps of a warpgroup post their
//   descriptors (which must agree) and A fragments; each thread computes its own accumulator
//   elements from the operands the descriptors address, per the ISA's canonical layouts. The
//   result reaches the registers only at the wgmma.wait_group that retires its group, and the
//   registers read NaN in between, so a read before the wait shows; a wgmma without a
//   wgmma.fence since the last wait, or reading shared words that cp.async or a store wrote and
//   the writing thread has not since fenced with fence.proxy.async, is an error. Its shared reads are in flight from the
//   issue to that wait: a copy or store over them meanwhile, or in the wait's barrier epoch
//   from another warp, is a race.
// atomicAdd(float*, float) (the atomic dQ path) is std::atomic_ref<float>::fetch_add.
// Semaphores between CTAs (the backward's ordered dQ accumulation): ld_relaxed, the fence after
// the wait and st_release are C++ relaxed loads, an acquire fence and release stores. Blocks run
// in dispatch order (x fastest, then y), one at a time, where a wait that is not already
// satisfied can only be on a later block (a deadlock on a GPU, which dispatches in that order):
// it aborts. emu_launch(..., ctas) runs `ctas` consecutive
// blocks at once, so that the waits really wait (and a wait on a later window times out).
// Used by tests/flash_emu/main.cpp (scripts/flash_emulate.sh); never by the real build.
#pragma once
#include <cuda_bf16.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <barrier>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

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
#define __shared__ static
#define __align__(n) alignas(n)

struct EmuDim {
    unsigned x, y, z;
};
inline thread_local EmuDim threadIdx, blockIdx, blockDim, gridDim;

// Shadow state of one 4-byte word of shared memory (see the race check above).
struct EmuWord {
    int read_epoch = -1, read_warp = -1;   // read_warp -2: several warps in read_epoch
    int pend_warp = -1, pend_epoch = -1;   // an async copy issued and not yet waited for
    int write_warp = -1, write_lo = -1, write_hi = -1;  // the last copy: issue and wait epochs
    int store_warp = -1, store_epoch = -1;              // the last plain store (st_shared_u32)
    bool unfenced = false;  // written by cp.async or a store, not yet behind a fence.proxy.async (wgmma)
    // wgmma operand reads: how many are in flight (issued, not yet retired by a wait), the
    // reading warp (-2: several), and the epoch of the last retirement.
    int wg_pending = 0, wg_warp = -1, wg_retired = -1;
};

// The barrier of a warpgroup's 128 threads at a wgmma (.sync.aligned: all four warps execute
// it). One that a warp never reaches (it skipped the wgmma, or returned) aborts after 60 s with
// a message instead of hanging the run.
struct EmuTimedBarrier {
    std::mutex m;
    std::condition_variable cv;
    int count = 0, expected;
    long generation = 0;
    explicit EmuTimedBarrier(int n) : expected(n) {}
    void arrive_and_wait(const char* what) {
        std::unique_lock<std::mutex> lock(m);
        const long gen = generation;
        if (++count == expected) {
            count = 0;
            generation++;
            cv.notify_all();
            return;
        }
        if (!cv.wait_for(lock, std::chrono::seconds(60), [&] { return generation != gen; })) {
            fprintf(stderr, "%s: a warp of the warpgroup never arrived (diverged around a wgmma?)\n", what);
            abort();
        }
    }
};

// Counts over the whole run.
struct EmuStats {
    std::atomic<long> races{0}, ldsm_phases{0}, ldsm_conflicted{0}, ldsm_extra_wavefronts{0};
    std::atomic<int> printed{0};
};
inline EmuStats emu_stats;

struct EmuCta {
    int threads;
    std::vector<unsigned char> smem;
    std::vector<EmuWord> shadow;
    std::mutex shadow_lock;
    std::unique_ptr<std::barrier<>> block;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<std::unique_ptr<EmuTimedBarrier>> warpgroups;
    // Per warp, per lane: 16 words of exchange space.
    std::vector<uint32_t> xchg;
    // Per thread: what it posts for a wgmma (A descriptor, B descriptor, A fragments).
    std::vector<uint64_t> wg_post;
    EmuCta(int t, size_t smem_bytes)
        : threads(t), smem(smem_bytes + 16, 0xCD), shadow((smem_bytes + 16) / 4), xchg((t / 32) * 32 * 16),
          wg_post((size_t)t * 4) {
        block = std::make_unique<std::barrier<>>(t);
        for (int w = 0; w < t / 32; w++) warps.push_back(std::make_unique<std::barrier<>>(32));
        for (int g = 0; g < t / 128; g++) warpgroups.push_back(std::make_unique<EmuTimedBarrier>(128));
    }
};
inline thread_local EmuCta* emu_cta = nullptr;
// Blocks of the current launch that run at once (1: one at a time).
inline std::atomic<int> emu_window{1};

// __syncthreads calls this thread has passed: every thread of a CTA passes the same ones.
inline thread_local int emu_epoch = 0;

// Blocks running at once (a window of emu_launch) run at different speeds: the first of the
// window, which the others may wait on (the backward's dQ semaphores), sleeps 20 ms at each
// barrier, so that the later ones catch up and their waits, and the reads those waits order,
// really happen against a writer that is not done.
inline void __syncthreads() {
    const int window = emu_window.load();
    if (window > 1) {
        const unsigned linear = blockIdx.x + blockIdx.y * gridDim.x;
        if (linear % (unsigned)window == 0) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    emu_cta->block->arrive_and_wait();
    emu_epoch++;
}

inline void emu_race(const char* what, uint32_t byte_off, int other_warp) {
    emu_stats.races++;
    if (emu_stats.printed++ < 10)
        fprintf(stderr, "race: %s at shared byte %u: block (%u, %u) warp %u epoch %d, other warp %d\n", what,
                byte_off, blockIdx.x, blockIdx.y, threadIdx.x / 32, emu_epoch, other_warp);
}
inline void emu_warp_sync() { emu_cta->warps[threadIdx.x / 32]->arrive_and_wait(); }
inline uint32_t* emu_slot(int lane) { return &emu_cta->xchg[((threadIdx.x / 32) * 32 + lane) * 16]; }
[[noreturn]] inline void __trap() {
    fprintf(stderr, "__trap() in block (%u, %u) thread %u\n", blockIdx.x, blockIdx.y, threadIdx.x);
    abort();
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }

inline float __shfl_xor_sync(unsigned, float v, int mask) {
    int lane = threadIdx.x % 32;
    memcpy(emu_slot(lane), &v, 4);
    emu_warp_sync();
    float r;
    memcpy(&r, emu_slot(lane ^ mask), 4);
    emu_warp_sync();
    return r;
}

inline unsigned char* emu_dynamic_smem() { return emu_cta->smem.data(); }
inline uint32_t dynamic_smem_size() { return (uint32_t)(emu_cta->smem.size() - 16); }
inline uint32_t smem_u32(const void* p) {
    const unsigned char* c = static_cast<const unsigned char*>(p);
    assert(c >= emu_cta->smem.data() && c < emu_cta->smem.data() + emu_cta->smem.size());
    return (uint32_t)(c - emu_cta->smem.data());
}

// A cp.async reads its global source at some time between its issue and its wait: the copy
// lands the value read at issue (the earliest, most adversarial choice), and a source that
// changes before the wait is an error (a read not ordered after the writer's release, e.g. the
// deferred backward's old partial sums fetched before the semaphore wait).
struct EmuCopy {
    void* dst;
    const void* src;
    int bytes;
    bool valid;
    unsigned char at_issue[16];
};
inline thread_local std::vector<EmuCopy> emu_open_group;
// Shared words this thread's copies wrote that no fence.proxy.async of this thread has fenced.
inline thread_local std::vector<uint32_t> emu_unfenced;
inline thread_local std::deque<std::vector<EmuCopy>> emu_groups;

// A write (copy or store) of shared word `w` at byte `b` by `warp`: a race with a wgmma that
// reads it and has not retired, or retired in this epoch in another warp (no barrier between).
inline void emu_check_wgmma_operand(EmuWord& w, uint32_t b, int warp, const char* what) {
    if (w.wg_pending > 0 || (w.wg_retired == emu_epoch && w.wg_warp != warp)) {
        char msg[96];
        snprintf(msg, sizeof msg, "%s over a wgmma operand in flight", what);
        emu_race(msg, b, w.wg_warp);
    }
}

inline void emu_cp_async(void* smem, const void* gmem, int bytes, bool valid) {
    uint32_t off = smem_u32(smem);
    if (off % bytes != 0 || off + bytes > dynamic_smem_size()) {
        fprintf(stderr, "cp.async: bad shared offset %u (%d bytes)\n", off, bytes);
        abort();
    }
    const int warp = (int)threadIdx.x / 32;
    {
        std::lock_guard<std::mutex> guard(emu_cta->shadow_lock);
        for (uint32_t b = off; b < off + (uint32_t)bytes; b += 4) {
            EmuWord& w = emu_cta->shadow[b / 4];
            if (w.pend_warp >= 0 && w.pend_warp != warp) emu_race("two pending cp.async", b, w.pend_warp);
            // Read in this epoch by another warp: nothing orders that read before this copy.
            if (w.read_epoch == emu_epoch && w.read_warp != warp) emu_race("cp.async over a read", b, w.read_warp);
            emu_check_wgmma_operand(w, b, warp, "cp.async");
            w.pend_warp = warp;
            w.pend_epoch = emu_epoch;
        }
    }
    EmuCopy c{smem, gmem, bytes, valid, {}};
    if (valid) memcpy(c.at_issue, gmem, bytes);
    emu_open_group.push_back(c);
}
inline void cp_async16(void* smem, const void* gmem, bool valid) { emu_cp_async(smem, gmem, 16, valid); }
inline void cp_async4(void* smem, const void* gmem, bool valid) { emu_cp_async(smem, gmem, 4, valid); }
inline void cp_async_commit() {
    emu_groups.push_back(std::move(emu_open_group));
    emu_open_group.clear();
}
template <int N>
inline void cp_async_wait() {
    const int warp = (int)threadIdx.x / 32;
    while ((int)emu_groups.size() > N) {
        std::lock_guard<std::mutex> guard(emu_cta->shadow_lock);
        for (const EmuCopy& c : emu_groups.front()) {
            if (c.valid) {
                if (memcmp(c.at_issue, c.src, c.bytes) != 0) {
                    emu_stats.races++;
                    if (emu_stats.printed++ < 10)
                        fprintf(stderr, "race: the global source of a cp.async changed between its issue and its wait: block (%u, %u) thread %u\n",
                                blockIdx.x, blockIdx.y, threadIdx.x);
                }
                memcpy(c.dst, c.at_issue, c.bytes);
            } else {
                memset(c.dst, 0, c.bytes);
            }
            uint32_t off = smem_u32(c.dst);
            for (uint32_t b = off; b < off + (uint32_t)c.bytes; b += 4) {
                EmuWord& w = emu_cta->shadow[b / 4];
                // Another warp read the word after this copy was issued: it saw old or new data.
                if (w.read_epoch >= w.pend_epoch && w.read_warp != warp) emu_race("read during cp.async", b, w.read_warp);
                w.write_warp = warp;
                w.write_lo = w.pend_epoch;
                w.write_hi = emu_epoch;
                w.pend_warp = w.pend_epoch = -1;
                w.unfenced = true;
                emu_unfenced.push_back(b);
            }
        }
        emu_groups.pop_front();
    }
}

// Plain stores to shared memory (4 bytes: the dSᵀ tile; 8: the deferred backward's staged dQ
// partials), seen by the race check.
inline void emu_st_shared(void* p, const void* v, uint32_t bytes, const char* what) {
    uint32_t off = smem_u32(p);
    if (off % bytes != 0 || off + bytes > dynamic_smem_size()) {
        fprintf(stderr, "%s: bad shared offset %u\n", what, off);
        abort();
    }
    const int warp = (int)threadIdx.x / 32;
    {
        std::lock_guard<std::mutex> guard(emu_cta->shadow_lock);
        for (uint32_t b = off; b < off + bytes; b += 4) {
            EmuWord& w = emu_cta->shadow[b / 4];
            if (w.pend_warp >= 0) emu_race("store over a pending cp.async", b, w.pend_warp);
            if (w.read_epoch == emu_epoch && w.read_warp != warp)
                emu_race("store over a read without a barrier", b, w.read_warp);
            emu_check_wgmma_operand(w, b, warp, "store");
            w.store_warp = warp;
            w.store_epoch = emu_epoch;
            // A generic-proxy write, as a copy: a wgmma may read it only behind this thread's
            // fence.proxy.async.
            w.unfenced = true;
            emu_unfenced.push_back(b);
        }
    }
    memcpy(p, v, bytes);
}
inline void st_shared_u32(void* p, uint32_t v) { emu_st_shared(p, &v, 4, "st_shared_u32"); }
inline void st_shared_f2(float* p, float2 v) { emu_st_shared(p, &v, 8, "st_shared_f2"); }
inline void st_shared_u4(void* p, uint4 v) { emu_st_shared(p, &v, 16, "st_shared_u4"); }

// A read of the shared word at byte `b` by `warp` (ldmatrix rows, 16-byte loads), under the
// shadow lock: a race against pending copies, copies and stores of other warps that no barrier
// orders before it; then recorded for the checks of later writes.
inline void emu_read_word(uint32_t b, int warp, const char* what) {
    char msg[96];
    EmuWord& w = emu_cta->shadow[b / 4];
    if (w.pend_warp >= 0 && w.pend_warp != warp) {
        snprintf(msg, sizeof msg, "%s of a pending cp.async", what);
        emu_race(msg, b, w.pend_warp);
    }
    if (w.write_warp >= 0 && w.write_warp != warp && w.write_lo <= emu_epoch && emu_epoch <= w.write_hi) {
        snprintf(msg, sizeof msg, "%s without a barrier after cp.async", what);
        emu_race(msg, b, w.write_warp);
    }
    if (w.store_warp >= 0 && w.store_warp != warp && w.store_epoch == emu_epoch) {
        snprintf(msg, sizeof msg, "%s of a store without a barrier", what);
        emu_race(msg, b, w.store_warp);
    }
    if (w.read_epoch == emu_epoch && w.read_warp != warp) w.read_warp = -2;
    else if (w.read_epoch != emu_epoch) w.read_epoch = emu_epoch, w.read_warp = warp;
}

// A plain 16-byte load from shared memory (the deferred backward's staged partials and old
// sums), checked as ldmatrix rows are: against pending copies, copies and stores of other warps
// that no barrier orders before it.
inline float4 ld_shared_f4(const float* p) {
    uint32_t off = smem_u32(p);
    if (off % 16 != 0 || off + 16 > dynamic_smem_size()) {
        fprintf(stderr, "ld_shared_f4: bad shared offset %u\n", off);
        abort();
    }
    const int warp = (int)threadIdx.x / 32;
    {
        std::lock_guard<std::mutex> guard(emu_cta->shadow_lock);
        for (uint32_t b = off; b < off + 16; b += 4) emu_read_word(b, warp, "load");
    }
    float4 v;
    memcpy(&v, p, 16);
    return v;
}

// ---- global memory between blocks ----
inline void st_release(uint32_t* p, uint32_t v) { std::atomic_ref<uint32_t>(*p).store(v, std::memory_order_release); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
// The atomic dQ path (flash_backward_atomic_HD): a relaxed fp32 read-modify-write, as red.add is
// on a GPU (the order of the adds, and so the last bits, follows the threads' timing).
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v, std::memory_order_relaxed); }
inline float2 __ldcg(const float2* p) { return *p; }
inline void __stcg(float2* p, float2 v) { *p = v; }
inline void __stcg(float4* p, float4 v) { *p = v; }
// The ordered path: a relaxed read early, then spin from it and fence (acquire).
inline uint32_t ld_relaxed(const uint32_t* p) {
    return std::atomic_ref<uint32_t>(*const_cast<uint32_t*>(p)).load(std::memory_order_relaxed);
}
inline void wait_semaphore_from(const uint32_t* sem, uint32_t seen, uint32_t want) {
    if (seen != want) {
        if (emu_window.load() == 1 && ld_relaxed(sem) != want) {
            fprintf(stderr, "block (%u, %u) waits for semaphore value %u (holds %u): no earlier block will set it\n",
                    blockIdx.x, blockIdx.y, want, ld_relaxed(sem));
            abort();
        }
        auto t0 = std::chrono::steady_clock::now();
        while (ld_relaxed(sem) != want) {
            if (std::chrono::steady_clock::now() - t0 > std::chrono::seconds(60)) {
                fprintf(stderr, "block (%u, %u): semaphore wait for %u timed out (deadlock?)\n", blockIdx.x, blockIdx.y,
                        want);
                abort();
            }
            std::this_thread::yield();
        }
    }
    std::atomic_thread_fence(std::memory_order_acquire);
}
inline uint16_t emu_smem_u16(uint32_t byte_off) {
    uint16_t v;
    memcpy(&v, emu_cta->smem.data() + byte_off, 2);
    return v;
}

// Lane 0 of a warp whose 32 ldmatrix row addresses are posted: bank groups per 8-row phase, and
// the race check of the 32 rows (16 bytes each) against pending and recent copies.
inline void emu_ldsm_check() {
    const int warp = (int)threadIdx.x / 32;
    for (int phase = 0; phase < 4; phase++) {
        int hits[8] = {0}, worst = 0;
        for (int l = 8 * phase; l < 8 * phase + 8; l++) worst = std::max(worst, ++hits[(emu_slot(l)[0] / 16) % 8]);
        emu_stats.ldsm_phases++;
        if (worst > 1) emu_stats.ldsm_conflicted++, emu_stats.ldsm_extra_wavefronts += worst - 1;
    }
    std::lock_guard<std::mutex> guard(emu_cta->shadow_lock);
    for (int l = 0; l < 32; l++) {
        for (uint32_t b = emu_slot(l)[0]; b < emu_slot(l)[0] + 16; b += 4) emu_read_word(b, warp, "ldmatrix");
    }
}

inline void emu_ldsm(uint32_t* r, uint32_t addr, bool trans) {
    int lane = threadIdx.x % 32;
    if (addr % 16 != 0 || addr + 16 > dynamic_smem_size()) {
        fprintf(stderr, "ldmatrix: bad row address %u (lane %d)\n", addr, lane);
        abort();
    }
    emu_slot(lane)[0] = addr;
    emu_warp_sync();
    if (lane == 0) emu_ldsm_check();
    int g = lane / 4, c = lane % 4;
    for (int i = 0; i < 4; i++) {
        uint16_t lo, hi;
        if (!trans) {
            uint32_t row = emu_slot(8 * i + g)[0];
            lo = emu_smem_u16(row + 2 * (2 * c));
            hi = emu_smem_u16(row + 2 * (2 * c + 1));
        } else {
            lo = emu_smem_u16(emu_slot(8 * i + 2 * c)[0] + 2 * g);
            hi = emu_smem_u16(emu_slot(8 * i + 2 * c + 1)[0] + 2 * g);
        }
        r[i] = (uint32_t)lo | ((uint32_t)hi << 16);
    }
    emu_warp_sync();
}
inline void ldsm_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, uint32_t addr) {
    uint32_t r[4];
    emu_ldsm(r, addr, false);
    r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
}
inline void ldsm_x4_t(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, uint32_t addr) {
    uint32_t r[4];
    emu_ldsm(r, addr, true);
    r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
}

inline float emu_bf16_lo(uint32_t v) {
    uint32_t b = v << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}
inline float emu_bf16_hi(uint32_t v) {
    uint32_t b = v & 0xffff0000u;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

inline void mma_bf16(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
    int lane = threadIdx.x % 32;
    uint32_t* s = emu_slot(lane);
    for (int i = 0; i < 4; i++) s[i] = a[i];
    s[4] = b0;
    s[5] = b1;
    emu_warp_sync();
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; l++) {
        const uint32_t* t = emu_slot(l);
        int g = l / 4, c = l % 4;
        A[g][2 * c] = emu_bf16_lo(t[0]), A[g][2 * c + 1] = emu_bf16_hi(t[0]);
        A[g + 8][2 * c] = emu_bf16_lo(t[1]), A[g + 8][2 * c + 1] = emu_bf16_hi(t[1]);
        A[g][2 * c + 8] = emu_bf16_lo(t[2]), A[g][2 * c + 9] = emu_bf16_hi(t[2]);
        A[g + 8][2 * c + 8] = emu_bf16_lo(t[3]), A[g + 8][2 * c + 9] = emu_bf16_hi(t[3]);
        B[2 * c][g] = emu_bf16_lo(t[4]), B[2 * c + 1][g] = emu_bf16_hi(t[4]);
        B[2 * c + 8][g] = emu_bf16_lo(t[5]), B[2 * c + 9][g] = emu_bf16_hi(t[5]);
    }
    emu_warp_sync();
    int g = lane / 4, c = lane % 4;
    for (int e = 0; e < 4; e++) {
        int row = g + 8 * (e / 2), col = 2 * c + e % 2;
        float acc = d[e];
        for (int k = 0; k < 16; k++) acc += A[row][k] * B[k][col];
        d[e] = acc;
    }
}

// ---- warpgroup MMA (sm_90a) ----
// fence.proxy.async: the thread's copies so far become visible to the async proxy (wgmma).
inline void fence_proxy_async() {
    std::lock_guard<std::mutex> guard(emu_cta->shadow_lock);
    for (uint32_t b : emu_unfenced) emu_cta->shadow[b / 4].unfenced = false;
    emu_unfenced.clear();
}

// One issued wgmma's result for one thread, written to its accumulator registers at the wait
// that retires its commit group (-1: not committed yet).
struct EmuWgmma {
    float (*d)[4];
    int nb;  // 8-column blocks of d
    float v[8][4];
    int group;
    std::vector<uint32_t> words;  // lane 0: the shared words its warp's operands read, in flight
};
inline thread_local std::vector<EmuWgmma> emu_wgmma_pending;
inline thread_local int emu_wgmma_groups = 0;    // commit groups so far
inline thread_local bool emu_wgmma_fenced = false;  // a wgmma.fence since the last wait

inline int warpgroup_index() { return (int)threadIdx.x / 128; }
inline void wgmma_fence() { emu_wgmma_fenced = true; }
inline void wgmma_commit() {
    for (EmuWgmma& p : emu_wgmma_pending)
        if (p.group < 0) p.group = emu_wgmma_groups;
    emu_wgmma_groups++;
}
template <int N>
inline void wgmma_wait() {
    std::vector<EmuWgmma> keep;
    for (EmuWgmma& p : emu_wgmma_pending) {
        if (p.group < 0) {
            fprintf(stderr, "wgmma.wait_group with an uncommitted wgmma (thread %u)\n", threadIdx.x);
            abort();
        }
        if (p.group < emu_wgmma_groups - N) {
            memcpy(p.d, p.v, sizeof(p.v[0]) * p.nb);
            if (!p.words.empty()) {
                std::lock_guard<std::mutex> guard(emu_cta->shadow_lock);
                for (uint32_t b : p.words) {
                    EmuWord& w = emu_cta->shadow[b / 4];
                    w.wg_pending--;
                    w.wg_retired = emu_epoch;
                }
            }
        } else {
            keep.push_back(p);
        }
    }
    emu_wgmma_pending = keep;
    emu_wgmma_fenced = false;
}
template <int NB = 8>
inline void wgmma_pin(float (*)[4]) {}

// The shared byte address of element (row, k) of a K-major operand, or (mn, k) of an MN-major one,
// that `desc` describes (128-byte swizzle only: mode 1, base offset 0).
inline uint32_t emu_wgmma_addr(uint64_t desc, int rc, int k, bool mn_major) {
    const uint32_t start = (uint32_t)(desc & 0x3FFF) << 4, lbo = (uint32_t)((desc >> 16) & 0x3FFF) << 4,
                   sbo = (uint32_t)((desc >> 32) & 0x3FFF) << 4;
    if ((desc >> 62) != 1 || ((desc >> 49) & 7) != 0) {
        fprintf(stderr, "wgmma: descriptor %#llx is not the 128-byte swizzle with base offset 0\n",
                (unsigned long long)desc);
        abort();
    }
    uint32_t a;
    if (!mn_major) {
        // A k-step inside the 128-byte row: 16 columns (32 bytes) from the start's column.
        if (start % 128 + 32 > 128) {
            fprintf(stderr, "wgmma: K-major start %u crosses a 128-byte row\n", start);
            abort();
        }
        a = start + (uint32_t)(rc % 8) * 128 + (uint32_t)(rc / 8) * sbo + 2 * (uint32_t)k;
    } else {
        if (start % 128 != 0) {
            fprintf(stderr, "wgmma: MN-major start %u is not at a row\n", start);
            abort();
        }
        a = start + 2 * (uint32_t)(rc % 64) + (uint32_t)(rc / 64) * lbo + (uint32_t)(k % 8) * 128 +
            (uint32_t)(k / 8) * sbo;
    }
    return a ^ (((a >> 7) & 7) << 4);
}

inline float emu_smem_bf16(uint32_t byte_off) {
    uint32_t b = (uint32_t)emu_smem_u16(byte_off) << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

// The shared words of an operand read by a wgmma: checked as ldmatrix rows are, and against
// copies not behind a fence.proxy.async.
inline void emu_wgmma_read(uint32_t b, int warp) {
    if (b + 2 > dynamic_smem_size()) {
        fprintf(stderr, "wgmma: shared address %u out of range\n", b);
        abort();
    }
    EmuWord& w = emu_cta->shadow[b / 4];
    if (w.unfenced) emu_race("wgmma read of a copy or store not behind fence.proxy.async", b & ~3u, w.write_warp);
    emu_read_word(b & ~3u, warp, "wgmma");
    // The reading warps since the word was last quiet (nothing in flight, nothing retired in
    // this epoch).
    if (w.wg_pending == 0 && w.wg_retired != emu_epoch) w.wg_warp = warp;
    else if (w.wg_warp != warp) w.wg_warp = -2;
    w.wg_pending++;
}

// d (64×8·nb, the warpgroup's) = (accumulate ? d : 0) + A·B over k = 0..15: A from shared
// memory (a_desc; MN-major when a_mn) or from the threads' registers (a_regs, m16n8k16 A
// fragments per warp), B from shared memory (b_desc; MN-major when b_mn).
inline void emu_wgmma(float (*d)[4], int nb, uint64_t a_desc, bool a_mn, const uint32_t* a_regs, uint64_t b_desc,
                      bool b_mn, bool accumulate) {
    const int t = (int)threadIdx.x, wg = t / 128, warp = t / 32, lane = t % 32;
    if (!emu_wgmma_fenced) {
        fprintf(stderr, "wgmma without a wgmma.fence since the last wait (thread %d)\n", t);
        abort();
    }
    uint64_t* post = &emu_cta->wg_post[(size_t)t * 4];
    post[0] = a_desc, post[1] = b_desc;
    if (a_regs) post[2] = a_regs[0] | ((uint64_t)a_regs[1] << 32), post[3] = a_regs[2] | ((uint64_t)a_regs[3] << 32);
    emu_cta->warpgroups[wg]->arrive_and_wait("wgmma");
    const uint64_t* lead = &emu_cta->wg_post[(size_t)wg * 128 * 4];
    if (lead[1] != b_desc || (!a_regs && lead[0] != a_desc)) {
        fprintf(stderr, "wgmma: thread %d's descriptors differ from its warpgroup's first thread\n", t);
        abort();
    }
    // A (16 rows of this warp × 16) and B (16 × 8·nb).
    const int n = 8 * nb;
    float A[16][16], B[16][64];
    const int r0 = 16 * (warp % 4);
    if (a_regs) {
        for (int l = 0; l < 32; l++) {
            const uint64_t* q = &emu_cta->wg_post[(size_t)(warp * 32 + l) * 4];
            uint32_t f[4] = {(uint32_t)q[2], (uint32_t)(q[2] >> 32), (uint32_t)q[3], (uint32_t)(q[3] >> 32)};
            int g = l / 4, c = l % 4;
            A[g][2 * c] = emu_bf16_lo(f[0]), A[g][2 * c + 1] = emu_bf16_hi(f[0]);
            A[g + 8][2 * c] = emu_bf16_lo(f[1]), A[g + 8][2 * c + 1] = emu_bf16_hi(f[1]);
            A[g][2 * c + 8] = emu_bf16_lo(f[2]), A[g][2 * c + 9] = emu_bf16_hi(f[2]);
            A[g + 8][2 * c + 8] = emu_bf16_lo(f[3]), A[g + 8][2 * c + 9] = emu_bf16_hi(f[3]);
        }
    } else {
        for (int r = 0; r < 16; r++)
            for (int k = 0; k < 16; k++) A[r][k] = emu_smem_bf16(emu_wgmma_addr(a_desc, r0 + r, k, a_mn));
    }
    for (int k = 0; k < 16; k++)
        for (int c = 0; c < n; c++) B[k][c] = emu_smem_bf16(emu_wgmma_addr(b_desc, c, k, b_mn));
    // Lane 0 marks its warp's operand words read, and in flight until the wait that retires
    // this wgmma (each word once per wgmma).
    std::vector<uint32_t> words;
    if (lane == 0) {
        for (int k = 0; k < 16; k++) {
            if (!a_regs)
                for (int r = 0; r < 16; r++) words.push_back(emu_wgmma_addr(a_desc, r0 + r, k, a_mn) & ~3u);
            for (int c = 0; c < n; c++) words.push_back(emu_wgmma_addr(b_desc, c, k, b_mn) & ~3u);
        }
        std::sort(words.begin(), words.end());
        words.erase(std::unique(words.begin(), words.end()), words.end());
        std::lock_guard<std::mutex> guard(emu_cta->shadow_lock);
        for (uint32_t b : words) emu_wgmma_read(b, warp);
    }
    emu_cta->warpgroups[wg]->arrive_and_wait("wgmma");
    // The thread's elements: from the pending result of an earlier wgmma on the same registers.
    EmuWgmma* prev = nullptr;
    for (EmuWgmma& p : emu_wgmma_pending)
        if (p.d == d) prev = &p;
    if (prev && prev->nb != nb) {
        fprintf(stderr, "wgmma: thread %d chains an m64n%d on a pending m64n%d\n", t, n, 8 * prev->nb);
        abort();
    }
    EmuWgmma next{d, nb, {}, -1, std::move(words)};
    const int g = lane / 4, c = lane % 4;
    for (int j = 0; j < nb; j++)
        for (int e = 0; e < 4; e++) {
            const int row = g + 8 * (e / 2), col = 8 * j + 2 * c + e % 2;
            float acc = !accumulate ? 0.0f : prev ? prev->v[j][e] : d[j][e];
            for (int k = 0; k < 16; k++) acc += A[row][k] * B[k][col];
            next.v[j][e] = acc;
            d[j][e] = NAN;  // undefined until the wait
        }
    // A wgmma on registers with a result pending chains on it: the pending one's operand words
    // stay in flight with it.
    if (prev) {
        next.words.insert(next.words.end(), prev->words.begin(), prev->words.end());
        *prev = std::move(next);
    } else {
        emu_wgmma_pending.push_back(std::move(next));
    }
}
inline void wgmma_m64n64_ss(float (*d)[4], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    emu_wgmma(d, 8, desc_a, false, nullptr, desc_b, false, accumulate != 0);
}
inline void wgmma_m64n32_ss_ta(float (*d)[4], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    emu_wgmma(d, 4, desc_a, true, nullptr, desc_b, false, accumulate != 0);
}
inline void wgmma_m64n64_rs_t(float (*d)[4], const uint32_t* a, uint64_t desc_b) {
    emu_wgmma(d, 8, 0, false, a, desc_b, true, true);
}

// Runs `kernel()` for every block of the grid with `threads` threads and `smem` bytes of dynamic
// shared memory (0xCD garbage at the start, as uninitialized shared memory would be), in dispatch
// order (x fastest), `ctas` consecutive blocks at a time.
template <class F>
void emu_launch(unsigned grid_x, unsigned grid_y, int threads, size_t smem, F kernel, int ctas = 1) {
    const unsigned total = grid_x * grid_y;
    emu_window = std::max(ctas, 1);
    for (unsigned first = 0; first < total; first += (unsigned)emu_window) {
        const unsigned last = std::min(total, first + (unsigned)emu_window);
        std::vector<std::unique_ptr<EmuCta>> window;
        std::vector<std::thread> ts;
        for (unsigned b = first; b < last; b++) {
            window.push_back(std::make_unique<EmuCta>(threads, smem));
            EmuCta* cta = window.back().get();
            const unsigned bx = b % grid_x, by = b / grid_x;
            for (int t = 0; t < threads; t++) {
                ts.emplace_back([=, &kernel] {
                    emu_cta = cta;
                    emu_epoch = 0;
                    threadIdx = {(unsigned)t, 0, 0};
                    blockIdx = {bx, by, 0};
                    blockDim = {(unsigned)threads, 1, 1};
                    gridDim = {grid_x, grid_y, 1};
                    kernel();
                    if (!emu_wgmma_pending.empty()) {
                        fprintf(stderr, "block (%u, %u) thread %d exited with wgmma results not waited for\n", bx,
                                by, t);
                        abort();
                    }
                    emu_unfenced.clear();
                    if (!emu_open_group.empty() || !emu_groups.empty()) {
                        fprintf(stderr, "block (%u, %u) thread %d exited with cp.async copies not waited for\n", bx,
                                by, t);
                        abort();
                    }
                });
            }
        }
        for (auto& th : ts) th.join();
    }
    emu_window = 1;
}
