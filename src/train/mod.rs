//! Training: AdamW and its schedule, the loop, evaluation, checkpoints, logs.
pub mod checkpoint;
pub mod config;
pub mod log;
pub mod schedule;

pub use checkpoint::{load_model, TrainerState};
pub use config::TrainConfig;
pub use schedule::Schedule;
