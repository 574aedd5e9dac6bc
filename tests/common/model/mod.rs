//! For the model's tests: tiny configs, hand-built batches, and two independent f64 readings
//! of the model (`naive`: the op trait; `reference`: a plain forward).

use sft::backend::RopeStyle;
use sft::data::batch::Batch;
use sft::model::ModelConfig;
use sft::rng::Rng;

pub const VOCAB: usize = 23;
pub const PAD: u32 = 2;

/// A 2-layer model of width 16: 4 heads of 4, sharing `n_kv_heads` KV heads.
pub fn tiny_config(
    n_kv_heads: usize,
    rope_style: RopeStyle,
    tie_embeddings: bool,
    dropout: f32,
) -> ModelConfig {
    ModelConfig {
        vocab_size: VOCAB,
        d_model: 16,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads,
        ffn_hidden: 24,
        norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_style,
        rope_scaling: None,
        max_seq_len: 64,
        tie_embeddings,
        dropout,
    }
}

/// One tokenized example: `supervised[i]` says whether `tokens[i]` is a target.
pub struct Ex {
    pub tokens: Vec<u32>,
    pub supervised: Vec<bool>,
}

/// Examples of different lengths, each with a supervised tail (as a final reply is).
pub fn examples(seed: u64, lens: &[usize]) -> Vec<Ex> {
    let mut rng = Rng::new(seed);
    lens.iter()
        .map(|&len| {
            // Ids avoid PAD so that inputs never look like padding.
            let tokens: Vec<u32> = (0..len)
                .map(|_| {
                    let t = rng.below(VOCAB - 1) as u32;
                    if t >= PAD {
                        t + 1
                    } else {
                        t
                    }
                })
                .collect();
            let prompt = len / 2;
            let supervised = (0..len).map(|i| i >= prompt).collect();
            Ex { tokens, supervised }
        })
        .collect()
}

/// `(inputs, targets)` of one example: `targets[i]` follows `inputs[i]`, PAD when unsupervised.
fn shifted(ex: &Ex) -> (Vec<u32>, Vec<u32>) {
    let n = ex.tokens.len() - 1;
    let inputs = ex.tokens[..n].to_vec();
    let targets = (0..n).map(|i| if ex.supervised[i + 1] { ex.tokens[i + 1] } else { PAD }).collect();
    (inputs, targets)
}

/// A batch of `rows` rows of `seq_len` with no tokens yet, padded with PAD.
fn empty_batch(rows: usize, seq_len: usize) -> Batch {
    Batch {
        rows,
        seq_len,
        inputs: vec![],
        targets: vec![],
        positions: vec![],
        cu_seqlens: vec![0],
        pad_id: PAD,
    }
}

/// One row per example, right-padded to the longest (plus `extra` padding positions).
pub fn padded_batch(exs: &[Ex], extra: usize) -> Batch {
    let seq_len = exs.iter().map(|e| e.tokens.len() - 1).max().unwrap() + extra;
    let mut b = empty_batch(exs.len(), seq_len);
    for ex in exs {
        let (mut inputs, mut targets) = shifted(ex);
        inputs.resize(seq_len, PAD);
        targets.resize(seq_len, PAD);
        b.inputs.extend(inputs);
        b.targets.extend(targets);
        b.positions.extend(0..seq_len as u32);
        b.cu_seqlens.push(b.inputs.len() as u32);
    }
    b
}

/// Examples packed one after another into rows of `seq_len` (an example never straddles rows),
/// each example its own attention segment, each row's padding tail one more segment.
pub fn packed_batch(exs: &[Ex], seq_len: usize) -> Batch {
    let mut b = empty_batch(0, seq_len);
    let mut row_used = seq_len; // forces a first row
    let close_row = |b: &mut Batch, used: usize| {
        if b.rows > 0 && used < seq_len {
            let tail = seq_len - used;
            b.inputs.extend(std::iter::repeat_n(PAD, tail));
            b.targets.extend(std::iter::repeat_n(PAD, tail));
            b.positions.extend(0..tail as u32);
            b.cu_seqlens.push(b.inputs.len() as u32);
        }
    };
    for ex in exs {
        let (inputs, targets) = shifted(ex);
        assert!(inputs.len() <= seq_len);
        if row_used + inputs.len() > seq_len {
            close_row(&mut b, row_used);
            b.rows += 1;
            row_used = 0;
        }
        row_used += inputs.len();
        b.positions.extend(0..inputs.len() as u32);
        b.inputs.extend(inputs);
        b.targets.extend(targets);
        b.cu_seqlens.push(b.inputs.len() as u32);
    }
    close_row(&mut b, row_used);
    b
}

/// Largest relative difference between two tensors, against the larger's max magnitude.
pub fn max_rel_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().chain(b).fold(0f64, |m, &x| m.max(x.abs() as f64)).max(1e-30);
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).abs()).fold(0.0, f64::max) / scale
}

pub mod naive;
pub mod reference;

/// The backends the model's tests run on (f64 for exact comparisons, f32 for training paths):
/// the crate's CPU reference. [`naive::NaiveBackend`] cross-checks it.
pub type F64 = sft::backend::cpu::CpuBackend<f64>;
pub type F32 = sft::backend::cpu::CpuBackend<f32>;

pub fn f64_backend() -> F64 {
    sft::backend::cpu::CpuBackend::new()
}

pub fn f32_backend() -> F32 {
    sft::backend::cpu::CpuBackend::new()
}
