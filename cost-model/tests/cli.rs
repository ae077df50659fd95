//! The real `grpc-guard-cost` binary: what it prints, its exit codes, and how
//! it names a bad flag.

use std::path::PathBuf;
use std::process::{Command, Output};

use grpc_guard_cost_model::{evaluate, guide, presets, usd};
use serde_json::Value;

fn cost(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_grpc-guard-cost")).args(args).output().expect("run grpc-guard-cost")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json(args: &[&str]) -> Value {
    let out = cost(&[args, &["--json"]].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("--json prints JSON")
}

/// Exit status 2 and an error line that starts with `flag`.
fn assert_usage_error(args: &[&str], flag: &str, reason: &str) {
    let out = cost(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert!(err.contains(&format!("error: {flag}")) || err.contains(&format!("'{flag}")), "{args:?}: {err}");
    assert!(err.contains(reason), "{args:?}: {err}");
    assert!(out.stdout.is_empty(), "{args:?} printed a result anyway");
}

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cost-model-cli");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn the_guide_scenario_prints_both_totals_the_ratio_and_its_assumptions() {
    let out = cost(&["--scenario", "guide"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let report = evaluate(&guide().inputs).unwrap();
    let total_line = text.lines().find(|l| l.starts_with("total per month")).expect("a total line");
    assert!(total_line.contains(&usd(report.rest.breakdown.total)), "{total_line}");
    assert!(total_line.contains(&usd(report.grpc.breakdown.total)), "{total_line}");
    assert!(text.contains(&format!("gRPC costs {:.2}× REST", report.ratio.unwrap())), "{text}");
    assert!(text.contains("The ratio falls to 4× at"), "{text}");
    assert!(text.contains("Assumptions:\n  - Traffic: 2 req/s on average"), "{text}");
    assert!(text.contains("as of 2026-11: https://cloud.google.com/run/pricing"), "{text}");
}

#[test]
fn json_carries_the_same_figures_as_the_library() {
    let v = json(&["--scenario", "guide"]);
    let report = evaluate(&guide().inputs).unwrap();
    assert_eq!(v["rest"]["breakdown"]["total"].as_f64(), Some(report.rest.breakdown.total));
    assert_eq!(v["grpc"]["breakdown"]["compute_active"].as_f64(), Some(report.grpc.breakdown.compute_active));
    assert_eq!(v["ratio"].as_f64(), report.ratio);
    assert!(v["break_even"].is_null());
    assert_eq!(v["ratio_falls_to"][0]["ratio"].as_f64(), Some(4.0));
    assert_eq!(v["inputs"]["grpc_min_replicas"].as_f64(), Some(2.0));
    assert_eq!(v["sweep"].as_array().map(Vec::len), Some(61));
    assert!(v["assumptions"][0].as_str().unwrap().starts_with("Traffic:"));
}

#[test]
fn flags_given_with_a_scenario_override_only_what_they_name() {
    let v = json(&["--scenario", "guide", "--rps", "10"]);
    assert_eq!(v["inputs"]["rps"].as_f64(), Some(10.0));
    assert_eq!(v["inputs"]["gib"].as_f64(), Some(2.0), "the scenario's 2 GiB stays");
    assert_eq!(v["inputs"]["streams"].as_f64(), Some(2.0));
}

#[test]
fn traffic_can_be_given_per_month_and_platforms_per_option() {
    let v = json(&["--requests-per-month", "2628000", "--rest-preset", "fargate", "--grpc-preset", "gke-autopilot"]);
    assert_eq!(v["traffic"]["rps"].as_f64(), Some(1.0));
    assert_eq!(v["rest"]["platform"], "fargate");
    assert_eq!(v["grpc"]["platform"], "gke-autopilot");
}

#[test]
fn csv_prints_the_sweep_with_a_header() {
    let out = cost(&["--csv", "--sweep-from", "0.1", "--sweep-to", "1000", "--sweep-points", "5"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "rps,requests_per_month,rest_total_usd,grpc_total_usd,ratio");
    assert_eq!(lines.len(), 6, "{text}");
    assert!(lines[3].starts_with("10,26280000,"), "{}", lines[3]);
}

#[test]
fn chart_writes_an_svg_with_both_curves() {
    let path = scratch("guide.svg");
    let _ = std::fs::remove_file(&path);
    let out = cost(&["--scenario", "guide", "--chart", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&format!("Chart: {}", path.display())));
    let svg = std::fs::read_to_string(&path).unwrap();
    assert!(svg.starts_with("<svg "));
    assert_eq!(svg.matches("<polyline").count(), 2);
    assert!(svg.contains("your traffic") && svg.contains(">4×<") && svg.contains(">2×<"));
}

#[test]
fn bad_values_are_refused_naming_the_flag() {
    assert_usage_error(&["--rps", "-1"], "--rps", "must not be negative, got -1");
    assert_usage_error(&["--duration-ms", "NaN"], "--duration-ms", "must be a finite number");
    assert_usage_error(&["--grpc-min-replicas", "0"], "--grpc-min-replicas", "does not scale to zero");
    assert_usage_error(&["--concurrency", "0.5"], "--concurrency", "must be a whole number");
    assert_usage_error(&["--vcpu", "0"], "--vcpu", "must be greater than 0");
    assert_usage_error(&["--requests-per-month", "-10"], "--requests-per-month", "must not be negative");
    assert_usage_error(&["--profile", "1,2,x"], "--profile", "hour 2: `x` is not a number");
    assert_usage_error(&["--profile", "1,2,3"], "--profile", "must be 24 hourly weights");
    assert_usage_error(
        &["--preset", "heroku"],
        "--preset",
        "unknown preset `heroku`; known presets: cloud-run-request",
    );
    assert_usage_error(&["--grpc-preset", "nope"], "--grpc-preset", "unknown preset `nope`");
    assert_usage_error(&["--sweep-from", "10", "--sweep-to", "1"], "--sweep-to", "must be above sweep_from");
    assert_usage_error(&["--rps", "abc"], "--rps", "invalid value 'abc'");
    assert_usage_error(&["--rps", "1", "--requests-per-month", "5"], "--rps", "cannot be used with");
    assert_usage_error(&["--json", "--csv"], "--json", "cannot be used with");
    assert_usage_error(&["--replicas", "2"], "--replicas", "unexpected argument");
}

#[test]
fn a_pricing_file_adds_a_platform_and_names_its_bad_fields() {
    let mut own = presets().into_iter().find(|p| p.name == "fargate").unwrap();
    own.name = "on-prem".into();
    own.monthly_fixed = 40.0;
    let good = scratch("on-prem.json");
    std::fs::write(&good, serde_json::to_string(&own).unwrap()).unwrap();
    // One entry: used for both options.
    let v = json(&["--pricing", good.to_str().unwrap(), "--rps", "0"]);
    assert_eq!(v["rest"]["platform"], "on-prem");
    assert_eq!(v["rest"]["breakdown"]["total"].as_f64(), Some(40.0), "scaled to zero, only the fixed fee");
    let listed = stdout(&cost(&["--pricing", good.to_str().unwrap(), "--list-presets"]));
    assert!(listed.contains("on-prem\n"), "{listed}");

    let bad = scratch("bad.json");
    std::fs::write(&bad, serde_json::to_string(&own).unwrap().replace("\"keep_warm_s\":300.0", "\"keep_warm_s\":-1"))
        .unwrap();
    assert_usage_error(&["--pricing", bad.to_str().unwrap()], "--pricing", "on-prem.keep_warm_s: must not be negative");

    let out = cost(&["--pricing", "/nonexistent/prices.json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("error: --pricing /nonexistent/prices.json: No such file"), "{}", stderr(&out));
}

#[test]
fn list_presets_shows_every_source_and_date() {
    let out = cost(&["--list-presets"]);
    assert!(out.status.success());
    let text = stdout(&out);
    for p in presets() {
        assert!(text.contains(&format!("prices of {}: {}", p.price_date, p.source)), "{}", p.name);
    }
}

#[test]
fn help_explains_the_model_and_shows_defaults_and_examples() {
    let out = cost(&["--help"]);
    assert!(out.status.success());
    let text = stdout(&out);
    for needle in [
        "open stream keeps a request-billed instance active",
        "--grpc-min-replicas <GRPC_MIN_REPLICAS>",
        "[default: 2]",
        "--pricing <FILE>",
        "grpc-guard-cost --scenario guide",
        "Exit status: 0 on success, 2",
    ] {
        assert!(text.contains(needle), "--help lacks {needle:?}");
    }
}
