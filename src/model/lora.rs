//! LoRA: low-rank adapters on a frozen base (SimpleLLaMA's recipe: rank 16, alpha 8, scale
//! alpha/rank, A ~ N(0, 1), B = 0, on the q and v projections).
//!
//! An adapter on a projection `W [out, in]` holds `A [rank, in]` and `B [out, rank]` (PEFT's
//! `lora_A.weight` / `lora_B.weight` layouts, which are also this engine's `[out, in]` Linear
//! layout) and adds `scale · (x·Aᵀ)·Bᵀ` to the projection's output. Where the engine fuses
//! projections (`qkv`, `gate_up`), an adapter writes into its slice of the fused output through
//! the backend's column-slice GEMMs, so both backends run it on their ordinary GEMM path.
//!
//! LoRA dropout drops elements of the adapters' input. The adapters that share one input (q, k
//! and v read the same normed rows; gate and up too) share one mask: the engine computes that
//! input once for the fused projection.
//!
//! With LoRA the base is frozen: [`LoraState`] carries the adapters' weights, gradients, master
//! copies and moments, and the model allocates none of those for the base.

use super::config::ModelConfig;
use super::params::NamedTensor;
use crate::backend::{AdamW, Backend, Clip, GradMode, Precision, StateDtype};
use crate::rng::Rng;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

/// A projection an adapter can sit on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraTarget {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

/// Every target, in the order adapters are laid out within a layer.
pub const ALL_TARGETS: [LoraTarget; 7] = [
    LoraTarget::Q,
    LoraTarget::K,
    LoraTarget::V,
    LoraTarget::O,
    LoraTarget::Gate,
    LoraTarget::Up,
    LoraTarget::Down,
];

/// The engine's projection (possibly fused) that a target's output lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Site {
    Qkv,
    O,
    GateUp,
    Down,
}

/// Where a target's adapter reads and writes: `in_dim` inputs, `out_dim` outputs at columns
/// `col..col + out_dim` of its site's output rows, which are `ld` wide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub in_dim: usize,
    pub out_dim: usize,
    pub ld: usize,
    pub col: usize,
}

impl LoraTarget {
    /// The short name used on the command line (`q`, `gate`, ...).
    pub fn name(self) -> &'static str {
        match self {
            LoraTarget::Q => "q",
            LoraTarget::K => "k",
            LoraTarget::V => "v",
            LoraTarget::O => "o",
            LoraTarget::Gate => "gate",
            LoraTarget::Up => "up",
            LoraTarget::Down => "down",
        }
    }

    /// The Hugging Face Llama module (`self_attn.q_proj`, ...).
    pub fn hf_module(self) -> &'static str {
        match self {
            LoraTarget::Q => "self_attn.q_proj",
            LoraTarget::K => "self_attn.k_proj",
            LoraTarget::V => "self_attn.v_proj",
            LoraTarget::O => "self_attn.o_proj",
            LoraTarget::Gate => "mlp.gate_proj",
            LoraTarget::Up => "mlp.up_proj",
            LoraTarget::Down => "mlp.down_proj",
        }
    }

    /// PEFT's `target_modules` entry (`q_proj`, ...).
    pub fn peft_name(self) -> &'static str {
        self.hf_module().rsplit('.').next().expect("a module name")
    }

    /// `q`, `q_proj` or `self_attn.q_proj` (any case).
    pub fn parse(s: &str) -> Result<LoraTarget> {
        let s = s.trim().to_ascii_lowercase();
        ALL_TARGETS
            .into_iter()
            .find(|t| s == t.name() || s == t.peft_name() || s == t.hf_module())
            .with_context(|| {
                format!(
                    "unknown LoRA target {s:?}: expected any of {}",
                    ALL_TARGETS.map(|t| t.name()).join(", ")
                )
            })
    }

    pub fn site(self) -> Site {
        match self {
            LoraTarget::Q | LoraTarget::K | LoraTarget::V => Site::Qkv,
            LoraTarget::O => Site::O,
            LoraTarget::Gate | LoraTarget::Up => Site::GateUp,
            LoraTarget::Down => Site::Down,
        }
    }

    pub fn geometry(self, config: &ModelConfig) -> Geometry {
        let heads = config.heads();
        let (d, hidden) = (config.d_model, config.ffn_hidden);
        let (qw, kvw, qkv) = (heads.q_width(), heads.kv_width(), heads.qkv_width());
        let g = |in_dim, out_dim, ld, col| Geometry { in_dim, out_dim, ld, col };
        match self {
            LoraTarget::Q => g(d, qw, qkv, 0),
            LoraTarget::K => g(d, kvw, qkv, qw),
            LoraTarget::V => g(d, kvw, qkv, qw + kvw),
            LoraTarget::O => g(qw, d, d, 0),
            LoraTarget::Gate => g(d, hidden, 2 * hidden, 0),
            LoraTarget::Up => g(d, hidden, 2 * hidden, hidden),
            LoraTarget::Down => g(hidden, d, d, 0),
        }
    }
}

/// The adapters of a run: rank, alpha, dropout and the projections they sit on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f32,
    pub dropout: f32,
    /// Sorted, without duplicates.
    pub targets: Vec<LoraTarget>,
}

impl Default for LoraConfig {
    /// SimpleLLaMA's: rank 16, alpha 8, no dropout, q and v.
    fn default() -> Self {
        LoraConfig { rank: 16, alpha: 8.0, dropout: 0.0, targets: vec![LoraTarget::Q, LoraTarget::V] }
    }
}

impl LoraConfig {
    pub fn new(rank: usize, alpha: f32, dropout: f32, mut targets: Vec<LoraTarget>) -> Self {
        targets.sort();
        targets.dedup();
        LoraConfig { rank, alpha, dropout, targets }
    }

    /// `alpha / rank`.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    /// A comma-separated list such as `q,v` or `q_proj,v_proj`.
    pub fn parse_targets(list: &str) -> Result<Vec<LoraTarget>> {
        let mut targets = list
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(LoraTarget::parse)
            .collect::<Result<Vec<_>>>()?;
        ensure!(!targets.is_empty(), "no LoRA targets given (expected a list such as q,v)");
        targets.sort();
        targets.dedup();
        Ok(targets)
    }

    /// Checks the numbers against `config`, naming the field at fault.
    pub fn validate(&self, config: &ModelConfig) -> Result<()> {
        ensure!(!self.targets.is_empty(), "lora.targets: no target projection given");
        ensure!(self.rank > 0, "lora.rank must be at least 1 (got 0)");
        // Bounded too: an absurd alpha (a corrupt adapter_config.json) scales the adapters'
        // updates past anything a weight can hold.
        ensure!(
            self.alpha.is_finite() && self.alpha > 0.0 && self.alpha <= 1e6,
            "lora.alpha must be in (0, 1e6] (got {})",
            self.alpha
        );
        ensure!((0.0..1.0).contains(&self.dropout), "lora.dropout must be in [0, 1) (got {})", self.dropout);
        for &t in &self.targets {
            let g = t.geometry(config);
            let most = g.in_dim.min(g.out_dim);
            ensure!(
                self.rank <= most,
                "lora.rank {} exceeds the {} projection's smaller side ({} × {}): at most {most}",
                self.rank,
                t.name(),
                g.out_dim,
                g.in_dim
            );
        }
        Ok(())
    }

    /// Every adapter of `config`, layer by layer, targets in order.
    pub fn adapters(&self, config: &ModelConfig) -> Vec<Adapter> {
        (0..config.n_layers)
            .flat_map(|layer| {
                self.targets.iter().map(move |&target| Adapter {
                    layer,
                    target,
                    geometry: target.geometry(config),
                })
            })
            .collect()
    }

    /// The adapter tensors (internal names, shapes): `A` then `B` of each adapter.
    pub fn tensor_specs(&self, config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
        self.adapters(config)
            .iter()
            .flat_map(|a| {
                [
                    (a.a_name(), vec![self.rank, a.geometry.in_dim]),
                    (a.b_name(), vec![a.geometry.out_dim, self.rank]),
                ]
            })
            .collect()
    }

    /// Trainable parameters.
    pub fn n_params(&self, config: &ModelConfig) -> usize {
        self.tensor_specs(config).iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }
}

/// One adapter: its layer, target and geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Adapter {
    pub layer: usize,
    pub target: LoraTarget,
    pub geometry: Geometry,
}

impl Adapter {
    pub fn a_name(&self) -> String {
        format!("layers.{}.{}.lora_A", self.layer, self.target.name())
    }
    pub fn b_name(&self) -> String {
        format!("layers.{}.{}.lora_B", self.layer, self.target.name())
    }
}

/// Fresh adapters: A ~ N(0, 1), B = 0 (SimpleLLaMA's), so the adapted model starts as the base.
/// Each tensor draws from its own stream of `seed`.
pub fn init_adapters(lora: &LoraConfig, config: &ModelConfig, seed: u64) -> Vec<NamedTensor> {
    let root = Rng::new(seed).fork(0x10A);
    lora.tensor_specs(config)
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n: usize = shape.iter().product();
            let data = if i % 2 == 0 {
                let mut rng = root.fork(i as u64);
                (0..n).map(|_| rng.normal() as f32).collect()
            } else {
                vec![0.0; n]
            };
            NamedTensor::new(name, shape, data)
        })
        .collect()
}

/// Checks that `adapters` are exactly the adapter tensors of `lora` on `config` (any order) and
/// returns them in layout order.
pub fn check_adapters<'a>(
    lora: &LoraConfig,
    config: &ModelConfig,
    adapters: &'a [NamedTensor],
) -> Result<Vec<&'a NamedTensor>> {
    let specs = lora.tensor_specs(config);
    let mut out = Vec::with_capacity(specs.len());
    for (name, shape) in &specs {
        let t = adapters
            .iter()
            .find(|t| &t.name == name)
            .with_context(|| format!("missing adapter tensor {name}"))?;
        t.check_shape(shape)?;
        out.push(t);
    }
    if adapters.len() != specs.len() {
        let extra: Vec<&str> =
            adapters.iter().map(|t| t.name.as_str()).filter(|n| !specs.iter().any(|(s, _)| s == n)).collect();
        bail!("unexpected adapter tensors: {}", extra.join(", "));
    }
    Ok(out)
}

/// Folds the adapters into the base weights (internal tensors): `W[col.., :] += scale · B·A` for
/// each adapter, so the merged model computes what base + adapters computed.
pub fn merge_into(
    lora: &LoraConfig,
    config: &ModelConfig,
    base: &mut [NamedTensor],
    adapters: &[NamedTensor],
) -> Result<()> {
    let ordered = check_adapters(lora, config, adapters)?;
    let scale = lora.scale() as f64;
    let r = lora.rank;
    for (k, a) in lora.adapters(config).iter().enumerate() {
        let (at, bt) = (ordered[2 * k], ordered[2 * k + 1]);
        let site = match a.target.site() {
            Site::Qkv => "qkv",
            Site::O => "o",
            Site::GateUp => "gate_up",
            Site::Down => "down",
        };
        let name = format!("layers.{}.{site}", a.layer);
        let w =
            base.iter_mut().find(|t| t.name == name).with_context(|| format!("missing parameter {name}"))?;
        let g = a.geometry;
        ensure!(
            w.shape == [g.ld, g.in_dim],
            "parameter {name} has shape {:?}, the adapter {} expects [{}, {}]",
            w.shape,
            a.a_name(),
            g.ld,
            g.in_dim
        );
        for o in 0..g.out_dim {
            let row = &mut w.data[(g.col + o) * g.in_dim..(g.col + o + 1) * g.in_dim];
            for j in 0..r {
                let b = bt.data[o * r + j] as f64 * scale;
                if b == 0.0 {
                    continue;
                }
                let arow = &at.data[j * g.in_dim..(j + 1) * g.in_dim];
                for (x, &av) in row.iter_mut().zip(arow) {
                    *x = (*x as f64 + b * av as f64) as f32;
                }
            }
            // Finite adapters can still overflow f32 in the sum: a merged checkpoint of
            // infinities would be refused only when loaded, far from its cause.
            if let Some(i) = row.iter().position(|x| !x.is_finite()) {
                bail!(
                    "merging {} and {} into {name} gives {} at row {}, column {i}: the adapter's \
                     values (scale {scale}) overflow the weights",
                    a.a_name(),
                    a.b_name(),
                    row[i],
                    g.col + o
                );
            }
        }
    }
    Ok(())
}

/// `(fixed, per_token)` bytes that a model with `lora` allocates beyond a base model's compute
/// weights and activations: the adapters (and, training, their f32 master, gradient and two
/// moments, plus the scratch that takes the frozen norms' and lm_head's weight gradients, which
/// the fused ops always compute), and per token the saved `x·Aᵀ` rows and the scratch.
pub fn extra_memory_bytes(
    lora: &LoraConfig,
    config: &ModelConfig,
    compute_bytes: usize,
    training: bool,
) -> (usize, usize) {
    let n = lora.n_params(config);
    let mut fixed = n * (compute_bytes + if training { 16 } else { 0 });
    if training {
        fixed += 4 * (config.vocab_size * config.d_model + config.d_model);
    }
    let adapters = lora.targets.len() * config.n_layers;
    let mut per_token = (adapters + 1) * lora.rank * compute_bytes;
    if training && lora.dropout > 0.0 {
        per_token += max_in(lora, config) * compute_bytes;
    }
    (fixed, per_token)
}

fn max_in(lora: &LoraConfig, config: &ModelConfig) -> usize {
    lora.targets.iter().map(|t| t.geometry(config).in_dim).max().unwrap_or(0)
}

/// The seed of the LoRA dropout mask of `site` in `layer`, from a micro-batch's dropout seed.
fn site_seed(seed: u64, layer: usize, site: Site) -> u64 {
    Rng::new(seed).fork(0x10A0D).fork((4 * layer + site as usize) as u64).seed
}

/// The adapters on a backend: weights, and for training their gradients, f32 master copies and
/// moments, plus the saved `x·Aᵀ` of each adapter and scratch.
pub struct LoraState<B: Backend> {
    pub config: LoraConfig,
    adapters: Vec<Adapter>,
    names: Vec<(String, Vec<usize>)>,
    lens: Vec<usize>,
    /// `2k` is adapter `k`'s A, `2k + 1` its B.
    params: Vec<B::Buf>,
    master: Vec<B::Buf>,
    grads: Vec<B::Buf>,
    m: Vec<B::Buf>,
    v: Vec<B::Buf>,
    /// `x·Aᵀ` `[n, rank]` of each adapter, from the forward pass.
    xa: Vec<B::Buf>,
    /// The gradient of one adapter's `x·Aᵀ`.
    dxa: B::Buf,
    /// The adapters' input after dropout (training with dropout only).
    dropped: Option<B::Buf>,
    /// Where the frozen norms' weight gradients go (F32 `[d]`).
    pub(crate) discard_norm: Option<B::Buf>,
    /// Where the frozen lm_head's weight gradient goes (F32 `[vocab, d]`).
    pub(crate) discard_head: Option<B::Buf>,
}

impl<B: Backend> LoraState<B> {
    /// Allocates adapters (zero) for `max_tokens` rows.
    pub fn new(
        be: &B,
        lora: &LoraConfig,
        config: &ModelConfig,
        max_tokens: usize,
        training: bool,
    ) -> Result<Self> {
        lora.validate(config)?;
        let names = lora.tensor_specs(config);
        let lens: Vec<usize> = names.iter().map(|(_, s)| s.iter().product()).collect();
        let alloc =
            |lens: &[usize], p| -> Result<Vec<B::Buf>> { lens.iter().map(|&l| be.zeros(l, p)).collect() };
        let state: &[usize] = if training { &lens } else { &[] };
        let adapters = lora.adapters(config);
        let n = max_tokens;
        let c = Precision::Compute;
        Ok(LoraState {
            config: lora.clone(),
            params: alloc(&lens, c)?,
            master: alloc(state, Precision::F32)?,
            grads: alloc(state, Precision::F32)?,
            m: alloc(state, Precision::F32)?,
            v: alloc(state, Precision::F32)?,
            xa: adapters.iter().map(|_| be.zeros(n * lora.rank, c)).collect::<Result<_>>()?,
            dxa: be.zeros(n * lora.rank, c)?,
            dropped: if training && lora.dropout > 0.0 {
                Some(be.zeros(n * max_in(lora, config), c)?)
            } else {
                None
            },
            discard_norm: if training { Some(be.zeros(config.d_model, Precision::F32)?) } else { None },
            discard_head: if training {
                Some(be.zeros(config.vocab_size * config.d_model, Precision::F32)?)
            } else {
                None
            },
            adapters,
            names,
            lens,
        })
    }

    fn training(&self) -> bool {
        !self.grads.is_empty()
    }

    /// Writes the adapter weights (master and compute copies); resets nothing else.
    pub fn write(&mut self, be: &B, config: &ModelConfig, adapters: &[NamedTensor]) -> Result<()> {
        let ordered = check_adapters(&self.config, config, adapters)?;
        for (i, t) in ordered.iter().enumerate() {
            be.write(&mut self.params[i], &t.data)?;
            if self.training() {
                be.write(&mut self.master[i], &t.data)?;
            }
        }
        Ok(())
    }

    fn read_named(&self, be: &B, bufs: &[B::Buf]) -> Result<Vec<NamedTensor>> {
        self.names
            .iter()
            .zip(&self.lens)
            .zip(bufs)
            .map(|(((name, shape), &len), buf)| {
                Ok(NamedTensor::new(name.clone(), shape.clone(), be.read(buf, len)?))
            })
            .collect()
    }

    /// The adapter weights (the f32 master copies when training).
    pub fn read(&self, be: &B) -> Result<Vec<NamedTensor>> {
        self.read_named(be, if self.training() { &self.master } else { &self.params })
    }

    pub fn read_grads(&self, be: &B) -> Result<Vec<NamedTensor>> {
        self.read_named(be, &self.grads)
    }

    pub fn read_moments(&self, be: &B) -> Result<(Vec<NamedTensor>, Vec<NamedTensor>)> {
        Ok((self.read_named(be, &self.m)?, self.read_named(be, &self.v)?))
    }

    pub fn write_moments(
        &mut self,
        be: &B,
        config: &ModelConfig,
        m: &[NamedTensor],
        v: &[NamedTensor],
    ) -> Result<()> {
        ensure!(self.training(), "the adapters were built for inference only");
        let m =
            check_adapters(&self.config, config, m).context("writing the adapters' Adam first moments")?;
        let v =
            check_adapters(&self.config, config, v).context("writing the adapters' Adam second moments")?;
        for i in 0..self.lens.len() {
            be.write(&mut self.m[i], &m[i].data)?;
            be.write(&mut self.v[i], &v[i].data)?;
        }
        Ok(())
    }

    /// Data parallelism over the adapters: their gradients, concatenated in order into one host
    /// f32 buffer, through `reduce` (an all-reduce over the ranks) and back.
    pub fn all_reduce_grads(&mut self, be: &B, reduce: impl FnOnce(&mut [f32]) -> Result<()>) -> Result<()> {
        super::forward::reduce_flat(be, &mut self.grads, &self.lens, reduce)
    }

    pub fn zero_grads(&mut self, be: &B) -> Result<()> {
        for (g, &len) in self.grads.iter_mut().zip(&self.lens) {
            be.zero(g, len)?;
        }
        Ok(())
    }

    pub fn zero_moments(&mut self, be: &B) -> Result<()> {
        for i in 0..self.m.len() {
            be.zero(&mut self.m[i], self.lens[i])?;
            be.zero(&mut self.v[i], self.lens[i])?;
        }
        Ok(())
    }

    /// The adapters' gradient sum of squares into `stats` (the trait's statistics buffer).
    pub fn sum_squares(&self, be: &B, stats: &mut B::Buf) -> Result<()> {
        let bufs: Vec<&B::Buf> = self.grads.iter().collect();
        be.sum_squares(&bufs, &self.lens, stats)
    }

    pub fn adamw(&mut self, be: &B, hp: &AdamW, clip: Option<Clip<'_, B>>) -> Result<()> {
        let mut params: Vec<&mut B::Buf> = self.params.iter_mut().collect();
        let mut master: Vec<&mut B::Buf> = self.master.iter_mut().collect();
        let grads: Vec<&B::Buf> = self.grads.iter().collect();
        let mut m: Vec<&mut B::Buf> = self.m.iter_mut().collect();
        let mut v: Vec<&mut B::Buf> = self.v.iter_mut().collect();
        be.adamw(&mut params, &mut master, &grads, &mut m, &mut v, StateDtype::F32, &self.lens, hp, clip)
    }

    /// The adapters of `site` in `layer`, by index.
    fn at(&self, layer: usize, site: Site) -> impl Iterator<Item = usize> + '_ {
        let per_layer = self.config.targets.len();
        (layer * per_layer..(layer + 1) * per_layer).filter(move |&k| self.adapters[k].target.site() == site)
    }

    /// The adapters' input: `inp`, or a copy with the site's dropout mask applied.
    fn input<'a>(
        dropped: &'a mut Option<B::Buf>,
        be: &B,
        inp: &'a B::Buf,
        len: usize,
        p: f32,
        seed: Option<u64>,
    ) -> Result<&'a B::Buf> {
        match (dropped, seed) {
            (Some(buf), Some(seed)) => {
                be.copy(buf, inp, len)?;
                be.dropout(buf, len, p, seed)?;
                Ok(buf)
            }
            _ => Ok(inp),
        }
    }

    /// After the base projection of `site` in `layer` wrote `out` from `inp` (`n` rows): adds
    /// each adapter's `scale · (drop(inp)·Aᵀ)·Bᵀ` into its columns. `dropout_seed`: the
    /// micro-batch's (None: no dropout).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_site(
        &mut self,
        be: &B,
        layer: usize,
        site: Site,
        out: &mut B::Buf,
        inp: &B::Buf,
        n: usize,
        dropout_seed: Option<u64>,
    ) -> Result<()> {
        let ks: Vec<usize> = self.at(layer, site).collect();
        let Some(&first) = ks.first() else { return Ok(()) };
        let (r, scale, p) = (self.config.rank, self.config.scale(), self.config.dropout);
        let in_dim = self.adapters[first].geometry.in_dim;
        let seed = dropout_seed.filter(|_| p > 0.0).map(|s| site_seed(s, layer, site));
        let x = Self::input(&mut self.dropped, be, inp, n * in_dim, p, seed)?;
        for k in ks {
            let g = self.adapters[k].geometry;
            be.matmul_forward(&mut self.xa[k], x, &self.params[2 * k], n, g.in_dim, r)?;
            be.matmul_forward_slice(
                out,
                &self.xa[k],
                &self.params[2 * k + 1],
                n,
                r,
                g.out_dim,
                g.ld,
                g.col,
                scale,
                GradMode::Accumulate,
            )?;
        }
        Ok(())
    }

    /// Backward of [`Self::forward_site`] from `dout` (the site's output gradient): adds into
    /// the adapters' gradients and writes their input gradient into `dinp` (overwritten, through
    /// the dropout mask). Returns whether it wrote `dinp`, so the base projection's input
    /// gradient accumulates onto it.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_site(
        &mut self,
        be: &B,
        layer: usize,
        site: Site,
        dout: &B::Buf,
        inp: &B::Buf,
        dinp: &mut B::Buf,
        n: usize,
        dropout_seed: Option<u64>,
    ) -> Result<bool> {
        let ks: Vec<usize> = self.at(layer, site).collect();
        let Some(&first) = ks.first() else { return Ok(false) };
        let (r, scale, p) = (self.config.rank, self.config.scale(), self.config.dropout);
        let in_dim = self.adapters[first].geometry.in_dim;
        let seed = dropout_seed.filter(|_| p > 0.0).map(|s| site_seed(s, layer, site));
        let x = Self::input(&mut self.dropped, be, inp, n * in_dim, p, seed)?;
        let (params, grads) = (&self.params, &mut self.grads);
        for (i, &k) in ks.iter().enumerate() {
            let g = self.adapters[k].geometry;
            let (ga, gb) = grads.split_at_mut(2 * k + 1);
            be.matmul_backward_slice(
                Some(&mut self.dxa),
                Some(&mut gb[0]),
                dout,
                &self.xa[k],
                &params[2 * k + 1],
                n,
                r,
                g.out_dim,
                g.ld,
                g.col,
                scale,
                GradMode::Overwrite,
            )?;
            be.matmul_backward_slice(
                Some(dinp),
                Some(&mut ga[2 * k]),
                &self.dxa,
                x,
                &params[2 * k],
                n,
                g.in_dim,
                r,
                r,
                0,
                1.0,
                if i > 0 { GradMode::Accumulate } else { GradMode::Overwrite },
            )?;
        }
        if let Some(seed) = seed {
            be.dropout(dinp, n * in_dim, p, seed)?;
        }
        Ok(true)
    }
}
