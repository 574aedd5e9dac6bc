//! Cases of the element-wise and row-wise kernels: casts, RMSNorm, RoPE, SwiGLU, dropout,
//! embedding. Launches mirror src/backend/cuda/{cast,rmsnorm,rope,swiglu,dropout,embedding}.rs.

use half::bf16;
use sft::backend::cpu;
use sft::backend::cuda::{rope_scaling_args, rope_style_arg, RMSNORM_DW_CHUNKS};
use sft::backend::{group_tokens_by_id, token_groups, GradMode, HeadShape, Rope, RopeScaling, RopeStyle};

use crate::emu::*;

pub fn casts(r: &mut Report, rng: &mut Rng) {
    for len in [1usize, 1000, 3001] {
        let case = format!("len {len}");
        // Include values that round at a tie and subnormals: the rounding must be to nearest even.
        let mut src = rng.f32s(len, 3.0);
        if len > 4 {
            src[1] = f32::from_bits(0x3f80_8000); // 1 + 2^-8: a tie, rounds down to 1.0
            src[2] = f32::from_bits(0x3f81_8000); // a tie that rounds up
            src[3] = 1e-40;
        }
        let mut out = nan_bf16(len);
        let (po, ps) = (out.as_mut_ptr(), src.as_ptr());
        r.launch("cast_f32_to_bf16", grid_stride(len), &[arg(&po), arg(&ps), arg(&len)]);
        let want: Vec<bf16> = src.iter().map(|&x| bf16::from_f32(x)).collect();
        r.check("cast_f32_to_bf16", &case, &[("out", mismatches(&out, &want), EXACT)]);

        let (src, want) = rng.bf16s(len, 3.0);
        let mut out = vec![f32::NAN; len];
        let (po, ps) = (out.as_mut_ptr(), src.as_ptr());
        r.launch("cast_bf16_to_f32", grid_stride(len), &[arg(&po), arg(&ps), arg(&len)]);
        r.check("cast_bf16_to_f32", &case, &[("out", mismatches(&f64s_f32(&out), &want), EXACT)]);
    }
}

pub fn rmsnorm(r: &mut Report, rng: &mut Rng) {
    let eps = 1e-5f32;
    for (n, d) in [(1usize, 64usize), (3, 1000), (2, 2051)] {
        let case = format!("n {n} d {d}");
        let (x, xf) = rng.bf16s(n * d, 1.5);
        let (w, wf) = rng.bf16s(d, 1.0);
        let (mut out, mut rstd) = (nan_bf16(n * d), vec![f32::NAN; n]);
        let (ni, di) = (n as i32, d as i32);
        let (po, pr, px, pw) = (out.as_mut_ptr(), rstd.as_mut_ptr(), x.as_ptr(), w.as_ptr());
        r.launch(
            "rmsnorm_forward",
            per_row(n),
            &[arg(&po), arg(&pr), arg(&px), arg(&pw), arg(&ni), arg(&di), arg(&eps)],
        );
        let (mut t_out, mut t_rstd) = (vec![0.0; n * d], vec![0.0; n]);
        cpu::rmsnorm_forward(&mut t_out, &mut t_rstd, &xf, &wf, n, d, eps);
        r.check(
            "rmsnorm_forward",
            &case,
            &[
                ("out", rel_err(&f64s_bf16(&out), &t_out), TOL_BF16),
                ("rstd", rel_err(&f64s_f32(&rstd), &t_rstd), TOL_F32),
            ],
        );

        let (delta, deltaf) = rng.bf16s(n * d, 0.5);
        let (mut x_out, mut out, mut rstd) = (nan_bf16(n * d), nan_bf16(n * d), vec![f32::NAN; n]);
        let (pxo, po, pr, pd) = (x_out.as_mut_ptr(), out.as_mut_ptr(), rstd.as_mut_ptr(), delta.as_ptr());
        r.launch(
            "residual_rmsnorm_forward",
            per_row(n),
            &[arg(&pxo), arg(&po), arg(&pr), arg(&px), arg(&pd), arg(&pw), arg(&ni), arg(&di), arg(&eps)],
        );
        let (mut t_xo, mut t_out, mut t_rstd) = (vec![0.0; n * d], vec![0.0; n * d], vec![0.0; n]);
        cpu::residual_rmsnorm_forward(&mut t_xo, &mut t_out, &mut t_rstd, &xf, &deltaf, &wf, n, d, eps);
        r.check(
            "residual_rmsnorm_forward",
            &case,
            &[
                ("x_out", rel_err(&f64s_bf16(&x_out), &t_xo), TOL_BF16),
                ("out", rel_err(&f64s_bf16(&out), &t_out), TOL_BF16),
                // From x_out rounded to bf16 (what the backward reads); the twin's is not.
                ("rstd", rel_err(&f64s_f32(&rstd), &t_rstd), TOL_BF16),
            ],
        );
    }
    // Backward: n past DW_CHUNKS (64) rows makes several rows per chunk, and a ragged last chunk.
    for (n, d) in [(1usize, 64usize), (5, 300), (130, 257)] {
        let case = format!("n {n} d {d}");
        let (dout, doutf) = rng.bf16s(n * d, 1.0);
        let (x, xf) = rng.bf16s(n * d, 1.0);
        let (w, wf) = rng.bf16s(d, 1.0);
        let rstd: Vec<f32> = (0..n).map(|_| (0.5 + rng.uniform()) as f32).collect();
        let (mut dx, dxf) = rng.bf16s(n * d, 1.0);
        let mut dw = rng.f32s(d, 1.0);
        let dw0 = f64s_f32(&dw);
        let (ni, di) = (n as i32, d as i32);
        let (pdx, pdo, px, pw, pr) = (dx.as_mut_ptr(), dout.as_ptr(), x.as_ptr(), w.as_ptr(), rstd.as_ptr());
        r.launch(
            "rmsnorm_backward_dx",
            per_row(n),
            &[arg(&pdx), arg(&pdo), arg(&px), arg(&pw), arg(&pr), arg(&ni), arg(&di)],
        );
        let rows_per_chunk = n.div_ceil(RMSNORM_DW_CHUNKS);
        let n_chunks = n.div_ceil(rows_per_chunk);
        let mut partial = vec![f32::NAN; n_chunks * d];
        let (rpc, nci) = (rows_per_chunk as i32, n_chunks as i32);
        let col_blocks = d.div_ceil(BLOCK as usize) as u32;
        let pp = partial.as_mut_ptr();
        r.launch(
            "rmsnorm_backward_dw_partial",
            Cfg { grid: (col_blocks, n_chunks as u32, 1), block: (BLOCK, 1, 1) },
            &[arg(&pp), arg(&pdo), arg(&px), arg(&pr), arg(&ni), arg(&di), arg(&rpc)],
        );
        let partial_sum: Vec<f64> =
            (0..d).map(|k| (0..n_chunks).map(|c| partial[c * d + k] as f64).sum()).collect();
        let pdw = dw.as_mut_ptr();
        r.launch(
            "rmsnorm_backward_dw_reduce",
            Cfg { grid: (col_blocks, 1, 1), block: (BLOCK, 1, 1) },
            &[arg(&pdw), arg(&pp), arg(&di), arg(&nci)],
        );
        let rstdf = f64s_f32(&rstd);
        let mut t_dx = dxf.clone();
        let mut t_dw = vec![0.0; d];
        cpu::rmsnorm_backward(&mut t_dx, &mut t_dw, &doutf, &xf, &wf, &rstdf, n, d);
        r.check("rmsnorm_backward_dx", &case, &[("out", rel_err(&f64s_bf16(&dx), &t_dx), TOL_BF16)]);
        r.check("rmsnorm_backward_dw_partial", &case, &[("out", rel_err(&partial_sum, &t_dw), TOL_F32)]);
        let t_dw_total: Vec<f64> = t_dw.iter().zip(&dw0).map(|(a, b)| a + b).collect();
        r.check(
            "rmsnorm_backward_dw_reduce",
            &case,
            &[("out", rel_err(&f64s_f32(&dw), &t_dw_total), TOL_F32)],
        );
    }
}

pub fn rope(r: &mut Report, rng: &mut Rng) {
    let scalings = [
        None,
        Some(RopeScaling::Linear { factor: 4.0 }),
        Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        }),
    ];
    let shapes = [
        (5usize, HeadShape { n_heads: 2, n_kv_heads: 1, head_dim: 64 }),
        (1, HeadShape { n_heads: 1, n_kv_heads: 1, head_dim: 128 }),
    ];
    for (n, heads) in shapes {
        for style in [RopeStyle::AdjacentPairs, RopeStyle::HalfSplit] {
            for scaling in scalings {
                for direction in [1.0f32, -1.0] {
                    let rope = Rope { theta: 500000.0, style, scaling };
                    let case =
                        format!("n {n} hd {} {style:?} {scaling:?} direction {direction}", heads.head_dim);
                    let width = heads.qkv_width();
                    let (mut qkv, qkvf) = rng.bf16s(n * width, 1.0);
                    // Positions up to 100k: large angles (rope.cu takes sin/cos in double).
                    let positions: Vec<u32> = (0..n).map(|_| rng.below(100_000) as u32).collect();
                    let style_i = rope_style_arg(style);
                    let sc = rope_scaling_args(scaling);
                    let rot_heads = heads.n_heads + heads.n_kv_heads;
                    let total = n * rot_heads * heads.head_dim / 2;
                    let (ni, hi, hdi, wi) = (n as i32, rot_heads as i32, heads.head_dim as i32, width as i32);
                    let (pq, pp) = (qkv.as_mut_ptr(), positions.as_ptr());
                    r.launch(
                        "rope_apply",
                        grid_stride(total),
                        &[
                            arg(&pq),
                            arg(&pp),
                            arg(&ni),
                            arg(&hi),
                            arg(&hdi),
                            arg(&wi),
                            arg(&rope.theta),
                            arg(&style_i),
                            arg(&direction),
                            arg(&sc.0),
                            arg(&sc.1),
                            arg(&sc.2),
                            arg(&sc.3),
                            arg(&sc.4),
                        ],
                    );
                    let mut want = qkvf.clone();
                    if direction > 0.0 {
                        cpu::rope_forward(&mut want, &positions, n, heads, rope);
                    } else {
                        cpu::rope_backward(&mut want, &positions, n, heads, rope);
                    }
                    r.check("rope_apply", &case, &[("out", rel_err(&f64s_bf16(&qkv), &want), TOL_BF16)]);
                }
            }
        }
    }
}

pub fn swiglu(r: &mut Report, rng: &mut Rng) {
    for (n, hidden) in [(1usize, 1usize), (4, 1000), (2, 1537)] {
        let case = format!("n {n} hidden {hidden}");
        let (gate_up, guf) = rng.bf16s(2 * n * hidden, 2.0);
        let (dout, doutf) = rng.bf16s(n * hidden, 1.0);
        let (ni, hi) = (n as i32, hidden as i32);
        let mut out = nan_bf16(n * hidden);
        let (po, pg) = (out.as_mut_ptr(), gate_up.as_ptr());
        r.launch("swiglu_forward", grid_stride(n * hidden), &[arg(&po), arg(&pg), arg(&ni), arg(&hi)]);
        let mut want = vec![0.0; n * hidden];
        cpu::swiglu_forward(&mut want, &guf, n, hidden);
        r.check("swiglu_forward", &case, &[("out", rel_err(&f64s_bf16(&out), &want), TOL_BF16)]);

        let mut dgu = nan_bf16(2 * n * hidden);
        let (pd, pdo) = (dgu.as_mut_ptr(), dout.as_ptr());
        r.launch(
            "swiglu_backward",
            grid_stride(n * hidden),
            &[arg(&pd), arg(&pdo), arg(&pg), arg(&ni), arg(&hi)],
        );
        let mut want = vec![0.0; 2 * n * hidden];
        cpu::swiglu_backward(&mut want, &doutf, &guf, n, hidden);
        r.check("swiglu_backward", &case, &[("out", rel_err(&f64s_bf16(&dgu), &want), TOL_BF16)]);
    }
}

pub fn dropout(r: &mut Report, rng: &mut Rng) {
    for (len, p) in [(1usize, 0.5f32), (5000, 0.1), (3001, 0.5)] {
        let case = format!("len {len} p {p}");
        let seed = rng.next_u64();
        // dropout.rs: scale = 1 / (1 - p) in f32.
        let scale = 1.0 / (1.0 - p);
        let (mut x, xf) = rng.bf16s(len, 1.0);
        let px = x.as_mut_ptr();
        r.launch("dropout_bf16", grid_stride(len), &[arg(&px), arg(&len), arg(&p), arg(&scale), arg(&seed)]);
        let mut want = xf.clone();
        cpu::dropout(&mut want, len, p, seed);
        // The mask exactly (an element is zero iff the twin's is), the kept values to bf16.
        let masks = mismatches(
            &x.iter().map(|v| v.to_f32() == 0.0).collect::<Vec<_>>(),
            &want.iter().map(|&v| v == 0.0).collect::<Vec<_>>(),
        );
        r.check(
            "dropout_bf16",
            &case,
            &[("mask", masks, EXACT), ("x", rel_err(&f64s_bf16(&x), &want), TOL_BF16)],
        );

        let mut x = rng.f32s(len, 1.0);
        let mut want: Vec<f64> = f64s_f32(&x);
        let px = x.as_mut_ptr();
        r.launch("dropout_f32", grid_stride(len), &[arg(&px), arg(&len), arg(&p), arg(&scale), arg(&seed)]);
        cpu::dropout(&mut want, len, p, seed);
        let masks = mismatches(
            &x.iter().map(|&v| v == 0.0).collect::<Vec<_>>(),
            &want.iter().map(|&v| v == 0.0).collect::<Vec<_>>(),
        );
        r.check(
            "dropout_f32",
            &case,
            &[("mask", masks, EXACT), ("x", rel_err(&f64s_f32(&x), &want), TOL_F32)],
        );
    }
}

pub fn embedding(r: &mut Report, rng: &mut Rng) {
    for (n, d, vocab) in [(1usize, 64usize, 7usize), (37, 100, 11), (9, 300, 1000)] {
        let case = format!("n {n} d {d} vocab {vocab}");
        let ids: Vec<u32> = (0..n).map(|_| rng.below(vocab) as u32).collect();
        let (table, tablef) = rng.bf16s(vocab * d, 1.0);
        let mut out = nan_bf16(n * d);
        let (ni, di) = (n as i32, d as i32);
        let (po, pi, pt) = (out.as_mut_ptr(), ids.as_ptr(), table.as_ptr());
        r.launch(
            "embedding_forward",
            grid_stride(n * d),
            &[arg(&po), arg(&pi), arg(&pt), arg(&ni), arg(&di)],
        );
        let mut want = vec![0.0; n * d];
        cpu::embedding_forward(&mut want, &ids, &tablef, n, d);
        r.check("embedding_forward", &case, &[("out", mismatches(&f64s_bf16(&out), &want), EXACT)]);

        let (dout, doutf) = rng.bf16s(n * d, 1.0);
        // The grouping the model makes when it loads a batch (group_tokens_by_id), and the CPU
        // twin of the same grouped sum.
        let (groups, n_groups) = group_tokens_by_id(&ids);
        let (order, start, gid) = token_groups(&groups, n, n_groups).unwrap();
        let cfg =
            Cfg { grid: (gid.len() as u32, d.div_ceil(BLOCK as usize) as u32, 1), block: (BLOCK, 1, 1) };
        let (pdo, por, pst, pid) = (dout.as_ptr(), order.as_ptr(), start.as_ptr(), gid.as_ptr());
        let mut dt = rng.f32s(vocab * d, 1.0);
        let mut want = f64s_f32(&dt);
        let pdt = dt.as_mut_ptr();
        r.launch(
            "embedding_backward_grouped",
            cfg,
            &[arg(&pdt), arg(&pdo), arg(&por), arg(&pst), arg(&pid), arg(&di)],
        );
        cpu::embedding_backward_grouped(&mut want, order, start, gid, &doutf, d, GradMode::Accumulate);
        r.check("embedding_backward_grouped", &case, &[("out", rel_err(&f64s_f32(&dt), &want), TOL_F32)]);

        let (mut dt, dtf) = rng.bf16s(vocab * d, 1.0);
        let mut want = dtf;
        let pdt = dt.as_mut_ptr();
        r.launch(
            "embedding_backward_grouped_bf16",
            cfg,
            &[arg(&pdt), arg(&pdo), arg(&por), arg(&pst), arg(&pid), arg(&di)],
        );
        cpu::embedding_backward_grouped(&mut want, order, start, gid, &doutf, d, GradMode::Accumulate);
        r.check(
            "embedding_backward_grouped_bf16",
            &case,
            &[("out", rel_err(&f64s_bf16(&dt), &want), TOL_BF16)],
        );
    }
}
