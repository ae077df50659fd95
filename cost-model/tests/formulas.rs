//! The cost formulas through the library's public API: hand-computed examples
//! per preset, the guide's scenario, properties over random inputs, and
//! validation that names the field.

use grpc_guard_cost_model::{
    evaluate, find_preset, grpc_cost, guide, parse_pricing, presets, rest_cost, rps_from_monthly, sweep, totals_at,
    Inputs, Pricing, PricingFileError, Problem, SweepRange, MAX_RPS, SECONDS_PER_MONTH,
};
use proptest::prelude::*;

fn preset(name: &str) -> Pricing {
    find_preset(&presets(), name, "preset").unwrap()
}

fn on(name: &str) -> Inputs {
    Inputs { rest_pricing: preset(name), grpc_pricing: preset(name), ..Inputs::default() }
}

fn assert_cents(actual: f64, expected: f64, what: &str) {
    assert!((actual - expected).abs() < 0.005, "{what}: {actual} != {expected}");
}

// --- One hand-computed example per preset. Month = 730 h = 2,628,000 s.

#[test]
fn cloud_run_request_bills_rest_for_busy_time_and_requests_less_the_free_tier() {
    // 10 req/s of 100 ms, one request per instance: on average exactly
    // 10 × 0.1 = 1 instance busy, all month.
    let inputs =
        Inputs { rps: 10.0, duration_ms: 100.0, concurrency: 1.0, vcpu: 1.0, gib: 0.5, ..on("cloud-run-request") };
    let rest = rest_cost(&inputs, inputs.rps).breakdown;
    assert_cents(rest.compute_active, 2_628_000.0 * 0.000024 + 1_314_000.0 * 0.0000025, "compute"); // 63.072 + 3.285
    assert_cents(rest.compute_idle, 0.0, "idle");
    assert_cents(rest.requests, 26.28 * 0.40, "requests"); // 26.28 M requests
    assert_cents(rest.free_tier, -(180_000.0 * 0.000024 + 360_000.0 * 0.0000025 + 2.0 * 0.40), "free"); // -6.02
    assert_cents(rest.total, 70.849, "total");
}

#[test]
fn cloud_run_instance_bills_two_replicas_held_active_by_streams() {
    // No requests; two streams keep both replicas up. Instance billing:
    // 2 × 2,628,000 s × (1 vCPU × $0.000018 + 0.5 GiB × $0.000002) = $99.864,
    // less 240,000 vCPU-s × $0.000018 + 450,000 GiB-s × $0.000002 = $5.22.
    let inputs = Inputs { rps: 0.0, streams: 2.0, vcpu: 1.0, gib: 0.5, ..on("cloud-run-instance") };
    let grpc = grpc_cost(&inputs, 0.0);
    assert_cents(grpc.breakdown.compute_active, 99.864, "compute");
    assert_cents(grpc.breakdown.total, 94.644, "total");
    // Each stream is cut by the 60-minute timeout: 2 × 730 reconnects.
    assert!((grpc.forced_reconnects_per_month - 1460.0).abs() < 1e-6);
    assert!((grpc.usage.requests - 1460.0).abs() < 1e-6);
}

#[test]
fn fargate_bills_idle_replicas_at_the_full_hourly_rate() {
    // 2 tasks × 730 h × (1 vCPU × $0.04048 + 0.5 GB × $0.004445) = $62.34565.
    let inputs = Inputs { rps: 0.0, vcpu: 1.0, gib: 0.5, ..on("fargate") };
    let grpc = grpc_cost(&inputs, 0.0).breakdown;
    assert_cents(grpc.compute_idle, 62.34565, "idle");
    assert_cents(grpc.total, 62.34565, "total");
}

#[test]
fn fargate_arm_runs_one_task_per_request_in_flight_under_heavy_traffic() {
    // 1000 req/s × 0.1 s = 100 in flight, one per task: 100 tasks all month
    // (the keep-warm tail at this traffic is e^-100, nothing).
    // 100 × 730 h × (1 × $0.03238 + 0.5 × $0.00356) = $2,493.68.
    let inputs = Inputs { rps: 1000.0, duration_ms: 100.0, concurrency: 1.0, vcpu: 1.0, gib: 0.5, ..on("fargate-arm") };
    let rest = rest_cost(&inputs, inputs.rps).breakdown;
    assert_cents(rest.total, 2493.68, "total");
    assert_cents(rest.requests, 0.0, "no request fee");
}

#[test]
fn gke_autopilot_bills_three_idle_pods_for_their_requests() {
    // 3 pods × 730 h × (1 vCPU × $0.0445 + 2 GiB × $0.0049225) = $119.01555.
    let inputs = Inputs { rps: 0.0, grpc_min_replicas: 3.0, vcpu: 1.0, gib: 2.0, ..on("gke-autopilot") };
    assert_cents(grpc_cost(&inputs, 0.0).breakdown.total, 119.01555, "total");
}

#[test]
fn every_preset_names_its_source_and_price_date() {
    let all = presets();
    let names: Vec<&str> = all.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["cloud-run-request", "cloud-run-instance", "fargate", "fargate-arm", "gke-autopilot"]);
    for p in &all {
        assert!(p.source.contains("https://"), "{}: {}", p.name, p.source);
        assert!(p.price_date.starts_with("20"), "{}: {}", p.name, p.price_date);
    }
}

// --- The guide's example.

#[test]
fn the_guide_scenario_reproduces_twenty_against_a_hundred_and_fifty_dollars() {
    let scenario = guide();
    let report = evaluate(&scenario.inputs).unwrap();
    // gRPC: both replicas active all month (a stream each):
    // 2 × 2,628,000 × ($0.000024 + 2 × $0.0000025) = $152.424, less $5.22 of
    // free compute; plus the requests (5,256,000 + 1,460 reconnects) × $0.40/M
    // less 2 M free.
    let requests = 2.0 * SECONDS_PER_MONTH + 1460.0;
    let expected_grpc = 152.424 - 5.22 + (requests - 2e6) * 0.4e-6;
    assert_cents(report.grpc.breakdown.total, expected_grpc, "gRPC");
    assert!((report.rest.breakdown.total - 20.0).abs() < 2.0, "REST ≈ $20: {}", report.rest.breakdown.total);
    let ratio = report.ratio.unwrap();
    assert!(ratio > 6.5 && ratio < 8.0, "the true ratio is ~7×, not 2–4×: {ratio}");
    // No cold starts at 2 req/s with 15 minutes of keep-warm; none ever for gRPC.
    assert!(report.rest.cold_starts.request_share < 1e-9);
    assert_eq!(report.grpc.cold_starts.per_month, 0.0);
    // The ratio reaches 4× and then 2× as traffic grows.
    let four = report.ratio_falls_to[0].at.unwrap().rps;
    let two = report.ratio_falls_to[1].at.unwrap().rps;
    assert!(2.0 < four && four < two, "4× at {four}, 2× at {two}");
}

// --- Properties.

fn any_preset() -> impl Strategy<Value = Pricing> {
    prop::sample::select(presets())
}

prop_compose! {
    fn any_inputs()(
        rps in prop_oneof![Just(0.0), 1e-4..10.0f64, 10.0..5000.0f64],
        profile in prop::option::of(prop::collection::vec(0.0..5.0f64, 24)),
        duration_ms in 1.0..5000.0f64,
        concurrency in 1u32..200,
        vcpu in 0.25..8.0f64,
        gib in 0.25..16.0f64,
        replicas in 1u32..6,
        streams in prop_oneof![Just(0.0), 0.0..50.0f64],
        lifetime in prop::option::of(1.0..1e6f64),
        rest_pricing in any_preset(),
        grpc_pricing in any_preset(),
    ) -> Inputs {
        let profile = profile.filter(|w| w.iter().any(|x| *x > 0.0));
        Inputs {
            rps, profile, duration_ms, concurrency: f64::from(concurrency), vcpu, gib,
            grpc_min_replicas: f64::from(replicas), streams, stream_lifetime_s: lifetime, cold_start_s: 2.0,
            rest_pricing, grpc_pricing,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn totals_never_fall_as_traffic_grows(inputs in any_inputs(), step in 1.0..10.0f64) {
        let (rest_low, grpc_low) = totals_at(&inputs, inputs.rps);
        let (rest_high, grpc_high) = totals_at(&inputs, inputs.rps * step + 1e-3);
        prop_assert!(rest_high >= rest_low - 1e-9 * rest_low.abs(), "REST {rest_low} -> {rest_high}");
        prop_assert!(grpc_high >= grpc_low - 1e-9 * grpc_low.abs(), "gRPC {grpc_low} -> {grpc_high}");
    }

    #[test]
    fn at_zero_traffic_rest_pays_only_its_fixed_fee(inputs in any_inputs()) {
        let rest = rest_cost(&inputs, 0.0);
        prop_assert_eq!(rest.breakdown.total, inputs.rest_pricing.monthly_fixed);
        prop_assert_eq!(rest.usage.active_instance_hours + rest.usage.idle_instance_hours, 0.0);
        prop_assert_eq!(rest.cold_starts.request_share, 1.0);
    }

    #[test]
    fn the_breakdown_adds_up_and_the_free_tier_never_pays_out(inputs in any_inputs()) {
        for option in [rest_cost(&inputs, inputs.rps), grpc_cost(&inputs, inputs.rps)] {
            let b = option.breakdown;
            let sum = b.compute_active + b.compute_idle + b.requests + b.fixed + b.free_tier;
            prop_assert!((sum - b.total).abs() < 1e-9 * sum.abs().max(1.0));
            prop_assert!(b.free_tier <= 0.0);
            prop_assert!(b.total >= b.fixed - 1e-9);
        }
    }

    #[test]
    fn grpc_never_runs_fewer_instances_than_its_floor(inputs in any_inputs()) {
        let grpc = grpc_cost(&inputs, inputs.rps);
        let hours = grpc.usage.active_instance_hours + grpc.usage.idle_instance_hours;
        prop_assert!(hours >= inputs.grpc_min_replicas * 730.0 * (1.0 - 1e-12));
        prop_assert_eq!(grpc.cold_starts.per_month, 0.0);
    }

    #[test]
    fn the_break_even_is_where_the_totals_meet_within_a_cent(inputs in any_inputs()) {
        let report = evaluate(&inputs).unwrap();
        if let Some(at) = report.break_even {
            let (rest, grpc) = totals_at(&inputs, at.rps);
            prop_assert!((rest - grpc).abs() < 0.01, "at {} req/s: REST {rest}, gRPC {grpc}", at.rps);
        }
        for mark in &report.ratio_falls_to {
            if let Some(at) = mark.at.filter(|at| at.rps > 0.0) {
                let (rest, grpc) = totals_at(&inputs, at.rps);
                prop_assert!((grpc - mark.ratio * rest).abs() < 0.01, "{}× at {}: {rest} {grpc}", mark.ratio, at.rps);
            }
        }
    }

    #[test]
    fn a_flat_profile_costs_what_no_profile_costs(inputs in any_inputs(), weight in 0.1..10.0f64) {
        let flat = Inputs { profile: Some(vec![weight; 24]), ..inputs.clone() };
        let none = Inputs { profile: None, ..inputs };
        let (a, b) = (totals_at(&flat, flat.rps), totals_at(&none, none.rps));
        prop_assert!((a.0 - b.0).abs() < 1e-6 && (a.1 - b.1).abs() < 1e-6, "{a:?} {b:?}");
    }
}

#[test]
fn bursty_traffic_costs_rest_less_than_the_same_requests_spread_flat() {
    // Scaled to zero, REST pays for busy time; bunching requests into fewer
    // hours keeps fewer instance-hours busy (concurrency shares them).
    let flat = Inputs { rps: 0.5, duration_ms: 500.0, ..on("cloud-run-request") };
    let mut profile = vec![0.0; 24];
    profile[9..17].iter_mut().for_each(|w| *w = 1.0);
    let office = Inputs { profile: Some(profile), ..flat.clone() };
    assert!(totals_at(&office, 0.5).0 < totals_at(&flat, 0.5).0);
}

#[test]
fn the_sweep_is_log_spaced_and_never_falls() {
    let inputs = guide().inputs;
    let points = sweep(&inputs, &SweepRange { from_rps: 0.01, to_rps: 100.0, points: 5 }).unwrap();
    let levels: Vec<f64> = points.iter().map(|p| p.rps).collect();
    for (got, want) in levels.iter().zip([0.01, 0.1, 1.0, 10.0, 100.0]) {
        assert!((got / want - 1.0).abs() < 1e-12, "{levels:?}");
    }
    assert!(points.windows(2).all(|w| w[1].rest_total >= w[0].rest_total && w[1].grpc_total >= w[0].grpc_total));
}

// --- Validation names the field.

fn field_of(inputs: Inputs) -> (String, Problem) {
    let e = evaluate(&inputs).unwrap_err();
    (e.field, e.problem)
}

#[test]
fn invalid_inputs_are_rejected_naming_the_field() {
    let ok = Inputs::default;
    assert_eq!(field_of(Inputs { rps: -1.0, ..ok() }), ("rps".into(), Problem::Negative(-1.0)));
    assert_eq!(field_of(Inputs { duration_ms: f64::NAN, ..ok() }).0, "duration_ms");
    assert_eq!(field_of(Inputs { concurrency: 0.0, ..ok() }).0, "concurrency");
    assert_eq!(field_of(Inputs { concurrency: 2.5, ..ok() }).0, "concurrency");
    assert_eq!(field_of(Inputs { vcpu: 0.0, ..ok() }), ("vcpu".into(), Problem::NotPositive(0.0)));
    assert_eq!(
        field_of(Inputs { grpc_min_replicas: 0.0, ..ok() }),
        ("grpc_min_replicas".into(), Problem::GrpcToZero(0.0))
    );
    assert_eq!(field_of(Inputs { rps: MAX_RPS * 2.0, ..ok() }).0, "rps");
    assert_eq!(
        field_of(Inputs { profile: Some(vec![1.0; 23]), ..ok() }),
        ("profile".into(), Problem::ProfileLength(23))
    );
    assert_eq!(field_of(Inputs { profile: Some(vec![0.0; 24]), ..ok() }), ("profile".into(), Problem::ProfileAllZero));
    let mut negative_hour = vec![1.0; 24];
    negative_hour[5] = -1.0;
    assert_eq!(field_of(Inputs { profile: Some(negative_hour), ..ok() }).0, "profile[5]");
    let mut bad_price = preset("fargate");
    bad_price.gib_price = f64::INFINITY;
    assert_eq!(field_of(Inputs { grpc_pricing: bad_price, ..ok() }).0, "grpc_pricing.gib_price");
    assert_eq!(rps_from_monthly(-5.0).unwrap_err().field, "requests_per_month");
}

#[test]
fn an_unknown_preset_lists_the_known_ones() {
    let e = find_preset(&presets(), "heroku", "--preset").unwrap_err();
    assert_eq!(e.field, "--preset");
    assert!(e.to_string().contains("unknown preset `heroku`; known presets: cloud-run-request, cloud-run-instance"));
}

#[test]
fn pricing_files_name_the_entry_and_field_they_get_wrong() {
    let mut own = preset("fargate");
    own.name = "mine".into();
    own.idle_vcpu_price = Some(1.0);
    let e = parse_pricing(&serde_json::to_string(&own).unwrap()).unwrap_err();
    assert!(matches!(&e, PricingFileError::Invalid(i) if i.field == "mine.idle_vcpu_price"), "{e}");

    let e = parse_pricing(r#"{"name": "x", "vcpu_prise": 1}"#).unwrap_err();
    assert!(e.to_string().contains("unknown field `vcpu_prise`"), "{e}");
    let e = parse_pricing("[]").unwrap_err();
    assert!(matches!(e, PricingFileError::Empty));
    let listed = parse_pricing(&serde_json::to_string(&presets()).unwrap()).unwrap();
    assert_eq!(listed, presets());
}
