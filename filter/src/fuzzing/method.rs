//! `method`: `:path` parsing, method patterns and the admitted-methods
//! table.

use super::Input;
use crate::method::{Admission, AdmittedMethods, MethodPath, MethodPattern};

/// The longest pattern and name the reference glob is asked about: it is
/// quadratic, and the stars' backtracking shows on short ones.
const GLOB_CHARS: usize = 48;

/// `method`: byte 0 is `max_methods`, byte 1 the length of a pattern that
/// follows; the rest is a `:path` and also the admitted-methods table as
/// read from shared data. `MethodPath::parse` agrees with the grammar and a
/// parsed path's full name parses back to it; a pattern matches exactly
/// what a reference glob matches; admission never stores more than `max`
/// names and what it stores reads back as the names it had plus the new one.
pub fn method(data: &[u8]) {
    let mut input = Input(data);
    let max = usize::from(input.byte());
    let pattern_len = usize::from(input.byte());
    let pattern = String::from_utf8_lossy(input.take(pattern_len)).into_owned();
    let table = input.rest();
    let text = String::from_utf8_lossy(table);
    check_path(&pattern);
    check_path(&text);

    let name: String = text.chars().take(GLOB_CHARS).collect();
    let short: String = pattern.chars().take(GLOB_CHARS).collect();
    let bare = short.strip_prefix('/').unwrap_or(&short);
    let p = MethodPattern::new(&short);
    assert_eq!(p.matches(&name), reference_glob(bare.as_bytes(), name.as_bytes()), "{short:?} against {name:?}");
    assert_eq!(p.names(&name), bare == name);
    assert_eq!(p.specificity(), bare.len());

    check_admission(table, &pattern, max);
}

fn check_path(path: &str) {
    let parsed = MethodPath::parse(path);
    assert_eq!(parsed.is_some(), reference_path(path), "{path:?}");
    if let Some(m) = parsed {
        let full = m.full_name();
        assert_eq!(format!("/{full}"), path);
        let slashed = format!("/{full}");
        let again = MethodPath::parse(&slashed).expect("a full name parses back");
        assert_eq!((again.service, again.method), (m.service, m.method));
        // Stat names are delimited by `=` and `;`: a label value never has them.
        assert!(!full.contains(['=', ';']));
    }
}

/// `/{package.Service}/{Method}` with proto identifier characters, at most
/// 256 bytes, written out independently.
fn reference_path(path: &str) -> bool {
    let word = |s: &str, dots: bool| {
        !s.is_empty()
            && !s.starts_with('.')
            && !s.ends_with('.')
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || (dots && c == '.'))
    };
    let parts: Vec<&str> = path.split('/').collect();
    path.len() <= 256 && parts.len() == 3 && parts[0].is_empty() && word(parts[1], true) && word(parts[2], false)
}

/// `*` matches any run of bytes, everything else itself: dynamic
/// programming over prefixes.
fn reference_glob(pattern: &[u8], text: &[u8]) -> bool {
    // matched[j]: the pattern so far matches text[..j]; updated in place
    // for each pattern byte.
    let mut matched = vec![false; text.len() + 1];
    matched[0] = true;
    for &c in pattern {
        if c == b'*' {
            for j in 1..=text.len() {
                matched[j] |= matched[j - 1];
            }
        } else {
            for j in (1..=text.len()).rev() {
                matched[j] = matched[j - 1] && text[j - 1] == c;
            }
            matched[0] = false;
        }
    }
    matched[text.len()]
}

/// `stored` is what shared data holds; `pattern`, if a method name, the
/// method a worker wants to admit.
fn check_admission(stored: &[u8], pattern: &str, max: usize) {
    let table = AdmittedMethods::from_bytes(stored);
    let lines: Vec<String> =
        String::from_utf8_lossy(stored).lines().filter(|l| !l.is_empty()).map(str::to_owned).collect();
    // Whatever the name, no panic.
    let _ = table.admit(pattern, max);
    let bare = pattern.strip_prefix('/').unwrap_or(pattern);
    let slashed = format!("/{bare}");
    let Some(name) = MethodPath::parse(&slashed).map(|p| p.full_name()) else { return };
    match table.admit(&name, max) {
        Admission::Known => assert!(lines.contains(&name)),
        Admission::Full => assert!(!lines.contains(&name) && lines.len() >= max),
        Admission::Store(bytes) => {
            assert!(!lines.contains(&name));
            assert!(lines.len() < max, "{} names stored past a bound of {max}", lines.len() + 1);
            let grown = AdmittedMethods::from_bytes(&bytes);
            assert!(grown.contains(&name));
            assert_eq!(grown.admit(&name, max), Admission::Known);
            // Shared data only ever holds what `admit` wrote: method names,
            // each on its own line. For such a table the bytes are the old
            // names in order, then the new one, and they read back the same.
            if lines.iter().all(|l| MethodPath::parse(&format!("/{l}")).is_some_and(|p| p.full_name() == *l)) {
                let expected: String = lines.iter().chain([&name]).map(|n| format!("{n}\n")).collect();
                assert_eq!(String::from_utf8_lossy(&bytes), expected);
                let fresh = (0..).map(|i| format!("fuzz.Fresh/M{i}")).find(|n| !grown.contains(n)).unwrap();
                match grown.admit(&fresh, usize::MAX) {
                    Admission::Store(again) => assert_eq!(again, [&bytes[..], fresh.as_bytes(), b"\n"].concat()),
                    other => panic!("a fresh name got {other:?}"),
                }
            }
        }
    }
}
