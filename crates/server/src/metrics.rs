//! Prometheus metrics under vLLM's names and labels, so existing Grafana dashboards and alerts
//! keep working when a deployment swaps vLLM for spindle. Engine gauges and counters live in
//! the engine's atomics and are mirrored here at scrape time; latency histograms are fed by the
//! request handlers; `vllm:iteration_tokens_total` by a [`StepObserver`] on the engine thread.

use std::sync::Mutex;

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    Opts, Registry, TextEncoder,
};
use spindle_engine::{EngineStats, RequestTimings, StepObserver, StepTrace};
use std::sync::atomic::Ordering;

use crate::error::ServerError;

/// KV-cache settings exported as `vllm:cache_config_info` (a constant-1 gauge with labels).
#[derive(Debug, Clone, PartialEq)]
pub struct CacheInfo {
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks the engine allocated (on whatever device).
    pub num_gpu_blocks: u64,
    /// Whether shared prompt prefixes reuse blocks.
    pub enable_prefix_caching: bool,
    /// `--gpu-memory-utilization` as configured.
    pub gpu_memory_utilization: f32,
}

/// All metrics of one served model, in a private registry (tests can run several servers in
/// one process).
pub struct Metrics {
    registry: Registry,
    model_name: String,
    num_requests_running: Gauge,
    num_requests_waiting: Gauge,
    kv_cache_usage: Gauge,
    prompt_tokens: IntCounter,
    generation_tokens: IntCounter,
    preemptions: IntCounter,
    prefix_cache_queries: IntCounter,
    prefix_cache_hits: IntCounter,
    spec_drafts: IntCounter,
    spec_draft_tokens: IntCounter,
    spec_accepted_tokens: IntCounter,
    /// Accepted draft tokens by position (label `position`, 0 = the first draft token).
    spec_accepted_per_pos: IntCounterVec,
    request_success: IntCounterVec,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    queue_time: Histogram,
    prefill_time: Histogram,
    decode_time: Histogram,
    request_prompt_tokens: Histogram,
    request_generation_tokens: Histogram,
    iteration_tokens: Histogram,
    cache_config_info: GaugeVec,
    http_requests: IntCounterVec,
    /// Serializes mirroring of the engine's counters (concurrent scrapes).
    mirror: Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("model_name", &self.model_name)
            .finish_non_exhaustive()
    }
}

const LATENCY_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
const ITERATION_TOKEN_BUCKETS: &[f64] = &[
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
];

/// 1, 2, 5, 10, 20, 50, … up to `max` (token-count histograms scale with the context).
fn one_two_five_buckets(max: usize) -> Vec<f64> {
    let mut out = Vec::new();
    let mut base = 1u64;
    'outer: loop {
        for m in [1u64, 2, 5] {
            let v = base * m;
            if v > max.max(1) as u64 {
                break 'outer;
            }
            out.push(v as f64);
        }
        base = match base.checked_mul(10) {
            Some(b) => b,
            None => break,
        };
    }
    out
}

impl Metrics {
    /// Register every metric for `model_name` (the first served name, like vLLM).
    pub fn new(model_name: &str, max_model_len: usize) -> Result<Self, ServerError> {
        let registry = Registry::new();
        let err = |e: prometheus::Error| ServerError::Metrics(e.to_string());
        let model = [model_name];

        macro_rules! gauge {
            ($name:expr, $help:expr) => {{
                let v = GaugeVec::new(Opts::new($name, $help), &["model_name"]).map_err(err)?;
                registry.register(Box::new(v.clone())).map_err(err)?;
                v.with_label_values(&model)
            }};
        }
        macro_rules! counter {
            ($name:expr, $help:expr) => {{
                let v =
                    IntCounterVec::new(Opts::new($name, $help), &["model_name"]).map_err(err)?;
                registry.register(Box::new(v.clone())).map_err(err)?;
                v.with_label_values(&model)
            }};
        }
        macro_rules! histogram {
            ($name:expr, $help:expr, $buckets:expr) => {{
                let v = HistogramVec::new(
                    HistogramOpts::new($name, $help).buckets($buckets),
                    &["model_name"],
                )
                .map_err(err)?;
                registry.register(Box::new(v.clone())).map_err(err)?;
                v.with_label_values(&model)
            }};
        }

        let request_success = IntCounterVec::new(
            Opts::new(
                "vllm:request_success_total",
                "Finished requests, by finish reason.",
            ),
            &["model_name", "finished_reason"],
        )
        .map_err(err)?;
        registry
            .register(Box::new(request_success.clone()))
            .map_err(err)?;
        let spec_accepted_per_pos = IntCounterVec::new(
            Opts::new(
                "vllm:spec_decode_num_accepted_tokens_per_pos_total",
                "Accepted draft tokens, by position in the draft.",
            ),
            &["model_name", "position"],
        )
        .map_err(err)?;
        registry
            .register(Box::new(spec_accepted_per_pos.clone()))
            .map_err(err)?;
        let cache_config_info = GaugeVec::new(
            Opts::new(
                "vllm:cache_config_info",
                "KV-cache configuration (value is always 1).",
            ),
            &[
                "model_name",
                "block_size",
                "num_gpu_blocks",
                "enable_prefix_caching",
                "gpu_memory_utilization",
            ],
        )
        .map_err(err)?;
        registry
            .register(Box::new(cache_config_info.clone()))
            .map_err(err)?;
        let http_requests = IntCounterVec::new(
            Opts::new(
                "http_requests_total",
                "HTTP requests by handler, method and status.",
            ),
            &["handler", "method", "status"],
        )
        .map_err(err)?;
        registry
            .register(Box::new(http_requests.clone()))
            .map_err(err)?;

        Ok(Self {
            model_name: model_name.to_string(),
            num_requests_running: gauge!(
                "vllm:num_requests_running",
                "Requests in the running batch."
            ),
            num_requests_waiting: gauge!(
                "vllm:num_requests_waiting",
                "Requests waiting to be scheduled."
            ),
            kv_cache_usage: gauge!(
                "vllm:kv_cache_usage_perc",
                "Fraction of KV-cache blocks in use (0-1)."
            ),
            prompt_tokens: counter!("vllm:prompt_tokens_total", "Prefill tokens processed."),
            generation_tokens: counter!("vllm:generation_tokens_total", "Tokens generated."),
            preemptions: counter!(
                "vllm:num_preemptions_total",
                "Sequences preempted to free KV blocks."
            ),
            prefix_cache_queries: counter!(
                "vllm:prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache."
            ),
            prefix_cache_hits: counter!(
                "vllm:prefix_cache_hits_total",
                "Prompt tokens found in the prefix cache."
            ),
            spec_drafts: counter!(
                "vllm:spec_decode_num_drafts_total",
                "Drafts verified (one per sequence and step with draft tokens)."
            ),
            spec_draft_tokens: counter!(
                "vllm:spec_decode_num_draft_tokens_total",
                "Draft tokens verified."
            ),
            spec_accepted_tokens: counter!(
                "vllm:spec_decode_num_accepted_tokens_total",
                "Draft tokens accepted."
            ),
            spec_accepted_per_pos,
            request_success,
            ttft: histogram!(
                "vllm:time_to_first_token_seconds",
                "Time to first token.",
                TTFT_BUCKETS.to_vec()
            ),
            itl: histogram!(
                "vllm:inter_token_latency_seconds",
                "Time between streamed deltas.",
                ITL_BUCKETS.to_vec()
            ),
            e2e: histogram!(
                "vllm:e2e_request_latency_seconds",
                "End-to-end request latency.",
                LATENCY_BUCKETS.to_vec()
            ),
            queue_time: histogram!(
                "vllm:request_queue_time_seconds",
                "Time waiting before first scheduled.",
                LATENCY_BUCKETS.to_vec()
            ),
            prefill_time: histogram!(
                "vllm:request_prefill_time_seconds",
                "Time in prefill.",
                LATENCY_BUCKETS.to_vec()
            ),
            decode_time: histogram!(
                "vllm:request_decode_time_seconds",
                "Time in decode.",
                LATENCY_BUCKETS.to_vec()
            ),
            request_prompt_tokens: histogram!(
                "vllm:request_prompt_tokens",
                "Prompt tokens per request.",
                one_two_five_buckets(max_model_len)
            ),
            request_generation_tokens: histogram!(
                "vllm:request_generation_tokens",
                "Generated tokens per request.",
                one_two_five_buckets(max_model_len)
            ),
            iteration_tokens: histogram!(
                "vllm:iteration_tokens_total",
                "Tokens per engine iteration.",
                ITERATION_TOKEN_BUCKETS.to_vec()
            ),
            cache_config_info,
            http_requests,
            registry,
            mirror: Mutex::new(()),
        })
    }

    /// The `model_name` label value.
    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    /// Publish the KV-cache configuration once the engine has sized its cache.
    pub fn set_cache_info(&self, info: &CacheInfo) {
        self.cache_config_info
            .with_label_values(&[
                self.model_name.as_str(),
                &info.block_size.to_string(),
                &info.num_gpu_blocks.to_string(),
                &info.enable_prefix_caching.to_string(),
                &info.gpu_memory_utilization.to_string(),
            ])
            .set(1.0);
    }

    /// Speculative decoding is on with `k` draft tokens: expose every position's counter (at 0).
    pub fn set_speculative_tokens(&self, k: usize) {
        for pos in 0..k {
            self.spec_accepted_per_pos
                .with_label_values(&[self.model_name.as_str(), &pos.to_string()]);
        }
    }

    /// Count one HTTP response.
    pub fn count_http(&self, handler: &str, method: &str, status: u16) {
        self.http_requests
            .with_label_values(&[handler, method, &status.to_string()])
            .inc();
    }

    /// One gap between two streamed deltas of a choice.
    pub fn observe_inter_token(&self, seconds: f64) {
        self.itl.observe(seconds);
    }

    /// A finished engine request: its phases and token counts.
    pub fn observe_request(
        &self,
        timings: &RequestTimings,
        prompt_tokens: usize,
        generation_tokens: usize,
    ) {
        self.ttft.observe(timings.time_to_first_token);
        self.e2e.observe(timings.e2e);
        self.queue_time.observe(timings.queue);
        self.prefill_time.observe(timings.prefill);
        self.decode_time.observe(timings.decode);
        self.request_prompt_tokens.observe(prompt_tokens as f64);
        self.request_generation_tokens
            .observe(generation_tokens as f64);
    }

    /// One choice that ended normally (`stop` or `length`).
    pub fn count_success(&self, finished_reason: &str) {
        self.request_success
            .with_label_values(&[self.model_name.as_str(), finished_reason])
            .inc();
    }

    /// Copy the engine's live numbers into the registry (gauges set, counters advanced to the
    /// engine's totals).
    pub fn sync_from_engine(&self, stats: &EngineStats) {
        let _guard = self.mirror.lock().unwrap_or_else(|p| p.into_inner());
        self.num_requests_running
            .set(stats.num_running.load(Ordering::Relaxed) as f64);
        self.num_requests_waiting
            .set(stats.num_waiting_total() as f64);
        self.kv_cache_usage.set(stats.kv_cache_usage());
        for (counter, value) in [
            (&self.prompt_tokens, &stats.prompt_tokens_total),
            (&self.generation_tokens, &stats.generation_tokens_total),
            (&self.preemptions, &stats.preemptions_total),
            (
                &self.prefix_cache_queries,
                &stats.prefix_cache_queries_total,
            ),
            (&self.prefix_cache_hits, &stats.prefix_cache_hits_total),
            (&self.spec_drafts, &stats.spec_drafts),
            (&self.spec_draft_tokens, &stats.spec_draft_tokens),
            (&self.spec_accepted_tokens, &stats.spec_accepted_tokens),
        ] {
            advance(counter, value.load(Ordering::Relaxed));
        }
        for (pos, value) in stats.spec_accepted_per_pos.iter().enumerate() {
            let value = value.load(Ordering::Relaxed);
            if value > 0 {
                let counter = self
                    .spec_accepted_per_pos
                    .with_label_values(&[self.model_name.as_str(), &pos.to_string()]);
                advance(&counter, value);
            }
        }
    }

    /// Prometheus text exposition of everything (after mirroring the engine's numbers).
    pub fn render(&self, stats: &EngineStats) -> String {
        self.sync_from_engine(stats);
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Advance a mirrored counter to the engine's total.
fn advance(counter: &IntCounter, target: u64) {
    let current = counter.get();
    if target > current {
        counter.inc_by(target - current);
    }
}

impl StepObserver for Metrics {
    /// Called on the engine thread after each iteration: one histogram observation, cheap.
    fn on_step(&self, trace: &StepTrace) {
        let tokens = trace.num_prefill_tokens + trace.num_decode_tokens;
        if tokens > 0 {
            self.iteration_tokens.observe(tokens as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn exposes_vllm_names_with_model_label() {
        let m = Metrics::new("my-model", 2048).unwrap();
        let stats = EngineStats::default();
        stats.num_running.store(3, Ordering::Relaxed);
        stats.kv_blocks_total.store(10, Ordering::Relaxed);
        stats.kv_blocks_used.store(5, Ordering::Relaxed);
        stats.prompt_tokens_total.store(42, Ordering::Relaxed);
        m.set_cache_info(&CacheInfo {
            block_size: 16,
            num_gpu_blocks: 10,
            enable_prefix_caching: true,
            gpu_memory_utilization: 0.9,
        });
        m.observe_request(&RequestTimings::default(), 5, 7);
        m.observe_inter_token(0.02);
        m.count_success("stop");
        m.count_http("/v1/completions", "POST", 200);
        m.on_step(&StepTrace {
            num_decode_tokens: 4,
            ..Default::default()
        });
        let text = m.render(&stats);
        for name in [
            "vllm:num_requests_running",
            "vllm:num_requests_waiting",
            "vllm:kv_cache_usage_perc",
            "vllm:prompt_tokens_total",
            "vllm:generation_tokens_total",
            "vllm:num_preemptions_total",
            "vllm:prefix_cache_queries_total",
            "vllm:prefix_cache_hits_total",
            "vllm:request_success_total",
            "vllm:time_to_first_token_seconds_bucket",
            "vllm:inter_token_latency_seconds_bucket",
            "vllm:e2e_request_latency_seconds_bucket",
            "vllm:request_queue_time_seconds_bucket",
            "vllm:request_prefill_time_seconds_bucket",
            "vllm:request_decode_time_seconds_bucket",
            "vllm:request_prompt_tokens_bucket",
            "vllm:request_generation_tokens_bucket",
            "vllm:iteration_tokens_total_bucket",
            "vllm:cache_config_info",
            "http_requests_total",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
        assert!(
            text.contains("vllm:num_requests_running{model_name=\"my-model\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("vllm:kv_cache_usage_perc{model_name=\"my-model\"} 0.5"),
            "{text}"
        );
        assert!(
            text.contains("vllm:prompt_tokens_total{model_name=\"my-model\"} 42"),
            "{text}"
        );
        assert!(text.contains("finished_reason=\"stop\""), "{text}");
        // Counters follow the engine's totals and never go backwards.
        stats.prompt_tokens_total.store(50, Ordering::Relaxed);
        assert!(m
            .render(&stats)
            .contains("vllm:prompt_tokens_total{model_name=\"my-model\"} 50"));
    }

    #[test]
    fn token_buckets() {
        assert_eq!(
            one_two_five_buckets(100),
            vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]
        );
        assert_eq!(one_two_five_buckets(0), vec![1.0]);
    }
}
