//! A plain, independent LLaMA forward in f64 (no backend, no fused ops): the definition the
//! model's loss is checked against.

use sft::backend::RopeStyle;
use sft::data::batch::Batch;
use sft::model::{ModelConfig, NamedTensor};

fn get(params: &[NamedTensor], name: &str) -> Vec<f64> {
    params.iter().find(|t| t.name == name).unwrap().data.iter().map(|&x| x as f64).collect()
}

fn rmsnorm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, w)| v * r * w).collect()
}

/// `w [out, in] · x`.
fn linear(w: &[f64], x: &[f64]) -> Vec<f64> {
    w.chunks(x.len()).map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum()).collect()
}

fn rope(v: &mut [f64], pos: usize, theta: f64, style: RopeStyle) {
    let hd = v.len();
    for j in 0..hd / 2 {
        let angle = pos as f64 * theta.powf(-2.0 * j as f64 / hd as f64);
        let (a, b) = match style {
            RopeStyle::AdjacentPairs => (2 * j, 2 * j + 1),
            RopeStyle::HalfSplit => (j, j + hd / 2),
        };
        let (x0, x1) = (v[a], v[b]);
        v[a] = x0 * angle.cos() - x1 * angle.sin();
        v[b] = x0 * angle.sin() + x1 * angle.cos();
    }
}

/// The sum of the supervised tokens' cross-entropies.
pub fn reference_loss(c: &ModelConfig, params: &[NamedTensor], batch: &Batch) -> f64 {
    let (d, hd, nh, nkv) = (c.d_model, c.head_dim(), c.n_heads, c.n_kv_heads);
    let eps = c.norm_eps as f64;
    let emb = get(params, "tok_embeddings");
    let mut x: Vec<Vec<f64>> =
        batch.inputs.iter().map(|&t| emb[t as usize * d..(t as usize + 1) * d].to_vec()).collect();
    let n = x.len();
    let segment_start: Vec<usize> = (0..n)
        .map(|i| {
            let s = batch.cu_seqlens.iter().rposition(|&c| c as usize <= i).unwrap();
            batch.cu_seqlens[s] as usize
        })
        .collect();
    for l in 0..c.n_layers {
        let p = |t: &str| get(params, &format!("layers.{l}.{t}"));
        let (attn_norm, qkv_w, o_w, ffn_norm, gate_up_w, down_w) =
            (p("attn_norm"), p("qkv"), p("o"), p("ffn_norm"), p("gate_up"), p("down"));
        // q[i][h], k[i][g], v[i][g]: head vectors.
        let mut q = vec![vec![vec![0.0; hd]; nh]; n];
        let mut k = vec![vec![vec![0.0; hd]; nkv]; n];
        let mut v = vec![vec![vec![0.0; hd]; nkv]; n];
        for i in 0..n {
            let row = linear(&qkv_w, &rmsnorm(&x[i], &attn_norm, eps));
            let pos = batch.positions[i] as usize;
            for h in 0..nh {
                q[i][h].copy_from_slice(&row[h * hd..(h + 1) * hd]);
                rope(&mut q[i][h], pos, c.rope_theta as f64, c.rope_style);
            }
            for g in 0..nkv {
                let ko = (nh + g) * hd;
                let vo = (nh + nkv + g) * hd;
                k[i][g].copy_from_slice(&row[ko..ko + hd]);
                rope(&mut k[i][g], pos, c.rope_theta as f64, c.rope_style);
                v[i][g].copy_from_slice(&row[vo..vo + hd]);
            }
        }
        let mut h_rows = vec![];
        for i in 0..n {
            let mut att = vec![0.0; nh * hd];
            for h in 0..nh {
                let g = h / (nh / nkv);
                let keys = segment_start[i]..=i;
                let scores: Vec<f64> = keys
                    .clone()
                    .map(|j| {
                        q[i][h].iter().zip(&k[j][g]).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for (s, j) in scores.iter().zip(keys) {
                    let p = (s - max).exp() / z;
                    for e in 0..hd {
                        att[h * hd + e] += p * v[j][g][e];
                    }
                }
            }
            let delta = linear(&o_w, &att);
            h_rows.push(x[i].iter().zip(&delta).map(|(a, b)| a + b).collect::<Vec<f64>>());
        }
        for i in 0..n {
            let gu = linear(&gate_up_w, &rmsnorm(&h_rows[i], &ffn_norm, eps));
            let hidden = c.ffn_hidden;
            let act: Vec<f64> =
                (0..hidden).map(|j| gu[j] / (1.0 + (-gu[j]).exp()) * gu[hidden + j]).collect();
            let delta = linear(&down_w, &act);
            x[i] = h_rows[i].iter().zip(&delta).map(|(a, b)| a + b).collect();
        }
    }
    let norm = get(params, "norm");
    let head = get(params, if c.tie_embeddings { "tok_embeddings" } else { "lm_head" });
    let mut loss = 0.0;
    for (xi, &t) in x.iter().zip(&batch.targets) {
        if t == batch.pad_id {
            continue;
        }
        let logits = linear(&head, &rmsnorm(xi, &norm, eps));
        let max = logits.iter().cloned().fold(f64::MIN, f64::max);
        let lse = max + logits.iter().map(|z| (z - max).exp()).sum::<f64>().ln();
        loss += lse - logits[t as usize];
    }
    loss
}
