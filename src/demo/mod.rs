//! The embedded default: a generated chat task set, a tiny model, and `sft demo`.
