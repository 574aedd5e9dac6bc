//! The collective operations data parallelism needs, behind one trait: plain single-process
//! arithmetic here, MPI (feature `mpi`) for ranks on the CPU, NCCL later for GPUs.
//!
//! ZeRO-1's reduce-scatter and all-gather have default forms built from `reduce_sum` and
//! `broadcast`, one call per rank's segment: variable segments, counts that fit MPI's `int` per
//! segment, and a sum that is the all-reduce's (the same adds, done at the segment's owner).
//!
//! Every rank calls the same operations in the same order with the same lengths; a mismatch is
//! a bug in the caller (MPI would hang or fail), so the implementations check what they can
//! cheaply and say which operation failed.

use std::ops::Range;

use anyhow::{ensure, Context, Result};

/// Collectives over the ranks of one job.
pub trait Collectives {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// How the ranks talk, for the logs ("MPI", "TCP").
    fn transport(&self) -> &'static str {
        "one process"
    }
    /// Rank 0: the one that logs and writes checkpoints.
    fn is_main(&self) -> bool {
        self.rank() == 0
    }
    /// Replaces `buf` on every rank with the element-wise sum over the ranks (gradients).
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// The same in f64 (loss sums and token counts, exact for counts below 2^53).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Leaves on `root` the element-wise sum over the ranks of `buf`; the other ranks' `buf` is
    /// unchanged.
    fn reduce_sum(&self, buf: &mut [f32], root: usize) -> Result<()>;
    /// Copies `root`'s `buf` to every rank.
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()>;
    /// Copies `root`'s bytes to every rank (ids, small states).
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
    /// `buf` is cut into one segment per rank of `counts[r]` elements, in rank order; each
    /// rank's segment is summed over the ranks and left on that rank (the rest of its `buf` is
    /// unchanged).
    fn reduce_scatter_sum(&self, buf: &mut [f32], counts: &[usize]) -> Result<()> {
        for (r, seg) in segments(buf.len(), counts, self.world_size())
            .context("reduce_scatter_sum")?
            .into_iter()
            .enumerate()
        {
            self.reduce_sum(&mut buf[seg], r)
                .with_context(|| format!("reduce_scatter_sum: rank {r}'s segment"))?;
        }
        Ok(())
    }
    /// `buf` cut as in [`Collectives::reduce_scatter_sum`]: every rank's segment is copied from
    /// that rank to all.
    fn all_gather(&self, buf: &mut [f32], counts: &[usize]) -> Result<()> {
        for (r, seg) in
            segments(buf.len(), counts, self.world_size()).context("all_gather")?.into_iter().enumerate()
        {
            self.broadcast(&mut buf[seg], r).with_context(|| format!("all_gather: rank {r}'s segment"))?;
        }
        Ok(())
    }
    /// Ends every rank of the job with `code`: how one rank's error stops the others, which
    /// would otherwise wait forever in their next collective.
    fn abort(&self, code: i32) -> !;
}

/// The ranges of `counts` consecutive segments of a buffer of `len` elements, one per rank.
fn segments(len: usize, counts: &[usize], world: usize) -> Result<Vec<Range<usize>>> {
    ensure!(counts.len() == world, "{} segment counts for {world} ranks", counts.len());
    let total: usize = counts.iter().sum();
    ensure!(total == len, "segments of {total} elements in all, for a buffer of {len}");
    let mut at = 0;
    Ok(counts
        .iter()
        .map(|&c| {
            at += c;
            at - c..at
        })
        .collect())
}

/// One process: every collective is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Collectives for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn reduce_sum(&self, _buf: &mut [f32], root: usize) -> Result<()> {
        ensure!(root == 0, "reduce to rank {root} in a job of 1 process");
        Ok(())
    }
    fn broadcast(&self, _buf: &mut [f32], root: usize) -> Result<()> {
        ensure!(root == 0, "broadcast from rank {root} in a job of 1 process");
        Ok(())
    }
    fn broadcast_bytes(&self, _buf: &mut [u8], root: usize) -> Result<()> {
        ensure!(root == 0, "broadcast from rank {root} in a job of 1 process");
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// Copies `root`'s `values` to every rank.
pub fn broadcast_u64(comm: &dyn Collectives, values: &mut [u64], root: usize) -> Result<()> {
    let mut bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    comm.broadcast_bytes(&mut bytes, root)?;
    for (v, b) in values.iter_mut().zip(bytes.chunks_exact(8)) {
        *v = u64::from_le_bytes(b.try_into().expect("chunks of 8"));
    }
    Ok(())
}

/// Checks that every rank computed the same `values` (what each derived on its own from the
/// config and the data): an error on each rank that differs from rank 0, naming the values.
pub fn ensure_agreement(comm: &dyn Collectives, values: &[(&str, u64)]) -> Result<()> {
    let mut theirs: Vec<u64> = values.iter().map(|&(_, v)| v).collect();
    broadcast_u64(comm, &mut theirs, 0)?;
    let differ: Vec<String> = values
        .iter()
        .zip(&theirs)
        .filter(|((_, mine), theirs)| mine != *theirs)
        .map(|((name, mine), theirs)| format!("{name} {mine} (rank 0: {theirs})"))
        .collect();
    ensure!(
        differ.is_empty(),
        "rank {} of {} disagrees with rank 0 on {}: every rank must read the same data, config and checkpoint",
        comm.rank(),
        comm.world_size(),
        differ.join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_process_is_the_identity() {
        let c = SingleProcess;
        assert_eq!((c.rank(), c.world_size(), c.is_main()), (0, 1, true));
        let mut g = vec![1.5f32, -2.0, 3.25];
        c.all_reduce_sum(&mut g).unwrap();
        assert_eq!(g, [1.5, -2.0, 3.25]);
        let mut s = vec![7.0f64];
        c.all_reduce_sum_f64(&mut s).unwrap();
        assert_eq!(s, [7.0]);
        c.broadcast(&mut g, 0).unwrap();
        assert_eq!(g, [1.5, -2.0, 3.25]);
        let e = c.broadcast(&mut g, 1).unwrap_err().to_string();
        assert!(e.contains("rank 1"), "{e}");
        c.barrier().unwrap();
        c.reduce_scatter_sum(&mut g, &[3]).unwrap();
        c.all_gather(&mut g, &[3]).unwrap();
        assert_eq!(g, [1.5, -2.0, 3.25]);
        let e = c.all_gather(&mut g, &[2]).unwrap_err();
        assert!(format!("{e:#}").contains("segments of 2 elements in all, for a buffer of 3"), "{e:#}");
        let mut v = [3u64, u64::MAX];
        broadcast_u64(&c, &mut v, 0).unwrap();
        assert_eq!(v, [3, u64::MAX]);
        ensure_agreement(&c, &[("steps", 4), ("tokens", 9)]).unwrap();
    }
}
