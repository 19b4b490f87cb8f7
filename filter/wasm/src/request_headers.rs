//! The request's headers as the key finder reads them, fetched lazily.
//!
//! `:path` (a pseudo-header, never repeated) comes alone, in one small host
//! call: it is all the tutorial's `?api_key=` needs. The whole header map,
//! the only way to see a header given twice, is fetched once, and only when
//! a header source is actually consulted.

use std::cell::OnceCell;

use ratelimit_core::header_map::HeaderMap;
use ratelimit_core::key::{KeyErrorKind, RequestHeaders};

use crate::host::{self, LOG_ERROR};

pub struct LazyHeaders {
    path: Option<Vec<u8>>,
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
}

impl<'a> RequestHeaders<'a> for &'a LazyHeaders {
    fn single(&self, name: &[u8]) -> Result<Option<&'a [u8]>, KeyErrorKind> {
        if name == b":path" {
            return Ok(self.path.as_deref());
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
