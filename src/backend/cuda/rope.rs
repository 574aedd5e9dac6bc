//! Rotary embeddings: one kernel, `rope_apply`, rotates forward or back.

use anyhow::{bail, Result};
use cudarc::driver::CudaSlice;

use super::launch::{self, grid_stride, int};
use super::{bf16_mut, ids_of, CudaBackend, CudaBuf};
use crate::backend::{HeadShape, Rope, RopeScaling, RopeStyle};

/// The `style` argument of rope_apply.
pub fn style_arg(style: RopeStyle) -> i32 {
    match style {
        RopeStyle::AdjacentPairs => 0,
        RopeStyle::HalfSplit => 1,
    }
}

/// (kind, factor, low_freq_factor, high_freq_factor, original context) as rope_apply reads them.
pub fn scaling_args(scaling: Option<RopeScaling>) -> (i32, f32, f32, f32, f32) {
    match scaling {
        None => (0, 1.0, 1.0, 1.0, 1.0),
        Some(RopeScaling::Linear { factor }) => (1, factor, 1.0, 1.0, 1.0),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => (2, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings as f32),
    }
}

impl CudaBackend {
    pub(super) fn rope_forward(
        &self,
        qkv: &mut CudaBuf,
        positions: &CudaSlice<u32>,
        n: usize,
        heads: HeadShape,
        rope: Rope,
    ) -> Result<()> {
        self.rope_apply(qkv, positions, n, heads, rope, 1.0)
    }

    pub(super) fn rope_backward(
        &self,
        dqkv: &mut CudaBuf,
        positions: &CudaSlice<u32>,
        n: usize,
        heads: HeadShape,
        rope: Rope,
    ) -> Result<()> {
        self.rope_apply(dqkv, positions, n, heads, rope, -1.0)
    }

    /// Rotates by `direction · angle`: 1 forward, -1 backward.
    #[allow(clippy::too_many_arguments)]
    fn rope_apply(
        &self,
        qkv: &mut CudaBuf,
        positions: &CudaSlice<u32>,
        n: usize,
        heads: HeadShape,
        rope: Rope,
        direction: f32,
    ) -> Result<()> {
        let width = heads.qkv_width();
        let qkv = bf16_mut(qkv, n * width, "rope qkv")?;
        let positions = ids_of(positions, n, "rope positions")?;
        if !heads.head_dim.is_multiple_of(2) {
            bail!("rope: head_dim {} is odd", heads.head_dim);
        }
        let rot_heads = heads.n_heads + heads.n_kv_heads;
        let total = n * rot_heads * heads.head_dim / 2;
        if total == 0 {
            return Ok(());
        }
        let (ni, hi, hdi, wi) =
            (int(n, "n")?, int(rot_heads, "heads")?, int(heads.head_dim, "head_dim")?, int(width, "width")?);
        let style_i = style_arg(rope.style);
        let (kind, factor, low, high, original) = scaling_args(rope.scaling);
        let (s, ks, cfg) = (&self.stream, &self.kernels, grid_stride(total));
        // SAFETY: qkv holds n rows of `width`; the rotated heads lie within a row.
        unsafe {
            launch::rope_apply(
                s, ks, cfg, qkv, positions, ni, hi, hdi, wi, rope.theta, style_i, direction, kind, factor,
                low, high, original,
            )
        }?;
        Ok(())
    }
}
