//! The proxy-wasm adapter: Envoy's callbacks in, host calls out. Each callback
//! hands the stream to one step of [`crate::call::Call`] and carries out the
//! effects it returns; nothing here decides anything about gRPC.
//!
//! The SDK's `hostcalls` panic on host statuses they do not expect (a trap);
//! each effect is carried out only in the callback where Envoy accepts it,
//! and header values are read as bytes (the `String` variants unwrap UTF-8
//! from the network).

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, GrpcStatusCode, LogLevel, MapType, MetricType, Status};

use crate::call::{Call, Effect, Effects, Host, Next, Reply};
use crate::headers::HeaderBlock;
use crate::metrics::{guard, stat_name, Family};
use crate::shared::{SharedStore, StoreError};
use crate::status::GrpcStatus;
use crate::worker::Worker;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { worker: None }) });
}}

/// Filter-state key (`%FILTER_STATE(wasm.grpc_guard.grpc_code:PLAIN)%` in an
/// Envoy access log) holding the final status name of the call.
const STATUS_PROPERTY: &str = "grpc_guard.grpc_code";

struct Root {
    worker: Option<Rc<RefCell<Shell>>>,
}

/// The worker's core state, the stat ids Envoy gave its metrics, and one
/// effects buffer that every stream's steps reuse (callbacks on a worker run
/// one at a time), so a call allocates none of its own.
struct Shell {
    core: Worker,
    fx: Effects,
    /// Per method slot: the id of each family's stat, and of each coded
    /// family's stat per code, defined on first use.
    ids: Vec<SlotIds>,
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
            *cell = hostcalls::define_metric(kind, &stat_name(self.core.config.direction, family, labels, code)).ok();
        }
        *cell
    }
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes =
            hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX).ok().flatten().unwrap_or_default();
        let seed = Envoy::default().now_ns();
        match Worker::configure(&bytes, &mut Envoy::default(), seed) {
            Ok(core) => {
                self.worker = Some(Rc::new(RefCell::new(Shell { core, fx: Vec::new(), ids: Vec::new() })));
                true
            }
            Err(e) => {
                let _ = hostcalls::log(LogLevel::Error, &e.to_string());
                count_guard(guard::CONFIG_REJECTED);
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
    worker: Rc<RefCell<Shell>>,
    call: Option<Call>,
    context_id: u32,
}

impl Stream {
    /// Runs one step of the call, if the stream is a call, and carries out
    /// its effects; `body_len` is the size of the body chunk it was called for.
    fn step(&mut self, body_len: usize, step: impl FnOnce(&mut Call, &mut Worker, &mut Effects) -> Next) -> Action {
        let Some(call) = self.call.as_mut() else { return Action::Continue };
        let mut shell = self.worker.borrow_mut();
        let shell = &mut *shell;
        let next = step(call, &mut shell.core, &mut shell.fx);
        shell.apply(body_len);
        match next {
            Next::Continue => Action::Continue,
            Next::Pause => Action::Pause,
        }
    }
}

impl Shell {
    /// Carries out the effects of the step just run, in order.
    fn apply(&mut self, body_len: usize) {
        if self.fx.is_empty() {
            return;
        }
        let mut fx = std::mem::take(&mut self.fx);
        for effect in fx.drain(..) {
            match effect {
                Effect::SetRequestHeader(name, value) => set_header(MapType::HttpRequestHeaders, &name, &value),
                Effect::SetResponseHeader(name, value) => set_header(MapType::HttpResponseHeaders, &name, &value),
                Effect::AddResponseHeader(name, value) => {
                    let _ = hostcalls::add_map_value_bytes(MapType::HttpResponseHeaders, &name, &value);
                }
                Effect::RemoveRequestHeader(name) => remove_header(MapType::HttpRequestHeaders, name),
                Effect::RemoveResponseHeader(name) => remove_header(MapType::HttpResponseHeaders, name),
                Effect::ReplaceRequestBody(body) => {
                    let _ = hostcalls::set_buffer(BufferType::HttpRequestBody, 0, body_len, &body);
                }
                Effect::Reply(Reply::Status { status, message }) => {
                    let _ = hostcalls::send_grpc_response(sdk_code(status), Some(&message), vec![]);
                }
                Effect::Reply(Reply::Http { code, headers, body }) => {
                    let headers = headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
                    let _ = hostcalls::send_http_response(code, headers, body.as_deref().map(str::as_bytes));
                }
                Effect::ReplaceResponseBody(body) => {
                    let _ = hostcalls::set_buffer(BufferType::HttpResponseBody, 0, body_len, &body);
                }
                Effect::AddResponseTrailer(name, value) => {
                    let _ = hostcalls::add_map_value_bytes(MapType::HttpResponseTrailers, &name, &value);
                }
                Effect::Count { slot, family, code, by } => {
                    if let Some(id) = self.metric(slot, family, code) {
                        let _ = hostcalls::increment_metric(id, i64::try_from(by).unwrap_or(i64::MAX));
                    }
                }
                Effect::Record { slot, family, value } => {
                    if let Some(id) = self.metric(slot, family, None) {
                        let _ = hostcalls::record_metric(id, value);
                    }
                }
                Effect::CountGuard(name) => count_guard(name),
                Effect::Tag(status) => {
                    let _ = hostcalls::set_property(vec![STATUS_PROPERTY], Some(status.go_name().as_bytes()));
                }
                Effect::MarkReplay => {
                    let _ = hostcalls::set_property(vec![crate::dedup::REPLAY_PROPERTY], Some(b"1"));
                }
                Effect::Log(line) => {
                    let _ = hostcalls::log(LogLevel::Info, &line);
                }
            }
        }
        self.fx = fx;
    }
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
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
        shell.apply(0);
        match next {
            Next::Continue => Action::Continue,
            Next::Pause => Action::Pause,
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.step(body_size, |call, worker, fx| {
            call.on_request_body(worker, &mut Envoy::default(), body_size, end_of_stream, fx)
        })
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        self.step(0, |call, worker, fx| call.on_request_trailers(worker, &mut Envoy::default(), fx))
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.step(0, |call, _, fx| call.on_response_headers(&mut Envoy::default(), end_of_stream, fx))
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.step(body_size, |call, worker, fx| {
            call.on_response_body(worker, &mut Envoy::default(), body_size, end_of_stream, fx)
        })
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        self.step(0, |call, _, fx| call.on_response_trailers(&mut Envoy::default(), fx))
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
        cache.get_or_insert_with(|| HeaderBlock::new(header_map(map)))
    }
}

/// Pairs as the core takes them: names as text.
fn owned_pairs(block: &HeaderBlock) -> Vec<(String, Vec<u8>)> {
    block.pairs().map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), v.to_vec())).collect()
}

impl Host for Envoy {
    fn request_header(&mut self, name: &str) -> Option<&[u8]> {
        Envoy::map(&mut self.request, MapType::HttpRequestHeaders).get(name)
    }

    fn response_header(&mut self, name: &str) -> Option<&[u8]> {
        Envoy::map(&mut self.response, MapType::HttpResponseHeaders).get(name)
    }

    fn response_headers(&mut self) -> Vec<(String, Vec<u8>)> {
        owned_pairs(Envoy::map(&mut self.response, MapType::HttpResponseHeaders))
    }

    fn response_trailer(&mut self, name: &str) -> Option<&[u8]> {
        // The trailers callback reads one value (`grpc-status`): one value
        // read costs less than the whole map (`make bench --prices`).
        if self.trailers.is_some() {
            return self.trailers.as_ref().and_then(|block| block.get(name));
        }
        self.held = hostcalls::get_map_value_bytes(MapType::HttpResponseTrailers, name).ok().flatten();
        self.held.as_deref()
    }

    fn response_trailers(&mut self) -> Vec<(String, Vec<u8>)> {
        owned_pairs(Envoy::map(&mut self.trailers, MapType::HttpResponseTrailers))
    }

    fn request_body(&mut self, offset: usize, len: usize) -> Option<Vec<u8>> {
        hostcalls::get_buffer(BufferType::HttpRequestBody, offset, len).ok().flatten()
    }

    fn response_body(&mut self, offset: usize, len: usize) -> Option<Vec<u8>> {
        hostcalls::get_buffer(BufferType::HttpResponseBody, offset, len).ok().flatten()
    }

    fn property(&mut self, path: &[&str]) -> Option<Vec<u8>> {
        hostcalls::get_property(path.to_vec()).ok().flatten()
    }

    fn now_ns(&mut self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }
}

#[allow(unsafe_code)]
#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_pairs(
        map_type: MapType,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> Status;
}

/// A whole header map in its serialized form; empty where the host has none
/// (the SDK's own reader traps on a status it does not expect, and turns every
/// pair into two allocations).
#[allow(unsafe_code)]
fn header_map(map: MapType) -> Vec<u8> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes a pointer to `size` bytes it allocated through
    // this module's `proxy_on_memory_allocate` (the SDK's: a `Vec<u8>` of
    // that capacity, leaked), which is taken back here exactly once.
    unsafe {
        match proxy_get_header_map_pairs(map, &mut data, &mut size) {
            Status::Ok if !data.is_null() => Vec::from_raw_parts(data, size, size),
            _ => Vec::new(),
        }
    }
}

impl SharedStore for Envoy {
    fn get(&mut self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        hostcalls::get_shared_data(key).unwrap_or((None, None))
    }

    fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(StoreError::CasMismatch),
            Err(_) => Err(StoreError::Failed),
        }
    }
}

fn set_header(map: MapType, name: &str, value: &[u8]) {
    let _ = hostcalls::set_map_value_bytes(map, name, Some(value));
}

fn remove_header(map: MapType, name: &str) {
    let _ = hostcalls::remove_map_value(map, name);
}

fn count_guard(name: &str) {
    if let Ok(id) = hostcalls::define_metric(MetricType::Counter, name) {
        let _ = hostcalls::increment_metric(id, 1);
    }
}

/// The SDK's code for a status.
fn sdk_code(status: GrpcStatus) -> GrpcStatusCode {
    match status {
        GrpcStatus::Ok => GrpcStatusCode::Ok,
        GrpcStatus::Cancelled => GrpcStatusCode::Cancelled,
        GrpcStatus::Unknown => GrpcStatusCode::Unknown,
        GrpcStatus::InvalidArgument => GrpcStatusCode::InvalidArgument,
        GrpcStatus::DeadlineExceeded => GrpcStatusCode::DeadlineExceeded,
        GrpcStatus::NotFound => GrpcStatusCode::NotFound,
        GrpcStatus::AlreadyExists => GrpcStatusCode::AlreadyExists,
        GrpcStatus::PermissionDenied => GrpcStatusCode::PermissionDenied,
        GrpcStatus::ResourceExhausted => GrpcStatusCode::ResourceExhausted,
        GrpcStatus::FailedPrecondition => GrpcStatusCode::FailedPrecondition,
        GrpcStatus::Aborted => GrpcStatusCode::Aborted,
        GrpcStatus::OutOfRange => GrpcStatusCode::OutOfRange,
        GrpcStatus::Unimplemented => GrpcStatusCode::Unimplemented,
        GrpcStatus::Internal => GrpcStatusCode::Internal,
        GrpcStatus::Unavailable => GrpcStatusCode::Unavailable,
        GrpcStatus::DataLoss => GrpcStatusCode::DataLoss,
        GrpcStatus::Unauthenticated => GrpcStatusCode::Unauthenticated,
    }
}
