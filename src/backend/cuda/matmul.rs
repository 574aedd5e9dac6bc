//! Linear layers through cuBLASLt, and `run_gemm`, which every GEMM of the backend goes through:
//! cuBLASLt (gemm.rs), or kernels/matmul.cu where cuBLASLt has no algorithm.

use anyhow::Result;
use cudarc::driver::LaunchConfig;
use half::bf16;

use super::gemm::{dy_w, dyt_x, x_wt, x_wt_plus, DType, GemmCall};
use super::launch::{self, int, DevPtr};
use super::{bf16_mut, bf16_of, f32_mut, CudaBackend, CudaBuf};
use crate::backend::{check_column_slice, GradMode};

impl CudaBackend {
    /// One GEMM: cuBLASLt, or kernels/matmul.cu where cuBLASLt has no algorithm.
    pub(super) fn run_gemm(&self, g: &GemmCall) -> Result<()> {
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        let mark = self.kernels.timer.begin(&self.stream)?;
        if self.gemm.run(g)? {
            self.kernels.timer.end_with(&self.stream, mark, || (g.timing_label().into(), g.flops()))?;
            return Ok(());
        }
        let (m, n, k) =
            (int(g.m as usize, "gemm m")?, int(g.n as usize, "gemm n")?, int(g.k as usize, "gemm k")?);
        let (ta, tb) = (g.transa as i32, g.transb as i32);
        let cfg = LaunchConfig {
            grid_dim: ((g.m as u32).div_ceil(16), (g.n as u32).div_ceil(16), 1),
            block_dim: (16, 16, 1),
            shared_mem_bytes: 0,
        };
        let (s, ks) = (&self.stream, &self.kernels);
        let (a, b) = (DevPtr::<bf16>::new(g.a), DevPtr::<bf16>::new(g.b));
        let (lda, ldb, ldc) = (g.lda, g.ldb, g.ldc);
        // The two entries differ only in C's element type.
        macro_rules! fallback {
            ($entry:ident, $t:ty) => {
                launch::$entry(
                    s,
                    ks,
                    cfg,
                    &mut DevPtr::<$t>::new(g.c),
                    &DevPtr::<$t>::new(g.c_in),
                    &a,
                    &b,
                    ta,
                    tb,
                    m,
                    n,
                    k,
                    lda,
                    ldb,
                    ldc,
                    g.alpha,
                    g.beta,
                )
            };
        }
        // SAFETY: the same pointers and shapes cuBLASLt would have used, checked by the caller;
        // c_type says which element type the caller's C (and D) holds.
        unsafe {
            match g.c_type {
                DType::F32 => fallback!(matmul_fallback_f32out, f32),
                DType::Bf16 => fallback!(matmul_fallback_bf16out, bf16),
            }
        }?;
        Ok(())
    }

    pub(super) fn matmul_forward(
        &self,
        out: &mut CudaBuf,
        inp: &CudaBuf,
        w: &CudaBuf,
        n: usize,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<()> {
        let out = bf16_mut(out, n * out_dim, "matmul_forward out")?;
        let inp = bf16_of(inp, n * in_dim, "matmul_forward inp")?;
        let w = bf16_of(w, out_dim * in_dim, "matmul_forward w")?;
        let call =
            x_wt(n, in_dim, out_dim, self.dev_ptr(inp), self.dev_ptr(w), self.dev_ptr(out), DType::Bf16, 0.0);
        self.run_gemm(&call)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn matmul_forward_residual(
        &self,
        out: &mut CudaBuf,
        resid: &CudaBuf,
        inp: &CudaBuf,
        w: &CudaBuf,
        n: usize,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<()> {
        let out = bf16_mut(out, n * out_dim, "matmul_forward_residual out")?;
        let resid = bf16_of(resid, n * out_dim, "matmul_forward_residual resid")?;
        let inp = bf16_of(inp, n * in_dim, "matmul_forward_residual inp")?;
        let w = bf16_of(w, out_dim * in_dim, "matmul_forward_residual w")?;
        let (x, w, resid) = (self.dev_ptr(inp), self.dev_ptr(w), self.dev_ptr(resid));
        self.run_gemm(&x_wt_plus(n, in_dim, out_dim, x, w, resid, self.dev_ptr(out)))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn matmul_backward(
        &self,
        dinp: Option<&mut CudaBuf>,
        dw: &mut CudaBuf,
        dout: &CudaBuf,
        inp: &CudaBuf,
        w: &CudaBuf,
        n: usize,
        in_dim: usize,
        out_dim: usize,
        mode: GradMode,
    ) -> Result<()> {
        let dout = bf16_of(dout, n * out_dim, "matmul_backward dout")?;
        let inp = bf16_of(inp, n * in_dim, "matmul_backward inp")?;
        let w = bf16_of(w, out_dim * in_dim, "matmul_backward w")?;
        let dw = f32_mut(dw, out_dim * in_dim, "matmul_backward dw")?;
        if let Some(dinp) = dinp {
            let dinp = bf16_mut(dinp, n * in_dim, "matmul_backward dinp")?;
            let call = dy_w(n, out_dim, in_dim, self.dev_ptr(dout), self.dev_ptr(w), self.dev_ptr(dinp));
            self.run_gemm(&call)?;
        }
        if n > 0 {
            let (dy, x, dw) = (self.dev_ptr(dout), self.dev_ptr(inp), self.dev_ptr(dw));
            self.run_gemm(&dyt_x(n, in_dim, out_dim, dy, x, dw, mode))?;
        } else if mode == GradMode::Overwrite {
            // No rows: the product is zero, and a GEMM with k = 0 is skipped.
            self.stream.memset_zeros(&mut dw.slice_mut(0..out_dim * in_dim))?;
        }
        Ok(())
    }
}

/// The LoRA GEMMs: the same cuBLASLt path as the Linear layers, on column slices of row-major
/// buffers (a leading dimension and an offset), with a scale and a `GradMode` (beta 0 or 1).
impl CudaBackend {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn matmul_forward_slice(
        &self,
        out: &mut CudaBuf,
        inp: &CudaBuf,
        w: &CudaBuf,
        n: usize,
        in_dim: usize,
        out_dim: usize,
        ld: usize,
        col: usize,
        scale: f32,
        mode: GradMode,
    ) -> Result<()> {
        check_column_slice("matmul_forward_slice", col, out_dim, ld)?;
        let out = bf16_mut(out, n * ld, "matmul_forward_slice out")?;
        let inp = bf16_of(inp, n * in_dim, "matmul_forward_slice inp")?;
        let w = bf16_of(w, out_dim * in_dim, "matmul_forward_slice w")?;
        let beta = if mode == GradMode::Accumulate { 1.0 } else { 0.0 };
        let out_ptr = self.dev_ptr(out) + (col * std::mem::size_of::<bf16>()) as u64;
        let mut call =
            x_wt(n, in_dim, out_dim, self.dev_ptr(inp), self.dev_ptr(w), out_ptr, DType::Bf16, beta);
        call.ldc = ld as i64;
        call.alpha = scale;
        self.run_gemm(&call)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn matmul_backward_slice(
        &self,
        dinp: Option<&mut CudaBuf>,
        dw: Option<&mut CudaBuf>,
        dout: &CudaBuf,
        inp: &CudaBuf,
        w: &CudaBuf,
        n: usize,
        in_dim: usize,
        out_dim: usize,
        ld: usize,
        col: usize,
        scale: f32,
        mode: GradMode,
    ) -> Result<()> {
        check_column_slice("matmul_backward_slice", col, out_dim, ld)?;
        let dout = bf16_of(dout, n * ld, "matmul_backward_slice dout")?;
        let inp = bf16_of(inp, n * in_dim, "matmul_backward_slice inp")?;
        let w = bf16_of(w, out_dim * in_dim, "matmul_backward_slice w")?;
        let dout_ptr = self.dev_ptr(dout) + (col * std::mem::size_of::<bf16>()) as u64;
        if let Some(dinp) = dinp {
            let dinp = bf16_mut(dinp, n * in_dim, "matmul_backward_slice dinp")?;
            let mut call = dy_w(n, out_dim, in_dim, dout_ptr, self.dev_ptr(w), self.dev_ptr(dinp));
            call.ldb = ld as i64;
            call.alpha = scale;
            call.beta = if mode == GradMode::Accumulate { 1.0 } else { 0.0 };
            self.run_gemm(&call)?;
        }
        if let Some(dw) = dw {
            let dw = f32_mut(dw, out_dim * in_dim, "matmul_backward_slice dw")?;
            if n > 0 {
                let mut call = dyt_x(
                    n,
                    in_dim,
                    out_dim,
                    dout_ptr,
                    self.dev_ptr(inp),
                    self.dev_ptr(dw),
                    GradMode::Accumulate,
                );
                call.ldb = ld as i64;
                call.alpha = scale;
                self.run_gemm(&call)?;
            }
        }
        Ok(())
    }
}
