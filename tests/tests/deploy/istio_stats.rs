//! The Envoy stats settings Istio gives a sidecar from grpc-guard's workload
//! annotations, derived the way istio-agent derives them (istio/istio
//! pkg/bootstrap/config.go getStatsOptions, and the sidecar bootstrap
//! template tools/packaging/common/envoy_bootstrap.json), and held equal to
//! envoy/envoy.yaml's: so every end-to-end test that reads envoy.yaml's
//! /stats/prometheus reads what a sidecar prints. A real Envoy with Istio's
//! stats inclusion list in place then shows that grpc-guard's metrics are
//! kept, with their labels, without any `proxyStatsMatcher`.

use serde_yaml::Value;

use grpc_guard::method::Direction;
use grpc_guard::metrics::{Family, LABELS};
use grpc_guard_demo::pb::EchoRequest;
use grpc_guard_tests::e2e::Upstream;

use crate::support::*;

/// Where the annotations come from: a rendered overlay's Deployment.
const WORKLOAD_PATCH: &str = "istio/components/workload on an overlay's Deployment";
const PROXY_CONFIG: &str = "proxy.istio.io/config";
/// Deprecated since Istio 1.21, still read: its tags come after ProxyConfig's.
const EXTRA_STAT_TAGS: &str = "sidecar.istio.io/extraStatTags";
const HISTOGRAM_BUCKETS: &str = "sidecar.istio.io/statsHistogramBuckets";

/// One `histogram_bucket_settings` entry: a stat name prefix and its buckets.
#[derive(Debug, PartialEq)]
pub struct Buckets {
    pub prefix: String,
    pub buckets: Vec<f64>,
}

/// What Istio makes of a pod's annotations: `stats_tags` (as JSON, the way
/// the template writes them) and `histogram_bucket_settings`.
#[derive(Debug)]
pub struct IstioStats {
    pub tags: Vec<serde_json::Value>,
    pub buckets: Vec<Buckets>,
}

/// The Envoy stats tag the bootstrap template writes for one `extraStatTags`
/// entry: `"regex": "({{ $tag }}=\\.=(.*?);\\.;)"`, unanchored.
pub fn istio_stats_tag(tag: &str) -> serde_json::Value {
    serde_json::json!({ "regex": format!("({tag}=\\.=(.*?);\\.;)"), "tag_name": tag })
}

/// Derives the stats settings from pod `annotations`. Where Istio only logs
/// a warning and carries on (buckets that are not JSON), this fails: the
/// sidecar would silently run with Envoy's default buckets.
pub fn from_annotations(annotations: &Value, file: &str) -> IstioStats {
    let get =
        |key: &str| annotations.get(key).map(|v| v.as_str().unwrap_or_else(|| panic!("{file}: {key} is a string")));
    // ProxyConfig's extraStatTags first, then the annotation's, empty entries
    // dropped, the first of each name kept.
    let mut names: Vec<String> = Vec::new();
    if let Some(text) = get(PROXY_CONFIG) {
        let proxy_config: Value =
            serde_yaml::from_str(text).unwrap_or_else(|e| panic!("{file}: {PROXY_CONFIG} is not YAML: {e}"));
        if let Some(list) = proxy_config.get("extraStatTags") {
            let list = list.as_sequence().unwrap_or_else(|| panic!("{file}: extraStatTags is a list"));
            names.extend(list.iter().map(|t| t.as_str().expect("extraStatTags entries are strings").to_owned()));
        }
    }
    if let Some(text) = get(EXTRA_STAT_TAGS) {
        names.extend(text.split(',').map(str::to_owned));
    }
    let mut tags: Vec<String> = Vec::new();
    for name in names {
        if !name.is_empty() && !tags.contains(&name) {
            tags.push(name);
        }
    }
    let mut buckets = Vec::new();
    if let Some(text) = get(HISTOGRAM_BUCKETS) {
        let map: std::collections::HashMap<String, Vec<f64>> = serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("{file}: {HISTOGRAM_BUCKETS} is not a JSON map of prefix to numbers: {e}"));
        buckets = map.into_iter().map(|(prefix, buckets)| Buckets { prefix, buckets }).collect();
        buckets.sort_by(|a: &Buckets, b: &Buckets| a.prefix.cmp(&b.prefix));
    }
    IstioStats { tags: tags.iter().map(|t| istio_stats_tag(t)).collect(), buckets }
}

/// The pod annotations a Deployment has once an overlay with the workload
/// component has rendered it (kustomize.rs's second overlay).
fn workload_annotations() -> Value {
    let deployment = object(crate::kustomize::other_install(), "Deployment");
    at(deployment, WORKLOAD_PATCH, "spec.template.metadata.annotations").clone()
}

/// envoy/envoy.yaml's `histogram_bucket_settings`, each a prefix match.
fn envoy_yaml_buckets(envoy: &Value) -> Vec<Buckets> {
    let f = "envoy/envoy.yaml";
    at(envoy, f, "stats_config.histogram_bucket_settings")
        .as_sequence()
        .expect("histogram_bucket_settings is a list")
        .iter()
        .map(|setting| {
            let matcher = at(setting, f, "match").as_mapping().unwrap();
            assert_eq!(matcher.len(), 1, "{f}: a bucket setting matches by `prefix` alone, as Istio's do: {setting:?}");
            Buckets {
                prefix: str_at(setting, f, "match.prefix").to_owned(),
                buckets: at(setting, f, "buckets").as_sequence().unwrap().iter().map(|b| b.as_f64().unwrap()).collect(),
            }
        })
        .collect()
}

#[test]
fn envoy_yaml_stats_tags_and_buckets_are_what_istio_makes_of_the_workload_annotations() {
    let istio = from_annotations(&workload_annotations(), WORKLOAD_PATCH);
    let envoy = envoy_config();
    let envoy_tags = to_json(at(&envoy, "envoy/envoy.yaml", "stats_config.stats_tags"));
    assert_eq!(
        envoy_tags,
        serde_json::Value::Array(istio.tags),
        "envoy/envoy.yaml's stats_tags must be exactly those Istio writes for {WORKLOAD_PATCH}'s extraStatTags"
    );
    assert_eq!(
        envoy_yaml_buckets(&envoy),
        istio.buckets,
        "envoy/envoy.yaml's histogram_bucket_settings must be those Istio writes for {WORKLOAD_PATCH}'s {HISTOGRAM_BUCKETS}"
    );
}

/// A misspelled prefix would leave a histogram on Envoy's default buckets,
/// and a missing tag would leave its label inside the metric name.
#[test]
fn the_annotations_name_every_label_and_every_histogram_the_filter_writes() {
    let istio = from_annotations(&workload_annotations(), WORKLOAD_PATCH);
    let tags: Vec<&str> = istio.tags.iter().map(|t| t["tag_name"].as_str().unwrap()).collect();
    assert_eq!(tags, LABELS, "{WORKLOAD_PATCH}: extraStatTags vs the filter's labels");
    let mut histograms: Vec<String> = Family::ALL
        .iter()
        .filter(|f| f.is_histogram())
        .flat_map(|f| [Direction::Inbound, Direction::Outbound].map(|d| format!("wasmcustom.{}", f.name(d))))
        .collect();
    histograms.sort();
    let prefixes: Vec<&str> = istio.buckets.iter().map(|b| b.prefix.as_str()).collect();
    assert_eq!(prefixes, histograms, "{WORKLOAD_PATCH}: {HISTOGRAM_BUCKETS} keys");
}

#[test]
fn a_deprecated_extra_stat_tags_annotation_adds_its_tags_after_proxy_config_s_once_each() {
    let annotations: Value = serde_yaml::from_str(
        "proxy.istio.io/config: |\n  extraStatTags: [b, a]\nsidecar.istio.io/extraStatTags: 'a,,c'\n",
    )
    .unwrap();
    let istio = from_annotations(&annotations, "test");
    let tags: Vec<&str> = istio.tags.iter().map(|t| t["tag_name"].as_str().unwrap()).collect();
    assert_eq!(tags, ["b", "a", "c"]);
    assert_eq!(istio.tags[0]["regex"], "(b=\\.=(.*?);\\.;)");
}

/// Istio's `stats_matcher` as its sidecar bootstrap writes it with no
/// inclusion option set: the template's own patterns and the ones
/// pkg/bootstrap/config.go always adds (`requiredEnvoyStatsMatcherInclusion*`).
fn istio_stats_matcher() -> Value {
    let mut patterns = vec!["prefix: 'reporter='".to_owned()];
    for prefix in ["cluster_manager", "listener_manager", "server", "cluster.xds-grpc", "wasm"] {
        patterns.push(format!("prefix: '{prefix}'"));
    }
    for suffix in ["rbac.allowed", "rbac.denied", "shadow_allowed", "shadow_denied"] {
        patterns.push(format!("suffix: '{suffix}'"));
    }
    patterns.push(r"safe_regex: {regex: 'vhost\..*\.route\..*'}".to_owned());
    patterns.push("prefix: component".to_owned());
    patterns.push("prefix: istio".to_owned());
    let list: String = patterns.iter().map(|p| format!("  - {p}\n")).collect();
    serde_yaml::from_str(&format!("inclusion_list:\n  patterns:\n{list}")).unwrap()
}

/// envoy.yaml's stats_config replaced by a sidecar's: Istio's stats
/// inclusion list, no default tags, and the tags and buckets derived from
/// the workload annotations (Istio's own built-in tags are anchored at
/// `^cluster`, `^http`, `^listener`, … or name stats grpc-guard never writes).
fn as_istio_sidecar(config: &mut Value) {
    let istio = from_annotations(&workload_annotations(), WORKLOAD_PATCH);
    let stats = &mut config["stats_config"];
    stats["use_all_default_tags"] = Value::Bool(false);
    stats["stats_tags"] = serde_yaml::to_value(&istio.tags).unwrap();
    stats["histogram_bucket_settings"] = Value::Sequence(
        istio
            .buckets
            .iter()
            .map(|b| {
                serde_yaml::from_str(&format!("{{match: {{prefix: '{}'}}, buckets: {:?}}}", b.prefix, b.buckets))
                    .unwrap()
            })
            .collect(),
    );
    stats["stats_matcher"] = istio_stats_matcher();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_with_the_workload_annotations_prints_grpc_guard_s_metrics_as_go_grpc_prometheus_names_them() {
    let upstream = Upstream::start().await;
    let (envoy, params) = start_edited_envoy("istio-stats", upstream.addr, "{}", as_istio_sidecar);
    let mut client =
        grpc_guard_demo::client(grpc_guard_demo::lazy_channel(&format!("http://{}", params.listen_addr())).unwrap());
    client.echo(EchoRequest { message: "hi".into(), ..EchoRequest::default() }).await.unwrap();

    let url = format!("http://{}/stats/prometheus", params.admin_addr());
    let labels = r#"grpc_service="grpcguard.demo.v1.Demo",grpc_method="Echo",grpc_type="unary""#;
    let handled = format!(r#"grpc_server_handled_total{{{labels},grpc_code="OK",exporter="grpc-guard"}} 1"#);
    // The annotation's buckets (2 ms is not among Envoy's defaults), at the
    // first stats flush.
    let bucket = format!(r#"grpc_server_handling_milliseconds_bucket{{{labels},exporter="grpc-guard",le="2"}}"#);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let text = loop {
        let (_, body) = http_get(&url, &[]).unwrap();
        let text = String::from_utf8(body).unwrap();
        if text.contains(&bucket) || std::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let grpc: Vec<&str> = text.lines().filter(|l| l.contains("grpc_")).collect();
    let shown = grpc.join("\n");
    assert!(grpc.contains(&handled.as_str()), "missing `{handled}` in:\n{shown}\n{}", envoy.log_text());
    assert!(grpc.iter().any(|l| l.starts_with(&bucket)), "missing `{bucket}` in:\n{shown}");
    for line in grpc.iter().filter(|l| !l.starts_with('#')) {
        let name = line.split('{').next().unwrap();
        assert!(!name.contains("grpc_service") && !name.ends_with('_'), "a label left in the name: {line}");
    }
    // Istio's inclusion list is in force: a stat it does not name is gone.
    assert!(!text.contains("envoy_http_downstream_rq_total"), "the stats matcher is not applied");
    drop(envoy);
}
