//! [`EnvoyConfig`]: an Envoy bootstrap config loaded from a shipped file, edited as a
//! tree, and written for a run ([`crate::envoy::Envoy`] runs it).
//!
//! Tests run the very YAML files that ship in `envoy/`, changing only ports, paths and
//! the plugin configuration, through structured setters that walk the config tree
//! (never string replacement) and fail with the path they could not find.

use crate::paths;
use crate::ports::free_port;
use crate::Error;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

/// `@type` suffix of the Wasm HTTP filter's config.
const WASM_TYPE: &str = "envoy.extensions.filters.http.wasm.v3.Wasm";
/// `@type` suffix of the HTTP connection manager's config.
const HCM_TYPE: &str =
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const STRING_VALUE_TYPE: &str = "type.googleapis.com/google.protobuf.StringValue";

/// An Envoy bootstrap config as a JSON tree.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvoyConfig {
    root: Value,
}

/// A located node: its JSON pointer (for `pointer_mut`) and a dotted path (for humans).
#[derive(Debug, Clone)]
struct Loc {
    ptr: String,
    dotted: String,
}

impl Loc {
    fn root() -> Self {
        Loc {
            ptr: String::new(),
            dotted: String::new(),
        }
    }

    fn key(&self, k: &str) -> Self {
        Loc {
            ptr: format!("{}/{}", self.ptr, k.replace('~', "~0").replace('/', "~1")),
            dotted: if self.dotted.is_empty() {
                k.to_owned()
            } else {
                format!("{}.{k}", self.dotted)
            },
        }
    }

    fn index(&self, i: usize) -> Self {
        Loc {
            ptr: format!("{}/{i}", self.ptr),
            dotted: format!("{}[{i}]", self.dotted),
        }
    }
}

impl EnvoyConfig {
    /// Parses a YAML (or JSON) config file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error(format!("cannot read {}: {e}", path.display())))?;
        Self::from_yaml(&text).map_err(|e| Error(format!("{}: {e}", path.display())))
    }

    /// Parses YAML (JSON is YAML too).
    pub fn from_yaml(text: &str) -> Result<Self, Error> {
        let root: Value =
            serde_norway::from_str(text).map_err(|e| Error(format!("invalid YAML: {e}")))?;
        if !root.is_object() {
            return Err(Error("the config is not a mapping".into()));
        }
        Ok(EnvoyConfig { root })
    }

    /// A shipped config made ready for a test: fresh admin and listener ports, and the
    /// filter's `.wasm` at its absolute build path ([`paths::wasm_path_unchecked`]; a
    /// missing file is reported by [`crate::envoy::Envoy::start`]). Upstream clusters are the
    /// caller's to point. Panics (it is a test helper) if the config lacks an admin
    /// address or a listener.
    pub fn for_test(shipped: impl AsRef<Path>) -> Self {
        let shipped = shipped.as_ref();
        let r = (|| {
            let mut cfg = Self::load(shipped)?;
            cfg.set_admin_port(free_port())?;
            let names = cfg.listener_names();
            if names.is_empty() {
                return Err(Error("static_resources.listeners: none".into()));
            }
            for name in names {
                cfg.set_listener_port(&name, free_port())?;
            }
            if !cfg.wasm_filters().is_empty() {
                cfg.set_wasm_filename(&paths::wasm_path_unchecked())?;
            }
            Ok::<_, Error>(cfg)
        })();
        r.unwrap_or_else(|e| panic!("EnvoyConfig::for_test({}): {e}", shipped.display()))
    }

    pub fn json(&self) -> &Value {
        &self.root
    }

    /// The raw tree, for edits no setter covers.
    pub fn json_mut(&mut self) -> &mut Value {
        &mut self.root
    }

    /// The config as pretty JSON, which Envoy reads from a `.json` file.
    pub fn to_json_string(&self) -> String {
        serde_json::to_string_pretty(&self.root).unwrap_or_default()
    }

    /// Writes the config as JSON (give the file a `.json` name: Envoy picks the
    /// parser by extension).
    pub fn write(&self, path: impl AsRef<Path>) -> Result<(), Error> {
        let path = path.as_ref();
        std::fs::write(path, self.to_json_string())
            .map_err(|e| Error(format!("cannot write {}: {e}", path.display())))
    }

    pub fn admin_port(&self) -> Option<u16> {
        port_of(
            self.root
                .pointer("/admin/address/socket_address/port_value"),
        )
    }

    pub fn set_admin_port(&mut self, port: u16) -> Result<(), Error> {
        let sa = self.walk_mut(&Loc::root(), &["admin", "address", "socket_address"])?;
        set_key(sa, "port_value", json!(port));
        Ok(())
    }

    /// Names of `static_resources.listeners`, in order.
    pub fn listener_names(&self) -> Vec<String> {
        self.root
            .pointer("/static_resources/listeners")
            .and_then(Value::as_array)
            .map(|ls| {
                ls.iter()
                    .filter_map(|l| l.get("name")?.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The port of listener `name`.
    pub fn listener_port(&self, name: &str) -> Option<u16> {
        let loc = self.named(&["static_resources", "listeners"], name).ok()?;
        port_of(
            self.root
                .pointer(&format!("{}/address/socket_address/port_value", loc.ptr)),
        )
    }

    /// The first listener's name and port.
    pub fn first_listener(&self) -> Option<(String, u16)> {
        let name = self.listener_names().into_iter().next()?;
        let port = self.listener_port(&name)?;
        Some((name, port))
    }

    pub fn set_listener_port(&mut self, name: &str, port: u16) -> Result<(), Error> {
        let loc = self.named(&["static_resources", "listeners"], name)?;
        let sa = self.walk_mut(&loc, &["address", "socket_address"])?;
        set_key(sa, "port_value", json!(port));
        Ok(())
    }

    /// Points every endpoint of static cluster `cluster` at `host:port`.
    pub fn set_cluster_endpoint(
        &mut self,
        cluster: &str,
        host: &str,
        port: u16,
    ) -> Result<(), Error> {
        let loc = self.named(&["static_resources", "clusters"], cluster)?;
        let eps = loc.key("load_assignment").key("endpoints");
        let groups = self
            .walk(&loc, &["load_assignment", "endpoints"])?
            .as_array()
            .map_or(0, Vec::len);
        let mut set = 0;
        for g in 0..groups {
            let lbs = eps.index(g);
            let n = self
                .walk(&lbs, &["lb_endpoints"])?
                .as_array()
                .map_or(0, Vec::len);
            for i in 0..n {
                let ep = lbs.key("lb_endpoints").index(i);
                let sa = self.walk_mut(&ep, &["endpoint", "address", "socket_address"])?;
                set_key(sa, "address", json!(host));
                set_key(sa, "port_value", json!(port));
                set += 1;
            }
        }
        if set == 0 {
            return Err(Error(format!(
                "{}: no lb_endpoints to point at {host}:{port}",
                eps.dotted
            )));
        }
        Ok(())
    }

    /// Points every `socket_address` in the config (listeners, admin,
    /// cluster endpoints) at `host`, keeping the ports: how a config written
    /// for containers (0.0.0.0, service names) is run on loopback.
    pub fn set_all_addresses(&mut self, host: &str) {
        fn walk(v: &mut Value, host: &str) {
            match v {
                Value::Object(map) => {
                    if let Some(Value::Object(sa)) = map.get_mut("socket_address") {
                        sa.insert("address".into(), json!(host));
                    }
                    for child in map.values_mut() {
                        walk(child, host);
                    }
                }
                Value::Array(items) => items.iter_mut().for_each(|i| walk(i, host)),
                _ => {}
            }
        }
        walk(&mut self.root, host);
    }

    /// Makes static cluster `cluster` hold exactly these endpoints, each a copy
    /// of its first endpoint with the address changed (the front proxy's
    /// replicas).
    pub fn set_cluster_endpoints(
        &mut self,
        cluster: &str,
        endpoints: &[(&str, u16)],
    ) -> Result<(), Error> {
        let loc = self.named(&["static_resources", "clusters"], cluster)?;
        let lbs = loc.key("load_assignment").key("endpoints").index(0);
        let template = self
            .walk(&lbs, &["lb_endpoints"])?
            .as_array()
            .and_then(|a| a.first().cloned())
            .ok_or_else(|| Error(format!("{}.lb_endpoints: empty", lbs.dotted)))?;
        let mut list = Vec::with_capacity(endpoints.len());
        for (host, port) in endpoints {
            let mut ep = template.clone();
            let sa = ep
                .pointer_mut("/endpoint/address/socket_address")
                .ok_or_else(|| {
                    Error(format!(
                        "{}: no endpoint.address.socket_address",
                        lbs.dotted
                    ))
                })?;
            set_key(sa, "address", json!(host));
            set_key(sa, "port_value", json!(port));
            list.push(ep);
        }
        let group = self.walk_mut(&lbs, &[])?;
        set_key(group, "lb_endpoints", Value::Array(list));
        Ok(())
    }

    /// Sets `vm_config.code.local.filename` of every Wasm HTTP filter (made absolute).
    pub fn set_wasm_filename(&mut self, path: &Path) -> Result<(), Error> {
        let abs =
            std::path::absolute(path).map_err(|e| Error(format!("{}: {e}", path.display())))?;
        let filters = self.wasm_filters();
        if filters.is_empty() {
            return Err(Error(format!(
                "no http filter with @type …{WASM_TYPE} in the config"
            )));
        }
        for f in filters {
            let local = self.walk_mut(&f, &["config", "vm_config", "code", "local"])?;
            set_key(local, "filename", json!(abs.to_string_lossy()));
        }
        Ok(())
    }

    /// `vm_config.code.local.filename` of every Wasm HTTP filter.
    pub fn wasm_filenames(&self) -> Vec<PathBuf> {
        self.wasm_filters()
            .iter()
            .filter_map(|f| {
                let p = format!("{}/config/vm_config/code/local/filename", f.ptr);
                self.root.pointer(&p)?.as_str().map(PathBuf::from)
            })
            .collect()
    }

    /// The plugin configuration (`config.configuration.value`) of the first Wasm filter.
    pub fn plugin_config(&self) -> Result<String, Error> {
        let f = self.wasm_filters().into_iter().next().ok_or_else(|| {
            Error(format!(
                "no http filter with @type …{WASM_TYPE} in the config"
            ))
        })?;
        let v = self.walk(&f, &["config", "configuration", "value"])?;
        v.as_str().map(str::to_owned).ok_or_else(|| {
            Error(format!(
                "{}.config.configuration.value: not a string",
                f.dotted
            ))
        })
    }

    /// Sets the plugin configuration of every Wasm filter, as a `StringValue`. The text
    /// is not checked: tests give broken configs on purpose.
    pub fn set_plugin_config(&mut self, json: &str) -> Result<(), Error> {
        let filters = self.wasm_filters();
        if filters.is_empty() {
            return Err(Error(format!(
                "no http filter with @type …{WASM_TYPE} in the config"
            )));
        }
        for f in filters {
            let config = self.walk_mut(&f, &["config"])?;
            let Some(config) = config.as_object_mut() else {
                return Err(Error(format!("{}.config: not a mapping", f.dotted)));
            };
            let conf = config
                .entry("configuration")
                .or_insert_with(|| json!({ "@type": STRING_VALUE_TYPE }));
            set_key(conf, "value", json!(json));
        }
        Ok(())
    }

    /// Adds listener `name`, a copy of the first one on a free port whose
    /// plugin runs `plugin_json` (the admin API's listener: same plugin
    /// `name`, `root_id` and `vm_id` as the data plane's, so the same shared
    /// data). Call after [`EnvoyConfig::set_plugin_config`], which would
    /// overwrite it.
    pub fn add_listener_with_plugin(&mut self, name: &str, plugin_json: &str) -> Result<(), Error> {
        let listeners = self
            .root
            .pointer_mut("/static_resources/listeners")
            .and_then(Value::as_array_mut)
            .ok_or_else(|| Error("static_resources.listeners: not a list".into()))?;
        let mut listener = listeners
            .first()
            .cloned()
            .ok_or_else(|| Error("no listener to copy".into()))?;
        listener["name"] = name.into();
        listener["address"]["socket_address"]["port_value"] = free_port().into();
        let hcm = listener
            .pointer_mut("/filter_chains/0/filters/0/typed_config")
            .ok_or_else(|| Error("the first listener has no HTTP connection manager".into()))?;
        hcm["stat_prefix"] = name.into();
        let wasm = hcm
            .pointer_mut("/http_filters/0/typed_config/config")
            .ok_or_else(|| Error("the first HTTP filter is not the Wasm filter".into()))?;
        wasm["configuration"]["value"] = plugin_json.into();
        listeners.push(listener);
        Ok(())
    }

    /// Removes the HTTP filter named `name` from every HTTP connection manager.
    pub fn remove_http_filter(&mut self, name: &str) -> Result<(), Error> {
        let hcms = self.typed_configs(HCM_TYPE);
        let mut removed = 0;
        for h in &hcms {
            if let Some(fs) = self
                .root
                .pointer_mut(&format!("{}/http_filters", h.ptr))
                .and_then(Value::as_array_mut)
            {
                let before = fs.len();
                fs.retain(|f| f.get("name").and_then(Value::as_str) != Some(name));
                removed += before - fs.len();
            }
        }
        if removed == 0 {
            return Err(Error(format!(
                "no http filter named `{name}` in {} http connection manager(s)",
                hcms.len()
            )));
        }
        Ok(())
    }

    /// Locations of the `typed_config` of every Wasm HTTP filter.
    fn wasm_filters(&self) -> Vec<Loc> {
        self.typed_configs(WASM_TYPE)
    }

    /// Every object whose `@type` ends with `type_suffix`.
    fn typed_configs(&self, type_suffix: &str) -> Vec<Loc> {
        fn walk(v: &Value, loc: Loc, suffix: &str, out: &mut Vec<Loc>) {
            match v {
                Value::Object(m) => {
                    if m.get("@type")
                        .and_then(Value::as_str)
                        .is_some_and(|t| t.ends_with(suffix))
                    {
                        out.push(loc.clone());
                    }
                    for (k, child) in m {
                        walk(child, loc.key(k), suffix, out);
                    }
                }
                Value::Array(a) => {
                    for (i, child) in a.iter().enumerate() {
                        walk(child, loc.index(i), suffix, out);
                    }
                }
                _ => {}
            }
        }
        let mut out = Vec::new();
        walk(&self.root, Loc::root(), type_suffix, &mut out);
        out
    }

    /// The element of array `path` whose `name` is `name`.
    fn named(&self, path: &[&str], name: &str) -> Result<Loc, Error> {
        let arr_loc = path.iter().fold(Loc::root(), |l, k| l.key(k));
        let arr = self.walk(&Loc::root(), path)?;
        let items = arr
            .as_array()
            .ok_or_else(|| Error(format!("{}: not a list", arr_loc.dotted)))?;
        let names: Vec<&str> = items
            .iter()
            .filter_map(|i| i.get("name")?.as_str())
            .collect();
        items
            .iter()
            .position(|i| i.get("name").and_then(Value::as_str) == Some(name))
            .map(|i| arr_loc.index(i))
            .ok_or_else(|| {
                Error(format!(
                    "{}: no entry named `{name}` (there are: {})",
                    arr_loc.dotted,
                    names.join(", ")
                ))
            })
    }

    fn walk(&self, from: &Loc, keys: &[&str]) -> Result<&Value, Error> {
        let mut loc = from.clone();
        for k in keys {
            let next = loc.key(k);
            if self.root.pointer(&next.ptr).is_none() {
                return Err(Error(format!("{}: missing", next.dotted)));
            }
            loc = next;
        }
        self.root
            .pointer(&loc.ptr)
            .ok_or_else(|| Error(format!("{}: missing", loc.dotted)))
    }

    fn walk_mut(&mut self, from: &Loc, keys: &[&str]) -> Result<&mut Value, Error> {
        let loc = keys.iter().fold(from.clone(), |l, k| l.key(k));
        self.walk(from, keys)?;
        self.root
            .pointer_mut(&loc.ptr)
            .ok_or_else(|| Error(format!("{}: missing", loc.dotted)))
    }
}

fn port_of(v: Option<&Value>) -> Option<u16> {
    v?.as_u64()?.try_into().ok()
}

/// Sets `obj[key]`, turning a non-object into an empty object first.
fn set_key(obj: &mut Value, key: &str, v: Value) {
    if !obj.is_object() {
        *obj = Value::Object(Map::new());
    }
    if let Some(m) = obj.as_object_mut() {
        m.insert(key.to_owned(), v);
    }
}
