//! Request drivers: [`paced`] (a fixed schedule, like a client polling at a rate),
//! [`concurrent`] (a burst, everything in flight at once) and [`Sustained`] (many
//! clients sending back to back, in the background, every request timed), and
//! [`StatusTable`] to summarise what came back.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::http::{Conn, Response};
use crate::Error;

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
pub fn concurrent_prepared<S, T, P, F>(count: usize, setup: P, f: F) -> Vec<T>
where
    P: Fn(usize) -> S + Sync,
    F: Fn(usize, S) -> T + Sync,
    T: Send,
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

fn join_all<T>(handles: Vec<std::thread::ScopedJoinHandle<'_, T>>) -> Vec<T> {
    handles
        .into_iter()
        .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        .collect()
}

/// How a [`Sustained`] load runs. Each client has its own keep-alive connection
/// (a new one after a failure or a `Connection: close`) and sends its next request
/// once it has the previous answer and `pause` has passed.
#[derive(Debug, Clone, Copy)]
pub struct SustainedSpec {
    pub clients: usize,
    pub pause: Duration,
    /// How long a client waits for an answer; past it the request is recorded
    /// as unanswered (`Err`), so no client ever hangs.
    pub answer_timeout: Duration,
    /// Bounds: a load never stopped still ends after `max_run`, and no client
    /// sends more than `max_requests`.
    pub max_run: Duration,
    pub max_requests: usize,
}

/// One request of a [`Sustained`] load, on the client's clock.
#[derive(Debug, Clone)]
pub struct Sample<T> {
    pub client: usize,
    /// Just before the request was written.
    pub sent: Instant,
    /// Just after its answer (or the failure) was read.
    pub answered: Instant,
    pub outcome: T,
}

/// A load running in the background until [`Sustained::stop`] (or its bounds).
/// Dropping it stops the clients too, without waiting for them.
pub struct Sustained<T> {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample<T>>>>,
    clients: Vec<JoinHandle<()>>,
}

impl<T: Send + 'static> Sustained<T> {
    /// Client `c` talks to `addrs[c % addrs.len()]` and sends `target(c, n)` as
    /// its `n`-th request; `outcome` keeps what a test needs of each answer.
    pub fn start<R, O>(spec: SustainedSpec, addrs: &[String], target: R, outcome: O) -> Self
    where
        R: Fn(usize, usize) -> String + Send + Sync + 'static,
        O: Fn(io::Result<Response>) -> T + Send + Sync + 'static,
    {
        assert!(!addrs.is_empty(), "a load needs an address");
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (target, outcome) = (Arc::new(target), Arc::new(outcome));
        let end = Instant::now() + spec.max_run;
        let clients = (0..spec.clients)
            .map(|c| {
                let addr = addrs[c % addrs.len()].clone();
                let (stop, samples) = (stop.clone(), samples.clone());
                let (target, outcome) = (target.clone(), outcome.clone());
                std::thread::Builder::new()
                    .stack_size(256 * 1024)
                    .spawn(move || {
                        let mut conn: Option<Conn> = None;
                        for n in 0..spec.max_requests {
                            if stop.load(Ordering::Relaxed) || Instant::now() >= end {
                                break;
                            }
                            let sent = Instant::now();
                            let result = one_request(&mut conn, &addr, &target(c, n), spec);
                            let answered = Instant::now();
                            let sample = Sample {
                                client: c,
                                sent,
                                answered,
                                outcome: outcome(result),
                            };
                            lock(&samples).push(sample);
                            std::thread::sleep(spec.pause);
                        }
                    })
                    .unwrap_or_else(|e| panic!("cannot start load client {c}: {e}"))
            })
            .collect();
        Sustained {
            stop,
            samples,
            clients,
        }
    }

    /// Waits up to `timeout` until at least `count` requests answered so far
    /// match `matches`; returns how many did.
    pub fn wait_for(
        &self,
        count: usize,
        timeout: Duration,
        matches: impl Fn(&Sample<T>) -> bool,
    ) -> Result<usize, Error> {
        let seen = || lock(&self.samples).iter().filter(|s| matches(s)).count();
        crate::poll_until(timeout, Duration::from_millis(5), || {
            Some(seen()).filter(|n| *n >= count)
        })
        .ok_or_else(|| Error(format!("{} of {count} requests after {timeout:?}", seen())))
    }

    /// Stops the clients, waits for their last answers (each bounded by the
    /// answer timeout), and returns every request in the order sent.
    pub fn stop(mut self) -> Vec<Sample<T>> {
        self.stop.store(true, Ordering::Relaxed);
        for client in std::mem::take(&mut self.clients) {
            client
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
        }
        let mut samples = std::mem::take(&mut *lock(&self.samples));
        samples.sort_by_key(|s| s.sent);
        samples
    }
}

impl<T> Drop for Sustained<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `GET target` on the client's connection, opened first if it has none; the
/// connection is kept only if it can carry the next request.
fn one_request(
    conn: &mut Option<Conn>,
    addr: &str,
    target: &str,
    spec: SustainedSpec,
) -> io::Result<Response> {
    let mut c = match conn.take() {
        Some(c) => c,
        None => Conn::connect_timeout(addr, spec.answer_timeout)?,
    };
    let r = c.get(target)?;
    if !r.closes_connection() && !c.is_closed() {
        *conn = Some(c);
    }
    Ok(r)
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
