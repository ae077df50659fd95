//! The final status of a call, in the order gRPC clients decide it:
//! trailers, trailers-only headers, the HTTP status, a missing status, a reset.

use grpc_guard_tests::host::{Stream, Vm};

use crate::support::*;

/// Ends the call and returns the one log line.
fn finish_and_log(vm: &mut Vm, s: Stream) -> serde_json::Value {
    vm.finish(s);
    assert_eq!(vm.trapped(), None);
    one_call_log(vm)
}

#[test]
fn grpc_status_in_trailers_is_the_final_status() {
    let (host, mut vm) = vm_with("{}");
    let s = open(&mut vm, PATH, &[]);
    send(&mut vm, &s, &frames(&[3]));
    respond_headers(&mut vm, &s);
    let action = vm.response_body(&s, &frames(&[4]), false);
    cont(&vm, action);
    respond_trailers(&mut vm, &s, 5);
    assert_eq!(
        vm.stream_property(&s, STATUS_PROPERTY).as_deref(),
        Some(&b"NotFound"[..]),
        "the access log, which may run before the filter's own log callback, must already see the status"
    );

    let log = finish_and_log(&mut vm, s);
    assert_eq!(log["grpc_code"], "NotFound");
    assert_eq!(log["grpc_status"], 5);
    assert_eq!(log["status_source"], "trailers");
    assert_eq!(log["http_status"], 200);
    let metrics = host.metrics();
    assert_eq!(metrics.counter(&handled(GET, "NotFound")), Some(1));
    assert_eq!(metrics.counter(&handled(GET, "OK")), None);
}

#[test]
fn trailers_only_response_takes_the_status_from_its_headers() {
    let (host, mut vm) = vm_with("{}");
    let s = open(&mut vm, PATH, &[]);
    send(&mut vm, &s, &frames(&[3]));
    let action = vm.response_headers(
        &s,
        &[(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "14"), ("grpc-message", "down")],
        true,
    );
    cont(&vm, action);
    assert_eq!(vm.stream_property(&s, STATUS_PROPERTY).as_deref(), Some(&b"Unavailable"[..]));

    let log = finish_and_log(&mut vm, s);
    assert_eq!(log["grpc_code"], "Unavailable");
    assert_eq!(log["grpc_status"], 14);
    assert_eq!(log["status_source"], "headers");
    assert_eq!(log["resp_msgs"], 0);
    assert_eq!(host.metrics().counter(&handled(GET, "Unavailable")), Some(1));
}

#[test]
fn http_status_without_grpc_status_is_mapped_per_the_grpc_table() {
    // gRPC doc/http-grpc-status-mapping.md.
    let table = [
        (400, "Internal", 13),
        (401, "Unauthenticated", 16),
        (403, "PermissionDenied", 7),
        (404, "Unimplemented", 12),
        (429, "Unavailable", 14),
        (502, "Unavailable", 14),
        (503, "Unavailable", 14),
        (504, "Unavailable", 14),
        (500, "Unknown", 2),
    ];
    for (http, name, code) in table {
        let (host, mut vm) = vm_with("{}");
        let s = open(&mut vm, PATH, &[]);
        send(&mut vm, &s, &frames(&[3]));
        let http_text = http.to_string();
        let action = vm.response_headers(&s, &[(":status", http_text.as_str()), ("content-type", "text/plain")], false);
        cont(&vm, action);
        let action = vm.response_body(&s, b"upstream connect error", true);
        cont(&vm, action);

        let log = finish_and_log(&mut vm, s);
        assert_eq!(log["grpc_code"], name, "HTTP {http}");
        assert_eq!(log["grpc_status"], code, "HTTP {http}");
        assert_eq!(log["status_source"], "http", "HTTP {http}");
        assert_eq!(log["http_status"], http);
        assert_eq!(host.metrics().counter(&handled(GET, name)), Some(1), "HTTP {http}");
    }
}

#[test]
fn http_200_that_ends_without_grpc_status_is_internal() {
    let (host, mut vm) = vm_with("{}");
    let s = open(&mut vm, PATH, &[]);
    send(&mut vm, &s, &frames(&[3]));
    respond_headers(&mut vm, &s);
    let action = vm.response_body(&s, &frames(&[8]), true);
    cont(&vm, action);

    let log = finish_and_log(&mut vm, s);
    assert_eq!(log["grpc_code"], "Internal");
    assert_eq!(log["status_source"], "missing");
    assert_eq!(log["resp_msgs"], 1);
    assert_eq!(host.metrics().counter(&handled(GET, "Internal")), Some(1));
}

const UPSTREAM_RESET: &[u8] = b"upstream_reset_before_response_started{connection_failure}";
const CLIENT_RESET: &[u8] = b"http2.remote_reset";

#[test]
fn upstream_reset_before_any_response_is_unavailable() {
    let (host, mut vm) = vm_with("{}");
    let s = open(&mut vm, PATH, &[]);
    send(&mut vm, &s, &frames(&[3]));
    vm.set_property(&s, &["response", "code_details"], UPSTREAM_RESET);

    let log = finish_and_log(&mut vm, s);
    assert_eq!(log["grpc_code"], "Unavailable");
    assert_eq!(log["status_source"], "reset");
    assert_eq!(log["http_status"], 0);
    assert_eq!(host.metrics().counter(&handled(GET, "Unavailable")), Some(1));
}

#[test]
fn client_reset_before_any_response_is_canceled() {
    let (host, mut vm) = vm_with("{}");
    let s = open(&mut vm, PATH, &[]);
    send(&mut vm, &s, &frames(&[3]));
    vm.set_property(&s, &["response", "code_details"], CLIENT_RESET);

    let log = finish_and_log(&mut vm, s);
    assert_eq!(log["grpc_code"], "Canceled");
    assert_eq!(log["grpc_status"], 1);
    assert_eq!(log["status_source"], "reset");
    assert_eq!(host.metrics().counter(&handled(GET, "Canceled")), Some(1));
}

#[test]
fn stream_that_ends_without_code_details_counts_against_the_upstream() {
    let (host, mut vm) = vm_with("{}");
    let s = open(&mut vm, PATH, &[]);
    vm.finish(s);
    assert_eq!(one_call_log(&mut vm)["grpc_code"], "Unavailable");
    assert_eq!(host.metrics().counter(&handled(GET, "Unavailable")), Some(1));
}

#[test]
fn reset_after_response_headers_is_unavailable_or_canceled_by_who_reset() {
    for (details, name) in
        [(&b"upstream_reset_after_response_started{remote_reset}"[..], "Unavailable"), (CLIENT_RESET, "Canceled")]
    {
        let (host, mut vm) = vm_with("{}");
        let s = open(&mut vm, PATH, &[]);
        send(&mut vm, &s, &frames(&[3]));
        respond_headers(&mut vm, &s);
        let action = vm.response_body(&s, &frames(&[10, 10]), false);
        cont(&vm, action);
        vm.set_property(&s, &["response", "code_details"], details);

        let log = finish_and_log(&mut vm, s);
        assert_eq!(log["grpc_code"], name, "{}", String::from_utf8_lossy(details));
        assert_eq!(log["status_source"], "reset");
        assert_eq!(log["http_status"], 200);
        assert_eq!(log["resp_msgs"], 2, "messages that got through before the reset still count");
        assert_eq!(host.metrics().counter(&handled(GET, name)), Some(1));
    }
}

#[test]
fn filter_state_agrees_with_the_metric_when_headers_and_trailers_both_carry_grpc_status() {
    // Not a well-formed response (grpc-status belongs in the trailers unless
    // the response is trailers-only), but a buggy server can send it: the
    // access log and the metric must still tell the same story.
    let (host, mut vm) = vm_with("{}");
    let s = open(&mut vm, PATH, &[]);
    send(&mut vm, &s, &frames(&[3]));
    let action = vm.response_headers(
        &s,
        &[(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "0")],
        false,
    );
    cont(&vm, action);
    respond_trailers(&mut vm, &s, 13);
    let tagged = vm.stream_property(&s, STATUS_PROPERTY);

    let log = finish_and_log(&mut vm, s);
    assert_eq!(log["grpc_code"], "Internal");
    assert_eq!(host.metrics().counter(&handled(GET, "Internal")), Some(1));
    assert_eq!(tagged.as_deref(), Some(&b"Internal"[..]), "filter state must hold the final status");
}
