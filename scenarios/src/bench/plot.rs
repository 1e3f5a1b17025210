//! Latency CDF plots of `capif bench` (docs/BENCHMARKS.md): floor and gateway of a case on one
//! chart, as SVG drawn with `plotters` from the HDR histograms of the run. A CDF shows what the
//! p50/p90 ratios summarise: where the gateway's curve leaves the floor's and how long its tail is.

use std::path::Path;

use anyhow::{Result, anyhow};
use hdrhistogram::Histogram;
use plotters::prelude::*;

/// One curve: its legend and the latencies (microseconds) it is drawn from.
pub struct Series<'a> {
    pub name: &'a str,
    pub hist: &'a Histogram<u64>,
}

/// The empirical CDF of `hist` as (latency in ms, fraction of operations at or below it),
/// one point per recorded value, cut at the 99.9th percentile so one stall does not flatten
/// the chart.
pub fn cdf_points(hist: &Histogram<u64>) -> Vec<(f64, f64)> {
    let total = hist.len();
    if total == 0 {
        return Vec::new();
    }
    let cut = hist.value_at_quantile(0.999);
    let mut seen = 0u64;
    let mut points = Vec::new();
    for v in hist.iter_recorded() {
        seen += v.count_since_last_iteration();
        let at = v.value_iterated_to();
        points.push((at as f64 / 1000.0, seen as f64 / total as f64));
        if at >= cut {
            break;
        }
    }
    points
}

/// The SVG of one chart: every series' CDF, latency (ms) on x, cumulative fraction on y.
pub fn render_cdf(title: &str, series: &[Series<'_>]) -> Result<String> {
    let curves: Vec<(&str, Vec<(f64, f64)>)> = series
        .iter()
        .map(|s| (s.name, cdf_points(s.hist)))
        .collect();
    let x_max = curves
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(x, _)| *x))
        .fold(0.0f64, f64::max)
        .max(0.001)
        * 1.05;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 480)).into_drawing_area();
        let e = |e: DrawingAreaErrorKind<_>| anyhow!("drawing the CDF plot: {e}");
        root.fill(&WHITE).map_err(e)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..x_max, 0.0..1.0)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc("latency (ms)")
            .y_desc("fraction of requests")
            .draw()
            .map_err(e)?;
        let colours = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
        for (i, (name, points)) in curves.into_iter().enumerate() {
            let colour = colours[i % colours.len()];
            chart
                .draw_series(LineSeries::new(points, colour.stroke_width(2)))
                .map_err(e)?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(e)?;
        root.present().map_err(e)?;
    }
    Ok(svg)
}

/// Writes `name` (an SVG) into each of `dirs`, creating them; returns the paths written.
pub fn write_svg(svg: &str, name: &str, dirs: &[&Path]) -> Result<Vec<String>> {
    let mut written = Vec::new();
    for dir in dirs {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow!("cannot create {}: {e}", dir.display()))?;
        let path = dir.join(name);
        std::fs::write(&path, svg).map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;
        written.push(path.display().to_string());
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(values: &[u64]) -> Histogram<u64> {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        for v in values {
            h.record(*v).unwrap();
        }
        h
    }

    #[test]
    fn cdf_rises_to_one_in_order() {
        let h = hist(&[1000, 1000, 2000, 3000]);
        let p = cdf_points(&h);
        assert_eq!(p.first().unwrap().1, 0.5);
        assert_eq!(p.last().unwrap().1, 1.0);
        assert!(p.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
        assert!((p[0].0 - 1.0).abs() < 0.01, "{p:?}");
        assert!(cdf_points(&hist(&[])).is_empty());
    }

    #[test]
    fn chart_is_an_svg_with_both_curves_named() {
        let (floor, gw) = (hist(&[900, 1000, 1100]), hist(&[1000, 1200, 1500]));
        let svg = render_cdf(
            "(a) cache hit",
            &[
                Series {
                    name: "floor: 1 bare hop",
                    hist: &floor,
                },
                Series {
                    name: "gateway-A, cache hit",
                    hist: &gw,
                },
            ],
        )
        .unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        for text in [
            "(a) cache hit",
            "floor: 1 bare hop",
            "gateway-A, cache hit",
            "latency (ms)",
        ] {
            assert!(svg.contains(text), "{text} missing");
        }
        // Each curve in its own colour (blue, then red), drawn and in the legend.
        for colour in ["#0000FF", "#FF0000"] {
            assert!(svg.matches(colour).count() >= 2, "{colour} missing");
        }
    }
}
