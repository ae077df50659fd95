//! What gRPC's always-on replicas cost against REST scaled to zero.
//!
//! A pure library (no I/O): [`Inputs`] describe a workload and the platforms
//! it could run on; [`evaluate`] prices a REST deployment that scales to zero
//! against a gRPC deployment that keeps `grpc_min_replicas` running, with a
//! breakdown per option, the ratio, the break-even traffic, and what scaling
//! to zero costs in cold starts; [`sweep`] and [`chart_svg`] show both totals
//! over a range of traffic. The CLI (`grpc-guard-cost`) and the browser page
//! (`web/`, through the `web` module on wasm32) only move data between the
//! user and these functions, so they cannot disagree.
//!
//! It is not a billing calculator: it prices compute, requests and a fixed
//! fee from list prices, not egress, load balancers, discounts or taxes.

mod answer;
mod chart;
mod inputs;
mod model;
mod occupancy;
mod pricing;
mod scenario;
mod sweep;
mod text;
mod validate;
#[cfg(target_arch = "wasm32")]
mod web;

pub use answer::{answer, Answer};
pub use chart::chart_svg;
pub use inputs::{rps_from_monthly, Inputs, DEFAULT_PRESET, MAX_DURATION_MS, MAX_RPS};
pub use model::{
    evaluate, grpc_cost, rest_cost, totals_at, Breakdown, ColdStarts, OptionCost, RatioPoint, Report, Traffic, Usage,
    RATIO_MARKS,
};
pub use pricing::{
    find_preset, parse_pricing, presets, Billing, ComputeUnit, Pricing, PricingFileError, SECONDS_PER_MONTH,
};
pub use scenario::{assumptions, guide, scenarios, Scenario};
pub use sweep::{sweep, to_csv, SweepPoint, SweepRange, DEFAULT_SWEEP_POINTS};
pub use text::{number, usd};
pub use validate::{InputError, Problem};
