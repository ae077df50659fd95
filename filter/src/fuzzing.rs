//! The bodies of the fuzz targets: one function per parser or decoder that
//! sees bytes from outside (a client, the upstream, Envoy's configuration,
//! shared data another worker wrote), each checking that nothing panics and
//! that the promises its module documents hold, and panicking when one does
//! not.
//!
//! cargo-fuzz runs them under libFuzzer (`fuzz/fuzz_targets/`, `make fuzz`);
//! the unit tests replay the committed seed corpus (`fuzz/corpus/`) and any
//! crash saved under `fuzz/artifacts/` through the same functions on stable
//! Rust, so `make test` keeps every past crash fixed. Compiled only for tests
//! and with the `fuzzing` feature: the shipped `.wasm` has none of it.
//!
//! Each body splits its input itself: at most a few leading control bytes,
//! then the outside value, so a seed is a real header, body, path or table
//! entry. Each body's layout is in its doc comment.

// A broken invariant is reported by panicking: that is the whole point here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod config;
mod deadline;
mod dedup;
mod frames;
mod method;
pub(crate) mod status;

pub use config::config;
pub use deadline::grpc_timeout;
pub use dedup::{dedup_key, dedup_table};
pub use frames::frames;
pub use method::method;
pub use status::status;

use std::time::Duration;

/// A target's body: panics when an invariant breaks on `data`.
pub type Body = fn(&[u8]);

/// Every target: the name of its `fuzz/fuzz_targets/<name>.rs` and of its
/// corpus directory, and its body.
pub const TARGETS: [(&str, Body); 7] = [
    ("config", config),
    ("grpc_timeout", grpc_timeout),
    ("frames", frames),
    ("method", method),
    ("status", status),
    ("dedup_key", dedup_key),
    ("dedup_table", dedup_table),
];

/// Reads control values off the front of an input; past its end, zeros.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }

    fn byte(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0; N];
        let bytes = self.take(N);
        out[..bytes.len()].copy_from_slice(bytes);
        out
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    fn duration(&mut self) -> Duration {
        Duration::new(self.u64(), self.u32() % 1_000_000_000)
    }

    fn rest(self) -> &'a [u8] {
        self.0
    }
}

#[cfg(test)]
mod tests;
