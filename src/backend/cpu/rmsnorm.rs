//! RMSNorm forward (plain and fused with the residual add) and backward.
//!
//! The weight gradient sums fixed row blocks in order, so it does not depend on thread scheduling.

use rayon::prelude::*;

use super::dropout::{keep_scale, masked};
use super::Real;
use crate::backend::Dropout;

/// Rows per parallel block in the weight gradient's sum; fixed so sums are reproducible.
const ROW_BLOCK: usize = 64;
/// Elements per parallel chunk of the residual add.
const ELEM_CHUNK: usize = 1 << 14;

/// `1 / sqrt(ms + eps)` for a row's mean square `ms`; NaN where `ms` overflowed (is infinite or
/// NaN), never `1 / sqrt(inf) = 0`: a zero would normalize the row to nothing, and a model with one
/// absurd weight would evaluate to a uniform distribution and train on zero gradients silently.
/// NaN reaches the checks on the outputs instead. The kernels' `rmsnorm_rstd` is the twin.
pub fn rmsnorm_rstd<T: Real>(ms: T, eps: T) -> T {
    if ms.to_f64().is_finite() {
        T::ONE / (ms + eps).sqrt()
    } else {
        T::from_f64(f64::NAN)
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
            let rs = rmsnorm_rstd(ms, eps);
            *r = rs;
            for ((o, &xv), &wv) in o.iter_mut().zip(xr).zip(w) {
                *o = xv * rs * wv;
            }
        },
    );
}

/// `x_out = x_in + dropout(delta)` (`delta` unchanged; None adds it as it is), then
/// `out = rmsnorm(x_out) · w`.
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
    dropout: Option<Dropout>,
) {
    let dropout = dropout.filter(|m| m.p > 0.0);
    let scale = keep_scale::<T>(dropout.map_or(0.0, |m| m.p));
    x_out[..n * d]
        .par_chunks_mut(ELEM_CHUNK)
        .zip(x_in[..n * d].par_chunks(ELEM_CHUNK))
        .zip(delta[..n * d].par_chunks(ELEM_CHUNK))
        .enumerate()
        .for_each(|(c, ((o, a), b))| {
            for (k, ((o, &a), &b)) in o.iter_mut().zip(a).zip(b).enumerate() {
                *o = match dropout {
                    Some(m) => a + masked(b, m, scale, c * ELEM_CHUNK + k),
                    None => a + b,
                };
            }
        });
    rmsnorm_forward(out, rstd, x_out, w, n, d, eps);
}

/// ADDS `d(out)/dx · dout` into `dx` and `d(out)/dw · dout` into `dw`; with `branch`, then
/// writes `branch.0 = dropout(dx)` over the updated `dx`.
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
    branch: Option<(&mut [T], Dropout)>,
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
    if let Some((out, mask)) = branch {
        let scale = keep_scale::<T>(mask.p);
        out[..n * d].par_chunks_mut(ELEM_CHUNK).zip(dx[..n * d].par_chunks(ELEM_CHUNK)).enumerate().for_each(
            |(c, (o, g))| {
                for (k, (o, &g)) in o.iter_mut().zip(g).enumerate() {
                    *o = if mask.p > 0.0 { masked(g, mask, scale, c * ELEM_CHUNK + k) } else { g };
                }
            },
        );
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A row whose squares overflow f32 is NaN, not zeros (rsqrt(inf) = 0); a large finite row is
    /// normalized as usual.
    #[test]
    fn an_overflowing_row_is_nan_not_zero() {
        let d = 4;
        let x = [3e19f32, 1.0, -2.0, 0.5, 1e18, 2e18, -1e18, 0.0];
        let w = [1.0f32; 4];
        let (mut out, mut rstd) = (vec![0f32; 8], vec![0f32; 2]);
        rmsnorm_forward(&mut out, &mut rstd, &x, &w, 2, d, 1e-5);
        assert!(rstd[0].is_nan() && out[..d].iter().all(|v| v.is_nan()), "{rstd:?} {out:?}");
        let ms: f64 = x[d..].iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64;
        assert!((rstd[1] as f64 * ms.sqrt() - 1.0).abs() < 1e-5, "{}", rstd[1]);
        assert!(out[d..].iter().all(|v| v.is_finite()));
    }
}
