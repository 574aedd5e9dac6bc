//! Cases of the scalar attention kernels (attention.cu): forward, backward (D, dQ, dK/dV),
//! decode after a KV-cache write. Launches mirror src/backend/cuda/attention.rs; the twins are
//! the CPU's attention_forward / attention_backward / attention_decode.

use sft::backend::HeadShape;
use sft::backend::{cpu, cuda};

use crate::emu::*;

/// The backend's rows_by_heads: ATT_WARPS rows per block along x, one head per y.
fn rows_by_heads(rows: usize, heads: usize) -> Cfg {
    cuda::attention_rows_by_heads(rows, heads).into()
}

/// `out` columns [lo, hi) of every row of width `w`.
fn cols(v: &[f64], w: usize, lo: usize, hi: usize) -> Vec<f64> {
    v.chunks(w).flat_map(|r| r[lo..hi].to_vec()).collect()
}

pub fn training(r: &mut Report, rng: &mut Rng) {
    // Segments of 1, of less and more than one 32-row tile, GQA 2:1 and MHA, each head_dim.
    let cases: [(usize, usize, usize, &[u32]); 4] = [
        (64, 2, 1, &[0, 1, 18, 53]),
        (64, 2, 2, &[0, 40]),
        (128, 2, 1, &[0, 9, 42]),
        (32, 4, 2, &[0, 5, 37]),
    ];
    for (hd, nh, nkv, cu) in cases {
        let heads = HeadShape { n_heads: nh, n_kv_heads: nkv, head_dim: hd };
        let n = *cu.last().unwrap() as usize;
        let n_seg = cu.len() - 1;
        let case = format!("hd {hd} heads {nh}/{nkv} cu {cu:?}");
        let (w, qw) = (heads.qkv_width(), heads.q_width());
        let (qkv, qkvf) = rng.bf16s(n * w, 1.0);
        let (dout, doutf) = rng.bf16s(n * qw, 1.0);
        let (segi, ni, nhi, nkvi, hdi) = (n_seg as i32, n as i32, nh as i32, nkv as i32, hd as i32);

        let fwd = format!("attention_forward_{hd}");
        let (mut out, mut lse) = (nan_bf16(n * qw), vec![f32::NAN; nh * n]);
        let (po, pl, pq, pc) = (out.as_mut_ptr(), lse.as_mut_ptr(), qkv.as_ptr(), cu.as_ptr());
        r.launch(
            &fwd,
            rows_by_heads(n, nh),
            &[arg(&po), arg(&pl), arg(&pq), arg(&pc), arg(&segi), arg(&ni), arg(&nhi), arg(&nkvi)],
        );
        let (mut t_out, mut t_lse) = (vec![0.0; n * qw], vec![0.0; nh * n]);
        cpu::attention_forward(&mut t_out, &mut t_lse, &qkvf, cu, n_seg, n, heads);
        r.check(
            &fwd,
            &case,
            &[
                ("out", rel_err(&f64s_bf16(&out), &t_out), TOL_BF16),
                ("lse", rel_err(&f64s_f32(&lse), &t_lse), TOL_F32),
            ],
        );

        // Backward from the kernel's own out and lse, as on the GPU.
        let mut d = vec![f32::NAN; nh * n];
        let (pd, pdo, po) = (d.as_mut_ptr(), dout.as_ptr(), out.as_ptr());
        r.launch(
            "attention_backward_d",
            Cfg { grid: ((n * nh * hd / 8).div_ceil(BLOCK as usize) as u32, 1, 1), block: (BLOCK, 1, 1) },
            &[arg(&pd), arg(&pdo), arg(&po), arg(&ni), arg(&nhi), arg(&hdi)],
        );
        let outf = f64s_bf16(&out);
        let want_d: Vec<f64> = (0..nh * n)
            .map(|k| {
                let (h, i) = (k / n, k % n);
                (0..hd).map(|t| doutf[i * qw + h * hd + t] * outf[i * qw + h * hd + t]).sum()
            })
            .collect();
        r.check("attention_backward_d", &case, &[("D", rel_err(&f64s_f32(&d), &want_d), TOL_F32)]);

        let mut dqkv = nan_bf16(n * w);
        let pdq = dqkv.as_mut_ptr();
        let args = [
            arg(&pdq),
            arg(&pdo),
            arg(&pq),
            arg(&pl),
            arg(&pd),
            arg(&pc),
            arg(&segi),
            arg(&ni),
            arg(&nhi),
            arg(&nkvi),
        ];
        let dq = format!("attention_backward_dq_{hd}");
        r.launch(&dq, rows_by_heads(n, nh), &args);
        let dkdv = format!("attention_backward_dkdv_{hd}");
        r.launch(&dkdv, rows_by_heads(n, nkv), &args);
        let mut t_dqkv = vec![0.0; n * w];
        cpu::attention_backward(&mut t_dqkv, &doutf, &qkvf, &t_out, &t_lse, cu, n_seg, n, heads);
        let g = f64s_bf16(&dqkv);
        r.check(&dq, &case, &[("dq", rel_err(&cols(&g, w, 0, qw), &cols(&t_dqkv, w, 0, qw)), TOL_BF16)]);
        let kvw = heads.kv_width();
        r.check(
            &dkdv,
            &case,
            &[
                ("dk", rel_err(&cols(&g, w, qw, qw + kvw), &cols(&t_dqkv, w, qw, qw + kvw)), TOL_BF16),
                ("dv", rel_err(&cols(&g, w, qw + kvw, w), &cols(&t_dqkv, w, qw + kvw, w)), TOL_BF16),
            ],
        );
    }
}

pub fn decode(r: &mut Report, rng: &mut Rng) {
    // (head_dim, heads, kv heads, cached rows, new rows)
    for (hd, nh, nkv, start, n_new) in
        [(64usize, 2usize, 1usize, 0usize, 1usize), (64, 4, 2, 37, 3), (128, 2, 2, 12, 9), (32, 4, 1, 20, 5)]
    {
        let heads = HeadShape { n_heads: nh, n_kv_heads: nkv, head_dim: hd };
        let case = format!("hd {hd} heads {nh}/{nkv} start {start} new {n_new}");
        let (w, qw, kvw) = (heads.qkv_width(), heads.q_width(), heads.kv_width());
        let rows = start + n_new;
        let (qkv, qkvf) = rng.bf16s(n_new * w, 1.0);
        let (mut kc, kcf) = rng.bf16s(rows * kvw, 1.0);
        let (mut vc, vcf) = rng.bf16s(rows * kvw, 1.0);
        let (si, ni, nhi, nkvi, hdi) = (start as i32, n_new as i32, nh as i32, nkv as i32, hd as i32);
        let (pk, pv, pq) = (kc.as_mut_ptr(), vc.as_mut_ptr(), qkv.as_ptr());
        r.launch(
            "attention_kv_cache_write",
            grid_stride(n_new * kvw),
            &[arg(&pk), arg(&pv), arg(&pq), arg(&si), arg(&ni), arg(&nhi), arg(&nkvi), arg(&hdi)],
        );
        let mut out = nan_bf16(n_new * qw);
        let po = out.as_mut_ptr();
        let (pkc, pvc) = (kc.as_ptr(), vc.as_ptr());
        let name = format!("attention_decode_{hd}");
        r.launch(
            &name,
            rows_by_heads(n_new, nh),
            &[arg(&po), arg(&pq), arg(&pkc), arg(&pvc), arg(&si), arg(&ni), arg(&nhi), arg(&nkvi)],
        );
        let (mut t_out, mut t_k, mut t_v) = (vec![0.0; n_new * qw], kcf, vcf);
        cpu::attention_decode(&mut t_out, &qkvf, &mut t_k, &mut t_v, start, n_new, heads);
        r.check(
            "attention_kv_cache_write",
            &case,
            &[
                ("k", mismatches(&f64s_bf16(&kc), &t_k), EXACT),
                ("v", mismatches(&f64s_bf16(&vc), &t_v), EXACT),
            ],
        );
        r.check(&name, &case, &[("out", rel_err(&f64s_bf16(&out), &t_out), TOL_BF16)]);
    }
}
