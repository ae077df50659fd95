//! The proxy-wasm adapter: Envoy's callbacks in, host calls out. Each callback
//! hands the stream to one step of [`crate::call::Call`] and carries out the
//! effects it returns; nothing here decides anything about gRPC.
//!
//! The module exports only the callbacks it needs (Envoy enters the VM for
//! every callback a module exports, and skips the others): no `proxy_on_done`,
//! no metadata or HTTP-callout callbacks. The host calls are [`abi`]'s, which
//! never trap on a status; each effect is carried out only in the callback
//! where Envoy accepts it.

mod abi;
mod exports;

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use abi::{Action, BufferType, LogLevel, MapType, MetricType, Status, StreamType};

use crate::call::{Call, Effect, Effects, EtcdReply, EtcdRequest, Host, Next, Reply};
use crate::headers::HeaderBlock;
use crate::metrics::{guard, stat_name, Family};
use crate::shared::{SharedStore, StoreError};
use crate::status::GrpcStatus;
use crate::worker::Worker;

/// Filter-state key (`%FILTER_STATE(wasm.grpc_guard.grpc_code:PLAIN)%` in an
/// Envoy access log) holding the final status name of the call.
const STATUS_PROPERTY: &str = "grpc_guard.grpc_code";

struct Root {
    worker: Option<Rc<RefCell<Shell>>>,
    /// The lease grant this root has asked etcd for: its token, and when.
    lease: Option<(u32, u64)>,
}

/// How often the root checks its etcd lease (`dedup.store: etcd`).
const LEASE_TICK: std::time::Duration = std::time::Duration::from_secs(1);
/// How soon the root sends completion writes a stream queued.
const WRITE_TICK: std::time::Duration = std::time::Duration::from_millis(1);
/// How often the root looks at completion writes waiting to be sent again.
const RETRY_TICK: std::time::Duration = std::time::Duration::from_millis(50);

/// The worker's core state, the stat ids Envoy gave its metrics, and one
/// effects buffer that every stream's steps reuse (callbacks on a worker run
/// one at a time), so a call allocates none of its own.
struct Shell {
    core: Worker,
    fx: Effects,
    /// Per method slot: the id of each family's stat, and of each coded
    /// family's stat per code, defined on first use.
    ids: Vec<SlotIds>,
    /// `GrpcService` naming the etcd cluster, when the store is etcd.
    etcd_service: Option<Vec<u8>>,
    /// Completion writes to send from the root at its next tick (the stream
    /// that left one has gone, and a write that fails is sent again by the
    /// root, which outlives it), with how many times each was sent, and not
    /// before when.
    to_write: Vec<(EtcdRequest, u8, u64)>,
    /// Completion writes in flight, by token.
    writing: std::collections::HashMap<u32, (EtcdRequest, u8)>,
}

#[derive(Clone, Copy, Default)]
struct SlotIds {
    plain: [Option<u32>; Family::ALL.len()],
    coded: [[Option<u32>; GrpcStatus::ALL.len()]; 2],
}

impl Shell {
    /// The stat id of `family` for `slot` (and `code`), defined on first use.
    fn metric(&mut self, slot: usize, family: Family, code: Option<GrpcStatus>) -> Option<u32> {
        if self.ids.len() <= slot {
            self.ids.resize(slot + 1, SlotIds::default());
        }
        let ids = self.ids.get_mut(slot)?;
        let cell = match (family.coded_index(), code) {
            (Some(i), Some(code)) => ids.coded.get_mut(i)?.get_mut(code.code() as usize)?,
            (None, None) => ids.plain.get_mut(family as usize)?,
            _ => return None,
        };
        if cell.is_none() {
            let labels = self.core.methods.labels(slot)?;
            let kind = if family.is_histogram() { MetricType::Histogram } else { MetricType::Counter };
            *cell = abi::define_metric(kind, &stat_name(self.core.config.direction, family, labels, code));
        }
        *cell
    }
}

impl Root {
    fn on_configure(&mut self) -> bool {
        let bytes = abi::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX).unwrap_or_default();
        // Random (WASI's random_get, as the standard library's hash maps
        // seed themselves), with the clock: tells this worker's claims from
        // every other worker's, on every Envoy.
        let seed = std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), abi::now_ns());
        match Worker::configure(&bytes, &mut Envoy::default(), seed) {
            Ok(core) => {
                let etcd_service = core.etcd().map(|etcd| crate::etcd::grpc_service(&etcd.cluster));
                if etcd_service.is_some() {
                    abi::set_tick_period(LEASE_TICK);
                }
                let shell = Shell {
                    core,
                    fx: Vec::new(),
                    ids: Vec::new(),
                    etcd_service,
                    to_write: Vec::new(),
                    writing: Default::default(),
                };
                self.worker = Some(Rc::new(RefCell::new(shell)));
                true
            }
            Err(e) => {
                abi::log(LogLevel::Error, &e.to_string());
                count_guard(guard::CONFIG_REJECTED);
                false
            }
        }
    }

    /// Sends the completion writes the streams left, and asks etcd for the
    /// worker's next lease ahead of need, so keyed calls find one and make a
    /// single round trip.
    fn on_tick(&mut self) {
        let Some(worker) = self.worker.clone() else { return };
        let mut shell = worker.borrow_mut();
        shell.send_writes();
        let now = abi::now_ns();
        let Some(etcd) = shell.core.etcd() else { return };
        let asked_recently = self.lease.is_some_and(|(_, at)| now.saturating_sub(at) < nanos(etcd.timeout));
        if asked_recently || !etcd.lease.renew_due(shell.core.etcd_lease.as_ref(), now) {
            return;
        }
        let request = crate::call::lease_request(etcd);
        match shell.dispatch(&request) {
            Ok(token) => self.lease = Some((token, now)),
            Err(_) => count_guard(guard::DEDUP_STORE_ERRORS),
        }
    }

    /// Envoy deleted the root (its plugin was removed or replaced): the
    /// completion writes it still held are lost, and counted so (Envoy
    /// cancels the root's callouts in flight with it). Envoy would wait for
    /// them only if the module exported `proxy_on_done`, which it would
    /// then enter on every stream too.
    fn on_delete(self) {
        let Some(worker) = self.worker else { return };
        let shell = worker.borrow();
        let lost = shell.to_write.len().saturating_add(shell.writing.len());
        if lost > 0 {
            count_guard_by(guard::DEDUP_SETTLE_LOST, i64::try_from(lost).unwrap_or(i64::MAX));
        }
    }

    /// etcd answered a completion write or a lease grant the root sent.
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        let Some(worker) = self.worker.clone() else { return };
        let written = worker.borrow_mut().writing.remove(&token_id);
        if let Some((mut request, sent)) = written {
            // A completion write: sent again if it may not have arrived;
            // kept without its answer if etcd finds the answer too large.
            if status_code != 0 {
                count_guard(guard::DEDUP_STORE_ERRORS);
                let message = grpc_status_message();
                if let Some(fallback) =
                    request.fallback.take().filter(|_| crate::etcd::too_large(status_code, &message))
                {
                    request.message = fallback;
                    worker.borrow_mut().queue_write(request, 0);
                } else if crate::etcd::resend_write(status_code, sent) {
                    worker.borrow_mut().queue_write(request, sent);
                } else {
                    count_guard(guard::DEDUP_SETTLE_LOST);
                }
            }
            return;
        }
        let Some((token, asked_at)) = self.lease.take() else { return };
        if token != token_id {
            self.lease = Some((token, asked_at));
            return;
        }
        let reply = etcd_reply(status_code, response_size);
        let mut shell = worker.borrow_mut();
        let lease = (reply.status == 0).then(|| crate::etcd::parse_lease(&reply.body).ok()).flatten();
        match (lease, shell.core.etcd()) {
            (Some(id), Some(etcd)) => {
                let lease = etcd.lease.lease(id, asked_at);
                shell.core.etcd_lease = Some(lease);
            }
            _ => count_guard(guard::DEDUP_STORE_ERRORS),
        }
    }
}

/// One HTTP stream. `call` is `None` for non-gRPC traffic, which every
/// callback then passes straight through.
struct Stream {
    worker: Rc<RefCell<Shell>>,
    call: Option<Call>,
    context_id: u32,
    /// The request to etcd the call is paused for, and which direction of
    /// the stream waits for it.
    awaiting: Option<(u32, Direction)>,
}

/// A direction of the stream.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Request,
    Response,
}

impl Stream {
    /// Runs one step of the call, if the stream is a call, and carries out
    /// its effects; `body_len` is the size of the body chunk it was called for.
    fn step(
        &mut self,
        body_len: usize,
        direction: Direction,
        step: impl FnOnce(&mut Call, &mut Worker, &mut Effects) -> Next,
    ) -> Action {
        let Some(call) = self.call.as_mut() else { return Action::Continue };
        let (next, sent) = {
            let mut shell = self.worker.borrow_mut();
            let shell = &mut *shell;
            let next = step(call, &mut shell.core, &mut shell.fx);
            (next, shell.apply(body_len))
        };
        self.after(body_len, direction, next, sent)
    }

    /// Carries out the effects of the step just run, then [`Stream::after`].
    fn carry_out(&mut self, body_len: usize, direction: Direction, next: Next) -> Action {
        let sent = self.worker.borrow_mut().apply(body_len);
        self.after(body_len, direction, next, sent)
    }

    /// What a step's request to etcd became: one the call waits for is
    /// remembered; if Envoy would not send it, its failure is the call's
    /// answer at once.
    #[inline]
    fn after(
        &mut self,
        body_len: usize,
        direction: Direction,
        mut next: Next,
        mut sent: Option<Result<u32, Status>>,
    ) -> Action {
        // Bounded: a claim sends again at most once before it fails for good.
        for _ in 0..4 {
            match sent.take() {
                Some(Ok(token)) => {
                    self.awaiting = Some((token, direction));
                    CALLOUTS.with(|c| c.borrow_mut().insert(token, self.context_id));
                }
                Some(Err(status)) => {
                    let reply = EtcdReply {
                        status: 14,
                        message: format!("Envoy could not send the request ({status:?}): is the cluster defined?"),
                        body: Vec::new(),
                    };
                    let Some(call) = self.call.as_mut() else { break };
                    let mut shell = self.worker.borrow_mut();
                    let shell = &mut *shell;
                    next = call.on_etcd_answer(&mut shell.core, &mut Envoy::default(), reply, &mut shell.fx);
                    sent = shell.apply(body_len);
                }
                None => break,
            }
        }
        match next {
            Next::Continue => Action::Continue,
            Next::Pause => Action::Pause,
        }
    }
}

fn nanos(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The answer to a gRPC callout: the message on success, the status and
/// its message otherwise.
fn etcd_reply(status: u32, size: usize) -> EtcdReply {
    if status == 0 {
        let body = abi::get_buffer(BufferType::GrpcReceiveBuffer, 0, size).unwrap_or_default();
        return EtcdReply { status, message: String::new(), body };
    }
    EtcdReply { status, message: grpc_status_message(), body: Vec::new() }
}

/// The message of the gRPC callout's status, printable.
fn grpc_status_message() -> String {
    crate::printable(&abi::status_message())
}

impl Shell {
    /// Queues a completion write for the root, sent `sent` times so far,
    /// and has the root's tick come when it is due.
    fn queue_write(&mut self, request: EtcdRequest, sent: u8) {
        let due = abi::now_ns().saturating_add(nanos(crate::etcd::write_backoff(sent)));
        let was_empty = self.to_write.is_empty();
        self.to_write.push((request, sent, due));
        // Only when the queue was empty: a change of period re-arms Envoy's
        // timer, and a flood of writes must not keep pushing the tick away.
        // At once for a first write, at the retry pace otherwise.
        if was_empty {
            abi::set_tick_period(if sent == 0 { WRITE_TICK } else { RETRY_TICK });
        }
    }

    /// Sends the queued completion writes that are due (root only), and
    /// sets the tick for what is left.
    fn send_writes(&mut self) {
        if self.to_write.is_empty() {
            return;
        }
        let now = abi::now_ns();
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.to_write).into_iter().partition(|w| w.2 <= now);
        self.to_write = later;
        for (request, sent, _) in due {
            match self.dispatch(&request) {
                Ok(token) => {
                    self.writing.insert(token, (request, sent.saturating_add(1)));
                }
                Err(_) => {
                    count_guard(guard::DEDUP_STORE_ERRORS);
                    count_guard(guard::DEDUP_SETTLE_LOST);
                }
            }
        }
        abi::set_tick_period(if self.to_write.is_empty() { LEASE_TICK } else { RETRY_TICK });
    }

    /// Sends a request to etcd from the context Envoy is running.
    fn dispatch(&self, request: &EtcdRequest) -> Result<u32, Status> {
        let service = self.etcd_service.as_deref().ok_or(Status::NOT_FOUND)?;
        abi::grpc_call(service, request.service, request.method, &request.message, request.timeout)
    }

    /// Carries out the effects of the step just run, in order; gives what
    /// became of a request to etcd the call waits for.
    fn apply(&mut self, body_len: usize) -> Option<Result<u32, Status>> {
        if self.fx.is_empty() {
            return None;
        }
        let mut sent = None;
        let mut fx = std::mem::take(&mut self.fx);
        for effect in fx.drain(..) {
            match effect {
                Effect::Etcd(request) if request.detached => {
                    // Left to the root, which outlives the stream: its answer
                    // (a failure to send again) comes after the stream went.
                    self.queue_write(*request, 0);
                }
                Effect::Etcd(request) => sent = Some(self.dispatch(&request)),
                Effect::SetRequestHeader(name, value) => abi::set_header(MapType::RequestHeaders, &name, &value),
                Effect::SetResponseHeader(name, value) => abi::set_header(MapType::ResponseHeaders, &name, &value),
                Effect::AddResponseHeader(name, value) => abi::add_header(MapType::ResponseHeaders, &name, &value),
                Effect::RemoveRequestHeader(name) => abi::remove_header(MapType::RequestHeaders, name),
                Effect::RemoveResponseHeader(name) => abi::remove_header(MapType::ResponseHeaders, name),
                Effect::ReplaceRequestBody(body) => abi::set_buffer(BufferType::HttpRequestBody, 0, body_len, &body),
                Effect::Reply(Reply::Status { status, message }) => {
                    let no_metadata = HeaderBlock::serialize([]);
                    abi::send_local_response(200, message.as_bytes(), &no_metadata, status.code() as i32);
                }
                Effect::Reply(Reply::Http { code, headers, body }) => {
                    let headers = HeaderBlock::serialize(headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
                    abi::send_local_response(code, body.as_deref().unwrap_or_default().as_bytes(), &headers, -1);
                }
                Effect::ReplaceResponseBody(body) => abi::set_buffer(BufferType::HttpResponseBody, 0, body_len, &body),
                Effect::AddResponseTrailer(name, value) => {
                    abi::add_header(MapType::ResponseTrailers, &name, &value);
                }
                Effect::Count { slot, family, code, by } => {
                    if let Some(id) = self.metric(slot, family, code) {
                        abi::increment_metric(id, i64::try_from(by).unwrap_or(i64::MAX));
                    }
                }
                Effect::Record { slot, family, value } => {
                    if let Some(id) = self.metric(slot, family, None) {
                        abi::record_metric(id, value);
                    }
                }
                Effect::CountGuard(name) => count_guard(name),
                Effect::Tag(status) => abi::set_property(STATUS_PROPERTY, status.go_name().as_bytes()),
                Effect::MarkReplay => abi::set_property(crate::dedup::REPLAY_PROPERTY, b"1"),
                Effect::Log(line) => abi::log(LogLevel::Info, &line),
            }
        }
        self.fx = fx;
        sent
    }
}

impl Stream {
    /// etcd answered (or failed) the request the call is paused for.
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        let Some((token, direction)) = self.awaiting else { return };
        if token != token_id {
            return;
        }
        self.awaiting = None;
        let reply = etcd_reply(status_code, response_size);
        let Some(call) = self.call.as_mut() else { return };
        let next = {
            let mut shell = self.worker.borrow_mut();
            let shell = &mut *shell;
            call.on_etcd_answer(&mut shell.core, &mut Envoy::default(), reply, &mut shell.fx)
        };
        if self.carry_out(0, direction, next) == Action::Continue {
            match direction {
                Direction::Request => abi::resume(StreamType::HttpRequest),
                Direction::Response => abi::resume(StreamType::HttpResponse),
            }
        }
    }

    fn on_request_headers(&mut self, end_of_stream: bool) -> Action {
        let (next, sent) = {
            let mut shell = self.worker.borrow_mut();
            let shell = &mut *shell;
            let next = Call::start(
                &mut self.call,
                &mut shell.core,
                &mut Envoy::default(),
                self.context_id,
                end_of_stream,
                &mut shell.fx,
            );
            (next, shell.apply(0))
        };
        self.after(0, Direction::Request, next, sent)
    }

    fn on_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.step(body_size, Direction::Request, |call, worker, fx| {
            call.on_request_body(worker, &mut Envoy::default(), body_size, end_of_stream, fx)
        })
    }

    fn on_request_trailers(&mut self) -> Action {
        self.step(0, Direction::Request, |call, worker, fx| call.on_request_trailers(worker, &mut Envoy::default(), fx))
    }

    fn on_response_headers(&mut self, end_of_stream: bool) -> Action {
        self.step(0, Direction::Response, |call, worker, fx| {
            call.on_response_headers(worker, &mut Envoy::default(), end_of_stream, fx)
        })
    }

    fn on_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.step(body_size, Direction::Response, |call, worker, fx| {
            call.on_response_body(worker, &mut Envoy::default(), body_size, end_of_stream, fx)
        })
    }

    fn on_response_trailers(&mut self) -> Action {
        self.step(0, Direction::Response, |call, worker, fx| {
            call.on_response_trailers(worker, &mut Envoy::default(), fx)
        })
    }

    fn on_log(&mut self) {
        let Some(call) = self.call.as_mut() else { return };
        let mut shell = self.worker.borrow_mut();
        let shell = &mut *shell;
        call.finish(&mut shell.core, &mut Envoy::default(), &mut shell.fx);
        shell.apply(0);
        self.call = None;
    }
}

/// The host, as the core reads it: proxy-wasm host calls. One is made per
/// callback: the request and response header maps are fetched whole, once,
/// and looked up here (see [`HeaderBlock`] for why; a step reads two or three
/// of their values), trailers one value at a time unless a step wants them
/// all; all dropped with the callback, before the step's own header changes
/// are carried out.
#[derive(Default)]
struct Envoy {
    request: Option<HeaderBlock>,
    response: Option<HeaderBlock>,
    trailers: Option<HeaderBlock>,
    /// The last single value read.
    held: Option<Vec<u8>>,
}

impl Envoy {
    fn map(cache: &mut Option<HeaderBlock>, map: MapType) -> &HeaderBlock {
        cache.get_or_insert_with(|| HeaderBlock::new(abi::header_map(map)))
    }
}

/// Pairs as the core takes them: names as text.
fn owned_pairs(block: &HeaderBlock) -> Vec<(String, Vec<u8>)> {
    block.pairs().map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), v.to_vec())).collect()
}

impl Host for Envoy {
    fn request_header(&mut self, name: &str) -> Option<&[u8]> {
        Envoy::map(&mut self.request, MapType::RequestHeaders).get(name)
    }

    fn response_header(&mut self, name: &str) -> Option<&[u8]> {
        Envoy::map(&mut self.response, MapType::ResponseHeaders).get(name)
    }

    fn response_headers(&mut self) -> Vec<(String, Vec<u8>)> {
        owned_pairs(Envoy::map(&mut self.response, MapType::ResponseHeaders))
    }

    fn response_trailer(&mut self, name: &str) -> Option<&[u8]> {
        // The trailers callback reads one value (`grpc-status`): one value
        // read costs less than the whole map (`make bench --prices`).
        if self.trailers.is_some() {
            return self.trailers.as_ref().and_then(|block| block.get(name));
        }
        self.held = abi::header_value(MapType::ResponseTrailers, name);
        self.held.as_deref()
    }

    fn response_trailers(&mut self) -> Vec<(String, Vec<u8>)> {
        owned_pairs(Envoy::map(&mut self.trailers, MapType::ResponseTrailers))
    }

    fn request_body(&mut self, offset: usize, len: usize) -> Option<Vec<u8>> {
        abi::get_buffer(BufferType::HttpRequestBody, offset, len)
    }

    fn response_body(&mut self, offset: usize, len: usize) -> Option<Vec<u8>> {
        abi::get_buffer(BufferType::HttpResponseBody, offset, len)
    }

    fn property(&mut self, path: &[&str]) -> Option<Vec<u8>> {
        abi::get_property(path)
    }

    fn now_ns(&mut self) -> u64 {
        abi::now_ns()
    }
}

impl SharedStore for Envoy {
    fn get(&mut self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        abi::get_shared_data(key)
    }

    fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        match abi::set_shared_data(key, value, cas) {
            Ok(()) => Ok(()),
            Err(Status::CAS_MISMATCH) => Err(StoreError::CasMismatch),
            Err(_) => Err(StoreError::Failed),
        }
    }
}

fn count_guard(name: &str) {
    count_guard_by(name, 1);
}

fn count_guard_by(name: &str, by: i64) {
    if let Some(id) = abi::define_metric(MetricType::Counter, name) {
        abi::increment_metric(id, by);
    }
}

/// The contexts Envoy has created in this VM: the roots (one per plugin
/// sharing the VM) and the streams, found by the id Envoy passes to every
/// callback. Context ids are small integers the host hands out in turn, so
/// they are their own hash.
#[derive(Default)]
struct Contexts {
    roots: HashMap<u32, Root, IdHash>,
    // Boxed: a call's state is large, and moved in and out of the map
    // it would be copied byte by byte.
    streams: HashMap<u32, Box<Stream>, IdHash>,
}

type IdHash = std::hash::BuildHasherDefault<IdHasher>;

/// A context id as its own hash.
#[derive(Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }

    fn write_u32(&mut self, id: u32) {
        // Spread over the top bits too, which hashbrown's control bytes use.
        self.0 = u64::from(id).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

thread_local! {
    static CONTEXTS: RefCell<Contexts> = RefCell::new(Contexts::default());
    /// The stream waiting for each callout it sent. Envoy sends every
    /// callout from the root context (whichever context asked) and answers
    /// it there, however the stream ended: an entry goes with its answer, or
    /// with its stream.
    static CALLOUTS: RefCell<HashMap<u32, u32, IdHash>> = RefCell::new(HashMap::default());
}

/// Runs `f` on stream `id`; `None` if there is no such stream (a stream of
/// a root that refused its configuration, or a callback while another runs).
fn with_stream<R>(id: u32, f: impl FnOnce(&mut Stream) -> R) -> Option<R> {
    CONTEXTS.with(|c| {
        let mut c = c.try_borrow_mut().ok()?;
        c.streams.get_mut(&id).map(|s| f(s))
    })
}

fn with_root<R>(id: u32, f: impl FnOnce(&mut Root) -> R) -> Option<R> {
    CONTEXTS.with(|c| {
        let mut c = c.try_borrow_mut().ok()?;
        c.roots.get_mut(&id).map(f)
    })
}

/// A stream callback's answer: what a stream that is not a call (or not
/// there) gets is to go on.
fn action(a: Option<Action>) -> u32 {
    a.unwrap_or(Action::Continue) as u32
}
