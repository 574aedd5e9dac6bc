//! A plain f32 reference of every op, for tests/gpu_ops.rs until `sft::backend::cpu::CpuBackend`
//! exists on this branch (then `reference()` in gpu_ops.rs switches to it). Written for clarity,
//! not speed: each op is the textbook loop of the trait's documentation.

use anyhow::{bail, Result};
use sft::backend::{AdamW, Backend, HeadShape, LossGrads, Precision, Rope, RopeStyle};

pub struct RefBackend;

fn rope_rows(x: &mut [f32], positions: &[u32], n: usize, heads: HeadShape, rope: Rope, sign: f32) {
    let (hd, width) = (heads.head_dim, heads.qkv_width());
    let half = hd / 2;
    for (i, &pos) in positions.iter().enumerate().take(n) {
        for h in 0..heads.n_heads + heads.n_kv_heads {
            let base = i * width + h * hd;
            for j in 0..half {
                let freq = rope.inv_freq(j, hd);
                let angle = pos as f32 * freq;
                let (s, c) = (angle as f64).sin_cos();
                let (s, c) = (s as f32 * sign, c as f32);
                let (i0, i1) = match rope.style {
                    RopeStyle::AdjacentPairs => (base + 2 * j, base + 2 * j + 1),
                    RopeStyle::HalfSplit => (base + j, base + j + half),
                };
                let (x0, x1) = (x[i0], x[i1]);
                x[i0] = x0 * c - x1 * s;
                x[i1] = x0 * s + x1 * c;
            }
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Softmax attention of query `q` over keys/values rows `keys` (k and v slices of width hd).
fn attend(q: &[f32], ks: &[&[f32]], vs: &[&[f32]], out: &mut [f32]) -> f32 {
    let scale = 1.0 / (q.len() as f32).sqrt();
    let s: Vec<f32> = ks.iter().map(|k| dot(q, k) * scale).collect();
    let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let p: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
    let l: f32 = p.iter().sum();
    out.iter_mut().for_each(|o| *o = 0.0);
    for (pj, v) in p.iter().zip(vs) {
        for (o, vv) in out.iter_mut().zip(v.iter()) {
            *o += pj / l * vv;
        }
    }
    m + l.ln()
}

impl Backend for RefBackend {
    type Buf = Vec<f32>;
    type Ids = Vec<u32>;

    fn name(&self) -> String {
        "reference".into()
    }
    fn zeros(&self, len: usize, _p: Precision) -> Result<Vec<f32>> {
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
        buf[..len].iter_mut().for_each(|x| *x = 0.0);
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
            let (xr, dr) = (&x[i * d..(i + 1) * d], &dout[i * d..(i + 1) * d]);
            let g: Vec<f32> = (0..d).map(|k| dr[k] * w[k]).collect();
            let c = r * r * dot(&g, xr) / d as f32;
            for k in 0..d {
                dx[i * d + k] += r * (g[k] - xr[k] * c);
                dw[k] += dr[k] * xr[k] * r;
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
        i: usize,
        o: usize,
    ) -> Result<()> {
        for r in 0..n {
            for c in 0..o {
                out[r * o + c] = dot(&inp[r * i..(r + 1) * i], &w[c * i..(c + 1) * i]);
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
        i: usize,
        o: usize,
    ) -> Result<()> {
        if let Some(dinp) = dinp {
            for r in 0..n {
                for c in 0..i {
                    dinp[r * i + c] = (0..o).map(|l| dout[r * o + l] * w[l * i + c]).sum();
                }
            }
        }
        for r in 0..o {
            for c in 0..i {
                dw[r * i + c] += (0..n).map(|l| dout[l * o + r] * inp[l * i + c]).sum::<f32>();
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
        rope: Rope,
    ) -> Result<()> {
        rope_rows(qkv, positions, n, heads, rope, 1.0);
        Ok(())
    }
    fn rope_backward(
        &self,
        dqkv: &mut Vec<f32>,
        positions: &Vec<u32>,
        n: usize,
        heads: HeadShape,
        rope: Rope,
    ) -> Result<()> {
        rope_rows(dqkv, positions, n, heads, rope, -1.0);
        Ok(())
    }

    fn attention_forward(
        &self,
        out: &mut Vec<f32>,
        lse: &mut Vec<f32>,
        qkv: &Vec<f32>,
        cu: &Vec<u32>,
        n_segments: usize,
        n: usize,
        heads: HeadShape,
    ) -> Result<()> {
        let (hd, width, group) = (heads.head_dim, heads.qkv_width(), heads.n_heads / heads.n_kv_heads);
        for s in 0..n_segments {
            let (a, b) = (cu[s] as usize, cu[s + 1] as usize);
            for i in a..b {
                for h in 0..heads.n_heads {
                    let g = h / group;
                    let q = &qkv[i * width + h * hd..][..hd];
                    let ks: Vec<&[f32]> =
                        (a..=i).map(|j| &qkv[j * width + (heads.n_heads + g) * hd..][..hd]).collect();
                    let vs: Vec<&[f32]> = (a..=i)
                        .map(|j| &qkv[j * width + (heads.n_heads + heads.n_kv_heads + g) * hd..][..hd])
                        .collect();
                    let o = &mut out[i * heads.q_width() + h * hd..][..hd];
                    lse[h * n + i] = attend(q, &ks, &vs, o);
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
        cu: &Vec<u32>,
        n_segments: usize,
        n: usize,
        heads: HeadShape,
    ) -> Result<()> {
        let (hd, width, qw) = (heads.head_dim, heads.qkv_width(), heads.q_width());
        let group = heads.n_heads / heads.n_kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        dqkv[..n * width].iter_mut().for_each(|x| *x = 0.0);
        for s in 0..n_segments {
            let (a, b) = (cu[s] as usize, cu[s + 1] as usize);
            for i in a..b {
                for h in 0..heads.n_heads {
                    let g = h / group;
                    let (qo, ko, vo) =
                        (h * hd, (heads.n_heads + g) * hd, (heads.n_heads + heads.n_kv_heads + g) * hd);
                    let do_i = &dout[i * qw + h * hd..][..hd];
                    let d_i = dot(do_i, &out[i * qw + h * hd..][..hd]);
                    for j in a..=i {
                        let p = (dot(&qkv[i * width + qo..][..hd], &qkv[j * width + ko..][..hd]) * scale
                            - lse[h * n + i])
                            .exp();
                        let dp = dot(do_i, &qkv[j * width + vo..][..hd]);
                        let ds = p * (dp - d_i);
                        for t in 0..hd {
                            dqkv[i * width + qo + t] += scale * ds * qkv[j * width + ko + t];
                            dqkv[j * width + ko + t] += scale * ds * qkv[i * width + qo + t];
                            dqkv[j * width + vo + t] += p * do_i[t];
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
        heads: HeadShape,
    ) -> Result<()> {
        let (hd, width, kvw) = (heads.head_dim, heads.qkv_width(), heads.kv_width());
        let group = heads.n_heads / heads.n_kv_heads;
        for i in 0..n_new {
            let row = &qkv[i * width..(i + 1) * width];
            k_cache[(start + i) * kvw..][..kvw].copy_from_slice(&row[heads.q_width()..][..kvw]);
            v_cache[(start + i) * kvw..][..kvw].copy_from_slice(&row[heads.q_width() + kvw..][..kvw]);
        }
        for i in 0..n_new {
            for h in 0..heads.n_heads {
                let g = h / group;
                let q = &qkv[i * width + h * hd..][..hd];
                let ks: Vec<&[f32]> = (0..=start + i).map(|j| &k_cache[j * kvw + g * hd..][..hd]).collect();
                let vs: Vec<&[f32]> = (0..=start + i).map(|j| &v_cache[j * kvw + g * hd..][..hd]).collect();
                attend(q, &ks, &vs, &mut out[i * heads.q_width() + h * hd..][..hd]);
            }
        }
        Ok(())
    }

    fn swiglu_forward(&self, out: &mut Vec<f32>, gate_up: &Vec<f32>, n: usize, hidden: usize) -> Result<()> {
        for i in 0..n {
            for k in 0..hidden {
                let (g, u) = (gate_up[i * 2 * hidden + k], gate_up[i * 2 * hidden + hidden + k]);
                out[i * hidden + k] = g / (1.0 + (-g).exp()) * u;
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
        for i in 0..n {
            for k in 0..hidden {
                let (gi, ui) = (i * 2 * hidden + k, i * 2 * hidden + hidden + k);
                let (g, u, dy) = (gate_up[gi], gate_up[ui], dout[i * hidden + k]);
                let sig = 1.0 / (1.0 + (-g).exp());
                dgate_up[gi] = dy * u * sig * (1.0 + g * (1.0 - sig));
                dgate_up[ui] = dy * g * sig;
            }
        }
        Ok(())
    }

    fn dropout(&self, x: &mut Vec<f32>, len: usize, p: f32, seed: u64) -> Result<()> {
        let scale = 1.0 / (1.0 - p);
        for (i, v) in x.iter_mut().enumerate().take(len) {
            *v = if sft::rng::uniform(seed, i as u64) < p { 0.0 } else { *v * scale };
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
        let mut total = 0.0f64;
        if let Some(g) = grads.as_mut() {
            g.dx[..n * d].iter_mut().for_each(|v| *v = 0.0);
        }
        for i in 0..n {
            let t = targets[i];
            if t == ignore_id {
                continue;
            }
            if t as usize >= vocab {
                bail!("target {t} out of range");
            }
            let xi = &x[i * d..(i + 1) * d];
            let logits: Vec<f32> = (0..vocab).map(|v| dot(xi, &w[v * d..(v + 1) * d])).collect();
            let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let lse = m + logits.iter().map(|l| (l - m).exp()).sum::<f32>().ln();
            total += (lse - logits[t as usize]) as f64;
            if let Some(g) = grads.as_mut() {
                for v in 0..vocab {
                    let dl =
                        g.loss_scale * ((logits[v] - lse).exp() - if v == t as usize { 1.0 } else { 0.0 });
                    for k in 0..d {
                        g.dx[i * d + k] += dl * w[v * d + k];
                        g.dw[v * d + k] += dl * xi[k];
                    }
                }
            }
        }
        Ok(total)
    }

    fn sum_squares(&self, bufs: &[&Vec<f32>], lens: &[usize]) -> Result<f64> {
        Ok(bufs
            .iter()
            .zip(lens)
            .map(|(b, &l)| b[..l].iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>())
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
        let bc1 = 1.0 - (hp.beta1 as f64).powi(hp.step as i32);
        let bc2 = 1.0 - (hp.beta2 as f64).powi(hp.step as i32);
        for t in 0..lens.len() {
            for i in 0..lens[t] {
                let g = grads[t][i] * hp.grad_scale;
                m[t][i] = hp.beta1 * m[t][i] + (1.0 - hp.beta1) * g;
                v[t][i] = hp.beta2 * v[t][i] + (1.0 - hp.beta2) * g * g;
                let mut p = master[t][i];
                p -= hp.lr * hp.weight_decay * p;
                p -= hp.lr * (m[t][i] / bc1 as f32) / ((v[t][i] / bc2 as f32).sqrt() + hp.eps);
                master[t][i] = p;
                params[t][i] = p;
            }
        }
        Ok(())
    }
}
