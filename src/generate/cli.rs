//! `sft generate` (one reply) and `sft chat` (interactive, multi-turn).

use super::{generate_reply, SamplingConfig};
use crate::backend::{Backend, Device};
use crate::checkpoint;
use crate::data::{ChatTokenizer, Turn, DEFAULT_SYSTEM_PROMPT};
use crate::model::Model;
use crate::rng::Rng;
use anyhow::{Context, Result};
use clap::Args;
use std::io::{BufRead, Write};
use std::path::PathBuf;

/// What both commands share: the checkpoint, the device and the sampling settings.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// A checkpoint directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Default: the checkpoint's tokenizer.json.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// A LoRA adapter (PEFT layout) trained on the checkpoint, applied without merging.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The system prompt (default: SimpleLLaMA's).
    #[arg(long)]
    pub system: Option<String>,
    /// 0 decodes greedily.
    #[arg(long, default_value_t = 0.3)]
    pub temperature: f32,
    /// 0 keeps every token.
    #[arg(long, default_value_t = 10)]
    pub top_k: usize,
    /// Keep the most likely tokens whose probabilities sum to at least this (nucleus sampling); 1 keeps every token.
    #[arg(long, default_value_t = 0.5)]
    pub top_p: f32,
    /// Stop a reply after this many tokens (the context may stop it first).
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    /// Seeds the sampling.
    #[arg(long, default_value_t = 89)]
    pub seed: u64,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[command(flatten)]
    pub chat: crate::data::template::ChatFormatArgs,
}

impl SamplingArgs {
    fn sampling(&self) -> Result<SamplingConfig> {
        let cfg = SamplingConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            max_new_tokens: self.max_new_tokens,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn system(&self) -> &str {
        self.system.as_deref().unwrap_or(DEFAULT_SYSTEM_PROMPT)
    }

    fn tokenizer(&self) -> Result<ChatTokenizer> {
        checkpoint::load_tokenizer_for(&self.checkpoint, self.tokenizer.as_deref(), &self.chat.choice())
    }

    fn model<B: Backend>(&self, backend: B, tok: &ChatTokenizer) -> Result<Model<B>> {
        let ckpt = checkpoint::Checkpoint::open(&self.checkpoint)?;
        let tok_path =
            self.tokenizer.clone().unwrap_or_else(|| self.checkpoint.join(checkpoint::TOKENIZER_FILE));
        ckpt.config().check_usage(Some((&tok_path, tok.vocab_size())), ckpt.config().max_seq_len)?;
        let max_tokens = ckpt.config().max_seq_len.min(512);
        crate::lora::inference_model(&ckpt, self.adapter.as_deref(), backend, max_tokens)
    }
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// The user message to reply to.
    #[arg(long)]
    pub prompt: String,
}

/// Prints one reply to `--prompt`.
pub fn generate(args: GenerateArgs) -> Result<()> {
    let sampling = args.sampling.sampling()?;
    let tok = args.sampling.tokenizer()?;
    let reply = crate::with_backend!(Device::parse(&args.sampling.device)?, |backend| {
        let mut model = args.sampling.model(backend, &tok)?;
        let mut rng = Rng::new(args.sampling.seed);
        generate_reply(&mut model, &tok, args.sampling.system(), &[], &args.prompt, &sampling, &mut rng)?
    });
    println!("{reply}");
    Ok(())
}

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// A conversation on stdin/stdout: each line is a user turn; `/reset` starts over, `/quit` or
/// end of input stops. The whole history goes into each prompt (its last max_seq_len tokens).
pub fn chat(args: ChatArgs) -> Result<()> {
    let sampling = args.sampling.sampling()?;
    let tok = args.sampling.tokenizer()?;
    crate::with_backend!(Device::parse(&args.sampling.device)?, |backend| {
        let model = args.sampling.model(backend, &tok)?;
        chat_loop(model, &tok, &args.sampling, &sampling)
    })
}

fn chat_loop<B: Backend>(
    mut model: Model<B>,
    tok: &ChatTokenizer,
    args: &SamplingArgs,
    sampling: &SamplingConfig,
) -> Result<()> {
    let mut rng = Rng::new(args.seed);
    let mut history: Vec<Turn> = Vec::new();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    eprintln!("chatting with {} (/reset starts over, /quit or Ctrl-D ends)", args.checkpoint.display());
    loop {
        write!(out, "> ")?;
        out.flush()?;
        let mut line = String::new();
        let read = stdin.lock().read_line(&mut line);
        if read.context("reading the next message from stdin (it must be UTF-8 text)")? == 0 {
            writeln!(out)?;
            return Ok(());
        }
        let user = line.trim_end_matches(['\n', '\r']);
        match user.trim() {
            "" => continue,
            "/quit" | "/exit" => return Ok(()),
            "/reset" => {
                history.clear();
                continue;
            }
            _ => {}
        }
        let reply = generate_reply(&mut model, tok, args.system(), &history, user, sampling, &mut rng)?;
        writeln!(out, "{reply}")?;
        history.push(Turn { user: user.to_string(), assistant: reply });
    }
}

#[derive(Args, Debug)]
pub struct LogitsArgs {
    /// A checkpoint directory (ours or a Hugging Face Llama).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Comma-separated token ids.
    #[arg(long, value_delimiter = ',', required = true)]
    pub ids: Vec<u32>,
    /// A LoRA adapter (PEFT layout) trained on the checkpoint, applied without merging.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// Prints `{"ids": [...], "logits": [[f32; vocab]; ids]}`: the logits after each position, for
/// comparing with another implementation (scripts/check_hf_logits.py).
pub fn logits(args: LogitsArgs) -> Result<()> {
    let rows = crate::with_backend!(Device::parse(&args.device)?, |backend| {
        all_logits_with(backend, &args.checkpoint, args.adapter.as_deref(), &args.ids)?
    });
    println!("{}", serde_json::json!({ "ids": args.ids, "logits": rows }));
    Ok(())
}

/// The logits after each of `ids` (one row per position), from the checkpoint in `dir`.
pub fn all_logits<B: Backend>(backend: B, dir: &std::path::Path, ids: &[u32]) -> Result<Vec<Vec<f32>>> {
    all_logits_with(backend, dir, None, ids)
}

/// [`all_logits`] with a LoRA adapter on top when `adapter` is given.
pub fn all_logits_with<B: Backend>(
    backend: B,
    dir: &std::path::Path,
    adapter: Option<&std::path::Path>,
    ids: &[u32],
) -> Result<Vec<Vec<f32>>> {
    anyhow::ensure!(!ids.is_empty(), "no token ids given");
    let ckpt = checkpoint::Checkpoint::open(dir)?;
    ckpt.config().check_usage(None, ids.len()).context("--ids")?;
    // Sized for the sequence, not max_seq_len: a pretrained config may claim 131072 positions.
    let mut model = crate::lora::inference_model(&ckpt, adapter, backend, ids.len())?;
    let mut cache = model.new_cache(ids.len())?;
    ids.iter().map(|&t| model.next_logits(&mut cache, &[t])).collect()
}
