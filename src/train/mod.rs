//! Training: AdamW and its schedule, the loop, evaluation, checkpoints, logs.
