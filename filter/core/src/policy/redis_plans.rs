//! Plans read from Redis (`store.webdis.plans_from_redis`): which plans
//! Redis may name, the load-time checks that make any of them safe for any
//! key, and what applies once Redis has put a key on another plan.
//!
//! Only a plan's key-wide limits move with it. The rules that apply, and
//! their `plans` conditions, are matched against the plan the configuration
//! gives the key: the filter matches rules before it asks Redis.

use super::{Limits, Plan, Policy, DEFAULT_PLAN};
use crate::applied::{Applied, LimitRef};
use crate::batch::wire_plans::{self, PlanSet};
use crate::config::ConfigError;
use crate::gcra::Limit;
use crate::per_limit::{PerLimit, MAX_LIMITS};
use crate::policy::rules::Rule;

/// Bytes the plans' descriptions may take in a call: every call carries
/// them all (any key may be on any of them), within webdis's request size.
pub const MAX_PLANS_BYTES: usize = 4096;

const FIELD: &str = "store.webdis.plans_from_redis";

/// The plans Redis may name (`default` when it has limits, then the named
/// ones), after checking that every one of them fits with the rules of any
/// plan the configuration gives a key.
pub(super) fn compile(
    plans: &[Plan],
    named: usize,
    rules: &[Rule],
    rule_limits: &[Vec<u16>],
    limits: &Limits,
) -> Result<Vec<u16>, ConfigError> {
    if named == 0 {
        return Err(ConfigError::new(
            FIELD,
            "needs named `plans` for Redis to put keys on",
        ));
    }
    let default = plans
        .first()
        .filter(|p| !p.limits.is_empty())
        .map(|_| DEFAULT_PLAN);
    let nameable: Vec<u16> = default
        .into_iter()
        .chain((1..=named).filter_map(|p| u16::try_from(p).ok()))
        .collect();
    let bytes: usize = nameable
        .iter()
        .filter_map(|p| plans.get(usize::from(*p)))
        .map(|plan| {
            let compiled = instances(limits, &plan.limits);
            wire_plans::plan_bytes(&PlanSet {
                name: &plan.name,
                limits: compiled.as_slice(),
            })
        })
        .sum();
    if bytes > MAX_PLANS_BYTES {
        return Err(ConfigError::new(
            "plans",
            format!(
                "with plans_from_redis every call describes every plan: they take {bytes} bytes, at most {MAX_PLANS_BYTES}; use fewer plans or limits"
            ),
        ));
    }
    // The sets of rules a key can meet: one per configured plan, the same
    // for most.
    let mut rule_sets: Vec<(u32, &str)> = Vec::new();
    for (q, plan) in plans.iter().enumerate() {
        let q = u16::try_from(q).unwrap_or(u16::MAX);
        let mask = rules
            .iter()
            .enumerate()
            .filter(|(_, rule)| rule.may_apply_to(q))
            .fold(0u32, |mask, (r, _)| {
                mask | 1u32.checked_shl(r as u32).unwrap_or(0)
            });
        if !rule_sets.iter().any(|(m, _)| *m == mask) {
            rule_sets.push((mask, &plan.name));
        }
    }
    for p in &nameable {
        let Some(plan) = plans.get(usize::from(*p)) else {
            continue;
        };
        for (mask, configured) in &rule_sets {
            let plan_names: Vec<&str> = plan.limits.iter().map(|i| limits.name_of(*i)).collect();
            let mut count = plan_names.len();
            for (r, ids) in rule_limits.iter().enumerate() {
                if mask & 1u32.checked_shl(r as u32).unwrap_or(0) == 0 {
                    continue;
                }
                count += ids.len();
                if let Some(name) = ids
                    .iter()
                    .map(|id| limits.name_of(*id))
                    .find(|name| plan_names.contains(name))
                {
                    return Err(ConfigError::new(
                        FIELD,
                        format!(
                            "the limit name \"{name}\" of plan \"{}\" is also a limit of rules[{r}]; a key moved to that plan in Redis would count both in one field",
                            plan.name
                        ),
                    ));
                }
            }
            if count > MAX_LIMITS {
                return Err(ConfigError::new(
                    FIELD,
                    format!(
                        "a key the configuration puts on plan \"{configured}\", moved to plan \"{}\" in Redis, can meet {count} limits (that plan's and the rules'); one key's state holds at most {MAX_LIMITS}",
                        plan.name
                    ),
                ));
            }
        }
    }
    Ok(nameable)
}

fn instances(limits: &Limits, ids: &[u16]) -> PerLimit<Limit> {
    ids.iter()
        .filter_map(|id| limits.instances.get(usize::from(*id)).copied())
        .collect()
}

impl Policy {
    /// Whether keys' plans are read from Redis.
    pub fn plans_from_redis(&self) -> bool {
        !self.redis_plans.is_empty()
    }

    /// The plans Redis may name, in the order every call describes them.
    pub fn redis_plans(&self) -> &[u16] {
        &self.redis_plans
    }

    /// A plan's name.
    pub fn plan_name(&self, plan: u16) -> &str {
        self.plans.get(usize::from(plan)).map_or("", |p| &p.name)
    }

    /// A plan's key-wide limits.
    pub fn plan_limits(&self, plan: u16) -> PerLimit<Limit> {
        self.plan_instances(plan)
            .iter()
            .filter_map(|i| self.instance(*i).copied())
            .collect()
    }

    /// `applied` as it is once Redis has put the key on `plan`: that plan's
    /// key-wide limits, then the same rules' limits (matched against the
    /// configuration's plan, `applied.plan`).
    pub fn on_plan(&self, applied: &Applied, plan: u16) -> Applied {
        let own = self.plan_instances(plan).iter().map(|instance| LimitRef {
            instance: *instance,
            cost: 1,
        });
        let rules = self.rules_only(applied);
        Applied {
            plan,
            rules: applied.rules,
            limits: own.chain(rules.limits.iter().copied()).collect(),
        }
    }

    /// The rules' part of `applied`, without its plan's limits.
    pub fn rules_only(&self, applied: &Applied) -> Applied {
        let skip = self.plan_instances(applied.plan).len();
        Applied {
            limits: applied.limits.iter().skip(skip).copied().collect(),
            ..*applied
        }
    }

    /// What the deny cache may decide a request on. With plans from Redis,
    /// only its rules' limits: its key-wide ones depend on a plan that Redis
    /// may have changed since the cache learnt them, and a move must take
    /// effect on the next request. Never the limits of a rule that settles
    /// its cost from the response: a refund (on any replica) lowers their
    /// state, and the cache is right only about states that never go down.
    pub fn cacheable(&self, applied: &Applied) -> Applied {
        let applied = if self.plans_from_redis() {
            self.rules_only(applied)
        } else {
            *applied
        };
        crate::settle::without_settled(self, &applied)
    }
}

#[cfg(test)]
mod tests {
    use crate::policy::Policy;
    use crate::testing::{applied_of, policy, Headers};

    const PLANS: &str = r#""plans": {"free": [{"rate": "3/min", "name": "free"}],
        "pro": [{"rate": "10/min", "name": "pro"}, {"rate": "1000/d", "name": "daily"}]},
        "keys": {"free": ["k-free"]}"#;

    fn refusal(json: &str) -> (String, String) {
        let e = Policy::from_json(json.as_bytes()).unwrap_err();
        (e.field, e.message)
    }

    #[test]
    fn plans_redis_may_name_are_default_with_limits_and_the_named_ones() {
        let p = policy(&format!(
            r#"{{"limits": ["1/s"], {PLANS}, "overrides": [{{"key": "o", "limits": ["2/s"]}}],
                "store": {{"webdis": {{"plans_from_redis": true}}}}}}"#
        ));
        assert!(p.plans_from_redis());
        let names: Vec<&str> = p.redis_plans().iter().map(|i| p.plan_name(*i)).collect();
        assert_eq!(names, ["default", "free", "pro"]);
        // Without top-level limits, `default` has none to give.
        let p = policy(&format!(
            r#"{{{PLANS}, "default_plan": "free", "store": {{"webdis": {{"plans_from_redis": true}}}}}}"#
        ));
        let names: Vec<&str> = p.redis_plans().iter().map(|i| p.plan_name(*i)).collect();
        assert_eq!(names, ["free", "pro"]);
        // Off by default: nothing changes.
        let p = policy(&format!(
            r#"{{"limits": ["1/s"], {PLANS}, "store": {{"webdis": {{}}}}}}"#
        ));
        assert!(!p.plans_from_redis());
    }

    #[test]
    fn a_move_changes_only_the_key_wide_limits_and_the_cache_sees_only_the_rules() {
        let p = policy(&format!(
            r#"{{"limits": ["1/s"], {PLANS},
                "rules": [{{"name": "llm", "match": {{"path_prefix": "/v1"}},
                            "limits": ["100/min"], "cost": {{"header": "x-cost", "default": 1, "max": 50}}}}],
                "store": {{"webdis": {{"plans_from_redis": true}}}}}}"#
        ));
        let headers = Headers::of(&[(":path", b"/v1/chat?api_key=k-free"), ("x-cost", b"7")]);
        let free = match crate::pipeline::start(&p, &headers.map()) {
            crate::pipeline::Start::Decide { applied, .. } => applied,
            other => panic!("{other:?}"),
        };
        let names = |a: &crate::applied::Applied| -> Vec<(String, u64)> {
            p.limits(a)
                .iter()
                .map(|l| (l.name.as_str().to_string(), l.cost))
                .collect()
        };
        assert_eq!(
            names(&free),
            [("free".into(), 1), ("llm:100/min".into(), 7)]
        );
        let pro_plan = p.redis_plans()[2];
        let pro = p.on_plan(&free, pro_plan);
        assert_eq!(
            names(&pro),
            [
                ("pro".into(), 1),
                ("daily".into(), 1),
                ("llm:100/min".into(), 7)
            ]
        );
        assert_eq!((pro.plan, pro.rules), (pro_plan, free.rules));
        assert_eq!(p.on_plan(&pro, free.plan), free);
        assert_eq!(names(&p.cacheable(&free)), [("llm:100/min".into(), 7)]);
        assert_eq!(p.cacheable(&pro).limits, p.cacheable(&free).limits);
        // Off: the cache sees everything.
        let off = policy(r#"{"limits": ["1/s"], "store": {"webdis": {}}}"#);
        let a = applied_of(&off, "k");
        assert_eq!(off.cacheable(&a), a);
    }

    #[test]
    fn plans_from_redis_is_refused_when_a_moved_key_could_not_be_decided() {
        let field = "store.webdis.plans_from_redis";
        // No named plan to move keys to.
        assert_eq!(
            refusal(r#"{"limits": ["1/s"], "store": {"webdis": {"plans_from_redis": true}}}"#).0,
            field
        );
        // A rule of plan free only, whose limit name pro also uses: fine
        // for the configuration (pro never meets that rule), not for a
        // free key moved to pro.
        let json = r#"{"limits": ["1/s"], "plans": {"free": ["3/min"], "pro": ["10/min"]},
            "rules": [{"name": "r", "match": {"path": "/x", "plans": ["free"]},
                       "limits": [{"rate": "5/min", "name": "10/min"}]}],
            "store": {"webdis": {"plans_from_redis": PFR}}}"#;
        assert!(Policy::from_json(json.replace("PFR", "false").as_bytes()).is_ok());
        let (f, message) = refusal(&json.replace("PFR", "true"));
        assert_eq!(f, field);
        assert!(message.contains("\"10/min\" of plan \"pro\""), "{message}");
        // Too many limits: 12 on pro, 5 from the rules free keys meet.
        let many: Vec<String> = (1..=12).map(|i| format!("\"{i}/h\"")).collect();
        let rules: Vec<String> = (1..=5)
            .map(|i| format!(r#"{{"name": "r{i}", "match": {{"path": "/{i}", "plans": ["free"]}}, "limits": ["{i}/s"]}}"#))
            .collect();
        let json = format!(
            r#"{{"limits": ["1/s"], "plans": {{"free": ["3/min"], "pro": [{}]}}, "rules": [{}],
                "store": {{"webdis": {{"plans_from_redis": true}}}}}}"#,
            many.join(","),
            rules.join(",")
        );
        let (f, message) = refusal(&json);
        assert_eq!(f, field);
        assert!(message.contains("17 limits"), "{message}");
        // Plans too large to describe in every call.
        let plans: Vec<String> = (0..60)
            .map(|i| {
                let limits: Vec<String> = (1..=8).map(|j| format!("\"{j}/{}h\"", i + 1)).collect();
                format!(r#""plan-{i}": [{}]"#, limits.join(","))
            })
            .collect();
        let json = format!(
            r#"{{"limits": ["1/s"], "plans": {{{}}}, "store": {{"webdis": {{"plans_from_redis": true}}}}}}"#,
            plans.join(",")
        );
        assert_eq!(refusal(&json).0, "plans");
    }
}
