//! Every parameter tensor's gradient against central finite differences, in f64 on the CPU
//! backend, for each model variant (grouped or full KV heads, both RoPE styles, tied or untied
//! embeddings), on a padded batch with padding and on a packed batch, with and without dropout,
//! with each activation recompute mode (none, mlp, layer).

mod common;

use common::model::*;
use sft::backend::RopeStyle;
use sft::data::batch::Batch;
use sft::model::{Model, ModelConfig, NamedTensor, Recompute};
use sft::rng::Rng;

/// Elements checked per tensor.
const PER_TENSOR: usize = 6;
/// Finite-difference step: a power of two, and parameters are multiples of [`GRID`], so that
/// `x ± STEP` and `x ± STEP/2` are exact in f32 (parameters enter the model as f32) and the
/// differences are exactly symmetric.
const STEP: f64 = 1.0 / 1024.0;
const GRID: f64 = 1.0 / 65536.0;
/// Bound on |analytic − numeric| / max(|analytic|, |numeric|, FLOOR). The numeric gradient is
/// Richardson-extrapolated central differences, `(4·D(STEP/2) − D(STEP)) / 3`, whose error is
/// O(STEP⁴); f64 round-off in the loss sum adds ~1e-14 · loss / STEP.
const BOUND: f64 = 1e-6;
/// Gradients smaller than this are compared absolutely (to BOUND · FLOOR = 1e-11): the loss
/// round-off above, ~5e-12, dominates their relative error.
const FLOOR: f64 = 1e-5;

/// Parameters large enough that every nonlinearity matters (the default init is nearly linear).
fn random_params(model: &Model<F64>, seed: u64) -> Vec<NamedTensor> {
    let mut rng = Rng::new(seed);
    let mut params = model.read_params().unwrap();
    for t in &mut params {
        let is_norm = t.shape.len() == 1;
        for x in &mut t.data {
            let value = if is_norm { 1.0 + 0.2 * rng.normal() } else { 0.3 * rng.normal() };
            *x = ((value / GRID).round() * GRID) as f32;
        }
    }
    params
}

fn loss_at(model: &mut Model<F64>, params: &[NamedTensor], batch: &Batch, seed: Option<u64>) -> f64 {
    model.write_params(params).unwrap();
    // forward_backward (not loss) so that dropout, when on, uses the same masks.
    model.forward_backward(batch, 1.0, seed).unwrap()
}

/// Returns the largest relative error seen.
fn gradcheck(config: &ModelConfig, batch: &Batch, dropout_seed: Option<u64>, recompute: Recompute) -> f64 {
    let mut model =
        Model::with_recompute(f64_backend(), config.clone(), batch.n_tokens(), None, recompute).unwrap();
    let params = random_params(&model, 11);
    model.write_params(&params).unwrap();
    model.zero_grads().unwrap();
    let loss = model.forward_backward(batch, 1.0, dropout_seed).unwrap();
    assert!(loss.is_finite() && loss > 0.0);
    if dropout_seed.is_none() || config.dropout == 0.0 {
        let plain = model.loss(batch).unwrap();
        assert!((plain - loss).abs() <= 1e-12 * loss, "loss() {plain} vs forward_backward {loss}");
    }
    let grads = model.read_grads().unwrap();

    let used_rows: Vec<usize> = batch.inputs.iter().map(|&t| t as usize).collect();
    let mut rng = Rng::new(5);
    let mut worst = 0f64;
    for (ti, (t, g)) in params.iter().zip(&grads).enumerate() {
        assert_eq!(t.name, g.name);
        for _ in 0..PER_TENSOR {
            // Embedding rows of absent tokens have zero gradient: check rows the batch uses.
            let i = if t.name == "tok_embeddings" && !config.tie_embeddings {
                let d = t.shape[1];
                used_rows[rng.below(used_rows.len())] * d + rng.below(d)
            } else {
                rng.below(t.data.len())
            };
            let x = t.data[i] as f64;
            let mut p = params.clone();
            let mut central = |h: f64| {
                p[ti].data[i] = (x + h) as f32;
                assert_eq!(p[ti].data[i] as f64, x + h, "x + h must be exact in f32");
                let lp = loss_at(&mut model, &p, batch, dropout_seed);
                p[ti].data[i] = (x - h) as f32;
                let lm = loss_at(&mut model, &p, batch, dropout_seed);
                (lp - lm) / (2.0 * h)
            };
            let numeric = (4.0 * central(STEP / 2.0) - central(STEP)) / 3.0;
            let analytic = g.data[i] as f64;
            let err = (analytic - numeric).abs() / analytic.abs().max(numeric.abs()).max(FLOOR);
            assert!(
                err <= BOUND,
                "{} [{i}]: analytic {analytic:e} numeric {numeric:e} rel err {err:e} (recompute {recompute}, \
                 config {config:?})",
                t.name
            );
            worst = worst.max(err);
        }
    }
    worst
}

fn variants() -> Vec<ModelConfig> {
    let mut out = vec![];
    for n_kv_heads in [2, 4] {
        for style in [RopeStyle::AdjacentPairs, RopeStyle::HalfSplit] {
            for tied in [false, true] {
                out.push(tiny_config(n_kv_heads, style, tied, 0.0));
            }
        }
    }
    out
}

#[test]
fn gradients_match_finite_differences_on_a_padded_batch() {
    let batch = padded_batch(&examples(1, &[7, 4, 6]), 1);
    assert!(batch.targets.iter().filter(|&&t| t == PAD).count() > 0);
    for recompute in Recompute::ALL {
        let worst = variants().iter().map(|c| gradcheck(c, &batch, None, recompute)).fold(0.0, f64::max);
        println!("padded batch, recompute {recompute}: max relative error {worst:e} (bound {BOUND:e})");
    }
}

#[test]
fn gradients_match_finite_differences_on_a_packed_batch() {
    let batch = packed_batch(&examples(2, &[5, 4, 6, 3]), 9);
    assert!(batch.n_segments() > batch.rows);
    for recompute in Recompute::ALL {
        let worst = variants().iter().map(|c| gradcheck(c, &batch, None, recompute)).fold(0.0, f64::max);
        println!("packed batch, recompute {recompute}: max relative error {worst:e} (bound {BOUND:e})");
    }
}

#[test]
fn gradients_match_finite_differences_with_dropout() {
    let padded = padded_batch(&examples(3, &[6, 5]), 1);
    let packed = packed_batch(&examples(4, &[5, 4, 6]), 9);
    for recompute in Recompute::ALL {
        let mut worst = 0f64;
        for config in [
            tiny_config(2, RopeStyle::AdjacentPairs, false, 0.25),
            tiny_config(4, RopeStyle::HalfSplit, true, 0.25),
        ] {
            worst = worst.max(gradcheck(&config, &padded, Some(17), recompute));
            worst = worst.max(gradcheck(&config, &packed, Some(18), recompute));
        }
        println!("with dropout, recompute {recompute}: max relative error {worst:e} (bound {BOUND:e})");
    }
}

#[test]
fn dropout_changes_the_loss_and_is_reproducible() {
    let config = tiny_config(2, RopeStyle::AdjacentPairs, false, 0.25);
    let batch = padded_batch(&examples(3, &[6, 5]), 0);
    let mut model = Model::new(f64_backend(), config, batch.n_tokens()).unwrap();
    let params = random_params(&model, 3);
    model.write_params(&params).unwrap();
    let plain = model.loss(&batch).unwrap();
    let a = model.forward_backward(&batch, 1.0, Some(1)).unwrap();
    let b = model.forward_backward(&batch, 1.0, Some(1)).unwrap();
    let c = model.forward_backward(&batch, 1.0, Some(2)).unwrap();
    let none = model.forward_backward(&batch, 1.0, None).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_ne!(a, plain);
    assert_eq!(none, plain);
}
