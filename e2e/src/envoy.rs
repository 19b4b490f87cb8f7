//! Envoy: a shipped config edited as a tree ([`EnvoyConfig`]), and a running Envoy
//! ([`Envoy`]) with its admin endpoint.
//!
//! Tests run the very YAML files that ship in `envoy/`, changing only ports, paths and
//! the plugin configuration, through structured setters that walk the config tree
//! (never string replacement) and fail with the path they could not find.

use crate::http::{self, Response};
use crate::paths;
use crate::ports::free_port;
use crate::process::{describe_status, new_dir, Proc};
use crate::Error;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

/// `@type` suffix of the Wasm HTTP filter's config.
const WASM_TYPE: &str = "envoy.extensions.filters.http.wasm.v3.Wasm";
/// `@type` suffix of the HTTP connection manager's config.
const HCM_TYPE: &str =
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const STRING_VALUE_TYPE: &str = "type.googleapis.com/google.protobuf.StringValue";

/// How long [`Envoy::start`] waits for `/ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// missing file is reported by [`Envoy::start`]). Upstream clusters are the
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

/// A running Envoy. Killed (SIGTERM, then SIGKILL) when dropped.
pub struct Envoy {
    proc: Proc,
    config: EnvoyConfig,
    admin_port: u16,
    listener_port: u16,
}

impl Envoy {
    /// Writes `cfg` into a fresh temp dir, runs the Envoy binary on it with
    /// `--concurrency workers --disable-hot-restart --log-level info`, and waits until
    /// the admin endpoint's `/ready` answers 200 ([`READY_TIMEOUT`]). If Envoy exits
    /// first, the error says how ("exited with code 1") and quotes its log.
    pub fn start(cfg: &EnvoyConfig, workers: u32) -> Result<Envoy, Error> {
        Self::start_with_args(cfg, workers, &[])
    }

    /// [`Envoy::start`] with extra command-line arguments (e.g.
    /// `["--component-log-level", "wasm:debug"]`; a `--log-level` here replaces ours).
    pub fn start_with_args(
        cfg: &EnvoyConfig,
        workers: u32,
        extra: &[&str],
    ) -> Result<Envoy, Error> {
        let admin_port = cfg
            .admin_port()
            .ok_or_else(|| Error("admin.address.socket_address.port_value: missing".into()))?;
        let (_, listener_port) = cfg
            .first_listener()
            .ok_or_else(|| Error("static_resources.listeners: no named listener".into()))?;
        // Say "run make build" rather than let Envoy fail on a missing .wasm.
        for f in cfg.wasm_filenames() {
            if !f.is_file() {
                paths::wasm_path()?;
                return Err(Error(format!(
                    "the config's .wasm {} does not exist",
                    f.display()
                )));
            }
        }
        let proc = spawn(cfg, workers, extra)?;
        let deadline = Instant::now() + READY_TIMEOUT;
        let admin = format!("127.0.0.1:{admin_port}");
        loop {
            if let Some(status) = proc.try_status() {
                return Err(proc.error(&format!(
                    "Envoy {} before it was ready",
                    describe_status(status)
                )));
            }
            let ready = http::Conn::connect_timeout(&admin, Duration::from_secs(1))
                .and_then(|mut c| c.request("GET", b"/ready", &[("Connection", b"close")]));
            if matches!(ready, Ok(Response { status: 200, .. })) {
                break;
            }
            if Instant::now() >= deadline {
                proc.kill();
                return Err(proc.error(&format!(
                    "Envoy not ready after {READY_TIMEOUT:?} (last /ready: {})",
                    match ready {
                        Ok(r) => format!("{} {}", r.status, r.body_str().trim()),
                        Err(e) => e.to_string(),
                    }
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Envoy {
            proc,
            config: cfg.clone(),
            admin_port,
            listener_port,
        })
    }

    /// Runs Envoy on a config that must make it refuse to start: waits up to `timeout`
    /// for it to exit and returns the exit status (`None` if it was still running,
    /// and then killed) and its whole log.
    pub fn start_expect_failure(
        cfg: &EnvoyConfig,
        workers: u32,
        timeout: Duration,
    ) -> (Option<ExitStatus>, String) {
        match spawn(cfg, workers, &[]) {
            Ok(proc) => {
                let status = proc.wait_exit(timeout);
                if status.is_none() {
                    proc.kill();
                }
                (status, proc.log())
            }
            Err(e) => (None, e.to_string()),
        }
    }

    /// The first listener, "127.0.0.1:port".
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.listener_port)
    }

    pub fn port(&self) -> u16 {
        self.listener_port
    }

    /// Listener `name`, "127.0.0.1:port".
    pub fn listener_addr(&self, name: &str) -> Option<String> {
        Some(format!("127.0.0.1:{}", self.config.listener_port(name)?))
    }

    pub fn admin_addr(&self) -> String {
        format!("127.0.0.1:{}", self.admin_port)
    }

    pub fn proc(&self) -> &Proc {
        &self.proc
    }

    pub fn config(&self) -> &EnvoyConfig {
        &self.config
    }

    pub fn rss_bytes(&self) -> Option<u64> {
        self.proc.rss_bytes()
    }

    /// A request to the admin endpoint, e.g. `admin("POST", "/reset_counters")`.
    pub fn admin(&self, method: &str, path: &str) -> io::Result<Response> {
        let mut c = http::Conn::connect(&self.admin_addr())?;
        c.request(method, path.as_bytes(), &[("Connection", b"close")])
    }

    /// `GET /stats` (text).
    pub fn stats_text(&self) -> io::Result<String> {
        self.admin_text("/stats")
    }

    /// `GET /stats/prometheus`.
    pub fn prometheus_text(&self) -> io::Result<String> {
        self.admin_text("/stats/prometheus")
    }

    /// Every numeric stat (counters and gauges; histograms are left out).
    pub fn stats(&self) -> io::Result<BTreeMap<String, u64>> {
        Ok(parse_stats(&self.stats_text()?))
    }

    /// The value of counter (or gauge) `name`, e.g. `http.api.downstream_rq_completed`;
    /// our filter's metrics are `wasmcustom.<name>`. `None` if no such stat exists.
    /// Panics if the admin endpoint does not answer: that is a test failure.
    pub fn counter(&self, name: &str) -> Option<u64> {
        match self.stats() {
            Ok(s) => s.get(name).copied(),
            Err(e) => panic!(
                "{}",
                self.proc
                    .error(&format!("GET /stats on {} failed: {e}", self.admin_addr()))
            ),
        }
    }

    /// Polls counter `name` until it reaches `at_least`. Stats of a request are
    /// recorded as its stream ends, which can be just after the client has the answer.
    pub fn wait_counter(&self, name: &str, at_least: u64, timeout: Duration) -> Result<u64, Error> {
        let mut last = None;
        crate::poll_until(timeout, Duration::from_millis(20), || {
            last = self.counter(name);
            last.filter(|v| *v >= at_least)
        })
        .ok_or_else(|| {
            Error(format!(
                "counter {name} is {} after {timeout:?}, expected at least {at_least}",
                last.map_or_else(|| "absent".to_owned(), |v| v.to_string())
            ))
        })
    }

    fn admin_text(&self, path: &str) -> io::Result<String> {
        let r = self.admin("GET", path)?;
        if r.status != 200 {
            return Err(io::Error::other(format!(
                "GET {path}: {} {}",
                r.status,
                r.body_str()
            )));
        }
        Ok(r.body_str().into_owned())
    }
}

/// The `name: value` lines of `/stats` whose value is an integer.
pub fn parse_stats(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (name, value) = l.split_once(": ")?;
            Some((name.trim().to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

fn spawn(cfg: &EnvoyConfig, workers: u32, extra: &[&str]) -> Result<Proc, Error> {
    let bin = paths::envoy_bin()?;
    let name = format!("envoy:{}", cfg.admin_port().unwrap_or(0));
    let dir = new_dir("envoy").map_err(|e| Error(format!("temp dir: {e}")))?;
    let file = dir.path().join("envoy.json");
    cfg.write(&file)?;
    let mut cmd = Command::new(&bin);
    cmd.arg("-c")
        .arg(&file)
        .args(["--concurrency", &workers.to_string()])
        // Several Envoys on one machine: without this the second exits with
        // "unable to bind domain socket".
        .arg("--disable-hot-restart");
    if !extra.contains(&"--log-level") && !extra.contains(&"-l") {
        cmd.args(["--log-level", "info"]);
    }
    cmd.args(extra).current_dir(dir.path());
    Proc::spawn_in(&name, cmd, dir).map_err(|e| Error(format!("cannot run {}: {e}", bin.display())))
}

/// `envoy --mode validate -c path`, run from the repository root (so a shipped
/// config's relative paths resolve as they do for `make run`).
pub fn validate(path: impl AsRef<Path>) -> Result<(), Error> {
    let path = std::path::absolute(path.as_ref())
        .map_err(|e| Error(format!("{}: {e}", path.as_ref().display())))?;
    let bin = paths::envoy_bin()?;
    let mut cmd = Command::new(&bin);
    cmd.args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(&path)
        .current_dir(paths::repo_root());
    let proc = Proc::spawn("envoy-validate", cmd)
        .map_err(|e| Error(format!("cannot run {}: {e}", bin.display())))?;
    match proc.wait_exit(Duration::from_secs(60)) {
        Some(s) if s.success() => Ok(()),
        Some(s) => Err(proc.error(&format!(
            "{} does not validate: {}",
            path.display(),
            describe_status(s)
        ))),
        None => Err(proc.error("validation still running after 60 s")),
    }
}
