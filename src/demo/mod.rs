//! The embedded default, `sft demo`: generated chat tasks, a tiny model, and the whole pipeline
//! on them — train a tokenizer, prepare shards, score the untrained model, train, score again.
//!
//! Scoring is exact match of greedy replies on held-out conversations (generated from another
//! seed than the training set), per task; see [`tasks`] for what the tasks are.

pub mod tasks;

use crate::backend::{Backend, Device};
use crate::data::{
    batches_in_order, prepare, train_tokenizer, BatchMode, ChatTokenizer, Dataset, LoaderConfig,
    PrepareOptions, Split,
};
use crate::generate::{generate_reply, SamplingConfig};
use crate::model::config::ModelConfig;
use crate::model::Model;
use crate::rng::Rng;
use crate::train::{eval_loss, train_with, TrainConfig, TrainReport};
use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tasks::{DemoExample, TASKS};

/// Marks a directory as the demo's own, so that a rerun may clear it.
const MARKER: &str = ".sft-demo";
/// The held-out conversations come from their own stream of the seed.
const HELDOUT_STREAM: u64 = 0x4E1D;

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Where the demo writes its data, tokenizer, shards, log and checkpoint.
    #[arg(long, default_value = "out/demo")]
    pub out: PathBuf,
    /// Training conversations to generate.
    #[arg(long, default_value_t = 8000)]
    pub examples: usize,
    /// Held-out conversations scored before and after training.
    #[arg(long, default_value_t = 200)]
    pub heldout: usize,
    /// Optimizer steps.
    #[arg(long, default_value_t = 1000)]
    pub steps: u64,
    /// Conversations per optimizer step.
    #[arg(long, default_value_t = 32)]
    pub micro_batch: usize,
    /// Seeds the tasks, the weights and the data order.
    #[arg(long, default_value_t = 89)]
    pub seed: u64,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// The LoRA demo: first a base trained on every task but the colour lookup (`--steps`
    /// steps, every weight), then LoRA adapters (rank 16, alpha 32, on every projection) trained
    /// on all four tasks over the frozen base (`--steps` steps); scored before (the base) and
    /// after (base + adapters). The run's checkpoint is then a PEFT adapter over `out/base-run`.
    #[arg(long)]
    pub lora: bool,
}

/// The demo's model: small enough to train on two CPU cores in a few minutes, with grouped KV
/// heads so that the demo runs the grouped path too.
pub fn demo_model_config(vocab_size: usize) -> ModelConfig {
    ModelConfig {
        d_model: 128,
        n_layers: 4,
        n_heads: 4,
        n_kv_heads: 2,
        ffn_hidden: 352,
        max_seq_len: 64,
        ..ModelConfig::tiny(vocab_size)
    }
}

/// The demo tokenizer's vocabulary: bytes, the ten special tokens and a few merges.
pub const DEMO_VOCAB: usize = 320;

/// Exact-match results of one task.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskScore {
    pub task: &'static str,
    pub correct: usize,
    pub total: usize,
}

/// A model's validation loss and held-out exact-match accuracy.
#[derive(Clone, Debug, PartialEq)]
pub struct Score {
    pub val_loss: f64,
    pub correct: usize,
    pub total: usize,
    pub per_task: Vec<TaskScore>,
}

impl Score {
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.total.max(1) as f64
    }
}

/// One scored reply, for showing.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleChat {
    pub example: DemoExample,
    pub reply: String,
}

/// What `sft demo` measured.
#[derive(Clone, Debug)]
pub struct DemoReport {
    pub backend: String,
    pub n_train: usize,
    pub n_val: usize,
    pub n_heldout: usize,
    pub n_params: usize,
    pub vocab_size: usize,
    pub before: Score,
    pub after: Score,
    pub train: TrainReport,
    pub train_seconds: f64,
    pub total_seconds: f64,
    /// Two held-out chats answered by the trained model.
    pub samples: Vec<SampleChat>,
    /// `sft chat`'s arguments for talking to the trained model as the demo scored it (its
    /// checkpoint, the LoRA adapter over its base, the tasks' system prompt, greedy decoding).
    pub chat_args: Vec<String>,
}

/// Empties `dir` if it is a previous demo's, creates it, and marks it.
fn fresh_demo_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        let empty =
            std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?.next().is_none();
        if !empty {
            ensure!(
                dir.join(MARKER).exists(),
                "{} exists and is not a demo directory: choose another --out",
                dir.display()
            );
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("clearing the previous demo in {}", dir.display()))?;
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join(MARKER), "written by `sft demo`; a rerun clears this directory\n")
        .with_context(|| format!("writing {}", dir.join(MARKER).display()))?;
    Ok(())
}

/// Greedy replies to every held-out example, scored by exact match.
pub fn score_replies<B: Backend>(
    model: &mut Model<B>,
    tok: &ChatTokenizer,
    heldout: &[DemoExample],
) -> Result<(Vec<TaskScore>, Vec<String>)> {
    let greedy = SamplingConfig::greedy(16);
    let mut rng = Rng::new(0);
    let mut per_task: Vec<TaskScore> =
        TASKS.iter().map(|&task| TaskScore { task, correct: 0, total: 0 }).collect();
    let mut replies = Vec::with_capacity(heldout.len());
    for ex in heldout {
        let reply =
            generate_reply(model, tok, tasks::SYSTEM, &ex.history, &ex.task.question, &greedy, &mut rng)?;
        let score = per_task.iter_mut().find(|s| s.task == ex.task.kind).expect("every kind is in TASKS");
        score.total += 1;
        if reply.trim() == ex.task.answer {
            score.correct += 1;
        }
        replies.push(reply);
    }
    Ok((per_task, replies))
}

fn score<B: Backend>(
    model: &mut Model<B>,
    tok: &ChatTokenizer,
    val: &[crate::data::Batch],
    heldout: &[DemoExample],
) -> Result<(Score, Vec<String>)> {
    let val_loss = eval_loss(model, val)?;
    let (per_task, replies) = score_replies(model, tok, heldout)?;
    let correct = per_task.iter().map(|s| s.correct).sum();
    let total = per_task.iter().map(|s| s.total).sum();
    Ok((Score { val_loss, correct, total, per_task }, replies))
}

/// Everything the demo prepares before training: the run's config and what scoring needs.
pub struct DemoSetup {
    /// The LoRA demo's first run, which trains the base (None: the plain demo).
    pub base_config: Option<TrainConfig>,
    pub train_config: TrainConfig,
    pub model_config: ModelConfig,
    pub tokenizer: ChatTokenizer,
    pub heldout: Vec<DemoExample>,
    /// The validation split, in order.
    pub val: Vec<crate::data::Batch>,
    pub n_train: usize,
    pub n_val: usize,
}

/// Steps 1–3 of the demo: data, tokenizer, shards, and the run's config (in a fresh `args.out`).
pub fn setup(args: &DemoArgs) -> Result<DemoSetup> {
    ensure!(args.examples >= 100, "--examples must be at least 100");
    ensure!(args.heldout > 0, "--heldout must be at least 1");
    ensure!(args.steps > 0, "--steps must be at least 1");
    fresh_demo_dir(&args.out)?;
    // 1. Data: generated conversations, written as a SimpleLLaMA chat file.
    let train_examples = tasks::generate(args.examples, args.seed);
    let heldout = tasks::generate(args.heldout, Rng::new(args.seed).fork(HELDOUT_STREAM).seed);
    let chat_path = args.out.join("chat.json");
    write_atomic(&chat_path, &tasks::to_simplellama_json(&train_examples))?;
    write_atomic(&args.out.join("heldout.json"), &tasks::to_simplellama_json(&heldout))?;
    eprintln!(
        "demo: {} training and {} held-out conversations ({}) in {}",
        train_examples.len(),
        heldout.len(),
        TASKS.join(", "),
        args.out.display()
    );

    // 2. A tokenizer trained on them, and the shards.
    let tok_path = args.out.join("tokenizer.json");
    let convs: Vec<_> = train_examples.iter().map(DemoExample::conversation).collect();
    let tok = train_tokenizer(&convs, DEMO_VOCAB, &tok_path)?;
    let config = demo_model_config(tok.vocab_size());
    let data_dir = args.out.join("data");
    let prepared = prepare(&PrepareOptions {
        max_seq_len: config.max_seq_len,
        train_share: 0.95,
        seed: args.seed,
        ..PrepareOptions::new(&chat_path, &tok_path, &data_dir)
    })?;
    if prepared.n_skipped > 0 {
        bail!("{} demo conversations are longer than {} tokens", prepared.n_skipped, config.max_seq_len);
    }
    let longest_heldout = heldout
        .iter()
        .map(|ex| {
            crate::data::tokenize_conversation(&tok, &ex.conversation(), Default::default()).map(|e| e.len())
        })
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .max()
        .unwrap_or(0);
    ensure!(
        longest_heldout <= config.max_seq_len,
        "a held-out conversation has {longest_heldout} tokens, more than the model's {}",
        config.max_seq_len
    );
    let model_path = args.out.join("model.json");
    write_atomic(&model_path, &serde_json::to_string_pretty(&config)?)?;

    // 3. The run: SimpleLLaMA's recipe, with a learning rate for a tiny model trained from scratch.
    let cfg = TrainConfig {
        model: model_path.display().to_string(),
        data: data_dir.clone(),
        tokenizer: tok_path.clone(),
        out_dir: args.out.join("run"),
        from_scratch: true,
        epochs: 1,
        max_steps: Some(args.steps),
        schedule_steps: Some(args.steps),
        micro_batch: args.micro_batch.into(),
        grad_accum: 1,
        batch_mode: BatchMode::Dynamic,
        max_lr: 3e-3,
        min_lr: 3e-4,
        warmup_steps: (args.steps / 20).max(1),
        weight_decay: 0.01,
        seed: args.seed,
        eval_every: 100,
        eval_batches: 4,
        save_every: 0,
        keep_checkpoints: 1,
        sample_every: 0,
        log_every: 50,
        device: args.device.clone(),
        ..TrainConfig::default()
    };
    let (cfg, base_config) = if args.lora {
        let (lora, base) =
            lora_runs(cfg, &train_examples, &tok_path, &args.out, args.seed, config.max_seq_len)?;
        (lora, Some(base))
    } else {
        (cfg, None)
    };
    cfg.validate()?;
    let val_set = Dataset::open(&data_dir, Split::Val)?;
    let loader = LoaderConfig {
        batch_size: args.micro_batch,
        max_seq_len: config.max_seq_len,
        mode: BatchMode::Dynamic,
        shuffle: false,
        seed: 0,
    };
    let val = batches_in_order(&val_set, &loader)?;
    Ok(DemoSetup {
        base_config,
        train_config: cfg,
        model_config: config,
        tokenizer: tok,
        heldout,
        val,
        n_train: prepared.n_train,
        n_val: prepared.n_val,
    })
}

/// The LoRA demo's two runs: `(adapters, base)`. The base trains every weight on the
/// conversations without a colour lookup (prepared into `out/data-base`); the adapters then
/// learn all four tasks over it, frozen (a LoRA over a random base could not: its frozen lm_head
/// and final norm bound the logits' range).
fn lora_runs(
    cfg: TrainConfig,
    examples: &[DemoExample],
    tok_path: &Path,
    out: &Path,
    seed: u64,
    max_seq_len: usize,
) -> Result<(TrainConfig, TrainConfig)> {
    let is_lookup = |q: &str| q.starts_with("What color is");
    let base_examples: Vec<DemoExample> = examples
        .iter()
        .filter(|ex| !is_lookup(&ex.task.question) && !ex.history.iter().any(|t| is_lookup(&t.user)))
        .cloned()
        .collect();
    let chat = out.join("chat-base.json");
    write_atomic(&chat, &tasks::to_simplellama_json(&base_examples))?;
    let data = out.join("data-base");
    prepare(&PrepareOptions {
        max_seq_len,
        train_share: 0.95,
        seed,
        ..PrepareOptions::new(&chat, tok_path, &data)
    })?;
    let base_run = out.join("base-run");
    let steps = cfg.max_steps.expect("the demo sets max_steps");
    let base = TrainConfig { data, out_dir: base_run.clone(), ..cfg.clone() };
    let targets = crate::model::lora::ALL_TARGETS.to_vec();
    // A lower rate than the base's: with A ~ N(0, 1) each step of B moves the output a lot
    // (3e-3 loses the first hundred steps to a rising loss).
    let lora = TrainConfig {
        max_lr: 1e-3,
        min_lr: 1e-4,
        from_scratch: false,
        init_from: Some(base_run.join(crate::checkpoint::step_dir_name(steps))),
        lora: Some(crate::model::lora::LoraConfig::new(16, 32.0, 0.0, targets)),
        ..cfg
    };
    Ok((lora, base))
}

/// Runs the whole demo on `backend`.
pub fn run_demo<B: Backend>(backend: B, args: &DemoArgs) -> Result<DemoReport> {
    let start = Instant::now();
    let DemoSetup {
        base_config,
        train_config: cfg,
        model_config: config,
        tokenizer: tok,
        heldout,
        val,
        n_train,
        n_val,
    } = setup(args)?;

    // 4. The untrained model (the trainer's initialization: same config, same seed), scored; for
    //    the LoRA demo, the base trained first (without the colour lookup).
    let backend_name = backend.name();
    let (mut model, base_report) = match &base_config {
        Some(base) => {
            eprintln!("LoRA demo: training the base on every task but the colour lookup");
            let (model, report) = train_with(backend, base, None)?;
            (model, Some(report))
        }
        None => {
            let mut model = Model::new(backend, config.clone(), args.micro_batch * config.max_seq_len)?;
            model.init_params(cfg.seed)?;
            (model, None)
        }
    };
    let (before, _) = score(&mut model, &tok, &val, &heldout)?;
    print_score(if base_report.is_some() { "the base, before LoRA" } else { "before training" }, &before);
    let backend = model.into_backend();

    // 5. Train, then score again.
    let train_start = Instant::now();
    let (mut model, train) = train_with(backend, &cfg, None)?;
    let train_seconds = train_start.elapsed().as_secs_f64();
    let (after, replies) = score(&mut model, &tok, &val, &heldout)?;
    print_score("after training", &after);

    // Two sample chats: the first held-out one-turn and two-turn conversations.
    let mut samples = Vec::new();
    for multi in [false, true] {
        if let Some(i) = heldout.iter().position(|ex| ex.history.is_empty() != multi) {
            samples.push(SampleChat { example: heldout[i].clone(), reply: replies[i].clone() });
        }
    }
    let trained = train.checkpoint.clone().context("the demo's run saved no checkpoint")?;
    let checkpoints = match base_report.as_ref().and_then(|b| b.checkpoint.clone()) {
        Some(base) => vec!["--checkpoint".into(), base, "--adapter".into(), trained],
        None => vec!["--checkpoint".into(), trained],
    };
    let chat_args = ["chat".into()]
        .into_iter()
        .chain(checkpoints.into_iter().map(|p: PathBuf| p.display().to_string()))
        .chain(["--system", tasks::SYSTEM, "--temperature", "0"].map(String::from))
        .collect();
    Ok(DemoReport {
        chat_args,
        backend: backend_name,
        n_train,
        n_val,
        n_heldout: heldout.len(),
        n_params: config.n_params(),
        vocab_size: tok.vocab_size(),
        before,
        after,
        train,
        train_seconds,
        total_seconds: start.elapsed().as_secs_f64(),
        samples,
    })
}

fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

fn print_score(when: &str, s: &Score) {
    let tasks: Vec<String> =
        s.per_task.iter().map(|t| format!("{} {}/{}", t.task, t.correct, t.total)).collect();
    eprintln!(
        "{when}: validation loss {:.4}, held-out exact match {}/{} = {:.1}% ({})",
        s.val_loss,
        s.correct,
        s.total,
        100.0 * s.accuracy(),
        tasks.join(", ")
    );
}

/// `sft demo`: runs the demo and prints what it measured.
pub fn demo(args: DemoArgs) -> Result<()> {
    let report = crate::with_backend!(Device::parse(&args.device)?, |backend| run_demo(backend, &args)?);
    println!("\n== sft demo on {} ==", report.backend);
    println!(
        "model: {} parameters, vocabulary {}; data: {} train / {} val conversations, {} held out",
        report.n_params, report.vocab_size, report.n_train, report.n_val, report.n_heldout
    );
    if args.lora {
        println!(
            "LoRA: 'before' is a base trained on every task but the colour lookup, 'after' that base with \
             adapters trained on all four tasks (the base frozen)"
        );
    }
    println!(
        "trained {} steps in {:.1} s ({:.0} tokens/s), final train loss {:.4}",
        report.train.steps, report.train_seconds, report.train.tokens_per_s, report.train.final_train_loss
    );
    println!("{:<10} {:>12} {:>12}", "", "before", "after");
    println!("{:<10} {:>12.4} {:>12.4}", "val loss", report.before.val_loss, report.after.val_loss);
    println!(
        "{:<10} {:>11.1}% {:>11.1}%",
        "accuracy",
        100.0 * report.before.accuracy(),
        100.0 * report.after.accuracy()
    );
    for (b, a) in report.before.per_task.iter().zip(&report.after.per_task) {
        println!(
            "{:<10} {:>12} {:>12}",
            format!("  {}", b.task),
            format!("{}/{}", b.correct, b.total),
            format!("{}/{}", a.correct, a.total)
        );
    }
    for (i, s) in report.samples.iter().enumerate() {
        println!("\nsample chat {}:", i + 1);
        for turn in &s.example.history {
            println!("  user:      {}\n  assistant: {}", turn.user, turn.assistant);
        }
        println!(
            "  user:      {}\n  assistant: {}   (expected: {})",
            s.example.task.question, s.reply, s.example.task.answer
        );
    }
    println!("\ntotal {:.1} s; files in {}", report.total_seconds, args.out.display());
    let quoted: Vec<String> = report.chat_args.iter().map(|a| shell_quoted(a)).collect();
    println!("chat with it: sft {}", quoted.join(" "));
    Ok(())
}

/// `arg` as a POSIX shell reads it back: bare when it holds only safe characters.
fn shell_quoted(arg: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c);
    if !arg.is_empty() && arg.chars().all(safe) {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}
