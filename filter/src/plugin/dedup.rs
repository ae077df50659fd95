//! The idempotency-key glue: reading the key and its scope from the host,
//! the dedup table over proxy-wasm shared data, and the replay of a kept
//! answer. Decisions are [`crate::dedup`]'s.
//!
//! Replaying an OK answer needs a second hop inside Envoy: a local reply to a
//! gRPC request is always trailers-only, so it cannot carry a message. The
//! retry is marked with [`REPLAY_HEADER`] and given a non-gRPC content type;
//! the route that matches the header sends it to an internal listener that
//! answers a plain 200 (`envoy/envoy.yaml`). On the way back this filter turns
//! that answer into the kept one: gRPC content type, the kept message, the
//! kept trailers, and `grpc-guard-replayed: true`.

use proxy_wasm::hostcalls;
use proxy_wasm::types::{MapType, Status};

use crate::config::{DedupConfig, ScopePart};
use crate::dedup::{digest, Answer, DedupTable, Digest, SlotStore, StoreError};

/// Marks a retry being replayed; stripped from every client request so a
/// client cannot reach the replay route itself.
pub const REPLAY_HEADER: &str = "x-grpc-guard-replay";
/// Initial metadata on every replayed answer.
pub const REPLAYED_HEADER: &str = "grpc-guard-replayed";
/// Put in front of the marked retry's path, so that no service method can
/// ever match it.
pub const REPLAY_PATH_PREFIX: &str = "/grpc-guard.replay";
/// Content type of the marked retry on its way to the internal listener.
pub const REPLAY_CONTENT_TYPE: &str = "application/x-grpc-guard-replay";

fn slot_key(slot: u32) -> String {
    format!("grpc_guard.dedup.{slot}")
}

/// The table's slots in shared data, one key each.
pub struct SharedSlots;

impl SlotStore for SharedSlots {
    fn get(&mut self, slot: u32) -> (Vec<u8>, Option<u32>) {
        match hostcalls::get_shared_data(&slot_key(slot)) {
            Ok((value, cas)) => (value.unwrap_or_default(), cas),
            Err(_) => (Vec::new(), None),
        }
    }

    fn set(&mut self, slot: u32, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        match hostcalls::set_shared_data(&slot_key(slot), Some(value), cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(StoreError::CasMismatch),
            Err(_) => Err(StoreError::Failed),
        }
    }
}

/// Creates every slot that does not exist yet. Envoy accepts any cas for a
/// missing key, so a slot must exist before two workers can race on it with
/// compare-and-swap; at configure time no call is running yet.
pub fn create_slots(config: &DedupConfig) {
    for slot in 0..config.max_entries {
        if matches!(hostcalls::get_shared_data(&slot_key(slot)), Ok((None, _))) {
            let _ = hostcalls::set_shared_data(&slot_key(slot), Some(b""), None);
        }
    }
}

pub fn table(config: &DedupConfig) -> DedupTable {
    DedupTable { max_entries: config.max_entries, ttl_ns: u64::try_from(config.ttl.as_nanos()).unwrap_or(u64::MAX) }
}

/// The key's identity: the scope values, the method and the key itself.
pub fn key_digest(config: &DedupConfig, full_name: &str, key: &[u8]) -> Digest {
    let values: Vec<Vec<u8>> = config
        .scope
        .iter()
        .map(|part| match part {
            ScopePart::SourcePrincipal => {
                hostcalls::get_property(vec!["source", "principal"]).ok().flatten().unwrap_or_default()
            }
            ScopePart::Header(name) => {
                hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name).ok().flatten().unwrap_or_default()
            }
        })
        .collect();
    let mut parts: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
    parts.push(full_name.as_bytes());
    parts.push(key);
    digest(&parts)
}

/// What the first call of a key collects to keep.
pub struct FirstCall {
    pub slot: u32,
    pub owner: u64,
    pub key: Digest,
    pub request: sha2::Sha256,
    pub response: Vec<u8>,
    pub too_large: bool,
    pub trailers: Vec<(String, Vec<u8>)>,
}

/// Where a keyed call stands.
pub enum Phase {
    /// This call runs upstream and its answer will be kept.
    First(FirstCall),
    /// The key's first call finished; the whole request is awaited to compare
    /// its fingerprint.
    Verify { fingerprint: Digest, answer: Option<Answer> },
    /// An OK answer is being replayed through the second hop.
    Replay(Answer),
}

/// The `grpc-status`/`grpc-message` pairs of a trailers-only answer, kept in
/// place of trailers.
pub fn status_headers() -> Vec<(String, Vec<u8>)> {
    ["grpc-status", "grpc-message"]
        .iter()
        .filter_map(|name| {
            hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, name)
                .ok()
                .flatten()
                .map(|v| ((*name).to_owned(), v))
        })
        .collect()
}
