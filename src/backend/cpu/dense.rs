//! Row-wise and dense ops: embedding, RMSNorm, matmul, SwiGLU, dropout.
//!
//! Each function works on the first `n` rows of flat row-major slices, with the semantics of the
//! same-named method of [`crate::backend::Backend`]. Reductions over rows (weight gradients) use
//! fixed row blocks summed in order, so results do not depend on thread scheduling.

use rayon::prelude::*;

use super::Real;
use crate::rng;

/// Rows per parallel block in reductions over rows; fixed so sums are reproducible.
const ROW_BLOCK: usize = 64;
/// Elements per parallel chunk in element-wise ops.
const ELEM_CHUNK: usize = 1 << 14;

/// `out[i] = table[ids[i]]`.
pub fn embedding_forward<T: Real>(out: &mut [T], ids: &[u32], table: &[T], n: usize, d: usize) {
    out[..n * d].par_chunks_mut(d.max(1)).zip(&ids[..n]).for_each(|(row, &id)| {
        let t = id as usize;
        row.copy_from_slice(&table[t * d..(t + 1) * d]);
    });
}

/// `dtable[ids[i]] += dout[i]`, in row order (deterministic).
pub fn embedding_backward<T: Real>(dtable: &mut [T], ids: &[u32], dout: &[T], n: usize, d: usize) {
    for (i, &id) in ids[..n].iter().enumerate() {
        let t = id as usize;
        for (acc, &g) in dtable[t * d..(t + 1) * d].iter_mut().zip(&dout[i * d..(i + 1) * d]) {
            *acc += g;
        }
    }
}

/// `out = x · rstd · w` per row, saving `rstd = 1 / sqrt(mean(x²) + eps)`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_forward<T: Real>(
    out: &mut [T],
    rstd: &mut [T],
    x: &[T],
    w: &[T],
    n: usize,
    d: usize,
    eps: f32,
) {
    let eps = T::from_f32(eps);
    let inv_d = T::from_f64(1.0 / d as f64);
    out[..n * d].par_chunks_mut(d.max(1)).zip(&mut rstd[..n]).zip(x[..n * d].par_chunks(d.max(1))).for_each(
        |((o, r), xr)| {
            let ms: T = xr.iter().map(|&v| v * v).sum::<T>() * inv_d;
            let rs = T::ONE / (ms + eps).sqrt();
            *r = rs;
            for ((o, &xv), &wv) in o.iter_mut().zip(xr).zip(w) {
                *o = xv * rs * wv;
            }
        },
    );
}

/// `x_out = x_in + delta`, then `out = rmsnorm(x_out) · w`.
#[allow(clippy::too_many_arguments)]
pub fn residual_rmsnorm_forward<T: Real>(
    x_out: &mut [T],
    out: &mut [T],
    rstd: &mut [T],
    x_in: &[T],
    delta: &[T],
    w: &[T],
    n: usize,
    d: usize,
    eps: f32,
) {
    x_out[..n * d]
        .par_chunks_mut(ELEM_CHUNK)
        .zip(x_in[..n * d].par_chunks(ELEM_CHUNK))
        .zip(delta[..n * d].par_chunks(ELEM_CHUNK))
        .for_each(|((o, a), b)| {
            for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                *o = a + b;
            }
        });
    rmsnorm_forward(out, rstd, x_out, w, n, d, eps);
}

/// ADDS `d(out)/dx · dout` into `dx` and `d(out)/dw · dout` into `dw`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward<T: Real>(
    dx: &mut [T],
    dw: &mut [T],
    dout: &[T],
    x: &[T],
    w: &[T],
    rstd: &[T],
    n: usize,
    d: usize,
) {
    if n == 0 || d == 0 {
        return;
    }
    let inv_d = T::from_f64(1.0 / d as f64);
    dx[..n * d].par_chunks_mut(d).enumerate().for_each(|(i, dxr)| {
        let (xr, gr, r) = (&x[i * d..(i + 1) * d], &dout[i * d..(i + 1) * d], rstd[i]);
        let dot: T = (0..d).map(|e| gr[e] * w[e] * xr[e]).sum();
        let c = r * r * r * inv_d * dot;
        for e in 0..d {
            dxr[e] += r * w[e] * gr[e] - c * xr[e];
        }
    });
    let partials: Vec<Vec<T>> = (0..n.div_ceil(ROW_BLOCK))
        .into_par_iter()
        .map(|b| {
            let mut acc = vec![T::ZERO; d];
            for i in b * ROW_BLOCK..((b + 1) * ROW_BLOCK).min(n) {
                let r = rstd[i];
                for e in 0..d {
                    acc[e] += dout[i * d + e] * x[i * d + e] * r;
                }
            }
            acc
        })
        .collect();
    for p in partials {
        for (a, v) in dw[..d].iter_mut().zip(p) {
            *a += v;
        }
    }
}

/// `out[n, o] = inp[n, i] @ w[o, i]^T`.
pub fn matmul_forward<T: Real>(out: &mut [T], inp: &[T], w: &[T], n: usize, in_dim: usize, out_dim: usize) {
    T::gemm(n, in_dim, out_dim, T::ONE, inp, (in_dim, 1), w, (1, in_dim), T::ZERO, out, (out_dim, 1));
}

/// `dinp = dout @ w` (overwritten, when given); `dw += dout^T @ inp`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward<T: Real>(
    dinp: Option<&mut [T]>,
    dw: &mut [T],
    dout: &[T],
    inp: &[T],
    w: &[T],
    n: usize,
    in_dim: usize,
    out_dim: usize,
) {
    if let Some(dinp) = dinp {
        T::gemm(n, out_dim, in_dim, T::ONE, dout, (out_dim, 1), w, (in_dim, 1), T::ZERO, dinp, (in_dim, 1));
    }
    T::gemm(out_dim, n, in_dim, T::ONE, dout, (1, out_dim), inp, (in_dim, 1), T::ONE, dw, (in_dim, 1));
}

#[inline]
fn silu_parts<T: Real>(g: T) -> (T, T) {
    let s = T::ONE / (T::ONE + (-g).exp());
    (s, g * s)
}

/// `out = silu(gate) · up` from `gate_up` rows `[gate | up]`.
pub fn swiglu_forward<T: Real>(out: &mut [T], gate_up: &[T], n: usize, hidden: usize) {
    if hidden == 0 {
        return;
    }
    out[..n * hidden].par_chunks_mut(hidden).zip(gate_up.par_chunks(2 * hidden)).for_each(|(o, gu)| {
        let (gate, up) = gu.split_at(hidden);
        for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
            *o = silu_parts(g).1 * u;
        }
    });
}

/// `dgate_up` (overwritten) from `dout`.
pub fn swiglu_backward<T: Real>(dgate_up: &mut [T], dout: &[T], gate_up: &[T], n: usize, hidden: usize) {
    if hidden == 0 {
        return;
    }
    dgate_up[..2 * n * hidden]
        .par_chunks_mut(2 * hidden)
        .zip(dout.par_chunks(hidden))
        .zip(gate_up.par_chunks(2 * hidden))
        .for_each(|((dgu, dr), gu)| {
            let (dgate, dup) = dgu.split_at_mut(hidden);
            let (gate, up) = gu.split_at(hidden);
            for j in 0..hidden {
                let (s, silu) = silu_parts(gate[j]);
                dgate[j] = dr[j] * up[j] * s * (T::ONE + gate[j] * (T::ONE - s));
                dup[j] = dr[j] * silu;
            }
        });
}

/// In place: element `i` is zeroed when `uniform(seed, i) < p`, else scaled by `1/(1-p)`.
pub fn dropout<T: Real>(x: &mut [T], len: usize, p: f32, seed: u64) {
    if p == 0.0 {
        return;
    }
    let keep_scale = T::from_f64(1.0 / (1.0 - p as f64));
    x[..len].par_chunks_mut(ELEM_CHUNK).enumerate().for_each(|(c, chunk)| {
        for (k, v) in chunk.iter_mut().enumerate() {
            let i = (c * ELEM_CHUNK + k) as u64;
            *v = if rng::uniform(seed, i) < p { T::ZERO } else { *v * keep_scale };
        }
    });
}
