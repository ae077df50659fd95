//! The JSON line logged per call: sampling, the request id, the duration.

use std::time::Duration;

use crate::support::*;

#[test]
fn ok_sample_zero_logs_no_ok_call_but_every_failure() {
    let (host, mut vm) = vm_with(r#"{"log":{"ok_sample":0.0}}"#);
    for _ in 0..5 {
        unary(&mut vm, PATH, &[], 1, 1, 0);
    }
    assert!(call_logs(&mut vm).is_empty(), "no OK call is logged at ok_sample 0");
    for code in [1, 4, 14, 13] {
        unary(&mut vm, PATH, &[], 1, 1, code);
    }
    let codes: Vec<u64> = call_logs(&mut vm).iter().filter_map(|l| l["grpc_status"].as_u64()).collect();
    assert_eq!(codes, [1, 4, 14, 13], "every failure is logged whatever the sampling");
    assert_eq!(host.metrics().counter(&handled(GET, "OK")), Some(5), "sampling thins logs, never metrics");
}

#[test]
fn ok_sample_logs_that_fraction_of_ok_calls() {
    let (_host, mut vm) = vm_with(r#"{"log":{"ok_sample":0.25}}"#);
    for _ in 0..40 {
        unary(&mut vm, PATH, &[], 1, 1, 0);
    }
    assert_eq!(call_logs(&mut vm).len(), 10);
}

#[test]
fn default_config_logs_every_call_with_the_documented_fields() {
    let (_host, mut vm) = vm_with("{}");
    unary(&mut vm, PATH, &[("x-request-id", "req-1")], 11, 22, 0);
    let log = one_call_log(&mut vm);
    let mut fields: Vec<&str> = log.as_object().unwrap().keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "deadline_ms",
            "deadline_source",
            "dedup",
            "direction",
            "duration_ms",
            "grpc_code",
            "grpc_status",
            "grpc_type",
            "http_status",
            "late",
            "method",
            "previous_attempts",
            "req_bytes",
            "req_msgs",
            "request_id",
            "resp_bytes",
            "resp_msgs",
            "service",
            "status_source",
            "trace_id",
        ]
    );
    assert_eq!(log["direction"], "inbound");
    assert_eq!(log["service"], SERVICE);
    assert_eq!(log["method"], METHOD);
    assert_eq!(log["grpc_type"], "unary");
    assert_eq!(log["grpc_code"], "OK");
    assert_eq!(log["grpc_status"], 0);
    assert_eq!(log["request_id"], "req-1");
    assert_eq!((log["req_msgs"].as_u64(), log["req_bytes"].as_u64()), (Some(1), Some(11)));
    assert_eq!((log["resp_msgs"].as_u64(), log["resp_bytes"].as_u64()), (Some(1), Some(22)));
    assert!(log["deadline_ms"].is_null(), "no grpc-timeout and no default: no deadline");
    assert_eq!(log["deadline_source"], "none");
    assert_eq!(log["late"], false);
    assert_eq!(log["dedup"], "none");
}

#[test]
fn request_id_comes_from_the_configured_header() {
    let (_host, mut vm) = vm_with(r#"{"log":{"request_id_header":"X-Trace-Id"}}"#);
    unary(&mut vm, PATH, &[("x-request-id", "not-this"), ("x-trace-id", "trace-42")], 1, 1, 0);
    assert_eq!(one_call_log(&mut vm)["request_id"], "trace-42");
    unary(&mut vm, PATH, &[("x-request-id", "not-this")], 1, 1, 0);
    assert_eq!(one_call_log(&mut vm)["request_id"], serde_json::Value::Null, "absent header: null, not empty");
}

#[test]
fn hostile_request_ids_stay_one_short_valid_json_line() {
    let long = "A".repeat(1000);
    let hostile = [
        "evil\n{\"grpc_code\":\"OK\"}\r\nsecond line",
        "\"quoted\", \"grpc_status\": 0, \"x\":\"",
        "back\\slash\t\u{0}\u{1b}[31m",
        "\u{2028}\u{2029}é漢字🙂",
        long.as_str(),
    ];
    let (_host, mut vm) = vm_with("{}");
    for value in hostile {
        unary(&mut vm, PATH, &[("x-request-id", value)], 1, 1, 14);
        let line = vm.logs().last().map(|l| l.message.clone()).unwrap_or_default();
        assert!(!line.contains('\n') && !line.contains('\r'), "{line:?}");
        assert!(line.len() < 1024, "{} bytes: {line:?}", line.len());
        let log = one_call_log(&mut vm);
        assert_eq!(log["grpc_code"], "Unavailable", "the status is not overridden by {value:?}");
        let id = log["request_id"].as_str().unwrap();
        assert!(value.starts_with(id) && !id.is_empty(), "kept as a prefix of {value:?}: {id:?}");
        assert!(id.len() <= 128, "{} bytes", id.len());
    }
}

#[test]
fn duration_is_measured_on_the_proxy_clock_from_request_headers_to_the_end() {
    let (host, mut vm) = vm_with("{}");
    let s = open(&mut vm, PATH, &[]);
    vm.advance_clock(Duration::from_millis(40));
    send(&mut vm, &s, &frames(&[1]));
    vm.advance_clock(Duration::from_millis(200));
    respond_headers(&mut vm, &s);
    respond_trailers(&mut vm, &s, 0);
    vm.advance_clock(Duration::from_micros(10_900));
    vm.finish(s);

    assert_eq!(one_call_log(&mut vm)["duration_ms"], 250);
    assert_eq!(host.metrics().histogram(&stat("grpc_server_handling_milliseconds", GET, None)), Some(vec![250]));
}

/// HTTP/3: Envoy destroys the filter before the access log runs (it waits
/// for the client's acknowledgement of the answer). The call still ends
/// once, with its metrics and its line, when the stream is deleted; the log
/// callback that comes after finds nothing left and does nothing.
#[test]
fn a_stream_deleted_before_its_log_still_ends_its_call_once() {
    let (host, mut vm) = vm_with("{}");
    let s = open(&mut vm, PATH, &[]);
    send(&mut vm, &s, &frames(&[8]));
    respond_headers(&mut vm, &s);
    let action = vm.response_body(&s, &frames(&[8]), false);
    cont(&vm, action);
    respond_trailers(&mut vm, &s, 5);
    vm.finish_deleted_before_log(s);
    assert_eq!(vm.trapped(), None);
    let metrics = host.metrics();
    assert_eq!(metrics.counter(&handled(GET, "NotFound")), Some(1));
    let logs = call_logs(&mut vm);
    assert_eq!(logs.len(), 1, "{logs:?}");
    assert_eq!(logs[0]["grpc_code"], "NotFound");
}

/// A stream Envoy creates only to log it (another filter answered it before
/// this one saw its headers; over HTTP/3 no delete follows): nothing is
/// counted, nothing logged, nothing trapped, and, over many, nothing kept.
#[test]
fn streams_created_only_to_be_logged_are_not_calls() {
    let (host, mut vm) = vm_with("{}");
    let log_only = |vm: &mut grpc_guard_tests::host::Vm, n: usize| {
        for _ in 0..n {
            let s = vm.new_stream();
            vm.finish_logged_only(s);
        }
    };
    log_only(&mut vm, 1_000);
    let memory = vm.memory_bytes();
    // Kept, 10,000 of them would take megabytes.
    log_only(&mut vm, 10_000);
    assert_eq!(vm.memory_bytes(), memory, "the VM's memory grew over streams that were only logged");
    assert_eq!(vm.trapped(), None);
    assert!(call_logs(&mut vm).is_empty());
    assert_eq!(host.metrics().counter(&handled(GET, "OK")), None);
    // One call after them runs as any other.
    unary(&mut vm, PATH, &[], 8, 8, 0);
    assert_eq!(host.metrics().counter(&handled(GET, "OK")), Some(1));
}
