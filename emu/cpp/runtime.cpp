// The emulation runtime behind emu.h (compiled without instrumentation): the grid loop, one
// std::thread per CUDA thread, __syncthreads as a barrier of the CTA, warp shuffles through an
// exchange area with warp barriers, and the __tsan_* hooks that check shared memory.
//
// Race check. Every 4-byte word of `__shared__` memory remembers its last writer and its
// readers since then, with the epochs they were in: the block epoch counts the __syncthreads a
// thread has passed, the warp epoch counts the warp's collective points (shuffles and
// __syncthreads). Two accesses by different threads, at least one a write, are ordered when
// the later thread has passed a __syncthreads since the earlier access, or, for two lanes of
// one warp, a warp collective. An unordered pair is a race: it is counted (and the first few
// are printed with the kernel's block, thread and shared byte offset).
//
// Bank conflicts. Between two collective points, the n-th execution of one load or store site
// (the instrumented instruction's address) by the lanes of a warp is one warp-wide access; its
// words fall in 32 banks of 4 bytes, and the largest number of distinct words in one bank,
// minus one, is its count of extra wavefronts.
#include <atomic>
#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "emu.h"

thread_local EmuDim threadIdx, blockIdx, blockDim, gridDim;

// Shared memory is every static array of the kernel code: `__shared__` is `static`, and the
// kernels have no other statics. Template functions' statics ignore a section attribute, so
// the range is the executable's .bss (the host's statics there are never touched by the
// instrumented kernel code).
extern "C" char __bss_start[];
extern "C" char _end[];

namespace {

struct Word {
    int w_tid = -1, w_be = -1, w_we = -1;
    int r_tid = -1, r_warp = -1, r_be = -1, r_we = -1;  // r_tid/r_warp -2: several
};

struct Access {
    const void* site;
    uint32_t word;
};

struct Cta {
    int threads;
    std::barrier<> block;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<uint32_t> xchg;                         // per thread: a shuffled value
    // Per thread: its shared accesses since the last collective point, and before it (two
    // lists used in turn: the lanes of a warp flip together), kept here to outlive the thread.
    std::vector<std::vector<Access>> lists[2];
    std::vector<int> cur;
    Cta(int t) : threads(t), block(t), xchg(t), cur(t, 0) {
        lists[0].resize(t), lists[1].resize(t);
        for (int w = 0; w < (t + 31) / 32; w++) warps.push_back(std::make_unique<std::barrier<>>(std::min(32, t - 32 * w)));
    }
};

Cta* cta = nullptr;
// Shadow words by word index, in stripes with a lock each; emptied at every CTA's start.
constexpr int STRIPES = 64;
std::unordered_map<uint32_t, Word> shadow[STRIPES];
std::mutex shadow_lock[STRIPES];
std::atomic<long> races{0}, accesses{0}, conflicted{0}, extra_wavefronts{0};
std::atomic<int> printed{0}, print_limit{8};

thread_local int tid = -1, block_epoch = 0, warp_epoch = 0;
std::vector<Access>& my_list() { return cta->lists[cta->cur[tid]][tid]; }

char* shared_lo() { return __bss_start; }
char* shared_hi() { return _end; }

void report(const char* what, uint32_t byte, int other) {
    races++;
    if (printed++ < print_limit)
        fprintf(stderr, "race: %s at shared byte %u: block (%u, %u, %u) thread %d, other thread %d\n", what, byte,
                blockIdx.x, blockIdx.y, blockIdx.z, tid, other);
}

void access(const void* site, const void* addr, size_t size, bool write) {
    const char* a = static_cast<const char*>(addr);
    if (tid < 0 || a < shared_lo() || a >= shared_hi()) return;
    uint32_t off = (uint32_t)(a - shared_lo());
    const int warp = tid / 32;
    for (uint32_t b = off & ~3u; b < off + size; b += 4) {
        my_list().push_back({site, b / 4});
        std::lock_guard<std::mutex> g(shadow_lock[(b / 4) % STRIPES]);
        auto [it, fresh] = shadow[(b / 4) % STRIPES].try_emplace(b / 4);
        Word& w = it->second;
        // Uninitialized: on the GPU whatever the last CTA on the SM left there.
        if (fresh && !write) report("read of shared memory this CTA never wrote", b, -1);
        if (w.w_tid >= 0 && w.w_tid != tid && w.w_be == block_epoch && (w.w_tid / 32 != warp || w.w_we == warp_epoch))
            report(write ? "write after an unordered write" : "read of an unordered write", b, w.w_tid);
        if (write) {
            bool other_reader = w.r_tid == -2 || (w.r_tid >= 0 && w.r_tid != tid);
            if (other_reader && w.r_be == block_epoch && (w.r_warp != warp || w.r_we == warp_epoch))
                report("write after an unordered read", b, w.r_tid);
            w.w_tid = tid, w.w_be = block_epoch, w.w_we = warp_epoch;
            w.r_tid = -1;
        } else if (w.r_tid == -1 || w.r_be != block_epoch) {
            w.r_tid = tid, w.r_warp = warp, w.r_be = block_epoch, w.r_we = warp_epoch;
        } else {
            if (w.r_tid != tid) w.r_tid = -2;
            if (w.r_warp != warp) w.r_warp = -2;
            w.r_we = std::max(w.r_we, warp_epoch);
        }
    }
}

// Lane 0 of a warp, at a collective point where every lane has posted its accesses since the
// previous one: the bank conflicts of each warp-wide access.
void analyse_warp(Cta* c, int warp, int list) {
    std::map<std::pair<const void*, int>, std::vector<uint32_t>> groups;
    for (int t = 32 * warp; t < std::min(c->threads, 32 * warp + 32); t++) {
        std::map<const void*, int> seen;
        for (const Access& a : c->lists[list][t]) groups[{a.site, seen[a.site]++}].push_back(a.word);
    }
    for (auto& [key, words] : groups) {
        std::sort(words.begin(), words.end());
        words.erase(std::unique(words.begin(), words.end()), words.end());
        int per_bank[32] = {0}, worst = 0;
        for (uint32_t w : words) worst = std::max(worst, ++per_bank[w % 32]);
        accesses++;
        if (worst > 1) conflicted++, extra_wavefronts += worst - 1;
    }
}

// A collective point of the warp (or of the whole CTA): waits for the others, lane 0
// analyses the warp's accesses since the previous point, and the next accesses go to the
// other list (cleared here: the lane 0 that analysed it has reached this point since).
template <class Wait>
void collective(Wait wait_all) {
    wait_all();
    if (tid % 32 == 0) analyse_warp(cta, tid / 32, cta->cur[tid]);
    cta->cur[tid] ^= 1;
    my_list().clear();
    warp_epoch++;
}

void warp_wait() { cta->warps[tid / 32]->arrive_and_wait(); }

}  // namespace

void __syncthreads() {
    collective([] { cta->block.arrive_and_wait(); });
    block_epoch++;
}

static float shuffle(float v, int src) {
    memcpy(&cta->xchg[tid], &v, 4);
    float r;
    collective([&] {
        warp_wait();
        memcpy(&r, &cta->xchg[(tid & ~31) + src], 4);
    });
    warp_wait();
    return r;
}
float __shfl_xor_sync(unsigned, float v, int lane_mask) { return shuffle(v, (tid % 32) ^ lane_mask); }
float __shfl_sync(unsigned, float v, int src_lane) { return shuffle(v, src_lane % 32); }

[[noreturn]] void __trap() {
    fprintf(stderr, "__trap() in block (%u, %u, %u) thread %d\n", blockIdx.x, blockIdx.y, blockIdx.z, tid);
    abort();
}

void emu_run_grid(const EmuLaunch* cfg, void (*body)(void*), void* ctx) {
    const int threads = (int)(cfg->block[0] * cfg->block[1] * cfg->block[2]);
    if (threads <= 0 || threads > 1024 || threads % 32 != 0) {
        fprintf(stderr, "emu: a block of %d threads (the kernels assume whole warps, at most 1024)\n", threads);
        abort();
    }
    for (unsigned bz = 0; bz < cfg->grid[2]; bz++)
        for (unsigned by = 0; by < cfg->grid[1]; by++)
            for (unsigned bx = 0; bx < cfg->grid[0]; bx++) {
                for (auto& m : shadow) m.clear();
                Cta c(threads);
                cta = &c;
                std::vector<std::thread> ts;
                ts.reserve(threads);
                for (int t = 0; t < threads; t++)
                    ts.emplace_back([=, &c] {
                        threadIdx = {t % cfg->block[0], (t / cfg->block[0]) % cfg->block[1], t / (cfg->block[0] * cfg->block[1])};
                        blockIdx = {bx, by, bz};
                        blockDim = {cfg->block[0], cfg->block[1], cfg->block[2]};
                        gridDim = {cfg->grid[0], cfg->grid[1], cfg->grid[2]};
                        tid = t, block_epoch = 0, warp_epoch = 0;
                        body(ctx);
                        // An exited thread no longer counts at barriers, as on the GPU.
                        c.block.arrive_and_drop();
                        c.warps[t / 32]->arrive_and_drop();
                        tid = -1;
                    });
                for (auto& th : ts) th.join();
                // The accesses after the last collective point.
                for (int w = 0; w < threads / 32; w++) analyse_warp(&c, w, c.cur[32 * w]);
                cta = nullptr;
            }
}

struct EmuStats {
    long races, accesses, conflicted, extra_wavefronts;
};

// Prints the next `n` races found (to stderr), no more.
extern "C" void emu_print_races(int n) {
    printed = 0;
    print_limit = n;
}

// Counts since the last call (then reset).
extern "C" void emu_take_stats(EmuStats* out) {
    *out = {races.exchange(0), accesses.exchange(0), conflicted.exchange(0), extra_wavefronts.exchange(0)};
}

// The instrumentation's entry points (gcc -fsanitize=thread emits calls to these).
#define EMU_HOOKS(n)                                                                              \
    extern "C" void __tsan_read##n(void* a) { access(__builtin_return_address(0), a, n, false); } \
    extern "C" void __tsan_write##n(void* a) { access(__builtin_return_address(0), a, n, true); } \
    extern "C" void __tsan_unaligned_read##n(void* a) { access(__builtin_return_address(0), a, n, false); } \
    extern "C" void __tsan_unaligned_write##n(void* a) { access(__builtin_return_address(0), a, n, true); }
EMU_HOOKS(1)
EMU_HOOKS(2)
EMU_HOOKS(4)
EMU_HOOKS(8)
EMU_HOOKS(16)
extern "C" void __tsan_init() {}
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit() {}
extern "C" void __tsan_read_range(void* a, unsigned long n) { access(__builtin_return_address(0), a, n, false); }
extern "C" void __tsan_write_range(void* a, unsigned long n) { access(__builtin_return_address(0), a, n, true); }
