//! The calls a root context has sent and not heard back from, by the
//! host's token.
//!
//! Nothing here panics: a token the host hands out again while the table
//! still holds it (Envoy's ids wrap after 2^30) displaces the old call,
//! which is returned so that its requests can be failed.

use std::collections::HashMap;

pub struct CallTable<T> {
    calls: HashMap<u32, T>,
}

impl<T> Default for CallTable<T> {
    fn default() -> Self {
        CallTable {
            calls: HashMap::new(),
        }
    }
}

impl<T> CallTable<T> {
    /// The host accepted a call under `token`; returns a call the same
    /// token still named, which no answer will ever reach now.
    pub fn sent(&mut self, token: u32, call: T) -> Option<T> {
        self.calls.insert(token, call)
    }

    /// The answer to `token` came: its call, or `None` for a token never
    /// seen (or already answered).
    pub fn answered(&mut self, token: u32) -> Option<T> {
        self.calls.remove(&token)
    }

    /// Calls sent and not answered yet.
    pub fn outstanding(&self) -> usize {
        self.calls.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_finds_its_call_once() {
        let mut table = CallTable::default();
        assert_eq!(table.sent(4, "call"), None);
        assert_eq!(table.outstanding(), 1);
        assert_eq!(table.answered(4), Some("call"));
        assert_eq!(table.answered(4), None);
        assert_eq!(table.outstanding(), 0);
    }

    #[test]
    fn a_duplicate_token_displaces_the_older_call_without_panicking() {
        let mut table = CallTable::default();
        assert_eq!(table.sent(4, "first"), None);
        assert_eq!(table.sent(4, "second"), Some("first"));
        assert_eq!(table.outstanding(), 1, "one answer is owed, not two");
        assert_eq!(table.answered(4), Some("second"));
    }

    #[test]
    fn unknown_and_wrapped_tokens_stay_apart() {
        let mut table = CallTable::default();
        // Envoy's ids step by 4 and wrap.
        table.sent(u32::MAX - 3, "before");
        table.sent(1, "after");
        assert_eq!(table.answered(8), None);
        assert_eq!(table.answered(1), Some("after"));
        assert_eq!(table.answered(u32::MAX - 3), Some("before"));
    }
}
