//! ZeRO-1: the optimizer state (f32 master weights and both AdamW moments) split over the ranks,
//! so that each rank holds `1/W` of it. The split is by whole tensors, in layout order: rank `r`
//! owns a contiguous run of tensors, so its share of the flat gradient buffer (every tensor
//! concatenated in layout order, as [`crate::model::Model::all_reduce_grads`] builds it) is one
//! contiguous segment, which a reduce-scatter hands to it directly. Whole tensors keep every
//! backend op unchanged (AdamW and the norm run on a subset of the tensor list); the price is a
//! share that is only as even as the tensor sizes allow.

use std::ops::Range;

use anyhow::{ensure, Result};

use crate::backend::StateDtype;

/// Which tensors' optimizer state each rank holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptimizerShards {
    /// `ranges[r]`: the tensors rank `r` owns (possibly empty when ranks outnumber tensors).
    ranges: Vec<Range<usize>>,
    /// Elements of each tensor.
    lens: Vec<usize>,
    rank: usize,
}

impl OptimizerShards {
    /// Splits tensors of `lens` elements over `world` ranks, this process being `rank`: rank `r`'s
    /// run ends at the tensor boundary nearest `(r + 1)/world` of all elements (never before its
    /// start), so no share's end is more than half a tensor off the even split.
    pub fn new(lens: &[usize], world: usize, rank: usize) -> Result<OptimizerShards> {
        ensure!(world > 0 && rank < world, "rank {rank} of a job of {world} ranks");
        let total: usize = lens.iter().sum();
        // Prefix sums: boundary b (0..=n) lies after `starts[b]` elements.
        let mut starts = Vec::with_capacity(lens.len() + 1);
        let mut at = 0usize;
        starts.push(0);
        for &l in lens {
            at += l;
            starts.push(at);
        }
        let mut ranges = Vec::with_capacity(world);
        let mut lo = 0;
        for r in 0..world {
            let hi = if r + 1 == world {
                lens.len()
            } else {
                let target = (total as u128 * (r as u128 + 1) / world as u128) as usize;
                // The boundary nearest the even split, never before this rank's start.
                (lo..=lens.len())
                    .min_by_key(|&b| (starts[b].abs_diff(target), b))
                    .expect("the range lo..=n is not empty")
            };
            ranges.push(lo..hi);
            lo = hi;
        }
        Ok(OptimizerShards { ranges, lens: lens.to_vec(), rank })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.ranges.len()
    }

    /// The tensors this rank owns.
    pub fn owned(&self) -> Range<usize> {
        self.ranges[self.rank].clone()
    }

    /// The owner of every tensor, in layout order.
    pub fn owners(&self) -> Vec<usize> {
        self.ranges.iter().enumerate().flat_map(|(r, range)| range.clone().map(move |_| r)).collect()
    }

    /// Elements of the flat buffer each rank owns, in rank order (what a reduce-scatter and an
    /// all-gather of the flat buffer take).
    pub fn counts(&self) -> Vec<usize> {
        self.ranges.iter().map(|r| self.lens[r.clone()].iter().sum()).collect()
    }

    /// Where this rank's tensors lie in the flat buffer.
    pub fn owned_elements(&self) -> Range<usize> {
        let start: usize = self.lens[..self.owned().start].iter().sum();
        start..start + self.counts()[self.rank]
    }
}

/// How a training model keeps its optimizer state: the moments' storage type and, under
/// ZeRO-1, this rank's place in the job (the model then allocates the master weights and moments
/// of its [`OptimizerShards`] share only). A bare [`StateDtype`] is the whole state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptimizerLayout {
    pub moments: StateDtype,
    /// `(rank, world size)` under ZeRO-1; None: every tensor's state is here.
    pub zero: Option<(usize, usize)>,
}

impl From<StateDtype> for OptimizerLayout {
    fn from(moments: StateDtype) -> Self {
        OptimizerLayout { moments, zero: None }
    }
}

impl OptimizerLayout {
    /// The split of tensors of `lens` elements, under ZeRO-1.
    pub fn shards(&self, lens: &[usize]) -> Result<Option<OptimizerShards>> {
        self.zero.map(|(rank, world)| OptimizerShards::new(lens, world, rank)).transpose()
    }

    /// This layout at the rank that holds the largest share (itself when the state is not
    /// split): what a memory plan that must hold on every rank counts.
    pub fn largest_share(self, lens: &[usize]) -> Result<OptimizerLayout> {
        let Some(shards) = self.shards(lens)? else { return Ok(self) };
        let counts = shards.counts();
        let largest = (0..counts.len()).max_by_key(|&r| (counts[r], std::cmp::Reverse(r))).unwrap_or(0);
        Ok(OptimizerLayout { zero: Some((largest, shards.world_size())), ..self })
    }

    /// Of `lens`'s elements, how many have their master weights and moments here.
    pub fn held(&self, lens: &[usize]) -> usize {
        match self.shards(lens) {
            Ok(Some(s)) => s.counts()[s.rank()],
            // An impossible rank is refused when the model is built; count the whole state.
            _ => lens.iter().sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tensor_has_one_owner_in_order() {
        let lens = [64, 8, 8, 32, 8, 8, 32, 64];
        for world in 1..=10 {
            let shards: Vec<_> = (0..world).map(|r| OptimizerShards::new(&lens, world, r).unwrap()).collect();
            // Contiguous runs that cover the tensors in order, the same on every rank.
            let mut next = 0;
            for (r, s) in shards.iter().enumerate() {
                assert_eq!(s.ranges, shards[0].ranges, "world {world}");
                assert_eq!(s.owned().start, next, "world {world} rank {r}");
                next = s.owned().end;
                assert!(s.owned().clone().all(|i| s.owners()[i] == r));
            }
            assert_eq!(next, lens.len());
            assert_eq!(shards[0].counts().iter().sum::<usize>(), lens.iter().sum::<usize>());
            // The elements a rank owns are the segment of the flat buffer its counts say.
            let mut start = 0;
            for (s, count) in shards.iter().zip(shards[0].counts()) {
                assert_eq!(s.owned_elements(), start..start + count);
                start += count;
            }
        }
    }

    #[test]
    fn shares_are_as_even_as_the_tensors_allow() {
        // 224 elements over 2 ranks: a boundary lies at 112 (64 + 8 + 8 + 32).
        let lens = [64, 8, 8, 32, 8, 8, 32, 64];
        assert_eq!(OptimizerShards::new(&lens, 2, 0).unwrap().counts(), [112, 112]);
        // Equal tensors split evenly.
        assert_eq!(OptimizerShards::new(&[10; 12], 4, 1).unwrap().counts(), [30; 4]);
        // More ranks than tensors: some own nothing.
        let s = OptimizerShards::new(&[5, 5], 3, 2).unwrap();
        assert_eq!(s.counts().iter().filter(|&&c| c == 0).count(), 1);
        assert!(OptimizerShards::new(&lens, 2, 2).is_err());
        // The layout of a rank, and the largest share's for memory plans.
        let layout = OptimizerLayout { moments: StateDtype::F32, zero: Some((0, 3)) };
        let lens = [50, 10, 10, 10, 40];
        assert_eq!(OptimizerShards::new(&lens, 3, 0).unwrap().counts(), [50, 30, 40]);
        assert_eq!(layout.held(&lens), 50);
        assert_eq!(layout.largest_share(&lens).unwrap().zero, Some((0, 3)));
        let whole = OptimizerLayout::from(StateDtype::F32);
        assert_eq!((whole.held(&lens), whole.largest_share(&lens).unwrap()), (120, whole));
    }
}
