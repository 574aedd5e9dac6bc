//! A [`Backend`] that runs nothing and counts: for every op call, the FLOPs, the bytes the CUDA
//! backend's kernels move (bf16 weights and activations, fp32 gradients, master weights, moments
//! and statistics) and its launches, per op family and kind of kernel.
//!
//! Float buffers hold a length and a precision only, so a 1.3B model costs bookkeeping, not
//! gigabytes; `read` returns zeros. Id buffers keep their contents (a few u32 per token) because
//! the CUDA backend's work depends on them: the loss projects only supervised rows, attention's
//! work follows the segment lengths, embedding backward touches one table row per distinct id.
//!
//! The counts mirror the launch code in src/backend/cuda/*.rs (one file per family there); a change
//! there (a fused kernel, a new launch) must be mirrored here, or the plan drifts from the engine.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

use anyhow::{bail, ensure, Result};

use crate::backend::cuda::{
    cross_entropy_chunk_rows, rmsnorm_dw_chunks, sum_squares_blocks, CROSS_ENTROPY_CHUNK_BUDGET,
    SUM_SQUARES_BLOCKS,
};
use crate::backend::{
    check_column_slice, stats, AdamW, Backend, BranchGrad, Clip, Dropout, GradMode, HeadShape, LossGrads,
    Precision, Rope, RopeGrad, RopeStyle, StateDtype,
};

/// Bytes of a [`Precision::Compute`] element on the CUDA backend (bf16).
pub const COMPUTE_BYTES: usize = 2;
/// cuBLASLt's workspace, allocated once by the CUDA backend (`WORKSPACE_BYTES` in cuda/gemm.rs).
pub const GEMM_WORKSPACE_BYTES: usize = 32 << 20;

/// The op families, named like kernels/*.cu and src/backend/cuda/*.rs; `memory` is the trait's
/// memory ops (uploads, downloads, memsets, device copies).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Embedding,
    Rmsnorm,
    Matmul,
    Rope,
    FlashAttention,
    Swiglu,
    Dropout,
    CrossEntropy,
    GlobalNorm,
    Adamw,
    Cast,
    Memory,
}

impl Family {
    pub const ALL: [Family; 12] = [
        Family::Embedding,
        Family::Rmsnorm,
        Family::Matmul,
        Family::Rope,
        Family::FlashAttention,
        Family::Swiglu,
        Family::Dropout,
        Family::CrossEntropy,
        Family::GlobalNorm,
        Family::Adamw,
        Family::Cast,
        Family::Memory,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Family::Embedding => "embedding",
            Family::Rmsnorm => "rmsnorm",
            Family::Matmul => "matmul",
            Family::Rope => "rope",
            Family::FlashAttention => "flash_attention",
            Family::Swiglu => "swiglu",
            Family::Dropout => "dropout",
            Family::CrossEntropy => "cross_entropy",
            Family::GlobalNorm => "global_norm",
            Family::Adamw => "adamw",
            Family::Cast => "cast",
            Family::Memory => "memory",
        }
    }

    pub fn parse(name: &str) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.name() == name)
    }
}

/// What bounds a kernel, which decides the peak and efficiency it is timed against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelKind {
    /// cuBLASLt bf16 GEMMs (fp32 accumulate): tensor cores.
    Gemm,
    /// The flash attention kernels: tensor cores (mma.sync), with softmax in between.
    Attention,
    /// Our elementwise and reduction kernels: bandwidth, with CUDA-core FLOPs.
    Elementwise,
    /// Memsets and device-to-device copies.
    DeviceCopy,
    /// Host↔device copies; a download also waits for the stream.
    HostTransfer,
}

/// Totals of one (family, kind).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Tally {
    /// Launches: kernels, memsets and copies, each one stream operation.
    pub launches: u64,
    pub flops: f64,
    /// Bytes read plus bytes written in device memory (host bytes for host transfers).
    pub bytes: f64,
    /// Downloads, each a synchronization of the stream with the host.
    pub syncs: u64,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.launches += other.launches;
        self.flops += other.flops;
        self.bytes += other.bytes;
        self.syncs += other.syncs;
    }
}

/// Everything counted since the last [`CountingBackend::take_ledger`].
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    /// Trait op calls per family.
    pub calls: BTreeMap<Family, u64>,
    pub tallies: BTreeMap<(Family, KernelKind), Tally>,
}

impl Ledger {
    /// The totals of one family over all kernel kinds.
    pub fn family(&self, family: Family) -> Tally {
        let mut t = Tally::default();
        for (_, tally) in self.tallies.range((family, KernelKind::Gemm)..=(family, KernelKind::HostTransfer))
        {
            t.add(tally);
        }
        t
    }

    /// The totals of one family's kernels of one kind.
    pub fn tally(&self, family: Family, kind: KernelKind) -> Tally {
        self.tallies.get(&(family, kind)).copied().unwrap_or_default()
    }

    /// The totals of one kernel kind over all families.
    pub fn kind(&self, kind: KernelKind) -> Tally {
        let mut t = Tally::default();
        for ((_, k), tally) in &self.tallies {
            if *k == kind {
                t.add(tally);
            }
        }
        t
    }
}

/// Where the backward of the micro-batch being counted stands, for [`BackwardLedger`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Phase {
    /// Not in a backward (the forward, the optimizer, or the backward's end).
    #[default]
    Outside,
    /// From the fused lm-head + loss through the final norm's backward.
    Head,
    /// The layers' backward, L − 1 down to 0.
    Layers,
    /// The token embeddings' backward.
    Embedding,
}

/// The last micro-batch's backward, counted apart (as well as in the step's [`Ledger`]) in the
/// three stretches after which the trainer's gradient buckets become ready: `sft plan` times the
/// data-parallel gradient collectives that overlap it.
///
/// The stretches follow the model's op order (`Model::backward_micro_batch`): `head` opens with
/// the fused lm-head + loss (its forward logits included: they run after the layers' forward,
/// where the backward starts) and closes with the first `rmsnorm_backward` (the final norm's:
/// the final norm's and lm_head's gradients are then final); `layers` runs up to the
/// `embedding_backward`, which is `embedding`. Without one (LoRA), the backward ends where the
/// next forward (`embedding_forward`) or the optimizer (`sum_squares`, `adamw`) begins.
#[derive(Clone, Debug, Default)]
pub struct BackwardLedger {
    /// The fused lm-head + loss, the loss sum, and the final norm's backward.
    pub head: Ledger,
    /// Every layer's backward, recomputed forward ops included: the layers are alike, so each is
    /// an equal share of it.
    pub layers: Ledger,
    /// The token embeddings' backward (full fine-tuning only).
    pub embedding: Ledger,
}

impl BackwardLedger {
    fn segment(&mut self, phase: Phase) -> Option<&mut Ledger> {
        match phase {
            Phase::Outside => None,
            Phase::Head => Some(&mut self.head),
            Phase::Layers => Some(&mut self.layers),
            Phase::Embedding => Some(&mut self.embedding),
        }
    }
}

/// A float buffer without data.
#[derive(Clone, Debug)]
pub struct CountBuf {
    len: usize,
    precision: Precision,
}

impl CountBuf {
    fn elem(&self) -> usize {
        elem_bytes(self.precision)
    }
}

fn elem_bytes(p: Precision) -> usize {
    match p {
        Precision::Compute => COMPUTE_BYTES,
        Precision::F32 => 4,
        Precision::Bf16 => 2,
    }
}

/// The checks the CUDA backend makes before launching (precision and length), so that a call the
/// GPU would refuse is an error here too.
fn need(buf: &CountBuf, len: usize, precision: Precision, what: &str) -> Result<()> {
    ensure!(
        buf.precision == precision,
        "{what}: expected a {precision:?} buffer, got a {:?} one",
        buf.precision
    );
    ensure!(buf.len >= len, "{what}: buffer holds {} elements, the op needs {len}", buf.len);
    Ok(())
}

fn need_ids(ids: &[u32], len: usize, what: &str) -> Result<()> {
    ensure!(ids.len() >= len, "{what}: id buffer holds {} elements, the op needs {len}", ids.len());
    Ok(())
}

/// The counting backend. See the module documentation.
#[derive(Debug, Default)]
pub struct CountingBackend {
    ledger: RefCell<Ledger>,
    /// Bytes allocated by `zeros`/`zeros_ids` (the CUDA backend's `alloc_zeros`, len ≥ 1).
    allocated: RefCell<usize>,
    /// High-water bytes of each of the CUDA backend's scratch buffers (cuda/scratch.rs).
    scratch: RefCell<BTreeMap<&'static str, usize>>,
    /// The segments whose flash tile table `prepare_segments` built: (`cu_seqlens` address,
    /// segments, rows), forgotten when those ids are rewritten.
    prepared_segments: RefCell<Option<(usize, usize, usize)>>,
    /// Downloads since the backend was made ([`Backend::host_reads`]; `take_ledger` keeps it).
    reads: Cell<u64>,
    /// The latest micro-batch's backward and where it stands (None: no backward seen yet).
    backward: RefCell<Option<BackwardLedger>>,
    phase: Cell<Phase>,
}

impl CountingBackend {
    pub fn new() -> Self {
        CountingBackend::default()
    }

    /// Returns the counts so far and starts afresh.
    pub fn take_ledger(&self) -> Ledger {
        std::mem::take(&mut *self.ledger.borrow_mut())
    }

    /// The latest micro-batch's backward, split as [`BackwardLedger`] says (None: no backward
    /// since the backend was made or this was last called).
    pub fn take_backward(&self) -> Option<BackwardLedger> {
        self.phase.set(Phase::Outside);
        self.backward.borrow_mut().take()
    }

    /// Enters `phase` of the backward; [`Phase::Head`] starts a new one.
    fn enter(&self, phase: Phase) {
        if phase == Phase::Head {
            *self.backward.borrow_mut() = Some(BackwardLedger::default());
        }
        self.phase.set(phase);
    }

    /// Ends the backward, if one is being counted (a forward or the optimizer begins).
    fn leave_backward(&self) {
        self.phase.set(Phase::Outside);
    }

    /// Bytes allocated by the model's buffers so far.
    pub fn allocated_bytes(&self) -> usize {
        *self.allocated.borrow()
    }

    /// The largest size each of the backend's own work buffers reached, summed (cuBLASLt's
    /// workspace excluded).
    pub fn scratch_bytes(&self) -> usize {
        self.scratch.borrow().values().sum()
    }

    fn call(&self, family: Family) {
        *self.ledger.borrow_mut().calls.entry(family).or_default() += 1;
        if let Some(segment) = self.backward.borrow_mut().as_mut().and_then(|b| b.segment(self.phase.get())) {
            *segment.calls.entry(family).or_default() += 1;
        }
    }

    fn count(&self, family: Family, kind: KernelKind, launches: u64, flops: f64, bytes: f64) {
        let add = |ledger: &mut Ledger| {
            let t = ledger.tallies.entry((family, kind)).or_default();
            t.launches += launches;
            t.flops += flops;
            t.bytes += bytes;
        };
        add(&mut self.ledger.borrow_mut());
        if let Some(segment) = self.backward.borrow_mut().as_mut().and_then(|b| b.segment(self.phase.get())) {
            add(segment);
        }
    }

    fn upload(&self, family: Family, bytes: usize) {
        self.count(family, KernelKind::HostTransfer, 1, 0.0, bytes as f64);
    }

    fn download(&self, family: Family, bytes: usize) {
        self.reads.set(self.reads.get() + 1);
        self.count(family, KernelKind::HostTransfer, 1, 0.0, bytes as f64);
        self.ledger.borrow_mut().tallies.entry((family, KernelKind::HostTransfer)).or_default().syncs += 1;
        if let Some(segment) = self.backward.borrow_mut().as_mut().and_then(|b| b.segment(self.phase.get())) {
            segment.tallies.entry((family, KernelKind::HostTransfer)).or_default().syncs += 1;
        }
    }

    fn scratch(&self, slot: &'static str, bytes: usize) {
        let mut s = self.scratch.borrow_mut();
        let e = s.entry(slot).or_default();
        *e = (*e).max(bytes);
    }

    /// One GEMM `[m, k] × [k, n]`: `2·m·n·k` FLOPs; A and B read in bf16, C written in its type
    /// (and read too when accumulating, cuBLASLt's beta = 1).
    fn gemm(&self, family: Family, m: usize, n: usize, k: usize, c_bytes: usize, accumulate: bool) {
        let (m, n, k) = (m as f64, n as f64, k as f64);
        let c = COMPUTE_BYTES as f64;
        let out = m * n * c_bytes as f64 * if accumulate { 2.0 } else { 1.0 };
        self.count(family, KernelKind::Gemm, 1, 2.0 * m * n * k, (m * k + k * n) * c + out);
    }

    fn elementwise(&self, family: Family, launches: u64, flops: f64, bytes: usize) {
        self.count(family, KernelKind::Elementwise, launches, flops, bytes as f64);
    }
}

/// Causal (query, key) pairs inside the segments of `cu_seqlens`: the pairs a causal attention
/// computes, `Σ T(T+1)/2`.
pub fn causal_pairs(cu_seqlens: &[u32], n_segments: usize) -> f64 {
    cu_seqlens[..=n_segments]
        .windows(2)
        .map(|w| {
            let t = w[1].saturating_sub(w[0]) as f64;
            t * (t + 1.0) / 2.0
        })
        .sum()
}

impl Backend for CountingBackend {
    type Buf = CountBuf;
    type Ids = Vec<u32>;

    fn name(&self) -> String {
        "counting (cost model)".to_string()
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn host_reads(&self) -> u64 {
        self.reads.get()
    }
    fn compute_bytes(&self) -> usize {
        COMPUTE_BYTES
    }

    fn zeros(&self, len: usize, precision: Precision) -> Result<CountBuf> {
        *self.allocated.borrow_mut() += len.max(1) * elem_bytes(precision);
        Ok(CountBuf { len, precision })
    }
    fn zeros_ids(&self, len: usize) -> Result<Vec<u32>> {
        *self.allocated.borrow_mut() += len.max(1) * 4;
        Ok(vec![0; len])
    }
    fn write(&self, dst: &mut CountBuf, src: &[f32]) -> Result<()> {
        self.call(Family::Memory);
        ensure!(src.len() <= dst.len, "write: {} values into a buffer of {}", src.len(), dst.len);
        if !src.is_empty() {
            self.upload(Family::Memory, src.len() * dst.elem());
        }
        Ok(())
    }
    fn read(&self, src: &CountBuf, len: usize) -> Result<Vec<f32>> {
        self.call(Family::Memory);
        ensure!(len <= src.len, "read: {len} values from a buffer of {}", src.len);
        if len > 0 {
            self.download(Family::Memory, len * src.elem());
        }
        Ok(vec![0.0; len])
    }
    fn prepare_segments(&self, cu_seqlens: &Vec<u32>, n_segments: usize, n: usize) -> Result<()> {
        need_ids(cu_seqlens, n_segments + 1, "prepare_segments cu_seqlens")?;
        *self.prepared_segments.borrow_mut() = None;
        if n > 0 {
            self.tile_table(n_segments);
            *self.prepared_segments.borrow_mut() = Some((cu_seqlens.as_ptr() as usize, n_segments, n));
        }
        Ok(())
    }
    fn write_ids(&self, dst: &mut Vec<u32>, src: &[u32]) -> Result<()> {
        self.call(Family::Memory);
        self.forget_segments(dst);
        ensure!(src.len() <= dst.len(), "write_ids: {} ids into a buffer of {}", src.len(), dst.len());
        dst[..src.len()].copy_from_slice(src);
        if !src.is_empty() {
            self.upload(Family::Memory, src.len() * 4);
        }
        Ok(())
    }
    fn zero(&self, buf: &mut CountBuf, len: usize) -> Result<()> {
        self.call(Family::Memory);
        ensure!(len <= buf.len, "zero: {len} elements of a buffer of {}", buf.len);
        if len > 0 {
            self.count(Family::Memory, KernelKind::DeviceCopy, 1, 0.0, (len * buf.elem()) as f64);
        }
        Ok(())
    }
    fn copy(&self, dst: &mut CountBuf, src: &CountBuf, len: usize) -> Result<()> {
        ensure!(
            len <= dst.len && len <= src.len,
            "copy: {len} elements between buffers of {} and {}",
            src.len,
            dst.len
        );
        if dst.precision == src.precision {
            self.call(Family::Memory);
            if len > 0 {
                let bytes = 2 * len * src.elem();
                self.count(Family::Memory, KernelKind::DeviceCopy, 1, 0.0, bytes as f64);
            }
        } else {
            // A copy between precisions is the cast kernel (cuda/memory.rs → cuda/cast.rs).
            self.call(Family::Cast);
            if len > 0 {
                self.elementwise(Family::Cast, 1, 0.0, len * (src.elem() + dst.elem()));
            }
        }
        Ok(())
    }

    fn embedding_forward(
        &self,
        out: &mut CountBuf,
        ids: &Vec<u32>,
        table: &CountBuf,
        n: usize,
        d: usize,
    ) -> Result<()> {
        self.leave_backward();
        self.call(Family::Embedding);
        need(out, n * d, Precision::Compute, "embedding_forward out")?;
        need(table, d, Precision::Compute, "embedding_forward table")?;
        need_ids(ids, n, "embedding_forward ids")?;
        if n * d > 0 {
            self.elementwise(Family::Embedding, 1, 0.0, n * 4 + 2 * n * d * COMPUTE_BYTES);
        }
        Ok(())
    }
    fn embedding_backward(
        &self,
        dtable: &mut CountBuf,
        groups: &Vec<u32>,
        n_groups: usize,
        dout: &CountBuf,
        n: usize,
        d: usize,
        mode: GradMode,
    ) -> Result<()> {
        // The backward's last stretch: the embeddings' gradient, after which it ends.
        if self.phase.get() != Phase::Outside {
            self.enter(Phase::Embedding);
        }
        let counted = self.count_embedding_backward(dtable, groups, n_groups, dout, n, d, mode);
        self.leave_backward();
        counted
    }

    fn rmsnorm_forward(
        &self,
        out: &mut CountBuf,
        rstd: &mut CountBuf,
        x: &CountBuf,
        w: &CountBuf,
        n: usize,
        d: usize,
        _eps: f32,
    ) -> Result<()> {
        self.call(Family::Rmsnorm);
        need(out, n * d, Precision::Compute, "rmsnorm_forward out")?;
        need(rstd, n, Precision::F32, "rmsnorm_forward rstd")?;
        need(x, n * d, Precision::Compute, "rmsnorm_forward x")?;
        need(w, d, Precision::Compute, "rmsnorm_forward w")?;
        if n * d > 0 {
            let bytes = 2 * n * d * COMPUTE_BYTES + d * COMPUTE_BYTES + n * 4;
            self.elementwise(Family::Rmsnorm, 1, 4.0 * (n * d) as f64, bytes);
        }
        Ok(())
    }
    fn residual_rmsnorm_forward(
        &self,
        x_out: &mut CountBuf,
        out: &mut CountBuf,
        rstd: &mut CountBuf,
        x_in: &CountBuf,
        delta: &CountBuf,
        w: &CountBuf,
        n: usize,
        d: usize,
        _eps: f32,
        dropout: Option<Dropout>,
    ) -> Result<()> {
        self.call(Family::Rmsnorm);
        if let Some(m) = dropout {
            m.check("residual_rmsnorm_forward")?;
        }
        for (b, what) in [(&*x_out, "x_out"), (&*out, "out"), (x_in, "x_in"), (delta, "delta")] {
            need(b, n * d, Precision::Compute, &format!("residual_rmsnorm_forward {what}"))?;
        }
        need(rstd, n, Precision::F32, "residual_rmsnorm_forward rstd")?;
        need(w, d, Precision::Compute, "residual_rmsnorm_forward w")?;
        if n * d > 0 {
            // Reads x_in and delta, writes x_out and out; the branch's dropout mask (a hash per
            // element) is drawn in the same pass.
            let bytes = 4 * n * d * COMPUTE_BYTES + d * COMPUTE_BYTES + n * 4;
            let mask_flops = if dropout.is_some_and(|m| m.p > 0.0) { 4.0 } else { 0.0 };
            self.elementwise(Family::Rmsnorm, 1, (5.0 + mask_flops) * (n * d) as f64, bytes);
        }
        Ok(())
    }
    fn rmsnorm_backward(
        &self,
        dx: &mut CountBuf,
        dw: &mut CountBuf,
        dout: &CountBuf,
        x: &CountBuf,
        w: &CountBuf,
        rstd: &CountBuf,
        n: usize,
        d: usize,
        branch: Option<BranchGrad<'_, Self>>,
    ) -> Result<()> {
        self.call(Family::Rmsnorm);
        need(dx, n * d, Precision::Compute, "rmsnorm_backward dx")?;
        if let Some(b) = &branch {
            b.dropout.check("rmsnorm_backward")?;
            need(b.out, n * d, Precision::Compute, "rmsnorm_backward branch out")?;
        }
        need(dw, d, Precision::F32, "rmsnorm_backward dw")?;
        need(dout, n * d, Precision::Compute, "rmsnorm_backward dout")?;
        need(x, n * d, Precision::Compute, "rmsnorm_backward x")?;
        need(w, d, Precision::Compute, "rmsnorm_backward w")?;
        need(rstd, n, Precision::F32, "rmsnorm_backward rstd")?;
        if n * d == 0 {
            return Ok(());
        }
        let nd = n * d * COMPUTE_BYTES;
        let (_, chunks) = rmsnorm_dw_chunks(n);
        self.scratch("rms_partial", chunks * d * 4);
        // One kernel: reads dout, x, w, rstd and dx (it adds), writes dx, the per-chunk dw
        // partials and, with a branch, the masked branch gradient (a hash per element).
        let (branch_bytes, branch_flops) = if branch.is_some() { (nd, 4.0) } else { (0, 0.0) };
        let bytes = 4 * nd + branch_bytes + d * COMPUTE_BYTES + n * 4 + chunks * d * 4;
        self.elementwise(Family::Rmsnorm, 1, (8.0 + branch_flops) * (n * d) as f64, bytes);
        // Then the partials' in-order sum into dw.
        self.elementwise(Family::Rmsnorm, 1, (chunks * d) as f64, chunks * d * 4 + 2 * d * 4);
        if self.phase.get() == Phase::Head {
            // The final norm's backward: the head's gradients are final.
            self.enter(Phase::Layers);
        }
        Ok(())
    }

    fn matmul_forward(
        &self,
        out: &mut CountBuf,
        inp: &CountBuf,
        w: &CountBuf,
        n: usize,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<()> {
        self.call(Family::Matmul);
        need(out, n * out_dim, Precision::Compute, "matmul_forward out")?;
        need(inp, n * in_dim, Precision::Compute, "matmul_forward inp")?;
        need(w, out_dim * in_dim, Precision::Compute, "matmul_forward w")?;
        if n * out_dim > 0 {
            self.gemm(Family::Matmul, n, out_dim, in_dim, COMPUTE_BYTES, false);
        }
        Ok(())
    }
    fn matmul_forward_residual(
        &self,
        out: &mut CountBuf,
        resid: &CountBuf,
        inp: &CountBuf,
        w: &CountBuf,
        n: usize,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<()> {
        self.call(Family::Matmul);
        need(out, n * out_dim, Precision::Compute, "matmul_forward_residual out")?;
        need(resid, n * out_dim, Precision::Compute, "matmul_forward_residual resid")?;
        need(inp, n * in_dim, Precision::Compute, "matmul_forward_residual inp")?;
        need(w, out_dim * in_dim, Precision::Compute, "matmul_forward_residual w")?;
        if n * out_dim > 0 {
            // The epilogue reads C (the residual) as an accumulating GEMM reads its output.
            self.gemm(Family::Matmul, n, out_dim, in_dim, COMPUTE_BYTES, true);
        }
        Ok(())
    }
    fn matmul_backward(
        &self,
        dinp: Option<&mut CountBuf>,
        dw: &mut CountBuf,
        dout: &CountBuf,
        inp: &CountBuf,
        w: &CountBuf,
        n: usize,
        in_dim: usize,
        out_dim: usize,
        mode: GradMode,
    ) -> Result<()> {
        self.call(Family::Matmul);
        need(dout, n * out_dim, Precision::Compute, "matmul_backward dout")?;
        need(inp, n * in_dim, Precision::Compute, "matmul_backward inp")?;
        need(w, out_dim * in_dim, Precision::Compute, "matmul_backward w")?;
        need(dw, out_dim * in_dim, Precision::F32, "matmul_backward dw")?;
        if let Some(dinp) = dinp {
            need(dinp, n * in_dim, Precision::Compute, "matmul_backward dinp")?;
            if n * in_dim > 0 {
                self.gemm(Family::Matmul, n, in_dim, out_dim, COMPUTE_BYTES, false);
            }
        }
        if n > 0 {
            // dw (=|+=) dout^T @ inp: fp32 C, read too when accumulating.
            self.gemm(Family::Matmul, out_dim, in_dim, n, 4, mode == GradMode::Accumulate);
        } else if mode == GradMode::Overwrite {
            self.count(Family::Matmul, KernelKind::DeviceCopy, 1, 0.0, (out_dim * in_dim * 4) as f64);
        }
        Ok(())
    }

    fn matmul_forward_slice(
        &self,
        out: &mut CountBuf,
        inp: &CountBuf,
        w: &CountBuf,
        n: usize,
        in_dim: usize,
        out_dim: usize,
        ld: usize,
        col: usize,
        _scale: f32,
        mode: GradMode,
    ) -> Result<()> {
        self.call(Family::Matmul);
        check_column_slice("matmul_forward_slice", col, out_dim, ld)?;
        need(out, n * ld, Precision::Compute, "matmul_forward_slice out")?;
        need(inp, n * in_dim, Precision::Compute, "matmul_forward_slice inp")?;
        need(w, out_dim * in_dim, Precision::Compute, "matmul_forward_slice w")?;
        if n * out_dim > 0 {
            self.gemm(Family::Matmul, n, out_dim, in_dim, COMPUTE_BYTES, mode == GradMode::Accumulate);
        }
        Ok(())
    }
    fn matmul_backward_slice(
        &self,
        dinp: Option<&mut CountBuf>,
        dw: Option<&mut CountBuf>,
        dout: &CountBuf,
        inp: &CountBuf,
        w: &CountBuf,
        n: usize,
        in_dim: usize,
        out_dim: usize,
        ld: usize,
        col: usize,
        _scale: f32,
        mode: GradMode,
    ) -> Result<()> {
        self.call(Family::Matmul);
        check_column_slice("matmul_backward_slice", col, out_dim, ld)?;
        need(dout, n * ld, Precision::Compute, "matmul_backward_slice dout")?;
        need(inp, n * in_dim, Precision::Compute, "matmul_backward_slice inp")?;
        need(w, out_dim * in_dim, Precision::Compute, "matmul_backward_slice w")?;
        if let Some(dinp) = dinp {
            need(dinp, n * in_dim, Precision::Compute, "matmul_backward_slice dinp")?;
            if n * in_dim > 0 {
                self.gemm(Family::Matmul, n, in_dim, out_dim, COMPUTE_BYTES, mode == GradMode::Accumulate);
            }
        }
        if let Some(dw) = dw {
            need(dw, out_dim * in_dim, Precision::F32, "matmul_backward_slice dw")?;
            if n > 0 {
                self.gemm(Family::Matmul, out_dim, in_dim, n, 4, true);
            }
        }
        Ok(())
    }
    fn rope_table(
        &self,
        table: &mut CountBuf,
        positions: &Vec<u32>,
        n: usize,
        head_dim: usize,
        _rope: Rope,
    ) -> Result<()> {
        self.call(Family::Rope);
        ensure!(head_dim.is_multiple_of(2), "rope_table: head_dim {head_dim} is odd");
        need(table, n * head_dim, Precision::F32, "rope_table table")?;
        need_ids(positions, n, "rope_table positions")?;
        let pairs = n * head_dim / 2;
        if pairs > 0 {
            // Reads a position per row and the frequencies, writes (cos, sin) per pair: an f32
            // range reduction and two polynomials (about 20 FLOPs). The frequencies' one upload
            // happens once per process, not per step, so it is not counted.
            self.elementwise(Family::Rope, 1, 20.0 * pairs as f64, n * 4 + head_dim * 2 + pairs * 8);
        }
        Ok(())
    }
    fn rope_forward(
        &self,
        qkv: &mut CountBuf,
        table: &CountBuf,
        n: usize,
        heads: HeadShape,
        _style: RopeStyle,
    ) -> Result<()> {
        self.rope(qkv, table, n, heads, "rope_forward")
    }
    fn rope_backward(
        &self,
        dqkv: &mut CountBuf,
        table: &CountBuf,
        n: usize,
        heads: HeadShape,
        _style: RopeStyle,
    ) -> Result<()> {
        self.rope(dqkv, table, n, heads, "rope_backward")
    }

    fn attention_forward(
        &self,
        out: &mut CountBuf,
        lse: &mut CountBuf,
        qkv: &CountBuf,
        cu_seqlens: &Vec<u32>,
        n_segments: usize,
        n: usize,
        heads: HeadShape,
    ) -> Result<()> {
        self.call(Family::FlashAttention);
        ensure!(n_segments > 0, "attention: no segments (cu_seqlens needs n_segments + 1 offsets)");
        need_ids(cu_seqlens, n_segments + 1, "attention cu_seqlens")?;
        need(out, n * heads.q_width(), Precision::Compute, "attention_forward out")?;
        need(lse, heads.n_heads * n, Precision::F32, "attention_forward lse")?;
        need(qkv, n * heads.qkv_width(), Precision::Compute, "attention_forward qkv")?;
        if n == 0 {
            return Ok(());
        }
        let per_pair = (heads.n_heads * heads.head_dim) as f64;
        let pairs = causal_pairs(cu_seqlens, n_segments);
        self.tile_table_unless_prepared(cu_seqlens, n_segments, n);
        // S = Q·Kᵀ and O = P·V over the causal pairs; q, k, v read once, out and lse written.
        let bytes = n * (heads.qkv_width() + heads.q_width()) * COMPUTE_BYTES + heads.n_heads * n * 4;
        self.count(Family::FlashAttention, KernelKind::Attention, 1, 4.0 * per_pair * pairs, bytes as f64);
        Ok(())
    }
    fn attention_backward(
        &self,
        dqkv: &mut CountBuf,
        dout: &CountBuf,
        qkv: &CountBuf,
        out: &CountBuf,
        lse: &CountBuf,
        cu_seqlens: &Vec<u32>,
        n_segments: usize,
        n: usize,
        heads: HeadShape,
        rope: Option<RopeGrad<'_, Self>>,
    ) -> Result<()> {
        self.call(Family::FlashAttention);
        ensure!(n_segments > 0, "attention: no segments (cu_seqlens needs n_segments + 1 offsets)");
        need_ids(cu_seqlens, n_segments + 1, "attention cu_seqlens")?;
        need(dqkv, n * heads.qkv_width(), Precision::Compute, "attention_backward dqkv")?;
        need(dout, n * heads.q_width(), Precision::Compute, "attention_backward dout")?;
        need(qkv, n * heads.qkv_width(), Precision::Compute, "attention_backward qkv")?;
        need(out, n * heads.q_width(), Precision::Compute, "attention_backward out")?;
        need(lse, heads.n_heads * n, Precision::F32, "attention_backward lse")?;
        if let Some(r) = &rope {
            need(r.table, n * heads.head_dim, Precision::F32, "attention_backward rope table")?;
        }
        if n == 0 {
            return Ok(());
        }
        let (q, qkv_w, kv) = (heads.q_width(), heads.qkv_width(), heads.kv_width());
        let stats = heads.n_heads * n * 4;
        self.scratch("attn_d", stats);
        // D = rowsum(dO∘O).
        self.elementwise(Family::FlashAttention, 1, 2.0 * (n * q) as f64, 2 * n * q * COMPUTE_BYTES + stats);
        self.tile_table_unless_prepared(cu_seqlens, n_segments, n);
        let per_pair = (heads.n_heads * heads.head_dim) as f64;
        let pairs = causal_pairs(cu_seqlens, n_segments);
        // One kernel (flash_backward): recomputes S and dP, then dV = Pᵀ·dO, dK = dSᵀ·Q and
        // dQ = dS·K (5 products). It reads q, k, v, dO, lse and D, writes dq, dk, dv, and moves
        // the fp32 dQ partials of the ordered accumulation (per q tile and key tile).
        let accumulation =
            crate::backend::cuda::flash_attention::backward_q_rows(heads.head_dim).map_or(0.0, |bq| {
                self.scratch("attn_dq_acc", n * q * 4);
                self.scratch("attn_dq_sem", heads.n_heads * n * 4);
                crate::backend::cuda::flash_attention::dq_accumulation_bytes(
                    cu_seqlens, n_segments, heads, bq,
                )
            });
        // With rope, the epilogues read the rows' (cos, sin) pairs as they rotate dK and dQ back.
        let rope_table = if rope.is_some() { n * heads.head_dim * 4 } else { 0 };
        let bytes =
            n * (qkv_w + q) * COMPUTE_BYTES + 2 * stats + n * (q + 2 * kv) * COMPUTE_BYTES + rope_table;
        self.count(
            Family::FlashAttention,
            KernelKind::Attention,
            1,
            10.0 * per_pair * pairs,
            bytes as f64 + accumulation,
        );
        Ok(())
    }
    fn attention_decode(
        &self,
        _out: &mut CountBuf,
        _qkv: &CountBuf,
        _k_cache: &mut CountBuf,
        _v_cache: &mut CountBuf,
        _start: usize,
        _n_new: usize,
        _heads: HeadShape,
    ) -> Result<()> {
        bail!("the cost model plans training steps; generation (attention_decode) is not modelled")
    }

    fn swiglu_forward(&self, out: &mut CountBuf, gate_up: &CountBuf, n: usize, hidden: usize) -> Result<()> {
        self.call(Family::Swiglu);
        need(out, n * hidden, Precision::Compute, "swiglu_forward out")?;
        need(gate_up, n * 2 * hidden, Precision::Compute, "swiglu_forward gate_up")?;
        if n * hidden > 0 {
            self.elementwise(Family::Swiglu, 1, 5.0 * (n * hidden) as f64, 3 * n * hidden * COMPUTE_BYTES);
        }
        Ok(())
    }
    fn swiglu_backward(
        &self,
        dgate_up: &mut CountBuf,
        dout: &CountBuf,
        gate_up: &CountBuf,
        n: usize,
        hidden: usize,
    ) -> Result<()> {
        self.call(Family::Swiglu);
        need(dgate_up, n * 2 * hidden, Precision::Compute, "swiglu_backward dgate_up")?;
        need(dout, n * hidden, Precision::Compute, "swiglu_backward dout")?;
        need(gate_up, n * 2 * hidden, Precision::Compute, "swiglu_backward gate_up")?;
        if n * hidden > 0 {
            self.elementwise(Family::Swiglu, 1, 10.0 * (n * hidden) as f64, 5 * n * hidden * COMPUTE_BYTES);
        }
        Ok(())
    }

    fn dropout(&self, x: &mut CountBuf, len: usize, p: f32, _seed: u64) -> Result<()> {
        self.call(Family::Dropout);
        ensure!((0.0..1.0).contains(&p), "dropout: p = {p} is outside [0, 1)");
        ensure!(len <= x.len, "dropout: {len} elements of a buffer of {}", x.len);
        if p > 0.0 && len > 0 {
            // In place; a hash of (seed, index) per element.
            self.elementwise(Family::Dropout, 1, 4.0 * len as f64, 2 * len * x.elem());
        }
        Ok(())
    }

    fn lm_head_cross_entropy(
        &self,
        x: &CountBuf,
        w: &CountBuf,
        rows: &Vec<u32>,
        targets: &Vec<u32>,
        n_sup: usize,
        n: usize,
        d: usize,
        vocab: usize,
        losses: &mut CountBuf,
        grads: Option<LossGrads<'_, Self>>,
    ) -> Result<()> {
        let f = Family::CrossEntropy;
        if grads.is_some() {
            // The fused lm-head + loss with gradients opens a micro-batch's backward.
            self.enter(Phase::Head);
        }
        self.call(f);
        need(x, n * d, Precision::Compute, "lm_head_cross_entropy x")?;
        need(w, vocab * d, Precision::Compute, "lm_head_cross_entropy w")?;
        need_ids(rows, n_sup, "lm_head_cross_entropy rows")?;
        need_ids(targets, n_sup, "lm_head_cross_entropy targets")?;
        need(losses, n_sup, Precision::F32, "lm_head_cross_entropy losses")?;
        ensure!(n_sup <= n, "lm_head_cross_entropy: {n_sup} supervised rows of {n}");
        if let Some(g) = &grads {
            need(g.dx, n * d, Precision::Compute, "lm_head_cross_entropy dx")?;
            need(g.dw, vocab * d, Precision::F32, "lm_head_cross_entropy dw")?;
        }
        let dw_mode = grads.as_ref().map(|g| g.mode);
        let with_grads = grads.is_some();
        if with_grads {
            self.count(f, KernelKind::DeviceCopy, 1, 0.0, (n * d * COMPUTE_BYTES) as f64);
            if dw_mode == Some(GradMode::Overwrite) && (n_sup == 0 || d == 0) {
                self.count(f, KernelKind::DeviceCopy, 1, 0.0, (vocab * d * 4) as f64);
            }
        }
        if let Some((k, &t)) = targets[..n_sup].iter().enumerate().find(|&(_, &t)| t as usize >= vocab) {
            bail!("lm_head_cross_entropy: supervised row {k} has target {t}, the vocabulary has {vocab} ids");
        }
        if n_sup == 0 || d == 0 {
            return Ok(());
        }
        let chunk = cross_entropy_chunk_rows(n_sup, d, vocab, CROSS_ENTROPY_CHUNK_BUDGET);
        self.scratch("ce_x", chunk * d * COMPUTE_BYTES);
        self.scratch("ce_logits", chunk * vocab * 4);
        if with_grads {
            self.scratch("ce_dx", chunk * d * COMPUTE_BYTES);
            self.scratch("ce_dlogits", chunk * vocab * COMPUTE_BYTES);
        }
        let c = COMPUTE_BYTES;
        for c0 in (0..n_sup).step_by(chunk) {
            let r = chunk.min(n_sup - c0);
            // Gather the chunk's rows, fp32 logits, then losses (and bf16 dlogits) per row.
            self.elementwise(f, 1, 0.0, 2 * r * d * c + r * 4);
            self.gemm(f, r, vocab, d, 4, false);
            let ce_bytes = r * vocab * 4 + r * 8 + if with_grads { r * vocab * c } else { 0 };
            self.elementwise(f, 1, 5.0 * (r * vocab) as f64, ce_bytes);
            if with_grads {
                // dx_chunk = dlogits @ w; dw += dlogits^T @ x_chunk; scatter dx_chunk to its rows.
                self.gemm(f, r, d, vocab, c, false);
                let accumulate = c0 > 0 || dw_mode == Some(GradMode::Accumulate);
                self.gemm(f, vocab, d, r, 4, accumulate);
                self.elementwise(f, 1, 0.0, 2 * r * d * c + r * 4);
            }
        }
        Ok(())
    }

    fn sum_into(
        &self,
        out: &mut CountBuf,
        slot: usize,
        x: &CountBuf,
        len: usize,
        mode: GradMode,
    ) -> Result<()> {
        // The loss sums: global_norm.cu's sum_split, one block.
        self.call(Family::GlobalNorm);
        need(out, slot + stats::SPLIT, Precision::F32, "sum_into statistics")?;
        need(x, len, Precision::F32, "sum_into source")?;
        let split = stats::SPLIT * 4 * if mode == GradMode::Accumulate { 2 } else { 1 };
        self.elementwise(Family::GlobalNorm, 1, len as f64, len * 4 + split);
        Ok(())
    }

    fn sum_squares(&self, bufs: &[&CountBuf], lens: &[usize], out: &mut CountBuf) -> Result<()> {
        self.leave_backward();
        self.call(Family::GlobalNorm);
        ensure!(bufs.len() == lens.len(), "sum_squares: {} buffers but {} lengths", bufs.len(), lens.len());
        need(out, stats::SUMSQ + stats::SPLIT, Precision::F32, "sum_squares statistics")?;
        self.scratch("sumsq_partial", bufs.len() * SUM_SQUARES_BLOCKS * 4);
        let mut partials = 0;
        for (i, (buf, &len)) in bufs.iter().zip(lens).enumerate() {
            if len == 0 {
                continue;
            }
            ensure!(len <= buf.len, "sum_squares: buffer {i} has {} elements, asked for {len}", buf.len);
            let blocks = sum_squares_blocks(len);
            self.elementwise(Family::GlobalNorm, 1, 2.0 * len as f64, len * buf.elem() + blocks * 4);
            partials += blocks;
        }
        // The partials summed on the device (sum_split) into the statistics: no download.
        self.elementwise(Family::GlobalNorm, 1, partials as f64, partials * 4 + stats::SPLIT * 4);
        Ok(())
    }

    fn adamw(
        &self,
        params: &mut [&mut CountBuf],
        master: &mut [&mut CountBuf],
        grads: &[&CountBuf],
        m: &mut [&mut CountBuf],
        v: &mut [&mut CountBuf],
        moments: StateDtype,
        lens: &[usize],
        hp: &AdamW,
        clip: Option<Clip<'_, Self>>,
    ) -> Result<()> {
        self.leave_backward();
        self.call(Family::Adamw);
        if let Some(c) = &clip {
            need(c.sumsq, stats::SUMSQ + stats::SPLIT, Precision::F32, "adamw clip statistics")?;
        }
        let k = lens.len();
        ensure!(
            [params.len(), master.len(), grads.len(), m.len(), v.len()].iter().all(|&l| l == k),
            "adamw: params, master, grads, m, v and lens must have the same count ({k})"
        );
        ensure!(hp.step > 0, "adamw: step is 1-based, got 0");
        let mut elements = 0;
        for i in 0..k {
            let len = lens[i];
            let what = |name: &str| format!("adamw tensor {i} {name}");
            need(master[i], len, Precision::F32, &what("master"))?;
            need(grads[i], len, Precision::F32, &what("grad"))?;
            need(m[i], len, moments.precision(), &what("m"))?;
            need(v[i], len, moments.precision(), &what("v"))?;
            need(params[i], len, Precision::Compute, &what("param"))?;
            elements += len;
        }
        if k == 0 || elements == 0 {
            return Ok(());
        }
        // Six u64 per tensor (five pointers and the length) go up; one launch for all tensors.
        self.upload(Family::Adamw, 6 * k * 8);
        self.scratch("adam_descs", 6 * k * 8);
        // Per element: master (fp32) and m, v (their storage) read and written, the grad read,
        // the bf16 param written.
        let bytes = elements * (2 * (4 + 2 * moments.bytes()) + 4 + COMPUTE_BYTES);
        self.elementwise(Family::Adamw, 1, 15.0 * elements as f64, bytes);
        Ok(())
    }
}

impl CountingBackend {
    #[allow(clippy::too_many_arguments)]
    fn count_embedding_backward(
        &self,
        dtable: &mut CountBuf,
        groups: &[u32],
        n_groups: usize,
        dout: &CountBuf,
        n: usize,
        d: usize,
        mode: GradMode,
    ) -> Result<()> {
        self.call(Family::Embedding);
        need(dout, n * d, Precision::Compute, "embedding_backward dout")?;
        need_ids(groups, n + 2 * n_groups + 1, "embedding_backward groups")?;
        if d == 0 {
            return Ok(());
        }
        let vocab = dtable.len / d;
        let (_, _, ids) = crate::backend::token_groups(groups, n, n_groups)?;
        if let Some((g, &bad)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
            bail!("embedding_backward: group {g} has id {bad}, the table has {vocab} rows");
        }
        if mode == GradMode::Overwrite {
            // The kernel writes only the batch's rows: the rest of the table is zeroed first.
            self.count(Family::Embedding, KernelKind::DeviceCopy, 1, 0.0, (vocab * d * dtable.elem()) as f64);
        }
        if n == 0 || n_groups == 0 {
            return Ok(());
        }
        // The grouping came up with the batch (load_batch); one block per distinct id sums its
        // rows of dout into its table row (read and written).
        let bytes = n * d * COMPUTE_BYTES + n * 4 + (2 * n_groups + 1) * 4 + 2 * n_groups * d * dtable.elem();
        self.elementwise(Family::Embedding, 1, (n * d) as f64, bytes);
        Ok(())
    }

    fn rope(
        &self,
        qkv: &mut CountBuf,
        table: &CountBuf,
        n: usize,
        heads: HeadShape,
        what: &str,
    ) -> Result<()> {
        self.call(Family::Rope);
        ensure!(heads.head_dim.is_multiple_of(2), "rope: head_dim {} is odd", heads.head_dim);
        need(qkv, n * heads.qkv_width(), Precision::Compute, &format!("{what} qkv"))?;
        need(table, n * heads.head_dim, Precision::F32, &format!("{what} table"))?;
        let rotated = n * (heads.n_heads + heads.n_kv_heads) * heads.head_dim;
        if rotated > 0 {
            // In place on the q and k parts of each row: read and written once; the row's
            // (cos, sin) pairs are read once from memory (every head of the row's block shares
            // them through the cache).
            let bytes = 2 * rotated * COMPUTE_BYTES + n * heads.head_dim * 4;
            self.elementwise(Family::Rope, 1, 3.0 * rotated as f64, bytes);
        }
        Ok(())
    }

    /// `flash_tile_table`: one block writes the tile list (a few bytes per tile).
    fn tile_table(&self, n_segments: usize) {
        self.elementwise(Family::FlashAttention, 1, 0.0, (n_segments + 1) * 4);
    }

    /// As the CUDA backend: attention builds a tile table only when `prepare_segments` did not
    /// build one for these segments.
    fn tile_table_unless_prepared(&self, cu_seqlens: &[u32], n_segments: usize, n: usize) {
        let key = (cu_seqlens.as_ptr() as usize, n_segments, n);
        if *self.prepared_segments.borrow() != Some(key) {
            self.tile_table(n_segments);
        }
    }

    fn forget_segments(&self, ids: &[u32]) {
        let mut prepared = self.prepared_segments.borrow_mut();
        if prepared.is_some_and(|(p, _, _)| p == ids.as_ptr() as usize) {
            *prepared = None;
        }
    }
}
