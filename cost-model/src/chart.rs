//! The sweep drawn as an SVG line chart: monthly totals against traffic on a
//! log axis, with the user's traffic, the break-even and the ratio marks.

use std::fmt::Write;

use crate::inputs::Inputs;
use crate::model::{totals_at, Report};
use crate::sweep::SweepPoint;

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 420.0;
const LEFT: f64 = 78.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 44.0;
const BOTTOM: f64 = 58.0;
const REST_COLOUR: &str = "#2563eb";
const GRPC_COLOUR: &str = "#ea580c";

/// Renders the chart; empty sweeps give an empty chart with its axes.
pub fn chart_svg(inputs: &Inputs, points: &[SweepPoint], report: &Report) -> String {
    let (x_min, x_max) = match (points.first(), points.last()) {
        (Some(first), Some(last)) if last.rps > first.rps => (first.rps.log10(), last.rps.log10()),
        _ => (-1.0, 1.0),
    };
    let y_top = points.iter().map(|p| p.rest_total.max(p.grpc_total)).fold(0.0, f64::max);
    let (step, y_max) = nice_axis(y_top);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |rps: f64| LEFT + (rps.log10() - x_min) / (x_max - x_min) * plot_w;
    let y = |usd: f64| TOP + plot_h - usd.max(0.0) / y_max * plot_h;
    let in_range = |rps: f64| rps > 0.0 && (x_min..=x_max).contains(&rps.log10());

    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12" role="img" aria-label="Monthly cost against traffic">"#
    );
    let _ = write!(svg, r##"<rect width="{WIDTH}" height="{HEIGHT}" fill="#fff"/>"##);
    let _ = write!(
        svg,
        r#"<text x="{LEFT}" y="20" font-size="14" font-weight="bold">Monthly cost (USD) against traffic</text>"#
    );

    // Grid and y labels.
    let mut tick = 0.0;
    while tick <= y_max + step / 2.0 {
        let ty = y(tick);
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" y1="{ty:.1}" x2="{:.1}" y2="{ty:.1}" stroke="#e5e7eb"/><text x="{:.1}" y="{:.1}" text-anchor="end">${}</text>"##,
            WIDTH - RIGHT,
            LEFT - 6.0,
            ty + 4.0,
            axis_number(tick)
        );
        tick += step;
    }
    // Decades on the x axis.
    for decade in (x_min.ceil() as i32)..=(x_max.floor() as i32) {
        let rps = 10f64.powi(decade);
        let tx = x(rps);
        let _ = write!(
            svg,
            r##"<line x1="{tx:.1}" y1="{TOP}" x2="{tx:.1}" y2="{:.1}" stroke="#e5e7eb"/><text x="{tx:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            TOP + plot_h,
            TOP + plot_h + 18.0,
            axis_number(rps)
        );
    }
    let _ = write!(
        svg,
        r##"<line x1="{LEFT}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#374151"/><text x="{:.1}" y="{:.1}" text-anchor="middle">requests per second (log scale)</text>"##,
        TOP + plot_h,
        WIDTH - RIGHT,
        TOP + plot_h,
        LEFT + plot_w / 2.0,
        HEIGHT - 14.0
    );

    // The ratio marks and the user's traffic, under the curves.
    for mark in report.ratio_falls_to.iter() {
        if let Some(at) = mark.at.filter(|at| in_range(at.rps)) {
            let tx = x(at.rps);
            let _ = write!(
                svg,
                r##"<line x1="{tx:.1}" y1="{TOP}" x2="{tx:.1}" y2="{:.1}" stroke="#9ca3af" stroke-dasharray="2 3"/><text x="{:.1}" y="{:.1}" fill="#6b7280">{}×</text>"##,
                TOP + plot_h,
                tx + 3.0,
                TOP + 12.0,
                mark.ratio
            );
        }
    }
    if in_range(report.traffic.rps) {
        let tx = x(report.traffic.rps);
        let _ = write!(
            svg,
            r##"<line x1="{tx:.1}" y1="{TOP}" x2="{tx:.1}" y2="{:.1}" stroke="#111827" stroke-dasharray="6 4"/><text x="{tx:.1}" y="{:.1}" text-anchor="middle" fill="#111827">your traffic</text>"##,
            TOP + plot_h,
            TOP - 6.0
        );
    }

    for (colour, total) in
        [(REST_COLOUR, (|p: &SweepPoint| p.rest_total) as fn(&SweepPoint) -> f64), (GRPC_COLOUR, |p| p.grpc_total)]
    {
        let path: Vec<String> = points.iter().map(|p| format!("{:.1},{:.1}", x(p.rps), y(total(p)))).collect();
        let _ =
            write!(svg, r#"<polyline fill="none" stroke="{colour}" stroke-width="2.5" points="{}"/>"#, path.join(" "));
    }

    if let Some(at) = report.break_even.filter(|at| in_range(at.rps)) {
        let (rest, _) = totals_at(inputs, at.rps);
        let (bx, by) = (x(at.rps), y(rest));
        let _ = write!(
            svg,
            r##"<circle cx="{bx:.1}" cy="{by:.1}" r="5" fill="#111827"/><text x="{:.1}" y="{:.1}" fill="#111827">break-even {} req/s</text>"##,
            bx + 8.0,
            by - 8.0,
            axis_number(at.rps)
        );
    }

    // Legend.
    let legend = [
        (REST_COLOUR, format!("REST, scaled to zero ({})", report.rest.platform)),
        (GRPC_COLOUR, format!("gRPC, {} always on ({})", report.grpc.min_replicas, report.grpc.platform)),
    ];
    for (i, (colour, label)) in legend.iter().enumerate() {
        let ly = TOP + 14.0 + 18.0 * i as f64;
        let _ = write!(
            svg,
            r#"<line x1="{:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            LEFT + 12.0,
            LEFT + 36.0,
            LEFT + 42.0,
            ly + 4.0,
            escape(label)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// A step of 1, 2 or 5 × 10ⁿ giving about five gridlines, and the axis top.
fn nice_axis(top: f64) -> (f64, f64) {
    if top <= 0.0 {
        return (1.0, 5.0);
    }
    let raw = top / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * magnitude).find(|s| *s >= raw).unwrap_or(10.0 * magnitude);
    (step, (top / step).ceil() * step)
}

/// 0.001, 0.5, 20, 1.5k, 10M: short labels for axes.
fn axis_number(v: f64) -> String {
    let trim = |s: String| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            s
        }
    };
    match v.abs() {
        a if a >= 1e6 => format!("{}M", trim(format!("{:.1}", v / 1e6))),
        a if a >= 1e3 => format!("{}k", trim(format!("{:.1}", v / 1e3))),
        a if a >= 1.0 || a == 0.0 => trim(format!("{v:.1}")),
        _ => trim(format!("{v:.4}")),
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_steps_are_one_two_or_five_times_a_power_of_ten() {
        assert_eq!(nice_axis(148.0), (50.0, 150.0));
        assert_eq!(nice_axis(9.0), (2.0, 10.0));
        assert_eq!(nice_axis(0.0), (1.0, 5.0));
    }

    #[test]
    fn axis_labels_are_short() {
        assert_eq!(axis_number(0.01), "0.01");
        assert_eq!(axis_number(1000.0), "1k");
        assert_eq!(axis_number(1.5e6), "1.5M");
        assert_eq!(axis_number(150.0), "150");
    }
}
