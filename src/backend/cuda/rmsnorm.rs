//! RMSNorm forward (plain and fused with the residual add) and backward.

use anyhow::Result;
use cudarc::driver::LaunchConfig;

use super::launch::{self, int, per_row, BLOCK};
use super::scratch::ensure;
use super::{bf16_mut, bf16_of, f32_mut, f32_of, CudaBackend, CudaBuf};

/// The weight gradient is summed over at most this many row chunks (then over the chunks).
pub const DW_CHUNKS: usize = 64;

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
    ) -> Result<()> {
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
    ) -> Result<()> {
        let dx = bf16_mut(dx, n * d, "rmsnorm_backward dx")?;
        let dw = f32_mut(dw, d, "rmsnorm_backward dw")?;
        let dout = bf16_of(dout, n * d, "rmsnorm_backward dout")?;
        let x = bf16_of(x, n * d, "rmsnorm_backward x")?;
        let w = bf16_of(w, d, "rmsnorm_backward w")?;
        let rstd = f32_of(rstd, n, "rmsnorm_backward rstd")?;
        if n == 0 || d == 0 {
            return Ok(());
        }
        let (ni, di) = (int(n, "n")?, int(d, "d")?);
        // SAFETY: buffer sizes checked above; one block per row.
        unsafe {
            launch::rmsnorm_backward_dx(&self.stream, &self.kernels, per_row(n), dx, dout, x, w, rstd, ni, di)
        }?;

        let rows_per_chunk = n.div_ceil(DW_CHUNKS);
        let n_chunks = n.div_ceil(rows_per_chunk);
        let mut scratch = self.scratch();
        let partial = ensure(&mut scratch.rms_partial, n_chunks * d, &self.stream, "rmsnorm dw partials")?;
        let (rpc, nci) = (int(rows_per_chunk, "rows per chunk")?, int(n_chunks, "chunks")?);
        let col_blocks = d.div_ceil(BLOCK as usize) as u32;
        let cfg = LaunchConfig {
            grid_dim: (col_blocks, n_chunks as u32, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: partial holds n_chunks * d; the kernel bounds-checks columns and rows.
        unsafe {
            launch::rmsnorm_backward_dw_partial(
                &self.stream,
                &self.kernels,
                cfg,
                partial,
                dout,
                x,
                rstd,
                ni,
                di,
                rpc,
            )
        }?;
        let cfg =
            LaunchConfig { grid_dim: (col_blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: as above.
        unsafe {
            launch::rmsnorm_backward_dw_reduce(&self.stream, &self.kernels, cfg, dw, partial, di, nci)
        }?;
        Ok(())
    }
}
