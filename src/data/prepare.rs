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
use super::shard::{read_header, Shard, ShardWriter};
use super::template::{tokenizer_config_beside, tokenizer_config_json, TOKENIZER_CONFIG_FILE};
use super::tokenizer::{ChatTokenizer, FormatChoice};
use crate::lock::{sibling, DirLock};
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
    /// The chat format (default: the tokenizer's template when it has one, else SimpleLLaMA's).
    #[serde(default)]
    pub chat: FormatChoice,
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
            chat: FormatChoice::default(),
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
    /// Written into every shard of the run (hex); readers refuse shards of another run.
    #[serde(default)]
    pub set_id: String,
    pub seconds: f64,
    /// All tokens formatted and tokenized (skipped examples included) per second.
    pub tokens_per_s: f64,
    pub shards: Vec<PathBuf>,
    /// Every shard of the set: a reader checks the directory's shard files against this list, so
    /// that a shard added, removed, copied or swapped between splits is refused (older sets,
    /// without it, are checked by name and example counts only).
    #[serde(default)]
    pub shard_files: Vec<ShardRecord>,
}

/// One shard of a prepared set as `prepare.json` records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRecord {
    /// The file name in the directory, e.g. `train-00000.bin`.
    pub file: String,
    pub n_examples: u64,
    /// The header's checksum (hex): tells two shards of one run apart when their counts agree.
    pub checksum: String,
}

impl ShardRecord {
    fn of(path: &Path) -> Result<Self> {
        let h = read_header(path)?;
        let file = path.file_name().and_then(|n| n.to_str()).context("a shard file name")?.to_string();
        Ok(ShardRecord { file, n_examples: h.n_examples, checksum: format!("{:016x}", h.checksum) })
    }
}

/// Name of the `index`-th shard of a split.
pub fn shard_name(split: &str, index: usize) -> String {
    format!("{split}-{index:05}.bin")
}

/// Files that belong to a prepared set (everything else in the directory is the user's and kept).
/// Exact names only: a prefix match also claimed the user's `prepare.json.bak` or
/// `train-notes.bin`, which the swap then deleted with the old set.
fn is_set_file(name: &str) -> bool {
    let name = name.strip_suffix(".tmp").unwrap_or(name);
    let shard = ["train-", "val-"].iter().any(|split| {
        name.strip_prefix(split)
            .and_then(|rest| rest.strip_suffix(".bin"))
            .is_some_and(|n| n.len() >= 5 && n.bytes().all(|b| b.is_ascii_digit()))
    });
    shard || ["spool.bin", "tokenizer.json", TOKENIZER_CONFIG_FILE, "prepare.json"].contains(&name)
}

/// Test hook: with `SFT_PREPARE_KILL_AT=N`, the process aborts (no cleanup, like a SIGKILL) at
/// the N-th step of a prepare, so that tests can check that a kill at every step leaves the old
/// set or the new one.
fn failpoint(step: &str) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static STEP: AtomicUsize = AtomicUsize::new(0);
    let Some(at) = std::env::var("SFT_PREPARE_KILL_AT").ok().and_then(|v| v.parse::<usize>().ok()) else {
        return;
    };
    if STEP.fetch_add(1, Ordering::SeqCst) + 1 == at {
        eprintln!("SFT_PREPARE_KILL_AT={at}: aborting at step {at} ({step})");
        std::process::abort();
    }
}

/// The sibling directories a prepare into `out` uses: the new set is built in `staging` and
/// swapped in whole; `old` holds the previous set where the swap cannot be atomic.
fn sibling_dirs(out: &Path) -> Result<(PathBuf, PathBuf)> {
    Ok((sibling(out, "prepare-tmp")?, sibling(out, "prepare-old")?))
}

/// The directory a prepare writes: `--out` itself, or the directory a symbolic link there points
/// to. The swap renames directories, so a link would itself be replaced by a real directory (and
/// its target left with the old set); a regular file would be renamed away as if it were an old
/// set. Both are settled before anything is touched.
fn resolve_out(out: &Path) -> Result<PathBuf> {
    match std::fs::symlink_metadata(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(out.to_path_buf()),
        Err(e) => Err(e).with_context(|| format!("--out {}: cannot stat", out.display())),
        Ok(meta) => {
            let target = std::fs::canonicalize(out).map_err(|e| {
                let what = if meta.file_type().is_symlink() { "a symbolic link whose target" } else { "it" };
                anyhow::anyhow!("--out {}: {what} cannot be resolved: {e}", out.display())
            })?;
            ensure!(
                target.is_dir(),
                "--out {} exists and is not a directory{}: refusing to replace it (give a directory for \
                 the prepared set)",
                out.display(),
                if meta.file_type().is_symlink() {
                    format!(" (a symbolic link to {})", target.display())
                } else {
                    String::new()
                }
            );
            Ok(target)
        }
    }
}

/// Refuses to replace a directory that is not a prepared set: its files would be carried into
/// the new set and the directory itself exchanged, which is only meant for our own directories.
/// An empty directory, or one holding only a set's files (an older set without prepare.json
/// included), is fine; user files beside a `prepare.json` are carried over.
fn ensure_replaceable(out: &Path) -> Result<()> {
    if !out.is_dir() || out.join("prepare.json").is_file() {
        return Ok(());
    }
    let mut foreign: Vec<String> = Vec::new();
    for entry in std::fs::read_dir(out).with_context(|| format!("{}: cannot list", out.display()))? {
        let name = entry.with_context(|| format!("{}: cannot list", out.display()))?.file_name();
        let name = name.to_string_lossy();
        if !is_set_file(&name) {
            foreign.push(format!("`{name}`"));
        }
    }
    if !foreign.is_empty() {
        foreign.sort();
        let more = if foreign.len() > 3 { format!(" and {} more", foreign.len() - 3) } else { String::new() };
        foreign.truncate(3);
        bail!(
            "--out {} is a directory that holds other files ({}{more}) and no prepare.json: not a \
             prepared directory, so it is left as it is; give a new or empty directory",
            out.display(),
            foreign.join(", ")
        );
    }
    Ok(())
}

/// Moves the user's entries (anything not part of a prepared set) from `from` into `to`.
fn move_user_entries(from: &Path, to: &Path) -> Result<()> {
    for entry in std::fs::read_dir(from).with_context(|| format!("{}: cannot list", from.display()))? {
        let entry = entry.with_context(|| format!("{}: cannot list", from.display()))?;
        let name = entry.file_name();
        if is_set_file(&name.to_string_lossy()) || to.join(&name).exists() {
            continue;
        }
        std::fs::rename(entry.path(), to.join(&name))
            .with_context(|| format!("{}: cannot move into {}", entry.path().display(), to.display()))?;
        failpoint("moved back a file of the user");
    }
    Ok(())
}

/// Finishes what an interrupted prepare left beside `out`: the old set is restored where the
/// non-atomic swap was cut between its renames, the user's files are moved back, and the
/// leftover directories are removed.
fn recover(out: &Path, staging: &Path, old: &Path) -> Result<()> {
    if old.exists() {
        if !out.exists() {
            std::fs::rename(old, out).with_context(|| format!("{}: cannot restore", old.display()))?;
        } else {
            move_user_entries(old, out)?;
            std::fs::remove_dir_all(old).with_context(|| format!("{}: cannot remove", old.display()))?;
        }
    }
    if staging.exists() {
        if out.exists() {
            move_user_entries(staging, out)?;
        }
        std::fs::remove_dir_all(staging).with_context(|| format!("{}: cannot remove", staging.display()))?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) {
    // Best effort: a directory cannot be opened for syncing on every platform.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Atomically exchanges two directories (Linux `renameat2(RENAME_EXCHANGE)`); `false` where the
/// platform or file system cannot.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> bool {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let (Ok(ca), Ok(cb)) = (CString::new(a.as_os_str().as_bytes()), CString::new(b.as_os_str().as_bytes()))
    else {
        return false;
    };
    const RENAME_EXCHANGE: libc::c_uint = 2;
    // SAFETY: two valid NUL-terminated paths; the syscall only reads them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            RENAME_EXCHANGE,
        )
    };
    rc == 0
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> bool {
    false
}

/// Puts the complete set in `staging` at `out`, so that at every instant `out` holds the old
/// complete set or the new one (where the exchange is not available, `out` is briefly absent
/// between two renames: refused by every reader, and restored by the next prepare).
fn swap_in(out: &Path, staging: &Path, old: &Path) -> Result<()> {
    let parent = staging.parent().unwrap_or(Path::new("."));
    if !out.exists() {
        std::fs::rename(staging, out)
            .with_context(|| format!("{}: cannot move into place", out.display()))?;
        sync_dir(parent);
        failpoint("renamed the new set into place");
        return Ok(());
    }
    let displaced = if exchange(staging, out) {
        sync_dir(parent);
        failpoint("exchanged the new set with the old one");
        staging
    } else {
        std::fs::rename(out, old).with_context(|| format!("{}: cannot move aside", out.display()))?;
        failpoint("moved the old set aside");
        std::fs::rename(staging, out)
            .with_context(|| format!("{}: cannot move into place", out.display()))?;
        sync_dir(parent);
        failpoint("renamed the new set into place");
        old
    };
    move_user_entries(displaced, out)?;
    std::fs::remove_dir_all(displaced).with_context(|| format!("{}: cannot remove", displaced.display()))?;
    failpoint("removed the old set");
    Ok(())
}

/// Writes a split's examples into shards of about [`SHARD_TOKENS`] tokens.
struct SplitWriter {
    dir: PathBuf,
    split: &'static str,
    fingerprint: u64,
    pad_id: u32,
    vocab_size: u32,
    set_id: u64,
    current: Option<ShardWriter>,
    written: Vec<PathBuf>,
    n_examples: usize,
}

impl SplitWriter {
    fn writer(&self, path: &Path) -> Result<ShardWriter> {
        Ok(ShardWriter::create(path, self.fingerprint, self.pad_id)?
            .with_vocab_size(self.vocab_size)
            .with_set_id(self.set_id))
    }

    fn push(&mut self, tokens: &[u32], spans: &[[u32; 2]]) -> Result<()> {
        if self.current.as_ref().is_some_and(|w| w.n_tokens() >= SHARD_TOKENS) {
            self.flush()?;
        }
        if self.current.is_none() {
            let path = self.dir.join(shard_name(self.split, self.written.len()));
            self.current = Some(self.writer(&path)?);
        }
        self.n_examples += 1;
        self.current.as_mut().expect("just created").push(tokens, spans)
    }

    fn flush(&mut self) -> Result<()> {
        if let Some(w) = self.current.take() {
            self.written.push(w.finish()?);
            failpoint("wrote a shard");
        }
        Ok(())
    }

    /// Flushes; a split without examples still gets one (empty) shard, so that it opens as an
    /// empty dataset rather than as a missing one.
    fn finish(mut self) -> Result<(usize, Vec<PathBuf>)> {
        self.flush()?;
        if self.written.is_empty() {
            let path = self.dir.join(shard_name(self.split, 0));
            self.written.push(self.writer(&path)?.finish()?);
            failpoint("wrote a shard");
        }
        Ok((self.n_examples, self.written))
    }
}

/// Writes `dir/prepare.json` for shards made without `sft prepare` (by another tool, or a test
/// that rewrites a prepared set): it records the `train-NNNNN.bin` and `val-NNNNN.bin` files
/// there now, which must share one tokenizer and one set id, so that
/// [`super::Dataset::open`] accepts the directory as it is. Written to a temporary file and
/// renamed.
pub fn record_shards(dir: &Path) -> Result<PrepareReport> {
    use super::loader::{split_paths, Split};
    let mut report = PrepareReport::default();
    let mut first: Option<(PathBuf, u64, u64)> = None;
    for split in [Split::Train, Split::Val] {
        for path in split_paths(dir, split)? {
            let h = read_header(&path)?;
            let (p0, f0, s0) = first.get_or_insert_with(|| (path.clone(), h.fingerprint, h.set_id));
            ensure!(
                (h.fingerprint, h.set_id) == (*f0, *s0),
                "{} and {}: shards of different tokenizers or runs cannot be recorded as one set",
                path.display(),
                p0.display()
            );
            match split {
                Split::Train => report.n_train += h.n_examples as usize,
                Split::Val => report.n_val += h.n_examples as usize,
            }
            report.shard_files.push(ShardRecord::of(&path)?);
            report.shards.push(path);
        }
    }
    let Some((_, fingerprint, set_id)) = first else { bail!("{}: no shards to record", dir.display()) };
    report.tokenizer_fingerprint = format!("{fingerprint:016x}");
    report.set_id = format!("{set_id:016x}");
    let meta = serde_json::json!({ "options": null, "report": &report });
    let (path, tmp) = (dir.join("prepare.json"), dir.join("prepare.json.tmp"));
    std::fs::write(&tmp, serde_json::to_string_pretty(&meta)?)
        .and_then(|_| std::fs::rename(&tmp, &path))
        .with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(report)
}

/// Refuses the flags of `sft eval` / `sft inspect` that the input cannot honour, instead of
/// ignoring them: `--train-on` for a prepared directory made with another choice (its masks are
/// in the shards), `--split` for a chat file (which has no splits).
pub fn check_view_flags(data: &Path, train_on: Option<TrainOn>, split_given: bool) -> Result<()> {
    let flag = |t: TrainOn| match t {
        TrainOn::FinalReply => "final-reply",
        TrainOn::AllAssistant => "all-assistant",
    };
    if data.is_dir() {
        let Some(asked) = train_on else { return Ok(()) };
        let meta = data.join("prepare.json");
        let recorded: Option<TrainOn> = std::fs::read_to_string(&meta)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| serde_json::from_value(v["options"]["train_on"].clone()).ok());
        ensure!(
            recorded == Some(asked),
            "--train-on {}: {} was prepared with {} (its masks are in the shards); re-run `sft prepare \
             --train-on {}` for those masks",
            flag(asked),
            data.display(),
            recorded.map_or("a choice prepare.json does not record".to_string(), |r| format!(
                "--train-on {}",
                flag(r)
            )),
            flag(asked)
        );
    } else {
        ensure!(
            !split_given,
            "--split: {} is a chat file, which has no splits (they are made by `sft prepare`)",
            data.display()
        );
    }
    Ok(())
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
    ensure!(opts.max_seq_len >= 2, "max_seq_len must be at least 2");
    ensure!(
        opts.train_share > 0.0 && opts.train_share <= 1.0,
        "train share must be in (0, 1], got {}",
        opts.train_share
    );
    let out = &resolve_out(&opts.out_dir)?;
    let tok = ChatTokenizer::load(&opts.tokenizer, &opts.chat)?;
    // Without the lock a second prepare into the same --out took the first one's staging
    // directory for a crash's leftovers and removed it under the running prepare.
    let what = format!("--out {}", out.display());
    let _lock = DirLock::acquire(sibling(out, "prepare-lock")?, &what, "sft prepare")?;
    let (staging, old) = sibling_dirs(out)?;
    recover(out, &staging, &old)?;
    ensure_replaceable(out)?;
    std::fs::create_dir_all(&staging)
        .with_context(|| format!("{}: cannot create output directory", staging.display()))?;
    // Distinct per run, so that shards of two runs in one directory are told apart even when
    // they share a tokenizer.
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let set_id =
        Rng::new(nanos as u64 ^ ((std::process::id() as u64) << 32) ^ tok.fingerprint()).next_u64() | 1;
    let report = match build_set(opts, &tok, &staging, set_id) {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    sync_dir(&staging);
    failpoint("built the new set");
    swap_in(out, &staging, &old)?;
    Ok(report)
}

/// Writes a complete prepared set (shards, tokenizer.json, prepare.json) into `dir`.
fn build_set(opts: &PrepareOptions, tok: &ChatTokenizer, dir: &Path, set_id: u64) -> Result<PrepareReport> {
    let start = Instant::now();
    let vocab_size = u32::try_from(tok.vocab_size()).context("tokenizer: more than 2^32 ids")?;
    let spool_path = dir.join("spool.bin");
    let mut spool =
        ShardWriter::create(&spool_path, tok.fingerprint(), tok.pad_id())?.with_vocab_size(vocab_size);
    let mut report = PrepareReport {
        tokenizer_fingerprint: format!("{:016x}", tok.fingerprint()),
        set_id: format!("{set_id:016x}"),
        ..Default::default()
    };
    let mut all_tokens = 0u64;
    // Characters the tokenizer has no token for are dropped from the texts, as SimpleLLaMA's
    // bpe_8k drops tab, `{` and every non-ASCII character: its recipe trains on what is left,
    // so the tokens stay, but it is said (examples touched, and which characters).
    let (mut lossy_examples, mut lost_chars) = (0usize, std::collections::BTreeSet::new());
    let mut chunk: Vec<Conversation> = Vec::with_capacity(CHUNK);
    let mut flush = |chunk: &mut Vec<Conversation>, report: &mut PrepareReport| -> Result<()> {
        for conv in chunk.iter() {
            let texts =
                std::iter::once(&conv.system).chain(conv.turns.iter().flat_map(|t| [&t.user, &t.assistant]));
            let lost: Vec<char> = texts.flat_map(|t| tok.dropped_chars(t)).collect();
            if !lost.is_empty() {
                lossy_examples += 1;
                lost_chars.extend(lost);
            }
        }
        let first = report.n_conversations;
        let examples = tokenize_all(tok, chunk, first, opts.train_on)
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
    if lossy_examples > 0 {
        let shown: String = lost_chars.iter().take(12).map(|c| format!("{c:?} ")).collect();
        eprintln!(
            "warning: {lossy_examples} of {} examples hold characters the tokenizer has no token for, which \
             it drops from the text ({} distinct: {shown}{}); a tokenizer with byte fallback or every byte \
             would keep them",
            report.n_conversations,
            lost_chars.len(),
            if lost_chars.len() > 12 { "..." } else { "" }
        );
    }
    failpoint("wrote the spool");

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
    let n_train = train_count(n, opts.train_share);
    ensure!(
        n_train > 0,
        "--train-share {} leaves the train split empty ({n} examples kept, round({n} × {}) = 0): \
         raise --train-share",
        opts.train_share,
        opts.train_share
    );
    if n_train == n && opts.train_share < 1.0 {
        // Refusing would stop every small file at the default share; the trainer runs without
        // validation when the split is empty, so this only has to be said.
        eprintln!(
            "warning: --train-share {} leaves the validation split empty ({n} examples kept, \
             round({n} × {}) = {n}): no validation loss; lower --train-share for one, or pass \
             --train-share 1 to say that none is meant",
            opts.train_share, opts.train_share
        );
    }
    let is_val = split_assignment(n, opts.train_share, opts.seed);
    let mk = |split| SplitWriter {
        dir: dir.to_path_buf(),
        split,
        fingerprint: tok.fingerprint(),
        pad_id: tok.pad_id(),
        vocab_size,
        set_id,
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
    report.shard_files =
        train_shards.iter().chain(&val_shards).map(|p| ShardRecord::of(p)).collect::<Result<_>>()?;
    // Named where they will be once the set is swapped in.
    report.shards = train_shards
        .into_iter()
        .chain(val_shards)
        .map(|p| opts.out_dir.join(p.file_name().expect("a shard file")))
        .collect();
    report.seconds = start.elapsed().as_secs_f64();
    report.tokens_per_s = all_tokens as f64 / report.seconds.max(1e-9);
    // The shards' tokenizer travels with them: `sft train --data DIR` finds it there.
    let tok_copy = dir.join("tokenizer.json");
    std::fs::copy(&opts.tokenizer, &tok_copy)
        .with_context(|| format!("{}: cannot write", tok_copy.display()))?;
    std::fs::File::open(&tok_copy)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("{}: cannot sync", tok_copy.display()))?;
    failpoint("copied the tokenizer");
    // The template travels too, so that the set's tokenizer loads in the format it was made in
    // (and a SimpleLLaMA-format set has no template beside its tokenizer).
    if let Some(tpl) = tok.template() {
        let config = tokenizer_config_json(tpl, Some(&tokenizer_config_beside(&opts.tokenizer)))?;
        let config_path = dir.join(TOKENIZER_CONFIG_FILE);
        std::fs::write(&config_path, serde_json::to_string_pretty(&config)?)
            .and_then(|_| std::fs::File::open(&config_path)?.sync_all())
            .with_context(|| format!("{}: cannot write", config_path.display()))?;
    }
    let meta = serde_json::json!({ "options": opts, "report": &report });
    let meta_path = dir.join("prepare.json");
    std::fs::write(&meta_path, serde_json::to_string_pretty(&meta)?)
        .and_then(|_| std::fs::File::open(&meta_path)?.sync_all())
        .with_context(|| format!("{}: cannot write", meta_path.display()))?;
    failpoint("wrote prepare.json");
    Ok(report)
}

/// The train split's size: `round(n · train_share)` (SimpleLLaMA shuffles, then cuts).
fn train_count(n: usize, train_share: f64) -> usize {
    ((n as f64 * train_share).round() as usize).min(n)
}

/// `true` for the examples of the validation split: a seeded shuffle of `0..n`, whose first
/// `round(n · train_share)` go to train (SimpleLLaMA shuffles, then cuts).
pub fn split_assignment(n: usize, train_share: f64, seed: u64) -> Vec<bool> {
    let mut order: Vec<usize> = (0..n).collect();
    Rng::new(seed).shuffle(&mut order);
    let n_train = train_count(n, train_share);
    let mut is_val = vec![false; n];
    for &i in &order[n_train..] {
        is_val[i] = true;
    }
    is_val
}
