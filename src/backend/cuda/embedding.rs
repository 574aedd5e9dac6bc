//! Embedding forward (a gather) and its deterministic backward (tokens grouped by id on the host,
//! when the batch is loaded: `crate::backend::group_tokens_by_id`).

use anyhow::{bail, Result};
use cudarc::driver::{CudaSlice, LaunchConfig};

use super::launch::{self, grid_stride, int, BLOCK};
use super::{bf16_mut, bf16_of, ids_of, CudaBackend, CudaBuf};
use crate::backend::GradMode;

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

    /// Deterministic without a read-back: the host grouped the tokens by id when it loaded the
    /// batch (the `groups` buffer, see `crate::backend::group_tokens_by_id`); one block column
    /// then owns each table row and sums its tokens in that fixed order. The caller made the
    /// grouping from checked ids (< the table's rows). `Overwrite` zeroes the table first: the
    /// kernel writes only the rows of ids in the batch.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn embedding_backward(
        &self,
        dtable: &mut CudaBuf,
        groups: &CudaSlice<u32>,
        n_groups: usize,
        dout: &CudaBuf,
        n: usize,
        d: usize,
        mode: GradMode,
    ) -> Result<()> {
        let groups = ids_of(groups, n + 2 * n_groups + 1, "embedding_backward groups")?;
        let dout = bf16_of(dout, n * d, "embedding_backward dout")?;
        if d == 0 {
            return Ok(());
        }
        let vocab = dtable.len() / d;
        if n_groups > vocab {
            bail!("embedding_backward: {n_groups} distinct ids, the table has {vocab} rows");
        }
        if mode == GradMode::Overwrite {
            self.zero(dtable, vocab * d)?;
        }
        if n == 0 || n_groups == 0 {
            return Ok(());
        }
        let order_d = groups.slice(0..n);
        let start_d = groups.slice(n..n + n_groups + 1);
        let id_d = groups.slice(n + n_groups + 1..n + 2 * n_groups + 1);
        let di = int(d, "d")?;
        let cfg = LaunchConfig {
            grid_dim: (n_groups as u32, d.div_ceil(BLOCK as usize) as u32, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let (s, ks) = (&self.stream, &self.kernels);
        match dtable {
            CudaBuf::F32(t) => {
                // SAFETY: every group id < vocab = rows of the table; order entries < n.
                unsafe {
                    launch::embedding_backward_grouped(s, ks, cfg, t, dout, &order_d, &start_d, &id_d, di)
                }?;
            }
            CudaBuf::Bf16(t) => {
                // SAFETY: as above.
                unsafe {
                    launch::embedding_backward_grouped_bf16(
                        s, ks, cfg, t, dout, &order_d, &start_d, &id_d, di,
                    )
                }?;
            }
        }
        Ok(())
    }
}
