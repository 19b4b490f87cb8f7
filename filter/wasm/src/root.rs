//! The root context: turns the plugin configuration into a [`Filter`] once,
//! in `on_configure`, and hands it to every request.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;
use ratelimit_core::slots::SlotTable;
use ratelimit_core::Policy;

use crate::host::{self, LOG_CRITICAL, LOG_INFO};
use crate::http::Request;
use crate::metrics::Metrics;
use crate::shared_store::{slot_prefix, SharedStore};

/// Everything a request needs, built once per configuration.
pub struct Filter {
    pub policy: Policy,
    pub table: Option<SlotTable>,
    pub slot_prefix: Vec<u8>,
    pub metrics: Metrics,
}

#[derive(Default)]
pub struct Root {
    filter: Option<Rc<Filter>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        match configure() {
            Ok(filter) => {
                self.filter = Some(Rc::new(filter));
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

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request::new(self.filter.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Envoy already prefixes the log line with the VM and root ids; the
/// messages name the plugin, since several may share one VM.
fn configure() -> Result<Filter, String> {
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
    let metrics = Metrics::define(&plugin_name)
        .map_err(|s| fail(format!("cannot define metrics (host status {})", s.0)))?;
    let prefix = slot_prefix(&plugin_name);
    let table = policy.slot_table();
    if let Some(table) = table {
        let store = SharedStore::new(&prefix);
        for slot in 0..table.slots() {
            store.ensure(slot).map_err(|s| {
                fail(format!(
                    "cannot create shared-data slot {slot} (host status {})",
                    s.0
                ))
            })?;
        }
    }
    host::log(
        LOG_INFO,
        &format!(
            "plugin '{plugin_name}' configured: {} limit set(s), {} slot(s)",
            policy.sets.len(),
            table.map_or(0, |t| t.slots())
        ),
    );
    Ok(Filter {
        policy,
        table,
        slot_prefix: prefix,
        metrics,
    })
}
