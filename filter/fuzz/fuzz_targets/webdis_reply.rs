//! The batch reply parser: an arbitrary status and body through
//! `batch::wire::parse` and `webdis::fcall_integers`.
//!
//! Input: byte 0 picks the status (none, 200, 504, 503, 403 or any u16 from
//! the next two bytes); byte 1 the call the answer is read for: its top 3
//! bits the number of entries (0 to 7), its low 5 the first entry's number
//! of limits, each later entry one more, modulo 10 (0 to 9, one more than
//! allowed); the rest is the body.
//!
//! Checks: only a 200 is ever read; a decision comes from valid JSON, with
//! one reply per entry asked and one debt per limit, at most 8; the failure
//! class matches the status; a failure's description is short and
//! single-line, whatever the body held.

#![no_main]

use libfuzzer_sys::fuzz_target;
use ratelimit_core::batch::wire::parse;
use ratelimit_core::per_limit::MAX_LIMITS;
use ratelimit_core::webdis::{fcall_integers, BackendError, FailureClass};

/// Longest failure description, in characters: it goes to the log.
const MAX_DETAIL: usize = 300;

fuzz_target!(|data: &[u8]| {
    let [pick, call, rest @ ..] = data else {
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
    let entries = usize::from(call >> 5);
    let first = usize::from(call & 0x1f);
    let limits: Vec<usize> = (0..entries)
        .map(|i| (first + i) % (MAX_LIMITS + 2))
        .collect();

    // The call's nonce: a reply must echo it first.
    const NONCE: u64 = 1;
    let parsed = parse(status, body, NONCE, &limits);
    assert_eq!(
        parsed,
        parse(status, body, NONCE, &limits),
        "not deterministic"
    );
    let integers = fcall_integers(status, body);
    assert_eq!(integers, fcall_integers(status, body), "not deterministic");
    if status != Some(200) {
        // Not a 200: the body is never looked at.
        assert_eq!(parsed, parse(status, b"", NONCE, &limits));
        assert_eq!(integers, fcall_integers(status, b""));
    }

    match (&integers, &parsed) {
        (Err(error), _) => {
            // A failure of every call comes through unchanged.
            assert_eq!(parsed.as_ref().err(), Some(error));
            check_failure(error, status, &[FailureClass::Redis, FailureClass::Parse]);
        }
        (Ok(numbers), Err(error)) => {
            // Another call's reply is a transport failure, whatever its shape.
            let foreign = numbers.first().is_some_and(|first| *first != NONCE);
            assert_eq!(error.class == FailureClass::Transport, foreign);
            check_failure(
                error,
                status,
                &[FailureClass::Parse, FailureClass::Transport],
            );
        }
        (Ok(numbers), Ok(reply)) => {
            assert_eq!(status, Some(200));
            assert!(serde_json::from_slice::<serde_json::Value>(body).is_ok());
            assert_eq!(reply.entries.len(), limits.len(), "one reply per entry");
            for (entry, asked) in reply.entries.iter().zip(&limits) {
                assert!(entry.debts_us.len() <= MAX_LIMITS, "too many limits");
                assert_eq!(entry.debts_us.len(), *asked, "one debt per limit");
            }
            let read = 2 + limits.iter().map(|n| 1 + n).sum::<usize>();
            assert_eq!(numbers.len(), read, "integers left unread");
            assert_eq!(numbers.first(), Some(&NONCE));
            assert_eq!(numbers.get(1), Some(&reply.now_us));
        }
    }
});

/// A failure's class fits the status (`on_200`: the classes a 200 may
/// give), and its description is fit for one log line.
fn check_failure(error: &BackendError, status: Option<u32>, on_200: &[FailureClass]) {
    let expected = match status {
        None => &[FailureClass::Transport][..],
        Some(200) => on_200,
        Some(504) => &[FailureClass::Timeout][..],
        Some(_) => &[FailureClass::Status][..],
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
