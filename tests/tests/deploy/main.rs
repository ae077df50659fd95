//! Deployment: what `istio/` and `make oci` ship, checked the way a cluster
//! and an on-call engineer would meet them. The kustomize install is
//! rendered with the real `kubectl kustomize`, for the example's values and
//! for others; the Istio and Prometheus Operator manifests it renders are
//! parsed and validated against the published CRD schemas; the
//! stats settings Istio derives from the workload annotations and the replay
//! hop Istio needs are envoy/envoy.yaml's, and
//! a retry in a real Envoy runs once with and without the replay hop; the
//! alert rules pass promtool's checks and unit tests; the OCI image goes
//! through a real local registry and comes back as the same `.wasm`; and a
//! real Prometheus, scraping a real Envoy running the filter, sees the alerts
//! fire, and keeps grpc-guard's series apart from an application's own in
//! Istio's merged scrape.
//!
//! Every tool comes from `make setup` (scripts/setup.d/deploy.sh); a missing
//! one fails its test with the command to run, never skips it.

mod support;

mod alerts;
mod dashboard;
mod etcd;
mod istio_stats;
mod kustomize;
mod manifests;
mod merged;
mod oci;
mod prometheus;
mod replay;
