use std::path::{Path, PathBuf};

use proptest::prelude::*;

use super::dedup::{empty_bucket, varint};
use super::TARGETS;
use crate::dedup::{encode_answer, encode_bucket, Answer, Record, State, WAYS};
use crate::status::GrpcStatus;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The files in `dir`, sorted; none if there is no such directory.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
    files.sort();
    files
}

#[test]
fn committed_corpus_and_saved_crashes_hold_every_invariant() {
    let mut failed = Vec::new();
    for (target, body) in TARGETS {
        let seeds = files(&fuzz_dir().join("corpus").join(target));
        assert!(!seeds.is_empty(), "no seed corpus in fuzz/corpus/{target}/");
        for file in seeds.iter().chain(&files(&fuzz_dir().join("artifacts").join(target))) {
            let input = std::fs::read(file).unwrap();
            if std::panic::catch_unwind(|| body(&input)).is_err() {
                failed.push(file.display().to_string());
            }
        }
    }
    assert!(failed.is_empty(), "inputs that break an invariant (panics above): {failed:?}");
}

#[test]
fn every_fuzz_target_has_its_file_and_bin() {
    let on_disk: Vec<String> = files(&fuzz_dir().join("fuzz_targets"))
        .iter()
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    let mut named: Vec<String> = TARGETS.iter().map(|(t, _)| (*t).to_owned()).collect();
    named.sort();
    assert_eq!(on_disk, named, "fuzz/fuzz_targets/ and fuzzing::TARGETS list the same targets");
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    for target in &named {
        assert!(manifest.contains(&format!("name = \"{target}\"")), "fuzz/Cargo.toml has no [[bin]] {target}");
    }
}

/// Writes the seed corpus from [`seeds`], run by hand after a change to a
/// body's layout or to an encoding it reads:
/// `cargo test -p grpc-guard-filter --lib fuzzing -- --ignored`.
#[test]
#[ignore]
fn write_seed_corpus() {
    for (target, name, bytes) in seeds() {
        let dir = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

proptest! {
    // Beyond the seeds, without nightly: a few hundred random inputs each.
    #[test]
    fn arbitrary_inputs_hold_every_invariant(input in proptest::collection::vec(any::<u8>(), 0..600)) {
        for (_, body) in TARGETS {
            body(&input);
        }
    }
}

/// Meaningful inputs per target, in each body's layout: real configurations,
/// headers, bodies, paths and table entries.
fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut seeds = Vec::new();
    let mut add = |target: &'static str, name: &str, bytes: Vec<u8>| seeds.push((target, name.to_owned(), bytes));

    let readme = include_str!("../../../README.md");
    let example = readme
        .split("Example:\n\n```json\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the README's example configuration");
    add("config", "readme-example.json", example.into());
    add("config", "demo.json", include_str!("../../../envoy/demo-plugin-config.json").into());
    add("config", "empty-object.json", b"{}".to_vec());
    add("config", "empty", Vec::new());
    add("config", "everything.json", EVERY_FIELD.into());
    add("config", "unknown-field.json", br#"{"metrics": {"max_methodz": 5}}"#.to_vec());
    add(
        "config",
        "escapes.json",
        br#"{"log": {"request_id_header": "x-\u0072eq\ud83d\ude00"}, "dedup": {"scope": ["header:\/x"]}}"#.to_vec(),
    );
    add(
        "config",
        "not-an-object.json",
        br#"[1, -0.5e+10, 18446744073709551616, 1E-7, true, false, null, "\b\f\n\r\t"]"#.to_vec(),
    );
    add("config", "too-deep.json", [&b"{\"a\": "[..], &[b'['; 70], &[b']'; 70], b"}"].concat());

    for (name, value) in [
        ("seconds", "10S"),
        ("millis", "250m"),
        ("micros", "7u"),
        ("most-nanos", "99999999n"),
        ("minutes", "3M"),
        ("hour", "1H"),
        ("most-hours", "99999999H"),
        ("zero", "0S"),
        ("nine-digits", "100000000S"),
        ("fraction", "1.5S"),
        ("lower-case-unit", "10s"),
        ("no-unit", "10"),
        ("empty", ""),
    ] {
        add("grpc_timeout", name, value.into());
    }

    let hello = protobuf_string(1, b"hello");
    add("frames", "unary", [&[0][..], &frame(0, &hello)].concat());
    let three = [frame(0, &[7; 300]), frame(0, b""), frame(0, b"xy")].concat();
    add("frames", "prefix-split", frames_seed(0, &[1, 4, 200, 306, 307], &three));
    add("frames", "compressed", frames_seed(0, &[], &frame(1, b"\x1f\x8b\x08\x00\x00\x00\x00\x00")));
    let stream: Vec<u8> =
        (0..6u8).flat_map(|i| frame(0, &protobuf_string(1, &vec![b'a' + i; usize::from(i) * 3]))).collect();
    add("frames", "stream", frames_seed(0, &[3, 12, 30, 31], &stream));
    add("frames", "http1", frames_seed(0, &[], b"GET / HTTP/1.1\r\nHost: shop\r\n\r\n"));
    add("frames", "largest-length", frames_seed(0, &[], &[0, 0xff, 0xff, 0xff, 0xff, 1, 2, 3]));
    add("frames", "payload-cut", frames_seed(0, &[2], &frame(0, &hello)[..9]));
    add(
        "frames",
        "bad-flag-after-frame",
        frames_seed(0, &[6], &[frame(0, b"ok"), b"\x02\0\0\0\x01x".to_vec()].concat()),
    );
    add("frames", "short-reads", frames_seed(0x80, &[3, 8, 9], &three));

    for (name, max, pattern, text) in [
        ("service-star", 200, "shop.v1.Orders/*", "/shop.v1.Orders/Create"),
        ("star", 200, "*", "/grpc.health.v1.Health/Check"),
        ("admit", 10, "pkg.Svc/C", "pkg.Svc/A\npkg.Svc/B\n"),
        ("known", 10, "/pkg.Svc/A", "pkg.Svc/A\npkg.Svc/B\n"),
        ("table-full", 2, "pkg.Svc/C", "pkg.Svc/A\npkg.Svc/B\n"),
        ("crlf-table", 10, "pkg.Svc/C", "pkg.Svc/A\r\npkg.Svc/B\r\n"),
        ("suffix-star", 5, "*/Get", "a.b/GetAll"),
        ("prefix-star", 5, "pkg.Orders/Create*", "pkg.Orders/CreateOrder"),
        ("stat-delimiters", 5, "", "/svc/m;grpc_code=OK"),
        ("dots", 5, "a..b/*", "/.svc/m"),
    ] {
        add("method", name, method_seed(max, pattern, text));
    }
    add("method", "long-path", method_seed(5, "a/B", &format!("/{}/M", "a".repeat(300))));

    for (name, value) in [
        ("ok", &b"0"[..]),
        ("unavailable", b"14"),
        ("unauthenticated", b"16"),
        ("past-the-table", b"17"),
        ("ten-digits", b"9999999999"),
        ("eleven-digits", b"99999999999"),
        ("negative", b"-1"),
        ("message-percent", b"100% sure\nnext"),
        ("message-utf8", "caf\u{e9} \u{2014} d\u{e9}j\u{e0} vu".as_bytes()),
        ("message-not-utf8", b"bad \xff\xfe bytes"),
        ("details-upstream-reset", b"upstream_reset_before_response_started{connection_failure}"),
        ("details-remote-reset", b"http2.remote_reset"),
        ("details-downstream", b"downstream_remote_disconnect"),
        ("details-timeout", b"max_duration_timeout"),
    ] {
        add("status", name, value.to_vec());
    }
    // A code / HTTP status, then what the response showed: flags (1 HTTP
    // status, 2 header status, 4 trailer status, 8 complete, 16 client
    // reset), header status, trailer status, HTTP status.
    add("status", "http-503", [&503u32.to_le_bytes()[..], &[0b1001, 0, 0], &503u16.to_le_bytes()].concat());
    add("status", "trailers-only", [&200u32.to_le_bytes()[..], &[0b1011, 14, 0], &200u16.to_le_bytes()].concat());
    add("status", "trailers", [&0u32.to_le_bytes()[..], &[0b1111, 0, 5], &200u16.to_le_bytes()].concat());
    add("status", "client-reset", [&0u32.to_le_bytes()[..], &[0b10001, 0, 0], &200u16.to_le_bytes()].concat());

    let principal = b"spiffe://cluster.local/ns/shop/sa/web";
    let method = b"shop.v1.Orders/Create";
    let scope = [&principal[..], method, b"order-42"].concat();
    let (p, m) = (principal.len() as u8, method.len() as u8);
    for (name, flags, a, b, content) in [
        ("bare", 0, vec![], vec![], b"order-42".to_vec()),
        ("uuid-required", 1, vec![], vec![], b"8e03978e-40d5-43e8-bc93-6894a57f9324".to_vec()),
        ("quoted", 0, vec![], vec![], b"\"order-42\"".to_vec()),
        ("quoted-escapes", 1, vec![], vec![], br#""a\"b\\c d""#.to_vec()),
        ("quoted-bad-escape", 0, vec![], vec![], br#""a\nb""#.to_vec()),
        ("not-printable", 0, vec![], vec![], b"order 42\x01".to_vec()),
        ("too-long", 0, vec![], vec![], vec![b'k'; 256]),
        ("scope-shifted", 0, vec![p, m], vec![p - 1, m + 1], scope.clone()),
        ("scope-same", 0, vec![p, m], vec![p, m], scope),
        ("empty-parts", 0, vec![0, 0], vec![0], b"ab".to_vec()),
        ("long-part", 0x80, vec![], vec![], b"k".to_vec()),
        ("request-id-field", 0, vec![5], vec![], [&b"\x08\xac\x02"[..], &protobuf_string(5, b"req-42")].concat()),
        (
            "nested-field",
            0,
            vec![2, 1],
            vec![],
            [protobuf_string(2, &protobuf_string(1, b"inner")), protobuf_string(2, &protobuf_string(3, b"other"))]
                .concat(),
        ),
        ("scalar-field", 0, vec![1], vec![], b"\x08\x07".to_vec()),
    ] {
        add("dedup_key", name, [&[flags, a.len() as u8, b.len() as u8][..], &a, &b, &content].concat());
    }

    let bucket = encode_bucket(&sample_bucket());
    add("dedup_table", "bucket", [&[0][..], &bucket].concat());
    add("dedup_table", "bucket-torn", [&[0][..], &bucket[..bucket.len() - 1]].concat());
    let mut bad_state = bucket.clone();
    bad_state[1] = 9;
    add("dedup_table", "bucket-bad-state", [&[0][..], &bad_state].concat());
    add("dedup_table", "bucket-made-well-formed", [&[1][..], &bad_state].concat());
    add("dedup_table", "answer", [&[2][..], &encode_answer(77, &ok_answer())].concat());
    add("dedup_table", "answer-trailers-only", [&[2][..], &encode_answer(5, &not_found_answer())].concat());
    add("dedup_table", "table-numbers", table_numbers_seed(10_000, 300, 2, (10_000, 65_536, 4_096, 2_500, 300)));
    add(
        "dedup_table",
        "table-numbers-at-bounds",
        table_numbers_seed(0, 0, 0, (1_000_000, 817, 0, 10_000, 999_999_999)),
    );
    add(
        "dedup_table",
        "table-numbers-too-big",
        table_numbers_seed(u32::MAX, u64::MAX, 255, (1_000_000, 4 << 20, 65_536, 1, 1)),
    );
    for (name, lookup) in lookup_seeds() {
        add("dedup_table", name, [&[4][..], &lookup].concat());
    }
    seeds
}

/// Every field of the configuration, each with a value other than its default.
const EVERY_FIELD: &str = r#"{
  "direction": "outbound",
  "non_grpc": "pass",
  "metrics": { "methods": ["shop.v1.Orders/*", "/grpc.health.v1.Health/Check"], "max_methods": 10000,
               "method_types": { "shop.v1.Orders/Watch": "server_stream", "shop.v1.Orders/Upload": "client_stream",
                                 "shop.v1.Orders/Chat": "bidi_stream", "shop.v1.Orders/Get": "unary" } },
  "log": { "ok_sample": 1.0, "request_id_header": "X-Request-Id" },
  "deadline": { "default": "250ms", "max": "1h",
                "per_method": { "shop.v1.Orders/Create*": { "max": "30s" }, "/shop.v1.Orders/Export": { "default": null } } },
  "limits": { "max_request_message_bytes": null,
              "per_method": { "shop.v1.Orders/Upload": { "max_request_message_bytes": 4294967295 } } },
  "dedup": { "header": "x-idempotency-key", "methods": ["shop.v1.Orders/Create", "shop.v1.Orders/Pay*"],
             "key_fields": { "shop.v1.Orders/Create": 5, "shop.v1.Orders/PayInvoice": [2, 1] },
             "require_key": true, "ttl": "1h", "max_entries": 100000, "max_response_bytes": 1000,
             "max_metadata_bytes": 0,
             "scope": ["source.principal", "request.auth.principal", "metadata:envoy.filters.http.jwt_authn/payload/sub",
                       "header:authorization", ":authority"],
             "when_full": "forward", "anonymous": "forward", "caller_share": 0.125 }
}"#;

fn frame(flag: u8, message: &[u8]) -> Vec<u8> {
    [&[flag][..], &(message.len() as u32).to_be_bytes(), message].concat()
}

fn frames_seed(control: u8, cuts: &[u16], body: &[u8]) -> Vec<u8> {
    let mut out = vec![control | cuts.len() as u8];
    out.extend(cuts.iter().flat_map(|c| c.to_le_bytes()));
    out.extend_from_slice(body);
    out
}

fn protobuf_string(number: u32, value: &[u8]) -> Vec<u8> {
    [varint(u64::from(number) << 3 | 2), varint(value.len() as u64), value.to_vec()].concat()
}

fn method_seed(max: u8, pattern: &str, text: &str) -> Vec<u8> {
    [&[max, pattern.len() as u8][..], pattern.as_bytes(), text.as_bytes()].concat()
}

fn sample_bucket() -> [Record; WAYS] {
    let mut bucket = empty_bucket();
    let record = |state, key: u8, caller, expires| Record {
        state,
        key: [key; 32],
        caller,
        owner: 77,
        claim_until: 1_000,
        expires,
        fingerprint: [key ^ 0xff; 32],
    };
    bucket[0] = record(State::Kept, 1, 9, 5_000);
    bucket[3] = record(State::InFlight, 2, 9, 6_000);
    bucket[5] = record(State::Unknown, 3, 10, 7_000);
    bucket[7] = record(State::NotKept, 4, 11, 8_000);
    bucket
}

fn ok_answer() -> Answer {
    Answer {
        status: GrpcStatus::Ok,
        headers: vec![("content-type".into(), b"application/grpc".to_vec()), ("x-order".into(), b"42".to_vec())],
        body: frame(0, &protobuf_string(1, b"order-42")),
        trailers: vec![("grpc-status".into(), b"0".to_vec())],
    }
}

fn not_found_answer() -> Answer {
    Answer {
        status: GrpcStatus::NotFound,
        headers: Vec::new(),
        body: Vec::new(),
        trailers: vec![("grpc-status".into(), b"5".to_vec()), ("grpc-message".into(), b"no such order".to_vec())],
    }
}

/// `DedupTable::new`'s numbers, then a configuration's dedup numbers:
/// entries, response bytes, metadata bytes, caller share in 1/10000, ttl in seconds.
fn table_numbers_seed(entries: u32, ttl_s: u64, caller_ways: u8, config: (u32, u32, u32, u16, u32)) -> Vec<u8> {
    let (e, r, m, share, ttl) = config;
    [
        &[3][..],
        &entries.to_le_bytes(),
        &ttl_s.to_le_bytes(),
        &0u32.to_le_bytes(),
        &[caller_ways],
        &e.to_le_bytes(),
        &r.to_le_bytes(),
        &m.to_le_bytes(),
        &share.to_le_bytes(),
        &ttl.to_le_bytes(),
    ]
    .concat()
}

/// One way as `bucket_from` reads it: a state (its bit 7: the way holds
/// the looked-up key), then, for another key, that key; caller, owner,
/// claim end, expiry.
fn way(state: State, ours: bool, caller: u8, claim_until: u8, expires: u8) -> Vec<u8> {
    // The state is the byte mod 5: with bit 7 set, the first such byte.
    let b = if ours { (0x80..=0xff).find(|x: &u8| x % 5 == state as u8).unwrap() } else { state as u8 };
    let mut out = vec![b];
    if !ours {
        out.extend([0x5a; 32]);
    }
    out.extend([caller, 9, claim_until, expires]);
    out
}

/// Lookups (`lookup_and_settle`'s layout, after its mode byte): a claim in
/// an empty bucket settled with a kept answer, a replay of a kept answer, a
/// call still in flight, a full bucket, a caller at its share.
fn lookup_seeds() -> Vec<(&'static str, Vec<u8>)> {
    const KEY: [u8; 32] = [0x11; 32];
    // Table (buckets, ttl, caller ways), key, caller, owner, now, claim end.
    let head = |control: u8| [&[control, 16, 100, 2][..], &KEY, &[1, 7, 10, 50]].concat();
    // Settle: keep (choice 1) at time 20, with an OK answer and no metadata.
    let settle_kept = [1, 20, 0, 0, 3, 0, b'a', b'b', b'c', 0];
    let free = || way(State::Free, false, 0, 0, 0);
    let bucket = |ways: Vec<Vec<u8>>| -> Vec<u8> {
        let mut all: Vec<Vec<u8>> = ways;
        while all.len() < WAYS {
            all.push(free());
        }
        all.concat()
    };
    let empty_raw = [0u8, 0, 0, 0];
    // An answer: status, no headers, a 3-byte body, no trailers.
    let answer = [0u8, 0, 3, 0, b'x', b'y', b'z', 0];
    vec![
        ("lookup-claim-then-keep", [&head(0)[..], &empty_raw, &settle_kept].concat()),
        (
            "lookup-replays-kept",
            [head(3), bucket(vec![free(), way(State::Kept, true, 1, 5, 200)]), answer.to_vec()].concat(),
        ),
        ("lookup-in-flight", [head(1), bucket(vec![way(State::InFlight, true, 1, 100, 200)]), vec![0, 0]].concat()),
        (
            "lookup-bucket-full",
            [
                head(1),
                (0..WAYS).map(|_| way(State::InFlight, false, 2, 100, 200)).collect::<Vec<_>>().concat(),
                vec![0, 0],
            ]
            .concat(),
        ),
        (
            "lookup-caller-at-share",
            [
                head(1),
                bucket(vec![way(State::Unknown, false, 1, 5, 200), way(State::Kept, false, 1, 5, 200)]),
                vec![0, 0],
            ]
            .concat(),
        ),
        (
            "lookup-claims-expired-way",
            [
                head(1),
                bucket(vec![way(State::Kept, false, 3, 5, 9), way(State::Unknown, true, 1, 5, 10)]),
                vec![0, 0],
                vec![3, 30, 0, 0, 0, 0, 0],
            ]
            .concat(),
        ),
    ]
}
