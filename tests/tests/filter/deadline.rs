//! Deadlines and the request size guard: what the upstream receives, what the
//! client is answered, and what is counted and logged.

use std::time::Duration;

use grpc_guard_tests::host::{Action, Stream, Vm};

use crate::support::*;

const POLICY: &str = r#"{"deadline":{"default":"10s","max":"60s","per_method":{"pkg.Svc/Slow":{"max":"120s"}}}}"#;

fn grpc_timeout_sent_upstream(vm: &Vm, s: &Stream) -> Option<String> {
    vm.request_headers_now(s).into_iter().find(|(k, _)| k == "grpc-timeout").map(|(_, v)| v)
}

/// Opens a call with optional `grpc-timeout`, returning the stream and the action.
fn call_with_timeout(vm: &mut Vm, path: &str, timeout: Option<&str>) -> (Stream, Action) {
    let s = vm.new_stream();
    let mut extra = Vec::new();
    if let Some(t) = timeout {
        extra.push(("grpc-timeout", t));
    }
    let action = vm.request_headers(&s, &grpc_headers(path, &extra), false);
    (s, action)
}

fn finish_ok(vm: &mut Vm, s: Stream) {
    send(vm, &s, &frames(&[3]));
    respond_headers(vm, &s);
    let action = vm.response_body(&s, &frames(&[3]), false);
    cont(vm, action);
    respond_trailers(vm, &s, 0);
    vm.finish(s);
}

fn counter(host: &grpc_guard_tests::host::Host, family: &str, labels: Labels<'_>, code: Option<&str>) -> Option<u64> {
    host.metrics().counter(&stat(family, labels, code))
}

#[test]
fn call_without_grpc_timeout_gets_the_default_deadline_upstream() {
    let (host, mut vm) = vm_with(POLICY);
    let (s, action) = call_with_timeout(&mut vm, PATH, None);
    cont(&vm, action);
    assert_eq!(grpc_timeout_sent_upstream(&vm, &s).as_deref(), Some("10000000u"));
    finish_ok(&mut vm, s);
    assert_eq!(counter(&host, "grpc_server_deadline_injected_total", GET, None), Some(1));
    let log = one_call_log(&mut vm);
    assert_eq!(log["deadline_ms"], 10_000);
    assert_eq!(log["deadline_source"], "default");
}

#[test]
fn grpc_timeout_above_the_maximum_is_rewritten_to_the_maximum() {
    let (host, mut vm) = vm_with(POLICY);
    let (s, action) = call_with_timeout(&mut vm, PATH, Some("5M"));
    cont(&vm, action);
    assert_eq!(grpc_timeout_sent_upstream(&vm, &s).as_deref(), Some("60000000u"));
    finish_ok(&mut vm, s);
    assert_eq!(counter(&host, "grpc_server_deadline_clamped_total", GET, None), Some(1));
    let log = one_call_log(&mut vm);
    assert_eq!((log["deadline_ms"].as_u64(), log["deadline_source"].as_str()), (Some(60_000), Some("clamped")));
}

#[test]
fn grpc_timeout_within_the_maximum_reaches_the_upstream_unchanged() {
    let (host, mut vm) = vm_with(POLICY);
    let (s, action) = call_with_timeout(&mut vm, PATH, Some("1500m"));
    cont(&vm, action);
    assert_eq!(grpc_timeout_sent_upstream(&vm, &s).as_deref(), Some("1500m"));
    finish_ok(&mut vm, s);
    assert_eq!(counter(&host, "grpc_server_deadline_clamped_total", GET, None), None);
    let log = one_call_log(&mut vm);
    assert_eq!((log["deadline_ms"].as_u64(), log["deadline_source"].as_str()), (Some(1500), Some("client")));
}

#[test]
fn per_method_maximum_wins_over_the_global_one() {
    let (_host, mut vm) = vm_with(POLICY);
    let (s, action) = call_with_timeout(&mut vm, "/pkg.Svc/Slow", Some("100S"));
    cont(&vm, action);
    assert_eq!(grpc_timeout_sent_upstream(&vm, &s).as_deref(), Some("100S"), "Slow may run 120 s");
    let (s2, action) = call_with_timeout(&mut vm, "/pkg.Svc/Slow", Some("200S"));
    cont(&vm, action);
    assert_eq!(grpc_timeout_sent_upstream(&vm, &s2).as_deref(), Some("120000m"));
}

#[test]
fn malformed_grpc_timeout_is_answered_invalid_argument_by_the_proxy() {
    let (host, mut vm) = vm_with("{}");
    let (s, action) = call_with_timeout(&mut vm, PATH, Some("soon"));
    assert_eq!(action, Action::Pause, "the call must not go upstream");
    let reply = vm.local_reply(&s).expect("a local reply");
    assert_eq!(reply.grpc_status, Some(3));
    let message = String::from_utf8_lossy(&reply.body);
    assert!(message.contains("grpc-timeout header \"soon\""), "{message}");
    vm.finish(s);
    assert_eq!(counter(&host, "grpc_server_deadline_rejected_total", GET, Some("InvalidArgument")), Some(1));
    assert_eq!(host.metrics().counter(&handled(GET, "InvalidArgument")), Some(1));
    let log = one_call_log(&mut vm);
    assert_eq!(log["deadline_source"], "invalid");
    assert_eq!(log["late"], false);
}

#[test]
fn zero_grpc_timeout_is_answered_deadline_exceeded_by_the_proxy() {
    let (host, mut vm) = vm_with("{}");
    let (s, action) = call_with_timeout(&mut vm, PATH, Some("0m"));
    assert_eq!(action, Action::Pause);
    assert_eq!(vm.local_reply(&s).and_then(|r| r.grpc_status), Some(4));
    vm.finish(s);
    assert_eq!(counter(&host, "grpc_server_deadline_rejected_total", GET, Some("DeadlineExceeded")), Some(1));
    let log = one_call_log(&mut vm);
    assert_eq!(
        (log["grpc_code"].as_str(), log["deadline_source"].as_str()),
        (Some("DeadlineExceeded"), Some("expired"))
    );
    assert_eq!(log["late"], false, "the proxy answered; no upstream work was wasted");
}

#[test]
fn upstream_answer_after_the_deadline_is_a_late_response() {
    let (host, mut vm) = vm_with("{}");
    let (s, action) = call_with_timeout(&mut vm, PATH, Some("100m"));
    cont(&vm, action);
    send(&mut vm, &s, &frames(&[3]));
    vm.advance_clock(Duration::from_millis(250));
    respond_headers(&mut vm, &s);
    respond_trailers(&mut vm, &s, 0);
    vm.finish(s);
    assert_eq!(counter(&host, "grpc_server_late_responses_total", GET, None), Some(1));
    assert_eq!(one_call_log(&mut vm)["late"], true);
}

#[test]
fn upstream_answer_within_the_deadline_is_not_late() {
    let (host, mut vm) = vm_with("{}");
    let (s, action) = call_with_timeout(&mut vm, PATH, Some("100m"));
    cont(&vm, action);
    vm.advance_clock(Duration::from_millis(50));
    finish_ok(&mut vm, s);
    assert_eq!(counter(&host, "grpc_server_late_responses_total", GET, None), None);
    assert_eq!(one_call_log(&mut vm)["late"], false);
}

#[test]
fn envoy_ending_the_call_at_its_deadline_counts_a_late_response() {
    let (host, mut vm) = vm_with("{}");
    let (s, action) = call_with_timeout(&mut vm, PATH, Some("100m"));
    cont(&vm, action);
    send(&mut vm, &s, &frames(&[3]));
    vm.advance_clock(Duration::from_millis(100));
    // Envoy's router answers trailers-only DEADLINE_EXCEEDED itself.
    vm.set_property(&s, &["response", "code_details"], b"max_duration_timeout");
    let action = vm.response_headers(
        &s,
        &[(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "4")],
        true,
    );
    cont(&vm, action);
    vm.finish(s);
    assert_eq!(counter(&host, "grpc_server_late_responses_total", GET, None), Some(1));
    let log = one_call_log(&mut vm);
    assert_eq!((log["grpc_code"].as_str(), log["late"].as_bool()), (Some("DeadlineExceeded"), Some(true)));
}

#[test]
fn upstream_answering_deadline_exceeded_itself_in_time_is_not_late() {
    let (host, mut vm) = vm_with("{}");
    let (s, action) = call_with_timeout(&mut vm, PATH, Some("100m"));
    cont(&vm, action);
    vm.set_property(&s, &["response", "code_details"], b"via_upstream");
    let action = vm.response_headers(
        &s,
        &[(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "4")],
        true,
    );
    cont(&vm, action);
    vm.finish(s);
    assert_eq!(counter(&host, "grpc_server_late_responses_total", GET, None), None);
}

#[test]
fn client_leaving_before_the_upstream_answered_counts_a_late_response() {
    let (host, mut vm) = vm_with("{}");
    let s = open(&mut vm, PATH, &[]);
    send(&mut vm, &s, &frames(&[3]));
    vm.set_property(&s, &["response", "code_details"], b"http2.remote_reset");
    vm.finish(s);
    assert_eq!(counter(&host, "grpc_server_late_responses_total", GET, None), Some(1));
    let log = one_call_log(&mut vm);
    assert_eq!((log["grpc_code"].as_str(), log["late"].as_bool()), (Some("Canceled"), Some(true)));
}

#[test]
fn request_message_over_the_limit_is_refused_before_the_upstream_sees_it() {
    let (host, mut vm) = vm_with(
        r#"{"limits":{"max_request_message_bytes":100,"per_method":{"pkg.Svc/Upload":{"max_request_message_bytes":1000}}}}"#,
    );
    let s = open(&mut vm, PATH, &[]);
    let action = vm.request_body(&s, &frames(&[101]), true);
    assert_eq!(action, Action::Pause, "the message must not be forwarded");
    let reply = vm.local_reply(&s).expect("a local reply");
    assert_eq!(reply.grpc_status, Some(8));
    let message = String::from_utf8_lossy(&reply.body);
    assert!(message.contains("101 bytes") && message.contains("limit of 100 bytes"), "{message}");
    vm.finish(s);
    assert_eq!(counter(&host, "grpc_server_request_too_large_total", GET, None), Some(1));
    assert_eq!(host.metrics().counter(&handled(GET, "ResourceExhausted")), Some(1));

    // At the limit passes; the per-method override allows more.
    unary(&mut vm, PATH, &[], 100, 1, 0);
    unary(&mut vm, "/pkg.Svc/Upload", &[], 1000, 1, 0);
}

#[test]
fn oversized_message_split_across_chunks_is_refused_when_its_prefix_arrives() {
    let (_host, mut vm) = vm_with(r#"{"limits":{"max_request_message_bytes":100}}"#);
    let s = open(&mut vm, PATH, &[]);
    let body = frames(&[500]);
    let action = vm.request_body(&s, &body[..3], false);
    cont(&vm, action);
    let action = vm.request_body(&s, &body[3..10], false);
    assert_eq!(action, Action::Pause);
    assert_eq!(vm.local_reply(&s).and_then(|r| r.grpc_status), Some(8));
}
