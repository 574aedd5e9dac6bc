//! Rotary embeddings, in both pairings, applied in place to the q and k parts of `qkv` rows.

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
