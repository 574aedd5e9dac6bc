//! LoRA adapters on disk in Hugging Face PEFT's layout, so that `peft` loads them onto the
//! transformers model of the base checkpoint:
//!
//! ```text
//! adapter_dir/
//!   adapter_model.safetensors   base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight [r, in]
//!                               base_model.model.model.layers.N.self_attn.q_proj.lora_B.weight [out, r]
//!   adapter_config.json         peft_type LORA, r, lora_alpha, target_modules, lora_dropout, ...
//! ```
//!
//! A training run's LoRA checkpoint (`step-N/`) holds these two files plus the adapters' AdamW
//! moments (`adapter_optimizer.safetensors`, internal names), `trainer_state.json` and the
//! tokenizer; the base weights stay where `base_model_name_or_path` says.
//!
//! As for full checkpoints (`hf.rs`), the files hold Hugging Face's RoPE convention: for an
//! adjacent-pairs model the output rows of a q or k adapter's B are permuted per head like the
//! q/k weights, so the adapter applies to the converted base unchanged.

use super::fsync::write_file_synced;
use super::hf::{adjacent_to_half_split, half_split_to_adjacent};
use super::safetensors::{read_safetensors, write_safetensors};
use super::{Checkpoint, TOKENIZER_FILE};
use crate::backend::{Backend, RopeStyle};
use crate::model::config::ModelConfig;
use crate::model::lora::{check_adapters, LoraConfig, LoraTarget};
use crate::model::params::NamedTensor;
use crate::model::Model;
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::path::Path;

pub const ADAPTER_FILE: &str = "adapter_model.safetensors";
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_OPTIMIZER_FILE: &str = "adapter_optimizer.safetensors";

/// Whether `dir` holds a PEFT adapter (its `adapter_config.json`).
pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.join(ADAPTER_CONFIG_FILE).is_file()
}

/// PEFT's name of an internal adapter tensor `layers.N.q.lora_A`.
fn peft_name(internal: &str) -> Option<String> {
    let mut parts = internal.split('.');
    let (Some("layers"), Some(layer), Some(target), Some(which), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let target = LoraTarget::parse(target).ok()?;
    Some(format!("base_model.model.model.layers.{layer}.{}.{which}.weight", target.hf_module()))
}

/// Whether the B of this target has its rows permuted between the layouts.
fn permuted(config: &ModelConfig, target: LoraTarget) -> Option<usize> {
    let heads = config.heads();
    match (config.rope_style, target) {
        (RopeStyle::AdjacentPairs, LoraTarget::Q) => Some(heads.n_heads),
        (RopeStyle::AdjacentPairs, LoraTarget::K) => Some(heads.n_kv_heads),
        _ => None,
    }
}

/// Internal adapter tensors → PEFT names and Hugging Face's RoPE row order.
pub fn to_peft(
    config: &ModelConfig,
    lora: &LoraConfig,
    adapters: &[NamedTensor],
) -> Result<Vec<NamedTensor>> {
    let ordered = check_adapters(lora, config, adapters)?;
    let mut out = Vec::with_capacity(ordered.len());
    for (k, a) in lora.adapters(config).iter().enumerate() {
        for (i, t) in [(0, ordered[2 * k]), (1, ordered[2 * k + 1])] {
            let name = peft_name(&t.name).expect("internal adapter names parse");
            let data = match permuted(config, a.target) {
                Some(heads) if i == 1 => {
                    adjacent_to_half_split(&t.data, heads, config.heads().head_dim, lora.rank)
                }
                _ => t.data.clone(),
            };
            out.push(NamedTensor::new(name, t.shape.clone(), data));
        }
    }
    Ok(out)
}

/// The JSON of `adapter_config.json`: PEFT's `LoraConfig` fields.
pub fn adapter_config_json(lora: &LoraConfig, base: &str) -> Value {
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": lora.targets.iter().map(|t| t.peft_name()).collect::<Vec<_>>(),
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "layers_to_transform": null,
        "rank_pattern": {},
        "alpha_pattern": {},
    })
}

/// Reads `dir/adapter_config.json`: the LoRA config and `base_model_name_or_path`. Missing or
/// unsupported fields are errors naming the file and the field.
pub fn read_adapter_config(dir: &Path) -> Result<(LoraConfig, Option<String>)> {
    let path = dir.join(ADAPTER_CONFIG_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let file = path.display();
    let field = |name: &str| v.get(name).filter(|x| !x.is_null());
    let need = |name: &str| field(name).with_context(|| format!("{file}: field {name:?} is missing"));
    let peft_type = need("peft_type")?.as_str().unwrap_or_default();
    ensure!(
        peft_type == "LORA",
        "{file}: field \"peft_type\" is {peft_type:?}; only \"LORA\" adapters are supported"
    );
    let rank =
        need("r")?.as_u64().with_context(|| format!("{file}: field \"r\" must be a positive integer"))?;
    ensure!(rank > 0, "{file}: field \"r\" must be at least 1 (got 0)");
    let alpha = need("lora_alpha")?
        .as_f64()
        .with_context(|| format!("{file}: field \"lora_alpha\" must be a number"))?;
    let dropout = match field("lora_dropout") {
        None => 0.0,
        Some(x) => x.as_f64().with_context(|| format!("{file}: field \"lora_dropout\" must be a number"))?,
    };
    let list = need("target_modules")?.as_array().with_context(|| {
        format!("{file}: field \"target_modules\" must be a list of module names (a regex is not supported)")
    })?;
    let mut targets = Vec::with_capacity(list.len());
    for t in list {
        let name =
            t.as_str().with_context(|| format!("{file}: field \"target_modules\" holds {t}, not a name"))?;
        targets.push(LoraTarget::parse(name).with_context(|| format!("{file}: field \"target_modules\""))?);
    }
    ensure!(!targets.is_empty(), "{file}: field \"target_modules\" is empty");
    if let Some(bias) = field("bias").and_then(Value::as_str) {
        ensure!(bias == "none", "{file}: field \"bias\" is {bias:?}; only \"none\" is supported");
    }
    for flag in ["use_rslora", "use_dora", "fan_in_fan_out"] {
        if field(flag).and_then(Value::as_bool) == Some(true) {
            bail!("{file}: field {flag:?} is true; not supported");
        }
    }
    for pattern in ["rank_pattern", "alpha_pattern"] {
        if field(pattern).and_then(Value::as_object).is_some_and(|m| !m.is_empty()) {
            bail!("{file}: field {pattern:?} is not empty; per-module ranks are not supported");
        }
    }
    ensure!(
        field("layers_to_transform").is_none(),
        "{file}: field \"layers_to_transform\" is set; adapters on some layers only are not supported"
    );
    let base = field("base_model_name_or_path").and_then(Value::as_str).map(str::to_string);
    Ok((LoraConfig::new(rank as usize, alpha as f32, dropout as f32, targets), base))
}

/// Says so when the adapter in `dir` records another base than `base` (its
/// `base_model_name_or_path` names a directory here that is not `base`): its updates were trained
/// against that base's weights. Only a warning: the recorded directory may hold a copy of the
/// same weights, and a hub name or a path that no longer exists says nothing here.
pub fn warn_if_another_base(dir: &Path, base: &Path) -> Result<()> {
    let (_, recorded) = read_adapter_config(dir)?;
    let Some(recorded) = recorded else { return Ok(()) };
    if Path::new(&recorded).exists() && !crate::paths::same_file(Path::new(&recorded), base) {
        crate::say!(
            "warning: {} says the adapter was trained on {recorded}, not {}: its updates assume that \
             base's weights",
            dir.join(ADAPTER_CONFIG_FILE).display(),
            base.display()
        );
    }
    Ok(())
}

/// Reads the adapter in `dir` for a base of `config`: its LoRA config and internal tensors.
/// A config or tensors that do not fit the base are errors naming the file and the field or
/// tensor.
pub fn read_adapter(dir: &Path, config: &ModelConfig) -> Result<(LoraConfig, Vec<NamedTensor>)> {
    let (lora, _) = read_adapter_config(dir)?;
    let path = dir.join(ADAPTER_CONFIG_FILE);
    lora.validate(config).with_context(|| format!("{}: does not fit the base model", path.display()))?;
    let specs = lora.tensor_specs(config);
    let expected: Vec<(String, Vec<usize>)> =
        specs.iter().map(|(n, s)| (peft_name(n).expect("internal adapter names parse"), s.clone())).collect();
    let file = dir.join(ADAPTER_FILE);
    let tensors = read_safetensors(&file, &expected)
        .with_context(|| format!("{}: the adapter does not fit the base model", file.display()))?;
    let adapters = lora.adapters(config);
    let out = tensors
        .into_iter()
        .zip(specs)
        .enumerate()
        .map(|(i, (t, (name, shape)))| {
            let data = match permuted(config, adapters[i / 2].target) {
                Some(heads) if i % 2 == 1 => {
                    half_split_to_adjacent(&t.data, heads, config.heads().head_dim, lora.rank)
                }
                _ => t.data,
            };
            NamedTensor::new(name, shape, data)
        })
        .collect();
    Ok((lora, out))
}

/// Writes `adapter_model.safetensors` and `adapter_config.json` into the existing `dir`.
pub fn write_adapter(
    dir: &Path,
    config: &ModelConfig,
    lora: &LoraConfig,
    adapters: &[NamedTensor],
    base: &str,
) -> Result<()> {
    write_safetensors(&dir.join(ADAPTER_FILE), &to_peft(config, lora, adapters)?)?;
    let json = serde_json::to_string_pretty(&adapter_config_json(lora, base))?;
    write_file_synced(&dir.join(ADAPTER_CONFIG_FILE), json.as_bytes())
}

/// The files of a LoRA run checkpoint (beside `trainer_state.json`, which the caller writes):
/// the adapter, its AdamW moments, and the tokenizer.
pub fn write_run_files<B: Backend>(
    dir: &Path,
    model: &Model<B>,
    base: &Path,
    tokenizer: Option<&Path>,
) -> Result<()> {
    let lora = model.lora().context("write_run_files: the model has no adapters")?.clone();
    let base = std::fs::canonicalize(base).unwrap_or_else(|_| base.to_path_buf());
    write_adapter(dir, model.config(), &lora, &model.read_adapters()?, &base.to_string_lossy())?;
    let (m, v) = model.read_adapter_moments()?;
    let mut moments: Vec<NamedTensor> =
        m.into_iter().map(|t| NamedTensor { name: format!("m.{}", t.name), ..t }).collect();
    moments.extend(v.into_iter().map(|t| NamedTensor { name: format!("v.{}", t.name), ..t }));
    write_safetensors(&dir.join(ADAPTER_OPTIMIZER_FILE), &moments)?;
    if let Some(tok) = tokenizer {
        let dst = dir.join(TOKENIZER_FILE);
        let bytes = std::fs::read(tok).with_context(|| format!("reading {}", tok.display()))?;
        write_file_synced(&dst, &bytes)?;
    }
    Ok(())
}

/// Loads a LoRA run checkpoint's adapters and their moments into `model`, whose adapter config
/// must be the checkpoint's.
pub fn load_run_state<B: Backend>(dir: &Path, model: &mut Model<B>) -> Result<()> {
    let ours = model.lora().context("load_run_state: the model has no adapters")?.clone();
    let (lora, adapters) = read_adapter(dir, model.config())?;
    ensure!(
        lora == ours,
        "{}: the checkpoint's adapters {lora:?} differ from this run's {ours:?} (--lora-rank, --lora-alpha, \
         --lora-dropout, --lora-targets)",
        dir.join(ADAPTER_CONFIG_FILE).display()
    );
    model.write_adapters(&adapters)?;
    let path = dir.join(ADAPTER_OPTIMIZER_FILE);
    let specs = lora.tensor_specs(model.config());
    let mut expected: Vec<(String, Vec<usize>)> =
        specs.iter().map(|(n, s)| (format!("m.{n}"), s.clone())).collect();
    expected.extend(specs.iter().map(|(n, s)| (format!("v.{n}"), s.clone())));
    let mut m = read_safetensors(&path, &expected)?;
    let v = m.split_off(specs.len());
    super::run::check_second_moments(&path, &v)?;
    let strip = |ts: Vec<NamedTensor>| -> Vec<NamedTensor> {
        ts.into_iter().map(|t| NamedTensor { name: t.name[2..].to_string(), ..t }).collect()
    };
    model.write_adapter_moments(&strip(m), &strip(v)).with_context(|| format!("loading {}", path.display()))
}

/// An inference-only model of the checkpoint `ckpt` with the adapter in `adapter` on top
/// (unmerged: the adapters run beside the frozen base), for batches of up to `max_tokens`.
pub fn inference_model_with_adapter<B: Backend>(
    ckpt: &Checkpoint,
    adapter: &Path,
    backend: B,
    max_tokens: usize,
) -> Result<Model<B>> {
    warn_if_another_base(adapter, ckpt.dir())?;
    let (lora, adapters) = read_adapter(adapter, ckpt.config())?;
    let params = ckpt.read_params()?;
    let mut model = Model::with_lora(backend, ckpt.config().clone(), max_tokens, false, &lora)
        .with_context(|| format!("building the model of checkpoint {}", ckpt.dir().display()))?;
    model.take_params(params).with_context(|| format!("loading the weights of {}", ckpt.dir().display()))?;
    model.write_adapters(&adapters).with_context(|| format!("loading the adapter {}", adapter.display()))?;
    Ok(model)
}

/// `sft merge`: the base checkpoint's weights with the adapter folded in (`W += scale · B·A`).
pub fn merged_params(ckpt: &Checkpoint, adapter: &Path) -> Result<Vec<NamedTensor>> {
    warn_if_another_base(adapter, ckpt.dir())?;
    let (lora, adapters) = read_adapter(adapter, ckpt.config())?;
    let mut params = ckpt.read_params()?;
    crate::model::lora::merge_into(&lora, ckpt.config(), &mut params, &adapters)?;
    Ok(params)
}
