//! `bench sweep`: the same workload at increasing concurrency (1, 2, 4, …), to see how a server
//! scales with batch size. Writes a markdown table, a JSON of every level and an SVG plot.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{BenchError, Result};
use crate::metrics::Summary;
use crate::plot::{plot_sweeps, PlotSeries};
use crate::runner::{now_utc, run_serve_async, runtime, BenchResult, ServeConfig};

/// Parameters of a sweep; `base` is the per-level workload (its concurrency, prompt count and
/// request rate are overridden per level).
#[derive(Debug, Clone)]
pub struct SweepConfig {
    /// The workload.
    pub base: ServeConfig,
    /// Concurrency levels, ascending.
    pub levels: Vec<usize>,
    /// Prompts per level; `None`: max(8, 4 × concurrency).
    pub prompts_per_level: Option<usize>,
    /// Where the table, JSON and plot go.
    pub out_dir: PathBuf,
    /// File stem of the outputs (`<name>.md`, `<name>.json`, `<name>.svg`).
    pub name: String,
    /// Series label in the plot (e.g. the server's name).
    pub label: String,
}

/// One level of a sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepLevel {
    /// Requests in flight at most.
    pub concurrency: usize,
    /// The full result at that level.
    pub result: BenchResult,
}

/// A whole sweep, as saved to JSON and read back by `bench plot`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SweepResult {
    /// Series label.
    pub label: String,
    /// UTC start time.
    pub date: String,
    /// Server URL.
    pub base_url: String,
    /// Model name.
    pub model: String,
    /// Levels in the order run.
    pub levels: Vec<SweepLevel>,
}

impl SweepResult {
    /// Read a sweep JSON written by [`write_outputs`].
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| BenchError::io(path, e))?;
        Ok(serde_json::from_str(&text)?)
    }
}

/// Powers of two up to `max`, plus `max` itself when it is not one.
pub fn default_levels(max: usize) -> Vec<usize> {
    let mut v: Vec<usize> = std::iter::successors(Some(1usize), |&c| c.checked_mul(2))
        .take_while(|&c| c <= max)
        .collect();
    if max > 0 && v.last() != Some(&max) {
        v.push(max);
    }
    v
}

/// Prompts to send at `concurrency`: the fixed number if given, else max(8, 4 × concurrency),
/// enough for the level to reach its steady state.
pub fn prompts_for(concurrency: usize, fixed: Option<usize>) -> usize {
    fixed.unwrap_or_else(|| (4 * concurrency).max(8))
}

/// Run every level on one runtime; `on_level` sees each result as soon as it is in (to print).
pub fn run_sweep(cfg: &SweepConfig, mut on_level: impl FnMut(&BenchResult)) -> Result<SweepResult> {
    if cfg.levels.is_empty() || cfg.levels.contains(&0) {
        return Err(BenchError::InvalidArgument(
            "concurrency levels must be a non-empty list of values ≥ 1".into(),
        ));
    }
    let rt = runtime()?;
    let mut out = SweepResult {
        label: cfg.label.clone(),
        date: now_utc(),
        ..SweepResult::default()
    };
    for &c in &cfg.levels {
        let mut level = cfg.base.clone();
        level.max_concurrency = Some(c);
        level.num_prompts = prompts_for(c, cfg.prompts_per_level);
        level.request_rate = f64::INFINITY;
        level.label = Some(cfg.label.clone());
        if !level.metric_percentiles.contains(&99.0) {
            level.metric_percentiles.push(99.0);
        }
        let result = rt.block_on(run_serve_async(&level))?;
        on_level(&result);
        out.base_url.clone_from(&result.base_url);
        out.model.clone_from(&result.model);
        out.levels.push(SweepLevel {
            concurrency: c,
            result,
        });
    }
    Ok(out)
}

/// p99 of a summary (the largest percentile present if p99 was not computed).
pub fn p99(s: &Summary) -> f64 {
    s.percentiles
        .get("p99")
        .copied()
        .or_else(|| s.percentiles.values().last().copied())
        .unwrap_or(0.0)
}

/// The sweep as a markdown table, with each level's output throughput relative to concurrency 1.
pub fn markdown_table(s: &SweepResult) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Sweep `{}` against {} (model `{}`), {}",
        s.label, s.base_url, s.model, s.date
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| concurrency | prompts | ok | failed | duration s | req/s | output tok/s | total tok/s | × c=1 | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | ITL p50 ms | E2EL p50 ms |"
    );
    let _ = writeln!(out, "|{}", "---:|".repeat(15));
    let base = s
        .levels
        .first()
        .map(|l| l.result.metrics.output_throughput)
        .unwrap_or(0.0);
    for l in &s.levels {
        let m = &l.result.metrics;
        let ratio = if base > 0.0 {
            format!("{:.2}", m.output_throughput / base)
        } else {
            "-".into()
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.1} | {:.2} | {:.1} | {:.1} | {} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {:.1} |",
            l.concurrency,
            l.result.num_prompts,
            m.completed,
            m.failed,
            m.duration_s,
            m.request_throughput,
            m.output_throughput,
            m.total_token_throughput,
            ratio,
            m.ttft_ms.median,
            p99(&m.ttft_ms),
            m.tpot_ms.median,
            p99(&m.tpot_ms),
            m.itl_ms.median,
            m.e2el_ms.median,
        );
    }
    out
}

/// Write `<name>.md`, `<name>.json` and `<name>.svg` into `dir`; returns their paths.
pub fn write_outputs(s: &SweepResult, dir: &Path, name: &str) -> Result<[PathBuf; 3]> {
    std::fs::create_dir_all(dir).map_err(|e| BenchError::io(dir, e))?;
    let md = dir.join(format!("{name}.md"));
    let json = dir.join(format!("{name}.json"));
    let svg = dir.join(format!("{name}.svg"));
    std::fs::write(&md, markdown_table(s)).map_err(|e| BenchError::io(&md, e))?;
    std::fs::write(&json, serde_json::to_string_pretty(s)?)
        .map_err(|e| BenchError::io(&json, e))?;
    plot_sweeps(
        &[PlotSeries::from_sweep(&s.label, s)],
        &svg,
        &format!("{} · {}", s.model, s.date),
    )?;
    Ok([md, json, svg])
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::metrics::BenchMetrics;

    #[test]
    fn levels_and_prompt_counts() {
        assert_eq!(default_levels(32), vec![1, 2, 4, 8, 16, 32]);
        assert_eq!(default_levels(24), vec![1, 2, 4, 8, 16, 24]);
        assert_eq!(default_levels(1), vec![1]);
        assert!(default_levels(0).is_empty());
        assert_eq!(prompts_for(1, None), 8);
        assert_eq!(prompts_for(32, None), 128);
        assert_eq!(prompts_for(32, Some(10)), 10);
    }

    pub(crate) fn fake_sweep() -> SweepResult {
        let level = |c: usize, tput: f64, tpot: f64| {
            let mut m = BenchMetrics {
                output_throughput: tput,
                completed: 8,
                ..BenchMetrics::default()
            };
            m.tpot_ms.median = tpot;
            m.tpot_ms.percentiles.insert("p99".into(), tpot * 1.5);
            SweepLevel {
                concurrency: c,
                result: BenchResult {
                    num_prompts: 8,
                    metrics: m,
                    ..BenchResult::default()
                },
            }
        };
        SweepResult {
            label: "test".into(),
            date: "2026-01-01T00:00:00Z".into(),
            base_url: "http://x:1".into(),
            model: "m".into(),
            levels: vec![
                level(1, 100.0, 10.0),
                level(2, 180.0, 11.0),
                level(4, 300.0, 13.0),
            ],
        }
    }

    #[test]
    fn table_has_a_row_per_level_and_ratios() {
        let t = markdown_table(&fake_sweep());
        let rows: Vec<&str> = t
            .lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| concurrency"))
            .collect();
        assert_eq!(rows.len(), 3);
        assert!(rows[2].starts_with("| 4 | 8 | 8 | 0 |"));
        assert!(rows[2].contains("| 3.00 |"), "{}", rows[2]);
        assert!(rows[1].contains("| 1.80 |"));
    }

    #[test]
    fn outputs_are_written_and_read_back() {
        let dir = std::env::temp_dir().join(format!("spindle-sweep-test-{}", std::process::id()));
        let s = fake_sweep();
        let [md, json, svg] = write_outputs(&s, &dir, "sweep").unwrap();
        assert!(std::fs::read_to_string(md)
            .unwrap()
            .contains("| concurrency |"));
        assert_eq!(SweepResult::load(&json).unwrap(), s);
        let svg = std::fs::read_to_string(svg).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("test"));
    }
}
