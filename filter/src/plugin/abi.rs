//! The proxy-wasm ABI (0.2.1), as much of it as grpc-guard uses: the host's
//! functions it imports, wrapped so that no host status can trap the VM.
//!
//! Written here rather than taken from the proxy-wasm Rust SDK because the
//! SDK exports every callback of the ABI, and Envoy enters the VM for each
//! one a module exports (`proxy_on_done` on every stream, for one); its
//! dispatcher finds each context in a SipHash map; it keeps a map entry per
//! gRPC callout until an answer Envoy never sends for a cancelled one; and
//! its wrappers panic on statuses they do not expect. The exports are in
//! [`super`]; they name only the callbacks grpc-guard needs.

#![allow(unsafe_code)]

use std::time::Duration;

/// A host status other than `Ok` (proxy-wasm's `WasmResult`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Status(pub u32);

impl Status {
    const OK: u32 = 0;
    pub const NOT_FOUND: Status = Status(1);
    pub const CAS_MISMATCH: Status = Status(8);
}

/// Shown by its name in the ABI, as messages name it.
impl std::fmt::Debug for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const NAMES: [&str; 13] = [
            "Ok",
            "NotFound",
            "BadArgument",
            "SerializationFailure",
            "ParseFailure",
            "BadExpression",
            "InvalidMemoryAccess",
            "Empty",
            "CasMismatch",
            "ResultMismatch",
            "InternalFailure",
            "BrokenConnection",
            "Unimplemented",
        ];
        match usize::try_from(self.0).ok().and_then(|i| NAMES.get(i)) {
            Some(name) => f.write_str(name),
            None => write!(f, "status {}", self.0),
        }
    }
}

fn check(status: u32) -> Result<(), Status> {
    if status == Status::OK {
        Ok(())
    } else {
        Err(Status(status))
    }
}

/// Header maps (`proxy_get_header_map_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum MapType {
    RequestHeaders = 0,
    ResponseHeaders = 2,
    ResponseTrailers = 3,
}

/// Buffers (`proxy_get_buffer_bytes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum BufferType {
    HttpRequestBody = 0,
    HttpResponseBody = 1,
    GrpcReceiveBuffer = 5,
    PluginConfiguration = 7,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum MetricType {
    Counter = 0,
    Histogram = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum LogLevel {
    Info = 2,
    Error = 4,
    Critical = 5,
}

/// What a stream callback returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Action {
    Continue = 0,
    Pause = 1,
}

/// `proxy_continue_stream`'s stream types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum StreamType {
    HttpRequest = 0,
    HttpResponse = 1,
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message: *const u8, size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_buffer_bytes(kind: u32, start: usize, max: usize, data: *mut *mut u8, size: *mut usize) -> u32;
    fn proxy_set_buffer_bytes(kind: u32, start: usize, size: usize, data: *const u8, data_size: usize) -> u32;
    fn proxy_get_header_map_pairs(map: u32, data: *mut *mut u8, size: *mut usize) -> u32;
    fn proxy_get_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        value: *mut *mut u8,
        value_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_add_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map: u32, key: *const u8, key_size: usize) -> u32;
    fn proxy_get_property(path: *const u8, path_size: usize, value: *mut *mut u8, value_size: *mut usize) -> u32;
    fn proxy_set_property(path: *const u8, path_size: usize, value: *const u8, value_size: usize) -> u32;
    fn proxy_get_shared_data(
        key: *const u8,
        key_size: usize,
        value: *mut *mut u8,
        value_size: *mut usize,
        cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(key: *const u8, key_size: usize, value: *const u8, value_size: usize, cas: u32) -> u32;
    fn proxy_continue_stream(stream: u32) -> u32;
    fn proxy_set_effective_context(id: u32) -> u32;
    #[allow(clippy::too_many_arguments)]
    fn proxy_send_local_response(
        status_code: u32,
        details: *const u8,
        details_size: usize,
        body: *const u8,
        body_size: usize,
        headers: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    #[allow(clippy::too_many_arguments)]
    fn proxy_grpc_call(
        upstream: *const u8,
        upstream_size: usize,
        service: *const u8,
        service_size: usize,
        method: *const u8,
        method_size: usize,
        metadata: *const u8,
        metadata_size: usize,
        message: *const u8,
        message_size: usize,
        timeout_ms: u32,
        token: *mut u32,
    ) -> u32;
    fn proxy_get_status(code: *mut u32, message: *mut *mut u8, message_size: *mut usize) -> u32;
    fn proxy_define_metric(kind: u32, name: *const u8, name_size: usize, id: *mut u32) -> u32;
    fn proxy_increment_metric(id: u32, offset: i64) -> u32;
    fn proxy_record_metric(id: u32, value: u64) -> u32;
}

/// Takes back the bytes a host call returned: the host allocated them
/// through [`super::proxy_on_memory_allocate`] (a `Vec<u8>` of exactly that
/// capacity, leaked), so they are owned here, exactly once.
fn returned(status: u32, data: *mut u8, size: usize) -> Option<Vec<u8>> {
    if status != Status::OK || data.is_null() {
        return None;
    }
    // SAFETY: see above; a null pointer (no value) was handled.
    Some(unsafe { Vec::from_raw_parts(data, size, size) })
}

pub fn log(level: LogLevel, message: &str) {
    // SAFETY: the host reads `message` for the call's length only.
    unsafe { proxy_log(level as u32, message.as_ptr(), message.len()) };
}

/// Wall-clock time, nanoseconds since the Unix epoch (0 if the host has none).
pub fn now_ns() -> u64 {
    let mut t = 0;
    // SAFETY: the host writes one u64 to `t`.
    match unsafe { proxy_get_current_time_nanoseconds(&mut t) } {
        Status::OK => t,
        _ => 0,
    }
}

pub fn set_tick_period(period: Duration) {
    let ms = u32::try_from(period.as_millis()).unwrap_or(u32::MAX);
    // SAFETY: no memory is passed.
    unsafe { proxy_set_tick_period_milliseconds(ms) };
}

pub fn get_buffer(kind: BufferType, start: usize, max: usize) -> Option<Vec<u8>> {
    let (mut data, mut size) = (std::ptr::null_mut(), 0);
    // SAFETY: the host writes a pointer and a size; see `returned`.
    let status = unsafe { proxy_get_buffer_bytes(kind as u32, start, max, &mut data, &mut size) };
    returned(status, data, size)
}

pub fn set_buffer(kind: BufferType, start: usize, size: usize, value: &[u8]) {
    // SAFETY: the host reads `value` for the call's length only.
    unsafe { proxy_set_buffer_bytes(kind as u32, start, size, value.as_ptr(), value.len()) };
}

/// A whole header map in its serialized form; empty where the host has none.
pub fn header_map(map: MapType) -> Vec<u8> {
    let (mut data, mut size) = (std::ptr::null_mut(), 0);
    // SAFETY: as `get_buffer`.
    let status = unsafe { proxy_get_header_map_pairs(map as u32, &mut data, &mut size) };
    returned(status, data, size).unwrap_or_default()
}

/// The first value of header `name`; an empty value is `Some` (the host
/// hands over no memory for it).
pub fn header_value(map: MapType, name: &str) -> Option<Vec<u8>> {
    let (mut data, mut size) = (std::ptr::null_mut(), 0);
    // SAFETY: as `get_buffer`; `name` is read for the call only.
    let status = unsafe { proxy_get_header_map_value(map as u32, name.as_ptr(), name.len(), &mut data, &mut size) };
    match returned(status, data, size) {
        None if status == Status::OK => Some(Vec::new()),
        value => value,
    }
}

pub fn set_header(map: MapType, name: &str, value: &[u8]) {
    // SAFETY: the host reads both for the call only.
    unsafe { proxy_replace_header_map_value(map as u32, name.as_ptr(), name.len(), value.as_ptr(), value.len()) };
}

pub fn add_header(map: MapType, name: &str, value: &[u8]) {
    // SAFETY: as `set_header`.
    unsafe { proxy_add_header_map_value(map as u32, name.as_ptr(), name.len(), value.as_ptr(), value.len()) };
}

pub fn remove_header(map: MapType, name: &str) {
    // SAFETY: as `set_header`.
    unsafe { proxy_remove_header_map_value(map as u32, name.as_ptr(), name.len()) };
}

/// A property path as the host takes it: its parts joined by NUL.
fn property_path(path: &[&str]) -> Vec<u8> {
    path.join("\0").into_bytes()
}

pub fn get_property(path: &[&str]) -> Option<Vec<u8>> {
    let path = property_path(path);
    let (mut data, mut size) = (std::ptr::null_mut(), 0);
    // SAFETY: as `get_buffer`.
    let status = unsafe { proxy_get_property(path.as_ptr(), path.len(), &mut data, &mut size) };
    returned(status, data, size)
}

/// Writes a filter-state value; `path` is one part, so no joining.
pub fn set_property(path: &str, value: &[u8]) {
    // SAFETY: as `set_header`.
    unsafe { proxy_set_property(path.as_ptr(), path.len(), value.as_ptr(), value.len()) };
}

/// A shared-data value and its compare-and-swap token.
pub fn get_shared_data(key: &str) -> (Option<Vec<u8>>, Option<u32>) {
    let (mut data, mut size, mut cas) = (std::ptr::null_mut(), 0, 0);
    // SAFETY: as `get_buffer`, and one u32 for `cas`.
    let status = unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) };
    match status {
        Status::OK => (returned(status, data, size), Some(cas)),
        _ => (None, None),
    }
}

pub fn set_shared_data(key: &str, value: &[u8], cas: Option<u32>) -> Result<(), Status> {
    // SAFETY: as `set_header`.
    check(unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas.unwrap_or(0)) })
}

/// Makes context `id` the one host calls act on, in a callback Envoy made on
/// another (a callout's answer comes to the root context that sent it).
pub fn set_effective_context(id: u32) -> Result<(), Status> {
    // SAFETY: no memory is passed.
    check(unsafe { proxy_set_effective_context(id) })
}

pub fn resume(stream: StreamType) {
    // SAFETY: no memory is passed.
    unsafe { proxy_continue_stream(stream as u32) };
}

/// Answers the stream from the proxy: `grpc_status` -1 for a plain HTTP
/// answer with exactly `headers` (serialized pairs), else a gRPC status
/// whose message Envoy writes (and encodes) as `grpc-message`.
pub fn send_local_response(code: u32, body: &[u8], headers: &[u8], grpc_status: i32) {
    // SAFETY: the host reads each slice for the call only.
    unsafe {
        proxy_send_local_response(
            code,
            std::ptr::null(),
            0,
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            grpc_status,
        )
    };
}

/// A unary gRPC callout to `upstream` (a serialized `GrpcService`); its
/// answer comes to the calling context's `proxy_on_grpc_receive` or
/// `proxy_on_grpc_close` with the token returned.
pub fn grpc_call(
    upstream: &[u8],
    service: &str,
    method: &str,
    message: &[u8],
    timeout: Duration,
) -> Result<u32, Status> {
    let mut token = 0;
    let metadata = crate::headers::HeaderBlock::serialize([]);
    let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
    // SAFETY: the host reads each slice for the call only and writes the token.
    check(unsafe {
        proxy_grpc_call(
            upstream.as_ptr(),
            upstream.len(),
            service.as_ptr(),
            service.len(),
            method.as_ptr(),
            method.len(),
            metadata.as_ptr(),
            metadata.len(),
            message.as_ptr(),
            message.len(),
            timeout_ms,
            &mut token,
        )
    })?;
    Ok(token)
}

/// The message of the failed callout being reported (`proxy_on_grpc_close`).
pub fn status_message() -> Vec<u8> {
    let (mut code, mut data, mut size) = (0, std::ptr::null_mut(), 0);
    // SAFETY: as `get_buffer`, and one u32 for the code.
    let status = unsafe { proxy_get_status(&mut code, &mut data, &mut size) };
    returned(status, data, size).unwrap_or_default()
}

pub fn define_metric(kind: MetricType, name: &str) -> Option<u32> {
    let mut id = 0;
    // SAFETY: the host reads `name` for the call only and writes the id.
    match unsafe { proxy_define_metric(kind as u32, name.as_ptr(), name.len(), &mut id) } {
        Status::OK => Some(id),
        _ => None,
    }
}

pub fn increment_metric(id: u32, by: i64) {
    // SAFETY: no memory is passed.
    unsafe { proxy_increment_metric(id, by) };
}

pub fn record_metric(id: u32, value: u64) {
    // SAFETY: no memory is passed.
    unsafe { proxy_record_metric(id, value) };
}
