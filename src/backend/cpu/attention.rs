//! Rotary embeddings and causal segment attention (training and KV-cache decoding).
//!
//! Attention keeps the logits of one query at a time (a row of at most one segment), so memory
//! stays linear in the sequence length; rows run in parallel. The backward writes each row of
//! `dqkv` from one task (its q part from its own query, its k and v parts from the later queries
//! of its segment), so no accumulation crosses threads and results are reproducible.

use rayon::prelude::*;

use super::Real;
use crate::backend::{HeadShape, RopeStyle};

fn rope_pair(j: usize, hd: usize, style: RopeStyle) -> (usize, usize) {
    match style {
        RopeStyle::AdjacentPairs => (2 * j, 2 * j + 1),
        RopeStyle::HalfSplit => (j, j + hd / 2),
    }
}

/// Rotates the q and k heads of `qkv` rows by `sign · angle`. The frequencies are computed in
/// f64 and rounded to f32, the angle is an f32 product, as the CUDA kernel does.
fn rotate<T: Real>(
    qkv: &mut [T],
    positions: &[u32],
    n: usize,
    heads: HeadShape,
    theta: f32,
    style: RopeStyle,
    sign: T,
) {
    let hd = heads.head_dim;
    let width = heads.qkv_width();
    if hd < 2 || width == 0 {
        return;
    }
    let freqs: Vec<f32> =
        (0..hd / 2).map(|j| (theta as f64).powf(-2.0 * j as f64 / hd as f64) as f32).collect();
    qkv[..n * width].par_chunks_mut(width).zip(&positions[..n]).for_each(|(row, &pos)| {
        for (j, &f) in freqs.iter().enumerate() {
            let angle = T::from_f32(pos as f32 * f);
            let (c, s) = (angle.cos(), sign * angle.sin());
            let (a, b) = rope_pair(j, hd, style);
            for h in 0..heads.n_heads + heads.n_kv_heads {
                let base = h * hd;
                let (x0, x1) = (row[base + a], row[base + b]);
                row[base + a] = x0 * c - x1 * s;
                row[base + b] = x0 * s + x1 * c;
            }
        }
    });
}

/// Rotates the q and k parts of `qkv` in place by `positions[i] · theta^(-2j/hd)`.
pub fn rope_forward<T: Real>(
    qkv: &mut [T],
    positions: &[u32],
    n: usize,
    heads: HeadShape,
    theta: f32,
    style: RopeStyle,
) {
    rotate(qkv, positions, n, heads, theta, style, T::ONE);
}

/// The inverse rotation (the backward of [`rope_forward`]), in place on `dqkv`.
pub fn rope_backward<T: Real>(
    dqkv: &mut [T],
    positions: &[u32],
    n: usize,
    heads: HeadShape,
    theta: f32,
    style: RopeStyle,
) {
    rotate(dqkv, positions, n, heads, theta, style, -T::ONE);
}

/// Dot product with eight independent partial sums: a serial float sum cannot be vectorized,
/// and the head dimension is where attention spends its time.
#[inline]
fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    const LANES: usize = 8;
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: T = ac.remainder().iter().zip(bc.remainder()).map(|(&x, &y)| x * y).sum();
    let mut acc = [T::ZERO; LANES];
    for (x, y) in ac.zip(bc) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// `(segment start, segment end)` of every row from `cu_seqlens`.
fn segment_bounds(cu_seqlens: &[u32], n_segments: usize, n: usize) -> Vec<(usize, usize)> {
    let mut bounds = vec![(0, 0); n];
    for s in 0..n_segments {
        let (a, b) = (cu_seqlens[s] as usize, (cu_seqlens[s + 1] as usize).min(n));
        for bound in bounds.iter_mut().take(b).skip(a) {
            *bound = (a, b);
        }
    }
    bounds
}

/// Softmax attention of one query over `len` keys (`keys[j·stride..]`, values likewise), scale
/// applied to the dot products. Writes the weighted values to `out`; returns the logsumexp.
#[allow(clippy::too_many_arguments)]
fn attend<T: Real>(
    q: &[T],
    keys: &[T],
    values: &[T],
    stride: usize,
    len: usize,
    scale: T,
    scores: &mut Vec<T>,
    out: &mut [T],
) -> T {
    let hd = q.len();
    scores.clear();
    scores.extend((0..len).map(|j| scale * dot(q, &keys[j * stride..j * stride + hd])));
    let max = scores.iter().fold(T::neg_infinity(), |m, &s| m.max(s));
    let mut z = T::ZERO;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        z += *s;
    }
    let inv_z = T::ONE / z;
    out.fill(T::ZERO);
    for (j, &p) in scores.iter().enumerate() {
        let p = p * inv_z;
        for (o, &v) in out.iter_mut().zip(&values[j * stride..j * stride + hd]) {
            *o += p * v;
        }
    }
    max + z.ln()
}

/// Causal attention inside each segment; `out [n, n_heads·hd]`, `lse [n_heads, n]`.
pub fn attention_forward<T: Real>(
    out: &mut [T],
    lse: &mut [T],
    qkv: &[T],
    cu_seqlens: &[u32],
    n_segments: usize,
    n: usize,
    heads: HeadShape,
) {
    let (hd, w, qw, kvw) = (heads.head_dim, heads.qkv_width(), heads.q_width(), heads.kv_width());
    let (nh, group) = (heads.n_heads, heads.n_heads / heads.n_kv_heads);
    if n == 0 || qw == 0 {
        return;
    }
    let scale = T::from_f64(1.0 / (hd as f64).sqrt());
    let bounds = segment_bounds(cu_seqlens, n_segments, n);
    let mut lse_rows = vec![T::ZERO; n * nh];
    out[..n * qw].par_chunks_mut(qw).zip(lse_rows.par_chunks_mut(nh)).enumerate().for_each_init(
        Vec::new,
        |scores, (i, (orow, lrow))| {
            let s0 = bounds[i].0;
            for h in 0..nh {
                let g = h / group;
                let q = &qkv[i * w + h * hd..i * w + (h + 1) * hd];
                let keys = &qkv[s0 * w + qw + g * hd..];
                let values = &qkv[s0 * w + qw + kvw + g * hd..];
                lrow[h] =
                    attend(q, keys, values, w, i + 1 - s0, scale, scores, &mut orow[h * hd..(h + 1) * hd]);
            }
        },
    );
    for i in 0..n {
        for h in 0..nh {
            lse[h * n + i] = lse_rows[i * nh + h];
        }
    }
}

/// Backward of [`attention_forward`]; `dqkv` is overwritten.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<T: Real>(
    dqkv: &mut [T],
    dout: &[T],
    qkv: &[T],
    out: &[T],
    lse: &[T],
    cu_seqlens: &[u32],
    n_segments: usize,
    n: usize,
    heads: HeadShape,
) {
    let (hd, w, qw, kvw) = (heads.head_dim, heads.qkv_width(), heads.q_width(), heads.kv_width());
    let (nh, nkv, group) = (heads.n_heads, heads.n_kv_heads, heads.n_heads / heads.n_kv_heads);
    if n == 0 || w == 0 {
        return;
    }
    let scale = T::from_f64(1.0 / (hd as f64).sqrt());
    let bounds = segment_bounds(cu_seqlens, n_segments, n);
    // D[i, h] = dout_i,h · out_i,h: the softmax backward's row term.
    let dd: Vec<T> = (0..n * nh)
        .into_par_iter()
        .map(|k| {
            let (i, h) = (k / nh, k % nh);
            let o = i * qw + h * hd;
            dot(&dout[o..o + hd], &out[o..o + hd])
        })
        .collect();
    // ds_ij for query i, key j, head h (kv head g): p_ij · (dout_i · v_j − D_i), with p_ij
    // recomputed from the saved logsumexp.
    let prob_and_ds = |i: usize, j: usize, h: usize, g: usize| -> (T, T) {
        let q = &qkv[i * w + h * hd..i * w + (h + 1) * hd];
        let k = &qkv[j * w + qw + g * hd..j * w + qw + (g + 1) * hd];
        let v = &qkv[j * w + qw + kvw + g * hd..j * w + qw + kvw + (g + 1) * hd];
        let p = (scale * dot(q, k) - lse[h * n + i]).exp();
        let dp = dot(&dout[i * qw + h * hd..i * qw + (h + 1) * hd], v);
        (p, p * (dp - dd[i * nh + h]))
    };
    dqkv[..n * w].par_chunks_mut(w).enumerate().for_each(|(r, drow)| {
        drow.fill(T::ZERO);
        let (s0, s1) = bounds[r];
        // Row r as a query: dq = scale · Σ_j ds_rj k_j.
        for h in 0..nh {
            let g = h / group;
            let dq = &mut drow[h * hd..(h + 1) * hd];
            for j in s0..=r {
                let (_, ds) = prob_and_ds(r, j, h, g);
                let c = scale * ds;
                for (d, &k) in dq.iter_mut().zip(&qkv[j * w + qw + g * hd..j * w + qw + (g + 1) * hd]) {
                    *d += c * k;
                }
            }
        }
        // Row r as a key/value: dk = scale · Σ_i ds_ir q_i, dv = Σ_i p_ir dout_i, over the
        // later queries i of its segment and every q head of the kv group.
        let (dk_all, dv_all) = drow[qw..qw + 2 * kvw].split_at_mut(kvw);
        for g in 0..nkv {
            let dk = &mut dk_all[g * hd..(g + 1) * hd];
            let dv = &mut dv_all[g * hd..(g + 1) * hd];
            for h in g * group..(g + 1) * group {
                for i in r..s1 {
                    let (p, ds) = prob_and_ds(i, r, h, g);
                    let c = scale * ds;
                    let q = &qkv[i * w + h * hd..i * w + (h + 1) * hd];
                    let go = &dout[i * qw + h * hd..i * qw + (h + 1) * hd];
                    for e in 0..hd {
                        dk[e] += c * q[e];
                        dv[e] += p * go[e];
                    }
                }
            }
        }
    });
}

/// KV-cache attention for one sequence: stores the `n_new` rows' k and v at cache rows
/// `start..`, then row `i` attends to cache rows `0..=start + i`.
#[allow(clippy::too_many_arguments)]
pub fn attention_decode<T: Real>(
    out: &mut [T],
    qkv: &[T],
    k_cache: &mut [T],
    v_cache: &mut [T],
    start: usize,
    n_new: usize,
    heads: HeadShape,
) {
    let (hd, w, qw, kvw) = (heads.head_dim, heads.qkv_width(), heads.q_width(), heads.kv_width());
    let (nh, group) = (heads.n_heads, heads.n_heads / heads.n_kv_heads);
    if n_new == 0 || qw == 0 {
        return;
    }
    for i in 0..n_new {
        let row = (start + i) * kvw;
        k_cache[row..row + kvw].copy_from_slice(&qkv[i * w + qw..i * w + qw + kvw]);
        v_cache[row..row + kvw].copy_from_slice(&qkv[i * w + qw + kvw..i * w + qw + 2 * kvw]);
    }
    let scale = T::from_f64(1.0 / (hd as f64).sqrt());
    let (k_cache, v_cache) = (&*k_cache, &*v_cache);
    out[..n_new * qw].par_chunks_mut(qw).enumerate().for_each_init(Vec::new, |scores, (i, orow)| {
        for h in 0..nh {
            let g = h / group;
            let q = &qkv[i * w + h * hd..i * w + (h + 1) * hd];
            attend(
                q,
                &k_cache[g * hd..],
                &v_cache[g * hd..],
                kvw,
                start + i + 1,
                scale,
                scores,
                &mut orow[h * hd..(h + 1) * hd],
            );
        }
    });
}
