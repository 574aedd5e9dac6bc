//! For the training tests: a small generated chat set, its tokenizer, a prepared data
//! directory, and a tiny CPU training config.

use sft::data::{prepare, read_chat_file, train_tokenizer, BatchMode, PrepareOptions, TrainOn};
use sft::train::TrainConfig;
use std::path::{Path, PathBuf};

/// A deterministic chat set in SimpleLLaMA's schema: arithmetic questions, some multi-turn.
pub fn chat_json(n: usize) -> String {
    let words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"];
    let mut convs = Vec::new();
    for i in 0..n {
        let (a, b) = (i % 10, (i * 7 + 3) % 10);
        let q = format!("What is {} plus {}?", words[a], words[b]);
        let r = format!("{} plus {} is {}.", words[a], words[b], a + b);
        // Short system prompts: SimpleLLaMA's default one is longer than these rows.
        let conv = if i % 3 == 0 {
            serde_json::json!({"Template": ["Be brief."], "User": ["Hello!", q], "Assistant": ["Hi!", r]})
        } else {
            let system = if i % 3 == 1 { "You add numbers." } else { "" };
            serde_json::json!({"Template": [system], "User": [q], "Assistant": [r]})
        };
        convs.push(conv);
    }
    serde_json::to_string(&convs).unwrap()
}

/// Writes the chat set, trains a small tokenizer on it and prepares it: (data dir, tokenizer).
pub fn prepared_data(root: &Path, n_conversations: usize, max_seq_len: usize) -> (PathBuf, PathBuf) {
    let chat = root.join("chat.json");
    std::fs::write(&chat, chat_json(n_conversations)).unwrap();
    let convs = read_chat_file(&chat).unwrap();
    let tokenizer = root.join("tokenizer.json");
    train_tokenizer(&convs, 320, &tokenizer).unwrap();
    let data = root.join("prepared");
    prepare(&PrepareOptions {
        data: chat,
        tokenizer: tokenizer.clone(),
        out_dir: data.clone(),
        max_seq_len,
        train_share: 0.85,
        seed: 5,
        train_on: TrainOn::FinalReply,
        chat: Default::default(),
    })
    .unwrap();
    (data, tokenizer)
}

/// A tiny model on the CPU: dropout on, two micro-batches per step, evaluations and saves
/// every other step, no sample generations.
pub fn tiny_config(data: &Path, tokenizer: &Path, out_dir: &Path, mode: BatchMode) -> TrainConfig {
    TrainConfig {
        model: "tiny".into(),
        data: data.to_path_buf(),
        tokenizer: tokenizer.to_path_buf(),
        out_dir: out_dir.to_path_buf(),
        from_scratch: true,
        epochs: 2,
        micro_batch: 4.into(),
        grad_accum: 2,
        batch_mode: mode,
        max_seq_len: Some(96),
        max_lr: 3e-3,
        min_lr: 3e-4,
        warmup_steps: 2,
        dropout: Some(0.1),
        eval_every: 2,
        eval_batches: 2,
        save_every: 2,
        keep_checkpoints: 2,
        sample_every: 0,
        samples: vec![],
        log_every: 1,
        device: "cpu".into(),
        ..TrainConfig::default()
    }
}

/// `sft train` (the binary and its arguments) on the tiny model from scratch over `data`.
pub fn sft_train_args(
    root: &Path,
    data: &Path,
    out: &str,
    grad_accum: &str,
    max_steps: u64,
) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = vec![env!("CARGO_BIN_EXE_sft").into()];
    for a in ["train", "--model", "tiny", "--from-scratch", "--device", "cpu", "--max-seq-len", "96"] {
        args.push(a.into());
    }
    let steps = max_steps.to_string();
    for a in ["--micro-batch", "2", "--grad-accum", grad_accum, "--max-steps", &steps, "--save-every", "1"] {
        args.push(a.into());
    }
    for (flag, path) in [
        ("--data", data.to_path_buf()),
        ("--tokenizer", root.join("tokenizer.json")),
        ("--out-dir", root.join(out)),
    ] {
        args.push(flag.into());
        args.push(path.into());
    }
    args
}

/// A copy of the directory `src` (a checkpoint, or a run with its checkpoints) at `dst`.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dst.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
        }
    }
}

/// Waits until the run logging to `log` has written `lines` lines (the header counts), failing
/// the test after two minutes: a child that a test will signal mid-run.
pub fn wait_for_log_lines(log: &Path, lines: usize) {
    let start = std::time::Instant::now();
    while std::fs::read_to_string(log).map_or(0, |t| t.lines().count()) < lines {
        assert!(
            start.elapsed().as_secs() < 120,
            "{} has fewer than {lines} lines after 2 min",
            log.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
