//! A `tokenizer.json`, damaged, through what `sft prepare`, `train`, `generate` and `chat` do with
//! one: load it (the chat tokens checked), tokenize conversations with their supervised spans,
//! encode a prompt, decode ids (valid, out of range, special). Mutations: any node of the JSON
//! (the vocabulary, merges, added tokens, normalizer, pre-tokenizer, decoder, post-processor) set
//! to a special value, removed, its component `type` swapped, arrays cut or grown, and byte edits
//! of the text. Every outcome is `Ok` or a clean `Err` naming the file; a panic fails the test
//! with the seed and the mutation.
//!
//! Bounded in time: `SFT_FUZZ_SECONDS` (default 4). `SFT_FUZZ_SEED` replays a run.

mod common;

use common::fuzz::{self, Tally};
use common::train::chat_json;
use serde_json::{json, Value};
use sft::data::{read_chat_file, tokenize_conversation, train_tokenizer, ChatTokenizer, TrainOn, Turn};
use sft::rng::Rng;
use std::path::Path;
use std::time::{Duration, Instant};

/// What the commands do with a tokenizer file, short of a model.
fn exercise(path: &Path, convs: &[sft::data::Conversation]) -> anyhow::Result<()> {
    let tok = ChatTokenizer::from_file(path)?;
    for conv in convs {
        let ex = tokenize_conversation(&tok, conv, TrainOn::FinalReply)?;
        tok.decode(&ex.tokens)?;
    }
    let history = [Turn { user: "Hi <SOU> there".into(), assistant: "Hello!".into() }];
    let prompt = tok.encode_prompt("Be brief.", &history, "What is 2 + 2?")?;
    tok.decode_with_specials(&prompt)?;
    let n = tok.vocab_size() as u32;
    for ids in [vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9], vec![n.saturating_sub(1), n, n + 1, u32::MAX]] {
        // Ids past the vocabulary are the model's to never produce; decoding them must not panic.
        let _ = tok.decode(&ids);
        let _ = tok.decode_with_specials(&ids);
    }
    tok.encode_text("naïve café — 漢字 \u{0} \u{fffd} 🙂")?;
    Ok(())
}

fn special_values(rng: &mut Rng) -> Value {
    let values = [
        json!(null),
        json!(0),
        json!(-1),
        json!(1),
        json!(u32::MAX),
        json!(u64::MAX),
        json!(1e300),
        json!(0.5),
        json!(""),
        json!("<SOA>"),
        json!("Ġ"),
        json!("\u{0}"),
        json!(true),
        json!([]),
        json!({}),
        json!([0, 1]),
        json!(["a", "b"]),
        json!({"type": "Sequence"}),
    ];
    values[rng.below(values.len())].clone()
}

/// Component type names the tokenizers crate knows, to swap one for another.
const TYPES: &[&str] = &[
    "BPE",
    "WordPiece",
    "WordLevel",
    "Unigram",
    "ByteLevel",
    "Whitespace",
    "Metaspace",
    "Sequence",
    "NFC",
    "NFKC",
    "Lowercase",
    "Strip",
    "Replace",
    "Split",
    "TemplateProcessing",
    "BertProcessing",
    "RobertaProcessing",
    "ByteFallback",
    "Fuse",
    "Prepend",
    "Digits",
    "Punctuation",
    "Nope",
];

/// A random node of `v`: the path of keys and indices to it. Arrays are entered at a random
/// element, so the vocabulary's and merges' entries are reached as often as the top level.
fn random_path(rng: &mut Rng, v: &Value) -> Vec<Value> {
    let mut path = Vec::new();
    let mut node = v;
    loop {
        let next = match node {
            Value::Object(m) if !m.is_empty() && rng.below(4) != 0 => {
                let k = m.keys().nth(rng.below(m.len())).unwrap().clone();
                node = &m[&k];
                json!(k)
            }
            Value::Array(a) if !a.is_empty() && rng.below(4) != 0 => {
                let i = rng.below(a.len());
                node = &a[i];
                json!(i)
            }
            _ => return path,
        };
        path.push(next);
    }
}

fn node_mut<'a>(v: &'a mut Value, path: &[Value]) -> &'a mut Value {
    path.iter().fold(v, |node, key| match key {
        Value::String(k) => &mut node[k.as_str()],
        _ => &mut node[key.as_u64().unwrap() as usize],
    })
}

/// One mutation of the tokenizer's JSON, described.
fn mutate(rng: &mut Rng, json: &mut Value) -> String {
    let path = random_path(rng, json);
    let shown = path.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(".");
    let node = node_mut(json, &path);
    match rng.below(6) {
        0 => {
            let v = special_values(rng);
            *node = v.clone();
            format!("{shown} = {v}")
        }
        1 if node.get("type").is_some() => {
            let t = TYPES[rng.below(TYPES.len())];
            node["type"] = json!(t);
            format!("{shown}.type = {t}")
        }
        2 if node.is_array() => {
            let a = node.as_array_mut().unwrap();
            let cut = rng.below(a.len() + 1);
            a.truncate(cut);
            format!("{shown} cut to {cut} elements")
        }
        3 if node.is_array() => {
            let a = node.as_array_mut().unwrap();
            let extra = match (a.first().cloned(), rng.below(2)) {
                (Some(first), 0) => first,
                _ => special_values(rng),
            };
            a.push(extra.clone());
            format!("{shown} += {extra}")
        }
        4 if node.is_object() => {
            let m = node.as_object_mut().unwrap();
            if m.is_empty() {
                return format!("{shown}: nothing");
            }
            let k = m.keys().nth(rng.below(m.len())).unwrap().clone();
            m.remove(&k);
            format!("{shown}.{k} removed")
        }
        _ if node.is_object() => {
            // A new entry: a vocabulary token at a taken or a far id, or a key nothing expects.
            let m = node.as_object_mut().unwrap();
            let (k, v) =
                [("<SOA>", json!(3)), ("zz", json!(1)), ("zz", json!(1u64 << 40)), ("type", json!("BPE"))]
                    [rng.below(4)]
                .clone();
            m.insert(k.to_string(), v.clone());
            format!("{shown}.{k} = {v}")
        }
        _ => {
            let v = special_values(rng);
            *node = v.clone();
            format!("{shown} = {v}")
        }
    }
}

#[test]
fn a_damaged_tokenizer_loads_or_fails_cleanly() {
    let seconds = fuzz::seconds(4.0);
    let seed = fuzz::seed(seconds);

    let root = tempfile::tempdir().unwrap();
    let chat = root.path().join("chat.json");
    std::fs::write(&chat, chat_json(24)).unwrap();
    let convs = read_chat_file(&chat).unwrap();
    let path = root.path().join("tokenizer.json");
    train_tokenizer(&convs, 320, &path).unwrap();
    let base: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    exercise(&path, &convs[..4]).unwrap();

    let mut tally = Tally::default();
    let mut rng = Rng::new(seed);
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < deadline {
        let mut json = base.clone();
        let mut what = format!("seed {seed} input {}:", tally.inputs);
        for _ in 0..1 + rng.below(3) {
            what.push_str(&format!(" {};", mutate(&mut rng, &mut json)));
        }
        let mut text = json.to_string().into_bytes();
        if rng.below(5) == 0 {
            let at = rng.below(text.len());
            match rng.below(3) {
                0 => text.truncate(at),
                1 => text[at] = b"0123456789-.e,:{}[]\" \\u"[rng.below(23)],
                _ => {
                    let piece = text[at..(at + 12).min(text.len())].to_vec();
                    text.splice(at..at, piece);
                }
            }
            what.push_str(&format!(" text edit at byte {at}"));
        }
        std::fs::write(&path, &text).unwrap();
        tally.run(&what, "tokenizer.json", || exercise(&path, &convs[..4]));
    }
    println!(
        "fuzzed tokenizer.json: {} inputs: {} loaded and tokenized, {} clean errors, {} failures",
        tally.inputs,
        tally.ok,
        tally.errors,
        tally.failures.len()
    );
    tally.assert_clean(seed);
}
