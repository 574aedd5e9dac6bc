//! Work buffers that some ops need besides their arguments (partial sums, compacted rows,
//! descriptor arrays). Each is allocated the first time it is needed and grown only when a
//! larger size is asked for, so a training step at a steady shape allocates nothing.

use anyhow::{Context, Result};
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use half::bf16;
use std::sync::Arc;

#[derive(Default)]
pub(super) struct Scratch {
    /// rmsnorm_backward: per-chunk weight-gradient partials.
    pub rms_partial: Option<CudaSlice<f32>>,
    /// attention_backward: D = rowsum(dO ∘ O), `[n_heads, n]`.
    pub attn_d: Option<CudaSlice<f32>>,
    /// flash attention: the tile table (count, then (first row, segment start, segment end) per
    /// tile) and, when it was prepared for a batch, which segments it describes.
    pub attn_tiles: Option<CudaSlice<i32>>,
    pub attn_tiles_for: Option<super::flash_attention::TableKey>,
    /// flash attention backward: the fp32 dQ accumulator `[n, n_heads·hd]` and one semaphore
    /// per (q head, row) `[n_heads, n]`, all zero between launches.
    pub attn_dq_acc: Option<CudaSlice<f32>>,
    pub attn_dq_sem: Option<CudaSlice<u32>>,
    /// sum_squares: one partial per block per buffer.
    pub sumsq_partial: Option<CudaSlice<f32>>,
    /// lm_head_cross_entropy: one chunk's work buffers (the supervised rows, their targets and
    /// the row losses are the caller's buffers).
    pub ce_x: Option<CudaSlice<bf16>>,
    pub ce_dx: Option<CudaSlice<bf16>>,
    pub ce_logits: Option<CudaSlice<f32>>,
    pub ce_dlogits: Option<CudaSlice<bf16>>,
    /// rope_table: the inverse frequencies of (rope, head_dim), uploaded once.
    pub rope_freqs: Option<(crate::backend::Rope, usize, CudaSlice<f32>)>,
    /// adamw: one descriptor per tensor.
    pub adam_descs: Option<CudaSlice<super::launch::AdamTensor>>,
    /// adamw with bf16 moments: one descriptor per tensor.
    pub adam_descs_bf16: Option<CudaSlice<super::launch::AdamTensorBf16>>,
}

/// The buffer in `slot`, with room for at least `len` elements (at least 1).
pub(super) fn ensure<'a, T: DeviceRepr + ValidAsZeroBits>(
    slot: &'a mut Option<CudaSlice<T>>,
    len: usize,
    stream: &Arc<CudaStream>,
    what: &str,
) -> Result<&'a mut CudaSlice<T>> {
    let len = len.max(1);
    if slot.as_ref().is_none_or(|s| s.len() < len) {
        *slot = None;
        *slot = Some(
            stream.alloc_zeros::<T>(len).with_context(|| format!("allocating {what} ({len} elements)"))?,
        );
    }
    Ok(slot.as_mut().expect("just filled"))
}
