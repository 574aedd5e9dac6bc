//! Hugging Face Llama checkpoints: tensor names and shapes (derived here and nowhere else), the
//! conversion between them and the engine's internal tensors (a fused `qkv`, a fused `gate_up`),
//! and reading a Hugging Face weights directory (one file or shards).

use super::safetensors::{map_file, parse_safetensors, tensor_f32};
use super::{INDEX_FILE, MODEL_FILE};
use crate::backend::RopeStyle;
use crate::model::config::ModelConfig;
use crate::model::params::{param_specs, NamedTensor};
use anyhow::{bail, ensure, Context, Result};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

/// The Hugging Face tensors of `config`, (name, shape) in [`to_hf`]'s order.
pub fn hf_shapes(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let heads = config.heads();
    let (d, hidden, vocab) = (config.d_model, config.ffn_hidden, config.vocab_size);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![vocab, d])];
    for l in 0..config.n_layers {
        for (t, shape) in [
            ("input_layernorm", vec![d]),
            ("self_attn.q_proj", vec![heads.q_width(), d]),
            ("self_attn.k_proj", vec![heads.kv_width(), d]),
            ("self_attn.v_proj", vec![heads.kv_width(), d]),
            ("self_attn.o_proj", vec![d, heads.q_width()]),
            ("post_attention_layernorm", vec![d]),
            ("mlp.gate_proj", vec![hidden, d]),
            ("mlp.up_proj", vec![hidden, d]),
            ("mlp.down_proj", vec![d, hidden]),
        ] {
            out.push((format!("model.layers.{l}.{t}.weight"), shape));
        }
    }
    out.push(("model.norm.weight".to_string(), vec![d]));
    if !config.tie_embeddings {
        out.push(lm_head(config));
    }
    out
}

/// `lm_head.weight` and its shape: in [`hf_shapes`] when untied; a tied checkpoint may still
/// carry it as a copy of the embedding.
fn lm_head(config: &ModelConfig) -> (String, Vec<usize>) {
    ("lm_head.weight".to_string(), vec![config.vocab_size, config.d_model])
}

/// Internal tensors → Hugging Face Llama names and shapes (the fused `qkv` and `gate_up` split).
/// `lm_head.weight` is omitted when the embeddings are tied.
///
/// The files always hold Hugging Face's RoPE convention (half-split pairs), so that transformers
/// reproduces the model: for a `RopeStyle::AdjacentPairs` model the q and k rows are permuted per
/// head by [`adjacent_to_half_split`]; a `HalfSplit` model's rows are written as they are.
///
/// `params` must come from a model of `config` (e.g. [`crate::model::Model::read_params`]);
/// a tensor with the wrong size panics here, so check foreign input with [`crate::model::params::check_params`] first.
///
/// The tensors are moved, not copied: only the fused `qkv` and `gate_up` are split into new
/// buffers, one layer's at a time, so that converting a 1.3B model (5 GB of f32) does not hold
/// two copies of it.
pub fn to_hf(config: &ModelConfig, params: Vec<NamedTensor>) -> Vec<NamedTensor> {
    let mut by_name: HashMap<String, NamedTensor> = params.into_iter().map(|t| (t.name.clone(), t)).collect();
    let mut take = |name: &str| -> NamedTensor {
        by_name.remove(name).unwrap_or_else(|| panic!("to_hf: parameter {name} missing"))
    };
    let d = config.d_model;
    let heads = config.heads();
    let (qw, kvw, hidden) = (heads.q_width(), heads.kv_width(), config.ffn_hidden);
    let rows = |t: &NamedTensor, name: String, from: usize, to: usize| {
        NamedTensor::new(name, vec![to - from, d], t.data[from * d..to * d].to_vec())
    };
    let renamed = |t: NamedTensor, name: String| NamedTensor { name, ..t };

    let mut out = vec![renamed(take("tok_embeddings"), "model.embed_tokens.weight".into())];
    for l in 0..config.n_layers {
        let mut p = |t: &str| take(&format!("layers.{l}.{t}"));
        let hf = |t: &str| format!("model.layers.{l}.{t}.weight");
        out.push(renamed(p("attn_norm"), hf("input_layernorm")));
        let qkv = p("qkv");
        let mut q = rows(&qkv, hf("self_attn.q_proj"), 0, qw);
        let mut k = rows(&qkv, hf("self_attn.k_proj"), qw, qw + kvw);
        if config.rope_style == RopeStyle::AdjacentPairs {
            q.data = adjacent_to_half_split(&q.data, heads.n_heads, heads.head_dim, d);
            k.data = adjacent_to_half_split(&k.data, heads.n_kv_heads, heads.head_dim, d);
        }
        out.push(q);
        out.push(k);
        out.push(rows(&qkv, hf("self_attn.v_proj"), qw + kvw, qw + 2 * kvw));
        drop(qkv);
        out.push(renamed(p("o"), hf("self_attn.o_proj")));
        out.push(renamed(p("ffn_norm"), hf("post_attention_layernorm")));
        let gate_up = p("gate_up");
        out.push(rows(&gate_up, hf("mlp.gate_proj"), 0, hidden));
        out.push(rows(&gate_up, hf("mlp.up_proj"), hidden, 2 * hidden));
        drop(gate_up);
        out.push(renamed(p("down"), hf("mlp.down_proj")));
    }
    out.push(renamed(take("norm"), "model.norm.weight".into()));
    if !config.tie_embeddings {
        out.push(renamed(take("lm_head"), "lm_head.weight".into()));
    }
    out
}

/// Hugging Face Llama tensors → internal tensors, checking that every tensor is present with its
/// shape. The q/k rows are taken to be in Hugging Face's half-split order and are permuted back
/// for a `RopeStyle::AdjacentPairs` config (the inverse of [`to_hf`]). A tied config ignores a
/// `lm_head.weight` equal to the embedding and rejects a different one; an untied config
/// requires it.
pub fn from_hf(config: &ModelConfig, hf: Vec<NamedTensor>) -> Result<Vec<NamedTensor>> {
    config.validate()?;
    // Tensors move out of the map as they are used, so the conversion holds one copy of the
    // weights plus the layer being fused (not two copies).
    let mut by_name: HashMap<String, NamedTensor> = HashMap::with_capacity(hf.len());
    for t in hf {
        let name = t.name.clone();
        ensure!(by_name.insert(name.clone(), t).is_none(), "tensor {name} appears twice");
    }
    let mut shapes: HashMap<String, Vec<usize>> = hf_shapes(config).into_iter().collect();
    let (head_name, head_shape) = lm_head(config);
    shapes.entry(head_name).or_insert(head_shape);
    let d = config.d_model;
    let heads = config.heads();
    let mut take = |name: &str| take_tensor(&mut by_name, &shapes, name);
    // The data of each internal tensor, in param_specs' order.
    let mut data = vec![take("model.embed_tokens.weight")?];
    for l in 0..config.n_layers {
        let hf = |t: &str| format!("model.layers.{l}.{t}.weight");
        data.push(take(&hf("input_layernorm"))?);
        let mut qkv = Vec::with_capacity(heads.qkv_width() * d);
        let q = take(&hf("self_attn.q_proj"))?;
        let k = take(&hf("self_attn.k_proj"))?;
        if config.rope_style == RopeStyle::AdjacentPairs {
            qkv.extend(half_split_to_adjacent(&q, heads.n_heads, heads.head_dim, d));
            qkv.extend(half_split_to_adjacent(&k, heads.n_kv_heads, heads.head_dim, d));
        } else {
            qkv.extend_from_slice(&q);
            qkv.extend_from_slice(&k);
        }
        drop((q, k));
        qkv.extend_from_slice(&take(&hf("self_attn.v_proj"))?);
        data.push(qkv);
        data.push(take(&hf("self_attn.o_proj"))?);
        data.push(take(&hf("post_attention_layernorm"))?);
        let mut gate_up = take(&hf("mlp.gate_proj"))?;
        gate_up.extend_from_slice(&take(&hf("mlp.up_proj"))?);
        data.push(gate_up);
        data.push(take(&hf("mlp.down_proj"))?);
    }
    data.push(take("model.norm.weight")?);
    let head = if by_name.contains_key("lm_head.weight") || !config.tie_embeddings {
        let head = take_tensor(&mut by_name, &shapes, "lm_head.weight");
        Some(head.context("untied config needs lm_head.weight")?)
    } else {
        None
    };
    match head {
        Some(head) if config.tie_embeddings => ensure!(
            head == data[0],
            "config ties the embeddings but lm_head.weight differs from model.embed_tokens.weight"
        ),
        Some(head) => data.push(head),
        None => {}
    }
    if !by_name.is_empty() {
        let mut extra: Vec<&str> = by_name.keys().map(String::as_str).collect();
        extra.sort_unstable();
        bail!("unexpected tensors for this config: {}", extra.join(", "));
    }
    let specs = param_specs(config);
    debug_assert_eq!(specs.len(), data.len());
    Ok(specs
        .into_iter()
        .zip(data)
        .map(|(s, data)| NamedTensor { name: s.name, shape: s.shape, data })
        .collect())
}

/// Removes `name` from `tensors`, checking it has its shape in `shapes`.
fn take_tensor(
    tensors: &mut HashMap<String, NamedTensor>,
    shapes: &HashMap<String, Vec<usize>>,
    name: &str,
) -> Result<Vec<f32>> {
    let t = tensors.remove(name).with_context(|| format!("missing tensor {name}"))?;
    t.check_shape(&shapes[name])?;
    Ok(t.data)
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

/// Tensors a Hugging Face checkpoint may hold that carry no weights we need: old transformers
/// saved each layer's RoPE inverse frequencies, which follow from rope_theta.
fn ignorable_hf_tensor(name: &str) -> bool {
    name.ends_with(".rotary_emb.inv_freq")
}

/// Reads the Hugging Face tensors of `config` from a checkpoint directory: `model.safetensors`,
/// or the shards listed in `model.safetensors.index.json`. Each file is memory-mapped and its
/// tensors converted to f32 (F32, BF16 or F16 on disk). A tied config also returns
/// `lm_head.weight` when the files hold one (for [`from_hf`] to check it equals the embedding).
/// Every missing, misshapen or unexpected tensor, missing shard or malformed index is an error
/// naming the file and the tensor or field.
pub fn read_hf_weights(dir: &Path, config: &ModelConfig) -> Result<Vec<NamedTensor>> {
    let expected = hf_shapes(config);
    let tied_head: Option<(String, Vec<usize>)> = config.tie_embeddings.then(|| lm_head(config));
    let known: HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let allowed = |name: &str| {
        known.contains(name)
            || tied_head.as_ref().is_some_and(|(n, _)| n == name)
            || ignorable_hf_tensor(name)
    };
    let index_path = dir.join(INDEX_FILE);
    let single = dir.join(MODEL_FILE);
    if !index_path.exists() {
        ensure!(
            single.exists(),
            "{}: no {MODEL_FILE} and no {INDEX_FILE}: not a checkpoint directory",
            dir.display()
        );
        let mapped = map_file(&single)?;
        let st = parse_safetensors(&single, &mapped.map)?;
        let names = st.tensors.names();
        let mut unexpected: Vec<&str> = names.iter().copied().filter(|n| !allowed(n)).collect();
        unexpected.sort_unstable();
        if let Some(name) = unexpected.first() {
            bail!(
                "{}: unexpected tensor {name} ({} unexpected in all): does the config match the weights?",
                single.display(),
                unexpected.len()
            );
        }
        let mut out: Vec<NamedTensor> = expected
            .iter()
            .map(|(name, shape)| tensor_f32(&single, &mapped, &st, name, shape))
            .collect::<Result<_>>()?;
        if let Some((name, shape)) = &tied_head {
            if names.contains(&name.as_str()) {
                out.push(tensor_f32(&single, &mapped, &st, name, shape)?);
            }
        }
        return Ok(out);
    }

    // Sharded: the index maps each tensor name to the file that holds it.
    let text =
        std::fs::read_to_string(&index_path).with_context(|| format!("reading {}", index_path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", index_path.display()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{}: missing object field \"weight_map\"", index_path.display()))?;
    let mut by_file: BTreeMap<String, Vec<(String, Vec<usize>)>> = BTreeMap::new();
    for (name, file) in map {
        let file = file
            .as_str()
            .with_context(|| format!("{}: weight_map[{name:?}] is not a file name", index_path.display()))?;
        ensure!(
            !file.is_empty() && !file.contains('/') && !file.contains('\\') && file != ".." && file != ".",
            "{}: weight_map[{name:?}] = {file:?} is not a file name in the checkpoint directory",
            index_path.display()
        );
        ensure!(
            allowed(name),
            "{}: unexpected tensor {name} in weight_map: does the config match the weights?",
            index_path.display()
        );
        if ignorable_hf_tensor(name) {
            continue;
        }
        let shape = if known.contains(name.as_str()) {
            expected.iter().find(|(n, _)| n == name).map(|(_, s)| s.clone()).unwrap_or_default()
        } else {
            tied_head.as_ref().map(|(_, s)| s.clone()).unwrap_or_default()
        };
        by_file.entry(file.to_string()).or_default().push((name.clone(), shape));
    }
    for (name, _) in &expected {
        ensure!(map.contains_key(name), "{}: tensor {name} is missing from weight_map", index_path.display());
    }
    let mut read: HashMap<String, NamedTensor> = HashMap::with_capacity(map.len());
    for (file, tensors) in &by_file {
        let path = dir.join(file);
        ensure!(
            path.is_file(),
            "{}: shard {} (holding {}) is missing",
            index_path.display(),
            path.display(),
            tensors[0].0
        );
        let mapped = map_file(&path)?;
        let st = parse_safetensors(&path, &mapped.map)?;
        for (name, shape) in tensors {
            read.insert(name.clone(), tensor_f32(&path, &mapped, &st, name, shape)?);
        }
    }
    let mut out: Vec<NamedTensor> =
        expected.iter().map(|(name, _)| read.remove(name).expect("every expected tensor was read")).collect();
    if let Some((name, _)) = &tied_head {
        out.extend(read.remove(name));
    }
    Ok(out)
}

/// The internal tensors of a checkpoint directory (ours or a Hugging Face Llama) for `config`.
pub fn read_params(dir: &Path, config: &ModelConfig) -> Result<Vec<NamedTensor>> {
    let hf = read_hf_weights(dir, config)?;
    from_hf(config, hf).with_context(|| format!("converting the weights of {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::params::init_params;

    #[test]
    fn hf_shapes_match_the_converted_tensors() {
        for tie in [false, true] {
            let config = ModelConfig { tie_embeddings: tie, ..ModelConfig::tiny(300) };
            let hf = to_hf(&config, init_params(&config, 1));
            let expected: Vec<(String, Vec<usize>)> =
                hf.iter().map(|t| (t.name.clone(), t.shape.clone())).collect();
            assert_eq!(hf_shapes(&config), expected);
        }
    }
}
