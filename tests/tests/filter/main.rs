//! The filter's behaviour, driven through the release `.wasm` on the
//! deterministic proxy-wasm host (`grpc_guard_tests::host`): whole calls with
//! headers, bodies cut into arbitrary chunks, trailers, resets and a fake
//! clock. Each test checks what an operator would notice: the stat names and
//! values Envoy exports, the JSON log line, the filter-state status an access
//! log prints, and the reply a client gets.
//!
//! Every test starts its own `Host` (fresh metrics and shared data, like a
//! fresh Envoy); the module itself is compiled once per test process.

mod support;

mod config;
mod deadline;
mod dedup;
mod fuel;
mod logs;
mod messages;
mod metrics;
mod passthrough;
mod robustness;
mod status;
