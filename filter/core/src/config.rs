//! The plugin configuration as users write it (JSON), and its parsing.
//!
//! Every field is optional except `limits`; unknown fields are refused, so a
//! typo never silently disables limiting. Errors name the field at fault
//! (`store.local.slots`, `limits[1]`, `overrides[0].key`).

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::calendar::{self, Period, PeriodKind, Weekday};
use crate::rate::{Rate, MAX_COUNT};

/// The whole plugin configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Key-wide limits of keys on no plan (the plan named `default`).
    /// Required unless `default_plan` names another plan.
    #[serde(default)]
    pub limits: Option<Vec<LimitConfig>>,
    /// Rules by route, method, host and header: each matching rule adds its
    /// limits to the key-wide ones (see `docs/design.md#rules`).
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
    /// Named plans: each a list of key-wide limits.
    #[serde(default)]
    pub plans: std::collections::BTreeMap<String, Vec<LimitConfig>>,
    /// The key registry: plan name -> keys on it (plain or `sha256:<hex>`).
    #[serde(default)]
    pub keys: std::collections::BTreeMap<String, Vec<String>>,
    /// What a key in no plan gets.
    #[serde(default)]
    pub unknown_keys: UnknownKeys,
    /// The plan of unregistered keys under `unknown_keys: default_plan`;
    /// unset, the top-level `limits`.
    #[serde(default)]
    pub default_plan: Option<String>,
    /// Where the key is looked for; every source is read.
    #[serde(default = "default_key_sources")]
    pub key_sources: Vec<KeySourceConfig>,
    /// Longest accepted key, in bytes after decoding.
    #[serde(default = "default_max_key_length")]
    pub max_key_length: usize,
    /// What to do with a request that carries no key.
    #[serde(default)]
    pub missing_key: MissingKey,
    /// Limits of the shared anonymous bucket (`missing_key: "anonymous"`);
    /// defaults to `limits`.
    #[serde(default)]
    pub anonymous_limits: Option<Vec<LimitConfig>>,
    /// Per-key limits. An empty `limits` list makes that key unlimited.
    #[serde(default)]
    pub overrides: Vec<OverrideConfig>,
    /// Count and report, never deny.
    #[serde(default)]
    pub shadow_mode: bool,
    #[serde(default)]
    pub response_headers: ResponseHeadersConfig,
    /// What to do when the store cannot answer.
    #[serde(default)]
    pub failure_mode: FailureMode,
    #[serde(default)]
    pub store: StoreConfig,
    /// A path the filter answers itself with the caller's own usage (off
    /// by default; see `docs/design.md#introspection`).
    #[serde(default)]
    pub introspection: Option<IntrospectionConfig>,
    /// Makes this plugin instance the admin API, on its own listener
    /// (`crate::admin`): it then limits nothing.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
}

/// `{"token_sha256": "<64 hex>"}`: the SHA-256 of the operators' bearer token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub token_sha256: String,
}

/// `{"path": "/.well-known/ratelimit"}`: `GET`/`HEAD` of exactly this path
/// (after the rules' normalization) is answered with the key's usage.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntrospectionConfig {
    pub path: String,
}

/// A limit: `"10/s"`, or `{"rate": "10/s", "burst": 50, "name": "per-second"}`,
/// or a calendar quota `{"quota": "10000/month", "reset": "calendar",
/// "utc_offset": "+02:00", "week_starts": "monday", "name": "monthly"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitConfig {
    /// A quota's count, with its longest period as the window.
    pub rate: Rate,
    /// The rate (or quota) as written, the default policy name.
    pub rate_text: String,
    /// Requests admitted at once from a fresh state; defaults to the count.
    pub burst: Option<u64>,
    pub name: Option<String>,
    /// A calendar quota's period; `None` for a rate.
    pub quota: Option<Period>,
}

/// One rule: what it matches, the limits it adds, what a request costs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: String,
    #[serde(rename = "match")]
    pub matches: MatchConfig,
    pub limits: Vec<LimitConfig>,
    /// What one request charges each of this rule's limits (default 1);
    /// with `settle`, the estimate reserved when the request arrives.
    #[serde(default)]
    pub cost: Option<CostConfig>,
    /// Where the response says what the request really cost.
    #[serde(default)]
    pub settle: Option<SettleConfig>,
}

/// A rule's real cost, read from the response: exactly one of the three.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettleConfig {
    /// A response header, e.g. `x-usage-tokens`.
    pub header: Option<String>,
    /// A response trailer.
    pub trailer: Option<String>,
    /// A numeric field of a JSON body, as a dotted path
    /// (`usage.total_tokens`); in an event stream, the last event's.
    pub json: Option<String>,
    /// The most of a JSON body (or of one event) read, with `json`.
    pub max_body_bytes: Option<u64>,
}

/// A rule's conditions; all given ones must hold.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    /// Any of these methods (`GET`, `POST`...).
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    /// The path, exactly (after normalization).
    #[serde(default)]
    pub path: Option<String>,
    /// The path, by whole segments (`/v1` matches `/v1` and `/v1/x`).
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// The path, by a template such as `/orders/{id}`.
    #[serde(default)]
    pub path_template: Option<String>,
    /// Any of these hosts (`api.example.com`, `*.example.com`).
    #[serde(default)]
    pub hosts: Option<Vec<String>>,
    /// Every one of these header conditions.
    #[serde(default)]
    pub headers: Option<Vec<HeaderMatchConfig>>,
    /// Keys on any of these plans (`default` is the top-level `limits`).
    #[serde(default)]
    pub plans: Option<Vec<String>>,
}

/// `{"name": "x-tier", "exact": "gold"}`, or `{"name": "x-model", "present": true}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatchConfig {
    pub name: String,
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub present: Option<bool>,
}

/// `10`, or `{"header": "x-tokens", "default": 1, "max": 10000}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CostConfig {
    Fixed(u64),
    Header(HeaderCostConfig),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderCostConfig {
    pub header: String,
    /// When the header is absent.
    pub default: u64,
    /// A larger value is refused (400) and consumes nothing.
    pub max: u64,
    /// A smaller value is charged as this (default 1): with `settle`, the
    /// least a client may reserve, whatever estimate it sends.
    #[serde(default)]
    pub min: Option<u64>,
}

/// What happens to a key that no plan lists.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownKeys {
    /// The default plan's limits (today's behaviour).
    #[default]
    DefaultPlan,
    /// 401, so that fresh keys cannot escape a limit.
    Reject,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySourceConfig {
    /// A query parameter name, e.g. `api_key`.
    pub query: Option<String>,
    /// A header name, e.g. `x-api-key` (case-insensitive).
    pub header: Option<String>,
    /// With `header`: a prefix to strip, e.g. `Api-Key ` or `Bearer `.
    pub prefix: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissingKey {
    /// 401 with a JSON body naming where the key is expected.
    #[default]
    Reject,
    /// Let the request through, unthrottled.
    Allow,
    /// Count every keyless request in one shared bucket.
    Anonymous,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverrideConfig {
    /// The key in plain text, or `sha256:<64 hex digits>` of it.
    pub key: String,
    pub limits: Vec<LimitConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResponseHeadersConfig {
    /// The IETF draft's `RateLimit-Policy` and `RateLimit` headers.
    pub ratelimit: bool,
    /// The legacy `X-RateLimit-Limit/Remaining/Reset` headers.
    pub x_ratelimit: bool,
}

impl Default for ResponseHeadersConfig {
    fn default() -> Self {
        ResponseHeadersConfig {
            ratelimit: true,
            x_ratelimit: false,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Let the request through (and count it in a metric).
    #[default]
    Allow,
    /// Answer 503 with a JSON body.
    Deny,
}

/// Where counters live.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum StoreConfig {
    /// Envoy shared data: exact across this Envoy's workers.
    Local(LocalStoreConfig),
    /// Redis through a webdis sidecar: exact across every Envoy instance.
    Webdis(WebdisStoreConfig),
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig::Local(LocalStoreConfig::default())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalStoreConfig {
    /// Size of the fixed slot table, made at start-up.
    pub slots: u32,
    /// CAS conflicts tolerated per request before it is denied.
    pub max_cas_retries: u32,
}

impl Default for LocalStoreConfig {
    fn default() -> Self {
        LocalStoreConfig {
            slots: 65_536,
            max_cas_retries: 32,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebdisStoreConfig {
    /// The Envoy cluster that reaches webdis, e.g. `webdis` or, in Istio,
    /// `outbound|7379||webdis.<ns>.svc.cluster.local`.
    #[serde(default = "default_webdis_cluster")]
    pub cluster: String,
    /// The `:authority` of the calls; defaults to the cluster name.
    #[serde(default)]
    pub authority: Option<String>,
    /// Per-decision timeout. Envoy reads 0 as "no timeout", so 0 is refused.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u32,
    /// Prefix of every Redis key (the rest is a hash of the API key).
    /// Unset: `apikey_ratelimit:<plugin name>:` (`webdis::default_key_prefix`).
    #[serde(default)]
    pub key_prefix: Option<String>,
    /// Optional secret: Redis keys become HMAC-SHA256(secret, key), so
    /// someone reading Redis cannot test guessed API keys against it.
    #[serde(default)]
    pub key_hash_secret: Option<String>,
    /// Size of the local "denied until" table (0 turns it off).
    #[serde(default = "default_cache_slots")]
    pub cache_slots: u32,
    /// Distinct keys one batch call decides at most.
    #[serde(default = "default_max_keys_per_call")]
    pub max_keys_per_call: u32,
    /// Batch calls one worker has out at once at most.
    #[serde(default = "default_max_calls_in_flight")]
    pub max_calls_in_flight: u32,
    /// Requests one worker keeps waiting for webdis at most; beyond it the
    /// failure mode applies.
    #[serde(default = "default_max_waiting")]
    pub max_waiting: u32,
    /// Read each key's plan from the Redis hash `<key_prefix>plans` at
    /// decision time (in the same call); the configuration's plan is the
    /// fallback. Off: no extra work, and the calls are those of before.
    #[serde(default)]
    pub plans_from_redis: bool,
    /// How often each worker reads the admin epoch (`admin::epoch`), so
    /// that a reset or grant reaches its deny cache; 0 turns it off.
    #[serde(default = "default_admin_sync_ms")]
    pub admin_sync_ms: u32,
}

impl Default for WebdisStoreConfig {
    fn default() -> Self {
        WebdisStoreConfig {
            cluster: default_webdis_cluster(),
            authority: None,
            timeout_ms: default_timeout_ms(),
            key_prefix: None,
            key_hash_secret: None,
            cache_slots: default_cache_slots(),
            max_keys_per_call: default_max_keys_per_call(),
            max_calls_in_flight: default_max_calls_in_flight(),
            max_waiting: default_max_waiting(),
            plans_from_redis: false,
            admin_sync_ms: default_admin_sync_ms(),
        }
    }
}

fn default_webdis_cluster() -> String {
    "webdis".into()
}

fn default_timeout_ms() -> u32 {
    50
}

fn default_cache_slots() -> u32 {
    16_384
}

fn default_max_keys_per_call() -> u32 {
    64
}

fn default_max_calls_in_flight() -> u32 {
    4
}

fn default_max_waiting() -> u32 {
    10_000
}

fn default_admin_sync_ms() -> u32 {
    1_000
}

fn default_key_sources() -> Vec<KeySourceConfig> {
    vec![
        KeySourceConfig {
            query: Some("api_key".into()),
            ..KeySourceConfig::default()
        },
        KeySourceConfig {
            header: Some("x-api-key".into()),
            ..KeySourceConfig::default()
        },
    ]
}

fn default_max_key_length() -> usize {
    256
}

/// A configuration error: the field at fault and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() || self.field == "." {
            write!(f, "invalid plugin configuration: {}", self.message)
        } else {
            write!(
                f,
                "invalid plugin configuration: field `{}`: {}",
                self.field, self.message
            )
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Parses JSON bytes. Only the syntax and the types are checked here;
    /// [`crate::Policy::compile`] checks the values.
    pub fn from_json(bytes: &[u8]) -> Result<Config, ConfigError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ConfigError::new(
                "",
                "the configuration is empty; at least `limits` is required, e.g. {\"limits\": [\"1/s\"]}",
            ));
        }
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let config: Config = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let field = e.path().to_string();
            let inner = e.into_inner();
            // serde_json appends " at line L column C"; keep it, it helps
            // find the spot in a long YAML-embedded string.
            ConfigError::new(field, inner.to_string())
        })?;
        de.end()
            .map_err(|e| ConfigError::new("", format!("trailing characters: {e}")))?;
        Ok(config)
    }
}

impl<'de> Deserialize<'de> for LimitConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(LimitVisitor)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitObject {
    #[serde(default)]
    rate: Option<String>,
    #[serde(default)]
    quota: Option<QuotaText>,
    #[serde(default)]
    burst: Option<u64>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    reset: Option<Reset>,
    #[serde(default)]
    utc_offset: Option<UtcOffset>,
    #[serde(default)]
    week_starts: Option<WeekStart>,
}

/// How a quota resets: at the calendar boundary, the only kind, required
/// so that a quota says what it means.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Reset {
    Calendar,
}

/// `N/day`, `N/week` or `N/month`, as written.
struct QuotaText(String, u64, PeriodKind);

impl<'de> Deserialize<'de> for QuotaText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let parsed = text.trim().split_once('/').and_then(|(count, unit)| {
            let count = count
                .bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| count.parse::<u64>().ok())
                .flatten()
                .filter(|c| (1..=MAX_COUNT).contains(c))?;
            let kind = [PeriodKind::Day, PeriodKind::Week, PeriodKind::Month]
                .into_iter()
                .find(|k| k.unit() == unit)?;
            Some((count, kind))
        });
        match parsed {
            Some((count, kind)) => Ok(QuotaText(text.trim().to_string(), count, kind)),
            None => Err(de::Error::custom(format!(
                "invalid quota \"{text}\": expected N/day, N/week or N/month, N from 1 to {MAX_COUNT}"
            ))),
        }
    }
}

/// `+HH:MM` / `-HH:MM`, in minutes.
struct UtcOffset(i16);

impl<'de> Deserialize<'de> for UtcOffset {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        calendar::parse_offset(&text).map(UtcOffset).ok_or_else(|| {
            de::Error::custom(format!(
                "invalid UTC offset \"{text}\": expected +HH:MM or -HH:MM from -14:00 to +14:00, e.g. \"+02:00\""
            ))
        })
    }
}

struct WeekStart(Weekday);

impl<'de> Deserialize<'de> for WeekStart {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Weekday::parse(&text).map(WeekStart).ok_or_else(|| {
            de::Error::custom(format!(
                "invalid day \"{text}\": expected one of {}",
                Weekday::NAMES.join(", ")
            ))
        })
    }
}

struct LimitVisitor;

impl<'de> Visitor<'de> for LimitVisitor {
    type Value = LimitConfig;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a rate such as \"10/s\", an object {\"rate\": \"10/s\", \"burst\": 20, \"name\": \"...\"}, or a quota {\"quota\": \"10000/month\", \"reset\": \"calendar\"}")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<LimitConfig, E> {
        limit_from(text, None, None)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<LimitConfig, A::Error> {
        let object = LimitObject::deserialize(de::value::MapAccessDeserializer::new(map))?;
        let quota_fields =
            object.reset.is_some() || object.utc_offset.is_some() || object.week_starts.is_some();
        match (object.rate, object.quota) {
            (Some(rate), None) if !quota_fields => limit_from(&rate, object.burst, object.name),
            (Some(_), None) => Err(de::Error::custom(
                "\"reset\", \"utc_offset\" and \"week_starts\" belong to a calendar quota ({\"quota\": \"10000/month\", \"reset\": \"calendar\"}), not to a rate",
            )),
            (None, Some(QuotaText(text, count, kind))) => {
                if object.burst.is_some() {
                    return Err(de::Error::custom(format!(
                        "a quota has no \"burst\": all {count} may be used at once"
                    )));
                }
                if object.reset.is_none() {
                    return Err(de::Error::custom(
                        "a quota needs \"reset\": \"calendar\" (it is whole again at each calendar boundary, in \"utc_offset\")",
                    ));
                }
                if object.week_starts.is_some() && kind != PeriodKind::Week {
                    return Err(de::Error::custom(format!(
                        "\"week_starts\" applies to a weekly quota, not to \"{text}\""
                    )));
                }
                Ok(LimitConfig {
                    rate: Rate {
                        count,
                        window_seconds: kind.longest_seconds(),
                    },
                    rate_text: text,
                    burst: None,
                    name: object.name,
                    quota: Some(Period {
                        kind,
                        offset_minutes: object.utc_offset.map_or(0, |o| o.0),
                        week_start: object.week_starts.map_or(Weekday::MONDAY, |w| w.0),
                    }),
                })
            }
            _ => Err(de::Error::custom(
                "give exactly one of \"rate\" (e.g. \"10/s\") and \"quota\" (e.g. \"10000/month\")",
            )),
        }
    }
}

fn limit_from<E: de::Error>(
    text: &str,
    burst: Option<u64>,
    name: Option<String>,
) -> Result<LimitConfig, E> {
    let rate = Rate::parse(text).map_err(E::custom)?;
    Ok(LimitConfig {
        rate,
        rate_text: text.trim().to_string(),
        burst,
        name,
        quota: None,
    })
}

impl<'de> Deserialize<'de> for CostConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(CostVisitor)
    }
}

struct CostVisitor;

impl<'de> Visitor<'de> for CostVisitor {
    type Value = CostConfig;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a whole number such as 10, or {\"header\": \"x-tokens\", \"default\": 1, \"max\": 10000}")
    }

    fn visit_u64<E: de::Error>(self, cost: u64) -> Result<CostConfig, E> {
        Ok(CostConfig::Fixed(cost))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<CostConfig, A::Error> {
        HeaderCostConfig::deserialize(de::value::MapAccessDeserializer::new(map))
            .map(CostConfig::Header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Config, ConfigError> {
        Config::from_json(json.as_bytes())
    }

    #[test]
    fn minimal_config_gets_envoy_style_defaults() {
        let c = parse(r#"{"limits": ["1/s"]}"#).unwrap();
        let limits = c.limits.unwrap();
        assert_eq!(limits.len(), 1);
        assert_eq!(limits[0].rate, Rate::parse("1/s").unwrap());
        assert_eq!(c.key_sources, default_key_sources());
        assert_eq!(c.max_key_length, 256);
        assert_eq!(c.missing_key, MissingKey::Reject);
        assert!(!c.shadow_mode);
        assert_eq!(c.response_headers, ResponseHeadersConfig::default());
        assert_eq!(c.failure_mode, FailureMode::Allow);
        assert_eq!(c.store, StoreConfig::Local(LocalStoreConfig::default()));
    }

    #[test]
    fn full_config_parses() {
        let c = parse(
            r#"{
              "limits": ["10/s", {"rate": "1000/day", "burst": 100, "name": "daily"}],
              "key_sources": [{"header": "authorization", "prefix": "Api-Key "}],
              "max_key_length": 64,
              "missing_key": "anonymous",
              "anonymous_limits": ["1/min"],
              "overrides": [{"key": "gold", "limits": ["100/s"]}],
              "shadow_mode": true,
              "response_headers": {"ratelimit": false, "x_ratelimit": true},
              "failure_mode": "deny",
              "store": {"local": {"slots": 1024, "max_cas_retries": 8}}
            }"#,
        )
        .unwrap();
        let limits = c.limits.as_ref().unwrap();
        assert_eq!(limits[1].burst, Some(100));
        assert_eq!(limits[1].name.as_deref(), Some("daily"));
        assert_eq!(limits[0].rate_text, "10/s");
        assert_eq!(c.missing_key, MissingKey::Anonymous);
        assert_eq!(c.overrides[0].key, "gold");
        assert_eq!(
            c.store,
            StoreConfig::Local(LocalStoreConfig {
                slots: 1024,
                max_cas_retries: 8
            })
        );
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (r#"{"limts": ["1/s"]}"#, "limts", "unknown field `limts`"),
            (
                r#"{"limits": ["1/x"]}"#,
                "limits[0]",
                "invalid rate \"1/x\"",
            ),
            (
                r#"{"limits": ["1/s", {"rate": "2/s", "brust": 3}]}"#,
                "limits[1].brust",
                "unknown field `brust`",
            ),
            (
                r#"{"limits": ["1/s"], "store": {"local": {"slot": 3}}}"#,
                "store.local.slot",
                "unknown field `slot`",
            ),
            (
                r#"{"limits": ["1/s"], "store": {"webdis": {"timeout": 5}}}"#,
                "store.webdis.timeout",
                "unknown field `timeout`",
            ),
            (
                r#"{"limits": ["1/s"], "store": {"redis": {}}}"#,
                "store",
                "unknown variant `redis`",
            ),
            (
                r#"{"limits": ["1/s"], "missing_key": "maybe"}"#,
                "missing_key",
                "unknown variant `maybe`",
            ),
            (
                r#"{"limits": ["1/s"], "max_key_length": -1}"#,
                "max_key_length",
                "invalid value",
            ),
            (r#"{"limits": 5}"#, "limits", "invalid type"),
        ];
        for (json, field, message) in cases {
            let err = parse(json).unwrap_err();
            assert_eq!(err.field, field, "{json}: {err}");
            assert!(err.message.contains(message), "{json}: {err}");
            assert!(err.to_string().starts_with("invalid plugin configuration"));
        }
    }

    #[test]
    fn webdis_store_defaults() {
        let c = parse(r#"{"limits": ["1/s"], "store": {"webdis": {}}}"#).unwrap();
        assert_eq!(c.store, StoreConfig::Webdis(WebdisStoreConfig::default()));
        let StoreConfig::Webdis(w) = c.store else {
            panic!()
        };
        assert_eq!((w.cluster.as_str(), w.timeout_ms), ("webdis", 50));
        assert_eq!(w.key_prefix, None);
    }

    #[test]
    fn empty_and_broken_documents_are_refused() {
        assert!(parse("").unwrap_err().message.contains("empty"));
        assert!(parse("  \n").is_err());
        assert!(parse("{").is_err());
        assert!(parse(r#"{"limits": ["1/s"]} x"#).is_err());
        assert!(crate::Policy::from_json(b"[]").is_err());
    }
}
