//! LoRA at the command line: the `--lora*` training flags, where a LoRA run's base weights come
//! from, its checkpoints, `--adapter` for the commands that run a model, and `sft merge`.
//! The adapters themselves are `model::lora`; their files are `checkpoint::peft`.

use crate::backend::Backend;
use crate::checkpoint::{self, peft, Checkpoint};
use crate::model::lora::LoraConfig;
use crate::model::{Model, ModelConfig};
use crate::train::config::TrainConfig;
use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// The LoRA flags of `sft train`.
#[derive(Args, Debug, Clone, Default)]
pub struct LoraArgs {
    /// Train low-rank adapters on the frozen `--init-from` weights instead of every weight
    /// (defaults: SimpleLLaMA's rank 16, alpha 8, q and v).
    #[arg(long)]
    pub lora: bool,
    /// The adapters' rank r (default: 16).
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// The adapters' output is scaled by alpha / rank.
    #[arg(long)]
    pub lora_alpha: Option<f32>,
    /// Dropout on the adapters' input.
    #[arg(long)]
    pub lora_dropout: Option<f32>,
    /// Comma-separated: any of q, k, v, o, gate, up, down (or PEFT's q_proj, ...).
    #[arg(long)]
    pub lora_targets: Option<String>,
}

impl LoraArgs {
    /// `current` (a config file's `lora`, or none) with these flags applied.
    pub fn apply(&self, current: Option<LoraConfig>) -> Result<Option<LoraConfig>> {
        let any_field = self.lora_rank.is_some()
            || self.lora_alpha.is_some()
            || self.lora_dropout.is_some()
            || self.lora_targets.is_some();
        let mut lora = match (current, self.lora) {
            (Some(l), _) => l,
            (None, true) => LoraConfig::default(),
            (None, false) if any_field => {
                bail!("--lora-rank, --lora-alpha, --lora-dropout and --lora-targets need --lora")
            }
            (None, false) => return Ok(None),
        };
        if let Some(r) = self.lora_rank {
            lora.rank = r;
        }
        if let Some(a) = self.lora_alpha {
            lora.alpha = a;
        }
        if let Some(p) = self.lora_dropout {
            lora.dropout = p;
        }
        if let Some(list) = &self.lora_targets {
            lora.targets = LoraConfig::parse_targets(list).context("--lora-targets")?;
        }
        Ok(Some(lora))
    }
}

/// Checks what can be checked of a run's `lora` before the model is known.
pub fn validate(lora: &LoraConfig) -> Result<()> {
    ensure!(lora.rank > 0, "lora.rank must be at least 1 (--lora-rank)");
    ensure!(
        lora.alpha.is_finite() && lora.alpha > 0.0 && lora.alpha <= 1e6,
        "lora.alpha must be in (0, 1e6] (got {})",
        lora.alpha
    );
    ensure!((0.0..1.0).contains(&lora.dropout), "lora.dropout must be in [0, 1) (got {})", lora.dropout);
    ensure!(!lora.targets.is_empty(), "lora.targets must name at least one projection (--lora-targets)");
    Ok(())
}

/// The base checkpoint of a LoRA run: `init_from`, else (resuming) the interrupted run's.
pub fn base_dir(cfg: &TrainConfig, saved: Option<&TrainConfig>) -> Result<PathBuf> {
    match (&cfg.init_from, saved.and_then(|s| s.init_from.as_ref())) {
        (Some(dir), _) | (None, Some(dir)) => Ok(dir.clone()),
        (None, None) => bail!(
            "--lora trains adapters on the frozen weights of a checkpoint: pass --init-from DIR (a checkpoint of \
             `sft init`, `sft import` or a run's step-N/)"
        ),
    }
}

/// A resumed run must train what the interrupted one trained: adapters, or every weight.
pub fn check_resume(saved: &TrainConfig, now: &TrainConfig) -> Result<()> {
    match (&saved.lora, &now.lora) {
        (Some(_), None) => bail!(
            "{}: the run being resumed trains LoRA adapters: pass the same --lora flags to resume it",
            now.out_dir.display()
        ),
        (None, Some(_)) => bail!(
            "{}: the run being resumed trains every weight, not LoRA adapters: drop --lora, or choose another \
             out_dir",
            now.out_dir.display()
        ),
        (Some(_), Some(_)) => match (&saved.init_from, &now.init_from) {
            // The adapters were trained on the saved base: on another they mean something else.
            (Some(base), Some(given)) if !crate::paths::same_file(base, given) => bail!(
                "{}: the run being resumed trains adapters on the base {}, not {}: drop --init-from (or give \
                 that base), or choose another out_dir",
                now.out_dir.display(),
                base.display(),
                given.display()
            ),
            _ => Ok(()),
        },
        _ => Ok(()),
    }
}

/// One line on what a LoRA model trains.
pub fn describe(lora: &LoraConfig, config: &ModelConfig) -> String {
    format!(
        "LoRA: rank {}, alpha {} (scale {}), dropout {}, on {}: {} adapter parameters trained, the {} base \
         parameters frozen",
        lora.rank,
        lora.alpha,
        lora.scale(),
        lora.dropout,
        lora.targets.iter().map(|t| t.name()).collect::<Vec<_>>().join(","),
        lora.n_params(config),
        config.n_params()
    )
}

/// Saves a LoRA run checkpoint `out_dir/step-N/` (the PEFT adapter, its moments, the trainer
/// state, the tokenizer) atomically, as `checkpoint::save` does a full one.
pub fn save_run<B: Backend, S: Serialize>(
    out_dir: &Path,
    model: &Model<B>,
    step: u64,
    state: &S,
    base: &Path,
    tokenizer: Option<&Path>,
    keep: usize,
) -> Result<PathBuf> {
    checkpoint::save_with(out_dir, step, state, keep, |tmp| {
        peft::write_run_files(tmp, model, base, tokenizer)
    })
}

/// An inference model of the checkpoint `ckpt`, with the adapter in `adapter` when given.
pub fn inference_model<B: Backend>(
    ckpt: &Checkpoint,
    adapter: Option<&Path>,
    backend: B,
    max_tokens: usize,
) -> Result<Model<B>> {
    match adapter {
        Some(dir) => peft::inference_model_with_adapter(ckpt, dir, backend, max_tokens),
        None => ckpt.inference_model(backend, max_tokens),
    }
}

/// `sft merge`.
#[derive(Args, Debug)]
pub struct MergeArgs {
    /// The base checkpoint the adapter was trained on.
    #[arg(long)]
    pub base: PathBuf,
    /// A PEFT adapter directory (adapter_config.json, adapter_model.safetensors), e.g. a LoRA
    /// run's step-N/.
    #[arg(long)]
    pub adapter: PathBuf,
    /// The merged checkpoint (must not exist yet).
    #[arg(long)]
    pub out: PathBuf,
}

/// Folds the adapter into the base's weights (`W += alpha/r · B·A`) and writes a normal
/// checkpoint with the base's tokenizer.
pub fn merge(args: MergeArgs) -> Result<()> {
    let ckpt = Checkpoint::open(&args.base)?;
    let params = peft::merged_params(&ckpt, &args.adapter)?;
    let tok = args.base.join(checkpoint::TOKENIZER_FILE);
    checkpoint::save_weights(&args.out, ckpt.config(), params, tok.exists().then_some(tok.as_path()))?;
    let (lora, _) = peft::read_adapter_config(&args.adapter)?;
    println!(
        "wrote {}: {} with the adapter {} merged ({})",
        args.out.display(),
        args.base.display(),
        args.adapter.display(),
        describe(&lora, ckpt.config())
    );
    Ok(())
}
