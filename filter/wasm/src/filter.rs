//! What one plugin configuration becomes: the compiled policy, the store
//! its counters live in, the metrics, and the logs that must not flood.
//! Built once, in the root context's `on_configure` ([`configure`]), and
//! shared by every request of that root.

use ratelimit_core::pipeline::StoreFailure;
use ratelimit_core::slots::SlotTable;
use ratelimit_core::webdis::{BackendError, FailureClass};
use ratelimit_core::{plugin_name, Event, Events, Policy};

use crate::host::{self, LOG_ERROR, LOG_INFO, LOG_WARN};
use crate::log_limit::LogLimit;
use crate::metrics::Metrics;
use crate::seed;
use crate::shared_store::{table_prefix, with_slot_key, SharedStore};
use crate::webdis_store::WebdisStore;

/// Where the counters live.
pub enum Store {
    Local { table: SlotTable, prefix: Vec<u8> },
    Webdis(WebdisStore),
}

/// Everything a request needs, built once per configuration.
pub struct Filter {
    pub policy: Policy,
    pub store: Store,
    pub metrics: Metrics,
    /// The stable name (`ratelimit_core::plugin_name::stable`).
    plugin_name: String,
    /// Where the process's hash seed is kept in shared data.
    seed_key: Vec<u8>,
    backend_logs: LogLimit<{ FailureClass::ALL.len() }>,
    shadow_logs: LogLimit<3>,
}

impl Filter {
    pub fn plugin_name(&self) -> &str {
        &self.plugin_name
    }

    /// The wall clock, when a quota needs it (`Ok(None)` when no limit of
    /// the policy is a quota: one host call fewer).
    pub fn wall_clock(&self) -> Result<Option<u64>, host::Status> {
        match self.policy.has_quotas() {
            true => host::wall_nanos().map(Some),
            false => Ok(None),
        }
    }

    /// A failed backend call as the pipeline's store failure, logged.
    pub fn backend_failure(&self, error: &BackendError) -> StoreFailure {
        self.log_backend_error(error);
        StoreFailure::Backend(error.class)
    }

    /// Logs a failed backend call, at most once per class per 10 s.
    pub fn log_backend_error(&self, error: &BackendError) {
        if !self
            .backend_logs
            .allow(error.class.index(), host::now_nanos().unwrap_or(0))
        {
            return;
        }
        let level = if error.transient { LOG_WARN } else { LOG_ERROR };
        host::log(
            level,
            &format!(
                "plugin '{}': rate-limit backend failed ({:?}): {}; failure_mode {:?} applies",
                self.plugin_name, error.class, error.detail, self.policy.failure_mode
            ),
        );
    }

    /// The root's tick: hands the gathered counts to Envoy, and adopts the
    /// process's stored hash seed if another VM stored a different one.
    pub fn on_tick(&self) {
        self.metrics.flush(host::now_nanos().unwrap_or(0));
        if let Some(stored) = seed::refresh(&self.seed_key, self.policy.hasher()) {
            self.policy.reseed(stored);
            host::log(
                LOG_WARN,
                &format!(
                    "plugin '{}': adopted the process's stored hash seed",
                    self.plugin_name
                ),
            );
        }
    }

    /// Says, at most once per cause every 10 s, that shadow mode let through
    /// a request it would have denied for a reason other than its rate.
    pub fn log_shadow(&self, events: Events) {
        let causes = [
            (Event::ShadowMissingKey, "a request without an API key"),
            (Event::ShadowInvalidKey, "a request with an invalid API key"),
            (
                Event::ShadowFailureDenied,
                "a request that failure_mode deny would have answered 503",
            ),
        ];
        for (index, (event, what)) in causes.iter().enumerate() {
            if events.contains(*event)
                && self
                    .shadow_logs
                    .allow(index, host::now_nanos().unwrap_or(0))
            {
                host::log(
                    LOG_INFO,
                    &format!(
                        "plugin '{}': shadow mode let through {what} (metric {})",
                        self.plugin_name,
                        event.metric_name()
                    ),
                );
            }
        }
    }
}

/// Envoy already prefixes the log line with the VM and root ids; the
/// messages name the plugin (its stable name), since several may share one
/// VM.
pub fn configure() -> Result<Filter, String> {
    // Metrics, shared data, queues and Redis keys all follow this one name,
    // the same under Istio 1.29's and 1.30's names for the plugin.
    let raw_name = host::property(&["plugin_name"])
        .ok()
        .flatten()
        .and_then(|name| String::from_utf8(name).ok())
        .unwrap_or_default();
    let plugin_name = plugin_name::stable(&raw_name).to_string();
    let fail = |what: String| format!("plugin '{plugin_name}': {what}");
    let bytes = host::plugin_configuration().map_err(|s| {
        fail(format!(
            "cannot read the plugin configuration (host status {})",
            s.0
        ))
    })?;
    let policy = Policy::from_json(&bytes).map_err(|e| fail(e.to_string()))?;
    for warning in &policy.warnings {
        host::log(
            LOG_WARN,
            &format!("plugin '{plugin_name}': configuration: {warning}"),
        );
    }
    let seed_key = with_slot_key(&table_prefix(&plugin_name, "seed"), 0, <[u8]>::to_vec);
    policy.reseed(seed::load_or_create(&seed_key).map_err(fail)?);
    let metrics = Metrics::define(&plugin_name, &policy)
        .map_err(|s| fail(format!("cannot define metrics (host status {})", s.0)))?;
    let (store, described) = match (policy.slot_table(), policy.webdis()) {
        (_, Some(webdis)) => (
            Store::Webdis(WebdisStore::new(webdis, &plugin_name)),
            format!(
                "webdis store on cluster '{}', timeout {} ms, failure mode {:?}",
                webdis.cluster, webdis.timeout_ms, policy.failure_mode
            ),
        ),
        (Some(table), None) => {
            let prefix = table_prefix(&plugin_name, "slot");
            let slots = SharedStore::new(&prefix);
            for slot in 0..table.slots() {
                slots.ensure(slot).map_err(|s| {
                    fail(format!(
                        "cannot create shared-data slot {slot} (host status {})",
                        s.0
                    ))
                })?;
            }
            let described = format!("local store, {} slots", table.slots());
            (Store::Local { table, prefix }, described)
        }
        (None, None) => return Err(fail("no store configured".into())),
    };
    host::log(
        LOG_INFO,
        &format!(
            "plugin '{plugin_name}' configured: {} plan(s), {} rule(s), {} registered key(s), {described}",
            policy.plans.len(),
            policy.rules.len(),
            policy.registered_keys()
        ),
    );
    Ok(Filter {
        policy,
        store,
        metrics,
        plugin_name,
        seed_key,
        backend_logs: LogLimit::default(),
        shadow_logs: LogLimit::default(),
    })
}
