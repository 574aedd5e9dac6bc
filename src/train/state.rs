//! What a training run saves beside the weights to resume where it stopped.

use crate::checkpoint;
use crate::data::LoaderState;
use crate::train::config::TrainConfig;
use crate::train::schedule::Schedule;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Where a training run stands, saved beside the weights. An unknown field is refused: a renamed
/// `state_checksum` or `checkpoint_files` would otherwise turn its check off without a word.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// The generator state that states saved before 36ff8c3 carry and nothing reads: accepted
    /// so that they still resume, never written.
    #[serde(default, skip_serializing, rename = "rng")]
    legacy_rng: Option<serde::de::IgnoredAny>,
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
            legacy_rng: None,
        }
    }

    /// The state saved in the checkpoint `dir` (its `trainer_state.json`).
    pub fn load(dir: &Path) -> Result<TrainerState> {
        let state: TrainerState = checkpoint::load_run_state(dir)?;
        let path = dir.join(checkpoint::TRAINER_STATE_FILE);
        // A `step-N/` directory holds step N's weights and moments: a state claiming another step
        // would resume the schedule, the data position and the log elsewhere than the weights.
        let named = dir.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("step-"));
        if let Some(n) = named.and_then(|n| n.parse::<u64>().ok()) {
            anyhow::ensure!(
                state.step == n,
                "{}: field \"step\" is {}, but the directory holds step {n}'s checkpoint",
                path.display(),
                state.step
            );
        }
        // The counters go on from here: one no run reaches would wrap, and log a wrong count.
        for (field, count) in [
            ("tokens_seen", state.tokens_seen),
            ("supervised_tokens_seen", state.supervised_tokens_seen),
            ("skipped_batches", state.skipped_batches),
        ] {
            anyhow::ensure!(
                count <= MAX_COUNT,
                "{}: field \"{field}\" is {count}, more than any run counts (2^53): a damaged state",
                path.display()
            );
        }
        Ok(state)
    }
}

/// The most tokens or batches a saved state may have counted: 2^53, 140,000 years of a
/// million tokens a second, and the last count an f64 holds exactly.
const MAX_COUNT: u64 = 1 << 53;

#[cfg(test)]
mod tests {
    use super::*;

    fn saved_state(out: &Path) -> (std::path::PathBuf, String) {
        let schedule = Schedule { max_lr: 3e-4, min_lr: 3e-5, warmup_steps: 2, total_steps: 10 };
        let loader = LoaderState { epoch: 0, batch_in_epoch: 3 };
        let state = TrainerState { step: 3, ..TrainerState::fresh(loader, schedule, TrainConfig::default()) };
        let dir = checkpoint::save_with(out, 3, &state, 0, |_| Ok(())).unwrap();
        assert_eq!(TrainerState::load(&dir).unwrap(), state);
        let text = std::fs::read_to_string(dir.join(checkpoint::TRAINER_STATE_FILE)).unwrap();
        (dir, text)
    }

    #[test]
    fn a_renamed_checksum_field_is_refused_not_skipped() {
        let out = tempfile::tempdir().unwrap();
        let (dir, text) = saved_state(out.path());
        let path = dir.join(checkpoint::TRAINER_STATE_FILE);
        // The checksum's key renamed and the data position edited: before the fields were
        // strict, the check was skipped and the run resumed one batch later without a word.
        let edited = text.replace("\"state_checksum\"", "\"state_checksum_\"").replacen(
            "\"batch_in_epoch\": 3",
            "\"batch_in_epoch\": 4",
            1,
        );
        std::fs::write(&path, edited).unwrap();
        let err = format!("{:#}", TrainerState::load(&dir).unwrap_err());
        assert!(
            err.contains(checkpoint::TRAINER_STATE_FILE) && err.contains("unknown field `state_checksum_`"),
            "{err}"
        );
        // A field unknown inside the data position is refused the same way.
        let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
        json.as_object_mut().unwrap().remove("state_checksum");
        json["loader"]["batch"] = 4.into();
        std::fs::write(&path, json.to_string()).unwrap();
        let err = format!("{:#}", TrainerState::load(&dir).unwrap_err());
        assert!(err.contains("unknown field `batch`"), "{err}");
    }

    #[test]
    fn a_state_saved_with_the_old_rng_field_still_resumes() {
        let out = tempfile::tempdir().unwrap();
        let (dir, text) = saved_state(out.path());
        assert!(!text.contains("\"rng\""), "{text}");
        let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
        json.as_object_mut().unwrap().remove("state_checksum");
        json["rng"] = serde_json::json!({"state": [1, 2, 3, 4]});
        std::fs::write(dir.join(checkpoint::TRAINER_STATE_FILE), json.to_string()).unwrap();
        let state = TrainerState::load(&dir).unwrap();
        assert_eq!((state.step, state.loader.batch_in_epoch), (3, 3));
    }

    #[test]
    fn a_count_no_run_reaches_is_refused() {
        let out = tempfile::tempdir().unwrap();
        let (dir, text) = saved_state(out.path());
        let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
        json.as_object_mut().unwrap().remove("state_checksum");
        json["tokens_seen"] = u64::MAX.into();
        std::fs::write(dir.join(checkpoint::TRAINER_STATE_FILE), json.to_string()).unwrap();
        let err = format!("{:#}", TrainerState::load(&dir).unwrap_err());
        assert!(
            err.contains(checkpoint::TRAINER_STATE_FILE)
                && err.contains("\"tokens_seen\" is 18446744073709551615"),
            "{err}"
        );
    }
}
