//! Rotary embeddings and KV-cache attention.
//!
//! Decoding keeps the logits of one query at a time and runs rows in parallel; the training
//! attention is in `attention_blocks`.

use rayon::prelude::*;

use super::Real;
use crate::backend::{HeadShape, Rope, RopeStyle};

fn rope_pair(j: usize, hd: usize, style: RopeStyle) -> (usize, usize) {
    match style {
        RopeStyle::AdjacentPairs => (2 * j, 2 * j + 1),
        RopeStyle::HalfSplit => (j, j + hd / 2),
    }
}

/// Rotates the q and k heads of `qkv` rows by `sign · angle`. The frequencies are computed in
/// f64 and rounded to f32, the angle is an f32 product, as the CUDA kernel does.
fn rotate<T: Real>(qkv: &mut [T], positions: &[u32], n: usize, heads: HeadShape, rope: Rope, sign: T) {
    let hd = heads.head_dim;
    let width = heads.qkv_width();
    if hd < 2 || width == 0 {
        return;
    }
    let freqs: Vec<f32> = (0..hd / 2).map(|j| rope.inv_freq(j, hd)).collect();
    qkv[..n * width].par_chunks_mut(width).zip(&positions[..n]).for_each(|(row, &pos)| {
        for (j, &f) in freqs.iter().enumerate() {
            let angle = T::from_f32(pos as f32 * f);
            let (c, s) = (angle.cos(), sign * angle.sin());
            let (a, b) = rope_pair(j, hd, rope.style);
            for h in 0..heads.n_heads + heads.n_kv_heads {
                let base = h * hd;
                let (x0, x1) = (row[base + a], row[base + b]);
                row[base + a] = x0 * c - x1 * s;
                row[base + b] = x0 * s + x1 * c;
            }
        }
    });
}

/// Rotates the q and k parts of `qkv` in place by `positions[i] · rope.inv_freq(j, hd)`.
pub fn rope_forward<T: Real>(qkv: &mut [T], positions: &[u32], n: usize, heads: HeadShape, rope: Rope) {
    rotate(qkv, positions, n, heads, rope, T::ONE);
}

/// The inverse rotation (the backward of [`rope_forward`]), in place on `dqkv`.
pub fn rope_backward<T: Real>(dqkv: &mut [T], positions: &[u32], n: usize, heads: HeadShape, rope: Rope) {
    rotate(dqkv, positions, n, heads, rope, -T::ONE);
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
