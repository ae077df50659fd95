//! The plugin configuration: `{}` starts, mistakes refuse to start with the
//! field named.

use grpc_guard_tests::host::{HostError, LogLevel};

use crate::support::*;

#[test]
fn empty_config_starts_counts_every_call_and_logs_failures_and_one_ok_call_in_a_hundred() {
    for config in ["{}", "", "  \n"] {
        let (host, mut vm) = vm_exact(config);
        for _ in 0..99 {
            unary(&mut vm, PATH, &[], 1, 1, 0);
        }
        assert_eq!(call_logs(&mut vm), Vec::<serde_json::Value>::new(), "config {config:?}");
        unary(&mut vm, PATH, &[], 1, 1, 0);
        assert_eq!(one_call_log(&mut vm)["grpc_code"], "OK", "config {config:?}");
        unary(&mut vm, PATH, &[], 1, 1, 5);
        assert_eq!(one_call_log(&mut vm)["grpc_code"], "NotFound", "config {config:?}");
        assert_eq!(host.metrics().counter(&handled(GET, "OK")), Some(100), "config {config:?}");
    }
}

#[test]
fn bad_config_is_refused_with_one_log_line_naming_the_field() {
    let cases = [
        (r#"{"metrics":{"max_methodz":3}}"#, "metrics.max_methodz"),
        (r#"{"dedupe":{}}"#, "dedupe"),
        (r#"{"metrics":{"max_methods":0}}"#, "metrics.max_methods"),
        (r#"{"metrics":{"max_methods":"lots"}}"#, "metrics.max_methods"),
        (r#"{"direction":"sideways"}"#, "direction"),
        (r#"{"log":{"ok_sample":1.5}}"#, "log.ok_sample"),
        (r#"{"log":{"request_id_header":"x id"}}"#, "log.request_id_header"),
        (r#"{"metrics":{"methods":[]}}"#, "metrics.methods"),
        (r#"{"metrics":{"method_types":{"pkg.Svc/Watch":"firehose"}}}"#, "metrics.method_types"),
        ("{not json", "configuration"),
    ];
    let host = host();
    for (i, (config, field)) in cases.iter().enumerate() {
        let logs = match host.start_vm(config) {
            Err(HostError::ConfigureRejected { logs }) => logs,
            Err(other) => panic!("{config}: refused the wrong way: {other}"),
            Ok(_) => panic!("{config}: a bad config must stop the plugin"),
        };
        assert_eq!(logs.len(), 1, "{config}: one line, got {logs:#?}");
        assert_eq!(logs[0].level, LogLevel::Error, "{config}");
        assert!(logs[0].message.contains(field), "{config}: the line must name {field}: {:?}", logs[0].message);
        assert_eq!(host.metrics().counter("grpc_guard_config_rejected_total"), Some(i as u64 + 1), "{config}");
    }
}
