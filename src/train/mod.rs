//! Training: AdamW and its schedule, the loop, evaluation, checkpoints, logs.
pub mod log;
pub mod schedule;
