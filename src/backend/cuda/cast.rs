//! Precision conversion between a bf16 and an fp32 buffer (`copy` between precisions).

use anyhow::{bail, Result};

use super::launch::{self, grid_stride, int};
use super::{CudaBackend, CudaBuf};

impl CudaBackend {
    /// Converts the first `len` elements of `src` into `dst`, which has the other precision;
    /// the caller has checked both lengths.
    pub(super) fn cast(&self, dst: &mut CudaBuf, src: &CudaBuf, len: usize) -> Result<()> {
        let len_i = int(len, "cast len")?;
        // Threads take groups of 8 elements (then the last len % 8 one each).
        let cfg = grid_stride(len.div_ceil(8));
        match (dst, src) {
            (CudaBuf::Bf16(d), CudaBuf::F32(s)) => {
                // SAFETY: both buffers hold at least `len` elements (checked above).
                unsafe { launch::cast_f32_to_bf16(&self.stream, &self.kernels, cfg, d, s, len_i) }?;
            }
            (CudaBuf::F32(d), CudaBuf::Bf16(s)) => {
                // SAFETY: both buffers hold at least `len` elements (checked above).
                unsafe { launch::cast_bf16_to_f32(&self.stream, &self.kernels, cfg, d, s, len_i) }?;
            }
            _ => bail!("cast: both buffers have the same precision (copy them instead)"),
        }
        Ok(())
    }
}
