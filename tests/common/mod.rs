//! Helpers shared by the integration tests: the `sft` binary runner (`cli`), chat data (`data`),
//! the GPU (`gpu`), tiny models and batches (`model`), prepared data and training configs (`train`),
//! chat-template tokenizers and model directories (`templates`).
#![allow(dead_code)]

pub mod cli;
pub mod data;
pub mod gpu;
pub mod model;
pub mod templates;
pub mod train;
