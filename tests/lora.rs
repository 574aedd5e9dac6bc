//! LoRA on the CPU backend: every adapter tensor's gradient against central finite differences
//! in f64 for several target sets, with and without LoRA dropout; the base stays frozen and
//! holds no optimizer state; merged weights give the adapted model's logits.

mod common;

use common::model::*;
use sft::backend::{AdamW, RopeStyle};
use sft::data::batch::Batch;
use sft::model::lora::{self, LoraConfig, LoraTarget};
use sft::model::{Model, ModelConfig, NamedTensor, Recompute};
use sft::rng::Rng;

const PER_TENSOR: usize = 4;
/// As in tests/gradcheck.rs: exact f32 steps, Richardson-extrapolated central differences.
const STEP: f64 = 1.0 / 1024.0;
const GRID: f64 = 1.0 / 65536.0;
const BOUND: f64 = 1e-6;
const FLOOR: f64 = 1e-5;

fn on_grid(value: f64) -> f32 {
    ((value / GRID).round() * GRID) as f32
}

/// Base weights and adapters large enough that every path matters (B is not zero).
fn random_model(
    config: &ModelConfig,
    lora: &LoraConfig,
    tokens: usize,
    seed: u64,
) -> (Model<F64>, Vec<NamedTensor>) {
    random_model_with(config, lora, tokens, seed, Recompute::None)
}

/// [`random_model`] keeping the activations that `recompute` says.
fn random_model_with(
    config: &ModelConfig,
    lora: &LoraConfig,
    tokens: usize,
    seed: u64,
    recompute: Recompute,
) -> (Model<F64>, Vec<NamedTensor>) {
    let mut model =
        Model::with_recompute(f64_backend(), config.clone(), tokens, Some(lora), recompute).unwrap();
    let mut rng = Rng::new(seed);
    let mut base = sft::model::params::init_params(config, seed);
    for t in &mut base {
        let is_norm = t.shape.len() == 1;
        for x in &mut t.data {
            *x = on_grid(if is_norm { 1.0 + 0.2 * rng.normal() } else { 0.3 * rng.normal() });
        }
    }
    model.write_params(&base).unwrap();
    let mut adapters = lora::init_adapters(lora, config, seed);
    for t in &mut adapters {
        for x in &mut t.data {
            *x = on_grid(0.3 * rng.normal());
        }
    }
    model.write_adapters(&adapters).unwrap();
    (model, adapters)
}

fn gradcheck(config: &ModelConfig, lora: &LoraConfig, batch: &Batch, seed: Option<u64>) -> f64 {
    gradcheck_with(config, lora, batch, seed, Recompute::None)
}

fn gradcheck_with(
    config: &ModelConfig,
    lora: &LoraConfig,
    batch: &Batch,
    seed: Option<u64>,
    recompute: Recompute,
) -> f64 {
    let (mut model, adapters) = random_model_with(config, lora, batch.n_tokens(), 7, recompute);
    model.zero_grads().unwrap();
    let loss = model.forward_backward(batch, 1.0, seed).unwrap();
    assert!(loss.is_finite() && loss > 0.0);
    if seed.is_none() || lora.dropout == 0.0 {
        let plain = model.loss(batch).unwrap();
        assert!((plain - loss).abs() <= 1e-12 * loss, "loss() {plain} vs forward_backward {loss}");
    }
    let grads = model.read_adapter_grads().unwrap();
    assert_eq!(grads.len(), 2 * lora.targets.len() * config.n_layers);
    let mut rng = Rng::new(5);
    let mut worst = 0f64;
    for (ti, (t, g)) in adapters.iter().zip(&grads).enumerate() {
        assert_eq!(t.name, g.name);
        assert!(g.data.iter().any(|&x| x != 0.0), "{}: an all-zero gradient", g.name);
        for _ in 0..PER_TENSOR {
            let i = rng.below(t.data.len());
            let x = t.data[i] as f64;
            let mut p = adapters.clone();
            let mut central = |h: f64| {
                p[ti].data[i] = (x + h) as f32;
                model.write_adapters(&p).unwrap();
                let lp = model.forward_backward(batch, 1.0, seed).unwrap();
                p[ti].data[i] = (x - h) as f32;
                model.write_adapters(&p).unwrap();
                let lm = model.forward_backward(batch, 1.0, seed).unwrap();
                (lp - lm) / (2.0 * h)
            };
            let numeric = (4.0 * central(STEP / 2.0) - central(STEP)) / 3.0;
            let analytic = g.data[i] as f64;
            let err = (analytic - numeric).abs() / analytic.abs().max(numeric.abs()).max(FLOOR);
            assert!(
                err <= BOUND,
                "{} [{i}]: analytic {analytic:e} numeric {numeric:e} rel err {err:e} (targets {:?}, recompute \
                 {recompute})",
                t.name,
                lora.targets
            );
            worst = worst.max(err);
        }
    }
    worst
}

fn targets(list: &str) -> Vec<LoraTarget> {
    LoraConfig::parse_targets(list).unwrap()
}

#[test]
fn adapter_gradients_match_finite_differences_for_several_target_sets() {
    let padded = padded_batch(&examples(1, &[7, 4, 6]), 1);
    let packed = packed_batch(&examples(2, &[5, 4, 6, 3]), 9);
    let mut worst = 0f64;
    for (config, list) in [
        (tiny_config(2, RopeStyle::AdjacentPairs, false, 0.0), "q,v"),
        (tiny_config(4, RopeStyle::HalfSplit, true, 0.0), "k,o"),
        (tiny_config(2, RopeStyle::HalfSplit, false, 0.0), "gate,up,down"),
        (tiny_config(2, RopeStyle::AdjacentPairs, true, 0.0), "q,k,v,o,gate,up,down"),
    ] {
        let lora = LoraConfig::new(3, 5.0, 0.0, targets(list));
        worst = worst.max(gradcheck(&config, &lora, &padded, None));
        worst = worst.max(gradcheck(&config, &lora, &packed, None));
    }
    println!("adapters: max relative error {worst:e} (bound {BOUND:e})");
}

#[test]
fn adapter_gradients_match_finite_differences_with_lora_dropout() {
    let padded = padded_batch(&examples(3, &[6, 5]), 1);
    let mut worst = 0f64;
    for (model_dropout, list) in [(0.0, "q,v,down"), (0.2, "k,o,gate,up")] {
        let config = tiny_config(2, RopeStyle::AdjacentPairs, false, model_dropout);
        let lora = LoraConfig::new(2, 4.0, 0.3, targets(list));
        worst = worst.max(gradcheck(&config, &lora, &padded, Some(17)));
    }
    println!("adapters with dropout: max relative error {worst:e} (bound {BOUND:e})");
}

#[test]
fn adapter_gradients_match_finite_differences_with_recompute() {
    let padded = padded_batch(&examples(3, &[6, 5]), 1);
    let packed = packed_batch(&examples(2, &[5, 4, 6, 3]), 9);
    for recompute in [Recompute::Mlp, Recompute::Layer] {
        let mut worst = 0f64;
        for (model_dropout, lora_dropout, list, seed) in [
            (0.0, 0.0, "q,k,v,o,gate,up,down", None),
            (0.2, 0.3, "k,o,gate,up", Some(17)),
            (0.2, 0.3, "q,v,down", Some(19)),
        ] {
            let config = tiny_config(2, RopeStyle::AdjacentPairs, false, model_dropout);
            let lora = LoraConfig::new(2, 4.0, lora_dropout, targets(list));
            worst = worst.max(gradcheck_with(&config, &lora, &padded, seed, recompute));
            worst = worst.max(gradcheck_with(&config, &lora, &packed, seed, recompute));
        }
        println!("adapters, recompute {recompute}: max relative error {worst:e} (bound {BOUND:e})");
    }
}

#[test]
fn the_base_is_frozen_and_only_the_adapters_are_trained() {
    let config = tiny_config(2, RopeStyle::HalfSplit, false, 0.0);
    let lora = LoraConfig::new(4, 8.0, 0.0, targets("q,v"));
    let batch = padded_batch(&examples(4, &[6, 5]), 0);
    let mut model = Model::with_lora(f64_backend(), config.clone(), batch.n_tokens(), true, &lora).unwrap();
    model.init_params(3).unwrap();
    model.init_adapters(4).unwrap();
    let base_before = model.read_params().unwrap();
    let adapters_before = model.read_adapters().unwrap();
    // B = 0 at the start: the adapted model is the base.
    let mut plain = Model::new(f64_backend(), config.clone(), batch.n_tokens()).unwrap();
    plain.write_params(&base_before).unwrap();
    assert_eq!(model.loss(&batch).unwrap(), plain.loss(&batch).unwrap());
    assert!(model.read_grads().unwrap().is_empty(), "a frozen base has no gradient buffers");
    assert!(model.read_optimizer_state().unwrap().0.is_empty(), "a frozen base has no moments");

    let hp =
        AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.01, step: 1, grad_scale: 1.0 };
    let mut losses = vec![];
    for step in 1..=5 {
        model.zero_grads().unwrap();
        let sum = model.forward_backward(&batch, 1.0 / batch.n_supervised() as f32, None).unwrap();
        losses.push(sum / batch.n_supervised() as f64);
        assert!(model.grad_norm().unwrap() > 0.0);
        model.adamw_step(&AdamW { step, ..hp }).unwrap();
    }
    assert!(losses[4] < losses[0], "the adapters did not learn: {losses:?}");
    assert_eq!(model.read_params().unwrap(), base_before, "the base weights moved");
    let adapters_after = model.read_adapters().unwrap();
    for (a, b) in adapters_before.iter().zip(&adapters_after) {
        assert_ne!(a.data, b.data, "{} did not move", a.name);
    }
}

#[test]
fn merged_weights_give_the_adapted_models_logits() {
    for (config, list) in [
        (tiny_config(2, RopeStyle::AdjacentPairs, false, 0.0), "q,v"),
        (tiny_config(4, RopeStyle::HalfSplit, true, 0.0), "q,k,v,o,gate,up,down"),
    ] {
        let lora = LoraConfig::new(3, 6.0, 0.1, targets(list));
        let (trained, adapters) = random_model(&config, &lora, 16, 9);
        let base = trained.read_params().unwrap();
        let ids = [1u32, 5, 9, 3, 7, 11];

        let mut adapted = Model::with_lora(f64_backend(), config.clone(), 16, false, &lora).unwrap();
        adapted.write_params(&base).unwrap();
        adapted.write_adapters(&adapters).unwrap();
        let mut cache = adapted.new_cache(16).unwrap();
        let want = adapted.next_logits(&mut cache, &ids).unwrap();

        let mut merged_params = base.clone();
        lora::merge_into(&lora, &config, &mut merged_params, &adapters).unwrap();
        let mut merged = Model::new_inference(f64_backend(), config.clone(), 16).unwrap();
        merged.write_params(&merged_params).unwrap();
        let mut cache = merged.new_cache(16).unwrap();
        let got = merged.next_logits(&mut cache, &ids).unwrap();

        let mut plain = Model::new_inference(f64_backend(), config.clone(), 16).unwrap();
        plain.write_params(&base).unwrap();
        let mut cache = plain.new_cache(16).unwrap();
        let base_logits = plain.next_logits(&mut cache, &ids).unwrap();
        let diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(diff(&want, &got) < 1e-4, "merged vs adapted: {}", diff(&want, &got));
        assert!(diff(&want, &base_logits) > 1e-2, "the adapters changed nothing");
    }
}

/// Finite adapters whose product overflows f32 are refused at the merge, naming them, instead of
/// writing a checkpoint of infinities.
#[test]
fn a_merge_that_overflows_the_weights_is_refused() {
    let config = tiny_config(2, RopeStyle::AdjacentPairs, false, 0.0);
    let lora = LoraConfig::new(2, 4.0, 0.0, targets("v"));
    let (model, mut adapters) = random_model(&config, &lora, 8, 3);
    let base = model.read_params().unwrap();
    for t in adapters.iter_mut().filter(|t| t.name.starts_with("layers.1.")) {
        t.data.iter_mut().for_each(|x| *x = 1e20);
    }
    let mut merged = base.clone();
    let err = lora::merge_into(&lora, &config, &mut merged, &adapters).unwrap_err().to_string();
    assert!(err.contains("layers.1.qkv") && err.contains("overflow") && err.contains("inf"), "{err}");
}

#[test]
fn bad_lora_configs_are_refused_naming_the_field() {
    let config = tiny_config(2, RopeStyle::AdjacentPairs, false, 0.0);
    let err = LoraConfig::parse_targets("q,x_proj").unwrap_err().to_string();
    assert!(err.contains("unknown LoRA target \"x_proj\""), "{err}");
    let err = LoraConfig::new(0, 8.0, 0.0, targets("q")).validate(&config).unwrap_err().to_string();
    assert!(err.contains("lora.rank"), "{err}");
    // v is 2 kv heads × 4 = 8 wide.
    let err = LoraConfig::new(9, 8.0, 0.0, targets("q,v")).validate(&config).unwrap_err().to_string();
    assert!(err.contains("lora.rank 9 exceeds the v projection"), "{err}");
    let err = LoraConfig::new(2, 8.0, 1.0, targets("q")).validate(&config).unwrap_err().to_string();
    assert!(err.contains("lora.dropout"), "{err}");
}

#[test]
fn peft_tensors_apply_to_the_hugging_face_weights() {
    // W_hf + scale · B_peft·A_peft must equal the Hugging Face form of the merged internal
    // weights: the PEFT files carry Hugging Face's RoPE row order for q and k.
    for style in [RopeStyle::AdjacentPairs, RopeStyle::HalfSplit] {
        let config = tiny_config(2, style, false, 0.0);
        let lora = LoraConfig::new(3, 6.0, 0.0, targets("q,k,v,o,gate,up,down"));
        let (model, adapters) = random_model(&config, &lora, 8, 13);
        let base = model.read_params().unwrap();
        let mut merged = base.clone();
        lora::merge_into(&lora, &config, &mut merged, &adapters).unwrap();
        let hf_base = sft::checkpoint::to_hf(&config, base);
        let hf_merged = sft::checkpoint::to_hf(&config, merged);
        let peft = sft::checkpoint::peft::to_peft(&config, &lora, &adapters).unwrap();
        let find = |ts: &[NamedTensor], name: &str| ts.iter().find(|t| t.name == name).unwrap().clone();
        let r = lora.rank;
        for l in 0..config.n_layers {
            for t in &lora.targets {
                let w = format!("model.layers.{l}.{}.weight", t.hf_module());
                let a = find(
                    &peft,
                    &format!("base_model.model.model.layers.{l}.{}.lora_A.weight", t.hf_module()),
                );
                let b = find(
                    &peft,
                    &format!("base_model.model.model.layers.{l}.{}.lora_B.weight", t.hf_module()),
                );
                let (w0, w1) = (find(&hf_base, &w), find(&hf_merged, &w));
                let (out, inp) = (w0.shape[0], w0.shape[1]);
                assert_eq!((a.shape.clone(), b.shape.clone()), (vec![r, inp], vec![out, r]), "{w}");
                for o in 0..out {
                    for i in 0..inp {
                        let ba: f64 =
                            (0..r).map(|j| b.data[o * r + j] as f64 * a.data[j * inp + i] as f64).sum();
                        let want = w0.data[o * inp + i] as f64 + lora.scale() as f64 * ba;
                        let got = w1.data[o * inp + i] as f64;
                        assert!((want - got).abs() < 1e-5, "{w} [{o}, {i}]: {got} vs {want} ({style:?})");
                    }
                }
            }
        }
    }
}
