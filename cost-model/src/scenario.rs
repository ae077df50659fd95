//! Documented scenarios, and every run's assumptions in words.

use crate::inputs::Inputs;
use crate::pricing::{find_preset, presets, Pricing, SECONDS_PER_MONTH};
use crate::text::number;

/// A named set of inputs with the claim it tests.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    pub name: &'static str,
    pub claim: &'static str,
    pub inputs: Inputs,
}

/// The guide's example: "REST on scale-to-zero ≈ $20/month, gRPC with 2
/// always-on replicas ≈ $150/month, a 2–4× higher baseline".
///
/// Both run on Cloud Run request-based billing with 1 vCPU / 2 GiB instances.
/// The gRPC clients keep one watch stream open per replica, so the two
/// replicas are active (not idle) all month: 2 × 2,628,000 s × ($0.000024 +
/// 2 × $0.0000025) = $152.42 before the free tier. The REST traffic (2 req/s
/// of 200 ms) is what makes REST about $20.
pub fn guide() -> Scenario {
    let catalogue = presets();
    let cloud_run = find_preset(&catalogue, "cloud-run-request", "preset").unwrap_or_else(|e| panic!("{e}"));
    Scenario {
        name: "guide",
        claim: "REST on scale-to-zero ≈ $20/month vs gRPC with 2 always-on replicas ≈ $150/month, \"a 2–4× higher baseline\"",
        inputs: Inputs {
            rps: 2.0,
            profile: None,
            duration_ms: 200.0,
            concurrency: 80.0,
            vcpu: 1.0,
            gib: 2.0,
            grpc_min_replicas: 2.0,
            streams: 2.0,
            stream_lifetime_s: None,
            cold_start_s: 2.0,
            rest_pricing: cloud_run.clone(),
            grpc_pricing: cloud_run,
        },
    }
}

/// Every scenario by name.
pub fn scenarios() -> Vec<Scenario> {
    vec![guide()]
}

/// What `inputs` assume, one sentence each, for printing beside the figures.
pub fn assumptions(inputs: &Inputs) -> Vec<String> {
    let mut lines = vec![
        format!(
            "Traffic: {} req/s on average, {} requests per 730-hour month, {}.",
            number(inputs.rps),
            number(inputs.rps * SECONDS_PER_MONTH),
            match &inputs.profile {
                None => "flat over the day".to_owned(),
                Some(weights) => {
                    let sum: f64 = weights.iter().sum();
                    let peak = weights.iter().cloned().fold(0.0, f64::max) * weights.len() as f64 / sum;
                    format!("shaped by a 24-hour profile whose busiest hour is {}× the mean", number(peak))
                }
            }
        ),
        format!(
            "A request keeps an instance busy {} ms on average; one instance serves up to {} at once.",
            number(inputs.duration_ms),
            number(inputs.concurrency)
        ),
        format!("Each instance: {} vCPU, {} GiB.", number(inputs.vcpu), number(inputs.gib)),
        format!(
            "REST on {}, scaled to zero: an instance stays warm {} s after its last request; \
             a request that finds none waits a {} s cold start.",
            inputs.rest_pricing.name,
            number(inputs.rest_pricing.keep_warm_s),
            number(inputs.cold_start_s)
        ),
        format!(
            "gRPC on {}: {} replicas always on (long-lived HTTP/2 connections keep them up), \
             requests spread over them.",
            inputs.grpc_pricing.name,
            number(inputs.grpc_min_replicas)
        ),
    ];
    if inputs.streams > 0.0 {
        let cut = match inputs.grpc_pricing.request_timeout_s {
            Some(t) => format!("cut and reopened every {} s by the platform's request timeout", number(t)),
            None => "never cut by the platform".to_owned(),
        };
        let life = match inputs.stream_lifetime_s {
            Some(l) => format!("clients keep each open {} s", number(l)),
            None => "clients keep them open indefinitely".to_owned(),
        };
        lines.push(format!(
            "{} gRPC streams open on average, each keeping its instance active; {life}; {cut}.",
            number(inputs.streams)
        ));
    } else {
        lines.push("No long-lived gRPC streams.".to_owned());
    }
    let mut platforms: Vec<&Pricing> = vec![&inputs.rest_pricing];
    if inputs.grpc_pricing != inputs.rest_pricing {
        platforms.push(&inputs.grpc_pricing);
    }
    for p in platforms {
        lines.push(format!("Prices: {} ({}), as of {}: {}.", p.name, p.title, p.price_date, p.source));
    }
    lines.push("Each option gets the free tier to itself; a month is 730 hours.".to_owned());
    lines
}
