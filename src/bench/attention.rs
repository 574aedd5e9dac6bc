//! `sft bench-attention`: causal attention forward and backward on the GPU at B·T tokens, in
//! the table format of `scripts/bench_attention_torch.py` (which runs this binary after
//! PyTorch's flash SDPA, so both land in one table from one run).
//!
//! FLOPs follow the flash-attention convention: the forward is two T×T×hd products (QKᵀ, PV),
//! 4·B·H·T²·hd, halved for the causal mask; the backward counts 2.5× the forward (five
//! products, which is also what flash_backward executes).
//!
//! `--dq both` also times the tensor-core backward with atomic dQ adds (SFT_FLASH_DQ=atomic,
//! not deterministic) in a row of its own, "sft flash (atomic dQ)"; `--dq all` adds the deferred
//! ordered sums, "sft flash (deferred)". `--mma wgmma` (or `both`) runs the head_dim 64 kernels
//! on wgmma (compute capability 9.0: the forward, and the backward with the ordered,
//! deferred-q64 or atomic dQ sum; the deferred sum in q tiles of 32 stays on mma.sync), in rows
//! named "sft wgmma (...)" after the dQ accumulation of their backward.

use anyhow::{Context, Result};
use clap::Args;
use std::time::Instant;

use super::{upload, upload_ids};
use crate::backend::cuda::{AttentionPath, CudaBackend, FlashChoice, FlashDq, FlashMma};
use crate::backend::{Backend, HeadShape, Precision};
use crate::rng::Rng;

#[derive(Args, Debug, Clone)]
pub struct AttentionBenchArgs {
    /// Sequence lengths T (rows of B = tokens / T sequences each).
    #[arg(long, value_delimiter = ',', default_value = "512,1024,2048,4096")]
    pub seq_lens: Vec<usize>,
    /// Tokens per call (B·T).
    #[arg(long, default_value_t = 16384)]
    pub tokens: usize,
    /// Query heads.
    #[arg(long, default_value_t = 32)]
    pub heads: usize,
    /// KV heads (default: as many as query heads).
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Head dimension (64 and 128 have tensor-core kernels).
    #[arg(long, default_value_t = 64)]
    pub head_dim: usize,
    /// Timed calls per measurement (after 3 untimed ones).
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// auto (tensor cores where supported) or scalar.
    #[arg(long, default_value = "auto")]
    pub path: String,
    /// The flash backward's dQ accumulation: ordered (deterministic), deferred or deferred-q64
    /// (deterministic, the ordered bits), atomic, both (ordered and atomic) or all (a row each).
    /// Only the tensor-core path has the choice.
    #[arg(long, default_value = "ordered")]
    pub dq: String,
    /// The flash kernels' tensor-core instructions: mma, wgmma (head_dim 64 on compute
    /// capability 9.0; the forward and the backward but for the deferred sum in q tiles of 32)
    /// or both (rows for each; the wgmma ones only where the device has them).
    #[arg(long, default_value = "mma")]
    pub mma: String,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
}

/// The dQ accumulations `--dq` asks for, in row order.
pub fn dq_modes(arg: &str) -> Result<Vec<FlashDq>> {
    match arg {
        "both" => Ok(vec![FlashDq::Ordered, FlashDq::Atomic]),
        "all" => Ok(FlashDq::ALL.to_vec()),
        other => {
            Ok(vec![FlashDq::parse(other)
                .context("--dq (ordered, deferred, deferred-q64, atomic, both or all)")?])
        }
    }
}

/// The tensor-core instructions `--mma` asks for, in row order.
pub fn mma_kinds(arg: &str) -> Result<Vec<FlashMma>> {
    match arg {
        "both" => Ok(FlashMma::ALL.to_vec()),
        other => Ok(vec![FlashMma::parse(other).context("--mma (mma, wgmma or both)")?]),
    }
}

/// The table's name for a row: "sft scalar", or the tensor-core path: its instructions (flash:
/// mma.sync, wgmma) and its dQ accumulation. At most 22 characters:
/// scripts/bench_attention_torch.py reads the name from the first 22.
pub fn row_name(flash: bool, mma: FlashMma, dq: FlashDq) -> &'static str {
    match (flash, mma, dq) {
        (false, _, _) => "sft scalar",
        (true, FlashMma::Mma, FlashDq::Ordered) => "sft flash (mma)",
        (true, FlashMma::Mma, FlashDq::Deferred) => "sft flash (deferred)",
        (true, FlashMma::Mma, FlashDq::DeferredQ64) => "sft flash (deferred64)",
        (true, FlashMma::Mma, FlashDq::Atomic) => "sft flash (atomic dQ)",
        (true, FlashMma::Wgmma, FlashDq::Ordered) => "sft wgmma (ordered)",
        (true, FlashMma::Wgmma, FlashDq::Deferred) => "sft wgmma (deferred)",
        (true, FlashMma::Wgmma, FlashDq::DeferredQ64) => "sft wgmma (deferred64)",
        (true, FlashMma::Wgmma, FlashDq::Atomic) => "sft wgmma (atomic dQ)",
    }
}

/// (forward, backward) FLOPs of causal attention over `batch` sequences of `t` tokens.
pub fn attention_flops(batch: usize, t: usize, heads: usize, head_dim: usize) -> (f64, f64) {
    let fwd = 4.0 * batch as f64 * heads as f64 * (t as f64) * (t as f64) * head_dim as f64 / 2.0;
    (fwd, 2.5 * fwd)
}

/// The header of the shared table.
pub fn table_header() -> String {
    format!(
        "{:<22} {:>5} {:>4} {:>4} {:>10} {:>10} {:>12} {:>14}",
        "impl", "T", "B", "hd", "fwd ms", "fwd TF/s", "fwd+bwd ms", "fwd+bwd TF/s"
    )
}

/// One row of the shared table (times in seconds).
pub fn table_row(
    name: &str,
    t: usize,
    batch: usize,
    hd: usize,
    heads: usize,
    fwd_s: f64,
    fwd_bwd_s: f64,
) -> String {
    let (f, b) = attention_flops(batch, t, heads, hd);
    format!(
        "{:<22} {:>5} {:>4} {:>4} {:>10.3} {:>10.1} {:>12.3} {:>14.1}",
        name,
        t,
        batch,
        hd,
        fwd_s * 1e3,
        f / fwd_s / 1e12,
        fwd_bwd_s * 1e3,
        (f + b) / fwd_bwd_s / 1e12
    )
}

/// One causal-attention call over `batch` sequences of `t` tokens, with random q, k, v and
/// output gradient and every buffer it writes allocated once: the timed setup of
/// `sft bench-attention` and of `benches/gpu_ops.rs`.
pub struct AttentionCase<B: Backend> {
    pub batch: usize,
    pub t: usize,
    pub heads: HeadShape,
    qkv: B::Buf,
    dout: B::Buf,
    cu_seqlens: B::Ids,
    out: B::Buf,
    lse: B::Buf,
    dqkv: B::Buf,
}

impl<B: Backend> AttentionCase<B> {
    pub fn new(backend: &B, heads: HeadShape, batch: usize, t: usize, rng: &mut Rng) -> Result<Self> {
        let n = batch * t;
        let mut random = |len: usize| -> Result<B::Buf> {
            let data: Vec<f32> = (0..len).map(|_| rng.normal() as f32).collect();
            upload(backend, &data, Precision::Compute)
        };
        let qkv = random(n * heads.qkv_width())?;
        let dout = random(n * heads.q_width())?;
        let cu: Vec<u32> = (0..=batch).map(|r| (r * t) as u32).collect();
        let cu_seqlens = upload_ids(backend, &cu)?;
        // As the model does once per micro-batch: the timed calls reuse the tile table.
        backend.prepare_segments(&cu_seqlens, batch, n)?;
        Ok(AttentionCase {
            batch,
            t,
            heads,
            qkv,
            dout,
            cu_seqlens,
            out: backend.zeros(n * heads.q_width(), Precision::Compute)?,
            lse: backend.zeros(heads.n_heads * n, Precision::F32)?,
            dqkv: backend.zeros(n * heads.qkv_width(), Precision::Compute)?,
        })
    }

    /// (forward, backward) FLOPs of one call, as [`attention_flops`] counts them.
    pub fn flops(&self) -> (f64, f64) {
        attention_flops(self.batch, self.t, self.heads.n_heads, self.heads.head_dim)
    }

    pub fn forward(&mut self, backend: &B) -> Result<()> {
        let n = self.batch * self.t;
        backend.attention_forward(
            &mut self.out,
            &mut self.lse,
            &self.qkv,
            &self.cu_seqlens,
            self.batch,
            n,
            self.heads,
        )
    }

    /// The backward of the last [`forward`](Self::forward) (whose output and lse it reads).
    pub fn backward(&mut self, backend: &B) -> Result<()> {
        let n = self.batch * self.t;
        backend.attention_backward(
            &mut self.dqkv,
            &self.dout,
            &self.qkv,
            &self.out,
            &self.lse,
            &self.cu_seqlens,
            self.batch,
            n,
            self.heads,
            None,
        )
    }

    /// The gradient of q, k and v the last backward wrote.
    pub fn dqkv(&self) -> &B::Buf {
        &self.dqkv
    }
}

pub fn bench_attention(args: AttentionBenchArgs) -> Result<()> {
    let mut modes = dq_modes(&args.dq)?;
    let mut kinds = mma_kinds(&args.mma)?;
    let g = CudaBackend::new(args.gpu).context("bench-attention needs a CUDA GPU")?;
    let path = match args.path.as_str() {
        "auto" => AttentionPath::Auto,
        "scalar" => AttentionPath::Scalar,
        other => anyhow::bail!("--path {other}: expected auto or scalar"),
    };
    g.set_attention_path(path);
    let heads = HeadShape {
        n_heads: args.heads,
        n_kv_heads: args.kv_heads.unwrap_or(args.heads),
        head_dim: args.head_dim,
    };
    let flash = g.uses_tensor_core_attention(heads.head_dim);
    if !flash {
        // The scalar kernels have one forward and one backward: one row, whatever --dq says.
        modes.truncate(1);
        kinds.truncate(1);
    }
    if kinds.len() > 1 && g.set_flash_mma(FlashMma::Wgmma).is_err() {
        eprintln!("--mma both: no wgmma kernels on this device (compute capability 9.0 only)");
        kinds.retain(|&f| f == FlashMma::Mma);
    }
    eprintln!("{} (compute capability {:?})", g.name(), g.compute_capability());
    println!("{}", table_header());
    let mut rng = Rng::new(11);
    for &t in &args.seq_lens {
        let batch = (args.tokens / t).max(1);
        let mut case = AttentionCase::new(&g, heads, batch, t, &mut rng)?;
        let mut time = |backward: bool| -> Result<f64> {
            let mut timed = Instant::now();
            for i in 0..3 + args.iters {
                if i == 3 {
                    // 3 untimed calls, then `iters` back to back, then one synchronize.
                    g.synchronize()?;
                    timed = Instant::now();
                }
                case.forward(&g)?;
                if backward {
                    case.backward(&g)?;
                }
            }
            g.synchronize()?;
            Ok(timed.elapsed().as_secs_f64() / args.iters.max(1) as f64)
        };
        for &kind in &kinds {
            if flash {
                g.set_flash_mma(kind)?;
            }
            for &mode in &modes {
                g.set_flash_dq(mode);
                let name = row_name(flash, kind, mode);
                let fwd = time(false)?;
                let fwd_bwd = time(true)?;
                println!("{}", table_row(name, t, batch, heads.head_dim, heads.n_heads, fwd, fwd_bwd));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flops_follow_the_flash_attention_convention() {
        // B 8, T 2048, 32 heads of 64: 4·8·32·2048²·64/2 forward.
        let (f, b) = attention_flops(8, 2048, 32, 64);
        assert_eq!(f, 4.0 * 8.0 * 32.0 * 2048.0 * 2048.0 * 64.0 / 2.0);
        assert_eq!(b, 2.5 * f);
        let row = table_row("x", 2048, 8, 64, 32, 1e-3, 3.5e-3);
        // fwd: f / 1 ms; fwd+bwd: 3.5 f / 3.5 ms: the same rate.
        let rate = format!("{:.1}", f / 1e-3 / 1e12);
        assert_eq!(row.split_whitespace().filter(|w| *w == rate).count(), 2, "{row}");
    }

    #[test]
    fn dq_flag_takes_ordered_atomic_or_both() {
        assert_eq!(dq_modes("ordered").unwrap(), vec![FlashDq::Ordered]);
        assert_eq!(dq_modes("atomic").unwrap(), vec![FlashDq::Atomic]);
        assert_eq!(dq_modes("both").unwrap(), vec![FlashDq::Ordered, FlashDq::Atomic]);
        assert_eq!(
            dq_modes("all").unwrap(),
            vec![FlashDq::Ordered, FlashDq::Deferred, FlashDq::DeferredQ64, FlashDq::Atomic]
        );
        for bad in ["fastest", "pipelined"] {
            let err = format!("{:#}", dq_modes(bad).unwrap_err());
            assert!(
                err.contains("--dq (ordered, deferred, deferred-q64, atomic, both or all)")
                    && err.contains(bad),
                "{err}"
            );
        }
        // The table's name column is 22 wide (bench_attention_torch.py splits rows there).
        let mma = FlashMma::Mma;
        let names = [
            row_name(true, mma, FlashDq::Ordered),
            row_name(true, mma, FlashDq::Deferred),
            row_name(true, mma, FlashDq::DeferredQ64),
            row_name(true, mma, FlashDq::Atomic),
            row_name(false, mma, FlashDq::Atomic),
        ];
        assert!(names.iter().all(|n| n.len() <= 22), "{names:?}");
        assert_eq!(
            names,
            [
                "sft flash (mma)",
                "sft flash (deferred)",
                "sft flash (deferred64)",
                "sft flash (atomic dQ)",
                "sft scalar"
            ]
        );
        // Every wgmma row name is distinct from the mma ones and fits too.
        let mut all: Vec<&str> = FlashMma::ALL
            .iter()
            .flat_map(|&f| FlashDq::ALL.iter().map(move |&dq| row_name(true, f, dq)))
            .collect();
        assert!(all.iter().all(|n| n.len() <= 22), "{all:?}");
        all.sort();
        all.dedup();
        assert_eq!(all.len(), FlashMma::ALL.len() * FlashDq::ALL.len());
    }

    #[test]
    fn mma_flag_takes_mma_wgmma_or_both() {
        assert_eq!(mma_kinds("mma").unwrap(), vec![FlashMma::Mma]);
        assert_eq!(mma_kinds("WGMMA").unwrap(), vec![FlashMma::Wgmma]);
        assert_eq!(mma_kinds("both").unwrap(), FlashMma::ALL.to_vec());
        let err = format!("{:#}", mma_kinds("tma").unwrap_err());
        assert!(err.contains("--mma (mma, wgmma or both)") && err.contains("tma"), "{err}");
    }

    #[test]
    fn a_case_runs_forward_and_backward_on_the_cpu() {
        let backend = crate::backend::cpu::CpuBackend::<f32>::new();
        let heads = HeadShape { n_heads: 4, n_kv_heads: 2, head_dim: 8 };
        let mut case = AttentionCase::new(&backend, heads, 3, 5, &mut Rng::new(1)).unwrap();
        assert_eq!(case.flops(), attention_flops(3, 5, 4, 8));
        case.forward(&backend).unwrap();
        case.backward(&backend).unwrap();
        let dqkv = backend.read(case.dqkv(), 3 * 5 * heads.qkv_width()).unwrap();
        assert!(dqkv.iter().all(|x| x.is_finite()) && dqkv.iter().any(|&x| x != 0.0));
    }
}
