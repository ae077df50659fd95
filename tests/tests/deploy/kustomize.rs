//! The one-command install, `kubectl apply -k istio/overlays/example`: an
//! overlay holds one values file, istio/components/values writes the values
//! into istio/base, istio/components/workload gives the overlay's own
//! Deployments grpc-guard's pod annotations. Rendered with the real
//! `kubectl kustomize`: a second overlay, with other values and a Deployment
//! of its own, renders its values everywhere and nothing of the example's;
//! a values file without a value stops the render, naming it.

use std::path::{Path, PathBuf};

use serde_yaml::Value;

use crate::support::*;

const OTHER: &str = "a second overlay";
const NAMESPACE: &str = "payments";
const SERVICE: &str = "ledger-grpc";
const PORT: u64 = 9090;
const IMAGE: &str =
    "oci://ghcr.io/acme/grpc-guard@sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
const HEADER: &str = "x-ledger-key";
const DEPLOYMENT: &str = "ledger";

/// The second overlay's values: every field differs from the example's.
fn other_values(without: Option<&str>) -> String {
    let fields = [
        ("namespace", format!("  namespace: {NAMESPACE}\n")),
        ("workloadLabels", "  workloadLabels:\n    app.kubernetes.io/name: ledger\n    tier: api\n".to_owned()),
        ("service", format!("  service: {SERVICE}\n")),
        ("port", format!("  port: {PORT}\n")),
        ("image", format!("  image: {IMAGE}\n")),
        (
            "pluginConfig",
            format!(
                "  pluginConfig:\n    direction: inbound\n    metrics: {{methods: [\"acme.ledger.v1.Ledger/*\"]}}\n    dedup:\n      methods: [acme.ledger.v1.Ledger/Post]\n      header: {HEADER}\n"
            ),
        ),
    ];
    let spec: String =
        fields.iter().filter(|(name, _)| Some(*name) != without).map(|(_, text)| text.as_str()).collect();
    format!(
        "apiVersion: grpc-guard/v1\nkind: GrpcGuardValues\nmetadata:\n  name: grpc-guard-values\n  annotations:\n    config.kubernetes.io/local-config: \"true\"\nspec:\n{spec}"
    )
}

/// The user's own Deployment, with a pod annotation of its own.
const USER_DEPLOYMENT: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: ledger
  namespace: payments
spec:
  selector:
    matchLabels: {app.kubernetes.io/name: ledger, tier: api}
  template:
    metadata:
      labels: {app.kubernetes.io/name: ledger, tier: api}
      annotations:
        prometheus.io/scrape: \"true\"
    spec:
      containers:
      - name: ledger
        image: ghcr.io/acme/ledger:1.4.2
";

/// `dir` as kustomize accepts it from `from`: a relative path (kustomize
/// refuses absolute ones).
fn relative(from: &Path, dir: &Path) -> String {
    let from = from.canonicalize().unwrap();
    let up = "../".repeat(from.components().count() - 1);
    format!("{up}{}", dir.canonicalize().unwrap().display().to_string().trim_start_matches('/'))
}

/// An overlay in a scratch directory, as a user's copy of the example:
/// `values`, the repository's base and components, and the user's
/// Deployment.
fn write_overlay(name: &str, values: &str) -> PathBuf {
    write_overlay_with(name, values, "- deployment.yaml\n", "")
}

/// An overlay with `values`, the `resources` lines `more` after the base,
/// and `tail` at the end of its kustomization.yaml.
fn write_overlay_with(name: &str, values: &str, more: &str, tail: &str) -> PathBuf {
    let dir = scratch_dir(name);
    std::fs::write(dir.join("values.yaml"), values).unwrap();
    std::fs::write(dir.join("deployment.yaml"), USER_DEPLOYMENT).unwrap();
    let root = relative(&dir, &repo_file("istio"));
    std::fs::write(
        dir.join("kustomization.yaml"),
        format!(
            "resources:\n- values.yaml\n- {root}/base\n{more}components:\n- {root}/components/values\n- {root}/components/workload\n{tail}"
        ),
    )
    .unwrap();
    dir
}

/// The YAML blocks of README "Deploying on Istio" that are overlay patches
/// (`patches:`), without the list indentation.
fn readme_overlay_patches() -> Vec<String> {
    let readme = read("README.md");
    let start = readme.find("## Deploying on Istio").expect("README has \"Deploying on Istio\"");
    let section = &readme[start..start + readme[start..].find("### The OCI image").unwrap()];
    let mut blocks = Vec::new();
    let mut lines = section.lines();
    while let Some(line) = lines.next() {
        let Some(indent) = line.strip_suffix("```yaml").filter(|i| i.trim().is_empty()) else { continue };
        let block: String = lines
            .by_ref()
            .take_while(|l| l.trim() != "```")
            .map(|l| format!("{}\n", l.strip_prefix(indent).unwrap_or(l)))
            .collect();
        if block.starts_with("patches:") {
            blocks.push(block);
        }
    }
    blocks
}

/// The second overlay, rendered once per test run.
pub fn other_install() -> &'static [Value] {
    static RENDERED: std::sync::OnceLock<Vec<Value>> = std::sync::OnceLock::new();
    RENDERED.get_or_init(|| {
        let dir = write_overlay("overlay-other", &other_values(None));
        kustomize(&dir).unwrap_or_else(|e| panic!("kubectl kustomize {}:\n{e}", dir.display()))
    })
}

#[test]
fn a_second_overlay_renders_its_own_values_everywhere() {
    let objects = other_install();
    let kinds: Vec<&str> = objects.iter().map(|o| o["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.len(), 5, "the four objects and the Deployment, not the values: {kinds:?}");
    for o in objects {
        assert_eq!(str_at(o, OTHER, "metadata.namespace"), NAMESPACE, "{o:?}");
    }
    let labels: Value = serde_yaml::from_str("{app.kubernetes.io/name: ledger, tier: api}").unwrap();
    let plugin = object(objects, "WasmPlugin");
    assert_eq!(at(plugin, OTHER, "spec.selector.matchLabels"), &labels);
    assert_eq!(str_at(plugin, OTHER, "spec.url"), IMAGE);
    assert_eq!(str_at(plugin, OTHER, "spec.pluginConfig.metrics.methods.0"), "acme.ledger.v1.Ledger/*");
    let rule = object(objects, "DestinationRule");
    assert_eq!(str_at(rule, OTHER, "spec.host"), format!("{SERVICE}.{NAMESPACE}.svc.cluster.local"));
    assert_eq!(str_at(rule, OTHER, "spec.trafficPolicy.loadBalancer.consistentHash.httpHeaderName"), HEADER);
    let filter = object(objects, "EnvoyFilter");
    assert_eq!(at(filter, OTHER, "spec.workloadSelector.labels"), &labels);
    let route = at(filter, OTHER, "spec.configPatches")
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["applyTo"] == "HTTP_ROUTE")
        .expect("the route patch");
    assert_eq!(at(route, OTHER, "match.routeConfiguration.portNumber").as_u64(), Some(PORT), "a number, not a string");

    let config = to_json(at(plugin, OTHER, "spec.pluginConfig"));
    let parsed = grpc_guard::config::Config::parse(config.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("{OTHER}: the filter refuses pluginConfig: {e}"));
    assert_eq!(parsed.direction, grpc_guard::method::Direction::Inbound);

    let crds: Vec<serde_json::Value> = objects.iter().filter(|o| o["kind"] != "Deployment").map(to_json).collect();
    let (ok, output) = schema_check(&crds);
    assert!(ok, "{OTHER}: schema check failed:\n{output}");
}

/// Nothing of the example's values, and none of the base's placeholders, is
/// left anywhere in the second overlay's objects.
#[test]
fn a_second_overlay_keeps_no_example_value_and_no_placeholder() {
    let text: String = other_install().iter().map(|o| serde_yaml::to_string(o).unwrap()).collect();
    let example = read("istio/overlays/example/values.yaml");
    for leftover in ["grpc-demo", "50051", "registry.example.com", "idempotency-key", "grpcguard.demo"] {
        assert!(example.contains(leftover), "the example's values no longer hold {leftover}: update this test");
        assert!(!text.contains(leftover), "{OTHER} still carries the example's {leftover}:\n{text}");
    }
    for placeholder in ["NAMESPACE", "SERVICE", "WORKLOAD", "IMAGE", "DEDUP_HEADER", "grpc-guard.placeholder"] {
        assert!(!text.contains(placeholder), "{OTHER} still carries the placeholder {placeholder}:\n{text}");
    }
    assert!(!text.contains("portNumber: 0"), "{OTHER}: the port placeholder is left");
}

/// The workload component adds grpc-guard's two annotations to the
/// overlay's Deployment and leaves the Deployment's own alone.
#[test]
fn the_overlay_s_deployment_gets_grpc_guard_s_pod_annotations_and_keeps_its_own() {
    let deployment = object(other_install(), "Deployment");
    assert_eq!(str_at(deployment, OTHER, "metadata.name"), DEPLOYMENT);
    let annotations = at(deployment, OTHER, "spec.template.metadata.annotations").as_mapping().unwrap();
    let keys: Vec<&str> = annotations.keys().filter_map(Value::as_str).collect();
    for key in ["proxy.istio.io/config", "sidecar.istio.io/statsHistogramBuckets", "prometheus.io/scrape"] {
        assert!(keys.contains(&key), "{OTHER}: the Deployment's pod annotations lack {key}: {keys:?}");
    }
}

/// The kubectl route and the kustomize route give the pods the same
/// annotations.
#[test]
fn the_kubectl_patch_carries_the_kustomize_patch_s_annotations() {
    let path = "spec.template.metadata.annotations";
    let kubectl = "istio/components/workload/kubectl-patch.yaml";
    let component = "istio/components/workload/deployment-patch.yaml";
    assert_eq!(at(&yaml(kubectl), kubectl, path), at(&yaml(component), component, path));
    assert!(yaml(kubectl).get("metadata").is_none(), "{kubectl}: no name, so it patches any Deployment");
}

#[test]
fn a_values_file_without_a_value_fails_to_render_naming_it() {
    for field in ["namespace", "port", "pluginConfig"] {
        let dir = write_overlay(&format!("overlay-without-{field}"), &other_values(Some(field)));
        let error = kustomize(&dir).expect_err(&format!("an overlay without {field} must not render"));
        assert!(error.contains(&format!("spec.{field}")), "the error names spec.{field}: {error}");
    }
}

/// The README's overlay patches, each added to a copy of the example: they
/// render, and do what the README says they do.
#[test]
fn the_readme_s_overlay_patches_render_and_do_what_it_says() {
    let blocks = readme_overlay_patches();
    assert_eq!(blocks.len(), 2, "README: the PrometheusRule's removal and the WasmPlugin field: {blocks:?}");
    let example = read("istio/overlays/example/values.yaml");
    let render = |name: &str, block: &str| {
        let dir = write_overlay_with(name, &example, "", block);
        kustomize(&dir).unwrap_or_else(|e| panic!("README's patch does not render:\n{block}\n{e}"))
    };
    let without_rule = render("overlay-readme-0", &blocks[0]);
    let kinds: Vec<&str> = without_rule.iter().map(|o| o["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.len(), 3, "{kinds:?}");
    assert!(!kinds.contains(&"PrometheusRule"), "README's first patch leaves the PrometheusRule out: {kinds:?}");

    let with_secret = render("overlay-readme-1", &blocks[1]);
    let plugin = object(&with_secret, "WasmPlugin");
    assert_eq!(str_at(plugin, "README's patch", "spec.imagePullSecret"), "registry-credentials");
    let (ok, output) = schema_check(&with_secret.iter().map(to_json).collect::<Vec<_>>());
    assert!(ok, "{output}");
}
