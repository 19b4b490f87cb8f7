//! Rules: which requests a rule matches, and what a request costs under
//! its limits. Every matching rule applies (as Kuadrant's limits and Envoy's
//! rate-limit descriptors do); `docs/design.md#rules` says why.

use std::borrow::Cow;

use crate::config::{ConfigError, CostConfig, HeaderMatchConfig, MatchConfig, RuleConfig};
use crate::key::RequestHeaders;
use crate::matching::{compile_method, normalize_host, normalize_path, HostMatch, PathMatch};
use crate::settle::{self, Source};

/// Most rules one configuration may hold (a request's matches are a bit set).
pub const MAX_RULES: usize = 32;
/// The largest cost one request may be charged.
pub const MAX_COST: u64 = 1_000_000_000;

#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    methods: Vec<Vec<u8>>,
    path: Option<PathMatch>,
    hosts: Vec<HostMatch>,
    headers: Vec<HeaderCondition>,
    /// Bit `p`: keys on plan `p` are matched; `None`: every plan.
    plans: Option<u64>,
    pub cost: Cost,
    /// Where the response says what the request really cost; `cost` is
    /// then the estimate reserved ([`crate::settle`]).
    pub settle: Option<Source>,
}

#[derive(Debug, Clone)]
enum HeaderCondition {
    Present(String, bool),
    Exact(String, Vec<u8>),
}

/// What one request charges a rule's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cost {
    Fixed(u64),
    /// Read from a request header: absent is `default`, above `max` is 400,
    /// below `min` is `min`.
    Header {
        name: String,
        default: u64,
        min: u64,
        max: u64,
    },
}

/// Why a request's cost cannot be charged: a 400, and nothing is consumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CostError {
    /// Not a whole number from 1 up, or the header given twice.
    Malformed { rule: usize },
    /// Above the rule's `max`.
    AboveMax { rule: usize, cost: u64 },
}

/// Which parts of a request the rules read, so that the others are never
/// fetched from the host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    pub method: bool,
    pub path: bool,
    pub host: bool,
}

/// The request as the rules see it, read once.
#[derive(Debug, Default)]
pub struct View<'a> {
    method: Option<&'a [u8]>,
    path: Option<Cow<'a, [u8]>>,
    host: Option<Cow<'a, [u8]>>,
}

/// The request's path cannot be read (bad percent-encoding, no path): with
/// path rules configured it is answered 400, so it cannot dodge them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadPath;

impl<'a> View<'a> {
    pub fn read(needs: Needs, headers: &impl RequestHeaders<'a>) -> Result<View<'a>, BadPath> {
        let single = |name: &[u8]| headers.single(name).ok().flatten();
        let path = match needs.path {
            false => None,
            true => {
                let raw = single(b":path").ok_or(BadPath)?;
                Some(normalize_path(raw).map_err(|_| BadPath)?)
            }
        };
        let host = match needs.host {
            false => None,
            true => single(b":authority")
                .or_else(|| single(b"host"))
                .map(normalize_host),
        };
        Ok(View {
            method: needs.method.then(|| single(b":method")).flatten(),
            path,
            host,
        })
    }
}

impl Rule {
    /// Whether the request matches every condition of this rule.
    pub fn matches<'a>(
        &self,
        view: &View<'a>,
        plan: u16,
        headers: &impl RequestHeaders<'a>,
    ) -> bool {
        if !self.may_apply_to(plan) {
            return false;
        }
        if !self.methods.is_empty()
            && !view
                .method
                // Case-blind: Django and others upper-case the method, so
                // `post` must not slip past a `POST` rule.
                .is_some_and(|m| self.methods.iter().any(|want| want.eq_ignore_ascii_case(m)))
        {
            return false;
        }
        if let Some(path) = &self.path {
            if !view.path.as_deref().is_some_and(|p| path.matches(p)) {
                return false;
            }
        }
        if !self.hosts.is_empty()
            && !view
                .host
                .as_deref()
                .is_some_and(|h| self.hosts.iter().any(|want| want.matches(h)))
        {
            return false;
        }
        self.headers.iter().all(|condition| match condition {
            // A header given twice counts as present and as matching: a
            // client never escapes a rule by repeating a header.
            HeaderCondition::Present(name, want) => {
                let present = !matches!(headers.single(name.as_bytes()), Ok(None));
                present == *want
            }
            HeaderCondition::Exact(name, value) => match headers.single(name.as_bytes()) {
                Ok(Some(got)) => got == value.as_slice(),
                Ok(None) => false,
                Err(_) => true,
            },
        })
    }

    /// What the request costs under this rule's limits (rule `index`).
    pub fn cost<'a>(
        &self,
        index: usize,
        headers: &impl RequestHeaders<'a>,
    ) -> Result<u64, CostError> {
        match &self.cost {
            Cost::Fixed(cost) => Ok(*cost),
            Cost::Header {
                name,
                default,
                min,
                max,
            } => {
                let malformed = CostError::Malformed { rule: index };
                let value = match headers.single(name.as_bytes()) {
                    Ok(None) => return Ok(*default),
                    Ok(Some(value)) => value,
                    Err(_) => return Err(malformed),
                };
                let cost = parse_cost(value).ok_or(malformed)?;
                if cost > *max {
                    return Err(CostError::AboveMax { rule: index, cost });
                }
                Ok(cost.max(*min))
            }
        }
    }

    /// Whether a key on `plan` may ever match this rule.
    pub fn may_apply_to(&self, plan: u16) -> bool {
        self.plans
            .is_none_or(|plans| plans & 1u64.checked_shl(u32::from(plan)).unwrap_or(0) != 0)
    }

    /// What this rule reads of a request.
    pub fn needs(&self) -> Needs {
        Needs {
            method: !self.methods.is_empty(),
            path: self.path.is_some(),
            host: !self.hosts.is_empty(),
        }
    }
}

/// A whole number from 1, plain ASCII digits (no sign, no spaces); at most
/// [`MAX_COST`] digits' worth.
fn parse_cost(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 10 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let cost = std::str::from_utf8(value).ok()?.parse::<u64>().ok()?;
    (1..=MAX_COST).contains(&cost).then_some(cost)
}

/// Compiles rule `index`; `plan_index` finds a plan by name.
pub fn compile(
    index: usize,
    rule: &RuleConfig,
    plan_index: impl Fn(&str) -> Option<usize>,
) -> Result<Rule, ConfigError> {
    let field = format!("rules[{index}]");
    if !is_name(&rule.name) {
        return Err(ConfigError::new(
            format!("{field}.name"),
            format!(
                "\"{}\" must be 1 to 64 characters of A-Z a-z 0-9 - _ .",
                rule.name
            ),
        ));
    }
    let m: &MatchConfig = &rule.matches;
    let at = |what: &str| format!("{field}.match.{what}");
    let methods = compile_list(&at("methods"), m.methods.as_deref(), "method", |t| {
        compile_method(t)
    })?;
    let paths = [
        (
            "path",
            m.path.as_deref(),
            PathMatch::exact as fn(&str) -> Result<PathMatch, String>,
        ),
        ("path_prefix", m.path_prefix.as_deref(), PathMatch::prefix),
        (
            "path_template",
            m.path_template.as_deref(),
            PathMatch::template,
        ),
    ];
    let mut path = None;
    for (what, text, compile_path) in paths {
        let Some(text) = text else { continue };
        if path.is_some() {
            return Err(ConfigError::new(
                at(what),
                "give one of \"path\", \"path_prefix\" and \"path_template\"",
            ));
        }
        path = Some(compile_path(text).map_err(|why| ConfigError::new(at(what), why))?);
    }
    let hosts = compile_list(&at("hosts"), m.hosts.as_deref(), "host", |t| {
        HostMatch::compile(t)
    })?;
    let headers = compile_list(
        &at("headers"),
        m.headers.as_deref(),
        "header condition",
        header_condition,
    )?;
    let plans = match &m.plans {
        None => None,
        Some(list) if list.is_empty() => {
            return Err(ConfigError::new(at("plans"), "must list at least one plan"))
        }
        Some(list) => {
            let mut bits = 0u64;
            for (i, name) in list.iter().enumerate() {
                let plan = plan_index(name).filter(|p| *p < 64).ok_or_else(|| {
                    ConfigError::new(
                        format!("{}[{i}]", at("plans")),
                        format!(
                            "no plan is named \"{name}\" (\"default\" is the top-level limits)"
                        ),
                    )
                })?;
                bits |= 1 << plan;
            }
            Some(bits)
        }
    };
    if methods.is_empty()
        && path.is_none()
        && hosts.is_empty()
        && headers.is_empty()
        && plans.is_none()
    {
        return Err(ConfigError::new(
            format!("{field}.match"),
            "matches nothing in particular; give methods, a path, hosts, headers or plans (\"path_prefix\": \"/\" matches every request)",
        ));
    }
    let cost = match &rule.cost {
        None => Cost::Fixed(1),
        Some(CostConfig::Fixed(cost)) => {
            if !(1..=MAX_COST).contains(cost) {
                return Err(ConfigError::new(
                    format!("{field}.cost"),
                    format!("must be from 1 to {MAX_COST}, got {cost}"),
                ));
            }
            Cost::Fixed(*cost)
        }
        Some(CostConfig::Header(h)) => {
            if !is_header_name(&h.header) {
                return Err(ConfigError::new(
                    format!("{field}.cost.header"),
                    format!("\"{}\" is not a valid header name", h.header),
                ));
            }
            if !(1..=MAX_COST).contains(&h.default) {
                return Err(ConfigError::new(
                    format!("{field}.cost.default"),
                    format!("must be from 1 to {MAX_COST}, got {}", h.default),
                ));
            }
            if !(h.default..=MAX_COST).contains(&h.max) {
                return Err(ConfigError::new(
                    format!("{field}.cost.max"),
                    format!(
                        "must be from the default ({}) to {MAX_COST}, got {}",
                        h.default, h.max
                    ),
                ));
            }
            let min = h.min.unwrap_or(1);
            if !(1..=h.default).contains(&min) {
                return Err(ConfigError::new(
                    format!("{field}.cost.min"),
                    format!("must be from 1 to the default ({}), got {min}", h.default),
                ));
            }
            Cost::Header {
                name: h.header.to_ascii_lowercase(),
                default: h.default,
                min,
                max: h.max,
            }
        }
    };
    let settle = rule
        .settle
        .as_ref()
        .map(|s| settle::compile(&field, s))
        .transpose()?;
    Ok(Rule {
        name: rule.name.clone(),
        methods,
        path,
        hosts,
        headers,
        plans,
        cost,
        settle,
    })
}

/// An optional list of conditions: absent is none; present, at least one,
/// each compiled by `compile`, an error naming `field[i]`.
fn compile_list<C, T>(
    field: &str,
    list: Option<&[C]>,
    what: &str,
    compile: impl Fn(&C) -> Result<T, String>,
) -> Result<Vec<T>, ConfigError> {
    match list {
        None => Ok(Vec::new()),
        Some([]) => Err(ConfigError::new(
            field,
            format!("must list at least one {what}"),
        )),
        Some(list) => list
            .iter()
            .enumerate()
            .map(|(i, item)| {
                compile(item).map_err(|why| ConfigError::new(format!("{field}[{i}]"), why))
            })
            .collect(),
    }
}

fn header_condition(h: &HeaderMatchConfig) -> Result<HeaderCondition, String> {
    if !is_header_name(&h.name) {
        return Err(format!("\"{}\" is not a valid header name", h.name));
    }
    let name = h.name.to_ascii_lowercase();
    match (&h.exact, h.present) {
        (Some(value), None) => Ok(HeaderCondition::Exact(name, value.as_bytes().to_vec())),
        (None, Some(present)) => Ok(HeaderCondition::Present(name, present)),
        _ => Err("give exactly one of \"exact\": \"<value>\" and \"present\": true|false".into()),
    }
}

/// A name of a rule or a plan.
pub fn is_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

pub fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_are_whole_numbers_from_one() {
        assert_eq!(parse_cost(b"10"), Some(10));
        assert_eq!(parse_cost(b"0"), None);
        for bad in [
            &b""[..],
            b"-1",
            b"+1",
            b" 1",
            b"1.0",
            b"1e3",
            b"0x10",
            b"99999999999",
        ] {
            assert_eq!(parse_cost(bad), None, "{bad:?}");
        }
    }
}
