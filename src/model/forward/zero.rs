//! ZeRO-1 on the model: each rank keeps the f32 master weights and AdamW moments of its share
//! of the tensors ([`OptimizerShards`]; a model built with an [`crate::dist::OptimizerLayout`]
//! that names its rank allocates those only). A step reduce-scatters the gradients (each rank gets
//! the sum of its tensors' gradients), takes the global norm from every rank's per-tensor sums,
//! updates its tensors, and all-gathers the new weights. One process's step, split: the same
//! adds, the same norm (summed in layout order, as one process sums it), the same AdamW on every
//! tensor; and every tensor's new weights come from one rank, so the ranks cannot drift apart.

use super::{reduce_flat_into, stats, AdamW, Backend, Model, NamedTensor, Result, StepStats, STATS_LEN};
use crate::backend::sum_squares_read;
use crate::dist::{Collectives, OptimizerShards};
use anyhow::Context;

impl<B: Backend> Model<B> {
    /// How the optimizer state is split over the ranks (None: all of it is here).
    pub fn optimizer_shards(&self) -> Option<&OptimizerShards> {
        self.shards.as_ref()
    }

    /// ZeRO-1's gradient collective: the accumulated gradients of every tensor, summed over the
    /// ranks into the owner of each tensor (the other tensors' gradients are left as they were).
    pub fn reduce_scatter_grads(&mut self, comm: &dyn Collectives) -> Result<()> {
        let owners = self.sharded("reduce_scatter_grads")?.owners();
        self.materialize_zero_grads()?;
        self.fresh = false;
        start_reduce_to_owners(&self.backend, &mut self.grads, &self.lens, &owners, comm)?;
        self.backend.wait_ranks()
    }

    /// [`Model::clip_and_update`] under ZeRO-1, after [`Model::reduce_scatter_grads`]: the global
    /// norm (each tensor's sum of squares from its owner, summed in layout order), this rank's
    /// tensors updated, then every rank's new weights copied to all.
    pub fn clip_and_update_sharded(
        &mut self,
        hp: &AdamW,
        max_norm: f32,
        comm: &dyn Collectives,
    ) -> Result<StepStats> {
        self.ensure_training("clip_and_update_sharded")?;
        let shards = self.sharded("clip_and_update_sharded")?;
        let (counts, owners, start) = (shards.counts(), shards.owners(), shards.owned_elements().start);
        // One entry per tensor, zero on the ranks that do not own it: the all-reduce adds
        // zeros to it (exact), and the sum runs in layout order as one process's does.
        let mut sums = vec![0.0f64; self.specs.len()];
        for i in self.state_tensors() {
            sums[i] = sum_squares_read(&self.backend, &[&self.grads[i]], &[self.lens[i]])?;
        }
        comm.all_reduce_sum_f64(&mut sums).context("summing the gradients' squares over the ranks")?;
        let sumsq = sums.iter().fold(0.0f64, |total, &s| total + s);
        let mut s = self.backend.read(&self.stats, STATS_LEN)?;
        s[stats::SUMSQ..stats::SUMSQ + stats::SPLIT].copy_from_slice(&stats::split(sumsq));
        self.backend.write(&mut self.stats, &s)?;

        self.update(hp, Some(max_norm))?;

        let out = StepStats { loss_sum: stats::join(&s, stats::STEP_LOSS), grad_norm: sumsq.sqrt() };
        // All-gather of the compute weights, each tensor from its owner: on the device where the
        // backend joined the ranks, else this rank's segment of a host buffer from its tensors
        // and the rest written from the other ranks' segments.
        if self.backend.broadcast_ranks(&mut self.params, &self.lens, &owners)? {
            return Ok(out);
        }
        let held = self.state_tensors();
        let mut flat = vec![0.0f32; counts.iter().sum()];
        let mut at = start;
        for i in held.clone() {
            flat[at..at + self.lens[i]].copy_from_slice(&self.backend.read(&self.params[i], self.lens[i])?);
            at += self.lens[i];
        }
        comm.all_gather(&mut flat, &counts).context("gathering the updated weights from the ranks")?;
        let mut at = 0;
        for i in 0..self.specs.len() {
            if !held.contains(&i) {
                self.backend.write(&mut self.params[i], &flat[at..at + self.lens[i]])?;
            }
            at += self.lens[i];
        }
        Ok(out)
    }

    /// The master weights, whole, on rank 0 (None on the others), each tensor sent by its owner:
    /// what a checkpoint of a ZeRO-1 run saves. Every rank calls it. Without ZeRO-1, this
    /// rank's own [`Model::read_params`].
    pub fn gather_params(&self, comm: &dyn Collectives) -> Result<Option<Vec<NamedTensor>>> {
        if self.shards.is_none() {
            return self.read_params().map(Some);
        }
        self.gather_state(&self.master, comm)
    }

    /// The AdamW moments (first, second), whole, on rank 0, as [`Model::gather_params`].
    #[allow(clippy::type_complexity)]
    pub fn gather_optimizer_state(
        &self,
        comm: &dyn Collectives,
    ) -> Result<Option<(Vec<NamedTensor>, Vec<NamedTensor>)>> {
        if self.shards.is_none() {
            return self.read_optimizer_state().map(Some);
        }
        let m = self.gather_state(&self.m, comm)?;
        let v = self.gather_state(&self.v, comm)?;
        Ok(m.zip(v))
    }

    /// One tensor at a time from its owner (a broadcast: rank 0 is the one that keeps it), so
    /// that no rank holds more than one tensor it does not own, rank 0 aside.
    fn gather_state(&self, held: &[B::Buf], comm: &dyn Collectives) -> Result<Option<Vec<NamedTensor>>> {
        let owners = self.sharded("gathering the optimizer state")?.owners();
        let mut whole = Vec::with_capacity(if comm.is_main() { self.specs.len() } else { 0 });
        for (i, spec) in self.specs.iter().enumerate() {
            let owner = owners[i];
            let mut data = match self.state_slot(i) {
                Some(j) => self.backend.read(&held[j], self.lens[i])?,
                None => vec![0.0; self.lens[i]],
            };
            comm.broadcast(&mut data, owner)
                .with_context(|| format!("gathering {} from rank {owner}", spec.name))?;
            if comm.is_main() {
                whole.push(NamedTensor { name: spec.name.clone(), shape: spec.shape.clone(), data });
            }
        }
        Ok(comm.is_main().then_some(whole))
    }

    fn sharded(&self, what: &str) -> Result<&OptimizerShards> {
        self.shards.as_ref().with_context(|| {
            format!("{what}: the optimizer state is not split (OptimizerLayout::zero at build)")
        })
    }
}

/// Each buffer's first `lens[i]` elements summed over the ranks into rank `owners[i]` (the
/// others' copies are left as they were, or unspecified on the device): on the device where the
/// backend joined the ranks (NCCL), beside the work queued after it until
/// [`Backend::wait_ranks`]; else through the host, a reduce-scatter whose segments are the
/// owners' runs. Owners rise with the index (ZeRO-1's split is by contiguous runs of tensors),
/// so each rank's tensors are one run and the segments come in rank order.
pub(super) fn start_reduce_to_owners<B: Backend>(
    be: &B,
    bufs: &mut [B::Buf],
    lens: &[usize],
    owners: &[usize],
    comm: &dyn Collectives,
) -> Result<()> {
    if be.reduce_sum_ranks(bufs, lens, owners)? {
        return Ok(());
    }
    let rank = comm.rank();
    let mut counts = vec![0; comm.world_size()];
    for (&owner, &len) in owners.iter().zip(lens) {
        counts[owner] += len;
    }
    let mine = owners.partition_point(|&o| o < rank)..owners.partition_point(|&o| o <= rank);
    reduce_flat_into(be, bufs, lens, mine, |g| comm.reduce_scatter_sum(g, &counts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::StateDtype;
    use crate::bench::train::synthetic_batch;
    use crate::dist::{OptimizerLayout, SingleProcess};
    use crate::model::config::ModelConfig;
    use crate::model::Recompute;
    use crate::rng::Rng;

    /// In one process the split holds everything: the sharded step is the plain one, bit for
    /// bit, and gathering gives back what reading does.
    #[test]
    fn one_shard_steps_like_the_plain_model() {
        let config = ModelConfig::tiny(64);
        let batch = synthetic_batch(&mut Rng::new(3), 2, 16, config.vocab_size);
        let hp = AdamW {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.01,
            step: 1,
            grad_scale: 1.0,
        };
        let mut models: Vec<Model<CpuBackend<f32>>> = [None, Some((0, 1))]
            .into_iter()
            .map(|zero| {
                let layout = OptimizerLayout { moments: StateDtype::F32, zero };
                let mut m =
                    Model::for_training(CpuBackend::new(), config.clone(), 32, None, Recompute::None, layout)
                        .unwrap();
                m.init_params(7).unwrap();
                m
            })
            .collect();
        assert_eq!(models[1].optimizer_shards().unwrap().owned(), 0..models[1].param_specs().len());
        let e = models[1].read_params().unwrap_err().to_string();
        assert!(e.contains("gather"), "{e}");
        let mut norms = Vec::new();
        for (i, model) in models.iter_mut().enumerate() {
            for step in 1..=3 {
                model.zero_grads().unwrap();
                model.accumulate_gradients(&batch, 1e-1, None).unwrap();
                let hp = AdamW { step, ..hp };
                let stats = if i == 0 {
                    model.clip_and_update(&hp, 0.5).unwrap()
                } else {
                    model.reduce_scatter_grads(&SingleProcess).unwrap();
                    model.clip_and_update_sharded(&hp, 0.5, &SingleProcess).unwrap()
                };
                norms.push((stats.grad_norm.to_bits(), stats.loss_sum.to_bits()));
            }
        }
        assert_eq!(norms[..3], norms[3..], "norms and losses");
        assert!(f64::from_bits(norms[0].0) > 0.5, "the clip acts");
        let flat =
            |ts: Vec<NamedTensor>| ts.into_iter().flat_map(|t| t.data).map(f32::to_bits).collect::<Vec<_>>();
        let [plain, sharded] = &models[..] else { unreachable!() };
        assert_eq!(flat(sharded.read_weights().unwrap()), flat(plain.read_weights().unwrap()));
        assert_eq!(
            flat(sharded.gather_params(&SingleProcess).unwrap().unwrap()),
            flat(plain.read_params().unwrap())
        );
        let (m, v) = sharded.gather_optimizer_state(&SingleProcess).unwrap().unwrap();
        let (pm, pv) = plain.read_optimizer_state().unwrap();
        assert_eq!((flat(m), flat(v)), (flat(pm), flat(pv)));
    }
}
