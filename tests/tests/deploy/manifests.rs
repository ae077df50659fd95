//! The Istio and Prometheus Operator manifests, as the example install
//! (`kubectl apply -k istio/overlays/example`) renders them: what the APIs
//! require, the published CRD schemas, and one source of truth for what
//! they share with envoy/envoy.yaml, the filter and the rule file.

use std::collections::BTreeSet;

use serde_yaml::Value;

use crate::support::*;

const WASM_PLUGIN: &str = "istio/overlays/example: WasmPlugin";
const DESTINATION_RULE: &str = "istio/overlays/example: DestinationRule";
const PROMETHEUS_RULE: &str = "istio/overlays/example: PrometheusRule";
const SECONDS_RULES: &str = "istio/seconds.rules.yml";
const RULE_FILE: &str = "istio/alerts.rules.yml";

fn assert_kind(doc: &Value, file: &str, api_version: &str, kind: &str) {
    assert_eq!(str_at(doc, file, "apiVersion"), api_version, "{file}");
    assert_eq!(str_at(doc, file, "kind"), kind, "{file}");
    assert!(!str_at(doc, file, "metadata.name").is_empty(), "{file}: metadata.name");
}

#[test]
fn wasm_plugin_pulls_the_oci_image_after_authorization_and_fails_closed() {
    let doc = object(example_install(), "WasmPlugin");
    let f = WASM_PLUGIN;
    assert_kind(doc, f, "extensions.istio.io/v1alpha1", "WasmPlugin");
    let url = str_at(doc, f, "spec.url");
    assert!(url.starts_with("oci://"), "{f}: spec.url must pull the OCI image from `make oci`, got {url}");
    assert!(!url.ends_with(":latest"), "{f}: pin a tag or digest, not :latest ({url})");
    assert_eq!(str_at(doc, f, "spec.imagePullPolicy"), "IfNotPresent", "{f}");
    assert_eq!(str_at(doc, f, "spec.phase"), "STATS", "{f}: after Istio's authn/authz (see the comment there)");
    assert_eq!(str_at(doc, f, "spec.failStrategy"), "FAIL_RELOAD", "{f}");
    assert_eq!(str_at(doc, f, "spec.type"), "HTTP", "{f}");
    assert_eq!(str_at(doc, f, "spec.match.0.mode"), "SERVER", "{f}: direction inbound runs on the server side");
    let labels = at(doc, f, "spec.selector.matchLabels").as_mapping().expect("matchLabels is a map");
    assert!(!labels.is_empty(), "{f}: spec.selector.matchLabels must pick the gRPC server's pods");

    // The same plugin name (root id) as the Envoy config the tests run.
    let envoy = envoy_config();
    let root_id = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        ["http_filters"][0]["typed_config"]["config"]["root_id"]
        .as_str()
        .expect("envoy.yaml names the plugin's root_id");
    assert_eq!(str_at(doc, f, "spec.pluginName"), root_id, "{f}: spec.pluginName");
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
    let doc = object(example_install(), "WasmPlugin");
    let config = to_json(at(doc, WASM_PLUGIN, "spec.pluginConfig"));
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

/// Every object in the one namespace the values name, the DestinationRule's
/// host in it too.
#[test]
fn the_example_s_objects_share_the_workload_s_namespace() {
    let objects = example_install();
    let namespaces: BTreeSet<&str> = objects.iter().map(|o| str_at(o, EXAMPLE, "metadata.namespace")).collect();
    assert_eq!(namespaces.len(), 1, "{EXAMPLE}: one namespace: {namespaces:?}");
    let host = str_at(object(objects, "DestinationRule"), DESTINATION_RULE, "spec.host");
    let namespace = namespaces.first().unwrap();
    assert!(host.ends_with(&format!(".{namespace}.svc.cluster.local")), "{DESTINATION_RULE}: {host}");
}

#[test]
fn destination_rule_hashes_calls_on_the_idempotency_key() {
    let doc = object(example_install(), "DestinationRule");
    let f = DESTINATION_RULE;
    assert_kind(doc, f, "networking.istio.io/v1", "DestinationRule");
    assert!(str_at(doc, f, "spec.host").ends_with(".svc.cluster.local"), "{f}: spec.host is the ClusterIP service");
    assert_eq!(
        str_at(doc, f, "spec.trafficPolicy.loadBalancer.consistentHash.httpHeaderName"),
        "idempotency-key",
        "{f}"
    );
    assert!(read("istio/base/destinationrule.yaml").contains("headless"), "keep the note on headless services");
}

/// Retries reach the pod whose table holds their key only if the balancer
/// hashes on the header the filter reads the key from.
#[test]
fn destination_rule_and_envoy_yaml_hash_on_the_plugin_s_idempotency_key_header() {
    let plugin = object(example_install(), "WasmPlugin");
    let header = str_at(plugin, WASM_PLUGIN, "spec.pluginConfig.dedup.header");
    let rule = object(example_install(), "DestinationRule");
    assert_eq!(
        str_at(rule, DESTINATION_RULE, "spec.trafficPolicy.loadBalancer.consistentHash.httpHeaderName"),
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
    let rule = object(example_install(), "PrometheusRule");
    assert_kind(rule, PROMETHEUS_RULE, "monitoring.coreos.com/v1", "PrometheusRule");
    let mut groups = at(&yaml(RULE_FILE), RULE_FILE, "groups").as_sequence().unwrap().clone();
    groups.extend(at(&yaml(SECONDS_RULES), SECONDS_RULES, "groups").as_sequence().unwrap().iter().cloned());
    assert_eq!(
        at(rule, PROMETHEUS_RULE, "spec.groups"),
        &serde_yaml::Value::Sequence(groups),
        "istio/base/prometheusrule.yaml differs from {RULE_FILE} and {SECONDS_RULES} (the sources): run `make prometheusrule`"
    );
}

/// The example install's objects, in the order kustomize writes them, as JSON.
fn crd_manifests() -> Vec<serde_json::Value> {
    example_install().iter().map(to_json).collect()
}

/// Where the object of `kind` is among `docs`.
fn kind_index(docs: &[serde_json::Value], kind: &str) -> usize {
    docs.iter().position(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind}"))
}

#[test]
fn the_example_install_passes_istio_s_and_the_prometheus_operator_s_published_schemas() {
    let docs = crd_manifests();
    assert_eq!(docs.len(), 4, "{EXAMPLE} renders the four objects, not its values: {docs:?}");
    let (ok, output) = schema_check(&docs);
    assert!(ok, "schema check failed:\n{output}");
    for kind in ["WasmPlugin", "DestinationRule", "PrometheusRule", "EnvoyFilter"] {
        assert!(output.lines().any(|l| l.starts_with(&format!("ok {kind} "))), "{output}");
    }
}

#[test]
fn schema_check_refuses_a_misspelled_field_and_an_unknown_enum_value() {
    let mut docs = crd_manifests();
    let (plugin, rule, filter) =
        (kind_index(&docs, "WasmPlugin"), kind_index(&docs, "DestinationRule"), kind_index(&docs, "EnvoyFilter"));
    docs[plugin]["spec"]["phase"] = "STAT".into();
    docs[rule]["spec"]["trafficPolicy"]["loadBalancer"]["consistentHash"]["httpHeader"] = "idempotency-key".into();
    let route_patch = &mut docs[filter]["spec"]["configPatches"][2];
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

/// The repository paths a file names (`istio/base/wasmplugin.yaml`,
/// `tests/tests/deploy/replay.rs`, …), as words of path characters.
fn repository_paths(text: &str) -> BTreeSet<String> {
    const ROOTS: [&str; 10] =
        ["istio/", "envoy/", "tests/", "grafana/", "filter/", "demo/", "scripts/", "mk/", "bench/", "cost-model/"];
    let is_path_char = |c: char| c.is_ascii_alphanumeric() || "_./-".contains(c);
    let mut paths = BTreeSet::new();
    for (i, _) in text.char_indices() {
        let before = text[..i].chars().next_back();
        if before.is_some_and(is_path_char) || !ROOTS.iter().any(|r| text[i..].starts_with(r)) {
            continue;
        }
        let word: String = text[i..].chars().take_while(|c| is_path_char(*c)).collect();
        paths.insert(word.trim_end_matches(['.', '-']).to_owned());
    }
    paths
}

/// Comments and the README send readers to files: each must be there.
#[test]
fn every_repository_path_named_in_istio_s_files_and_the_readme_exists() {
    let mut files: Vec<String> = vec!["README.md".to_owned(), "envoy/envoy.yaml".to_owned(), "mk/deploy.mk".to_owned()];
    let mut dirs = vec![repo_file("istio")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                files.push(path.strip_prefix(workspace_root()).unwrap().display().to_string());
            }
        }
    }
    // Not this repository's: Istio's own repository, and the README's copy
    // of the example overlay that a user makes.
    let elsewhere = ["istio/istio", "istio/overlays/shop"];
    let mut missing = Vec::new();
    for file in &files {
        for path in repository_paths(&read(file)) {
            if !elsewhere.iter().any(|e| path.starts_with(e)) && !repo_file(&path).exists() {
                missing.push(format!("{file}: {path}"));
            }
        }
    }
    assert!(files.len() > 10, "{files:?}");
    assert_eq!(missing, Vec::<String>::new(), "named but not in the repository");
}
