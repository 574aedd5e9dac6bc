//! Linear layers: `inp @ w^T` and its backward, through `Real::gemm` (matrixmultiply).

use rayon::prelude::*;

use super::Real;
use crate::backend::GradMode;

/// The GEMM's beta for `mode`: 0 overwrites C without reading it, 1 adds into it.
fn beta<T: Real>(mode: GradMode) -> T {
    match mode {
        GradMode::Overwrite => T::ZERO,
        GradMode::Accumulate => T::ONE,
    }
}

/// `out[n, o] = inp[n, i] @ w[o, i]^T`.
pub fn matmul_forward<T: Real>(out: &mut [T], inp: &[T], w: &[T], n: usize, in_dim: usize, out_dim: usize) {
    T::gemm(n, in_dim, out_dim, T::ONE, inp, (in_dim, 1), w, (1, in_dim), T::ZERO, out, (out_dim, 1));
}

/// `out[n, o] = resid[n, o] + inp[n, i] @ w[o, i]^T`: the product first, then the add, so
/// the sum has the bits of `residual_rmsnorm_forward`'s `x_in + delta` without dropout.
pub fn matmul_forward_residual<T: Real>(
    out: &mut [T],
    resid: &[T],
    inp: &[T],
    w: &[T],
    n: usize,
    in_dim: usize,
    out_dim: usize,
) {
    matmul_forward(out, inp, w, n, in_dim, out_dim);
    out[..n * out_dim].par_iter_mut().zip(&resid[..n * out_dim]).for_each(|(o, &r)| *o = r + *o);
}

/// `dinp = dout @ w` (overwritten, when given); `dw (=|+=) dout^T @ inp`, beta 0 or 1 as the
/// CUDA backend's GEMM (with `Overwrite`, what `dw` held is never read).
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
    mode: GradMode,
) {
    if let Some(dinp) = dinp {
        T::gemm(n, out_dim, in_dim, T::ONE, dout, (out_dim, 1), w, (in_dim, 1), T::ZERO, dinp, (in_dim, 1));
    }
    if n == 0 {
        // No rows: the product is zero, which a GEMM with k = 0 may not write.
        if mode == GradMode::Overwrite {
            dw[..out_dim * in_dim].fill(T::ZERO);
        }
        return;
    }
    T::gemm(out_dim, n, in_dim, T::ONE, dout, (1, out_dim), inp, (in_dim, 1), beta(mode), dw, (in_dim, 1));
}

/// `out[i, col + j] (= | +=) scale · inp[i] · w[j]` for `j < out_dim`, `out` rows `ld` wide
/// (`+=` with `Accumulate`).
#[allow(clippy::too_many_arguments)]
pub fn matmul_forward_slice<T: Real>(
    out: &mut [T],
    inp: &[T],
    w: &[T],
    n: usize,
    in_dim: usize,
    out_dim: usize,
    ld: usize,
    col: usize,
    scale: T,
    mode: GradMode,
) {
    T::gemm(
        n,
        in_dim,
        out_dim,
        scale,
        inp,
        (in_dim, 1),
        w,
        (1, in_dim),
        beta(mode),
        &mut out[col..],
        (ld, 1),
    );
}

/// Backward of [`matmul_forward_slice`]: `dinp (= | +=) scale · dout_slice @ w` (`+=` with
/// `Accumulate`),
/// `dw += scale · dout_slice^T @ inp`, each when given.
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward_slice<T: Real>(
    dinp: Option<&mut [T]>,
    dw: Option<&mut [T]>,
    dout: &[T],
    inp: &[T],
    w: &[T],
    n: usize,
    in_dim: usize,
    out_dim: usize,
    ld: usize,
    col: usize,
    scale: T,
    mode: GradMode,
) {
    let dout = &dout[col..];
    if let Some(dinp) = dinp {
        T::gemm(n, out_dim, in_dim, scale, dout, (ld, 1), w, (in_dim, 1), beta(mode), dinp, (in_dim, 1));
    }
    if let Some(dw) = dw {
        T::gemm(out_dim, n, in_dim, scale, dout, (1, ld), inp, (in_dim, 1), T::ONE, dw, (in_dim, 1));
    }
}
