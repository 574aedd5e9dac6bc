//! A plain, sequential f32 implementation of the op trait, for the training tests while the
//! CPU backend is not merged. Deterministic by construction (every sum in a fixed order).

use anyhow::Result;
use sft::backend::{AdamW, Backend, HeadShape, LossGrads, Precision, RopeStyle};

#[derive(Clone, Copy, Debug, Default)]
pub struct RefBackend;

fn rotate_pairs(row: &mut [f32], hd: usize, pos: u32, theta: f32, style: RopeStyle, sign: f32) {
    for j in 0..hd / 2 {
        let freq = theta.powf(-2.0 * j as f32 / hd as f32);
        let (s, c) = (pos as f32 * freq).sin_cos();
        let s = s * sign;
        let (a, b) = match style {
            RopeStyle::AdjacentPairs => (2 * j, 2 * j + 1),
            RopeStyle::HalfSplit => (j, j + hd / 2),
        };
        let (x, y) = (row[a], row[b]);
        row[a] = x * c - y * s;
        row[b] = x * s + y * c;
    }
}

fn rope(qkv: &mut [f32], positions: &[u32], n: usize, h: HeadShape, theta: f32, style: RopeStyle, sign: f32) {
    let w = h.qkv_width();
    for t in 0..n {
        let row = &mut qkv[t * w..(t + 1) * w];
        for head in 0..h.n_heads + h.n_kv_heads {
            rotate_pairs(
                &mut row[head * h.head_dim..(head + 1) * h.head_dim],
                h.head_dim,
                positions[t],
                theta,
                style,
                sign,
            );
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

impl Backend for RefBackend {
    type Buf = Vec<f32>;
    type Ids = Vec<u32>;

    fn name(&self) -> String {
        "reference".into()
    }
    fn zeros(&self, len: usize, _precision: Precision) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }
    fn zeros_ids(&self, len: usize) -> Result<Vec<u32>> {
        Ok(vec![0; len])
    }
    fn write(&self, dst: &mut Vec<f32>, src: &[f32]) -> Result<()> {
        dst[..src.len()].copy_from_slice(src);
        Ok(())
    }
    fn read(&self, src: &Vec<f32>, len: usize) -> Result<Vec<f32>> {
        Ok(src[..len].to_vec())
    }
    fn write_ids(&self, dst: &mut Vec<u32>, src: &[u32]) -> Result<()> {
        dst[..src.len()].copy_from_slice(src);
        Ok(())
    }
    fn zero(&self, buf: &mut Vec<f32>, len: usize) -> Result<()> {
        buf[..len].fill(0.0);
        Ok(())
    }
    fn copy(&self, dst: &mut Vec<f32>, src: &Vec<f32>, len: usize) -> Result<()> {
        dst[..len].copy_from_slice(&src[..len]);
        Ok(())
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn embedding_forward(
        &self,
        out: &mut Vec<f32>,
        ids: &Vec<u32>,
        table: &Vec<f32>,
        n: usize,
        d: usize,
    ) -> Result<()> {
        for i in 0..n {
            let id = ids[i] as usize;
            out[i * d..(i + 1) * d].copy_from_slice(&table[id * d..(id + 1) * d]);
        }
        Ok(())
    }
    fn embedding_backward(
        &self,
        dtable: &mut Vec<f32>,
        ids: &Vec<u32>,
        dout: &Vec<f32>,
        n: usize,
        d: usize,
    ) -> Result<()> {
        for i in 0..n {
            let id = ids[i] as usize;
            for k in 0..d {
                dtable[id * d + k] += dout[i * d + k];
            }
        }
        Ok(())
    }

    fn rmsnorm_forward(
        &self,
        out: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        n: usize,
        d: usize,
        eps: f32,
    ) -> Result<()> {
        for i in 0..n {
            let row = &x[i * d..(i + 1) * d];
            let r = 1.0 / (dot(row, row) / d as f32 + eps).sqrt();
            rstd[i] = r;
            for k in 0..d {
                out[i * d + k] = row[k] * r * w[k];
            }
        }
        Ok(())
    }
    fn residual_rmsnorm_forward(
        &self,
        x_out: &mut Vec<f32>,
        out: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
        x_in: &Vec<f32>,
        delta: &Vec<f32>,
        w: &Vec<f32>,
        n: usize,
        d: usize,
        eps: f32,
    ) -> Result<()> {
        for k in 0..n * d {
            x_out[k] = x_in[k] + delta[k];
        }
        let x = x_out.clone();
        self.rmsnorm_forward(out, rstd, &x, w, n, d, eps)
    }
    fn rmsnorm_backward(
        &self,
        dx: &mut Vec<f32>,
        dw: &mut Vec<f32>,
        dout: &Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        rstd: &Vec<f32>,
        n: usize,
        d: usize,
    ) -> Result<()> {
        for i in 0..n {
            let r = rstd[i];
            let mut mean_gx = 0.0;
            for k in 0..d {
                mean_gx += dout[i * d + k] * w[k] * x[i * d + k] * r;
            }
            mean_gx /= d as f32;
            for k in 0..d {
                let xhat = x[i * d + k] * r;
                dw[k] += dout[i * d + k] * xhat;
                dx[i * d + k] += r * (dout[i * d + k] * w[k] - xhat * mean_gx);
            }
        }
        Ok(())
    }

    fn matmul_forward(
        &self,
        out: &mut Vec<f32>,
        inp: &Vec<f32>,
        w: &Vec<f32>,
        n: usize,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<()> {
        for r in 0..n {
            let x = &inp[r * in_dim..(r + 1) * in_dim];
            for j in 0..out_dim {
                out[r * out_dim + j] = dot(x, &w[j * in_dim..(j + 1) * in_dim]);
            }
        }
        Ok(())
    }
    fn matmul_backward(
        &self,
        dinp: Option<&mut Vec<f32>>,
        dw: &mut Vec<f32>,
        dout: &Vec<f32>,
        inp: &Vec<f32>,
        w: &Vec<f32>,
        n: usize,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<()> {
        if let Some(dinp) = dinp {
            for r in 0..n {
                for k in 0..in_dim {
                    let mut s = 0.0;
                    for j in 0..out_dim {
                        s += dout[r * out_dim + j] * w[j * in_dim + k];
                    }
                    dinp[r * in_dim + k] = s;
                }
            }
        }
        for j in 0..out_dim {
            for k in 0..in_dim {
                let mut s = 0.0;
                for r in 0..n {
                    s += dout[r * out_dim + j] * inp[r * in_dim + k];
                }
                dw[j * in_dim + k] += s;
            }
        }
        Ok(())
    }

    fn rope_forward(
        &self,
        qkv: &mut Vec<f32>,
        positions: &Vec<u32>,
        n: usize,
        heads: HeadShape,
        theta: f32,
        style: RopeStyle,
    ) -> Result<()> {
        rope(qkv, positions, n, heads, theta, style, 1.0);
        Ok(())
    }
    fn rope_backward(
        &self,
        dqkv: &mut Vec<f32>,
        positions: &Vec<u32>,
        n: usize,
        heads: HeadShape,
        theta: f32,
        style: RopeStyle,
    ) -> Result<()> {
        rope(dqkv, positions, n, heads, theta, style, -1.0);
        Ok(())
    }

    fn attention_forward(
        &self,
        out: &mut Vec<f32>,
        lse: &mut Vec<f32>,
        qkv: &Vec<f32>,
        cu_seqlens: &Vec<u32>,
        n_segments: usize,
        n: usize,
        h: HeadShape,
    ) -> Result<()> {
        let (w, hd) = (h.qkv_width(), h.head_dim);
        let scale = 1.0 / (hd as f32).sqrt();
        let group = h.n_heads / h.n_kv_heads;
        for s in 0..n_segments {
            let (a, b) = (cu_seqlens[s] as usize, cu_seqlens[s + 1] as usize);
            for head in 0..h.n_heads {
                let (ko, vo) =
                    (h.q_width() + (head / group) * hd, h.q_width() + h.kv_width() + (head / group) * hd);
                for t in a..b {
                    let q = &qkv[t * w + head * hd..t * w + (head + 1) * hd];
                    let scores: Vec<f32> =
                        (a..=t).map(|u| dot(q, &qkv[u * w + ko..u * w + ko + hd]) * scale).collect();
                    let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let sum: f32 = scores.iter().map(|s| (s - m).exp()).sum();
                    lse[head * n + t] = m + sum.ln();
                    let o = &mut out[t * h.q_width() + head * hd..t * h.q_width() + (head + 1) * hd];
                    o.fill(0.0);
                    for (i, u) in (a..=t).enumerate() {
                        let p = (scores[i] - m).exp() / sum;
                        for k in 0..hd {
                            o[k] += p * qkv[u * w + vo + k];
                        }
                    }
                }
            }
        }
        Ok(())
    }
    fn attention_backward(
        &self,
        dqkv: &mut Vec<f32>,
        dout: &Vec<f32>,
        qkv: &Vec<f32>,
        out: &Vec<f32>,
        lse: &Vec<f32>,
        cu_seqlens: &Vec<u32>,
        n_segments: usize,
        n: usize,
        h: HeadShape,
    ) -> Result<()> {
        let (w, hd, qw) = (h.qkv_width(), h.head_dim, h.q_width());
        let scale = 1.0 / (hd as f32).sqrt();
        let group = h.n_heads / h.n_kv_heads;
        dqkv[..n * w].fill(0.0);
        for s in 0..n_segments {
            let (a, b) = (cu_seqlens[s] as usize, cu_seqlens[s + 1] as usize);
            for head in 0..h.n_heads {
                let (ko, vo) = (qw + (head / group) * hd, qw + h.kv_width() + (head / group) * hd);
                for t in a..b {
                    let qo = t * w + head * hd;
                    let dout_t = &dout[t * qw + head * hd..t * qw + (head + 1) * hd];
                    let big_d = dot(dout_t, &out[t * qw + head * hd..t * qw + (head + 1) * hd]);
                    for u in a..=t {
                        let sc = dot(&qkv[qo..qo + hd], &qkv[u * w + ko..u * w + ko + hd]) * scale;
                        let p = (sc - lse[head * n + t]).exp();
                        let dp = dot(dout_t, &qkv[u * w + vo..u * w + vo + hd]);
                        let ds = p * (dp - big_d) * scale;
                        for k in 0..hd {
                            dqkv[qo + k] += ds * qkv[u * w + ko + k];
                            dqkv[u * w + ko + k] += ds * qkv[qo + k];
                            dqkv[u * w + vo + k] += p * dout_t[k];
                        }
                    }
                }
            }
        }
        Ok(())
    }
    fn attention_decode(
        &self,
        out: &mut Vec<f32>,
        qkv: &Vec<f32>,
        k_cache: &mut Vec<f32>,
        v_cache: &mut Vec<f32>,
        start: usize,
        n_new: usize,
        h: HeadShape,
    ) -> Result<()> {
        let (w, hd, qw, kvw) = (h.qkv_width(), h.head_dim, h.q_width(), h.kv_width());
        for i in 0..n_new {
            let r = start + i;
            k_cache[r * kvw..(r + 1) * kvw].copy_from_slice(&qkv[i * w + qw..i * w + qw + kvw]);
            v_cache[r * kvw..(r + 1) * kvw].copy_from_slice(&qkv[i * w + qw + kvw..i * w + qw + 2 * kvw]);
        }
        let scale = 1.0 / (hd as f32).sqrt();
        let group = h.n_heads / h.n_kv_heads;
        for i in 0..n_new {
            for head in 0..h.n_heads {
                let kh = (head / group) * hd;
                let q = &qkv[i * w + head * hd..i * w + (head + 1) * hd];
                let scores: Vec<f32> = (0..=start + i)
                    .map(|u| dot(q, &k_cache[u * kvw + kh..u * kvw + kh + hd]) * scale)
                    .collect();
                let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = scores.iter().map(|s| (s - m).exp()).sum();
                let o = &mut out[i * qw + head * hd..i * qw + (head + 1) * hd];
                o.fill(0.0);
                for (u, sc) in scores.iter().enumerate() {
                    let p = (sc - m).exp() / sum;
                    for k in 0..hd {
                        o[k] += p * v_cache[u * kvw + kh + k];
                    }
                }
            }
        }
        Ok(())
    }

    fn swiglu_forward(&self, out: &mut Vec<f32>, gate_up: &Vec<f32>, n: usize, hidden: usize) -> Result<()> {
        for r in 0..n {
            for j in 0..hidden {
                let (g, u) = (gate_up[r * 2 * hidden + j], gate_up[r * 2 * hidden + hidden + j]);
                out[r * hidden + j] = g / (1.0 + (-g).exp()) * u;
            }
        }
        Ok(())
    }
    fn swiglu_backward(
        &self,
        dgate_up: &mut Vec<f32>,
        dout: &Vec<f32>,
        gate_up: &Vec<f32>,
        n: usize,
        hidden: usize,
    ) -> Result<()> {
        for r in 0..n {
            for j in 0..hidden {
                let (g, u) = (gate_up[r * 2 * hidden + j], gate_up[r * 2 * hidden + hidden + j]);
                let sig = 1.0 / (1.0 + (-g).exp());
                let dy = dout[r * hidden + j];
                dgate_up[r * 2 * hidden + j] = dy * u * sig * (1.0 + g * (1.0 - sig));
                dgate_up[r * 2 * hidden + hidden + j] = dy * g * sig;
            }
        }
        Ok(())
    }

    fn dropout(&self, x: &mut Vec<f32>, len: usize, p: f32, seed: u64) -> Result<()> {
        for (i, v) in x[..len].iter_mut().enumerate() {
            *v = if sft::rng::uniform(seed, i as u64) < p { 0.0 } else { *v / (1.0 - p) };
        }
        Ok(())
    }

    fn lm_head_cross_entropy(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        targets: &Vec<u32>,
        ignore_id: u32,
        n: usize,
        d: usize,
        vocab: usize,
        mut grads: Option<LossGrads<'_, Self>>,
    ) -> Result<f64> {
        let mut loss = 0.0f64;
        for r in 0..n {
            let xr = &x[r * d..(r + 1) * d];
            if targets[r] == ignore_id {
                if let Some(g) = grads.as_mut() {
                    g.dx[r * d..(r + 1) * d].fill(0.0);
                }
                continue;
            }
            let logits: Vec<f32> = (0..vocab).map(|v| dot(xr, &w[v * d..(v + 1) * d])).collect();
            let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = logits.iter().map(|l| (l - m).exp()).sum();
            let t = targets[r] as usize;
            loss += (m + sum.ln() - logits[t]) as f64;
            if let Some(g) = grads.as_mut() {
                let dxr = &mut g.dx[r * d..(r + 1) * d];
                dxr.fill(0.0);
                for v in 0..vocab {
                    let mut dl = (logits[v] - m).exp() / sum;
                    if v == t {
                        dl -= 1.0;
                    }
                    dl *= g.loss_scale;
                    for k in 0..d {
                        dxr[k] += dl * w[v * d + k];
                        g.dw[v * d + k] += dl * xr[k];
                    }
                }
            }
        }
        Ok(loss)
    }

    fn sum_squares(&self, bufs: &[&Vec<f32>], lens: &[usize]) -> Result<f64> {
        Ok(bufs
            .iter()
            .zip(lens)
            .map(|(b, &l)| b[..l].iter().map(|&x| x as f64 * x as f64).sum::<f64>())
            .sum())
    }
    fn adamw(
        &self,
        params: &mut [&mut Vec<f32>],
        master: &mut [&mut Vec<f32>],
        grads: &[&Vec<f32>],
        m: &mut [&mut Vec<f32>],
        v: &mut [&mut Vec<f32>],
        lens: &[usize],
        hp: &AdamW,
    ) -> Result<()> {
        let bc1 = 1.0 - hp.beta1.powi(hp.step as i32);
        let bc2 = 1.0 - hp.beta2.powi(hp.step as i32);
        for t in 0..lens.len() {
            for i in 0..lens[t] {
                let g = grads[t][i] * hp.grad_scale;
                m[t][i] = hp.beta1 * m[t][i] + (1.0 - hp.beta1) * g;
                v[t][i] = hp.beta2 * v[t][i] + (1.0 - hp.beta2) * g * g;
                let update =
                    (m[t][i] / bc1) / ((v[t][i] / bc2).sqrt() + hp.eps) + hp.weight_decay * master[t][i];
                master[t][i] -= hp.lr * update;
                params[t][i] = master[t][i];
            }
        }
        Ok(())
    }
}
