//! The host runs the real filter: one plain-HTTP stream goes through
//! untouched and nothing traps.

use std::path::PathBuf;

use grpc_guard_tests::host::{Action, Host};

/// `GRPC_GUARD_WASM`, else the release build under `CARGO_TARGET_DIR`
/// (`target/` at the workspace root when unset).
fn filter_wasm() -> PathBuf {
    if let Some(path) = std::env::var_os("GRPC_GUARD_WASM") {
        return PathBuf::from(path);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("wasm32-wasip1/release/grpc_guard.wasm")
}

#[test]
fn a_plain_http_stream_passes_through_the_filter() {
    let wasm = filter_wasm();
    assert!(
        wasm.exists(),
        "no filter at {}: build it with `cargo build -p grpc-guard-filter --target wasm32-wasip1 \
         --release`, or point GRPC_GUARD_WASM at a built grpc_guard.wasm",
        wasm.display()
    );
    let host = Host::load(&wasm).unwrap_or_else(|e| panic!("{e}"));
    let mut vm = host.start_vm("{}").unwrap_or_else(|e| panic!("{e}"));
    let stream = vm.new_stream();

    let action = vm.request_headers(
        &stream,
        &[(":method", "GET"), (":path", "/"), (":authority", "example"), ("content-type", "text/plain")],
        true,
    );
    assert_eq!(action, Action::Continue, "trap: {:?}", vm.trapped());
    let action = vm.response_headers(&stream, &[(":status", "200"), ("content-type", "text/plain")], true);
    assert_eq!(action, Action::Continue, "trap: {:?}", vm.trapped());
    vm.finish(stream);
    assert_eq!(vm.trapped(), None);
}
