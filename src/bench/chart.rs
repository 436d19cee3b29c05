//! SVG charts of a run, drawn from the report's JSON: page latency vs tree depth (fanout) and
//! the latency CDF of each freshness channel. plotters is built with only its SVG backend, so
//! this needs no system fonts or image libraries.

use std::path::Path;

use plotters::prelude::*;
use serde_json::Value;

use super::Report;

const COLORS: [RGBColor; 4] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
];

fn err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Draws every chart the report has data for.
pub fn draw(report: &Report, dir: &Path) -> std::io::Result<()> {
    if let Some(tree) = report
        .get("fanout", "tree_closed")
        .and_then(Value::as_array)
    {
        let side = report
            .get("fanout", "sidecar_closed")
            .and_then(Value::as_array)
            .and_then(|a| a.first());
        fanout_chart(tree, side, &dir.join("fanout_latency_vs_depth.svg"))?;
    }
    if let Some(ch) = report
        .get("freshness", "channels")
        .and_then(Value::as_array)
    {
        freshness_chart(ch, &dir.join("freshness_cdf.svg"))?;
    }
    Ok(())
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(0.0)
}

fn fanout_chart(tree: &[Value], side: Option<&Value>, path: &Path) -> std::io::Result<()> {
    let depths: Vec<f64> = tree.iter().map(|v| f(v, "depth")).collect();
    let max_depth = depths.iter().cloned().fold(1.0, f64::max);
    let mut ys: Vec<f64> = tree
        .iter()
        .flat_map(|v| [f(v, "p50_us"), f(v, "p99_us")])
        .collect();
    if let Some(s) = side {
        ys.extend([f(s, "p50_us"), f(s, "p99_us")]);
    }
    let lo = ys
        .iter()
        .cloned()
        .filter(|y| *y > 0.0)
        .fold(f64::MAX, f64::min)
        .max(1.0)
        / 2.0;
    let hi = ys.iter().cloned().fold(1.0, f64::max) * 2.0;
    let root = SVGBackend::new(path, (760, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Product page latency: service tree vs sidecar (closed loop)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.8f64..max_depth + 0.2, (lo..hi).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("tree depth (fan-out per level as in bench.json)")
        .y_desc("latency (us, log)")
        .x_labels(max_depth as usize + 1)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(err)?;
    for (i, (key, label)) in [("p50_us", "tree p50"), ("p99_us", "tree p99")]
        .iter()
        .enumerate()
    {
        let pts: Vec<(f64, f64)> = tree.iter().map(|v| (f(v, "depth"), f(v, key))).collect();
        let c = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
            .map_err(err)?
            .label(*label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        chart
            .draw_series(pts.iter().map(|p| Circle::new(*p, 3, c.filled())))
            .map_err(err)?;
    }
    if let Some(s) = side {
        for (i, (key, label)) in [("p50_us", "sidecar p50"), ("p99_us", "sidecar p99")]
            .iter()
            .enumerate()
        {
            let y = f(s, key);
            let c = COLORS[(i + 2) % COLORS.len()];
            chart
                .draw_series(LineSeries::new(
                    vec![(1.0, y), (max_depth, y)],
                    c.stroke_width(2),
                ))
                .map_err(err)?
                .label(*label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                });
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

fn freshness_chart(channels: &[Value], path: &Path) -> std::io::Result<()> {
    let curves: Vec<(String, Vec<(f64, f64)>)> = channels
        .iter()
        .map(|c| {
            let name = c["channel"].as_str().unwrap_or("?").to_string();
            let pts = c["cdf"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|p| Some((p[0].as_f64()?.max(1.0), p[1].as_f64()?)))
                        .collect()
                })
                .unwrap_or_default();
            (name, pts)
        })
        .filter(|(_, p): &(String, Vec<(f64, f64)>)| !p.is_empty())
        .collect();
    if curves.is_empty() {
        return Ok(());
    }
    let xs = curves.iter().flat_map(|(_, p)| p.iter().map(|(x, _)| *x));
    let lo = xs.clone().fold(f64::MAX, f64::min).max(1.0) / 1.5;
    let hi = xs.fold(1.0, f64::max) * 1.5;
    let root = SVGBackend::new(path, (760, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Freshness: publish at origin -> visible (CDF)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((lo..hi).log_scale(), 0.0f64..1.0)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("latency (us, log)")
        .y_desc("share of changes")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(err)?;
    for (i, (name, pts)) in curves.into_iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts, c.stroke_width(2)))
            .map_err(err)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}
