//! The header-map reader: arbitrary bytes through `HeaderMap::parse`, and
//! arbitrary pairs through `serialize` then `parse`.
//!
//! Checks: an accepted map iterates exactly `len()` pairs and reserializes
//! to bytes that parse back to the same pairs (no longer than the input);
//! `single` agrees with iteration; any pairs round-trip through the layout.

#![no_main]

use libfuzzer_sys::fuzz_target;
use ratelimit_core::header_map::{serialize, HeaderMap};
use ratelimit_core::key::{KeyErrorKind, RequestHeaders};

fuzz_target!(|data: &[u8]| {
    if let Some(map) = HeaderMap::parse(data) {
        let pairs: Vec<(&[u8], &[u8])> = map.iter().collect();
        assert_eq!(pairs.len(), map.len());
        assert_eq!(map.is_empty(), pairs.is_empty());
        let bytes = serialize(&pairs);
        assert!(bytes.len() <= data.len().max(4), "reserialized map grew");
        let again = HeaderMap::parse(&bytes).map(|m| m.iter().collect::<Vec<_>>());
        assert_eq!(again.as_ref(), Some(&pairs));
        if let Some((name, value)) = pairs.first() {
            let count = pairs.iter().filter(|(n, _)| n == name).count();
            match map.single(name) {
                Ok(Some(found)) => assert!(count == 1 && found == *value),
                Err(KeyErrorKind::Repeated) => assert!(count > 1),
                other => panic!("single({name:?}) = {other:?} for {count} occurrence(s)"),
            }
        }
    } else {
        assert!(!data.is_empty(), "the empty map was refused");
    }

    // The other direction: NUL-separated fields taken as name, value, ...
    let fields: Vec<&[u8]> = data.split(|b| *b == 0).collect();
    let pairs: Vec<(&[u8], &[u8])> = fields.chunks_exact(2).map(|p| (p[0], p[1])).collect();
    let bytes = serialize(&pairs);
    let parsed = HeaderMap::parse(&bytes).map(|m| m.iter().collect::<Vec<_>>());
    assert_eq!(parsed, Some(pairs));
});
