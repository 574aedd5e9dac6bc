//! The training loop: read this file to know what one optimizer step does.
//!
//! One optimizer step (`optimizer_step`, just below), SimpleLLaMA's recipe:
//! 1. take the step's `grad_accum` micro-batches and count their supervised targets;
//! 2. start a new accumulation (the first micro-batch writes the gradients, the others add to
//!    them), running forward+backward on each micro-batch with
//!    `loss_scale = 1 / supervised targets of the whole step`, so the accumulated gradient is
//!    that of the mean loss over every supervised token of the step (not a mean of means);
//! 3. clip: the global gradient norm, and `grad_scale = min(1, clip / norm)`;
//! 4. one AdamW step at the schedule's learning rate.
//!
//! Steps 2–4 run on the device without waiting for it: the loss sum and the norm stay there
//! (AdamW reads the clip factor from device memory), and the host reads both once, at the end
//! of the step, for the log: one blocking read-back per optimizer step, none per micro-batch.
//!
//! [`train_with`] is the rest, in three parts: `start_run` (fresh, `init_from` or `resume`: the
//! model config and tokenizer), `plan_data` (loader, steps, evaluation batches, schedule), then
//! the loop: per step, micro-batches, the step, evaluation, the log, samples and checkpoints.
//! Sample replies come through a [`Sampler`] hook, so training does not depend on generation.
//!
//! Everything random is a pure function of the seed and a position (the data order of an
//! epoch, the dropout mask of micro-batch `m` of step `s`), so a resumed run repeats an
//! uninterrupted one bit for bit.

use crate::backend::{profile, AdamW, Backend};
use crate::checkpoint::{self, Checkpoint};
use crate::data::{
    batches_in_order, longest_example, Batch, BatchMode, ChatTokenizer, Dataset, Loader, LoaderConfig,
    LoaderState, NoSupervisedTokens, Split,
};
use crate::dist::{self, broadcast_u64, Collectives, OptimizerLayout, Sharding, SingleProcess};
use crate::lock::{sibling, DirLock};
use crate::model::config::ModelConfig;
use crate::model::forward::least_recompute_that_fits;
use crate::model::forward::StepStats;
use crate::model::Model;
use crate::model::{Recompute, RecomputeChoice};
use crate::rng::Rng;
use crate::train::config::{default_seq_len, plan_batches, MicroBatch, TrainConfig};
use crate::train::interrupt::{self, Interrupted};
use crate::train::log::{CsvLog, LogRow};
use crate::train::progress::Progress;
use crate::train::schedule::Schedule;
use crate::train::state::TrainerState;
use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// What a finished run reports.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainReport {
    /// Optimizer steps done in all (those before a resume included).
    pub steps: u64,
    /// The train loss of the last step (NaN when this invocation ran no step).
    pub final_train_loss: f64,
    /// The last validation loss measured (None without a validation split).
    pub final_val_loss: Option<f64>,
    /// Non-pad input tokens per second of training (evaluation and saving excluded).
    pub tokens_per_s: f64,
    /// `(step, train loss)` of every step this invocation ran (1-based steps).
    pub step_losses: Vec<(u64, f64)>,
    /// Micro-batches skipped in all because none of their targets was supervised.
    pub skipped_batches: u64,
    /// Optimizer steps in the first epoch (packed epochs may differ slightly).
    pub steps_per_epoch: u64,
    /// The last checkpoint written (None when this invocation saved none).
    pub checkpoint: Option<PathBuf>,
}

/// Produces a sample reply to `prompt` (with the default system prompt) from the current model.
pub type Sampler<'a, B> = dyn FnMut(&mut Model<B>, &ChatTokenizer, &str) -> Result<String> + 'a;

/// What one optimizer step did (over every rank of a data-parallel job).
pub(crate) struct StepOutcome {
    /// Mean loss over the step's supervised targets (None: nothing supervised, no update).
    pub train_loss: Option<f64>,
    /// Global gradient norm before clipping.
    pub grad_norm: Option<f64>,
    pub supervised: usize,
    /// Non-pad input tokens.
    pub tokens: u64,
    /// Micro-batches of the step skipped for having no supervised target.
    pub skipped: u64,
}

/// One optimizer step (0-based `step`) over its micro-batches, at learning rate `lr`, in one
/// process.
pub(crate) fn optimizer_step<B: Backend>(
    model: &mut Model<B>,
    micro_batches: &[Batch],
    step: u64,
    lr: f64,
    cfg: &TrainConfig,
    dropout_stream: &Rng,
) -> Result<StepOutcome> {
    let share: Vec<(usize, &Batch)> = micro_batches.iter().enumerate().collect();
    step_on_share(model, &share, 0, step, lr, cfg, dropout_stream, &SingleProcess)
}

/// One optimizer step over this rank's `share` of the step's micro-batches, each with its
/// position in the step (which picks its dropout mask, so the masks do not depend on how the
/// step is split over ranks); `skipped` of this rank's micro-batches had no supervised target.
/// With one rank, `comm` does nothing.
#[allow(clippy::too_many_arguments)]
fn step_on_share<B: Backend>(
    model: &mut Model<B>,
    share: &[(usize, &Batch)],
    skipped: u64,
    step: u64,
    lr: f64,
    cfg: &TrainConfig,
    dropout_stream: &Rng,
    comm: &dyn Collectives,
) -> Result<StepOutcome> {
    let _step = profile::range("step");
    let ranks = comm.world_size() > 1;
    // 1. The step's loss is the mean over all of its supervised targets, on every rank: the
    //    counts are summed over the ranks before any backward (exact in f64).
    let mut counts = [
        share.iter().map(|(_, b)| b.n_supervised()).sum::<usize>() as f64,
        share.iter().map(|(_, b)| b.inputs.iter().filter(|&&t| t != b.pad_id).count()).sum::<usize>() as f64,
        skipped as f64,
    ];
    if ranks {
        comm.all_reduce_sum_f64(&mut counts).context("summing the step's token counts over the ranks")?;
    }
    let [supervised, tokens, skipped] = counts.map(|c| c as u64);
    let supervised = supervised as usize;
    if supervised == 0 {
        // Nothing to learn from: no update (the step still counts, the schedule moves on).
        return Ok(StepOutcome { train_loss: None, grad_norm: None, supervised, tokens, skipped });
    }
    let loss_scale = 1.0 / supervised as f32;

    // 2. Accumulate the gradient of that mean over the micro-batches (the loss sum stays on
    //    the device), then sum it over the ranks: every rank holds the whole step's gradient.
    //    Over ranks the last micro-batch's backward sums each layer's gradients as soon as they
    //    are final (`grad_overlap`; full fine-tuning), else all are summed after it. Under
    //    ZeRO-1 each rank gets the sum of its own tensors' gradients only.
    let zero = model.optimizer_shards().is_some();
    let overlap = ranks && cfg.grad_overlap && model.lora().is_none();
    let summing = || format!("step {}: summing the gradients over the ranks", step + 1);
    model.zero_grads()?;
    for (k, &(micro, batch)) in share.iter().enumerate() {
        let seed = model.uses_dropout().then(|| dropout_seed(dropout_stream, step, micro));
        if overlap && k + 1 == share.len() {
            model.accumulate_and_sum_gradients(batch, loss_scale, seed, comm).with_context(summing)?;
        } else {
            model.accumulate_gradients(batch, loss_scale, seed)?;
        }
    }
    if ranks {
        let _reduce = profile::range("all_reduce");
        let reduced = if overlap {
            // Nothing to overlap with on a rank without a micro-batch: its zeros, in the
            // buckets the other ranks send.
            if share.is_empty() {
                model.sum_gradients_by_bucket(comm)
            } else {
                Ok(())
            }
        } else if zero {
            model.reduce_scatter_grads(comm)
        } else {
            model.all_reduce_grads(|g| comm.all_reduce_sum(g))
        };
        reduced.with_context(summing)?;
    }

    // 3 and 4. The global norm, then AdamW at the scheduled learning rate, clipped by a factor
    // the device works out from the norm; a norm that is not finite leaves the weights alone.
    // Every rank applies the same update to the same weights, so they stay identical (under
    // ZeRO-1 each rank updates its tensors and sends their new weights to all).
    let _optimizer = profile::range("optimizer");
    let hp = AdamW {
        lr: lr as f32,
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: cfg.eps,
        weight_decay: cfg.weight_decay,
        step: step + 1,
        grad_scale: 1.0,
    };
    let StepStats { mut loss_sum, grad_norm: norm } = if zero {
        model.clip_and_update_sharded(&hp, cfg.clip as f32, comm)?
    } else {
        model.clip_and_update(&hp, cfg.clip as f32)?
    };
    if ranks {
        let mut sum = [loss_sum];
        comm.all_reduce_sum_f64(&mut sum).context("summing the step's loss over the ranks")?;
        loss_sum = sum[0];
    }
    if !norm.is_finite() {
        let why = model
            .non_finite_report()
            .unwrap_or_else(|e| format!("the weights could not be read back: {e:#}"));
        bail!("step {}: the gradient norm is {norm} (loss sum {loss_sum}): {why}", step + 1);
    }
    Ok(StepOutcome {
        train_loss: Some(loss_sum / supervised as f64),
        grad_norm: Some(norm),
        supervised,
        tokens,
        skipped,
    })
}

/// This rank's share of the next step, each micro-batch with its position in the step, and how
/// many of its micro-batches were skipped for having no supervised target. The step takes the
/// next `grad_accum` micro-batches of this epoch or, when fewer are left (dropped, like a last
/// partial batch), the first ones of the next epoch; [`Sharding`] says which are this rank's.
/// Every rank moves past the other ranks' micro-batches too (without building them), so that
/// all loaders stay at the same place (the global one, as in one process).
fn next_share(loader: &mut Loader, sharding: &Sharding) -> Result<(Vec<(usize, Batch)>, u64)> {
    let grad_accum = sharding.global_accum();
    let here = loader.state();
    let (next_epoch, first) = sharding.step_start(here.batch_in_epoch, loader.batches_per_epoch() as u64);
    if next_epoch > 0 {
        loader.restore(&LoaderState { epoch: here.epoch + 1, batch_in_epoch: first })?;
        ensure!(
            loader.batches_per_epoch() >= grad_accum,
            "epoch {} has {} micro-batches, fewer than grad_accum = {grad_accum}",
            here.epoch + 1,
            loader.batches_per_epoch()
        );
    }
    let mine = sharding.positions(first);
    let mut share = Vec::with_capacity(sharding.accum);
    let mut skipped = 0;
    for (micro, position) in (first..sharding.next_step(first)).enumerate() {
        if !mine.contains(&position) {
            loader.skip_batch();
            continue;
        }
        match loader.next_batch() {
            Ok(batch) => share.push((micro, batch)),
            Err(e) if e.downcast_ref::<NoSupervisedTokens>().is_some() => skipped += 1,
            Err(e) => return Err(e),
        }
    }
    Ok((share, skipped))
}

/// Trains with `backend` (sample generations: see [`train_with`]).
pub fn train_on<B: Backend>(backend: B, cfg: &TrainConfig) -> Result<(Model<B>, TrainReport)> {
    train_with(backend, cfg, None)
}

/// The mean loss per supervised target over `batches` (no dropout, no gradients).
pub fn eval_loss<B: Backend>(model: &mut Model<B>, batches: &[Batch]) -> Result<f64> {
    eval_loss_ranks(model, batches, &SingleProcess)
}

/// [`eval_loss`] over the ranks of a data-parallel job: rank `r` evaluates batches `r`, `r + W`,
/// ... and the loss sums and target counts are summed over the ranks, so every rank gets the
/// mean over all of `batches` (one process's, up to the order of the f64 sums).
pub fn eval_loss_ranks<B: Backend>(
    model: &mut Model<B>,
    batches: &[Batch],
    comm: &dyn Collectives,
) -> Result<f64> {
    let mut totals = [0.0f64, 0.0];
    for batch in batches.iter().skip(comm.rank()).step_by(comm.world_size()) {
        let n = batch.n_supervised();
        if n > 0 {
            totals[0] += model.loss(batch)?;
            totals[1] += n as f64;
        }
    }
    if comm.world_size() > 1 {
        comm.all_reduce_sum_f64(&mut totals).context("summing the evaluation loss over the ranks")?;
    }
    let [sum, count] = totals;
    ensure!(count > 0.0, "no supervised targets in the {} evaluation batches", batches.len());
    let loss = sum / count;
    if !loss.is_finite() {
        bail!("the evaluation loss is {loss}: {}", model.non_finite_report()?);
    }
    Ok(loss)
}

/// A model config from a preset name; a JSON file of [`ModelConfig`]'s fields; or a checkpoint's
/// `config.json` or its directory, ours or a Hugging Face Llama's (as `--init-from` reads it), so
/// that a pretrained model's shape can be planned, benchmarked or initialized by its path.
/// `tiny` takes the tokenizer's vocabulary.
pub fn resolve_model_config(model: &str, vocab_size: usize) -> Result<ModelConfig> {
    let path = Path::new(model);
    let config = if model == "tiny" {
        ModelConfig::tiny(vocab_size)
    } else if path.is_dir() {
        checkpoint::read_model_config(path)?
    } else if model.ends_with(".json") || path.is_file() {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading model config {}", path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("parsing model config {}", path.display()))?;
        if checkpoint::is_checkpoint_config(&json) {
            checkpoint::config_of_json(path, &json)?
        } else {
            ModelConfig::parse(path, &text)?
        }
    } else {
        ModelConfig::preset(model)?
    };
    config.validate().with_context(|| format!("model config {model:?}"))?;
    Ok(config)
}

/// The dropout seed of micro-batch `micro` of optimizer step `step`.
fn dropout_seed(stream: &Rng, step: u64, micro: usize) -> u64 {
    stream.fork(step).fork(micro as u64).next_u64()
}

/// Stream id of the dropout masks, apart from the other uses of the seed.
const DROPOUT_STREAM: u64 = 0xD809;

/// `<out_dir>.train-lock` beside the run directory, held by the run's rank 0.
fn lock_run_dir(out_dir: &Path) -> Result<DirLock> {
    DirLock::acquire(
        sibling(out_dir, "train-lock")?,
        &format!("--out-dir {}", out_dir.display()),
        "sft train",
    )
}

/// Where a run starts: fresh, from a checkpoint's weights (`init_from`), or resumed.
struct RunStart {
    /// The checkpoint the run resumes from, with the state saved there.
    resumed: Option<(PathBuf, TrainerState)>,
    /// The checkpoint whose weights the model starts from (the resumed one, or `init_from`).
    weights: Option<Checkpoint>,
    tokenizer_path: PathBuf,
    tokenizer: ChatTokenizer,
    model_config: ModelConfig,
    max_seq_len: usize,
}

/// Decides where the run starts and with which model config and tokenizer; checks that they fit
/// together before any data is read.
fn start_run(cfg: &TrainConfig, main: bool) -> Result<RunStart> {
    let resume_dir = match (cfg.resume, checkpoint::latest(&cfg.out_dir)?) {
        (true, Some(dir)) => Some(dir),
        (true, None) => bail!(
            "--resume: {} holds no checkpoint (no `{}` file)",
            cfg.out_dir.display(),
            checkpoint::LATEST_FILE
        ),
        (false, Some(dir)) => bail!(
            "{} already holds checkpoints ({}): pass --resume to continue that run, or choose another out_dir",
            cfg.out_dir.display(),
            dir.display()
        ),
        (false, None) => None,
    };
    let resumed = match resume_dir {
        Some(dir) => {
            let state = TrainerState::load(&dir)?;
            crate::lora::check_resume(&state.config, cfg)?;
            // The checkpoint's config is the model: another --model would be ignored. (The default
            // stands for "not given": resuming needs no --model.)
            ensure!(
                cfg.model == state.config.model || cfg.model == TrainConfig::default().model,
                "--resume continues the model of {} ({:?}), not --model {:?}: drop --model, or choose another \
                 out_dir",
                dir.display(),
                state.config.model,
                cfg.model
            );
            if main {
                warn_about_changes(&state.config, cfg);
            }
            Some((dir, state))
        }
        None => None,
    };
    match (&resumed, &cfg.init_from, cfg.from_scratch) {
        (None, Some(dir), _) => {
            ensure!(
                !cfg.from_scratch,
                "give either --init-from ({}) or --from-scratch, not both",
                dir.display()
            );
            // Before the data's tokenizer: a pretrained model's lacks the chat tokens, and this
            // error says how to add them.
            checkpoint::import::check_init_tokenizer(dir)?;
        }
        (None, None, false) => {
            // `--model` sizes a model; a user pointing it at a pretrained one means its weights.
            let pretrained = Path::new(&cfg.model).is_dir();
            bail!(
                "no starting weights: pass --init-from DIR (a checkpoint: `sft init`, `sft import` or a \
                 run's step-N/) to fine-tune it, --resume to continue the run in {}, or --from-scratch \
                 to train a randomly initialized --model {:?}{}",
                cfg.out_dir.display(),
                cfg.model,
                if pretrained {
                    format!(
                        " (--model takes only the shape of {}: --init-from {0} loads its weights)",
                        cfg.model
                    )
                } else {
                    String::new()
                }
            )
        }
        _ => {}
    }
    let tokenizer_path = cfg.tokenizer_path();
    let tokenizer = ChatTokenizer::from_file(&tokenizer_path)
        .with_context(|| format!("loading the tokenizer {}", tokenizer_path.display()))?;
    // A LoRA run's weights are its frozen base; its checkpoints hold the adapters.
    let weights_from = match &cfg.lora {
        Some(_) => Some(crate::lora::base_dir(cfg, resumed.as_ref().map(|(_, s)| &s.config))?),
        None => resumed.as_ref().map(|(dir, _)| dir.clone()).or_else(|| cfg.init_from.clone()),
    };
    let weights = weights_from.as_deref().map(Checkpoint::open).transpose()?;
    if let Some(ckpt) = &weights {
        checkpoint::import::check_weights_tokenizer(ckpt.dir(), &tokenizer)?;
    }
    let mut model_config = match &weights {
        Some(ckpt) => ckpt.config().clone(),
        None => resolve_model_config(&cfg.model, tokenizer.vocab_size())?,
    };
    if let Some(p) = cfg.dropout {
        model_config.dropout = p;
    }
    let max_seq_len = match cfg.max_seq_len {
        Some(n) => n,
        None => default_seq_len(model_config.max_seq_len, longest_example(&cfg.data)?),
    };
    model_config.check_usage(Some((&tokenizer_path, tokenizer.vocab_size())), max_seq_len)?;
    if let Some(lora) = &cfg.lora {
        lora.validate(&model_config)?;
    }
    Ok(RunStart { resumed, weights, tokenizer_path, tokenizer, model_config, max_seq_len })
}

/// The data side of a run: the training loader, how many steps there are, the evaluation
/// batches and the learning-rate schedule.
struct DataPlan {
    loader: Loader,
    /// Optimizer steps in the first epoch.
    steps_per_epoch: u64,
    /// The step the run stops after (max_steps, else every epoch's steps).
    end_step: u64,
    schedule: Schedule,
    val: Validation,
}

/// The validation batches: a quick evaluation every `eval_every` steps, a full pass at each
/// epoch's end.
struct Validation {
    /// The whole validation split.
    full: Vec<Batch>,
    /// Its first `eval_batches`.
    quick: Vec<Batch>,
    /// Whether the quick and the full batches hold a supervised target at all.
    quick_supervised: bool,
    full_supervised: bool,
}

impl Validation {
    /// The validation loss after step `done` (1-based) of `end_step`, when one is due: the full
    /// split at an epoch's end, the quick batches every `eval_every` steps and after the last step.
    #[allow(clippy::too_many_arguments)]
    fn loss_after<B: Backend>(
        &self,
        model: &mut Model<B>,
        cfg: &TrainConfig,
        done: u64,
        end_step: u64,
        epoch_end: bool,
        comm: &dyn Collectives,
    ) -> Result<Option<f64>> {
        if !self.full_supervised {
            Ok(None)
        } else if epoch_end {
            eval_loss_ranks(model, &self.full, comm).map(Some)
        } else if (cfg.eval_every > 0 && done.is_multiple_of(cfg.eval_every)) || done == end_step {
            self.quick_supervised.then(|| eval_loss_ranks(model, &self.quick, comm)).transpose()
        } else {
            Ok(None)
        }
    }
}

fn plan_data(cfg: &TrainConfig, tokenizer: &ChatTokenizer, max_seq_len: usize) -> Result<DataPlan> {
    let loader_config = LoaderConfig {
        batch_size: cfg.micro_batch.configured(),
        max_seq_len,
        mode: cfg.batch_mode,
        shuffle: cfg.shuffle,
        seed: cfg.seed,
    };
    let train_set = Arc::new(Dataset::open(&cfg.data, Split::Train)?);
    train_set.ensure_tokenizer(tokenizer)?;
    // Generation puts the tokenizer's BOS before every prompt; shards prepared by a build that
    // did not start rows with it would train on rows that no prompt resembles.
    if let Some(bos) = tokenizer.bos_id() {
        if !train_set.is_empty() && train_set.example(0).tokens.first() != Some(&bos) {
            crate::say!(
                "note: the tokenizer starts texts with token {bos} but the rows in {} do not; \
                 re-run sft prepare so that training rows match generation's prompts",
                cfg.data.display()
            );
        }
    }
    let loader = Loader::new(train_set.clone(), loader_config.clone())?;
    // Packed batches per epoch depend on the epoch's shuffle: count every epoch's steps (only
    // the first one when max_steps and schedule_steps make the count unnecessary).
    let count_epochs = if cfg.counts_epochs() { cfg.epochs.max(1) } else { 1 };
    let mut epoch_steps = Vec::with_capacity(count_epochs as usize);
    let mut scratch = Loader::new(train_set, loader_config.clone())?;
    for epoch in 0..count_epochs {
        scratch.restore(&LoaderState { epoch, batch_in_epoch: 0 })?;
        let batches = scratch.batches_per_epoch();
        ensure!(
            batches >= cfg.grad_accum,
            "{}: epoch {epoch} has {batches} micro-batches, fewer than grad_accum = {}: lower micro_batch or grad_accum{}",
            cfg.data.display(),
            cfg.grad_accum,
            if cfg.batch_mode == BatchMode::Packed {
                " (packed micro-batches are rows of max_seq_len tokens; --batch-mode dynamic counts examples)"
            } else {
                ""
            }
        );
        epoch_steps.push((batches / cfg.grad_accum) as u64);
    }
    let epochs_steps: u64 = epoch_steps.iter().take(cfg.epochs as usize).sum();
    let val_set = Dataset::open(&cfg.data, Split::Val)?;
    val_set.ensure_tokenizer(tokenizer)?;
    let full_val: Vec<Batch> =
        if !val_set.is_empty() { batches_in_order(&val_set, &loader_config)? } else { vec![] };
    let quick_val: Vec<Batch> = full_val.iter().take(cfg.eval_batches).cloned().collect();
    Ok(DataPlan {
        loader,
        steps_per_epoch: epoch_steps[0],
        end_step: cfg.max_steps.unwrap_or(epochs_steps),
        schedule: Schedule {
            max_lr: cfg.max_lr,
            min_lr: cfg.min_lr,
            warmup_steps: cfg.warmup_steps,
            total_steps: cfg.schedule_length(epochs_steps),
        },
        val: Validation {
            quick_supervised: quick_val.iter().any(|b| b.n_supervised() > 0),
            full_supervised: full_val.iter().any(|b| b.n_supervised() > 0),
            full: full_val,
            quick: quick_val,
        },
    })
}

/// Trains with `backend`; `sampler` (when given, and when `cfg.samples` is not empty) prints
/// sample replies at steps `sample_every` × 1, 2, 4, 8, ...
pub fn train_with<B: Backend>(
    backend: B,
    cfg: &TrainConfig,
    sampler: Option<&mut Sampler<'_, B>>,
) -> Result<(Model<B>, TrainReport)> {
    train_ranks(backend, cfg, sampler, &SingleProcess)
}

/// [`train_with`] as one rank of a data-parallel job over `comm` (docs/distributed.md): every
/// rank trains on its share of each step's micro-batches ([`Sharding`]; `grad_accum` counts the
/// micro-batches of the whole step, over all ranks), the gradients and counts are summed over
/// the ranks before the update, and only rank 0 writes the log, progress, samples and
/// checkpoints (`sampler` is only called there). The run is one process's with the same config,
/// up to the order of the gradient sums, and its checkpoints resume at any number of ranks.
pub fn train_ranks<B: Backend>(
    backend: B,
    cfg: &TrainConfig,
    mut sampler: Option<&mut Sampler<'_, B>>,
    comm: &dyn Collectives,
) -> Result<(Model<B>, TrainReport)> {
    cfg.validate()?;
    let (main, world) = (comm.is_main(), comm.world_size());
    // Held until the run ends, taken before the run directory is read: another run into it
    // would interleave its log rows and checkpoints with this one's (and two fresh runs would
    // both find it free of checkpoints).
    let _run_lock = if main { Some(lock_run_dir(&cfg.out_dir)?) } else { None };
    let RunStart { resumed, weights, tokenizer_path, tokenizer, model_config, max_seq_len } =
        start_run(cfg, main)?;
    let saved = resumed.as_ref().map(|(_, s)| &s.config);
    // The row length the resumed run's data position counts in (where it left it to the default).
    let saved_seq_len = match saved.map(|s| (s.max_seq_len, cfg.max_seq_len)) {
        None => None,
        Some((Some(n), _)) => Some(n),
        Some((None, None)) => Some(max_seq_len),
        Some((None, Some(_))) => Some(default_seq_len(model_config.max_seq_len, longest_example(&cfg.data)?)),
    };
    if let Some((dir, s)) = &resumed {
        // Refused before anything is allocated; load_optimizer_into checks the file itself too.
        ensure!(
            s.config.optimizer_state == cfg.optimizer_state,
            "{}: the run was saved with config.optimizer_state {}, this one asks for {}: resume with \
             --optimizer-state {} (moments are not converted between state types)",
            dir.join(checkpoint::TRAINER_STATE_FILE).display(),
            s.config.optimizer_state,
            cfg.optimizer_state,
            s.config.optimizer_state
        );
    }
    // Under ZeRO-1 each rank holds its share of the optimizer state; the memory plans below
    // count the largest share, so that rank 0's choices fit every rank.
    let layout = OptimizerLayout {
        moments: cfg.optimizer_state,
        zero: (cfg.zero_stage == 1 && world > 1).then_some((comm.rank(), world)),
    };
    let plan_layout = layout.largest_share(&crate::model::params::param_lens(&model_config))?;
    let recompute = resolve_recompute(&backend, cfg, &model_config, max_seq_len, saved, plan_layout)?;
    // Stored resolved, so that a resume keeps it; left unset when never set (the default).
    let stored = match (cfg.recompute, saved.and_then(|s| s.recompute)) {
        (None, None) => None,
        _ => Some(RecomputeChoice::Fixed(recompute)),
    };
    let mut resolved = TrainConfig {
        recompute: stored,
        ..plan_micro_batches(&backend, cfg, &model_config, max_seq_len, saved, main, recompute, plan_layout)?
    };
    if world > 1 {
        // `auto` reads each rank's free memory: rank 0's choice holds for all.
        let mut batches = [resolved.micro_batch.configured() as u64, resolved.grad_accum as u64];
        broadcast_u64(comm, &mut batches, 0)?;
        resolved.micro_batch = MicroBatch::Fixed(batches[0] as usize);
        resolved.grad_accum = batches[1] as usize;
    }
    let cfg = &resolved;
    let sharding = data_parallel_sharding(cfg, comm)?;
    let DataPlan { mut loader, steps_per_epoch, end_step, schedule, val } =
        plan_data(cfg, &tokenizer, max_seq_len)?;

    // ---- the model and the counters (continued from the checkpoint when resuming) -----------
    let mut model = match &weights {
        Some(ckpt) => ckpt.training_model_with(
            backend,
            cfg.dropout,
            cfg.micro_batch.configured(),
            max_seq_len,
            cfg.lora.as_ref(),
            recompute,
            layout,
        )?,
        None => {
            let mut model = Model::for_micro_batches_with(
                backend,
                model_config,
                cfg.micro_batch.configured(),
                max_seq_len,
                None,
                recompute,
                layout,
            )?;
            model.init_params(cfg.seed)?;
            model
        }
    };
    if cfg.lora.is_some() && resumed.is_none() {
        model.init_adapters(cfg.seed)?;
    }
    let dropout_stream = Rng::new(cfg.seed).fork(DROPOUT_STREAM);
    let is_resume = resumed.is_some();
    let mut state = match resumed {
        Some((dir, mut s)) => {
            checkpoint::load_optimizer_into(&dir, &mut model)?;
            let saved_seq_len = saved_seq_len.unwrap_or(max_seq_len);
            continue_data(&mut loader, &s.config, &s.loader, saved_seq_len, main).with_context(|| {
                format!("{}: field \"loader\"", dir.join(checkpoint::TRAINER_STATE_FILE).display())
            })?;
            // The run's model and base stay the checkpoint's, whatever the flags left at defaults.
            let init_from = cfg.init_from.clone().or(s.config.init_from.take());
            s.config = TrainConfig { model: std::mem::take(&mut s.config.model), init_from, ..cfg.clone() };
            s.schedule = schedule.clone();
            s
        }
        None => TrainerState::fresh(loader.state(), schedule.clone(), cfg.clone()),
    };
    let start_step = state.step;
    if world > 1 {
        // Each rank worked these out alone, from its own view of the data and the checkpoint.
        dist::ensure_agreement(
            comm,
            &[
                ("steps per epoch", steps_per_epoch),
                ("last step", end_step),
                ("first step", start_step),
                ("epoch", state.loader.epoch),
                ("micro-batch of the epoch", state.loader.batch_in_epoch),
                ("micro-batches per epoch", loader.batches_per_epoch() as u64),
                ("parameters", model.config().n_params() as u64),
                ("validation batches", val.full.len() as u64),
            ],
        )?;
    }
    let mut log = if main {
        std::fs::create_dir_all(&cfg.out_dir)
            .with_context(|| format!("creating {}", cfg.out_dir.display()))?;
        Some(CsvLog::open(&cfg.out_dir.join("log.csv"), is_resume.then_some(start_step))?)
    } else {
        None
    };
    let progress = Progress::new(start_step, end_step, cfg.log_every, main);
    let ranks = match world {
        1 => String::new(),
        w => format!(" ({} on each of {w} ranks, over {})", sharding.accum, comm.transport()),
    };
    progress.println(&format!(
        "training {} parameters on {}: {} micro-batches of {} per step{ranks}, {steps_per_epoch} steps per epoch, steps {start_step}..{end_step}",
        model.config().n_params(),
        model.backend().name(),
        cfg.grad_accum,
        cfg.micro_batch,
    ));
    if model.optimizer_state() == crate::backend::StateDtype::Bf16 {
        progress.println("AdamW moments in bf16 (--optimizer-state bf16): 4 bytes per parameter fewer");
    }
    if let Some(lora) = model.lora() {
        progress.println(&crate::lora::describe(lora, model.config()));
    }
    if let Some(shards) = model.optimizer_shards() {
        let counts = shards.counts();
        progress.println(&format!(
            "ZeRO-1: master weights and AdamW moments split over {world} ranks, {} to {} parameters each (of {})",
            counts.iter().min().unwrap_or(&0),
            counts.iter().max().unwrap_or(&0),
            counts.iter().sum::<usize>()
        ));
    } else if cfg.zero_stage == 1 {
        progress.println("note: zero_stage 1 has nothing to split in one process");
    }

    let mut report = TrainReport {
        steps: start_step,
        final_train_loss: f64::NAN,
        final_val_loss: state.last_val_loss,
        tokens_per_s: 0.0,
        step_losses: Vec::new(),
        skipped_batches: state.skipped_batches,
        steps_per_epoch,
        checkpoint: None,
    };
    let mut train_time = 0.0f64;
    let mut train_tokens = 0u64;
    let run_start = Instant::now();
    let elapsed_before = state.elapsed_s;

    // ---- the loop --------------------------------------------------------------------------
    // A stop asked for while the run was being set up: nothing trained yet, nothing to save.
    if let Some(signal) = interrupt::requested(comm).context("agreeing on a stop over the ranks")? {
        let out_dir = cfg.out_dir.clone();
        return Err(Interrupted { signal, step: state.step, checkpoint: None, out_dir }.into());
    }
    let mut stopped = None;
    while state.step < end_step {
        let step = state.step; // 0-based index of the step being taken
        let step_start = Instant::now();

        let (share, skipped_here) = next_share(&mut loader, &sharding)?;
        let share: Vec<(usize, &Batch)> = share.iter().map(|(micro, batch)| (*micro, batch)).collect();
        let lr = schedule.lr(step);
        let StepOutcome { train_loss, grad_norm, supervised, tokens: step_tokens, skipped } =
            step_on_share(&mut model, &share, skipped_here, step, lr, cfg, &dropout_stream, comm)?;
        state.skipped_batches += skipped;
        model.backend().synchronize()?;
        let step_secs = step_start.elapsed().as_secs_f64();
        train_time += step_secs;
        train_tokens += step_tokens;

        state.step = step + 1;
        state.loader = loader.state();
        let epoch_end =
            state.loader.batch_in_epoch + cfg.grad_accum as u64 > loader.batches_per_epoch() as u64;
        state.epoch = state.loader.epoch + u64::from(epoch_end);
        state.tokens_seen += step_tokens;
        state.supervised_tokens_seen += supervised as u64;
        state.lr = lr;
        if let Some(loss) = train_loss {
            state.last_train_loss = Some(loss);
            report.step_losses.push((state.step, loss));
        }

        // ---- evaluation: a quick one every eval_every steps, a full pass at each epoch end ----
        let done = state.step;
        let val_loss = val.loss_after(&mut model, cfg, done, end_step, epoch_end, comm)?;
        if let Some(loss) = val_loss {
            if epoch_end {
                progress.println(&format!("epoch {} done: full validation loss {loss:.4}", state.epoch));
            }
            state.last_val_loss = val_loss;
        }

        state.elapsed_s = elapsed_before + run_start.elapsed().as_secs_f64();
        if let Some(log) = log.as_mut() {
            log.write(&LogRow {
                step: done,
                progress_pct: 100.0 * done as f64 / end_step as f64,
                train_loss,
                val_loss,
                lr,
                grad_norm,
                time_s: state.elapsed_s,
                tokens_per_s: step_tokens as f64 / step_secs.max(1e-9),
            })?;
        }
        let summary = format!(
            "loss {} val {} lr {lr:.3e} norm {} tok/s {:.0}",
            train_loss.map_or("-".into(), |l| format!("{l:.4}")),
            state.last_val_loss.map_or("-".into(), |l| format!("{l:.4}")),
            grad_norm.map_or("-".into(), |n| format!("{n:.3}")),
            step_tokens as f64 / step_secs.max(1e-9)
        );
        progress.step(done, end_step, &summary);

        // ---- sample replies at growing intervals --------------------------------------------
        if let Some(sample) = sampler.as_deref_mut().filter(|_| main) {
            if cfg.sample_every > 0
                && done.is_multiple_of(cfg.sample_every)
                && (done / cfg.sample_every).is_power_of_two()
            {
                for prompt in &cfg.samples {
                    let reply = sample(&mut model, &tokenizer, prompt)?;
                    progress.println(&format!("[step {done}] {prompt}\n  -> {reply}"));
                }
            }
        }

        // A run that reaches its end without a single supervised target has learned nothing:
        // that is a data problem to report, not a finished run (and no checkpoint of it).
        if done == end_step && state.supervised_tokens_seen == 0 {
            bail!(
                "{}: no supervised target in any of the {} steps run: all {} micro-batches were skipped \
                 (their targets are all padding); check how the data was prepared (--train-on, max_seq_len)",
                cfg.data.display(),
                done,
                state.skipped_batches
            );
        }

        // ---- checkpoint ------------------------------------------------------------------------
        // A stop asked for (Ctrl-C, SIGTERM; on any rank) ends the run after this step, saved.
        let stop = interrupt::requested(comm).context("agreeing on a stop over the ranks")?;
        if let Some(signal) = stop.filter(|_| done < end_step) {
            progress.println(&format!(
                "stop requested (signal {signal}): saving step {done}; the same signal again stops at once"
            ));
            stopped = Some(signal);
        }
        // Under ZeRO-1 every rank takes part (the state is gathered from its owners).
        let saves = main || model.optimizer_shards().is_some();
        let scheduled = cfg.save_every > 0 && done.is_multiple_of(cfg.save_every);
        if saves && (scheduled || done == end_step || stopped.is_some()) {
            let (out, tok, keep) = (&cfg.out_dir, Some(tokenizer_path.as_path()), cfg.keep_checkpoints);
            let dir = match weights.as_ref().filter(|_| cfg.lora.is_some()) {
                Some(base) => {
                    Some(crate::lora::save_run(out, &model, state.step, &state, base.dir(), tok, keep)?)
                }
                None => checkpoint::save_over(out, &model, comm, state.step, &state, tok, keep)?,
            };
            // Rank 0 wrote it.
            if let Some(dir) = dir {
                report.checkpoint = Some(dir);
                // The curves so far, beside the log; a plot that fails never stops training.
                if let Err(e) = super::plot::plot_log(&cfg.out_dir.join("log.csv"), None, false) {
                    progress.println(&format!("note: loss.svg not drawn: {e:#}"));
                }
            }
        }
        if stopped.is_some() {
            break;
        }
    }
    progress.finish();
    // The other ranks return once rank 0's last checkpoint is written.
    comm.barrier().context("waiting for rank 0's last checkpoint")?;
    if let Some(signal) = stopped {
        let out_dir = cfg.out_dir.clone();
        return Err(Interrupted { signal, step: state.step, checkpoint: report.checkpoint, out_dir }.into());
    }

    report.steps = state.step;
    report.final_train_loss = report.step_losses.last().map_or(f64::NAN, |&(_, l)| l);
    report.final_val_loss = state.last_val_loss;
    report.tokens_per_s = if train_time > 0.0 { train_tokens as f64 / train_time } else { 0.0 };
    report.skipped_batches = state.skipped_batches;
    if report.skipped_batches > 0 && main {
        crate::say!(
            "note: {} micro-batches had no supervised target and were skipped",
            report.skipped_batches
        );
    }
    Ok((model, report))
}

/// This rank's share of every step: `grad_accum / ranks` consecutive micro-batches of the step's
/// `grad_accum` (what is not yet built for several ranks is refused here).
fn data_parallel_sharding(cfg: &TrainConfig, comm: &dyn Collectives) -> Result<Sharding> {
    let world = comm.world_size();
    if world > 1 {
        ensure!(
            cfg.grad_accum.is_multiple_of(world),
            "grad_accum = {} is not a multiple of the {world} ranks: it counts the micro-batches of the whole \
             step, of which each rank takes grad_accum / {world}; set grad_accum to a multiple of {world}",
            cfg.grad_accum
        );
    }
    Sharding::new(comm.rank(), world, cfg.grad_accum / world)
}

/// `micro_batch` `auto` resolved to numbers (see [`plan_batches`]), printing what it chose and
/// why: on resume the interrupted run's choice where it keeps the step's examples (so the resumed
/// run sees the same batches; it is stored in the run state as the resolved config), else the
/// largest micro-batch that fits the device's free memory.
#[allow(clippy::too_many_arguments)]
fn plan_micro_batches<B: Backend>(
    backend: &B,
    cfg: &TrainConfig,
    model_config: &ModelConfig,
    max_seq_len: usize,
    saved: Option<&TrainConfig>,
    main: bool,
    recompute: Recompute,
    layout: OptimizerLayout,
) -> Result<TrainConfig> {
    if cfg.micro_batch != MicroBatch::Auto {
        return Ok(cfg.clone());
    }
    if let Some(kept) = saved.and_then(|s| cfg.with_saved_batches(s)) {
        if main {
            crate::say!(
                "micro_batch auto: {} × grad_accum {}, as the run being resumed chose",
                kept.micro_batch,
                kept.grad_accum
            );
        }
        return Ok(kept);
    }
    let free = backend.memory_info()?.map(|(free, _)| free);
    let compute_bytes = backend.compute_bytes();
    let fits = free.map(|f| {
        let lora = cfg.lora.as_ref();
        crate::model::forward::micro_batch_that_fits_with(
            model_config,
            compute_bytes,
            max_seq_len,
            f,
            lora,
            recompute,
            layout,
        )
    });
    let plan = plan_batches(cfg.micro_batch, cfg.grad_accum, fits);
    let memory = free.map_or(String::new(), |f| format!(", {:.1} GiB free", f as f64 / (1u64 << 30) as f64));
    if main {
        crate::say!("{} (rows of {max_seq_len} tokens on {}{memory})", plan.reason, backend.name());
    }
    Ok(TrainConfig {
        micro_batch: MicroBatch::Fixed(plan.micro_batch),
        grad_accum: plan.grad_accum,
        ..cfg.clone()
    })
}

/// `recompute` resolved to a mode, printing what `auto` chose: the least recompute with which the
/// configured micro-batch (with `micro_batch` `auto`: the resumed run's, else one row) fits the
/// device's free memory. Unset, the resumed run's mode (else `none`); a resume with another mode
/// is said, not refused: the gradients are the same.
fn resolve_recompute<B: Backend>(
    backend: &B,
    cfg: &TrainConfig,
    model_config: &ModelConfig,
    max_seq_len: usize,
    saved: Option<&TrainConfig>,
    layout: OptimizerLayout,
) -> Result<Recompute> {
    let saved_choice = saved.and_then(|s| s.recompute);
    let r = match cfg.recompute.or(saved_choice).unwrap_or_default() {
        RecomputeChoice::Fixed(r) => r,
        RecomputeChoice::Auto => {
            let at_least = match (cfg.micro_batch, saved.map(|s| s.micro_batch)) {
                (MicroBatch::Fixed(m), _) | (MicroBatch::Auto, Some(MicroBatch::Fixed(m))) => m,
                _ => 1,
            };
            let lora = cfg.lora.as_ref();
            let free = backend.memory_info()?.map(|(free, _)| free);
            let chosen = free.and_then(|f| {
                least_recompute_that_fits(
                    model_config,
                    backend.compute_bytes(),
                    max_seq_len,
                    f,
                    lora,
                    at_least,
                    layout,
                )
            });
            match (free, chosen) {
                (None, _) => {
                    crate::say!("recompute auto: none ({} reports no memory limit)", backend.name());
                    Recompute::None
                }
                (Some(_), Some((r, fits))) => {
                    crate::say!(
                        "recompute auto: {r}, the least with which micro_batch {at_least} fits on {} \
                         (up to {fits} rows of {max_seq_len} tokens)",
                        backend.name()
                    );
                    r
                }
                // Not even the most recompute fits: the model's own check says what would.
                (Some(_), None) => Recompute::Layer,
            }
        }
    };
    if let Some(RecomputeChoice::Fixed(before)) = saved_choice.filter(|&c| c != RecomputeChoice::Fixed(r)) {
        crate::say!(
            "note: recompute {r}, where the interrupted run used {before}: the gradients are the same, \
             only memory and time differ"
        );
    }
    Ok(r)
}

/// Puts `loader` where the saved run stood (`at`, counted in micro-batches of the saved run's
/// shape, its rows `saved_seq_len` tokens): with another micro-batch, batch mode or row length,
/// at the same place in the data ([`Loader::restore_from`]), saying where.
fn continue_data(
    loader: &mut Loader,
    saved: &TrainConfig,
    at: &LoaderState,
    saved_seq_len: usize,
    main: bool,
) -> Result<()> {
    let was = LoaderConfig {
        batch_size: saved.micro_batch.configured(),
        max_seq_len: saved_seq_len,
        mode: saved.batch_mode,
        shuffle: saved.shuffle,
        seed: saved.seed,
    };
    let seen_again = loader.restore_from(&was, at)?;
    if main && was != *loader.config() {
        let shape = |c: &LoaderConfig| {
            format!("{} ({:?}, rows of {} tokens)", c.batch_size, c.mode, c.max_seq_len).to_lowercase()
        };
        crate::say!(
            "note: the checkpoint stopped at micro-batch {} of epoch {} in micro-batches of {}; this run's \
             micro-batches of {} go on at micro-batch {}{}",
            at.batch_in_epoch,
            at.epoch,
            shape(&was),
            shape(loader.config()),
            loader.state().batch_in_epoch,
            match seen_again {
                0 => ", the same place in the data".to_string(),
                n => format!(", {n} examples before that place (seen again this epoch)"),
            }
        );
    }
    Ok(())
}

/// A resumed run matches the interrupted one only with the same data order and batches.
fn warn_about_changes(saved: &TrainConfig, now: &TrainConfig) {
    let kept = now.with_saved_batches(saved);
    let now = kept.as_ref().unwrap_or(now);
    let mut changed = Vec::new();
    macro_rules! check {
        ($($field:ident),*) => {$(
            if saved.$field != now.$field {
                changed.push(format!("{} {:?} -> {:?}", stringify!($field), saved.$field, now.$field));
            }
        )*};
    }
    // The same directory by another path (`./prepared`, an absolute one) is no change.
    if !crate::paths::same_file(&saved.data, &now.data) {
        changed.push(format!("data {:?} -> {:?}", saved.data, now.data));
    }
    check!(micro_batch, grad_accum, batch_mode, max_seq_len, shuffle, seed, dropout, epochs, schedule_steps);
    check!(max_lr, min_lr, warmup_steps, beta1, beta2, eps, weight_decay, clip, lora);
    // The weights come from the checkpoint: a --init-from given again is ignored (LoRA's base is
    // checked in `lora::check_resume`); left out, it is simply not needed.
    if now.init_from.is_some() && saved.init_from != now.init_from && now.lora.is_none() {
        changed.push(format!(
            "init_from {:?} -> {:?} (ignored: the weights are the checkpoint's)",
            saved.init_from, now.init_from
        ));
    }
    if now.schedule_steps.is_none() && saved.max_steps != now.max_steps {
        changed
            .push(format!("max_steps {:?} -> {:?} (the schedule's length)", saved.max_steps, now.max_steps));
    }
    if !changed.is_empty() {
        crate::say!(
            "warning: resuming with settings that differ from the checkpoint's ({}); the run will not repeat an uninterrupted one",
            changed.join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rank `rank` of two, for what is decided before any collective runs.
    struct OfTwo {
        rank: usize,
    }

    impl Collectives for OfTwo {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            2
        }
        fn all_reduce_sum(&self, _: &mut [f32]) -> Result<()> {
            bail!("no other rank here")
        }
        fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<()> {
            bail!("no other rank here")
        }
        fn reduce_sum(&self, _: &mut [f32], _: usize) -> Result<()> {
            bail!("no other rank here")
        }
        fn broadcast(&self, _: &mut [f32], _: usize) -> Result<()> {
            bail!("no other rank here")
        }
        fn broadcast_bytes(&self, _: &mut [u8], _: usize) -> Result<()> {
            bail!("no other rank here")
        }
        fn barrier(&self) -> Result<()> {
            bail!("no other rank here")
        }
        fn abort(&self, code: i32) -> ! {
            panic!("abort({code})")
        }
    }

    #[test]
    fn each_rank_takes_its_share_of_grad_accum() {
        let cfg = TrainConfig { grad_accum: 6, ..TrainConfig::default() };
        let s = data_parallel_sharding(&cfg, &OfTwo { rank: 1 }).unwrap();
        assert_eq!((s.rank, s.world_size, s.accum), (1, 2, 3));
        assert_eq!(s.positions(0), 3..6);
        let one = data_parallel_sharding(&cfg, &SingleProcess).unwrap();
        assert_eq!((one.world_size, one.accum), (1, 6));
    }

    #[test]
    fn what_several_ranks_cannot_do_is_refused() {
        let odd = TrainConfig { grad_accum: 3, ..TrainConfig::default() };
        let e = data_parallel_sharding(&odd, &OfTwo { rank: 0 }).unwrap_err().to_string();
        assert!(e.contains("grad_accum = 3 is not a multiple of the 2 ranks"), "{e}");
        // LoRA runs over ranks too (the adapters' gradients are reduced).
        let lora = TrainConfig { grad_accum: 4, lora: Some(Default::default()), ..TrainConfig::default() };
        assert_eq!(data_parallel_sharding(&lora, &OfTwo { rank: 0 }).unwrap().accum, 2);
        // On GPUs each rank opens the GPU of its local rank and joins NCCL: without a GPU (or
        // without the other rank) an error that names the rank.
        let cuda = TrainConfig {
            data: "d".into(),
            device: "cuda".into(),
            from_scratch: true,
            ..TrainConfig::default()
        };
        let e = crate::train::cli::train_on_device_ranks(&cuda, &OfTwo { rank: 0 }, 1).unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("rank 0 of 2"), "{e}");
    }

    use crate::plan::counting::CountingBackend;

    #[test]
    fn recompute_resolves_to_the_flag_else_the_resumed_runs_else_none() {
        let be = CountingBackend::new();
        let model = ModelConfig::tiny(300);
        let with = |r: Option<RecomputeChoice>| TrainConfig { recompute: r, ..TrainConfig::default() };
        let layer = Some(RecomputeChoice::Fixed(Recompute::Layer));
        let mlp = Some(RecomputeChoice::Fixed(Recompute::Mlp));
        let resolve = |now: &TrainConfig, saved: Option<&TrainConfig>| {
            resolve_recompute(&be, now, &model, 64, saved, now.optimizer_state.into()).unwrap()
        };
        assert_eq!(resolve(&with(None), None), Recompute::None);
        assert_eq!(resolve(&with(mlp), None), Recompute::Mlp);
        // Resumed without the flag: the interrupted run's; with it: the flag's (said, not refused).
        assert_eq!(resolve(&with(None), Some(&with(layer))), Recompute::Layer);
        assert_eq!(resolve(&with(mlp), Some(&with(layer))), Recompute::Mlp);
        // A backend without a memory limit needs no recompute.
        assert_eq!(resolve(&with(Some(RecomputeChoice::Auto)), None), Recompute::None);
    }
}
