//! A response body read for a settled cost (`settle::body::BodyScan`):
//! byte 0 picks JSON or an event stream (bit 0) and the bound (the other
//! bits, 1 to 128 bytes, or 64 KiB for 0), byte 1 where the body is cut in
//! two; the rest is the body, read for `usage.total_tokens`.
//!
//! Checks: nothing panics; the answer does not depend on where the body is
//! cut (the stream arrives in pieces Envoy chooses); a value is at most
//! the largest cost; a JSON body past its bound is malformed, never read.

#![no_main]

use libfuzzer_sys::fuzz_target;
use ratelimit_core::policy::rules::MAX_COST;
use ratelimit_core::settle::body::BodyScan;
use ratelimit_core::settle::Observed;

fuzz_target!(|data: &[u8]| {
    let [mode, cut, body @ ..] = data else {
        return;
    };
    let events = mode & 1 == 1;
    let max = match usize::from(mode >> 1) {
        0 => 64 * 1024,
        n => n,
    };
    let content_type: &[u8] = if events {
        b"text/event-stream"
    } else {
        b"application/json"
    };
    let path = vec!["usage".to_string(), "total_tokens".to_string()];
    let whole = {
        let mut scan = BodyScan::new(Some(content_type), max);
        scan.feed(body, &path);
        scan.finish(&path)
    };
    let at = usize::from(*cut).min(body.len());
    let (a, b) = body.split_at(at);
    let mut scan = BodyScan::new(Some(content_type), max);
    scan.feed(a, &path);
    scan.feed(b, &path);
    assert_eq!(scan.finish(&path), whole, "cut at {at}");
    if let Observed::Value(v) = whole {
        assert!(v <= MAX_COST);
    }
    if !events && body.len() > max {
        assert_eq!(whole, Observed::Malformed);
    }
});
