//! The plot of a `drift sim` run: over the simulated day, active hosts, power and overloaded
//! hosts, one line per policy, as an SVG file (plotters' SVG backend: the text is left to the
//! viewer's fonts, so no font file is needed).

use std::path::Path;

use anyhow::{anyhow, bail};
use drift_protocol::dcsim::Report;
use plotters::prelude::*;

/// One colour per policy, in turn.
const COLOURS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// A panel: its title, its axis name and the value of a step.
type Panel = (
    &'static str,
    &'static str,
    fn(&drift_protocol::dcsim::StepSample) -> f64,
);

/// Draws the reports' series into `path` (it must end in `.svg`).
pub fn plot(path: &Path, title: &str, reports: &[Report]) -> anyhow::Result<()> {
    if path.extension().and_then(|e| e.to_str()) != Some("svg") {
        bail!("--plot writes SVG: name a file ending in .svg, not {path:?}");
    }
    let panels: [Panel; 3] = [
        ("active hosts", "hosts", |s| s.active_hosts as f64),
        ("power", "kW", |s| s.power_w / 1e3),
        ("overloaded hosts", "hosts", |s| s.overloaded_hosts as f64),
    ];
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {path:?}: {e}");
    let root = SVGBackend::new(path, (1000, 1100)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(title, ("sans-serif", 22))
        .map_err(|e| err(&e))?;
    for (area, (name, unit, value)) in root.split_evenly((3, 1)).iter().zip(panels) {
        let hours = reports
            .iter()
            .flat_map(|r| r.series.last())
            .map(|s| s.time_s / 3600.0)
            .fold(1.0, f64::max);
        let top = reports
            .iter()
            .flat_map(|r| r.series.iter().map(value))
            .fold(1.0, f64::max)
            * 1.05;
        let mut chart = ChartBuilder::on(area)
            .caption(name, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..hours, 0.0..top)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("hour of the day")
            .y_desc(unit)
            .draw()
            .map_err(|e| err(&e))?;
        for (i, r) in reports.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let points = r.series.iter().map(|s| (s.time_s / 3600.0, value(s)));
            chart
                .draw_series(LineSeries::new(points, colour.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(r.policy.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use drift_protocol::dcsim::{run, Policy, Scenario, Trace};

    #[test]
    fn a_plot_names_every_policy_and_refuses_other_formats() {
        let traces: Vec<Trace> = (0..12)
            .map(|i| {
                Trace::from_fractions(
                    &format!("vm{i}"),
                    (0..24).map(|k| ((i * 7 + k * 3) % 10) as f64 / 10.0),
                )
            })
            .collect();
        let scenario = Scenario::paper(6);
        let reports: Vec<Report> = [Policy::Thr { threshold: 0.8 }, Policy::Lr { safety: 1.2 }]
            .into_iter()
            .map(|p| run(&scenario, &traces, p, &mut |_, _| {}))
            .collect();
        let dir = std::env::temp_dir().join(format!("drift-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let svg = dir.join("day.svg");
        plot(&svg, "test day", &reports).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.starts_with("<svg"), "{}", &text[..40.min(text.len())]);
        for r in &reports {
            assert!(text.contains(&r.policy), "{} missing", r.policy);
        }
        assert!(text.contains("overloaded hosts") && text.contains("<polyline"));
        assert!(plot(&dir.join("day.png"), "x", &reports).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
