// Flash attention on tensor cores: causal, variable-length (cu_seqlens), grouped KV heads,
// head_dim 64 and 128, bf16 in/out, fp32 accumulation. The scalar kernels of attention.cu stay
// as the fallback and the cross-check (SFT_ATTENTION=scalar); both produce the same lse.
//
// Kernels (HD = head_dim; every CTA is NW warps; a warp owns 16·MT rows of its side):
// - flash_tile_table:   tiles of `tile` rows per segment, never crossing a segment boundary:
//                       table[0] = count, table[1 + 3t ..] = (first row, segment start, segment end).
// - flash_forward_HD:   CTA = (q tile of 128 rows, q head). Loops over key tiles of BN rows from
//                       the segment start up to the tile's last row (tiles above the diagonal are
//                       never visited; a warp skips the tiles entirely above its rows). Online
//                       softmax in the exp2 domain; writes out and lse [n_heads, n] (natural log).
//                       HD 64: 4 warps of 32 rows (two m-tiles, so each K or V fragment read with
//                       ldmatrix feeds two tile products); HD 128: 8 warps of 16 rows.
// - flash_backward_HD:  CTA = (key tile of 128 rows, kv head), 8 warps of 16 keys; loops over the
//                       q heads of the group and the q tiles of BQ rows from the key tile's first
//                       row to the segment end; with Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ per warp,
//                       dV += Pᵀ·dO and dK += dSᵀ·Q (written once, at the end), and dQ += dS·K
//                       through dSᵀ in shared memory, added to the other key tiles' partials in a
//                       fixed order (an fp32 accumulator and a semaphore per q tile; see
//                       "backward" below). The accumulation's latencies are off the iteration's
//                       critical path: thread 0 reads the semaphore (relaxed) at the top of the
//                       iteration and looks at it after the tile products (then fence.acq_rel),
//                       the old partial is loaded before the dQ product, and the release happens
//                       during the next iteration (after its first barrier).
// - flash_backward_atomic_HD: the same, except that every CTA adds its dQ partials into the fp32
//                       accumulator with atomicAdd, in whatever order the CTAs get there (opt-in,
//                       SFT_FLASH_DQ=atomic: not deterministic); no semaphores. HD 64: 4 warps
//                       of 32 keys over q tiles of 32.
// - flash_backward_deferred_HD: the ordered sums in the atomic kernel's layout, each q tile's
//                       partial staged in shared memory and added during the next iteration,
//                       its old sums fetched by cp.async behind that iteration's dQ product (the
//                       same bits as flash_backward_HD; opt-in, SFT_FLASH_DQ=deferred, untimed).
// - flash_dq_convert:   after flash_backward_atomic_HD: dQ = accumulator · scale as bf16 into the
//                       q part of dqkv, and the accumulator back to zero for the next launch.
// Every backward (and flash_dq_convert) takes RoPE's table and pairing (rope_style): dK and dQ
// are rotated back as they are written, so the model runs no rope pass over dqkv afterwards
// (see "RoPE's backward").
// - flash_forward_64_sm90, flash_backward_64_sm90, flash_backward_deferred_q64_64_sm90,
//   flash_backward_atomic_64_sm90: the HD 64 forward and the ordered, deferred-q64 and atomic
//                       backward with all their tile products on Hopper's wgmma (opt-in,
//                       SFT_FLASH_MMA=wgmma, compute capability 9.0; untimed). Only in the
//                       sm_90a module (build.rs: this file again with -DSFT_SM90A).
// The shapes are the fastest of those timed on an H200 (BENCHMARKS.md, "flash variants"): warps of
// 32 rows took 6% off the forward and 17% off the atomic backward, but slowed the ordered
// backward, whose q tiles of 32 double the waits on the semaphores (what the deferred kernel
// is meant to hide).
// D = rowsum(dO∘O) comes from attention_backward_d (attention.cu). Five GEMM-shaped products per
// (key, query) pair as in FlashAttention-2. flash_backward_HD (the default) is deterministic:
// every dK/dV element has one writer, and the dQ partials are summed in an order fixed by the
// tile positions, never by timing. The atomic variant takes the ordered accumulation (a wait, an
// L2 read-modify-write and a release per iteration) out of the loop, as FlashAttention-2 does,
// at the price of run-to-run differences in the last bits of dQ.
//
// ---- m16n8k16 fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16", .bf16) --------------
// lane = threadIdx.x % 32, g = lane / 4 (groupID), c = lane % 4 (thread in group).
// A (16×16, row-major, 4 × .b32, each two bf16, the lower column in the low half):
//     a0: (row g,   cols 2c, 2c+1)     a1: (row g+8, cols 2c, 2c+1)
//     a2: (row g,   cols 2c+8, 2c+9)   a3: (row g+8, cols 2c+8, 2c+9)
// B (16×8, "col": element (k, n)), 2 × .b32:
//     b0: (rows k = 2c, 2c+1, col n = g)   b1: (rows k = 2c+8, 2c+9, col n = g)
// C/D (16×8, fp32), 4 floats:
//     d0: (row g, col 2c)  d1: (row g, col 2c+1)  d2: (row g+8, col 2c)  d3: (row g+8, col 2c+1)
// ldmatrix.m8n8.x4.b16: lanes 8i..8i+7 give the row addresses of matrix i (8 rows of 8 bf16,
//     16 bytes each); register ri of lane L holds row L/4, columns 2(L%4), 2(L%4)+1 of matrix i.
//     With .trans, ri holds rows 2(L%4), 2(L%4)+1 of column L/4 (the matrix transposed).
// Consequences used below:
// * A from a row-major [row][k] tile: lane L points at row (L % 16), column k0 + (L / 16)·8;
//   then r0..r3 = a0..a3.
// * B = Xᵀ for X stored [n][k] (S = Q·Kᵀ: X = K): matrix i = rows n0 + (i/2)·8 .. +7 of X, columns
//   k0 + (i%2)·8: lane L points at X row n0 + (L%8) + (L/16)·8, column k0 + ((L/8)%2)·8;
//   r0, r1 = b0, b1 of n-tile n0/8 and r2, r3 = b0, b1 of n-tile n0/8 + 1.
// * B = Y for Y stored [k][n] (O = P·V: Y = V, k = key, n = d): .trans; matrix i = rows
//   k0 + (i%2)·8 .. +7, columns n0 + (i/2)·8: lane L points at Y row k0 + (L%8) + ((L/8)%2)·8,
//   column n0 + (L/16)·8; r0, r1 = b0, b1 of n-tile n0/8, r2, r3 = b0, b1 of n-tile n0/8 + 1.
// * C → A (P kept in registers for P·V): for the 16 keys k0..k0+15 (n-tiles j = k0/8, j+1 of S)
//   a0 = pack(S[j].d0, S[j].d1), a1 = pack(S[j].d2, S[j].d3), a2 = pack(S[j+1].d0, S[j+1].d1),
//   a3 = pack(S[j+1].d2, S[j+1].d3).
// These formulas are mirrored by the CPU emulation in src/backend/cuda/flash_attention.rs (unit-tested).
//
// Shared memory tiles are bf16 rows of HD + 8 elements: the 16-byte pad makes the 8 row
// addresses of an ldmatrix hit 8 distinct 4-bank groups (row stride 144 or 272 bytes), so
// ldmatrix is conflict-free. Global → shared copies are 16-byte cp.async (zero-filled past the
// last row), triple-buffered over the forward's key tiles (one barrier per iteration) and
// double-buffered over the backward's q tiles. Dynamic shared memory (sizes in flash_attention.rs).
#ifdef FLASH_EMULATE
// Host emulation of the CUDA built-ins used here (tests/flash_emu, scripts/flash_emulate.sh):
// runs this file's kernels on the CPU, one thread per CUDA thread.
#include "flash_emu.h"
#endif
#include "common.cuh"

#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

typedef __nv_bfloat16 bf16_t;

#ifdef FLASH_EMULATE
#define FLASH_DYNAMIC_SMEM(name) unsigned char* name = emu_dynamic_smem()
#else
#define FLASH_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    int bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool valid) {
    int bytes = valid ? 4 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

// d += a · b (16×8 fp32 += 16×16 bf16 · 16×8 bf16).
__device__ __forceinline__ void mma_bf16(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif  // FLASH_EMULATE

// A compile-time flag for a lambda's `auto` parameter: `if (x) f(Flag<true>{}); else
// f(Flag<false>{});` compiles f twice, so that a warp-uniform test (does this tile need the
// causal mask?) is taken once per tile instead of per element.
template <bool B>
struct Flag {
    static constexpr bool value = B;
};

// Two floats as a bf16 pair, `lo` in the low half (the lower column index).
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

#ifndef FLASH_EMULATE
__device__ __forceinline__ uint32_t dynamic_smem_size() {
    uint32_t r;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(r));
    return r;
}
#endif

// Where 16-byte chunk c of row r of a shared tile lies, in elements: rows of HD + 8 (the pad
// keeps ldmatrix free of bank conflicts), or, SW (the wgmma kernels), rows of 64 in the 128-byte
// swizzle, chunk c at c ^ (r % 8) (see the wgmma section below).
template <int HD, bool SW>
__device__ __forceinline__ int tile_at(int r, int c) {
    static_assert(!SW || HD == 64, "the 128-byte swizzle holds rows of 64 bf16");
    return SW ? r * HD + (c ^ (r % 8)) * 8 : r * (HD + 8) + c * 8;
}

// Copies rows row0 .. row0 + ROWS - 1 (HD bf16 each, row r at src + r * stride) into a shared
// tile laid out as tile_at<HD, SW>; rows at or past `limit` are zero-filled.
template <int ROWS, int HD, int NT, bool SW = false>
__device__ __forceinline__ void load_rows(bf16_t* dst, const bf16_t* src, size_t stride, int row0, int limit) {
    constexpr int CH = HD / 8;
#pragma unroll
    for (int i = 0; i < (ROWS * CH + NT - 1) / NT; i++) {
        int e = threadIdx.x + i * NT;
        if ((ROWS * CH) % NT != 0 && e >= ROWS * CH) break;
        int r = e / CH, col = (e % CH) * 8;
        int row = row0 + r;
        bool ok = row < limit;
        const bf16_t* p = ok ? src + (size_t)row * stride + col : src;
        cp_async16(dst + tile_at<HD, SW>(r, e % CH), p, ok);
    }
}

// Key rows row0 .. row0 + BN - 1 of K (at kg) and V (at vg) into buffer `buf` of the shared
// tiles ks and vs ([buf][BN] rows laid out as tile_at<HD, SW>), one 64-bit offset per tile for
// both (the rows within a tile in 32 bits: check_tile_offsets); rows at or past `limit` are
// zero-filled.
template <int BN, int HD, int NT, bool SW = false>
__device__ __forceinline__ void load_kv_tile(bf16_t* ks, bf16_t* vs, const bf16_t* kg, const bf16_t* vg,
                                             size_t width, int buf, int row0, int limit) {
    constexpr int CH = HD / 8;
    const size_t start = (size_t)row0 * width;
    const bf16_t* kb = kg + start;
    const bf16_t* vb = vg + start;
    bf16_t* kd = ks + buf * tile_at<HD, SW>(BN, 0);
    bf16_t* vd = vs + buf * tile_at<HD, SW>(BN, 0);
#pragma unroll
    for (int i = 0; i < (BN * CH + NT - 1) / NT; i++) {
        int e = threadIdx.x + i * NT;
        if ((BN * CH) % NT != 0 && e >= BN * CH) break;
        int r = e / CH, col = (e % CH) * 8;
        bool ok = row0 + r < limit;
        int off = r * (int)width + col, at = tile_at<HD, SW>(r, e % CH);
        cp_async16(kd + at, ok ? kb + off : kg, ok);
        cp_async16(vd + at, ok ? vb + off : vg, ok);
    }
}

// The K/V triple buffer of the forward loop, at the top of iteration `it` over key tiles of BN
// rows from seg_start: waits until tile `it` (buffer it % 3) has landed (tile it + 1 may still
// be in flight), syncs the block, so that every warp is done with tile it − 1, then starts
// copying tile it + 2 into tile it − 1's buffer. One barrier per iteration: with two buffers
// the block also had to sync at the end of each iteration before the next copy could start.
template <int BN, int HD, int NT>
__device__ __forceinline__ void next_kv_tile(bf16_t* ks, bf16_t* vs, const bf16_t* kg, const bf16_t* vg, size_t width,
                                             int it, int n_kt, int seg_start, int n) {
    if (it + 1 < n_kt)
        cp_async_wait<1>();
    else
        cp_async_wait<0>();
    __syncthreads();
    if (it + 2 < n_kt) {
        load_kv_tile<BN, HD, NT>(ks, vs, kg, vg, width, (it + 2) % 3, seg_start + (it + 2) * BN, n);
        cp_async_commit();
    }
}

// Per warp: acc[m·NT8 + nt] (MT m-tiles of 16 rows, n-tiles of 8 columns, NT8 of them) += A(16·MT
// rows at a_tile, HD wide) · Xᵀ where X is the shared [n][HD] tile at x_tile (rows n = 0 ..
// 8·NT8 - 1). Each B fragment loaded from X serves all MT m-tiles; every accumulator sees the
// same products in the same order whatever MT is.
template <int HD, int NT8, int MT = 1>
__device__ __forceinline__ void mma_abt(float (*acc)[4], const bf16_t* a_tile, const bf16_t* x_tile, int lane) {
    constexpr int LD = HD + 8;
    uint32_t a_addr = smem_u32(a_tile + (lane % 16) * LD + (lane / 16) * 8);
    uint32_t x_addr = smem_u32(x_tile + ((lane % 8) + (lane / 16) * 8) * LD + ((lane / 8) % 2) * 8);
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
        uint32_t a[MT][4];
#pragma unroll
        for (int m = 0; m < MT; m++) ldsm_x4(a[m][0], a[m][1], a[m][2], a[m][3], a_addr + (m * 16 * LD + kk * 16) * 2);
#pragma unroll
        for (int np = 0; np < NT8 / 2; np++) {
            uint32_t b0, b1, b2, b3;
            ldsm_x4(b0, b1, b2, b3, x_addr + (np * 16 * LD + kk * 16) * 2);
#pragma unroll
            for (int m = 0; m < MT; m++) {
                mma_bf16(acc[m * NT8 + 2 * np], a[m], b0, b1);
                mma_bf16(acc[m * NT8 + 2 * np + 1], a[m], b2, b3);
            }
        }
    }
}

// The C fragments of 16 columns (n-tiles c[0], c[1]) rounded to bf16 as the A fragment of a
// k-step over those columns (the C → A mapping above): P or dS kept in registers for the next
// product, by mma.sync or wgmma alike.
__device__ __forceinline__ void c_to_a(uint32_t* a, const float (*c)[4]) {
    a[0] = pack_bf16(c[0][0], c[0][1]);
    a[1] = pack_bf16(c[0][2], c[0][3]);
    a[2] = pack_bf16(c[1][0], c[1][1]);
    a[3] = pack_bf16(c[1][2], c[1][3]);
}

// Per warp: acc[m·HD/8 + j] += P (MT m-tiles of 16 × 16·K16, the C fragments p[m·2·K16 + ..][4],
// rounded to bf16) · Y where Y is the shared [k][HD] tile at y_tile; each B fragment serves all
// MT m-tiles.
template <int HD, int K16, int MT = 1>
__device__ __forceinline__ void mma_py(float (*acc)[4], const float (*p)[4], const bf16_t* y_tile, int lane) {
    constexpr int LD = HD + 8;
    uint32_t y_addr = smem_u32(y_tile + ((lane % 8) + ((lane / 8) % 2) * 8) * LD + (lane / 16) * 8);
#pragma unroll
    for (int kk = 0; kk < K16; kk++) {
        uint32_t a[MT][4];
#pragma unroll
        for (int m = 0; m < MT; m++) c_to_a(a[m], p + m * 2 * K16 + 2 * kk);
#pragma unroll
        for (int dp = 0; dp < HD / 16; dp++) {
            uint32_t b0, b1, b2, b3;
            ldsm_x4_t(b0, b1, b2, b3, y_addr + (kk * 16 * LD + dp * 16) * 2);
#pragma unroll
            for (int m = 0; m < MT; m++) {
                mma_bf16(acc[m * (HD / 8) + 2 * dp], a[m], b0, b1);
                mma_bf16(acc[m * (HD / 8) + 2 * dp + 1], a[m], b2, b3);
            }
        }
    }
}

// Per warp: stores the 16 × HD fp32 accumulator acc[HD/8] (C fragments: rows row_a = first row
// + lane/4 and row_b = row_a + 8) as bf16 into the row-major `dst` at column `col`, row a scaled
// by scale_a and row b by scale_b; rows at or past `limit` are not written.
template <int HD>
__device__ __forceinline__ void store_acc(bf16_t* dst, size_t stride, int col, const float (*acc)[4], int row_a,
                                          int row_b, int limit, float scale_a, float scale_b, int lane) {
    col += (lane % 4) * 2;
#pragma unroll
    for (int j = 0; j < HD / 8; j++) {
        if (row_a < limit)
            *reinterpret_cast<uint32_t*>(dst + (size_t)row_a * stride + col + j * 8) =
                pack_bf16(acc[j][0] * scale_a, acc[j][1] * scale_a);
        if (row_b < limit)
            *reinterpret_cast<uint32_t*>(dst + (size_t)row_b * stride + col + j * 8) =
                pack_bf16(acc[j][2] * scale_b, acc[j][3] * scale_b);
    }
}

// ---- RoPE's backward in the epilogues -----------------------------------------------------------
// rope_apply (rope.cu) rotated q and k after the QKV projection, so the gradients that the model
// needs are those before the rotation: pair j of a row rotated back by its angle, (cos, sin) =
// rope[row · HD/2 + j] (the micro-batch's rope_table). The backward does that as it writes dK
// and dQ, instead of a rope_apply pass over them afterwards:
//   ROPE_NONE      nothing (the caller rotates);
//   ROPE_ADJACENT  pairs (2j, 2j + 1);
//   ROPE_HALF      pairs (j, j + HD/2).
// Both halves of a pair are always in one thread: a dK thread holds every column of its key
// rows, and a warp's block of the dQ product pairs each of its first-half columns with the one
// HD/2 on (dq_off in flash_backward_impl); the deferred sums and flash_dq_convert take the two
// halves of a row in one step.
#define ROPE_NONE -1
#define ROPE_ADJACENT 0
#define ROPE_HALF 1

__device__ __forceinline__ void rotate_back(float& x0, float& x1, float2 cs) {
    const float a = x0, b = x1;
    x0 = a * cs.x + b * cs.y;
    x1 = b * cs.x - a * cs.y;
}

// Rotates back the fragment columns of acc[NJ][4] (C layout: rows row_a for e < 2 and row_b for
// e >= 2, rows at or past `limit` left alone; acc[j]'s head columns col0 + off(j) + (lane % 4)·2
// + (e & 1)) as `rope_style` says: adjacent pairs inside (e, e + 1), half-split pairs between
// acc[j] and acc[j + NJ/2], whose columns the caller's layout puts HD/2 apart.
template <int HD, int NJ, class Off>
__device__ __forceinline__ void rope_back_fragments(float (*acc)[4], int col0, Off off, int row_a, int row_b,
                                                    int limit, const float2* rope, int rope_style, int lane) {
    if (rope_style == ROPE_ADJACENT) {
#pragma unroll
        for (int j = 0; j < NJ; j++) {
            const int pair = (col0 + off(j)) / 2 + lane % 4;
            if (row_a < limit) rotate_back(acc[j][0], acc[j][1], rope[(size_t)row_a * (HD / 2) + pair]);
            if (row_b < limit) rotate_back(acc[j][2], acc[j][3], rope[(size_t)row_b * (HD / 2) + pair]);
        }
    } else if (rope_style == ROPE_HALF) {
#pragma unroll
        for (int j = 0; j < NJ / 2; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int row = e < 2 ? row_a : row_b, pair = col0 + off(j) + (lane % 4) * 2 + (e & 1);
                if (row < limit) rotate_back(acc[j][e], acc[j + NJ / 2][e], rope[(size_t)row * (HD / 2) + pair]);
            }
    }
}

// Rotates back a row's columns c .. c + W - 1 (v[0 .. W)) and the W from c + HD/2 on
// (v[W .. 2W)), c even, as `rope_style` says; cs: the row's (cos, sin) pairs. The row-major form
// of the deferred sums and flash_dq_convert.
template <int W>
__device__ __forceinline__ void rope_back_halves(float* v, const float2* cs, int c, int half_dim, int rope_style) {
    if (rope_style == ROPE_ADJACENT) {
#pragma unroll
        for (int k = 0; k < W / 2; k++) {
            rotate_back(v[2 * k], v[2 * k + 1], cs[c / 2 + k]);
            rotate_back(v[W + 2 * k], v[W + 2 * k + 1], cs[(c + half_dim) / 2 + k]);
        }
    } else if (rope_style == ROPE_HALF) {
#pragma unroll
        for (int k = 0; k < W; k++) rotate_back(v[k], v[W + k], cs[c + k]);
    }
}

// store_acc of dK: acc · scale rotated back as `rope_style` says (rope: the table as float2).
template <int HD>
__device__ __forceinline__ void store_dk(bf16_t* dst, size_t stride, int col, float (*acc)[4], int row_a, int row_b,
                                         int limit, float scale, const float2* rope, int rope_style, int lane) {
#pragma unroll
    for (int j = 0; j < HD / 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) acc[j][e] *= scale;
    rope_back_fragments<HD, HD / 8>(acc, 0, [](int j) { return 8 * j; }, row_a, row_b, limit, rope, rope_style, lane);
    store_acc<HD>(dst, stride, col, acc, row_a, row_b, limit, 1.0f, 1.0f, lane);
}

// ---- tile table ------------------------------------------------------------------------------
// One block of 1024 threads. Thread t takes a contiguous run of segments, counts their tiles,
// a block-wide inclusive scan gives each run its first table slot.
#ifndef SFT_SM90A  // the sm_90a module holds the *_sm90 kernels only
extern "C" __global__ void __launch_bounds__(1024)
    flash_tile_table(int* table, const uint32_t* cu, int n_seg, int tile) {
    __shared__ int sums[1024];
    int t = threadIdx.x, nt = blockDim.x;
    int per = (n_seg + nt - 1) / nt;
    int s0 = min(t * per, n_seg), s1 = min(s0 + per, n_seg);
    int count = 0;
    for (int s = s0; s < s1; s++) count += ((int)(cu[s + 1] - cu[s]) + tile - 1) / tile;
    sums[t] = count;
    __syncthreads();
    for (int off = 1; off < nt; off <<= 1) {
        int v = t >= off ? sums[t - off] : 0;
        __syncthreads();
        sums[t] += v;
        __syncthreads();
    }
    int slot = sums[t] - count;
    if (t == nt - 1) table[0] = sums[t];
    for (int s = s0; s < s1; s++) {
        int start = (int)cu[s], end = (int)cu[s + 1];
        for (int q = start; q < end; q += tile) {
            int* e = table + 1 + 3 * slot;
            e[0] = q;
            e[1] = start;
            e[2] = end;
            slot++;
        }
    }
}
#endif

// The CTA's tile: the table is read back to front so that the longest causal rows start first.
__device__ __forceinline__ bool cta_tile(const int* table, int& r0, int& seg_start, int& seg_end) {
    int count = table[0];
    int idx = count - 1 - (int)blockIdx.x;
    if (idx < 0) return false;
    r0 = table[1 + 3 * idx];
    seg_start = table[2 + 3 * idx];
    seg_end = table[3 + 3 * idx];
    return true;
}

// ---- forward ---------------------------------------------------------------------------------
// The forward's per-tile steps on a warp's 16 rows of scores s[NT8][4] (C fragments over NT8·8
// keys from kt), shared by the mma.sync and the wgmma kernels, whose accumulators have the same
// layout per warp.

// Keys after a row's own position get -inf.
template <int NT8>
__device__ __forceinline__ void causal_mask(float (*s)[4], int kt, int row_a, int row_b, int lane) {
#pragma unroll
    for (int j = 0; j < NT8; j++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            int key = kt + j * 8 + (lane % 4) * 2 + (e & 1);
            int row = e < 2 ? row_a : row_b;
            if (key > row) s[j][e] = -INFINITY;
        }
    }
}

// The online softmax in the exp2 domain: s becomes p = 2^(s·sl2 − m) against the new running max
// m, l (the thread's partial row sum) and the output accumulator o[HD/8] are rescaled to it.
template <int NT8, int HD>
__device__ __forceinline__ void online_softmax(float (*s)[4], float (*o)[4], float& m_a, float& m_b, float& l_a,
                                               float& l_b, float sl2) {
    // The row max of the raw scores: scale·log2 e > 0 keeps their order (and the rounding of the
    // scaled max is the max of the rounded scaled scores), so the scale joins the exponent's
    // FFMA instead of a multiply per score.
    float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
    for (int j = 0; j < NT8; j++) {
        mx_a = fmaxf(mx_a, fmaxf(s[j][0], s[j][1]));
        mx_b = fmaxf(mx_b, fmaxf(s[j][2], s[j][3]));
    }
    mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1));
    mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
    mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1));
    mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
    float mn_a = fmaxf(m_a, mx_a * sl2), mn_b = fmaxf(m_b, mx_b * sl2);
    // A row with no key yet keeps m = -inf: use 0 as its reference (its p are all 0).
    float ref_a = mn_a == -INFINITY ? 0.0f : mn_a, ref_b = mn_b == -INFINITY ? 0.0f : mn_b;
    float corr_a = exp2f(m_a - ref_a), corr_b = exp2f(m_b - ref_b);
    m_a = mn_a;
    m_b = mn_b;
    float sum_a = 0.0f, sum_b = 0.0f;
#pragma unroll
    for (int j = 0; j < NT8; j++) {
        s[j][0] = exp2f(fmaf(s[j][0], sl2, -ref_a));
        s[j][1] = exp2f(fmaf(s[j][1], sl2, -ref_a));
        s[j][2] = exp2f(fmaf(s[j][2], sl2, -ref_b));
        s[j][3] = exp2f(fmaf(s[j][3], sl2, -ref_b));
        sum_a += s[j][0] + s[j][1];
        sum_b += s[j][2] + s[j][3];
    }
    // l stays a per-thread partial (its quad sums it at the end): corr is quad-uniform.
    l_a = l_a * corr_a + sum_a;
    l_b = l_b * corr_b + sum_b;
#pragma unroll
    for (int j = 0; j < HD / 8; j++) {
        o[j][0] *= corr_a;
        o[j][1] *= corr_a;
        o[j][2] *= corr_b;
        o[j][3] *= corr_b;
    }
}

// out = o / l as bf16 (head h of rows row_a, row_b below seg_end) and lse (natural log).
template <int HD>
__device__ __forceinline__ void store_out(bf16_t* out, float* lse, const float (*o)[4], int row_a, int row_b,
                                          float m_a, float m_b, float la, float lb, int h, int n, int n_heads,
                                          int seg_end, int lane) {
    la += __shfl_xor_sync(0xffffffffu, la, 1);
    la += __shfl_xor_sync(0xffffffffu, la, 2);
    lb += __shfl_xor_sync(0xffffffffu, lb, 1);
    lb += __shfl_xor_sync(0xffffffffu, lb, 2);
    const float inv_a = la > 0.0f ? 1.0f / la : 0.0f, inv_b = lb > 0.0f ? 1.0f / lb : 0.0f;
    store_acc<HD>(out, (size_t)n_heads * HD, h * HD, o, row_a, row_b, seg_end, inv_a, inv_b, lane);
    if (lane % 4 == 0) {
        if (row_a < seg_end) lse[(size_t)h * n + row_a] = (m_a + log2f(la)) * LN2;
        if (row_b < seg_end) lse[(size_t)h * n + row_b] = (m_b + log2f(lb)) * LN2;
    }
}

// MT m-tiles of 16 q rows per warp (rows 16·MT·warp .. of the CTA's tile): each K or V fragment
// read from shared memory then feeds MT tile products instead of one. Every row sees the same
// operations in the same order whatever NW and MT are (at the same BN), so the kernels of one BN
// give the same bits.
template <int HD, int NW, int BN, int MT>
__device__ void flash_forward_impl(bf16_t* out, float* lse, const bf16_t* qkv, const int* table, int n, int n_heads,
                                   int n_kv_heads) {
    constexpr int WR = 16 * MT, BM = WR * NW, LD = HD + 8, NT = NW * 32;
    FLASH_DYNAMIC_SMEM(smem_raw);
    bf16_t* qs = reinterpret_cast<bf16_t*>(smem_raw);
    bf16_t* ks = qs + BM * LD;      // [3][BN][LD]
    bf16_t* vs = ks + 3 * BN * LD;  // [3][BN][LD]
    if (threadIdx.x == 0 && dynamic_smem_size() < (uint32_t)((BM + 6 * BN) * LD * 2)) __trap();

    int q0, seg_start, seg_end;
    if (!cta_tile(table, q0, seg_start, seg_end)) return;
    const int h = blockIdx.y, kvh = h / (n_heads / n_kv_heads);
    const size_t width = (size_t)(n_heads + 2 * n_kv_heads) * HD;
    const bf16_t* qg = qkv + h * HD;
    const bf16_t* kg = qkv + (n_heads + kvh) * HD;
    const bf16_t* vg = qkv + (n_heads + n_kv_heads + kvh) * HD;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int q_last = min(q0 + BM, seg_end) - 1;
    const int n_kt = (q_last - seg_start) / BN + 1;

    // Q and key tile 0, then key tile 1: the loop starts tile it + 2 (next_kv_tile).
    load_rows<BM, HD, NT>(qs, qg, width, q0, n);
    load_kv_tile<BN, HD, NT>(ks, vs, kg, vg, width, 0, seg_start, n);
    cp_async_commit();
    if (n_kt > 1) {
        load_kv_tile<BN, HD, NT>(ks, vs, kg, vg, width, 1, seg_start + BN, n);
        cp_async_commit();
    }

    const float sl2 = rsqrtf((float)HD) * LOG2E;
    const int w_first = q0 + WR * warp, w_last = w_first + WR - 1;
    // Per m-tile: the rows of the thread's C fragment halves (a: lane/4, b: lane/4 + 8), the
    // running max m and the thread's partial row sum l, all in the exp2 domain.
    int row_a[MT], row_b[MT];
    float m_a[MT], m_b[MT], l_a[MT], l_b[MT];
    float o[MT * (HD / 8)][4];
#pragma unroll
    for (int m = 0; m < MT; m++) {
        row_a[m] = w_first + 16 * m + lane / 4;
        row_b[m] = row_a[m] + 8;
        m_a[m] = m_b[m] = -INFINITY;
        l_a[m] = l_b[m] = 0.0f;
    }
#pragma unroll
    for (int j = 0; j < MT * (HD / 8); j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;

    for (int it = 0; it < n_kt; it++) {
        const int kt = seg_start + it * BN;
        next_kv_tile<BN, HD, NT>(ks, vs, kg, vg, width, it, n_kt, seg_start, n);
        // Skip tiles entirely above the warp's diagonal, and warps past the segment's end.
        if (kt <= w_last && w_first < seg_end) {
            const bf16_t* kb = ks + (it % 3) * BN * LD;
            const bf16_t* vb = vs + (it % 3) * BN * LD;
            float s[MT * (BN / 8)][4];
#pragma unroll
            for (int j = 0; j < MT * (BN / 8); j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
            mma_abt<HD, BN / 8, MT>(s, qs + WR * warp * LD, kb, lane);
            // The causal mask only on the tiles that reach past the warp's first row (a
            // warp-uniform test; most tiles lie wholly below the diagonal).
            if (kt + BN - 1 > w_first) {
#pragma unroll
                for (int m = 0; m < MT; m++) causal_mask<BN / 8>(s + m * (BN / 8), kt, row_a[m], row_b[m], lane);
            }
#pragma unroll
            for (int m = 0; m < MT; m++)
                online_softmax<BN / 8, HD>(s + m * (BN / 8), o + m * (HD / 8), m_a[m], m_b[m], l_a[m], l_b[m], sl2);
            mma_py<HD, BN / 16, MT>(o, s, vb, lane);
        }
    }

#pragma unroll
    for (int m = 0; m < MT; m++)
        store_out<HD>(out, lse, o + m * (HD / 8), row_a[m], row_b[m], m_a[m], m_b[m], l_a[m], l_b[m], h, n, n_heads,
                      seg_end, lane);
}

// ---- forward on Hopper's warpgroup MMA (sm_90a) ------------------------------------------------
// flash_forward_64_sm90: the forward's tile products as wgmma.mma_async, which reads K and V from
// shared memory itself (no ldmatrix) and issues a 64-row product per warpgroup of 4 warps: the
// tensor-core rate that mma.sync cannot reach on an H100/H200. Built only into the sm_90a module
// (build.rs compiles this file a second time with -DSFT_SM90A for compute_90a); the backend
// uses it on compute capability 9.0 when asked (SFT_FLASH_MMA=wgmma) until a GPU has timed it.
//
// wgmma (PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"):
// - Accumulator D of m64nNk16, fp32: warp w of the warpgroup holds rows 16w .. 16w + 15 in the
//   m16n8 C-fragment layout per 8 columns, d[4j + e] = C fragment e of n-tile j: the layout of
//   mma_abt's accumulators, so the softmax steps above serve both kernels unchanged.
// - A from registers (P·V): per warp, the m16n8k16 A fragment of its 16 rows (the C → A packing
//   of mma_py).
// - Shared operands through a 64-bit descriptor: start address, leading and stride byte offsets
//   (LBO, SBO; all >> 4) and the swizzle mode (bits 62-63; 1 = 128 bytes). With the 128-byte
//   swizzle a tile of rows of 64 bf16 (128 bytes) holds row r at r·128 with its 16-byte chunk c
//   at chunk c ^ (r % 8), every 8 rows 1024 bytes from the last (SBO), tiles 1024-byte aligned.
//   K-major (Q, and K for S = Q·Kᵀ): element (row, k) at row·128 + 2k before the swizzle; the
//   k-th 16-column step starts 32·k bytes later (the swizzle applies to the whole address).
//   MN-major (V for O = P·V, imm-trans-b 1): element (key, d) at key·128 + 2d: rows of 8 keys
//   SBO apart, LBO (the next 64 columns) unused at head_dim 64.
//   A may be MN-major too (imm-trans-a 1; the backward's dS from the stored dSᵀ): element (q, key)
//   at key·128 + 2q, the same form.
// - Shared memory written through the generic proxy (cp.async, st.shared) must be fenced with
//   fence.proxy.async before the async proxy (wgmma) reads it.
// The wrappers and the kernel templates are compiled everywhere (unused, they emit no PTX); the
// entries only into the sm_90a module (and the emulation).
#ifndef FLASH_EMULATE
// This thread's warpgroup, from lane 0 by a shuffle: the compiler then knows it is the same in
// every lane and keeps the descriptors built from it in uniform registers (from threadIdx.x / 128
// directly, each wgmma moved its two descriptors there first: 4 R2UR apiece).
__device__ __forceinline__ int warpgroup_index() { return __shfl_sync(0xffffffffu, (int)threadIdx.x / 128, 0); }
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// The accumulator operands: 16 (m64n32) or 32 (m64n64) registers, the first 16 shared.
#define WGMMA_D16_LIST "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
#define WGMMA_D16 "{" WGMMA_D16_LIST "}"
#define WGMMA_D32 "{" WGMMA_D16_LIST ", %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define WGMMA_BLOCK_OPERANDS(d, j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
#define WGMMA_D16_OPERANDS(d) \
    WGMMA_BLOCK_OPERANDS(d, 0), WGMMA_BLOCK_OPERANDS(d, 1), WGMMA_BLOCK_OPERANDS(d, 2), WGMMA_BLOCK_OPERANDS(d, 3)
#define WGMMA_D32_OPERANDS(d) \
    WGMMA_D16_OPERANDS(d), WGMMA_BLOCK_OPERANDS(d, 4), WGMMA_BLOCK_OPERANDS(d, 5), WGMMA_BLOCK_OPERANDS(d, 6), \
        WGMMA_BLOCK_OPERANDS(d, 7)
// Pins the accumulator registers at this point of the program: the compiler may not move their
// reads or writes across the wgmma issue or wait around it.
template <int NB = 8>
__device__ __forceinline__ void wgmma_pin(float (*d)[4]) {
#pragma unroll
    for (int j = 0; j < NB; j++)
        asm volatile("" : WGMMA_BLOCK_OPERANDS(d, j)::"memory");
}
// d (64×64 fp32, per warpgroup) = (accumulate ? d : 0) + A·B, A (64×16) and B (16×64) K-major
// in shared memory.
__device__ __forceinline__ void wgmma_m64n64_ss(float (*d)[4], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " WGMMA_D32 ", %32, %33, p, 1, 1, 0, 0;\n}\n"
        : WGMMA_D32_OPERANDS(d)
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}
// d (64×32 fp32, per warpgroup) = (accumulate ? d : 0) + A·B, A (64×16) MN-major and B (16×32)
// K-major in shared memory.
__device__ __forceinline__ void wgmma_m64n32_ss_ta(float (*d)[4], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 " WGMMA_D16 ", %16, %17, p, 1, 1, 1, 0;\n}\n"
        : WGMMA_D16_OPERANDS(d)
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}
// d += A·B, A (64×16) from registers (a[4] per thread), B (16×64) MN-major in shared memory.
__device__ __forceinline__ void wgmma_m64n64_rs_t(float (*d)[4], const uint32_t* a, uint64_t desc_b) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " WGMMA_D32
        ", {%32, %33, %34, %35}, %36, 1, 1, 1, 1;\n"
        : WGMMA_D32_OPERANDS(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b));
}
#endif  // FLASH_EMULATE

// The descriptor of a shared tile in the 128-byte swizzle at shared address `addr`, as its low
// word (start address, LBO) and high word (SBO, swizzle mode). Moving the start by b bytes adds
// b >> 4 to the low word alone: the 14-bit start field of a shared address never carries.
__device__ __forceinline__ uint32_t sw128_desc_lo(uint32_t addr, uint32_t lbo) {
    return ((addr & 0x3FFFF) >> 4) | (((lbo & 0x3FFFF) >> 4) << 16);
}
__device__ __forceinline__ uint32_t sw128_desc_hi(uint32_t sbo) { return ((sbo & 0x3FFFF) >> 4) | (1u << 30); }
__device__ __forceinline__ uint64_t desc64(uint32_t lo, uint32_t hi) { return (uint64_t)hi << 32 | lo; }

// Per warpgroup: d (64×64) = A·Bᵀ over the HD columns of two K-major tiles in the 128-byte
// swizzle (8-row groups 1024 bytes apart) whose descriptors' low words are a_lo and b_lo:
// HD/16 k-steps of 32 bytes. The first overwrites d (accumulators zeroed in registers first
// made ptxas serialize every wgmma of the backward).
template <int HD>
__device__ __forceinline__ void wgmma_abt(float (*d)[4], uint32_t a_lo, uint32_t b_lo) {
    const uint32_t hi = sw128_desc_hi(1024);
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) wgmma_m64n64_ss(d, desc64(a_lo + 2 * kk, hi), desc64(b_lo + 2 * kk, hi), kk > 0);
}

// Per warpgroup: d (64×64) += A·B over K16 k-steps of 16 rows: A the register fragments a[K16]
// (c_to_a), B the tile at b_lo read MN-major, 2048 bytes a k-step.
template <int K16>
__device__ __forceinline__ void wgmma_ab(float (*d)[4], const uint32_t (*a)[4], uint32_t b_lo) {
    const uint32_t hi = sw128_desc_hi(1024);
#pragma unroll
    for (int kk = 0; kk < K16; kk++) wgmma_m64n64_rs_t(d, a[kk], desc64(b_lo + (2048 >> 4) * kk, hi));
}

// CTA = (q tile of 128 rows, q head): 2 warpgroups of 64 rows, K/V tiles of 64 keys triple-buffered
// as in flash_forward_impl. Per warpgroup and key tile: S = Q·Kᵀ (4 wgmma k-steps), the mask and
// online softmax per warp as in flash_forward_impl, O += P·V (4 wgmma k-steps, P from registers).
// The same operations per row as flash_forward_64, in the same order.
template <int NT>
__device__ void flash_forward_wgmma_impl(bf16_t* out, float* lse, const bf16_t* qkv, const int* table, int n,
                                         int n_heads, int n_kv_heads) {
    constexpr int HD = 64, BM = 128, BN = 64, TILE = BN * HD;  // TILE: elements of a K or V buffer
    FLASH_DYNAMIC_SMEM(smem_raw);
    // The 128-byte swizzle repeats every 1024 bytes of the shared address: align the tiles to it
    // (the launch asks for 1 KiB more than the tiles).
    const uint32_t raw = smem_u32(smem_raw), pad = (1024 - raw % 1024) % 1024;
    bf16_t* qs = reinterpret_cast<bf16_t*>(smem_raw + pad);
    bf16_t* ks = qs + BM * HD;    // [3][BN][HD]
    bf16_t* vs = ks + 3 * TILE;  // [3][BN][HD]
    if (threadIdx.x == 0 && dynamic_smem_size() < pad + (uint32_t)(BM + 6 * BN) * HD * 2) __trap();

    int q0, seg_start, seg_end;
    if (!cta_tile(table, q0, seg_start, seg_end)) return;
    const int h = blockIdx.y, kvh = h / (n_heads / n_kv_heads);
    const size_t width = (size_t)(n_heads + 2 * n_kv_heads) * HD;
    const bf16_t* kg = qkv + (n_heads + kvh) * HD;
    const bf16_t* vg = qkv + (n_heads + n_kv_heads + kvh) * HD;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wg = warpgroup_index();
    const int q_last = min(q0 + BM, seg_end) - 1;
    const int n_kt = (q_last - seg_start) / BN + 1;

    load_rows<BM, HD, NT, true>(qs, qkv + h * HD, width, q0, n);
    load_kv_tile<BN, HD, NT, true>(ks, vs, kg, vg, width, 0, seg_start, n);
    cp_async_commit();
    if (n_kt > 1) {
        load_kv_tile<BN, HD, NT, true>(ks, vs, kg, vg, width, 1, seg_start + BN, n);
        cp_async_commit();
    }

    const float sl2 = rsqrtf((float)HD) * LOG2E;
    const int g_first = q0 + 64 * wg, g_last = g_first + 63;
    const int w_first = q0 + 16 * warp;
    const int row_a = w_first + lane / 4, row_b = row_a + 8;
    float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.0f, l_b = 0.0f;
    float o[HD / 8][4];
#pragma unroll
    for (int j = 0; j < HD / 8; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
    // Descriptors: Q rows of the warpgroup and K tile 0 K-major (LBO unused: 16), V tile 0
    // MN-major (LBO, the next 64 columns, unused at head_dim 64: 1024), 8-row groups 1024 bytes
    // apart; the loop adds byte offsets >> 4 to the low words.
    const uint32_t q_lo = sw128_desc_lo(smem_u32(qs + 64 * wg * HD), 16);
    const uint32_t k_lo = sw128_desc_lo(smem_u32(ks), 16), v_lo = sw128_desc_lo(smem_u32(vs), 1024);
    int buf = 0;  // it % 3

    for (int it = 0; it < n_kt; it++, buf = buf == 2 ? 0 : buf + 1) {
        const int kt = seg_start + it * BN;
        if (it + 1 < n_kt)
            cp_async_wait<1>();
        else
            cp_async_wait<0>();
        // This thread's copies are in shared memory; the fence lets wgmma (the async proxy) see
        // them once the barrier has seen every thread's.
        fence_proxy_async();
        // The last iteration's O += P·V ran during the wait above; it reads V from the buffer
        // the copy after this barrier refills, so it must be done first.
        wgmma_wait<0>();
        wgmma_pin(o);
        __syncthreads();
        if (it + 2 < n_kt) {
            load_kv_tile<BN, HD, NT, true>(ks, vs, kg, vg, width, buf == 0 ? 2 : buf - 1, seg_start + (it + 2) * BN,
                                           n);
            cp_async_commit();
        }
        // Skip tiles entirely above the warpgroup's diagonal, and warpgroups past the segment's
        // end: a warpgroup-uniform test, as wgmma needs all four warps.
        if (kt <= g_last && g_first < seg_end) {
            const uint32_t kb = k_lo + buf * (TILE * 2 >> 4), vb = v_lo + buf * (TILE * 2 >> 4);
            float s[BN / 8][4];
            wgmma_fence();
            wgmma_abt<HD>(s, q_lo, kb);
            wgmma_commit();
            wgmma_wait<0>();
            wgmma_pin(s);
            if (kt + BN - 1 > w_first) causal_mask<BN / 8>(s, kt, row_a, row_b, lane);
            online_softmax<BN / 8, HD>(s, o, m_a, m_b, l_a, l_b, sl2);
            uint32_t p[BN / 16][4];
#pragma unroll
            for (int kk = 0; kk < BN / 16; kk++) c_to_a(p[kk], s + 2 * kk);
            wgmma_fence();
            wgmma_ab<BN / 16>(o, p, vb);
            wgmma_commit();
        }
    }
    wgmma_wait<0>();
    wgmma_pin(o);
    store_out<HD>(out, lse, o, row_a, row_b, m_a, m_b, l_a, l_b, h, n, n_heads, seg_end, lane);
}


// ---- backward ----------------------------------------------------------------------------------
// One kernel, five tile products per (key tile, q tile): Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ, dV += Pᵀ·dO,
// dK += dSᵀ·Q in registers per warp (16·MT keys each), then dQ_partial = dS·K over the CTA's BN
// keys from dSᵀ staged in shared memory (warps split the BQ × HD partial into 16 × CW blocks).
//
// dQ of a q tile is the sum of one partial per key tile of its segment at or before it. The
// partials are added in a fixed order, so dQ is bit-identical run to run: key tile J (the one
// holding the q tile's rows) first, then J − 1, …, down to the segment's first key tile. A
// semaphore per (q head, q tile first row) counts the partials added; key tile j waits until it
// reads J − j (ld.acquire by one thread, then the block barrier), adds its partial to the fp32
// accumulator dq_acc [n][n_heads·HD] (the first one stores it; ld.cg / st.cg, past L1), and
// releases J − j + 1 (barrier, then st.release by one thread). The last one (j = 0) adds, scales, writes bf16 dQ into dqkv and resets the
// semaphore to 0, so the semaphores are all zero between launches (zeroed once at allocation);
// a q tile inside the first key tile has one partial and touches neither buffer.
// Progress: key tile j waits only on key tile j + 1 of its segment and head, which the tile
// table order (read back to front) gives a lower blockIdx.x. CTAs are dispatched in increasing
// block index, so the awaited CTA is running or done (the argument of serial split-K GEMMs), and
// it runs ahead: it meets a q tile BN / BQ iterations before key tile j does.
// ATOMIC_DQ (flash_backward_atomic_HD): every partial, the first key tile's included, goes into
// dq_acc with fp32 atomicAdd (scalar: the PTX targets compute_80, which has no vector red; the
// sm_90a module's flash_backward_atomic_64_sm90 adds float2) and no semaphore; flash_dq_convert
// then writes the bf16 dQ and zeroes dq_acc, which must be zero before the launch.
#ifndef FLASH_EMULATE
__device__ __forceinline__ void st_release(uint32_t* p, uint32_t v) {
    asm volatile("st.release.gpu.global.u32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}
// The acquire pattern of the PTX memory model in two halves: a relaxed load issued early (its
// latency hidden behind the tile products), then spin until it reads `want` and fence.
__device__ __forceinline__ uint32_t ld_relaxed(const uint32_t* p) {
    uint32_t v;
    asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ void wait_semaphore_from(const uint32_t* sem, uint32_t seen, uint32_t want) {
    while (seen != want) {
        __nanosleep(64);
        seen = ld_relaxed(sem);
    }
    asm volatile("fence.acq_rel.gpu;\n" ::: "memory");
}
__device__ __forceinline__ void st_shared_u32(bf16_t* p, uint32_t v) { *reinterpret_cast<uint32_t*>(p) = v; }
__device__ __forceinline__ void st_shared_u4(bf16_t* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }
__device__ __forceinline__ void st_shared_f2(float* p, float2 v) { *reinterpret_cast<float2*>(p) = v; }
__device__ __forceinline__ float4 ld_shared_f4(const float* p) { return *reinterpret_cast<const float4*>(p); }
#endif

// How a flash backward sums dQ: in order (the semaphore read early, the release one iteration
// later, the old partial fetched before the dQ product); in order, deferred (each q tile's partial
// staged in shared memory and added one iteration later, the old partial fetched by cp.async
// behind the next dQ product: the same bits, no registers held across the tile products); or with
// atomic adds.
enum DqMode { DQ_ORDERED, DQ_DEFERRED, DQ_ATOMIC };

// WG (flash_backward_64_sm90): Sᵀ, dPᵀ, dV and dK as wgmma over tiles in the 128-byte swizzle
// (forward's section above), warpgroup g's 4 warps holding its keys 64g .. 64g + 63 in the same
// fragments as the mma.sync kernel's warps. The dQ product too: warpgroup g computes the q tile's
// 64 rows in the columns the mma kernel gives its warps 4g .. 4g + 3, in their fragments, with A
// = dSᵀ read MN-major and B = Kᵀ, a transposed copy of the key tile written once per CTA (a
// wgmma B operand at a column offset inside a swizzled row is not a canonical layout). The same
// products per element over the keys in the same order as the mma kernel (up to the order of
// fp32 additions inside the tensor core).
template <int HD, int NW, int BQ, int DQ, int MT = 1, bool WG = false>
__device__ void flash_backward_impl(bf16_t* dqkv, float* dq_acc, uint32_t* dq_sem, const bf16_t* dout,
                                    const bf16_t* qkv, const float* lse, const float* D, const int* table, int n,
                                    int n_heads, int n_kv_heads, const float* rope_table, int rope_style) {
    // MT m-tiles of 16 keys per warp: WR keys (rows 16·MT·warp .. of the CTA's key tile).
    constexpr int WR = 16 * MT, BN = WR * NW, LD = HD + 8, NT = NW * 32;
    // dSᵀ rows: BQ + 8 bf16 (144 or 80 bytes), so that ldmatrix and the fragment stores are
    // conflict-free. The dQ product: STRIPS strips of 16 q rows × NW / STRIPS groups of CW columns.
    constexpr int LDS = BQ + 8, STRIPS = BQ / 16, CW = HD / (NW / STRIPS);
    constexpr bool ATOMIC_DQ = DQ == DQ_ATOMIC, ORDERED = DQ == DQ_ORDERED, DEFERRED = DQ == DQ_DEFERRED;
    // DEFERRED: the staged partials [2][BQ][PLD] (rows padded by 4 floats against bank conflicts
    // of the fragment-layout stores) and the old partial sums [BQ][HD], in F4 float4 steps.
    constexpr int PLD = HD + 4, F4 = BQ * HD / 4;
    constexpr int DEFERRED_SMEM = DEFERRED ? (2 * BQ * PLD + BQ * HD) * 4 : 0;
    // The ordered sum with two m-tiles per warp would spill the registers that hold the old
    // partial sums fetched ahead (and, timed on an H200, it lost to one m-tile anyway).
    static_assert(!ORDERED || MT == 1, "the ordered dQ sum runs warps of 16 keys");
    static_assert(BN % BQ == 0 && NW % STRIPS == 0 && CW % 16 == 0, "flash backward tiling");
    static_assert(!WG || (HD == 64 && BQ == 64 && NW == 8 && MT == 1), "the wgmma backward's tiles");
    // Rows of the tiles (TLD) and of dSᵀ (SLD) in elements: padded for ldmatrix, or 128 bytes
    // in the 128-byte swizzle (WG; the tiles 1024-byte aligned, the launch asks for 1 KiB more).
    constexpr int TLD = WG ? HD : LD, SLD = WG ? BQ : LDS;
    FLASH_DYNAMIC_SMEM(smem_raw);
    const uint32_t pad = WG ? (1024 - smem_u32(smem_raw) % 1024) % 1024 : 0;
    bf16_t* ks = reinterpret_cast<bf16_t*>(smem_raw + pad);
    bf16_t* vs = ks + BN * TLD;
    bf16_t* qs = vs + BN * TLD;       // [2][BQ][TLD]
    bf16_t* dos = qs + 2 * BQ * TLD;  // [2][BQ][TLD]
    float* lse_s = reinterpret_cast<float*>(dos + 2 * BQ * TLD);  // [2][BQ]
    float* d_s = lse_s + 2 * BQ;                                  // [2][BQ]
    bf16_t* dst = reinterpret_cast<bf16_t*>(d_s + 2 * BQ);        // dSᵀ [BN][SLD]
    bf16_t* kts = dst + BN * SLD;  // WG: Kᵀ [BN / 64][HD][64], keys along 128-byte rows
    float* p_s = reinterpret_cast<float*>(kts + (WG ? BN * HD : 0));  // DEFERRED: [2][BQ][PLD]
    float* old_s = p_s + 2 * BQ * PLD;                            // DEFERRED: [BQ][HD]
    if (threadIdx.x == 0 &&
        dynamic_smem_size() <
            pad + (uint32_t)((2 * BN + 4 * BQ) * TLD * 2 + 4 * BQ * 4 + BN * SLD * 2 + (WG ? BN * HD * 2 : 0) +
                             DEFERRED_SMEM))
        __trap();

    int k0, seg_start, seg_end;
    if (!cta_tile(table, k0, seg_start, seg_end)) return;
    const int kvh = blockIdx.y, group = n_heads / n_kv_heads;
    const size_t width = (size_t)(n_heads + 2 * n_kv_heads) * HD;
    const size_t dstride = (size_t)n_heads * HD;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int n_qt = (seg_end - k0 + BQ - 1) / BQ;
    const int n_it = group * n_qt;
    const int kt_index = (k0 - seg_start) / BN;
    const float2* rope = reinterpret_cast<const float2*>(rope_table);

    load_kv_tile<BN, HD, NT, WG>(ks, vs, qkv + (n_heads + kvh) * HD, qkv + (n_heads + n_kv_heads + kvh) * HD, width,
                                 0, k0, n);
    // WG: the key tile in a group of its own, transposed into Kᵀ below, before the loop.
    if constexpr (WG) cp_async_commit();
    // Iteration it's place: q head kvh·group + hq, q rows k0 + qi·BQ .., where it = hq·n_qt + qi.
    // Counted from one iteration to the next: dividing it by n_qt took some 25 instructions, twice
    // an iteration, in a loop that issues as many integer instructions as tile products.
    struct QPos {
        int hq, qi;
    };
    auto next_pos = [&](QPos p) { return p.qi + 1 == n_qt ? QPos{p.hq + 1, 0} : QPos{p.hq, p.qi + 1}; };
    auto prev_pos = [&](QPos p) { return p.qi == 0 ? QPos{p.hq - 1, n_qt - 1} : QPos{p.hq, p.qi - 1}; };

    static_assert(BQ <= NT, "a thread per lse/D row");
    auto load_q = [&](QPos p, int buf) {
        const int h = kvh * group + p.hq;
        const int qt = k0 + p.qi * BQ;
        load_rows<BQ, HD, NT, WG>(qs + buf * BQ * TLD, qkv + h * HD, width, qt, n);
        load_rows<BQ, HD, NT, WG>(dos + buf * BQ * TLD, dout + h * HD, dstride, qt, n);
        const int r = threadIdx.x;
        if (r < BQ) {
            const bool ok = qt + r < seg_end;
            const size_t off = (size_t)h * n + (ok ? qt + r : 0);
            cp_async4(lse_s + buf * BQ + r, lse + off, ok);
            cp_async4(d_s + buf * BQ + r, D + off, ok);
        }
    };
    load_q(QPos{0, 0}, 0);
    cp_async_commit();

    const float sl2 = rsqrtf((float)HD) * LOG2E;
    const float scale = rsqrtf((float)HD);
    const int w_first = k0 + WR * warp;
    // Per m-tile: the keys of the thread's C fragment halves (a: lane/4, b: lane/4 + 8).
    int key_a[MT], key_b[MT];
#pragma unroll
    for (int m = 0; m < MT; m++) {
        key_a[m] = w_first + 16 * m + lane / 4;
        key_b[m] = key_a[m] + 8;
    }
    // This warp's block of the dQ partial: q rows strip·16 .. + 15 of the tile, and CW columns of
    // the head: CW/2 of its first half from wc0 = (warp / STRIPS)·CW/2, and the CW/2 that pair
    // with them in half-split RoPE, HD/2 on. acc[j] (8 columns) starts at head column
    // wc0 + dq_off(j): j < CW/16 in the first half, the rest their partners in the same order.
    static_assert(CW % 32 == 0, "the dQ product's column blocks pair in 16-column steps");
    const int strip = warp % STRIPS, wc0 = (warp / STRIPS) * (CW / 2);
    auto dq_off = [](int j) { return (j < CW / 16 ? 0 : HD / 2) + (j % (CW / 16)) * 8; };
    if constexpr (WG) {
        // Kᵀ: row i of warpgroup g's CW (row g·CW + i) holds head column g·CW/2 + dq_off(i / 8) +
        // i % 8, so that its dQ product's B is CW whole rows; keys along a row in the 128-byte
        // swizzle, 64 keys a row, the next 64 HD rows on. A step stores 8 keys of a row (16
        // bytes); a warp's 32 lanes take 32 rows (K read 2 bytes a lane from one 128-byte row).
        static_assert(STRIPS == 4 && NW / STRIPS == 2, "a warpgroup per group of dQ columns");
        cp_async_wait<1>();
        __syncthreads();
        const uint16_t* kb = reinterpret_cast<const uint16_t*>(ks);
        for (int step = threadIdx.x; step < HD * (BN / 8); step += NT) {
            const int row = step % HD, kc = step / HD, i = row % CW;
            const int col = (row / CW) * (CW / 2) + dq_off(i / 8) + i % 8;
            auto key_at = [&](int key) { return (uint32_t)kb[tile_at<HD, true>(key, col / 8) + col % 8]; };
            uint32_t w[4];
#pragma unroll
            for (int e = 0; e < 4; e++) w[e] = key_at(kc * 8 + 2 * e) | key_at(kc * 8 + 2 * e + 1) << 16;
            st_shared_u4(kts + (kc / 8) * HD * 64 + tile_at<64, true>(row, kc % 8), make_uint4(w[0], w[1], w[2], w[3]));
        }
    }
    float dk[MT * (HD / 8)][4], dv[MT * (HD / 8)][4];
#pragma unroll
    for (int j = 0; j < MT * (HD / 8); j++) {
        dk[j][0] = dk[j][1] = dk[j][2] = dk[j][3] = 0.0f;
        dv[j][0] = dv[j][1] = dv[j][2] = dv[j][3] = 0.0f;
    }
    // WG: the descriptors' low words (K and V rows of the warpgroup, K-major; Q and dO tile 0,
    // K-major for Sᵀ and dPᵀ, MN-major for dK and dV: the same rows, another reading); the loop
    // adds byte offsets >> 4.
    const int wg = WG ? warpgroup_index() : warp / 4, g_first = k0 + 64 * wg;
    const uint32_t k_lo = sw128_desc_lo(smem_u32(ks + 64 * wg * TLD), 16);
    const uint32_t v_lo = sw128_desc_lo(smem_u32(vs + 64 * wg * TLD), 16);
    const uint32_t q_lo = sw128_desc_lo(smem_u32(qs), 1024), do_lo = sw128_desc_lo(smem_u32(dos), 1024);

    // ORDERED: thread 0's release of the previous iteration's q tile, done during this one.
    // (DEFERRED releases the q tile before that, added during the previous iteration; it is
    // recomputed from the iteration counters when due: held here, its three registers made the
    // kernel in warps of 32 keys spill.)
    uint32_t* pending_sem = nullptr;
    uint32_t pending_value = 0;

    // Iteration i's q tile: its head, first row, and place in the order of dQ partials.
    struct QTile {
        int h, qt;
        bool first, last;
        uint32_t want;
    };
    auto q_tile = [&](QPos p) {
        QTile t;
        t.h = kvh * group + p.hq;
        t.qt = k0 + p.qi * BQ;
        const int first_kt = (t.qt - seg_start) / BN;
        t.first = kt_index == first_kt;
        t.last = kt_index == 0;
        t.want = (uint32_t)(first_kt - kt_index);
        return t;
    };
    // The semaphore of a q tile's dQ partials.
    auto sem_of = [&](const QTile& t) { return dq_sem + (size_t)t.h * n + t.qt; };
    // Thread 0, once a q tile's partial is in the accumulator (and a barrier has ordered every
    // thread's stores before this): the next key tile may add its own, or, after the last,
    // the semaphore goes back to zero. A q tile with a single partial has no semaphore.
    auto release_added = [&](const QTile& t) {
        if (!(t.first && t.last)) st_release(sem_of(t), t.last ? 0u : t.want + 1);
    };
    // DEFERRED: the previous iteration's q tile, whose partial waits in p_s[(it - 1) & 1],
    // recomputed where needed rather than held across the tile products; prev_seen is thread
    // 0's early read of its semaphore.
    QTile prev{};
    uint32_t prev_seen = 0;
    // The old partial sums of prev's q tile, global → old_s (rows past the segment: zeros). A
    // step takes four columns c of a row's first half and the four HD/2 on (the halves of
    // half-split RoPE pairs).
    static_assert(F4 % (2 * NT) == 0, "whole steps of two float4 per thread");
    // The loops over them unrolled where registers allow (in warps of 32 keys, at 255 registers,
    // unrolling them spilled). Row offsets within a tile are 32-bit (the host checks that 128 rows
    // of a qkv row fit an int).
    constexpr int OLD_UNROLL = MT > 1 ? 1 : F4 / (2 * NT);
    auto fetch_old = [&]() {
        const float* g = dq_acc + (size_t)prev.qt * dstride + prev.h * HD;
#pragma unroll(OLD_UNROLL)
        for (int k = 0; k < F4 / (2 * NT); k++) {
            const int e = threadIdx.x + k * NT, r = e / (HD / 8), c = (e % (HD / 8)) * 4;
            const bool ok = prev.qt + r < seg_end;
            const float* src = g + (ok ? r * (int)dstride : 0) + c;
            cp_async16(old_s + r * HD + c, src, ok);
            cp_async16(old_s + r * HD + c + HD / 2, src + HD / 2, ok);
        }
        cp_async_commit();
    };
    // prev's partial (plus the old sums unless it is the first) into the accumulator, or, from
    // the last key tile, as bf16 dQ into dqkv. Each thread reads back only the old sums it
    // fetched itself; the staged partial, stored by other threads in the dQ product's fragment
    // layout, is read at least one barrier after those stores.
    auto add_prev = [&](int pbuf) {
        float* g = dq_acc + (size_t)prev.qt * dstride + prev.h * HD;
        bf16_t* out = dqkv + (size_t)prev.qt * width + prev.h * HD;
#pragma unroll(OLD_UNROLL)
        for (int k = 0; k < F4 / (2 * NT); k++) {
            const int e = threadIdx.x + k * NT, r = e / (HD / 8), c = (e % (HD / 8)) * 4;
            if (prev.qt + r >= seg_end) continue;
            // v[0..3]: columns c .. c + 3; v[4..7]: c + HD/2 .. + 3.
            float v[8];
#pragma unroll
            for (int half = 0; half < 2; half++) {
                float4 x = ld_shared_f4(p_s + (pbuf * BQ + r) * PLD + c + half * (HD / 2));
                if (!prev.first) {
                    const float4 o = ld_shared_f4(old_s + r * HD + c + half * (HD / 2));
                    x = make_float4(o.x + x.x, o.y + x.y, o.z + x.z, o.w + x.w);
                }
                v[4 * half] = x.x, v[4 * half + 1] = x.y, v[4 * half + 2] = x.z, v[4 * half + 3] = x.w;
            }
            if (prev.last) {
#pragma unroll
                for (int i = 0; i < 8; i++) v[i] *= scale;
                rope_back_halves<4>(v, rope + (size_t)(prev.qt + r) * (HD / 2), c, HD / 2, rope_style);
#pragma unroll
                for (int half = 0; half < 2; half++)
                    *reinterpret_cast<uint2*>(out + r * (int)width + c + half * (HD / 2)) = make_uint2(
                        pack_bf16(v[4 * half], v[4 * half + 1]), pack_bf16(v[4 * half + 2], v[4 * half + 3]));
            } else {
#pragma unroll
                for (int half = 0; half < 2; half++)
                    __stcg(reinterpret_cast<float4*>(g + r * (int)dstride + c + half * (HD / 2)),
                           make_float4(v[4 * half], v[4 * half + 1], v[4 * half + 2], v[4 * half + 3]));
            }
        }
    };

    QPos pos{0, 0};
    for (int it = 0; it < n_it; it++, pos = next_pos(pos)) {
        const QTile tile = q_tile(pos);
        const int h = tile.h, qt = tile.qt;
        if (it + 1 < n_it) {
            load_q(next_pos(pos), (it + 1) & 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        // WG: this thread's copies become visible to wgmma (the async proxy) at the barrier.
        if constexpr (WG) fence_proxy_async();
        __syncthreads();
        // The ordered dQ accumulation (see above); a q tile inside the first key tile has a
        // single partial and needs no semaphore.
        const bool first = tile.first, last = tile.last;
        const uint32_t want = tile.want;
        uint32_t* sem = ATOMIC_DQ ? nullptr : sem_of(tile);
        // The semaphore's value, read now and looked at after the tile products (ORDERED) or in
        // the next iteration (DEFERRED).
        uint32_t seen = 0;
        if ((ORDERED || DEFERRED) && threadIdx.x == 0 && !first) seen = ld_relaxed(sem);
        const int buf = it & 1;
        const bf16_t* qb = qs + buf * BQ * TLD;
        const bf16_t* db = dos + buf * BQ * TLD;
        // dSᵀ rows of the thread's fragment halves in m-tile m: ds_a + 16·m·LDS, ds_b + 16·m·LDS
        // (WG: unpadded, column block j at chunk j ^ (row % 8), row % 8 = lane / 4).
        bf16_t* ds_a = dst + (WR * warp + lane / 4) * SLD + (lane % 4) * 2;
        bf16_t* ds_b = ds_a + 8 * SLD;
        auto ds_col = [&](int j) { return WG ? (j ^ (lane / 4)) * 8 : j * 8; };
        // Skip when every q row of the tile is before the warp's first key (all masked); WG: the
        // warpgroup's (wgmma needs its four warps), its warps past the diagonal then masked.
        const int skip_first = WG ? g_first : w_first;
        if (qt + BQ - 1 >= skip_first && skip_first < seg_end) {
            const float* lb = lse_s + buf * BQ;
            const float* ddb = d_s + buf * BQ;
            float s[MT * (BQ / 8)][4], dp[MT * (BQ / 8)][4];
            // (WG: the first wgmma of each product does not add its accumulator in; zeroed
            // registers there made ptxas serialize every wgmma of the kernel.)
#pragma unroll
            for (int j = 0; j < (WG ? 0 : MT * (BQ / 8)); j++) {
                s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
                dp[j][0] = dp[j][1] = dp[j][2] = dp[j][3] = 0.0f;
            }
            // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ: rows = the warp's WR keys, columns = the BQ q rows.
            if constexpr (WG) {
                const uint32_t qd = q_lo + buf * (BQ * TLD * 2 >> 4), dd = do_lo + buf * (BQ * TLD * 2 >> 4);
                wgmma_fence();
                wgmma_abt<HD>(s, k_lo, qd);
                wgmma_commit();
                wgmma_abt<HD>(dp, v_lo, dd);
                wgmma_commit();
                // Sᵀ only: P's exponentials run while dPᵀ is still on the tensor core.
                wgmma_wait<1>();
                wgmma_pin(s);
            } else {
                mma_abt<HD, BQ / 8, MT>(s, ks + WR * warp * LD, qb, lane);
                mma_abt<HD, BQ / 8, MT>(dp, vs + WR * warp * LD, db, lane);
            }
            // P and dS = P∘(dP − D); the causal and segment mask only where the warp's keys and
            // the tile's q rows can need it (most tiles lie wholly below the diagonal).
            auto p_pass = [&](auto masked) {
#pragma unroll
                for (int m = 0; m < MT; m++) {
#pragma unroll
                    for (int j = 0; j < BQ / 8; j++) {
#pragma unroll
                        for (int e = 0; e < 4; e++) {
                            int c = j * 8 + (lane % 4) * 2 + (e & 1);
                            float p = exp2f(s[m * (BQ / 8) + j][e] * sl2 - lb[c] * LOG2E);
                            if constexpr (decltype(masked)::value) {
                                int q = qt + c;
                                int key = e < 2 ? key_a[m] : key_b[m];
                                if (q < key || q >= seg_end) p = 0.0f;
                            }
                            s[m * (BQ / 8) + j][e] = p;
                        }
                    }
                }
            };
            if (qt < w_first + WR - 1 || qt + BQ > seg_end)
                p_pass(Flag<true>{});
            else
                p_pass(Flag<false>{});
            // WG: dS once dPᵀ has landed (P's exponentials above ran while it was computed).
            if constexpr (WG) {
                wgmma_wait<0>();
                wgmma_pin(dp);
            }
#pragma unroll
            for (int j = 0; j < MT * (BQ / 8); j++) {
#pragma unroll
                for (int e = 0; e < 4; e++) dp[j][e] = s[j][e] * (dp[j][e] - ddb[j % (BQ / 8) * 8 + (lane % 4) * 2 + (e & 1)]);
            }
            if constexpr (WG) {
                // dV += Pᵀ·dO and dK += dSᵀ·Q: A from the registers (C → A, as mma_py packs
                // it), B the dO and Q tiles read MN-major (16 q rows, 2048 bytes, a k-step).
                const uint32_t qd = q_lo + buf * (BQ * TLD * 2 >> 4), dd = do_lo + buf * (BQ * TLD * 2 >> 4);
                uint32_t pa[BQ / 16][4], da[BQ / 16][4];
#pragma unroll
                for (int kk = 0; kk < BQ / 16; kk++) {
                    c_to_a(pa[kk], s + 2 * kk);
                    c_to_a(da[kk], dp + 2 * kk);
                }
                wgmma_fence();
                wgmma_ab<BQ / 16>(dv, pa, dd);
                wgmma_ab<BQ / 16>(dk, da, qd);
                wgmma_commit();
                // The wait follows the dSᵀ stores below, which run meanwhile.
            } else {
                mma_py<HD, BQ / 16, MT>(dv, s, db, lane);
                mma_py<HD, BQ / 16, MT>(dk, dp, qb, lane);
            }
            // dSᵀ in bf16, the values dK used, for the dQ product.
#pragma unroll
            for (int m = 0; m < MT; m++) {
#pragma unroll
                for (int j = 0; j < BQ / 8; j++) {
                    const float* d = dp[m * (BQ / 8) + j];
                    st_shared_u32(ds_a + 16 * m * SLD + ds_col(j), pack_bf16(d[0], d[1]));
                    st_shared_u32(ds_b + 16 * m * SLD + ds_col(j), pack_bf16(d[2], d[3]));
                }
            }
            if constexpr (WG) {
                wgmma_wait<0>();
                wgmma_pin(dv);
                wgmma_pin(dk);
            }
        } else {
#pragma unroll
            for (int m = 0; m < MT; m++) {
#pragma unroll
                for (int j = 0; j < BQ / 8; j++) {
                    st_shared_u32(ds_a + 16 * m * SLD + ds_col(j), 0u);
                    st_shared_u32(ds_b + 16 * m * SLD + ds_col(j), 0u);
                }
            }
        }

        if (DEFERRED && it > 0) prev = q_tile(prev_pos(pos));
        const bool fetch = DEFERRED && it > 0 && !prev.first;
        if ((ORDERED || DEFERRED) && threadIdx.x == 0) {
            // The previous iteration's accumulator stores are ordered before this iteration's
            // first barrier, so its q tile can be released now; most of an iteration has passed
            // since they were issued, so the release waits little.
            if (DEFERRED) {
                if (it >= 2) release_added(q_tile(prev_pos(prev_pos(pos))));
            } else if (pending_sem) {
                st_release(pending_sem, pending_value);
                pending_sem = nullptr;
            }
            if (ORDERED && !first) wait_semaphore_from(sem, seen, want);
            if (fetch) wait_semaphore_from(sem_of(prev), prev_seen, prev.want);
        }
        // The barrier also orders the dSᵀ stores before the dQ product's reads (WG: each thread's
        // behind its fence.proxy.async, as wgmma reads them).
        if constexpr (WG) fence_proxy_async();
        __syncthreads();
        // DEFERRED: the old sums of the previous q tile arrive behind this tile's dQ product.
        if (fetch) fetch_old();

        const int row_a = qt + strip * 16 + lane / 4, row_b = row_a + 8;
        const int col = h * HD + wc0 + (lane % 4) * 2;
        // The thread's elements of the accumulator and of dQ: row a's first, one 64-bit offset
        // each; row b is 8 rows on, column block j at dq_off(j) (immediate offsets). Rows past
        // the segment are never accessed.
        float* const acc_a = dq_acc + (size_t)row_a * dstride + col;
        bf16_t* const dq_a = dqkv + (size_t)row_a * width + col;
        // ORDERED: the partial sum so far, fetched before the dQ product instead of after it.
        float2 old[ORDERED ? CW / 8 : 1][2];
        if (ORDERED && !first) {
#pragma unroll
            for (int j = 0; j < (ORDERED ? CW / 8 : 1); j++) {
#pragma unroll
                for (int half = 0; half < 2; half++) {
                    const int row = half ? row_b : row_a;
                    old[j][half] = row < seg_end ? __ldcg(reinterpret_cast<const float2*>(
                                                       acc_a + half * 8 * (int)dstride + dq_off(j)))
                                                 : make_float2(0.0f, 0.0f);
                }
            }
        }

        float acc[CW / 8][4];
        // WG: acc holds the dQ partial once the product's group has retired.
        auto dq_landed = [&]() {
            if constexpr (WG) {
                wgmma_wait<0>();
                wgmma_pin<CW / 8>(acc);
            }
        };
        if constexpr (WG) {
            // dQ_partial = dS · K on wgmma, per warpgroup its 64 q rows × its CW columns (m64n32),
            // BN/16 k-steps of 16 keys: A = dSᵀ read MN-major (16 rows of 128 bytes, 2048 bytes a
            // step), B = its CW rows of Kᵀ (32 bytes a step along the row, HD rows on after 64
            // keys). The first step does not add the accumulator in. Waited for below, after
            // the deferred sum of the previous tile (which the tensor core's work then hides).
            static_assert(CW == 32, "wgmma_m64n32_ss_ta");
            const uint32_t hi = sw128_desc_hi(1024);
            const uint32_t a_lo = sw128_desc_lo(smem_u32(dst), 1024);
            const uint32_t b_lo = sw128_desc_lo(smem_u32(kts + wg * CW * 64), 16);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < BN / 16; kk++)
                wgmma_m64n32_ss_ta(acc, desc64(a_lo + kk * (2048 >> 4), hi),
                                   desc64(b_lo + (kk / 4) * (HD * 128 >> 4) + (kk % 4) * 2, hi), kk > 0);
            wgmma_commit();
        } else {
            // dQ_partial = dS · K: A = dS from dSᵀ with ldmatrix.trans (matrix i: keys
            // kk·16 + (i/2)·8 .., q rows + (i%2)·8 ..), B = K [key][HD] as in mma_py.
#pragma unroll
            for (int j = 0; j < CW / 8; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
            const int a_row = (lane % 8) + (lane / 16) * 8, a_chunk = strip * 2 + (lane / 8) % 2;
            const int k_row = (lane % 8) + ((lane / 8) % 2) * 8, k_chunk = wc0 / 8 + lane / 16;
            uint32_t a_addr = smem_u32(dst + a_row * SLD + a_chunk * 8);
            uint32_t k_addr[CW / 16];
#pragma unroll
            for (int cp = 0; cp < CW / 16; cp++) k_addr[cp] = smem_u32(ks + k_row * TLD + (k_chunk + dq_off(2 * cp) / 8) * 8);
#pragma unroll
            for (int kk = 0; kk < BN / 16; kk++) {
                uint32_t a[4];
                ldsm_x4_t(a[0], a[1], a[2], a[3], a_addr + kk * 16 * SLD * 2);
#pragma unroll
                for (int cp = 0; cp < CW / 16; cp++) {
                    uint32_t b0, b1, b2, b3;
                    ldsm_x4_t(b0, b1, b2, b3, k_addr[cp] + kk * 16 * TLD * 2);
                    mma_bf16(acc[2 * cp], a, b0, b1);
                    mma_bf16(acc[2 * cp + 1], a, b2, b3);
                }
            }
        }
        if (DEFERRED) {
            if (it > 0) {
                prev = q_tile(prev_pos(pos));
                cp_async_wait<0>();
                add_prev((it - 1) & 1);
            }
            dq_landed();
            // This tile's partial waits in p_s[it & 1] for the next iteration.
            float* pb = p_s + (it & 1) * BQ * PLD + wc0 + (lane % 4) * 2;
#pragma unroll
            for (int j = 0; j < CW / 8; j++) {
                st_shared_f2(pb + (strip * 16 + lane / 4) * PLD + dq_off(j), make_float2(acc[j][0], acc[j][1]));
                st_shared_f2(pb + (strip * 16 + lane / 4 + 8) * PLD + dq_off(j), make_float2(acc[j][2], acc[j][3]));
            }
            prev_seen = seen;
            continue;
        }
        // (The deferred sums took their path above.)
        if constexpr (!DEFERRED) {
            dq_landed();
            // The partial plus the sum so far: into the accumulator, or, from the last key tile, as
            // bf16 dQ (scaled and rotated back) into dqkv.
#pragma unroll
            for (int j = 0; j < CW / 8; j++) {
#pragma unroll
                for (int half = 0; half < 2; half++) {
                    const int row = half ? row_b : row_a;
                    if (row >= seg_end) continue;
                    float* p = acc_a + half * 8 * (int)dstride + dq_off(j);
                    if (ATOMIC_DQ) {
#ifdef SFT_SM90A
                        // Compute capability 9.x adds a float2 to global memory in one red.
                        atomicAdd(reinterpret_cast<float2*>(p), make_float2(acc[j][2 * half], acc[j][2 * half + 1]));
#else
                        atomicAdd(p, acc[j][2 * half]);
                        atomicAdd(p + 1, acc[j][2 * half + 1]);
#endif
                        continue;
                    }
                    if (!first) {
                        const float2 o = old[ORDERED ? j : 0][half];
                        acc[j][2 * half] = o.x + acc[j][2 * half];
                        acc[j][2 * half + 1] = o.y + acc[j][2 * half + 1];
                    }
                    if (!last)
                        __stcg(reinterpret_cast<float2*>(p), make_float2(acc[j][2 * half], acc[j][2 * half + 1]));
                }
            }
            if (!ATOMIC_DQ && last) {
#pragma unroll
                for (int j = 0; j < CW / 8; j++)
#pragma unroll
                    for (int e = 0; e < 4; e++) acc[j][e] *= scale;
                rope_back_fragments<HD, CW / 8>(acc, wc0, dq_off, row_a, row_b, seg_end, rope, rope_style, lane);
#pragma unroll
                for (int j = 0; j < CW / 8; j++) {
                    if (row_a < seg_end)
                        *reinterpret_cast<uint32_t*>(dq_a + dq_off(j)) = pack_bf16(acc[j][0], acc[j][1]);
                    if (row_b < seg_end)
                        *reinterpret_cast<uint32_t*>(dq_a + 8 * (int)width + dq_off(j)) =
                            pack_bf16(acc[j][2], acc[j][3]);
                }
            }
        }
        // The CUTLASS semaphore pattern: the barrier orders every thread's accumulator stores
        // before thread 0's release at GPU scope, which is cumulative over them. (A fence in every
        // thread, as here before, waited for each thread's stores on every iteration: on an H200
        // the kernel issued on 21% of its cycles.) The release happens during the next iteration,
        // after its first barrier, or after the loop. (Released here after a second barrier,
        // with the wait and the old partial's load on the critical path, the backward took 21%
        // longer on an H200: 2.91 against 2.40 ms at 8 × 2048 rows × 32 heads of 64.) The
        // atomic path has nothing to release, and the next iteration's first barrier already
        // orders this one's dSᵀ reads before the next dSᵀ stores.
        if (ORDERED && threadIdx.x == 0 && !(first && last)) {
            pending_sem = sem;
            pending_value = last ? 0u : want + 1;
        }
    }
    if (ORDERED) {
        __syncthreads();
        if (threadIdx.x == 0 && pending_sem) st_release(pending_sem, pending_value);
    }
    if (DEFERRED) {
        // The last tile's partial: the barrier orders its staging stores before the reads of
        // add_prev, and the previous tile's accumulator stores before their release.
        prev = q_tile(prev_pos(pos));
        uint32_t* sem = sem_of(prev);
        __syncthreads();
        if (threadIdx.x == 0) {
            if (n_it >= 2) release_added(q_tile(prev_pos(prev_pos(pos))));
            if (!prev.first) wait_semaphore_from(sem, prev_seen, prev.want);
        }
        __syncthreads();
        if (!prev.first) {
            fetch_old();
            cp_async_wait<0>();
        }
        add_prev((n_it - 1) & 1);
        __syncthreads();
        if (threadIdx.x == 0) release_added(prev);
    }

#pragma unroll
    for (int m = 0; m < MT; m++) {
        store_dk<HD>(dqkv, width, (n_heads + kvh) * HD, dk + m * (HD / 8), key_a[m], key_b[m], seg_end, scale, rope,
                     rope_style, lane);
        store_acc<HD>(dqkv, width, (n_heads + n_kv_heads + kvh) * HD, dv + m * (HD / 8), key_a[m], key_b[m], seg_end,
                      1.0f, 1.0f, lane);
    }
}

// ---- dQ of the atomic backward -------------------------------------------------------------------
// dqkv[row][0 .. q_width) = bf16(dq_acc[row][..] · head_dim^-½), rotated back as rope_style says,
// then dq_acc = 0. A step takes eight columns of a head's first half and the eight head_dim/2 on
// (the halves of half-split RoPE pairs): four 16-byte loads, two 16-byte bf16 stores, four
// 16-byte zero stores (head_dim is 64 or 128 and a dqkv row of (n_heads + 2·n_kv_heads)·head_dim
// bf16 a multiple of 16 bytes, so no access straddles a row). Grid-stride over the
// n · q_width / 16 steps, counted in 32 bits (the host checks that they fit an int): two 32-bit
// divisions per step.
#ifndef SFT_SM90A
extern "C" __global__ void __launch_bounds__(256)
    flash_dq_convert(bf16_t* dqkv, float* dq_acc, int n, int n_heads, int n_kv_heads, int head_dim,
                     const float* rope_table, int rope_style) {
    const float scale = rsqrtf((float)head_dim);
    const int q_width = n_heads * head_dim, half_dim = head_dim / 2, steps_per_row = q_width / 16;
    const size_t width = (size_t)(n_heads + 2 * n_kv_heads) * head_dim;
    const unsigned steps = (unsigned)n * (unsigned)steps_per_row;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < steps; i += gridDim.x * blockDim.x) {
        const unsigned row = i / steps_per_row, g = i - row * steps_per_row;
        // Group g of the row: head g / (head_dim/16), first-half columns c .. c + 7 of it.
        const unsigned head = g / (half_dim / 8), c = (g - head * (half_dim / 8)) * 8;
        const unsigned col = head * head_dim + c;
        // v[0..7]: columns col .. col + 7; v[8..15]: col + head_dim/2 .. + 7.
        float v[16];
#pragma unroll
        for (int half = 0; half < 2; half++) {
            float4* a = reinterpret_cast<float4*>(dq_acc + (size_t)row * q_width + col + half * half_dim);
            const float4 lo = a[0], hi = a[1];
            v[8 * half] = lo.x * scale, v[8 * half + 1] = lo.y * scale, v[8 * half + 2] = lo.z * scale;
            v[8 * half + 3] = lo.w * scale, v[8 * half + 4] = hi.x * scale, v[8 * half + 5] = hi.y * scale;
            v[8 * half + 6] = hi.z * scale, v[8 * half + 7] = hi.w * scale;
            a[0] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            a[1] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
        const float2* cs = reinterpret_cast<const float2*>(rope_table) + (size_t)row * half_dim;
        rope_back_halves<8>(v, cs, (int)c, half_dim, rope_style);
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const float* w = v + 8 * half;
            *reinterpret_cast<uint4*>(dqkv + (size_t)row * width + col + half * half_dim) =
                make_uint4(pack_bf16(w[0], w[1]), pack_bf16(w[2], w[3]), pack_bf16(w[4], w[5]), pack_bf16(w[6], w[7]));
        }
    }
}
#endif

// ---- entries ---------------------------------------------------------------------------------
// Configurations (keep in sync with FLASH_64 and FLASH_128 in src/backend/cuda/flash_attention.rs):
//   forward            HD 64: 4 warps × 32 q rows, BN 64   HD 128: 8 warps × 16 q rows, BN 64
//   backward           HD 64: 8 warps × 16 keys,   BQ 64   HD 128: 8 warps × 16 keys,   BQ 32
//   backward_deferred  HD 64: 4 warps × 32 keys,   BQ 32   HD 128: 8 warps × 16 keys,   BQ 32
//   backward_atomic    HD 64: 4 warps × 32 keys,   BQ 32   HD 128: 8 warps × 16 keys,   BQ 32
//   backward_deferred_q64  HD 64: 8 warps × 16 keys, BQ 64  (below the entries; none for HD 128)
// Grid: (tile-table bound, n_heads) for the forward, (bound, n_kv_heads) for the backward;
// block NW·32. All read one tile table of 128 rows. MINB: CTAs per SM the registers must allow.
// The HD 64 forward needs 235 registers on sm_90, so 2 CTAs (8 warps) per SM; capping it at 3
// spills (148 bytes), and key tiles of 128 rows spill at 255 registers (168 bytes).
#define FLASH_ENTRIES(HD, FNW, FBN, FMT, FMINB, KNW, KBQ, ANW, ABQ, AMT, AMINB)                                \
    extern "C" __global__ void __launch_bounds__(FNW * 32, FMINB)                                              \
        flash_forward_##HD(bf16_t* out, float* lse, const bf16_t* qkv, const int* table, int n, int n_heads,   \
                           int n_kv_heads) {                                                                   \
        flash_forward_impl<HD, FNW, FBN, FMT>(out, lse, qkv, table, n, n_heads, n_kv_heads);                   \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(KNW * 32)                                                     \
        flash_backward_##HD(bf16_t* dqkv, float* dq_acc, uint32_t* dq_sem, const bf16_t* dout,                 \
                            const bf16_t* qkv, const float* lse, const float* D, const int* table, int n,      \
                            int n_heads, int n_kv_heads, const float* rope_table, int rope_style) {            \
        flash_backward_impl<HD, KNW, KBQ, DQ_ORDERED>(dqkv, dq_acc, dq_sem, dout, qkv, lse, D, table, n,       \
                                                      n_heads, n_kv_heads, rope_table, rope_style);            \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(ANW * 32, AMINB)                                              \
        flash_backward_deferred_##HD(bf16_t* dqkv, float* dq_acc, uint32_t* dq_sem, const bf16_t* dout,        \
                                     const bf16_t* qkv, const float* lse, const float* D, const int* table,    \
                                     int n, int n_heads, int n_kv_heads, const float* rope_table,              \
                                     int rope_style) {                                                         \
        flash_backward_impl<HD, ANW, ABQ, DQ_DEFERRED, AMT>(dqkv, dq_acc, dq_sem, dout, qkv, lse, D, table, n, \
                                                            n_heads, n_kv_heads, rope_table, rope_style);      \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(ANW * 32, AMINB)                                              \
        flash_backward_atomic_##HD(bf16_t* dqkv, float* dq_acc, const bf16_t* dout, const bf16_t* qkv,         \
                                   const float* lse, const float* D, const int* table, int n, int n_heads,     \
                                   int n_kv_heads, const float* rope_table, int rope_style) {                  \
        flash_backward_impl<HD, ANW, ABQ, DQ_ATOMIC, AMT>(dqkv, dq_acc, nullptr, dout, qkv, lse, D, table, n,  \
                                                          n_heads, n_kv_heads, rope_table, rope_style);        \
    }
#ifndef SFT_SM90A
FLASH_ENTRIES(64, 4, 64, 2, 2, 8, 64, 4, 32, 2, 2)
FLASH_ENTRIES(128, 8, 64, 1, 1, 8, 32, 8, 32, 1, 1)

// The deferred sums in the ordered kernel's tiles (HD 64: 8 warps of 16 keys over q tiles of 64,
// half the semaphore hand-offs of q tiles of 32), so that one GPU run can time both layouts
// (SFT_FLASH_DQ=deferred-q64). HD 128 has no such kernel: q tiles of 64 with the staged
// partials need more than the 227 KiB of shared memory of a block.
extern "C" __global__ void __launch_bounds__(256)
    flash_backward_deferred_q64_64(bf16_t* dqkv, float* dq_acc, uint32_t* dq_sem, const bf16_t* dout,
                                   const bf16_t* qkv, const float* lse, const float* D, const int* table, int n,
                                   int n_heads, int n_kv_heads, const float* rope_table, int rope_style) {
    flash_backward_impl<64, 8, 64, DQ_DEFERRED, 1>(dqkv, dq_acc, dq_sem, dout, qkv, lse, D, table, n, n_heads,
                                                   n_kv_heads, rope_table, rope_style);
}
#endif  // SFT_SM90A

// ---- the sm_90a entries ----------------------------------------------------------------------------
#if defined(SFT_SM90A) || defined(FLASH_EMULATE)
// 2 CTAs per SM: 128 registers a thread at most, 65 KiB of shared memory each.
extern "C" __global__ void __launch_bounds__(256, 2)
    flash_forward_64_sm90(bf16_t* out, float* lse, const bf16_t* qkv, const int* table, int n, int n_heads,
                          int n_kv_heads) {
    flash_forward_wgmma_impl<256>(out, lse, qkv, table, n, n_heads, n_kv_heads);
}
// The default backward (ordered dQ) with Sᵀ, dPᵀ, dV and dK on wgmma: one CTA per SM, as
// flash_backward_64.
extern "C" __global__ void __launch_bounds__(256)
    flash_backward_64_sm90(bf16_t* dqkv, float* dq_acc, uint32_t* dq_sem, const bf16_t* dout, const bf16_t* qkv,
                           const float* lse, const float* D, const int* table, int n, int n_heads, int n_kv_heads,
                           const float* rope_table, int rope_style) {
    flash_backward_impl<64, 8, 64, DQ_ORDERED, 1, true>(dqkv, dq_acc, dq_sem, dout, qkv, lse, D, table, n, n_heads,
                                                         n_kv_heads, rope_table, rope_style);
}
// flash_backward_deferred_q64_64 on wgmma likewise (SFT_FLASH_DQ=deferred-q64 with
// SFT_FLASH_MMA=wgmma): the deferred sums in the same tiles, the same bits.
extern "C" __global__ void __launch_bounds__(256)
    flash_backward_deferred_q64_64_sm90(bf16_t* dqkv, float* dq_acc, uint32_t* dq_sem, const bf16_t* dout,
                                        const bf16_t* qkv, const float* lse, const float* D, const int* table, int n,
                                        int n_heads, int n_kv_heads, const float* rope_table, int rope_style) {
    flash_backward_impl<64, 8, 64, DQ_DEFERRED, 1, true>(dqkv, dq_acc, dq_sem, dout, qkv, lse, D, table, n, n_heads,
                                                          n_kv_heads, rope_table, rope_style);
}
// The atomic dQ adds on wgmma (SFT_FLASH_DQ=atomic with SFT_FLASH_MMA=wgmma), in the ordered
// kernel's tiles (the mma atomic kernel's warps of 32 keys over q tiles of 32 are no warpgroup
// tiles); flash_dq_convert writes dQ after it.
extern "C" __global__ void __launch_bounds__(256)
    flash_backward_atomic_64_sm90(bf16_t* dqkv, float* dq_acc, const bf16_t* dout, const bf16_t* qkv,
                                  const float* lse, const float* D, const int* table, int n, int n_heads,
                                  int n_kv_heads, const float* rope_table, int rope_style) {
    flash_backward_impl<64, 8, 64, DQ_ATOMIC, 1, true>(dqkv, dq_acc, nullptr, dout, qkv, lse, D, table, n, n_heads,
                                                        n_kv_heads, rope_table, rope_style);
}
#endif  // SFT_SM90A || FLASH_EMULATE
