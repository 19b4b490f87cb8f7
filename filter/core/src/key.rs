//! Finds the API key of a request: in the query string (the tutorial's
//! `?api_key=`) or in a header, reading every configured source.
//!
//! The rules, chosen so that the proxy and the application can never
//! disagree about whose key a request carries:
//! - An empty value (`?api_key=`) counts as absent. Two sources holding
//!   different keys are refused (an app reading `X-Api-Key: real` must not
//!   be fooled by a random `?api_key=` the limiter would count instead);
//!   the same key in both, byte for byte after decoding, is that key.
//! - A key parameter in a `;`-separated run (`?x=1;api_key=k`,
//!   `?api_key=k;x`) is refused: older Python and Django split on `;` too.
//! - A source given twice (`?api_key=a&api_key=b`, or two `x-api-key`
//!   headers) is refused: Django would read the last value, other frameworks
//!   the first, and a limiter that guessed differently could be bypassed.
//! - Query values are form-decoded like Django does (`+` is a space, `%XX`
//!   a byte); a broken escape (`%zz`, `%4`) or a result that is not UTF-8 is
//!   refused instead of being guessed at. Parameter names are compared after
//!   the same decoding, so `api%5Fkey` is `api_key`, as it is for Django.
//! - Header values are taken as sent (Envoy trims the surrounding
//!   whitespace); an optional prefix such as `Api-Key ` is stripped first,
//!   case-insensitively, and a header without that prefix counts as absent.
//! - A key longer than the cap (after decoding) is refused.

use std::borrow::Cow;

use crate::header_map::HeaderMap;

/// Request headers as the key finder reads them: the one value of a name,
/// or an error when the name is given more than once. Implemented on the
/// whole serialized map ([`HeaderMap`]), and in the filter on a lazier view
/// that fetches `:path` alone and the full map only when a header source
/// is actually consulted.
pub trait RequestHeaders<'a> {
    fn single(&self, name: &[u8]) -> Result<Option<&'a [u8]>, KeyErrorKind>;
}

impl<'a> RequestHeaders<'a> for HeaderMap<'a> {
    fn single(&self, name: &[u8]) -> Result<Option<&'a [u8]>, KeyErrorKind> {
        let mut found = None;
        for (header, value) in self.iter() {
            if header == name {
                if found.is_some() {
                    return Err(KeyErrorKind::Repeated);
                }
                found = Some(value);
            }
        }
        Ok(found)
    }
}

/// Where a key may be found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A query parameter of `:path`.
    Query { name: String },
    /// A request header (name in lower case, as Envoy hands them over).
    Header {
        name: String,
        prefix: Option<String>,
    },
}

impl KeySource {
    /// How responses name this source, e.g. `the query parameter 'api_key'`.
    pub fn describe(&self) -> String {
        match self {
            KeySource::Query { name } => format!("the query parameter '{name}'"),
            KeySource::Header { name, prefix: None } => format!("the header '{name}'"),
            KeySource::Header {
                name,
                prefix: Some(prefix),
            } => format!("the header '{name}' (as '{prefix}<key>')"),
        }
    }
}

/// Why the value of one source was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyErrorKind {
    Repeated,
    BadEncoding,
    NotUtf8,
    TooLong,
    /// The query parameter sits in a `;`-separated run, which older Python
    /// and Django split as separate parameters.
    Semicolon,
}

impl KeyErrorKind {
    pub const ALL: [KeyErrorKind; 5] = [
        KeyErrorKind::Repeated,
        KeyErrorKind::BadEncoding,
        KeyErrorKind::NotUtf8,
        KeyErrorKind::TooLong,
        KeyErrorKind::Semicolon,
    ];

    pub fn index(self) -> usize {
        self as usize
    }
}

/// A refused key. Sources are indices into the configured sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyError {
    /// One source's value cannot be used.
    Source { source: usize, kind: KeyErrorKind },
    /// Two sources hold different keys: the application may read either.
    Conflict { first: usize, second: usize },
}

/// Extracts the key. `Ok(None)` means no source held one. Every source is
/// read: two that hold different keys are refused, as the application may
/// read either.
pub fn extract<'a>(
    sources: &[KeySource],
    headers: &impl RequestHeaders<'a>,
    max_len: usize,
) -> Result<Option<Cow<'a, [u8]>>, KeyError> {
    let mut found: Option<(usize, Cow<'a, [u8]>)> = None;
    for (index, source) in sources.iter().enumerate() {
        let key = source_value(source, headers, max_len).map_err(|kind| KeyError::Source {
            source: index,
            kind,
        })?;
        let Some(key) = key else { continue };
        match &found {
            None => found = Some((index, key)),
            Some((first, held)) if *held != key => {
                return Err(KeyError::Conflict {
                    first: *first,
                    second: index,
                })
            }
            Some(_) => {}
        }
    }
    Ok(found.map(|(_, key)| key))
}

/// The usable, non-empty key one source holds, if any.
fn source_value<'a>(
    source: &KeySource,
    headers: &impl RequestHeaders<'a>,
    max_len: usize,
) -> Result<Option<Cow<'a, [u8]>>, KeyErrorKind> {
    let found = match source {
        KeySource::Query { name } => query_value(headers, name.as_bytes())?
            .map(|raw| form_decode(raw, max_len))
            .transpose()?,
        KeySource::Header { name, prefix } => {
            header_value(headers, name.as_bytes(), prefix.as_deref())?.map(Cow::Borrowed)
        }
    };
    let Some(key) = found.filter(|key| !key.is_empty()) else {
        return Ok(None);
    };
    if key.len() > max_len {
        return Err(KeyErrorKind::TooLong);
    }
    if std::str::from_utf8(&key).is_err() {
        return Err(KeyErrorKind::NotUtf8);
    }
    Ok(Some(key))
}

/// The raw (still encoded) value of query parameter `name`, if given once.
fn query_value<'a>(
    headers: &impl RequestHeaders<'a>,
    name: &[u8],
) -> Result<Option<&'a [u8]>, KeyErrorKind> {
    let Some(path) = headers.single(b":path")? else {
        return Ok(None);
    };
    let Some(query_start) = path.iter().position(|b| *b == b'?') else {
        return Ok(None);
    };
    let query = path.get(query_start + 1..).unwrap_or(&[]);
    let query = match query.iter().position(|b| *b == b'#') {
        Some(end) => query.get(..end).unwrap_or(&[]),
        None => query,
    };
    let mut found = None;
    for param in query.split(|b| *b == b'&') {
        if param.contains(&b';') {
            // Older Python and Django split here too, and would read a
            // different key (or none): whichever way, refuse.
            if param.split(|b| *b == b';').any(|part| names(part, name)) {
                return Err(KeyErrorKind::Semicolon);
            }
            continue;
        }
        if names(param, name) {
            if found.is_some() {
                return Err(KeyErrorKind::Repeated);
            }
            found = Some(split_param(param).1);
        }
    }
    Ok(found)
}

/// `name=value` (or a bare `name`) split at the first `=`.
fn split_param(param: &[u8]) -> (&[u8], &[u8]) {
    match param.iter().position(|b| *b == b'=') {
        Some(eq) => (
            param.get(..eq).unwrap_or(&[]),
            param.get(eq + 1..).unwrap_or(&[]),
        ),
        None => (param, &[][..]),
    }
}

/// Whether a raw query parameter's name decodes to `name`.
fn names(param: &[u8], name: &[u8]) -> bool {
    lenient_decode(split_param(param).0).eq(name.iter().copied())
}

fn header_value<'a>(
    headers: &impl RequestHeaders<'a>,
    name: &[u8],
    prefix: Option<&str>,
) -> Result<Option<&'a [u8]>, KeyErrorKind> {
    let Some(value) = headers.single(name)? else {
        return Ok(None);
    };
    let Some(prefix) = prefix else {
        return Ok(Some(value));
    };
    let prefix = prefix.as_bytes();
    match value.get(..prefix.len()) {
        Some(head) if head.eq_ignore_ascii_case(prefix) => Ok(Some(
            value.get(prefix.len()..).unwrap_or(&[]).trim_ascii_start(),
        )),
        _ => Ok(None),
    }
}

/// Why a configured query parameter name could never match a request, if
/// it could not. The name is given decoded, as the application reads it.
pub fn check_query_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if let Some(c) = name.chars().find(|c| "=&#;".contains(*c)) {
        return Err(format!(
            "\"{name}\" cannot name a query parameter: '{c}' separates or ends parameters"
        ));
    }
    if !lenient_decode(name.as_bytes()).eq(name.bytes()) {
        return Err(format!(
            "\"{name}\" is written encoded; give the name decoded, as the application reads it (\"api_key\", not \"api%5Fkey\"; a space, not '+')"
        ));
    }
    Ok(())
}

/// Strict form decoding for values: borrows when there is nothing to decode,
/// stops early once the result is longer than `max_len`.
fn form_decode(raw: &[u8], max_len: usize) -> Result<Cow<'_, [u8]>, KeyErrorKind> {
    if !raw.iter().any(|b| *b == b'%' || *b == b'+') {
        return Ok(Cow::Borrowed(raw));
    }
    let mut out = Vec::with_capacity(raw.len().min(max_len.saturating_add(1)));
    let mut bytes = raw.iter();
    while let Some(&b) = bytes.next() {
        let decoded = match b {
            b'+' => b' ',
            b'%' => {
                let hi = bytes.next().and_then(|h| hex_value(*h));
                let lo = bytes.next().and_then(|l| hex_value(*l));
                match (hi, lo) {
                    (Some(hi), Some(lo)) => hi << 4 | lo,
                    _ => return Err(KeyErrorKind::BadEncoding),
                }
            }
            other => other,
        };
        if out.len() == max_len {
            return Err(KeyErrorKind::TooLong);
        }
        out.push(decoded);
    }
    Ok(Cow::Owned(out))
}

/// Python's `unquote_plus`, which Django applies to parameter names: broken
/// escapes stay as they are. Allocation-free, for comparisons.
fn lenient_decode(raw: &[u8]) -> impl Iterator<Item = u8> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        let b = *raw.get(at)?;
        at += 1;
        match b {
            b'+' => Some(b' '),
            b'%' => match (
                raw.get(at).and_then(|h| hex_value(*h)),
                raw.get(at + 1).and_then(|l| hex_value(*l)),
            ) {
                (Some(hi), Some(lo)) => {
                    at += 2;
                    Some(hi << 4 | lo)
                }
                _ => Some(b'%'),
            },
            other => Some(other),
        }
    })
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Headers;
    use proptest::prelude::*;

    fn sources() -> Vec<KeySource> {
        vec![
            KeySource::Query {
                name: "api_key".into(),
            },
            KeySource::Header {
                name: "x-api-key".into(),
                prefix: None,
            },
        ]
    }

    fn run(pairs: &[(&str, &[u8])]) -> Result<Option<Vec<u8>>, KeyError> {
        run_with(&sources(), pairs, 256)
    }

    fn run_with(
        sources: &[KeySource],
        pairs: &[(&str, &[u8])],
        max: usize,
    ) -> Result<Option<Vec<u8>>, KeyError> {
        let headers = Headers::of(pairs);
        extract(sources, &headers.map(), max).map(|k| k.map(|k| k.into_owned()))
    }

    fn path(p: &str) -> (&'static str, &[u8]) {
        (":path", p.as_bytes())
    }

    fn err(source: usize, kind: KeyErrorKind) -> Result<Option<Vec<u8>>, KeyError> {
        Err(KeyError::Source { source, kind })
    }

    #[test]
    fn tutorial_query_parameter_is_found() {
        assert_eq!(run(&[path("/?api_key=1234")]), Ok(Some(b"1234".to_vec())));
        assert_eq!(
            run(&[path("/v1/items?page=2&api_key=abc&x=y")]),
            Ok(Some(b"abc".to_vec()))
        );
    }

    #[test]
    fn header_is_read_when_the_query_has_no_key() {
        assert_eq!(
            run(&[path("/"), ("x-api-key", b"from-header")]),
            Ok(Some(b"from-header".to_vec()))
        );
    }

    fn conflict(first: usize, second: usize) -> Result<Option<Vec<u8>>, KeyError> {
        Err(KeyError::Conflict { first, second })
    }

    #[test]
    fn different_keys_in_two_sources_are_refused_naming_both() {
        // The bypass: the app reads the header, a random query key
        // would be counted instead.
        assert_eq!(
            run(&[path("/?api_key=random"), ("x-api-key", b"real")]),
            conflict(0, 1)
        );
        // Decoding happens before comparing: "a+b" is "a b", not "a+b".
        assert_eq!(
            run(&[path("/?api_key=a+b"), ("x-api-key", b"a+b")]),
            conflict(0, 1)
        );
        let three = vec![
            KeySource::Query { name: "k".into() },
            KeySource::Header {
                name: "x-a".into(),
                prefix: None,
            },
            KeySource::Header {
                name: "x-b".into(),
                prefix: None,
            },
        ];
        assert_eq!(
            run_with(&three, &[path("/?k=1"), ("x-a", b"1"), ("x-b", b"2")], 256),
            conflict(0, 2)
        );
        assert_eq!(
            run_with(&three, &[path("/"), ("x-a", b"1"), ("x-b", b"2")], 256),
            conflict(1, 2)
        );
    }

    #[test]
    fn the_same_key_in_two_sources_is_that_key() {
        assert_eq!(
            run(&[path("/?api_key=k"), ("x-api-key", b"k")]),
            Ok(Some(b"k".to_vec()))
        );
        assert_eq!(
            run(&[path("/?api_key=a%20b+c"), ("x-api-key", b"a b c")]),
            Ok(Some(b"a b c".to_vec()))
        );
    }

    #[test]
    fn a_bad_value_in_any_source_is_refused_even_after_a_good_one() {
        assert_eq!(
            run(&[path("/?api_key=ok"), ("x-api-key", b"\xff")]),
            err(1, KeyErrorKind::NotUtf8)
        );
        assert_eq!(
            run(&[
                path("/?api_key=ok"),
                ("x-api-key", b"ok"),
                ("x-api-key", b"ok")
            ]),
            err(1, KeyErrorKind::Repeated)
        );
    }

    #[test]
    fn a_header_without_its_prefix_does_not_count_as_a_second_key() {
        let sources = vec![
            KeySource::Query {
                name: "api_key".into(),
            },
            KeySource::Header {
                name: "authorization".into(),
                prefix: Some("Api-Key ".into()),
            },
        ];
        let got = |p: &str, v: &[u8]| run_with(&sources, &[path(p), ("authorization", v)], 256);
        assert_eq!(got("/?api_key=q", b"Bearer t"), Ok(Some(b"q".to_vec())));
        assert_eq!(got("/?api_key=q", b"Api-Key h"), conflict(0, 1));
        assert_eq!(got("/?api_key=q", b"api-key q"), Ok(Some(b"q".to_vec())));
    }

    #[test]
    fn a_key_parameter_in_a_semicolon_run_is_refused_as_ambiguous() {
        for bad in [
            "/?x=1;api_key=k",
            "/?api_key=a;api_key=b",
            "/?a=b&c=d;api_key=k",
            "/?api_key=k;x=1",
            "/?api_key=k;",
            "/?;api_key=k",
            "/?x;api_key=k",
            "/?x=1;api%5Fkey=k",
            "/?x=1;api%5fkey=k&y=2",
            "/?api_key=a&x=1;api_key=b",
            "/?x=1;api+key=k&api_key=k",
        ] {
            let sources = vec![KeySource::Query {
                name: if bad.contains("api+key") {
                    "api key".into()
                } else {
                    "api_key".into()
                },
            }];
            assert_eq!(
                run_with(&sources, &[path(bad)], 256),
                err(0, KeyErrorKind::Semicolon),
                "{bad}"
            );
        }
        // A ';' elsewhere, or encoded, splits nothing that names the key.
        assert_eq!(run(&[path("/?api_key=k&x=1;y=2")]), Ok(Some(b"k".to_vec())));
        assert_eq!(run(&[path("/?api_key=a%3Bb")]), Ok(Some(b"a;b".to_vec())));
        assert_eq!(run(&[path("/?x=1%3Bapi_key=k")]), Ok(None));
        assert_eq!(run(&[path("/?x=a;b&api_key=k")]), Ok(Some(b"k".to_vec())));
    }

    #[test]
    fn missing_and_empty_keys_are_absent() {
        assert_eq!(run(&[path("/")]), Ok(None));
        assert_eq!(run(&[path("/?other=1")]), Ok(None));
        assert_eq!(run(&[path("/?api_key=")]), Ok(None));
        assert_eq!(run(&[path("/?api_key")]), Ok(None));
        assert_eq!(run(&[path("/?api_key=&x=1"), ("x-api-key", b"")]), Ok(None));
        assert_eq!(
            run(&[path("/?api_key="), ("x-api-key", b"h")]),
            Ok(Some(b"h".to_vec()))
        );
        assert_eq!(run(&[]), Ok(None));
    }

    #[test]
    fn query_values_are_form_decoded() {
        assert_eq!(
            run(&[path("/?api_key=a%2Fb+c")]),
            Ok(Some(b"a/b c".to_vec()))
        );
        assert_eq!(
            run(&[path("/?api_key=%E2%82%AC")]),
            Ok(Some("€".as_bytes().to_vec()))
        );
        assert_eq!(run(&[path("/?api%5Fkey=x")]), Ok(Some(b"x".to_vec())));
        assert_eq!(run(&[path("/?api_key=k#frag")]), Ok(Some(b"k".to_vec())));
        assert_eq!(run(&[path("/?api_key=a=b")]), Ok(Some(b"a=b".to_vec())));
    }

    #[test]
    fn repeated_sources_are_refused() {
        assert_eq!(
            run(&[path("/?api_key=a&api_key=b")]),
            err(0, KeyErrorKind::Repeated)
        );
        assert_eq!(
            run(&[path("/?api_key=a&api%5fkey=a")]),
            err(0, KeyErrorKind::Repeated)
        );
        assert_eq!(
            run(&[path("/"), ("x-api-key", b"a"), ("x-api-key", b"b")]),
            err(1, KeyErrorKind::Repeated)
        );
        // Repeated even when the values agree, and whatever the spelling.
        assert_eq!(
            run(&[path("/?api_key=k&api_key=k")]),
            err(0, KeyErrorKind::Repeated)
        );
        assert_eq!(
            run(&[path("/?api+key=k&api%20key=k")]).ok(),
            Some(None),
            "another name entirely"
        );
        assert_eq!(
            run(&[path("/?api_%6Bey=a&a%70i_key=b"), ("x-api-key", b"a")]),
            err(0, KeyErrorKind::Repeated)
        );
    }

    #[test]
    fn undecodable_keys_are_refused() {
        for bad in [
            "/?api_key=%zz",
            "/?api_key=%4",
            "/?api_key=abc%",
            "/?api_key=%G0",
        ] {
            assert_eq!(
                run(&[path(bad)]),
                err(0, KeyErrorKind::BadEncoding),
                "{bad}"
            );
        }
        assert_eq!(run(&[path("/?api_key=%FF")]), err(0, KeyErrorKind::NotUtf8));
        assert_eq!(
            run(&[path("/"), ("x-api-key", b"\xff\xfe")]),
            err(1, KeyErrorKind::NotUtf8)
        );
        // A broken escape in a *name* is kept literally, as Django does.
        assert_eq!(run(&[path("/?api_key%zz=1")]), Ok(None));
    }

    #[test]
    fn keys_over_the_cap_are_refused_after_decoding() {
        let ok = format!("/?api_key={}", "a".repeat(256));
        assert_eq!(run(&[path(&ok)]).unwrap().unwrap().len(), 256);
        let long = format!("/?api_key={}", "a".repeat(257));
        assert_eq!(run(&[path(&long)]), err(0, KeyErrorKind::TooLong));
        // 256 escaped bytes decode to 256 bytes: allowed.
        let escaped = format!("/?api_key={}", "%41".repeat(256));
        assert_eq!(run(&[path(&escaped)]).unwrap().unwrap().len(), 256);
        let escaped_long = format!("/?api_key={}", "%41".repeat(257));
        assert_eq!(run(&[path(&escaped_long)]), err(0, KeyErrorKind::TooLong));
        let header = vec![b'h'; 300];
        assert_eq!(
            run(&[path("/"), ("x-api-key", &header)]),
            err(1, KeyErrorKind::TooLong)
        );
    }

    #[test]
    fn header_prefix_is_stripped_case_insensitively() {
        let sources = vec![KeySource::Header {
            name: "authorization".into(),
            prefix: Some("Api-Key ".into()),
        }];
        let got = |v: &[u8]| run_with(&sources, &[("authorization", v)], 256);
        assert_eq!(got(b"Api-Key abc"), Ok(Some(b"abc".to_vec())));
        assert_eq!(got(b"api-key   abc"), Ok(Some(b"abc".to_vec())));
        assert_eq!(got(b"Bearer abc"), Ok(None));
        assert_eq!(got(b"Api-Key "), Ok(None));
    }

    #[test]
    fn descriptions_name_the_source() {
        assert_eq!(sources()[0].describe(), "the query parameter 'api_key'");
        assert_eq!(sources()[1].describe(), "the header 'x-api-key'");
    }

    proptest! {
        #[test]
        fn arbitrary_paths_and_headers_never_panic(
            p in prop::collection::vec(any::<u8>(), 0..80),
            h in prop::collection::vec(any::<u8>(), 0..40),
            max in 0usize..20,
        ) {
            let headers = Headers::of(&[(":path", &p), ("x-api-key", &h)]);
            if let Ok(Some(key)) = extract(&sources(), &headers.map(), max) {
                prop_assert!(!key.is_empty() && key.len() <= max);
                prop_assert!(std::str::from_utf8(&key).is_ok());
            }
        }

        #[test]
        fn a_key_found_is_the_key_of_every_source_that_holds_one(
            query in "[a-c]{0,2}",
            header in "[a-c]{0,2}",
        ) {
            let p = format!("/?api_key={query}");
            match run(&[path(&p), ("x-api-key", header.as_bytes())]) {
                Ok(Some(key)) => {
                    for held in [&query, &header] {
                        prop_assert!(held.is_empty() || held.as_bytes() == key.as_slice());
                    }
                }
                Ok(None) => prop_assert!(query.is_empty() && header.is_empty()),
                Err(e) => {
                    prop_assert_eq!(e, KeyError::Conflict { first: 0, second: 1 });
                    prop_assert!(!query.is_empty() && !header.is_empty() && query != header);
                }
            }
        }

        #[test]
        fn encoded_keys_round_trip(key in "[ -~]{1,40}") {
            let mut encoded = String::new();
            for b in key.bytes() {
                if b.is_ascii_alphanumeric() { encoded.push(b as char) } else { encoded.push_str(&format!("%{b:02X}")) }
            }
            let p = format!("/?api_key={encoded}");
            prop_assert_eq!(run(&[path(&p)]), Ok(Some(key.into_bytes())));
        }
    }
}
