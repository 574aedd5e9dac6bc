//! The CPU reference backend's ops: every backward against central finite differences in f64,
//! attention and the lm_head loss against naive full versions, the KV-cache decode against the
//! training forward, dropout's determinism, AdamW's formula, and f32 against f64.
//!
//! Gradient bound: with step h = 1e-5 in f64, central differences are accurate to about
//! h² · |f'''| + ε/h ≈ 1e-10 relative, so an analytic gradient is accepted when
//! `max |analytic − numeric| / max |numeric| ≤ 1e-6`.

// Index loops mirror the formulas of the naive references more plainly than iterator chains.
#![allow(clippy::needless_range_loop)]

use sft::backend::cpu::CpuBackend;
use sft::backend::{
    cross_entropy_sum, group_tokens_by_id, stats, sum_squares_read, AdamW, Backend, BranchGrad, Clip,
    Dropout, GradMode, HeadShape, LossGrads, Precision, Rope, RopeGrad, RopeScaling, RopeStyle, StateDtype,
    STATS_LEN,
};
use sft::rng::{self, Rng};

type B64 = CpuBackend<f64>;

/// Relative bound for analytic against finite-difference gradients (see the module docs).
const FD_BOUND: f64 = 1e-6;
/// Relative bound for f32 results against f64 ones on the same data.
const F32_BOUND: f64 = 1e-4;
const FD_STEP: f64 = 1e-5;

fn random(rng: &mut Rng, len: usize) -> Vec<f64> {
    // Bounded away from zero so no element sits on a kink or makes a gradient vanish.
    (0..len)
        .map(|_| {
            let v = rng.normal() * 0.7;
            if v.abs() < 0.05 {
                v + 0.1
            } else {
                v
            }
        })
        .collect()
}

/// `max |a − b| / max |b|` (`b` is the reference).
fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-300);
    a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Checks `analytic` against central differences of `loss` with respect to `x`, asserts the
/// bound and returns the error.
fn fd_check(name: &str, analytic: &[f64], x: &[f64], mut loss: impl FnMut(&[f64]) -> f64) -> f64 {
    let mut probe = x.to_vec();
    let numeric: Vec<f64> = (0..x.len())
        .map(|k| {
            probe[k] = x[k] + FD_STEP;
            let up = loss(&probe);
            probe[k] = x[k] - FD_STEP;
            let down = loss(&probe);
            probe[k] = x[k];
            (up - down) / (2.0 * FD_STEP)
        })
        .collect();
    let err = rel_err(analytic, &numeric);
    eprintln!("{name}: relative error {err:.2e}");
    assert!(err <= FD_BOUND, "{name}: gradient relative error {err:e} > {FD_BOUND:e}");
    err
}

/// The rotation table of `positions` on the f64 CPU backend.
fn rope_table(be: &B64, positions: &[u32], head_dim: usize, rope: Rope) -> Vec<f64> {
    let mut table = vec![f64::NAN; positions.len() * head_dim];
    be.rope_table(&mut table, &positions.to_vec(), positions.len(), head_dim, rope).unwrap();
    table
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn sub(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

#[test]
fn embedding_backward_matches_finite_differences() {
    let be = B64::new();
    let mut rng = Rng::new(1);
    let (vocab, d, n) = (7, 5, 9);
    let ids: Vec<u32> = vec![3, 0, 3, 6, 1, 3, 0, 2, 5];
    let table = random(&mut rng, vocab * d);
    let r = random(&mut rng, n * d);
    let forward = |t: &[f64]| {
        let mut out = vec![0.0; n * d];
        be.embedding_forward(&mut out, &ids, &t.to_vec(), n, d).unwrap();
        dot(&out, &r)
    };
    let prior = random(&mut rng, vocab * d);
    let mut dtable = prior.clone();
    let (groups, n_groups) = group_tokens_by_id(&ids);
    be.embedding_backward(&mut dtable, &groups, n_groups, &r, n, d, GradMode::Accumulate).unwrap();
    fd_check("embedding dtable", &sub(&dtable, &prior), &table, forward);
    // Overwrite: the same gradient whatever the table held, rows of absent ids (4) zero.
    let mut fresh = vec![f64::NAN; vocab * d];
    be.embedding_backward(&mut fresh, &groups, n_groups, &r, n, d, GradMode::Overwrite).unwrap();
    assert!(rel_err(&fresh, &sub(&dtable, &prior)) < 1e-14);
    assert!(fresh[4 * d..5 * d].iter().all(|&v| v == 0.0));
    // A grouping that names a row outside the table is an error.
    let mut bad_groups = groups.clone();
    *bad_groups.last_mut().unwrap() = vocab as u32;
    assert!(be.embedding_backward(&mut fresh, &bad_groups, n_groups, &r, n, d, GradMode::Overwrite).is_err());
    let bad = vec![vocab as u32; n];
    assert!(be.embedding_forward(&mut vec![0.0; n * d], &bad, &table, n, d).is_err());
}

#[test]
fn rmsnorm_backward_matches_finite_differences() {
    let be = B64::new();
    let mut rng = Rng::new(2);
    let (n, d, eps) = (5, 7, 1e-5f32);
    let (x, w, r) = (random(&mut rng, n * d), random(&mut rng, d), random(&mut rng, n * d));
    let loss = |x: &[f64], w: &[f64]| {
        let (mut out, mut rstd) = (vec![0.0; n * d], vec![0.0; n]);
        be.rmsnorm_forward(&mut out, &mut rstd, &x.to_vec(), &w.to_vec(), n, d, eps).unwrap();
        dot(&out, &r)
    };
    let (mut out, mut rstd) = (vec![0.0; n * d], vec![0.0; n]);
    be.rmsnorm_forward(&mut out, &mut rstd, &x, &w, n, d, eps).unwrap();
    let (dx_prior, dw_prior) = (random(&mut rng, n * d), random(&mut rng, d));
    let (mut dx, mut dw) = (dx_prior.clone(), dw_prior.clone());
    be.rmsnorm_backward(&mut dx, &mut dw, &r, &x, &w, &rstd, n, d, None).unwrap();
    fd_check("rmsnorm dx", &sub(&dx, &dx_prior), &x, |x| loss(x, &w));
    fd_check("rmsnorm dw", &sub(&dw, &dw_prior), &w, |w| loss(&x, w));

    // With a branch, the same dx and dw, and the branch gets dropout(dx) with the mask of
    // the dropout op.
    let mask = Dropout { p: 0.3, seed: 41 };
    let (mut dx2, mut dw2, mut branch) = (dx_prior.clone(), dw_prior.clone(), vec![f64::NAN; n * d]);
    let out = BranchGrad { out: &mut branch, dropout: mask };
    be.rmsnorm_backward(&mut dx2, &mut dw2, &r, &x, &w, &rstd, n, d, Some(out)).unwrap();
    assert_eq!((&dx2, &dw2), (&dx, &dw));
    let mut want = dx.clone();
    be.dropout(&mut want, n * d, mask.p, mask.seed).unwrap();
    assert_eq!(branch, want);
    assert!(branch.contains(&0.0) && branch.iter().any(|&v| v != 0.0));
    let bad = BranchGrad { out: &mut branch, dropout: Dropout { p: 1.0, seed: 1 } };
    assert!(be.rmsnorm_backward(&mut dx2, &mut dw2, &r, &x, &w, &rstd, n, d, Some(bad)).is_err());

    // The fused residual form is the sum followed by the same norm.
    let delta = random(&mut rng, n * d);
    let (mut x_out, mut out2, mut rstd2) = (vec![0.0; n * d], vec![0.0; n * d], vec![0.0; n]);
    be.residual_rmsnorm_forward(&mut x_out, &mut out2, &mut rstd2, &x, &delta, &w, n, d, eps, None).unwrap();
    let sum: Vec<f64> = x.iter().zip(&delta).map(|(a, b)| a + b).collect();
    assert_eq!(x_out, sum);
    let (mut out3, mut rstd3) = (vec![0.0; n * d], vec![0.0; n]);
    be.rmsnorm_forward(&mut out3, &mut rstd3, &sum, &w, n, d, eps).unwrap();
    assert_eq!((&out2, &rstd2), (&out3, &rstd3));

    // With dropout: the sum of x and dropout(delta), delta itself untouched.
    let (mut x_out, mut out2, mut rstd2) = (vec![0.0; n * d], vec![0.0; n * d], vec![0.0; n]);
    let delta_before = delta.clone();
    be.residual_rmsnorm_forward(&mut x_out, &mut out2, &mut rstd2, &x, &delta, &w, n, d, eps, Some(mask))
        .unwrap();
    assert_eq!(delta, delta_before);
    let mut dropped = delta.clone();
    be.dropout(&mut dropped, n * d, mask.p, mask.seed).unwrap();
    let sum: Vec<f64> = x.iter().zip(&dropped).map(|(a, b)| a + b).collect();
    assert_eq!(x_out, sum);
    be.rmsnorm_forward(&mut out3, &mut rstd3, &sum, &w, n, d, eps).unwrap();
    assert_eq!((&out2, &rstd2), (&out3, &rstd3));
    // p = 0 is the plain sum.
    let zero = Some(Dropout { p: 0.0, seed: 5 });
    be.residual_rmsnorm_forward(&mut x_out, &mut out2, &mut rstd2, &x, &delta, &w, n, d, eps, zero).unwrap();
    assert_eq!(x_out, x.iter().zip(&delta).map(|(a, b)| a + b).collect::<Vec<_>>());
}

#[test]
fn matmul_backward_matches_finite_differences() {
    let be = B64::new();
    let mut rng = Rng::new(3);
    let (n, i, o) = (5, 7, 3);
    let (inp, w, r) = (random(&mut rng, n * i), random(&mut rng, o * i), random(&mut rng, n * o));
    let loss = |inp: &[f64], w: &[f64]| {
        let mut out = vec![0.0; n * o];
        be.matmul_forward(&mut out, &inp.to_vec(), &w.to_vec(), n, i, o).unwrap();
        dot(&out, &r)
    };
    // Forward against the definition.
    let mut out = vec![0.0; n * o];
    be.matmul_forward(&mut out, &inp, &w, n, i, o).unwrap();
    for a in 0..n {
        for b in 0..o {
            let want = dot(&inp[a * i..(a + 1) * i], &w[b * i..(b + 1) * i]);
            assert!((out[a * o + b] - want).abs() < 1e-12);
        }
    }
    let dw_prior = random(&mut rng, o * i);
    let (mut dinp, mut dw) = (vec![7.0; n * i], dw_prior.clone());
    be.matmul_backward(Some(&mut dinp), &mut dw, &r, &inp, &w, n, i, o, GradMode::Accumulate).unwrap();
    fd_check("matmul dinp", &dinp, &inp, |x| loss(x, &w));
    fd_check("matmul dw", &sub(&dw, &dw_prior), &w, |w| loss(&inp, w));
    let mut dw2 = dw_prior.clone();
    be.matmul_backward(None, &mut dw2, &r, &inp, &w, n, i, o, GradMode::Accumulate).unwrap();
    assert!(rel_err(&dw2, &dw) < 1e-14);
    // Overwrite (beta = 0): the gradient alone, whatever dw held (NaN is not read).
    let mut dw3 = vec![f64::NAN; o * i];
    be.matmul_backward(None, &mut dw3, &r, &inp, &w, n, i, o, GradMode::Overwrite).unwrap();
    assert!(rel_err(&dw3, &sub(&dw, &dw_prior)) < 1e-13);
    // Without rows the overwritten gradient is zero.
    be.matmul_backward(None, &mut dw3, &r, &inp, &w, 0, i, o, GradMode::Overwrite).unwrap();
    assert!(dw3.iter().all(|&v| v == 0.0));
}

#[test]
fn rope_backward_matches_finite_differences_in_both_styles() {
    let be = B64::new();
    let heads = HeadShape { n_heads: 4, n_kv_heads: 2, head_dim: 6 };
    let (n, w) = (6, heads.qkv_width());
    let positions: Vec<u32> = vec![0, 1, 2, 0, 1, 37];
    let llama3 = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 32,
    };
    let cases = [
        Rope::plain(10_000.0, RopeStyle::AdjacentPairs),
        Rope::plain(10_000.0, RopeStyle::HalfSplit),
        Rope { theta: 10_000.0, style: RopeStyle::HalfSplit, scaling: Some(llama3) },
        Rope {
            theta: 500.0,
            style: RopeStyle::AdjacentPairs,
            scaling: Some(RopeScaling::Linear { factor: 2.0 }),
        },
    ];
    for (s, rope) in cases.into_iter().enumerate() {
        let mut rng = Rng::new(4 + s as u64);
        let (qkv, r) = (random(&mut rng, n * w), random(&mut rng, n * w));
        let table = rope_table(&be, &positions, heads.head_dim, rope);
        let loss = |x: &[f64]| {
            let mut x = x.to_vec();
            be.rope_forward(&mut x, &table, n, heads, rope.style).unwrap();
            dot(&x, &r)
        };
        let mut grad = r.clone();
        be.rope_backward(&mut grad, &table, n, heads, rope.style).unwrap();
        fd_check(&format!("rope {rope:?}"), &grad, &qkv, loss);
        // The table holds cos and sin of the f32 angle position · inv_freq.
        for (i, &pos) in positions.iter().enumerate() {
            for j in 0..heads.head_dim / 2 {
                let angle = (pos as f32 * rope.inv_freq(j, heads.head_dim)) as f64;
                let at = i * heads.head_dim + 2 * j;
                assert_eq!((table[at], table[at + 1]), (angle.cos(), angle.sin()));
            }
        }
        // The v part is untouched and position 0 is the identity.
        let mut rotated = qkv.clone();
        be.rope_forward(&mut rotated, &table, n, heads, rope.style).unwrap();
        for row in 0..n {
            let (a, b) = (row * w, (row + 1) * w);
            assert_eq!(rotated[a + w - heads.kv_width()..b], qkv[a + w - heads.kv_width()..b]);
            if positions[row] == 0 {
                assert_eq!(rotated[a..b], qkv[a..b]);
            }
        }
    }
    // The two styles pair different dimensions.
    let mut rng = Rng::new(9);
    let qkv = random(&mut rng, n * w);
    let (mut a, mut b) = (qkv.clone(), qkv.clone());
    let table = rope_table(&be, &positions, heads.head_dim, Rope::plain(10_000.0, RopeStyle::AdjacentPairs));
    be.rope_forward(&mut a, &table, n, heads, RopeStyle::AdjacentPairs).unwrap();
    be.rope_forward(&mut b, &table, n, heads, RopeStyle::HalfSplit).unwrap();
    assert!(rel_err(&a, &b) > 1e-3);
}

/// Llama 3's scaling (transformers' `_compute_llama3_parameters`): wavelengths shorter than
/// original / high_freq_factor keep their frequency, longer than original / low_freq_factor are
/// divided by the factor, and the blend between meets both ends.
#[test]
fn llama3_frequencies_keep_short_waves_and_stretch_long_ones() {
    let (hd, theta) = (64, 500_000.0);
    let (factor, low, high, original) = (32.0, 1.0, 4.0, 8192);
    let llama3 = RopeScaling::Llama3 {
        factor,
        low_freq_factor: low,
        high_freq_factor: high,
        original_max_position_embeddings: original,
    };
    let plain = Rope::plain(theta, RopeStyle::HalfSplit);
    let scaled = Rope { scaling: Some(llama3), ..plain };
    let (mut kept, mut stretched, mut blended) = (0, 0, 0);
    for j in 0..hd / 2 {
        let (f, g) = (plain.inv_freq(j, hd) as f64, scaled.inv_freq(j, hd) as f64);
        let wavelen = 2.0 * std::f64::consts::PI / f;
        if wavelen < original as f64 / high as f64 {
            assert_eq!(f, g, "pair {j}");
            kept += 1;
        } else if wavelen > original as f64 / low as f64 {
            assert!((g - f / factor as f64).abs() <= 1e-6 * g, "pair {j}: {g} vs {f} / {factor}");
            stretched += 1;
        } else {
            assert!(g < f && g > f / factor as f64, "pair {j}: {g} not between {f} / {factor} and {f}");
            blended += 1;
        }
    }
    // Llama 3.2's numbers put pairs in all three regions.
    assert!(kept > 0 && stretched > 0 && blended > 0, "{kept} {stretched} {blended}");
    let linear = Rope { scaling: Some(RopeScaling::Linear { factor: 4.0 }), ..plain };
    assert_eq!(linear.inv_freq(3, hd), (plain.inv_freq(3, hd) as f64 / 4.0) as f32);
}

/// Segments of lengths 4, 1 and 6, and the heads of the GQA and MQA cases.
const CU: [u32; 4] = [0, 4, 5, 11];
const GQA: HeadShape = HeadShape { n_heads: 4, n_kv_heads: 2, head_dim: 3 };
const MQA: HeadShape = HeadShape { n_heads: 3, n_kv_heads: 1, head_dim: 5 };

fn attention(be: &B64, qkv: &[f64], cu: &[u32], n: usize, heads: HeadShape) -> (Vec<f64>, Vec<f64>) {
    let (mut out, mut lse) = (vec![0.0; n * heads.q_width()], vec![0.0; n * heads.n_heads]);
    be.attention_forward(&mut out, &mut lse, &qkv.to_vec(), &cu.to_vec(), cu.len() - 1, n, heads).unwrap();
    (out, lse)
}

/// Full-matrix softmax attention: scores of every (query, key) pair, masked to the causal part
/// of the query's segment.
fn naive_attention(qkv: &[f64], cu: &[u32], n: usize, heads: HeadShape) -> (Vec<f64>, Vec<f64>) {
    let (hd, w, qw, kvw) = (heads.head_dim, heads.qkv_width(), heads.q_width(), heads.kv_width());
    let seg = |i: usize| cu.windows(2).position(|p| p[0] as usize <= i && i < p[1] as usize).unwrap();
    let (mut out, mut lse) = (vec![0.0; n * qw], vec![0.0; n * heads.n_heads]);
    for h in 0..heads.n_heads {
        let g = h / (heads.n_heads / heads.n_kv_heads);
        for i in 0..n {
            let scores: Vec<f64> = (0..n)
                .map(|j| {
                    if seg(j) != seg(i) || j > i {
                        f64::NEG_INFINITY
                    } else {
                        let q = &qkv[i * w + h * hd..i * w + (h + 1) * hd];
                        dot(q, &qkv[j * w + qw + g * hd..j * w + qw + (g + 1) * hd]) / (hd as f64).sqrt()
                    }
                })
                .collect();
            let z: f64 = scores.iter().map(|s| s.exp()).sum();
            lse[h * n + i] = z.ln();
            for j in 0..n {
                let p = scores[j].exp() / z;
                for e in 0..hd {
                    out[i * qw + h * hd + e] += p * qkv[j * w + qw + kvw + g * hd + e];
                }
            }
        }
    }
    (out, lse)
}

#[test]
fn attention_forward_matches_full_softmax() {
    let be = B64::new();
    for (k, (heads, cu)) in [(GQA, &CU[..]), (MQA, &[0, 7][..])].into_iter().enumerate() {
        let n = *cu.last().unwrap() as usize;
        let qkv = random(&mut Rng::new(20 + k as u64), n * heads.qkv_width());
        let (out, lse) = attention(&be, &qkv, cu, n, heads);
        let (want_out, want_lse) = naive_attention(&qkv, cu, n, heads);
        assert!(rel_err(&out, &want_out) < 1e-12, "out {heads:?}");
        assert!(rel_err(&lse, &want_lse) < 1e-12, "lse {heads:?}");
    }
}

#[test]
fn attention_backward_matches_finite_differences() {
    let be = B64::new();
    for (k, (heads, cu)) in [(GQA, &CU[..]), (MQA, &[0, 7][..])].into_iter().enumerate() {
        let n = *cu.last().unwrap() as usize;
        let mut rng = Rng::new(30 + k as u64);
        let qkv = random(&mut rng, n * heads.qkv_width());
        let r = random(&mut rng, n * heads.q_width());
        let (out, lse) = attention(&be, &qkv, cu, n, heads);
        let mut dqkv = vec![5.0; n * heads.qkv_width()];
        be.attention_backward(&mut dqkv, &r, &qkv, &out, &lse, &cu.to_vec(), cu.len() - 1, n, heads, None)
            .unwrap();
        fd_check(&format!("attention dqkv {heads:?}"), &dqkv, &qkv, |x| {
            dot(&attention(&be, x, cu, n, heads).0, &r)
        });
    }
}

#[test]
fn attention_rejects_bad_segments() {
    let be = B64::new();
    let n = 11;
    let qkv = vec![0.1; n * GQA.qkv_width()];
    let (mut out, mut lse) = (vec![0.0; n * GQA.q_width()], vec![0.0; n * GQA.n_heads]);
    assert!(be.attention_forward(&mut out, &mut lse, &qkv, &vec![0, 4, 10], 2, n, GQA).is_err());
    assert!(be.attention_forward(&mut out, &mut lse, &qkv, &vec![0, 6, 4, 11], 3, n, GQA).is_err());
    let odd = HeadShape { n_heads: 3, n_kv_heads: 2, head_dim: 3 };
    assert!(be.attention_forward(&mut out, &mut lse, &qkv, &CU.to_vec(), 3, n, odd).is_err());
}

#[test]
fn attention_decode_equals_forward_rows() {
    let be = B64::new();
    let heads = GQA;
    let n = 9;
    let qkv = random(&mut Rng::new(40), n * heads.qkv_width());
    let (want, _) = attention(&be, &qkv, &[0, n as u32], n, heads);
    let (mut k_cache, mut v_cache) = (vec![0.0; 12 * heads.kv_width()], vec![0.0; 12 * heads.kv_width()]);
    let mut got = Vec::new();
    for (start, n_new) in [(0, 4), (4, 1), (5, 4)] {
        let rows = qkv[start * heads.qkv_width()..(start + n_new) * heads.qkv_width()].to_vec();
        let mut out = vec![0.0; n_new * heads.q_width()];
        be.attention_decode(&mut out, &rows, &mut k_cache, &mut v_cache, start, n_new, heads).unwrap();
        got.extend(out);
    }
    let err = rel_err(&got, &want);
    eprintln!("attention_decode vs forward: relative error {err:.2e}");
    assert!(err <= 1e-14);
}

#[test]
fn swiglu_backward_matches_finite_differences() {
    let be = B64::new();
    let mut rng = Rng::new(50);
    let (n, hidden) = (4, 5);
    let (gu, r) = (random(&mut rng, n * 2 * hidden), random(&mut rng, n * hidden));
    let loss = |x: &[f64]| {
        let mut out = vec![0.0; n * hidden];
        be.swiglu_forward(&mut out, &x.to_vec(), n, hidden).unwrap();
        dot(&out, &r)
    };
    let mut dgu = vec![3.0; n * 2 * hidden];
    be.swiglu_backward(&mut dgu, &r, &gu, n, hidden).unwrap();
    fd_check("swiglu dgate_up", &dgu, &gu, loss);
}

/// Row by row, every vocabulary logit, no chunking: (loss sum, dx, dw added to zeros).
fn naive_lm_head(
    x: &[f64],
    w: &[f64],
    targets: &[u32],
    ignore: u32,
    d: usize,
    vocab: usize,
) -> (f64, Vec<f64>, Vec<f64>) {
    let n = targets.len();
    let (mut loss, mut dx, mut dw) = (0.0, vec![0.0; n * d], vec![0.0; vocab * d]);
    for i in 0..n {
        if targets[i] == ignore {
            continue;
        }
        let z: Vec<f64> = (0..vocab).map(|v| dot(&x[i * d..(i + 1) * d], &w[v * d..(v + 1) * d])).collect();
        let lse = z.iter().map(|v| v.exp()).sum::<f64>().ln();
        loss += lse - z[targets[i] as usize];
        for v in 0..vocab {
            let g = (z[v] - lse).exp() - if v == targets[i] as usize { 1.0 } else { 0.0 };
            for e in 0..d {
                dx[i * d + e] += g * w[v * d + e];
                dw[v * d + e] += g * x[i * d + e];
            }
        }
    }
    (loss, dx, dw)
}

#[allow(clippy::too_many_arguments)]
fn lm_head(
    be: &B64,
    x: &[f64],
    w: &[f64],
    targets: &[u32],
    ignore: u32,
    d: usize,
    vocab: usize,
    dw: &mut Vec<f64>,
    scale: f32,
) -> (f64, Vec<f64>) {
    let n = targets.len();
    let mut dx = vec![9.0; n * d];
    let grads = LossGrads { dx: &mut dx, dw, loss_scale: scale, mode: GradMode::Accumulate };
    let loss =
        cross_entropy_sum(be, &x.to_vec(), &w.to_vec(), targets, ignore, n, d, vocab, Some(grads)).unwrap();
    (loss, dx)
}

#[test]
fn lm_head_cross_entropy_matches_finite_differences() {
    let be = B64::new();
    let mut rng = Rng::new(60);
    let (n, d, vocab, ignore) = (9, 6, 11, 4u32);
    let targets: Vec<u32> = vec![1, 4, 10, 0, 4, 4, 7, 2, 9];
    let (x, w) = (random(&mut rng, n * d), random(&mut rng, vocab * d));
    let loss = |x: &[f64], w: &[f64]| {
        cross_entropy_sum(&be, &x.to_vec(), &w.to_vec(), &targets, ignore, n, d, vocab, None).unwrap()
    };
    let dw_prior = random(&mut rng, vocab * d);
    let mut dw = dw_prior.clone();
    let (l, dx) = lm_head(&be, &x, &w, &targets, ignore, d, vocab, &mut dw, 1.0);
    assert!((l - loss(&x, &w)).abs() < 1e-12, "loss with and without grads");
    fd_check("lm_head dx", &dx, &x, |x| loss(x, &w));
    fd_check("lm_head dw", &sub(&dw, &dw_prior), &w, |w| loss(&x, w));
    for i in (0..n).filter(|&i| targets[i] == ignore) {
        assert!(dx[i * d..(i + 1) * d].iter().all(|&v| v == 0.0), "unsupervised row {i} has a gradient");
    }
    // Gradients scale with loss_scale; the loss does not.
    let mut dw_half = dw_prior.clone();
    let (l_half, dx_half) = lm_head(&be, &x, &w, &targets, ignore, d, vocab, &mut dw_half, 0.25);
    assert_eq!(l_half, l);
    let quarter = |v: &[f64]| v.iter().map(|g| 0.25 * g).collect::<Vec<_>>();
    assert!(rel_err(&dx_half, &quarter(&dx)) < 1e-14);
    assert!(rel_err(&sub(&dw_half, &dw_prior), &quarter(&sub(&dw, &dw_prior))) < 1e-12);
    // Overwrite: dw is the gradient alone, whatever it held.
    let mut dw_fresh = vec![f64::NAN; vocab * d];
    let mut dx_fresh = vec![0.0; n * d];
    let grads =
        LossGrads { dx: &mut dx_fresh, dw: &mut dw_fresh, loss_scale: 1.0, mode: GradMode::Overwrite };
    cross_entropy_sum(&be, &x, &w, &targets, ignore, n, d, vocab, Some(grads)).unwrap();
    assert!(rel_err(&dw_fresh, &sub(&dw, &dw_prior)) < 1e-13);
    // ... and zero when no row is supervised.
    let grads =
        LossGrads { dx: &mut dx_fresh, dw: &mut dw_fresh, loss_scale: 1.0, mode: GradMode::Overwrite };
    assert_eq!(
        cross_entropy_sum(&be, &x, &w, &vec![ignore; n], ignore, n, d, vocab, Some(grads)).unwrap(),
        0.0
    );
    assert!(dw_fresh.iter().all(|&v| v == 0.0));
    // The per-row losses stay in the buffer, in row order.
    let rows: Vec<u32> = (0..n as u32).filter(|&i| targets[i as usize] != ignore).collect();
    let sup: Vec<u32> = rows.iter().map(|&i| targets[i as usize]).collect();
    let mut losses = vec![0.0; rows.len()];
    be.lm_head_cross_entropy(&x, &w, &rows, &sup, rows.len(), n, d, vocab, &mut losses, None).unwrap();
    for (k, &i) in rows.iter().enumerate() {
        let mut only = vec![ignore; n];
        only[i as usize] = targets[i as usize];
        let want = cross_entropy_sum(&be, &x, &w, &only, ignore, n, d, vocab, None).unwrap();
        assert!((losses[k] - want).abs() < 1e-12, "row {i}");
    }
    // A target outside the vocabulary is an error, not a panic.
    assert!(cross_entropy_sum(&be, &x, &w, &vec![vocab as u32; n], ignore, n, d, vocab, None).is_err());
    assert!(be
        .lm_head_cross_entropy(&x, &w, &rows, &vec![vocab as u32; n], 2, n, d, vocab, &mut losses, None)
        .is_err());
}

#[test]
fn lm_head_cross_entropy_matches_naive_over_several_chunks() {
    let be = B64::new();
    let mut rng = Rng::new(61);
    let (n, d, vocab, ignore) = (150, 8, 13, 0u32);
    // About a third of the rows unsupervised, so the supervised rows span several chunks.
    let targets: Vec<u32> =
        (0..n).map(|_| if rng.below(3) == 0 { ignore } else { rng.below(vocab) as u32 }).collect();
    let (x, w) = (random(&mut rng, n * d), random(&mut rng, vocab * d));
    let mut dw = vec![0.0; vocab * d];
    let (loss, dx) = lm_head(&be, &x, &w, &targets, ignore, d, vocab, &mut dw, 1.0);
    let (want_loss, want_dx, want_dw) = naive_lm_head(&x, &w, &targets, ignore, d, vocab);
    assert!((loss - want_loss).abs() <= 1e-12 * want_loss.abs());
    assert!(rel_err(&dx, &want_dx) < 1e-12);
    assert!(rel_err(&dw, &want_dw) < 1e-12);

    // All rows ignored: zero loss, zero dx, dw untouched.
    let none = vec![ignore; n];
    let prior = random(&mut rng, vocab * d);
    let mut dw = prior.clone();
    let (loss, dx) = lm_head(&be, &x, &w, &none, ignore, d, vocab, &mut dw, 1.0);
    assert_eq!(loss, 0.0);
    assert!(dx.iter().all(|&v| v == 0.0));
    assert_eq!(dw, prior);
}

#[test]
fn dropout_is_deterministic_and_its_own_backward() {
    let be = B64::new();
    let mut rng = Rng::new(70);
    let (len, p, seed) = (5000, 0.3f32, 1234);
    let x = random(&mut rng, len);
    let run = |v: &[f64], p: f32, seed: u64| {
        let mut v = v.to_vec();
        be.dropout(&mut v, len, p, seed).unwrap();
        v
    };
    let a = run(&x, p, seed);
    assert_eq!(a, run(&x, p, seed));
    assert_ne!(a, run(&x, p, seed + 1));
    assert_eq!(run(&x, 0.0, seed), x);
    let keep = 1.0 / (1.0 - p as f64);
    let mut dropped = 0;
    for i in 0..len {
        if rng::uniform(seed, i as u64) < p {
            assert_eq!(a[i], 0.0);
            dropped += 1;
        } else {
            assert!((a[i] - x[i] * keep).abs() < 1e-15);
        }
    }
    let share = dropped as f64 / len as f64;
    assert!((share - p as f64).abs() < 0.03, "dropped share {share}");
    // Its own backward: the gradient of sum(dropout(x) · r) is dropout(r).
    let r = random(&mut rng, len);
    let small = 40;
    let loss = |v: &[f64]| {
        let mut full = x.clone();
        full[..small].copy_from_slice(v);
        dot(&run(&full, p, seed), &r)
    };
    fd_check("dropout", &run(&r, p, seed)[..small], &x[..small], loss);
    assert!(be.dropout(&mut x.clone(), len, 1.0, seed).is_err());
}

#[test]
fn adamw_follows_pytorch_and_sum_squares_adds_every_buffer() {
    let be = B64::new();
    let mut rng = Rng::new(80);
    let lens = [7usize, 4];
    let hp0 =
        AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step: 0, grad_scale: 0.5 };
    let mut master: Vec<Vec<f64>> = lens.iter().map(|&l| random(&mut rng, l + 2)).collect();
    let mut params: Vec<Vec<f64>> = lens.iter().map(|&l| vec![0.0; l + 2]).collect();
    let (mut m, mut v): (Vec<Vec<f64>>, Vec<Vec<f64>>) =
        (lens.iter().map(|&l| vec![0.0; l]).collect(), lens.iter().map(|&l| vec![0.0; l]).collect());
    let (mut w_ref, mut m_ref, mut v_ref) = (master.clone(), m.clone(), v.clone());
    for step in 1..=3u64 {
        let hp = AdamW { step, ..hp0 };
        let grads: Vec<Vec<f64>> = lens.iter().map(|&l| random(&mut rng, l)).collect();
        let mut p_refs: Vec<&mut Vec<f64>> = params.iter_mut().collect();
        let mut w_refs: Vec<&mut Vec<f64>> = master.iter_mut().collect();
        let g_refs: Vec<&Vec<f64>> = grads.iter().collect();
        let mut m_refs: Vec<&mut Vec<f64>> = m.iter_mut().collect();
        let mut v_refs: Vec<&mut Vec<f64>> = v.iter_mut().collect();
        be.adamw(
            &mut p_refs,
            &mut w_refs,
            &g_refs,
            &mut m_refs,
            &mut v_refs,
            StateDtype::F32,
            &lens,
            &hp,
            None,
        )
        .unwrap();
        let (b1, b2) = (hp.beta1 as f64, hp.beta2 as f64);
        for t in 0..lens.len() {
            for k in 0..lens[t] {
                let g = grads[t][k] * 0.5;
                w_ref[t][k] *= 1.0 - hp.lr as f64 * hp.weight_decay as f64;
                m_ref[t][k] = b1 * m_ref[t][k] + (1.0 - b1) * g;
                v_ref[t][k] = b2 * v_ref[t][k] + (1.0 - b2) * g * g;
                let mh = m_ref[t][k] / (1.0 - b1.powi(step as i32));
                let vh = v_ref[t][k] / (1.0 - b2.powi(step as i32));
                w_ref[t][k] -= hp.lr as f64 * mh / (vh.sqrt() + hp.eps as f64);
            }
        }
    }
    for t in 0..lens.len() {
        let l = lens[t];
        assert!(rel_err(&master[t][..l], &w_ref[t][..l]) < 1e-12);
        assert!(rel_err(&m[t], &m_ref[t]) < 1e-12 && rel_err(&v[t], &v_ref[t]) < 1e-12);
        assert_eq!(params[t][..l], master[t][..l]);
        assert_eq!(params[t][l..], [0.0, 0.0], "elements past lens are untouched");
    }
    let bufs: Vec<&Vec<f64>> = master.iter().collect();
    let want: f64 = (0..2).map(|t| master[t][..lens[t]].iter().map(|x| x * x).sum::<f64>()).sum();
    assert!((sum_squares_read(&be, &bufs, &lens).unwrap() - want).abs() < 1e-12 * want);
}

/// AdamW with the clip factor read from the statistics buffer: the same update as the host's
/// factor in `grad_scale`, and no update at all when the norm is not finite.
#[test]
fn adamw_clips_by_the_norm_in_the_statistics_buffer() {
    let be = B64::new();
    let mut rng = Rng::new(81);
    let lens = [5usize, 3];
    let grads: Vec<Vec<f64>> = lens.iter().map(|&l| random(&mut rng, l)).collect();
    let master0: Vec<Vec<f64>> = lens.iter().map(|&l| random(&mut rng, l)).collect();
    let g_refs: Vec<&Vec<f64>> = grads.iter().collect();
    let mut st = vec![0.0; STATS_LEN];
    be.sum_squares(&g_refs, &lens, &mut st).unwrap();
    let norm = stats::join(&be.read(&st, STATS_LEN).unwrap(), stats::SUMSQ).sqrt();
    let want_norm: f64 = grads.iter().flatten().map(|g| g * g).sum::<f64>().sqrt();
    assert!((norm - want_norm).abs() < 1e-12 * want_norm);
    let run = |hp: &AdamW, clip: Option<Clip<'_, B64>>| {
        let mut master = master0.clone();
        let mut params: Vec<Vec<f64>> = lens.iter().map(|&l| vec![0.0; l]).collect();
        let (mut m, mut v): (Vec<Vec<f64>>, Vec<Vec<f64>>) =
            (lens.iter().map(|&l| vec![0.0; l]).collect(), lens.iter().map(|&l| vec![0.0; l]).collect());
        let mut p: Vec<&mut Vec<f64>> = params.iter_mut().collect();
        let mut w: Vec<&mut Vec<f64>> = master.iter_mut().collect();
        let mut mm: Vec<&mut Vec<f64>> = m.iter_mut().collect();
        let mut vv: Vec<&mut Vec<f64>> = v.iter_mut().collect();
        be.adamw(&mut p, &mut w, &g_refs, &mut mm, &mut vv, StateDtype::F32, &lens, hp, clip).unwrap();
        (master, m)
    };
    let hp =
        AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step: 1, grad_scale: 1.0 };
    let max_norm = (want_norm / 3.0) as f32;
    let factor = (max_norm as f64 / norm) as f32;
    let on_device = run(&hp, Some(Clip { sumsq: &st, max_norm }));
    let on_host = run(&AdamW { grad_scale: factor, ..hp }, None);
    assert_eq!(on_device, on_host);
    // Under the limit, or without one: no scaling.
    assert_eq!(run(&hp, Some(Clip { sumsq: &st, max_norm: 1e9 })), run(&hp, None));
    assert_eq!(run(&hp, Some(Clip { sumsq: &st, max_norm: 0.0 })), run(&hp, None));
    // A non-finite norm leaves everything as it was.
    let mut nan = st.clone();
    nan[stats::SUMSQ] = f64::NAN;
    let (master, m) = run(&hp, Some(Clip { sumsq: &nan, max_norm }));
    assert_eq!(master, master0);
    assert!(m.iter().flatten().all(|&x| x == 0.0));
}

/// The loss sums: written or added to, split so that the f64 sum comes back whole.
#[test]
fn sum_into_overwrites_or_accumulates_an_f64_sum() {
    let be = CpuBackend::<f32>::new();
    let x: Vec<f32> = (0..10_000).map(|i| 1.0 + (i % 7) as f32 * 1e-3).collect();
    let want: f64 = x.iter().map(|&v| v as f64).sum();
    let mut st = vec![f32::NAN; STATS_LEN];
    be.sum_into(&mut st, stats::STEP_LOSS, &x, x.len(), GradMode::Overwrite).unwrap();
    be.sum_into(&mut st, stats::STEP_LOSS, &x, x.len(), GradMode::Accumulate).unwrap();
    let got = stats::join(&be.read(&st, STATS_LEN).unwrap(), stats::STEP_LOSS);
    assert!((got - 2.0 * want).abs() < 1e-9 * want, "{got} vs {}", 2.0 * want);
    assert!(st[stats::SUMSQ].is_nan(), "other slots untouched");
    assert!(be.sum_into(&mut st, STATS_LEN - 1, &x, x.len(), GradMode::Overwrite).is_err());
}

/// Runs a forward + backward chain of the ops on `CpuBackend<T>` from f32 inputs, returning
/// each result widened to f64, in a fixed order with names.
fn op_results<T: sft::backend::cpu::Real>(inputs: &[Vec<f32>]) -> Vec<(&'static str, Vec<f64>)> {
    let be = CpuBackend::<T>::new();
    let buf = |v: &[f32]| {
        let mut b = be.zeros(v.len(), Precision::Compute).unwrap();
        be.write(&mut b, v).unwrap();
        b
    };
    let get = |b: &Vec<T>| widen(&be.read(b, b.len()).unwrap());
    let (heads, n, d, vocab, hidden) = (GQA, 11, 6, 13, 5);
    let [x, w_norm, w_qkv, dout_att, gate_up, dout_mlp, w_head] = inputs else { panic!("seven inputs") };
    let (x, w_norm, w_qkv) = (buf(x), buf(w_norm), buf(w_qkv));
    let mut results = Vec::new();

    let (mut normed, mut rstd) = (buf(&vec![0.0; n * d]), buf(&vec![0.0; n]));
    be.rmsnorm_forward(&mut normed, &mut rstd, &x, &w_norm, n, d, 1e-5).unwrap();
    let mut qkv = buf(&vec![0.0; n * heads.qkv_width()]);
    be.matmul_forward(&mut qkv, &normed, &w_qkv, n, d, heads.qkv_width()).unwrap();
    let positions: Vec<u32> = vec![0, 1, 2, 3, 0, 0, 1, 2, 3, 4, 5];
    let mut table = be.zeros(n * heads.head_dim, Precision::F32).unwrap();
    be.rope_table(&mut table, &positions, n, heads.head_dim, Rope::plain(10_000.0, RopeStyle::HalfSplit))
        .unwrap();
    be.rope_forward(&mut qkv, &table, n, heads, RopeStyle::HalfSplit).unwrap();
    let (mut att, mut lse) = (buf(&vec![0.0; n * heads.q_width()]), buf(&vec![0.0; n * heads.n_heads]));
    be.attention_forward(&mut att, &mut lse, &qkv, &CU.to_vec(), 3, n, heads).unwrap();
    results.push(("rmsnorm+matmul+rope+attention forward", get(&att)));
    let mut dqkv = buf(&vec![0.0; n * heads.qkv_width()]);
    let rope = Some(RopeGrad { table: &table, style: RopeStyle::HalfSplit });
    be.attention_backward(&mut dqkv, &buf(dout_att), &qkv, &att, &lse, &CU.to_vec(), 3, n, heads, rope)
        .unwrap();
    results.push(("attention+rope backward", get(&dqkv)));
    let (mut dnormed, mut dw_qkv) = (buf(&vec![0.0; n * d]), buf(&vec![0.0; w_qkv.len()]));
    let acc = GradMode::Accumulate;
    be.matmul_backward(Some(&mut dnormed), &mut dw_qkv, &dqkv, &normed, &w_qkv, n, d, heads.qkv_width(), acc)
        .unwrap();
    results.push(("matmul dw", get(&dw_qkv)));
    let (mut dx, mut dw_norm) = (buf(&vec![0.0; n * d]), buf(&vec![0.0; d]));
    be.rmsnorm_backward(&mut dx, &mut dw_norm, &dnormed, &x, &w_norm, &rstd, n, d, None).unwrap();
    results.push(("rmsnorm dx", get(&dx)));
    results.push(("rmsnorm dw", get(&dw_norm)));

    let gate_up = buf(gate_up);
    let mut act = buf(&vec![0.0; n * hidden]);
    be.swiglu_forward(&mut act, &gate_up, n, hidden).unwrap();
    results.push(("swiglu forward", get(&act)));
    let mut dgu = buf(&vec![0.0; 2 * n * hidden]);
    be.swiglu_backward(&mut dgu, &buf(dout_mlp), &gate_up, n, hidden).unwrap();
    results.push(("swiglu backward", get(&dgu)));

    let targets: Vec<u32> = vec![3, 0, 12, 0, 5, 7, 0, 1, 2, 11, 4];
    let (mut dxh, mut dwh) = (buf(&vec![0.0; n * d]), buf(&vec![0.0; vocab * d]));
    let grads = LossGrads { dx: &mut dxh, dw: &mut dwh, loss_scale: 0.1, mode: GradMode::Accumulate };
    let loss = cross_entropy_sum(&be, &normed, &buf(w_head), &targets, 0, n, d, vocab, Some(grads)).unwrap();
    results.push(("lm_head loss", vec![loss]));
    results.push(("lm_head dx", get(&dxh)));
    results.push(("lm_head dw", get(&dwh)));
    results
}

#[test]
fn f32_agrees_with_f64() {
    let mut rng = Rng::new(90);
    let (heads, n, d, vocab, hidden) = (GQA, 11, 6, 13, 5);
    let sizes = [n * d, d, heads.qkv_width() * d, n * heads.q_width(), 2 * n * hidden, n * hidden, vocab * d];
    let inputs: Vec<Vec<f32>> = sizes.iter().map(|&s| to_f32(&random(&mut rng, s))).collect();
    let (lo, hi) = (op_results::<f32>(&inputs), op_results::<f64>(&inputs));
    let mut worst = 0.0f64;
    for ((name, a), (_, b)) in lo.iter().zip(&hi) {
        let err = rel_err(a, b);
        eprintln!("f32 vs f64, {name}: relative error {err:.2e}");
        assert!(err <= F32_BOUND, "{name}: f32 differs from f64 by {err:e} > {F32_BOUND:e}");
        worst = worst.max(err);
    }
    eprintln!("f32 vs f64: worst relative error {worst:.2e}");
}

#[test]
fn attention_spanning_several_row_blocks_matches_naive_and_finite_differences() {
    // The training attention works in blocks of 64 rows: a 130-row segment spans three.
    let be = B64::new();
    let cu: [u32; 4] = [0, 1, 131, 150];
    let (heads, n) = (GQA, 150);
    let mut rng = Rng::new(100);
    let qkv = random(&mut rng, n * heads.qkv_width());
    let r = random(&mut rng, n * heads.q_width());
    let (out, lse) = attention(&be, &qkv, &cu, n, heads);
    let (want_out, want_lse) = naive_attention(&qkv, &cu, n, heads);
    assert!(rel_err(&out, &want_out) < 1e-12 && rel_err(&lse, &want_lse) < 1e-12);
    let mut dqkv = vec![5.0; n * heads.qkv_width()];
    be.attention_backward(&mut dqkv, &r, &qkv, &out, &lse, &cu.to_vec(), 3, n, heads, None).unwrap();
    fd_check("attention dqkv, 64-row blocks", &dqkv, &qkv, |x| dot(&attention(&be, x, &cu, n, heads).0, &r));
}
