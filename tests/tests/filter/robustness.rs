//! Odd traffic never traps the VM (a trap would fail every stream on that
//! worker) and still gets an honest status.

use grpc_guard_tests::host::Vm;

use crate::support::*;

#[track_caller]
fn no_trap(vm: &Vm) {
    assert_eq!(vm.trapped(), None);
}

#[test]
fn empty_request_headers_pass_through() {
    let (host, mut vm) = vm_with("{}");
    let s = vm.new_stream();
    let action = vm.request_headers(&s, &[], true);
    cont(&vm, action);
    let action = vm.response_headers(&s, &[], true);
    cont(&vm, action);
    vm.finish(s);
    no_trap(&vm);
    assert!(host.metrics().names().is_empty());
}

#[test]
fn grpc_request_without_a_path_is_counted_as_other() {
    let (host, mut vm) = vm_with("{}");
    let s = vm.new_stream();
    let action = vm.request_headers(&s, &[("content-type", "application/grpc")], false);
    cont(&vm, action);
    send(&mut vm, &s, &frames(&[1]));
    respond_headers(&mut vm, &s);
    respond_trailers(&mut vm, &s, 0);
    vm.finish(s);
    no_trap(&vm);
    assert_eq!(host.metrics().counter(&handled(OTHER, "OK")), Some(1));
    let log = one_call_log(&mut vm);
    assert_eq!((log["service"].as_str(), log["method"].as_str()), (Some(""), Some("")));
}

#[test]
fn unusual_header_values_do_not_trap() {
    // The host takes header values as `&str`, so these are the strangest
    // bytes it can hand over: control characters, non-ASCII, a NUL.
    let (host, mut vm) = vm_with("{}");
    let s = vm.new_stream();
    let headers = [
        (":path", "/pkg.Svc/Gét\u{0}"),
        ("content-type", "application/grpc"),
        ("x-request-id", "\u{feff}\u{fffd}\u{7f}\u{1}ÿ"),
    ];
    let action = vm.request_headers(&s, &headers, false);
    cont(&vm, action);
    let action = vm.response_headers(&s, &[(":status", "2ÿ0"), ("grpc-status", "１４")], false);
    cont(&vm, action);
    let action = vm.response_trailers(&s, &[("grpc-status", "\u{0}0")]);
    cont(&vm, action);
    vm.finish(s);
    no_trap(&vm);
    let handled_calls = host.metrics().names().iter().filter(|n| n.starts_with("grpc_server_handled_total.")).count();
    assert_eq!(handled_calls, 1, "the call is still counted, under `other`: {:#?}", host.metrics().names());
    let log = one_call_log(&mut vm);
    assert_eq!(log["http_status"], 0, "an unparsable :status is no HTTP status");
    assert_eq!(log["request_id"], "\u{feff}\u{fffd}\u{7f}\u{1}ÿ");
}

#[test]
fn grpc_status_that_is_not_a_number_counts_as_missing() {
    let (host, mut vm) = vm_with("{}");
    let s = open(&mut vm, PATH, &[]);
    send(&mut vm, &s, &frames(&[1]));
    respond_headers(&mut vm, &s);
    let action = vm.response_trailers(&s, &[("grpc-status", "abc")]);
    cont(&vm, action);
    vm.finish(s);
    no_trap(&vm);
    let log = one_call_log(&mut vm);
    assert_eq!((log["grpc_code"].as_str(), log["status_source"].as_str()), (Some("Internal"), Some("missing")));
    assert_eq!(host.metrics().counter(&handled(GET, "Internal")), Some(1));
}

#[test]
fn out_of_range_grpc_status_is_unknown() {
    let (host, mut vm) = vm_with("{}");
    unary(&mut vm, PATH, &[], 1, 1, 99);
    assert_eq!(one_call_log(&mut vm)["grpc_code"], "Unknown");
    assert_eq!(host.metrics().counter(&handled(GET, "Unknown")), Some(1));
}

#[test]
fn huge_frame_length_is_skipped_without_buffering_or_trapping() {
    let (host, mut vm) = vm_with("{}");
    let s = open(&mut vm, PATH, &[]);
    let action = vm.request_body(&s, &[0, 0xff, 0xff, 0xff, 0xff, 1, 2, 3], false);
    cont(&vm, action);
    let action = vm.request_body(&s, &[4; 4096], false);
    cont(&vm, action);
    vm.set_property(&s, &["response", "code_details"], b"http2.remote_reset");
    vm.finish(s);
    no_trap(&vm);
    let log = one_call_log(&mut vm);
    // The 4 GiB message never arrived whole: it is not counted.
    assert_eq!((log["req_msgs"].as_u64(), log["req_bytes"].as_u64()), (Some(0), Some(0)));
    assert_eq!(log["grpc_code"], "Canceled");
    assert_eq!(host.metrics().histogram(&stat("grpc_server_request_bytes", GET, None)), None);
}

#[test]
fn response_body_before_response_headers_does_not_trap() {
    let (host, mut vm) = vm_with("{}");
    let s = open(&mut vm, PATH, &[]);
    let action = vm.response_body(&s, &frames(&[3]), false);
    cont(&vm, action);
    let action = vm.response_body(&s, b"GGGGGGGG", true);
    cont(&vm, action);
    vm.finish(s);
    no_trap(&vm);
    assert_eq!(one_call_log(&mut vm)["resp_msgs"], 1, "counting stops at the first bad frame");
    assert_eq!(host.metrics().names().iter().filter(|n| n.starts_with("grpc_server_handled_total.")).count(), 1);
}

#[test]
fn callbacks_after_the_call_ended_do_not_trap() {
    let (_host, mut vm) = vm_with("{}");
    let s = open(&mut vm, PATH, &[]);
    respond_headers(&mut vm, &s);
    respond_trailers(&mut vm, &s, 0);
    let action = vm.response_body(&s, &frames(&[1]), true);
    cont(&vm, action);
    let action = vm.request_body(&s, &frames(&[1]), true);
    cont(&vm, action);
    let action = vm.request_trailers(&s, &[("x", "y")]);
    cont(&vm, action);
    vm.finish(s);
    no_trap(&vm);
}
