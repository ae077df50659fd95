//! Traffic that is not gRPC passes through untouched and unmeasured; a
//! request on a gRPC method path is a gRPC call whatever its content type.

use grpc_guard_tests::host::Action;

use crate::support::*;

#[test]
fn non_grpc_requests_pass_untouched_without_metrics_or_logs() {
    let (host, mut vm) = vm_with("{}");
    let content_types = [
        Some("text/plain"),
        Some("application/json"),
        Some("application/grpc-web"),
        Some("application/grpc-web+proto"),
        Some("application/grpc-web-text"),
        None,
    ];
    for content_type in content_types {
        let s = vm.new_stream();
        let mut headers = vec![(":method", "POST"), (":path", "/api/v1/orders"), (":authority", "svc.local")];
        if let Some(ct) = content_type {
            headers.push(("content-type", ct));
        }
        let body = b"\x00\x00\x00\x00\x02hiGGGG not frames";
        assert_eq!(vm.request_headers(&s, &headers, false), Action::Continue, "{content_type:?}");
        assert_eq!(vm.request_body(&s, body, true), Action::Continue, "{content_type:?}");
        assert_eq!(vm.request_body_now(&s), body, "{content_type:?}: the body is not touched");
        let response_headers = [(":status", "503"), ("content-type", "text/plain")];
        assert_eq!(vm.response_headers(&s, &response_headers, false), Action::Continue);
        assert_eq!(vm.response_body(&s, b"GGGGG", false), Action::Continue);
        assert_eq!(vm.response_trailers(&s, &[("grpc-status", "14")]), Action::Continue);
        assert_eq!(vm.local_reply(&s), None);
        assert_eq!(vm.stream_property(&s, STATUS_PROPERTY), None);
        vm.finish(s);
        assert_eq!(vm.trapped(), None);
    }
    assert_eq!(host.metrics().names(), Vec::<String>::new(), "no metric for non-gRPC traffic");
    assert!(vm.logs().is_empty(), "no log line for non-gRPC traffic: {:#?}", vm.logs());
}

#[test]
fn plain_http_get_without_body_passes_through() {
    let (host, mut vm) = vm_with("{}");
    let s = vm.new_stream();
    let action = vm.request_headers(
        &s,
        &[(":method", "GET"), (":path", "/"), (":authority", "example"), ("content-type", "text/plain")],
        true,
    );
    cont(&vm, action);
    let action = vm.response_headers(&s, &[(":status", "200"), ("content-type", "text/plain")], true);
    cont(&vm, action);
    vm.finish(s);
    assert_eq!(vm.trapped(), None);
    assert!(host.metrics().names().is_empty());
}

#[test]
fn a_request_on_a_grpc_method_path_with_another_content_type_is_refused_with_415() {
    let (host, mut vm) = vm_with("{}");
    for content_type in
        [Some("application/x-grpc-disguised"), Some("application/grpc-web+proto"), Some("text/plain"), None]
    {
        let s = vm.new_stream();
        let mut headers = vec![(":method", "POST"), (":path", "/pkg.Svc/Get?via=query"), (":authority", "svc.local")];
        if let Some(ct) = content_type {
            headers.push(("content-type", ct));
        }
        assert_eq!(vm.request_headers(&s, &headers, false), Action::Pause, "{content_type:?}");
        let reply = vm.local_reply(&s).expect("refused by the proxy");
        assert_eq!(reply.http_status, 415, "{content_type:?}");
        let message = String::from_utf8_lossy(&reply.body).into_owned();
        assert!(message.contains("/pkg.Svc/Get is a gRPC method"), "{message}");
        vm.finish(s);
        assert_eq!(vm.trapped(), None);
    }
    assert_eq!(host.metrics().counter("grpc_guard_non_grpc_refused_total"), Some(4));
    assert_eq!(call_logs(&mut vm).len(), 4, "each refusal is logged as a call");
}

#[test]
fn with_non_grpc_pass_a_method_path_with_another_content_type_passes_untouched() {
    let (host, mut vm) = vm_with(r#"{"non_grpc":"pass"}"#);
    let s = vm.new_stream();
    let headers = [
        (":method", "POST"),
        (":path", "/pkg.Svc/Get"),
        (":authority", "svc.local"),
        ("content-type", "application/json"),
    ];
    assert_eq!(vm.request_headers(&s, &headers, false), Action::Continue);
    vm.finish(s);
    assert!(host.metrics().names().is_empty());
}
