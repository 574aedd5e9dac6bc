//! Causal attention on the GPU at B·T = 16k tokens, T ∈ {512, 1024, 2048, 4096}, 32 heads of
//! 64: forward and backward, separately, on the path the backend picks (tensor cores on sm_80+).
//! Criterion's "elem/s" reads as FLOP/s with the flash-attention convention
//! (`sft::bench_attention::attention_flops`: forward 4·B·H·T²·hd/2, backward 2.5× that).
//! `SFT_ATTENTION=scalar cargo bench --bench attention` times the scalar kernels instead.
//!
//! Without a GPU it prints "skipped" and measures nothing. Each timed call ends with a
//! synchronize, so that the time is the kernels', not the launch queue's.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sft::backend::cuda::CudaBackend;
use sft::backend::{Backend, HeadShape, Precision};
use sft::bench_attention::attention_flops;
use sft::rng::Rng;

fn bench(c: &mut Criterion) {
    let g = match CudaBackend::new(0) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("attention bench skipped: {e:#}");
            return;
        }
    };
    let heads = HeadShape { n_heads: 32, n_kv_heads: 32, head_dim: 64 };
    let path = if g.uses_tensor_core_attention(heads.head_dim) { "flash" } else { "scalar" };
    let tokens = 16384usize;
    let mut rng = Rng::new(3);
    let mut grp = c.benchmark_group("attention");
    grp.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    for t in [512usize, 1024, 2048, 4096] {
        let batch = tokens / t;
        let n = batch * t;
        let mut up = |len: usize| {
            let data: Vec<f32> = (0..len).map(|_| rng.normal() as f32).collect();
            let mut b = g.zeros(len, Precision::Compute).unwrap();
            g.write(&mut b, &data).unwrap();
            b
        };
        let qkv = up(n * heads.qkv_width());
        let dout = up(n * heads.q_width());
        let cu: Vec<u32> = (0..=batch).map(|r| (r * t) as u32).collect();
        let mut cu_b = g.zeros_ids(cu.len()).unwrap();
        g.write_ids(&mut cu_b, &cu).unwrap();
        let mut out = g.zeros(n * heads.q_width(), Precision::Compute).unwrap();
        let mut lse = g.zeros(heads.n_heads * n, Precision::F32).unwrap();
        let mut dqkv = g.zeros(n * heads.qkv_width(), Precision::Compute).unwrap();
        let (fwd, bwd) = attention_flops(batch, t, heads.n_heads, heads.head_dim);
        grp.throughput(Throughput::Elements(fwd as u64));
        grp.bench_function(format!("{path}_forward_{batch}x{t}_32h_hd64"), |b| {
            b.iter(|| {
                g.attention_forward(&mut out, &mut lse, &qkv, &cu_b, batch, n, heads).unwrap();
                g.synchronize().unwrap()
            })
        });
        g.attention_forward(&mut out, &mut lse, &qkv, &cu_b, batch, n, heads).unwrap();
        grp.throughput(Throughput::Elements(bwd as u64));
        grp.bench_function(format!("{path}_backward_{batch}x{t}_32h_hd64"), |b| {
            b.iter(|| {
                g.attention_backward(&mut dqkv, &dout, &qkv, &out, &lse, &cu_b, batch, n, heads).unwrap();
                g.synchronize().unwrap()
            })
        });
    }
    grp.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
