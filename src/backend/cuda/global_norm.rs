//! The global gradient norm's sum of squares.

use anyhow::{bail, Result};
use cudarc::driver::LaunchConfig;

use super::launch::{self, BLOCK};
use super::scratch::ensure;
use super::{CudaBackend, CudaBuf};

/// Blocks per buffer (each writes one partial).
pub const SUMSQ_BLOCKS: usize = 128;

impl CudaBackend {
    /// Deterministic: a fixed grid per buffer writes fp32 block partials, summed on the host in f64.
    pub(super) fn sum_squares(&self, bufs: &[&CudaBuf], lens: &[usize]) -> Result<f64> {
        if bufs.len() != lens.len() {
            bail!("sum_squares: {} buffers but {} lengths", bufs.len(), lens.len());
        }
        let mut scratch = self.scratch();
        let partial =
            ensure(&mut scratch.sumsq_partial, bufs.len() * SUMSQ_BLOCKS, &self.stream, "norm partials")?;
        let mut used = Vec::new();
        for (i, (buf, &len)) in bufs.iter().zip(lens).enumerate() {
            if len == 0 {
                continue;
            }
            if len > buf.len() {
                bail!("sum_squares: buffer {i} has {} elements, asked for {len}", buf.len());
            }
            let blocks = len.div_ceil(BLOCK as usize).min(SUMSQ_BLOCKS);
            let mut out = partial.slice_mut(i * SUMSQ_BLOCKS..i * SUMSQ_BLOCKS + blocks);
            let cfg = LaunchConfig {
                grid_dim: (blocks as u32, 1, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            match buf {
                CudaBuf::F32(s) => {
                    // SAFETY: `blocks` partial slots; len checked.
                    unsafe { launch::sum_squares_f32(&self.stream, &self.kernels, cfg, &mut out, s, len) }?;
                }
                CudaBuf::Bf16(s) => {
                    // SAFETY: `blocks` partial slots; len checked.
                    unsafe { launch::sum_squares_bf16(&self.stream, &self.kernels, cfg, &mut out, s, len) }?;
                }
            }
            used.push((i * SUMSQ_BLOCKS, blocks));
        }
        if used.is_empty() {
            return Ok(0.0);
        }
        let host = self.download(&partial.slice(0..bufs.len() * SUMSQ_BLOCKS))?;
        Ok(used.iter().flat_map(|&(o, b)| host[o..o + b].iter()).map(|&v| v as f64).sum())
    }
}
