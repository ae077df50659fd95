//! The alert rules: promtool's syntax check and its unit tests
//! (istio/alerts.test.yml: firing and not firing), and label values that the
//! filter really writes.

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
