//! The monthly cost of each option, the ratio, and where the curves cross.
//!
//! Both options serve the same unary traffic on instances of the same size.
//! They differ in what keeps an instance billed:
//! - **REST, scaled to zero**: instances exist only while requests need them
//!   (plus the platform's keep-warm time); a request that finds none waits a
//!   cold start.
//! - **gRPC, `grpc_min_replicas` always on**: long-lived HTTP/2 connections
//!   and streams keep the floor up. Requests are spread over the floor; an
//!   open stream keeps its instance *active* (on request billing, at the
//!   active rate) for its whole life; the platform's request timeout cuts
//!   streams, and each reconnect is a billed request.
//!
//! Per instance and second, request billing charges the active rates while an
//! instance serves something and the idle rates for idle minimum instances;
//! instance billing charges every second an instance exists. The free tier is
//! applied to each option as if it had the billing account to itself, to the
//! active usage first.
//!
//! Approximations, chosen to keep the totals monotonic in traffic: keep-warm
//! time is modelled for the last instance before zero (what decides cold
//! starts and the idle bill of a service scaled to zero), not for the lag of
//! scaling down from k to k−1 instances; cold starts while scaling up above
//! one instance are not counted (both options pay them); cold starts cost
//! latency only, their start-up seconds are not billed.

use serde::Serialize;

use crate::inputs::{Inputs, MAX_RPS};
use crate::occupancy::{floor_busy, instances_above};
use crate::pricing::{Billing, Pricing, SECONDS_PER_MONTH};
use crate::validate::InputError;

/// One option's monthly bill, USD.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Breakdown {
    pub compute_active: f64,
    pub compute_idle: f64,
    pub requests: f64,
    pub fixed: f64,
    /// Zero or negative: what the free tier takes off.
    pub free_tier: f64,
    pub total: f64,
}

/// What the bill is made of.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Usage {
    pub active_instance_hours: f64,
    pub idle_instance_hours: f64,
    pub requests: f64,
}

/// What scaling to zero costs in latency rather than money.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ColdStarts {
    pub per_month: f64,
    /// Share of requests that wait for a cold start (its limit, 1, at zero traffic).
    pub request_share: f64,
    /// Cold-start wait averaged over all requests, milliseconds.
    pub mean_added_latency_ms: f64,
}

/// One way of running the service.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OptionCost {
    /// `pricing.name` of the platform.
    pub platform: String,
    pub min_replicas: f64,
    pub breakdown: Breakdown,
    pub usage: Usage,
    pub cold_starts: ColdStarts,
    /// Streams the platform's request timeout cuts, per month; each reconnects.
    pub forced_reconnects_per_month: f64,
}

/// A traffic level, in both units users quote.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Traffic {
    pub rps: f64,
    pub requests_per_month: f64,
}

impl Traffic {
    pub fn from_rps(rps: f64) -> Self {
        Traffic { rps, requests_per_month: rps * SECONDS_PER_MONTH }
    }
}

/// Where the gRPC/REST ratio first falls to `ratio`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RatioPoint {
    pub ratio: f64,
    /// `None`: not at any traffic up to [`MAX_RPS`].
    pub at: Option<Traffic>,
}

/// The model's answer for one set of inputs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub traffic: Traffic,
    pub rest: OptionCost,
    pub grpc: OptionCost,
    /// gRPC total / REST total; `None` when REST costs nothing.
    pub ratio: Option<f64>,
    /// The traffic where the two totals meet; `None`: they do not, up to [`MAX_RPS`].
    pub break_even: Option<Traffic>,
    /// Where the ratio falls to each of [`RATIO_MARKS`].
    pub ratio_falls_to: Vec<RatioPoint>,
}

/// The ratios a report locates: the guide's "2–4×".
pub const RATIO_MARKS: [f64; 2] = [4.0, 2.0];

/// Validates `inputs` and computes both options, the ratio and the crossings.
pub fn evaluate(inputs: &Inputs) -> Result<Report, InputError> {
    inputs.validate()?;
    let rest = rest_cost(inputs, inputs.rps);
    let grpc = grpc_cost(inputs, inputs.rps);
    let ratio = ratio(grpc.breakdown.total, rest.breakdown.total);
    let break_even = break_even(inputs).map(Traffic::from_rps);
    let ratio_falls_to = RATIO_MARKS
        .iter()
        .map(|&mark| RatioPoint { ratio: mark, at: ratio_falls_to(inputs, mark).map(Traffic::from_rps) })
        .collect();
    Ok(Report { traffic: Traffic::from_rps(inputs.rps), rest, grpc, ratio, break_even, ratio_falls_to })
}

fn ratio(grpc: f64, rest: f64) -> Option<f64> {
    (rest > 0.0).then(|| grpc / rest)
}

/// REST at `rps` (the profile's shape kept), scaled to zero.
pub fn rest_cost(inputs: &Inputs, rps: f64) -> OptionCost {
    option_cost(inputs, rps, &inputs.rest_pricing, 0.0, 0.0)
}

/// gRPC at `rps`, with its floor of replicas and its open streams.
pub fn grpc_cost(inputs: &Inputs, rps: f64) -> OptionCost {
    option_cost(inputs, rps, &inputs.grpc_pricing, inputs.grpc_min_replicas, inputs.streams)
}

/// (rate, seconds) for each part of the month with its own request rate.
fn slices(inputs: &Inputs, rps: f64) -> Vec<(f64, f64)> {
    match &inputs.profile {
        None => vec![(rps, SECONDS_PER_MONTH)],
        Some(weights) => {
            let sum: f64 = weights.iter().sum();
            weights.iter().map(|w| (rps * weights.len() as f64 * w / sum, SECONDS_PER_MONTH / 24.0)).collect()
        }
    }
}

fn option_cost(inputs: &Inputs, rps: f64, pricing: &Pricing, floor: f64, streams: f64) -> OptionCost {
    let duration_s = inputs.duration_ms / 1000.0;
    let c = inputs.concurrency;
    let mut active_s = 0.0;
    let mut idle_s = 0.0;
    let mut unary = 0.0;
    let mut cold = 0.0;
    for (rate, seconds) in slices(inputs, rps) {
        let in_flight = rate * duration_s;
        let busy_floor = floor_busy(in_flight, streams, floor);
        let busy_above = instances_above(in_flight, streams, c, floor);
        // Scaled to zero, the last instance lives on `keep_warm_s` after its
        // last request: idle, and billed as such by an instance bill. Nothing
        // runs when no request arrived in the last d + keep-warm seconds.
        let (warm, nothing_running) = if floor == 0.0 && streams == 0.0 {
            let nothing = (-rate * (duration_s + pricing.keep_warm_s)).exp();
            ((-in_flight).exp() - nothing, nothing)
        } else {
            (0.0, 0.0)
        };
        let warm_above = match pricing.billing {
            Billing::Request => 0.0,
            Billing::Instance => warm,
        };
        active_s += (busy_floor + busy_above) * seconds;
        idle_s += (floor - busy_floor + warm_above) * seconds;
        unary += rate * seconds;
        // Poisson arrivals see time averages: this share of them waits a cold start.
        cold += rate * seconds * nothing_running;
    }

    let (stream_requests, forced_reconnects) = stream_requests(streams, inputs.stream_lifetime_s, pricing);
    let requests = unary + stream_requests;
    let u = pricing.unit_prices();
    let (vcpu_active, gib_active) = (active_s * inputs.vcpu, active_s * inputs.gib);
    let (vcpu_idle, gib_idle) = (idle_s * inputs.vcpu, idle_s * inputs.gib);
    let compute_active = vcpu_active * u.vcpu_s + gib_active * u.gib_s;
    let compute_idle = vcpu_idle * u.idle_vcpu_s + gib_idle * u.idle_gib_s;
    let request_cost = requests * u.per_request;
    let free = credit(pricing.free_vcpu_seconds, (vcpu_active, u.vcpu_s), (vcpu_idle, u.idle_vcpu_s))
        + credit(pricing.free_gib_seconds, (gib_active, u.gib_s), (gib_idle, u.idle_gib_s))
        + pricing.free_requests.min(requests) * u.per_request;
    let total = compute_active + compute_idle + request_cost + pricing.monthly_fixed - free;

    // At zero traffic, the limit: the first request will find nothing running.
    let request_share = if unary > 0.0 {
        cold / unary
    } else if floor == 0.0 && streams == 0.0 {
        1.0
    } else {
        0.0
    };
    OptionCost {
        platform: pricing.name.clone(),
        min_replicas: floor,
        breakdown: Breakdown {
            compute_active,
            compute_idle,
            requests: request_cost,
            fixed: pricing.monthly_fixed,
            free_tier: -free,
            total,
        },
        usage: Usage { active_instance_hours: active_s / 3600.0, idle_instance_hours: idle_s / 3600.0, requests },
        cold_starts: ColdStarts {
            per_month: cold,
            request_share,
            mean_added_latency_ms: request_share * inputs.cold_start_s * 1000.0,
        },
        forced_reconnects_per_month: forced_reconnects,
    }
}

/// What `free` units are worth against (amount, price) used active, then idle.
fn credit(free: f64, (active, active_price): (f64, f64), (idle, idle_price): (f64, f64)) -> f64 {
    let on_active = free.min(active);
    on_active * active_price + (free - on_active).min(idle) * idle_price
}

/// Billed requests the open streams make per month, and how many of them are
/// reconnects forced by the platform's request timeout (Little's law: `streams`
/// open on average, each living `min(lifetime, timeout)`).
fn stream_requests(streams: f64, lifetime: Option<f64>, pricing: &Pricing) -> (f64, f64) {
    let lifetime = lifetime.unwrap_or(f64::INFINITY);
    let timeout = pricing.request_timeout_s.unwrap_or(f64::INFINITY);
    let held = lifetime.min(timeout);
    if streams == 0.0 || held.is_infinite() {
        return (0.0, 0.0);
    }
    let opened = streams * SECONDS_PER_MONTH / held;
    let chosen = if lifetime.is_finite() { streams * SECONDS_PER_MONTH / lifetime } else { 0.0 };
    (opened, opened - chosen)
}

/// Both totals at `rps`, the rest of `inputs` unchanged.
pub fn totals_at(inputs: &Inputs, rps: f64) -> (f64, f64) {
    (rest_cost(inputs, rps).breakdown.total, grpc_cost(inputs, rps).breakdown.total)
}

/// The grid a crossing is first looked for on: 0, then 4 points per decade
/// from 1e-4 req/s to [`MAX_RPS`].
fn search_grid() -> impl Iterator<Item = f64> {
    std::iter::once(0.0).chain((-16..=24).map(|k| 10f64.powf(f64::from(k) / 4.0).min(MAX_RPS)))
}

/// The lowest traffic (req/s) at which `reached` holds, to 1e-12 relative:
/// the first grid point where it does, narrowed by bisection from the one
/// before. Assumes `reached` is continuous between grid points.
fn first_traffic_where(reached: impl Fn(f64) -> bool) -> Option<f64> {
    let mut below = None;
    for x in search_grid() {
        if reached(x) {
            let Some(mut lo) = below else { return Some(x) };
            let mut hi = x;
            while hi - lo > 1e-12 * hi {
                let mid = 0.5 * (lo + hi);
                if reached(mid) {
                    hi = mid;
                } else {
                    lo = mid;
                }
            }
            return Some(hi);
        }
        below = Some(x);
    }
    None
}

/// Where the totals meet: the first traffic at which the cheaper option at
/// zero traffic stops being cheaper.
fn break_even(inputs: &Inputs) -> Option<f64> {
    let gap = |rps| {
        let (rest, grpc) = totals_at(inputs, rps);
        grpc - rest
    };
    // The sign at the lowest traffic where they differ at all.
    let start = search_grid().map(gap).find(|g| *g != 0.0)?.signum();
    first_traffic_where(|rps| rps > 0.0 && gap(rps) * start <= 0.0)
}

/// Where gRPC's total first falls to `mark` × REST's.
fn ratio_falls_to(inputs: &Inputs, mark: f64) -> Option<f64> {
    first_traffic_where(|rps| {
        let (rest, grpc) = totals_at(inputs, rps);
        grpc <= mark * rest
    })
}
