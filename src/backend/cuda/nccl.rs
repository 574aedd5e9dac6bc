//! NCCL on the CUDA backend: a data-parallel step's gradients summed over the job's GPUs in
//! place, without a host round trip, on a communication stream of their own: each collective
//! waits for the work queued on the compute stream so far (the backward that wrote the
//! gradients), and the compute stream goes on beside it (the backward of the layers below) until
//! `wait_ranks` orders what follows (the optimizer) after every collective queued.
//!
//! The ranks find each other through a unique id that rank 0 makes and sends to the others
//! ([`crate::dist::join_gpu_ranks`] does that over the job's host collectives).

use std::sync::Arc;

use super::{f32_mut, CudaBackend, CudaBuf};
use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::driver::CudaStream;
use cudarc::nccl::{result as nccl_result, Comm, Id, ReduceOp};

/// Bytes of an NCCL unique id.
pub const NCCL_ID_BYTES: usize = 128;

/// The communicator of the job this GPU belongs to, and the stream its collectives run on.
pub(super) struct NcclRanks {
    comm: Comm,
    stream: Arc<CudaStream>,
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

/// The GPU a rank of local rank `local_rank` opens when `visible` GPUs are visible to it: GPU
/// `local_rank` of a node's GPUs, or the only one where the launcher gives each rank its own
/// (`CUDA_VISIBLE_DEVICES` per task, as SLURM's `--gpus-per-task=1` does).
pub fn gpu_for_local_rank(local_rank: usize, visible: usize) -> Result<usize> {
    match visible {
        0 => bail!("no CUDA GPU is visible to local rank {local_rank} (check CUDA_VISIBLE_DEVICES)"),
        1 => Ok(0),
        n if local_rank < n => Ok(local_rank),
        n => bail!(
            "local rank {local_rank} sees {n} GPUs: start at most one rank per GPU on each node (or give each \
             rank one GPU through CUDA_VISIBLE_DEVICES)"
        ),
    }
}

/// [`CudaBackend::new`] on this rank's GPU ([`gpu_for_local_rank`]).
pub fn open_local_gpu(local_rank: usize) -> Result<CudaBackend> {
    super::ensure_driver()?;
    let visible = cudarc::driver::CudaContext::device_count().context("counting the visible GPUs")?;
    let gpu = gpu_for_local_rank(local_rank, visible.max(0) as usize)?;
    CudaBackend::new(gpu)
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
        // Event tracking is off (see `new`): every crossing between the two streams is an
        // explicit join in `nccl_group` and `nccl_wait`.
        let stream = self.stream.fork().context("creating the NCCL stream")?;
        let comm = Comm::from_rank(stream.clone(), rank, world, id)
            .map_err(|e| anyhow!("ncclCommInitRank as rank {rank} of {world} failed: {:?}", e.0))?;
        self.nccl = Some(NcclRanks { comm, stream });
        self.name = format!("{} (NCCL rank {rank} of {world})", self.name);
        Ok(())
    }

    /// The ranks of the job this GPU joined, as (rank, world size).
    pub fn nccl_rank(&self) -> Option<(usize, usize)> {
        self.nccl.as_ref().map(|r| (r.comm.rank(), r.comm.world_size()))
    }

    /// `Backend::all_reduce_sum_ranks`: one NCCL group of in-place sums (NCCL fuses them).
    pub(super) fn nccl_all_reduce_sum(&self, bufs: &mut [CudaBuf], lens: &[usize]) -> Result<bool> {
        self.nccl_group("ncclAllReduce", bufs, lens, |comm, buf, len, _| {
            let mut view = f32_mut(buf, len, "all-reduce")?.slice_mut(..len);
            comm.all_reduce_in_place(&mut view, &ReduceOp::Sum).map_err(nccl_error)
        })
    }

    /// `Backend::reduce_sum_ranks`: each buffer summed into its root (ZeRO-1's reduce-scatter,
    /// tensor by tensor).
    pub(super) fn nccl_reduce_sum(
        &self,
        bufs: &mut [CudaBuf],
        lens: &[usize],
        roots: &[usize],
    ) -> Result<bool> {
        ensure!(roots.len() == bufs.len(), "reduce: {} buffers but {} roots", bufs.len(), roots.len());
        self.nccl_group("ncclReduce", bufs, lens, |comm, buf, len, i| {
            let mut view = f32_mut(buf, len, "reduce")?.slice_mut(..len);
            comm.reduce_in_place(&mut view, &ReduceOp::Sum, roots[i] as i32).map_err(nccl_error)
        })
    }

    /// `Backend::wait_ranks`: the compute stream waits for every collective queued so far.
    pub(super) fn nccl_wait(&self) -> Result<()> {
        if let Some(ranks) = &self.nccl {
            self.stream.join(&ranks.stream).context("waiting for the NCCL stream")?;
        }
        Ok(())
    }

    /// `Backend::broadcast_ranks`: each buffer copied from its root (ZeRO-1's all-gather of the
    /// new weights, in the buffers' own precision), before the next forward reads them.
    pub(super) fn nccl_broadcast(
        &self,
        bufs: &mut [CudaBuf],
        lens: &[usize],
        roots: &[usize],
    ) -> Result<bool> {
        ensure!(roots.len() == bufs.len(), "broadcast: {} buffers but {} roots", bufs.len(), roots.len());
        let queued = self.nccl_group("ncclBroadcast", bufs, lens, |comm, buf, len, i| {
            let root = roots[i] as i32;
            ensure!(buf.len() >= len, "broadcast: buffer holds {} elements, {len} needed", buf.len());
            match buf {
                CudaBuf::Bf16(s) => comm.broadcast_in_place(&mut s.slice_mut(..len), root),
                CudaBuf::F32(s) => comm.broadcast_in_place(&mut s.slice_mut(..len), root),
            }
            .map_err(nccl_error)
        })?;
        if queued {
            self.nccl_wait()?;
        }
        Ok(queued)
    }

    /// One NCCL group of `op` over every buffer (NCCL runs them together), on the NCCL stream
    /// after the work queued on the compute stream so far; false when this GPU joined no job.
    fn nccl_group(
        &self,
        name: &str,
        bufs: &mut [CudaBuf],
        lens: &[usize],
        mut op: impl FnMut(&Comm, &mut CudaBuf, usize, usize) -> Result<nccl_result::NcclStatus>,
    ) -> Result<bool> {
        let Some(ranks) = &self.nccl else { return Ok(false) };
        ensure!(bufs.len() == lens.len(), "{name}: {} buffers but {} lengths", bufs.len(), lens.len());
        self.ctx.bind_to_thread().context("binding the CUDA context")?;
        ranks.stream.join(&self.stream).context("ordering the NCCL stream after the compute stream")?;
        nccl_result::group_start().map_err(nccl_error).context("ncclGroupStart")?;
        let mut queued = Ok(());
        for (i, (buf, &len)) in bufs.iter_mut().zip(lens).enumerate() {
            if let Err(e) = op(&ranks.comm, buf, len, i) {
                queued = Err(e.context(format!("{name} of buffer {i} ({len} elements)")));
                break;
            }
        }
        // The group is closed whatever happened, or NCCL would wait for the rest of it.
        let ended = nccl_result::group_end().map_err(nccl_error).context("ncclGroupEnd");
        queued?;
        ended?;
        Ok(true)
    }
}

fn nccl_error(e: nccl_result::NcclError) -> anyhow::Error {
    anyhow!("NCCL error {:?}", e.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_local_rank_takes_its_gpu_or_the_only_one() {
        assert_eq!(gpu_for_local_rank(3, 8).unwrap(), 3);
        assert_eq!(gpu_for_local_rank(3, 1).unwrap(), 0);
        assert_eq!(gpu_for_local_rank(0, 2).unwrap(), 0);
        let e = gpu_for_local_rank(8, 8).unwrap_err().to_string();
        assert!(e.contains("local rank 8 sees 8 GPUs"), "{e}");
        assert!(gpu_for_local_rank(0, 0).unwrap_err().to_string().contains("CUDA_VISIBLE_DEVICES"));
    }

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
