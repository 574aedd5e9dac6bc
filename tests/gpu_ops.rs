//! Every CUDA op against the CPU reference (`CpuBackend<f32>`), on fresh random inputs with
//! shapes that are not multiples of the kernels' tiles. `common::model::naive::NaiveBackend`, a
//! second, plain-loop reading of the trait, is checked against `CpuBackend` op by op on the
//! kernels' shapes here too (no GPU needed), so the two readings of the trait's semantics agree.
//!
//! All tests are `#[ignore]`: they need an NVIDIA GPU. Run them there with
//! `cargo test --release --test gpu_ops -- --ignored` (or `scripts/gpu_check.sh`); where the
//! backend cannot open (no driver, no cuBLASLt) each test prints why and returns.
//! Inputs are rounded to bf16 first, so both backends see the same numbers; outputs must agree
//! to a relative error ‖gpu − cpu‖ / ‖cpu‖ below 1e-2.

mod common;
use common::gpu::{gpu, randn, upload, upload_ids};
use common::model::naive::NaiveBackend;
use half::bf16;
use sft::backend::cpu::CpuBackend;
use sft::backend::cuda::CudaBackend;
use sft::backend::{
    cross_entropy_sum, group_tokens_by_id, stats, sum_squares_read, AdamW, Backend, BranchGrad, Clip,
    Dropout, GradMode, HeadShape, LossGrads, Precision, Rope, RopeScaling, RopeStyle, StateDtype, STATS_LEN,
};
use sft::rng::Rng;

const TOL: f64 = 1e-2;

fn reference() -> CpuBackend<f32> {
    CpuBackend::<f32>::new()
}

fn rand_ids(rng: &mut Rng, len: usize, below: usize) -> Vec<u32> {
    (0..len).map(|_| rng.below(below) as u32).collect()
}

fn download<B: Backend>(b: &B, buf: &B::Buf, len: usize) -> Vec<f32> {
    b.synchronize().unwrap();
    b.read(buf, len).unwrap()
}

fn assert_close(what: &str, gpu: &[f32], cpu: &[f32], tol: f64) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths differ");
    assert!(gpu.iter().all(|v| v.is_finite()), "{what}: GPU output has non-finite values");
    let diff: f64 = gpu.iter().zip(cpu).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum::<f64>().sqrt();
    let norm: f64 = cpu.iter().map(|&b| (b as f64).powi(2)).sum::<f64>().sqrt();
    assert!(norm > 0.0, "{what}: reference is all zeros, the test checks nothing");
    let rel = diff / norm;
    eprintln!("{what}: relative error {rel:.2e}");
    assert!(rel < tol, "{what}: relative error {rel:.3e} >= {tol:e}");
}

// ---- embedding ------------------------------------------------------------------------------

fn embedding<B: Backend>(
    b: &B,
    ids: &[u32],
    table: &[f32],
    dout: &[f32],
    dtable0: &[f32],
    d: usize,
) -> [Vec<f32>; 3] {
    let n = ids.len();
    let ids_b = upload_ids(b, ids);
    let table_b = upload(b, table, Precision::Compute);
    let mut out = b.zeros(n * d, Precision::Compute).unwrap();
    b.embedding_forward(&mut out, &ids_b, &table_b, n, d).unwrap();
    let dout_b = upload(b, dout, Precision::Compute);
    let mut dtable = upload(b, dtable0, Precision::F32);
    let (groups, n_groups) = group_tokens_by_id(ids);
    let groups_b = upload_ids(b, &groups);
    b.embedding_backward(&mut dtable, &groups_b, n_groups, &dout_b, n, d, GradMode::Accumulate).unwrap();
    let accumulated = download(b, &dtable, table.len());
    // Overwrite: what the table held is gone, absent ids' rows are zero.
    b.embedding_backward(&mut dtable, &groups_b, n_groups, &dout_b, n, d, GradMode::Overwrite).unwrap();
    [download(b, &out, n * d), accumulated, download(b, &dtable, table.len())]
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn embedding_matches_cpu() {
    let Some(g) = gpu() else { return };
    let (vocab, d, n) = (37, 45, 29);
    let mut rng = Rng::new(1);
    let ids = rand_ids(&mut rng, n, vocab); // repeats are likely: the backward must sum them
    let table = randn(&mut rng, vocab * d, 1.0);
    let dout = randn(&mut rng, n * d, 1.0);
    let dtable0 = randn(&mut rng, vocab * d, 0.1);
    let a = embedding(&g, &ids, &table, &dout, &dtable0, d);
    let r = embedding(&reference(), &ids, &table, &dout, &dtable0, d);
    assert_close("embedding_forward", &a[0], &r[0], TOL);
    assert_close("embedding_backward dtable", &a[1], &r[1], TOL);
    assert_close("embedding_backward dtable (overwrite)", &a[2], &r[2], TOL);
    for id in (0..vocab as u32).filter(|id| !ids.contains(id)) {
        let row = &a[2][id as usize * d..(id as usize + 1) * d];
        assert!(row.iter().all(|&v| v == 0.0), "row {id} of an absent id is not zero");
    }
    // The grouping came from the host: the backward read nothing back.
    let before = g.host_reads();
    let dout_b = upload(&g, &dout, Precision::Compute);
    let (groups, n_groups) = group_tokens_by_id(&ids);
    let groups_b = upload_ids(&g, &groups);
    let mut dtable = g.zeros(vocab * d, Precision::F32).unwrap();
    g.embedding_backward(&mut dtable, &groups_b, n_groups, &dout_b, n, d, GradMode::Overwrite).unwrap();
    assert_eq!(g.host_reads(), before);
}

// ---- RMSNorm --------------------------------------------------------------------------------

#[allow(clippy::too_many_arguments)]
fn rmsnorm<B: Backend>(
    b: &B,
    x: &[f32],
    delta: &[f32],
    w: &[f32],
    dout: &[f32],
    dx0: &[f32],
    dw0: &[f32],
    n: usize,
    d: usize,
    dropout: Option<Dropout>,
) -> Vec<Vec<f32>> {
    let eps = 1e-5;
    let xb = upload(b, x, Precision::Compute);
    let wb = upload(b, w, Precision::Compute);
    let mut out = b.zeros(n * d, Precision::Compute).unwrap();
    let mut rstd = b.zeros(n, Precision::F32).unwrap();
    b.rmsnorm_forward(&mut out, &mut rstd, &xb, &wb, n, d, eps).unwrap();
    let plain = [download(b, &out, n * d), download(b, &rstd, n)];

    let db = upload(b, delta, Precision::Compute);
    let mut x_out = b.zeros(n * d, Precision::Compute).unwrap();
    b.residual_rmsnorm_forward(&mut x_out, &mut out, &mut rstd, &xb, &db, &wb, n, d, eps, dropout).unwrap();
    let fused = [download(b, &x_out, n * d), download(b, &out, n * d), download(b, &rstd, n)];

    let doutb = upload(b, dout, Precision::Compute);
    let mut dx = upload(b, dx0, Precision::Compute);
    let mut dw = upload(b, dw0, Precision::F32);
    let mut branch = b.zeros(n * d, Precision::Compute).unwrap();
    let out = dropout.map(|dropout| BranchGrad { out: &mut branch, dropout });
    b.rmsnorm_backward(&mut dx, &mut dw, &doutb, &x_out, &wb, &rstd, n, d, out).unwrap();
    let back = [download(b, &dx, n * d), download(b, &dw, d), download(b, &branch, n * d)];
    plain.into_iter().chain(fused).chain(back).collect()
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn rmsnorm_matches_cpu() {
    let Some(g) = gpu() else { return };
    // d 333: the scalar path; 512 and 2048: 16-byte groups; 1100 rows: several rows per
    // backward chunk (512 chunks), the last one ragged. With and without the folded dropout.
    for (n, d) in [(13, 333), (13, 512), (1100, 2048)] {
        for dropout in [None, Some(Dropout { p: 0.1, seed: 99 })] {
            let mut rng = Rng::new(2);
            let x = randn(&mut rng, n * d, 1.0);
            let delta = randn(&mut rng, n * d, 0.5);
            let w: Vec<f32> =
                randn(&mut rng, d, 0.2).iter().map(|v| bf16::from_f32(1.0 + v).to_f32()).collect();
            let dout = randn(&mut rng, n * d, 1.0);
            let dx0 = randn(&mut rng, n * d, 0.5);
            let dw0 = randn(&mut rng, d, 0.5);
            let a = rmsnorm(&g, &x, &delta, &w, &dout, &dx0, &dw0, n, d, dropout);
            let r = rmsnorm(&reference(), &x, &delta, &w, &dout, &dx0, &dw0, n, d, dropout);
            let names = [
                "out",
                "rstd",
                "residual x_out",
                "residual out",
                "residual rstd",
                "backward dx",
                "backward dw",
                "backward branch",
            ];
            let last = if dropout.is_some() { names.len() } else { names.len() - 1 };
            for (i, name) in names[..last].iter().enumerate() {
                assert_close(&format!("rmsnorm n {n} d {d} {dropout:?} {name}"), &a[i], &r[i], TOL);
            }
        }
    }
}

// ---- matmul ---------------------------------------------------------------------------------

#[allow(clippy::too_many_arguments)]
fn matmul<B: Backend>(
    b: &B,
    inp: &[f32],
    w: &[f32],
    dout: &[f32],
    dw0: &[f32],
    resid: &[f32],
    n: usize,
    i: usize,
    o: usize,
) -> Vec<Vec<f32>> {
    let ib = upload(b, inp, Precision::Compute);
    let wb = upload(b, w, Precision::Compute);
    let mut out = b.zeros(n * o, Precision::Compute).unwrap();
    b.matmul_forward(&mut out, &ib, &wb, n, i, o).unwrap();
    // The residual form: C another buffer, which must come back as it went in.
    let rb = upload(b, resid, Precision::Compute);
    let mut plus = b.zeros(n * o, Precision::Compute).unwrap();
    b.matmul_forward_residual(&mut plus, &rb, &ib, &wb, n, i, o).unwrap();
    let db = upload(b, dout, Precision::Compute);
    let mut dinp = b.zeros(n * i, Precision::Compute).unwrap();
    let mut dw = upload(b, dw0, Precision::F32);
    b.matmul_backward(Some(&mut dinp), &mut dw, &db, &ib, &wb, n, i, o, GradMode::Accumulate).unwrap();
    let dw1 = download(b, &dw, o * i);
    // Without dinp, dw accumulates a second time.
    b.matmul_backward(None, &mut dw, &db, &ib, &wb, n, i, o, GradMode::Accumulate).unwrap();
    let dw2 = download(b, &dw, o * i);
    // Overwrite (beta 0): the gradient alone, whatever dw held.
    b.matmul_backward(None, &mut dw, &db, &ib, &wb, n, i, o, GradMode::Overwrite).unwrap();
    vec![
        download(b, &out, n * o),
        download(b, &dinp, n * i),
        dw1,
        dw2,
        download(b, &dw, o * i),
        download(b, &plus, n * o),
        download(b, &rb, n * o),
    ]
}

fn matmul_case(g: &CudaBackend, what: &str) {
    // Odd shapes (no 16-byte alignment of rows), then tile-friendly ones.
    for (seed, (n, i, o)) in [(17, 70, 45), (32, 128, 64)].into_iter().enumerate() {
        let mut rng = Rng::new(3 + seed as u64);
        let inp = randn(&mut rng, n * i, 1.0);
        let w = randn(&mut rng, o * i, 0.1);
        let dout = randn(&mut rng, n * o, 1.0);
        let dw0 = randn(&mut rng, o * i, 0.5);
        let resid = randn(&mut rng, n * o, 1.0);
        let a = matmul(g, &inp, &w, &dout, &dw0, &resid, n, i, o);
        let r = matmul(&reference(), &inp, &w, &dout, &dw0, &resid, n, i, o);
        let names =
            ["out", "dinp", "dw", "dw accumulated twice", "dw overwritten", "resid + out", "resid after"];
        for (k, name) in names.iter().enumerate() {
            assert_close(&format!("{what} {name} [{n}x{i}] -> {o}"), &a[k], &r[k], TOL);
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn matmul_matches_cpu() {
    let Some(g) = gpu() else { return };
    matmul_case(&g, "matmul (cuBLASLt)");
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn matmul_fallback_kernel_matches_cpu() {
    // The variable is read when the backend opens; other tests opening a backend meanwhile may
    // also get the fallback, which computes the same results.
    std::env::set_var("SFT_GEMM_FALLBACK", "1");
    let g = gpu();
    std::env::remove_var("SFT_GEMM_FALLBACK");
    let Some(g) = g else { return };
    matmul_case(&g, "matmul (kernels/matmul.cu)");
}

/// The LoRA GEMMs on column slices: `[x·Aᵀ, out slice += s·xa·Bᵀ, dxa, dB, dx accumulated, dA]`.
#[allow(clippy::too_many_arguments)]
fn matmul_slices<B: Backend>(
    b: &B,
    x: &[f32],
    a: &[f32],
    bw: &[f32],
    out0: &[f32],
    dout: &[f32],
    dx0: &[f32],
    (n, i, r, o, ld, col): (usize, usize, usize, usize, usize, usize),
) -> Vec<Vec<f32>> {
    let xb = upload(b, x, Precision::Compute);
    let ab = upload(b, a, Precision::Compute);
    let bb = upload(b, bw, Precision::Compute);
    let mut xa = b.zeros(n * r, Precision::Compute).unwrap();
    b.matmul_forward_slice(&mut xa, &xb, &ab, n, i, r, r, 0, 1.0, GradMode::Overwrite).unwrap();
    let mut out = upload(b, out0, Precision::Compute);
    b.matmul_forward_slice(&mut out, &xa, &bb, n, r, o, ld, col, 0.75, GradMode::Accumulate).unwrap();
    let db = upload(b, dout, Precision::Compute);
    let mut dxa = b.zeros(n * r, Precision::Compute).unwrap();
    let mut dbw = b.zeros(o * r, Precision::F32).unwrap();
    b.matmul_backward_slice(
        Some(&mut dxa),
        Some(&mut dbw),
        &db,
        &xa,
        &bb,
        n,
        r,
        o,
        ld,
        col,
        0.75,
        GradMode::Overwrite,
    )
    .unwrap();
    let mut dx = upload(b, dx0, Precision::Compute);
    let mut da = b.zeros(r * i, Precision::F32).unwrap();
    b.matmul_backward_slice(
        Some(&mut dx),
        Some(&mut da),
        &dxa,
        &xb,
        &ab,
        n,
        i,
        r,
        r,
        0,
        1.0,
        GradMode::Accumulate,
    )
    .unwrap();
    vec![
        download(b, &xa, n * r),
        download(b, &out, n * ld),
        download(b, &dxa, n * r),
        download(b, &dbw, o * r),
        download(b, &dx, n * i),
        download(b, &da, r * i),
    ]
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn matmul_slices_match_cpu() {
    let Some(g) = gpu() else { return };
    // A slice at an odd column (unaligned pointer), then an aligned one as q/v slices are.
    for (seed, dims) in [(17, 70, 5, 21, 45, 13), (32, 128, 16, 64, 192, 128)].into_iter().enumerate() {
        let (n, i, r, o, ld, _) = dims;
        let mut rng = Rng::new(40 + seed as u64);
        let x = randn(&mut rng, n * i, 1.0);
        let a = randn(&mut rng, r * i, 0.2);
        let bw = randn(&mut rng, o * r, 0.2);
        let out0 = randn(&mut rng, n * ld, 1.0);
        let dout = randn(&mut rng, n * ld, 1.0);
        let dx0 = randn(&mut rng, n * i, 1.0);
        let got = matmul_slices(&g, &x, &a, &bw, &out0, &dout, &dx0, dims);
        let want = matmul_slices(&reference(), &x, &a, &bw, &out0, &dout, &dx0, dims);
        for (k, name) in ["x·Aᵀ", "out slice +=", "dxa", "dB", "dx +=", "dA"].iter().enumerate() {
            assert_close(&format!("matmul slices {name} {dims:?}"), &got[k], &want[k], TOL);
        }
    }
}

// ---- RoPE -----------------------------------------------------------------------------------

fn rope<B: Backend>(b: &B, qkv: &[f32], pos: &[u32], heads: HeadShape, rope: Rope) -> [Vec<f32>; 3] {
    let n = pos.len();
    let len = n * heads.qkv_width();
    let mut buf = upload(b, qkv, Precision::Compute);
    let p = upload_ids(b, pos);
    let mut table = b.zeros(n * heads.head_dim, Precision::F32).unwrap();
    b.rope_table(&mut table, &p, n, heads.head_dim, rope).unwrap();
    b.rope_forward(&mut buf, &table, n, heads, rope.style).unwrap();
    let fwd = download(b, &buf, len);
    b.rope_backward(&mut buf, &table, n, heads, rope.style).unwrap();
    [fwd, download(b, &buf, len), download(b, &table, n * heads.head_dim)]
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn rope_matches_cpu_in_both_styles_and_scalings() {
    let Some(g) = gpu() else { return };
    // head_dim 64: 16-byte groups; 40: one pair per thread (not a multiple of 16).
    for head_dim in [64, 40] {
        rope_case(&g, HeadShape { n_heads: 4, n_kv_heads: 2, head_dim });
    }
    // The fp32 table against the f64 CPU one at positions up to 131072 (Llama 3.2's context).
    let heads = HeadShape { n_heads: 1, n_kv_heads: 1, head_dim: 128 };
    let mut rng = Rng::new(5);
    let pos = rand_ids(&mut rng, 64, 131_072);
    let r = Rope::plain(500_000.0, RopeStyle::HalfSplit);
    let qkv = randn(&mut rng, pos.len() * heads.qkv_width(), 1.0);
    let a = rope(&g, &qkv, &pos, heads, r);
    let want = rope(&CpuBackend::<f64>::new(), &qkv, &pos, heads, r);
    let worst = a[2].iter().zip(&want[2]).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(worst < 1e-6, "rope table: largest |cos/sin| error {worst}");
}

fn rope_case(g: &CudaBackend, heads: HeadShape) {
    let n = 19;
    let mut rng = Rng::new(4);
    let qkv = randn(&mut rng, n * heads.qkv_width(), 1.0);
    let pos = rand_ids(&mut rng, n, 4096);
    let llama3 = RopeScaling::Llama3 {
        factor: 32.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 1024,
    };
    for style in [RopeStyle::AdjacentPairs, RopeStyle::HalfSplit] {
        for scaling in [None, Some(RopeScaling::Linear { factor: 4.0 }), Some(llama3)] {
            let r = Rope { theta: 500_000.0, style, scaling };
            let a = rope(g, &qkv, &pos, heads, r);
            let want = rope(&reference(), &qkv, &pos, heads, r);
            assert_close(&format!("rope_forward {r:?}"), &a[0], &want[0], TOL);
            assert_close(&format!("rope_backward {r:?}"), &a[1], &want[1], TOL);
            // Backward is the inverse rotation: it restores the input (up to bf16 rounding).
            assert_close(&format!("rope round trip {r:?}"), &a[1], &qkv, TOL);
        }
    }
}

// ---- attention ------------------------------------------------------------------------------

fn attention<B: Backend>(b: &B, qkv: &[f32], dout: &[f32], cu: &[u32], heads: HeadShape) -> Vec<Vec<f32>> {
    let n = *cu.last().unwrap() as usize;
    let segs = cu.len() - 1;
    let qkv_b = upload(b, qkv, Precision::Compute);
    let cu_b = upload_ids(b, cu);
    let mut out = b.zeros(n * heads.q_width(), Precision::Compute).unwrap();
    let mut lse = b.zeros(heads.n_heads * n, Precision::F32).unwrap();
    b.attention_forward(&mut out, &mut lse, &qkv_b, &cu_b, segs, n, heads).unwrap();
    let dout_b = upload(b, dout, Precision::Compute);
    let mut dqkv = b.zeros(n * heads.qkv_width(), Precision::Compute).unwrap();
    b.attention_backward(&mut dqkv, &dout_b, &qkv_b, &out, &lse, &cu_b, segs, n, heads, None).unwrap();
    vec![
        download(b, &out, n * heads.q_width()),
        download(b, &lse, heads.n_heads * n),
        download(b, &dqkv, n * heads.qkv_width()),
    ]
}

fn attention_case(heads: HeadShape, cu: &[u32], seed: u64) {
    let Some(g) = gpu() else { return };
    let n = *cu.last().unwrap() as usize;
    let mut rng = Rng::new(seed);
    let qkv = randn(&mut rng, n * heads.qkv_width(), 1.0);
    let dout = randn(&mut rng, n * heads.q_width(), 1.0);
    let a = attention(&g, &qkv, &dout, cu, heads);
    let r = attention(&reference(), &qkv, &dout, cu, heads);
    let tag = format!("hd {} heads {}/{} segments {cu:?}", heads.head_dim, heads.n_heads, heads.n_kv_heads);
    assert_close(&format!("attention out ({tag})"), &a[0], &r[0], TOL);
    assert_close(&format!("attention lse ({tag})"), &a[1], &r[1], TOL);
    // dq, dk and dv separately, so an error in one part is not hidden by the others.
    let (qw, kw, width) = (heads.q_width(), heads.kv_width(), heads.qkv_width());
    for (name, lo, hi) in [("dq", 0, qw), ("dk", qw, qw + kw), ("dv", qw + kw, width)] {
        let part = |v: &[f32]| -> Vec<f32> { v.chunks(width).flat_map(|row| row[lo..hi].to_vec()).collect() };
        assert_close(&format!("attention {name} ({tag})"), &part(&a[2]), &part(&r[2]), TOL);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn attention_matches_cpu_head_dim_64_gqa_packed() {
    // Segments of odd lengths, one longer than two key tiles, one of length 1.
    attention_case(HeadShape { n_heads: 4, n_kv_heads: 2, head_dim: 64 }, &[0, 5, 6, 83, 100], 5);
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn attention_matches_cpu_head_dim_128() {
    attention_case(HeadShape { n_heads: 3, n_kv_heads: 3, head_dim: 128 }, &[0, 41, 70], 6);
}

/// head_dim 32 (the demo's model) runs the scalar kernels only.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn attention_matches_cpu_head_dim_32() {
    attention_case(HeadShape { n_heads: 4, n_kv_heads: 2, head_dim: 32 }, &[0, 1, 40, 77], 8);
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn attention_matches_cpu_multi_query() {
    attention_case(HeadShape { n_heads: 4, n_kv_heads: 1, head_dim: 64 }, &[0, 130], 7);
}

fn decode<B: Backend>(b: &B, qkv: &[f32], heads: HeadShape, first: usize, max_len: usize) -> Vec<f32> {
    let n = qkv.len() / heads.qkv_width();
    let w = heads.qkv_width();
    let mut kc = b.zeros(max_len * heads.kv_width(), Precision::Compute).unwrap();
    let mut vc = b.zeros(max_len * heads.kv_width(), Precision::Compute).unwrap();
    let mut outs = Vec::new();
    // A prompt of `first` rows, then the rest one row at a time, as generation does.
    let mut start = 0;
    for len in std::iter::once(first).chain(std::iter::repeat_n(1, n - first)) {
        let part = upload(b, &qkv[start * w..(start + len) * w], Precision::Compute);
        let mut out = b.zeros(len * heads.q_width(), Precision::Compute).unwrap();
        b.attention_decode(&mut out, &part, &mut kc, &mut vc, start, len, heads).unwrap();
        outs.extend(download(b, &out, len * heads.q_width()));
        start += len;
    }
    outs
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn attention_decode_matches_cpu_and_training_forward() {
    let Some(g) = gpu() else { return };
    let heads = HeadShape { n_heads: 4, n_kv_heads: 2, head_dim: 64 };
    let (n, first) = (45, 37);
    let mut rng = Rng::new(8);
    let qkv = randn(&mut rng, n * heads.qkv_width(), 1.0);
    let a = decode(&g, &qkv, heads, first, 64);
    let r = decode(&reference(), &qkv, heads, first, 64);
    assert_close("attention_decode", &a, &r, TOL);
    let dout = vec![0.5; n * heads.q_width()];
    let full = attention(&reference(), &qkv, &dout, &[0, n as u32], heads);
    assert_close("attention_decode vs one-segment forward", &a, &full[0], TOL);
}

// ---- SwiGLU ---------------------------------------------------------------------------------

fn swiglu<B: Backend>(b: &B, gu: &[f32], dout: &[f32], n: usize, hidden: usize) -> [Vec<f32>; 2] {
    let gub = upload(b, gu, Precision::Compute);
    let mut out = b.zeros(n * hidden, Precision::Compute).unwrap();
    b.swiglu_forward(&mut out, &gub, n, hidden).unwrap();
    let db = upload(b, dout, Precision::Compute);
    let mut dgu = b.zeros(2 * n * hidden, Precision::Compute).unwrap();
    b.swiglu_backward(&mut dgu, &db, &gub, n, hidden).unwrap();
    [download(b, &out, n * hidden), download(b, &dgu, 2 * n * hidden)]
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn swiglu_matches_cpu() {
    let Some(g) = gpu() else { return };
    // hidden 173: one element per item; 176: 16-byte groups of 8.
    for (n, hidden) in [(11, 173), (11, 176)] {
        let mut rng = Rng::new(9);
        let gu = randn(&mut rng, 2 * n * hidden, 2.0);
        let dout = randn(&mut rng, n * hidden, 1.0);
        let a = swiglu(&g, &gu, &dout, n, hidden);
        let r = swiglu(&reference(), &gu, &dout, n, hidden);
        assert_close(&format!("swiglu_forward hidden {hidden}"), &a[0], &r[0], TOL);
        assert_close(&format!("swiglu_backward hidden {hidden}"), &a[1], &r[1], TOL);
    }
}

// ---- dropout --------------------------------------------------------------------------------

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn dropout_mask_matches_cpu_bit_for_bit() {
    let Some(g) = gpu() else { return };
    let len = 10_007;
    let mut rng = Rng::new(10);
    // Nonzero inputs, so a zero in the output can only come from the mask.
    let x: Vec<f32> = randn(&mut rng, len, 1.0).iter().map(|v| if *v == 0.0 { 1.0 } else { *v }).collect();
    let cpu = reference();
    for precision in [Precision::Compute, Precision::F32] {
        let mut a = upload(&g, &x, precision);
        g.dropout(&mut a, len, 0.1, 1234).unwrap();
        let a = download(&g, &a, len);
        let mut r = upload(&cpu, &x, precision);
        cpu.dropout(&mut r, len, 0.1, 1234).unwrap();
        let r = download(&cpu, &r, len);
        let dropped = |v: &[f32]| v.iter().map(|&e| e == 0.0).collect::<Vec<_>>();
        assert_eq!(dropped(&a), dropped(&r), "dropout masks differ ({precision:?})");
        assert_close(&format!("dropout values ({precision:?})"), &a, &r, TOL);
    }
}

// ---- loss -----------------------------------------------------------------------------------

#[allow(clippy::too_many_arguments)]
fn loss<B: Backend>(
    b: &B,
    x: &[f32],
    w: &[f32],
    targets: &[u32],
    dx0: &[f32],
    dw0: &[f32],
    d: usize,
    vocab: usize,
    ignore: u32,
) -> (f64, f64, Vec<f32>, Vec<f32>) {
    let n = targets.len();
    let xb = upload(b, x, Precision::Compute);
    let wb = upload(b, w, Precision::Compute);
    let no_grad = cross_entropy_sum(b, &xb, &wb, targets, ignore, n, d, vocab, None).unwrap();
    let mut dx = upload(b, dx0, Precision::Compute);
    let mut dw = upload(b, dw0, Precision::F32);
    let grads = LossGrads { dx: &mut dx, dw: &mut dw, loss_scale: 0.37, mode: GradMode::Accumulate };
    let with_grad = cross_entropy_sum(b, &xb, &wb, targets, ignore, n, d, vocab, Some(grads)).unwrap();
    (no_grad, with_grad, download(b, &dx, n * d), download(b, &dw, vocab * d))
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn lm_head_cross_entropy_matches_cpu() {
    let Some(g) = gpu() else { return };
    // d 40 with vocab 301: 16-byte row copies, one-element logits rows; d 36 with vocab 512:
    // the other way round.
    for (n, d, vocab) in [(23, 40, 301), (17, 36, 512)] {
        lm_head_case(&g, n, d, vocab);
    }
}

fn lm_head_case(g: &CudaBackend, n: usize, d: usize, vocab: usize) {
    let ignore = 2u32;
    let mut rng = Rng::new(11);
    let x = randn(&mut rng, n * d, 1.0);
    let w = randn(&mut rng, vocab * d, 0.3);
    // About a third of the rows unsupervised, some supervised rows with the ignore id's neighbours.
    let targets: Vec<u32> =
        (0..n).map(|_| if rng.below(3) == 0 { ignore } else { rng.below(vocab) as u32 }).collect();
    // dx starts nonzero: the op must overwrite it (zero on unsupervised rows).
    let dx0 = randn(&mut rng, n * d, 1.0);
    let dw0 = randn(&mut rng, vocab * d, 0.1);
    let a = loss(g, &x, &w, &targets, &dx0, &dw0, d, vocab, ignore);
    let r = loss(&reference(), &x, &w, &targets, &dx0, &dw0, d, vocab, ignore);
    assert!((a.0 - r.0).abs() / r.0.abs() < TOL, "loss {} vs {}", a.0, r.0);
    assert!((a.1 - r.1).abs() / r.1.abs() < TOL, "loss with grads {} vs {}", a.1, r.1);
    assert_close("lm_head_cross_entropy dx", &a.2, &r.2, TOL);
    assert_close("lm_head_cross_entropy dw", &a.3, &r.3, TOL);
    for (i, &t) in targets.iter().enumerate() {
        if t == ignore {
            assert!(
                a.2[i * d..(i + 1) * d].iter().all(|&v| v == 0.0),
                "dx row {i} is unsupervised but nonzero"
            );
        }
    }
}

// ---- optimizer ------------------------------------------------------------------------------

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn sum_squares_matches_cpu() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(12);
    let lens = [1, 300, 70_001, 0, 5];
    let data: Vec<Vec<f32>> = lens.iter().map(|&l| randn(&mut rng, l.max(1), 1.0)).collect();
    let cpu = reference();
    let precisions = [Precision::F32, Precision::Compute, Precision::F32, Precision::F32, Precision::Compute];
    let gb: Vec<_> = data.iter().zip(precisions).map(|(v, p)| upload(&g, v, p)).collect();
    let cb: Vec<_> = data.iter().zip(precisions).map(|(v, p)| upload(&cpu, v, p)).collect();
    let a = sum_squares_read(&g, &gb.iter().collect::<Vec<_>>(), &lens).unwrap();
    let r = sum_squares_read(&cpu, &cb.iter().collect::<Vec<_>>(), &lens).unwrap();
    assert!((a - r).abs() / r < 1e-4, "sum_squares {a} vs {r}");
}

/// The loss sums on the device (sum_split): overwrite, then accumulate, as the CPU does, with
/// nothing read back until the caller reads the statistics.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn sum_into_matches_cpu_and_reads_nothing() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(14);
    let cpu = reference();
    for len in [0usize, 1, 255, 257, 40_000] {
        let x: Vec<f32> = randn(&mut rng, len.max(1), 1.0).iter().map(|v| v.abs() + 0.5).collect();
        let mut results = Vec::new();
        for gpu_side in [true, false] {
            let got = if gpu_side {
                let xb = upload(&g, &x, Precision::F32);
                let mut st = g.zeros(STATS_LEN, Precision::F32).unwrap();
                let before = g.host_reads();
                g.sum_into(&mut st, stats::STEP_LOSS, &xb, len, GradMode::Overwrite).unwrap();
                g.sum_into(&mut st, stats::STEP_LOSS, &xb, len, GradMode::Accumulate).unwrap();
                assert_eq!(g.host_reads(), before);
                stats::join(&g.read(&st, STATS_LEN).unwrap(), stats::STEP_LOSS)
            } else {
                let xb = upload(&cpu, &x, Precision::F32);
                let mut st = cpu.zeros(STATS_LEN, Precision::F32).unwrap();
                cpu.sum_into(&mut st, stats::STEP_LOSS, &xb, len, GradMode::Overwrite).unwrap();
                cpu.sum_into(&mut st, stats::STEP_LOSS, &xb, len, GradMode::Accumulate).unwrap();
                stats::join(&cpu.read(&st, STATS_LEN).unwrap(), stats::STEP_LOSS)
            };
            results.push(got);
        }
        let want = 2.0 * x[..len].iter().map(|&v| v as f64).sum::<f64>();
        for got in results {
            assert!((got - want).abs() <= 1e-12 * want.max(1.0), "len {len}: {got} vs {want}");
        }
    }
}

/// AdamW reading the clip factor from the device's sum of squares: as the CPU, and no update
/// when the norm is not finite.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn adamw_clips_from_device_memory_as_the_cpu() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(15);
    let lens = [7usize, 1000, 66_000];
    let master: Vec<Vec<f32>> = lens.iter().map(|&l| randn(&mut rng, l, 0.5)).collect();
    let grads: Vec<Vec<f32>> = lens.iter().map(|&l| randn(&mut rng, l, 1.0)).collect();
    let hp =
        AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.01, step: 1, grad_scale: 1.0 };
    fn run<B: Backend>(
        b: &B,
        master0: &[Vec<f32>],
        grads: &[Vec<f32>],
        lens: &[usize],
        hp: &AdamW,
        max_norm: f32,
        poison: bool,
    ) -> Vec<Vec<f32>> {
        let mut params: Vec<_> = master0.iter().map(|v| upload(b, v, Precision::Compute)).collect();
        let mut master: Vec<_> = master0.iter().map(|v| upload(b, v, Precision::F32)).collect();
        let mut m: Vec<_> = lens.iter().map(|&l| b.zeros(l, Precision::F32).unwrap()).collect();
        let mut v: Vec<_> = lens.iter().map(|&l| b.zeros(l, Precision::F32).unwrap()).collect();
        let mut gb: Vec<_> = grads.iter().map(|v| upload(b, v, Precision::F32)).collect();
        if poison {
            let mut bad = grads[0].clone();
            bad[3] = f32::INFINITY;
            gb[0] = upload(b, &bad, Precision::F32);
        }
        let mut st = b.zeros(STATS_LEN, Precision::F32).unwrap();
        b.sum_squares(&gb.iter().collect::<Vec<_>>(), lens, &mut st).unwrap();
        b.adamw(
            &mut params.iter_mut().collect::<Vec<_>>(),
            &mut master.iter_mut().collect::<Vec<_>>(),
            &gb.iter().collect::<Vec<_>>(),
            &mut m.iter_mut().collect::<Vec<_>>(),
            &mut v.iter_mut().collect::<Vec<_>>(),
            StateDtype::F32,
            lens,
            hp,
            Some(Clip { sumsq: &st, max_norm }),
        )
        .unwrap();
        master.iter().zip(lens).map(|(x, &l)| download(b, x, l)).collect()
    }
    let norm: f64 = grads.iter().flatten().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt();
    for max_norm in [(norm / 4.0) as f32, 0.0] {
        let before = g.host_reads();
        let a = run(&g, &master, &grads, &lens, &hp, max_norm, false);
        // Only the final downloads of the masters read anything back.
        assert_eq!(g.host_reads() - before, lens.len() as u64);
        let r = run(&reference(), &master, &grads, &lens, &hp, max_norm, false);
        for t in 0..lens.len() {
            assert_close(&format!("adamw clipped master {t} (max_norm {max_norm})"), &a[t], &r[t], 1e-5);
        }
    }
    let a = run(&g, &master, &grads, &lens, &hp, 1.0, true);
    assert_eq!(a, master, "a non-finite norm must leave the weights alone");
}

type AdamState = [Vec<Vec<f32>>; 4];

fn adamw_steps<B: Backend>(
    b: &B,
    init: &AdamState,
    grads: &[Vec<f32>],
    lens: &[usize],
    hp: &[AdamW],
    moments: StateDtype,
) -> AdamState {
    let [p0, master0, m0, v0] = init;
    let mut params: Vec<_> = p0.iter().map(|v| upload(b, v, Precision::Compute)).collect();
    let mut master: Vec<_> = master0.iter().map(|v| upload(b, v, Precision::F32)).collect();
    let mut m: Vec<_> = m0.iter().map(|v| upload(b, v, moments.precision())).collect();
    let mut v: Vec<_> = v0.iter().map(|v| upload(b, v, moments.precision())).collect();
    let gb: Vec<_> = grads.iter().map(|v| upload(b, v, Precision::F32)).collect();
    for h in hp {
        b.adamw(
            &mut params.iter_mut().collect::<Vec<_>>(),
            &mut master.iter_mut().collect::<Vec<_>>(),
            &gb.iter().collect::<Vec<_>>(),
            &mut m.iter_mut().collect::<Vec<_>>(),
            &mut v.iter_mut().collect::<Vec<_>>(),
            moments,
            lens,
            h,
            None,
        )
        .unwrap();
    }
    let read = |bufs: &[B::Buf]| -> Vec<Vec<f32>> {
        bufs.iter().zip(lens).map(|(x, &l)| download(b, x, l)).collect()
    };
    [read(&params), read(&master), read(&m), read(&v)]
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn adamw_matches_cpu() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(13);
    let lens = [7usize, 1000, 66_000];
    let master: Vec<Vec<f32>> = lens.iter().map(|&l| randn(&mut rng, l, 0.5)).collect();
    let params = master.clone();
    let m: Vec<Vec<f32>> = lens.iter().map(|&l| randn(&mut rng, l, 0.01)).collect();
    let v: Vec<Vec<f32>> =
        lens.iter().map(|&l| randn(&mut rng, l, 0.01).iter().map(|x| x * x).collect()).collect();
    let grads: Vec<Vec<f32>> = lens.iter().map(|&l| randn(&mut rng, l, 1.0)).collect();
    let base =
        AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.01, step: 1, grad_scale: 0.5 };
    let hp = [base, AdamW { step: 2, grad_scale: 1.0, ..base }];
    let init = [params, master, m, v];
    let a = adamw_steps(&g, &init, &grads, &lens, &hp, StateDtype::F32);
    let r = adamw_steps(&reference(), &init, &grads, &lens, &hp, StateDtype::F32);
    // The CPU keeps params in f32; the GPU stores bf16 roundings of the same master values.
    let mut r = r;
    for p in r[0].iter_mut() {
        p.iter_mut().for_each(|x| *x = bf16::from_f32(*x).to_f32());
    }
    for (k, name) in ["params", "master", "m", "v"].iter().enumerate() {
        for t in 0..lens.len() {
            // Compare the update, not the (much larger) values it was added to.
            let delta =
                |s: &AdamState| -> Vec<f32> { s[k][t].iter().zip(&init[k][t]).map(|(x, y)| x - y).collect() };
            let tol = if k == 0 { 5e-2 } else { 1e-3 }; // params are bf16 roundings of master
            assert_close(&format!("adamw {name} tensor {t} update"), &delta(&a), &delta(&r), tol);
        }
    }
}

/// `--optimizer-state bf16`: adamw_multi_bf16 against the CPU twin, which stores its moments
/// rounded to bf16 the same way. Starting moments are bf16 values (what the buffers can hold).
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn adamw_bf16_moments_match_cpu() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(14);
    let lens = [7usize, 1000, 66_000];
    let to_bf = |x: Vec<f32>| -> Vec<f32> { x.iter().map(|&x| bf16::from_f32(x).to_f32()).collect() };
    let master: Vec<Vec<f32>> = lens.iter().map(|&l| randn(&mut rng, l, 0.5)).collect();
    let params = master.clone();
    let m: Vec<Vec<f32>> = lens.iter().map(|&l| to_bf(randn(&mut rng, l, 0.01))).collect();
    let v: Vec<Vec<f32>> =
        lens.iter().map(|&l| to_bf(randn(&mut rng, l, 0.01).iter().map(|x| x * x).collect())).collect();
    // Tiny gradients in the last tensor: v flushes to zero in bf16 there, and the update must
    // stay bounded (m / eps), as on the CPU.
    let mut grads: Vec<Vec<f32>> = lens.iter().map(|&l| randn(&mut rng, l, 1.0)).collect();
    grads[2].iter_mut().step_by(3).for_each(|x| *x *= 1e-21);
    let base =
        AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.01, step: 1, grad_scale: 0.5 };
    let hp = [base, AdamW { step: 2, grad_scale: 1.0, ..base }];
    let init = [params, master, m, v];
    let a = adamw_steps(&g, &init, &grads, &lens, &hp, StateDtype::Bf16);
    let mut r = adamw_steps(&reference(), &init, &grads, &lens, &hp, StateDtype::Bf16);
    for p in r[0].iter_mut() {
        p.iter_mut().for_each(|x| *x = bf16::from_f32(*x).to_f32());
    }
    for (k, name) in ["params", "master", "m", "v"].iter().enumerate() {
        for t in 0..lens.len() {
            assert!(a[k][t].iter().all(|x| x.is_finite()), "adamw bf16 {name} tensor {t}: not finite");
            if k >= 2 {
                // Both store bf16 values; the same f32 arithmetic rounds to the same one, or
                // (FMA contraction on the GPU) to a neighbour; where m's two terms nearly cancel,
                // the f32 results themselves differ by a few ulps of the terms (absolute).
                for (x, y) in a[k][t].iter().zip(&r[k][t]) {
                    assert!(
                        x.to_bits() & 0xffff == 0,
                        "adamw bf16 {name} tensor {t}: {x} is not a bf16 value"
                    );
                    assert!(
                        (x - y).abs() <= 2f32.powi(-7) * y.abs() + 1e-8,
                        "adamw bf16 {name} tensor {t}: {x} vs {y}"
                    );
                }
                continue;
            }
            let delta =
                |s: &AdamState| -> Vec<f32> { s[k][t].iter().zip(&init[k][t]).map(|(x, y)| x - y).collect() };
            let tol = if k == 0 { 5e-2 } else { 1e-3 };
            assert_close(&format!("adamw bf16 {name} tensor {t} update"), &delta(&a), &delta(&r), tol);
        }
    }
}

// ---- the references themselves (run everywhere, no GPU) ------------------------------------

/// Loss of attention: sum(out ∘ dout), so its gradient is attention_backward's with `dout`.
fn attention_objective(qkv: &[f32], dout: &[f32], cu: &[u32], heads: HeadShape) -> f64 {
    let out = attention(&reference(), qkv, dout, cu, heads);
    out[0].iter().zip(dout).map(|(&o, &d)| o as f64 * d as f64).sum()
}

#[test]
fn reference_attention_backward_matches_finite_differences() {
    let heads = HeadShape { n_heads: 2, n_kv_heads: 1, head_dim: 64 };
    let cu = [0u32, 3, 7];
    let n = 7;
    let mut rng = Rng::new(20);
    let qkv: Vec<f32> = (0..n * heads.qkv_width()).map(|_| rng.normal() as f32 * 0.5).collect();
    let dout: Vec<f32> = (0..n * heads.q_width()).map(|_| rng.normal() as f32).collect();
    let grad = attention(&reference(), &qkv, &dout, &cu, heads)[2].clone();
    let eps = 1e-2;
    // A sample of coordinates in each of q, k and v, in both segments.
    for idx in [0, 5, 64 + 3, 128 + 7, 192 + 11, 4 * 256 + 2, 6 * 256 + 130, 5 * 256 + 200] {
        let mut plus = qkv.clone();
        plus[idx] += eps;
        let mut minus = qkv.clone();
        minus[idx] -= eps;
        let fd = (attention_objective(&plus, &dout, &cu, heads)
            - attention_objective(&minus, &dout, &cu, heads))
            / (2.0 * eps as f64);
        let g = grad[idx] as f64;
        assert!(
            (fd - g).abs() <= 2e-2 * (1.0 + g.abs()),
            "dqkv[{idx}]: analytic {g}, finite difference {fd}"
        );
    }
}

#[test]
fn reference_decode_matches_the_training_forward() {
    let heads = HeadShape { n_heads: 4, n_kv_heads: 2, head_dim: 64 };
    let n = 9;
    let mut rng = Rng::new(21);
    let qkv = randn(&mut rng, n * heads.qkv_width(), 1.0);
    let dec = decode(&reference(), &qkv, heads, 4, 16);
    let full = attention(&reference(), &qkv, &vec![0.5; n * heads.q_width()], &[0, n as u32], heads);
    assert_close("reference decode vs forward", &dec, &full[0], 1e-5);
}

#[test]
fn reference_rmsnorm_backward_matches_finite_differences() {
    let (n, d) = (3, 10);
    let mut rng = Rng::new(22);
    let x: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
    let w: Vec<f32> = (0..d).map(|_| 1.0 + 0.3 * rng.normal() as f32).collect();
    let dout: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
    let b = reference();
    let objective = |x: &[f32], w: &[f32]| -> f64 {
        let (mut out, mut rstd) = (vec![0.0; n * d], vec![0.0; n]);
        b.rmsnorm_forward(&mut out, &mut rstd, &x.to_vec(), &w.to_vec(), n, d, 1e-5).unwrap();
        out.iter().zip(&dout).map(|(&o, &g)| o as f64 * g as f64).sum()
    };
    let (mut out, mut rstd) = (vec![0.0; n * d], vec![0.0; n]);
    b.rmsnorm_forward(&mut out, &mut rstd, &x, &w, n, d, 1e-5).unwrap();
    let (mut dx, mut dw) = (vec![0.0; n * d], vec![0.0; d]);
    b.rmsnorm_backward(&mut dx, &mut dw, &dout, &x, &w, &rstd, n, d, None).unwrap();
    let eps = 1e-2;
    for i in [0, 7, 13, 29] {
        let (mut p, mut m) = (x.clone(), x.clone());
        p[i] += eps;
        m[i] -= eps;
        let fd = (objective(&p, &w) - objective(&m, &w)) / (2.0 * eps as f64);
        assert!((fd - dx[i] as f64).abs() < 1e-2 * (1.0 + fd.abs()), "dx[{i}] {} vs {fd}", dx[i]);
    }
    for k in [0, 4, 9] {
        let (mut p, mut m) = (w.clone(), w.clone());
        p[k] += eps;
        m[k] -= eps;
        let fd = (objective(&x, &p) - objective(&x, &m)) / (2.0 * eps as f64);
        assert!((fd - dw[k] as f64).abs() < 1e-2 * (1.0 + fd.abs()), "dw[{k}] {} vs {fd}", dw[k]);
    }
}

/// A second, plain-loop reading of the trait (`NaiveBackend`, f64) against `CpuBackend` on every
/// op, on the shapes the kernels take (head_dim 64, grouped KV, odd sizes); no GPU needed.
#[test]
fn reference_agrees_with_cpu_backend_on_every_op() {
    let (cpu, re) = (reference(), NaiveBackend::default());
    let tol = 1e-4;
    let mut rng = Rng::new(30);

    let (vocab, d, n) = (37, 45, 29);
    let ids = rand_ids(&mut rng, n, vocab);
    let (table, dout, dt0) =
        (randn(&mut rng, vocab * d, 1.0), randn(&mut rng, n * d, 1.0), randn(&mut rng, vocab * d, 0.1));
    let (a, r) =
        (embedding(&re, &ids, &table, &dout, &dt0, d), embedding(&cpu, &ids, &table, &dout, &dt0, d));
    assert_close("ref embedding fwd", &a[0], &r[0], tol);
    assert_close("ref embedding bwd", &a[1], &r[1], tol);

    let (n, d) = (5, 33);
    let v: Vec<Vec<f32>> =
        [n * d, n * d, d, n * d, n * d, d].iter().map(|&l| randn(&mut rng, l, 1.0)).collect();
    // With dropout folded into the residual add and the norm backward's branch gradient.
    let mask = Some(Dropout { p: 0.2, seed: 3 });
    let a = rmsnorm(&re, &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], n, d, mask);
    let r = rmsnorm(&cpu, &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], n, d, mask);
    for k in 0..a.len() {
        assert_close(&format!("ref rmsnorm output {k}"), &a[k], &r[k], tol);
    }

    let (n, i, o) = (7, 13, 11);
    let v: Vec<Vec<f32>> =
        [n * i, o * i, n * o, o * i, n * o].iter().map(|&l| randn(&mut rng, l, 1.0)).collect();
    let (a, r) = (
        matmul(&re, &v[0], &v[1], &v[2], &v[3], &v[4], n, i, o),
        matmul(&cpu, &v[0], &v[1], &v[2], &v[3], &v[4], n, i, o),
    );
    for k in 0..a.len() {
        assert_close(&format!("ref matmul output {k}"), &a[k], &r[k], tol);
    }

    let heads = HeadShape { n_heads: 4, n_kv_heads: 2, head_dim: 64 };
    let qkv = randn(&mut rng, 19 * heads.qkv_width(), 1.0);
    let pos = rand_ids(&mut rng, 19, 4096);
    for style in [RopeStyle::AdjacentPairs, RopeStyle::HalfSplit] {
        let r = Rope::plain(10000.0, style);
        let (a, r) = (rope(&re, &qkv, &pos, heads, r), rope(&cpu, &qkv, &pos, heads, r));
        assert_close(&format!("ref rope fwd {style:?}"), &a[0], &r[0], tol);
        assert_close(&format!("ref rope bwd {style:?}"), &a[1], &r[1], tol);
    }

    let cu = [0u32, 5, 6, 40];
    let qkv = randn(&mut rng, 40 * heads.qkv_width(), 1.0);
    let dout = randn(&mut rng, 40 * heads.q_width(), 1.0);
    let (a, r) = (attention(&re, &qkv, &dout, &cu, heads), attention(&cpu, &qkv, &dout, &cu, heads));
    for (k, name) in ["out", "lse", "dqkv"].iter().enumerate() {
        assert_close(&format!("ref attention {name}"), &a[k], &r[k], tol);
    }
    let (a, r) = (decode(&re, &qkv, heads, 30, 48), decode(&cpu, &qkv, heads, 30, 48));
    assert_close("ref attention decode", &a, &r, tol);

    let (n, hidden) = (3, 17);
    let (gu, dout) = (randn(&mut rng, 2 * n * hidden, 2.0), randn(&mut rng, n * hidden, 1.0));
    let (a, r) = (swiglu(&re, &gu, &dout, n, hidden), swiglu(&cpu, &gu, &dout, n, hidden));
    assert_close("ref swiglu fwd", &a[0], &r[0], tol);
    assert_close("ref swiglu bwd", &a[1], &r[1], tol);

    let x = randn(&mut rng, 1000, 1.0);
    let mut xa = upload(&re, &x, Precision::Compute);
    re.dropout(&mut xa, 1000, 0.1, 77).unwrap();
    let xa = download(&re, &xa, 1000);
    // Both in f64 (then read as f32), so that the check is of the mask and the scale, not of
    // f32 against f64 rounding.
    let cpu64 = CpuBackend::<f64>::new();
    let mut xr = upload(&cpu64, &x, Precision::Compute);
    cpu64.dropout(&mut xr, 1000, 0.1, 77).unwrap();
    let xr = download(&cpu64, &xr, 1000);
    assert_eq!(xa, xr, "ref dropout");

    let (n, d, vocab, ignore) = (9, 8, 31, 2u32);
    let (x, w) = (randn(&mut rng, n * d, 1.0), randn(&mut rng, vocab * d, 0.3));
    let targets: Vec<u32> =
        (0..n).map(|k| if k % 3 == 0 { ignore } else { rng.below(vocab) as u32 }).collect();
    let (dx0, dw0) = (randn(&mut rng, n * d, 1.0), randn(&mut rng, vocab * d, 0.1));
    let a = loss(&re, &x, &w, &targets, &dx0, &dw0, d, vocab, ignore);
    let r = loss(&cpu, &x, &w, &targets, &dx0, &dw0, d, vocab, ignore);
    assert!(
        (a.0 - r.0).abs() < 1e-4 * r.0.abs() && (a.1 - r.1).abs() < 1e-4 * r.1.abs(),
        "ref loss {a:?} vs {r:?}"
    );
    assert_close("ref lm_head dx", &a.2, &r.2, tol);
    assert_close("ref lm_head dw", &a.3, &r.3, tol);

    let lens = [7usize, 100];
    let st = |rng: &mut Rng, s: f32| -> Vec<Vec<f32>> { lens.iter().map(|&l| randn(rng, l, s)).collect() };
    let master = st(&mut rng, 0.5);
    let init = [
        master.clone(),
        master,
        st(&mut rng, 0.01),
        st(&mut rng, 0.01).iter().map(|v| v.iter().map(|x| x * x).collect()).collect(),
    ];
    let grads = st(&mut rng, 1.0);
    let base =
        AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.01, step: 1, grad_scale: 0.5 };
    let hp = [base, AdamW { step: 2, grad_scale: 1.0, ..base }];
    for moments in [StateDtype::F32, StateDtype::Bf16] {
        let a = adamw_steps(&re, &init, &grads, &lens, &hp, moments);
        let r = adamw_steps(&cpu, &init, &grads, &lens, &hp, moments);
        for k in 0..4 {
            for t in 0..lens.len() {
                // bf16 moments: the two may round a value on either side of a bf16 boundary.
                let tol = if moments == StateDtype::Bf16 && k >= 2 { tol.max(1e-2) } else { tol };
                assert_close(&format!("ref adamw {moments} state {k} tensor {t}"), &a[k][t], &r[k][t], tol);
            }
        }
    }
}
