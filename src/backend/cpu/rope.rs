//! Rotary embeddings, in both pairings, applied in place to the q and k parts of `qkv` rows,
//! from a per-micro-batch table of `(cos, sin)` per row and pair ([`rope_table`]).

use rayon::prelude::*;

use super::Real;
use crate::backend::{HeadShape, Rope, RopeStyle};

fn rope_pair(j: usize, hd: usize, style: RopeStyle) -> (usize, usize) {
    match style {
        RopeStyle::AdjacentPairs => (2 * j, 2 * j + 1),
        RopeStyle::HalfSplit => (j, j + hd / 2),
    }
}

/// `table [n, hd/2, 2]`: `(cos, sin)` of `positions[i] as f32 * rope.inv_freq(j, hd)`. The
/// frequencies are computed in f64 and rounded to f32 and the angle is an f32 product, as the
/// CUDA backend does; cos and sin are then taken in `T` (the CUDA kernel's fp32 ones agree to
/// about 1e-7).
pub fn rope_table<T: Real>(table: &mut [T], positions: &[u32], n: usize, hd: usize, rope: Rope) {
    let half = hd / 2;
    if half == 0 {
        return;
    }
    let freqs: Vec<f32> = (0..half).map(|j| rope.inv_freq(j, hd)).collect();
    table[..n * hd].par_chunks_mut(hd).zip(&positions[..n]).for_each(|(row, &pos)| {
        for (j, &f) in freqs.iter().enumerate() {
            let angle = T::from_f32(pos as f32 * f);
            row[2 * j] = angle.cos();
            row[2 * j + 1] = angle.sin();
        }
    });
}

/// Rotates the q and k heads of `qkv` rows by `sign · angle`, the angles' cos and sin from `table`.
fn rotate<T: Real>(qkv: &mut [T], table: &[T], n: usize, heads: HeadShape, style: RopeStyle, sign: T) {
    let hd = heads.head_dim;
    let width = heads.qkv_width();
    if hd < 2 || width == 0 {
        return;
    }
    qkv[..n * width].par_chunks_mut(width).zip(table[..n * hd].par_chunks(hd)).for_each(|(row, cs)| {
        for j in 0..hd / 2 {
            let (c, s) = (cs[2 * j], sign * cs[2 * j + 1]);
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

/// Rotates the q and k parts of `qkv` in place by the angles of `table` (from [`rope_table`]).
pub fn rope_forward<T: Real>(qkv: &mut [T], table: &[T], n: usize, heads: HeadShape, style: RopeStyle) {
    rotate(qkv, table, n, heads, style, T::ONE);
}

/// The inverse rotation (the backward of [`rope_forward`]), in place on `dqkv`.
pub fn rope_backward<T: Real>(dqkv: &mut [T], table: &[T], n: usize, heads: HeadShape, style: RopeStyle) {
    rotate(dqkv, table, n, heads, style, -T::ONE);
}
