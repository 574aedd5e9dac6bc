//! The `sft prepare`, `sft inspect` and `sft tokenizer train` commands, end to end.

mod common;

use common::cli::{command, run_fails, run_ok as sft, s};
use common::data::{synthetic_conversations, write_simplellama_json};
use sft::data::loader::batches_from_examples_with;
use sft::data::{tokenize_conversation, BatchMode, ChatTokenizer, LoaderConfig, TrainOn};

#[test]
fn tokenizer_train_prepare_and_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let convs = synthetic_conversations(60, 21);
    let data = dir.path().join("chat.json");
    write_simplellama_json(&data, &convs);
    let tok_path = dir.path().join("tok.json");
    sft(&["tokenizer", "train", "--data", s(&data), "--vocab-size", "500", "--out", s(&tok_path)]);
    let tok = ChatTokenizer::from_file(&tok_path).unwrap();
    assert_eq!(tok.special_id("<SOS>"), Some(0));
    assert_eq!(tok.special_id("<EOT>"), Some(9));

    // inspect --json on the raw chat file: file order, dynamic padding, last partial batch dropped.
    let json = sft(&[
        "inspect",
        "--data",
        s(&data),
        "--tokenizer",
        s(&tok_path),
        "--max-seq-len",
        "1024",
        "--batch-size",
        "8",
        "--no-shuffle",
        "--json",
    ]);
    let examples: Vec<_> =
        convs.iter().map(|c| tokenize_conversation(&tok, c, TrainOn::FinalReply).unwrap()).collect();
    let cfg =
        LoaderConfig { batch_size: 8, max_seq_len: 1024, mode: BatchMode::Dynamic, shuffle: false, seed: 89 };
    let expected = batches_from_examples_with(&examples, tok.pad_id(), &cfg, false).unwrap();
    let lines: Vec<serde_json::Value> = json.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 7, "60 examples make 7 full batches of 8");
    for (line, b) in lines.iter().zip(&expected) {
        let rows = |v: &[u32]| serde_json::json!(v.chunks(b.seq_len).collect::<Vec<_>>());
        assert_eq!(line["inputs"], rows(&b.inputs));
        assert_eq!(line["targets"], rows(&b.targets));
    }

    // prepare, then inspect the prepared directory (human view, packed).
    let out = dir.path().join("prep");
    let report = sft(&[
        "prepare",
        "--data",
        s(&data),
        "--tokenizer",
        s(&tok_path),
        "--out",
        s(&out),
        "--max-seq-len",
        "512",
        "--train-share",
        "0.9",
    ]);
    assert!(report.contains("54 train, 6 val, 0 skipped"), "{report}");
    let view = sft(&[
        "inspect",
        "--data",
        s(&out),
        "--tokenizer",
        s(&tok_path),
        "--max-seq-len",
        "512",
        "--batch-size",
        "2",
        "--packed",
    ]);
    assert!(view.contains("packing efficiency") && view.contains('⟦') && view.contains("<SOA>"), "{view}");
    // Without --tokenizer, the text comes from the directory's own copy: the same view.
    let own = sft(&["inspect", "--data", s(&out), "--max-seq-len", "512", "--batch-size", "2", "--packed"]);
    assert_eq!(own, view);
    let val =
        sft(&["inspect", "--data", s(&out), "--split", "val", "--batch-size", "3", "--no-shuffle", "--json"]);
    assert_eq!(val.lines().count(), 2);
}

#[test]
fn errors_are_reported_with_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("bad.json");
    std::fs::write(&data, r#"[{"Template": ["CUSTOM"], "User": ["a"], "Assistant": []}]"#).unwrap();
    let out = command()
        .args(["tokenizer", "train", "--data", s(&data), "--out", s(&dir.path().join("t.json"))])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.json") && err.contains("example 0") && err.contains("length mismatch"),
        "{err}"
    );
}

/// Audit: `sft tokenizer train --out F` with F the chat file given as `--data` replaced the
/// chat file with the tokenizer.
#[test]
fn tokenizer_train_refuses_to_overwrite_its_chat_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("chat.json");
    write_simplellama_json(&data, &synthetic_conversations(30, 2));
    let before = std::fs::read(&data).unwrap();
    let link = dir.path().join("link.json");
    std::os::unix::fs::symlink(&data, &link).unwrap();
    let spelled = dir.path().join(".").join("chat.json");
    for out in [&data, &link, &spelled] {
        let err =
            run_fails(&["tokenizer", "train", "--data", s(&data), "--vocab-size", "300", "--out", s(out)]);
        assert!(err.contains("is the chat file given as --data"), "{err}");
        assert_eq!(std::fs::read(&data).unwrap(), before, "--out {}", s(out));
    }
}

/// Audit: `--train-share 0.001` on 200 examples exited 0 with "0 train, 200 val".
#[test]
fn a_train_share_that_empties_a_split_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("chat.json");
    write_simplellama_json(&data, &synthetic_conversations(200, 4));
    let tok = dir.path().join("tok.json");
    sft(&["tokenizer", "train", "--data", s(&data), "--vocab-size", "400", "--out", s(&tok)]);
    let out = dir.path().join("prep");
    let prepare = |share: &str| {
        let args =
            ["prepare", "--data", s(&data), "--tokenizer", s(&tok), "--out", s(&out), "--train-share", share];
        command().args(args).output().unwrap()
    };
    let o = prepare("0.001");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--train-share 0.001 leaves the train split empty"), "{err}");
    assert!(!out.exists(), "nothing written");
    // An empty validation split is said, not hidden (1 means no validation on purpose).
    let o = prepare("0.999");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("leaves the validation split empty"), "{err}");
    let o = prepare("1");
    assert!(o.status.success() && !String::from_utf8_lossy(&o.stderr).contains("warning"));

    // Audit: too few examples for one batch printed `Dataset { dir: "prep", shards: 1, ... }`.
    let err = run_fails(&["inspect", "--data", s(&out), "--batch-size", "1000000"]);
    assert!(err.contains(&format!("{}: 200 examples make no full batch", s(&out))), "{err}");
    assert!(!err.contains("Dataset {"), "{err}");
}

/// SimpleLLaMA's bpe_8k has no token for tab, `{` or any byte of a non-ASCII character, and drops
/// them from the text as SimpleLLaMA does; prepare keeps those tokens but says what was lost.
#[test]
fn prepare_says_which_characters_the_tokenizer_drops() {
    let Some(tok) = common::data::simplellama_tokenizer() else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("chat.json");
    let mut convs = synthetic_conversations(20, 4);
    convs[3].turns[0].user.push_str(" café {x}");
    write_simplellama_json(&data, &convs);
    let out = dir.path().join("prep");
    let o = command()
        .args(["prepare", "--data", s(&data), "--tokenizer", s(&tok), "--out", s(&out), "--train-share", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("1 of 20 examples hold characters the tokenizer has no token for"), "{err}");
    assert!(err.contains("'é'") && err.contains("'{'"), "{err}");
}
