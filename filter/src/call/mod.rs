//! One gRPC call, from its request headers to its log record, as a state
//! machine that knows nothing of proxy-wasm.
//!
//! Each step takes what the host reported (read on demand through [`Host`],
//! so a step reads only what it needs), updates the call's state and says
//! what to do: the [`Next`] it returns, and the [`Effect`]s it appends (set or
//! remove a header, answer the call, replace the body, add a trailer, count a
//! metric, log the record). The proxy-wasm adapter (`plugin`) calls the step
//! for each callback and carries the effects out; every decision about gRPC
//! is made here and tested natively (`tests.rs`).
//!
//! The steps follow Envoy's order: [`Call::start`] at request headers, then
//! request body chunks, response headers, body chunks and trailers (any may be
//! missing), and [`Call::finish`] when the stream is done, however it ended.

mod dedup;
pub use dedup::lease_request;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::time::Duration;

use crate::config::NonGrpc;
use crate::deadline::{is_late, DeadlineDecision, DeadlineSource};
use crate::frames::{FrameError, FrameEvent, FrameReader};
use crate::method::{MethodPath, MethodType};
use crate::metrics::{guard, Family};
use crate::record::{cap, CallRecord, DedupOutcome};
use crate::registry::{OTHER_SLOT, PENDING_SLOT};
use crate::shared::SharedStore;
use crate::status::{GrpcStatus, ResetSide, ResponseSeen, StatusSource};
use crate::worker::Worker;

/// What the host reported about the stream, read when a step needs it. Body
/// reads are of the chunk the current step was called for.
pub trait Host: SharedStore {
    fn request_header(&mut self, name: &str) -> Option<&[u8]>;
    fn response_header(&mut self, name: &str) -> Option<&[u8]>;
    fn response_headers(&mut self) -> Vec<(String, Vec<u8>)>;
    fn response_trailer(&mut self, name: &str) -> Option<&[u8]>;
    fn response_trailers(&mut self) -> Vec<(String, Vec<u8>)>;
    fn request_body(&mut self, offset: usize, len: usize) -> Option<Vec<u8>>;
    fn response_body(&mut self, offset: usize, len: usize) -> Option<Vec<u8>>;
    /// An Envoy attribute, e.g. `["response", "code_details"]`.
    fn property(&mut self, path: &[&str]) -> Option<Vec<u8>>;
    /// Wall-clock time, nanoseconds since the Unix epoch.
    fn now_ns(&mut self) -> u64;
}

/// Whether the stream goes on after a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    Continue,
    /// Hold this direction: Envoy buffers the body meanwhile, or the call was
    /// answered locally.
    Pause,
}

/// An answer from the proxy itself; the call goes no further upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// A gRPC status and message; Envoy writes (and percent-encodes) them.
    Status { status: GrpcStatus, message: String },
    /// An HTTP answer with exactly these headers (a kept trailers-only
    /// answer, whose `grpc-message` is already encoded; a refusal).
    Http { code: u32, headers: Vec<(String, String)>, body: Option<String> },
}

/// Something a step asks the host to do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    SetRequestHeader(Cow<'static, str>, Vec<u8>),
    SetResponseHeader(Cow<'static, str>, Vec<u8>),
    /// Add a response header value beside any others of the name.
    AddResponseHeader(String, Vec<u8>),
    RemoveRequestHeader(&'static str),
    RemoveResponseHeader(&'static str),
    /// Replace the request body chunk being delivered.
    ReplaceRequestBody(Vec<u8>),
    Reply(Reply),
    /// Replace the response body chunk being delivered.
    ReplaceResponseBody(Vec<u8>),
    /// Add a response trailer (only at the response's end of stream).
    AddResponseTrailer(String, Vec<u8>),
    /// Add `by` to a method's counter (`code` for the families labelled
    /// with `grpc_code`).
    Count {
        slot: usize,
        family: Family,
        code: Option<GrpcStatus>,
        by: u64,
    },
    /// Record a value in a method's histogram.
    Record {
        slot: usize,
        family: Family,
        value: u64,
    },
    /// Add one to an unlabelled guard counter ([`crate::metrics::guard`]).
    CountGuard(&'static str),
    /// Write the status name where an access log reads it (filter state).
    Tag(GrpcStatus),
    /// Mark the request for the replay route: filter state
    /// ([`crate::dedup::REPLAY_PROPERTY`]), which no client can set.
    MarkReplay,
    /// Log this line at info level.
    Log(String),
    /// Send a request to the etcd store (a gRPC callout). Unless `detached`,
    /// the call waits for its answer ([`Call::on_etcd_answer`]); a detached
    /// one (a completion write) belongs to the worker, so the stream's end
    /// does not cancel it, and nobody waits for it.
    /// Boxed: it is rare, and every effect moves as big as the largest.
    Etcd(Box<EtcdRequest>),
}

/// A request to etcd's gRPC API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdRequest {
    pub service: &'static str,
    pub method: &'static str,
    pub message: Vec<u8>,
    pub timeout: Duration,
    pub detached: bool,
    /// What to write instead if etcd refuses this write as too large for
    /// its `--max-request-bytes` (a kept answer then kept as "not kept").
    pub fallback: Option<Vec<u8>>,
}

/// What came back from a request to etcd: its gRPC status (0 with the
/// answer's message), or why it failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdReply {
    pub status: u32,
    pub message: String,
    pub body: Vec<u8>,
}

pub type Effects = Vec<Effect>;

/// Which side's body a step reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Request,
    Response,
}

/// Why a body chunk stops a call.
enum ChunkError {
    Frame(FrameError),
    TooLarge { largest: u32, limit: u64 },
}

/// What a call keeps of its method once the request headers are through.
#[derive(Clone, Copy, Debug)]
struct Method {
    slot: usize,
    grpc_type: MethodType,
    /// See [`crate::registry::Resolved::split`].
    split: Option<usize>,
    /// Largest request message let through.
    max_request_message_bytes: Option<u64>,
}

/// The state of one call. Kept small: Envoy's callbacks hand it around.
#[derive(Debug)]
pub struct Call {
    /// `:path` without its query string (gRPC servers route on the path
    /// alone).
    path: String,
    method: Method,
    /// The stream's id among this worker's.
    stream: u32,
    start_ns: u64,
    request: FrameReader,
    response: FrameReader,
    /// Messages already added to the message counters (streams flush as they go).
    counted_req: u64,
    counted_resp: u64,
    seen: ResponseSeen,
    /// The response headers were read (`seen` has their `:status` and
    /// `grpc-status`). A response that goes on to a body and trailers has
    /// them read only if its trailers carry no status, at the call's end:
    /// each read costs a crossing into the VM, and the trailers' status wins
    /// anyway.
    response_headers_read: bool,
    /// When response headers that were left unread arrived, for calls with
    /// a deadline: a status they turn out to carry came then.
    headers_after: Option<Duration>,
    /// `grpc-previous-rpc-attempts`: the client's earlier attempts of this
    /// call (gRPC retries and hedging send it); 0 for a first attempt.
    previous_attempts: u32,
    /// The status last written to filter state.
    tagged: Option<GrpcStatus>,
    /// The deadline the call runs under, and where it came from.
    deadline: Option<Duration>,
    deadline_source: DeadlineSource,
    /// When the upstream's final status arrived, from the request headers
    /// (measured only for calls with a deadline; zero otherwise).
    answered_after: Option<Duration>,
    /// grpc-guard answered the call itself.
    answered_by_guard: bool,
    /// Whole request messages that went on past the filter: what an
    /// upstream could have acted on.
    forwarded_messages: u64,
    /// Envoy itself takes the request for gRPC (`application/grpc` or
    /// `application/grpc+…`, as written): only then does it turn the
    /// filter's local replies into gRPC answers.
    envoy_grpc: bool,
    /// Envoy's `response.code_details`, once read.
    details: Option<String>,
    /// The idempotency key's part in this call, if it has one (boxed: most
    /// calls have none, and the call is moved whole between callbacks).
    dedup: Option<Box<dedup::Phase>>,
    dedup_outcome: DedupOutcome,
    /// The metrics of a call whose method has not earned a label yet
    /// ([`PENDING_SLOT`]), held until the upstream's answer says whether the
    /// method is real ([`Call::place_metrics`]).
    pending: Vec<Effect>,
}

/// Request message sizes a pending call holds; later ones count as `other`
/// at once (the first call of a client stream to a method not yet admitted).
const MAX_PENDING_RECORDS: usize = 64;

impl Call {
    /// Request headers: starts the call in `slot`, or leaves it empty for a
    /// request that is not a gRPC call, which then passes untouched.
    /// `stream` tells this stream apart from the worker's others.
    pub fn start<H: Host>(
        slot: &mut Option<Call>,
        worker: &mut Worker,
        host: &mut H,
        stream: u32,
        end_of_stream: bool,
        fx: &mut Effects,
    ) -> Next {
        let content_type = host.request_header("content-type");
        let is_grpc = content_type.is_some_and(crate::is_grpc_content_type);
        let envoy_grpc = content_type.is_some_and(is_envoy_grpc);
        if !is_grpc && worker.config.non_grpc == NonGrpc::Pass {
            return Next::Continue;
        }
        let mut path = host.request_header(":path").map(lossy_ref).unwrap_or_default();
        if let Some(query) = path.find('?') {
            path.truncate(query);
        }
        // A gRPC server executes any request on a method path as the method,
        // whatever its content type: such a request is a call, refused below.
        if !is_grpc && MethodPath::parse(&path).is_none() {
            return Next::Continue;
        }
        let resolved = worker.methods.resolve(&worker.config, &path, host);
        let call = slot.insert(Call {
            path,
            method: Method {
                slot: resolved.slot,
                grpc_type: resolved.grpc_type,
                split: resolved.split,
                max_request_message_bytes: resolved.policy.max_request_message_bytes,
            },
            stream,
            start_ns: host.now_ns(),
            request: FrameReader::default(),
            response: FrameReader::default(),
            counted_req: 0,
            counted_resp: 0,
            seen: ResponseSeen::default(),
            response_headers_read: false,
            headers_after: None,
            previous_attempts: 0,
            tagged: None,
            deadline: None,
            deadline_source: DeadlineSource::None,
            answered_after: None,
            answered_by_guard: false,
            forwarded_messages: 0,
            envoy_grpc,
            details: None,
            dedup: None,
            dedup_outcome: DedupOutcome::None,
            pending: Vec::new(),
        });
        call.count(Family::Started, None, 1, fx);
        call.previous_attempts = host
            .request_header("grpc-previous-rpc-attempts")
            .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse().ok())
            .unwrap_or(0);
        if call.previous_attempts > 0 {
            call.count(Family::Retried, None, 1, fx);
        }
        if !is_grpc {
            return call.refuse_non_grpc(host.request_header("content-type"), fx);
        }
        // A keyed call ends within the key's TTL, so its claim cannot
        // outlive the key and let a retry run beside it.
        let dedup = worker.config.dedup.as_ref().filter(|_| resolved.dedup);
        let key = dedup.and_then(|d| host.request_header(&d.header)).map(<[u8]>::to_vec);
        let key_field = dedup.is_some_and(|d| d.key_fields.contains_key(call.method_name()));
        let policy = match dedup {
            Some(d) if key.is_some() || key_field => resolved.policy.deadline.within(d.ttl),
            _ => resolved.policy.deadline,
        };
        let decision = policy.decide(host.request_header("grpc-timeout"));
        call.deadline = decision.deadline();
        call.deadline_source = decision.source();
        match decision {
            DeadlineDecision::Keep(_) => {}
            DeadlineDecision::Rewrite { header, source, .. } => {
                let family =
                    if source == DeadlineSource::Default { Family::DeadlineInjected } else { Family::DeadlineClamped };
                call.count(family, None, 1, fx);
                fx.push(Effect::SetRequestHeader(Cow::Borrowed("grpc-timeout"), header.into_bytes()));
            }
            DeadlineDecision::Reject { status, message, .. } => {
                call.count(Family::DeadlineRejected, Some(status), 1, fx);
                return call.answer(status, message, fx);
            }
        }
        match dedup {
            Some(_) if key_field && !end_of_stream => call.await_key_field(),
            Some(config) => {
                let now = call.start_ns;
                call.dedup_request_headers(worker, config, host, key, now, end_of_stream, fx)
            }
            None => Next::Continue,
        }
    }

    /// A request on a gRPC method path whose content type is not gRPC:
    /// refused as grpc-go refuses it, HTTP 415 with INTERNAL.
    fn refuse_non_grpc(&mut self, content_type: Option<&[u8]>, fx: &mut Effects) -> Next {
        fx.push(Effect::CountGuard(guard::NON_GRPC_REFUSED));
        self.count(Family::Refused, None, 1, fx);
        self.answered_by_guard = true;
        let message = format!(
            "grpc-guard: {} is a gRPC method; call it with content-type application/grpc, not {:?}",
            self.path,
            crate::printable(content_type.unwrap_or(b"(none)"))
        );
        let headers = vec![("grpc-status".to_owned(), "13".to_owned()), ("grpc-message".to_owned(), message.clone())];
        fx.push(Effect::Reply(Reply::Http { code: 415, headers, body: Some(message) }));
        Next::Pause
    }

    /// A chunk of the request body, `len` bytes (all of the body Envoy
    /// holds, after a step that paused it).
    pub fn on_request_body<H: Host>(
        &mut self,
        worker: &Worker,
        host: &mut H,
        len: usize,
        end_of_stream: bool,
        fx: &mut Effects,
    ) -> Next {
        match self.dedup_key_field(worker, host, len, end_of_stream, fx) {
            None | Some(Next::Continue) => {}
            Some(Next::Pause) => return Next::Pause,
        }
        let read = match self.dedup_request_body(worker.etcd(), host, len, end_of_stream, fx) {
            Chunk::Handled(next) => return next,
            Chunk::Read(Some(chunk)) => self.read_frames(Side::Request, len, from_slice(&chunk), fx),
            Chunk::Read(None) => self.read_frames(Side::Request, len, |offset, n| host.request_body(offset, n), fx),
            Chunk::Hold(chunk) => match self.read_frames(Side::Request, chunk.len(), from_slice(&chunk), fx) {
                Ok(()) => return Next::Pause,
                err => err,
            },
        };
        match read {
            Ok(()) => {
                self.forwarded_messages = self.request.messages();
                Next::Continue
            }
            Err(ChunkError::Frame(e)) => {
                fx.push(Effect::CountGuard(guard::BAD_FRAMES));
                self.count(Family::Refused, None, 1, fx);
                self.answer(GrpcStatus::Internal, format!("grpc-guard: request body is not gRPC: {e}"), fx)
            }
            Err(ChunkError::TooLarge { largest, limit }) => {
                self.count(Family::RequestTooLarge, None, 1, fx);
                self.count(Family::Refused, None, 1, fx);
                let message = format!(
                    "grpc-guard: request message of {largest} bytes is over this method's limit of {limit} bytes"
                );
                self.answer(GrpcStatus::ResourceExhausted, message, fx)
            }
        }
    }

    /// The request trailers: the request's end, when it has them.
    pub fn on_request_trailers<H: Host>(&mut self, worker: &Worker, host: &mut H, fx: &mut Effects) -> Next {
        if let Some(held) = self.key_field_held() {
            // Still held for its key field: the request ends here.
            if self.on_request_body(worker, host, held, true, fx) == Next::Pause {
                return Next::Pause;
            }
        }
        self.dedup_request_trailers(host, fx).unwrap_or(Next::Continue)
    }

    /// The response headers. Read now when they end the response (a
    /// trailers-only answer), or when a keyed call keeps or replays them;
    /// otherwise at the call's end, and only if its trailers carried no
    /// status (Envoy shows a filter the response headers only in their own
    /// callback and in the log callback).
    pub fn on_response_headers<H: Host>(
        &mut self,
        worker: &Worker,
        host: &mut H,
        end_of_stream: bool,
        fx: &mut Effects,
    ) -> Next {
        if self.replay_response_headers(host, fx) {
            return Next::Continue;
        }
        self.seen.complete |= end_of_stream;
        if end_of_stream || self.dedup.is_some() {
            self.read_response_headers(host, fx);
            if let (true, Some(status)) = (end_of_stream, self.seen.header_status) {
                // A trailers-only answer: its end is now.
                return self.settle_before_answering(worker, host, status, StatusSource::Headers, fx);
            }
        } else if self.deadline.is_some() {
            // Read later if at all: when they arrived decides whether a status
            // they carry came in time (a clock read returns no value to copy).
            self.headers_after = Some(Duration::from_nanos(host.now_ns().saturating_sub(self.start_ns)));
        }
        Next::Continue
    }

    /// What the response headers say of the outcome: `:status` and a
    /// trailers-only `grpc-status`.
    fn read_response_headers<H: Host>(&mut self, host: &mut H, fx: &mut Effects) {
        if std::mem::replace(&mut self.response_headers_read, true) {
            return;
        }
        self.seen.http_status =
            host.response_header(":status").and_then(|v| std::str::from_utf8(v).ok().and_then(|s| s.parse().ok()));
        self.seen.header_status = host.response_header("grpc-status").and_then(GrpcStatus::from_header);
        self.note_answer(host);
        self.keep_response_headers(host);
        self.tag_seen_status(fx);
    }

    /// A chunk of the response body, `len` bytes.
    pub fn on_response_body<H: Host>(
        &mut self,
        worker: &mut Worker,
        host: &mut H,
        len: usize,
        end_of_stream: bool,
        fx: &mut Effects,
    ) -> Next {
        // A response that is not framed is not ours to fix; counting stops.
        let _ = match self.dedup_response_body(host, len, end_of_stream, fx) {
            Chunk::Handled(next) => return next,
            Chunk::Read(Some(chunk)) => self.read_frames(Side::Response, len, from_slice(&chunk), fx),
            Chunk::Read(None) => self.read_frames(Side::Response, len, |offset, n| host.response_body(offset, n), fx),
            // Never for a response.
            Chunk::Hold(chunk) => self.read_frames(Side::Response, chunk.len(), from_slice(&chunk), fx),
        };
        if self.response.messages() > 0 {
            // A message from the upstream: the method is real.
            self.place_metrics(worker, host, true, fx);
        }
        self.seen.complete |= end_of_stream;
        Next::Continue
    }

    /// The response trailers.
    pub fn on_response_trailers<H: Host>(&mut self, worker: &Worker, host: &mut H, fx: &mut Effects) -> Next {
        self.seen.trailer_status = host.response_trailer("grpc-status").and_then(GrpcStatus::from_header);
        self.seen.complete = true;
        self.note_answer(host);
        self.keep_trailers(host);
        self.tag_seen_status(fx);
        match self.seen.trailer_status {
            Some(status) => self.settle_before_answering(worker, host, status, StatusSource::Trailers, fx),
            None => Next::Continue,
        }
    }

    /// The stream is done, however it ended: the final status, the metrics,
    /// the key settled, the log line.
    pub fn finish<H: Host>(&mut self, worker: &mut Worker, host: &mut H, fx: &mut Effects) {
        if self.seen.trailer_status.is_none() {
            // No status in trailers: what headers came (Envoy keeps them for
            // the log callback) decide between a status in the headers, an
            // HTTP error and a reset.
            self.read_response_headers(host, fx);
        }
        let seen = self.seen;
        let (status, source) = seen.final_status(|| ResetSide::from_code_details(self.details(host)));
        if self.method.slot == PENDING_SLOT {
            // A gRPC server answers a method it does not have UNIMPLEMENTED.
            // What a server says before it routes a call (an auth layer, a
            // load shedder: UNAUTHENTICATED, PERMISSION_DENIED, UNAVAILABLE,
            // RESOURCE_EXHAUSTED) says nothing of the method either. Any
            // other gRPC status from it, or a message, means a handler ran.
            let from_server = matches!(source, StatusSource::Trailers | StatusSource::Headers)
                && self.details(host) == "via_upstream";
            let said_before_routing = matches!(
                status,
                GrpcStatus::Unimplemented
                    | GrpcStatus::Unauthenticated
                    | GrpcStatus::PermissionDenied
                    | GrpcStatus::Unavailable
                    | GrpcStatus::ResourceExhausted
            );
            let real = (from_server && !said_before_routing) || self.response.messages() > 0;
            self.place_metrics(worker, host, real, fx);
        }
        self.flush_message_counts(fx);
        self.dedup_settle(worker, host, status, source, fx);
        if self.tagged != Some(status) {
            fx.push(Effect::Tag(status));
        }
        let duration_ms = host.now_ns().saturating_sub(self.start_ns) / 1_000_000;
        self.count(Family::Handled, Some(status), 1, fx);
        self.emit(Effect::Record { slot: self.method.slot, family: Family::HandlingMs, value: duration_ms }, fx);
        // A DEADLINE_EXCEEDED that Envoy answered itself (its router ending
        // the call at grpc-timeout) is not the upstream's answer.
        let ended_by_proxy_timeout = !self.answered_by_guard
            && status == GrpcStatus::DeadlineExceeded
            && source == StatusSource::Headers
            && self.details(host) != "via_upstream";
        let answered_after = if ended_by_proxy_timeout { None } else { self.answered_after };
        // Upstream work can outlive the caller only if the upstream could
        // start it: a unary or server-streaming handler runs once its request
        // message is whole; a client or bidi stream's starts with the call.
        let upstream_could_work = self.forwarded_messages > 0
            || matches!(self.method.grpc_type, MethodType::ClientStream | MethodType::BidiStream);
        let late = !self.answered_by_guard
            && upstream_could_work
            && is_late(self.deadline, answered_after, status, source, ended_by_proxy_timeout);
        if late {
            self.count(Family::LateResponses, None, 1, fx);
        }

        // A call run without its idempotency guarantee is always logged.
        let sampled = self.dedup_outcome == DedupOutcome::StoreFailedOpen || worker.sampler.sample();
        if status == GrpcStatus::Ok && !sampled {
            return;
        }
        // The line gives the HTTP status: read for logged calls only.
        self.read_response_headers(host, fx);
        let config = &worker.config;
        let (service, method) = match self.method.split {
            Some(at) => (self.path.get(1..at).unwrap_or_default(), self.path.get(at + 1..).unwrap_or_default()),
            None => ("", cap(&self.path)),
        };
        // Read only for calls that are logged: a host call saved on the
        // sampled-out ones.
        let request_id = host.request_header(&config.request_id_header).map(lossy_ref);
        let traceparent = host.request_header("traceparent").map(<[u8]>::to_vec);
        let b3 = host.request_header("x-b3-traceid").map(<[u8]>::to_vec);
        let record = CallRecord {
            direction: config.direction,
            service,
            method,
            grpc_type: self.method.grpc_type.as_str(),
            status,
            status_source: source,
            http_status: self.seen.http_status.unwrap_or(0),
            duration_ms,
            req_msgs: self.request.messages(),
            req_bytes: self.request.message_bytes(),
            resp_msgs: self.response.messages(),
            resp_bytes: self.response.message_bytes(),
            request_id: request_id.as_deref().map(cap),
            trace_id: crate::record::trace_id(traceparent.as_deref(), b3.as_deref()),
            previous_attempts: self.previous_attempts,
            deadline_ms: self.deadline.map(|d| u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)),
            deadline_source: self.deadline_source,
            late,
            dedup: self.dedup_outcome,
        };
        fx.push(Effect::Log(record.to_json()));
    }

    /// `pkg.Svc/Method` of a well-formed path.
    fn method_name(&self) -> &str {
        self.path.get(1..).unwrap_or_default()
    }

    /// Envoy's `response.code_details` (who ended the stream and why), read
    /// once.
    fn details<H: Host>(&mut self, host: &mut H) -> &str {
        let details =
            self.details.get_or_insert_with(|| lossy(host.property(&["response", "code_details"]).unwrap_or_default()));
        details.as_str()
    }

    /// Answers the call from the proxy; it goes no further upstream. Valid in
    /// request steps only.
    fn answer(&mut self, status: GrpcStatus, message: impl Into<String>, fx: &mut Effects) -> Next {
        self.answer_with(status, message, Vec::new(), fx)
    }

    /// [`Call::answer`] with more headers in the answer.
    fn answer_with(
        &mut self,
        status: GrpcStatus,
        message: impl Into<String>,
        extra: Vec<(String, String)>,
        fx: &mut Effects,
    ) -> Next {
        self.answered_by_guard = true;
        let message = message.into();
        let reply = if self.envoy_grpc && extra.is_empty() {
            Reply::Status { status, message }
        } else {
            // Envoy does not take this content type for gRPC and would send
            // the message as a plain-text body without `grpc-status`: spell
            // the status out. (A bodyless local reply loses its content
            // type in Envoy; clients read the status from `grpc-status`.)
            let mut headers = vec![
                ("grpc-status".to_owned(), status.code().to_string()),
                ("grpc-message".to_owned(), crate::status::percent_encode(&message)),
            ];
            headers.extend(extra);
            Reply::Http { code: 200, headers, body: None }
        };
        fx.push(Effect::Reply(reply));
        Next::Pause
    }

    fn count(&mut self, family: Family, code: Option<GrpcStatus>, by: u64, fx: &mut Effects) {
        if by > 0 {
            self.emit(Effect::Count { slot: self.method.slot, family, code, by }, fx);
        }
    }

    /// Sends a metric effect on, or holds it while the call's method is
    /// pending: counts of one series added up, message sizes up to
    /// [`MAX_PENDING_RECORDS`] (more count as `other` at once).
    fn emit(&mut self, effect: Effect, fx: &mut Effects) {
        if self.method.slot != PENDING_SLOT {
            fx.push(effect);
            return;
        }
        let pending = &mut self.pending;
        match effect {
            Effect::Count { family, code, by, .. } => {
                for held in pending.iter_mut() {
                    if let Effect::Count { family: f, code: c, by: b, .. } = held {
                        if *f == family && *c == code {
                            *b += by;
                            return;
                        }
                    }
                }
                pending.push(effect);
            }
            // Request sizes, the only ones that can pile up before an answer.
            Effect::Record { family: family @ Family::RequestBytes, value, .. }
                if pending.iter().filter(|e| matches!(e, Effect::Record { .. })).count() >= MAX_PENDING_RECORDS =>
            {
                fx.push(Effect::Record { slot: OTHER_SLOT, family, value });
            }
            other => pending.push(other),
        }
    }

    /// Settles a pending call's method: `real` when the upstream answered
    /// it with something other than UNIMPLEMENTED, and then it takes a label
    /// if one is left; its held metrics, and the rest, go to that slot.
    fn place_metrics<H: Host>(&mut self, worker: &mut Worker, host: &mut H, real: bool, fx: &mut Effects) {
        if self.method.slot != PENDING_SLOT {
            return;
        }
        let slot = if real { worker.methods.admit(&worker.config, &self.path, host) } else { OTHER_SLOT };
        self.method.slot = slot;
        for mut effect in std::mem::take(&mut self.pending) {
            if let Effect::Count { slot: s, .. } | Effect::Record { slot: s, .. } = &mut effect {
                *s = slot;
            }
            fx.push(effect);
        }
    }

    /// Notes that the final status has arrived, if it has and not before.
    fn note_answer<H: Host>(&mut self, host: &mut H) {
        let final_status = self.seen.trailer_status.or(self.seen.header_status).is_some();
        if final_status && self.answered_after.is_none() {
            let from_headers_read_late = self.seen.trailer_status.is_none().then_some(self.headers_after).flatten();
            self.answered_after = Some(match (self.deadline, from_headers_read_late) {
                (Some(_), Some(at)) => at,
                (Some(_), None) => Duration::from_nanos(host.now_ns().saturating_sub(self.start_ns)),
                (None, _) => Duration::ZERO,
            });
        }
    }

    /// Tags the status the response carries so far, if it carries one: as
    /// soon as it is known, so an access log running before this filter's
    /// own log callback sees it, and again if trailers overrule the headers.
    fn tag_seen_status(&mut self, fx: &mut Effects) {
        if let Some(status) = self.seen.trailer_status.or(self.seen.header_status) {
            if self.tagged != Some(status) {
                self.tagged = Some(status);
                fx.push(Effect::Tag(status));
            }
        }
    }

    /// Adds the messages read since the last flush to the message counters.
    fn flush_message_counts(&mut self, fx: &mut Effects) {
        let (req, resp) = (self.request.messages(), self.response.messages());
        self.count(Family::MsgFromClient, None, req - self.counted_req, fx);
        self.count(Family::MsgToClient, None, resp - self.counted_resp, fx);
        self.counted_req = req;
        self.counted_resp = resp;
    }

    /// Reads the frames of the next body chunk of one side: each message's
    /// size is recorded, a streaming call's messages are counted at once,
    /// and a request message over the method's limit stops the call.
    fn read_frames(
        &mut self,
        side: Side,
        len: usize,
        read: impl FnMut(usize, usize) -> Option<Vec<u8>>,
        fx: &mut Effects,
    ) -> Result<(), ChunkError> {
        let slot = self.method.slot;
        let (reader, family, limit) = match side {
            Side::Request => (&mut self.request, Family::RequestBytes, self.method.max_request_message_bytes),
            Side::Response => (&mut self.response, Family::ResponseBytes, None),
        };
        let mut largest: Option<u32> = None;
        let from = fx.len();
        let result = reader.advance(len, read, |event| match event {
            FrameEvent::Started(frame) => largest = largest.max(Some(frame.len)),
            FrameEvent::Whole(frame) => fx.push(Effect::Record { slot, family, value: u64::from(frame.len) }),
        });
        if slot == PENDING_SLOT {
            for record in fx.split_off(from) {
                self.emit(record, fx);
            }
        }
        if self.method.grpc_type != MethodType::Unary {
            self.flush_message_counts(fx);
        }
        result.map_err(ChunkError::Frame)?;
        match (limit, largest) {
            (Some(limit), Some(largest)) if u64::from(largest) > limit => Err(ChunkError::TooLarge { largest, limit }),
            _ => Ok(()),
        }
    }
}

/// What a keyed call's part did with a body chunk.
pub(super) enum Chunk {
    /// It took the chunk whole: the step ends with this.
    Handled(Next),
    /// The chunk is read as any other; from this copy when the keyed call
    /// already took one, rather than from the host again.
    Read(Option<Vec<u8>>),
    /// The new part of a chunk held back: read, and the stream stays paused.
    Hold(Vec<u8>),
}

/// A body reader over bytes already copied out of the host.
fn from_slice(bytes: &[u8]) -> impl FnMut(usize, usize) -> Option<Vec<u8>> + '_ {
    move |offset, n| bytes.get(offset..offset + n).map(<[u8]>::to_vec)
}

/// What Envoy's own check takes for gRPC (`Grpc::Common::hasGrpcContentType`):
/// exactly `application/grpc`, or `application/grpc+…`, case as written.
fn is_envoy_grpc(content_type: &[u8]) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    content_type.strip_prefix(GRPC).is_some_and(|rest| rest.is_empty() || rest.starts_with(b"+"))
}

/// Header bytes as text; invalid UTF-8 is replaced, never trusted.
fn lossy(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// [`lossy`] of borrowed bytes.
fn lossy_ref(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
