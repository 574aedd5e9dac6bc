//! SwiGLU forward and backward.

use anyhow::Result;
use cudarc::driver::PushKernelArg;

use super::launch::{grid_stride, int};
use super::{bf16_mut, bf16_of, CudaBackend, CudaBuf};

impl CudaBackend {
    pub(super) fn swiglu_forward(
        &self,
        out: &mut CudaBuf,
        gate_up: &CudaBuf,
        n: usize,
        hidden: usize,
    ) -> Result<()> {
        let out = bf16_mut(out, n * hidden, "swiglu_forward out")?;
        let gate_up = bf16_of(gate_up, 2 * n * hidden, "swiglu_forward gate_up")?;
        if n * hidden == 0 {
            return Ok(());
        }
        let (ni, hi) = (int(n, "n")?, int(hidden, "hidden")?);
        let mut b = self.stream.launch_builder(self.kernels.get("swiglu_forward")?);
        b.arg(out).arg(gate_up).arg(&ni).arg(&hi);
        // SAFETY: sizes checked above.
        unsafe { b.launch(grid_stride(n * hidden)) }?;
        Ok(())
    }

    pub(super) fn swiglu_backward(
        &self,
        dgate_up: &mut CudaBuf,
        dout: &CudaBuf,
        gate_up: &CudaBuf,
        n: usize,
        hidden: usize,
    ) -> Result<()> {
        let dgate_up = bf16_mut(dgate_up, 2 * n * hidden, "swiglu_backward dgate_up")?;
        let dout = bf16_of(dout, n * hidden, "swiglu_backward dout")?;
        let gate_up = bf16_of(gate_up, 2 * n * hidden, "swiglu_backward gate_up")?;
        if n * hidden == 0 {
            return Ok(());
        }
        let (ni, hi) = (int(n, "n")?, int(hidden, "hidden")?);
        let mut b = self.stream.launch_builder(self.kernels.get("swiglu_backward")?);
        b.arg(dgate_up).arg(dout).arg(gate_up).arg(&ni).arg(&hi);
        // SAFETY: sizes checked above.
        unsafe { b.launch(grid_stride(n * hidden)) }?;
        Ok(())
    }
}
