//! The dedup table on etcd under Istio (`istio/etcd/`): the ServiceEntry and
//! DestinationRule pass Istio's published schemas, and the plugin
//! configuration names the Envoy cluster Istio makes for that ServiceEntry,
//! in a form the filter's own parser takes.

use grpc_guard::config::{Config, DedupStore};

use crate::support::*;

const SERVICE_ENTRY: &str = "istio/etcd/serviceentry.yaml";
const DESTINATION_RULE: &str = "istio/etcd/destinationrule.yaml";
const PLUGIN_CONFIG: &str = "istio/etcd/plugin-config.yaml";

#[test]
fn the_etcd_service_entry_and_its_destination_rule_pass_istio_s_schemas() {
    let docs = [to_json(&yaml(SERVICE_ENTRY)), to_json(&yaml(DESTINATION_RULE))];
    let (ok, output) = schema_check(&docs);
    assert!(ok, "{output}");
    assert!(output.contains("ok ServiceEntry grpc-guard-etcd"), "{output}");
    assert!(output.contains("ok DestinationRule grpc-guard-etcd"), "{output}");
    // A misspelt field is caught, so the check above means something.
    let mut wrong = docs[0].clone();
    wrong["spec"]["ports"][0]["protocl"] = "GRPC".into();
    let (ok, output) = schema_check(&[wrong]);
    assert!(!ok && output.contains("protocl"), "{output}");
}

#[test]
fn the_plugin_config_names_the_cluster_istio_makes_for_the_service_entry() {
    let entry = yaml(SERVICE_ENTRY);
    let host = at(&entry, SERVICE_ENTRY, "spec.hosts.0").as_str().unwrap().to_owned();
    let port = at(&entry, SERVICE_ENTRY, "spec.ports.0.number").as_u64().unwrap();
    // HTTP/2, as etcd's gRPC API needs: Istio takes GRPC (or HTTP2) for it.
    assert_eq!(at(&entry, SERVICE_ENTRY, "spec.ports.0.protocol").as_str(), Some("GRPC"));
    let rule = yaml(DESTINATION_RULE);
    assert_eq!(at(&rule, DESTINATION_RULE, "spec.host").as_str(), Some(host.as_str()));
    // Istio's outbound cluster name: outbound|PORT|SUBSET|HOST.
    let istio_cluster = format!("outbound|{port}||{host}");
    let config = to_json(&yaml(PLUGIN_CONFIG));
    let parsed = Config::parse(config.to_string().as_bytes()).unwrap_or_else(|e| panic!("{PLUGIN_CONFIG}: {e}"));
    let dedup = parsed.dedup.expect("dedup on");
    let DedupStore::Etcd(etcd) = dedup.store else { panic!("{PLUGIN_CONFIG}: the store is not etcd") };
    assert_eq!(etcd.cluster, istio_cluster);
}
