//! The lm_head projection fused with masked cross-entropy.
//!
//! Only supervised rows reach the vocabulary projection: they are gathered into chunks of
//! [`CE_CHUNK_ROWS`] rows, so the logits of the whole micro-batch never exist at once (at a
//! 32k vocabulary a chunk's logits are 8 MB in f32).

use rayon::prelude::*;

use super::Real;

/// Supervised rows projected to the vocabulary at a time.
pub const CE_CHUNK_ROWS: usize = 64;

/// Gradient outputs of [`lm_head_cross_entropy`].
pub struct CeGrads<'a, T> {
    /// `[n, d]`, overwritten: `loss_scale · dlogits @ w`, zero for unsupervised rows.
    pub dx: &'a mut [T],
    /// `[vocab, d]`, ADDED to: `loss_scale · dlogits^T @ x`.
    pub dw: &'a mut [T],
    pub loss_scale: f32,
}

/// Returns the SUM over supervised rows (`targets[i] != ignore_id`) of
/// `logsumexp(x_i @ w^T) − (x_i @ w^T)[targets[i]]`. Every supervised target must be `< vocab`.
#[allow(clippy::too_many_arguments)]
pub fn lm_head_cross_entropy<T: Real>(
    x: &[T],
    w: &[T],
    targets: &[u32],
    ignore_id: u32,
    n: usize,
    d: usize,
    vocab: usize,
    grads: Option<CeGrads<'_, T>>,
) -> f64 {
    lm_head_cross_entropy_rows(x, w, targets, ignore_id, n, d, vocab, grads, None)
}

/// [`lm_head_cross_entropy`], also writing the k-th supervised row's loss to `row_losses[k]`.
#[allow(clippy::too_many_arguments)]
pub fn lm_head_cross_entropy_rows<T: Real>(
    x: &[T],
    w: &[T],
    targets: &[u32],
    ignore_id: u32,
    n: usize,
    d: usize,
    vocab: usize,
    mut grads: Option<CeGrads<'_, T>>,
    mut row_losses: Option<&mut [T]>,
) -> f64 {
    let rows: Vec<usize> = (0..n).filter(|&i| targets[i] != ignore_id).collect();
    if let Some(g) = grads.as_mut() {
        g.dx[..n * d].fill(T::ZERO);
    }
    if rows.is_empty() || vocab == 0 {
        return 0.0;
    }
    let chunk_cap = CE_CHUNK_ROWS.min(rows.len());
    let mut xc = vec![T::ZERO; chunk_cap * d];
    let mut logits = vec![T::ZERO; chunk_cap * vocab];
    let mut dxc = vec![T::ZERO; if grads.is_some() { chunk_cap * d } else { 0 }];
    let mut loss = 0.0f64;
    for (c0, chunk) in rows.chunks(CE_CHUNK_ROWS).enumerate().map(|(k, c)| (k * CE_CHUNK_ROWS, c)) {
        let c = chunk.len();
        for (k, &i) in chunk.iter().enumerate() {
            xc[k * d..(k + 1) * d].copy_from_slice(&x[i * d..(i + 1) * d]);
        }
        T::gemm(c, d, vocab, T::ONE, &xc, (d, 1), w, (1, d), T::ZERO, &mut logits, (vocab, 1));
        let scale = grads.as_ref().map(|g| T::from_f32(g.loss_scale));
        // Per row: the loss, and (with grads) the logits turned in place into
        // loss_scale · (softmax − onehot).
        let losses: Vec<f64> = logits[..c * vocab]
            .par_chunks_mut(vocab)
            .zip(chunk.par_iter())
            .map(|(z, &i)| {
                let t = targets[i] as usize;
                let max = z.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
                let sum: T = z.iter().map(|&v| (v - max).exp()).sum();
                let lse = max + sum.ln();
                let row_loss = (lse - z[t]).to_f64();
                if let Some(s) = scale {
                    for v in z.iter_mut() {
                        *v = s * (*v - lse).exp();
                    }
                    z[t] -= s;
                }
                row_loss
            })
            .collect();
        loss += losses.iter().sum::<f64>();
        if let Some(out) = row_losses.as_deref_mut() {
            out[c0..c0 + c].iter_mut().zip(&losses).for_each(|(o, &l)| *o = T::from_f64(l));
        }
        if let Some(g) = grads.as_mut() {
            let dlogits = &logits[..c * vocab];
            T::gemm(c, vocab, d, T::ONE, dlogits, (vocab, 1), w, (d, 1), T::ZERO, &mut dxc, (d, 1));
            for (k, &i) in chunk.iter().enumerate() {
                g.dx[i * d..(i + 1) * d].copy_from_slice(&dxc[k * d..(k + 1) * d]);
            }
            T::gemm(vocab, c, d, T::ONE, dlogits, (1, vocab), &xc, (d, 1), T::ONE, g.dw, (d, 1));
        }
    }
    loss
}
