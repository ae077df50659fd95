//! The alert rules: promtool's syntax check and its unit tests
//! (istio/alerts.test.yml: firing and not firing), and label values that the
//! filter really writes. The seconds recording rules (istio/seconds.rules.yml):
//! promtool's check and unit tests, and their buckets are Envoy's.

use std::process::Command;

use grpc_guard::status::GrpcStatus;

use crate::support::*;

#[test]
fn rule_file_passes_promtool_check() {
    let out = run_ok(Command::new(tool("promtool")).arg("check").arg("rules").arg(repo_file("istio/alerts.rules.yml")));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("SUCCESS: 4 rules found"), "{text}");
}

#[test]
fn alerts_fire_and_stay_quiet_as_promtool_unit_tests_expect() {
    let out = run_ok(Command::new(tool("promtool")).arg("test").arg("rules").arg(repo_file("istio/alerts.test.yml")));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("SUCCESS"), "{text}");
}

/// A misspelled code in `grpc_code!~"…"` would silently count client errors
/// as server failures: every excluded code must be a name the filter writes.
#[test]
fn error_ratio_excludes_exactly_the_client_caused_codes_by_their_metric_names() {
    let rules = read("istio/alerts.rules.yml");
    let (_, rest) = rules.split_once("grpc_code!~\"").expect("the error ratio excludes codes with grpc_code!~");
    let (codes, _) = rest.split_once('"').unwrap();
    let mut excluded: Vec<&str> = codes.split('|').collect();
    for code in &excluded {
        assert!(
            GrpcStatus::ALL.iter().any(|s| s.go_name() == *code),
            "`{code}` is not a grpc_code value grpc-guard writes"
        );
    }
    excluded.sort_unstable();
    let mut expected = vec![
        "OK",
        "Canceled",
        "DeadlineExceeded",
        "InvalidArgument",
        "NotFound",
        "AlreadyExists",
        "PermissionDenied",
        "Unauthenticated",
        "FailedPrecondition",
        "OutOfRange",
    ];
    expected.sort_unstable();
    assert_eq!(excluded, expected);
}

/// An alert that summed an application's own go-grpc-prometheus series in
/// (Istio's merged scrape) would dilute its ratios: late responses over both
/// sides' started calls.
#[test]
fn every_alert_reads_grpc_guard_s_own_series() {
    let rules = yaml("istio/alerts.rules.yml");
    let mut alerts = 0;
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let expr = rule["expr"].as_str().unwrap();
            assert_eq!(
                selectors_without_exporter(expr),
                Vec::<String>::new(),
                "{}: {expr}",
                rule["alert"].as_str().unwrap()
            );
            alerts += 1;
        }
    }
    assert_eq!(alerts, 4);
}

#[test]
fn seconds_rules_pass_promtool_check_and_their_unit_tests() {
    let out =
        run_ok(Command::new(tool("promtool")).arg("check").arg("rules").arg(repo_file("istio/seconds.rules.yml")));
    let text = String::from_utf8_lossy(&out.stdout);
    // 16 buckets, +Inf, _sum and _count, for servers and for clients.
    assert!(text.contains("SUCCESS: 38 rules found"), "{text}");
    let out = run_ok(Command::new(tool("promtool")).arg("test").arg("rules").arg(repo_file("istio/seconds.test.yml")));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("SUCCESS"), "{text}");
}

/// envoy/envoy.yaml's buckets for a histogram, by its stat name prefix.
fn envoy_buckets(prefix: &str) -> Vec<u64> {
    let envoy = envoy_config();
    let settings = at(&envoy, "envoy/envoy.yaml", "stats_config.histogram_bucket_settings").as_sequence().unwrap();
    let setting = settings
        .iter()
        .find(|s| s["match"]["prefix"] == prefix)
        .unwrap_or_else(|| panic!("envoy/envoy.yaml: no buckets for {prefix}"));
    setting["buckets"].as_sequence().unwrap().iter().map(|b| b.as_u64().unwrap()).collect()
}

/// Each rule turns one of Envoy's millisecond buckets into seconds: a bucket
/// Envoy has and the rules lack would vanish from every seconds panel.
#[test]
fn seconds_rules_cover_exactly_envoy_s_handling_buckets() {
    let rules = yaml("istio/seconds.rules.yml");
    for direction in ["server", "client"] {
        let envoy = envoy_buckets(&format!("wasmcustom.grpc_{direction}_handling_milliseconds"));
        let mut pairs: Vec<(String, String)> = Vec::new();
        for group in rules["groups"].as_sequence().unwrap() {
            for rule in group["rules"].as_sequence().unwrap() {
                if rule["record"] == format!("grpc_{direction}_handling_seconds_bucket").as_str() {
                    let expr = rule["expr"].as_str().unwrap().to_owned();
                    pairs.push((expr, rule["labels"]["le"].as_str().unwrap().to_owned()));
                }
            }
        }
        let mut want: Vec<(String, String)> = envoy
            .iter()
            .map(|ms| {
                (
                    format!("grpc_{direction}_handling_milliseconds_bucket{{le=~\"{ms}(\\\\.0)?\"}}"),
                    format!("{}", *ms as f64 / 1000.0),
                )
            })
            .collect();
        want.push((format!("grpc_{direction}_handling_milliseconds_bucket{{le=\"+Inf\"}}"), "+Inf".to_owned()));
        assert_eq!(pairs, want, "istio/seconds.rules.yml, {direction}");
    }
}
