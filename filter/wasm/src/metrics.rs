//! The filter's counters, one per `ratelimit_core::Event`, visible in
//! Envoy's `/stats` as `wasmcustom.apikey_ratelimit.<plugin>.<event>`.

use ratelimit_core::{Event, Events};

use crate::host::{self, Status};

pub struct Metrics {
    ids: [u32; Event::ALL.len()],
}

impl Metrics {
    pub fn define(plugin_name: &str) -> Result<Metrics, Status> {
        let prefix = format!("apikey_ratelimit.{}.", sanitize(plugin_name));
        let mut ids = [0; Event::ALL.len()];
        for (id, event) in ids.iter_mut().zip(Event::ALL) {
            *id = host::define_counter(&format!("{prefix}{}", event.metric_name()))?;
        }
        Ok(Metrics { ids })
    }

    pub fn record(&self, events: Events) {
        for event in events.iter() {
            if let Some(id) = self.ids.get(event as usize) {
                host::increment_metric(*id, 1);
            }
        }
    }
}

/// Stat names are dot-separated; keep a plugin name to one clean segment
/// (Istio names plugins `<namespace>.<name>`).
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}
