//! What a training run saves beside the weights to resume where it stopped.

use crate::checkpoint;
use crate::data::LoaderState;
use crate::train::config::TrainConfig;
use crate::train::schedule::Schedule;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Where a training run stands, saved beside the weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: u64,
    pub epoch: u64,
    /// The data position of the next micro-batch.
    pub loader: LoaderState,
    /// Non-pad input tokens and supervised targets processed so far.
    pub tokens_seen: u64,
    pub supervised_tokens_seen: u64,
    /// Micro-batches skipped because none of their targets was supervised.
    pub skipped_batches: u64,
    /// Wall-clock seconds of training so far (the log's time column continues from here).
    pub elapsed_s: f64,
    pub schedule: Schedule,
    /// The learning rate of the last step.
    pub lr: f64,
    pub last_train_loss: Option<f64>,
    pub last_val_loss: Option<f64>,
    pub config: TrainConfig,
}

impl TrainerState {
    /// The state of a run that has taken no step yet.
    pub fn fresh(loader: LoaderState, schedule: Schedule, config: TrainConfig) -> TrainerState {
        TrainerState {
            step: 0,
            epoch: 0,
            loader,
            tokens_seen: 0,
            supervised_tokens_seen: 0,
            skipped_batches: 0,
            elapsed_s: 0.0,
            schedule,
            lr: 0.0,
            last_train_loss: None,
            last_val_loss: None,
            config,
        }
    }

    /// The state saved in the checkpoint `dir` (its `trainer_state.json`).
    pub fn load(dir: &Path) -> Result<TrainerState> {
        let state: TrainerState = checkpoint::load_run_state(dir)?;
        // A `step-N/` directory holds step N's weights and moments: a state claiming another step
        // would resume the schedule, the data position and the log elsewhere than the weights.
        let named = dir.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("step-"));
        if let Some(n) = named.and_then(|n| n.parse::<u64>().ok()) {
            anyhow::ensure!(
                state.step == n,
                "{}: field \"step\" is {}, but the directory holds step {n}'s checkpoint",
                dir.join(checkpoint::TRAINER_STATE_FILE).display(),
                state.step
            );
        }
        Ok(state)
    }
}
