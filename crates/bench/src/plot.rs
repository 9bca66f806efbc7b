//! SVG plots of sweeps: output throughput and TPOT (p50 solid, p99 dashed) against concurrency on
//! a log₂ axis, one colour per series, so several servers can be compared on one figure.

use std::path::Path;

use plotters::prelude::*;

use crate::error::{BenchError, Result};
use crate::runner::BenchResult;
use crate::sweep::{p99, SweepLevel, SweepResult};

/// One line of the plot: a label and (concurrency, output tok/s, TPOT p50 ms, TPOT p99 ms) points.
#[derive(Debug, Clone, PartialEq)]
pub struct PlotSeries {
    /// Legend text.
    pub label: String,
    /// Points in ascending concurrency.
    pub points: Vec<(usize, f64, f64, f64)>,
}

impl PlotSeries {
    /// The points of a sweep result.
    pub fn from_sweep(label: &str, s: &SweepResult) -> Self {
        let mut points: Vec<(usize, f64, f64, f64)> = s
            .levels
            .iter()
            .map(|l| {
                let m = &l.result.metrics;
                (
                    l.concurrency,
                    m.output_throughput,
                    m.tpot_ms.median,
                    p99(&m.tpot_ms),
                )
            })
            .collect();
        points.sort_by_key(|p| p.0);
        Self {
            label: label.to_owned(),
            points,
        }
    }
}

fn err<E: std::fmt::Display>(e: E) -> BenchError {
    BenchError::Plot(e.to_string())
}

/// Draw `series` into an SVG file at `path`, with `subtitle` under the title. Other extensions
/// are refused rather than written as SVG under a misleading name (a bitmap backend would pull
/// in font rendering for little gain: browsers and converters read SVG).
pub fn plot_sweeps(series: &[PlotSeries], path: &Path, subtitle: &str) -> Result<()> {
    let is_svg = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("svg"));
    if !is_svg {
        return Err(BenchError::Plot(format!(
            "{}: plots are written as SVG; give a path ending in .svg",
            path.display()
        )));
    }
    let all: Vec<&(usize, f64, f64, f64)> = series.iter().flat_map(|s| &s.points).collect();
    if all.is_empty() {
        return Err(BenchError::Plot("nothing to plot: no sweep levels".into()));
    }
    let log2 = |c: usize| (c.max(1) as f64).log2();
    let x_max = all.iter().map(|p| log2(p.0)).fold(0.0, f64::max);
    let x_range = -0.25..(x_max + 0.25).max(1.0);
    let y_tput = all.iter().map(|p| p.1).fold(0.0, f64::max).max(1.0) * 1.1;
    let y_tpot = all
        .iter()
        .map(|p| p.3.max(p.2))
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.1;

    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| BenchError::io(dir, e))?;
    }
    let root = SVGBackend::new(path, (1200, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root
        .titled(
            &format!("Concurrency sweep — {subtitle}"),
            ("sans-serif", 18),
        )
        .map_err(err)?;
    let (left, right) = root.split_horizontally(600);
    let x_fmt = |x: &f64| format!("{}", 2f64.powf(*x).round());

    let panels: [(&DrawingArea<SVGBackend, _>, &str, &str, f64); 2] = [
        (&left, "Output throughput", "output tok/s", y_tput),
        (
            &right,
            "Time per output token (p50 solid, p99 dashed)",
            "TPOT ms",
            y_tpot,
        ),
    ];
    for (panel_index, (area, caption, y_desc, y_max)) in panels.into_iter().enumerate() {
        let mut chart = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x_range.clone(), 0f64..y_max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("concurrency (log2 scale)")
            .y_desc(y_desc)
            .x_labels((x_max.ceil() as usize + 2).min(12))
            .x_label_formatter(&x_fmt)
            .draw()
            .map_err(err)?;
        for (i, s) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let main: Vec<(f64, f64)> = s
                .points
                .iter()
                .map(|p| (log2(p.0), if panel_index == 0 { p.1 } else { p.2 }))
                .collect();
            chart
                .draw_series(LineSeries::new(main.clone(), color.stroke_width(2)))
                .map_err(err)?
                .label(s.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(
                    main.iter()
                        .map(|&(x, y)| Circle::new((x, y), 3, color.filled())),
                )
                .map_err(err)?;
            if panel_index == 1 {
                let tail: Vec<(f64, f64)> = s.points.iter().map(|p| (log2(p.0), p.3)).collect();
                chart
                    .draw_series(DashedLineSeries::new(tail, 6, 4, color.stroke_width(2)))
                    .map_err(err)?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// A saved result as a sweep: a sweep JSON as is, or a single `bench serve --save-result` JSON
/// as a one-level sweep at its concurrency cap (or the most requests it saw in flight).
pub fn load_as_sweep(path: &Path) -> Result<SweepResult> {
    let text = std::fs::read_to_string(path).map_err(|e| BenchError::io(path, e))?;
    let value: serde_json::Value = serde_json::from_str(&text)?;
    if value.get("levels").is_some() {
        return Ok(serde_json::from_value(value)?);
    }
    let r: BenchResult = serde_json::from_value(value).map_err(|e| {
        BenchError::InvalidArgument(format!(
            "{}: neither a sweep nor a bench serve result: {e}",
            path.display()
        ))
    })?;
    let concurrency = r
        .max_concurrency
        .unwrap_or(r.metrics.max_concurrent_requests)
        .max(1);
    Ok(SweepResult {
        label: r.label.clone().unwrap_or_else(|| r.base_url.clone()),
        date: r.date.clone(),
        base_url: r.base_url.clone(),
        model: r.model.clone(),
        levels: vec![SweepLevel {
            concurrency,
            result: r,
        }],
    })
}

/// Draw several saved results (`bench plot`): `inputs` are sweep JSON files (or single-run
/// results), `labels` override their stored labels in order.
pub fn plot_files(inputs: &[std::path::PathBuf], labels: &[String], out: &Path) -> Result<()> {
    if inputs.is_empty() {
        return Err(BenchError::InvalidArgument(
            "give at least one --input sweep JSON".into(),
        ));
    }
    if labels.len() > inputs.len() {
        return Err(BenchError::InvalidArgument(
            "more --label than --input".into(),
        ));
    }
    let mut series = Vec::new();
    let mut models = Vec::new();
    for (i, p) in inputs.iter().enumerate() {
        let s = load_as_sweep(p)?;
        let label = labels.get(i).cloned().unwrap_or_else(|| s.label.clone());
        if !models.contains(&s.model) {
            models.push(s.model.clone());
        }
        series.push(PlotSeries::from_sweep(&label, &s));
    }
    plot_sweeps(&series, out, &models.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_svg_paths_are_refused() {
        let s = PlotSeries {
            label: "a".into(),
            points: vec![(1, 10.0, 5.0, 6.0)],
        };
        let path = std::env::temp_dir().join(format!("spindle-plot-{}.png", std::process::id()));
        let e = plot_sweeps(&[s], &path, "").unwrap_err();
        assert!(e.to_string().contains(".svg"), "{e}");
        assert!(!path.exists());
    }

    #[test]
    fn several_series_in_one_svg() {
        let a = PlotSeries {
            label: "alpha".into(),
            points: vec![
                (1, 100.0, 10.0, 12.0),
                (2, 150.0, 12.0, 20.0),
                (4, 260.0, 15.0, 30.0),
            ],
        };
        let b = PlotSeries {
            label: "beta".into(),
            points: vec![(1, 80.0, 12.0, 13.0), (4, 200.0, 18.0, 25.0)],
        };
        let path =
            std::env::temp_dir().join(format!("spindle-plot-test-{}.svg", std::process::id()));
        plot_sweeps(&[a, b], &path, "m").unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("alpha") && svg.contains("beta") && svg.contains("Output throughput"));
        assert!(plot_sweeps(&[], &path, "m").is_err());
    }

    #[test]
    fn files_of_both_kinds() {
        let dir = std::env::temp_dir().join(format!("spindle-plot-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sweep = crate::sweep::tests::fake_sweep();
        let sweep_path = dir.join("sweep.json");
        std::fs::write(&sweep_path, serde_json::to_string(&sweep).unwrap()).unwrap();
        let mut single = sweep.levels[1].result.clone();
        single.max_concurrency = Some(2);
        single.label = Some("single".into());
        let single_path = dir.join("single.json");
        single.save(&single_path).unwrap();

        let as_sweep = load_as_sweep(&single_path).unwrap();
        assert_eq!(
            (
                as_sweep.label.as_str(),
                as_sweep.levels.len(),
                as_sweep.levels[0].concurrency
            ),
            ("single", 1, 2)
        );
        assert_eq!(load_as_sweep(&sweep_path).unwrap(), sweep);

        let out = dir.join("both.svg");
        plot_files(&[sweep_path.clone(), single_path], &["A".into()], &out).unwrap();
        let svg = std::fs::read_to_string(&out).unwrap();
        assert!(
            svg.contains("\nA\n") && !svg.contains("\ntest\n"),
            "the --label replaces the stored one"
        );
        assert!(svg.contains("single"));
        let junk = dir.join("junk.json");
        std::fs::write(&junk, "{\"x\": 1}").unwrap();
        assert!(plot_files(&[junk], &[], &out).is_err());
        assert!(plot_files(&[sweep_path], &["a".into(), "b".into()], &out).is_err());
    }
}
