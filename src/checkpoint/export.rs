//! `sft export`: a checkpoint → the directory users ship and serving tools load as it is.
//!
//! ```text
//! out/
//!   model.safetensors        Hugging Face Llama names, bf16 (or f32), metadata {"format": "pt"}
//!   config.json              LlamaForCausalLM fields, torch_dtype, bos/eos/pad ids, our "sft" section
//!   tokenizer.json           the trained tokenizer (with the ByteLevel decoder SimpleLLaMA's lacks)
//!   tokenizer_config.json    the chat template that was trained, special-token strings
//!   special_tokens_map.json
//!   generation_config.json   the stop token and sft's sampling defaults
//! ```
//!
//! For SimpleLLaMA's format the chat template is [`simplellama_jinja`], which renders exactly
//! what sft's formatter produces. The directory is written beside `out` and renamed into place.

use std::path::{Path, PathBuf};

use ::safetensors::Dtype;
use anyhow::{anyhow, bail, ensure, Context, Result};
use clap::Args;
use serde_json::{json, Map, Value};

use super::fsync::{fsync_dir, write_file_synced};
use super::hf_config::{hf_config_json, token_ids_from_tokenizer_json};
use super::safetensors::write_as;
use super::{to_hf, Checkpoint, CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE};
use crate::data::format::{simplellama_jinja, SOS, UNK};
use crate::data::template::{tokenizer_config_json, ChatFormatArgs, TOKENIZER_CONFIG_FILE};
use crate::data::ChatTokenizer;
use crate::generate::SamplingConfig;
use crate::lock::{sibling, DirLock};

/// The weight dtype of an export.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum ExportDtype {
    /// bfloat16: half the size; what the model trains in on the GPU.
    #[default]
    Bf16,
    /// float32: the master weights exactly.
    F32,
}

impl ExportDtype {
    fn torch_dtype(self) -> &'static str {
        match self {
            ExportDtype::Bf16 => "bfloat16",
            ExportDtype::F32 => "float32",
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct ExportArgs {
    /// A checkpoint directory (a run's step-N/, or one written by init/import).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The directory to create.
    #[arg(long)]
    pub out: PathBuf,
    /// The weights' storage type.
    #[arg(long, value_enum, default_value = "bf16")]
    pub dtype: ExportDtype,
    /// Default: the checkpoint's tokenizer.json (and its tokenizer_config.json).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[command(flatten)]
    pub chat: ChatFormatArgs,
}

/// What an export wrote.
#[derive(Clone, Debug)]
pub struct ExportReport {
    pub parameters: usize,
    pub bytes: u64,
    pub chat_format: crate::data::ChatFormat,
}

/// `sft export`.
pub fn export(args: ExportArgs) -> Result<()> {
    let report = export_checkpoint(&args)?;
    println!(
        "exported {} ({} parameters, {}, {:.1} MB of weights, {:?} chat template) to {}",
        args.checkpoint.display(),
        report.parameters,
        args.dtype.torch_dtype(),
        report.bytes as f64 / 1e6,
        report.chat_format,
        args.out.display()
    );
    Ok(())
}

fn token_string(tok: &ChatTokenizer, id: u32) -> Result<String> {
    tok.inner().id_to_token(id).ok_or_else(|| anyhow!("token id {id} is not in the tokenizer"))
}

/// Writes the export of `args.checkpoint` into `args.out` (which must not exist).
pub fn export_checkpoint(args: &ExportArgs) -> Result<ExportReport> {
    let out = &args.out;
    // Held until the rename (as the checkpoint writers do): another export into `out` would
    // otherwise take this one's temporary directory for a crash's leftovers and remove it.
    let _lock =
        DirLock::acquire(sibling(out, "write-lock")?, &format!("--out {}", out.display()), "sft export")?;
    ensure!(!out.exists(), "{} already exists: choose a new directory", out.display());
    let ckpt = Checkpoint::open(&args.checkpoint)?;
    let config = ckpt.config().clone();
    let tok_path = args.tokenizer.clone().unwrap_or_else(|| args.checkpoint.join(TOKENIZER_FILE));
    let tok = ChatTokenizer::load(&tok_path, &args.chat.choice())
        .with_context(|| format!("loading the tokenizer {}", tok_path.display()))?;
    ensure!(
        tok.vocab_size() <= config.vocab_size,
        "{}: {} tokens, but the model's vocabulary holds {}",
        tok_path.display(),
        tok.vocab_size(),
        config.vocab_size
    );
    let params = ckpt.read_params()?;
    let hf = to_hf(&config, params);
    if args.dtype == ExportDtype::Bf16 {
        // Round to nearest even carries f32 values past bf16's largest finite (about 3.39e38)
        // to infinity: a file every loader (ours included) would refuse or compute NaN from.
        for t in &hf {
            if let Some(i) =
                t.data.iter().position(|&x| x.is_finite() && half::bf16::from_f32(x).is_infinite())
            {
                bail!(
                    "{}: tensor {} holds {:e} at index {i}, past the largest bfloat16 (it would round to \
                     infinity): export with --dtype f32, or fix the weights",
                    args.checkpoint.display(),
                    t.name,
                    t.data[i]
                );
            }
        }
    }

    let tmp = sibling(out, "export-tmp")?;
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing stale {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;

    // Weights.
    let model_path = tmp.join(MODEL_FILE);
    let dtype = match args.dtype {
        ExportDtype::Bf16 => Dtype::BF16,
        ExportDtype::F32 => Dtype::F32,
    };
    write_as(&model_path, &hf, dtype)?;
    let bytes = std::fs::metadata(&model_path)?.len();

    // Tokenizer: serialized from the loaded one, so a decoder added at load is kept.
    let tok_json = tok.inner().to_string(true).map_err(|e| anyhow!("serializing the tokenizer: {e}"))?;
    write_file_synced(&tmp.join(TOKENIZER_FILE), tok_json.as_bytes())?;

    // Special tokens: the stop token is the end of a reply (<EOA>, or the template's eos_token).
    let eos = token_string(&tok, tok.eoa_id())?;
    let pad = token_string(&tok, tok.pad_id())?;
    let mut specials = Map::new();
    let mut tok_config = match tok.template() {
        Some(tpl) => {
            let original = tok_path.with_file_name(TOKENIZER_CONFIG_FILE);
            let mut c = tokenizer_config_json(tpl, Some(&original))?;
            for (k, v) in tpl.tokens() {
                specials.insert(k.clone(), Value::String(v.clone()));
            }
            c.entry("tokenizer_class").or_insert_with(|| json!("PreTrainedTokenizerFast"));
            c
        }
        None => {
            for (k, v) in [("bos_token", SOS), ("unk_token", UNK)] {
                if tok.special_id(v).is_some() {
                    specials.insert(k.into(), json!(v));
                }
            }
            let mut c = Map::new();
            c.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
            c.insert("chat_template".into(), json!(simplellama_jinja(tok.escaped_strings())));
            c.insert("clean_up_tokenization_spaces".into(), json!(false));
            c
        }
    };
    specials.insert("eos_token".into(), json!(eos));
    specials.insert("pad_token".into(), json!(pad));
    for (k, v) in &specials {
        tok_config.insert(k.clone(), v.clone());
    }
    tok_config.insert("model_max_length".into(), json!(config.max_seq_len));
    write_file_synced(
        &tmp.join(TOKENIZER_CONFIG_FILE),
        serde_json::to_string_pretty(&tok_config)?.as_bytes(),
    )?;
    write_file_synced(
        &tmp.join("special_tokens_map.json"),
        serde_json::to_string_pretty(&Value::Object(specials))?.as_bytes(),
    )?;

    // config.json: the checkpoint's fields, its dtype, and the token ids the export uses.
    let mut hf_config = hf_config_json(&config);
    let obj = hf_config.as_object_mut().expect("hf_config_json is an object");
    obj.extend(token_ids_from_tokenizer_json(&tok_json));
    obj.insert("torch_dtype".into(), json!(args.dtype.torch_dtype()));
    obj.insert("eos_token_id".into(), json!(tok.eoa_id()));
    obj.insert("pad_token_id".into(), json!(tok.pad_id()));
    if let Some(bos) =
        tok.template().and_then(|t| t.token("bos_token")).and_then(|b| tok.inner().token_to_id(b))
    {
        obj.insert("bos_token_id".into(), json!(bos));
    }
    let bos_id = obj.get("bos_token_id").cloned();
    write_file_synced(&tmp.join(CONFIG_FILE), serde_json::to_string_pretty(&hf_config)?.as_bytes())?;

    // generation_config.json: stop at the end of a reply; sft's sampling defaults.
    let sampling = SamplingConfig::default();
    let mut generation = json!({
        "eos_token_id": tok.eoa_id(),
        "pad_token_id": tok.pad_id(),
        "do_sample": true,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "max_new_tokens": sampling.max_new_tokens,
    });
    if let Some(bos) = bos_id {
        generation["bos_token_id"] = bos;
    }
    write_file_synced(
        &tmp.join("generation_config.json"),
        serde_json::to_string_pretty(&generation)?.as_bytes(),
    )?;

    fsync_dir(&tmp)?;
    std::fs::rename(&tmp, out).with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
    fsync_dir(out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))?;
    Ok(ExportReport {
        parameters: hf.iter().map(|t| t.data.len()).sum(),
        bytes,
        chat_format: tok.chat_format(),
    })
}
