//! The model's forward and backward passes, written once against [`Backend`].
//!
//! Every buffer is allocated in [`Model::new`] for `max_tokens` rows; a step only launches ops.
//! Pre-norm blocks:
//! `h = x + dropout(o(attn(rope(qkv(norm(x))))))`, `x' = h + dropout(down(swiglu(gate_up(norm(h)))))`,
//! then a final norm and the lm_head fused with the masked cross-entropy.
//!
//! With activation recompute ([`Recompute`]) the backward reruns a layer's forward (or its FFN's
//! first half) through the same `LayerCx` code the forward runs, from what was kept, into one
//! scratch set of activations: less memory, the same values.

use super::config::ModelConfig;
use super::lora::{self, LoraConfig, LoraState, Site};
use super::params::{self, NamedTensor, ParamIndex, ParamSpec};
use super::recompute::Recompute;
use crate::backend::{
    group_tokens_by_id, profile, stats, supervised_rows, AdamW, Backend, BranchGrad, Clip, Dropout, GradMode,
    LossGrads, Precision, RopeGrad, StateDtype, STATS_LEN,
};
use crate::data::batch::Batch;
use crate::dist::OptimizerLayout;
use crate::rng::Rng;
use anyhow::{bail, ensure, Context, Result};
use std::collections::HashMap;
use std::ops::Range;

mod grad_buckets;
mod zero;

pub use grad_buckets::grad_buckets;

/// The attention block's activations of one layer that backward needs (and the FFN's input).
struct AttnActs<B: Backend> {
    /// `[n, qkv_width]`, after RoPE.
    qkv: B::Buf,
    /// Attention output `[n, q_width]`.
    att: B::Buf,
    /// Attention logsumexp `[n_heads, n]` (F32).
    lse: B::Buf,
    /// Residual stream after the attention block `[n, d]`.
    h: B::Buf,
    /// `ffn_norm(h)` `[n, d]` and its reciprocal std `[n]` (F32).
    ln2: B::Buf,
    rstd2: B::Buf,
}

/// The FFN's activations of one layer that backward needs.
struct MlpActs<B: Backend> {
    /// `[n, 2·hidden]`.
    gate_up: B::Buf,
    /// `silu(gate) · up` `[n, hidden]`.
    swi: B::Buf,
}

/// Forward activations. What a layer does not keep ([`Recompute`]) lives in one scratch slot
/// (index 0) that every layer's forward overwrites and the backward refills by recomputing.
struct Activations<B: Backend> {
    recompute: Recompute,
    /// `resid[l]` is the residual stream entering layer `l`; `resid[n_layers]` leaves the last.
    resid: Vec<B::Buf>,
    /// `ln_in[l] = attn_norm_l(resid[l])`; `ln_in[n_layers]` is the final norm's output. With
    /// `layer` recompute one slot, whose last write is the final norm's output.
    ln_in: Vec<B::Buf>,
    rstd_in: Vec<B::Buf>,
    /// One per layer, or one scratch slot with `layer` recompute.
    attn: Vec<AttnActs<B>>,
    /// One per layer, or one scratch slot with `mlp` or `layer` recompute.
    mlp: Vec<MlpActs<B>>,
    /// Output of a block's last projection before it joins the residual stream.
    delta: B::Buf,
}

/// The slot of layer `l`'s activations: its own when kept, else the shared scratch.
fn slot(kept: bool, l: usize) -> usize {
    if kept {
        l
    } else {
        0
    }
}

impl<B: Backend> Activations<B> {
    /// The slot of `ln_in`/`rstd_in` for layer `l` (`n_layers`: the final norm).
    fn norm(&self, l: usize) -> usize {
        slot(self.recompute.keeps_attention(), l)
    }
}

/// Gradients of activations: scratch reused by every layer.
struct ActGrads<B: Backend> {
    /// Gradient of the residual stream.
    dresid: B::Buf,
    /// Gradient of a block's output with dropout (`dresid` through the dropout mask, written by
    /// the norm backward that completes `dresid`; without dropout the backward reads `dresid`).
    ddelta: B::Buf,
    /// Gradient of a norm's output.
    dln: B::Buf,
    dswi: B::Buf,
    dgate_up: B::Buf,
    datt: B::Buf,
    dqkv: B::Buf,
}

/// Token-level inputs of a micro-batch, on the device, with what the host worked out from them
/// when it loaded the batch (so that no op reads ids back).
struct IdBufs<B: Backend> {
    inputs: B::Ids,
    positions: B::Ids,
    cu_seqlens: B::Ids,
    /// RoPE's `(cos, sin)` per row and pair `[n, head_dim]` (F32), built from `positions` once
    /// per forward and read by every layer, forward and backward.
    rope_table: B::Buf,
    /// The supervised rows and their targets (`supervised_rows`): `n_sup` of each.
    sup_rows: B::Ids,
    sup_targets: B::Ids,
    n_sup: usize,
    /// The input tokens grouped by id for the embedding backward (`group_tokens_by_id`, 3n + 1).
    emb_groups: B::Ids,
    n_groups: usize,
}

/// The loss sum and the gradient norm of one optimizer step, read from the device at its end.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// The sum of the supervised losses of the step's micro-batches.
    pub loss_sum: f64,
    /// The global gradient norm before clipping (not finite: the update was skipped).
    pub grad_norm: f64,
}

/// Keys and values of earlier positions, for generation with [`Model::next_logits`].
pub struct KvCache<B: Backend> {
    k: Vec<B::Buf>,
    v: Vec<B::Buf>,
    len: usize,
    max_len: usize,
}

impl<B: Backend> KvCache<B> {
    /// Number of positions already fed.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the cache can hold.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Forgets every position (the buffers stay allocated).
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

/// How attention sees the other tokens.
enum AttnMode<'a, B: Backend> {
    /// Training/evaluation: causal inside the batch's segments (`cu_seqlens` in the id buffers).
    Segments { n_segments: usize },
    /// Generation: the new rows attend to the cache, into which they are written at `start`.
    Cache { k: &'a mut [B::Buf], v: &'a mut [B::Buf], start: usize },
}

/// A decoder with its parameters, gradients, optimizer state and activation buffers.
pub struct Model<B: Backend> {
    backend: B,
    config: ModelConfig,
    max_tokens: usize,
    specs: Vec<ParamSpec>,
    index: ParamIndex,
    lens: Vec<usize>,
    /// Weights in the compute precision (what the ops read).
    params: Vec<B::Buf>,
    /// F32 master weights, gradients, and Adam moments, one per parameter tensor; under ZeRO-1
    /// `master`, `m` and `v` hold only the tensors of [`Model::state_tensors`], from its start.
    master: Vec<B::Buf>,
    grads: Vec<B::Buf>,
    m: Vec<B::Buf>,
    v: Vec<B::Buf>,
    /// ZeRO-1: which rank holds which tensors' optimizer state (None: this model holds all).
    shards: Option<crate::dist::OptimizerShards>,
    /// The storage type of `m` and `v` (`--optimizer-state`).
    moments: StateDtype,
    /// False for an inference-only model: no master weights, gradients or moments.
    training: bool,
    acts: Activations<B>,
    act_grads: ActGrads<B>,
    ids: IdBufs<B>,
    /// One row of logits, for generation.
    logits: B::Buf,
    /// Low-rank adapters; with them the base is frozen (no master weights, gradients or moments).
    lora: Option<LoraState<B>>,
    /// The supervised rows' losses of the last micro-batch (F32, on the device).
    row_losses: B::Buf,
    /// The sums the host reads once per step (F32, [`stats`] slots).
    stats: B::Buf,
    /// Nothing accumulated since [`Model::zero_grads`]: the next backward writes the gradients
    /// (and the step's loss sum) instead of adding to them, so they are never zeroed in a step.
    fresh: bool,
}

/// The dropout seed of one site (0: attention output, 1: FFN output) of one layer: forward and
/// backward derive the same one, so backward reapplies forward's mask.
fn site_seed(seed: u64, layer: usize, site: usize) -> u64 {
    Rng::new(seed).fork((2 * layer + site) as u64).seed
}

/// The weight-gradient buffer of base tensor `i`; with a frozen base (LoRA), the scratch into
/// which the fused ops (RMSNorm, lm_head + cross-entropy) still write theirs.
fn weight_grad<'a, B: Backend>(
    g: &'a mut [B::Buf],
    lora: &'a mut Option<LoraState<B>>,
    i: usize,
    head: bool,
) -> &'a mut B::Buf {
    match lora {
        None => &mut g[i],
        Some(l) => {
            let scratch = if head { &mut l.discard_head } else { &mut l.discard_norm };
            scratch.as_mut().expect("a training model's adapters have the frozen-gradient scratch")
        }
    }
}

/// The backward of base projection `wi` at `site` (layer, site, dropout seed): `dinp` from `dout`.
/// With LoRA, the adapters' gradients and input gradient first, then the frozen weight's input
/// gradient added onto it, with no weight-gradient GEMM.
#[allow(clippy::too_many_arguments)]
fn projection_backward<B: Backend>(
    be: &B,
    lora: &mut Option<LoraState<B>>,
    g: &mut [B::Buf],
    p: &[B::Buf],
    wi: usize,
    (layer, site, seed): (usize, Site, Option<u64>),
    dinp: &mut B::Buf,
    dout: &B::Buf,
    inp: &B::Buf,
    n: usize,
    in_dim: usize,
    out_dim: usize,
    mode: GradMode,
) -> Result<()> {
    match lora {
        None => be.matmul_backward(Some(dinp), &mut g[wi], dout, inp, &p[wi], n, in_dim, out_dim, mode),
        Some(lora) => {
            let wrote = lora.backward_site(be, layer, site, dout, inp, dinp, n, seed)?;
            be.matmul_backward_slice(
                Some(dinp),
                None,
                dout,
                inp,
                &p[wi],
                n,
                in_dim,
                out_dim,
                out_dim,
                0,
                1.0,
                if wrote { GradMode::Accumulate } else { GradMode::Overwrite },
            )
        }
    }
}

/// The masked branch gradient for a norm backward, when the branch had dropout.
fn branch<B: Backend>(out: &mut B::Buf, mask: Option<Dropout>) -> Option<BranchGrad<'_, B>> {
    mask.map(|dropout| BranchGrad { out, dropout })
}

/// What [`Model::new`] allocates: `(fixed, per_token)` bytes, where `fixed` is the parameters'
/// copies (compute weights; f32 master, gradient and two moments) and `per_token` the activation
/// and scratch rows per token position. It mirrors the allocations in `new`; a backend's own work
/// buffers (attention, loss chunks, GEMM workspace) come on top. Saturating: a validated config
/// cannot overflow, and an absurd one gives a need no memory holds.
pub fn memory_bytes(config: &ModelConfig, compute_bytes: usize) -> (usize, usize) {
    memory_bytes_for(config, compute_bytes, true)
}

/// [`memory_bytes`] of a training model, or of an inference-only one (`training` false: no
/// master weights, gradients or moments).
pub fn memory_bytes_for(config: &ModelConfig, compute_bytes: usize, training: bool) -> (usize, usize) {
    memory_bytes_opts(config, compute_bytes, training, Recompute::None, StateDtype::F32)
}

/// Data parallelism's all-reduce of the base's gradients or the adapters': on the device where
/// the backend has joined the ranks (NCCL), else the buffers of `lens` elements concatenated in
/// order into one host f32 buffer, through `reduce`, and written back.
pub(crate) fn reduce_flat<B: Backend>(
    be: &B,
    bufs: &mut [B::Buf],
    lens: &[usize],
    reduce: impl FnOnce(&mut [f32]) -> Result<()>,
) -> Result<()> {
    start_reduce_flat(be, bufs, lens, reduce)?;
    be.wait_ranks()
}

/// [`reduce_flat`] without the wait: on the device the sum runs beside the work queued after it
/// until [`Backend::wait_ranks`] (through the host it is done on return).
pub(crate) fn start_reduce_flat<B: Backend>(
    be: &B,
    bufs: &mut [B::Buf],
    lens: &[usize],
    reduce: impl FnOnce(&mut [f32]) -> Result<()>,
) -> Result<()> {
    if be.all_reduce_sum_ranks(bufs, lens)? {
        return Ok(());
    }
    reduce_flat_into(be, bufs, lens, 0..bufs.len(), reduce)
}

/// [`reduce_flat`] writing back only the buffers `keep` (a reduce-scatter's result is valid in
/// this rank's segment only).
pub(crate) fn reduce_flat_into<B: Backend>(
    be: &B,
    bufs: &mut [B::Buf],
    lens: &[usize],
    keep: Range<usize>,
    reduce: impl FnOnce(&mut [f32]) -> Result<()>,
) -> Result<()> {
    let mut flat = Vec::with_capacity(lens.iter().sum());
    for (g, &len) in bufs.iter().zip(lens) {
        flat.extend(be.read(g, len)?);
    }
    reduce(&mut flat)?;
    let mut at = 0;
    for (i, (g, &len)) in bufs.iter_mut().zip(lens).enumerate() {
        if keep.contains(&i) {
            be.write(g, &flat[at..at + len])?;
        }
        at += len;
    }
    Ok(())
}

/// Bytes of one AdamW moment element: bf16 moments take 2 bytes on a device backend, but a
/// backend computing in a wider type (the CPU, `compute_bytes` 4) stores them in that type.
pub fn moment_bytes(compute_bytes: usize, moments: StateDtype) -> usize {
    match moments {
        StateDtype::F32 => 4,
        StateDtype::Bf16 => StateDtype::Bf16.bytes().max(compute_bytes),
    }
}

/// [`memory_bytes_for`] with the activations that `recompute` keeps (a layer's attention-block
/// activations and its FFN's, each per layer or in one scratch slot; see `Activations`) and
/// the optimizer state `state` says (the moments' type; under ZeRO-1, this rank's share).
pub fn memory_bytes_opts(
    config: &ModelConfig,
    compute_bytes: usize,
    training: bool,
    recompute: Recompute,
    state: impl Into<OptimizerLayout>,
) -> (usize, usize) {
    let state = state.into();
    let n_params = config.n_params();
    // Gradients in fp32 for every parameter; master weights in fp32 and two moments for the
    // parameters whose state is here.
    let (per_param, held) = match training {
        true => (compute_bytes + 4, state.held(&params::param_lens(config))),
        false => (compute_bytes, 0),
    };
    let per_held = 4 + 2 * moment_bytes(compute_bytes, state.moments);
    let fixed = n_params
        .saturating_mul(per_param)
        .saturating_add(held.saturating_mul(per_held))
        .saturating_add(config.vocab_size * compute_bytes);
    (fixed, activation_bytes_per_token(config, compute_bytes, recompute))
}

/// The activation and scratch bytes per token position that [`Model::new`] allocates with
/// `recompute`.
pub fn activation_bytes_per_token(config: &ModelConfig, compute_bytes: usize, recompute: Recompute) -> usize {
    let (d, hidden, l) = (config.d_model, config.ffn_hidden, config.n_layers);
    let heads = config.heads();
    let c = compute_bytes;
    let slots = |kept: bool| if kept { l } else { 1 };
    let attn = c * (heads.qkv_width() + heads.q_width() + 2 * d) + 4 * (heads.n_heads + 1);
    let mlp = c * 3 * hidden;
    let norms = if recompute.keeps_attention() { l + 1 } else { 1 };
    let stream = (l + 1) * d * c + norms * (d * c + 4) + d * c;
    let grads = c * (3 * d + 3 * hidden + heads.q_width() + heads.qkv_width());
    // inputs, positions, cu_seqlens, supervised rows and targets, 3 for the embedding groups;
    // the row losses (F32); RoPE's (cos, sin) table (F32, head_dim per token).
    let ids = 8 * 4 + 4 + 4 * heads.head_dim;
    slots(recompute.keeps_attention()) * attn + slots(recompute.keeps_mlp()) * mlp + stream + grads + ids
}

/// [`memory_bytes_for`] of a model with `lora` adapters: its base then holds the compute
/// weights only (no master weights, gradients or moments), the adapters what
/// [`lora::extra_memory_bytes`] says.
pub fn memory_bytes_lora(
    config: &ModelConfig,
    compute_bytes: usize,
    training: bool,
    lora: Option<&LoraConfig>,
) -> (usize, usize) {
    memory_bytes_with(config, compute_bytes, training, lora, Recompute::None, StateDtype::F32)
}

/// [`memory_bytes_lora`] with `recompute` and the base's optimizer state as `state` says (the
/// adapters' moments are always fp32: they are small).
pub fn memory_bytes_with(
    config: &ModelConfig,
    compute_bytes: usize,
    training: bool,
    lora: Option<&LoraConfig>,
    recompute: Recompute,
    state: impl Into<OptimizerLayout>,
) -> (usize, usize) {
    let Some(lora) = lora else {
        return memory_bytes_opts(config, compute_bytes, training, recompute, state);
    };
    let (fixed, per_token) = memory_bytes_opts(config, compute_bytes, false, recompute, StateDtype::F32);
    let (extra_fixed, extra_token) = lora::extra_memory_bytes(lora, config, compute_bytes, training);
    (fixed.saturating_add(extra_fixed), per_token + extra_token)
}

const GIB: f64 = (1u64 << 30) as f64;

/// The largest micro-batch (rows of `seq_len`) whose buffers fit in nine tenths of `free` bytes
/// (the last tenth stays for the backend's own work buffers).
pub fn micro_batch_that_fits(
    config: &ModelConfig,
    compute_bytes: usize,
    seq_len: usize,
    free: usize,
) -> usize {
    fits_in(memory_bytes(config, compute_bytes), seq_len, free)
}

/// [`micro_batch_that_fits`] of a training model with `lora` adapters (None: without) and
/// `recompute`.
pub fn micro_batch_that_fits_with(
    config: &ModelConfig,
    compute_bytes: usize,
    seq_len: usize,
    free: usize,
    lora: Option<&LoraConfig>,
    recompute: Recompute,
    state: impl Into<OptimizerLayout>,
) -> usize {
    fits_in(memory_bytes_with(config, compute_bytes, true, lora, recompute, state), seq_len, free)
}

/// The least recompute with which a micro-batch of `at_least` rows of `seq_len` fits in `free`
/// bytes, and the largest micro-batch that fits with it; None when not even `layer` fits one.
pub fn least_recompute_that_fits(
    config: &ModelConfig,
    compute_bytes: usize,
    seq_len: usize,
    free: usize,
    lora: Option<&LoraConfig>,
    at_least: usize,
    state: impl Into<OptimizerLayout>,
) -> Option<(Recompute, usize)> {
    let state = state.into();
    Recompute::ALL.into_iter().find_map(|r| {
        let fits = micro_batch_that_fits_with(config, compute_bytes, seq_len, free, lora, r, state);
        (fits >= at_least.max(1)).then_some((r, fits))
    })
}

/// [`memory_advice`] of a training model with `lora` adapters (None: without) and `recompute`.
#[allow(clippy::too_many_arguments)]
pub fn memory_advice_with(
    device: &str,
    config: &ModelConfig,
    compute_bytes: usize,
    micro_batch: usize,
    seq_len: usize,
    free: usize,
    lora: Option<&LoraConfig>,
    recompute: Recompute,
    state: impl Into<OptimizerLayout>,
) -> Option<String> {
    let state = state.into();
    let bytes = memory_bytes_with(config, compute_bytes, true, lora, recompute, state);
    let advice = advice_for(device, bytes, micro_batch, seq_len, free)?;
    // Name the recompute that would let the asked micro-batch fit, when one would.
    let hint = Recompute::ALL.into_iter().filter(|&r| r > recompute).find(|&r| {
        micro_batch_that_fits_with(config, compute_bytes, seq_len, free, lora, r, state) >= micro_batch
    });
    Some(match hint {
        Some(r) => {
            format!("{advice}; or recompute {r} (--recompute {r}) would fit micro_batch {micro_batch}")
        }
        None => advice,
    })
}

fn fits_in((fixed, per_token): (usize, usize), seq_len: usize, free: usize) -> usize {
    (free / 10 * 9).saturating_sub(fixed) / per_token.saturating_mul(seq_len).max(1)
}

/// `None` when micro-batches of `micro_batch` × `seq_len` fit in `free` bytes; else the error
/// message: what they need, what is free, and which micro-batch would fit.
pub fn memory_advice(
    device: &str,
    config: &ModelConfig,
    compute_bytes: usize,
    micro_batch: usize,
    seq_len: usize,
    free: usize,
) -> Option<String> {
    advice_for(device, memory_bytes(config, compute_bytes), micro_batch, seq_len, free)
}

fn advice_for(
    device: &str,
    (fixed, per_token): (usize, usize),
    micro_batch: usize,
    seq_len: usize,
    free: usize,
) -> Option<String> {
    let fits = fits_in((fixed, per_token), seq_len, free);
    if fits >= micro_batch {
        return None;
    }
    let activations = per_token.saturating_mul(seq_len).saturating_mul(micro_batch);
    let memory = if device.starts_with("cpu") { "host memory" } else { "device memory" };
    let what = if fits == 0 && fixed >= free {
        format!(
            "not even micro_batch 1 fits: the weights, gradients and AdamW state alone exceed the free \
             {memory}; use LoRA (--lora), bf16 AdamW moments (--optimizer-state bf16), a smaller model or \
             more {memory}"
        )
    } else if fits == 0 {
        format!(
            "not even micro_batch 1 fits: shorten the rows (--max-seq-len; --seq-len in sft plan and sft \
             bench), keep fewer activations (--recompute mlp or layer), or use a smaller model or more \
             {memory}"
        )
    } else {
        format!("micro_batch {fits} would fit (raise grad_accum to keep the step's size)")
    };
    Some(format!(
        "out of memory on {device}: micro-batches of {micro_batch} × {seq_len} tokens need about {:.2} GiB \
         ({:.2} GiB of weights, gradients and AdamW state + {:.2} GiB of activations), {:.2} GiB of {memory} \
         are free; {what}",
        fixed.saturating_add(activations) as f64 / GIB,
        fixed as f64 / GIB,
        activations as f64 / GIB,
        free as f64 / GIB
    ))
}

/// A branch's output projection: LoRA site, weight index, input (`in_dim` wide), and which of
/// the layer's two dropout sites (0: attention, 1: FFN) masks it.
struct Branch<'a, B: Backend> {
    site: Site,
    w: usize,
    inp: &'a B::Buf,
    in_dim: usize,
    dropout_site: usize,
}

/// What a layer's forward reads besides its activations: the recompute in the backward runs
/// the same code on the same inputs as the forward, so it writes the same values.
struct LayerCx<'a, B: Backend> {
    be: &'a B,
    cfg: &'a ModelConfig,
    idx: &'a ParamIndex,
    p: &'a [B::Buf],
    ids: &'a IdBufs<B>,
    n: usize,
    dropout_seed: Option<u64>,
}

impl<B: Backend> LayerCx<'_, B> {
    /// The dropout of `site` (0: attention output, 1: FFN output) of `layer`, when on.
    fn dropout(&self, layer: usize, site: usize) -> Option<Dropout> {
        let p = self.cfg.dropout;
        self.dropout_seed.filter(|_| p > 0.0).map(|seed| Dropout { p, seed: site_seed(seed, layer, site) })
    }

    /// Layer `l`'s attention block from its normed input `ln` and the residual stream `resid`
    /// entering it: `la` (qkv, attention, `h`, `ffn_norm(h)`), `delta` used as scratch.
    #[allow(clippy::too_many_arguments)]
    fn attention_block(
        &self,
        lora: &mut Option<LoraState<B>>,
        attn: &mut AttnMode<'_, B>,
        l: usize,
        ln: &B::Buf,
        resid: &B::Buf,
        la: &mut AttnActs<B>,
        delta: &mut B::Buf,
    ) -> Result<()> {
        let LayerCx { be, cfg, idx, p, ids, n, dropout_seed } = *self;
        let (d, heads, rope) = (cfg.d_model, cfg.heads(), cfg.rope());
        let w = idx.layers[l];
        be.matmul_forward(&mut la.qkv, ln, &p[w.qkv], n, d, heads.qkv_width())?;
        if let Some(lora) = lora.as_mut() {
            lora.forward_site(be, l, Site::Qkv, &mut la.qkv, ln, n, dropout_seed)?;
        }
        be.rope_forward(&mut la.qkv, &ids.rope_table, n, heads, rope.style)?;
        match attn {
            AttnMode::Segments { n_segments } => be.attention_forward(
                &mut la.att,
                &mut la.lse,
                &la.qkv,
                &ids.cu_seqlens,
                *n_segments,
                n,
                heads,
            )?,
            AttnMode::Cache { k, v, start } => {
                be.attention_decode(&mut la.att, &la.qkv, &mut k[l], &mut v[l], *start, n, heads)?
            }
        }
        let AttnActs { att, h, ln2, rstd2, .. } = la;
        let branch = Branch { site: Site::O, w: w.o, inp: att, in_dim: heads.q_width(), dropout_site: 0 };
        self.residual_branch(lora, l, branch, resid, h, (ln2, rstd2, w.ffn_norm), delta)
    }

    /// The residual stream past a branch, and the next norm of it: `resid_out = resid_in +
    /// dropout(inp·wᵀ)` (LoRA's product added to the projection's), then `ln = rmsnorm(resid_out)`
    /// with the weight `p[norm_w]`, saving `rstd`. Without dropout the residual rides in the
    /// projection's GEMM (beta 1 over `resid_in`) and a plain norm follows; with it the projection
    /// goes to `delta` and one kernel adds its masked values and norms.
    #[allow(clippy::too_many_arguments)]
    fn residual_branch(
        &self,
        lora: &mut Option<LoraState<B>>,
        l: usize,
        branch: Branch<'_, B>,
        resid_in: &B::Buf,
        resid_out: &mut B::Buf,
        (ln, rstd, norm_w): (&mut B::Buf, &mut B::Buf, usize),
        delta: &mut B::Buf,
    ) -> Result<()> {
        let LayerCx { be, cfg, p, n, dropout_seed, .. } = *self;
        let Branch { site, w, inp, in_dim, dropout_site } = branch;
        let d = cfg.d_model;
        let Some(dropout) = self.dropout(l, dropout_site) else {
            be.matmul_forward_residual(resid_out, resid_in, inp, &p[w], n, in_dim, d)?;
            if let Some(lora) = lora.as_mut() {
                lora.forward_site(be, l, site, resid_out, inp, n, dropout_seed)?;
            }
            return be.rmsnorm_forward(ln, rstd, resid_out, &p[norm_w], n, d, cfg.norm_eps);
        };
        be.matmul_forward(delta, inp, &p[w], n, in_dim, d)?;
        if let Some(lora) = lora.as_mut() {
            lora.forward_site(be, l, site, delta, inp, n, dropout_seed)?;
        }
        be.residual_rmsnorm_forward(
            resid_out,
            ln,
            rstd,
            resid_in,
            delta,
            &p[norm_w],
            n,
            d,
            cfg.norm_eps,
            Some(dropout),
        )
    }

    /// Layer `l`'s FFN up to the SwiGLU output, from its normed input `ln2`.
    fn mlp(
        &self,
        lora: &mut Option<LoraState<B>>,
        l: usize,
        ln2: &B::Buf,
        ma: &mut MlpActs<B>,
    ) -> Result<()> {
        let LayerCx { be, cfg, idx, p, n, dropout_seed, .. } = *self;
        let (d, hidden) = (cfg.d_model, cfg.ffn_hidden);
        be.matmul_forward(&mut ma.gate_up, ln2, &p[idx.layers[l].gate_up], n, d, 2 * hidden)?;
        if let Some(lora) = lora.as_mut() {
            lora.forward_site(be, l, Site::GateUp, &mut ma.gate_up, ln2, n, dropout_seed)?;
        }
        be.swiglu_forward(&mut ma.swi, &ma.gate_up, n, hidden)
    }
}

impl<B: Backend> Model<B> {
    /// [`Model::new`] for micro-batches of `micro_batch` rows of `seq_len` tokens, checked first
    /// against the device's free memory: when it does not fit, the error says how much it needs
    /// and which micro-batch size would fit.
    pub fn for_micro_batches(
        backend: B,
        config: ModelConfig,
        micro_batch: usize,
        seq_len: usize,
    ) -> Result<Self> {
        Self::for_micro_batches_with(
            backend,
            config,
            micro_batch,
            seq_len,
            None,
            Recompute::None,
            StateDtype::F32,
        )
    }

    /// [`Model::for_micro_batches`] with LoRA adapters when `lora` is given, keeping the
    /// activations that `recompute` says.
    pub fn for_micro_batches_with(
        backend: B,
        config: ModelConfig,
        micro_batch: usize,
        seq_len: usize,
        lora: Option<&LoraConfig>,
        recompute: Recompute,
        state: impl Into<OptimizerLayout>,
    ) -> Result<Self> {
        let state = state.into();
        let compute_bytes = backend.compute_bytes();
        let info = backend.memory_info()?;
        let device = backend.name();
        let bytes = memory_bytes_with(&config, compute_bytes, true, lora, recompute, state);
        if let Some((free, _)) = info {
            if let Some(message) = memory_advice_with(
                &device,
                &config,
                compute_bytes,
                micro_batch,
                seq_len,
                free,
                lora,
                recompute,
                state,
            ) {
                bail!(message);
            }
        }
        let (fixed, per_token) = bytes;
        let need = fixed.saturating_add(per_token.saturating_mul(seq_len).saturating_mul(micro_batch));
        let max_tokens = micro_batch.checked_mul(seq_len).context("micro_batch × max_seq_len overflows")?;
        Model::build(backend, config, max_tokens, true, lora, recompute, state).map_err(|e| match info {
            // The estimate said it fits, yet an allocation failed (the backend's own buffers,
            // another process): name a smaller micro-batch all the same.
            Some((free, _)) => e.context(format!(
                "out of memory on {device}: micro-batches of {micro_batch} × {seq_len} tokens need about \
                 {:.2} GiB by our estimate and {:.2} GiB were free; try micro_batch {}",
                need as f64 / GIB,
                free as f64 / GIB,
                (micro_batch / 2).max(1)
            )),
            None => e,
        })
    }

    /// Allocates every buffer for micro-batches of up to `max_tokens` token positions.
    /// Parameters start at zero: call [`Model::init_params`] or [`Model::write_params`].
    pub fn new(backend: B, config: ModelConfig, max_tokens: usize) -> Result<Self> {
        Self::build(backend, config, max_tokens, true, None, Recompute::None, StateDtype::F32)
    }

    /// [`Model::new`] (or [`Model::with_lora`] for training when `lora` is given) keeping the
    /// activations that `recompute` says (the gradients are the same, the memory less), the AdamW
    /// moments stored as `moments` says. bf16 moments are for full fine-tuning: adapters keep
    /// fp32 moments, so bf16 with `lora` is an error.
    pub fn for_training(
        backend: B,
        config: ModelConfig,
        max_tokens: usize,
        lora: Option<&LoraConfig>,
        recompute: Recompute,
        state: impl Into<OptimizerLayout>,
    ) -> Result<Self> {
        Self::build(backend, config, max_tokens, true, lora, recompute, state.into())
    }

    /// [`Model::for_training`] with fp32 moments.
    pub fn with_recompute(
        backend: B,
        config: ModelConfig,
        max_tokens: usize,
        lora: Option<&LoraConfig>,
        recompute: Recompute,
    ) -> Result<Self> {
        Self::for_training(backend, config, max_tokens, lora, recompute, StateDtype::F32)
    }

    /// [`Model::for_training`] keeping every activation.
    pub fn new_training(
        backend: B,
        config: ModelConfig,
        max_tokens: usize,
        lora: Option<&LoraConfig>,
        moments: StateDtype,
    ) -> Result<Self> {
        Self::for_training(backend, config, max_tokens, lora, Recompute::None, moments)
    }

    /// [`Model::new`] or [`Model::new_inference`] with LoRA adapters (zero until written or
    /// initialized): a training model then trains the adapters only, the base frozen.
    pub fn with_lora(
        backend: B,
        config: ModelConfig,
        max_tokens: usize,
        training: bool,
        lora: &LoraConfig,
    ) -> Result<Self> {
        Self::build(backend, config, max_tokens, training, Some(lora), Recompute::None, StateDtype::F32)
    }

    /// A model for evaluation and generation only: weights in the compute precision and the
    /// activations, without the f32 master weights, gradients and AdamW moments (a fifth of a
    /// training model's parameter memory on the CPU, a ninth on the GPU). Training calls on it
    /// are errors.
    pub fn new_inference(backend: B, config: ModelConfig, max_tokens: usize) -> Result<Self> {
        Self::build(backend, config, max_tokens, false, None, Recompute::None, StateDtype::F32)
    }

    fn build(
        backend: B,
        config: ModelConfig,
        max_tokens: usize,
        training: bool,
        lora: Option<&LoraConfig>,
        recompute: Recompute,
        state: impl Into<OptimizerLayout>,
    ) -> Result<Self> {
        let state = state.into();
        let moments = state.moments;
        config.validate().context("invalid model config")?;
        ensure!(max_tokens > 0, "max_tokens must be positive");
        ensure!(
            lora.is_none() || moments == StateDtype::F32,
            "optimizer_state {moments}: LoRA trains only the adapters, whose AdamW moments stay f32 \
             (they are small); bf16 moments are for full fine-tuning"
        );
        ensure!(
            state.zero.is_none() || (training && lora.is_none()),
            "ZeRO-1 splits the optimizer state of full fine-tuning: this model trains {}",
            if training { "LoRA adapters only" } else { "nothing (inference)" }
        );
        // Refused up front: on the CPU an allocation past the host's memory is not an error but
        // a process that grows until the kernel kills it, without a word.
        if let Some((free, _)) = backend.memory_info()? {
            let (fixed, per_token) =
                memory_bytes_with(&config, backend.compute_bytes(), training, lora, recompute, state);
            let need = fixed.saturating_add(per_token.saturating_mul(max_tokens));
            ensure!(
                need <= free,
                "out of memory on {}: a {} model of {} parameters for {max_tokens} token positions needs about \
                 {:.2} GiB, {:.2} GiB are free",
                backend.name(),
                if training { "training" } else { "inference" },
                config.n_params(),
                need as f64 / GIB,
                free as f64 / GIB
            );
        }
        let specs = params::param_specs(&config);
        let index = ParamIndex::new(&config);
        let lens: Vec<usize> = specs.iter().map(ParamSpec::numel).collect();
        let be = &backend;
        let alloc = |lens: &[usize], p: Precision| -> Result<Vec<B::Buf>> {
            lens.iter().map(|&len| be.zeros(len, p)).collect()
        };
        let params = alloc(&lens, Precision::Compute)?;
        // A frozen base (LoRA) keeps its weights in the compute precision only; under ZeRO-1
        // the master weights and moments are this rank's tensors' only.
        let trained: &[usize] = if training && lora.is_none() { &lens } else { &[] };
        let shards = state.shards(&lens)?;
        let held = shards.as_ref().map_or(0..trained.len(), |s| s.owned());
        let master = alloc(&trained[held.clone()], Precision::F32)?;
        let grads = alloc(trained, Precision::F32)?;
        let m = alloc(&trained[held.clone()], moments.precision())?;
        let v = alloc(&trained[held], moments.precision())?;

        let n = max_tokens;
        let d = config.d_model;
        let heads = config.heads();
        let hidden = config.ffn_hidden;
        let c = Precision::Compute;
        let f = Precision::F32;
        let n_layers = config.n_layers;
        let slots = |kept: bool| if kept { n_layers } else { 1 };
        let attn = (0..slots(recompute.keeps_attention()))
            .map(|_| -> Result<AttnActs<B>> {
                Ok(AttnActs {
                    qkv: be.zeros(n * heads.qkv_width(), c)?,
                    att: be.zeros(n * heads.q_width(), c)?,
                    lse: be.zeros(heads.n_heads * n, f)?,
                    h: be.zeros(n * d, c)?,
                    ln2: be.zeros(n * d, c)?,
                    rstd2: be.zeros(n, f)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mlp = (0..slots(recompute.keeps_mlp()))
            .map(|_| -> Result<MlpActs<B>> {
                Ok(MlpActs { gate_up: be.zeros(n * 2 * hidden, c)?, swi: be.zeros(n * hidden, c)? })
            })
            .collect::<Result<Vec<_>>>()?;
        let norms = if recompute.keeps_attention() { n_layers + 1 } else { 1 };
        let acts = Activations {
            recompute,
            resid: (0..=n_layers).map(|_| be.zeros(n * d, c)).collect::<Result<_>>()?,
            ln_in: (0..norms).map(|_| be.zeros(n * d, c)).collect::<Result<_>>()?,
            rstd_in: (0..norms).map(|_| be.zeros(n, f)).collect::<Result<_>>()?,
            attn,
            mlp,
            delta: be.zeros(n * d, c)?,
        };
        let act_grads = ActGrads {
            dresid: be.zeros(n * d, c)?,
            ddelta: be.zeros(n * d, c)?,
            dln: be.zeros(n * d, c)?,
            dswi: be.zeros(n * hidden, c)?,
            dgate_up: be.zeros(n * 2 * hidden, c)?,
            datt: be.zeros(n * heads.q_width(), c)?,
            dqkv: be.zeros(n * heads.qkv_width(), c)?,
        };
        let ids = IdBufs {
            inputs: be.zeros_ids(n)?,
            positions: be.zeros_ids(n)?,
            cu_seqlens: be.zeros_ids(n + 1)?,
            rope_table: be.zeros(n * heads.head_dim, Precision::F32)?,
            sup_rows: be.zeros_ids(n)?,
            sup_targets: be.zeros_ids(n)?,
            n_sup: 0,
            emb_groups: be.zeros_ids(3 * n + 1)?,
            n_groups: 0,
        };
        let logits = be.zeros(config.vocab_size, c)?;
        let lora = lora.map(|l| LoraState::new(be, l, &config, n, training)).transpose()?;
        let row_losses = be.zeros(n, f)?;
        let stats = be.zeros(STATS_LEN, f)?;
        Ok(Model {
            backend,
            config,
            max_tokens,
            specs,
            index,
            lens,
            params,
            master,
            grads,
            m,
            v,
            shards,
            moments,
            training,
            acts,
            act_grads,
            ids,
            logits,
            lora,
            row_losses,
            stats,
            fresh: true,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Gives the backend back (its buffers freed), for a next model on the same device.
    pub fn into_backend(self) -> B {
        self.backend
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The most token positions (`rows · seq_len`) one call can take.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// The internal parameter tensors, in layout order.
    pub fn param_specs(&self) -> &[ParamSpec] {
        &self.specs
    }

    /// Fresh parameters (see [`params::init_params`]); resets the optimizer moments and grads.
    pub fn init_params(&mut self, seed: u64) -> Result<()> {
        let fresh = params::init_params(&self.config, seed);
        self.write_params(&fresh)?;
        if !self.base_trained() {
            return Ok(());
        }
        self.zero_grads()?;
        let first = self.state_tensors().start;
        for (j, (m, v)) in self.m.iter_mut().zip(&mut self.v).enumerate() {
            self.backend.zero(m, self.lens[first + j])?;
            self.backend.zero(v, self.lens[first + j])?;
        }
        Ok(())
    }

    /// The parameters (from the F32 master copy), with internal names, in layout order. Under
    /// ZeRO-1 the master copy is split over the ranks: [`Model::gather_params`] collects it.
    pub fn read_params(&self) -> Result<Vec<NamedTensor>> {
        if self.base_trained() {
            self.ensure_unsharded("read_params")?;
            return self.read_named(&self.master);
        }
        self.read_named(&self.params)
    }

    /// The weights in the compute precision, as the forward reads them (with bf16 compute, the
    /// master weights rounded): the same on every rank, ZeRO-1 or not.
    pub fn read_weights(&self) -> Result<Vec<NamedTensor>> {
        self.read_named(&self.params)
    }

    /// The tensors whose master weights and moments this model holds: all, or under ZeRO-1 this
    /// rank's share (none for a model without optimizer state).
    fn state_tensors(&self) -> Range<usize> {
        match &self.shards {
            _ if !self.base_trained() => 0..0,
            Some(s) => s.owned(),
            None => 0..self.specs.len(),
        }
    }

    /// Where tensor `i`'s master weights and moments are in `master`, `m` and `v`, if here.
    fn state_slot(&self, i: usize) -> Option<usize> {
        let held = self.state_tensors();
        held.contains(&i).then(|| i - held.start)
    }

    /// Sets the parameters (master and compute copies); `params` must hold exactly this
    /// config's internal tensors, in any order.
    pub fn write_params(&mut self, params: &[NamedTensor]) -> Result<()> {
        let ordered = params::check_params(&self.config, params).context("writing model parameters")?;
        for (i, t) in ordered.iter().enumerate() {
            self.backend.write(&mut self.params[i], &t.data)?;
            if let Some(j) = self.state_slot(i) {
                self.backend.write(&mut self.master[j], &t.data)?;
            }
        }
        Ok(())
    }

    /// [`Self::write_params`], dropping each host tensor once it is on the backend, so that
    /// loading holds one host copy of the weights at most.
    pub fn take_params(&mut self, params: Vec<NamedTensor>) -> Result<()> {
        params::check_params(&self.config, &params).context("writing model parameters")?;
        let slot: HashMap<String, usize> =
            params::param_specs(&self.config).into_iter().enumerate().map(|(i, s)| (s.name, i)).collect();
        for t in params {
            let i = *slot.get(&t.name).with_context(|| format!("unexpected parameter {}", t.name))?;
            self.backend.write(&mut self.params[i], &t.data)?;
            if let Some(j) = self.state_slot(i) {
                self.backend.write(&mut self.master[j], &t.data)?;
            }
        }
        Ok(())
    }

    /// Why outputs came out non-finite: the first parameter tensor holding a NaN or an infinity
    /// (its internal name and the index), or that every weight is finite (the activations
    /// overflowed), with the largest weight, which is the culprit when it is absurd (a flipped
    /// exponent bit). Reads every weight back: for error paths only.
    pub fn non_finite_report(&self) -> Result<String> {
        let mut largest: Option<(String, usize, f32)> = None;
        for t in self.read_named(&self.params)? {
            if let Some(i) = t.data.iter().position(|x| !x.is_finite()) {
                return Ok(format!("parameter {} holds {} at index {i}", t.name, t.data[i]));
            }
            let top = t.data.iter().enumerate().max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()));
            if let Some((i, &v)) = top {
                if largest.as_ref().is_none_or(|(_, _, l)| v.abs() > l.abs()) {
                    largest = Some((t.name.clone(), i, v));
                }
            }
        }
        Ok(match largest {
            Some((name, i, v)) => format!(
                "every weight is finite, so the activations overflowed (the largest weight: {v:e} in {name} at \
                 index {i})"
            ),
            None => "every weight is finite, so the activations overflowed".to_string(),
        })
    }

    /// The accumulated gradients, with the parameters' names.
    pub fn read_grads(&self) -> Result<Vec<NamedTensor>> {
        self.ensure_training("read_grads")?;
        // A frozen base (LoRA) has no gradient buffers at all.
        if self.fresh && self.lora.is_none() {
            // Zeroed only logically (see `zero_grads`): the buffers may hold the last step's.
            return Ok(self
                .specs
                .iter()
                .map(|spec| NamedTensor {
                    name: spec.name.clone(),
                    shape: spec.shape.clone(),
                    data: vec![0.0; spec.numel()],
                })
                .collect());
        }
        self.read_named(&self.grads)
    }

    /// Starts a new accumulation: the gradients (and the step's loss sum) count as zero. Nothing
    /// is written: the next backward overwrites them (beta = 0 in the weight-gradient GEMMs)
    /// instead of adding to them, which saves a pass over every gradient per optimizer step.
    pub fn zero_grads(&mut self) -> Result<()> {
        self.fresh = true;
        // The adapters' backward adds to their gradients (small: written here, once per step).
        if let Some(lora) = &mut self.lora {
            lora.zero_grads(&self.backend)?;
        }
        Ok(())
    }

    /// Data parallelism's hook: hands the accumulated gradients of the trained tensors (the
    /// base's, or the LoRA adapters' over a frozen base), every tensor concatenated in layout
    /// order into one host f32 buffer, to `reduce` (an all-reduce over the ranks) and writes
    /// back what it leaves there, before [`Model::clip_and_update`]. A rank that accumulated
    /// nothing this step contributes zeros. The step's loss sum stays this rank's.
    pub fn all_reduce_grads(&mut self, reduce: impl FnOnce(&mut [f32]) -> Result<()>) -> Result<()> {
        self.ensure_training("all_reduce_grads")?;
        self.materialize_zero_grads()?;
        // The zeros are now real: the update must not zero the reduced gradients again.
        self.fresh = false;
        if let Some(lora) = &mut self.lora {
            // Zeroed by zero_grads (the adapters' backward adds to them).
            return lora.all_reduce_grads(&self.backend, reduce);
        }
        reduce_flat(&self.backend, &mut self.grads, &self.lens, reduce)
    }

    /// Writes the zeros that `zero_grads` only promised, for an update with nothing accumulated.
    fn materialize_zero_grads(&mut self) -> Result<()> {
        if self.fresh {
            for (g, &len) in self.grads.iter_mut().zip(&self.lens) {
                self.backend.zero(g, len)?;
            }
            self.backend.zero(&mut self.stats, STATS_LEN)?;
        }
        Ok(())
    }

    /// The storage type of the AdamW moments.
    pub fn optimizer_state(&self) -> StateDtype {
        self.moments
    }

    /// Adam's first and second moments, with the parameters' names (as f32; with bf16 moments
    /// each value is a bf16 one).
    pub fn read_optimizer_state(&self) -> Result<(Vec<NamedTensor>, Vec<NamedTensor>)> {
        self.ensure_training("read_optimizer_state")?;
        self.ensure_unsharded("read_optimizer_state")?;
        Ok((self.read_named(&self.m)?, self.read_named(&self.v)?))
    }

    pub fn write_optimizer_state(&mut self, m: &[NamedTensor], v: &[NamedTensor]) -> Result<()> {
        self.ensure_training("write_optimizer_state")?;
        ensure!(self.lora.is_none(), "write_optimizer_state: the base is frozen (LoRA): it has no moments");
        let m = params::check_params(&self.config, m).context("writing Adam first moments")?;
        let v = params::check_params(&self.config, v).context("writing Adam second moments")?;
        // Under ZeRO-1 every rank reads the whole state and keeps its share.
        for (j, i) in self.state_tensors().enumerate() {
            match self.moments {
                StateDtype::F32 => {
                    self.backend.write(&mut self.m[j], &m[i].data)?;
                    self.backend.write(&mut self.v[j], &v[i].data)?;
                }
                // Rounded here as a store in the step rounds them, so that every backend (the
                // CPU keeps f32 storage) holds the same bf16 values.
                StateDtype::Bf16 => {
                    let round =
                        |x: &[f32]| x.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect::<Vec<_>>();
                    self.backend.write(&mut self.m[j], &round(&m[i].data))?;
                    self.backend.write(&mut self.v[j], &round(&v[i].data))?;
                }
            }
        }
        Ok(())
    }

    /// Whether the base weights are trained (a training model without LoRA): only then do they
    /// have master copies, gradients and moments.
    fn base_trained(&self) -> bool {
        self.training && self.lora.is_none()
    }

    /// The adapters, when the model has them.
    pub fn lora(&self) -> Option<&LoraConfig> {
        self.lora.as_ref().map(|l| &l.config)
    }

    /// Whether a micro-batch of training draws dropout masks (the model's or the adapters').
    pub fn uses_dropout(&self) -> bool {
        self.config.dropout > 0.0 || self.lora().is_some_and(|l| l.dropout > 0.0)
    }

    fn lora_state(&self, what: &str) -> Result<&LoraState<B>> {
        self.lora.as_ref().with_context(|| format!("{what}: this model has no LoRA adapters"))
    }

    /// Fresh adapters (A ~ N(0, 1), B = 0), their moments reset.
    pub fn init_adapters(&mut self, seed: u64) -> Result<()> {
        let lora = self.lora_state("init_adapters")?.config.clone();
        self.write_adapters(&lora::init_adapters(&lora, &self.config, seed))?;
        let be = &self.backend;
        let state = self.lora.as_mut().expect("checked above");
        state.zero_grads(be)?;
        state.zero_moments(be)
    }

    /// The adapter tensors (internal names `layers.N.q.lora_A`, ...; f32 masters when training).
    pub fn read_adapters(&self) -> Result<Vec<NamedTensor>> {
        self.lora_state("read_adapters")?.read(&self.backend)
    }

    /// Sets the adapter weights; `adapters` must be exactly this model's adapter tensors.
    pub fn write_adapters(&mut self, adapters: &[NamedTensor]) -> Result<()> {
        self.lora_state("write_adapters")?;
        let state = self.lora.as_mut().expect("checked above");
        state.write(&self.backend, &self.config, adapters)
    }

    /// The adapters' accumulated gradients.
    pub fn read_adapter_grads(&self) -> Result<Vec<NamedTensor>> {
        self.ensure_training("read_adapter_grads")?;
        self.lora_state("read_adapter_grads")?.read_grads(&self.backend)
    }

    /// The adapters' Adam moments (first, second).
    pub fn read_adapter_moments(&self) -> Result<(Vec<NamedTensor>, Vec<NamedTensor>)> {
        self.ensure_training("read_adapter_moments")?;
        self.lora_state("read_adapter_moments")?.read_moments(&self.backend)
    }

    pub fn write_adapter_moments(&mut self, m: &[NamedTensor], v: &[NamedTensor]) -> Result<()> {
        self.lora_state("write_adapter_moments")?;
        let state = self.lora.as_mut().expect("checked above");
        state.write_moments(&self.backend, &self.config, m, v)
    }

    fn ensure_training(&self, what: &str) -> Result<()> {
        ensure!(self.training, "{what}: this model was built for inference only (Model::new_inference)");
        Ok(())
    }

    fn ensure_unsharded(&self, what: &str) -> Result<()> {
        if let Some(s) = &self.shards {
            bail!(
                "{what}: this rank holds the optimizer state of tensors {:?} only (ZeRO-1 over {} ranks): \
                 gather it over the ranks (Model::gather_params, gather_optimizer_state, clip_and_update_sharded)",
                s.owned(),
                s.world_size()
            );
        }
        Ok(())
    }

    fn read_named(&self, bufs: &[B::Buf]) -> Result<Vec<NamedTensor>> {
        self.specs
            .iter()
            .zip(bufs)
            .map(|(spec, buf)| {
                Ok(NamedTensor {
                    name: spec.name.clone(),
                    shape: spec.shape.clone(),
                    data: self.backend.read(buf, spec.numel())?,
                })
            })
            .collect()
    }

    /// Checks a batch against this model and copies its ids to the device, with the supervised
    /// rows and (`for_backward`) the tokens grouped by id, worked out here on the host, where the
    /// batch is; returns `n`.
    fn load_batch(&mut self, batch: &Batch, for_backward: bool) -> Result<usize> {
        let n = batch.n_tokens();
        ensure!(n > 0, "empty batch ({} rows × {} positions)", batch.rows, batch.seq_len);
        ensure!(
            n <= self.max_tokens,
            "batch of {} rows × {} positions = {n} tokens exceeds the model's max_tokens {}",
            batch.rows,
            batch.seq_len,
            self.max_tokens
        );
        for (name, len) in [
            ("inputs", batch.inputs.len()),
            ("targets", batch.targets.len()),
            ("positions", batch.positions.len()),
        ] {
            ensure!(len == n, "batch {name} has {len} entries, expected rows·seq_len = {n}");
        }
        let cu = &batch.cu_seqlens;
        ensure!(
            cu.len() >= 2 && cu[0] == 0 && *cu.last().unwrap() as usize == n,
            "batch cu_seqlens must run from 0 to {n} (got {cu:?})"
        );
        ensure!(cu.windows(2).all(|w| w[0] <= w[1]), "batch cu_seqlens must not decrease (got {cu:?})");
        let vocab = self.config.vocab_size;
        if let Some(i) = batch.inputs.iter().position(|&t| t as usize >= vocab) {
            bail!("batch input {i} is token id {} outside the vocabulary ({vocab})", batch.inputs[i]);
        }
        if let Some(i) = batch.targets.iter().position(|&t| t != batch.pad_id && t as usize >= vocab) {
            bail!("batch target {i} is token id {} outside the vocabulary ({vocab})", batch.targets[i]);
        }
        let (rows, sup_targets) = supervised_rows(&batch.targets, batch.pad_id, vocab)?;
        let be = &self.backend;
        be.write_ids(&mut self.ids.inputs, &batch.inputs)?;
        be.write_ids(&mut self.ids.positions, &batch.positions)?;
        be.write_ids(&mut self.ids.cu_seqlens, cu)?;
        be.write_ids(&mut self.ids.sup_rows, &rows)?;
        be.write_ids(&mut self.ids.sup_targets, &sup_targets)?;
        self.ids.n_sup = rows.len();
        if for_backward {
            let (groups, n_groups) = group_tokens_by_id(&batch.inputs);
            be.write_ids(&mut self.ids.emb_groups, &groups)?;
            self.ids.n_groups = n_groups;
        }
        // Once per batch: the attention of every layer shares what depends on the segments.
        be.prepare_segments(&self.ids.cu_seqlens, cu.len() - 1, n)?;
        Ok(n)
    }

    /// The forward pass over `n` rows whose ids are loaded, up to the final norm's output
    /// (`acts.ln_in[acts.norm(n_layers)]`).
    fn forward(&mut self, n: usize, mut attn: AttnMode<'_, B>, dropout_seed: Option<u64>) -> Result<()> {
        let Model { backend: be, config: cfg, index: idx, params: p, acts, ids, lora, .. } = self;
        let d = cfg.d_model;
        let heads = cfg.heads();
        let (eps, rope) = (cfg.norm_eps, cfg.rope());
        let n_layers = cfg.n_layers;
        let hidden = cfg.ffn_hidden;
        be.rope_table(&mut ids.rope_table, &ids.positions, n, heads.head_dim, rope)?;
        let (norm_at, recompute) = (acts.norm(0), acts.recompute);
        let Activations { resid, ln_in, rstd_in, attn: attn_acts, mlp: mlp_acts, delta, .. } = acts;
        be.embedding_forward(&mut resid[0], &ids.inputs, &p[idx.tok_embeddings], n, d)?;
        be.rmsnorm_forward(
            &mut ln_in[norm_at],
            &mut rstd_in[norm_at],
            &resid[0],
            &p[idx.layers[0].attn_norm],
            n,
            d,
            eps,
        )?;
        let cx = LayerCx { be: &*be, cfg: &*cfg, idx: &*idx, p: &p[..], ids: &*ids, n, dropout_seed };
        for l in 0..n_layers {
            let w = idx.layers[l];
            let (ln_at, next_at) =
                (slot(recompute.keeps_attention(), l), slot(recompute.keeps_attention(), l + 1));
            let la = &mut attn_acts[slot(recompute.keeps_attention(), l)];
            let ma = &mut mlp_acts[slot(recompute.keeps_mlp(), l)];
            cx.attention_block(lora, &mut attn, l, &ln_in[ln_at], &resid[l], la, delta)?;
            cx.mlp(lora, l, &la.ln2, ma)?;
            let next_norm = if l + 1 < n_layers { idx.layers[l + 1].attn_norm } else { idx.norm };
            let branch =
                Branch { site: Site::Down, w: w.down, inp: &ma.swi, in_dim: hidden, dropout_site: 1 };
            cx.residual_branch(
                lora,
                l,
                branch,
                &la.h,
                &mut resid[l + 1],
                (&mut ln_in[next_at], &mut rstd_in[next_at], next_norm),
                delta,
            )?;
        }
        Ok(())
    }

    /// Adds this micro-batch's gradient of `loss_scale · (sum of supervised losses)` into the
    /// grads; returns the micro-batch's loss SUM (f64), read back from the device (one read: the
    /// trainer uses [`Model::accumulate_gradients`], which reads nothing). `dropout_seed` None = no
    /// dropout.
    pub fn forward_backward(
        &mut self,
        batch: &Batch,
        loss_scale: f32,
        dropout_seed: Option<u64>,
    ) -> Result<f64> {
        let n_sup = self.backward_micro_batch(batch, loss_scale, dropout_seed, None)?;
        self.backend.sum_into(
            &mut self.stats,
            stats::MICRO_LOSS,
            &self.row_losses,
            n_sup,
            GradMode::Overwrite,
        )?;
        let s = self.backend.read(&self.stats, STATS_LEN)?;
        Ok(stats::join(&s, stats::MICRO_LOSS))
    }

    /// [`Model::forward_backward`] without a read-back: the micro-batch's loss sum stays on the
    /// device, added to the step's, which [`Model::clip_and_update`] reads once at the step's end.
    pub fn accumulate_gradients(
        &mut self,
        batch: &Batch,
        loss_scale: f32,
        dropout_seed: Option<u64>,
    ) -> Result<()> {
        self.backward_micro_batch(batch, loss_scale, dropout_seed, None).map(|_| ())
    }

    /// The forward and backward of one micro-batch: the gradients written (the first after
    /// `zero_grads`) or added to, the row losses left in `row_losses` and added to the step's
    /// loss sum on the device. Returns the number of supervised rows. Every gradient buffer must
    /// be written here when `fresh` (the step zeroes nothing). With `sum`, each bucket of
    /// tensors is handed to it as soon as its gradients are final (the step's last micro-batch).
    fn backward_micro_batch(
        &mut self,
        batch: &Batch,
        loss_scale: f32,
        dropout_seed: Option<u64>,
        mut sum: Option<&mut grad_buckets::BucketSum<'_>>,
    ) -> Result<usize> {
        self.ensure_training("forward_backward")?;
        let n = self.load_batch(batch, true)?;
        let n_segments = batch.n_segments();
        {
            let _forward = profile::range("forward");
            self.forward(n, AttnMode::Segments { n_segments }, dropout_seed)?;
        }
        let _backward = profile::range("backward");

        let mode = if self.fresh { GradMode::Overwrite } else { GradMode::Accumulate };
        let Model {
            backend: be,
            config: cfg,
            index: idx,
            params: p,
            grads: g,
            acts,
            act_grads: ag,
            ids,
            lora,
            row_losses,
            stats: st,
            ..
        } = self;
        let d = cfg.d_model;
        let heads = cfg.heads();
        let hidden = cfg.ffn_hidden;
        let rope = cfg.rope();
        let n_layers = cfg.n_layers;
        let lens = &self.lens[..];
        let dropout = dropout_seed.filter(|_| cfg.dropout > 0.0);
        let out_w = idx.output_weight();
        let recompute = acts.recompute;
        let final_at = acts.norm(n_layers);
        let Activations { resid, ln_in, rstd_in, attn: attn_acts, mlp: mlp_acts, delta, .. } = acts;

        be.lm_head_cross_entropy(
            &ln_in[final_at],
            &p[out_w],
            &ids.sup_rows,
            &ids.sup_targets,
            ids.n_sup,
            n,
            d,
            cfg.vocab_size,
            row_losses,
            Some(LossGrads { dx: &mut ag.dln, dw: weight_grad(g, lora, out_w, true), loss_scale, mode }),
        )?;
        be.sum_into(st, stats::STEP_LOSS, row_losses, ids.n_sup, mode)?;
        // RMSNorm adds its weight gradient: a first micro-batch starts it from zero (d floats).
        let norm_dw = |dw: &mut B::Buf| if mode == GradMode::Overwrite { be.zero(dw, d) } else { Ok(()) };
        norm_dw(weight_grad(g, lora, idx.norm, false))?;
        let site =
            |l: usize, s: usize| dropout.map(|seed| Dropout { p: cfg.dropout, seed: site_seed(seed, l, s) });
        // Each norm backward completes `dresid` for a residual stream that a block's branch
        // joined through dropout (the final norm's: the last FFN block's): it also writes that
        // branch's masked gradient into `ddelta`, so no copy and no second pass.
        be.zero(&mut ag.dresid, n * d)?;
        be.rmsnorm_backward(
            &mut ag.dresid,
            weight_grad(g, lora, idx.norm, false),
            &ag.dln,
            &resid[n_layers],
            &p[idx.norm],
            &rstd_in[final_at],
            n,
            d,
            branch::<B>(&mut ag.ddelta, site(n_layers - 1, 1)),
        )?;
        if let Some(sum) = sum.as_deref_mut() {
            sum.ready(&*be, g, lens, idx.norm..lens.len())?;
        }
        let cx = LayerCx { be: &*be, cfg: &*cfg, idx: &*idx, p: &p[..], ids: &*ids, n, dropout_seed };
        for l in (0..n_layers).rev() {
            let w = idx.layers[l];
            let (la_at, ma_at) = (slot(recompute.keeps_attention(), l), slot(recompute.keeps_mlp(), l));
            let ln_at = slot(recompute.keeps_attention(), l);
            // What the forward did not keep, recomputed from what it kept, with the same dropout
            // masks (the same seeds): `resid[l]` for the whole layer, `ffn_norm(h)` for the FFN.
            if !recompute.keeps_attention() {
                let _recompute = profile::range("recompute layer");
                be.rmsnorm_forward(
                    &mut ln_in[ln_at],
                    &mut rstd_in[ln_at],
                    &resid[l],
                    &p[w.attn_norm],
                    n,
                    d,
                    cfg.norm_eps,
                )?;
                let mut segments = AttnMode::Segments { n_segments };
                let la = &mut attn_acts[la_at];
                cx.attention_block(lora, &mut segments, l, &ln_in[ln_at], &resid[l], la, delta)?;
            }
            if !recompute.keeps_mlp() {
                let _recompute = profile::range("recompute mlp");
                cx.mlp(lora, l, &attn_acts[la_at].ln2, &mut mlp_acts[ma_at])?;
            }
            let (la, ma) = (&attn_acts[la_at], &mlp_acts[ma_at]);
            // FFN block: resid[l+1] = h + dropout(down(swiglu(gate_up(ffn_norm(h))))). Without
            // dropout the branch's gradient is the residual's itself.
            let ddelta = if dropout.is_some() { &ag.ddelta } else { &ag.dresid };
            let at = (l, Site::Down, dropout_seed);
            projection_backward(
                be,
                lora,
                g,
                p,
                w.down,
                at,
                &mut ag.dswi,
                ddelta,
                &ma.swi,
                n,
                hidden,
                d,
                mode,
            )?;
            be.swiglu_backward(&mut ag.dgate_up, &ag.dswi, &ma.gate_up, n, hidden)?;
            let at = (l, Site::GateUp, dropout_seed);
            let dgate_up = &ag.dgate_up;
            projection_backward(
                be,
                lora,
                g,
                p,
                w.gate_up,
                at,
                &mut ag.dln,
                dgate_up,
                &la.ln2,
                n,
                d,
                2 * hidden,
                mode,
            )?;
            norm_dw(weight_grad(g, lora, w.ffn_norm, false))?;
            be.rmsnorm_backward(
                &mut ag.dresid,
                weight_grad(g, lora, w.ffn_norm, false),
                &ag.dln,
                &la.h,
                &p[w.ffn_norm],
                &la.rstd2,
                n,
                d,
                branch::<B>(&mut ag.ddelta, site(l, 0)),
            )?;
            // Attention block: h = resid[l] + dropout(o(attn(rope(qkv(attn_norm(resid[l])))))).
            let ddelta = if dropout.is_some() { &ag.ddelta } else { &ag.dresid };
            let at = (l, Site::O, dropout_seed);
            projection_backward(
                be,
                lora,
                g,
                p,
                w.o,
                at,
                &mut ag.datt,
                ddelta,
                &la.att,
                n,
                heads.q_width(),
                d,
                mode,
            )?;
            be.attention_backward(
                &mut ag.dqkv,
                &ag.datt,
                &la.qkv,
                &la.att,
                &la.lse,
                &ids.cu_seqlens,
                n_segments,
                n,
                heads,
                // The gradients before rope_forward's rotation (the CUDA flash backward rotates
                // them back as it writes them).
                Some(RopeGrad { table: &ids.rope_table, style: rope.style }),
            )?;
            let (at, ln) = ((l, Site::Qkv, dropout_seed), &ln_in[ln_at]);
            let dqkv = &ag.dqkv;
            projection_backward(
                be,
                lora,
                g,
                p,
                w.qkv,
                at,
                &mut ag.dln,
                dqkv,
                ln,
                n,
                d,
                heads.qkv_width(),
                mode,
            )?;
            norm_dw(weight_grad(g, lora, w.attn_norm, false))?;
            // resid[l] is where layer l - 1's FFN branch joined.
            let below = if l > 0 { site(l - 1, 1) } else { None };
            be.rmsnorm_backward(
                &mut ag.dresid,
                weight_grad(g, lora, w.attn_norm, false),
                &ag.dln,
                &resid[l],
                &p[w.attn_norm],
                &rstd_in[ln_at],
                n,
                d,
                branch::<B>(&mut ag.ddelta, below),
            )?;
            if let Some(sum) = sum.as_deref_mut() {
                sum.ready(&*be, g, lens, w.tensors())?;
            }
        }
        // With tied embeddings this adds to the lm_head gradient the loss wrote in the same buffer.
        // A frozen embedding (LoRA) needs no gradient at all.
        if lora.is_none() {
            let emb_mode = if out_w == idx.tok_embeddings { GradMode::Accumulate } else { mode };
            be.embedding_backward(
                &mut g[idx.tok_embeddings],
                &ids.emb_groups,
                ids.n_groups,
                &ag.dresid,
                n,
                d,
                emb_mode,
            )?;
        }
        if let Some(sum) = sum {
            sum.ready(&*be, g, lens, idx.tok_embeddings..idx.tok_embeddings + 1)?;
        }
        self.fresh = false;
        Ok(self.ids.n_sup)
    }

    /// The SUM of the supervised tokens' losses, without dropout and without gradients (one
    /// read-back).
    pub fn loss(&mut self, batch: &Batch) -> Result<f64> {
        let n = self.load_batch(batch, false)?;
        self.forward(n, AttnMode::Segments { n_segments: batch.n_segments() }, None)?;
        let cfg = &self.config;
        let be = &self.backend;
        be.lm_head_cross_entropy(
            &self.acts.ln_in[self.acts.norm(cfg.n_layers)],
            &self.params[self.index.output_weight()],
            &self.ids.sup_rows,
            &self.ids.sup_targets,
            self.ids.n_sup,
            n,
            cfg.d_model,
            cfg.vocab_size,
            &mut self.row_losses,
            None,
        )?;
        be.sum_into(
            &mut self.stats,
            stats::MICRO_LOSS,
            &self.row_losses,
            self.ids.n_sup,
            GradMode::Overwrite,
        )?;
        Ok(stats::join(&be.read(&self.stats, STATS_LEN)?, stats::MICRO_LOSS))
    }

    /// Global L2 norm of the accumulated gradients (one read-back).
    pub fn grad_norm(&mut self) -> Result<f64> {
        self.ensure_training("grad_norm")?;
        self.ensure_unsharded("grad_norm")?;
        if self.fresh && self.lora.is_none() {
            return Ok(0.0);
        }
        self.sum_squares_into_stats()?;
        Ok(stats::join(&self.backend.read(&self.stats, STATS_LEN)?, stats::SUMSQ).sqrt())
    }

    /// One AdamW step over every parameter tensor, from the accumulated gradients.
    pub fn adamw_step(&mut self, hp: &AdamW) -> Result<()> {
        self.ensure_training("adamw_step")?;
        self.ensure_unsharded("adamw_step")?;
        self.materialize_zero_grads()?;
        self.update(hp, None)
    }

    /// The end of an optimizer step, with one read-back: the global norm of the accumulated
    /// gradients and the AdamW update clipped to `max_norm` (0: no clipping) both on the device
    /// (AdamW reads the clip factor there, and skips the update when the norm is not finite),
    /// then the step's loss sum and the norm read together.
    pub fn clip_and_update(&mut self, hp: &AdamW, max_norm: f32) -> Result<StepStats> {
        self.ensure_training("clip_and_update")?;
        self.ensure_unsharded("clip_and_update")?;
        self.materialize_zero_grads()?;
        self.sum_squares_into_stats()?;
        self.update(hp, Some(max_norm))?;
        let s = self.backend.read(&self.stats, STATS_LEN)?;
        Ok(StepStats {
            loss_sum: stats::join(&s, stats::STEP_LOSS),
            grad_norm: stats::join(&s, stats::SUMSQ).sqrt(),
        })
    }

    /// The sum of squares of the trained tensors' gradients (the adapters' with LoRA) into the
    /// statistics buffer.
    fn sum_squares_into_stats(&mut self) -> Result<()> {
        match &self.lora {
            Some(lora) => lora.sum_squares(&self.backend, &mut self.stats),
            None => {
                let bufs: Vec<&B::Buf> = self.grads.iter().collect();
                self.backend.sum_squares(&bufs, &self.lens, &mut self.stats)
            }
        }
    }

    fn update(&mut self, hp: &AdamW, max_norm: Option<f32>) -> Result<()> {
        if let Some(lora) = &mut self.lora {
            let clip = max_norm.map(|max_norm| Clip { sumsq: &self.stats, max_norm });
            return lora.adamw(&self.backend, hp, clip);
        }
        // The tensors whose state is here: all, or this rank's share under ZeRO-1.
        let held = self.state_tensors();
        if held.is_empty() {
            return Ok(());
        }
        let mut params: Vec<&mut B::Buf> = self.params[held.clone()].iter_mut().collect();
        let mut master: Vec<&mut B::Buf> = self.master.iter_mut().collect();
        let grads: Vec<&B::Buf> = self.grads[held.clone()].iter().collect();
        let mut m: Vec<&mut B::Buf> = self.m.iter_mut().collect();
        let mut v: Vec<&mut B::Buf> = self.v.iter_mut().collect();
        let clip = max_norm.map(|max_norm| Clip { sumsq: &self.stats, max_norm });
        self.backend.adamw(
            &mut params,
            &mut master,
            &grads,
            &mut m,
            &mut v,
            self.moments,
            &self.lens[held],
            hp,
            clip,
        )
    }

    /// An empty KV cache for up to `max_len` positions.
    pub fn new_cache(&self, max_len: usize) -> Result<KvCache<B>> {
        ensure!(max_len > 0, "KV cache length must be positive");
        let width = self.config.heads().kv_width();
        let alloc = || -> Result<Vec<B::Buf>> {
            (0..self.config.n_layers)
                .map(|_| self.backend.zeros(max_len * width, Precision::Compute))
                .collect()
        };
        Ok(KvCache { k: alloc()?, v: alloc()?, len: 0, max_len })
    }

    /// Feeds `ids` at positions `cache.len()..`, returns the logits (vocab) of the last one.
    pub fn next_logits(&mut self, cache: &mut KvCache<B>, ids: &[u32]) -> Result<Vec<f32>> {
        ensure!(!ids.is_empty(), "next_logits needs at least one token");
        ensure!(
            cache.k.len() == self.config.n_layers,
            "KV cache has {} layers, the model {}",
            cache.k.len(),
            self.config.n_layers
        );
        ensure!(
            cache.len + ids.len() <= cache.max_len,
            "KV cache full: {} cached + {} new positions exceed its length {}",
            cache.len,
            ids.len(),
            cache.max_len
        );
        let vocab = self.config.vocab_size;
        if let Some(&t) = ids.iter().find(|&&t| t as usize >= vocab) {
            bail!("token id {t} outside the vocabulary ({vocab})");
        }
        // The last token goes alone, so that its final-norm output is row 0 (the ops have no
        // row offsets); the rest goes in chunks of at most max_tokens rows.
        let (last, prompt) = ids.split_last().expect("ids is not empty");
        for chunk in prompt.chunks(self.max_tokens) {
            self.feed(cache, chunk)?;
        }
        self.feed(cache, std::slice::from_ref(last))?;
        let d = self.config.d_model;
        let out_w = self.index.output_weight();
        self.backend.matmul_forward(
            &mut self.logits,
            &self.acts.ln_in[self.acts.norm(self.config.n_layers)],
            &self.params[out_w],
            1,
            d,
            vocab,
        )?;
        let logits = self.backend.read(&self.logits, vocab)?;
        // A reply sampled from NaN logits looks like any other reply: stop here instead.
        if let Some(i) = logits.iter().position(|x| !x.is_finite()) {
            bail!("the logits are not finite (token {i}: {}): {}", logits[i], self.non_finite_report()?);
        }
        Ok(logits)
    }

    /// Runs `ids` (at most max_tokens) through the layers at positions `cache.len()..`,
    /// appending their keys and values to the cache.
    fn feed(&mut self, cache: &mut KvCache<B>, ids: &[u32]) -> Result<()> {
        let n = ids.len();
        let start = cache.len;
        let positions: Vec<u32> = (start..start + n).map(|p| p as u32).collect();
        self.backend.write_ids(&mut self.ids.inputs, ids)?;
        self.backend.write_ids(&mut self.ids.positions, &positions)?;
        self.forward(n, AttnMode::Cache { k: &mut cache.k, v: &mut cache.v, start }, None)?;
        cache.len += n;
        Ok(())
    }
}
