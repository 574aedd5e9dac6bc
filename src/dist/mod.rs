//! Data parallelism: one process per device, the gradients summed across processes.
//!
//! - [`launch`]: rank, world size and local rank from `mpirun`, `srun` or torchrun-style
//!   variables;
//! - [`collectives`]: the [`Collectives`] trait (all-reduce, broadcast, barrier) and its
//!   single-process form; `mpi` (feature `mpi`) over the system's MPI; [`tcp`] over TCP,
//!   meeting through a file, for jobs without MPI;
//! - [`nccl`]: the GPUs of a job joined into one NCCL communicator (their gradients are then
//!   summed on the devices);
//! - [`shard`]: which micro-batches of each optimizer step a rank trains on;
//! - [`zero`]: which tensors' optimizer state a rank holds under ZeRO-1.
//!
//! docs/distributed.md says how to launch and what is not built yet.

pub mod collectives;
pub mod launch;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod nccl;
pub mod shard;
pub mod tcp;
pub mod zero;

pub use collectives::{broadcast_u64, ensure_agreement, Collectives, SingleProcess};
pub use launch::{Launch, Launcher};
pub use nccl::join_gpu_ranks;
pub use shard::Sharding;
pub use zero::{OptimizerLayout, OptimizerShards};

use anyhow::Result;

/// The collectives for the job `launch` describes: none needed for one process; for more, TCP
/// when a rendezvous file is named (`rendezvous`, else the `SFT_RENDEZVOUS` variable), else MPI.
pub fn connect(launch: &Launch, rendezvous: Option<&std::path::Path>) -> Result<Box<dyn Collectives>> {
    if launch.world_size == 1 {
        return Ok(Box::new(SingleProcess));
    }
    let from_env =
        std::env::var_os(tcp::RENDEZVOUS_ENV).filter(|v| !v.is_empty()).map(std::path::PathBuf::from);
    match rendezvous.map(std::path::Path::to_path_buf).or(from_env) {
        Some(file) => Ok(Box::new(tcp::TcpCollectives::connect(launch, &file)?)),
        None => connect_ranks(launch),
    }
}

#[cfg(feature = "mpi")]
fn connect_ranks(launch: &Launch) -> Result<Box<dyn Collectives>> {
    Ok(Box::new(mpi::MpiCollectives::init(launch)?))
}

#[cfg(not(feature = "mpi"))]
fn connect_ranks(launch: &Launch) -> Result<Box<dyn Collectives>> {
    anyhow::bail!(
        "{} started rank {} of {} processes, but this sft was built without MPI: name a rendezvous file \
         that every rank sees (`sft train --rendezvous FILE`, or SFT_RENDEZVOUS=FILE) for the ranks to meet \
         over TCP, or rebuild with `cargo build --release --features mpi` (needs an MPI library, e.g. \
         Debian's libopenmpi-dev), or start one process",
        launch.launcher,
        launch.rank,
        launch.world_size
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_process_needs_no_mpi() {
        let c = connect(&Launch::single(), None).unwrap();
        assert_eq!((c.rank(), c.world_size()), (0, 1));
    }

    #[cfg(not(feature = "mpi"))]
    #[test]
    fn several_ranks_without_mpi_say_how_to_build() {
        let launch = Launch { launcher: Launcher::OpenMpi, rank: 1, world_size: 2, local_rank: 1 };
        let e = connect(&launch, None).err().unwrap().to_string();
        assert!(e.contains("--features mpi") && e.contains("Open MPI") && e.contains("--rendezvous"), "{e}");
    }
}
