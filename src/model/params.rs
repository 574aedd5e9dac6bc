//! The parameter layout: the engine's internal tensors (a fused `qkv`, a fused `gate_up`), their
//! initialization, and the conversion to and from Hugging Face Llama names and shapes.

use super::config::ModelConfig;
use crate::backend::RopeStyle;
use crate::rng::Rng;
use anyhow::{bail, ensure, Context, Result};
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

/// Names of the per-layer tensors, in layout order.
pub const LAYER_TENSORS: [&str; 6] = ["attn_norm", "qkv", "o", "ffn_norm", "gate_up", "down"];

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
/// tensor's values do not depend on the others' sizes.
pub fn init_params(config: &ModelConfig, seed: u64) -> Vec<NamedTensor> {
    let root = Rng::new(seed);
    let residual_std = 0.02 / (2.0 * config.n_layers as f64).sqrt();
    param_specs(config)
        .into_iter()
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
        check_shape(t, &spec.shape)?;
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

fn check_shape(t: &NamedTensor, shape: &[usize]) -> Result<()> {
    ensure!(t.shape == shape, "tensor {} has shape {:?}, expected {:?}", t.name, t.shape, shape);
    ensure!(
        t.data.len() == t.numel(),
        "tensor {} holds {} values for shape {:?} ({} expected)",
        t.name,
        t.data.len(),
        t.shape,
        t.numel()
    );
    Ok(())
}

/// Internal tensors → Hugging Face Llama names and shapes (the fused `qkv` and `gate_up` split).
/// `lm_head.weight` is omitted when the embeddings are tied.
///
/// The files always hold Hugging Face's RoPE convention (half-split pairs), so that transformers
/// reproduces the model: for a `RopeStyle::AdjacentPairs` model the q and k rows are permuted per
/// head by [`adjacent_to_half_split`]; a `HalfSplit` model's rows are written as they are.
///
/// `params` must come from a model of `config` (e.g. [`crate::model::Model::read_params`]);
/// a tensor with the wrong size panics here, so check foreign input with [`check_params`] first.
pub fn to_hf(config: &ModelConfig, params: &[NamedTensor]) -> Vec<NamedTensor> {
    let by_name: HashMap<&str, &NamedTensor> = params.iter().map(|t| (t.name.as_str(), t)).collect();
    let get = |name: &str| -> &NamedTensor {
        by_name.get(name).unwrap_or_else(|| panic!("to_hf: parameter {name} missing"))
    };
    let d = config.d_model;
    let heads = config.heads();
    let (qw, kvw, hidden) = (heads.q_width(), heads.kv_width(), config.ffn_hidden);
    let rows = |t: &NamedTensor, name: String, from: usize, to: usize| {
        NamedTensor::new(name, vec![to - from, d], t.data[from * d..to * d].to_vec())
    };
    let renamed = |t: &NamedTensor, name: String| NamedTensor::new(name, t.shape.clone(), t.data.clone());

    let mut out = vec![renamed(get("tok_embeddings"), "model.embed_tokens.weight".into())];
    for l in 0..config.n_layers {
        let p = |t: &str| get(&format!("layers.{l}.{t}"));
        let hf = |t: &str| format!("model.layers.{l}.{t}.weight");
        out.push(renamed(p("attn_norm"), hf("input_layernorm")));
        let qkv = p("qkv");
        let mut q = rows(qkv, hf("self_attn.q_proj"), 0, qw);
        let mut k = rows(qkv, hf("self_attn.k_proj"), qw, qw + kvw);
        if config.rope_style == RopeStyle::AdjacentPairs {
            q.data = adjacent_to_half_split(&q.data, heads.n_heads, heads.head_dim, d);
            k.data = adjacent_to_half_split(&k.data, heads.n_kv_heads, heads.head_dim, d);
        }
        out.push(q);
        out.push(k);
        out.push(rows(qkv, hf("self_attn.v_proj"), qw + kvw, qw + 2 * kvw));
        out.push(renamed(p("o"), hf("self_attn.o_proj")));
        out.push(renamed(p("ffn_norm"), hf("post_attention_layernorm")));
        let gate_up = p("gate_up");
        out.push(rows(gate_up, hf("mlp.gate_proj"), 0, hidden));
        out.push(rows(gate_up, hf("mlp.up_proj"), hidden, 2 * hidden));
        out.push(renamed(p("down"), hf("mlp.down_proj")));
    }
    out.push(renamed(get("norm"), "model.norm.weight".into()));
    if !config.tie_embeddings {
        out.push(renamed(get("lm_head"), "lm_head.weight".into()));
    }
    out
}

/// Hugging Face Llama tensors → internal tensors, checking that every tensor is present with its
/// shape. The q/k rows are taken to be in Hugging Face's half-split order and are permuted back
/// for a `RopeStyle::AdjacentPairs` config (the inverse of [`to_hf`]). A tied config ignores a `lm_head.weight` equal to the embedding and rejects a
/// different one; an untied config requires it.
pub fn from_hf(config: &ModelConfig, hf: Vec<NamedTensor>) -> Result<Vec<NamedTensor>> {
    config.validate()?;
    // Tensors move out of the map as they are used, so the conversion holds one copy of the
    // weights plus the layer being fused (not two copies).
    let mut by_name: HashMap<String, NamedTensor> = HashMap::with_capacity(hf.len());
    for t in hf {
        let name = t.name.clone();
        ensure!(by_name.insert(name.clone(), t).is_none(), "tensor {name} appears twice");
    }
    let d = config.d_model;
    let heads = config.heads();
    let (qw, kvw, hidden, vocab) = (heads.q_width(), heads.kv_width(), config.ffn_hidden, config.vocab_size);
    let mut take = |name: &str, shape: &[usize]| take_tensor(&mut by_name, name, shape);
    let mut out = Vec::new();
    out.push(NamedTensor::new(
        "tok_embeddings",
        vec![vocab, d],
        take("model.embed_tokens.weight", &[vocab, d])?,
    ));
    for l in 0..config.n_layers {
        let hf = |t: &str| format!("model.layers.{l}.{t}.weight");
        let ours = |t: &str| format!("layers.{l}.{t}");
        out.push(NamedTensor::new(ours("attn_norm"), vec![d], take(&hf("input_layernorm"), &[d])?));
        let mut qkv = Vec::with_capacity(heads.qkv_width() * d);
        let q = take(&hf("self_attn.q_proj"), &[qw, d])?;
        let k = take(&hf("self_attn.k_proj"), &[kvw, d])?;
        if config.rope_style == RopeStyle::AdjacentPairs {
            qkv.extend(half_split_to_adjacent(&q, heads.n_heads, heads.head_dim, d));
            qkv.extend(half_split_to_adjacent(&k, heads.n_kv_heads, heads.head_dim, d));
        } else {
            qkv.extend_from_slice(&q);
            qkv.extend_from_slice(&k);
        }
        drop((q, k));
        qkv.extend_from_slice(&take(&hf("self_attn.v_proj"), &[kvw, d])?);
        out.push(NamedTensor::new(ours("qkv"), vec![heads.qkv_width(), d], qkv));
        out.push(NamedTensor::new(ours("o"), vec![d, qw], take(&hf("self_attn.o_proj"), &[d, qw])?));
        out.push(NamedTensor::new(ours("ffn_norm"), vec![d], take(&hf("post_attention_layernorm"), &[d])?));
        let mut gate_up = take(&hf("mlp.gate_proj"), &[hidden, d])?;
        gate_up.extend_from_slice(&take(&hf("mlp.up_proj"), &[hidden, d])?);
        out.push(NamedTensor::new(ours("gate_up"), vec![2 * hidden, d], gate_up));
        out.push(NamedTensor::new(ours("down"), vec![d, hidden], take(&hf("mlp.down_proj"), &[d, hidden])?));
    }
    out.push(NamedTensor::new("norm", vec![d], take("model.norm.weight", &[d])?));
    let head = if by_name.contains_key("lm_head.weight") || !config.tie_embeddings {
        let head = take_tensor(&mut by_name, "lm_head.weight", &[vocab, d]);
        Some(head.context("untied config needs lm_head.weight")?)
    } else {
        None
    };
    match head {
        Some(head) if config.tie_embeddings => ensure!(
            head == out[0].data,
            "config ties the embeddings but lm_head.weight differs from model.embed_tokens.weight"
        ),
        Some(head) => out.push(NamedTensor::new("lm_head", vec![vocab, d], head)),
        None => {}
    }
    if !by_name.is_empty() {
        let mut extra: Vec<&str> = by_name.keys().map(String::as_str).collect();
        extra.sort_unstable();
        bail!("unexpected tensors for this config: {}", extra.join(", "));
    }
    Ok(out)
}

/// Removes `name` from `tensors`, checking its shape.
fn take_tensor(tensors: &mut HashMap<String, NamedTensor>, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let t = tensors.remove(name).with_context(|| format!("missing tensor {name}"))?;
    check_shape(&t, shape)?;
    Ok(t.data)
}

/// The Hugging Face names [`to_hf`] produces for `config`.
pub fn to_hf_names(config: &ModelConfig) -> Vec<String> {
    let mut names = vec!["model.embed_tokens.weight".to_string()];
    for l in 0..config.n_layers {
        for t in [
            "input_layernorm",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "post_attention_layernorm",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ] {
            names.push(format!("model.layers.{l}.{t}.weight"));
        }
    }
    names.push("model.norm.weight".into());
    if !config.tie_embeddings {
        names.push("lm_head.weight".into());
    }
    names
}

/// Reorders the rows of a q or k projection (`n_heads` heads of `head_dim` rows, `cols` columns)
/// from Meta's adjacent-pairs RoPE order to Hugging Face's half-split order: within a head, row
/// `j < hd/2` becomes Meta's row `2j` and row `hd/2 + j` Meta's row `2j + 1`. This is the
/// `permute` of transformers' `convert_llama_weights_to_hf.py`: the rotation pair (2j, 2j+1) of
/// frequency j lands on (j, j + hd/2), which has the same frequency in the half-split form, and
/// q·k is unchanged because q and k move together.
pub fn adjacent_to_half_split(data: &[f32], n_heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    permute_rows(data, n_heads, head_dim, cols, |j| {
        let half = head_dim / 2;
        if j < half {
            2 * j
        } else {
            2 * (j - half) + 1
        }
    })
}

/// The inverse of [`adjacent_to_half_split`]: Meta row `2j` is HF row `j`, Meta row `2j + 1`
/// HF row `hd/2 + j`.
pub fn half_split_to_adjacent(data: &[f32], n_heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    permute_rows(data, n_heads, head_dim, cols, |j| if j % 2 == 0 { j / 2 } else { head_dim / 2 + j / 2 })
}

/// Output row `j` of each head is input row `source(j)` of the same head.
fn permute_rows(
    data: &[f32],
    n_heads: usize,
    head_dim: usize,
    cols: usize,
    source: impl Fn(usize) -> usize,
) -> Vec<f32> {
    assert_eq!(data.len(), n_heads * head_dim * cols, "permute_rows: size mismatch");
    let mut out = Vec::with_capacity(data.len());
    for h in 0..n_heads {
        for j in 0..head_dim {
            let row = h * head_dim + source(j);
            out.extend_from_slice(&data[row * cols..(row + 1) * cols]);
        }
    }
    out
}
