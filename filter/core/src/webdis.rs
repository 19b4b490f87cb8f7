//! The global store's transport: Redis through webdis, calls of the
//! filter's Redis function library (`gcra.lua`), which `envoy/redis-start.sh`
//! loads before Redis takes clients, so there is no fallback: a Redis that
//! lacks it answers an error, a failure like any other. What one call
//! carries (a batch of decisions) is [`crate::batch::wire`]; this module
//! holds what every call shares: Redis key names, URL encoding, and how an
//! answer is classified. webdis splits the path on `/` and then
//! percent-decodes each argument, treats a `.ext` on the last argument as
//! an output format, `+` as a space and a leading run of digits as a
//! database: so every argument byte outside `[A-Za-z0-9_~-]` is
//! percent-encoded, and the Redis key is a hash of the API key, never the
//! key itself. No API key reaches Redis, a URL or a log.
//!
//! Replies are classified, because a webdis call fails in several ways that
//! an operator must tell apart: no answer at all (transport), Envoy's 504
//! (timeout), another status (503 refused, 403 the webdis ACL), a 200 whose
//! body is a Redis error, and a body that does not parse.

use std::fmt::Write;

use sha2::{Digest, Sha256};

use crate::plugin_name;

/// The function library, the same algorithm as [`crate::gcra`].
pub const LIBRARY: &str = include_str!("gcra.lua");

/// The default key prefix: `apikey_ratelimit:<plugin>:`, so two plugins
/// never share state by accident (one `key_prefix` set in both shares it).
/// `<plugin>` is the plugin's stable name ([`plugin_name::stable`]), each
/// byte outside `[A-Za-z0-9-_.]` written as `%XX` (unambiguous: `%` is not
/// otherwise kept).
pub fn default_key_prefix(plugin_name: &str) -> String {
    let name = plugin_name::stable(plugin_name);
    let mut out = String::with_capacity(18 + name.len() + 1);
    out.push_str("apikey_ratelimit:");
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out.push(':');
    out
}

/// The Redis key of an API key: the prefix and the hex SHA-256 of the key,
/// or its HMAC-SHA256 under `secret` when one is configured.
pub fn redis_key(prefix: &str, secret: Option<&[u8]>, key: &[u8]) -> String {
    let digest: [u8; 32] = match secret {
        None => Sha256::digest(key).into(),
        Some(secret) => hmac_sha256(secret, key),
    };
    digest_key(prefix, &digest)
}

/// The Redis key of the API key whose SHA-256 (or, with a secret, HMAC) is
/// `digest`: the admin API's `sha256:` keys reach their state through it.
pub fn digest_key(prefix: &str, digest: &[u8; 32]) -> String {
    let mut out = String::with_capacity(prefix.len() + 64);
    out.push_str(prefix);
    for b in digest {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// HMAC-SHA256 (RFC 2104), so that a Redis dump cannot be checked against
/// guessed API keys without the secret.
fn hmac_sha256(secret: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut key = [0u8; BLOCK];
    if secret.len() > BLOCK {
        let digest: [u8; 32] = Sha256::digest(secret).into();
        for (k, d) in key.iter_mut().zip(digest) {
            *k = d;
        }
    } else {
        for (k, s) in key.iter_mut().zip(secret) {
            *k = *s;
        }
    }
    let pad = |byte: u8| key.map(|k| k ^ byte);
    let inner: [u8; 32] = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize()
        .into();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// Percent-encodes every byte outside `[A-Za-z0-9_~-]`.
pub fn encode_into(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in bytes {
        if kept_plain(b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(
                HEX.get(usize::from(b >> 4)).copied().unwrap_or(b'0'),
            ));
            out.push(char::from(
                HEX.get(usize::from(b & 15)).copied().unwrap_or(b'0'),
            ));
        }
    }
}

/// The bytes [`encode_into`] writes for `bytes`.
pub fn encoded_len(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .map(|&b| if kept_plain(b) { 1 } else { 3 })
        .sum()
}

/// A byte a URL argument carries as itself: webdis reads none of these
/// specially.
fn kept_plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'~' || b == b'-'
}

/// Why a call gave no decision. Each class has its own metric and its own
/// log rate limit; this is the one list of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// Envoy refused to make the call (unknown cluster, bad arguments).
    Dispatch,
    /// No response at all: a reset or a closed connection.
    Transport,
    /// Envoy's 504: no answer within the timeout.
    Timeout,
    /// Any other non-200 status: 503 (connection refused), 403 (the webdis
    /// ACL), ...
    Status,
    /// A 200 whose body is a Redis error.
    Redis,
    /// A reply that does not parse as the function's answer.
    Parse,
}

impl FailureClass {
    /// Every class, in declaration order (see [`FailureClass::index`]).
    pub const ALL: [FailureClass; 6] = [
        FailureClass::Dispatch,
        FailureClass::Transport,
        FailureClass::Timeout,
        FailureClass::Status,
        FailureClass::Redis,
        FailureClass::Parse,
    ];

    /// The class's name in metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            FailureClass::Dispatch => "dispatch",
            FailureClass::Transport => "transport",
            FailureClass::Timeout => "timeout",
            FailureClass::Status => "status",
            FailureClass::Redis => "redis",
            FailureClass::Parse => "parse",
        }
    }

    /// The class's position in [`FailureClass::ALL`], for per-class tables.
    pub const fn index(self) -> usize {
        self as usize
    }
}

/// A failed call: its class, whether retrying later may help, and a
/// description for the log (never containing an API key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendError {
    pub class: FailureClass,
    pub transient: bool,
    pub detail: String,
}

impl BackendError {
    pub fn new(class: FailureClass, transient: bool, detail: impl Into<String>) -> BackendError {
        BackendError {
            class,
            transient,
            detail: detail.into(),
        }
    }

    /// Envoy refused the call outright (`proxy_http_call` failed).
    pub fn dispatch(detail: impl Into<String>) -> BackendError {
        BackendError::new(FailureClass::Dispatch, false, detail)
    }
}

/// The integers a function answered, or why there are none: `status` is
/// `None` when the call came back with no headers at all.
pub fn fcall_integers(status: Option<u32>, body: &[u8]) -> Result<Vec<u64>, BackendError> {
    match status {
        None => {
            return Err(BackendError::new(
                FailureClass::Transport,
                true,
                "no response from webdis (connection reset or closed)",
            ))
        }
        Some(200) => {}
        Some(504) => {
            return Err(BackendError::new(
                FailureClass::Timeout,
                true,
                "webdis did not answer within the timeout (504)",
            ))
        }
        Some(code) => {
            let why = match code {
                403 => " (the webdis ACL refused the command)",
                503 => " (webdis unreachable: connection refused or no healthy host)",
                _ => "",
            };
            return Err(BackendError::new(
                FailureClass::Status,
                code != 403,
                format!("webdis answered {code}{why}"),
            ));
        }
    }
    let value: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return Err(parse_error(format!("the body is not JSON: {e}"))),
    };
    // webdis wraps the answer in an object keyed by the command name.
    let Some(answer) = value.as_object().and_then(|o| o.get("FCALL")) else {
        return Err(parse_error("the body has no FCALL member"));
    };
    let Some(items) = answer.as_array() else {
        return Err(parse_error("the function's answer is not an array"));
    };
    // A Redis error comes back as [false, "ERR ..."]; "ERR Function not
    // found" (a Redis not started by redis-start.sh) is one of them.
    if let (Some(serde_json::Value::Bool(false)), Some(message)) = (items.first(), items.get(1)) {
        let message = message.as_str().unwrap_or("(no message)");
        let transient = ["LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN"]
            .iter()
            .any(|p| message.starts_with(p));
        return Err(BackendError::new(
            FailureClass::Redis,
            transient,
            format!("Redis error: {}", for_log(message, 200)),
        ));
    }
    let numbers: Option<Vec<u64>> = items.iter().map(serde_json::Value::as_u64).collect();
    numbers.ok_or_else(|| parse_error("the function's answer holds something other than integers"))
}

/// A reply that does not parse as the function's answer.
pub fn parse_error(detail: impl Into<String>) -> BackendError {
    BackendError::new(FailureClass::Parse, false, detail)
}

/// About `max` bytes of `text` for the log, on one line: control and
/// line-breaking characters are escaped (`\n`, `\u{0}`).
fn for_log(text: &str, max: usize) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if out.len() >= max {
            break;
        }
        if c.is_control() || (c.is_whitespace() && c != ' ') {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_library_registers_the_functions_filters_call() {
        // FUNCTION LOAD wants the shebang on the first line; the library's
        // name is what redis-start.sh checks it loaded.
        assert!(LIBRARY.starts_with("#!lua name=apikey_ratelimit\n"));
        let batch = crate::batch::wire::FUNCTION;
        assert!(LIBRARY.contains(&format!("redis.register_function('{batch}', batch)")));
        let batch2 = crate::batch::wire_plans::FUNCTION;
        assert!(LIBRARY.contains(&format!("redis.register_function('{batch2}', batch2)")));
        // The one-request form of earlier filters and the health checks.
        assert!(LIBRARY.contains("redis.register_function('apikey_ratelimit_gcra', gcra)"));
    }

    #[test]
    fn default_prefixes_name_the_plugin() {
        assert_eq!(default_key_prefix("api"), "apikey_ratelimit:api:");
        // Istio 1.30's names: the `~...` suffix is dropped.
        assert_eq!(
            default_key_prefix("team-b.other~istio-translated-wasmplugin"),
            "apikey_ratelimit:team-b.other:"
        );
        // Anything else is encoded, so distinct names stay distinct.
        assert_eq!(
            default_key_prefix("a b/c:d_e%"),
            "apikey_ratelimit:a%20b%2Fc%3Ad_e%25:"
        );
        assert_ne!(default_key_prefix("a b"), default_key_prefix("ab"));
        // No name: the glue's default, as for metrics and shared data.
        assert_eq!(default_key_prefix(""), "apikey_ratelimit:apikey_ratelimit:");
    }

    #[test]
    fn redis_keys_are_hashes_never_the_key() {
        // sha256("1234")
        assert_eq!(
            redis_key("rl:", None, b"1234"),
            "rl:03ac674216f3e15c761ee1a5e255f067953623c8b388b4459e13f978d7c846f4"
        );
        assert_eq!(
            digest_key("rl:", &Sha256::digest(b"1234").into()),
            redis_key("rl:", None, b"1234")
        );
        // RFC 4231 test case 2: HMAC-SHA256("Jefe", "what do ya want for nothing?")
        assert_eq!(
            redis_key("", Some(b"Jefe"), b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // RFC 4231 test case 6: a key longer than the block is hashed first.
        assert_eq!(
            redis_key(
                "",
                Some(&[0xaa; 131]),
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            ),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn every_argument_byte_outside_the_safe_set_is_encoded() {
        let mut out = String::new();
        encode_into(&mut out, b"a/b.json+1 %\r\n\xff~_-Z9");
        assert_eq!(out, "a%2Fb%2Ejson%2B1%20%25%0D%0A%FF~_-Z9");
    }

    #[test]
    fn answers_are_integers_or_classified_failures() {
        assert_eq!(
            fcall_integers(Some(200), br#"{"FCALL":[1,0,1764000000000000]}"#),
            Ok(vec![1, 0, 1_764_000_000_000_000])
        );
        let class = |status, body: &[u8]| match fcall_integers(status, body) {
            Err(e) => (e.class, e.transient),
            other => panic!("{other:?}"),
        };
        assert_eq!(class(None, b""), (FailureClass::Transport, true));
        assert_eq!(
            class(Some(504), b"upstream request timeout"),
            (FailureClass::Timeout, true)
        );
        assert_eq!(class(Some(503), b""), (FailureClass::Status, true));
        assert_eq!(class(Some(403), b""), (FailureClass::Status, false));
        // A Redis without the library: an error, under the failure mode.
        assert_eq!(
            class(Some(200), br#"{"FCALL":[false,"ERR Function not found"]}"#),
            (FailureClass::Redis, false)
        );
        assert_eq!(
            class(
                Some(200),
                br#"{"FCALL":[false,"LOADING Redis is loading"]}"#
            ),
            (FailureClass::Redis, true)
        );
        for bad in [
            &b"not json"[..],
            br#"[]"#,
            br#"{"GET":[1]}"#,
            br#"{"EVALSHA":[1,0,5,0]}"#,
            br#"{"FCALL":"x"}"#,
            br#"{"FCALL":[1,0,5,-1]}"#,
            br#"{"FCALL":[1,0,5,null]}"#,
            br#"{"FCALL":[1.5]}"#,
        ] {
            assert_eq!(
                class(Some(200), bad),
                (FailureClass::Parse, false),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn failure_classes_are_listed_once_with_distinct_names() {
        for (i, class) in FailureClass::ALL.iter().enumerate() {
            assert_eq!(class.index(), i);
        }
        let names: std::collections::HashSet<_> =
            FailureClass::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(names.len(), FailureClass::ALL.len());
    }

    #[test]
    fn redis_error_messages_are_logged_on_one_line() {
        // Found by the webdis_reply fuzz target: the message went to the log verbatim.
        let body = br#"{"FCALL":[false,"ERR a\nforged log line\r\u0000"]}"#;
        let Err(error) = fcall_integers(Some(200), body) else {
            panic!()
        };
        assert_eq!(error.detail, r"Redis error: ERR a\nforged log line\r\u{0}");
    }
}
