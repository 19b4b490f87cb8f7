//! The root context: turns the plugin configuration into a [`Filter`] once,
//! in `on_configure`, and hands it to every request.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;
use ratelimit_core::slots::SlotTable;
use ratelimit_core::webdis::{BackendError, FailureClass};
use ratelimit_core::{Event, Events, Policy};

use crate::host::{self, LOG_CRITICAL, LOG_ERROR, LOG_INFO, LOG_WARN};
use crate::http::Request;
use crate::log_limit::LogLimit;
use crate::metrics::{Metrics, TICK_MILLIS};
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
    plugin_name: String,
    /// Where the process's hash seed is kept in shared data.
    seed_key: Vec<u8>,
    backend_logs: LogLimit<6>,
    shadow_logs: LogLimit<3>,
}

impl Filter {
    /// Logs a failed backend call, at most once per class per 10 s.
    pub fn log_backend_error(&self, error: &BackendError) {
        let index = match error.class {
            FailureClass::Dispatch => 0,
            FailureClass::Transport => 1,
            FailureClass::Timeout => 2,
            FailureClass::Status => 3,
            FailureClass::Redis => 4,
            FailureClass::Parse => 5,
        };
        if !self
            .backend_logs
            .allow(index, host::now_nanos().unwrap_or(0))
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
}

impl Filter {
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

pub struct Root {
    context_id: u32,
    filter: Option<Rc<Filter>>,
}

impl Root {
    pub fn new(context_id: u32) -> Root {
        Root {
            context_id,
            filter: None,
        }
    }

    fn webdis(&self) -> Option<(&Filter, &WebdisStore)> {
        let filter = self.filter.as_deref()?;
        match &filter.store {
            Store::Webdis(webdis) => Some((filter, webdis)),
            Store::Local { .. } => None,
        }
    }
}

/// The webdis calls are the root's (`callouts.rs`).
impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        if let Some((filter, webdis)) = self.webdis() {
            webdis
                .callouts
                .on_answer(filter, webdis, token_id, num_headers, body_size);
        }
    }

    fn on_done(&mut self) -> bool {
        self.webdis()
            .is_none_or(|(_, webdis)| webdis.callouts.may_close())
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        match configure(self.context_id) {
            Ok(filter) => {
                self.filter = Some(Rc::new(filter));
                if let Err(status) = host::set_tick_period(TICK_MILLIS) {
                    host::log(
                        LOG_WARN,
                        &format!(
                            "no tick (host status {}): metrics flush only on requests",
                            status.0
                        ),
                    );
                }
                true
            }
            Err(reason) => {
                // At start-up Envoy exits on `false`; on a live update it keeps
                // the previous configuration. Either way, say why.
                host::log(LOG_CRITICAL, &reason);
                false
            }
        }
    }

    fn on_tick(&mut self) {
        if let Some(filter) = &self.filter {
            filter.metrics.flush(host::now_nanos().unwrap_or(0));
            if let Some(stored) = seed::refresh(&filter.seed_key, filter.policy.hasher()) {
                filter.policy.reseed(stored);
                host::log(
                    LOG_WARN,
                    &format!(
                        "plugin '{}': adopted the process's stored hash seed",
                        filter.plugin_name
                    ),
                );
            }
        }
    }

    fn on_queue_ready(&mut self, _queue_id: u32) {
        if let Some((filter, webdis)) = self.webdis() {
            webdis.callouts.on_queue_ready(filter, webdis);
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request::new(self.filter.clone(), context_id)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Envoy already prefixes the log line with the VM and root ids; the
/// messages name the plugin, since several may share one VM.
fn configure(root_id: u32) -> Result<Filter, String> {
    let plugin_name = host::property(&["plugin_name"])
        .ok()
        .flatten()
        .and_then(|name| String::from_utf8(name).ok())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "apikey_ratelimit".to_string());
    let fail = |what: String| format!("plugin '{plugin_name}': {what}");
    let bytes = host::plugin_configuration().map_err(|s| {
        fail(format!(
            "cannot read the plugin configuration (host status {})",
            s.0
        ))
    })?;
    let policy = Policy::from_json(&bytes).map_err(|e| fail(e.to_string()))?;
    let seed_key = with_slot_key(&table_prefix(&plugin_name, "seed"), 0, <[u8]>::to_vec);
    policy.reseed(seed::load_or_create(&seed_key).map_err(fail)?);
    let metrics = Metrics::define(&plugin_name)
        .map_err(|s| fail(format!("cannot define metrics (host status {})", s.0)))?;
    let (store, described) = match (policy.slot_table(), policy.webdis()) {
        (_, Some(webdis)) => (
            {
                let store = WebdisStore::new(webdis, &plugin_name);
                store.callouts.open(root_id, &plugin_name).map_err(fail)?;
                Store::Webdis(store)
            },
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
            "plugin '{plugin_name}' configured: {} limit set(s), {described}",
            policy.sets.len()
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
