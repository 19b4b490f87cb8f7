//! Finds the API key of a request: in the query string (the tutorial's
//! `?api_key=`) or in a header, trying the configured sources in order.
//!
//! The rules, chosen so that the proxy and the application can never
//! disagree about whose key a request carries:
//! - The first source holding a non-empty value wins; an empty value
//!   (`?api_key=`) counts as absent and the next source is tried.
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

/// Extracts the key. `Ok(None)` means no source held one.
pub fn extract<'a>(
    sources: &[KeySource],
    headers: &impl RequestHeaders<'a>,
    max_len: usize,
) -> Result<Option<Cow<'a, [u8]>>, KeyError> {
    for (index, source) in sources.iter().enumerate() {
        let fail = |kind| KeyError::Source {
            source: index,
            kind,
        };
        let found = match source {
            KeySource::Query { name } => query_value(headers, name.as_bytes())
                .map_err(fail)?
                .map(|raw| form_decode(raw, max_len).map_err(fail))
                .transpose()?,
            KeySource::Header { name, prefix } => {
                header_value(headers, name.as_bytes(), prefix.as_deref())
                    .map_err(fail)?
                    .map(Cow::Borrowed)
            }
        };
        let Some(key) = found else { continue };
        if key.is_empty() {
            continue;
        }
        if key.len() > max_len {
            return Err(fail(KeyErrorKind::TooLong));
        }
        if std::str::from_utf8(&key).is_err() {
            return Err(fail(KeyErrorKind::NotUtf8));
        }
        return Ok(Some(key));
    }
    Ok(None)
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
        let (param_name, value) = match param.iter().position(|b| *b == b'=') {
            Some(eq) => (
                param.get(..eq).unwrap_or(&[]),
                param.get(eq + 1..).unwrap_or(&[]),
            ),
            None => (param, &[][..]),
        };
        if lenient_decode(param_name).eq(name.iter().copied()) {
            if found.is_some() {
                return Err(KeyErrorKind::Repeated);
            }
            found = Some(value);
        }
    }
    Ok(found)
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
    use crate::header_map::serialize;
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
        let pairs: Vec<(&[u8], &[u8])> = pairs.iter().map(|(n, v)| (n.as_bytes(), *v)).collect();
        let bytes = serialize(&pairs);
        let map = HeaderMap::parse(&bytes).unwrap();
        extract(sources, &map, max).map(|k| k.map(|k| k.into_owned()))
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
    fn header_is_the_fallback_and_query_wins_over_it() {
        assert_eq!(
            run(&[path("/"), ("x-api-key", b"from-header")]),
            Ok(Some(b"from-header".to_vec()))
        );
        assert_eq!(
            run(&[path("/?api_key=q"), ("x-api-key", b"h")]),
            Ok(Some(b"q".to_vec()))
        );
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
            let pairs: Vec<(&[u8], &[u8])> = vec![(b":path", &p), (b"x-api-key", &h)];
            let bytes = serialize(&pairs);
            let map = HeaderMap::parse(&bytes).unwrap();
            if let Ok(Some(key)) = extract(&sources(), &map, max) {
                prop_assert!(!key.is_empty() && key.len() <= max);
                prop_assert!(std::str::from_utf8(&key).is_ok());
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
