//! [`Collectives`] over MPI (the system's Open MPI or MPICH, through the `mpi` crate): the
//! data-parallel path on the CPU backend, and how ranks on several machines find each other.

use super::collectives::Collectives;
use super::launch::Launch;
use anyhow::{bail, ensure, Context, Result};
use mpi::collective::SystemOperation;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::{CommunicatorCollectives, Root};

/// MPI's world communicator; MPI is finalized when this is dropped.
pub struct MpiCollectives {
    // Field order: the communicator goes before the universe that finalizes MPI.
    world: SimpleCommunicator,
    _universe: mpi::environment::Universe,
}

impl MpiCollectives {
    /// Initializes MPI and checks that it sees the job `launch` read from the environment.
    pub fn init(launch: &Launch) -> Result<MpiCollectives> {
        let Some(universe) = mpi::initialize() else {
            bail!("MPI is already initialized in this process: make one MpiCollectives per process");
        };
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        ensure!(
            (rank, size) == (launch.rank, launch.world_size),
            "MPI says rank {rank} of {size} but {} says rank {} of {}: launch with the mpirun of the MPI \
             sft was built against",
            launch.launcher,
            launch.rank,
            launch.world_size
        );
        Ok(MpiCollectives { world, _universe: universe })
    }
}

impl Collectives for MpiCollectives {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn world_size(&self) -> usize {
        self.world.size() as usize
    }
    fn transport(&self) -> &'static str {
        "MPI"
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        // MPI_IN_PLACE is not exposed by the crate: reduce from a copy.
        let send = buf.to_vec();
        self.world.all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let send = buf.to_vec();
        self.world.all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }
    fn reduce_sum(&self, buf: &mut [f32], root: usize) -> Result<()> {
        let root = self.root(root).context("reduce_sum")?;
        let send = buf.to_vec();
        let process = self.world.process_at_rank(root);
        if self.world.rank() == root {
            process.reduce_into_root(&send[..], buf, SystemOperation::sum());
        } else {
            process.reduce_into(&send[..], SystemOperation::sum());
        }
        Ok(())
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        let root = self.root(root).context("broadcast")?;
        self.world.process_at_rank(root).broadcast_into(buf);
        Ok(())
    }
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        let root = self.root(root).context("broadcast_bytes")?;
        self.world.process_at_rank(root).broadcast_into(buf);
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}

impl MpiCollectives {
    fn root(&self, root: usize) -> Result<i32> {
        ensure!(root < self.world_size(), "root rank {root} in a job of {} ranks", self.world_size());
        Ok(root as i32)
    }
}
