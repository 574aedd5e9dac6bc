//! Helpers shared by the integration tests, one file per concern: running the `sft` binary
//! (`cli`), chat data and tokenizers (`data`), opening the GPU (`gpu`), tiny models, hand-built
//! batches and the independent f64 backends (`model`), prepared data and training configs
//! (`train`). Each test binary uses part of them.
#![allow(dead_code)]

pub mod cli;
pub mod data;
pub mod gpu;
pub mod model;
pub mod train;
