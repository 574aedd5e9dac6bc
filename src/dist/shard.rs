//! Which examples each rank trains on in an optimizer step.
//!
//! One process with gradient accumulation `N·k` takes, per step, the next `N·k` micro-batches of
//! the epoch's order (or, when fewer are left, the first `N·k` of the next epoch). `N` ranks with
//! accumulation `k` take the same `N·k` micro-batches per step, every rank computing the same
//! epoch order from the seed: rank `r` trains on positions `r·k .. (r+1)·k` of them. The union
//! over the ranks is exactly the single process's step, and the shares are disjoint, so the
//! summed gradient (and the loss summed over ranks, divided by the step's supervised targets
//! summed over ranks) is the single process's.
//!
//! Contiguous shares, not every `N`-th micro-batch: a rank then reads one run of consecutive
//! examples per step from the memory-mapped shards.

use anyhow::{ensure, Result};
use std::ops::Range;

/// A rank's share of every optimizer step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sharding {
    pub rank: usize,
    pub world_size: usize,
    /// Micro-batches per step on each rank (`grad_accum`).
    pub accum: usize,
}

impl Sharding {
    pub fn new(rank: usize, world_size: usize, accum: usize) -> Result<Sharding> {
        ensure!(world_size >= 1, "world size 0");
        ensure!(rank < world_size, "rank {rank} is not below the world size {world_size}");
        ensure!(accum >= 1, "grad_accum must be at least 1");
        Ok(Sharding { rank, world_size, accum })
    }

    /// Micro-batches per optimizer step over all ranks: the single process's `grad_accum`.
    pub fn global_accum(&self) -> usize {
        self.world_size * self.accum
    }

    /// Where the step that would start at micro-batch `position` of an epoch of
    /// `batches_per_epoch` really starts: `(epoch offset, first micro-batch)`, offset 1 when the
    /// epoch has fewer than a whole step left (those are dropped, like a last partial batch).
    pub fn step_start(&self, position: u64, batches_per_epoch: u64) -> (u64, u64) {
        if position + self.global_accum() as u64 > batches_per_epoch {
            (1, 0)
        } else {
            (0, position)
        }
    }

    /// This rank's micro-batch positions in the epoch, for the step starting at `step_first`.
    pub fn positions(&self, step_first: u64) -> Range<u64> {
        let first = step_first + (self.rank * self.accum) as u64;
        first..first + self.accum as u64
    }

    /// Where the next step starts, after the step starting at `step_first`.
    pub fn next_step(&self, step_first: u64) -> u64 {
        step_first + self.global_accum() as u64
    }

    /// Steps in an epoch of `batches_per_epoch` micro-batches (the same on every rank).
    pub fn steps_per_epoch(&self, batches_per_epoch: u64) -> u64 {
        batches_per_epoch / self.global_accum() as u64
    }

    /// Examples `[first, end)` of the epoch's order that this rank's micro-batches hold, for
    /// padded batches of `micro_batch` examples (packed batches follow the micro-batch positions).
    pub fn examples(&self, step_first: u64, micro_batch: usize) -> Range<u64> {
        let p = self.positions(step_first);
        p.start * micro_batch as u64..p.end * micro_batch as u64
    }
}

/// The step's mean loss over every supervised target of every rank, from each rank's
/// `(loss sum, supervised targets)` already summed over the ranks.
pub fn step_mean_loss(loss_sum: f64, supervised: f64) -> Option<f64> {
    (supervised > 0.0).then(|| loss_sum / supervised)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The micro-batches (epoch, position) every step uses, for `steps` steps from the start.
    fn walk(sharding: &Sharding, batches_per_epoch: u64, steps: usize) -> Vec<Vec<(u64, u64)>> {
        let (mut epoch, mut position) = (0u64, 0u64);
        let mut out = Vec::new();
        for _ in 0..steps {
            let (offset, first) = sharding.step_start(position, batches_per_epoch);
            epoch += offset;
            out.push(sharding.positions(first).map(|p| (epoch, p)).collect());
            position = sharding.next_step(first);
        }
        out
    }

    #[test]
    fn n_ranks_times_k_see_exactly_one_process_times_n_k() {
        for world in 1..=4 {
            for accum in 1..=3 {
                for batches_per_epoch in [world * accum, world * accum + 1, 3 * world * accum + 2, 17] {
                    let one = Sharding::new(0, 1, world * accum).unwrap();
                    if batches_per_epoch < world * accum {
                        continue;
                    }
                    let bpe = batches_per_epoch as u64;
                    let single = walk(&one, bpe, 7);
                    let ranks: Vec<_> =
                        (0..world).map(|r| walk(&Sharding::new(r, world, accum).unwrap(), bpe, 7)).collect();
                    for (step, whole) in single.iter().enumerate() {
                        // In rank order the shares are the single process's micro-batches, in order.
                        let joined: Vec<(u64, u64)> =
                            ranks.iter().flat_map(|rank| rank[step].iter().copied()).collect();
                        assert_eq!(&joined, whole, "world {world} accum {accum} bpe {bpe} step {step}");
                        for rank in &ranks {
                            assert_eq!(rank[step].len(), accum);
                        }
                    }
                    assert_eq!(
                        Sharding::new(world - 1, world, accum).unwrap().steps_per_epoch(bpe),
                        one.steps_per_epoch(bpe)
                    );
                }
            }
        }
    }

    #[test]
    fn shares_are_disjoint_and_a_partial_step_goes_to_the_next_epoch() {
        let shards: Vec<_> = (0..3).map(|r| Sharding::new(r, 3, 2).unwrap()).collect();
        let ranges: Vec<_> = shards.iter().map(|s| s.positions(6)).collect();
        assert_eq!(ranges, [6..8, 8..10, 10..12]);
        assert_eq!(shards[1].examples(6, 4), 32..40);
        // 13 micro-batches per epoch: steps at 0 and 6, then 12 + 6 > 13 moves to the next epoch.
        assert_eq!(shards[0].step_start(6, 13), (0, 6));
        assert_eq!(shards[0].step_start(12, 13), (1, 0));
        assert_eq!(shards[0].steps_per_epoch(13), 2);
    }

    #[test]
    fn bad_shardings_are_errors() {
        assert!(Sharding::new(2, 2, 1).unwrap_err().to_string().contains("rank 2"));
        assert!(Sharding::new(0, 0, 1).is_err());
        assert!(Sharding::new(0, 1, 0).unwrap_err().to_string().contains("grad_accum"));
    }

    #[test]
    fn the_step_loss_is_the_mean_over_all_ranks_targets() {
        // Rank 0: 3 targets, loss sum 6; rank 1: 1 target, loss sum 4 → (6+4)/(3+1), not (2+4)/2.
        assert_eq!(step_mean_loss(6.0 + 4.0, 3.0 + 1.0), Some(2.5));
        assert_eq!(step_mean_loss(0.0, 0.0), None);
    }
}
