//! Model configuration.

use crate::backend::{HeadShape, RopeStyle};
use serde::{Deserialize, Serialize};

/// A LLaMA-family decoder. Serialized as the `sft` section of a checkpoint's config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    /// Grouped KV heads; equal to `n_heads` for plain multi-head attention.
    pub n_kv_heads: usize,
    /// SwiGLU hidden size.
    pub ffn_hidden: usize,
    pub norm_eps: f32,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    pub max_seq_len: usize,
    /// The output projection reuses the token embedding.
    pub tie_embeddings: bool,
    /// Dropout on the attention output and on the FFN output (training only).
    pub dropout: f32,
}

impl ModelConfig {
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    pub fn heads(&self) -> HeadShape {
        HeadShape { n_heads: self.n_heads, n_kv_heads: self.n_kv_heads, head_dim: self.head_dim() }
    }
}
