//! `sft prepare`: a chat file → tokenized, split, memory-mapped shards.
//!
//! The file is streamed in chunks; each chunk is formatted and tokenized in parallel (rayon) and
//! appended, in file order, to a spool shard. Once the number of kept examples is known, a
//! seeded shuffle decides the exact train/val split and the spool is copied into
//! `train-NNNNN.bin` and `val-NNNNN.bin` (each in file order). Peak memory is one chunk of
//! conversations plus the offsets, never the whole file's tokens.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::chat::{for_each_conversation, Conversation};
use super::example::{tokenize_conversation, Example};
use super::format::TrainOn;
use super::shard::{Shard, ShardWriter};
use super::tokenizer::ChatTokenizer;
use crate::rng::Rng;

/// Conversations tokenized per parallel round.
const CHUNK: usize = 8192;
/// A new shard is started after this many tokens (256 MiB of ids).
pub const SHARD_TOKENS: u64 = 1 << 26;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PrepareOptions {
    pub data: PathBuf,
    pub tokenizer: PathBuf,
    pub out_dir: PathBuf,
    pub max_seq_len: usize,
    /// Share of the kept examples that go to the train split (SimpleLLaMA: 0.99).
    pub train_share: f64,
    pub seed: u64,
    pub train_on: TrainOn,
}

impl PrepareOptions {
    /// SimpleLLaMA's defaults: max_seq_len 2048, train share 0.99, seed 89, final reply.
    pub fn new(data: &Path, tokenizer: &Path, out_dir: &Path) -> Self {
        PrepareOptions {
            data: data.to_path_buf(),
            tokenizer: tokenizer.to_path_buf(),
            out_dir: out_dir.to_path_buf(),
            max_seq_len: 2048,
            train_share: 0.99,
            seed: 89,
            train_on: TrainOn::FinalReply,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PrepareReport {
    pub n_train: usize,
    pub n_val: usize,
    /// Examples longer than max_seq_len, not written.
    pub n_skipped: usize,
    /// Tokens of the kept examples.
    pub n_tokens: u64,
    pub n_supervised: u64,
    pub n_conversations: usize,
    pub longest: usize,
    pub tokenizer_fingerprint: String,
    pub seconds: f64,
    /// All tokens formatted and tokenized (skipped examples included) per second.
    pub tokens_per_s: f64,
    pub shards: Vec<PathBuf>,
}

/// Name of the `index`-th shard of a split.
pub fn shard_name(split: &str, index: usize) -> String {
    format!("{split}-{index:05}.bin")
}

fn remove_old_shards(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let is_shard = (name.starts_with("train-") || name.starts_with("val-"))
            && (name.ends_with(".bin") || name.ends_with(".bin.tmp"));
        if is_shard || name.starts_with("spool.bin") {
            std::fs::remove_file(&path).with_context(|| format!("{}: cannot remove", path.display()))?;
        }
    }
    Ok(())
}

/// Writes a split's examples into shards of about [`SHARD_TOKENS`] tokens.
struct SplitWriter {
    dir: PathBuf,
    split: &'static str,
    fingerprint: u64,
    pad_id: u32,
    current: Option<ShardWriter>,
    written: Vec<PathBuf>,
    n_examples: usize,
}

impl SplitWriter {
    fn push(&mut self, tokens: &[u32], spans: &[[u32; 2]]) -> Result<()> {
        if self.current.as_ref().is_some_and(|w| w.n_tokens() >= SHARD_TOKENS) {
            self.flush()?;
        }
        if self.current.is_none() {
            let path = self.dir.join(shard_name(self.split, self.written.len()));
            self.current = Some(ShardWriter::create(&path, self.fingerprint, self.pad_id)?);
        }
        self.n_examples += 1;
        self.current.as_mut().expect("just created").push(tokens, spans)
    }

    fn flush(&mut self) -> Result<()> {
        if let Some(w) = self.current.take() {
            self.written.push(w.finish()?);
        }
        Ok(())
    }

    /// Flushes; a split without examples still gets one (empty) shard, so that it opens as an
    /// empty dataset rather than as a missing one.
    fn finish(mut self) -> Result<(usize, Vec<PathBuf>)> {
        self.flush()?;
        if self.written.is_empty() {
            let path = self.dir.join(shard_name(self.split, 0));
            self.written.push(ShardWriter::create(&path, self.fingerprint, self.pad_id)?.finish()?);
        }
        Ok((self.n_examples, self.written))
    }
}

/// Tokenizes conversations in parallel; `Err` names the example index.
pub fn tokenize_all(
    tok: &ChatTokenizer,
    convs: &[Conversation],
    first_index: usize,
    train_on: TrainOn,
) -> Result<Vec<Example>> {
    convs
        .par_iter()
        .enumerate()
        .map(|(i, c)| {
            tokenize_conversation(tok, c, train_on).with_context(|| format!("example {}", first_index + i))
        })
        .collect()
}

pub fn prepare(opts: &PrepareOptions) -> Result<PrepareReport> {
    let start = Instant::now();
    ensure!(opts.max_seq_len >= 2, "max_seq_len must be at least 2");
    ensure!(
        opts.train_share > 0.0 && opts.train_share <= 1.0,
        "train share must be in (0, 1], got {}",
        opts.train_share
    );
    let tok = ChatTokenizer::from_file(&opts.tokenizer)?;
    std::fs::create_dir_all(&opts.out_dir)
        .with_context(|| format!("{}: cannot create output directory", opts.out_dir.display()))?;
    remove_old_shards(&opts.out_dir)?;
    let spool_path = opts.out_dir.join("spool.bin");
    let mut spool = ShardWriter::create(&spool_path, tok.fingerprint(), tok.pad_id())?;
    let mut report =
        PrepareReport { tokenizer_fingerprint: format!("{:016x}", tok.fingerprint()), ..Default::default() };
    let mut all_tokens = 0u64;
    let mut chunk: Vec<Conversation> = Vec::with_capacity(CHUNK);
    let mut flush = |chunk: &mut Vec<Conversation>, report: &mut PrepareReport| -> Result<()> {
        let first = report.n_conversations;
        let examples = tokenize_all(&tok, chunk, first, opts.train_on)
            .with_context(|| format!("{}", opts.data.display()))?;
        for ex in &examples {
            all_tokens += ex.len() as u64;
            if ex.len() > opts.max_seq_len {
                report.n_skipped += 1;
                continue;
            }
            report.longest = report.longest.max(ex.len());
            spool.push_example(ex)?;
        }
        report.n_conversations += chunk.len();
        chunk.clear();
        Ok(())
    };
    for_each_conversation(&opts.data, |_, conv| {
        chunk.push(conv);
        if chunk.len() == CHUNK {
            flush(&mut chunk, &mut report)?;
        }
        Ok(())
    })?;
    flush(&mut chunk, &mut report)?;
    spool.finish()?;

    let n_all = report.n_conversations;
    if report.n_skipped == n_all {
        let _ = std::fs::remove_file(&spool_path);
        bail!(
            "{}: all {n_all} examples are longer than max_seq_len={} tokens; nothing to train on",
            opts.data.display(),
            opts.max_seq_len
        );
    }
    if report.n_skipped as f64 / n_all as f64 >= 0.1 {
        eprintln!(
            "warning: {:.2}% of examples have been skipped due to exceeding max_seq_len={}",
            100.0 * report.n_skipped as f64 / n_all as f64,
            opts.max_seq_len
        );
    }

    let spool = Shard::open(&spool_path)?;
    let n = spool.len();
    let is_val = split_assignment(n, opts.train_share, opts.seed);
    let mk = |split| SplitWriter {
        dir: opts.out_dir.clone(),
        split,
        fingerprint: tok.fingerprint(),
        pad_id: tok.pad_id(),
        current: None,
        written: Vec::new(),
        n_examples: 0,
    };
    let (mut train, mut val) = (mk("train"), mk("val"));
    for (i, &v) in is_val.iter().enumerate() {
        let ex = spool.example(i);
        report.n_tokens += ex.len() as u64;
        report.n_supervised += ex.n_supervised() as u64;
        if v { &mut val } else { &mut train }.push(ex.tokens, ex.spans)?;
    }
    let (n_train, train_shards) = train.finish()?;
    let (n_val, val_shards) = val.finish()?;
    drop(spool);
    std::fs::remove_file(&spool_path).with_context(|| format!("{}: cannot remove", spool_path.display()))?;
    report.n_train = n_train;
    report.n_val = n_val;
    report.shards = train_shards.into_iter().chain(val_shards).collect();
    report.seconds = start.elapsed().as_secs_f64();
    report.tokens_per_s = all_tokens as f64 / report.seconds.max(1e-9);
    // The shards' tokenizer travels with them: `sft train --data DIR` finds it there.
    let tok_copy = opts.out_dir.join("tokenizer.json");
    if std::fs::canonicalize(&opts.tokenizer).ok() != std::fs::canonicalize(&tok_copy).ok() {
        let tmp = opts.out_dir.join("tokenizer.json.tmp");
        std::fs::copy(&opts.tokenizer, &tmp).with_context(|| format!("{}: cannot write", tmp.display()))?;
        std::fs::rename(&tmp, &tok_copy).with_context(|| format!("{}: cannot write", tok_copy.display()))?;
    }
    let meta = serde_json::json!({ "options": opts, "report": &report });
    let meta_path = opts.out_dir.join("prepare.json");
    std::fs::write(&meta_path, serde_json::to_string_pretty(&meta)?)
        .with_context(|| format!("{}: cannot write", meta_path.display()))?;
    Ok(report)
}

/// `true` for the examples of the validation split: a seeded shuffle of `0..n`, whose first
/// `round(n · train_share)` go to train (SimpleLLaMA shuffles, then cuts).
pub fn split_assignment(n: usize, train_share: f64, seed: u64) -> Vec<bool> {
    let mut order: Vec<usize> = (0..n).collect();
    Rng::new(seed).shuffle(&mut order);
    let n_train = ((n as f64 * train_share).round() as usize).min(n);
    let mut is_val = vec![false; n];
    for &i in &order[n_train..] {
        is_val[i] = true;
    }
    is_val
}
