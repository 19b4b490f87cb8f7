//! The root context, one per worker: turns the plugin configuration into a
//! [`Filter`] once, in `on_configure`, hands it to every request, and owns
//! the worker's webdis calls ([`Callouts`]).

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

use crate::callouts::Callouts;
use crate::filter::{self, Filter, Store};
use crate::host::{self, LOG_CRITICAL, LOG_WARN};
use crate::http::Request;
use crate::metrics::{TICK_MILLIS, WATCHDOG_TICK_MILLIS};
use crate::webdis_store::WebdisStore;

pub struct Root {
    context_id: u32,
    filter: Option<Rc<Filter>>,
    callouts: Rc<Callouts>,
}

impl Root {
    pub fn new(context_id: u32) -> Root {
        Root {
            context_id,
            filter: None,
            callouts: Rc::default(),
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
            self.callouts
                .on_answer(filter, webdis, token_id, num_headers, body_size);
        }
    }

    fn on_done(&mut self) -> bool {
        if let Some((filter, webdis)) = self.webdis() {
            self.callouts.send_settlements(filter, webdis);
        }
        self.callouts.may_close()
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let configured = filter::configure().and_then(|filter| {
            if let Store::Webdis(webdis) = &filter.store {
                self.callouts
                    .open(self.context_id, &filter, webdis)
                    .map_err(|e| format!("plugin '{}': {e}", filter.plugin_name()))?;
            }
            Ok(filter)
        });
        match configured {
            Ok(filter) => {
                // In global mode the tick also ends requests queued past
                // their deadline, so it is shorter.
                let tick = match filter.store {
                    Store::Webdis(_) => WATCHDOG_TICK_MILLIS,
                    Store::Local { .. } => TICK_MILLIS,
                };
                self.filter = Some(Rc::new(filter));
                if let Err(status) = host::set_tick_period(tick) {
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
        if let Some((filter, webdis)) = self.webdis() {
            self.callouts.on_tick(filter, webdis);
        }
        if let Some(filter) = &self.filter {
            filter.on_tick();
        }
    }

    fn on_queue_ready(&mut self, _queue_id: u32) {
        if let Some((filter, webdis)) = self.webdis() {
            self.callouts.on_queue_ready(filter, webdis);
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request::new(
            self.filter.clone(),
            self.callouts.clone(),
            context_id,
        )))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
