//! gRPC method names and the bound on how many of them get their own metrics.
//!
//! A gRPC request path is `/{package.Service}/{Method}` (PROTOCOL-HTTP2). Every
//! distinct method becomes a set of Envoy stats that live as long as Envoy, so
//! a client sending random paths could otherwise grow Envoy's memory without
//! end. Methods get their own label only if they are well-formed, match the
//! allowlist, and are among the first `max_methods` seen by this Envoy (all
//! workers together); everything else is counted as `other`.

/// Which side of the call this Envoy stands on, which picks the metric family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Direction {
    /// In front of a server (a sidecar's inbound listener): `grpc_server_*`.
    #[default]
    Inbound,
    /// In front of a client (egress, outbound listener): `grpc_client_*`.
    Outbound,
}

/// The gRPC call type, as go-grpc-prometheus labels it (`grpc_type`). A proxy
/// cannot read the method descriptor, so it is configured per method.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MethodType {
    #[default]
    Unary,
    ClientStream,
    ServerStream,
    BidiStream,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

impl MethodType {
    pub fn as_str(self) -> &'static str {
        match self {
            MethodType::Unary => "unary",
            MethodType::ClientStream => "client_stream",
            MethodType::ServerStream => "server_stream",
            MethodType::BidiStream => "bidi_stream",
        }
    }
}

/// The label value for every method folded for cardinality.
pub const OTHER: &str = "other";

/// Longest path given its own label; longer ones fold into `other`.
const MAX_PATH_LEN: usize = 256;

/// A well-formed gRPC method path, split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MethodPath<'a> {
    /// `package.Service`, e.g. `grpcguard.demo.v1.Demo`.
    pub service: &'a str,
    /// `Method`, e.g. `Echo`.
    pub method: &'a str,
}

impl<'a> MethodPath<'a> {
    /// Splits `/pkg.Svc/Method`. Only proto identifier characters are accepted
    /// (letters, digits, `_`, and `.` in the service), which also keeps the
    /// stat-name delimiters `=` and `;` out of label values.
    pub fn parse(path: &'a str) -> Option<MethodPath<'a>> {
        if path.len() > MAX_PATH_LEN {
            return None;
        }
        let rest = path.strip_prefix('/')?;
        let (service, method) = rest.split_once('/')?;
        let ident = |s: &str, dots: bool| {
            !s.is_empty()
                && !s.starts_with('.')
                && !s.ends_with('.')
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || (dots && b == b'.'))
        };
        (ident(service, true) && ident(method, false)).then_some(MethodPath { service, method })
    }

    /// `pkg.Svc/Method`, the form used in configuration.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.service, self.method)
    }
}

/// A configured method pattern: `pkg.Svc/Method`, with `*` matching any run of
/// characters (`pkg.Orders/Create*`, `pkg.Svc/*`, `*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MethodPattern(String);

impl MethodPattern {
    /// Accepts the pattern with or without a leading `/`.
    pub fn new(pattern: &str) -> MethodPattern {
        MethodPattern(pattern.strip_prefix('/').unwrap_or(pattern).to_owned())
    }

    /// How specific the pattern is: a longer pattern names fewer methods.
    pub fn specificity(&self) -> usize {
        self.0.len()
    }

    /// Names exactly `full_name`, with no `*`.
    pub fn names(&self, full_name: &str) -> bool {
        self.0 == full_name
    }

    /// Matches a full name `pkg.Svc/Method`.
    pub fn matches(&self, full_name: &str) -> bool {
        glob_match(self.0.as_bytes(), full_name.as_bytes())
    }
}

/// `*`-only glob matching, linear in practice: on a mismatch it backtracks to
/// the last `*` only.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(c) if Some(c) == text.get(t) => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern.get(p..).is_some_and(|rest| rest.iter().all(|&c| c == b'*'))
}

/// The set of methods admitted to their own label, as kept in proxy-wasm shared
/// data so that all Envoy workers agree: full names, one per line, in the
/// order they were admitted. It only ever grows, up to `max`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AdmittedMethods {
    names: Vec<String>,
}

/// What to do with a method that this worker has not seen yet.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// Already admitted (by another worker): use its label.
    Known,
    /// Not admitted and the table is full: fold into `other`.
    Full,
    /// Admit it: store this serialized table (compare-and-swap) and use the label.
    Store(Vec<u8>),
}

impl AdmittedMethods {
    pub fn from_bytes(bytes: &[u8]) -> AdmittedMethods {
        let text = String::from_utf8_lossy(bytes);
        AdmittedMethods { names: text.lines().filter(|l| !l.is_empty()).map(str::to_owned).collect() }
    }

    pub fn contains(&self, full_name: &str) -> bool {
        self.names.iter().any(|n| n == full_name)
    }

    /// Decides for `full_name` given a bound of `max` methods.
    pub fn admit(&self, full_name: &str, max: usize) -> Admission {
        if self.contains(full_name) {
            Admission::Known
        } else if self.names.len() >= max {
            Admission::Full
        } else {
            let mut out = Vec::new();
            for name in self.names.iter().map(String::as_str).chain([full_name]) {
                out.extend_from_slice(name.as_bytes());
                out.push(b'\n');
            }
            Admission::Store(out)
        }
    }
}

/// FNV-1a, for the per-worker map from request path to metric slot: a path is
/// hashed on every call, and SipHash's flood resistance buys nothing for a map
/// that holds at most `max_methods` entries.
#[derive(Clone, Copy, Debug, Default)]
pub struct FnvBuildHasher;

#[derive(Clone, Copy, Debug)]
pub struct FnvHasher(u64);

impl std::hash::BuildHasher for FnvBuildHasher {
    type Hasher = FnvHasher;
    fn build_hasher(&self) -> FnvHasher {
        FnvHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl std::hash::Hasher for FnvHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    impl AdmittedMethods {
        fn len(&self) -> usize {
            self.names.len()
        }
    }

    #[test]
    fn well_formed_path_splits_into_service_and_method() {
        assert_eq!(
            MethodPath::parse("/grpcguard.demo.v1.Demo/Echo"),
            Some(MethodPath { service: "grpcguard.demo.v1.Demo", method: "Echo" })
        );
    }

    #[test]
    fn malformed_paths_are_rejected() {
        for path in [
            "",
            "/",
            "//Echo",
            "/Svc/",
            "/Svc",
            "Svc/Echo",
            "/a.b/c/d",
            "/a b/c",
            "/svc/m;grpc_code=OK",
            "/svc/m=1",
            "/.svc/m",
            "/svc./m",
            "/svc/m?x=1",
        ] {
            assert_eq!(MethodPath::parse(path), None, "{path:?}");
        }
        let long = format!("/{}/M", "a".repeat(300));
        assert_eq!(MethodPath::parse(&long), None);
    }

    #[test]
    fn patterns_match_with_stars_and_optional_leading_slash() {
        assert!(MethodPattern::new("*").matches("pkg.Svc/M"));
        assert!(MethodPattern::new("pkg.Orders/Create*").matches("pkg.Orders/CreateOrder"));
        assert!(!MethodPattern::new("pkg.Orders/Create*").matches("pkg.Orders/Delete"));
        assert!(MethodPattern::new("/pkg.Svc/*").matches("pkg.Svc/Get"));
        assert!(MethodPattern::new("*/Get").matches("a.b/Get"));
        assert!(!MethodPattern::new("*/Get").matches("a.b/GetAll"));
        assert!(MethodPattern::new("pkg.Svc/M").matches("pkg.Svc/M"));
        assert!(!MethodPattern::new("pkg.Svc/M").matches("pkg.Svc/MM"));
    }

    #[test]
    fn fnv_matches_the_published_test_vector() {
        use std::hash::{BuildHasher, Hasher};
        let mut h = FnvBuildHasher.build_hasher();
        h.write(b"a");
        assert_eq!(h.finish(), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn admission_grows_to_the_bound_then_folds() {
        let mut table = AdmittedMethods::default();
        for name in ["a/A", "b/B"] {
            match table.admit(name, 2) {
                Admission::Store(bytes) => table = AdmittedMethods::from_bytes(&bytes),
                other => panic!("expected to admit {name}, got {other:?}"),
            }
        }
        assert_eq!(table.admit("a/A", 2), Admission::Known);
        assert_eq!(table.admit("c/C", 2), Admission::Full);
        assert_eq!(table.len(), 2);
    }

    proptest! {
        #[test]
        fn any_path_parses_without_panic(path in ".{0,300}") {
            if let Some(m) = MethodPath::parse(&path) {
                prop_assert_eq!(format!("/{}", m.full_name()), path);
            }
        }

        #[test]
        fn glob_star_matches_everything(text in "[a-zA-Z.][a-zA-Z./]{0,40}") {
            prop_assert!(MethodPattern::new("*").matches(&text));
            prop_assert!(MethodPattern::new(&text).matches(&text));
        }

        #[test]
        fn admitted_table_round_trips(names in proptest::collection::vec("[a-z]{1,5}/[A-Z]{1,5}", 0..10)) {
            let mut table = AdmittedMethods::default();
            for n in &names {
                if let Admission::Store(bytes) = table.admit(n, 5) {
                    table = AdmittedMethods::from_bytes(&bytes);
                }
            }
            let mut distinct: Vec<&String> = Vec::new();
            for n in &names {
                if !distinct.contains(&n) {
                    distinct.push(n);
                }
            }
            prop_assert_eq!(table.len(), distinct.len().min(5));
            for n in distinct.iter().take(5) {
                prop_assert!(table.contains(n), "first-come method {} must keep its label", n);
            }
        }
    }
}
