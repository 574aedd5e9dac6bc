//! The `sft prepare`, `sft inspect` and `sft tokenizer train` subcommands.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use super::batch::Batch;
use super::chat::read_chat_file;
use super::format::TrainOn;
use super::loader::{
    batches_from_examples_with, batches_in_order_with, BatchMode, Dataset, Loader, LoaderConfig,
    NoSupervisedTokens, Split,
};
use super::prepare::{prepare as run_prepare, tokenize_all, PrepareOptions};
use super::template::ChatFormatArgs;
use super::tokenizer::{train_tokenizer, ChatTokenizer};
use crate::rng::Rng;

#[derive(Args, Debug, Clone)]
pub struct PrepareArgs {
    /// Chat file: a JSON list, JSON Lines or Parquet (SimpleLLaMA's schema, `messages`,
    /// `conversations`, Alpaca `instruction`/`input`/`output`, or `prompt`/`completion`).
    #[arg(long)]
    pub data: PathBuf,
    /// tokenizer.json (with the chat special tokens and `<PAD>`).
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Output directory for train-NNNNN.bin, val-NNNNN.bin and prepare.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Examples longer than this many tokens are skipped (and counted).
    #[arg(long, default_value_t = 2048)]
    pub max_seq_len: usize,
    /// Share of examples in the train split.
    #[arg(long, default_value_t = 0.99)]
    pub train_share: f64,
    /// Seed of the train/val split.
    #[arg(long, default_value_t = 89)]
    pub seed: u64,
    /// Which assistant replies are supervised.
    #[arg(long, value_enum, default_value_t = TrainOn::FinalReply)]
    pub train_on: TrainOn,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub chat: ChatFormatArgs,
}

fn with_threads<T: Send>(threads: Option<usize>, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    match threads {
        Some(n) => rayon::ThreadPoolBuilder::new().num_threads(n).build().context("thread pool")?.install(f),
        None => f(),
    }
}

pub fn prepare(args: PrepareArgs) -> Result<()> {
    let opts = PrepareOptions {
        data: args.data,
        tokenizer: args.tokenizer,
        out_dir: args.out,
        max_seq_len: args.max_seq_len,
        train_share: args.train_share,
        seed: args.seed,
        train_on: args.train_on,
        chat: args.chat.choice(),
    };
    let r = with_threads(args.threads, || run_prepare(&opts))?;
    println!(
        "prepared {} conversations from {}: {} train, {} val, {} skipped (longer than {} tokens)",
        r.n_conversations,
        opts.data.display(),
        r.n_train,
        r.n_val,
        r.n_skipped,
        opts.max_seq_len
    );
    println!(
        "{} tokens ({} supervised), longest {}, {:.2} s, {:.0} tokens/s, {} shards in {}",
        r.n_tokens,
        r.n_supervised,
        r.longest,
        r.seconds,
        r.tokens_per_s,
        r.shards.len(),
        opts.out_dir.display()
    );
    Ok(())
}

#[derive(Args, Debug, Clone)]
pub struct InspectArgs {
    /// A chat file, or a directory prepared by `sft prepare`.
    #[arg(long)]
    pub data: PathBuf,
    /// tokenizer.json: needed for a chat file; for a prepared directory, used to show text
    /// (default: the directory's tokenizer.json, the one it was prepared with).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Longest example in tokens (chat file; longer ones are skipped, as the trainer does), and
    /// the row length of fixed padding and packing.
    #[arg(long, default_value_t = 2048)]
    pub max_seq_len: usize,
    /// Examples per padded batch (rows per packed batch).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Pad every row to max_seq_len (default: to the longest example of the batch).
    #[arg(long, conflicts_with = "packed")]
    pub fixed_padding: bool,
    /// Pack whole examples into rows of max_seq_len tokens.
    #[arg(long)]
    pub packed: bool,
    /// File order (default: the seeded shuffle of the first epoch).
    #[arg(long)]
    pub no_shuffle: bool,
    /// Seeds the shuffle.
    #[arg(long, default_value_t = 89)]
    pub seed: u64,
    /// Which assistant replies are supervised, for a chat file (default: final-reply); a prepared
    /// directory's masks are in its shards, and another choice than its own is refused.
    #[arg(long, value_enum)]
    pub train_on: Option<TrainOn>,
    /// Split of a prepared directory (default: train); a chat file has none.
    #[arg(long, value_enum)]
    pub split: Option<Split>,
    /// One JSON line per batch: {"inputs": [[...]], "targets": [[...]]}.
    #[arg(long)]
    pub json: bool,
    /// Batches shown in full in the human view (all are counted).
    #[arg(long, default_value_t = 1)]
    pub show: usize,
    #[command(flatten)]
    pub chat: ChatFormatArgs,
}

fn mode_of(args: &InspectArgs) -> BatchMode {
    if args.packed {
        BatchMode::Packed
    } else if args.fixed_padding {
        BatchMode::Fixed
    } else {
        BatchMode::Dynamic
    }
}

/// The batches of the first epoch as the trainer would see them (last partial batch dropped).
fn inspect_batches(args: &InspectArgs, tok: Option<&ChatTokenizer>) -> Result<Vec<Batch>> {
    let cfg = LoaderConfig {
        batch_size: args.batch_size,
        max_seq_len: args.max_seq_len,
        mode: mode_of(args),
        shuffle: !args.no_shuffle,
        seed: args.seed,
    };
    super::prepare::check_view_flags(&args.data, args.train_on, args.split.is_some())?;
    if args.data.is_dir() {
        let ds = Arc::new(Dataset::open(&args.data, args.split.unwrap_or(Split::Train))?);
        if let Some(tok) = tok {
            ds.ensure_tokenizer(tok)?;
        }
        let name = args.data.display();
        if args.no_shuffle {
            return batches_in_order_with(&ds, &cfg, false).with_context(|| format!("{name}"));
        }
        let mut loader = Loader::new(ds, cfg).with_context(|| format!("{name}"))?;
        let mut out = Vec::new();
        for _ in 0..loader.batches_per_epoch() {
            match loader.next_batch() {
                Ok(b) => out.push(b),
                Err(e) if e.downcast_ref::<NoSupervisedTokens>().is_some() => eprintln!("warning: {e}"),
                Err(e) => return Err(e.context(format!("{name}"))),
            }
        }
        return Ok(out);
    }
    let Some(tok) = tok else { bail!("--tokenizer is needed to inspect a chat file") };
    let convs = read_chat_file(&args.data)?;
    let mut examples = tokenize_all(tok, &convs, 0, args.train_on.unwrap_or_default())
        .with_context(|| format!("{}", args.data.display()))?;
    // The same rule as `sft prepare`: long examples are skipped and counted up front, so that a
    // batch is never made of skipped examples only.
    let n_all = examples.len();
    examples.retain(|e| e.len() <= args.max_seq_len);
    let skipped = n_all - examples.len();
    if examples.is_empty() {
        bail!(
            "{}: all {n_all} examples are longer than max_seq_len={} tokens; nothing to train on",
            args.data.display(),
            args.max_seq_len
        );
    }
    if skipped > 0 {
        eprintln!(
            "{}: skipped {skipped} of {n_all} examples ({:.2}%) longer than max_seq_len={} tokens, as `sft prepare` does",
            args.data.display(),
            100.0 * skipped as f64 / n_all as f64,
            args.max_seq_len
        );
    }
    if !args.no_shuffle {
        Rng::new(args.seed).fork(0).shuffle(&mut examples);
    }
    batches_from_examples_with(&examples, tok.pad_id(), &cfg, false)
}

fn rows_of(v: &[u32], b: &Batch) -> Vec<Vec<u32>> {
    v.chunks(b.seq_len.max(1)).map(|r| r.to_vec()).collect()
}

pub fn inspect(args: InspectArgs) -> Result<()> {
    let choice = args.chat.choice();
    // A prepared directory holds the tokenizer it was made with: its text, as the trainer reads it.
    let copy = args.data.join("tokenizer.json");
    let tokenizer = args.tokenizer.clone().or_else(|| (args.data.is_dir() && copy.is_file()).then_some(copy));
    let tok = tokenizer.as_deref().map(|p| ChatTokenizer::load(p, &choice)).transpose()?;
    let batches = inspect_batches(&args, tok.as_ref())?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if args.json {
        for b in &batches {
            let mut line =
                serde_json::json!({ "inputs": rows_of(&b.inputs, b), "targets": rows_of(&b.targets, b) });
            if args.packed {
                line["positions"] = serde_json::json!(rows_of(&b.positions, b));
                line["cu_seqlens"] = serde_json::json!(b.cu_seqlens);
            }
            writeln!(out, "{line}")?;
        }
        return Ok(());
    }
    let mut total = (0usize, 0usize, 0usize); // positions, real tokens, supervised
    for (k, b) in batches.iter().enumerate() {
        let real = b.inputs.iter().filter(|&&t| t != b.pad_id).count();
        let sup = b.n_supervised();
        total = (total.0 + b.n_tokens(), total.1 + real, total.2 + sup);
        if k < args.show {
            writeln!(
                out,
                "=== batch {k}: {} rows × {} tokens, {real} real tokens ({:.1}% {}), {sup} supervised, {} segments",
                b.rows,
                b.seq_len,
                100.0 * real as f64 / b.n_tokens().max(1) as f64,
                if args.packed { "packing efficiency" } else { "padding efficiency" },
                b.n_segments()
            )?;
            for r in 0..b.rows {
                writeln!(out, "--- row {r}")?;
                writeln!(out, "{}", render_row(b, r, tok.as_ref())?)?;
            }
        }
    }
    writeln!(
        out,
        "{} batches, {} token positions, {} real tokens ({:.1}% efficiency), {} supervised targets",
        batches.len(),
        total.0,
        total.1,
        100.0 * total.1 as f64 / total.0.max(1) as f64,
        total.2
    )?;
    writeln!(
        out,
        "supervised text is shown between ⟦ and ⟧; each packed example starts on a new line after ¶"
    )?;
    Ok(())
}

/// A row as text, supervised tokens between ⟦ ⟧ (token `j` is supervised when `targets[j-1]` is
/// not pad); without a tokenizer, as ids.
fn render_row(b: &Batch, r: usize, tok: Option<&ChatTokenizer>) -> Result<String> {
    let row = r * b.seq_len..(r + 1) * b.seq_len;
    let inputs = &b.inputs[row.clone()];
    let targets = &b.targets[row.clone()];
    let starts: Vec<usize> = b.cu_seqlens.iter().map(|&c| c as usize).filter(|c| row.contains(c)).collect();
    let end = inputs.iter().rposition(|&t| t != b.pad_id).map_or(0, |p| p + 1);
    let supervised = |j: usize| j > 0 && targets[j - 1] != b.pad_id && targets[j - 1] == inputs[j];
    let mut s = String::new();
    let mut j = 0;
    while j < end {
        let sup = supervised(j);
        let mut k = j + 1;
        while k < end && supervised(k) == sup && !starts.contains(&(row.start + k)) {
            k += 1;
        }
        let text = match tok {
            Some(t) => t.decode_with_specials(&inputs[j..k])?,
            None => format!("{:?}", &inputs[j..k]),
        };
        if j > 0 && starts.contains(&(row.start + j)) && b.n_segments() > b.rows {
            s.push_str("¶\n");
        }
        if sup {
            s.push('⟦');
            s.push_str(&text);
            s.push('⟧');
        } else {
            s.push_str(&text);
        }
        j = k;
    }
    let pad = b.seq_len - end;
    if pad > 0 {
        s.push_str(&format!(" [+{pad} pad]"));
    }
    Ok(s)
}

#[derive(Args, Debug, Clone)]
pub struct TokenizerArgs {
    #[command(subcommand)]
    pub command: TokenizerCommand,
}

#[derive(Subcommand, Debug, Clone)]
pub enum TokenizerCommand {
    /// Train a byte-level BPE on chat data, SimpleLLaMA's ten special tokens at ids 0–9.
    Train(TrainTokenizerArgs),
}

#[derive(Args, Debug, Clone)]
pub struct TrainTokenizerArgs {
    /// Chat file (any supported schema).
    #[arg(long)]
    pub data: PathBuf,
    /// Tokens in the vocabulary, the ten special tokens included.
    #[arg(long, default_value_t = 8192)]
    pub vocab_size: usize,
    /// Where to write tokenizer.json.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn tokenizer(args: TokenizerArgs) -> Result<()> {
    match args.command {
        TokenizerCommand::Train(a) => train(&a.data, a.vocab_size, &a.out),
    }
}

fn train(data: &Path, vocab_size: usize, out: &Path) -> Result<()> {
    // The tokenizer would replace the data (another spelling or a link to it included).
    if crate::paths::same_file(data, out) {
        bail!(
            "--out {} is the chat file given as --data {}: the tokenizer would overwrite the data; give \
             another --out",
            out.display(),
            data.display()
        );
    }
    let convs = read_chat_file(data)?;
    let tok = train_tokenizer(&convs, vocab_size, out)?;
    println!(
        "trained a {}-token byte-level BPE on {} conversations → {}",
        tok.vocab_size(),
        convs.len(),
        out.display()
    );
    Ok(())
}
