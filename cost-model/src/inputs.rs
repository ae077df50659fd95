//! What the user tells the model, its defaults, and its validation.

use serde::{Deserialize, Serialize};

use crate::pricing::{find_preset, presets, Pricing, SECONDS_PER_MONTH};
use crate::validate::{at_most, finite, non_negative, positive, whole_at_least, InputError, Problem};

/// Upper bounds that keep one evaluation cheap and catch unit mistakes
/// (milliseconds typed as seconds): far above any service this models.
pub const MAX_RPS: f64 = 1e6;
pub const MAX_DURATION_MS: f64 = 3_600_000.0;

/// A workload and the two ways of running it.
///
/// Every number is a plain `f64` so the CLI and the browser page hand the
/// library whatever the user typed, and one validation speaks for both.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inputs {
    /// Mean request rate, requests per second, over the month.
    pub rps: f64,
    /// Optional 24 relative weights, hour 0 first: how the month's traffic
    /// spreads over the day. Absent: flat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<Vec<f64>>,
    /// Mean time one unary request keeps an instance busy, milliseconds.
    pub duration_ms: f64,
    /// Requests (or streams) one instance serves at once.
    pub concurrency: f64,
    /// vCPUs per instance.
    pub vcpu: f64,
    /// GiB of memory per instance.
    pub gib: f64,
    /// Instances the gRPC option keeps running whatever the traffic.
    pub grpc_min_replicas: f64,
    /// Mean number of long-lived gRPC streams open at any time (watch,
    /// subscriptions, bidirectional sessions). Each holds a concurrency slot
    /// and keeps its instance active for its whole life.
    pub streams: f64,
    /// How long a client keeps one stream open, seconds. Absent: until the
    /// platform's request timeout cuts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_lifetime_s: Option<f64>,
    /// Seconds a request waits when it finds the REST option scaled to zero.
    pub cold_start_s: f64,
    /// Where the REST service runs, scaled to zero when idle.
    pub rest_pricing: Pricing,
    /// Where the gRPC service runs, with `grpc_min_replicas` always on.
    pub grpc_pricing: Pricing,
}

impl Default for Inputs {
    fn default() -> Self {
        let catalogue = presets();
        let pricing = |name| find_preset(&catalogue, name, "preset").unwrap_or_else(|e| panic!("{e}"));
        Inputs {
            rps: 1.0,
            profile: None,
            duration_ms: 100.0,
            concurrency: 80.0,
            vcpu: 1.0,
            gib: 0.5,
            grpc_min_replicas: 2.0,
            streams: 0.0,
            stream_lifetime_s: None,
            cold_start_s: 2.0,
            rest_pricing: pricing(DEFAULT_PRESET),
            grpc_pricing: pricing(DEFAULT_PRESET),
        }
    }
}

/// The preset both options use unless told otherwise.
pub const DEFAULT_PRESET: &str = "cloud-run-request";

/// Requests per second from requests per 730-hour month; errors name
/// `requests_per_month`.
pub fn rps_from_monthly(requests_per_month: f64) -> Result<f64, InputError> {
    const FIELD: &str = "requests_per_month";
    let monthly = non_negative(FIELD, requests_per_month)?;
    at_most(FIELD, monthly, MAX_RPS * SECONDS_PER_MONTH)?;
    Ok(monthly / SECONDS_PER_MONTH)
}

impl Inputs {
    /// Checks every field; the first problem found is returned, named.
    pub fn validate(&self) -> Result<(), InputError> {
        at_most("rps", non_negative("rps", self.rps)?, MAX_RPS)?;
        if let Some(profile) = &self.profile {
            if profile.len() != 24 {
                return Err(InputError::new("profile", Problem::ProfileLength(profile.len())));
            }
            for (hour, weight) in profile.iter().enumerate() {
                non_negative(&format!("profile[{hour}]"), *weight)?;
            }
            if profile.iter().all(|w| *w == 0.0) {
                return Err(InputError::new("profile", Problem::ProfileAllZero));
            }
        }
        at_most("duration_ms", positive("duration_ms", self.duration_ms)?, MAX_DURATION_MS)?;
        whole_at_least("concurrency", self.concurrency, 1)?;
        at_most("concurrency", self.concurrency, 1_000_000.0)?;
        positive("vcpu", self.vcpu)?;
        positive("gib", self.gib)?;
        let replicas = finite("grpc_min_replicas", self.grpc_min_replicas)?;
        if replicas < 1.0 {
            return Err(InputError::new("grpc_min_replicas", Problem::GrpcToZero(replicas)));
        }
        whole_at_least("grpc_min_replicas", replicas, 1)?;
        at_most("grpc_min_replicas", replicas, 10_000.0)?;
        at_most("streams", non_negative("streams", self.streams)?, 1e7)?;
        if let Some(lifetime) = self.stream_lifetime_s {
            positive("stream_lifetime_s", lifetime)?;
        }
        non_negative("cold_start_s", self.cold_start_s)?;
        self.rest_pricing.validate("rest_pricing")?;
        self.grpc_pricing.validate("grpc_pricing")?;
        Ok(())
    }
}
