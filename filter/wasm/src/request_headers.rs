//! The request's headers as the key finder reads them, fetched lazily.
//!
//! `:path` (a pseudo-header, never repeated) comes alone, in one small host
//! call: it is all the tutorial's `?api_key=` needs. Every header source is
//! read on every request (two sources must not disagree), so a header is
//! first looked up alone, in one small call that is all an absent header
//! costs; the whole map, the only way to see a header given twice, is
//! fetched once, and only when a consulted header is present.

use std::cell::OnceCell;

use ratelimit_core::header_map::HeaderMap;
use ratelimit_core::key::{KeyErrorKind, RequestHeaders};

use crate::host::{self, LOG_ERROR};

pub struct LazyHeaders {
    path: Option<Vec<u8>>,
    /// `:method` and `:authority`, which rules may read: pseudo-headers are
    /// never repeated, so one small call each, when first asked.
    method: OnceCell<Option<Vec<u8>>>,
    authority: OnceCell<Option<Vec<u8>>>,
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
            method: OnceCell::new(),
            authority: OnceCell::new(),
            all: OnceCell::new(),
        }
    }
}

impl<'a> RequestHeaders<'a> for &'a LazyHeaders {
    fn single(&self, name: &[u8]) -> Result<Option<&'a [u8]>, KeyErrorKind> {
        let pseudo = match name {
            b":path" => return Ok(self.path.as_deref()),
            b":method" => Some(&self.method),
            b":authority" => Some(&self.authority),
            _ => None,
        };
        if let Some(cell) = pseudo {
            let value = cell.get_or_init(|| host::request_header(name).ok().flatten());
            return Ok(value.as_deref());
        }
        // The host answers a lookup of a name given several times with its
        // first value, so absence here is absence in the map.
        if self.all.get().is_none() && matches!(host::request_header(name), Ok(None)) {
            return Ok(None);
        }
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
        HeaderMap::parse(all)
            .unwrap_or(HeaderMap::empty())
            .single(name)
    }
}
