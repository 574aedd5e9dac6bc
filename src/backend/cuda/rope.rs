//! Rotary embeddings: `rope_table` builds a micro-batch's fp32 (cos, sin) table once, from the
//! positions and the frequencies (computed on the host, uploaded once per rope and head_dim);
//! `rope_apply` rotates forward or back from it.

use anyhow::{bail, Result};
use cudarc::driver::{CudaSlice, LaunchConfig};

use super::launch::{self, grid_stride, int, BLOCK};
use super::{bf16_mut, f32_mut, f32_of, ids_of, CudaBackend, CudaBuf};
use crate::backend::{HeadShape, Rope, RopeStyle};

/// The `style` argument of rope_apply.
pub fn style_arg(style: RopeStyle) -> i32 {
    match style {
        RopeStyle::AdjacentPairs => 0,
        RopeStyle::HalfSplit => 1,
    }
}

/// The `vec` argument of rope_apply: 1 when a head's groups can move 16 bytes at a time (8 bf16:
/// head_dim a multiple of 16, so that both pairings' groups stay inside a head, and rows a
/// multiple of 8 elements, so that every group is 16-byte aligned).
pub fn vec_arg(heads: HeadShape) -> i32 {
    i32::from(heads.head_dim.is_multiple_of(16) && heads.qkv_width().is_multiple_of(8))
}

/// The launch of rope_apply: one block per row.
pub fn apply_config(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

impl CudaBackend {
    pub(super) fn rope_table(
        &self,
        table: &mut CudaBuf,
        positions: &CudaSlice<u32>,
        n: usize,
        head_dim: usize,
        rope: Rope,
    ) -> Result<()> {
        if !head_dim.is_multiple_of(2) {
            bail!("rope_table: head_dim {head_dim} is odd");
        }
        let table = f32_mut(table, n * head_dim, "rope_table table")?;
        let positions = ids_of(positions, n, "rope_table positions")?;
        let half = head_dim / 2;
        let total = n * half;
        if total == 0 {
            return Ok(());
        }
        let (ni, hi) = (int(n, "n")?, int(half, "head_dim / 2")?);
        int(total, "rope table entries (n * head_dim / 2)")?;
        let mut scratch = self.scratch();
        // The frequencies depend on the model only: uploaded the first time (and again only if
        // another rope or head_dim comes), not per micro-batch.
        if scratch.rope_freqs.as_ref().is_none_or(|(r, hd, _)| *r != rope || *hd != head_dim) {
            let freqs: Vec<f32> = (0..half).map(|j| rope.inv_freq(j, head_dim)).collect();
            let dev = self.stream.clone_htod(&freqs)?;
            scratch.rope_freqs = Some((rope, head_dim, dev));
        }
        let (_, _, freqs) = scratch.rope_freqs.as_ref().expect("just filled");
        // SAFETY: table holds n * head_dim floats = n * half (cos, sin) pairs; positions n ids;
        // freqs half floats.
        unsafe {
            launch::rope_table(
                &self.stream,
                &self.kernels,
                grid_stride(total),
                table,
                positions,
                freqs,
                ni,
                hi,
            )
        }?;
        Ok(())
    }

    pub(super) fn rope_forward(
        &self,
        qkv: &mut CudaBuf,
        table: &CudaBuf,
        n: usize,
        heads: HeadShape,
        style: RopeStyle,
    ) -> Result<()> {
        let qkv = bf16_mut(qkv, n * heads.qkv_width(), "rope qkv")?;
        let table = f32_of(table, n * heads.head_dim, "rope table")?;
        self.rope_apply(qkv, table, n, heads, style, 1.0)
    }

    pub(super) fn rope_backward(
        &self,
        dqkv: &mut CudaBuf,
        table: &CudaBuf,
        n: usize,
        heads: HeadShape,
        style: RopeStyle,
    ) -> Result<()> {
        let dqkv = bf16_mut(dqkv, n * heads.qkv_width(), "rope dqkv")?;
        let table = f32_of(table, n * heads.head_dim, "rope table")?;
        self.rope_apply(dqkv, table, n, heads, style, -1.0)
    }

    /// Rotates the q and k heads of `n` rows of `qkv` by `direction · angle` (1 forward, -1
    /// backward); `table` holds n · head_dim floats.
    pub(super) fn rope_apply(
        &self,
        qkv: &mut CudaSlice<half::bf16>,
        table: &CudaSlice<f32>,
        n: usize,
        heads: HeadShape,
        style: RopeStyle,
        direction: f32,
    ) -> Result<()> {
        if !heads.head_dim.is_multiple_of(2) {
            bail!("rope: head_dim {} is odd", heads.head_dim);
        }
        let (width, rot_heads) = (heads.qkv_width(), heads.n_heads + heads.n_kv_heads);
        if qkv.len() < n * width || table.len() < n * heads.head_dim {
            bail!("rope: buffers of {} and {} elements for {n} rows of {heads:?}", qkv.len(), table.len());
        }
        if n == 0 || rot_heads * heads.head_dim == 0 {
            return Ok(());
        }
        let (ni, hi, hdi, wi) =
            (int(n, "n")?, int(rot_heads, "heads")?, int(heads.head_dim, "head_dim")?, int(width, "width")?);
        int(rot_heads * heads.head_dim / 2, "rotated pairs per row")?;
        let (s, ks) = (&self.stream, &self.kernels);
        let (style_i, vec) = (style_arg(style), vec_arg(heads));
        // SAFETY: qkv holds n rows of `width`, the rotated heads lie within a row; table holds
        // n rows of head_dim / 2 (cos, sin) pairs.
        unsafe {
            launch::rope_apply(s, ks, apply_config(n), qkv, table, ni, hi, hdi, wi, style_i, direction, vec)
        }?;
        Ok(())
    }
}
