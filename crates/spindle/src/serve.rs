//! `spindle serve`: the flags vLLM users already type, mapped onto the engine and the HTTP
//! server. Common vLLM flags spindle does not implement are recognised and refused with a
//! clear message (or accepted as harmless no-ops) instead of a generic "unexpected argument".

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::Args;
use spindle_engine::spec::{SpecMethod, SpeculativeConfig};
use spindle_engine::{Engine, EngineConfig, FaultInjection, ModelKind, SchedulingPolicy};
use spindle_model::{
    CpuArithmeticChoice, DTypeChoice, DeviceChoice, KvCacheDtypeChoice, LoadFormat, LoadOptions,
};
use spindle_server::{
    LoadingServer, Metrics, Server, ServerConfig, DEFAULT_BODY_READ_TIMEOUT,
    DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_MAX_BODY_BYTES,
};

/// The model `scripts/fetch-model.sh` downloads; served when no model is named.
const DEFAULT_MODEL: &str = "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Default engine token budget on the CPU: big enough to run matmuls at full speed, small
/// enough that a prefill chunk delays the running streams by well under a second here.
const DEFAULT_CPU_BATCHED_TOKENS: usize = 512;
/// Default engine token budget on a GPU (vLLM's default for online serving).
const DEFAULT_GPU_BATCHED_TOKENS: usize = 2048;

/// Flags of `spindle serve`, named and defaulted as in `vllm serve`.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// The model: a .gguf file, a Hugging Face model directory, or a Hub repo id (as `vllm serve MODEL`).
    #[arg(value_name = "MODEL")]
    pub model_tag: Option<String>,
    /// The model, as a flag (same as the positional MODEL).
    #[arg(long)]
    pub model: Option<String>,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Name(s) clients use in `model`; the first is the default. Defaults to the --model value.
    #[arg(long, num_args = 1..)]
    pub served_model_name: Vec<String>,
    /// Context length (prompt + output); defaults to the model's. Accepts 4096, 4k (=4000), 4K (=4096).
    #[arg(long, value_parser = parse_count)]
    pub max_model_len: Option<u64>,
    /// Most sequences in one batch.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Token budget of one engine iteration (prefill and decode together). Default: 2048 on
    /// CUDA, 512 on the CPU, where a 2048-token prefill chunk holds every running stream's next
    /// token back for seconds (measured: same throughput, p99 inter-token latency 3.1 s -> 1.0 s).
    #[arg(long, value_parser = parse_count)]
    pub max_num_batched_tokens: Option<u64>,
    /// `fcfs` (first come, first served) or `priority` (the request's `priority`, lower first;
    /// more urgent waiting requests preempt less urgent running ones). Batch-job lines always
    /// run after interactive requests, under either policy.
    #[arg(long, default_value = "fcfs", value_parser = ["fcfs", "priority"])]
    pub scheduling_policy: String,
    /// Batch-job tokens allowed per interactive token in an engine step that runs both (at
    /// least one): interactive latency grows by at most about this fraction while batch jobs
    /// run. With no interactive request running, batch jobs get the whole step.
    #[arg(long, default_value_t = spindle_engine::config::DEFAULT_BACKGROUND_SHARE)]
    pub background_share: f64,
    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Fraction of GPU memory spindle may use (weights, activations, KV cache).
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f32,
    /// KV-cache size in bytes; accepts suffixes: 512MiB, 4GiB, 4G (=GiB), 4GB (=10^9). CPU
    /// default: 40% of the available memory (cgroup limit counted), at most what
    /// --max-num-seqs sequences of --max-model-len tokens need; pages are touched only as
    /// blocks are used.
    #[arg(long, value_parser = parse_bytes)]
    pub kv_cache_memory: Option<u64>,
    /// Use exactly this many KV blocks instead of sizing from memory.
    #[arg(long)]
    pub num_gpu_blocks_override: Option<usize>,
    /// Weight dtype: auto, float32, float16 or bfloat16. On the CPU the forward pass is f32
    /// and bfloat16 means bf16 products in the linear layers (see docs/cpu-arithmetic.md).
    #[arg(long, default_value = "auto")]
    pub dtype: DTypeChoice,
    /// How the CPU linear layers multiply: auto (follows --dtype), float32 (exact), bfloat16,
    /// or int8 (activations quantized per 32 values against GGUF block weights).
    #[arg(long, default_value = "auto")]
    pub cpu_arithmetic: CpuArithmeticChoice,
    /// cpu, cuda or cuda:N (default: cuda when built with CUDA, else cpu).
    #[arg(long)]
    pub device: Option<DeviceChoice>,
    /// Global seed for requests that bring none.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// vLLM's `--runner`: `auto` (detect from the model), `generate` (a decoder) or `pooling`
    /// (an embedding model); a mismatch with the loaded model stops start-up.
    #[arg(long, default_value = "auto", value_parser = ["auto", "generate", "pooling"])]
    pub runner: String,
    /// vLLM's `--convert`: `auto`/`none`; `embed` (a decoder served as an embedding model) is not
    /// supported yet and is accepted only for models that are embedding models already.
    #[arg(long, default_value = "auto", value_parser = ["auto", "none", "embed"])]
    pub convert: String,
    /// Parse model-initiated tool calls for `tool_choice: "auto"` (needs --tool-call-parser).
    #[arg(long)]
    pub enable_auto_tool_choice: bool,
    /// How tool calls are written by the model: `hermes` (Qwen2.5/Qwen3, Hermes: `<tool_call>`
    /// tags, also bare or fenced JSON naming a declared tool), `llama3_json`, `qwen3_coder`,
    /// `mistral`, `pythonic` (Llama 3.2/4) or `openai` (gpt-oss, with --reasoning-parser gpt_oss).
    #[arg(long)]
    pub tool_call_parser: Option<String>,
    /// Require `Authorization: Bearer <key>` on /v1/* (also read from SPINDLE_API_KEY, then VLLM_API_KEY).
    #[arg(long, env = "SPINDLE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Chat template replacing the model's: a file path or the Jinja text itself.
    #[arg(long)]
    pub chat_template: Option<String>,
    /// Reuse KV blocks of shared prompt prefixes (on by default).
    #[arg(long, conflicts_with = "no_enable_prefix_caching")]
    pub enable_prefix_caching: bool,
    /// Turn prefix caching off.
    #[arg(long)]
    pub no_enable_prefix_caching: bool,
    /// How to read weights: auto, gguf, safetensors or dummy.
    #[arg(long, default_value = "auto")]
    pub load_format: LoadFormat,
    /// Hub revision (branch, tag or commit) of the model.
    #[arg(long)]
    pub revision: Option<String>,
    /// CORS origins: a JSON list (`'["https://a.example"]'`, as vLLM takes it) or comma-separated.
    #[arg(long, default_value = "[\"*\"]")]
    pub allowed_origins: String,
    /// Refuse new requests with 429 while this many wait (0 = unbounded).
    #[arg(long, default_value_t = 0)]
    pub max_waiting_requests: usize,
    /// Where batch jobs (uploaded files, batches, results) are stored; one server per
    /// directory. Default: $SPINDLE_DATA_DIR, else a directory per port under
    /// $XDG_DATA_HOME/spindle or ~/.local/share/spindle.
    #[arg(long)]
    pub data_dir: Option<String>,
    /// Request sampling defaults (vLLM's flag): `auto` reads `generation_config.json` beside
    /// the weights, `vllm` ignores it, a directory reads it from there (GGUF files carry none).
    #[arg(long, default_value = "auto")]
    pub generation_config: String,
    /// JSON of generation-config keys applied on top (`{"temperature": 0.5}`).
    #[arg(long)]
    pub override_generation_config: Option<String>,
    /// Largest file accepted by /v1/files (413 above); suffixes as for --kv-cache-memory.
    /// Default 200MiB.
    #[arg(long, value_parser = parse_bytes)]
    pub max_batch_file_size: Option<u64>,
    /// Lines of a batch job handed to the engine at once (they run after interactive requests).
    #[arg(long, default_value_t = spindle_server::batch::DEFAULT_MAX_IN_FLIGHT)]
    pub max_batch_in_flight: usize,
    /// vLLM's KV-cache events, as its JSON: `{"enable_kv_cache_events": true, "publisher": "zmq",
    /// "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558", "topic": "kv-events"}`.
    /// Block hashes are vLLM's sha256_cbor, seeded by the PYTHONHASHSEED environment variable
    /// (set the same value wherever hashes are recomputed).
    #[arg(long)]
    pub kv_events_config: Option<String>,
    /// Log format on stderr: text or json.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// The engine counts as dead (hung) after no progress for this many seconds: /health turns
    /// 503, requests fail, and the server exits non-zero. Must exceed the longest engine step.
    #[arg(long, default_value_t = 60.0)]
    pub engine_stall_timeout: f64,
    /// On SIGINT/SIGTERM, in-flight requests get this many seconds to finish.
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_timeout: f64,
    /// Largest accepted request body (413 above); suffixes as for --kv-cache-memory.
    #[arg(long, value_parser = parse_bytes)]
    pub max_request_body: Option<u64>,
    /// Seconds a client has to send request headers; also the idle keep-alive limit (HTTP/1).
    #[arg(long, default_value_t = DEFAULT_HEADER_READ_TIMEOUT.as_secs_f64())]
    pub header_read_timeout: f64,
    /// Seconds a client has to send a request body (408 after).
    #[arg(long, default_value_t = DEFAULT_BODY_READ_TIMEOUT.as_secs_f64())]
    pub body_read_timeout: f64,

    // ---- vLLM flags: accepted as no-ops where harmless, refused clearly otherwise ----
    #[arg(long, hide = true)]
    pub tensor_parallel_size: Option<usize>,
    #[arg(long, hide = true)]
    pub pipeline_parallel_size: Option<usize>,
    #[arg(long, hide = true)]
    pub data_parallel_size: Option<usize>,
    #[arg(long, short = 'q', hide = true)]
    pub quantization: Option<String>,
    /// What the KV cache stores: auto (the model dtype: on the CPU bf16 under the default bf16
    /// arithmetic, else f32), bfloat16, float16 (half the memory per token of f32) or float32;
    /// on CUDA it must match --dtype. fp8 is not supported.
    #[arg(long, default_value = "auto")]
    pub kv_cache_dtype: KvCacheDtypeChoice,
    #[arg(long, hide = true)]
    pub tokenizer: Option<String>,
    #[arg(long, hide = true)]
    pub max_logprobs: Option<usize>,
    #[arg(long, hide = true)]
    pub enable_lora: bool,
    #[arg(long, hide = true, num_args = 1..)]
    pub lora_modules: Vec<String>,
    /// Speculative decoding, as vLLM's JSON: `{"method":"ngram","num_speculative_tokens":4,
    /// "prompt_lookup_max":4,"prompt_lookup_min":2}` (prompt lookup; optional
    /// `disable_by_batch_size`, default 8).
    #[arg(long)]
    pub speculative_config: Option<String>,
    /// Split a reasoning model's thinking from its answer (`reasoning_content` / `reasoning`):
    /// `deepseek_r1`, `qwen3` or `gpt_oss` (harmony channels).
    #[arg(long)]
    pub reasoning_parser: Option<String>,
    #[arg(long, hide = true)]
    pub ssl_keyfile: Option<String>,
    #[arg(long, hide = true)]
    pub ssl_certfile: Option<String>,
    #[arg(long, hide = true)]
    pub root_path: Option<String>,
    #[arg(long, hide = true)]
    pub enforce_eager: bool,
    #[arg(long, hide = true)]
    pub trust_remote_code: bool,
    #[arg(long, hide = true)]
    pub disable_log_requests: bool,
    #[arg(long, hide = true)]
    pub disable_log_stats: bool,
    #[arg(long, hide = true)]
    pub enable_log_requests: bool,
    #[arg(long, hide = true)]
    pub uvicorn_log_level: Option<String>,
    #[arg(long, hide = true)]
    pub swap_space: Option<f64>,
    #[arg(long, hide = true)]
    pub distributed_executor_backend: Option<String>,
}

impl ServeArgs {
    /// The model to load: positional or `--model` (they must agree), else the default model.
    fn model_path(&self) -> anyhow::Result<String> {
        match (&self.model_tag, &self.model) {
            (Some(a), Some(b)) if a != b => {
                bail!("the model is given twice with different values: `{a}` and --model `{b}`")
            }
            (Some(m), _) | (None, Some(m)) => Ok(m.clone()),
            (None, None) => Ok(DEFAULT_MODEL.to_string()),
        }
    }

    /// Refuse vLLM flags whose meaning spindle cannot honour; log the harmless no-ops.
    fn check_vllm_flags(&self) -> anyhow::Result<()> {
        let unsupported =
            |flag: &str, why: &str| Err(anyhow!("`--{flag}` is not supported by spindle: {why}"));
        for (flag, size) in [
            ("tensor-parallel-size", self.tensor_parallel_size),
            ("pipeline-parallel-size", self.pipeline_parallel_size),
            ("data-parallel-size", self.data_parallel_size),
        ] {
            if size.is_some_and(|n| n > 1) {
                return unsupported(flag, "spindle runs one model replica on one device; run several servers behind a load balancer instead");
            }
        }
        if let Some(q) = &self.quantization {
            return unsupported("quantization", &format!("`{q}` — quantized weights are read from GGUF files as they are; pass a .gguf model"));
        }
        if self.tokenizer.is_some() {
            return unsupported(
                "tokenizer",
                "the tokenizer is always loaded from the model (GGUF metadata or tokenizer.json)",
            );
        }
        if let Some(n) = self
            .max_logprobs
            .filter(|&n| n != spindle_server::validation::MAX_LOGPROBS)
        {
            return unsupported(
                "max-logprobs",
                &format!(
                    "{n} — the limit is fixed at {}",
                    spindle_server::validation::MAX_LOGPROBS
                ),
            );
        }
        if self.enable_lora || !self.lora_modules.is_empty() {
            return unsupported(
                "enable-lora/--lora-modules",
                "LoRA adapters are not implemented",
            );
        }
        if self.ssl_keyfile.is_some() || self.ssl_certfile.is_some() {
            return unsupported(
                "ssl-keyfile/--ssl-certfile",
                "TLS is not built in; terminate TLS in a reverse proxy",
            );
        }
        if self.root_path.is_some() {
            return unsupported(
                "root-path",
                "serve under a path prefix with a reverse proxy",
            );
        }
        if self.distributed_executor_backend.is_some() {
            return unsupported(
                "distributed-executor-backend",
                "spindle runs in a single process",
            );
        }
        for (flag, given) in [
            ("enforce-eager", self.enforce_eager),
            ("trust-remote-code", self.trust_remote_code),
            ("disable-log-requests", self.disable_log_requests),
            ("enable-log-requests", self.enable_log_requests),
            ("disable-log-stats", self.disable_log_stats),
            ("uvicorn-log-level", self.uvicorn_log_level.is_some()),
            ("swap-space", self.swap_space.is_some()),
        ] {
            if given {
                tracing::info!("--{flag} has no effect in spindle; ignored");
            }
        }
        Ok(())
    }
}

/// `1000`, `4k` (×1000), `4K` (×1024), `1m`/`1M`, `1g`/`1G` — vLLM's human-readable integers.
fn parse_count(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let mult: u64 = match suffix {
        "" => 1,
        "k" => 1_000,
        "K" => 1 << 10,
        "m" => 1_000_000,
        "M" => 1 << 20,
        "g" => 1_000_000_000,
        "G" => 1 << 30,
        other => return Err(format!("unknown suffix `{other}` (use k/K, m/M or g/G)")),
    };
    let value: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number"))?;
    if !value.is_finite() || value < 0.0 {
        return Err(format!("`{s}` must be a non-negative number"));
    }
    let v = value * mult as f64;
    if v.fract() != 0.0 || v > u64::MAX as f64 {
        return Err(format!("`{s}` is not a whole number"));
    }
    Ok(v as u64)
}

/// Byte sizes: plain bytes, binary suffixes (KiB, MiB, GiB, TiB; also K, M, G, T and Ki, Mi, …)
/// and decimal ones (KB, MB, GB, TB; also k, m, g). Case of the `iB`/`B` part is ignored.
fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let binary = |p: u32| 1024f64.powi(p as i32);
    let decimal = |p: u32| 1000f64.powi(p as i32);
    let mult = match suffix {
        "" | "b" | "B" => 1.0,
        "K" | "Ki" | "KiB" | "kib" | "KIB" => binary(1),
        "M" | "Mi" | "MiB" | "mib" | "MIB" => binary(2),
        "G" | "Gi" | "GiB" | "gib" | "GIB" => binary(3),
        "T" | "Ti" | "TiB" | "tib" | "TIB" => binary(4),
        "k" | "KB" | "kB" | "kb" => decimal(1),
        "m" | "MB" | "mb" => decimal(2),
        "g" | "GB" | "gb" => decimal(3),
        "t" | "TB" | "tb" => decimal(4),
        other => {
            return Err(format!(
                "unknown size suffix `{other}` (use e.g. 512MiB, 4GiB or 4GB)"
            ))
        }
    };
    let value: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a size"))?;
    if !value.is_finite() || value < 0.0 {
        return Err(format!("`{s}` must be a non-negative size"));
    }
    Ok((value * mult).round() as u64)
}

/// `--allowed-origins` as a JSON list (vLLM) or a comma-separated list.
fn parse_origins(s: &str) -> anyhow::Result<Vec<String>> {
    let t = s.trim();
    let list: Vec<String> = if t.starts_with('[') {
        serde_json_list(t)
            .with_context(|| format!("--allowed-origins: `{t}` is not a JSON list of strings"))?
    } else {
        t.split(',')
            .map(|o| o.trim().to_string())
            .filter(|o| !o.is_empty())
            .collect()
    };
    if list.is_empty() {
        bail!("--allowed-origins: no origin given");
    }
    Ok(list)
}

/// A tiny parser for `["a", "b"]` (keeps serde_json out of this crate's dependencies).
fn serde_json_list(t: &str) -> anyhow::Result<Vec<String>> {
    let inner = t
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .ok_or_else(|| anyhow!("missing brackets"))?;
    let mut out = Vec::new();
    for item in inner.split(',') {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let unquoted = item
            .strip_prefix('"')
            .and_then(|r| r.strip_suffix('"'))
            .or_else(|| item.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')))
            .ok_or_else(|| anyhow!("`{item}` is not a quoted string"))?;
        out.push(unquoted.to_string());
    }
    Ok(out)
}

fn seconds(flag: &str, v: f64) -> anyhow::Result<Duration> {
    if !v.is_finite() || v < 0.0 {
        bail!("--{flag} must be a non-negative number of seconds");
    }
    Ok(Duration::from_secs_f64(v))
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}

/// Run `spindle serve`: load the model on the engine thread, serve HTTP until SIGINT/SIGTERM,
/// drain in-flight requests (up to --shutdown-timeout), stop the engine, exit 0.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    crate::logging::init(args.log_format == "json");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("spindle-http")
        .build()
        .context("starting the async runtime")?;
    // Listen before loading: while the model loads (and the engine runs its warm-up step)
    // every request, /health included, is a 503, not a refused connection.
    let loading = runtime
        .block_on(LoadingServer::bind(&args.host, args.port))
        .map_err(|e| anyhow!("{e}"))?;
    let Started {
        engine,
        metrics,
        server_config,
        model,
    } = start(&args, true)?;
    let info = engine.model_info().clone();
    let capacity = match engine.model_kind() {
        ModelKind::Generate => format!(
            "KV capacity {} tokens",
            engine.stats().kv_capacity_tokens.load(Ordering::Relaxed)
        ),
        ModelKind::Embed { dimensions } => format!("embedding model, {dimensions} dimensions"),
    };
    let served = runtime.block_on(async {
        let server = Server::from_loading(loading, server_config, engine.clone(), metrics).await?;
        tracing::info!(
            "serving {model} ({}, {}, {}, {capacity}, max model len {}) on {}",
            info.architecture,
            info.dtype,
            info.device,
            info.max_model_len,
            server.local_addr()
        );
        // Stop on a signal, or when the engine dies (panic, error, hang): then drain (in-flight
        // requests have already failed) and exit non-zero so an orchestrator restarts us.
        let watched = engine.clone();
        server
            .serve(async move {
                tokio::select! {
                    _ = shutdown_signal() => {}
                    _ = watched.wait_dead() => tracing::error!("the engine died; shutting down"),
                }
            })
            .await
    });
    // Checked before our own shutdown below marks the engine dead too.
    let death = engine.death_reason();
    engine.shutdown();
    runtime.shutdown_timeout(Duration::from_secs(2));
    served.map_err(|e| anyhow!("{e}"))?;
    if let Some(reason) = death {
        bail!("the engine died: {reason}");
    }
    tracing::info!("shut down cleanly");
    Ok(())
}

/// A loaded engine and the server settings from the flags.
pub(crate) struct Started {
    pub engine: spindle_engine::EngineHandle,
    pub metrics: Arc<Metrics>,
    pub server_config: ServerConfig,
    pub model: String,
}

/// Check the flags, load the model on the engine thread and build the server settings (with
/// the Batch API's store settings when `with_batch_api`).
pub(crate) fn start(args: &ServeArgs, with_batch_api: bool) -> anyhow::Result<Started> {
    args.check_vllm_flags()?;

    let model = args.model_path()?;
    let served_model_names = if args.served_model_name.is_empty() {
        vec![model.clone()]
    } else {
        args.served_model_name.clone()
    };
    let api_key = args
        .api_key
        .clone()
        .or_else(|| std::env::var("VLLM_API_KEY").ok())
        .filter(|k| !k.is_empty());
    let allowed_origins = parse_origins(&args.allowed_origins)?;
    let stall_timeout = seconds("engine-stall-timeout", args.engine_stall_timeout)?;
    let shutdown_timeout = seconds("shutdown-timeout", args.shutdown_timeout)?;
    let header_read_timeout = seconds("header-read-timeout", args.header_read_timeout)?;
    let body_read_timeout = seconds("body-read-timeout", args.body_read_timeout)?;
    if header_read_timeout.is_zero() || body_read_timeout.is_zero() {
        bail!("--header-read-timeout and --body-read-timeout must be positive");
    }
    let fault_injection = FaultInjection::from_env()?;
    if let Some(fault) = &fault_injection {
        tracing::warn!(
            ?fault,
            "{} is set: fault injection is armed (for tests only)",
            FaultInjection::ENV_VAR
        );
    }
    if !(args.gpu_memory_utilization > 0.0 && args.gpu_memory_utilization <= 1.0) {
        bail!(
            "--gpu-memory-utilization must be in (0, 1], got {}",
            args.gpu_memory_utilization
        );
    }
    if args.block_size == 0 || args.max_num_seqs == 0 || args.max_num_batched_tokens == Some(0) {
        bail!("--block-size, --max-num-seqs and --max-num-batched-tokens must be positive");
    }
    let to_usize =
        |flag: &str, v: u64| usize::try_from(v).map_err(|_| anyhow!("--{flag} is too large"));
    let max_model_len = args
        .max_model_len
        .map(|v| to_usize("max-model-len", v))
        .transpose()?;
    let max_body_bytes = match args.max_request_body {
        Some(v) => to_usize("max-request-body", v)?,
        None => DEFAULT_MAX_BODY_BYTES,
    };
    let enable_prefix_caching = !args.no_enable_prefix_caching;
    let device = args.device.unwrap_or(if cfg!(feature = "cuda") {
        DeviceChoice::Cuda(0)
    } else {
        DeviceChoice::Cpu
    });
    let max_num_batched_tokens = match args.max_num_batched_tokens {
        Some(v) => to_usize("max-num-batched-tokens", v)?,
        None if matches!(device, DeviceChoice::Cpu) => DEFAULT_CPU_BATCHED_TOKENS,
        None => DEFAULT_GPU_BATCHED_TOKENS,
    };

    // Metrics exist before the engine so its step observer can feed them. Token-count buckets
    // are sized to the context length when known, else generously.
    let metrics = Arc::new(
        Metrics::new(&served_model_names[0], max_model_len.unwrap_or(1 << 20))
            .map_err(|e| anyhow!("setting up metrics: {e}"))?,
    );
    let kv_events = match &args.kv_events_config {
        Some(json) => spindle_kv_events::KvEventsConfig::parse(json)?,
        None => None,
    };
    let kv_event_sink: Option<Arc<dyn spindle_engine::kv_events::KvEventSink>> = match kv_events {
        Some(cfg) => {
            if !enable_prefix_caching {
                bail!("--kv-events-config needs prefix caching (drop --no-enable-prefix-caching): events describe the prefix cache");
            }
            Some(spindle_kv_events::ZmqPublisher::start(cfg)?)
        }
        None => None,
    };
    let kv_hash_seed = std::env::var("PYTHONHASHSEED")
        .ok()
        .filter(|s| !s.is_empty());
    if kv_event_sink.is_some() && kv_hash_seed.is_none() {
        tracing::warn!("PYTHONHASHSEED is not set: KV-event block hashes are rooted at a random value, so routers cannot recompute them from tokens (set PYTHONHASHSEED as for vLLM)");
    }
    let speculative = speculative_config(args.speculative_config.as_deref())?;
    if let Some(spec) = &speculative {
        metrics.set_speculative_tokens(spec.num_speculative_tokens);
    }
    let engine_config = EngineConfig {
        speculative,
        kv_event_sink,
        kv_hash_seed,
        model: LoadOptions {
            model: model.clone(),
            revision: args.revision.clone(),
            load_format: args.load_format,
            dtype: args.dtype,
            cpu_arithmetic: args.cpu_arithmetic,
            device,
            max_model_len,
            chat_template: args.chat_template.clone(),
            seed: args.seed,
        },
        max_num_seqs: args.max_num_seqs,
        max_num_batched_tokens,
        scheduling_policy: match args.scheduling_policy.as_str() {
            "priority" => SchedulingPolicy::Priority,
            _ => SchedulingPolicy::Fcfs,
        },
        background_share: args.background_share,
        block_size: args.block_size,
        kv_cache_memory_bytes: args.kv_cache_memory,
        gpu_memory_utilization: args.gpu_memory_utilization,
        num_blocks_override: args.num_gpu_blocks_override,
        kv_cache_dtype: args.kv_cache_dtype,
        enable_prefix_caching,
        seed: args.seed,
        max_waiting_requests: args.max_waiting_requests,
        observer: Some(metrics.clone()),
        stall_timeout: Some(stall_timeout),
        fault_injection,
        ..EngineConfig::default()
    };
    let (tool_call_parser, reasoning_parser) = output_parsers(args)?;
    let batch = if with_batch_api {
        let data_dir = match &args.data_dir {
            Some(d) => std::path::PathBuf::from(d),
            None => default_data_dir(args.port)?,
        };
        let max_file = match args.max_batch_file_size {
            Some(v) => to_usize("max-batch-file-size", v)?,
            None => spindle_server::batch::DEFAULT_MAX_FILE_BYTES,
        };
        if args.max_batch_in_flight == 0 {
            bail!("--max-batch-in-flight must be positive");
        }
        // Fail fast, before the model loads, when another server holds this data directory
        // (the server takes the lock for good once it starts).
        drop(
            spindle_server::batch::store::BatchStore::open(&data_dir)
                .map_err(|e| anyhow!("{e}"))?,
        );
        Some(spindle_server::batch::BatchConfig {
            data_dir,
            max_file_bytes: max_file,
            max_in_flight: args.max_batch_in_flight,
        })
    } else {
        None
    };
    let defaults = request_defaults(
        &model,
        &args.generation_config,
        args.override_generation_config.as_deref(),
    )?;
    tracing::info!(%model, %device, "loading model");
    {
        use spindle_model::cpu_isa;
        let (chosen, best) = (cpu_isa::selected(), cpu_isa::detected());
        tracing::info!(
            "CPU kernels: {} (this CPU: {}; SPINDLE_CPU_ISA lowers it)",
            chosen.as_str(),
            best.as_str()
        );
    }
    let engine = Engine::spawn(engine_config).map_err(|e| anyhow!("loading {model}: {e}"))?;

    if let Err(e) = check_runner(&args.runner, &args.convert, engine.model_kind()) {
        engine.shutdown();
        return Err(e);
    }
    let server_config = ServerConfig {
        host: args.host.clone(),
        port: args.port,
        served_model_names,
        model_root: model.clone(),
        api_key,
        allowed_origins,
        // The loader already applied --chat-template; handing it to the server too makes a
        // template that does not compile a start-up error rather than a 400 per request.
        chat_template: args
            .chat_template
            .as_ref()
            .and_then(|_| engine.tokenizer().chat_template.clone()),
        tool_call_parser,
        reasoning_parser,
        max_body_bytes,
        header_read_timeout,
        body_read_timeout,
        stall_timeout,
        shutdown_timeout,
        gpu_memory_utilization: args.gpu_memory_utilization,
        batch,
        defaults,
    };

    Ok(Started {
        engine,
        metrics,
        server_config,
        model,
    })
}

/// Where batch jobs are stored when `--data-dir` is not given: `$SPINDLE_DATA_DIR` (a choice,
/// like the flag), else one directory per port under `$XDG_DATA_HOME/spindle` or
/// `~/.local/share/spindle` (`port-8000`, ...), so several servers run on one host without
/// flags, as people run one vLLM per GPU, and a restarted server finds its jobs again. A
/// server on port 0 (a random port) gets a directory of its own process.
fn default_data_dir(port: u16) -> anyhow::Result<std::path::PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(d) = var("SPINDLE_DATA_DIR") {
        return Ok(d.into());
    }
    let base = if let Some(d) = var("XDG_DATA_HOME") {
        std::path::PathBuf::from(d).join("spindle")
    } else if let Some(h) = var("HOME") {
        std::path::PathBuf::from(h).join(".local/share/spindle")
    } else {
        bail!("no --data-dir given and neither SPINDLE_DATA_DIR, XDG_DATA_HOME nor HOME is set")
    };
    let leaf = match port {
        0 => format!("ephemeral-{}", std::process::id()),
        p => format!("port-{p}"),
    };
    let dir = base.join(leaf);
    tracing::info!(data_dir = %dir.display(), "batch jobs are stored per port (set --data-dir to choose)");
    Ok(dir)
}

/// The request defaults of `--generation-config` / `--override-generation-config`, logged.
fn request_defaults(
    model: &str,
    source: &str,
    overrides: Option<&str>,
) -> anyhow::Result<spindle_server::validation::RequestDefaults> {
    use spindle_server::validation::RequestDefaults;
    let read = |dir: &std::path::Path| -> anyhow::Result<Option<RequestDefaults>> {
        let file = dir.join("generation_config.json");
        if !file.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&file)
            .map_err(|e| anyhow!("reading {}: {e}", file.display()))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| anyhow!("{} is not JSON: {e}", file.display()))?;
        RequestDefaults::from_json(&value)
            .map(Some)
            .map_err(|e| anyhow!("{}: {e}", file.display()))
    };
    let from_file = match source {
        "vllm" => None,
        "auto" => {
            let path = std::path::Path::new(model);
            if path.is_dir() {
                read(path)?
            } else {
                None
            }
        }
        dir => {
            let path = std::path::Path::new(dir);
            if !path.is_dir() {
                bail!("--generation-config {dir}: not `auto`, `vllm` or a directory");
            }
            Some(read(path)?.ok_or_else(|| {
                anyhow!("--generation-config {dir}: no generation_config.json there")
            })?)
        }
    };
    let mut defaults = from_file.unwrap_or_default();
    if let Some(json) = overrides {
        let value: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| anyhow!("--override-generation-config is not JSON: {e}"))?;
        let over = RequestDefaults::from_json(&value)
            .map_err(|e| anyhow!("--override-generation-config: {e}"))?;
        defaults = defaults.overridden_by(over);
    }
    if defaults.is_empty() {
        tracing::info!("no request defaults from a generation config (vLLM's defaults apply)");
    } else {
        tracing::info!(
            ?defaults,
            "request defaults from the generation config (a request's own values win)"
        );
    }
    Ok(defaults)
}

/// `--runner` / `--convert` against what the model turned out to be.
fn check_runner(runner: &str, convert: &str, kind: ModelKind) -> anyhow::Result<()> {
    let is_embedding = matches!(kind, ModelKind::Embed { .. });
    if convert == "embed" && !is_embedding {
        bail!("--convert embed: serving a text-generation model as an embedding model is not supported yet; serve an embedding model (a sentence-transformers directory) instead");
    }
    match (runner, is_embedding) {
        ("pooling", false) => {
            bail!("--runner pooling: this model generates text; it is not an embedding model")
        }
        ("generate", true) => {
            bail!("--runner generate: this is an embedding model; it does not generate text")
        }
        _ => Ok(()),
    }
}

/// `--tool-call-parser` (with `--enable-auto-tool-choice`) and `--reasoning-parser`, checked.
fn output_parsers(
    args: &ServeArgs,
) -> anyhow::Result<(
    Option<spindle_server::tools::ToolParser>,
    Option<spindle_server::reasoning::ReasoningParser>,
)> {
    use spindle_server::reasoning::ReasoningParser;
    use spindle_server::tools::ToolParser;
    let tool_call_parser = match (
        args.enable_auto_tool_choice,
        args.tool_call_parser.as_deref(),
    ) {
        (false, _) => None,
        (true, None) => {
            bail!(
                "--enable-auto-tool-choice needs --tool-call-parser ({})",
                ToolParser::NAMES
            )
        }
        (true, Some(name)) => Some(ToolParser::parse(name).ok_or_else(|| {
            anyhow!(
                "--tool-call-parser {name}: supported parsers are {}",
                ToolParser::NAMES
            )
        })?),
    };
    let reasoning_parser = match args.reasoning_parser.as_deref() {
        None => None,
        Some(name) => Some(ReasoningParser::parse(name).ok_or_else(|| {
            anyhow!(
                "--reasoning-parser {name}: supported parsers are {}",
                ReasoningParser::NAMES
            )
        })?),
    };
    if tool_call_parser == Some(ToolParser::OpenAi)
        && reasoning_parser != Some(ReasoningParser::GptOss)
    {
        bail!("--tool-call-parser openai reads gpt-oss's harmony channels: add --reasoning-parser gpt_oss");
    }
    Ok((tool_call_parser, reasoning_parser))
}

/// `--speculative-config`, checked before the model loads.
fn speculative_config(json: Option<&str>) -> anyhow::Result<Option<SpeculativeConfig>> {
    let Some(json) = json else {
        return Ok(None);
    };
    let spec = SpeculativeConfig::from_json(json).map_err(|e| anyhow!("{e}"))?;
    if let SpecMethod::DraftModel { model } = &spec.method {
        tracing::info!(draft = %model.display(), "draft-model speculation: the draft loads with the target");
    }
    Ok(Some(spec))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ServeArgs,
    }

    fn parse(argv: &[&str]) -> Result<ServeArgs, clap::Error> {
        let mut full = vec!["spindle-serve"];
        full.extend_from_slice(argv);
        Cli::try_parse_from(full).map(|c| c.args)
    }

    #[test]
    fn vllm_style_command_lines_parse() {
        let a = parse(&[
            "m.gguf",
            "--port",
            "9000",
            "--served-model-name",
            "a",
            "b",
            "--max-model-len",
            "4K",
            "--kv-cache-memory",
            "512MiB",
            "--no-enable-prefix-caching",
            "--dtype",
            "bfloat16",
            "--device",
            "cuda:1",
        ])
        .unwrap();
        assert_eq!(a.model_path().unwrap(), "m.gguf");
        assert_eq!(a.served_model_name, vec!["a", "b"]);
        assert_eq!(a.max_model_len, Some(4096));
        assert_eq!(a.kv_cache_memory, Some(512 << 20));
        assert!(a.no_enable_prefix_caching);
        assert_eq!(a.device, Some(DeviceChoice::Cuda(1)));
        assert_eq!(a.port, 9000);
        let d = parse(&[]).unwrap();
        assert_eq!(
            (d.host.as_str(), d.port, d.max_num_seqs, d.block_size),
            ("0.0.0.0", 8000, 256, 16)
        );
        assert_eq!(d.model_path().unwrap(), DEFAULT_MODEL);
        assert!(parse(&["a", "--model", "b"]).unwrap().model_path().is_err());
        assert!(parse(&["--bogus-flag"]).is_err());
    }

    #[test]
    fn runner_and_convert_must_match_the_model() {
        let gen = ModelKind::Generate;
        let emb = ModelKind::Embed { dimensions: 384 };
        assert!(check_runner("auto", "auto", gen).is_ok());
        assert!(check_runner("pooling", "auto", emb).is_ok());
        assert!(check_runner("pooling", "embed", emb).is_ok());
        assert!(check_runner("generate", "none", gen).is_ok());
        for (runner, convert, kind) in [
            ("pooling", "auto", gen),
            ("generate", "auto", emb),
            ("auto", "embed", gen),
        ] {
            assert!(
                check_runner(runner, convert, kind).is_err(),
                "{runner} {convert}"
            );
        }
        let a = parse(&["--runner", "pooling", "--convert", "embed"]).unwrap();
        assert_eq!(
            (a.runner.as_str(), a.convert.as_str()),
            ("pooling", "embed")
        );
        assert!(parse(&["--runner", "bogus"]).is_err());
    }

    #[test]
    fn unsupported_vllm_flags_are_explained() {
        let err = parse(&["--tensor-parallel-size", "2"])
            .unwrap()
            .check_vllm_flags()
            .unwrap_err();
        assert!(
            err.to_string().contains("not supported by spindle"),
            "{err}"
        );
        assert!(parse(&["--tensor-parallel-size", "1"])
            .unwrap()
            .check_vllm_flags()
            .is_ok());
        // A no-op flag must not swallow the positional model.
        assert_eq!(
            parse(&["--enforce-eager", "m.gguf"])
                .unwrap()
                .model_path()
                .unwrap(),
            "m.gguf"
        );
        assert!(parse(&["--quantization", "awq"])
            .unwrap()
            .check_vllm_flags()
            .is_err());
        // vLLM's KV-cache dtypes: 16-bit ones are served, fp8 is refused with a reason.
        assert_eq!(
            parse(&["--kv-cache-dtype", "bfloat16"])
                .unwrap()
                .kv_cache_dtype,
            KvCacheDtypeChoice::BFloat16
        );
        assert_eq!(
            parse(&["--kv-cache-dtype", "fp16", "--cpu-arithmetic", "int8"])
                .unwrap()
                .cpu_arithmetic,
            CpuArithmeticChoice::Int8
        );
        let fp8 = parse(&["--kv-cache-dtype", "fp8"]).map(|_| ()).unwrap_err();
        assert!(
            fp8.to_string().contains("fp8 caches are not implemented"),
            "{fp8}"
        );
        assert!(parse(&["--enable-lora"])
            .unwrap()
            .check_vllm_flags()
            .is_err());
        assert!(parse(&["--enforce-eager", "--trust-remote-code"])
            .unwrap()
            .check_vllm_flags()
            .is_ok());
    }

    #[test]
    fn output_parsers_are_checked() {
        let parsers = |a: &[&str]| output_parsers(&parse(a).unwrap()).map_err(|e| e.to_string());
        let ok = parsers(&[
            "--enable-auto-tool-choice",
            "--tool-call-parser",
            "openai",
            "--reasoning-parser",
            "gpt_oss",
        ]);
        assert!(matches!(ok, Ok((Some(_), Some(_)))), "{ok:?}");
        assert!(matches!(
            parsers(&["--reasoning-parser", "qwen3"]),
            Ok((None, Some(_)))
        ));
        for (bad, says) in [
            (
                &["--reasoning-parser", "r2"][..],
                "deepseek_r1, qwen3, gpt_oss",
            ),
            (
                &["--enable-auto-tool-choice"][..],
                "needs --tool-call-parser",
            ),
            (
                &["--enable-auto-tool-choice", "--tool-call-parser", "x"][..],
                "qwen3_coder",
            ),
            (
                &["--enable-auto-tool-choice", "--tool-call-parser", "openai"][..],
                "--reasoning-parser gpt_oss",
            ),
        ] {
            let err = parsers(bad).unwrap_err();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    #[test]
    fn sizes_and_counts() {
        assert_eq!(parse_bytes("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_bytes("4G").unwrap(), 4 << 30);
        assert_eq!(parse_bytes("4GB").unwrap(), 4_000_000_000);
        assert_eq!(parse_bytes("1.5MiB").unwrap(), 3 << 19);
        assert_eq!(parse_bytes("123").unwrap(), 123);
        assert!(parse_bytes("4XB").is_err());
        assert_eq!(parse_count("32k").unwrap(), 32_000);
        assert_eq!(parse_count("32K").unwrap(), 32_768);
        assert!(parse_count("1.5").is_err());
    }

    #[test]
    fn origins() {
        assert_eq!(parse_origins("[\"*\"]").unwrap(), vec!["*"]);
        assert_eq!(
            parse_origins("http://a, http://b").unwrap(),
            vec!["http://a", "http://b"]
        );
        assert!(parse_origins("[]").is_err());
    }

    #[test]
    fn generation_config_sources() {
        let dir = std::env::temp_dir().join(format!("spindle-genconf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("generation_config.json"),
            r#"{"temperature": 0.2, "top_p": 0.9, "eos_token_id": 2}"#,
        )
        .unwrap();
        let d = dir.to_str().unwrap();
        // auto: the file beside the weights (a directory model); a GGUF file carries none.
        assert_eq!(
            request_defaults(d, "auto", None).unwrap().temperature,
            Some(0.2)
        );
        assert!(request_defaults("m.gguf", "auto", None).unwrap().is_empty());
        assert!(request_defaults(d, "vllm", None).unwrap().is_empty());
        // A directory given explicitly, with overrides on top.
        let o = request_defaults("m.gguf", d, Some(r#"{"temperature": 0.7}"#)).unwrap();
        assert_eq!((o.temperature, o.top_p), (Some(0.7), Some(0.9)));
        assert!(request_defaults("m.gguf", "/nonexistent-dir", None).is_err());
        assert!(request_defaults("m.gguf", "vllm", Some("{bad")).is_err());
        assert!(request_defaults("m.gguf", "vllm", Some(r#"{"top_p": 2}"#)).is_err());
        let empty = dir.join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        assert!(request_defaults("m.gguf", empty.to_str().unwrap(), None).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
