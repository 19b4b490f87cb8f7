//! The webdis reply parser: an arbitrary status and body through
//! `webdis::parse_reply`.
//!
//! Input: byte 0 picks the status (none, 200, 504, 503, 403 or any u16 from
//! the next two bytes), byte 1 the number of limits (0 to 9, one more than
//! allowed), the rest is the body.
//!
//! Checks: only a 200 is ever read; a decision is valid JSON and carries
//! one reset per limit; the failure class matches the status; a failure's
//! description is short and single-line, whatever the body held.

#![no_main]

use libfuzzer_sys::fuzz_target;
use ratelimit_core::per_limit::MAX_LIMITS;
use ratelimit_core::webdis::{parse_reply, FailureClass, Parsed};

/// Longest failure description, in characters: it goes to the log.
const MAX_DETAIL: usize = 300;

fuzz_target!(|data: &[u8]| {
    let [pick, limits, rest @ ..] = data else {
        return;
    };
    let (status, body) = match pick % 8 {
        0 => (None, rest),
        1..=3 => (Some(200), rest),
        4 => (Some(504), rest),
        5 => (Some(503), rest),
        6 => (Some(403), rest),
        _ => match rest {
            [hi, lo, body @ ..] => (Some(u32::from(u16::from_be_bytes([*hi, *lo]))), body),
            _ => return,
        },
    };
    let limits = usize::from(*limits) % (MAX_LIMITS + 2);
    let parsed = parse_reply(status, body, limits);
    assert_eq!(
        parsed,
        parse_reply(status, body, limits),
        "not deterministic"
    );

    if status != Some(200) {
        // Not a 200: the body is never looked at.
        assert_eq!(parsed, parse_reply(status, b"", limits));
    }
    match parsed {
        Parsed::Decided(reply) => {
            assert_eq!(status, Some(200));
            assert!(limits <= MAX_LIMITS, "decided for too many limits");
            assert_eq!(reply.resets_us().len(), limits, "one reset per limit");
            assert!(serde_json::from_slice::<serde_json::Value>(body).is_ok());
        }
        Parsed::Failed(error) => {
            let expected = match status {
                None => vec![FailureClass::Transport],
                Some(200) => vec![FailureClass::Redis, FailureClass::Parse],
                Some(504) => vec![FailureClass::Timeout],
                Some(_) => vec![FailureClass::Status],
            };
            assert!(
                expected.contains(&error.class),
                "{:?} for {status:?}",
                error.class
            );
            assert!(!error.detail.is_empty());
            assert!(
                error.detail.chars().count() <= MAX_DETAIL,
                "detail too long"
            );
            assert!(
                !error.detail.contains(['\n', '\r']),
                "a multi-line log entry"
            );
        }
    }
});
