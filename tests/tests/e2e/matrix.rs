//! The bad-input matrix (issue 17): what no well-behaved gRPC peer sends,
//! through a real Envoy with two workers. Malformed frames, odd headers,
//! answers a gRPC server never gives, resets and disconnects at every phase
//! of a call, load, and bad configuration values.
//!
//! Every case states, in its row: what the client gets, every grpc-guard
//! counter that changes (and by how much), the fields of the call's log line,
//! and how many times the upstream ran. After each case the runner also
//! checks that the filter's VM did not trap and that both workers still
//! answer ordinary tonic calls. Cases share one Envoy per kind of upstream
//! (the tonic demo service, a raw HTTP/2 upstream), and the runner reports
//! every case that fails, not just the first.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use grpc_guard_demo::envoy::{Envoy, EnvoyError};
use grpc_guard_demo::pb::{EchoReply, EchoRequest};
use hyper::body::Bytes;
use prost::Message as _;
use serde_json::{json, Value};

use crate::support::*;

const ECHO: &str = "/grpcguard.demo.v1.Demo/Echo";

/// Every call is logged (each row checks its log line; the liveness check
/// finds the worker from it), and Echo takes idempotency keys.
const CONFIG: &str = r#"{"log":{"ok_sample":1},"dedup":{"methods":["grpcguard.demo.v1.Demo/Echo"]}}"#;

/// How long a client waits before resetting, so Envoy has forwarded what
/// came before.
const SETTLE: Duration = Duration::from_millis(150);

/// What the client sends.
enum Send {
    H2(Request),
    /// An ordinary Echo request written byte by byte with these extra
    /// headers, for values no HTTP/2 library encodes (control bytes).
    Handwritten {
        headers: Vec<(&'static [u8], Vec<u8>)>,
    },
}

/// One HTTP/2 stream on a new connection to `path`: `headers`, each of
/// `frames` as its own DATA frame (`pace` apart), then `end`.
#[derive(Clone)]
struct Request {
    path: &'static str,
    headers: Vec<(&'static str, Vec<u8>)>,
    frames: Vec<Vec<u8>>,
    pace: Duration,
    end: End,
}

/// How a request stream ends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    /// END_STREAM on the last frame (an empty DATA frame without frames).
    Stream,
    /// RST_STREAM(CANCEL), [`SETTLE`] after the last frame.
    Reset,
    /// Never: the stream stays open until the answer comes.
    Open,
}

impl Request {
    /// An ordinary unary Echo call.
    fn echo() -> Request {
        Request {
            path: ECHO,
            headers: vec![("content-type", b"application/grpc".to_vec()), ("te", b"trailers".to_vec())],
            frames: vec![echo_frame("matrix")],
            pace: Duration::ZERO,
            end: End::Stream,
        }
    }

    /// Sets header `name` to `value` (replacing the ordinary one).
    fn header(self, name: &'static str, value: &[u8]) -> Request {
        self.headers(name, &[value])
    }

    /// Sends header `name` once per value, in order.
    fn headers(mut self, name: &'static str, values: &[&[u8]]) -> Request {
        self.headers.retain(|(n, _)| *n != name);
        self.headers.extend(values.iter().map(|v| (name, v.to_vec())));
        self
    }

    fn without(mut self, name: &str) -> Request {
        self.headers.retain(|(n, _)| *n != name);
        self
    }

    fn to(self, path: &'static str) -> Request {
        Request { path, ..self }
    }

    fn frames(self, frames: Vec<Vec<u8>>) -> Request {
        Request { frames, ..self }
    }

    fn paced(self, pace: Duration) -> Request {
        Request { pace, ..self }
    }

    fn end(self, end: End) -> Request {
        Request { end, ..self }
    }
}

impl From<Request> for Send {
    fn from(request: Request) -> Send {
        Send::H2(request)
    }
}

/// What the raw upstream does with a case's request, after reading it
/// whole.
#[derive(Clone)]
enum Script {
    /// RST_STREAM(INTERNAL_ERROR) before any response headers.
    ResetBeforeHeaders,
    /// Closes its TCP connection before any response headers.
    HangupBeforeHeaders,
    /// Response headers (after a `100 Continue` if `informational`), each
    /// of `frames` as a DATA frame, then `then`.
    Answer {
        informational: bool,
        status: u16,
        headers: &'static [(&'static str, &'static str)],
        frames: Vec<Vec<u8>>,
        then: Then,
    },
}

#[derive(Clone, Copy)]
enum Then {
    Trailers(&'static [(&'static str, &'static str)]),
    /// END_STREAM on the last frame (on the headers if there is none).
    End,
    /// RST_STREAM(INTERNAL_ERROR).
    Reset,
    /// Closes the TCP connection.
    Hangup,
}

const GRPC: &[(&str, &str)] = &[("content-type", "application/grpc")];

impl Script {
    /// An OK message, then these trailers.
    fn reply_then(trailers: &'static [(&'static str, &'static str)]) -> Script {
        Script::Answer {
            informational: false,
            status: 200,
            headers: GRPC,
            frames: vec![reply_frame()],
            then: Then::Trailers(trailers),
        }
    }

    /// HTTP `status` with no body and nothing else.
    fn http(status: u16) -> Script {
        Script::Answer { informational: false, status, headers: &[], frames: vec![], then: Then::End }
    }

    /// Response headers, then `frames`, then `then`.
    fn cut(frames: Vec<Vec<u8>>, then: Then) -> Script {
        Script::Answer { informational: false, status: 200, headers: GRPC, frames, then }
    }
}

/// One row of the matrix.
struct Case {
    name: &'static str,
    send: Send,
    /// What the raw upstream does (raw-upstream cases only).
    script: Option<Script>,
    /// What the client gets ([`RawAnswer::summary`]).
    got: &'static str,
    /// A piece of the `grpc-message` the client reads, where grpc-guard
    /// answers itself.
    message: Option<&'static str>,
    /// Every grpc-guard counter that changes ([`guard_counters`]).
    counted: &'static [&'static str],
    /// Fields of the call's one log line; empty: no line at all.
    log: Vec<(&'static str, Value)>,
    /// Times the upstream ran: the demo's Echo handler, or requests the raw
    /// upstream received (any method).
    runs: u64,
}

impl Case {
    fn new(name: &'static str, send: impl Into<Send>) -> Case {
        Case { name, send: send.into(), script: None, got: "", message: None, counted: &[], log: Vec::new(), runs: 0 }
    }
}

/// The counters of one unary Echo call that ended with `code`, one message
/// each way.
macro_rules! echo_counted {
    ($code:literal) => {
        &[concat!("handled{Echo,", $code, "} +1"), "msg_received{Echo} +1", "msg_sent{Echo} +1", "started{Echo} +1"]
    };
}

fn echo_frame(message: &str) -> Vec<u8> {
    grpc_frame(&EchoRequest { message: message.into(), ..Default::default() }.encode_to_vec())
}

fn reply_frame() -> Vec<u8> {
    grpc_frame(&EchoReply { message: "raw".into(), execution: 1 }.encode_to_vec())
}

/// A frame with flag byte `flag` around `message`.
fn flagged(flag: u8, message: &[u8]) -> Vec<u8> {
    let mut frame = grpc_frame(message);
    frame[0] = flag;
    frame
}

/// `bytes` as DATA frames: the 5-byte prefix one byte at a time, then
/// pieces of `piece` bytes.
fn split(bytes: &[u8], piece: usize) -> Vec<Vec<u8>> {
    let (prefix, rest) = bytes.split_at(5);
    prefix.chunks(1).chain(rest.chunks(piece)).map(<[u8]>::to_vec).collect()
}

/// `%XX` sequences of a `grpc-message` decoded (gRPC PROTOCOL-HTTP2).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], text.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends a case's request and tells what the client got: the summary and
/// the decoded `grpc-message`.
async fn send(addr: SocketAddr, case: &Case) -> (String, Option<String>) {
    match &case.send {
        Send::H2(Request { path, headers, frames, pace, end }) => {
            let mut headers = headers.clone();
            headers.push(("x-matrix-case", case.name.as_bytes().to_vec()));
            let mut call = h2_call(addr, path, &headers).await;
            for (i, frame) in frames.iter().enumerate() {
                if i > 0 && !pace.is_zero() {
                    tokio::time::sleep(*pace).await;
                }
                let last = i + 1 == frames.len() && *end == End::Stream;
                // An answer before the request's end closes the stream: the
                // rest is not sent.
                if call.body.send_data(Bytes::from(frame.clone()), last).is_err() {
                    break;
                }
            }
            match end {
                End::Stream if frames.is_empty() => call.body.send_data(Bytes::new(), true).unwrap(),
                End::Stream | End::Open => {}
                End::Reset => {
                    tokio::time::sleep(SETTLE).await;
                    call.body.send_reset(h2::Reason::CANCEL);
                }
            }
            match tokio::time::timeout(Duration::from_secs(10), call.answer).await {
                Ok(answer) => {
                    let answer = answer.unwrap();
                    (answer.summary(), answer.values("grpc-message").map(|m| percent_decode(&m)))
                }
                Err(_) => ("no answer in 10 s".to_owned(), None),
            }
        }
        Send::Handwritten { headers } => {
            let mut all: Vec<(&[u8], &[u8])> = vec![
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", ECHO.as_bytes()),
                (b":authority", b"matrix"),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
            ];
            all.extend(headers.iter().map(|(n, v)| (*n, v.as_slice())));
            let (outcome, _) = h2_handwritten(addr, &all, &echo_frame("x")).await;
            let got = match outcome {
                RawOutcome::Answered => "answered".to_owned(),
                RawOutcome::StreamReset(code) => format!("reset ({code})"),
                RawOutcome::ConnectionClosed => "connection closed".to_owned(),
            };
            (got, None)
        }
    }
}

/// A JSON value as the row writes it.
fn shown(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Runs one case on `envoy` and returns what was not as the row says.
/// `runs` reads the upstream's run count.
async fn run_case(envoy: &Envoy, case: &Case, runs: &(dyn Fn() -> u64 + Sync)) -> Vec<String> {
    let mut wrong = Vec::new();
    let counters_before = guard_counters(&parse_exposition(&envoy.prometheus().unwrap()));
    let logs_before = envoy.call_logs().len();
    let runs_before = runs();

    let (got, message) = send(envoy.params().listen_addr(), case).await;
    if got != case.got {
        wrong.push(format!("the client got {got:?}, not {:?}", case.got));
    }
    if let Some(want) = case.message {
        if !message.as_deref().is_some_and(|m| m.contains(want)) {
            wrong.push(format!("grpc-message {message:?} does not say {want:?}"));
        }
    }

    let mut expected: Vec<String> = case.counted.iter().map(|s| s.to_string()).collect();
    expected.sort();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let changes = loop {
        let after = guard_counters(&parse_exposition(&envoy.prometheus().unwrap()));
        let changes = counter_changes(&counters_before, &after);
        if changes == expected || tokio::time::Instant::now() > deadline {
            break changes;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    if changes != expected {
        wrong.push(format!("counters changed {changes:?}, not {expected:?}"));
    }

    let want_lines = usize::from(!case.log.is_empty());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let lines = loop {
        let lines = envoy.call_logs().split_off(logs_before);
        if lines.len() >= want_lines || tokio::time::Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if lines.len() != want_lines {
        wrong.push(format!("{} log lines, not {want_lines}: {lines:?}", lines.len()));
    } else if let Some(line) = lines.first() {
        // A panicking filter logs its message through the same marker.
        match serde_json::from_str::<Value>(line) {
            Ok(line) => {
                for (field, want) in &case.log {
                    if line[field] != *want {
                        wrong.push(format!("log {field} is {}, not {}", shown(&line[field]), shown(want)));
                    }
                }
            }
            Err(e) => wrong.push(format!("the log line is not JSON ({e}): {line}")),
        }
    }

    let ran = runs() - runs_before;
    if ran != case.runs {
        wrong.push(format!("the upstream ran {ran} times, not {}", case.runs));
    }
    let traps = vm_traps(envoy);
    if !traps.is_empty() {
        wrong.push(format!("the VM trapped: {traps:?}"));
    }
    if let Err(e) = workers_serve(envoy, case.name).await {
        wrong.push(e);
    }
    wrong
}

/// Runs every case, then fails listing every case that went wrong.
async fn run_matrix(envoy: &Envoy, cases: &[Case], runs: &(dyn Fn() -> u64 + Sync)) {
    let mut failures = Vec::new();
    for case in cases {
        let wrong = run_case(envoy, case, runs).await;
        if !wrong.is_empty() {
            failures.push(format!("{}:\n    {}", case.name, wrong.join("\n    ")));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases went wrong:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

/// Frames, headers and client resets, against the real tonic service.
fn cases_against_the_service() -> Vec<Case> {
    let echo = Request::echo;
    let long = echo_frame(&"x".repeat(600));
    vec![
        // Frames.
        Case {
            got: "HTTP 200, grpc-status 13",
            counted: &["handled{Echo,Internal} +1", "started{Echo} +1"],
            log: vec![("grpc_code", json!("Internal")), ("req_msgs", json!(0)), ("req_bytes", json!(0))],
            ..Case::new("the body ends inside a frame prefix", echo().frames(vec![vec![0, 0, 0]]))
        },
        Case {
            got: "HTTP 200, grpc-status 13",
            // The 100-byte message never arrived whole: not a message received.
            counted: &["handled{Echo,Internal} +1", "started{Echo} +1"],
            log: vec![("grpc_code", json!("Internal")), ("req_msgs", json!(0)), ("req_bytes", json!(0))],
            ..Case::new("a frame declares 100 bytes and the body ends after 10", {
                let mut frame = grpc_frame(&[b'x'; 100]);
                frame.truncate(15);
                echo().frames(vec![frame])
            })
        },
        Case {
            got: "HTTP 200, grpc-status 13",
            counted: &["handled{Echo,Internal} +1", "msg_received{Echo} +1", "started{Echo} +1"],
            log: vec![("grpc_code", json!("Internal")), ("status_source", json!("headers")), ("req_msgs", json!(1))],
            ..Case::new("a compressed flag without grpc-encoding", echo().frames(vec![flagged(1, b"\x0a\x01x")]))
        },
        Case {
            got: "HTTP 200, grpc-status 13",
            message: Some("request body is not gRPC: gRPC frame flag byte is 0x02"),
            counted: &["bad_frames +1", "handled{Echo,Internal} +1", "refused{Echo} +1", "started{Echo} +1"],
            log: vec![("grpc_code", json!("Internal")), ("status_source", json!("headers")), ("req_msgs", json!(0))],
            ..Case::new("flag byte 2", echo().frames(vec![flagged(2, b"\x0a\x01x")]))
        },
        Case {
            got: "HTTP 200, grpc-status 13",
            message: Some("flag byte is 0x47"),
            counted: &["bad_frames +1", "handled{Echo,Internal} +1", "refused{Echo} +1", "started{Echo} +1"],
            log: vec![("grpc_code", json!("Internal"))],
            ..Case::new("an HTTP/1 request as the body", echo().frames(vec![b"GET / HTTP/1.1\r\n\r\n".to_vec()]))
        },
        Case {
            got: "HTTP 200, grpc-status 0",
            counted: echo_counted!("OK"),
            log: vec![("grpc_code", json!("OK")), ("req_msgs", json!(1)), ("req_bytes", json!(0))],
            runs: 1,
            ..Case::new("a zero-length message", echo().frames(vec![grpc_frame(b"")]))
        },
        Case {
            got: "HTTP 200, grpc-status 0",
            counted: &[
                "handled{Collect,OK} +1",
                "msg_received{Collect} +3",
                "msg_sent{Collect} +1",
                "started{Collect} +1",
            ],
            log: vec![("grpc_code", json!("OK")), ("req_msgs", json!(3)), ("req_bytes", json!(0))],
            ..Case::new(
                "three zero-length messages to a client-streaming method",
                echo().to("/grpcguard.demo.v1.Demo/Collect").frames(vec![grpc_frame(b""); 3]),
            )
        },
        Case {
            got: "HTTP 200, grpc-status 0",
            counted: echo_counted!("OK"),
            log: vec![("grpc_code", json!("OK")), ("req_msgs", json!(1)), ("req_bytes", json!(long.len() - 5))],
            runs: 1,
            ..Case::new(
                "a message over 66 DATA frames, its prefix a byte each",
                echo().frames(split(&long, 10)).paced(Duration::from_millis(1)),
            )
        },
        // Headers.
        Case {
            got: "HTTP 200, grpc-status 3",
            message: Some("grpc-timeout"),
            counted: &[
                "deadline_rejected{Echo,InvalidArgument} +1",
                "handled{Echo,InvalidArgument} +1",
                "started{Echo} +1",
            ],
            log: vec![("grpc_code", json!("InvalidArgument")), ("deadline_source", json!("invalid"))],
            ..Case::new("grpc-timeout with a non-UTF-8 byte", echo().header("grpc-timeout", b"1\xffS"))
        },
        Case {
            // Envoy reads "1\tS" as 1 s (absl::SimpleAtoi skips the tab) and,
            // as the route honours grpc-timeout, writes it back as "1000m"
            // before any filter runs: the filter, like the upstream, sees a
            // well-formed value.
            got: "HTTP 200, grpc-status 0",
            counted: echo_counted!("OK"),
            log: vec![("grpc_code", json!("OK")), ("deadline_source", json!("client")), ("deadline_ms", json!(1000))],
            runs: 1,
            ..Case::new("grpc-timeout with a tab inside", echo().header("grpc-timeout", b"1\tS"))
        },
        Case {
            // Envoy joins the two values into one, "1S,100m".
            got: "HTTP 200, grpc-status 3",
            message: Some("grpc-timeout header \"1S,100m\""),
            counted: &[
                "deadline_rejected{Echo,InvalidArgument} +1",
                "handled{Echo,InvalidArgument} +1",
                "started{Echo} +1",
            ],
            log: vec![("grpc_code", json!("InvalidArgument")), ("deadline_source", json!("invalid"))],
            ..Case::new("grpc-timeout twice", echo().headers("grpc-timeout", &[b"1S", b"100m"]))
        },
        Case {
            got: "HTTP 200, grpc-status 3",
            message: Some("idempotency key header idempotency-key must be printable ASCII"),
            // A keyed call runs within the key's TTL: its deadline is set
            // before the key is read.
            counted: &[
                "deadline_injected{Echo} +1",
                "dedup_key_rejected{Echo} +1",
                "handled{Echo,InvalidArgument} +1",
                "started{Echo} +1",
            ],
            log: vec![("grpc_code", json!("InvalidArgument")), ("dedup", json!("bad_key"))],
            ..Case::new(
                "an idempotency key with non-UTF-8 bytes",
                echo().header("idempotency-key", b"order-\xff\xfe").header("authorization", b"Bearer m"),
            )
        },
        Case {
            got: "HTTP 200, grpc-status 3",
            message: Some("must be printable ASCII"),
            // A keyed call runs within the key's TTL: its deadline is set
            // before the key is read.
            counted: &[
                "deadline_injected{Echo} +1",
                "dedup_key_rejected{Echo} +1",
                "handled{Echo,InvalidArgument} +1",
                "started{Echo} +1",
            ],
            log: vec![("grpc_code", json!("InvalidArgument")), ("dedup", json!("bad_key"))],
            ..Case::new(
                "an idempotency key with a tab inside",
                echo().header("idempotency-key", b"order\t42").header("authorization", b"Bearer m"),
            )
        },
        Case {
            got: "HTTP 200, grpc-status 0",
            counted: echo_counted!("OK"),
            log: vec![("grpc_code", json!("OK")), ("request_id", json!("req-\u{fffd}\u{fffd}\tend"))],
            runs: 1,
            ..Case::new(
                "x-request-id with non-UTF-8 bytes and a tab",
                echo().header("x-request-id", b"req-\xff\xfe\tend"),
            )
        },
        Case {
            got: "HTTP 200, grpc-status 0",
            counted: echo_counted!("OK"),
            log: vec![("grpc_code", json!("OK")), ("request_id", json!("r".repeat(128)))],
            runs: 1,
            ..Case::new("an 8 KiB x-request-id", echo().header("x-request-id", "r".repeat(8192).as_bytes()))
        },
        Case {
            // Envoy's codec refuses the header block (http2.invalid.header.field)
            // and closes the connection: the filter never sees the call.
            got: "connection closed",
            ..Case::new(
                "control bytes in x-request-id",
                Send::Handwritten { headers: vec![(b"x-request-id", b"\x01\x1b[31mred".to_vec())] },
            )
        },
        Case {
            got: "connection closed",
            ..Case::new(
                "control bytes in grpc-timeout",
                Send::Handwritten { headers: vec![(b"grpc-timeout", b"1\x00S".to_vec())] },
            )
        },
        Case {
            // Envoy joins the two values; a gRPC method path with a content type
            // that is not gRPC is refused, never passed around the guards.
            got: "HTTP 415, grpc-status 13",
            message: Some("is a gRPC method; call it with content-type application/grpc"),
            counted: &["handled{Echo,Internal} +1", "non_grpc_refused +1", "refused{Echo} +1", "started{Echo} +1"],
            log: vec![("grpc_code", json!("Internal")), ("http_status", json!(415))],
            ..Case::new(
                "content-type twice",
                echo().headers("content-type", &[b"application/grpc", b"application/grpc"]),
            )
        },
        Case {
            got: "HTTP 200, grpc-status 0",
            counted: echo_counted!("OK"),
            log: vec![("grpc_code", json!("OK"))],
            runs: 1,
            ..Case::new("no te header", echo().without("te"))
        },
        Case {
            got: "HTTP 200, grpc-status 0",
            counted: echo_counted!("OK"),
            log: vec![("grpc_code", json!("OK"))],
            runs: 1,
            ..Case::new("content-type APPLICATION/GRPC", echo().header("content-type", b"APPLICATION/GRPC"))
        },
        Case {
            // Envoy does not take this spelling for gRPC, so grpc-guard's own
            // answer spells the status out in grpc-status.
            got: "HTTP 200, grpc-status 4",
            message: Some("grpc-timeout"),
            counted: &[
                "deadline_rejected{Echo,DeadlineExceeded} +1",
                "handled{Echo,DeadlineExceeded} +1",
                "started{Echo} +1",
            ],
            log: vec![("grpc_code", json!("DeadlineExceeded")), ("deadline_source", json!("expired"))],
            ..Case::new(
                "APPLICATION/GRPC with a zero grpc-timeout",
                echo().header("content-type", b"APPLICATION/GRPC").header("grpc-timeout", b"0m"),
            )
        },
        Case {
            got: "HTTP 200, grpc-status 0",
            counted: echo_counted!("OK"),
            log: vec![("grpc_code", json!("OK"))],
            runs: 1,
            ..Case::new("content-type application/grpc+proto", echo().header("content-type", b"application/grpc+proto"))
        },
        Case {
            got: "HTTP 200, grpc-status 0",
            counted: echo_counted!("OK"),
            log: vec![("grpc_code", json!("OK"))],
            runs: 1,
            ..Case::new(
                "content-type application/grpc;charset=utf-8",
                echo().header("content-type", b"application/grpc;charset=utf-8"),
            )
        },
        // The client resets (RST_STREAM before its headers are complete
        // cannot be sent on HTTP/2).
        Case {
            got: "reset (CANCEL)",
            counted: &["handled{Echo,Canceled} +1", "started{Echo} +1"],
            // No message ever reached the unary handler: no upstream work
            // outlived the client.
            log: vec![("grpc_code", json!("Canceled")), ("status_source", json!("reset")), ("late", json!(false))],
            ..Case::new("the client resets right after its headers", echo().frames(vec![]).end(End::Reset))
        },
        Case {
            got: "reset (CANCEL)",
            counted: &["handled{Echo,Canceled} +1", "started{Echo} +1"],
            log: vec![
                ("grpc_code", json!("Canceled")),
                ("status_source", json!("reset")),
                ("req_msgs", json!(0)),
                ("late", json!(false)),
            ],
            ..Case::new("the client resets mid-message", echo().frames(vec![long[..300].to_vec()]).end(End::Reset))
        },
        Case {
            got: "reset (CANCEL)",
            // A whole message was forwarded: a server that runs on the message
            // (grpc-go's unary path) may have started; tonic waits for the
            // half-close and never ran.
            counted: &[
                "handled{Echo,Canceled} +1",
                "late_responses{Echo} +1",
                "msg_received{Echo} +1",
                "started{Echo} +1",
            ],
            log: vec![("grpc_code", json!("Canceled")), ("req_msgs", json!(1)), ("late", json!(true))],
            ..Case::new("the client resets after its last message, before half-close", echo().end(End::Reset))
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matrix_bad_requests_to_a_real_service() {
    let upstream = Upstream::start().await;
    let envoy = start_envoy("matrix-service", upstream.addr, CONFIG).unwrap();
    let observed = upstream.observed.clone();
    run_matrix(&envoy, &cases_against_the_service(), &move || observed.executions("Echo")).await;
}

/// Answers no gRPC server gives, from a raw HTTP/2 upstream that reads the
/// case's name from `x-matrix-case`.
fn cases_against_a_raw_upstream() -> Vec<Case> {
    let echo = Request::echo;
    let reply = reply_frame;
    vec![
        Case {
            script: Some(Script::reply_then(&[("grpc-status", "17")])),
            got: "HTTP 200, grpc-status 17",
            counted: echo_counted!("Unknown"),
            log: vec![("grpc_code", json!("Unknown")), ("grpc_status", json!(2)), ("status_source", json!("trailers"))],
            runs: 1,
            ..Case::new("grpc-status 17", echo())
        },
        Case {
            script: Some(Script::reply_then(&[("grpc-status", "99999")])),
            got: "HTTP 200, grpc-status 99999",
            counted: echo_counted!("Unknown"),
            log: vec![("grpc_code", json!("Unknown")), ("status_source", json!("trailers"))],
            runs: 1,
            ..Case::new("grpc-status 99999", echo())
        },
        Case {
            // README: "a number outside 0–16 is Unknown, as gRPC clients treat
            // it" (tonic and grpc-java report -1 as UNKNOWN).
            script: Some(Script::reply_then(&[("grpc-status", "-1")])),
            got: "HTTP 200, grpc-status -1",
            counted: echo_counted!("Unknown"),
            log: vec![("grpc_code", json!("Unknown")), ("status_source", json!("trailers"))],
            runs: 1,
            ..Case::new("grpc-status -1", echo())
        },
        Case {
            // README: "a grpc-status that is not a number is ignored": HTTP 200
            // without a status is Internal.
            script: Some(Script::reply_then(&[("grpc-status", "abc")])),
            got: "HTTP 200, grpc-status abc",
            counted: echo_counted!("Internal"),
            log: vec![("grpc_code", json!("Internal")), ("status_source", json!("missing"))],
            runs: 1,
            ..Case::new("grpc-status abc", echo())
        },
        Case {
            script: Some(Script::reply_then(&[("grpc-status", "0"), ("grpc-status", "13")])),
            got: "HTTP 200, grpc-status 0,13",
            counted: echo_counted!("Internal"),
            log: vec![("grpc_code", json!("Internal"))],
            runs: 1,
            ..Case::new("grpc-status twice in the trailers, 0 and 13", echo())
        },
        Case {
            script: Some(Script::Answer {
                informational: false,
                status: 200,
                headers: &[("content-type", "application/grpc"), ("grpc-status", "0")],
                frames: vec![reply()],
                then: Then::Trailers(&[("grpc-status", "13"), ("grpc-message", "trailers win")]),
            }),
            got: "HTTP 200, grpc-status 13,0",
            counted: echo_counted!("Internal"),
            log: vec![("grpc_code", json!("Internal")), ("status_source", json!("trailers"))],
            runs: 1,
            ..Case::new("grpc-status 0 in the headers and 13 in the trailers", echo())
        },
        Case {
            script: Some(Script::reply_then(&[("x-other", "1")])),
            got: "HTTP 200",
            counted: echo_counted!("Internal"),
            log: vec![("grpc_code", json!("Internal")), ("status_source", json!("missing"))],
            runs: 1,
            ..Case::new("trailers without grpc-status", echo())
        },
        Case {
            script: Some(Script::Answer {
                informational: true,
                status: 200,
                headers: GRPC,
                frames: vec![reply()],
                then: Then::Trailers(&[("grpc-status", "0")]),
            }),
            got: "HTTP 200, grpc-status 0",
            counted: echo_counted!("OK"),
            log: vec![("grpc_code", json!("OK")), ("http_status", json!(200))],
            runs: 1,
            ..Case::new("100 Continue before the answer", echo())
        },
        Case {
            script: Some(Script::http(204)),
            got: "HTTP 204",
            counted: &["handled{Echo,Unknown} +1", "msg_received{Echo} +1", "started{Echo} +1"],
            log: vec![("grpc_code", json!("Unknown")), ("status_source", json!("http")), ("http_status", json!(204))],
            runs: 1,
            ..Case::new("HTTP 204", echo())
        },
        Case {
            script: Some(Script::http(304)),
            got: "HTTP 304",
            counted: &["handled{Echo,Unknown} +1", "msg_received{Echo} +1", "started{Echo} +1"],
            log: vec![("grpc_code", json!("Unknown")), ("status_source", json!("http")), ("http_status", json!(304))],
            runs: 1,
            ..Case::new("HTTP 304", echo())
        },
        // The upstream resets or goes away at each phase.
        Case {
            script: Some(Script::ResetBeforeHeaders),
            got: "HTTP 200, grpc-status 14",
            counted: &["handled{Echo,Unavailable} +1", "msg_received{Echo} +1", "started{Echo} +1"],
            log: vec![("grpc_code", json!("Unavailable"))],
            runs: 1,
            ..Case::new("the upstream resets before its headers", echo())
        },
        Case {
            script: Some(Script::cut(vec![], Then::Reset)),
            got: "HTTP 200, then reset (INTERNAL_ERROR)",
            counted: &["handled{Echo,Unavailable} +1", "msg_received{Echo} +1", "started{Echo} +1"],
            log: vec![("grpc_code", json!("Unavailable")), ("status_source", json!("reset"))],
            runs: 1,
            ..Case::new("the upstream resets after its headers", echo())
        },
        Case {
            // The prefix and 3 of the 7 bytes of the message.
            script: Some(Script::cut(vec![reply()[..8].to_vec()], Then::Reset)),
            got: "HTTP 200, then reset (INTERNAL_ERROR)",
            counted: &["handled{Echo,Unavailable} +1", "msg_received{Echo} +1", "started{Echo} +1"],
            log: vec![
                ("grpc_code", json!("Unavailable")),
                ("status_source", json!("reset")),
                ("resp_msgs", json!(0)),
                ("resp_bytes", json!(0)),
            ],
            runs: 1,
            ..Case::new("the upstream resets mid-message", echo())
        },
        Case {
            script: Some(Script::cut(vec![reply()], Then::Reset)),
            got: "HTTP 200, then reset (INTERNAL_ERROR)",
            counted: echo_counted!("Unavailable"),
            log: vec![("grpc_code", json!("Unavailable")), ("status_source", json!("reset")), ("resp_msgs", json!(1))],
            runs: 1,
            ..Case::new("the upstream resets after its last message, before trailers", echo())
        },
        Case {
            script: Some(Script::HangupBeforeHeaders),
            got: "HTTP 200, grpc-status 14",
            counted: &["handled{Echo,Unavailable} +1", "msg_received{Echo} +1", "started{Echo} +1"],
            log: vec![("grpc_code", json!("Unavailable"))],
            runs: 1,
            ..Case::new("the upstream's TCP connection closes before its headers", echo())
        },
        Case {
            script: Some(Script::cut(vec![reply()], Then::Hangup)),
            got: "HTTP 200, then reset (INTERNAL_ERROR)",
            counted: echo_counted!("Unavailable"),
            log: vec![("grpc_code", json!("Unavailable")), ("status_source", json!("reset"))],
            runs: 1,
            ..Case::new("the upstream's TCP connection closes mid-answer", echo())
        },
        // A request that never sends its body (the service is raw here:
        // tonic answers its own grpc-timeout CANCELLED, racing Envoy).
        Case {
            // Envoy ends the call at its deadline (route max_stream_duration).
            got: "HTTP 200, grpc-status 4",
            counted: &["handled{Echo,DeadlineExceeded} +1", "started{Echo} +1"],
            // No message reached the unary method: no upstream work outlived
            // the client.
            log: vec![
                ("grpc_code", json!("DeadlineExceeded")),
                ("deadline_source", json!("client")),
                ("req_msgs", json!(0)),
                ("late", json!(false)),
            ],
            runs: 1,
            ..Case::new(
                "headers only, no END_STREAM, grpc-timeout 300m",
                echo().header("grpc-timeout", b"300m").frames(vec![]).end(End::Open),
            )
        },
        // Envoy's request header limit (max_request_headers_kb, 60 KiB by
        // default), against an upstream that takes large headers.
        Case {
            got: "HTTP 200, grpc-status 0",
            counted: echo_counted!("OK"),
            log: vec![("grpc_code", json!("OK"))],
            runs: 1,
            ..Case::new("58 KiB of request headers", echo().header("x-big", "b".repeat(58 << 10).as_bytes()))
        },
        Case {
            // Envoy resets the stream; the filter never sees the call.
            got: "reset (INTERNAL_ERROR)",
            ..Case::new("70 KiB of request headers", echo().header("x-big", "b".repeat(70 << 10).as_bytes()))
        },
    ]
}

/// Plays `script` on one request.
async fn play(
    script: Script,
    mut request: hyper::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    hangup: Hangup,
) {
    read_h2_body(request.body_mut()).await;
    let pause = || tokio::time::sleep(Duration::from_millis(30));
    let (informational, status, headers, frames, then) = match script {
        Script::ResetBeforeHeaders => return respond.send_reset(h2::Reason::INTERNAL_ERROR),
        Script::HangupBeforeHeaders => return hangup.now(),
        Script::Answer { informational, status, headers, frames, then } => {
            (informational, status, headers, frames, then)
        }
    };
    if informational {
        respond.send_informational(hyper::Response::builder().status(100).body(()).unwrap()).unwrap();
        pause().await;
    }
    let mut response = hyper::Response::builder().status(status);
    for (name, value) in headers {
        response = response.header(*name, *value);
    }
    let ends_here = frames.is_empty() && matches!(then, Then::End);
    let Ok(mut body) = respond.send_response(response.body(()).unwrap(), ends_here) else { return };
    for (i, frame) in frames.iter().enumerate() {
        pause().await;
        let last = i + 1 == frames.len() && matches!(then, Then::End);
        let _ = body.send_data(Bytes::from(frame.clone()), last);
    }
    pause().await;
    match then {
        Then::Trailers(pairs) => {
            let mut trailers = hyper::HeaderMap::new();
            for (name, value) in pairs {
                trailers.append(*name, value.parse().unwrap());
            }
            let _ = body.send_trailers(trailers);
        }
        Then::End => {}
        Then::Reset => body.send_reset(h2::Reason::INTERNAL_ERROR),
        Then::Hangup => hangup.now(),
    }
    // Hold the stream until the peer is done with it.
    let _ = std::future::poll_fn(|cx| body.poll_reset(cx)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matrix_answers_no_grpc_server_gives() {
    let cases = cases_against_a_raw_upstream();
    let scripts: Arc<std::collections::HashMap<String, Script>> =
        Arc::new(cases.iter().filter_map(|c| Some((c.name.to_owned(), c.script.clone()?))).collect());
    let (addr, requests) = start_raw_upstream(move |request, respond, hangup| {
        let case = request.headers().get("x-matrix-case").map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        // Any other call (the liveness checks' among them) is answered OK.
        let script =
            case.and_then(|c| scripts.get(&c).cloned()).unwrap_or_else(|| Script::reply_then(&[("grpc-status", "0")]));
        play(script, request, respond, hangup)
    })
    .await;
    let envoy = start_envoy("matrix-raw", addr, CONFIG).unwrap();
    run_matrix(&envoy, &cases, &move || requests.load(Ordering::SeqCst)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn matrix_a_thousand_concurrent_streams_on_one_connection_are_answered_and_counted() {
    const CALLS: usize = 1000;
    let upstream = Upstream::start().await;
    let envoy = start_envoy("matrix-load", upstream.addr, CONFIG).unwrap();
    let addr = envoy.params().listen_addr();
    // What Envoy's listener allows on one connection: its SETTINGS frame.
    let ordinary: Vec<(&[u8], &[u8])> = vec![
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", ECHO.as_bytes()),
        (b":authority", b"matrix"),
        (b"content-type", b"application/grpc"),
    ];
    let (outcome, max_streams) = h2_handwritten(addr, &ordinary, &echo_frame("settings?")).await;
    assert_eq!(outcome, RawOutcome::Answered);
    let max_streams = max_streams.expect("Envoy announces SETTINGS_MAX_CONCURRENT_STREAMS");
    assert!(max_streams as usize >= CALLS, "Envoy allows {max_streams} streams per connection");

    let counters_before = guard_counters(&parse_exposition(&envoy.prometheus().unwrap()));
    let logs_before = call_logs(&envoy, 1).await.len();
    let connections = |s: &[Sample]| {
        value(s, "envoy_http_downstream_cx_total", &[("envoy_http_conn_manager_prefix", "grpc_ingress")]).unwrap()
    };
    let connections_before = connections(&parse_exposition(&envoy.prometheus().unwrap()));
    // One tonic channel is one HTTP/2 connection; every call waits 300 ms
    // in the service, so the calls overlap.
    let channel = grpc_guard_demo::lazy_channel(&envoy.grpc_uri()).unwrap();
    let mut calls = tokio::task::JoinSet::new();
    for n in 0..CALLS {
        let mut client = grpc_guard_demo::client(channel.clone());
        calls.spawn(async move {
            client.echo(EchoRequest { message: format!("call {n}"), delay_ms: 300, ..Default::default() }).await
        });
    }
    let mut failed = Vec::new();
    while let Some(result) = calls.join_next().await {
        if let Err(status) = result.unwrap() {
            failed.push(status);
        }
    }
    assert!(failed.is_empty(), "{} of {CALLS} calls failed, e.g. {:?}", failed.len(), failed.first());
    assert_eq!(upstream.observed.executions("Echo"), CALLS as u64 + 1);

    let samples = scrape_until(&envoy, |s| {
        counter_changes(&counters_before, &guard_counters(s)).contains(&format!("handled{{Echo,OK}} +{CALLS}"))
    })
    .await;
    assert_eq!(connections(&samples) - connections_before, 1.0, "one connection carried every call");
    let n = CALLS;
    assert_eq!(
        counter_changes(&counters_before, &guard_counters(&samples)),
        [
            format!("handled{{Echo,OK}} +{n}"),
            format!("msg_received{{Echo}} +{n}"),
            format!("msg_sent{{Echo}} +{n}"),
            format!("started{{Echo}} +{n}"),
        ]
    );
    let logs = call_logs(&envoy, logs_before + CALLS).await;
    assert_eq!(logs.len(), logs_before + CALLS);
    assert!(logs[logs_before..].iter().all(|l| l["grpc_code"] == "OK"));
    assert_no_vm_trap(&envoy);
    assert_workers_serve(&envoy, "1,000 streams").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matrix_calls_that_never_send_their_body_are_held_until_the_client_leaves() {
    // Without a deadline nothing but the client (or Envoy's 5-minute
    // stream_idle_timeout) ends a call that sends headers and no END_STREAM;
    // with one, Envoy does (the raw-upstream row "headers only, no
    // END_STREAM, grpc-timeout 300m").
    const HELD: usize = 20;
    let upstream = Upstream::start().await;
    let envoy = start_envoy("matrix-held", upstream.addr, CONFIG).unwrap();
    let addr = envoy.params().listen_addr();
    let counters_before = guard_counters(&parse_exposition(&envoy.prometheus().unwrap()));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    let mut streams = Vec::new();
    for _ in 0..HELD {
        let mut sender = sender.clone().ready().await.unwrap();
        let request = hyper::Request::builder()
            .method("POST")
            .uri(format!("http://{addr}{ECHO}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        streams.push(sender.send_request(request, false).unwrap());
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let held = guard_counters(&parse_exposition(&envoy.prometheus().unwrap()));
    assert_eq!(counter_changes(&counters_before, &held), [format!("started{{Echo}} +{HELD}")], "held, none ended");

    // The client goes away: its TCP connection closes.
    connection.abort();
    drop(streams);
    let samples = scrape_until(&envoy, |s| {
        counter_changes(&held, &guard_counters(s)).contains(&format!("handled{{Echo,Canceled}} +{HELD}"))
    })
    .await;
    let logs = call_logs(&envoy, HELD).await;
    assert_eq!(upstream.observed.executions("Echo"), 0, "no held call reached the service");
    assert_no_vm_trap(&envoy);
    assert_workers_serve(&envoy, "held calls").await;

    assert_eq!(
        counter_changes(&held, &guard_counters(&samples)),
        [format!("handled{{Echo,Canceled}} +{HELD}")],
        "each call ended once, Canceled; no upstream work outlived the client (no message reached it)"
    );
    assert_eq!(logs.len(), HELD);
    for line in &logs {
        assert_eq!(
            (&line["grpc_code"], &line["status_source"], &line["late"]),
            (&json!("Canceled"), &json!("reset"), &json!(false)),
            "{line}"
        );
    }
}

#[test]
fn matrix_bad_config_values_stop_the_plugin_with_one_line_naming_the_field() {
    const ECHO_DEDUP: &str = r#""methods":["grpcguard.demo.v1.Demo/Echo"]"#;
    const FIELD_NUMBER: &str = "expected a protobuf field number, or an array of them for a nested field";
    let key_fields = |value: &str| format!(r#"{{"dedup":{{{ECHO_DEDUP},"key_fields":{value}}}}}"#);
    let cases: Vec<(String, String)> = vec![
        (
            key_fields(r#"{"grpcguard.demo.v1.Demo/Count":5}"#),
            "dedup.key_fields.grpcguard.demo.v1.Demo/Count: grpcguard.demo.v1.Demo/Count is not among dedup.methods"
                .to_owned(),
        ),
        (
            key_fields(r#"{"grpcguard.demo.v1.Demo/Echo":"5"}"#),
            format!(r#"dedup.key_fields.grpcguard.demo.v1.Demo/Echo: invalid type: string "5", {FIELD_NUMBER}"#),
        ),
        (
            key_fields(r#"{"grpcguard.demo.v1.Demo/Echo":null}"#),
            format!("dedup.key_fields.grpcguard.demo.v1.Demo/Echo: invalid type: null, {FIELD_NUMBER}"),
        ),
        (
            key_fields(r#"{"grpcguard.demo.v1.Demo/Echo":19500}"#),
            "dedup.key_fields.grpcguard.demo.v1.Demo/Echo: 19500 is not a protobuf field number (1 to 536870911, \
             not 19000-19999)"
                .to_owned(),
        ),
        (
            key_fields(r#"{"grpcguard.demo.v1.Demo/Echo":[]}"#),
            "dedup.key_fields.grpcguard.demo.v1.Demo/Echo: a path of 0 field numbers; expected 1 to 8".to_owned(),
        ),
        (key_fields("[5]"), "dedup.key_fields: invalid type: an array, expected an object".to_owned()),
        (
            r#"{"dedup":{"methods":"grpcguard.demo.v1.Demo/Echo"}}"#.to_owned(),
            r#"dedup.methods: invalid type: string "grpcguard.demo.v1.Demo/Echo", expected an array of strings"#
                .to_owned(),
        ),
        (r#"{"log":{"ok_sample":null}}"#.to_owned(), "log.ok_sample: invalid type: null, expected a number".to_owned()),
        (
            r#"{"metrics":{"max_methods":"200"}}"#.to_owned(),
            r#"metrics.max_methods: invalid type: string "200", expected a whole number"#.to_owned(),
        ),
        (
            r#"{"deadline":{"default":5}}"#.to_owned(),
            "deadline.default: invalid type: number 5, expected a string".to_owned(),
        ),
        (
            // README: whole-number fields take whole numbers as written. The
            // line must show what was written: "invalid value: 4096,
            // expected a whole number" reads as a contradiction.
            r#"{"limits":{"max_request_message_bytes":4096.0}}"#.to_owned(),
            "limits.max_request_message_bytes: invalid value: 4096.0".to_owned(),
        ),
        (
            r#"{"non_grpc":true}"#.to_owned(),
            "non_grpc: invalid type: boolean `true`, expected one of `refuse`, `pass`".to_owned(),
        ),
        (r#"[]"#.to_owned(), "configuration: must be a JSON object, e.g. {}".to_owned()),
    ];
    let nowhere: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let results: Vec<Result<Envoy, EnvoyError>> = std::thread::scope(|scope| {
        let started: Vec<_> = cases
            .iter()
            .enumerate()
            .map(|(i, (config, _))| scope.spawn(move || start_envoy(&format!("matrix-config-{i}"), nowhere, config)))
            .collect();
        started.into_iter().map(|s| s.join().unwrap()).collect()
    });
    let mut failures = Vec::new();
    for ((config, want), result) in cases.iter().zip(results) {
        match result {
            Err(EnvoyError::Exited { log_tail, .. }) => {
                let lines: Vec<&str> =
                    log_tail.lines().filter(|l| l.contains("invalid grpc-guard configuration")).collect();
                let wanted = format!("invalid grpc-guard configuration: {want}");
                if lines.len() != 1 || !lines[0].contains(&wanted) {
                    failures.push(format!("{config}: wanted one line with {wanted:?}, got {lines:?}"));
                }
            }
            Err(other) => failures.push(format!("{config}: Envoy failed otherwise: {other}")),
            Ok(_) => failures.push(format!("{config}: Envoy started with it")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
