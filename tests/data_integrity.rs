//! Issue 13, data side: nothing silently wrong, nothing lost. Each test reproduces one reported
//! case: corrupt shards, out-of-vocabulary ids, flipped bytes, another tokenizer's shards, an
//! interrupted `sft prepare`, an interrupted log rewrite, pathological tokenizer input, and the
//! chat parser's silent drops.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use common::cli::{output_with_env as sft, run_fails as sft_fails, s};
use common::data::{synthetic_conversations, write_simplellama_json};
use sft::data::shard::{Shard, ShardWriter};
use sft::data::{prepare, read_chat_file, train_tokenizer, ChatTokenizer, Dataset, PrepareOptions, Split};

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Byte positions of a shard's arrays, read from its header: (tokens, offsets, span offsets, spans).
fn layout(b: &[u8]) -> (usize, usize, usize, usize) {
    let header_len = u32_at(b, 12) as usize;
    let (n_examples, n_tokens) = (u64_at(b, 24) as usize, u64_at(b, 32) as usize);
    let offsets = header_len + 4 * (n_tokens + n_tokens % 2);
    let span_offsets = offsets + 8 * (n_examples + 1);
    (header_len, offsets, span_offsets, span_offsets + 8 * (n_examples + 1))
}

/// Opens a shard, turning a panic into a test failure that names the case.
fn open_no_panic(path: &Path) -> anyhow::Result<Shard> {
    match catch_unwind(AssertUnwindSafe(|| Shard::open(path))) {
        Ok(r) => r,
        Err(_) => panic!("Shard::open panicked on {}", path.display()),
    }
}

fn trained_tokenizer(dir: &Path, name: &str, seed: u64) -> (PathBuf, ChatTokenizer) {
    let path = dir.join(name);
    let tok = train_tokenizer(&synthetic_conversations(200, seed), 400, &path).unwrap();
    (path, tok)
}

fn prepared(dir: &Path, name: &str, tok: &Path, seed: u64) -> PathBuf {
    let data = dir.join(format!("{name}.json"));
    write_simplellama_json(&data, &synthetic_conversations(120, seed));
    let out = dir.join(name);
    let mut opts = PrepareOptions::new(&data, tok, &out);
    opts.max_seq_len = 512;
    opts.train_share = 0.8;
    prepare(&opts).unwrap();
    out
}

// ---- 1: offsets out of range ------------------------------------------------------------------

#[test]
fn span_offsets_out_of_range_are_refused_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let (tok_path, _) = trained_tokenizer(dir.path(), "tok.json", 7);
    let out = prepared(dir.path(), "prep", &tok_path, 3);
    let shard = out.join("train-00000.bin");
    let good = std::fs::read(&shard).unwrap();
    let (_, offsets, span_offsets, _) = layout(&good);
    let n_spans = u64_at(&good, 40);
    let cases: Vec<(&str, usize, u64)> = vec![
        ("span offset past the spans", span_offsets + 8, n_spans + 1000),
        ("span offset huge", span_offsets + 8, u64::MAX),
        ("token offset past the tokens", offsets + 8, u64_at(&good, 32) + 5),
        ("token offset huge", offsets + 16, u64::MAX - 3),
    ];
    for (what, at, value) in cases {
        let mut v = good.clone();
        v[at..at + 8].copy_from_slice(&value.to_le_bytes());
        std::fs::write(&shard, &v).unwrap();
        let err = format!("{:#}", open_no_panic(&shard).err().unwrap_or_else(|| panic!("{what}: accepted")));
        assert!(err.contains("train-00000.bin") && err.contains("offset"), "{what}: {err}");
        // The commands that open it say so too, without a panic.
        let err = sft_fails(&["inspect", "--data", s(&out), "--json"]);
        assert!(err.contains("train-00000.bin"), "{what}: {err}");
    }
}

// ---- 2: out-of-vocabulary ids -----------------------------------------------------------------

#[test]
fn out_of_vocabulary_ids_are_refused_when_the_data_is_opened() {
    let dir = tempfile::tempdir().unwrap();
    let (tok_path, tok) = trained_tokenizer(dir.path(), "tok.json", 7);
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut w = ShardWriter::create(&data.join("train-00000.bin"), tok.fingerprint(), tok.pad_id()).unwrap();
    for k in 0..16u32 {
        let bad = if k == 5 { 400_000 } else { 20 + k };
        w.push(&[8, 10, bad, 7], &[[2, 4]]).unwrap();
    }
    w.finish().unwrap();
    sft::data::prepare::record_shards(&data).unwrap();
    let err = sft_fails(&["inspect", "--data", s(&data), "--tokenizer", s(&tok_path), "--json"]);
    assert!(err.contains("train-00000.bin") && err.contains("example 5") && err.contains("400000"), "{err}");
}

// ---- 3: checksum ------------------------------------------------------------------------------

#[test]
fn flipped_bytes_changed_spans_and_pad_id_fail_the_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let (tok_path, _) = trained_tokenizer(dir.path(), "tok.json", 7);
    let out = prepared(dir.path(), "prep", &tok_path, 3);
    let shard = out.join("train-00000.bin");
    let good = std::fs::read(&shard).unwrap();
    assert!(open_no_panic(&shard).is_ok());
    let (tokens, _, _, spans) = layout(&good);
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    // A token id that stays inside the vocabulary (11 <-> 10).
    let mut v = good.clone();
    v[tokens + 4 * 3] ^= 1;
    cases.push(("token byte", v));
    // The first span ends one token earlier (still a valid span when it is longer than one).
    let mut v = good.clone();
    let (a, b) = (u32_at(&v, spans), u32_at(&v, spans + 4));
    let shorter = if b - a >= 2 { b - 1 } else { b + 1 };
    v[spans + 4..spans + 8].copy_from_slice(&shorter.to_le_bytes());
    cases.push(("span end", v));
    let mut v = good.clone();
    v[48] ^= 1;
    cases.push(("pad id", v));
    for (what, v) in cases {
        std::fs::write(&shard, &v).unwrap();
        let err = format!("{:#}", open_no_panic(&shard).err().unwrap_or_else(|| panic!("{what}: accepted")));
        assert!(err.contains("train-00000.bin") && err.contains("checksum"), "{what}: {err}");
    }

    // A version-1 shard (no checksum) asks for a new `sft prepare`.
    let mut v1 = vec![0u8; 64 + 16];
    v1[0..8].copy_from_slice(b"SFTSHARD");
    v1[8..12].copy_from_slice(&1u32.to_le_bytes());
    v1[12..16].copy_from_slice(&64u32.to_le_bytes());
    v1[48..52].copy_from_slice(&2u32.to_le_bytes());
    let old = dir.path().join("old.bin");
    std::fs::write(&old, &v1).unwrap();
    let err = format!("{:#}", open_no_panic(&old).err().expect("a version-1 shard is refused"));
    assert!(err.contains("old.bin") && err.contains("version 1") && err.contains("sft prepare"), "{err}");
}

// ---- 4: tokenizer fingerprints ----------------------------------------------------------------

#[test]
fn shards_of_another_tokenizer_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (tok_a, a) = trained_tokenizer(dir.path(), "a.json", 7);
    let (tok_b, b) = trained_tokenizer(dir.path(), "b.json", 8);
    assert_eq!(a.vocab_size(), b.vocab_size(), "same vocabulary size: only the fingerprint tells");
    assert_ne!(a.fingerprint(), b.fingerprint());
    let dir_a = prepared(dir.path(), "prep_a", &tok_a, 3);
    let dir_b = prepared(dir.path(), "prep_b", &tok_b, 3);

    // The tokenizer in use is not the shards' one.
    let err = sft_fails(&["inspect", "--data", s(&dir_a), "--tokenizer", s(&tok_b), "--json"]);
    let (fa, fb) = (format!("{:016x}", a.fingerprint()), format!("{:016x}", b.fingerprint()));
    assert!(err.contains(&fa) && err.contains(&fb), "both fingerprints: {err}");
    assert!(err.contains("b.json") && err.contains("train-00000.bin"), "both files: {err}");

    // A train split and a val split of different tokenizers in one directory.
    std::fs::copy(dir_b.join("val-00000.bin"), dir_a.join("val-00000.bin")).unwrap();
    for split in [Split::Train, Split::Val] {
        let err = format!("{:#}", Dataset::open(&dir_a, split).expect_err("a mixed directory is refused"));
        assert!(err.contains("val-00000.bin") && err.contains(&fb), "{err}");
    }
}

// ---- 5: an interrupted `sft prepare` ----------------------------------------------------------

/// A prepared directory is whole: every shard and tokenizer.json agree with each other.
fn check_whole(dir: &Path) -> anyhow::Result<u64> {
    let tok = ChatTokenizer::from_file(&dir.join("tokenizer.json"))?;
    let train = Dataset::open(dir, Split::Train)?;
    let val = Dataset::open(dir, Split::Val)?;
    anyhow::ensure!(train.fingerprint() == tok.fingerprint() && val.fingerprint() == tok.fingerprint());
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("prepare.json"))?)?;
    let n_train = meta["report"]["n_train"].as_u64().unwrap();
    let n_val = meta["report"]["n_val"].as_u64().unwrap();
    anyhow::ensure!((train.len() as u64, val.len() as u64) == (n_train, n_val), "counts disagree");
    Ok(tok.fingerprint())
}

#[test]
fn an_interrupted_prepare_leaves_the_old_or_the_new_set_never_a_mix() {
    let dir = tempfile::tempdir().unwrap();
    let (tok_a, a) = trained_tokenizer(dir.path(), "a.json", 7);
    let (tok_b, b) = trained_tokenizer(dir.path(), "b.json", 8);
    let data = dir.path().join("chat.json");
    write_simplellama_json(&data, &synthetic_conversations(300, 5));
    let out = dir.path().join("prep");
    let prep = |tok: &Path, envs: &[(&str, &str)]| {
        sft(
            &["prepare", "--data", s(&data), "--tokenizer", s(tok), "--out", s(&out), "--train-share", "0.8"],
            envs,
        )
    };

    // The reported case: new shards renamed into place, old tokenizer.json and prepare.json.
    assert!(prep(&tok_a, &[]).status.success());
    let dir_b = dir.path().join("prep_b");
    std::fs::create_dir_all(&dir_b).unwrap();
    let mut opts = PrepareOptions::new(&data, &tok_b, &dir_b);
    opts.train_share = 0.8;
    prepare(&opts).unwrap();
    for name in ["train-00000.bin", "val-00000.bin"] {
        std::fs::copy(dir_b.join(name), out.join(name)).unwrap();
    }
    let err = sft_fails(&["inspect", "--data", s(&out), "--json"]);
    assert!(err.contains("tokenizer.json") && err.contains("train-00000.bin"), "{err}");

    // A kill at every step of a prepare over an old set: always one whole set.
    assert!(prep(&tok_a, &[]).status.success());
    // The user's own file in the directory survives every kill (moved back by the next prepare).
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let mut saw_new = false;
    let mut aborted = 0;
    for step in 1..=20 {
        let before = check_whole(&out).unwrap_or_else(|e| panic!("before step {step}: {e:#}"));
        let next = if before == a.fingerprint() { &tok_b } else { &tok_a };
        let o = prep(next, &[("SFT_PREPARE_KILL_AT", &step.to_string())]);
        if !o.status.success() {
            aborted += 1;
        }
        let after =
            check_whole(&out).unwrap_or_else(|e| panic!("killed at step {step}: a partial set: {e:#}"));
        assert!(after == a.fingerprint() || after == b.fingerprint());
        saw_new |= after != before;
        if o.status.success() {
            assert_ne!(after, before, "a finished prepare replaced the set");
            break;
        }
    }
    eprintln!("a prepare killed at each of its {aborted} steps left a whole set each time");
    assert!(aborted >= 3, "the failpoints cover the steps of a prepare ({aborted} kills)");
    assert!(saw_new);
    // A finished prepare leaves nothing beside the directory.
    assert!(prep(&tok_a, &[]).status.success());
    let leftovers_after: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("prep") && n != "prep" && n != "prep_b")
        .collect();
    assert!(leftovers_after.is_empty(), "a finished prepare cleans up: {leftovers_after:?}");
    assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "mine");
}

// ---- 7, 8: tokenizer training -----------------------------------------------------------------

#[test]
fn a_long_string_without_whitespace_does_not_make_long_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let mut convs = synthetic_conversations(50, 7);
    // 96 KB of one letter pattern: before the fix, BPE merged it into ever longer tokens, each
    // merge rescanning the whole string (quadratic).
    convs[0].turns[0].user = "abcdefgh".repeat(12 * 1024);
    let path = dir.path().join("tok.json");
    let t0 = std::time::Instant::now();
    let tok = train_tokenizer(&convs, 600, &path).unwrap();
    eprintln!("trained on a 96 KB word in {:.2} s", t0.elapsed().as_secs_f64());
    let longest = (0..tok.vocab_size() as u32)
        .filter_map(|id| tok.inner().id_to_token(id))
        .map(|t| t.chars().count())
        .max()
        .unwrap();
    // The bound on a training word, plus the prefix space (`Ġ`) each piece gets.
    assert!(longest <= sft::data::tokenizer::MAX_TRAIN_WORD_BYTES + 1, "a {longest}-char token");
}

#[test]
fn absurd_vocabulary_sizes_are_refused_with_the_range() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("chat.json");
    write_simplellama_json(&data, &synthetic_conversations(10, 1));
    for size in ["4000000000", "18446744073709551615", "100"] {
        let err = sft_fails(&[
            "tokenizer",
            "train",
            "--data",
            s(&data),
            "--vocab-size",
            size,
            "--out",
            "/dev/null/x",
        ]);
        assert!(err.contains("266") && err.contains("vocab"), "{size}: {err}");
    }
}

// ---- 9: the chat parser and inspect -----------------------------------------------------------

const OK: &str = r#"{"Template": ["CUSTOM"], "User": ["u"], "Assistant": ["a"]}"#;

#[test]
fn a_utf8_bom_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in
        [("list.json", format!("\u{feff}[{OK}, {OK}]")), ("lines.jsonl", format!("\u{feff}{OK}\n{OK}\n"))]
    {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        assert_eq!(read_chat_file(&p).unwrap_or_else(|e| panic!("{name}: {e:#}")).len(), 2);
    }
}

#[test]
fn parse_errors_and_dropped_data_name_the_example() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &[&str])] = &[
        (
            r#"{"Template": ["CUSTOM"], "User": ["u",], "Assistant": ["a"]}"#,
            &["example 1", "line 2", "column"],
        ),
        (
            r#"{"Template": ["CUSTOM"], "User": ["u"], "User": ["v"], "Assistant": ["a"]}"#,
            &["example 1", "duplicate", "User"],
        ),
        (
            r#"{"Template": ["one", "two"], "User": ["u"], "Assistant": ["a"]}"#,
            &["example 1", "Template", "2 strings"],
        ),
        (
            r#"{"Template": ["CUSTOM"], "User": ["u"], "Assistant": ["a"], "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}"#,
            &["example 1", "messages", "User"],
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "conversations": []}"#,
            &["example 1", "messages", "conversations"],
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x", "content": "z"}, {"role": "assistant", "content": "y"}]}"#,
            &["example 1", "duplicate", "content"],
        ),
    ];
    for (i, (bad, needles)) in cases.iter().enumerate() {
        for (ext, text) in [("json", format!("[{OK},\n{bad}]")), ("jsonl", format!("{OK}\n{bad}\n"))] {
            let p = dir.path().join(format!("bad{i}.{ext}"));
            std::fs::write(&p, text).unwrap();
            let err = format!(
                "{:#}",
                read_chat_file(&p).err().unwrap_or_else(|| panic!("case {i} {ext}: accepted"))
            );
            assert!(err.contains(&format!("bad{i}.{ext}")), "{err}");
            for n in *needles {
                assert!(err.contains(n), "case {i} {ext}: {err:?} lacks {n:?}");
            }
        }
    }
}

#[test]
fn inspect_skips_and_counts_long_examples_like_prepare() {
    let dir = tempfile::tempdir().unwrap();
    let (tok_path, _) = trained_tokenizer(dir.path(), "tok.json", 7);
    let mut convs = synthetic_conversations(8, 1);
    for c in convs.iter_mut().take(4) {
        c.turns[0].user = "gravity ".repeat(500);
    }
    let data = dir.path().join("chat.json");
    write_simplellama_json(&data, &convs);
    let args = ["inspect", "--data", s(&data), "--tokenizer", s(&tok_path)];
    let o = sft(
        &[&args[..], &["--max-seq-len", "450", "--batch-size", "4", "--no-shuffle", "--json"]].concat(),
        &[],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "long examples are skipped and counted, as in prepare: {err}");
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 1, "the 4 short examples make one batch");
    assert!(err.contains("4 of 8") || err.contains("50.00%"), "counted: {err}");
    let err = sft_fails(&[&args[..], &["--max-seq-len", "10"]].concat());
    assert!(err.contains("chat.json") && err.contains("max_seq_len=10"), "{err}");
}

// ---- 6: where `sft prepare` writes ------------------------------------------------------------

/// Runs `sft prepare` of `data` into `out` (train share 0.8): (success, stderr).
fn prepare_cli(data: &Path, tok: &Path, out: &Path) -> (bool, String) {
    let o = sft(
        &["prepare", "--data", s(data), "--tokenizer", s(tok), "--out", s(out), "--train-share", "0.8"],
        &[],
    );
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (o.status.success(), stderr)
}

/// The entries of a directory, sorted, with their contents (a link's target; directories as
/// `None`).
fn listing(dir: &Path) -> Vec<(String, Option<Vec<u8>>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let content = if let Ok(target) = std::fs::read_link(&p) {
                Some(target.to_string_lossy().as_bytes().to_vec())
            } else if p.is_dir() {
                None
            } else {
                Some(std::fs::read(&p).unwrap())
            };
            (name, content)
        })
        .collect();
    v.sort();
    v
}

/// Audit: `--out` naming a regular file (the chat file itself, even) renamed it to
/// `X.prepare-tmp`, made X a prepared directory, and failed with "cannot list"; every later run
/// failed too.
#[test]
fn prepare_refuses_an_out_that_is_a_file_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (tok, _) = trained_tokenizer(dir.path(), "tok.json", 7);
    let data = dir.path().join("data.json");
    write_simplellama_json(&data, &synthetic_conversations(40, 3));
    let other = dir.path().join("notes.txt");
    std::fs::write(&other, "mine").unwrap();
    let before = listing(dir.path());
    for out in [&data, &other, &tok] {
        let (ok, stderr) = prepare_cli(&data, &tok, out);
        assert!(
            !ok && stderr.contains(&format!("--out {} exists and is not a directory", s(out))),
            "{stderr}"
        );
        assert_eq!(listing(dir.path()), before, "--out {}: nothing may change", s(out));
    }
}

/// Audit: `--out` a symbolic link to a directory: the link was replaced by a real directory, a
/// user file in the old target was moved out of it, and the target kept the old shards.
#[test]
fn prepare_through_a_symlinked_out_writes_at_its_target() {
    let dir = tempfile::tempdir().unwrap();
    let (tok, _) = trained_tokenizer(dir.path(), "tok.json", 7);
    let data = dir.path().join("data.json");
    write_simplellama_json(&data, &synthetic_conversations(40, 3));
    let real = dir.path().join("real");
    assert!(prepare_cli(&data, &tok, &real).0);
    std::fs::write(real.join("notes.txt"), "mine").unwrap();
    let set_id = |d: &Path| {
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("prepare.json")).unwrap()).unwrap();
        meta["report"]["set_id"].as_str().unwrap().to_string()
    };
    let old_set = set_id(&real);
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let (ok, stderr) = prepare_cli(&data, &tok, &link);
    assert!(ok, "{stderr}");
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link stays a link");
    assert_ne!(set_id(&real), old_set, "the target holds the new set");
    assert_eq!(std::fs::read_to_string(real.join("notes.txt")).unwrap(), "mine");
    check_whole(&real).unwrap();
    let names: Vec<String> = listing(dir.path()).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["data.json", "link", "real", "tok.json"], "no directory left beside them");

    // A link to nothing, or to a file, is refused without a change.
    let dangling = dir.path().join("dangling");
    std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
    let to_file = dir.path().join("to-file");
    std::os::unix::fs::symlink(&data, &to_file).unwrap();
    let before = listing(dir.path());
    let (ok, stderr) = prepare_cli(&data, &tok, &dangling);
    assert!(!ok && stderr.contains("dangling") && stderr.contains("symbolic link"), "{stderr}");
    let (ok, stderr) = prepare_cli(&data, &tok, &to_file);
    assert!(!ok && stderr.contains("exists and is not a directory"), "{stderr}");
    assert_eq!(listing(dir.path()), before);
}

/// A directory that is not a prepared one is left alone; in a prepared one, only the set's own
/// files are replaced (a prefix match once claimed the user's `prepare.json.bak` too).
#[test]
fn prepare_replaces_only_its_own_files() {
    let dir = tempfile::tempdir().unwrap();
    let (tok, _) = trained_tokenizer(dir.path(), "tok.json", 7);
    let data = dir.path().join("data.json");
    write_simplellama_json(&data, &synthetic_conversations(40, 3));
    let home = dir.path().join("home");
    std::fs::create_dir_all(home.join("sub")).unwrap();
    std::fs::write(home.join("thesis.tex"), "mine").unwrap();
    let before = listing(&home);
    let (ok, stderr) = prepare_cli(&data, &tok, &home);
    assert!(
        !ok && stderr.contains("not a prepared directory") && stderr.contains("`thesis.tex`"),
        "{stderr}"
    );
    assert_eq!(listing(&home), before);
    assert!(!dir.path().join("home.prepare-tmp").exists());

    let out = dir.path().join("prep");
    assert!(prepare_cli(&data, &tok, &out).0);
    let mine = ["prepare.json.bak", "train-notes.bin", "tokenizer.json.orig", "notes.txt"];
    for name in mine {
        std::fs::write(out.join(name), name).unwrap();
    }
    assert!(prepare_cli(&data, &tok, &out).0);
    for name in mine {
        assert_eq!(std::fs::read_to_string(out.join(name)).unwrap(), name, "{name} kept");
    }
}

// ---- 7: the shard files against prepare.json --------------------------------------------------

/// Audit: an extra shard (a split's shard copied under another name), a duplicated shard,
/// train and val swapped, or a missing prepare.json were all accepted and trained on.
#[test]
fn shard_files_must_be_those_prepare_json_records() {
    let dir = tempfile::tempdir().unwrap();
    let (tok, _) = trained_tokenizer(dir.path(), "tok.json", 7);
    let good = prepared(dir.path(), "prep", &tok, 3);
    let case = |name: &str, damage: &dyn Fn(&Path)| -> PathBuf {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for e in std::fs::read_dir(&good).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, d.join(p.file_name().unwrap())).unwrap();
        }
        damage(&d);
        d
    };
    let open_err = |d: &Path, split: Split| format!("{:#}", Dataset::open(d, split).unwrap_err());

    let d = case("extra", &|d| {
        std::fs::copy(d.join("val-00000.bin"), d.join("train-00001.bin")).unwrap();
    });
    for split in [Split::Train, Split::Val] {
        let e = open_err(&d, split);
        assert!(e.contains("train-00001.bin: not a shard of this prepared set"), "{e}");
    }
    let e = sft_fails(&["inspect", "--data", s(&d), "--json"]);
    assert!(e.contains("train-00001.bin") && e.contains("prepare.json"), "{e}");

    let d = case("duplicated", &|d| {
        std::fs::copy(d.join("train-00000.bin"), d.join("train-00001.bin")).unwrap();
    });
    assert!(open_err(&d, Split::Train).contains("train-00001.bin: not a shard of this prepared set"));

    let d = case("swapped", &|d| {
        std::fs::rename(d.join("train-00000.bin"), d.join("tmp")).unwrap();
        std::fs::rename(d.join("val-00000.bin"), d.join("train-00000.bin")).unwrap();
        std::fs::rename(d.join("tmp"), d.join("val-00000.bin")).unwrap();
    });
    for split in [Split::Train, Split::Val] {
        let e = open_err(&d, split);
        assert!(e.contains("-00000.bin: not the shard") && e.contains("prepare.json"), "{e}");
    }

    let d = case("missing", &|d| std::fs::remove_file(d.join("val-00000.bin")).unwrap());
    let e = open_err(&d, Split::Train);
    assert!(e.contains(&format!("{}: missing", s(&d.join("val-00000.bin")))), "{e}");

    let d = case("unrecorded", &|d| std::fs::remove_file(d.join("prepare.json")).unwrap());
    let e = open_err(&d, Split::Train);
    assert!(e.contains(&format!("{}: no prepare.json", s(&d))), "{e}");

    // A set prepared before prepare.json listed checksums: names and counts are still checked.
    let legacy = |d: &Path| {
        let path = d.join("prepare.json");
        let mut meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        meta["report"].as_object_mut().unwrap().remove("shard_files").unwrap();
        std::fs::write(&path, meta.to_string()).unwrap();
    };
    let d = case("legacy", &legacy);
    check_whole(&d).unwrap();
    let d = case("legacy-swapped", &|d| {
        legacy(d);
        std::fs::rename(d.join("train-00000.bin"), d.join("tmp")).unwrap();
        std::fs::rename(d.join("val-00000.bin"), d.join("train-00000.bin")).unwrap();
        std::fs::rename(d.join("tmp"), d.join("val-00000.bin")).unwrap();
    });
    let e = open_err(&d, Split::Train);
    assert!(e.contains("train-NNNNN.bin shards hold") && e.contains("n_train"), "{e}");
    let d = case("legacy-extra", &|d| {
        legacy(d);
        std::fs::copy(d.join("val-00000.bin"), d.join("val-00001.bin")).unwrap();
    });
    assert!(open_err(&d, Split::Val).contains("val-00001.bin: not a shard of this prepared set"));
}

/// Audit: a shard of another run of the same tokenizer was reported as "come from different sft
/// prepare runs (pad id 2 vs 2)": the pad ids agree, the set ids do not.
#[test]
fn a_shard_of_another_run_names_the_set_ids() {
    let dir = tempfile::tempdir().unwrap();
    let (tok, _) = trained_tokenizer(dir.path(), "tok.json", 7);
    let a = prepared(dir.path(), "a", &tok, 3);
    let b = prepared(dir.path(), "b", &tok, 4);
    std::fs::copy(b.join("train-00000.bin"), a.join("train-00001.bin")).unwrap();
    let e = format!("{:#}", Dataset::open(&a, Split::Train).unwrap_err());
    assert!(e.contains("different `sft prepare` runs (set ids ") && !e.contains("pad id"), "{e}");
}
