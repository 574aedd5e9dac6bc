//! LoRA runs end to end on the CPU: checkpoints hold only the adapters, in PEFT's layout; a
//! resumed LoRA run repeats an uninterrupted one bit for bit; `--adapter` gives the merged
//! model's logits; bad adapters are refused naming the file and the field.

mod common;

use common::cli::{run_fails, run_ok, s};
use common::train::{prepared_data, tiny_config};
use sft::backend::cpu::CpuBackend;
use sft::checkpoint::peft::{ADAPTER_CONFIG_FILE, ADAPTER_FILE, ADAPTER_OPTIMIZER_FILE};
use sft::data::BatchMode;
use sft::model::lora::{LoraConfig, LoraTarget};
use sft::model::params::NamedTensor;
use sft::train::{train_on, TrainConfig, TrainReport};
use std::path::{Path, PathBuf};

/// Prepared data, its tokenizer, and a tiny base checkpoint (`sft init`).
fn setup(root: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (data, tok) = prepared_data(root, 48, 96);
    let base = root.join("base");
    run_ok(&["init", "--model", "tiny", "--tokenizer", s(&tok), "--out", s(&base), "--seed", "3"]);
    (data, tok, base)
}

fn lora_config(data: &Path, tok: &Path, base: &Path, out: &Path, targets: &[LoraTarget]) -> TrainConfig {
    TrainConfig {
        init_from: Some(base.to_path_buf()),
        from_scratch: false,
        max_lr: 1e-2,
        lora: Some(LoraConfig::new(4, 8.0, 0.1, targets.to_vec())),
        ..tiny_config(data, tok, out, BatchMode::Dynamic)
    }
}

fn run(cfg: &TrainConfig) -> (TrainReport, Vec<NamedTensor>, Vec<NamedTensor>) {
    let (model, report) = train_on(CpuBackend::<f32>::new(), cfg).unwrap();
    (report, model.read_adapters().unwrap(), model.read_params().unwrap())
}

fn bits_equal(a: &[NamedTensor], b: &[NamedTensor]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.name == y.name && x.data.iter().zip(&y.data).all(|(p, q)| p.to_bits() == q.to_bits())
        })
}

#[test]
fn resumed_lora_run_repeats_the_uninterrupted_one_and_saves_only_peft_adapters() {
    const N: u64 = 3;
    let root = tempfile::tempdir().unwrap();
    let (data, tok, base) = setup(root.path());
    let targets = [LoraTarget::Q, LoraTarget::V, LoraTarget::Down];
    let cfg = |name: &str| lora_config(&data, &tok, &base, &root.path().join(name), &targets);

    let whole = TrainConfig { max_steps: Some(2 * N), ..cfg("whole") };
    let (whole_report, whole_adapters, whole_base) = run(&whole);
    assert!(whole_report.steps_per_epoch < 2 * N, "the resumed half should cross an epoch end");
    let first = TrainConfig { max_steps: Some(N), ..cfg("cut") };
    let (first_report, _, _) = run(&first);
    let second = TrainConfig { max_steps: Some(2 * N), resume: true, init_from: None, ..first.clone() };
    let (second_report, resumed_adapters, _) = run(&second);

    let mut joined = first_report.step_losses.clone();
    joined.extend(second_report.step_losses.iter().copied());
    assert_eq!(joined, whole_report.step_losses, "per-step losses differ after resume");
    assert!(bits_equal(&resumed_adapters, &whole_adapters), "the adapters differ after resume");
    let losses: Vec<f64> = whole_report.step_losses.iter().map(|&(_, l)| l).collect();
    assert!(losses.last() < losses.first(), "the adapters did not learn: {losses:?}");

    // The base never moved.
    let base_params = sft::checkpoint::Checkpoint::open(&base).unwrap().read_params().unwrap();
    assert!(bits_equal(&whole_base, &base_params), "the frozen base changed");

    // The checkpoint: the PEFT adapter, its moments, the state; no model weights.
    let step = whole_report.checkpoint.unwrap();
    for file in
        [ADAPTER_FILE, ADAPTER_CONFIG_FILE, ADAPTER_OPTIMIZER_FILE, "trainer_state.json", "tokenizer.json"]
    {
        assert!(step.join(file).is_file(), "{file} missing in {}", step.display());
    }
    assert!(!step.join("model.safetensors").exists());
    let shapes = sft::checkpoint::tensor_shapes(&step.join(ADAPTER_FILE)).unwrap();
    // tiny: d 64, 4 heads of 16, 2 kv heads, hidden 176, 2 layers.
    assert_eq!(shapes.len(), 2 * 3 * 2);
    assert_eq!(shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"], vec![4, 64]);
    assert_eq!(shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"], vec![64, 4]);
    assert_eq!(shapes["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"], vec![32, 4]);
    assert_eq!(shapes["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"], vec![4, 176]);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(step.join(ADAPTER_CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["task_type"], "CAUSAL_LM");
    assert_eq!(config["r"], 4);
    assert_eq!(config["lora_alpha"], 8.0);
    assert_eq!(config["bias"], "none");
    assert_eq!(config["target_modules"], serde_json::json!(["q_proj", "v_proj", "down_proj"]));
    assert!((config["lora_dropout"].as_f64().unwrap() - 0.1).abs() < 1e-6);
    let named_base = PathBuf::from(config["base_model_name_or_path"].as_str().unwrap());
    assert_eq!(named_base, std::fs::canonicalize(&base).unwrap());
}

#[test]
fn logits_with_the_adapter_equal_the_merged_models_and_bad_adapters_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let (data, tok, base) = setup(root.path());
    let out = root.path().join("run");
    run_ok(&[
        "train",
        "--data",
        s(&data),
        "--tokenizer",
        s(&tok),
        "--init-from",
        s(&base),
        "--out-dir",
        s(&out),
        "--lora",
        "--lora-rank",
        "4",
        "--lora-alpha",
        "16",
        "--lora-targets",
        "q,k,v,o,gate,up,down",
        "--max-steps",
        "3",
        "--micro-batch",
        "4",
        "--grad-accum",
        "1",
        "--max-lr",
        "1e-2",
        "--warmup-steps",
        "1",
        "--max-seq-len",
        "96",
        "--sample-every",
        "0",
        "--device",
        "cpu",
    ]);
    let adapter = out.join("step-3");
    let merged = root.path().join("merged");
    run_ok(&["merge", "--base", s(&base), "--adapter", s(&adapter), "--out", s(&merged)]);
    let ids = "1,5,9,3,7,11,20,4";
    let logits = |args: &[&str]| -> Vec<Vec<f32>> {
        let out = run_ok(&[&["logits", "--ids", ids, "--device", "cpu"], args].concat());
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        serde_json::from_value(v["logits"].clone()).unwrap()
    };
    let with_adapter = logits(&["--checkpoint", s(&base), "--adapter", s(&adapter)]);
    let of_merged = logits(&["--checkpoint", s(&merged)]);
    let of_base = logits(&["--checkpoint", s(&base)]);
    let diff = |a: &[Vec<f32>], b: &[Vec<f32>]| {
        a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
    };
    assert!(diff(&with_adapter, &of_merged) < 1e-4, "adapter vs merged: {}", diff(&with_adapter, &of_merged));
    assert!(diff(&with_adapter, &of_base) > 1e-3, "the trained adapter changes nothing");

    // A LoRA checkpoint is not a model.
    let err = run_fails(&["logits", "--checkpoint", s(&adapter), "--ids", ids, "--device", "cpu"]);
    assert!(err.contains("holds a LoRA adapter") && err.contains("--adapter"), "{err}");

    // Tampered copies of the adapter.
    let tampered = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| -> PathBuf {
        let dir = root.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::copy(adapter.join(ADAPTER_FILE), dir.join(ADAPTER_FILE)).unwrap();
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(adapter.join(ADAPTER_CONFIG_FILE)).unwrap())
                .unwrap();
        edit(&mut config);
        std::fs::write(dir.join(ADAPTER_CONFIG_FILE), config.to_string()).unwrap();
        dir
    };
    let refused =
        |dir: &Path| run_fails(&["logits", "--checkpoint", s(&base), "--adapter", s(dir), "--ids", ids]);
    let dir = tampered("no-r", &|c| {
        c.as_object_mut().unwrap().remove("r");
    });
    let err = refused(&dir);
    assert!(err.contains(ADAPTER_CONFIG_FILE) && err.contains("field \"r\" is missing"), "{err}");
    let dir = tampered("no-targets", &|c| {
        c.as_object_mut().unwrap().remove("target_modules");
    });
    let err = refused(&dir);
    assert!(err.contains("field \"target_modules\" is missing"), "{err}");
    let dir = tampered("bad-target", &|c| c["target_modules"] = serde_json::json!(["q_proj", "x_proj"]));
    let err = refused(&dir);
    assert!(err.contains("target_modules") && err.contains("unknown LoRA target \"x_proj\""), "{err}");
    let dir = tampered("rank-0", &|c| c["r"] = serde_json::json!(0));
    let err = refused(&dir);
    assert!(err.contains("field \"r\" must be at least 1"), "{err}");
    let dir = tampered("rank-8", &|c| c["r"] = serde_json::json!(8));
    let err = refused(&dir);
    assert!(
        err.contains(ADAPTER_FILE) && err.contains("lora_A.weight has shape [4, 64], expected [8, 64]"),
        "{err}"
    );
    let dir = tampered("rank-huge", &|c| c["r"] = serde_json::json!(1000));
    let err = refused(&dir);
    assert!(err.contains(ADAPTER_CONFIG_FILE) && err.contains("lora.rank 1000 exceeds"), "{err}");
    let dir = tampered("fewer-targets", &|c| c["target_modules"] = serde_json::json!(["q_proj"]));
    let err = refused(&dir);
    assert!(err.contains(ADAPTER_FILE) && err.contains("unexpected tensor"), "{err}");
    // An absurd alpha scaled the updates past anything a weight holds, silently.
    let dir = tampered("alpha-huge", &|c| c["lora_alpha"] = serde_json::json!(1e38));
    let err = refused(&dir);
    assert!(err.contains(ADAPTER_CONFIG_FILE) && err.contains("lora.alpha must be in (0, 1e6]"), "{err}");

    // A base of the same shape but other weights than the adapter was trained on: merged and
    // applied, with a warning naming the recorded base.
    let reseeded = root.path().join("reseeded-base");
    run_ok(&["init", "--model", "tiny", "--tokenizer", s(&tok), "--out", s(&reseeded), "--seed", "5"]);
    let merged_other = root.path().join("merged-other");
    let (ok, _, stderr) = common::cli::run(&[
        "merge",
        "--base",
        s(&reseeded),
        "--adapter",
        s(&adapter),
        "--out",
        s(&merged_other),
    ]);
    assert!(
        ok && stderr.contains("says the adapter was trained on") && stderr.contains("reseeded-base"),
        "{stderr}"
    );
    let (ok, _, stderr) = common::cli::run(&[
        "merge",
        "--base",
        s(&base),
        "--adapter",
        s(&adapter),
        "--out",
        s(&root.path().join("merged-again")),
    ]);
    assert!(ok && !stderr.contains("warning"), "{stderr}");

    // A base of another shape.
    let other = root.path().join("other-base");
    let cfg_path = root.path().join("wide.json");
    let vocab = sft::data::ChatTokenizer::from_file(&tok).unwrap().vocab_size();
    let wide = sft::model::ModelConfig { d_model: 96, ..sft::model::ModelConfig::tiny(vocab) };
    std::fs::write(&cfg_path, serde_json::to_string(&wide).unwrap()).unwrap();
    run_ok(&["init", "--model", s(&cfg_path), "--tokenizer", s(&tok), "--out", s(&other)]);
    let err = run_fails(&[
        "merge",
        "--base",
        s(&other),
        "--adapter",
        s(&adapter),
        "--out",
        s(&root.path().join("m2")),
    ]);
    assert!(err.contains(ADAPTER_FILE) && err.contains("has shape") && err.contains("expected"), "{err}");

    // Training flags.
    let err =
        run_fails(&["train", "--data", s(&data), "--lora-rank", "4", "--from-scratch", "--model", "tiny"]);
    assert!(err.contains("need --lora"), "{err}");
    let err =
        run_fails(&["train", "--data", s(&data), "--lora", "--lora-targets", "q,w", "--init-from", s(&base)]);
    assert!(err.contains("unknown LoRA target \"w\""), "{err}");
    let train_with = |extra: &[&str]| {
        let out = root.path().join(format!("r{}", extra.join("_")));
        let args =
            [
                &[
                    "train",
                    "--data",
                    s(&data),
                    "--tokenizer",
                    s(&tok),
                    "--out-dir",
                    s(&out),
                    "--device",
                    "cpu",
                ][..],
                &["--micro-batch", "4", "--grad-accum", "1"][..],
                extra,
            ]
            .concat();
        run_fails(&args)
    };
    let err = train_with(&["--lora", "--lora-rank", "0", "--init-from", s(&base)]);
    assert!(err.contains("lora.rank must be at least 1"), "{err}");
    let err = train_with(&["--lora", "--lora-rank", "33", "--lora-targets", "v", "--init-from", s(&base)]);
    assert!(err.contains("lora.rank 33 exceeds the v projection"), "{err}");
    let err = train_with(&["--lora", "--from-scratch", "--model", "tiny"]);
    assert!(err.contains("--lora trains adapters") && err.contains("--init-from"), "{err}");
}
