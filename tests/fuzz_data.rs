//! Property fuzzing of the data readers (issue 13): valid shards and chat files are mutated (bit
//! flips, fields overwritten with boundary values, truncation, extension) and every open or
//! iteration must end in `Ok` or a clean `Err`, never a panic.
//!
//! JSON Lines records of every schema (`messages`, ShareGPT, Alpaca, `prompt`/`completion`,
//! SimpleLLaMA's) are also mutated as JSON values (fields dropped, retyped, renamed, roles
//! swapped), which reaches the schema checks that byte damage mostly stops at the JSON parser.
//!
//! Parquet files (written here by the `parquet` crate, in pyarrow's shapes) get 1–4 damaged
//! bytes: the crate's reader panics on some such files, which `read_chat_file` must turn into an
//! error naming the file.
//!
//! A prepared directory's `prepare.json` (the record of the run: options, counts, the shards'
//! names, counts and checksums) is mutated as a JSON value and as text, then the directory is
//! opened, checked against its tokenizer and batched.
//!
//! Bounded by time: `SFT_FUZZ_SECONDS` (default 20) split across the targets; seeded by
//! `SFT_FUZZ_SEED` (default 13). A failure prints the seed and the case number, which replay it.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::{Duration, Instant};

use common::data::{parquet_chat_file, synthetic_conversations, write_simplellama_json, PARQUET_PANICS};
use sft::data::shard::{seal, Shard, ShardWriter, HEADER_LEN};
use sft::data::{batches_in_order, read_chat_file, BatchMode, Dataset, LoaderConfig, Split};
use sft::rng::Rng;

fn budget() -> Duration {
    let s = std::env::var("SFT_FUZZ_SECONDS").ok().and_then(|v| v.parse::<f64>().ok()).unwrap_or(20.0);
    Duration::from_secs_f64(s / 5.0)
}

fn seed() -> u64 {
    std::env::var("SFT_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(13)
}

#[derive(Default, Debug)]
struct Counts {
    tried: u64,
    ok: u64,
    clean_errors: u64,
    panics: u64,
}

const U64_EDGES: &[u64] = &[
    0,
    1,
    2,
    3,
    7,
    8,
    63,
    64,
    95,
    96,
    255,
    1 << 31,
    u32::MAX as u64,
    1 << 32,
    i64::MAX as u64,
    u64::MAX - 1,
    u64::MAX,
];

/// One mutation of `base`; `fields` are byte positions of 8-byte fields worth overwriting.
fn mutate(rng: &mut Rng, base: &[u8], fields: &[usize]) -> Vec<u8> {
    let mut v = base.to_vec();
    for _ in 0..1 + rng.below(3) {
        match rng.below(6) {
            0 | 1 => {
                let i = rng.below(v.len().max(1) * 8);
                if i / 8 < v.len() {
                    v[i / 8] ^= 1 << (i % 8);
                }
            }
            2 => {
                let at = fields[rng.below(fields.len())];
                let value = U64_EDGES[rng.below(U64_EDGES.len())].wrapping_add(if rng.below(2) == 0 {
                    0
                } else {
                    rng.below(5) as u64
                });
                if at + 8 <= v.len() {
                    if rng.below(2) == 0 {
                        v[at..at + 8].copy_from_slice(&value.to_le_bytes());
                    } else {
                        v[at..at + 4].copy_from_slice(&(value as u32).to_le_bytes());
                    }
                }
            }
            3 => {
                let keep = rng.below(v.len() + 1);
                v.truncate(keep);
            }
            4 => {
                let extra = 1 + rng.below(64);
                v.extend((0..extra).map(|_| rng.below(256) as u8));
            }
            _ => {
                let i = rng.below(v.len().max(1));
                if i < v.len() {
                    v[i] = rng.below(256) as u8;
                }
            }
        }
    }
    v
}

/// Every 8-byte field of the header and every entry of the offset tables, plus a few spans.
fn shard_fields(b: &[u8]) -> Vec<usize> {
    let n_examples = u64::from_le_bytes(b[24..32].try_into().unwrap()) as usize;
    let n_tokens = u64::from_le_bytes(b[32..40].try_into().unwrap()) as usize;
    let offsets = HEADER_LEN + 4 * (n_tokens + n_tokens % 2);
    let mut f: Vec<usize> = (8..HEADER_LEN).step_by(4).collect();
    f.extend((0..2 * (n_examples + 1)).map(|i| offsets + 8 * i));
    let spans = offsets + 16 * (n_examples + 1);
    f.extend((spans..b.len().saturating_sub(8)).step_by(4).take(64));
    f.extend((HEADER_LEN..offsets).step_by(4).take(16));
    f
}

/// Opens a shard as a one-shard dataset and reads every batch of it.
fn exercise_shard(path: &Path) -> anyhow::Result<()> {
    let shard = Shard::open(path)?;
    for i in 0..shard.len() {
        let ex = shard.example(i);
        let _ = ex.n_supervised();
        let _ = shard.example_len(i);
    }
    let ds = Dataset::from_shards(path.parent().unwrap(), &[path.to_path_buf()])?;
    for mode in [BatchMode::Dynamic, BatchMode::Packed] {
        let cfg = LoaderConfig { batch_size: 3, max_seq_len: 64, mode, shuffle: false, seed: 1 };
        batches_in_order(&ds, &cfg)?;
    }
    Ok(())
}

#[test]
fn fuzz_shard_headers_and_offset_tables() {
    let dir = tempfile::tempdir().unwrap();
    let base_path = dir.path().join("base.bin");
    let mut rng = Rng::new(seed());
    let mut w = ShardWriter::create(&base_path, 0x1234, 2).unwrap().with_vocab_size(500);
    for k in 0..12u32 {
        let len = 1 + rng.below(20) as u32;
        let tokens: Vec<u32> = (0..len).map(|_| rng.below(500) as u32).collect();
        let spans: Vec<[u32; 2]> = if k % 4 == 3 { vec![] } else { vec![[len / 2, len]] };
        w.push(&tokens, &spans).unwrap();
    }
    w.finish().unwrap();
    let base = std::fs::read(&base_path).unwrap();
    exercise_shard(&base_path).unwrap();
    let fields = shard_fields(&base);
    let path = dir.path().join("fuzz.bin");
    let mut c = Counts::default();
    let start = Instant::now();
    let seed = seed();
    while start.elapsed() < budget() {
        let case = c.tried;
        let mut rng = Rng::new(seed).fork(case);
        let mut v = mutate(&mut rng, &base, &fields);
        // Half the cases carry a valid checksum, so that the structural checks behind it are
        // reached too.
        if rng.below(2) == 0 && v.len() >= HEADER_LEN {
            seal(&mut v);
        }
        std::fs::write(&path, &v).unwrap();
        c.tried += 1;
        match catch_unwind(AssertUnwindSafe(|| exercise_shard(&path))) {
            Ok(Ok(())) => c.ok += 1,
            Ok(Err(e)) => {
                let msg = format!("{e:#}");
                assert!(msg.contains("fuzz.bin") || msg.contains("batch"), "seed {seed} case {case}: {msg}");
                c.clean_errors += 1
            }
            Err(_) => {
                c.panics += 1;
                std::fs::write(dir.path().join(format!("panic-{case}.bin")), &v).unwrap();
                eprintln!("PANIC: seed {seed} case {case} (SFT_FUZZ_SEED={seed})");
            }
        }
    }
    eprintln!("shards: {c:?}");
    assert_eq!(c.panics, 0, "{c:?}");
    assert!(c.tried > 100 && c.clean_errors > 0, "{c:?}");
}

#[test]
fn fuzz_chat_parser() {
    let dir = tempfile::tempdir().unwrap();
    let base_path = dir.path().join("base.json");
    write_simplellama_json(&base_path, &synthetic_conversations(8, 3));
    let json = std::fs::read(&base_path).unwrap();
    let messages = br#"{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
{"conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}]}
{"Template": "CUSTOM", "User": ["x"], "Assistant": ["y"]}
"#
    .to_vec();
    let bases = [json, messages];
    let path = dir.path().join("fuzz.json");
    let mut c = Counts::default();
    let start = Instant::now();
    let seed = seed();
    while start.elapsed() < budget() {
        let case = c.tried;
        let mut rng = Rng::new(seed).fork(1 << 40 | case);
        let base = &bases[rng.below(bases.len())];
        // Byte positions of the structural characters, the most interesting to damage.
        let fields: Vec<usize> = base
            .iter()
            .enumerate()
            .filter(|(_, b)| b"[]{}\":,".contains(b))
            .map(|(i, _)| i.saturating_sub(4))
            .collect();
        let v = mutate(&mut rng, base, &fields);
        std::fs::write(&path, &v).unwrap();
        c.tried += 1;
        match catch_unwind(AssertUnwindSafe(|| read_chat_file(&path))) {
            Ok(Ok(_)) => c.ok += 1,
            Ok(Err(e)) => {
                let msg = format!("{e:#}");
                assert!(msg.contains("fuzz.json"), "seed {seed} case {case}: {msg}");
                c.clean_errors += 1
            }
            Err(_) => {
                c.panics += 1;
                eprintln!("PANIC: seed {seed} case {case} (SFT_FUZZ_SEED={seed})");
            }
        }
    }
    eprintln!("chat files: {c:?}");
    assert_eq!(c.panics, 0, "{c:?}");
    assert!(c.tried > 100 && c.clean_errors > 0, "{c:?}");
}

/// One record of each schema the readers accept.
fn schema_records() -> Vec<serde_json::Value> {
    use serde_json::json;
    let msg = |r: &str, c: &str| json!({"role": r, "content": c});
    vec![
        json!({"messages": [msg("system", "s"), msg("user", "u"), msg("assistant", "a"), msg("user", "v"), msg("assistant", "b")]}),
        json!({"conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}]}),
        json!({"instruction": "i", "input": "x", "output": "o", "system": "s"}),
        json!({"prompt": "p", "completion": "c"}),
        json!({"prompt": [msg("user", "u")], "completion": [msg("assistant", "a")]}),
        json!({"Template": ["CUSTOM"], "User": ["x", "y"], "Assistant": ["y", "z"]}),
    ]
}

const KEYS: &[&str] = &[
    "messages",
    "conversations",
    "instruction",
    "input",
    "output",
    "prompt",
    "completion",
    "system",
    "Template",
    "User",
    "Assistant",
    "role",
    "content",
    "from",
    "value",
    "id",
];

/// A value of a random JSON type.
fn random_value(rng: &mut Rng) -> serde_json::Value {
    use serde_json::json;
    match rng.below(8) {
        0 => json!(null),
        1 => json!(rng.below(1000)),
        2 => json!(rng.below(2) == 0),
        3 => json!(["user", "assistant", "gpt", "human", "system", "bot", ""][rng.below(7)]),
        4 => json!([]),
        5 => json!({}),
        6 => json!([{"role": "user", "content": "q"}]),
        _ => json!(-1.5),
    }
}

/// Damages a JSON value in place at a random depth: a field dropped, retyped or renamed, a list
/// element removed, duplicated or swapped.
fn mutate_value(rng: &mut Rng, v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Object(obj) if !obj.is_empty() && rng.below(3) > 0 => {
            let keys: Vec<String> = obj.keys().cloned().collect();
            let key = keys[rng.below(keys.len())].clone();
            match rng.below(4) {
                0 => {
                    obj.remove(&key);
                }
                1 => {
                    obj.insert(key, random_value(rng));
                }
                2 => {
                    let value = obj.remove(&key).unwrap();
                    obj.insert(KEYS[rng.below(KEYS.len())].to_string(), value);
                }
                _ => mutate_value(rng, obj.get_mut(&key).unwrap()),
            }
        }
        Value::Array(items) if !items.is_empty() && rng.below(3) > 0 => {
            let i = rng.below(items.len());
            match rng.below(4) {
                0 => {
                    items.remove(i);
                }
                1 => {
                    let copy = items[i].clone();
                    items.insert(i, copy);
                }
                2 => {
                    let j = rng.below(items.len());
                    items.swap(i, j);
                }
                _ => mutate_value(rng, &mut items[i]),
            }
        }
        _ => *v = random_value(rng),
    }
}

#[test]
fn fuzz_json_lines_records_of_every_schema() {
    let dir = tempfile::tempdir().unwrap();
    let records = schema_records();
    let path = dir.path().join("fuzz.jsonl");
    // The undamaged records read, one conversation each.
    let text: String = records.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&path, text).unwrap();
    assert_eq!(read_chat_file(&path).unwrap().len(), records.len());
    let mut c = Counts::default();
    let start = Instant::now();
    let seed = seed();
    while start.elapsed() < budget() {
        let case = c.tried;
        let mut rng = Rng::new(seed).fork(2 << 40 | case);
        let mut lines: Vec<serde_json::Value> =
            (0..1 + rng.below(4)).map(|_| records[rng.below(records.len())].clone()).collect();
        let damaged = rng.below(lines.len());
        for _ in 0..1 + rng.below(3) {
            mutate_value(&mut rng, &mut lines[damaged]);
        }
        // A line that is no longer an object could open the file as a JSON list (`[`): keep the
        // damage inside a record.
        if !lines[damaged].is_object() {
            lines[damaged] = serde_json::json!({ "messages": lines[damaged].take() });
        }
        let text: String = lines.iter().map(|r| format!("{r}\n")).collect();
        std::fs::write(&path, text).unwrap();
        c.tried += 1;
        match catch_unwind(AssertUnwindSafe(|| read_chat_file(&path))) {
            Ok(Ok(convs)) => {
                assert_eq!(convs.len(), lines.len(), "seed {seed} case {case}");
                assert!(
                    convs.iter().all(|c| !c.turns.is_empty()),
                    "seed {seed} case {case}: a conversation without turns"
                );
                c.ok += 1
            }
            Ok(Err(e)) => {
                let msg = format!("{e:#}");
                assert!(
                    msg.contains("fuzz.jsonl") && msg.contains(&format!("example {damaged}")),
                    "seed {seed} case {case}: the error must name the file and the damaged example: {msg}"
                );
                c.clean_errors += 1
            }
            Err(_) => {
                c.panics += 1;
                eprintln!("PANIC: seed {seed} case {case} (SFT_FUZZ_SEED={seed})");
            }
        }
    }
    eprintln!("JSON Lines records: {c:?}");
    assert_eq!(c.panics, 0, "{c:?}");
    assert!(c.tried > 100 && c.clean_errors > 0 && c.ok > 0, "{c:?}");
}

/// 1–4 bytes of `base` overwritten or bit-flipped (the damage of a bad disk or a bad copy).
fn damage_bytes(rng: &mut Rng, base: &[u8]) -> Vec<u8> {
    let mut v = base.to_vec();
    for _ in 0..1 + rng.below(4) {
        let i = rng.below(v.len());
        if rng.below(2) == 0 {
            v[i] ^= 1 << rng.below(8);
        } else {
            v[i] = rng.below(256) as u8;
        }
    }
    v
}

/// Reads a damaged Parquet file: `Ok` or an error naming it; `Err` on a panic.
fn read_damaged_parquet(path: &Path, what: &str) -> Result<bool, String> {
    match catch_unwind(AssertUnwindSafe(|| read_chat_file(path))) {
        Ok(Ok(_)) => Ok(true),
        Ok(Err(e)) => {
            let msg = format!("{e:#}");
            assert!(msg.contains("fuzz.parquet"), "{what}: the error must name the file: {msg}");
            Ok(false)
        }
        Err(p) => {
            let msg = p.downcast_ref::<String>().cloned().or(p.downcast_ref::<&str>().map(|s| s.to_string()));
            Err(msg.unwrap_or_default())
        }
    }
}

#[test]
fn fuzz_parquet_files() {
    let dir = tempfile::tempdir().unwrap();
    let base = parquet_chat_file(&dir.path().join("base.parquet"));
    let path = dir.path().join("fuzz.parquet");
    let mut c = Counts::default();
    let mut panicked = Vec::new();
    for (k, damage) in PARQUET_PANICS.iter().enumerate() {
        let mut v = base.clone();
        for &(at, byte) in *damage {
            v[at] = byte;
        }
        std::fs::write(&path, &v).unwrap();
        c.tried += 1;
        match read_damaged_parquet(&path, &format!("known case {k}")) {
            Ok(true) => c.ok += 1,
            Ok(false) => c.clean_errors += 1,
            Err(msg) => panicked.push(format!("known case {k} {damage:?}: {msg}")),
        }
    }
    let start = Instant::now();
    let seed = seed();
    let mut case = 0;
    while start.elapsed() < budget() {
        let mut rng = Rng::new(seed).fork(3 << 40 | case);
        let v = damage_bytes(&mut rng, &base);
        std::fs::write(&path, &v).unwrap();
        c.tried += 1;
        match read_damaged_parquet(&path, &format!("seed {seed} case {case}")) {
            Ok(true) => c.ok += 1,
            Ok(false) => c.clean_errors += 1,
            Err(msg) => {
                let changed: Vec<(usize, u8)> =
                    (0..v.len()).filter(|&i| v[i] != base[i]).map(|i| (i, v[i])).collect();
                panicked.push(format!("seed {seed} case {case} {changed:?}: {msg}"));
            }
        }
        case += 1;
    }
    c.panics = panicked.len() as u64;
    eprintln!("Parquet files: {c:?}");
    assert!(panicked.is_empty(), "{} panics:\n{}", panicked.len(), panicked.join("\n"));
    assert!(c.tried > 100 && c.clean_errors > 0, "{c:?}");
}

/// What `sft train`, `eval` and `inspect` do with a prepared directory before training.
fn exercise_prepared(dir: &Path, tok: &sft::data::ChatTokenizer) -> anyhow::Result<()> {
    for split in [Split::Train, Split::Val] {
        let ds = Dataset::open(dir, split)?;
        ds.ensure_tokenizer(tok)?;
        let cfg =
            LoaderConfig { batch_size: 3, max_seq_len: 96, mode: BatchMode::Packed, shuffle: true, seed: 1 };
        batches_in_order(&ds, &cfg)?;
    }
    Ok(())
}

#[test]
fn fuzz_prepare_record() {
    let root = tempfile::tempdir().unwrap();
    let (data, tok_path) = common::train::prepared_data(root.path(), 60, 96);
    let tok = sft::data::ChatTokenizer::from_file(&tok_path).unwrap();
    exercise_prepared(&data, &tok).unwrap();
    let record = data.join("prepare.json");
    let text = std::fs::read_to_string(&record).unwrap();
    let base: serde_json::Value = serde_json::from_str(&text).unwrap();
    let paths = common::fuzz::paths(&base);
    let specials = [
        serde_json::json!(null),
        serde_json::json!(0),
        serde_json::json!(-1),
        serde_json::json!(1),
        serde_json::json!(u64::MAX),
        serde_json::json!(0.5),
        serde_json::json!(""),
        serde_json::json!("train-00000.bin"),
        serde_json::json!("../prepare.json"),
        serde_json::json!("0000000000000000"),
        serde_json::json!([]),
        serde_json::json!({}),
        serde_json::json!(true),
    ];
    let mut c = Counts::default();
    let mut failures = Vec::new();
    let start = Instant::now();
    let seed = seed();
    while start.elapsed() < budget() {
        let case = c.tried;
        let mut rng = Rng::new(seed).fork(4 << 40 | case);
        let mut json = base.clone();
        let mut what = format!("seed {seed} case {case}:");
        for _ in 0..1 + rng.below(2) {
            let path = &paths[rng.below(paths.len())];
            let value = (rng.below(5) != 0).then(|| specials[rng.below(specials.len())].clone());
            what.push_str(&format!(" {} = {value:?};", common::fuzz::show(path)));
            common::fuzz::set(&mut json, path, value);
        }
        let mut bytes = json.to_string().into_bytes();
        if rng.below(5) == 0 {
            let at = rng.below(bytes.len());
            bytes[at] = b"0123456789-.e,:{}[]\" "[rng.below(21)];
            what.push_str(&format!(" byte {at} edited;"));
        }
        std::fs::write(&record, &bytes).unwrap();
        c.tried += 1;
        match catch_unwind(AssertUnwindSafe(|| exercise_prepared(&data, &tok))) {
            Ok(Ok(())) => c.ok += 1,
            Ok(Err(e)) => {
                c.clean_errors += 1;
                let msg = format!("{e:#}");
                if !msg.contains(data.to_str().unwrap()) {
                    failures.push(format!("{what} an error naming no file: {msg}"));
                }
            }
            Err(_) => {
                c.panics += 1;
                failures.push(format!("{what} panicked"));
            }
        }
    }
    std::fs::write(&record, &text).unwrap();
    eprintln!("prepare.json: {c:?}");
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    assert!(c.tried > 100 && c.clean_errors > 0, "{c:?}");
}
