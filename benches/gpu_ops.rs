//! The CUDA backend's ops at the 1.3B model's shapes (d 2048, 32 heads of 64, SwiGLU 5632,
//! vocab 8192) on a 16k-token micro-batch (8 rows × 2048). Criterion prints "elem/s":
//! - `matmul_*`, `attention_*`, `lm_head_ce`: read it as FLOP/s (attention: the flash-attention
//!   convention of `sft::bench::attention::attention_flops`, causal);
//! - `rmsnorm_*`, `rope_*`, `swiglu_*`, `embedding_*`, `adamw`: read "B/s" as the bytes each op
//!   must move at least (its inputs read once, its outputs written once).
//!
//! Without a GPU it prints why and measures nothing. Each timed call ends with a synchronize,
//! so that the time is the kernels', not the launch queue's.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sft::backend::cuda::{CudaBackend, FlashDq, FlashMma};
use sft::backend::{
    group_tokens_by_id, supervised_rows, AdamW, Backend, BranchGrad, Dropout, GradMode, HeadShape, LossGrads,
    Precision, Rope, RopeStyle, StateDtype,
};
use sft::bench::attention::AttentionCase;
use sft::bench::{upload, upload_ids};
use sft::rng::Rng;

/// The attention benches of one instruction set: its id tag, and its dQ accumulations with
/// theirs.
type AttentionSet = (FlashMma, &'static str, &'static [(FlashDq, &'static str)]);

fn random(rng: &mut Rng, len: usize, scale: f64) -> Vec<f32> {
    (0..len).map(|_| (rng.normal() * scale) as f32).collect()
}

fn bench(c: &mut Criterion) {
    let g = match CudaBackend::new(0) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("gpu_ops bench skipped: {e:#}");
            return;
        }
    };
    let mut rng = Rng::new(7);
    let (rows, t) = (8usize, 2048usize);
    let n = rows * t;
    let (d, hidden, vocab) = (2048usize, 5632usize, 8192usize);
    let heads = HeadShape { n_heads: 32, n_kv_heads: 32, head_dim: 64 };
    let cmp = Precision::Compute;
    let up = |data: &[f32], p: Precision| upload(&g, data, p).unwrap();
    let ids = |data: &[u32]| upload_ids(&g, data).unwrap();
    let sync = || g.synchronize().unwrap();

    let mut grp = c.benchmark_group("gpu_ops");
    grp.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));

    // ---- GEMMs: the qkv projection and the FFN's up projection -----------------------------
    for (name, i, o) in [("qkv", d, heads.qkv_width()), ("gate_up", d, 2 * hidden), ("down", hidden, d)] {
        let inp = up(&random(&mut rng, n * i, 1.0), cmp);
        let w = up(&random(&mut rng, o * i, 0.02), cmp);
        let dout = up(&random(&mut rng, n * o, 1.0), cmp);
        let mut out = g.zeros(n * o, cmp).unwrap();
        let mut dinp = g.zeros(n * i, cmp).unwrap();
        let mut dw = g.zeros(o * i, Precision::F32).unwrap();
        grp.throughput(Throughput::Elements((2 * n * i * o) as u64));
        grp.bench_function(format!("matmul_forward_{name}_{n}x{i}x{o}"), |b| {
            b.iter(|| {
                g.matmul_forward(&mut out, &inp, &w, n, i, o).unwrap();
                sync()
            })
        });
        grp.throughput(Throughput::Elements((4 * n * i * o) as u64));
        grp.bench_function(format!("matmul_backward_{name}_{n}x{i}x{o}"), |b| {
            b.iter(|| {
                g.matmul_backward(Some(&mut dinp), &mut dw, &dout, &inp, &w, n, i, o, GradMode::Accumulate)
                    .unwrap();
                sync()
            })
        });
    }

    // ---- attention: causal, 8 rows of 2048 (the setup `sft bench-attention` times) --------
    let mut att = AttentionCase::new(&g, heads, rows, t, &mut rng).unwrap();
    let (fwd, bwd) = att.flops();
    // Per instruction set (mma.sync everywhere; wgmma, SFT_FLASH_MMA=wgmma, on compute capability
    // 9.0 only) the forward, then the backward under each dQ accumulation it has: ordered (the
    // default); the opt-in deferred kernels (SFT_FLASH_DQ=deferred, deferred-q64: the default's
    // bits); atomic adds (SFT_FLASH_DQ=atomic: the backward and flash_dq_convert).
    let sets: [AttentionSet; 2] = [
        (
            FlashMma::Mma,
            "",
            &[
                (FlashDq::Ordered, ""),
                (FlashDq::Deferred, "_deferred_dq"),
                (FlashDq::DeferredQ64, "_deferred_q64_dq"),
                (FlashDq::Atomic, "_atomic_dq"),
            ],
        ),
        (FlashMma::Wgmma, "_wgmma", &[(FlashDq::Ordered, ""), (FlashDq::DeferredQ64, "_deferred_q64_dq")]),
    ];
    for (kind, tag, modes) in sets {
        if g.set_flash_mma(kind).is_err() {
            continue;
        }
        grp.throughput(Throughput::Elements(fwd as u64));
        grp.bench_function(format!("attention_forward{tag}_8x2048_32h_hd64"), |b| {
            b.iter(|| {
                att.forward(&g).unwrap();
                sync()
            })
        });
        grp.throughput(Throughput::Elements(bwd as u64));
        for &(mode, dq_tag) in modes {
            g.set_flash_dq(mode);
            grp.bench_function(format!("attention_backward{tag}{dq_tag}_8x2048_32h_hd64"), |b| {
                b.iter(|| {
                    att.backward(&g).unwrap();
                    sync()
                })
            });
        }
    }
    g.set_flash_dq(FlashDq::Ordered);
    g.set_flash_mma(FlashMma::Mma).unwrap();
    drop(att);

    // ---- RMSNorm, RoPE, SwiGLU, embedding (bandwidth) -------------------------------------
    let x = up(&random(&mut rng, n * d, 1.0), cmp);
    let w = up(&random(&mut rng, d, 1.0), cmp);
    let dy = up(&random(&mut rng, n * d, 1.0), cmp);
    let mut y = g.zeros(n * d, cmp).unwrap();
    let mut rstd = g.zeros(n, Precision::F32).unwrap();
    let mut dx = g.zeros(n * d, cmp).unwrap();
    let mut dw = g.zeros(d, Precision::F32).unwrap();
    grp.throughput(Throughput::Bytes((2 * 2 * n * d) as u64));
    grp.bench_function("rmsnorm_forward_16k_x2048", |b| {
        b.iter(|| {
            g.rmsnorm_forward(&mut y, &mut rstd, &x, &w, n, d, 1e-5).unwrap();
            sync()
        })
    });
    // The residual add with the branch's dropout drawn in the kernel: reads x_in and delta,
    // writes x_out and the norm.
    let mut x_out = g.zeros(n * d, cmp).unwrap();
    let mask = Dropout { p: 0.1, seed: 7 };
    grp.throughput(Throughput::Bytes((4 * 2 * n * d) as u64));
    grp.bench_function("residual_rmsnorm_forward_dropout_16k_x2048", |b| {
        b.iter(|| {
            g.residual_rmsnorm_forward(&mut x_out, &mut y, &mut rstd, &x, &dy, &w, n, d, 1e-5, Some(mask))
                .unwrap();
            sync()
        })
    });
    // Reads dout, x and dx, writes dx (then the dw partials' sum).
    grp.throughput(Throughput::Bytes((4 * 2 * n * d) as u64));
    grp.bench_function("rmsnorm_backward_16k_x2048", |b| {
        b.iter(|| {
            g.rmsnorm_backward(&mut dx, &mut dw, &dy, &x, &w, &rstd, n, d, None).unwrap();
            sync()
        })
    });
    // The same, also writing the masked branch gradient.
    let mut branch = g.zeros(n * d, cmp).unwrap();
    grp.throughput(Throughput::Bytes((5 * 2 * n * d) as u64));
    grp.bench_function("rmsnorm_backward_dropout_branch_16k_x2048", |b| {
        b.iter(|| {
            let out = Some(BranchGrad { out: &mut branch, dropout: mask });
            g.rmsnorm_backward(&mut dx, &mut dw, &dy, &x, &w, &rstd, n, d, out).unwrap();
            sync()
        })
    });
    let positions = ids(&(0..n).map(|i| (i % t) as u32).collect::<Vec<_>>());
    let mut table = g.zeros(n * heads.head_dim, Precision::F32).unwrap();
    let rope = Rope::plain(10000.0, RopeStyle::AdjacentPairs);
    grp.throughput(Throughput::Bytes((n * (4 + heads.head_dim * 4)) as u64));
    grp.bench_function("rope_table_16k_hd64", |b| {
        b.iter(|| {
            g.rope_table(&mut table, &positions, n, heads.head_dim, rope).unwrap();
            sync()
        })
    });
    let mut qkv_rot = up(&random(&mut rng, n * heads.qkv_width(), 1.0), cmp);
    grp.throughput(Throughput::Bytes((2 * 2 * n * (heads.q_width() + heads.kv_width())) as u64));
    grp.bench_function("rope_forward_16k_32h_hd64", |b| {
        b.iter(|| {
            g.rope_forward(&mut qkv_rot, &table, n, heads, RopeStyle::AdjacentPairs).unwrap();
            sync()
        })
    });
    let gate_up = up(&random(&mut rng, n * 2 * hidden, 1.0), cmp);
    let dswi = up(&random(&mut rng, n * hidden, 1.0), cmp);
    let mut swi = g.zeros(n * hidden, cmp).unwrap();
    let mut dgu = g.zeros(n * 2 * hidden, cmp).unwrap();
    grp.throughput(Throughput::Bytes((2 * 3 * n * hidden) as u64));
    grp.bench_function("swiglu_forward_16k_x5632", |b| {
        b.iter(|| {
            g.swiglu_forward(&mut swi, &gate_up, n, hidden).unwrap();
            sync()
        })
    });
    grp.throughput(Throughput::Bytes((2 * 5 * n * hidden) as u64));
    grp.bench_function("swiglu_backward_16k_x5632", |b| {
        b.iter(|| {
            g.swiglu_backward(&mut dgu, &dswi, &gate_up, n, hidden).unwrap();
            sync()
        })
    });
    let token_ids: Vec<u32> = (0..n).map(|_| rng.below(vocab) as u32).collect();
    let tokens = ids(&token_ids);
    let (groups, n_groups) = group_tokens_by_id(&token_ids);
    let groups = ids(&groups);
    let table = up(&random(&mut rng, vocab * d, 0.02), cmp);
    let mut dtable = g.zeros(vocab * d, Precision::F32).unwrap();
    grp.throughput(Throughput::Bytes((2 * 2 * n * d) as u64));
    grp.bench_function("embedding_forward_16k_x2048", |b| {
        b.iter(|| {
            g.embedding_forward(&mut y, &tokens, &table, n, d).unwrap();
            sync()
        })
    });
    grp.throughput(Throughput::Bytes((2 * n * d + 4 * 2 * n * d) as u64));
    grp.bench_function("embedding_backward_16k_x2048", |b| {
        b.iter(|| {
            g.embedding_backward(&mut dtable, &groups, n_groups, &dy, n, d, GradMode::Accumulate).unwrap();
            sync()
        })
    });

    // ---- lm_head + masked cross-entropy: 3/4 of the rows supervised ------------------------
    let xf = up(&random(&mut rng, n * d, 1.0), cmp);
    let head = up(&random(&mut rng, vocab * d, 0.02), cmp);
    let all_targets: Vec<u32> =
        (0..n).map(|i| if i % 4 == 0 { 0 } else { 1 + rng.below(vocab - 1) as u32 }).collect();
    let (rows, sup) = supervised_rows(&all_targets, 0, vocab).unwrap();
    let (rows, targets, n_sup) = (ids(&rows), ids(&sup), sup.len());
    let mut losses = g.zeros(n_sup, Precision::F32).unwrap();
    let mut dxf = g.zeros(n * d, cmp).unwrap();
    let mut dhead = g.zeros(vocab * d, Precision::F32).unwrap();
    let supervised = n * 3 / 4;
    grp.throughput(Throughput::Elements((6 * supervised * d * vocab) as u64));
    grp.bench_function("lm_head_ce_16k_d2048_v8192", |b| {
        b.iter(|| {
            let grads = LossGrads {
                dx: &mut dxf,
                dw: &mut dhead,
                loss_scale: 1.0 / supervised as f32,
                mode: GradMode::Accumulate,
            };
            g.lm_head_cross_entropy(
                &xf,
                &head,
                &rows,
                &targets,
                n_sup,
                n,
                d,
                vocab,
                &mut losses,
                Some(grads),
            )
            .unwrap();
            sync()
        })
    });

    // ---- AdamW over the 1.3B's parameter count, in 24 × 7 + 3 tensors -----------------------
    let mut lens = vec![d; 1];
    for _ in 0..24 {
        lens.extend([d, 3 * d * d, d * d, d, 2 * hidden * d, d * hidden]);
    }
    lens.extend([vocab * d, vocab * d]);
    let total: usize = lens.iter().sum();
    let mk = |p: Precision| lens.iter().map(|&l| g.zeros(l, p).unwrap()).collect::<Vec<_>>();
    let (mut params, mut master, grads, mut m, mut v) =
        (mk(cmp), mk(Precision::F32), mk(Precision::F32), mk(Precision::F32), mk(Precision::F32));
    let hp =
        AdamW { lr: 1e-5, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.01, step: 1, grad_scale: 1.0 };
    // Reads master, grad, m, v (f32); writes master, m, v (f32) and the bf16 weights.
    grp.throughput(Throughput::Bytes((total * (4 * 4 + 3 * 4 + 2)) as u64));
    grp.bench_function(format!("adamw_{total}_params"), |b| {
        b.iter(|| {
            let mut p: Vec<&mut _> = params.iter_mut().collect();
            let mut ms: Vec<&mut _> = master.iter_mut().collect();
            let gs: Vec<&_> = grads.iter().collect();
            let mut mm: Vec<&mut _> = m.iter_mut().collect();
            let mut vv: Vec<&mut _> = v.iter_mut().collect();
            g.adamw(&mut p, &mut ms, &gs, &mut mm, &mut vv, StateDtype::F32, &lens, &hp, None).unwrap();
            sync()
        })
    });
    grp.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
