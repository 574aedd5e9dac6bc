//! `sft init`, `sft train` and `sft eval`.

use crate::backend::Backend;
use crate::checkpoint::{self, Checkpoint};
use crate::data::{
    batches_from_examples, batches_in_order, longest_example, read_chat_file, tokenize_conversation,
    BatchMode, ChatTokenizer, Dataset, LoaderConfig, Split, TrainOn, DEFAULT_SYSTEM_PROMPT,
};
use crate::dist::{Collectives, Launch, SingleProcess};
use crate::generate::{generate_reply, SamplingConfig};
use crate::model::Model;
use crate::rng::Rng;
use crate::train::config::{default_seq_len, Device, TrainConfig};
use crate::train::state::TrainerState;
use crate::train::trainer::{eval_loss, resolve_model_config, train_ranks, TrainReport};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct InitArgs {
    /// A preset (`tiny`, `simplellama-1.3b`), a model-config JSON file, or a model directory or
    /// its config.json (sft's or a Hugging Face Llama's: its shape, with random weights).
    #[arg(long)]
    pub model: String,
    /// The checkpoint directory to create.
    #[arg(long)]
    pub out: PathBuf,
    /// Seeds the random weights.
    #[arg(long, default_value_t = 89)]
    pub seed: u64,
    /// Copied into the checkpoint; also gives the `tiny` preset its vocabulary size.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// The vocabulary size of the `tiny` preset when no tokenizer is given.
    #[arg(long)]
    pub vocab_size: Option<usize>,
}

/// Writes a randomly initialized checkpoint.
pub fn init(args: InitArgs) -> Result<()> {
    let tokenizer = args.tokenizer.as_deref().map(ChatTokenizer::from_file).transpose()?;
    let vocab = match (&tokenizer, args.vocab_size) {
        (_, Some(v)) => v,
        (Some(t), None) => t.vocab_size(),
        (None, None) if args.model == "tiny" => {
            bail!("the tiny preset needs a vocabulary size: give --tokenizer or --vocab-size")
        }
        (None, None) => 0,
    };
    let config = resolve_model_config(&args.model, vocab)?;
    if let Some(t) = &tokenizer {
        anyhow::ensure!(
            t.vocab_size() <= config.vocab_size,
            "the tokenizer has {} tokens but the model's vocabulary holds {}",
            t.vocab_size(),
            config.vocab_size
        );
    }
    let n_params = config.n_params();
    // Parameters alone: a whole Model would also allocate gradients and optimizer state.
    let params = crate::model::params::init_params(&config, args.seed);
    checkpoint::save_weights(&args.out, &config, params, args.tokenizer.as_deref())?;
    println!("wrote {} ({n_params} parameters, seed {})", args.out.display(), args.seed);
    Ok(())
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// A JSON TrainConfig; the flags below override its fields.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// A preset (`tiny`, `simplellama-1.3b`), a model-config JSON file, or a model directory or
    /// its config.json (its shape only); ignored when the weights
    /// come from --init-from or --resume (default: simplellama-1.3b).
    #[arg(long)]
    pub model: Option<String>,
    /// The prepared data directory (`sft prepare`).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// The tokenizer the data was prepared with (default: DATA/tokenizer.json).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Where checkpoints (step-N/, latest) and log.csv go (default: runs/sft).
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Start from this checkpoint's weights.
    #[arg(long)]
    pub init_from: Option<PathBuf>,
    /// Continue the run in out_dir from its `latest` checkpoint, with that run's settings (the
    /// flags given here, and --config's fields, override them).
    #[arg(long)]
    pub resume: bool,
    /// Start from randomly initialized weights of --model (instead of --init-from).
    #[arg(long)]
    pub from_scratch: bool,
    /// Passes over the training split (default: 3).
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Stop after this many optimizer steps (whatever --epochs says); also the LR schedule's
    /// length unless --schedule-steps is given.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// The LR schedule's length in optimizer steps (default: --max-steps, else every epoch's).
    #[arg(long)]
    pub schedule_steps: Option<u64>,
    /// Examples per micro-batch, or `auto` (the default): the largest that fits the device, at
    /// most 32, with grad_accum raised so that a step keeps 32 × grad_accum examples.
    #[arg(long)]
    pub micro_batch: Option<crate::train::config::MicroBatch>,
    /// Micro-batches per optimizer step (default: 16).
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// packed (the default: whole examples in rows of max_seq_len, no compute on padding),
    /// dynamic (SimpleLLaMA's padding to the batch's longest example) or fixed.
    #[arg(long, value_enum)]
    pub batch_mode: Option<BatchMode>,
    /// Row length; default 2048, or the data's longest example, at most the model's context.
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// Shuffle the training examples, reshuffled each epoch (default: true).
    #[arg(long)]
    pub shuffle: Option<bool>,
    /// Peak learning rate, after the warmup (default: 1e-5).
    #[arg(long)]
    pub max_lr: Option<f64>,
    /// Learning rate at the end of the cosine decay (default: 1e-6).
    #[arg(long)]
    pub min_lr: Option<f64>,
    /// Optimizer steps of linear warmup (default: 100).
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// AdamW's first-moment decay (default: 0.9).
    #[arg(long)]
    pub beta1: Option<f32>,
    /// AdamW's second-moment decay (default: 0.95).
    #[arg(long)]
    pub beta2: Option<f32>,
    /// AdamW's epsilon (default: 1e-8).
    #[arg(long)]
    pub eps: Option<f32>,
    /// AdamW's decoupled weight decay (default: 0.01).
    #[arg(long)]
    pub weight_decay: Option<f32>,
    /// Clip the global gradient norm to this; 0 turns clipping off (default: 1.0).
    #[arg(long)]
    pub clip: Option<f64>,
    /// Seeds the data order, dropout and fresh weights (default: 89).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Overrides the model config's dropout on the attention and FFN outputs.
    #[arg(long)]
    pub dropout: Option<f32>,
    /// Validation loss on --eval-batches batches every this many steps; 0 never (a full pass runs
    /// at each epoch end regardless; default: 50).
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Validation batches of the quick evaluation (default: 8).
    #[arg(long)]
    pub eval_batches: Option<usize>,
    /// A checkpoint every this many steps; 0 only at the end (default: 500).
    #[arg(long)]
    pub save_every: Option<u64>,
    /// Checkpoints kept in OUT_DIR, the newest; 0 keeps all (default: 3).
    #[arg(long)]
    pub keep_checkpoints: Option<usize>,
    /// Sample replies to the --sample prompts at steps N, 2N, 4N, ...; 0 never (default: 100).
    #[arg(long)]
    pub sample_every: Option<u64>,
    /// A prompt for the sample replies (repeat the flag for several; replaces the config's).
    #[arg(long = "sample")]
    pub samples: Vec<String>,
    /// Without a terminal, a progress line every this many steps (default: 10).
    #[arg(long)]
    pub log_every: Option<u64>,
    /// auto, cpu or cuda.
    #[arg(long)]
    pub device: Option<String>,
    /// Activation recompute: none, mlp (the FFN's gate/up and SwiGLU), layer (each layer's
    /// whole forward, from its input) or auto (the least that fits the device). Less memory,
    /// the same gradients. Default: the resumed run's, else none.
    #[arg(long, value_name = "MODE")]
    pub recompute: Option<crate::model::RecomputeChoice>,
    #[command(flatten)]
    pub lora: crate::lora::LoraArgs,
    /// Storage of the AdamW moments: f32 (default) or bf16 (4 bytes per parameter fewer; full
    /// fine-tuning only). --resume needs the state type the run was saved with.
    #[arg(long, value_name = "f32|bf16")]
    pub optimizer_state: Option<crate::backend::StateDtype>,
    /// Over several ranks: 1 splits the f32 master weights and AdamW moments over them
    /// (ZeRO-1: 12 bytes per parameter become 12 / ranks), 0 (default) keeps them whole on
    /// every rank. The same run either way.
    #[arg(long, value_name = "0|1")]
    pub zero_stage: Option<u8>,
    /// Over several ranks: true (default) sums the gradients layer by layer during the last
    /// micro-batch's backward (beside it, on GPUs), false all at once after it. The same run.
    #[arg(long, value_name = "true|false")]
    pub grad_overlap: Option<bool>,
    /// Over several ranks without MPI: a file every rank sees (a shared filesystem), through
    /// which they meet to talk over TCP (rank 0 writes its address there, and removes the file
    /// once all are in). Default: the SFT_RENDEZVOUS variable; neither: MPI.
    #[arg(long, value_name = "FILE")]
    pub rendezvous: Option<PathBuf>,
}

impl TrainArgs {
    /// The config file (or the defaults) with every given flag applied over it. With --resume,
    /// what neither the file nor a flag sets comes from the run being resumed (its
    /// `trainer_state.json`), not from the defaults: `sft train --out-dir DIR --resume` continues
    /// that run as it was configured, and only the settings given here change it.
    pub fn to_config(&self) -> Result<TrainConfig> {
        let mut c = match &self.config {
            Some(path) => TrainConfig::load(path)?,
            None => TrainConfig::default(),
        };
        self.apply_flags(&mut c)?;
        if !c.resume {
            return Ok(c);
        }
        // Without a checkpoint there is nothing to inherit; the trainer then says what is missing.
        let Some(dir) = checkpoint::latest(&c.out_dir)? else { return Ok(c) };
        let saved = TrainerState::load(&dir)?.config;
        let out_dir = c.out_dir;
        let mut c = match &self.config {
            Some(path) => TrainConfig::load_over(path, &saved)?,
            None => saved,
        };
        self.apply_flags(&mut c)?;
        // Where the run was found, whatever directory it was first started with.
        c.out_dir = out_dir;
        c.resume = true;
        Ok(c)
    }

    fn apply_flags(&self, c: &mut TrainConfig) -> Result<()> {
        macro_rules! apply {
            ($($field:ident),*) => {$(
                if let Some(v) = &self.$field {
                    c.$field = v.clone().into();
                }
            )*};
        }
        apply!(model, data, tokenizer, out_dir, epochs, micro_batch, grad_accum, batch_mode, shuffle);
        apply!(max_lr, min_lr, warmup_steps, beta1, beta2, eps, weight_decay, clip, seed);
        apply!(eval_every, eval_batches, save_every, keep_checkpoints, sample_every, log_every, device);
        apply!(init_from, max_steps, schedule_steps, max_seq_len, dropout, optimizer_state, zero_stage);
        apply!(grad_overlap);
        if let Some(r) = self.recompute {
            c.recompute = Some(r);
        }
        if self.resume {
            c.resume = true;
        }
        if self.from_scratch {
            c.from_scratch = true;
        }
        if !self.samples.is_empty() {
            c.samples = self.samples.clone();
        }
        c.lora = self.lora.apply(c.lora.take())?;
        Ok(())
    }
}

/// Trains as the config file and flags say, then prints a summary.
pub fn train(args: TrainArgs) -> Result<()> {
    let cfg = args.to_config()?;
    let launch = Launch::from_env()?;
    let comm = crate::dist::connect(&launch, args.rendezvous.as_deref())?;
    crate::train::interrupt::watch()?;
    let report = match train_on_device_ranks(&cfg, comm.as_ref(), launch.local_rank) {
        Ok(report) => report,
        // Every rank stopped after the same step, past the last barrier: nothing to abort.
        Err(e) if e.is::<crate::train::interrupt::Interrupted>() => return Err(e),
        // The other ranks would wait for this one forever in their next collective.
        Err(e) if comm.world_size() > 1 => {
            // One write: stderr is unbuffered, and mpirun interleaves the ranks' pieces.
            let line = format!("error on rank {} of {}: {e:#}\n", comm.rank(), comm.world_size());
            let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
            comm.abort(1)
        }
        Err(e) => return Err(e),
    };
    if !comm.is_main() {
        return Ok(());
    }
    if report.step_losses.is_empty() {
        // A resumed run that had already reached its end (a job relaunched after it finished):
        // nothing to do, and no loss of this invocation to print (it used to say NaN).
        crate::report!(
            "done: the run in {} is already at step {}: nothing to train (raise --max-steps or --epochs to go on)",
            cfg.out_dir.display(),
            report.steps
        );
        return Ok(());
    }
    crate::report!(
        "done: {} steps, train loss {:.4}, val loss {}, {:.0} tokens/s{}",
        report.steps,
        report.final_train_loss,
        report.final_val_loss.map_or("-".into(), |l| format!("{l:.4}")),
        report.tokens_per_s,
        report.checkpoint.map_or(String::new(), |d| format!(", saved {}", d.display()))
    );
    Ok(())
}

/// Stream id of the sample replies' sampling, apart from the other uses of the seed.
const SAMPLE_STREAM: u64 = 0x5A3F;

/// Trains on the configured device, printing sample replies at growing intervals. The sample
/// replies are wired here, where training and generation are both visible.
pub fn train_on_device(cfg: &TrainConfig) -> Result<TrainReport> {
    train_on_device_ranks(cfg, &SingleProcess, 0)
}

/// [`train_on_device`] as one rank of a data-parallel job over `comm` (docs/distributed.md).
/// With `device = "cuda"` each rank opens the GPU of its `local_rank` (or the only one it sees)
/// and the GPUs join one
/// NCCL communicator, which sums the gradients on the devices; `auto` means the CPU over
/// several ranks (a job says where it runs).
pub fn train_on_device_ranks(
    cfg: &TrainConfig,
    comm: &dyn Collectives,
    local_rank: usize,
) -> Result<TrainReport> {
    cfg.validate()?;
    match (cfg.device_kind()?, comm.world_size()) {
        (device, 1) => crate::with_backend!(device, |backend| train_with_samples(backend, cfg, comm)),
        (Device::Cpu | Device::Auto, _) => {
            train_with_samples(crate::backend::cpu::CpuBackend::<f32>::new(), cfg, comm)
        }
        (Device::Cuda, world) => {
            let mut backend = crate::backend::cuda::nccl::open_local_gpu(local_rank).with_context(|| {
                format!("rank {} of {world} (local rank {local_rank}) opening its GPU", comm.rank())
            })?;
            crate::dist::join_gpu_ranks(&mut backend, comm).with_context(|| {
                format!("rank {} of {world} joining the job's NCCL communicator", comm.rank())
            })?;
            train_with_samples(backend, cfg, comm)
        }
    }
}

/// [`train_ranks`] with the sample replies of the config.
fn train_with_samples<B: Backend>(
    backend: B,
    cfg: &TrainConfig,
    comm: &dyn Collectives,
) -> Result<TrainReport> {
    let sampling = SamplingConfig { max_new_tokens: 64, ..SamplingConfig::default() };
    let mut rng = Rng::new(cfg.seed).fork(SAMPLE_STREAM);
    let mut sampler = |model: &mut Model<B>, tok: &ChatTokenizer, prompt: &str| {
        generate_reply(model, tok, DEFAULT_SYSTEM_PROMPT, &[], prompt, &sampling, &mut rng)
    };
    Ok(train_ranks(backend, cfg, Some(&mut sampler), comm)?.1)
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// The checkpoint directory to evaluate (ours or a Hugging Face Llama).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// A chat JSON/JSONL file, or a prepared data directory.
    #[arg(long)]
    pub data: PathBuf,
    /// Default: the checkpoint's tokenizer.json.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// The split of a prepared directory (default: val); a chat file has none.
    #[arg(long, value_enum)]
    pub split: Option<SplitArg>,
    /// What a chat file supervises (default: final-reply); a prepared directory's masks are in its
    /// shards, and another choice than its own is refused.
    #[arg(long, value_enum)]
    pub train_on: Option<TrainOn>,
    /// Examples per forward pass.
    #[arg(long, default_value_t = 8)]
    pub micro_batch: usize,
    /// Default: 2048, or a prepared directory's longest example, at most the model's max_seq_len.
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// How examples are batched; the loss is the same in every mode.
    #[arg(long, value_enum, default_value = "dynamic")]
    pub batch_mode: BatchMode,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// A LoRA adapter (PEFT layout) trained on the checkpoint, applied without merging.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[command(flatten)]
    pub chat: crate::data::template::ChatFormatArgs,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum SplitArg {
    Train,
    Val,
}

/// Prints the mean masked loss of a checkpoint on a data set.
pub fn eval(args: EvalArgs) -> Result<()> {
    let report = crate::with_backend!(Device::parse(&args.device)?, |backend| eval_with(backend, &args)?);
    println!(
        "mean masked loss {:.6} (perplexity {:.3}) over {} supervised tokens in {} batches",
        report.loss,
        report.loss.exp(),
        report.supervised_tokens,
        report.batches
    );
    Ok(())
}

/// What `sft eval` measured.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalReport {
    /// Mean loss per supervised target.
    pub loss: f64,
    pub supervised_tokens: usize,
    pub batches: usize,
}

/// `sft eval` on a given backend.
pub fn eval_with<B: Backend>(backend: B, args: &EvalArgs) -> Result<EvalReport> {
    anyhow::ensure!(args.micro_batch > 0, "--micro-batch must be at least 1");
    let ckpt = Checkpoint::open(&args.checkpoint)?;
    let longest = if args.data.is_dir() { longest_example(&args.data)? } else { None };
    let max_seq_len = args.max_seq_len.unwrap_or_else(|| default_seq_len(ckpt.config().max_seq_len, longest));
    // A chat file needs the tokenizer; a prepared directory is checked against it when there is one.
    let tok_path = args.tokenizer.clone().unwrap_or_else(|| args.checkpoint.join(checkpoint::TOKENIZER_FILE));
    let tok = if args.data.is_dir() && !tok_path.exists() {
        None
    } else {
        Some(checkpoint::load_tokenizer_for(
            &args.checkpoint,
            args.tokenizer.as_deref(),
            &args.chat.choice(),
        )?)
    };
    ckpt.config().check_usage(tok.as_ref().map(|t| (tok_path.as_path(), t.vocab_size())), max_seq_len)?;
    let loader_config = LoaderConfig {
        batch_size: args.micro_batch,
        max_seq_len,
        mode: args.batch_mode,
        shuffle: false,
        seed: 0,
    };
    crate::data::prepare::check_view_flags(&args.data, args.train_on, args.split.is_some())?;
    let batches = if args.data.is_dir() {
        let split = match args.split.unwrap_or(SplitArg::Val) {
            SplitArg::Train => Split::Train,
            SplitArg::Val => Split::Val,
        };
        let dataset = Dataset::open(&args.data, split)?;
        if args.tokenizer.is_some() || args.checkpoint.join("tokenizer.json").exists() {
            dataset.ensure_tokenizer(&checkpoint::load_tokenizer_for(
                &args.checkpoint,
                args.tokenizer.as_deref(),
                &args.chat.choice(),
            )?)?;
        }
        batches_in_order(&dataset, &loader_config)?
    } else {
        let tok = tok.expect("loaded above for a chat file");
        let convs = read_chat_file(&args.data)?;
        let mut examples = Vec::with_capacity(convs.len());
        for (i, conv) in convs.iter().enumerate() {
            let ex = tokenize_conversation(&tok, conv, args.train_on.unwrap_or_default())
                .with_context(|| format!("{}: conversation {i}", args.data.display()))?;
            examples.push(ex);
        }
        let n_all = examples.len();
        examples.retain(|ex| ex.tokens.len() <= max_seq_len);
        if examples.len() < n_all {
            eprintln!(
                "skipped {} of {n_all} conversations longer than {max_seq_len} tokens",
                n_all - examples.len()
            );
        }
        batches_from_examples(&examples, tok.pad_id(), &loader_config)?
    };
    let max_tokens =
        args.micro_batch.checked_mul(max_seq_len).context("--micro-batch × --max-seq-len overflows")?;
    let mut model = crate::lora::inference_model(&ckpt, args.adapter.as_deref(), backend, max_tokens)?;
    let loss = eval_loss(&mut model, &batches).with_context(|| {
        let split = args.data.is_dir().then(|| format!(" (split {:?})", args.split.unwrap_or(SplitArg::Val)));
        format!("evaluating on {}{}", args.data.display(), split.unwrap_or_default())
    })?;
    let supervised_tokens = batches.iter().map(|b| b.n_supervised()).sum();
    Ok(EvalReport { loss, supervised_tokens, batches: batches.len() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        args: TrainArgs,
    }

    #[test]
    fn flags_override_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("run.json");
        std::fs::write(&file, r#"{"micro_batch": 4, "grad_accum": 2, "max_lr": 2e-5, "data": "prepared"}"#)
            .unwrap();
        let cmd = Cmd::parse_from([
            "train",
            "--config",
            file.to_str().unwrap(),
            "--grad-accum",
            "8",
            "--batch-mode",
            "packed",
            "--resume",
            "--sample",
            "Hi?",
        ]);
        let c = cmd.args.to_config().unwrap();
        assert_eq!((c.micro_batch, c.grad_accum, c.max_lr), (4.into(), 8, 2e-5));
        assert_eq!(c.batch_mode, BatchMode::Packed);
        assert_eq!(c.data, PathBuf::from("prepared"));
        assert!(c.resume);
        assert_eq!(c.samples, vec!["Hi?".to_string()]);
        assert_eq!(c.seed, 89, "untouched fields keep their defaults");

        std::fs::write(&file, r#"{"micro_batch": 0, "data": "d"}"#).unwrap();
        let cmd = Cmd::parse_from(["train", "--config", file.to_str().unwrap()]);
        let err = cmd.args.to_config().unwrap().validate().unwrap_err();
        assert!(err.to_string().contains("micro_batch"), "{err}");
        std::fs::write(&file, r#"{"recompute": "mlp", "data": "d"}"#).unwrap();
        let cmd = Cmd::parse_from(["train", "--config", file.to_str().unwrap()]);
        let c = cmd.args.to_config().unwrap();
        assert_eq!(c.recompute, Some(crate::model::RecomputeChoice::Fixed(crate::model::Recompute::Mlp)));
        let cmd = Cmd::parse_from(["train", "--config", file.to_str().unwrap(), "--recompute", "auto"]);
        assert_eq!(cmd.args.to_config().unwrap().recompute, Some(crate::model::RecomputeChoice::Auto));
        std::fs::write(&file, r#"{"recompute": "attention", "data": "d"}"#).unwrap();
        let cmd = Cmd::parse_from(["train", "--config", file.to_str().unwrap()]);
        let err = format!("{:#}", cmd.args.to_config().unwrap_err());
        assert!(err.contains("recompute") && err.contains("none, mlp, layer or auto"), "{err}");
        assert!(Cmd::try_parse_from(["train", "--recompute", "everything"]).is_err());
        let cmd = Cmd::parse_from(["train", "--config", "/nonexistent/run.json"]);
        let err = format!("{:#}", cmd.args.to_config().unwrap_err());
        assert!(err.contains("/nonexistent/run.json"), "{err}");
    }

    /// The defaults `sft train --help` states are the ones a run gets: each "(default: V)" of a
    /// flag that is a TrainConfig field equals that field of `TrainConfig::default()`.
    #[test]
    fn the_help_states_the_real_defaults() {
        use clap::CommandFactory;
        let defaults = serde_json::to_value(TrainConfig::default()).unwrap();
        let mut checked = 0;
        for arg in Cmd::command().get_arguments() {
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            let Some(stated) = help.split("(default: ").nth(1).and_then(|r| r.split(')').next()) else {
                continue;
            };
            let field = arg.get_id().as_str();
            let Some(real) = defaults.get(field).filter(|v| !v.is_null()) else { continue };
            if field == "tokenizer" {
                // Empty means DATA/tokenizer.json (`TrainConfig::tokenizer_path`).
                assert_eq!((stated, real.as_str()), ("DATA/tokenizer.json", Some("")));
                continue;
            }
            let real = match real {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => {
                    let f = n.as_f64().unwrap();
                    if n.is_f64() && stated.contains('e') {
                        format!("{f:e}")
                    } else {
                        n.to_string()
                    }
                }
                other => other.to_string(),
            };
            // f32 fields serialize through f64 (1e-8 as 9.99…e-9): compare as numbers there.
            let same = match (stated.parse::<f64>(), real.parse::<f64>()) {
                (Ok(a), Ok(b)) => ((a - b) / b.abs().max(1e-30)).abs() < 1e-6,
                _ => stated == real,
            };
            assert!(same, "--{}: the help says {stated}, TrainConfig::default() has {real}", field);
            checked += 1;
        }
        assert!(checked >= 15, "only {checked} stated defaults found");
    }
}
