//! `sft plan`: a cost model of one training step — will it fit, and how fast will it go —
//! without a GPU. Every figure it prints is an estimate.
//!
//! It runs the real optimizer step (`optimizer_step`: forward+backward per micro-batch, the
//! global norm, AdamW) of the real [`Model`] on [`counting::CountingBackend`], which launches
//! nothing and records per op family the FLOPs, the bytes the CUDA kernels move and the launches.
//! Each (family, kind of kernel) is then timed against a device of [`devices::DEVICES`] as a
//! roofline, `max(FLOPs / (peak · efficiency), bytes / (bandwidth · efficiency))`, plus a launch
//! cost per launch, and scaled by the device's calibration factor of the family. Tokens/s and
//! MFU use `sft bench`'s FLOPs per token ([`crate::bench::train::flops_per_token`]) against the
//! device's peak; the memory plan uses the trainer's own
//! [`memory_bytes`](crate::model::forward::memory_bytes) and
//! [`micro_batch_that_fits`](crate::model::forward::micro_batch_that_fits).

pub mod calibrate;
pub mod counting;
pub mod devices;

use anyhow::{bail, ensure, Context, Result};
use clap::Args;

use crate::backend::StateDtype;
use crate::bench::train::{flops_per_token, synthetic_batch};
use crate::data::Batch;
use crate::model::forward::{
    least_recompute_that_fits, memory_advice_with, memory_bytes_with, micro_batch_that_fits_with,
};
use crate::model::lora::LoraConfig;
use crate::model::{Model, ModelConfig, Recompute, RecomputeChoice};
use crate::rng::Rng;
use crate::train::config::MicroBatch;
use crate::train::trainer::{optimizer_step, resolve_model_config};
use crate::train::TrainConfig;
use counting::{CountingBackend, Family, KernelKind, Ledger, Tally, COMPUTE_BYTES, GEMM_WORKSPACE_BYTES};
use devices::{Calibration, DeviceSpec, CONTEXT_BYTES, LAUNCH_OVERHEAD_S, SYNC_OVERHEAD_S};

#[derive(Args, Debug, Clone)]
pub struct PlanArgs {
    /// A preset (`simplellama-1.3b`), a model-config JSON file, or a model directory or its
    /// config.json (sft's or a Hugging Face Llama's), with heads of 64 or 128 (the tensor-core
    /// attention the plan times; the `tiny` preset's heads of 16 are not).
    #[arg(long, default_value = "simplellama-1.3b")]
    pub model: String,
    /// h100 (SXM), h200, a100 (80 GB SXM) or rtx4090.
    #[arg(long, default_value = "h100")]
    pub gpu: String,
    /// Rows per micro-batch, or auto: as `sft train` chooses it (the largest of at most 32 that
    /// fits the device and divides the step's 32 × --grad-accum examples).
    #[arg(long, default_value = "8")]
    pub micro_batch: MicroBatch,
    /// Row length; default: the model's max_seq_len.
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Overrides the model's dropout (0.1 in simplellama-1.3b).
    #[arg(long)]
    pub dropout: Option<f32>,
    /// Print the plan as JSON.
    #[arg(long)]
    pub json: bool,
    /// Calibrate instead: nsys's kernel summary (`nsys stats --report cuda_gpu_kern_sum --format
    /// csv`) of `sft bench` steps of the same shape on `--gpu`, printed per family next to the
    /// estimate.
    #[arg(long, value_name = "CSV")]
    pub calibrate_from: Option<std::path::PathBuf>,
    /// Optimizer steps the profile covers (warm-up steps included).
    #[arg(long, default_value_t = 1)]
    pub profiled_steps: usize,
    /// With --calibrate-from: store the factors in src/plan/calibration.json (run from the
    /// repository root), with this source (device, date, commit, command).
    #[arg(long, value_name = "SOURCE", requires = "calibrate_from")]
    pub write_calibration: Option<String>,
    /// Plan a LoRA run: adapters on the frozen base.
    #[command(flatten)]
    pub lora: crate::lora::LoraArgs,
    /// Storage of the AdamW moments, as `sft train --optimizer-state`: f32 or bf16.
    #[arg(long, value_name = "f32|bf16", default_value = "f32")]
    pub optimizer_state: StateDtype,
    /// Activation recompute: none, mlp, layer, or auto (the least with which --micro-batch
    /// fits the device).
    #[arg(long, value_name = "MODE", default_value = "none")]
    pub recompute: RecomputeChoice,
    /// Data-parallel ranks, one per GPU (`mpirun -np N sft train`): each runs this step on its
    /// share of the examples and the fp32 gradients are all-reduced — in buckets overlapped with
    /// the last micro-batch's backward (full fine-tuning, --grad-overlap true), or after the
    /// backward.
    #[arg(long, default_value_t = 1)]
    pub gpus: usize,
    /// With --gpus above 1: nvlink, pcie, infiniband (several nodes), or a bus bandwidth in
    /// GB/s. Default: nvlink where the device has it, else pcie.
    #[arg(long)]
    pub link: Option<String>,
    /// With --gpus above 1: 1 plans ZeRO-1 (`sft train --zero-stage 1`): each rank holds its
    /// share of the master weights and moments; the gradients are reduce-scattered and the bf16
    /// weights all-gathered instead of all-reduced.
    #[arg(long, value_name = "0|1", default_value_t = 0)]
    pub zero_stage: u8,
    /// With --gpus above 1, as `sft train --grad-overlap`: true sums full fine-tuning's gradients
    /// over the ranks bucket by bucket (the head, each layer, the embeddings) during the last
    /// micro-batch's backward; false after it. LoRA's are always after it.
    #[arg(long, value_name = "true|false", default_value_t = true, action = clap::ArgAction::Set)]
    pub grad_overlap: bool,
}

/// The step over `gpus` data-parallel ranks.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DataParallelPlan {
    pub gpus: usize,
    pub link: devices::Link,
    /// fp32 gradients of the trainable parameters (the adapters' with LoRA), all-reduced once
    /// per optimizer step (reduce-scattered under ZeRO-1).
    pub gradient_bytes: f64,
    /// 0, or 1: ZeRO-1, whose bf16 weights are all-gathered after the update.
    pub zero_stage: u8,
    /// bf16 weights all-gathered per step (ZeRO-1; 0 otherwise).
    pub weight_bytes: f64,
    /// The collectives of one step, all of them: the all-reduce (every bucket's, when
    /// overlapped), or ZeRO-1's gradient reduce and weight all-gather.
    pub collective_seconds: f64,
    /// Whether the gradients' collective overlaps the last micro-batch's backward, bucket by
    /// bucket (full fine-tuning with --grad-overlap true); else it runs after the backward.
    pub overlapped: bool,
    /// Gradient buckets when overlapped (the head, each layer, the embeddings); 0 otherwise.
    pub buckets: usize,
    /// The last micro-batch's backward the buckets overlap, estimated from its counted ops
    /// (0 when not overlapped).
    pub backward_seconds: f64,
    /// The part of the gradients' collective (the all-reduce, or ZeRO-1's reduce) the step waits
    /// for: the end of the last bucket's minus the end of the backward when overlapped, the whole
    /// of it otherwise. ZeRO-1's all-gather is not in it.
    pub exposed_collective_seconds: f64,
    /// ZeRO-1's all-gather of the bf16 weights after the optimizer, never overlapped (0 without
    /// ZeRO-1).
    pub all_gather_seconds: f64,
    /// One rank's step plus the exposed collective (and ZeRO-1's all-gather).
    pub step_seconds: f64,
    /// Every rank's tokens together.
    pub tokens_per_step: usize,
    pub tokens_per_s: f64,
    /// tokens_per_s over `gpus` times one GPU's (the step without data parallelism).
    pub scaling: f64,
}

/// One op family's estimated share of a step.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FamilyEstimate {
    pub family: Family,
    /// Calls of the backend's ops.
    pub calls: u64,
    /// Kernels, memsets and copies launched.
    pub launches: u64,
    pub flops: f64,
    pub bytes: f64,
    pub seconds: f64,
    /// What dominates the family's time: "compute", "memory" or "launch".
    pub bound: &'static str,
    /// The calibration factor applied (1.0 while uncalibrated).
    pub calibration: f64,
}

/// What one recompute mode keeps, and the micro-batch it allows.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RecomputeOption {
    pub recompute: Recompute,
    pub activations_per_token: usize,
    /// The trainer's check ([`micro_batch_that_fits_with`]) with this mode.
    pub largest_micro_batch: usize,
}

/// What the step's buffers take, in bytes.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MemoryPlan {
    /// bf16 weights (and one row of logits for generation), the adapters' included.
    pub weights: usize,
    /// fp32 gradients (with LoRA: the adapters', and the scratch that takes the frozen norms'
    /// and lm_head's weight gradients).
    pub grads: usize,
    /// fp32 master weights and the two AdamW moments (with LoRA: the adapters' only); under
    /// ZeRO-1 the largest rank's share.
    pub master_and_moments: usize,
    /// Ranks the master weights and moments are split over (1: not split).
    pub optimizer_shards: usize,
    /// The moments' storage type (`--optimizer-state`).
    pub optimizer_state: StateDtype,
    pub activations_per_token: usize,
    pub activations: usize,
    /// The CUDA backend's own work buffers at their high-water mark (loss chunks, attention's
    /// D, norm partials...) plus cuBLASLt's workspace.
    pub workspace: usize,
    pub total: usize,
    /// What `Model::new` allocated on the counting backend (it must agree with `memory_bytes`).
    pub allocated_by_model: usize,
    pub device_memory: usize,
    /// Device memory minus an estimate of the CUDA context's share.
    pub available: usize,
    /// The trainer's check ([`micro_batch_that_fits`](crate::model::forward::micro_batch_that_fits)): the largest micro-batch of `seq_len` rows.
    pub largest_micro_batch: usize,
    pub fits: bool,
    /// Every recompute mode's activations and largest micro-batch, for comparison.
    pub recompute_options: Vec<RecomputeOption>,
}

/// The whole estimate.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Plan {
    /// Always true: every figure below is an estimate of a cost model, not a measurement.
    pub estimate: bool,
    pub model: String,
    pub n_params: usize,
    /// The LoRA adapters planned (None: full fine-tuning).
    pub lora: Option<LoraConfig>,
    /// Parameters the optimizer updates.
    pub trainable_params: usize,
    pub device: DeviceSpec,
    pub calibrated: bool,
    pub calibration_source: Option<String>,
    pub micro_batch: usize,
    pub seq_len: usize,
    pub grad_accum: usize,
    pub dropout: f32,
    /// The recompute planned (what `auto` chose, when asked).
    pub recompute: Recompute,
    /// What was asked: a mode or `auto`.
    pub recompute_asked: String,
    pub tokens_per_step: usize,
    pub families: Vec<FamilyEstimate>,
    pub total_launches: u64,
    pub total_flops: f64,
    pub total_bytes: f64,
    pub step_seconds: f64,
    pub tokens_per_s: f64,
    /// `sft bench`'s model FLOPs per token (6·matmul params + causal attention).
    pub flops_per_token: f64,
    /// Against the device's dense bf16 peak.
    pub mfu: f64,
    pub memory: MemoryPlan,
    /// With `--gpus` above 1.
    pub data_parallel: Option<DataParallelPlan>,
    pub notes: Vec<String>,
}

/// What one optimizer step of `config` does on the counting backend.
pub struct StepCount {
    pub ledger: Ledger,
    /// Bytes `Model::new` allocated.
    pub allocated: usize,
    /// The backend's work buffers' high-water bytes (cuBLASLt's workspace excluded).
    pub scratch: usize,
    /// The last micro-batch's backward, in the stretches after which its gradient buckets are
    /// ready (None only if the step ran no backward).
    pub backward: Option<counting::BackwardLedger>,
}

/// Runs one optimizer step of `grad_accum` micro-batches of `micro_batch` × `seq_len` tokens
/// through the trainer's own step on the counting backend.
pub fn count_step(
    config: &ModelConfig,
    micro_batch: usize,
    seq_len: usize,
    grad_accum: usize,
) -> Result<StepCount> {
    count_step_with(config, micro_batch, seq_len, grad_accum, None, Recompute::None)
}

/// [`count_step`] of a LoRA run when `lora` is given, with `recompute` (whose extra forward ops
/// the backward then runs, and so counts).
pub fn count_step_with(
    config: &ModelConfig,
    micro_batch: usize,
    seq_len: usize,
    grad_accum: usize,
    lora: Option<&LoraConfig>,
    recompute: Recompute,
) -> Result<StepCount> {
    count_step_opts(config, micro_batch, seq_len, grad_accum, lora, recompute, StateDtype::F32)
}

/// The most tokens one counted step may hold: the count builds every micro-batch's synthetic
/// tokens on the host (about 12 bytes each), and 64 Mi tokens is 64 times a 1.3B run's step.
pub const MAX_COUNTED_TOKENS: usize = 1 << 26;

/// Refuses a step too large to count (before anything is allocated for it, and before the
/// product overflows), naming the flags.
fn check_step_tokens(micro_batch: usize, seq_len: usize, grad_accum: usize) -> Result<()> {
    let tokens = micro_batch.checked_mul(seq_len).and_then(|t| t.checked_mul(grad_accum));
    ensure!(
        tokens.is_some_and(|t| t <= MAX_COUNTED_TOKENS),
        "--micro-batch {micro_batch} × --seq-len {seq_len} × --grad-accum {grad_accum} tokens per step: \
         the plan counts steps of at most {MAX_COUNTED_TOKENS} tokens"
    );
    Ok(())
}

/// [`count_step_with`] with the AdamW moments stored as `moments` says.
pub fn count_step_opts(
    config: &ModelConfig,
    micro_batch: usize,
    seq_len: usize,
    grad_accum: usize,
    lora: Option<&LoraConfig>,
    recompute: Recompute,
    moments: StateDtype,
) -> Result<StepCount> {
    ensure!(micro_batch > 0 && grad_accum > 0, "--micro-batch and --grad-accum must be at least 1");
    check_step_tokens(micro_batch, seq_len, grad_accum)?;
    ensure!(
        seq_len > 0 && seq_len <= config.max_seq_len,
        "--seq-len {seq_len} must be in 1..={}",
        config.max_seq_len
    );
    ensure!(config.vocab_size > 1, "the model's vocab_size must be at least 2");
    let tokens = micro_batch * seq_len;
    let mut model =
        Model::for_training(CountingBackend::new(), config.clone(), tokens, lora, recompute, moments)?;
    let allocated = model.backend().allocated_bytes();
    model.backend().take_ledger();
    let mut rng = Rng::new(89);
    let batches: Vec<Batch> =
        (0..grad_accum).map(|_| synthetic_batch(&mut rng, micro_batch, seq_len, config.vocab_size)).collect();
    let cfg = TrainConfig::default();
    optimizer_step(&mut model, &batches, 0, cfg.max_lr, &cfg, &Rng::new(89)).context("counting a step")?;
    let backend = model.backend();
    Ok(StepCount {
        ledger: backend.take_ledger(),
        allocated,
        scratch: backend.scratch_bytes(),
        backward: backend.take_backward(),
    })
}

/// The roofline time of one (family, kind) tally on `device`: `(compute, memory, overhead)`
/// seconds, where the kernel takes `max(compute, memory) + overhead`.
pub fn roofline(device: &DeviceSpec, kind: KernelKind, t: &Tally) -> (f64, f64, f64) {
    let e = device.efficiency;
    let compute = match kind {
        KernelKind::Gemm => t.flops / (device.bf16_peak * e.gemm),
        KernelKind::Attention => t.flops / (device.bf16_peak * e.attention),
        KernelKind::Elementwise => t.flops / (device.fp32_peak * e.fp32),
        KernelKind::DeviceCopy | KernelKind::HostTransfer => 0.0,
    };
    let memory = match kind {
        KernelKind::HostTransfer => t.bytes / device.host_bandwidth,
        _ => t.bytes / (device.bandwidth * e.memory),
    };
    let overhead = t.launches as f64 * LAUNCH_OVERHEAD_S + t.syncs as f64 * SYNC_OVERHEAD_S;
    (compute, memory, overhead)
}

/// Times every family of `ledger` on `device`, scaled by `calibration`.
pub fn estimate_families(
    ledger: &Ledger,
    device: &DeviceSpec,
    calibration: &Calibration,
) -> Vec<FamilyEstimate> {
    Family::ALL
        .into_iter()
        .filter_map(|family| {
            let calls = ledger.calls.get(&family).copied().unwrap_or(0);
            let mut split = [0.0f64; 3];
            for ((f, kind), tally) in &ledger.tallies {
                if *f != family {
                    continue;
                }
                let (compute, memory, overhead) = roofline(device, *kind, tally);
                if compute > memory {
                    split[0] += compute;
                } else {
                    split[1] += memory;
                }
                split[2] += overhead;
            }
            let total = ledger.family(family);
            if calls == 0 && total.launches == 0 {
                return None;
            }
            let factor = calibration.factor(family);
            let bound = ["compute", "memory", "launch"]
                [(0..3).max_by(|&a, &b| split[a].total_cmp(&split[b])).expect("three entries")];
            Some(FamilyEstimate {
                family,
                calls,
                launches: total.launches,
                flops: total.flops,
                bytes: total.bytes,
                seconds: split.iter().sum::<f64>() * factor,
                bound,
                calibration: factor,
            })
        })
        .collect()
}

/// When the last gradient bucket's collective ends: the buckets go through one communication
/// queue in order, bucket `k` starting at the later of `ready[k]` (its gradients final) and the
/// end of bucket `k − 1`, and taking `comm[k]`. Times in seconds from any common origin.
pub fn bucket_queue_finish(ready: &[f64], comm: &[f64]) -> f64 {
    assert_eq!(ready.len(), comm.len(), "one collective time per bucket");
    ready.iter().zip(comm).fold(f64::NEG_INFINITY, |end, (&r, &c)| end.max(r) + c)
}

/// The gradient buckets of a full fine-tuning step, in the order the trainer's backward makes
/// them ready: `(parameters, compute seconds before it is ready)` of the head (the final norm and
/// an untied lm_head), each layer from the last to the first, then the token embeddings (an
/// untied model's; a tied one's carry the lm_head's gradient too).
///
/// The compute comes from the last micro-batch's counted backward timed as the step is:
/// `head_s` (the fused lm-head + loss and the final norm's backward), `layers_s` split equally
/// over the layers (they are alike), `embedding_s` (the embeddings' backward). An estimate.
pub fn gradient_buckets(
    config: &ModelConfig,
    head_s: f64,
    layers_s: f64,
    embedding_s: f64,
) -> Vec<(usize, f64)> {
    let lens = crate::model::params::param_lens(config);
    let buckets =
        crate::model::forward::grad_buckets(&crate::model::params::ParamIndex::new(config), lens.len());
    let layer_s = layers_s / config.n_layers as f64;
    let last = buckets.len() - 1;
    buckets
        .iter()
        .enumerate()
        .map(|(k, tensors)| {
            let seconds = match k {
                0 => head_s,
                k if k == last => embedding_s,
                _ => layer_s,
            };
            (lens[tensors.clone()].iter().sum(), seconds)
        })
        .collect()
}

/// Builds the plan of `args`.
pub fn plan(args: &PlanArgs) -> Result<Plan> {
    let mut config = resolve_model_config(&args.model, 8192)?;
    if let Some(p) = args.dropout {
        config.dropout = p;
        config.validate().context("--dropout")?;
    }
    plan_for(&config, args)
}

/// The plan of `args` for `config` (`args.model` only names it; `args.dropout` is not applied).
pub fn plan_for(config: &ModelConfig, args: &PlanArgs) -> Result<Plan> {
    let config = config.clone();
    let device = devices::device(&args.gpu)?;
    let calibration = devices::calibration(device.key)?;
    let heads = config.heads();
    ensure!(
        matches!(heads.head_dim, 64 | 128),
        "head_dim {}: the plan times the tensor-core attention, which serves head_dim 64 and 128 \
         (other head sizes run the scalar kernels, which it does not model)",
        heads.head_dim
    );
    let t = args.seq_len.unwrap_or(config.max_seq_len);
    let rows = match args.micro_batch {
        MicroBatch::Fixed(n) => n,
        MicroBatch::Auto => MicroBatch::AUTO_MAX,
    };
    check_step_tokens(rows, t, args.grad_accum)?;
    let lora = args.lora.apply(None)?;
    if let Some(l) = &lora {
        l.validate(&config)?;
    }
    let lora = lora.as_ref();
    let moments = args.optimizer_state;
    ensure!(
        lora.is_none() || moments == StateDtype::F32,
        "--optimizer-state bf16 is for full fine-tuning: LoRA adapters keep f32 AdamW moments"
    );
    ensure!(args.gpus >= 1, "--gpus must be at least 1");
    match args.zero_stage {
        0 => {}
        1 => ensure!(
            args.gpus > 1 && lora.is_none(),
            "--zero-stage 1 splits the optimizer state of full fine-tuning over ranks: give --gpus above 1, \
             without --lora"
        ),
        n => bail!("--zero-stage {n} is not built: 0 or 1"),
    }
    let link = match (&args.link, args.gpus) {
        (Some(l), 1) => bail!("--link {l:?} is for data parallelism: give --gpus above 1"),
        (Some(l), _) => Some(devices::link(device, l)?),
        (None, 1) => None,
        (None, _) => Some(devices::link(device, "nvlink").or_else(|_| devices::link(device, "pcie"))?),
    };
    let available = device.memory.saturating_sub(CONTEXT_BYTES);
    let mut notes = vec![];
    // Under ZeRO-1 the memory plan is the largest share's rank's, as the trainer's.
    let lens = crate::model::params::param_lens(&config);
    let layout =
        crate::dist::OptimizerLayout { moments, zero: (args.zero_stage == 1).then_some((0, args.gpus)) }
            .largest_share(&lens)?;
    // The trainer's order: recompute auto for the fixed micro-batch (1 when that is auto too),
    // then micro_batch auto with the recompute chosen.
    let at_least = match args.micro_batch {
        MicroBatch::Fixed(m) => m,
        MicroBatch::Auto => 1,
    };
    let recompute = match args.recompute {
        RecomputeChoice::Fixed(r) => r,
        RecomputeChoice::Auto => {
            match least_recompute_that_fits(&config, COMPUTE_BYTES, t, available, lora, at_least, layout) {
                Some((r, fits)) => {
                    notes.push(format!(
                        "recompute auto chose {r}: the least recompute with which micro_batch {at_least} fits \
                         (up to {fits} rows of {t} with it)"
                    ));
                    r
                }
                None => {
                    notes.push(format!(
                        "recompute auto: micro_batch {at_least} does not fit even with layer recompute; planned \
                         with layer"
                    ));
                    Recompute::Layer
                }
            }
        }
    };
    let batches = crate::train::config::plan_batches(
        args.micro_batch,
        args.grad_accum,
        Some(micro_batch_that_fits_with(&config, COMPUTE_BYTES, t, available, lora, recompute, layout)),
    );
    if !batches.reason.is_empty() {
        notes.push(batches.reason.clone());
    }
    let (micro_batch, grad_accum) = (batches.micro_batch, batches.grad_accum);
    let mut count = count_step_opts(&config, micro_batch, t, grad_accum, lora, recompute, moments)?;
    // One GPU alone, for the data-parallel scaling.
    let one_gpu_seconds: f64 =
        estimate_families(&count.ledger, device, &calibration).iter().map(|f| f.seconds).sum();
    if layout.zero.is_some() {
        // One rank's AdamW updates its share of the tensors: its work and traffic scale with
        // it (the step was counted on the whole state; still one launch).
        let share = layout.held(&lens) as f64 / lens.iter().sum::<usize>() as f64;
        for ((family, _), tally) in count.ledger.tallies.iter_mut() {
            if *family == counting::Family::Adamw {
                tally.flops *= share;
                tally.bytes *= share;
            }
        }
    }
    let families = estimate_families(&count.ledger, device, &calibration);
    let step_seconds: f64 = families.iter().map(|f| f.seconds).sum();
    let tokens_per_step = grad_accum * micro_batch * t;
    let tokens_per_s = tokens_per_step as f64 / step_seconds;
    let fpt = flops_per_token(&config, t);

    let (fixed, per_token) = memory_bytes_with(&config, COMPUTE_BYTES, true, lora, recompute, layout);
    let n_params = config.n_params();
    let trainable = lora.map_or(n_params, |l| l.n_params(&config));
    let frozen_grad_scratch =
        if lora.is_some() { 4 * (config.vocab_size * config.d_model + config.d_model) } else { 0 };
    let activations = per_token * micro_batch * t;
    let workspace = count.scratch + GEMM_WORKSPACE_BYTES;
    let largest = micro_batch_that_fits_with(&config, COMPUTE_BYTES, t, available, lora, recompute, layout);
    let recompute_options = Recompute::ALL
        .into_iter()
        .map(|r| RecomputeOption {
            recompute: r,
            activations_per_token: memory_bytes_with(&config, COMPUTE_BYTES, true, lora, r, layout).1,
            largest_micro_batch: micro_batch_that_fits_with(
                &config,
                COMPUTE_BYTES,
                t,
                available,
                lora,
                r,
                layout,
            ),
        })
        .collect();
    let adapters = if lora.is_some() { trainable } else { 0 };
    // Adapters (LoRA) always keep f32 moments.
    let state_bytes = 4 + 2 * moments.bytes();
    let (optimizer_shards, master_and_moments) = match layout.zero {
        Some((_, world)) => (world, layout.held(&lens) * state_bytes),
        None => (1, trainable * state_bytes),
    };
    let total = fixed + activations + workspace;
    let memory = MemoryPlan {
        weights: (n_params + adapters) * COMPUTE_BYTES + config.vocab_size * COMPUTE_BYTES,
        grads: trainable * 4 + frozen_grad_scratch,
        master_and_moments,
        optimizer_shards,
        optimizer_state: moments,
        activations_per_token: per_token,
        activations,
        workspace,
        total,
        allocated_by_model: count.allocated,
        device_memory: device.memory,
        available,
        largest_micro_batch: largest,
        fits: largest >= micro_batch && total <= available,
        recompute_options,
    };

    notes.extend([
        "attention is timed as the tensor-core (flash_*) path; FLOPs count the causal pairs only".to_string(),
        format!(
            "launch cost {:.0} µs per launch, {:.0} µs per host synchronization; no overlap between kernels",
            LAUNCH_OVERHEAD_S * 1e6,
            SYNC_OVERHEAD_S * 1e6
        ),
    ]);
    if lora.is_some() {
        notes.push(
            "MFU counts 6 FLOPs per parameter and token as for full fine-tuning; a LoRA step skips the frozen \
             weights' gradient GEMMs (about a third of those FLOPs), so its MFU overstates the useful work"
                .to_string(),
        );
    }
    if device.key == "rtx4090" && heads.head_dim == 128 {
        notes.push(
            "on this device the CUDA backend falls back to the scalar attention kernels for head_dim 128 \
             (the flash kernels need more shared memory per block than its 99 KiB): attention will be slower \
             than estimated"
                .to_string(),
        );
    }
    if let Some(advice) = memory_advice_with(
        device.name,
        &config,
        COMPUTE_BYTES,
        micro_batch,
        t,
        available,
        lora,
        recompute,
        layout,
    ) {
        // The trainer's own refusal, word for word, so that plan and trainer agree.
        notes.push(format!("the trainer would refuse this step: {advice}"));
    }
    let total =
        |f: fn(&Tally) -> f64| Family::ALL.iter().map(|&fam| f(&count.ledger.family(fam))).sum::<f64>();
    let overlap = args.gpus > 1 && args.grad_overlap && lora.is_none();
    if args.gpus > 1 && lora.is_some() {
        notes.push(
            "LoRA: the adapters' gradients are all-reduced after the backward, not overlapped with it \
             (the trainer overlaps full fine-tuning's only)"
                .to_string(),
        );
    }
    // The last micro-batch's backward, per bucket, timed as the step is (overlap only).
    let backward = match (&count.backward, overlap) {
        (Some(b), true) => {
            let seconds = |l: &Ledger| -> f64 {
                estimate_families(l, device, &calibration).iter().map(|f| f.seconds).sum()
            };
            let buckets =
                gradient_buckets(&config, seconds(&b.head), seconds(&b.layers), seconds(&b.embedding));
            Some(buckets)
        }
        (None, true) => bail!("counting a step: the counting backend saw no backward"),
        _ => None,
    };
    if let Some(buckets) = &backward {
        let total: f64 = buckets.iter().map(|b| b.1).sum();
        notes.push(format!(
            "gradient overlap: the last micro-batch's backward ({:.1} ms) is timed from its own counted ops \
             (the fused lm-head + loss and the final norm, then the layers, an equal share each, then the \
             embeddings); each bucket's collective starts when its gradients are final and the previous \
             bucket's is done (one communication stream)",
            total * 1e3
        ));
        notes.push(
            "gradient overlap ignores that NCCL's kernels take SMs and memory bandwidth from the backward they \
             overlap: that backward will run somewhat slower than estimated"
                .to_string(),
        );
    }
    let data_parallel = link.map(|link| {
        let gradient_bytes = 4.0 * trainable as f64;
        let weight_bytes = if args.zero_stage == 1 { COMPUTE_BYTES as f64 * trainable as f64 } else { 0.0 };
        let all_gather = if args.zero_stage == 1 {
            devices::ring_pass_seconds(weight_bytes, args.gpus, &link)
        } else {
            0.0
        };
        // (all the collectives, the gradients' exposed part, buckets, overlapped backward, step).
        let (collective_seconds, exposed, buckets, backward_seconds, step) = match &backward {
            Some(buckets) => {
                // A bucket's reduction: an all-reduce, or under ZeRO-1 a reduce into the owners
                // (the reduce-scatter half of the ring). Ready times from the start of the last
                // micro-batch's backward.
                let reduce = |bytes: f64| match args.zero_stage {
                    1 => devices::ring_pass_seconds(bytes, args.gpus, &link),
                    _ => devices::all_reduce_seconds(bytes, args.gpus, &link),
                };
                let ready: Vec<f64> = buckets
                    .iter()
                    .scan(0.0, |t, b| {
                        *t += b.1;
                        Some(*t)
                    })
                    .collect();
                let comm: Vec<f64> = buckets.iter().map(|b| reduce(4.0 * b.0 as f64)).collect();
                let backward_end = *ready.last().expect("at least the head and the embeddings");
                let exposed = (bucket_queue_finish(&ready, &comm) - backward_end).max(0.0);
                let collective = comm.iter().sum::<f64>() + all_gather;
                (collective, exposed, buckets.len(), backward_end, step_seconds + exposed + all_gather)
            }
            None => {
                // After the backward: one all-reduce, or ZeRO-1's reduce-scatter and all-gather.
                let collective = match args.zero_stage {
                    1 => devices::reduce_scatter_all_gather_seconds(
                        gradient_bytes,
                        weight_bytes,
                        args.gpus,
                        &link,
                    ),
                    _ => devices::all_reduce_seconds(gradient_bytes, args.gpus, &link),
                };
                (collective, collective - all_gather, 0, 0.0, step_seconds + collective)
            }
        };
        let tokens = tokens_per_step * args.gpus;
        DataParallelPlan {
            gpus: args.gpus,
            link,
            gradient_bytes,
            zero_stage: args.zero_stage,
            weight_bytes,
            collective_seconds,
            overlapped: backward.is_some(),
            buckets,
            backward_seconds,
            exposed_collective_seconds: exposed,
            all_gather_seconds: all_gather,
            step_seconds: step,
            tokens_per_step: tokens,
            tokens_per_s: tokens as f64 / step,
            scaling: one_gpu_seconds / step,
        }
    });
    Ok(Plan {
        estimate: true,
        model: args.model.clone(),
        n_params,
        lora: lora.cloned(),
        trainable_params: trainable,
        device: *device,
        calibrated: calibration.source.is_some(),
        calibration_source: calibration.source.clone(),
        micro_batch,
        seq_len: t,
        grad_accum,
        dropout: config.dropout,
        recompute,
        recompute_asked: args.recompute.to_string(),
        tokens_per_step,
        total_launches: families.iter().map(|f| f.launches).sum(),
        total_flops: total(|t| t.flops),
        total_bytes: total(|t| t.bytes),
        families,
        step_seconds,
        tokens_per_s,
        flops_per_token: fpt,
        mfu: tokens_per_s * fpt / device.bf16_peak,
        memory,
        data_parallel,
        notes,
    })
}

fn gib(b: usize) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// The plan as the text `sft plan` prints, ending with the line `estimated MFU: NN.N%` (and why
/// not, when the step does not fit).
pub fn render(p: &Plan) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let d = &p.device;
    let _ =
        writeln!(s, "sft plan: ESTIMATES from a cost model (no GPU was used; nothing here is a measurement)");
    let _ = writeln!(s, "model        {} ({} parameters)", p.model, p.n_params);
    if let Some(l) = &p.lora {
        let targets: Vec<&str> = l.targets.iter().map(|t| t.name()).collect();
        let _ = writeln!(
            s,
            "LoRA         rank {}, alpha {}, on {}: {} trainable parameters, the base frozen (bf16 only)",
            l.rank,
            l.alpha,
            targets.join(","),
            p.trainable_params
        );
    }
    let _ = writeln!(
        s,
        "device       {}: {:.1} TFLOP/s dense bf16, {:.2} TB/s, {:.1} GiB (datasheet)",
        d.name,
        d.bf16_peak / 1e12,
        d.bandwidth / 1e12,
        gib(d.memory)
    );
    let e = d.efficiency;
    let _ = writeln!(
        s,
        "assumed      fraction of peak: GEMM {:.0}%, attention {:.0}%, bandwidth {:.0}% (src/plan/devices.rs)",
        e.gemm * 100.0,
        e.attention * 100.0,
        e.memory * 100.0
    );
    match &p.calibration_source {
        Some(src) => {
            let _ = writeln!(s, "calibration  calibrated: {src} ({})", devices::CALIBRATION_PATH);
        }
        None => {
            let _ = writeln!(
                s,
                "calibration  uncalibrated: no GPU measurement yet (all factors 1.0, {})",
                devices::CALIBRATION_PATH
            );
        }
    }
    let _ = writeln!(
        s,
        "step         {} tokens = {} micro-batch(es) × {} rows × {} tokens, dropout {}",
        p.tokens_per_step, p.grad_accum, p.micro_batch, p.seq_len, p.dropout
    );
    let asked = if p.recompute_asked == "auto" { " (chosen by auto)" } else { "" };
    let _ = writeln!(s, "recompute    {}{asked}", p.recompute);
    let _ = writeln!(s);
    let _ = writeln!(s, "Estimated cost per op family (one optimizer step; estimates):");
    let _ = writeln!(
        s,
        "{:<16} {:>7} {:>9} {:>11} {:>10} {:>10} {:>6}  bound",
        "family", "calls", "launches", "GFLOP", "GB moved", "est. ms", "share"
    );
    for f in &p.families {
        let _ = writeln!(
            s,
            "{:<16} {:>7} {:>9} {:>11.1} {:>10.3} {:>10.3} {:>5.1}%  {}",
            f.family.name(),
            f.calls,
            f.launches,
            f.flops / 1e9,
            f.bytes / 1e9,
            f.seconds * 1e3,
            100.0 * f.seconds / p.step_seconds,
            f.bound
        );
    }
    let calls: u64 = p.families.iter().map(|f| f.calls).sum();
    let _ = writeln!(
        s,
        "{:<16} {:>7} {:>9} {:>11.1} {:>10.3} {:>10.3} {:>5.1}%",
        "total",
        calls,
        p.total_launches,
        p.total_flops / 1e9,
        p.total_bytes / 1e9,
        p.step_seconds * 1e3,
        100.0
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "Estimated speed:");
    let _ = writeln!(s, "estimated step time   {:.1} ms", p.step_seconds * 1e3);
    let _ = writeln!(s, "estimated tokens/s    {:.0}", p.tokens_per_s);
    let _ = writeln!(
        s,
        "MFU basis             {:.2} GFLOP/token (sft bench's formula) vs {:.1} TFLOP/s",
        p.flops_per_token / 1e9,
        d.bf16_peak / 1e12
    );
    if let Some(dp) = &p.data_parallel {
        let _ = writeln!(s);
        let _ = writeln!(s, "Estimated data parallelism ({} GPUs, one rank each; estimates):", dp.gpus);
        let _ = writeln!(
            s,
            "link                  {} (NCCL bus bandwidth assumed {:.0} GB/s, uncalibrated)",
            dp.link.name,
            dp.link.bus_bandwidth / 1e9
        );
        let hidden = "bucketed by layer, overlapped with the last micro-batch's backward";
        match (dp.zero_stage, dp.overlapped) {
            (1, true) => {
                let _ = writeln!(
                    s,
                    "ZeRO-1 collectives    reduce of {:.2} GB of fp32 gradients into their owners in {} buckets, \
                     all-gather of {:.2} GB of bf16 weights (ring: (n−1)/n of each per GPU): {:.1} ms",
                    dp.gradient_bytes / 1e9,
                    dp.buckets,
                    dp.weight_bytes / 1e9,
                    dp.collective_seconds * 1e3
                );
                let _ = writeln!(
                    s,
                    "  gradient reduce     {:.1} ms, of which {:.1} ms exposed ({hidden})",
                    (dp.collective_seconds - dp.all_gather_seconds) * 1e3,
                    dp.exposed_collective_seconds * 1e3
                );
                let _ = writeln!(
                    s,
                    "  weight all-gather   {:.1} ms, after the optimizer (not overlapped)",
                    dp.all_gather_seconds * 1e3
                );
            }
            (1, false) => {
                let _ = writeln!(
                    s,
                    "ZeRO-1 collectives    reduce-scatter of {:.2} GB of fp32 gradients, all-gather of {:.2} GB of \
                     bf16 weights (ring: (n−1)/n of each per GPU): {:.1} ms, after the backward (not overlapped)",
                    dp.gradient_bytes / 1e9,
                    dp.weight_bytes / 1e9,
                    dp.collective_seconds * 1e3
                );
            }
            (_, true) => {
                let _ = writeln!(
                    s,
                    "all-reduce            {:.2} GB of fp32 gradients per step in {} buckets (ring: 2·(n−1)/n of \
                     each per GPU): {:.1} ms, of which {:.1} ms exposed ({hidden})",
                    dp.gradient_bytes / 1e9,
                    dp.buckets,
                    dp.collective_seconds * 1e3,
                    dp.exposed_collective_seconds * 1e3
                );
            }
            (_, false) => {
                let _ = writeln!(
                    s,
                    "all-reduce            {:.2} GB of fp32 gradients per step (ring: 2·(n−1)/n of it per GPU): \
                     {:.1} ms, after the backward (not overlapped)",
                    dp.gradient_bytes / 1e9,
                    dp.collective_seconds * 1e3
                );
            }
        }
        if dp.overlapped {
            let _ = writeln!(
                s,
                "overlapped backward   {:.1} ms (the last micro-batch's, fused lm-head + loss included, from its \
                 counted ops)",
                dp.backward_seconds * 1e3
            );
        }
        let _ = writeln!(
            s,
            "step time             {:.1} ms ({} tokens over all ranks)",
            dp.step_seconds * 1e3,
            dp.tokens_per_step
        );
        let _ = writeln!(
            s,
            "tokens/s              {:.0} ({:.1}% of {} × one GPU)",
            dp.tokens_per_s,
            100.0 * dp.scaling,
            dp.gpus
        );
    }
    let m = &p.memory;
    let _ = writeln!(s);
    let _ = writeln!(s, "Estimated memory plan:");
    let _ = writeln!(s, "weights (bf16)                 {:>8.2} GiB", gib(m.weights));
    let _ = writeln!(s, "gradients (fp32)               {:>8.2} GiB", gib(m.grads));
    let label = match m.optimizer_state {
        StateDtype::F32 => "master + AdamW moments (fp32)",
        StateDtype::Bf16 => "master + moments (fp32, bf16)",
    };
    let shards = match m.optimizer_shards {
        1 => String::new(),
        n => format!(" (ZeRO-1: the largest of {n} ranks' shares)"),
    };
    let _ = writeln!(s, "{label:<30} {:>8.2} GiB{shards}", gib(m.master_and_moments));
    let _ = writeln!(
        s,
        "activations                    {:>8.2} GiB ({} bytes/token × {} tokens)",
        gib(m.activations),
        m.activations_per_token,
        p.micro_batch * p.seq_len
    );
    let _ = writeln!(s, "workspace (backend buffers)    {:>8.2} GiB", gib(m.workspace));
    let _ = writeln!(
        s,
        "total                          {:>8.2} GiB of {:.2} GiB available ({:.1} GiB less the CUDA context)",
        gib(m.total),
        gib(m.available),
        gib(m.device_memory)
    );
    let _ = writeln!(
        s,
        "fits                           {} (the trainer's check allows micro-batches up to {} rows of {})",
        if m.fits { "yes" } else { "NO" },
        m.largest_micro_batch,
        p.seq_len
    );
    for o in &m.recompute_options {
        let _ = writeln!(
            s,
            "  recompute {:<5}  {:>8} bytes/token of activations, micro-batches up to {} rows{}",
            o.recompute.name(),
            o.activations_per_token,
            o.largest_micro_batch,
            if o.recompute == p.recompute { " (planned)" } else { "" }
        );
    }
    let _ = writeln!(s);
    for n in &p.notes {
        let _ = writeln!(s, "note: {n}");
    }
    // Scripts read the last line: one that does not fit must not pass for a speed it will reach.
    let refused =
        if p.memory.fits { "" } else { " (were it to fit: the trainer refuses it, see the note above)" };
    let _ = writeln!(s, "estimated MFU: {:.1}%{refused}", 100.0 * p.mfu);
    s
}

/// `sft plan --calibrate-from`: measured against estimated per family, optionally stored.
fn calibrate_from(args: &PlanArgs, csv: &std::path::Path) -> Result<()> {
    let mut config = resolve_model_config(&args.model, 8192)?;
    if let Some(p) = args.dropout {
        config.dropout = p;
        config.validate().context("--dropout")?;
    }
    let device = devices::device(&args.gpu)?;
    let t = args.seq_len.unwrap_or(config.max_seq_len);
    let MicroBatch::Fixed(micro_batch) = args.micro_batch else {
        bail!("--calibrate-from needs the profiled run's --micro-batch, a number (not auto)");
    };
    let count = count_step(&config, micro_batch, t, args.grad_accum)?;
    let shown = csv.display().to_string();
    let text = std::fs::read_to_string(csv).with_context(|| format!("reading {shown}"))?;
    let (rows, unattributed) =
        calibrate::calibrate(&text, &shown, args.profiled_steps, &count.ledger, device)?;
    println!("calibration of {} from {shown} ({} profiled steps)", device.name, args.profiled_steps);
    println!("{:<16} {:>12} {:>12} {:>8}", "family", "measured ms", "estimate ms", "factor");
    for r in &rows {
        println!(
            "{:<16} {:>12.3} {:>12.3} {:>8.3}",
            r.family.name(),
            r.measured_s * 1e3,
            r.estimated_s * 1e3,
            r.factor
        );
    }
    for k in &unattributed {
        eprintln!("warning: kernel not attributed to an op family: {k}");
    }
    if let Some(source) = &args.write_calibration {
        let path = std::path::Path::new(devices::CALIBRATION_PATH);
        calibrate::write_calibration(path, device.key, source, &rows)?;
        println!("wrote the factors of {} to {} (rebuild to apply them)", device.key, path.display());
    }
    Ok(())
}

/// `sft plan`.
pub fn run(args: PlanArgs) -> Result<()> {
    if let Some(csv) = &args.calibrate_from {
        return calibrate_from(&args, csv);
    }
    let p = plan(&args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
    } else {
        print!("{}", render(&p));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
