//! The model: configuration, the internal parameter layout, and the forward/backward
//! orchestration written once against the backend's op trait.

pub mod config;
pub mod forward;
pub mod lora;
pub mod params;
pub mod recompute;

pub use config::ModelConfig;
pub use forward::{KvCache, Model};
pub use params::NamedTensor;
pub use recompute::{Recompute, RecomputeChoice};
