//! The request's headers as the key finder and the rules read them, fetched
//! lazily.
//!
//! `:path` (a pseudo-header, never repeated) comes alone, in one small host
//! call: it is all the tutorial's `?api_key=` needs. Every header source is
//! read on every request (two sources must not disagree), so a header is
//! first looked up alone, in one small call that is all an absent header
//! costs; the whole map, the only way to see a header given twice, is
//! fetched once, and only when a consulted header is present.
//!
//! Rules on methods or hosts read `:method` and `:authority`, and rules on
//! headers read those: a host call each cost more than the whole map in one
//! (3.3 µs of Envoy CPU a request with the bench's five rules,
//! docs/bench/policies.md), so the first of these fetches the map, and every
//! later lookup is answered from it.

use std::cell::OnceCell;

use ratelimit_core::header_map::HeaderMap;
use ratelimit_core::key::{KeyErrorKind, RequestHeaders};

use crate::host::{self, LOG_ERROR};

pub struct LazyHeaders {
    path: Option<Vec<u8>>,
    /// The whole map (see the module docs).
    all: OnceCell<Vec<u8>>,
}

impl LazyHeaders {
    pub fn fetch() -> LazyHeaders {
        let path = host::request_header(b":path").unwrap_or_else(|status| {
            host::log(
                LOG_ERROR,
                &format!("cannot read :path (host status {})", status.0),
            );
            None
        });
        LazyHeaders {
            path,
            all: OnceCell::new(),
        }
    }

    /// The whole map, fetched on first use.
    fn all(&self) -> HeaderMap<'_> {
        let all = self.all.get_or_init(|| {
            host::request_header_pairs().unwrap_or_else(|status| {
                host::log(
                    LOG_ERROR,
                    &format!("cannot read request headers (host status {})", status.0),
                );
                Vec::new()
            })
        });
        // A malformed map (a host bug) reads as no headers: the key is missing.
        HeaderMap::parse(all).unwrap_or(HeaderMap::empty())
    }
}

impl<'a> RequestHeaders<'a> for &'a LazyHeaders {
    fn single(&self, name: &[u8]) -> Result<Option<&'a [u8]>, KeyErrorKind> {
        match name {
            b":path" => return Ok(self.path.as_deref()),
            // Only rules read these, and rules read more: take the map.
            b":method" | b":authority" => return self.all().single(name),
            _ => {}
        }
        // The host answers a lookup of a name given several times with its
        // first value, so absence here is absence in the map.
        if self.all.get().is_none() && matches!(host::request_header(name), Ok(None)) {
            return Ok(None);
        }
        self.all().single(name)
    }
}
