//! SwiGLU forward and backward.

use anyhow::Result;

use super::launch::{self, grid_stride, int};
use super::{bf16_mut, bf16_of, CudaBackend, CudaBuf};

/// The `vec` argument of the swiglu kernels: 1 when `hidden` is a multiple of 8 (groups of 8
/// columns, 16-byte accesses), and `(items, vec)`: the kernels' 32-bit item count.
pub fn vec_arg(n: usize, hidden: usize) -> Result<(usize, i32)> {
    let vec = hidden.is_multiple_of(8);
    let items = if vec { n * hidden / 8 } else { n * hidden };
    // The kernels index elements with 32-bit ints.
    int(n * hidden, "swiglu elements (n * hidden)")?;
    Ok((items, i32::from(vec)))
}

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
        int(2 * n * hidden, "swiglu gate_up elements")?;
        let (items, vec) = vec_arg(n, hidden)?;
        // SAFETY: sizes checked above.
        unsafe {
            launch::swiglu_forward(&self.stream, &self.kernels, grid_stride(items), out, gate_up, ni, hi, vec)
        }?;
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
        int(2 * n * hidden, "swiglu gate_up elements")?;
        let (items, vec) = vec_arg(n, hidden)?;
        let cfg = grid_stride(items);
        // SAFETY: sizes checked above.
        unsafe {
            launch::swiglu_backward(&self.stream, &self.kernels, cfg, dgate_up, dout, gate_up, ni, hi, vec)
        }?;
        Ok(())
    }
}
