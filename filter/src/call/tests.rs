//! Whole calls driven through the state machine natively: a small Envoy
//! stand-in plays the host, carries out the effects the way Envoy would
//! (headers edited, local replies, bodies replaced, trailers added) and keeps
//! what a user would see: the status and message the client got, the
//! counters, the histograms, the filter-state tag and the log line.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use super::*;
use crate::shared::testing::MapStore;
use crate::shared::StoreError;

mod etcd;

const MS: u64 = 1_000_000;
const PATH: &str = "/pkg.Orders/Create";

/// Headers as Envoy holds them: lower-case names, in order.
type Map = Vec<(String, Vec<u8>)>;

fn get<'a>(map: &'a Map, name: &str) -> Option<&'a [u8]> {
    map.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice())
}

fn set(map: &mut Map, name: &str, value: &[u8]) {
    map.retain(|(n, _)| n != name);
    map.push((name.to_owned(), value.to_vec()));
}

/// The host of one stream; the shared store is shared by every worker.
struct Fake {
    store: Rc<RefCell<MapStore>>,
    clock: Rc<RefCell<u64>>,
    request_headers: Map,
    response_headers: Map,
    trailers: Map,
    request_chunk: Vec<u8>,
    /// Request body bytes the filter copied out of the host.
    request_bytes_read: usize,
    response_chunk: Vec<u8>,
    /// Envoy attributes by their dotted path.
    properties: HashMap<String, Vec<u8>>,
    /// Envoy shows a filter the request headers only in their own callback
    /// and the response headers only in theirs (and both in the log
    /// callback): the fake does the same.
    showing: Showing,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Showing {
    #[default]
    Neither,
    Request,
    Response,
    Both,
}

impl SharedStore for Fake {
    fn get(&mut self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        self.store.borrow_mut().get(key)
    }
    fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        self.store.borrow_mut().set(key, value, cas)
    }
}

impl Host for Fake {
    fn request_header(&mut self, name: &str) -> Option<&[u8]> {
        matches!(self.showing, Showing::Request | Showing::Both).then(|| get(&self.request_headers, name)).flatten()
    }
    fn response_header(&mut self, name: &str) -> Option<&[u8]> {
        matches!(self.showing, Showing::Response | Showing::Both).then(|| get(&self.response_headers, name)).flatten()
    }
    fn response_headers(&mut self) -> Vec<(String, Vec<u8>)> {
        match self.showing {
            Showing::Response | Showing::Both => self.response_headers.clone(),
            _ => Vec::new(),
        }
    }
    fn response_trailer(&mut self, name: &str) -> Option<&[u8]> {
        get(&self.trailers, name)
    }
    fn response_trailers(&mut self) -> Vec<(String, Vec<u8>)> {
        self.trailers.clone()
    }
    fn request_body(&mut self, offset: usize, len: usize) -> Option<Vec<u8>> {
        let bytes = self.request_chunk.get(offset..offset + len).map(<[u8]>::to_vec);
        self.request_bytes_read += bytes.as_ref().map_or(0, Vec::len);
        bytes
    }
    fn response_body(&mut self, offset: usize, len: usize) -> Option<Vec<u8>> {
        self.response_chunk.get(offset..offset + len).map(<[u8]>::to_vec)
    }
    fn property(&mut self, path: &[&str]) -> Option<Vec<u8>> {
        self.properties.get(&path.join(".")).cloned()
    }
    fn now_ns(&mut self) -> u64 {
        *self.clock.borrow()
    }
}

/// One Envoy: a store and a clock shared by its workers.
#[derive(Clone, Default)]
struct Envoy {
    store: Rc<RefCell<MapStore>>,
    clock: Rc<RefCell<u64>>,
}

impl Envoy {
    /// A worker with `config`, logging every call unless the config says
    /// otherwise (the default logs a sample of OK calls).
    fn worker(&self, config: &str) -> Worker {
        let mut json: serde_json::Value = serde_json::from_str(config).unwrap();
        json.as_object_mut()
            .unwrap()
            .entry("log")
            .or_insert_with(|| serde_json::json!({}))
            .as_object_mut()
            .unwrap()
            .entry("ok_sample")
            .or_insert(1.into());
        // Every worker its own seed, as Envoy's workers have.
        static WORKERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seed = *self.clock.borrow() ^ 0x5eed ^ WORKERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) << 32;
        Worker::configure(json.to_string().as_bytes(), &mut *self.store.borrow_mut(), seed).unwrap()
    }

    fn advance(&self, ms: u64) {
        *self.clock.borrow_mut() += ms * MS;
    }
}

/// What a user sees of one call.
#[derive(Debug, Default)]
struct Seen {
    /// The proxy's own answer, if it gave one.
    reply: Option<Reply>,
    /// (slot, family, code) → total.
    counts: HashMap<(usize, Family, Option<GrpcStatus>), u64>,
    records: Vec<(Family, u64)>,
    record_slots: Vec<usize>,
    guard_counts: Vec<&'static str>,
    tags: Vec<GrpcStatus>,
    /// The request was marked for the replay route.
    marked: bool,
    log: Option<serde_json::Value>,
    /// Requests sent to the etcd store.
    etcd: Vec<crate::call::EtcdRequest>,
}

impl Seen {
    /// The total over every slot.
    fn count(&self, family: Family, code: Option<GrpcStatus>) -> u64 {
        self.counts.iter().filter(|((_, f, c), _)| (*f, *c) == (family, code)).map(|(_, n)| n).sum()
    }
    /// The slots the call's metrics went to.
    fn slots(&self) -> std::collections::BTreeSet<usize> {
        self.counts.keys().map(|(slot, _, _)| *slot).chain(self.record_slots.iter().copied()).collect()
    }
    fn log(&self, field: &str) -> &serde_json::Value {
        &self.log.as_ref().expect("the call was logged")[field]
    }
}

/// One stream through one worker.
struct Stream<'w> {
    worker: &'w mut Worker,
    host: Fake,
    call: Option<Call>,
    seen: Seen,
    fx: Effects,
    /// The request headers wait in the filter (its headers step paused
    /// without answering): Envoy then still shows them to body steps.
    headers_held: bool,
    /// Request body Envoy buffered for the filter (a body step paused).
    buffered: Vec<u8>,
}

fn frame(message: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

impl<'w> Stream<'w> {
    /// A gRPC call to `path` with `extra` request headers.
    fn open(envoy: &Envoy, worker: &'w mut Worker, path: &str, extra: &[(&str, &str)]) -> Stream<'w> {
        let mut headers: Map = vec![
            (":method".into(), b"POST".to_vec()),
            (":path".into(), path.as_bytes().to_vec()),
            (":authority".into(), b"orders.shop".to_vec()),
            ("content-type".into(), b"application/grpc".to_vec()),
            ("te".into(), b"trailers".to_vec()),
        ];
        for (n, v) in extra {
            set(&mut headers, n, v.as_bytes());
        }
        Stream::with_headers(envoy, worker, headers)
    }

    /// A keyed call (key `k`) whose whole request, the message `x`, went on.
    fn keyed_x(envoy: &Envoy, worker: &'w mut Worker) -> Stream<'w> {
        let mut s = Stream::open(envoy, worker, PATH, &[(KEY, "k")]);
        s.headers(false);
        s.request_body(&frame(b"x"), true);
        s
    }

    fn with_headers(envoy: &Envoy, worker: &'w mut Worker, request_headers: Map) -> Stream<'w> {
        let host = Fake {
            store: envoy.store.clone(),
            clock: envoy.clock.clone(),
            request_headers,
            response_headers: Vec::new(),
            trailers: Vec::new(),
            request_chunk: Vec::new(),
            request_bytes_read: 0,
            response_chunk: Vec::new(),
            properties: HashMap::from([
                ("source.principal".to_owned(), b"spiffe://cluster.local/ns/shop/sa/web".to_vec()),
                ("upstream.local_address".to_owned(), b"127.0.0.1:40000".to_vec()),
                ("response.code_details".to_owned(), b"via_upstream".to_vec()),
            ]),
            showing: Showing::Neither,
        };
        Stream {
            worker,
            host,
            call: None,
            seen: Seen::default(),
            fx: Vec::new(),
            headers_held: false,
            buffered: Vec::new(),
        }
    }

    /// Request headers; `end` when the request has no body.
    fn headers(&mut self, end: bool) -> Next {
        self.host.showing = Showing::Request;
        let next = Call::start(&mut self.call, self.worker, &mut self.host, 7, end, &mut self.fx);
        let next = self.apply(next);
        self.headers_held = next == Next::Pause && self.seen.reply.is_none();
        self.host.showing = if self.headers_held { Showing::Request } else { Showing::Neither };
        next
    }

    /// A request body chunk; after a step that paused, Envoy hands the
    /// filter everything it buffered, this chunk included.
    fn request_body(&mut self, chunk: &[u8], end: bool) -> Next {
        self.buffered.extend_from_slice(chunk);
        self.host.request_chunk = std::mem::take(&mut self.buffered);
        let Some(call) = self.call.as_mut() else { return Next::Continue };
        let len = self.host.request_chunk.len();
        let next = call.on_request_body(self.worker, &mut self.host, len, end, &mut self.fx);
        self.after_request_step(next)
    }

    fn after_request_step(&mut self, next: Next) -> Next {
        let next = self.apply(next);
        if next == Next::Pause && self.seen.reply.is_none() {
            self.buffered = self.host.request_chunk.clone();
        } else if next == Next::Continue {
            self.headers_held = false;
            self.host.showing = Showing::Neither;
        }
        next
    }

    /// Request trailers: the request ends with them.
    fn request_trailers(&mut self) -> Next {
        let Some(call) = self.call.as_mut() else { return Next::Continue };
        let next = call.on_request_trailers(self.worker, &mut self.host, &mut self.fx);
        self.after_request_step(next)
    }

    fn response_headers(&mut self, headers: &[(&str, &str)], end: bool) -> Next {
        self.host.response_headers = headers.iter().map(|(n, v)| ((*n).to_owned(), v.as_bytes().to_vec())).collect();
        let Some(call) = self.call.as_mut() else { return Next::Continue };
        self.host.showing = Showing::Response;
        let next = call.on_response_headers(self.worker, &mut self.host, end, &mut self.fx);
        self.host.showing = Showing::Neither;
        self.apply(next)
    }

    fn response_body(&mut self, chunk: &[u8], end: bool) -> Next {
        self.host.response_chunk = chunk.to_vec();
        let Some(call) = self.call.as_mut() else { return Next::Continue };
        let next = call.on_response_body(self.worker, &mut self.host, chunk.len(), end, &mut self.fx);
        self.apply(next)
    }

    fn trailers(&mut self, trailers: &[(&str, &str)]) -> Next {
        self.host.trailers = trailers.iter().map(|(n, v)| ((*n).to_owned(), v.as_bytes().to_vec())).collect();
        let Some(call) = self.call.as_mut() else { return Next::Continue };
        let next = call.on_response_trailers(self.worker, &mut self.host, &mut self.fx);
        self.apply(next)
    }

    /// Sets an Envoy attribute (`None` removes it).
    fn property(&mut self, path: &str, value: Option<&str>) {
        match value {
            Some(v) => self.host.properties.insert(path.to_owned(), v.as_bytes().to_vec()),
            None => self.host.properties.remove(path),
        };
    }

    /// The stream ends; `details` is Envoy's `response.code_details`.
    fn finish(mut self, details: &str) -> Seen {
        self.property("response.code_details", Some(details));
        if let Some(mut call) = self.call.take() {
            self.host.showing = Showing::Both;
            call.finish(self.worker, &mut self.host, &mut self.fx);
            self.apply(Next::Continue);
        }
        self.seen
    }

    /// An upstream answer: headers, one message, trailers with `code`.
    fn upstream_answers(&mut self, message: &[u8], code: &str) {
        assert_eq!(
            self.response_headers(&[(":status", "200"), ("content-type", "application/grpc")], false),
            Next::Continue
        );
        assert_eq!(self.response_body(&frame(message), false), Next::Continue);
        assert_eq!(self.trailers(&[("grpc-status", code), ("grpc-message", "")]), Next::Continue);
    }

    /// Carries out the effects as Envoy would.
    fn apply(&mut self, next: Next) -> Next {
        for effect in self.fx.drain(..) {
            match effect {
                Effect::SetRequestHeader(n, v) => set(&mut self.host.request_headers, &n, &v),
                Effect::SetResponseHeader(n, v) => set(&mut self.host.response_headers, &n, &v),
                Effect::AddResponseHeader(n, v) => self.host.response_headers.push((n, v)),
                Effect::ReplaceRequestBody(body) => self.host.request_chunk = body,
                Effect::RemoveRequestHeader(n) => self.host.request_headers.retain(|(k, _)| k != n),
                Effect::RemoveResponseHeader(n) => self.host.response_headers.retain(|(k, _)| k != n),
                Effect::Reply(reply) => {
                    assert!(self.seen.reply.is_none(), "answered twice");
                    self.seen.reply = Some(reply);
                }
                Effect::ReplaceResponseBody(body) => self.host.response_chunk = body,
                Effect::AddResponseTrailer(n, v) => self.host.trailers.push((n, v)),
                Effect::Count { slot, family, code, by } => {
                    *self.seen.counts.entry((slot, family, code)).or_default() += by
                }
                Effect::Record { slot, family, value } => {
                    self.seen.records.push((family, value));
                    self.seen.record_slots.push(slot);
                }
                Effect::CountGuard(name) => self.seen.guard_counts.push(name),
                Effect::Tag(status) => self.seen.tags.push(status),
                Effect::MarkReplay => self.seen.marked = true,
                Effect::Etcd(request) => self.seen.etcd.push(*request),
                Effect::Log(line) => {
                    assert!(self.seen.log.is_none(), "logged twice");
                    self.seen.log = Some(serde_json::from_str(&line).unwrap());
                }
            }
        }
        next
    }

    fn request_header(&self, name: &str) -> Option<String> {
        get(&self.host.request_headers, name).map(|v| String::from_utf8(v.to_vec()).unwrap())
    }
}

/// A unary call answered `code` by the upstream; returns what was seen.
fn unary(envoy: &Envoy, worker: &mut Worker, extra: &[(&str, &str)], request: &[u8], code: &str) -> Seen {
    let mut s = Stream::open(envoy, worker, PATH, extra);
    assert_eq!(s.headers(false), Next::Continue);
    assert_eq!(s.request_body(&frame(request), true), Next::Continue);
    s.upstream_answers(b"reply", code);
    s.finish("via_upstream")
}

/// The headers of an HTTP local reply.
fn reply_headers(seen: &Seen) -> Option<(u32, &[(String, String)])> {
    match &seen.reply {
        Some(Reply::Http { code, headers, .. }) => Some((*code, headers.as_slice())),
        _ => None,
    }
}

fn header_of<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn reply_status(seen: &Seen) -> Option<(GrpcStatus, &str)> {
    match &seen.reply {
        Some(Reply::Status { status, message }) => Some((*status, message.as_str())),
        _ => None,
    }
}

// ---------------------------------------------------------------- status

#[test]
fn final_status_comes_from_trailers_then_headers_then_http_then_resets() {
    struct Case {
        name: &'static str,
        headers: &'static [(&'static str, &'static str)],
        headers_end: bool,
        trailers: Option<&'static [(&'static str, &'static str)]>,
        details: &'static str,
        status: GrpcStatus,
        source: &'static str,
    }
    let grpc_200: &[(&str, &str)] = &[(":status", "200"), ("content-type", "application/grpc")];
    let cases = [
        Case {
            name: "trailers",
            headers: grpc_200,
            headers_end: false,
            trailers: Some(&[("grpc-status", "5")]),
            details: "via_upstream",
            status: GrpcStatus::NotFound,
            source: "trailers",
        },
        Case {
            name: "trailers-only",
            headers: &[(":status", "200"), ("grpc-status", "14")],
            headers_end: true,
            trailers: None,
            details: "via_upstream",
            status: GrpcStatus::Unavailable,
            source: "headers",
        },
        Case {
            name: "trailers overrule headers",
            headers: &[(":status", "200"), ("grpc-status", "0")],
            headers_end: false,
            trailers: Some(&[("grpc-status", "13")]),
            details: "via_upstream",
            status: GrpcStatus::Internal,
            source: "trailers",
        },
        Case {
            name: "http 503",
            headers: &[(":status", "503")],
            headers_end: true,
            trailers: None,
            details: "via_upstream",
            status: GrpcStatus::Unavailable,
            source: "http",
        },
        Case {
            name: "http 200 without grpc-status",
            headers: grpc_200,
            headers_end: true,
            trailers: None,
            details: "via_upstream",
            status: GrpcStatus::Internal,
            source: "missing",
        },
        Case {
            name: "client reset",
            headers: &[],
            headers_end: false,
            trailers: None,
            details: "http2.remote_reset",
            status: GrpcStatus::Cancelled,
            source: "reset",
        },
        Case {
            name: "upstream connect failure",
            headers: &[],
            headers_end: false,
            trailers: None,
            details: "upstream_reset_before_response_started{connection_failure}",
            status: GrpcStatus::Unavailable,
            source: "reset",
        },
        Case {
            name: "upstream reset mid-answer",
            headers: grpc_200,
            headers_end: false,
            trailers: None,
            details: "upstream_reset_after_response_started{remote_reset}",
            status: GrpcStatus::Unavailable,
            source: "reset",
        },
    ];
    for case in cases {
        let envoy = Envoy::default();
        let mut worker = envoy.worker("{}");
        let mut s = Stream::open(&envoy, &mut worker, PATH, &[]);
        s.headers(false);
        s.request_body(&frame(b"req"), true);
        if !case.headers.is_empty() {
            s.response_headers(case.headers, case.headers_end);
        }
        if let Some(trailers) = case.trailers {
            s.trailers(trailers);
        }
        let seen = s.finish(case.details);
        assert_eq!(seen.count(Family::Handled, Some(case.status)), 1, "{}", case.name);
        assert_eq!(seen.tags.last(), Some(&case.status), "{}: the access log sees the final status", case.name);
        assert_eq!(seen.log("grpc_code"), case.status.go_name(), "{}", case.name);
        assert_eq!(seen.log("status_source"), case.source, "{}", case.name);
    }
}

#[test]
fn non_grpc_requests_pass_untouched_and_uncounted() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker("{}");
    let headers: Map = vec![(":path".into(), b"/index.html".to_vec()), ("content-type".into(), b"text/html".to_vec())];
    let mut s = Stream::with_headers(&envoy, &mut worker, headers.clone());
    assert_eq!(s.headers(false), Next::Continue);
    assert!(s.call.is_none());
    assert_eq!(s.host.request_headers, headers);
    let seen = s.finish("via_upstream");
    assert!(seen.counts.is_empty() && seen.log.is_none() && seen.tags.is_empty());
}

#[test]
fn an_ok_call_counts_started_handled_messages_sizes_and_logs_one_line() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(r#"{"log":{"request_id_header":"x-req"}}"#);
    let mut s = Stream::open(&envoy, &mut worker, "/pkg.Orders/Get", &[("x-req", "r-1")]);
    s.headers(false);
    s.request_body(&frame(&[1; 10]), true);
    envoy.advance(12);
    s.upstream_answers(&[2; 30], "0");
    let seen = s.finish("via_upstream");
    assert_eq!(seen.count(Family::Started, None), 1);
    assert_eq!(seen.count(Family::Handled, Some(GrpcStatus::Ok)), 1);
    assert_eq!(seen.count(Family::MsgFromClient, None), 1);
    assert_eq!(seen.count(Family::MsgToClient, None), 1);
    assert_eq!(
        seen.records,
        [(Family::RequestBytes, 10), (Family::ResponseBytes, 30), (Family::HandlingMs, 12)],
        "one size per message, then the duration"
    );
    let log = seen.log.unwrap();
    assert_eq!((log["service"].as_str(), log["method"].as_str()), (Some("pkg.Orders"), Some("Get")));
    assert_eq!((log["req_bytes"].as_u64(), log["resp_bytes"].as_u64()), (Some(10), Some(30)));
    assert_eq!((log["duration_ms"].as_u64(), log["request_id"].as_str()), (Some(12), Some("r-1")));
    assert_eq!((log["dedup"].as_str(), log["late"].as_bool()), (Some("none"), Some(false)));
}

#[test]
fn a_streaming_call_counts_its_messages_as_they_pass() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(r#"{"metrics":{"method_types":{"pkg.Orders/Watch":"server_stream"}}}"#);
    let watch = |worker: &mut Worker| {
        let mut s = Stream::open(&envoy, worker, "/pkg.Orders/Watch", &[]);
        s.headers(false);
        s.request_body(&frame(b"q"), true);
        let before_answer = s.seen.count(Family::MsgFromClient, None);
        s.response_headers(&[(":status", "200"), ("content-type", "application/grpc")], false);
        let two: Vec<u8> = [frame(b"a"), frame(b"b")].concat();
        s.response_body(&two, false);
        assert_eq!(s.seen.count(Family::MsgFromClient, None), 1);
        assert_eq!(s.seen.count(Family::MsgToClient, None), 2, "counted before the call ends");
        s.trailers(&[("grpc-status", "0")]);
        let seen = s.finish("via_upstream");
        assert_eq!(seen.count(Family::MsgToClient, None), 2, "not counted twice at the end");
        assert_eq!(seen.slots(), [1].into(), "{seen:?}");
        before_answer
    };
    // Named in the configuration, the method has its label from its first
    // call: its messages count as they pass.
    assert_eq!(watch(&mut worker), 1);
    assert_eq!(watch(&mut worker), 1);
}

/// A flood of made-up methods (answered UNIMPLEMENTED by the server) leaves
/// every label to the real ones.
#[test]
fn made_up_methods_count_as_other_and_take_no_label_from_real_ones() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(r#"{"metrics":{"max_methods":1}}"#);
    for n in 0..5 {
        let mut s = Stream::open(&envoy, &mut worker, &format!("/pkg.Orders/Made{n}"), &[]);
        s.headers(false);
        s.request_body(&frame(b"x"), true);
        s.response_headers(&[(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "12")], true);
        let seen = s.finish("via_upstream");
        assert_eq!(seen.slots(), [crate::registry::OTHER_SLOT].into());
        assert_eq!(seen.count(Family::Started, None), 1);
        assert_eq!(seen.count(Family::Handled, Some(GrpcStatus::Unimplemented)), 1);
        assert_eq!(seen.records.len(), 2, "its sizes and duration, under other");
    }
    // Nor does what a server says before it routes a call (an auth layer).
    for code in ["16", "7", "14", "8"] {
        let mut s = Stream::open(&envoy, &mut worker, "/pkg.Orders/Guarded", &[]);
        s.headers(false);
        s.request_body(&frame(b"x"), true);
        s.response_headers(&[(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", code)], true);
        assert_eq!(s.finish("via_upstream").slots(), [crate::registry::OTHER_SLOT].into(), "grpc-status {code}");
    }
    // Nor does a call nobody answered (Envoy reset it) prove a method.
    let mut s = Stream::open(&envoy, &mut worker, "/pkg.Orders/Lost", &[]);
    s.headers(false);
    s.request_body(&frame(b"x"), true);
    assert_eq!(s.finish("upstream_reset_before_response_started{connection_termination}").slots(), [0].into());
    // The one label goes to the first method the server answers otherwise,
    // even with an error.
    let seen = unary(&envoy, &mut worker, &[], b"x", "5");
    assert_eq!(seen.slots(), [1].into(), "{seen:?}");
    assert_eq!(seen.count(Family::Started, None), 1, "its first call counted once, under its label");
    assert_eq!(worker.methods.labels(1).map(|l| l.method), Some("Create"));
}

#[test]
fn a_long_client_stream_of_a_new_method_holds_a_bounded_number_of_sizes() {
    let envoy = Envoy::default();
    // Not named in the configuration: the method must earn its label.
    let mut worker = envoy.worker("{}");
    let mut s = Stream::open(&envoy, &mut worker, "/pkg.Orders/Upload", &[]);
    s.headers(false);
    for _ in 0..100 {
        s.request_body(&frame(b"chunk"), false);
    }
    assert!(s.call.as_ref().unwrap().pending.len() <= MAX_PENDING_RECORDS + 2, "sizes past the bound are not held");
    s.request_body(b"", true);
    s.upstream_answers(b"done", "0");
    let seen = s.finish("via_upstream");
    assert_eq!(seen.count(Family::MsgFromClient, None), 100, "every message counted");
    let held = seen.record_slots.iter().filter(|s| **s == 1).count();
    assert_eq!(held, MAX_PENDING_RECORDS + 2, "the held sizes, the reply's and the duration under the label");
}

#[test]
fn ok_calls_follow_the_log_sample_and_errors_are_always_logged() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(r#"{"log":{"ok_sample":0}}"#);
    assert!(unary(&envoy, &mut worker, &[], b"x", "0").log.is_none());
    let failed = unary(&envoy, &mut worker, &[], b"x", "14");
    assert_eq!(failed.log("grpc_code"), "Unavailable");
    assert_eq!(failed.count(Family::Handled, Some(GrpcStatus::Ok)), 0);
}

#[test]
fn a_malformed_path_is_logged_as_it_came_and_counted_as_other() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker("{}");
    let mut s = Stream::open(&envoy, &mut worker, "/not a method", &[]);
    s.headers(false);
    assert_eq!(s.call.as_ref().map(|c| c.method.slot), Some(crate::registry::OTHER_SLOT));
    s.request_body(&frame(b"x"), true);
    s.upstream_answers(b"y", "12");
    let seen = s.finish("via_upstream");
    assert_eq!((seen.log("service").as_str(), seen.log("method").as_str()), (Some(""), Some("/not a method")));
}

// ---------------------------------------------------------------- deadlines

#[test]
fn deadline_policy_injects_clamps_and_rejects() {
    let config = r#"{"deadline":{"default":"10s","max":"60s"}}"#;
    struct Case {
        timeout: Option<&'static str>,
        upstream_sees: Option<&'static str>,
        family: Option<Family>,
        reply: Option<GrpcStatus>,
        source: &'static str,
        deadline_ms: Option<u64>,
    }
    let cases = [
        Case {
            timeout: None,
            upstream_sees: Some("10000000u"),
            family: Some(Family::DeadlineInjected),
            reply: None,
            source: "default",
            deadline_ms: Some(10_000),
        },
        Case {
            timeout: Some("5S"),
            upstream_sees: Some("5S"),
            family: None,
            reply: None,
            source: "client",
            deadline_ms: Some(5_000),
        },
        Case {
            timeout: Some("2M"),
            upstream_sees: Some("60000000u"),
            family: Some(Family::DeadlineClamped),
            reply: None,
            source: "clamped",
            deadline_ms: Some(60_000),
        },
        Case {
            timeout: Some("1.5S"),
            upstream_sees: Some("1.5S"),
            family: Some(Family::DeadlineRejected),
            reply: Some(GrpcStatus::InvalidArgument),
            source: "invalid",
            deadline_ms: None,
        },
        Case {
            timeout: Some("0m"),
            upstream_sees: Some("0m"),
            family: Some(Family::DeadlineRejected),
            reply: Some(GrpcStatus::DeadlineExceeded),
            source: "expired",
            deadline_ms: None,
        },
    ];
    for case in cases {
        let envoy = Envoy::default();
        let mut worker = envoy.worker(config);
        let extra: Vec<(&str, &str)> = case.timeout.map(|t| ("grpc-timeout", t)).into_iter().collect();
        let mut s = Stream::open(&envoy, &mut worker, PATH, &extra);
        let next = s.headers(false);
        assert_eq!(s.request_header("grpc-timeout").as_deref(), case.upstream_sees, "{:?}", case.timeout);
        let seen = match case.reply {
            Some(status) => {
                assert_eq!(next, Next::Pause, "{:?}: the call must not reach the upstream", case.timeout);
                // Envoy's local reply is trailers-only.
                s.response_headers(&[(":status", "200"), ("grpc-status", &status.code().to_string())], true);
                let seen = s.finish("via_upstream");
                let (replied, message) = reply_status(&seen).unwrap();
                assert_eq!(replied, status);
                assert!(message.contains("grpc-timeout"), "{message}");
                assert_eq!(seen.count(Family::DeadlineRejected, Some(status)), 1);
                assert_eq!(seen.log("late"), false, "a call answered by the proxy is never late");
                seen
            }
            None => {
                assert_eq!(next, Next::Continue);
                s.request_body(&frame(b"x"), true);
                s.upstream_answers(b"y", "0");
                let seen = s.finish("via_upstream");
                if let Some(family) = case.family {
                    assert_eq!(seen.count(family, None), 1, "{:?}", case.timeout);
                }
                seen
            }
        };
        assert_eq!(seen.log("deadline_source"), case.source);
        assert_eq!(seen.log("deadline_ms").as_u64(), case.deadline_ms);
    }
}

#[test]
fn late_answers_are_counted_when_the_upstream_outlives_the_deadline_or_the_client() {
    struct Case {
        name: &'static str,
        timeout: Option<&'static str>,
        answer_after_ms: u64,
        /// `None`: no answer, the stream ends with these code details.
        answer: Option<&'static [(&'static str, &'static str)]>,
        details: &'static str,
        late: bool,
    }
    let ok: &[(&str, &str)] = &[(":status", "200"), ("grpc-status", "0")];
    let cases = [
        Case {
            name: "in time",
            timeout: Some("100m"),
            answer_after_ms: 50,
            answer: Some(ok),
            details: "via_upstream",
            late: false,
        },
        Case {
            name: "after the deadline",
            timeout: Some("100m"),
            answer_after_ms: 150,
            answer: Some(ok),
            details: "via_upstream",
            late: true,
        },
        Case {
            name: "no deadline",
            timeout: None,
            answer_after_ms: 5_000,
            answer: Some(ok),
            details: "via_upstream",
            late: false,
        },
        Case {
            name: "Envoy cut the call at its deadline",
            timeout: Some("100m"),
            answer_after_ms: 100,
            answer: Some(&[(":status", "200"), ("grpc-status", "4")]),
            details: "max_duration_timeout",
            late: true,
        },
        Case {
            name: "the upstream itself said DEADLINE_EXCEEDED in time",
            timeout: Some("100m"),
            answer_after_ms: 90,
            answer: Some(&[(":status", "200"), ("grpc-status", "4")]),
            details: "via_upstream",
            late: false,
        },
        Case {
            name: "the client left",
            timeout: None,
            answer_after_ms: 10,
            answer: None,
            details: "http2.remote_reset",
            late: true,
        },
        Case {
            name: "the upstream reset",
            timeout: None,
            answer_after_ms: 10,
            answer: None,
            details: "upstream_reset_before_response_started{remote_reset}",
            late: false,
        },
    ];
    for case in cases {
        let envoy = Envoy::default();
        let mut worker = envoy.worker("{}");
        let extra: Vec<(&str, &str)> = case.timeout.map(|t| ("grpc-timeout", t)).into_iter().collect();
        let mut s = Stream::open(&envoy, &mut worker, PATH, &extra);
        s.headers(false);
        s.request_body(&frame(b"x"), true);
        envoy.advance(case.answer_after_ms);
        if let Some(headers) = case.answer {
            s.response_headers(headers, true);
        }
        let seen = s.finish(case.details);
        assert_eq!(seen.count(Family::LateResponses, None), u64::from(case.late), "{}", case.name);
        assert_eq!(seen.log("late"), case.late, "{}", case.name);
    }
}

/// A unary handler runs only once its request message is whole: a call that
/// ended before that wasted no upstream work, however it ended.
#[test]
fn a_call_whose_message_never_went_on_is_never_late() {
    for (name, sent, details) in [
        ("the client left after its headers", &b""[..], "http2.remote_reset"),
        ("the client left mid-message", &frame(b"hello")[..7], "http2.remote_reset"),
        ("Envoy cut it at its deadline, its body never sent", &b""[..], "max_duration_timeout"),
    ] {
        let envoy = Envoy::default();
        let mut worker = envoy.worker("{}");
        let mut s = Stream::open(&envoy, &mut worker, PATH, &[("grpc-timeout", "100m")]);
        s.headers(false);
        if !sent.is_empty() {
            s.request_body(sent, false);
        }
        envoy.advance(150);
        if details == "max_duration_timeout" {
            s.response_headers(&[(":status", "200"), ("grpc-status", "4")], true);
        }
        let seen = s.finish(details);
        assert_eq!(seen.count(Family::LateResponses, None), 0, "{name}");
        assert_eq!(seen.log("late"), false, "{name}");
        assert_eq!(seen.count(Family::MsgFromClient, None), 0, "{name}: a message cut short is not counted");
    }
}

/// A status in headers that do not end the response is only read at the
/// call's end (Envoy shows the headers again in the log callback), but it
/// came when the headers did: the call is not late for how long the rest took.
#[test]
fn a_status_in_headers_read_at_the_end_counts_from_when_the_headers_came() {
    for ending in ["trailers without a status", "body to the end", "reset"] {
        let envoy = Envoy::default();
        let mut worker = envoy.worker("{}");
        let mut s = Stream::open(&envoy, &mut worker, PATH, &[("grpc-timeout", "100m")]);
        s.headers(false);
        s.request_body(&frame(b"x"), true);
        envoy.advance(10);
        s.response_headers(&[(":status", "200"), ("grpc-status", "0")], false);
        envoy.advance(500);
        match ending {
            "trailers without a status" => {
                s.response_body(&frame(b"y"), false);
                s.trailers(&[("x-other", "1")]);
            }
            "body to the end" => {
                s.response_body(&frame(b"y"), true);
            }
            _ => {}
        }
        let details =
            if ending == "reset" { "upstream_reset_after_response_started{remote_reset}" } else { "via_upstream" };
        let seen = s.finish(details);
        assert_eq!(
            (seen.log("grpc_code").as_str(), seen.log("status_source").as_str()),
            (Some("OK"), Some("headers")),
            "{ending}"
        );
        assert_eq!(seen.count(Family::LateResponses, None), 0, "{ending}");
    }
}

// ---------------------------------------------------------------- size guard

#[test]
fn a_request_message_over_the_limit_is_refused_before_the_upstream_sees_it() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(r#"{"limits":{"max_request_message_bytes":16}}"#);
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[]);
    s.headers(false);
    let big = frame(&[7; 17]);
    // The prefix arrives split across chunks; the limit acts on the prefix.
    assert_eq!(s.request_body(&big[..3], false), Next::Continue);
    assert_eq!(s.request_body(&big[3..8], false), Next::Pause);
    let seen = s.finish("local_reply");
    let (status, message) = reply_status(&seen).unwrap();
    assert_eq!(status, GrpcStatus::ResourceExhausted);
    assert!(message.contains("17 bytes") && message.contains("limit of 16"), "{message}");
    assert_eq!(seen.count(Family::RequestTooLarge, None), 1);
    assert_eq!(seen.count(Family::Refused, None), 1);
    assert_eq!(seen.log("late"), false);
}

#[test]
fn a_message_at_the_limit_passes() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(r#"{"limits":{"max_request_message_bytes":16}}"#);
    let seen = unary(&envoy, &mut worker, &[], &[7; 16], "0");
    assert!(seen.reply.is_none());
    assert_eq!(seen.count(Family::RequestTooLarge, None), 0);
}

#[test]
fn a_request_body_that_is_not_grpc_frames_is_answered_internal() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker("{}");
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[]);
    s.headers(false);
    assert_eq!(s.request_body(b"GET / HTTP/1.1", true), Next::Pause);
    let seen = s.finish("local_reply");
    assert_eq!(reply_status(&seen).map(|r| r.0), Some(GrpcStatus::Internal));
    assert_eq!(seen.guard_counts, [guard::BAD_FRAMES]);
    assert_eq!(seen.count(Family::Refused, None), 1, "the error-ratio alert subtracts it");
}

#[test]
fn a_retried_attempt_is_counted_and_the_line_carries_its_trace_and_attempts() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker("{}");
    let retry = [
        ("grpc-previous-rpc-attempts", "2"),
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ("x-b3-traceid", "463ac35c9f6413ad"),
    ];
    let seen = unary(&envoy, &mut worker, &retry, b"x", "0");
    assert_eq!(seen.count(Family::Retried, None), 1);
    assert_eq!(seen.log("previous_attempts"), 2);
    assert_eq!(seen.log("trace_id"), "4bf92f3577b34da6a3ce929d0e0e4736");

    let first = unary(&envoy, &mut worker, &[("x-b3-traceid", "463ac35c9f6413ad")], b"x", "0");
    assert_eq!(first.count(Family::Retried, None), 0);
    assert_eq!(first.log("previous_attempts"), 0);
    assert_eq!(first.log("trace_id"), "463ac35c9f6413ad", "B3 when there is no traceparent");
    let junk = unary(&envoy, &mut worker, &[("grpc-previous-rpc-attempts", "-1"), ("traceparent", "x")], b"x", "0");
    assert_eq!((junk.count(Family::Retried, None), junk.log("trace_id").is_null()), (0, true));
}

// ---------------------------------------------------------------- dedup

const DEDUP: &str = r#"{"dedup":{"methods":["pkg.Orders/Create"]}}"#;
const KEY: &str = "idempotency-key";

/// A retry that finds its key done: it must be marked for the replay hop,
/// never sent upstream as gRPC.
fn assert_sent_to_replay_hop(s: &Stream) {
    assert_eq!(s.request_header("content-type").as_deref(), Some(crate::dedup::REPLAY_CONTENT_TYPE));
    assert!(s.seen.marked, "marked for the replay route");
    assert_eq!(s.request_header("content-length"), None, "its emptied body declares no length");
    assert_eq!(s.request_header(":path"), Some(format!("{}{PATH}", crate::dedup::REPLAY_PATH_PREFIX)));
}

/// The internal listener's plain 200 and its placeholder body, as Envoy
/// delivers them (the end of stream sometimes as a separate empty chunk).
fn replay_hop_answers(s: &mut Stream, split: bool) {
    let placeholder = b"grpc-guard replay";
    s.response_headers(&[(":status", "200"), ("content-type", "text/plain"), ("content-length", "17")], false);
    if split {
        assert_eq!(s.response_body(placeholder, false), Next::Pause, "held until the kept answer replaces it");
        assert_eq!(s.response_body(b"", true), Next::Continue);
    } else {
        assert_eq!(s.response_body(placeholder, true), Next::Continue);
    }
}

#[test]
fn a_configured_x_idempotency_key_header_and_the_drafts_quoted_form_name_the_same_key() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(r#"{"dedup":{"methods":["pkg.Orders/Create"],"header":"x-idempotency-key"}}"#);
    let first = unary(&envoy, &mut worker, &[("x-idempotency-key", "order-1")], b"create 1", "0");
    assert_eq!(first.log("dedup"), "first");
    // The same key written as the draft's Structured Field string is a retry.
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[("x-idempotency-key", "\"order-1\"")]);
    assert_eq!(s.headers(false), Next::Continue);
    assert_sent_to_replay_hop(&s);
    // Under this configuration the default header carries no key.
    let other = unary(&envoy, &mut worker, &[(KEY, "order-1")], b"create 1", "0");
    assert_eq!(other.log("dedup"), "none");
}

#[test]
fn a_retry_of_a_kept_ok_answer_is_replayed_through_the_hop_without_running() {
    for split in [false, true] {
        let envoy = Envoy::default();
        let mut worker = envoy.worker(DEDUP);
        let first = unary(&envoy, &mut worker, &[(KEY, "order-1")], b"create 1", "0");
        assert_eq!(first.log("dedup"), "first");
        assert_eq!(first.count(Family::DedupFirst, None), 1);

        let mut s = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "order-1")]);
        assert_eq!(s.headers(false), Next::Continue);
        assert_sent_to_replay_hop(&s);
        let request = frame(b"create 1");
        assert_eq!(s.request_body(&request[..4], false), Next::Continue);
        assert!(s.host.request_chunk.is_empty(), "the retry's bytes go on emptied: none reaches even the hop");
        assert_eq!(s.request_body(&request[4..], true), Next::Continue);
        assert!(s.host.request_chunk.is_empty());
        replay_hop_answers(&mut s, split);
        assert_eq!(get(&s.host.response_headers, "content-type"), Some(&b"application/grpc"[..]));
        assert_eq!(get(&s.host.response_headers, "content-length"), None);
        assert_eq!(get(&s.host.response_headers, crate::dedup::REPLAYED_HEADER), Some(&b"true"[..]));
        assert_eq!(s.host.response_chunk, frame(b"reply"), "the kept message replaces the placeholder");
        assert_eq!(get(&s.host.trailers, "grpc-status"), Some(&b"0"[..]));
        let seen = s.finish("via_upstream");
        assert!(seen.reply.is_none());
        assert_eq!(seen.log("dedup"), "replay");
        assert_eq!(seen.log("grpc_code"), "OK");
        assert_eq!(seen.log("resp_bytes"), 5, "the replayed message is counted");
        assert_eq!(seen.count(Family::DedupReplayed, None), 1);
        assert_eq!(seen.count(Family::Handled, Some(GrpcStatus::Ok)), 1);
    }
}

#[test]
fn a_request_that_ends_with_trailers_is_a_whole_request() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(DEDUP);
    // The first call ends with trailers and the client then cancels: it may
    // have run.
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "k")]);
    s.headers(false);
    s.request_body(&frame(b"x"), false);
    assert_eq!(s.request_trailers(), Next::Continue);
    s.finish("http2.remote_reset");
    // A retry with another body, ended by trailers, is refused at its end.
    let mut retry = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "k")]);
    retry.headers(false);
    retry.request_body(&frame(b"y"), false);
    assert_eq!(retry.request_trailers(), Next::Pause);
    assert_eq!(reply_status(&retry.finish("local_reply")).map(|r| r.0), Some(GrpcStatus::InvalidArgument));
    // The same body, ended by trailers: told it may have run.
    let mut again = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "k")]);
    again.headers(false);
    again.request_body(&frame(b"x"), false);
    assert_eq!(again.request_trailers(), Next::Pause);
    assert_eq!(reply_status(&again.finish("local_reply")).map(|r| r.0), Some(GrpcStatus::FailedPrecondition));
}

#[test]
fn an_upstream_that_answered_before_the_request_ended_keeps_its_answer() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(DEDUP);
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "k")]);
    s.headers(false);
    s.request_body(&frame(b"x"), false);
    s.upstream_answers(b"done", "0");
    s.finish("via_upstream");
    let mut retry = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "k")]);
    retry.headers(false);
    assert!(retry.seen.marked, "the answer was kept: the retry is replayed");
}

#[test]
fn a_bodyless_retry_is_checked_at_its_headers() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(DEDUP);
    unary(&envoy, &mut worker, &[(KEY, "k")], b"pay", "0");
    let mut retry = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "k")]);
    assert_eq!(retry.headers(true), Next::Pause);
    let seen = retry.finish("local_reply");
    assert_eq!(reply_status(&seen).map(|r| r.0), Some(GrpcStatus::InvalidArgument));
    assert_eq!(seen.log("dedup"), "mismatch");
}

#[test]
fn a_call_that_sent_no_whole_message_frees_its_key_whoever_answered() {
    // A unary handler runs on a whole message: an upstream that answers
    // from the headers (UNIMPLEMENTED) or from a message's prefix
    // (OUT_OF_RANGE, "message too large") has run nothing, and a key kept
    // then would hold the fingerprint of a part of the request.
    let envoy = Envoy::default();
    let mut worker = envoy.worker(DEDUP);
    let message = frame(&[7; 64]);
    for (code, sent) in [("12", &message[..0]), ("11", &message[..20])] {
        let mut s = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "k")]);
        assert_eq!(s.headers(sent.is_empty()), Next::Continue);
        if !sent.is_empty() {
            s.request_body(sent, false);
        }
        s.upstream_answers(b"", code);
        assert_eq!(s.finish("via_upstream").log("dedup"), "first", "code {code}");
    }
    // The whole request runs: the key is claimed again, and kept.
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "k")]);
    s.headers(false);
    s.request_body(&message, true);
    s.upstream_answers(b"", "11");
    s.finish("via_upstream");
    let length = message.len().to_string();
    let mut retry = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "k"), ("content-length", &length)]);
    retry.headers(false);
    assert_sent_to_replay_hop(&retry);
}

#[test]
fn a_retry_while_the_first_call_runs_is_aborted_on_any_worker() {
    let envoy = Envoy::default();
    let mut a = envoy.worker(DEDUP);
    let mut b = envoy.worker(DEDUP);
    let mut first = Stream::open(&envoy, &mut a, PATH, &[(KEY, "pay-1")]);
    first.headers(false);
    first.request_body(&frame(b"pay"), true);
    let mut retry = Stream::open(&envoy, &mut b, PATH, &[(KEY, "pay-1")]);
    assert_eq!(retry.headers(false), Next::Pause);
    let seen = retry.finish("local_reply");
    let (status, message) = reply_status(&seen).unwrap();
    assert_eq!(status, GrpcStatus::Aborted);
    assert!(message.contains("in progress; retry"), "{message}");
    assert_eq!((seen.log("dedup").as_str(), seen.count(Family::DedupInFlight, None)), (Some("in_flight"), 1));
    first.upstream_answers(b"paid", "0");
    first.finish("via_upstream");
}

#[test]
fn the_same_key_with_another_request_is_invalid_argument() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(DEDUP);
    unary(&envoy, &mut worker, &[(KEY, "k")], b"order 1", "0");
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "k")]);
    s.headers(false);
    assert_eq!(s.request_body(&frame(b"order 2"), true), Next::Pause);
    let seen = s.finish("local_reply");
    assert_eq!(
        reply_status(&seen),
        Some((GrpcStatus::InvalidArgument, "grpc-guard: idempotency key reused with a different request"))
    );
    assert_eq!((seen.log("dedup").as_str(), seen.count(Family::DedupMismatch, None)), (Some("mismatch"), 1));
}

#[test]
fn an_answer_too_large_to_keep_makes_retries_already_exists() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(r#"{"dedup":{"methods":["pkg.Orders/Create"],"max_response_bytes":8}}"#);
    let first = unary(&envoy, &mut worker, &[(KEY, "k")], b"x", "0");
    assert_eq!(first.log("dedup"), "not_kept");
    let s = Stream::keyed_x(&envoy, &mut worker);
    let seen = s.finish("local_reply");
    assert_eq!(reply_status(&seen).map(|r| r.0), Some(GrpcStatus::AlreadyExists));
    assert_eq!((seen.log("dedup").as_str(), seen.count(Family::DedupNotKept, None)), (Some("not_kept"), 1));
}

#[test]
fn a_kept_error_is_replayed_locally_with_its_message() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(DEDUP);
    let mut s = Stream::keyed_x(&envoy, &mut worker);
    s.response_headers(&[(":status", "200"), ("grpc-status", "5"), ("grpc-message", "no%20such%20order")], true);
    s.finish("via_upstream");
    let mut retry = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "k")]);
    retry.headers(false);
    assert_eq!(retry.request_body(&frame(b"x"), true), Next::Pause);
    let seen = retry.finish("local_reply");
    let (code, headers) = reply_headers(&seen).unwrap();
    assert_eq!(code, 200);
    let header = |n: &str| header_of(headers, n);
    assert_eq!(header("grpc-status"), Some("5"));
    assert_eq!(header("grpc-message"), Some("no%20such%20order"), "sent as it was kept, not encoded again");
    assert_eq!(header(crate::dedup::REPLAYED_HEADER), Some("true"));
    assert_eq!((seen.log("dedup").as_str(), seen.count(Family::DedupReplayed, None)), (Some("replay"), 1));
}

/// How a first call ends, as Envoy reports it to the filter.
struct FirstEnding {
    name: &'static str,
    /// The request's end reaches the filter (and goes on).
    complete: bool,
    /// Response headers, if any; `end` when they end the stream.
    headers: Option<(&'static [(&'static str, &'static str)], bool)>,
    details: &'static str,
    /// An upstream connection carried the request.
    sent: bool,
}

/// What a retry of the same key and request gets after `ending`.
#[derive(Debug, PartialEq)]
enum RetryGets {
    /// It runs upstream (the key was freed).
    Runs,
    /// The first call's answer, replayed.
    Replay,
    /// FAILED_PRECONDITION: the first call may have run.
    MayHaveRun,
}

fn retry_after(ending: &FirstEnding) -> RetryGets {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(DEDUP);
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "k")]);
    s.headers(false);
    let message = frame(b"x");
    if ending.complete {
        s.request_body(&message, true);
    } else {
        // The prefix and part of the message: no handler has it yet.
        s.request_body(&message[..5], false);
    }
    if let Some((headers, end)) = ending.headers {
        s.response_headers(headers, end);
    }
    if !ending.sent {
        s.property("upstream.local_address", None);
    }
    assert_eq!(s.finish(ending.details).log("dedup"), "first", "{}", ending.name);
    let mut retry = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "k")]);
    if retry.headers(false) == Next::Pause {
        let seen = retry.finish("local_reply");
        assert_eq!(reply_status(&seen).map(|r| r.0), Some(GrpcStatus::FailedPrecondition), "{}", ending.name);
        assert_eq!(seen.log("dedup"), "unknown");
        return RetryGets::MayHaveRun;
    }
    if !retry.seen.marked {
        assert_eq!(retry.request_header("content-type").as_deref(), Some("application/grpc"), "{}", ending.name);
        return RetryGets::Runs;
    }
    retry.request_body(&frame(b"x"), true);
    let seen = retry.finish("local_reply");
    match reply_status(&seen) {
        Some((GrpcStatus::FailedPrecondition, message)) => {
            assert!(message.contains("may have run"), "{message}");
            assert_eq!((seen.log("dedup").as_str(), seen.count(Family::DedupUnknown, None)), (Some("unknown"), 1));
            RetryGets::MayHaveRun
        }
        None if reply_headers(&seen).is_some() => RetryGets::Replay,
        other => panic!("{}: the retry got {other:?}", ending.name),
    }
}

#[test]
fn a_key_is_freed_only_when_the_first_call_provably_did_not_run() {
    let grpc_200: &[(&str, &str)] = &[(":status", "200"), ("content-type", "application/grpc")];
    let cases = [
        (
            FirstEnding {
                name: "upstream UNAVAILABLE",
                complete: true,
                headers: Some((&[(":status", "200"), ("grpc-status", "14")], true)),
                details: "via_upstream",
                sent: true,
            },
            RetryGets::Runs,
        ),
        (
            FirstEnding {
                name: "upstream RESOURCE_EXHAUSTED",
                complete: true,
                headers: Some((&[(":status", "200"), ("grpc-status", "8")], true)),
                details: "via_upstream",
                sent: true,
            },
            RetryGets::Runs,
        ),
        (
            FirstEnding {
                name: "upstream ABORTED",
                complete: true,
                headers: Some((&[(":status", "200"), ("grpc-status", "10")], true)),
                details: "via_upstream",
                sent: true,
            },
            RetryGets::Runs,
        ),
        (
            FirstEnding {
                name: "upstream HTTP 404",
                complete: true,
                headers: Some((&[(":status", "404")], true)),
                details: "via_upstream",
                sent: true,
            },
            RetryGets::Runs,
        ),
        (
            FirstEnding {
                name: "connection refused",
                complete: true,
                headers: Some((&[(":status", "200"), ("grpc-status", "14")], true)),
                details: "upstream_reset_before_response_started{remote_connection_failure}",
                sent: false,
            },
            RetryGets::Runs,
        ),
        (
            FirstEnding {
                name: "the client left before its request message was whole",
                complete: false,
                headers: None,
                details: "http2.remote_reset",
                sent: true,
            },
            RetryGets::Runs,
        ),
        (
            FirstEnding {
                name: "the client left after its message, before its end of stream",
                complete: true,
                headers: None,
                details: "http2.remote_reset",
                sent: true,
            },
            RetryGets::MayHaveRun,
        ),
        (
            FirstEnding {
                name: "upstream NOT_FOUND",
                complete: true,
                headers: Some((&[(":status", "200"), ("grpc-status", "5")], true)),
                details: "via_upstream",
                sent: true,
            },
            RetryGets::Replay,
        ),
        (
            FirstEnding {
                name: "upstream INTERNAL",
                complete: true,
                headers: Some((&[(":status", "200"), ("grpc-status", "13")], true)),
                details: "via_upstream",
                sent: true,
            },
            RetryGets::MayHaveRun,
        ),
        (
            FirstEnding {
                name: "upstream UNKNOWN",
                complete: true,
                headers: Some((&[(":status", "200"), ("grpc-status", "2")], true)),
                details: "via_upstream",
                sent: true,
            },
            RetryGets::MayHaveRun,
        ),
        (
            FirstEnding {
                name: "upstream DEADLINE_EXCEEDED",
                complete: true,
                headers: Some((&[(":status", "200"), ("grpc-status", "4")], true)),
                details: "via_upstream",
                sent: true,
            },
            RetryGets::MayHaveRun,
        ),
        (
            FirstEnding {
                name: "Envoy cut the call at its deadline",
                complete: true,
                headers: Some((&[(":status", "200"), ("grpc-status", "4")], true)),
                details: "max_duration_timeout",
                sent: true,
            },
            RetryGets::MayHaveRun,
        ),
        (
            FirstEnding {
                name: "the client cancelled after its request went on",
                complete: true,
                headers: None,
                details: "http2.remote_reset",
                sent: true,
            },
            RetryGets::MayHaveRun,
        ),
        (
            FirstEnding {
                name: "the upstream reset mid-answer",
                complete: true,
                headers: Some((grpc_200, false)),
                details: "upstream_reset_after_response_started{remote_reset}",
                sent: true,
            },
            RetryGets::MayHaveRun,
        ),
        (
            FirstEnding {
                name: "the upstream reset before answering (Envoy's UNAVAILABLE)",
                complete: true,
                headers: Some((&[(":status", "200"), ("grpc-status", "14")], true)),
                details: "upstream_reset_before_response_started{remote_reset}",
                sent: true,
            },
            RetryGets::MayHaveRun,
        ),
        (
            FirstEnding {
                name: "upstream HTTP 500",
                complete: true,
                headers: Some((&[(":status", "500")], true)),
                details: "via_upstream",
                sent: true,
            },
            RetryGets::MayHaveRun,
        ),
    ];
    for (ending, expected) in cases {
        assert_eq!(retry_after(&ending), expected, "{}", ending.name);
    }
}

#[test]
fn a_call_the_filter_refused_frees_its_key() {
    let envoy = Envoy::default();
    let config = r#"{"limits":{"max_request_message_bytes":4},"dedup":{"methods":["pkg.Orders/Create"]}}"#;
    let mut worker = envoy.worker(config);
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "k")]);
    s.headers(false);
    assert_eq!(s.request_body(&frame(b"too big"), true), Next::Pause);
    s.finish("local_reply");
    let retry = unary(&envoy, &mut worker, &[(KEY, "k")], b"ok", "0");
    assert_eq!(retry.log("dedup"), "first");
}

#[test]
fn a_refusal_after_a_message_went_on_keeps_the_key_as_may_have_run() {
    // The first message reached the upstream (which may act on it at once,
    // as grpc-go does); the second broke the limit and grpc-guard answered.
    let envoy = Envoy::default();
    let config = r#"{"limits":{"max_request_message_bytes":4},"dedup":{"methods":["pkg.Orders/Create"]}}"#;
    let mut worker = envoy.worker(config);
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "k")]);
    s.headers(false);
    assert_eq!(s.request_body(&frame(b"ok"), false), Next::Continue);
    assert_eq!(s.request_body(&frame(b"too big"), true), Next::Pause);
    s.property("upstream.local_address", Some("127.0.0.1:40000"));
    s.finish("local_reply");
    let mut retry = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "k")]);
    retry.headers(false);
    retry.request_body(&[frame(b"ok"), frame(b"too big")].concat(), true);
    let seen = retry.finish("local_reply");
    assert_eq!(reply_status(&seen).map(|r| r.0), Some(GrpcStatus::FailedPrecondition));
}

#[test]
fn a_metadata_scope_part_that_is_not_text_names_nobody() {
    let envoy = Envoy::default();
    let config = r#"{"dedup":{"methods":["pkg.Orders/Create"],"scope":["metadata:jwt/payload"]}}"#;
    let mut worker = envoy.worker(config);
    for (value, anonymous) in [("\n\x05alice\x12\x02", true), ("alice", false)] {
        let mut s = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "k")]);
        s.property("metadata.filter_metadata.jwt.payload", Some(value));
        let next = s.headers(false);
        assert_eq!(next == Next::Pause, anonymous, "{value:?}");
        if anonymous {
            let seen = s.finish("local_reply");
            assert_eq!(reply_status(&seen).map(|r| r.0), Some(GrpcStatus::Unauthenticated));
        }
    }
}

#[test]
fn a_claim_whose_stream_vanished_is_answered_may_have_run_until_the_ttl() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(r#"{"dedup":{"methods":["pkg.Orders/Create"],"ttl":"60s"}}"#);
    let mut lost = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "k"), ("grpc-timeout", "1S")]);
    lost.headers(false);
    lost.request_body(&frame(b"x"), true);
    drop(lost);
    envoy.advance(2_500);
    let mut retry = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "k")]);
    assert_eq!(retry.headers(false), Next::Pause);
    assert_eq!(reply_status(&retry.finish("local_reply")).map(|r| r.0), Some(GrpcStatus::FailedPrecondition));
    envoy.advance(60_000);
    assert_eq!(unary(&envoy, &mut worker, &[(KEY, "k")], b"x", "0").log("dedup"), "first");
}

#[test]
fn a_keyed_call_runs_within_the_keys_ttl_and_a_keyless_one_keeps_its_deadline() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(r#"{"dedup":{"methods":["pkg.Orders/Create"],"ttl":"30s"}}"#);
    let mut keyed = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "k")]);
    keyed.headers(false);
    assert_eq!(keyed.request_header("grpc-timeout").as_deref(), Some("30000000u"));
    let mut long = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "k2"), ("grpc-timeout", "5M")]);
    long.headers(false);
    assert_eq!(long.request_header("grpc-timeout").as_deref(), Some("30000000u"));
    let mut keyless = Stream::open(&envoy, &mut worker, PATH, &[("grpc-timeout", "5M")]);
    keyless.headers(false);
    assert_eq!(keyless.request_header("grpc-timeout").as_deref(), Some("5M"));
}

#[test]
fn a_bad_or_missing_key_is_refused_with_the_header_named() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(r#"{"dedup":{"methods":["pkg.Orders/Create"],"require_key":true}}"#);
    for extra in [&[][..], &[(KEY, "a b")][..]] {
        let mut s = Stream::open(&envoy, &mut worker, PATH, extra);
        assert_eq!(s.headers(false), Next::Pause);
        let seen = s.finish("local_reply");
        let (status, message) = reply_status(&seen).unwrap();
        assert_eq!(status, GrpcStatus::InvalidArgument);
        assert!(message.contains(KEY), "{message}");
        assert_eq!((seen.log("dedup").as_str(), seen.count(Family::DedupKeyRejected, None)), (Some("bad_key"), 1));
    }
}

#[test]
fn a_call_without_a_key_runs_undeduplicated_unless_one_is_required() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(DEDUP);
    let seen = unary(&envoy, &mut worker, &[], b"x", "0");
    assert_eq!(seen.log("dedup"), "none");
    assert_eq!(seen.count(Family::DedupFirst, None), 0);
}

#[test]
fn a_full_table_rejects_or_forwards_as_configured() {
    for (when_full, next, reply) in
        [("reject", Next::Pause, Some(GrpcStatus::ResourceExhausted)), ("forward", Next::Continue, None)]
    {
        let envoy = Envoy::default();
        // One bucket of eight ways, any caller may fill it.
        let config = format!(
            r#"{{"dedup":{{"methods":["pkg.Orders/Create"],"max_entries":8,"caller_share":1,"when_full":"{when_full}"}}}}"#
        );
        let mut worker = envoy.worker(&config);
        let mut other = envoy.worker(&config);
        let mut holders = Vec::new();
        for n in 0..crate::dedup::WAYS {
            let mut holder = Stream::open(&envoy, &mut other, PATH, &[(KEY, &format!("held-{n}"))]);
            assert_eq!(holder.headers(false), Next::Continue);
            holders.push(holder.call.take());
        }
        let mut s = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "b")]);
        assert_eq!(s.headers(false), next, "{when_full}");
        if next == Next::Continue {
            assert_eq!(s.request_header("content-type").as_deref(), Some("application/grpc"));
        }
        let seen = s.finish("local_reply");
        assert_eq!(reply_status(&seen).map(|r| r.0), reply, "{when_full}");
        assert_eq!((seen.log("dedup").as_str(), seen.count(Family::DedupFull, None)), (Some("full"), 1));
    }
}

#[test]
fn a_missing_replay_hop_sends_its_answer_on_unmarked() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(DEDUP);
    unary(&envoy, &mut worker, &[(KEY, "k")], b"x", "0");
    let mut s = Stream::keyed_x(&envoy, &mut worker);
    // No replay route: the marked path reached the service, which has no such method.
    s.response_headers(&[(":status", "200"), ("grpc-status", "12")], true);
    assert_eq!(get(&s.host.response_headers, crate::dedup::REPLAYED_HEADER), None);
    let seen = s.finish("via_upstream");
    assert_eq!(
        (seen.log("dedup").as_str(), seen.log("grpc_code").as_str()),
        (Some("replay_failed"), Some("Unimplemented"))
    );
    assert_eq!(seen.count(Family::DedupReplayed, None), 0);
}

#[test]
fn keys_are_scoped_by_the_caller() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(DEDUP);
    unary(&envoy, &mut worker, &[(KEY, "same"), ("authorization", "Bearer a")], b"x", "0");
    let other = unary(&envoy, &mut worker, &[(KEY, "same"), ("authorization", "Bearer b")], b"x", "0");
    assert_eq!(other.log("dedup"), "first", "another caller's key is another key");
}

#[test]
fn only_the_filter_marks_a_request_for_the_replay_route() {
    let envoy = Envoy::default();
    for config in ["{}", DEDUP] {
        let mut worker = envoy.worker(config);
        let mut s = Stream::open(&envoy, &mut worker, PATH, &[("x-grpc-guard-replay", "1"), (KEY, "fresh")]);
        s.headers(false);
        assert!(!s.seen.marked, "{config}: a header is not the mark");
        assert_eq!(s.request_header("content-type").as_deref(), Some("application/grpc"));
    }
}

#[test]
fn a_compressed_answer_is_replayed_with_its_encoding_content_type_and_metadata() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(DEDUP);
    let mut s = Stream::keyed_x(&envoy, &mut worker);
    let headers = [
        (":status", "200"),
        ("content-type", "application/grpc+proto"),
        ("grpc-encoding", "gzip"),
        ("grpc-accept-encoding", "gzip"),
        ("x-order-id", "o-17"),
        ("date", "Mon, 30 Nov 2026 12:00:00 GMT"),
        ("x-envoy-upstream-service-time", "3"),
    ];
    s.response_headers(&headers, false);
    let compressed = [vec![1], 4u32.to_be_bytes().to_vec(), b"gzip".to_vec()].concat();
    s.response_body(&compressed, false);
    s.trailers(&[("grpc-status", "0"), ("x-trace", "t")]);
    s.finish("via_upstream");

    let mut retry = Stream::keyed_x(&envoy, &mut worker);
    replay_hop_answers(&mut retry, false);
    let header = |n: &str| get(&retry.host.response_headers, n).map(|v| String::from_utf8(v.to_vec()).unwrap());
    assert_eq!(header("content-type").as_deref(), Some("application/grpc+proto"));
    assert_eq!(header("grpc-encoding").as_deref(), Some("gzip"));
    assert_eq!(header("grpc-accept-encoding").as_deref(), Some("gzip"));
    assert_eq!(header("x-order-id").as_deref(), Some("o-17"));
    assert_eq!(header("content-length"), None);
    assert_eq!(retry.host.response_chunk, compressed);
    assert_eq!(get(&retry.host.trailers, "x-trace"), Some(&b"t"[..]));
    assert_eq!(retry.finish("via_upstream").log("dedup"), "replay");
}

#[test]
fn a_kept_error_keeps_its_status_details_and_metadata() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(DEDUP);
    let mut s = Stream::keyed_x(&envoy, &mut worker);
    let answer = [
        (":status", "200"),
        ("content-type", "application/grpc"),
        ("grpc-status", "9"),
        ("grpc-message", "out%20of%20stock"),
        ("grpc-status-details-bin", "CAkSDG91dCBvZiBzdG9jaw"),
        ("x-retry-after", "never"),
    ];
    s.response_headers(&answer, true);
    s.finish("via_upstream");
    let retry = Stream::keyed_x(&envoy, &mut worker);
    let seen = retry.finish("local_reply");
    let (_, headers) = reply_headers(&seen).unwrap();
    assert_eq!(header_of(headers, "grpc-status"), Some("9"));
    assert_eq!(header_of(headers, "grpc-status-details-bin"), Some("CAkSDG91dCBvZiBzdG9jaw"));
    assert_eq!(header_of(headers, "x-retry-after"), Some("never"));
    assert_eq!(header_of(headers, crate::dedup::REPLAYED_HEADER), Some("true"));
}

#[test]
fn metadata_over_its_bound_is_not_kept_and_the_retry_is_told_the_call_ran() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(r#"{"dedup":{"methods":["pkg.Orders/Create"],"max_metadata_bytes":100}}"#);
    let mut s = Stream::keyed_x(&envoy, &mut worker);
    let big = "v".repeat(100);
    s.response_headers(&[(":status", "200"), ("content-type", "application/grpc"), ("x-big", &big)], false);
    s.response_body(&frame(b"ok"), false);
    s.trailers(&[("grpc-status", "0")]);
    assert_eq!(s.finish("via_upstream").log("dedup"), "not_kept");
    let retry = Stream::keyed_x(&envoy, &mut worker);
    assert_eq!(reply_status(&retry.finish("local_reply")).map(|r| r.0), Some(GrpcStatus::AlreadyExists));
}

#[test]
fn a_grpc_call_dressed_as_another_content_type_is_refused_on_a_method_path() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(r#"{"limits":{"max_request_message_bytes":1024}}"#);
    for content_type in [Some("application/x-grpc-disguised"), Some("application/json"), None] {
        let mut headers: Map =
            vec![(":method".into(), b"POST".to_vec()), (":path".into(), b"/pkg.Orders/Create?x=1".to_vec())];
        if let Some(ct) = content_type {
            headers.push(("content-type".into(), ct.as_bytes().to_vec()));
        }
        let mut s = Stream::with_headers(&envoy, &mut worker, headers);
        assert_eq!(s.headers(false), Next::Pause, "{content_type:?}");
        s.response_headers(&[(":status", "415"), ("grpc-status", "13")], true);
        let seen = s.finish("local_reply");
        let (code, headers) = reply_headers(&seen).unwrap();
        assert_eq!((code, header_of(headers, "grpc-status")), (415, Some("13")));
        assert!(header_of(headers, "grpc-message").unwrap().contains("/pkg.Orders/Create is a gRPC method"));
        assert_eq!(seen.guard_counts, [guard::NON_GRPC_REFUSED]);
        assert_eq!(seen.count(Family::Refused, None), 1, "the error-ratio alert subtracts it");
        assert_eq!(seen.count(Family::Handled, Some(GrpcStatus::Internal)), 1);
        assert_eq!((seen.log("method").as_str(), seen.log("http_status").as_u64()), (Some("Create"), Some(415)));
    }
}

#[test]
fn non_grpc_traffic_elsewhere_passes_untouched_and_pass_lets_it_through_anywhere() {
    let envoy = Envoy::default();
    for (config, path) in
        [("{}", "/index.html"), ("{}", "/v1/orders/17"), (r#"{"non_grpc":"pass"}"#, "/pkg.Orders/Create")]
    {
        let mut worker = envoy.worker(config);
        let headers: Map =
            vec![(":path".into(), path.as_bytes().to_vec()), ("content-type".into(), b"application/json".to_vec())];
        let mut s = Stream::with_headers(&envoy, &mut worker, headers.clone());
        assert_eq!(s.headers(false), Next::Continue, "{config} {path}");
        assert!(s.call.is_none());
        assert_eq!(s.host.request_headers, headers);
    }
}

#[test]
fn a_query_string_does_not_hide_the_method_from_its_guards() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(DEDUP);
    unary(&envoy, &mut worker, &[(KEY, "k")], b"x", "0");
    let mut s = Stream::open(&envoy, &mut worker, &format!("{PATH}?ignored=1"), &[(KEY, "k")]);
    s.headers(false);
    assert!(s.seen.marked, "the same method and key: a retry, sent to the replay hop");
}

#[test]
fn a_keyed_call_without_any_caller_identity_is_refused_or_forwarded_as_configured() {
    let envoy = Envoy::default();
    for (anonymous, next) in [("reject", Next::Pause), ("forward", Next::Continue)] {
        let config = format!(r#"{{"dedup":{{"methods":["pkg.Orders/Create"],"anonymous":"{anonymous}"}}}}"#);
        let mut worker = envoy.worker(&config);
        let mut s = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "k")]);
        s.property("source.principal", None);
        assert_eq!(s.headers(false), next, "{anonymous}");
        let seen = s.finish("local_reply");
        if next == Next::Pause {
            let (status, message) = reply_status(&seen).unwrap();
            assert_eq!(status, GrpcStatus::Unauthenticated);
            assert!(message.contains("caller identity"), "{message}");
        }
        assert_eq!((seen.log("dedup").as_str(), seen.count(Family::DedupAnonymous, None)), (Some("anonymous"), 1));
    }
}

#[test]
fn the_verified_jwt_subject_keeps_keys_apart_behind_one_gateway() {
    let envoy = Envoy::default();
    let config = r#"{"dedup":{"methods":["pkg.Orders/Create"],
        "scope":["source.principal","metadata:envoy.filters.http.jwt_authn/payload/sub"]}}"#;
    let mut worker = envoy.worker(config);
    let call = |worker: &mut Worker, user: &str| {
        let mut s = Stream::open(&envoy, worker, PATH, &[(KEY, "same")]);
        s.property("source.principal", Some("spiffe://cluster.local/ns/istio-system/sa/gateway"));
        s.property("metadata.filter_metadata.envoy.filters.http.jwt_authn.payload.sub", Some(user));
        s.headers(false);
        let marked = s.seen.marked;
        if !marked {
            s.request_body(&frame(b"x"), true);
            s.upstream_answers(b"y", "0");
        }
        s.finish("via_upstream");
        marked
    };
    assert!(!call(&mut worker, "alice"));
    assert!(!call(&mut worker, "bob"), "bob's key is not alice's");
    assert!(call(&mut worker, "alice"), "alice's retry is a retry");
}

#[test]
fn a_caller_over_its_share_is_refused_while_others_still_get_keys() {
    let envoy = Envoy::default();
    let config = r#"{"dedup":{"methods":["pkg.Orders/Create"],"max_entries":8,"caller_share":0.25}}"#;
    let mut worker = envoy.worker(config);
    let mut held = Vec::new();
    for n in 0..2 {
        let mut s = Stream::open(&envoy, &mut worker, PATH, &[(KEY, &format!("greedy-{n}"))]);
        s.property("source.principal", Some("greedy"));
        assert_eq!(s.headers(false), Next::Continue);
        held.push(s.call.take());
    }
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "greedy-2")]);
    s.property("source.principal", Some("greedy"));
    assert_eq!(s.headers(false), Next::Pause);
    let seen = s.finish("local_reply");
    assert_eq!(reply_status(&seen).map(|r| r.0), Some(GrpcStatus::ResourceExhausted));
    assert_eq!((seen.log("dedup").as_str(), seen.count(Family::DedupCallerFull, None)), (Some("caller_full"), 1));
    let other = unary(&envoy, &mut worker, &[(KEY, "modest")], b"x", "0");
    assert_eq!(other.log("dedup"), "first");
}

#[test]
fn a_replay_keeps_every_value_of_a_repeated_header() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(DEDUP);
    let mut s = Stream::keyed_x(&envoy, &mut worker);
    s.response_headers(
        &[(":status", "200"), ("content-type", "application/grpc"), ("x-multi", "a"), ("x-multi", "b")],
        false,
    );
    s.response_body(&frame(b"y"), false);
    s.trailers(&[("grpc-status", "0")]);
    s.finish("via_upstream");
    let mut retry = Stream::keyed_x(&envoy, &mut worker);
    replay_hop_answers(&mut retry, false);
    let values: Vec<&[u8]> =
        retry.host.response_headers.iter().filter(|(n, _)| n == "x-multi").map(|(_, v)| v.as_slice()).collect();
    assert_eq!(values, [&b"a"[..], b"b"]);
}

#[test]
fn a_status_in_the_headers_stands_when_the_trailers_carry_none() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(DEDUP);
    let mut s = Stream::keyed_x(&envoy, &mut worker);
    s.response_headers(&[(":status", "200"), ("grpc-status", "5"), ("grpc-message", "gone")], false);
    s.trailers(&[("x-t", "1")]);
    assert_eq!(s.finish("via_upstream").log("grpc_code"), "NotFound");
    let retry = Stream::keyed_x(&envoy, &mut worker);
    let seen = retry.finish("local_reply");
    let (_, headers) = reply_headers(&seen).unwrap();
    assert_eq!(header_of(headers, "grpc-status"), Some("5"));
    assert_eq!(header_of(headers, "grpc-message"), Some("gone"));
    assert_eq!(header_of(headers, "x-t"), Some("1"));
}

#[test]
fn an_error_whose_metadata_is_not_text_is_not_kept_rather_than_changed() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(DEDUP);
    let mut s = Stream::keyed_x(&envoy, &mut worker);
    s.host.response_headers = vec![
        (":status".into(), b"200".to_vec()),
        ("grpc-status".into(), b"5".to_vec()),
        ("x-raw".into(), b"caf\xe9".to_vec()),
    ];
    let call = s.call.as_mut().unwrap();
    s.host.showing = Showing::Response;
    let next = call.on_response_headers(s.worker, &mut s.host, true, &mut s.fx);
    s.host.showing = Showing::Neither;
    s.apply(next);
    assert_eq!(s.finish("via_upstream").log("dedup"), "not_kept");
}

#[test]
fn a_call_envoy_does_not_take_for_grpc_still_gets_a_grpc_answer() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(r#"{"dedup":{"methods":["pkg.Orders/Create"],"require_key":true}}"#);
    for content_type in ["Application/GRPC", "application/grpc;charset=utf-8"] {
        let mut s = Stream::open(&envoy, &mut worker, PATH, &[("content-type", content_type)]);
        assert_eq!(s.headers(false), Next::Pause);
        let seen = s.finish("local_reply");
        let (code, headers) = reply_headers(&seen).unwrap_or_else(|| panic!("{content_type}: {:?}", seen.reply));
        assert_eq!(code, 200);
        assert_eq!(header_of(headers, "grpc-status"), Some("3"));
        let message = header_of(headers, "grpc-message").unwrap();
        assert!(message.starts_with("grpc-guard: idempotency key header"), "{message}");
    }
    let mut plain = Stream::open(&envoy, &mut worker, PATH, &[]);
    plain.headers(false);
    assert!(matches!(plain.finish("local_reply").reply, Some(Reply::Status { .. })), "Envoy's own gRPC reply");
}

#[test]
fn the_authority_does_not_make_a_caller_someone_else() {
    let envoy = Envoy::default();
    let config = r#"{"dedup":{"methods":["pkg.Orders/Create"],"max_entries":8,"caller_share":0.25,
        "scope":["source.principal",":authority"]}}"#;
    let mut worker = envoy.worker(config);
    let mut held = Vec::new();
    for n in 0..3 {
        let authority = format!("tenant{n}.example");
        let mut s = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "k"), (":authority", &authority)]);
        s.property("source.principal", Some("greedy"));
        let next = s.headers(false);
        held.push((next, s.call.take()));
    }
    let nexts: Vec<Next> = held.iter().map(|(n, _)| *n).collect();
    assert_eq!(nexts, [Next::Continue, Next::Continue, Next::Pause], "a quarter of eight, whatever the authority");
}

// ------------------------------------------------------- AIP-155 key fields

/// `pkg.Orders/Create` takes its key from field 1 of its request, and the
/// nested `pkg.Orders/Update` from field 1 of the message in field 2.
const KEY_FIELDS: &str = r#"{"dedup":{"methods":["pkg.Orders/*"],
    "key_fields":{"pkg.Orders/Create":1,"pkg.Orders/Update":[2,1]}}}"#;

/// A `Create` request: `request_id` (field 1) and an amount (field 3).
fn create_request(request_id: &str, amount: &str) -> Vec<u8> {
    use crate::protowire::write::string;
    let mut message = string(1, request_id.as_bytes());
    message.extend(string(3, amount.as_bytes()));
    message
}

/// A keyed call whose request (framed) arrives in `chunks`: held until the
/// message is whole, then claimed; what the client gets and the line.
fn field_keyed(envoy: &Envoy, worker: &mut Worker, path: &str, extra: &[(&str, &str)], body: &[u8]) -> Seen {
    let mut s = Stream::open(envoy, worker, path, extra);
    assert_eq!(s.headers(false), Next::Pause, "the headers wait for the key in the message");
    let next = s.request_body(body, true);
    if next == Next::Continue && s.request_header(":path").as_deref() == Some(path) {
        s.upstream_answers(b"reply", "0");
    }
    s.finish(if next == Next::Continue { "via_upstream" } else { "local_reply" })
}

#[test]
fn an_aip155_request_id_field_is_the_key_and_its_retry_goes_to_the_replay_hop() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(KEY_FIELDS);
    let request = frame(&create_request("req-1", "10 EUR"));
    // Held while the message comes in pieces; the headers are still the
    // filter's to change.
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[]);
    assert_eq!(s.headers(false), Next::Pause);
    assert_eq!(s.request_body(&request[..3], false), Next::Pause, "no whole frame prefix yet");
    assert_eq!(s.request_body(&request[3..9], false), Next::Pause, "the message is not whole");
    assert_eq!(s.request_body(&request[9..], true), Next::Continue, "claimed: the call runs");
    assert_eq!(s.host.request_chunk, request, "the whole buffered request goes on unchanged");
    s.upstream_answers(b"reply", "0");
    let first = s.finish("via_upstream");
    assert_eq!(first.log("dedup"), "first");
    assert_eq!(first.log("req_bytes"), request.len() as u64 - 5, "the message is counted once");
    assert_eq!(first.count(Family::MsgFromClient, None), 1);

    // The retry carries no header at all: the field alone makes it one.
    let mut retry = Stream::open(&envoy, &mut worker, PATH, &[]);
    assert_eq!(retry.headers(false), Next::Pause);
    assert_eq!(retry.request_body(&request, true), Next::Continue);
    assert_sent_to_replay_hop(&retry);
    assert!(retry.host.request_chunk.is_empty(), "its body is emptied on the way to the hop");
    replay_hop_answers(&mut retry, false);
    assert_eq!(retry.host.response_chunk, frame(b"reply"));
    assert_eq!(retry.finish("via_upstream").log("dedup"), "replay");
}

#[test]
fn the_fingerprint_still_covers_the_whole_message() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(KEY_FIELDS);
    field_keyed(&envoy, &mut worker, PATH, &[], &frame(&create_request("req-1", "10 EUR")));
    let seen = field_keyed(&envoy, &mut worker, PATH, &[], &frame(&create_request("req-1", "99 EUR")));
    assert_eq!(reply_status(&seen).map(|r| r.0), Some(GrpcStatus::InvalidArgument));
    assert_eq!(seen.log("dedup"), "mismatch");
}

#[test]
fn a_nested_key_field_is_read_by_its_path() {
    use crate::protowire::write::string;
    let envoy = Envoy::default();
    let mut worker = envoy.worker(KEY_FIELDS);
    let update = |id: &str| frame(&[string(2, &string(1, id.as_bytes())), string(4, b"name")].concat());
    let path = "/pkg.Orders/Update";
    assert_eq!(field_keyed(&envoy, &mut worker, path, &[], &update("u-1")).log("dedup"), "first");
    let mut retry = Stream::open(&envoy, &mut worker, path, &[]);
    retry.headers(false);
    retry.request_body(&update("u-1"), true);
    assert!(retry.seen.marked, "the same nested id is a retry");
    assert_eq!(field_keyed(&envoy, &mut worker, path, &[], &update("u-2")).log("dedup"), "first");
}

#[test]
fn an_empty_key_field_falls_back_to_the_header_and_then_to_no_key() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(KEY_FIELDS);
    let no_id = frame(&create_request("", "10 EUR"));
    let seen = field_keyed(&envoy, &mut worker, PATH, &[(KEY, "h-1")], &no_id);
    assert_eq!(seen.log("dedup"), "first", "the header's key");
    // A field equal to the header's value names the same key.
    let mut retry = Stream::open(&envoy, &mut worker, PATH, &[]);
    retry.headers(false);
    retry.request_body(&frame(&create_request("h-1", "10 EUR")), true);
    assert!(retry.seen.marked);
    assert_eq!(field_keyed(&envoy, &mut worker, PATH, &[], &no_id).log("dedup"), "none");

    let mut required = envoy.worker(
        r#"{"dedup":{"methods":["pkg.Orders/Create"],"key_fields":{"pkg.Orders/Create":1},"require_key":true}}"#,
    );
    let seen = field_keyed(&envoy, &mut required, PATH, &[], &no_id);
    assert_eq!(reply_status(&seen).map(|r| r.0), Some(GrpcStatus::InvalidArgument));
    assert_eq!(seen.log("dedup"), "bad_key");
}

#[test]
fn a_bodyless_call_to_a_key_field_method_is_not_held() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(KEY_FIELDS);
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[]);
    assert_eq!(s.headers(true), Next::Continue, "nothing to wait for");
    assert_eq!(s.finish("via_upstream").log("dedup"), "none");
}

#[test]
fn a_compressed_message_hides_the_field_so_only_a_header_key_stands() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(KEY_FIELDS);
    let mut compressed = frame(b"\x1f\x8b gzip bytes");
    compressed[0] = 1;
    let seen = field_keyed(&envoy, &mut worker, PATH, &[("grpc-encoding", "gzip")], &compressed);
    let (code, headers) = reply_headers(&seen).expect("answered by the filter");
    assert_eq!(code, 200);
    assert_eq!(header_of(headers, "grpc-status"), Some("12"), "UNIMPLEMENTED, as for an unsupported compression");
    assert_eq!(header_of(headers, "grpc-accept-encoding"), Some("identity"));
    assert!(header_of(headers, "grpc-message").unwrap().contains("compressed"), "{headers:?}");
    assert_eq!(seen.log("dedup"), "bad_key");
    assert_eq!(seen.count(Family::Refused, None), 1, "a client's doing, left out of the error-ratio alert");

    let seen = field_keyed(&envoy, &mut worker, PATH, &[("grpc-encoding", "gzip"), (KEY, "h-2")], &compressed);
    assert!(seen.reply.is_none());
    assert_eq!(seen.log("dedup"), "first");
}

#[test]
fn a_message_that_is_not_protobuf_is_refused_as_invalid_argument() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(KEY_FIELDS);
    // Field 1 declared 100 bytes long, 2 there.
    let seen = field_keyed(&envoy, &mut worker, PATH, &[], &frame(&[0x0a, 100, b'a', b'b']));
    let (status, message) = reply_status(&seen).expect("refused");
    assert_eq!(status, GrpcStatus::InvalidArgument);
    assert!(message.contains("is not a protobuf message"), "{message}");
    // Field 1 as a number.
    let seen = field_keyed(&envoy, &mut worker, PATH, &[], &frame(&[0x08, 7]));
    assert!(reply_status(&seen).unwrap().1.contains("field 1 as a number"));
}

#[test]
fn a_held_call_cut_before_its_message_is_whole_claims_nothing() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(KEY_FIELDS);
    let request = frame(&create_request("req-9", "1"));
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[]);
    s.headers(false);
    assert_eq!(s.request_body(&request[..8], false), Next::Pause);
    let seen = s.finish("http2.remote_reset");
    assert_eq!(seen.log("dedup"), "none");
    assert_eq!(seen.count(Family::DedupFirst, None), 0);
    // The key was never claimed: its call runs as a first call.
    assert_eq!(field_keyed(&envoy, &mut worker, PATH, &[], &request).log("dedup"), "first");
}

#[test]
fn a_request_over_the_size_limit_is_refused_without_waiting_for_it() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(
        r#"{"limits":{"max_request_message_bytes":10},
            "dedup":{"methods":["pkg.Orders/Create"],"key_fields":{"pkg.Orders/Create":1}}}"#,
    );
    let request = frame(&create_request("req-1", "a long amount"));
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[]);
    s.headers(false);
    // Only the prefix is in: its declared length is already over the limit.
    assert_eq!(s.request_body(&request[..5], false), Next::Pause);
    let seen = s.finish("local_reply");
    assert_eq!(reply_status(&seen).map(|r| r.0), Some(GrpcStatus::ResourceExhausted));
}

#[test]
fn a_held_request_that_ends_with_trailers_is_decided_there() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(KEY_FIELDS);
    let request = frame(&create_request("req-t", "1"));
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[]);
    s.headers(false);
    assert_eq!(s.request_body(&request[..8], false), Next::Pause);
    assert_eq!(s.request_body(&request[8..], false), Next::Continue, "whole: claimed before the end");
    assert_eq!(s.request_trailers(), Next::Continue);
    s.upstream_answers(b"reply", "0");
    assert_eq!(s.finish("via_upstream").log("dedup"), "first");
    // Still held when trailers end the request (the message cut short): no
    // field to read, the header's key stands.
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "h-t")]);
    s.headers(false);
    assert_eq!(s.request_body(&request[..8], false), Next::Pause);
    assert_eq!(s.request_trailers(), Next::Continue);
    assert_eq!(s.finish("via_upstream").log("dedup"), "first");
}

#[test]
fn a_message_sent_a_byte_at_a_time_is_copied_once_while_held() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(KEY_FIELDS);
    let request = frame(&create_request("req-slow", &"x".repeat(2000)));
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[]);
    s.headers(false);
    for (i, byte) in request.iter().enumerate() {
        let last = i == request.len() - 1;
        let next = s.request_body(&[*byte], false);
        assert_eq!(next, if last { Next::Continue } else { Next::Pause });
    }
    // The prefix (5 bytes) per callback, then the message once, and the
    // buffer once more as the chunk the call goes on with: linear, where a
    // copy of the whole buffer per callback was quadratic (2 million bytes).
    assert!(s.host.request_bytes_read < 8 * request.len(), "{} bytes copied", s.host.request_bytes_read);
}

#[test]
fn a_call_held_past_its_deadline_is_refused_and_claims_nothing() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(KEY_FIELDS);
    let request = frame(&create_request("req-late", "1"));
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[("grpc-timeout", "1S")]);
    s.headers(false);
    assert_eq!(s.request_body(&request[..6], false), Next::Pause);
    envoy.advance(1_500);
    assert_eq!(s.request_body(&request[6..], true), Next::Pause, "answered, never sent on");
    let seen = s.finish("local_reply");
    assert_eq!(reply_status(&seen).map(|r| r.0), Some(GrpcStatus::DeadlineExceeded));
    assert_eq!(seen.count(Family::DedupFirst, None), 0);
    // The key is free: its retry in time runs as a first call.
    assert_eq!(field_keyed(&envoy, &mut worker, PATH, &[], &request).log("dedup"), "first");
}

#[test]
fn a_held_call_goes_on_with_its_grpc_timeout_as_it_was_which_envoy_counts_from_the_start() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(KEY_FIELDS);
    let request = frame(&create_request("req-left", "1"));
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[("grpc-timeout", "1S")]);
    s.headers(false);
    assert_eq!(s.request_body(&request[..6], false), Next::Pause);
    envoy.advance(300);
    assert_eq!(s.request_body(&request[6..], true), Next::Continue);
    // Envoy's timer takes the stream's age off it: cut by the hold as well,
    // the call would lose the hold twice.
    assert_eq!(s.request_header("grpc-timeout").as_deref(), Some("1S"));
}

#[test]
fn a_message_too_large_to_hold_is_refused_from_its_prefix() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(KEY_FIELDS);
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[]);
    s.headers(false);
    let mut prefix = vec![0u8];
    prefix.extend_from_slice(&(2u32 << 20).to_be_bytes());
    assert_eq!(s.request_body(&prefix, false), Next::Pause);
    let seen = s.finish("local_reply");
    let (status, message) = reply_status(&seen).expect("refused");
    assert_eq!(status, GrpcStatus::ResourceExhausted);
    assert!(message.contains("limits.max_request_message_bytes"), "{message}");
    assert_eq!(seen.count(Family::Refused, None), 1);
}
