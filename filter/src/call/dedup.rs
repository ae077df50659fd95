//! A keyed call's part in deduplication (DESIGN §3.5): claim the key or find
//! it, replay or refuse a retry, keep the first call's answer, and settle the
//! key when the call ends, however it ended. The table and the rules are
//! [`crate::dedup`].
//!
//! Replaying an OK answer needs a second hop inside Envoy: a local reply to a
//! gRPC request is always trailers-only, so it cannot carry a message. The
//! retry is marked in filter state ([`REPLAY_PROPERTY`], which no client can
//! set) and given a non-gRPC content type; the route that matches the mark
//! sends it to an internal listener that answers a plain 200 once the whole
//! request is in (`envoy/envoy.yaml`). On the way back that answer becomes the
//! kept one: its content type, encoding and metadata, the kept message, the
//! kept trailers, and `grpc-guard-replayed: true`.

use std::borrow::Cow;
use std::time::Duration;

use super::{from_slice, lossy, Call, Chunk, Effect, Effects, EtcdReply, EtcdRequest, Host, Next, Reply, Side};
use crate::config::{Anonymous, DedupConfig, DedupStore, ScopePart, WhenFull};
use crate::dedup::{
    caller_tag, check_key, digest, disposition, Answer, Claim, Digest, Disposition, Ending, Fingerprint, Lookup,
    Outcome, Settlement, State, REPLAYED_HEADER, REPLAY_CONTENT_TYPE, REPLAY_PATH_PREFIX,
};
use crate::etcd::{self, Entry, EtcdConfig, Lease, TxnAnswer};
use crate::frames::PREFIX_LEN;
use crate::metrics::guard;
use crate::metrics::Family;
use crate::protowire;
use crate::record::DedupOutcome;
use crate::status::{GrpcStatus, StatusSource};
use crate::worker::Worker;

/// How long after its deadline a claim is still taken as running: Envoy ends
/// the stream at the deadline, and the filter settles it right after.
const CLAIM_GRACE_NS: u64 = 1_000_000_000;

/// Response headers never kept: hop-by-hop, per-response, or Envoy's own.
fn kept_header(name: &str) -> bool {
    !(name.starts_with(':')
        || name.starts_with("x-envoy-")
        || matches!(
            name,
            "content-length" | "date" | "server" | "transfer-encoding" | "connection" | "keep-alive" | "te" | "trailer"
        ))
}

/// Where a keyed call stands.
#[derive(Debug)]
pub(super) enum Phase {
    /// Held, headers and body, until the request message that carries the
    /// key is whole; `held` bytes are buffered so far.
    AwaitKey { held: usize },
    /// This call runs upstream and what it ends with will be kept.
    First(FirstCall),
    /// The key's first call finished; the request's fingerprint is taken as
    /// it streams (`seen`) and compared at its end.
    Verify { fingerprint: Digest, outcome: Outcome, seen: Fingerprint },
    /// An OK answer is being replayed through the second hop.
    Replay(Answer),
    /// Paused while the etcd store answers a claim (or grants the lease it
    /// needs).
    Claiming(Claiming),
    /// The response's end is held while the first call's outcome is written
    /// to the etcd store.
    Settling { request: EtcdRequest },
}

/// A claim on the etcd store, in flight.
#[derive(Debug)]
pub(super) struct Claiming {
    held: EtcdHeld,
    awaiting: Awaiting,
    /// Requests of this claim that failed and were sent again.
    resent: u8,
    /// Expired entries this claim tried to take over.
    take_overs: u8,
    /// The worker's lease was gone from etcd and a new one was asked for.
    re_leased: bool,
    /// The request has ended (with its headers, its body or its trailers).
    end_of_stream: bool,
    /// The request body that reached the filter meanwhile (Envoy holds it):
    /// its fingerprint so far, and how many bytes of it.
    body: Fingerprint,
    body_seen: usize,
    /// The last request sent, to send again.
    last: Option<EtcdRequest>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Awaiting {
    Lease {
        asked_at: u64,
    },
    Claim,
    /// etcd refused the claim's write (its database full): what the key
    /// holds is read, so a kept key is still answered from it.
    Read,
}

/// A key held on the etcd store: what settling it needs.
#[derive(Clone, Debug)]
pub(super) struct EtcdHeld {
    /// The etcd key.
    key: Vec<u8>,
    /// The in-flight entry as written: a settle replaces it only if the key
    /// still holds exactly these bytes.
    entry: Vec<u8>,
    claim_until: u64,
    lease: Option<Lease>,
}

/// Where a first call's key is held.
#[derive(Debug)]
enum Held {
    Local(Claim),
    Etcd(EtcdHeld),
}

/// How many times a claim whose request failed before reaching etcd (its
/// member down, the connection reset) is sent again, to another member.
const CLAIM_RESENDS: u8 = 1;
/// How many expired entries a claim takes over before it calls the key busy.
const TAKE_OVERS: u8 = 2;
/// The gRPC statuses of a claim request that may be sent again: it did not
/// reach etcd, or did and is recognized as ours when sent again.
const RESEND_ON: [u32; 1] = [14];
/// etcd's answer when its database is full (`mvcc: database space exceeded`)
/// or it is overloaded (`too many requests`).
const ETCD_FULL: u32 = 8;
/// etcd's answer to a write under a lease it does not have.
const LEASE_GONE: u32 = 5;

/// The most of a request message grpc-guard holds to read its key field
/// when the method sets no `limits.max_request_message_bytes`.
pub const MAX_HELD_MESSAGE: u64 = 1 << 20;

/// The first gRPC message of a request body, as far as it has come, from its
/// prefix and the length buffered so far.
enum FirstMessage {
    Partial,
    /// All `len` bytes of it are buffered after the prefix.
    Whole {
        compressed: bool,
        len: usize,
    },
    /// Over the method's size limit, or not a gRPC frame: the frame reader
    /// answers for it.
    Other,
    /// Larger than grpc-guard holds for a method with no size limit.
    TooLargeToHold(u64),
}

fn first_message(prefix: &[u8], buffered: usize, limit: Option<u64>) -> FirstMessage {
    let Some(&[flag, a, b, c, d]) = prefix.first_chunk::<PREFIX_LEN>() else {
        return FirstMessage::Partial;
    };
    let len = u32::from_be_bytes([a, b, c, d]);
    if flag > 1 || limit.is_some_and(|limit| u64::from(len) > limit) {
        return FirstMessage::Other;
    }
    if limit.is_none() && u64::from(len) > MAX_HELD_MESSAGE {
        return FirstMessage::TooLargeToHold(len.into());
    }
    let len = len as usize;
    if buffered.saturating_sub(PREFIX_LEN) < len {
        return FirstMessage::Partial;
    }
    FirstMessage::Whole { compressed: flag == 1, len }
}

/// What the first call of a key collects to keep.
#[derive(Debug)]
pub(super) struct FirstCall {
    claim: Held,
    request: Fingerprint,
    answer: Answer,
    /// Largest body and metadata kept ([`DedupConfig`]).
    max_body: usize,
    max_metadata: usize,
    too_large: bool,
    /// The whole request has passed (its fingerprint is final).
    request_ended: bool,
}

impl FirstCall {
    /// Notes more metadata, a later value of a name standing for the earlier
    /// (trailers after a status in the headers); past the bound, nothing is
    /// kept but the fact.
    fn keep_metadata(&mut self, pairs: Vec<(String, Vec<u8>)>, trailers: bool) {
        let list = if trailers { &mut self.answer.trailers } else { &mut self.answer.headers };
        if trailers {
            list.retain(|(name, _)| !pairs.iter().any(|(n, _)| n == name));
        }
        list.extend(pairs);
        if self.answer.metadata_bytes() > self.max_metadata {
            self.too_large = true;
        }
    }
}

impl Claiming {
    /// The claim transaction under `lease`.
    fn claim(&mut self, lease: Lease) -> EtcdRequest {
        self.held.lease = Some(lease);
        kv_request(etcd::TXN, etcd::claim_txn(&self.held.key, &self.held.entry, lease.id), Duration::ZERO, false)
    }

    /// The claim over an expired entry last written at `mod_revision`.
    fn take_over(&self, mod_revision: i64) -> EtcdRequest {
        let lease = self.held.lease.map_or(0, |l| l.id);
        let txn = etcd::take_over_txn(&self.held.key, mod_revision, &self.held.entry, lease);
        kv_request(etcd::TXN, txn, Duration::ZERO, false)
    }
}

/// Takes a claim back if the key still holds it (a claim whose call never
/// went on), sent by the worker: it deletes only this claim's own record.
fn release(etcd: &EtcdConfig, held: &EtcdHeld, fx: &mut Effects) {
    let txn = etcd::settle_txn(&held.key, &held.entry, None, 0);
    fx.push(Effect::Etcd(Box::new(kv_request(etcd::TXN, txn, etcd.timeout, true))));
}

/// A request of etcd's KV service (`method`: `Txn` or `Range`).
fn kv_request(method: &'static str, message: Vec<u8>, timeout: Duration, detached: bool) -> EtcdRequest {
    EtcdRequest { service: etcd::KV_SERVICE, method, message, timeout, detached, fallback: None }
}

/// The write of a first call's outcome (`fallback`: the same without its
/// answer, should etcd find the answer too large).
fn outcome_request(etcd: &EtcdConfig, txn: Vec<u8>, fallback: Option<Vec<u8>>, detached: bool) -> EtcdRequest {
    EtcdRequest { fallback, ..kv_request(etcd::TXN, txn, etcd.timeout, detached) }
}

/// A `Lease.LeaseGrant` request for the store's lease TTL.
pub fn lease_request(etcd: &EtcdConfig) -> EtcdRequest {
    EtcdRequest {
        service: etcd::LEASE_SERVICE,
        method: etcd::LEASE_GRANT,
        message: etcd::lease_grant(etcd.lease.lease_ttl),
        timeout: etcd.timeout,
        detached: false,
        fallback: None,
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Call {
    fn set_outcome(&mut self, outcome: DedupOutcome, family: Family, fx: &mut Effects) {
        self.dedup_outcome = outcome;
        self.count(family, None, 1, fx);
    }

    /// Request headers of a call to a deduplicated method that carries the
    /// key header `value`: check the key, then claim it, refuse the call, or
    /// send it to the replay hop.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn dedup_request_headers<H: Host>(
        &mut self,
        worker: &Worker,
        config: &DedupConfig,
        host: &mut H,
        value: Option<Vec<u8>>,
        now: u64,
        end_of_stream: bool,
        fx: &mut Effects,
    ) -> Next {
        match check_key(value.as_deref(), config.require_key) {
            Ok(Some(key)) => self.claim_key(worker, config, host, &key, now, end_of_stream, fx),
            Ok(None) => Next::Continue,
            Err(e) => self.refuse_key(format!("grpc-guard: idempotency key header {} {e}", config.header), fx),
        }
    }

    fn refuse_key(&mut self, message: String, fx: &mut Effects) -> Next {
        self.set_outcome(DedupOutcome::BadKey, Family::DedupKeyRejected, fx);
        self.answer(GrpcStatus::InvalidArgument, message, fx)
    }

    /// Holds a call whose key is a field of its request message (AIP-155)
    /// until that message is whole: its headers wait too, so it can still be
    /// sent to the replay hop or answered.
    pub(super) fn await_key_field(&mut self) -> Next {
        self.dedup = Some(Box::new(Phase::AwaitKey { held: 0 }));
        Next::Pause
    }

    /// A request body chunk of a call held for its key field: `len` is all
    /// the body Envoy has buffered. `None` when the call is not held; the
    /// step's end when it stays held or was answered; `Some(Continue)` once
    /// the key is claimed (or the call goes on without one), and the
    /// buffered body is then read as any chunk.
    pub(super) fn dedup_key_field<H: Host>(
        &mut self,
        worker: &Worker,
        host: &mut H,
        len: usize,
        end_of_stream: bool,
        fx: &mut Effects,
    ) -> Option<Next> {
        let Some(Phase::AwaitKey { held }) = self.dedup.as_deref_mut() else { return None };
        *held = len;
        let config = worker.config.dedup.as_ref()?;
        let path = config.key_fields.get(self.method_name())?;
        // Held past its deadline: refused, nothing claimed or sent (Envoy's
        // own timer starts only once the router has the call).
        let now = host.now_ns();
        if self.deadline_left(now).is_some_and(|l| l.is_zero()) {
            self.dedup = None;
            self.count(Family::DeadlineRejected, Some(GrpcStatus::DeadlineExceeded), 1, fx);
            return Some(self.answer(
                GrpcStatus::DeadlineExceeded,
                "grpc-guard: the call's deadline passed while its request message, which carries its idempotency \
                 key, was still coming in",
                fx,
            ));
        }
        // Only the prefix is read until the whole message is buffered: a
        // message sent a byte at a time is copied once, not once per byte.
        let prefix = host.request_body(0, PREFIX_LEN.min(len)).unwrap_or_default();
        let read = match first_message(&prefix, len, self.method.max_request_message_bytes) {
            FirstMessage::Partial if !end_of_stream => return Some(Next::Pause),
            FirstMessage::Whole { compressed: false, len: message_len } => {
                let message = host.request_body(PREFIX_LEN, message_len).unwrap_or_default();
                protowire::field(&message, path).map(|key| Some(key.map(<[u8]>::to_vec)))
            }
            FirstMessage::Whole { compressed: true, .. } => Ok(None),
            FirstMessage::TooLargeToHold(declared) => {
                self.dedup = None;
                self.count(Family::RequestTooLarge, None, 1, fx);
                self.count(Family::Refused, None, 1, fx);
                let message = format!(
                    "grpc-guard: request message of {declared} bytes is over the {MAX_HELD_MESSAGE} bytes grpc-guard \
                     holds to read its idempotency key; set limits.max_request_message_bytes for this method to \
                     allow more"
                );
                return Some(self.answer(GrpcStatus::ResourceExhausted, message, fx));
            }
            // Cut short, too large or not gRPC: the frame reader answers for
            // those; any key is the header's.
            FirstMessage::Partial | FirstMessage::Other => Ok(Some(None)),
        };
        // Released now. Its `grpc-timeout` stays as it was: Envoy's timer
        // (`max_stream_duration`) takes the stream's age off it when the
        // route is resolved, so a header cut by the time held would be
        // counted twice (measured: `a_slow_claim_counts_once_…`).
        self.dedup = None;
        let header = host.request_header(&config.header).map(<[u8]>::to_vec);
        // For the refusals only: most calls never spell it out.
        let field = || path.iter().map(u32::to_string).collect::<Vec<_>>().join(".");
        let next = match read {
            Ok(Some(Some(key))) if !key.is_empty() => match key.len() {
                n if n > 255 => self.refuse_key(
                    format!(
                        "grpc-guard: idempotency key (request field {}) is {n} bytes; at most 255 are allowed",
                        field()
                    ),
                    fx,
                ),
                _ => self.claim_key(worker, config, host, &key, now, false, fx),
            },
            // The field is empty or absent: the header may still carry a key.
            Ok(Some(_)) => self.dedup_request_headers(worker, config, host, header, now, false, fx),
            // A compressed message hides the field. A key in the header
            // stands; without one the call is refused as a server refuses
            // a compression it does not take (gRPC's compression spec).
            Ok(None) if header.is_some() => self.dedup_request_headers(worker, config, host, header, now, false, fx),
            Ok(None) => {
                // Unimplemented is a server-side code: counted as refused, so
                // the error-ratio alert leaves it out.
                self.set_outcome(DedupOutcome::BadKey, Family::DedupKeyRejected, fx);
                self.count(Family::Refused, None, 1, fx);
                let message = format!(
                    "grpc-guard: {} reads its idempotency key from request field {}, which a compressed \
                     message hides; send it uncompressed (or with the {} header)",
                    self.method_name(),
                    field(),
                    config.header
                );
                let accept = vec![("grpc-accept-encoding".to_owned(), "identity".to_owned())];
                self.answer_with(GrpcStatus::Unimplemented, message, accept, fx)
            }
            Err(e) => self.refuse_key(
                format!(
                    "grpc-guard: the request message {e}, so its idempotency key (field {}) cannot be read",
                    field()
                ),
                fx,
            ),
        };
        if matches!(self.dedup.as_deref(), Some(Phase::Claiming(_))) {
            // Claimed on etcd, its answer awaited: the held body is read now
            // as any chunk during a claim (fingerprinted, framed, held).
            return Some(Next::Continue);
        }
        Some(next)
    }

    /// Claims `key` for this call, or answers it from what the key's first
    /// call left.
    /// `now` is when the call goes on: its claim runs from then.
    #[allow(clippy::too_many_arguments)]
    fn claim_key<H: Host>(
        &mut self,
        worker: &Worker,
        config: &DedupConfig,
        host: &mut H,
        key: &[u8],
        now: u64,
        end_of_stream: bool,
        fx: &mut Effects,
    ) -> Next {
        let scope: Vec<(bool, Vec<u8>)> = config
            .scope
            .iter()
            .map(|part| {
                let value = match part {
                    ScopePart::SourcePrincipal => host.property(&["source", "principal"]),
                    ScopePart::Header(name) => host.request_header(name).map(<[u8]>::to_vec),
                    // Only a text value names someone: a struct or a number
                    // comes serialized, in no stable form, and counts as absent.
                    ScopePart::Metadata(_) => part
                        .property_path()
                        .and_then(|path| host.property(&path))
                        .filter(|v| std::str::from_utf8(v).is_ok_and(|t| !t.chars().any(char::is_control))),
                };
                (part.is_identity(), value.unwrap_or_default())
            })
            .collect();
        if scope.iter().all(|(identity, value)| !identity || value.is_empty()) {
            self.set_outcome(DedupOutcome::Anonymous, Family::DedupAnonymous, fx);
            return match config.anonymous {
                Anonymous::Forward => Next::Continue,
                Anonymous::Reject => self.answer(
                    GrpcStatus::Unauthenticated,
                    "grpc-guard: an idempotency key needs a caller identity (mTLS peer, verified JWT or \
                     credentials) so that no other caller can be answered with this call's result",
                    fx,
                ),
            };
        }
        // The caller is who it is, not which virtual host it called: only the
        // identity parts count towards its share.
        let identity: Vec<&[u8]> = scope.iter().filter(|(id, _)| *id).map(|(_, v)| v.as_slice()).collect();
        let caller = caller_tag(&identity);
        let mut parts: Vec<&[u8]> = scope.iter().map(|(_, v)| v.as_slice()).collect();
        // A deduplicated method always has a well-formed path: `pkg.Svc/Method`.
        parts.push(self.method_name().as_bytes());
        parts.push(key);
        let key = digest(&parts);
        let owner = worker.owner_id(self.stream, self.start_ns);
        // What is left of its deadline from `now` (all of it at its headers).
        let in_flight_for = self.deadline_left(now).unwrap_or(config.ttl);
        let claim_until = now
            .saturating_add(u64::try_from(in_flight_for.as_nanos()).unwrap_or(u64::MAX))
            .saturating_add(CLAIM_GRACE_NS);
        let etcd = match &config.store {
            DedupStore::Local => {
                let lookup = config.table().lookup_or_claim(host, &key, caller, owner, now, claim_until);
                return self.on_lookup(config, lookup, end_of_stream, Fingerprint::default(), fx);
            }
            DedupStore::Etcd(etcd) => etcd,
        };
        let entry = Entry {
            state: State::InFlight,
            owner,
            claim_until,
            // An unsettled claim keeps the key as "may have run" for the TTL
            // after it, as in the local table.
            expires: claim_until.saturating_add(nanos(config.ttl)),
            fingerprint: [0; 32],
            answer: None,
        };
        let held = EtcdHeld { key: etcd::key(&etcd.prefix, &key), entry: entry.encode(), claim_until, lease: None };
        let mut claiming = Claiming {
            held,
            awaiting: Awaiting::Claim,
            resent: 0,
            take_overs: 0,
            re_leased: false,
            end_of_stream,
            body: Fingerprint::default(),
            body_seen: 0,
            last: None,
        };
        let lease = worker.etcd_lease.filter(|l| now < l.usable_until);
        let request = match lease {
            Some(lease) => claiming.claim(lease),
            None => {
                // No lease yet (the worker's first keyed call), or it is
                // about to run out: this call asks for one first.
                claiming.awaiting = Awaiting::Lease { asked_at: now };
                lease_request(etcd)
            }
        };
        self.send_claim(etcd, claiming, request, now, fx)
    }

    /// What is left at `now` of the call's deadline, if it has one.
    fn deadline_left(&self, now: u64) -> Option<Duration> {
        self.deadline.map(|d| d.saturating_sub(Duration::from_nanos(now.saturating_sub(self.start_ns))))
    }

    /// The call's deadline passed before its claim was answered: refused,
    /// not run.
    fn past_deadline_while_claimed(&mut self, fx: &mut Effects) -> Next {
        self.count(Family::DeadlineRejected, Some(GrpcStatus::DeadlineExceeded), 1, fx);
        self.answer(
            GrpcStatus::DeadlineExceeded,
            "grpc-guard: the call's deadline passed while its idempotency key was being claimed; it was not run",
            fx,
        )
    }

    /// Sends a claim's next request, within its timeout and what is left of
    /// the call's deadline; pauses the call until it is answered.
    fn send_claim(
        &mut self,
        etcd: &EtcdConfig,
        mut claiming: Claiming,
        mut request: EtcdRequest,
        now: u64,
        fx: &mut Effects,
    ) -> Next {
        let left = self.deadline_left(now);
        if left.is_some_and(|l| l.is_zero()) {
            return self.past_deadline_while_claimed(fx);
        }
        request.timeout = left.map_or(etcd.timeout, |l| l.min(etcd.timeout));
        claiming.last = Some(request.clone());
        fx.push(Effect::Etcd(Box::new(request)));
        self.dedup = Some(Box::new(Phase::Claiming(claiming)));
        Next::Pause
    }

    /// The etcd store answered a request of this call: its claim goes on,
    /// is decided, or fails by the failure policy. `Continue` resumes the
    /// paused request.
    pub fn on_etcd_answer<H: Host>(
        &mut self,
        worker: &mut crate::worker::Worker,
        host: &mut H,
        reply: EtcdReply,
        fx: &mut Effects,
    ) -> Next {
        let mut claiming = match self.dedup.take().map(|p| *p) {
            Some(Phase::Claiming(claiming)) => claiming,
            Some(Phase::Settling { request }) => return self.on_settled(request, &reply, fx),
            other => {
                // Not waiting (an answer after the call was decided).
                self.dedup = other.map(Box::new);
                return Next::Pause;
            }
        };
        let Some(config) = worker.config.dedup.as_ref() else { return Next::Continue };
        let DedupStore::Etcd(etcd) = &config.store else { return Next::Continue };
        let now = host.now_ns();
        if reply.status != 0 {
            fx.push(Effect::CountGuard(guard::DEDUP_STORE_ERRORS));
            if self.deadline_left(now).is_some_and(|l| l.is_zero()) {
                // The call's own deadline ended the wait, not etcd.
                if claiming.awaiting == Awaiting::Claim {
                    release(etcd, &claiming.held, fx);
                }
                return self.past_deadline_while_claimed(fx);
            }
            if reply.status == ETCD_FULL && claiming.awaiting == Awaiting::Claim {
                // No write passes, but the key may hold a kept answer: read it.
                claiming.awaiting = Awaiting::Read;
                let request = kv_request(etcd::RANGE, etcd::range(&claiming.held.key), etcd.timeout, false);
                return self.send_claim(etcd, claiming, request, now, fx);
            }
            if reply.status == LEASE_GONE && claiming.awaiting == Awaiting::Claim && !claiming.re_leased {
                // The worker's lease is gone from etcd (revoked, etcd
                // restored): nothing was written; a new lease, then the claim.
                worker.etcd_lease = None;
                claiming.re_leased = true;
                claiming.awaiting = Awaiting::Lease { asked_at: now };
                return self.send_claim(etcd, claiming, lease_request(etcd), now, fx);
            }
            if RESEND_ON.contains(&reply.status) && claiming.resent < CLAIM_RESENDS {
                if let Some(request) = claiming.last.take() {
                    claiming.resent += 1;
                    return self.send_claim(etcd, claiming, request, now, fx);
                }
            }
            if claiming.awaiting == Awaiting::Claim {
                // A claim that timed out may still be committed (etcd between
                // leaders): taken back, by the worker, so that the call it
                // never ran does not hold its key.
                release(etcd, &claiming.held, fx);
            }
            return self.store_failed(etcd, &reply, fx);
        }
        match claiming.awaiting {
            Awaiting::Lease { asked_at } => match etcd::parse_lease(&reply.body) {
                Ok(id) => {
                    let lease = etcd.lease.lease(id, asked_at);
                    worker.etcd_lease = Some(lease);
                    claiming.awaiting = Awaiting::Claim;
                    let request = claiming.claim(lease);
                    self.send_claim(etcd, claiming, request, now, fx)
                }
                Err(e) => {
                    fx.push(Effect::CountGuard(guard::DEDUP_STORE_ERRORS));
                    let reply = EtcdReply { status: 2, message: e, body: Vec::new() };
                    self.store_failed(etcd, &reply, fx)
                }
            },
            Awaiting::Read => {
                let lookup = match etcd::parse_range(&reply.body) {
                    Ok(TxnAnswer::Existing { value, .. }) => {
                        Entry::decode(&value).map_or(Some(Lookup::Abandoned), |e| e.lookup(now))
                    }
                    _ => None,
                };
                let end_of_stream = claiming.end_of_stream;
                match lookup {
                    Some(lookup) => self.on_lookup(config, lookup, end_of_stream, claiming.body, fx),
                    None => {
                        // Not there and nothing can be written: a full table.
                        self.set_outcome(DedupOutcome::Full, Family::DedupFull, fx);
                        let message = "grpc-guard: the idempotency store is full (etcd refuses writes: its database \
                                       is out of space); retry later";
                        self.when_full(config, message, fx)
                    }
                }
            }
            Awaiting::Claim => {
                let found = match etcd::parse_txn(&reply.body) {
                    Ok(found) => found,
                    Err(e) => {
                        fx.push(Effect::CountGuard(guard::DEDUP_STORE_ERRORS));
                        release(etcd, &claiming.held, fx);
                        let reply = EtcdReply { status: 2, message: format!("a claim answer that {e}"), body: vec![] };
                        return self.store_failed(etcd, &reply, fx);
                    }
                };
                let lookup = match found {
                    TxnAnswer::Applied => None,
                    // Its own claim, written by a request sent again.
                    TxnAnswer::Existing { value, .. } if value == claiming.held.entry => None,
                    TxnAnswer::Existing { value, mod_revision } => match Entry::decode(&value) {
                        // Something not written by grpc-guard is never trusted
                        // or overwritten.
                        None => Some(Lookup::Abandoned),
                        Some(entry) => match entry.lookup(now) {
                            Some(lookup) => Some(lookup),
                            None if claiming.take_overs < TAKE_OVERS => {
                                // Expired, not yet dropped with its lease.
                                claiming.take_overs += 1;
                                let request = claiming.take_over(mod_revision);
                                return self.send_claim(etcd, claiming, request, now, fx);
                            }
                            None => Some(Lookup::Contended),
                        },
                    },
                    TxnAnswer::Missing => Some(Lookup::Contended),
                };
                // One that goes on keeps its `grpc-timeout` as it was: Envoy
                // takes the stream's age (the claim's time included) off it
                // when it starts its timer.
                let end_of_stream = claiming.end_of_stream;
                match lookup {
                    None => {
                        let next = self.first_call(config, Held::Etcd(claiming.held), fx);
                        if let Some(Phase::First(first)) = self.dedup.as_deref_mut() {
                            first.request = claiming.body;
                            first.request_ended = end_of_stream;
                        }
                        // What Envoy held goes on now.
                        self.forwarded_messages = self.request.messages();
                        next
                    }
                    Some(lookup) => self.on_lookup(config, lookup, end_of_stream, claiming.body, fx),
                }
            }
        }
    }

    /// The etcd store failed a claim: by default the call is refused
    /// UNAVAILABLE (retryable; nothing ran), with `fail_open` it runs
    /// undeduplicated.
    fn store_failed(&mut self, etcd: &EtcdConfig, reply: &EtcdReply, fx: &mut Effects) -> Next {
        let code = GrpcStatus::from_code(reply.status).map_or("status ?", GrpcStatus::go_name);
        let why = format!("etcd: {code}: {}", reply.message);
        if etcd.fail_open {
            self.dedup_outcome = DedupOutcome::StoreFailedOpen;
            // Logged whatever its status (`dedup: store_failed_open`).
            fx.push(Effect::CountGuard(guard::DEDUP_FAILED_OPEN));
            return Next::Continue;
        }
        self.dedup_outcome = DedupOutcome::StoreUnavailable;
        self.count(Family::Refused, None, 1, fx);
        self.answer(
            GrpcStatus::Unavailable,
            format!("grpc-guard: the idempotency store did not answer ({why}); the call was not run; retry"),
            fx,
        )
    }

    /// A first call: it runs upstream, and what it ends with will be kept.
    fn first_call(&mut self, config: &DedupConfig, claim: Held, fx: &mut Effects) -> Next {
        self.set_outcome(DedupOutcome::First, Family::DedupFirst, fx);
        self.dedup = Some(Box::new(Phase::First(FirstCall {
            claim,
            request: Fingerprint::default(),
            answer: Answer { status: GrpcStatus::Ok, headers: Vec::new(), body: Vec::new(), trailers: Vec::new() },
            max_body: config.max_response_bytes as usize,
            max_metadata: config.max_metadata_bytes as usize,
            too_large: false,
            request_ended: false,
        })));
        Next::Continue
    }

    /// What a call does with what it found under its key.
    /// `seen`: the request body's fingerprint so far.
    fn on_lookup(
        &mut self,
        config: &DedupConfig,
        lookup: Lookup,
        end_of_stream: bool,
        seen: Fingerprint,
        fx: &mut Effects,
    ) -> Next {
        match lookup {
            Lookup::Claimed { claim, evicted } => {
                let next = self.first_call(config, Held::Local(claim), fx);
                if evicted {
                    self.count(Family::DedupEvicted, None, 1, fx);
                }
                next
            }
            Lookup::InFlight | Lookup::Contended => {
                self.set_outcome(DedupOutcome::InFlight, Family::DedupInFlight, fx);
                self.count(Family::Refused, None, 1, fx);
                self.answer(
                    GrpcStatus::Aborted,
                    "grpc-guard: a call with this idempotency key is in progress; retry",
                    fx,
                )
            }
            Lookup::Abandoned => self.answer_unknown(fx),
            Lookup::Done { fingerprint, outcome } => {
                self.dedup = Some(Box::new(Phase::Verify { fingerprint, outcome, seen }));
                // Only the whole request's fingerprint tells a retry from a
                // reuse of the key, and a paused header callback would hold the
                // body back from this filter too (proxy-wasm turns Pause into
                // StopAllIteration). So the retry goes on now, but to the
                // replay hop, never upstream, its body emptied as it passes;
                // the hop answers only at the request's end, after this
                // filter's check.
                fx.push(Effect::SetRequestHeader(
                    Cow::Borrowed("content-type"),
                    REPLAY_CONTENT_TYPE.as_bytes().to_vec(),
                ));
                fx.push(Effect::MarkReplay);
                // Its body is emptied as it passes: a declared length left in
                // place would have the hop wait for bytes that never come.
                fx.push(Effect::RemoveRequestHeader("content-length"));
                // Should the replay route be missing (an Istio install without
                // its EnvoyFilter), the retry reaches the service on a path no
                // method has: it is answered Unimplemented, never executed.
                let replay_path = format!("{REPLAY_PATH_PREFIX}{}", self.path);
                fx.push(Effect::SetRequestHeader(Cow::Borrowed(":path"), replay_path.into_bytes()));
                if end_of_stream {
                    return self.verify_and_answer(fx);
                }
                Next::Continue
            }
            Lookup::Full => {
                self.set_outcome(DedupOutcome::Full, Family::DedupFull, fx);
                self.when_full(config, "grpc-guard: the idempotency table is full; retry later", fx)
            }
            Lookup::CallerFull => {
                self.set_outcome(DedupOutcome::CallerFull, Family::DedupCallerFull, fx);
                self.when_full(
                    config,
                    "grpc-guard: this caller holds its whole share of the idempotency table; retry later",
                    fx,
                )
            }
        }
    }

    fn when_full(&mut self, config: &DedupConfig, message: &str, fx: &mut Effects) -> Next {
        match config.when_full {
            WhenFull::Forward => Next::Continue,
            WhenFull::Reject => self.answer(GrpcStatus::ResourceExhausted, message, fx),
        }
    }

    /// A retry of a key whose first call may have run: not run again, and
    /// not retried by gRPC's default or the README's client policy.
    fn answer_unknown(&mut self, fx: &mut Effects) -> Next {
        self.set_outcome(DedupOutcome::Unknown, Family::DedupUnknown, fx);
        self.answer(
            GrpcStatus::FailedPrecondition,
            "grpc-guard: an earlier call with this idempotency key ended without an answer (deadline, cancel or \
             reset) and may have run; it is not run again while the key is kept",
            fx,
        )
    }

    /// A request body chunk of a keyed call.
    pub(super) fn dedup_request_body<H: Host>(
        &mut self,
        worker_etcd: Option<&EtcdConfig>,
        host: &mut H,
        len: usize,
        end_of_stream: bool,
        fx: &mut Effects,
    ) -> Chunk {
        match self.dedup.as_deref_mut() {
            Some(Phase::Verify { seen, .. }) => {
                // Fingerprinted as it streams, then emptied: a retry on its
                // way to the replay hop holds no memory, whatever its size.
                let chunk = host.request_body(0, len).unwrap_or_default();
                seen.update(&chunk);
                fx.push(Effect::ReplaceRequestBody(Vec::new()));
                let _ = self.read_frames(Side::Request, len, from_slice(&chunk), fx);
                Chunk::Handled(if end_of_stream { self.verify_and_answer(fx) } else { Next::Continue })
            }
            Some(Phase::First(first)) => {
                let chunk = host.request_body(0, len);
                if let Some(chunk) = &chunk {
                    first.request.update(chunk);
                }
                first.request_ended |= end_of_stream;
                Chunk::Read(chunk)
            }
            // Held until the store answers (Envoy buffers it): fingerprinted
            // and read now, as it will not pass this filter again. Envoy hands
            // over all it holds each time: only the new bytes are read.
            Some(Phase::Claiming(claiming)) if len as u64 > MAX_HELD_MESSAGE => {
                // More than grpc-guard holds while a claim is in flight (and
                // more than Envoy buffers by default): refused, claim taken
                // back, rather than Envoy's 413.
                let held = claiming.held.clone();
                let claimed = claiming.awaiting == Awaiting::Claim;
                self.dedup = None;
                if let (true, Some(etcd)) = (claimed, worker_etcd) {
                    release(etcd, &held, fx);
                }
                self.count(Family::RequestTooLarge, None, 1, fx);
                self.count(Family::Refused, None, 1, fx);
                let message = format!(
                    "grpc-guard: a keyed request of more than {MAX_HELD_MESSAGE} bytes is more than grpc-guard holds \
                     while its idempotency key is claimed on etcd"
                );
                Chunk::Handled(self.answer(GrpcStatus::ResourceExhausted, message, fx))
            }
            Some(Phase::Claiming(claiming)) => {
                let new = host.request_body(claiming.body_seen, len.saturating_sub(claiming.body_seen));
                let new = new.unwrap_or_default();
                claiming.body_seen = len;
                claiming.body.update(&new);
                claiming.end_of_stream |= end_of_stream;
                Chunk::Hold(new)
            }
            Some(Phase::Replay(_) | Phase::AwaitKey { .. } | Phase::Settling { .. }) | None => Chunk::Read(None),
        }
    }

    /// The body bytes buffered for a call still held for its key field.
    pub(super) fn key_field_held(&self) -> Option<usize> {
        match self.dedup.as_deref() {
            Some(Phase::AwaitKey { held }) => Some(*held),
            _ => None,
        }
    }

    /// The request trailers of a keyed call: a retry's request ends here.
    pub(super) fn dedup_request_trailers<H: Host>(&mut self, _host: &mut H, fx: &mut Effects) -> Option<Next> {
        match self.dedup.as_deref_mut() {
            Some(Phase::Verify { .. }) => Some(self.verify_and_answer(fx)),
            Some(Phase::Claiming(claiming)) => {
                claiming.end_of_stream = true;
                Some(Next::Pause)
            }
            Some(Phase::First(first)) => {
                first.request_ended = true;
                None
            }
            _ => None,
        }
    }

    /// A retry of a finished key, its whole request seen: answer with what
    /// the first call left if the request is the same, refuse it otherwise.
    fn verify_and_answer(&mut self, fx: &mut Effects) -> Next {
        let Some(Phase::Verify { fingerprint, outcome, seen }) = self.dedup.take().map(|p| *p) else {
            return Next::Continue;
        };
        if seen.finish() != fingerprint {
            self.set_outcome(DedupOutcome::Mismatch, Family::DedupMismatch, fx);
            return self.answer(
                GrpcStatus::InvalidArgument,
                "grpc-guard: idempotency key reused with a different request",
                fx,
            );
        }
        let answer = match outcome {
            Outcome::Kept(answer) => answer,
            Outcome::NotKept => {
                self.set_outcome(DedupOutcome::NotKept, Family::DedupNotKept, fx);
                return self.answer(
                    GrpcStatus::AlreadyExists,
                    "grpc-guard: this call already ran; its answer was too large to keep for replay",
                    fx,
                );
            }
            Outcome::Unknown => return self.answer_unknown(fx),
        };
        self.dedup_outcome = DedupOutcome::Replay;
        self.answered_by_guard = true;
        if answer.status != GrpcStatus::Ok {
            // An error has no message: a trailers-only local reply carries it
            // whole, status details and metadata included. Its values were
            // kept only if they are text (checked when it was kept).
            self.count(Family::DedupReplayed, None, 1, fx);
            let mut headers = vec![("grpc-status".to_owned(), answer.status.code().to_string())];
            let text = |pairs: &[(String, Vec<u8>)]| -> Vec<(String, String)> {
                pairs
                    .iter()
                    .filter(|(n, _)| n != "grpc-status" && n != "content-type")
                    .map(|(n, v)| (n.clone(), lossy(v.clone())))
                    .collect()
            };
            headers.extend(text(&answer.trailers));
            headers.extend(text(&answer.headers));
            headers.push((REPLAYED_HEADER.to_owned(), "true".to_owned()));
            fx.push(Effect::Reply(Reply::Http { code: 200, headers, body: None }));
            return Next::Pause;
        }
        // An OK answer carries a message: the retry, already on its way to the
        // replay hop, is let through; its answer is rewritten on the way back.
        self.dedup = Some(Box::new(Phase::Replay(answer)));
        Next::Continue
    }

    /// Response headers of a retry sent to the replay hop: true when they
    /// were the hop's answer and now are the kept answer's.
    pub(super) fn replay_response_headers<H: Host>(&mut self, host: &mut H, fx: &mut Effects) -> bool {
        let Some(Phase::Replay(answer)) = self.dedup.as_deref() else { return false };
        let hop_answered =
            host.response_header(":status") == Some(b"200") && host.response_header("grpc-status").is_none();
        if !hop_answered {
            // The replay hop failed (no route, no listener): its answer goes
            // to the client as it is, unmarked.
            self.dedup = None;
            self.dedup_outcome = DedupOutcome::ReplayFailed;
            return false;
        }
        // The internal listener's plain 200 becomes the kept gRPC answer:
        // its content type, encoding and metadata; its body and trailers
        // follow in the body step.
        let content_type = answer.headers.iter().find(|(n, _)| n == "content-type").map(|(_, v)| v.clone());
        fx.push(Effect::SetResponseHeader(
            Cow::Borrowed("content-type"),
            content_type.unwrap_or_else(|| b"application/grpc".to_vec()),
        ));
        fx.push(Effect::RemoveResponseHeader("content-length"));
        for (name, value) in answer.headers.iter().filter(|(n, _)| n != "content-type") {
            // Added, not set: a name may carry several values.
            fx.push(Effect::AddResponseHeader(name.clone(), value.clone()));
        }
        fx.push(Effect::SetResponseHeader(Cow::Borrowed(REPLAYED_HEADER), b"true".to_vec()));
        self.count(Family::DedupReplayed, None, 1, fx);
        self.seen.http_status = Some(200);
        self.response_headers_read = true;
        true
    }

    /// A response body chunk of a keyed call.
    pub(super) fn dedup_response_body<H: Host>(
        &mut self,
        host: &mut H,
        len: usize,
        end_of_stream: bool,
        fx: &mut Effects,
    ) -> Chunk {
        match self.dedup.as_deref_mut() {
            Some(Phase::Replay(_)) => {
                // Hold the placeholder until the end, then put the kept
                // message and trailers in its place (trailers can be added
                // only here, at end of stream).
                if !end_of_stream {
                    return Chunk::Handled(Next::Pause);
                }
                let Some(Phase::Replay(answer)) = self.dedup.take().map(|p| *p) else { return Chunk::Read(None) };
                self.seen.trailer_status = Some(answer.status);
                self.seen.complete = true;
                self.note_answer(host);
                let _ = self.read_frames(Side::Response, answer.body.len(), from_slice(&answer.body), fx);
                fx.push(Effect::ReplaceResponseBody(answer.body));
                // The status as the first call ended, whichever block carried it.
                fx.push(Effect::AddResponseTrailer(
                    "grpc-status".to_owned(),
                    answer.status.code().to_string().into_bytes(),
                ));
                for (name, value) in answer.trailers.into_iter().filter(|(n, _)| n != "grpc-status") {
                    fx.push(Effect::AddResponseTrailer(name, value));
                }
                self.tag_seen_status(fx);
                Chunk::Handled(Next::Continue)
            }
            Some(Phase::First(first)) if !first.too_large => {
                if first.answer.body.len() + len > first.max_body {
                    first.too_large = true;
                    first.answer.body = Vec::new();
                    return Chunk::Read(None);
                }
                let chunk = host.response_body(0, len);
                if let Some(chunk) = &chunk {
                    first.answer.body.extend_from_slice(chunk);
                }
                Chunk::Read(chunk)
            }
            _ => Chunk::Read(None),
        }
    }

    /// The response headers of a first call: what a replay needs of them. In
    /// a trailers-only answer the status headers stand for the trailers.
    pub(super) fn keep_response_headers<H: Host>(&mut self, host: &mut H) {
        let Some(Phase::First(first)) = self.dedup.as_deref_mut() else { return };
        let all = host.response_headers();
        let status = |n: &str| matches!(n, "grpc-status" | "grpc-message" | "grpc-status-details-bin");
        let trailers_only = all.iter().any(|(n, _)| n == "grpc-status");
        let (statuses, headers): (Vec<_>, Vec<_>) =
            all.into_iter().filter(|(n, _)| kept_header(n)).partition(|(n, _)| status(n));
        first.keep_metadata(headers, false);
        if trailers_only {
            first.keep_metadata(statuses, true);
        }
    }

    /// The trailers of a first call, kept whole.
    pub(super) fn keep_trailers<H: Host>(&mut self, host: &mut H) {
        if let Some(Phase::First(first)) = self.dedup.as_deref_mut() {
            first.keep_metadata(host.response_trailers(), true);
        }
    }

    /// Settles the first call of a key by how it ended: keep what a retry
    /// would get again, free the key if the call provably did not run, keep
    /// it as "may have run" otherwise.
    pub(super) fn dedup_settle<H: Host>(
        &mut self,
        worker: &Worker,
        host: &mut H,
        status: GrpcStatus,
        source: StatusSource,
        fx: &mut Effects,
    ) {
        let Some(config) = worker.config.dedup.as_ref() else { return };
        let first = match self.dedup.take().map(|p| *p) {
            Some(Phase::First(first)) => first,
            Some(Phase::Claiming(claiming)) => {
                // The stream ended while its claim was in flight: the claim
                // may have been written. It is taken back if it was (nothing
                // ran: the request never went on).
                if let (Awaiting::Claim, Some(etcd)) = (claiming.awaiting, worker.etcd()) {
                    release(etcd, &claiming.held, fx);
                }
                return;
            }
            Some(Phase::Settling { mut request }) => {
                // The client left while its outcome was being written: the
                // write is sent again by the worker (harmless if it landed).
                request.detached = true;
                fx.push(Effect::Etcd(Box::new(request)));
                return;
            }
            _ => return,
        };
        if let Some((txn, fallback)) = self.settle_first(config, host, first, status, source, fx) {
            if let Some(etcd) = worker.etcd() {
                fx.push(Effect::Etcd(Box::new(outcome_request(etcd, txn, fallback, true))));
            }
        }
    }

    /// The response of a first call on the etcd store has ended, with
    /// `status` from `source`: its outcome is written before the end goes to
    /// the client, so that a retry through any Envoy, even one that starts
    /// right after this one stopped, finds it. `Pause` while the write is
    /// in flight (one round trip; the call's second and last).
    pub(super) fn settle_before_answering<H: Host>(
        &mut self,
        worker: &Worker,
        host: &mut H,
        status: GrpcStatus,
        source: StatusSource,
        fx: &mut Effects,
    ) -> Next {
        let (Some(config), Some(etcd)) = (worker.config.dedup.as_ref(), worker.etcd()) else { return Next::Continue };
        let ready = matches!(self.dedup.as_deref(), Some(Phase::First(f)) if f.request_ended && matches!(f.claim, Held::Etcd(_)));
        if !ready {
            // A request still coming in: settled when the stream ends.
            return Next::Continue;
        }
        let Some(Phase::First(first)) = self.dedup.take().map(|p| *p) else { return Next::Continue };
        let Some((txn, fallback)) = self.settle_first(config, host, first, status, source, fx) else {
            return Next::Continue;
        };
        let request = outcome_request(etcd, txn, fallback, false);
        fx.push(Effect::Etcd(Box::new(request.clone())));
        self.dedup = Some(Box::new(Phase::Settling { request }));
        Next::Pause
    }

    /// The etcd store answered the write of a first call's outcome: the
    /// response goes on. A write that failed is left to the worker, which
    /// sends it again while it may not have arrived (the answer is not held
    /// back meanwhile).
    fn on_settled(&mut self, mut request: EtcdRequest, reply: &EtcdReply, fx: &mut Effects) -> Next {
        if reply.status != 0 {
            fx.push(Effect::CountGuard(guard::DEDUP_STORE_ERRORS));
            request.detached = true;
            if let Some(fallback) = request.fallback.take().filter(|_| etcd::too_large(reply.status, &reply.message)) {
                // Kept as done, without the answer etcd would not take.
                request.message = fallback;
                fx.push(Effect::Etcd(Box::new(request)));
            } else if etcd::resend_write(reply.status, 1) {
                fx.push(Effect::Etcd(Box::new(request)));
            } else {
                // The key stays claimed, then reads as "may have run".
                fx.push(Effect::CountGuard(guard::DEDUP_SETTLE_LOST));
            }
        }
        Next::Continue
    }

    /// What a first call leaves under its key: settled in the local table
    /// now, or the etcd transaction that settles it.
    fn settle_first<H: Host>(
        &mut self,
        config: &DedupConfig,
        host: &mut H,
        mut first: FirstCall,
        status: GrpcStatus,
        source: StatusSource,
        fx: &mut Effects,
    ) -> Option<(Vec<u8>, Option<Vec<u8>>)> {
        let ending = if self.forwarded_messages == 0 {
            // Checked first: an upstream may answer a unary call from its
            // headers or a message's prefix (UNIMPLEMENTED, OUT_OF_RANGE)
            // before the body is in, and a key kept then would hold the
            // fingerprint of a part of the request.
            Ending::NothingSent
        } else if self.details(host) == "via_upstream" {
            // The upstream answered, whether or not the request had ended.
            match source {
                StatusSource::Trailers | StatusSource::Headers => Ending::Upstream(status),
                StatusSource::Http | StatusSource::Missing => {
                    Ending::UpstreamHttp(self.seen.http_status.unwrap_or(200))
                }
                StatusSource::Reset => Ending::Envoy { sent: true },
            }
        } else {
            // Envoy ended it, or grpc-guard did after a message had gone on
            // (a bad frame, the size limit): it never left Envoy only if no
            // upstream connection carried it (no route, no healthy host,
            // connection refused, overflow).
            Ending::Envoy { sent: host.property(&["upstream", "local_address"]).is_some() }
        };
        let fingerprint = first.request.finish();
        let settlement = match disposition(ending) {
            Disposition::Free => Settlement::Free,
            Disposition::Unknown => Settlement::Unknown { fingerprint },
            Disposition::Keep => {
                first.answer.status = status;
                let answer = &first.answer;
                let fits = !first.too_large && answer.metadata_bytes() <= first.max_metadata;
                // An error is replayed as a local reply, whose header values
                // must be text: one that is not is not kept rather than changed.
                let text = |pairs: &[(String, Vec<u8>)]| pairs.iter().all(|(_, v)| std::str::from_utf8(v).is_ok());
                let replayable = status == GrpcStatus::Ok || (text(&answer.headers) && text(&answer.trailers));
                let kept = fits && replayable;
                if !kept {
                    self.dedup_outcome = DedupOutcome::NotKept;
                }
                Settlement::Keep { fingerprint, answer: kept.then_some(first.answer) }
            }
        };
        let now = host.now_ns();
        match &first.claim {
            Held::Local(claim) => {
                if !config.table().settle(host, claim, settlement, now) {
                    fx.push(Effect::CountGuard(guard::DEDUP_SETTLE_LOST));
                }
                None
            }
            Held::Etcd(held) => {
                // Past its claim the key already reads as "may have run", and
                // a longer life would outlast the lease: left as it is.
                let Some(lease) = held.lease.filter(|_| now < held.claim_until) else {
                    fx.push(Effect::CountGuard(guard::DEDUP_SETTLE_LOST));
                    return None;
                };
                let expires = now.saturating_add(nanos(config.ttl)).min(lease.ends);
                let settled = match settlement {
                    Settlement::Free => None,
                    Settlement::Keep { fingerprint, answer } => Some(Entry {
                        state: if answer.is_some() { State::Kept } else { State::NotKept },
                        owner: 0,
                        claim_until: held.claim_until,
                        expires,
                        fingerprint,
                        answer,
                    }),
                    Settlement::Unknown { fingerprint } => Some(Entry {
                        state: State::Unknown,
                        owner: 0,
                        claim_until: held.claim_until,
                        expires,
                        fingerprint,
                        answer: None,
                    }),
                };
                let owner = Entry::decode(&held.entry).map_or(0, |e| e.owner);
                let txn = |entry: &Entry| etcd::settle_txn(&held.key, &held.entry, Some(&entry.encode()), lease.id);
                Some(match settled {
                    None => (etcd::settle_txn(&held.key, &held.entry, None, lease.id), None),
                    Some(mut entry) => {
                        entry.owner = owner;
                        // Should etcd find the answer too large for it: kept
                        // as done, without the answer (`not_kept`).
                        let fallback = entry
                            .answer
                            .is_some()
                            .then(|| txn(&Entry { state: State::NotKept, answer: None, ..entry.clone() }));
                        (txn(&entry), fallback)
                    }
                })
            }
        }
    }
}
