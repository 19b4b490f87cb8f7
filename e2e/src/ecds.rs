//! The plugin's filter config served from a file (ECDS), the way istiod
//! delivers a WasmPlugin: the listener names the filter, and each version of
//! its config arrives on its own, applied or rejected by Envoy.

use std::path::PathBuf;

use serde_json::{json, Value};
use tempfile::TempDir;

use crate::envoy_config::EnvoyConfig;
use crate::lds::{plugin_filters, replace_file, FILTER};
use crate::process::new_dir;
use crate::Error;

const CONFIG_TYPE: &str = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
const WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";

pub struct FileFilter {
    /// The filter's `typed_config` as the shipped config had it.
    typed_config: Value,
    path: PathBuf,
    _dir: TempDir,
}

impl FileFilter {
    /// Replaces the plugin's filter in `config` by a discovered one, read
    /// from a file, with no default config (as istiod sends it). Write a
    /// version before starting Envoy.
    pub fn take(config: &mut EnvoyConfig) -> Result<FileFilter, Error> {
        let dir = new_dir("ecds").map_err(|e| Error::new(format!("ecds dir: {e}")))?;
        let path = dir.path().join("ecds.json");
        let mut typed_config = None;
        for filter in http_filters(config.json_mut()) {
            typed_config = Some(filter["typed_config"].take());
            *filter = json!({
                "name": FILTER,
                "config_discovery": {
                    "config_source": {
                        "path_config_source": {"path": path},
                        "resource_api_version": "V3"
                    },
                    "type_urls": [WASM_TYPE]
                }
            });
        }
        let typed_config =
            typed_config.ok_or_else(|| Error::new(format!("no http filter named `{FILTER}`")))?;
        Ok(FileFilter {
            typed_config,
            path,
            _dir: dir,
        })
    }

    /// Writes a new version of the filter's config, `edit` applied to the
    /// plugin's `config` (its `name`, `configuration`, `vm_config`).
    pub fn write(&self, edit: impl Fn(&mut Value)) -> Result<(), Error> {
        let mut typed_config = self.typed_config.clone();
        edit(&mut typed_config["config"]);
        let resource = json!({
            "@type": CONFIG_TYPE,
            "name": FILTER,
            "typed_config": typed_config
        });
        replace_file(&self.path, &json!({ "resources": [resource] }))
    }
}

/// The plugin's HTTP filters in every static listener.
fn http_filters(config: &mut Value) -> impl Iterator<Item = &mut Value> {
    config["static_resources"]["listeners"]
        .as_array_mut()
        .into_iter()
        .flatten()
        .flat_map(plugin_filters)
}
