//! `bench serve`: send a dataset to a server under an arrival process and a concurrency cap,
//! measure every request, and aggregate the results.

use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::Semaphore;

use crate::arrivals::ArrivalProcess;
use crate::client::{BaseUrl, HttpClient};
use crate::dataset::{build_requests, run_nonce, BenchRequest, DatasetSpec};
use crate::error::{BenchError, Result};
use crate::metrics::{compute_metrics, BenchMetrics, RequestOutcome, Slo};
use crate::request::{request_body, run_request, EndpointKind, RequestOptions};

/// A latency metric the report can show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LatencyMetric {
    /// Time to first token.
    Ttft,
    /// Time per output token.
    Tpot,
    /// Inter-token latency.
    Itl,
    /// End-to-end latency.
    E2el,
}

impl std::str::FromStr for LatencyMetric {
    type Err = BenchError;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "ttft" => Ok(Self::Ttft),
            "tpot" => Ok(Self::Tpot),
            "itl" => Ok(Self::Itl),
            "e2el" => Ok(Self::E2el),
            other => Err(BenchError::InvalidArgument(format!(
                "unknown metric {other:?}: use ttft, tpot, itl or e2el"
            ))),
        }
    }
}

/// A JSON object, as taken by `--extra-body` (so the CLI needs no JSON crate of its own).
pub type JsonMap = Map<String, Value>;

/// The JSON object in `text`, or `None` if it is not valid JSON or not an object.
pub fn parse_json_object(text: &str) -> Option<JsonMap> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Some(map),
        _ => None,
    }
}

/// Parse a comma-separated list (`ttft,tpot` or `50,90,99`), skipping empty items.
pub fn parse_list<T: std::str::FromStr>(s: &str) -> std::result::Result<Vec<T>, T::Err> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(str::parse)
        .collect()
}

/// Everything one `bench serve` run needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Server base URL (`http://host:port`).
    pub base_url: String,
    /// Chat or completions API.
    pub endpoint: EndpointKind,
    /// Model name; `None` asks `GET /v1/models` for the first one.
    pub model: Option<String>,
    /// The prompts.
    pub dataset: DatasetSpec,
    /// Measured requests.
    pub num_prompts: usize,
    /// Requests per second (`f64::INFINITY`: all at once).
    pub request_rate: f64,
    /// Gamma shape of the inter-arrival gaps (1: Poisson).
    pub burstiness: f64,
    /// Most requests in flight; `None`: unbounded.
    pub max_concurrency: Option<usize>,
    /// Unmeasured requests sent first.
    pub num_warmups: usize,
    /// Seed of the prompts and the arrivals.
    pub seed: u64,
    /// Ask the server to ignore EOS so every request generates its full output length.
    pub ignore_eos: bool,
    /// Sampling temperature (`None`: server default).
    pub temperature: Option<f64>,
    /// Extra JSON fields for every request body.
    pub extra_body: Map<String, Value>,
    /// Service-level objectives for goodput.
    pub goodput: Vec<Slo>,
    /// Latency metrics shown in the report.
    pub percentile_metrics: Vec<LatencyMetric>,
    /// Percentiles computed for every latency metric.
    pub metric_percentiles: Vec<f64>,
    /// Bearer token for `/v1/*`.
    pub api_key: Option<String>,
    /// Give up on one request after this long.
    pub request_timeout: Duration,
    /// Draw a progress bar on stderr.
    pub show_progress: bool,
    /// Free-form label stored with the result (e.g. the server's name).
    pub label: Option<String>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            base_url: "http://127.0.0.1:8000".into(),
            endpoint: EndpointKind::Completions,
            model: None,
            dataset: DatasetSpec::Random {
                input_len: 1024,
                output_len: 128,
                range_ratio: 0.0,
            },
            num_prompts: 1000,
            request_rate: f64::INFINITY,
            burstiness: 1.0,
            max_concurrency: None,
            num_warmups: 0,
            seed: 0,
            ignore_eos: false,
            temperature: None,
            extra_body: Map::new(),
            goodput: Vec::new(),
            percentile_metrics: vec![
                LatencyMetric::Ttft,
                LatencyMetric::Tpot,
                LatencyMetric::Itl,
                LatencyMetric::E2el,
            ],
            metric_percentiles: vec![99.0],
            api_key: None,
            request_timeout: Duration::from_secs(3600),
            show_progress: true,
            label: None,
        }
    }
}

/// Deltas of the server's own Prometheus counters over the measured part of the run, when it
/// exposes vLLM's metric names on `/metrics` (a cross-check of the client's numbers).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerCounters {
    /// `vllm:generation_tokens_total` delta.
    pub generation_tokens: Option<f64>,
    /// `vllm:prompt_tokens_total` delta.
    pub prompt_tokens: Option<f64>,
    /// `vllm:request_success_total` delta (all finish reasons).
    pub request_success: Option<f64>,
    /// Speculative decoding: `vllm:spec_decode_num_drafts_total`,
    /// `..._num_draft_tokens_total` and `..._num_accepted_tokens_total` deltas.
    #[serde(default)]
    pub spec_drafts: Option<f64>,
    #[serde(default)]
    pub spec_draft_tokens: Option<f64>,
    #[serde(default)]
    pub spec_accepted_tokens: Option<f64>,
}

impl ServerCounters {
    /// Speculative decoding's acceptance rate (accepted / drafted tokens) and mean acceptance
    /// length (tokens per verification step: 1 + accepted per draft), vLLM's two summaries;
    /// `None` when the server drafted nothing.
    pub fn acceptance(&self) -> Option<(f64, f64)> {
        let (drafts, tokens, accepted) = (
            self.spec_drafts?,
            self.spec_draft_tokens?,
            self.spec_accepted_tokens?,
        );
        (drafts > 0.0 && tokens > 0.0).then(|| (accepted / tokens, 1.0 + accepted / drafts))
    }
}

/// Sum of every sample of a Prometheus metric family in a text exposition (all label sets).
pub fn prometheus_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = false;
    let mut sum = 0.0;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // The name must end here: either labels or whitespace follow.
        let rest = match rest.chars().next() {
            Some('{') => match rest.find('}') {
                Some(i) => &rest[i + 1..],
                None => continue,
            },
            Some(c) if c.is_whitespace() => rest,
            _ => continue,
        };
        if let Some(v) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            sum += v;
            found = true;
        }
    }
    found.then_some(sum)
}

const COUNTERS: [&str; 6] = [
    "vllm:generation_tokens_total",
    "vllm:prompt_tokens_total",
    "vllm:request_success_total",
    "vllm:spec_decode_num_drafts_total",
    "vllm:spec_decode_num_draft_tokens_total",
    "vllm:spec_decode_num_accepted_tokens_total",
];

async fn scrape_counters(client: &HttpClient) -> Option<[Option<f64>; 6]> {
    let (status, text) = client
        .get_text("/metrics", Duration::from_secs(10))
        .await
        .ok()?;
    (status == 200).then(|| COUNTERS.map(|name| prometheus_sum(&text, name)))
}

/// Everything measured in one run plus its parameters; `--save-result` writes this as JSON.
/// Latencies in the per-request arrays are in seconds, summaries in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BenchResult {
    /// UTC time the run started, `YYYY-MM-DDTHH:MM:SSZ`.
    pub date: String,
    /// Free-form label (server name).
    pub label: Option<String>,
    /// Server URL.
    pub base_url: String,
    /// API used.
    pub endpoint: EndpointKind,
    /// Model name sent.
    pub model: String,
    /// Dataset name.
    pub dataset: String,
    /// Dataset parameters, human-readable.
    pub dataset_params: String,
    /// Measured requests.
    pub num_prompts: usize,
    /// Requests per second; `None` means infinite (all at once).
    pub request_rate: Option<f64>,
    /// Gamma shape of the arrivals.
    pub burstiness: f64,
    /// Concurrency cap, if any.
    pub max_concurrency: Option<usize>,
    /// Warm-up requests sent before measuring.
    pub num_warmups: usize,
    /// Warm-up requests that failed.
    pub warmup_failures: usize,
    /// Seed.
    pub seed: u64,
    /// Whether `ignore_eos` was sent.
    pub ignore_eos: bool,
    /// Temperature sent, if any.
    pub temperature: Option<f64>,
    /// Percentiles computed.
    pub metric_percentiles: Vec<f64>,
    /// Latency metrics shown.
    pub percentile_metrics: Vec<LatencyMetric>,
    /// Goodput objectives.
    pub goodput_slos: Vec<Slo>,
    /// Aggregates.
    #[serde(flatten)]
    pub metrics: BenchMetrics,
    /// First error message, if any request failed.
    pub first_error: Option<String>,
    /// Server-side counter deltas, when `/metrics` has vLLM's names.
    pub server_counters: Option<ServerCounters>,
    /// Per request: prompt tokens (server usage, else the estimate).
    pub input_lens: Vec<u64>,
    /// Per request: output tokens.
    pub output_lens: Vec<u64>,
    /// Per request: TTFT in seconds (0 for failures).
    pub ttfts: Vec<f64>,
    /// Per request: inter-token gaps in seconds.
    pub itls: Vec<Vec<f64>>,
    /// Per request: end-to-end latency in seconds.
    pub e2els: Vec<f64>,
    /// Per request: send time relative to the start, in seconds.
    pub start_times: Vec<f64>,
    /// Per request: error message, empty on success.
    pub errors: Vec<String>,
}

impl BenchResult {
    /// Write the result as pretty JSON.
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| BenchError::io(dir, e))?;
        }
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text).map_err(|e| BenchError::io(path, e))
    }

    /// Read a result written by [`Self::save`].
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| BenchError::io(path, e))?;
        Ok(serde_json::from_str(&text)?)
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a Unix time (civil calendar from days, proleptic Gregorian).
pub fn format_utc(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let secs = unix_secs % 86_400;
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Now, formatted by [`format_utc`].
pub fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format_utc(secs)
}

fn dataset_params(spec: &DatasetSpec) -> String {
    match spec {
        DatasetSpec::Random {
            input_len,
            output_len,
            range_ratio,
        } => {
            format!("input {input_len}, output {output_len}, range ratio {range_ratio}")
        }
        DatasetSpec::ShareGpt { path, output_len } => match output_len {
            Some(o) => format!("{} (output {o})", path.display()),
            None => path.display().to_string(),
        },
        DatasetSpec::PrefixRepetition {
            prefix_len,
            suffix_len,
            num_prefixes,
            output_len,
        } => {
            format!(
                "{num_prefixes} prefixes of {prefix_len}, suffix {suffix_len}, output {output_len}"
            )
        }
        DatasetSpec::Jsonl { path } => path.display().to_string(),
    }
}

fn validate(cfg: &ServeConfig) -> Result<ArrivalProcess> {
    if cfg.num_prompts == 0 {
        return Err(BenchError::InvalidArgument(
            "--num-prompts must be at least 1".into(),
        ));
    }
    if cfg.max_concurrency == Some(0) {
        return Err(BenchError::InvalidArgument(
            "--max-concurrency must be at least 1".into(),
        ));
    }
    if let Some(p) = cfg
        .metric_percentiles
        .iter()
        .find(|p| !(0.0..=100.0).contains(*p))
    {
        return Err(BenchError::InvalidArgument(format!(
            "percentile {p} is outside 0..100"
        )));
    }
    ArrivalProcess::new(cfg.request_rate, cfg.burstiness)
}

/// Send `reqs` (bodies prepared) at `arrivals`, at most `max_concurrency` at once.
async fn send_all(
    client: &HttpClient,
    kind: EndpointKind,
    reqs: Vec<(Vec<u8>, u64)>,
    arrivals: &[f64],
    max_concurrency: Option<usize>,
    timeout: Duration,
    progress: &ProgressBar,
) -> (Vec<RequestOutcome>, f64) {
    let sem = max_concurrency.map(|c| Arc::new(Semaphore::new(c)));
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(reqs.len());
    for ((body, expected), &at) in reqs.into_iter().zip(arrivals) {
        tokio::time::sleep_until((t0 + Duration::from_secs_f64(at)).into()).await;
        let client = client.clone();
        let sem = sem.clone();
        let progress = progress.clone();
        tasks.push(tokio::spawn(async move {
            // The semaphore is FIFO, so requests start in arrival order.
            let _permit = match &sem {
                Some(s) => s.clone().acquire_owned().await.ok(),
                None => None,
            };
            let outcome = run_request(&client, kind, body, expected, t0, timeout).await;
            progress.inc(1);
            outcome
        }));
    }
    let mut outcomes = Vec::with_capacity(tasks.len());
    for task in tasks {
        outcomes.push(task.await.unwrap_or_else(|e| RequestOutcome {
            error: Some(format!("request task failed: {e}")),
            ..RequestOutcome::default()
        }));
    }
    (outcomes, t0.elapsed().as_secs_f64())
}

fn encode_bodies(
    kind: EndpointKind,
    opts: &RequestOptions,
    reqs: &[BenchRequest],
) -> Result<Vec<(Vec<u8>, u64)>> {
    reqs.iter()
        .map(|r| {
            Ok((
                serde_json::to_vec(&request_body(kind, opts, r))?,
                r.expected_input_tokens,
            ))
        })
        .collect()
}

/// Run one benchmark on the current tokio runtime.
pub async fn run_serve_async(cfg: &ServeConfig) -> Result<BenchResult> {
    let arrivals_process = validate(cfg)?;
    let client = HttpClient::new(BaseUrl::parse(&cfg.base_url)?, cfg.api_key.clone());
    let model = match &cfg.model {
        Some(m) => m.clone(),
        None => client.first_model(Duration::from_secs(30)).await?,
    };
    let date = now_utc();
    let all = build_requests(
        &cfg.dataset,
        cfg.num_prompts + cfg.num_warmups,
        cfg.seed,
        run_nonce(),
    )?;
    let (warmups, measured) = all.split_at(cfg.num_warmups);
    let opts = RequestOptions {
        model: model.clone(),
        ignore_eos: cfg.ignore_eos,
        temperature: cfg.temperature,
        extra_body: cfg.extra_body.clone(),
    };

    let mut warmup_failures = 0;
    if !warmups.is_empty() {
        let hidden = ProgressBar::hidden();
        let bodies = encode_bodies(cfg.endpoint, &opts, warmups)?;
        let zeros = vec![0.0; bodies.len()];
        let (outs, _) = send_all(
            &client,
            cfg.endpoint,
            bodies,
            &zeros,
            cfg.max_concurrency,
            cfg.request_timeout,
            &hidden,
        )
        .await;
        warmup_failures = outs.iter().filter(|o| !o.success).count();
    }

    let before = scrape_counters(&client).await;
    let bodies = encode_bodies(cfg.endpoint, &opts, measured)?;
    let mut rng = StdRng::seed_from_u64(cfg.seed ^ 0x5eed_a771_7a1c_0001);
    let arrivals = arrivals_process.arrival_times(bodies.len(), &mut rng);
    let progress = if cfg.show_progress {
        let pb =
            ProgressBar::with_draw_target(Some(bodies.len() as u64), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} requests ({per_sec}, eta {eta})",
        ) {
            pb.set_style(style);
        }
        pb
    } else {
        ProgressBar::hidden()
    };
    let (outcomes, duration) = send_all(
        &client,
        cfg.endpoint,
        bodies,
        &arrivals,
        cfg.max_concurrency,
        cfg.request_timeout,
        &progress,
    )
    .await;
    progress.finish_and_clear();
    let after = scrape_counters(&client).await;

    let server_counters = match (before, after) {
        (Some(b), Some(a)) => {
            let delta = |i: usize| match (b[i], a[i]) {
                (Some(x), Some(y)) => Some(y - x),
                _ => None,
            };
            let c = ServerCounters {
                generation_tokens: delta(0),
                prompt_tokens: delta(1),
                request_success: delta(2),
                spec_drafts: delta(3),
                spec_draft_tokens: delta(4),
                spec_accepted_tokens: delta(5),
            };
            (c != ServerCounters::default()).then_some(c)
        }
        _ => None,
    };

    let metrics = compute_metrics(&outcomes, duration, &cfg.metric_percentiles, &cfg.goodput);
    Ok(BenchResult {
        date,
        label: cfg.label.clone(),
        base_url: client.base().to_string(),
        endpoint: cfg.endpoint,
        model,
        dataset: cfg.dataset.name().to_owned(),
        dataset_params: dataset_params(&cfg.dataset),
        num_prompts: cfg.num_prompts,
        request_rate: cfg.request_rate.is_finite().then_some(cfg.request_rate),
        burstiness: cfg.burstiness,
        max_concurrency: cfg.max_concurrency,
        num_warmups: cfg.num_warmups,
        warmup_failures,
        seed: cfg.seed,
        ignore_eos: cfg.ignore_eos,
        temperature: cfg.temperature,
        metric_percentiles: cfg.metric_percentiles.clone(),
        percentile_metrics: cfg.percentile_metrics.clone(),
        goodput_slos: cfg.goodput.clone(),
        metrics,
        first_error: outcomes.iter().find_map(|o| o.error.clone()),
        server_counters,
        input_lens: outcomes
            .iter()
            .map(|o| if o.success { o.input_tokens() } else { 0 })
            .collect(),
        output_lens: outcomes
            .iter()
            .map(|o| if o.success { o.output_tokens } else { 0 })
            .collect(),
        ttfts: outcomes.iter().map(|o| o.ttft_s).collect(),
        itls: outcomes.iter().map(|o| o.itl_s.clone()).collect(),
        e2els: outcomes.iter().map(|o| o.e2el_s).collect(),
        start_times: outcomes.iter().map(|o| o.start_s).collect(),
        errors: outcomes
            .iter()
            .map(|o| o.error.clone().unwrap_or_default())
            .collect(),
    })
}

/// A multi-threaded tokio runtime for the blocking entry points.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| BenchError::Server(format!("cannot start the tokio runtime: {e}")))
}

/// Run one benchmark, blocking the calling thread.
pub fn run_serve(cfg: &ServeConfig) -> Result<BenchResult> {
    runtime()?.block_on(run_serve_async(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formatting() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(1_795_000_000), "2026-11-18T11:06:40Z");
    }

    #[test]
    fn prometheus_parsing() {
        let text = "# HELP vllm:generation_tokens_total Tokens generated.\n\
                    # TYPE vllm:generation_tokens_total counter\n\
                    vllm:generation_tokens_total{model_name=\"a\"} 120\n\
                    vllm:generation_tokens_total{model_name=\"b\"} 5\n\
                    vllm:generation_tokens_total_created 17\n\
                    vllm:prompt_tokens_total 3.5e2\n";
        assert_eq!(
            prometheus_sum(text, "vllm:generation_tokens_total"),
            Some(125.0)
        );
        assert_eq!(
            prometheus_sum(text, "vllm:prompt_tokens_total"),
            Some(350.0)
        );
        assert_eq!(prometheus_sum(text, "vllm:request_success_total"), None);
    }

    #[test]
    fn speculative_acceptance_from_counter_deltas() {
        let c = ServerCounters {
            spec_drafts: Some(10.0),
            spec_draft_tokens: Some(40.0),
            spec_accepted_tokens: Some(30.0),
            ..ServerCounters::default()
        };
        assert_eq!(c.acceptance(), Some((0.75, 4.0)));
        let none = ServerCounters {
            spec_drafts: Some(0.0),
            spec_draft_tokens: Some(0.0),
            spec_accepted_tokens: Some(0.0),
            ..ServerCounters::default()
        };
        assert_eq!(none.acceptance(), None);
        assert_eq!(ServerCounters::default().acceptance(), None);
    }

    #[test]
    fn json_objects() {
        assert_eq!(parse_json_object("{\"top_k\": 5}").unwrap()["top_k"], 5);
        assert!(parse_json_object("[1]").is_none());
        assert!(parse_json_object("{").is_none());
    }

    #[test]
    fn lists() {
        assert_eq!(
            parse_list::<f64>("50, 90,99,").unwrap(),
            vec![50.0, 90.0, 99.0]
        );
        assert_eq!(
            parse_list::<LatencyMetric>("ttft,E2EL").unwrap(),
            vec![LatencyMetric::Ttft, LatencyMetric::E2el]
        );
        assert!(parse_list::<LatencyMetric>("ttft,foo").is_err());
    }

    #[test]
    fn config_validation() {
        let mut c = ServeConfig {
            num_prompts: 0,
            ..ServeConfig::default()
        };
        assert!(validate(&c).is_err());
        c.num_prompts = 1;
        assert!(validate(&c).is_ok());
        c.max_concurrency = Some(0);
        assert!(validate(&c).is_err());
        c.max_concurrency = None;
        c.metric_percentiles = vec![101.0];
        assert!(validate(&c).is_err());
        c.metric_percentiles = vec![99.0];
        c.request_rate = 0.0;
        assert!(validate(&c).is_err());
    }

    #[test]
    fn result_json_round_trip() {
        let r = BenchResult {
            date: "x".into(),
            request_rate: None,
            ttfts: vec![0.5],
            ..BenchResult::default()
        };
        let text = serde_json::to_string(&r).unwrap();
        let back: BenchResult = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
    }
}
