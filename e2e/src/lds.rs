//! A listener served from a file (LDS), so a test can hand a running Envoy a
//! new plugin configuration the way a control plane does: Envoy watches the
//! file's directory and applies (or rejects) each version written.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tempfile::TempDir;

use crate::envoy_config::EnvoyConfig;
use crate::ports::free_port;
use crate::process::new_dir;
use crate::Error;

const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// The HTTP filter that runs the plugin in the shipped configs.
pub const FILTER: &str = "apikey_ratelimit";

/// Envoy arguments for dynamic resources, LDS or ECDS (they need a node), with a
/// replaced listener drained in a second.
pub const ARGS: [&str; 8] = [
    "--service-node",
    "test",
    "--service-cluster",
    "test",
    "--drain-time-s",
    "1",
    "--drain-strategy",
    "immediate",
];

pub struct FileListener {
    listener: Value,
    path: PathBuf,
    port: u16,
    _dir: TempDir,
}

impl FileListener {
    /// Moves `config`'s first listener, the filter with it, to a file on a
    /// fresh port; the static listener stays, without the filter, and
    /// `config` reads its listeners from the file. Write a version before
    /// starting Envoy.
    pub fn take(config: &mut EnvoyConfig) -> Result<FileListener, Error> {
        let mut listener = config.json()["static_resources"]["listeners"][0].clone();
        let port = free_port();
        listener["name"] = "dynamic".into();
        listener["address"]["socket_address"]["port_value"] = port.into();
        listener["@type"] = LISTENER_TYPE.into();
        config.remove_http_filter(FILTER)?;
        let dir = new_dir("lds").map_err(|e| Error::new(format!("lds dir: {e}")))?;
        let path = dir.path().join("lds.json");
        config.json_mut()["dynamic_resources"] = json!({
            "lds_config": {"path_config_source": {"path": path}, "resource_api_version": "V3"}
        });
        Ok(FileListener {
            listener,
            path,
            port,
            _dir: dir,
        })
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Writes a new version of the listener, `edit` applied to the plugin's
    /// `config` (its `name`, `configuration`, `vm_config`). Written aside and
    /// renamed, as Envoy expects.
    pub fn write(&self, edit: impl Fn(&mut Value)) -> Result<(), Error> {
        let mut listener = self.listener.clone();
        for f in plugin_filters(&mut listener) {
            edit(&mut f["typed_config"]["config"]);
        }
        replace_file(&self.path, &json!({ "resources": [listener] }))
    }

    /// Writes the listener with this plugin configuration (JSON).
    pub fn write_plugin_config(&self, plugin: &str) -> Result<(), Error> {
        self.write(|config| config["configuration"]["value"] = plugin.into())
    }
}

/// Writes `resources` to `path` aside and renames it there: Envoy watches
/// the directory for the rename, and never reads half a file.
pub fn replace_file(path: &Path, resources: &Value) -> Result<(), Error> {
    let tmp = path.with_extension("tmp");
    let io = |e: std::io::Error| Error::new(format!("{}: {e}", path.display()));
    std::fs::write(&tmp, resources.to_string()).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// The plugin's HTTP filters in `listener`.
pub fn plugin_filters(listener: &mut Value) -> impl Iterator<Item = &mut Value> {
    listener["filter_chains"]
        .as_array_mut()
        .into_iter()
        .flatten()
        .filter_map(|c| c["filters"].as_array_mut())
        .flatten()
        .filter_map(|f| f["typed_config"]["http_filters"].as_array_mut())
        .flatten()
        .filter(|f| f["name"] == FILTER)
}
