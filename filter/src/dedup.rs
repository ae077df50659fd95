//! Idempotency keys: the table that lets a retried unary call run upstream at
//! most once and gives every retry the first call's answer, and the rules for
//! what a finished first call leaves behind.
//!
//! # The table
//! It lives in proxy-wasm shared data, the only state Envoy's worker threads
//! share. Shared data has no delete and no listing, so the table is a fixed
//! set of buckets, each one shared-data value holding [`WAYS`] small index
//! records (key digest, caller, state, expiry, request fingerprint). A key
//! belongs to exactly one bucket, and every change to a bucket is one
//! compare-and-swap of the whole bucket ([`crate::shared::update`]): two
//! workers racing on one key see each other's claim, and a key can never be
//! claimed in two places. Kept answers live beside the index, one value per
//! way, tagged with the claim that wrote them, so a lookup reads only the
//! small bucket unless it finds an answer to replay.
//!
//! # Fairness
//! Each record carries a tag of its caller (the scope values). A caller may
//! hold at most `caller_ways` of a bucket's [`WAYS`] ways, so one caller can
//! take at most that share of the table, however many keys it sends, held
//! open or left unknown.
//!
//! # What a first call leaves
//! [`disposition`]: the key is freed only when the upstream provably did not
//! execute the call; a kept answer is replayed; every other ending is
//! *unknown* and keeps the key until the TTL, so a retry is told the first
//! attempt may have run instead of running it again.
//!
//! This module knows nothing of proxy-wasm: the store is
//! [`crate::shared::SharedStore`]. What a keyed call does with the table is
//! [`crate::call`]'s.

use std::borrow::Cow;
use std::hash::Hasher;

use thiserror::Error;

use crate::method::FnvBuildHasher;
use crate::shared::{self, Decision, SharedStore};
use crate::status::GrpcStatus;

/// Filter-state property that sends a marked retry to the replay route
/// (`wasm.grpc_guard.replay` in Envoy's route match). Filter state is set by
/// filters only, never by a client, so no request can reach the replay hop
/// by itself.
pub const REPLAY_PROPERTY: &str = "grpc_guard.replay";
/// Initial metadata on every replayed answer.
pub const REPLAYED_HEADER: &str = "grpc-guard-replayed";
/// Put in front of the marked retry's path, so that no service method can
/// ever match it.
pub const REPLAY_PATH_PREFIX: &str = "/grpc-guard.replay";
/// Content type of the marked retry on its way to the internal listener.
pub const REPLAY_CONTENT_TYPE: &str = "application/x-grpc-guard-replay";

/// Ways (records) per bucket.
pub const WAYS: usize = 8;
/// Most attempts at a compare-and-swap before giving up on a busy bucket:
/// a lookup then answers "in progress; retry", safe either way.
const CAS_ATTEMPTS: usize = 4;
/// Settling tries harder: giving up leaves the key claimed until it counts
/// as "may have run".
const SETTLE_ATTEMPTS: usize = 32;
/// Bytes the table may need per entry beyond the kept body and metadata:
/// the index record, the answer's framing, and Envoy's cost of one more
/// shared-data key, rounded up. [`crate::config`] bounds the table with it.
pub const ENTRY_OVERHEAD: u64 = 256;
/// How a kept header or trailer counts against `max_metadata_bytes`: its name
/// and value plus 32 bytes, as HTTP/2 counts a header (RFC 7541 §4.1).
pub const METADATA_PAIR_OVERHEAD: usize = 32;

/// BLAKE3 digest (256 bits): of the key material (scope, method, idempotency
/// key), and of a request body. A cryptographic hash, because a collision
/// would hand one caller another caller's answer. BLAKE3 rather than SHA-256
/// because it is far cheaper in wasm (fewer rounds per block): a
/// deduplicated first call went from 92,507 fuel to 72,291, a replay from
/// 78,203 to 55,855 (`tests/tests/filter/fuel.rs`).
pub type Digest = [u8; 32];

/// The key's identity: length-prefixed parts (the scope values, the method,
/// the key itself), so ("ab","c") and ("a","bc") differ. Each length is a
/// LEB128 varint: one byte for a part under 128 bytes, so a typical key's
/// material fits one 64-byte BLAKE3 block where 8-byte lengths took two.
pub fn digest(parts: &[&[u8]]) -> Digest {
    // One buffer, hashed at once: cheaper in wasm than feeding the hasher
    // piece by piece.
    blake3::hash(&key_material(parts)).into()
}

/// The parts as [`digest`] hashes them (the fuzz target checks it is one-to-one).
pub(crate) fn key_material(parts: &[&[u8]]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(parts.iter().map(|p| p.len() + 4).sum());
    for part in parts {
        let mut len = part.len();
        while len >= 0x80 {
            bytes.push((len as u8 & 0x7f) | 0x80);
            len >>= 7;
        }
        bytes.push(len as u8);
        bytes.extend_from_slice(part);
    }
    bytes
}

/// The caller's tag for fairness: FNV-1a of the scope values. Not a secret
/// and not an identity check (the key digest is that); only how records are
/// counted against a caller's share.
pub fn caller_tag(parts: &[&[u8]]) -> u64 {
    let mut h = std::hash::BuildHasher::build_hasher(&FnvBuildHasher);
    for part in parts {
        h.write(&(part.len() as u64).to_le_bytes());
        h.write(part);
    }
    h.finish()
}

/// The fingerprint of a request body, fed chunk by chunk as the body streams
/// through: a retry replays only if its whole body has the first call's.
#[derive(Clone, Debug, Default)]
pub struct Fingerprint(Box<blake3::Hasher>);

impl Fingerprint {
    pub fn update(&mut self, chunk: &[u8]) {
        self.0.update(chunk);
    }

    pub fn finish(self) -> Digest {
        self.0.finalize().into()
    }

    /// The fingerprint of a body seen whole.
    #[cfg(test)]
    pub fn of(body: &[u8]) -> Digest {
        blake3::hash(body).into()
    }
}

/// A kept answer, replayed to every retry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: GrpcStatus,
    /// Response headers the message depends on (`content-type`,
    /// `grpc-encoding`) and the custom initial metadata.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The response body as it was sent: gRPC frames.
    pub body: Vec<u8>,
    /// Response trailers (or, for a trailers-only answer, its `grpc-*`
    /// status headers), `grpc-status` and `grpc-message` included.
    pub trailers: Vec<(String, Vec<u8>)>,
}

impl Answer {
    /// Bytes of headers and trailers as counted against `max_metadata_bytes`.
    pub fn metadata_bytes(&self) -> usize {
        metadata_bytes(&self.headers) + metadata_bytes(&self.trailers)
    }
}

/// How a list of kept headers counts against `max_metadata_bytes`.
pub fn metadata_bytes(pairs: &[(String, Vec<u8>)]) -> usize {
    pairs.iter().map(|(n, v)| n.len() + v.len() + METADATA_PAIR_OVERHEAD).sum()
}

/// Statuses a retry would get again, so keeping them is safe (DESIGN §3.5):
/// the call ran to a definite answer, or definitely did nothing.
fn is_kept_status(status: GrpcStatus) -> bool {
    use GrpcStatus::*;
    match status {
        Ok | InvalidArgument | NotFound | AlreadyExists | FailedPrecondition | OutOfRange | Unimplemented => true,
        Cancelled | Unknown | DeadlineExceeded | ResourceExhausted | Aborted | Internal | Unavailable | DataLoss
        | PermissionDenied | Unauthenticated => false,
    }
}

/// How a first call ended, as far as its key is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// No whole request message went past the filter, whoever ended the
    /// call (grpc-guard itself, the client's reset, the upstream answering
    /// from the headers or a message's prefix): no unary handler could run.
    NothingSent,
    /// The upstream answered with this `grpc-status`.
    Upstream(GrpcStatus),
    /// The upstream answered with this HTTP status and no `grpc-status`.
    UpstreamHttp(u32),
    /// Envoy ended it (a local reply, a reset, its deadline timer, the client
    /// gone); `sent` when an upstream connection carried the request.
    Envoy { sent: bool },
}

/// What a finished first call leaves under its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// The upstream provably did not execute it: a retry runs.
    Free,
    /// A definite answer, kept for `ttl` and replayed.
    Keep,
    /// It may have run: kept for `ttl`, and a retry is told so.
    Unknown,
}

/// The rule (README "Idempotency keys"). An upstream that answers
/// UNAVAILABLE, RESOURCE_EXHAUSTED or ABORTED says, by gRPC's own definition
/// of those codes, that the call was refused or rolled back and the client
/// should retry: it is taken at its word. UNAUTHENTICATED and
/// PERMISSION_DENIED are refusals before anything ran, and kept they would
/// let a caller with made-up credentials fill the table: freed. HTTP 4xx
/// without `grpc-status` is a refusal before any handler ran. Everything else that is not a definite
/// answer may have run: DEADLINE_EXCEEDED ("may be returned even if the
/// operation has completed successfully"), CANCELLED, UNKNOWN, INTERNAL,
/// DATA_LOSS, HTTP 5xx, and any reset or cut after the request left Envoy.
pub fn disposition(ending: Ending) -> Disposition {
    use GrpcStatus::{Aborted, PermissionDenied, ResourceExhausted, Unauthenticated, Unavailable};
    match ending {
        Ending::NothingSent | Ending::Envoy { sent: false } => Disposition::Free,
        Ending::Upstream(Unavailable | ResourceExhausted | Aborted | Unauthenticated | PermissionDenied) => {
            Disposition::Free
        }
        Ending::Upstream(status) if is_kept_status(status) => Disposition::Keep,
        Ending::UpstreamHttp(http) if (400..500).contains(&http) => Disposition::Free,
        Ending::Upstream(_) | Ending::UpstreamHttp(_) | Ending::Envoy { sent: true } => Disposition::Unknown,
    }
}

/// The state of one way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Free = 0,
    /// A first call is running until `claim_until`; after that (its stream
    /// vanished without settling) the key counts as [`State::Unknown`].
    InFlight = 1,
    /// Done; the answer is kept beside the index.
    Kept = 2,
    /// Done; the answer was too large to keep.
    NotKept = 3,
    /// Done; the call may have run.
    Unknown = 4,
}

/// One way of a bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub state: State,
    pub key: Digest,
    /// [`caller_tag`] of the key's scope.
    pub caller: u64,
    /// The claim's owner: tells its stream apart from others, and tags the
    /// answer it keeps.
    pub owner: u64,
    pub claim_until: u64,
    pub expires: u64,
    pub fingerprint: Digest,
}

const FREE: Record =
    Record { state: State::Free, key: [0; 32], caller: 0, owner: 0, claim_until: 0, expires: 0, fingerprint: [0; 32] };
const RECORD_LEN: usize = 1 + 32 + 8 + 8 + 8 + 8 + 32;
/// First byte of a bucket: a bucket of another format is not trusted.
const BUCKET_FORMAT: u8 = 1;

impl Record {
    fn live(&self, now: u64) -> bool {
        self.state != State::Free && self.expires > now
    }

    /// Writes the record over `out`.
    fn write(&self, out: &mut [u8; RECORD_LEN]) {
        let mut bytes = [0u8; RECORD_LEN];
        bytes[0] = self.state as u8;
        let mut at = 1;
        for part in [&self.key[..], &self.caller.to_le_bytes(), &self.owner.to_le_bytes()].into_iter().chain([
            &self.claim_until.to_le_bytes()[..],
            &self.expires.to_le_bytes(),
            &self.fingerprint,
        ]) {
            if let Some(to) = bytes.get_mut(at..at + part.len()) {
                to.copy_from_slice(part);
            }
            at += part.len();
        }
        *out = bytes;
    }

    fn decode(r: &mut Reader<'_>) -> Option<Record> {
        let state = *STATES.get(usize::from(r.u8()?))?;
        Some(Record {
            state,
            key: r.digest()?,
            caller: r.u64()?,
            owner: r.u64()?,
            claim_until: r.u64()?,
            expires: r.u64()?,
            fingerprint: r.digest()?,
        })
    }
}

type Bucket = [Record; WAYS];

const BUCKET_LEN: usize = 1 + WAYS * RECORD_LEN;

/// A bucket as stored, read and changed in place, a way at a time: a lookup
/// reads a key and an expiry per way and rewrites one record, where
/// decoding all eight records and encoding them again moved every byte
/// twice (wasm pays for each).
struct Ways<'b>(Cow<'b, [u8]>);

impl<'b> Ways<'b> {
    /// The bucket in `bytes`; anything unreadable (another format, a torn
    /// value, a state that does not exist) is an empty bucket rather than
    /// trusted.
    fn read(bytes: &'b [u8]) -> Ways<'b> {
        let ways = Ways(Cow::Borrowed(bytes));
        let valid = bytes.len() == BUCKET_LEN
            && bytes.first() == Some(&BUCKET_FORMAT)
            && (0..WAYS).all(|w| usize::from(ways.way(w)[0]) < STATES.len());
        if valid {
            ways
        } else {
            let mut empty = vec![0; BUCKET_LEN];
            if let Some(format) = empty.first_mut() {
                *format = BUCKET_FORMAT;
            }
            Ways(Cow::Owned(empty))
        }
    }

    fn way(&self, way: usize) -> &[u8; RECORD_LEN] {
        self.0.get(1 + way * RECORD_LEN..).and_then(<[u8]>::first_chunk).unwrap_or(&[0; RECORD_LEN])
    }

    fn state(&self, way: usize) -> State {
        STATES.get(usize::from(self.way(way)[0])).copied().unwrap_or(State::Free)
    }

    fn key(&self, way: usize) -> &[u8] {
        &self.way(way)[1..33]
    }

    fn number(&self, way: usize, at: usize) -> u64 {
        let bytes = self.way(way).get(at..).and_then(<[u8]>::first_chunk).unwrap_or(&[0; 8]);
        u64::from_le_bytes(*bytes)
    }

    fn caller(&self, way: usize) -> u64 {
        self.number(way, 33)
    }

    fn live(&self, way: usize, now: u64) -> bool {
        self.state(way) != State::Free && self.number(way, 57) > now
    }

    fn record(&self, way: usize) -> Record {
        Record::decode(&mut Reader(self.way(way))).unwrap_or(FREE)
    }

    fn set(&mut self, way: usize, record: &Record) {
        let at = 1 + way * RECORD_LEN;
        if let Some(out) = self.0.to_mut().get_mut(at..).and_then(<[u8]>::first_chunk_mut) {
            record.write(out);
        }
    }

    fn into_bytes(self) -> Vec<u8> {
        self.0.into_owned()
    }

    /// The way of `claim` is still that claim's, in flight and live (an
    /// expired record is not revived: another claim may hold the key).
    fn held_by(&self, claim: &Claim, now: u64) -> bool {
        let record = self.record(claim.way);
        claim.way < WAYS
            && record.state == State::InFlight
            && record.owner == claim.owner
            && record.key == claim.key
            && record.live(now)
    }
}

pub(crate) const STATES: [State; 5] = [State::Free, State::InFlight, State::Kept, State::NotKept, State::Unknown];

/// A bucket's bytes decoded whole; anything unreadable is an empty bucket.
pub fn decode_bucket(bytes: &[u8]) -> Bucket {
    let ways = Ways::read(bytes);
    std::array::from_fn(|way| ways.record(way))
}

pub fn encode_bucket(bucket: &Bucket) -> Vec<u8> {
    let mut ways = Ways::read(&[]);
    for (way, record) in bucket.iter().enumerate() {
        ways.set(way, record);
    }
    ways.into_bytes()
}

/// A kept answer's bytes, tagged with the claim that kept it.
pub fn encode_answer(owner: u64, answer: &Answer) -> Vec<u8> {
    let mut out = Vec::with_capacity(answer.body.len() + answer.metadata_bytes() + 32);
    out.extend_from_slice(&owner.to_le_bytes());
    out.extend_from_slice(&answer.status.code().to_le_bytes());
    put_pairs(&mut out, &answer.headers);
    put_bytes(&mut out, &answer.body);
    put_pairs(&mut out, &answer.trailers);
    out
}

/// The answer kept by the claim `owner`, or `None` if what is stored is
/// another claim's or unreadable.
pub fn decode_answer(bytes: &[u8], owner: u64) -> Option<Answer> {
    let mut r = Reader(bytes);
    if r.u64()? != owner {
        return None;
    }
    let status = GrpcStatus::from_code(r.u32()?)?;
    let answer = Answer { status, headers: r.pairs()?, body: r.bytes()?, trailers: r.pairs()? };
    r.0.is_empty().then_some(answer)
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn put_pairs(out: &mut Vec<u8>, pairs: &[(String, Vec<u8>)]) {
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (name, value) in pairs {
        put_bytes(out, name.as_bytes());
        put_bytes(out, value);
    }
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
    fn pairs(&mut self) -> Option<Vec<(String, Vec<u8>)>> {
        let count = self.u32()?;
        let mut pairs = Vec::new();
        for _ in 0..count {
            let name = String::from_utf8(self.bytes()?).ok()?;
            pairs.push((name, self.bytes()?));
        }
        Some(pairs)
    }
}

/// A claimed way: what settling it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claim {
    pub bucket: u32,
    pub way: usize,
    pub key: Digest,
    pub owner: u64,
}

/// What a finished first call left, as a lookup finds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Kept(Answer),
    /// It ran; its answer was too large to keep.
    NotKept,
    /// It may have run.
    Unknown,
}

/// What a call finds under its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// First call: this stream owns the key; forward it. `evicted` when an
    /// expired record of another key made room.
    Claimed { claim: Claim, evicted: bool },
    /// The first call is still running: answer ABORTED, the retry will find
    /// it settled.
    InFlight,
    /// A claim whose stream never settled it (the VM went away): it may have
    /// run.
    Abandoned,
    /// The first call finished: compare request fingerprints, then answer.
    Done { fingerprint: Digest, outcome: Outcome },
    /// Every way of the key's bucket holds a live record of another key.
    Full,
    /// This caller holds its whole share of the key's bucket.
    CallerFull,
    /// Other workers kept changing the bucket.
    Contended,
}

/// How a first call is settled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// The key is freed: a retry runs.
    Free,
    /// Kept for `ttl`; `answer` is `None` when it was too large to keep.
    Keep { fingerprint: Digest, answer: Option<Answer> },
    /// Kept for `ttl` as "may have run".
    Unknown { fingerprint: Digest },
}

/// The table's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DedupTable {
    pub buckets: u32,
    pub ttl_ns: u64,
    /// Most ways of one bucket a caller may hold.
    pub caller_ways: usize,
}

fn index_key(bucket: u32) -> String {
    let mut key = String::with_capacity(32);
    key.push_str("grpc_guard.dedup.");
    crate::push_decimal(&mut key, u64::from(bucket));
    key
}

fn answer_key(bucket: u32, way: usize) -> String {
    let mut key = index_key(bucket);
    key.push('.');
    crate::push_decimal(&mut key, way as u64);
    key
}

/// What the compare-and-swap of a lookup decided.
enum Found {
    Claimed(Claim, bool),
    /// A live record of the key, in this way.
    Live(usize, Record),
    Full,
    CallerFull,
}

/// What a call finds in a live record of its key, in either store: the
/// first call still running (until `claim_until`), a claim never settled,
/// or the first call's outcome (`kept` reads a kept answer, only when there
/// is one).
pub(crate) fn found(
    state: State,
    claim_until: u64,
    now: u64,
    fingerprint: Digest,
    kept: impl FnOnce() -> Outcome,
) -> Lookup {
    match state {
        State::InFlight if now < claim_until => Lookup::InFlight,
        State::InFlight | State::Free => Lookup::Abandoned,
        State::Kept => Lookup::Done { fingerprint, outcome: kept() },
        State::NotKept => Lookup::Done { fingerprint, outcome: Outcome::NotKept },
        State::Unknown => Lookup::Done { fingerprint, outcome: Outcome::Unknown },
    }
}

impl DedupTable {
    /// A table of `max_entries` (whole buckets), keeping outcomes for `ttl`.
    pub fn new(max_entries: u32, ttl: std::time::Duration, caller_ways: usize) -> DedupTable {
        DedupTable {
            buckets: max_entries.div_ceil(WAYS as u32).max(1),
            ttl_ns: u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX),
            caller_ways,
        }
    }

    fn bucket_of(&self, key: &Digest) -> u32 {
        let home = u64::from_le_bytes([key[0], key[1], key[2], key[3], key[4], key[5], key[6], key[7]]);
        // The remainder is below `buckets`, a u32.
        (home % u64::from(self.buckets.max(1))) as u32
    }

    /// Creates every bucket that does not exist yet, so that workers race on
    /// them with compare-and-swap ([`crate::shared::create`]). Runs at
    /// configure time, before any call.
    pub fn create(&self, store: &mut (impl SharedStore + ?Sized)) {
        for bucket in 0..self.buckets {
            shared::create(store, &index_key(bucket));
        }
    }

    /// Finds `key`, or claims a way for it: in flight until `claim_until`,
    /// kept at most until `now + ttl`.
    pub fn lookup_or_claim(
        &self,
        store: &mut (impl SharedStore + ?Sized),
        key: &Digest,
        caller: u64,
        owner: u64,
        now: u64,
        claim_until: u64,
    ) -> Lookup {
        let bucket = self.bucket_of(key);
        let decided = shared::update(store, &index_key(bucket), CAS_ATTEMPTS, |bytes| {
            let mut ways = Ways::read(bytes);
            if let Some(way) = (0..WAYS).find(|&w| ways.live(w, now) && ways.key(w) == key) {
                return Decision::Keep(Found::Live(way, ways.record(way)));
            }
            let Some(way) = (0..WAYS).find(|&w| !ways.live(w, now)) else {
                return Decision::Keep(Found::Full);
            };
            if (0..WAYS).filter(|&w| ways.live(w, now) && ways.caller(w) == caller).count() >= self.caller_ways {
                return Decision::Keep(Found::CallerFull);
            }
            // An expired record of another key made room (the key's own
            // expired record is no loss).
            let evicted = ways.state(way) != State::Free && ways.key(way) != key;
            ways.set(
                way,
                &Record {
                    state: State::InFlight,
                    key: *key,
                    caller,
                    owner,
                    claim_until,
                    // A claim outlives its call: once `claim_until` has passed
                    // unsettled it still keeps the key, as "may have run", for
                    // `ttl`.
                    expires: claim_until.saturating_add(self.ttl_ns),
                    fingerprint: [0; 32],
                },
            );
            let claim = Claim { bucket, way, key: *key, owner };
            Decision::Write(Cow::Owned(ways.into_bytes()), Found::Claimed(claim, evicted))
        });
        match decided {
            Ok(Found::Claimed(claim, evicted)) => Lookup::Claimed { claim, evicted },
            Ok(Found::Live(way, r)) => found(r.state, r.claim_until, now, r.fingerprint, || {
                let (bytes, _) = store.get(&answer_key(bucket, way));
                // An answer that is not the one this record kept (a late
                // writer, a torn value) is never replayed.
                match bytes.as_deref().and_then(|b| decode_answer(b, r.owner)) {
                    Some(answer) => Outcome::Kept(answer),
                    None => Outcome::Unknown,
                }
            }),
            Ok(Found::Full) => Lookup::Full,
            Ok(Found::CallerFull) => Lookup::CallerFull,
            Err(_) => Lookup::Contended,
        }
    }

    /// Ends `claim`: frees it, or keeps its outcome for `ttl` from `now`.
    /// Does nothing if the way is no longer this claim (it expired and was
    /// taken). False when other workers kept the bucket too busy to write.
    pub fn settle(
        &self,
        store: &mut (impl SharedStore + ?Sized),
        claim: &Claim,
        settlement: Settlement,
        now: u64,
    ) -> bool {
        let (state, fingerprint) = match settlement {
            Settlement::Free => (State::Free, [0; 32]),
            Settlement::Keep { fingerprint, answer: Some(answer) } => {
                // The answer first: once the record says Kept, a lookup reads
                // it. But only while the way is still this claim's: a claim
                // that expired and was taken must not overwrite the answer
                // its successor keeps there (the record check below is the
                // one that counts; this one keeps the window to a moment).
                let (bytes, _) = store.get(&index_key(claim.bucket));
                if !Ways::read(bytes.as_deref().unwrap_or_default()).held_by(claim, now) {
                    return true;
                }
                store.set(&answer_key(claim.bucket, claim.way), &encode_answer(claim.owner, &answer), None).ok();
                (State::Kept, fingerprint)
            }
            Settlement::Keep { fingerprint, answer: None } => (State::NotKept, fingerprint),
            Settlement::Unknown { fingerprint } => (State::Unknown, fingerprint),
        };
        let written = shared::update(store, &index_key(claim.bucket), SETTLE_ATTEMPTS, |bytes| {
            let mut ways = Ways::read(bytes);
            if claim.way >= WAYS {
                return Decision::Keep(());
            }
            if !ways.held_by(claim, now) {
                return Decision::Keep(());
            }
            let record = ways.record(claim.way);
            let settled = match state {
                State::Free => FREE,
                _ => Record { state, expires: now.saturating_add(self.ttl_ns), fingerprint, ..record },
            };
            ways.set(claim.way, &settled);
            Decision::Write(Cow::Owned(ways.into_bytes()), ())
        });
        written.is_ok()
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
    #[error("is not a valid quoted string (RFC 8941 sf-string: printable ASCII, only \\\" and \\\\ escaped)")]
    BadString,
}

/// Checks an idempotency key header value and gives the key. The IETF
/// draft (draft-ietf-httpapi-idempotency-key-header) writes the key as a
/// Structured Field string, `"8e03978e-..."`; that form is read as the same
/// key as the bare value, so a client of either kind matches the other.
pub fn check_key(value: Option<&[u8]>, required: bool) -> Result<Option<Cow<'_, [u8]>>, KeyError> {
    let key: Cow<'_, [u8]> = match value {
        None if required => return Err(KeyError::Missing),
        None => return Ok(None),
        Some(v @ [b'"', ..]) => Cow::Owned(sf_string(v).ok_or(KeyError::BadString)?),
        Some(v) if !v.iter().all(|b| (0x21..0x7f).contains(b)) => return Err(KeyError::NotPrintable),
        Some(v) => Cow::Borrowed(v),
    };
    match key.len() {
        0 => Err(KeyError::Empty),
        n if n > 255 => Err(KeyError::TooLong(n)),
        _ => Ok(Some(key)),
    }
}

/// The content of an RFC 8941 sf-string: `"` ... `"`, printable ASCII and
/// space inside, with `\"` and `\\` the only escapes; `None` if malformed.
fn sf_string(raw: &[u8]) -> Option<Vec<u8>> {
    let inner = raw.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
    let mut out = Vec::with_capacity(inner.len());
    let mut bytes = inner.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'\\' => match bytes.next() {
                Some(&e @ (b'"' | b'\\')) => out.push(e),
                _ => return None,
            },
            b'"' => return None,
            0x20..=0x7e => out.push(b),
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests;
