//! Bookkeeping of the calls a root context makes for its requests.
//!
//! A request asks for a call by [`CallTable::queue`] and gets an id of ours
//! (a `u64` that never repeats); the root takes it, sends it, and binds the
//! host's token to it with [`CallTable::sent`]; the answer is routed back by
//! [`CallTable::answered`]. A request that ends, whatever the state of its
//! call, [`CallTable::release`]s it: nothing of it stays. An answer whose
//! request is gone, or a token never seen, is [`Answer::Orphaned`]. Nothing
//! here panics: a token the host hands out again while the table still binds
//! it (ids wrap) displaces the old call, which is returned to be failed.
//!
//! The table also counts the calls sent and not answered yet, whether or
//! not their request still exists: the root waits for them before it lets
//! the host delete it, so the host never drops one unanswered.

use std::collections::HashMap;

/// Our id for a call: never reused while the VM lives.
pub type CallId = u64;

struct Entry<T> {
    context_id: u32,
    token: Option<u32>,
    payload: T,
}

/// What an answer's token leads to.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer<T> {
    /// Its request is still here: answer it in `context_id`.
    Live {
        id: CallId,
        context_id: u32,
        payload: T,
    },
    /// Its request is gone (or the token is unknown): discard and count it.
    Orphaned,
}

/// A call pushed out by a token bound twice.
#[derive(Debug, PartialEq, Eq)]
pub struct Displaced<T> {
    pub id: CallId,
    pub context_id: u32,
    pub payload: T,
}

pub struct CallTable<T> {
    next_id: CallId,
    calls: HashMap<CallId, Entry<T>>,
    tokens: HashMap<u32, CallId>,
    outstanding: usize,
    /// The host asked to delete the root while calls were outstanding.
    closing: bool,
}

impl<T> Default for CallTable<T> {
    fn default() -> Self {
        CallTable {
            next_id: 1,
            calls: HashMap::new(),
            tokens: HashMap::new(),
            outstanding: 0,
            closing: false,
        }
    }
}

impl<T> CallTable<T> {
    /// The id [`CallTable::queue`] gives next.
    pub fn next_id(&self) -> CallId {
        self.next_id
    }

    /// Records a call for the request `context_id`, not sent yet.
    pub fn queue(&mut self, context_id: u32, payload: T) -> CallId {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.calls.insert(
            id,
            Entry {
                context_id,
                token: None,
                payload,
            },
        );
        id
    }

    /// Takes a queued call out to send it; `None` if its request is gone.
    pub fn take(&mut self, id: CallId) -> Option<(u32, T)> {
        let entry = self.calls.remove(&id)?;
        if let Some(token) = entry.token {
            self.tokens.remove(&token);
        }
        Some((entry.context_id, entry.payload))
    }

    /// The host accepted the call `id` under `token`.
    pub fn sent(
        &mut self,
        id: CallId,
        context_id: u32,
        token: u32,
        payload: T,
    ) -> Option<Displaced<T>> {
        self.outstanding = self.outstanding.saturating_add(1);
        let displaced = self
            .tokens
            .insert(token, id)
            .filter(|old| *old != id)
            .and_then(|old| self.calls.remove(&old).map(|entry| (old, entry)))
            .map(|(old, entry)| Displaced {
                id: old,
                context_id: entry.context_id,
                payload: entry.payload,
            });
        self.calls.insert(
            id,
            Entry {
                context_id,
                token: Some(token),
                payload,
            },
        );
        displaced
    }

    /// The answer to `token` came.
    pub fn answered(&mut self, token: u32) -> Answer<T> {
        self.outstanding = self.outstanding.saturating_sub(1);
        let Some(id) = self.tokens.remove(&token) else {
            return Answer::Orphaned;
        };
        match self.calls.remove(&id) {
            Some(entry) => Answer::Live {
                id,
                context_id: entry.context_id,
                payload: entry.payload,
            },
            None => Answer::Orphaned,
        }
    }

    /// The request of call `id` ended: forget the call, sent or not.
    pub fn release(&mut self, id: CallId) {
        if let Some(entry) = self.calls.remove(&id) {
            if let Some(token) = entry.token {
                self.tokens.remove(&token);
            }
        }
    }

    /// Calls whose request is still here (queued or sent).
    pub fn len(&self) -> usize {
        self.calls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// Calls sent and not answered yet, their request here or not.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// The host wants to delete the root: `true` if nothing is outstanding,
    /// else the root must wait (the host would cancel the calls, and the SDK
    /// would keep their tokens forever) until [`CallTable::may_finish`].
    pub fn may_close(&mut self) -> bool {
        self.closing = self.outstanding > 0;
        !self.closing
    }

    /// After an answer: `true` once, when a waiting root may now finish.
    pub fn may_finish(&mut self) -> bool {
        let finish = self.closing && self.outstanding == 0;
        if finish {
            self.closing = false;
        }
        finish
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(id: CallId, context_id: u32, payload: &'static str) -> Answer<&'static str> {
        Answer::Live {
            id,
            context_id,
            payload,
        }
    }

    /// Queues and sends one call for `context_id`.
    fn send(table: &mut CallTable<&'static str>, context_id: u32, token: u32) -> CallId {
        let id = table.queue(context_id, "call");
        let (ctx, payload) = table.take(id).unwrap();
        assert!(table.sent(id, ctx, token, payload).is_none());
        id
    }

    #[test]
    fn an_answer_goes_to_the_request_that_sent_the_call() {
        let mut table = CallTable::default();
        let id = send(&mut table, 7, 4);
        assert_eq!(table.outstanding(), 1);
        assert_eq!(table.answered(4), live(id, 7, "call"));
        assert_eq!((table.len(), table.outstanding()), (0, 0));
    }

    #[test]
    fn a_released_request_leaves_nothing_and_its_answer_is_orphaned() {
        let mut table = CallTable::default();
        let id = send(&mut table, 7, 4);
        table.release(id);
        assert_eq!(table.len(), 0);
        assert_eq!(table.outstanding(), 1, "the host still owes the answer");
        assert_eq!(table.answered(4), Answer::Orphaned);
        assert_eq!(table.outstanding(), 0);
    }

    #[test]
    fn a_call_released_before_it_was_sent_is_not_sent() {
        let mut table = CallTable::default();
        let next = table.next_id();
        let id = table.queue(7, "call");
        assert_eq!(id, next);
        table.release(id);
        assert_eq!(table.take(id), None);
        assert!(table.is_empty());
    }

    #[test]
    fn a_token_reused_after_its_request_was_deleted_reaches_only_the_new_request() {
        let mut table = CallTable::default();
        let old = send(&mut table, 7, 4);
        table.release(old);
        assert_eq!(table.answered(4), Answer::Orphaned);
        // Context id 7 and token 4 both come round again.
        let new = send(&mut table, 7, 4);
        assert_ne!(old, new);
        assert_eq!(table.answered(4), live(new, 7, "call"));
        table.release(old);
        assert_eq!(table.answered(4), Answer::Orphaned);
    }

    #[test]
    fn a_duplicate_token_displaces_the_older_call_without_panicking() {
        let mut table = CallTable::default();
        let first = send(&mut table, 7, 4);
        let second = table.queue(9, "second");
        let (ctx, payload) = table.take(second).unwrap();
        assert_eq!(
            table.sent(second, ctx, 4, payload),
            Some(Displaced {
                id: first,
                context_id: 7,
                payload: "call"
            })
        );
        assert_eq!(table.answered(4), live(second, 9, "second"));
        assert!(table.is_empty());
    }

    #[test]
    fn an_unknown_token_is_orphaned_and_changes_nothing() {
        let mut table = CallTable::default();
        let id = send(&mut table, 7, 4);
        assert_eq!(table.answered(8), Answer::Orphaned);
        assert_eq!(table.answered(u32::MAX), Answer::Orphaned);
        assert_eq!(table.answered(4), live(id, 7, "call"));
        assert_eq!(table.outstanding(), 0, "never below zero");
    }

    #[test]
    fn wrapped_tokens_and_context_ids_stay_apart() {
        let mut table = CallTable::default();
        // Envoy's ids step by 4 and wrap; context ids are u32 too.
        let before = send(&mut table, u32::MAX, u32::MAX - 3);
        let after = send(&mut table, 0, 1);
        assert_eq!(table.answered(1), live(after, 0, "call"));
        assert_eq!(table.answered(u32::MAX - 3), live(before, u32::MAX, "call"));
    }

    #[test]
    fn a_retry_keeps_the_call_id_under_a_new_token() {
        let mut table = CallTable::default();
        let id = send(&mut table, 7, 4);
        let Answer::Live { payload, .. } = table.answered(4) else {
            panic!("not live")
        };
        assert!(table.sent(id, 7, 8, payload).is_none());
        table.release(id);
        assert_eq!(table.answered(8), Answer::Orphaned);
        assert_eq!((table.len(), table.outstanding()), (0, 0));
    }

    #[test]
    fn a_root_asked_to_close_waits_for_every_outstanding_answer() {
        let mut table = CallTable::default();
        assert!(table.may_close(), "nothing outstanding: close at once");
        assert!(!table.may_finish());
        let live = send(&mut table, 7, 4);
        let gone = send(&mut table, 9, 8);
        table.release(gone);
        assert!(!table.may_close());
        assert!(!table.may_finish());
        assert_eq!(table.answered(4), live_answer(live));
        assert!(
            !table.may_finish(),
            "the released request's call is still out"
        );
        assert_eq!(table.answered(8), Answer::Orphaned);
        assert!(table.may_finish());
        assert!(!table.may_finish(), "only once");
    }

    fn live_answer(id: CallId) -> Answer<&'static str> {
        live(id, 7, "call")
    }

    #[test]
    fn many_abandoned_calls_leave_the_table_empty() {
        let mut table = CallTable::default();
        for n in 0..50_000u32 {
            let id = send(&mut table, n, n.wrapping_mul(4));
            table.release(id);
        }
        for n in 0..50_000u32 {
            assert_eq!(table.answered(n.wrapping_mul(4)), Answer::Orphaned);
        }
        assert_eq!((table.len(), table.outstanding()), (0, 0));
    }
}
