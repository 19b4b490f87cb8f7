//! Calendar quotas with a fake clock: what a quota admits, when it resets
//! (month ends of 28 to 31 days, leap years, offsets, week starts, the
//! boundary to the nanosecond), and that its state keeps every promise a
//! TAT does in each store: the local slots on the monotonic clock, Redis's
//! answers replayed, and the deny cache.

use proptest::prelude::*;

use super::*;
use crate::batch::replay::replay;
use crate::batch::wire::EntryReply;
use crate::calendar::{days_from_civil, PeriodKind, Weekday};
use crate::deny_cache;
use crate::gcra::{decide, Clock, Decision, Limit, LimitState};
use crate::slots::{Outcome, SlotTable};
use crate::testing::{key_hash, limit, named_limit, quota_limit, MemStore, S};

const DAY: u64 = 86_400 * S;

/// Unix nanoseconds of a UTC date and time.
fn at(year: i64, month: u32, day: u32, hour: u64, minute: u64) -> u64 {
    let days = u64::try_from(days_from_civil(year, month, day)).unwrap();
    days * DAY + (hour * 3600 + minute * 60) * S
}

/// Local midnight of a date at `offset_minutes`, as Unix nanoseconds.
fn local_midnight(year: i64, month: u32, day: u32, offset_minutes: i16) -> u64 {
    let offset = i64::from(offset_minutes) * 60 * 1_000_000_000;
    u64::try_from(i64::try_from(at(year, month, day, 0, 0)).unwrap() - offset).unwrap()
}

fn allowed(limits: &[Limit], tats: &mut [u64], now: u64) -> bool {
    decide(limits, tats, now).allowed
}

#[test]
fn a_value_packs_its_end_and_used_count() {
    let end = 1_764_547_200 * S;
    let (rounded, used) = unpack(pack(end, 7, true));
    assert_eq!(used, 7);
    assert!(rounded >= end && rounded - end < END_UNIT);
    let (down, used) = unpack(pack(end, 1_000_000_000, false));
    assert!(down <= end && end - down < END_UNIT);
    assert_eq!(used, 1_000_000_000);
    assert_eq!(unpack(0), (0, 0));
    // A value is never below its end: ordered as TATs are.
    assert!(pack(end, 0, true) >= end);
}

#[test]
fn a_daily_quota_admits_its_count_then_denies_until_midnight_to_the_nanosecond() {
    let daily = [quota_limit("daily", 3, PeriodKind::Day, 0)];
    let mut tats = [0];
    let now = at(2026, 3, 14, 15, 0);
    let midnight = at(2026, 3, 15, 0, 0);
    for left in [2, 1, 0] {
        let d = decide(&daily, &mut tats, now);
        assert!(d.allowed);
        assert_eq!(
            d.states()[0],
            LimitState {
                remaining: left,
                reset_nanos: midnight - now,
                window_seconds: 86_400
            }
        );
    }
    let before = tats;
    let d = decide(&daily, &mut tats, now + S);
    assert!(!d.allowed);
    assert_eq!(d.retry_after_nanos, midnight - now - S);
    assert_eq!(d.binding(), Some(0));
    assert_eq!(tats, before, "a denial consumes nothing");
    assert!(!allowed(&daily, &mut tats, midnight - 1));
    let d = decide(&daily, &mut tats, midnight);
    assert!(d.allowed);
    assert_eq!(d.states()[0].remaining, 2);
    assert_eq!(d.states()[0].reset_nanos, DAY);
}

#[test]
fn month_ends_of_28_29_30_and_31_days_reset_on_the_first_in_every_offset() {
    // (year, month, its days): leap 2000 and 2024, not 2100 nor 2023.
    let months = [
        (2000, 2, 29),
        (2100, 2, 28),
        (2023, 2, 28),
        (2024, 2, 29),
        (2026, 4, 30),
        (2026, 3, 31),
        (2025, 12, 31),
    ];
    for (year, month, days) in months {
        let (next_year, next_month) = if month == 12 {
            (year + 1, 1)
        } else {
            (year, month + 1)
        };
        for offset in [-840, -330, 0, 120, 840] {
            let context = format!("{year}-{month} at {offset} minutes");
            let monthly = [quota_limit("monthly", 2, PeriodKind::Month, offset)];
            let start = local_midnight(year, month, 1, offset);
            let next = local_midnight(next_year, next_month, 1, offset);
            assert_eq!(next - start, days * DAY, "{context}");
            let mut tats = [0];
            let first = decide(&monthly, &mut tats, start);
            assert!(first.allowed, "{context}");
            assert_eq!(first.states()[0].window_seconds, days * 86_400, "{context}");
            assert_eq!(first.states()[0].reset_nanos, next - start, "{context}");
            assert!(allowed(&monthly, &mut tats, next - DAY), "{context}");
            let last = decide(&monthly, &mut tats, next - 1);
            assert!(!last.allowed, "{context}");
            assert_eq!(last.retry_after_nanos, 1, "{context}");
            let reset = decide(&monthly, &mut tats, next);
            assert!(reset.allowed, "{context}");
            assert_eq!(reset.states()[0].remaining, 1, "{context}");
        }
    }
}

#[test]
fn a_weekly_quota_resets_on_its_first_day() {
    // 2000-03-01 was a Wednesday.
    let wednesday = local_midnight(2000, 3, 1, 60);
    let week = |start: u8| {
        let period = Period {
            kind: PeriodKind::Week,
            offset_minutes: 60,
            week_start: Weekday(start),
        };
        [Limit::quota("weekly", 1, period).unwrap()]
    };
    let mut tats = [0];
    assert!(allowed(&week(2), &mut tats, wednesday - 1));
    assert!(allowed(&week(2), &mut tats, wednesday), "a new week");
    let d = decide(&week(2), &mut tats, wednesday + 3 * DAY);
    assert_eq!((d.allowed, d.retry_after_nanos), (false, 4 * DAY));
    // From Monday, the same moments are one week: Monday 2000-02-28.
    let mut tats = [0];
    assert!(allowed(&week(0), &mut tats, wednesday - 1));
    let d = decide(&week(0), &mut tats, wednesday);
    assert_eq!((d.allowed, d.retry_after_nanos), (false, 5 * DAY));
    assert_eq!(d.states()[0].window_seconds, 7 * 86_400);
}

#[test]
fn a_cost_spends_that_many_units_and_a_denial_spends_nothing_from_any_limit() {
    let quota = quota_limit("tokens", 10, PeriodKind::Day, 0);
    let rate = limit(100, 60, 100);
    let now = at(2026, 6, 1, 12, 0);
    let end = at(2026, 6, 2, 0, 0);
    let mut tats = [0, 0];
    let costing = |cost| [quota.costing(cost), rate];
    assert!(allowed(&costing(4), &mut tats, now));
    assert!(allowed(&costing(4), &mut tats, now));
    let before = tats;
    let d = decide(&costing(4), &mut tats, now);
    assert_eq!((d.allowed, d.retry_after_nanos), (false, end - now));
    assert_eq!(d.states()[0].remaining, 2);
    assert_eq!(tats, before, "the rate moved for a denied request");
    let d = decide(&costing(2), &mut tats, now);
    assert!(d.allowed);
    assert_eq!(d.states()[0].remaining, 0);
    // A rate that denies leaves the quota's count where it is.
    let strict = [
        quota_limit("tokens", 10, PeriodKind::Day, 0),
        limit(1, 60, 1),
    ];
    let mut tats = [0, 0];
    assert!(allowed(&strict, &mut tats, now));
    let before = tats;
    let d = decide(&strict, &mut tats, now + S);
    assert_eq!((d.allowed, d.binding()), (false, Some(1)));
    assert_eq!(d.states()[0].remaining, 9);
    assert_eq!(tats, before);
    // Both deny: Retry-After is the longer wait, and names the quota.
    let spent = [quota_limit("one", 1, PeriodKind::Day, 0), limit(1, 60, 1)];
    let mut tats = [0, 0];
    assert!(allowed(&spent, &mut tats, now));
    let d = decide(&spent, &mut tats, now + S);
    assert_eq!(d.retry_after_nanos, end - now - S);
    assert_eq!(d.binding(), Some(0));
    assert_eq!(d.denied_by, 0b11);
}

#[test]
fn a_quota_without_a_wall_clock_admits_nothing() {
    let daily = [quota_limit("daily", 3, PeriodKind::Day, 0)];
    let d = decide(&daily, &mut [0], Clock::local(5 * S, None));
    assert!(!d.allowed);
    assert_eq!(d.retry_after_nanos, S);
}

/// The monotonic clock of a local-mode test when the wall clock said `since`.
const BOOT: u64 = 1_000 * S;

/// Local mode `elapsed` after the wall clock said `since`, the wall clock
/// now saying `wall` (`since + elapsed` unless it stepped).
fn local_at(elapsed: u64, wall: u64) -> Clock {
    Clock::local(BOOT + elapsed, Some(wall))
}

fn local(wall: u64, since: u64) -> Clock {
    local_at(wall - since, wall)
}

#[test]
fn in_local_mode_the_count_is_kept_on_the_monotonic_clock_and_the_boundary_is_the_wall_clocks() {
    let table = SlotTable::new(16, 8);
    let mut store = MemStore::default();
    let key = key_hash(b"k");
    let daily = [quota_limit("daily", 2, PeriodKind::Day, -300)];
    let start = at(2026, 3, 14, 12, 0);
    let midnight = local_midnight(2026, 3, 15, -300);
    let decide =
        |store: &mut MemStore, clock: Clock| match table.decide(store, key, &daily, clock).unwrap()
        {
            Outcome::Decided { decision, .. } => decision,
            other => panic!("{other:?}"),
        };
    assert!(decide(&mut store, local(start, start)).allowed);
    // 10 s later the wall clock steps back an hour, then forward three:
    // the count stays (the same period), the reset follows the wall clock.
    let hour = 3600 * S;
    assert!(decide(&mut store, local_at(10 * S, start + 10 * S - hour)).allowed);
    let d = decide(&mut store, local_at(11 * S, start + 11 * S + 2 * hour));
    assert!(!d.allowed);
    assert_eq!(d.retry_after_nanos, midnight - start - 11 * S - 2 * hour);
    // At the wall clock's midnight, whatever the monotonic clock says.
    let stepped = 2 * hour;
    assert!(
        !decide(
            &mut store,
            local_at(midnight - 1 - start - stepped, midnight - 1)
        )
        .allowed
    );
    let d = decide(&mut store, local_at(midnight - start - stepped, midnight));
    assert!(d.allowed);
    assert_eq!(d.states()[0].remaining, 1);
}

#[test]
fn local_and_wall_clock_decisions_agree() {
    // The same requests decided with TATs on the wall clock (as in Redis)
    // and on a monotonic clock beside it (as in local mode).
    let limits = [
        quota_limit("d", 3, PeriodKind::Day, 90),
        quota_limit("m", 5, PeriodKind::Month, -60),
        limit(4, 3600, 2),
    ];
    let since = at(2024, 2, 28, 20, 0);
    let (mut wall_tats, mut local_tats) = ([0; 3], [0; 3]);
    let mut now = since;
    for step in 0..400u64 {
        now += (step * 7_919 % 13) * 997 * S;
        let on_wall = decide(&limits, &mut wall_tats, now);
        let on_local = decide(&limits, &mut local_tats, local(now, since));
        assert_eq!(on_wall, on_local, "step {step} at {now}");
    }
}

/// Keys whose candidates in a 4-slot table are all four slots.
fn four_slot_keys(table: &SlotTable, n: usize) -> Vec<crate::hash::KeyHash> {
    (0..)
        .map(|i| key_hash(format!("key-{i}").as_bytes()))
        .filter(|k| {
            let mut c = table.candidates(*k).to_vec();
            c.sort();
            c.dedup();
            c.len() == 4
        })
        .take(n)
        .collect()
}

#[test]
fn a_spent_quota_keeps_its_slot_until_its_period_ends() {
    // Four slots: every key has the same four candidates.
    let table = SlotTable::new(4, 8);
    let mut store = MemStore::default();
    let daily = [quota_limit("daily", 1, PeriodKind::Day, 0)];
    let start = at(2026, 3, 14, 12, 0);
    let midnight = at(2026, 3, 15, 0, 0);
    let keys = four_slot_keys(&table, 5);
    let decide =
        |store: &mut MemStore, key, wall| table.decide(store, key, &daily, local(wall, start));
    for key in &keys[..4] {
        assert!(matches!(
            decide(&mut store, *key, start).unwrap(),
            Outcome::Decided { decision, .. } if decision.allowed
        ));
    }
    // Every slot holds a key whose quota is spent until midnight: the
    // newcomer waits for midnight (as stored: rounded up to 1.07 s) rather
    // than reset one of them.
    let (stored_midnight, _) = unpack(pack(BOOT + midnight - start, 0, true));
    assert_eq!(
        decide(&mut store, keys[4], start + S).unwrap(),
        Outcome::Full {
            retry_after_nanos: stored_midnight - (BOOT + S)
        }
    );
    // After it their states are idle, and taken over at no loss.
    assert!(matches!(
        decide(&mut store, keys[4], midnight + 2 * S).unwrap(),
        Outcome::Decided { decision, placement: crate::slots::Placement::Fresh, .. } if decision.allowed
    ));
}

/// Redis's side in the Rust tests: a quota's value is `end + used` µs (ns
/// here), as `gcra.lua` keeps it.
fn lua_value(period: &Period, used: u64, now: u64) -> u64 {
    period.end_nanos(now).0 + used * 1_000
}

#[test]
fn replayed_answers_read_redis_values_of_this_period_and_of_an_older_one() {
    let daily = [quota_limit("daily", 3, PeriodKind::Day, 0)];
    let period = daily[0].period.unwrap();
    let now = at(2026, 3, 14, 23, 59);
    let now_us = now / 1_000;
    // Redis answers the value less now: two used today.
    let debt = lua_value(&period, 2, now) - now;
    let entry = EntryReply {
        admitted: 1,
        debts_us: [debt / 1_000].into_iter().collect(),
    };
    let replayed = replay(&daily, now_us, &entry, 2).unwrap();
    let seen: Vec<(bool, u64)> = replayed
        .decisions
        .iter()
        .map(|d| (d.allowed, d.states()[0].remaining))
        .collect();
    assert_eq!(seen, [(true, 0), (false, 0)]);
    // Just after midnight, yesterday's value (still in the future: it ends
    // `used` microseconds past midnight) is nothing used.
    let after = at(2026, 3, 15, 0, 0);
    let old = lua_value(&period, 3, now);
    assert!(old > after);
    let entry = EntryReply {
        admitted: 3,
        debts_us: [(old - after) / 1_000].into_iter().collect(),
    };
    let replayed = replay(&daily, after / 1_000, &entry, 4).unwrap();
    let admitted = replayed.decisions.iter().filter(|d| d.allowed).count();
    assert_eq!(admitted, 3);
}

/// What the deny cache holds after an answer at Redis time `redis_now`,
/// sent at monotonic `sent_at` and received `rtt` later.
fn cached(limits: &[Limit], last: &Decision, sent_at: u64, rtt: u64) -> Vec<u8> {
    let mut buf = [0; crate::state::MAX_VALUE];
    let answer = deny_cache::Answer {
        sent_at,
        received_at: sent_at + rtt,
        states: last.states(),
    };
    deny_cache::entry(&mut buf, &[], key_hash(b"k"), limits, answer).to_vec()
}

#[test]
fn the_deny_cache_denies_a_spent_quota_until_its_period_ends_never_later() {
    let limits = [
        quota_limit("daily", 2, PeriodKind::Day, 0),
        named_limit("fast", 100, 1, 100),
    ];
    let redis_now = at(2026, 3, 14, 23, 0);
    let reset = at(2026, 3, 15, 0, 0) - redis_now;
    let mut tats = [0, 0];
    decide(&limits, &mut tats, redis_now);
    let last = decide(&limits, &mut tats, redis_now);
    assert!(deny_cache::worth_remembering(&last, &limits));
    let (sent_at, rtt) = (BOOT, 300_000_000);
    let entry = cached(&limits, &last, sent_at, rtt);
    let key = key_hash(b"k");
    // Denied from the cache until the reset's lower bound (Redis decided
    // no earlier than the sending), ...
    let asked = sent_at + rtt + 60 * S;
    let d = deny_cache::lookup(&limits, &entry, key, asked, None).unwrap();
    assert_eq!(d.binding(), Some(0));
    // ... with a Retry-After that is never early, wherever in the round
    // trip Redis decided.
    for decided_at in [sent_at, sent_at + rtt] {
        assert!(asked + d.retry_after_nanos >= decided_at + reset);
    }
    assert!(d.retry_after_nanos <= reset + rtt + END_UNIT);
    assert!(
        deny_cache::lookup(&limits, &entry, key, sent_at + reset - END_UNIT - 1, None).is_some()
    );
    // From the period's end (its lower bound) on, Redis decides again.
    assert!(deny_cache::lookup(&limits, &entry, key, sent_at + reset, None).is_none());
    // A quota with room left is no cached denial, unless the request costs
    // more than is left.
    let once = decide(&limits, &mut [0, 0], redis_now);
    assert!(!deny_cache::worth_remembering(&once, &limits));
    let entry = cached(&limits, &once, sent_at, rtt);
    assert!(deny_cache::lookup(&limits, &entry, key, asked, None).is_none());
    let costly = [limits[0].costing(2), limits[1]];
    assert!(deny_cache::lookup(&costly, &entry, key, asked, None).is_some());
}

fn arb_period() -> impl Strategy<Value = Period> {
    (
        prop::sample::select(vec![PeriodKind::Day, PeriodKind::Week, PeriodKind::Month]),
        -840i16..=840,
        0u8..7,
    )
        .prop_map(|(kind, offset_minutes, week_start)| Period {
            kind,
            offset_minutes,
            week_start: Weekday(week_start),
        })
}

/// Request times from 2000-02-20 on, `gaps` seconds apart (some sub-second).
fn times(gaps: Vec<(u64, u64)>) -> Vec<u64> {
    let mut now = at(2000, 2, 20, 0, 0);
    gaps.into_iter()
        .map(|(seconds, nanos)| {
            now += seconds * S + nanos;
            now
        })
        .collect()
}

proptest! {
    /// Within one period at most N units are admitted, costs included; a
    /// denial waits exactly until the period's end, when the request fits.
    #[test]
    fn never_more_than_the_quota_in_a_period_and_retry_after_is_exact(
        period in arb_period(),
        count in 1u64..8,
        requests in prop::collection::vec(((0u64..40_000, 0u64..1_000_000_000), 1u64..4), 1..200),
    ) {
        let quota = Limit::quota("q", count, period).unwrap();
        let mut tats = [0];
        let mut spent: std::collections::BTreeMap<i64, u64> = Default::default();
        let (gaps, costs): (Vec<_>, Vec<_>) = requests.into_iter().unzip();
        for (now, cost) in times(gaps).into_iter().zip(costs) {
            let limits = [quota.costing(cost)];
            let start = period.bounds(i64::try_from(now / S).unwrap()).start;
            let before = tats;
            let d = decide(&limits, &mut tats, now);
            let used = spent.entry(start).or_default();
            if d.allowed {
                *used += cost;
                prop_assert!(*used <= count);
            } else {
                prop_assert!(*used + cost > count);
                let (end, _) = period.end_nanos(now);
                prop_assert_eq!(d.retry_after_nanos, end - now);
                prop_assert!(!decide(&limits, &mut before.clone(), end - 1).allowed);
                prop_assert_eq!(decide(&limits, &mut before.clone(), end).allowed, cost <= count);
            }
            prop_assert_eq!(d.states()[0].remaining, count - *used);
        }
    }

    /// Replaying Redis's answers (values as `gcra.lua` keeps them) gives
    /// the decisions of the same requests decided one by one.
    #[test]
    fn replayed_quotas_equal_sequential_decisions(
        period in arb_period(),
        count in 1u64..8,
        calls in prop::collection::vec(((0u64..30_000, 0u64..1_000_000), 1usize..6, 1u64..3), 1..60),
    ) {
        let quota = Limit::quota("q", count, period).unwrap();
        let mut tats = [0];
        let mut lua = 0u64;
        let (gaps, rest): (Vec<_>, Vec<_>) = calls.into_iter().map(|(g, n, c)| (g, (n, c))).unzip();
        for (now, (requests, cost)) in times(gaps).into_iter().zip(rest) {
            let now = now / 1_000 * 1_000;
            let limits = [quota.costing(cost)];
            let sequential: Vec<Decision> = (0..requests).map(|_| decide(&limits, &mut tats, now)).collect();
            let admitted = sequential.iter().filter(|d| d.allowed).count() as u64;
            let entry = EntryReply { admitted, debts_us: [lua.saturating_sub(now) / 1_000].into_iter().collect() };
            let replayed = replay(&limits, now / 1_000, &entry, requests).unwrap();
            prop_assert_eq!(&replayed.decisions, &sequential);
            // Redis's new value, as the function computes it.
            let (end, _) = period.end_nanos(now);
            let used = lua.saturating_sub(end) / 1_000;
            if admitted > 0 {
                lua = end + (used + admitted * cost) * 1_000;
            }
        }
    }
}
