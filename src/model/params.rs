//! The parameter layout: the engine's internal tensors (a fused `qkv`, a fused `gate_up`) and
//! their initialization. Hugging Face names and layouts are `checkpoint::hf`'s business.

use super::config::ModelConfig;
use crate::rng::Rng;
use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;
use std::collections::HashMap;

/// A named f32 tensor, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl NamedTensor {
    pub fn new(name: impl Into<String>, shape: Vec<usize>, data: Vec<f32>) -> Self {
        NamedTensor { name: name.into(), shape, data }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Checks that the tensor has `shape` and holds as many values as it says.
    pub fn check_shape(&self, shape: &[usize]) -> Result<()> {
        ensure!(self.shape == shape, "tensor {} has shape {:?}, expected {:?}", self.name, self.shape, shape);
        ensure!(
            self.data.len() == self.numel(),
            "tensor {} holds {} values for shape {:?} ({} expected)",
            self.name,
            self.data.len(),
            self.shape,
            self.numel()
        );
        Ok(())
    }
}

/// What a parameter tensor is, which decides its initialization.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// RMSNorm weight: ones.
    Norm,
    /// Embedding or linear weight: normal, std 0.02.
    Weight,
    /// A projection that writes into the residual stream (`o`, `down`): std 0.02 / sqrt(2·layers),
    /// as GPT-2 does, so the stream's variance does not grow with depth.
    ResidualOut,
}

/// One internal parameter tensor: its name, shape, and kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: ParamKind,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Index of each tensor within the flat list of [`param_specs`].
#[derive(Clone, Copy, Debug)]
pub struct LayerIndex {
    pub attn_norm: usize,
    pub qkv: usize,
    pub o: usize,
    pub ffn_norm: usize,
    pub gate_up: usize,
    pub down: usize,
}

impl LayerIndex {
    /// The layer's tensors: consecutive in the layout, `attn_norm` first and `down` last.
    pub fn tensors(&self) -> std::ops::Range<usize> {
        self.attn_norm..self.down + 1
    }
}

/// Where each tensor sits in [`param_specs`]: `tok_embeddings`, then per layer
/// `attn_norm, qkv, o, ffn_norm, gate_up, down`, then `norm`, then `lm_head` unless tied.
#[derive(Clone, Debug)]
pub struct ParamIndex {
    pub tok_embeddings: usize,
    pub layers: Vec<LayerIndex>,
    pub norm: usize,
    pub lm_head: Option<usize>,
}

impl ParamIndex {
    pub fn new(config: &ModelConfig) -> Self {
        let layers = (0..config.n_layers)
            .map(|l| {
                let b = 1 + 6 * l;
                LayerIndex {
                    attn_norm: b,
                    qkv: b + 1,
                    o: b + 2,
                    ffn_norm: b + 3,
                    gate_up: b + 4,
                    down: b + 5,
                }
            })
            .collect();
        let norm = 1 + 6 * config.n_layers;
        ParamIndex {
            tok_embeddings: 0,
            layers,
            norm,
            lm_head: if config.tie_embeddings { None } else { Some(norm + 1) },
        }
    }

    /// The weight the output projection uses: `lm_head`, or the embedding when tied.
    pub fn output_weight(&self) -> usize {
        self.lm_head.unwrap_or(self.tok_embeddings)
    }
}

/// The elements of each of [`param_specs`]'s tensors.
pub fn param_lens(config: &ModelConfig) -> Vec<usize> {
    param_specs(config).iter().map(ParamSpec::numel).collect()
}

/// The internal tensors of a model, in layout order (see [`ParamIndex`]).
pub fn param_specs(config: &ModelConfig) -> Vec<ParamSpec> {
    let d = config.d_model;
    let heads = config.heads();
    let hidden = config.ffn_hidden;
    let spec = |name: String, shape: Vec<usize>, kind| ParamSpec { name, shape, kind };
    let mut specs = vec![spec("tok_embeddings".into(), vec![config.vocab_size, d], ParamKind::Weight)];
    for l in 0..config.n_layers {
        let p = |t: &str| format!("layers.{l}.{t}");
        specs.push(spec(p("attn_norm"), vec![d], ParamKind::Norm));
        specs.push(spec(p("qkv"), vec![heads.qkv_width(), d], ParamKind::Weight));
        specs.push(spec(p("o"), vec![d, heads.q_width()], ParamKind::ResidualOut));
        specs.push(spec(p("ffn_norm"), vec![d], ParamKind::Norm));
        specs.push(spec(p("gate_up"), vec![2 * hidden, d], ParamKind::Weight));
        specs.push(spec(p("down"), vec![d, hidden], ParamKind::ResidualOut));
    }
    specs.push(spec("norm".into(), vec![d], ParamKind::Norm));
    if !config.tie_embeddings {
        specs.push(spec("lm_head".into(), vec![config.vocab_size, d], ParamKind::Weight));
    }
    specs
}

/// Fresh parameters: normal(0, 0.02) weights, residual output projections scaled by
/// 1/sqrt(2·n_layers), norms at 1. Each tensor draws from its own stream of `seed`, so a
/// tensor's values do not depend on the others' sizes, and the tensors are drawn in parallel
/// (the 1.3B's 1.27e9 normals took tens of seconds on one core) with the same values.
pub fn init_params(config: &ModelConfig, seed: u64) -> Vec<NamedTensor> {
    let root = Rng::new(seed);
    let residual_std = 0.02 / (2.0 * config.n_layers as f64).sqrt();
    param_specs(config)
        .into_par_iter()
        .enumerate()
        .map(|(i, spec)| {
            let n = spec.numel();
            let data = match spec.kind {
                ParamKind::Norm => vec![1.0; n],
                ParamKind::Weight | ParamKind::ResidualOut => {
                    let std = if spec.kind == ParamKind::Weight { 0.02 } else { residual_std };
                    let mut rng = root.fork(i as u64);
                    (0..n).map(|_| (rng.normal() * std) as f32).collect()
                }
            };
            NamedTensor { name: spec.name, shape: spec.shape, data }
        })
        .collect()
}

/// Checks that `params` are exactly the internal tensors of `config`, in any order, and returns
/// them in layout order.
pub fn check_params<'a>(config: &ModelConfig, params: &'a [NamedTensor]) -> Result<Vec<&'a NamedTensor>> {
    let by_name = index_by_name(params)?;
    let specs = param_specs(config);
    let mut out = Vec::with_capacity(specs.len());
    for spec in &specs {
        let t =
            by_name.get(spec.name.as_str()).with_context(|| format!("missing parameter {}", spec.name))?;
        t.check_shape(&spec.shape)?;
        out.push(*t);
    }
    if params.len() != specs.len() {
        let known: std::collections::HashSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        let extra: Vec<&str> =
            params.iter().map(|t| t.name.as_str()).filter(|n| !known.contains(n)).collect();
        bail!("unexpected parameters for this config: {}", extra.join(", "));
    }
    Ok(out)
}

fn index_by_name(tensors: &[NamedTensor]) -> Result<HashMap<&str, &NamedTensor>> {
    let mut map = HashMap::with_capacity(tensors.len());
    for t in tensors {
        ensure!(map.insert(t.name.as_str(), t).is_none(), "tensor {} appears twice", t.name);
    }
    Ok(map)
}
