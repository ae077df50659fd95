//! A deterministic proxy-wasm host on wasmtime, standing in for Envoy.
//!
//! # Model
//!
//! A [`Host`] compiles one filter module (`.wasm` built for `wasm32-wasip1`
//! against ABI `proxy_abi_version_0_2_1`: grpc-guard's own bindings, or the
//! proxy-wasm Rust SDK 0.2.x as the floor filter uses) and owns
//! what an Envoy process shares between its workers: shared data, custom
//! metrics and the clock. Each [`Vm`] is one worker: its own wasm instance,
//! root context and streams. A test drives a [`Stream`] through the callbacks
//! Envoy would make, in the order it chooses, then inspects what the filter
//! did: header and body edits, local replies, logs, properties, metrics.
//!
//! Envoy is the reference for every answer (its `Context` in
//! source/extensions/common/wasm/context.cc and proxy-wasm-cpp-host's
//! exports.cc), including the unfriendly ones: a header map the filter reads
//! outside its callback is `BadArgument`, which the Rust SDK's wrappers turn
//! into a panic and so a trap, exactly as in Envoy. A trap poisons the VM: every later call on
//! it is a no-op returning [`Action::Trapped`].
//!
//! What it is not: a network proxy. There are no upstreams, no HTTP or gRPC
//! callouts and no shared queues; a filter importing those hostcalls gets a
//! trap when it calls them.
//!
//! Nothing here reads the wall clock or real randomness: time moves with
//! [`Vm::advance_clock`], WASI randomness is a fixed sequence, and
//! [`Vm::fuel_consumed`] counts wasm instructions, so runs are reproducible.

mod abi;
mod error;
mod imports;
mod local_reply;
mod shared;
mod state;
mod stream;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use wasmtime::{Config, Engine, Instance, Linker, Module, Store, WasmParams, WasmResults};

pub use abi::LogLevel;
pub use error::HostError;
pub use local_reply::LocalReply;
pub use shared::Metrics;
pub use stream::StreamEvent;

use abi::{BufferType, MapType, Pairs};
use shared::{lock, Process};
use state::VmState;

/// Plenty for any test, far from wasmtime's internal limit.
const FUEL_BUDGET: u64 = 1 << 62;
/// Envoy numbers the root context first; stream contexts follow it.
const ROOT_CONTEXT_ID: u32 = 1;

/// One engine per test process: modules compiled by it can be shared by
/// every [`Host`].
fn engine() -> wasmtime::Result<Engine> {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    if let Some(engine) = ENGINE.get() {
        return Ok(engine.clone());
    }
    let mut config = Config::new();
    config.consume_fuel(true);
    // The same float bits on every machine.
    config.cranelift_nan_canonicalization(true);
    let engine = Engine::new(&config)?;
    Ok(ENGINE.get_or_init(|| engine).clone())
}

fn module_cache() -> &'static Mutex<HashMap<Vec<u8>, Module>> {
    static MODULES: OnceLock<Mutex<HashMap<Vec<u8>, Module>>> = OnceLock::new();
    MODULES.get_or_init(Mutex::default)
}

/// One line the filter logged with `proxy_log`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub level: LogLevel,
    pub message: String,
}

/// What a callback told the host to do with the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    /// The filter stopped iteration (any non-zero return), or the stream has
    /// ended with a local reply.
    Pause,
    /// The VM trapped, now or earlier; see [`Vm::trapped`].
    Trapped,
}

/// An HTTP stream context inside one [`Vm`].
#[derive(Debug, PartialEq, Eq)]
pub struct Stream {
    id: u32,
}

impl Stream {
    /// The context id the filter sees.
    pub fn id(&self) -> u32 {
        self.id
    }
}

/// A compiled filter plus the process-wide state its VMs share.
pub struct Host {
    engine: Engine,
    module: Module,
    linker: Linker<VmState>,
    process: Arc<Process>,
}

impl Host {
    /// Reads and compiles the filter; checks it speaks ABI 0.2.1.
    ///
    /// Compiled modules are cached per test process by content, so loading
    /// the same filter in every test costs one compilation.
    pub fn load(wasm_path: impl AsRef<Path>) -> Result<Host, HostError> {
        let path = wasm_path.as_ref().to_path_buf();
        let bytes = std::fs::read(&path).map_err(|source| HostError::Read { path: path.clone(), source })?;
        Self::compile(path, bytes)
    }

    /// The names of the functions the module exports: for a filter, the
    /// callbacks Envoy enters its VM through (it skips the others).
    pub fn exported_functions(&self) -> Vec<String> {
        let mut names: Vec<String> =
            self.module.exports().filter(|e| e.ty().func().is_some()).map(|e| e.name().to_owned()).collect();
        names.sort();
        names
    }

    /// [`Host::load`] for a module already in memory (binary wasm).
    pub fn from_bytes(wasm: &[u8]) -> Result<Host, HostError> {
        Self::compile(PathBuf::from("<in-memory module>"), wasm.to_vec())
    }

    fn compile(path: PathBuf, bytes: Vec<u8>) -> Result<Host, HostError> {
        let compile = |message: String| HostError::Compile { path: path.clone(), message };
        let engine = engine().map_err(|e| compile(format!("{e:#}")))?;
        let module = {
            let mut cache = lock(module_cache());
            match cache.get(&bytes) {
                Some(module) => module.clone(),
                None => {
                    let module = Module::new(&engine, &bytes).map_err(|e| compile(format!("{e:#}")))?;
                    cache.insert(bytes, module.clone());
                    module
                }
            }
        };
        if module.get_export("proxy_abi_version_0_2_1").is_none() {
            return Err(HostError::AbiVersion { path });
        }
        let linker = Self::linker(&engine, &module, &path)?;
        Ok(Host { engine, module, linker, process: Arc::new(Process::default()) })
    }

    fn linker(engine: &Engine, module: &Module, path: &Path) -> Result<Linker<VmState>, HostError> {
        let mut linker = Linker::new(engine);
        let link = |linker: &mut Linker<VmState>| -> wasmtime::Result<()> {
            imports::link_env(linker)?;
            imports::link_wasi(linker)?;
            linker.define_unknown_imports_as_traps(module)
        };
        link(&mut linker).map_err(|e| HostError::Compile {
            path: PathBuf::from(path),
            message: format!("cannot link the hostcalls: {e:#}"),
        })?;
        Ok(linker)
    }

    /// Starts one VM (one Envoy worker): `_initialize`, the root context,
    /// `proxy_on_vm_start` and `proxy_on_configure` with `config`.
    pub fn start_vm(&self, config: &str) -> Result<Vm, HostError> {
        let state = VmState::new(Arc::clone(&self.process), config, ROOT_CONTEXT_ID);
        let mut store = Store::new(&self.engine, state);
        store.set_fuel(FUEL_BUDGET).map_err(|e| HostError::Instantiate { message: format!("{e:#}") })?;
        let instance = self
            .linker
            .instantiate(&mut store, &self.module)
            .map_err(|e| HostError::Instantiate { message: format!("{e:#}") })?;
        let mut vm = Vm { store, instance, next_id: ROOT_CONTEXT_ID + 1, trapped: None, trace_mark: 0 };
        vm.start(config)?;
        Ok(vm)
    }

    /// The custom metrics of every VM of this host: Envoy's stats are
    /// process-wide, so two workers incrementing one counter add up.
    pub fn metrics(&self) -> Metrics {
        lock(&self.process.metrics).snapshot()
    }

    /// The value stored in shared data under `key` by any VM of this host,
    /// as `proxy_get_shared_data` returns it; `None` for a key never set.
    /// Tests look at what the filter keeps (and how big it is); the one
    /// state they set is [`Host::answered_before`].
    pub fn shared_data(&self, key: &str) -> Option<Vec<u8>> {
        lock(&self.process.shared_data).get(key.as_bytes()).ok().map(|(value, _)| value)
    }

    /// An Envoy whose upstreams have answered these methods (`pkg.Svc/Get`)
    /// before, inbound: they have earned their labels (README "Metrics"),
    /// as in the shared method table a filter of this Envoy left. Tests of
    /// other guards start from there, so their calls' metrics carry the
    /// method's labels from the first call.
    pub fn answered_before(&self, methods: &[&str]) {
        let table: String = methods.iter().map(|m| format!("{m}\n")).collect();
        let _ = lock(&self.process.shared_data).set(b"grpc_guard.methods.inbound", table.as_bytes(), 0);
    }
}

enum Outcome<R> {
    Returned(R),
    Missing,
    Trapped,
}

/// One Envoy worker running the filter.
pub struct Vm {
    store: Store<VmState>,
    instance: Instance,
    next_id: u32,
    trapped: Option<String>,
    /// Fuel left at the last look at the hostcall trace.
    trace_mark: u64,
}

impl Vm {
    fn start(&mut self, config: &str) -> Result<(), HostError> {
        let init =
            if self.instance.get_func(&mut self.store, "_initialize").is_some() { "_initialize" } else { "_start" };
        self.startup_call::<(), ()>(init, ())?;
        self.startup_call::<(u32, u32), ()>("proxy_on_context_create", (ROOT_CONTEXT_ID, 0))?;
        if self.startup_call::<(u32, u32), u32>("proxy_on_vm_start", (ROOT_CONTEXT_ID, 0))? == Some(0) {
            return Err(HostError::VmStartRejected { logs: self.logs() });
        }
        self.store.data_mut().configuring = true;
        let size = abi::len_u32(config.len());
        let configured = self.startup_call::<(u32, u32), u32>("proxy_on_configure", (ROOT_CONTEXT_ID, size));
        self.store.data_mut().configuring = false;
        if configured? == Some(0) {
            return Err(HostError::ConfigureRejected { logs: self.logs() });
        }
        Ok(())
    }

    fn startup_call<P: WasmParams, R: WasmResults>(
        &mut self,
        name: &'static str,
        params: P,
    ) -> Result<Option<R>, HostError> {
        match self.call::<P, R>(ROOT_CONTEXT_ID, name, params) {
            Outcome::Returned(value) => Ok(Some(value)),
            Outcome::Missing => Ok(None),
            Outcome::Trapped => Err(HostError::Trapped {
                during: name,
                message: self.trapped.clone().unwrap_or_default(),
                logs: self.logs(),
            }),
        }
    }

    /// Calls an export with `context` as the active context. A missing export
    /// is skipped, as Envoy skips callbacks a module does not define.
    fn call<P: WasmParams, R: WasmResults>(&mut self, context: u32, name: &str, params: P) -> Outcome<R> {
        if self.trapped.is_some() {
            return Outcome::Trapped;
        }
        let Some(func) = self.instance.get_func(&mut self.store, name) else {
            return Outcome::Missing;
        };
        let func = match func.typed::<P, R>(&self.store) {
            Ok(func) => func,
            Err(error) => {
                self.trapped = Some(format!("{name} has an unexpected signature: {error:#}"));
                return Outcome::Trapped;
            }
        };
        self.store.data_mut().active = context;
        let result = func.call(&mut self.store, params);
        let state = self.store.data_mut();
        state.active = state.root_id;
        match result {
            Ok(value) => Outcome::Returned(value),
            Err(error) => {
                // The filter's panic hook (and the SDK's) logs the panic message at critical
                // level just before the trap: it says more than the trap.
                let panic = state
                    .logs
                    .iter()
                    .rev()
                    .find(|line| line.level == LogLevel::Critical)
                    .map(|line| format!(" (last critical log: {})", line.message))
                    .unwrap_or_default();
                // The root cause names the trap (or the unknown import);
                // the full chain is a wasm backtrace.
                self.trapped = Some(format!("{name} trapped: {}{panic}", error.root_cause()));
                Outcome::Trapped
            }
        }
    }

    fn action(outcome: Outcome<u32>) -> Action {
        match outcome {
            Outcome::Returned(0) | Outcome::Missing => Action::Continue,
            Outcome::Returned(_) => Action::Pause,
            Outcome::Trapped => Action::Trapped,
        }
    }

    fn stream_state(&mut self, s: &Stream) -> &mut stream::StreamState {
        self.store
            .data_mut()
            .streams
            .get_mut(&s.id)
            .unwrap_or_else(|| panic!("stream {} does not belong to this VM", s.id))
    }

    fn stream_ref(&self, s: &Stream) -> &stream::StreamState {
        self.store.data().streams.get(&s.id).unwrap_or_else(|| panic!("stream {} does not belong to this VM", s.id))
    }

    /// `Some` when the callback must not reach the filter: the VM trapped, or
    /// the stream already ended with a local reply.
    fn skip(&mut self, s: &Stream) -> Option<Action> {
        if self.trapped.is_some() {
            return Some(Action::Trapped);
        }
        self.stream_state(s).local_reply.is_some().then_some(Action::Pause)
    }

    /// Moves the fake clock (shared by every VM of the host) forward.
    pub fn advance_clock(&mut self, d: Duration) {
        self.store.data().process.clock.advance(d);
    }

    /// A new stream context: `proxy_on_context_create(id, root_id)`.
    pub fn new_stream(&mut self) -> Stream {
        let id = self.next_id;
        self.next_id += 1;
        self.store.data_mut().streams.insert(id, stream::StreamState::default());
        // A trap here is recorded in `trapped`; the stream's callbacks then
        // return `Action::Trapped`.
        let _ = self.call::<(u32, u32), ()>(id, "proxy_on_context_create", (id, ROOT_CONTEXT_ID));
        Stream { id }
    }

    fn run_headers(&mut self, id: u32, kind: MapType, pairs: Pairs, end_of_stream: bool) -> Action {
        let name = match kind {
            MapType::RequestHeaders => "proxy_on_request_headers",
            _ => "proxy_on_response_headers",
        };
        let count = self.streams_mut(id).begin_map(kind, pairs, end_of_stream);
        let outcome = self.call::<(u32, u32, u32), u32>(id, name, (id, abi::len_u32(count), u32::from(end_of_stream)));
        let action = Self::action(outcome);
        self.streams_mut(id).end_map(kind, action == Action::Pause);
        action
    }

    fn run_body(&mut self, id: u32, kind: BufferType, chunk: &[u8], end_of_stream: bool) -> Action {
        let name = match kind {
            BufferType::HttpRequestBody => "proxy_on_request_body",
            _ => "proxy_on_response_body",
        };
        let size = self.streams_mut(id).begin_body(kind, chunk, end_of_stream);
        let outcome = self.call::<(u32, u32, u32), u32>(id, name, (id, abi::len_u32(size), u32::from(end_of_stream)));
        let action = Self::action(outcome);
        self.streams_mut(id).end_body(kind, action == Action::Pause);
        action
    }

    fn run_trailers(&mut self, id: u32, kind: MapType, pairs: Pairs) -> Action {
        let name = match kind {
            MapType::RequestTrailers => "proxy_on_request_trailers",
            _ => "proxy_on_response_trailers",
        };
        let count = self.streams_mut(id).begin_map(kind, pairs, true);
        let outcome = self.call::<(u32, u32), u32>(id, name, (id, abi::len_u32(count)));
        let action = Self::action(outcome);
        self.streams_mut(id).end_map(kind, action == Action::Pause);
        action
    }

    fn streams_mut(&mut self, id: u32) -> &mut stream::StreamState {
        self.stream_state(&Stream { id })
    }

    /// Acts on a local reply the filter sent during the callback that just
    /// returned, as Envoy does once the VM call is over.
    ///
    /// From a request callback, Envoy encodes the reply through the filter
    /// chain, so this filter's response callbacks see the reply's headers
    /// (and body) before the request callback's caller gets control back.
    /// From a response callback the reply replaces the response directly.
    fn settle(&mut self, id: u32, action: Action, in_request: bool) -> Action {
        let state = self.streams_mut(id);
        let Some(reply) = state.pending_local_reply.take() else {
            return action;
        };
        let (headers, body) = reply.response(state.grpc_request);
        state
            .host_properties
            .insert(vec!["response".into(), "code_details".into()], reply.details.clone().into_bytes());
        state.local_reply = Some(reply);
        if in_request {
            let headers_end = body.is_empty();
            let mut outcome = self.run_headers(id, MapType::ResponseHeaders, headers, headers_end);
            if outcome != Action::Trapped && !body.is_empty() {
                outcome = self.run_body(id, BufferType::HttpResponseBody, &body, true);
            }
            if outcome == Action::Trapped {
                return Action::Trapped;
            }
            self.settle(id, Action::Pause, false)
        } else {
            let state = self.streams_mut(id);
            state.replace_map(MapType::ResponseHeaders, headers);
            state.drop_map(MapType::ResponseTrailers);
            state.response_body.replace(body);
            if action == Action::Trapped {
                Action::Trapped
            } else {
                Action::Pause
            }
        }
    }

    pub fn request_headers(&mut self, s: &Stream, headers: &[(&str, &str)], end_of_stream: bool) -> Action {
        if let Some(action) = self.skip(s) {
            return action;
        }
        let action = self.run_headers(s.id, MapType::RequestHeaders, pairs(headers), end_of_stream);
        self.settle(s.id, action, true)
    }

    pub fn request_body(&mut self, s: &Stream, chunk: &[u8], end_of_stream: bool) -> Action {
        if let Some(action) = self.skip(s) {
            return action;
        }
        let action = self.run_body(s.id, BufferType::HttpRequestBody, chunk, end_of_stream);
        self.settle(s.id, action, true)
    }

    pub fn request_trailers(&mut self, s: &Stream, trailers: &[(&str, &str)]) -> Action {
        if let Some(action) = self.skip(s) {
            return action;
        }
        let action = self.run_trailers(s.id, MapType::RequestTrailers, pairs(trailers));
        self.settle(s.id, action, true)
    }

    /// Response headers from the upstream: Envoy's router notes
    /// `response.code_details: via_upstream` as they arrive (unless a test
    /// set the details itself).
    pub fn response_headers(&mut self, s: &Stream, headers: &[(&str, &str)], end_of_stream: bool) -> Action {
        if let Some(action) = self.skip(s) {
            return action;
        }
        self.stream_state(s)
            .host_properties
            .entry(vec!["response".into(), "code_details".into()])
            .or_insert_with(|| b"via_upstream".to_vec());
        let action = self.run_headers(s.id, MapType::ResponseHeaders, pairs(headers), end_of_stream);
        self.settle(s.id, action, false)
    }

    pub fn response_body(&mut self, s: &Stream, chunk: &[u8], end_of_stream: bool) -> Action {
        if let Some(action) = self.skip(s) {
            return action;
        }
        let action = self.run_body(s.id, BufferType::HttpResponseBody, chunk, end_of_stream);
        self.settle(s.id, action, false)
    }

    pub fn response_trailers(&mut self, s: &Stream, trailers: &[(&str, &str)]) -> Action {
        if let Some(action) = self.skip(s) {
            return action;
        }
        let action = self.run_trailers(s.id, MapType::ResponseTrailers, pairs(trailers));
        self.settle(s.id, action, false)
    }

    /// Ends the stream the way current Envoy does: the access log
    /// (`proxy_on_log`, with the final request headers, response headers and
    /// trailers readable) runs before the filter is destroyed
    /// (`proxy_on_done`, then `proxy_on_delete`).
    pub fn finish(&mut self, s: Stream) {
        let id = s.id;
        self.stream_state(&s).in_access_log = true;
        let _ = self.call::<(u32,), ()>(id, "proxy_on_log", (id,));
        self.stream_state(&s).in_access_log = false;
        let _ = self.call::<(u32,), u32>(id, "proxy_on_done", (id,));
        let _ = self.call::<(u32,), ()>(id, "proxy_on_delete", (id,));
        self.store.data_mut().streams.remove(&id);
    }

    /// Ends the stream the way Envoy ends an HTTP/3 stream whose access log
    /// waits for the client's acknowledgements (`quic_defer_logging_to_ack_listener`,
    /// on by default): the filter is destroyed (`proxy_on_done`, then
    /// `proxy_on_delete`) before the access log runs (`proxy_on_log`).
    pub fn finish_deleted_before_log(&mut self, s: Stream) {
        let id = s.id;
        let _ = self.call::<(u32,), u32>(id, "proxy_on_done", (id,));
        let _ = self.call::<(u32,), ()>(id, "proxy_on_delete", (id,));
        self.stream_state(&s).in_access_log = true;
        let _ = self.call::<(u32,), ()>(id, "proxy_on_log", (id,));
        self.stream_state(&s).in_access_log = false;
        self.store.data_mut().streams.remove(&id);
    }

    /// Ends a stream the filter never saw (another filter answered it), the
    /// way Envoy ends one over HTTP/3: its destroy skips the context (not
    /// created yet), the access log creates it (here, [`Vm::new_stream`] did)
    /// and logs it (`proxy_on_log`), and nothing deletes it.
    pub fn finish_logged_only(&mut self, s: Stream) {
        let id = s.id;
        self.stream_state(&s).in_access_log = true;
        let _ = self.call::<(u32,), ()>(id, "proxy_on_log", (id,));
        self.stream_state(&s).in_access_log = false;
        self.store.data_mut().streams.remove(&id);
    }

    /// What `proxy_get_property(path)` returns on this stream from now on
    /// (e.g. `["response", "code_details"]`). Paths nobody set are
    /// `NotFound`.
    pub fn set_property(&mut self, s: &Stream, path: &[&str], value: &[u8]) {
        let path = path.iter().map(|segment| (*segment).to_owned()).collect();
        self.stream_state(s).host_properties.insert(path, value.to_vec());
    }

    /// What the filter stored with `proxy_set_property` under exactly `path`.
    pub fn stream_property(&self, s: &Stream, path: &[&str]) -> Option<Vec<u8>> {
        let path: Vec<String> = path.iter().map(|segment| (*segment).to_owned()).collect();
        self.stream_ref(s).filter_properties.get(&path).cloned()
    }

    pub fn request_headers_now(&self, s: &Stream) -> Vec<(String, String)> {
        strings(self.stream_ref(s).snapshot(MapType::RequestHeaders))
    }

    pub fn response_headers_now(&self, s: &Stream) -> Vec<(String, String)> {
        strings(self.stream_ref(s).snapshot(MapType::ResponseHeaders))
    }

    /// The trailers given to [`Vm::response_trailers`], or created by the
    /// filter at the end of the response body, after the filter's edits.
    pub fn response_trailers_now(&self, s: &Stream) -> Vec<(String, String)> {
        strings(self.stream_ref(s).snapshot(MapType::ResponseTrailers))
    }

    /// The request body buffer as the filter left it: the last chunk, or
    /// everything buffered while the filter paused.
    pub fn request_body_now(&self, s: &Stream) -> Vec<u8> {
        self.stream_ref(s).request_body.bytes().to_vec()
    }

    pub fn response_body_now(&self, s: &Stream) -> Vec<u8> {
        self.stream_ref(s).response_body.bytes().to_vec()
    }

    pub fn local_reply(&self, s: &Stream) -> Option<LocalReply> {
        self.stream_ref(s).local_reply.clone()
    }

    /// Resume and reset requests the filter made for this stream, in order.
    pub fn stream_events(&self, s: &Stream) -> Vec<StreamEvent> {
        self.stream_ref(s).events.clone()
    }

    /// Everything this VM logged, in order.
    pub fn logs(&self) -> Vec<LogLine> {
        self.store.data().logs.clone()
    }

    /// The logs so far, leaving none behind.
    pub fn take_logs(&mut self) -> Vec<LogLine> {
        std::mem::take(&mut self.store.data_mut().logs)
    }

    /// The size of the VM's linear memory, in bytes: it only grows, so a
    /// filter that keeps something per stream shows here over many streams.
    pub fn memory_bytes(&mut self) -> usize {
        self.instance.get_memory(&mut self.store, "memory").map_or(0, |m| m.data_size(&self.store))
    }

    /// Wasm fuel (about one unit per instruction) burnt by this VM so far,
    /// start-up included.
    pub fn fuel_consumed(&self) -> u64 {
        FUEL_BUDGET - self.store.get_fuel().unwrap_or(FUEL_BUDGET)
    }

    /// From now on, notes every hostcall the filter makes.
    pub fn trace_hostcalls(&mut self) {
        self.store.data_mut().trace = Some(Default::default());
        self.trace_mark = self.store.get_fuel().unwrap_or(0);
    }

    /// The hostcalls made since the last look, each with the fuel burnt
    /// since the previous one (or since tracing began).
    pub fn take_hostcalls(&mut self) -> Vec<(&'static str, u64)> {
        let left = self.store.get_fuel().unwrap_or(0);
        let Some(trace) = self.store.data().trace.as_ref() else { return Vec::new() };
        let calls = std::mem::take(&mut *trace.borrow_mut());
        let mut out = Vec::new();
        let mut before = self.trace_mark;
        for (name, fuel) in calls {
            out.push((name, before - fuel));
            before = fuel;
        }
        out.push(("(end)", before - left));
        self.trace_mark = left;
        out
    }

    /// Why the VM trapped, if it did.
    pub fn trapped(&self) -> Option<String> {
        self.trapped.clone()
    }

    /// The period the filter asked for with `proxy_set_tick_period_milliseconds`.
    pub fn tick_period(&self) -> Option<Duration> {
        self.store.data().tick_period
    }

    /// Fires the root context's timer once: `proxy_on_tick(root_id)`.
    pub fn tick(&mut self) {
        let _ = self.call::<(u32,), ()>(ROOT_CONTEXT_ID, "proxy_on_tick", (ROOT_CONTEXT_ID,));
    }
}

fn pairs(list: &[(&str, &str)]) -> Pairs {
    list.iter().map(|(name, value)| (stream::lower(name.as_bytes()), value.as_bytes().to_vec())).collect()
}

fn strings(pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(name, value)| (String::from_utf8_lossy(name).into_owned(), String::from_utf8_lossy(value).into_owned()))
        .collect()
}
