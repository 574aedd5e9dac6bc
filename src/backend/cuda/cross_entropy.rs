//! lm_head fused with masked cross-entropy.
//!
//! The host lists the supervised rows and their targets when it loads the batch (no read-back
//! here); those rows are gathered into a compact buffer and processed in chunks: cuBLASLt computes a chunk's fp32
//! logits, `cross_entropy_rows` turns them into losses and bf16 dlogits, and two more GEMMs
//! give the chunk's dx (scattered back to its rows) and add into dw. Logits for all rows never
//! exist at once; unsupervised rows never reach the vocabulary projection.

use anyhow::Result;

use super::gemm::{dy_w, dyt_x, x_wt, DType};
use super::launch::{self, grid_stride, int, per_row};
use super::scratch::ensure;
use super::{bf16_mut, bf16_of, f32_mut, ids_of, CudaBackend, CudaBuf};
use crate::backend::{GradMode, LossGrads};

/// Work buffers of one chunk, at most (fp32 logits, bf16 dlogits, compact x and dx): large
/// enough that a 128k vocabulary takes a few chunks per micro-batch, not hundreds.
pub const CHUNK_BUDGET_BYTES: usize = 2 << 30;

/// Each chunk reads and writes the whole fp32 lm_head gradient (`dw += dlogits^T @ x_chunk`):
/// 2·vocab·d·4 bytes for 2·rows·vocab·d FLOPs, i.e. rows/4 FLOP per byte. Below about 1k rows
/// that GEMM is bound by memory on an H100 (~300 FLOP per byte), so a chunk has at least this
/// many rows even where it overshoots the budget.
pub(super) const CHUNK_MIN_ROWS: usize = 1024;

/// Supervised rows per chunk for `n_sup` rows: as many as `budget` bytes of work buffers hold,
/// at least `CHUNK_MIN_ROWS`, at most `n_sup`, and never more logits than an `int` indexes.
pub fn chunk_rows(n_sup: usize, d: usize, vocab: usize, budget: usize) -> usize {
    let bytes_per_row = vocab * (4 + 2) + d * (2 + 2);
    let by_budget = budget / bytes_per_row.max(1);
    let int_limit = (i32::MAX as usize / vocab.max(1)).max(1);
    by_budget.max(CHUNK_MIN_ROWS).min(int_limit).clamp(1, n_sup.max(1))
}

/// The `vec` argument of the cross-entropy kernels for rows of `width` elements: 1 when rows
/// are whole 16-byte groups of 8 (bf16 rows of d, fp32/bf16 rows of the vocabulary).
pub fn vec_arg(width: usize) -> i32 {
    i32::from(width.is_multiple_of(8))
}

/// The items (threads' units of work) of gather_rows/scatter_rows over `rows` rows of `d`.
pub fn copy_items(rows: usize, d: usize) -> usize {
    if d.is_multiple_of(8) {
        rows * d / 8
    } else {
        rows * d
    }
}

impl CudaBackend {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn lm_head_cross_entropy(
        &self,
        x: &CudaBuf,
        w: &CudaBuf,
        rows: &cudarc::driver::CudaSlice<u32>,
        targets: &cudarc::driver::CudaSlice<u32>,
        n_sup: usize,
        n: usize,
        d: usize,
        vocab: usize,
        losses: &mut CudaBuf,
        grads: Option<LossGrads<'_, Self>>,
    ) -> Result<()> {
        let x = bf16_of(x, n * d, "lm_head_cross_entropy x")?;
        let w = bf16_of(w, vocab * d, "lm_head_cross_entropy w")?;
        let rows_d = ids_of(rows, n_sup, "lm_head_cross_entropy rows")?;
        let tgt_d = ids_of(targets, n_sup, "lm_head_cross_entropy targets")?;
        let losses = f32_mut(losses, n_sup, "lm_head_cross_entropy losses")?;
        let mut grads = match grads {
            Some(g) => {
                let scale = g.loss_scale;
                let dx = bf16_mut(g.dx, n * d, "lm_head_cross_entropy dx")?;
                let dw = f32_mut(g.dw, vocab * d, "lm_head_cross_entropy dw")?;
                Some((dx, dw, scale, g.mode))
            }
            None => None,
        };
        if n_sup > n {
            anyhow::bail!("lm_head_cross_entropy: {n_sup} supervised rows of {n}");
        }
        if let Some((dx, dw, _, mode)) = grads.as_mut() {
            self.stream.memset_zeros(&mut dx.slice_mut(0..n * d))?;
            // Written, not added to, yet no chunk will write it.
            if *mode == GradMode::Overwrite && (n_sup == 0 || d == 0) {
                self.stream.memset_zeros(&mut dw.slice_mut(0..vocab * d))?;
            }
        }
        if n_sup == 0 || d == 0 {
            return Ok(());
        }
        let chunk = chunk_rows(n_sup, d, vocab, CHUNK_BUDGET_BYTES);
        let (di, vi) = (int(d, "d")?, int(vocab, "vocab")?);
        int(chunk * vocab, "chunk logits")?;
        int(chunk * d, "chunk rows (rows × d)")?;
        let (rows_vec, row_vec) = (vec_arg(d), vec_arg(vocab));

        let mut scratch = self.scratch();
        let s = &mut *scratch;
        let xc = ensure(&mut s.ce_x, chunk * d, &self.stream, "compact rows")?;
        let logits = ensure(&mut s.ce_logits, chunk * vocab, &self.stream, "logits chunk")?;
        let (dxc, mut dlogits) = if grads.is_some() {
            (
                Some(ensure(&mut s.ce_dx, chunk * d, &self.stream, "compact dx")?),
                Some(ensure(&mut s.ce_dlogits, chunk * vocab, &self.stream, "dlogits chunk")?),
            )
        } else {
            (None, None)
        };

        let w_ptr = self.dev_ptr(w);
        for c0 in (0..n_sup).step_by(chunk) {
            let r = chunk.min(n_sup - c0);
            let ri = int(r, "chunk rows")?;
            let idx = rows_d.slice(c0..c0 + r);
            let (st, ks) = (&self.stream, &self.kernels);
            // SAFETY: idx entries are rows < n of x; xc holds chunk * d.
            let copy_cfg = grid_stride(copy_items(r, d));
            unsafe { launch::cross_entropy_gather_rows(st, ks, copy_cfg, xc, x, &idx, ri, di, rows_vec) }?;

            let xc_ptr = self.dev_ptr(xc);
            let logits_ptr = self.dev_ptr(logits);
            self.run_gemm(&x_wt(r, d, vocab, xc_ptr, w_ptr, logits_ptr, DType::F32, 0.0))?;

            let tgt = tgt_d.slice(c0..c0 + r);
            let mut loss_view = losses.slice_mut(c0..c0 + r);
            let scale = grads.as_ref().map_or(0.0f32, |g| g.2);
            // The first chunk writes dw when the mode says so; the others add to it.
            let dw_mode = match grads.as_ref() {
                Some(g) if c0 == 0 => g.3,
                _ => GradMode::Accumulate,
            };
            // Without gradients the kernel gets a null dlogits and writes losses only.
            let mut dl = dlogits.as_deref_mut();
            // SAFETY: logits/dlogits hold chunk * vocab; targets < vocab (checked above).
            unsafe {
                launch::cross_entropy_rows(
                    st,
                    ks,
                    per_row(r),
                    &mut loss_view,
                    &mut dl,
                    logits,
                    &tgt,
                    ri,
                    vi,
                    scale,
                    row_vec,
                )
            }?;

            if let (Some((dx, dw, _, _)), Some(dxc), Some(dl)) =
                (grads.as_mut(), dxc.as_ref(), dlogits.as_ref())
            {
                let dl_ptr = self.dev_ptr(&**dl);
                let dxc_ptr = self.dev_ptr(&**dxc);
                // dx_chunk[r, d] = dlogits[r, vocab] @ w[vocab, d]
                self.run_gemm(&dy_w(r, vocab, d, dl_ptr, w_ptr, dxc_ptr))?;
                // dw[vocab, d] += dlogits^T @ x_chunk
                self.run_gemm(&dyt_x(r, d, vocab, dl_ptr, xc_ptr, self.dev_ptr(&**dw), dw_mode))?;
                // SAFETY: distinct rows < n of dx; dxc holds chunk * d.
                unsafe {
                    launch::cross_entropy_scatter_rows(st, ks, copy_cfg, *dx, *dxc, &idx, ri, di, rows_vec)
                }?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{chunk_rows, CHUNK_BUDGET_BYTES, CHUNK_MIN_ROWS};

    #[test]
    fn a_128k_vocabulary_takes_a_few_chunks_per_micro_batch() {
        // Llama 3 vocabulary, the 1.3B's d_model, a 16k-token micro-batch all supervised.
        let (vocab, d, n_sup) = (128_256, 2048, 16_384);
        let rows = chunk_rows(n_sup, d, vocab, CHUNK_BUDGET_BYTES);
        let chunks = n_sup.div_ceil(rows);
        // The former fixed 32 Mi logits per chunk gave 261 rows, 63 chunks: 63 passes over the
        // 1 GB fp32 lm_head gradient.
        assert_eq!((32usize << 20) / vocab, 261);
        assert_eq!(rows, 2761);
        assert_eq!(chunks, 6);
        let bytes = rows * (vocab * 6 + d * 4);
        assert!(bytes <= CHUNK_BUDGET_BYTES, "{bytes}");
        assert!(rows * vocab <= i32::MAX as usize);
    }

    #[test]
    fn chunk_rows_respect_the_floor_the_int_limit_and_the_rows() {
        // A tiny budget still gets the floor that amortises the dw traffic.
        assert_eq!(chunk_rows(100_000, 2048, 128_256, 1 << 20), CHUNK_MIN_ROWS);
        // Never more rows than there are.
        assert_eq!(chunk_rows(10, 64, 1000, CHUNK_BUDGET_BYTES), 10);
        assert_eq!(chunk_rows(0, 64, 1000, CHUNK_BUDGET_BYTES), 1);
        // A huge vocabulary: the logits of a chunk stay indexable by an int.
        let vocab = 4 << 20;
        let rows = chunk_rows(100_000, 64, vocab, usize::MAX / 2);
        assert!(rows * vocab <= i32::MAX as usize && rows >= 1, "{rows}");
    }
}
