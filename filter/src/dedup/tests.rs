use std::borrow::Cow;
use std::collections::HashMap;

use proptest::prelude::*;

use super::*;
use crate::shared::testing::MapStore;
use crate::shared::StoreError;

const TTL: u64 = 1_000;
/// One bucket, every caller may use every way: the plain table.
const ONE_BUCKET: DedupTable = DedupTable { buckets: 1, ttl_ns: TTL, caller_ways: WAYS };

fn key(n: u8) -> Digest {
    digest(&[b"tenant", b"pkg.Svc/Create", &[n]])
}

fn ok_answer() -> Answer {
    Answer {
        status: GrpcStatus::Ok,
        headers: vec![
            ("content-type".into(), b"application/grpc".to_vec()),
            ("grpc-encoding".into(), b"gzip".to_vec()),
        ],
        body: vec![1, 0, 0, 0, 1, 7],
        trailers: vec![("grpc-status".into(), b"0".to_vec())],
    }
}

fn claim(table: &DedupTable, store: &mut MapStore, k: u8, caller: u64, now: u64) -> Claim {
    // Every claim its own owner.
    let owner = 1000 + u64::from(k) + now;
    match table.lookup_or_claim(store, &key(k), caller, owner, now, now + 100) {
        Lookup::Claimed { claim, .. } => claim,
        other => panic!("key {k} must be claimed, got {other:?}"),
    }
}

fn store_for(table: &DedupTable) -> MapStore {
    let mut store = MapStore::default();
    table.create(&mut store);
    store
}

#[test]
fn buckets_and_answers_round_trip_and_torn_values_are_not_trusted() {
    let mut bucket = [FREE; WAYS];
    bucket[3] = Record {
        state: State::Kept,
        key: key(1),
        caller: 9,
        owner: 77,
        claim_until: 5,
        expires: 6,
        fingerprint: key(2),
    };
    let bytes = encode_bucket(&bucket);
    assert_eq!(bytes.len(), 1 + WAYS * RECORD_LEN);
    assert_eq!(decode_bucket(&bytes), bucket);
    assert_eq!(decode_bucket(&bytes[..bytes.len() - 1]), [FREE; WAYS], "a torn bucket is empty, not trusted");
    assert_eq!(decode_bucket(b""), [FREE; WAYS]);

    let answer = ok_answer();
    let bytes = encode_answer(77, &answer);
    assert_eq!(decode_answer(&bytes, 77), Some(answer));
    assert_eq!(decode_answer(&bytes, 78), None, "another claim's answer is never replayed");
    assert_eq!(decode_answer(&bytes[..bytes.len() - 1], 77), None);
}

#[test]
fn an_answer_with_a_status_out_of_range_is_not_trusted() {
    let mut bytes = encode_answer(1, &ok_answer());
    bytes[8..12].copy_from_slice(&17u32.to_le_bytes());
    assert_eq!(decode_answer(&bytes, 1), None);
}

#[test]
fn first_call_claims_then_duplicates_see_in_flight_then_the_kept_answer() {
    let mut store = store_for(&ONE_BUCKET);
    let c = claim(&ONE_BUCKET, &mut store, 1, 5, 0);
    assert_eq!(ONE_BUCKET.lookup_or_claim(&mut store, &key(1), 5, 2, 10, 110), Lookup::InFlight);
    let fp = digest(&[b"request"]);
    ONE_BUCKET.settle(&mut store, &c, Settlement::Keep { fingerprint: fp, answer: Some(ok_answer()) }, 20);
    assert_eq!(
        ONE_BUCKET.lookup_or_claim(&mut store, &key(1), 5, 3, 30, 130),
        Lookup::Done { fingerprint: fp, outcome: Outcome::Kept(ok_answer()) }
    );
}

#[test]
fn settlements_leave_a_freed_key_a_not_kept_answer_or_an_unknown_outcome() {
    let fp = digest(&[b"request"]);
    for (settlement, then) in [
        (Settlement::Free, None),
        (Settlement::Keep { fingerprint: fp, answer: None }, Some(Outcome::NotKept)),
        (Settlement::Unknown { fingerprint: fp }, Some(Outcome::Unknown)),
    ] {
        let mut store = store_for(&ONE_BUCKET);
        let c = claim(&ONE_BUCKET, &mut store, 1, 5, 0);
        ONE_BUCKET.settle(&mut store, &c, settlement, 10);
        let got = ONE_BUCKET.lookup_or_claim(&mut store, &key(1), 5, 2, 20, 120);
        match then {
            None => assert!(matches!(got, Lookup::Claimed { .. }), "{got:?}"),
            Some(outcome) => {
                assert_eq!(got, Lookup::Done { fingerprint: fp, outcome });
                // What was kept is gone after the TTL, counted from the settling.
                assert!(matches!(
                    ONE_BUCKET.lookup_or_claim(&mut store, &key(1), 5, 3, 10 + TTL, 10 + TTL + 100),
                    Lookup::Claimed { .. }
                ));
            }
        }
    }
}

#[test]
fn a_claim_never_settled_counts_as_may_have_run_for_the_ttl_after_its_deadline() {
    let mut store = store_for(&ONE_BUCKET);
    claim(&ONE_BUCKET, &mut store, 1, 5, 0);
    assert_eq!(ONE_BUCKET.lookup_or_claim(&mut store, &key(1), 5, 2, 99, 199), Lookup::InFlight);
    assert_eq!(ONE_BUCKET.lookup_or_claim(&mut store, &key(1), 5, 2, 100, 200), Lookup::Abandoned);
    assert_eq!(ONE_BUCKET.lookup_or_claim(&mut store, &key(1), 5, 2, 100 + TTL - 1, 200 + TTL), Lookup::Abandoned);
    assert!(matches!(
        ONE_BUCKET.lookup_or_claim(&mut store, &key(1), 5, 2, 100 + TTL, 200 + TTL),
        Lookup::Claimed { .. }
    ));
}

#[test]
fn a_running_claim_outlives_a_call_that_runs_up_to_the_ttl() {
    // A keyed call runs within the TTL: its claim must outlive it.
    let mut store = store_for(&ONE_BUCKET);
    let start = 0;
    let claim_until = start + TTL + 100;
    assert!(matches!(
        ONE_BUCKET.lookup_or_claim(&mut store, &key(1), 5, 1, start, claim_until),
        Lookup::Claimed { .. }
    ));
    assert_eq!(ONE_BUCKET.lookup_or_claim(&mut store, &key(1), 5, 2, TTL + 50, TTL + 150), Lookup::InFlight);
    assert_eq!(live_records(&ONE_BUCKET, &store, &key(1), TTL + 50), 1);
}

#[test]
fn the_old_owner_cannot_settle_a_claim_that_was_taken_over() {
    let mut store = store_for(&ONE_BUCKET);
    let old = claim(&ONE_BUCKET, &mut store, 1, 5, 0);
    // Its claim ran out (100) and its record expired a TTL later.
    let later = 100 + TTL;
    let new = claim(&ONE_BUCKET, &mut store, 1, 5, later);
    assert_eq!(old.way, new.way);
    assert!(ONE_BUCKET.settle(&mut store, &old, Settlement::Free, later + 1));
    assert_eq!(ONE_BUCKET.lookup_or_claim(&mut store, &key(1), 5, 9, later + 2, later + 102), Lookup::InFlight);
}

#[test]
fn a_full_bucket_refuses_new_keys_until_a_record_expires() {
    let mut store = store_for(&ONE_BUCKET);
    for n in 0..WAYS as u8 {
        claim(&ONE_BUCKET, &mut store, n, u64::from(n), 0);
    }
    assert_eq!(ONE_BUCKET.lookup_or_claim(&mut store, &key(99), 99, 1, 0, 100), Lookup::Full);
    assert!(matches!(
        ONE_BUCKET.lookup_or_claim(&mut store, &key(99), 99, 1, 100 + TTL, 200 + TTL),
        Lookup::Claimed { evicted: true, .. }
    ));
}

#[test]
fn one_caller_holds_at_most_its_share_of_a_bucket_and_others_still_get_in() {
    let table = DedupTable { buckets: 1, ttl_ns: TTL, caller_ways: 2 };
    let mut store = store_for(&table);
    let greedy = 666;
    claim(&table, &mut store, 1, greedy, 0);
    claim(&table, &mut store, 2, greedy, 0);
    assert_eq!(table.lookup_or_claim(&mut store, &key(3), greedy, 1, 0, 100), Lookup::CallerFull);
    for n in 10..15 {
        claim(&table, &mut store, n, u64::from(n), 0);
    }
    // One way is left; the greedy caller's records count until they expire,
    // whatever their state, and the last way stays for others.
    assert_eq!(table.lookup_or_claim(&mut store, &key(3), greedy, 1, TTL - 1, TTL + 99), Lookup::CallerFull);
    claim(&table, &mut store, 15, 15, 1);
    assert_eq!(table.lookup_or_claim(&mut store, &key(16), 16, 1, 2, 102), Lookup::Full, "a full bucket is full");
}

#[test]
fn keys_spread_over_every_bucket() {
    let table = DedupTable { buckets: 16, ttl_ns: TTL, caller_ways: WAYS };
    let mut used: Vec<u32> = (0..200u8).map(|n| table.bucket_of(&key(n))).collect();
    used.sort_unstable();
    used.dedup();
    assert_eq!(used.len(), 16);
}

/// The other worker, acting on the raw store between our read and our write.
struct Raw<'a> {
    values: &'a mut HashMap<String, (Vec<u8>, u32)>,
    cas: &'a mut u32,
}

impl SharedStore for Raw<'_> {
    fn get(&mut self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        match self.values.get(key) {
            Some((v, cas)) => (Some(v.clone()), Some(*cas)),
            None => (None, None),
        }
    }
    fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        if let (Some((_, current)), Some(cas)) = (self.values.get(key), cas) {
            if *current != cas {
                return Err(StoreError::CasMismatch);
            }
        }
        *self.cas += 1;
        self.values.insert(key.to_owned(), (value.to_vec(), *self.cas));
        Ok(())
    }
}

/// Every live record of `k` in the table.
fn live_records(table: &DedupTable, store: &MapStore, k: &Digest, now: u64) -> usize {
    (0..table.buckets)
        .map(|b| decode_bucket(store.value(&index_key(b)).unwrap_or_default()))
        .map(|ways| ways.iter().filter(|r| r.live(now) && &r.key == k).count())
        .sum()
}

#[test]
fn a_key_is_never_claimed_twice_even_when_another_worker_claims_it_between_our_read_and_write() {
    // Worker B frees a neighbour and claims the same key in between: in the
    // old table (one slot per key, probed neighbours) this gave two claims.
    let table = DedupTable { buckets: 1, ttl_ns: TTL, caller_ways: WAYS };
    let mut store = store_for(&table);
    for n in 0..WAYS as u8 - 1 {
        claim(&table, &mut store, n, u64::from(n), 0);
    }
    let mut step = 0;
    store.interfere_with(move |values, cas| {
        step += 1;
        if step == 1 {
            // B's whole call runs after our first read of the bucket.
            let mut raw = Raw { values, cas };
            let got = table.lookup_or_claim(&mut raw, &key(42), 1, 2, 50, 150);
            assert!(matches!(got, Lookup::Claimed { .. }), "{got:?}");
        }
    });
    let ours = table.lookup_or_claim(&mut store, &key(42), 1, 1, 50, 150);
    assert_eq!(ours, Lookup::InFlight, "our write fails, and the retry finds B's claim");
    assert_eq!(live_records(&table, &store, &key(42), 50), 1);
}

#[test]
fn every_ending_of_a_first_call_has_its_disposition() {
    use Disposition::{Free, Keep, Unknown};
    use GrpcStatus::*;
    let table = [
        (Ending::NothingSent, Free),
        (Ending::Envoy { sent: false }, Free),
        (Ending::Envoy { sent: true }, Unknown),
        (Ending::Upstream(Ok), Keep),
        (Ending::Upstream(InvalidArgument), Keep),
        (Ending::Upstream(NotFound), Keep),
        (Ending::Upstream(AlreadyExists), Keep),
        (Ending::Upstream(PermissionDenied), Free),
        (Ending::Upstream(FailedPrecondition), Keep),
        (Ending::Upstream(OutOfRange), Keep),
        (Ending::Upstream(Unimplemented), Keep),
        (Ending::Upstream(Unauthenticated), Free),
        (Ending::Upstream(Unavailable), Free),
        (Ending::Upstream(ResourceExhausted), Free),
        (Ending::Upstream(Aborted), Free),
        (Ending::Upstream(DeadlineExceeded), Unknown),
        (Ending::Upstream(Cancelled), Unknown),
        (Ending::Upstream(GrpcStatus::Unknown), Unknown),
        (Ending::Upstream(Internal), Unknown),
        (Ending::Upstream(DataLoss), Unknown),
        (Ending::UpstreamHttp(404), Free),
        (Ending::UpstreamHttp(429), Free),
        (Ending::UpstreamHttp(500), Unknown),
        (Ending::UpstreamHttp(503), Unknown),
        (Ending::UpstreamHttp(200), Unknown),
    ];
    for (ending, expected) in table {
        assert_eq!(disposition(ending), expected, "{ending:?}");
    }
    // Every status is decided: none falls through unlisted.
    for status in GrpcStatus::ALL {
        let listed = table.iter().any(|(e, _)| *e == Ending::Upstream(status));
        assert!(listed, "{status:?} has no row");
    }
}

#[test]
fn keys_are_checked_like_the_contract_says() {
    assert_eq!(check_key(None, true), Err(KeyError::Missing));
    assert_eq!(check_key(None, false), Ok(None));
    assert_eq!(check_key(Some(b""), false), Err(KeyError::Empty));
    assert_eq!(check_key(Some(&[b'a'; 256]), false), Err(KeyError::TooLong(256)));
    assert_eq!(check_key(Some(b"a b"), false), Err(KeyError::NotPrintable));
    assert_eq!(check_key(Some(b"order-42"), true), Ok(Some(Cow::Borrowed(&b"order-42"[..]))));
}

#[test]
fn a_key_written_as_the_drafts_structured_string_is_the_same_key_as_the_bare_one() {
    let key = |raw: &[u8]| check_key(Some(raw), false).map(|k| k.map(Cow::into_owned));
    assert_eq!(key(br#""order-42""#), Ok(Some(b"order-42".to_vec())));
    assert_eq!(key(br#""a \"quoted\" \\ key""#), Ok(Some(br#"a "quoted" \ key"#.to_vec())));
    assert_eq!(key(br#""""#), Err(KeyError::Empty));
    for bad in [&br#""open"#[..], br#"""#, br#""bad \n escape""#, br#""in"side""#, b"\"tab\there\"", br#""ends \""#] {
        assert_eq!(key(bad), Err(KeyError::BadString), "{}", String::from_utf8_lossy(bad));
    }
    let long = format!("\"{}\"", "k".repeat(256));
    assert_eq!(key(long.as_bytes()), Err(KeyError::TooLong(256)));
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
fn digest_and_caller_tag_separate_their_parts() {
    assert_ne!(digest(&[b"ab", b"c"]), digest(&[b"a", b"bc"]));
    assert_ne!(caller_tag(&[b"ab", b"c"]), caller_tag(&[b"a", b"bc"]));
}

proptest! {
    /// The key material reads back as the parts it was made of, long parts
    /// (two-byte lengths) included: no two lists of parts hash the same
    /// bytes.
    #[test]
    fn key_material_is_the_parts_and_nothing_else(
        parts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..6)
    ) {
        let slices: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        let bytes = key_material(&slices);
        let mut read = Vec::new();
        let mut rest = bytes.as_slice();
        while !rest.is_empty() {
            let (mut len, mut shift) = (0usize, 0);
            loop {
                let (&b, tail) = rest.split_first().unwrap();
                rest = tail;
                len |= usize::from(b & 0x7f) << shift;
                shift += 7;
                if b & 0x80 == 0 {
                    break;
                }
            }
            let (part, tail) = rest.split_at(len);
            read.push(part.to_vec());
            rest = tail;
        }
        prop_assert_eq!(read, parts);
    }
}

#[test]
fn shared_data_keys_name_the_bucket_and_way() {
    assert_eq!(index_key(0), "grpc_guard.dedup.0");
    assert_eq!(answer_key(4_294_967_295, 7), "grpc_guard.dedup.4294967295.7");
}

#[test]
fn metadata_counts_like_http2_does() {
    let pairs = vec![("x-order-id".to_owned(), b"o-17".to_vec())];
    assert_eq!(metadata_bytes(&pairs), 10 + 4 + 32);
}

/// One step of the model test.
#[derive(Clone, Debug)]
enum Op {
    /// A call with key `key` by `caller`; `other` runs worker B's call with
    /// `other`'s key between this call's read and write of the bucket.
    Call {
        key: u8,
        caller: u64,
        other: Option<u8>,
    },
    Finish {
        key: u8,
        how: u8,
    },
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..6, 0u64..3, proptest::option::of(0u8..6)).prop_map(|(key, caller, other)| Op::Call {
            key,
            caller,
            other
        }),
        (0u8..6, 0u8..3).prop_map(|(key, how)| Op::Finish { key, how }),
        (1u64..400).prop_map(Op::Advance),
    ]
}

proptest! {
    /// Random calls on two workers (one acting between the other's read and
    /// write), settlements and clock jumps, on one small bucket: a key never
    /// has two live records, a claimed key is never claimed again while its
    /// claim or outcome lives, and no caller holds more than its share.
    #[test]
    fn the_table_keeps_its_promises_under_interleaved_workers(ops in proptest::collection::vec(op(), 1..60)) {
        let table = DedupTable { buckets: 1, ttl_ns: 300, caller_ways: 3 };
        let mut store = store_for(&table);
        // Claims that can still be settled, and until when each key must not
        // be claimed anew (its record's life).
        let mut claims: HashMap<u8, Claim> = HashMap::new();
        let mut live_until: HashMap<u8, u64> = HashMap::new();
        let mut now = 0u64;
        let mut owner = 0u64;
        for op in ops {
            match op {
                Op::Advance(d) => now += d,
                Op::Call { key: k, caller, other } => {
                    owner += 2;
                    let b_owner = owner + 1;
                    let b_result = std::rc::Rc::new(std::cell::RefCell::new(None));
                    if let Some(o) = other {
                        let (b_result, at) = (b_result.clone(), now);
                        let mut fired = false;
                        store.interfere_with(move |values, cas| {
                            if !fired {
                                fired = true;
                                let mut raw = Raw { values, cas };
                                *b_result.borrow_mut() =
                                    Some((o, table.lookup_or_claim(&mut raw, &key(o), 1, b_owner, at, at + 200)));
                            }
                        });
                    }
                    let got = table.lookup_or_claim(&mut store, &key(k), caller, owner, now, now + 200);
                    store.interfere_with(|_, _| {});
                    let mut results = vec![(k, got)];
                    results.extend(b_result.borrow_mut().take());
                    for (k, got) in results {
                        if let Lookup::Claimed { claim, .. } = got {
                            if let Some(until) = live_until.get(&k) {
                                prop_assert!(*until <= now, "key {} claimed again while its record lives", k);
                            }
                            claims.insert(k, claim);
                            // Its claim (200), then a TTL as "may have run".
                            live_until.insert(k, now + 200 + 300);
                        }
                    }
                    for k in 0..6u8 {
                        prop_assert!(live_records(&table, &store, &key(k), now) <= 1, "key {} has two records", k);
                    }
                    let bucket = decode_bucket(store.value(&index_key(0)).unwrap());
                    for c in 0..3u64 {
                        let held = bucket.iter().filter(|r| r.live(now) && r.caller == c).count();
                        prop_assert!(held <= 3, "caller {} holds {} ways", c, held);
                    }
                }
                Op::Finish { key: k, how } => {
                    if let Some(claim) = claims.remove(&k) {
                        // Settling takes effect while the way is still this
                        // claim's, and the claim's record still lives.
                        let ours = decode_bucket(store.value(&index_key(0)).unwrap()).iter().any(|r| {
                            r.state == State::InFlight && r.owner == claim.owner && r.key == claim.key && r.live(now)
                        });
                        let settlement = match how {
                            0 => Settlement::Free,
                            1 => Settlement::Keep { fingerprint: key(99), answer: Some(ok_answer()) },
                            _ => Settlement::Unknown { fingerprint: key(99) },
                        };
                        table.settle(&mut store, &claim, settlement, now);
                        if ours {
                            if how == 0 {
                                live_until.remove(&k);
                            } else {
                                live_until.insert(k, now + 300);
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn a_settlement_the_bucket_never_lets_through_is_reported_and_leaves_the_key_claimed() {
    let mut store = store_for(&ONE_BUCKET);
    let c = claim(&ONE_BUCKET, &mut store, 1, 5, 0);
    // Another worker writes the bucket before every one of our reads.
    store.interfere_with(|values, cas| {
        let (_, c) = values.get_mut("grpc_guard.dedup.0").unwrap();
        *cas += 1;
        *c = *cas;
    });
    let fp = digest(&[b"request"]);
    assert!(!ONE_BUCKET.settle(&mut store, &c, Settlement::Keep { fingerprint: fp, answer: Some(ok_answer()) }, 10));
    store.interfere_with(|_, _| {});
    assert_eq!(ONE_BUCKET.lookup_or_claim(&mut store, &key(1), 5, 2, 20, 120), Lookup::InFlight, "never run twice");
}

#[test]
fn a_claim_that_expired_and_was_taken_does_not_overwrite_its_successors_answer() {
    let mut store = store_for(&ONE_BUCKET);
    let stale = claim(&ONE_BUCKET, &mut store, 1, 7, 0);
    // Its record expires (claim_until 100 + ttl); a later call claims the key.
    let later = 100 + TTL + 1;
    let fresh = claim(&ONE_BUCKET, &mut store, 1, 7, later);
    let mut kept = ok_answer();
    kept.body = vec![0, 0, 0, 0, 1, 42];
    let fingerprint = digest(&[b"request"]);
    assert!(ONE_BUCKET.settle(&mut store, &fresh, Settlement::Keep { fingerprint, answer: Some(kept.clone()) }, later));
    // The stale call ends now and would keep its own answer.
    ONE_BUCKET.settle(&mut store, &stale, Settlement::Keep { fingerprint, answer: Some(ok_answer()) }, later + 1);
    match ONE_BUCKET.lookup_or_claim(&mut store, &key(1), 7, 99, later + 2, later + 102) {
        Lookup::Done { outcome: Outcome::Kept(answer), .. } => assert_eq!(answer, kept, "the successor's answer"),
        other => panic!("{other:?}"),
    }
}
