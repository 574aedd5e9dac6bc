//! Cases of the reductions, the optimizer, the loss and the GEMM fallback. Launches mirror
//! src/backend/cuda/{global_norm,adamw,cross_entropy,matmul}.rs.

use half::bf16;
use sft::backend::cpu::{self, CeGrads, Real};
use sft::backend::cuda::{
    cross_entropy_copy_items, cross_entropy_vec_arg, sum_squares_blocks, ADAMW_MAX_BLOCKS, SUM_SPLIT_THREADS,
};
use sft::backend::{clip_factor, stats, AdamW, GradMode, StateDtype};

use crate::emu::*;
/// Logit elements per chunk here: small, so that the cases run several chunks through the
/// gather/scatter and loss kernels (the backend sizes its chunks from a byte budget,
/// `cross_entropy_chunk_rows`, which for these small cases would be one chunk).
const CHUNK_LOGITS: usize = 32 << 20;

/// The grid of sum_squares (the host sums exactly `blocks` partials).
fn sumsq_cfg(len: usize) -> (usize, Cfg) {
    let blocks = sum_squares_blocks(len);
    (blocks, Cfg { grid: (blocks as u32, 1, 1), block: (BLOCK, 1, 1) })
}

/// global_norm.rs sum_split: one block adds `count` floats in double into a split f64.
fn sum_split_launch(r: &mut Report, out: &mut [f32], x: &[f32], accumulate: bool) {
    let cfg = Cfg { grid: (1, 1, 1), block: (SUM_SPLIT_THREADS, 1, 1) };
    let (po, px, count, acc) = (out.as_mut_ptr(), x.as_ptr(), x.len() as i32, accumulate as i32);
    r.launch("sum_split", cfg, &[arg(&po), arg(&px), arg(&count), arg(&acc)]);
}

pub fn sum_squares(r: &mut Report, rng: &mut Rng) {
    // Lengths under one vector, with a scalar tail, and past one pass of the grid (every thread
    // strides); `skip` 1 starts one element in, off the 16-byte alignment (the scalar path only).
    for (len, skip) in [(1usize, 0usize), (1000, 0), (1003, 1), (40001, 0), (2_200_003, 0), (5000, 1)] {
        let case = format!("len {len}{}", if skip > 0 { " unaligned" } else { "" });
        let (blocks, cfg) = sumsq_cfg(len);
        let x = rng.f32s(len + skip, 1.0);
        let mut partial = vec![f32::NAN; blocks];
        let (pp, px) = (partial.as_mut_ptr(), x[skip..].as_ptr());
        r.launch("sum_squares_f32", cfg, &[arg(&pp), arg(&px), arg(&len)]);
        // The partials go through sum_split on the device, as sum_squares does.
        let mut total = [f32::NAN; stats::SPLIT];
        sum_split_launch(r, &mut total, &partial, false);
        let got = stats::join(&total, 0);
        let want = cpu::sum_squares(&[&f64s_f32(&x[skip..])[..]], &[len]);
        r.check("sum_squares_f32", &case, &[("sum", rel_err(&[got], &[want]), TOL_F32)]);

        let (x, xf) = rng.bf16s(len + skip, 1.0);
        let mut partial = vec![f32::NAN; blocks];
        let (pp, px) = (partial.as_mut_ptr(), x[skip..].as_ptr());
        r.launch("sum_squares_bf16", cfg, &[arg(&pp), arg(&px), arg(&len)]);
        let got: f64 = partial.iter().map(|&v| v as f64).sum();
        let want = cpu::sum_squares(&[&xf[skip..]], &[len]);
        r.check("sum_squares_bf16", &case, &[("sum", rel_err(&[got], &[want]), TOL_F32)]);
    }
    // The loss sums: written, then added to, against the CPU twin's f64 sum; the split value
    // must come back whole (72 bits), so the bound is f64's.
    for len in [0usize, 1, 255, 256, 257, 5000] {
        let case = format!("len {len}");
        let x: Vec<f32> = rng.f32s(len, 1.0).iter().map(|v| v.abs() * 3.0 + 0.1).collect();
        let mut out = [f32::NAN; stats::SPLIT];
        sum_split_launch(r, &mut out, &x, false);
        let once = stats::join(&out, 0);
        sum_split_launch(r, &mut out, &x, true);
        let twice = stats::join(&out, 0);
        let want = cpu::sum(&x);
        r.check(
            "sum_split",
            &case,
            &[
                ("sum", rel_err(&[once], &[want]), 1e-13),
                ("accumulated", rel_err(&[twice], &[2.0 * want]), 1e-13),
            ],
        );
    }
}

/// adamw.cu AdamTensor.
#[repr(C)]
struct AdamTensor {
    master: *mut f32,
    grad: *const f32,
    m: *mut f32,
    v: *mut f32,
    param: *mut bf16,
    len: u64,
}

/// adamw.cu AdamTensorBf16: the moments stored in bf16.
#[repr(C)]
struct AdamTensorBf16 {
    master: *mut f32,
    grad: *const f32,
    m: *mut bf16,
    v: *mut bf16,
    param: *mut bf16,
    len: u64,
}

/// The clip of an adamw case: none (a null sum of squares), the norm over the limit, or a norm
/// that is not finite (the update must be skipped).
#[derive(Clone, Copy, Debug)]
enum ClipCase {
    None,
    Clipped,
    NonFinite,
}

pub fn adamw(r: &mut Report, rng: &mut Rng) {
    let f32_cases = [
        (vec![1usize], ClipCase::None),
        (vec![1, 300, 2000], ClipCase::None),
        (vec![1, 300, 2000], ClipCase::Clipped),
        (vec![300, 7], ClipCase::NonFinite),
    ];
    let bf16_cases = [
        (vec![1usize, 300, 2000], ClipCase::None),
        (vec![1, 300, 2000], ClipCase::Clipped),
        (vec![300, 7], ClipCase::NonFinite),
    ];
    let cases = f32_cases.into_iter().map(|c| (c, StateDtype::F32));
    for ((lens, clip), moments) in cases.chain(bf16_cases.into_iter().map(|c| (c, StateDtype::Bf16))) {
        let case = format!("lens {lens:?}, clip {clip:?}, moments {moments}");
        let hp = AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            step: 3,
            grad_scale: 0.7,
        };
        // What a moment buffer can hold: bf16 values with bf16 moments.
        let held = |x: Vec<f32>| -> Vec<f32> {
            match moments {
                StateDtype::F32 => x,
                StateDtype::Bf16 => x.iter().map(|&x| bf16::from_f32(x).to_f32()).collect(),
            }
        };
        let mut master: Vec<Vec<f32>> = lens.iter().map(|&l| rng.f32s(l, 1.0)).collect();
        let mut grads: Vec<Vec<f32>> = lens.iter().map(|&l| rng.f32s(l, 1.0)).collect();
        if moments == StateDtype::Bf16 {
            // Tiny gradients: v (g² ≈ 1e-42) flushes to zero in bf16, where it is a subnormal
            // in f32; the update must stay what the twin says (bounded by m / eps).
            grads.iter_mut().for_each(|g| g.iter_mut().step_by(5).for_each(|x| *x *= 1e-21));
        }
        let mut m: Vec<Vec<f32>> = lens.iter().map(|&l| held(rng.f32s(l, 0.1))).collect();
        let mut v: Vec<Vec<f32>> =
            lens.iter().map(|&l| held(rng.f32s(l, 0.01).iter().map(|x| x.abs()).collect())).collect();
        let mut m_bf: Vec<Vec<bf16>> =
            m.iter().map(|x| x.iter().map(|&x| bf16::from_f32(x)).collect()).collect();
        let mut v_bf: Vec<Vec<bf16>> =
            v.iter().map(|x| x.iter().map(|&x| bf16::from_f32(x)).collect()).collect();
        let mut params: Vec<Vec<bf16>> = lens.iter().map(|&l| nan_bf16(l)).collect();
        let mut want: Vec<[Vec<f64>; 4]> = (0..lens.len())
            .map(|i| [f64s_f32(&master[i]), f64s_f32(&m[i]), f64s_f32(&v[i]), f64s_bf16(&params[i])])
            .collect();
        // The sum of squares as sum_squares leaves it (split), and the limit: a third of the norm.
        let sumsq: f64 = grads.iter().flatten().map(|&g| g as f64 * g as f64).sum();
        let max_norm = (sumsq.sqrt() / 3.0) as f32;
        let stats_split = match clip {
            ClipCase::NonFinite => [f32::INFINITY, 0.0, 0.0],
            _ => stats::split(sumsq),
        };
        let max_len = *lens.iter().max().unwrap();
        let bc1 = (1.0 - (hp.beta1 as f64).powi(hp.step as i32)) as f32;
        let bc2 = (1.0 - (hp.beta2 as f64).powi(hp.step as i32)) as f32;
        let blocks = (max_len.div_ceil(BLOCK as usize).min(ADAMW_MAX_BLOCKS) as u32).min(GRID_STRIDE_CAP);
        let psumsq: *const f32 = match clip {
            ClipCase::None => std::ptr::null(),
            _ => stats_split.as_ptr(),
        };
        let cfg = Cfg { grid: (blocks, lens.len() as u32, 1), block: (BLOCK, 1, 1) };
        let scalars = [hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay, bc1, bc2, hp.grad_scale];
        let launch = |r: &mut Report, name: &str, pd: *const u8| {
            let mut args = vec![arg(&pd)];
            args.extend(scalars.iter().map(arg));
            args.push(arg(&psumsq));
            args.push(arg(&max_norm));
            r.launch(name, cfg, &args);
        };
        match moments {
            StateDtype::F32 => {
                let descs: Vec<AdamTensor> = (0..lens.len())
                    .map(|i| AdamTensor {
                        master: master[i].as_mut_ptr(),
                        grad: grads[i].as_ptr(),
                        m: m[i].as_mut_ptr(),
                        v: v[i].as_mut_ptr(),
                        param: params[i].as_mut_ptr(),
                        len: lens[i] as u64,
                    })
                    .collect();
                launch(r, "adamw_multi", descs.as_ptr().cast());
            }
            StateDtype::Bf16 => {
                let descs: Vec<AdamTensorBf16> = (0..lens.len())
                    .map(|i| AdamTensorBf16 {
                        master: master[i].as_mut_ptr(),
                        grad: grads[i].as_ptr(),
                        m: m_bf[i].as_mut_ptr(),
                        v: v_bf[i].as_mut_ptr(),
                        param: params[i].as_mut_ptr(),
                        len: lens[i] as u64,
                    })
                    .collect();
                launch(r, "adamw_multi_bf16", descs.as_ptr().cast());
                m = m_bf.iter().map(|x| x.iter().map(|x| x.to_f32()).collect()).collect();
                v = v_bf.iter().map(|x| x.iter().map(|x| x.to_f32()).collect()).collect();
            }
        }
        // The CPU twin: clip_factor of the same split sum (None: no update at all).
        let factor = match clip {
            ClipCase::None => Some(1.0),
            _ => clip_factor(stats::join(&stats_split, 0), max_norm),
        };
        // bf16 moments: the twin (f64, rounded through f32) and the kernel (f32) may land on
        // either side of a bf16 rounding boundary.
        let tol_moments = if moments == StateDtype::Bf16 { TOL_BF16 } else { TOL_F32 };
        let name = if moments == StateDtype::Bf16 { "adamw_multi_bf16" } else { "adamw_multi" };
        let mut outs = Vec::new();
        for (i, w) in want.iter_mut().enumerate() {
            let [wm, wmo, wv, wp] = w;
            if let Some(f) = factor {
                cpu::adamw_tensor_clipped(wp, wm, &f64s_f32(&grads[i]), wmo, wv, moments, &hp, f);
            }
            outs.push(("master", rel_err(&f64s_f32(&master[i]), wm), TOL_F32));
            outs.push(("m", rel_err(&f64s_f32(&m[i]), wmo), tol_moments));
            outs.push(("v", rel_err(&f64s_f32(&v[i]), wv), tol_moments));
            if moments == StateDtype::Bf16 {
                // The stored moments are bf16 values, and v is never negative.
                let exact = m[i].iter().chain(&v[i]).all(|&x| bf16::from_f32(x).to_f32() == x);
                outs.push(("moments are bf16", if exact { 0.0 } else { f64::INFINITY }, 0.0));
                let finite = master[i].iter().all(|x| x.is_finite()) && v[i].iter().all(|&x| x >= 0.0);
                outs.push(("finite, v >= 0", if finite { 0.0 } else { f64::INFINITY }, 0.0));
            }
            if factor.is_some() {
                outs.push(("param", rel_err(&f64s_bf16(&params[i]), wp), TOL_BF16));
            } else {
                // Skipped: the params keep their (NaN) contents, untouched.
                let untouched = params[i].iter().all(|p| p.is_nan());
                outs.push(("param untouched", if untouched { 0.0 } else { f64::INFINITY }, 0.0));
            }
        }
        r.check(name, &case, &outs);
    }
}

/// gemm.rs GemmCall and run_gemm's fallback launch: column-major, cuBLAS conventions.
struct Gemm {
    transa: bool,
    transb: bool,
    m: usize,
    n: usize,
    k: usize,
    a: *const bf16,
    lda: i64,
    b: *const bf16,
    ldb: i64,
    ldc: i64,
    alpha: f32,
    beta: f32,
}

/// D = `c`, C = `c` itself (beta adds into the output).
fn run_gemm(r: &mut Report, name: &str, g: &Gemm, c: *mut std::ffi::c_void) {
    run_gemm_from(r, name, g, c, c);
}

/// D = `c`, C = `c_in` (x_wt_plus: the residual stream a projection is added to).
fn run_gemm_from(
    r: &mut Report,
    name: &str,
    g: &Gemm,
    c: *mut std::ffi::c_void,
    c_in: *const std::ffi::c_void,
) {
    let (m, n, k) = (g.m as i32, g.n as i32, g.k as i32);
    let (ta, tb) = (g.transa as i32, g.transb as i32);
    let cfg = Cfg { grid: ((g.m as u32).div_ceil(16), (g.n as u32).div_ceil(16), 1), block: (16, 16, 1) };
    r.launch(
        name,
        cfg,
        &[
            arg(&c),
            arg(&c_in),
            arg(&g.a),
            arg(&g.b),
            arg(&ta),
            arg(&tb),
            arg(&m),
            arg(&n),
            arg(&k),
            arg(&g.lda),
            arg(&g.ldb),
            arg(&g.ldc),
            arg(&g.alpha),
            arg(&g.beta),
        ],
    );
}

/// The four GEMM forms of gemm.rs (x_wt, x_wt_plus, dy_w, dyt_x) through the fallback kernels,
/// against the CPU's matmul_forward, matmul_forward_residual and matmul_backward.
pub fn gemm(r: &mut Report, rng: &mut Rng) {
    for (rows, inner, cols) in [(1usize, 1usize, 1usize), (5, 33, 17), (19, 40, 3)] {
        let case = format!("rows {rows} in {inner} out {cols}");
        let (x, xf) = rng.bf16s(rows * inner, 1.0);
        let (w, wf) = rng.bf16s(cols * inner, 1.0);
        let (dy, dyf) = rng.bf16s(rows * cols, 1.0);
        // x_wt, fp32 out: out[rows, cols] = x @ w^T.
        let mut out = vec![f32::NAN; rows * cols];
        let x_wt = Gemm {
            transa: true,
            transb: false,
            m: cols,
            n: rows,
            k: inner,
            a: w.as_ptr(),
            lda: inner as i64,
            b: x.as_ptr(),
            ldb: inner as i64,
            ldc: cols as i64,
            alpha: 1.0,
            beta: 0.0,
        };
        run_gemm(r, "matmul_fallback_f32out", &x_wt, out.as_mut_ptr().cast());
        let mut want = vec![0.0; rows * cols];
        cpu::matmul_forward(&mut want, &xf, &wf, rows, inner, cols);
        let e_fwd = rel_err(&f64s_f32(&out), &want);
        // dyt_x, fp32 out, beta 1: dw[cols, inner] += dy^T @ x.
        let mut dw = rng.f32s(cols * inner, 1.0);
        let mut want_dw = f64s_f32(&dw);
        let mut want_dx = vec![0.0; rows * inner];
        cpu::matmul_backward(
            Some(&mut want_dx),
            &mut want_dw,
            &dyf,
            &xf,
            &wf,
            rows,
            inner,
            cols,
            GradMode::Accumulate,
        );
        // The first micro-batch's form: beta 0 (GradMode::Overwrite), C's NaNs never read.
        let mut want_dw0 = vec![f64::NAN; cols * inner];
        cpu::matmul_backward(None, &mut want_dw0, &dyf, &xf, &wf, rows, inner, cols, GradMode::Overwrite);
        let g = Gemm {
            transa: false,
            transb: true,
            m: inner,
            n: cols,
            k: rows,
            a: x.as_ptr(),
            lda: inner as i64,
            b: dy.as_ptr(),
            ldb: cols as i64,
            ldc: inner as i64,
            alpha: 1.0,
            beta: 1.0,
        };
        run_gemm(r, "matmul_fallback_f32out", &g, dw.as_mut_ptr().cast());
        let mut dw0 = vec![f32::NAN; cols * inner];
        run_gemm(r, "matmul_fallback_f32out", &Gemm { beta: 0.0, ..g }, dw0.as_mut_ptr().cast());
        r.check(
            "matmul_fallback_f32out",
            &case,
            &[
                ("x_wt", e_fwd, TOL_F32),
                ("dyt_x", rel_err(&f64s_f32(&dw), &want_dw), TOL_F32),
                ("dyt_x beta 0", rel_err(&f64s_f32(&dw0), &want_dw0), TOL_F32),
            ],
        );
        // dy_w, bf16 out: dx[rows, inner] = dy @ w.
        let mut dx = nan_bf16(rows * inner);
        let g = Gemm {
            transa: false,
            transb: false,
            m: inner,
            n: rows,
            k: cols,
            a: w.as_ptr(),
            lda: inner as i64,
            b: dy.as_ptr(),
            ldb: cols as i64,
            ldc: inner as i64,
            alpha: 1.0,
            beta: 0.0,
        };
        run_gemm(r, "matmul_fallback_bf16out", &g, dx.as_mut_ptr().cast());
        // x_wt_plus, bf16 out: h[rows, cols] = resid + x @ w^T, C another buffer, only read.
        let (resid, residf) = rng.bf16s(rows * cols, 1.0);
        let resid_before = resid.clone();
        let mut h = nan_bf16(rows * cols);
        let mut want_h = vec![f64::NAN; rows * cols];
        cpu::matmul_forward_residual(&mut want_h, &residf, &xf, &wf, rows, inner, cols);
        let g = Gemm { beta: 1.0, ..x_wt };
        run_gemm_from(r, "matmul_fallback_bf16out", &g, h.as_mut_ptr().cast(), resid.as_ptr().cast());
        let resid_kept = if resid == resid_before { 0.0 } else { f64::INFINITY };
        r.check(
            "matmul_fallback_bf16out",
            &case,
            &[
                ("dy_w", rel_err(&f64s_bf16(&dx), &want_dx), TOL_BF16),
                ("x_wt_plus", rel_err(&f64s_bf16(&h), &want_h), TOL_BF16),
                ("x_wt_plus leaves C", resid_kept, EXACT),
            ],
        );
    }
}

/// cross_entropy.rs lm_head_cross_entropy: gather the supervised rows, fp32 logits (cuBLASLt there,
/// an f32 GEMM here), cross_entropy_rows, dx = dlogits @ w (cuBLASLt there), scatter_rows;
/// against the CPU's lm_head_cross_entropy (loss and dx).
pub fn cross_entropy(r: &mut Report, rng: &mut Rng) {
    let ignore = u32::MAX;
    // (rows, d, vocab, supervised rows, with gradients)
    let cases = [
        (1usize, 64usize, 8192usize, 1usize, true),
        (9, 48, 8192, 5, true),
        (7, 32, 8192, 4, false),
        (4, 32, 8192, 0, true),
        (3, 16, 128256, 2, true),
        // Rows not in 16-byte groups: d 20 and vocab 1001 take the one-element paths.
        (6, 20, 1001, 4, true),
        (5, 16, 1001, 3, true),
    ];
    for (n, d, vocab, n_sup, with_grads) in cases {
        let case = format!("n {n} d {d} vocab {vocab} supervised {n_sup} grads {with_grads}");
        let (x, xf) = rng.bf16s(n * d, 1.0);
        let (w, wf) = rng.bf16s(vocab * d, 0.5);
        let mut targets = vec![ignore; n];
        let mut order: Vec<usize> = (0..n).collect();
        for i in 0..n {
            order.swap(i, i + rng.below(n - i));
        }
        for &i in &order[..n_sup] {
            targets[i] = rng.below(vocab) as u32;
        }
        let loss_scale = 0.25f32;
        let mut t_dx = vec![f64::NAN; n * d];
        let mut t_dw = vec![0.0; vocab * d];
        let t_loss = cpu::lm_head_cross_entropy(
            &xf,
            &wf,
            &targets,
            ignore,
            n,
            d,
            vocab,
            with_grads.then(|| CeGrads { dx: &mut t_dx, dw: &mut t_dw, loss_scale }),
        );

        // The host side of cross_entropy.rs.
        let rows: Vec<u32> = (0..n as u32).filter(|&i| targets[i as usize] != ignore).collect();
        let sup_targets: Vec<u32> = rows.iter().map(|&i| targets[i as usize]).collect();
        let mut dx = vec![bf16::ZERO; n * d];
        let mut loss = 0.0f64;
        if rows.is_empty() {
            // No supervised row: no launch, a zero loss and dx (r.check still records the case).
            r.check("cross_entropy_rows", &case, &[("loss", (loss - t_loss).abs(), EXACT)]);
            continue;
        }
        let chunk = (CHUNK_LOGITS / vocab).clamp(1, rows.len());
        let (di, vi) = (d as i32, vocab as i32);
        let (rows_vec, row_vec) = (cross_entropy_vec_arg(d), cross_entropy_vec_arg(vocab));
        let (mut gather_bad, mut scatter_bad) = (0.0, 0.0);
        for c0 in (0..rows.len()).step_by(chunk) {
            let rc = chunk.min(rows.len() - c0);
            let ri = rc as i32;
            let idx = &rows[c0..c0 + rc];
            let mut xc = nan_bf16(rc * d);
            let (pxc, px, pidx) = (xc.as_mut_ptr(), x.as_ptr(), idx.as_ptr());
            r.launch(
                "cross_entropy_gather_rows",
                grid_stride(cross_entropy_copy_items(rc, d)),
                &[arg(&pxc), arg(&px), arg(&pidx), arg(&ri), arg(&di), arg(&rows_vec)],
            );
            let want_xc: Vec<bf16> =
                idx.iter().flat_map(|&i| x[i as usize * d..(i as usize + 1) * d].to_vec()).collect();
            gather_bad += mismatches(&xc, &want_xc);

            let xcf: Vec<f32> = xc.iter().map(|v| v.to_f32()).collect();
            let wf32: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            let mut logits = vec![0.0f32; rc * vocab];
            f32::gemm(rc, d, vocab, 1.0, &xcf, (d, 1), &wf32, (1, d), 0.0, &mut logits, (vocab, 1));

            let tgt = &sup_targets[c0..c0 + rc];
            let mut losses = vec![f32::NAN; rc];
            let mut dlogits = nan_bf16(if with_grads { rc * vocab } else { 0 });
            let pdl: *mut bf16 = if with_grads { dlogits.as_mut_ptr() } else { std::ptr::null_mut() };
            let (pl, plg, pt) = (losses.as_mut_ptr(), logits.as_ptr(), tgt.as_ptr());
            let scale = if with_grads { loss_scale } else { 0.0 };
            r.launch(
                "cross_entropy_rows",
                per_row(rc),
                &[arg(&pl), arg(&pdl), arg(&plg), arg(&pt), arg(&ri), arg(&vi), arg(&scale), arg(&row_vec)],
            );
            loss += losses.iter().map(|&l| l as f64).sum::<f64>();
            if with_grads {
                let dlf: Vec<f32> = dlogits.iter().map(|v| v.to_f32()).collect();
                let mut dxc32 = vec![0.0f32; rc * d];
                f32::gemm(rc, vocab, d, 1.0, &dlf, (vocab, 1), &wf32, (d, 1), 0.0, &mut dxc32, (d, 1));
                let dxc: Vec<bf16> = dxc32.iter().map(|&v| bf16::from_f32(v)).collect();
                let mut want_dx = dx.clone();
                for (k, &i) in idx.iter().enumerate() {
                    want_dx[i as usize * d..(i as usize + 1) * d].copy_from_slice(&dxc[k * d..(k + 1) * d]);
                }
                let (pdx, pdxc) = (dx.as_mut_ptr(), dxc.as_ptr());
                r.launch(
                    "cross_entropy_scatter_rows",
                    grid_stride(cross_entropy_copy_items(rc, d)),
                    &[arg(&pdx), arg(&pdxc), arg(&pidx), arg(&ri), arg(&di), arg(&rows_vec)],
                );
                scatter_bad += mismatches(&dx, &want_dx);
            }
        }
        r.check("cross_entropy_gather_rows", &case, &[("rows", gather_bad, EXACT)]);
        let mut outs = vec![("loss", rel_err(&[loss], &[t_loss]), TOL_F32)];
        if with_grads {
            r.check("cross_entropy_scatter_rows", &case, &[("rows", scatter_bad, EXACT)]);
            outs.push(("dx", rel_err(&f64s_bf16(&dx), &t_dx), TOL_BF16));
        }
        r.check("cross_entropy_rows", &case, &outs);
    }
}
