//! Test harnesses for grpc-guard.
//!
//! [`host`] runs the compiled filter (`grpc_guard.wasm`) inside a deterministic
//! proxy-wasm host, so the filter's behaviour can be tested stream by stream
//! without Envoy. [`e2e`] starts the demo service and a real Envoy for the
//! end-to-end and deployment tests.

pub mod e2e;
/// The etcd cluster the dedup store's tests run on.
pub use grpc_guard_demo::etcd;
pub mod host;
pub mod soak;
