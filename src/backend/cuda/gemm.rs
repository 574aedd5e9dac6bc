//! GEMMs through cuBLASLt: bf16 operands, fp32 compute, bf16 or fp32 output.
//!
//! cudarc's safe `Matmul` uses one type for A, B and C, but the weight gradients accumulate
//! in fp32 from bf16 operands, so this module drives cuBLASLt's descriptors itself.
//! Buffers are row-major; cuBLASLt is column-major, so a row-major `[r, c]` matrix is a
//! column-major `c × r` matrix with leading dimension `c`.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::ffi::c_void;
use std::mem::size_of;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{bail, Context, Result};
use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use crate::backend::GradMode;

/// cuBLASLt's recommended workspace on Hopper (32 MiB), allocated once.
const WORKSPACE_BYTES: usize = 32 << 20;

/// Element type of a GEMM operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum DType {
    Bf16,
    F32,
}

impl DType {
    fn cuda(self) -> sys::cudaDataType {
        match self {
            DType::Bf16 => sys::cudaDataType_t::CUDA_R_16BF,
            DType::F32 => sys::cudaDataType_t::CUDA_R_32F,
        }
    }
}

/// A column-major GEMM `D = alpha · op(A) · op(B) + beta · C`, C and D `m × n` in one layout, as
/// cuBLASLt states it: D is `c`; C is `c_in`, the output itself for a GEMM that adds into it, or
/// another buffer (the residual stream a projection is added to). Pointers are raw device
/// addresses (already offset) that must stay valid until the stream has run the GEMM.
#[derive(Clone, Copy, Debug)]
pub(super) struct GemmCall {
    pub transa: bool,
    pub transb: bool,
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub a: u64,
    pub lda: i64,
    pub b: u64,
    pub ldb: i64,
    pub c: u64,
    /// What beta multiplies: `c` itself, or a buffer only read.
    pub c_in: u64,
    pub ldc: i64,
    pub c_type: DType,
    pub alpha: f32,
    pub beta: f32,
}

impl GemmCall {
    /// Its name in `--kernel-times`: `cublasLt_gemm` and its shape as cuBLASLt sees it
    /// (column-major `m×n×k`, the transposes of A and B, C's type, `+=` when it adds to C), so
    /// that each shape of a step gets its own row: the slow one shows.
    pub fn timing_label(&self) -> String {
        let t = |x: bool| if x { 'T' } else { 'N' };
        let c = match self.c_type {
            DType::Bf16 => "bf16",
            DType::F32 => "f32",
        };
        let add = if self.beta != 0.0 { " +=" } else { "" };
        format!(
            "cublasLt_gemm {}x{}x{} {}{} {c}{add}",
            self.m,
            self.n,
            self.k,
            t(self.transa),
            t(self.transb)
        )
    }

    /// 2·m·n·k.
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }
}

pub(super) struct Gemm {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    stream: Arc<CudaStream>,
    /// SFT_GEMM_FALLBACK=1: every GEMM uses kernels/matmul.cu (to cross-check cuBLASLt).
    force_fallback: bool,
    /// Heuristic answers timed per shape: [`AUTOTUNE_CANDIDATES`], `SFT_GEMM_CANDIDATES`, or 1
    /// (cuBLASLt's first answer, untimed) with SFT_GEMM_AUTOTUNE=0.
    candidates: usize,
    /// The shapes already reported as having no cuBLASLt algorithm.
    no_algorithm: NoAlgorithmWarnings,
    /// Descriptors, layouts and algorithm per shape, made on the shape's first GEMM.
    plans: Mutex<HashMap<GemmShape, Plan>>,
}

/// Heuristic candidates timed per shape, unless SFT_GEMM_CANDIDATES says otherwise.
const AUTOTUNE_CANDIDATES: usize = 8;
/// The most SFT_GEMM_CANDIDATES may ask for.
const MAX_CANDIDATES: usize = 64;

/// The heuristic answers to time per shape: 1 (the first, untimed) with SFT_GEMM_AUTOTUNE=0,
/// else SFT_GEMM_CANDIDATES (1 to 64) where set, else [`AUTOTUNE_CANDIDATES`].
fn candidate_count(autotune: Option<&str>, candidates: Option<&str>) -> Result<usize> {
    if autotune == Some("0") {
        return Ok(1);
    }
    let Some(v) = candidates else { return Ok(AUTOTUNE_CANDIDATES) };
    match v.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_CANDIDATES).contains(&n) => Ok(n),
        _ => {
            bail!("environment variable SFT_GEMM_CANDIDATES={v:?}: expected a count of 1 to {MAX_CANDIDATES}")
        }
    }
}
/// Timed runs per candidate (after one warm-up run).
const AUTOTUNE_RUNS: usize = 3;
/// A GEMM that adds to its output (beta ≠ 0) is timed into a scratch output of this size at most
/// (so that the timing runs do not add to the real one); a larger one keeps the first heuristic
/// answer. One that overwrites its output is timed in place: the real run rewrites it.
const AUTOTUNE_SCRATCH_BYTES: usize = 256 << 20;

/// The algorithm chosen per (device, shape), for the whole process: two backends on the same
/// device (two models in one run, a test's twice-run) compute the same bits.
fn tuned() -> &'static Mutex<HashMap<(usize, GemmShape), sys::cublasLtMatmulAlgo_t>> {
    static TUNED: OnceLock<Mutex<HashMap<(usize, GemmShape), sys::cublasLtMatmulAlgo_t>>> = OnceLock::new();
    TUNED.get_or_init(Mutex::default)
}

/// What cuBLASLt needs for one GEMM shape, made once: creating and destroying descriptors per
/// call costs more than a small GEMM.
struct Plan {
    desc: Desc,
    a: Layout,
    b: Layout,
    c: Layout,
    /// `None`: cuBLASLt has no algorithm for this shape (the caller falls back).
    algo: Option<sys::cublasLtMatmulAlgo_t>,
}
/// A GEMM's shape and layout: what cuBLASLt's heuristic decides on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct GemmShape {
    transa: bool,
    transb: bool,
    m: u64,
    n: u64,
    k: u64,
    lda: i64,
    ldb: i64,
    ldc: i64,
    c_type: DType,
    /// The operands' pointer alignments (A, B, and the lesser of C and D): cuBLASLt's heuristic
    /// assumes 256 bytes unless told, and LoRA's column slices start at an element offset inside
    /// a row, so an algorithm chosen for aligned operands may not run on a slice.
    align: [u32; 3],
}

impl GemmShape {
    fn of(g: &GemmCall) -> Self {
        GemmShape {
            transa: g.transa,
            transb: g.transb,
            m: g.m,
            n: g.n,
            k: g.k,
            lda: g.lda,
            ldb: g.ldb,
            ldc: g.ldc,
            c_type: g.c_type,
            align: [
                pointer_alignment(g.a),
                pointer_alignment(g.b),
                pointer_alignment(g.c).min(pointer_alignment(g.c_in)),
            ],
        }
    }
}

/// Says once per shape that cuBLASLt offered no algorithm: the fallback kernel is 100× slower
/// or worse, so a run that hits it should say where, but not on every step.
#[derive(Default)]
struct NoAlgorithmWarnings {
    seen: Mutex<HashSet<GemmShape>>,
}

impl NoAlgorithmWarnings {
    /// The warning the first time `g`'s shape has no algorithm, `None` after that.
    fn first_time(&self, g: &GemmCall) -> Option<String> {
        let shape = GemmShape::of(g);
        if !self.seen.lock().unwrap_or_else(|e| e.into_inner()).insert(shape) {
            return None;
        }
        let op = |t: bool| if t { "T" } else { "N" };
        Some(format!(
            "warning: cuBLASLt has no algorithm for the GEMM m={} n={} k={} (op(A)={}, op(B)={}, lda={} ldb={} \
             ldc={}, bf16 in, {:?} out); falling back to kernels/matmul.cu, which is 100x slower or worse",
            g.m,
            g.n,
            g.k,
            op(g.transa),
            op(g.transb),
            g.lda,
            g.ldb,
            g.ldc,
            g.c_type
        ))
    }
}

// The handle is only used through &self on the backend's one stream; cuBLASLt handles may be
// used from any thread as long as calls do not overlap, which the backend's single owner ensures.
unsafe impl Send for Gemm {}
// Descriptors and layouts are host objects that cuBLASLt only reads, under the plans' lock.
unsafe impl Send for Plan {}

impl Drop for Gemm {
    fn drop(&mut self) {
        if !self.handle.is_null() {
            // SAFETY: created by create_handle and destroyed once, here.
            let _ = unsafe { lt::destroy_handle(self.handle) };
        }
    }
}

struct Desc(sys::cublasLtMatmulDesc_t);
impl Drop for Desc {
    fn drop(&mut self) {
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}
struct Layout(sys::cublasLtMatrixLayout_t);
impl Drop for Layout {
    fn drop(&mut self) {
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}
struct Pref(sys::cublasLtMatmulPreference_t);
impl Drop for Pref {
    fn drop(&mut self) {
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

impl Gemm {
    pub(super) fn new(stream: Arc<CudaStream>) -> Result<Self> {
        let var = |name| std::env::var(name).ok();
        let candidates =
            candidate_count(var("SFT_GEMM_AUTOTUNE").as_deref(), var("SFT_GEMM_CANDIDATES").as_deref())?;
        // SAFETY: only probes whether the shared library can be opened.
        if !unsafe { sys::is_culib_present() } {
            bail!(
                "cuBLASLt (libcublasLt.so) was not found; on a box with a Python CUDA environment set \
                 LD_LIBRARY_PATH to its nvidia/*/lib folders (see scripts/gpu_check.sh)"
            );
        }
        let handle = lt::create_handle().context("creating the cuBLASLt handle")?;
        let workspace =
            stream.alloc_zeros::<u8>(WORKSPACE_BYTES).context("allocating the cuBLASLt workspace")?;
        let force_fallback = std::env::var("SFT_GEMM_FALLBACK").is_ok_and(|v| v == "1");
        Ok(Gemm {
            handle,
            workspace,
            stream,
            force_fallback,
            candidates,
            no_algorithm: NoAlgorithmWarnings::default(),
            plans: Mutex::default(),
        })
    }

    /// Runs the GEMM with cuBLASLt; `Ok(false)` when cuBLASLt has no algorithm for it (or the
    /// fallback is forced), in which case the caller runs kernels/matmul.cu instead. A shape's
    /// first call makes its plan (and, with autotuning, times the candidates: one wait for the
    /// device per new shape, in the first step only).
    pub(super) fn run(&self, g: &GemmCall) -> Result<bool> {
        if self.force_fallback {
            return Ok(false);
        }
        self.stream.context().bind_to_thread()?;
        let shape = GemmShape::of(g);
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        let plan = match plans.entry(shape) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                e.insert(self.plan(g, shape).with_context(|| format!("cuBLASLt plan for {g:?}"))?)
            }
        };
        let Some(algo) = plan.algo else {
            if let Some(warning) = self.no_algorithm.first_time(g) {
                crate::say!("{warning}");
            }
            return Ok(false);
        };
        self.matmul(plan, &algo, g, g.c_in, g.c).with_context(|| format!("cuBLASLt matmul {g:?}"))?;
        Ok(true)
    }

    /// The descriptors of `g`'s shape (`shape`, [`GemmShape::of`] `g`) and its algorithm: the
    /// process's earlier choice for this device and shape, else the fastest of cuBLASLt's top
    /// candidates (or its first answer without autotuning).
    fn plan(&self, g: &GemmCall, shape: GemmShape) -> Result<Plan> {
        let desc = Desc(lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )?);
        let ta = g.transa as i32;
        let tb = g.transb as i32;
        // SAFETY: the descriptor is alive; the attribute buffers are i32 as cuBLASLt expects.
        unsafe {
            lt::set_matmul_desc_attribute(
                desc.0,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                &ta as *const i32 as *const c_void,
                size_of::<i32>(),
            )?;
            lt::set_matmul_desc_attribute(
                desc.0,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                &tb as *const i32 as *const c_void,
                size_of::<i32>(),
            )?;
        }
        // Layouts describe the matrices as stored, before op().
        let (a_rows, a_cols) = if g.transa { (g.k, g.m) } else { (g.m, g.k) };
        let (b_rows, b_cols) = if g.transb { (g.n, g.k) } else { (g.k, g.n) };
        let a = Layout(lt::create_matrix_layout(DType::Bf16.cuda(), a_rows, a_cols, g.lda)?);
        let b = Layout(lt::create_matrix_layout(DType::Bf16.cuda(), b_rows, b_cols, g.ldb)?);
        let c = Layout(lt::create_matrix_layout(g.c_type.cuda(), g.m, g.n, g.ldc)?);
        let mut plan = Plan { desc, a, b, c, algo: None };

        let key = (self.stream.context().ordinal(), shape);
        if let Some(&algo) = tuned().lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            plan.algo = Some(algo);
            return Ok(plan);
        }
        let candidates = self.candidates(&plan, self.candidates, shape.align)?;
        let Some(first) = candidates.first().copied() else { return Ok(plan) };
        let best = if candidates.len() > 1 { self.fastest(&plan, &candidates, g)? } else { first };
        plan.algo = Some(best);
        tuned().lock().unwrap_or_else(|e| e.into_inner()).insert(key, best);
        Ok(plan)
    }

    /// Up to `count` of cuBLASLt's heuristic answers, best first by its estimate.
    fn candidates(
        &self,
        plan: &Plan,
        count: usize,
        align: [u32; 3],
    ) -> Result<Vec<sys::cublasLtMatmulAlgo_t>> {
        let pref = Pref(lt::create_matmul_pref()?);
        let ws_size: usize = WORKSPACE_BYTES;
        let mut results: Vec<sys::cublasLtMatmulHeuristicResult_t> = Vec::with_capacity(count);
        let mut returned: std::ffi::c_int = 0;
        // SAFETY: every descriptor is alive; `results` has room for `count` answers, of which
        // cuBLASLt writes `returned`.
        unsafe {
            lt::set_matmul_pref_attribute(
                pref.0,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws_size as *const usize as *const c_void,
                size_of::<usize>(),
            )?;
            // The heuristic cannot see the pointers and assumes 256-byte alignment unless told.
            let [a, b, c] = align;
            for (attr, align) in [
                (sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, a),
                (sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, b),
                (sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, c),
                (sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, c),
            ] {
                lt::set_matmul_pref_attribute(
                    pref.0,
                    attr,
                    &align as *const u32 as *const c_void,
                    size_of::<u32>(),
                )?;
            }
            let status = sys::cublasLtMatmulAlgoGetHeuristic(
                self.handle,
                plan.desc.0,
                plan.a.0,
                plan.b.0,
                plan.c.0,
                plan.c.0,
                pref.0,
                count as std::ffi::c_int,
                results.as_mut_ptr(),
                &mut returned,
            );
            match status {
                sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS => {}
                sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED => return Ok(Vec::new()),
                other => bail!("cuBLASLt heuristic: {other:?}"),
            }
            results.set_len((returned.max(0) as usize).min(count));
        }
        Ok(results
            .into_iter()
            .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .map(|r| r.algo)
            .collect())
    }

    /// The candidate with the least time over [`AUTOTUNE_RUNS`] runs, timed with CUDA events on
    /// the real operands. A GEMM that overwrites its output (or reads C from another buffer) is
    /// timed in place; one that adds to its output, into a scratch output (zeros: the sums are
    /// thrown away), or not at all when that would exceed [`AUTOTUNE_SCRATCH_BYTES`]. A
    /// candidate that fails to run is skipped.
    fn fastest(
        &self,
        plan: &Plan,
        candidates: &[sys::cublasLtMatmulAlgo_t],
        g: &GemmCall,
    ) -> Result<sys::cublasLtMatmulAlgo_t> {
        let elem = match g.c_type {
            DType::Bf16 => 2,
            DType::F32 => 4,
        };
        let bytes = (g.ldc as usize) * (g.n as usize) * elem;
        let scratch = if g.beta == 0.0 || g.c_in != g.c {
            None
        } else if bytes <= AUTOTUNE_SCRATCH_BYTES {
            Some(self.stream.alloc_zeros::<u8>(bytes).context("allocating the autotuning output")?)
        } else {
            return Ok(candidates[0]);
        };
        let (c_in, out) = match &scratch {
            Some(s) => {
                let (p, _guard) = s.device_ptr(&self.stream);
                (p, p)
            }
            None => (g.c_in, g.c),
        };
        let ctx = self.stream.context();
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let (start, end) = (ctx.new_event(timing)?, ctx.new_event(timing)?);
        let mut best: Option<(f32, sys::cublasLtMatmulAlgo_t)> = None;
        for algo in candidates {
            if self.matmul(plan, algo, g, c_in, out).is_err() {
                continue;
            }
            start.record(&self.stream)?;
            let ran = (0..AUTOTUNE_RUNS).try_for_each(|_| self.matmul(plan, algo, g, c_in, out));
            end.record(&self.stream)?;
            let ms = start.elapsed_ms(&end)?;
            if ran.is_ok() && best.is_none_or(|(t, _)| ms < t) {
                best = Some((ms, *algo));
            }
        }
        // The scratch output is freed only after the timed runs (elapsed_ms waited for them).
        drop(scratch);
        Ok(best.map_or(candidates[0], |(_, algo)| algo))
    }

    /// One cublasLtMatmul of `g` with `algo`, reading C from `c_in` and writing D to `out` (g.c_in
    /// and g.c, or the autotuning scratch output of the same layout for both).
    fn matmul(
        &self,
        plan: &Plan,
        algo: &sys::cublasLtMatmulAlgo_t,
        g: &GemmCall,
        c_in: u64,
        out: u64,
    ) -> Result<()> {
        let (ws, _ws_guard) = self.workspace.device_ptr(&self.stream);
        // SAFETY: every descriptor is alive; the pointers are device addresses of buffers that
        // the caller keeps alive, sized by the caller's checks; the workspace is ours.
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc.0,
                &g.alpha as *const f32 as *const c_void,
                &g.beta as *const f32 as *const c_void,
                g.a as *const c_void,
                plan.a.0,
                g.b as *const c_void,
                plan.b.0,
                c_in as *const c_void,
                plan.c.0,
                out as *mut c_void,
                plan.c.0,
                algo,
                ws as *mut c_void,
                WORKSPACE_BYTES,
                self.stream.cu_stream() as sys::cudaStream_t,
            )?;
        }
        Ok(())
    }
}

/// The largest power of two (up to 256) that divides a device address.
fn pointer_alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        256
    } else {
        1u32 << ptr.trailing_zeros().min(8)
    }
}

/// Row-major `out[rows, cols_out] (=|+=) alpha · x[rows, inner] @ w[cols_out, inner]^T`.
#[allow(clippy::too_many_arguments)]
pub(super) fn x_wt(
    rows: usize,
    inner: usize,
    cols_out: usize,
    x: u64,
    w: u64,
    out: u64,
    out_type: DType,
    beta: f32,
) -> GemmCall {
    // Column-major: out^T (cols_out × rows) = w (stored inner × cols_out, transposed) · x^T (inner × rows).
    GemmCall {
        transa: true,
        transb: false,
        m: cols_out as u64,
        n: rows as u64,
        k: inner as u64,
        a: w,
        lda: inner as i64,
        b: x,
        ldb: inner as i64,
        c: out,
        c_in: out,
        ldc: cols_out as i64,
        c_type: out_type,
        alpha: 1.0,
        beta,
    }
}

/// Row-major `out[rows, cols_out] = resid[rows, cols_out] + x[rows, inner] @ w[cols_out, inner]^T`
/// (bf16): [`x_wt`] with beta 1 over another buffer.
pub(super) fn x_wt_plus(
    rows: usize,
    inner: usize,
    cols_out: usize,
    x: u64,
    w: u64,
    resid: u64,
    out: u64,
) -> GemmCall {
    GemmCall { c_in: resid, ..x_wt(rows, inner, cols_out, x, w, out, DType::Bf16, 1.0) }
}

/// Row-major `out[rows, cols] = dy[rows, inner] @ w[inner, cols]` (the input gradient of a Linear).
pub(super) fn dy_w(rows: usize, inner: usize, cols: usize, dy: u64, w: u64, out: u64) -> GemmCall {
    // Column-major: out^T (cols × rows) = w (stored cols × inner) · dy^T (stored inner × rows).
    GemmCall {
        transa: false,
        transb: false,
        m: cols as u64,
        n: rows as u64,
        k: inner as u64,
        a: w,
        lda: cols as i64,
        b: dy,
        ldb: inner as i64,
        c: out,
        c_in: out,
        ldc: cols as i64,
        c_type: DType::Bf16,
        alpha: 1.0,
        beta: 0.0,
    }
}

/// Row-major fp32 `dw[out_dim, in_dim] (=|+=) dy[rows, out_dim]^T @ x[rows, in_dim]`: beta 0
/// for `Overwrite` (what dw held is not read), 1 for `Accumulate`.
pub(super) fn dyt_x(
    rows: usize,
    in_dim: usize,
    out_dim: usize,
    dy: u64,
    x: u64,
    dw: u64,
    mode: GradMode,
) -> GemmCall {
    // Column-major: dw^T (in × out) = x^T (stored in × rows) · dy (stored out × rows, transposed).
    GemmCall {
        transa: false,
        transb: true,
        m: in_dim as u64,
        n: out_dim as u64,
        k: rows as u64,
        a: x,
        lda: in_dim as i64,
        b: dy,
        ldb: out_dim as i64,
        c: dw,
        c_in: dw,
        ldc: in_dim as i64,
        c_type: DType::F32,
        alpha: 1.0,
        beta: match mode {
            GradMode::Overwrite => 0.0,
            GradMode::Accumulate => 1.0,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::{
        candidate_count, dy_w, dyt_x, x_wt, x_wt_plus, DType, GemmCall, NoAlgorithmWarnings,
        AUTOTUNE_CANDIDATES,
    };
    use crate::backend::GradMode;

    #[test]
    fn timing_labels_name_the_shape_and_whether_they_accumulate() {
        let call = |transa, transb, m, n, k, c_type, beta| GemmCall {
            transa,
            transb,
            m,
            n,
            k,
            a: 0,
            lda: 1,
            b: 0,
            ldb: 1,
            c: 0,
            c_in: 0,
            ldc: 1,
            c_type,
            alpha: 1.0,
            beta,
        };
        let fwd = call(true, false, 6144, 16384, 2048, DType::Bf16, 0.0);
        assert_eq!(fwd.timing_label(), "cublasLt_gemm 6144x16384x2048 TN bf16");
        assert_eq!(fwd.flops(), 2.0 * 6144.0 * 16384.0 * 2048.0);
        let dw = call(false, true, 2048, 6144, 16384, DType::F32, 1.0);
        assert_eq!(dw.timing_label(), "cublasLt_gemm 2048x6144x16384 NT f32 +=");
    }

    #[test]
    fn candidate_count_follows_the_environment_and_names_bad_values() {
        assert_eq!(candidate_count(None, None).unwrap(), AUTOTUNE_CANDIDATES);
        assert_eq!(candidate_count(None, Some("32")).unwrap(), 32);
        assert_eq!(candidate_count(Some("1"), Some("2")).unwrap(), 2);
        // Autotuning off wins: cuBLASLt's first answer, untimed.
        assert_eq!(candidate_count(Some("0"), Some("32")).unwrap(), 1);
        for bad in ["0", "65", "many", "-3"] {
            let err = format!("{:#}", candidate_count(None, Some(bad)).unwrap_err());
            assert!(
                err.contains("SFT_GEMM_CANDIDATES") && err.contains(bad) && err.contains("1 to 64"),
                "{err}"
            );
        }
    }

    #[test]
    fn no_algorithm_is_reported_once_per_shape_naming_it() {
        let warnings = NoAlgorithmWarnings::default();
        let g = x_wt(16384, 2048, 128256, 0x1000, 0x2000, 0x3000, DType::F32, 0.0);
        let first = warnings.first_time(&g).expect("first time");
        assert!(first.contains(&format!("m={} n={} k={}", g.m, g.n, g.k)), "{first}");
        assert!(first.contains("100x slower"), "{first}");
        assert_eq!(warnings.first_time(&g), None);
        // Other buffers, same shape: still once.
        let same = x_wt(16384, 2048, 128256, 0x9000, 0x8000, 0x7000, DType::F32, 0.0);
        assert_eq!(warnings.first_time(&same), None);
        let other = x_wt(16384, 2048, 128256, 0x1000, 0x2000, 0x3000, DType::Bf16, 0.0);
        assert!(warnings.first_time(&other).is_some(), "another output type is another shape");
    }

    /// cuBLAS semantics on the host (column-major, op() by the trans flags), as kernels/matmul.cu
    /// implements them: checks that the three row-major forms set shapes and strides right.
    fn emulate(g: &GemmCall, a: &[f32], b: &[f32], c: &mut [f32]) {
        let (m, n, k) = (g.m as usize, g.n as usize, g.k as usize);
        let (lda, ldb, ldc) = (g.lda as usize, g.ldb as usize, g.ldc as usize);
        for j in 0..n {
            for i in 0..m {
                let mut acc = 0.0;
                for l in 0..k {
                    let av = if g.transa { a[l + i * lda] } else { a[i + l * lda] };
                    let bv = if g.transb { b[j + l * ldb] } else { b[l + j * ldb] };
                    acc += av * bv;
                }
                let o = i + j * ldc;
                // cuBLAS reads C only when beta is not zero.
                c[o] = if g.beta == 0.0 { g.alpha * acc } else { g.alpha * acc + g.beta * c[o] };
            }
        }
    }

    fn values(len: usize, salt: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * 7 + salt * 13) % 11) as f32 - 5.0).collect()
    }

    #[test]
    fn row_major_forms_match_plain_loops() {
        let (n, i, o) = (3, 5, 4);
        let x = values(n * i, 1); // [n, i]
        let w = values(o * i, 2); // [o, i]
        let dy = values(n * o, 3); // [n, o]

        let mut out = vec![0.0; n * o];
        emulate(&x_wt(n, i, o, 0, 0, 0, DType::Bf16, 0.0), &w, &x, &mut out);
        for r in 0..n {
            for c in 0..o {
                let want: f32 = (0..i).map(|l| x[r * i + l] * w[c * i + l]).sum();
                assert_eq!(out[r * o + c], want, "x @ w^T at ({r}, {c})");
            }
        }

        // x_wt_plus: x_wt reading C from the residual (address 3) and writing D (address 4).
        let plus = x_wt_plus(n, i, o, 1, 2, 3, 4);
        assert_eq!(
            (plus.b, plus.a, plus.c_in, plus.c, plus.beta, plus.c_type),
            (1, 2, 3, 4, 1.0, DType::Bf16)
        );
        let resid = values(n * o, 5);
        let mut h = resid.clone();
        emulate(&plus, &w, &x, &mut h);
        for r in 0..n {
            for c in 0..o {
                let want = resid[r * o + c] + out[r * o + c];
                assert_eq!(h[r * o + c], want, "resid + x @ w^T at ({r}, {c})");
            }
        }

        let mut dx = vec![0.0; n * i];
        emulate(&dy_w(n, o, i, 0, 0, 0), &w, &dy, &mut dx);
        for r in 0..n {
            for c in 0..i {
                let want: f32 = (0..o).map(|l| dy[r * o + l] * w[l * i + c]).sum();
                assert_eq!(dx[r * i + c], want, "dy @ w at ({r}, {c})");
            }
        }

        let dw0 = values(o * i, 4);
        let mut dw = dw0.clone();
        emulate(&dyt_x(n, i, o, 0, 0, 0, GradMode::Accumulate), &x, &dy, &mut dw);
        for r in 0..o {
            for c in 0..i {
                let want: f32 = dw0[r * i + c] + (0..n).map(|l| dy[l * o + r] * x[l * i + c]).sum::<f32>();
                assert_eq!(dw[r * i + c], want, "dw += dy^T @ x at ({r}, {c})");
            }
        }
        // Overwrite: beta 0, so what dw held (NaN here) is not read.
        let mut dw = vec![f32::NAN; o * i];
        emulate(&dyt_x(n, i, o, 0, 0, 0, GradMode::Overwrite), &x, &dy, &mut dw);
        for r in 0..o {
            for c in 0..i {
                let want: f32 = (0..n).map(|l| dy[l * o + r] * x[l * i + c]).sum();
                assert_eq!(dw[r * i + c], want, "dw = dy^T @ x at ({r}, {c})");
            }
        }
    }
}
