//! The CPU reference backend: every op of the trait, plainly, in f32 (training) or f64 (gradient
//! checks).
//!
//! Each op family `F` is a file `F.rs` of free functions on slices, named like the trait's methods
//! and the kernels of `kernels/F.cu` (the CPU twins each CUDA kernel is tested against);
//! [`CpuBackend`] checks buffer sizes and calls them. `real.rs` is the float type they share. Rows run in
//! parallel with rayon, GEMMs go through `matrixmultiply`, and every reduction has a fixed
//! order, so a run is reproducible whatever the thread count.

mod adamw;
mod attention;
mod cross_entropy;
mod dropout;
mod embedding;
mod flash_attention;
mod global_norm;
mod matmul;
#[cfg(test)]
pub(crate) mod mirror_ranks;
mod real;
mod rmsnorm;
mod rope;
mod swiglu;

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{ensure, Result};

pub use adamw::{adamw_tensor, adamw_tensor_clipped, round_bf16};
pub use attention::{attention_backward, attention_decode, attention_forward};
pub use cross_entropy::{lm_head_cross_entropy, lm_head_cross_entropy_rows, CeGrads, CE_CHUNK_ROWS};
pub use dropout::dropout;
pub use embedding::{embedding_backward, embedding_backward_grouped, embedding_forward};
pub use flash_attention::tile_table;
pub use global_norm::{sum, sum_squares};
pub use matmul::{
    matmul_backward, matmul_backward_slice, matmul_forward, matmul_forward_residual, matmul_forward_slice,
};
pub use real::Real;
pub use rmsnorm::{residual_rmsnorm_forward, rmsnorm_backward, rmsnorm_forward};
pub use rope::{rope_backward, rope_forward, rope_table};
pub use swiglu::{swiglu_backward, swiglu_forward};

use super::{
    check_column_slice, stats, AdamW, Backend, BranchGrad, Clip, Dropout, GradMode, HeadShape, LossGrads,
    Precision, Rope, RopeGrad, RopeStyle, StateDtype,
};

/// The CPU backend over float type `T`; [`Precision`] is ignored (everything is `T`).
#[derive(Clone, Debug)]
pub struct CpuBackend<T: Real = f32> {
    _t: PhantomData<T>,
    /// `read` calls: the CPU stands for a device here, so the orchestration's read-backs are
    /// counted as the CUDA backend counts its device-to-host copies (clones share the count).
    reads: Arc<AtomicU64>,
    /// Tests only: device collectives with NCCL's timing (see [`mirror_ranks`]).
    #[cfg(test)]
    mirror: Option<Arc<std::sync::Mutex<mirror_ranks::InFlight<T>>>>,
}

impl<T: Real> CpuBackend<T> {
    pub fn new() -> Self {
        CpuBackend {
            _t: PhantomData,
            reads: Arc::default(),
            #[cfg(test)]
            mirror: None,
        }
    }

    /// Tests only: a backend that joined a job of two ranks as `rank`, the other holding the
    /// same gradients, its sums landing at `wait_ranks` ([`mirror_ranks`]).
    #[cfg(test)]
    pub(crate) fn with_mirror_ranks(rank: usize) -> Self {
        CpuBackend { mirror: Some(mirror_ranks::InFlight::new(rank)), ..Self::new() }
    }
}

impl<T: Real> Default for CpuBackend<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// Fails unless a buffer named `what` holds at least `need` elements.
fn need(what: &str, len: usize, need: usize) -> Result<()> {
    ensure!(len >= need, "cpu backend: {what} holds {len} elements, the op needs {need}");
    Ok(())
}

fn check_ids_below(what: &str, ids: &[u32], limit: usize) -> Result<()> {
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= limit) {
        anyhow::bail!("cpu backend: {what} contains id {bad}, not below {limit}");
    }
    Ok(())
}

/// Stores `x` at `slot` split as [`stats`] says, in f32 values whatever `T` is (`read` returns
/// f32), as the GPU does.
fn store_split<T: Real>(out: &mut [T], slot: usize, x: f64) {
    for (o, v) in out[slot..slot + stats::SPLIT].iter_mut().zip(stats::split(x)) {
        *o = T::from_f32(v);
    }
}

/// The f64 value split at `slot`.
fn join_split<T: Real>(buf: &[T], slot: usize) -> f64 {
    buf[slot..slot + stats::SPLIT].iter().map(|v| v.to_f64()).sum()
}

fn check_heads(heads: HeadShape) -> Result<()> {
    ensure!(
        heads.n_kv_heads > 0 && heads.n_heads.is_multiple_of(heads.n_kv_heads),
        "cpu backend: n_heads {} is not a multiple of n_kv_heads {}",
        heads.n_heads,
        heads.n_kv_heads
    );
    Ok(())
}

fn check_segments(cu: &[u32], n_segments: usize, n: usize) -> Result<()> {
    need("cu_seqlens", cu.len(), n_segments + 1)?;
    ensure!(cu[0] == 0, "cpu backend: cu_seqlens must start at 0, starts at {}", cu[0]);
    ensure!(
        cu[n_segments] as usize == n,
        "cpu backend: cu_seqlens must end at n = {n}, ends at {}",
        cu[n_segments]
    );
    ensure!(cu[..=n_segments].windows(2).all(|p| p[0] <= p[1]), "cpu backend: cu_seqlens decreases");
    Ok(())
}

impl<T: Real> Backend for CpuBackend<T> {
    type Buf = Vec<T>;
    type Ids = Vec<u32>;

    fn name(&self) -> String {
        format!("cpu ({})", std::any::type_name::<T>())
    }

    fn compute_bytes(&self) -> usize {
        std::mem::size_of::<T>()
    }

    /// The host's available and total memory: the CPU backend allocates from it.
    fn memory_info(&self) -> Result<Option<(usize, usize)>> {
        Ok(super::device::host_memory())
    }

    #[cfg(test)]
    fn all_reduce_sum_ranks(&self, bufs: &mut [Vec<T>], lens: &[usize]) -> Result<bool> {
        let Some(mirror) = &self.mirror else { return Ok(false) };
        mirror.lock().unwrap().hand_over(bufs, lens, None);
        Ok(true)
    }

    #[cfg(test)]
    fn reduce_sum_ranks(&self, bufs: &mut [Vec<T>], lens: &[usize], roots: &[usize]) -> Result<bool> {
        let Some(mirror) = &self.mirror else { return Ok(false) };
        mirror.lock().unwrap().hand_over(bufs, lens, Some(roots));
        Ok(true)
    }

    #[cfg(test)]
    fn wait_ranks(&self) -> Result<()> {
        if let Some(mirror) = &self.mirror {
            mirror.lock().unwrap().land();
        }
        Ok(())
    }

    fn zeros(&self, len: usize, _: Precision) -> Result<Vec<T>> {
        Ok(vec![T::ZERO; len])
    }
    fn zeros_ids(&self, len: usize) -> Result<Vec<u32>> {
        Ok(vec![0; len])
    }
    fn write(&self, dst: &mut Vec<T>, src: &[f32]) -> Result<()> {
        need("write destination", dst.len(), src.len())?;
        dst.iter_mut().zip(src).for_each(|(d, &s)| *d = T::from_f32(s));
        Ok(())
    }
    fn read(&self, src: &Vec<T>, len: usize) -> Result<Vec<f32>> {
        need("read source", src.len(), len)?;
        self.reads.fetch_add(1, Ordering::Relaxed);
        Ok(src[..len].iter().map(|&x| x.to_f32()).collect())
    }
    fn write_ids(&self, dst: &mut Vec<u32>, src: &[u32]) -> Result<()> {
        need("id destination", dst.len(), src.len())?;
        dst[..src.len()].copy_from_slice(src);
        Ok(())
    }
    fn zero(&self, buf: &mut Vec<T>, len: usize) -> Result<()> {
        need("buffer", buf.len(), len)?;
        buf[..len].fill(T::ZERO);
        Ok(())
    }
    fn copy(&self, dst: &mut Vec<T>, src: &Vec<T>, len: usize) -> Result<()> {
        need("copy source", src.len(), len)?;
        need("copy destination", dst.len(), len)?;
        dst[..len].copy_from_slice(&src[..len]);
        Ok(())
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn host_reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    fn embedding_forward(
        &self,
        out: &mut Vec<T>,
        ids: &Vec<u32>,
        table: &Vec<T>,
        n: usize,
        d: usize,
    ) -> Result<()> {
        need("out", out.len(), n * d)?;
        need("ids", ids.len(), n)?;
        check_ids_below("ids", &ids[..n], table.len() / d.max(1))?;
        embedding_forward(out, ids, table, n, d);
        Ok(())
    }
    fn embedding_backward(
        &self,
        dtable: &mut Vec<T>,
        groups: &Vec<u32>,
        n_groups: usize,
        dout: &Vec<T>,
        n: usize,
        d: usize,
        mode: GradMode,
    ) -> Result<()> {
        need("dout", dout.len(), n * d)?;
        let (order, start, ids) = super::token_groups(groups, n, n_groups)?;
        check_ids_below("group ids", ids, dtable.len() / d.max(1))?;
        check_ids_below("token order", order, n)?;
        ensure!(
            start.first() == Some(&0)
                && start.last() == Some(&(n as u32))
                && start.windows(2).all(|w| w[0] <= w[1]),
            "cpu backend: embedding group starts must rise from 0 to n = {n}"
        );
        let rows = dtable.len() / d.max(1) * d;
        embedding_backward_grouped(&mut dtable[..rows], order, start, ids, dout, d, mode);
        Ok(())
    }

    fn rmsnorm_forward(
        &self,
        out: &mut Vec<T>,
        rstd: &mut Vec<T>,
        x: &Vec<T>,
        w: &Vec<T>,
        n: usize,
        d: usize,
        eps: f32,
    ) -> Result<()> {
        for (what, len, want) in
            [("out", out.len(), n * d), ("rstd", rstd.len(), n), ("x", x.len(), n * d), ("w", w.len(), d)]
        {
            need(what, len, want)?;
        }
        rmsnorm_forward(out, rstd, x, w, n, d, eps);
        Ok(())
    }
    fn residual_rmsnorm_forward(
        &self,
        x_out: &mut Vec<T>,
        out: &mut Vec<T>,
        rstd: &mut Vec<T>,
        x_in: &Vec<T>,
        delta: &Vec<T>,
        w: &Vec<T>,
        n: usize,
        d: usize,
        eps: f32,
        dropout: Option<Dropout>,
    ) -> Result<()> {
        if let Some(m) = dropout {
            m.check("residual_rmsnorm_forward")?;
        }
        for (what, len, want) in [
            ("x_out", x_out.len(), n * d),
            ("out", out.len(), n * d),
            ("rstd", rstd.len(), n),
            ("x_in", x_in.len(), n * d),
            ("delta", delta.len(), n * d),
            ("w", w.len(), d),
        ] {
            need(what, len, want)?;
        }
        residual_rmsnorm_forward(x_out, out, rstd, x_in, delta, w, n, d, eps, dropout);
        Ok(())
    }
    fn rmsnorm_backward(
        &self,
        dx: &mut Vec<T>,
        dw: &mut Vec<T>,
        dout: &Vec<T>,
        x: &Vec<T>,
        w: &Vec<T>,
        rstd: &Vec<T>,
        n: usize,
        d: usize,
        branch: Option<BranchGrad<'_, Self>>,
    ) -> Result<()> {
        for (what, len, want) in [
            ("dx", dx.len(), n * d),
            ("dw", dw.len(), d),
            ("dout", dout.len(), n * d),
            ("x", x.len(), n * d),
            ("w", w.len(), d),
            ("rstd", rstd.len(), n),
        ] {
            need(what, len, want)?;
        }
        if let Some(b) = &branch {
            b.dropout.check("rmsnorm_backward")?;
            need("branch out", b.out.len(), n * d)?;
        }
        rmsnorm_backward(dx, dw, dout, x, w, rstd, n, d, branch.map(|b| (b.out.as_mut_slice(), b.dropout)));
        Ok(())
    }

    fn matmul_forward(
        &self,
        out: &mut Vec<T>,
        inp: &Vec<T>,
        w: &Vec<T>,
        n: usize,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<()> {
        need("out", out.len(), n * out_dim)?;
        need("inp", inp.len(), n * in_dim)?;
        need("w", w.len(), out_dim * in_dim)?;
        matmul_forward(out, inp, w, n, in_dim, out_dim);
        Ok(())
    }
    fn matmul_forward_residual(
        &self,
        out: &mut Vec<T>,
        resid: &Vec<T>,
        inp: &Vec<T>,
        w: &Vec<T>,
        n: usize,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<()> {
        need("out", out.len(), n * out_dim)?;
        need("resid", resid.len(), n * out_dim)?;
        need("inp", inp.len(), n * in_dim)?;
        need("w", w.len(), out_dim * in_dim)?;
        matmul_forward_residual(out, resid, inp, w, n, in_dim, out_dim);
        Ok(())
    }
    fn matmul_backward(
        &self,
        dinp: Option<&mut Vec<T>>,
        dw: &mut Vec<T>,
        dout: &Vec<T>,
        inp: &Vec<T>,
        w: &Vec<T>,
        n: usize,
        in_dim: usize,
        out_dim: usize,
        mode: GradMode,
    ) -> Result<()> {
        if let Some(dinp) = dinp.as_ref() {
            need("dinp", dinp.len(), n * in_dim)?;
        }
        need("dw", dw.len(), out_dim * in_dim)?;
        need("dout", dout.len(), n * out_dim)?;
        need("inp", inp.len(), n * in_dim)?;
        need("w", w.len(), out_dim * in_dim)?;
        matmul_backward(dinp.map(|b| b.as_mut_slice()), dw, dout, inp, w, n, in_dim, out_dim, mode);
        Ok(())
    }

    fn matmul_forward_slice(
        &self,
        out: &mut Vec<T>,
        inp: &Vec<T>,
        w: &Vec<T>,
        n: usize,
        in_dim: usize,
        out_dim: usize,
        ld: usize,
        col: usize,
        scale: f32,
        mode: GradMode,
    ) -> Result<()> {
        check_column_slice("matmul_forward_slice", col, out_dim, ld)?;
        need("out", out.len(), n * ld)?;
        need("inp", inp.len(), n * in_dim)?;
        need("w", w.len(), out_dim * in_dim)?;
        let scale = T::from_f32(scale);
        matmul_forward_slice(out, inp, w, n, in_dim, out_dim, ld, col, scale, mode);
        Ok(())
    }
    fn matmul_backward_slice(
        &self,
        dinp: Option<&mut Vec<T>>,
        dw: Option<&mut Vec<T>>,
        dout: &Vec<T>,
        inp: &Vec<T>,
        w: &Vec<T>,
        n: usize,
        in_dim: usize,
        out_dim: usize,
        ld: usize,
        col: usize,
        scale: f32,
        mode: GradMode,
    ) -> Result<()> {
        check_column_slice("matmul_backward_slice", col, out_dim, ld)?;
        if let Some(dinp) = dinp.as_ref() {
            need("dinp", dinp.len(), n * in_dim)?;
        }
        if let Some(dw) = dw.as_ref() {
            need("dw", dw.len(), out_dim * in_dim)?;
        }
        need("dout", dout.len(), n * ld)?;
        need("inp", inp.len(), n * in_dim)?;
        need("w", w.len(), out_dim * in_dim)?;
        let scale = T::from_f32(scale);
        matmul_backward_slice(
            dinp.map(|b| b.as_mut_slice()),
            dw.map(|b| b.as_mut_slice()),
            dout,
            inp,
            w,
            n,
            in_dim,
            out_dim,
            ld,
            col,
            scale,
            mode,
        );
        Ok(())
    }
    fn rope_table(
        &self,
        table: &mut Vec<T>,
        positions: &Vec<u32>,
        n: usize,
        head_dim: usize,
        rope: Rope,
    ) -> Result<()> {
        need("rope table", table.len(), n * head_dim)?;
        need("positions", positions.len(), n)?;
        rope_table(table, positions, n, head_dim, rope);
        Ok(())
    }
    fn rope_forward(
        &self,
        qkv: &mut Vec<T>,
        table: &Vec<T>,
        n: usize,
        heads: HeadShape,
        style: RopeStyle,
    ) -> Result<()> {
        need("qkv", qkv.len(), n * heads.qkv_width())?;
        need("rope table", table.len(), n * heads.head_dim)?;
        rope_forward(qkv, table, n, heads, style);
        Ok(())
    }
    fn rope_backward(
        &self,
        dqkv: &mut Vec<T>,
        table: &Vec<T>,
        n: usize,
        heads: HeadShape,
        style: RopeStyle,
    ) -> Result<()> {
        need("dqkv", dqkv.len(), n * heads.qkv_width())?;
        need("rope table", table.len(), n * heads.head_dim)?;
        rope_backward(dqkv, table, n, heads, style);
        Ok(())
    }

    fn attention_forward(
        &self,
        out: &mut Vec<T>,
        lse: &mut Vec<T>,
        qkv: &Vec<T>,
        cu_seqlens: &Vec<u32>,
        n_segments: usize,
        n: usize,
        heads: HeadShape,
    ) -> Result<()> {
        check_heads(heads)?;
        check_segments(cu_seqlens, n_segments, n)?;
        need("out", out.len(), n * heads.q_width())?;
        need("lse", lse.len(), n * heads.n_heads)?;
        need("qkv", qkv.len(), n * heads.qkv_width())?;
        attention_forward(out, lse, qkv, cu_seqlens, n_segments, n, heads);
        Ok(())
    }
    fn attention_backward(
        &self,
        dqkv: &mut Vec<T>,
        dout: &Vec<T>,
        qkv: &Vec<T>,
        out: &Vec<T>,
        lse: &Vec<T>,
        cu_seqlens: &Vec<u32>,
        n_segments: usize,
        n: usize,
        heads: HeadShape,
        rope: Option<RopeGrad<'_, Self>>,
    ) -> Result<()> {
        check_heads(heads)?;
        check_segments(cu_seqlens, n_segments, n)?;
        need("dqkv", dqkv.len(), n * heads.qkv_width())?;
        need("dout", dout.len(), n * heads.q_width())?;
        need("qkv", qkv.len(), n * heads.qkv_width())?;
        need("out", out.len(), n * heads.q_width())?;
        need("lse", lse.len(), n * heads.n_heads)?;
        attention_backward(dqkv, dout, qkv, out, lse, cu_seqlens, n_segments, n, heads);
        match rope {
            Some(r) => self.rope_backward(dqkv, r.table, n, heads, r.style),
            None => Ok(()),
        }
    }
    fn attention_decode(
        &self,
        out: &mut Vec<T>,
        qkv: &Vec<T>,
        k_cache: &mut Vec<T>,
        v_cache: &mut Vec<T>,
        start: usize,
        n_new: usize,
        heads: HeadShape,
    ) -> Result<()> {
        check_heads(heads)?;
        need("out", out.len(), n_new * heads.q_width())?;
        need("qkv", qkv.len(), n_new * heads.qkv_width())?;
        need("k_cache", k_cache.len(), (start + n_new) * heads.kv_width())?;
        need("v_cache", v_cache.len(), (start + n_new) * heads.kv_width())?;
        attention_decode(out, qkv, k_cache, v_cache, start, n_new, heads);
        Ok(())
    }

    fn swiglu_forward(&self, out: &mut Vec<T>, gate_up: &Vec<T>, n: usize, hidden: usize) -> Result<()> {
        need("out", out.len(), n * hidden)?;
        need("gate_up", gate_up.len(), 2 * n * hidden)?;
        swiglu_forward(out, gate_up, n, hidden);
        Ok(())
    }
    fn swiglu_backward(
        &self,
        dgate_up: &mut Vec<T>,
        dout: &Vec<T>,
        gate_up: &Vec<T>,
        n: usize,
        hidden: usize,
    ) -> Result<()> {
        need("dgate_up", dgate_up.len(), 2 * n * hidden)?;
        need("dout", dout.len(), n * hidden)?;
        need("gate_up", gate_up.len(), 2 * n * hidden)?;
        swiglu_backward(dgate_up, dout, gate_up, n, hidden);
        Ok(())
    }

    fn dropout(&self, x: &mut Vec<T>, len: usize, p: f32, seed: u64) -> Result<()> {
        ensure!((0.0..1.0).contains(&p), "cpu backend: dropout probability {p} is not in [0, 1)");
        need("x", x.len(), len)?;
        dropout(x, len, p, seed);
        Ok(())
    }

    fn lm_head_cross_entropy(
        &self,
        x: &Vec<T>,
        w: &Vec<T>,
        rows: &Vec<u32>,
        targets: &Vec<u32>,
        n_sup: usize,
        n: usize,
        d: usize,
        vocab: usize,
        losses: &mut Vec<T>,
        grads: Option<LossGrads<'_, Self>>,
    ) -> Result<()> {
        need("x", x.len(), n * d)?;
        need("w", w.len(), vocab * d)?;
        need("rows", rows.len(), n_sup)?;
        need("targets", targets.len(), n_sup)?;
        need("losses", losses.len(), n_sup)?;
        check_ids_below("targets", &targets[..n_sup], vocab)?;
        check_ids_below("rows", &rows[..n_sup], n)?;
        ensure!(rows[..n_sup].windows(2).all(|r| r[0] < r[1]), "cpu backend: supervised rows must ascend");
        // The reference loops over every row and skips the unsupervised ones: mark them with an
        // id no target has.
        let unsupervised = u32::MAX;
        let mut full = vec![unsupervised; n];
        for (&r, &t) in rows[..n_sup].iter().zip(&targets[..n_sup]) {
            full[r as usize] = t;
        }
        let grads = match grads {
            Some(g) => {
                need("dx", g.dx.len(), n * d)?;
                need("dw", g.dw.len(), vocab * d)?;
                if g.mode == GradMode::Overwrite {
                    g.dw[..vocab * d].fill(T::ZERO);
                }
                Some(CeGrads { dx: g.dx.as_mut_slice(), dw: g.dw.as_mut_slice(), loss_scale: g.loss_scale })
            }
            None => None,
        };
        lm_head_cross_entropy_rows(x, w, &full, unsupervised, n, d, vocab, grads, Some(&mut losses[..n_sup]));
        Ok(())
    }

    fn sum_into(&self, out: &mut Vec<T>, slot: usize, x: &Vec<T>, len: usize, mode: GradMode) -> Result<()> {
        need("sum source", x.len(), len)?;
        need("statistics", out.len(), slot + stats::SPLIT)?;
        let before = match mode {
            GradMode::Overwrite => 0.0,
            GradMode::Accumulate => join_split(out, slot),
        };
        store_split(out, slot, before + sum(&x[..len]));
        Ok(())
    }

    fn sum_squares(&self, bufs: &[&Vec<T>], lens: &[usize], out: &mut Vec<T>) -> Result<()> {
        ensure!(bufs.len() == lens.len(), "cpu backend: {} buffers but {} lengths", bufs.len(), lens.len());
        for (b, &l) in bufs.iter().zip(lens) {
            need("buffer", b.len(), l)?;
        }
        need("statistics", out.len(), stats::SUMSQ + stats::SPLIT)?;
        let slices: Vec<&[T]> = bufs.iter().map(|b| b.as_slice()).collect();
        store_split(out, stats::SUMSQ, sum_squares(&slices, lens));
        Ok(())
    }
    fn adamw(
        &self,
        params: &mut [&mut Vec<T>],
        master: &mut [&mut Vec<T>],
        grads: &[&Vec<T>],
        m: &mut [&mut Vec<T>],
        v: &mut [&mut Vec<T>],
        moments: StateDtype,
        lens: &[usize],
        hp: &AdamW,
        clip: Option<Clip<'_, Self>>,
    ) -> Result<()> {
        let k = lens.len();
        let factor = match clip {
            Some(c) => {
                need("statistics", c.sumsq.len(), stats::SUMSQ + stats::SPLIT)?;
                let sumsq = join_split(c.sumsq, stats::SUMSQ);
                match super::clip_factor(sumsq, c.max_norm) {
                    Some(f) => f,
                    // A non-finite norm: no update, as on the GPU; the caller reports the norm.
                    None => return Ok(()),
                }
            }
            None => 1.0,
        };
        ensure!(
            params.len() == k && master.len() == k && grads.len() == k && m.len() == k && v.len() == k,
            "cpu backend: adamw needs {k} tensors in each of params, master, grads, m, v"
        );
        for t in 0..k {
            let l = lens[t];
            for (what, len) in [
                ("params", params[t].len()),
                ("master", master[t].len()),
                ("grads", grads[t].len()),
                ("m", m[t].len()),
                ("v", v[t].len()),
            ] {
                need(what, len, l)?;
            }
            adamw_tensor_clipped(
                &mut params[t][..l],
                &mut master[t][..l],
                &grads[t][..l],
                &mut m[t][..l],
                &mut v[t][..l],
                moments,
                hp,
                factor,
            );
        }
        Ok(())
    }
}
