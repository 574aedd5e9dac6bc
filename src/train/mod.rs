//! Training: AdamW and its schedule, the loop, evaluation, checkpoints, logs.
//!
//! Start with [`trainer`]: it holds the whole optimizer step.
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod import;
pub mod log;
pub mod plot;
pub mod schedule;
pub mod trainer;

pub use checkpoint::{load_model, TrainerState};
pub use config::TrainConfig;
pub use schedule::Schedule;
pub use trainer::{eval_loss, train, train_on, train_with, TrainReport};
