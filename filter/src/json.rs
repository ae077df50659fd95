//! A small JSON reader for the plugin configuration (RFC 8259): a document
//! becomes a [`Json`] tree, and [`Fields`] takes an object's fields one by
//! one, naming each field's path in its errors and refusing the fields
//! nobody took. It replaces serde_json, which was a sixth of the `.wasm` for
//! a document read once per worker.

use std::fmt;

/// A JSON value. Objects keep their fields in document order.
#[derive(Clone, Debug, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    /// A number written as a whole number: digits only, no sign, fraction or
    /// exponent (and small enough for `u64`).
    Integer(u64),
    /// Any other number.
    Number(f64),
    String(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

/// Nesting deeper than this is refused rather than recursed into.
const MAX_DEPTH: usize = 64;

impl Json {
    /// Parses a whole document; trailing bytes other than whitespace are an
    /// error. Errors say what was wrong, not where (the document is small).
    pub fn parse(text: &str) -> Result<Json, String> {
        let mut p = Parser { bytes: text.as_bytes(), at: 0 };
        let value = p.value(0)?;
        p.whitespace();
        if p.at < p.bytes.len() {
            return Err("trailing characters after the JSON value".to_owned());
        }
        Ok(value)
    }

    /// What the value is, for an error message: `string "lots"`, `an array`.
    pub fn describe(&self) -> String {
        match self {
            Json::Null => "null".to_owned(),
            Json::Bool(b) => format!("boolean `{b}`"),
            Json::Integer(n) => format!("number {n}"),
            Json::Number(n) => format!("number {}", Number(*n)),
            Json::String(s) => format!("string {s:?}"),
            Json::Array(_) => "an array".to_owned(),
            Json::Object(_) => "an object".to_owned(),
        }
    }
}

/// A number as written back in messages: integers without a fraction.
struct Number(f64);

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.fract() == 0.0 && self.0.abs() < 1e15 {
            write!(f, "{}", self.0 as i64)
        } else {
            write!(f, "{}", self.0)
        }
    }
}

struct Parser<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    fn value(&mut self, depth: usize) -> Result<Json, String> {
        if depth > MAX_DEPTH {
            return Err(format!("nested deeper than {MAX_DEPTH} levels"));
        }
        self.whitespace();
        match self.peek() {
            None => Err("EOF while parsing a value".to_owned()),
            Some(b'{') => self.object(depth),
            Some(b'[') => self.array(depth),
            Some(b'"') => self.string().map(Json::String),
            Some(b't') => self.word("true", Json::Bool(true)),
            Some(b'f') => self.word("false", Json::Bool(false)),
            Some(b'n') => self.word("null", Json::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => Err("expected value".to_owned()),
        }
    }

    fn word(&mut self, word: &str, value: Json) -> Result<Json, String> {
        if self.bytes.get(self.at..self.at + word.len()) == Some(word.as_bytes()) {
            self.at += word.len();
            Ok(value)
        } else {
            Err("expected value".to_owned())
        }
    }

    fn object(&mut self, depth: usize) -> Result<Json, String> {
        self.at += 1;
        let mut fields: Vec<(String, Json)> = Vec::new();
        self.whitespace();
        if self.peek() == Some(b'}') {
            self.at += 1;
            return Ok(Json::Object(fields));
        }
        loop {
            self.whitespace();
            if self.peek() != Some(b'"') {
                return Err("key must be a string".to_owned());
            }
            let key = self.string()?;
            self.whitespace();
            if self.peek() != Some(b':') {
                return Err("expected `:` after an object key".to_owned());
            }
            self.at += 1;
            let value = self.value(depth + 1)?;
            if fields.iter().any(|(k, _)| *k == key) {
                return Err(format!("duplicate field `{key}`"));
            }
            fields.push((key, value));
            if self.closed(b'}', "an object field")? {
                return Ok(Json::Object(fields));
            }
        }
    }

    /// After an item of an object or array: a `,` (more follow) or `close`
    /// (true: the container ended).
    fn closed(&mut self, close: u8, after: &str) -> Result<bool, String> {
        self.whitespace();
        match self.peek() {
            Some(b',') => {
                self.at += 1;
                Ok(false)
            }
            Some(b) if b == close => {
                self.at += 1;
                Ok(true)
            }
            _ => Err(format!("expected `,` or `{}` after {after}", char::from(close))),
        }
    }

    fn array(&mut self, depth: usize) -> Result<Json, String> {
        self.at += 1;
        let mut items = Vec::new();
        self.whitespace();
        if self.peek() == Some(b']') {
            self.at += 1;
            return Ok(Json::Array(items));
        }
        loop {
            items.push(self.value(depth + 1)?);
            if self.closed(b']', "an array item")? {
                return Ok(Json::Array(items));
            }
        }
    }

    fn string(&mut self) -> Result<String, String> {
        self.at += 1;
        let mut out: Vec<u8> = Vec::new();
        loop {
            let Some(b) = self.peek() else { return Err("EOF while parsing a string".to_owned()) };
            self.at += 1;
            match b {
                b'"' => return String::from_utf8(out).map_err(|_| "string is not UTF-8".to_owned()),
                b'\\' => {
                    let Some(e) = self.peek() else { return Err("EOF while parsing a string".to_owned()) };
                    self.at += 1;
                    let c = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => self.unicode_escape()?,
                        _ => return Err("invalid escape in a string".to_owned()),
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
                0x00..=0x1f => return Err("control character in a string".to_owned()),
                _ => out.push(b),
            }
        }
    }

    /// The four hex digits after `\u`, and a low surrogate's after a high one.
    fn unicode_escape(&mut self) -> Result<char, String> {
        let first = self.hex4()?;
        let code = if (0xD800..0xDC00).contains(&first) {
            if self.bytes.get(self.at..self.at + 2) != Some(b"\\u") {
                return Err("lone surrogate in a string".to_owned());
            }
            self.at += 2;
            let low = self.hex4()?;
            if !(0xDC00..0xE000).contains(&low) {
                return Err("lone surrogate in a string".to_owned());
            }
            0x10000 + ((first - 0xD800) << 10) + (low - 0xDC00)
        } else {
            first
        };
        char::from_u32(code).ok_or_else(|| "lone surrogate in a string".to_owned())
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let digits = self.bytes.get(self.at..self.at + 4).ok_or("EOF while parsing a string")?;
        if !digits.iter().all(u8::is_ascii_hexdigit) {
            return Err("invalid \\u escape".to_owned());
        }
        let text = std::str::from_utf8(digits).map_err(|_| "invalid \\u escape")?;
        let code = u32::from_str_radix(text, 16).map_err(|_| "invalid \\u escape")?;
        self.at += 4;
        Ok(code)
    }

    fn number(&mut self) -> Result<Json, String> {
        let start = self.at;
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        let digits = |p: &mut Self| {
            let from = p.at;
            while matches!(p.peek(), Some(b'0'..=b'9')) {
                p.at += 1;
            }
            p.at - from
        };
        let int_start = self.at;
        if digits(self) == 0 || (self.bytes.get(int_start) == Some(&b'0') && self.at - int_start > 1) {
            return Err("invalid number".to_owned());
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            if digits(self) == 0 {
                return Err("invalid number".to_owned());
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.at += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.at += 1;
            }
            if digits(self) == 0 {
                return Err("invalid number".to_owned());
            }
        }
        let text = std::str::from_utf8(self.bytes.get(start..self.at).unwrap_or_default()).unwrap_or_default();
        if text.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(n) = text.parse::<u64>() {
                return Ok(Json::Integer(n));
            }
        }
        text.parse::<f64>().map(Json::Number).map_err(|_| "invalid number".to_owned())
    }
}

/// The fields of one object of the configuration, taken one by one.
/// `path` names the object (`""` for the document, `dedup`, ...): errors name
/// the field as `path.field`.
pub struct Fields {
    path: String,
    fields: Vec<(String, Json)>,
}

/// A field's path and what is wrong with it.
pub type FieldError = (String, String);

impl Fields {
    /// The object at `path`, or an error naming it if `value` is no object.
    pub fn of(path: &str, value: Json) -> Result<Fields, FieldError> {
        match value {
            Json::Object(fields) => Ok(Fields { path: path.to_owned(), fields }),
            other => Err((name_of(path), format!("invalid type: {}, expected an object", other.describe()))),
        }
    }

    /// The path of `field` in this object.
    pub fn path(&self, field: &str) -> String {
        if self.path.is_empty() {
            field.to_owned()
        } else {
            format!("{}.{field}", self.path)
        }
    }

    /// Takes `field` out, if present. A `null` is a value like any other
    /// (what a template writes for a value it was not given): the readers
    /// refuse it, so it never quietly stands for the default.
    pub fn take(&mut self, field: &str) -> Option<Json> {
        let at = self.fields.iter().position(|(k, _)| k == field)?;
        Some(self.fields.remove(at).1)
    }

    /// Takes `field` and reads it with `read`, naming the field on error.
    pub fn read<T>(
        &mut self,
        field: &str,
        read: impl FnOnce(Json) -> Result<T, String>,
    ) -> Result<Option<T>, FieldError> {
        let value = self.take(field);
        self.apply(field, value, read)
    }

    /// [`Fields::read`] for a field whose absence means "none" (a deadline, a
    /// limit): `null` says the same.
    pub fn read_optional<T>(
        &mut self,
        field: &str,
        read: impl FnOnce(Json) -> Result<T, String>,
    ) -> Result<Option<T>, FieldError> {
        let value = self.take(field).filter(|v| !matches!(v, Json::Null));
        self.apply(field, value, read)
    }

    fn apply<T>(
        &self,
        field: &str,
        value: Option<Json>,
        read: impl FnOnce(Json) -> Result<T, String>,
    ) -> Result<Option<T>, FieldError> {
        value.map(read).transpose().map_err(|reason| (self.path(field), reason))
    }

    /// Takes the object `field`, if present.
    pub fn object(&mut self, field: &str) -> Result<Option<Fields>, FieldError> {
        let path = self.path(field);
        self.take(field).map(|value| Fields::of(&path, value)).transpose()
    }

    /// Refuses any field not taken: a misspelt name must not silently fall
    /// back to a default.
    pub fn finish(self, known: &[&str]) -> Result<(), FieldError> {
        match self.fields.into_iter().next() {
            None => Ok(()),
            Some((key, _)) => {
                let path = if self.path.is_empty() { key.clone() } else { format!("{}.{key}", self.path) };
                Err((path, format!("unknown field `{key}`, expected one of {}", quoted(known))))
            }
        }
    }

    /// The fields left, in document order (for maps keyed by method name).
    pub fn into_entries(self) -> Vec<(String, Json)> {
        self.fields
    }
}

fn name_of(path: &str) -> String {
    if path.is_empty() {
        "configuration".to_owned()
    } else {
        path.to_owned()
    }
}

/// `a`, `b` or `c`, for messages.
pub fn quoted(names: &[&str]) -> String {
    names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
}

/// A string value.
pub fn string(value: Json) -> Result<String, String> {
    match value {
        Json::String(s) => Ok(s),
        other => Err(format!("invalid type: {}, expected a string", other.describe())),
    }
}

/// A boolean value.
pub fn boolean(value: Json) -> Result<bool, String> {
    match value {
        Json::Bool(b) => Ok(b),
        other => Err(format!("invalid type: {}, expected a boolean", other.describe())),
    }
}

/// A number value.
pub fn number(value: Json) -> Result<f64, String> {
    match value {
        Json::Number(n) => Ok(n),
        Json::Integer(n) => Ok(n as f64),
        other => Err(format!("invalid type: {}, expected a number", other.describe())),
    }
}

/// A whole number from 0 to `max`.
pub fn unsigned(value: Json, max: u64) -> Result<u64, String> {
    whole(value, 0, max)
}

/// A whole number from `min` to `max`, written as one (`4096`, not
/// `4096.0` or `4.096e3`).
pub fn whole(value: Json, min: u64, max: u64) -> Result<u64, String> {
    match value {
        Json::Integer(n) if (min..=max).contains(&n) => Ok(n),
        Json::Integer(n) => Err(format!("invalid value: {n}, expected a whole number from {min} to {max}")),
        // Shown as the parser read it: `4096.0` stays `4096.0`, so the
        // message names what is wrong with it.
        Json::Number(n) => Err(format!(
            "invalid value: {n:?}, expected a whole number from {min} to {max} written without a fraction, \
             exponent or sign"
        )),
        other => Err(format!("invalid type: {}, expected a whole number", other.describe())),
    }
}

/// An array of strings.
pub fn strings(value: Json) -> Result<Vec<String>, String> {
    match value {
        Json::Array(items) => items.into_iter().map(string).collect(),
        other => Err(format!("invalid type: {}, expected an array of strings", other.describe())),
    }
}

/// One of `names`, as a string.
pub fn one_of<T: Copy>(value: Json, choices: &[(&str, T)]) -> Result<T, String> {
    let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
    match value {
        Json::String(s) => choices
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, v)| *v)
            .ok_or_else(|| format!("unknown variant `{s}`, expected one of {}", quoted(&names))),
        other => Err(format!("invalid type: {}, expected one of {}", other.describe(), quoted(&names))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn documents_parse_as_json_says() {
        let doc = Json::parse(r#" {"a": [1, -2.5e3, true, null, "x\"\u00e9\ud83d\ude00"], "b": {}} "#).unwrap();
        assert_eq!(
            doc,
            Json::Object(vec![
                (
                    "a".into(),
                    Json::Array(vec![
                        Json::Integer(1),
                        Json::Number(-2500.0),
                        Json::Bool(true),
                        Json::Null,
                        Json::String("x\"é😀".into())
                    ])
                ),
                ("b".into(), Json::Object(vec![])),
            ])
        );
    }

    #[test]
    fn malformed_documents_are_refused_with_a_reason() {
        for (text, reason) in [
            ("{not json", "key must be a string"),
            ("{\"a\":1,}", "key must be a string"),
            ("[1,]", "expected value"),
            ("{\"a\":1} x", "trailing characters after the JSON value"),
            ("{\"a\":1,\"a\":2}", "duplicate field `a`"),
            ("01", "invalid number"),
            ("\"a\nb\"", "control character in a string"),
            ("\"\\ud800\"", "lone surrogate in a string"),
            ("\"\\u+041\"", "invalid \\u escape"),
            ("", "EOF while parsing a value"),
        ] {
            assert_eq!(Json::parse(text), Err(reason.to_owned()), "{text:?}");
        }
        let deep = "[".repeat(100) + &"]".repeat(100);
        assert!(Json::parse(&deep).unwrap_err().contains("nested deeper"));
    }

    #[test]
    fn fields_name_their_path_and_refuse_the_unknown() {
        let Json::Object(_) = Json::parse(r#"{"m": {"x": "lots", "y": 1}}"#).unwrap() else { panic!() };
        let mut root = Fields::of("", Json::parse(r#"{"m": {"x": "lots", "y": 1}}"#).unwrap()).unwrap();
        let mut m = root.object("m").unwrap().unwrap();
        assert_eq!(
            m.read("x", |v| unsigned(v, 10)),
            Err(("m.x".to_owned(), "invalid type: string \"lots\", expected a whole number".to_owned()))
        );
        assert_eq!(m.finish(&["x"]), Err(("m.y".to_owned(), "unknown field `y`, expected one of `x`".to_owned())));
        root.finish(&["m"]).unwrap();
    }

    proptest! {
        #[test]
        fn any_text_parses_or_fails_without_panic(text in "\\PC{0,64}") {
            let _ = Json::parse(&text);
        }

        #[test]
        fn numbers_round_trip(n in -1e12f64..1e12) {
            let parsed = match Json::parse(&n.to_string()) {
                Ok(Json::Integer(i)) => i as f64,
                Ok(Json::Number(f)) => f,
                other => panic!("{other:?}"),
            };
            prop_assert_eq!(parsed, n);
        }
    }
}
