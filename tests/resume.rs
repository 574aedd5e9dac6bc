//! An interrupted and resumed run repeats an uninterrupted one bit for bit: the same per-step
//! losses (f64 equality) and the same final weights, for padded and packed batches, with
//! dropout on and two micro-batches per optimizer step; with f32 and with bf16 AdamW moments
//! (`--optimizer-state`), and a resume in the other state type refused.

mod common;

use common::train::{prepared_data, tiny_config};
use sft::backend::cpu::CpuBackend;
use sft::backend::StateDtype;
use sft::data::BatchMode;
use sft::train::log::read_train_losses;
use sft::train::{train_on, TrainConfig, TrainReport};
use std::path::Path;

fn run(cfg: &TrainConfig) -> (TrainReport, Vec<sft::model::params::NamedTensor>) {
    let (model, report) = train_on(CpuBackend::<f32>::new(), cfg).unwrap();
    (report, model.read_params().unwrap())
}

/// Trains 2N steps in one go, and N steps then a resume to 2N, in two fresh out_dirs.
fn check_resume_is_exact(mode: BatchMode, leftover_tmp: bool) {
    check_resume_is_exact_with(mode, leftover_tmp, StateDtype::F32);
}

fn check_resume_is_exact_with(mode: BatchMode, leftover_tmp: bool, state: StateDtype) {
    const N: u64 = 3;
    let root = tempfile::tempdir().unwrap();
    let (data, tok) = prepared_data(root.path(), 48, 96);
    let base = |out: &Path| TrainConfig { optimizer_state: state, ..tiny_config(&data, &tok, out, mode) };

    let whole = TrainConfig { max_steps: Some(2 * N), ..base(&root.path().join("whole")) };
    let (whole_report, whole_params) = run(&whole);
    assert_eq!(whole_report.steps, 2 * N);
    assert_eq!(whole_report.step_losses.len() as u64, 2 * N);
    // The resumed half crosses an epoch end (a reshuffle) for this data size.
    assert!(whole_report.steps_per_epoch < 2 * N, "{whole_report:?}");

    let cut_dir = root.path().join("cut");
    // `max_steps` alone would also set the schedule's length (as in Hugging Face trainers): a run
    // meant to be cut and resumed names its schedule.
    let first = TrainConfig { max_steps: Some(N), schedule_steps: Some(2 * N), ..base(&cut_dir) };
    let (first_report, _) = run(&first);
    assert_eq!(first_report.steps, N);
    if leftover_tmp {
        // A save killed half-way: a later step's directory that never got renamed.
        let tmp = cut_dir.join(format!("step-{}.tmp", N + 1));
        std::fs::create_dir(&tmp).unwrap();
        std::fs::write(tmp.join("model.safetensors"), b"half-written").unwrap();
        std::fs::write(cut_dir.join("latest.tmp"), b"step-999").unwrap();
    }
    let second = TrainConfig { max_steps: Some(2 * N), resume: true, ..first.clone() };
    let (second_report, resumed_params) = run(&second);
    assert_eq!(second_report.steps, 2 * N);

    let mut joined = first_report.step_losses.clone();
    joined.extend(second_report.step_losses.iter().copied());
    assert_eq!(joined, whole_report.step_losses, "per-step losses differ after resume");
    assert_eq!(read_train_losses(&cut_dir.join("log.csv")).unwrap(), whole_report.step_losses);
    assert_eq!(second_report.final_val_loss, whole_report.final_val_loss);
    assert_eq!(resumed_params.len(), whole_params.len());
    for (a, b) in resumed_params.iter().zip(&whole_params) {
        assert_eq!(a.name, b.name);
        assert!(a.data.iter().zip(&b.data).all(|(x, y)| x.to_bits() == y.to_bits()), "{} differs", a.name);
    }
    // The moments are saved in their own type: bf16 moments as BF16 tensors (half the bytes).
    let latest = sft::checkpoint::latest(&cut_dir).unwrap().unwrap();
    let dtypes = sft::checkpoint::tensor_dtypes(&latest.join("optimizer.safetensors")).unwrap();
    let want = if state == StateDtype::Bf16 { "BF16" } else { "F32" };
    assert!(!dtypes.is_empty() && dtypes.values().all(|d| d == want), "{dtypes:?}");
}

#[test]
fn resumed_run_with_bf16_moments_repeats_the_uninterrupted_one_bit_for_bit() {
    check_resume_is_exact_with(BatchMode::Packed, false, StateDtype::Bf16);
}

/// A checkpoint's moments are resumed in the type they were saved in: the other type is refused
/// with an error that names the file and the field, before and at the optimizer file.
#[test]
fn resume_in_the_other_state_type_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let (data, tok) = prepared_data(root.path(), 48, 96);
    for (saved, asked) in [(StateDtype::Bf16, StateDtype::F32), (StateDtype::F32, StateDtype::Bf16)] {
        let out = root.path().join(format!("{saved}"));
        let first = TrainConfig {
            max_steps: Some(2),
            schedule_steps: Some(4),
            optimizer_state: saved,
            ..tiny_config(&data, &tok, &out, BatchMode::Packed)
        };
        run(&first);
        let again = TrainConfig { max_steps: Some(4), resume: true, optimizer_state: asked, ..first.clone() };
        let err = format!("{:#}", train_on(CpuBackend::<f32>::new(), &again).err().expect("must be refused"));
        assert!(err.contains("trainer_state.json") && err.contains("optimizer_state"), "{err}");
        assert!(err.contains(&format!("--optimizer-state {saved}")), "{err}");

        // The optimizer file itself is checked too (a state file edited by hand, another tool).
        let dir = sft::checkpoint::latest(&out).unwrap().unwrap();
        let ckpt = sft::checkpoint::Checkpoint::open(&dir).unwrap();
        let mut model = ckpt
            .training_model_with(
                CpuBackend::<f32>::new(),
                None,
                4,
                96,
                None,
                sft::model::Recompute::None,
                asked,
            )
            .unwrap();
        let err = format!("{:#}", sft::checkpoint::load_optimizer_into(&dir, &mut model).unwrap_err());
        assert!(err.contains("optimizer.safetensors") && err.contains("m."), "{err}");
        assert!(err.contains(&format!("--optimizer-state {saved}")), "{err}");
    }
}

#[test]
fn resumed_padded_run_repeats_the_uninterrupted_one_bit_for_bit() {
    check_resume_is_exact(BatchMode::Dynamic, false);
}

#[test]
fn resumed_packed_run_repeats_the_uninterrupted_one_bit_for_bit() {
    check_resume_is_exact(BatchMode::Packed, false);
}

#[test]
fn leftover_tmp_checkpoint_is_ignored_on_resume() {
    check_resume_is_exact(BatchMode::Dynamic, true);
}

#[test]
fn dropout_changes_the_losses() {
    // Guards the tests above against a dropout that silently does nothing.
    let root = tempfile::tempdir().unwrap();
    let (data, tok) = prepared_data(root.path(), 48, 96);
    let cfg = |name: &str, p: f32| TrainConfig {
        max_steps: Some(1),
        dropout: Some(p),
        ..tiny_config(&data, &tok, &root.path().join(name), BatchMode::Dynamic)
    };
    let (with, _) = run(&cfg("with", 0.1));
    let (without, _) = run(&cfg("without", 0.0));
    assert_ne!(with.step_losses, without.step_losses);
}

/// Child mode of the test below: trains "forever", saving after every step.
fn child_trains_until_killed() -> bool {
    let (Ok(data), Ok(tok), Ok(out)) =
        (std::env::var("SFT_KILL_DATA"), std::env::var("SFT_KILL_TOK"), std::env::var("SFT_KILL_OUT"))
    else {
        return false;
    };
    let cfg = TrainConfig {
        max_steps: Some(100_000),
        save_every: 1,
        resume: Path::new(&out).join("latest").exists(),
        ..tiny_config(Path::new(&data), Path::new(&tok), Path::new(&out), BatchMode::Dynamic)
    };
    train_on(CpuBackend::<f32>::new(), &cfg).unwrap();
    true
}

#[test]
fn kill_9_at_any_moment_leaves_a_loadable_latest_checkpoint() {
    if child_trains_until_killed() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let (data, tok) = prepared_data(root.path(), 48, 96);
    let out = root.path().join("killed");
    let mut last_step = 0;
    // Kill at different moments: saves take a good share of a tiny model's step.
    for (round, delay_ms) in [37u64, 91, 143].into_iter().enumerate() {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["kill_9_at_any_moment_leaves_a_loadable_latest_checkpoint", "--exact", "--nocapture"])
            .env("SFT_KILL_DATA", &data)
            .env("SFT_KILL_TOK", &tok)
            .env("SFT_KILL_OUT", &out)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Wait for a first save of this round, then a little more, then SIGKILL.
        let start = std::time::Instant::now();
        let saved_step = || -> Option<u64> {
            let dir = sft::checkpoint::latest(&out).ok()??;
            Some(sft::train::TrainerState::load(&dir).ok()?.step)
        };
        while saved_step().is_none_or(|s| s <= last_step) {
            assert!(start.elapsed().as_secs() < 60, "round {round}: no checkpoint after 60 s");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        child.kill().unwrap();
        child.wait().unwrap();

        let latest = sft::checkpoint::latest(&out).unwrap().expect("latest survives");
        let state = sft::train::TrainerState::load(&latest).unwrap();
        assert!(state.step > last_step, "round {round}: step {} after {last_step}", state.step);
        let mut model = sft::checkpoint::load_training_model(&latest, CpuBackend::<f32>::new(), 512).unwrap();
        sft::checkpoint::load_optimizer_into(&latest, &mut model).unwrap();
        last_step = state.step;
    }
    // And the run resumes from there.
    let cfg = TrainConfig {
        max_steps: Some(last_step + 1),
        resume: true,
        ..tiny_config(&data, &tok, &out, BatchMode::Dynamic)
    };
    let (report, _) = run(&cfg);
    assert_eq!(report.steps, last_step + 1);
}
