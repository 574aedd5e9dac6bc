//! The `sft init`, `sft train` and `sft eval` commands, through the binary.

mod common;

use common::cli::run as sft;
use common::train::{prepared_data, tiny_config};

#[test]
fn init_writes_a_checkpoint_and_reports_the_parameter_count() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("init");
    let (ok, stdout, stderr) =
        sft(&["init", "--model", "tiny", "--vocab-size", "300", "--out", out.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    let n_params = sft::model::ModelConfig::tiny(300).n_params();
    assert!(stdout.contains(&format!("{n_params} parameters")), "{stdout}");
    assert!(out.join("model.safetensors").is_file() && out.join("config.json").is_file());
    // Not over an existing directory; the tiny preset needs a vocabulary.
    let (ok, _, stderr) =
        sft(&["init", "--model", "tiny", "--vocab-size", "300", "--out", out.to_str().unwrap()]);
    assert!(!ok && stderr.contains("already exists"), "{stderr}");
    let other = root.path().join("other");
    let (ok, _, stderr) = sft(&["init", "--model", "tiny", "--out", other.to_str().unwrap()]);
    assert!(!ok && stderr.contains("--vocab-size"), "{stderr}");
    let (ok, _, stderr) = sft(&["init", "--model", "gpt-5", "--out", other.to_str().unwrap()]);
    assert!(!ok && stderr.contains("gpt-5"), "{stderr}");
}

#[test]
fn train_reports_bad_configs_by_field() {
    let root = tempfile::tempdir().unwrap();
    let file = root.path().join("run.json");
    std::fs::write(&file, r#"{"data": "prepared", "micro_batch": 0}"#).unwrap();
    let (ok, _, stderr) = sft(&["train", "--config", file.to_str().unwrap()]);
    assert!(!ok && stderr.contains("micro_batch must be at least 1"), "{stderr}");
    // A flag fixes it, and the next problem is named: the device.
    let (ok, _, stderr) =
        sft(&["train", "--config", file.to_str().unwrap(), "--micro-batch", "2", "--device", "tpu"]);
    assert!(!ok && stderr.contains("unknown device \"tpu\""), "{stderr}");
    std::fs::write(&file, r#"{"data": "prepared", "learning_rate": 1}"#).unwrap();
    let (ok, _, stderr) = sft(&["train", "--config", file.to_str().unwrap()]);
    assert!(!ok && stderr.contains("learning_rate"), "{stderr}");
}

#[test]
fn optimizer_state_flag_is_parsed_and_checked() {
    let root = tempfile::tempdir().unwrap();
    let file = root.path().join("run.json");
    std::fs::write(&file, r#"{"data": "prepared"}"#).unwrap();
    let cfg = file.to_str().unwrap();
    let (ok, _, stderr) = sft(&["train", "--config", cfg, "--optimizer-state", "fp8"]);
    assert!(!ok && stderr.contains("f32 or bf16"), "{stderr}");
    let (ok, _, stderr) = sft(&["train", "--config", cfg, "--optimizer-state", "bf16", "--eps", "1e-20"]);
    assert!(!ok && stderr.contains("eps") && stderr.contains("optimizer_state bf16"), "{stderr}");
    let (ok, _, stderr) = sft(&["train", "--config", cfg, "--optimizer-state", "bf16", "--lora"]);
    assert!(!ok && stderr.contains("LoRA"), "{stderr}");
}

#[test]
fn train_resume_and_eval_through_the_binary() {
    let root = tempfile::tempdir().unwrap();
    let (data, tok) = prepared_data(root.path(), 48, 96);
    let out = root.path().join("run");
    let config = root.path().join("run.json");
    let cfg = sft::train::TrainConfig {
        max_steps: Some(2),
        schedule_steps: Some(3),
        ..tiny_config(&data, &tok, &out, sft::data::BatchMode::Dynamic)
    };
    std::fs::write(&config, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let (ok, stdout, stderr) = sft(&["train", "--config", config.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("done: 2 steps"), "{stdout}");
    // Without a terminal: plain progress lines, one per log_every (1) steps.
    assert!(stderr.contains("step 1/2") && stderr.contains("step 2/2"), "{stderr}");
    assert!(!root.path().join("run.train-lock").exists(), "the run's lock goes with it");
    // While another process holds the run's lock (here this test's), a second run into the
    // directory is refused, naming the holder, and writes nothing there.
    let lock_path = root.path().join("run.train-lock");
    let held = sft::lock::DirLock::acquire(lock_path.clone(), "another run", "test").unwrap();
    let log_before = std::fs::read_to_string(out.join("log.csv")).unwrap();
    let (ok, _, stderr) =
        sft(&["train", "--config", config.to_str().unwrap(), "--resume", "--max-steps", "3"]);
    let holder = format!("another sft train (process {}) is writing it", std::process::id());
    assert!(!ok && stderr.contains("--out-dir") && stderr.contains(&holder), "{stderr}");
    assert_eq!(std::fs::read_to_string(out.join("log.csv")).unwrap(), log_before);
    assert!(!out.join("step-3").exists());
    drop(held);
    let (ok, stdout, stderr) =
        sft(&["train", "--config", config.to_str().unwrap(), "--resume", "--max-steps", "3"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("done: 3 steps"), "{stdout}");
    let (ok, stdout, stderr) = sft(&[
        "eval",
        "--checkpoint",
        out.join("step-3").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("mean masked loss"), "{stdout}");

    // Training drew the curves beside the log; `sft plot` redraws them anywhere.
    let svg = std::fs::read_to_string(out.join("loss.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("train loss") && svg.contains("tokens/s"), "{svg}");
    let other = root.path().join("curves.svg");
    let (ok, stdout, stderr) =
        sft(&["plot", out.to_str().unwrap(), "--out", other.to_str().unwrap(), "--log-scale"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("(3 steps)") && stdout.contains("last train loss"), "{stdout}");
    assert!(std::fs::read_to_string(&other).unwrap().contains("loss (log)"));
    // A file that is not a training log is a named error.
    let (ok, _, stderr) = sft(&["plot", config.to_str().unwrap()]);
    assert!(!ok && stderr.contains("run.json") && stderr.contains("header"), "{stderr}");
}

/// `--resume` continues the run it finds with that run's settings: given only the out_dir and
/// a later end, it repeats the uninterrupted run bit for bit (before, every setting not given
/// again fell back to its default); given another micro-batch, it goes on at the same place in
/// the data, so that its steps see the uninterrupted run's examples.
#[test]
fn a_resume_given_only_its_out_dir_continues_the_run_as_configured() {
    use sft::train::log::read_train_losses;
    let root = tempfile::tempdir().unwrap();
    let (data, tok) = prepared_data(root.path(), 48, 96);
    let start = |name: &str, max_steps: u64| {
        let cfg = sft::train::TrainConfig {
            max_steps: Some(max_steps),
            schedule_steps: Some(4),
            dropout: Some(0.0),
            seed: 5,
            ..tiny_config(&data, &tok, &root.path().join(name), sft::data::BatchMode::Packed)
        };
        let path = root.path().join(format!("{name}.json"));
        std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
        let (ok, _, stderr) = sft(&["train", "--config", path.to_str().unwrap()]);
        assert!(ok, "{stderr}");
        root.path().join(name)
    };
    let whole = read_train_losses(&start("whole", 4).join("log.csv")).unwrap();
    assert_eq!(whole.len(), 4);

    let out = start("same", 2);
    let (ok, _, stderr) = sft(&["train", "--out-dir", out.to_str().unwrap(), "--resume", "--max-steps", "4"]);
    assert!(ok, "{stderr}");
    assert!(!stderr.contains("warning"), "nothing changed but the end: {stderr}");
    assert_eq!(read_train_losses(&out.join("log.csv")).unwrap(), whole);
    // The same with a config file that sets only the out_dir and the end.
    let out = start("filed", 2);
    let more = root.path().join("more.json");
    std::fs::write(&more, serde_json::json!({"out_dir": out, "max_steps": 4}).to_string()).unwrap();
    let (ok, _, stderr) = sft(&["train", "--config", more.to_str().unwrap(), "--resume"]);
    assert!(ok && !stderr.contains("warning"), "{stderr}");
    assert_eq!(read_train_losses(&out.join("log.csv")).unwrap(), whole);

    // Half the rows a micro-batch, twice the micro-batches a step: the same rows a step.
    let out = start("halved", 2);
    let (ok, _, stderr) = sft(&[
        "train",
        "--out-dir",
        out.to_str().unwrap(),
        "--resume",
        "--max-steps",
        "4",
        "--micro-batch",
        "2",
        "--grad-accum",
        "4",
    ]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("micro_batch Fixed(4) -> Fixed(2), grad_accum 2 -> 4"), "{stderr}");
    assert!(stderr.contains("the same place in the data"), "{stderr}");
    let halved = read_train_losses(&out.join("log.csv")).unwrap();
    assert_eq!(halved[..2], whole[..2]);
    for ((step, a), (s, b)) in halved[2..].iter().zip(&whole[2..]) {
        // Only the order of the gradient sums differs.
        assert!(step == s && (a - b).abs() <= 1e-5 * b.abs(), "step {step}: {a} against {b}");
    }
}

/// Ctrl-C (SIGINT), a scheduler's SIGTERM or a closed terminal's SIGHUP stops `sft train` after
/// the step under way, with a
/// checkpoint of that step and exit status 128 + the signal; `--resume` then repeats the
/// uninterrupted run bit for bit.
#[test]
fn a_signal_stops_the_run_after_its_step_with_a_checkpoint_that_resumes_exactly() {
    use sft::train::log::read_train_losses;
    use std::process::Stdio;
    let root = tempfile::tempdir().unwrap();
    let (data, tok) = prepared_data(root.path(), 48, 96);
    let config = |name: &str, max_steps: u64| {
        let cfg = sft::train::TrainConfig {
            max_steps: Some(max_steps),
            schedule_steps: Some(100_000),
            save_every: 0,
            eval_every: 0,
            ..tiny_config(&data, &tok, &root.path().join(name), sft::data::BatchMode::Packed)
        };
        let path = root.path().join(format!("{name}.json"));
        std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
        path
    };
    for (signal, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT"), (libc::SIGHUP, "SIGHUP")] {
        let out = root.path().join(name);
        // A run far longer than the test: only the signal ends it.
        let child = common::cli::command()
            .args(["train", "--config", config(name, 100_000).to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = out.join("log.csv");
        common::train::wait_for_log_lines(&log, 4);
        // SAFETY: a signal to the child this test started.
        assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, signal) }, 0);
        let done = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&done.stderr);
        assert_eq!(done.status.code(), Some(128 + signal), "{stderr}");
        let at = sft::checkpoint::latest(&out).unwrap().expect("the stop saved a checkpoint");
        let step: u64 = at.file_name().unwrap().to_str().unwrap()["step-".len()..].parse().unwrap();
        assert!(
            stderr.contains(&format!("stopped by {name}")) && stderr.contains(&format!("after step {step}"))
        );
        assert!(stderr.contains("--resume"), "{stderr}");
        let logged = read_train_losses(&log).unwrap();
        assert_eq!(logged.last().map(|l| l.0), Some(step), "the log ends at the saved step");

        // Two more steps on resume: the uninterrupted run's, bit for bit.
        let end = (step + 2).to_string();
        let (ok, _, stderr) =
            sft(&["train", "--out-dir", out.to_str().unwrap(), "--resume", "--max-steps", &end]);
        assert!(ok, "{stderr}");
        let whole = root.path().join(format!("{name}-whole"));
        let (ok, _, stderr) =
            sft(&["train", "--config", config(&format!("{name}-whole"), step + 2).to_str().unwrap()]);
        assert!(ok, "{stderr}");
        assert_eq!(read_train_losses(&log).unwrap(), read_train_losses(&whole.join("log.csv")).unwrap());
    }

    // Started ignoring SIGHUP (`nohup sft train`), the run keeps ignoring it and trains to its end.
    let out = root.path().join("nohup");
    let steps = 40u64;
    let mut nohup = common::cli::command();
    nohup.args(["train", "--config", config("nohup", steps).to_str().unwrap()]);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut nohup, || {
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
            Ok(())
        });
    }
    let child = nohup.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let log = out.join("log.csv");
    common::train::wait_for_log_lines(&log, 4);
    // SAFETY: a signal to the child this test started.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGHUP) }, 0);
    let rows_then = std::fs::read_to_string(&log).unwrap().lines().count() as u64;
    assert!(rows_then <= steps, "the run had ended before the signal: lengthen it");
    let done = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success() && !stderr.contains("stopped by"), "{stderr}");
    assert_eq!(read_train_losses(&log).unwrap().len() as u64, steps, "{stderr}");
}

/// A run whose output nobody reads any more (a `tee` that died, a closed terminal) goes on to its
/// end and its checkpoint: its progress lines are dropped, not a panic.
#[test]
fn a_run_whose_output_reader_is_gone_trains_to_its_end() {
    use std::process::Stdio;
    let root = tempfile::tempdir().unwrap();
    let (data, tok) = prepared_data(root.path(), 48, 96);
    let out = root.path().join("unread");
    let cfg = sft::train::TrainConfig {
        max_steps: Some(3),
        ..tiny_config(&data, &tok, &out, sft::data::BatchMode::Packed)
    };
    let config = root.path().join("run.json");
    std::fs::write(&config, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let mut child = common::cli::command()
        .args(["train", "--config", config.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Both readers gone before the run prints anything.
    drop(child.stdout.take());
    drop(child.stderr.take());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let latest = sft::checkpoint::latest(&out).unwrap().expect("a checkpoint");
    assert!(latest.ends_with("step-3"), "{latest:?}");
}

#[test]
fn bench_times_steps_on_the_cpu() {
    let (ok, stdout, stderr) = sft(&[
        "bench",
        "--config",
        "tiny",
        "--seq-len",
        "32",
        "--tokens-per-step",
        "128",
        "--micro-batch",
        "2",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--device",
        "cpu",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("128 tokens = 2 micro-batches × 2 rows × 32 tokens"), "{stdout}");
    let tps: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("tokens/s"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no tokens/s line: {stdout}"));
    assert!(tps > 0.0, "{stdout}");
    // A step that is not a whole number of micro-batches is refused.
    let (ok, _, stderr) = sft(&[
        "bench",
        "--config",
        "tiny",
        "--seq-len",
        "32",
        "--tokens-per-step",
        "96",
        "--micro-batch",
        "2",
    ]);
    assert!(!ok && stderr.contains("multiple of --micro-batch"), "{stderr}");
    // --dropout overrides the model's and is validated like it.
    let (ok, _, stderr) = sft(&[
        "bench",
        "--config",
        "tiny",
        "--seq-len",
        "32",
        "--tokens-per-step",
        "64",
        "--micro-batch",
        "2",
        "--dropout",
        "1.5",
    ]);
    assert!(!ok && stderr.contains("dropout"), "{stderr}");
}

/// Issue 15.6: `sft train` packs by default; SimpleLLaMA's padding is asked for by name. (That
/// packed rows never let examples attend to each other, and give the padded batches' loss and
/// gradients, is checked in tests/model_batches.rs and tests/data_loader.rs.)
#[test]
fn train_packs_batches_by_default() {
    let root = tempfile::tempdir().unwrap();
    let (data, tok) = prepared_data(root.path(), 48, 96);
    let run = |name: &str, extra: &[&str]| {
        let out = root.path().join(name);
        let mut args = vec!["train", "--data", data.to_str().unwrap(), "--tokenizer", tok.to_str().unwrap()];
        args.extend([
            "--out-dir",
            out.to_str().unwrap(),
            "--model",
            "tiny",
            "--from-scratch",
            "--device",
            "cpu",
        ]);
        args.extend(["--micro-batch", "2", "--grad-accum", "1", "--max-steps", "1", "--max-seq-len", "96"]);
        args.extend(["--eval-every", "0", "--sample-every", "0"]);
        args.extend(extra);
        let (ok, stdout, stderr) = sft(&args);
        assert!(ok, "{stderr}");
        assert!(stdout.contains("done: 1 steps"), "{stdout}");
        let latest = sft::checkpoint::latest(&out).unwrap().unwrap();
        sft::train::TrainerState::load(&latest).unwrap().config.batch_mode
    };
    assert_eq!(run("default", &[]), sft::data::BatchMode::Packed);
    assert_eq!(run("padded", &["--batch-mode", "dynamic"]), sft::data::BatchMode::Dynamic);
}

/// `sft bench --data`: real prepared batches, with useful (non-pad, supervised) tokens/s next to
/// the tokens/s of all positions, in both batch modes.
#[test]
fn bench_on_prepared_data_reports_useful_tokens_per_second() {
    let root = tempfile::tempdir().unwrap();
    let (data, _) = prepared_data(root.path(), 48, 96);
    for mode in ["packed", "dynamic"] {
        let (ok, stdout, stderr) = sft(&[
            "bench",
            "--config",
            "tiny",
            "--data",
            data.to_str().unwrap(),
            "--batch-mode",
            mode,
            "--seq-len",
            "96",
            "--tokens-per-step",
            "384",
            "--micro-batch",
            "2",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--device",
            "cpu",
        ]);
        assert!(ok, "{mode}: {stderr}");
        let field = |name: &str| -> (f64, Option<f64>) {
            let line = stdout
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("{mode}: no `{name}` line: {stdout}"));
            let mut words = line.split_whitespace();
            let value = words.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{line}"));
            let share =
                line.split(": ").nth(1).and_then(|r| r.split('%').next()).and_then(|p| p.parse().ok());
            (value, share)
        };
        let (padded, _) = field("padded tokens/s");
        let (useful, real_share) = field("useful tokens/s");
        let (supervised, supervised_share) = field("supervised/s");
        let (real_share, supervised_share) = (real_share.unwrap(), supervised_share.unwrap());
        assert!(padded > 0.0 && useful > 0.0 && supervised > 0.0, "{stdout}");
        assert!(useful <= padded * 1.0001 && supervised <= useful * 1.0001, "{stdout}");
        assert!(real_share > 0.0 && real_share <= 100.0 && supervised_share <= real_share, "{stdout}");
        assert!(
            stdout.contains(&format!("({} batches;", if mode == "packed" { "Packed" } else { "Dynamic" })),
            "{stdout}"
        );
        assert!(stdout.contains("useful MFU"), "{stdout}");
    }
    // A directory that is not prepared data is a named error.
    let (ok, _, stderr) =
        sft(&["bench", "--config", "tiny", "--data", root.path().to_str().unwrap(), "--device", "cpu"]);
    assert!(!ok && stderr.contains("--data") && stderr.contains("sft prepare"), "{stderr}");
    let empty = root.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (ok, _, stderr) =
        sft(&["bench", "--config", "tiny", "--data", empty.to_str().unwrap(), "--device", "cpu"]);
    assert!(!ok && stderr.contains("--data") && stderr.contains("tokenizer.json"), "{stderr}");
}
