//! Reads the header map the host hands over in one call
//! (`proxy_get_header_map_pairs`), without copying it.
//!
//! Reading every header at once costs one host call, and it is the only way
//! to see a header given twice: `proxy_get_header_map_value` returns just
//! the first value, so a duplicated `x-api-key` would go unnoticed.
//!
//! Layout: a little-endian u32 count `n`, then `n` pairs of u32 sizes
//! (name, value), then each name and value followed by a NUL byte.

/// A validated view over a serialized header map.
#[derive(Debug, Clone, Copy)]
pub struct HeaderMap<'a> {
    sizes: &'a [u8],
    data: &'a [u8],
    count: usize,
}

impl<'a> HeaderMap<'a> {
    /// A map with no headers.
    pub const fn empty() -> HeaderMap<'a> {
        HeaderMap {
            sizes: &[],
            data: &[],
            count: 0,
        }
    }

    /// Checks the whole layout once, so that iteration never fails.
    /// `None` means the host sent something malformed.
    pub fn parse(bytes: &'a [u8]) -> Option<HeaderMap<'a>> {
        if bytes.is_empty() {
            return Some(HeaderMap::empty());
        }
        let count = usize::try_from(read_u32(bytes, 0)?).ok()?;
        let sizes_len = count.checked_mul(8)?;
        let sizes = bytes.get(4..sizes_len.checked_add(4)?)?;
        let data = bytes.get(sizes_len + 4..)?;
        let mut needed = 0usize;
        for pair in sizes.chunks_exact(8) {
            let name = usize::try_from(read_u32(pair, 0)?).ok()?;
            let value = usize::try_from(read_u32(pair, 4)?).ok()?;
            needed = needed
                .checked_add(name)?
                .checked_add(value)?
                .checked_add(2)?;
        }
        if needed > data.len() {
            return None;
        }
        Some(HeaderMap { sizes, data, count })
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Every (name, value) pair in order, duplicates included.
    pub fn iter(&self) -> HeaderIter<'a> {
        HeaderIter {
            sizes: self.sizes.chunks_exact(8),
            data: self.data,
        }
    }
}

pub struct HeaderIter<'a> {
    sizes: std::slice::ChunksExact<'a, u8>,
    data: &'a [u8],
}

impl<'a> Iterator for HeaderIter<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let pair = self.sizes.next()?;
        let name_len = usize::try_from(read_u32(pair, 0)?).ok()?;
        let value_len = usize::try_from(read_u32(pair, 4)?).ok()?;
        let name = self.data.get(..name_len)?;
        let value_start = name_len.checked_add(1)?;
        let value = self
            .data
            .get(value_start..value_start.checked_add(value_len)?)?;
        self.data = self.data.get(value_start + value_len + 1..).unwrap_or(&[]);
        Some((name, value))
    }
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let raw: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_le_bytes(raw))
}

/// Serializes pairs in the same layout; the host does this for real, tests
/// and benchmarks use it to build inputs.
pub fn serialize(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (name, value) in pairs {
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    }
    for (name, value) in pairs {
        out.extend_from_slice(name);
        out.push(0);
        out.extend_from_slice(value);
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips_pairs_in_order_with_duplicates() {
        let pairs: [(&[u8], &[u8]); 3] = [
            (b":path", b"/?api_key=1"),
            (b"x-api-key", b"a"),
            (b"x-api-key", b""),
        ];
        let bytes = serialize(&pairs);
        let map = HeaderMap::parse(&bytes).unwrap();
        assert_eq!(map.len(), 3);
        assert_eq!(map.iter().collect::<Vec<_>>(), pairs.to_vec());
    }

    #[test]
    fn empty_input_is_an_empty_map() {
        let map = HeaderMap::parse(&[]).unwrap();
        assert!(map.is_empty());
        assert_eq!(map.iter().count(), 0);
    }

    #[test]
    fn truncated_or_lying_maps_are_refused() {
        let bytes = serialize(&[(b"a", b"b")]);
        for cut in 1..bytes.len() - 1 {
            assert!(HeaderMap::parse(&bytes[..cut]).is_none(), "cut at {cut}");
        }
        let mut huge = bytes.clone();
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(HeaderMap::parse(&huge).is_none());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            if let Some(map) = HeaderMap::parse(&bytes) {
                let _ = map.iter().count();
            }
        }
    }
}
