//! `spindle bench`: the command line of the serving benchmark (crates/bench). `serve` measures a
//! running OpenAI-compatible server like `vllm bench serve`, `sweep` repeats it at increasing
//! concurrency and plots the scaling, `plot` draws saved sweeps of several servers together.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use spindle_bench::metrics::Slo;
use spindle_bench::plot::plot_files;
use spindle_bench::runner::{parse_json_object, parse_list, LatencyMetric};
use spindle_bench::{
    format_report, run_serve, run_sweep, write_outputs, DatasetSpec, EndpointKind, ServeConfig,
    SweepConfig,
};

/// Benchmark a running server: `serve`, `sweep` or `plot`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Measure a running OpenAI-compatible server (like `vllm bench serve`).
    Serve(ServeArgs),
    /// Run `serve` at concurrency 1, 2, 4, … and write a table, a JSON and an SVG plot.
    Sweep(SweepArgs),
    /// Draw several saved sweeps (e.g. spindle and llama-server) on one SVG plot.
    Plot(PlotArgs),
    /// Measure `/v1/embeddings`: clients sending batches of sentences back to back.
    Embeddings(EmbeddingsArgs),
}

#[derive(Args, Debug)]
struct EmbeddingsArgs {
    /// Server base URL (plain http).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    base_url: String,
    /// Model name (default: the first of /v1/models).
    #[arg(long)]
    model: Option<String>,
    /// Bearer token (default: $OPENAI_API_KEY if set).
    #[arg(long)]
    api_key: Option<String>,
    /// Clients, each with one request in flight.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Sentences per request.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Measured requests (after one warm-up request).
    #[arg(long, default_value_t = 200)]
    num_requests: usize,
    /// One sentence per line (default: a synthetic corpus of --corpus-size sentences).
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// Size of the synthetic corpus.
    #[arg(long, default_value_t = 4096)]
    corpus_size: usize,
    /// Seed of the synthetic corpus.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Save the corpus used (one sentence per line), e.g. for scripts/bench-embeddings-st.py.
    #[arg(long)]
    write_corpus: Option<PathBuf>,
    /// Latency percentiles to report.
    #[arg(long, default_value = "50,90,99")]
    percentiles: String,
    /// Write the result as JSON.
    #[arg(long)]
    save_result: Option<PathBuf>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Endpoint {
    /// /v1/chat/completions
    Chat,
    /// /v1/completions
    Completions,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Dataset {
    /// Random words, ~1 token each, with a unique id first.
    Random,
    /// A ShareGPT JSON file (--dataset-path).
    Sharegpt,
    /// Shared prefixes plus unique random suffixes (--prefix-len, --num-prefixes).
    PrefixRepetition,
    /// One {"prompt": ..., "output_len": N} per line (--dataset-path).
    Jsonl,
}

/// The workload and measurement flags shared by `serve` and `sweep`.
#[derive(Args, Debug, Clone)]
struct WorkloadArgs {
    /// Server base URL (plain http).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    base_url: String,
    /// API to call.
    #[arg(long, value_enum, default_value = "completions")]
    endpoint: Endpoint,
    /// Model name to request (default: the first one listed by GET /v1/models).
    #[arg(long)]
    model: Option<String>,
    /// Where prompts come from.
    #[arg(long, value_enum, default_value = "random")]
    dataset: Dataset,
    /// File for the sharegpt and jsonl datasets.
    #[arg(long)]
    dataset_path: Option<PathBuf>,
    /// Prompt length in tokens (random; the suffix length for prefix-repetition).
    #[arg(long, default_value_t = 1024)]
    random_input_len: u64,
    /// Output tokens per request (random and prefix-repetition).
    #[arg(long, default_value_t = 128)]
    random_output_len: u64,
    /// Lengths are drawn uniformly from len × (1 ± ratio).
    #[arg(long, default_value_t = 0.0)]
    random_range_ratio: f64,
    /// Shared prefix length in tokens (prefix-repetition).
    #[arg(long, default_value_t = 256)]
    prefix_len: u64,
    /// Number of distinct prefixes (prefix-repetition).
    #[arg(long, default_value_t = 10)]
    num_prefixes: u64,
    /// Fixed output length for ShareGPT prompts (default: the reply's length in words, ≥ 4).
    #[arg(long)]
    sharegpt_output_len: Option<u64>,
    /// Requests per second; inf sends everything at once.
    #[arg(long, default_value_t = f64::INFINITY)]
    request_rate: f64,
    /// Gamma shape of inter-arrival gaps: 1 is Poisson, < 1 burstier, > 1 more regular.
    #[arg(long, default_value_t = 1.0)]
    burstiness: f64,
    /// Unmeasured requests sent before the run.
    #[arg(long, default_value_t = 0)]
    num_warmups: usize,
    /// Seed of the prompts and the arrivals.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Send ignore_eos so every request generates exactly its output length.
    #[arg(long)]
    ignore_eos: bool,
    /// Sampling temperature (default: the server's).
    #[arg(long)]
    temperature: Option<f64>,
    /// Extra JSON object merged into every request body, e.g. '{"top_k": 5}'.
    #[arg(long)]
    extra_body: Option<String>,
    /// Service-level objectives for goodput, e.g. `--goodput ttft:500 tpot:50`.
    #[arg(long, num_args = 1.., value_name = "METRIC:MS")]
    goodput: Vec<String>,
    /// Latency metrics to report.
    #[arg(long, default_value = "ttft,tpot,itl,e2el")]
    percentile_metrics: String,
    /// Percentiles to report for each metric.
    #[arg(long, default_value = "99")]
    metric_percentiles: String,
    /// Bearer token for /v1/*.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Give up on one request after this many seconds.
    #[arg(long, default_value_t = 3600.0)]
    request_timeout: f64,
    /// Label stored in the result (e.g. the server's name).
    #[arg(long)]
    label: Option<String>,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
}

#[derive(Args, Debug)]
struct ServeArgs {
    #[command(flatten)]
    workload: WorkloadArgs,
    /// Measured requests.
    #[arg(long, default_value_t = 1000)]
    num_prompts: usize,
    /// Most requests in flight (default: unbounded).
    #[arg(long)]
    max_concurrency: Option<usize>,
    /// Write the full result (parameters, metrics, per-request arrays) as JSON.
    #[arg(long)]
    save_result: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct SweepArgs {
    #[command(flatten)]
    workload: WorkloadArgs,
    /// Concurrency levels, e.g. 1,2,4,8,16,32 (default: powers of two up to --max-concurrency).
    #[arg(long, value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Highest level of the default list.
    #[arg(long, default_value_t = 32)]
    max_concurrency: usize,
    /// Prompts per level (default: max(8, 4 × concurrency)).
    #[arg(long)]
    prompts_per_level: Option<usize>,
    /// Directory for <name>.md, <name>.json and <name>.svg.
    #[arg(long, default_value = "benches/out")]
    out_dir: PathBuf,
    /// File stem of the outputs.
    #[arg(long, default_value = "sweep")]
    name: String,
}

#[derive(Args, Debug)]
struct PlotArgs {
    /// Sweep JSON files written by `bench sweep` (repeat the flag).
    #[arg(long, required = true)]
    input: Vec<PathBuf>,
    /// Legend label of each input, in order (default: the label stored in the file).
    #[arg(long)]
    label: Vec<String>,
    /// SVG file to write.
    #[arg(long, default_value = "benches/out/sweeps.svg")]
    out: PathBuf,
}

/// Run `spindle bench …`.
pub fn run(args: BenchArgs) -> Result<()> {
    match args.command {
        BenchCommand::Serve(a) => serve(a),
        BenchCommand::Sweep(a) => sweep(a),
        BenchCommand::Embeddings(a) => embeddings(a),
        BenchCommand::Plot(a) => {
            plot_files(&a.input, &a.label, &a.out)?;
            println!("wrote {}", a.out.display());
            Ok(())
        }
    }
}

fn dataset_spec(w: &WorkloadArgs) -> Result<DatasetSpec> {
    let path = |name: &str| -> Result<PathBuf> {
        w.dataset_path
            .clone()
            .with_context(|| format!("--dataset {name} needs --dataset-path"))
    };
    Ok(match w.dataset {
        Dataset::Random => DatasetSpec::Random {
            input_len: w.random_input_len,
            output_len: w.random_output_len,
            range_ratio: w.random_range_ratio,
        },
        Dataset::Sharegpt => DatasetSpec::ShareGpt {
            path: path("sharegpt")?,
            output_len: w.sharegpt_output_len,
        },
        Dataset::PrefixRepetition => DatasetSpec::PrefixRepetition {
            prefix_len: w.prefix_len,
            suffix_len: w.random_input_len,
            num_prefixes: w.num_prefixes,
            output_len: w.random_output_len,
        },
        Dataset::Jsonl => DatasetSpec::Jsonl {
            path: path("jsonl")?,
        },
    })
}

fn serve_config(w: &WorkloadArgs) -> Result<ServeConfig> {
    let goodput = w
        .goodput
        .iter()
        .map(|s| s.parse::<Slo>())
        .collect::<Result<Vec<_>, _>>()?;
    let percentile_metrics: Vec<LatencyMetric> = parse_list(&w.percentile_metrics)?;
    let metric_percentiles: Vec<f64> = parse_list(&w.metric_percentiles)
        .with_context(|| format!("--metric-percentiles {:?}", w.metric_percentiles))?;
    let extra_body = match &w.extra_body {
        None => Default::default(),
        Some(text) => match parse_json_object(text) {
            Some(map) => map,
            None => bail!("--extra-body must be a JSON object, got {text:?}"),
        },
    };
    if !(w.request_timeout > 0.0 && w.request_timeout.is_finite()) {
        bail!("--request-timeout must be a positive number of seconds");
    }
    Ok(ServeConfig {
        base_url: w.base_url.clone(),
        endpoint: match w.endpoint {
            Endpoint::Chat => EndpointKind::Chat,
            Endpoint::Completions => EndpointKind::Completions,
        },
        model: w.model.clone(),
        dataset: dataset_spec(w)?,
        num_prompts: 1,
        request_rate: w.request_rate,
        burstiness: w.burstiness,
        max_concurrency: None,
        num_warmups: w.num_warmups,
        seed: w.seed,
        ignore_eos: w.ignore_eos,
        temperature: w.temperature,
        extra_body,
        goodput,
        percentile_metrics,
        metric_percentiles,
        api_key: w.api_key.clone(),
        request_timeout: Duration::from_secs_f64(w.request_timeout),
        show_progress: !w.no_progress,
        label: w.label.clone(),
    })
}

fn serve(a: ServeArgs) -> Result<()> {
    let mut cfg = serve_config(&a.workload)?;
    cfg.num_prompts = a.num_prompts;
    cfg.max_concurrency = a.max_concurrency;
    let result = run_serve(&cfg)?;
    print!("{}", format_report(&result));
    if let Some(path) = &a.save_result {
        result.save(path)?;
        println!("saved {}", path.display());
    }
    Ok(())
}

fn sweep(a: SweepArgs) -> Result<()> {
    let base = serve_config(&a.workload)?;
    let levels = if a.concurrency.is_empty() {
        spindle_bench::sweep::default_levels(a.max_concurrency)
    } else {
        a.concurrency.clone()
    };
    let label = a
        .workload
        .label
        .clone()
        .unwrap_or_else(|| a.workload.base_url.clone());
    let cfg = SweepConfig {
        base,
        levels,
        prompts_per_level: a.prompts_per_level,
        out_dir: a.out_dir,
        name: a.name,
        label,
    };
    let result = run_sweep(&cfg, |r| {
        print!("{}", format_report(r));
        println!();
    })?;
    let [md, json, svg] = write_outputs(&result, &cfg.out_dir, &cfg.name)?;
    print!("{}", spindle_bench::sweep::markdown_table(&result));
    println!(
        "wrote {}, {}, {}",
        md.display(),
        json.display(),
        svg.display()
    );
    Ok(())
}

fn embeddings(a: EmbeddingsArgs) -> Result<()> {
    use spindle_bench::embeddings::{
        format_embed_report, read_corpus, run_embeddings, synthetic_corpus, write_corpus,
        EmbedBenchConfig,
    };
    let corpus = match &a.corpus {
        Some(path) => read_corpus(path)?,
        None => synthetic_corpus(a.corpus_size, a.seed),
    };
    if let Some(path) = &a.write_corpus {
        write_corpus(path, &corpus)?;
    }
    let percentiles =
        parse_list(&a.percentiles).map_err(|e| anyhow::anyhow!("--percentiles: {e}"))?;
    let cfg = EmbedBenchConfig {
        base_url: a.base_url,
        api_key: a.api_key.or_else(|| std::env::var("OPENAI_API_KEY").ok()),
        model: a.model,
        corpus,
        concurrency: a.concurrency,
        batch_size: a.batch_size,
        num_requests: a.num_requests,
        percentiles,
        request_timeout: Duration::from_secs(600),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(run_embeddings(&cfg))?;
    print!("{}", format_embed_report(&result));
    if let Some(path) = &a.save_result {
        std::fs::write(path, serde_json::to_string_pretty(&result)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if result.completed == 0 {
        bail!("every request failed");
    }
    Ok(())
}
