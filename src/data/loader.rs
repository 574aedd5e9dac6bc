//! Datasets of memory-mapped shards, and the batches the trainer sees.
//!
//! Padded batches follow SimpleLLaMA's `tokenize_and_pad_data`: `batch_size` consecutive
//! examples, an example longer than `max_seq_len` skipped within its batch (a warning when 10% or
//! more of a batch is skipped, an error when all of it is), `inputs` = the tokens, `targets[i]` =
//! the token that must follow `inputs[i]` where that token is supervised, else pad; rows
//! right-padded to the longest example ("dynamic") or to `max_seq_len` ("fixed"). Packed
//! batches place whole examples one after another in rows of `max_seq_len` tokens, one attention
//! segment per example (and one for a row's padding tail), positions restarting at 0.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use super::batch::Batch;
use super::example::Example;
use super::prepare::ShardRecord;
pub use super::shard::ExampleRef;
use super::shard::{Shard, ShardHeader};
use super::tokenizer::ChatTokenizer;
use crate::rng::Rng;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Split {
    Train,
    Val,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }
}

/// The memory-mapped shards of one split, read in order as one list of examples.
pub struct Dataset {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// `starts[k]` = index of shard k's first example; one more entry for the total.
    starts: Vec<usize>,
    pad_id: u32,
    fingerprint: u64,
    set_id: u64,
}

impl fmt::Debug for Dataset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dataset")
            .field("dir", &self.dir)
            .field("shards", &self.shards.len())
            .field("examples", &self.len())
            .finish()
    }
}

/// The `{split}-NNNNN.bin` shards of a directory, in name order.
pub(crate) fn split_paths(dir: &Path, split: Split) -> Result<Vec<PathBuf>> {
    let prefix = format!("{}-", split.name());
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot read prepared data directory", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".bin"))
        })
        .collect();
    paths.sort();
    Ok(paths)
}

/// Checks the shard files of a prepared directory (both splits, with their headers) against the
/// record of the run in `prepare.json`: the same names, and in each the example count and
/// checksum recorded for that name. So a shard added (a copy of another under a new name), lost,
/// or renamed across splits is refused, even though its header names the same run. Sets written
/// before the record listed its checksums are checked by names and example counts.
fn check_shard_record(
    dir: &Path,
    meta_path: &Path,
    report: &serde_json::Value,
    headers: &[(PathBuf, ShardHeader)],
) -> Result<()> {
    let name_of = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let records: Option<Vec<ShardRecord>> =
        report.get("shard_files").map(|v| serde_json::from_value(v.clone())).transpose().with_context(
            || format!("{}: field `report.shard_files`: not a list of shards", meta_path.display()),
        )?;
    let listed: Vec<(String, Option<&ShardRecord>)> = match &records {
        Some(records) => records.iter().map(|r| (r.file.clone(), Some(r))).collect(),
        None => {
            let shards = report["shards"].as_array().with_context(|| {
                format!(
                    "{}: field `report.shards` is missing: not a record of an `sft prepare` run; re-run \
                     `sft prepare`",
                    meta_path.display()
                )
            })?;
            shards.iter().map(|p| (name_of(Path::new(p.as_str().unwrap_or_default())), None)).collect()
        }
    };
    let names: Vec<&str> = listed.iter().map(|(n, _)| n.as_str()).collect();
    for (path, h) in headers {
        let name = name_of(path);
        let Some((_, record)) = listed.iter().find(|(n, _)| *n == name) else {
            bail!(
                "{}: not a shard of this prepared set ({} lists {}): a copied or leftover file; remove it \
                 or re-run `sft prepare`",
                path.display(),
                meta_path.display(),
                names.join(", ")
            );
        };
        if let Some(r) = record {
            let checksum = format!("{:016x}", h.checksum);
            ensure!(
                r.n_examples == h.n_examples && r.checksum == checksum,
                "{}: not the shard {} records under this name (it holds {} examples, checksum {checksum}; \
                 recorded: {} examples, checksum {}): a shard renamed, swapped or copied over; re-run \
                 `sft prepare`",
                path.display(),
                meta_path.display(),
                h.n_examples,
                r.n_examples,
                r.checksum
            );
        }
    }
    for name in &names {
        ensure!(
            headers.iter().any(|(p, _)| name_of(p) == *name),
            "{}: missing ({} lists it); re-run `sft prepare`",
            dir.join(name).display(),
            meta_path.display()
        );
    }
    if records.is_none() {
        for (split, field) in [("train-", "n_train"), ("val-", "n_val")] {
            let held: u64 = headers
                .iter()
                .filter(|(p, _)| name_of(p).starts_with(split))
                .map(|(_, h)| h.n_examples)
                .sum();
            let recorded = report[field].as_u64();
            ensure!(
                recorded == Some(held),
                "{}: its {}NNNNN.bin shards hold {held} examples, {} records {field} = {}: shards renamed \
                 or swapped; re-run `sft prepare`",
                dir.display(),
                split,
                meta_path.display(),
                recorded.map_or("nothing".to_string(), |n| n.to_string())
            );
        }
    }
    Ok(())
}

/// The error for two files that disagree on the tokenizer (or the `sft prepare` run).
fn mismatch(what: &str, a: &Path, fa: u64, b: &Path, fb: u64) -> anyhow::Error {
    anyhow::anyhow!(
        "{} was made with the tokenizer {fb:016x}, {} with {fa:016x}: {what}; re-run `sft prepare` \
         (with the tokenizer you mean to use)",
        b.display(),
        a.display()
    )
}

impl Dataset {
    /// Opens every `{split}-NNNNN.bin` of a prepared directory (all shards, in name order).
    ///
    /// Every shard of the directory, the other split's included (by its headers), and the
    /// directory's `tokenizer.json` and `prepare.json` must come from one tokenizer and one
    /// `sft prepare` run: an interrupted or mixed directory is refused, never half used.
    pub fn open(dir: &Path, split: Split) -> Result<Self> {
        let paths = split_paths(dir, split)?;
        if paths.is_empty() {
            bail!(
                "{}: no {} shards ({}-NNNNN.bin); run `sft prepare` first",
                dir.display(),
                split.name(),
                split.name()
            );
        }
        let ds = Self::from_shards(dir, &paths)?;
        let first = ds.shards[0].path();
        let other = match split {
            Split::Train => Split::Val,
            Split::Val => Split::Train,
        };
        let mut headers: Vec<(PathBuf, ShardHeader)> =
            ds.shards.iter().map(|s| (s.path().to_path_buf(), *s.header())).collect();
        for p in split_paths(dir, other)? {
            let h = super::shard::read_header(&p)?;
            if h.fingerprint != ds.fingerprint {
                return Err(mismatch(
                    "one directory mixes two tokenizers",
                    first,
                    ds.fingerprint,
                    &p,
                    h.fingerprint,
                ));
            }
            ensure!(
                h.set_id == ds.set_id,
                "{} and {} come from different `sft prepare` runs (set ids {:016x} and {:016x}: an \
                 interrupted or mixed directory); re-run `sft prepare`",
                p.display(),
                first.display(),
                h.set_id,
                ds.set_id
            );
            headers.push((p, h));
        }
        let tok_path = dir.join("tokenizer.json");
        if let Ok(bytes) = std::fs::read(&tok_path) {
            let f = super::tokenizer::file_fingerprint(&tok_path, &bytes)?;
            if f != ds.fingerprint {
                return Err(mismatch(
                    "the directory's tokenizer.json is not the shards' tokenizer",
                    &tok_path,
                    f,
                    first,
                    ds.fingerprint,
                ));
            }
        }
        // The record of the run is what tells a complete set from shards copied in, left over
        // or swapped: without it nothing can be checked, so a directory without one is refused.
        let meta_path = dir.join("prepare.json");
        let text = match std::fs::read_to_string(&meta_path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "{}: no prepare.json, the record of the `sft prepare` run that wrote the shards, so they \
                 cannot be checked; re-run `sft prepare`",
                dir.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("{}: cannot read", meta_path.display())),
        };
        let meta: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", meta_path.display()))?;
        let report = &meta["report"];
        let hex = |field: &str| report[field].as_str().and_then(|s| u64::from_str_radix(s, 16).ok());
        if let Some(f) = hex("tokenizer_fingerprint") {
            if f != ds.fingerprint {
                return Err(mismatch(
                    "prepare.json describes another set of shards",
                    &meta_path,
                    f,
                    first,
                    ds.fingerprint,
                ));
            }
        }
        if let Some(set) = hex("set_id") {
            ensure!(
                set == ds.set_id,
                "{}: shards of another `sft prepare` run than {} describes (set ids {:016x} and {set:016x}: \
                 an interrupted or mixed directory); re-run `sft prepare`",
                first.display(),
                meta_path.display(),
                ds.set_id
            );
        }
        check_shard_record(dir, &meta_path, report, &headers)?;
        Ok(ds)
    }

    /// Opens the given shards as one dataset; they must come from the same tokenizer and the same
    /// `sft prepare` run.
    pub fn from_shards(dir: &Path, paths: &[PathBuf]) -> Result<Self> {
        ensure!(!paths.is_empty(), "{}: no shards", dir.display());
        let shards = paths.iter().map(|p| Shard::open(p)).collect::<Result<Vec<_>>>()?;
        let first = *shards[0].header();
        for s in &shards[1..] {
            let h = s.header();
            if h.fingerprint != first.fingerprint {
                return Err(mismatch(
                    "one dataset mixes two tokenizers",
                    shards[0].path(),
                    first.fingerprint,
                    s.path(),
                    h.fingerprint,
                ));
            }
            ensure!(
                h.pad_id == first.pad_id && h.set_id == first.set_id,
                "{} and {} come from different `sft prepare` runs ({}); re-run `sft prepare`",
                s.path().display(),
                shards[0].path().display(),
                if h.set_id != first.set_id {
                    format!("set ids {:016x} and {:016x}", h.set_id, first.set_id)
                } else {
                    format!("pad ids {} and {}", h.pad_id, first.pad_id)
                }
            );
        }
        let mut starts = vec![0];
        for s in &shards {
            starts.push(starts.last().unwrap() + s.len());
        }
        Ok(Dataset {
            dir: dir.to_path_buf(),
            shards,
            starts,
            pad_id: first.pad_id,
            fingerprint: first.fingerprint,
            set_id: first.set_id,
        })
    }

    /// Checks that the shards were made with `tok` (its fingerprint) and that every id is inside
    /// its vocabulary; the error names both files and both fingerprints.
    pub fn ensure_tokenizer(&self, tok: &ChatTokenizer) -> Result<()> {
        let tok_name =
            tok.path().map_or_else(|| "the tokenizer in use".to_string(), |p| p.display().to_string());
        if tok.fingerprint() != self.fingerprint {
            bail!(
                "{} was made with the tokenizer {:016x}, but the tokenizer in use, {tok_name}, is {:016x}: \
                 give the tokenizer the data was prepared with (the prepared directory holds a copy, \
                 tokenizer.json), or re-run `sft prepare` with this one",
                self.shards[0].path().display(),
                self.fingerprint,
                tok.fingerprint()
            );
        }
        ensure!(
            self.pad_id == tok.pad_id(),
            "{}: pad id {}, but the tokenizer {tok_name} has <PAD> = {}",
            self.shards[0].path().display(),
            self.pad_id,
            tok.pad_id()
        );
        for s in &self.shards {
            s.check_vocab(tok.vocab_size(), &format!("the tokenizer {tok_name}"))?;
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        *self.starts.last().unwrap()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Fingerprint of the tokenizer the shards were made with.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    pub fn n_shards(&self) -> usize {
        self.shards.len()
    }

    fn locate(&self, i: usize) -> (usize, usize) {
        assert!(i < self.len(), "example {i} out of range ({} examples)", self.len());
        let k = self.starts.partition_point(|&s| s <= i) - 1;
        (k, i - self.starts[k])
    }

    /// Tokens and supervision of example `i` (panics when out of range, like indexing).
    pub fn example(&self, i: usize) -> ExampleRef<'_> {
        let (k, j) = self.locate(i);
        self.shards[k].example(j)
    }

    pub fn example_len(&self, i: usize) -> usize {
        let (k, j) = self.locate(i);
        self.shards[k].example_len(j)
    }
}

/// The token count of the longest example in a prepared directory's two splits; `None` when
/// both are empty.
pub fn longest_example(dir: &Path) -> Result<Option<usize>> {
    let mut longest = None;
    for split in [Split::Train, Split::Val] {
        let ds = Dataset::open(dir, split)?;
        longest = (0..ds.len()).map(|i| ds.example_len(i)).chain(longest).max();
    }
    Ok(longest)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
pub enum BatchMode {
    /// Padded to the longest example of the batch (SimpleLLaMA's recipe: `--batch-mode dynamic`).
    Dynamic,
    /// Padded to max_seq_len.
    Fixed,
    /// Whole examples packed into rows of max_seq_len tokens: the default, because padded
    /// batches spend every layer's compute on pad positions (often 30–60% of real SFT data).
    #[default]
    Packed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderConfig {
    /// Examples per padded batch; rows per packed batch.
    pub batch_size: usize,
    pub max_seq_len: usize,
    pub mode: BatchMode,
    pub shuffle: bool,
    pub seed: u64,
}

/// Where a loader is: enough to resume exactly (the shuffles are functions of seed and epoch).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoaderState {
    pub epoch: u64,
    pub batch_in_epoch: u64,
}

/// A batch without a single supervised target: returned as this error (the loader has moved past
/// it) so that the trainer counts and skips it instead of training on nothing. Detect it with
/// `err.downcast_ref::<NoSupervisedTokens>()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoSupervisedTokens {
    pub epoch: u64,
    pub batch_in_epoch: u64,
}

impl fmt::Display for NoSupervisedTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "batch {} of epoch {} has no supervised token (skipped)", self.batch_in_epoch, self.epoch)
    }
}

impl std::error::Error for NoSupervisedTokens {}

/// Writes one example into a row: `inputs` = tokens, `targets[i]` = `tokens[i+1]` where that
/// token is supervised.
fn fill_row(ex: &ExampleRef<'_>, inputs: &mut [u32], targets: &mut [u32]) {
    inputs[..ex.len()].copy_from_slice(ex.tokens);
    for &[a, b] in ex.spans {
        // A target at position 0 has no context to be predicted from.
        let (a, b) = ((a as usize).max(1), b as usize);
        if a < b {
            targets[a - 1..b - 1].copy_from_slice(&ex.tokens[a..b]);
        }
    }
}

/// A padded batch from a group of consecutive examples (SimpleLLaMA's `tokenize_and_pad_data`).
fn padded_batch(group: &[ExampleRef<'_>], pad_id: u32, cfg: &LoaderConfig) -> Result<Batch> {
    let kept: Vec<&ExampleRef> =
        group.iter().filter(|e| e.len() <= cfg.max_seq_len && !e.is_empty()).collect();
    let skipped = group.len() - kept.len();
    if kept.is_empty() {
        bail!(
            "all {} examples of a batch have been skipped: longer than max_seq_len={}",
            group.len(),
            cfg.max_seq_len
        );
    }
    if skipped as f64 / group.len() as f64 >= 0.1 {
        crate::say!(
            "warning: {:.2}% of examples in this batch has been skipped due to exceeding max_seq_len={}",
            100.0 * skipped as f64 / group.len() as f64,
            cfg.max_seq_len
        );
    }
    let seq_len = match cfg.mode {
        BatchMode::Fixed => cfg.max_seq_len,
        _ => kept.iter().map(|e| e.len()).max().unwrap(),
    };
    let rows = kept.len();
    let mut b = Batch {
        rows,
        seq_len,
        inputs: vec![pad_id; rows * seq_len],
        targets: vec![pad_id; rows * seq_len],
        positions: Vec::with_capacity(rows * seq_len),
        cu_seqlens: (0..=rows).map(|r| (r * seq_len) as u32).collect(),
        pad_id,
    };
    for (r, ex) in kept.iter().enumerate() {
        let row = r * seq_len..(r + 1) * seq_len;
        fill_row(ex, &mut b.inputs[row.clone()], &mut b.targets[row]);
        b.positions.extend(0..seq_len as u32);
    }
    Ok(b)
}

/// Greedy packing plan: rows of example indices (into `order`'s values) whose lengths sum to at
/// most `max_seq_len`; examples longer than that (or empty) are left out.
fn pack_rows(order: &[usize], len_of: impl Fn(usize) -> usize, max_seq_len: usize) -> Vec<Vec<usize>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut used = 0;
    for &i in order {
        let n = len_of(i);
        if n == 0 || n > max_seq_len {
            continue;
        }
        if used + n > max_seq_len {
            rows.push(std::mem::take(&mut row));
            used = 0;
        }
        row.push(i);
        used += n;
    }
    if !row.is_empty() {
        rows.push(row);
    }
    rows
}

/// A packed batch: `rows.len()` rows of `max_seq_len` tokens.
fn packed_batch<'a>(
    rows: &[Vec<usize>],
    example: impl Fn(usize) -> ExampleRef<'a>,
    pad_id: u32,
    max_seq_len: usize,
) -> Batch {
    let n = rows.len() * max_seq_len;
    let mut b = Batch {
        rows: rows.len(),
        seq_len: max_seq_len,
        inputs: vec![pad_id; n],
        targets: vec![pad_id; n],
        positions: vec![0; n],
        cu_seqlens: vec![0],
        pad_id,
    };
    for (r, row) in rows.iter().enumerate() {
        let mut at = r * max_seq_len;
        let end = at + max_seq_len;
        for &i in row {
            let ex = example(i);
            let span = at..at + ex.len();
            fill_row(&ex, &mut b.inputs[span.clone()], &mut b.targets[span.clone()]);
            b.positions[span].iter_mut().zip(0u32..).for_each(|(p, k)| *p = k);
            at += ex.len();
            b.cu_seqlens.push(at as u32);
        }
        if at < end {
            // The padding tail is its own segment, so that no example attends to it.
            b.positions[at..end].iter_mut().zip(0u32..).for_each(|(p, k)| *p = k);
            b.cu_seqlens.push(end as u32);
        }
    }
    b
}

fn check_config(cfg: &LoaderConfig) -> Result<()> {
    ensure!(cfg.batch_size > 0, "batch size must be positive");
    ensure!(cfg.max_seq_len > 1, "max_seq_len must be at least 2");
    Ok(())
}

/// Batches in the given order; `keep_partial` keeps a last batch smaller than `batch_size`.
/// Batches without a supervised token are reported on stderr and left out.
fn batches_for_order<'a>(
    order: &[usize],
    example: impl Fn(usize) -> ExampleRef<'a>,
    pad_id: u32,
    cfg: &LoaderConfig,
    keep_partial: bool,
) -> Result<Vec<Batch>> {
    check_config(cfg)?;
    let mut out = Vec::new();
    let mut push = |b: Batch, k: usize| {
        if b.n_supervised() == 0 {
            crate::say!("warning: batch {k} has no supervised token; left out");
        } else {
            out.push(b);
        }
    };
    match cfg.mode {
        BatchMode::Dynamic | BatchMode::Fixed => {
            for (k, group) in order.chunks(cfg.batch_size).enumerate() {
                if group.len() < cfg.batch_size && !keep_partial {
                    break;
                }
                let refs: Vec<ExampleRef> = group.iter().map(|&i| example(i)).collect();
                push(padded_batch(&refs, pad_id, cfg).with_context(|| format!("batch {k}"))?, k);
            }
        }
        BatchMode::Packed => {
            let rows = pack_rows(order, |i| example(i).len(), cfg.max_seq_len);
            for (k, group) in rows.chunks(cfg.batch_size).enumerate() {
                if group.len() < cfg.batch_size && !keep_partial {
                    break;
                }
                push(packed_batch(group, &example, pad_id, cfg.max_seq_len), k);
            }
        }
    }
    Ok(out)
}

/// File order, no shuffle, the last partial batch kept: for evaluation (every example of a
/// split counts) and `sft inspect`. Batches without a supervised token are reported and left out.
pub fn batches_in_order(dataset: &Dataset, cfg: &LoaderConfig) -> Result<Vec<Batch>> {
    let order: Vec<usize> = (0..dataset.len()).collect();
    batches_for_order(&order, |i| dataset.example(i), dataset.pad_id(), cfg, true)
}

/// Like [`batches_in_order`], with `keep_partial` choosing whether a last short batch is kept
/// (SimpleLLaMA drops it).
pub fn batches_in_order_with(
    dataset: &Dataset,
    cfg: &LoaderConfig,
    keep_partial: bool,
) -> Result<Vec<Batch>> {
    let order: Vec<usize> = (0..dataset.len()).collect();
    batches_for_order(&order, |i| dataset.example(i), dataset.pad_id(), cfg, keep_partial)
}

/// [`batches_in_order`] for examples in memory (tests, inspect on a raw chat file).
pub fn batches_from_examples(examples: &[Example], pad_id: u32, cfg: &LoaderConfig) -> Result<Vec<Batch>> {
    batches_from_examples_with(examples, pad_id, cfg, true)
}

pub fn batches_from_examples_with(
    examples: &[Example],
    pad_id: u32,
    cfg: &LoaderConfig,
    keep_partial: bool,
) -> Result<Vec<Batch>> {
    let spans: Vec<Vec<[u32; 2]>> = examples.iter().map(|e| e.spans()).collect();
    let order: Vec<usize> = (0..examples.len()).collect();
    let example = |i: usize| ExampleRef { tokens: &examples[i].tokens, spans: &spans[i] };
    batches_for_order(&order, example, pad_id, cfg, keep_partial)
}

/// The training loader: seeded reshuffle each epoch, last partial batch dropped, all shards read.
pub struct Loader {
    dataset: Arc<Dataset>,
    cfg: LoaderConfig,
    state: LoaderState,
    /// This epoch's example order.
    order: Vec<usize>,
    /// Packed mode: this epoch's rows.
    rows: Vec<Vec<usize>>,
}

impl Loader {
    pub fn new(dataset: Arc<Dataset>, cfg: LoaderConfig) -> Result<Self> {
        check_config(&cfg)?;
        let mut loader = Loader {
            dataset,
            cfg,
            state: LoaderState { epoch: 0, batch_in_epoch: 0 },
            order: vec![],
            rows: vec![],
        };
        loader.plan_epoch();
        if loader.batches_per_epoch() == 0 {
            bail!(
                "{}: {} examples make no full batch of {} ({:?} mode, max_seq_len {})",
                loader.dataset.dir.display(),
                loader.dataset.len(),
                loader.cfg.batch_size,
                loader.cfg.mode,
                loader.cfg.max_seq_len
            );
        }
        Ok(loader)
    }

    fn plan_epoch(&mut self) {
        self.order = (0..self.dataset.len()).collect();
        if self.cfg.shuffle {
            Rng::new(self.cfg.seed).fork(self.state.epoch).shuffle(&mut self.order);
        }
        self.rows = match self.cfg.mode {
            BatchMode::Packed => {
                let ds = &self.dataset;
                pack_rows(&self.order, |i| ds.example_len(i), self.cfg.max_seq_len)
            }
            _ => Vec::new(),
        };
    }

    /// Full batches in the current epoch (packed: depends on the epoch's order, so it may vary
    /// slightly from epoch to epoch).
    pub fn batches_per_epoch(&self) -> usize {
        match self.cfg.mode {
            BatchMode::Packed => self.rows.len() / self.cfg.batch_size,
            _ => self.order.len() / self.cfg.batch_size,
        }
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    /// The next batch; at the end of an epoch, moves to the next (reshuffled) epoch first. A batch
    /// without a supervised token is returned as an error of type [`NoSupervisedTokens`] (the
    /// loader has already moved past it).
    pub fn next_batch(&mut self) -> Result<Batch> {
        let here = self.advance();
        let k = here.batch_in_epoch as usize;
        let (bs, ds) = (self.cfg.batch_size, &self.dataset);
        let batch = match self.cfg.mode {
            BatchMode::Packed => packed_batch(
                &self.rows[k * bs..(k + 1) * bs],
                |i| ds.example(i),
                ds.pad_id(),
                self.cfg.max_seq_len,
            ),
            _ => {
                let refs: Vec<ExampleRef> =
                    self.order[k * bs..(k + 1) * bs].iter().map(|&i| ds.example(i)).collect();
                padded_batch(&refs, ds.pad_id(), &self.cfg)
                    .with_context(|| format!("batch {} of epoch {}", here.batch_in_epoch, here.epoch))?
            }
        };
        if batch.n_supervised() == 0 {
            return Err(NoSupervisedTokens { epoch: here.epoch, batch_in_epoch: here.batch_in_epoch }.into());
        }
        Ok(batch)
    }

    /// Moves past the next batch without building it, as [`Loader::next_batch`] would (a
    /// data-parallel rank passing over the other ranks' micro-batches).
    pub fn skip_batch(&mut self) {
        self.advance();
    }

    /// The position of the next batch (moving to the next epoch first at the end of one); the
    /// loader then stands after it.
    fn advance(&mut self) -> LoaderState {
        if self.state.batch_in_epoch as usize >= self.batches_per_epoch() {
            self.state.epoch += 1;
            self.state.batch_in_epoch = 0;
            self.plan_epoch();
        }
        let here = self.state.clone();
        self.state.batch_in_epoch += 1;
        here
    }

    pub fn state(&self) -> LoaderState {
        self.state.clone()
    }

    pub fn restore(&mut self, s: &LoaderState) -> Result<()> {
        self.state = LoaderState { epoch: s.epoch, batch_in_epoch: 0 };
        self.plan_epoch();
        ensure!(
            s.batch_in_epoch as usize <= self.batches_per_epoch(),
            "loader state: batch {} of epoch {} does not exist ({} batches per epoch); was the data changed?",
            s.batch_in_epoch,
            s.epoch,
            self.batches_per_epoch()
        );
        self.state.batch_in_epoch = s.batch_in_epoch;
        Ok(())
    }

    /// Restores to the place in the data where a loader over the same data set with config
    /// `was` stood at `at` (a run resumed with another micro-batch, batch mode or row length):
    /// the same epoch, at the batch that starts with the first example of the epoch's order
    /// that `was` had not reached, or else the last batch before it. Returns how many examples
    /// before that place this epoch then sees again (0: the position maps exactly, as it always
    /// does when only the micro-batch changed and the examples consumed fill whole new
    /// micro-batches).
    pub fn restore_from(&mut self, was: &LoaderConfig, at: &LoaderState) -> Result<usize> {
        if *was == self.cfg {
            self.restore(at)?;
            return Ok(0);
        }
        let mut then = Loader::new(self.dataset.clone(), was.clone())?;
        then.restore(at)?;
        let reached = then.batch_starts()[at.batch_in_epoch as usize];
        self.restore(&LoaderState { epoch: at.epoch, batch_in_epoch: 0 })?;
        let starts = self.batch_starts();
        // The starts grow with the batch: the last one at or before `reached`, or the first.
        let k = starts.partition_point(|&s| s <= reached).saturating_sub(1);
        self.state.batch_in_epoch = k as u64;
        Ok(reached.saturating_sub(starts[k]))
    }

    /// For each batch of this epoch and for its end, how many examples of the epoch's order
    /// come before its first row (at the end, all of them: rows left over after the last full
    /// batch are never trained on).
    fn batch_starts(&self) -> Vec<usize> {
        let (batches, size, all) = (self.batches_per_epoch(), self.cfg.batch_size, self.order.len());
        match self.cfg.mode {
            // Packed rows take the order's examples in turn (leaving out those that fit no row).
            BatchMode::Packed => {
                let mut place = vec![0; self.dataset.len()];
                for (p, &i) in self.order.iter().enumerate() {
                    place[i] = p;
                }
                let mut starts: Vec<usize> = (0..batches).map(|k| place[self.rows[k * size][0]]).collect();
                starts.push(all);
                starts
            }
            _ => (0..batches).map(|k| k * size).chain([all]).collect(),
        }
    }
}
