//! Issue 13.8: SIGKILL at random moments, a few dozen times, loses nothing.
//!
//! A tiny CPU run saving after every step is killed during steps, during checkpoint saves and
//! during the start of a resume, and `sft prepare` is killed part-way. After every kill: `latest`
//! loads (weights, AdamW moments, trainer state), `log.csv` still has a row for every step up to
//! the checkpoint, and every logged loss equals the uninterrupted run's bit for bit. At the end
//! the run resumes to its last step and its log and weights equal the uninterrupted run's.
//!
//! Seeded (`SFT_KILL_SEED`, printed) and bounded: about a minute on 2 cores by default;
//! `SFT_KILL_SECONDS` runs the training part longer, `SFT_KILL_ROUNDS` sets its number of kills.

mod common;

use sft::backend::cpu::CpuBackend;
use sft::checkpoint::{self, Checkpoint};
use sft::data::{prepare, BatchMode, Dataset, PrepareOptions, Split, TrainOn};
use sft::rng::Rng;
use sft::train::log::read_train_losses;
use sft::train::{train_on, TrainConfig, TrainerState};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TEST_NAME: &str = "sigkill_at_random_moments_loses_nothing";
/// Steps of the run: enough that the kill rounds never reach its end.
const TOTAL_STEPS: u64 = 200;

fn env_path(name: &str) -> PathBuf {
    PathBuf::from(std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set")))
}

/// The run every child continues: save after every step, keep two checkpoints.
fn run_config(data: &Path, tok: &Path, out: &Path) -> TrainConfig {
    TrainConfig {
        max_steps: Some(TOTAL_STEPS),
        save_every: 1,
        eval_every: 4,
        resume: out.join("latest").exists(),
        ..common::train::tiny_config(data, tok, out, BatchMode::Dynamic)
    }
}

fn prepare_options(chat: &Path, tok: &Path, out: &Path) -> PrepareOptions {
    PrepareOptions {
        data: chat.to_path_buf(),
        tokenizer: tok.to_path_buf(),
        out_dir: out.to_path_buf(),
        max_seq_len: 96,
        train_share: 0.85,
        seed: 5,
        train_on: TrainOn::FinalReply,
        chat: Default::default(),
    }
}

/// Child mode: train (resuming when there is a checkpoint) or prepare, until killed.
fn child_role() -> bool {
    match std::env::var("SFT_KILL_ROLE").as_deref() {
        Ok("train") => {
            let cfg =
                run_config(&env_path("SFT_KILL_DATA"), &env_path("SFT_KILL_TOK"), &env_path("SFT_KILL_OUT"));
            train_on(CpuBackend::<f32>::new(), &cfg).unwrap();
            true
        }
        Ok("prepare") => {
            let opts = prepare_options(
                &env_path("SFT_KILL_CHAT"),
                &env_path("SFT_KILL_TOK"),
                &env_path("SFT_KILL_OUT"),
            );
            prepare(&opts).unwrap();
            true
        }
        _ => false,
    }
}

fn spawn(envs: &[(&str, &Path)], role: &str) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([TEST_NAME, "--exact", "--nocapture", "--test-threads", "1"])
        .env("SFT_KILL_ROLE", role)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

fn kill(child: &mut Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

fn latest_step(out: &Path) -> Option<u64> {
    let dir = checkpoint::latest(out).ok()??;
    Some(TrainerState::load(&dir).ok()?.step)
}

fn save_in_progress(out: &Path) -> bool {
    std::fs::read_dir(out).is_ok_and(|entries| {
        entries.filter_map(Result::ok).any(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
    })
}

/// Polls `done` every millisecond; false when `child` exits first or after 60 s.
fn wait_for(child: &mut Child, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while !done() {
        if child.try_wait().unwrap().is_some() || start.elapsed() > Duration::from_secs(60) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

/// Every example of both splits of a prepared directory (tokens and supervised marks).
fn dataset_examples(dir: &Path) -> anyhow::Result<Vec<(Vec<u32>, Vec<bool>)>> {
    let mut out = Vec::new();
    for split in [Split::Train, Split::Val] {
        let ds = Dataset::open(dir, split)?;
        for i in 0..ds.len() {
            let ex = ds.example(i).to_example();
            out.push((ex.tokens, ex.supervised));
        }
    }
    Ok(out)
}

#[derive(Default, Debug)]
struct Counts {
    step: usize,
    save: usize,
    /// Save kills that left a `*.tmp` behind: the kill landed inside the save.
    save_mid: usize,
    start: usize,
    prepare: usize,
    prepare_partial: usize,
    checks: usize,
}

/// After a kill: `latest` loads, and the log holds every step up to it with the reference losses.
fn check_after_kill(out: &Path, reference: &BTreeMap<u64, f64>, what: &str, counts: &mut Counts) -> u64 {
    let Some(dir) = checkpoint::latest(out).unwrap() else { return 0 };
    let state = TrainerState::load(&dir).unwrap_or_else(|e| panic!("{what}: trainer state: {e:#}"));
    let ckpt = Checkpoint::open(&dir).unwrap_or_else(|e| panic!("{what}: {e:#}"));
    let mut model =
        ckpt.training_model(CpuBackend::<f32>::new(), 96).unwrap_or_else(|e| panic!("{what}: {e:#}"));
    checkpoint::load_optimizer_into(&dir, &mut model).unwrap_or_else(|e| panic!("{what}: {e:#}"));
    let logged = read_train_losses(&out.join("log.csv")).unwrap_or_else(|e| panic!("{what}: log.csv: {e:#}"));
    let mut seen = BTreeMap::new();
    for (step, loss) in logged {
        let want = reference[&step];
        assert_eq!(
            loss.to_bits(),
            want.to_bits(),
            "{what}: step {step} logged loss {loss}, uninterrupted {want}"
        );
        assert!(seen.insert(step, loss).is_none(), "{what}: step {step} logged twice");
    }
    for step in 1..=state.step {
        assert!(
            seen.contains_key(&step),
            "{what}: log.csv lost the row of step {step} (latest is step {})",
            state.step
        );
    }
    counts.checks += 1;
    state.step
}

#[test]
fn sigkill_at_random_moments_loses_nothing() {
    if child_role() {
        return;
    }
    let seed: u64 = std::env::var("SFT_KILL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    let seconds: u64 = std::env::var("SFT_KILL_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let rounds: usize = std::env::var("SFT_KILL_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(45);
    println!("kill test: seed {seed} (SFT_KILL_SEED), up to {rounds} training kills in {seconds} s");
    let mut rng = Rng::new(seed);
    let started = Instant::now();

    let root = tempfile::tempdir().unwrap();
    let (data, tok) = common::train::prepared_data(root.path(), 48, 96);
    let out = root.path().join("killed");

    // The uninterrupted run's per-step losses and final weights.
    let reference_cfg = TrainConfig {
        save_every: 0,
        keep_checkpoints: 1,
        ..run_config(&data, &tok, &root.path().join("reference"))
    };
    let (reference_model, reference_report) = train_on(CpuBackend::<f32>::new(), &reference_cfg).unwrap();
    let reference: BTreeMap<u64, f64> = reference_report.step_losses.iter().copied().collect();
    assert_eq!(reference.len() as u64, TOTAL_STEPS);
    let reference_params = reference_model.read_params().unwrap();
    println!("reference run: {TOTAL_STEPS} steps in {:.1} s", started.elapsed().as_secs_f64());

    // ---- training: kills during steps, saves and the start of a resume ----------------------
    let envs =
        [("SFT_KILL_DATA", data.as_path()), ("SFT_KILL_TOK", tok.as_path()), ("SFT_KILL_OUT", out.as_path())];
    let mut counts = Counts::default();
    let mut last = 0u64;
    let deadline = started + Duration::from_secs(seconds);
    for round in 0..rounds {
        if Instant::now() > deadline {
            println!("time budget reached after {round} training kills");
            break;
        }
        let mut child = spawn(&envs, "train");
        let phase = round % 3;
        let what = format!("seed {seed} round {round}");
        match phase {
            // During steps: after this child's first save, at a random moment.
            0 => {
                assert!(
                    wait_for(&mut child, || latest_step(&out).is_some_and(|s| s > last)),
                    "{what}: no progress"
                );
                std::thread::sleep(Duration::from_micros(rng.below(30_000) as u64));
                counts.step += 1;
            }
            // During a save: once a step-N.tmp/ of this child appears.
            1 => {
                assert!(
                    wait_for(&mut child, || latest_step(&out).is_some_and(|s| s > last)),
                    "{what}: no progress"
                );
                assert!(wait_for(&mut child, || save_in_progress(&out)), "{what}: no save seen");
                std::thread::sleep(Duration::from_micros(rng.below(2_000) as u64));
                counts.save += 1;
            }
            // During the start of a resume: loading the checkpoint, opening the data.
            _ => {
                std::thread::sleep(Duration::from_micros(rng.below(80_000) as u64));
                counts.start += 1;
            }
        }
        kill(&mut child);
        if phase == 1 && save_in_progress(&out) {
            counts.save_mid += 1;
        }
        let step = check_after_kill(&out, &reference, &what, &mut counts);
        assert!(step >= last, "{what}: latest went back from step {last} to {step}");
        last = step;
    }
    println!(
        "training kills: {} during steps, {} during saves ({} left a half-written step-N.tmp/), {} during the \
         start of a resume; latest at step {last} after {:.1} s",
        counts.step,
        counts.save,
        counts.save_mid,
        counts.start,
        started.elapsed().as_secs_f64()
    );

    // The run continues to its end uninterrupted: the same losses and weights as never killed.
    let finish = TrainConfig { resume: true, ..run_config(&data, &tok, &out) };
    let (model, _) = train_on(CpuBackend::<f32>::new(), &finish).unwrap();
    let logged = read_train_losses(&out.join("log.csv")).unwrap();
    assert_eq!(logged.len() as u64, TOTAL_STEPS, "log.csv rows after the final resume");
    for (step, loss) in &logged {
        assert_eq!(loss.to_bits(), reference[step].to_bits(), "final log: step {step}");
    }
    for (a, b) in model.read_params().unwrap().iter().zip(&reference_params) {
        assert!(
            a.data.iter().zip(&b.data).all(|(x, y)| x.to_bits() == y.to_bits()),
            "final weights: {} differs",
            a.name
        );
    }

    // ---- prepare: killed part-way, then run again ------------------------------------------
    let chat = root.path().join("big.json");
    std::fs::write(&chat, common::train::chat_json(3000)).unwrap();
    let reference_dir = root.path().join("prepared-reference");
    let t = Instant::now();
    prepare(&prepare_options(&chat, &tok, &reference_dir)).unwrap();
    let prepare_ms = t.elapsed().as_millis() as usize;
    let want = dataset_examples(&reference_dir).unwrap();
    let killed_dir = root.path().join("prepared-killed");
    let penvs = [
        ("SFT_KILL_CHAT", chat.as_path()),
        ("SFT_KILL_TOK", tok.as_path()),
        ("SFT_KILL_OUT", killed_dir.as_path()),
    ];
    for round in 0..12 {
        let what = format!("seed {seed} prepare round {round}");
        let mut child = spawn(&penvs, "prepare");
        // The child's start (process, tokenizer) takes a while too: spread over both.
        std::thread::sleep(Duration::from_millis(rng.below(prepare_ms + 60) as u64));
        kill(&mut child);
        counts.prepare += 1;
        // What a kill leaves is either refused or complete, never a silently different data set.
        match dataset_examples(&killed_dir) {
            Ok(got) => {
                assert!(got == want, "{what}: a killed prepare left a data set that opens but differs")
            }
            Err(_) => counts.prepare_partial += 1,
        }
        prepare(&prepare_options(&chat, &tok, &killed_dir))
            .unwrap_or_else(|e| panic!("{what}: rerun: {e:#}"));
        assert!(
            dataset_examples(&killed_dir).unwrap() == want,
            "{what}: the rerun differs from an unkilled prepare"
        );
        counts.checks += 1;
    }
    println!(
        "prepare kills: {} ({} left a directory that is refused, then rerun to the same data)",
        counts.prepare, counts.prepare_partial
    );
    println!(
        "kill test: {} kills in all, {} checks passed, final run equal to the uninterrupted one; {:.1} s",
        counts.step + counts.save + counts.start + counts.prepare,
        counts.checks,
        started.elapsed().as_secs_f64()
    );
}
