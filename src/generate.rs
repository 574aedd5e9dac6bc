//! Sampling with a KV cache: `sft generate` and `sft chat`.
