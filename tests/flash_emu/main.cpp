// Runs kernels/flash_attention.cu's kernels on the CPU (flash_emu.h) and compares out, lse, dq,
// dk and dv with a float64 reference of causal attention over packed segments (the backward
// with its ordered dQ, and with atomic dQ adds plus flash_dq_convert; dK and dQ rotated back by
// the RoPE table where the case asks, as the backward does in its epilogues). Build and run:
// scripts/flash_emulate.sh. Exit status 0 when every case is within tolerance.
#include "flash_attention.cu"

#include <map>
#include <random>
#include <string>

// Per kernel entry, for the report lines of scripts/emulate.sh (KERNEL name cases max_err tol
// races ldmatrix_phases conflicted failures).
struct KernelLine {
    int cases = 0, failures = 0;
    double max_err = 0, tol = 0;
    long races = 0, phases = 0, conflicted = 0;
};
static std::map<std::string, KernelLine> lines;

// Runs one launch and charges its races and ldmatrix phases to `name`.
template <class F>
static void launch(const std::string& name, unsigned gx, unsigned gy, int threads, size_t smem, F kernel,
                   int ctas = 1) {
    long r0 = emu_stats.races, p0 = emu_stats.ldsm_phases, c0 = emu_stats.ldsm_conflicted;
    emu_launch(gx, gy, threads, smem, kernel, ctas);
    KernelLine& l = lines[name];
    l.races += emu_stats.races - r0;
    l.phases += emu_stats.ldsm_phases - p0;
    l.conflicted += emu_stats.ldsm_conflicted - c0;
}

static void record(const std::string& name, double err, double tol) {
    KernelLine& l = lines[name];
    l.cases++;
    l.tol = std::max(l.tol, tol);
    l.max_err = std::isfinite(err) && std::isfinite(l.max_err) ? std::max(l.max_err, err) : INFINITY;
    if (!(err <= tol)) l.failures++;
}

struct Case {
    int hd, nh, nkv;
    std::vector<int> cu;
    int rope;  // ROPE_NONE, ROPE_ADJACENT or ROPE_HALF: the backward's rope_style
};

static float bf_round(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

static double rel_err(const std::vector<double>& got, const std::vector<double>& want) {
    double d = 0, n = 0;
    for (size_t i = 0; i < got.size(); i++) {
        if (!std::isfinite(got[i])) return INFINITY;
        d += (got[i] - want[i]) * (got[i] - want[i]);
        n += want[i] * want[i];
    }
    // A reference that is exactly zero (dq, dk of a 1-token sequence): the absolute error.
    return n > 0 ? std::sqrt(d / n) : std::sqrt(d);
}

// Warps and dynamic shared memory of the forward, the backward and the atomic backward (the
// deferred backward has the atomic one's tiles, plus its staged partials and old sums; the HD 64
// deferred_q64 one the ordered one's tiles, plus the same for q tiles of 64); and of the HD 64
// wgmma kernels (8 warps each): the forward, the ordered and the deferred_q64 backward.
struct Cfg {
    int fnw, knw, anw;
    size_t fsmem, ksmem, asmem, dsmem, dq64smem;
    size_t wg_fsmem, wg_ksmem, wg_dq64smem;
};

static Cfg config(int hd) {
    // FLASH_ENTRIES in flash_attention.cu / FLASH_64, FLASH_128 in flash_attention.rs: the
    // forward holds Q [128] and K, V [3][64]; a backward holds K, V [128], Q, dO [2][BQ], lse, D
    // [2][BQ] f32 and dSᵀ [128][BQ + 8] (BQ 64 for the HD 64 ordered backward, else 32).
    // The wgmma kernels hold the same tiles in rows of 128 bytes (dSᵀ too), plus 1 KiB to align
    // them; the wgmma backward also a transposed copy of K [64][128].
    size_t rb = (hd + 8) * 2;
    auto backward = [&](size_t bq) { return (256 + 4 * bq) * rb + 4 * bq * 4 + 128 * (bq + 8) * 2; };
    auto staged = [&](size_t bq) { return (2 * bq * (hd + 4) + bq * hd) * 4; };
    if (hd == 64) {
        const size_t wg_backward = (256 + 4 * 64) * 128 + 4 * 64 * 4 + 2 * 128 * 64 * 2 + 1024;
        return {4, 8, 4, (128 + 6 * 64) * rb, backward(64), backward(32), backward(32) + staged(32),
                backward(64) + staged(64), (128 + 6 * 64) * 128 + 1024, wg_backward, wg_backward + staged(64)};
    }
    return {8, 8, 8, (128 + 6 * 64) * rb, backward(32), backward(32), backward(32) + staged(32), 0, 0, 0, 0};
}

static std::vector<int> tile_table(const std::vector<int>& cu, int tile, int n) {
    int bound = (n + tile - 1) / tile + (int)cu.size() - 1;
    std::vector<int> table(1 + 3 * bound, -7);
    std::vector<uint32_t> cuu(cu.begin(), cu.end());
    int segs = (int)cu.size() - 1;
    launch("flash_tile_table", 1, 1, 1024, 0, [&] { flash_tile_table(table.data(), cuu.data(), segs, tile); });
    // flash::tile_table's contract: the count, then (first row, segment start, segment end) of
    // each tile of `tile` rows in segment order, tiles never crossing a segment.
    std::vector<int> want = {0};
    for (int s = 0; s < segs; s++)
        for (int q = cu[s]; q < cu[s + 1]; q += tile) want[0]++, want.insert(want.end(), {q, cu[s], cu[s + 1]});
    int bad = 0;
    for (size_t i = 0; i < want.size(); i++) bad += table[i] != want[i];
    record("flash_tile_table", bad, 0);
    return table;
}

static bool run(const Case& c, uint64_t seed) {
    const int hd = c.hd, nh = c.nh, nkv = c.nkv, n = c.cu.back();
    const int width = (nh + 2 * nkv) * hd, group = nh / nkv;
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<bf16_t> qkv(n * width), dout(n * nh * hd);
    std::vector<float> qkvf(qkv.size()), doutf(dout.size());
    for (size_t i = 0; i < qkv.size(); i++) qkvf[i] = bf_round(normal(rng)), qkv[i] = __float2bfloat16_rn(qkvf[i]);
    for (size_t i = 0; i < dout.size(); i++) doutf[i] = bf_round(normal(rng)), dout[i] = __float2bfloat16_rn(doutf[i]);
    // A RoPE table of (cos, sin) per row and pair: any angles will do for the rotation back.
    std::uniform_real_distribution<float> angle(-3.2f, 3.2f);
    std::vector<float> rope_tab((size_t)n * hd);
    for (size_t i = 0; i < rope_tab.size(); i += 2) {
        const float a = angle(rng);
        rope_tab[i] = std::cos(a), rope_tab[i + 1] = std::sin(a);
    }

    // ---- reference (float64) ----
    std::vector<double> r_out(n * nh * hd, 0), r_lse(nh * n, 0), r_dqkv(n * width, 0);
    const double scale = 1.0 / std::sqrt((double)hd);
    for (size_t s = 0; s + 1 < c.cu.size(); s++) {
        int a = c.cu[s], b = c.cu[s + 1];
        for (int h = 0; h < nh; h++) {
            int g = h / group;
            for (int i = a; i < b; i++) {
                std::vector<double> p(i - a + 1);
                double m = -1e300;
                for (int j = a; j <= i; j++) {
                    double dot = 0;
                    for (int t = 0; t < hd; t++) dot += (double)qkvf[i * width + h * hd + t] * qkvf[j * width + (nh + g) * hd + t];
                    p[j - a] = dot * scale;
                    m = std::max(m, p[j - a]);
                }
                double l = 0;
                for (double& v : p) l += (v = std::exp(v - m));
                r_lse[h * n + i] = m + std::log(l);
                for (double& v : p) v /= l;
                for (int t = 0; t < hd; t++) {
                    double o = 0;
                    for (int j = a; j <= i; j++) o += p[j - a] * qkvf[j * width + (nh + nkv + g) * hd + t];
                    r_out[i * nh * hd + h * hd + t] = o;
                }
                double D = 0;
                for (int t = 0; t < hd; t++) D += (double)doutf[i * nh * hd + h * hd + t] * r_out[i * nh * hd + h * hd + t];
                for (int j = a; j <= i; j++) {
                    double dp = 0;
                    for (int t = 0; t < hd; t++) dp += (double)doutf[i * nh * hd + h * hd + t] * qkvf[j * width + (nh + nkv + g) * hd + t];
                    double pj = p[j - a], ds = pj * (dp - D);
                    for (int t = 0; t < hd; t++) {
                        r_dqkv[i * width + h * hd + t] += ds * scale * qkvf[j * width + (nh + g) * hd + t];
                        r_dqkv[j * width + (nh + g) * hd + t] += ds * scale * qkvf[i * width + h * hd + t];
                        r_dqkv[j * width + (nh + nkv + g) * hd + t] += pj * doutf[i * nh * hd + h * hd + t];
                    }
                }
            }
        }
    }

    // The gradients before the rotation, dK and dQ, in either pairing.
    auto rotate_back_ref = [&](int i, int col0, bool adjacent) {
        for (int j = 0; j < hd / 2; j++) {
            const int a = col0 + (adjacent ? 2 * j : j), b = col0 + (adjacent ? 2 * j + 1 : j + hd / 2);
            const double cs = rope_tab[((size_t)i * hd / 2 + j) * 2], sn = rope_tab[((size_t)i * hd / 2 + j) * 2 + 1];
            const double x0 = r_dqkv[i * width + a], x1 = r_dqkv[i * width + b];
            r_dqkv[i * width + a] = x0 * cs + x1 * sn;
            r_dqkv[i * width + b] = x1 * cs - x0 * sn;
        }
    };
    if (c.rope != ROPE_NONE)
        for (int i = 0; i < n; i++) {
            for (int g = 0; g < nkv; g++) rotate_back_ref(i, (nh + g) * hd, c.rope == ROPE_ADJACENT);
            for (int h = 0; h < nh; h++) rotate_back_ref(i, h * hd, c.rope == ROPE_ADJACENT);
        }

    // ---- the kernels ----
    Cfg cfg = config(hd);
    std::vector<bf16_t> out(n * nh * hd, __float2bfloat16_rn(NAN)), dqkv(n * width, __float2bfloat16_rn(NAN));
    std::vector<float> lse(nh * n, NAN), D(nh * n);
    // One tile table of 128 rows serves every kernel, as in the backend.
    auto tf = tile_table(c.cu, 128, n);
    unsigned bf = (unsigned)(tf.size() - 1) / 3;
    const std::string h = std::to_string(hd);
    auto forward = [&](std::vector<bf16_t>& o, std::vector<float>& l, int ctas) {
        launch("flash_forward_" + h, bf, nh, cfg.fnw * 32, cfg.fsmem, [&] {
            if (hd == 64) flash_forward_64(o.data(), l.data(), qkv.data(), tf.data(), n, nh, nkv);
            else flash_forward_128(o.data(), l.data(), qkv.data(), tf.data(), n, nh, nkv);
        }, ctas);
    };
    forward(out, lse, 1);
    // Bit-identical with 3 blocks at once, into buffers of other garbage.
    bool identical = true;
    {
        std::vector<bf16_t> out2(out.size(), __float2bfloat16_rn(-3.0f));
        std::vector<float> lse2(lse.size(), -3.0f);
        forward(out2, lse2, 3);
        identical = memcmp(out.data(), out2.data(), out.size() * sizeof(bf16_t)) == 0 &&
                    memcmp(lse.data(), lse2.data(), lse.size() * sizeof(float)) == 0;
        record("flash_forward_" + h, identical ? 0 : 1, 0);
        if (!identical) printf("  the forward differs with 3 blocks at once\n");
    }
    // The wgmma forward (HD 64): the same operations per row in the same order, so under
    // emulation the bits of flash_forward_64, one and 3 blocks at once.
    if (hd == 64) {
        for (int ctas : {1, 3}) {
            std::vector<bf16_t> out3(out.size(), __float2bfloat16_rn(-5.0f));
            std::vector<float> lse3(lse.size(), -5.0f);
            launch("flash_forward_64_sm90", bf, nh, 256, cfg.wg_fsmem, [&] {
                flash_forward_64_sm90(out3.data(), lse3.data(), qkv.data(), tf.data(), n, nh, nkv);
            }, ctas);
            const bool same = memcmp(out.data(), out3.data(), out.size() * sizeof(bf16_t)) == 0 &&
                              memcmp(lse.data(), lse3.data(), lse.size() * sizeof(float)) == 0;
            record("flash_forward_64_sm90", same ? 0 : 1, 0);
            if (!same) printf("  flash_forward_64_sm90 (%d blocks at once) differs from flash_forward_64\n", ctas);
            identical = identical && same;
        }
    }
    // D = rowsum(dO ∘ O) in fp32 from the bf16 out (attention_backward_d).
    for (int h = 0; h < nh; h++)
        for (int i = 0; i < n; i++) {
            float acc = 0;
            for (int t = 0; t < hd; t++) acc += __bfloat162float(dout[i * nh * hd + h * hd + t]) * __bfloat162float(out[i * nh * hd + h * hd + t]);
            D[h * n + i] = acc;
        }
    auto tk = tf;
    // The dQ accumulator starts as NaN, so that a partial added to a slot nobody stored shows;
    // the semaphores start at zero and must be zero again afterwards.
    std::vector<float> dq_acc((size_t)n * nh * hd, NAN);
    std::vector<uint32_t> dq_sem((size_t)nh * n, 0);
    auto backward = [&](const std::string& kernel, std::vector<bf16_t>& g, int ctas) {
        const bool q64 = kernel.find("deferred_q64") != std::string::npos;
        const bool deferred = !q64 && kernel.find("deferred") != std::string::npos;
        const bool sm90 = kernel.find("_sm90") != std::string::npos;
        const int warps = deferred && !sm90 ? cfg.anw : cfg.knw;
        const size_t smem = sm90 ? (q64 ? cfg.wg_dq64smem : cfg.wg_ksmem)
                            : q64 ? cfg.dq64smem : deferred ? cfg.dsmem : cfg.ksmem;
        launch(kernel, (unsigned)(tk.size() - 1) / 3, nkv, warps * 32, smem, [&] {
            if (sm90 && q64) flash_backward_deferred_q64_64_sm90(g.data(), dq_acc.data(), dq_sem.data(), dout.data(), qkv.data(), lse.data(), D.data(), tk.data(), n, nh, nkv, rope_tab.data(), c.rope);
            else if (sm90) flash_backward_64_sm90(g.data(), dq_acc.data(), dq_sem.data(), dout.data(), qkv.data(), lse.data(), D.data(), tk.data(), n, nh, nkv, rope_tab.data(), c.rope);
            else if (q64) flash_backward_deferred_q64_64(g.data(), dq_acc.data(), dq_sem.data(), dout.data(), qkv.data(), lse.data(), D.data(), tk.data(), n, nh, nkv, rope_tab.data(), c.rope);
            else if (deferred && hd == 64) flash_backward_deferred_64(g.data(), dq_acc.data(), dq_sem.data(), dout.data(), qkv.data(), lse.data(), D.data(), tk.data(), n, nh, nkv, rope_tab.data(), c.rope);
            else if (deferred) flash_backward_deferred_128(g.data(), dq_acc.data(), dq_sem.data(), dout.data(), qkv.data(), lse.data(), D.data(), tk.data(), n, nh, nkv, rope_tab.data(), c.rope);
            else if (hd == 64) flash_backward_64(g.data(), dq_acc.data(), dq_sem.data(), dout.data(), qkv.data(), lse.data(), D.data(), tk.data(), n, nh, nkv, rope_tab.data(), c.rope);
            else flash_backward_128(g.data(), dq_acc.data(), dq_sem.data(), dout.data(), qkv.data(), lse.data(), D.data(), tk.data(), n, nh, nkv, rope_tab.data(), c.rope);
        }, ctas);
        long dirty = std::count_if(dq_sem.begin(), dq_sem.end(), [](uint32_t v) { return v != 0; });
        record(kernel, dirty, 0);
        if (dirty) printf("  %ld dQ semaphores left non-zero\n", dirty);
    };
    backward("flash_backward_" + h, dqkv, 1);
    // Bit-identical twice: again, with 3 blocks at a time (the semaphore waits really wait),
    // into a buffer of different garbage.
    std::vector<bf16_t> again(n * width, __float2bfloat16_rn(-1.0f));
    backward("flash_backward_" + h, again, 3);
    const bool backward_same = memcmp(dqkv.data(), again.data(), dqkv.size() * sizeof(bf16_t)) == 0;
    record("flash_backward_" + h, backward_same ? 0 : 1, 0);
    if (!backward_same) printf("  the backward differs with 3 blocks at once\n");
    identical = identical && backward_same;
    // The deferred backwards add the same partials in the same order: the ordered bits, one and
    // 3 blocks at a time.
    // So does the wgmma backward (HD 64): the same operations per element in the same order.
    std::vector<std::string> deferred_kernels = {"flash_backward_deferred_" + h};
    if (hd == 64) deferred_kernels.push_back("flash_backward_deferred_q64_64");
    if (hd == 64) deferred_kernels.push_back("flash_backward_64_sm90");
    if (hd == 64) deferred_kernels.push_back("flash_backward_deferred_q64_64_sm90");
    for (const std::string& kernel : deferred_kernels)
        for (int ctas : {1, 3}) {
            std::vector<bf16_t> deferred(n * width, __float2bfloat16_rn(-2.0f));
            backward(kernel, deferred, ctas);
            const bool same = memcmp(dqkv.data(), deferred.data(), dqkv.size() * sizeof(bf16_t)) == 0;
            record(kernel, same ? 0 : 1, 0);
            if (!same) printf("  %s (%d blocks at once) differs from the ordered one\n", kernel.c_str(), ctas);
            identical = identical && same;
        }

    auto to_d = [](const std::vector<bf16_t>& v) {
        std::vector<double> r(v.size());
        for (size_t i = 0; i < v.size(); i++) r[i] = __bfloat162float(v[i]);
        return r;
    };
    auto part = [&](const std::vector<double>& v, int lo, int hi) {
        std::vector<double> r;
        for (int i = 0; i < n; i++)
            for (int t = lo; t < hi; t++) r.push_back(v[i * width + t]);
        return r;
    };
    std::vector<double> g_dqkv = to_d(dqkv), g_lse(lse.begin(), lse.end());
    double errs[5] = {rel_err(to_d(out), r_out), rel_err(g_lse, r_lse), rel_err(part(g_dqkv, 0, nh * hd), part(r_dqkv, 0, nh * hd)),
                      rel_err(part(g_dqkv, nh * hd, (nh + nkv) * hd), part(r_dqkv, nh * hd, (nh + nkv) * hd)),
                      rel_err(part(g_dqkv, (nh + nkv) * hd, width), part(r_dqkv, (nh + nkv) * hd, width))};
    const char* names[5] = {"out", "lse", "dq", "dk", "dv"};
    std::string segs;
    for (size_t s = 0; s + 1 < c.cu.size(); s++) segs += std::to_string(c.cu[s + 1] - c.cu[s]) + (s + 2 < c.cu.size() ? "," : "");
    bool ok = true;
    const char* rope_name = c.rope == ROPE_ADJACENT ? "adjacent" : c.rope == ROPE_HALF ? "half" : "none";
    printf("hd %3d heads %d/%d rope %s lengths [%s]:", hd, nh, nkv, rope_name, segs.c_str());
    for (int k = 0; k < 5; k++) {
        printf(" %s %.2e", names[k], errs[k]);
        ok = ok && errs[k] < 1e-2;
    }
    printf(" twice %s", identical ? "identical" : "DIFFERENT");
    ok = ok && identical;

    // The atomic dQ path (flash_backward_atomic_HD, then flash_dq_convert): the accumulator
    // starts at zero (as allocated) and must be zero again after each convert. Run twice, the
    // second time 3 blocks at once (the adds interleave), each against the same reference; dk
    // and dv come from the same code as the ordered path and must equal its bits.
    std::vector<float> atomic_acc((size_t)n * nh * hd, 0.0f);
    const size_t steps = (size_t)n * nh * hd / 16;
    // Two blocks of 256 at most: the grid-stride loop then takes several steps per thread.
    const unsigned convert_grid = (unsigned)std::min<size_t>(2, (steps + 255) / 256);
    double atomic_dq_err = 0;
    long acc_left = 0, kv_differ = 0;
    // The HD 64 atomic kernel runs warps of 32 keys over q tiles of 32, the ordered one warps of
    // 16 over q tiles of 64: dK and dV still sum the same products in the same 16-row steps.
    // The HD 64 wgmma one runs the ordered wgmma kernel's tiles.
    std::vector<std::string> atomic_kernels = {"flash_backward_atomic_" + h};
    if (hd == 64) atomic_kernels.push_back("flash_backward_atomic_64_sm90");
    for (const std::string& atomic_kernel : atomic_kernels) {
        const bool sm90 = atomic_kernel.find("_sm90") != std::string::npos;
        double atomic_err = 0;  // max(dq error, rows of dk/dv that differ)
        for (int ctas : {1, 3}) {
            std::vector<bf16_t> g(n * width, __float2bfloat16_rn(NAN));
            launch(atomic_kernel, (unsigned)(tk.size() - 1) / 3, nkv, (sm90 ? cfg.knw : cfg.anw) * 32,
                   sm90 ? cfg.wg_ksmem : cfg.asmem, [&] {
                if (sm90) flash_backward_atomic_64_sm90(g.data(), atomic_acc.data(), dout.data(), qkv.data(), lse.data(), D.data(), tk.data(), n, nh, nkv, rope_tab.data(), c.rope);
                else if (hd == 64) flash_backward_atomic_64(g.data(), atomic_acc.data(), dout.data(), qkv.data(), lse.data(), D.data(), tk.data(), n, nh, nkv, rope_tab.data(), c.rope);
                else flash_backward_atomic_128(g.data(), atomic_acc.data(), dout.data(), qkv.data(), lse.data(), D.data(), tk.data(), n, nh, nkv, rope_tab.data(), c.rope);
            }, ctas);
            launch("flash_dq_convert", convert_grid, 1, 256, 0,
                   [&] { flash_dq_convert(g.data(), atomic_acc.data(), n, nh, nkv, hd, rope_tab.data(), c.rope); });
            long left = std::count_if(atomic_acc.begin(), atomic_acc.end(), [](float v) {
                uint32_t bits;
                memcpy(&bits, &v, 4);
                return bits != 0;
            });
            acc_left += left;
            std::vector<double> a = to_d(g);
            const double err = rel_err(part(a, 0, nh * hd), part(r_dqkv, 0, nh * hd));
            atomic_dq_err = std::max(atomic_dq_err, err);
            long differ = 0;
            for (int i = 0; i < n; i++)
                differ += memcmp(&g[(size_t)i * width + nh * hd], &dqkv[(size_t)i * width + nh * hd],
                                 (size_t)2 * nkv * hd * sizeof(bf16_t)) != 0;
            kv_differ += differ;
            atomic_err = std::max({atomic_err, err, (double)differ});
        }
        record(atomic_kernel, atomic_err, 1e-2);
    }
    printf(" atomic dq %.2e", atomic_dq_err);
    if (kv_differ) printf(" (%ld rows of dk/dv differ from the ordered path)", kv_differ);
    if (acc_left) printf(" (%ld accumulator elements left non-zero)", acc_left);
    const bool atomic_ok = atomic_dq_err < 1e-2 && kv_differ == 0 && acc_left == 0;
    ok = ok && atomic_ok;
    record("flash_dq_convert", atomic_dq_err, 1e-2);
    record("flash_dq_convert", (double)acc_left, 0);
    printf("  %s\n", ok ? "ok" : "FAILED");
    record("flash_forward_" + h, std::max(errs[0], errs[1]), 1e-2);
    record("flash_backward_" + h, std::max({errs[2], errs[3], errs[4]}), 1e-2);
    return ok;
}

// main [quick | CASE] [--report FILE]
int main(int argc, char** argv) {
    std::string report;
    if (argc > 2 && std::string(argv[argc - 2]) == "--report") report = argv[argc - 1], argc -= 2;
    // Both head_dims meet both RoPE pairings; HD 64 also none.
    std::vector<Case> cases = {
        {64, 2, 1, {0, 1, 18, 82, 210, 339}, ROPE_ADJACENT},
        {64, 2, 2, {0, 300}, ROPE_NONE},
        {128, 2, 1, {0, 17, 100, 229}, ROPE_ADJACENT},
        {128, 1, 1, {0, 1, 40}, ROPE_HALF},
        {64, 4, 1, {0, 40, 170}, ROPE_HALF},
        // Three key tiles per long segment: dQ sums up to 3 key tiles' partials; 4 q heads on 2 kv heads.
        {64, 4, 2, {0, 3, 290}, ROPE_ADJACENT},
    };
    if (argc > 1 && std::string(argv[1]) == "quick") {
        cases.resize(1);
    } else if (argc > 1) {
        size_t k = std::stoul(argv[1]);  // one case by index
        cases = {cases.at(k)};
    }
    bool ok = true;
    uint64_t seed = 1;
    for (const Case& c : cases) ok = run(c, seed++) && ok;
    long phases = emu_stats.ldsm_phases, conflicted = emu_stats.ldsm_conflicted;
    printf("shared memory: %ld races; ldmatrix %ld phases, %ld with bank conflicts (%ld extra wavefronts)\n",
           (long)emu_stats.races, phases, conflicted, (long)emu_stats.ldsm_extra_wavefronts);
    ok = ok && emu_stats.races == 0;
    for (auto& [name, l] : lines) ok = ok && l.failures == 0;
    if (!report.empty()) {
        FILE* f = fopen(report.c_str(), "w");
        if (!f) {
            perror(report.c_str());
            return 1;
        }
        for (auto& [name, l] : lines)
            fprintf(f, "KERNEL %s %d %.6e %.0e %ld %ld %ld %d\n", name.c_str(), l.cases, l.max_err, l.tol, l.races,
                    l.phases, l.conflicted, l.failures);
        fclose(f);
    }
    printf("%s\n", ok ? "all cases ok" : "SOME CASES FAILED");
    return ok ? 0 : 1;
}
