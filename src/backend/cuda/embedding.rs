//! Embedding forward (a gather) and its deterministic backward (tokens grouped by id on the host).

use anyhow::{bail, Result};
use cudarc::driver::{CudaSlice, LaunchConfig};

use super::launch::{self, grid_stride, int, BLOCK};
use super::scratch::ensure;
use super::{bf16_mut, bf16_of, ids_of, CudaBackend, CudaBuf};

/// Token indices sorted by id (stable, so token order within an id), the start of each id's
/// run in that order (plus a final `n`), and the id of each run.
pub fn group_tokens_by_id(ids: &[u32]) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
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
    pub(super) fn embedding_forward(
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
        let cfg = grid_stride(n * d);
        // SAFETY: sizes checked; ids index the table (see above).
        unsafe { launch::embedding_forward(&self.stream, &self.kernels, cfg, out, ids, table, ni, di) }?;
        Ok(())
    }

    /// Deterministic: the ids are read back (one synchronization) and grouped by value on the
    /// host, in token order; one block column then owns each table row and sums its tokens in
    /// that fixed order.
    pub(super) fn embedding_backward(
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
                let (s, ks) = (&self.stream, &self.kernels);
                // SAFETY: every group id < vocab = rows of the table; order entries < n.
                unsafe {
                    launch::embedding_backward_grouped(s, ks, cfg, t, dout, order_d, start_d, id_d, di)
                }?;
            }
            CudaBuf::Bf16(t) => {
                let (s, ks) = (&self.stream, &self.kernels);
                // SAFETY: as above.
                unsafe {
                    launch::embedding_backward_grouped_bf16(s, ks, cfg, t, dout, order_d, start_d, id_d, di)
                }?;
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
