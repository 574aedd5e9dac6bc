//! `sft import`: a Hugging Face Llama directory (config.json, `*.safetensors`, tokenizer.json)
//! becomes an sft checkpoint directory, optionally with the chat tokens added to its tokenizer
//! and its embedding (and untied lm_head) grown to cover them.
//!
//! A pretrained tokenizer has none of `<SOU> <EOU> <SOA> <EOA> <SOT> <EOT> <PAD>`; the chat
//! format needs each as a single special id. New rows start at the mean of the rows of the
//! tokens the tokenizer already had: a common choice that keeps the new tokens' first logits
//! and embeddings in the range of the model's real ones instead of at an arbitrary point.

use crate::checkpoint::{self, Checkpoint, TokenizerSource, TOKENIZER_FILE};
use crate::data::template::{tokenizer_config_beside, TOKENIZER_CONFIG_FILE};
use crate::data::tokenizer::{missing_chat_tokens, parse_tokenizer_json};
use crate::data::{ChatFormat, ChatTemplate, ChatTokenizer, FormatChoice};
use crate::model::config::ModelConfig;
use crate::model::params::NamedTensor;
use anyhow::{anyhow, bail, ensure, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use tokenizers::{AddedToken, Tokenizer};

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// A Hugging Face LlamaForCausalLM directory (or one of our checkpoints).
    #[arg(long)]
    pub from: PathBuf,
    /// The checkpoint directory to create.
    #[arg(long)]
    pub out: PathBuf,
    /// Add the chat tokens and `<PAD>` the tokenizer lacks as special tokens, growing the
    /// embedding (and an untied lm_head) with rows at the mean of the existing ones.
    #[arg(long)]
    pub add_chat_tokens: bool,
}

/// What an import did.
#[derive(Clone, Debug, PartialEq)]
pub struct ImportReport {
    pub config: ModelConfig,
    /// The model's vocabulary before the import.
    pub old_vocab_size: usize,
    /// Tokens added to the tokenizer, with their ids.
    pub added: Vec<(String, u32)>,
}

/// `sft import`.
pub fn import(args: ImportArgs) -> Result<()> {
    let report = import_hf(&args.from, &args.out, args.add_chat_tokens)?;
    if report.added.is_empty() {
        println!("wrote {} (vocabulary {})", args.out.display(), report.config.vocab_size);
    } else {
        let added: Vec<String> = report.added.iter().map(|(t, id)| format!("{t}={id}")).collect();
        println!(
            "wrote {} (added {}; vocabulary {} -> {})",
            args.out.display(),
            added.join(" "),
            report.old_vocab_size,
            report.config.vocab_size
        );
    }
    Ok(())
}

/// Converts the checkpoint in `from` into a new checkpoint directory `out` (written atomically).
/// The RoPE convention is kept: a Hugging Face checkpoint imports as a half-split model.
pub fn import_hf(from: &Path, out: &Path, add_chat_tokens: bool) -> Result<ImportReport> {
    ensure!(!out.exists(), "{} already exists: choose a new directory", out.display());
    let source = Checkpoint::open(from)?;
    let mut params = source.read_params()?;
    let mut config = source.config().clone();
    let old_vocab_size = config.vocab_size;
    let tok_path = from.join(TOKENIZER_FILE);
    if !add_chat_tokens {
        // A file source brings the tokenizer_config.json (chat template) beside it along.
        let tokenizer = tok_path.is_file().then_some(TokenizerSource::File(&tok_path));
        checkpoint::save_weights_with(out, &config, params, tokenizer)?;
        return Ok(ImportReport { config, old_vocab_size, added: vec![] });
    }

    ensure!(
        tok_path.is_file(),
        "{} is missing: --add-chat-tokens needs the model's tokenizer",
        tok_path.display()
    );
    let bytes = std::fs::read(&tok_path).with_context(|| format!("reading {}", tok_path.display()))?;
    let mut tok = parse_tokenizer_json(&bytes).with_context(|| tok_path.display().to_string())?;
    let tok_vocab_before = tok.get_vocab_size(true);
    let missing = missing_chat_tokens(&tok);
    let specials: Vec<AddedToken> = missing.iter().map(|t| AddedToken::from(*t, true)).collect();
    tok.add_special_tokens(&specials);
    let still_missing = missing_chat_tokens(&tok);
    ensure!(
        still_missing.is_empty(),
        "{}: could not add {} as special tokens (already added as ordinary tokens?)",
        tok_path.display(),
        still_missing.join(", ")
    );
    let mut added = Vec::with_capacity(missing.len());
    for t in &missing {
        let id = tok.token_to_id(t).with_context(|| format!("{t} has no id after being added"))?;
        added.push((t.to_string(), id));
    }
    // Ids the tokenizer did not have before get fresh rows; an id that already existed (a token
    // that was in the vocabulary, now marked special) keeps its trained row.
    let mut new_ids: Vec<usize> =
        added.iter().map(|(_, id)| *id as usize).filter(|&id| id >= tok_vocab_before).collect();
    let needed = new_ids.iter().map(|&id| id + 1).max().unwrap_or(0).max(tok.get_vocab_size(true));
    let real_rows = tok_vocab_before.min(old_vocab_size);
    ensure!(real_rows > 0, "{}: the tokenizer has no tokens", tok_path.display());
    config.vocab_size = old_vocab_size.max(needed);
    // Rows the matrix gains for ids the tokenizer already had (a tokenizer larger than the
    // model's vocabulary) start at the mean too, rather than at zero.
    let grown: Vec<usize> = (old_vocab_size..config.vocab_size).filter(|id| !new_ids.contains(id)).collect();
    new_ids.extend(grown);
    for t in params.iter_mut().filter(|t| t.name == "tok_embeddings" || t.name == "lm_head") {
        grow_rows(t, config.vocab_size, real_rows, &new_ids);
    }
    let json = tok.to_string(true).map_err(|e| anyhow!("serializing the tokenizer: {e}"))?;
    checkpoint::save_weights_with(out, &config, params, Some(TokenizerSource::Json(&json)))?;
    // The model's chat template stays available (`--chat-format template`).
    let config_src = tokenizer_config_beside(&tok_path);
    if config_src.is_file() {
        let config_dst = out.join(TOKENIZER_CONFIG_FILE);
        std::fs::copy(&config_src, &config_dst)
            .with_context(|| format!("copying {} to {}", config_src.display(), config_dst.display()))?;
    }
    // The chat format's own check, on what was written.
    ChatTokenizer::load(&out.join(TOKENIZER_FILE), &FormatChoice::new(Some(ChatFormat::SimpleLlama), None))?;
    Ok(ImportReport { config, old_vocab_size, added })
}

/// Extends a [vocab, d] tensor to `vocab` rows and sets the rows `new_ids` to the mean of its
/// first `real_rows` rows (the tokens the tokenizer had).
fn grow_rows(t: &mut NamedTensor, vocab: usize, real_rows: usize, new_ids: &[usize]) {
    let d = t.shape[1];
    let mut mean = vec![0f64; d];
    for row in t.data[..real_rows * d].chunks_exact(d) {
        for (m, &x) in mean.iter_mut().zip(row) {
            *m += x as f64;
        }
    }
    let mean: Vec<f32> = mean.iter().map(|m| (m / real_rows as f64) as f32).collect();
    t.data.resize(vocab * d, 0.0);
    t.shape[0] = vocab;
    for &id in new_ids {
        t.data[id * d..(id + 1) * d].copy_from_slice(&mean);
    }
}

/// The `--init-from` check: a checkpoint whose tokenizer lacks the chat tokens cannot be
/// fine-tuned on the chat format; the error says how to add them.
pub fn check_init_tokenizer(dir: &Path) -> Result<()> {
    let path = dir.join(TOKENIZER_FILE);
    if !path.is_file() {
        return Ok(());
    }
    // Fine-tuning in the model's own chat template needs none of SimpleLLaMA's tokens.
    let config = tokenizer_config_beside(&path);
    if config.is_file() && ChatTemplate::from_tokenizer_config(&config)?.is_some() {
        return Ok(());
    }
    let tok = Tokenizer::from_file(&path)
        .map_err(|e| anyhow!("{}: not a valid tokenizer.json: {e}", path.display()))?;
    let missing = missing_chat_tokens(&tok);
    if !missing.is_empty() {
        bail!(
            "{} lacks the chat special tokens {}: run `sft import --from {} --out NEW_DIR --add-chat-tokens` \
             and pass --init-from NEW_DIR (and prepare the data with NEW_DIR/tokenizer.json)",
            path.display(),
            missing.join(", "),
            dir.display()
        );
    }
    Ok(())
}

/// A run's tokenizer against the one saved with its starting weights (`dir/tokenizer.json`, where
/// there is one): the embedding's row i was trained for the checkpoint's token i, so the data must
/// be tokenized with the same vocabulary. The same ids for the same strings is what counts (the
/// file may have been re-saved); an error names both files and the first difference.
pub fn check_weights_tokenizer(dir: &Path, tokenizer: &ChatTokenizer) -> Result<()> {
    let path = dir.join(TOKENIZER_FILE);
    if !path.is_file() {
        return Ok(());
    }
    let saved = Tokenizer::from_file(&path)
        .map_err(|e| anyhow!("{}: not a valid tokenizer.json: {e}", path.display()))?;
    let data_name =
        tokenizer.path().map_or_else(|| "the run's tokenizer".to_string(), |p| p.display().to_string());
    let saved_vocab = saved.get_vocab(true);
    let run_vocab = tokenizer.inner().get_vocab(true);
    let mut differ: Vec<String> = saved_vocab
        .iter()
        .filter(|(t, id)| run_vocab.get(*t) != Some(id))
        .map(|(t, id)| match run_vocab.get(t) {
            Some(other) => format!("{t:?} is {id} there and {other} here"),
            None => format!("{t:?} ({id}) is not in it"),
        })
        .collect();
    differ.extend(
        run_vocab.keys().filter(|t| !saved_vocab.contains_key(*t)).map(|t| format!("{t:?} is new here")),
    );
    differ.sort();
    if let Some(first) = differ.first() {
        bail!(
            "{data_name} is not the tokenizer of the weights, {}: {} of their tokens differ ({first}); \
             the embedding rows belong to the checkpoint's tokens: use {} (and prepare data with it, \
             `sft prepare --tokenizer {}`)",
            path.display(),
            differ.len(),
            path.display(),
            path.display()
        );
    }
    Ok(())
}
