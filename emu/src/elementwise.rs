//! Cases of the element-wise and row-wise kernels: casts, RMSNorm, RoPE, SwiGLU, dropout,
//! embedding. Launches mirror src/backend/cuda/{cast,rmsnorm,rope,swiglu,dropout,embedding}.rs.

use half::bf16;
use sft::backend::cpu;
use sft::backend::cuda::{
    dropout_args, rmsnorm_backward_config, rmsnorm_dw_chunks, rmsnorm_dw_reduce_config, rope_apply_config,
    rope_style_arg, rope_vec_arg, swiglu_vec_arg,
};
use sft::backend::{
    group_tokens_by_id, token_groups, Dropout, GradMode, HeadShape, Rope, RopeScaling, RopeStyle,
};

use crate::emu::*;

pub fn casts(r: &mut Report, rng: &mut Rng) {
    // 1 and 3001: the scalar tail (len % 8); 1000 and 4096: 16-byte groups only.
    for len in [1usize, 1000, 3001, 4096] {
        let case = format!("len {len}");
        // Include values that round at a tie and subnormals: the rounding must be to nearest even.
        let mut src = rng.f32s(len, 3.0);
        if len > 4 {
            src[1] = f32::from_bits(0x3f80_8000); // 1 + 2^-8: a tie, rounds down to 1.0
            src[2] = f32::from_bits(0x3f81_8000); // a tie that rounds up
            src[3] = 1e-40;
            src[len - 1] = f32::from_bits(0x3f81_8000); // the same tie in the tail
        }
        let mut out = nan_bf16(len);
        let (po, ps, li) = (out.as_mut_ptr(), src.as_ptr(), len as i32);
        r.launch("cast_f32_to_bf16", grid_stride(len.div_ceil(8)), &[arg(&po), arg(&ps), arg(&li)]);
        let want: Vec<bf16> = src.iter().map(|&x| bf16::from_f32(x)).collect();
        r.check("cast_f32_to_bf16", &case, &[("out", mismatches(&out, &want), EXACT)]);

        let (src, want) = rng.bf16s(len, 3.0);
        let mut out = vec![f32::NAN; len];
        let (po, ps) = (out.as_mut_ptr(), src.as_ptr());
        r.launch("cast_bf16_to_f32", grid_stride(len.div_ceil(8)), &[arg(&po), arg(&ps), arg(&li)]);
        r.check("cast_bf16_to_f32", &case, &[("out", mismatches(&f64s_f32(&out), &want), EXACT)]);
    }
}

pub fn rmsnorm(r: &mut Report, rng: &mut Rng) {
    let eps = 1e-5f32;
    // d 64 and 2048: 16-byte groups; 1000 is a multiple of 8 too; 2051 and 300: the scalar path.
    for (n, d) in [(1usize, 64usize), (3, 1000), (2, 2051), (2, 2048), (3, 300)] {
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

        for dropout in [None, Some(Dropout { p: 0.25, seed: rng.next_u64() })] {
            let case = format!("{case} dropout {dropout:?}");
            let (delta, deltaf) = rng.bf16s(n * d, 0.5);
            let (mut x_out, mut out, mut rstd) = (nan_bf16(n * d), nan_bf16(n * d), vec![f32::NAN; n]);
            let (pxo, po, pr, pd) = (x_out.as_mut_ptr(), out.as_mut_ptr(), rstd.as_mut_ptr(), delta.as_ptr());
            let (p, scale, seed) = dropout_args(dropout);
            r.launch(
                "residual_rmsnorm_forward",
                per_row(n),
                &[
                    arg(&pxo),
                    arg(&po),
                    arg(&pr),
                    arg(&px),
                    arg(&pd),
                    arg(&pw),
                    arg(&ni),
                    arg(&di),
                    arg(&eps),
                    arg(&p),
                    arg(&scale),
                    arg(&seed),
                ],
            );
            let (mut t_xo, mut t_out, mut t_rstd) = (vec![0.0; n * d], vec![0.0; n * d], vec![0.0; n]);
            cpu::residual_rmsnorm_forward(
                &mut t_xo,
                &mut t_out,
                &mut t_rstd,
                &xf,
                &deltaf,
                &wf,
                n,
                d,
                eps,
                dropout,
            );
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
    }
    // Backward: n past RMSNORM_DW_CHUNKS (512) rows makes two rows per chunk and a one-row
    // last chunk (601), three per chunk (1100, in two warps: the alternating reduction buffer),
    // or three per chunk on the general loop (1200); d 256, 64, 24, 512, 2048 and 4096 take a
    // thread per 16-byte group (blocks of 32 to 512 threads, some idle where d / 8 is not a
    // multiple of 32), 257, 300 and 20 the general loop.
    let shapes = [
        (1usize, 64usize),
        (5, 300),
        (130, 257),
        (601, 24),
        (1200, 20),
        (7, 256),
        (1100, 512),
        (3, 2048),
        (2, 4096),
    ];
    for (n, d) in shapes {
        for dropout in [None, Some(Dropout { p: 0.3, seed: rng.next_u64() })] {
            let case = format!("n {n} d {d} dropout {dropout:?}");
            let (dout, doutf) = rng.bf16s(n * d, 1.0);
            let (x, xf) = rng.bf16s(n * d, 1.0);
            let (w, wf) = rng.bf16s(d, 1.0);
            let rstd: Vec<f32> = (0..n).map(|_| (0.5 + rng.uniform()) as f32).collect();
            let (mut dx, dxf) = rng.bf16s(n * d, 1.0);
            let mut dw = rng.f32s(d, 1.0);
            let dw0 = f64s_f32(&dw);
            let mut branch = nan_bf16(n * d);
            let (ni, di) = (n as i32, d as i32);
            let (pdx, pdo, px, pw, pr) =
                (dx.as_mut_ptr(), dout.as_ptr(), x.as_ptr(), w.as_ptr(), rstd.as_ptr());
            let pb = if dropout.is_some() { branch.as_mut_ptr() } else { std::ptr::null_mut() };
            let (rows_per_chunk, n_chunks) = rmsnorm_dw_chunks(n);
            let mut partial = vec![f32::NAN; n_chunks * d];
            let (rpc, nci) = (rows_per_chunk as i32, n_chunks as i32);
            let pp = partial.as_mut_ptr();
            let (p, scale, seed) = dropout_args(dropout);
            r.launch(
                "rmsnorm_backward",
                rmsnorm_backward_config(n_chunks, d).into(),
                &[
                    arg(&pdx),
                    arg(&pp),
                    arg(&pb),
                    arg(&pdo),
                    arg(&px),
                    arg(&pw),
                    arg(&pr),
                    arg(&ni),
                    arg(&di),
                    arg(&rpc),
                    arg(&p),
                    arg(&scale),
                    arg(&seed),
                ],
            );
            let partial_sum: Vec<f64> =
                (0..d).map(|k| (0..n_chunks).map(|c| partial[c * d + k] as f64).sum()).collect();
            let pdw = dw.as_mut_ptr();
            r.launch(
                "rmsnorm_backward_dw_reduce",
                rmsnorm_dw_reduce_config(d).into(),
                &[arg(&pdw), arg(&pp), arg(&di), arg(&nci)],
            );
            let rstdf = f64s_f32(&rstd);
            let mut t_dx = dxf.clone();
            let mut t_dw = vec![0.0; d];
            let mut t_branch = vec![0.0; n * d];
            let t_out = dropout.map(|m| (t_branch.as_mut_slice(), m));
            cpu::rmsnorm_backward(&mut t_dx, &mut t_dw, &doutf, &xf, &wf, &rstdf, n, d, t_out);
            let mut outputs = vec![
                ("dx", rel_err(&f64s_bf16(&dx), &t_dx), TOL_BF16),
                ("dw partials", rel_err(&partial_sum, &t_dw), TOL_F32),
            ];
            if dropout.is_some() {
                // The mask exactly (an element is zero iff the twin's is), the values to bf16.
                let masks = mismatches(
                    &branch.iter().map(|v| v.to_f32() == 0.0).collect::<Vec<_>>(),
                    &t_branch.iter().map(|&v| v == 0.0).collect::<Vec<_>>(),
                );
                outputs.push(("branch mask", masks, EXACT));
                outputs.push(("branch", rel_err(&f64s_bf16(&branch), &t_branch), TOL_BF16));
            }
            r.check("rmsnorm_backward", &case, &outputs);
            let t_dw_total: Vec<f64> = t_dw.iter().zip(&dw0).map(|(a, b)| a + b).collect();
            r.check(
                "rmsnorm_backward_dw_reduce",
                &case,
                &[("out", rel_err(&f64s_f32(&dw), &t_dw_total), TOL_F32)],
            );
        }
    }

    // A row whose squares overflow fp32 (3e19² > 3.4e38) gets a NaN rstd and NaN outputs, as the
    // f32 CPU backend's (the f64 twin above would not overflow); the other row is normalized.
    for d in [64usize, 300] {
        let case = format!("n 2 d {d}, row 0 overflows fp32");
        let (mut x, _) = rng.bf16s(2 * d, 1.5);
        x[d / 2] = bf16::from_f32(3e19);
        let (w, _) = rng.bf16s(d, 1.0);
        let (mut out, mut rstd) = (nan_bf16(2 * d), vec![0.0f32; 2]);
        let (ni, di) = (2i32, d as i32);
        let (po, pr, px, pw) = (out.as_mut_ptr(), rstd.as_mut_ptr(), x.as_ptr(), w.as_ptr());
        r.launch(
            "rmsnorm_forward",
            per_row(2),
            &[arg(&po), arg(&pr), arg(&px), arg(&pw), arg(&ni), arg(&di), arg(&eps)],
        );
        let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
        let (mut t_out, mut t_rstd) = (vec![0.0f32; 2 * d], vec![0.0f32; 2]);
        cpu::rmsnorm_forward(&mut t_out, &mut t_rstd, &xf, &wf, 2, d, eps);
        let nan_rows = [rstd[0].is_nan(), rstd[1].is_nan()];
        let nan_outs = out.iter().filter(|v| v.is_nan()).count();
        let finite: Vec<f64> = t_out[d..].iter().map(|&v| v as f64).collect();
        r.check(
            "rmsnorm_forward",
            &case,
            &[
                ("nan rows", mismatches(&nan_rows, &[t_rstd[0].is_nan(), t_rstd[1].is_nan()]), EXACT),
                ("nan outputs", (nan_outs as f64 - d as f64).abs(), EXACT),
                ("finite row", rel_err(&f64s_bf16(&out[d..]), &finite), TOL_BF16),
            ],
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
    // head_dim 64 and 128: 16-byte groups; 40 and 6: one pair per thread.
    let shapes = [
        (5usize, HeadShape { n_heads: 2, n_kv_heads: 1, head_dim: 64 }),
        (1, HeadShape { n_heads: 1, n_kv_heads: 1, head_dim: 128 }),
        (3, HeadShape { n_heads: 3, n_kv_heads: 1, head_dim: 40 }),
        (2, HeadShape { n_heads: 2, n_kv_heads: 2, head_dim: 6 }),
    ];
    for (n, heads) in shapes {
        for scaling in scalings {
            let hd = heads.head_dim;
            let rope = Rope { theta: 500000.0, style: RopeStyle::AdjacentPairs, scaling };
            // Positions up to 130k: large angles, reduced in fp32 by the table kernel.
            let positions: Vec<u32> = (0..n).map(|_| rng.below(130_000) as u32).collect();
            let freqs: Vec<f32> = (0..hd / 2).map(|j| rope.inv_freq(j, hd)).collect();
            let mut table = vec![f32::NAN; n * hd];
            let (pt, pp, pf, ni, hi) =
                (table.as_mut_ptr(), positions.as_ptr(), freqs.as_ptr(), n as i32, (hd / 2) as i32);
            r.launch(
                "rope_table",
                grid_stride(n * hd / 2),
                &[arg(&pt), arg(&pp), arg(&pf), arg(&ni), arg(&hi)],
            );
            let mut t_table = vec![0.0f64; n * hd];
            cpu::rope_table(&mut t_table, &positions, n, hd, rope);
            let worst = f64s_f32(&table).iter().zip(&t_table).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            let case = format!("n {n} hd {hd} {scaling:?}");
            // Absolute error of cos and sin (the angle is the same f32 product in both).
            r.check("rope_table", &case, &[("cos/sin", worst, 1e-6)]);

            for style in [RopeStyle::AdjacentPairs, RopeStyle::HalfSplit] {
                for direction in [1.0f32, -1.0] {
                    let case = format!("{case} {style:?} direction {direction}");
                    let width = heads.qkv_width();
                    let (mut qkv, qkvf) = rng.bf16s(n * width, 1.0);
                    let style_i = rope_style_arg(style);
                    let vec = rope_vec_arg(heads);
                    let rot_heads = heads.n_heads + heads.n_kv_heads;
                    let (hi, hdi, wi) = (rot_heads as i32, hd as i32, width as i32);
                    let pq = qkv.as_mut_ptr();
                    let pt = table.as_ptr();
                    r.launch(
                        "rope_apply",
                        rope_apply_config(n).into(),
                        &[
                            arg(&pq),
                            arg(&pt),
                            arg(&ni),
                            arg(&hi),
                            arg(&hdi),
                            arg(&wi),
                            arg(&style_i),
                            arg(&direction),
                            arg(&vec),
                        ],
                    );
                    let mut want = qkvf.clone();
                    if direction > 0.0 {
                        cpu::rope_forward(&mut want, &t_table, n, heads, style);
                    } else {
                        cpu::rope_backward(&mut want, &t_table, n, heads, style);
                    }
                    r.check("rope_apply", &case, &[("out", rel_err(&f64s_bf16(&qkv), &want), TOL_BF16)]);
                }
            }
        }
    }
}

pub fn swiglu(r: &mut Report, rng: &mut Rng) {
    // hidden 1, 1537 and 1001: the scalar path; 1000 and 64: 16-byte groups.
    for (n, hidden) in [(1usize, 1usize), (4, 1000), (2, 1537), (3, 64), (2, 1001)] {
        let case = format!("n {n} hidden {hidden}");
        let (gate_up, guf) = rng.bf16s(2 * n * hidden, 2.0);
        let (dout, doutf) = rng.bf16s(n * hidden, 1.0);
        let (ni, hi) = (n as i32, hidden as i32);
        let (items, vec) = swiglu_vec_arg(n, hidden).expect("small sizes fit");
        let mut out = nan_bf16(n * hidden);
        let (po, pg) = (out.as_mut_ptr(), gate_up.as_ptr());
        r.launch("swiglu_forward", grid_stride(items), &[arg(&po), arg(&pg), arg(&ni), arg(&hi), arg(&vec)]);
        let mut want = vec![0.0; n * hidden];
        cpu::swiglu_forward(&mut want, &guf, n, hidden);
        r.check("swiglu_forward", &case, &[("out", rel_err(&f64s_bf16(&out), &want), TOL_BF16)]);

        let mut dgu = nan_bf16(2 * n * hidden);
        let (pd, pdo) = (dgu.as_mut_ptr(), dout.as_ptr());
        r.launch(
            "swiglu_backward",
            grid_stride(items),
            &[arg(&pd), arg(&pdo), arg(&pg), arg(&ni), arg(&hi), arg(&vec)],
        );
        let mut want = vec![0.0; 2 * n * hidden];
        cpu::swiglu_backward(&mut want, &doutf, &guf, n, hidden);
        r.check("swiglu_backward", &case, &[("out", rel_err(&f64s_bf16(&dgu), &want), TOL_BF16)]);
    }
}

pub fn dropout(r: &mut Report, rng: &mut Rng) {
    // 1 and 3001: the scalar tail; 5000 and 4096: 16-byte groups only.
    for (len, p) in [(1usize, 0.5f32), (5000, 0.1), (3001, 0.5), (4096, 0.3)] {
        let case = format!("len {len} p {p}");
        let seed = rng.next_u64();
        // dropout.rs: scale = 1 / (1 - p) in f32.
        let scale = 1.0 / (1.0 - p);
        let li = len as i32;
        let cfg = || grid_stride(len.div_ceil(8));
        let (mut x, xf) = rng.bf16s(len, 1.0);
        let px = x.as_mut_ptr();
        r.launch("dropout_bf16", cfg(), &[arg(&px), arg(&li), arg(&p), arg(&scale), arg(&seed)]);
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
        r.launch("dropout_f32", cfg(), &[arg(&px), arg(&li), arg(&p), arg(&scale), arg(&seed)]);
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
