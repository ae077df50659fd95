//! Idempotency keys (DESIGN §3.5) on the wasm host: a keyed call runs
//! upstream once, its retry is sent to the replay hop and gets the first
//! answer back, and every other branch answers or forwards as documented.
//!
//! "Runs upstream" here means the request goes on with its gRPC content type
//! and without the replay mark; a marked retry goes to the internal listener,
//! whose plain 200 this file plays back the way Envoy delivers it.

use std::time::Duration;

use grpc_guard_tests::host::{Action, Host, Stream, Vm};

use crate::support::*;

const CREATE: &str = "/pkg.Orders/Create";
const ORDERS: Labels<'static> = Labels { service: "pkg.Orders", method: "Create", grpc_type: "unary" };
const DEDUP: &str = r#"{"dedup":{"methods":["pkg.Orders/Create"]}}"#;

const KEY_HEADER: &str = "idempotency-key";
/// The filter-state mark that sends a retry to the replay route.
const REPLAY_PROPERTY: &[&str] = &["grpc_guard.replay"];
const REPLAY_CONTENT_TYPE: &str = "application/x-grpc-guard-replay";
/// What the internal listener of `envoy/envoy.yaml` answers every marked retry.
const PLACEHOLDER: &[u8] = b"grpc-guard replay";

fn value(headers: &[(String, String)], name: &str) -> Option<String> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

fn dedup_counter(host: &Host, outcome: &str) -> Option<u64> {
    host.metrics().counter(&stat(&format!("grpc_server_dedup_{outcome}_total"), ORDERS, None))
}

/// The request went on as the client sent it: gRPC, not marked for replay.
#[track_caller]
fn assert_forwarded_upstream(vm: &Vm, s: &Stream) {
    let headers = vm.request_headers_now(s);
    assert_eq!(value(&headers, "content-type").as_deref(), Some("application/grpc"), "{headers:?}");
    assert_eq!(vm.stream_property(s, REPLAY_PROPERTY), None, "not marked for the replay route");
}

/// The request goes to the replay hop, never upstream.
#[track_caller]
fn assert_sent_to_replay_hop(vm: &Vm, s: &Stream) {
    let headers = vm.request_headers_now(s);
    assert_eq!(value(&headers, "content-type").as_deref(), Some(REPLAY_CONTENT_TYPE), "{headers:?}");
    assert_eq!(vm.stream_property(s, REPLAY_PROPERTY).as_deref(), Some(&b"1"[..]), "marked for the replay route");
}

/// The mTLS peer every call here comes from, unless a test says otherwise.
const PEER: &[u8] = b"spiffe://cluster.local/ns/shop/sa/web";

/// A new stream from the mTLS peer [`PEER`], whose request (once forwarded)
/// is carried by an upstream connection.
fn new_call_stream(vm: &mut Vm) -> Stream {
    let s = upstream_stream(vm);
    vm.set_property(&s, &["source", "principal"], PEER);
    s
}

/// Request headers of a call to `CreateOrder` carrying `extra`, not ending the
/// request; returns the stream and what the filter did.
fn start_call(vm: &mut Vm, extra: &[(&str, &str)]) -> (Stream, Action) {
    let s = new_call_stream(vm);
    let action = vm.request_headers(&s, &grpc_headers(CREATE, extra), false);
    (s, action)
}

/// The local reply's gRPC status and message.
#[track_caller]
fn local_reply(vm: &Vm, s: &Stream) -> (Option<i32>, String) {
    let reply = vm.local_reply(s).expect("the proxy answers the call itself");
    (reply.grpc_status, String::from_utf8_lossy(&reply.body).into_owned())
}

/// The first call's answer as the upstream sent it.
struct Upstream<'a> {
    body: &'a [u8],
    trailers: &'a [(&'a str, &'a str)],
}

const OK_TRAILERS: &[(&str, &str)] = &[("grpc-status", "0"), ("grpc-message", ""), ("x-order-id", "o-17")];

/// A whole call with `extra` headers and `request` as its body, answered by
/// the upstream with `answer`. Asserts it ran upstream.
fn first_call(vm: &mut Vm, extra: &[(&str, &str)], request: &[u8], answer: &Upstream<'_>) {
    let (s, action) = start_call(vm, extra);
    cont(vm, action);
    assert_forwarded_upstream(vm, &s);
    send(vm, &s, request);
    respond_headers(vm, &s);
    let action = vm.response_body(&s, answer.body, false);
    cont(vm, action);
    let action = vm.response_trailers(&s, answer.trailers);
    cont(vm, action);
    vm.finish(s);
    assert_eq!(vm.trapped(), None);
}

/// The internal listener's answer to a marked retry: a plain 200 whose body
/// arrives whole, or (`split`) followed by an empty end-of-stream chunk.
fn internal_listener_answers(vm: &mut Vm, s: &Stream, split: bool) {
    let headers = [(":status", "200"), ("content-type", "text/plain"), ("content-length", "17")];
    let action = vm.response_headers(s, &headers, false);
    cont(vm, action);
    if split {
        let action = vm.response_body(s, PLACEHOLDER, false);
        assert_eq!(action, Action::Pause, "the placeholder is held until the kept answer replaces it");
        let action = vm.response_body(s, b"", true);
        cont(vm, action);
    } else {
        let action = vm.response_body(s, PLACEHOLDER, true);
        cont(vm, action);
    }
}

fn strings(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

#[test]
fn retry_of_a_finished_call_runs_once_and_gets_the_identical_answer_through_the_replay_hop() {
    for split in [false, true] {
        let (host, mut vm) = vm_with(DEDUP);
        let request = frames(&[40]);
        let response = frame(b"order o-17 created at 12:00");
        first_call(&mut vm, &[(KEY_HEADER, "order-1")], &request, &Upstream { body: &response, trailers: OK_TRAILERS });
        assert_eq!(one_call_log(&mut vm)["dedup"], "first");

        let (s, action) = start_call(&mut vm, &[(KEY_HEADER, "order-1")]);
        cont(&vm, action);
        assert_sent_to_replay_hop(&vm, &s);
        // The body is fingerprinted as it passes and emptied: no byte
        // reaches even the replay hop, which answers only at the end.
        let action = vm.request_body(&s, &request[..10], false);
        cont(&vm, action);
        assert_eq!(vm.request_body_now(&s), b"");
        let action = vm.request_body(&s, &request[10..], true);
        cont(&vm, action);
        assert_eq!(vm.request_body_now(&s), b"");
        internal_listener_answers(&mut vm, &s, split);

        assert_eq!(vm.local_reply(&s), None);
        let headers = vm.response_headers_now(&s);
        assert_eq!(value(&headers, ":status").as_deref(), Some("200"));
        assert_eq!(value(&headers, "content-type").as_deref(), Some("application/grpc"), "{headers:?}");
        assert_eq!(value(&headers, "content-length"), None, "the placeholder's length must not survive");
        assert_eq!(value(&headers, "grpc-guard-replayed").as_deref(), Some("true"));
        assert_eq!(vm.response_body_now(&s), response, "split: {split}");
        assert_eq!(vm.response_trailers_now(&s), strings(OK_TRAILERS), "split: {split}");
        vm.finish(s);
        assert_eq!(vm.trapped(), None);

        let log = one_call_log(&mut vm);
        assert_eq!((log["dedup"].as_str(), log["grpc_code"].as_str()), (Some("replay"), Some("OK")));
        assert_eq!(log["resp_bytes"], response.len() as u64 - 5, "the replayed message is counted");
        assert_eq!(dedup_counter(&host, "first"), Some(1));
        assert_eq!(dedup_counter(&host, "replayed"), Some(1));
        assert_eq!(host.metrics().counter(&handled(ORDERS, "OK")), Some(2));
    }
}

#[test]
fn retry_while_the_first_call_is_in_flight_is_aborted() {
    let (host, mut vm) = vm_with(DEDUP);
    let (first, action) = start_call(&mut vm, &[(KEY_HEADER, "pay-1")]);
    cont(&vm, action);
    send(&mut vm, &first, &frames(&[8]));

    let (retry, action) = start_call(&mut vm, &[(KEY_HEADER, "pay-1")]);
    assert_eq!(action, Action::Pause, "the duplicate must not go upstream");
    let (code, message) = local_reply(&vm, &retry);
    assert_eq!(code, Some(10));
    assert!(message.contains("in progress; retry"), "{message}");
    vm.finish(retry);
    let log = one_call_log(&mut vm);
    assert_eq!((log["dedup"].as_str(), log["grpc_code"].as_str()), (Some("in_flight"), Some("Aborted")));
    assert_eq!(dedup_counter(&host, "in_flight"), Some(1));
    assert_eq!(host.metrics().counter(&handled(ORDERS, "Aborted")), Some(1));
}

#[test]
fn retry_on_another_worker_while_the_first_call_is_in_flight_is_aborted_too() {
    let host = host();
    let mut worker_a = start(&host, DEDUP);
    let mut worker_b = start(&host, DEDUP);
    let (first, action) = start_call(&mut worker_a, &[(KEY_HEADER, "pay-1")]);
    cont(&worker_a, action);

    let (retry, action) = start_call(&mut worker_b, &[(KEY_HEADER, "pay-1")]);
    assert_eq!(action, Action::Pause);
    assert_eq!(local_reply(&worker_b, &retry).0, Some(10));
    assert_eq!(dedup_counter(&host, "in_flight"), Some(1));

    // Once the first call's OK is kept, the other worker replays it.
    send(&mut worker_a, &first, &frames(&[8]));
    respond_headers(&mut worker_a, &first);
    let action = worker_a.response_body(&first, &frames(&[3]), false);
    cont(&worker_a, action);
    respond_trailers(&mut worker_a, &first, 0);
    worker_a.finish(first);
    let (again, action) = start_call(&mut worker_b, &[(KEY_HEADER, "pay-1")]);
    cont(&worker_b, action);
    assert_sent_to_replay_hop(&worker_b, &again);
}

#[test]
fn same_key_with_a_different_request_is_invalid_argument() {
    let (host, mut vm) = vm_with(DEDUP);
    let answer = Upstream { body: &frames(&[3]), trailers: OK_TRAILERS };
    first_call(&mut vm, &[(KEY_HEADER, "k")], &frame(b"create order 1"), &answer);
    call_logs(&mut vm);

    let (s, action) = start_call(&mut vm, &[(KEY_HEADER, "k")]);
    cont(&vm, action);
    assert_eq!(vm.request_body(&s, &frame(b"create order 2"), true), Action::Pause);
    let (code, message) = local_reply(&vm, &s);
    assert_eq!((code, message.as_str()), (Some(3), "grpc-guard: idempotency key reused with a different request"));
    let headers = vm.response_headers_now(&s);
    assert_eq!(value(&headers, "grpc-status").as_deref(), Some("3"), "a gRPC client gets a gRPC answer: {headers:?}");
    assert_eq!(value(&headers, "grpc-guard-replayed"), None);
    vm.finish(s);
    let log = one_call_log(&mut vm);
    assert_eq!((log["dedup"].as_str(), log["grpc_code"].as_str()), (Some("mismatch"), Some("InvalidArgument")));
    assert_eq!(dedup_counter(&host, "mismatch"), Some(1));
    assert_eq!(dedup_counter(&host, "replayed"), None);
}

#[test]
fn kept_deterministic_error_is_replayed_as_a_local_reply_marked_replayed() {
    // Trailers-only, as most servers send an error, and in trailers after headers.
    let (host, mut vm) = vm_with(DEDUP);
    let request = frame(b"get order 9");
    let (s, action) = start_call(&mut vm, &[(KEY_HEADER, "k-404")]);
    cont(&vm, action);
    send(&mut vm, &s, &request);
    let trailers_only = [
        (":status", "200"),
        ("content-type", "application/grpc"),
        ("grpc-status", "5"),
        ("grpc-message", "no order 9"),
    ];
    let action = vm.response_headers(&s, &trailers_only, true);
    cont(&vm, action);
    vm.finish(s);

    let answer = Upstream { body: b"", trailers: &[("grpc-status", "9"), ("grpc-message", "order is closed")] };
    first_call(&mut vm, &[(KEY_HEADER, "k-closed")], &request, &answer);
    call_logs(&mut vm);

    for (key, code, message, go_name) in
        [("k-404", 5, "no order 9", "NotFound"), ("k-closed", 9, "order is closed", "FailedPrecondition")]
    {
        let (s, action) = start_call(&mut vm, &[(KEY_HEADER, key)]);
        cont(&vm, action);
        assert_eq!(vm.request_body(&s, &request, true), Action::Pause, "{key}: answered by the proxy");
        let headers = vm.response_headers_now(&s);
        assert_eq!(value(&headers, ":status").as_deref(), Some("200"));
        assert_eq!(value(&headers, "content-type").as_deref(), Some("application/grpc"));
        assert_eq!(value(&headers, "grpc-status"), Some(code.to_string()), "{key}: {headers:?}");
        assert_eq!(value(&headers, "grpc-message").as_deref(), Some(message));
        assert_eq!(value(&headers, "grpc-guard-replayed").as_deref(), Some("true"));
        vm.finish(s);
        let log = one_call_log(&mut vm);
        assert_eq!((log["dedup"].as_str(), log["grpc_code"].as_str()), (Some("replay"), Some(go_name)));
    }
    assert_eq!(dedup_counter(&host, "first"), Some(2));
    assert_eq!(dedup_counter(&host, "replayed"), Some(2));
    assert_eq!(host.metrics().counter(&handled(ORDERS, "NotFound")), Some(2));
}

#[test]
fn transient_failure_releases_the_key_and_the_retry_runs_again() {
    let (host, mut vm) = vm_with(DEDUP);
    let request = frames(&[8]);
    let unavailable = Upstream { body: b"", trailers: &[("grpc-status", "14"), ("grpc-message", "overloaded")] };
    first_call(&mut vm, &[(KEY_HEADER, "k")], &request, &unavailable);
    first_call(&mut vm, &[(KEY_HEADER, "k")], &request, &unavailable);
    let logs = call_logs(&mut vm);
    let outcomes: Vec<&str> = logs.iter().filter_map(|l| l["dedup"].as_str()).collect();
    assert_eq!(outcomes, ["first", "first"]);
    assert_eq!(dedup_counter(&host, "first"), Some(2));
}

#[test]
fn a_reset_after_the_request_went_upstream_keeps_the_key_and_the_retry_is_told_it_may_have_run() {
    let (host, mut vm) = vm_with(DEDUP);
    let (s, action) = start_call(&mut vm, &[(KEY_HEADER, "k")]);
    cont(&vm, action);
    send(&mut vm, &s, &frames(&[8]));
    respond_headers(&mut vm, &s);
    vm.set_property(&s, &["response", "code_details"], b"upstream_reset_after_response_started{remote_reset}");
    vm.finish(s);
    assert_eq!(one_call_log(&mut vm)["grpc_code"], "Unavailable");

    let (s, action) = start_call(&mut vm, &[(KEY_HEADER, "k")]);
    cont(&vm, action);
    assert_sent_to_replay_hop(&vm, &s);
    assert_eq!(vm.request_body(&s, &frames(&[8]), true), Action::Pause, "never run again");
    let (code, message) = local_reply(&vm, &s);
    assert_eq!(code, Some(9), "FAILED_PRECONDITION: {message}");
    assert!(message.contains("may have run"), "{message}");
    vm.finish(s);
    let log = one_call_log(&mut vm);
    assert_eq!((log["dedup"].as_str(), log["grpc_code"].as_str()), (Some("unknown"), Some("FailedPrecondition")));
    assert_eq!(dedup_counter(&host, "unknown"), Some(1));
    assert_eq!(dedup_counter(&host, "first"), Some(1));
}

#[test]
fn a_call_that_never_reached_an_upstream_frees_its_key() {
    let (host, mut vm) = vm_with(DEDUP);
    let (s, action) = start_call(&mut vm, &[(KEY_HEADER, "k")]);
    cont(&vm, action);
    send(&mut vm, &s, &frames(&[8]));
    // Connection refused: Envoy answers UNAVAILABLE, and no upstream
    // connection ever carried the request.
    vm.set_property(&s, &["upstream", "local_address"], b"");
    vm.set_property(
        &s,
        &["response", "code_details"],
        b"upstream_reset_before_response_started{remote_connection_failure}",
    );
    let action = vm.response_headers(&s, &[(":status", "200"), ("grpc-status", "14")], true);
    cont(&vm, action);
    vm.finish(s);
    let answer = Upstream { body: &frames(&[3]), trailers: OK_TRAILERS };
    first_call(&mut vm, &[(KEY_HEADER, "k")], &frames(&[8]), &answer);
    assert_eq!(dedup_counter(&host, "first"), Some(2));
}

#[test]
fn answer_over_max_response_bytes_is_not_kept_and_the_retry_gets_already_exists() {
    let (host, mut vm) = vm_with(r#"{"dedup":{"methods":["pkg.Orders/Create"],"max_response_bytes":100}}"#);
    let request = frames(&[8]);
    let big = frames(&[96]);
    assert_eq!(big.len(), 101);
    first_call(&mut vm, &[(KEY_HEADER, "k")], &request, &Upstream { body: &big, trailers: OK_TRAILERS });
    let log = one_call_log(&mut vm);
    assert_eq!((log["dedup"].as_str(), log["grpc_code"].as_str()), (Some("not_kept"), Some("OK")));

    let (s, action) = start_call(&mut vm, &[(KEY_HEADER, "k")]);
    cont(&vm, action);
    assert_eq!(vm.request_body(&s, &request, true), Action::Pause, "never a second execution");
    let (code, message) = local_reply(&vm, &s);
    assert_eq!(code, Some(6));
    assert!(message.contains("already ran") && message.contains("too large to keep"), "{message}");
    vm.finish(s);
    assert_eq!(one_call_log(&mut vm)["dedup"], "not_kept");
    assert_eq!(dedup_counter(&host, "not_kept"), Some(1));
    assert_eq!(host.metrics().counter(&handled(ORDERS, "AlreadyExists")), Some(1));

    // At the limit the answer is kept.
    let exact = frames(&[95]);
    first_call(&mut vm, &[(KEY_HEADER, "k2")], &request, &Upstream { body: &exact, trailers: OK_TRAILERS });
    let (s, action) = start_call(&mut vm, &[(KEY_HEADER, "k2")]);
    cont(&vm, action);
    send(&mut vm, &s, &request);
    internal_listener_answers(&mut vm, &s, false);
    assert_eq!(vm.response_body_now(&s), exact);
}

#[test]
fn missing_key_is_invalid_argument_when_the_key_is_required() {
    let (host, mut vm) = vm_with(r#"{"dedup":{"methods":["pkg.Orders/Create"],"require_key":true}}"#);
    let (s, action) = start_call(&mut vm, &[]);
    assert_eq!(action, Action::Pause);
    let (code, message) = local_reply(&vm, &s);
    assert_eq!(code, Some(3));
    assert_eq!(message, "grpc-guard: idempotency key header idempotency-key is required for this method and missing");
    vm.finish(s);
    let log = one_call_log(&mut vm);
    assert_eq!((log["dedup"].as_str(), log["grpc_code"].as_str()), (Some("bad_key"), Some("InvalidArgument")));
    assert_eq!(dedup_counter(&host, "key_rejected"), Some(1));
}

#[test]
fn malformed_keys_are_invalid_argument_naming_the_header() {
    let (host, mut vm) = vm_with(DEDUP);
    let long = "k".repeat(256);
    let cases = [
        ("", "is empty"),
        (long.as_str(), "is 256 bytes; at most 255"),
        ("a b", "printable"),
        ("a\u{1}b", "printable"),
    ];
    for (key, why) in cases {
        let (s, action) = start_call(&mut vm, &[(KEY_HEADER, key)]);
        assert_eq!(action, Action::Pause, "{key:?}");
        let (code, message) = local_reply(&vm, &s);
        assert_eq!(code, Some(3), "{key:?}");
        assert!(message.contains("idempotency key header idempotency-key") && message.contains(why), "{message}");
        vm.finish(s);
        assert_eq!(one_call_log(&mut vm)["dedup"], "bad_key");
    }
    assert_eq!(dedup_counter(&host, "key_rejected"), Some(4));

    // 255 printable bytes are a key.
    let (s, action) = start_call(&mut vm, &[(KEY_HEADER, &"k".repeat(255))]);
    cont(&vm, action);
    assert_forwarded_upstream(&vm, &s);
    assert_eq!(dedup_counter(&host, "first"), Some(1));
}

#[test]
fn call_without_a_key_is_forwarded_undeduplicated_when_no_key_is_required() {
    let (host, mut vm) = vm_with(DEDUP);
    let answer = Upstream { body: &frames(&[3]), trailers: OK_TRAILERS };
    first_call(&mut vm, &[], &frames(&[8]), &answer);
    first_call(&mut vm, &[], &frames(&[8]), &answer);
    let logs = call_logs(&mut vm);
    assert!(logs.iter().all(|l| l["dedup"] == "none"), "{logs:#?}");
    assert_eq!(dedup_counter(&host, "first"), None);
}

#[test]
fn a_client_cannot_mark_its_own_request_for_the_replay_route() {
    for config in ["{}", DEDUP] {
        let (_host, mut vm) = vm_with(config);
        for extra in [vec![("x-grpc-guard-replay", "1"), (KEY_HEADER, "k")], vec![("x-grpc-guard-replay", "1")]] {
            let (s, action) = start_call(&mut vm, &extra);
            cont(&vm, action);
            assert_forwarded_upstream(&vm, &s);
        }
    }
}

#[test]
fn kept_answer_expires_after_the_ttl_and_the_call_runs_again() {
    let (host, mut vm) = vm_with(r#"{"dedup":{"methods":["pkg.Orders/Create"],"ttl":"1s"}}"#);
    let answer = Upstream { body: &frames(&[3]), trailers: OK_TRAILERS };
    first_call(&mut vm, &[(KEY_HEADER, "k")], &frames(&[8]), &answer);

    vm.advance_clock(Duration::from_millis(999));
    let (s, action) = start_call(&mut vm, &[(KEY_HEADER, "k")]);
    cont(&vm, action);
    assert_sent_to_replay_hop(&vm, &s);
    vm.finish(s);

    vm.advance_clock(Duration::from_millis(1));
    first_call(&mut vm, &[(KEY_HEADER, "k")], &frames(&[8]), &answer);
    assert_eq!(dedup_counter(&host, "first"), Some(2));
    assert_eq!(dedup_counter(&host, "evicted"), None, "its own expired entry is not an eviction");
}

#[test]
fn key_of_a_stream_that_never_finished_counts_as_may_have_run_until_the_ttl() {
    let (host, mut vm) = vm_with(r#"{"dedup":{"methods":["pkg.Orders/Create"],"ttl":"60s"}}"#);
    let (stuck, action) = start_call(&mut vm, &[(KEY_HEADER, "k"), ("grpc-timeout", "2S")]);
    cont(&vm, action);
    send(&mut vm, &stuck, &frames(&[8]));

    vm.advance_clock(Duration::from_millis(2999));
    let (early, action) = start_call(&mut vm, &[(KEY_HEADER, "k")]);
    assert_eq!(action, Action::Pause);
    assert_eq!(local_reply(&vm, &early).0, Some(10), "still in flight within its deadline and a grace second");

    vm.advance_clock(Duration::from_millis(1));
    let (after, action) = start_call(&mut vm, &[(KEY_HEADER, "k")]);
    assert_eq!(action, Action::Pause, "its stream vanished unsettled: it may have run");
    assert_eq!(local_reply(&vm, &after).0, Some(9));

    // Its claim ran out at 3 s; it counts as "may have run" for the TTL after.
    vm.advance_clock(Duration::from_millis(59_999));
    let (still, action) = start_call(&mut vm, &[(KEY_HEADER, "k")]);
    assert_eq!(action, Action::Pause);
    assert_eq!(local_reply(&vm, &still).0, Some(9));
    vm.advance_clock(Duration::from_millis(1));
    let (fresh, action) = start_call(&mut vm, &[(KEY_HEADER, "k")]);
    cont(&vm, action);
    assert_forwarded_upstream(&vm, &fresh);
    assert_eq!(dedup_counter(&host, "first"), Some(2));

    // The stuck stream finishing late must not settle the new owner's key.
    respond_headers(&mut vm, &stuck);
    respond_trailers(&mut vm, &stuck, 0);
    vm.finish(stuck);
    let (third, action) = start_call(&mut vm, &[(KEY_HEADER, "k")]);
    assert_eq!(action, Action::Pause);
    assert_eq!(local_reply(&vm, &third).0, Some(10), "the fresh call still owns the key");
}

#[test]
fn full_table_rejects_new_keys_with_resource_exhausted_when_told_to() {
    let config = r#"{"dedup":{"methods":["pkg.Orders/Create"],"max_entries":8,"caller_share":1,"when_full":"reject"}}"#;
    let (host, mut vm) = vm_with(config);
    for key in ["a", "b", "c1", "d", "e", "f", "g", "h"] {
        let (_s, action) = start_call(&mut vm, &[(KEY_HEADER, key), ("grpc-timeout", "1S")]);
        cont(&vm, action);
    }
    let (s, action) = start_call(&mut vm, &[(KEY_HEADER, "c")]);
    assert_eq!(action, Action::Pause);
    let (code, message) = local_reply(&vm, &s);
    assert_eq!(code, Some(8));
    assert!(message.contains("idempotency table is full"), "{message}");
    vm.finish(s);
    let log = one_call_log(&mut vm);
    assert_eq!((log["dedup"].as_str(), log["grpc_code"].as_str()), (Some("full"), Some("ResourceExhausted")));
    assert_eq!(dedup_counter(&host, "full"), Some(1));

    // Expired records make room again, counted as evictions: these claims
    // ran out at 2 s (deadline and a grace second) and expire a TTL later.
    vm.advance_clock(Duration::from_secs(302));
    let (s, action) = start_call(&mut vm, &[(KEY_HEADER, "c")]);
    cont(&vm, action);
    assert_forwarded_upstream(&vm, &s);
    assert_eq!(dedup_counter(&host, "evicted"), Some(1));
}

#[test]
fn full_table_forwards_new_keys_undeduplicated_when_told_to() {
    let config =
        r#"{"dedup":{"methods":["pkg.Orders/Create"],"max_entries":8,"caller_share":1,"when_full":"forward"}}"#;
    let (host, mut vm) = vm_with(config);
    for key in ["a", "b", "c1", "d", "e", "f", "g", "h"] {
        let (_s, action) = start_call(&mut vm, &[(KEY_HEADER, key)]);
        cont(&vm, action);
    }
    let answer = Upstream { body: &frames(&[3]), trailers: OK_TRAILERS };
    first_call(&mut vm, &[(KEY_HEADER, "c")], &frames(&[8]), &answer);
    first_call(&mut vm, &[(KEY_HEADER, "c")], &frames(&[8]), &answer);
    let logs = call_logs(&mut vm);
    let outcomes: Vec<&str> = logs.iter().filter_map(|l| l["dedup"].as_str()).collect();
    assert_eq!(outcomes, ["full", "full"], "both ran upstream, neither was kept");
    assert_eq!(dedup_counter(&host, "full"), Some(2));
    assert_eq!(dedup_counter(&host, "first"), Some(8), "only the eight that filled the table");
}

#[test]
fn two_tenants_with_the_same_key_and_request_each_run() {
    let (host, mut vm) = vm_with(DEDUP);
    let answer = Upstream { body: &frames(&[3]), trailers: OK_TRAILERS };
    for tenant in ["Bearer tenant-a", "Bearer tenant-b"] {
        first_call(&mut vm, &[(KEY_HEADER, "same"), ("authorization", tenant)], &frames(&[8]), &answer);
    }
    assert_eq!(dedup_counter(&host, "first"), Some(2));
    assert_eq!(dedup_counter(&host, "replayed"), None);

    // Each tenant's own retry is replayed.
    let (s, action) = start_call(&mut vm, &[(KEY_HEADER, "same"), ("authorization", "Bearer tenant-b")]);
    cont(&vm, action);
    assert_sent_to_replay_hop(&vm, &s);
}

/// The one kept answer in a table of one bucket.
fn only_answer(host: &Host) -> Vec<u8> {
    let answers: Vec<Vec<u8>> =
        (0..8).filter_map(|way| host.shared_data(&format!("grpc_guard.dedup.0.{way}"))).collect();
    assert_eq!(answers.len(), 1, "expected one kept answer");
    answers.into_iter().next().unwrap()
}

/// Bytes a kept OK answer costs beside its response body, with the header
/// `content-type: application/grpc` and the trailers `grpc-status: 0` and an
/// empty `grpc-message`: claim tag and status (12), three length prefixes
/// (12), and each of the three pairs with its two prefixes (36 + 20 + 20).
/// The index record (97 bytes, in the bucket) comes on top; both are within
/// `dedup::ENTRY_OVERHEAD` plus the metadata as `max_metadata_bytes` counts it.
const ANSWER_OVERHEAD: usize = 100;

#[test]
fn kept_answer_costs_its_response_body_plus_a_fixed_overhead_in_shared_data() {
    let kept = |pairs: &[(&str, &str)]| -> Vec<(String, Vec<u8>)> {
        pairs.iter().map(|(n, v)| ((*n).to_owned(), v.as_bytes().to_vec())).collect()
    };
    let trailers = [("grpc-status", "0"), ("grpc-message", "")];
    let metadata = grpc_guard::dedup::metadata_bytes(&kept(&[("content-type", "application/grpc")]))
        + grpc_guard::dedup::metadata_bytes(&kept(&trailers));
    let mut overheads = Vec::new();
    for n in [5, 1_000, 60_000] {
        let (host, mut vm) = vm_with(r#"{"dedup":{"methods":["pkg.Orders/Create"],"max_entries":8}}"#);
        let body = frames(&[n - 5]);
        assert_eq!(body.len(), n);
        first_call(&mut vm, &[(KEY_HEADER, "k")], &frames(&[8]), &Upstream { body: &body, trailers: &trailers });
        let answer = only_answer(&host).len();
        overheads.push(answer - n);
        let bucket = host.shared_data("grpc_guard.dedup.0").unwrap();
        assert_eq!(bucket.len(), 1 + 8 * 97, "one bucket: a format byte and eight 97-byte records");
        // What the configuration bounds, per entry: body + metadata (as
        // max_metadata_bytes counts it) + ENTRY_OVERHEAD covers the answer
        // and the entry's record.
        let bound = n + metadata + grpc_guard::dedup::ENTRY_OVERHEAD as usize;
        assert!(answer + 97 <= bound, "{answer} + 97 > {bound}");
    }
    eprintln!("shared data per kept answer: response body + {} bytes", overheads[0]);
    assert!(overheads.iter().all(|&o| o == ANSWER_OVERHEAD), "overhead per entry: {overheads:?}");
}

#[test]
fn a_retry_ending_with_its_headers_is_checked_there_and_a_bodyless_call_frees_its_key() {
    let (host, mut vm) = vm_with(DEDUP);
    // No message: no unary handler could run on it, the key is freed.
    let s = new_call_stream(&mut vm);
    let action = vm.request_headers(&s, &grpc_headers(CREATE, &[(KEY_HEADER, "k")]), true);
    cont(&vm, action);
    respond_headers(&mut vm, &s);
    respond_trailers(&mut vm, &s, 13);
    vm.finish(s);
    let answer = Upstream { body: &frames(&[3]), trailers: OK_TRAILERS };
    first_call(&mut vm, &[(KEY_HEADER, "k")], &frame(b"create order 1"), &answer);
    assert_eq!(dedup_counter(&host, "first"), Some(2));

    // A bodyless retry of it is another request, told so at its headers.
    let s = new_call_stream(&mut vm);
    let action = vm.request_headers(&s, &grpc_headers(CREATE, &[(KEY_HEADER, "k")]), true);
    assert_eq!(action, Action::Pause);
    let (code, _) = local_reply(&vm, &s);
    assert_eq!(code, Some(3));
    vm.finish(s);
    assert_eq!(dedup_counter(&host, "mismatch"), Some(1));
}

#[test]
fn failed_replay_hop_is_passed_on_unmarked_with_its_own_status() {
    let (host, mut vm) = vm_with(DEDUP);
    let answer = Upstream { body: &frames(&[3]), trailers: OK_TRAILERS };
    first_call(&mut vm, &[(KEY_HEADER, "k")], &frames(&[8]), &answer);
    call_logs(&mut vm);

    let (s, action) = start_call(&mut vm, &[(KEY_HEADER, "k")]);
    cont(&vm, action);
    send(&mut vm, &s, &frames(&[8]));
    // The internal listener is missing: Envoy answers the hop itself.
    vm.set_property(&s, &["response", "code_details"], b"no_healthy_upstream");
    let unavailable = [
        (":status", "200"),
        ("content-type", "application/grpc"),
        ("grpc-status", "14"),
        ("grpc-message", "no healthy upstream"),
    ];
    let action = vm.response_headers(&s, &unavailable, true);
    cont(&vm, action);
    let headers = vm.response_headers_now(&s);
    assert_eq!(value(&headers, "grpc-status").as_deref(), Some("14"));
    assert_eq!(value(&headers, "grpc-guard-replayed"), None, "nothing was replayed: {headers:?}");
    vm.finish(s);
    let log = one_call_log(&mut vm);
    assert_eq!((log["grpc_code"].as_str(), log["status_source"].as_str()), (Some("Unavailable"), Some("headers")));
    assert_eq!(host.metrics().counter(&handled(ORDERS, "Unavailable")), Some(1));
}
