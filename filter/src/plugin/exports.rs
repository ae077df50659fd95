//! The module's exports: the callbacks Envoy enters the VM through, each
//! handed to its context (see `Contexts`). Only what grpc-guard
//! needs is exported: Envoy skips a callback a module does not define.
// `no_mangle` is what makes a function an export.
#![allow(unsafe_code)]

use super::abi::{self, LogLevel};
use super::{action, with_root, with_stream, Root, Stream, CALLOUTS, CONTEXTS};

#[cfg(target_os = "wasi")]
extern "C" {
    fn __wasm_call_ctors();
}

/// A WASI reactor's start: Envoy calls it once, before any other export.
#[no_mangle]
pub extern "C" fn _initialize() {
    #[cfg(target_os = "wasi")]
    // SAFETY: the module's static constructors, run once as WASI requires.
    unsafe {
        __wasm_call_ctors()
    };
    // A panic (none is expected: the core denies the constructs that make
    // them) says why in Envoy's log before the VM traps.
    std::panic::set_hook(Box::new(|info| abi::log(LogLevel::Critical, &info.to_string())));
}

#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

/// Memory the host writes a value into: a `Vec<u8>` of exactly `size`
/// bytes, leaked, and taken back by the host call that asked (see
/// `abi::returned`).
#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    let mut bytes = std::mem::ManuallyDrop::new(Vec::<u8>::with_capacity(size));
    bytes.as_mut_ptr()
}

#[no_mangle]
pub extern "C" fn proxy_on_vm_start(_root_id: u32, _vm_configuration_size: usize) -> u32 {
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(id: u32, root_id: u32) {
    CONTEXTS.with(|c| {
        let Ok(mut c) = c.try_borrow_mut() else { return };
        if root_id == 0 {
            c.roots.insert(id, Root { worker: None, lease: None });
            return;
        }
        // A stream of a root that refused its configuration is not a call.
        let Some(worker) = c.roots.get(&root_id).and_then(|r| r.worker.clone()) else { return };
        c.streams.insert(id, Box::new(Stream { worker, call: None, context_id: id, awaiting: None }));
    });
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(root_id: u32, _plugin_configuration_size: usize) -> u32 {
    u32::from(with_root(root_id, Root::on_configure).unwrap_or(false))
}

#[no_mangle]
pub extern "C" fn proxy_on_tick(root_id: u32) {
    with_root(root_id, Root::on_tick);
}

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(id: u32, _headers: usize, end_of_stream: u32) -> u32 {
    action(with_stream(id, |s| s.on_request_headers(end_of_stream != 0)))
}

#[no_mangle]
pub extern "C" fn proxy_on_request_body(id: u32, size: usize, end_of_stream: u32) -> u32 {
    action(with_stream(id, |s| s.on_request_body(size, end_of_stream != 0)))
}

#[no_mangle]
pub extern "C" fn proxy_on_request_trailers(id: u32, _trailers: usize) -> u32 {
    action(with_stream(id, Stream::on_request_trailers))
}

#[no_mangle]
pub extern "C" fn proxy_on_response_headers(id: u32, _headers: usize, end_of_stream: u32) -> u32 {
    action(with_stream(id, |s| s.on_response_headers(end_of_stream != 0)))
}

#[no_mangle]
pub extern "C" fn proxy_on_response_body(id: u32, size: usize, end_of_stream: u32) -> u32 {
    action(with_stream(id, |s| s.on_response_body(size, end_of_stream != 0)))
}

#[no_mangle]
pub extern "C" fn proxy_on_response_trailers(id: u32, _trailers: usize) -> u32 {
    action(with_stream(id, Stream::on_response_trailers))
}

/// The stream's end, however it ended: its record is written now and its
/// state goes. (A stream Envoy created only to log it, one refused before
/// this filter saw it, goes too: no `proxy_on_delete` follows for it.)
#[no_mangle]
pub extern "C" fn proxy_on_log(id: u32) {
    if let Some(mut stream) = take_stream(id) {
        stream.on_log();
    }
}

/// Envoy is done with a context: a stream, or a root whose plugin was
/// removed or replaced. A stream still here was not logged yet (HTTP/3 logs
/// after the stream is destroyed, once the client acknowledged the answer):
/// its call ends now, while Envoy still shows it; the log that comes later
/// finds nothing.
#[no_mangle]
pub extern "C" fn proxy_on_delete(id: u32) {
    if let Some(mut stream) = take_stream(id) {
        stream.on_log();
        return;
    }
    let root = CONTEXTS.with(|c| c.try_borrow_mut().ok()?.roots.remove(&id));
    if let Some(root) = root {
        root.on_delete();
    }
}

/// Removes stream `id` from the registry, and the callout it waits for.
fn take_stream(id: u32) -> Option<Box<Stream>> {
    let stream = CONTEXTS.with(|c| c.try_borrow_mut().ok()?.streams.remove(&id))?;
    if let Some((token, _)) = stream.awaiting {
        CALLOUTS.with(|c| c.borrow_mut().remove(&token));
    }
    Some(stream)
}

/// A callout's answer, to the context that sent it.
#[no_mangle]
pub extern "C" fn proxy_on_grpc_receive(id: u32, token: u32, size: usize) {
    grpc_answer(id, token, 0, size);
}

/// A callout failed (its status is not OK), to the context that sent it.
#[no_mangle]
pub extern "C" fn proxy_on_grpc_close(id: u32, token: u32, status: u32) {
    grpc_answer(id, token, status, 0);
}

/// A callout's end, to the stream that waits for it, else to the root
/// (`id`: Envoy sends and answers every callout on the root context).
fn grpc_answer(id: u32, token: u32, status: u32, size: usize) {
    let waiting = CALLOUTS.with(|c| c.try_borrow_mut().ok()?.remove(&token));
    match waiting {
        // Host calls act on the stream, not on the root Envoy called.
        Some(stream) if abi::set_effective_context(stream).is_ok() => {
            with_stream(stream, |s| s.on_grpc_call_response(token, status, size));
        }
        // The stream has gone: nobody waits for this answer.
        Some(_) => {}
        None => {
            with_root(id, |r| r.on_grpc_call_response(token, status, size));
        }
    }
}
