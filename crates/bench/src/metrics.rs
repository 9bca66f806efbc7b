//! Metric math over measured requests, kept free of I/O so it can be tested on synthetic timings.
//!
//! Definitions (as `vllm bench serve` uses them):
//! * TTFT: request sent → first streamed chunk carrying output text;
//! * ITL: each gap between consecutive output chunks of a request;
//! * TPOT: per request, (E2EL − TTFT) / (output tokens − 1), for requests with > 1 output token;
//! * E2EL: request sent → last byte of the response;
//! * percentiles interpolate linearly between the closest ranks (numpy's default);
//! * goodput: completed requests per second that met every service-level objective given.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{BenchError, Result};

/// What one measured request produced. Times are in seconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestOutcome {
    /// The response streamed to its end with at least one output chunk.
    pub success: bool,
    /// Why the request failed (HTTP status and body, connection error, error event, ...).
    pub error: Option<String>,
    /// Prompt tokens as counted by the server (`usage.prompt_tokens`), when it reported usage.
    pub prompt_tokens: Option<u64>,
    /// The client's estimate of the prompt length, used only when the server gives no usage.
    pub expected_prompt_tokens: u64,
    /// Output tokens: `usage.completion_tokens`, or the number of output chunks without usage.
    pub output_tokens: u64,
    /// Whether `output_tokens` came from the server's usage.
    pub usage_reported: bool,
    /// When the request was sent, relative to the start of the run.
    pub start_s: f64,
    /// Time to first output chunk.
    pub ttft_s: f64,
    /// Gaps between consecutive output chunks.
    pub itl_s: Vec<f64>,
    /// Sent → last byte.
    pub e2el_s: f64,
}

impl RequestOutcome {
    /// Time per output token after the first; `None` for requests with fewer than 2 tokens.
    pub fn tpot_s(&self) -> Option<f64> {
        (self.output_tokens > 1)
            .then(|| (self.e2el_s - self.ttft_s) / (self.output_tokens - 1) as f64)
    }

    /// Input tokens to count for this request: the server's number, else the estimate.
    pub fn input_tokens(&self) -> u64 {
        self.prompt_tokens.unwrap_or(self.expected_prompt_tokens)
    }

    /// Absolute times (relative to the run start) at which output chunks arrived.
    pub fn chunk_times_s(&self) -> Vec<f64> {
        let mut t = self.start_s + self.ttft_s;
        let mut out = Vec::with_capacity(self.itl_s.len() + 1);
        out.push(t);
        for gap in &self.itl_s {
            t += gap;
            out.push(t);
        }
        out
    }
}

/// Percentile `p` (0–100) of ascending `sorted` values with linear interpolation between the
/// closest ranks, like numpy's default; 0 for an empty slice.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        1 => sorted[0],
        n => {
            let rank = (p.clamp(0.0, 100.0) / 100.0) * (n - 1) as f64;
            let lo = rank.floor() as usize;
            let hi = (lo + 1).min(n - 1);
            sorted[lo] + (rank - lo as f64) * (sorted[hi] - sorted[lo])
        }
    }
}

/// Name of a percentile in reports and JSON: `p99`, `p99.9`.
pub fn percentile_key(p: f64) -> String {
    format!("p{p}")
}

/// Distribution of one latency metric, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Number of samples (requests, or gaps for ITL).
    pub count: usize,
    /// Arithmetic mean.
    pub mean: f64,
    /// 50th percentile.
    pub median: f64,
    /// Population standard deviation.
    pub std: f64,
    /// The requested percentiles, keyed `p50`, `p90`, `p99`, ...
    #[serde(flatten)]
    pub percentiles: BTreeMap<String, f64>,
}

/// Summarize samples given in seconds into milliseconds (zeros when there are none).
pub fn summarize_ms(values_s: &[f64], percentiles: &[f64]) -> Summary {
    let mut v: Vec<f64> = values_s
        .iter()
        .map(|x| x * 1e3)
        .filter(|x| x.is_finite())
        .collect();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return Summary {
            percentiles: percentiles
                .iter()
                .map(|&p| (percentile_key(p), 0.0))
                .collect(),
            ..Summary::default()
        };
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
    Summary {
        count: v.len(),
        mean,
        median: percentile(&v, 50.0),
        std,
        percentiles: percentiles
            .iter()
            .map(|&p| (percentile_key(p), percentile(&v, p)))
            .collect(),
    }
}

/// A latency metric a service-level objective can constrain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SloMetric {
    /// Time to first token.
    Ttft,
    /// Time per output token.
    Tpot,
    /// End-to-end latency.
    E2el,
}

/// One objective of `--goodput`: the metric must be at most `max_ms` for a request to count.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Slo {
    /// The constrained metric.
    pub metric: SloMetric,
    /// Upper bound in milliseconds (inclusive).
    pub max_ms: f64,
}

impl std::str::FromStr for Slo {
    type Err = BenchError;

    /// Parse `ttft:500`, `tpot:50` or `e2el:10000`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            BenchError::InvalidArgument(format!(
                "goodput SLO {s:?}: expected ttft:MS, tpot:MS or e2el:MS"
            ))
        };
        let (name, value) = s.split_once(':').ok_or_else(bad)?;
        let metric = match name.trim().to_ascii_lowercase().as_str() {
            "ttft" => SloMetric::Ttft,
            "tpot" => SloMetric::Tpot,
            "e2el" => SloMetric::E2el,
            _ => return Err(bad()),
        };
        let max_ms: f64 = value.trim().parse().map_err(|_| bad())?;
        if !(max_ms >= 0.0 && max_ms.is_finite()) {
            return Err(bad());
        }
        Ok(Slo { metric, max_ms })
    }
}

/// Whether a successful request met every objective. A single-token output has no TPOT and
/// counts as meeting a TPOT objective.
pub fn meets_slos(o: &RequestOutcome, slos: &[Slo]) -> bool {
    o.success
        && slos.iter().all(|slo| {
            let value_s = match slo.metric {
                SloMetric::Ttft => o.ttft_s,
                SloMetric::Tpot => o.tpot_s().unwrap_or(0.0),
                SloMetric::E2el => o.e2el_s,
            };
            value_s * 1e3 <= slo.max_ms
        })
}

/// Highest number of output tokens completed in any 1-second window (aligned to the run start).
/// Each request's `output_tokens` are spread evenly over its output chunks, since one chunk may
/// carry several tokens.
pub fn peak_output_throughput(outcomes: &[RequestOutcome]) -> f64 {
    let mut buckets: BTreeMap<i64, f64> = BTreeMap::new();
    for o in outcomes.iter().filter(|o| o.success) {
        let times = o.chunk_times_s();
        let per_chunk = o.output_tokens as f64 / times.len() as f64;
        for t in times {
            *buckets.entry(t.floor() as i64).or_default() += per_chunk;
        }
    }
    buckets.values().copied().fold(0.0, f64::max)
}

/// Most requests in flight at the same time.
pub fn max_concurrency_observed(outcomes: &[RequestOutcome]) -> usize {
    // Ends sort before starts at the same instant, so back-to-back requests do not overlap.
    let mut events: Vec<(f64, i32)> = Vec::with_capacity(outcomes.len() * 2);
    for o in outcomes {
        events.push((o.start_s, 1));
        events.push((o.start_s + o.e2el_s, -1));
    }
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut now, mut max) = (0i32, 0i32);
    for (_, d) in events {
        now += d;
        max = max.max(now);
    }
    max.max(0) as usize
}

/// Aggregate numbers of a run, as printed in the report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BenchMetrics {
    /// Requests that streamed to completion.
    pub completed: usize,
    /// Requests that failed.
    pub failed: usize,
    /// Wall time from the first send to the last response, in seconds.
    pub duration_s: f64,
    /// Prompt tokens of completed requests.
    pub total_input_tokens: u64,
    /// Output tokens of completed requests.
    pub total_output_tokens: u64,
    /// Completed requests per second.
    pub request_throughput: f64,
    /// Output tokens per second.
    pub output_throughput: f64,
    /// Prompt plus output tokens per second.
    pub total_token_throughput: f64,
    /// Most output tokens completed in one second.
    pub peak_output_throughput: f64,
    /// Most requests observed in flight at once.
    pub max_concurrent_requests: usize,
    /// Requests per second meeting every SLO, when SLOs were given.
    pub goodput: Option<f64>,
    /// Completed requests whose server sent no usage (token counts are chunk counts then).
    pub requests_without_usage: usize,
    /// Time to first token, ms.
    pub ttft_ms: Summary,
    /// Time per output token, ms.
    pub tpot_ms: Summary,
    /// Inter-token latency, ms.
    pub itl_ms: Summary,
    /// End-to-end latency, ms.
    pub e2el_ms: Summary,
}

/// Compute the run's metrics from its requests and its wall time.
pub fn compute_metrics(
    outcomes: &[RequestOutcome],
    duration_s: f64,
    percentiles: &[f64],
    slos: &[Slo],
) -> BenchMetrics {
    let ok: Vec<&RequestOutcome> = outcomes.iter().filter(|o| o.success).collect();
    let completed = ok.len();
    let total_input_tokens: u64 = ok.iter().map(|o| o.input_tokens()).sum();
    let total_output_tokens: u64 = ok.iter().map(|o| o.output_tokens).sum();
    let per_s = |x: f64| {
        if duration_s > 0.0 {
            x / duration_s
        } else {
            0.0
        }
    };
    let ttfts: Vec<f64> = ok.iter().map(|o| o.ttft_s).collect();
    let tpots: Vec<f64> = ok.iter().filter_map(|o| o.tpot_s()).collect();
    let itls: Vec<f64> = ok.iter().flat_map(|o| o.itl_s.iter().copied()).collect();
    let e2els: Vec<f64> = ok.iter().map(|o| o.e2el_s).collect();
    let goodput =
        (!slos.is_empty()).then(|| per_s(ok.iter().filter(|o| meets_slos(o, slos)).count() as f64));
    BenchMetrics {
        completed,
        failed: outcomes.len() - completed,
        duration_s,
        total_input_tokens,
        total_output_tokens,
        request_throughput: per_s(completed as f64),
        output_throughput: per_s(total_output_tokens as f64),
        total_token_throughput: per_s((total_input_tokens + total_output_tokens) as f64),
        peak_output_throughput: peak_output_throughput(outcomes),
        max_concurrent_requests: max_concurrency_observed(outcomes),
        goodput,
        requests_without_usage: ok.iter().filter(|o| !o.usage_reported).count(),
        ttft_ms: summarize_ms(&ttfts, percentiles),
        tpot_ms: summarize_ms(&tpots, percentiles),
        itl_ms: summarize_ms(&itls, percentiles),
        e2el_ms: summarize_ms(&e2els, percentiles),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9 * (1.0 + a.abs().max(b.abs()))
    }

    /// A request sent at `start` whose chunks arrive `ttft` after it and then every `gap`.
    fn req(start: f64, ttft: f64, gaps: &[f64], tokens: u64) -> RequestOutcome {
        RequestOutcome {
            success: true,
            prompt_tokens: Some(100),
            expected_prompt_tokens: 90,
            output_tokens: tokens,
            usage_reported: true,
            start_s: start,
            ttft_s: ttft,
            e2el_s: ttft + gaps.iter().sum::<f64>(),
            itl_s: gaps.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn percentiles_match_numpy_linear() {
        let v = [1.0, 2.0, 3.0, 4.0];
        // numpy.percentile([1,2,3,4], [0, 25, 50, 90, 99, 100]) = 1, 1.75, 2.5, 3.7, 3.97, 4
        for (p, want) in [
            (0.0, 1.0),
            (25.0, 1.75),
            (50.0, 2.5),
            (90.0, 3.7),
            (99.0, 3.97),
            (100.0, 4.0),
        ] {
            assert!(
                close(percentile(&v, p), want),
                "p{p}: {}",
                percentile(&v, p)
            );
        }
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert!(close(percentile(&v, 99.0), 9.91));
        assert!(close(percentile(&v, 50.0), 5.5));
        assert_eq!(percentile(&[], 50.0), 0.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
    }

    #[test]
    fn summary_in_ms() {
        let s = summarize_ms(&[0.001, 0.002, 0.003, 0.004], &[50.0, 99.0]);
        assert_eq!(s.count, 4);
        assert!(close(s.mean, 2.5) && close(s.median, 2.5));
        assert!(close(s.std, 1.25f64.sqrt()));
        assert!(close(s.percentiles["p99"], 3.97));
        assert!(close(s.percentiles["p50"], 2.5));
        let empty = summarize_ms(&[], &[99.0]);
        assert_eq!(empty.count, 0);
        assert_eq!(empty.percentiles["p99"], 0.0);
    }

    #[test]
    fn tpot_ttft_itl_e2el() {
        // TTFT 200 ms, then 4 chunks 50 ms apart for 5 tokens: E2EL 400 ms, TPOT 200/4 = 50 ms.
        let r = req(0.0, 0.2, &[0.05; 4], 5);
        assert!(close(r.e2el_s, 0.4));
        assert!(close(r.tpot_s().unwrap(), 0.05));
        // One chunk carried two tokens: 3 gaps for 5 tokens, TPOT still spreads over tokens.
        let r = req(0.0, 0.1, &[0.1, 0.1, 0.1], 5);
        assert!(close(r.tpot_s().unwrap(), 0.3 / 4.0));
        assert_eq!(req(0.0, 0.1, &[], 1).tpot_s(), None);
        let times = req(1.0, 0.5, &[0.25, 0.25], 3).chunk_times_s();
        assert_eq!(times, vec![1.5, 1.75, 2.0]);
    }

    #[test]
    fn aggregate_metrics() {
        let mut failed = RequestOutcome {
            error: Some("HTTP 500".into()),
            ..Default::default()
        };
        failed.output_tokens = 99; // must not count
        let outcomes = vec![
            req(0.0, 0.1, &[0.1; 9], 10),
            req(0.5, 0.3, &[0.2; 4], 5),
            failed,
        ];
        let m = compute_metrics(&outcomes, 2.0, &[50.0, 99.0], &[]);
        assert_eq!((m.completed, m.failed), (2, 1));
        assert_eq!(m.total_input_tokens, 200);
        assert_eq!(m.total_output_tokens, 15);
        assert!(close(m.request_throughput, 1.0));
        assert!(close(m.output_throughput, 7.5));
        assert!(close(m.total_token_throughput, 107.5));
        assert_eq!(m.goodput, None);
        assert!(close(m.ttft_ms.mean, 200.0));
        // TPOTs: 0.9/9 = 100 ms and 0.8/4 = 200 ms.
        assert!(close(m.tpot_ms.mean, 150.0));
        // ITLs: nine of 100 ms and four of 200 ms.
        assert_eq!(m.itl_ms.count, 13);
        assert!(close(m.itl_ms.median, 100.0));
        assert!(close(m.e2el_ms.median, 1050.0));
        assert_eq!(m.max_concurrent_requests, 2);
        assert_eq!(m.requests_without_usage, 0);
    }

    #[test]
    fn input_tokens_fall_back_to_the_estimate_without_usage() {
        let mut r = req(0.0, 0.1, &[0.1], 2);
        r.prompt_tokens = None;
        r.usage_reported = false;
        let m = compute_metrics(&[r], 1.0, &[99.0], &[]);
        assert_eq!(m.total_input_tokens, 90);
        assert_eq!(m.requests_without_usage, 1);
    }

    #[test]
    fn goodput_counts_requests_meeting_every_slo() {
        // Binary fractions keep the sums exact: TTFT 125 ms, 8 gaps of 31.25 ms, 9 tokens.
        let gaps = [0.03125; 8];
        let outcomes = vec![
            req(0.0, 0.125, &gaps, 9),       // TTFT 125, TPOT 31.25, E2EL 375
            req(0.0, 0.625, &gaps, 9),       // TTFT too slow
            req(0.0, 0.125, &[0.125; 8], 9), // TPOT 125: too slow
            req(0.0, 0.0625, &[], 1),        // single token: no TPOT, meets it
        ];
        let slos: Vec<Slo> = ["ttft:500", "tpot:50"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let m = compute_metrics(&outcomes, 2.0, &[99.0], &slos);
        assert!(close(m.goodput.unwrap(), 1.0)); // 2 of 4 requests over 2 s
        let e2el: Vec<Slo> = vec!["e2el:375".parse().unwrap()];
        assert!(meets_slos(&outcomes[0], &e2el)); // inclusive bound
        assert!(!meets_slos(&outcomes[1], &e2el));
        let failed = RequestOutcome::default();
        assert!(!meets_slos(&failed, &[]));
    }

    #[test]
    fn slo_parsing() {
        let s: Slo = "TTFT: 250.5".parse().unwrap();
        assert_eq!(
            s,
            Slo {
                metric: SloMetric::Ttft,
                max_ms: 250.5
            }
        );
        for bad in ["ttft", "itl:5", "tpot:-1", "e2el:x", "tpot:inf"] {
            assert!(bad.parse::<Slo>().is_err(), "{bad}");
        }
    }

    #[test]
    fn peak_throughput_uses_one_second_windows() {
        // Request A: 4 tokens in 4 chunks all inside second 0; request B: 2 tokens inside second
        // 0 and 2 in second 1 (4 chunks).
        let a = req(0.0, 0.1, &[0.1, 0.1, 0.1], 4);
        let b = req(0.5, 0.125, &[0.25, 0.25, 0.25], 4); // chunks at 0.625, 0.875, 1.125, 1.375
        assert!(close(peak_output_throughput(&[a.clone(), b.clone()]), 6.0));
        // A chunk carrying two tokens counts twice.
        let c = req(0.0, 0.1, &[0.1], 4);
        assert!(close(peak_output_throughput(&[c]), 4.0));
        assert_eq!(peak_output_throughput(&[]), 0.0);
    }

    #[test]
    fn observed_concurrency() {
        let a = req(0.0, 0.5, &[0.5], 2); // 0 .. 1
        let b = req(1.0, 0.5, &[0.5], 2); // 1 .. 2 (back to back with a)
        let c = req(0.2, 0.5, &[1.0], 2); // 0.2 .. 1.7
        assert_eq!(max_concurrency_observed(&[a.clone(), b.clone()]), 1);
        assert_eq!(max_concurrency_observed(&[a, b, c]), 2);
    }
}
