//! Model configuration.

use crate::backend::{HeadShape, Rope, RopeScaling, RopeStyle};
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A LLaMA-family decoder. Serialized as the `sft` section of a checkpoint's config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    /// Grouped KV heads; equal to `n_heads` for plain multi-head attention.
    pub n_kv_heads: usize,
    /// SwiGLU hidden size.
    pub ffn_hidden: usize,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f32,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f32,
    #[serde(default = "default_rope_style")]
    pub rope_style: RopeStyle,
    /// Frequency scaling for long contexts (Llama 3.1/3.2's `llama3`, or `linear`); none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    /// The output projection reuses the token embedding.
    #[serde(default)]
    pub tie_embeddings: bool,
    /// Dropout on the attention output and on the FFN output (training only).
    #[serde(default)]
    pub dropout: f32,
}

// Defaults for fields a hand-written config may leave out: SimpleLLaMA's values.
fn default_norm_eps() -> f32 {
    1e-5
}
fn default_rope_theta() -> f32 {
    10000.0
}
fn default_rope_style() -> RopeStyle {
    RopeStyle::AdjacentPairs
}
fn default_max_seq_len() -> usize {
    2048
}

/// Upper bounds that no real model comes near (Llama 3's vocabulary is 128256, its widest
/// FFN 53248, its longest context 131072): a config beyond them is a corrupt file.
const MAX_DIM: usize = 1 << 24;
const MAX_LAYERS: usize = 1 << 12;
const MAX_SEQ_LEN: usize = 1 << 24;
const MAX_PARAMS: usize = 1 << 42;

/// Names accepted by [`ModelConfig::preset`].
pub const PRESETS: &[&str] = &["simplellama-1.3b", "tiny"];

impl ModelConfig {
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    pub fn rope(&self) -> Rope {
        Rope { theta: self.rope_theta, style: self.rope_style, scaling: self.rope_scaling }
    }

    pub fn heads(&self) -> HeadShape {
        HeadShape { n_heads: self.n_heads, n_kv_heads: self.n_kv_heads, head_dim: self.head_dim() }
    }

    /// SimpleLLaMA's 1.3B model (DESIGN §1): 1,266,780,160 parameters.
    pub fn simplellama_1_3b() -> Self {
        ModelConfig {
            vocab_size: 8192,
            d_model: 2048,
            n_layers: 24,
            n_heads: 32,
            n_kv_heads: 32,
            ffn_hidden: 5632,
            norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_style: RopeStyle::AdjacentPairs,
            rope_scaling: None,
            max_seq_len: 2048,
            tie_embeddings: false,
            dropout: 0.1,
        }
    }

    /// A small model for tests and CPU demos: width 64, 2 layers, 4 heads sharing 2 KV heads,
    /// no dropout (so that runs are deterministic unless a test asks for it).
    pub fn tiny(vocab_size: usize) -> Self {
        ModelConfig {
            vocab_size,
            d_model: 64,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            // LLaMA's rule: 2/3 · 4d rounded up to a multiple (16 here).
            ffn_hidden: 176,
            norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_style: RopeStyle::AdjacentPairs,
            rope_scaling: None,
            max_seq_len: 512,
            tie_embeddings: false,
            dropout: 0.0,
        }
    }

    /// A named preset: "simplellama-1.3b" or "tiny" (vocab 8192, SimpleLLaMA's tokenizer size).
    pub fn preset(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().replace('_', "-").as_str() {
            "simplellama-1.3b" | "simplellama-1-3b" => Ok(Self::simplellama_1_3b()),
            "tiny" => Ok(Self::tiny(8192)),
            _ => bail!("unknown model preset {name:?}; known presets: {}", PRESETS.join(", ")),
        }
    }

    /// Reads a JSON config (the fields of this struct) and validates it.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading model config {}", path.display()))?;
        Self::parse(path, &text)
    }

    /// [`Self::load`] of `text`, read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let config: ModelConfig =
            serde_json::from_str(text).with_context(|| format!("parsing model config {}", path.display()))?;
        config.validate().with_context(|| format!("invalid model config {}", path.display()))?;
        Ok(config)
    }

    /// Checks that the sizes fit together, with an error naming the offending field. Every
    /// entry point that reads a config (a checkpoint's config.json, a JSON file, a preset) calls
    /// this before anything else uses the config: after it, `head_dim`, `n_params` and the memory
    /// plan cannot divide by zero or overflow.
    pub fn validate(&self) -> Result<()> {
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("ffn_hidden", self.ffn_hidden),
            ("max_seq_len", self.max_seq_len),
        ] {
            ensure!(value > 0, "{name} must be positive (got 0)");
        }
        // Far beyond any model this engine can hold, and small enough that the products below
        // (parameter counts, bytes per token, rows × width) stay far from usize::MAX.
        for (name, value, limit) in [
            ("vocab_size", self.vocab_size, MAX_DIM),
            ("d_model", self.d_model, MAX_DIM),
            ("ffn_hidden", self.ffn_hidden, MAX_DIM),
            ("n_layers", self.n_layers, MAX_LAYERS),
            ("max_seq_len", self.max_seq_len, MAX_SEQ_LEN),
        ] {
            ensure!(value <= limit, "{name} = {value} is beyond any usable model (at most {limit})");
        }
        ensure!(
            self.n_heads <= self.d_model && self.d_model.is_multiple_of(self.n_heads),
            "d_model ({}) must be divisible by n_heads ({})",
            self.d_model,
            self.n_heads
        );
        ensure!(
            self.n_kv_heads <= self.n_heads && self.n_heads.is_multiple_of(self.n_kv_heads),
            "n_heads ({}) must be divisible by n_kv_heads ({})",
            self.n_heads,
            self.n_kv_heads
        );
        ensure!(
            self.head_dim().is_multiple_of(2),
            "head_dim = d_model / n_heads = {} must be even for rotary embeddings",
            self.head_dim()
        );
        ensure!(
            self.vocab_size <= u32::MAX as usize,
            "vocab_size ({}) must fit token ids in u32",
            self.vocab_size
        );
        ensure!(
            self.norm_eps.is_finite() && self.norm_eps > 0.0,
            "norm_eps must be positive and finite (got {})",
            self.norm_eps
        );
        ensure!(
            self.rope_theta.is_finite() && self.rope_theta > 1.0,
            "rope_theta must be finite and greater than 1 (got {})",
            self.rope_theta
        );
        if let Some(scaling) = &self.rope_scaling {
            scaling.validate()?;
        }
        ensure!((0.0..1.0).contains(&self.dropout), "dropout must be in [0, 1) (got {})", self.dropout);
        ensure!(
            self.checked_n_params().is_some_and(|n| n <= MAX_PARAMS),
            "{} layers of width {} (ffn {}, vocabulary {}) are beyond any usable model (more than {MAX_PARAMS} parameters)",
            self.n_layers,
            self.d_model,
            self.ffn_hidden,
            self.vocab_size
        );
        Ok(())
    }

    /// Checks that this model can run with a tokenizer of `tokenizer.1` tokens (its file
    /// `tokenizer.0`; None when the command takes token ids) on rows of `max_seq_len` tokens.
    /// Every command that runs a model (train, eval, generate, chat, logits) asks this one
    /// question, so that none accepts what another refuses.
    pub fn check_usage(&self, tokenizer: Option<(&Path, usize)>, max_seq_len: usize) -> Result<()> {
        if let Some((path, vocab)) = tokenizer {
            ensure!(
                vocab <= self.vocab_size,
                "the tokenizer {} has {vocab} tokens but the model's vocabulary holds {}: \
                 its ids past {} have no embedding",
                path.display(),
                self.vocab_size,
                self.vocab_size - 1
            );
        }
        ensure!(max_seq_len > 0, "max_seq_len must be at least 1");
        ensure!(
            max_seq_len <= self.max_seq_len,
            "max_seq_len {max_seq_len} exceeds the model's max_seq_len {} (its context): give \
             --max-seq-len {} or less",
            self.max_seq_len,
            self.max_seq_len
        );
        Ok(())
    }

    /// [`Self::n_params`] without overflow: None when it does not fit in usize.
    fn checked_n_params(&self) -> Option<usize> {
        let d = self.d_model;
        let heads = self.heads();
        let qkv = heads.qkv_width().checked_mul(d)?;
        let o = d.checked_mul(heads.q_width())?;
        let ffn = d.checked_mul(self.ffn_hidden)?.checked_mul(3)?;
        let per_layer = (2 * d).checked_add(qkv)?.checked_add(o)?.checked_add(ffn)?;
        let embeddings =
            self.vocab_size.checked_mul(d)?.checked_mul(if self.tie_embeddings { 1 } else { 2 })?;
        embeddings.checked_add(d)?.checked_add(self.n_layers.checked_mul(per_layer)?)
    }

    /// Number of trainable parameters (the lm_head counted once when tied).
    pub fn n_params(&self) -> usize {
        let d = self.d_model;
        let heads = self.heads();
        let per_layer = 2 * d + heads.qkv_width() * d + d * heads.q_width() + 3 * d * self.ffn_hidden;
        let embeddings = self.vocab_size * d * if self.tie_embeddings { 1 } else { 2 };
        embeddings + d + self.n_layers * per_layer
    }
}
