//! The op set that the model is written against, once; `cpu/` (the reference) and `cuda/`
//! implement it, one file per op family in each, named like its `kernels/` file.
//!
//! Every op works on flat row-major buffers with explicit sizes, as llm.c's kernels do:
//! `n` is the number of token rows in the micro-batch (rows × row length), `d` the model
//! width. Buffers are allocated once, for the largest micro-batch, and an op only touches its
//! first `n` rows, so a step allocates nothing.
//!
//! Precision: buffers made with [`Precision::Compute`] hold weights and activations in the
//! backend's working type (bf16 on CUDA, `T` on the CPU); [`Precision::F32`] holds
//! what must stay exact (parameter gradients, master weights, Adam moments, RMSNorm's
//! reciprocal std, attention's logsumexp). The CPU backend keeps everything in `T` (f32 for
//! training, f64 for gradient checks) and is the reference each CUDA kernel is tested against.
//!
//! Conventions shared by all backends:
//! - Linear weights have PyTorch's layout `[out, in]`; `matmul_forward` computes `inp @ w^T`.
//! - `qkv` rows are `[q (n_heads·hd) | k (n_kv_heads·hd) | v (n_kv_heads·hd)]`; q head `h`
//!   reads kv head `h / (n_heads / n_kv_heads)`.
//! - `gate_up` rows are `[gate (hidden) | up (hidden)]`.
//! - Attention is causal inside each segment `cu_seqlens[s]..cu_seqlens[s+1]` of the flat token
//!   axis, and never crosses segments: a padded batch has one segment per row, a packed batch
//!   one per example.
//! - Ops that produce parameter gradients take a [`GradMode`]: `Overwrite` for the first
//!   micro-batch of an optimizer step (so the gradients need no zeroing between steps),
//!   `Accumulate` to ADD into them after that; gradients of activations are overwritten unless
//!   the op says otherwise.
//! - Results the trainer logs (row losses, the gradient norm) stay on the device, in buffers the
//!   caller owns; the host reads them with `read`, once per optimizer step. [`Backend::host_reads`]
//!   counts those blocking device-to-host copies.

use anyhow::Result;

pub mod cpu;
pub mod cuda;
pub mod device;
pub mod profile;

pub use device::Device;

/// Errors, naming the first row, when a supervised target (one that is not `ignore_id`) is not
/// below `vocab`: every backend (and the plan's counting one) refuses such a batch alike.
pub fn check_targets(targets: &[u32], ignore_id: u32, vocab: usize) -> Result<()> {
    if let Some((i, &t)) = targets.iter().enumerate().find(|&(_, &t)| t != ignore_id && t as usize >= vocab) {
        anyhow::bail!("lm_head_cross_entropy: row {i} has target {t}, the vocabulary has {vocab} ids");
    }
    Ok(())
}

/// Errors unless a column slice fits its rows: columns `col..col + out_dim` of rows `ld` wide,
/// the output slice of [`Backend::matmul_forward_slice`] and [`Backend::matmul_backward_slice`]
/// (`op` names which, in the message).
pub fn check_column_slice(op: &str, col: usize, out_dim: usize, ld: usize) -> Result<()> {
    match col.checked_add(out_dim) {
        Some(end) if end <= ld => Ok(()),
        _ => anyhow::bail!(
            "{op}: the slice's columns {col}..{} do not fit in rows {ld} wide (col + out_dim must be at most ld)",
            col as u128 + out_dim as u128
        ),
    }
}

/// The supervised rows of a micro-batch (`targets[i] != ignore_id`) and their targets, in row
/// order, after checking every supervised target against the vocabulary: what
/// [`Backend::lm_head_cross_entropy`] takes, computed on the host where the batch already is.
pub fn supervised_rows(targets: &[u32], ignore_id: u32, vocab: usize) -> Result<(Vec<u32>, Vec<u32>)> {
    check_targets(targets, ignore_id, vocab)?;
    let rows: Vec<u32> = (0..targets.len() as u32).filter(|&i| targets[i as usize] != ignore_id).collect();
    let sup_targets = rows.iter().map(|&i| targets[i as usize]).collect();
    Ok((rows, sup_targets))
}

/// The tokens of a micro-batch grouped by id, as [`Backend::embedding_backward`] takes them, in
/// one id buffer: `[order (n) | group_start (n_groups + 1) | group_id (n_groups)]`, where `order`
/// lists the token indices sorted by id (stable: token order within an id), `group_start[g]` is
/// where id `group_id[g]`'s run starts in `order` (the last entry is `n`). Returns the buffer and
/// `n_groups`. Computed on the host when the batch is loaded, so the backward needs no read-back.
pub fn group_tokens_by_id(ids: &[u32]) -> (Vec<u32>, usize) {
    let n = ids.len();
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.sort_by_key(|&i| ids[i as usize]);
    let mut group_start = Vec::new();
    let mut group_id = Vec::new();
    for (pos, &tok) in order.iter().enumerate() {
        let id = ids[tok as usize];
        if group_id.last() != Some(&id) {
            group_id.push(id);
            group_start.push(pos as u32);
        }
    }
    group_start.push(n as u32);
    let n_groups = group_id.len();
    let mut packed = order;
    packed.extend_from_slice(&group_start);
    packed.extend_from_slice(&group_id);
    (packed, n_groups)
}

/// The three parts of a [`group_tokens_by_id`] buffer: `(order, group_start, group_id)`.
pub fn token_groups(groups: &[u32], n: usize, n_groups: usize) -> Result<(&[u32], &[u32], &[u32])> {
    anyhow::ensure!(
        groups.len() > n + 2 * n_groups,
        "embedding token groups: the buffer holds {} ids, {n} tokens in {n_groups} groups need {}",
        groups.len(),
        n + 2 * n_groups + 1
    );
    let (order, rest) = groups.split_at(n);
    let (start, rest) = rest.split_at(n_groups + 1);
    Ok((order, start, &rest[..n_groups]))
}

/// Whether an op that produces a parameter gradient adds into it or writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradMode {
    /// Write the gradient, ignoring what the buffer held: the first micro-batch of a step.
    Overwrite,
    /// Add into the gradient: the step's later micro-batches.
    Accumulate,
}

/// The slots of a step-statistics buffer (F32, [`STATS_LEN`] elements): sums that the host reads
/// once per step. A sum computed in f64 is kept split into [`stats::SPLIT`] floats whose f64 sum
/// is the value (each the rounding of what the previous ones leave: 72 bits), so that an f32
/// buffer, and `read`, which returns f32, carry it whole: the gradient checks difference losses
/// at f64 precision.
pub mod stats {
    /// Floats of one split f64.
    pub const SPLIT: usize = 3;
    /// The sum of the step's supervised losses.
    pub const STEP_LOSS: usize = 0;
    /// The sum of one micro-batch's supervised losses, for `Model::forward_backward`.
    pub const MICRO_LOSS: usize = SPLIT;
    /// The sum of squares of every gradient: the global norm squared.
    pub const SUMSQ: usize = 2 * SPLIT;
    /// Elements of a statistics buffer.
    pub const STATS_LEN: usize = 3 * SPLIT;

    /// `x` as three floats whose f64 sum is `x`.
    pub fn split(x: f64) -> [f32; SPLIT] {
        let a = x as f32;
        let r = x - a as f64;
        let b = r as f32;
        [a, b, (r - b as f64) as f32]
    }

    /// The f64 value split at `slot` of `buf`.
    pub fn join(buf: &[f32], slot: usize) -> f64 {
        buf[slot..slot + SPLIT].iter().map(|&v| v as f64).sum()
    }
}
pub use stats::STATS_LEN;

/// Gradient clipping by the global norm, read by [`Backend::adamw`] from device memory: the sum
/// of squares that [`Backend::sum_squares`] left at `sumsq[stats::SUMSQ..]`.
pub struct Clip<'a, B: Backend + ?Sized> {
    pub sumsq: &'a B::Buf,
    /// Clip to this norm; 0 or less: no clipping.
    pub max_norm: f32,
}

/// `min(1, max_norm / norm)` (1 when `max_norm <= 0`), in f64 as the trainer computed it, or
/// `None` when the norm is not finite (the step is then skipped).
pub fn clip_factor(sumsq: f64, max_norm: f32) -> Option<f32> {
    let norm = sumsq.sqrt();
    if !norm.is_finite() {
        return None;
    }
    let max_norm = max_norm as f64;
    Some(if max_norm > 0.0 && norm > max_norm { (max_norm / norm) as f32 } else { 1.0 })
}

/// Which storage type a buffer needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// Weights and activations: bf16 on CUDA.
    Compute,
    /// Parameter gradients, master weights, optimizer moments, saved statistics: always fp32.
    F32,
    /// AdamW moments with `--optimizer-state bf16`: bf16 on a device backend. The CPU backend
    /// stores its own float type and its `adamw` rounds the stored values to bf16 instead.
    Bf16,
}

/// Storage type of the AdamW moments `m` and `v` (`--optimizer-state`). The update is computed
/// in fp32 either way; with `Bf16` the new moments are rounded to nearest even when stored,
/// which saves 4 bytes per parameter. The master weights stay fp32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateDtype {
    #[default]
    F32,
    Bf16,
}

impl StateDtype {
    /// The precision the moment buffers are allocated with.
    pub fn precision(self) -> Precision {
        match self {
            StateDtype::F32 => Precision::F32,
            StateDtype::Bf16 => Precision::Bf16,
        }
    }
    /// Bytes per element of one moment buffer on a device backend.
    pub fn bytes(self) -> usize {
        match self {
            StateDtype::F32 => 4,
            StateDtype::Bf16 => 2,
        }
    }
    /// The name users write (`f32`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            StateDtype::F32 => "f32",
            StateDtype::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for StateDtype {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "f32" => Ok(StateDtype::F32),
            "bf16" => Ok(StateDtype::Bf16),
            _ => anyhow::bail!("optimizer state must be f32 or bf16, got {s:?}"),
        }
    }
}

impl std::fmt::Display for StateDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The two conventions for pairing dimensions in rotary embeddings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RopeStyle {
    /// Meta's original form (SimpleLLaMA): dimension pairs (2i, 2i+1).
    AdjacentPairs,
    /// Hugging Face Llama's form: dimension pairs (i, i + hd/2).
    HalfSplit,
}

/// How the RoPE frequencies are stretched for contexts longer than pretraining saw: Hugging
/// Face's `rope_type`s that depend on the frequency only (not on the running sequence length).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "rope_type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RopeScaling {
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f32 },
    /// Llama 3.1/3.2's: wavelengths longer than `original / low_freq_factor` divided by
    /// `factor`, shorter than `original / high_freq_factor` kept, a linear blend between.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
}

impl RopeScaling {
    /// Checks the numbers, with an error naming the field.
    pub fn validate(&self) -> anyhow::Result<()> {
        let factor = match *self {
            RopeScaling::Linear { factor } => factor,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings,
            } => {
                anyhow::ensure!(
                    low.is_finite() && low > 0.0,
                    "rope_scaling.low_freq_factor must be positive (got {low})"
                );
                anyhow::ensure!(
                    high.is_finite() && high > low,
                    "rope_scaling.high_freq_factor ({high}) must exceed low_freq_factor ({low})"
                );
                anyhow::ensure!(
                    original_max_position_embeddings > 0,
                    "rope_scaling.original_max_position_embeddings must be positive"
                );
                factor
            }
        };
        anyhow::ensure!(
            factor.is_finite() && factor > 0.0,
            "rope_scaling.factor must be positive (got {factor})"
        );
        Ok(())
    }
}

/// Everything a rotation needs: base, pairing, frequency scaling.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rope {
    pub theta: f32,
    pub style: RopeStyle,
    pub scaling: Option<RopeScaling>,
}

impl Rope {
    /// Unscaled rotary embeddings.
    pub fn plain(theta: f32, style: RopeStyle) -> Self {
        Rope { theta, style, scaling: None }
    }

    /// The inverse frequency of pair `j`: `theta^(-2j/hd)`, scaled, computed in f64 and rounded
    /// to f32. The CUDA backend uploads these (once per rope and head_dim) for its `rope_table`.
    pub fn inv_freq(&self, j: usize, head_dim: usize) -> f32 {
        let base = (self.theta as f64).powf(-2.0 * j as f64 / head_dim as f64);
        let scaled = match self.scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base / factor as f64,
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let (factor, low, high) = (factor as f64, low_freq_factor as f64, high_freq_factor as f64);
                let original = original_max_position_embeddings as f64;
                let wavelen = 2.0 * std::f64::consts::PI / base;
                if wavelen < original / high {
                    base
                } else if wavelen > original / low {
                    base / factor
                } else {
                    let smooth = (original / wavelen - low) / (high - low);
                    (1.0 - smooth) * base / factor + smooth * base
                }
            }
        };
        scaled as f32
    }
}

/// The device time of one kernel's launches (see [`Backend::take_kernel_times`]).
#[derive(Clone, Debug, PartialEq)]
pub struct KernelTime {
    /// The entry name in kernels/*.cu, or `cublasLt_gemm` and the GEMM's shape.
    pub name: String,
    pub ns: f64,
    pub launches: u64,
    /// The FLOPs of these launches where the backend knows them (GEMMs), else 0.
    pub flops: f64,
}

/// Shapes of the attention block, shared by rope and attention ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl HeadShape {
    /// Width of one `qkv` row.
    pub fn qkv_width(&self) -> usize {
        (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
    }
    /// Width of the attention output row.
    pub fn q_width(&self) -> usize {
        self.n_heads * self.head_dim
    }
    pub fn kv_width(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// Hyper-parameters of one AdamW step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step count, for bias correction.
    pub step: u64,
    /// Multiplies every gradient before use: the clipping factor (1.0 when not clipping).
    pub grad_scale: f32,
}

/// The op list of [`Backend`], written once. It declares the trait's ops below, and a backend
/// whose ops live in per-family files generates its `impl Backend` from it (cuda/mod.rs), so an
/// op's signature is not copied into a forwarding method. `$then` receives the list as items
/// `#[doc] fn name(&self, arg: Type, ...) -> Ret;`.
macro_rules! backend_ops {
    ($then:ident) => {
        $then! {
            // ---- memory -------------------------------------------------------------------------
            /// A zero-filled buffer of `len` elements.
            fn zeros(&self, len: usize, precision: Precision) -> Result<Self::Buf>;
            /// A zero-filled id buffer of `len` elements.
            fn zeros_ids(&self, len: usize) -> Result<Self::Ids>;
            /// Copies `src` into the start of `dst`, converting to its precision.
            fn write(&self, dst: &mut Self::Buf, src: &[f32]) -> Result<()>;
            /// Reads the first `len` elements of `src` as f32.
            fn read(&self, src: &Self::Buf, len: usize) -> Result<Vec<f32>>;
            /// Copies `src` into the start of `dst`.
            fn write_ids(&self, dst: &mut Self::Ids, src: &[u32]) -> Result<()>;
            /// Sets the first `len` elements to zero.
            fn zero(&self, buf: &mut Self::Buf, len: usize) -> Result<()>;
            /// Copies the first `len` elements of `src` to `dst`.
            fn copy(&self, dst: &mut Self::Buf, src: &Self::Buf, len: usize) -> Result<()>;

            // ---- embedding ----------------------------------------------------------------------
            /// `out[i] = table[ids[i]]`; out `[n, d]`, table `[vocab, d]`.
            fn embedding_forward(
                &self,
                out: &mut Self::Buf,
                ids: &Self::Ids,
                table: &Self::Buf,
                n: usize,
                d: usize,
            ) -> Result<()>;
            /// `dtable[id] (=|+=) Σ dout[i]` over the tokens `i` of each id, summed in token order
            /// (deterministic, no float atomics); `groups` is [`group_tokens_by_id`]'s buffer for
            /// the `n` ids, with `n_groups` groups. With `Overwrite`, rows of ids absent from the
            /// batch become zero.
            #[allow(clippy::too_many_arguments)]
            fn embedding_backward(
                &self,
                dtable: &mut Self::Buf,
                groups: &Self::Ids,
                n_groups: usize,
                dout: &Self::Buf,
                n: usize,
                d: usize,
                mode: GradMode,
            ) -> Result<()>;

            // ---- RMSNorm ------------------------------------------------------------------------
            /// `out = x / rms(x) * w` per row; `rstd[i] = 1 / sqrt(mean(x_i^2) + eps)` is saved (F32).
            #[allow(clippy::too_many_arguments)]
            fn rmsnorm_forward(
                &self,
                out: &mut Self::Buf,
                rstd: &mut Self::Buf,
                x: &Self::Buf,
                w: &Self::Buf,
                n: usize,
                d: usize,
                eps: f32,
            ) -> Result<()>;
            /// Residual add fused with the branch's dropout and the next norm:
            /// `x_out = x_in + dropout(delta)` (the mask of [`Backend::dropout`] over the flat
            /// `[n, d]` delta; `delta` itself is left as it is), then `out = rmsnorm(x_out) * w`,
            /// saving `rstd`. `dropout` None (or p = 0) adds `delta` unchanged.
            #[allow(clippy::too_many_arguments)]
            fn residual_rmsnorm_forward(
                &self,
                x_out: &mut Self::Buf,
                out: &mut Self::Buf,
                rstd: &mut Self::Buf,
                x_in: &Self::Buf,
                delta: &Self::Buf,
                w: &Self::Buf,
                n: usize,
                d: usize,
                eps: f32,
                dropout: Option<Dropout>,
            ) -> Result<()>;
            /// Backward of `rmsnorm_forward`: ADDS the input gradient into `dx` (the residual stream's
            /// gradient) and the weight gradient into `dw`. With `branch`, also writes
            /// `branch.out = dropout(dx)` over the updated `dx` (`[n, d]`, overwritten): the gradient
            /// of the branch that joined this residual stream through `residual_rmsnorm_forward`'s
            /// dropout, without a second pass over `dx`.
            #[allow(clippy::too_many_arguments)]
            fn rmsnorm_backward(
                &self,
                dx: &mut Self::Buf,
                dw: &mut Self::Buf,
                dout: &Self::Buf,
                x: &Self::Buf,
                w: &Self::Buf,
                rstd: &Self::Buf,
                n: usize,
                d: usize,
                branch: Option<BranchGrad<'_, Self>>,
            ) -> Result<()>;

            // ---- matmul -------------------------------------------------------------------------
            /// `out[n, o] = inp[n, i] @ w[o, i]^T`.
            fn matmul_forward(
                &self,
                out: &mut Self::Buf,
                inp: &Self::Buf,
                w: &Self::Buf,
                n: usize,
                in_dim: usize,
                out_dim: usize,
            ) -> Result<()>;
            /// `out[n, o] = resid[n, o] + inp[n, i] @ w[o, i]^T`: a branch's output projection
            /// added to the residual stream by the GEMM itself (beta 1 over `resid`, which is
            /// only read), so that no element-wise pass reads the projection back to add it.
            /// The sum is the one `residual_rmsnorm_forward` forms without dropout.
            #[allow(clippy::too_many_arguments)]
            fn matmul_forward_residual(
                &self,
                out: &mut Self::Buf,
                resid: &Self::Buf,
                inp: &Self::Buf,
                w: &Self::Buf,
                n: usize,
                in_dim: usize,
                out_dim: usize,
            ) -> Result<()>;
            /// `dinp = dout @ w` (overwritten, skipped when None); `dw (=|+=) dout^T @ inp` (the
            /// GEMM's beta is 0 or 1).
            #[allow(clippy::too_many_arguments)]
            fn matmul_backward(
                &self,
                dinp: Option<&mut Self::Buf>,
                dw: &mut Self::Buf,
                dout: &Self::Buf,
                inp: &Self::Buf,
                w: &Self::Buf,
                n: usize,
                in_dim: usize,
                out_dim: usize,
                mode: GradMode,
            ) -> Result<()>;

            /// A linear layer on a column slice: `out[i, col + j] (= | +=) scale · Σ_k inp[i, k] · w[j, k]`
            /// for `j < out_dim`, `out`'s rows `ld` wide (`+=` with `Accumulate`). LoRA's products:
            /// `x·Aᵀ`, then `scale · (x·Aᵀ)·Bᵀ` added into one projection's slice of a fused output.
            #[allow(clippy::too_many_arguments)]
            fn matmul_forward_slice(
                &self,
                out: &mut Self::Buf,
                inp: &Self::Buf,
                w: &Self::Buf,
                n: usize,
                in_dim: usize,
                out_dim: usize,
                ld: usize,
                col: usize,
                scale: f32,
                mode: GradMode,
            ) -> Result<()>;
            /// Backward of `matmul_forward_slice`, reading `dout[i, col + j]` (rows `ld` wide):
            /// `dinp (= | +=) scale · dout_slice @ w` (`+=` with `Accumulate`: an input gradient
            /// that several slices sum into) and
            /// `dw += scale · dout_slice^T @ inp` (F32), each skipped when None: a frozen weight
            /// passes no `dw`, and its input gradient still flows.
            #[allow(clippy::too_many_arguments)]
            fn matmul_backward_slice(
                &self,
                dinp: Option<&mut Self::Buf>,
                dw: Option<&mut Self::Buf>,
                dout: &Self::Buf,
                inp: &Self::Buf,
                w: &Self::Buf,
                n: usize,
                in_dim: usize,
                out_dim: usize,
                ld: usize,
                col: usize,
                scale: f32,
                mode: GradMode,
            ) -> Result<()>;

            // ---- RoPE ---------------------------------------------------------------------------
            /// The rotation table of a micro-batch, built once and read by every layer's
            /// `rope_forward` and `rope_backward`: `table [n, head_dim/2, 2]` (F32) holds
            /// `(cos, sin)` of the angle `positions[i] as f32 * rope.inv_freq(j, head_dim)` (an f32
            /// product) for row `i` and pair `j`.
            fn rope_table(
                &self,
                table: &mut Self::Buf,
                positions: &Self::Ids,
                n: usize,
                head_dim: usize,
                rope: Rope,
            ) -> Result<()>;
            /// Rotates the q and k parts of `qkv` in place, pair `j` of row `i` by the angle of
            /// `table` (from `rope_table`), pairing dimensions as `style` says.
            fn rope_forward(
                &self,
                qkv: &mut Self::Buf,
                table: &Self::Buf,
                n: usize,
                heads: HeadShape,
                style: RopeStyle,
            ) -> Result<()>;
            /// The inverse rotation, applied in place to the q and k parts of `dqkv`.
            fn rope_backward(
                &self,
                dqkv: &mut Self::Buf,
                table: &Self::Buf,
                n: usize,
                heads: HeadShape,
                style: RopeStyle,
            ) -> Result<()>;

            // ---- attention ----------------------------------------------------------------------
            /// Causal softmax attention inside each segment, scale `1/sqrt(hd)`.
            /// `out [n, n_heads·hd]`; `lse [n_heads, n]` (F32) saves each row's logsumexp.
            /// `cu_seqlens` holds `n_segments + 1` offsets, from 0 to `n`.
            #[allow(clippy::too_many_arguments)]
            fn attention_forward(
                &self,
                out: &mut Self::Buf,
                lse: &mut Self::Buf,
                qkv: &Self::Buf,
                cu_seqlens: &Self::Ids,
                n_segments: usize,
                n: usize,
                heads: HeadShape,
            ) -> Result<()>;
            /// Backward of `attention_forward`; `dqkv` is overwritten. With `rope` (the rotation
            /// that `rope_forward` gave q and k), the q and k gradients are those before it, as
            /// `rope_backward` after this would make them (a backend may fold the rotation into
            /// the backward's stores).
            #[allow(clippy::too_many_arguments)]
            fn attention_backward(
                &self,
                dqkv: &mut Self::Buf,
                dout: &Self::Buf,
                qkv: &Self::Buf,
                out: &Self::Buf,
                lse: &Self::Buf,
                cu_seqlens: &Self::Ids,
                n_segments: usize,
                n: usize,
                heads: HeadShape,
                rope: Option<RopeGrad<'_, Self>>,
            ) -> Result<()>;
            /// Generation with a KV cache, for one sequence: writes the (already rotated) k and v of
            /// the `n_new` rows of `qkv` into rows `start..start + n_new` of the caches
            /// (`[max_len, n_kv_heads·hd]` each), then row `i` attends causally to cache rows
            /// `0..=start + i`. `out [n_new, n_heads·hd]`.
            #[allow(clippy::too_many_arguments)]
            fn attention_decode(
                &self,
                out: &mut Self::Buf,
                qkv: &Self::Buf,
                k_cache: &mut Self::Buf,
                v_cache: &mut Self::Buf,
                start: usize,
                n_new: usize,
                heads: HeadShape,
            ) -> Result<()>;

            // ---- SwiGLU -------------------------------------------------------------------------
            /// `out[n, hidden] = silu(gate) * up`, from `gate_up [n, 2·hidden]`.
            fn swiglu_forward(&self, out: &mut Self::Buf, gate_up: &Self::Buf, n: usize, hidden: usize)
                -> Result<()>;
            /// `dgate_up [n, 2·hidden]` (overwritten) from `dout [n, hidden]`.
            fn swiglu_backward(
                &self,
                dgate_up: &mut Self::Buf,
                dout: &Self::Buf,
                gate_up: &Self::Buf,
                n: usize,
                hidden: usize,
            ) -> Result<()>;

            // ---- dropout ------------------------------------------------------------------------
            /// In place: element `i` is zeroed when `rng::uniform(seed, i) < p`, else scaled by
            /// `1/(1-p)`. The same call with the same seed is its own backward.
            fn dropout(&self, x: &mut Self::Buf, len: usize, p: f32, seed: u64) -> Result<()>;

            // ---- cross-entropy ------------------------------------------------------------------
            /// lm_head fused with masked cross-entropy. `x [n, d]` (after the final norm), `w [vocab, d]`;
            /// `rows [n_sup]` are the supervised rows (ascending) and `targets [n_sup]` their targets,
            /// as [`supervised_rows`] lists them (the caller has checked them); other rows never reach
            /// the vocabulary projection. Writes row `rows[k]`'s loss to `losses[k]` (F32), on the
            /// device. With `grads`, also writes `dx = loss_scale · dlogits @ w` (zero for
            /// unsupervised rows) and `dw (=|+=) loss_scale · dlogits^T @ x` (by `grads.mode`).
            #[allow(clippy::too_many_arguments)]
            fn lm_head_cross_entropy(
                &self,
                x: &Self::Buf,
                w: &Self::Buf,
                rows: &Self::Ids,
                targets: &Self::Ids,
                n_sup: usize,
                n: usize,
                d: usize,
                vocab: usize,
                losses: &mut Self::Buf,
                grads: Option<LossGrads<'_, Self>>,
            ) -> Result<()>;
            /// `stats[slot..slot + stats::SPLIT] (=|+=) Σ x[..len]`, split (see [`stats`]), summed in f64
            /// in a fixed order: the loss sums, kept on the device.
            fn sum_into(
                &self,
                stats: &mut Self::Buf,
                slot: usize,
                x: &Self::Buf,
                len: usize,
                mode: GradMode,
            ) -> Result<()>;

            // ---- global norm, AdamW -----------------------------------------------------------
            /// Sum of squares of every element of every buffer (first `lens[i]` elements of `bufs[i]`),
            /// accumulated in f64 in a fixed order, written split to `stats[stats::SUMSQ..]` on the
            /// device.
            fn sum_squares(&self, bufs: &[&Self::Buf], lens: &[usize], stats: &mut Self::Buf) -> Result<()>;
            /// One AdamW step over all tensors at once: `master` (F32), `m`, `v` (of `moments`'s
            /// precision) are updated from `grads · hp.grad_scale · clip_factor`, decoupled weight
            /// decay `lr · wd · master`, and `params` (Compute) receives the new master values. The
            /// arithmetic is fp32; with [`StateDtype::Bf16`] the new `m` and `v` are used unrounded
            /// in this step's update and stored rounded to nearest even. With `clip`, the factor is
            /// [`clip_factor`] of the sum of squares in device memory, and when that norm is not
            /// finite nothing is updated (the caller reads the norm afterwards and reports it).
            #[allow(clippy::too_many_arguments)]
            fn adamw(
                &self,
                params: &mut [&mut Self::Buf],
                master: &mut [&mut Self::Buf],
                grads: &[&Self::Buf],
                m: &mut [&mut Self::Buf],
                v: &mut [&mut Self::Buf],
                moments: StateDtype,
                lens: &[usize],
                hp: &AdamW,
                clip: Option<Clip<'_, Self>>,
            ) -> Result<()>;
        }
    };
}
pub(crate) use backend_ops;

/// Declares [`Backend`] from the op list of [`backend_ops`].
macro_rules! declare_backend {
    ($($(#[$meta:meta])* fn $name:ident(&self $(, $arg:ident: $ty:ty)* $(,)?) -> $ret:ty;)*) => {
        /// The op set. See the module documentation for the conventions.
        pub trait Backend {
            /// A buffer of floats (in the precision it was made with).
            type Buf;
            /// A buffer of u32 (token ids, targets, positions, segment boundaries).
            type Ids;

            /// A short human-readable name ("cpu", "cuda:0 NVIDIA H100 ...").
            fn name(&self) -> String;
            /// Waits for queued work (a no-op on the CPU).
            fn synchronize(&self) -> Result<()>;
            /// Blocking device-to-host copies so far (`read`, and any op that looks at device data
            /// on the host): the trainer does one per optimizer step.
            fn host_reads(&self) -> u64;
            /// Bytes per element of a [`Precision::Compute`] buffer (for memory estimates).
            fn compute_bytes(&self) -> usize {
                4
            }
            /// `(free, total)` bytes of device memory, for a backend with a device of its own.
            fn memory_info(&self) -> Result<Option<(usize, usize)>> {
                Ok(None)
            }
            /// Starts (or stops) timing every kernel launch; `false` where the backend cannot
            /// (only the CUDA backend can).
            fn set_kernel_timing(&self, _on: bool) -> bool {
                false
            }
            /// The device time of the launches timed since the last call, per kernel.
            fn take_kernel_times(&self) -> Result<Vec<KernelTime>> {
                Ok(Vec::new())
            }
            /// Once a batch's `cu_seqlens` is written, before its attention ops: a backend may
            /// prepare what depends only on the segments (the CUDA flash tile table), once for
            /// all layers. Writing `cu_seqlens` again undoes it; attention works without it.
            fn prepare_segments(&self, _cu_seqlens: &Self::Ids, _n_segments: usize, _n: usize) -> Result<()> {
                Ok(())
            }
            /// Data parallelism on the device: sums the first `lens[i]` elements of every F32
            /// `bufs[i]` in place over the ranks of the job this backend joined (NCCL on the CUDA
            /// backend), ordered after the work queued so far; the work queued after it may run
            /// beside it (the backward of the layers below) until [`Backend::wait_ranks`], and
            /// must not touch `bufs` before. False when it joined none: the caller then sums
            /// through the host collectives.
            fn all_reduce_sum_ranks(&self, _bufs: &mut [Self::Buf], _lens: &[usize]) -> Result<bool> {
                Ok(false)
            }
            /// Orders the work queued from now on after every `all_reduce_sum_ranks` and
            /// `reduce_sum_ranks` queued so far.
            fn wait_ranks(&self) -> Result<()> {
                Ok(())
            }
            /// ZeRO-1's reduce-scatter on the device: each F32 `bufs[i]` summed over the ranks
            /// into rank `roots[i]` (the others' copies are left unspecified), beside the work
            /// queued after it until [`Backend::wait_ranks`], as `all_reduce_sum_ranks`. False
            /// as above.
            fn reduce_sum_ranks(&self, _bufs: &mut [Self::Buf], _lens: &[usize], _roots: &[usize]) -> Result<bool> {
                Ok(false)
            }
            /// ZeRO-1's all-gather on the device: each `bufs[i]` (of either precision) copied from
            /// rank `roots[i]` to every rank, ordered before the work queued after it. False as
            /// above.
            fn broadcast_ranks(&self, _bufs: &mut [Self::Buf], _lens: &[usize], _roots: &[usize]) -> Result<bool> {
                Ok(false)
            }

            $($(#[$meta])* fn $name(&self $(, $arg: $ty)*) -> $ret;)*
        }
    };
}
backend_ops!(declare_backend);

/// Inverted dropout with the counter-based mask of [`Backend::dropout`]: element `i` of the
/// flat buffer is zeroed when `rng::uniform(seed, i) < p`, else scaled by `1/(1-p)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

impl Dropout {
    /// Fails unless `p` is in [0, 1).
    pub fn check(&self, op: &str) -> Result<()> {
        anyhow::ensure!((0.0..1.0).contains(&self.p), "{op}: dropout p = {} is outside [0, 1)", self.p);
        Ok(())
    }
}

/// The masked branch gradient that [`Backend::rmsnorm_backward`] writes besides `dx`.
pub struct BranchGrad<'a, B: Backend + ?Sized> {
    /// `[n, d]`, overwritten with `dropout(dx)`.
    pub out: &'a mut B::Buf,
    /// The mask of the forward's `residual_rmsnorm_forward` (same p and seed).
    pub dropout: Dropout,
}

/// The rotary embedding that [`Backend::attention_backward`]'s q and k went through.
pub struct RopeGrad<'a, B: Backend + ?Sized> {
    /// The micro-batch's table from [`Backend::rope_table`].
    pub table: &'a B::Buf,
    pub style: RopeStyle,
}

/// The gradient outputs of [`Backend::lm_head_cross_entropy`].
pub struct LossGrads<'a, B: Backend + ?Sized> {
    pub dx: &'a mut B::Buf,
    pub dw: &'a mut B::Buf,
    /// Multiplies the gradient of the loss sum: `1 / supervised tokens of the optimizer step`.
    pub loss_scale: f32,
    /// Whether `dw` is written or added to.
    pub mode: GradMode,
}

/// [`Backend::lm_head_cross_entropy`] from host targets (`ignore_id` marks unsupervised rows),
/// returning the loss sum: lists the supervised rows, uploads them, allocates the losses and
/// reads their sum back. For tests and tools; the training step keeps its buffers and reads
/// nothing.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_sum<B: Backend>(
    be: &B,
    x: &B::Buf,
    w: &B::Buf,
    targets: &[u32],
    ignore_id: u32,
    n: usize,
    d: usize,
    vocab: usize,
    grads: Option<LossGrads<'_, B>>,
) -> Result<f64> {
    anyhow::ensure!(targets.len() >= n, "cross_entropy_sum: {} targets for {n} rows", targets.len());
    let (rows, sup_targets) = supervised_rows(&targets[..n], ignore_id, vocab)?;
    let n_sup = rows.len();
    let mut rows_d = be.zeros_ids(n_sup)?;
    be.write_ids(&mut rows_d, &rows)?;
    let mut targets_d = be.zeros_ids(n_sup)?;
    be.write_ids(&mut targets_d, &sup_targets)?;
    let mut losses = be.zeros(n_sup, Precision::F32)?;
    be.lm_head_cross_entropy(x, w, &rows_d, &targets_d, n_sup, n, d, vocab, &mut losses, grads)?;
    let mut out = be.zeros(STATS_LEN, Precision::F32)?;
    be.sum_into(&mut out, stats::MICRO_LOSS, &losses, n_sup, GradMode::Overwrite)?;
    Ok(stats::join(&be.read(&out, STATS_LEN)?, stats::MICRO_LOSS))
}

/// [`Backend::sum_squares`], read back (for tests and tools).
pub fn sum_squares_read<B: Backend>(be: &B, bufs: &[&B::Buf], lens: &[usize]) -> Result<f64> {
    let mut out = be.zeros(STATS_LEN, Precision::F32)?;
    be.sum_squares(bufs, lens, &mut out)?;
    Ok(stats::join(&be.read(&out, STATS_LEN)?, stats::SUMSQ))
}

#[cfg(test)]
mod tests {
    use super::{group_tokens_by_id, stats, supervised_rows, token_groups};

    #[test]
    fn tokens_are_grouped_by_id_in_token_order() {
        let ids = [5, 2, 5, 7, 2, 5];
        let (groups, n_groups) = group_tokens_by_id(&ids);
        let (order, start, id) = token_groups(&groups, ids.len(), n_groups).unwrap();
        assert_eq!(id, &[2, 5, 7]);
        assert_eq!(start, &[0, 2, 5, 6]);
        assert_eq!(order, &[1, 4, 0, 2, 5, 3]);
        assert!(token_groups(&groups[..5], ids.len(), n_groups).is_err());
    }

    #[test]
    fn only_supervised_rows_are_kept_and_targets_are_checked() {
        let (rows, targets) = supervised_rows(&[2, 9, 2, 0, 4], 2, 10).unwrap();
        assert_eq!(rows, vec![1, 3, 4]);
        assert_eq!(targets, vec![9, 0, 4]);
        let err = supervised_rows(&[2, 10], 2, 10).unwrap_err().to_string();
        assert!(err.contains("row 1 has target 10"), "{err}");
    }

    #[test]
    fn a_split_f64_comes_back_whole_through_f32() {
        for x in [0.0, 1.0 / 3.0, 12_345.678_901_234_5, -7.25e-3, 3.0e7 + 0.123, std::f64::consts::PI * 1e5] {
            let back = stats::join(&stats::split(x), 0);
            assert_eq!(back, x, "{x}");
        }
    }
}
