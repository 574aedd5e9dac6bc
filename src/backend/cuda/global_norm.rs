//! The global gradient norm's sum of squares, and the loss sums: both stay on the device, as
//! split f64 values in a statistics buffer (see `crate::backend::stats`), read once per step.

use anyhow::{bail, Result};
use cudarc::driver::{CudaSlice, LaunchConfig};

use super::launch::{self, int, BLOCK};
use super::scratch::ensure;
use super::{f32_mut, f32_of, CudaBackend, CudaBuf};
use crate::backend::{stats, GradMode};

/// At most this many blocks per buffer (each writes one partial): 8 per SM of an H100.
pub const SUMSQ_BLOCKS: usize = 1024;

/// The blocks of `sum_squares_*` over `len` elements: a block's 256 threads take 8 elements
/// each per pass (16-byte loads), up to [`SUMSQ_BLOCKS`]. The emulation and the cost model
/// launch the same grid.
pub fn sum_squares_blocks(len: usize) -> usize {
    len.div_ceil(BLOCK as usize * 8).clamp(1, SUMSQ_BLOCKS)
}

/// Threads of `sum_split`'s one block (`SUM_SPLIT_THREADS` in kernels/global_norm.cu).
pub const SUM_SPLIT_THREADS: u32 = 256;

impl CudaBackend {
    /// `out[slot..slot + SPLIT] (=|+=) Σ x[..count]`, summed in double in a fixed order, split.
    fn sum_split(
        &self,
        out: &mut CudaSlice<f32>,
        slot: usize,
        x: &CudaSlice<f32>,
        count: usize,
        mode: GradMode,
    ) -> Result<()> {
        let cfg =
            LaunchConfig { grid_dim: (1, 1, 1), block_dim: (SUM_SPLIT_THREADS, 1, 1), shared_mem_bytes: 0 };
        let count = int(count, "sum length")?;
        let accumulate = i32::from(mode == GradMode::Accumulate);
        let mut split = out.slice_mut(slot..slot + stats::SPLIT);
        // SAFETY: the split value is SPLIT elements of `out`; x holds `count` elements (checked
        // by callers).
        unsafe { launch::sum_split(&self.stream, &self.kernels, cfg, &mut split, x, count, accumulate) }?;
        Ok(())
    }

    /// Deterministic: a fixed grid per buffer writes fp32 block partials (packed one buffer after
    /// another), which one block then adds in double into `stats[SUMSQ..]`.
    pub(super) fn sum_squares(&self, bufs: &[&CudaBuf], lens: &[usize], out: &mut CudaBuf) -> Result<()> {
        if bufs.len() != lens.len() {
            bail!("sum_squares: {} buffers but {} lengths", bufs.len(), lens.len());
        }
        let out = f32_mut(out, stats::SUMSQ + stats::SPLIT, "sum_squares statistics")?;
        let mut scratch = self.scratch();
        let partial =
            ensure(&mut scratch.sumsq_partial, bufs.len() * SUMSQ_BLOCKS, &self.stream, "norm partials")?;
        let mut used = 0;
        for (i, (buf, &len)) in bufs.iter().zip(lens).enumerate() {
            if len == 0 {
                continue;
            }
            if len > buf.len() {
                bail!("sum_squares: buffer {i} has {} elements, asked for {len}", buf.len());
            }
            let blocks = sum_squares_blocks(len);
            let mut part = partial.slice_mut(used..used + blocks);
            let cfg = LaunchConfig {
                grid_dim: (blocks as u32, 1, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            match buf {
                CudaBuf::F32(s) => {
                    // SAFETY: `blocks` partial slots; len checked.
                    unsafe { launch::sum_squares_f32(&self.stream, &self.kernels, cfg, &mut part, s, len) }?;
                }
                CudaBuf::Bf16(s) => {
                    // SAFETY: `blocks` partial slots; len checked.
                    unsafe { launch::sum_squares_bf16(&self.stream, &self.kernels, cfg, &mut part, s, len) }?;
                }
            }
            used += blocks;
        }
        self.sum_split(out, stats::SUMSQ, partial, used, GradMode::Overwrite)
    }

    /// The loss sums: `stats[slot..slot + SPLIT] (=|+=) Σ x[..len]`.
    pub(super) fn sum_into(
        &self,
        out: &mut CudaBuf,
        slot: usize,
        x: &CudaBuf,
        len: usize,
        mode: GradMode,
    ) -> Result<()> {
        let out = f32_mut(out, slot + stats::SPLIT, "sum_into statistics")?;
        let x = f32_of(x, len, "sum_into source")?;
        self.sum_split(out, slot, x, len, mode)
    }
}
