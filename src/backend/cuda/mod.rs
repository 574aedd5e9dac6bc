//! The CUDA backend: our kernels (kernels/*.cu, embedded as PTX) and cuBLASLt GEMMs, driven by cudarc.
//! Each op family `F` has its launcher in `F.rs` for `kernels/F.cu` (the CPU twin is `cpu/F.rs`);
//! launch.rs, memory.rs, scratch.rs and gemm.rs (cuBLASLt descriptors) are infrastructure.
//!
//! A family file implements its ops as inherent methods named like the trait's; the
//! `impl Backend` below is generated from the trait's op list (the `backend_ops` macro of src/backend/mod.rs).
//! Buffers are [`CudaBuf`]: bf16 for [`Precision::Compute`], fp32 for [`Precision::F32`]. Every
//! op checks the precision and length of its buffers before launching, so a wrong call is an
//! error rather than an out-of-bounds access on the device. Everything runs on one stream; no op
//! reads device data back on the host (the host prepares what it needs when it loads a batch,
//! and the loss and the norm stay on the device until the trainer reads them once per step),
//! so the host runs ahead of the GPU; `host_reads` counts the blocking read-backs.

mod adamw;
mod attention;
mod cast;
mod cross_entropy;
mod dropout;
mod embedding;
pub mod flash_attention;
mod gemm;
mod global_norm;
pub mod launch;
mod matmul;
mod memory;
pub mod nccl;
mod rmsnorm;
mod rope;
mod scratch;
mod settings;
mod swiglu;
mod timing;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{bail, Context, Result};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use half::bf16;

use super::{
    AdamW, Backend, BranchGrad, Clip, Dropout, GradMode, HeadShape, LossGrads, Precision, Rope, RopeGrad,
    RopeStyle, StateDtype,
};
// Launch shapes and host-side helpers, public so that the kernel emulation (emu/) launches
// exactly as the backend does.
pub use adamw::ADAM_BLOCKS as ADAMW_MAX_BLOCKS;
pub use attention::rows_by_heads as attention_rows_by_heads;
pub use cross_entropy::{
    chunk_rows as cross_entropy_chunk_rows, copy_items as cross_entropy_copy_items,
    vec_arg as cross_entropy_vec_arg, CHUNK_BUDGET_BYTES as CROSS_ENTROPY_CHUNK_BUDGET,
};
pub use cudarc::driver::LaunchConfig;
use flash_attention::FlashSupport;
pub use flash_attention::{AttentionPath, FlashChoice, FlashDq, FlashMma};
use gemm::Gemm;
pub use global_norm::{sum_squares_blocks, SUMSQ_BLOCKS as SUM_SQUARES_BLOCKS, SUM_SPLIT_THREADS};
use launch::Kernels;
pub use launch::{grid_stride, per_row, BLOCK};
pub use rmsnorm::{
    backward_config as rmsnorm_backward_config, dropout_args, dw_chunks as rmsnorm_dw_chunks,
    dw_reduce_config as rmsnorm_dw_reduce_config, DW_CHUNKS as RMSNORM_DW_CHUNKS, MAX_D as RMSNORM_MAX_D,
};
pub use rope::{apply_config as rope_apply_config, style_arg as rope_style_arg, vec_arg as rope_vec_arg};
use scratch::Scratch;
pub use swiglu::vec_arg as swiglu_vec_arg;

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
    /// How the flash backward sums dQ (SFT_FLASH_DQ, or set_flash_dq).
    flash_dq: flash_attention::DqAccumulation,
    /// Whether the flash kernels run on wgmma where they can (SFT_FLASH_MMA=wgmma, or set_flash_mma).
    flash_wgmma: AtomicBool,
    /// Blocking device-to-host copies so far (see `download`).
    reads: AtomicU64,
    /// The data-parallel job's NCCL communicator, once joined (`join_ranks`).
    nccl: Option<nccl::NcclRanks>,
}

/// Refuses a machine without the driver library before any driver call: cudarc panics inside
/// its first call when it cannot load the library.
pub(crate) fn ensure_driver() -> Result<()> {
    // SAFETY: only probes whether the driver library can be opened.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        bail!("no CUDA driver found (libcuda.so could not be loaded): the CUDA backend needs an NVIDIA GPU");
    }
    Ok(())
}

/// Refuses a driver too old for the embedded PTX before any module fails to load with
/// CUDA_ERROR_UNSUPPORTED_PTX_VERSION, which does not say which driver is needed.
fn check_driver_version() -> Result<()> {
    let Some(isa) = crate::kernels::ptx_isa_version() else { return Ok(()) };
    let mut version: std::ffi::c_int = 0;
    // SAFETY: the driver library is present (checked by the caller); cuDriverGetVersion needs
    // no cuInit and only writes the int.
    let status = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) };
    if status != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
        bail!("cuDriverGetVersion failed: {status:?}");
    }
    crate::kernels::check_driver_for_ptx(version, isa).map_err(anyhow::Error::msg)
}

impl CudaBackend {
    /// Opens GPU `ordinal`. Fails with a clear message where there is no driver, no such GPU,
    /// no embedded kernels or no cuBLASLt.
    pub fn new(ordinal: usize) -> Result<Self> {
        ensure_driver()?;
        check_driver_version()?;
        let ctx = CudaContext::new(ordinal).with_context(|| format!("opening CUDA device {ordinal}"))?;
        // One stream only: cudarc's per-buffer event tracking would only add overhead.
        // SAFETY: every buffer of this backend is used on `stream` alone.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let kernels = Kernels::load(&ctx)?;
        let flash = FlashSupport::probe(&ctx, &kernels)?;
        let gemm = Gemm::new(stream.clone())?;
        let gpu = ctx.name().unwrap_or_else(|_| "unknown GPU".to_string());
        let flash_dq = flash_attention::DqAccumulation::new(FlashDq::from_env()?);
        let flash_mma = FlashMma::from_env()?;
        for note in settings::notes(|k| std::env::var(k).ok()) {
            crate::say!("note: cuda:{ordinal}: {note}");
        }
        let backend = CudaBackend {
            name: format!("cuda:{ordinal} {gpu}"),
            ctx,
            stream,
            kernels,
            gemm,
            scratch: Mutex::new(Scratch::default()),
            flash,
            force_scalar_attention: AtomicBool::new(AttentionPath::from_env() == AttentionPath::Scalar),
            flash_dq,
            flash_wgmma: AtomicBool::new(false),
            reads: AtomicU64::new(0),
            nccl: None,
        };
        backend.set_flash_mma(flash_mma).context("environment variable SFT_FLASH_MMA")?;
        Ok(backend)
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

/// One trait method per op, each calling the inherent method of the same name in its family file.
macro_rules! call_family_ops {
    ($($(#[$meta:meta])* fn $name:ident(&self $(, $arg:ident: $ty:ty)* $(,)?) -> $ret:ty;)*) => {
        $(fn $name(&self $(, $arg: $ty)*) -> $ret {
            CudaBackend::$name(self $(, $arg)*)
        })*
    };
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    type Ids = CudaSlice<u32>;

    fn name(&self) -> String {
        self.name.clone()
    }
    fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().context("synchronizing the CUDA stream")
    }
    fn host_reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }
    fn compute_bytes(&self) -> usize {
        2
    }
    fn memory_info(&self) -> Result<Option<(usize, usize)>> {
        self.ctx.bind_to_thread().context("binding the CUDA context")?;
        let info = cudarc::driver::result::mem_get_info().context("querying free GPU memory")?;
        Ok(Some(info))
    }

    fn prepare_segments(&self, cu_seqlens: &CudaSlice<u32>, n_segments: usize, n: usize) -> Result<()> {
        self.flash_prepare(cu_seqlens, n_segments, n)
    }

    fn set_kernel_timing(&self, on: bool) -> bool {
        self.kernels.timer.set(on);
        true
    }

    fn take_kernel_times(&self) -> Result<Vec<crate::backend::KernelTime>> {
        self.kernels.timer.take()
    }

    fn all_reduce_sum_ranks(&self, bufs: &mut [CudaBuf], lens: &[usize]) -> Result<bool> {
        self.nccl_all_reduce_sum(bufs, lens)
    }
    fn reduce_sum_ranks(&self, bufs: &mut [CudaBuf], lens: &[usize], roots: &[usize]) -> Result<bool> {
        self.nccl_reduce_sum(bufs, lens, roots)
    }
    fn wait_ranks(&self) -> Result<()> {
        self.nccl_wait()
    }
    fn broadcast_ranks(&self, bufs: &mut [CudaBuf], lens: &[usize], roots: &[usize]) -> Result<bool> {
        self.nccl_broadcast(bufs, lens, roots)
    }

    super::backend_ops!(call_family_ops);
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
