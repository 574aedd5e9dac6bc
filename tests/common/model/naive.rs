//! A deliberately plain f64 implementation of the op trait, written from the trait's
//! documentation alone: an independent second backend that the model's tests can run on, and
//! that cross-checks `sft::backend::cpu`.

// Index loops mirror the formulas (and the kernels) more plainly than iterator chains here.
#![allow(clippy::needless_range_loop)]
use anyhow::{ensure, Result};
use sft::backend::{
    check_column_slice, clip_factor, stats, token_groups, AdamW, Backend, BranchGrad, Clip, Dropout,
    GradMode, HeadShape, LossGrads, Precision, Rope, RopeGrad, RopeStyle, StateDtype,
};
use sft::rng;

#[derive(Clone, Debug, Default)]
pub struct NaiveBackend {
    reads: std::cell::Cell<u64>,
}

/// `x` split as the trait's statistics are.
fn store_split(out: &mut [f64], slot: usize, x: f64) {
    for (o, v) in out[slot..slot + stats::SPLIT].iter_mut().zip(stats::split(x)) {
        *o = v as f64;
    }
}

fn join_split(buf: &[f64], slot: usize) -> f64 {
    buf[slot..slot + stats::SPLIT].iter().sum()
}

/// Adds into `dst` or overwrites it, as `mode` says.
fn put(dst: &mut f64, value: f64, mode: GradMode) {
    match mode {
        GradMode::Overwrite => *dst = value,
        GradMode::Accumulate => *dst += value,
    }
}

/// `out[i, col + o] (= | +=) scale · Σ_k inp[i, k] · w[o, k]`, `out`'s rows `ld` wide (`(ld, col)`
/// is `(out_dim, 0)` for a whole row).
fn linear(
    out: &mut [f64],
    (ld, col): (usize, usize),
    inp: &[f64],
    w: &[f64],
    (n, in_dim, out_dim): (usize, usize, usize),
    scale: f64,
    mode: GradMode,
) {
    for i in 0..n {
        for o in 0..out_dim {
            let y = dot(&inp[i * in_dim..(i + 1) * in_dim], &w[o * in_dim..]);
            put(&mut out[i * ld + col + o], scale * y, mode);
        }
    }
}

/// The input gradient of [`linear`]: `dinp[i, k] (= | +=) scale · Σ_o dout[i, col + o] · w[o, k]`.
fn linear_dinp(
    dinp: &mut [f64],
    dout: &[f64],
    (ld, col): (usize, usize),
    w: &[f64],
    (n, in_dim, out_dim): (usize, usize, usize),
    scale: f64,
    mode: GradMode,
) {
    for i in 0..n {
        for k in 0..in_dim {
            let g: f64 = (0..out_dim).map(|o| dout[i * ld + col + o] * w[o * in_dim + k]).sum();
            put(&mut dinp[i * in_dim + k], scale * g, mode);
        }
    }
}

/// The weight gradient of [`linear`]: `dw[o, k] (= | +=) scale · Σ_i dout[i, col + o] · inp[i, k]`.
fn linear_dw(
    dw: &mut [f64],
    dout: &[f64],
    (ld, col): (usize, usize),
    inp: &[f64],
    (n, in_dim, out_dim): (usize, usize, usize),
    scale: f64,
    mode: GradMode,
) {
    for o in 0..out_dim {
        for k in 0..in_dim {
            let g = (0..n).map(|i| dout[i * ld + col + o] * inp[i * in_dim + k]).sum::<f64>();
            put(&mut dw[o * in_dim + k], scale * g, mode);
        }
    }
}

fn rope_pair(j: usize, hd: usize, style: RopeStyle) -> (usize, usize) {
    match style {
        RopeStyle::AdjacentPairs => (2 * j, 2 * j + 1),
        RopeStyle::HalfSplit => (j, j + hd / 2),
    }
}

/// Rotates the q and k heads of `qkv` rows by `sign · angle`, cos and sin of the angles from
/// `table` (row `i`, pair `j` at `i·hd + 2j`).
fn rotate(qkv: &mut [f64], table: &[f64], n: usize, heads: HeadShape, style: RopeStyle, sign: f64) {
    let hd = heads.head_dim;
    let width = heads.qkv_width();
    for i in 0..n {
        for h in 0..heads.n_heads + heads.n_kv_heads {
            let base = i * width + h * hd;
            for j in 0..hd / 2 {
                let (cos, sin) = (table[i * hd + 2 * j], sign * table[i * hd + 2 * j + 1]);
                let (a, b) = rope_pair(j, hd, style);
                let (x0, x1) = (qkv[base + a], qkv[base + b]);
                qkv[base + a] = x0 * cos - x1 * sin;
                qkv[base + b] = x0 * sin + x1 * cos;
            }
        }
    }
}

/// Element `k` of a buffer through `mask` (None: unchanged).
fn masked(v: f64, mask: Option<Dropout>, k: usize) -> f64 {
    match mask {
        Some(m) if m.p > 0.0 => {
            if rng::uniform(m.seed, k as u64) < m.p {
                0.0
            } else {
                v / (1.0 - m.p as f64)
            }
        }
        _ => v,
    }
}

/// `Σ_e a[e] · b[e]` over `a`'s length, in order.
fn dot(a: &[f64], b: &[f64]) -> f64 {
    (0..a.len()).map(|e| a[e] * b[e]).sum()
}

/// The largest of `xs` and `Σ exp(x - max)`: a softmax's shift (so that nothing overflows) and
/// its normalizer.
fn softmax_terms(xs: &[f64]) -> (f64, f64) {
    let max = xs.iter().cloned().fold(f64::MIN, f64::max);
    (max, xs.iter().map(|x| (x - max).exp()).sum())
}

/// `ln Σ exp(x)`.
fn logsumexp(xs: &[f64]) -> f64 {
    let (max, z) = softmax_terms(xs);
    max + z.ln()
}

fn segment_start(cu: &[u32], n_segments: usize, i: usize) -> usize {
    (0..n_segments).rev().map(|s| cu[s] as usize).find(|&s| s <= i).unwrap()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

impl Backend for NaiveBackend {
    type Buf = Vec<f64>;
    type Ids = Vec<u32>;

    fn name(&self) -> String {
        "naive".into()
    }
    fn zeros(&self, len: usize, _: Precision) -> Result<Vec<f64>> {
        Ok(vec![0.0; len])
    }
    fn zeros_ids(&self, len: usize) -> Result<Vec<u32>> {
        Ok(vec![0; len])
    }
    fn write(&self, dst: &mut Vec<f64>, src: &[f32]) -> Result<()> {
        ensure!(src.len() <= dst.len());
        dst.iter_mut().zip(src).for_each(|(d, &s)| *d = s as f64);
        Ok(())
    }
    fn read(&self, src: &Vec<f64>, len: usize) -> Result<Vec<f32>> {
        self.reads.set(self.reads.get() + 1);
        Ok(src[..len].iter().map(|&x| x as f32).collect())
    }
    fn write_ids(&self, dst: &mut Vec<u32>, src: &[u32]) -> Result<()> {
        dst[..src.len()].copy_from_slice(src);
        Ok(())
    }
    fn zero(&self, buf: &mut Vec<f64>, len: usize) -> Result<()> {
        buf[..len].fill(0.0);
        Ok(())
    }
    fn copy(&self, dst: &mut Vec<f64>, src: &Vec<f64>, len: usize) -> Result<()> {
        dst[..len].copy_from_slice(&src[..len]);
        Ok(())
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn host_reads(&self) -> u64 {
        self.reads.get()
    }

    fn embedding_forward(
        &self,
        out: &mut Vec<f64>,
        ids: &Vec<u32>,
        table: &Vec<f64>,
        n: usize,
        d: usize,
    ) -> Result<()> {
        for i in 0..n {
            let t = ids[i] as usize;
            out[i * d..(i + 1) * d].copy_from_slice(&table[t * d..(t + 1) * d]);
        }
        Ok(())
    }
    fn embedding_backward(
        &self,
        dtable: &mut Vec<f64>,
        groups: &Vec<u32>,
        n_groups: usize,
        dout: &Vec<f64>,
        n: usize,
        d: usize,
        mode: GradMode,
    ) -> Result<()> {
        let (order, start, ids) = token_groups(groups, n, n_groups)?;
        if mode == GradMode::Overwrite {
            dtable.fill(0.0);
        }
        for g in 0..n_groups {
            let t = ids[g] as usize;
            for &i in &order[start[g] as usize..start[g + 1] as usize] {
                for e in 0..d {
                    dtable[t * d + e] += dout[i as usize * d + e];
                }
            }
        }
        Ok(())
    }

    fn rmsnorm_forward(
        &self,
        out: &mut Vec<f64>,
        rstd: &mut Vec<f64>,
        x: &Vec<f64>,
        w: &Vec<f64>,
        n: usize,
        d: usize,
        eps: f32,
    ) -> Result<()> {
        for i in 0..n {
            let row = &x[i * d..(i + 1) * d];
            let r = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / d as f64 + eps as f64).sqrt();
            rstd[i] = r;
            for e in 0..d {
                out[i * d + e] = row[e] * r * w[e];
            }
        }
        Ok(())
    }
    fn residual_rmsnorm_forward(
        &self,
        x_out: &mut Vec<f64>,
        out: &mut Vec<f64>,
        rstd: &mut Vec<f64>,
        x_in: &Vec<f64>,
        delta: &Vec<f64>,
        w: &Vec<f64>,
        n: usize,
        d: usize,
        eps: f32,
        dropout: Option<Dropout>,
    ) -> Result<()> {
        for k in 0..n * d {
            x_out[k] = x_in[k] + masked(delta[k], dropout, k);
        }
        self.rmsnorm_forward(out, rstd, x_out, w, n, d, eps)
    }
    fn rmsnorm_backward(
        &self,
        dx: &mut Vec<f64>,
        dw: &mut Vec<f64>,
        dout: &Vec<f64>,
        x: &Vec<f64>,
        w: &Vec<f64>,
        rstd: &Vec<f64>,
        n: usize,
        d: usize,
        branch: Option<BranchGrad<'_, Self>>,
    ) -> Result<()> {
        for i in 0..n {
            let r = rstd[i];
            let dot: f64 = (0..d).map(|e| dout[i * d + e] * w[e] * x[i * d + e]).sum();
            for e in 0..d {
                let k = i * d + e;
                dx[k] += r * w[e] * dout[k] - r * r * r / d as f64 * x[k] * dot;
                dw[e] += dout[k] * x[k] * r;
            }
        }
        if let Some(b) = branch {
            for k in 0..n * d {
                b.out[k] = masked(dx[k], Some(b.dropout), k);
            }
        }
        Ok(())
    }

    fn matmul_forward(
        &self,
        out: &mut Vec<f64>,
        inp: &Vec<f64>,
        w: &Vec<f64>,
        n: usize,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<()> {
        linear(out, (out_dim, 0), inp, w, (n, in_dim, out_dim), 1.0, GradMode::Overwrite);
        Ok(())
    }
    fn matmul_forward_residual(
        &self,
        out: &mut Vec<f64>,
        resid: &Vec<f64>,
        inp: &Vec<f64>,
        w: &Vec<f64>,
        n: usize,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<()> {
        out[..n * out_dim].copy_from_slice(&resid[..n * out_dim]);
        linear(out, (out_dim, 0), inp, w, (n, in_dim, out_dim), 1.0, GradMode::Accumulate);
        Ok(())
    }
    fn matmul_backward(
        &self,
        dinp: Option<&mut Vec<f64>>,
        dw: &mut Vec<f64>,
        dout: &Vec<f64>,
        inp: &Vec<f64>,
        w: &Vec<f64>,
        n: usize,
        in_dim: usize,
        out_dim: usize,
        mode: GradMode,
    ) -> Result<()> {
        let (cols, dims) = ((out_dim, 0), (n, in_dim, out_dim));
        if let Some(dinp) = dinp {
            linear_dinp(dinp, dout, cols, w, dims, 1.0, GradMode::Overwrite);
        }
        linear_dw(dw, dout, cols, inp, dims, 1.0, mode);
        Ok(())
    }

    fn matmul_forward_slice(
        &self,
        out: &mut Vec<f64>,
        inp: &Vec<f64>,
        w: &Vec<f64>,
        n: usize,
        in_dim: usize,
        out_dim: usize,
        ld: usize,
        col: usize,
        scale: f32,
        mode: GradMode,
    ) -> Result<()> {
        check_column_slice("matmul_forward_slice", col, out_dim, ld)?;
        linear(out, (ld, col), inp, w, (n, in_dim, out_dim), scale as f64, mode);
        Ok(())
    }
    fn matmul_backward_slice(
        &self,
        dinp: Option<&mut Vec<f64>>,
        dw: Option<&mut Vec<f64>>,
        dout: &Vec<f64>,
        inp: &Vec<f64>,
        w: &Vec<f64>,
        n: usize,
        in_dim: usize,
        out_dim: usize,
        ld: usize,
        col: usize,
        scale: f32,
        mode: GradMode,
    ) -> Result<()> {
        check_column_slice("matmul_backward_slice", col, out_dim, ld)?;
        let (cols, dims, scale) = ((ld, col), (n, in_dim, out_dim), scale as f64);
        if let Some(dinp) = dinp {
            linear_dinp(dinp, dout, cols, w, dims, scale, mode);
        }
        if let Some(dw) = dw {
            linear_dw(dw, dout, cols, inp, dims, scale, GradMode::Accumulate);
        }
        Ok(())
    }
    fn rope_table(
        &self,
        table: &mut Vec<f64>,
        positions: &Vec<u32>,
        n: usize,
        head_dim: usize,
        rope: Rope,
    ) -> Result<()> {
        for i in 0..n {
            for j in 0..head_dim / 2 {
                let angle = (positions[i] as f32 * rope.inv_freq(j, head_dim)) as f64;
                table[i * head_dim + 2 * j] = angle.cos();
                table[i * head_dim + 2 * j + 1] = angle.sin();
            }
        }
        Ok(())
    }
    fn rope_forward(
        &self,
        qkv: &mut Vec<f64>,
        table: &Vec<f64>,
        n: usize,
        heads: HeadShape,
        style: RopeStyle,
    ) -> Result<()> {
        rotate(qkv, table, n, heads, style, 1.0);
        Ok(())
    }
    fn rope_backward(
        &self,
        dqkv: &mut Vec<f64>,
        table: &Vec<f64>,
        n: usize,
        heads: HeadShape,
        style: RopeStyle,
    ) -> Result<()> {
        rotate(dqkv, table, n, heads, style, -1.0);
        Ok(())
    }

    fn attention_forward(
        &self,
        out: &mut Vec<f64>,
        lse: &mut Vec<f64>,
        qkv: &Vec<f64>,
        cu_seqlens: &Vec<u32>,
        n_segments: usize,
        n: usize,
        heads: HeadShape,
    ) -> Result<()> {
        let (hd, w, group) = (heads.head_dim, heads.qkv_width(), heads.n_heads / heads.n_kv_heads);
        let scale = 1.0 / (hd as f64).sqrt();
        for i in 0..n {
            let s0 = segment_start(cu_seqlens, n_segments, i);
            for h in 0..heads.n_heads {
                let g = h / group;
                let q = &qkv[i * w + h * hd..i * w + (h + 1) * hd];
                let scores: Vec<f64> =
                    (s0..=i).map(|j| scale * dot(q, &qkv[j * w + heads.q_width() + g * hd..])).collect();
                let l = logsumexp(&scores);
                lse[h * n + i] = l;
                for e in 0..hd {
                    out[i * heads.q_width() + h * hd + e] = (s0..=i)
                        .map(|j| {
                            (scores[j - s0] - l).exp()
                                * qkv[j * w + heads.q_width() + heads.kv_width() + g * hd + e]
                        })
                        .sum();
                }
            }
        }
        Ok(())
    }
    fn attention_backward(
        &self,
        dqkv: &mut Vec<f64>,
        dout: &Vec<f64>,
        qkv: &Vec<f64>,
        out: &Vec<f64>,
        lse: &Vec<f64>,
        cu_seqlens: &Vec<u32>,
        n_segments: usize,
        n: usize,
        heads: HeadShape,
        rope: Option<RopeGrad<'_, Self>>,
    ) -> Result<()> {
        let (hd, w, group, qw) =
            (heads.head_dim, heads.qkv_width(), heads.n_heads / heads.n_kv_heads, heads.q_width());
        let kvw = heads.kv_width();
        let scale = 1.0 / (hd as f64).sqrt();
        dqkv[..n * w].fill(0.0);
        for i in 0..n {
            let s0 = segment_start(cu_seqlens, n_segments, i);
            for h in 0..heads.n_heads {
                let g = h / group;
                let qo = i * w + h * hd;
                let oo = i * qw + h * hd;
                let dd = dot(&dout[oo..oo + hd], &out[oo..]);
                for j in s0..=i {
                    let ko = j * w + qw + g * hd;
                    let vo = j * w + qw + kvw + g * hd;
                    let s = scale * dot(&qkv[qo..qo + hd], &qkv[ko..]);
                    let p = (s - lse[h * n + i]).exp();
                    let dp = dot(&dout[oo..oo + hd], &qkv[vo..]);
                    let ds = p * (dp - dd);
                    for e in 0..hd {
                        dqkv[qo + e] += scale * ds * qkv[ko + e];
                        dqkv[ko + e] += scale * ds * qkv[qo + e];
                        dqkv[vo + e] += p * dout[oo + e];
                    }
                }
            }
        }
        if let Some(r) = rope {
            rotate(dqkv, r.table, n, heads, r.style, -1.0);
        }
        Ok(())
    }
    fn attention_decode(
        &self,
        out: &mut Vec<f64>,
        qkv: &Vec<f64>,
        k_cache: &mut Vec<f64>,
        v_cache: &mut Vec<f64>,
        start: usize,
        n_new: usize,
        heads: HeadShape,
    ) -> Result<()> {
        let (hd, w, qw, kvw) = (heads.head_dim, heads.qkv_width(), heads.q_width(), heads.kv_width());
        for i in 0..n_new {
            let row = (start + i) * kvw;
            k_cache[row..row + kvw].copy_from_slice(&qkv[i * w + qw..i * w + qw + kvw]);
            v_cache[row..row + kvw].copy_from_slice(&qkv[i * w + qw + kvw..i * w + qw + 2 * kvw]);
        }
        let scale = 1.0 / (hd as f64).sqrt();
        let group = heads.n_heads / heads.n_kv_heads;
        for i in 0..n_new {
            for h in 0..heads.n_heads {
                let g = h / group;
                let q = &qkv[i * w + h * hd..i * w + (h + 1) * hd];
                let scores: Vec<f64> =
                    (0..=start + i).map(|j| scale * dot(q, &k_cache[j * kvw + g * hd..])).collect();
                let (max, z) = softmax_terms(&scores);
                for e in 0..hd {
                    out[i * qw + h * hd + e] = scores
                        .iter()
                        .enumerate()
                        .map(|(j, s)| (s - max).exp() / z * v_cache[j * kvw + g * hd + e])
                        .sum();
                }
            }
        }
        Ok(())
    }

    fn swiglu_forward(&self, out: &mut Vec<f64>, gate_up: &Vec<f64>, n: usize, hidden: usize) -> Result<()> {
        for i in 0..n {
            for j in 0..hidden {
                let g = gate_up[i * 2 * hidden + j];
                out[i * hidden + j] = g * sigmoid(g) * gate_up[i * 2 * hidden + hidden + j];
            }
        }
        Ok(())
    }
    fn swiglu_backward(
        &self,
        dgate_up: &mut Vec<f64>,
        dout: &Vec<f64>,
        gate_up: &Vec<f64>,
        n: usize,
        hidden: usize,
    ) -> Result<()> {
        for i in 0..n {
            for j in 0..hidden {
                let (gi, ui) = (i * 2 * hidden + j, i * 2 * hidden + hidden + j);
                let (g, u, d) = (gate_up[gi], gate_up[ui], dout[i * hidden + j]);
                let s = sigmoid(g);
                dgate_up[gi] = d * u * s * (1.0 + g * (1.0 - s));
                dgate_up[ui] = d * g * s;
            }
        }
        Ok(())
    }

    fn dropout(&self, x: &mut Vec<f64>, len: usize, p: f32, seed: u64) -> Result<()> {
        for (i, v) in x[..len].iter_mut().enumerate() {
            *v = if rng::uniform(seed, i as u64) < p { 0.0 } else { *v / (1.0 - p as f64) };
        }
        Ok(())
    }

    fn lm_head_cross_entropy(
        &self,
        x: &Vec<f64>,
        w: &Vec<f64>,
        rows: &Vec<u32>,
        targets: &Vec<u32>,
        n_sup: usize,
        n: usize,
        d: usize,
        vocab: usize,
        losses: &mut Vec<f64>,
        mut grads: Option<LossGrads<'_, Self>>,
    ) -> Result<()> {
        if let Some(g) = grads.as_mut() {
            g.dx[..n * d].fill(0.0);
            if g.mode == GradMode::Overwrite {
                g.dw[..vocab * d].fill(0.0);
            }
        }
        for k in 0..n_sup {
            let (i, t) = (rows[k] as usize, targets[k]);
            let logits: Vec<f64> = (0..vocab).map(|v| dot(&x[i * d..(i + 1) * d], &w[v * d..])).collect();
            let lse = logsumexp(&logits);
            losses[k] = lse - logits[t as usize];
            if let Some(g) = grads.as_mut() {
                let scale = g.loss_scale as f64;
                for v in 0..vocab {
                    let dl = scale * ((logits[v] - lse).exp() - if v == t as usize { 1.0 } else { 0.0 });
                    for e in 0..d {
                        g.dx[i * d + e] += dl * w[v * d + e];
                        g.dw[v * d + e] += dl * x[i * d + e];
                    }
                }
            }
        }
        Ok(())
    }

    fn sum_into(
        &self,
        out: &mut Vec<f64>,
        slot: usize,
        x: &Vec<f64>,
        len: usize,
        mode: GradMode,
    ) -> Result<()> {
        let before = if mode == GradMode::Accumulate { join_split(out, slot) } else { 0.0 };
        store_split(out, slot, before + x[..len].iter().sum::<f64>());
        Ok(())
    }

    fn sum_squares(&self, bufs: &[&Vec<f64>], lens: &[usize], out: &mut Vec<f64>) -> Result<()> {
        let total = bufs.iter().zip(lens).map(|(b, &l)| b[..l].iter().map(|x| x * x).sum::<f64>()).sum();
        store_split(out, stats::SUMSQ, total);
        Ok(())
    }
    fn adamw(
        &self,
        params: &mut [&mut Vec<f64>],
        master: &mut [&mut Vec<f64>],
        grads: &[&Vec<f64>],
        m: &mut [&mut Vec<f64>],
        v: &mut [&mut Vec<f64>],
        moments: StateDtype,
        lens: &[usize],
        hp: &AdamW,
        clip: Option<Clip<'_, Self>>,
    ) -> Result<()> {
        let factor = match clip {
            Some(c) => match clip_factor(join_split(c.sumsq, stats::SUMSQ), c.max_norm) {
                Some(f) => f as f64,
                None => return Ok(()),
            },
            None => 1.0,
        };
        let (b1, b2) = (hp.beta1 as f64, hp.beta2 as f64);
        let c1 = 1.0 - b1.powi(hp.step as i32);
        let c2 = 1.0 - b2.powi(hp.step as i32);
        for t in 0..lens.len() {
            for k in 0..lens[t] {
                let g = grads[t][k] * hp.grad_scale as f64 * factor;
                let mk = b1 * m[t][k] + (1.0 - b1) * g;
                let vk = b2 * v[t][k] + (1.0 - b2) * g * g;
                // bf16 moments: stored rounded (through f32, to nearest even), used unrounded.
                let store = |x: f64| match moments {
                    StateDtype::F32 => x,
                    StateDtype::Bf16 => half::bf16::from_f32(x as f32).to_f64(),
                };
                m[t][k] = store(mk);
                v[t][k] = store(vk);
                let update = (mk / c1) / ((vk / c2).sqrt() + hp.eps as f64);
                master[t][k] -= hp.lr as f64 * (update + hp.weight_decay as f64 * master[t][k]);
                params[t][k] = master[t][k];
            }
        }
        Ok(())
    }
}
