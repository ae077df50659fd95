//! The alert rules on a real Prometheus (Debian's), scraping a real Envoy
//! that runs the filter in front of the demo service while some calls fail
//! with Unavailable, some take over a second, some outlive their deadline
//! (late responses), and some keyed calls find the one-bucket idempotency
//! table full. The rules are
//! istio/alerts.rules.yml as shipped except `for:`, cut from 5m to 1s so the
//! test ends in seconds; the expressions, windows and thresholds are the
//! file's own. istio/seconds.rules.yml is loaded as shipped, and a
//! go-grpc-prometheus-style latency query in seconds must agree with the
//! milliseconds.

use std::process::Command;
use std::time::{Duration, Instant};

use grpc_guard_demo::pb::EchoRequest;
use serde_yaml::Value;

use grpc_guard_tests::e2e::CALLER;

use crate::support::*;

const ALERTS: [&str; 4] =
    ["GrpcServerErrorRatioHigh", "GrpcServerLatencyP95High", "GrpcServerLateResponses", "GrpcGuardDedupTableFull"];
/// Echo deduplicated in a table of one bucket (eight ways) that one caller may
/// fill: once eight keyed calls' answers are kept there (for the default ttl,
/// 5 minutes), every call with another key finds the table full and is
/// refused with ResourceExhausted.
const ONE_BUCKET_DEDUP: &str =
    r#"{"dedup":{"methods":["grpcguard.demo.v1.Demo/Echo"],"max_entries":8,"caller_share":1}}"#;
/// Long enough for the p95 alert: one call in twelve lands in the
/// (1000, 2500] ms bucket.
const SLOW_MS: u32 = 1200;
/// A call whose `grpc-timeout` is 200 ms and whose server takes 600 ms: a late
/// response either way. tonic's channel arms its own timer from the same
/// header, so the client sees DeadlineExceeded when Envoy ends the call first
/// and Cancelled when its own timer does (it then resets the stream: the
/// client left).
const LATE_GRPC_TIMEOUT: &str = "200m";
const LATE_DELAY_MS: u32 = 600;
const CALLS_PER_ROUND: u32 = 13;

/// istio/alerts.rules.yml with every `for:` set to 1s; the alert expressions.
fn fast_rules() -> (String, Vec<(String, String)>) {
    let mut rules = yaml("istio/alerts.rules.yml");
    let mut exprs = Vec::new();
    for group in rules["groups"].as_sequence_mut().unwrap() {
        for rule in group["rules"].as_sequence_mut().unwrap() {
            rule["for"] = Value::from("1s");
            exprs.push((rule["alert"].as_str().unwrap().to_owned(), rule["expr"].as_str().unwrap().to_owned()));
        }
    }
    (serde_yaml::to_string(&rules).unwrap(), exprs)
}

/// A real Prometheus scraping `target`'s `/stats/prometheus` every second
/// and evaluating `rule_files` every second; its base URL.
pub(crate) fn start_prometheus(
    dir: &std::path::Path,
    rule_files: &[std::path::PathBuf],
    target: &str,
) -> (Server, String) {
    let job =
        format!("- job_name: envoy\n  metrics_path: /stats/prometheus\n  static_configs:\n  - targets: ['{target}']\n");
    start_prometheus_with_jobs(dir, rule_files, &job)
}

/// A real Prometheus with the scrape jobs `jobs` (YAML list items of
/// `scrape_configs`), scraping and evaluating `rule_files` every second.
pub(crate) fn start_prometheus_with_jobs(
    dir: &std::path::Path,
    rule_files: &[std::path::PathBuf],
    jobs: &str,
) -> (Server, String) {
    let rules: String = rule_files.iter().map(|f| format!("- {}\n", f.display())).collect();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n{rules}scrape_configs:\n{jobs}"
        ),
    )
    .unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let server = Server::start(
        "prometheus",
        Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn"),
        dir,
        &format!("{base}/-/ready"),
    );
    (server, base)
}

/// An instant query; the result vector as (labels, value) pairs.
pub(crate) fn query(base: &str, expr: &str) -> Vec<(serde_json::Value, f64)> {
    let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(5))).build().into();
    let body = agent
        .get(format!("{base}/api/v1/query"))
        .query("query", expr)
        .call()
        .and_then(|mut r| r.body_mut().read_to_string())
        .unwrap_or_else(|e| panic!("Prometheus query {expr}: {e}"));
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["status"], "success", "{answer}");
    answer["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["metric"].clone(), s["value"][1].as_str().unwrap().parse().unwrap_or(f64::NAN)))
        .collect()
}

fn firing(base: &str) -> Vec<String> {
    query(base, r#"ALERTS{alertstate="firing"}"#)
        .into_iter()
        .filter_map(|(labels, _)| labels["alertname"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_fires_every_alert_on_envoy_s_metrics_during_failures_slow_calls_late_responses_and_a_full_dedup_table(
) {
    let dir = scratch_dir("prometheus");
    let upstream = grpc_guard_tests::e2e::Upstream::start().await;
    let envoy = grpc_guard_tests::e2e::start_envoy("deploy-prometheus", upstream.addr, ONE_BUCKET_DEDUP).unwrap();

    let (rules, exprs) = fast_rules();
    std::fs::write(dir.join("alerts.fast.yml"), rules).unwrap();
    let (prometheus, base) = start_prometheus(
        &dir,
        &[dir.join("alerts.fast.yml"), repo_file("istio/seconds.rules.yml")],
        &envoy.params().admin_addr().to_string(),
    );

    let channel = grpc_guard_demo::lazy_channel(&envoy.grpc_uri()).unwrap();
    let client = grpc_guard_demo::client(channel);
    let keyed = |message: String, key: String| {
        grpc_guard_tests::e2e::keyed(EchoRequest { message, ..EchoRequest::default() }, &key, CALLER)
    };
    // Eight kept answers fill the table's one bucket.
    for n in 0..8 {
        let kept = client.clone().echo(keyed(format!("kept {n}"), format!("alert-test-kept-{n}"))).await;
        assert!(kept.is_ok(), "keyed call {n} takes a way: {kept:?}");
    }
    // Rounds of 8 OK calls, 2 Unavailable (15 % server-side errors; the keyed
    // call refused for a full table is grpc-guard's own answer and does not
    // count), 1 slow call (8 %) and 1 late response (8 %), about ten calls a
    // second, until every alert fires; 45 s at most.
    let deadline = Instant::now() + Duration::from_secs(45);
    let mut rounds = 0;
    let fired = loop {
        let mut calls = Vec::new();
        for i in 0..CALLS_PER_ROUND {
            let mut client = client.clone();
            let mut request = tonic::Request::new(EchoRequest {
                message: format!("alert test {i}"),
                fail_code: if i < 2 { tonic::Code::Unavailable as i32 } else { 0 },
                delay_ms: match i {
                    2 => SLOW_MS,
                    3 => LATE_DELAY_MS,
                    _ => 0,
                },
                ..EchoRequest::default()
            });
            if i == 3 {
                request.metadata_mut().insert("grpc-timeout", LATE_GRPC_TIMEOUT.parse().unwrap());
            }
            if i == 4 {
                request = keyed(format!("alert test {i}"), format!("alert-test-{rounds}"));
            }
            calls.push(tokio::spawn(async move { client.echo(request).await.map_err(|s| s.code()) }));
        }
        for (i, call) in calls.into_iter().enumerate() {
            let result = call.await.unwrap().map(|_| ());
            match i {
                0 | 1 => assert_eq!(result, Err(tonic::Code::Unavailable), "call {i}"),
                3 => assert!(
                    matches!(result, Err(tonic::Code::DeadlineExceeded | tonic::Code::Cancelled)),
                    "call {i}: {result:?}"
                ),
                4 => assert_eq!(result, Err(tonic::Code::ResourceExhausted), "call {i}: the table is full"),
                _ => assert_eq!(result, Ok(()), "call {i}"),
            }
        }
        rounds += 1;
        let fired = firing(&base);
        if ALERTS.iter().all(|a| fired.iter().any(|f| f == a)) || Instant::now() > deadline {
            break fired;
        }
    };

    let mut seen = String::new();
    let mut demo_echo = 0;
    for (alert, expr) in &exprs {
        for (labels, value) in query(&base, expr) {
            seen.push_str(&format!("  {alert}: {labels} = {value}\n"));
            if labels["grpc_service"] == "grpcguard.demo.v1.Demo" && labels["grpc_method"] == "Echo" {
                demo_echo += 1;
            }
        }
    }
    println!("after {rounds} rounds, firing: {fired:?}\nalert expressions:\n{seen}");
    for alert in ALERTS {
        assert!(
            fired.iter().any(|f| f == alert),
            "{alert} did not fire within 45 s ({rounds} rounds); firing: {fired:?}\nexpressions:\n{seen}\nprometheus log:\n{}",
            prometheus.log_text()
        );
    }
    // Every expression holds for the demo's Echo, labelled by envoy.yaml's stats_tags.
    assert_eq!(demo_echo, ALERTS.len(), "expected every expression true for grpcguard.demo.v1.Demo/Echo:\n{seen}");

    // A go-grpc-prometheus latency panel and alert, written for seconds,
    // read the recorded seconds (istio/seconds.rules.yml) and say what the
    // millisecond histogram says.
    let echo = |expr: &str| {
        query(&base, expr)
            .into_iter()
            .find(|(labels, _)| labels["grpc_method"] == "Echo")
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("no Echo in {expr}"))
    };
    let p95_ms = echo(
        r#"histogram_quantile(0.95, sum by (le, grpc_method) (rate(grpc_server_handling_milliseconds_bucket[1m])))"#,
    );
    let p95_s =
        echo(r#"histogram_quantile(0.95, sum by (le, grpc_method) (rate(grpc_server_handling_seconds_bucket[1m])))"#);
    println!("p95: {p95_ms} ms from the milliseconds, {p95_s} s from the recorded seconds");
    assert!(p95_ms > 1000.0 && (p95_s * 1000.0 - p95_ms).abs() <= 0.2 * p95_ms, "p95 {p95_s} s against {p95_ms} ms");
    let alert_s = echo(
        r#"histogram_quantile(0.95, sum by (grpc_service, grpc_method, le) (rate(grpc_server_handling_seconds_bucket{grpc_type="unary"}[5m]))) > 1"#,
    );
    assert!(alert_s > 1.0, "the seconds form of the p95 alert holds for Echo: {alert_s}");
    drop(prometheus);
    drop(envoy);
    drop(upstream);
}
