//! Both totals over a range of traffic: the data behind the chart and `--csv`.

use serde::Serialize;

use crate::inputs::{Inputs, MAX_RPS};
use crate::model::{totals_at, Report};
use crate::pricing::SECONDS_PER_MONTH;
use crate::validate::{positive, InputError, Problem};

/// Log-spaced traffic levels, req/s.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SweepRange {
    pub from_rps: f64,
    pub to_rps: f64,
    pub points: usize,
}

/// How many points a sweep has unless told otherwise.
pub const DEFAULT_SWEEP_POINTS: usize = 61;

impl SweepRange {
    /// Two decades either side of the traffic, widened to show the break-even
    /// and where the ratio reaches the marks, with room around each.
    pub fn around(report: &Report) -> Self {
        let centre = if report.traffic.rps > 0.0 { report.traffic.rps } else { 1.0 };
        let (mut from, mut to) = (centre / 100.0, centre * 100.0);
        let marks = report.ratio_falls_to.iter().filter_map(|p| p.at);
        for at in report.break_even.into_iter().chain(marks).filter(|t| t.rps > 0.0) {
            from = from.min(at.rps / 4.0);
            to = to.max(at.rps * 4.0);
        }
        SweepRange { from_rps: from.max(1e-6), to_rps: to.min(MAX_RPS), points: DEFAULT_SWEEP_POINTS }
    }

    pub fn validate(&self) -> Result<(), InputError> {
        positive("sweep_from", self.from_rps)?;
        positive("sweep_to", self.to_rps)?;
        if self.to_rps <= self.from_rps {
            return Err(InputError::new("sweep_to", Problem::NotAbove { what: "sweep_from", floor: self.from_rps }));
        }
        if self.to_rps > MAX_RPS {
            return Err(InputError::new("sweep_to", Problem::TooLarge { max: MAX_RPS, got: self.to_rps }));
        }
        if !(2..=1000).contains(&self.points) {
            return Err(InputError::new(
                "sweep_points",
                Problem::OutOfRange { min: 2.0, max: 1000.0, got: self.points as f64 },
            ));
        }
        Ok(())
    }

    fn levels(&self) -> impl Iterator<Item = f64> + '_ {
        // In base 10, so that decades land exactly on 0.1, 1, 10.
        let (a, b) = (self.from_rps.log10(), self.to_rps.log10());
        let steps = (self.points - 1) as f64;
        (0..self.points).map(move |i| 10f64.powf(a + (b - a) * i as f64 / steps))
    }
}

/// Both totals at one traffic level.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SweepPoint {
    pub rps: f64,
    pub requests_per_month: f64,
    pub rest_total: f64,
    pub grpc_total: f64,
    /// gRPC / REST; `None` where REST costs nothing.
    pub ratio: Option<f64>,
}

/// Evaluates both options at each level of `range`, the rest of `inputs` unchanged.
pub fn sweep(inputs: &Inputs, range: &SweepRange) -> Result<Vec<SweepPoint>, InputError> {
    inputs.validate()?;
    range.validate()?;
    Ok(range
        .levels()
        .map(|rps| {
            let (rest_total, grpc_total) = totals_at(inputs, rps);
            SweepPoint {
                rps,
                requests_per_month: rps * SECONDS_PER_MONTH,
                rest_total,
                grpc_total,
                ratio: (rest_total > 0.0).then(|| grpc_total / rest_total),
            }
        })
        .collect())
}

/// The sweep as CSV with a header line; an empty ratio where REST is free.
pub fn to_csv(points: &[SweepPoint]) -> String {
    let mut csv = String::from("rps,requests_per_month,rest_total_usd,grpc_total_usd,ratio\n");
    for p in points {
        let ratio = p.ratio.map(|r| format!("{r:.4}")).unwrap_or_default();
        csv.push_str(&format!(
            "{},{:.0},{:.4},{:.4},{ratio}\n",
            p.rps, p.requests_per_month, p.rest_total, p.grpc_total
        ));
    }
    csv
}
