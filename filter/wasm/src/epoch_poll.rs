//! The admin epoch, as one worker knows it (`ratelimit_core::admin::epoch`):
//! the root polls it every `store.webdis.admin_sync_ms` from its tick, one
//! call out at most, and the deny cache files its entries under it, so an
//! operator's reset or grant on any replica's admin API reaches this
//! worker's cache within that period. Like the other root-owned calls
//! (`admin_calls.rs`, `settle_calls.rs`) a poll is sent from a root
//! callback, and a closing root waits for its answer. A failed poll keeps
//! the old epoch (counted, logged at most once per class per 10 s).
//!
//! The last epoch learnt is kept in shared data, where a root made later in
//! this process (a reload, a restarted VM) starts from it.

use std::cell::RefCell;

use ratelimit_core::admin::epoch::{self, Polled, Poller};

use ratelimit_core::hash::KeyHash;
use ratelimit_core::webdis::BackendError;

use crate::filter::Filter;
use crate::host::{self, LOG_INFO};
use crate::metrics::{EPOCH_CHANGES, EPOCH_POLLS, EPOCH_POLL_FAILURES};
use crate::shared_store::{table_prefix, with_slot_key};
use crate::webdis_store::{call_nonce, WebdisStore};

#[derive(Default)]
pub struct EpochPoll {
    poller: RefCell<Poller>,
    /// The shared-data key of the process's last epoch.
    shared_key: RefCell<Vec<u8>>,
}

impl EpochPoll {
    /// Polls every `admin_sync_ms` of the store, except in the admin
    /// plugin, which never reads the deny cache; starts from the epoch the
    /// process last learnt.
    pub fn open(&self, filter: &Filter, webdis: &WebdisStore) {
        let every = match filter.policy.admin {
            Some(_) => 0,
            None => webdis.admin_sync_ms(),
        };
        let key = with_slot_key(
            &table_prefix(filter.plugin_name(), "epoch"),
            0,
            <[u8]>::to_vec,
        );
        let last = host::get_shared_data(&key)
            .ok()
            .flatten()
            .and_then(|(bytes, _)| bytes.get(..8)?.try_into().ok())
            .map_or(0, u64::from_le_bytes);
        *self.poller.borrow_mut() = Poller::new(every, last);
        *self.shared_key.borrow_mut() = key;
    }

    /// `key` as the deny cache files it under this worker's epoch.
    pub fn cache_key(&self, key: KeyHash) -> KeyHash {
        self.poller.borrow().cache_key(key)
    }

    /// Where to remember an answer to a call sent at `sent_at`, if at all.
    pub fn remembered_key(&self, key: KeyHash, sent_at: u64) -> Option<KeyHash> {
        self.poller.borrow().remembered_key(key, sent_at)
    }

    pub fn outstanding(&self) -> usize {
        self.poller.borrow().outstanding()
    }

    /// Sends the poll if it is due at `now` (from the root's tick).
    pub fn send(&self, filter: &Filter, webdis: &WebdisStore, now: u64) {
        if !self.poller.borrow().due(now) {
            return;
        }
        let nonce = call_nonce(now);
        filter.metrics.epoch(EPOCH_POLLS);
        let path = epoch::path(nonce, webdis.epoch_key());
        match webdis.dispatch(&path, webdis.call_timeout_ms()) {
            Ok(token) => self.poller.borrow_mut().sent(token, nonce, now),
            Err(status) => {
                self.poller.borrow_mut().not_sent(now);
                failed(filter, &webdis.refused(status));
            }
        }
    }

    /// The answer to `token`, if it is the poll's (`false` if not).
    pub fn answered(&self, filter: &Filter, token: u32, status: Option<u32>, body: &[u8]) -> bool {
        let now = host::now_nanos().unwrap_or(0);
        let polled = self.poller.borrow_mut().answered(token, status, body, now);
        match polled {
            None => return false,
            Some(Polled::Read { changed: false, .. }) => {}
            Some(Polled::Read { epoch, .. }) => {
                filter.metrics.epoch(EPOCH_CHANGES);
                // For roots made later; a lost write only makes one start
                // from an older epoch, whose first poll corrects it.
                let _ = host::set_shared_data(&self.shared_key.borrow(), &epoch.to_le_bytes(), 0);
                host::log(
                    LOG_INFO,
                    &format!(
                        "plugin '{}': admin epoch {epoch} (an operator's reset or grant): denials cached before no longer apply",
                        filter.plugin_name()
                    ),
                );
            }
            Some(Polled::Failed(error)) => failed(filter, &error),
        }
        true
    }
}

/// A poll that failed: counted, and logged like the other backend failures
/// (the class first, so that the line reads as theirs do).
fn failed(filter: &Filter, error: &BackendError) {
    filter.metrics.epoch(EPOCH_POLL_FAILURES);
    filter.log_backend_error(&BackendError::new(
        error.class,
        error.transient,
        format!("{} (admin epoch poll; the old epoch stays)", error.detail),
    ));
}
