//! `TrainConfig`: everything a training run needs, as a JSON file (`sft train --config run.json`)
//! whose fields the command-line flags override. Defaults are SimpleLLaMA's SFT settings, except
//! packed batches (`batch_mode`) and a row length that is never a model's whole context.

use crate::data::BatchMode;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub use crate::backend::{Device, StateDtype};

/// The smallest `eps` allowed with bf16 moments. bf16 has f32's exponent but a shorter
/// mantissa, so its smallest subnormal is 2^-133 (about 9e-41): `v` flushes to zero once
/// `(1 - beta2) · g²` is under half of that, i.e. for gradients under about 2e-19 (beta2
/// 0.999) while `m` (about `g`) survives, and the update becomes `m / eps`. At this eps that
/// is at most about 2e-3 (times the learning rate); a smaller eps could let it explode.
pub const BF16_STATE_MIN_EPS: f32 = 1e-16;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// A preset (`tiny`, `simplellama-1.3b`), the path of a model-config JSON file, or a model
    /// directory or its config.json (sft's or a Hugging Face Llama's: its shape only). Ignored when
    /// the weights come from a checkpoint (`init_from`, `resume`): its config wins.
    pub model: String,
    /// A prepared data directory (`sft prepare`): `train-*.bin` and `val-*.bin` shards.
    pub data: PathBuf,
    /// The tokenizer the data was prepared with; empty means `<data>/tokenizer.json`.
    pub tokenizer: PathBuf,
    /// Checkpoints (`step-N/`, `latest`) and `log.csv` go here.
    pub out_dir: PathBuf,
    /// Start from this checkpoint's weights (a fresh optimizer, step 0).
    pub init_from: Option<PathBuf>,
    /// Start from randomly initialized weights of `model`. Must be asked for: a fine-tuning run
    /// without `init_from` is almost always a mistake, and the default `model` is the 1.3B.
    pub from_scratch: bool,
    /// Continue from `out_dir/latest` (weights, optimizer, data position, step).
    pub resume: bool,
    pub epochs: u64,
    /// Stop after this many optimizer steps in all (counting those before a resume), whatever
    /// `epochs` says; without `schedule_steps` it is also the schedule's length, as in Hugging Face
    /// trainers. To stop a run early and resume it as one run, give `schedule_steps` too.
    pub max_steps: Option<u64>,
    /// The steps the LR schedule spans; default: `max_steps`, else `epochs` × optimizer steps
    /// per epoch.
    pub schedule_steps: Option<u64>,
    /// Examples per micro-batch (rows of `max_seq_len` tokens in packed mode), or `"auto"`: the
    /// largest that fits the device, at most 32, with `grad_accum` raised so that a step keeps
    /// 32 × `grad_accum` examples (see [`MicroBatch`]).
    pub micro_batch: MicroBatch,
    /// Micro-batches per optimizer step (of 32 examples with `micro_batch` `"auto"`).
    pub grad_accum: usize,
    /// `packed` (the default: no compute on padding), or SimpleLLaMA's `dynamic` padding, or
    /// `fixed`.
    pub batch_mode: BatchMode,
    /// Longest row in tokens; default: [`DEFAULT_SEQ_LEN`], or the data's longest example where
    /// that is longer, never more than the model's `max_seq_len` (see [`default_seq_len`]).
    pub max_seq_len: Option<usize>,
    /// Shuffle the training examples (reshuffled each epoch).
    pub shuffle: bool,
    pub max_lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Clip the global gradient norm to this (0 = no clipping).
    pub clip: f64,
    pub seed: u64,
    /// Overrides the model config's dropout (attention and FFN outputs).
    pub dropout: Option<f32>,
    /// Evaluate on the first `eval_batches` validation batches every this many steps (0 = never);
    /// a full validation pass runs at each epoch end regardless.
    pub eval_every: u64,
    pub eval_batches: usize,
    /// Save a checkpoint every this many steps (0 = only at the end of the run).
    pub save_every: u64,
    /// Checkpoints kept in `out_dir` (0 = all).
    pub keep_checkpoints: usize,
    /// Print sample replies to `samples` at steps `sample_every` × 1, 2, 4, 8, ... (0 = never).
    pub sample_every: u64,
    pub samples: Vec<String>,
    /// Without a terminal, print a progress line every this many steps.
    pub log_every: u64,
    /// "auto", "cpu" or "cuda".
    pub device: String,
    /// Train LoRA adapters on the frozen `init_from` weights instead of every weight.
    pub lora: Option<crate::model::lora::LoraConfig>,
    /// Storage of the AdamW moments: `f32` (the default) or `bf16` (4 bytes per parameter
    /// fewer; full fine-tuning only: LoRA adapters keep f32 moments). A run resumes in the
    /// state type it was saved with.
    pub optimizer_state: StateDtype,
    /// Activation recompute: `"none"`, `"mlp"`, `"layer"` (see [`crate::model::Recompute`]) or
    /// `"auto"`: the least recompute with which the micro-batch fits the device. Unset: the
    /// resumed run's choice, else `"none"`. The gradients do not depend on it.
    pub recompute: Option<crate::model::RecomputeChoice>,
    /// ZeRO stage over the ranks of a data-parallel job: 0 (every rank holds the whole optimizer
    /// state) or 1 (each rank holds its share of the f32 master weights and AdamW moments; the
    /// gradients are reduce-scattered and the new weights all-gathered). The same run either
    /// way, and a checkpoint holds the whole state: a run may resume at another stage. Nothing
    /// to split in one process.
    pub zero_stage: u8,
    /// Over several ranks: sum the gradients layer by layer while the step's last micro-batch's
    /// backward goes on (true, the default; on GPUs the sums run beside the backward), or all at
    /// once after it (false). The same sums either way. LoRA's adapters are always summed after.
    pub grad_overlap: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: "simplellama-1.3b".into(),
            data: PathBuf::new(),
            tokenizer: PathBuf::new(),
            out_dir: PathBuf::from("runs/sft"),
            init_from: None,
            from_scratch: false,
            resume: false,
            epochs: 3,
            max_steps: None,
            schedule_steps: None,
            micro_batch: MicroBatch::Auto,
            grad_accum: 16,
            batch_mode: BatchMode::Packed,
            max_seq_len: None,
            shuffle: true,
            max_lr: 1e-5,
            min_lr: 1e-6,
            warmup_steps: 100,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.01,
            clip: 1.0,
            seed: 89,
            dropout: None,
            eval_every: 50,
            eval_batches: 8,
            save_every: 500,
            keep_checkpoints: 3,
            sample_every: 100,
            samples: vec![
                "What is the capital of France?".into(),
                "Give me three tips for staying focused while studying.".into(),
            ],
            log_every: 10,
            device: "auto".into(),
            lora: None,
            optimizer_state: StateDtype::F32,
            recompute: None,
            zero_stage: 0,
            grad_overlap: true,
        }
    }
}

/// The training row length when none is given: SimpleLLaMA's 2048. A model's context (131072
/// for Llama 3.2) is what it can attend over, not a row length to allocate for every micro-batch.
pub const DEFAULT_SEQ_LEN: usize = 2048;

/// The row length of a run that does not set one: [`DEFAULT_SEQ_LEN`], raised to the data's
/// longest example (`longest`, where known) so that no prepared example is dropped, and capped
/// at the model's context `model_max`.
pub fn default_seq_len(model_max: usize, longest: Option<usize>) -> usize {
    DEFAULT_SEQ_LEN.max(longest.unwrap_or(0)).min(model_max)
}

impl TrainConfig {
    /// The optimizer steps the LR schedule spans: `schedule_steps`, else `max_steps`, else
    /// `epochs_steps` (every epoch's steps).
    pub fn schedule_length(&self, epochs_steps: u64) -> u64 {
        self.schedule_steps.or(self.max_steps).unwrap_or(epochs_steps)
    }

    /// Whether the run's length needs every epoch's step count (packed batches per epoch depend
    /// on its shuffle); with `max_steps` neither the end nor the schedule does.
    pub fn counts_epochs(&self) -> bool {
        self.max_steps.is_none()
    }

    /// Reads a JSON config; absent fields take their defaults, unknown fields are errors.
    pub fn load(path: &Path) -> Result<TrainConfig> {
        Ok(TrainConfig::read(path)?.0)
    }

    /// The config file's text parsed over the defaults, and the text.
    fn read(path: &Path) -> Result<(TrainConfig, String)> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading train config {}", path.display()))?;
        let config = serde_json::from_str(&text)
            .with_context(|| format!("parsing train config {}", path.display()))?;
        Ok((config, text))
    }

    /// Reads a JSON config over `base`: the fields the file sets, `base`'s for the others.
    pub fn load_over(path: &Path, base: &TrainConfig) -> Result<TrainConfig> {
        // Parsed alone first, for the errors of `load` (line and column, unknown fields).
        let (_, text) = TrainConfig::read(path)?;
        let set: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text)
            .with_context(|| format!("parsing train config {}", path.display()))?;
        let mut merged = serde_json::to_value(base).context("serializing a train config")?;
        let fields = merged.as_object_mut().context("a train config serializes to an object")?;
        fields.extend(set);
        serde_json::from_value(merged).with_context(|| format!("parsing train config {}", path.display()))
    }

    /// The tokenizer path, resolving the empty default to `<data>/tokenizer.json`.
    pub fn tokenizer_path(&self) -> PathBuf {
        if self.tokenizer.as_os_str().is_empty() {
            self.data.join("tokenizer.json")
        } else {
            self.tokenizer.clone()
        }
    }

    pub fn device_kind(&self) -> Result<Device> {
        Device::parse(&self.device)
    }

    /// This config with a saved run's micro-batch and accumulation, where this one says `auto`
    /// and the saved numbers keep its step's examples: a resumed run then sees the same batches.
    pub fn with_saved_batches(&self, saved: &TrainConfig) -> Option<TrainConfig> {
        let MicroBatch::Fixed(m) = saved.micro_batch else { return None };
        // Checked: a damaged saved state can hold any count (validate refuses it later).
        let same_step = m
            .checked_mul(saved.grad_accum)
            .is_some_and(|n| Some(n) == self.micro_batch.configured().checked_mul(self.grad_accum));
        (self.micro_batch == MicroBatch::Auto && same_step).then(|| TrainConfig {
            micro_batch: saved.micro_batch,
            grad_accum: saved.grad_accum,
            ..self.clone()
        })
    }

    /// Checks every field that a run would otherwise trip over later, naming the field.
    pub fn validate(&self) -> Result<()> {
        self.device_kind()?;
        if self.data.as_os_str().is_empty() {
            bail!("data is not set: give the prepared data directory (--data DIR)");
        }
        if self.out_dir.as_os_str().is_empty() {
            bail!("out_dir is not set (--out-dir DIR)");
        }
        if self.micro_batch == MicroBatch::Fixed(0) {
            bail!("micro_batch must be at least 1 (or \"auto\")");
        }
        if self.grad_accum == 0 {
            bail!("grad_accum must be at least 1");
        }
        if self.micro_batch.configured().checked_mul(self.grad_accum).is_none() {
            bail!("grad_accum {} × micro_batch examples per step overflows", self.grad_accum);
        }
        if self.max_steps == Some(0) {
            bail!("max_steps must be at least 1");
        }
        if self.epochs == 0 && self.max_steps.is_none() {
            bail!("epochs must be at least 1");
        }
        if self.max_seq_len == Some(0) {
            bail!("max_seq_len must be at least 1");
        }
        if !(self.max_lr.is_finite() && self.max_lr > 0.0) {
            bail!("max_lr must be a positive number, got {}", self.max_lr);
        }
        if !(self.min_lr.is_finite() && self.min_lr >= 0.0 && self.min_lr <= self.max_lr) {
            bail!("min_lr must be in [0, max_lr = {}], got {}", self.max_lr, self.min_lr);
        }
        for (name, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                bail!("{name} must be in [0, 1), got {beta}");
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            bail!("eps must be positive, got {}", self.eps);
        }
        if self.optimizer_state == StateDtype::Bf16 && self.eps < BF16_STATE_MIN_EPS {
            bail!(
                "eps {} is too small for optimizer_state bf16 (at least {BF16_STATE_MIN_EPS:e}): bf16's second \
                 moment flushes to zero for gradients under about 2e-19, and the update then divides by eps alone",
                self.eps
            );
        }
        if self.lora.is_some() && self.optimizer_state == StateDtype::Bf16 {
            bail!(
                "optimizer_state bf16 is for full fine-tuning: LoRA adapters keep f32 AdamW moments (they are \
                 small); drop --optimizer-state or the LoRA options"
            );
        }
        match self.zero_stage {
            0 => {}
            1 if self.lora.is_some() => bail!(
                "zero_stage 1 splits the optimizer state of full fine-tuning: LoRA's adapters are small, and \
                 the frozen base has none; drop --zero-stage or the LoRA options"
            ),
            1 => {}
            n => bail!(
                "zero_stage {n} is not built: 0 (no split) or 1 (the optimizer state split over the ranks)"
            ),
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!("weight_decay must be non-negative, got {}", self.weight_decay);
        }
        if !(self.clip.is_finite() && self.clip >= 0.0) {
            bail!("clip must be non-negative (0 = no clipping), got {}", self.clip);
        }
        if let Some(p) = self.dropout {
            if !(0.0..1.0).contains(&p) {
                bail!("dropout must be in [0, 1), got {p}");
            }
        }
        if let Some(lora) = &self.lora {
            crate::lora::validate(lora)?;
        }
        if self.eval_every > 0 && self.eval_batches == 0 {
            bail!("eval_batches must be at least 1 when eval_every is set");
        }
        if self.log_every == 0 {
            bail!("log_every must be at least 1");
        }
        Ok(())
    }
}

/// The micro-batch of a run: a number of examples, or `"auto"` (JSON and `--micro-batch`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MicroBatch {
    Fixed(usize),
    /// The largest micro-batch up to [`MicroBatch::AUTO_MAX`] that fits the device; a step keeps
    /// `AUTO_MAX × grad_accum` examples. The CPU backend plans against the host's available
    /// memory; where a backend reports no free memory, `AUTO_MAX` itself.
    #[default]
    Auto,
}

impl MicroBatch {
    /// SimpleLLaMA's micro-batch: where `auto` starts, and what `grad_accum` counts in.
    pub const AUTO_MAX: usize = 32;

    /// The micro-batch that `grad_accum` counts: the fixed one, or [`Self::AUTO_MAX`].
    pub fn configured(self) -> usize {
        match self {
            MicroBatch::Fixed(m) => m,
            MicroBatch::Auto => Self::AUTO_MAX,
        }
    }
}

impl From<usize> for MicroBatch {
    fn from(m: usize) -> Self {
        MicroBatch::Fixed(m)
    }
}

impl std::str::FromStr for MicroBatch {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s.eq_ignore_ascii_case("auto") {
            return Ok(MicroBatch::Auto);
        }
        s.parse()
            .map(MicroBatch::Fixed)
            .map_err(|_| format!("`{s}` is neither a number of examples nor \"auto\""))
    }
}

impl std::fmt::Display for MicroBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MicroBatch::Fixed(m) => write!(f, "{m}"),
            MicroBatch::Auto => write!(f, "auto"),
        }
    }
}

impl Serialize for MicroBatch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            MicroBatch::Fixed(m) => s.serialize_u64(*m as u64),
            MicroBatch::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for MicroBatch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = MicroBatch;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "micro_batch as a number of examples or \"auto\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<MicroBatch, E> {
                Ok(MicroBatch::Fixed(v as usize))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<MicroBatch, E> {
                v.parse().map_err(|e: String| E::custom(format!("micro_batch: {e}")))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// The micro-batch and accumulation a run uses, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchPlan {
    pub micro_batch: usize,
    pub grad_accum: usize,
    /// What `auto` chose and why; empty for a fixed micro-batch.
    pub reason: String,
}

/// Resolves `micro_batch`/`grad_accum`: a fixed micro-batch is kept as given (a device too small
/// for it is reported by the model's memory check); `auto` takes the largest divisor of the step's
/// `AUTO_MAX × grad_accum` examples that is at most `AUTO_MAX` and at most `fits` (the
/// micro-batch that fits the device, `None` where unknown), so the step keeps its examples.
pub fn plan_batches(micro_batch: MicroBatch, grad_accum: usize, fits: Option<usize>) -> BatchPlan {
    let MicroBatch::Auto = micro_batch else {
        return BatchPlan { micro_batch: micro_batch.configured(), grad_accum, reason: String::new() };
    };
    let max = MicroBatch::AUTO_MAX;
    let examples = max * grad_accum;
    let (micro, why) = match fits {
        None => (max, "the device's free memory is unknown".to_string()),
        Some(f) if f >= max => (max, format!("{max} fits (room for {f})")),
        Some(0) => (1, "not even 1 fits (the memory check below says what would)".to_string()),
        Some(f) => {
            let m = (1..=f).rev().find(|m| examples.is_multiple_of(*m)).unwrap_or(1);
            (m, format!("{max} does not fit, at most {f} does; {m} divides the step's {examples} examples"))
        }
    };
    let accum = examples / micro;
    BatchPlan {
        micro_batch: micro,
        grad_accum: accum,
        reason: format!(
            "micro_batch auto: {micro} × grad_accum {accum} = {examples} examples per step \
             (as {max} × {grad_accum}): {why}"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_picks_the_largest_fitting_micro_batch_and_keeps_the_step() {
        use crate::model::config::ModelConfig;
        use crate::model::forward::micro_batch_that_fits;
        let config = ModelConfig::preset("simplellama-1.3b").unwrap();
        // An 80 GB H100 with about 79 GB free: the 1.3B at 32 × 2048 does not fit.
        let free = 79usize << 30;
        let fits = micro_batch_that_fits(&config, 2, 2048, free);
        assert!(fits > 0 && fits < 32, "{fits}");
        let plan = plan_batches(MicroBatch::Auto, 16, Some(fits));
        assert_eq!(plan.micro_batch * plan.grad_accum, 512);
        assert!(plan.micro_batch <= fits && plan.micro_batch.is_power_of_two(), "{plan:?}");
        assert!(plan.micro_batch * 2 > fits, "the largest divisor of 512 that fits: {plan:?}");
        assert!(plan.reason.contains(&format!("at most {fits} does")), "{}", plan.reason);
        // Plenty of memory: the recipe's 32 × 16.
        let roomy = plan_batches(MicroBatch::Auto, 16, Some(40));
        assert_eq!((roomy.micro_batch, roomy.grad_accum), (32, 16));
        // Unknown memory (the CPU): the recipe's micro-batch.
        let cpu = plan_batches(MicroBatch::Auto, 16, None);
        assert_eq!((cpu.micro_batch, cpu.grad_accum), (32, 16));
        assert!(cpu.reason.contains("unknown"), "{}", cpu.reason);
        // A step that is not a power of two: a divisor, so the step keeps its examples.
        let odd = plan_batches(MicroBatch::Auto, 15, Some(7));
        assert_eq!((odd.micro_batch, odd.grad_accum), (6, 80));
        // A fixed micro-batch is kept whatever fits.
        let fixed = plan_batches(MicroBatch::Fixed(32), 16, Some(3));
        assert_eq!((fixed.micro_batch, fixed.grad_accum, fixed.reason.as_str()), (32, 16, ""));
    }

    #[test]
    fn resuming_auto_reuses_the_saved_choice_when_it_keeps_the_step() {
        let now = TrainConfig::default();
        let saved = TrainConfig { micro_batch: MicroBatch::Fixed(8), grad_accum: 64, ..now.clone() };
        let kept = now.with_saved_batches(&saved).expect("8 × 64 keeps 32 × 16");
        assert_eq!((kept.micro_batch, kept.grad_accum), (MicroBatch::Fixed(8), 64));
        // Another step size, or a fixed micro-batch now: not reused.
        let other = TrainConfig { grad_accum: 8, ..now.clone() };
        assert_eq!(other.with_saved_batches(&saved), None);
        let fixed = TrainConfig { micro_batch: MicroBatch::Fixed(8), ..now.clone() };
        assert_eq!(fixed.with_saved_batches(&saved), None);
    }

    #[test]
    fn micro_batch_reads_a_number_or_auto() {
        let c: TrainConfig = serde_json::from_str(r#"{"micro_batch": "auto"}"#).unwrap();
        assert_eq!(c.micro_batch, MicroBatch::Auto);
        let c: TrainConfig = serde_json::from_str(r#"{"micro_batch": 8}"#).unwrap();
        assert_eq!(c.micro_batch, MicroBatch::Fixed(8));
        let err = serde_json::from_str::<TrainConfig>(r#"{"micro_batch": "big"}"#).unwrap_err();
        assert!(err.to_string().contains("micro_batch"), "{err}");
        let back: TrainConfig =
            serde_json::from_str(&serde_json::to_string(&TrainConfig::default()).unwrap()).unwrap();
        assert_eq!(back.micro_batch, MicroBatch::Auto);
        assert_eq!("auto".parse::<MicroBatch>(), Ok(MicroBatch::Auto));
        assert_eq!("12".parse::<MicroBatch>(), Ok(MicroBatch::Fixed(12)));
        assert!("x".parse::<MicroBatch>().is_err());
    }

    #[test]
    fn defaults_are_simplellama_sft() {
        let c = TrainConfig::default();
        assert_eq!((c.beta1, c.beta2, c.eps, c.weight_decay), (0.9, 0.95, 1e-8, 0.01));
        assert_eq!((c.micro_batch, c.grad_accum, c.epochs, c.seed), (MicroBatch::Auto, 16, 3, 89));
        assert_eq!(c.micro_batch.configured(), 32);
        assert_eq!((c.max_lr, c.min_lr, c.warmup_steps, c.clip), (1e-5, 1e-6, 100, 1.0));
        // The one departure from the recipe: packed rows, so no layer computes on padding.
        assert_eq!(c.batch_mode, BatchMode::Packed);
    }

    #[test]
    fn max_steps_sets_the_schedule_unless_schedule_steps_does() {
        let c = TrainConfig { max_steps: Some(40), ..TrainConfig::default() };
        assert_eq!(c.schedule_length(900), 40);
        assert!(!c.counts_epochs());
        let c = TrainConfig { schedule_steps: Some(100), ..c };
        assert_eq!(c.schedule_length(900), 100);
        let c = TrainConfig::default();
        assert_eq!(c.schedule_length(900), 900);
        assert!(c.counts_epochs());
        let c = TrainConfig { schedule_steps: Some(7), ..c };
        assert_eq!(c.schedule_length(900), 7);
        assert!(c.counts_epochs(), "the run's end still needs the epochs");
    }

    #[test]
    fn default_seq_len_is_2048_or_what_the_data_needs_never_the_whole_context() {
        // Llama 3.2's 131072-token context is not a row length.
        assert_eq!(default_seq_len(131072, None), 2048);
        assert_eq!(default_seq_len(131072, Some(300)), 2048);
        assert_eq!(default_seq_len(131072, Some(5000)), 5000);
        // Never beyond the model's context.
        assert_eq!(default_seq_len(512, Some(300)), 512);
        assert_eq!(default_seq_len(4096, Some(9000)), 4096);
    }

    #[test]
    fn json_fills_defaults_and_rejects_unknown_fields() {
        let c: TrainConfig = serde_json::from_str(r#"{"micro_batch": 4, "device": "cpu"}"#).unwrap();
        assert_eq!((c.micro_batch, c.grad_accum), (MicroBatch::Fixed(4), 16));
        let err = serde_json::from_str::<TrainConfig>(r#"{"micro_bach": 4}"#).unwrap_err();
        assert!(err.to_string().contains("micro_bach"), "{err}");
    }

    #[test]
    fn validation_names_the_field() {
        let ok = TrainConfig { data: "d".into(), ..TrainConfig::default() };
        ok.validate().unwrap();
        let err = TrainConfig { micro_batch: MicroBatch::Fixed(0), ..ok.clone() }.validate().unwrap_err();
        assert!(err.to_string().contains("micro_batch"), "{err}");
        let err = TrainConfig { device: "tpu".into(), ..ok.clone() }.validate().unwrap_err();
        assert!(err.to_string().contains("unknown device \"tpu\""), "{err}");
        let err = TrainConfig { min_lr: 1.0, ..ok.clone() }.validate().unwrap_err();
        assert!(err.to_string().contains("min_lr"), "{err}");
        // ZeRO: stage 1 only, and not with LoRA (nothing of the frozen base to split).
        TrainConfig { zero_stage: 1, ..ok.clone() }.validate().unwrap();
        let err = TrainConfig { zero_stage: 2, ..ok.clone() }.validate().unwrap_err();
        assert!(err.to_string().contains("zero_stage 2 is not built"), "{err}");
        let lora = TrainConfig { zero_stage: 1, lora: Some(Default::default()), ..ok };
        let err = lora.validate().unwrap_err();
        assert!(err.to_string().contains("zero_stage 1") && err.to_string().contains("LoRA"), "{err}");
    }
}
