//! Loading the filter, driving whole calls through it, and reading back what a
//! user would see: stat names, JSON log lines, the filter-state status.

use grpc_guard_tests::host::{Action, Host, LogLevel, Stream, Vm};
use serde_json::Value;

/// A well-formed method path and its labels.
pub const PATH: &str = "/pkg.Svc/Get";
pub const SERVICE: &str = "pkg.Svc";
pub const METHOD: &str = "Get";

/// The filter-state key an Envoy access log prints.
pub const STATUS_PROPERTY: &[&str] = &["grpc_guard.grpc_code"];

/// A fresh host (its own metrics and shared data, like a fresh Envoy). The
/// module is compiled once per test process and reused.
/// A host whose upstream has answered `pkg.Svc/Get` before: the method the
/// tests call has its labels from the first call. (How a method earns them
/// is tested in `metrics.rs`, from a host that has answered nothing.)
pub fn host() -> Host {
    let host = fresh_host();
    host.answered_before(&["pkg.Svc/Get", "pkg.Orders/Create", "pkg.Svc/Watch"]);
    host
}

/// A host whose upstreams have answered nothing yet.
pub fn fresh_host() -> Host {
    let wasm = grpc_guard_tests::e2e::wasm_path();
    Host::load(&wasm).unwrap_or_else(|e| panic!("{e}"))
}

/// One worker configured with `config`, logging every call unless `config`
/// says otherwise (the default logs a sample of OK calls, and these tests
/// read the line of each); panics with the filter's logs if it refuses.
pub fn start(host: &Host, config: &str) -> Vm {
    start_exact(host, &logging_every_call(config))
}

/// One worker configured with exactly `config`.
pub fn start_exact(host: &Host, config: &str) -> Vm {
    host.start_vm(config).unwrap_or_else(|e| panic!("{e}"))
}

/// `config` with `log.ok_sample` 1 when it is a JSON object that sets none.
fn logging_every_call(config: &str) -> String {
    let Ok(serde_json::Value::Object(mut object)) = serde_json::from_str(config) else {
        return config.to_owned();
    };
    let log = object.entry("log").or_insert_with(|| serde_json::json!({}));
    if let Some(log) = log.as_object_mut() {
        log.entry("ok_sample").or_insert(1.into());
    }
    serde_json::Value::Object(object).to_string()
}

/// A host and one worker with `config` (every call logged).
pub fn vm_with(config: &str) -> (Host, Vm) {
    let host = host();
    let vm = start(&host, config);
    (host, vm)
}

/// A host and one worker with exactly `config`.
pub fn vm_exact(config: &str) -> (Host, Vm) {
    let host = host();
    let vm = start_exact(&host, config);
    (host, vm)
}

/// The headers of a gRPC request to `path`, plus `extra`.
pub fn grpc_headers<'a>(path: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut headers = vec![
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "svc.local"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ];
    headers.extend_from_slice(extra);
    headers
}

/// gRPC PROTOCOL-HTTP2 `Length-Prefixed-Message`, uncompressed.
pub fn frame(message: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// One frame per size, each message filled with a byte that is not a valid
/// flag, so a reader that loses its place notices.
pub fn frames(sizes: &[usize]) -> Vec<u8> {
    sizes.iter().flat_map(|&n| frame(&vec![b'G'; n])).collect()
}

/// Asserts a callback let the stream continue, showing the trap if any.
#[track_caller]
pub fn cont(vm: &Vm, action: Action) {
    assert_eq!(action, Action::Continue, "trap: {:?}", vm.trapped());
}

/// A new stream as Envoy sees most: the answer comes from the upstream
/// (`response.code_details: via_upstream`) over an upstream connection.
pub fn upstream_stream(vm: &mut Vm) -> Stream {
    let stream = vm.new_stream();
    vm.set_property(&stream, &["response", "code_details"], b"via_upstream");
    vm.set_property(&stream, &["upstream", "local_address"], b"127.0.0.1:40000");
    stream
}

/// Opens a stream and sends gRPC request headers for `path` (not end of stream).
pub fn open(vm: &mut Vm, path: &str, extra: &[(&str, &str)]) -> Stream {
    let stream = upstream_stream(vm);
    let action = vm.request_headers(&stream, &grpc_headers(path, extra), false);
    cont(vm, action);
    stream
}

/// The request body in one chunk, ending the request.
pub fn send(vm: &mut Vm, s: &Stream, body: &[u8]) {
    let action = vm.request_body(s, body, true);
    cont(vm, action);
}

/// Response headers of a normal (not trailers-only) gRPC response.
pub fn respond_headers(vm: &mut Vm, s: &Stream) {
    let action = vm.response_headers(s, &[(":status", "200"), ("content-type", "application/grpc")], false);
    cont(vm, action);
}

/// Trailers with `grpc-status: code`.
pub fn respond_trailers(vm: &mut Vm, s: &Stream, code: u32) {
    let code = code.to_string();
    let action = vm.response_trailers(s, &[("grpc-status", code.as_str()), ("grpc-message", "")]);
    cont(vm, action);
}

/// A whole unary call: one request message of `req` bytes, one response
/// message of `resp` bytes, trailers with `code`, end of stream.
pub fn unary(vm: &mut Vm, path: &str, extra: &[(&str, &str)], req: usize, resp: usize, code: u32) {
    let s = open(vm, path, extra);
    send(vm, &s, &frames(&[req]));
    respond_headers(vm, &s);
    let action = vm.response_body(&s, &frames(&[resp]), false);
    cont(vm, action);
    respond_trailers(vm, &s, code);
    vm.finish(s);
    assert_eq!(vm.trapped(), None);
}

/// The JSON call lines logged so far (taken: the next call sees only new ones).
pub fn call_logs(vm: &mut Vm) -> Vec<Value> {
    vm.take_logs()
        .into_iter()
        .filter(|line| line.level == LogLevel::Info)
        .map(|line| {
            assert!(!line.message.contains('\n'), "a call log must be one line: {:?}", line.message);
            serde_json::from_str(&line.message)
                .unwrap_or_else(|e| panic!("call log is not JSON ({e}): {:?}", line.message))
        })
        .collect()
}

/// The single call line logged since the last look.
#[track_caller]
pub fn one_call_log(vm: &mut Vm) -> Value {
    let mut logs = call_logs(vm);
    assert_eq!(logs.len(), 1, "expected one call log line, got {logs:#?}");
    logs.remove(0)
}

/// The labels of one method, as the stat name carries them.
#[derive(Clone, Copy)]
pub struct Labels<'a> {
    pub service: &'a str,
    pub method: &'a str,
    pub grpc_type: &'a str,
}

pub const GET: Labels<'static> = Labels { service: SERVICE, method: METHOD, grpc_type: "unary" };
pub const OTHER: Labels<'static> = Labels { service: "other", method: "other", grpc_type: "unary" };

/// `family.grpc_service=.=…;.;grpc_method=.=…;.;grpc_type=.=…;.;`, then
/// `grpc_code=.=…;.;` when `code` is given, then `exporter=.=grpc-guard;.;`:
/// the stat name, in Istio's encoding, that Envoy's `stats_tags` split into
/// labels.
pub fn stat(family: &str, labels: Labels<'_>, code: Option<&str>) -> String {
    let mut name = format!(
        "{family}.grpc_service=.={};.;grpc_method=.={};.;grpc_type=.={};.;",
        labels.service, labels.method, labels.grpc_type
    );
    if let Some(code) = code {
        name.push_str(&format!("grpc_code=.={code};.;"));
    }
    name.push_str("exporter=.=grpc-guard;.;");
    name
}

pub fn handled(labels: Labels<'_>, code: &str) -> String {
    stat("grpc_server_handled_total", labels, Some(code))
}

/// The value of the label `label` in a stat name, if it carries it: what
/// Istio's regex `(label=\.=(.*?);\.;)` finds.
pub fn label<'a>(stat_name: &'a str, label: &str) -> Option<&'a str> {
    let start = stat_name.find(&format!("{label}=.="))? + label.len() + 3;
    let rest = stat_name.get(start..)?;
    rest.get(..rest.find(";.;")?)
}
