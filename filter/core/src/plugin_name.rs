//! The plugin's stable name: what its metrics, shared-data keys, call queues
//! and default Redis key prefix are named after.
//!
//! Envoy hands the filter the wasm filter's `name`. Istio up to 1.29 sets it
//! to `<namespace>.<name>`; from 1.30, WasmPlugins become hidden
//! TrafficExtensions named `<namespace>.<name>~istio-translated-wasmplugin`.
//! Dropping the `~...` suffix keeps stat names the same and counters shared
//! across an Istio upgrade.

/// Used when Envoy gives no name (or only a suffix).
pub const DEFAULT: &str = "apikey_ratelimit";

/// `name` up to its first `~`; [`DEFAULT`] when that is empty.
pub fn stable(name: &str) -> &str {
    match name.split('~').next() {
        Some(stem) if !stem.is_empty() => stem,
        _ => DEFAULT,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_suffixes_are_dropped_so_names_survive_an_upgrade() {
        assert_eq!(stable("ns.api"), "ns.api");
        assert_eq!(stable("ns.api~istio-translated-wasmplugin"), "ns.api");
        assert_eq!(stable("ns.api~a~b"), "ns.api");
        assert_eq!(stable("api"), "api");
    }

    #[test]
    fn a_missing_name_falls_back_to_the_default() {
        assert_eq!(stable(""), DEFAULT);
        assert_eq!(stable("~istio-translated-wasmplugin"), DEFAULT);
    }
}
