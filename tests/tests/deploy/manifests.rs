//! The Istio and Prometheus Operator manifests in `istio/`: what the APIs
//! require, the published CRD schemas, and one source of truth for what
//! they share with envoy/envoy.yaml, the filter and the rule file.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};

use serde_yaml::Value;

use crate::support::*;

const WASM_PLUGIN: &str = "istio/wasmplugin.yaml";
const DESTINATION_RULE: &str = "istio/destinationrule.yaml";
const ENVOY_FILTER: &str = "istio/envoyfilter-replay.yaml";
const PROMETHEUS_RULE: &str = "istio/prometheusrule.yaml";
const SECONDS_RULES: &str = "istio/seconds.rules.yml";
const RULE_FILE: &str = "istio/alerts.rules.yml";

fn assert_kind(doc: &Value, file: &str, api_version: &str, kind: &str) {
    assert_eq!(str_at(doc, file, "apiVersion"), api_version, "{file}");
    assert_eq!(str_at(doc, file, "kind"), kind, "{file}");
    assert!(!str_at(doc, file, "metadata.name").is_empty(), "{file}: metadata.name");
}

#[test]
fn wasm_plugin_pulls_the_oci_image_after_authorization_and_fails_closed() {
    let doc = yaml(WASM_PLUGIN);
    let f = WASM_PLUGIN;
    assert_kind(&doc, f, "extensions.istio.io/v1alpha1", "WasmPlugin");
    let url = str_at(&doc, f, "spec.url");
    assert!(url.starts_with("oci://"), "{f}: spec.url must pull the OCI image from `make oci`, got {url}");
    assert!(!url.ends_with(":latest"), "{f}: pin a tag or digest, not :latest ({url})");
    assert_eq!(str_at(&doc, f, "spec.imagePullPolicy"), "IfNotPresent", "{f}");
    assert_eq!(str_at(&doc, f, "spec.phase"), "STATS", "{f}: after Istio's authn/authz (see the comment there)");
    assert_eq!(str_at(&doc, f, "spec.failStrategy"), "FAIL_CLOSE", "{f}");
    assert_eq!(str_at(&doc, f, "spec.type"), "HTTP", "{f}");
    assert_eq!(str_at(&doc, f, "spec.match.0.mode"), "SERVER", "{f}: direction inbound runs on the server side");
    let labels = at(&doc, f, "spec.selector.matchLabels").as_mapping().expect("matchLabels is a map");
    assert!(!labels.is_empty(), "{f}: spec.selector.matchLabels must pick the gRPC server's pods");

    // The same plugin name (root id) as the Envoy config the tests run.
    let envoy = envoy_config();
    let root_id = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        ["http_filters"][0]["typed_config"]["config"]["root_id"]
        .as_str()
        .expect("envoy.yaml names the plugin's root_id");
    assert_eq!(str_at(&doc, f, "spec.pluginName"), root_id, "{f}: spec.pluginName");
}

/// The configuration sections the README documents (`direction`, `metrics`,
/// `log`, …): the README's table is itself checked against the filter's
/// defaults, so a new section there is demanded here too.
fn documented_sections() -> BTreeSet<String> {
    let readme = read("README.md");
    let table = readme.split("| field | default | meaning |").nth(1).expect("README has the configuration table");
    table
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| l.split('`').nth(1))
        .map(|field| field.split('.').next().unwrap().to_owned())
        .collect()
}

#[test]
fn plugin_config_has_every_documented_section_and_the_filter_accepts_it() {
    let doc = yaml(WASM_PLUGIN);
    let config = to_json(at(&doc, WASM_PLUGIN, "spec.pluginConfig"));
    let sections: BTreeSet<String> = config.as_object().expect("pluginConfig is a map").keys().cloned().collect();
    let documented = documented_sections();
    assert!(documented.contains("metrics") && documented.contains("log"), "README sections: {documented:?}");
    assert_eq!(sections, documented, "{WASM_PLUGIN}: pluginConfig sections vs README \"Configuration\"");
    // Istio hands pluginConfig to the plugin as JSON: the filter's own parser
    // must accept it, or the plugin would refuse to start (fail closed).
    let parsed = grpc_guard::config::Config::parse(config.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("{WASM_PLUGIN}: the filter refuses pluginConfig: {e}"));
    assert_eq!(parsed.direction, grpc_guard::method::Direction::Inbound);
}

#[test]
fn the_manifests_share_the_workload_s_namespace() {
    let namespaces: BTreeSet<String> = [WASM_PLUGIN, DESTINATION_RULE, ENVOY_FILTER, PROMETHEUS_RULE]
        .iter()
        .map(|file| str_at(&yaml(file), file, "metadata.namespace").to_owned())
        .collect();
    assert_eq!(namespaces.len(), 1, "the manifests must share the workload's namespace: {namespaces:?}");
}

#[test]
fn destination_rule_hashes_calls_on_the_idempotency_key() {
    let doc = yaml(DESTINATION_RULE);
    let f = DESTINATION_RULE;
    assert_kind(&doc, f, "networking.istio.io/v1", "DestinationRule");
    assert!(str_at(&doc, f, "spec.host").ends_with(".svc.cluster.local"), "{f}: spec.host is the ClusterIP service");
    assert_eq!(
        str_at(&doc, f, "spec.trafficPolicy.loadBalancer.consistentHash.httpHeaderName"),
        "idempotency-key",
        "{f}"
    );
    assert!(read(f).contains("headless"), "{f}: keep the note on headless services");
}

/// Retries reach the pod whose table holds their key only if the balancer
/// hashes on the header the filter reads the key from.
#[test]
fn destination_rule_and_envoy_yaml_hash_on_the_plugin_s_idempotency_key_header() {
    let plugin = yaml(WASM_PLUGIN);
    let header = str_at(&plugin, WASM_PLUGIN, "spec.pluginConfig.dedup.header");
    let rule = yaml(DESTINATION_RULE);
    assert_eq!(
        str_at(&rule, DESTINATION_RULE, "spec.trafficPolicy.loadBalancer.consistentHash.httpHeaderName"),
        header,
        "{DESTINATION_RULE} vs {WASM_PLUGIN} dedup.header"
    );
    let envoy = envoy_config();
    let f = "envoy/envoy.yaml";
    let routes = at(
        &envoy,
        f,
        "static_resources.listeners.0.filter_chains.0.filters.0.typed_config.route_config.virtual_hosts.0.routes",
    );
    let service_route = routes
        .as_sequence()
        .unwrap()
        .iter()
        .find(|r| r["route"]["cluster"] == "grpc_service")
        .expect("envoy.yaml routes to grpc_service");
    assert_eq!(str_at(service_route, f, "route.hash_policy.0.header.header_name"), header, "{f} hash_policy");
}

#[test]
fn prometheus_rule_carries_the_rule_file_s_groups() {
    let rule = yaml(PROMETHEUS_RULE);
    assert_kind(&rule, PROMETHEUS_RULE, "monitoring.coreos.com/v1", "PrometheusRule");
    let mut groups = at(&yaml(RULE_FILE), RULE_FILE, "groups").as_sequence().unwrap().clone();
    groups.extend(at(&yaml(SECONDS_RULES), SECONDS_RULES, "groups").as_sequence().unwrap().iter().cloned());
    assert_eq!(
        at(&rule, PROMETHEUS_RULE, "spec.groups"),
        &serde_yaml::Value::Sequence(groups),
        "{PROMETHEUS_RULE} differs from {RULE_FILE} and {SECONDS_RULES} (the sources): run `make prometheusrule`"
    );
}

/// Runs istio/schema-check/validate.mjs on `docs`; its exit status and output.
fn schema_check(docs: &[serde_json::Value]) -> (bool, String) {
    let node_modules = repo_file(".venv/schema-check/node_modules");
    assert!(
        node_modules.join("@kubernetes-models/istio").is_dir(),
        "{} is missing: run `make setup` (scripts/setup.d/deploy.sh installs the published CRD schemas from npm)",
        node_modules.display()
    );
    let mut child = Command::new(tool("node"))
        .arg(repo_file("istio/schema-check/validate.mjs"))
        .arg(&node_modules)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting node");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(serde_json::to_string(docs).unwrap().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn crd_manifests() -> Vec<serde_json::Value> {
    [WASM_PLUGIN, DESTINATION_RULE, PROMETHEUS_RULE, ENVOY_FILTER].iter().map(|f| to_json(&yaml(f))).collect()
}

#[test]
fn manifests_pass_istio_s_and_the_prometheus_operator_s_published_schemas() {
    let (ok, output) = schema_check(&crd_manifests());
    assert!(ok, "schema check failed:\n{output}");
    for kind in ["WasmPlugin", "DestinationRule", "PrometheusRule", "EnvoyFilter"] {
        assert!(output.lines().any(|l| l.starts_with(&format!("ok {kind} "))), "{output}");
    }
}

#[test]
fn schema_check_refuses_a_misspelled_field_and_an_unknown_enum_value() {
    let mut docs = crd_manifests();
    docs[0]["spec"]["phase"] = "STAT".into();
    docs[1]["spec"]["trafficPolicy"]["loadBalancer"]["consistentHash"]["httpHeader"] = "idempotency-key".into();
    let route_patch = &mut docs[3]["spec"]["configPatches"][2];
    route_patch["patch"]["operation"] = "INSERT_FIRTS".into();
    route_patch["match"]["routeConfiguration"]["port"] = 50051.into();
    let (ok, output) = schema_check(&docs);
    assert!(!ok, "{output}");
    assert!(output.contains("invalid WasmPlugin") && output.contains("/spec/phase"), "{output}");
    assert!(output.contains("consistentHash/httpHeader: unknown field"), "{output}");
    assert!(output.contains("/spec/configPatches/2/patch/operation enum"), "{output}");
    assert!(output.contains("routeConfiguration/port: unknown field"), "{output}");
    assert!(output.contains("ok PrometheusRule"), "{output}");
}
