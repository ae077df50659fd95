//! `config`: the plugin configuration, and the dedup table it describes.

use crate::config::{
    Config, DedupConfig, DedupStore, ScopePart, MAX_DEDUP_ENTRIES, MAX_DEDUP_METADATA_BYTES, MAX_DEDUP_RESPONSE_BYTES,
    MAX_DEDUP_TABLE_BYTES, MAX_MAX_METHODS,
};
use crate::dedup::{ENTRY_OVERHEAD, WAYS};
use crate::json::Json;
use crate::method::MethodPath;

/// Method names asked of every accepted configuration, besides the ones it
/// names itself.
const PROBE_METHODS: [&str; 4] =
    ["shop.v1.Orders/Create", "shop.v1.Orders/Export", "pkg.Svc/Method", "grpc.health.v1.Health/Check"];

/// `config`: the input is the plugin configuration as Envoy hands it over.
/// Neither the JSON reader nor the validation panics, and an accepted
/// configuration holds what validation promises: every bound, no method's
/// deadline default above its maximum, a dedup table of whole buckets whose
/// worst case fits the memory bound.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(json) = Json::parse(text) {
            json.describe();
        }
    }
    let Ok(config) = Config::parse(data) else { return };
    assert!((1..=MAX_MAX_METHODS).contains(&config.max_methods));
    assert!((0.0..=1.0).contains(&config.ok_sample));
    assert!(!config.methods.is_empty());
    assert!(is_header_name(&config.request_id_header), "{:?}", config.request_id_header);
    let named: Vec<&String> =
        config.method_types.keys().chain(config.dedup.iter().flat_map(|d| d.key_fields.keys())).collect();
    for name in &named {
        assert!(MethodPath::parse(&format!("/{name}")).is_some(), "{name:?} is kept as a method name");
        assert!(config.method_named(name), "{name:?} is named by the configuration");
    }
    for name in PROBE_METHODS.iter().copied().chain(named.iter().map(|n| n.as_str())) {
        let policy = config.policy_for(name);
        if let (Some(default), Some(max)) = (policy.deadline.default, policy.deadline.max) {
            assert!(default <= max, "{name}: default {default:?} above max {max:?}");
        }
        assert!(policy.max_request_message_bytes.is_none_or(|n| (1..=u64::from(u32::MAX)).contains(&n)));
        config.method_allowed(name);
        config.method_type(name);
        config.dedup_applies(name);
    }
    if let Some(dedup) = &config.dedup {
        check_dedup_config(&config, dedup);
    }
}

fn is_header_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// An accepted dedup section, and the table it describes.
pub(super) fn check_dedup_config(config: &Config, d: &DedupConfig) {
    let ways = WAYS as u32;
    assert!(is_header_name(&d.header), "{:?}", d.header);
    assert!(!d.methods.is_empty());
    assert_eq!(d.max_entries % ways, 0, "whole buckets");
    assert!((ways..=MAX_DEDUP_ENTRIES).contains(&d.max_entries), "{}", d.max_entries);
    assert!((1..=MAX_DEDUP_RESPONSE_BYTES).contains(&d.max_response_bytes));
    assert!(d.max_metadata_bytes <= MAX_DEDUP_METADATA_BYTES);
    let per_entry = u64::from(d.max_response_bytes) + u64::from(d.max_metadata_bytes) + ENTRY_OVERHEAD;
    match &d.store {
        DedupStore::Local => {
            assert!(u64::from(d.max_entries) * per_entry <= MAX_DEDUP_TABLE_BYTES, "the worst case fits the bound")
        }
        DedupStore::Etcd(etcd) => {
            // A kept answer fits one etcd request.
            assert!(per_entry + crate::etcd::TXN_OVERHEAD <= etcd.max_request_bytes, "a kept answer fits etcd");
            assert!(!etcd.cluster.is_empty() && etcd.cluster.len() <= 100);
            assert!(etcd.lease.lease_ttl >= etcd.lease.needed, "a lease outlives what is put under it");
        }
    }
    assert!((1..=WAYS).contains(&d.caller_ways));
    assert!(!d.ttl.is_zero());
    assert!(d.scope.iter().any(ScopePart::is_identity));
    for (name, path) in &d.key_fields {
        assert!(config.dedup_applies(name), "{name} has a key field but is not deduplicated");
        assert!((1..=8).contains(&path.len()));
        assert!(path.iter().all(|&n| (1..1 << 29).contains(&n) && !(19_000..20_000).contains(&n)), "{path:?}");
    }
    let table = d.table();
    assert_eq!(u64::from(table.buckets) * u64::from(ways), u64::from(d.max_entries));
    assert_eq!(table.caller_ways, d.caller_ways);
    assert_eq!(u128::from(table.ttl_ns), d.ttl.as_nanos().min(u128::from(u64::MAX)));
}
