//! What one micro-batch hands to the model.

/// A micro-batch of `rows × seq_len` token positions, flattened row-major (`n = rows·seq_len`).
///
/// Padded and packed batches share this form. `targets[i]` is the id that must follow
/// `inputs[i]`; `pad_id` marks positions that are not supervised (SimpleLLaMA's convention).
/// `cu_seqlens` splits the flat token axis into attention segments: a padded batch has one
/// segment per row, a packed batch one per example (and one for a row's padding tail), so
/// attention never crosses examples. `positions` restarts at 0 at each segment start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub rows: usize,
    pub seq_len: usize,
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub positions: Vec<u32>,
    /// `n_segments + 1` offsets into the flat token axis, from 0 to `rows·seq_len`.
    pub cu_seqlens: Vec<u32>,
    pub pad_id: u32,
}

impl Batch {
    /// Number of token positions, `rows · seq_len`.
    pub fn n_tokens(&self) -> usize {
        self.rows * self.seq_len
    }

    pub fn n_segments(&self) -> usize {
        self.cu_seqlens.len().saturating_sub(1)
    }

    /// Number of positions whose target is supervised.
    pub fn n_supervised(&self) -> usize {
        self.targets.iter().filter(|&&t| t != self.pad_id).count()
    }
}
