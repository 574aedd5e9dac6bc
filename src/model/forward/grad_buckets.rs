//! Data parallelism's gradient sum, overlapped with the backward: during a step's last
//! micro-batch each bucket of tensors (the final norm and lm_head, then every layer from the
//! top, then the embeddings) is summed over the ranks as soon as the backward has finished its
//! gradients, while the backward goes on below it. On a GPU that has joined the ranks (NCCL) the
//! sum runs on the communication stream beside the backward's kernels, and the step waits for it
//! once, before the optimizer; through the host collectives (MPI, TCP: the CPU backend) each
//! bucket is summed where it becomes ready, one after another, which checks the order but hides
//! nothing.
//!
//! Every rank issues the same buckets in the same order (a rank with no micro-batch this step
//! sends its zeros bucket by bucket too), so the collectives pair up; each element's sum is the
//! one the whole-step collective makes.

use std::ops::Range;

use anyhow::{ensure, Context, Result};

use super::zero::start_reduce_to_owners;
use super::{start_reduce_flat, Backend, Model};
use crate::backend::profile;
use crate::dist::Collectives;
use crate::model::params::ParamIndex;

/// The buckets of a model's tensors in the order the backward finishes their gradients.
pub fn grad_buckets(idx: &ParamIndex, n_tensors: usize) -> Vec<Range<usize>> {
    let mut buckets = Vec::with_capacity(idx.layers.len() + 2);
    // The loss writes the lm_head's gradient, the final norm's backward its own; with tied
    // embeddings the output weight is the embedding, which is finished last.
    buckets.push(idx.norm..n_tensors);
    buckets.extend(idx.layers.iter().rev().map(|l| l.tensors()));
    buckets.push(idx.tok_embeddings..idx.tok_embeddings + 1);
    buckets
}

/// One step's bucket-by-bucket gradient sum over the ranks.
pub(crate) struct BucketSum<'a> {
    comm: &'a dyn Collectives,
    buckets: Vec<Range<usize>>,
    /// Buckets summed so far.
    done: usize,
    /// ZeRO-1: each tensor's owner, into which its gradient is summed (the other ranks' copies
    /// are left as they were). None: every rank gets every sum.
    owners: Option<Vec<usize>>,
    names: Vec<String>,
}

impl<'a> BucketSum<'a> {
    pub(super) fn new<B: Backend>(model: &Model<B>, comm: &'a dyn Collectives) -> BucketSum<'a> {
        BucketSum {
            comm,
            buckets: grad_buckets(&model.index, model.specs.len()),
            done: 0,
            owners: model.shards.as_ref().map(|s| s.owners()),
            names: model.specs.iter().map(|s| s.name.clone()).collect(),
        }
    }

    /// Sums the gradients of `tensors`, which the backward has just finished: they must be the
    /// next bucket (a different order on one rank would pair the wrong buffers across ranks).
    /// Queued on the device's communication stream where the backend joined the ranks; call
    /// [`BucketSum::finish`] before anything reads the gradients.
    pub(super) fn ready<B: Backend>(
        &mut self,
        be: &B,
        grads: &mut [B::Buf],
        lens: &[usize],
        tensors: Range<usize>,
    ) -> Result<()> {
        let expected = self.buckets.get(self.done).cloned();
        ensure!(
            expected.as_ref() == Some(&tensors),
            "gradient bucket {} is tensors {tensors:?} but {expected:?} was due (a bug: the backward and the \
             bucket list disagree)",
            self.done
        );
        self.done += 1;
        let name = || match tensors.len() {
            1 => self.names[tensors.start].clone(),
            _ => format!("{} to {}", self.names[tensors.start], self.names[tensors.end - 1]),
        };
        let _sum = profile::range("sum gradient bucket");
        let (bufs, lens) = (&mut grads[tensors.clone()], &lens[tensors.clone()]);
        let summed = match &self.owners {
            None => start_reduce_flat(be, bufs, lens, |g| self.comm.all_reduce_sum(g)),
            Some(owners) => start_reduce_to_owners(be, bufs, lens, &owners[tensors.clone()], self.comm),
        };
        summed.with_context(|| format!("summing the gradients of {} over the ranks", name()))
    }

    /// After the last bucket: what follows on the device waits for the sums.
    pub(super) fn finish<B: Backend>(self, be: &B) -> Result<()> {
        ensure!(
            self.done == self.buckets.len(),
            "{} of {} gradient buckets were summed (a bug: the backward skipped some)",
            self.done,
            self.buckets.len()
        );
        be.wait_ranks()
    }
}

impl<B: Backend> Model<B> {
    /// The last micro-batch of a data-parallel step: [`Model::accumulate_gradients`], with each
    /// bucket's gradients summed over the ranks as soon as the backward has finished them (under
    /// ZeRO-1, into each tensor's owner). Afterwards every rank holds the step's summed
    /// gradients, as after [`Model::all_reduce_grads`] (or [`Model::reduce_scatter_grads`]).
    /// Full fine-tuning only: LoRA's adapters are summed after the backward.
    pub fn accumulate_and_sum_gradients(
        &mut self,
        batch: &crate::data::batch::Batch,
        loss_scale: f32,
        dropout_seed: Option<u64>,
        comm: &dyn Collectives,
    ) -> Result<()> {
        self.ensure_bucketed("accumulate_and_sum_gradients")?;
        let mut sum = BucketSum::new(self, comm);
        self.backward_micro_batch(batch, loss_scale, dropout_seed, Some(&mut sum))?;
        sum.finish(&self.backend)
    }

    /// The collectives of [`Model::accumulate_and_sum_gradients`] for a rank that had no
    /// micro-batch this step: its zeros, bucket by bucket, so that the other ranks' buckets
    /// find their pairs.
    pub fn sum_gradients_by_bucket(&mut self, comm: &dyn Collectives) -> Result<()> {
        self.ensure_bucketed("sum_gradients_by_bucket")?;
        self.materialize_zero_grads()?;
        self.fresh = false;
        let mut sum = BucketSum::new(self, comm);
        for tensors in grad_buckets(&self.index, self.specs.len()) {
            sum.ready(&self.backend, &mut self.grads, &self.lens, tensors)?;
        }
        sum.finish(&self.backend)
    }

    fn ensure_bucketed(&self, what: &str) -> Result<()> {
        self.ensure_training(what)?;
        ensure!(
            self.lora.is_none(),
            "{what}: the gradient buckets are the base's tensors; LoRA's adapters are summed after the backward \
             (all_reduce_grads)"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::bench::train::synthetic_batch;
    use crate::data::batch::Batch;
    use crate::model::config::ModelConfig;
    use crate::model::forward::AdamW;
    use crate::model::params::param_specs;
    use crate::model::recompute::Recompute;
    use crate::rng::Rng;
    use std::cell::RefCell;

    #[test]
    fn the_buckets_cover_every_tensor_once() {
        for tied in [false, true] {
            let config = ModelConfig { tie_embeddings: tied, ..ModelConfig::tiny(64) };
            let n = param_specs(&config).len();
            let buckets = grad_buckets(&ParamIndex::new(&config), n);
            assert_eq!(buckets.len(), config.n_layers + 2);
            let mut seen = vec![0; n];
            for b in &buckets {
                assert!(!b.is_empty());
                b.clone().for_each(|i| seen[i] += 1);
            }
            assert!(seen.iter().all(|&c| c == 1), "tied {tied}: {seen:?}");
            assert_eq!(buckets.last(), Some(&(0..1)), "the embeddings are finished last");
        }
    }

    /// A job of two ranks whose other rank holds exactly this rank's gradients: every sum
    /// doubles the buffer. A bucket summed before the backward finished it would be doubled
    /// only in part. It logs each collective's length.
    struct Mirror {
        rank: usize,
        calls: RefCell<Vec<usize>>,
    }

    impl Collectives for Mirror {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            2
        }
        fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
            self.calls.borrow_mut().push(buf.len());
            buf.iter_mut().for_each(|x| *x *= 2.0);
            Ok(())
        }
        fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
            buf.iter_mut().for_each(|x| *x *= 2.0);
            Ok(())
        }
        fn reduce_sum(&self, buf: &mut [f32], root: usize) -> Result<()> {
            self.calls.borrow_mut().push(buf.len());
            if root == self.rank {
                buf.iter_mut().for_each(|x| *x *= 2.0);
            }
            Ok(())
        }
        fn broadcast(&self, _: &mut [f32], _: usize) -> Result<()> {
            Ok(())
        }
        fn broadcast_bytes(&self, _: &mut [u8], _: usize) -> Result<()> {
            Ok(())
        }
        fn barrier(&self) -> Result<()> {
            Ok(())
        }
        fn abort(&self, code: i32) -> ! {
            panic!("abort({code})")
        }
    }

    fn model(config: &ModelConfig, recompute: Recompute, zero_rank: Option<usize>) -> Model<CpuBackend<f32>> {
        let layout = crate::dist::OptimizerLayout {
            moments: crate::backend::StateDtype::F32,
            zero: zero_rank.map(|r| (r, 2)),
        };
        let mut m =
            Model::for_training(CpuBackend::new(), config.clone(), 64, None, recompute, layout).unwrap();
        m.init_params(7).unwrap();
        m
    }

    fn batches(config: &ModelConfig) -> Vec<Batch> {
        (0..2).map(|k| synthetic_batch(&mut Rng::new(k), 2, 16, config.vocab_size)).collect()
    }

    /// The step's gradients summed after the backward or bucket by bucket during the last
    /// micro-batch's, through the host collectives or on the device: the same gradients, norm and
    /// updated weights, bit for bit, for untied and tied embeddings, dropout, every recompute
    /// mode, ZeRO-1's reduce into each tensor's owner (rank 0 and 1), one micro-batch (its
    /// backward writes the gradients afresh) or two (it adds). The device is the CPU backend
    /// standing for a GPU that joined the ranks with NCCL's timing ([`crate::backend::cpu`]'s
    /// `mirror_ranks`: a sum takes the buffers as they are when handed over, they hold NaN until
    /// `wait_ranks`, the sum lands then), so a read before the wait or a write to a bucket after
    /// its hand-over fails the test; no gradient may go through the host collectives there.
    #[test]
    fn every_path_sums_the_same_gradients() {
        let hp = AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            step: 1,
            grad_scale: 1.0,
        };
        let cases = [
            (false, 0.0, Recompute::None, None),
            (true, 0.0, Recompute::None, None),
            (false, 0.1, Recompute::Layer, None),
            (true, 0.1, Recompute::Mlp, None),
            (false, 0.1, Recompute::Mlp, Some(0)),
            (true, 0.1, Recompute::Layer, Some(1)),
        ];
        for ((tied, dropout, recompute, zero_rank), micro_batches) in
            cases.into_iter().flat_map(|c| [(c, 1), (c, 2)])
        {
            let config = ModelConfig { tie_embeddings: tied, dropout, ..ModelConfig::tiny(64) };
            let batches = batches(&config);
            let rank = zero_rank.unwrap_or(0);
            let run = |device: bool, bucketed: bool| {
                let backend: CpuBackend<f32> =
                    if device { CpuBackend::with_mirror_ranks(rank) } else { CpuBackend::new() };
                let layout = crate::dist::OptimizerLayout {
                    moments: crate::backend::StateDtype::F32,
                    zero: zero_rank.map(|r| (r, 2)),
                };
                let mut m =
                    Model::for_training(backend, config.clone(), 64, None, recompute, layout).unwrap();
                m.init_params(7).unwrap();
                let comm = Mirror { rank, calls: RefCell::new(Vec::new()) };
                m.zero_grads().unwrap();
                if micro_batches == 2 {
                    m.accumulate_gradients(&batches[0], 0.01, Some(11)).unwrap();
                }
                if bucketed {
                    m.accumulate_and_sum_gradients(&batches[1], 0.01, Some(12), &comm).unwrap();
                } else {
                    m.accumulate_gradients(&batches[1], 0.01, Some(12)).unwrap();
                    match zero_rank {
                        Some(_) => m.reduce_scatter_grads(&comm).unwrap(),
                        None => m.all_reduce_grads(|g| comm.all_reduce_sum(g)).unwrap(),
                    }
                }
                let held = m.optimizer_shards().map(|s| s.owned()).unwrap_or(0..m.param_specs().len());
                let grads: Vec<Vec<f32>> = m
                    .read_grads()
                    .unwrap()
                    .into_iter()
                    .enumerate()
                    .filter(|(i, _)| held.contains(i))
                    .map(|(_, t)| t.data)
                    .collect();
                // The step goes on from there alike (the update reads the summed gradients).
                let stats = match zero_rank {
                    Some(_) => m.clip_and_update_sharded(&hp, 1.0, &comm).unwrap(),
                    None => m.clip_and_update(&hp, 1.0).unwrap(),
                };
                (grads, stats.grad_norm, m.read_weights().unwrap(), comm.calls.into_inner())
            };
            let case = format!(
                "tied {tied}, dropout {dropout}, recompute {recompute}, zero {zero_rank:?}, {micro_batches} \
                 micro-batches"
            );
            let (want, want_norm, want_weights, host_calls) = run(false, false);
            assert!(want_norm.is_finite() && want_norm > 0.0, "{case}: {want_norm}");
            for (device, bucketed) in [(false, true), (true, false), (true, true)] {
                let what = format!("{case}, device {device}, bucketed {bucketed}");
                let (grads, norm, weights, calls) = run(device, bucketed);
                assert_eq!(grads, want, "{what}: gradients");
                assert_eq!(norm.to_bits(), want_norm.to_bits(), "{what}: norm {norm} vs {want_norm}");
                for (a, b) in weights.iter().zip(&want_weights) {
                    assert_eq!(a.data, b.data, "{what}: {}", a.name);
                }
                if device {
                    assert!(calls.is_empty(), "{what}: gradients through the host collectives: {calls:?}");
                } else {
                    // The same elements through the host collectives, in a call per bucket or more.
                    assert_eq!(calls.iter().sum::<usize>(), host_calls.iter().sum::<usize>(), "{what}");
                    assert!(calls.len() >= config.n_layers + 2, "{what}: {calls:?}");
                }
            }
        }
    }

    /// A rank without a micro-batch sends zeros in the same buckets as a rank with one.
    #[test]
    fn a_rank_without_micro_batches_sums_the_same_buckets() {
        let config = ModelConfig::tiny(64);
        let with = {
            let mut m = model(&config, Recompute::None, None);
            let comm = Mirror { rank: 0, calls: RefCell::new(Vec::new()) };
            m.zero_grads().unwrap();
            m.accumulate_and_sum_gradients(&batches(&config)[0], 0.01, None, &comm).unwrap();
            comm.calls.into_inner()
        };
        let mut m = model(&config, Recompute::None, None);
        let comm = Mirror { rank: 0, calls: RefCell::new(Vec::new()) };
        m.zero_grads().unwrap();
        m.sum_gradients_by_bucket(&comm).unwrap();
        assert_eq!(comm.calls.into_inner(), with);
        assert!(m.read_grads().unwrap().iter().all(|t| t.data.iter().all(|&x| x == 0.0)));
    }

    #[test]
    fn lora_is_summed_after_the_backward() {
        let config = ModelConfig::tiny(64);
        let lora = crate::model::lora::LoraConfig::default();
        let mut m: Model<CpuBackend<f32>> =
            Model::with_lora(CpuBackend::new(), config, 64, true, &lora).unwrap();
        let comm = Mirror { rank: 0, calls: RefCell::new(Vec::new()) };
        let e = m.sum_gradients_by_bucket(&comm).unwrap_err().to_string();
        assert!(e.contains("LoRA"), "{e}");
    }
}
