//! `sft bench-kernels`: the fused lm_head + masked cross-entropy and the multi-tensor AdamW,
//! timed through the [`Backend`] trait, next to a device-to-device copy of the same backend (the
//! bandwidth ceiling DESIGN §4 judges AdamW against: within 85% of it) and a square bf16 GEMM
//! through the backend's own GEMM path (the compute ceiling the training step's GEMMs, timed
//! per shape by `sft bench --kernel-times`, are judged against).
//!
//! `scripts/bench_kernels_torch.py` runs this binary with `--json` and PyTorch on the same
//! shapes (`F.cross_entropy` on `x @ w.T`, fused AdamW, `copy_`), and prints one table.
//!
//! Conventions shared with that script:
//! - Cross-entropy: `tokens` rows of width `d_model`, `supervised` of them (row `i` is
//!   supervised when `floor((i+1)·f) > floor(i·f)`, so exactly `floor(tokens·f)`, spread
//!   evenly), forward and backward (loss, dx, dw). FLOPs count the useful work only:
//!   `6·supervised·d·vocab` (logits, dx, dw of the supervised rows), whatever an
//!   implementation computes for the others.
//! - AdamW: one step over the parameter tensors of `--adamw-config` (the 1.3B's 147 tensors by
//!   default), with f32 moments, then with bf16 moments (`--optimizer-state bf16`). Bytes count
//!   each element's reads (gradient and master fp32, m and v in their storage) and writes
//!   (master, m, v, and the compute-precision parameter copy).
//! - Copy: one fp32 buffer copied to another; bytes = read + write.
//! - GEMM: `out = a · bᵀ` with a, b and out `gemm × gemm` in the compute precision (the
//!   backend's `matmul_forward`: cuBLASLt, autotuned, on CUDA); FLOPs `2·gemm³`.
//!
//! Each measurement synchronizes the device around every call and takes the median of
//! `--repeats` calls after `--warmup` untimed ones.

use super::{upload, upload_ids};
use crate::backend::cpu::round_bf16;
use crate::backend::{AdamW, Backend, Device, GradMode, LossGrads, Precision, StateDtype};
use crate::model::params::param_lens;
use crate::rng::Rng;
use crate::train::trainer::resolve_model_config;
use anyhow::{bail, ensure, Result};
use clap::Args;
use serde::Serialize;
use std::time::Instant;

#[derive(Args, Debug, Clone)]
pub struct KernelBenchArgs {
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// `full` (the 1.3B's shapes) or `tiny`; default: full on CUDA, tiny on the CPU. The options
    /// below override single sizes.
    #[arg(long)]
    pub sizes: Option<String>,
    /// Cross-entropy rows: the tokens of one micro-batch (full: 8 × 2048; tiny: 128).
    #[arg(long)]
    pub tokens: Option<usize>,
    /// Cross-entropy row width (full: 2048; tiny: 64).
    #[arg(long)]
    pub d_model: Option<usize>,
    /// Vocabulary sizes, each timed (full: 8192,128256; tiny: 512).
    #[arg(long, value_delimiter = ',')]
    pub vocabs: Option<Vec<usize>>,
    /// Share of the rows that are supervised; the others carry the ignore id.
    #[arg(long, default_value_t = 0.5)]
    pub supervised: f64,
    /// The model whose parameter tensors AdamW steps over: a preset or a model-config JSON
    /// file (full: simplellama-1.3b; tiny: tiny).
    #[arg(long)]
    pub adamw_config: Option<String>,
    /// MiB of fp32 copied device to device (full: 1024; tiny: 4).
    #[arg(long)]
    pub copy_mib: Option<usize>,
    /// Side of the square GEMM (full: 8192; tiny: 64).
    #[arg(long)]
    pub gemm: Option<usize>,
    /// Untimed calls before the timed ones.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Timed calls; the median is reported.
    #[arg(long, default_value_t = 10)]
    pub repeats: usize,
    /// Seeds the random inputs.
    #[arg(long, default_value_t = 89)]
    pub seed: u64,
    /// Print the measurements as JSON instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// The shapes one run measures.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KernelShapes {
    pub tokens: usize,
    pub d_model: usize,
    pub vocabs: Vec<usize>,
    pub supervised_fraction: f64,
    pub supervised_rows: usize,
    pub adamw_config: String,
    pub adamw_tensor_lens: Vec<usize>,
    pub copy_elems: usize,
    pub gemm: usize,
}

impl KernelShapes {
    /// The sizes for `args` on a backend: `full` on a device, `tiny` on the CPU unless `--sizes`
    /// says otherwise.
    pub fn resolve(args: &KernelBenchArgs, on_cpu: bool) -> Result<KernelShapes> {
        let full = match args.sizes.as_deref() {
            None => !on_cpu,
            Some("full") => true,
            Some("tiny") => false,
            Some(other) => bail!("--sizes {other}: expected full or tiny"),
        };
        ensure!(
            args.supervised > 0.0 && args.supervised <= 1.0,
            "--supervised {} must be in (0, 1]",
            args.supervised
        );
        let tokens = args.tokens.unwrap_or(if full { 8 * 2048 } else { 128 });
        let d_model = args.d_model.unwrap_or(if full { 2048 } else { 64 });
        let vocabs = args.vocabs.clone().unwrap_or(if full { vec![8192, 128256] } else { vec![512] });
        ensure!(tokens > 0 && d_model > 0, "--tokens and --d-model must be at least 1");
        ensure!(vocabs.iter().all(|&v| v >= 2), "every --vocabs entry must be at least 2");
        let adamw_config =
            args.adamw_config.clone().unwrap_or(if full { "simplellama-1.3b" } else { "tiny" }.into());
        let model = resolve_model_config(&adamw_config, 8192)?;
        let adamw_tensor_lens = param_lens(&model);
        let copy_mib = args.copy_mib.unwrap_or(if full { 1024 } else { 4 });
        ensure!(copy_mib > 0, "--copy-mib must be at least 1");
        let gemm = args.gemm.unwrap_or(if full { 8192 } else { 64 });
        ensure!(gemm > 0, "--gemm must be at least 1");
        let supervised_rows = (0..tokens).filter(|&i| is_supervised(i, args.supervised)).count();
        ensure!(supervised_rows > 0, "--supervised {} leaves no supervised row of {tokens}", args.supervised);
        Ok(KernelShapes {
            tokens,
            d_model,
            vocabs,
            supervised_fraction: args.supervised,
            supervised_rows,
            adamw_config,
            adamw_tensor_lens,
            copy_elems: copy_mib << 18,
            gemm,
        })
    }
}

/// Whether cross-entropy row `i` is supervised at share `f`: exactly `floor(n·f)` of `n` rows,
/// evenly spread (scripts/bench_kernels_torch.py uses the same rule).
pub fn is_supervised(i: usize, f: f64) -> bool {
    ((i + 1) as f64 * f).floor() > (i as f64 * f).floor()
}

/// One measured kernel.
#[derive(Clone, Debug, Serialize)]
pub struct KernelTiming {
    pub implementation: String,
    pub kernel: String,
    pub shape: String,
    /// Median seconds per call.
    pub seconds: f64,
    pub min_seconds: f64,
    /// Useful FLOPs per call (cross-entropy), else 0.
    pub flops: f64,
    /// Bytes moved per call (AdamW, copy), else 0.
    pub bytes: f64,
}

impl KernelTiming {
    pub fn tflops(&self) -> f64 {
        self.flops / self.seconds / 1e12
    }
    pub fn gbps(&self) -> f64 {
        self.bytes / self.seconds / 1e9
    }
}

/// What `sft bench-kernels --json` prints.
#[derive(Clone, Debug, Serialize)]
pub struct KernelReport {
    pub device: String,
    pub shapes: KernelShapes,
    pub warmup: usize,
    pub repeats: usize,
    pub timings: Vec<KernelTiming>,
}

/// Median and minimum seconds of `repeats` calls of `op`, each between two synchronizations,
/// after `warmup` untimed calls.
fn time_calls<B: Backend>(
    backend: &B,
    warmup: usize,
    repeats: usize,
    mut op: impl FnMut() -> Result<()>,
) -> Result<(f64, f64)> {
    for _ in 0..warmup {
        op()?;
    }
    backend.synchronize()?;
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        op()?;
        backend.synchronize()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok((median(&times), times[0]))
}

/// The median of sorted values (the mean of the middle two for an even count).
pub fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        0.5 * (sorted[n / 2 - 1] + sorted[n / 2])
    }
}

/// Values that are neither zero nor constant (zeros can time faster than real data), cheap to
/// make for a gigabyte: uniform in [-scale, scale).
fn pattern(len: usize, seed: u64, scale: f32) -> Vec<f32> {
    (0..len as u64).map(|i| (2.0 * crate::rng::uniform(seed, i) - 1.0) * scale).collect()
}

/// Runs every measurement on `backend`.
pub fn run_kernel_bench<B: Backend>(backend: B, args: &KernelBenchArgs) -> Result<KernelReport> {
    let device = backend.name();
    let shapes = KernelShapes::resolve(args, device.starts_with("cpu"))?;
    let be = &backend;
    let implementation = format!("sft ({})", device.split_whitespace().next().unwrap_or("?"));
    let mut timings = Vec::new();
    let time = |op: &mut dyn FnMut() -> Result<()>| time_calls(be, args.warmup, args.repeats, op);

    // ---- lm_head + masked cross-entropy, forward and backward ----
    let (n, d, s) = (shapes.tokens, shapes.d_model, shapes.supervised_rows);
    let x = upload(be, &pattern(n * d, args.seed, 1.0), Precision::Compute)?;
    let mut rng = Rng::new(args.seed);
    for &vocab in &shapes.vocabs {
        let w = upload(be, &pattern(vocab * d, args.seed ^ vocab as u64, 0.02), Precision::Compute)?;
        let targets: Vec<u32> = (0..n)
            .map(|i| {
                if is_supervised(i, shapes.supervised_fraction) {
                    1 + rng.below(vocab - 1) as u32
                } else {
                    0
                }
            })
            .collect();
        let (rows, sup_targets) = crate::backend::supervised_rows(&targets, 0, vocab)?;
        let (rows_d, t) = (upload_ids(be, &rows)?, upload_ids(be, &sup_targets)?);
        let n_sup = rows.len();
        let mut losses = be.zeros(n_sup, Precision::F32)?;
        let mut dx = be.zeros(n * d, Precision::Compute)?;
        let mut dw = be.zeros(vocab * d, Precision::F32)?;
        let loss_scale = 1.0 / s as f32;
        let (seconds, min_seconds) = time(&mut || {
            let grads = LossGrads { dx: &mut dx, dw: &mut dw, loss_scale, mode: GradMode::Accumulate };
            be.lm_head_cross_entropy(&x, &w, &rows_d, &t, n_sup, n, d, vocab, &mut losses, Some(grads))
        })?;
        let mut stats = be.zeros(crate::backend::STATS_LEN, Precision::F32)?;
        be.sum_into(&mut stats, crate::backend::stats::MICRO_LOSS, &losses, n_sup, GradMode::Overwrite)?;
        let loss = crate::backend::stats::join(
            &be.read(&stats, crate::backend::STATS_LEN)?,
            crate::backend::stats::MICRO_LOSS,
        );
        // Random logits near zero: the mean loss is about ln(vocab); anything else means the
        // kernel did not compute what it was timed on.
        let mean = loss / s as f64;
        ensure!(
            mean.is_finite() && (mean - (vocab as f64).ln()).abs() < 0.5,
            "lm_head_cross_entropy at vocab {vocab}: mean loss {mean}, expected about ln(vocab) = {:.3}",
            (vocab as f64).ln()
        );
        timings.push(KernelTiming {
            implementation: implementation.clone(),
            kernel: "lm_head+CE fwd+bwd".into(),
            shape: format!("{n}x{d} V{vocab} sup {s}"),
            seconds,
            min_seconds,
            flops: 6.0 * (s * d * vocab) as f64,
            bytes: 0.0,
        });
    }
    drop(x);

    // ---- multi-tensor AdamW over the model's parameter tensors, f32 then bf16 moments ----
    let lens = &shapes.adamw_tensor_lens;
    let largest = lens.iter().copied().max().unwrap_or(0);
    let values = pattern(largest, args.seed ^ 0xADA, 0.02);
    for moments in [StateDtype::F32, StateDtype::Bf16] {
        let mut params = Vec::with_capacity(lens.len());
        let mut master = Vec::with_capacity(lens.len());
        let mut grads = Vec::with_capacity(lens.len());
        let (mut m, mut v) = (Vec::with_capacity(lens.len()), Vec::with_capacity(lens.len()));
        for &len in lens {
            params.push(be.zeros(len, Precision::Compute)?);
            master.push(upload(be, &values[..len], Precision::F32)?);
            grads.push(upload(be, &values[largest - len..], Precision::F32)?);
            // Zero moments become non-zero in the first warm-up step.
            m.push(be.zeros(len, moments.precision())?);
            v.push(be.zeros(len, moments.precision())?);
        }
        let n_params: usize = lens.iter().sum();
        let mut step = 0u64;
        let (seconds, min_seconds) = time(&mut || {
            step += 1;
            let hp = AdamW {
                lr: 1e-5,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
                step,
                grad_scale: 0.5,
            };
            let mut p: Vec<&mut B::Buf> = params.iter_mut().collect();
            let mut ms: Vec<&mut B::Buf> = master.iter_mut().collect();
            let g: Vec<&B::Buf> = grads.iter().collect();
            let mut mm: Vec<&mut B::Buf> = m.iter_mut().collect();
            let mut vv: Vec<&mut B::Buf> = v.iter_mut().collect();
            be.adamw(&mut p, &mut ms, &g, &mut mm, &mut vv, moments, lens, &hp, None)
        })?;
        // Per element: the gradient read, master and both moments read and written, the
        // compute-precision weight written. A backend that keeps bf16 moments in f32 (the CPU's)
        // moves f32 moments.
        let moment_bytes = crate::model::forward::moment_bytes(be.compute_bytes(), moments) as f64;
        timings.push(KernelTiming {
            implementation: implementation.clone(),
            kernel: if moments == StateDtype::F32 { "adamw".into() } else { "adamw bf16 moments".into() },
            shape: format!("{n_params} params, {} tensors", lens.len()),
            seconds,
            min_seconds,
            flops: 0.0,
            bytes: n_params as f64 * (3.0 * 4.0 + 4.0 * moment_bytes + be.compute_bytes() as f64),
        });
    }

    // ---- device-to-device copy: the bandwidth ceiling ----
    let len = shapes.copy_elems;
    let src = upload(be, &pattern(len, args.seed ^ 0xC0B1, 1.0), Precision::F32)?;
    let mut dst = be.zeros(len, Precision::F32)?;
    let (seconds, min_seconds) = time(&mut || be.copy(&mut dst, &src, len))?;
    ensure!(
        be.read(&dst, 4)? == be.read(&src, 4)?,
        "copy: the destination does not hold the source after the timed copies"
    );
    timings.push(KernelTiming {
        implementation: implementation.clone(),
        kernel: "copy".into(),
        shape: format!("{} MiB f32", len >> 18),
        seconds,
        min_seconds,
        flops: 0.0,
        bytes: 2.0 * 4.0 * len as f64,
    });
    drop((src, dst));

    // ---- a square GEMM: the compute ceiling ----
    let g = shapes.gemm;
    let (a_host, b_host) = (pattern(g * g, args.seed ^ 0x6E11, 1.0), pattern(g * g, args.seed ^ 0x6E12, 1.0));
    let a = upload(be, &a_host, Precision::Compute)?;
    let b = upload(be, &b_host, Precision::Compute)?;
    let mut c = be.zeros(g * g, Precision::Compute)?;
    let (seconds, min_seconds) = time(&mut || be.matmul_forward(&mut c, &a, &b, g, g, g))?;
    // The first row against the host (inputs rounded as the device holds them): a wrong
    // layout or an unfinished product would not be within a few bf16 steps of it.
    let round = |x: f32| if be.compute_bytes() == 2 { round_bf16(x) } else { x };
    let row = be.read(&c, g)?;
    for (j, &got) in row.iter().enumerate().step_by(g.div_ceil(16)) {
        let want: f64 = (0..g).map(|k| round(a_host[k]) as f64 * round(b_host[j * g + k]) as f64).sum();
        let tol = 0.02 * (g as f64).sqrt() + 0.01 * want.abs();
        ensure!(
            (got as f64 - want).abs() <= tol,
            "matmul {g}x{g}x{g}: out[0][{j}] = {got}, expected {want:.4} (after the timed calls)"
        );
    }
    timings.push(KernelTiming {
        implementation,
        kernel: "matmul".into(),
        shape: format!("{g}x{g}x{g}"),
        seconds,
        min_seconds,
        flops: 2.0 * (g as f64).powi(3),
        bytes: 0.0,
    });
    Ok(KernelReport { device, shapes, warmup: args.warmup, repeats: args.repeats, timings })
}

/// The header of the shared table (scripts/bench_kernels_torch.py prints the same columns).
pub fn table_header() -> String {
    format!("{:<22} {:<20} {:<34} {:>10} {:>14} {:>8}", "impl", "kernel", "shape", "ms", "rate", "vs copy")
}

/// One row: TFLOP/s where FLOPs are counted, else GB/s and the share of `copy_gbps`.
pub fn table_row(t: &KernelTiming, copy_gbps: Option<f64>) -> String {
    let (rate, share) = if t.flops > 0.0 {
        let tf = t.tflops();
        let rate = if tf >= 1.0 { format!("{tf:.1} TF/s") } else { format!("{:.1} GF/s", tf * 1e3) };
        (rate, "-".to_string())
    } else {
        let share = copy_gbps.filter(|c| *c > 0.0).map(|c| format!("{:.0}%", 100.0 * t.gbps() / c));
        (format!("{:.0} GB/s", t.gbps()), share.unwrap_or_else(|| "-".into()))
    };
    format!(
        "{:<22} {:<20} {:<34} {:>10.3} {:>14} {:>8}",
        t.implementation,
        t.kernel,
        t.shape,
        t.seconds * 1e3,
        rate,
        share
    )
}

/// `sft bench-kernels`: runs and prints the table (or JSON).
pub fn bench_kernels(args: KernelBenchArgs) -> Result<()> {
    let report =
        crate::with_backend!(Device::parse(&args.device)?, |backend| run_kernel_bench(backend, &args)?);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let copy = report.timings.iter().find(|t| t.kernel == "copy").map(KernelTiming::gbps);
    println!("device {}", report.device);
    println!("{}", table_header());
    for t in &report.timings {
        println!("{}", table_row(t, copy));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    fn tiny_args() -> KernelBenchArgs {
        KernelBenchArgs {
            device: "cpu".into(),
            sizes: None,
            tokens: Some(40),
            d_model: Some(32),
            vocabs: Some(vec![96]),
            supervised: 0.5,
            adamw_config: None,
            copy_mib: Some(1),
            gemm: Some(48),
            warmup: 1,
            repeats: 3,
            seed: 5,
            json: false,
        }
    }

    #[test]
    fn supervised_rows_are_exactly_the_share_spread_evenly() {
        let rows: Vec<usize> = (0..10).filter(|&i| is_supervised(i, 0.5)).collect();
        assert_eq!(rows, vec![1, 3, 5, 7, 9]);
        assert_eq!(
            (0..16384).filter(|&i| is_supervised(i, 0.3)).count(),
            (16384.0 * 0.3f64).floor() as usize
        );
        assert!((0..7).all(|i| is_supervised(i, 1.0)));
    }

    #[test]
    fn full_sizes_are_the_1_3b_shapes() {
        let args = KernelBenchArgs {
            tokens: None,
            d_model: None,
            vocabs: None,
            copy_mib: None,
            gemm: None,
            ..tiny_args()
        };
        let full =
            KernelShapes::resolve(&KernelBenchArgs { sizes: Some("full".into()), ..args.clone() }, true)
                .unwrap();
        assert_eq!((full.tokens, full.d_model, full.vocabs.clone()), (16384, 2048, vec![8192, 128256]));
        let config = crate::model::ModelConfig::simplellama_1_3b();
        assert_eq!(full.adamw_tensor_lens.len(), 6 * config.n_layers + 3);
        assert_eq!(full.adamw_tensor_lens.iter().sum::<usize>(), config.n_params());
        assert_eq!(full.copy_elems * 4, 1 << 30);
        assert_eq!(full.gemm, 8192);
        // On the CPU without --sizes: tiny.
        let tiny = KernelShapes::resolve(&args, true).unwrap();
        assert_eq!((tiny.tokens, tiny.d_model, tiny.gemm), (128, 64, 64));
        let err = KernelShapes::resolve(&KernelBenchArgs { sizes: Some("huge".into()), ..args }, true);
        assert!(err.unwrap_err().to_string().contains("--sizes huge"));
    }

    #[test]
    fn cpu_run_measures_every_kernel() {
        let report = run_kernel_bench(CpuBackend::<f32>::new(), &tiny_args()).unwrap();
        let kernels: Vec<&str> = report.timings.iter().map(|t| t.kernel.as_str()).collect();
        assert_eq!(kernels, ["lm_head+CE fwd+bwd", "adamw", "adamw bf16 moments", "copy", "matmul"]);
        assert_eq!(report.timings[4].flops, 2.0 * 48f64.powi(3));
        assert!(table_row(&report.timings[4], None).contains("48x48x48"));
        assert_eq!(report.shapes.supervised_rows, 20);
        let ce = &report.timings[0];
        assert_eq!(ce.flops, 6.0 * (20 * 32 * 96) as f64);
        assert!(report.timings.iter().all(|t| t.seconds > 0.0 && t.min_seconds <= t.seconds));
        // f32 everywhere on the CPU: 8 fp32 streams per AdamW element, 2 per copied element.
        let n: usize = report.shapes.adamw_tensor_lens.iter().sum();
        assert_eq!(report.timings[1].bytes, 32.0 * n as f64);
        // The CPU keeps bf16 moments in f32: the same traffic.
        assert_eq!(report.timings[2].bytes, 32.0 * n as f64);
        assert_eq!(report.timings[3].bytes, 8.0 * (1 << 18) as f64);
        let copy = report.timings[3].gbps();
        let row = table_row(&report.timings[1], Some(copy));
        assert!(row.ends_with('%'), "{row}");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["timings"][0]["kernel"], "lm_head+CE fwd+bwd");
        assert_eq!(json["shapes"]["adamw_tensor_lens"].as_array().unwrap().len(), 6 * 2 + 3);
    }

    #[test]
    fn median_of_even_and_odd_counts() {
        assert_eq!(median(&[1.0, 2.0, 9.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 4.0, 9.0]), 3.0);
    }
}
