//! Chat data for the data tests: generated conversations, SimpleLLaMA's file schema and
//! tokenizer, a small trained tokenizer, Parquet files in the shapes pyarrow writes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

use sft::data::{Conversation, Turn};

/// SimpleLLaMA's tokenizer: `$SIMPLELLAMA_TOKENIZER`, else `../shared/simplellama/bpe_8k.json`,
/// else `../../shared/simplellama/bpe_8k.json` (relative to the crate; the scripts look in the
/// same places, scripts/simplellama.py). `None` with a notice that the test is skipped.
pub fn simplellama_tokenizer() -> Option<PathBuf> {
    let found = simplellama_tokenizer_path();
    if found.is_none() {
        eprintln!("notice: SimpleLLaMA tokenizer not found (set SIMPLELLAMA_TOKENIZER); skipping");
    }
    found
}

/// Where [`simplellama_tokenizer`] looks, without the notice (benches/prepare.rs falls back to a
/// tokenizer of its own).
pub fn simplellama_tokenizer_path() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let candidates = std::env::var_os("SIMPLELLAMA_TOKENIZER").map(PathBuf::from).into_iter().chain([
        root.join("../shared/simplellama/bpe_8k.json"),
        root.join("../../shared/simplellama/bpe_8k.json"),
    ]);
    candidates.into_iter().find(|c| c.is_file())
}

pub fn conv(system: &str, turns: &[(&str, &str)]) -> Conversation {
    Conversation {
        system: system.to_string(),
        turns: turns.iter().map(|(u, a)| Turn { user: u.to_string(), assistant: a.to_string() }).collect(),
    }
}

const WORDS: &[&str] = &[
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "what",
    "is",
    "gravity",
    "force",
    "of",
    "attraction",
    "between",
    "masses",
    "hello",
    "how",
    "are",
    "you",
    "fine",
    "thanks",
    "2+2",
    "4",
    "answer",
    "question",
    "Paris",
    "capital",
    "France",
    "water",
    "boils",
    "at",
    "100",
    "degrees",
    "Celsius",
    "\n",
    "!",
    "?",
    ",",
];

/// Deterministic varied conversations (some multi-turn, some with the default prompt).
pub fn synthetic_conversations(n: usize, seed: u64) -> Vec<Conversation> {
    let mut rng = sft::rng::Rng::new(seed);
    let text = |rng: &mut sft::rng::Rng, max_words: usize| {
        let k = rng.below(max_words + 1);
        (0..k).map(|_| WORDS[rng.below(WORDS.len())]).collect::<Vec<_>>().join(" ")
    };
    (0..n)
        .map(|_| {
            let system = if rng.below(2) == 0 {
                sft::data::DEFAULT_SYSTEM_PROMPT.to_string()
            } else {
                text(&mut rng, 8)
            };
            let n_turns = 1 + rng.below(3);
            let turns = (0..n_turns)
                .map(|_| Turn { user: text(&mut rng, 20), assistant: text(&mut rng, 30) })
                .collect();
            Conversation { system, turns }
        })
        .collect()
}

/// Writes conversations in SimpleLLaMA's schema (a JSON list).
pub fn write_simplellama_json(path: &Path, convs: &[Conversation]) {
    let records: Vec<serde_json::Value> = convs
        .iter()
        .map(|c| {
            serde_json::json!({
                "Template": [c.system],
                "User": c.turns.iter().map(|t| t.user.clone()).collect::<Vec<_>>(),
                "Assistant": c.turns.iter().map(|t| t.assistant.clone()).collect::<Vec<_>>(),
            })
        })
        .collect();
    std::fs::write(path, serde_json::to_string(&records).unwrap()).unwrap();
}

/// Trains a small tokenizer on synthetic data into `dir/tok.json`.
pub fn small_tokenizer(dir: &Path) -> sft::data::ChatTokenizer {
    let convs = synthetic_conversations(200, 7);
    sft::data::train_tokenizer(&convs, 400, &dir.join("tok.json")).unwrap()
}

/// One Parquet column, in the shapes pyarrow writes.
pub enum Column {
    /// `optional binary (STRING)`; `None` is null.
    Str(&'static str, Vec<Option<String>>),
    /// `optional binary` without the STRING annotation (pyarrow's `pa.binary()`).
    Bin(&'static str, Vec<Vec<u8>>),
    /// `optional int64`.
    Int(&'static str, Vec<i64>),
    /// `optional group (LIST) { repeated group list { optional group element { optional binary
    /// k1 (STRING); optional binary k2 (STRING); } } }`: a list of two-string structs per row
    /// (a `None` string is a null field).
    Messages(&'static str, [&'static str; 2], Vec<Vec<[Option<String>; 2]>>),
}

impl Column {
    fn schema(&self) -> String {
        match self {
            Column::Str(name, _) => format!("optional binary {name} (STRING);"),
            Column::Bin(name, _) => format!("optional binary {name};"),
            Column::Int(name, _) => format!("optional int64 {name};"),
            Column::Messages(name, [a, b], _) => format!(
                "optional group {name} (LIST) {{ repeated group list {{ optional group element {{ \
                 optional binary {a} (STRING); optional binary {b} (STRING); }} }} }}"
            ),
        }
    }
}

pub fn write_parquet(path: &Path, columns: &[Column]) {
    let text = format!("message schema {{ {} }}", columns.iter().map(Column::schema).collect::<String>());
    let schema = Arc::new(parse_message_type(&text).unwrap());
    let props = Arc::new(WriterProperties::builder().set_compression(Compression::SNAPPY).build());
    let mut writer = SerializedFileWriter::new(std::fs::File::create(path).unwrap(), schema, props).unwrap();
    let mut group = writer.next_row_group().unwrap();
    // The leaf columns in schema order: one per plain column, two per list of structs.
    let mut leaves: Vec<(&Column, usize)> = Vec::new();
    for c in columns {
        match c {
            Column::Messages(..) => leaves.extend([(c, 0), (c, 1)]),
            _ => leaves.push((c, 0)),
        }
    }
    for (column, field) in leaves {
        let mut writer = group.next_column().unwrap().unwrap();
        match column {
            Column::Str(_, rows) => {
                let values: Vec<ByteArray> =
                    rows.iter().flatten().map(|v| ByteArray::from(v.as_str())).collect();
                let defs: Vec<i16> = rows.iter().map(|v| i16::from(v.is_some())).collect();
                writer.typed::<ByteArrayType>().write_batch(&values, Some(&defs), None).unwrap();
            }
            Column::Bin(_, rows) => {
                let values: Vec<ByteArray> = rows.iter().map(|v| ByteArray::from(v.clone())).collect();
                writer
                    .typed::<ByteArrayType>()
                    .write_batch(&values, Some(&vec![1; rows.len()]), None)
                    .unwrap();
            }
            Column::Int(_, rows) => {
                writer.typed::<Int64Type>().write_batch(rows, Some(&vec![1; rows.len()]), None).unwrap();
            }
            Column::Messages(_, _, rows) => {
                // Definition levels: 1 an empty list, 3 a null field of a message, 4 a value;
                // repetition level 1 continues the row's list.
                let (mut values, mut defs, mut reps) = (Vec::new(), Vec::new(), Vec::new());
                for row in rows {
                    if row.is_empty() {
                        defs.push(1);
                        reps.push(0);
                    }
                    for (i, message) in row.iter().enumerate() {
                        reps.push(i16::from(i > 0));
                        match &message[field] {
                            Some(v) => {
                                defs.push(4);
                                values.push(ByteArray::from(v.as_str()));
                            }
                            None => defs.push(3),
                        }
                    }
                }
                writer.typed::<ByteArrayType>().write_batch(&values, Some(&defs), Some(&reps)).unwrap();
            }
        }
        writer.close().unwrap();
    }
    group.close().unwrap();
    writer.close().unwrap();
}

/// A valid Parquet chat file: `messages` (a list of structs), an `id` and a `source` column.
pub fn parquet_chat_file(path: &Path) -> Vec<u8> {
    let convs = synthetic_conversations(24, 5);
    let rows: Vec<Vec<[Option<String>; 2]>> = convs
        .iter()
        .map(|c| {
            let mut m = vec![[Some("system".to_string()), Some(c.system.clone())]];
            for t in &c.turns {
                m.push([Some("user".to_string()), Some(t.user.clone())]);
                m.push([Some("assistant".to_string()), Some(t.assistant.clone())]);
            }
            m
        })
        .collect();
    let n = rows.len();
    write_parquet(
        path,
        &[
            Column::Int("id", (0..n as i64).collect()),
            Column::Messages("messages", ["role", "content"], rows),
            Column::Str("source", (0..n).map(|i| Some(format!("set-{}", i % 3))).collect()),
        ],
    );
    assert_eq!(sft::data::read_chat_file(path).unwrap().len(), n);
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(bytes.len(), 4957, "PARQUET_PANICS are positions in this very file");
    bytes
}

/// Damage that made the parquet crate (v60) panic inside its reader, found by
/// `fuzz_parquet_files` (tests/fuzz_data.rs): `(byte position, new value)` on the file
/// [`parquet_chat_file`] writes, kept so that every run tries them whatever its time budget.
pub const PARQUET_PANICS: &[&[(usize, u8)]] = &[
    // "column start and length should not be negative"
    &[(4415, 71)],
    // "assertion failed: size <= src.len()"
    &[(338, 119), (3935, 22), (4191, 211)],
    &[(185, 14), (195, 5), (1073, 13)],
    // "Decoder for dict should have been set"
    &[(2981, 180), (3958, 168), (4414, 166)],
    // "Invalid list type ... left: REQUIRED, right: REPEATED"
    &[(1531, 37), (4300, 0)],
];
