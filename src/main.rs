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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
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
    }
    Ok(())
}
