//! Causal attention inside segments: training (forward and backward) as GEMMs over row blocks,
//! and generation against a KV cache.
//!
//! The token axis is cut into blocks of at most [`BLOCK`] rows that never cross a segment; one
//! rayon task owns one block's rows of the output (and of `dqkv`), so tasks never share a
//! written element. Per head, a block's scores against the keys it may see are one GEMM, so the
//! probabilities of at most `BLOCK × segment length` pairs exist at a time.

use rayon::prelude::*;

use super::Real;
use crate::backend::HeadShape;

/// Rows per block (queries in the forward; queries and keys in the backward).
const BLOCK: usize = 64;

/// `(segment start, segment end, block start, block end)` for every block, in row order, so
/// the blocks partition `0..n`.
fn blocks(cu_seqlens: &[u32], n_segments: usize) -> Vec<(usize, usize, usize, usize)> {
    let mut out = Vec::new();
    for s in 0..n_segments {
        let (s0, s1) = (cu_seqlens[s] as usize, cu_seqlens[s + 1] as usize);
        let mut r0 = s0;
        while r0 < s1 {
            let r1 = (r0 + BLOCK).min(s1);
            out.push((s0, s1, r0, r1));
            r0 = r1;
        }
    }
    out
}

/// Cuts `buf` into consecutive pieces of `rows × row_len` elements, one per block.
fn carve<'a, T>(
    mut buf: &'a mut [T],
    blocks: &[(usize, usize, usize, usize)],
    row_len: usize,
) -> Vec<&'a mut [T]> {
    let mut pieces = Vec::with_capacity(blocks.len());
    for &(_, _, r0, r1) in blocks {
        let (piece, rest) = std::mem::take(&mut buf).split_at_mut((r1 - r0) * row_len);
        pieces.push(piece);
        buf = rest;
    }
    pieces
}

/// In place: `s[a, j] = exp(s[a, j] − lse(a))` where `visible(a, j)`, else 0.
fn probabilities<T: Real>(
    s: &mut [T],
    rows: usize,
    cols: usize,
    lse: impl Fn(usize) -> T,
    visible: impl Fn(usize, usize) -> bool,
) {
    for a in 0..rows {
        let l = lse(a);
        for (j, v) in s[a * cols..(a + 1) * cols].iter_mut().enumerate() {
            *v = if visible(a, j) { (*v - l).exp() } else { T::ZERO };
        }
    }
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
    let blocks = blocks(cu_seqlens, n_segments);
    let mut lse_rows = vec![T::ZERO; n * nh];
    let tasks: Vec<_> = blocks
        .iter()
        .zip(carve(&mut out[..n * qw], &blocks, qw))
        .zip(carve(&mut lse_rows, &blocks, nh))
        .collect();
    tasks.into_par_iter().for_each_init(Vec::new, |s, ((&(s0, _, q0, q1), orows), lrows)| {
        let (bq, nk) = (q1 - q0, q1 - s0);
        s.resize(bq * nk, T::ZERO);
        for h in 0..nh {
            let g = h / group;
            let (qo, ko, vo) = (q0 * w + h * hd, s0 * w + qw + g * hd, s0 * w + qw + kvw + g * hd);
            T::gemm(bq, hd, nk, scale, &qkv[qo..], (w, 1), &qkv[ko..], (1, w), T::ZERO, s, (nk, 1));
            // Query q0 + a sees keys s0..=q0 + a.
            for a in 0..bq {
                let row = &mut s[a * nk..a * nk + q0 - s0 + a + 1];
                let max = row.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
                let sum: T = row.iter().map(|&v| (v - max).exp()).sum();
                lrows[a * nh + h] = max + sum.ln();
            }
            probabilities(s, bq, nk, |a| lrows[a * nh + h], |a, j| j <= q0 - s0 + a);
            T::gemm(
                bq,
                nk,
                hd,
                T::ONE,
                s,
                (nk, 1),
                &qkv[vo..],
                (w, 1),
                T::ZERO,
                &mut orows[h * hd..],
                (qw, 1),
            );
        }
    });
    for i in 0..n {
        for h in 0..nh {
            lse[h * n + i] = lse_rows[i * nh + h];
        }
    }
}

/// Backward of [`attention_forward`]; `dqkv` is overwritten. A block's task writes its rows'
/// dq (from their own queries) and dk, dv (from the later queries of the segment).
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
    let (nh, group) = (heads.n_heads, heads.n_heads / heads.n_kv_heads);
    if n == 0 || w == 0 {
        return;
    }
    let scale = T::from_f64(1.0 / (hd as f64).sqrt());
    // D[h, i] = dout_i,h · out_i,h: the softmax backward's row term.
    let dd: Vec<T> = (0..nh * n)
        .into_par_iter()
        .map(|k| {
            let (h, i) = (k / n, k % n);
            let o = i * qw + h * hd;
            dout[o..o + hd].iter().zip(&out[o..o + hd]).map(|(&a, &b)| a * b).sum()
        })
        .collect();
    let blocks = blocks(cu_seqlens, n_segments);
    let tasks: Vec<_> = blocks.iter().zip(carve(&mut dqkv[..n * w], &blocks, w)).collect();
    tasks.into_par_iter().for_each_init(
        || (Vec::new(), Vec::new()),
        |(p, dp), (&(s0, s1, r0, r1), drows)| {
            drows.fill(T::ZERO);
            let b = r1 - r0;
            for h in 0..nh {
                let g = h / group;
                let (ko, vo) = (qw + g * hd, qw + kvw + g * hd);
                let dor = |i: usize| i * qw + h * hd;
                // Rows as queries against keys s0..r1: dq = scale · dS K.
                let nk = r1 - s0;
                p.resize(b * nk, T::ZERO);
                dp.resize(b * nk, T::ZERO);
                let q = &qkv[r0 * w + h * hd..];
                T::gemm(b, hd, nk, scale, q, (w, 1), &qkv[s0 * w + ko..], (1, w), T::ZERO, p, (nk, 1));
                probabilities(p, b, nk, |a| lse[h * n + r0 + a], |a, j| j <= r0 - s0 + a);
                T::gemm(
                    b,
                    hd,
                    nk,
                    T::ONE,
                    &dout[dor(r0)..],
                    (qw, 1),
                    &qkv[s0 * w + vo..],
                    (1, w),
                    T::ZERO,
                    dp,
                    (nk, 1),
                );
                for a in 0..b {
                    let d = dd[h * n + r0 + a];
                    for j in 0..nk {
                        dp[a * nk + j] = p[a * nk + j] * (dp[a * nk + j] - d);
                    }
                }
                T::gemm(
                    b,
                    nk,
                    hd,
                    scale,
                    dp,
                    (nk, 1),
                    &qkv[s0 * w + ko..],
                    (w, 1),
                    T::ZERO,
                    &mut drows[h * hd..],
                    (w, 1),
                );
                // Rows as keys against queries r0..s1: dk += scale · dSᵀ Q, dv += Pᵀ dO.
                let nq = s1 - r0;
                p.resize(b * nq, T::ZERO);
                dp.resize(b * nq, T::ZERO);
                T::gemm(b, hd, nq, scale, &qkv[r0 * w + ko..], (w, 1), q, (1, w), T::ZERO, p, (nq, 1));
                // Key r0 + a is seen by queries r0 + c with c >= a; lse is per query (column).
                for a in 0..b {
                    for (c, v) in p[a * nq..(a + 1) * nq].iter_mut().enumerate() {
                        *v = if c >= a { (*v - lse[h * n + r0 + c]).exp() } else { T::ZERO };
                    }
                }
                T::gemm(
                    b,
                    hd,
                    nq,
                    T::ONE,
                    &qkv[r0 * w + vo..],
                    (w, 1),
                    &dout[dor(r0)..],
                    (1, qw),
                    T::ZERO,
                    dp,
                    (nq, 1),
                );
                for a in 0..b {
                    for c in 0..nq {
                        let k = a * nq + c;
                        dp[k] = p[k] * (dp[k] - dd[h * n + r0 + c]);
                    }
                }
                T::gemm(b, nq, hd, scale, dp, (nq, 1), q, (w, 1), T::ONE, &mut drows[ko..], (w, 1));
                T::gemm(
                    b,
                    nq,
                    hd,
                    T::ONE,
                    p,
                    (nq, 1),
                    &dout[dor(r0)..],
                    (qw, 1),
                    T::ONE,
                    &mut drows[vo..],
                    (w, 1),
                );
            }
        },
    );
}

// ---- generation with a KV cache ---------------------------------------------------------
// Decoding keeps the logits of one query at a time and runs rows in parallel.

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
