//! `dedup_key` (idempotency keys, the key material and caller tag of a
//! scope, a key field of a protobuf message) and `dedup_table` (every table
//! entry read from shared data, and the table's numbers).

use std::borrow::Cow;
use std::time::Duration;

use super::config::check_dedup_config;
use super::Input;
use crate::config::{
    Config, MAX_DEDUP_ENTRIES, MAX_DEDUP_METADATA_BYTES, MAX_DEDUP_RESPONSE_BYTES, MAX_DEDUP_TABLE_BYTES,
};
use crate::dedup::{
    caller_tag, check_key, decode_answer, decode_bucket, digest, encode_answer, encode_bucket, key_material, Answer,
    Claim, DedupTable, Digest, KeyError, Lookup, Outcome, Record, Settlement, State, ENTRY_OVERHEAD, WAYS,
};
use crate::shared::testing::MapStore;
use crate::shared::{SharedStore, StoreError};
use crate::status::GrpcStatus;

/// `dedup_key`: byte 0 is flags (bit 0: the key is required; bit 7: also
/// a part too long for a one- or two-byte length), bytes 1 and 2 the numbers
/// of cuts (mod 8) of two part lists A and B, then their cuts (a byte each:
/// a part's length), then the content: an idempotency key header value, the
/// bytes both part lists split, and a protobuf request message whose field
/// path is the first cuts of A (each mod 32, 0 read as 1).
///
/// Every accepted key is the same key in its RFC 8941 quoted form (and a
/// quoted key in its bare form, when it has one); distinct part lists never
/// share key material (it decodes back to its parts) nor a digest;
/// `caller_tag` hashes the parts length-prefixed; a field found in a message
/// is a sub-slice of it, and a field written once more is the one read.
pub fn dedup_key(data: &[u8]) {
    let mut input = Input(data);
    let flags = input.byte();
    let (a_cuts, b_cuts) = (usize::from(input.byte() % 8), usize::from(input.byte() % 8));
    let a_cuts = input.take(a_cuts);
    let b_cuts = input.take(b_cuts);
    let content = input.rest();

    check_idempotency_key(content, flags & 1 != 0);

    let a = split_parts(content, a_cuts);
    let b = split_parts(content, b_cuts);
    check_key_material(&a);
    check_key_material(&b);
    assert_eq!(a == b, key_material(&a) == key_material(&b), "{a:?} {b:?}");
    assert_eq!(a == b, digest(&a) == digest(&b), "{a:?} {b:?}");
    assert_eq!(digest(&a), *blake3::hash(&key_material(&a)).as_bytes());
    assert_eq!(caller_tag(&a), reference_caller_tag(&a));
    if flags & 0x80 != 0 && !content.is_empty() {
        let long = content.repeat(16_384 / content.len() + 1);
        check_key_material(&[&long[..], content, &long[..200]]);
    }

    let path: Vec<u32> = a_cuts.iter().take(3).map(|&c| u32::from(c % 32).max(1)).collect();
    check_protobuf_field(content, if path.is_empty() { &[1] } else { &path }, a[0]);
}

/// Each cut is a part's length (clamped to what is left); the rest is the
/// last part.
fn split_parts<'a>(content: &'a [u8], cuts: &[u8]) -> Vec<&'a [u8]> {
    let mut parts = Vec::with_capacity(cuts.len() + 1);
    let mut rest = content;
    for &cut in cuts {
        let (part, tail) = rest.split_at(usize::from(cut).min(rest.len()));
        parts.push(part);
        rest = tail;
    }
    parts.push(rest);
    parts
}

fn check_idempotency_key(value: &[u8], required: bool) {
    let none = if required { Err(KeyError::Missing) } else { Ok(None) };
    assert_eq!(check_key(None, required), none);
    let checked = check_key(Some(value), required).map(|k| k.map(Cow::into_owned));
    if value.first() != Some(&b'"') {
        let bare = (1..=255).contains(&value.len()) && value.iter().all(|b| (0x21..0x7f).contains(b));
        assert_eq!(checked.is_ok(), bare, "{checked:?}");
    }
    let Ok(key) = checked else { return };
    let key = key.expect("a header value gives a key");
    assert!((1..=255).contains(&key.len()));
    assert_eq!(check_key(Some(&sf_quote(&key)), required).map(|k| k.map(Cow::into_owned)), Ok(Some(key.clone())));
    if key.first() != Some(&b'"') && key.iter().all(|b| (0x21..0x7f).contains(b)) {
        assert_eq!(check_key(Some(&key), required).map(|k| k.map(Cow::into_owned)), Ok(Some(key.clone())));
    }
}

/// RFC 8941 §4.1.6: a String serialized.
fn sf_quote(key: &[u8]) -> Vec<u8> {
    let mut out = vec![b'"'];
    for &b in key {
        if b == b'"' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
    out
}

/// Key material decodes back to its parts (so no two part lists share it).
fn check_key_material(parts: &[&[u8]]) {
    let mut material = &key_material(parts)[..];
    let mut decoded: Vec<&[u8]> = Vec::new();
    while !material.is_empty() {
        let mut len = 0usize;
        let mut shift = 0;
        loop {
            let (&b, rest) = material.split_first().expect("a length cut short");
            material = rest;
            len |= usize::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        assert!(len <= material.len(), "a part's length runs past the material");
        let (part, rest) = material.split_at(len);
        decoded.push(part);
        material = rest;
    }
    assert_eq!(decoded, parts);
}

/// FNV-1a over each part's length (u64, little-endian) and bytes.
fn reference_caller_tag(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in (part.len() as u64).to_le_bytes().iter().chain(part.iter()) {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}

fn check_protobuf_field(message: &[u8], path: &[u32], value: &[u8]) {
    let found = crate::protowire::field(message, path);
    if let Ok(Some(v)) = found {
        let (outer, inner) = (message.as_ptr_range(), v.as_ptr_range());
        assert!(outer.start <= inner.start && inner.end <= outer.end, "a value that is not part of the message");
        if path.len() > 1 {
            assert!(
                matches!(crate::protowire::field(message, &path[..1]), Ok(Some(_))),
                "{path:?} found, not its message"
            );
        }
    }
    // A message that reads whole, with the field written once more at its
    // end: that last occurrence is what is read.
    let number = path[0];
    if crate::protowire::field(message, &[number]).is_ok() {
        let mut longer = message.to_vec();
        longer.extend(varint(u64::from(number) << 3 | 2));
        longer.extend(varint(value.len() as u64));
        longer.extend_from_slice(value);
        assert_eq!(crate::protowire::field(&longer, &[number]), Ok(Some(value)));
    }
}

pub(super) fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
    out
}

const STATES: [State; 5] = [State::Free, State::InFlight, State::Kept, State::NotKept, State::Unknown];

/// `dedup_table`: byte 0 picks what the rest is: 0, a bucket as shared data
/// holds it; 1, the same made well-formed (its length, format byte and
/// states set right); 2, an answer as shared data holds it (also read as an
/// answer to build); 3, table and configuration numbers; 4, a lookup and a
/// settle on a bucket (`lookup_and_settle`).
///
/// A bucket decodes, whatever its bytes, to one that encodes and decodes to
/// itself, and a well-formed bucket re-encodes byte for byte (anything else
/// is an empty bucket); an answer round-trips for its own claim only, and
/// what decodes re-encodes to the same bytes; the table has whole buckets
/// for its entries; a configuration's dedup numbers are accepted exactly
/// within their bounds; a lookup and a settle change what their rules say,
/// no other way.
pub fn dedup_table(data: &[u8]) {
    let mut input = Input(data);
    let mode = input.byte() % 6;
    let rest = input.rest();
    match mode {
        0 => check_bucket(rest),
        1 => check_bucket(&well_formed_bucket(rest)),
        2 => check_answers(rest),
        3 => check_table_numbers(rest),
        4 => check_etcd_answers(rest),
        _ => lookup_and_settle(rest),
    }
}

/// What etcd answers (a transaction, a lease grant) and what a key holds
/// there: read without panicking; an entry that reads re-encodes to the
/// same bytes, and a live one answers as the local table's rules say.
fn check_etcd_answers(bytes: &[u8]) {
    use crate::etcd::{parse_lease, parse_txn, Entry};
    let _ = parse_lease(bytes);
    if let Ok(crate::etcd::TxnAnswer::Existing { value, .. }) = parse_txn(bytes) {
        let _ = Entry::decode(&value);
    }
    if let Some(entry) = Entry::decode(bytes) {
        assert_eq!(entry.encode(), bytes, "an entry that reads re-encodes byte for byte");
        let now = u64::from_le_bytes(bytes.get(..8).and_then(|b| b.try_into().ok()).unwrap_or_default());
        match entry.clone().lookup(now) {
            None => assert!(entry.expires <= now || entry.state == crate::dedup::State::Free),
            Some(Lookup::InFlight) => assert!(now < entry.claim_until),
            Some(_) => {}
        }
    }
}

pub(super) fn empty_bucket() -> [Record; WAYS] {
    decode_bucket(&[])
}

/// The encoded length of a bucket, and of one record in it.
fn bucket_layout() -> (usize, usize) {
    let len = encode_bucket(&empty_bucket()).len();
    (len, (len - 1) / WAYS)
}

fn check_bucket(bytes: &[u8]) {
    let (len, record_len) = bucket_layout();
    assert_eq!(len, 1 + WAYS * record_len);
    let bucket = decode_bucket(bytes);
    let encoded = encode_bucket(&bucket);
    assert_eq!(decode_bucket(&encoded), bucket, "encode then decode changes a bucket");
    let empty = encode_bucket(&empty_bucket());
    let well_formed = bytes.len() == len
        && bytes[0] == empty[0]
        && (0..WAYS).all(|w| usize::from(bytes[1 + w * record_len]) < STATES.len());
    if well_formed {
        assert_eq!(encoded, bytes, "a well-formed bucket re-encodes byte for byte");
    } else {
        assert_eq!(bucket, empty_bucket(), "an unreadable bucket is empty, not trusted");
    }
}

fn well_formed_bucket(bytes: &[u8]) -> Vec<u8> {
    let (len, record_len) = bucket_layout();
    let mut out = bytes.to_vec();
    out.resize(len, 0);
    out[0] = encode_bucket(&empty_bucket())[0];
    for w in 0..WAYS {
        out[1 + w * record_len] %= STATES.len() as u8;
    }
    out
}

fn check_answers(data: &[u8]) {
    // Shared data's bytes, read by the claim they name first.
    let owner = Input(data).u64();
    if let Some(answer) = decode_answer(data, owner) {
        assert_eq!(encode_answer(owner, &answer), data, "an answer reads from one encoding only");
    }
    let mut input = Input(data);
    let owner = input.u64();
    let answer = answer_from(&mut input);
    let bytes = encode_answer(owner, &answer);
    assert_eq!(decode_answer(&bytes, owner).as_ref(), Some(&answer));
    assert_eq!(decode_answer(&bytes, owner ^ 1), None, "another claim's answer is never replayed");
    assert_eq!(decode_answer(&bytes[..bytes.len() - 1], owner), None, "a torn answer is never replayed");
    assert_eq!(decode_answer(&[&bytes[..], &[0]].concat(), owner), None, "nor one with bytes after it");
}

fn answer_from(input: &mut Input<'_>) -> Answer {
    let status = GrpcStatus::ALL[usize::from(input.byte()) % GrpcStatus::ALL.len()];
    let headers = pairs_from(input);
    let body_len = usize::from(input.u16() % 1024);
    let body = input.take(body_len).to_vec();
    Answer { status, headers, body, trailers: pairs_from(input) }
}

fn pairs_from(input: &mut Input<'_>) -> Vec<(String, Vec<u8>)> {
    (0..input.byte() % 4)
        .map(|_| {
            let name_len = usize::from(input.byte() % 32);
            let name = String::from_utf8_lossy(input.take(name_len)).into_owned();
            let value_len = usize::from(input.byte() % 64);
            (name, input.take(value_len).to_vec())
        })
        .collect()
}

fn check_table_numbers(data: &[u8]) {
    let mut input = Input(data);
    let max_entries = input.u32();
    let ttl = input.duration();
    let caller_ways = usize::from(input.byte());
    let table = DedupTable::new(max_entries, ttl, caller_ways);
    let ways = WAYS as u64;
    assert!(table.buckets >= 1);
    assert!(u64::from(table.buckets) * ways >= u64::from(max_entries), "room for every entry");
    assert!(u64::from(table.buckets - 1) * ways < u64::from(max_entries.max(1)), "no whole bucket to spare");
    assert_eq!(u128::from(table.ttl_ns), ttl.as_nanos().min(u128::from(u64::MAX)));
    assert_eq!(table.caller_ways, caller_ways);

    // The same numbers through a configuration.
    let entries = input.u32();
    let response = input.u32() % (2 * MAX_DEDUP_RESPONSE_BYTES);
    let metadata = input.u32() % (2 * MAX_DEDUP_METADATA_BYTES);
    let share = f64::from(input.u16()) / 10_000.0;
    let ttl_s = input.u32() % 2_000_000_000;
    let json = format!(
        r#"{{"dedup": {{"methods": ["pkg.Svc/*"], "ttl": "{ttl_s}s", "max_entries": {entries}, "max_response_bytes": {response}, "max_metadata_bytes": {metadata}, "caller_share": {share}}}}}"#
    );
    let parsed = Config::parse(json.as_bytes());
    let rounded = u64::from(entries).div_ceil(ways) * ways;
    let accepted = (1..=999_999_999).contains(&ttl_s)
        && (1..=MAX_DEDUP_ENTRIES).contains(&entries)
        && (1..=MAX_DEDUP_RESPONSE_BYTES).contains(&response)
        && metadata <= MAX_DEDUP_METADATA_BYTES
        && rounded * (u64::from(response) + u64::from(metadata) + ENTRY_OVERHEAD) <= MAX_DEDUP_TABLE_BYTES
        && share > 0.0
        && share <= 1.0;
    assert_eq!(parsed.is_ok(), accepted, "{json}: {parsed:?}");
    if let Ok(config) = parsed {
        let d = config.dedup.as_ref().expect("a method is listed");
        check_dedup_config(&config, d);
        assert_eq!(u64::from(d.max_entries), rounded);
        assert_eq!(d.caller_ways, ((share * WAYS as f64).ceil() as usize).clamp(1, WAYS));
        assert_eq!(d.ttl, Duration::from_secs(u64::from(ttl_s)));
    }
}

/// Shared data for one lookup: the bucket under the first key read (the
/// index of the key's bucket), the answer under any other, as the fuzzer
/// wrote them; then what the table writes.
struct FuzzStore {
    store: MapStore,
    index: Option<String>,
    bucket: Vec<u8>,
    answer: Vec<u8>,
}

impl FuzzStore {
    fn index(&self) -> (&str, [Record; WAYS]) {
        let key = self.index.as_deref().expect("the table read the key's bucket");
        (key, decode_bucket(self.value(key)))
    }

    fn value(&self, key: &str) -> &[u8] {
        self.store.value(key).expect("a value the table read or wrote")
    }
}

impl SharedStore for FuzzStore {
    fn get(&mut self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        if !self.store.values.contains_key(key) {
            let value = if self.index.is_none() {
                self.index = Some(key.to_owned());
                self.bucket.clone()
            } else {
                self.answer.clone()
            };
            self.store.values.insert(key.to_owned(), (value, 0));
        }
        self.store.get(key)
    }

    fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        self.store.set(key, value, cas)
    }
}

/// A record that holds its key at `now`.
fn live(record: &Record, now: u64) -> bool {
    record.state != State::Free && record.expires > now
}

/// A small time, so that claims and expiries compare often; 255 is "never".
fn time(byte: u8) -> u64 {
    if byte == u8::MAX {
        u64::MAX
    } else {
        u64::from(byte)
    }
}

/// A bucket whose ways hold `key` or others, of a few callers, at small times.
fn bucket_from(input: &mut Input<'_>, key: &Digest) -> Vec<u8> {
    let bucket: [Record; WAYS] = std::array::from_fn(|_| {
        let b = input.byte();
        Record {
            state: STATES[usize::from(b) % STATES.len()],
            key: if b & 0x80 != 0 { *key } else { input.array() },
            caller: u64::from(input.byte() % 4),
            owner: u64::from(input.byte()),
            claim_until: time(input.byte()),
            expires: time(input.byte()),
            fingerprint: [b; 32],
        }
    });
    encode_bucket(&bucket)
}

/// Byte 0: bit 0, the bucket is built from the bytes (`bucket_from`), not
/// taken raw (a u16 length, then its bytes); bit 1, the stored answer is
/// built and encoded for the key's owner, not taken raw. Then the table
/// (buckets, ttl, caller ways), the key, the caller, the owner, now and the
/// claim's end; the bucket; the answer; the settlement.
fn lookup_and_settle(data: &[u8]) {
    let mut input = Input(data);
    let control = input.byte();
    let table = DedupTable {
        buckets: u32::from(input.byte()).max(1),
        ttl_ns: time(input.byte()),
        caller_ways: usize::from(input.byte()) % (WAYS + 2),
    };
    let key: Digest = input.array();
    let caller = u64::from(input.byte() % 4);
    let owner = 1_000 + u64::from(input.byte());
    let now = time(input.byte());
    let claim_until = time(input.byte());
    let bucket = if control & 1 != 0 {
        bucket_from(&mut input, &key)
    } else {
        let len = usize::from(input.u16());
        input.take(len).to_vec()
    };
    let before = decode_bucket(&bucket);
    let answer = if control & 2 != 0 {
        let kept_by = before.iter().find(|r| r.key == key).map_or(0, |r| r.owner);
        encode_answer(kept_by, &answer_from(&mut input))
    } else {
        let len = usize::from(input.u16());
        input.take(len).to_vec()
    };
    let mut store = FuzzStore { store: MapStore::default(), index: None, bucket, answer };

    let lookup = table.lookup_or_claim(&mut store, &key, caller, owner, now, claim_until);
    let (index, after) = store.index();
    let bucket_number: u32 = index.rsplit('.').next().and_then(|n| n.parse().ok()).expect("a bucket's number");
    assert!(bucket_number < table.buckets, "bucket {bucket_number} of {}", table.buckets);
    let found = before.iter().position(|r| live(r, now) && r.key == key);
    let callers = before.iter().filter(|r| live(r, now) && r.caller == caller).count();
    let Lookup::Claimed { claim, evicted } = lookup else {
        assert_eq!(store.store.writes, 0, "only a claim writes");
        let record = found.map(|w| before[w]);
        match lookup {
            Lookup::InFlight => assert!(record.is_some_and(|r| r.state == State::InFlight && now < r.claim_until)),
            Lookup::Abandoned => assert!(record.is_some_and(|r| r.state == State::InFlight && now >= r.claim_until)),
            Lookup::Done { fingerprint, outcome } => {
                let r = record.expect("a finished call under the key");
                assert_eq!(fingerprint, r.fingerprint);
                let kept = decode_answer(&store.answer, r.owner);
                match outcome {
                    Outcome::Kept(a) => assert!(r.state == State::Kept && kept == Some(a)),
                    Outcome::NotKept => assert_eq!(r.state, State::NotKept),
                    Outcome::Unknown => {
                        assert!(r.state == State::Unknown || (r.state == State::Kept && kept.is_none()))
                    }
                }
            }
            Lookup::Full => assert!(found.is_none() && before.iter().all(|r| live(r, now))),
            Lookup::CallerFull => {
                assert!(found.is_none() && !before.iter().all(|r| live(r, now)));
                assert!(callers >= table.caller_ways);
            }
            Lookup::Contended => panic!("a store nobody else writes is never contended"),
            Lookup::Claimed { .. } => unreachable!(),
        }
        return;
    };
    assert_eq!(found, None, "a key that is there is claimed again");
    let way = before.iter().position(|r| !live(r, now)).expect("a claim takes a way that is not live");
    assert_eq!((claim.way, claim.key, claim.owner, claim.bucket), (way, key, owner, bucket_number));
    assert!(callers < table.caller_ways, "a caller beyond its share claimed");
    assert_eq!(evicted, before[way].state != State::Free && before[way].key != key);
    let expires = claim_until.saturating_add(table.ttl_ns);
    let claimed = Record { state: State::InFlight, key, caller, owner, claim_until, expires, fingerprint: [0; 32] };
    assert_eq!(after[way], claimed);
    for w in (0..WAYS).filter(|&w| w != way) {
        assert_eq!(after[w], before[w], "a claim changed another way");
    }
    settle(&table, &mut store, &claim, &mut input);
}

/// Settles `claim` as the bytes say; a settlement a retry can read is then
/// what a lookup of the key finds.
fn settle(table: &DedupTable, store: &mut FuzzStore, claim: &Claim, input: &mut Input<'_>) {
    let choice = input.byte();
    let now = time(input.byte());
    let fingerprint = [choice; 32];
    let answer = answer_from(input);
    let (state, settlement) = match choice % 4 {
        0 => (State::Free, Settlement::Free),
        1 => (State::Kept, Settlement::Keep { fingerprint, answer: Some(answer.clone()) }),
        2 => (State::NotKept, Settlement::Keep { fingerprint, answer: None }),
        _ => (State::Unknown, Settlement::Unknown { fingerprint }),
    };
    let (index, before) = store.index();
    let index = index.to_owned();
    let written = store.store.writes;
    assert!(table.settle(store, claim, settlement, now), "a store nobody else writes always settles");
    let (_, after) = store.index();
    for w in (0..WAYS).filter(|&w| w != claim.way) {
        assert_eq!(after[w], before[w], "a settle changed another way");
    }
    let mine = before[claim.way];
    if mine.expires <= now {
        assert_eq!(after[claim.way], mine, "an expired claim is not revived");
        return;
    }
    let settled = match state {
        State::Free => empty_bucket()[0],
        _ => Record { state, expires: now.saturating_add(table.ttl_ns), fingerprint, ..mine },
    };
    assert_eq!(after[claim.way], settled);
    if state == State::Kept {
        let stored = store.store.values.keys().find(|k| **k != index).expect("the answer is stored").clone();
        assert!(store.store.writes > written);
        assert_eq!(decode_answer(store.value(&stored), claim.owner).as_ref(), Some(&answer));
    }
    // A retry finds this way, unless the key has another way live again
    // at this time (it may go back before the claim's).
    let shadowed = (0..WAYS).any(|w| w != claim.way && after[w].key == claim.key && live(&after[w], now));
    if state == State::Free || settled.expires <= now || shadowed {
        return;
    }
    match table.lookup_or_claim(store, &claim.key, 0, claim.owner + 1, now, now) {
        Lookup::Done { fingerprint: f, outcome } => {
            assert_eq!(f, fingerprint);
            let expected = match state {
                State::Kept => Outcome::Kept(answer),
                State::NotKept => Outcome::NotKept,
                _ => Outcome::Unknown,
            };
            assert_eq!(outcome, expected, "a retry finds what the first call left");
        }
        other => panic!("a retry of a settled key got {other:?}"),
    }
}
