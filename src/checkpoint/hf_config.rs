//! `config.json`: written with the fields Hugging Face's `LlamaForCausalLM` reads plus our exact
//! [`ModelConfig`] under `"sft"`; read from ours or from a Hugging Face Llama's.

use super::CONFIG_FILE;
use crate::backend::{Rope, RopeScaling, RopeStyle};
use crate::data::tokenizer::leading_special;
use crate::model::config::ModelConfig;
use anyhow::{bail, ensure, Context, Result};
use std::path::Path;

/// `config.json`: the fields Hugging Face's `LlamaForCausalLM` reads, and ours under `"sft"`.
pub fn hf_config_json(config: &ModelConfig) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim(),
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": false,
        "mlp_bias": false,
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
        "sft": config,
        QK_ORDER_FIELD: QK_ORDER_HF,
    })
}

/// Marks the files whose q/k rows are in Hugging Face's order whatever the RoPE style. Builds
/// before it wrote adjacent-pairs q/k rows unpermuted; without the mark such a file would load
/// as a different model, so it is refused instead.
pub const QK_ORDER_FIELD: &str = "sft_qk_order";
pub const QK_ORDER_HF: &str = "hf";

/// Reads a checkpoint's model config: our `"sft"` section when present, else the Hugging Face
/// Llama fields (a checkpoint from elsewhere: half-split RoPE, no dropout). Llama variants this
/// engine cannot run (length-dependent RoPE scaling, biases, a `head_dim` other than hidden_size / heads, another
/// activation) are errors naming the file and the field.
pub fn read_model_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    config_of_json(&path, &json)
}

/// Whether a parsed JSON file is a checkpoint's `config.json` (ours, or a Hugging Face model's)
/// rather than a bare [`ModelConfig`].
pub fn is_checkpoint_config(json: &serde_json::Value) -> bool {
    ["sft", "hidden_size", "model_type"].iter().any(|k| json.get(k).is_some())
}

/// [`read_model_config`] of `json`, parsed from the `config.json` at `path` (whatever its name).
pub fn config_of_json(path: &Path, json: &serde_json::Value) -> Result<ModelConfig> {
    if let Some(sft) = json.get("sft") {
        let config: ModelConfig = serde_json::from_value(sft.clone())
            .with_context(|| format!("{}: bad \"sft\" model config", path.display()))?;
        config.validate().with_context(|| format!("{}: invalid \"sft\" model config", path.display()))?;
        let marked = json.get(QK_ORDER_FIELD).and_then(|v| v.as_str()) == Some(QK_ORDER_HF);
        ensure!(
            marked || config.rope_style != RopeStyle::AdjacentPairs,
            "{}: an adjacent-pairs checkpoint without \"{QK_ORDER_FIELD}\": \"{QK_ORDER_HF}\" was written by an \
             older sft build, whose q/k rows are not in Hugging Face's order; re-create it (sft init, or \
             scripts/convert_simplellama.py), or permute q_proj/k_proj per head (docs/checkpoints.md) and add the field",
            path.display()
        );
        check_hf_fields_agree(json, &config).with_context(|| format!("{}", path.display()))?;
        return Ok(config);
    }
    hf_model_config(json).with_context(|| format!("{}: unusable model config", path.display()))
}

/// The Hugging Face fields beside our `"sft"` section must describe the same model: transformers
/// reads them, we read `"sft"`, so a file where they disagree (an edit, a bad merge) is two
/// models at once. The RoPE style (our rows are stored in Hugging Face's order) and dropout are
/// ours alone. A file with none of the Hugging Face fields has nothing to disagree with.
fn check_hf_fields_agree(json: &serde_json::Value, sft: &ModelConfig) -> Result<()> {
    if json.get("hidden_size").is_none() {
        return Ok(());
    }
    let mut hf_only = json.clone();
    if let Some(o) = hf_only.as_object_mut() {
        o.remove("sft");
    }
    let hf = hf_model_config(&hf_only).context("the Hugging Face fields beside \"sft\" are unusable")?;
    const WHY: &str = "transformers would load another model than sft; fix the file (or re-export it)";
    macro_rules! agree {
        ($($field:ident as $hf_name:literal),*) => {$(
            ensure!(
                hf.$field == sft.$field,
                "field {:?} = {} disagrees with \"sft\".{} = {}: {WHY}",
                $hf_name,
                hf.$field,
                stringify!($field),
                sft.$field
            );
        )*};
    }
    agree!(vocab_size as "vocab_size", d_model as "hidden_size", n_layers as "num_hidden_layers");
    agree!(n_heads as "num_attention_heads", n_kv_heads as "num_key_value_heads", ffn_hidden as "intermediate_size");
    agree!(max_seq_len as "max_position_embeddings", tie_embeddings as "tie_word_embeddings");
    // The floats went through JSON as f32 on one side: equal to a relative 1e-6.
    for (hf_name, name, a, b) in [
        ("rms_norm_eps", "norm_eps", hf.norm_eps as f64, sft.norm_eps as f64),
        ("rope_theta", "rope_theta", hf.rope_theta as f64, sft.rope_theta as f64),
    ] {
        ensure!(
            (a - b).abs() <= 1e-6 * a.abs().max(b.abs()),
            "field {hf_name:?} = {a} disagrees with \"sft\".{name} = {b}: {WHY}"
        );
    }
    ensure!(
        hf.rope_scaling == sft.rope_scaling,
        "field \"rope_scaling\" = {:?} disagrees with \"sft\".rope_scaling = {:?}: {WHY}",
        hf.rope_scaling,
        sft.rope_scaling
    );
    Ok(())
}

/// A [`ModelConfig`] from the fields of a transformers `LlamaConfig`.
fn hf_model_config(json: &serde_json::Value) -> Result<ModelConfig> {
    let present = |name: &str| json.get(name).filter(|v| !v.is_null());
    let field = |name: &str| -> Result<usize> {
        let v = present(name).with_context(|| format!("missing field {name:?}"))?;
        v.as_u64()
            .map(|v| v as usize)
            .with_context(|| format!("field {name:?} = {v} is not a non-negative integer"))
    };
    let float = |name: &str, default: f64| -> Result<f64> {
        match present(name) {
            None => Ok(default),
            Some(v) => v.as_f64().with_context(|| format!("field {name:?} = {v} is not a number")),
        }
    };
    let flag = |name: &str| -> Result<bool> {
        match present(name) {
            None => Ok(false),
            Some(v) => v.as_bool().with_context(|| format!("field {name:?} = {v} is not a boolean")),
        }
    };
    if let Some(t) = present("model_type") {
        ensure!(t == "llama", "field \"model_type\" is {t}; only \"llama\" (LlamaForCausalLM) is supported");
    }
    for name in ["attention_bias", "mlp_bias"] {
        ensure!(!flag(name)?, "field {name:?} is true: biased projections are not supported");
    }
    if let Some(act) = present("hidden_act") {
        ensure!(act == "silu", "field \"hidden_act\" is {act}; only \"silu\" (SwiGLU) is supported");
    }
    let rope = hf_rope(json)?;
    let n_heads = field("num_attention_heads")?;
    let d_model = field("hidden_size")?;
    ensure!(n_heads > 0, "field \"num_attention_heads\" must be positive");
    if present("head_dim").is_some() {
        let head_dim = field("head_dim")?;
        ensure!(
            head_dim.checked_mul(n_heads) == Some(d_model),
            "field \"head_dim\" = {head_dim} differs from hidden_size / num_attention_heads = {d_model} / \
             {n_heads}: not supported"
        );
    }
    let config = ModelConfig {
        vocab_size: field("vocab_size")?,
        d_model,
        n_layers: field("num_hidden_layers")?,
        n_heads,
        n_kv_heads: if present("num_key_value_heads").is_some() {
            field("num_key_value_heads")?
        } else {
            n_heads
        },
        ffn_hidden: field("intermediate_size")?,
        // transformers' LlamaConfig defaults.
        norm_eps: float("rms_norm_eps", 1e-6)? as f32,
        rope_theta: rope.theta,
        rope_style: RopeStyle::HalfSplit,
        rope_scaling: rope.scaling,
        max_seq_len: if present("max_position_embeddings").is_some() {
            field("max_position_embeddings")?
        } else {
            2048
        },
        tie_embeddings: flag("tie_word_embeddings")?,
        dropout: 0.0,
    };
    config.validate()?;
    Ok(config)
}

/// RoPE base and scaling from a Llama config.json: transformers 4 writes `rope_theta` and
/// `rope_scaling` at the top level, transformers 5 a `rope_parameters` dict holding both (and
/// reads either). Types whose frequencies depend on the running length (dynamic, yarn,
/// longrope) or that rotate part of a head are refused.
fn hf_rope(json: &serde_json::Value) -> Result<Rope> {
    let present = |v: &serde_json::Value, name: &str| v.get(name).filter(|v| !v.is_null()).cloned();
    let number = |v: &serde_json::Value, name: &str, default: Option<f64>| -> Result<f64> {
        match v.get(name).filter(|v| !v.is_null()) {
            None => default.with_context(|| format!("missing field {name:?}")),
            Some(x) => x.as_f64().with_context(|| format!("field {name:?} = {x} is not a number")),
        }
    };
    let (params, section) = match (present(json, "rope_parameters"), present(json, "rope_scaling")) {
        (Some(p), _) => (p, "rope_parameters"),
        (None, Some(p)) => (p, "rope_scaling"),
        (None, None) => (serde_json::json!({}), "rope_scaling"),
    };
    ensure!(params.is_object(), "field {section:?} = {params} is not an object");
    let top_theta = number(json, "rope_theta", Some(10000.0))?;
    let theta = number(&params, "rope_theta", Some(top_theta)).with_context(|| format!("in {section:?}"))?;
    for v in [json, &params] {
        let partial = number(v, "partial_rotary_factor", Some(1.0))?;
        ensure!(
            partial == 1.0,
            "field \"partial_rotary_factor\" = {partial}: partial rotary embeddings are not supported"
        );
    }
    let kind = match params.get("rope_type").or_else(|| params.get("type")) {
        None => "default".to_string(),
        Some(k) => k
            .as_str()
            .with_context(|| format!("field {section:?}.rope_type = {k} is not a string"))?
            .to_string(),
    };
    let in_section = |name: &str, default: Option<f64>| -> Result<f64> {
        number(&params, name, default).with_context(|| format!("in {section:?} (rope_type {kind:?})"))
    };
    let scaling = match kind.as_str() {
        "default" => None,
        "linear" => Some(RopeScaling::Linear { factor: in_section("factor", None)? as f32 }),
        "llama3" => {
            // transformers falls back to these when original_max_position_embeddings is absent.
            let fallback = number(json, "original_max_position_embeddings", None)
                .or_else(|_| number(json, "max_position_embeddings", None))
                .ok();
            let original = in_section("original_max_position_embeddings", fallback)?;
            ensure!(
                original >= 1.0 && original.fract() == 0.0,
                "field {section:?}.original_max_position_embeddings = {original} is not a positive integer"
            );
            Some(RopeScaling::Llama3 {
                factor: in_section("factor", None)? as f32,
                low_freq_factor: in_section("low_freq_factor", None)? as f32,
                high_freq_factor: in_section("high_freq_factor", None)? as f32,
                original_max_position_embeddings: original as usize,
            })
        }
        other => bail!(
            "field {section:?} has rope_type {other:?}, which is not supported (supported: default, linear, llama3; \
             dynamic, yarn and longrope change the frequencies with the sequence length)"
        ),
    };
    Ok(Rope { theta: theta as f32, style: RopeStyle::HalfSplit, scaling })
}

/// `bos/eos/pad_token_id` for config.json from a tokenizer.json's added tokens: `<PAD>` pads,
/// `<EOA>` ends a reply (what generation stops at in our chat format), the token the
/// post-processor starts texts with, else `<SOS>` when present.
pub(super) fn token_ids_from_tokenizer_json(text: &str) -> serde_json::Map<String, serde_json::Value> {
    let mut out = serde_json::Map::new();
    let Ok(json) = serde_json::from_str::<serde_json::Value>(text) else { return out };
    let Some(added) = json.get("added_tokens").and_then(|a| a.as_array()) else { return out };
    let id_of = |content: &str| {
        added
            .iter()
            .find(|t| t.get("content").and_then(|c| c.as_str()) == Some(content))
            .and_then(|t| t.get("id"))
    };
    for (field, token) in [("bos_token_id", "<SOS>"), ("eos_token_id", "<EOA>"), ("pad_token_id", "<PAD>")] {
        if let Some(id) = id_of(token) {
            out.insert(field.to_string(), id.clone());
        }
    }
    // A tokenizer that starts texts with its own BOS (Llama 3's <|begin_of_text|>): that one.
    let bos = crate::data::tokenizer::parse_tokenizer_json(text.as_bytes())
        .ok()
        .and_then(|tok| leading_special(&tok));
    if let Some(bos) = bos {
        out.insert("bos_token_id".to_string(), bos.into());
    }
    out
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_json_has_the_hf_fields_and_ours() {
        let dir = tempfile::tempdir().unwrap();
        let config = ModelConfig::tiny(300);
        let json = hf_config_json(&config);
        assert_eq!(json["architectures"][0], "LlamaForCausalLM");
        assert_eq!(json["num_key_value_heads"], 2);
        std::fs::write(dir.path().join(CONFIG_FILE), json.to_string()).unwrap();
        assert_eq!(read_model_config(dir.path()).unwrap(), config);
        // Without our section, the Hugging Face fields describe the model.
        let mut hf_only = json.clone();
        hf_only.as_object_mut().unwrap().remove("sft");
        std::fs::write(dir.path().join(CONFIG_FILE), hf_only.to_string()).unwrap();
        let from_hf_fields = read_model_config(dir.path()).unwrap();
        assert_eq!(from_hf_fields, ModelConfig { rope_style: RopeStyle::HalfSplit, dropout: 0.0, ..config });
        // Both sections present but describing two models: refused, naming the field.
        let edits: [(&str, serde_json::Value); 5] = [
            ("num_hidden_layers", 1.into()),
            ("hidden_size", 32.into()),
            ("rope_theta", 500000.0.into()),
            ("max_position_embeddings", 8.into()),
            ("rope_scaling", serde_json::json!({"rope_type": "linear", "factor": 2.0})),
        ];
        for (field, value) in edits {
            let mut two = json.clone();
            two[field] = value;
            std::fs::write(dir.path().join(CONFIG_FILE), two.to_string()).unwrap();
            let err = format!("{:#}", read_model_config(dir.path()).unwrap_err());
            let named = err.contains("disagrees with \"sft\"") || err.contains("beside \"sft\" are unusable");
            assert!(err.contains(field) && named, "{field}: {err}");
        }
        // Our section alone (no Hugging Face fields) has nothing to disagree with.
        let sft_only = serde_json::json!({"sft": config, QK_ORDER_FIELD: QK_ORDER_HF});
        std::fs::write(dir.path().join(CONFIG_FILE), sft_only.to_string()).unwrap();
        assert_eq!(read_model_config(dir.path()).unwrap(), config);
    }
}
