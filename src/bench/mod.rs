//! The `sft bench*` commands: the training step (`train`), causal attention (`attention`), the
//! cross-entropy and AdamW kernels next to a device copy (`kernels`), and their shared upload.

pub mod attention;
pub mod kernels;
pub mod train;

use crate::backend::{Backend, Precision};
use anyhow::Result;

/// A new buffer of `precision` on `backend` holding `data`.
pub fn upload<B: Backend>(backend: &B, data: &[f32], precision: Precision) -> Result<B::Buf> {
    let mut buf = backend.zeros(data.len(), precision)?;
    backend.write(&mut buf, data)?;
    Ok(buf)
}

/// A new id buffer on `backend` holding `data`.
pub fn upload_ids<B: Backend>(backend: &B, data: &[u32]) -> Result<B::Ids> {
    let mut ids = backend.zeros_ids(data.len())?;
    backend.write_ids(&mut ids, data)?;
    Ok(ids)
}
