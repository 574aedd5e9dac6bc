//! Linear layers through cuBLASLt, and `run_gemm`, which every GEMM of the backend goes through:
//! cuBLASLt (gemm.rs), or kernels/matmul.cu where cuBLASLt has no algorithm.

use anyhow::Result;
use cudarc::driver::LaunchConfig;
use half::bf16;

use super::gemm::{dy_w, dyt_x, x_wt, DType, GemmCall};
use super::launch::{self, int, DevPtr};
use super::{bf16_mut, bf16_of, f32_mut, CudaBackend, CudaBuf};
use crate::backend::GradMode;

impl CudaBackend {
    /// One GEMM: cuBLASLt, or kernels/matmul.cu where cuBLASLt has no algorithm.
    pub(super) fn run_gemm(&self, g: &GemmCall) -> Result<()> {
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        if self.gemm.run(g)? {
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
        // SAFETY: the same pointers and shapes cuBLASLt would have used, checked by the caller;
        // c_type says which element type the caller's C holds.
        unsafe {
            match g.c_type {
                DType::F32 => launch::matmul_fallback_f32out(
                    s,
                    ks,
                    cfg,
                    &mut DevPtr::<f32>::new(g.c),
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
                ),
                DType::Bf16 => launch::matmul_fallback_bf16out(
                    s,
                    ks,
                    cfg,
                    &mut DevPtr::<bf16>::new(g.c),
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
                ),
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
