//! Request drivers: [`paced`] (a fixed schedule, like a client polling at a rate) and
//! [`concurrent`] (a burst, everything in flight at once), and [`StatusTable`] to
//! summarise what came back.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// Calls `f(i)` for `i` in `0..count`, starting call `i` at `t0 + i * interval`.
///
/// The schedule is absolute (we sleep until each deadline, so there is no drift) and
/// each call runs on its own thread, so a slow answer never delays the next send.
/// Returns what the calls returned (usually a status code), in `i` order.
pub fn paced<F>(count: usize, interval: Duration, f: F) -> Vec<u16>
where
    F: Fn(usize) -> u16 + Sync,
{
    let f = &f;
    std::thread::scope(|s| {
        let t0 = Instant::now();
        let handles: Vec<_> = (0..count)
            .map(|i| {
                let deadline = t0 + interval * u32::try_from(i).unwrap_or(u32::MAX);
                sleep_until(deadline);
                s.spawn(move || f(i))
            })
            .collect();
        join_all(handles)
    })
}

/// Runs `f(i)` for `i` in `0..count` on `count` threads released together by a
/// barrier, so all of them are in flight at once. Returns the results in `i` order.
pub fn concurrent<F>(count: usize, f: F) -> Vec<u16>
where
    F: Fn(usize) -> u16 + Sync,
{
    concurrent_prepared(count, |_| (), |i, ()| f(i))
}

/// Like [`concurrent`], with a `setup(i)` per thread that runs *before* the barrier,
/// e.g. opening the connection, so the burst itself is only the requests.
pub fn concurrent_prepared<S, P, F>(count: usize, setup: P, f: F) -> Vec<u16>
where
    P: Fn(usize) -> S + Sync,
    F: Fn(usize, S) -> u16 + Sync,
{
    let barrier = Barrier::new(count);
    let (barrier, setup, f) = (&barrier, &setup, &f);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..count)
            .map(|i| {
                std::thread::Builder::new()
                    // Small stacks: 300 threads of the default 2 MiB is a lot of
                    // address space for a few lines of work each.
                    .stack_size(256 * 1024)
                    .spawn_scoped(s, move || {
                        let state = setup(i);
                        barrier.wait();
                        f(i, state)
                    })
                    .unwrap_or_else(|e| panic!("cannot start load thread {i}: {e}"))
            })
            .collect();
        join_all(handles)
    })
}

fn join_all(handles: Vec<std::thread::ScopedJoinHandle<'_, u16>>) -> Vec<u16> {
    handles
        .into_iter()
        .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        .collect()
}

/// The status of a request's outcome, with 0 for "no response" (a refused, reset or
/// timed-out connection), so drivers' closures can be one line:
/// `|_| load::status(http::get(&addr, "/"))`.
pub fn status(r: std::io::Result<crate::http::Response>) -> u16 {
    r.map_or(0, |r| r.status)
}

/// Sleeps until `deadline` (returns at once if it has passed).
pub fn sleep_until(deadline: Instant) {
    let now = Instant::now();
    if deadline > now {
        std::thread::sleep(deadline - now);
    }
}

/// How many times each status code came back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusTable {
    counts: BTreeMap<u16, usize>,
}

impl StatusTable {
    pub fn new(statuses: &[u16]) -> Self {
        statuses.iter().copied().collect()
    }

    pub fn count(&self, code: u16) -> usize {
        self.counts.get(&code).copied().unwrap_or(0)
    }

    pub fn total(&self) -> usize {
        self.counts.values().sum()
    }

    /// (code, count) pairs in code order.
    pub fn iter(&self) -> impl Iterator<Item = (u16, usize)> + '_ {
        self.counts.iter().map(|(c, n)| (*c, *n))
    }
}

impl FromIterator<u16> for StatusTable {
    fn from_iter<I: IntoIterator<Item = u16>>(iter: I) -> Self {
        let mut counts = BTreeMap::new();
        for c in iter {
            *counts.entry(c).or_insert(0) += 1;
        }
        StatusTable { counts }
    }
}

/// "200 x 10, 429 x 90" (codes in order; "none" when empty).
impl fmt::Display for StatusTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.counts.is_empty() {
            return f.write_str("none");
        }
        for (i, (code, n)) in self.counts.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{code} x {n}")?;
        }
        Ok(())
    }
}
