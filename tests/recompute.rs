//! Activation recompute changes what a step keeps, never what it computes: on the CPU backend
//! the losses, every gradient and the updated weights with `mlp` and `layer` equal those with
//! `none` bit for bit (padded and packed batches, dropout, LoRA with its dropout, gradient
//! accumulation over micro-batches), and a model built with recompute allocates less.

mod common;

use common::model::*;
use sft::backend::StateDtype;
use sft::backend::{AdamW, Backend, RopeStyle};
use sft::data::batch::Batch;
use sft::model::forward::memory_bytes_with;
use sft::model::lora::{self, LoraConfig};
use sft::model::{Model, ModelConfig, NamedTensor, Recompute};
use sft::rng::Rng;

/// Weights far from the init, so that every nonlinearity matters.
fn random_params(config: &ModelConfig, seed: u64) -> Vec<NamedTensor> {
    let mut rng = Rng::new(seed);
    let mut params = sft::model::params::init_params(config, seed);
    for t in &mut params {
        let is_norm = t.shape.len() == 1;
        for x in &mut t.data {
            *x = if is_norm { 1.0 + 0.2 * rng.normal() } else { 0.3 * rng.normal() } as f32;
        }
    }
    params
}

/// Everything a step produced that recompute could have changed.
#[derive(Debug, PartialEq)]
struct StepResult {
    losses: Vec<f64>,
    grads: Vec<NamedTensor>,
    loss_sum: f64,
    grad_norm: f64,
    weights: Vec<NamedTensor>,
}

/// Two optimizer steps of `batches` (accumulated) with `recompute`, from the same weights.
fn train<B: Backend>(
    backend: B,
    config: &ModelConfig,
    lora: Option<&LoraConfig>,
    batches: &[Batch],
    seed: Option<u64>,
    recompute: Recompute,
) -> StepResult {
    let tokens = batches.iter().map(Batch::n_tokens).max().unwrap();
    let mut model = Model::with_recompute(backend, config.clone(), tokens, lora, recompute).unwrap();
    model.write_params(&random_params(config, 3)).unwrap();
    if let Some(l) = lora {
        let mut rng = Rng::new(4);
        let mut adapters = lora::init_adapters(l, config, 4);
        for t in &mut adapters {
            t.data.iter_mut().for_each(|x| *x = 0.3 * rng.normal() as f32);
        }
        model.write_adapters(&adapters).unwrap();
    }
    let hp =
        AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.01, step: 1, grad_scale: 1.0 };
    let mut losses = vec![];
    let mut last = None;
    for step in 1..=2u64 {
        model.zero_grads().unwrap();
        for (i, b) in batches.iter().enumerate() {
            let seed = seed.map(|s| s + 10 * step + i as u64);
            losses.push(model.forward_backward(b, 0.125, seed).unwrap());
        }
        let grads = if lora.is_some() { model.read_adapter_grads() } else { model.read_grads() }.unwrap();
        let stats = model.clip_and_update(&AdamW { step, ..hp }, 1.0).unwrap();
        last = Some((grads, stats));
    }
    let (grads, stats) = last.unwrap();
    losses.push(model.loss(&batches[0]).unwrap());
    let weights = if lora.is_some() { model.read_adapters() } else { model.read_params() }.unwrap();
    StepResult { losses, grads, loss_sum: stats.loss_sum, grad_norm: stats.grad_norm, weights }
}

fn cases() -> Vec<(ModelConfig, Option<LoraConfig>, Option<u64>)> {
    let targets = |list: &str| LoraConfig::parse_targets(list).unwrap();
    vec![
        (tiny_config(2, RopeStyle::AdjacentPairs, false, 0.0), None, None),
        (tiny_config(4, RopeStyle::HalfSplit, true, 0.25), None, Some(17)),
        (tiny_config(2, RopeStyle::HalfSplit, false, 0.25), None, None),
        (
            tiny_config(2, RopeStyle::AdjacentPairs, false, 0.2),
            Some(LoraConfig::new(2, 4.0, 0.3, targets("q,k,v,o,gate,up,down"))),
            Some(29),
        ),
        (
            tiny_config(4, RopeStyle::HalfSplit, true, 0.0),
            Some(LoraConfig::new(3, 5.0, 0.0, targets("v,gate"))),
            None,
        ),
    ]
}

fn check_bit_identical<B: Backend>(backend: impl Fn() -> B, what: &str) {
    let padded = vec![padded_batch(&examples(1, &[7, 4, 6]), 1), padded_batch(&examples(5, &[3, 8]), 0)];
    let packed = vec![packed_batch(&examples(2, &[5, 4, 6, 3]), 9), packed_batch(&examples(6, &[7, 2]), 9)];
    for (config, lora, seed) in cases() {
        for batches in [&padded, &packed] {
            let none = train(backend(), &config, lora.as_ref(), batches, seed, Recompute::None);
            assert!(none.losses.iter().all(|l| l.is_finite() && *l > 0.0));
            assert!(none.grads.iter().any(|g| g.data.iter().any(|&x| x != 0.0)));
            for recompute in [Recompute::Mlp, Recompute::Layer] {
                let other = train(backend(), &config, lora.as_ref(), batches, seed, recompute);
                assert!(
                    other == none,
                    "{what}: recompute {recompute} differs from none (config {config:?}, lora {lora:?}, \
                     dropout seed {seed:?}): losses {:?} vs {:?}",
                    other.losses,
                    none.losses
                );
            }
        }
    }
}

#[test]
fn recompute_gives_the_same_losses_gradients_and_updates_bit_for_bit_in_f32() {
    check_bit_identical(f32_backend, "f32");
}

#[test]
fn recompute_gives_the_same_losses_gradients_and_updates_bit_for_bit_in_f64() {
    check_bit_identical(f64_backend, "f64");
}

#[test]
fn generation_reads_the_same_logits_with_recompute() {
    let config = tiny_config(2, RopeStyle::AdjacentPairs, false, 0.1);
    let logits = |recompute| {
        let mut model = Model::with_recompute(f32_backend(), config.clone(), 8, None, recompute).unwrap();
        model.write_params(&random_params(&config, 5)).unwrap();
        let mut cache = model.new_cache(16).unwrap();
        let first = model.next_logits(&mut cache, &[3, 4, 5, 6, 7, 8, 9, 10, 11, 12]).unwrap();
        (first, model.next_logits(&mut cache, &[13]).unwrap())
    };
    let none = logits(Recompute::None);
    for r in [Recompute::Mlp, Recompute::Layer] {
        assert_eq!(logits(r), none, "recompute {r}");
    }
}

#[test]
fn recompute_keeps_less_per_token() {
    let config = ModelConfig::simplellama_1_3b();
    let per_token = |r| memory_bytes_with(&config, 2, true, None, r, StateDtype::F32).1;
    let (none, mlp, layer) =
        (per_token(Recompute::None), per_token(Recompute::Mlp), per_token(Recompute::Layer));
    // mlp drops the gate/up and SwiGLU rows of all layers but one (3 · 5632 bf16 each).
    assert_eq!(none - mlp, (config.n_layers - 1) * 2 * 3 * config.ffn_hidden);
    // layer keeps the residual stream (25 rows of d) and one layer's scratch: a quarter of mlp's.
    assert!(layer * 3 < mlp, "layer {layer} vs mlp {mlp} bytes per token");
    println!("bytes per token: none {none}, mlp {mlp}, layer {layer}");
    let fixed = |r| memory_bytes_with(&config, 2, true, None, r, StateDtype::F32).0;
    assert_eq!(fixed(Recompute::None), fixed(Recompute::Layer), "recompute changes activations only");
}

#[test]
fn out_of_memory_advice_names_the_recompute_that_would_fit() {
    use sft::model::forward::{least_recompute_that_fits, memory_advice_with};
    let config = ModelConfig::simplellama_1_3b();
    let (fixed, layer) = memory_bytes_with(&config, 2, true, None, Recompute::Layer, StateDtype::F32);
    // Room for 4 rows of 2048 with layer recompute, under the trainer's nine-tenths rule.
    let free = (fixed + 4 * 2048 * layer) / 9 * 10 + 4096;
    let msg = memory_advice_with("cuda:0", &config, 2, 4, 2048, free, None, Recompute::None, StateDtype::F32)
        .unwrap();
    assert!(msg.contains("recompute layer (--recompute layer) would fit micro_batch 4"), "{msg}");
    assert_eq!(
        memory_advice_with("cuda:0", &config, 2, 4, 2048, free, None, Recompute::Layer, StateDtype::F32),
        None
    );
    assert_eq!(
        least_recompute_that_fits(&config, 2, 2048, free, None, 4, StateDtype::F32),
        Some((Recompute::Layer, 4))
    );
    assert_eq!(least_recompute_that_fits(&config, 2, 2048, free, None, 5, StateDtype::F32), None);
}

/// The log's columns up to the grad norm (time and tokens/s differ from run to run).
fn losses_and_norms(log: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap();
    text.lines().skip(1).map(|l| l.split(',').take(8).collect::<Vec<_>>().join(",")).collect()
}

#[test]
fn sft_train_with_recompute_logs_the_same_run_and_resume_keeps_the_mode() {
    use common::cli::run as sft;
    let root = tempfile::tempdir().unwrap();
    let (data, tok) = common::train::prepared_data(root.path(), 48, 96);
    let train = |name: &str, extra: &[&str]| {
        let out = root.path().join(name);
        let cfg = sft::train::TrainConfig {
            max_steps: Some(2),
            schedule_steps: Some(3),
            ..common::train::tiny_config(&data, &tok, &out, sft::data::BatchMode::Packed)
        };
        let config = root.path().join(format!("{name}.json"));
        std::fs::write(&config, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
        let mut args = vec!["train", "--config", config.to_str().unwrap()];
        args.extend_from_slice(extra);
        let (ok, _, stderr) = sft(&args);
        assert!(ok, "{stderr}");
        (out, config, stderr)
    };
    let (plain, _, _) = train("none", &[]);
    let (layer, config, _) = train("layer", &["--recompute", "layer"]);
    let log = losses_and_norms(&layer.join("log.csv"));
    assert_eq!(log.len(), 2);
    assert_eq!(log, losses_and_norms(&plain.join("log.csv")), "dropout 0.1: the same losses and norms");
    let state = |out: &std::path::Path| {
        let latest = std::fs::read_to_string(out.join("latest")).unwrap();
        let text = std::fs::read_to_string(out.join(latest.trim()).join("trainer_state.json")).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        json["config"]["recompute"].clone()
    };
    assert_eq!(state(&layer), "layer");
    assert!(state(&plain).is_null(), "never set: left unset (none)");

    // Resumed without the flag: the interrupted run's mode, silently.
    let config = config.to_str().unwrap();
    let (ok, _, stderr) = sft(&["train", "--config", config, "--resume", "--max-steps", "3"]);
    assert!(ok, "{stderr}");
    assert!(!stderr.contains("recompute"), "{stderr}");
    assert_eq!(state(&layer), "layer");
    // With another mode: said, not refused.
    let (ok, _, stderr) =
        sft(&["train", "--config", config, "--resume", "--max-steps", "4", "--recompute", "mlp"]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("recompute mlp, where the interrupted run used layer"), "{stderr}");
    assert_eq!(state(&layer), "mlp");
}

#[test]
fn sft_bench_and_plan_take_the_recompute() {
    use common::cli::run as sft;
    let bench =
        ["bench", "--config", "tiny", "--seq-len", "32", "--tokens-per-step", "64", "--micro-batch", "2"];
    let (ok, stdout, stderr) =
        sft(&[&bench[..], &["--steps", "1", "--warmup", "0", "--device", "cpu", "--recompute", "layer"]]
            .concat());
    assert!(ok, "{stderr}");
    assert!(stdout.contains("recompute       layer"), "{stdout}");
    let (ok, _, stderr) = sft(&[&bench[..], &["--recompute", "auto"]].concat());
    assert!(!ok && stderr.contains("none, mlp or layer"), "{stderr}");

    let plan =
        ["plan", "--model", "simplellama-1.3b", "--gpu", "h100", "--micro-batch", "8", "--seq-len", "2048"];
    let (ok, stdout, stderr) = sft(&[&plan[..], &["--recompute", "layer"]].concat());
    assert!(ok, "{stderr}");
    assert!(stdout.contains("recompute    layer\n"), "{stdout}");
    assert!(
        stdout.contains("231852 bytes/token of activations, micro-batches up to 113 rows (planned)"),
        "{stdout}"
    );
    // 32 rows of 2048 need recompute on an 80 GB H100: auto picks the least that fits.
    let (ok, stdout, stderr) = sft(&["plan", "--gpu", "h100", "--micro-batch", "32", "--recompute", "auto"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("recompute    layer (chosen by auto)"), "{stdout}");
    assert!(stdout.contains("recompute auto chose layer"), "{stdout}");
    let (ok, stdout, stderr) = sft(&["plan", "--gpu", "h100", "--micro-batch", "20", "--recompute", "auto"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("recompute    mlp (chosen by auto)"), "{stdout}");
}
