//! The admin API: a plugin instance configured with `admin` rate-limits
//! nothing; on its own listener it lets an operator inspect a key's usage,
//! reset it, or grant it extra room (`docs/design.md#the-admin-api`).
//!
//! - `GET /keys/<key>`: the key's usage, as the introspection path says it.
//! - `DELETE /keys/<key>`: its state cleared: full buckets and quotas.
//! - `POST /keys/<key>/grant?amount=N`: each rate's debt less `N` emission
//!   intervals (never below a full bucket), each quota's used count less `N`.
//!
//! Every call needs `Authorization: Bearer <token>` whose SHA-256 is the
//! configured `token_sha256` (compared in constant time): 401 without one,
//! 403 with a wrong one. `<key>` is the plain key, or `sha256:<hex>` where
//! that finds the key's state exactly ([`target`]). Local mode acts on this
//! Envoy's shared data; global mode acts on Redis, in one call ([`redis`]).

use std::borrow::Cow;

use sha2::{Digest, Sha256};

use crate::config::{AdminConfig, ConfigError};
use crate::gcra::{Clock, Limit};
use crate::hash::{hex_byte, parse_sha256};
use crate::key::RequestHeaders;
use crate::response::{self, LocalReply};
use crate::settle::{self, Adjust};

/// The most a grant may give at once, in requests (or quota units).
pub const MAX_GRANT: u64 = 1_000_000_000;

/// A compiled `admin` configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    token_sha256: [u8; 32],
}

/// What an operator asks of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Inspect,
    Reset,
    Grant(u64),
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Inspect => "inspect",
            Op::Reset => "reset",
            Op::Grant(_) => "grant",
        }
    }
}

/// The key an admin path names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyName {
    /// The plain key.
    Plain(Vec<u8>),
    /// `sha256:<64 hex digits>` (either case): the key's SHA-256.
    Sha256([u8; 32]),
}

impl KeyName {
    /// The key's SHA-256, which the logs name.
    pub fn digest(&self) -> [u8; 32] {
        match self {
            KeyName::Plain(key) => Sha256::digest(key).into(),
            KeyName::Sha256(digest) => *digest,
        }
    }
}

/// An authorized call: the operation and the key it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub op: Op,
    pub key: KeyName,
}

impl Admin {
    pub fn compile(config: &AdminConfig) -> Result<Admin, ConfigError> {
        let token_sha256 = parse_sha256(config.token_sha256.as_bytes()).ok_or_else(|| {
            ConfigError::new(
                "admin.token_sha256",
                "must be the 64 hex digits of the token's SHA-256 (`printf %s \"$TOKEN\" | sha256sum`)",
            )
        })?;
        Ok(Admin { token_sha256 })
    }

    /// The call an admin request makes, or the reply that refuses it. The
    /// token is checked first, so nothing else is told to a caller without it.
    pub fn route<'a>(&self, headers: &impl RequestHeaders<'a>) -> Result<Command, LocalReply> {
        let single = |name: &[u8]| headers.single(name).ok().flatten();
        let token = single(b"authorization").and_then(|v| bearer(v));
        let Some(token) = token else {
            return Err(refusal(
                401,
                "An admin token is required (Authorization: Bearer).",
            ));
        };
        let digest: [u8; 32] = Sha256::digest(token).into();
        if !same(&digest, &self.token_sha256) {
            return Err(refusal(403, "This admin token is not accepted."));
        }
        let raw = single(b":path").unwrap_or_default();
        let (path, query) = match raw.iter().position(|b| *b == b'?') {
            Some(at) => (raw.get(..at).unwrap_or_default(), raw.get(at + 1..)),
            None => (raw, None),
        };
        let method = single(b":method").unwrap_or_default();
        let Some(rest) = path.strip_prefix(b"/keys/") else {
            return Err(refusal(
                404,
                "Admin paths are /keys/<key> and /keys/<key>/grant.",
            ));
        };
        let (segment, grant) = match rest.strip_suffix(b"/grant") {
            Some(segment) => (segment, true),
            None => (rest, false),
        };
        let op = match (method, grant) {
            (b"GET", false) => Op::Inspect,
            (b"DELETE", false) => Op::Reset,
            (b"POST", true) => Op::Grant(amount(query)?),
            _ => {
                return Err(refusal(
                    405,
                    "Use GET or DELETE /keys/<key>, or POST /keys/<key>/grant?amount=N.",
                ))
            }
        };
        let key = decode(segment)
            .filter(|k| !k.is_empty() && !k.contains(&b'/'))
            .ok_or_else(|| refusal(400, "The key in the path is empty or badly escaped."))?;
        // As in the configuration: `sha256:` introduces a digest, never a key.
        let key = match key.strip_prefix(b"sha256:") {
            Some(hex) => KeyName::Sha256(parse_sha256(hex).ok_or_else(|| {
                refusal(
                    400,
                    "A sha256: key must be followed by the 64 hex digits of the key's SHA-256.",
                )
            })?),
            None => KeyName::Plain(key.into_owned()),
        };
        Ok(Command { op, key })
    }
}

/// A stored value after `op` (a rate's TAT, or a quota's packed value) at
/// `clock`: a reset empties it, a grant takes `n` requests of debt (at most
/// down to a full bucket) or `n` units of a quota's use: a refund, as a
/// settlement's ([`settle::apply`]).
pub fn apply(op: Op, limit: &Limit, value: u64, clock: Clock) -> u64 {
    match op {
        Op::Inspect => value,
        Op::Reset => 0,
        Op::Grant(n) => settle::apply(Adjust::Refund(n), limit, value, clock),
    }
}

/// The hex SHA-256 of a key, which the logs name instead of the key.
pub fn key_digest(key: &[u8]) -> String {
    hex(&Sha256::digest(key).into())
}

/// A digest in lower-case hex, as the logs and Redis keys write it.
pub fn hex(digest: &[u8; 32]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The token of `Bearer <token>` (the scheme in any case).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let scheme = value.get(..7)?;
    let token = value.get(7..)?;
    (scheme.eq_ignore_ascii_case(b"bearer ") && !token.is_empty()).then_some(token)
}

/// Equal in time that does not depend on where they differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `amount=N` in the query, `N` from 1 to [`MAX_GRANT`].
fn amount(query: Option<&[u8]>) -> Result<u64, LocalReply> {
    query
        .unwrap_or_default()
        .split(|b| *b == b'&')
        .find_map(|pair| pair.strip_prefix(b"amount="))
        .and_then(|n| std::str::from_utf8(n).ok())
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.parse::<u64>().ok())
        .filter(|n| (1..=MAX_GRANT).contains(n))
        .ok_or_else(|| refusal(400, "A grant needs ?amount=N, N from 1 to 1000000000."))
}

/// `%XX` decoded; `None` for a broken escape.
fn decode(segment: &[u8]) -> Option<Cow<'_, [u8]>> {
    if !segment.contains(&b'%') {
        return Some(Cow::Borrowed(segment));
    }
    let mut out = Vec::with_capacity(segment.len());
    let mut bytes = segment.iter();
    while let Some(b) = bytes.next() {
        if *b != b'%' {
            out.push(*b);
            continue;
        }
        out.push(hex_byte(*bytes.next()?, *bytes.next()?)?);
    }
    Some(Cow::Owned(out))
}

fn refusal(status: u32, detail: &str) -> LocalReply {
    let mut reply = response::detail_reply(status, detail);
    if status == 401 {
        reply
            .headers
            .push(("www-authenticate", "Bearer".to_string()));
    }
    reply
}

pub mod epoch;
pub mod redis;
pub mod target;

#[cfg(test)]
mod tests;
