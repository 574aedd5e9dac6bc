//! Issue 13.1: a checkpoint's `config.json`, mutated field by field and at random, through the
//! loading path that `train --init-from` / `--resume` and `eval` take (config, usage check,
//! weights, the memory-planned training model and the inference model; no training). Every
//! outcome is `Ok` or a clean `Err`; a panic fails the test with the seed and the mutation.
//!
//! Bounded in time: `SFT_FUZZ_SECONDS` (default 3) for the random part, after one pass over
//! every field × every special value. `SFT_FUZZ_SEED` replays a run.

mod common;

use common::fuzz::{self, Tally};
use serde_json::{json, Value};
use sft::backend::cpu::CpuBackend;
use sft::checkpoint::Checkpoint;
use sft::rng::Rng;
use sft::train::cli::{init, InitArgs};
use std::path::Path;
use std::time::{Duration, Instant};

/// The tokenizer size the usage check is asked about (the tiny checkpoint's vocabulary is 64).
const TOKENIZER_VOCAB: usize = 60;

/// What `sft train --init-from` and `sft eval` do with a checkpoint before their first batch.
fn load_like_train_and_eval(dir: &Path) -> anyhow::Result<()> {
    let ckpt = Checkpoint::open(dir)?;
    // Rows of at most 32 tokens: the fuzz checks the logic, not the host's memory.
    let seq_len = ckpt.config().max_seq_len.min(32);
    ckpt.config().check_usage(Some((&dir.join("tokenizer.json"), TOKENIZER_VOCAB)), seq_len)?;
    let model = ckpt.training_model_for(CpuBackend::<f32>::new(), None, 2, seq_len)?;
    drop(model);
    ckpt.inference_model(CpuBackend::<f32>::new(), 2 * seq_len)?;
    Ok(())
}

/// Values a field is set to, besides removing it.
fn special_values() -> Vec<Value> {
    vec![
        json!(0),
        json!(-1),
        json!(1),
        json!(3),
        json!(0.5),
        json!(1e30),
        json!(-1e30),
        json!(u64::MAX),
        json!(1u64 << 32),
        json!(1u64 << 40),
        json!(i64::MIN),
        json!("NaN"),
        json!("inf"),
        json!("64"),
        json!(""),
        json!(null),
        json!(true),
        json!([]),
        json!({}),
        json!([1, 2]),
        json!({"rope_type": "llama3", "factor": 0}),
    ]
}

/// Every (path, value) the single-field pass tries: each top-level key and each key of "sft".
fn fields(base: &Value) -> Vec<Vec<Value>> {
    let mut out = Vec::new();
    for (k, v) in base.as_object().unwrap() {
        out.push(vec![json!(k)]);
        if let Some(obj) = v.as_object() {
            for k2 in obj.keys() {
                out.push(vec![json!(k), json!(k2)]);
            }
        }
    }
    // Fields a config may carry that ours does not write.
    for extra in ["rope_parameters", "num_key_value_heads", "head_dim", "original_max_position_embeddings"] {
        out.push(vec![json!(extra)]);
    }
    out
}

/// Writes `text` as the checkpoint's config.json and loads it.
fn try_config(tally: &mut Tally, dir: &Path, text: &str, what: &str) {
    std::fs::write(dir.join("config.json"), text).unwrap();
    // A clean error says which checkpoint (and mostly which file) it is about.
    tally.run(what, dir.to_str().unwrap(), || load_like_train_and_eval(dir));
}

#[test]
fn mutated_config_json_loads_or_fails_cleanly() {
    let seconds = fuzz::seconds(3.0);
    let seed = fuzz::seed(seconds);

    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("ckpt");
    init(InitArgs { model: "tiny".into(), out: dir.clone(), seed: 1, tokenizer: None, vocab_size: Some(64) })
        .unwrap();
    let ours: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    // The same checkpoint described by the Hugging Face fields alone (a model from elsewhere).
    let mut hf_only = ours.clone();
    hf_only.as_object_mut().unwrap().remove("sft");
    let bases = [("ours", ours), ("hf", hf_only)];

    let mut tally = Tally::default();
    // Both bases load as they are.
    for (name, base) in &bases {
        try_config(&mut tally, &dir, &base.to_string(), name);
        assert_eq!(tally.ok, tally.inputs, "the unmutated {name} config does not load");
    }

    // 1. Every field, every special value, and removed.
    for (name, base) in &bases {
        for path in fields(base) {
            for value in special_values().into_iter().map(Some).chain([None]) {
                let mut json = base.clone();
                let what = format!("{name} {} = {value:?}", fuzz::show(&path));
                fuzz::set(&mut json, &path, value);
                try_config(&mut tally, &dir, &json.to_string(), &what);
            }
        }
    }
    let exhaustive = tally.inputs;

    // 2. Random: several fields at once, random numbers, and edits of the text itself.
    let mut rng = Rng::new(seed);
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let specials = special_values();
    while Instant::now() < deadline {
        let (name, base) = &bases[rng.below(bases.len())];
        let paths = fields(base);
        let mut json = base.clone();
        let mut what = format!("seed {seed} input {}: {name}", tally.inputs);
        for _ in 0..1 + rng.below(3) {
            let path = &paths[rng.below(paths.len())];
            let value = match rng.below(5) {
                0 => None,
                1 => Some(specials[rng.below(specials.len())].clone()),
                2 => Some(json!(rng.below(1 << 20))),
                3 => Some(json!(rng.next_u64() >> rng.below(64))),
                _ => Some(json!((rng.normal() * 10f64.powi(rng.below(80) as i32 - 40)))),
            };
            what.push_str(&format!(" {}={value:?}", fuzz::show(path)));
            fuzz::set(&mut json, path, value);
        }
        let mut text = json.to_string();
        if rng.below(4) == 0 {
            // A byte-level edit: cut, duplicate or overwrite a piece of the text.
            let mut bytes = text.into_bytes();
            let at = fuzz::edit_json_text(&mut rng, &mut bytes);
            what.push_str(&format!(" text edit at byte {at}"));
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        try_config(&mut tally, &dir, &text, &what);
    }

    println!(
        "fuzzed config.json: {} inputs ({exhaustive} single-field, {} random): {} loaded, {} clean errors, {} panics",
        tally.inputs,
        tally.inputs - exhaustive,
        tally.ok,
        tally.errors,
        tally.failures.len()
    );
    tally.assert_clean(seed);
}
