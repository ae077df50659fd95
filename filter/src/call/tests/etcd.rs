//! A keyed call on the etcd store, driven natively against a model of
//! etcd's transactions (the end-to-end tests run a real etcd cluster):
//! what it sends, when it waits, and what each answer makes of the call.

use std::collections::BTreeMap;

use super::*;
use crate::etcd::{self, Entry};
use crate::protowire::write::{put_bytes, put_uint};
use crate::protowire::{fields, Value};

const ETCD: &str = r#"{"dedup":{"methods":["pkg.Orders/Create"],"store":"etcd","etcd":{"timeout":"800ms"}}}"#;

/// etcd's KV as the transactions see it: key → (value, mod revision).
#[derive(Default)]
struct Model {
    kv: BTreeMap<Vec<u8>, (Vec<u8>, i64)>,
    revision: i64,
    leases: i64,
}

/// The delimited fields `number` of `message`.
fn all(message: &[u8], number: u32) -> Vec<&[u8]> {
    fields(message)
        .filter_map(Result::ok)
        .filter_map(|(n, v)| match v {
            Value::Delimited(b) if n == number => Some(b),
            _ => None,
        })
        .collect()
}

fn varint(message: &[u8], number: u32) -> Option<u64> {
    fields(message).filter_map(Result::ok).find_map(|(n, v)| match v {
        Value::Varint(x) if n == number => Some(x),
        _ => None,
    })
}

impl Model {
    /// Runs a request as etcd would; the answer's message.
    fn serve(&mut self, request: &EtcdRequest) -> Vec<u8> {
        if request.method == etcd::LEASE_GRANT {
            self.leases += 1;
            let mut out = Vec::new();
            put_uint(&mut out, 2, 1000 + self.leases as u64);
            put_uint(&mut out, 3, varint(&request.message, 1).unwrap());
            return out;
        }
        if request.method == etcd::RANGE {
            let mut found = Vec::new();
            if let Some((value, rev)) = self.kv.get(all(&request.message, 1)[0]) {
                let mut kv = Vec::new();
                put_uint(&mut kv, 3, *rev as u64);
                put_bytes(&mut kv, 5, value);
                put_bytes(&mut found, 2, &kv);
            }
            return found;
        }
        let txn = &request.message;
        let holds = all(txn, 1).iter().all(|c| {
            let key = all(c, 3)[0];
            let current = self.kv.get(key);
            match varint(c, 2).unwrap_or(0) {
                1 => current.is_none() && varint(c, 5) == Some(0),
                2 => current.map(|(_, rev)| *rev as u64) == varint(c, 6),
                3 => current.map(|(v, _)| v.as_slice()) == all(c, 7).first().copied(),
                t => panic!("compare target {t}"),
            }
        });
        let mut out = Vec::new();
        if holds {
            put_uint(&mut out, 2, 1);
        }
        for op in all(txn, if holds { 2 } else { 3 }) {
            let mut response = Vec::new();
            if let Some(put) = all(op, 2).first() {
                self.revision += 1;
                self.kv.insert(all(put, 1)[0].to_vec(), (all(put, 2)[0].to_vec(), self.revision));
            } else if let Some(delete) = all(op, 3).first() {
                self.kv.remove(all(delete, 1)[0]);
            } else if let Some(range) = all(op, 1).first() {
                let mut found = Vec::new();
                if let Some((value, rev)) = self.kv.get(all(range, 1)[0]) {
                    let mut kv = Vec::new();
                    put_uint(&mut kv, 3, *rev as u64);
                    put_bytes(&mut kv, 5, value);
                    put_bytes(&mut found, 2, &kv);
                }
                put_bytes(&mut response, 1, &found);
            }
            put_bytes(&mut out, 3, &response);
        }
        out
    }

    fn entries(&self) -> Vec<Entry> {
        self.kv.values().map(|(v, _)| Entry::decode(v).expect("grpc-guard's entry")).collect()
    }
}

impl Stream<'_> {
    /// The request the call waits for, answered by `etcd`; what the call
    /// does then.
    fn etcd_answers(&mut self, etcd: &mut Model) -> Next {
        let request = self.awaited();
        let body = etcd.serve(&request);
        self.etcd_reply(EtcdReply { status: 0, message: String::new(), body })
    }

    /// The request the call waits for fails with `status`.
    fn etcd_fails(&mut self, status: u32) -> Next {
        let _ = self.awaited();
        self.etcd_reply(EtcdReply { status, message: "connection refused".into(), body: Vec::new() })
    }

    fn etcd_reply(&mut self, reply: EtcdReply) -> Next {
        let call = self.call.as_mut().unwrap();
        let next = call.on_etcd_answer(self.worker, &mut self.host, reply, &mut self.fx);
        self.apply(next)
    }

    /// The request the call waits for, left in place.
    fn awaited_peek(&self) -> &EtcdRequest {
        self.seen.etcd.iter().rev().find(|r| !r.detached).expect("the call waits for etcd")
    }

    /// The last request sent that a call waits for (not a detached one).
    fn awaited(&mut self) -> EtcdRequest {
        let at = self.seen.etcd.iter().rposition(|r| !r.detached).expect("the call waits for etcd");
        self.seen.etcd.remove(at)
    }
}

/// The upstream's OK answer; its end held for the outcome write.
fn answers_ok(s: &mut Stream) {
    s.response_headers(&[(":status", "200"), ("content-type", "application/grpc")], false);
    s.response_body(&frame(b"reply"), false);
    assert_eq!(s.trailers(&[("grpc-status", "0")]), Next::Pause);
}

/// A keyed call's request headers, its claim answered by `etcd`, on to
/// its request body.
fn claimed<'w>(envoy: &Envoy, worker: &'w mut Worker, etcd: &mut Model, key: &str, body: &[u8]) -> Stream<'w> {
    let mut s = Stream::open(envoy, worker, PATH, &[(KEY, key)]);
    assert_eq!(s.headers(false), Next::Pause, "held while the key is claimed");
    // The worker's first keyed call asks for a lease first.
    while s.seen.etcd.last().is_some_and(|r| r.method == etcd::LEASE_GRANT) {
        assert_eq!(s.etcd_answers(etcd), Next::Pause);
    }
    let next = s.etcd_answers(etcd);
    if next == Next::Continue {
        s.request_body(&frame(body), true);
    }
    s
}

#[test]
fn a_first_call_claims_in_one_transaction_and_its_answer_waits_for_the_outcome_write() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(ETCD);
    let mut model = Model::default();
    let mut s = claimed(&envoy, &mut worker, &mut model, "order-1", b"create 1");
    assert_eq!(s.seen.log.as_ref(), None);
    assert_eq!(model.entries()[0].state, crate::dedup::State::InFlight);
    assert!(s.seen.etcd.is_empty(), "one lease grant, one claim: nothing else sent");
    s.response_headers(&[(":status", "200"), ("content-type", "application/grpc")], false);
    s.response_body(&frame(b"reply"), false);
    assert_eq!(s.trailers(&[("grpc-status", "0")]), Next::Pause, "the answer's end waits for the write");
    assert_eq!(model.entries()[0].state, crate::dedup::State::InFlight, "not written yet");
    assert_eq!(s.etcd_answers(&mut model), Next::Continue, "written: the end goes on");
    let entry = &model.entries()[0];
    assert_eq!(entry.state, crate::dedup::State::Kept);
    assert_eq!(entry.answer.as_ref().unwrap().body, frame(b"reply"));
    let seen = s.finish("via_upstream");
    assert_eq!(seen.log("dedup"), "first");
    assert!(seen.etcd.is_empty(), "settled once: nothing more at the stream's end");

    // A retry on another Envoy (its own worker and lease): one read, replayed.
    let other = Envoy::default();
    let mut worker = other.worker(ETCD);
    let mut s = Stream::open(&other, &mut worker, PATH, &[(KEY, "order-1")]);
    assert_eq!(s.headers(false), Next::Pause);
    assert_eq!(s.etcd_answers(&mut model), Next::Pause, "its lease");
    assert_eq!(s.etcd_answers(&mut model), Next::Continue, "the claim's read finds the kept answer");
    assert_sent_to_replay_hop(&s);
    s.request_body(&frame(b"create 1"), true);
    replay_hop_answers(&mut s, false);
    assert_eq!(s.host.response_chunk, frame(b"reply"));
    assert_eq!(s.finish("via_upstream").log("dedup"), "replay");
}

#[test]
fn a_duplicate_in_flight_is_aborted_and_a_different_request_under_the_key_is_refused() {
    let envoy = Envoy::default();
    let mut model = Model::default();
    let mut first_worker = envoy.worker(ETCD);
    let mut first = claimed(&envoy, &mut first_worker, &mut model, "order-2", b"create 2");
    let mut worker = envoy.worker(ETCD);
    let duplicate = claimed(&envoy, &mut worker, &mut model, "order-2", b"create 2");
    assert_eq!(reply_status(&duplicate.seen).map(|r| r.0), Some(GrpcStatus::Aborted));
    answers_ok(&mut first);
    assert_eq!(first.etcd_answers(&mut model), Next::Continue);
    first.finish("via_upstream");
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "order-2")]);
    s.headers(false);
    assert_eq!(s.etcd_answers(&mut model), Next::Continue);
    s.request_body(&frame(b"create 3"), true);
    assert_eq!(reply_status(&s.seen).map(|r| r.0), Some(GrpcStatus::InvalidArgument));
}

#[test]
fn a_body_that_arrives_while_the_claim_is_in_flight_is_read_once_and_held() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(ETCD);
    let mut model = Model::default();
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "order-4")]);
    assert_eq!(s.headers(false), Next::Pause);
    let body = frame(b"create 4");
    // Envoy (allow_on_headers_stop_iteration) hands the body to the filter
    // while its headers wait: held, and read only once.
    assert_eq!(s.request_body(&body[..3], false), Next::Pause);
    assert_eq!(s.request_body(&body[3..], true), Next::Pause);
    assert_eq!(s.host.request_bytes_read, body.len(), "each byte copied out once");
    assert_eq!(s.etcd_answers(&mut model), Next::Pause, "the lease");
    assert_eq!(s.etcd_answers(&mut model), Next::Continue, "claimed: the held request goes on");
    answers_ok(&mut s);
    assert_eq!(s.etcd_answers(&mut model), Next::Continue);
    let seen = s.finish("via_upstream");
    assert_eq!(seen.log("req_msgs"), 1);
    assert_eq!(model.entries()[0].fingerprint, crate::dedup::Fingerprint::of(&body), "the whole request");
}

#[test]
fn etcd_down_answers_unavailable_without_running_or_runs_it_counted_under_fail_open() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(ETCD);
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "order-5")]);
    s.headers(false);
    // The lease grant fails: UNAVAILABLE is sent once more, then refused.
    assert_eq!(s.etcd_fails(14), Next::Pause, "sent again, to another member");
    assert_eq!(s.etcd_fails(14), Next::Pause);
    let (status, message) = reply_status(&s.seen).unwrap();
    assert_eq!(status, GrpcStatus::Unavailable);
    assert!(message.contains("idempotency store did not answer") && message.contains("not run"), "{message}");
    let seen = s.finish("local_reply");
    assert_eq!(seen.log("dedup"), "store_unavailable");
    assert_eq!(seen.guard_counts.iter().filter(|&&g| g == guard::DEDUP_STORE_ERRORS).count(), 2);

    let open =
        r#"{"dedup":{"methods":["pkg.Orders/Create"],"store":"etcd","etcd":{"fail_open":true}},"log":{"ok_sample":0}}"#;
    let mut worker = envoy.worker(open);
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "order-6")]);
    s.headers(false);
    assert_eq!(s.etcd_fails(4), Next::Continue, "a timeout is not sent again; fail_open runs it");
    s.request_body(&frame(b"create 6"), true);
    s.upstream_answers(b"reply", "0");
    let seen = s.finish("via_upstream");
    assert!(seen.guard_counts.contains(&guard::DEDUP_FAILED_OPEN));
    assert_eq!(seen.log("dedup"), "store_failed_open", "logged although OK calls are not sampled");
    assert!(seen.etcd.is_empty(), "nothing to settle: it held no key");
}

#[test]
fn a_claim_sent_again_after_it_landed_is_recognised_as_its_own() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(ETCD);
    let mut model = Model::default();
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "order-7")]);
    s.headers(false);
    s.etcd_answers(&mut model);
    // The claim reaches etcd, but its answer is lost with the member.
    let claim = s.seen.etcd.last().unwrap().clone();
    model.serve(&claim);
    assert_eq!(s.etcd_fails(14), Next::Pause, "sent again");
    assert_eq!(s.etcd_answers(&mut model), Next::Continue, "its own record: a first call, not in flight");
    s.request_body(&frame(b"create 7"), true);
    assert_eq!(s.finish("via_upstream").log("dedup"), "first");
}

#[test]
fn a_stream_gone_while_its_claim_is_in_flight_takes_the_claim_back_if_it_landed() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(ETCD);
    let mut model = Model::default();
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "order-8")]);
    s.headers(false);
    s.etcd_answers(&mut model);
    let claim = s.seen.etcd.last().unwrap().clone();
    model.serve(&claim);
    let seen = s.finish("downstream_remote_disconnect");
    let release = seen.etcd.iter().find(|r| r.detached).expect("a release, sent by the worker");
    model.serve(release);
    assert!(model.kv.is_empty(), "taken back: the call never ran, its retry runs");
}

#[test]
fn an_expired_entry_not_yet_dropped_by_its_lease_is_taken_over_by_revision() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(r#"{"dedup":{"methods":["pkg.Orders/Create"],"ttl":"1s","store":"etcd"}}"#);
    let mut model = Model::default();
    let mut s = claimed(&envoy, &mut worker, &mut model, "order-9", b"create 9");
    answers_ok(&mut s);
    s.etcd_answers(&mut model);
    s.finish("via_upstream");
    envoy.advance(1_500);
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "order-9")]);
    s.headers(false);
    assert_eq!(s.etcd_answers(&mut model), Next::Pause, "found expired: taken over");
    assert_eq!(s.etcd_answers(&mut model), Next::Continue);
    assert_eq!(model.entries()[0].state, crate::dedup::State::InFlight);
    s.request_body(&frame(b"create 9"), true);
    assert_eq!(s.finish("via_upstream").log("dedup"), "first", "after ttl a retry runs, as with the local table");
}

#[test]
fn a_claim_waits_no_longer_than_the_calls_deadline_which_it_leaves_as_it_was() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(ETCD);
    let mut model = Model::default();
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "order-10"), ("grpc-timeout", "500m")]);
    s.headers(false);
    assert_eq!(s.seen.etcd.last().unwrap().timeout, Duration::from_millis(500), "the deadline, not the 800 ms");
    envoy.advance(200);
    s.etcd_answers(&mut model);
    envoy.advance(100);
    assert_eq!(s.etcd_answers(&mut model), Next::Continue);
    // Envoy counts the claim's time itself (max_stream_duration from the
    // stream's start): the header is not cut by it.
    assert_eq!(s.request_header("grpc-timeout").as_deref(), Some("500m"));
    // A claim whose deadline passed before it was sent is refused, not run.
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "order-11"), ("grpc-timeout", "100m")]);
    s.headers(false);
    envoy.advance(150);
    s.etcd_fails(14);
    assert_eq!(reply_status(&s.seen).map(|r| r.0), Some(GrpcStatus::DeadlineExceeded));
}

#[test]
fn with_etcd_out_of_space_a_kept_key_is_still_replayed_and_a_new_one_is_a_full_table() {
    let envoy = Envoy::default();
    let mut worker =
        envoy.worker(r#"{"dedup":{"methods":["pkg.Orders/Create"],"store":"etcd","when_full":"forward"}}"#);
    let mut model = Model::default();
    let mut s = claimed(&envoy, &mut worker, &mut model, "order-20", b"create 20");
    answers_ok(&mut s);
    s.etcd_answers(&mut model);
    s.finish("via_upstream");
    // etcd now refuses every transaction that writes (NOSPACE).
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "order-20")]);
    s.headers(false);
    assert_eq!(s.etcd_fails(8), Next::Pause, "the key is read instead");
    assert_eq!(s.awaited_peek().method, etcd::RANGE);
    assert_eq!(s.etcd_answers(&mut model), Next::Continue);
    assert_sent_to_replay_hop(&s);
    drop(s);
    // A new key cannot be claimed: a full table (here: forwarded, counted).
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "order-21")]);
    s.headers(false);
    s.etcd_fails(8);
    assert_eq!(s.etcd_answers(&mut model), Next::Continue);
    s.request_body(&frame(b"create 21"), true);
    s.upstream_answers(b"reply", "0");
    assert_eq!(s.finish("via_upstream").log("dedup"), "full");
}

#[test]
fn a_lease_gone_from_etcd_is_replaced_and_the_claim_made_under_the_new_one() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(ETCD);
    let mut model = Model::default();
    let s = claimed(&envoy, &mut worker, &mut model, "order-30", b"create 30");
    s.finish("downstream_remote_disconnect");
    let leases = model.leases;
    // The lease is revoked: etcd refuses puts under it (NOT_FOUND).
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "order-31")]);
    s.headers(false);
    assert_eq!(s.etcd_fails(5), Next::Pause);
    assert_eq!(s.awaited_peek().method, etcd::LEASE_GRANT, "a new lease first");
    assert_eq!(s.etcd_answers(&mut model), Next::Pause);
    assert_eq!(model.leases, leases + 1);
    assert_eq!(s.etcd_answers(&mut model), Next::Continue, "claimed under the new lease");
}

#[test]
fn a_deadline_that_ends_during_the_claim_is_a_deadline_not_a_store_failure() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(ETCD);
    let mut model = Model::default();
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "order-40"), ("grpc-timeout", "300m")]);
    s.headers(false);
    s.etcd_answers(&mut model);
    envoy.advance(300);
    s.etcd_fails(4);
    assert_eq!(reply_status(&s.seen).map(|r| r.0), Some(GrpcStatus::DeadlineExceeded));
    let seen = s.finish("local_reply");
    assert_ne!(seen.log("dedup"), "store_unavailable");
    let release = seen.etcd.iter().find(|r| r.detached).expect("the claim, if it landed, taken back");
    assert!(release.method == etcd::TXN);
}

#[test]
fn an_answer_etcd_finds_too_large_is_kept_as_done_without_it() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(ETCD);
    let mut model = Model::default();
    let mut s = claimed(&envoy, &mut worker, &mut model, "order-50", b"create 50");
    answers_ok(&mut s);
    let _ = s.awaited();
    let next =
        s.etcd_reply(EtcdReply { status: 3, message: "etcdserver: request is too large".into(), body: Vec::new() });
    assert_eq!(next, Next::Continue, "the answer goes on");
    let fallback = s.seen.etcd.iter().find(|r| r.detached).expect("the worker writes it without the answer");
    model.serve(fallback);
    assert_eq!(model.entries()[0].state, crate::dedup::State::NotKept);
}

#[test]
fn a_keyed_request_too_large_to_hold_during_the_claim_is_refused_and_the_claim_taken_back() {
    let envoy = Envoy::default();
    let mut worker = envoy.worker(ETCD);
    let mut model = Model::default();
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[(KEY, "order-60")]);
    s.headers(false);
    s.etcd_answers(&mut model);
    let big = vec![7u8; (crate::call::dedup::MAX_HELD_MESSAGE + 10) as usize];
    s.request_body(&big, false);
    let (status, message) = reply_status(&s.seen).unwrap();
    assert_eq!(status, GrpcStatus::ResourceExhausted, "{message}");
    assert!(s.seen.etcd.iter().any(|r| r.detached), "the claim taken back");
}

#[test]
fn a_key_read_from_the_request_message_is_claimed_on_etcd_as_a_header_key_is() {
    let config = r#"{"dedup":{"methods":["pkg.Orders/*"],"key_fields":{"pkg.Orders/Create":1},"store":"etcd"}}"#;
    let envoy = Envoy::default();
    let mut worker = envoy.worker(config);
    let mut model = Model::default();
    let body = frame(&create_request("req-70", "9"));
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[]);
    assert_eq!(s.headers(false), Next::Pause, "held for the key in the message");
    assert_eq!(s.request_body(&body, true), Next::Pause, "the key read, claimed on etcd: held meanwhile");
    assert_eq!(s.etcd_answers(&mut model), Next::Pause, "the lease");
    assert_eq!(s.etcd_answers(&mut model), Next::Continue, "claimed: the held request goes on");
    answers_ok(&mut s);
    assert_eq!(s.etcd_answers(&mut model), Next::Continue);
    let seen = s.finish("via_upstream");
    assert_eq!(seen.log("dedup"), "first");
    assert_eq!(seen.log("req_msgs"), 1);
    assert_eq!(model.entries()[0].fingerprint, crate::dedup::Fingerprint::of(&body), "the whole request");
    // Its retry, no header either, through another worker: replayed.
    let mut worker = envoy.worker(config);
    let mut s = Stream::open(&envoy, &mut worker, PATH, &[]);
    s.headers(false);
    assert_eq!(s.request_body(&body, true), Next::Pause);
    s.etcd_answers(&mut model);
    assert_eq!(s.etcd_answers(&mut model), Next::Continue, "found done, verified at once: on to the replay hop");
    assert!(s.seen.reply.is_none());
    assert_sent_to_replay_hop(&s);
    replay_hop_answers(&mut s, false);
    assert_eq!(s.host.response_chunk, frame(b"reply"));
    assert_eq!(s.finish("via_upstream").log("dedup"), "replay");
}
