//! The proxy-wasm adapter: Envoy's callbacks in, host calls out. Decisions are
//! made by the host-free modules; this file only fetches what they need and
//! carries out what they decide.
//!
//! Host calls cost a VM crossing each, so per call it reads only the headers it
//! uses, frame prefixes (never whole bodies), and defines each metric once per
//! method per worker.
//!
//! The SDK's `hostcalls` panic on host statuses they do not expect; every call
//! here is made only in the callbacks where Envoy accepts it, and header values
//! are read as bytes (the `String` variants unwrap UTF-8 from the network).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, GrpcStatusCode, LogLevel, MapType, MetricType, Status};

mod dedup;

use sha2::Digest as _;

use crate::config::{Config, Direction, MethodPolicy, MethodType, WhenFull};
use crate::deadline::{is_late, DeadlineDecision, DeadlineSource};
use crate::dedup::{check_key, is_kept_status, Answer, Lookup, Settled};
use crate::frames::{Frame, FrameError, FrameReader};
use crate::method::{Admission, AdmittedMethods, FnvBuildHasher, MethodPath, OTHER};
use crate::metrics::{guard, stat_name, Family, MethodLabels};
use crate::record::DedupOutcome;
use crate::record::{cap, CallRecord, Sampler};
use crate::status::{GrpcStatus, ResetSide, ResponseSeen, StatusSource};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { worker: None }) });
}}

/// Filter-state key (`%FILTER_STATE(wasm.grpc_guard.grpc_code:PLAIN)%` in an
/// Envoy access log) holding the final status name of the call.
const STATUS_PROPERTY: &str = "grpc_guard.grpc_code";

/// Shared-data keys of the method tables, one per direction.
fn methods_key(direction: Direction) -> &'static str {
    match direction {
        Direction::Inbound => "grpc_guard.methods.inbound",
        Direction::Outbound => "grpc_guard.methods.outbound",
    }
}

/// How often a worker retries the compare-and-swap of the method table before
/// folding the method into `other` for this call.
const CAS_ATTEMPTS: usize = 8;

struct Root {
    worker: Option<Rc<Worker>>,
}

/// Per-VM (per Envoy worker thread) state shared by all its streams.
struct Worker {
    config: Config,
    methods: RefCell<Methods>,
    sampler: RefCell<Sampler>,
}

/// One labelled method (or `other`): its type, its guards and its metric ids.
struct Slot {
    service: String,
    method: String,
    grpc_type: MethodType,
    policy: MethodPolicy,
    /// Calls to this method are deduplicated by idempotency key.
    dedup: bool,
    ids: [Option<u32>; Family::ALL.len()],
    /// Families labelled with `grpc_code`, by [`Family::coded_index`] and code.
    coded: [[Option<u32>; GrpcStatus::ALL.len()]; 2],
}

impl Slot {
    fn new(service: &str, method: &str, grpc_type: MethodType, policy: MethodPolicy, dedup: bool) -> Slot {
        Slot {
            service: service.to_owned(),
            method: method.to_owned(),
            grpc_type,
            policy,
            dedup,
            ids: [None; Family::ALL.len()],
            coded: [[None; GrpcStatus::ALL.len()]; 2],
        }
    }

    /// The metric id for `family` (with `code` for the coded families),
    /// defined on first use.
    fn metric(&mut self, direction: Direction, family: Family, code: Option<GrpcStatus>) -> Option<u32> {
        let cell = match (family.coded_index(), code) {
            (Some(i), Some(code)) => self.coded.get_mut(i)?.get_mut(code.code() as usize)?,
            (None, None) => self.ids.get_mut(family as usize)?,
            _ => return None,
        };
        if cell.is_none() {
            let labels =
                MethodLabels { service: &self.service, method: &self.method, grpc_type: self.grpc_type.as_str() };
            let kind = if family.is_histogram() { MetricType::Histogram } else { MetricType::Counter };
            *cell = hostcalls::define_metric(kind, &stat_name(direction, family, labels, code)).ok();
        }
        *cell
    }
}

/// The worker's view of which methods have their own labels. Slot 0 is `other`.
struct Methods {
    by_path: HashMap<String, usize, FnvBuildHasher>,
    slots: Vec<Slot>,
    /// The shared table as read once it was full: it never changes after
    /// that, so a miss is answered from this copy without a host call, and a
    /// method another worker admitted still gets its label here.
    full: Option<AdmittedMethods>,
}

impl Methods {
    fn new(config: &Config) -> Methods {
        let other = Slot::new(OTHER, OTHER, MethodType::Unary, config.global, false);
        Methods { by_path: HashMap::default(), slots: vec![other], full: None }
    }

    /// The slot for a request path: its own, or `other` (0).
    fn slot_for(&mut self, config: &Config, path: &str) -> usize {
        if let Some(&slot) = self.by_path.get(path) {
            return slot;
        }
        let Some(parsed) = MethodPath::parse(path) else { return 0 };
        let full_name = parsed.full_name();
        if !config.method_allowed(&full_name) {
            return 0;
        }
        let labelled = match &self.full {
            Some(table) => table.contains(&full_name),
            None => self.admit(config, &full_name),
        };
        if !labelled {
            return 0;
        }
        let grpc_type = config.method_type(&full_name);
        let policy = config.policy_for(&full_name);
        let dedup = config.dedup_applies(&full_name);
        self.slots.push(Slot::new(parsed.service, parsed.method, grpc_type, policy, dedup));
        let slot = self.slots.len() - 1;
        self.by_path.insert(path.to_owned(), slot);
        slot
    }

    /// Admits `full_name` into the table all workers share (compare-and-swap).
    fn admit(&mut self, config: &Config, full_name: &str) -> bool {
        let key = methods_key(config.direction);
        for _ in 0..CAS_ATTEMPTS {
            let Ok((bytes, cas)) = hostcalls::get_shared_data(key) else { return false };
            let table = AdmittedMethods::from_bytes(bytes.as_deref().unwrap_or_default());
            match table.admit(full_name, config.max_methods) {
                Admission::Known => return true,
                Admission::Full => {
                    self.full = Some(table);
                    return false;
                }
                // Envoy accepts any cas for a missing key; `on_configure` creates
                // the key so that admissions are always checked.
                Admission::Store(new) => match hostcalls::set_shared_data(key, Some(&new), cas) {
                    Ok(()) => return true,
                    Err(Status::CasMismatch) => continue,
                    Err(_) => return false,
                },
            }
        }
        false
    }
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes =
            hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX).ok().flatten().unwrap_or_default();
        match Config::parse(&bytes) {
            Ok(config) => {
                let key = methods_key(config.direction);
                if matches!(hostcalls::get_shared_data(key), Ok((None, _))) {
                    let _ = hostcalls::set_shared_data(key, Some(b""), None);
                }
                if let Some(d) = &config.dedup {
                    dedup::create_slots(d);
                }
                let sampler = Sampler::new(config.ok_sample);
                let methods = RefCell::new(Methods::new(&config));
                self.worker = Some(Rc::new(Worker { config, methods, sampler: RefCell::new(sampler) }));
                true
            }
            Err(e) => {
                let _ = hostcalls::log(LogLevel::Error, &e.to_string());
                if let Ok(id) = hostcalls::define_metric(MetricType::Counter, guard::CONFIG_REJECTED) {
                    let _ = hostcalls::increment_metric(id, 1);
                }
                false
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let worker = self.worker.clone()?;
        Some(Box::new(Stream { worker, call: None, context_id }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One HTTP stream. `call` is `None` for non-gRPC traffic, which every
/// callback then passes straight through.
struct Stream {
    worker: Rc<Worker>,
    call: Option<Call>,
    context_id: u32,
}

/// The per-call state, created at request headers and consumed at log time.
struct Call {
    path: String,
    slot: usize,
    grpc_type: MethodType,
    start_ns: u64,
    request: FrameReader,
    response: FrameReader,
    /// Messages already added to the message counters (streams flush as they go).
    counted_req: u64,
    counted_resp: u64,
    seen: ResponseSeen,
    /// The status last written to filter state.
    tagged: Option<GrpcStatus>,
    /// The deadline the call runs under, and where it came from.
    deadline: Option<Duration>,
    deadline_source: DeadlineSource,
    max_request_message_bytes: Option<u64>,
    /// When the upstream's final status arrived, from the request headers
    /// (measured only for calls with a deadline; zero otherwise).
    answered_after: Option<Duration>,
    /// grpc-guard answered the call itself: it never reached the upstream.
    answered_by_guard: bool,
    /// The idempotency key's part in this call, if it has one.
    dedup: Option<dedup::Phase>,
    dedup_outcome: DedupOutcome,
}

impl Call {
    fn new(path: String, slot: usize, grpc_type: MethodType, policy: MethodPolicy) -> Call {
        Call {
            path,
            slot,
            grpc_type,
            start_ns: now_ns(),
            request: FrameReader::default(),
            response: FrameReader::default(),
            counted_req: 0,
            counted_resp: 0,
            seen: ResponseSeen::default(),
            tagged: None,
            deadline: None,
            deadline_source: DeadlineSource::None,
            max_request_message_bytes: policy.max_request_message_bytes,
            answered_after: None,
            answered_by_guard: false,
            dedup: None,
            dedup_outcome: DedupOutcome::None,
        }
    }

    /// Notes that the final status has arrived, if it has and not before.
    fn note_answer(&mut self) {
        let final_status = self.seen.trailer_status.or(self.seen.header_status).is_some();
        if final_status && self.answered_after.is_none() {
            self.answered_after = Some(match self.deadline {
                Some(_) => Duration::from_nanos(now_ns().saturating_sub(self.start_ns)),
                None => Duration::ZERO,
            });
        }
    }
}

/// Why a body chunk stops a call.
enum ChunkError {
    Frame(FrameError),
    TooLarge { largest: u32, limit: u64 },
}

impl From<FrameError> for ChunkError {
    fn from(e: FrameError) -> ChunkError {
        ChunkError::Frame(e)
    }
}

/// The SDK's code type for a status grpc-guard answers with itself.
fn sdk_code(status: GrpcStatus) -> GrpcStatusCode {
    match status {
        GrpcStatus::InvalidArgument => GrpcStatusCode::InvalidArgument,
        GrpcStatus::DeadlineExceeded => GrpcStatusCode::DeadlineExceeded,
        GrpcStatus::ResourceExhausted => GrpcStatusCode::ResourceExhausted,
        GrpcStatus::Internal => GrpcStatusCode::Internal,
        GrpcStatus::Aborted => GrpcStatusCode::Aborted,
        GrpcStatus::AlreadyExists => GrpcStatusCode::AlreadyExists,
        _ => GrpcStatusCode::Unknown,
    }
}

/// The filter-state value an access log prints (`STATUS_PROPERTY`).
fn write_status_property(status: GrpcStatus) {
    let _ = hostcalls::set_property(vec![STATUS_PROPERTY], Some(status.go_name().as_bytes()));
}

fn now_ns() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn header(map: MapType, name: &str) -> Option<Vec<u8>> {
    hostcalls::get_map_value_bytes(map, name).ok().flatten()
}

fn header_text(map: MapType, name: &str) -> Option<String> {
    header(map, name)
        .map(|v| String::from_utf8(v).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
}

impl Stream {
    fn with_slot<T>(&self, slot: usize, f: impl FnOnce(&mut Slot, Direction) -> T) -> Option<T> {
        let mut methods = self.worker.methods.borrow_mut();
        let direction = self.worker.config.direction;
        methods.slots.get_mut(slot).map(|s| f(s, direction))
    }

    fn increment(&self, slot: usize, family: Family, code: Option<GrpcStatus>, by: u64) {
        if by == 0 {
            return;
        }
        if let Some(Some(id)) = self.with_slot(slot, |s, d| s.metric(d, family, code)) {
            let _ = hostcalls::increment_metric(id, i64::try_from(by).unwrap_or(i64::MAX));
        }
    }

    fn record(&self, slot: usize, family: Family, value: u64) {
        if let Some(Some(id)) = self.with_slot(slot, |s, d| s.metric(d, family, None)) {
            let _ = hostcalls::record_metric(id, value);
        }
    }

    /// Adds the messages read since the last flush to the message counters.
    fn flush_message_counts(&mut self) {
        let Some(call) = self.call.as_mut() else { return };
        let (slot, req, resp) = (call.slot, call.request.messages(), call.response.messages());
        let (new_req, new_resp) = (req - call.counted_req, resp - call.counted_resp);
        call.counted_req = req;
        call.counted_resp = resp;
        self.increment(slot, Family::MsgFromClient, None, new_req);
        self.increment(slot, Family::MsgToClient, None, new_resp);
    }

    /// Writes the status name into filter state as soon as it is known, so an
    /// access log running before this filter's own log callback sees it, and
    /// again if trailers overrule a status the headers carried.
    fn tag_status(&mut self, status: GrpcStatus) {
        let Some(call) = self.call.as_mut() else { return };
        if call.tagged != Some(status) {
            call.tagged = Some(status);
            write_status_property(status);
        }
    }

    /// Tags the status the response carries so far, if it carries one.
    fn tag_seen_status(&mut self) {
        let seen = self.call.as_ref().and_then(|c| c.seen.trailer_status.or(c.seen.header_status));
        if let Some(status) = seen {
            self.tag_status(status);
        }
    }

    /// Reads the next body chunk of one direction.
    fn read_frames(&mut self, buffer: BufferType, chunk_len: usize) -> Result<(), ChunkError> {
        let Some(call) = self.call.as_mut() else { return Ok(()) };
        let (reader, family) = match buffer {
            BufferType::HttpRequestBody => (&mut call.request, Family::RequestBytes),
            _ => (&mut call.response, Family::ResponseBytes),
        };
        let mut sizes: Vec<u32> = Vec::new();
        let result = reader.advance(
            chunk_len,
            |offset, len| hostcalls::get_buffer(buffer, offset, len).ok().flatten(),
            |frame: Frame| sizes.push(frame.len),
        );
        let (slot, streaming) = (call.slot, call.grpc_type != MethodType::Unary);
        let limit = match buffer {
            BufferType::HttpRequestBody => call.max_request_message_bytes,
            _ => None,
        };
        for &size in &sizes {
            self.record(slot, family, u64::from(size));
        }
        if streaming {
            self.flush_message_counts();
        }
        result?;
        match (limit, sizes.iter().max()) {
            (Some(limit), Some(&largest)) if u64::from(largest) > limit => Err(ChunkError::TooLarge { largest, limit }),
            _ => Ok(()),
        }
    }

    /// Answers the client with `status` from the proxy: the call goes no
    /// further upstream. Valid in request callbacks only.
    fn answer(&mut self, status: GrpcStatus, message: &str) -> Action {
        if let Some(call) = self.call.as_mut() {
            call.answered_by_guard = true;
        }
        let _ = hostcalls::send_grpc_response(sdk_code(status), Some(message), vec![]);
        Action::Pause
    }

    /// Request headers of a call to a deduplicated method.
    fn dedup_request_headers(&mut self, end_of_stream: bool) -> Action {
        // The worker outlives the stream; holding it keeps the config borrowable
        // while `self` is mutated below, without copying it per call.
        let worker = Rc::clone(&self.worker);
        let Some(config) = worker.config.dedup.as_ref() else { return Action::Continue };
        let Some(call) = self.call.as_ref() else { return Action::Continue };
        let (slot, path, start_ns) = (call.slot, call.path.clone(), call.start_ns);
        let in_flight_for = call.deadline.unwrap_or(config.ttl);
        let value = header(MapType::HttpRequestHeaders, &config.header);
        let key = match check_key(value.as_deref(), config.require_key) {
            Ok(Some(key)) => key,
            Ok(None) => return Action::Continue,
            Err(e) => {
                self.set_dedup_outcome(DedupOutcome::BadKey);
                self.increment(slot, Family::DedupKeyRejected, None, 1);
                let message = format!("grpc-guard: idempotency key header {} {e}", config.header);
                return self.answer(GrpcStatus::InvalidArgument, &message);
            }
        };
        let path_for_replay = path.clone();
        let full_name = MethodPath::parse(&path).map(|m| m.full_name()).unwrap_or(path);
        let key = dedup::key_digest(config, &full_name, key);
        // Unique among this worker's streams, and across workers by the time.
        let owner = (u64::from(self.context_id) << 40) ^ start_ns;
        let until = start_ns.saturating_add(u64::try_from(in_flight_for.as_nanos()).unwrap_or(u64::MAX));
        let lookup = dedup::table(config).lookup_or_claim(&mut dedup::SharedSlots, &key, owner, start_ns, until);
        match lookup {
            Lookup::Claimed { slot: table_slot, evicted } => {
                self.set_dedup_outcome(DedupOutcome::First);
                self.increment(slot, Family::DedupFirst, None, 1);
                if evicted {
                    self.increment(slot, Family::DedupEvicted, None, 1);
                }
                if let Some(call) = self.call.as_mut() {
                    call.dedup = Some(dedup::Phase::First(dedup::FirstCall {
                        slot: table_slot,
                        owner,
                        key,
                        request: sha2::Sha256::new(),
                        response: Vec::new(),
                        too_large: false,
                        trailers: Vec::new(),
                    }));
                }
                Action::Continue
            }
            Lookup::InFlight | Lookup::Contended => {
                self.set_dedup_outcome(DedupOutcome::InFlight);
                self.increment(slot, Family::DedupInFlight, None, 1);
                self.answer(GrpcStatus::Aborted, "grpc-guard: a call with this idempotency key is in progress; retry")
            }
            Lookup::Done { fingerprint, answer } => {
                if let Some(call) = self.call.as_mut() {
                    call.dedup = Some(dedup::Phase::Verify { fingerprint, answer });
                }
                // Only the whole request's fingerprint tells a retry from a
                // reuse of the key, and a paused header callback would hold the
                // body back from this filter too (proxy-wasm turns Pause into
                // StopAllIteration). So the retry goes on now, but to the
                // replay hop, never upstream; its listener answers only once
                // the whole body has passed this filter's check.
                let _ = hostcalls::set_map_value_bytes(
                    MapType::HttpRequestHeaders,
                    "content-type",
                    Some(dedup::REPLAY_CONTENT_TYPE.as_bytes()),
                );
                let _ = hostcalls::set_map_value_bytes(MapType::HttpRequestHeaders, dedup::REPLAY_HEADER, Some(b"1"));
                // Should the replay route be missing (an Istio install without
                // its EnvoyFilter), the retry reaches the service on a path no
                // method has: it is answered Unimplemented, never executed.
                let replay_path = format!("{}{}", dedup::REPLAY_PATH_PREFIX, path_for_replay);
                let _ =
                    hostcalls::set_map_value_bytes(MapType::HttpRequestHeaders, ":path", Some(replay_path.as_bytes()));
                if end_of_stream {
                    return self.verify_and_replay(&[]);
                }
                Action::Continue
            }
            Lookup::Full => {
                self.set_dedup_outcome(DedupOutcome::Full);
                self.increment(slot, Family::DedupFull, None, 1);
                match config.when_full {
                    WhenFull::Forward => Action::Continue,
                    WhenFull::Reject => self.answer(
                        GrpcStatus::ResourceExhausted,
                        "grpc-guard: the idempotency table is full; retry later",
                    ),
                }
            }
        }
    }

    fn set_dedup_outcome(&mut self, outcome: DedupOutcome) {
        if let Some(call) = self.call.as_mut() {
            call.dedup_outcome = outcome;
        }
    }

    /// A retry of a finished key, with its whole request: replay the kept
    /// answer if the request is the same, refuse it otherwise.
    fn verify_and_replay(&mut self, body: &[u8]) -> Action {
        let Some(call) = self.call.as_mut() else { return Action::Continue };
        let slot = call.slot;
        let Some(dedup::Phase::Verify { fingerprint, answer }) = call.dedup.take() else { return Action::Continue };
        if crate::dedup::fingerprint(body) != fingerprint {
            self.set_dedup_outcome(DedupOutcome::Mismatch);
            self.increment(slot, Family::DedupMismatch, None, 1);
            return self
                .answer(GrpcStatus::InvalidArgument, "grpc-guard: idempotency key reused with a different request");
        }
        let Some(answer) = answer else {
            self.set_dedup_outcome(DedupOutcome::NotKept);
            self.increment(slot, Family::DedupNotKept, None, 1);
            return self.answer(
                GrpcStatus::AlreadyExists,
                "grpc-guard: this call already ran; its answer was too large to keep for replay",
            );
        };
        self.set_dedup_outcome(DedupOutcome::Replay);
        if answer.status != 0 {
            self.increment(slot, Family::DedupReplayed, None, 1);
            // An error has no message: a trailers-only local reply carries it whole.
            if let Some(call) = self.call.as_mut() {
                call.answered_by_guard = true;
            }
            let code = answer.status.to_string();
            let mut headers: Vec<(&str, &str)> = vec![("grpc-status", code.as_str()), (dedup::REPLAYED_HEADER, "true")];
            let message: Option<String> = answer
                .trailers
                .iter()
                .find(|(n, _)| n == "grpc-message")
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned());
            if let Some(m) = &message {
                headers.push(("grpc-message", m.as_str()));
            }
            let _ = hostcalls::send_http_response(200, headers, None);
            return Action::Pause;
        }
        // An OK answer carries a message: the retry, already on its way to the
        // replay hop, is let through; its answer is rewritten on the way back.
        if let Some(call) = self.call.as_mut() {
            call.answered_by_guard = true;
            call.dedup = Some(dedup::Phase::Replay(answer));
        }
        Action::Continue
    }

    /// Settles the first call of a key: keep what a retry would get again,
    /// free the key otherwise.
    fn settle_first_call(&mut self, call: &mut Call, status: GrpcStatus, source: StatusSource) {
        let Some(config) = self.worker.config.dedup.as_ref() else { return };
        let Some(dedup::Phase::First(first)) = call.dedup.take() else { return };
        let answered = matches!(source, StatusSource::Trailers | StatusSource::Headers);
        let result = (answered && is_kept_status(status.code())).then(|| Settled {
            fingerprint: first.request.finalize().into(),
            answer: (!first.too_large).then(|| Answer {
                status: status.code(),
                body: first.response,
                trailers: first.trailers,
            }),
        });
        if matches!(result, Some(Settled { answer: None, .. })) {
            call.dedup_outcome = DedupOutcome::NotKept;
        }
        dedup::table(config).settle(&mut dedup::SharedSlots, first.slot, &first.key, first.owner, result, now_ns());
    }

    fn finish(&mut self) {
        self.flush_message_counts();
        let Some(mut call) = self.call.take() else { return };
        let (status, source) = call.seen.final_status(|| {
            let details = hostcalls::get_property(vec!["response", "code_details"]).ok().flatten();
            ResetSide::from_code_details(&String::from_utf8_lossy(&details.unwrap_or_default()))
        });
        self.settle_first_call(&mut call, status, source);
        if call.tagged != Some(status) {
            write_status_property(status);
        }
        let duration_ms = now_ns().saturating_sub(call.start_ns) / 1_000_000;
        self.increment(call.slot, Family::Handled, Some(status), 1);
        self.record(call.slot, Family::HandlingMs, duration_ms);
        // A DEADLINE_EXCEEDED that Envoy answered itself (its router ending
        // the call at grpc-timeout) is not the upstream's answer.
        let ended_by_proxy_timeout = !call.answered_by_guard
            && status == GrpcStatus::DeadlineExceeded
            && source == StatusSource::Headers
            && !matches!(
                hostcalls::get_property(vec!["response", "code_details"]),
                Ok(Some(details)) if details == b"via_upstream"
            );
        let answered_after = if ended_by_proxy_timeout { None } else { call.answered_after };
        let late =
            !call.answered_by_guard && is_late(call.deadline, answered_after, status, source, ended_by_proxy_timeout);
        if late {
            self.increment(call.slot, Family::LateResponses, None, 1);
        }

        let log = status != GrpcStatus::Ok || self.worker.sampler.borrow_mut().sample();
        if !log {
            return;
        }
        let config = &self.worker.config;
        let (service, method) = match MethodPath::parse(&call.path) {
            Some(m) => (m.service, m.method),
            None => ("", cap(&call.path)),
        };
        // Request headers stay readable in the log callback; reading the id
        // only for calls that are logged saves a host call on sampled-out ones.
        let request_id = header_text(MapType::HttpRequestHeaders, &config.request_id_header);
        let record = CallRecord {
            direction: config.direction,
            service,
            method,
            grpc_type: call.grpc_type.as_str(),
            status,
            status_source: source,
            http_status: call.seen.http_status.unwrap_or(0),
            duration_ms,
            req_msgs: call.request.messages(),
            req_bytes: call.request.message_bytes(),
            resp_msgs: call.response.messages(),
            resp_bytes: call.response.message_bytes(),
            request_id: request_id.as_deref().map(cap),
            deadline_ms: call.deadline.map(|d| u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)),
            deadline_source: call.deadline_source,
            late,
            dedup: call.dedup_outcome,
        };
        let _ = hostcalls::log(LogLevel::Info, &record.to_json());
    }
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if self.worker.config.dedup.is_some() {
            // Only grpc-guard may send a request to the replay route.
            let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, dedup::REPLAY_HEADER);
        }
        let is_grpc =
            header(MapType::HttpRequestHeaders, "content-type").is_some_and(|ct| crate::is_grpc_content_type(&ct));
        if !is_grpc {
            return Action::Continue;
        }
        let path = header_text(MapType::HttpRequestHeaders, ":path").unwrap_or_default();
        let config = &self.worker.config;
        let slot = self.worker.methods.borrow_mut().slot_for(config, &path);
        // A labelled method carries its type and guards; a folded one is
        // looked up by name only when per-method settings exist at all.
        let labelled = if slot == 0 { None } else { self.with_slot(slot, |s, _| (s.grpc_type, s.policy, s.dedup)) };
        let folded_plain = config.method_types.is_empty() && !config.has_overrides() && config.dedup.is_none();
        let (grpc_type, policy, dedup) = match labelled {
            Some(settings) => settings,
            None if folded_plain => (MethodType::Unary, config.global, false),
            None => match MethodPath::parse(&path) {
                Some(m) => {
                    let full_name = m.full_name();
                    (config.method_type(&full_name), config.policy_for(&full_name), config.dedup_applies(&full_name))
                }
                None => (MethodType::Unary, config.global, false),
            },
        };
        let mut call = Call::new(path, slot, grpc_type, policy);
        let decision = policy.deadline.decide(header(MapType::HttpRequestHeaders, "grpc-timeout").as_deref());
        call.deadline = decision.deadline();
        call.deadline_source = decision.source();
        self.call = Some(call);
        self.increment(slot, Family::Started, None, 1);
        match decision {
            DeadlineDecision::Keep(_) => {}
            DeadlineDecision::Rewrite { header, source, .. } => {
                let family =
                    if source == DeadlineSource::Default { Family::DeadlineInjected } else { Family::DeadlineClamped };
                self.increment(slot, family, None, 1);
                let _ = hostcalls::set_map_value_bytes(
                    MapType::HttpRequestHeaders,
                    "grpc-timeout",
                    Some(header.as_bytes()),
                );
            }
            DeadlineDecision::Reject { status, message, .. } => {
                self.increment(slot, Family::DeadlineRejected, Some(status), 1);
                return self.answer(status, &message);
            }
        }
        if dedup {
            return self.dedup_request_headers(end_of_stream);
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(call) = self.call.as_mut() else { return Action::Continue };
        match call.dedup.as_mut() {
            Some(dedup::Phase::Verify { .. }) => {
                // Envoy buffers the body while this returns Pause; at its end
                // the buffer holds the whole request.
                if !end_of_stream {
                    return Action::Pause;
                }
                let body = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size).ok().flatten();
                let action = self.verify_and_replay(body.as_deref().unwrap_or_default());
                let _ = self.read_frames(BufferType::HttpRequestBody, body_size);
                return action;
            }
            Some(dedup::Phase::First(first)) => {
                if let Ok(Some(chunk)) = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size) {
                    first.request.update(&chunk);
                }
            }
            _ => {}
        }
        match self.read_frames(BufferType::HttpRequestBody, body_size) {
            Ok(()) => Action::Continue,
            Err(ChunkError::Frame(e)) => {
                if let Ok(id) = hostcalls::define_metric(MetricType::Counter, guard::BAD_FRAMES) {
                    let _ = hostcalls::increment_metric(id, 1);
                }
                self.answer(GrpcStatus::Internal, &format!("grpc-guard: request body is not gRPC: {e}"))
            }
            Err(ChunkError::TooLarge { largest, limit }) => {
                let slot = self.call.as_ref().map_or(0, |c| c.slot);
                self.increment(slot, Family::RequestTooLarge, None, 1);
                let message = format!(
                    "grpc-guard: request message of {largest} bytes is over this method's limit of {limit} bytes"
                );
                self.answer(GrpcStatus::ResourceExhausted, &message)
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(call) = self.call.as_mut() else { return Action::Continue };
        let replaying = matches!(call.dedup, Some(dedup::Phase::Replay(_)));
        let hop_answered = replaying
            && header(MapType::HttpResponseHeaders, ":status").as_deref() == Some(b"200")
            && header(MapType::HttpResponseHeaders, "grpc-status").is_none();
        if replaying && !hop_answered {
            // The replay hop failed (no route, no listener): its answer goes
            // to the client as it is, unmarked.
            call.dedup = None;
            call.dedup_outcome = DedupOutcome::ReplayFailed;
        }
        if hop_answered {
            let slot = call.slot;
            self.increment(slot, Family::DedupReplayed, None, 1);
            let Some(call) = self.call.as_mut() else { return Action::Continue };
            // The internal listener's plain 200 becomes the kept gRPC answer;
            // its body and trailers follow in the body callback.
            let _ =
                hostcalls::set_map_value_bytes(MapType::HttpResponseHeaders, "content-type", Some(b"application/grpc"));
            let _ = hostcalls::remove_map_value(MapType::HttpResponseHeaders, "content-length");
            let _ = hostcalls::set_map_value_bytes(MapType::HttpResponseHeaders, dedup::REPLAYED_HEADER, Some(b"true"));
            call.seen.http_status = Some(200);
            return Action::Continue;
        }
        call.seen.http_status = header(MapType::HttpResponseHeaders, ":status")
            .and_then(|v| std::str::from_utf8(&v).ok().and_then(|s| s.parse().ok()));
        call.seen.header_status =
            header(MapType::HttpResponseHeaders, "grpc-status").and_then(|v| GrpcStatus::from_header(&v));
        call.seen.complete |= end_of_stream;
        call.note_answer();
        if let (Some(dedup::Phase::First(first)), Some(_)) = (call.dedup.as_mut(), call.seen.header_status) {
            first.trailers = dedup::status_headers();
        }
        self.tag_seen_status();
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(call) = self.call.as_mut() else { return Action::Continue };
        match call.dedup.as_mut() {
            Some(dedup::Phase::Replay(answer)) => {
                // Hold the placeholder until the end, then put the kept
                // message and trailers in its place (trailers can be added
                // only here, at end of stream).
                if !end_of_stream {
                    return Action::Pause;
                }
                let _ = hostcalls::set_buffer(BufferType::HttpResponseBody, 0, body_size, &answer.body);
                for (name, value) in &answer.trailers {
                    let _ = hostcalls::add_map_value_bytes(MapType::HttpResponseTrailers, name, value);
                }
                let (status, replayed) = (GrpcStatus::from_code(answer.status), answer.body.len());
                call.seen.trailer_status = status;
                call.seen.complete = true;
                call.note_answer();
                let _ = self.read_frames(BufferType::HttpResponseBody, replayed);
                self.tag_seen_status();
                return Action::Continue;
            }
            Some(dedup::Phase::First(first)) if !first.too_large => {
                let limit = self.worker.config.dedup.as_ref().map_or(0, |d| d.max_response_bytes as usize);
                if first.response.len() + body_size > limit {
                    first.too_large = true;
                    first.response = Vec::new();
                } else if let Ok(Some(chunk)) = hostcalls::get_buffer(BufferType::HttpResponseBody, 0, body_size) {
                    first.response.extend_from_slice(&chunk);
                }
            }
            _ => {}
        }
        // A response that is not framed is not ours to fix; counting stops.
        let _ = self.read_frames(BufferType::HttpResponseBody, body_size);
        if let Some(call) = self.call.as_mut() {
            call.seen.complete |= end_of_stream;
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        let Some(call) = self.call.as_mut() else { return Action::Continue };
        call.seen.trailer_status =
            header(MapType::HttpResponseTrailers, "grpc-status").and_then(|v| GrpcStatus::from_header(&v));
        call.seen.complete = true;
        call.note_answer();
        if let Some(dedup::Phase::First(first)) = call.dedup.as_mut() {
            first.trailers = hostcalls::get_map_bytes(MapType::HttpResponseTrailers).unwrap_or_default();
        }
        self.tag_seen_status();
        Action::Continue
    }

    fn on_log(&mut self) {
        self.finish();
    }
}
