//! NCCL on the CUDA backend: a data-parallel step's gradients summed over the job's GPUs in
//! place, on the backend's one stream, so that the sum is ordered after the backward that wrote
//! them and before the optimizer that reads them, without a host round trip.
//!
//! The ranks find each other through a unique id that rank 0 makes and sends to the others
//! ([`crate::dist::join_gpu_ranks`] does that over the job's host collectives).

use super::{f32_mut, CudaBackend, CudaBuf};
use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::nccl::{result as nccl_result, Comm, Id, ReduceOp};

/// Bytes of an NCCL unique id.
pub const NCCL_ID_BYTES: usize = 128;

/// The communicator of the job this GPU belongs to.
pub(super) struct NcclRanks {
    comm: Comm,
}

// SAFETY: the communicator is used by the backend that owns it, one call at a time (the backend
// is not shared between threads while it runs collectives); NCCL communicators may be used from
// any thread under that condition.
unsafe impl Send for NcclRanks {}

/// Checks that the NCCL library can be loaded (cudarc panics at the first call otherwise).
pub fn ensure_nccl() -> Result<()> {
    // SAFETY: only probes whether the library can be opened.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        bail!(
            "NCCL not found: data parallelism on GPUs needs the NCCL 2 library as libnccl.so on \
             LD_LIBRARY_PATH (Python's nvidia-nccl packages ship only libnccl.so.2: add a link named \
             libnccl.so to it)"
        );
    }
    Ok(())
}

/// A new unique id, made by rank 0 and sent to every other rank before they join.
pub fn nccl_unique_id() -> Result<[u8; NCCL_ID_BYTES]> {
    ensure_nccl()?;
    let id = Id::new().map_err(|e| anyhow!("ncclGetUniqueId failed: {:?}", e.0))?;
    Ok(id.internal().map(|c| c as u8))
}

impl CudaBackend {
    /// Joins the job's NCCL communicator as `rank` of `world` (every rank calls it with rank 0's
    /// [`nccl_unique_id`]; it returns once all have). From then on the model's gradients are
    /// summed over the job's GPUs on the device.
    pub fn join_ranks(&mut self, id: &[u8; NCCL_ID_BYTES], rank: usize, world: usize) -> Result<()> {
        ensure_nccl()?;
        ensure!(self.nccl.is_none(), "this GPU has joined a job already");
        ensure!(rank < world, "rank {rank} of a job of {world}");
        self.ctx.bind_to_thread().context("binding the CUDA context")?;
        let id = Id::uninit(id.map(|b| b as std::ffi::c_char));
        let comm = Comm::from_rank(self.stream.clone(), rank, world, id)
            .map_err(|e| anyhow!("ncclCommInitRank as rank {rank} of {world} failed: {:?}", e.0))?;
        self.nccl = Some(NcclRanks { comm });
        self.name = format!("{} (NCCL rank {rank} of {world})", self.name);
        Ok(())
    }

    /// The ranks of the job this GPU joined, as (rank, world size).
    pub fn nccl_rank(&self) -> Option<(usize, usize)> {
        self.nccl.as_ref().map(|r| (r.comm.rank(), r.comm.world_size()))
    }

    /// `Backend::all_reduce_sum_ranks`: one NCCL group of in-place sums (NCCL fuses them).
    pub(super) fn nccl_all_reduce_sum(&self, bufs: &mut [CudaBuf], lens: &[usize]) -> Result<bool> {
        let Some(ranks) = &self.nccl else { return Ok(false) };
        ensure!(bufs.len() == lens.len(), "all-reduce: {} buffers but {} lengths", bufs.len(), lens.len());
        self.ctx.bind_to_thread().context("binding the CUDA context")?;
        nccl_result::group_start().map_err(|e| anyhow!("ncclGroupStart failed: {:?}", e.0))?;
        let mut queued = Ok(());
        for (i, (buf, &len)) in bufs.iter_mut().zip(lens).enumerate() {
            let slice = match f32_mut(buf, len, "all-reduce") {
                Ok(s) => s,
                Err(e) => {
                    queued = Err(e.context(format!("gradient {i}")));
                    break;
                }
            };
            let mut view = slice.slice_mut(..len);
            if let Err(e) = ranks.comm.all_reduce_in_place(&mut view, &ReduceOp::Sum) {
                queued = Err(anyhow!("ncclAllReduce of gradient {i} ({len} elements) failed: {:?}", e.0));
                break;
            }
        }
        // The group is closed whatever happened, or NCCL would wait for the rest of it.
        let ended = nccl_result::group_end().map_err(|e| anyhow!("ncclGroupEnd failed: {:?}", e.0));
        queued?;
        ended?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_nccl_is_an_error_not_a_panic() {
        // SAFETY: only probes whether the library can be opened.
        match unsafe { cudarc::nccl::sys::is_culib_present() } {
            false => {
                let e = nccl_unique_id().unwrap_err().to_string();
                assert!(e.contains("NCCL not found") && e.contains("libnccl.so"), "{e}");
            }
            // With the library an id can be made without a GPU.
            true => assert_ne!(nccl_unique_id().unwrap(), [0u8; NCCL_ID_BYTES]),
        }
    }
}
