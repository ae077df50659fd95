//! The dedup table on etcd (`dedup.store: "etcd"`): the same entries and
//! rules as the shared-data table ([`crate::dedup`]), kept where every
//! replica and every restart of every Envoy finds them.
//!
//! Each key is one etcd key, `prefix` + the hex of its digest. Its value is
//! an [`Entry`]: the state, the claim's owner, the claim's and the entry's
//! expiry, the request fingerprint and, once kept, the answer. A call talks
//! to etcd through Envoy's gRPC callouts (etcd's own gRPC API, `KV.Txn` and
//! `Lease.LeaseGrant`), and its request is paused only while its claim is in
//! flight:
//!
//! - **claim**, one transaction ([`claim_txn`]): if the key was never
//!   created, put the in-flight entry under the worker's lease; otherwise
//!   return the existing entry. One round trip answers a first call, a
//!   retry to replay, a duplicate in flight and a key that may have run.
//!   An entry that has expired but not yet been collected by its lease is
//!   taken over by a second transaction that compares its revision
//!   ([`take_over_txn`]).
//! - **settle**, one transaction ([`settle_txn`]) when the call ends, not
//!   waited for: if the key still holds this call's in-flight entry (byte
//!   for byte: the owner is in it), replace it with the outcome (or delete
//!   it when the call provably did not run).
//! - **lease**: entries are put under a lease that outlives them, granted
//!   per worker and used for many claims ([`LeaseWindow`]), so keys leave
//!   etcd by themselves; the entry's own expiry is what the rules read.
//!
//! This module builds and reads those messages; it knows nothing of
//! proxy-wasm. What a call does with them is [`crate::call`]'s.

use std::time::Duration;

use crate::dedup::{decode_answer, encode_answer, Answer, Digest, Lookup, Outcome, State};
use crate::protowire::write::{put_bytes, put_uint};
use crate::protowire::{fields, Value, WireError};

/// etcd's KV service and its transaction method.
pub const KV_SERVICE: &str = "etcdserverpb.KV";
pub const TXN: &str = "Txn";
/// etcd's read of a key (used when etcd refuses writes: its database full).
pub const RANGE: &str = "Range";
/// etcd's lease service and its grant method.
pub const LEASE_SERVICE: &str = "etcdserverpb.Lease";
pub const LEASE_GRANT: &str = "LeaseGrant";

/// etcd's default `--max-request-bytes`.
pub const DEFAULT_MAX_REQUEST_BYTES: u64 = 1_572_864;
/// What a claim or settle transaction adds to the entry it carries: the key
/// twice, the in-flight entry it compares, the framing.
pub const TXN_OVERHEAD: u64 = 1024;

/// The etcd store's settings (`dedup.etcd`).
#[derive(Clone, Debug, PartialEq)]
pub struct EtcdConfig {
    /// The Envoy cluster that reaches etcd's client port (HTTP/2).
    pub cluster: String,
    /// Put before every key.
    pub prefix: String,
    /// How long one request to etcd may take.
    pub timeout: Duration,
    /// The leases entries are put under.
    pub lease: LeaseWindow,
    /// When etcd fails: run the call undeduplicated (counted and logged)
    /// instead of answering UNAVAILABLE.
    pub fail_open: bool,
    /// etcd's `--max-request-bytes`: a kept answer must fit one request.
    pub max_request_bytes: u64,
}

/// The `GrpcService` message naming `cluster` (`envoy_grpc.cluster_name`),
/// as Envoy's `proxy_grpc_call` takes its target. Written rather than a bare
/// cluster name: Envoy first tries to parse the name as this message.
pub fn grpc_service(cluster: &str) -> Vec<u8> {
    let mut envoy_grpc = Vec::with_capacity(cluster.len() + 2);
    put_bytes(&mut envoy_grpc, 1, cluster.as_bytes());
    let mut service = Vec::with_capacity(envoy_grpc.len() + 2);
    put_bytes(&mut service, 1, &envoy_grpc);
    service
}

/// The etcd key of a digest.
pub fn key(prefix: &str, digest: &Digest) -> Vec<u8> {
    let hex = |n: u8| if n < 10 { b'0' + n } else { b'a' + n - 10 };
    let mut key = Vec::with_capacity(prefix.len() + 64);
    key.extend_from_slice(prefix.as_bytes());
    for b in digest {
        key.push(hex(b >> 4));
        key.push(hex(b & 15));
    }
    key
}

/// What a key holds in etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub state: State,
    pub owner: u64,
    pub claim_until: u64,
    pub expires: u64,
    pub fingerprint: Digest,
    /// The kept answer ([`State::Kept`] only).
    pub answer: Option<Answer>,
}

/// First byte of an entry: one of another format is not trusted.
const ENTRY_FORMAT: u8 = 1;
const ENTRY_HEAD: usize = 2 + 8 + 8 + 8 + 32;

impl Entry {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ENTRY_HEAD + 64);
        out.push(ENTRY_FORMAT);
        out.push(self.state as u8);
        for n in [self.owner, self.claim_until, self.expires] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        out.extend_from_slice(&self.fingerprint);
        if let Some(answer) = &self.answer {
            out.extend(encode_answer(self.owner, answer));
        }
        out
    }

    /// The entry in `bytes`; `None` for anything that is not one.
    pub fn decode(bytes: &[u8]) -> Option<Entry> {
        let head = bytes.get(..ENTRY_HEAD)?;
        if head.first() != Some(&ENTRY_FORMAT) {
            return None;
        }
        let state = *crate::dedup::STATES.get(usize::from(*head.get(1)?))?;
        let number = |at: usize| head.get(at..at + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
        let (owner, claim_until, expires) = (number(2)?, number(10)?, number(18)?);
        let fingerprint: Digest = head.get(26..58)?.try_into().ok()?;
        let rest = bytes.get(ENTRY_HEAD..)?;
        let answer = match state {
            State::Kept => Some(decode_answer(rest, owner)?),
            _ if rest.is_empty() => None,
            _ => return None,
        };
        Some(Entry { state, owner, claim_until, expires, fingerprint, answer })
    }

    /// What a call finds in this entry at `now`, if it is live; `None` when
    /// it has expired (the key may be claimed again).
    pub fn lookup(self, now: u64) -> Option<Lookup> {
        if self.state == State::Free || self.expires <= now {
            return None;
        }
        Some(crate::dedup::found(self.state, self.claim_until, now, self.fingerprint, || {
            // A kept entry always carries its answer (decode checks it).
            self.answer.map_or(Outcome::Unknown, Outcome::Kept)
        }))
    }
}

/// `Compare.result`, `Compare.target` and `RequestOp` fields of etcd's API
/// (`etcdserverpb/rpc.proto`).
const EQUAL: u64 = 0;
const TARGET_CREATE: u64 = 1;
const TARGET_MOD: u64 = 2;
const TARGET_VALUE: u64 = 3;

fn compare(key: &[u8], target: u64, put_target: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut c = Vec::with_capacity(key.len() + 16);
    put_uint(&mut c, 1, EQUAL);
    put_uint(&mut c, 2, target);
    put_bytes(&mut c, 3, key);
    put_target(&mut c);
    c
}

fn put_op(key: &[u8], value: &[u8], lease: i64) -> Vec<u8> {
    let mut put = Vec::with_capacity(key.len() + value.len() + 16);
    put_bytes(&mut put, 1, key);
    put_bytes(&mut put, 2, value);
    put_uint(&mut put, 3, lease as u64);
    let mut op = Vec::with_capacity(put.len() + 4);
    put_bytes(&mut op, 2, &put);
    op
}

fn range_op(key: &[u8]) -> Vec<u8> {
    let mut range = Vec::with_capacity(key.len() + 2);
    put_bytes(&mut range, 1, key);
    let mut op = Vec::with_capacity(range.len() + 2);
    put_bytes(&mut op, 1, &range);
    op
}

fn delete_op(key: &[u8]) -> Vec<u8> {
    let mut delete = Vec::with_capacity(key.len() + 2);
    put_bytes(&mut delete, 1, key);
    let mut op = Vec::with_capacity(delete.len() + 2);
    put_bytes(&mut op, 3, &delete);
    op
}

fn txn(compare: &[u8], success: &[u8], failure: Option<&[u8]>) -> Vec<u8> {
    let mut t = Vec::with_capacity(compare.len() + success.len() + failure.map_or(0, <[u8]>::len) + 12);
    put_bytes(&mut t, 1, compare);
    put_bytes(&mut t, 2, success);
    if let Some(failure) = failure {
        put_bytes(&mut t, 3, failure);
    }
    t
}

/// A claim: if `key` was never created, put `value` under `lease`;
/// otherwise read what it holds.
pub fn claim_txn(key: &[u8], value: &[u8], lease: i64) -> Vec<u8> {
    let never_created = compare(key, TARGET_CREATE, |c| put_uint(c, 5, 0));
    txn(&never_created, &put_op(key, value, lease), Some(&range_op(key)))
}

/// A claim over an expired entry: if `key` was last written at
/// `mod_revision`, put `value`; otherwise read what it holds now.
pub fn take_over_txn(key: &[u8], mod_revision: i64, value: &[u8], lease: i64) -> Vec<u8> {
    let unchanged = compare(key, TARGET_MOD, |c| put_uint(c, 6, mod_revision as u64));
    txn(&unchanged, &put_op(key, value, lease), Some(&range_op(key)))
}

/// A settle: if `key` still holds `claimed` (this call's in-flight entry),
/// put `settled` in its place, or delete it when `settled` is `None`.
pub fn settle_txn(key: &[u8], claimed: &[u8], settled: Option<&[u8]>, lease: i64) -> Vec<u8> {
    let still_ours = compare(key, TARGET_VALUE, |c| put_bytes(c, 7, claimed));
    let op = match settled {
        Some(value) => put_op(key, value, lease),
        None => delete_op(key),
    };
    txn(&still_ours, &op, None)
}

/// A read of `key` (`RangeRequest`): what a claim falls back to when etcd
/// refuses every write (its database full), so that a kept key is still
/// answered from what it holds.
pub fn range(key: &[u8]) -> Vec<u8> {
    let mut range = Vec::with_capacity(key.len() + 2);
    put_bytes(&mut range, 1, key);
    range
}

/// A lease grant of `ttl`, in whole seconds (rounded up).
pub fn lease_grant(ttl: Duration) -> Vec<u8> {
    let mut grant = Vec::with_capacity(8);
    put_uint(&mut grant, 1, ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0));
    grant
}

/// What a claim transaction found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnAnswer {
    /// The compare held: the put (or delete) was applied.
    Applied,
    /// The key exists: its value and the revision it was last written at.
    Existing { value: Vec<u8>, mod_revision: i64 },
    /// The compare failed but the key was gone when read (it cannot happen
    /// in one transaction; read as a busy key).
    Missing,
}

/// Reads a `TxnResponse` of a claim (or a take-over).
pub fn parse_txn(bytes: &[u8]) -> Result<TxnAnswer, WireError> {
    let mut succeeded = false;
    let mut found = TxnAnswer::Missing;
    for field in fields(bytes) {
        match field? {
            (2, Value::Varint(v)) => succeeded = v != 0,
            (3, Value::Delimited(op)) => {
                for range in fields(op) {
                    let (1, Value::Delimited(range)) = range? else { continue };
                    found = parse_range(range)?;
                }
            }
            _ => {}
        }
    }
    Ok(if succeeded { TxnAnswer::Applied } else { found })
}

/// Reads a `RangeResponse`: the key's value and revision, or `Missing`.
pub fn parse_range(bytes: &[u8]) -> Result<TxnAnswer, WireError> {
    let mut found = TxnAnswer::Missing;
    for kv in fields(bytes) {
        let (2, Value::Delimited(kv)) = kv? else { continue };
        let (mut value, mut mod_revision) = (Vec::new(), 0);
        for f in fields(kv) {
            match f? {
                (3, Value::Varint(rev)) => mod_revision = rev as i64,
                (5, Value::Delimited(v)) => value = v.to_vec(),
                _ => {}
            }
        }
        found = TxnAnswer::Existing { value, mod_revision };
    }
    Ok(found)
}

/// Reads a `LeaseGrantResponse`: the lease's id, or etcd's error.
pub fn parse_lease(bytes: &[u8]) -> Result<i64, String> {
    let (mut id, mut error) = (0i64, String::new());
    for field in fields(bytes) {
        match field.map_err(|e| format!("a lease grant answer that {e}"))? {
            (2, Value::Varint(v)) => id = v as i64,
            (4, Value::Delimited(e)) => error = String::from_utf8_lossy(e).into_owned(),
            _ => {}
        }
    }
    match (id, error.is_empty()) {
        (id, true) if id != 0 => Ok(id),
        (_, true) => Err("etcd granted no lease".to_owned()),
        (_, false) => Err(error),
    }
}

/// How many times a completion write is sent again after it failed: with
/// [`write_backoff`], for about ten seconds, through an etcd leader
/// election and a member's restart.
pub const WRITE_RESENDS: u8 = 8;

/// How long a completion write waits before it is sent for the `sent`+1-th
/// time: at once the first time (another member may take it), then from
/// 100 ms doubling to 2 s.
pub fn write_backoff(sent: u8) -> Duration {
    match sent {
        0 | 1 => Duration::ZERO,
        n => Duration::from_millis(100u64 << (n - 2).min(5)).min(Duration::from_secs(2)),
    }
}

/// Whether a completion write that failed with `status` after `sent`
/// attempts is sent again: when it may not have reached etcd (its member
/// down or slow). Sending it again is harmless: it changes the key only if
/// the key still holds the claim it replaces.
pub fn resend_write(status: u32, sent: u8) -> bool {
    const DEADLINE_EXCEEDED: u32 = 4;
    // etcd busy ("too many requests") or out of space: it may pass.
    const RESOURCE_EXHAUSTED: u32 = 8;
    const UNAVAILABLE: u32 = 14;
    matches!(status, UNAVAILABLE | DEADLINE_EXCEEDED | RESOURCE_EXHAUSTED) && sent <= WRITE_RESENDS
}

/// etcd refused a write as larger than its `--max-request-bytes`.
pub fn too_large(status: u32, message: &str) -> bool {
    const INVALID_ARGUMENT: u32 = 3;
    status == INVALID_ARGUMENT && message.contains("too large")
}

/// Records grpc-guard writes live at most this long after their claim: the
/// claim lasts the call's deadline (at most the TTL) and a grace second, the
/// outcome the TTL after it.
pub fn entry_lifetime(ttl: Duration, grace: Duration) -> Duration {
    ttl.saturating_mul(2).saturating_add(grace)
}

/// A worker's lease: put under it, an entry claimed before `usable_until`
/// leaves etcd only after it has expired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    pub id: i64,
    /// Claims may use it until then.
    pub usable_until: u64,
    /// When etcd drops it (and every key under it).
    pub ends: u64,
}

/// When a worker's lease is used and renewed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseWindow {
    pub lease_ttl: Duration,
    /// [`entry_lifetime`] plus a margin for clocks and the grant's trip.
    pub needed: Duration,
}

impl LeaseWindow {
    /// The lease granted at `granted_ns` (when it was asked for).
    pub fn lease(&self, id: i64, granted_ns: u64) -> Lease {
        let ends = granted_ns.saturating_add(nanos(self.lease_ttl));
        Lease { id, usable_until: ends.saturating_sub(nanos(self.needed)), ends }
    }

    /// True when a new lease should be asked for ahead of need: less than
    /// half of the usable window is left (or none at all).
    pub fn renew_due(&self, lease: Option<&Lease>, now: u64) -> bool {
        let half = nanos(self.lease_ttl.saturating_sub(self.needed)) / 2;
        lease.is_none_or(|l| l.usable_until.saturating_sub(now) < half)
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protowire::field;
    use crate::protowire::write::string;
    use crate::status::GrpcStatus;

    fn entry(state: State, answer: Option<Answer>) -> Entry {
        Entry { state, owner: 7, claim_until: 100, expires: 500, fingerprint: [9; 32], answer }
    }

    fn answer() -> Answer {
        Answer {
            status: GrpcStatus::Ok,
            headers: vec![("content-type".into(), b"application/grpc".to_vec())],
            body: vec![0, 0, 0, 0, 2, 8, 1],
            trailers: vec![("grpc-status".into(), b"0".to_vec())],
        }
    }

    #[test]
    fn entries_round_trip_and_anything_else_is_not_one() {
        for e in [entry(State::InFlight, None), entry(State::Unknown, None), entry(State::Kept, Some(answer()))] {
            assert_eq!(Entry::decode(&e.encode()), Some(e.clone()));
        }
        let kept = entry(State::Kept, Some(answer())).encode();
        assert_eq!(Entry::decode(&kept[..kept.len() - 1]), None, "a torn answer");
        assert_eq!(Entry::decode(&kept[..ENTRY_HEAD]), None, "kept without its answer");
        let mut other = kept.clone();
        other[0] = 2;
        assert_eq!(Entry::decode(&other), None, "another format");
        assert_eq!(Entry::decode(b"hello"), None);
    }

    #[test]
    fn a_live_entry_answers_as_the_local_table_does_and_an_expired_one_not_at_all() {
        assert_eq!(entry(State::InFlight, None).lookup(50), Some(Lookup::InFlight));
        assert_eq!(entry(State::InFlight, None).lookup(100), Some(Lookup::Abandoned), "claim past its deadline");
        assert_eq!(
            entry(State::Kept, Some(answer())).lookup(200),
            Some(Lookup::Done { fingerprint: [9; 32], outcome: Outcome::Kept(answer()) })
        );
        assert_eq!(
            entry(State::NotKept, None).lookup(200),
            Some(Lookup::Done { fingerprint: [9; 32], outcome: Outcome::NotKept })
        );
        assert_eq!(
            entry(State::Unknown, None).lookup(200),
            Some(Lookup::Done { fingerprint: [9; 32], outcome: Outcome::Unknown })
        );
        assert_eq!(entry(State::Kept, Some(answer())).lookup(500), None);
    }

    #[test]
    fn a_claim_creates_the_key_only_if_it_never_was_and_reads_it_otherwise() {
        let t = claim_txn(b"p/k", b"v", 42);
        let compare = field(&t, &[1]).unwrap().unwrap();
        // CREATE == 0, the oneof member written although it is zero.
        assert_eq!(compare, &[0x08, 0, 0x10, 1, 0x1a, 3, b'p', b'/', b'k', 0x28, 0][..]);
        assert_eq!(field(&t, &[2, 2, 1]).unwrap(), Some(&b"p/k"[..]));
        assert_eq!(field(&t, &[2, 2, 2]).unwrap(), Some(&b"v"[..]));
        assert_eq!(field(&t, &[3, 1, 1]).unwrap(), Some(&b"p/k"[..]));
        let settle = settle_txn(b"p/k", b"mine", None, 42);
        assert_eq!(field(&settle, &[1, 7]).unwrap(), Some(&b"mine"[..]));
        assert_eq!(field(&settle, &[2, 3, 1]).unwrap(), Some(&b"p/k"[..]), "a delete");
        assert_eq!(field(&settle, &[3]).unwrap(), None);
    }

    #[test]
    fn txn_answers_are_read() {
        let mut applied = string(1, b"header");
        applied.extend([0x10, 1]);
        assert_eq!(parse_txn(&applied), Ok(TxnAnswer::Applied));
        let mut kv = vec![0x18, 0x96, 0x01];
        kv.extend(string(5, b"entry"));
        let existing = string(3, &string(1, &string(2, &kv)));
        assert_eq!(parse_txn(&existing), Ok(TxnAnswer::Existing { value: b"entry".to_vec(), mod_revision: 150 }));
        assert_eq!(parse_txn(&string(3, &string(1, b""))), Ok(TxnAnswer::Missing));
        assert!(parse_txn(&[0x1a, 9]).is_err());
    }

    #[test]
    fn lease_answers_are_read() {
        assert_eq!(parse_lease(&[0x10, 0x2a, 0x18, 60]), Ok(42));
        assert_eq!(parse_lease(&string(4, b"too many leases")), Err("too many leases".to_owned()));
        assert!(parse_lease(&[]).is_err());
    }

    #[test]
    fn a_lease_is_used_while_it_outlives_what_is_put_under_it_and_renewed_at_half_way() {
        let s = 1_000_000_000;
        let window = LeaseWindow { lease_ttl: Duration::from_secs(30), needed: Duration::from_secs(12) };
        let lease = window.lease(5, 100 * s);
        assert_eq!(lease.usable_until, 118 * s);
        assert_eq!(lease.ends, 130 * s);
        assert!(!window.renew_due(Some(&lease), 100 * s));
        assert!(window.renew_due(Some(&lease), 110 * s), "9 of 18 usable seconds left");
        assert!(window.renew_due(None, 0));
        assert_eq!(lease_grant(Duration::from_millis(1500)), vec![0x08, 2]);
    }

    #[test]
    fn a_completion_write_is_sent_again_only_when_it_may_not_have_arrived_and_only_so_often() {
        assert!(resend_write(14, 1));
        assert!(resend_write(4, WRITE_RESENDS));
        assert!(!resend_write(14, WRITE_RESENDS + 1));
        assert!(!resend_write(9, 1), "etcd refused it: sending it again changes nothing");
        assert!(resend_write(8, 1), "etcd busy or full: it may pass");
        assert!(too_large(3, "etcdserver: request is too large"));
        assert!(!too_large(3, "etcdserver: key is not provided"));
        let waits: Vec<u64> = (1..=WRITE_RESENDS).map(|n| write_backoff(n).as_millis() as u64).collect();
        assert_eq!(waits, [0, 100, 200, 400, 800, 1600, 2000, 2000]);
    }

    #[test]
    fn the_grpc_service_names_the_cluster() {
        assert_eq!(grpc_service("etcd"), vec![0x0a, 6, 0x0a, 4, b'e', b't', b'c', b'd']);
        assert_eq!(key("gg/", &[0xab; 32]).len(), 3 + 64);
    }
}
