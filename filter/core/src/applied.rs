//! The limits that apply to one request: its plan's key-wide limits and
//! those of every rule it matches, each with what the request costs there.
//! A small `Copy` value of references into the policy, so that a request
//! waiting for Redis carries it cheaply; [`crate::Policy::limits`] turns it
//! into the limits themselves.

use crate::per_limit::PerLimit;

/// A limit of the policy (its place in the policy's table of compiled
/// limits) and the request's cost under it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct LimitRef {
    pub instance: u16,
    pub cost: u32,
}

/// What applies to one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Applied {
    /// The key's plan.
    pub plan: u16,
    /// Bit `i`: rule `i` matched.
    pub rules: u32,
    /// Plan limits first, then each matching rule's, in rule order.
    pub limits: PerLimit<LimitRef>,
}

impl Applied {
    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }

    /// The indices of the matching rules.
    pub fn matched_rules(&self) -> impl Iterator<Item = usize> + '_ {
        (0..u32::BITS as usize).filter(|i| self.rules & (1 << i) != 0)
    }
}
