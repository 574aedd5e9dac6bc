//! Embedding, RoPE, SwiGLU and dropout.

use anyhow::{bail, Result};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::launch::{grid_stride, int, BLOCK};
use super::scratch::ensure;
use super::{bf16_mut, bf16_of, ids_of, CudaBackend, CudaBuf};
use crate::backend::{HeadShape, Rope, RopeScaling, RopeStyle};

/// Token indices sorted by id (stable, so token order within an id), the start of each id's
/// run in that order (plus a final `n`), and the id of each run.
pub(super) fn group_tokens_by_id(ids: &[u32]) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let mut order: Vec<u32> = (0..ids.len() as u32).collect();
    order.sort_by_key(|&i| ids[i as usize]);
    let mut group_start = Vec::new();
    let mut group_id = Vec::new();
    for (pos, &tok) in order.iter().enumerate() {
        let id = ids[tok as usize];
        if group_id.last() != Some(&id) {
            group_id.push(id);
            group_start.push(pos as u32);
        }
    }
    group_start.push(ids.len() as u32);
    (order, group_start, group_id)
}

impl CudaBackend {
    /// Ids must be below the table's row count: they are not read back to check (that would
    /// cost a synchronization per forward); the trainer validates token ids when loading data.
    pub(super) fn embedding_forward_impl(
        &self,
        out: &mut CudaBuf,
        ids: &CudaSlice<u32>,
        table: &CudaBuf,
        n: usize,
        d: usize,
    ) -> Result<()> {
        let out = bf16_mut(out, n * d, "embedding_forward out")?;
        let ids = ids_of(ids, n, "embedding_forward ids")?;
        let table = bf16_of(table, d, "embedding_forward table")?;
        if n == 0 || d == 0 {
            return Ok(());
        }
        let (ni, di) = (int(n, "n")?, int(d, "d")?);
        let mut b = self.stream.launch_builder(self.kernels.get("embedding_forward")?);
        b.arg(out).arg(ids).arg(table).arg(&ni).arg(&di);
        // SAFETY: sizes checked; ids index the table (see above).
        unsafe { b.launch(grid_stride(n * d)) }?;
        Ok(())
    }

    /// Deterministic: the ids are read back (one synchronization) and grouped by value on the
    /// host, in token order; one block column then owns each table row and sums its tokens in
    /// that fixed order.
    pub(super) fn embedding_backward_impl(
        &self,
        dtable: &mut CudaBuf,
        ids: &CudaSlice<u32>,
        dout: &CudaBuf,
        n: usize,
        d: usize,
    ) -> Result<()> {
        let ids = ids_of(ids, n, "embedding_backward ids")?;
        let dout = bf16_of(dout, n * d, "embedding_backward dout")?;
        if n == 0 || d == 0 {
            return Ok(());
        }
        let vocab = dtable.len() / d;
        let host_ids = self.download(&ids.slice(0..n))?;
        if let Some((i, &bad)) = host_ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
            bail!("embedding_backward: token {i} has id {bad}, the table has {vocab} rows");
        }
        let (order, group_start, group_id) = group_tokens_by_id(&host_ids);
        let n_groups = group_id.len();

        let mut scratch = self.scratch();
        let s = &mut *scratch;
        let order_d = ensure(&mut s.emb_order, n, &self.stream, "embedding token order")?;
        self.stream.memcpy_htod(&order, &mut order_d.slice_mut(0..n))?;
        let start_d = ensure(&mut s.emb_group_start, n_groups + 1, &self.stream, "embedding groups")?;
        self.stream.memcpy_htod(&group_start, &mut start_d.slice_mut(0..n_groups + 1))?;
        let id_d = ensure(&mut s.emb_group_id, n_groups, &self.stream, "embedding group ids")?;
        self.stream.memcpy_htod(&group_id, &mut id_d.slice_mut(0..n_groups))?;

        let di = int(d, "d")?;
        let cfg = LaunchConfig {
            grid_dim: (n_groups as u32, d.div_ceil(BLOCK as usize) as u32, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        match dtable {
            CudaBuf::F32(t) => {
                let mut b = self.stream.launch_builder(self.kernels.get("embedding_backward_grouped")?);
                b.arg(t).arg(dout).arg(&*order_d).arg(&*start_d).arg(&*id_d).arg(&di);
                // SAFETY: every group id < vocab = rows of the table; order entries < n.
                unsafe { b.launch(cfg) }?;
            }
            CudaBuf::Bf16(t) => {
                let mut b = self.stream.launch_builder(self.kernels.get("embedding_backward_grouped_bf16")?);
                b.arg(t).arg(dout).arg(&*order_d).arg(&*start_d).arg(&*id_d).arg(&di);
                // SAFETY: as above.
                unsafe { b.launch(cfg) }?;
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn rope_impl(
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
        let style_i: i32 = match rope.style {
            RopeStyle::AdjacentPairs => 0,
            RopeStyle::HalfSplit => 1,
        };
        // (kind, factor, low_freq_factor, high_freq_factor, original context) as rope_apply reads them.
        let scaling: (i32, f32, f32, f32, f32) = match rope.scaling {
            None => (0, 1.0, 1.0, 1.0, 1.0),
            Some(RopeScaling::Linear { factor }) => (1, factor, 1.0, 1.0, 1.0),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => (2, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings as f32),
        };
        let mut b = self.stream.launch_builder(self.kernels.get("rope_apply")?);
        b.arg(qkv)
            .arg(positions)
            .arg(&ni)
            .arg(&hi)
            .arg(&hdi)
            .arg(&wi)
            .arg(&rope.theta)
            .arg(&style_i)
            .arg(&direction)
            .arg(&scaling.0)
            .arg(&scaling.1)
            .arg(&scaling.2)
            .arg(&scaling.3)
            .arg(&scaling.4);
        // SAFETY: qkv holds n rows of `width`; the rotated heads lie within a row.
        unsafe { b.launch(grid_stride(total)) }?;
        Ok(())
    }

    pub(super) fn swiglu_forward_impl(
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

    pub(super) fn swiglu_backward_impl(
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

    pub(super) fn dropout_impl(&self, x: &mut CudaBuf, len: usize, p: f32, seed: u64) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::group_tokens_by_id;

    #[test]
    fn tokens_are_grouped_by_id_in_token_order() {
        let (order, start, id) = group_tokens_by_id(&[5, 2, 5, 7, 2, 5]);
        assert_eq!(id, vec![2, 5, 7]);
        assert_eq!(start, vec![0, 2, 5, 6]);
        assert_eq!(order, vec![1, 4, 0, 2, 5, 3]);
    }
}
