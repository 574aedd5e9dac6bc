//! `sft bench`: the training step's speed — tokens/s, MFU and device memory.
//!
//! By default on synthetic batches: every row is full (no padding) and every target supervised,
//! so the numbers measure the engine rather than the data. With `--data DIR` on real prepared
//! batches (padded or packed, `--batch-mode`), where the report puts the useful tokens/s (non-pad
//! inputs, and supervised targets) next to the tokens/s of all positions, so that padding waste
//! shows. MFU counts, per token, 6 FLOPs per matmul parameter (forward and
//! backward of every linear layer and the lm_head; embeddings and norms excluded) plus causal
//! attention's 6·L·d·T, against the H100 SXM dense bf16 peak.

use crate::backend::{Backend, Device};
use crate::data::{
    Batch, BatchMode, ChatTokenizer, Dataset, Loader, LoaderConfig, NoSupervisedTokens, Split,
};
use crate::model::{Model, ModelConfig};
use crate::rng::Rng;
use crate::train::trainer::{optimizer_step, resolve_model_config};
use crate::train::{Schedule, TrainConfig};
use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// H100 SXM dense bf16 tensor-core peak, FLOP/s.
pub const H100_BF16_PEAK: f64 = 989.4e12;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// A preset (`simplellama-1.3b`, `tiny`), a model-config JSON file, or a model directory or
    /// its config.json (sft's or a Hugging Face Llama's: its shape, with random weights).
    #[arg(long = "config", default_value = "simplellama-1.3b")]
    pub model: String,
    /// Tokens per optimizer step (micro-batch rows × seq_len × accumulation).
    #[arg(long, default_value_t = 65536)]
    pub tokens_per_step: usize,
    /// Row length; default: the model's max_seq_len.
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Rows per micro-batch.
    #[arg(long, default_value_t = 8)]
    pub micro_batch: usize,
    /// Timed optimizer steps (after `--warmup` untimed ones).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed steps before the timed ones.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Seeds the weights and the synthetic batches.
    #[arg(long, default_value_t = 89)]
    pub seed: u64,
    /// Overrides the model's dropout (0.1 in simplellama-1.3b); 0 matches transformers' Llama,
    /// which has no residual dropout (scripts/bench_torch_train.py passes 0).
    #[arg(long)]
    pub dropout: Option<f32>,
    /// Time LoRA steps: adapters on the frozen base.
    #[command(flatten)]
    pub lora: crate::lora::LoraArgs,
    /// Storage of the AdamW moments, as `sft train --optimizer-state`: f32 or bf16.
    #[arg(long, value_name = "f32|bf16", default_value = "f32")]
    pub optimizer_state: crate::backend::StateDtype,
    /// Activation recompute: none, mlp or layer (see `sft train --recompute`).
    #[arg(long, value_name = "MODE", default_value = "none")]
    pub recompute: crate::model::Recompute,
    /// A directory prepared by `sft prepare`: time steps on its (shuffled) train batches instead
    /// of synthetic ones, and report useful (non-pad, supervised) tokens/s.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// How `--data` is batched: `packed` rows of `--seq-len` tokens (as `sft train` by default),
    /// or `dynamic` / `fixed` padding of `--micro-batch` examples (rows).
    #[arg(long, value_enum, default_value_t = BatchMode::Packed)]
    pub batch_mode: BatchMode,
    /// After the timed steps, `--steps` more with every kernel timed by CUDA events, written to
    /// this CSV in the layout of nsys's kernel summary (for `sft plan --calibrate-from FILE
    /// --profiled-steps N`). CUDA only.
    #[arg(long, value_name = "CSV")]
    pub kernel_times: Option<PathBuf>,
}

/// What `sft bench` measured.
#[derive(Clone, Debug)]
pub struct BenchReport {
    pub device: String,
    pub n_params: usize,
    pub seq_len: usize,
    pub micro_batch: usize,
    pub grad_accum: usize,
    pub tokens_per_step: usize,
    pub seconds_per_step: f64,
    pub tokens_per_s: f64,
    pub flops_per_token: f64,
    /// Model FLOP utilization against [`H100_BF16_PEAK`].
    pub mfu: f64,
    /// Device memory in use after the timed steps (`total - free`; the engine allocates nothing
    /// inside a step, so this is its peak), where the backend has a device.
    pub memory_used: Option<usize>,
    pub memory_total: Option<usize>,
    pub final_loss: f64,
    /// With `--data`: what the timed steps held.
    pub data: Option<DataTokens>,
}

/// The positions of the timed steps on real data, and how many of them were useful.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DataTokens {
    pub batch_mode: BatchMode,
    /// All positions (rows × row length), padding included.
    pub positions: u64,
    /// Positions holding a real (non-pad) input token.
    pub real: u64,
    /// Supervised targets.
    pub supervised: u64,
    /// Micro-batches without a supervised target, skipped as training skips them.
    pub skipped: u64,
    /// Per second of the timed steps.
    pub real_per_s: f64,
    pub supervised_per_s: f64,
}

/// `steps × grad_accum` micro-batches of the data's train split, in training's order.
fn data_batches(
    dir: &std::path::Path,
    mode: BatchMode,
    rows: usize,
    t: usize,
    seed: u64,
    count: usize,
    vocab: usize,
) -> Result<(Vec<Batch>, u64)> {
    let tok_path = dir.join("tokenizer.json");
    let tok = ChatTokenizer::from_file(&tok_path)
        .with_context(|| format!("--data {}: loading its tokenizer.json", dir.display()))?;
    ensure!(
        tok.vocab_size() <= vocab,
        "--data {}: its tokenizer has {} tokens but the model's vocabulary holds {vocab}",
        dir.display(),
        tok.vocab_size()
    );
    let ds = Arc::new(Dataset::open(dir, Split::Train).with_context(|| format!("--data {}", dir.display()))?);
    ds.ensure_tokenizer(&tok)?;
    let cfg = LoaderConfig { batch_size: rows, max_seq_len: t, mode, shuffle: true, seed };
    let mut loader = Loader::new(ds, cfg).with_context(|| format!("--data {}", dir.display()))?;
    let (mut out, mut skipped) = (Vec::with_capacity(count), 0u64);
    while out.len() < count {
        match loader.next_batch() {
            Ok(b) => out.push(b),
            Err(e) if e.downcast_ref::<NoSupervisedTokens>().is_some() => {
                skipped += 1;
                if skipped > 1000 + 10 * count as u64 {
                    bail!("--data {}: no micro-batch holds a supervised target", dir.display());
                }
            }
            Err(e) => return Err(e.context(format!("--data {}", dir.display()))),
        }
    }
    Ok((out, skipped))
}

/// Training FLOPs per token: 6 per matmul parameter plus causal attention at row length `t`.
pub fn flops_per_token(config: &ModelConfig, t: usize) -> f64 {
    let heads = config.heads();
    let (d, hidden) = (config.d_model, config.ffn_hidden);
    let per_layer = d * heads.qkv_width() + heads.q_width() * d + 3 * d * hidden;
    let matmul_params = config.n_layers * per_layer + config.vocab_size * d;
    6.0 * matmul_params as f64 + 6.0 * (config.n_layers * heads.q_width() * t) as f64
}

/// A full micro-batch of random tokens, every target supervised (ids 1.. so that none is pad 0);
/// `sft plan` counts a step of the same batches that this benchmark times.
pub fn synthetic_batch(rng: &mut Rng, rows: usize, t: usize, vocab: usize) -> Batch {
    let n = rows * t;
    let seq: Vec<u32> = (0..n + 1).map(|_| 1 + rng.below(vocab - 1) as u32).collect();
    Batch {
        rows,
        seq_len: t,
        inputs: seq[..n].to_vec(),
        targets: seq[1..].to_vec(),
        positions: (0..n).map(|i| (i % t) as u32).collect(),
        cu_seqlens: (0..=rows).map(|r| (r * t) as u32).collect(),
        pad_id: 0,
    }
}

/// Runs the benchmark on `backend`.
pub fn run_bench<B: Backend>(backend: B, args: &BenchArgs) -> Result<BenchReport> {
    // The tiny preset takes its vocabulary from the data's tokenizer where there is data.
    let vocab = match &args.data {
        Some(dir) => ChatTokenizer::from_file(&dir.join("tokenizer.json"))
            .with_context(|| format!("--data {}: loading its tokenizer.json", dir.display()))?
            .vocab_size(),
        None => 8192,
    };
    let mut config = resolve_model_config(&args.model, vocab)?;
    if let Some(p) = args.dropout {
        config.dropout = p;
        config.validate()?;
    }
    let t = args.seq_len.unwrap_or(config.max_seq_len);
    ensure!(t > 0 && t <= config.max_seq_len, "--seq-len {t} must be in 1..={}", config.max_seq_len);
    ensure!(args.micro_batch > 0 && args.steps > 0, "--micro-batch and --steps must be at least 1");
    let rows_per_step = args.tokens_per_step / t;
    ensure!(
        rows_per_step >= args.micro_batch && rows_per_step.is_multiple_of(args.micro_batch),
        "--tokens-per-step {} is {rows_per_step} rows of {t}: it must be a multiple of --micro-batch {} rows",
        args.tokens_per_step,
        args.micro_batch
    );
    let grad_accum = rows_per_step / args.micro_batch;
    let device = backend.name();
    let lora = args.lora.apply(None)?;
    let mut model = Model::for_micro_batches_with(
        backend,
        config.clone(),
        args.micro_batch,
        t,
        lora.as_ref(),
        args.recompute,
        args.optimizer_state,
    )?;
    model.init_params(args.seed)?;
    if let Some(l) = &lora {
        model.init_adapters(args.seed)?;
        eprintln!("{}", crate::lora::describe(l, &config));
    }
    ensure!(
        args.kernel_times.is_none() || model.backend().set_kernel_timing(false),
        "--kernel-times needs the CUDA backend (it times kernels with CUDA events)"
    );
    let mut rng = Rng::new(args.seed);
    let n_steps = args.warmup + args.steps;
    // Synthetic: the same full micro-batches every step. Real data: each step its own, as in
    // training.
    let (batches, skipped): (Vec<Batch>, u64) = match &args.data {
        None => (
            (0..grad_accum)
                .map(|_| synthetic_batch(&mut rng, args.micro_batch, t, config.vocab_size))
                .collect(),
            0,
        ),
        Some(dir) => data_batches(
            dir,
            args.batch_mode,
            args.micro_batch,
            t,
            args.seed,
            n_steps * grad_accum,
            config.vocab_size,
        )?,
    };
    let step_batches = |step: usize| -> &[Batch] {
        match args.data {
            None => &batches,
            Some(_) => &batches[step * grad_accum..(step + 1) * grad_accum],
        }
    };
    let schedule = Schedule {
        max_lr: 1e-5,
        min_lr: 1e-6,
        warmup_steps: 1,
        total_steps: (args.warmup + args.steps) as u64,
    };
    let tokens_per_step = grad_accum * args.micro_batch * t;

    // SimpleLLaMA's optimizer settings; the model's dropout applies unless --dropout says otherwise.
    let cfg = TrainConfig::default();
    let stream = Rng::new(args.seed);
    let mut final_loss = f64::NAN;
    let mut timed = 0.0;
    let mut counted = DataTokens { batch_mode: args.batch_mode, skipped, ..DataTokens::default() };
    for step in 0..n_steps {
        let micro = step_batches(step);
        if step >= args.warmup {
            for b in micro {
                counted.positions += b.n_tokens() as u64;
                counted.real += b.inputs.iter().filter(|&&id| id != b.pad_id).count() as u64;
                counted.supervised += b.n_supervised() as u64;
            }
        }
        let start = Instant::now();
        let outcome =
            optimizer_step(&mut model, micro, step as u64, schedule.lr(step as u64), &cfg, &stream)?;
        final_loss = outcome.train_loss.unwrap_or(f64::NAN);
        model.backend().synchronize()?;
        if step >= args.warmup {
            timed += start.elapsed().as_secs_f64();
        }
    }
    if let Some(path) = &args.kernel_times {
        model.backend().set_kernel_timing(true);
        for step in n_steps..n_steps + args.steps {
            optimizer_step(&mut model, step_batches(step % n_steps), step as u64, 1e-6, &cfg, &stream)?;
        }
        model.backend().synchronize()?;
        model.backend().set_kernel_timing(false);
        let times = model.backend().take_kernel_times()?;
        write_kernel_times(path, &times)?;
        let total: f64 = times.iter().map(|k| k.ns).sum();
        eprintln!(
            "kernel times of {} steps ({:.1} ms of kernels per step) -> {}",
            args.steps,
            total * 1e-6 / args.steps as f64,
            path.display()
        );
        eprint!("{}", gemm_shapes_table(&times, args.steps));
    }
    let memory = model.backend().memory_info()?;
    let seconds_per_step = timed / args.steps as f64;
    // Padded batches of real data are rows × the batch's longest example: count what ran.
    let tokens_per_step =
        if args.data.is_some() { (counted.positions / args.steps as u64) as usize } else { tokens_per_step };
    let tokens_per_s = tokens_per_step as f64 / seconds_per_step;
    counted.real_per_s = counted.real as f64 / timed.max(1e-12);
    counted.supervised_per_s = counted.supervised as f64 / timed.max(1e-12);
    let flops = flops_per_token(&config, t);
    Ok(BenchReport {
        device,
        n_params: config.n_params(),
        seq_len: t,
        micro_batch: args.micro_batch,
        grad_accum,
        tokens_per_step,
        seconds_per_step,
        tokens_per_s,
        flops_per_token: flops,
        mfu: tokens_per_s * flops / H100_BF16_PEAK,
        memory_used: memory.map(|(free, total)| total - free),
        memory_total: memory.map(|(_, total)| total),
        final_loss,
        data: args.data.is_some().then_some(counted),
    })
}

/// Per-kernel times as nsys's `cuda_gpu_kern_sum` CSV (the columns `sft plan --calibrate-from`
/// reads), longest first, and a last column of TFLOP/s where the FLOPs are known (the GEMMs).
fn write_kernel_times(path: &std::path::Path, times: &[crate::backend::KernelTime]) -> Result<()> {
    std::fs::write(path, kernel_times_csv(times)).with_context(|| format!("writing {}", path.display()))
}

fn kernel_times_csv(times: &[crate::backend::KernelTime]) -> String {
    let mut rows: Vec<_> = times.iter().collect();
    rows.sort_by(|a, b| b.ns.total_cmp(&a.ns));
    let total: f64 = rows.iter().map(|k| k.ns).sum::<f64>().max(1.0);
    let mut csv =
        String::from("\"Time (%)\",\"Total Time (ns)\",\"Instances\",\"Avg (ns)\",\"Name\",\"TFLOP/s\"\n");
    for k in rows {
        let rate =
            if k.flops > 0.0 && k.ns > 0.0 { format!("{:.1}", k.flops / k.ns / 1e3) } else { String::new() };
        csv.push_str(&format!(
            "{:.1},{:.0},{},{:.0},\"{}\",{rate}\n",
            100.0 * k.ns / total,
            k.ns,
            k.launches,
            k.ns / k.launches.max(1) as f64,
            k.name
        ));
    }
    csv
}

/// The GEMMs of the timed steps by shape, slowest total first: launches and ms per step and the
/// rate each shape reached (empty where no launch had known FLOPs).
fn gemm_shapes_table(times: &[crate::backend::KernelTime], steps: usize) -> String {
    let mut gemms: Vec<_> = times.iter().filter(|k| k.flops > 0.0).collect();
    if gemms.is_empty() {
        return String::new();
    }
    gemms.sort_by(|a, b| b.ns.total_cmp(&a.ns));
    let per_step = |x: f64| x / steps.max(1) as f64;
    let mut out =
        format!("{:<48} {:>9} {:>10} {:>8}\n", "GEMM (cuBLASLt m×n×k)", "per step", "ms/step", "TFLOP/s");
    for k in gemms {
        out.push_str(&format!(
            "{:<48} {:>9.0} {:>10.2} {:>8.1}\n",
            k.name,
            per_step(k.launches as f64),
            per_step(k.ns) * 1e-6,
            k.flops / k.ns / 1e3
        ));
    }
    out
}

/// `sft bench`: runs and prints the report.
pub fn bench(args: BenchArgs) -> Result<()> {
    let r = crate::with_backend!(Device::parse(&args.device)?, |backend| run_bench(backend, &args)?);
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    println!("device          {}", r.device);
    println!("model           {} ({} parameters)", args.model, r.n_params);
    println!("recompute       {}", args.recompute);
    if r.data.is_some() {
        println!(
            "step            {} positions (mean) = {} micro-batches × {} rows × up to {} tokens",
            r.tokens_per_step, r.grad_accum, r.micro_batch, r.seq_len
        );
    } else {
        println!(
            "step            {} tokens = {} micro-batches × {} rows × {} tokens",
            r.tokens_per_step, r.grad_accum, r.micro_batch, r.seq_len
        );
    }
    println!(
        "time per step   {:.4} s (mean of {} after {} warm-up)",
        r.seconds_per_step, args.steps, args.warmup
    );
    println!("tokens/s        {:.0}", r.tokens_per_s);
    println!(
        "MFU             {:.1}% ({:.2} GFLOP/token vs {:.1} TFLOP/s H100 bf16 peak)",
        100.0 * r.mfu,
        r.flops_per_token / 1e9,
        H100_BF16_PEAK / 1e12
    );
    match (r.memory_used, r.memory_total) {
        // The CPU backend reports the host's memory, which every process on it shares.
        (Some(used), Some(total)) if r.device.starts_with("cpu") => {
            println!("host memory     {:.2} GiB in use (all processes) of {:.2} GiB", gib(used), gib(total))
        }
        (Some(used), Some(total)) => {
            println!("device memory   {:.2} GiB in use of {:.2} GiB", gib(used), gib(total))
        }
        _ => println!("device memory   - (no device)"),
    }
    match &r.data {
        None => println!("loss            {:.4} (last step; random tokens)", r.final_loss),
        Some(d) => {
            let share = |n: u64| 100.0 * n as f64 / d.positions.max(1) as f64;
            println!(
                "data            {} ({:?} batches; {} micro-batches without a supervised target skipped)",
                args.data.as_deref().map_or(String::new(), |p| p.display().to_string()),
                d.batch_mode,
                d.skipped
            );
            println!("padded tokens/s {:.0} (all positions, as tokens/s above)", r.tokens_per_s);
            println!(
                "useful tokens/s {:.0} (non-pad inputs: {:.1}% of positions)",
                d.real_per_s,
                share(d.real)
            );
            println!(
                "supervised/s    {:.0} (supervised targets: {:.1}% of positions)",
                d.supervised_per_s,
                share(d.supervised)
            );
            println!(
                "useful MFU      {:.1}% (non-pad tokens only)",
                100.0 * d.real_per_s * r.flops_per_token / H100_BF16_PEAK
            );
            println!("loss            {:.4} (last step)", r.final_loss);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::KernelTime;
    use crate::plan::calibrate::{parse_kern_sum, Attribution};

    fn times() -> Vec<KernelTime> {
        let k = |name: &str, ns: f64, launches: u64, flops: f64| KernelTime {
            name: name.into(),
            ns,
            launches,
            flops,
        };
        vec![
            k("flash_forward_64", 2.0e6, 4, 0.0),
            k("cublasLt_gemm 6144x16384x2048 TN bf16", 6.0e6, 4, 4.0 * 2.0 * 6144.0 * 16384.0 * 2048.0),
            k("cublasLt_gemm 2048x6144x16384 NT f32 +=", 1.0e6, 2, 2.0 * 2.0 * 2048.0 * 6144.0 * 16384.0),
        ]
    }

    /// The CSV keeps nsys's columns for `sft plan --calibrate-from` (GEMMs of every shape are
    /// GEMMs to it) and adds each GEMM shape's rate.
    #[test]
    fn kernel_times_csv_has_a_rate_per_gemm_shape_and_still_calibrates() {
        let csv = kernel_times_csv(&times());
        let lines: Vec<&str> = csv.lines().collect();
        assert!(lines[1].contains("\"cublasLt_gemm 6144x16384x2048 TN bf16\",274.9"), "{csv}");
        assert!(lines[2].ends_with("\"flash_forward_64\","), "{csv}");
        assert!(lines[3].ends_with(",824.6"), "{csv}");
        let (measured, unattributed) = parse_kern_sum(&csv, "kt.csv").unwrap();
        assert!(unattributed.is_empty(), "{unattributed:?}");
        assert!((measured[&Attribution::Gemm] - 7.0e-3).abs() < 1e-12);
    }

    #[test]
    fn gemm_table_lists_the_shapes_per_step_slowest_first() {
        let table = gemm_shapes_table(&times(), 2);
        let rows: Vec<&str> = table.lines().collect();
        assert_eq!(rows.len(), 3, "{table}");
        let first: Vec<&str> = rows[1].split_whitespace().collect();
        // 4 launches and 6 ms over 2 steps: 2 per step, 3 ms per step, 274.9 TFLOP/s.
        assert_eq!(&first[first.len() - 3..], ["2", "3.00", "274.9"], "{table}");
        assert!(rows[2].starts_with("cublasLt_gemm 2048x6144x16384 NT f32 +="), "{table}");
        assert_eq!(gemm_shapes_table(&times()[..1], 2), "");
    }
}
