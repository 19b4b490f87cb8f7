//! A worker's requests waiting for Redis, and the batch calls that decide
//! them: the global store's protocol as a state machine the root context
//! drives (`filter/wasm/src/callouts.rs`), with no host call in it.
//!
//! - A request [`Batcher::enqueue`]s itself and pauses; the root is woken
//!   only when a call could go out now ([`Enqueued::wake`]).
//! - [`Batcher::next_call`] builds a call from the queue in arrival order:
//!   requests of one key become one entry with a count (single-flight),
//!   requests past their deadline end as timeouts, and, when this worker
//!   has learnt a denial since a request arrived, the deny cache is asked
//!   again first. A call goes out when none is in flight (no added latency
//!   when idle) or a full one is ready (group commit: while a call is out,
//!   the next batch gathers), up to `max_in_flight`.
//! - [`Batcher::answered`] turns the function's answer into each request's
//!   own decision ([`crate::batch::replay`]) and says what the deny cache
//!   learns.
//! - A request that ends [`Batcher::release`]s itself: if it was still
//!   queued it is never sent (a client that left spends no token); if its
//!   call is out, its decision is dropped when the answer comes.
//!
//! Every request ends by its deadline (`timeout_ms` after it arrived): a
//! call's timeout is the time its most urgent request has left, and
//! [`Batcher::expire`] (the root's tick) ends queued requests whose time is
//! up, so nothing waits behind a slow call for longer.

use std::collections::{HashMap, VecDeque};

use crate::applied::Applied;
use crate::batch::replay::{peek, replay};
use crate::batch::wire::{self, Entry, EntryReply};
use crate::batch::wire_plans::{self, PlanSet};
use crate::calls::CallTable;
use crate::deny_cache;
use crate::gcra::{Decision, LimitState};
use crate::hash::KeyHash;
use crate::per_limit::PerLimit;
use crate::policy::Policy;
use crate::time::NANOS_PER_MILLI;
use crate::webdis::{BackendError, FailureClass};

/// Our id for a waiting request: never reused while the VM lives.
pub type RequestId = u64;

/// The bounds of one worker's queue and calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Distinct keys in one call.
    pub max_keys: usize,
    /// Bytes of one call's `:path` (webdis reads at most
    /// `http_max_request_size` bytes of a request).
    pub max_path_bytes: usize,
    /// Calls out at once.
    pub max_in_flight: usize,
    /// Requests waiting at once, queued or in a call; more get the failure
    /// mode.
    pub max_waiting: usize,
    /// How long a request may wait for its decision, from its arrival.
    pub timeout_nanos: u64,
}

/// What a waiting request is decided on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    /// The request's context, for the root to finish it in.
    pub context_id: u32,
    pub redis_key: String,
    pub hash: KeyHash,
    /// The limits that apply to the request.
    pub applied: Applied,
    /// Only read the key's state (the introspection path): sent with a
    /// count of 0, which the function answers with the debts and writes
    /// nothing for; decided by [`crate::gcra::peek`], never from the deny
    /// cache, and teaching it nothing.
    pub peek: bool,
}

/// How a request's wait ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Redis decided.
    Decided(Decision),
    /// The deny cache answered before the request was sent.
    Cached(Decision),
    /// No decision: the failure mode applies.
    Failed(BackendError),
}

/// A request whose wait is over: the root finishes it in `context_id`.
#[derive(Debug)]
pub struct Finished<T> {
    pub context_id: u32,
    /// The limits it was decided on (with plans from Redis, those of the
    /// plan Redis used), for its headers and counters.
    pub applied: Applied,
    /// Redis named a plan the configuration does not know, so the
    /// configuration's plan was used.
    pub unknown_plan: bool,
    pub payload: T,
    pub verdict: Verdict,
}

/// A key's state after an answer that leaves one of its limits with
/// nothing to spend: what the deny cache should remember.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Learnt {
    pub hash: KeyHash,
    pub applied: Applied,
    /// Per limit, what is left and how long until it is whole again.
    pub states: PerLimit<LimitState>,
    /// When the call was sent and its answer received (monotonic clock).
    pub sent_at: u64,
    pub received_at: u64,
}

/// A call's requests, kept until its answer.
#[derive(Debug)]
pub struct Call {
    nonce: u64,
    sent_at: u64,
    entries: Vec<CallEntry>,
    /// With plans from Redis: the plans the call described, the ones Redis
    /// may name first (empty otherwise).
    plans: Vec<u16>,
}

#[derive(Debug)]
struct CallEntry {
    redis_key: String,
    hash: KeyHash,
    applied: Applied,
    peek: bool,
    requests: Vec<RequestId>,
}

/// A call to send now, from a root callback.
#[derive(Debug)]
pub struct Outgoing {
    pub path: String,
    pub timeout_ms: u32,
    /// Requests it decides.
    pub requests: usize,
    /// Handed back through [`Batcher::sent`] or [`Batcher::send_failed`].
    pub call: Call,
}

/// A request's place in the queue.
pub struct Enqueued {
    pub id: RequestId,
    /// The root must be woken to send a call now.
    pub wake: bool,
}

/// What the counters of the calls say since they were last taken.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub calls: u64,
    /// Requests carried by the calls (requests per call = this / `calls`).
    pub requests_sent: u64,
    /// Requests that ended (their client left) before their decision.
    pub gone: u64,
    /// Requests that waited past their deadline before being sent.
    pub expired: u64,
    /// Requests turned away because the queue was full.
    pub queue_full: u64,
}

/// What to do with the request at the head of the queue.
// A decision carries one state per limit (up to 16) by value: boxing it
// would allocate on every request.
#[allow(clippy::large_enum_variant)]
enum Step {
    Expire,
    Cached(Decision),
    Send,
}

struct Waiting<T> {
    ticket: Ticket,
    payload: T,
    deadline: u64,
    /// The deny-cache epoch this request was last checked against.
    epoch: u64,
    /// Still in the queue (else in a call).
    queued: bool,
}

pub struct Batcher<T> {
    settings: Settings,
    next_id: RequestId,
    waiting: HashMap<RequestId, Waiting<T>>,
    /// Arrival order; ids of released requests are skipped when met.
    queue: VecDeque<RequestId>,
    queued: usize,
    calls: CallTable<Call>,
    /// Bumped whenever an answer teaches the deny cache a denial.
    epoch: u64,
    wake_pending: bool,
    /// The host asked to delete the root while requests were waiting.
    closing: bool,
    /// The next call's nonce (see [`wire`]).
    next_nonce: u64,
    /// The Redis key of the plans hash, for policies that read plans from
    /// Redis ([`wire_plans`]).
    plans_key: Option<String>,
    counts: Counts,
}

impl<T> Batcher<T> {
    /// `nonce_seed` should be random: calls of every worker share webdis,
    /// and no two of them may carry one nonce.
    pub fn new(settings: Settings, nonce_seed: u64) -> Batcher<T> {
        Batcher {
            settings,
            next_id: 1,
            waiting: HashMap::new(),
            queue: VecDeque::new(),
            queued: 0,
            calls: CallTable::default(),
            epoch: 0,
            wake_pending: false,
            closing: false,
            next_nonce: nonce_seed % wire::NONCE_LIMIT,
            plans_key: None,
            counts: Counts::default(),
        }
    }

    /// Where keys' plans are, for a policy that reads them from Redis
    /// (`wire_plans::plans_key` of the store's key prefix).
    pub fn with_plans_key(mut self, plans_key: String) -> Batcher<T> {
        self.plans_key = Some(plans_key);
        self
    }

    /// The plans key, when `policy` reads plans from Redis: calls are then
    /// of the [`wire_plans`] form.
    fn plans_key<'a>(&'a self, policy: &Policy) -> Option<&'a str> {
        self.plans_key
            .as_deref()
            .filter(|_| policy.plans_from_redis())
    }

    /// A request joins the queue at `now`; `Err` gives its payload back
    /// when the queue is full (the failure mode applies, see
    /// [`queue_full_error`]).
    pub fn enqueue(&mut self, ticket: Ticket, payload: T, now: u64) -> Result<Enqueued, T> {
        if self.waiting.len() >= self.settings.max_waiting {
            self.counts.queue_full += 1;
            return Err(payload);
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.waiting.insert(
            id,
            Waiting {
                ticket,
                payload,
                deadline: now.saturating_add(self.settings.timeout_nanos),
                epoch: self.epoch,
                queued: true,
            },
        );
        self.queue.push_back(id);
        self.queued += 1;
        let wake = !self.wake_pending && self.may_send();
        self.wake_pending |= wake;
        Ok(Enqueued { id, wake })
    }

    /// The root was woken (its queue callback runs).
    pub fn woken(&mut self) {
        self.wake_pending = false;
    }

    /// The request `id` ended; nothing of it stays.
    pub fn release(&mut self, id: RequestId) {
        if let Some(waiting) = self.waiting.remove(&id) {
            self.counts.gone += 1;
            if waiting.queued {
                self.queued = self.queued.saturating_sub(1);
            }
        }
    }

    fn may_send(&self) -> bool {
        let in_flight = self.calls.outstanding();
        self.queued > 0
            && in_flight < self.settings.max_in_flight
            && (in_flight == 0 || self.queued >= self.settings.max_keys)
    }

    /// The next call to send, if one should go now. Requests that end
    /// without one (expired, or denied by `cached`, the deny cache) are
    /// added to `finished`.
    pub fn next_call(
        &mut self,
        now: u64,
        policy: &Policy,
        mut cached: impl FnMut(&Ticket) -> Option<Decision>,
        finished: &mut Vec<Finished<T>>,
    ) -> Option<Outgoing> {
        if !self.may_send() {
            return None;
        }
        let plans_key = self.plans_key(policy).map(str::to_string);
        let mut entries: Vec<CallEntry> = Vec::new();
        let mut sets: Vec<Applied> = Vec::new();
        // With plans from Redis: every plan Redis may name, then the
        // configuration's plans of keys Redis may not move.
        let mut plans: Vec<u16> = Vec::new();
        let mut bytes = match &plans_key {
            Some(key) => {
                plans.extend_from_slice(policy.redis_plans());
                wire_plans::fixed_bytes(key)
                    + plans.iter().map(|p| plan_bytes(policy, *p)).sum::<usize>()
            }
            None => wire::FIXED_BYTES,
        };
        let mut deadline = u64::MAX;
        let mut requests = 0;
        while let Some(id) = self.queue.pop_front() {
            let epoch = self.epoch;
            let step = match self.waiting.get_mut(&id) {
                None => continue,
                Some(waiting) if now >= waiting.deadline => Step::Expire,
                Some(waiting) if waiting.epoch != epoch && !waiting.ticket.peek => {
                    waiting.epoch = epoch;
                    cached(&waiting.ticket).map_or(Step::Send, Step::Cached)
                }
                Some(_) => Step::Send,
            };
            match step {
                Step::Expire => {
                    self.expire_one(id, finished);
                    continue;
                }
                Step::Cached(decision) => {
                    // Decided on what the cache may decide on, and so
                    // reported (with plans from Redis, the rules' limits).
                    let applied = self
                        .waiting
                        .get(&id)
                        .map(|w| policy.cacheable(&w.ticket.applied));
                    self.end_as(id, Verdict::Cached(decision), applied, false, finished);
                    continue;
                }
                Step::Send => {}
            }
            let Some(waiting) = self.waiting.get_mut(&id) else {
                continue;
            };
            let ticket = &waiting.ticket;
            // Requests of one key on the same limits (route, plan, cost)
            // are one entry; the function decides entries in order, so a
            // key's entries on different limits see each other's effect.
            let same_key = |e: &CallEntry| {
                e.hash == ticket.hash
                    && e.applied == ticket.applied
                    && e.redis_key == ticket.redis_key
                    && e.peek == ticket.peek
            };
            let index = match entries.iter().position(same_key) {
                Some(index) => index,
                None => {
                    let set = set_of(policy, &ticket.applied, plans_key.is_some());
                    let new_set = !sets.contains(&set);
                    let new_plan = plans_key.is_some() && !plans.contains(&ticket.applied.plan);
                    let mut extra = match plans_key {
                        Some(_) => wire_plans::entry_bytes(&ticket.redis_key),
                        None => wire::entry_bytes(&ticket.redis_key),
                    };
                    if new_set {
                        extra += wire::set_bytes(policy.limits(&set).as_slice());
                    }
                    if new_plan {
                        extra += plan_bytes(policy, ticket.applied.plan);
                    }
                    let full = entries.len() >= self.settings.max_keys
                        || bytes + extra > self.settings.max_path_bytes;
                    // One entry always goes, so that no request can stall.
                    if full && !entries.is_empty() {
                        self.queue.push_front(id);
                        break;
                    }
                    bytes += extra;
                    if new_set {
                        sets.push(set);
                    }
                    if new_plan {
                        plans.push(ticket.applied.plan);
                    }
                    entries.push(CallEntry {
                        redis_key: ticket.redis_key.clone(),
                        hash: ticket.hash,
                        applied: ticket.applied,
                        peek: ticket.peek,
                        requests: Vec::new(),
                    });
                    entries.len() - 1
                }
            };
            if let Some(entry) = entries.get_mut(index) {
                entry.requests.push(id);
                waiting.queued = false;
                self.queued = self.queued.saturating_sub(1);
                deadline = deadline.min(waiting.deadline);
                requests += 1;
            }
        }
        if entries.is_empty() {
            return None;
        }
        let nonce = self.next_nonce;
        self.next_nonce = (nonce + 1) % wire::NONCE_LIMIT;
        let path = match &plans_key {
            Some(key) => plans_path(policy, nonce, key, &plans, &entries),
            None => {
                let limits: Vec<_> = entries.iter().map(|e| policy.limits(&e.applied)).collect();
                let wire_entries: Vec<Entry<'_>> = entries
                    .iter()
                    .zip(&limits)
                    .map(|(e, limits)| Entry {
                        redis_key: &e.redis_key,
                        applied: e.applied,
                        limits: limits.as_slice(),
                        count: count(e),
                    })
                    .collect();
                wire::path(nonce, &wire_entries)
            }
        };
        let left = deadline
            .saturating_sub(now)
            .div_ceil(NANOS_PER_MILLI)
            .max(1);
        self.counts.calls += 1;
        self.counts.requests_sent += requests as u64;
        Some(Outgoing {
            path,
            timeout_ms: u32::try_from(left).unwrap_or(u32::MAX),
            requests,
            call: Call {
                nonce,
                sent_at: now,
                entries,
                plans,
            },
        })
    }

    /// Request `id` ends with `verdict`, queued or in a call. One already
    /// released is gone: counted then, dropped now.
    fn end(&mut self, id: RequestId, verdict: Verdict, finished: &mut Vec<Finished<T>>) {
        self.end_as(id, verdict, None, false, finished);
    }

    /// The same, decided on `applied` (else on what the request came with).
    fn end_as(
        &mut self,
        id: RequestId,
        verdict: Verdict,
        applied: Option<Applied>,
        unknown_plan: bool,
        finished: &mut Vec<Finished<T>>,
    ) {
        if let Some(waiting) = self.waiting.remove(&id) {
            if waiting.queued {
                self.queued = self.queued.saturating_sub(1);
            }
            finished.push(Finished {
                context_id: waiting.ticket.context_id,
                applied: applied.unwrap_or(waiting.ticket.applied),
                unknown_plan,
                payload: waiting.payload,
                verdict,
            });
        }
    }

    /// The host accepted `call` under `token`.
    pub fn sent(&mut self, call: Call, token: u32, finished: &mut Vec<Finished<T>>) {
        if let Some(old) = self.calls.sent(token, call) {
            let error = BackendError::new(
                FailureClass::Transport,
                true,
                format!("Envoy reused call id {token} before it was answered"),
            );
            self.fail(old, &error, finished);
        }
    }

    /// The host refused to send `call`.
    pub fn send_failed(
        &mut self,
        call: Call,
        error: &BackendError,
        finished: &mut Vec<Finished<T>>,
    ) {
        self.fail(call, error, finished);
    }

    fn fail(&mut self, call: Call, error: &BackendError, finished: &mut Vec<Finished<T>>) {
        for entry in call.entries {
            for id in entry.requests {
                self.end(id, Verdict::Failed(error.clone()), finished);
            }
        }
    }

    /// The answer to `token` came at `received_at`: `status` is `None` when
    /// it had no headers at all. `false` for a token this root never sent
    /// (an orphaned answer, to be counted and dropped).
    #[allow(clippy::too_many_arguments)]
    pub fn answered(
        &mut self,
        token: u32,
        status: Option<u32>,
        body: &[u8],
        received_at: u64,
        policy: &Policy,
        finished: &mut Vec<Finished<T>>,
        learnt: &mut Vec<Learnt>,
    ) -> bool {
        let Some(call) = self.calls.answered(token) else {
            return false;
        };
        let (now_us, answers) = match read_answer(&call, status, body, policy) {
            Ok(read) => read,
            Err(error) => {
                self.fail(call, &error, finished);
                return true;
            }
        };
        // With plans from Redis the cache decides on the rules' limits only.
        let from_redis = !call.plans.is_empty();
        for (entry, answer) in call.entries.into_iter().zip(answers) {
            let limits = policy.limits(&answer.applied);
            if entry.peek {
                let verdict = match peek(limits.as_slice(), now_us, &answer.reply) {
                    Ok(decision) => Verdict::Decided(decision),
                    Err(error) => Verdict::Failed(error),
                };
                for id in entry.requests {
                    let applied = Some(answer.applied);
                    self.end_as(id, verdict.clone(), applied, answer.unknown_plan, finished);
                }
                continue;
            }
            let replayed = match replay(
                limits.as_slice(),
                now_us,
                &answer.reply,
                entry.requests.len(),
            ) {
                Ok(replayed) => replayed,
                Err(error) => {
                    for id in entry.requests {
                        self.end(id, Verdict::Failed(error.clone()), finished);
                    }
                    continue;
                }
            };
            let cached_from = if from_redis {
                policy.plan_limits(answer.applied.plan).len()
            } else {
                0
            };
            if let Some(last) = replayed
                .last()
                .filter(|d| deny_cache::worth_remembering_from(d, limits.as_slice(), cached_from))
            {
                learnt.push(Learnt {
                    hash: entry.hash,
                    applied: answer.applied,
                    states: last.states().iter().copied().collect(),
                    sent_at: call.sent_at,
                    received_at,
                });
                self.epoch = self.epoch.wrapping_add(1);
            }
            for (id, decision) in entry.requests.into_iter().zip(replayed.decisions) {
                let verdict = Verdict::Decided(decision);
                self.end_as(
                    id,
                    verdict,
                    Some(answer.applied),
                    answer.unknown_plan,
                    finished,
                );
            }
        }
        true
    }

    /// Ends the queued requests whose deadline has passed (the root's tick).
    pub fn expire(&mut self, now: u64, finished: &mut Vec<Finished<T>>) {
        if self.queued == 0 {
            return;
        }
        let due: Vec<RequestId> = self
            .queue
            .iter()
            .copied()
            .filter(|id| self.waiting.get(id).is_some_and(|w| now >= w.deadline))
            .collect();
        for id in due {
            self.expire_one(id, finished);
        }
        let waiting = &self.waiting;
        self.queue.retain(|id| waiting.contains_key(id));
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn expire_one(&mut self, id: RequestId, finished: &mut Vec<Finished<T>>) {
        self.counts.expired += 1;
        self.end(id, Verdict::Failed(expired_error()), finished);
    }

    /// The counts since the last call, reset.
    pub fn take_counts(&mut self) -> Counts {
        std::mem::take(&mut self.counts)
    }

    /// Requests waiting, queued or in a call.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Calls sent and not answered yet.
    pub fn outstanding(&self) -> usize {
        self.calls.outstanding()
    }

    /// The host wants to delete the root: `true` if nothing waits and no
    /// call is out, else the root must wait until [`Batcher::may_finish`]
    /// (the host would cancel the calls, and the SDK would keep their
    /// tokens forever; waiting requests would never be finished).
    pub fn may_close(&mut self) -> bool {
        self.closing = !self.is_idle();
        !self.closing
    }

    /// `true` once, when a waiting root may now finish.
    pub fn may_finish(&mut self) -> bool {
        let finish = self.closing && self.is_idle();
        if finish {
            self.closing = false;
        }
        finish
    }

    /// Whether a closing root is still waiting.
    pub fn is_closing(&self) -> bool {
        self.closing
    }

    fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.calls.outstanding() == 0
    }
}

fn expired_error() -> BackendError {
    BackendError::new(
        FailureClass::Timeout,
        true,
        "a request waited for a webdis call longer than timeout_ms",
    )
}

/// What the function said of one entry, and what applied.
struct Answered {
    applied: Applied,
    unknown_plan: bool,
    reply: EntryReply,
}

/// Reads the answer to `call`: Redis's clock and, per entry, what applied
/// (with plans from Redis, the plan the function used) and its reply.
fn read_answer(
    call: &Call,
    status: Option<u32>,
    body: &[u8],
    policy: &Policy,
) -> Result<(u64, Vec<Answered>), BackendError> {
    if call.plans.is_empty() {
        let limits_per_entry: Vec<usize> = call
            .entries
            .iter()
            .map(|e| policy.limits(&e.applied).len())
            .collect();
        let reply = wire::parse(status, body, call.nonce, &limits_per_entry)?;
        let answers = call.entries.iter().zip(reply.entries);
        let answered = answers.map(|(entry, reply)| Answered {
            applied: entry.applied,
            unknown_plan: false,
            reply,
        });
        return Ok((reply.now_us, answered.collect()));
    }
    let plan_limits: Vec<usize> = call
        .plans
        .iter()
        .map(|p| policy.plan_limits(*p).len())
        .collect();
    let expected: Vec<wire_plans::Expected> = call
        .entries
        .iter()
        .map(|e| wire_plans::Expected {
            plan: call
                .plans
                .iter()
                .position(|p| *p == e.applied.plan)
                .unwrap_or(0),
            rule_limits: policy.rules_only(&e.applied).limits.len(),
        })
        .collect();
    let nameable = policy.redis_plans().len();
    let reply = wire_plans::parse(status, body, call.nonce, &plan_limits, nameable, &expected)?;
    let answers = call.entries.iter().zip(reply.entries);
    let answered = answers.map(|(entry, answer)| {
        let plan = call
            .plans
            .get(answer.plan)
            .copied()
            .unwrap_or(entry.applied.plan);
        Answered {
            applied: policy.on_plan(&entry.applied, plan),
            unknown_plan: answer.unknown_plan,
            reply: answer.reply,
        }
    });
    Ok((reply.now_us, answered.collect()))
}

/// What identifies an entry's limit set in a call: all its limits, or with
/// plans from Redis, its rules' limits alone.
fn set_of(policy: &Policy, applied: &Applied, plans_from_redis: bool) -> Applied {
    if plans_from_redis {
        Applied {
            limits: policy.rules_only(applied).limits,
            ..Applied::default()
        }
    } else {
        *applied
    }
}

fn plan_bytes(policy: &Policy, plan: u16) -> usize {
    wire_plans::plan_bytes(&PlanSet {
        name: policy.plan_name(plan),
        limits: policy.plan_limits(plan).as_slice(),
    })
}

fn count(entry: &CallEntry) -> u32 {
    if entry.peek {
        return 0;
    }
    u32::try_from(entry.requests.len()).unwrap_or(u32::MAX)
}

/// The path of a call whose keys' plans are read from Redis.
fn plans_path(
    policy: &Policy,
    nonce: u64,
    plans_key: &str,
    plans: &[u16],
    entries: &[CallEntry],
) -> String {
    let plan_limits: Vec<_> = plans.iter().map(|p| policy.plan_limits(*p)).collect();
    let plan_sets: Vec<PlanSet<'_>> = plans
        .iter()
        .zip(&plan_limits)
        .map(|(p, limits)| PlanSet {
            name: policy.plan_name(*p),
            limits: limits.as_slice(),
        })
        .collect();
    let sets: Vec<Applied> = entries
        .iter()
        .map(|e| set_of(policy, &e.applied, true))
        .collect();
    let rule_limits: Vec<_> = sets.iter().map(|set| policy.limits(set)).collect();
    let wire_entries: Vec<wire_plans::Entry<'_>> = entries
        .iter()
        .zip(sets.iter().zip(&rule_limits))
        .map(|(e, (set, limits))| wire_plans::Entry {
            redis_key: &e.redis_key,
            plan: plans.iter().position(|p| *p == e.applied.plan).unwrap_or(0),
            rules: *set,
            rule_limits: limits.as_slice(),
            count: count(e),
        })
        .collect();
    let nameable = policy.redis_plans().len();
    wire_plans::path(nonce, plans_key, &plan_sets, nameable, &wire_entries)
}

/// The failure of a request the full queue turned away.
pub fn queue_full_error(max_waiting: usize) -> BackendError {
    BackendError::new(
        FailureClass::Dispatch,
        true,
        format!("{max_waiting} requests already wait for webdis on this worker (max_waiting)"),
    )
}

#[cfg(test)]
mod plans_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gcra;
    use crate::testing::{applied_of, key_hash, policy, url_decoded, S};
    use crate::time::micros_to_nanos;
    use std::collections::BTreeMap;

    const MS: u64 = S / 1_000;
    /// The first call's nonce, and its answer: one key, 1 admitted, no debt.
    const NONCE: u64 = 40;
    const ANSWER_1_0: &[u8] = br#"{"FCALL":[40,5,1,0]}"#;

    fn settings() -> Settings {
        Settings {
            max_keys: 4,
            max_path_bytes: 12_000,
            max_in_flight: 2,
            max_waiting: 100,
            timeout_nanos: 50 * MS,
        }
    }

    fn ticket(context_id: u32, key: &str) -> Ticket {
        Ticket {
            peek: false,
            context_id,
            redis_key: format!("rl:{key}"),
            hash: key_hash(key.as_bytes()),
            // The default plan's one limit, as every policy here has.
            applied: Applied {
                limits: [crate::applied::LimitRef {
                    instance: 0,
                    cost: 1,
                }]
                .into_iter()
                .collect(),
                ..Applied::default()
            },
        }
    }

    /// The Redis function, modelled: decides the call's path against
    /// `store` (key -> limit name -> TAT in µs) at `now_us`, answering what
    /// webdis would. Requests of a key are decided one by one with the
    /// filter's own GCRA, so a batch must equal the sequential run.
    fn function(
        path: &str,
        store: &mut BTreeMap<String, BTreeMap<String, u64>>,
        now_us: u64,
    ) -> String {
        let args: Vec<String> = path.split('/').skip(3).map(url_decoded).collect();
        let mut it = args.iter();
        let mut next = || it.next().unwrap().clone();
        let m: usize = next().parse().unwrap();
        let keys: Vec<String> = (0..m).map(|_| next()).collect();
        let nonce: u64 = next().parse().unwrap();
        let s: usize = next().parse().unwrap();
        let sets: Vec<Vec<(String, u64, u64)>> = (0..s)
            .map(|_| {
                let n: usize = next().parse().unwrap();
                (0..n)
                    .map(|_| (next(), next().parse().unwrap(), next().parse().unwrap()))
                    .collect()
            })
            .collect();
        let mut out = vec![nonce, now_us];
        for key in keys {
            let set = &sets[next().parse::<usize>().unwrap() - 1];
            let count: usize = next().parse().unwrap();
            let fields = store.entry(key).or_default();
            let debts: Vec<u64> = set
                .iter()
                .map(|(name, _, _)| {
                    fields
                        .get(name)
                        .copied()
                        .unwrap_or(0)
                        .saturating_sub(now_us)
                })
                .collect();
            let mut admitted = 0;
            for _ in 0..count {
                let fits = set.iter().all(|(name, t, c)| {
                    let tat = fields.get(name).copied().unwrap_or(0).max(now_us);
                    tat - now_us <= c - t
                });
                if fits {
                    admitted += 1;
                    for (name, t, _) in set {
                        let tat = fields.get(name).copied().unwrap_or(0).max(now_us);
                        fields.insert(name.clone(), tat + t);
                    }
                }
            }
            out.push(admitted);
            out.extend(debts);
        }
        format!(r#"{{"FCALL":{out:?}}}"#)
    }

    fn none(_: &Ticket) -> Option<Decision> {
        None
    }

    #[test]
    fn a_peek_is_sent_with_a_count_of_zero_and_reads_without_spending() {
        let p = policy(r#"{"limits": ["3/s"], "store": {"webdis": {}}}"#);
        let mut batcher = Batcher::new(settings(), NONCE);
        let (mut finished, mut learnt) = (Vec::new(), Vec::new());
        let mut store = BTreeMap::new();
        // A request of key a, a peek of it, another request: one call, the
        // requests one entry of count 2, the peek its own of count 0,
        // decided after them (the function decides entries in order).
        let peek = |ctx| Ticket {
            peek: true,
            ..ticket(ctx, "a")
        };
        for t in [ticket(1, "a"), peek(2), ticket(3, "a")] {
            batcher.enqueue(t, (), 0).unwrap();
        }
        // The deny cache is never asked for a peek.
        let mut asked = Vec::new();
        let call = batcher
            .next_call(
                0,
                &p,
                |t: &Ticket| {
                    asked.push(t.peek);
                    None
                },
                &mut finished,
            )
            .unwrap();
        assert!(!asked.contains(&true));
        assert_eq!(call.requests, 3);
        assert!(call.path.ends_with("/1/2/1/0"), "{}", call.path);
        let now_us = 1_000_000_000;
        let answer = function(&call.path, &mut store, now_us);
        batcher.sent(call.call, 7, &mut finished);
        assert!(batcher.answered(
            7,
            Some(200),
            answer.as_bytes(),
            MS,
            &p,
            &mut finished,
            &mut learnt
        ));
        let by_context: BTreeMap<u32, Decision> = finished
            .iter()
            .map(|f| match &f.verdict {
                Verdict::Decided(d) => (f.context_id, *d),
                other => panic!("{other:?}"),
            })
            .collect();
        // Both requests spent; the peek saw the state after them.
        assert_eq!(by_context[&1].states()[0].remaining, 2);
        assert_eq!(by_context[&3].states()[0].remaining, 1);
        assert_eq!(by_context[&2].states()[0].remaining, 1);
        assert!(learnt.iter().all(|l| l.hash == key_hash(b"a")));
        // Nothing written for the peek: only the two requests' steps.
        let t = p.instances[0].interval_nanos / 1_000;
        assert_eq!(store["rl:a"]["3/s"], now_us + 2 * t);
    }

    #[test]
    fn an_idle_worker_sends_at_once_and_gathers_while_a_call_is_out() {
        let p = policy(r#"{"limits": ["2/s"], "store": {"webdis": {}}}"#);
        let mut batcher = Batcher::new(settings(), NONCE);
        let mut finished = Vec::new();
        let first = batcher.enqueue(ticket(1, "a"), (), 0).unwrap();
        assert!(first.wake, "idle: the root is woken");
        batcher.woken();
        let call = batcher.next_call(0, &p, none, &mut finished).unwrap();
        assert_eq!(call.requests, 1);
        assert_eq!(call.timeout_ms, 50);
        batcher.sent(call.call, 4, &mut finished);
        // While it is out, three more gather (fewer than a full call): no wake.
        for (ctx, key) in [(2, "a"), (3, "b"), (4, "a")] {
            assert!(!batcher.enqueue(ticket(ctx, key), (), MS).unwrap().wake);
        }
        assert!(batcher.next_call(MS, &p, none, &mut finished).is_none());
        let mut learnt = Vec::new();
        assert!(batcher.answered(
            4,
            Some(200),
            ANSWER_1_0,
            2 * MS,
            &p,
            &mut finished,
            &mut learnt
        ));
        assert_eq!(finished.len(), 1);
        assert!(matches!(finished[0].verdict, Verdict::Decided(d) if d.allowed));
        // The next call: one entry per key, with its count.
        let next = batcher.next_call(2 * MS, &p, none, &mut finished).unwrap();
        assert_eq!(next.requests, 3);
        assert!(
            next.path
                .ends_with("/2/rl%3Aa/rl%3Ab/41/1/1/2%2Fs/500000/1000000/1/2/1/1"),
            "{}",
            next.path
        );
        assert_eq!(next.timeout_ms, 49, "the most urgent request's time left");
    }

    #[test]
    fn a_full_call_goes_out_while_another_is_in_flight_up_to_the_cap() {
        let p = policy(r#"{"limits": ["2/s"], "store": {"webdis": {}}}"#);
        let mut batcher = Batcher::new(settings(), NONCE);
        let mut finished = Vec::new();
        batcher.enqueue(ticket(0, "k0"), (), 0).unwrap();
        batcher.woken();
        let call = batcher.next_call(0, &p, none, &mut finished).unwrap();
        batcher.sent(call.call, 4, &mut finished);
        let mut wakes = 0;
        for i in 1..=10u32 {
            wakes += u32::from(
                batcher
                    .enqueue(ticket(i, &format!("k{i}")), (), MS)
                    .unwrap()
                    .wake,
            );
        }
        assert_eq!(wakes, 1, "woken once, when a full call was ready");
        let second = batcher.next_call(MS, &p, none, &mut finished).unwrap();
        assert_eq!(second.requests, 4, "max_keys");
        batcher.sent(second.call, 8, &mut finished);
        assert!(
            batcher.next_call(MS, &p, none, &mut finished).is_none(),
            "max_in_flight"
        );
        assert_eq!(batcher.outstanding(), 2);
    }

    #[test]
    fn a_call_never_outgrows_its_byte_budget() {
        let p = policy(r#"{"limits": ["2/s"], "store": {"webdis": {}}}"#);
        let mut batcher = Batcher::new(
            Settings {
                max_keys: 100,
                max_path_bytes: 300,
                ..settings()
            },
            NONCE,
        );
        let mut finished = Vec::new();
        for i in 0..20u32 {
            batcher
                .enqueue(ticket(i, &format!("{i:064}")), (), 0)
                .unwrap();
        }
        let mut sizes = Vec::new();
        while let Some(call) = batcher.next_call(0, &p, none, &mut finished) {
            assert!(call.path.len() <= 300, "{}", call.path.len());
            sizes.push(call.requests);
            batcher.send_failed(
                call.call,
                &BackendError::new(FailureClass::Dispatch, false, "x"),
                &mut finished,
            );
        }
        assert_eq!(sizes.iter().sum::<usize>(), 20);
        assert!(sizes.len() > 1);
        assert_eq!(finished.len(), 20);
    }

    #[test]
    fn a_request_that_left_is_never_sent_and_one_in_flight_is_dropped() {
        let p = policy(r#"{"limits": ["5/s"], "store": {"webdis": {}}}"#);
        let mut batcher = Batcher::new(settings(), NONCE);
        let mut finished = Vec::new();
        let sent = batcher.enqueue(ticket(1, "a"), (), 0).unwrap().id;
        let call = batcher.next_call(0, &p, none, &mut finished).unwrap();
        batcher.sent(call.call, 4, &mut finished);
        let queued = batcher.enqueue(ticket(2, "a"), (), 0).unwrap().id;
        batcher.release(queued);
        batcher.release(sent);
        assert_eq!(batcher.waiting(), 0);
        let mut learnt = Vec::new();
        assert!(batcher.answered(4, Some(200), ANSWER_1_0, MS, &p, &mut finished, &mut learnt));
        assert!(finished.is_empty());
        assert!(
            batcher.next_call(MS, &p, none, &mut finished).is_none(),
            "the queued one spends no token"
        );
        assert_eq!(batcher.take_counts().gone, 2);
        assert!(
            !batcher.answered(4, Some(200), b"", MS, &p, &mut finished, &mut learnt),
            "orphaned"
        );
    }

    #[test]
    fn every_request_ends_by_its_deadline() {
        let p = policy(r#"{"limits": ["5/s"], "store": {"webdis": {}}}"#);
        let mut batcher = Batcher::new(settings(), NONCE);
        let mut finished = Vec::new();
        batcher.enqueue(ticket(1, "a"), (), 0).unwrap();
        let call = batcher.next_call(0, &p, none, &mut finished).unwrap();
        batcher.sent(call.call, 4, &mut finished);
        batcher.enqueue(ticket(2, "b"), (), 10 * MS).unwrap();
        batcher.enqueue(ticket(3, "c"), (), 30 * MS).unwrap();
        // The tick: nothing is due before its deadline...
        batcher.expire(59 * MS, &mut finished);
        assert!(finished.is_empty());
        // ...then exactly the queued one whose time is up.
        batcher.expire(60 * MS, &mut finished);
        assert_eq!(finished.len(), 1);
        assert_eq!(finished[0].context_id, 2);
        assert!(
            matches!(&finished[0].verdict, Verdict::Failed(e) if e.class == FailureClass::Timeout)
        );
        // The stuck call times out; the next call gets only the time left.
        let mut learnt = Vec::new();
        batcher.answered(4, Some(504), b"", 61 * MS, &p, &mut finished, &mut learnt);
        assert_eq!(finished.len(), 2);
        let next = batcher.next_call(61 * MS, &p, none, &mut finished).unwrap();
        assert_eq!(next.timeout_ms, 19);
        assert_eq!(batcher.take_counts().expired, 1);
    }

    #[test]
    fn a_full_queue_turns_requests_away() {
        let mut batcher = Batcher::new(
            Settings {
                max_waiting: 2,
                ..settings()
            },
            NONCE,
        );
        assert!(batcher.enqueue(ticket(1, "a"), 1, 0).is_ok());
        assert!(batcher.enqueue(ticket(2, "a"), 2, 0).is_ok());
        assert_eq!(batcher.enqueue(ticket(3, "a"), 3, 0).err(), Some(3));
        assert_eq!(batcher.take_counts().queue_full, 1);
        assert_eq!(queue_full_error(2).class, FailureClass::Dispatch);
    }

    #[test]
    fn a_learnt_denial_answers_the_waiting_requests_of_that_key_from_the_cache() {
        let p = policy(r#"{"limits": ["1/s"], "store": {"webdis": {}}}"#);
        let mut batcher = Batcher::new(settings(), NONCE);
        let mut finished = Vec::new();
        batcher.enqueue(ticket(1, "a"), (), 0).unwrap();
        // Nothing learnt since it arrived (it asked the cache itself then).
        let not_again = |_: &Ticket| panic!("asked the cache again");
        let call = batcher.next_call(0, &p, not_again, &mut finished).unwrap();
        batcher.sent(call.call, 4, &mut finished);
        batcher.enqueue(ticket(2, "a"), (), MS).unwrap();
        batcher.enqueue(ticket(3, "b"), (), MS).unwrap();
        let mut learnt = Vec::new();
        batcher.answered(4, Some(200), ANSWER_1_0, MS, &p, &mut finished, &mut learnt);
        assert_eq!(learnt.len(), 1, "key a has nothing left");
        assert_eq!(learnt[0].states.as_slice()[0].reset_nanos, 1_000_000_000);
        let mut asked = Vec::new();
        let next = batcher
            .next_call(
                MS,
                &p,
                |t: &Ticket| {
                    asked.push(t.context_id);
                    (t.context_id == 2).then(|| Decision::denied_for(S))
                },
                &mut finished,
            )
            .unwrap();
        assert_eq!(asked, [2, 3]);
        assert_eq!(next.requests, 1);
        assert!(matches!(
            finished.last().unwrap().verdict,
            Verdict::Cached(_)
        ));
    }

    #[test]
    fn a_failed_call_fails_each_of_its_requests() {
        let p = policy(r#"{"limits": ["1/s"], "store": {"webdis": {}}}"#);
        // A Redis restarted without the function, Envoy's timeout, a reply
        // that disagrees with the filter's GCRA, a reset.
        for (status, body, class) in [
            (
                Some(200),
                &br#"{"FCALL":[false,"ERR Function not found"]}"#[..],
                FailureClass::Redis,
            ),
            (Some(504), b"", FailureClass::Timeout),
            (
                Some(200),
                br#"{"FCALL":[40,5,3,0,0,0]}"#,
                FailureClass::Parse,
            ),
            // Another call's reply, handed on by webdis.
            (
                Some(200),
                br#"{"FCALL":[39,5,1,0,1,0]}"#,
                FailureClass::Transport,
            ),
            (None, b"", FailureClass::Transport),
        ] {
            let mut batcher = Batcher::new(settings(), NONCE);
            let mut finished = Vec::new();
            batcher.enqueue(ticket(1, "a"), (), 0).unwrap();
            batcher.enqueue(ticket(2, "a"), (), 0).unwrap();
            batcher.enqueue(ticket(3, "b"), (), 0).unwrap();
            let call = batcher.next_call(0, &p, none, &mut finished).unwrap();
            batcher.sent(call.call, 4, &mut finished);
            batcher.answered(4, status, body, MS, &p, &mut finished, &mut Vec::new());
            assert_eq!(finished.len(), 3);
            for f in &finished {
                assert!(
                    matches!(&f.verdict, Verdict::Failed(e) if e.class == class),
                    "{f:?}"
                );
            }
            assert_eq!(batcher.waiting(), 0);
        }
    }

    #[test]
    fn a_reused_token_fails_the_call_it_displaces_and_the_root_closes_after_the_last_answer() {
        let p = policy(r#"{"limits": ["1/s"], "store": {"webdis": {}}}"#);
        let mut batcher = Batcher::new(
            Settings {
                max_keys: 1,
                ..settings()
            },
            NONCE,
        );
        let mut finished = Vec::new();
        batcher.enqueue(ticket(1, "a"), (), 0).unwrap();
        batcher.enqueue(ticket(2, "b"), (), 0).unwrap();
        let first = batcher.next_call(0, &p, none, &mut finished).unwrap();
        batcher.sent(first.call, 4, &mut finished);
        let second = batcher.next_call(0, &p, none, &mut finished).unwrap();
        batcher.sent(second.call, 4, &mut finished);
        assert_eq!(finished.len(), 1);
        assert_eq!(finished[0].context_id, 1);
        assert_eq!(
            batcher.outstanding(),
            1,
            "the displaced call's answer never comes"
        );
        batcher.enqueue(ticket(3, "c"), (), 0).unwrap();
        assert!(!batcher.may_close());
        assert!(!batcher.may_finish());
        batcher.answered(
            4,
            Some(200),
            br#"{"FCALL":[41,5,1,0]}"#,
            MS,
            &p,
            &mut finished,
            &mut Vec::new(),
        );
        assert!(!batcher.may_finish(), "one is still queued");
        let last = batcher.next_call(MS, &p, none, &mut finished).unwrap();
        batcher.sent(last.call, 8, &mut finished);
        batcher.answered(
            8,
            Some(200),
            br#"{"FCALL":[42,5,1,0]}"#,
            MS,
            &p,
            &mut finished,
            &mut Vec::new(),
        );
        assert!(batcher.may_finish());
        assert!(!batcher.may_finish(), "only once");
    }

    /// Random arrivals and answers over keys with different limit sets:
    /// every request gets exactly what the same requests, one by one in
    /// arrival order at Redis's clock, get from `gcra::decide`.
    #[test]
    fn batched_decisions_equal_sequential_ones() {
        let p = policy(
            r#"{"limits": ["3/s", {"rate": "10/min", "burst": 4}],
                "overrides": [{"key": "k2", "limits": ["2/s"]}], "store": {"webdis": {}}}"#,
        );
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mut batcher = Batcher::new(
            Settings {
                max_keys: 3,
                timeout_nanos: 3_600 * S,
                ..settings()
            },
            NONCE,
        );
        let mut store = BTreeMap::new();
        let mut model: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let mut in_flight: Vec<(u32, String)> = Vec::new();
        let (mut token, mut checked, mut allowed) = (0u32, 0, 0);
        let mut now_us = 1_764_000_000_000_000u64;
        for step in 0..3_000u32 {
            now_us += next(80_000);
            let now = micros_to_nanos(now_us);
            for _ in 0..next(4) {
                let key = format!("k{}", next(4));
                let t = Ticket {
                    peek: false,
                    applied: applied_of(&p, &key),
                    ..ticket(step, &key)
                };
                batcher.enqueue(t, key, now).unwrap();
            }
            let mut finished = Vec::new();
            while let Some(call) = batcher.next_call(now, &p, none, &mut finished) {
                token += 4;
                in_flight.push((token, call.path.clone()));
                batcher.sent(call.call, token, &mut finished);
            }
            if next(3) == 0 && !in_flight.is_empty() {
                let (token, path) = in_flight.remove(0);
                let body = function(&path, &mut store, now_us);
                batcher.answered(
                    token,
                    Some(200),
                    body.as_bytes(),
                    now,
                    &p,
                    &mut finished,
                    &mut Vec::new(),
                );
                for f in &finished {
                    let Verdict::Decided(decision) = f.verdict else {
                        panic!("{f:?}")
                    };
                    let limits = p.limits(&f.applied);
                    let tats = model
                        .entry(f.payload.clone())
                        .or_insert_with(|| vec![0; limits.len()]);
                    assert_eq!(decision, gcra::decide(limits.as_slice(), tats, now));
                    checked += 1;
                    allowed += usize::from(decision.allowed);
                }
            }
        }
        assert!(
            checked > 1_000 && allowed > 100 && checked - allowed > 100,
            "{checked} {allowed}"
        );
    }
}
