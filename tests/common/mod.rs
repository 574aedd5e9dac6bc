//! Helpers shared by the integration tests: the `sft` binary runner (`cli`), chat data (`data`),
//! the fuzz tests' budget, seed and JSON edits (`fuzz`), the GPU (`gpu`), tiny models and batches
//! (`model`), prepared data, training configs and run copies (`train`), chat-template tokenizers
//! and model directories (`templates`).
#![allow(dead_code)]

pub mod cli;
pub mod data;
pub mod fuzz;
pub mod gpu;
pub mod model;
pub mod templates;
pub mod train;
