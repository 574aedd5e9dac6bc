//! A training run's checkpoint, damaged, through `sft train --resume`: trainer_state.json field by
//! field and at random, the safetensors files (the header's dtypes, shapes, offsets, names and
//! metadata, its length prefix, bytes anywhere, a cut or a tail), the `latest` pointer, and
//! missing files. Every outcome is `Ok` or a clean `Err` naming the run; a panic fails the test
//! with the seed and the damage.
//!
//! Bounded in time: `SFT_FUZZ_SECONDS` (default 6) for the random part, after one pass over every
//! field of trainer_state.json × every special value. `SFT_FUZZ_SEED` replays a run.

mod common;

use common::fuzz::{self, QuietPanics, Tally};
use common::train::{copy_dir, prepared_data, tiny_config};
use serde_json::{json, Value};
use sft::backend::cpu::CpuBackend;
use sft::data::BatchMode;
use sft::rng::Rng;
use sft::train::{train_on, TrainConfig};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The fixture's run saved this step; the resume trains one more.
const SAVED_STEP: u64 = 2;

/// Values a field is set to, besides removing it.
fn special_values() -> Vec<Value> {
    vec![
        json!(0),
        json!(-1),
        json!(1),
        json!(7),
        json!(0.5),
        json!(-0.5),
        json!(1e30),
        json!(-1e30),
        json!(u64::MAX),
        json!(1u64 << 40),
        json!(i64::MIN),
        json!("NaN"),
        json!(""),
        json!("dynamic"),
        json!(null),
        json!(true),
        json!([]),
        json!({}),
        json!([1, 2]),
    ]
}

/// A safetensors file split into its header (JSON) and its data.
fn split_safetensors(bytes: &[u8]) -> (Value, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

/// The file of `header` and `data`, the header padded with spaces to a multiple of 8 as the
/// format asks.
fn join_safetensors(header: &Value, data: &[u8]) -> Vec<u8> {
    let mut text = header.to_string().into_bytes();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(data);
    out
}

/// What was done to a file, and whether it must be refused: a change to the bytes of a tensor
/// never loads as if nothing happened.
struct Damage {
    what: String,
    must_fail: bool,
}

impl Damage {
    fn may(what: String) -> Self {
        Damage { what, must_fail: false }
    }
}

/// Damages one safetensors file of `bytes` in one of a dozen ways.
fn damage_safetensors(rng: &mut Rng, bytes: &[u8]) -> (Vec<u8>, Damage) {
    let (mut header, data) = split_safetensors(bytes);
    let header_end = bytes.len() - data.len();
    let names: Vec<String> =
        header.as_object().unwrap().keys().filter(|k| *k != "__metadata__").cloned().collect();
    let name = names[rng.below(names.len())].clone();
    let entry = &mut header[&name];
    let kind = rng.below(14);
    let what = match kind {
        0 => {
            let dtypes = ["F32", "BF16", "F16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "XX"];
            let d = dtypes[rng.below(dtypes.len())];
            entry["dtype"] = json!(d);
            format!("{name}: dtype {d}")
        }
        1 => {
            let mut shape: Vec<Value> = entry["shape"].as_array().unwrap().clone();
            match rng.below(5) {
                0 => shape.push(json!(1)),
                1 => {
                    shape.pop();
                }
                2 if !shape.is_empty() => {
                    let i = rng.below(shape.len());
                    shape[i] = [json!(0), json!(1), json!(u64::MAX), json!(1u64 << 33), json!(-1)]
                        [rng.below(5)]
                    .clone();
                }
                3 => shape.reverse(),
                _ => shape.clear(),
            }
            let text = format!("{name}: shape {shape:?}");
            entry["shape"] = Value::Array(shape);
            text
        }
        2 => {
            let o: Vec<u64> =
                entry["data_offsets"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
            let (a, b) = (o[0], o[1]);
            let new = match rng.below(6) {
                0 => json!([b, a]),
                1 => json!([a, b + 4]),
                2 => json!([a + 4, b + 4]),
                3 => json!([0, u64::MAX]),
                4 => json!([u64::MAX - 1, u64::MAX]),
                _ => json!(["x", a]),
            };
            let text = format!("{name}: data_offsets {new}");
            entry["data_offsets"] = new;
            text
        }
        3 => {
            header.as_object_mut().unwrap().remove(&name);
            format!("{name} removed from the header")
        }
        4 => {
            let other = names[rng.below(names.len())].clone();
            let v = header.as_object_mut().unwrap().remove(&name).unwrap();
            let new = if other == name { format!("{name}.x") } else { other };
            header.as_object_mut().unwrap().insert(new.clone(), v);
            format!("{name} renamed {new}")
        }
        5 => {
            let v = special_values()[rng.below(special_values().len())].clone();
            *entry = v.clone();
            format!("{name}'s entry = {v}")
        }
        6 => {
            let meta = header.as_object_mut().unwrap().entry("__metadata__").or_insert(json!({}));
            let text = match (meta.as_object_mut(), rng.below(3)) {
                (Some(m), 0) if !m.is_empty() => {
                    // A recorded value (a checksum, where there is one) edited by one character.
                    let keys: Vec<String> = m.keys().cloned().collect();
                    let k = keys[rng.below(keys.len())].clone();
                    let mut v = m[&k].as_str().unwrap_or("0").to_string();
                    let at = rng.below(v.len().max(1));
                    v.replace_range(
                        at..(at + 1).min(v.len()),
                        if v.get(at..at + 1) == Some("f") { "e" } else { "f" },
                    );
                    m.insert(k.clone(), json!(v));
                    format!("metadata {k} = {v:?}")
                }
                (Some(m), 1) => {
                    m.insert("sft.x".into(), json!(3));
                    "metadata holding a number".into()
                }
                _ => {
                    *meta = json!("not a map");
                    "metadata a string".into()
                }
            };
            text
        }
        7 => {
            let n = (header_end - 8) as u64;
            let new = [0, n - 1, n + 8, n - 8, u64::MAX, 1 << 40, bytes.len() as u64][rng.below(7)];
            let mut out = bytes.to_vec();
            out[..8].copy_from_slice(&new.to_le_bytes());
            return (out, Damage::may(format!("length prefix {n} → {new}")));
        }
        8 => {
            let at = 8 + rng.below(header_end - 8);
            let mut out = bytes.to_vec();
            out[at] ^= 1 << rng.below(8);
            return (out, Damage::may(format!("header byte {at} flipped")));
        }
        9 | 10 if !data.is_empty() => {
            let at = header_end + rng.below(data.len());
            let mut out = bytes.to_vec();
            out[at] ^= 1 << rng.below(8);
            return (out, Damage { what: format!("data byte {at} flipped"), must_fail: true });
        }
        11 => {
            let at = rng.below(bytes.len());
            return (bytes[..at].to_vec(), Damage::may(format!("cut at byte {at} of {}", bytes.len())));
        }
        12 => {
            let mut out = bytes.to_vec();
            out.extend((0..1 + rng.below(64)).map(|_| rng.below(256) as u8));
            return (out, Damage::may("bytes appended".into()));
        }
        _ => return (Vec::new(), Damage::may("emptied".into())),
    };
    (join_safetensors(&header, &data), Damage::may(what))
}

/// The fixture's run, copied afresh for each input and resumed.
struct Resumes {
    fixture_run: PathBuf,
    case: PathBuf,
    cfg: TrainConfig,
    tally: Tally,
}

impl Resumes {
    /// A fresh copy of the fixture's run, `edit` applied to it, then the resume.
    fn run(&mut self, what: &str, must_fail: bool, edit: impl FnOnce(&Path)) {
        let _ = std::fs::remove_dir_all(&self.case);
        copy_dir(&self.fixture_run, &self.case);
        edit(&self.case);
        let cfg = &self.cfg;
        let names = self.case.to_str().unwrap();
        let Some((_, report)) = self.tally.run(what, names, || train_on(CpuBackend::<f32>::new(), cfg))
        else {
            return;
        };
        if must_fail {
            self.tally.failures.push(format!("{what}: resumed as if nothing happened"));
        } else if report.step_losses.iter().any(|(_, l)| !l.is_finite()) {
            self.tally
                .failures
                .push(format!("{what}: resumed into a non-finite loss {:?}", report.step_losses));
        }
    }
}

#[test]
fn a_damaged_checkpoint_resumes_or_fails_cleanly() {
    let seconds = fuzz::seconds(6.0);
    let seed = fuzz::seed(seconds);

    let root = tempfile::tempdir().unwrap();
    let (data, tok) = prepared_data(root.path(), 48, 96);
    let fixture_run = root.path().join("run");
    let first = TrainConfig {
        max_steps: Some(SAVED_STEP),
        schedule_steps: Some(SAVED_STEP + 2),
        // One micro-batch a step and no evaluation: the fuzz checks the loading, not training.
        grad_accum: 1,
        eval_every: 0,
        ..tiny_config(&data, &tok, &fixture_run, BatchMode::Dynamic)
    };
    train_on(CpuBackend::<f32>::new(), &first).unwrap();
    let step_dir = format!("step-{SAVED_STEP}");
    assert!(fixture_run.join(&step_dir).join("optimizer.safetensors").is_file());
    let case = root.path().join("case");
    let cfg = TrainConfig { max_steps: Some(SAVED_STEP + 1), resume: true, ..first.clone() };
    let cfg = TrainConfig { out_dir: case.clone(), ..cfg };
    let mut resumes = Resumes { fixture_run, case, cfg, tally: Tally::default() };

    let quiet = QuietPanics::install();

    resumes.run("the checkpoint as saved", false, |_| {});
    assert_eq!(resumes.tally.ok, 1, "the undamaged checkpoint does not resume: {:?}", resumes.tally.failures);

    // 1. Every field of trainer_state.json, every special value, and removed. The file ends with
    // the checksum of its text, which refuses any edit; deleted (as its error says to accept an
    // edit), every field's own check is what answers.
    let state_file = |dir: &Path| dir.join(&step_dir).join("trainer_state.json");
    let saved_text = std::fs::read_to_string(state_file(&resumes.fixture_run)).unwrap();
    let mut state: Value = serde_json::from_str(&saved_text).unwrap();
    state.as_object_mut().unwrap().remove("state_checksum").expect("the save recorded its checksum");
    for path in &fuzz::paths(&state) {
        for value in special_values().into_iter().map(Some).chain([None]) {
            let what = format!("trainer_state.json {} = {value:?}", fuzz::show(path));
            let mut json = state.clone();
            fuzz::set(&mut json, path, value);
            resumes.run(&what, false, |dir| std::fs::write(state_file(dir), json.to_string()).unwrap());
        }
    }
    let exhaustive = resumes.tally.inputs;

    // 2. Random damage, one file at a time.
    let files = ["model.safetensors", "optimizer.safetensors"];
    let originals: Vec<Vec<u8>> =
        files.iter().map(|f| std::fs::read(resumes.fixture_run.join(&step_dir).join(f)).unwrap()).collect();
    let unchecked_text = state.to_string();
    let mut rng = Rng::new(seed);
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < deadline {
        let case_no = resumes.tally.inputs;
        match rng.below(8) {
            0..=4 => {
                let k = rng.below(files.len());
                let (bytes, damage) = damage_safetensors(&mut rng, &originals[k]);
                let what = format!("seed {seed} input {case_no}: {}: {}", files[k], damage.what);
                let path = Path::new(&step_dir).join(files[k]);
                resumes.run(&what, damage.must_fail, |dir| std::fs::write(dir.join(&path), bytes).unwrap());
            }
            5 => {
                // trainer_state.json: a byte-level edit of its text, as saved or without its checksum.
                let base = if rng.below(2) == 0 { &saved_text } else { &unchecked_text };
                let mut bytes = base.clone().into_bytes();
                let at = fuzz::edit_json_text(&mut rng, &mut bytes);
                let what = format!("seed {seed} input {case_no}: trainer_state.json edited at byte {at}");
                resumes.run(&what, false, |dir| std::fs::write(state_file(dir), bytes).unwrap());
            }
            6 => {
                let pointers = [
                    "",
                    "step-1",
                    "step-3",
                    "step-2\n\n",
                    "../run/step-2",
                    "/",
                    "step-",
                    "step-99999999999999999999",
                    "\u{0}",
                ];
                let p = pointers[rng.below(pointers.len())];
                let what = format!("seed {seed} input {case_no}: latest = {p:?}");
                resumes.run(&what, false, |dir| std::fs::write(dir.join("latest"), p).unwrap());
            }
            _ => {
                let gone = [
                    "model.safetensors",
                    "optimizer.safetensors",
                    "trainer_state.json",
                    "config.json",
                    "tokenizer.json",
                ];
                let f = gone[rng.below(gone.len())];
                let what = format!("seed {seed} input {case_no}: {f} removed");
                resumes.run(&what, false, |dir| std::fs::remove_file(dir.join(&step_dir).join(f)).unwrap());
            }
        }
    }
    drop(quiet);

    println!(
        "fuzzed the resume: {} inputs ({exhaustive} single-field, {} random): {} resumed, {} clean errors, {} failures",
        resumes.tally.inputs,
        resumes.tally.inputs - exhaustive,
        resumes.tally.ok,
        resumes.tally.errors,
        resumes.tally.failures.len()
    );
    resumes.tally.assert_clean(seed);
}
