//! Checkpoints: one directory per save, written so that a crash never leaves a broken one.
//!
//! ```text
//! out_dir/
//!   latest                 "step-1200": the checkpoint to resume from (replaced atomically)
//!   step-1200/
//!     model.safetensors      weights, Hugging Face Llama names and layouts, f32
//!     config.json            LlamaForCausalLM fields, plus "sft": our exact ModelConfig
//!     tokenizer.json         a copy of the tokenizer the model was trained with
//!     optimizer.safetensors  AdamW moments "m.<name>", "v.<name>" (internal names, f32)
//!     trainer_state.json     step, epoch, data position, RNG, schedule, the TrainConfig
//! ```
//! A save writes `step-N.tmp/`, fsyncs every file and the directory, renames it to `step-N/`,
//! and only then points `latest` at it (temp file + rename). A kill at any moment leaves `latest`
//! naming a complete checkpoint; leftover `*.tmp` directories are never read. The weights on
//! disk are the f32 master weights, so resuming reproduces the run bit for bit.

use crate::backend::Backend;
use crate::data::tokenizer::leading_special;
use crate::data::{ChatTokenizer, LoaderState};
use crate::model::config::ModelConfig;
use crate::model::params::{from_hf, param_specs, to_hf, to_hf_names, NamedTensor};
use crate::model::Model;
use crate::rng::Rng;
use crate::train::config::TrainConfig;
use crate::train::schedule::Schedule;
use anyhow::{bail, ensure, Context, Result};
use safetensors::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const MODEL_FILE: &str = "model.safetensors";
/// The index of a sharded Hugging Face checkpoint: `{"weight_map": {tensor: shard file}}`.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const CONFIG_FILE: &str = "config.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
pub const LATEST_FILE: &str = "latest";

/// Where a training run stands, saved beside the weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: u64,
    pub epoch: u64,
    /// The data position of the next micro-batch.
    pub loader: LoaderState,
    /// The dropout stream. It is counter-based: the seed of micro-batch `m` of step `s` is a
    /// pure function of this stream, `s` and `m`, so the stream itself never advances.
    pub rng: Rng,
    /// Non-pad input tokens and supervised targets processed so far.
    pub tokens_seen: u64,
    pub supervised_tokens_seen: u64,
    /// Micro-batches skipped because none of their targets was supervised.
    pub skipped_batches: u64,
    /// Wall-clock seconds of training so far (the log's time column continues from here).
    pub elapsed_s: f64,
    pub schedule: Schedule,
    /// The learning rate of the last step.
    pub lr: f64,
    pub last_train_loss: Option<f64>,
    pub last_val_loss: Option<f64>,
    pub config: TrainConfig,
}

// ---- safetensors --------------------------------------------------------------------------

/// Lets `safetensors::serialize_to_file` stream one tensor at a time.
struct F32View<'a> {
    shape: &'a [usize],
    data: &'a [f32],
}

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.data.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.data.len() * 4
    }
}

/// Writes tensors as f32 safetensors and fsyncs the file.
pub fn write_safetensors(path: &Path, tensors: &[NamedTensor]) -> Result<()> {
    for t in tensors {
        ensure!(
            t.shape.iter().product::<usize>() == t.data.len(),
            "tensor {} has {} values for shape {:?}",
            t.name,
            t.data.len(),
            t.shape
        );
    }
    let views = tensors.iter().map(|t| (t.name.as_str(), F32View { shape: &t.shape, data: &t.data }));
    safetensors::serialize_to_file(views, None, path)
        .with_context(|| format!("writing {}", path.display()))?;
    fsync_file(path)
}

/// Reads exactly the tensors named in `expected` (name, shape) from a safetensors file, as f32
/// (F32, BF16 and F16 files are accepted). Missing, misshapen or unexpected tensors are errors
/// that name the file and the tensor.
pub fn read_safetensors(path: &Path, expected: &[(String, Vec<usize>)]) -> Result<Vec<NamedTensor>> {
    let mapped = map_file(path)?;
    let st = parse_safetensors(path, &mapped.map)?;
    let wanted: HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let mut unexpected: Vec<&str> = st.names().into_iter().filter(|n| !wanted.contains(n)).collect();
    unexpected.sort_unstable();
    if let Some(name) = unexpected.first() {
        bail!(
            "{}: unexpected tensor {name} ({} unexpected in all): does the config match the weights?",
            path.display(),
            unexpected.len()
        );
    }
    expected.iter().map(|(name, shape)| tensor_f32(path, &mapped, &st, name, shape)).collect()
}

/// A safetensors file, memory-mapped for its header and index. Tensor data is read with
/// `pread` instead of through the mapping (see [`tensor_f32`]).
struct MappedFile {
    file: File,
    map: memmap2::Mmap,
}

fn map_file(path: &Path) -> Result<MappedFile> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: the file is only read; a checkpoint is not modified while it is loaded.
    let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
    Ok(MappedFile { file, map })
}

fn parse_safetensors<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e:?}", path.display()))
}

/// One tensor of `st` (the file `path`) as f32, checked against `shape`.
///
/// The bytes are read from the file rather than through the mapping: touched mapped pages count
/// toward the process's resident memory until unmapped, so a 5 GB checkpoint would be held
/// twice (mapped bytes and f32 copies) while loading.
fn tensor_f32(
    path: &Path,
    file: &MappedFile,
    st: &SafeTensors,
    name: &str,
    shape: &[usize],
) -> Result<NamedTensor> {
    let view =
        st.tensor(name).map_err(|_| anyhow::anyhow!("{}: tensor {name} is missing", path.display()))?;
    ensure!(
        view.shape() == shape,
        "{}: tensor {name} has shape {:?}, expected {:?}",
        path.display(),
        view.shape(),
        shape
    );
    // `data()` is a slice of the mapping; only its address is used, no page is touched.
    let offset = view.data().as_ptr() as usize - file.map.as_ptr() as usize;
    let mut bytes = vec![0u8; view.data_len()];
    std::os::unix::fs::FileExt::read_exact_at(&file.file, &mut bytes, offset as u64)
        .with_context(|| format!("{}: reading tensor {name}", path.display()))?;
    let data: Vec<f32> = match view.dtype() {
        Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::BF16 => {
            bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
        }
        Dtype::F16 => {
            bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
        }
        other => bail!("{}: tensor {name} has dtype {other:?}; expected F32, BF16 or F16", path.display()),
    };
    Ok(NamedTensor { name: name.to_string(), shape: shape.to_vec(), data })
}

/// Tensors a Hugging Face checkpoint may hold that carry no weights we need: old transformers
/// saved each layer's RoPE inverse frequencies, which follow from rope_theta.
fn ignorable_hf_tensor(name: &str) -> bool {
    name.ends_with(".rotary_emb.inv_freq")
}

/// Reads the Hugging Face tensors of `config` from a checkpoint directory: `model.safetensors`,
/// or the shards listed in `model.safetensors.index.json`. Each file is memory-mapped and its
/// tensors converted to f32 (F32, BF16 or F16 on disk). A tied config also returns
/// `lm_head.weight` when the files hold one (for [`from_hf`] to check it equals the embedding).
/// Every missing, misshapen or unexpected tensor, missing shard or malformed index is an error
/// naming the file and the tensor or field.
pub fn read_hf_weights(dir: &Path, config: &ModelConfig) -> Result<Vec<NamedTensor>> {
    let expected = hf_shapes(config);
    let tied_head: Option<(String, Vec<usize>)> = config
        .tie_embeddings
        .then(|| ("lm_head.weight".to_string(), vec![config.vocab_size, config.d_model]));
    let known: HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let allowed = |name: &str| {
        known.contains(name)
            || tied_head.as_ref().is_some_and(|(n, _)| n == name)
            || ignorable_hf_tensor(name)
    };
    let index_path = dir.join(INDEX_FILE);
    let single = dir.join(MODEL_FILE);
    if !index_path.exists() {
        ensure!(
            single.exists(),
            "{}: no {MODEL_FILE} and no {INDEX_FILE}: not a checkpoint directory",
            dir.display()
        );
        let mapped = map_file(&single)?;
        let st = parse_safetensors(&single, &mapped.map)?;
        let names = st.names();
        let mut unexpected: Vec<&str> = names.iter().copied().filter(|n| !allowed(n)).collect();
        unexpected.sort_unstable();
        if let Some(name) = unexpected.first() {
            bail!(
                "{}: unexpected tensor {name} ({} unexpected in all): does the config match the weights?",
                single.display(),
                unexpected.len()
            );
        }
        let mut out: Vec<NamedTensor> = expected
            .iter()
            .map(|(name, shape)| tensor_f32(&single, &mapped, &st, name, shape))
            .collect::<Result<_>>()?;
        if let Some((name, shape)) = &tied_head {
            if names.contains(&name.as_str()) {
                out.push(tensor_f32(&single, &mapped, &st, name, shape)?);
            }
        }
        return Ok(out);
    }

    // Sharded: the index maps each tensor name to the file that holds it.
    let text =
        std::fs::read_to_string(&index_path).with_context(|| format!("reading {}", index_path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", index_path.display()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{}: missing object field \"weight_map\"", index_path.display()))?;
    let mut by_file: BTreeMap<String, Vec<(String, Vec<usize>)>> = BTreeMap::new();
    for (name, file) in map {
        let file = file
            .as_str()
            .with_context(|| format!("{}: weight_map[{name:?}] is not a file name", index_path.display()))?;
        ensure!(
            !file.is_empty() && !file.contains('/') && !file.contains('\\') && file != ".." && file != ".",
            "{}: weight_map[{name:?}] = {file:?} is not a file name in the checkpoint directory",
            index_path.display()
        );
        ensure!(
            allowed(name),
            "{}: unexpected tensor {name} in weight_map: does the config match the weights?",
            index_path.display()
        );
        if ignorable_hf_tensor(name) {
            continue;
        }
        let shape = if known.contains(name.as_str()) {
            expected.iter().find(|(n, _)| n == name).map(|(_, s)| s.clone()).unwrap_or_default()
        } else {
            tied_head.as_ref().map(|(_, s)| s.clone()).unwrap_or_default()
        };
        by_file.entry(file.to_string()).or_default().push((name.clone(), shape));
    }
    for (name, _) in &expected {
        ensure!(map.contains_key(name), "{}: tensor {name} is missing from weight_map", index_path.display());
    }
    let mut read: HashMap<String, NamedTensor> = HashMap::with_capacity(map.len());
    for (file, tensors) in &by_file {
        let path = dir.join(file);
        ensure!(
            path.is_file(),
            "{}: shard {} (holding {}) is missing",
            index_path.display(),
            path.display(),
            tensors[0].0
        );
        let mapped = map_file(&path)?;
        let st = parse_safetensors(&path, &mapped.map)?;
        for (name, shape) in tensors {
            read.insert(name.clone(), tensor_f32(&path, &mapped, &st, name, shape)?);
        }
    }
    let mut out: Vec<NamedTensor> =
        expected.iter().map(|(name, _)| read.remove(name).expect("every expected tensor was read")).collect();
    if let Some((name, _)) = &tied_head {
        out.extend(read.remove(name));
    }
    Ok(out)
}

/// The internal tensors of a checkpoint directory (ours or a Hugging Face Llama) for `config`.
pub fn read_params(dir: &Path, config: &ModelConfig) -> Result<Vec<NamedTensor>> {
    let hf = read_hf_weights(dir, config)?;
    from_hf(config, hf).with_context(|| format!("converting the weights of {}", dir.display()))
}

/// The Hugging Face tensors of `config`, (name, shape) in [`to_hf`]'s order.
pub fn hf_shapes(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let heads = config.heads();
    let (d, hidden, vocab) = (config.d_model, config.ffn_hidden, config.vocab_size);
    to_hf_names(config)
        .into_iter()
        .map(|name| {
            let shape = match name.rsplit('.').nth(1).unwrap_or_default() {
                "embed_tokens" | "lm_head" => vec![vocab, d],
                "q_proj" => vec![heads.q_width(), d],
                "k_proj" | "v_proj" => vec![heads.kv_width(), d],
                "o_proj" => vec![d, heads.q_width()],
                "gate_proj" | "up_proj" => vec![hidden, d],
                "down_proj" => vec![d, hidden],
                _ => vec![d], // the norms
            };
            (name, shape)
        })
        .collect()
}

// ---- config.json ----------------------------------------------------------------------------

/// `config.json`: the fields Hugging Face's `LlamaForCausalLM` reads, and ours under `"sft"`.
pub fn hf_config_json(config: &ModelConfig) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim(),
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": false,
        "mlp_bias": false,
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
        "sft": config,
        QK_ORDER_FIELD: QK_ORDER_HF,
    })
}

/// Marks the files whose q/k rows are in Hugging Face's order whatever the RoPE style. Builds
/// before it wrote adjacent-pairs q/k rows unpermuted; without the mark such a file would load
/// as a different model, so it is refused instead.
pub const QK_ORDER_FIELD: &str = "sft_qk_order";
pub const QK_ORDER_HF: &str = "hf";

/// Reads a checkpoint's model config: our `"sft"` section when present, else the Hugging Face
/// Llama fields (a checkpoint from elsewhere: half-split RoPE, no dropout). Llama variants this
/// engine cannot run (length-dependent RoPE scaling, biases, a `head_dim` other than hidden_size / heads, another
/// activation) are errors naming the file and the field.
pub fn read_model_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    if let Some(sft) = json.get("sft") {
        let config: ModelConfig = serde_json::from_value(sft.clone())
            .with_context(|| format!("{}: bad \"sft\" model config", path.display()))?;
        let marked = json.get(QK_ORDER_FIELD).and_then(|v| v.as_str()) == Some(QK_ORDER_HF);
        ensure!(
            marked || config.rope_style != crate::backend::RopeStyle::AdjacentPairs,
            "{}: an adjacent-pairs checkpoint without \"{QK_ORDER_FIELD}\": \"{QK_ORDER_HF}\" was written by an \
             older sft build, whose q/k rows are not in Hugging Face's order; re-create it (sft init, or \
             scripts/convert_simplellama.py), or permute q_proj/k_proj per head (docs/checkpoints.md) and add the field",
            path.display()
        );
        return Ok(config);
    }
    hf_model_config(&json).with_context(|| format!("{}: unusable model config", path.display()))
}

/// A [`ModelConfig`] from the fields of a transformers `LlamaConfig`.
fn hf_model_config(json: &serde_json::Value) -> Result<ModelConfig> {
    let present = |name: &str| json.get(name).filter(|v| !v.is_null());
    let field = |name: &str| -> Result<usize> {
        let v = present(name).with_context(|| format!("missing field {name:?}"))?;
        v.as_u64()
            .map(|v| v as usize)
            .with_context(|| format!("field {name:?} = {v} is not a non-negative integer"))
    };
    let float = |name: &str, default: f64| -> Result<f64> {
        match present(name) {
            None => Ok(default),
            Some(v) => v.as_f64().with_context(|| format!("field {name:?} = {v} is not a number")),
        }
    };
    let flag = |name: &str| -> Result<bool> {
        match present(name) {
            None => Ok(false),
            Some(v) => v.as_bool().with_context(|| format!("field {name:?} = {v} is not a boolean")),
        }
    };
    if let Some(t) = present("model_type") {
        ensure!(t == "llama", "field \"model_type\" is {t}; only \"llama\" (LlamaForCausalLM) is supported");
    }
    for name in ["attention_bias", "mlp_bias"] {
        ensure!(!flag(name)?, "field {name:?} is true: biased projections are not supported");
    }
    if let Some(act) = present("hidden_act") {
        ensure!(act == "silu", "field \"hidden_act\" is {act}; only \"silu\" (SwiGLU) is supported");
    }
    let rope = hf_rope(json)?;
    let n_heads = field("num_attention_heads")?;
    let d_model = field("hidden_size")?;
    ensure!(n_heads > 0, "field \"num_attention_heads\" must be positive");
    if present("head_dim").is_some() {
        let head_dim = field("head_dim")?;
        ensure!(
            head_dim * n_heads == d_model,
            "field \"head_dim\" = {head_dim} differs from hidden_size / num_attention_heads = {d_model} / \
             {n_heads}: not supported"
        );
    }
    let config = ModelConfig {
        vocab_size: field("vocab_size")?,
        d_model,
        n_layers: field("num_hidden_layers")?,
        n_heads,
        n_kv_heads: if present("num_key_value_heads").is_some() {
            field("num_key_value_heads")?
        } else {
            n_heads
        },
        ffn_hidden: field("intermediate_size")?,
        // transformers' LlamaConfig defaults.
        norm_eps: float("rms_norm_eps", 1e-6)? as f32,
        rope_theta: rope.theta,
        rope_style: crate::backend::RopeStyle::HalfSplit,
        rope_scaling: rope.scaling,
        max_seq_len: if present("max_position_embeddings").is_some() {
            field("max_position_embeddings")?
        } else {
            2048
        },
        tie_embeddings: flag("tie_word_embeddings")?,
        dropout: 0.0,
    };
    config.validate()?;
    Ok(config)
}

/// RoPE base and scaling from a Llama config.json: transformers 4 writes `rope_theta` and
/// `rope_scaling` at the top level, transformers 5 a `rope_parameters` dict holding both (and
/// reads either). Types whose frequencies depend on the running length (dynamic, yarn,
/// longrope) or that rotate part of a head are refused.
fn hf_rope(json: &serde_json::Value) -> Result<crate::backend::Rope> {
    use crate::backend::{Rope, RopeScaling, RopeStyle};
    let present = |v: &serde_json::Value, name: &str| v.get(name).filter(|v| !v.is_null()).cloned();
    let number = |v: &serde_json::Value, name: &str, default: Option<f64>| -> Result<f64> {
        match v.get(name).filter(|v| !v.is_null()) {
            None => default.with_context(|| format!("missing field {name:?}")),
            Some(x) => x.as_f64().with_context(|| format!("field {name:?} = {x} is not a number")),
        }
    };
    let (params, section) = match (present(json, "rope_parameters"), present(json, "rope_scaling")) {
        (Some(p), _) => (p, "rope_parameters"),
        (None, Some(p)) => (p, "rope_scaling"),
        (None, None) => (serde_json::json!({}), "rope_scaling"),
    };
    ensure!(params.is_object(), "field {section:?} = {params} is not an object");
    let top_theta = number(json, "rope_theta", Some(10000.0))?;
    let theta = number(&params, "rope_theta", Some(top_theta)).with_context(|| format!("in {section:?}"))?;
    for v in [json, &params] {
        let partial = number(v, "partial_rotary_factor", Some(1.0))?;
        ensure!(
            partial == 1.0,
            "field \"partial_rotary_factor\" = {partial}: partial rotary embeddings are not supported"
        );
    }
    let kind = match params.get("rope_type").or_else(|| params.get("type")) {
        None => "default".to_string(),
        Some(k) => k
            .as_str()
            .with_context(|| format!("field {section:?}.rope_type = {k} is not a string"))?
            .to_string(),
    };
    let in_section = |name: &str, default: Option<f64>| -> Result<f64> {
        number(&params, name, default).with_context(|| format!("in {section:?} (rope_type {kind:?})"))
    };
    let scaling = match kind.as_str() {
        "default" => None,
        "linear" => Some(RopeScaling::Linear { factor: in_section("factor", None)? as f32 }),
        "llama3" => {
            // transformers falls back to these when original_max_position_embeddings is absent.
            let fallback = number(json, "original_max_position_embeddings", None)
                .or_else(|_| number(json, "max_position_embeddings", None))
                .ok();
            let original = in_section("original_max_position_embeddings", fallback)?;
            ensure!(
                original >= 1.0 && original.fract() == 0.0,
                "field {section:?}.original_max_position_embeddings = {original} is not a positive integer"
            );
            Some(RopeScaling::Llama3 {
                factor: in_section("factor", None)? as f32,
                low_freq_factor: in_section("low_freq_factor", None)? as f32,
                high_freq_factor: in_section("high_freq_factor", None)? as f32,
                original_max_position_embeddings: original as usize,
            })
        }
        other => bail!(
            "field {section:?} has rope_type {other:?}, which is not supported (supported: default, linear, llama3; \
             dynamic, yarn and longrope change the frequencies with the sequence length)"
        ),
    };
    Ok(Rope { theta: theta as f32, style: RopeStyle::HalfSplit, scaling })
}

/// `bos/eos/pad_token_id` for config.json from a tokenizer.json's added tokens: `<PAD>` pads,
/// `<EOA>` ends a reply (what generation stops at in our chat format), the token the
/// post-processor starts texts with, else `<SOS>` when present.
fn token_ids_from_tokenizer_json(text: &str) -> serde_json::Map<String, serde_json::Value> {
    let mut out = serde_json::Map::new();
    let Ok(json) = serde_json::from_str::<serde_json::Value>(text) else { return out };
    let Some(added) = json.get("added_tokens").and_then(|a| a.as_array()) else { return out };
    let id_of = |content: &str| {
        added
            .iter()
            .find(|t| t.get("content").and_then(|c| c.as_str()) == Some(content))
            .and_then(|t| t.get("id"))
    };
    for (field, token) in [("bos_token_id", "<SOS>"), ("eos_token_id", "<EOA>"), ("pad_token_id", "<PAD>")] {
        if let Some(id) = id_of(token) {
            out.insert(field.to_string(), id.clone());
        }
    }
    // A tokenizer that starts texts with its own BOS (Llama 3's <|begin_of_text|>): that one.
    let bos = tokenizers::Tokenizer::from_bytes(text.as_bytes()).ok().and_then(|tok| leading_special(&tok));
    if let Some(bos) = bos {
        out.insert("bos_token_id".to_string(), bos.into());
    }
    out
}

// ---- writing --------------------------------------------------------------------------------

fn fsync_file(path: &Path) -> Result<()> {
    File::open(path).and_then(|f| f.sync_all()).with_context(|| format!("syncing {}", path.display()))
}

fn fsync_dir(path: &Path) -> Result<()> {
    // Makes renames and new entries in the directory durable (POSIX).
    File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing directory {}", path.display()))
}

fn write_file_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).with_context(|| format!("writing {}", path.display()))
}

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
    params: &[NamedTensor],
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

fn optimizer_tensors<B: Backend>(model: &Model<B>) -> Result<Vec<NamedTensor>> {
    let (m, v) = model.read_optimizer_state()?;
    let prefixed = |prefix: &str, ts: Vec<NamedTensor>| {
        ts.into_iter()
            .map(move |t| NamedTensor { name: format!("{prefix}.{}", t.name), ..t })
            .collect::<Vec<_>>()
    };
    let mut all = prefixed("m", m);
    all.extend(prefixed("v", v));
    Ok(all)
}

/// Writes a weights-only checkpoint (`sft init`) from internal tensors: `dir` must not exist
/// yet. Atomic like [`save`].
pub fn save_weights(
    dir: &Path,
    config: &ModelConfig,
    params: &[NamedTensor],
    tokenizer: Option<&Path>,
) -> Result<()> {
    save_weights_with(dir, config, params, tokenizer.map(TokenizerSource::File))
}

/// [`save_weights`] with the tokenizer given as a file or as JSON text.
pub fn save_weights_with(
    dir: &Path,
    config: &ModelConfig,
    params: &[NamedTensor],
    tokenizer: Option<TokenizerSource>,
) -> Result<()> {
    ensure!(!dir.exists(), "{} already exists: choose a new directory", dir.display());
    let tmp = tmp_sibling(dir)?;
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing stale {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    write_weights(&tmp, config, params, tokenizer)?;
    fsync_dir(&tmp)?;
    std::fs::rename(&tmp, dir).with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    fsync_dir(dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))
}

fn tmp_sibling(dir: &Path) -> Result<PathBuf> {
    let name = dir.file_name().with_context(|| format!("{} has no directory name", dir.display()))?;
    Ok(dir.with_file_name(format!("{}.tmp", name.to_string_lossy())))
}

/// The directory name of the checkpoint after `step` optimizer steps.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step}")
}

/// Saves a full training checkpoint as `out_dir/step-N/` and points `latest` at it, then keeps
/// only the newest `keep` checkpoints (0 = all). Returns the checkpoint directory.
pub fn save<B: Backend>(
    out_dir: &Path,
    model: &Model<B>,
    state: &TrainerState,
    tokenizer: Option<&Path>,
    keep: usize,
) -> Result<PathBuf> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let name = step_dir_name(state.step);
    let dir = out_dir.join(&name);
    let tmp = out_dir.join(format!("{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing stale {}", tmp.display()))?;
    }
    std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    write_weights(&tmp, model.config(), &model.read_params()?, tokenizer.map(TokenizerSource::File))?;
    write_safetensors(&tmp.join(OPTIMIZER_FILE), &optimizer_tensors(model)?)?;
    write_file_synced(&tmp.join(TRAINER_STATE_FILE), serde_json::to_string_pretty(state)?.as_bytes())?;
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
    prune(out_dir, keep, state.step)?;
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

/// Loads a checkpoint's weights into `model`, checking that its config matches the model's
/// (dropout aside: that is a training choice, not part of the weights).
pub fn load_weights_into<B: Backend>(dir: &Path, model: &mut Model<B>) -> Result<()> {
    let on_disk = read_model_config(dir)?;
    let ours = model.config().clone();
    ensure!(
        ModelConfig { dropout: ours.dropout, ..on_disk.clone() } == ours,
        "{}: the checkpoint's model config {on_disk:?} differs from the model's {ours:?}",
        dir.join(CONFIG_FILE).display()
    );
    let params = read_params(dir, &ours)?;
    model.take_params(params).with_context(|| format!("loading the weights of {}", dir.display()))
}

/// Loads a checkpoint as a model sized for micro-batches of up to `max_tokens` tokens.
pub fn load_model_with<B: Backend>(dir: &Path, backend: B, max_tokens: usize) -> Result<Model<B>> {
    build_and_load(dir, |config| Model::new(backend, config, max_tokens))
}

/// The model `build` makes from the checkpoint's config, with the checkpoint's weights.
fn build_and_load<B: Backend>(
    dir: &Path,
    build: impl FnOnce(ModelConfig) -> Result<Model<B>>,
) -> Result<Model<B>> {
    let config = read_model_config(dir)?;
    let mut model =
        build(config).with_context(|| format!("building the model of checkpoint {}", dir.display()))?;
    load_weights_into(dir, &mut model)?;
    Ok(model)
}

/// The tokenizer at `explicit` when given, else the checkpoint's own `tokenizer.json`.
pub fn load_tokenizer(dir: &Path, explicit: Option<&Path>) -> Result<ChatTokenizer> {
    let path = explicit.map_or_else(|| dir.join(TOKENIZER_FILE), Path::to_path_buf);
    ChatTokenizer::from_file(&path).with_context(|| format!("loading the tokenizer {}", path.display()))
}

/// Loads a checkpoint's weights into an inference-only model (no master weights, gradients or
/// moments) for batches of up to `max_tokens` tokens.
pub fn load_inference_model<B: Backend>(dir: &Path, backend: B, max_tokens: usize) -> Result<Model<B>> {
    build_and_load(dir, |config| Model::new_inference(backend, config, max_tokens))
}

/// Loads a checkpoint for generation: inference-only, prompts fed in chunks of at most 512
/// tokens (or the model's max_seq_len when shorter).
pub fn load_model<B: Backend>(dir: &Path, backend: B) -> Result<Model<B>> {
    let config = read_model_config(dir)?;
    load_inference_model(dir, backend, config.max_seq_len.min(512))
}

/// Loads the AdamW moments saved by [`save`] into `model`.
pub fn load_optimizer_into<B: Backend>(dir: &Path, model: &mut Model<B>) -> Result<()> {
    let path = dir.join(OPTIMIZER_FILE);
    let params: Vec<(String, Vec<usize>)> =
        param_specs(model.config()).into_iter().map(|s| (s.name, s.shape)).collect();
    let mut expected: Vec<(String, Vec<usize>)> =
        params.iter().map(|(n, s)| (format!("m.{n}"), s.clone())).collect();
    expected.extend(params.iter().map(|(n, s)| (format!("v.{n}"), s.clone())));
    let mut tensors = read_safetensors(&path, &expected)?;
    let v = tensors.split_off(params.len());
    let strip = |ts: Vec<NamedTensor>| -> Vec<NamedTensor> {
        ts.into_iter().map(|t| NamedTensor { name: t.name[2..].to_string(), ..t }).collect()
    };
    model
        .write_optimizer_state(&strip(tensors), &strip(v))
        .with_context(|| format!("loading {}", path.display()))
}

pub fn load_trainer_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(TRAINER_STATE_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Names of the tensors in a safetensors file with their shapes, sorted (for inspection).
pub fn tensor_shapes(path: &Path) -> Result<BTreeMap<String, Vec<usize>>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e:?}", path.display()))?;
    Ok(st.tensors().into_iter().map(|(n, v)| (n, v.shape().to_vec())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::params::init_params;

    #[test]
    fn hf_shapes_match_the_converted_tensors() {
        for tie in [false, true] {
            let config = ModelConfig { tie_embeddings: tie, ..ModelConfig::tiny(300) };
            let hf = to_hf(&config, &init_params(&config, 1));
            let expected: Vec<(String, Vec<usize>)> =
                hf.iter().map(|t| (t.name.clone(), t.shape.clone())).collect();
            assert_eq!(hf_shapes(&config), expected);
        }
    }

    #[test]
    fn config_json_has_the_hf_fields_and_ours() {
        let dir = tempfile::tempdir().unwrap();
        let config = ModelConfig::tiny(300);
        let json = hf_config_json(&config);
        assert_eq!(json["architectures"][0], "LlamaForCausalLM");
        assert_eq!(json["num_key_value_heads"], 2);
        std::fs::write(dir.path().join(CONFIG_FILE), json.to_string()).unwrap();
        assert_eq!(read_model_config(dir.path()).unwrap(), config);
        // Without our section, the Hugging Face fields describe the model.
        let mut hf_only = json.clone();
        hf_only.as_object_mut().unwrap().remove("sft");
        std::fs::write(dir.path().join(CONFIG_FILE), hf_only.to_string()).unwrap();
        let from_hf_fields = read_model_config(dir.path()).unwrap();
        assert_eq!(
            from_hf_fields,
            ModelConfig { rope_style: crate::backend::RopeStyle::HalfSplit, dropout: 0.0, ..config }
        );
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
