//! The replay hop of idempotency-key deduplication under Istio: the
//! EnvoyFilter of istio/base/envoyfilter-replay.yaml, as the example install
//! renders it. Its patches carry envoy/envoy.yaml's internal
//! listener, cluster and route verbatim (one source of truth); they target
//! what Istio's patcher matches in a sidecar's inbound configuration; and in
//! a real Envoy they make a retry of a kept OK call get the kept message.
//! Without them (a WasmPlugin alone) the retry is still never run twice.

use std::process::Command;

use grpc_guard_demo::envoy::EnvoyParams;
use grpc_guard_demo::pb::{EchoReply, EchoRequest};
use grpc_guard_tests::e2e::Upstream;
use serde_yaml::Value;

use crate::support::*;

const ENVOY_FILTER: &str = "istio/overlays/example: EnvoyFilter";
const WASM_PLUGIN: &str = "istio/overlays/example: WasmPlugin";
const ENVOY_YAML: &str = "envoy/envoy.yaml";
/// The listener and the cluster of the replay hop share this name.
const REPLAY: &str = "grpc_guard_replay";
const ECHO_DEDUP: &str = r#"{"dedup":{"methods":["grpcguard.demo.v1.Demo/Echo"]}}"#;

/// The patch of the EnvoyFilter that applies to `apply_to`; there is one each.
fn patch<'a>(filter: &'a Value, apply_to: &str) -> &'a Value {
    let patches: Vec<&Value> = at(filter, ENVOY_FILTER, "spec.configPatches")
        .as_sequence()
        .expect("configPatches is a list")
        .iter()
        .filter(|p| p["applyTo"] == apply_to)
        .collect();
    assert_eq!(patches.len(), 1, "{ENVOY_FILTER}: one {apply_to} patch");
    patches[0]
}

fn named<'a>(list: &'a Value, what: &str, name: &str) -> &'a Value {
    list.as_sequence()
        .and_then(|items| items.iter().find(|item| item["name"] == name))
        .unwrap_or_else(|| panic!("{ENVOY_YAML}: no {what} named {name}"))
}

/// The routes of envoy.yaml's gRPC listener, in order.
fn ingress_routes(envoy: &mut Value) -> &mut Vec<Value> {
    envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]
        ["virtual_hosts"][0]["routes"]
        .as_sequence_mut()
        .expect("envoy.yaml's gRPC listener has routes")
}

fn is_replay_route(route: &Value) -> bool {
    route["route"]["cluster"] == REPLAY
}

#[test]
fn envoy_filter_carries_envoy_yaml_s_replay_listener_cluster_and_route_verbatim() {
    let filter = object(example_install(), "EnvoyFilter");
    let mut envoy = envoy_config();
    let listener = named(&envoy["static_resources"]["listeners"], "listener", REPLAY);
    assert_eq!(
        at(patch(filter, "LISTENER"), ENVOY_FILTER, "patch.value"),
        listener,
        "{ENVOY_FILTER}: the internal listener must be {ENVOY_YAML}'s, verbatim"
    );
    assert!(listener.get("internal_listener").is_some(), "{ENVOY_YAML}: {REPLAY} is an internal listener");
    let cluster = named(&envoy["static_resources"]["clusters"], "cluster", REPLAY);
    assert_eq!(
        at(patch(filter, "CLUSTER"), ENVOY_FILTER, "patch.value"),
        cluster,
        "{ENVOY_FILTER}: the cluster must be {ENVOY_YAML}'s, verbatim"
    );
    assert_eq!(
        str_at(
            cluster,
            ENVOY_YAML,
            "load_assignment.endpoints.0.lb_endpoints.0.endpoint.address.envoy_internal_address.server_listener_name"
        ),
        REPLAY,
        "the cluster's endpoint is the internal listener"
    );
    let routes = ingress_routes(&mut envoy);
    assert!(is_replay_route(&routes[0]), "{ENVOY_YAML}: the replay route comes first");
    assert_eq!(
        at(patch(filter, "HTTP_ROUTE"), ENVOY_FILTER, "patch.value"),
        &routes[0],
        "{ENVOY_FILTER}: the route must be {ENVOY_YAML}'s first route, verbatim"
    );
}

/// What Istio's patcher matches (pilot/pkg/networking/core/envoyfilter): an
/// ADD without a context never reaches SIDECAR_INBOUND; a sidecar's inbound
/// route configuration is `inbound|PORT||`, matched by `portNumber`; and
/// INSERT_FIRST without a `vhost.route` match puts the route first in every
/// virtual host of it.
#[test]
fn envoy_filter_patches_the_wasm_plugin_s_pods_inbound_with_the_route_first() {
    let filter = object(example_install(), "EnvoyFilter");
    let f = ENVOY_FILTER;
    assert_eq!(str_at(filter, f, "apiVersion"), "networking.istio.io/v1alpha3", "{f}");
    assert_eq!(str_at(filter, f, "kind"), "EnvoyFilter", "{f}");
    let plugin = object(example_install(), "WasmPlugin");
    assert_eq!(
        at(filter, f, "spec.workloadSelector.labels"),
        at(plugin, WASM_PLUGIN, "spec.selector.matchLabels"),
        "{f}: the pods the WasmPlugin runs in"
    );
    assert_eq!(str_at(filter, f, "metadata.namespace"), str_at(plugin, WASM_PLUGIN, "metadata.namespace"), "{f}");
    let patches = at(filter, f, "spec.configPatches").as_sequence().unwrap();
    assert_eq!(patches.len(), 3, "{f}: the listener, the cluster and the route");
    for p in patches {
        assert_eq!(str_at(p, f, "match.context"), "SIDECAR_INBOUND", "{f}: {p:?}");
    }
    assert_eq!(str_at(patch(filter, "LISTENER"), f, "patch.operation"), "ADD", "{f}");
    assert_eq!(str_at(patch(filter, "CLUSTER"), f, "patch.operation"), "ADD", "{f}");
    let route = patch(filter, "HTTP_ROUTE");
    assert_eq!(str_at(route, f, "patch.operation"), "INSERT_FIRST", "{f}");
    let port = at(route, f, "match.routeConfiguration.portNumber").as_u64().expect("portNumber is a number");
    assert!((1..=65535).contains(&port), "{f}: portNumber {port}");
    let matched: Vec<&str> =
        at(route, f, "match.routeConfiguration").as_mapping().unwrap().keys().filter_map(Value::as_str).collect();
    assert_eq!(matched, ["portNumber"], "{f}: match the service port's route configuration only by its port");
}

/// The route's `filter_state` match needs Envoy 1.34 (Istio 1.26); an
/// older one would lose it and route every call to the replay hop. Istio
/// matches `proxyVersion` with Go's regexp against the proxy's Istio version;
/// JavaScript's RegExp reads this expression the same way.
#[test]
fn the_replay_hop_applies_only_to_sidecars_of_istio_1_26_or_later() {
    let filter = object(example_install(), "EnvoyFilter");
    let patches = at(filter, ENVOY_FILTER, "spec.configPatches").as_sequence().unwrap();
    let versions: std::collections::BTreeSet<&str> =
        patches.iter().map(|p| str_at(p, ENVOY_FILTER, "match.proxy.proxyVersion")).collect();
    assert_eq!(versions.len(), 1, "{ENVOY_FILTER}: every patch has the same proxyVersion: {versions:?}");
    let regex = versions.first().unwrap();
    let matching = [("1.26.0", true), ("1.26.4", true), ("1.28.1", true), ("1.30.0-beta.0", true), ("1.99.0", true)];
    let older = [("1.25.5", false), ("1.24.0", false), ("1.2.0", false), ("1.9.9", false), ("1.260.0", false)];
    let cases: Vec<(&str, bool)> = matching.into_iter().chain(older).collect();
    let script =
        "const r = new RegExp(process.argv[1]); console.log(process.argv.slice(2).map(v => r.test(v)).join(' '))";
    let out = run_ok(Command::new(tool("node")).args(["-e", script, regex]).args(cases.iter().map(|(v, _)| v)));
    let answers: Vec<bool> = String::from_utf8(out.stdout).unwrap().split_whitespace().map(|a| a == "true").collect();
    let expected: Vec<bool> = cases.iter().map(|(_, m)| *m).collect();
    assert_eq!(answers, expected, "{regex} against {cases:?}");
}

/// envoy.yaml as a sidecar with the WasmPlugin alone would have it: no
/// replay listener, cluster or route.
fn without_replay_hop(envoy: &mut Value) {
    for (list, what) in [("listeners", "listener"), ("clusters", "cluster")] {
        let items = envoy["static_resources"][list].as_sequence_mut().unwrap();
        let before = items.len();
        items.retain(|item| item["name"] != REPLAY);
        assert_eq!(items.len(), before - 1, "{ENVOY_YAML}: the replay {what}");
    }
    let routes = ingress_routes(envoy);
    routes.retain(|r| !is_replay_route(r));
}

/// The EnvoyFilter's patches applied the way Istio applies them.
fn with_envoy_filter(envoy: &mut Value) {
    let filter = object(example_install(), "EnvoyFilter");
    let value = |apply_to| at(patch(filter, apply_to), ENVOY_FILTER, "patch.value").clone();
    envoy["static_resources"]["listeners"].as_sequence_mut().unwrap().push(value("LISTENER"));
    envoy["static_resources"]["clusters"].as_sequence_mut().unwrap().push(value("CLUSTER"));
    ingress_routes(envoy).insert(0, value("HTTP_ROUTE"));
}

/// A real Envoy running the filter, deduplicating Echo, in front of the demo
/// service, with envoy/envoy.yaml changed by `edit`; killed on drop.
fn start_envoy(name: &str, upstream: &Upstream, edit: fn(&mut Value)) -> (Server, EnvoyParams) {
    start_edited_envoy(name, upstream.addr, ECHO_DEDUP, edit)
}

/// One keyed Echo: the reply or the status, and whether it was marked replayed.
async fn keyed_echo(params: &EnvoyParams, key: &str) -> (Result<EchoReply, tonic::Status>, bool) {
    keyed_echo_failing(params, key, tonic::Code::Ok).await
}

/// A keyed Echo that the service answers with `fail_code` (`Ok`: the reply).
async fn keyed_echo_failing(
    params: &EnvoyParams,
    key: &str,
    fail_code: tonic::Code,
) -> (Result<EchoReply, tonic::Status>, bool) {
    let channel = grpc_guard_demo::lazy_channel(&format!("http://{}", params.listen_addr())).unwrap();
    let mut client = grpc_guard_demo::client(channel);
    let request =
        EchoRequest { message: "create order 7".into(), fail_code: fail_code as i32, ..EchoRequest::default() };
    match client.echo(grpc_guard_tests::e2e::keyed(request, key, grpc_guard_tests::e2e::CALLER)).await {
        Ok(response) => {
            let replayed = response.metadata().get("grpc-guard-replayed").is_some_and(|v| v == "true");
            (Ok(response.into_inner()), replayed)
        }
        Err(status) => {
            let replayed = status.metadata().get("grpc-guard-replayed").is_some_and(|v| v == "true");
            (Err(status), replayed)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_envoy_filter_s_patches_a_retry_gets_the_kept_message_without_running_again() {
    let upstream = Upstream::start().await;
    let (envoy, params) = start_envoy("replay-envoyfilter", &upstream, |config| {
        without_replay_hop(config);
        with_envoy_filter(config);
    });
    let (first, _) = keyed_echo(&params, "order-7").await;
    let (retry, replayed) = keyed_echo(&params, "order-7").await;
    let first = first.expect("the first call runs and answers OK");
    assert_eq!(retry.map_err(|s| format!("{s:?}")), Ok(first), "the retry gets the first call's exact message");
    assert!(replayed, "the retry is marked grpc-guard-replayed: true");
    assert_eq!(upstream.observed.executions("Echo"), 1, "the retry must not run upstream");
    drop(envoy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_envoy_filter_a_retry_of_a_kept_call_is_not_run_again() {
    let upstream = Upstream::start().await;
    let (envoy, params) = start_envoy("replay-wasmplugin-only", &upstream, without_replay_hop);
    let (first, _) = keyed_echo(&params, "order-7").await;
    first.expect("the first call runs and answers OK");
    // grpc-guard sent the retry on towards the replay hop; with no route for
    // it, it reaches the service on a path no method has.
    let (retry, replayed) = keyed_echo(&params, "order-7").await;
    assert_eq!(upstream.observed.executions("Echo"), 1, "the retry must not run the method upstream");
    let status = retry.expect_err("without the replay route the retry cannot get the kept message");
    assert_eq!(status.code(), tonic::Code::Unimplemented, "the service's own answer: {status:?}");
    assert!(!replayed, "an answer that is not the kept one is not marked replayed");

    // A kept error is answered by grpc-guard itself once the whole retry is
    // in; whichever answer comes first, the method does not run again.
    let (first, _) = keyed_echo_failing(&params, "order-8", tonic::Code::NotFound).await;
    assert_eq!(first.map_err(|s| s.code()).err(), Some(tonic::Code::NotFound));
    let _ = keyed_echo_failing(&params, "order-8", tonic::Code::NotFound).await;
    assert_eq!(upstream.observed.executions("Echo"), 2, "the retry of a kept error must not run upstream");
    drop(envoy);
}
