//! The model: configuration, parameter layout, and the forward/backward orchestration.

pub mod config;
pub mod forward;
pub mod params;

pub use config::ModelConfig;
pub use forward::{KvCache, Model};
pub use params::{from_hf, to_hf, NamedTensor};
