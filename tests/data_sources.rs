//! Issue 17.4: the data users bring. Parquet and JSON Lines files as Hugging Face `datasets`
//! writes them (every column optional, lists of structs in the 3-level LIST layout that pyarrow
//! writes, Snappy pages), with the `messages`, ShareGPT `conversations`, Alpaca and
//! `prompt`/`completion` schemas, read by `read_chat_file` and `sft prepare`; bad rows are errors
//! naming the file, the row and the field. The Parquet files are written here with the same
//! crate that reads them.

mod common;

use std::path::Path;

use common::cli::{run as sft, s};
use common::data::{
    parquet_chat_file, small_tokenizer, synthetic_conversations, write_parquet, Column, PARQUET_PANICS,
};
use sft::data::{read_chat_file, Conversation, Turn, DEFAULT_SYSTEM_PROMPT};

fn some(s: &str) -> Option<String> {
    Some(s.to_string())
}

/// A conversation as a message list with the given role names.
fn as_messages(c: &Conversation, [system, user, assistant]: [&str; 3]) -> Vec<[Option<String>; 2]> {
    let mut m = vec![[some(system), some(&c.system)]];
    for t in &c.turns {
        m.push([some(user), some(&t.user)]);
        m.push([some(assistant), some(&t.assistant)]);
    }
    m
}

fn write_jsonl(path: &Path, records: &[serde_json::Value]) {
    let text: String = records.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn single_turn(convs: &[Conversation]) -> Vec<Conversation> {
    convs.iter().map(|c| Conversation { system: c.system.clone(), turns: c.turns[..1].to_vec() }).collect()
}

#[test]
fn every_schema_reads_the_same_from_parquet_and_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let convs = synthetic_conversations(40, 3);
    let n = convs.len();

    // messages and ShareGPT conversations: multi-turn, with a system message.
    let p = dir.path().join("messages.parquet");
    let rows = convs.iter().map(|c| as_messages(c, ["system", "user", "assistant"])).collect();
    let ids = (0..n as i64).collect();
    write_parquet(&p, &[Column::Int("id", ids), Column::Messages("messages", ["role", "content"], rows)]);
    assert_eq!(read_chat_file(&p).unwrap(), convs);
    let j = dir.path().join("messages.jsonl");
    let records: Vec<_> = convs
        .iter()
        .map(|c| {
            let m: Vec<_> = as_messages(c, ["system", "user", "assistant"])
                .into_iter()
                .map(|[r, t]| serde_json::json!({"role": r, "content": t}))
                .collect();
            serde_json::json!({"messages": m})
        })
        .collect();
    write_jsonl(&j, &records);
    assert_eq!(read_chat_file(&j).unwrap(), convs);

    let p = dir.path().join("sharegpt.parquet");
    let rows = convs.iter().map(|c| as_messages(c, ["system", "human", "gpt"])).collect();
    write_parquet(&p, &[Column::Messages("conversations", ["from", "value"], rows)]);
    assert_eq!(read_chat_file(&p).unwrap(), convs);

    // Alpaca and prompt/completion: one turn each; the system column is optional.
    let one = single_turn(&convs);
    let p = dir.path().join("alpaca.parquet");
    write_parquet(
        &p,
        &[
            Column::Str("instruction", one.iter().map(|c| some(&c.turns[0].user)).collect()),
            Column::Str("input", vec![some(""); n]),
            Column::Str("output", one.iter().map(|c| some(&c.turns[0].assistant)).collect()),
            Column::Str("system", one.iter().map(|c| some(&c.system)).collect()),
        ],
    );
    assert_eq!(read_chat_file(&p).unwrap(), one);
    let j = dir.path().join("alpaca.jsonl");
    write_jsonl(
        &j,
        &[
            serde_json::json!({"instruction": "Add:", "input": "2 and 3", "output": "5"}),
            serde_json::json!({"instruction": "Say hi.", "input": "", "output": "hi"}),
        ],
    );
    let read = read_chat_file(&j).unwrap();
    assert_eq!(read[0].turns, vec![Turn { user: "Add:\n\n2 and 3".into(), assistant: "5".into() }]);
    assert_eq!(read[1].system, DEFAULT_SYSTEM_PROMPT);

    let p = dir.path().join("pc.parquet");
    write_parquet(
        &p,
        &[
            Column::Str("prompt", one.iter().map(|c| some(&c.turns[0].user)).collect()),
            Column::Str("completion", one.iter().map(|c| some(&c.turns[0].assistant)).collect()),
        ],
    );
    let expected: Vec<_> =
        one.iter().map(|c| Conversation { system: DEFAULT_SYSTEM_PROMPT.into(), ..c.clone() }).collect();
    assert_eq!(read_chat_file(&p).unwrap(), expected);
    // TRL's conversational prompt/completion: lists of messages on both sides.
    let p = dir.path().join("pc-conv.parquet");
    write_parquet(
        &p,
        &[
            Column::Messages(
                "prompt",
                ["role", "content"],
                convs.iter().map(|c| as_messages(c, ["system", "user", "assistant"])[..2].to_vec()).collect(),
            ),
            Column::Messages(
                "completion",
                ["role", "content"],
                convs
                    .iter()
                    .map(|c| as_messages(c, ["system", "user", "assistant"])[2..3].to_vec())
                    .collect(),
            ),
        ],
    );
    assert_eq!(read_chat_file(&p).unwrap(), one);
}

#[test]
fn prepare_takes_parquet_like_the_json_lines_twin() {
    let dir = tempfile::tempdir().unwrap();
    small_tokenizer(dir.path());
    let tok = dir.path().join("tok.json");
    let convs = synthetic_conversations(60, 11);
    let p = dir.path().join("train.parquet");
    let rows = convs.iter().map(|c| as_messages(c, ["system", "user", "assistant"])).collect();
    write_parquet(&p, &[Column::Messages("messages", ["role", "content"], rows)]);
    let j = dir.path().join("train.jsonl");
    common::data::write_simplellama_json(&j, &convs);
    let mut reports = Vec::new();
    for (file, out) in [(&p, "from-parquet"), (&j, "from-json")] {
        let out = dir.path().join(out);
        let (ok, stdout, stderr) = sft(&[
            "prepare",
            "--data",
            s(file),
            "--tokenizer",
            s(&tok),
            "--out",
            s(&out),
            "--train-share",
            "0.9",
        ]);
        assert!(ok, "{stderr}");
        assert!(stdout.contains("prepared 60 conversations"), "{stdout}");
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("prepare.json")).unwrap()).unwrap();
        reports.push(meta["report"].clone());
    }
    for field in ["n_train", "n_val", "n_tokens", "n_supervised", "longest"] {
        assert_eq!(reports[0][field], reports[1][field], "{field}");
    }
}

/// `read_chat_file`'s error for a file holding `columns`.
fn parquet_error(dir: &Path, name: &str, columns: &[Column]) -> String {
    let p = dir.join(name);
    write_parquet(&p, columns);
    format!("{:#}", read_chat_file(&p).unwrap_err())
}

#[test]
fn bad_parquet_rows_name_the_file_the_row_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = |u: &str| vec![[some("user"), some(u)], [some("assistant"), some("ok")]];

    let e = parquet_error(d, "text.parquet", &[Column::Str("text", vec![some("hello")])]);
    assert!(
        e.contains("text.parquet")
            && e.contains("row 0")
            && e.contains("unknown schema")
            && e.contains("`text`"),
        "{e}"
    );

    let e = parquet_error(
        d,
        "int.parquet",
        &[Column::Str("instruction", vec![some("a"), some("b")]), Column::Int("output", vec![1, 2])],
    );
    assert!(
        e.contains("int.parquet: row 0") && e.contains("field `output`: expected a string, found a number"),
        "{e}"
    );

    let e = parquet_error(d, "missing.parquet", &[Column::Str("instruction", vec![some("a")])]);
    assert!(e.contains("missing.parquet: row 0") && e.contains("missing field `output`"), "{e}");

    let rows = vec![good("a"), good("b"), vec![[some("user"), some("x")], [some("user"), some("y")]]];
    let e = parquet_error(d, "roles.parquet", &[Column::Messages("messages", ["role", "content"], rows)]);
    assert!(
        e.contains("roles.parquet: row 2") && e.contains("`messages[1]`") && e.contains("two user messages"),
        "{e}"
    );

    let rows = vec![good("a"), vec![[some("human"), some("x")], [some("gpt"), None]]];
    let e = parquet_error(d, "null.parquet", &[Column::Messages("conversations", ["from", "value"], rows)]);
    assert!(
        e.contains("null.parquet: row 1")
            && e.contains("`conversations[1].value`: expected a string, found null"),
        "{e}"
    );

    let rows = vec![good("a"), vec![]];
    let e = parquet_error(d, "empty.parquet", &[Column::Messages("messages", ["role", "content"], rows)]);
    assert!(e.contains("empty.parquet: row 1") && e.contains("`messages`: empty list"), "{e}");

    // A file that only claims to be Parquet.
    let p = d.join("fake.parquet");
    std::fs::write(&p, "{\"messages\": []}\n").unwrap();
    let e = format!("{:#}", read_chat_file(&p).unwrap_err());
    assert!(e.contains("fake.parquet") && e.contains("Parquet"), "{e}");

    // And through the binary: the same message, exit 1, no panic.
    let tok = d.join("tok.json");
    small_tokenizer(d);
    let (ok, _, stderr) = sft(&[
        "prepare",
        "--data",
        s(&d.join("roles.parquet")),
        "--tokenizer",
        s(&tok),
        "--out",
        s(&d.join("out")),
    ]);
    assert!(!ok && stderr.contains("roles.parquet: row 2") && !stderr.contains("panicked"), "{stderr}");
}

#[test]
fn json_lines_of_the_new_schemas_name_the_example_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.jsonl");
    write_jsonl(
        &p,
        &[
            serde_json::json!({"prompt": "a", "completion": "b"}),
            serde_json::json!({"prompt": "a", "completion": null}),
        ],
    );
    let e = format!("{:#}", read_chat_file(&p).unwrap_err());
    assert!(
        e.contains("bad.jsonl: example 1") && e.contains("field `completion`") && e.contains("null"),
        "{e}"
    );
}

/// Audit: flipping a byte of a valid file made the parquet crate panic inside its reader (`sft
/// prepare` died with a Rust panic message).
#[test]
fn a_damaged_parquet_file_is_an_error_naming_it_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let base = parquet_chat_file(&dir.path().join("base.parquet"));
    let tok = dir.path().join("tok.json");
    small_tokenizer(dir.path());
    for (k, damage) in PARQUET_PANICS.iter().enumerate() {
        let p = dir.path().join(format!("damaged-{k}.parquet"));
        let mut v = base.clone();
        for &(at, byte) in *damage {
            v[at] = byte;
        }
        std::fs::write(&p, &v).unwrap();
        let e = std::panic::catch_unwind(|| read_chat_file(&p))
            .unwrap_or_else(|_| panic!("case {k}: the reader's panic escaped"))
            .map(|_| ())
            .unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains(&format!("damaged-{k}.parquet: "))
                && e.contains("not a readable Parquet file (the reader failed: "),
            "case {k}: {e}"
        );
        let (ok, _, stderr) =
            sft(&["prepare", "--data", s(&p), "--tokenizer", s(&tok), "--out", s(&dir.path().join("out"))]);
        assert!(!ok && !stderr.contains("panicked") && stderr.contains("not a readable Parquet"), "{stderr}");
    }
}

/// Audit: a BYTE_ARRAY column without the UTF8 annotation (pyarrow's `pa.binary()`) was read as
/// base64 text, and trained on.
#[test]
fn binary_columns_read_as_utf8_text_or_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bin.parquet");
    write_parquet(
        &p,
        &[
            Column::Bin("prompt", vec![b"What is 2+2?".to_vec(), "Grüße".as_bytes().to_vec()]),
            Column::Bin("completion", vec![b"4".to_vec(), b"hi".to_vec()]),
        ],
    );
    let convs = read_chat_file(&p).unwrap();
    assert_eq!(convs[0].turns, vec![Turn { user: "What is 2+2?".into(), assistant: "4".into() }]);
    assert_eq!(convs[1].turns[0].user, "Grüße");

    let p = dir.path().join("latin1.parquet");
    write_parquet(
        &p,
        &[
            Column::Bin("prompt", vec![b"fine".to_vec(), b"Gr\xfc\xdfe".to_vec()]),
            Column::Bin("completion", vec![b"4".to_vec(), b"hi".to_vec()]),
        ],
    );
    let e = format!("{:#}", read_chat_file(&p).unwrap_err());
    assert!(
        e.contains("latin1.parquet: row 1") && e.contains("field `prompt`: binary column that is not UTF-8"),
        "{e}"
    );
}

/// Audit: a zstd- or gzip-compressed file said "Disabled feature at compile time: zstd". The
/// file is a Snappy one whose column metadata is patched to name another codec (this build
/// cannot write them either): the codec is refused before a page is read.
#[test]
fn a_parquet_codec_other_than_snappy_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("snappy.parquet");
    write_parquet(&p, &[Column::Str("prompt", vec![some("q")]), Column::Str("completion", vec![some("a")])]);
    let bytes = std::fs::read(&p).unwrap();
    // ColumnMetaData in Thrift's compact protocol: path_in_schema ["prompt"], then field 4
    // (codec, i32, header byte 0x15) = SNAPPY (1, zigzag 0x02).
    let needle = b"prompt\x15\x02";
    let at = bytes.windows(needle.len()).position(|w| w == needle).expect("the codec of `prompt`");
    for (codec, zigzag) in [("zstd", 12u8), ("gzip", 4)] {
        let mut v = bytes.clone();
        v[at + needle.len() - 1] = zigzag;
        let q = dir.path().join(format!("{codec}.parquet"));
        std::fs::write(&q, &v).unwrap();
        let e = format!("{:#}", read_chat_file(&q).unwrap_err());
        assert!(
            e.contains(&format!("{codec}.parquet: column `prompt` is {codec}-compressed"))
                && e.contains("only uncompressed and Snappy Parquet")
                && !e.contains("Disabled feature"),
            "{e}"
        );
    }
}

/// A panic inside the tokenizers library or the template engine, on a file the user brought, is
/// an error naming the file, without the panic hook's "thread 'main' panicked at" line above it.
#[test]
fn a_library_panic_on_a_users_file_is_an_error_without_a_panic_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    small_tokenizer(d);
    let data = d.join("chats.json");
    common::data::write_simplellama_json(&data, &synthetic_conversations(8, 3));

    // A normalizer of [""] loads, then panics inside the tokenizers library (0.22) on any text.
    let mut odd: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("tok.json")).unwrap()).unwrap();
    odd["normalizer"] = serde_json::json!([""]);
    let odd_path = d.join("odd.json");
    std::fs::write(&odd_path, odd.to_string()).unwrap();
    let (ok, _, stderr) =
        sft(&["prepare", "--data", s(&data), "--tokenizer", s(&odd_path), "--out", s(&d.join("out1"))]);
    assert!(
        !ok && stderr.contains("odd.json") && stderr.contains("the tokenizers library panicked"),
        "{stderr}"
    );
    assert!(!stderr.contains("' panicked at"), "{stderr}");

    // minijinja 2.24 panics on `''[::-1]`.
    std::fs::write(d.join("tokenizer_config.json"), r#"{"eos_token": "<EOA>"}"#).unwrap();
    let template = d.join("reverse.jinja");
    std::fs::write(&template, "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ ''[::-1] }}").unwrap();
    let (ok, _, stderr) = sft(&[
        "prepare",
        "--data",
        s(&data),
        "--tokenizer",
        s(&d.join("tok.json")),
        "--chat-format",
        "template",
        "--chat-template",
        s(&template),
        "--out",
        s(&d.join("out2")),
    ]);
    assert!(
        !ok && stderr.contains("reverse.jinja") && stderr.contains("the template engine panicked"),
        "{stderr}"
    );
    assert!(!stderr.contains("' panicked at"), "{stderr}");
}
