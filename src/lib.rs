//! `sft`: supervised fine-tuning of LLaMA-style models.
//!
//! - [`data`]: chat files → prompt format → tokens → memory-mapped shards → batches.
//! - [`model`]: configuration, parameters, and the forward/backward written once against
//!   [`backend::Backend`].
//! - [`backend`]: the op set, its CPU reference, and (with a GPU) the CUDA kernels.
//! - [`checkpoint`]: safetensors I/O, Hugging Face names/config/import, atomic run checkpoints.
//! - [`train`]: AdamW, schedule, the training loop, evaluation, logs.
//! - [`generate`]: sampling with a KV cache; `sft generate` and `sft chat`.
//! - [`dist`]: data parallelism: launcher environment, collectives (MPI), per-rank data shares.
//! - [`demo`]: the embedded default, `sft demo`.
//! - [`bench`](mod@bench): `sft bench` (the training step), `sft bench-attention`, `sft bench-kernels`.

pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod checksum;
pub mod console;
pub mod data;
pub mod demo;
pub mod dist;
pub mod generate;
pub mod kernels;
pub mod lock;
pub mod lora;
pub mod model;
pub mod panics;
pub mod paths;
pub mod plan;
pub mod rng;
pub mod train;
