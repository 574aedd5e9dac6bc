//! Tensor-core flash attention (kernels/flash_attention.cu): launch configurations, the
//! per-segment tile table, and a CPU model of the mma/ldmatrix fragment mappings the kernels
//! rely on (unit-tested here, so that an index slip shows up without a GPU).
//!
//! The scalar kernels (attention.cu) remain: they run where the tensor-core path does not
//! (head_dim other than 64/128, a device below sm_80, or one whose per-block shared memory
//! cannot hold the tiles), and `SFT_ATTENTION=scalar` (or [`CudaBackend::set_attention_path`])
//! forces them, to cross-check the two on a GPU.
//!
//! The backward sums dQ in a fixed order by default (deterministic); `SFT_FLASH_DQ=atomic` (or
//! [`CudaBackend::set_flash_dq`]) uses fp32 atomic adds and a convert kernel instead, faster but
//! not bit-reproducible run to run; `SFT_FLASH_DQ=deferred` (and `deferred-q64`, in other
//! tiles) the same ordered sums one iteration later, staged in shared memory (the same bits; not
//! yet timed on a GPU).
//!
//! `SFT_FLASH_MMA=wgmma` (or [`CudaBackend::set_flash_mma`]) runs the head_dim 64 forward and
//! ordered backward on Hopper's warpgroup MMA (`flash_forward_64_sm90`, `flash_backward_64_sm90`;
//! compute capability 9.0 only; the same operations per element as the default mma.sync
//! kernels). Not yet run on a GPU.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use anyhow::{bail, Context, Result};
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute_enum};
use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig};

use super::launch::{self, int, launch_for_head_dim, Kernels};
use super::rope::style_arg as rope_style_arg;
use super::scratch::{ensure, Scratch};
use super::CudaBackend;
use crate::backend::{HeadShape, RopeStyle};

/// Which attention kernels the backend uses for training (decode is always scalar).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionPath {
    /// Tensor cores where supported (head_dim 64/128, sm_80+, enough shared memory), else scalar.
    Auto,
    /// The scalar fp32 kernels of attention.cu.
    Scalar,
}

impl AttentionPath {
    /// `SFT_ATTENTION=scalar` forces the scalar kernels; anything else (or unset) is `Auto`.
    pub fn from_env() -> Self {
        match std::env::var("SFT_ATTENTION") {
            Ok(v) if v.eq_ignore_ascii_case("scalar") => AttentionPath::Scalar,
            _ => AttentionPath::Auto,
        }
    }
}

/// A flash kernel setting chosen by name: from an environment variable when the backend opens,
/// from a flag of `sft bench-attention`.
pub trait FlashChoice: Copy + PartialEq + Sized + 'static {
    /// Every choice, the default first.
    const ALL: &'static [Self];
    /// The environment variable that chooses it.
    const VAR: &'static str;

    /// The name the variable takes.
    fn name(self) -> &'static str;

    /// One of the names (case-insensitive); anything else is an error that lists them.
    fn parse(s: &str) -> Result<Self> {
        Self::ALL.iter().copied().find(|m| s.eq_ignore_ascii_case(m.name())).with_context(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|m| m.name()).collect();
            format!("{s:?}: expected one of {}", names.join(", "))
        })
    }

    /// The variable's choice, the default where it is unset; a value `parse` refuses (or one
    /// that is not Unicode) is an error naming the variable.
    fn from_env() -> Result<Self> {
        match std::env::var(Self::VAR) {
            Err(std::env::VarError::NotPresent) => Ok(Self::ALL[0]),
            Ok(v) => Self::parse(&v).with_context(|| format!("environment variable {}", Self::VAR)),
            Err(e) => bail!("environment variable {}: {e}", Self::VAR),
        }
    }
}

/// How the flash backward sums the dQ partials of a q tile's key tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlashDq {
    /// In a fixed order through a semaphore per q tile (`flash_backward_HD`): bit-identical run
    /// to run. The default.
    Ordered,
    /// The same sums in the same order (the same bits), each q tile's partial staged in shared
    /// memory and added during the next iteration, its old sums fetched with cp.async behind
    /// that iteration's dQ product (`flash_backward_deferred_HD`, head_dim 64 in warps of 32
    /// keys, as the atomic kernel): nothing of the accumulation waits in the iteration that
    /// computes the partial. Not yet timed on a GPU.
    Deferred,
    /// [`FlashDq::Deferred`] in the ordered kernel's tiles (`flash_backward_deferred_q64_64`:
    /// head_dim 64 in warps of 16 keys over q tiles of 64, half the hand-offs of q tiles of 32;
    /// head_dim 128 runs `flash_backward_deferred_128`). The same bits. Not yet timed on a GPU:
    /// one GPU run times both layouts and keeps the faster.
    DeferredQ64,
    /// fp32 atomicAdd into the accumulator, then `flash_dq_convert` (`flash_backward_atomic_HD`):
    /// no waits, but the order of the adds (and so the last bits of dQ) follows the timing. On
    /// an H200: 2.35 ms fwd+bwd at 8 × 2048 × 32 heads of 64 against 2.98 ms ordered.
    Atomic,
}

impl FlashChoice for FlashDq {
    const ALL: &'static [FlashDq] =
        &[FlashDq::Ordered, FlashDq::Deferred, FlashDq::DeferredQ64, FlashDq::Atomic];
    const VAR: &'static str = "SFT_FLASH_DQ";

    fn name(self) -> &'static str {
        match self {
            FlashDq::Ordered => "ordered",
            FlashDq::Deferred => "deferred",
            FlashDq::DeferredQ64 => "deferred-q64",
            FlashDq::Atomic => "atomic",
        }
    }
}

/// Which tensor-core instructions the flash kernels' tile products use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlashMma {
    /// mma.sync (`flash_forward_HD`, `flash_backward_HD`), every sm_80+ device. The default.
    Mma,
    /// wgmma (`flash_forward_64_sm90`; `flash_backward_64_sm90`,
    /// `flash_backward_deferred_q64_64_sm90` and `flash_backward_atomic_64_sm90` for the
    /// ordered, deferred-q64 and atomic dQ sums, every tile product on wgmma): head_dim 64 on
    /// compute capability 9.0 (H100, H200); other head_dims and dQ sums keep [`FlashMma::Mma`].
    /// Emulated to the default's bits (the atomic one to the reference's tolerance); not yet
    /// run on a GPU.
    Wgmma,
}

impl FlashChoice for FlashMma {
    const ALL: &'static [FlashMma] = &[FlashMma::Mma, FlashMma::Wgmma];
    const VAR: &'static str = "SFT_FLASH_MMA";

    fn name(self) -> &'static str {
        match self {
            FlashMma::Mma => "mma",
            FlashMma::Wgmma => "wgmma",
        }
    }
}

/// The backend's dQ accumulation state: the chosen [`FlashDq`], and whether the fp32
/// accumulator may hold non-zero values. The atomic path needs it zero before a launch and
/// leaves it zero (flash_dq_convert); the ordered path leaves partial sums in it. So the first
/// atomic launch after an ordered one clears it.
#[derive(Debug)]
pub(super) struct DqAccumulation {
    /// The [`FlashDq`], as its index in [`FlashChoice::ALL`].
    mode: AtomicU8,
    acc_dirty: AtomicBool,
}

impl DqAccumulation {
    pub(super) fn new(mode: FlashDq) -> Self {
        let d = DqAccumulation { mode: AtomicU8::new(0), acc_dirty: AtomicBool::new(false) };
        d.set(mode);
        d
    }
    fn set(&self, mode: FlashDq) {
        let i = FlashDq::ALL.iter().position(|&m| m == mode).expect("every mode is listed");
        self.mode.store(i as u8, Ordering::Relaxed);
    }
    fn get(&self) -> FlashDq {
        FlashDq::ALL[self.mode.load(Ordering::Relaxed) as usize]
    }
}

/// Threads per block of flash_dq_convert (its `__launch_bounds__`).
const DQ_CONVERT_THREADS: usize = 256;
/// Most blocks of flash_dq_convert (a grid-stride loop; 8 per SM on a 132-SM H100/H200).
const DQ_CONVERT_MAX_BLOCKS: usize = 1056;

/// One kernel's launch shape: `warps` per CTA, `tile` rows of its own side per CTA (q rows for
/// the forward, key rows for the backward), `step` rows of the other side per iteration (key
/// rows for the forward, q rows for the backward), and its dynamic shared memory in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct FlashKernel {
    pub name: &'static str,
    pub warps: usize,
    pub tile: usize,
    pub step: usize,
    pub smem: usize,
}

/// Padded shared-memory row of `hd` bf16 (+ 8: conflict-free ldmatrix).
const fn row_bytes(hd: usize) -> usize {
    (hd + 8) * 2
}

/// Forward: `nw` warps of `mt` m-tiles (16 q rows each); Q tile [16·nw·mt] + triple-buffered
/// K and V tiles [bn].
const fn forward(name: &'static str, hd: usize, nw: usize, bn: usize, mt: usize) -> FlashKernel {
    let bm = 16 * nw * mt;
    FlashKernel { name, warps: nw, tile: bm, step: bn, smem: (bm + 6 * bn) * row_bytes(hd) }
}
/// The wgmma forward: 2 warpgroups of 64 q rows, the same tiles as [`forward`] unpadded, in the
/// 128-byte swizzle, plus 1 KiB to align them to 1024 bytes.
const fn forward_wgmma(name: &'static str, hd: usize, bn: usize) -> FlashKernel {
    FlashKernel { name, warps: 8, tile: 128, step: bn, smem: (128 + 6 * bn) * hd * 2 + 1024 }
}
/// The wgmma backward (ordered dQ): [`backward`]'s tiles of 8 warps of 16 keys over q tiles of
/// `bq`, unpadded (the dSᵀ tile too), the transposed key tile Kᵀ [hd][bn] that the dQ product
/// reads, plus 1 KiB to align them. [`deferred`] adds its staged partials to it as to the mma
/// kernel.
const fn backward_wgmma(name: &'static str, hd: usize, bq: usize) -> FlashKernel {
    let bn = 128;
    FlashKernel {
        name,
        warps: 8,
        tile: bn,
        step: bq,
        smem: (2 * bn + 4 * bq) * hd * 2 + 4 * bq * 4 + bn * bq * 2 + bn * hd * 2 + 1024,
    }
}
/// The deferred sums on wgmma: [`backward_wgmma`] plus the staged partials and old sums.
const fn deferred_wgmma(name: &'static str, hd: usize, bq: usize) -> FlashKernel {
    let k = backward_wgmma(name, hd, bq);
    FlashKernel { smem: k.smem + staged_bytes(hd, bq), ..k }
}
/// Backward: `nw` warps of `mt` m-tiles (16 keys each); K and V tiles [16·nw·mt] +
/// double-buffered Q and dO tiles [bq] + lse and D [2][bq] f32 + the dSᵀ tile [16·nw·mt][bq + 8]
/// bf16.
const fn backward(name: &'static str, hd: usize, nw: usize, bq: usize, mt: usize) -> FlashKernel {
    let bn = 16 * nw * mt;
    FlashKernel {
        name,
        warps: nw,
        tile: bn,
        step: bq,
        smem: (2 * bn + 4 * bq) * row_bytes(hd) + 4 * bq * 4 + bn * (bq + 8) * 2,
    }
}

/// The deferred backward: [`backward`]'s tiles plus the staged partials [2][bq][hd + 4] and the
/// old sums [bq][hd], f32.
const fn deferred(name: &'static str, hd: usize, nw: usize, bq: usize, mt: usize) -> FlashKernel {
    let k = backward(name, hd, nw, bq, mt);
    FlashKernel { smem: k.smem + staged_bytes(hd, bq), ..k }
}
/// The deferred kernels' staged partials [2][bq][hd + 4] and old sums [bq][hd], f32.
const fn staged_bytes(hd: usize, bq: usize) -> usize {
    (2 * bq * (hd + 4) + bq * hd) * 4
}

/// The kernels for one head_dim; must match FLASH_ENTRIES in flash_attention.cu. The shapes are
/// the fastest of those timed on an H200 (BENCHMARKS.md, "flash variants").
#[derive(Clone, Copy, Debug)]
pub(super) struct FlashConfig {
    pub head_dim: usize,
    pub forward: FlashKernel,
    /// The forward on wgmma ([`FlashMma::Wgmma`]; compute capability 9.0), where one exists.
    pub forward_wgmma: Option<FlashKernel>,
    /// The ordered dQ sum ([`FlashDq::Ordered`]).
    pub backward: FlashKernel,
    /// The same on wgmma ([`FlashMma::Wgmma`]; compute capability 9.0), where one exists.
    pub backward_wgmma: Option<FlashKernel>,
    /// The ordered dQ sum, deferred ([`FlashDq::Deferred`]).
    pub backward_deferred: FlashKernel,
    /// The same in q tiles of 64 where shared memory allows ([`FlashDq::DeferredQ64`]).
    pub backward_deferred_q64: FlashKernel,
    /// That on wgmma ([`FlashMma::Wgmma`]), where one exists.
    pub backward_deferred_q64_wgmma: Option<FlashKernel>,
    /// Atomic dQ adds ([`FlashDq::Atomic`]).
    pub backward_atomic: FlashKernel,
    /// Those on wgmma ([`FlashMma::Wgmma`]), where one exists.
    pub backward_atomic_wgmma: Option<FlashKernel>,
}

pub(super) const FLASH_64: FlashConfig = FlashConfig {
    head_dim: 64,
    // Warps of 32 q rows: 0.58 against 0.62 ms in warps of 16 (8 × 2048 × 32 heads, H200).
    forward: forward("flash_forward_64", 64, 4, 64, 2),
    forward_wgmma: Some(forward_wgmma("flash_forward_64_sm90", 64, 64)),
    // Warps of 16 keys: in warps of 32 the q tiles of 32 doubled the semaphore waits (2.68
    // against 2.40 ms).
    backward: backward("flash_backward_64", 64, 8, 64, 1),
    backward_wgmma: Some(backward_wgmma("flash_backward_64_sm90", 64, 64)),
    // Warps of 32 keys over q tiles of 32, as the atomic kernel; untimed.
    backward_deferred: deferred("flash_backward_deferred_64", 64, 4, 32, 2),
    // Warps of 16 keys over q tiles of 64, as the ordered kernel; untimed.
    backward_deferred_q64: deferred("flash_backward_deferred_q64_64", 64, 8, 64, 1),
    backward_deferred_q64_wgmma: Some(deferred_wgmma("flash_backward_deferred_q64_64_sm90", 64, 64)),
    // Warps of 32 keys: 1.77 against 2.14 ms in warps of 16.
    backward_atomic: backward("flash_backward_atomic_64", 64, 4, 32, 2),
    // The ordered wgmma kernel's tiles (warpgroups of 64 keys); untimed.
    backward_atomic_wgmma: Some(backward_wgmma("flash_backward_atomic_64_sm90", 64, 64)),
};
pub(super) const FLASH_128: FlashConfig = FlashConfig {
    head_dim: 128,
    forward: forward("flash_forward_128", 128, 8, 64, 1),
    forward_wgmma: None,
    backward: backward("flash_backward_128", 128, 8, 32, 1),
    backward_wgmma: None,
    backward_deferred: deferred("flash_backward_deferred_128", 128, 8, 32, 1),
    // q tiles of 64 would need 253 KiB of shared memory: the q-tile-32 kernel serves both.
    backward_deferred_q64: deferred("flash_backward_deferred_128", 128, 8, 32, 1),
    backward_deferred_q64_wgmma: None,
    backward_atomic: backward("flash_backward_atomic_128", 128, 8, 32, 1),
    backward_atomic_wgmma: None,
};

/// Rows per tile of every flash kernel's table: one table per batch serves the forward and the
/// backward of every layer.
pub(crate) const FLASH_TILE: usize = 128;
const _: () = assert!(
    FLASH_64.forward.tile == FLASH_TILE
        && matches!(FLASH_64.forward_wgmma, Some(k) if k.tile == FLASH_TILE)
        && matches!(FLASH_64.backward_wgmma, Some(k) if k.tile == FLASH_TILE && k.step == FLASH_64.backward.step)
        && FLASH_64.backward.tile == FLASH_TILE
        && FLASH_64.backward_atomic.tile == FLASH_TILE
        && FLASH_64.backward_deferred.tile == FLASH_TILE
        && FLASH_128.backward_deferred.tile == FLASH_TILE
        && FLASH_64.backward_deferred_q64.tile == FLASH_TILE
        && FLASH_128.backward_deferred_q64.tile == FLASH_TILE
        && FLASH_128.forward.tile == FLASH_TILE
        && FLASH_128.backward.tile == FLASH_TILE
        && FLASH_128.backward_atomic.tile == FLASH_TILE
);

/// The segments a prepared tile table describes: the `cu_seqlens` buffer (its device address),
/// the segment count and the row count, and the table's grid bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TableKey {
    cu_seqlens: u64,
    n_segments: usize,
    n: usize,
    bound: usize,
}

/// Bytes of fp32 dQ accumulator traffic of the backward over these segments: a q tile of `bq`
/// rows with `c` key-tile partials stores the first, reads and stores the middle ones and reads
/// before the last (which writes the bf16 dQ): `8·(c − 1)` bytes per element, per q head. The
/// cost model counts this (src/plan/counting.rs).
pub fn dq_accumulation_bytes(cu_seqlens: &[u32], n_segments: usize, heads: HeadShape, bq: usize) -> f64 {
    let mut elems_x_partials = 0usize;
    for w in cu_seqlens[..=n_segments].windows(2) {
        let len = w[1].saturating_sub(w[0]) as usize;
        for q0 in (0..len).step_by(bq) {
            let rows = bq.min(len - q0);
            elems_x_partials += rows * (q0 / FLASH_TILE);
        }
    }
    8.0 * (elems_x_partials * heads.n_heads * heads.head_dim) as f64
}

/// q rows per iteration of the default (ordered) backward for `head_dim` (64 and 128 have flash
/// kernels; others run the scalar kernels and do no accumulation).
pub fn backward_q_rows(head_dim: usize) -> Option<usize> {
    match head_dim {
        64 => Some(FLASH_64.backward.step),
        128 => Some(FLASH_128.backward.step),
        _ => None,
    }
}

impl FlashConfig {
    /// Every kernel of the config: each gets its dynamic shared memory limit raised when the
    /// backend opens (a launch past the default 48 KiB fails otherwise).
    pub(super) fn kernels(&self) -> [FlashKernel; 5] {
        [
            self.forward,
            self.backward,
            self.backward_deferred,
            self.backward_deferred_q64,
            self.backward_atomic,
        ]
    }
}

/// What the device supports, decided once when the backend opens.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct FlashSupport {
    pub hd64: bool,
    pub hd128: bool,
    /// (major, minor) compute capability.
    pub capability: (i32, i32),
}

impl FlashSupport {
    /// Queries the compute capability and the opt-in shared memory per block, and raises each
    /// supported kernel's dynamic shared memory limit to what it needs.
    pub(super) fn probe(ctx: &cudarc::driver::CudaContext, kernels: &Kernels) -> Result<Self> {
        let capability = ctx.compute_capability().context("querying the compute capability")?;
        let optin = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .context("querying the shared memory per block")? as usize;
        let mut support = FlashSupport { capability, ..Default::default() };
        if capability.0 < 8 {
            return Ok(support);
        }
        let enable = |cfg: &FlashConfig| -> Result<bool> {
            let ks = cfg.kernels();
            if ks.iter().any(|k| k.smem > optin) {
                return Ok(false);
            }
            for k in ks {
                let set = kernels.get(k.name)?.set_attribute(
                    CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    k.smem as i32,
                );
                if let Err(e) = set {
                    // The scalar kernels still work: say why and use them.
                    crate::say!(
                        "warning: {} bytes of shared memory for {} refused ({e}); scalar attention for head_dim {}",
                        k.smem, k.name, cfg.head_dim
                    );
                    return Ok(false);
                }
            }
            // The sm_90a kernels, where they loaded (compute capability 9.0 only).
            let wgmma = [
                cfg.forward_wgmma,
                cfg.backward_wgmma,
                cfg.backward_deferred_q64_wgmma,
                cfg.backward_atomic_wgmma,
            ];
            for k in wgmma.into_iter().flatten().filter(|k| kernels.has(k.name)) {
                let set = kernels.get(k.name)?.set_attribute(
                    CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    k.smem as i32,
                );
                set.with_context(|| format!("{} bytes of shared memory for {}", k.smem, k.name))?;
            }
            Ok(true)
        };
        support.hd64 = enable(&FLASH_64)?;
        support.hd128 = enable(&FLASH_128)?;
        Ok(support)
    }

    pub(super) fn config(&self, head_dim: usize) -> Option<FlashConfig> {
        match head_dim {
            64 if self.hd64 => Some(FLASH_64),
            128 if self.hd128 => Some(FLASH_128),
            _ => None,
        }
    }
}

/// Upper bound on the tiles of `tile` rows over `n` rows in `n_segments` segments (each segment
/// adds at most one partial tile): the grid's x extent. CTAs past the real count return at once.
pub(crate) fn tile_bound(n: usize, n_segments: usize, tile: usize) -> usize {
    n.div_ceil(tile) + n_segments
}

impl CudaBackend {
    /// Selects how the flash backward sums dQ (`Ordered`, the default, is deterministic).
    /// The initial value comes from `SFT_FLASH_DQ` (`deferred`, `deferred-q64` or `atomic`;
    /// default `ordered`).
    pub fn set_flash_dq(&self, mode: FlashDq) {
        self.flash_dq.set(mode);
    }

    pub fn flash_dq(&self) -> FlashDq {
        self.flash_dq.get()
    }

    /// Selects the flash kernels' tensor-core instructions ([`FlashMma::Mma`] by default, from
    /// `SFT_FLASH_MMA`); wgmma needs compute capability 9.0.
    pub fn set_flash_mma(&self, kernel: FlashMma) -> Result<()> {
        if kernel == FlashMma::Wgmma && self.flash.capability != (9, 0) {
            bail!(
                "the wgmma flash kernels need compute capability 9.0 (H100, H200); this device is {}.{}",
                self.flash.capability.0,
                self.flash.capability.1
            );
        }
        if kernel == FlashMma::Wgmma && !self.kernels.has("flash_forward_64_sm90") {
            bail!("the wgmma flash kernels did not load on this device (see the warning when it opened)");
        }
        self.flash_wgmma.store(kernel == FlashMma::Wgmma, Ordering::Relaxed);
        Ok(())
    }

    pub fn flash_mma(&self) -> FlashMma {
        if self.flash_wgmma.load(Ordering::Relaxed) {
            FlashMma::Wgmma
        } else {
            FlashMma::Mma
        }
    }

    /// Chooses the tensor-core path (`Some`) or the scalar one (`None`) for this head shape.
    pub(super) fn flash_config(&self, heads: HeadShape) -> Option<FlashConfig> {
        if self.attention_path() == AttentionPath::Scalar {
            return None;
        }
        self.flash.config(heads.head_dim)
    }

    /// Fills `slot` with the tile table of `tile` rows for these segments; returns the grid's x.
    fn build_tile_table(
        &self,
        slot: &mut Option<CudaSlice<i32>>,
        cu_seqlens: &CudaSlice<u32>,
        n_segments: usize,
        n: usize,
        tile: usize,
    ) -> Result<usize> {
        let bound = tile_bound(n, n_segments, tile);
        int(1 + 3 * bound, "attention tile table")?;
        let table = ensure(slot, 1 + 3 * bound, &self.stream, "attention tile table")?;
        let (segi, tilei) = (int(n_segments, "segments")?, int(tile, "tile")?);
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the table holds 1 + 3·bound ints and at most `bound` tiles are written;
        // cu_seqlens holds n_segments + 1 offsets (checked by the caller).
        unsafe {
            launch::flash_tile_table(&self.stream, &self.kernels, cfg, table, cu_seqlens, segi, tilei)
        }?;
        Ok(bound)
    }

    /// Builds the tile table of a batch's segments once, for every layer's forward and backward
    /// (`Backend::prepare_segments`). Nothing to do where the flash kernels do not run.
    pub(super) fn flash_prepare(
        &self,
        cu_seqlens: &CudaSlice<u32>,
        n_segments: usize,
        n: usize,
    ) -> Result<()> {
        let mut scratch = self.scratch();
        scratch.attn_tiles_for = None;
        if n == 0 || self.attention_path() == AttentionPath::Scalar || !(self.flash.hd64 || self.flash.hd128)
        {
            return Ok(());
        }
        let bound = self.build_tile_table(&mut scratch.attn_tiles, cu_seqlens, n_segments, n, FLASH_TILE)?;
        let cu = self.ids_address(cu_seqlens);
        scratch.attn_tiles_for = Some(TableKey { cu_seqlens: cu, n_segments, n, bound });
        Ok(())
    }

    /// Forgets a prepared table built from `ids` (which are being rewritten).
    pub(super) fn flash_forget_segments(&self, ids: &CudaSlice<u32>) {
        let mut scratch = self.scratch();
        if let Some(k) = scratch.attn_tiles_for {
            if k.cu_seqlens == self.ids_address(ids) {
                scratch.attn_tiles_for = None;
            }
        }
    }

    /// The device address of an id buffer: what identifies the `cu_seqlens` a table came from.
    fn ids_address(&self, ids: &CudaSlice<u32>) -> u64 {
        let (p, _guard) = ids.device_ptr(&self.stream);
        p
    }

    /// The tile table for these segments in `scratch.attn_tiles`: the prepared one, or one built
    /// now (a caller that did not prepare the batch); returns the grid's x.
    fn tile_table(
        &self,
        scratch: &mut Scratch,
        cu_seqlens: &CudaSlice<u32>,
        n_segments: usize,
        n: usize,
    ) -> Result<usize> {
        if let Some(k) = scratch.attn_tiles_for {
            if k.n_segments == n_segments && k.n == n && k.cu_seqlens == self.ids_address(cu_seqlens) {
                return Ok(k.bound);
            }
        }
        scratch.attn_tiles_for = None;
        self.build_tile_table(&mut scratch.attn_tiles, cu_seqlens, n_segments, n, FLASH_TILE)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn flash_forward(
        &self,
        cfg: FlashConfig,
        out: &mut CudaSlice<half::bf16>,
        lse: &mut CudaSlice<f32>,
        qkv: &CudaSlice<half::bf16>,
        cu_seqlens: &CudaSlice<u32>,
        n_segments: usize,
        n: usize,
        heads: HeadShape,
    ) -> Result<()> {
        let (ni, nhi, nkvi) =
            (int(n, "n")?, int(heads.n_heads, "heads")?, int(heads.n_kv_heads, "kv heads")?);
        check_tile_offsets(heads)?;
        let mut scratch = self.scratch();
        let bound = self.tile_table(&mut scratch, cu_seqlens, n_segments, n)?;
        let table = scratch.attn_tiles.as_ref().expect("built above");
        let s = &self.stream;
        let ks = &self.kernels;
        if let (Some(k), FlashMma::Wgmma) = (cfg.forward_wgmma, self.flash_mma()) {
            let launch_cfg = flash_launch(k, bound, heads.n_heads);
            // SAFETY: as below; forward_wgmma exists for head_dim 64 only.
            unsafe { launch::flash_forward_64_sm90(s, ks, launch_cfg, out, lse, qkv, table, ni, nhi, nkvi) }?;
            return Ok(());
        }
        let launch_cfg = flash_launch(cfg.forward, bound, heads.n_heads);
        // SAFETY: sizes checked by the caller; every tile lies inside one segment of 0..n.
        unsafe {
            launch_for_head_dim!(
                cfg.head_dim,
                [64 => launch::flash_forward_64, 128 => launch::flash_forward_128],
                (s, ks, launch_cfg, out, lse, qkv, table, ni, nhi, nkvi)
            )
        }?;
        Ok(())
    }

    /// dQ, dK and dV from D = rowsum(dO∘O) `[n_heads, n]`, already in `scratch.attn_d`. With
    /// `rope` (its table holds n · head_dim floats), dK and dQ are rotated back as they are
    /// written.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn flash_backward(
        &self,
        cfg: FlashConfig,
        scratch: &mut Scratch,
        dqkv: &mut CudaSlice<half::bf16>,
        dout: &CudaSlice<half::bf16>,
        qkv: &CudaSlice<half::bf16>,
        lse: &CudaSlice<f32>,
        cu_seqlens: &CudaSlice<u32>,
        n_segments: usize,
        n: usize,
        heads: HeadShape,
        rope: Option<(&CudaSlice<f32>, RopeStyle)>,
    ) -> Result<()> {
        let (ni, nhi, nkvi) =
            (int(n, "n")?, int(heads.n_heads, "heads")?, int(heads.n_kv_heads, "kv heads")?);
        // The kernels' rope_style: -1 none, else rope_style_arg (0 adjacent, 1 half split).
        let (rt, rs) = (rope.map(|(t, _)| t), rope.map_or(-1, |(_, style)| rope_style_arg(style)));
        check_tile_offsets(heads)?;
        let bound = self.tile_table(scratch, cu_seqlens, n_segments, n)?;
        // Allocated zeroed, and left zeroed by every launch (the last partial of each q tile
        // resets its semaphore), so they are never cleared in the step.
        ensure(&mut scratch.attn_dq_acc, n * heads.q_width(), &self.stream, "attention dQ accumulator")?;
        ensure(&mut scratch.attn_dq_sem, heads.n_heads * n, &self.stream, "attention dQ semaphores")?;
        let Scratch { attn_tiles, attn_d, attn_dq_acc, attn_dq_sem, .. } = scratch;
        let table = attn_tiles.as_ref().expect("built above");
        let d = attn_d.as_ref().context("attention D was not computed")?;
        let acc = attn_dq_acc.as_mut().expect("ensured above");
        let sem = attn_dq_sem.as_mut().expect("ensured above");

        let (s, ks) = (&self.stream, &self.kernels);
        let dq = self.flash_dq();
        if dq == FlashDq::Atomic {
            if self.flash_dq.acc_dirty.load(Ordering::Relaxed) {
                self.stream.memset_zeros(acc).context("clearing the attention dQ accumulator")?;
                self.flash_dq.acc_dirty.store(false, Ordering::Relaxed);
            }
            // SAFETY: as the ordered launch below, without the semaphores; the accumulator is
            // zero (allocated zeroed, cleared above after an ordered launch, or left zero by the
            // last convert).
            unsafe {
                if let (Some(k), FlashMma::Wgmma) = (cfg.backward_atomic_wgmma, self.flash_mma()) {
                    // backward_atomic_wgmma exists for head_dim 64 only.
                    let launch_cfg = flash_launch(k, bound, heads.n_kv_heads);
                    launch::flash_backward_atomic_64_sm90(
                        s, ks, launch_cfg, dqkv, &mut *acc, dout, qkv, lse, d, table, ni, nhi, nkvi, &rt, rs,
                    )
                    .map_err(anyhow::Error::from)
                } else {
                    let launch_cfg = flash_launch(cfg.backward_atomic, bound, heads.n_kv_heads);
                    launch_for_head_dim!(
                        cfg.head_dim,
                        [64 => launch::flash_backward_atomic_64, 128 => launch::flash_backward_atomic_128],
                        (s, ks, launch_cfg, dqkv, &mut *acc, dout, qkv, lse, d, table, ni, nhi, nkvi, &rt, rs)
                    )
                }
            }?;
            let hdi = int(heads.head_dim, "head_dim")?;
            let steps = n * heads.q_width() / 16;
            // The convert counts its steps in 32 bits.
            int(steps, "flash_dq_convert steps (rows × q width / 16)")?;
            let blocks = steps.div_ceil(DQ_CONVERT_THREADS).clamp(1, DQ_CONVERT_MAX_BLOCKS);
            let convert_cfg = LaunchConfig {
                grid_dim: (blocks as u32, 1, 1),
                block_dim: (DQ_CONVERT_THREADS as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: reads and zeroes the first n·q_width floats of the accumulator and writes
            // the q part of the n rows of dqkv; q_width (n_heads·hd, hd 64 or 128) is a multiple
            // of 8 and a dqkv row a multiple of 16 bytes, as its 16-byte accesses need.
            unsafe { launch::flash_dq_convert(s, ks, convert_cfg, dqkv, acc, ni, nhi, nkvi, hdi, &rt, rs) }?;
            return Ok(());
        }
        self.flash_dq.acc_dirty.store(true, Ordering::Relaxed);
        // SAFETY: writes the q, k and v parts of dqkv rows inside their segments; the accumulator
        // holds n·n_heads·hd floats and the semaphores n_heads·n (ensured above). Both kernels
        // take the same arguments and tile table.
        unsafe {
            if dq == FlashDq::Deferred {
                let launch_cfg = flash_launch(cfg.backward_deferred, bound, heads.n_kv_heads);
                launch_for_head_dim!(
                    cfg.head_dim,
                    [64 => launch::flash_backward_deferred_64, 128 => launch::flash_backward_deferred_128],
                    (s, ks, launch_cfg, dqkv, acc, sem, dout, qkv, lse, d, table, ni, nhi, nkvi, &rt, rs)
                )
            } else if let (Some(k), FlashDq::DeferredQ64, FlashMma::Wgmma) =
                (cfg.backward_deferred_q64_wgmma, dq, self.flash_mma())
            {
                // backward_deferred_q64_wgmma exists for head_dim 64 only.
                let launch_cfg = flash_launch(k, bound, heads.n_kv_heads);
                launch::flash_backward_deferred_q64_64_sm90(
                    s, ks, launch_cfg, dqkv, acc, sem, dout, qkv, lse, d, table, ni, nhi, nkvi, &rt, rs,
                )
                .map_err(anyhow::Error::from)
            } else if dq == FlashDq::DeferredQ64 {
                let launch_cfg = flash_launch(cfg.backward_deferred_q64, bound, heads.n_kv_heads);
                launch_for_head_dim!(
                    cfg.head_dim,
                    [64 => launch::flash_backward_deferred_q64_64, 128 => launch::flash_backward_deferred_128],
                    (s, ks, launch_cfg, dqkv, acc, sem, dout, qkv, lse, d, table, ni, nhi, nkvi, &rt, rs)
                )
            } else if let (Some(k), FlashMma::Wgmma) = (cfg.backward_wgmma, self.flash_mma()) {
                // backward_wgmma exists for head_dim 64 only.
                let launch_cfg = flash_launch(k, bound, heads.n_kv_heads);
                launch::flash_backward_64_sm90(
                    s, ks, launch_cfg, dqkv, acc, sem, dout, qkv, lse, d, table, ni, nhi, nkvi, &rt, rs,
                )
                .map_err(anyhow::Error::from)
            } else {
                let launch_cfg = flash_launch(cfg.backward, bound, heads.n_kv_heads);
                launch_for_head_dim!(
                    cfg.head_dim,
                    [64 => launch::flash_backward_64, 128 => launch::flash_backward_128],
                    (s, ks, launch_cfg, dqkv, acc, sem, dout, qkv, lse, d, table, ni, nhi, nkvi, &rt, rs)
                )
            }
        }?;
        Ok(())
    }
}

/// The forward's K/V copies and the backward's accumulator rows are offset within a tile in
/// 32 bits (`int` row · qkv width): a tile of the widest rows must fit.
fn check_tile_offsets(heads: HeadShape) -> Result<()> {
    int(FLASH_TILE * heads.qkv_width(), "a flash tile of qkv rows (128 × qkv width)").map(|_| ())
}

fn flash_launch(k: FlashKernel, tiles: usize, heads: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (tiles as u32, heads as u32, 1),
        block_dim: ((k.warps * 32) as u32, 1, 1),
        shared_mem_bytes: k.smem as u32,
    }
}

#[cfg(test)]
mod tests {
    //! A CPU model of one warp's `ldmatrix.x4` (plain and `.trans`) and
    //! `mma.m16n8k16.row.col` per the PTX ISA fragment tables, driven by the same address
    //! formulas as `mma_abt` / `mma_py` in flash_attention.cu.
    use super::*;
    use crate::backend::cpu::tile_table;

    const LANES: usize = 32;
    /// Per lane, 4 registers of 2 values (a .b32 holding two bf16; the first is the low half).
    type Regs4 = [[[f32; 2]; 4]; LANES];
    /// Per lane, the 4 fp32 accumulators of a 16×8 C fragment.
    type Acc = [[f32; 4]; LANES];

    /// ldmatrix.m8n8.x4: lanes 8i..8i+7 address the 8 rows of matrix i (8 contiguous values).
    fn ldsm_x4(smem: &[f32], addr: impl Fn(usize) -> usize, trans: bool) -> Regs4 {
        let mut out = [[[0.0; 2]; 4]; LANES];
        for (lane, regs) in out.iter_mut().enumerate() {
            for (i, reg) in regs.iter_mut().enumerate() {
                let m = |r: usize, c: usize| smem[addr(8 * i + r) + c];
                let (g, c) = (lane / 4, lane % 4);
                *reg = if trans { [m(2 * c, g), m(2 * c + 1, g)] } else { [m(g, 2 * c), m(g, 2 * c + 1)] };
            }
        }
        out
    }

    /// d += A·B with A (16×16) from `a`'s fragments and B (16×8) from `b0`, `b1`.
    fn mma(d: &mut Acc, a: &Regs4, b0: &[[f32; 2]; LANES], b1: &[[f32; 2]; LANES]) {
        let mut am = [[0.0f32; 16]; 16];
        let mut bm = [[0.0f32; 8]; 16];
        for lane in 0..LANES {
            let (g, c) = (lane / 4, lane % 4);
            for j in 0..2 {
                am[g][2 * c + j] = a[lane][0][j];
                am[g + 8][2 * c + j] = a[lane][1][j];
                am[g][2 * c + 8 + j] = a[lane][2][j];
                am[g + 8][2 * c + 8 + j] = a[lane][3][j];
                bm[2 * c + j][g] = b0[lane][j];
                bm[2 * c + 8 + j][g] = b1[lane][j];
            }
        }
        for (lane, acc) in d.iter_mut().enumerate() {
            let (g, c) = (lane / 4, lane % 4);
            for (e, v) in acc.iter_mut().enumerate() {
                let (row, col) = (g + 8 * (e / 2), 2 * c + e % 2);
                *v += (0..16).map(|k| am[row][k] * bm[k][col]).sum::<f32>();
            }
        }
    }

    fn reg(r: &Regs4, i: usize) -> [[f32; 2]; LANES] {
        std::array::from_fn(|lane| r[lane][i])
    }

    /// The value of C fragment tile `j` at (row, col) of the 16 × 8·len product.
    fn c_at(acc: &[Acc], row: usize, col: usize) -> f32 {
        let (j, cc) = (col / 8, col % 8);
        let lane = (row % 8) * 4 + cc / 2;
        acc[j][lane][(row / 8) * 2 + cc % 2]
    }

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::Rng::new(seed);
        (0..len).map(|_| (rng.normal() as f32 * 4.0).round() / 4.0).collect()
    }

    const HD: usize = 64;
    const LD: usize = HD + 8;

    /// mma_abt: acc = A (16 × HD) · Xᵀ, X [n][HD].
    fn mma_abt(a_tile: &[f32], x_tile: &[f32], nt8: usize) -> Vec<Acc> {
        let mut acc = vec![[[0.0f32; 4]; LANES]; nt8];
        let a_addr = |lane: usize| (lane % 16) * LD + (lane / 16) * 8;
        let x_addr = |lane: usize| ((lane % 8) + (lane / 16) * 8) * LD + ((lane / 8) % 2) * 8;
        for kk in 0..HD / 16 {
            let a = ldsm_x4(a_tile, |l| a_addr(l) + kk * 16, false);
            for np in 0..nt8 / 2 {
                let b = ldsm_x4(x_tile, |l| x_addr(l) + np * 16 * LD + kk * 16, false);
                mma(&mut acc[2 * np], &a, &reg(&b, 0), &reg(&b, 1));
                mma(&mut acc[2 * np + 1], &a, &reg(&b, 2), &reg(&b, 3));
            }
        }
        acc
    }

    /// mma_py: acc += P (C fragments p, 16 × 16·k16) · Y, Y [k][HD].
    fn mma_py(acc: &mut [Acc], p: &[Acc], y_tile: &[f32], k16: usize) {
        let y_addr = |lane: usize| ((lane % 8) + ((lane / 8) % 2) * 8) * LD + (lane / 16) * 8;
        for kk in 0..k16 {
            let mut a = [[[0.0f32; 2]; 4]; LANES];
            for lane in 0..LANES {
                let (p0, p1) = (&p[2 * kk][lane], &p[2 * kk + 1][lane]);
                a[lane] = [[p0[0], p0[1]], [p0[2], p0[3]], [p1[0], p1[1]], [p1[2], p1[3]]];
            }
            for dp in 0..HD / 16 {
                let b = ldsm_x4(y_tile, |l| y_addr(l) + kk * 16 * LD + dp * 16, true);
                mma(&mut acc[2 * dp], &a, &reg(&b, 0), &reg(&b, 1));
                mma(&mut acc[2 * dp + 1], &a, &reg(&b, 2), &reg(&b, 3));
            }
        }
    }

    #[test]
    fn fragment_model_computes_q_kt_then_p_v() {
        let n = 32;
        let q = values(16 * LD, 1);
        let k = values(n * LD, 2);
        let v = values(n * LD, 3);
        let s = mma_abt(&q, &k, n / 8);
        for r in 0..16 {
            for c in 0..n {
                let want: f32 = (0..HD).map(|t| q[r * LD + t] * k[c * LD + t]).sum();
                assert_eq!(c_at(&s, r, c), want, "S[{r}][{c}]");
            }
        }
        let mut o = vec![[[0.0f32; 4]; LANES]; HD / 8];
        mma_py(&mut o, &s, &v, n / 16);
        for r in 0..16 {
            for c in 0..HD {
                let want: f32 = (0..n).map(|j| c_at(&s, r, j) * v[j * LD + c]).sum();
                let got = c_at(&o, r, c);
                assert!((got - want).abs() <= 1e-3 * want.abs().max(1.0), "O[{r}][{c}]: {got} vs {want}");
            }
        }
    }

    /// The backward's dQ product: A = dS read with ldmatrix.trans from dSᵀ [key][LDS] (rows =
    /// keys), B = K [key][LD] as in mma_py; one warp's 16 q rows × CW columns over BN keys.
    #[test]
    fn fragment_model_computes_ds_k_from_ds_transposed() {
        const BN: usize = 128;
        for (bq, cw) in [(64usize, 32usize), (32, 32)] {
            let lds = bq + 8;
            let dst = values(BN * lds, 4);
            let k = values(BN * LD, 5);
            for (strip, c0) in [(0usize, 0usize), (bq / 16 - 1, HD - cw)] {
                let mut acc = vec![[[0.0f32; 4]; LANES]; cw / 8];
                let a_addr = |l: usize| ((l % 8) + (l / 16) * 8) * lds + strip * 16 + ((l / 8) % 2) * 8;
                let k_addr = |l: usize| ((l % 8) + ((l / 8) % 2) * 8) * LD + c0 + (l / 16) * 8;
                for kk in 0..BN / 16 {
                    let a = ldsm_x4(&dst, |l| a_addr(l) + kk * 16 * lds, true);
                    for cp in 0..cw / 16 {
                        let b = ldsm_x4(&k, |l| k_addr(l) + kk * 16 * LD + cp * 16, true);
                        mma(&mut acc[2 * cp], &a, &reg(&b, 0), &reg(&b, 1));
                        mma(&mut acc[2 * cp + 1], &a, &reg(&b, 2), &reg(&b, 3));
                    }
                }
                for r in 0..16 {
                    for c in 0..cw {
                        let q = strip * 16 + r;
                        let want: f32 = (0..BN).map(|key| dst[key * lds + q] * k[key * LD + c0 + c]).sum();
                        let got = c_at(&acc, r, c);
                        assert!(
                            (got - want).abs() <= 1e-3 * want.abs().max(1.0),
                            "bq {bq} dQ[{q}][{}]: {got} vs {want}",
                            c0 + c
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn dq_accumulation_counts_the_partials_after_the_first() {
        let heads = HeadShape { n_heads: 2, n_kv_heads: 1, head_dim: 64 };
        // 300 rows, q tiles of 64 at 0, 64 (key tile 0: one partial), 128, 192 (two), 256 (44
        // rows, three); 100 rows: all in key tile 0.
        let cu = [0u32, 300, 400];
        let rows_x_extra = 64 + 64 + 2 * 44;
        assert_eq!(dq_accumulation_bytes(&cu, 2, heads, 64), 8.0 * (rows_x_extra * 2 * 64) as f64);
        assert_eq!(dq_accumulation_bytes(&[0, 128], 1, heads, 64), 0.0);
    }

    #[test]
    fn flash_forward_parses_the_kernels_and_names_bad_values() {
        assert_eq!(FlashMma::parse("mma").unwrap(), FlashMma::Mma);
        assert_eq!(FlashMma::parse("WGMMA").unwrap(), FlashMma::Wgmma);
        for &k in FlashMma::ALL {
            assert_eq!(FlashMma::parse(k.name()).unwrap(), k);
        }
        let err = format!("{:#}", FlashMma::parse("tma").unwrap_err());
        assert!(err.contains("\"tma\"") && err.contains("one of mma, wgmma"), "{err}");
    }

    /// The wgmma kernels' shared memory: rows of 128 bytes unpadded, plus the 1 KiB the kernel
    /// may skip to align them to 1024 bytes. The forward: Q [128] and K, V [3][64], within the
    /// two CTAs per SM its __launch_bounds__ asks for (228 KiB of shared memory per SM on an
    /// H100/H200). The backward: K, V [128], Q, dO [2][64], lse, D [2][64] f32, dSᵀ [128][64],
    /// Kᵀ [64][128] (tests/flash_emu/main.cpp launches it with the same); one CTA per SM, as the
    /// mma kernel's registers allow.
    #[test]
    fn the_wgmma_kernels_shared_memory() {
        let k = FLASH_64.forward_wgmma.unwrap();
        assert_eq!(k.smem, (128 + 6 * 64) * 128 + 1024);
        assert_eq!((k.warps, k.tile, k.step), (8, FLASH_TILE, 64));
        assert!(2 * (k.smem + 1024) <= 228 * 1024);
        let b = FLASH_64.backward_wgmma.unwrap();
        assert_eq!(b.smem, (2 * 128 + 4 * 64) * 128 + 4 * 64 * 4 + 2 * 128 * 64 * 2 + 1024);
        assert_eq!((b.warps, b.tile, b.step), (8, FLASH_TILE, 64));
        assert!(b.smem <= 227 * 1024);
        let d = FLASH_64.backward_deferred_q64_wgmma.unwrap();
        assert_eq!(d.smem, b.smem + (2 * 64 * 68 + 64 * 64) * 4);
        assert!(d.smem <= 227 * 1024 && FLASH_128.backward_deferred_q64_wgmma.is_none());
        assert!(FLASH_128.forward_wgmma.is_none() && FLASH_128.backward_wgmma.is_none());
    }

    #[test]
    fn flash_dq_parses_the_modes_and_names_bad_values() {
        assert_eq!(FlashDq::parse("ordered").unwrap(), FlashDq::Ordered);
        assert_eq!(FlashDq::parse("Deferred").unwrap(), FlashDq::Deferred);
        assert_eq!(FlashDq::parse("deferred-Q64").unwrap(), FlashDq::DeferredQ64);
        assert_eq!(FlashDq::parse("Atomic").unwrap(), FlashDq::Atomic);
        // The variant timed and dropped: its name is refused, not silently mapped.
        for bad in ["fast", "pipelined"] {
            let err = format!("{:#}", FlashDq::parse(bad).unwrap_err());
            assert!(
                err.contains(&format!("{bad:?}"))
                    && err.contains("one of ordered, deferred, deferred-q64, atomic"),
                "{err}"
            );
        }
    }

    #[test]
    fn tile_table_covers_each_row_once_inside_its_segment() {
        let cu = [0u32, 1, 17, 17, 1017, 3065, 3066];
        let n = *cu.last().unwrap() as usize;
        for tile in [64usize, 128] {
            let table = tile_table(&cu, tile);
            assert!(table.len() <= tile_bound(n, cu.len() - 1, tile));
            let mut seen = vec![0u32; n];
            for &[q0, start, end] in &table {
                assert!(start <= q0 && q0 < end);
                assert!(cu.windows(2).any(|w| w[0] == start && w[1] == end));
                for r in q0..(q0 + tile as u32).min(end) {
                    seen[r as usize] += 1;
                }
            }
            assert!(seen.iter().all(|&c| c == 1));
        }
    }

    #[test]
    fn every_flash_entry_is_in_a_config() {
        // A flash kernel outside every config would launch without its shared memory limit
        // raised (CUDA_ERROR_INVALID_VALUE, as the pipelined backward first did on an H200).
        let configured: Vec<&str> =
            [FLASH_64, FLASH_128].iter().flat_map(|c| c.kernels().into_iter().map(|k| k.name)).collect();
        let (_, names) = crate::kernels::KERNELS
            .iter()
            .find(|(module, _)| *module == "flash_attention")
            .expect("flash_attention module");
        let entries: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| n.starts_with("flash_forward_") || n.starts_with("flash_backward_"))
            .collect();
        assert_eq!(entries.len(), 9, "{entries:?}");
        for name in entries {
            assert!(configured.contains(&name), "{name} is in no FlashConfig");
        }
    }

    #[test]
    fn configs_match_the_kernel_templates() {
        assert_eq!(FLASH_64.forward.smem, (128 + 6 * 64) * 144);
        assert_eq!(FLASH_64.backward.smem, 74752 + 128 * 72 * 2);
        assert_eq!(FLASH_128.forward.smem, (128 + 6 * 64) * 272);
        assert_eq!(FLASH_128.backward.smem, 104960 + 128 * 40 * 2);
        // Warps of 32 keys: K, V [128] + Q, dO [2][32] rows of 144 bytes, lse and D [2][32] f32, dSᵀ [128][40].
        assert_eq!(FLASH_64.backward_atomic.smem, (256 + 128) * 144 + 512 + 128 * 40 * 2);
        // Deferred: the atomic kernel's tiles + staged partials [2][32][68] + old sums [32][64], f32.
        assert_eq!(
            FLASH_64.backward_deferred.smem,
            FLASH_64.backward_atomic.smem + (2 * 32 * 68 + 32 * 64) * 4
        );
        assert_eq!(
            (FLASH_64.backward_deferred.warps, FLASH_64.backward_deferred.step),
            (FLASH_64.backward_atomic.warps, FLASH_64.backward_atomic.step)
        );
        // Deferred in q tiles of 64: the ordered kernel's tiles + [2][64][68] + [64][64] f32
        // (144,384 bytes, one CTA per SM as the ordered kernel).
        assert_eq!(FLASH_64.backward_deferred_q64.smem, FLASH_64.backward.smem + (2 * 64 * 68 + 64 * 64) * 4);
        assert_eq!(FLASH_64.backward_deferred_q64.smem, 144_384);
        assert_eq!(
            (FLASH_64.backward_deferred_q64.warps, FLASH_64.backward_deferred_q64.step),
            (FLASH_64.backward.warps, FLASH_64.backward.step)
        );
        assert_eq!(FLASH_128.backward_deferred_q64, FLASH_128.backward_deferred);
        // The rows per warp: 32 in the hd 64 forward and atomic backward, else 16.
        assert_eq!(FLASH_64.forward.warps, 4);
        assert_eq!((FLASH_64.backward.warps, FLASH_64.backward_atomic.warps), (8, 4));
        for cfg in [FLASH_64, FLASH_128] {
            for b in [cfg.backward, cfg.backward_deferred, cfg.backward_deferred_q64, cfg.backward_atomic] {
                // The dQ product's warp grid (flash_backward_impl): step/16 strips × column groups.
                let strips = b.step / 16;
                assert_eq!(b.warps % strips, 0);
                assert_eq!((cfg.head_dim / (b.warps / strips)) % 16, 0);
                assert_eq!(b.tile % b.step, 0, "{}", b.name);
            }
            for k in cfg.kernels() {
                assert!(k.smem <= 227 * 1024, "{} exceeds the H100's 227 KiB", k.name);
                assert_eq!(k.tile % (16 * k.warps), 0, "{}: whole m-tiles per warp", k.name);
            }
        }
    }
}
