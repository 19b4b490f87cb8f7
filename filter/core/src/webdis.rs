//! The global store's wire format: Redis through webdis, one Lua script call
//! per decision.
//!
//! A decision is `GET /EVALSHA/<sha1>/1/<key>/<n>/<T1>/<C1>/...`, falling
//! back to `EVAL` with the script text when Redis answers `NOSCRIPT` (after
//! a restart or a flush). webdis splits the path on `/` and then
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

use crate::gcra::{Limit, MAX_LIMITS};

/// The script, the same algorithm as [`crate::gcra`].
pub const SCRIPT: &str = include_str!("gcra.lua");

/// SHA-1 of [`SCRIPT`], as Redis names it (checked by a test).
pub const SCRIPT_SHA1: &str = "483a472f5b328de733b540ecaccfbf26ff247106";

/// Which command a call uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    EvalSha,
    Eval,
}

/// The Redis key of an API key: the prefix and the hex SHA-256 of the key,
/// or its HMAC-SHA256 under `secret` when one is configured.
pub fn redis_key(prefix: &str, secret: Option<&[u8]>, key: &[u8]) -> String {
    let digest: [u8; 32] = match secret {
        None => Sha256::digest(key).into(),
        Some(secret) => hmac_sha256(secret, key),
    };
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

/// The `:path` of a decision call for `redis_key` under `limits`.
pub fn request_path(command: Command, redis_key: &str, limits: &[Limit]) -> String {
    let mut path = String::with_capacity(96 + redis_key.len());
    match command {
        Command::EvalSha => {
            path.push_str("/EVALSHA/");
            path.push_str(SCRIPT_SHA1);
        }
        Command::Eval => {
            path.push_str("/EVAL/");
            encode_into(&mut path, SCRIPT.as_bytes());
        }
    }
    path.push_str("/1/");
    encode_into(&mut path, redis_key.as_bytes());
    let _ = write!(path, "/{}", limits.len());
    for limit in limits {
        let interval = limit.interval_nanos / 1_000;
        let capacity = limit.capacity_nanos / 1_000;
        let _ = write!(path, "/{interval}/{capacity}");
    }
    path
}

/// Percent-encodes every byte outside `[A-Za-z0-9_~-]`.
pub fn encode_into(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'~' || b == b'-' {
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

/// What the script answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub allowed: bool,
    pub retry_after_us: u64,
    /// Redis's clock when it decided.
    pub now_us: u64,
    resets_us: [u64; MAX_LIMITS],
    len: usize,
}

impl Reply {
    /// Per limit: microseconds until its bucket is full again.
    pub fn resets_us(&self) -> &[u64] {
        self.resets_us.get(..self.len).unwrap_or(&[])
    }
}

/// Why a call gave no decision. Each class has its own metric.
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
    /// A reply that does not parse as the script's answer.
    Parse,
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
    fn new(class: FailureClass, transient: bool, detail: impl Into<String>) -> BackendError {
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

/// A parsed answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Decided(Reply),
    /// Redis does not have the script cached: call again with `EVAL`.
    NoScript,
    Failed(BackendError),
}

/// Classifies a webdis answer: `status` is `None` when the call came back
/// with no headers at all.
pub fn parse_reply(status: Option<u32>, body: &[u8], limits: usize) -> Parsed {
    match status {
        None => {
            return Parsed::Failed(BackendError::new(
                FailureClass::Transport,
                true,
                "no response from webdis (connection reset or closed)",
            ))
        }
        Some(200) => {}
        Some(504) => {
            return Parsed::Failed(BackendError::new(
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
            return Parsed::Failed(BackendError::new(
                FailureClass::Status,
                code != 403,
                format!("webdis answered {code}{why}"),
            ));
        }
    }
    let value: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return parse_error(format!("the body is not JSON: {e}")),
    };
    // webdis wraps the answer in an object keyed by the command name.
    let Some(answer) = value
        .as_object()
        .and_then(|o| o.get("EVALSHA").or_else(|| o.get("EVAL")))
    else {
        return parse_error("the body has no EVALSHA or EVAL member");
    };
    let Some(items) = answer.as_array() else {
        return parse_error("the script's answer is not an array");
    };
    // A Redis error comes back as [false, "ERR ..."].
    if let (Some(serde_json::Value::Bool(false)), Some(message)) = (items.first(), items.get(1)) {
        let message = message.as_str().unwrap_or("(no message)");
        if message.starts_with("NOSCRIPT") {
            return Parsed::NoScript;
        }
        let transient = ["LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN"]
            .iter()
            .any(|p| message.starts_with(p));
        return Parsed::Failed(BackendError::new(
            FailureClass::Redis,
            transient,
            format!("Redis error: {}", for_log(message, 200)),
        ));
    }
    let numbers: Option<Vec<u64>> = items.iter().map(serde_json::Value::as_u64).collect();
    let Some(numbers) = numbers else {
        return parse_error("the script's answer holds something other than integers");
    };
    if numbers.len() != 3 + limits || limits > MAX_LIMITS {
        return parse_error(format!(
            "the script answered {} integers for {limits} limit(s); is an older script cached under the same SHA?",
            numbers.len()
        ));
    }
    let (head, resets) = numbers.split_at(3);
    let mut reply = Reply {
        allowed: head.first() == Some(&1),
        retry_after_us: head.get(1).copied().unwrap_or(0),
        now_us: head.get(2).copied().unwrap_or(0),
        resets_us: [0; MAX_LIMITS],
        len: resets.len(),
    };
    for (slot, reset) in reply.resets_us.iter_mut().zip(resets) {
        *slot = *reset;
    }
    Parsed::Decided(reply)
}

fn parse_error(detail: impl Into<String>) -> Parsed {
    Parsed::Failed(BackendError::new(FailureClass::Parse, false, detail))
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
    use crate::gcra::test_limit as limit;
    use sha1::Sha1;

    #[test]
    fn script_sha1_matches_the_script() {
        let digest: String = Sha1::digest(SCRIPT.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            digest, SCRIPT_SHA1,
            "update SCRIPT_SHA1 after editing gcra.lua"
        );
    }

    #[test]
    fn redis_keys_are_hashes_never_the_key() {
        // sha256("1234")
        assert_eq!(
            redis_key("rl:", None, b"1234"),
            "rl:03ac674216f3e15c761ee1a5e255f067953623c8b388b4459e13f978d7c846f4"
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
    fn paths_encode_every_argument() {
        let limits = [limit(1, 1, 1), limit(1000, 86_400, 100)];
        let path = request_path(Command::EvalSha, "apikey_ratelimit:ab12", &limits);
        assert_eq!(
            path,
            format!("/EVALSHA/{SCRIPT_SHA1}/1/apikey_ratelimit%3Aab12/2/1000000/1000000/86400000/8640000000")
        );
        let eval = request_path(Command::Eval, "k", &limits[..1]);
        assert!(eval.starts_with("/EVAL/--%20apikey-ratelimit"));
        assert!(eval.ends_with("/1/k/1/1000000/1000000"));
        // Nothing in the encoded script can split or retarget the call.
        let script_part = eval.trim_start_matches("/EVAL/");
        let script_part = &script_part[..script_part.find("/1/k/").unwrap()];
        assert!(
            !script_part.contains('/') && !script_part.contains('.') && !script_part.contains('+')
        );

        let mut out = String::new();
        encode_into(&mut out, b"a/b.json+1 %\r\n\xff~_-Z9");
        assert_eq!(out, "a%2Fb%2Ejson%2B1%20%25%0D%0A%FF~_-Z9");
    }

    #[test]
    fn replies_are_decoded() {
        let body = br#"{"EVALSHA":[1,0,1764000000000000,1000000,86400000]}"#;
        let Parsed::Decided(reply) = parse_reply(Some(200), body, 2) else {
            panic!()
        };
        assert!(reply.allowed);
        assert_eq!(reply.now_us, 1_764_000_000_000_000);
        assert_eq!(reply.resets_us(), &[1_000_000, 86_400_000]);
        let body = br#"{"EVAL":[0,250000,5,1000000]}"#;
        let Parsed::Decided(reply) = parse_reply(Some(200), body, 1) else {
            panic!()
        };
        assert!(!reply.allowed);
        assert_eq!(reply.retry_after_us, 250_000);
    }

    #[test]
    fn failures_are_classified() {
        let class = |status, body: &[u8]| match parse_reply(status, body, 1) {
            Parsed::Failed(e) => (e.class, e.transient),
            other => panic!("{other:?}"),
        };
        assert_eq!(class(None, b""), (FailureClass::Transport, true));
        assert_eq!(
            class(Some(504), b"upstream request timeout"),
            (FailureClass::Timeout, true)
        );
        assert_eq!(class(Some(503), b""), (FailureClass::Status, true));
        assert_eq!(class(Some(403), b""), (FailureClass::Status, false));
        assert_eq!(
            class(
                Some(200),
                br#"{"EVALSHA":[false,"ERR Error running script"]}"#
            ),
            (FailureClass::Redis, false)
        );
        assert_eq!(
            class(
                Some(200),
                br#"{"EVALSHA":[false,"LOADING Redis is loading"]}"#
            ),
            (FailureClass::Redis, true)
        );
        for bad in [
            &b"not json"[..],
            br#"[]"#,
            br#"{"GET":[1]}"#,
            br#"{"EVALSHA":"x"}"#,
            br#"{"EVALSHA":[1,0,5]}"#,
            br#"{"EVALSHA":[1,0,5,-1]}"#,
            br#"{"EVALSHA":[1,0,5,null]}"#,
        ] {
            assert_eq!(
                class(Some(200), bad),
                (FailureClass::Parse, false),
                "{bad:?}"
            );
        }
        assert_eq!(
            parse_reply(
                Some(200),
                br#"{"EVALSHA":[false,"NOSCRIPT No matching script. Please use EVAL."]}"#,
                1
            ),
            Parsed::NoScript
        );
    }

    #[test]
    fn redis_error_messages_are_logged_on_one_line() {
        // Found by the webdis_reply fuzz target: the message went to the log verbatim.
        let body = br#"{"EVALSHA":[false,"ERR a\nforged log line\r\u0000"]}"#;
        let Parsed::Failed(error) = parse_reply(Some(200), body, 1) else {
            panic!()
        };
        assert_eq!(error.detail, r"Redis error: ERR a\nforged log line\r\u{0}");
    }
}
