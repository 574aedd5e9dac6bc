//! `--optimizer-state bf16`: AdamW's moments stored in bf16 (rounded to nearest even), the
//! update computed in fp32. The CPU twin's rounding, tiny gradients (where bf16's second moment
//! flushes to zero), training that converges like f32, and the config's refusals.

mod common;

use common::train::{prepared_data, tiny_config};
use half::bf16;
use sft::backend::cpu::{adamw_tensor_clipped, CpuBackend};
use sft::backend::{AdamW, StateDtype};
use sft::data::BatchMode;
use sft::model::lora::LoraConfig;
use sft::train::{train_on, TrainConfig};

const HP: AdamW =
    AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.01, step: 1, grad_scale: 1.0 };

/// Steps of the CPU twin from zero moments: (master, m, v) after `steps` steps.
fn steps(grads: &[f32], moments: StateDtype, hp: AdamW, n: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let len = grads.len();
    let mut master: Vec<f32> = (0..len).map(|i| 0.5 - i as f32 / len as f32).collect();
    let (mut params, mut m, mut v) = (vec![0.0f32; len], vec![0.0f32; len], vec![0.0f32; len]);
    for step in 1..=n {
        let hp = AdamW { step, ..hp };
        adamw_tensor_clipped(&mut params, &mut master, grads, &mut m, &mut v, moments, &hp, 1.0);
    }
    (master, m, v)
}

fn is_bf16(x: f32) -> bool {
    bf16::from_f32(x).to_f32().to_bits() == x.to_bits()
}

#[test]
fn bf16_moments_are_stored_rounded_to_nearest_even_and_used_unrounded() {
    let grads: Vec<f32> = (0..257).map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3 + 1e-4).collect();
    let (w32, m32, v32) = steps(&grads, StateDtype::F32, HP, 1);
    let (w16, m16, v16) = steps(&grads, StateDtype::Bf16, HP, 1);
    for i in 0..grads.len() {
        assert!(is_bf16(m16[i]) && is_bf16(v16[i]), "element {i}: {} {}", m16[i], v16[i]);
        // The stored value is f32's, rounded to nearest even.
        assert_eq!(m16[i], bf16::from_f32(m32[i]).to_f32(), "m[{i}]");
        assert_eq!(v16[i], bf16::from_f32(v32[i]).to_f32(), "v[{i}]");
        assert!(v16[i] >= 0.0);
    }
    // This step's update used the unrounded moments: the masters agree bit for bit after one
    // step (they differ only from the second, which reads the rounded moments).
    assert_eq!(w32, w16);
    let (w32, _, _) = steps(&grads, StateDtype::F32, HP, 5);
    let (w16, _, _) = steps(&grads, StateDtype::Bf16, HP, 5);
    assert_ne!(w32, w16);
    let moved: f32 =
        w32.iter().zip(&steps(&grads, StateDtype::F32, HP, 0).0).map(|(a, b)| (a - b).abs()).sum();
    let gap: f32 = w32.iter().zip(&w16).map(|(a, b)| (a - b).abs()).sum();
    assert!(gap < 1e-2 * moved, "bf16 moments moved the weights {gap} away from f32's (of {moved})");
}

/// bf16 has f32's exponent range but only 7 mantissa bits: its smallest subnormal is 2^-133
/// (about 9.2e-41), f32's 2^-149. With gradients around 1e-21, `(1 - beta2) · g²` (about 5e-44)
/// is an f32 subnormal but flushes to zero in bf16, while `m` (about 1e-22) does not. The update
/// is then `m̂ / eps`: bounded by about `|g| / eps`, tiny at eps 1e-8, never an explosion.
#[test]
fn tiny_gradients_flush_v_to_zero_without_exploding_the_update() {
    for scale in [1e-18f32, 1e-21, 1e-25, 1e-30, 1e-38] {
        let grads: Vec<f32> =
            (0..64).map(|i| scale * (1.0 + i as f32 / 8.0) * if i % 2 == 0 { 1.0 } else { -1.0 }).collect();
        let start = steps(&grads, StateDtype::F32, HP, 0).0;
        for n in [1u64, 3, 20] {
            let (w32, _, _) = steps(&grads, StateDtype::F32, HP, n);
            let (w16, m16, v16) = steps(&grads, StateDtype::Bf16, HP, n);
            assert!(m16.iter().chain(&v16).all(|x| x.is_finite() && is_bf16(*x)));
            assert!(v16.iter().all(|&v| v >= 0.0));
            for i in 0..grads.len() {
                assert!(w16[i].is_finite(), "scale {scale:e}, step {n}: master {i} is {}", w16[i]);
                // The Adam part of the update is at most lr · |m̂| / eps (+ decay), and |m̂| is at
                // most the largest gradient (9 · scale here): far under the weights' scale.
                let decay = 1.0 - (1.0 - HP.lr * HP.weight_decay).powi(n as i32);
                let bound =
                    n as f32 * HP.lr * (9.0 * scale / HP.eps).min(1.0) + decay * start[i].abs() + 1e-7;
                assert!(
                    (w16[i] - start[i]).abs() <= bound,
                    "scale {scale:e}, step {n}: master {i} moved too far"
                );
                // And it agrees with the f32 state up to that (tiny) Adam part.
                assert!(
                    (w16[i] - w32[i]).abs()
                        <= 2.0 * n as f32 * HP.lr * (9.0 * scale / HP.eps).min(1.0) + 1e-7
                );
            }
            if scale <= 1e-21 {
                assert!(v16.iter().all(|&v| v == 0.0), "scale {scale:e}: v should flush to zero in bf16");
            }
        }
    }
}

#[test]
fn training_with_bf16_moments_converges_like_f32() {
    let root = tempfile::tempdir().unwrap();
    let (data, tok) = prepared_data(root.path(), 48, 96);
    let run = |state: StateDtype| {
        let cfg = TrainConfig {
            max_steps: Some(10),
            dropout: Some(0.0),
            eval_every: 0,
            save_every: 0,
            optimizer_state: state,
            ..tiny_config(&data, &tok, &root.path().join(state.name()), BatchMode::Packed)
        };
        train_on(CpuBackend::<f32>::new(), &cfg).unwrap().1
    };
    let f32_run = run(StateDtype::F32);
    let bf16_run = run(StateDtype::Bf16);
    eprintln!("f32 losses:  {:?}\nbf16 losses: {:?}", f32_run.step_losses, bf16_run.step_losses);
    let (first, last) = (f32_run.step_losses[0].1, f32_run.step_losses.last().unwrap().1);
    assert!(last < 0.9 * first, "the f32 run must learn for this to mean anything: {first} -> {last}");
    assert_eq!(bf16_run.step_losses[0].1, first, "the first step's loss comes before any update");
    assert_ne!(bf16_run.step_losses, f32_run.step_losses, "the moments' type must matter somewhere");
    for ((s, a), (_, b)) in f32_run.step_losses.iter().zip(&bf16_run.step_losses) {
        assert!((a - b).abs() <= 5e-3 * a, "step {s}: f32 loss {a}, bf16 loss {b}");
    }
    let (a, b) = (f32_run.final_val_loss.unwrap(), bf16_run.final_val_loss.unwrap());
    assert!((a - b).abs() <= 5e-3 * a, "val loss: f32 {a}, bf16 {b}");
}

#[test]
fn bf16_state_refuses_a_tiny_eps_and_lora() {
    let root = tempfile::tempdir().unwrap();
    let base = TrainConfig {
        optimizer_state: StateDtype::Bf16,
        ..tiny_config(
            &root.path().join("d"),
            &root.path().join("t"),
            &root.path().join("o"),
            BatchMode::Packed,
        )
    };
    base.validate().unwrap();
    let err = TrainConfig { eps: 1e-20, ..base.clone() }.validate().unwrap_err().to_string();
    assert!(err.contains("eps") && err.contains("optimizer_state bf16"), "{err}");
    TrainConfig { eps: 1e-20, optimizer_state: StateDtype::F32, ..base.clone() }.validate().unwrap();
    let err =
        TrainConfig { lora: Some(LoraConfig::default()), ..base.clone() }.validate().unwrap_err().to_string();
    assert!(err.contains("optimizer_state bf16") && err.contains("LoRA"), "{err}");
    // And the model itself, for callers that skip the config.
    let config = sft::model::config::ModelConfig::preset("tiny").unwrap();
    let err = sft::model::Model::new_training(
        CpuBackend::<f32>::new(),
        config,
        16,
        Some(&LoraConfig::default()),
        StateDtype::Bf16,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("LoRA"), "{err}");
}

#[test]
fn the_flag_and_the_json_field_parse() {
    assert_eq!("bf16".parse::<StateDtype>().unwrap(), StateDtype::Bf16);
    assert_eq!("f32".parse::<StateDtype>().unwrap(), StateDtype::F32);
    assert!("fp8".parse::<StateDtype>().unwrap_err().to_string().contains("f32 or bf16"));
    let cfg: TrainConfig = serde_json::from_str(r#"{"optimizer_state": "bf16"}"#).unwrap();
    assert_eq!(cfg.optimizer_state, StateDtype::Bf16);
    // Configs (and saved trainer states) from before the field: f32.
    let cfg: TrainConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(cfg.optimizer_state, StateDtype::F32);
}
