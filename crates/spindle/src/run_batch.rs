//! `spindle run-batch -i in.jsonl -o out.jsonl` (vLLM's offline batch command): load the
//! model, run every line of the input file through the server's own handlers without HTTP, and
//! write one output line per input line in OpenAI's batch line format, in input order.

use std::io::Write;
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::serve::{start, ServeArgs, Started};

/// Flags of `spindle run-batch`: the input and output files, plus every `serve` flag for the
/// model and engine.
#[derive(Args, Debug, Clone)]
pub struct RunBatchArgs {
    /// Input JSONL file: one `{"custom_id", "method", "url", "body"}` request per line.
    #[arg(short = 'i', long = "input-file")]
    pub input_file: String,
    /// Output JSONL file (one result line per request, input order); `-` for stdout.
    #[arg(short = 'o', long = "output-file")]
    pub output_file: String,
    /// Requests in the engine at once.
    #[arg(long, default_value_t = 256)]
    pub max_concurrency: usize,
    #[command(flatten)]
    pub serve: ServeArgs,
}

pub fn run(args: RunBatchArgs) -> anyhow::Result<()> {
    crate::logging::init(args.serve.log_format == "json");
    let text = std::fs::read_to_string(&args.input_file)
        .with_context(|| format!("reading {}", args.input_file))?;
    let input = spindle_server::batch::offline::OfflineInput::parse(&text)
        .map_err(|e| anyhow!("{}: {e}", args.input_file))?;
    drop(text);
    tracing::info!(requests = input.len(), input = %args.input_file, "batch input checked");
    let Started {
        engine,
        metrics,
        server_config,
        ..
    } = start(&args.serve, false)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("spindle-batch")
        .build()
        .context("starting the async runtime")?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} requests [{elapsed_precise}<{eta_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = std::time::Instant::now();
    let result = runtime.block_on(spindle_server::batch::offline::run_batch_file(
        server_config,
        engine.clone(),
        metrics,
        input,
        args.max_concurrency,
        |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    ));
    bar.finish();
    engine.shutdown();
    runtime.shutdown_timeout(Duration::from_secs(2));
    let lines = result.map_err(|e| anyhow!("{e}"))?;
    let mut text = String::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
    for line in &lines {
        text.push_str(line);
        text.push('\n');
    }
    if args.output_file == "-" {
        std::io::stdout().write_all(text.as_bytes())?;
    } else {
        std::fs::write(&args.output_file, text)
            .with_context(|| format!("writing {}", args.output_file))?;
    }
    tracing::info!(
        requests = lines.len(),
        seconds = started.elapsed().as_secs_f64(),
        output = %args.output_file,
        "batch done"
    );
    Ok(())
}
