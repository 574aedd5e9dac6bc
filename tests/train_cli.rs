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
fn train_resume_and_eval_through_the_binary() {
    let root = tempfile::tempdir().unwrap();
    let (data, tok) = prepared_data(root.path(), 48, 96);
    let out = root.path().join("run");
    let config = root.path().join("run.json");
    let cfg = sft::train::TrainConfig {
        max_steps: Some(2),
        ..tiny_config(&data, &tok, &out, sft::data::BatchMode::Dynamic)
    };
    std::fs::write(&config, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let (ok, stdout, stderr) = sft(&["train", "--config", config.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("done: 2 steps"), "{stdout}");
    // Without a terminal: plain progress lines, one per log_every (1) steps.
    assert!(stderr.contains("step 1/2") && stderr.contains("step 2/2"), "{stderr}");
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
