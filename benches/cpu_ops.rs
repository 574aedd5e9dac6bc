//! The CPU backend's heavy ops on small shapes, in f32 (the training type):
//! - `matmul_*`: throughput in FLOP (criterion prints "elem/s"; read it as FLOP/s);
//! - `attention_fwd_bwd`: throughput in tokens;
//! - `lm_head_ce`: lm_head projection + cross-entropy + both gradients, throughput in tokens.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sft::backend::cpu::{
    attention_backward, attention_forward, lm_head_cross_entropy, matmul_backward, matmul_forward, CeGrads,
};
use sft::backend::{GradMode, HeadShape};
use sft::rng::Rng;

fn random(rng: &mut Rng, len: usize, scale: f64) -> Vec<f32> {
    (0..len).map(|_| (rng.normal() * scale) as f32).collect()
}

fn bench(c: &mut Criterion) {
    let mut rng = Rng::new(7);
    let mut g = c.benchmark_group("cpu_ops");
    g.sample_size(10).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));

    // A 256-token micro-batch through a 512 → 1536 projection (a small model's fused qkv).
    let (n, i, o) = (256, 512, 1536);
    let (inp, w, dout) =
        (random(&mut rng, n * i, 1.0), random(&mut rng, o * i, 0.05), random(&mut rng, n * o, 1.0));
    let (mut out, mut dinp, mut dw) = (vec![0.0f32; n * o], vec![0.0f32; n * i], vec![0.0f32; o * i]);
    g.throughput(Throughput::Elements((2 * n * i * o) as u64));
    g.bench_function("matmul_forward_256x512x1536", |b| {
        b.iter(|| matmul_forward(black_box(&mut out), &inp, &w, n, i, o))
    });
    g.throughput(Throughput::Elements((4 * n * i * o) as u64));
    g.bench_function("matmul_backward_256x512x1536", |b| {
        b.iter(|| {
            matmul_backward(
                Some(black_box(&mut dinp)),
                &mut dw,
                &dout,
                &inp,
                &w,
                n,
                i,
                o,
                GradMode::Accumulate,
            )
        })
    });

    // 512 tokens in two 256-token segments, 8 q heads over 4 kv heads of 64 dims.
    let heads = HeadShape { n_heads: 8, n_kv_heads: 4, head_dim: 64 };
    let n = 512;
    let cu: Vec<u32> = vec![0, 256, 512];
    let qkv = random(&mut rng, n * heads.qkv_width(), 1.0);
    let dout = random(&mut rng, n * heads.q_width(), 1.0);
    let (mut out, mut lse, mut dqkv) = (
        vec![0.0f32; n * heads.q_width()],
        vec![0.0f32; n * heads.n_heads],
        vec![0.0f32; n * heads.qkv_width()],
    );
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("attention_fwd_bwd_512tok_8h_gqa4_hd64", |b| {
        b.iter(|| {
            attention_forward(&mut out, &mut lse, &qkv, &cu, 2, n, heads);
            attention_backward(black_box(&mut dqkv), &dout, &qkv, &out, &lse, &cu, 2, n, heads);
        })
    });

    // 256 tokens, 3/4 supervised, width 256, vocabulary 8192 (SimpleLLaMA's tokenizer size).
    let (n, d, vocab) = (256, 256, 8192);
    let x = random(&mut rng, n * d, 1.0);
    let w = random(&mut rng, vocab * d, 0.05);
    let targets: Vec<u32> = (0..n).map(|t| if t % 4 == 0 { 0 } else { rng.below(vocab) as u32 }).collect();
    let (mut dx, mut dw) = (vec![0.0f32; n * d], vec![0.0f32; vocab * d]);
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("lm_head_ce_256tok_d256_v8192", |b| {
        b.iter(|| {
            let grads = CeGrads { dx: &mut dx, dw: &mut dw, loss_scale: 1.0 / 192.0 };
            black_box(lm_head_cross_entropy(&x, &w, &targets, 0, n, d, vocab, Some(grads)))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
