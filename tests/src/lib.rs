//! Test harnesses for grpc-guard.
//!
//! [`host`] runs the compiled filter (`grpc_guard.wasm`) inside a deterministic
//! proxy-wasm host, so the filter's behaviour can be tested stream by stream
//! without Envoy.

pub mod host;
