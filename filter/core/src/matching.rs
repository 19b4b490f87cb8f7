//! Request matching for rate-limit rules (issue 12): a request's path and
//! host normalized once, and the compiled patterns rules hold.
//!
//! Paths are normalized the way an upstream reads them, so a client cannot
//! escape a `/orders` limit by spelling it `//orders`, `/x/../orders`,
//! `/%6Frders` or `\orders`. Case is kept: `/ORDERS` is another resource to
//! most upstreams, so it does not match `/orders`. Every escape is decoded
//! but `%25`, `%3F` and `%23`, which stay (upper-cased): decoded, they would
//! read as an escape, a query or a fragment the next time, and normalizing
//! would not be idempotent.

use std::borrow::Cow;
use std::fmt;

/// The parts of a request a rule can match on, normalized once per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestView<'a> {
    /// As received (`:method`); rules compare it without regard to case.
    pub method: &'a [u8],
    /// See [`normalize_path`].
    pub path: Cow<'a, [u8]>,
    /// See [`normalize_host`].
    pub host: Cow<'a, [u8]>,
}

/// Why a `:path` has no path a rule could match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    Empty,
    BadEncoding,
    NotAPath,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathError::Empty => "empty path",
            PathError::BadEncoding => "broken %-escape or NUL byte in path",
            PathError::NotAPath => "path neither starts with '/' nor is an http(s) URL",
        })
    }
}

/// `:path` -> the path rules match on: query and fragment dropped, `%XX`
/// decoded (see the module docs for `%25`, `%3F`, `%23`), `\` read as `/`,
/// empty and `.` segments dropped, `..` popping one (never above root), no
/// trailing `/` but for the root. An absolute-form `http(s)://host/p` gives
/// its path. Borrowed (possibly a sub-slice) when nothing else changed.
pub fn normalize_path(raw: &[u8]) -> Result<Cow<'_, [u8]>, PathError> {
    let end = raw.iter().position(|&b| b == b'?' || b == b'#');
    let path = end.and_then(|end| raw.get(..end)).unwrap_or(raw);
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    let path = match path.first() {
        Some(b'/' | b'\\') => path,
        _ => absolute_form_path(path)?,
    };
    if is_clean(path) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode(path)?;
    let mut segments: Vec<&[u8]> = Vec::new();
    for segment in decoded.split(|&b| b == b'/') {
        // `;params` end a segment, as Tomcat and Spring read it: `/orders;x`
        // is `/orders` and `/x/..;/orders` is `/orders` there, so here too.
        let segment = segment.split(|&b| b == b';').next().unwrap_or_default();
        match segment {
            b"" | b"." => {}
            b".." => drop(segments.pop()),
            _ => segments.push(segment),
        }
    }
    let mut out = vec![b'/'];
    out.extend_from_slice(&segments.join(b"/".as_slice()));
    Ok(Cow::Owned(out))
}

/// `http(s)://authority/p` -> `/p` (`/` without a path); rare, so it may
/// allocate.
fn absolute_form_path(uri: &[u8]) -> Result<&[u8], PathError> {
    let lower = uri.to_ascii_lowercase();
    let scheme = [b"http://".as_slice(), b"https://"]
        .into_iter()
        .find(|s| lower.starts_with(s));
    let rest = scheme
        .and_then(|s| uri.get(s.len()..))
        .ok_or(PathError::NotAPath)?;
    match rest
        .iter()
        .position(|&b| b == b'/' || b == b'\\')
        .unwrap_or(rest.len())
    {
        0 => Err(PathError::NotAPath), // no authority
        end => Ok(rest.get(end..).filter(|p| !p.is_empty()).unwrap_or(b"/")),
    }
}

/// Already normalized: starts with `/`, no empty, `.` or `..` segment, no
/// `\`, NUL, `?`, `#` or escape other than `%25`, `%3F`, `%23`.
fn is_clean(path: &[u8]) -> bool {
    let Some(rest) = path.strip_prefix(b"/") else {
        return false;
    };
    rest.is_empty()
        || rest
            .split(|&b| b == b'/')
            .all(|segment| !matches!(segment, b"" | b"." | b"..") && clean_bytes(segment))
}

fn clean_bytes(segment: &[u8]) -> bool {
    let mut bytes = segment.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'\\' | 0 | b'?' | b'#' | b';' => return false,
            b'%' => match (bytes.next(), bytes.next()) {
                (Some(b'2'), Some(b'5' | b'3')) | (Some(b'3'), Some(b'F')) => {}
                _ => return false,
            },
            _ => {}
        }
    }
    true
}

/// Decodes every escape, `\` -> `/`, and re-escapes `%`, `?` and `#`.
fn decode(path: &[u8]) -> Result<Vec<u8>, PathError> {
    let mut out = Vec::with_capacity(path.len());
    let mut bytes = path.iter().copied();
    while let Some(b) = bytes.next() {
        let b = match b {
            b'%' => {
                let (high, low) = (bytes.next().and_then(hex), bytes.next().and_then(hex));
                high.zip(low)
                    .map(|(h, l)| h << 4 | l)
                    .ok_or(PathError::BadEncoding)?
            }
            _ => b,
        };
        match b {
            0 => return Err(PathError::BadEncoding),
            b'\\' => out.push(b'/'),
            b'%' => out.extend_from_slice(b"%25"),
            b'?' => out.extend_from_slice(b"%3F"),
            b'#' => out.extend_from_slice(b"%23"),
            _ => out.push(b),
        }
    }
    Ok(out)
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

/// `:authority` (or `host`) -> lower case, without its `:port` (an IPv6
/// `[::1]:8080` keeps `[::1]`) and one trailing `.` (`example.com.` is the
/// same name).
pub fn normalize_host(raw: &[u8]) -> Cow<'_, [u8]> {
    let host = if raw.starts_with(b"[") {
        let end = raw.iter().position(|&b| b == b']');
        end.and_then(|end| raw.get(..=end)).unwrap_or(raw)
    } else {
        let name = raw.split(|&b| b == b':').next().unwrap_or(raw);
        name.strip_suffix(b".").unwrap_or(name)
    };
    if host.iter().any(u8::is_ascii_uppercase) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// How a rule matches the path (Gateway API semantics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Exact(Vec<u8>),
    Prefix(Vec<u8>),
    Template(Template),
}

impl PathMatch {
    /// Patterns are refused when no normalized path could match them.
    pub fn exact(text: &str) -> Result<PathMatch, String> {
        check_pattern(text, false).map(|p| PathMatch::Exact(p.into()))
    }

    /// A trailing `/` is dropped: `/v1/` is `/v1`.
    pub fn prefix(text: &str) -> Result<PathMatch, String> {
        check_pattern(text, true).map(|p| PathMatch::Prefix(p.into()))
    }

    pub fn template(text: &str) -> Result<PathMatch, String> {
        Template::compile(check_pattern(text, false)?).map(PathMatch::Template)
    }

    /// `path` is normalized. Prefixes match whole segments: `/v1` matches
    /// `/v1` and `/v1/x`, not `/v1x`; `/` matches every path.
    pub fn matches(&self, path: &[u8]) -> bool {
        match self {
            PathMatch::Exact(exact) => path == exact.as_slice(),
            PathMatch::Prefix(prefix) if prefix.as_slice() == b"/" => true,
            PathMatch::Prefix(prefix) => path
                .strip_prefix(prefix.as_slice())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(b"/")),
            PathMatch::Template(template) => template.matches(path),
        }
    }
}

/// The pattern as a normalized path (a prefix may lose its trailing `/`).
fn check_pattern(text: &str, is_prefix: bool) -> Result<&str, String> {
    let why = if text.is_empty() {
        "is empty"
    } else if !text.starts_with('/') {
        "must start with '/'"
    } else if text.contains(['?', '#']) {
        "contains '?' or '#': request paths are matched without query or fragment"
    } else if text.contains(['%', '\\']) {
        "contains '%' or '\\': write paths decoded, with '/'"
    } else if text.contains(';') {
        "contains ';': request paths are matched without ';' parameters"
    } else if text.contains("//") {
        "contains \"//\": request paths have their slashes merged"
    } else if text.len() > 1 && text.ends_with('/') && !is_prefix {
        "ends with '/', which request paths lose"
    } else {
        let body = text.strip_suffix('/').filter(|b| !b.is_empty());
        let body = body.unwrap_or(text);
        if is_clean(body.as_bytes()) {
            return Ok(body);
        }
        "has a '.' or '..' segment, which request paths lose"
    };
    Err(format!("path {text:?} {why}"))
}

/// `/orders/{id}/items/{item}`: literal segments and `{name}` variables of
/// one non-empty segment each; a last `{name...}` takes one or more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// A literal, or `None` for a variable.
    segments: Vec<Option<Vec<u8>>>,
    /// Ends in `{name...}`.
    rest: bool,
}

impl Template {
    /// `text` has passed [`check_pattern`]; this reads its braces.
    fn compile(text: &str) -> Result<Template, String> {
        let (mut segments, mut rest, mut names) = (Vec::new(), false, Vec::new());
        let mut parts = text.trim_start_matches('/').split('/').peekable();
        while let Some(part) = parts.next() {
            let fail = |why: &str| Err(format!("path template {text:?}: {why} in {part:?}"));
            let Some(inner) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) else {
                if part.contains(['{', '}']) {
                    return fail("unbalanced braces, or a variable not a whole segment");
                }
                segments.push(Some(part.as_bytes().to_vec()));
                continue;
            };
            rest = inner.ends_with("...");
            let name = inner.strip_suffix("...").unwrap_or(inner);
            if inner.contains(['{', '}']) {
                return fail("nested or unbalanced braces");
            } else if name.is_empty() {
                return fail("empty variable name");
            } else if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return fail("variable names are [A-Za-z0-9_]");
            } else if names.contains(&name) {
                return fail("repeated variable name");
            } else if rest && parts.peek().is_some() {
                return fail("{name...} must be the last segment");
            }
            names.push(name);
            if !rest {
                segments.push(None);
            }
        }
        if names.is_empty() {
            return Err(format!(
                "path template {text:?} has no {{variable}}: use an exact path"
            ));
        }
        Ok(Template { segments, rest })
    }

    /// `path` is normalized; an empty segment matches nothing.
    fn matches(&self, path: &[u8]) -> bool {
        let Some(path) = path.strip_prefix(b"/") else {
            return false;
        };
        let mut parts = path.split(|&b| b == b'/').peekable();
        let fits = |part: &[u8], literal: &Option<Vec<u8>>| {
            !part.is_empty() && literal.as_ref().is_none_or(|l| l.as_slice() == part)
        };
        self.segments
            .iter()
            .all(|s| parts.next().is_some_and(|part| fits(part, s)))
            && if self.rest {
                parts.peek().is_some() && parts.all(|part| fits(part, &None))
            } else {
                parts.next().is_none()
            }
    }
}

/// A host pattern: `api.example.com`, or `*.example.com` (one or more
/// labels before `.example.com`, never the apex). Compared with a host from
/// [`normalize_host`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostMatch {
    /// The whole host, or for a wildcard the suffix from its first `.`.
    name: Vec<u8>,
    wildcard: bool,
}

impl HostMatch {
    /// Lower-cased, one trailing `.` dropped; no port, `*` only as `*.`.
    pub fn compile(text: &str) -> Result<HostMatch, String> {
        let lower = text.to_ascii_lowercase();
        let name = lower.strip_suffix('.').unwrap_or(&lower);
        let (wildcard, rest) = name.strip_prefix("*.").map_or((false, name), |r| (true, r));
        let ipv6 = |b: u8| b.is_ascii_hexdigit() || b == b':' || b == b'.';
        let why = if let Some(address) = rest.strip_prefix('[') {
            match address.strip_suffix(']') {
                Some(a) if !wildcard && !a.is_empty() && a.bytes().all(ipv6) => {
                    return Ok(HostMatch {
                        name: rest.into(),
                        wildcard,
                    });
                }
                _ => "is not an IPv6 literal without port",
            }
        } else if rest.contains(':') {
            "has a port: rules match hosts without it"
        } else if rest.contains('*') {
            "has a '*' other than a leading \"*.\""
        } else if !rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        {
            "has characters outside [a-z0-9.-]"
        } else if rest.split('.').any(str::is_empty) {
            "is empty or has an empty label"
        } else {
            let name = format!("{}{rest}", if wildcard { "." } else { "" });
            return Ok(HostMatch {
                name: name.into(),
                wildcard,
            });
        };
        Err(format!("host {text:?} {why}"))
    }

    pub fn matches(&self, host: &[u8]) -> bool {
        if self.wildcard {
            host.len() > self.name.len() && host.ends_with(&self.name)
        } else {
            host == self.name.as_slice()
        }
    }
}

/// A configured method, upper-cased (`get` -> `GET`); requests' methods are
/// compared without regard to case by the rules (Django and others upper-case
/// the method, so `post` must meet a `POST` rule).
pub fn compile_method(text: &str) -> Result<Vec<u8>, String> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(format!("method {text:?} is not an HTTP method (letters)"));
    }
    Ok(text.to_ascii_uppercase().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `raw normalized` pairs, `!Error` when refused; then what a client
    /// would try to escape a `/orders` limit.
    const PATHS: &str = r"
        /                      /                 /orders/42             /orders/42
        /a/b/../../..          /                 /a%2fb%5Cc%7e%41       /a/b/c~A
        /a%3fb%23c%25          /a%3Fb%23c%25     /a%253F                /a%253F
        http://h:80/p/../q?x   /q                HTTPS://h?x            /
        http:///p              !NotAPath         http://                !NotAPath
        ftp://h/p              !NotAPath         *                      !NotAPath
        %2Forders              !NotAPath         ?x                     !Empty
        /a%G1                  !BadEncoding      /a%4                   !BadEncoding
        /a%00b                 !BadEncoding

        /orders/               /orders           //orders               /orders
        /./orders              /orders           /x/../orders           /orders
        /../orders             /orders           /%6Frders              /orders
        /orders%2F             /orders           /orders?x              /orders
        /orders#f              /orders           \orders                /orders
        /orders/.              /orders           /%2e%2e/orders         /orders
        /orders/..x            /orders/..x       /ORDERS                /ORDERS
        /orders;x              /orders           /x/..;/orders          /orders
        /orders;a=1/           /orders           /orders%3Bjsessionid=1 /orders
    ";

    #[test]
    fn paths_normalize_as_the_upstream_reads_them() {
        let (prefix, exact) = (PathMatch::prefix("/orders"), PathMatch::exact("/orders"));
        let (prefix, exact) = (prefix.unwrap(), exact.unwrap());
        let words: Vec<&str> = PATHS.split_whitespace().collect();
        for case in words.chunks(2) {
            let got = match normalize_path(case[0].as_bytes()) {
                Ok(path) => String::from_utf8(path.into_owned()).unwrap(),
                Err(error) => format!("!{error:?}"),
            };
            assert_eq!(got, case[1], "{case:?}");
            check_normalized(case[0].as_bytes());
            // No rewrite of /orders escapes a rule on it.
            let limited = prefix.matches(got.as_bytes()) && exact.matches(got.as_bytes());
            assert_eq!(limited, got == "/orders", "{case:?}");
        }
        assert_eq!(normalize_path(b""), Err(PathError::Empty));
        assert!(matches!(
            normalize_path(b"/o/1?x"),
            Ok(Cow::Borrowed(b"/o/1"))
        ));
        // "..x" is a segment under /orders; case is kept, so /ORDERS is not /orders.
        assert!(prefix.matches(b"/orders/..x") && !prefix.matches(b"/ORDERS"));
    }

    #[test]
    fn prefixes_match_whole_segments() {
        let v1 = PathMatch::prefix("/v1/").unwrap();
        assert_eq!(v1, PathMatch::prefix("/v1").unwrap());
        assert!(v1.matches(b"/v1") && v1.matches(b"/v1/x"));
        assert!(!v1.matches(b"/v1x") && !v1.matches(b"/"));
        let root = PathMatch::prefix("/").unwrap();
        assert!(root.matches(b"/") && root.matches(b"/anything/else"));
    }

    #[test]
    fn patterns_no_normalized_path_could_match_are_refused() {
        for text in r"orders /o?x /o#f /o%41 \o /a//b /a/./b /a/.. /. /a//"
            .split_whitespace()
            .chain([""])
        {
            assert!(PathMatch::exact(text).is_err(), "{text:?}");
            assert!(PathMatch::prefix(text).is_err(), "{text:?}");
        }
        assert!(PathMatch::exact("/orders/").is_err());
        assert!(PathMatch::template("/orders/{id}/").is_err());
        assert!(PathMatch::exact("/").unwrap().matches(b"/"));
    }

    #[test]
    fn templates_match_one_segment_per_variable() {
        let one = PathMatch::template("/orders/{id}").unwrap();
        assert!(one.matches(b"/orders/42"));
        for path in "/orders /orders/42/x /orders/ / /items/42".split_whitespace() {
            assert!(!one.matches(path.as_bytes()), "{path:?}");
        }
        let two = PathMatch::template("/orders/{id}/items/{item_2}").unwrap();
        assert!(two.matches(b"/orders/1/items/2") && !two.matches(b"/orders/1/items"));
        let rest = PathMatch::template("/files/{path...}").unwrap();
        assert!(rest.matches(b"/files/a") && rest.matches(b"/files/a/b/c"));
        assert!(!rest.matches(b"/files") && !rest.matches(b"/files/") && !rest.matches(b"/x/a"));
    }

    #[test]
    fn malformed_templates_are_refused() {
        let refused =
            "/orders /orders/{id /orders/id} /orders/{{id}} /orders/{id}.json /{} /{a}/{a}
            /{a-b} /{rest...}/x /{...} /{a......}";
        for text in refused.split_whitespace() {
            assert!(PathMatch::template(text).is_err(), "{text:?}");
        }
        assert!(PathMatch::template("/orders")
            .unwrap_err()
            .contains("exact"));
    }

    #[test]
    fn hosts_lose_case_port_and_trailing_dot() {
        let cases = "API.Example.com:8443 api.example.com  [::1]:80 [::1]  [::1] [::1]
            example.com. example.com  Example.com.:443 example.com";
        let words: Vec<&str> = cases.split_whitespace().collect();
        for pair in words.chunks(2) {
            let host = normalize_host(pair[0].as_bytes());
            assert_eq!(host, pair[1].as_bytes(), "{pair:?}");
        }
        assert!(matches!(
            normalize_host(b"a.com:80"),
            Cow::Borrowed(b"a.com")
        ));
    }

    #[test]
    fn host_patterns_match_exactly_or_below_a_wildcard() {
        let exact = HostMatch::compile("API.example.com.").unwrap();
        assert!(exact.matches(b"api.example.com") && !exact.matches(b"x.api.example.com"));
        let wild = HostMatch::compile("*.Example.com").unwrap();
        assert!(wild.matches(b"a.example.com") && wild.matches(b"a.b.example.com"));
        assert!(!wild.matches(b"example.com") && !wild.matches(b".example.com"));
        assert!(!wild.matches(b"badexample.com"));
        assert!(HostMatch::compile("[::1]")
            .unwrap()
            .matches(&normalize_host(b"[::1]:8080")));
        let refused = "h:80 [::1]:80 * *. a.*.com *x.com h_1 a..b .a [x] []";
        for text in refused.split_whitespace().chain([""]) {
            assert!(HostMatch::compile(text).is_err(), "{text:?}");
        }
    }

    #[test]
    fn methods_are_upper_cased_letters() {
        assert_eq!(compile_method("get").unwrap(), b"GET");
        for text in ["", "GET ", "M-SEARCH", "GÉT"] {
            assert!(compile_method(text).is_err(), "{text:?}");
        }
    }

    /// Normalizing again changes nothing and allocates nothing; the result
    /// has no "//", "." or ".." segment and no trailing '/' but the root.
    fn check_normalized(raw: &[u8]) {
        let Ok(out) = normalize_path(raw) else { return };
        let again = normalize_path(&out).unwrap();
        assert!(
            matches!(again, Cow::Borrowed(_)) && again == out,
            "{raw:?} -> {out:?}"
        );
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with('/') && !text.contains("//"), "{text:?}");
        assert!(text == "/" || !text.ends_with('/'), "{text:?}");
        assert!(!text.split('/').any(|s| s == "." || s == ".."), "{text:?}");
    }

    proptest! {
        #[test]
        fn normalized_paths_are_fixed_points(raw in "[/\\\\.a%2eEfF35?#]{0,24}") {
            check_normalized(raw.as_bytes());
        }

        #[test]
        fn normalized_paths_of_any_bytes_are_fixed_points(raw in proptest::collection::vec(any::<u8>(), 0..32)) {
            check_normalized(&[b"/".as_slice(), &raw].concat());
            check_normalized(&raw);
        }
    }
}
