//! The tensor-core attention (kernels/flash_attention.cu) against the CPU reference
//! (`CpuBackend<f32>`) and against the scalar CUDA kernels (attention.cu), on random inputs:
//! single sequences of 1, 17, 1000, 2048 and 4096 tokens, packed rows of mixed lengths, grouped
//! KV heads (2:1 and 4:1), head_dim 64 and 128. Outputs must agree to a relative error
//! ‖gpu − ref‖ / ‖ref‖ below 1e-2: out, lse, and the dq, dk, dv parts of dqkv separately.
//! The backward (one kernel: dK, dV and the ordered dQ accumulation) must also be bit-identical
//! run to run, and a tile table prepared once per batch must follow rewritten segments.
//! The opt-in atomic dQ path (`FlashDq::Atomic`, SFT_FLASH_DQ=atomic) must meet the same
//! tolerances against the CPU, give dK and dV bit-identical to the ordered path, and leave its
//! accumulator at zero (consecutive calls, also after an ordered call, agree).
//! The opt-in wgmma kernels (`FlashMma::Wgmma`, compute capability 9.0 only: the head_dim 64
//! forward, ordered and deferred-q64 backward) must meet the same tolerances against the CPU,
//! and their backward must be bit-identical run to run and between the two dQ sums.
//!
//! All tests are `#[ignore]` (they need an NVIDIA GPU): `cargo test --release --test
//! gpu_attention -- --ignored`, or `scripts/gpu_check.sh run`. Where the backend cannot open,
//! each test prints "skipped: ..." and returns; where the device has no tensor-core path for a
//! head_dim (below sm_80, or too little shared memory per block), the tests that need it say so
//! and fail, since they would otherwise check the scalar kernels twice.

mod common;
use common::gpu::{gpu, randn, upload};
use sft::backend::cpu::CpuBackend;
use sft::backend::cuda::{AttentionPath, CudaBackend, FlashChoice, FlashDq, FlashMma};
use sft::backend::{Backend, HeadShape, Precision, Rope, RopeGrad, RopeStyle};
use sft::rng::Rng;

const TOL: f64 = 1e-2;

/// The GPU backend with the tensor-core path on for `head_dim` (panics when the device lacks it),
/// with the ordered dQ accumulation and the mma forward whatever SFT_FLASH_DQ and
/// SFT_FLASH_MMA say.
fn tensor_core_gpu(head_dim: usize) -> Option<CudaBackend> {
    let g = gpu()?;
    g.set_attention_path(AttentionPath::Auto);
    g.set_flash_dq(FlashDq::Ordered);
    g.set_flash_mma(FlashMma::Mma).unwrap();
    assert!(
        g.uses_tensor_core_attention(head_dim),
        "no tensor-core attention for head_dim {head_dim} on this device (compute capability {:?})",
        g.compute_capability()
    );
    Some(g)
}

/// (out, lse, dqkv) of one forward and backward.
fn attention<B: Backend>(b: &B, qkv: &[f32], dout: &[f32], cu: &[u32], heads: HeadShape) -> [Vec<f32>; 3] {
    attention_rope(b, qkv, dout, cu, heads, None)
}

/// As [`attention`]; with `rope`, the backward hands back the gradients before a rotation of
/// q and k (positions counted from each segment's start).
fn attention_rope<B: Backend>(
    b: &B,
    qkv: &[f32],
    dout: &[f32],
    cu: &[u32],
    heads: HeadShape,
    rope: Option<RopeStyle>,
) -> [Vec<f32>; 3] {
    let mut cu_b = b.zeros_ids(cu.len()).unwrap();
    b.write_ids(&mut cu_b, cu).unwrap();
    attention_on(b, qkv, dout, &cu_b, cu, heads, rope)
}

/// As [`attention_rope`], with the segments already on the device.
fn attention_on<B: Backend>(
    b: &B,
    qkv: &[f32],
    dout: &[f32],
    cu_b: &B::Ids,
    cu: &[u32],
    heads: HeadShape,
    rope: Option<RopeStyle>,
) -> [Vec<f32>; 3] {
    let (segs, n) = (cu.len() - 1, *cu.last().unwrap() as usize);
    let qkv_b = upload(b, qkv, Precision::Compute);
    let mut out = b.zeros(n * heads.q_width(), Precision::Compute).unwrap();
    let mut lse = b.zeros(heads.n_heads * n, Precision::F32).unwrap();
    b.attention_forward(&mut out, &mut lse, &qkv_b, cu_b, segs, n, heads).unwrap();
    let dout_b = upload(b, dout, Precision::Compute);
    let mut table = b.zeros(n * heads.head_dim, Precision::F32).unwrap();
    if let Some(style) = rope {
        let positions: Vec<u32> = cu.windows(2).flat_map(|w| 0..w[1] - w[0]).collect();
        let mut positions_b = b.zeros_ids(n).unwrap();
        b.write_ids(&mut positions_b, &positions).unwrap();
        b.rope_table(&mut table, &positions_b, n, heads.head_dim, Rope::plain(10_000.0, style)).unwrap();
    }
    let rope = rope.map(|style| RopeGrad { table: &table, style });
    // Garbage in dqkv first: the backward must overwrite every element.
    let mut dqkv = upload(b, &vec![f32::NAN; n * heads.qkv_width()], Precision::Compute);
    b.attention_backward(&mut dqkv, &dout_b, &qkv_b, &out, &lse, cu_b, segs, n, heads, rope).unwrap();
    b.synchronize().unwrap();
    [
        b.read(&out, n * heads.q_width()).unwrap(),
        b.read(&lse, heads.n_heads * n).unwrap(),
        b.read(&dqkv, n * heads.qkv_width()).unwrap(),
    ]
}

fn rel_error(got: &[f32], want: &[f32]) -> f64 {
    let diff: f64 = got.iter().zip(want).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum::<f64>().sqrt();
    let norm: f64 = want.iter().map(|&b| (b as f64).powi(2)).sum::<f64>().sqrt();
    // dq and dk of a 1-token sequence are exactly zero (dS = P(dP − D) with P = 1, D = dP):
    // there the absolute error is the measure.
    if norm > 0.0 {
        diff / norm
    } else {
        diff
    }
}

/// `got` against `want` within TOL (relative), printed either way.
fn check_close(what: &str, got: &[f32], want: &[f32]) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{what}: lengths differ ({} against {})", got.len(), want.len()));
    }
    if !got.iter().all(|v| v.is_finite()) {
        return Err(format!("{what}: non-finite values"));
    }
    let rel = rel_error(got, want);
    eprintln!("{what}: relative error {rel:.2e}");
    if rel < TOL {
        Ok(())
    } else {
        Err(format!("{what}: relative error {rel:.3e} >= {TOL:e}"))
    }
}

/// out, lse, dq, dk, dv of `a` against `r`: all five checked before failing, so that a failure
/// says which products went wrong (a wrong forward spoils the backward's inputs too).
fn compare(tag: &str, a: &[Vec<f32>; 3], r: &[Vec<f32>; 3], heads: HeadShape) {
    let mut failed = Vec::new();
    failed.extend(check_close(&format!("out ({tag})"), &a[0], &r[0]).err());
    failed.extend(check_close(&format!("lse ({tag})"), &a[1], &r[1]).err());
    let (qw, kw, width) = (heads.q_width(), heads.kv_width(), heads.qkv_width());
    for (name, lo, hi) in [("dq", 0, qw), ("dk", qw, qw + kw), ("dv", qw + kw, width)] {
        let part = |v: &[f32]| -> Vec<f32> { v.chunks(width).flat_map(|row| row[lo..hi].to_vec()).collect() };
        failed.extend(check_close(&format!("{name} ({tag})"), &part(&a[2]), &part(&r[2])).err());
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

fn inputs(n: usize, heads: HeadShape, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = Rng::new(seed);
    (randn(&mut rng, n * heads.qkv_width(), 1.0), randn(&mut rng, n * heads.q_width(), 1.0))
}

/// Tensor cores vs the CPU reference.
fn against_cpu(heads: HeadShape, cu: &[u32], seed: u64) {
    against_cpu_dq(heads, cu, seed, FlashDq::Ordered);
}

/// As [`against_cpu`], with the backward's dQ accumulation `dq`.
fn against_cpu_dq(heads: HeadShape, cu: &[u32], seed: u64, dq: FlashDq) {
    let Some(g) = tensor_core_gpu(heads.head_dim) else { return };
    g.set_flash_dq(dq);
    against_cpu_on(&g, heads, cu, seed);
}

/// `g`'s attention, as it is set up, against the CPU reference.
fn against_cpu_on(g: &CudaBackend, heads: HeadShape, cu: &[u32], seed: u64) {
    let n = *cu.last().unwrap() as usize;
    let (qkv, dout) = inputs(n, heads, seed);
    let a = attention(g, &qkv, &dout, cu, heads);
    let r = attention(&CpuBackend::<f32>::new(), &qkv, &dout, cu, heads);
    let lens: Vec<u32> = cu.windows(2).map(|w| w[1] - w[0]).collect();
    let tag = format!(
        "tensor cores ({} forward, {} dQ) vs cpu, hd {} heads {}/{} lengths {lens:?}",
        g.flash_mma().name(),
        g.flash_dq().name(),
        heads.head_dim,
        heads.n_heads,
        heads.n_kv_heads
    );
    compare(&tag, &a, &r, heads);
}

const MHA_64: HeadShape = HeadShape { n_heads: 2, n_kv_heads: 2, head_dim: 64 };
const GQA_64: HeadShape = HeadShape { n_heads: 4, n_kv_heads: 2, head_dim: 64 };
const MQA_64: HeadShape = HeadShape { n_heads: 4, n_kv_heads: 1, head_dim: 64 };
const MHA_128: HeadShape = HeadShape { n_heads: 2, n_kv_heads: 2, head_dim: 128 };
const GQA_128: HeadShape = HeadShape { n_heads: 4, n_kv_heads: 2, head_dim: 128 };

/// Packed rows of mixed lengths: 1, partial tiles, exact tiles (64, 128), several tiles.
const PACKED: &[u32] = &[0, 1, 18, 82, 210, 1210, 1211, 1340, 2048];

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn flash_hd64_single_sequences() {
    for (i, t) in [1u32, 17, 1000, 2048, 4096].into_iter().enumerate() {
        against_cpu(MHA_64, &[0, t], 100 + i as u64);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn flash_hd128_single_sequences() {
    for (i, t) in [1u32, 17, 1000, 2048].into_iter().enumerate() {
        against_cpu(MHA_128, &[0, t], 200 + i as u64);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn flash_hd64_packed_grouped_kv() {
    against_cpu(GQA_64, PACKED, 300);
    against_cpu(MQA_64, PACKED, 301);
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn flash_hd128_packed_grouped_kv() {
    against_cpu(GQA_128, PACKED, 400);
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn flash_many_short_segments() {
    // More segments than the tile table's scan threads (1024), most of them shorter than a tile.
    let mut cu = vec![0u32];
    let mut rng = Rng::new(5);
    while *cu.last().unwrap() < 6000 {
        let len = 1 + rng.below(9) as u32;
        cu.push(cu.last().unwrap() + len);
    }
    against_cpu(GQA_64, &cu, 500);
}

/// Tensor-core path vs the scalar kernels on the same GPU.
fn tensor_cores_vs_scalar(heads: HeadShape, cu: &[u32], seed: u64) {
    let Some(g) = tensor_core_gpu(heads.head_dim) else { return };
    let n = *cu.last().unwrap() as usize;
    let (qkv, dout) = inputs(n, heads, seed);
    let a = attention(&g, &qkv, &dout, cu, heads);
    g.set_attention_path(AttentionPath::Scalar);
    assert!(!g.uses_tensor_core_attention(heads.head_dim));
    let s = attention(&g, &qkv, &dout, cu, heads);
    g.set_attention_path(AttentionPath::Auto);
    compare(&format!("tensor cores vs scalar, hd {}", heads.head_dim), &a, &s, heads);
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn flash_matches_scalar_kernels() {
    tensor_cores_vs_scalar(GQA_64, PACKED, 600);
    tensor_cores_vs_scalar(GQA_128, PACKED, 601);
    tensor_cores_vs_scalar(MHA_64, &[0, 4096], 602);
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn flash_backward_is_deterministic() {
    let Some(g) = tensor_core_gpu(64) else { return };
    let cu = [0u32, 700, 2048, 3000];
    let (qkv, dout) = inputs(3000, GQA_64, 700);
    let a = attention(&g, &qkv, &dout, &cu, GQA_64);
    let b = attention(&g, &qkv, &dout, &cu, GQA_64);
    for (x, y) in a.iter().zip(&b) {
        assert!(x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()), "two runs differ");
    }
}

fn assert_identical(what: &str, a: &[Vec<f32>; 3], b: &[Vec<f32>; 3]) {
    for (name, (x, y)) in ["out", "lse", "dqkv"].iter().zip(a.iter().zip(b)) {
        let differ = x.iter().zip(y).filter(|(p, q)| p.to_bits() != q.to_bits()).count();
        assert_eq!(differ, 0, "{what}: {differ} values of {name} differ between two runs");
    }
}

/// The backward sums each q tile's dQ partials (one per key tile) in a fixed order, whatever the
/// timing: bit-identical runs for both head dims, on grids of many waves (the 1.3B's 32 heads
/// over rows of 2048, and a packed batch with grouped KV heads).
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn flash_backward_is_deterministic_at_scale() {
    let mha_32 = HeadShape { n_heads: 32, n_kv_heads: 32, head_dim: 64 };
    let gqa_128 = HeadShape { n_heads: 16, n_kv_heads: 4, head_dim: 128 };
    for (heads, cu, seed) in
        [(mha_32, vec![0u32, 2048, 4096, 6144, 8192], 710), (gqa_128, PACKED.to_vec(), 711)]
    {
        let Some(g) = tensor_core_gpu(heads.head_dim) else { return };
        let n = *cu.last().unwrap() as usize;
        let (qkv, dout) = inputs(n, heads, seed);
        let first = attention(&g, &qkv, &dout, &cu, heads);
        for run in 1..3 {
            let again = attention(&g, &qkv, &dout, &cu, heads);
            assert_identical(&format!("hd {} run {run}", heads.head_dim), &first, &again);
        }
    }
}

/// A tile table prepared once for a batch (`prepare_segments`, as the model does) gives the same
/// bits as one built per call, and is forgotten when the segments are rewritten in place: the
/// next attention sees the new segments (same count and rows, other boundaries).
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn flash_prepared_tile_table_follows_the_segments() {
    let Some(g) = tensor_core_gpu(64) else { return };
    let other: &[u32] = &[0, 5, 20, 90, 300, 1000, 1001, 1500, 2048];
    assert_eq!(other.len(), PACKED.len());
    let n = 2048;
    let (qkv, dout) = inputs(n, GQA_64, 720);
    let unprepared = attention(&g, &qkv, &dout, PACKED, GQA_64);
    let mut cu_b = g.zeros_ids(PACKED.len()).unwrap();
    g.write_ids(&mut cu_b, PACKED).unwrap();
    g.prepare_segments(&cu_b, PACKED.len() - 1, n).unwrap();
    let prepared = attention_on(&g, &qkv, &dout, &cu_b, PACKED, GQA_64, None);
    assert_identical("prepared vs per-call tile table", &unprepared, &prepared);
    g.write_ids(&mut cu_b, other).unwrap();
    let rewritten = attention_on(&g, &qkv, &dout, &cu_b, other, GQA_64, None);
    let r = attention(&CpuBackend::<f32>::new(), &qkv, &dout, other, GQA_64);
    compare("segments rewritten after prepare_segments", &rewritten, &r, GQA_64);
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn flash_atomic_dq_single_sequences() {
    for (i, t) in [1u32, 17, 1000, 2048, 4096].into_iter().enumerate() {
        against_cpu_dq(MHA_64, &[0, t], 800 + i as u64, FlashDq::Atomic);
    }
    for (i, t) in [1u32, 17, 1000, 2048].into_iter().enumerate() {
        against_cpu_dq(MHA_128, &[0, t], 810 + i as u64, FlashDq::Atomic);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn flash_atomic_dq_packed_grouped_kv() {
    against_cpu_dq(GQA_64, PACKED, 820, FlashDq::Atomic);
    against_cpu_dq(MQA_64, PACKED, 821, FlashDq::Atomic);
    against_cpu_dq(GQA_128, PACKED, 822, FlashDq::Atomic);
}

/// The atomic path needs a zero accumulator before each launch: flash_dq_convert leaves it zero,
/// and the backend clears what an ordered launch left in it. An ordered call, then two atomic
/// calls: the atomic ones agree with each other and with the ordered one (a stale accumulator
/// would add a whole dQ), dK and dV are the ordered path's bits, and dQ is within tolerance.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn flash_atomic_dq_leaves_the_accumulator_zero() {
    for (heads, seed) in [(GQA_64, 830), (GQA_128, 831)] {
        let Some(g) = tensor_core_gpu(heads.head_dim) else { return };
        let n = *PACKED.last().unwrap() as usize;
        let (qkv, dout) = inputs(n, heads, seed);
        let ordered = attention(&g, &qkv, &dout, PACKED, heads);
        g.set_flash_dq(FlashDq::Atomic);
        assert_eq!(g.flash_dq(), FlashDq::Atomic);
        let first = attention(&g, &qkv, &dout, PACKED, heads);
        let second = attention(&g, &qkv, &dout, PACKED, heads);
        let hd = heads.head_dim;
        compare(&format!("atomic dQ, first call vs ordered, hd {hd}"), &first, &ordered, heads);
        compare(&format!("atomic dQ, second call vs first, hd {hd}"), &second, &first, heads);
        let (qw, width) = (heads.q_width(), heads.qkv_width());
        let kv = |v: &[f32]| -> Vec<u32> {
            v.chunks(width).flat_map(|r| r[qw..].iter().map(|x| x.to_bits())).collect()
        };
        assert!(
            kv(&first[2]) == kv(&ordered[2]),
            "hd {hd}: dk/dv of the atomic path differ from the ordered path"
        );
        // Back to ordered: still deterministic after atomic calls.
        g.set_flash_dq(FlashDq::Ordered);
        let again = attention(&g, &qkv, &dout, PACKED, heads);
        assert_identical(&format!("ordered after atomic, hd {hd}"), &ordered, &again);
    }
}

/// The atomic path at the 1.3B's shape (32 heads of 64 over rows of 2048; warps of 32 keys over
/// q tiles of 32, where the ordered backward runs warps of 16 over q tiles of 64): within the
/// tolerance of the ordered result, run after run, with dK and dV the ordered path's bits.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn flash_atomic_dq_at_scale() {
    let mha_32 = HeadShape { n_heads: 32, n_kv_heads: 32, head_dim: 64 };
    let Some(g) = tensor_core_gpu(64) else { return };
    let cu = [0u32, 2048, 4096, 6144, 8192];
    let (qkv, dout) = inputs(8192, mha_32, 850);
    let ordered = attention(&g, &qkv, &dout, &cu, mha_32);
    g.set_flash_dq(FlashDq::Atomic);
    let width = mha_32.qkv_width();
    let kv = |v: &[f32]| -> Vec<u32> {
        v.chunks(width).flat_map(|r| r[mha_32.q_width()..].iter().map(|x| x.to_bits())).collect()
    };
    for run in 0..2 {
        let got = attention(&g, &qkv, &dout, &cu, mha_32);
        compare(&format!("atomic vs ordered at scale, run {run}"), &got, &ordered, mha_32);
        assert!(
            kv(&got[2]) == kv(&ordered[2]),
            "run {run}: dk/dv of the atomic path differ from the ordered path"
        );
    }
}

/// The deferred ordered paths (`FlashDq::Deferred`: each partial added one iteration later, in
/// warps of 32 keys for head_dim 64; `FlashDq::DeferredQ64`: the same in the ordered kernel's
/// warps of 16 keys over q tiles of 64) add the same partials in the same order as the default:
/// the same bits, on the at-scale shape and packed batches with grouped KV heads, run after run,
/// and an ordered run after them still gives them (their semaphores were left at zero).
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn flash_deferred_dq_gives_the_ordered_bits() {
    let mha_32 = HeadShape { n_heads: 32, n_kv_heads: 32, head_dim: 64 };
    let gqa_128 = HeadShape { n_heads: 16, n_kv_heads: 4, head_dim: 128 };
    for (heads, cu, seed) in [
        (mha_32, vec![0u32, 2048, 4096, 6144, 8192], 860),
        (GQA_64, PACKED.to_vec(), 861),
        (MQA_64, PACKED.to_vec(), 862),
        (gqa_128, PACKED.to_vec(), 863),
    ] {
        let Some(g) = tensor_core_gpu(heads.head_dim) else { return };
        let n = *cu.last().unwrap() as usize;
        let (qkv, dout) = inputs(n, heads, seed);
        let ordered = attention(&g, &qkv, &dout, &cu, heads);
        for mode in [FlashDq::Deferred, FlashDq::DeferredQ64] {
            g.set_flash_dq(mode);
            for run in 0..2 {
                let deferred = attention(&g, &qkv, &dout, &cu, heads);
                assert_identical(
                    &format!("{} vs ordered, hd {} run {run}", mode.name(), heads.head_dim),
                    &ordered,
                    &deferred,
                );
            }
        }
        g.set_flash_dq(FlashDq::Ordered);
        let again = attention(&g, &qkv, &dout, &cu, heads);
        assert_identical(&format!("ordered after deferred, hd {}", heads.head_dim), &ordered, &again);
    }
}

/// The wgmma kernels (head_dim 64: the forward and the ordered backward) against the CPU at the
/// mma kernels' shapes: single sequences, packed rows, grouped KV heads, many short segments;
/// then the backward twice at scale, bit-identical, the deferred-q64 sum to the same bits, and
/// the atomic one against the CPU. Only compute capability 9.0 has them;
/// elsewhere asking for them is an error, and the test says it skipped.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn flash_wgmma_against_cpu() {
    let Some(g) = tensor_core_gpu(64) else { return };
    if g.compute_capability() != (9, 0) {
        assert!(g.set_flash_mma(FlashMma::Wgmma).is_err());
        eprintln!(
            "skipped: the wgmma kernels need compute capability 9.0 (this device: {:?})",
            g.compute_capability()
        );
        return;
    }
    g.set_flash_mma(FlashMma::Wgmma).unwrap();
    let short: Vec<u32> = (0..=40).map(|i| i * 7).collect();
    for (heads, cu, seed) in [
        (MHA_64, vec![0u32, 1], 900),
        (MHA_64, vec![0, 17], 901),
        (MHA_64, vec![0, 1000], 902),
        (MHA_64, vec![0, 4096], 903),
        (GQA_64, PACKED.to_vec(), 904),
        (MQA_64, PACKED.to_vec(), 905),
        (GQA_64, short, 906),
    ] {
        against_cpu_on(&g, heads, &cu, seed);
    }
    let mha_32 = HeadShape { n_heads: 32, n_kv_heads: 32, head_dim: 64 };
    let cu = [0u32, 2048, 4096, 6144, 8192];
    let (qkv, dout) = inputs(8192, mha_32, 907);
    let first = attention(&g, &qkv, &dout, &cu, mha_32);
    let again = attention(&g, &qkv, &dout, &cu, mha_32);
    assert_identical("wgmma, hd 64 at scale", &first, &again);
    // The deferred sums on wgmma: the ordered wgmma kernel's bits.
    g.set_flash_dq(FlashDq::DeferredQ64);
    let deferred = attention(&g, &qkv, &dout, &cu, mha_32);
    assert_identical("wgmma deferred-q64 vs ordered, hd 64 at scale", &first, &deferred);
    against_cpu_on(&g, GQA_64, PACKED, 908);
    // The atomic adds on wgmma: against the CPU (no bits to keep).
    g.set_flash_dq(FlashDq::Atomic);
    against_cpu_on(&g, GQA_64, PACKED, 909);
    against_cpu_on(&g, MHA_64, &[0, 4096], 910);
}

/// The backward with RoPE's inverse rotation folded in (the flash kernels rotate dK and dQ as
/// they write them; after the scalar kernels a rope pass rotates both) against the CPU's backward followed by
/// rope_backward: both pairings, head_dim 64 and 128, every dQ sum, the scalar path, and the
/// wgmma kernels on compute capability 9.0. The ordered and deferred sums keep their common bits.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn flash_backward_with_rope_against_cpu() {
    // Short rows: 1 token, partial and exact tiles, q tiles summed over 2 and 3 key tiles (a
    // small CPU reference keeps the test's time to its runs on the GPU).
    const CU: &[u32] = &[0, 1, 18, 82, 210, 339, 639];
    let cpu = CpuBackend::<f32>::new();
    for (heads, seed) in [(GQA_64, 950u64), (GQA_128, 960)] {
        let Some(g) = tensor_core_gpu(heads.head_dim) else { return };
        let n = *CU.last().unwrap() as usize;
        for (k, style) in [RopeStyle::AdjacentPairs, RopeStyle::HalfSplit].into_iter().enumerate() {
            let (qkv, dout) = inputs(n, heads, seed + k as u64);
            let r = attention_rope(&cpu, &qkv, &dout, CU, heads, Some(style));
            let mut runs = vec![(FlashMma::Mma, FlashDq::Ordered), (FlashMma::Mma, FlashDq::Deferred)];
            runs.extend([(FlashMma::Mma, FlashDq::DeferredQ64), (FlashMma::Mma, FlashDq::Atomic)]);
            if heads.head_dim == 64 && g.compute_capability() == (9, 0) {
                runs.extend([(FlashMma::Wgmma, FlashDq::Ordered), (FlashMma::Wgmma, FlashDq::DeferredQ64)]);
                runs.push((FlashMma::Wgmma, FlashDq::Atomic));
            }
            let mut ordered = None;
            for (mma, dq) in runs {
                g.set_flash_mma(mma).unwrap();
                g.set_flash_dq(dq);
                let a = attention_rope(&g, &qkv, &dout, CU, heads, Some(style));
                let tag = format!("rope {style:?}, {} {} dQ, hd {}", mma.name(), dq.name(), heads.head_dim);
                compare(&tag, &a, &r, heads);
                match (&ordered, mma, dq) {
                    (None, FlashMma::Mma, FlashDq::Ordered) => ordered = Some(a),
                    (Some(o), FlashMma::Mma, FlashDq::Deferred | FlashDq::DeferredQ64) => {
                        assert_identical(&format!("{tag} vs ordered"), o, &a)
                    }
                    _ => {}
                }
            }
            g.set_flash_mma(FlashMma::Mma).unwrap();
            g.set_flash_dq(FlashDq::Ordered);
            g.set_attention_path(AttentionPath::Scalar);
            let a = attention_rope(&g, &qkv, &dout, CU, heads, Some(style));
            compare(&format!("rope {style:?}, scalar kernels, hd {}", heads.head_dim), &a, &r, heads);
            g.set_attention_path(AttentionPath::Auto);
        }
    }
}
