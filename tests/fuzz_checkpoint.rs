//! A training run's checkpoint, damaged, through `sft train --resume`: trainer_state.json field by
//! field and at random, the safetensors files (the header's dtypes, shapes, offsets, names and
//! metadata, its length prefix, bytes anywhere, a cut or a tail), the `latest` pointer, and
//! missing files. Every outcome is `Ok` or a clean `Err` naming the run; a panic fails the test
//! with the seed and the damage.
//!
//! Bounded in time: `SFT_FUZZ_SECONDS` (default 6) for the random part, after one pass over every
//! field of trainer_state.json × every special value. `SFT_FUZZ_SEED` replays a run.

mod common;

use common::fuzz::{self, Tally};
use common::train::{copy_dir, prepared_data, tiny_config};
use serde_json::Value;
use sft::backend::cpu::CpuBackend;
use sft::data::BatchMode;
use sft::rng::Rng;
use sft::train::{train_on, TrainConfig};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The fixture's run saved this step; the resume trains one more.
const SAVED_STEP: u64 = 2;

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
        for value in fuzz::special_values().into_iter().map(Some).chain([None]) {
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
                let (bytes, damage) = fuzz::damage_safetensors(&mut rng, &originals[k]);
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
