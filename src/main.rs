//! The `sft` command line: parses arguments and calls the library.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "sft", version, about = "Supervised fine-tuning for LLaMA-style models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show whether the CUDA kernels were compiled into this binary.
    Kernels,
    /// Tokenize a chat file into memory-mapped train/val shards.
    Prepare(sft::data::cli::PrepareArgs),
    /// Show the batches the trainer will see (text with supervised spans, or JSON).
    Inspect(sft::data::cli::InspectArgs),
    /// Tokenizer tools (`sft tokenizer train`).
    Tokenizer(sft::data::cli::TokenizerArgs),
    /// Write a randomly initialized checkpoint.
    Init(sft::train::cli::InitArgs),
    /// Train a model (or resume a run) on a prepared data directory.
    Train(Box<sft::train::cli::TrainArgs>),
    /// Draw a run's log.csv (losses, learning rate, tokens/s) as an SVG.
    Plot(sft::train::plot::PlotArgs),
    /// Print a checkpoint's mean masked loss on a chat file or a prepared directory.
    Eval(sft::train::cli::EvalArgs),
    /// Fold a LoRA adapter into its base checkpoint's weights (a normal checkpoint).
    Merge(sft::lora::MergeArgs),
    /// Convert a Hugging Face Llama directory into a checkpoint (optionally adding the chat tokens).
    Import(sft::checkpoint::import::ImportArgs),
    /// Write a checkpoint as a Hugging Face model directory to ship (bf16, chat template, generation config).
    Export(sft::checkpoint::export::ExportArgs),
    /// Print a checkpoint's logits at every position of a token sequence, as JSON.
    Logits(sft::generate::cli::LogitsArgs),
    /// Reply to one prompt with a checkpoint.
    Generate(sft::generate::cli::GenerateArgs),
    /// Chat with a checkpoint on the terminal (multi-turn).
    Chat(sft::generate::cli::ChatArgs),
    /// The embedded default: generate tasks, train a tokenizer and a tiny model, score before and after.
    Demo(sft::demo::DemoArgs),
    /// Time training steps on synthetic batches: tokens/s, MFU, device memory.
    Bench(sft::bench::train::BenchArgs),
    /// Time causal attention forward and forward+backward on the GPU (TFLOP/s table).
    BenchAttention(sft::bench::attention::AttentionBenchArgs),
    /// Time the cross-entropy and AdamW kernels next to a device copy (ms, TFLOP/s, GB/s; --json).
    BenchKernels(sft::bench::kernels::KernelBenchArgs),
    /// Estimate a training step without a GPU: per-op-family cost, step time, tokens/s, MFU, memory.
    Plan(sft::plan::PlanArgs),
}

/// A user error (bad input, a missing file, a model that does not fit) prints its message chain
/// and exits 1; backtraces are for bugs, and panics keep theirs. Returning the error from `main`
/// would print anyhow's Debug form, with a backtrace whenever RUST_BACKTRACE is set.
fn main() {
    let cli = Cli::parse();
    // Rust ignores SIGPIPE, so `sft eval ... | head` panicked on its next print ("failed printing
    // to stdout"). The default action ends the process quietly, as any Unix tool does; training
    // keeps ignoring it, so that a closed log reader never kills a run between checkpoints (its
    // progress goes through `sft::say!`, which drops the failed write: src/console.rs).
    if !matches!(cli.command, Command::Train(_)) {
        // SAFETY: restoring a signal's default action before any thread is started.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    if let Err(error) = run(cli) {
        // A run stopped by a signal, saved: not an error, but not a finished run either.
        if let Some(stopped) = error.downcast_ref::<sft::train::interrupt::Interrupted>() {
            sft::say!("{stopped}");
            std::process::exit(stopped.exit_code());
        }
        eprintln!("{}", error_report(&error));
        std::process::exit(1);
    }
}

/// `error: <message>` then one `  caused by: <cause>` line per cause, outermost first.
fn error_report(error: &anyhow::Error) -> String {
    let mut chain = error.chain();
    let mut text = format!("error: {}", chain.next().map(ToString::to_string).unwrap_or_default());
    for cause in chain {
        text.push_str(&format!("\n  caused by: {cause}"));
    }
    text
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Kernels => {
            if sft::kernels::PTX_UNAVAILABLE.is_empty() {
                for (name, ptx) in sft::kernels::PTX_MODULES {
                    println!("{name}: {} bytes of PTX", ptx.len());
                }
            } else {
                println!("CUDA kernels unavailable: {}", sft::kernels::PTX_UNAVAILABLE);
            }
        }
        Command::Prepare(args) => sft::data::cli::prepare(args)?,
        Command::Inspect(args) => sft::data::cli::inspect(args)?,
        Command::Tokenizer(args) => sft::data::cli::tokenizer(args)?,
        Command::Init(args) => sft::train::cli::init(args)?,
        Command::Train(args) => sft::train::cli::train(*args)?,
        Command::Eval(args) => sft::train::cli::eval(args)?,
        Command::Merge(args) => sft::lora::merge(args)?,
        Command::Plot(args) => sft::train::plot::plot(args)?,
        Command::Import(args) => sft::checkpoint::import::import(args)?,
        Command::Export(args) => sft::checkpoint::export::export(args)?,
        Command::Logits(args) => sft::generate::cli::logits(args)?,
        Command::Generate(args) => sft::generate::cli::generate(args)?,
        Command::Chat(args) => sft::generate::cli::chat(args)?,
        Command::Demo(args) => sft::demo::demo(args)?,
        Command::Bench(args) => sft::bench::train::bench(args)?,
        Command::BenchAttention(args) => sft::bench::attention::bench_attention(args)?,
        Command::BenchKernels(args) => sft::bench::kernels::bench_kernels(args)?,
        Command::Plan(args) => sft::plan::run(args)?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// `--help` is the reference users read first: every flag of every command says what it
    /// does (a bare `--max-lr <MAX_LR>` tells nothing, not even the default).
    #[test]
    fn every_flag_says_what_it_does() {
        let cli = Cli::command();
        cli.clone().debug_assert();
        let mut bare = Vec::new();
        let mut stack = vec![(String::from("sft"), cli)];
        while let Some((path, cmd)) = stack.pop() {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" || arg.is_positional() && arg.get_help().is_some() {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    bare.push(format!("{path} --{}", arg.get_long().unwrap_or(id)));
                }
            }
            for sub in cmd.get_subcommands() {
                stack.push((format!("{path} {}", sub.get_name()), sub.clone()));
            }
        }
        bare.sort();
        assert!(bare.is_empty(), "flags without help:\n{}", bare.join("\n"));
    }
}
