//! The human-readable report of a run, printed on stdout (same quantities as `vllm bench serve`).

use std::fmt::Write as _;

use crate::metrics::{percentile_key, Summary};
use crate::runner::{BenchResult, LatencyMetric};

const WIDTH: usize = 52;

fn rule(out: &mut String, title: &str) {
    let title = if title.is_empty() {
        String::new()
    } else {
        format!(" {title} ")
    };
    let pad = WIDTH.saturating_sub(title.chars().count());
    let _ = writeln!(
        out,
        "{}{}{}",
        "=".repeat(pad / 2),
        title,
        "=".repeat(pad - pad / 2)
    );
}

fn row(out: &mut String, name: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "{:<40}{:>12}", format!("{name}:"), value);
}

fn latency_block(out: &mut String, title: &str, short: &str, s: &Summary, percentiles: &[f64]) {
    rule(out, title);
    row(out, &format!("Mean {short} (ms)"), format!("{:.2}", s.mean));
    row(
        out,
        &format!("Median {short} (ms)"),
        format!("{:.2}", s.median),
    );
    for &p in percentiles {
        if let Some(v) = s.percentiles.get(&percentile_key(p)) {
            row(out, &format!("P{p} {short} (ms)"), format!("{v:.2}"));
        }
    }
}

/// The report of one run as text.
pub fn format_report(r: &BenchResult) -> String {
    let m = &r.metrics;
    let mut out = String::new();
    rule(&mut out, "spindle bench serve");
    let _ = writeln!(out, "{} · {} · {}", r.base_url, r.endpoint.route(), r.model);
    let _ = writeln!(out, "dataset {} ({})", r.dataset, r.dataset_params);
    rule(&mut out, "");
    row(&mut out, "Successful requests", m.completed);
    row(&mut out, "Failed requests", m.failed);
    let cap = r
        .max_concurrency
        .map_or("none".to_owned(), |c| c.to_string());
    row(
        &mut out,
        "Concurrency cap / most observed",
        format!("{cap} / {}", m.max_concurrent_requests),
    );
    let rate = r.request_rate.map_or("inf".to_owned(), |x| format!("{x}"));
    row(&mut out, "Request rate (req/s)", rate);
    row(
        &mut out,
        "Benchmark duration (s)",
        format!("{:.2}", m.duration_s),
    );
    row(&mut out, "Total input tokens", m.total_input_tokens);
    row(&mut out, "Total generated tokens", m.total_output_tokens);
    row(
        &mut out,
        "Request throughput (req/s)",
        format!("{:.2}", m.request_throughput),
    );
    row(
        &mut out,
        "Output token throughput (tok/s)",
        format!("{:.2}", m.output_throughput),
    );
    row(
        &mut out,
        "Peak output token throughput (tok/s)",
        format!("{:.2}", m.peak_output_throughput),
    );
    row(
        &mut out,
        "Total token throughput (tok/s)",
        format!("{:.2}", m.total_token_throughput),
    );
    if let Some(g) = m.goodput {
        let slos: Vec<String> = r
            .goodput_slos
            .iter()
            .map(|s| format!("{:?}≤{}ms", s.metric, s.max_ms).to_lowercase())
            .collect();
        row(
            &mut out,
            &format!("Goodput (req/s, {})", slos.join(" ")),
            format!("{g:.2}"),
        );
    }
    for metric in &r.percentile_metrics {
        match metric {
            LatencyMetric::Ttft => latency_block(
                &mut out,
                "Time to first token",
                "TTFT",
                &m.ttft_ms,
                &r.metric_percentiles,
            ),
            LatencyMetric::Tpot => latency_block(
                &mut out,
                "Time per output token (excl. 1st)",
                "TPOT",
                &m.tpot_ms,
                &r.metric_percentiles,
            ),
            LatencyMetric::Itl => latency_block(
                &mut out,
                "Inter-token latency",
                "ITL",
                &m.itl_ms,
                &r.metric_percentiles,
            ),
            LatencyMetric::E2el => latency_block(
                &mut out,
                "End-to-end latency",
                "E2EL",
                &m.e2el_ms,
                &r.metric_percentiles,
            ),
        }
    }
    rule(&mut out, "");
    if m.requests_without_usage > 0 {
        let _ = writeln!(
            out,
            "note: {} completed requests came without `usage`; their output tokens are counted as streamed chunks",
            m.requests_without_usage
        );
    }
    if r.warmup_failures > 0 {
        let _ = writeln!(
            out,
            "note: {} of {} warm-up requests failed",
            r.warmup_failures, r.num_warmups
        );
    }
    if let Some(e) = &r.first_error {
        let _ = writeln!(out, "first error: {e}");
    }
    if let Some(c) = &r.server_counters {
        if let Some(g) = c.generation_tokens {
            let _ = writeln!(
                out,
                "server /metrics: generation tokens +{g} (client counted {})",
                m.total_output_tokens
            );
        }
        if let Some((rate, length)) = c.acceptance() {
            let _ = writeln!(
                out,
                "speculative decoding: acceptance rate {:.1} %, mean acceptance length {length:.2} tokens per step ({} drafts)",
                100.0 * rate,
                c.spec_drafts.unwrap_or(0.0)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{compute_metrics, RequestOutcome};

    #[test]
    fn report_lists_the_configured_metrics_and_percentiles() {
        let o = RequestOutcome {
            success: true,
            prompt_tokens: Some(10),
            output_tokens: 3,
            usage_reported: false,
            ttft_s: 0.1,
            itl_s: vec![0.05, 0.05],
            e2el_s: 0.2,
            ..Default::default()
        };
        let failed = RequestOutcome {
            error: Some("HTTP 429: slow down".into()),
            ..Default::default()
        };
        let r = BenchResult {
            metrics: compute_metrics(&[o, failed], 1.0, &[50.0, 99.9], &[]),
            metric_percentiles: vec![50.0, 99.9],
            percentile_metrics: vec![LatencyMetric::Ttft, LatencyMetric::Itl],
            first_error: Some("HTTP 429: slow down".into()),
            ..BenchResult::default()
        };
        let text = format_report(&r);
        assert!(text.contains("Successful requests:"));
        assert!(text.contains("P99.9 TTFT (ms):"));
        assert!(text.contains("P50 ITL (ms):"));
        assert!(!text.contains("TPOT (ms)"));
        assert!(text.contains("first error: HTTP 429"));
        assert!(text.contains("without `usage`"));
    }
}
