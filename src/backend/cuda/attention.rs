//! Causal attention over packed segments: the tensor-core kernels (kernels/flash_attention.cu,
//! launched from flash_attention.rs) where the device and head_dim allow, the scalar flash-style kernels
//! (kernels/attention.cu) otherwise or when forced (`SFT_ATTENTION=scalar`). Decode is scalar.

use anyhow::{bail, Result};
use cudarc::driver::{CudaSlice, LaunchConfig};

use super::launch::{self, grid_stride, int, launch_for_head_dim, ATT_WARPS, BLOCK};
use super::scratch::ensure;
use super::{bf16_mut, bf16_of, f32_mut, f32_of, ids_of, CudaBackend, CudaBuf};
use crate::backend::{HeadShape, RopeGrad};

/// Checks the head shape and returns its head_dim, which has kernels.
fn head_variant(heads: HeadShape) -> Result<usize> {
    if heads.n_kv_heads == 0 || !heads.n_heads.is_multiple_of(heads.n_kv_heads) {
        bail!("attention: n_heads {} is not a multiple of n_kv_heads {}", heads.n_heads, heads.n_kv_heads);
    }
    match heads.head_dim {
        32 | 64 | 128 => Ok(heads.head_dim),
        hd => bail!("attention: head_dim {hd} has no CUDA kernel (32, 64 and 128 are supported)"),
    }
}

/// Grid of `ATT_WARPS` rows per block along x, one head per y.
pub fn rows_by_heads(rows: usize, heads: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(ATT_WARPS) as u32, heads as u32, 1),
        block_dim: ((ATT_WARPS * 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn check_segments(cu_seqlens: &CudaSlice<u32>, n_segments: usize) -> Result<()> {
    if n_segments == 0 {
        bail!("attention: no segments (cu_seqlens needs n_segments + 1 offsets)");
    }
    ids_of(cu_seqlens, n_segments + 1, "attention cu_seqlens")?;
    Ok(())
}

impl CudaBackend {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_forward(
        &self,
        out: &mut CudaBuf,
        lse: &mut CudaBuf,
        qkv: &CudaBuf,
        cu_seqlens: &CudaSlice<u32>,
        n_segments: usize,
        n: usize,
        heads: HeadShape,
    ) -> Result<()> {
        let hd = head_variant(heads)?;
        check_segments(cu_seqlens, n_segments)?;
        let out = bf16_mut(out, n * heads.q_width(), "attention_forward out")?;
        let lse = f32_mut(lse, heads.n_heads * n, "attention_forward lse")?;
        let qkv = bf16_of(qkv, n * heads.qkv_width(), "attention_forward qkv")?;
        if n == 0 {
            return Ok(());
        }
        if let Some(cfg) = self.flash_config(heads) {
            return self.flash_forward(cfg, out, lse, qkv, cu_seqlens, n_segments, n, heads);
        }
        let (segi, ni, nhi, nkvi) = (
            int(n_segments, "segments")?,
            int(n, "n")?,
            int(heads.n_heads, "heads")?,
            int(heads.n_kv_heads, "kv heads")?,
        );
        let (s, ks, cfg) = (&self.stream, &self.kernels, rows_by_heads(n, heads.n_heads));
        // SAFETY: sizes checked above; cu_seqlens must be offsets 0 ..= n (the trait's contract).
        unsafe {
            launch_for_head_dim!(
                hd,
                [32 => launch::attention_forward_32, 64 => launch::attention_forward_64, 128 => launch::attention_forward_128],
                (s, ks, cfg, out, lse, qkv, cu_seqlens, segi, ni, nhi, nkvi)
            )
        }?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_backward(
        &self,
        dqkv: &mut CudaBuf,
        dout: &CudaBuf,
        qkv: &CudaBuf,
        out: &CudaBuf,
        lse: &CudaBuf,
        cu_seqlens: &CudaSlice<u32>,
        n_segments: usize,
        n: usize,
        heads: HeadShape,
        rope: Option<RopeGrad<'_, Self>>,
    ) -> Result<()> {
        // With rope, dQ and dK are rotated back: by the flash backward as it writes them, by a
        // rope pass after the scalar kernels.
        let rope = match rope {
            Some(r) => Some((f32_of(r.table, n * heads.head_dim, "attention_backward rope table")?, r.style)),
            None => None,
        };
        let hd = head_variant(heads)?;
        check_segments(cu_seqlens, n_segments)?;
        let dqkv = bf16_mut(dqkv, n * heads.qkv_width(), "attention_backward dqkv")?;
        let dout = bf16_of(dout, n * heads.q_width(), "attention_backward dout")?;
        let qkv = bf16_of(qkv, n * heads.qkv_width(), "attention_backward qkv")?;
        let out = bf16_of(out, n * heads.q_width(), "attention_backward out")?;
        let lse = f32_of(lse, heads.n_heads * n, "attention_backward lse")?;
        if n == 0 {
            return Ok(());
        }
        let (segi, ni, nhi, nkvi, hdi) = (
            int(n_segments, "segments")?,
            int(n, "n")?,
            int(heads.n_heads, "heads")?,
            int(heads.n_kv_heads, "kv heads")?,
            int(heads.head_dim, "head_dim")?,
        );
        let mut scratch = self.scratch();
        let d_buf = ensure(&mut scratch.attn_d, heads.n_heads * n, &self.stream, "attention D")?;

        // head_dim / 8 threads per (row, head), exactly (the kernel is not grid-stride; head_dim is
        // 32, 64 or 128, checked by head_variant); the kernel counts them in an int.
        let threads = (n * heads.n_heads * hd / 8).next_multiple_of(BLOCK as usize);
        int(threads, "attention D threads (rows × heads × head_dim / 8)")?;
        let warps_cfg = LaunchConfig {
            grid_dim: ((threads / BLOCK as usize) as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let (s, ks) = (&self.stream, &self.kernels);
        // SAFETY: D holds n_heads * n; the kernel returns for warps past the end.
        unsafe { launch::attention_backward_d(s, ks, warps_cfg, d_buf, dout, out, ni, nhi, hdi) }?;

        if let Some(cfg) = self.flash_config(heads) {
            return self.flash_backward(
                cfg,
                &mut scratch,
                dqkv,
                dout,
                qkv,
                lse,
                cu_seqlens,
                n_segments,
                n,
                heads,
                rope,
            );
        }
        let d_buf = scratch.attn_d.as_ref().expect("ensured above");

        let (s, ks, cfg) = (&self.stream, &self.kernels, rows_by_heads(n, heads.n_heads));
        // SAFETY: writes only the q part of each dqkv row < n.
        unsafe {
            launch_for_head_dim!(
                hd,
                [32 => launch::attention_backward_dq_32, 64 => launch::attention_backward_dq_64, 128 => launch::attention_backward_dq_128],
                (s, ks, cfg, dqkv, dout, qkv, lse, d_buf, cu_seqlens, segi, ni, nhi, nkvi)
            )
        }?;

        let cfg = rows_by_heads(n, heads.n_kv_heads);
        // SAFETY: writes only the k and v parts of each dqkv row < n.
        unsafe {
            launch_for_head_dim!(
                hd,
                [32 => launch::attention_backward_dkdv_32, 64 => launch::attention_backward_dkdv_64, 128 => launch::attention_backward_dkdv_128],
                (s, ks, cfg, dqkv, dout, qkv, lse, d_buf, cu_seqlens, segi, ni, nhi, nkvi)
            )
        }?;
        match rope {
            Some((table, style)) => self.rope_apply(dqkv, table, n, heads, style, -1.0),
            None => Ok(()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_decode(
        &self,
        out: &mut CudaBuf,
        qkv: &CudaBuf,
        k_cache: &mut CudaBuf,
        v_cache: &mut CudaBuf,
        start: usize,
        n_new: usize,
        heads: HeadShape,
    ) -> Result<()> {
        let hd = head_variant(heads)?;
        let rows = start + n_new;
        let out = bf16_mut(out, n_new * heads.q_width(), "attention_decode out")?;
        let qkv = bf16_of(qkv, n_new * heads.qkv_width(), "attention_decode qkv")?;
        let k_cache = bf16_mut(k_cache, rows * heads.kv_width(), "attention_decode k_cache")?;
        let v_cache = bf16_mut(v_cache, rows * heads.kv_width(), "attention_decode v_cache")?;
        if n_new == 0 {
            return Ok(());
        }
        let (si, ni, nhi, nkvi, hdi) = (
            int(start, "start")?,
            int(n_new, "n_new")?,
            int(heads.n_heads, "heads")?,
            int(heads.n_kv_heads, "kv heads")?,
            int(heads.head_dim, "head_dim")?,
        );
        int(rows * heads.kv_width(), "cache size")?;
        let (s, ks, cfg) = (&self.stream, &self.kernels, grid_stride(n_new * heads.kv_width()));
        // SAFETY: the caches hold start + n_new rows (checked above).
        unsafe {
            launch::attention_kv_cache_write(s, ks, cfg, k_cache, v_cache, qkv, si, ni, nhi, nkvi, hdi)
        }?;

        let cfg = rows_by_heads(n_new, heads.n_heads);
        // SAFETY: row i reads cache rows 0 ..= start + i < start + n_new.
        unsafe {
            launch_for_head_dim!(
                hd,
                [32 => launch::attention_decode_32, 64 => launch::attention_decode_64, 128 => launch::attention_decode_128],
                (s, ks, cfg, out, qkv, k_cache, v_cache, si, ni, nhi, nkvi)
            )
        }?;
        Ok(())
    }
}
