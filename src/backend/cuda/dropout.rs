//! Dropout in place, bf16 or fp32, with the counter-based mask of `crate::rng::uniform`.

use anyhow::{bail, Result};
use cudarc::driver::PushKernelArg;

use super::launch::grid_stride;
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
        match x {
            CudaBuf::Bf16(s) => {
                let mut b = self.stream.launch_builder(self.kernels.get("dropout_bf16")?);
                b.arg(s).arg(&len).arg(&p).arg(&scale).arg(&seed);
                // SAFETY: len checked above.
                unsafe { b.launch(grid_stride(len)) }?;
            }
            CudaBuf::F32(s) => {
                let mut b = self.stream.launch_builder(self.kernels.get("dropout_f32")?);
                b.arg(s).arg(&len).arg(&p).arg(&scale).arg(&seed);
                // SAFETY: len checked above.
                unsafe { b.launch(grid_stride(len)) }?;
            }
        }
        Ok(())
    }
}
