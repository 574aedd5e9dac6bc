//! The optimizer step: its gradient is that of the mean over all supervised targets of the
//! step, however they are split into micro-batches; the log and report agree with the step.

mod common;

use common::train::{prepared_data, tiny_config};
use sft::backend::cpu::CpuBackend;
use sft::data::BatchMode;
use sft::train::{train_on, TrainConfig};

#[test]
fn splitting_a_step_into_micro_batches_does_not_change_it() {
    let root = tempfile::tempdir().unwrap();
    let (data, tok) = prepared_data(root.path(), 48, 96);
    // One step over the same 8 examples: 1 × 8, 2 × 4 and 4 × 2 (no dropout). The micro-batches
    // hold different numbers of supervised targets, so a mean of per-micro-batch means would differ.
    let run = |name: &str, micro_batch: usize, grad_accum: usize| {
        let cfg = TrainConfig {
            micro_batch: micro_batch.into(),
            grad_accum,
            max_steps: Some(1),
            dropout: Some(0.0),
            eval_every: 0,
            ..tiny_config(&data, &tok, &root.path().join(name), BatchMode::Dynamic)
        };
        let (_, report) = train_on(CpuBackend::<f32>::new(), &cfg).unwrap();
        // AdamW's first update hardly depends on the gradient's scale: compare the gradient norm.
        let log = std::fs::read_to_string(cfg.out_dir.join("log.csv")).unwrap();
        let grad_norm: f64 = log.lines().nth(1).unwrap().split(',').nth(7).unwrap().parse().unwrap();
        (report.step_losses[0].1, grad_norm)
    };
    let (loss_1, norm_1) = run("a", 8, 1);
    for (name, mb, ga) in [("b", 4, 2), ("c", 2, 4)] {
        let (loss, norm) = run(name, mb, ga);
        assert!((loss - loss_1).abs() < 1e-5 * loss_1, "{mb}×{ga}: loss {loss} vs {loss_1}");
        assert!((norm - norm_1).abs() < 2e-5 * norm_1, "{mb}×{ga}: gradient norm {norm} vs {norm_1}");
    }
}

#[test]
fn unusable_devices_are_refused_clearly() {
    // Without a GPU (CI), `cuda` says why it cannot open one; with one, the run gets as far as
    // the (missing) data.
    let cfg =
        TrainConfig { data: "d".into(), device: "cuda".into(), from_scratch: true, ..TrainConfig::default() };
    let err = format!("{:#}", sft::train::cli::train_on_device(&cfg).unwrap_err());
    assert!(err.contains("CUDA") || err.contains("d/tokenizer.json"), "{err}");
    let cfg = TrainConfig { device: "tpu".into(), ..cfg };
    let err = sft::train::cli::train_on_device(&cfg).unwrap_err().to_string();
    assert!(err.contains("unknown device \"tpu\""), "{err}");
}
