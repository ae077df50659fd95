//! Metric names and values: go-grpc-prometheus families, bounded method
//! labels shared by every worker, the allowlist, and the client side.

use std::collections::BTreeSet;

use grpc_guard_tests::host::Host;

use crate::support::*;

#[test]
fn unary_call_is_counted_under_go_grpc_prometheus_names() {
    let (host, mut vm) = vm_with("{}");
    unary(&mut vm, PATH, &[], 12, 34, 0);
    unary(&mut vm, PATH, &[], 56, 0, 0);

    let metrics = host.metrics();
    let expected: BTreeSet<String> = [
        stat("grpc_server_started_total", GET, None),
        handled(GET, "OK"),
        stat("grpc_server_msg_received_total", GET, None),
        stat("grpc_server_msg_sent_total", GET, None),
        stat("grpc_server_handling_milliseconds", GET, None),
        stat("grpc_server_request_bytes", GET, None),
        stat("grpc_server_response_bytes", GET, None),
    ]
    .into_iter()
    .collect();
    assert_eq!(metrics.names().into_iter().collect::<BTreeSet<_>>(), expected);
    assert_eq!(metrics.counter(&stat("grpc_server_started_total", GET, None)), Some(2));
    assert_eq!(metrics.counter(&handled(GET, "OK")), Some(2));
    assert_eq!(metrics.counter(&stat("grpc_server_msg_received_total", GET, None)), Some(2));
    assert_eq!(metrics.counter(&stat("grpc_server_msg_sent_total", GET, None)), Some(2));
    assert_eq!(metrics.histogram(&stat("grpc_server_request_bytes", GET, None)), Some(vec![12, 56]));
    assert_eq!(metrics.histogram(&stat("grpc_server_response_bytes", GET, None)), Some(vec![34, 0]));
    assert_eq!(metrics.histogram(&stat("grpc_server_handling_milliseconds", GET, None)).map(|v| v.len()), Some(2));
}

/// Every `grpc_method` label value among the defined metrics.
fn method_labels(host: &Host) -> BTreeSet<String> {
    host.metrics().names().iter().filter_map(|n| label(n, "grpc_method").map(str::to_owned)).collect()
}

#[test]
fn method_labels_are_bounded_across_workers_and_the_rest_fold_into_other() {
    let host = fresh_host();
    let config = r#"{"metrics":{"max_methods":3}}"#;
    let mut workers = [start(&host, config), start(&host, config)];
    let mut calls = 0u64;
    for i in 0..40 {
        unary(&mut workers[i % 2], &format!("/pkg.Svc/M{i}"), &[], 1, 1, 0);
        calls += 1;
    }
    for path in ["/x", "/a/b;grpc_code=OK", "/pkg.Svc/M0/extra", "/pkg.Svc/M=1", "/pkg.Svc/M0;x", "", "/"] {
        unary(&mut workers[0], path, &[], 1, 1, 0);
        calls += 1;
    }

    let expected: BTreeSet<String> = ["M0", "M1", "M2", "other"].iter().map(|s| s.to_string()).collect();
    assert_eq!(method_labels(&host), expected, "the first three methods seen by any worker, then `other`");
    let metrics = host.metrics();
    let services: BTreeSet<String> =
        metrics.names().iter().filter_map(|n| label(n, "grpc_service").map(str::to_owned)).collect();
    assert_eq!(services, ["other", "pkg.Svc"].iter().map(|s| s.to_string()).collect());
    for i in 0..3 {
        let m = Labels { service: SERVICE, method: &format!("M{i}"), grpc_type: "unary" };
        assert_eq!(metrics.counter(&handled(m, "OK")), Some(1), "M{i}");
    }
    assert_eq!(metrics.counter(&handled(OTHER, "OK")), Some(37 + 7), "folded calls are still counted");
    let total: u64 = metrics
        .names()
        .iter()
        .filter(|n| n.starts_with("grpc_server_handled_total."))
        .filter_map(|n| metrics.counter(n))
        .sum();
    assert_eq!(total, calls, "no call is lost");
    for name in metrics.names() {
        // `NAME.key=.=value;.;key=.=value;.;`: Istio's encoding.
        let (_, segments) = name.split_once('.').unwrap_or_else(|| panic!("no labels in {name}"));
        let keys: Vec<&str> = segments
            .strip_suffix(";.;")
            .unwrap_or_else(|| panic!("labels not ended by `;.;` in {name}"))
            .split(";.;")
            .map(|segment| {
                let (key, value) = segment.split_once("=.=").unwrap_or_else(|| panic!("segment without value: {name}"));
                assert!(!value.contains('=') && !value.contains(';'), "a path injected a label into {name}");
                key
            })
            .collect();
        let plain = ["grpc_service", "grpc_method", "grpc_type"];
        assert!(
            keys == [&plain[..], &["exporter"]].concat() || keys == [&plain[..], &["grpc_code", "exporter"]].concat(),
            "unexpected labels in {name}"
        );
    }
}

#[test]
fn method_admitted_by_one_worker_keeps_its_label_on_every_worker_after_the_table_fills() {
    let host = fresh_host();
    let config = r#"{"metrics":{"max_methods":2}}"#;
    let (mut a, mut b) = (start(&host, config), start(&host, config));
    unary(&mut a, "/pkg.Svc/A", &[], 1, 1, 0);
    unary(&mut b, "/pkg.Svc/B", &[], 1, 1, 0);
    // Worker b learns the table is full from a third method...
    unary(&mut b, "/pkg.Svc/C", &[], 1, 1, 0);
    // ...and must still give A, admitted by worker a, its own label.
    unary(&mut b, "/pkg.Svc/A", &[], 1, 1, 0);

    let a_labels = Labels { service: SERVICE, method: "A", grpc_type: "unary" };
    let metrics = host.metrics();
    assert_eq!(
        metrics.counter(&handled(a_labels, "OK")),
        Some(2),
        "a method's count must not depend on which worker served the call"
    );
    assert_eq!(metrics.counter(&handled(OTHER, "OK")), Some(1), "only C folds into other");
}

/// A flood of made-up paths, each answered UNIMPLEMENTED by the server (or
/// never answered), takes no label: the real method that comes after still
/// gets its own, and no stat is defined for a made-up one.
#[test]
fn made_up_methods_the_server_does_not_have_take_no_label_from_real_ones() {
    let host = fresh_host();
    let config = r#"{"metrics":{"max_methods":2}}"#;
    let mut workers = [start(&host, config), start(&host, config)];
    for i in 0..200 {
        // What a gRPC server answers for a method it does not have: trailers-only.
        let vm = &mut workers[i % 2];
        let s = open(vm, &format!("/pkg.Svc/Made{i}"), &[]);
        send(vm, &s, &frames(&[1]));
        let action = vm.response_headers(
            &s,
            &[(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "12")],
            true,
        );
        cont(vm, action);
        vm.finish(s);
    }
    // An upstream that resets: no answer, no label either.
    let s = open(&mut workers[0], "/pkg.Svc/Reset", &[]);
    send(&mut workers[0], &s, &frames(&[1]));
    workers[0].set_property(&s, &["response", "code_details"], b"upstream_reset_before_response_started{remote_reset}");
    workers[0].finish(s);
    assert_eq!(method_labels(&host), ["other"].iter().map(|s| s.to_string()).collect());
    // The first real method answered (even with an error) takes a label, on
    // either worker.
    unary(&mut workers[1], "/pkg.Svc/Real", &[], 1, 1, 5);
    unary(&mut workers[0], "/pkg.Svc/Real", &[], 1, 1, 0);
    let real = Labels { service: SERVICE, method: "Real", grpc_type: "unary" };
    let metrics = host.metrics();
    assert_eq!(metrics.counter(&handled(real, "NotFound")), Some(1), "its first call counted under its label");
    assert_eq!(metrics.counter(&handled(real, "OK")), Some(1));
    assert_eq!(metrics.counter(&handled(OTHER, "Unimplemented")), Some(200), "made-up calls are still counted");
    assert!(!metrics.names().iter().any(|n| n.contains("Made")), "no stat named after a made-up method");
}

#[test]
fn methods_outside_the_allowlist_fold_into_other_but_are_logged_by_name() {
    let (host, mut vm) = vm_with(r#"{"metrics":{"methods":["pkg.Svc/Get*"]}}"#);
    unary(&mut vm, "/pkg.Svc/GetAll", &[], 1, 1, 0);
    unary(&mut vm, "/pkg.Svc/Put", &[], 1, 1, 0);
    unary(&mut vm, "/other.Svc/Get", &[], 1, 1, 0);

    assert_eq!(method_labels(&host), ["GetAll", "other"].iter().map(|s| s.to_string()).collect());
    let metrics = host.metrics();
    let get_all = Labels { service: SERVICE, method: "GetAll", grpc_type: "unary" };
    assert_eq!(metrics.counter(&handled(get_all, "OK")), Some(1));
    assert_eq!(metrics.counter(&handled(OTHER, "OK")), Some(2));
    let logged: Vec<(String, String)> = call_logs(&mut vm)
        .iter()
        .map(|l| (l["service"].as_str().unwrap().to_owned(), l["method"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(
        logged,
        [("pkg.Svc", "GetAll"), ("pkg.Svc", "Put"), ("other.Svc", "Get")].map(|(s, m)| (s.to_owned(), m.to_owned()))
    );
}

#[test]
fn outbound_direction_uses_client_names_with_sent_and_received_swapped() {
    let (host, mut vm) = vm_with(r#"{"direction":"outbound"}"#);
    let s = open(&mut vm, PATH, &[]);
    send(&mut vm, &s, &frames(&[5, 6, 7]));
    respond_headers(&mut vm, &s);
    let action = vm.response_body(&s, &frames(&[8]), false);
    cont(&vm, action);
    respond_trailers(&mut vm, &s, 0);
    vm.finish(s);

    let metrics = host.metrics();
    assert!(metrics.names().iter().all(|n| n.starts_with("grpc_client_")), "{:#?}", metrics.names());
    assert_eq!(metrics.counter(&stat("grpc_client_started_total", GET, None)), Some(1));
    assert_eq!(metrics.counter(&stat("grpc_client_handled_total", GET, Some("OK"))), Some(1));
    assert_eq!(metrics.counter(&stat("grpc_client_msg_sent_total", GET, None)), Some(3), "a client sends requests");
    assert_eq!(metrics.counter(&stat("grpc_client_msg_received_total", GET, None)), Some(1));
    assert_eq!(metrics.histogram(&stat("grpc_client_request_bytes", GET, None)), Some(vec![5, 6, 7]));
    assert_eq!(metrics.histogram(&stat("grpc_client_response_bytes", GET, None)), Some(vec![8]));
    assert_eq!(metrics.histogram(&stat("grpc_client_handling_milliseconds", GET, None)).map(|v| v.len()), Some(1));
    assert_eq!(one_call_log(&mut vm)["direction"], "outbound");
}
