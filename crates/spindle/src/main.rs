//! `spindle`: the command line. `serve` runs the OpenAI-compatible server, `generate` runs one
//! prompt without HTTP, `bench` drives a running server, `run-batch` runs a
//! file of batch requests offline.

mod bench;
mod export_tokenizer;
mod generate;
mod logging;
mod run_batch;
mod serve;

use clap::{Parser, Subcommand};

/// A lean, vLLM-compatible LLM inference server.
#[derive(Parser)]
#[command(name = "spindle", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a model over the OpenAI API (like `vllm serve`).
    Serve(Box<serve::ServeArgs>),
    /// Generate a completion for one prompt, without the server.
    Generate(generate::GenerateArgs),
    /// Benchmark any OpenAI-compatible server (like `vllm bench serve`).
    Bench(bench::BenchArgs),
    /// Run a JSONL file of OpenAI batch requests offline, without a server (like `vllm run-batch`).
    RunBatch(Box<run_batch::RunBatchArgs>),
    /// Write the model's tokenizer as a Hugging Face tokenizer directory (for routers that
    /// tokenize on their own).
    ExportTokenizer(export_tokenizer::ExportTokenizerArgs),
}

fn main() -> anyhow::Result<()> {
    spindle_engine::tune_allocator();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve::run(*args),
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::RunBatch(args) => run_batch::run(*args),
        Command::ExportTokenizer(args) => export_tokenizer::run(args),
    }
}
