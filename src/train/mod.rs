//! Training: AdamW and its schedule, the loop, evaluation, the run's state, logs and plots.
//!
//! Start with [`trainer`]: it holds the whole optimizer step.
pub mod cli;
pub mod config;
pub mod interrupt;
pub mod log;
pub mod plot;
pub mod progress;
pub mod schedule;
pub mod state;
pub mod trainer;

pub use config::TrainConfig;
pub use schedule::Schedule;
pub use state::TrainerState;
pub use trainer::{eval_loss, eval_loss_ranks, train_on, train_ranks, train_with, Sampler, TrainReport};
