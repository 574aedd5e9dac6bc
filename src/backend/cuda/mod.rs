//! The CUDA backend: our kernels (kernels/*.cu, embedded as PTX) and cuBLASLt GEMMs, driven by cudarc.
//!
//! Buffers are [`CudaBuf`]: bf16 for [`Precision::Compute`], fp32 for [`Precision::F32`]. Every
//! op checks the precision and length of its buffers before launching, so a wrong call is an
//! error rather than an out-of-bounds access on the device. Everything runs on one stream;
//! ops that must look at data on the host (embedding backward, the loss) say so.

mod attention;
mod elementwise;
mod flash;
mod gemm;
mod launch;
mod loss;
mod memory;
mod norm;
mod optim;
mod scratch;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{bail, Context, Result};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use half::bf16;

use super::{AdamW, Backend, HeadShape, LossGrads, Precision, Rope};
use flash::FlashSupport;
pub use flash::{tile_table, AttentionPath};
use gemm::Gemm;
use launch::Kernels;
use scratch::Scratch;

/// A device buffer in the precision it was made with.
pub enum CudaBuf {
    Bf16(CudaSlice<bf16>),
    F32(CudaSlice<f32>),
}

impl CudaBuf {
    pub fn len(&self) -> usize {
        match self {
            CudaBuf::Bf16(s) => s.len(),
            CudaBuf::F32(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn precision(&self) -> Precision {
        match self {
            CudaBuf::Bf16(_) => Precision::Compute,
            CudaBuf::F32(_) => Precision::F32,
        }
    }
}

/// The bf16 slice of `buf`, which must hold at least `need` elements.
fn bf16_of<'a>(buf: &'a CudaBuf, need: usize, what: &str) -> Result<&'a CudaSlice<bf16>> {
    match buf {
        CudaBuf::Bf16(s) if s.len() >= need => Ok(s),
        CudaBuf::Bf16(s) => bail!("{what}: buffer holds {} elements, the op needs {need}", s.len()),
        CudaBuf::F32(_) => bail!("{what}: expected a Compute (bf16) buffer, got an F32 one"),
    }
}
fn bf16_mut<'a>(buf: &'a mut CudaBuf, need: usize, what: &str) -> Result<&'a mut CudaSlice<bf16>> {
    match buf {
        CudaBuf::Bf16(s) => {
            if s.len() < need {
                bail!("{what}: buffer holds {} elements, the op needs {need}", s.len());
            }
            Ok(s)
        }
        CudaBuf::F32(_) => bail!("{what}: expected a Compute (bf16) buffer, got an F32 one"),
    }
}
fn f32_of<'a>(buf: &'a CudaBuf, need: usize, what: &str) -> Result<&'a CudaSlice<f32>> {
    match buf {
        CudaBuf::F32(s) if s.len() >= need => Ok(s),
        CudaBuf::F32(s) => bail!("{what}: buffer holds {} elements, the op needs {need}", s.len()),
        CudaBuf::Bf16(_) => bail!("{what}: expected an F32 buffer, got a Compute (bf16) one"),
    }
}
fn f32_mut<'a>(buf: &'a mut CudaBuf, need: usize, what: &str) -> Result<&'a mut CudaSlice<f32>> {
    match buf {
        CudaBuf::F32(s) => {
            if s.len() < need {
                bail!("{what}: buffer holds {} elements, the op needs {need}", s.len());
            }
            Ok(s)
        }
        CudaBuf::Bf16(_) => bail!("{what}: expected an F32 buffer, got a Compute (bf16) one"),
    }
}
fn ids_of<'a>(ids: &'a CudaSlice<u32>, need: usize, what: &str) -> Result<&'a CudaSlice<u32>> {
    if ids.len() < need {
        bail!("{what}: id buffer holds {} elements, the op needs {need}", ids.len());
    }
    Ok(ids)
}

/// One GPU, one stream, the loaded kernels and a cuBLASLt handle.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Kernels,
    gemm: Gemm,
    scratch: Mutex<Scratch>,
    name: String,
    /// Which head dims the tensor-core attention supports on this device.
    flash: FlashSupport,
    /// `AttentionPath::Scalar` when set (SFT_ATTENTION=scalar, or set_attention_path).
    force_scalar_attention: AtomicBool,
}

impl CudaBackend {
    /// Opens GPU `ordinal`. Fails with a clear message where there is no driver, no such GPU,
    /// no embedded kernels or no cuBLASLt.
    pub fn new(ordinal: usize) -> Result<Self> {
        // SAFETY: only probes whether the driver library can be opened. CudaContext::new
        // panics inside cudarc when it cannot, so this check must come first.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            bail!(
                "no CUDA driver found (libcuda.so could not be loaded): the CUDA backend needs an NVIDIA GPU"
            );
        }
        let ctx = CudaContext::new(ordinal).with_context(|| format!("opening CUDA device {ordinal}"))?;
        // One stream only: cudarc's per-buffer event tracking would only add overhead.
        // SAFETY: every buffer of this backend is used on `stream` alone.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let kernels = Kernels::load(&ctx)?;
        let flash = FlashSupport::probe(&ctx, &kernels)?;
        let gemm = Gemm::new(stream.clone())?;
        let gpu = ctx.name().unwrap_or_else(|_| "unknown GPU".to_string());
        Ok(CudaBackend {
            name: format!("cuda:{ordinal} {gpu}"),
            ctx,
            stream,
            kernels,
            gemm,
            scratch: Mutex::new(Scratch::default()),
            flash,
            force_scalar_attention: AtomicBool::new(AttentionPath::from_env() == AttentionPath::Scalar),
        })
    }

    /// Selects the attention kernels for training (`Auto`: tensor cores where supported).
    /// The initial value comes from `SFT_ATTENTION` (`scalar` forces the scalar kernels).
    pub fn set_attention_path(&self, path: AttentionPath) {
        self.force_scalar_attention.store(path == AttentionPath::Scalar, Ordering::Relaxed);
    }

    pub fn attention_path(&self) -> AttentionPath {
        if self.force_scalar_attention.load(Ordering::Relaxed) {
            AttentionPath::Scalar
        } else {
            AttentionPath::Auto
        }
    }

    /// Whether training attention with this head_dim runs on tensor cores now (the device
    /// supports it and the scalar path is not forced).
    pub fn uses_tensor_core_attention(&self, head_dim: usize) -> bool {
        self.attention_path() == AttentionPath::Auto && self.flash.config(head_dim).is_some()
    }

    /// The device's compute capability (major, minor).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.flash.capability
    }

    fn scratch(&self) -> MutexGuard<'_, Scratch> {
        // A panic while holding the lock leaves only work buffers behind: they stay usable.
        self.scratch.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    type Ids = CudaSlice<u32>;

    fn name(&self) -> String {
        self.name.clone()
    }

    fn zeros(&self, len: usize, precision: Precision) -> Result<CudaBuf> {
        self.zeros_impl(len, precision)
    }
    fn zeros_ids(&self, len: usize) -> Result<CudaSlice<u32>> {
        self.stream.alloc_zeros::<u32>(len.max(1)).context("allocating an id buffer")
    }
    fn write(&self, dst: &mut CudaBuf, src: &[f32]) -> Result<()> {
        self.write_impl(dst, src)
    }
    fn read(&self, src: &CudaBuf, len: usize) -> Result<Vec<f32>> {
        self.read_impl(src, len)
    }
    fn write_ids(&self, dst: &mut CudaSlice<u32>, src: &[u32]) -> Result<()> {
        self.write_ids_impl(dst, src)
    }
    fn zero(&self, buf: &mut CudaBuf, len: usize) -> Result<()> {
        self.zero_impl(buf, len)
    }
    fn copy(&self, dst: &mut CudaBuf, src: &CudaBuf, len: usize) -> Result<()> {
        self.copy_impl(dst, src, len)
    }
    fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().context("synchronizing the CUDA stream")
    }
    fn compute_bytes(&self) -> usize {
        2
    }
    fn memory_info(&self) -> Result<Option<(usize, usize)>> {
        self.ctx.bind_to_thread().context("binding the CUDA context")?;
        let info = cudarc::driver::result::mem_get_info().context("querying free GPU memory")?;
        Ok(Some(info))
    }

    fn embedding_forward(
        &self,
        out: &mut CudaBuf,
        ids: &CudaSlice<u32>,
        table: &CudaBuf,
        n: usize,
        d: usize,
    ) -> Result<()> {
        self.embedding_forward_impl(out, ids, table, n, d)
    }
    fn embedding_backward(
        &self,
        dtable: &mut CudaBuf,
        ids: &CudaSlice<u32>,
        dout: &CudaBuf,
        n: usize,
        d: usize,
    ) -> Result<()> {
        self.embedding_backward_impl(dtable, ids, dout, n, d)
    }

    fn rmsnorm_forward(
        &self,
        out: &mut CudaBuf,
        rstd: &mut CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        n: usize,
        d: usize,
        eps: f32,
    ) -> Result<()> {
        self.rmsnorm_forward_impl(out, rstd, x, w, n, d, eps)
    }
    fn residual_rmsnorm_forward(
        &self,
        x_out: &mut CudaBuf,
        out: &mut CudaBuf,
        rstd: &mut CudaBuf,
        x_in: &CudaBuf,
        delta: &CudaBuf,
        w: &CudaBuf,
        n: usize,
        d: usize,
        eps: f32,
    ) -> Result<()> {
        self.residual_rmsnorm_forward_impl(x_out, out, rstd, x_in, delta, w, n, d, eps)
    }
    fn rmsnorm_backward(
        &self,
        dx: &mut CudaBuf,
        dw: &mut CudaBuf,
        dout: &CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        rstd: &CudaBuf,
        n: usize,
        d: usize,
    ) -> Result<()> {
        self.rmsnorm_backward_impl(dx, dw, dout, x, w, rstd, n, d)
    }

    fn matmul_forward(
        &self,
        out: &mut CudaBuf,
        inp: &CudaBuf,
        w: &CudaBuf,
        n: usize,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<()> {
        self.matmul_forward_impl(out, inp, w, n, in_dim, out_dim)
    }
    fn matmul_backward(
        &self,
        dinp: Option<&mut CudaBuf>,
        dw: &mut CudaBuf,
        dout: &CudaBuf,
        inp: &CudaBuf,
        w: &CudaBuf,
        n: usize,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<()> {
        self.matmul_backward_impl(dinp, dw, dout, inp, w, n, in_dim, out_dim)
    }

    fn rope_forward(
        &self,
        qkv: &mut CudaBuf,
        positions: &CudaSlice<u32>,
        n: usize,
        heads: HeadShape,
        rope: Rope,
    ) -> Result<()> {
        self.rope_impl(qkv, positions, n, heads, rope, 1.0)
    }
    fn rope_backward(
        &self,
        dqkv: &mut CudaBuf,
        positions: &CudaSlice<u32>,
        n: usize,
        heads: HeadShape,
        rope: Rope,
    ) -> Result<()> {
        self.rope_impl(dqkv, positions, n, heads, rope, -1.0)
    }

    fn attention_forward(
        &self,
        out: &mut CudaBuf,
        lse: &mut CudaBuf,
        qkv: &CudaBuf,
        cu_seqlens: &CudaSlice<u32>,
        n_segments: usize,
        n: usize,
        heads: HeadShape,
    ) -> Result<()> {
        self.attention_forward_impl(out, lse, qkv, cu_seqlens, n_segments, n, heads)
    }
    fn attention_backward(
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
    ) -> Result<()> {
        self.attention_backward_impl(dqkv, dout, qkv, out, lse, cu_seqlens, n_segments, n, heads)
    }
    fn attention_decode(
        &self,
        out: &mut CudaBuf,
        qkv: &CudaBuf,
        k_cache: &mut CudaBuf,
        v_cache: &mut CudaBuf,
        start: usize,
        n_new: usize,
        heads: HeadShape,
    ) -> Result<()> {
        self.attention_decode_impl(out, qkv, k_cache, v_cache, start, n_new, heads)
    }

    fn swiglu_forward(&self, out: &mut CudaBuf, gate_up: &CudaBuf, n: usize, hidden: usize) -> Result<()> {
        self.swiglu_forward_impl(out, gate_up, n, hidden)
    }
    fn swiglu_backward(
        &self,
        dgate_up: &mut CudaBuf,
        dout: &CudaBuf,
        gate_up: &CudaBuf,
        n: usize,
        hidden: usize,
    ) -> Result<()> {
        self.swiglu_backward_impl(dgate_up, dout, gate_up, n, hidden)
    }

    fn dropout(&self, x: &mut CudaBuf, len: usize, p: f32, seed: u64) -> Result<()> {
        self.dropout_impl(x, len, p, seed)
    }

    fn lm_head_cross_entropy(
        &self,
        x: &CudaBuf,
        w: &CudaBuf,
        targets: &CudaSlice<u32>,
        ignore_id: u32,
        n: usize,
        d: usize,
        vocab: usize,
        grads: Option<LossGrads<'_, Self>>,
    ) -> Result<f64> {
        self.lm_head_cross_entropy_impl(x, w, targets, ignore_id, n, d, vocab, grads)
    }

    fn sum_squares(&self, bufs: &[&CudaBuf], lens: &[usize]) -> Result<f64> {
        self.sum_squares_impl(bufs, lens)
    }
    fn adamw(
        &self,
        params: &mut [&mut CudaBuf],
        master: &mut [&mut CudaBuf],
        grads: &[&CudaBuf],
        m: &mut [&mut CudaBuf],
        v: &mut [&mut CudaBuf],
        lens: &[usize],
        hp: &AdamW,
    ) -> Result<()> {
        self.adamw_impl(params, master, grads, m, v, lens, hp)
    }
}

#[cfg(test)]
mod tests {
    use super::CudaBackend;

    #[test]
    fn new_is_an_error_not_a_panic_without_a_driver() {
        // SAFETY: only probes whether the driver library can be opened.
        if unsafe { cudarc::driver::sys::is_culib_present() } {
            eprintln!("skipped: a CUDA driver is present");
            return;
        }
        let err = CudaBackend::new(0).err().expect("no driver, yet the backend opened");
        assert!(err.to_string().contains("no CUDA driver"), "{err}");
    }
}
