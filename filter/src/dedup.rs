//! Idempotency keys: the table that lets a retried unary call run upstream at
//! most once and gives every retry the first call's answer.
//!
//! The table lives in proxy-wasm shared data, the only state Envoy's worker
//! threads share. Shared data has no delete and no listing, so the table is a
//! fixed set of `max_entries` slots, each one shared-data key; a call's key
//! hashes to a slot and its next few neighbours (linear probing); expired
//! entries are reused lazily. Every write is a compare-and-swap on the slot
//! ([`crate::shared`]), so two workers racing on one key cannot both claim it.
//!
//! This module knows nothing of proxy-wasm: the store is
//! [`crate::shared::SharedStore`], shared data in the filter and a plain map
//! in the tests. What a keyed call does with the table is [`crate::call`]'s.

use sha2::{Digest as _, Sha256};
use thiserror::Error;

use crate::config::DedupConfig;
use crate::shared::{self, Decision, SharedStore, StoreError};
use crate::status::GrpcStatus;

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

/// SHA-256 digest: of the key material (scope, method, idempotency key), and
/// of a request message. A cryptographic hash, because a collision would hand
/// one caller another caller's answer.
pub type Digest = [u8; 32];

/// The key's identity: length-prefixed parts (the scope values, the method,
/// the key itself), so ("ab","c") and ("a","bc") differ.
pub fn digest(parts: &[&[u8]]) -> Digest {
    let mut h = Sha256::new();
    for part in parts {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.finalize().into()
}

/// The fingerprint of a request body, fed chunk by chunk as the body streams
/// through: a retry replays only if its whole body has the first call's.
#[derive(Clone, Debug, Default)]
pub struct Fingerprint(Sha256);

impl Fingerprint {
    pub fn update(&mut self, chunk: &[u8]) {
        self.0.update(chunk);
    }

    pub fn finish(self) -> Digest {
        self.0.finalize().into()
    }

    /// The fingerprint of a body seen whole.
    pub fn of(body: &[u8]) -> Digest {
        Sha256::digest(body).into()
    }
}

/// Slots probed after the home slot.
pub const PROBES: u32 = 4;

/// Most attempts at a compare-and-swap before giving up on a busy slot.
const CAS_ATTEMPTS: usize = 4;

/// A kept answer, replayed to every retry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The first call's status.
    pub status: GrpcStatus,
    /// The response body as it was sent: gRPC frames.
    pub body: Vec<u8>,
    /// Response trailers (or, for a trailers-only answer, its `grpc-*`
    /// headers), `grpc-status` and `grpc-message` included.
    pub trailers: Vec<(String, Vec<u8>)>,
}

/// One slot's content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Free,
    /// A first call is running; `owner` tells its stream apart from others.
    InFlight {
        key: Digest,
        owner: u64,
        expires_ns: u64,
    },
    /// The first call finished. `answer` is `None` when it was too large to
    /// keep: a retry is told the call already ran.
    Done {
        key: Digest,
        expires_ns: u64,
        fingerprint: Digest,
        answer: Option<Answer>,
    },
}

impl Entry {
    fn key(&self) -> Option<&Digest> {
        match self {
            Entry::Free => None,
            Entry::InFlight { key, .. } | Entry::Done { key, .. } => Some(key),
        }
    }

    fn live(&self, now_ns: u64) -> bool {
        match self {
            Entry::Free => false,
            Entry::InFlight { expires_ns, .. } | Entry::Done { expires_ns, .. } => *expires_ns > now_ns,
        }
    }

    /// Binary form stored in a slot. Free is empty.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Entry::Free => {}
            Entry::InFlight { key, owner, expires_ns } => {
                out.push(1);
                out.extend_from_slice(key);
                out.extend_from_slice(&owner.to_le_bytes());
                out.extend_from_slice(&expires_ns.to_le_bytes());
            }
            Entry::Done { key, expires_ns, fingerprint, answer } => {
                out.push(2);
                out.extend_from_slice(key);
                out.extend_from_slice(&expires_ns.to_le_bytes());
                out.extend_from_slice(fingerprint);
                if let Some(a) = answer {
                    out.push(1);
                    out.extend_from_slice(&a.status.code().to_le_bytes());
                    put_bytes(&mut out, &a.body);
                    out.extend_from_slice(&(a.trailers.len() as u32).to_le_bytes());
                    for (name, value) in &a.trailers {
                        put_bytes(&mut out, name.as_bytes());
                        put_bytes(&mut out, value);
                    }
                } else {
                    out.push(0);
                }
            }
        }
        out
    }

    /// Reads a slot; anything unreadable (another version's format, a torn
    /// value) is treated as free rather than trusted.
    pub fn decode(bytes: &[u8]) -> Entry {
        Reader(bytes).entry().unwrap_or(Entry::Free)
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn digest(&mut self) -> Option<Digest> {
        self.take(32)?.try_into().ok()
    }
    fn bytes(&mut self) -> Option<Vec<u8>> {
        let n = usize::try_from(self.u32()?).ok()?;
        Some(self.take(n)?.to_vec())
    }
    fn entry(&mut self) -> Option<Entry> {
        if self.0.is_empty() {
            return Some(Entry::Free);
        }
        let entry = match self.u8()? {
            1 => Entry::InFlight { key: self.digest()?, owner: self.u64()?, expires_ns: self.u64()? },
            2 => {
                let key = self.digest()?;
                let expires_ns = self.u64()?;
                let fingerprint = self.digest()?;
                let answer = match self.u8()? {
                    0 => None,
                    _ => {
                        let status = GrpcStatus::from_code(self.u32()?)?;
                        let body = self.bytes()?;
                        let count = self.u32()?;
                        let mut trailers = Vec::new();
                        for _ in 0..count {
                            let name = String::from_utf8(self.bytes()?).ok()?;
                            trailers.push((name, self.bytes()?));
                        }
                        Some(Answer { status, body, trailers })
                    }
                };
                Entry::Done { key, expires_ns, fingerprint, answer }
            }
            _ => return None,
        };
        self.0.is_empty().then_some(entry)
    }
}

/// The shared-data key of one slot.
fn slot_key(slot: u32) -> String {
    format!("grpc_guard.dedup.{slot}")
}

/// What a call finds under its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// First call: this stream owns the key; forward it. `evicted` when an
    /// expired entry of another key made room.
    Claimed { slot: u32, evicted: bool },
    /// The first call is still running: answer ABORTED.
    InFlight,
    /// The first call finished: compare request fingerprints, then replay.
    Done { fingerprint: Digest, answer: Option<Answer> },
    /// Every probed slot holds a live entry of another key.
    Full,
    /// Other workers kept changing the slots: answer ABORTED, the retry will
    /// find the key settled.
    Contended,
}

/// The table's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DedupTable {
    pub max_entries: u32,
    pub ttl_ns: u64,
}

impl DedupTable {
    pub fn new(config: &DedupConfig) -> DedupTable {
        DedupTable { max_entries: config.max_entries, ttl_ns: u64::try_from(config.ttl.as_nanos()).unwrap_or(u64::MAX) }
    }

    fn probe_slots(&self, key: &Digest) -> impl Iterator<Item = u32> {
        let home = u64::from_le_bytes([key[0], key[1], key[2], key[3], key[4], key[5], key[6], key[7]]);
        let n = u64::from(self.max_entries.max(1));
        let home = home % n;
        let max = self.max_entries.max(1);
        (0..PROBES.min(max)).map(move |i| ((home + u64::from(i)) % n) as u32)
    }

    /// Finds `key`, or claims a slot for it as in flight until
    /// `in_flight_until_ns` (the call's deadline, so a stream that dies
    /// without finishing frees its key then).
    pub fn lookup_or_claim(
        &self,
        store: &mut (impl SharedStore + ?Sized),
        key: &Digest,
        owner: u64,
        now_ns: u64,
        in_flight_until_ns: u64,
    ) -> Lookup {
        for _ in 0..CAS_ATTEMPTS {
            let slots: Vec<(u32, Entry, Option<u32>)> = self
                .probe_slots(key)
                .map(|slot| {
                    let (bytes, cas) = store.get(&slot_key(slot));
                    (slot, Entry::decode(bytes.as_deref().unwrap_or_default()), cas)
                })
                .collect();
            for (_, entry, _) in &slots {
                if entry.key() == Some(key) && entry.live(now_ns) {
                    return match entry {
                        Entry::InFlight { .. } => Lookup::InFlight,
                        Entry::Done { fingerprint, answer, .. } => {
                            Lookup::Done { fingerprint: *fingerprint, answer: answer.clone() }
                        }
                        Entry::Free => Lookup::Contended,
                    };
                }
            }
            let Some((slot, old, cas)) = slots.iter().find(|(_, e, _)| !e.live(now_ns)) else {
                return Lookup::Full;
            };
            let claim = Entry::InFlight { key: *key, owner, expires_ns: in_flight_until_ns };
            match store.set(&slot_key(*slot), &claim.encode(), *cas) {
                Ok(()) => {
                    let evicted = old.key().is_some_and(|k| k != key);
                    return Lookup::Claimed { slot: *slot, evicted };
                }
                Err(StoreError::CasMismatch) => continue,
                Err(StoreError::Failed) => return Lookup::Contended,
            }
        }
        Lookup::Contended
    }

    /// Ends this stream's claim on `slot`: `Some(done)` keeps the result for
    /// `ttl`, `None` frees the key so a retry runs. Does nothing if the slot
    /// is no longer this stream's claim (it expired and was taken).
    pub fn settle(
        &self,
        store: &mut (impl SharedStore + ?Sized),
        slot: u32,
        key: &Digest,
        owner: u64,
        result: Option<Settled>,
        now_ns: u64,
    ) {
        let next = match result {
            Some(s) => Entry::Done {
                key: *key,
                expires_ns: now_ns.saturating_add(self.ttl_ns),
                fingerprint: s.fingerprint,
                answer: s.answer,
            },
            None => Entry::Free,
        };
        let encoded = next.encode();
        let _ = shared::update(store, &slot_key(slot), CAS_ATTEMPTS, |bytes| match Entry::decode(bytes) {
            Entry::InFlight { key: k, owner: o, .. } if &k == key && o == owner => {
                Decision::Write(encoded.as_slice().into(), ())
            }
            _ => Decision::Keep(()),
        });
    }

    /// Creates every slot that does not exist yet, so that workers race on
    /// them with compare-and-swap ([`crate::shared::create`]). Runs at
    /// configure time, before any call.
    pub fn create_slots(&self, store: &mut (impl SharedStore + ?Sized)) {
        for slot in 0..self.max_entries {
            shared::create(store, &slot_key(slot));
        }
    }
}

/// A finished first call, as kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settled {
    pub fingerprint: Digest,
    pub answer: Option<Answer>,
}

/// Statuses a retry would get again, so keeping them is safe (DESIGN §3.5);
/// every other status releases the key and the retry runs.
pub fn is_kept_status(status: GrpcStatus) -> bool {
    use GrpcStatus::*;
    match status {
        Ok | InvalidArgument | NotFound | AlreadyExists | PermissionDenied | FailedPrecondition | OutOfRange
        | Unimplemented | Unauthenticated => true,
        Cancelled | Unknown | DeadlineExceeded | ResourceExhausted | Aborted | Internal | Unavailable | DataLoss => {
            false
        }
    }
}

/// Why an idempotency key header is refused.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum KeyError {
    #[error("is required for this method and missing")]
    Missing,
    #[error("is empty")]
    Empty,
    #[error("is {0} bytes; at most 255 are allowed")]
    TooLong(usize),
    #[error("must be printable ASCII")]
    NotPrintable,
}

/// Checks an idempotency key header value.
pub fn check_key(value: Option<&[u8]>, required: bool) -> Result<Option<&[u8]>, KeyError> {
    match value {
        None if required => Err(KeyError::Missing),
        None => Ok(None),
        Some([]) => Err(KeyError::Empty),
        Some(v) if v.len() > 255 => Err(KeyError::TooLong(v.len())),
        Some(v) if !v.iter().all(|b| (0x21..0x7f).contains(b)) => Err(KeyError::NotPrintable),
        Some(v) => Ok(Some(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::testing::MapStore;
    use proptest::prelude::*;
    use std::collections::HashMap;

    const TABLE: DedupTable = DedupTable { max_entries: 64, ttl_ns: 1_000 };

    fn key(n: u8) -> Digest {
        digest(&[b"tenant", b"/pkg.Svc/Create", &[n]])
    }

    fn ok_answer() -> Answer {
        Answer {
            status: GrpcStatus::Ok,
            body: vec![0, 0, 0, 0, 1, 7],
            trailers: vec![("grpc-status".into(), b"0".to_vec())],
        }
    }

    #[test]
    fn entries_round_trip_through_their_encoding() {
        for e in [
            Entry::Free,
            Entry::InFlight { key: key(1), owner: 9, expires_ns: 77 },
            Entry::Done { key: key(2), expires_ns: 5, fingerprint: key(3), answer: None },
            Entry::Done { key: key(2), expires_ns: 5, fingerprint: key(3), answer: Some(ok_answer()) },
        ] {
            assert_eq!(Entry::decode(&e.encode()), e);
        }
        assert_eq!(Entry::decode(&[2, 1, 2]), Entry::Free, "a torn value is not trusted");
    }

    #[test]
    fn first_call_claims_then_duplicates_see_in_flight_then_the_answer() {
        let mut store = MapStore::default();
        let k = key(1);
        let Lookup::Claimed { slot, evicted: false } = TABLE.lookup_or_claim(&mut store, &k, 1, 0, 500) else {
            panic!("first call must claim")
        };
        assert_eq!(TABLE.lookup_or_claim(&mut store, &k, 2, 10, 500), Lookup::InFlight);
        let fp = digest(&[b"request"]);
        TABLE.settle(&mut store, slot, &k, 1, Some(Settled { fingerprint: fp, answer: Some(ok_answer()) }), 20);
        assert_eq!(
            TABLE.lookup_or_claim(&mut store, &k, 3, 30, 500),
            Lookup::Done { fingerprint: fp, answer: Some(ok_answer()) }
        );
    }

    #[test]
    fn released_key_runs_again() {
        let mut store = MapStore::default();
        let k = key(1);
        let Lookup::Claimed { slot, .. } = TABLE.lookup_or_claim(&mut store, &k, 1, 0, 500) else { panic!() };
        TABLE.settle(&mut store, slot, &k, 1, None, 10);
        assert!(matches!(TABLE.lookup_or_claim(&mut store, &k, 2, 20, 500), Lookup::Claimed { .. }));
    }

    #[test]
    fn kept_answers_expire_after_the_ttl_and_dead_claims_after_their_deadline() {
        let mut store = MapStore::default();
        let k = key(1);
        let Lookup::Claimed { slot, .. } = TABLE.lookup_or_claim(&mut store, &k, 1, 0, 100) else { panic!() };
        assert!(
            matches!(TABLE.lookup_or_claim(&mut store, &k, 2, 101, 300), Lookup::Claimed { .. }),
            "dead claim freed"
        );
        TABLE.settle(&mut store, slot, &k, 1, None, 150);
        assert_eq!(
            TABLE.lookup_or_claim(&mut store, &k, 3, 200, 300),
            Lookup::InFlight,
            "the old owner cannot settle a claim it lost"
        );
    }

    #[test]
    fn table_reports_full_when_every_probed_slot_is_live() {
        let mut store = MapStore::default();
        let small = DedupTable { max_entries: 4, ttl_ns: 1_000 };
        for n in 0..4 {
            assert!(matches!(small.lookup_or_claim(&mut store, &key(n), 1, 0, 500), Lookup::Claimed { .. }));
        }
        assert_eq!(small.lookup_or_claim(&mut store, &key(9), 1, 0, 500), Lookup::Full);
        assert!(matches!(
            small.lookup_or_claim(&mut store, &key(9), 1, 600, 900),
            Lookup::Claimed { evicted: true, .. }
        ));
    }

    #[test]
    fn keys_are_checked_like_the_contract_says() {
        assert_eq!(check_key(None, true), Err(KeyError::Missing));
        assert_eq!(check_key(None, false), Ok(None));
        assert_eq!(check_key(Some(b""), false), Err(KeyError::Empty));
        assert_eq!(check_key(Some(&[b'a'; 256]), false), Err(KeyError::TooLong(256)));
        assert_eq!(check_key(Some(b"a b"), false), Err(KeyError::NotPrintable));
        assert_eq!(check_key(Some(b"order-42"), true), Ok(Some(&b"order-42"[..])));
    }

    #[test]
    fn fingerprint_of_the_whole_equals_the_streamed_one() {
        let mut streamed = Fingerprint::default();
        streamed.update(b"hello ");
        streamed.update(b"world");
        assert_eq!(Fingerprint::of(b"hello world"), streamed.finish());
        assert_ne!(Fingerprint::of(b"hello world"), Fingerprint::of(b"hello worle"));
    }

    #[test]
    fn only_answers_a_retry_would_get_again_are_kept() {
        let kept: Vec<&str> = GrpcStatus::ALL.iter().filter(|s| is_kept_status(**s)).map(|s| s.go_name()).collect();
        assert_eq!(
            kept,
            [
                "OK",
                "InvalidArgument",
                "NotFound",
                "AlreadyExists",
                "PermissionDenied",
                "FailedPrecondition",
                "OutOfRange",
                "Unimplemented",
                "Unauthenticated"
            ]
        );
    }

    #[test]
    fn an_entry_with_a_status_out_of_range_is_not_trusted() {
        let done = Entry::Done { key: key(2), expires_ns: 5, fingerprint: key(3), answer: Some(ok_answer()) };
        let mut bytes = done.encode();
        // The status follows the tag, key, expiry, fingerprint and answer flag.
        let at = 1 + 32 + 8 + 32 + 1;
        bytes[at..at + 4].copy_from_slice(&17u32.to_le_bytes());
        assert_eq!(Entry::decode(&bytes), Entry::Free);
    }

    #[test]
    fn digest_separates_its_parts() {
        assert_ne!(digest(&[b"ab", b"c"]), digest(&[b"a", b"bc"]));
    }

    /// Reference model: what each key's state should be.
    #[derive(Clone, Debug, PartialEq)]
    enum Model {
        InFlight {
            owner: u64,
            until: u64,
        },
        Done {
            until: u64,
        },
        /// A claim settled after it expired: kept if nobody took the slot in
        /// between, gone otherwise. The next call tells.
        DoneOrGone {
            until: u64,
        },
    }

    #[derive(Clone, Debug)]
    enum Op {
        Call { key: u8, owner: u64 },
        Finish { key: u8, keep: bool },
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..6, 1u64..1000).prop_map(|(key, owner)| Op::Call { key, owner }),
            (0u8..6, any::<bool>()).prop_map(|(key, keep)| Op::Finish { key, keep }),
            (1u64..400).prop_map(Op::Advance),
        ]
    }

    proptest! {
        /// Random calls, completions, failures and clock jumps on a table so
        /// small that keys collide in their slots: the table must agree with
        /// the reference model whenever it has room, and never let two
        /// callers own one key.
        #[test]
        fn table_agrees_with_a_reference_model(ops in proptest::collection::vec(op(), 1..60)) {
            let table = DedupTable { max_entries: 8, ttl_ns: 300 };
            let mut store = MapStore::default();
            let mut model: HashMap<u8, Model> = HashMap::new();
            let mut claims: HashMap<u8, (u32, u64)> = HashMap::new();
            let mut now = 0u64;
            for op in ops {
                match op {
                    Op::Advance(d) => now += d,
                    Op::Call { key: k, owner } => {
                        let expected = match model.get(&k) {
                            Some(Model::InFlight { until, .. }) if *until > now => Some("in_flight"),
                            Some(Model::Done { until }) if *until > now => Some("done"),
                            Some(Model::DoneOrGone { until }) if *until > now => Some("done_or_gone"),
                            _ => None,
                        };
                        let got = table.lookup_or_claim(&mut store, &key(k), owner, now, now + 200);
                        match (&got, expected) {
                            (Lookup::InFlight, Some("in_flight"))
                            | (Lookup::Done { .. }, Some("done"))
                            | (Lookup::Done { .. }, Some("done_or_gone")) => {}
                            (Lookup::Claimed { slot, .. }, Some("done_or_gone")) => {
                                model.insert(k, Model::InFlight { owner, until: now + 200 });
                                claims.insert(k, (*slot, owner));
                            }
                            (Lookup::Claimed { slot, .. }, None) => {
                                model.insert(k, Model::InFlight { owner, until: now + 200 });
                                claims.insert(k, (*slot, owner));
                            }
                            // A full table may refuse a new key; never a known one.
                            (Lookup::Full, None) => {}
                            (got, expected) => prop_assert!(false, "key {} at {}: got {:?}, model says {:?}", k, now, got, expected),
                        }
                    }
                    Op::Finish { key: k, keep } => {
                        if let Some((slot, owner)) = claims.remove(&k) {
                            let result = keep.then(|| Settled { fingerprint: key(99), answer: None });
                            table.settle(&mut store, slot, &key(k), owner, result, now);
                            if let Some(Model::InFlight { owner: o, until }) = model.get(&k).cloned() {
                                // A live claim is settled for sure; an expired one
                                // only if its slot was not reused meanwhile.
                                match (o == owner, until > now, keep) {
                                    (true, true, true) => { model.insert(k, Model::Done { until: now + 300 }); }
                                    (true, true, false) => { model.remove(&k); }
                                    (true, false, true) => { model.insert(k, Model::DoneOrGone { until: now + 300 }); }
                                    (true, false, false) => { model.remove(&k); }
                                    (false, _, _) => {}
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
