//! The host's hostcall answers, pinned with a hand-written proxy-wasm module
//! so they do not depend on how an SDK happens to call them.

use grpc_guard_tests::host::{Action, Host, LogLevel, LogLine};

/// A filter in WAT. Request headers: looks up `x-probe`, logs its value, and
/// adds `x-status: <status digit>`. Request body: reads bytes 2..5 of the
/// chunk and logs the status digit, then the bytes. Response headers: calls
/// `proxy_http_call`, which this host does not implement.
const PROBE: &str = r#"
(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value"
    (func $get_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value"
    (func $add_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes"
    (func $get_buffer (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_http_call"
    (func $http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 4096))
  (data (i32.const 0) "x-status")
  (data (i32.const 16) "X-Probe")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $size)))
    (local.get $ptr))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func $log_status (param $status i32)
    (i32.store8 (i32.const 200) (i32.add (local.get $status) (i32.const 48)))
    (drop (call $log (i32.const 2) (i32.const 200) (i32.const 1))))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (local $status i32)
    (local.set $status
      (call $get_header (i32.const 0) (i32.const 16) (i32.const 7) (i32.const 100) (i32.const 104)))
    (if (i32.eqz (local.get $status))
      (then (drop (call $log (i32.const 2) (i32.load (i32.const 100)) (i32.load (i32.const 104))))))
    (i32.store8 (i32.const 200) (i32.add (local.get $status) (i32.const 48)))
    (drop (call $add_header (i32.const 0) (i32.const 0) (i32.const 8) (i32.const 200) (i32.const 1)))
    (i32.const 0))
  (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32)
    (local $status i32)
    (i32.store (i32.const 100) (i32.const 0))
    (local.set $status
      (call $get_buffer (i32.const 0) (i32.const 2) (i32.const 3) (i32.const 100) (i32.const 104)))
    (call $log_status (local.get $status))
    (if (i32.load (i32.const 100))
      (then (drop (call $log (i32.const 2) (i32.load (i32.const 100)) (i32.load (i32.const 104))))))
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (drop (call $http_call (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
      (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)))
    (i32.const 0))
)
"#;

fn probe_host() -> Host {
    let wasm = wat::parse_str(PROBE).expect("the probe module is valid WAT");
    Host::from_bytes(&wasm).expect("the probe module loads")
}

fn messages(logs: Vec<LogLine>) -> Vec<String> {
    logs.into_iter().inspect(|line| assert_eq!(line.level, LogLevel::Info)).map(|line| line.message).collect()
}

fn header(name: &str, value: &str) -> (String, String) {
    (name.to_owned(), value.to_owned())
}

#[test]
fn header_lookup_is_case_insensitive_and_not_found_when_missing() {
    let host = probe_host();
    let mut vm = host.start_vm("{}").unwrap();

    let present = vm.new_stream();
    vm.request_headers(&present, &[("x-probe", "hello")], true);
    assert_eq!(messages(vm.take_logs()), ["hello"]);
    assert_eq!(vm.request_headers_now(&present), [header("x-probe", "hello"), header("x-status", "0")]);

    let missing = vm.new_stream();
    vm.request_headers(&missing, &[("other", "1")], true);
    assert!(vm.take_logs().is_empty());
    // Status 1 is NotFound.
    assert_eq!(vm.request_headers_now(&missing), [header("other", "1"), header("x-status", "1")]);
}

#[test]
fn body_reads_are_clamped_to_the_current_chunk() {
    let host = probe_host();
    let mut vm = host.start_vm("{}").unwrap();
    let stream = vm.new_stream();
    vm.request_headers(&stream, &[], false);

    assert_eq!(vm.request_body(&stream, b"hello world", false), Action::Continue);
    assert_eq!(messages(vm.take_logs()), ["0", "llo"]);

    assert_eq!(vm.request_body(&stream, b"hey", false), Action::Continue);
    assert_eq!(messages(vm.take_logs()), ["0", "y"]);

    // Starting exactly at the end reads nothing: Ok with no pointer written.
    assert_eq!(vm.request_body(&stream, b"hi", true), Action::Continue);
    assert_eq!(messages(vm.take_logs()), ["0"]);
}

#[test]
fn an_unimplemented_hostcall_traps_and_poisons_the_vm() {
    let host = probe_host();
    let mut vm = host.start_vm("{}").unwrap();
    let stream = vm.new_stream();
    assert_eq!(vm.request_headers(&stream, &[], true), Action::Continue);
    assert_eq!(vm.response_headers(&stream, &[(":status", "200")], true), Action::Trapped);
    let why = vm.trapped().expect("the VM records why it trapped");
    assert!(why.contains("proxy_http_call"), "{why}");

    let next = vm.new_stream();
    assert_eq!(vm.request_headers(&next, &[], true), Action::Trapped);
}

#[test]
fn fuel_is_counted_and_the_same_for_the_same_calls() {
    let host = probe_host();
    let run = || {
        let mut vm = host.start_vm("{}").unwrap();
        let before = vm.fuel_consumed();
        let stream = vm.new_stream();
        vm.request_headers(&stream, &[("x-probe", "v")], false);
        vm.request_body(&stream, b"body", true);
        vm.finish(stream);
        vm.fuel_consumed() - before
    };
    let first = run();
    assert!(first > 0);
    assert_eq!(run(), first);
}
