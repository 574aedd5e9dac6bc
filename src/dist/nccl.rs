//! How the GPUs of a job find each other: rank 0 makes an NCCL unique id and sends it to every
//! rank over the job's host collectives (MPI, as the launcher started it); each rank then joins
//! the communicator with the GPU of its local rank.

use super::Collectives;
use crate::backend::cuda::nccl::{nccl_unique_id, NCCL_ID_BYTES};
use crate::backend::cuda::CudaBackend;
use anyhow::{Context, Result};

/// Joins `backend` (this rank's GPU) to the job's NCCL communicator, every rank at once.
pub fn join_gpu_ranks(backend: &mut CudaBackend, comm: &dyn Collectives) -> Result<()> {
    let mut id = [0u8; NCCL_ID_BYTES];
    if comm.is_main() {
        // A rank 0 without NCCL fails here; the others, waiting below, are ended by its abort.
        id = nccl_unique_id()?;
    }
    comm.broadcast_bytes(&mut id, 0).context("sending the NCCL unique id from rank 0")?;
    backend.join_ranks(&id, comm.rank(), comm.world_size())
}
