//! A training run's checkpoints: atomic saves, pruning to the newest few, `latest`, and loading
//! a checkpoint back into a model.
//!
//! A save writes `step-N.tmp/`, fsyncs every file and the directory, renames it to `step-N/`,
//! and only then points `latest` at it (temp file + rename). A kill at any moment leaves `latest`
//! naming a complete checkpoint; leftover `*.tmp` directories are never read. The weights on
//! disk are the f32 master weights, so resuming reproduces the run bit for bit.
//!
//! The trainer's own state is saved as the JSON of whatever `Serialize` value it passes, so this
//! module knows nothing of the trainer.

use super::fsync::{fsync_dir, fsync_file, write_file_synced};
use super::hf::{read_params, to_hf};
use super::hf_config::{hf_config_json, read_model_config, token_ids_from_tokenizer_json};
use super::safetensors::{
    read_safetensors, recorded_digest, tensor_dtypes, write_safetensors, write_safetensors_bf16,
};
use super::{CONFIG_FILE, LATEST_FILE, MODEL_FILE, OPTIMIZER_FILE, TOKENIZER_FILE, TRAINER_STATE_FILE};
use crate::backend::{Backend, StateDtype};
use crate::checksum;
use crate::data::ChatTokenizer;
use crate::dist::{Collectives, SingleProcess};
use crate::lock::{sibling, DirLock};
use crate::model::config::ModelConfig;
use crate::model::lora::LoraConfig;
use crate::model::params::{param_specs, NamedTensor};
use crate::model::recompute::Recompute;
use crate::model::Model;
use anyhow::{bail, ensure, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::data::template::{tokenizer_config_beside, TOKENIZER_CONFIG_FILE};
use crate::data::FormatChoice;

// ---- writing --------------------------------------------------------------------------------

/// The tokenizer a checkpoint gets: a file to copy, or the JSON text of one.
#[derive(Clone, Copy, Debug)]
pub enum TokenizerSource<'a> {
    File(&'a Path),
    Json(&'a str),
}

/// Writes the weights (internal tensors `params`), config.json and (when given) the tokenizer
/// into `dir`, which must exist.
fn write_weights(
    dir: &Path,
    config: &ModelConfig,
    params: Vec<NamedTensor>,
    tokenizer: Option<TokenizerSource>,
) -> Result<()> {
    write_safetensors(&dir.join(MODEL_FILE), &to_hf(config, params))?;
    let mut json = hf_config_json(config);
    let dst = dir.join(TOKENIZER_FILE);
    match tokenizer {
        None => {}
        Some(TokenizerSource::File(tok)) => {
            std::fs::copy(tok, &dst)
                .with_context(|| format!("copying tokenizer {} to {}", tok.display(), dst.display()))?;
            fsync_file(&dst)?;
            // The chat template the model is trained in travels with its tokenizer.
            let config = tokenizer_config_beside(tok);
            if config.is_file() {
                let config_dst = dir.join(TOKENIZER_CONFIG_FILE);
                std::fs::copy(&config, &config_dst)
                    .with_context(|| format!("copying {} to {}", config.display(), config_dst.display()))?;
                fsync_file(&config_dst)?;
            }
        }
        Some(TokenizerSource::Json(text)) => write_file_synced(&dst, text.as_bytes())?,
    }
    if tokenizer.is_some() {
        let text = std::fs::read_to_string(&dst).with_context(|| format!("reading {}", dst.display()))?;
        let obj = json.as_object_mut().expect("hf_config_json is an object");
        obj.extend(token_ids_from_tokenizer_json(&text));
    }
    write_file_synced(&dir.join(CONFIG_FILE), serde_json::to_string_pretty(&json)?.as_bytes())
}

/// The AdamW moments in the model's state type: bf16 moments are saved as BF16 (they are bf16
/// values, so nothing is rounded), which is also how a resume tells the two apart.
fn write_optimizer(path: &Path, moments: StateDtype, m: Vec<NamedTensor>, v: Vec<NamedTensor>) -> Result<()> {
    let tensors = optimizer_tensors(m, v);
    match moments {
        StateDtype::F32 => write_safetensors(path, &tensors),
        StateDtype::Bf16 => write_safetensors_bf16(path, &tensors),
    }
}

fn optimizer_tensors(m: Vec<NamedTensor>, v: Vec<NamedTensor>) -> Vec<NamedTensor> {
    let prefixed = |prefix: &str, ts: Vec<NamedTensor>| {
        ts.into_iter()
            .map(move |t| NamedTensor { name: format!("{prefix}.{}", t.name), ..t })
            .collect::<Vec<_>>()
    };
    let mut all = prefixed("m", m);
    all.extend(prefixed("v", v));
    all
}

/// Writes a weights-only checkpoint (`sft init`) from internal tensors: `dir` must not exist
/// yet. Atomic like [`save`].
pub fn save_weights(
    dir: &Path,
    config: &ModelConfig,
    params: Vec<NamedTensor>,
    tokenizer: Option<&Path>,
) -> Result<()> {
    save_weights_with(dir, config, params, tokenizer.map(TokenizerSource::File))
}

/// [`save_weights`] with the tokenizer given as a file or as JSON text.
pub fn save_weights_with(
    dir: &Path,
    config: &ModelConfig,
    params: Vec<NamedTensor>,
    tokenizer: Option<TokenizerSource>,
) -> Result<()> {
    // Held until the rename: another command writing the same directory would otherwise take
    // this one's temporary directory for a crash's leftovers and remove it.
    let _lock = DirLock::acquire(sibling(dir, "write-lock")?, &dir.display().to_string(), "sft command")?;
    ensure!(!dir.exists(), "{} already exists: choose a new directory", dir.display());
    let tmp = sibling(dir, "tmp")?;
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing stale {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    write_weights(&tmp, config, params, tokenizer)?;
    fsync_dir(&tmp)?;
    std::fs::rename(&tmp, dir).with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    fsync_dir(dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))
}

/// The directory name of the checkpoint after `step` optimizer steps.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step}")
}

/// Saves a full training checkpoint after `step` optimizer steps as `out_dir/step-N/` (weights,
/// AdamW moments, `state` as `trainer_state.json`) and points `latest` at it, then keeps only the
/// newest `keep` checkpoints (0 = all). Returns the checkpoint directory.
pub fn save<B: Backend, S: Serialize>(
    out_dir: &Path,
    model: &Model<B>,
    step: u64,
    state: &S,
    tokenizer: Option<&Path>,
    keep: usize,
) -> Result<PathBuf> {
    save_over(out_dir, model, &SingleProcess, step, state, tokenizer, keep)?
        .context("one process is rank 0, which writes the checkpoint")
}

/// [`save`] by the ranks of a data-parallel job: rank 0 writes the checkpoint (and returns its
/// directory), the others return None. Under ZeRO-1 every rank must call it, since the weights
/// and moments are gathered from their owners; otherwise rank 0's call alone does.
pub fn save_over<B: Backend, S: Serialize>(
    out_dir: &Path,
    model: &Model<B>,
    comm: &dyn Collectives,
    step: u64,
    state: &S,
    tokenizer: Option<&Path>,
    keep: usize,
) -> Result<Option<PathBuf>> {
    let gathered = "rank 0 receives the gathered state";
    if !comm.is_main() {
        // The same collectives as rank 0, in its order.
        model.gather_params(comm)?;
        model.gather_optimizer_state(comm)?;
        return Ok(None);
    }
    save_with(out_dir, step, state, keep, |tmp| {
        let params = model.gather_params(comm)?.context(gathered)?;
        write_weights(tmp, model.config(), params, tokenizer.map(TokenizerSource::File))?;
        let (m, v) = model.gather_optimizer_state(comm)?.context(gathered)?;
        write_optimizer(&tmp.join(OPTIMIZER_FILE), model.optimizer_state(), m, v)
    })
    .map(Some)
}

/// [`save`] with the checkpoint's files (all but `trainer_state.json`) written by `write` into
/// the temporary directory: the same atomic rename, `latest` and pruning.
pub fn save_with<S: Serialize>(
    out_dir: &Path,
    step: u64,
    state: &S,
    keep: usize,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let name = step_dir_name(step);
    let dir = out_dir.join(&name);
    let tmp = out_dir.join(format!("{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing stale {}", tmp.display()))?;
    }
    std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    write(&tmp)?;
    let mut json = serde_json::to_value(state)?;
    let files = checkpoint_files(&tmp)?;
    if let (Some(fields), false) = (json.as_object_mut(), files.is_empty()) {
        fields.insert(FILES_FIELD.into(), serde_json::json!(files));
    }
    write_file_synced(&tmp.join(TRAINER_STATE_FILE), state_text(&json)?.as_bytes())?;
    fsync_dir(&tmp)?;
    if dir.exists() {
        // A complete save of this step that `latest` never pointed at (the run died between the
        // two renames): the run that follows `latest` supersedes it.
        ensure!(
            latest_name(out_dir)?.as_deref() != Some(name.as_str()),
            "{} is the latest checkpoint already",
            dir.display()
        );
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing stale {}", dir.display()))?;
    }
    std::fs::rename(&tmp, &dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    fsync_dir(out_dir)?;
    let latest_tmp = out_dir.join(format!("{LATEST_FILE}.tmp"));
    write_file_synced(&latest_tmp, format!("{name}\n").as_bytes())?;
    let latest = out_dir.join(LATEST_FILE);
    std::fs::rename(&latest_tmp, &latest).with_context(|| format!("replacing {}", latest.display()))?;
    fsync_dir(out_dir)?;
    prune(out_dir, keep, step)?;
    Ok(dir)
}

/// Complete checkpoints in `out_dir`, oldest first, as (step, dir).
pub fn list_checkpoints(out_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    let entries = std::fs::read_dir(out_dir).with_context(|| format!("listing {}", out_dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", out_dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse::<u64>().ok()) {
            if entry.path().is_dir() {
                found.push((step, entry.path()));
            }
        }
    }
    found.sort();
    Ok(found)
}

fn prune(out_dir: &Path, keep: usize, current: u64) -> Result<()> {
    if keep == 0 {
        return Ok(());
    }
    let all = list_checkpoints(out_dir)?;
    let n_old = all.len().saturating_sub(keep);
    for (step, dir) in all.into_iter().take(n_old) {
        if step != current {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("removing old checkpoint {}", dir.display()))?;
        }
    }
    Ok(())
}

// ---- reading --------------------------------------------------------------------------------

fn latest_name(out_dir: &Path) -> Result<Option<String>> {
    let path = out_dir.join(LATEST_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(text.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The checkpoint `out_dir/latest` points at, if any.
pub fn latest(out_dir: &Path) -> Result<Option<PathBuf>> {
    let Some(name) = latest_name(out_dir)? else { return Ok(None) };
    ensure!(
        !name.is_empty() && !name.contains('/') && !name.ends_with(".tmp"),
        "{}: bad checkpoint name {name:?}",
        out_dir.join(LATEST_FILE).display()
    );
    let dir = out_dir.join(&name);
    ensure!(dir.is_dir(), "{} points at {name}, which does not exist", out_dir.join(LATEST_FILE).display());
    Ok(Some(dir))
}

/// A checkpoint directory opened for loading: its `config.json` is parsed once, here, and every
/// load below uses that parse.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    config: ModelConfig,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        ensure!(
            dir.join(CONFIG_FILE).exists() || !super::peft::is_adapter_dir(dir),
            "{} holds a LoRA adapter ({}), not a model: pass its base checkpoint and --adapter {}",
            dir.display(),
            super::peft::ADAPTER_CONFIG_FILE,
            dir.display()
        );
        Ok(Checkpoint { dir: dir.to_path_buf(), config: read_model_config(dir)? })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The model config the checkpoint was saved with.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The checkpoint's weights as internal tensors.
    pub fn read_params(&self) -> Result<Vec<NamedTensor>> {
        read_params(&self.dir, &self.config)
    }

    /// Loads the weights into `model`, checking that the checkpoint's config matches the
    /// model's (dropout aside: that is a training choice, not part of the weights).
    pub fn load_weights_into<B: Backend>(&self, model: &mut Model<B>) -> Result<()> {
        let ours = model.config();
        ensure!(
            ModelConfig { dropout: ours.dropout, ..self.config.clone() } == *ours,
            "{}: the checkpoint's model config {:?} differs from the model's {ours:?}",
            self.dir.join(CONFIG_FILE).display(),
            self.config
        );
        let params = self.read_params()?;
        model.take_params(params).with_context(|| format!("loading the weights of {}", self.dir.display()))
    }

    /// A training model (master weights, gradients, AdamW moments) for micro-batches of up to
    /// `max_tokens` tokens, holding the checkpoint's weights.
    pub fn training_model<B: Backend>(&self, backend: B, max_tokens: usize) -> Result<Model<B>> {
        self.build_and_load(|config| Model::new(backend, config, max_tokens))
    }

    /// The trainer's model: micro-batches of `micro_batch` rows of `seq_len` tokens, checked
    /// against the backend's free memory first (the error names a micro-batch that fits), with
    /// `dropout` replacing the config's when given, holding the checkpoint's weights. The weights
    /// are read, and checked against the config, before the model is allocated.
    pub fn training_model_for<B: Backend>(
        &self,
        backend: B,
        dropout: Option<f32>,
        micro_batch: usize,
        seq_len: usize,
    ) -> Result<Model<B>> {
        self.training_model_with(
            backend,
            dropout,
            micro_batch,
            seq_len,
            None,
            Recompute::None,
            StateDtype::F32,
        )
    }

    /// [`Self::training_model_for`], with LoRA adapters (zero) on the frozen weights when
    /// `lora` is given, keeping the activations that `recompute` says, the optimizer state as
    /// `state` says (the moments' type; under ZeRO-1, this rank's share).
    #[allow(clippy::too_many_arguments)]
    pub fn training_model_with<B: Backend>(
        &self,
        backend: B,
        dropout: Option<f32>,
        micro_batch: usize,
        seq_len: usize,
        lora: Option<&LoraConfig>,
        recompute: Recompute,
        state: impl Into<crate::dist::OptimizerLayout>,
    ) -> Result<Model<B>> {
        let config = ModelConfig { dropout: dropout.unwrap_or(self.config.dropout), ..self.config.clone() };
        let params = self.read_params()?;
        let mut model =
            Model::for_micro_batches_with(backend, config, micro_batch, seq_len, lora, recompute, state)
                .with_context(|| format!("building the model of checkpoint {}", self.dir.display()))?;
        model
            .take_params(params)
            .with_context(|| format!("loading the weights of {}", self.dir.display()))?;
        Ok(model)
    }

    /// An inference-only model (no master weights, gradients or moments) for batches of up to
    /// `max_tokens` tokens, holding the checkpoint's weights.
    pub fn inference_model<B: Backend>(&self, backend: B, max_tokens: usize) -> Result<Model<B>> {
        self.build_and_load(|config| Model::new_inference(backend, config, max_tokens))
    }

    /// An inference-only model for generation: prompts are fed in chunks of at most 512 tokens
    /// (or the model's max_seq_len when shorter).
    pub fn generation_model<B: Backend>(&self, backend: B) -> Result<Model<B>> {
        self.inference_model(backend, self.config.max_seq_len.min(512))
    }

    /// The model `build` makes from the checkpoint's config, with the checkpoint's weights.
    fn build_and_load<B: Backend>(
        &self,
        build: impl FnOnce(ModelConfig) -> Result<Model<B>>,
    ) -> Result<Model<B>> {
        // The weights first: a config that does not describe them fails on their shapes before
        // a model of its sizes is allocated.
        let params = self.read_params()?;
        let mut model = build(self.config.clone())
            .with_context(|| format!("building the model of checkpoint {}", self.dir.display()))?;
        model
            .take_params(params)
            .with_context(|| format!("loading the weights of {}", self.dir.display()))?;
        Ok(model)
    }
}

/// [`Checkpoint::load_weights_into`] of the checkpoint in `dir`.
pub fn load_weights_into<B: Backend>(dir: &Path, model: &mut Model<B>) -> Result<()> {
    Checkpoint::open(dir)?.load_weights_into(model)
}

/// [`Checkpoint::training_model`] of the checkpoint in `dir`.
pub fn load_training_model<B: Backend>(dir: &Path, backend: B, max_tokens: usize) -> Result<Model<B>> {
    Checkpoint::open(dir)?.training_model(backend, max_tokens)
}

/// [`Checkpoint::inference_model`] of the checkpoint in `dir`.
pub fn load_inference_model<B: Backend>(dir: &Path, backend: B, max_tokens: usize) -> Result<Model<B>> {
    Checkpoint::open(dir)?.inference_model(backend, max_tokens)
}

/// [`Checkpoint::generation_model`] of the checkpoint in `dir`.
pub fn load_generation_model<B: Backend>(dir: &Path, backend: B) -> Result<Model<B>> {
    Checkpoint::open(dir)?.generation_model(backend)
}

/// The tokenizer at `explicit` when given, else the checkpoint's own `tokenizer.json`.
pub fn load_tokenizer(dir: &Path, explicit: Option<&Path>) -> Result<ChatTokenizer> {
    load_tokenizer_for(dir, explicit, &FormatChoice::default())
}

/// [`load_tokenizer`] for the chat format `choice` picks.
pub fn load_tokenizer_for(
    dir: &Path,
    explicit: Option<&Path>,
    choice: &FormatChoice,
) -> Result<ChatTokenizer> {
    let path = explicit.map_or_else(|| dir.join(TOKENIZER_FILE), Path::to_path_buf);
    let tok = ChatTokenizer::load(&path, choice)
        .with_context(|| format!("loading the tokenizer {}", path.display()))?;
    if explicit.is_some() {
        // Another tokenizer of the same size passed the vocabulary check and gave a wrong loss.
        super::import::check_weights_tokenizer(dir, &tok)?;
    }
    Ok(tok)
}

/// Loads the AdamW moments saved by [`save`] into `model`.
/// A model with LoRA adapters gets the adapters and their moments from a LoRA checkpoint.
pub fn load_optimizer_into<B: Backend>(dir: &Path, model: &mut Model<B>) -> Result<()> {
    if model.lora().is_some() {
        return super::peft::load_run_state(dir, model);
    }
    let path = dir.join(OPTIMIZER_FILE);
    // The moments are resumed in the state type they were saved in, never converted: a
    // conversion would make the resumed run differ from the uninterrupted one.
    let want = match model.optimizer_state() {
        StateDtype::F32 => "F32",
        StateDtype::Bf16 => "BF16",
    };
    if let Some((name, dtype)) = tensor_dtypes(&path)?.into_iter().find(|(_, d)| d != want) {
        let saved = if dtype == "BF16" { "bf16" } else { "f32" };
        bail!(
            "{}: tensor {name} is {dtype}, but this run keeps its AdamW moments in {} (optimizer_state); \
             the checkpoint was saved with optimizer_state {saved}: resume with --optimizer-state {saved}",
            path.display(),
            model.optimizer_state()
        );
    }
    let params: Vec<(String, Vec<usize>)> =
        param_specs(model.config()).into_iter().map(|s| (s.name, s.shape)).collect();
    let mut expected: Vec<(String, Vec<usize>)> =
        params.iter().map(|(n, s)| (format!("m.{n}"), s.clone())).collect();
    expected.extend(params.iter().map(|(n, s)| (format!("v.{n}"), s.clone())));
    let mut tensors = read_safetensors(&path, &expected)?;
    let v = tensors.split_off(params.len());
    check_second_moments(&path, &v)?;
    let strip = |ts: Vec<NamedTensor>| -> Vec<NamedTensor> {
        ts.into_iter().map(|t| NamedTensor { name: t.name[2..].to_string(), ..t }).collect()
    };
    model
        .write_optimizer_state(&strip(tensors), &strip(v))
        .with_context(|| format!("loading {}", path.display()))
}

/// AdamW's second moments are running means of squares: a negative one (a flipped sign bit) would
/// make the update's square root NaN a step later, far from the file.
pub(crate) fn check_second_moments(path: &Path, v: &[NamedTensor]) -> Result<()> {
    for t in v {
        if let Some(i) = t.data.iter().position(|&x| x < 0.0) {
            bail!(
                "{}: tensor {} holds {} at index {i}: a second moment (a mean of squares) cannot be negative",
                path.display(),
                t.name,
                t.data[i]
            );
        }
    }
    Ok(())
}

/// The field of `trainer_state.json` that ties the state to the checkpoint's safetensors files:
/// file name → digest of the tensor checksums in its header.
const FILES_FIELD: &str = "checkpoint_files";

/// The digest of each safetensors file in the checkpoint directory `dir`, by file name.
fn checkpoint_files(dir: &Path) -> Result<BTreeMap<String, String>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") {
            if let Some(digest) = recorded_digest(&dir.join(&name))? {
                files.insert(name, digest);
            }
        }
    }
    Ok(files)
}

/// Checks the safetensors files of the checkpoint `dir` against the digests its state `path`
/// records: each tensor's checksum catches changed bytes, but a whole file copied in from
/// another checkpoint (step 1000's weights beside step 2000's moments) carries valid checksums
/// of its own.
fn check_checkpoint_files(dir: &Path, path: &Path, recorded: &serde_json::Value) -> Result<()> {
    let recorded = recorded.as_object().with_context(|| {
        format!("{}: field \"{FILES_FIELD}\" is not a map of file names to digests", path.display())
    })?;
    for (name, digest) in recorded {
        ensure!(
            name.ends_with(".safetensors") && !name.contains(['/', '\\']),
            "{}: field \"{FILES_FIELD}\" lists {name:?}, not a safetensors file of the checkpoint",
            path.display()
        );
        let file = dir.join(name);
        ensure!(file.is_file(), "{}: missing ({} lists it)", file.display(), path.display());
        let digest = digest.as_str().with_context(|| {
            format!("{}: field \"{FILES_FIELD}\" holds {digest} for {name}, not a digest", path.display())
        })?;
        ensure!(
            recorded_digest(&file)?.as_deref() == Some(digest),
            "{}: not the file this checkpoint was saved with (its tensors' checksums are not those {} \
             records): a file copied in from another checkpoint? Restore the checkpoint's own file",
            file.display(),
            path.display()
        );
    }
    Ok(())
}

/// The last field of `trainer_state.json`: the checksum of the file's text without it.
const STATE_CHECKSUM_FIELD: &str = "state_checksum";

/// The last line of `trainer_state.json`, after its other fields, when their text has `sum`.
fn state_checksum_tail(sum: &str) -> String {
    format!(",\n  \"{STATE_CHECKSUM_FIELD}\": \"{sum}\"\n}}\n")
}

/// `trainer_state.json`'s text: `json` pretty-printed, then the checksum of that text as its
/// last field. The checksum is of the bytes, not of the parsed values, so that a float's
/// parse and print need not round-trip for a saved state to check.
fn state_text(json: &serde_json::Value) -> Result<String> {
    let body = serde_json::to_string_pretty(json)?;
    let open = body.strip_suffix("\n}").context("the trainer state is not a JSON object with fields")?;
    Ok(format!("{open}{}", state_checksum_tail(&checksum::to_hex(checksum::of_bytes(body.as_bytes())))))
}

/// Checks `text`, read from `path`, against the checksum it ends with. A bit flipped on disk in
/// the step or the data position would otherwise resume a different run without a word; an edit
/// made on purpose is accepted once the field is deleted, as the error says.
fn check_state_checksum(path: &Path, text: &str, recorded: &serde_json::Value) -> Result<()> {
    let refused = || {
        anyhow::anyhow!(
            "{}: its text is not what was saved (the \"{STATE_CHECKSUM_FIELD}\" it records does not \
             match): a disk or copy error, or an edit. If you edited it on purpose, delete the \
             \"{STATE_CHECKSUM_FIELD}\" field to accept the edit",
            path.display()
        )
    };
    let sum = recorded.as_str().ok_or_else(refused)?;
    let open = text.strip_suffix(&state_checksum_tail(sum)).ok_or_else(refused)?;
    let body = format!("{open}\n}}");
    ensure!(checksum::to_hex(checksum::of_bytes(body.as_bytes())) == sum, refused());
    Ok(())
}

/// The trainer state [`save`] wrote into the checkpoint `dir`, after checking its text against
/// its checksum and the checkpoint's safetensors files against the ones saved with it (states
/// saved before either record existed are read as they are).
pub fn load_run_state<S: DeserializeOwned>(dir: &Path) -> Result<S> {
    let path = dir.join(TRAINER_STATE_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    if let Some(sum) = json.as_object_mut().and_then(|fields| fields.remove(STATE_CHECKSUM_FIELD)) {
        check_state_checksum(&path, &text, &sum)?;
    }
    if let Some(files) = json.as_object_mut().and_then(|fields| fields.remove(FILES_FIELD)) {
        check_checkpoint_files(dir, &path, &files)?;
    }
    serde_json::from_value(json).with_context(|| format!("parsing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trainer_state_is_checked_against_the_checksum_it_ends_with() {
        let out = tempfile::tempdir().unwrap();
        let state =
            serde_json::json!({"step": 7, "lr": 0.1 + 0.2, "loss": 1.0e-7_f64.sqrt(), "seed": u64::MAX});
        let dir = save_with(out.path(), 7, &state, 0, |_| Ok(())).unwrap();
        let path = dir.join(TRAINER_STATE_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with("\"\n}\n") && text.contains("\n  \"state_checksum\": \""), "{text}");
        assert_eq!(load_run_state::<serde_json::Value>(&dir).unwrap(), state);

        // One digit changed: refused, naming the file and the way to accept an edit.
        std::fs::write(&path, text.replacen("\"step\": 7", "\"step\": 8", 1)).unwrap();
        let err = format!("{:#}", load_run_state::<serde_json::Value>(&dir).unwrap_err());
        assert!(
            err.contains(TRAINER_STATE_FILE) && err.contains("delete the \"state_checksum\" field"),
            "{err}"
        );
        // Reformatted with the same values: still not the saved text.
        let reformatted: serde_json::Value = serde_json::from_str(&text).unwrap();
        std::fs::write(&path, reformatted.to_string()).unwrap();
        assert!(load_run_state::<serde_json::Value>(&dir).is_err());
        // Without the field (an edit accepted, or a state saved before it existed): read as it is.
        let mut edited = reformatted;
        edited.as_object_mut().unwrap().remove("state_checksum");
        edited["step"] = 8.into();
        std::fs::write(&path, edited.to_string()).unwrap();
        assert_eq!(load_run_state::<serde_json::Value>(&dir).unwrap()["step"], 8);
    }

    #[test]
    fn latest_pointer_must_name_an_existing_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(latest(dir.path()).unwrap(), None);
        std::fs::write(dir.path().join(LATEST_FILE), "step-3\n").unwrap();
        let err = latest(dir.path()).unwrap_err().to_string();
        assert!(err.contains("step-3, which does not exist"), "{err}");
        std::fs::create_dir(dir.path().join("step-3")).unwrap();
        std::fs::create_dir(dir.path().join("step-4.tmp")).unwrap();
        assert_eq!(latest(dir.path()).unwrap(), Some(dir.path().join("step-3")));
        let listed: Vec<u64> = list_checkpoints(dir.path()).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(listed, vec![3]);
    }
}
