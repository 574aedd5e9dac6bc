//! Dropout in place, bf16 or fp32, with the counter-based mask of `crate::rng::uniform`.

use anyhow::{bail, Result};

use super::launch::{self, grid_stride, int};
use super::{CudaBackend, CudaBuf};

impl CudaBackend {
    pub(super) fn dropout(&self, x: &mut CudaBuf, len: usize, p: f32, seed: u64) -> Result<()> {
        if !(0.0..1.0).contains(&p) {
            bail!("dropout: p = {p} is outside [0, 1)");
        }
        if len > x.len() {
            bail!("dropout: {len} elements of a buffer of {}", x.len());
        }
        if p == 0.0 || len == 0 {
            return Ok(());
        }
        let scale = 1.0 / (1.0 - p);
        let len_i = int(len, "dropout len")?;
        // Threads take groups of 8 elements (then the last len % 8 one each).
        let cfg = grid_stride(len.div_ceil(8));
        match x {
            CudaBuf::Bf16(s) => {
                // SAFETY: len checked above.
                unsafe { launch::dropout_bf16(&self.stream, &self.kernels, cfg, s, len_i, p, scale, seed) }?;
            }
            CudaBuf::F32(s) => {
                // SAFETY: len checked above.
                unsafe { launch::dropout_f32(&self.stream, &self.kernels, cfg, s, len_i, p, scale, seed) }?;
            }
        }
        Ok(())
    }
}
