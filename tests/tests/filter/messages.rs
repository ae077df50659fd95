//! Message counting and sizes across arbitrary body chunking, streaming
//! methods, and request bodies that are not gRPC frames.

use grpc_guard_tests::host::{Action, LocalReply, Stream, Vm};

use crate::support::*;

/// Feeds `body` to the request (or response) side cut at `cuts` (offsets,
/// sorted, inside the body); the last chunk carries `end_of_stream`.
fn feed(vm: &mut Vm, s: &Stream, body: &[u8], cuts: &[usize], request: bool, end_of_stream: bool) {
    let mut bounds: Vec<usize> = cuts.to_vec();
    bounds.push(body.len());
    let mut start = 0;
    for (i, &end) in bounds.iter().enumerate() {
        let last = i + 1 == bounds.len();
        let chunk = &body[start..end];
        let action = if request {
            vm.request_body(s, chunk, last && end_of_stream)
        } else {
            vm.response_body(s, chunk, last && end_of_stream)
        };
        cont(vm, action);
        start = end;
    }
}

fn every_byte(body: &[u8]) -> Vec<usize> {
    (1..body.len()).collect()
}

#[test]
fn messages_and_sizes_are_counted_when_bodies_arrive_one_byte_at_a_time() {
    let (host, mut vm) = vm_with("{}");
    let request = frames(&[0, 7, 300]);
    let response = frames(&[5, 1000]);

    let s = open(&mut vm, PATH, &[]);
    feed(&mut vm, &s, &request, &every_byte(&request), true, true);
    respond_headers(&mut vm, &s);
    feed(&mut vm, &s, &response, &every_byte(&response), false, false);
    respond_trailers(&mut vm, &s, 0);
    vm.finish(s);

    let log = one_call_log(&mut vm);
    assert_eq!((log["req_msgs"].as_u64(), log["req_bytes"].as_u64()), (Some(3), Some(307)));
    assert_eq!((log["resp_msgs"].as_u64(), log["resp_bytes"].as_u64()), (Some(2), Some(1005)));
    let metrics = host.metrics();
    assert_eq!(metrics.counter(&stat("grpc_server_msg_received_total", GET, None)), Some(3));
    assert_eq!(metrics.counter(&stat("grpc_server_msg_sent_total", GET, None)), Some(2));
    assert_eq!(
        metrics.histogram(&stat("grpc_server_request_bytes", GET, None)),
        Some(vec![0, 7, 300]),
        "one sample per message, prefixes excluded"
    );
    assert_eq!(metrics.histogram(&stat("grpc_server_response_bytes", GET, None)), Some(vec![5, 1000]));
}

/// A fixed xorshift sequence: the same "random" chunkings in every run, so a
/// failure names a case that reproduces.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }

    fn sizes(&mut self) -> Vec<usize> {
        let count = self.below(6);
        (0..count).map(|_| if self.below(4) == 0 { self.below(70_000) } else { self.below(40) }).collect()
    }

    fn cuts(&mut self, len: usize) -> Vec<usize> {
        let mut cuts: Vec<usize> = (0..self.below(12)).map(|_| self.below(len + 1)).collect();
        cuts.sort_unstable();
        cuts
    }
}

#[test]
fn any_chunking_counts_the_same_messages_and_sizes() {
    let (host, mut vm) = vm_with("{}");
    let mut rng = Rng(0x5EED_0FC4_A5E5);
    let (mut all_req, mut all_resp) = (Vec::new(), Vec::new());
    for case in 0..32 {
        let (req_sizes, resp_sizes) = (rng.sizes(), rng.sizes());
        let (request, response) = (frames(&req_sizes), frames(&resp_sizes));
        let (req_cuts, resp_cuts) = (rng.cuts(request.len()), rng.cuts(response.len()));
        let what = format!(
            "case {case}: request {req_sizes:?} cut at {req_cuts:?}, response {resp_sizes:?} cut at {resp_cuts:?}"
        );

        let s = open(&mut vm, PATH, &[]);
        feed(&mut vm, &s, &request, &req_cuts, true, true);
        respond_headers(&mut vm, &s);
        feed(&mut vm, &s, &response, &resp_cuts, false, false);
        respond_trailers(&mut vm, &s, 0);
        vm.finish(s);

        let log = one_call_log(&mut vm);
        let sum = |sizes: &[usize]| sizes.iter().sum::<usize>() as u64;
        assert_eq!(log["req_msgs"].as_u64(), Some(req_sizes.len() as u64), "{what}");
        assert_eq!(log["req_bytes"].as_u64(), Some(sum(&req_sizes)), "{what}");
        assert_eq!(log["resp_msgs"].as_u64(), Some(resp_sizes.len() as u64), "{what}");
        assert_eq!(log["resp_bytes"].as_u64(), Some(sum(&resp_sizes)), "{what}");
        all_req.extend(req_sizes.iter().map(|&n| n as u64));
        all_resp.extend(resp_sizes.iter().map(|&n| n as u64));

        let metrics = host.metrics();
        let samples = |family: &str| metrics.histogram(&stat(family, GET, None)).unwrap_or_default();
        assert_eq!(samples("grpc_server_request_bytes"), all_req, "{what}");
        assert_eq!(samples("grpc_server_response_bytes"), all_resp, "{what}");
        let counter = |family: &str| metrics.counter(&stat(family, GET, None)).unwrap_or(0);
        assert_eq!(counter("grpc_server_msg_received_total"), all_req.len() as u64, "{what}");
        assert_eq!(counter("grpc_server_msg_sent_total"), all_resp.len() as u64, "{what}");
    }
}

#[test]
fn server_stream_method_counts_each_message_as_it_passes() {
    let (host, mut vm) = vm_with(r#"{"metrics":{"method_types":{"pkg.Svc/Watch":"server_stream"}}}"#);
    let watch = Labels { service: SERVICE, method: "Watch", grpc_type: "server_stream" };
    let sent = stat("grpc_server_msg_sent_total", watch, None);

    let s = open(&mut vm, "/pkg.Svc/Watch", &[]);
    send(&mut vm, &s, &frames(&[4]));
    assert_eq!(host.metrics().counter(&stat("grpc_server_started_total", watch, None)), Some(1));
    assert_eq!(host.metrics().counter(&stat("grpc_server_msg_received_total", watch, None)), Some(1));
    respond_headers(&mut vm, &s);
    for n in 1..=3 {
        let action = vm.response_body(&s, &frames(&[10 * n]), false);
        cont(&vm, action);
        assert_eq!(host.metrics().counter(&sent), Some(n as u64), "a stream's messages are counted while it runs");
    }
    // Two messages in one chunk, then one split over two chunks.
    let action = vm.response_body(&s, &frames(&[1, 2]), false);
    cont(&vm, action);
    let last = frames(&[9]);
    let action = vm.response_body(&s, &last[..3], false);
    cont(&vm, action);
    let action = vm.response_body(&s, &last[3..], false);
    cont(&vm, action);
    respond_trailers(&mut vm, &s, 0);
    vm.finish(s);

    let metrics = host.metrics();
    assert_eq!(metrics.counter(&sent), Some(6));
    assert_eq!(metrics.counter(&stat("grpc_server_msg_received_total", watch, None)), Some(1));
    assert_eq!(metrics.counter(&stat("grpc_server_handled_total", watch, Some("OK"))), Some(1));
    assert_eq!(metrics.histogram(&stat("grpc_server_response_bytes", watch, None)), Some(vec![10, 20, 30, 1, 2, 9]));
    let log = one_call_log(&mut vm);
    assert_eq!(log["grpc_type"], "server_stream");
    assert_eq!(log["resp_msgs"], 6);
}

/// The reply's value of `name`: from the headers the filter passed, else
/// from what Envoy derives (`grpc_status` and the body as `grpc-message`).
fn reply_value(reply: &LocalReply, name: &str) -> Option<String> {
    let passed = reply.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    passed.or_else(|| match name {
        "grpc-status" => reply.grpc_status.map(|code| code.to_string()),
        "grpc-message" => Some(String::from_utf8_lossy(&reply.body).into_owned()).filter(|m| !m.is_empty()),
        _ => None,
    })
}

const NOT_FRAMES: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

#[test]
fn request_body_that_is_not_grpc_frames_is_answered_internal_before_the_upstream() {
    let (host, mut vm) = vm_with("{}");
    let s = open(&mut vm, PATH, &[]);
    let action = vm.request_body(&s, NOT_FRAMES, true);
    assert_eq!(action, Action::Pause, "the request must not reach the upstream; trap: {:?}", vm.trapped());

    let reply = vm.local_reply(&s).expect("the filter answers the client itself");
    assert_eq!(reply.http_status, 200, "gRPC errors travel as HTTP 200");
    assert_eq!(reply_value(&reply, "grpc-status").as_deref(), Some("13"), "INTERNAL: {reply:?}");
    let message = reply_value(&reply, "grpc-message").unwrap_or_default();
    assert!(message.contains("not gRPC") && message.contains("0x47"), "a readable reason: {message:?}");
    assert_eq!(host.metrics().counter("grpc_guard_bad_frames_total"), Some(1));

    vm.finish(s);
    assert_eq!(vm.trapped(), None);
    assert_eq!(call_logs(&mut vm).len(), 1, "the refused call is logged");
}

#[test]
fn client_log_and_metric_see_internal_for_a_request_body_that_is_not_grpc_frames() {
    let (host, mut vm) = vm_with("{}");
    let s = open(&mut vm, PATH, &[]);
    let action = vm.request_body(&s, NOT_FRAMES, true);
    assert_eq!(action, Action::Pause);
    let headers = vm.response_headers_now(&s);
    let statuses: Vec<&str> = headers.iter().filter(|(k, _)| k == "grpc-status").map(|(_, v)| v.as_str()).collect();
    assert_eq!(statuses, ["13"], "the client sees exactly one grpc-status, INTERNAL: {headers:?}");

    vm.finish(s);
    let log = one_call_log(&mut vm);
    assert_eq!(log["grpc_code"], "Internal");
    assert_eq!(log["grpc_status"], 13);
    assert_eq!(host.metrics().counter(&handled(GET, "Internal")), Some(1));
}
