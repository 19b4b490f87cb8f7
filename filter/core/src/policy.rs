//! The compiled policy: a validated configuration in the shape the hot path
//! needs. Built once in `on_configure`; per request it only looks things up.
//!
//! A request's limits are its key's plan's (the top-level `limits` for the
//! `default` plan, a named plan, or an override) plus those of every rule it
//! matches. All of a key's limits, across plans and rules, share one stored
//! state, each under its own name, so one CAS (or one Redis call) decides
//! all that apply and a request on one route never touches another route's.

use std::borrow::Cow;
use std::cell::Cell;

use crate::admin::Admin;
use crate::applied::{Applied, LimitRef};
use crate::config::{
    Config, ConfigError, FailureMode, KeySourceConfig, LimitConfig, LocalStoreConfig, MissingKey,
    ResponseHeadersConfig, StoreConfig, UnknownKeys, WebdisStoreConfig,
};
use crate::gcra::{Limit, MAX_NAME_LENGTH};
use crate::hash::{KeyHash, KeyHasher};
use crate::key::{self, KeyError, KeySource, RequestHeaders};
use crate::matching::{normalize_path, PathMatch};
use crate::per_limit::{PerLimit, MAX_LIMITS};
use crate::rate::{self, MAX_CAPACITY_NANOS, MAX_CAPACITY_SECONDS, MAX_COUNT};
use crate::response::Replies;
use crate::slots::{SlotTable, PROBES};
use crate::time::SECONDS_PER_YEAR;

mod redis_plans;
mod registry;
pub mod rules;

use registry::Registry;
use rules::{CostError, Needs, Rule, View, MAX_RULES};

/// Bounds on user-supplied sizes.
pub const MAX_KEY_LENGTH: usize = 4096;
pub const MAX_SLOTS: u32 = 1 << 22;
pub const MAX_CAS_RETRIES: u32 = 1000;
/// Most plans (named ones, overrides and the built-in ones together).
pub const MAX_PLANS: usize = 4096;

/// The name of the plan made of the top-level `limits`.
pub const DEFAULT_PLAN_NAME: &str = "default";
const DEFAULT_PLAN: u16 = 0;

/// Which plan applies to a request, or why none does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity<'a> {
    /// A key, its hash, and its plan.
    Key {
        key: Cow<'a, [u8]>,
        hash: KeyHash,
        plan: u16,
    },
    /// No key, counted in the shared anonymous bucket.
    Anonymous { hash: KeyHash, plan: u16 },
    /// No key, and `missing_key: allow`.
    MissingAllowed,
    /// No key, and `missing_key: reject` (the default): answer 401.
    MissingRejected,
    /// A key that cannot be used: answer 400.
    Invalid(KeyError),
    /// A key no plan lists, and `unknown_keys: reject`: answer 401.
    Unknown,
}

/// Why a request's limits cannot be decided: a 400, nothing consumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// Path rules are configured and the path cannot be read.
    BadPath,
    Cost(CostError),
    /// The cost is above what limit `instance` admits even when full.
    NeverFits {
        instance: u16,
        cost: u64,
    },
}

/// A plan: key-wide limits, as indices into [`Policy::instances`].
#[derive(Debug, Clone)]
pub struct Plan {
    pub name: String,
    pub limits: Vec<u16>,
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub sources: Vec<KeySource>,
    pub max_key_length: usize,
    pub missing_key: MissingKey,
    pub shadow_mode: bool,
    pub headers: ResponseHeadersConfig,
    pub failure_mode: FailureMode,
    pub store: StoreConfig,
    /// Every compiled limit of every plan and rule (cost 1).
    pub instances: Vec<Limit>,
    /// Distinct limit names, by [`Limit::index`] (one counter each).
    pub limit_names: Vec<String>,
    pub plans: Vec<Plan>,
    pub rules: Vec<Rule>,
    /// Each rule's limits, as indices into `instances`.
    rule_limits: Vec<Vec<u16>>,
    /// Bit `i`: rule `i` settles its cost from the response.
    settling: u32,
    needs: Needs,
    /// What header-free matching can skip: no rule at all.
    registry: Registry,
    unknown_keys: UnknownKeys,
    default_plan: u16,
    anonymous_plan: u16,
    /// With `store.webdis.plans_from_redis`, the plans Redis may name (the
    /// named ones, and `default` when it has limits); empty when off.
    redis_plans: Vec<u16>,
    /// The keyed hash of keys in the stores; the filter seeds it with the
    /// process's secret after compiling (see `hash`).
    hasher: Cell<KeyHasher>,
    /// The 401 and 400 bodies, which name the key sources.
    pub replies: Replies,
    /// Some limit is a calendar quota: local mode reads the wall clock.
    quotas: bool,
    /// What the configuration does that it probably does not mean (a DRF
    /// `"1000/month"`, which is per minute); the filter logs them.
    pub warnings: Vec<String>,
    /// The path answered with the caller's usage (`introspection.path`).
    introspection: Option<PathMatch>,
    /// This instance is the admin API (`crate::admin`).
    pub admin: Option<Admin>,
}

/// What compiling builds up: the limits, their names, and warnings.
#[derive(Default)]
struct Limits {
    instances: Vec<Limit>,
    names: Vec<String>,
    warnings: Vec<String>,
}

impl Limits {
    /// Compiles `limits` at `field`; `default_name` names a limit without a
    /// `name`. Returns their instance indices.
    fn compile(
        &mut self,
        field: &str,
        limits: &[LimitConfig],
        may_be_empty: bool,
        default_name: impl Fn(&LimitConfig) -> String,
    ) -> Result<Vec<u16>, ConfigError> {
        if limits.len() > MAX_LIMITS || (limits.is_empty() && !may_be_empty) {
            let least = if may_be_empty { 0 } else { 1 };
            return Err(ConfigError::new(
                field,
                format!("must list {least} to {MAX_LIMITS} rates, e.g. [\"10/s\", \"1000/day\"]"),
            ));
        }
        let mut out: Vec<u16> = Vec::with_capacity(limits.len());
        for (i, l) in limits.iter().enumerate() {
            let at = format!("{field}[{i}]");
            let name = l.name.clone().unwrap_or_else(|| default_name(l));
            if name.is_empty()
                || name.len() > MAX_NAME_LENGTH
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./:".contains(&b))
            {
                return Err(ConfigError::new(
                    format!("{at}.name"),
                    format!(
                        "\"{name}\" must be 1 to {MAX_NAME_LENGTH} characters of A-Z a-z 0-9 - _ . / :"
                    ),
                ));
            }
            if out.iter().any(|o| self.name_of(*o) == name) {
                return Err(ConfigError::new(
                    at,
                    format!("two limits are named \"{name}\"; give each a distinct \"name\""),
                ));
            }
            if l.quota.is_none() && rate::reads_as_month(&l.rate_text) {
                self.warnings.push(format!(
                    "{at}: \"{text}\" is {count} per minute, as in DRF (only the first letter of the period counts); for {count} per calendar month write {{\"quota\": \"{count}/month\", \"reset\": \"calendar\"}}",
                    text = l.rate_text,
                    count = l.rate.count
                ));
            }
            let burst = l.burst.unwrap_or(l.rate.count);
            let compiled = match l.quota {
                Some(period) => Limit::quota(&name, l.rate.count, period),
                None => (1..=MAX_COUNT)
                    .contains(&burst)
                    .then(|| Limit::new(&name, l.rate, burst))
                    .flatten(),
            };
            let mut limit = compiled
                .filter(|limit| limit.capacity_nanos <= MAX_CAPACITY_NANOS)
                .ok_or_else(|| {
                    ConfigError::new(
                        format!("{at}.burst"),
                        format!(
                            "must be from 1 to {MAX_COUNT}, and burst x (window / count) at most {} years, the longest both stores compute exactly; got {burst}",
                            MAX_CAPACITY_SECONDS / SECONDS_PER_YEAR
                        ),
                    )
                })?;
            let index = match self.names.iter().position(|n| *n == name) {
                Some(index) => index,
                None => {
                    self.names.push(name);
                    self.names.len() - 1
                }
            };
            limit.index = u16::try_from(index).map_err(|_| too_many(field))?;
            self.instances.push(limit);
            out.push(u16::try_from(self.instances.len() - 1).map_err(|_| too_many(field))?);
        }
        Ok(out)
    }

    fn name_of(&self, instance: u16) -> &str {
        self.instances
            .get(usize::from(instance))
            .map_or("", |l| l.name.as_str())
    }
}

fn too_many(field: &str) -> ConfigError {
    ConfigError::new(
        field,
        "too many limits in one configuration (at most 65535)",
    )
}

impl Policy {
    /// Parses and validates JSON configuration bytes.
    pub fn from_json(bytes: &[u8]) -> Result<Policy, ConfigError> {
        Policy::compile(Config::from_json(bytes)?)
    }

    pub fn compile(config: Config) -> Result<Policy, ConfigError> {
        in_range(
            "max_key_length",
            config.max_key_length,
            1..=MAX_KEY_LENGTH,
            "",
        )?;
        let sources = compile_sources(&config.key_sources)?;
        check_store(&config.store)?;
        let mut limits = Limits::default();
        let rate_name = |l: &LimitConfig| l.rate_text.clone();

        // Plans: `default` first, then the named ones, then the anonymous
        // bucket and the overrides.
        let default_limits = match &config.limits {
            Some(list) => limits.compile("limits", list, false, rate_name)?,
            None if config.default_plan.is_some() || config.unknown_keys == UnknownKeys::Reject => {
                Vec::new()
            }
            None => {
                return Err(ConfigError::new(
                    "limits",
                    "missing field `limits` (the key-wide limits; required unless `default_plan` names a plan or `unknown_keys` is \"reject\")",
                ))
            }
        };
        let mut plans = vec![Plan {
            name: DEFAULT_PLAN_NAME.into(),
            limits: default_limits,
        }];
        for (name, list) in &config.plans {
            let field = format!("plans.{name}");
            if name == DEFAULT_PLAN_NAME {
                return Err(ConfigError::new(
                    field,
                    "\"default\" is the plan of the top-level `limits`; give it there",
                ));
            }
            if !rules::is_name(name) {
                return Err(ConfigError::new(
                    field,
                    format!(
                        "the plan name \"{name}\" must be 1 to 64 characters of A-Z a-z 0-9 - _ ."
                    ),
                ));
            }
            let compiled = limits.compile(&field, list, true, rate_name)?;
            plans.push(Plan {
                name: name.clone(),
                limits: compiled,
            });
        }
        let plan_names: Vec<String> = plans.iter().map(|p| p.name.clone()).collect();
        let plan_index = |name: &str| plan_names.iter().position(|p| p == name);
        let default_plan = match &config.default_plan {
            None => DEFAULT_PLAN,
            Some(name) => plan_index(name)
                .and_then(|p| u16::try_from(p).ok())
                .ok_or_else(|| {
                    ConfigError::new("default_plan", format!("no plan is named \"{name}\""))
                })?,
        };
        if config.limits.is_none() && config.keys.contains_key(DEFAULT_PLAN_NAME) {
            return Err(ConfigError::new(
                "keys.default",
                "keys are put on the default plan, but there are no top-level `limits`",
            ));
        }

        // Rules, which may name plans.
        if config.rules.len() > MAX_RULES {
            return Err(ConfigError::new(
                "rules",
                format!("at most {MAX_RULES} rules, got {}", config.rules.len()),
            ));
        }
        let mut rules = Vec::with_capacity(config.rules.len());
        let mut rule_limits = Vec::with_capacity(config.rules.len());
        for (i, rule) in config.rules.iter().enumerate() {
            let field = format!("rules[{i}]");
            if config.rules.iter().take(i).any(|r| r.name == rule.name) {
                return Err(ConfigError::new(
                    format!("{field}.name"),
                    format!("two rules are named \"{}\"", rule.name),
                ));
            }
            let compiled = rules::compile(i, rule, plan_index)?;
            let prefix = rule.name.clone();
            let ids = limits.compile(&format!("{field}.limits"), &rule.limits, false, |l| {
                format!("{prefix}:{}", l.rate_text)
            })?;
            if let rules::Cost::Fixed(cost) = compiled.cost {
                if let Some((k, l)) = ids
                    .iter()
                    .enumerate()
                    .map(|(k, id)| (k, limits.instances.get(usize::from(*id))))
                    .find(|(_, l)| l.is_some_and(|l| l.burst < cost))
                {
                    return Err(ConfigError::new(
                        format!("{field}.cost"),
                        match l.is_some_and(|l| l.period.is_some()) {
                            true => format!(
                                "a request costing {cost} can never fit limits[{k}] (a quota of {})",
                                l.map_or(0, |l| l.burst)
                            ),
                            false => format!(
                                "a request costing {cost} can never fit limits[{k}] (burst {}); raise its burst",
                                l.map_or(0, |l| l.burst)
                            ),
                        },
                    ));
                }
            }
            rules.push(compiled);
            rule_limits.push(ids);
        }

        let anonymous_plan = match &config.anonymous_limits {
            Some(list) => {
                if config.missing_key != MissingKey::Anonymous {
                    return Err(ConfigError::new(
                        "anonymous_limits",
                        "only applies with \"missing_key\": \"anonymous\"",
                    ));
                }
                let compiled = limits.compile("anonymous_limits", list, false, rate_name)?;
                plans.push(Plan {
                    name: "anonymous".into(),
                    limits: compiled,
                });
                plans.len() - 1
            }
            None if config.missing_key == MissingKey::Anonymous && config.limits.is_none() => {
                return Err(ConfigError::new(
                    "anonymous_limits",
                    "required with \"missing_key\": \"anonymous\" when there are no top-level `limits`",
                ))
            }
            None => usize::from(DEFAULT_PLAN),
        };

        // The registry: `keys`, then each override as a plan of its own.
        let mut registry = Registry::default();
        for (plan_name, keys) in &config.keys {
            let plan = plan_index(plan_name)
                .and_then(|p| u16::try_from(p).ok())
                .ok_or_else(|| {
                    ConfigError::new(
                        format!("keys.{plan_name}"),
                        format!("no plan is named \"{plan_name}\""),
                    )
                })?;
            for (i, key) in keys.iter().enumerate() {
                registry.add(
                    &format!("keys.{plan_name}[{i}]"),
                    key,
                    plan,
                    config.max_key_length,
                )?;
            }
        }
        for (i, o) in config.overrides.iter().enumerate() {
            let field = format!("overrides[{i}]");
            let compiled =
                limits.compile(&format!("{field}.limits"), &o.limits, true, rate_name)?;
            plans.push(Plan {
                name: field.clone(),
                limits: compiled,
            });
            let plan = u16::try_from(plans.len() - 1)
                .ok()
                .filter(|_| plans.len() <= MAX_PLANS)
                .ok_or_else(|| {
                    ConfigError::new(&field, format!("at most {MAX_PLANS} plans and overrides"))
                })?;
            registry.add(&format!("{field}.key"), &o.key, plan, config.max_key_length)?;
        }
        if config.unknown_keys == UnknownKeys::Reject && registry.is_empty() {
            return Err(ConfigError::new(
                "unknown_keys",
                "\"reject\" needs registered keys (`keys`), or every key would be refused",
            ));
        }
        check_state_bound(&plans, &rules, &rule_limits, &limits)?;
        let redis_plans = match &config.store {
            StoreConfig::Webdis(w) if w.plans_from_redis => {
                redis_plans::compile(&plans, config.plans.len(), &rules, &rule_limits, &limits)?
            }
            _ => Vec::new(),
        };

        let needs = rules.iter().fold(Needs::default(), |acc, r| {
            let n = r.needs();
            Needs {
                method: acc.method || n.method,
                path: acc.path || n.path,
                host: acc.host || n.host,
            }
        });
        let replies = Replies::new(&sources, config.max_key_length);
        let introspection = match &config.introspection {
            Some(i) => Some(
                PathMatch::exact(&i.path)
                    .map_err(|why| ConfigError::new("introspection.path", why))?,
            ),
            None => None,
        };
        let admin = config.admin.as_ref().map(Admin::compile).transpose()?;
        let settling = rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.settle.is_some())
            .fold(0, |bits, (i, _)| {
                bits | 1u32.checked_shl(i as u32).unwrap_or(0)
            });
        Ok(Policy {
            admin,
            introspection,
            sources,
            max_key_length: config.max_key_length,
            missing_key: config.missing_key,
            shadow_mode: config.shadow_mode,
            headers: config.response_headers,
            failure_mode: config.failure_mode,
            store: config.store,
            quotas: limits.instances.iter().any(|l| l.period.is_some()),
            warnings: limits.warnings,
            instances: limits.instances,
            limit_names: limits.names,
            plans,
            rules,
            settling,
            rule_limits,
            needs,
            registry,
            unknown_keys: config.unknown_keys,
            default_plan,
            anonymous_plan: u16::try_from(anonymous_plan).unwrap_or(DEFAULT_PLAN),
            redis_plans,
            hasher: Cell::new(KeyHasher::unseeded()),
            replies,
        })
    }

    /// Finds the key in the request headers and the plan it is on.
    pub fn identify<'a>(&self, headers: &impl RequestHeaders<'a>) -> Identity<'a> {
        match key::extract(&self.sources, headers, self.max_key_length) {
            Err(e) => Identity::Invalid(e),
            Ok(Some(key)) => {
                let hash = self.hasher.get().hash(&key);
                let plan = match self.registry.plan_of(&key, hash.spread) {
                    Some(plan) => plan,
                    None if self.unknown_keys == UnknownKeys::Reject => return Identity::Unknown,
                    None => self.default_plan,
                };
                Identity::Key { key, hash, plan }
            }
            Ok(None) => match self.missing_key {
                MissingKey::Reject => Identity::MissingRejected,
                MissingKey::Allow => Identity::MissingAllowed,
                MissingKey::Anonymous => Identity::Anonymous {
                    hash: self.hasher.get().anonymous(),
                    plan: self.anonymous_plan,
                },
            },
        }
    }

    /// The limits that apply to a request of a key on `plan`: the plan's
    /// and those of every rule the request matches, with their costs.
    pub fn applied<'a>(
        &self,
        plan: u16,
        headers: &impl RequestHeaders<'a>,
    ) -> Result<Applied, RequestError> {
        let mut applied = Applied {
            plan,
            ..Applied::default()
        };
        for instance in self.plan_instances(plan) {
            applied.limits.push(LimitRef {
                instance: *instance,
                cost: 1,
            });
        }
        if self.rules.is_empty() {
            return Ok(applied);
        }
        let view = View::read(self.needs, headers).map_err(|_| RequestError::BadPath)?;
        for (i, (rule, ids)) in self.rules.iter().zip(&self.rule_limits).enumerate() {
            if !rule.matches(&view, plan, headers) {
                continue;
            }
            let cost = rule.cost(i, headers).map_err(RequestError::Cost)?;
            applied.rules |= 1 << i;
            for instance in ids {
                let limit = self.instance(*instance);
                if limit.is_some_and(|l| cost > l.burst) {
                    return Err(RequestError::NeverFits {
                        instance: *instance,
                        cost,
                    });
                }
                // Room was checked at load (`check_state_bound`).
                applied.limits.push(LimitRef {
                    instance: *instance,
                    cost: u32::try_from(cost).unwrap_or(u32::MAX),
                });
            }
        }
        Ok(applied)
    }

    /// A plain key's hash and plan, as a request carrying it would get
    /// them; `None` for a key no plan lists under `unknown_keys: reject`.
    pub fn key_plan(&self, key: &[u8]) -> Option<(KeyHash, u16)> {
        let hash = self.hasher.get().hash(key);
        match self.registry.plan_of(key, hash.spread) {
            Some(plan) => Some((hash, plan)),
            None if self.unknown_keys == UnknownKeys::Reject => None,
            None => Some((hash, self.default_plan)),
        }
    }

    /// The plan of the key whose SHA-256 is `digest`, as a request carrying
    /// that key would get it, and the key when it is listed in plain; `None`
    /// for a digest no plan lists under `unknown_keys: reject`. For the
    /// admin API only (see `Registry::by_digest`).
    pub fn digest_plan(&self, digest: &[u8; 32]) -> Option<(u16, Option<&[u8]>)> {
        match self.registry.by_digest(digest) {
            Some(found) => Some(found),
            None if self.unknown_keys == UnknownKeys::Reject => None,
            None => Some((self.default_plan, None)),
        }
    }

    /// Whether the request asks for its key's usage: `GET` or `HEAD` of the
    /// introspection path, normalized as the rules normalize paths.
    pub fn introspects<'a>(&self, headers: &impl RequestHeaders<'a>) -> bool {
        let Some(path) = &self.introspection else {
            return false;
        };
        let single = |name: &[u8]| headers.single(name).ok().flatten();
        let method = single(b":method").unwrap_or(b"GET");
        (method == b"GET" || method == b"HEAD")
            && single(b":path")
                .and_then(|raw| normalize_path(raw).ok())
                .is_some_and(|p| path.matches(&p))
    }

    /// Every limit a key on `plan` may meet, each costing 1: its plan's and
    /// those of every rule that may apply to the plan (all its state holds).
    pub fn all_of_plan(&self, plan: u16) -> Applied {
        let mut applied = Applied {
            plan,
            ..Applied::default()
        };
        let mut ids: Vec<u16> = self.plan_instances(plan).to_vec();
        for (i, (rule, rule_ids)) in self.rules.iter().zip(&self.rule_limits).enumerate() {
            if rule.may_apply_to(plan) {
                applied.rules |= 1 << i;
                ids.extend_from_slice(rule_ids);
            }
        }
        // Room was checked at load (`check_state_bound`).
        for instance in ids {
            applied.limits.push(LimitRef { instance, cost: 1 });
        }
        applied
    }

    fn plan_instances(&self, plan: u16) -> &[u16] {
        self.plans.get(usize::from(plan)).map_or(&[], |p| &p.limits)
    }

    /// A compiled limit by its instance index.
    pub fn instance(&self, instance: u16) -> Option<&Limit> {
        self.instances.get(usize::from(instance))
    }

    /// The limits of `applied`, each charging the request's cost.
    pub fn limits(&self, applied: &Applied) -> PerLimit<Limit> {
        applied
            .limits
            .iter()
            .filter_map(|r| {
                self.instance(r.instance)
                    .map(|l| l.costing(u64::from(r.cost)))
            })
            .collect()
    }

    /// Bit `i`: rule `i` settles its cost from the response.
    pub fn settling_rules(&self) -> u32 {
        self.settling
    }

    /// How many limits rule `rule` adds to a request it matches.
    pub fn rule_limit_count(&self, rule: usize) -> usize {
        self.rule_limits.get(rule).map_or(0, Vec::len)
    }

    /// Rule `rule`'s limits, each costing 1.
    pub fn rule_units(&self, rule: usize) -> PerLimit<Limit> {
        self.rule_limits
            .get(rule)
            .map(|ids| {
                ids.iter()
                    .filter_map(|id| self.instance(*id).map(|l| l.costing(1)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Keys the store hashes with `hasher` from now on.
    pub fn reseed(&self, hasher: KeyHasher) {
        self.hasher.set(hasher);
    }

    /// The keyed hash in use.
    pub fn hasher(&self) -> KeyHasher {
        self.hasher.get()
    }

    /// Whether some limit is a calendar quota, which needs the wall clock.
    pub fn has_quotas(&self) -> bool {
        self.quotas
    }

    /// Registered keys.
    pub fn registered_keys(&self) -> usize {
        self.registry.len()
    }

    /// The local store's table, when the store is local.
    pub fn slot_table(&self) -> Option<SlotTable> {
        match &self.store {
            StoreConfig::Local(LocalStoreConfig {
                slots,
                max_cas_retries,
            }) => Some(SlotTable::new(*slots, *max_cas_retries)),
            StoreConfig::Webdis(_) => None,
        }
    }

    /// The global store's settings, when the store is webdis.
    pub fn webdis(&self) -> Option<&WebdisStoreConfig> {
        match &self.store {
            StoreConfig::Webdis(w) => Some(w),
            StoreConfig::Local(_) => None,
        }
    }
}

/// A key's state holds every limit a key on one plan can meet: its plan's
/// and every rule's that may apply to that plan. That many must fit one
/// state ([`MAX_LIMITS`]), under distinct names, so that no request ever
/// pushes another route's debt out of it.
fn check_state_bound(
    plans: &[Plan],
    rules: &[Rule],
    rule_limits: &[Vec<u16>],
    limits: &Limits,
) -> Result<(), ConfigError> {
    for (p, plan) in plans.iter().enumerate() {
        let plan_id = u16::try_from(p).unwrap_or(u16::MAX);
        let mut names: Vec<&str> = plan.limits.iter().map(|i| limits.name_of(*i)).collect();
        for (r, (rule, ids)) in rules.iter().zip(rule_limits).enumerate() {
            if !rule.may_apply_to(plan_id) {
                continue;
            }
            for id in ids {
                let name = limits.name_of(*id);
                if names.contains(&name) {
                    return Err(ConfigError::new(
                        format!("rules[{r}].limits"),
                        format!(
                            "the limit name \"{name}\" is also used by another limit of plan \"{}\" or another rule; names are how a key's state tells its limits apart",
                            plan.name
                        ),
                    ));
                }
                names.push(name);
            }
        }
        if names.len() > MAX_LIMITS {
            return Err(ConfigError::new(
                "rules",
                format!(
                    "a key on plan \"{}\" can meet {} limits (its plan's and the rules'); one key's state holds at most {MAX_LIMITS}",
                    plan.name,
                    names.len()
                ),
            ));
        }
    }
    Ok(())
}

fn compile_sources(sources: &[KeySourceConfig]) -> Result<Vec<KeySource>, ConfigError> {
    if sources.is_empty() || sources.len() > 8 {
        return Err(ConfigError::new("key_sources", "must list 1 to 8 sources"));
    }
    let mut out: Vec<KeySource> = Vec::with_capacity(sources.len());
    for (i, s) in sources.iter().enumerate() {
        let field = format!("key_sources[{i}]");
        let source = match (&s.query, &s.header, &s.prefix) {
            (Some(name), None, None) => {
                key::check_query_name(name)
                    .map_err(|why| ConfigError::new(format!("{field}.query"), why))?;
                KeySource::Query { name: name.clone() }
            }
            (None, Some(name), prefix) if is_header_name(name) => KeySource::Header {
                name: name.to_ascii_lowercase(),
                prefix: prefix.clone().filter(|p| !p.is_empty()),
            },
            (Some(_), None, Some(_)) => {
                return Err(ConfigError::new(field, "\"prefix\" only applies to a \"header\" source"))
            }
            (None, Some(name), _) => {
                return Err(ConfigError::new(
                    format!("{field}.header"),
                    format!("\"{name}\" is not a valid header name"),
                ))
            }
            _ => {
                return Err(ConfigError::new(
                    field,
                    "give exactly one of {\"query\": \"<parameter>\"} or {\"header\": \"<name>\"}, not empty",
                ))
            }
        };
        if out.contains(&source) {
            return Err(ConfigError::new(field, "this source is listed twice"));
        }
        out.push(source);
    }
    Ok(out)
}

fn is_header_name(name: &str) -> bool {
    rules::is_header_name(name)
}

/// Longest accepted Redis key prefix.
pub const MAX_KEY_PREFIX: usize = 64;
/// Longest accepted per-decision timeout.
pub const MAX_TIMEOUT_MS: u32 = 60_000;
/// Most keys one batch call may carry (each costs Redis about 12 µs).
pub const MAX_KEYS_PER_CALL: u32 = 256;
/// Most batch calls one worker may have out at once.
pub const MAX_CALLS_IN_FLIGHT: u32 = 64;
/// Most requests one worker may keep waiting for webdis.
pub const MAX_WAITING: u32 = 1_000_000;

/// The shortest and longest period between two reads of the admin epoch:
/// the root's tick (50 ms) sends them, and a minute is the most a reset
/// should take to reach every replica.
pub const MIN_ADMIN_SYNC_MS: u32 = 50;
pub const MAX_ADMIN_SYNC_MS: u32 = 60_000;

fn check_store(store: &StoreConfig) -> Result<(), ConfigError> {
    match store {
        StoreConfig::Webdis(w) => {
            if w.cluster.is_empty() || w.cluster.len() > 256 {
                return Err(ConfigError::new(
                    "store.webdis.cluster",
                    "must name the Envoy cluster that reaches webdis (1 to 256 characters)",
                ));
            }
            if let Some(authority) = &w.authority {
                if authority.is_empty() || !authority.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(ConfigError::new(
                        "store.webdis.authority",
                        "must be a host name (printable ASCII, no spaces)",
                    ));
                }
            }
            in_range(
                "store.webdis.timeout_ms",
                w.timeout_ms,
                1..=MAX_TIMEOUT_MS,
                " (Envoy reads 0 as no timeout at all)",
            )?;
            let prefix = w.key_prefix.as_deref().unwrap_or_default();
            if prefix.len() > MAX_KEY_PREFIX
                || !prefix
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:{}".contains(&b))
            {
                return Err(ConfigError::new(
                    "store.webdis.key_prefix",
                    format!(
                        "must be at most {MAX_KEY_PREFIX} characters of A-Z a-z 0-9 - _ . : {{ }}"
                    ),
                ));
            }
            if w.key_hash_secret.as_deref() == Some("") {
                return Err(ConfigError::new(
                    "store.webdis.key_hash_secret",
                    "must not be empty (leave it out for a plain SHA-256)",
                ));
            }
            in_range(
                "store.webdis.max_keys_per_call",
                w.max_keys_per_call,
                1..=MAX_KEYS_PER_CALL,
                "",
            )?;
            in_range(
                "store.webdis.max_calls_in_flight",
                w.max_calls_in_flight,
                1..=MAX_CALLS_IN_FLIGHT,
                "",
            )?;
            in_range(
                "store.webdis.max_waiting",
                w.max_waiting,
                1..=MAX_WAITING,
                "",
            )?;
            if w.admin_sync_ms != 0
                && !(MIN_ADMIN_SYNC_MS..=MAX_ADMIN_SYNC_MS).contains(&w.admin_sync_ms)
            {
                return Err(ConfigError::new(
                    "store.webdis.admin_sync_ms",
                    format!(
                        "must be 0 (off) or from {MIN_ADMIN_SYNC_MS} to {MAX_ADMIN_SYNC_MS}, got {}",
                        w.admin_sync_ms
                    ),
                ));
            }
            if w.cache_slots != 0 && !(PROBES as u32..=MAX_SLOTS).contains(&w.cache_slots) {
                return Err(ConfigError::new(
                    "store.webdis.cache_slots",
                    format!(
                        "must be 0 (off) or from {PROBES} to {MAX_SLOTS}, got {}",
                        w.cache_slots
                    ),
                ));
            }
        }
        StoreConfig::Local(local) => {
            in_range(
                "store.local.slots",
                local.slots,
                PROBES as u32..=MAX_SLOTS,
                "",
            )?;
            in_range(
                "store.local.max_cas_retries",
                local.max_cas_retries,
                1..=MAX_CAS_RETRIES,
                "",
            )?;
        }
    }
    Ok(())
}

/// An error naming `field` unless `value` is in `range`: "must be from A to
/// B<note>, got V".
fn in_range<T: PartialOrd + std::fmt::Display>(
    field: &str,
    value: T,
    range: std::ops::RangeInclusive<T>,
    note: &str,
) -> Result<(), ConfigError> {
    if range.contains(&value) {
        return Ok(());
    }
    Err(ConfigError::new(
        field,
        format!(
            "must be from {} to {}{note}, got {value}",
            range.start(),
            range.end()
        ),
    ))
}

#[cfg(test)]
mod load_refusals;
#[cfg(test)]
mod quota_config;
#[cfg(test)]
mod rule_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyErrorKind;
    use crate::testing::{policy, Headers};

    fn error(json: &str) -> ConfigError {
        Policy::from_json(json.as_bytes()).unwrap_err()
    }

    fn identify(p: &Policy, path: &str) -> Identity<'static> {
        match p.identify(&Headers::path(path).map()) {
            Identity::Key { key, hash, plan } => Identity::Key {
                key: Cow::Owned(key.into_owned()),
                hash,
                plan,
            },
            Identity::Anonymous { hash, plan } => Identity::Anonymous { hash, plan },
            Identity::MissingAllowed => Identity::MissingAllowed,
            Identity::MissingRejected => Identity::MissingRejected,
            Identity::Invalid(e) => Identity::Invalid(e),
            Identity::Unknown => Identity::Unknown,
        }
    }

    /// The key-wide limits of the plan the request's key is on.
    fn limits_of(p: &Policy, path: &str) -> Vec<Limit> {
        let plan = match identify(p, path) {
            Identity::Key { plan, .. } | Identity::Anonymous { plan, .. } => plan,
            other => panic!("{other:?}"),
        };
        let applied = p.applied(plan, &Headers::path(path).map()).unwrap();
        p.limits(&applied).as_slice().to_vec()
    }

    #[test]
    fn tutorial_policy_compiles() {
        let p = policy(r#"{"limits": ["1/s"]}"#);
        assert_eq!(p.plans.len(), 1);
        let limits = limits_of(&p, "/?api_key=a");
        assert_eq!(limits[0].burst, 1);
        assert_eq!(limits[0].name.as_str(), "1/s");
        assert_eq!(p.slot_table().unwrap().slots(), 65_536);
    }

    #[test]
    fn overrides_apply_by_plain_key_or_sha256() {
        let digest = "03ac674216f3e15c761ee1a5e255f067953623c8b388b4459e13f978d7c846f4"; // sha256("1234")
        let p = policy(&format!(
            r#"{{"limits": ["1/s"], "overrides": [
                {{"key": "gold", "limits": ["100/s"]}},
                {{"key": "sha256:{}", "limits": ["5/s"]}},
                {{"key": "internal", "limits": []}}]}}"#,
            digest.to_uppercase()
        ));
        assert_eq!(limits_of(&p, "/?api_key=gold")[0].rate.count, 100);
        assert_eq!(limits_of(&p, "/?api_key=1234")[0].rate.count, 5);
        assert!(limits_of(&p, "/?api_key=internal").is_empty());
        assert_eq!(limits_of(&p, "/?api_key=other")[0].rate.count, 1);
    }

    #[test]
    fn missing_key_policies() {
        assert_eq!(
            identify(&policy(r#"{"limits": ["1/s"]}"#), "/"),
            Identity::MissingRejected
        );
        assert_eq!(
            identify(
                &policy(r#"{"limits": ["1/s"], "missing_key": "allow"}"#),
                "/"
            ),
            Identity::MissingAllowed
        );
        let anon = policy(
            r#"{"limits": ["1/s"], "missing_key": "anonymous", "anonymous_limits": ["5/min"]}"#,
        );
        match identify(&anon, "/") {
            Identity::Anonymous { hash, .. } => {
                assert_eq!(hash, KeyHasher::unseeded().anonymous());
                assert_eq!(limits_of(&anon, "/")[0].rate.count, 5);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            identify(&anon, "/?api_key=%zz"),
            Identity::Invalid(KeyError::Source {
                source: 0,
                kind: KeyErrorKind::BadEncoding
            })
        ));
    }

    #[test]
    fn bad_values_are_refused_naming_the_field() {
        let cases = [
            (r#"{"limits": []}"#, "limits"),
            (
                r#"{"limits": ["1/s","2/s","3/s","4/s","5/s","6/s","7/s","8/s","9/s","10/s","11/s","12/s","13/s","14/s","15/s","16/s","17/s"]}"#,
                "limits",
            ),
            (r#"{"limits": ["1/s", "1/s"]}"#, "limits[1]"),
            (
                r#"{"limits": [{"rate": "1/s", "burst": 0}]}"#,
                "limits[0].burst",
            ),
            (
                r#"{"limits": [{"rate": "1/365d", "burst": 1000000000}]}"#,
                "limits[0].burst",
            ),
            (
                r#"{"limits": [{"rate": "1/s", "name": "a b"}]}"#,
                "limits[0].name",
            ),
            (
                r#"{"limits": ["1/s"], "max_key_length": 0}"#,
                "max_key_length",
            ),
            (
                r#"{"limits": ["1/s"], "max_key_length": 5000}"#,
                "max_key_length",
            ),
            (r#"{"limits": ["1/s"], "key_sources": []}"#, "key_sources"),
            (
                r#"{"limits": ["1/s"], "key_sources": [{}]}"#,
                "key_sources[0]",
            ),
            (
                r#"{"limits": ["1/s"], "key_sources": [{"query": "a", "header": "b"}]}"#,
                "key_sources[0]",
            ),
            (
                r#"{"limits": ["1/s"], "key_sources": [{"query": "a", "prefix": "b"}]}"#,
                "key_sources[0]",
            ),
            (
                r#"{"limits": ["1/s"], "key_sources": [{"header": "x y"}]}"#,
                "key_sources[0].header",
            ),
            (
                r#"{"limits": ["1/s"], "key_sources": [{"query": "a"}, {"query": "a"}]}"#,
                "key_sources[1]",
            ),
            (
                r#"{"limits": ["1/s"], "overrides": [{"key": "", "limits": []}]}"#,
                "overrides[0].key",
            ),
            (
                r#"{"limits": ["1/s"], "overrides": [{"key": "sha256:abc", "limits": []}]}"#,
                "overrides[0].key",
            ),
            (
                r#"{"limits": ["1/s"], "overrides": [{"key": "a", "limits": []}, {"key": "a", "limits": ["1/s"]}]}"#,
                "overrides[1].key",
            ),
            (
                r#"{"limits": ["1/s"], "overrides": [{"key": "a", "limits": ["1/q"]}]}"#,
                "overrides[0].limits[0]",
            ),
            (
                r#"{"limits": ["1/s"], "anonymous_limits": ["1/s"]}"#,
                "anonymous_limits",
            ),
            (
                r#"{"limits": ["1/s"], "store": {"local": {"slots": 3}}}"#,
                "store.local.slots",
            ),
            (
                r#"{"limits": ["1/s"], "store": {"local": {"slots": 99999999}}}"#,
                "store.local.slots",
            ),
            (
                r#"{"limits": ["1/s"], "store": {"local": {"max_cas_retries": 0}}}"#,
                "store.local.max_cas_retries",
            ),
            (
                r#"{"limits": ["1/s"], "store": {"webdis": {"admin_sync_ms": 49}}}"#,
                "store.webdis.admin_sync_ms",
            ),
            (
                r#"{"limits": ["1/s"], "store": {"webdis": {"admin_sync_ms": 60001}}}"#,
                "store.webdis.admin_sync_ms",
            ),
        ];
        for (json, field) in cases {
            let e = error(json);
            assert_eq!(e.field, field, "{json}: {e}");
            assert!(e.to_string().contains(field), "{e}");
        }
    }

    #[test]
    fn out_of_range_numbers_are_refused_with_the_bounds_and_the_value() {
        let message = |json: &str| error(json).message;
        assert_eq!(
            message(r#"{"limits": ["1/s"], "max_key_length": 0}"#),
            "must be from 1 to 4096, got 0"
        );
        assert_eq!(
            message(r#"{"limits": ["1/s"], "store": {"webdis": {"timeout_ms": 0}}}"#),
            "must be from 1 to 60000 (Envoy reads 0 as no timeout at all), got 0"
        );
        assert_eq!(
            message(r#"{"limits": ["1/s"], "store": {"local": {"slots": 3}}}"#),
            "must be from 4 to 4194304, got 3"
        );
        assert_eq!(
            message(r#"{"limits": ["1/s"], "store": {"local": {"max_cas_retries": 1001}}}"#),
            "must be from 1 to 1000, got 1001"
        );
        assert_eq!(
            message(r#"{"limits": ["1/s"], "store": {"webdis": {"admin_sync_ms": 10}}}"#),
            "must be 0 (off) or from 50 to 60000, got 10"
        );
        for ok in [0, 50, 1000, 60_000] {
            let json = format!(
                r#"{{"limits": ["1/s"], "store": {{"webdis": {{"admin_sync_ms": {ok}}}}}}}"#
            );
            assert!(Policy::from_json(json.as_bytes()).is_ok(), "{json}");
        }
    }

    #[test]
    fn header_sources_are_lower_cased() {
        let p = policy(r#"{"limits": ["1/s"], "key_sources": [{"header": "X-API-Key"}]}"#);
        assert_eq!(
            p.sources,
            vec![KeySource::Header {
                name: "x-api-key".into(),
                prefix: None
            }]
        );
    }
}
