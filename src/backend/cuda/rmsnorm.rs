//! RMSNorm forward (plain, and fused with the residual add and the branch's dropout) and the
//! backward in one kernel (dx, the weight-gradient partials and the masked branch gradient),
//! then an in-order reduction of the partials.

use anyhow::{bail, Result};
use cudarc::driver::LaunchConfig;

use super::launch::{self, int, per_row, BLOCK};
use super::scratch::ensure;
use super::{bf16_mut, bf16_of, f32_mut, f32_of, BranchGrad, CudaBackend, CudaBuf, Dropout};

/// The backward runs at most this many blocks (row chunks), each summing the weight gradient of
/// its rows; then the chunks are summed in order. Enough blocks to fill an H100 several times.
pub const DW_CHUNKS: usize = 512;
/// The widest row the backward supports (its per-column sums live in shared memory);
/// RMSNORM_MAX_D in kernels/rmsnorm.cu.
pub const MAX_D: usize = 8192;

/// `(rows per chunk, chunks)` of the backward for `n` rows (`n` > 0).
pub fn dw_chunks(n: usize) -> (usize, usize) {
    let rows_per_chunk = n.div_ceil(DW_CHUNKS);
    (rows_per_chunk, n.div_ceil(rows_per_chunk))
}

/// The launch of rmsnorm_backward over `n_chunks` row chunks of width `d`: a thread per group of
/// 8 columns (rounded up to whole warps) where `d` is a multiple of 8, so that each thread keeps
/// its columns in registers across the chunk's rows (`d` <= MAX_D: at most 1024 threads); else
/// blocks of `BLOCK` over the general loop.
pub fn backward_config(n_chunks: usize, d: usize) -> LaunchConfig {
    let threads =
        if d.is_multiple_of(8) && d <= MAX_D { (d / 8).div_ceil(32).max(1) as u32 * 32 } else { BLOCK };
    LaunchConfig { grid_dim: (n_chunks as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

/// The launch of rmsnorm_backward_dw_reduce over `d` columns: blocks of (32 columns, 8 chunk lanes).
pub fn dw_reduce_config(d: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (d.div_ceil(32) as u32, 1, 1), block_dim: (32, 8, 1), shared_mem_bytes: 0 }
}

/// `(p, scale, seed)` as the kernels take a dropout mask; p = 0 for none.
pub fn dropout_args(dropout: Option<Dropout>) -> (f32, f32, u64) {
    match dropout {
        Some(m) if m.p > 0.0 => (m.p, 1.0 / (1.0 - m.p), m.seed),
        _ => (0.0, 1.0, 0),
    }
}

impl CudaBackend {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rmsnorm_forward(
        &self,
        out: &mut CudaBuf,
        rstd: &mut CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        n: usize,
        d: usize,
        eps: f32,
    ) -> Result<()> {
        let out = bf16_mut(out, n * d, "rmsnorm_forward out")?;
        let rstd = f32_mut(rstd, n, "rmsnorm_forward rstd")?;
        let x = bf16_of(x, n * d, "rmsnorm_forward x")?;
        let w = bf16_of(w, d, "rmsnorm_forward w")?;
        if n == 0 || d == 0 {
            return Ok(());
        }
        let (ni, di) = (int(n, "n")?, int(d, "d")?);
        // SAFETY: buffer sizes checked above; one block per row.
        unsafe {
            launch::rmsnorm_forward(&self.stream, &self.kernels, per_row(n), out, rstd, x, w, ni, di, eps)
        }?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn residual_rmsnorm_forward(
        &self,
        x_out: &mut CudaBuf,
        out: &mut CudaBuf,
        rstd: &mut CudaBuf,
        x_in: &CudaBuf,
        delta: &CudaBuf,
        w: &CudaBuf,
        n: usize,
        d: usize,
        eps: f32,
        dropout: Option<Dropout>,
    ) -> Result<()> {
        if let Some(m) = dropout {
            m.check("residual_rmsnorm_forward")?;
        }
        let x_out = bf16_mut(x_out, n * d, "residual_rmsnorm_forward x_out")?;
        let out = bf16_mut(out, n * d, "residual_rmsnorm_forward out")?;
        let rstd = f32_mut(rstd, n, "residual_rmsnorm_forward rstd")?;
        let x_in = bf16_of(x_in, n * d, "residual_rmsnorm_forward x_in")?;
        let delta = bf16_of(delta, n * d, "residual_rmsnorm_forward delta")?;
        let w = bf16_of(w, d, "residual_rmsnorm_forward w")?;
        if n == 0 || d == 0 {
            return Ok(());
        }
        let (ni, di) = (int(n, "n")?, int(d, "d")?);
        let (p, scale, seed) = dropout_args(dropout);
        let cfg = per_row(n);
        // SAFETY: buffer sizes checked above; one block per row.
        unsafe {
            launch::residual_rmsnorm_forward(
                &self.stream,
                &self.kernels,
                cfg,
                x_out,
                out,
                rstd,
                x_in,
                delta,
                w,
                ni,
                di,
                eps,
                p,
                scale,
                seed,
            )
        }?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn rmsnorm_backward(
        &self,
        dx: &mut CudaBuf,
        dw: &mut CudaBuf,
        dout: &CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        rstd: &CudaBuf,
        n: usize,
        d: usize,
        branch: Option<BranchGrad<'_, Self>>,
    ) -> Result<()> {
        if d > MAX_D {
            bail!("rmsnorm_backward: d = {d} exceeds the widest row the kernel supports ({MAX_D})");
        }
        let dx = bf16_mut(dx, n * d, "rmsnorm_backward dx")?;
        let dw = f32_mut(dw, d, "rmsnorm_backward dw")?;
        let dout = bf16_of(dout, n * d, "rmsnorm_backward dout")?;
        let x = bf16_of(x, n * d, "rmsnorm_backward x")?;
        let w = bf16_of(w, d, "rmsnorm_backward w")?;
        let rstd = f32_of(rstd, n, "rmsnorm_backward rstd")?;
        let (mut dbranch, mask) = match branch {
            Some(b) => {
                b.dropout.check("rmsnorm_backward")?;
                (Some(bf16_mut(b.out, n * d, "rmsnorm_backward branch out")?), Some(b.dropout))
            }
            None => (None, None),
        };
        if n == 0 || d == 0 {
            return Ok(());
        }
        let (ni, di) = (int(n, "n")?, int(d, "d")?);
        let (p, scale, seed) = dropout_args(mask);
        let (rows_per_chunk, n_chunks) = dw_chunks(n);
        let mut scratch = self.scratch();
        let partial = ensure(&mut scratch.rms_partial, n_chunks * d, &self.stream, "rmsnorm dw partials")?;
        let (rpc, nci) = (int(rows_per_chunk, "rows per chunk")?, int(n_chunks, "chunks")?);
        let cfg = backward_config(n_chunks, d);
        // SAFETY: buffer sizes checked above; partial holds n_chunks * d; one block per chunk of
        // rows_per_chunk rows, the last one bounded by n; the kernel bounds-checks columns.
        unsafe {
            launch::rmsnorm_backward(
                &self.stream,
                &self.kernels,
                cfg,
                dx,
                partial,
                &mut dbranch,
                dout,
                x,
                w,
                rstd,
                ni,
                di,
                rpc,
                p,
                scale,
                seed,
            )
        }?;
        // SAFETY: as above; the kernel bounds-checks columns.
        unsafe {
            launch::rmsnorm_backward_dw_reduce(
                &self.stream,
                &self.kernels,
                dw_reduce_config(d),
                dw,
                partial,
                di,
                nci,
            )
        }?;
        Ok(())
    }
}
