//! `TrainConfig`: everything a training run needs, as a JSON file (`sft train --config run.json`)
//! whose fields the command-line flags override. Defaults are SimpleLLaMA's SFT settings.

use crate::data::BatchMode;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub use crate::backend::Device;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// A preset (`tiny`, `simplellama-1.3b`) or the path of a model-config JSON file. Ignored when
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
    /// Stop after this many optimizer steps in all (counting those before a resume). The schedule
    /// is not shortened, so a run stopped here and resumed matches an uninterrupted one.
    pub max_steps: Option<u64>,
    /// The steps the LR schedule spans; default: `epochs` × optimizer steps per epoch.
    pub schedule_steps: Option<u64>,
    /// Examples per micro-batch (rows of `max_seq_len` tokens in packed mode).
    pub micro_batch: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub batch_mode: BatchMode,
    /// Longest row in tokens; default: the model's `max_seq_len`.
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
            micro_batch: 32,
            grad_accum: 16,
            batch_mode: BatchMode::Dynamic,
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
        }
    }
}

impl TrainConfig {
    /// Reads a JSON config; absent fields take their defaults, unknown fields are errors.
    pub fn load(path: &Path) -> Result<TrainConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading train config {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing train config {}", path.display()))
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

    /// Checks every field that a run would otherwise trip over later, naming the field.
    pub fn validate(&self) -> Result<()> {
        self.device_kind()?;
        if self.data.as_os_str().is_empty() {
            bail!("data is not set: give the prepared data directory (--data DIR)");
        }
        if self.out_dir.as_os_str().is_empty() {
            bail!("out_dir is not set (--out-dir DIR)");
        }
        if self.micro_batch == 0 {
            bail!("micro_batch must be at least 1");
        }
        if self.grad_accum == 0 {
            bail!("grad_accum must be at least 1");
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
        if self.eval_every > 0 && self.eval_batches == 0 {
            bail!("eval_batches must be at least 1 when eval_every is set");
        }
        if self.log_every == 0 {
            bail!("log_every must be at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_simplellama_sft() {
        let c = TrainConfig::default();
        assert_eq!((c.beta1, c.beta2, c.eps, c.weight_decay), (0.9, 0.95, 1e-8, 0.01));
        assert_eq!((c.micro_batch, c.grad_accum, c.epochs, c.seed), (32, 16, 3, 89));
        assert_eq!((c.max_lr, c.min_lr, c.warmup_steps, c.clip), (1e-5, 1e-6, 100, 1.0));
        assert_eq!(c.batch_mode, BatchMode::Dynamic);
    }

    #[test]
    fn json_fills_defaults_and_rejects_unknown_fields() {
        let c: TrainConfig = serde_json::from_str(r#"{"micro_batch": 4, "device": "cpu"}"#).unwrap();
        assert_eq!((c.micro_batch, c.grad_accum), (4, 16));
        let err = serde_json::from_str::<TrainConfig>(r#"{"micro_bach": 4}"#).unwrap_err();
        assert!(err.to_string().contains("micro_bach"), "{err}");
    }

    #[test]
    fn validation_names_the_field() {
        let ok = TrainConfig { data: "d".into(), ..TrainConfig::default() };
        ok.validate().unwrap();
        let err = TrainConfig { micro_batch: 0, ..ok.clone() }.validate().unwrap_err();
        assert!(err.to_string().contains("micro_batch"), "{err}");
        let err = TrainConfig { device: "tpu".into(), ..ok.clone() }.validate().unwrap_err();
        assert!(err.to_string().contains("unknown device \"tpu\""), "{err}");
        let err = TrainConfig { min_lr: 1.0, ..ok }.validate().unwrap_err();
        assert!(err.to_string().contains("min_lr"), "{err}");
    }
}
