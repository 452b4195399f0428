//! A fixed set of worker threads, each owning one logged-in session.
//!
//! PKCS#11 calls block, so they never run on the async runtime: callers put
//! a job on a bounded queue, in their lane (`FairQueue`: tenants take
//! turns), and await a oneshot. A full queue is an explicit `Busy`; each
//! job has a deadline. Workers classify failures (see
//! [`crate::error::rv_info`]) and recover their own session with capped
//! exponential backoff, retrying an idempotent job once.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::error::{HsmError, Result, RvClass};
use crate::fair_queue::{FairQueue, Lane, PopError, PushError};

/// What the pool needs from a token. Implemented for PKCS#11 by
/// [`crate::token::Token`]; tests can supply doubles.
pub trait SessionFactory: Send + Sync + 'static {
    /// A logged-in session, owned by one worker at a time.
    type Session: Send + 'static;
    /// Opens a new session and logs in if needed.
    fn open(&self) -> Result<Self::Session>;
    /// Logs the session in again after the token forgot the login.
    fn relogin(&self, session: &mut Self::Session) -> Result<()>;
    /// A cheap call that fails when the session is no longer usable.
    fn probe(&self, session: &mut Self::Session) -> Result<()>;
}

/// Hooks for metrics; the daemon implements them (with `prometheus`), this
/// crate only calls them. Every method has an empty default.
pub trait HsmMetrics: Send + Sync {
    /// Jobs waiting in the queue, after a change.
    fn queue_depth(&self, _depth: usize) {}
    /// Sessions currently running a job, after a change.
    fn sessions_in_use(&self, _in_use: usize) {}
    /// Time a job waited in the queue before a worker took it.
    fn queue_wait(&self, _wait: Duration) {}
    /// Duration of one attempt of an operation; `mechanism` is the PKCS#11
    /// mechanism number when the operation has one.
    fn operation(&self, _op: &'static str, _mechanism: Option<u64>, _latency: Duration, _ok: bool) {
    }
    /// An error, labelled by CKR name or error kind.
    fn error(&self, _label: &'static str) {}
    /// A recovery step taken by a worker.
    fn recovery(&self, _class: RvClass) {}
}

/// Metrics that go nowhere.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoMetrics;
impl HsmMetrics for NoMetrics {}

/// Pool sizing and timing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Worker threads, one session each.
    pub size: usize,
    /// Jobs that may wait; beyond that callers get `Busy`.
    pub queue_depth: usize,
    /// Deadline of a job from submission (queue wait included).
    pub op_timeout_ms: u64,
    /// First delay before reopening a failed session.
    pub backoff_initial_ms: u64,
    /// Longest delay between reopen attempts.
    pub backoff_max_ms: u64,
    /// How often an idle worker checks its session is still alive.
    pub probe_interval_ms: u64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            size: 2,
            queue_depth: 1024,
            op_timeout_ms: 5000,
            backoff_initial_ms: 50,
            backoff_max_ms: 5000,
            probe_interval_ms: 1000,
        }
    }
}

/// Coarse pool state for readiness probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthState {
    /// Every worker has a working session.
    Up,
    /// Some workers are recovering or stuck, or the last job failed.
    Degraded,
    /// No worker has a session.
    Down,
}

/// A snapshot of the pool's health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Health {
    /// Overall state.
    pub state: HealthState,
    /// Worker count.
    pub workers: usize,
    /// Workers holding an open session.
    pub sessions_open: usize,
    /// Workers running a job for longer than the operation timeout.
    pub workers_stuck: usize,
    /// Jobs waiting.
    pub queue_depth: usize,
    /// When a job last succeeded.
    pub last_success: Option<SystemTime>,
    /// The last error (never contains a PIN).
    pub last_error: Option<String>,
    /// When it happened.
    pub last_error_at: Option<SystemTime>,
}

trait Task<S>: Send {
    /// Runs the work and keeps its value for [`Task::deliver`].
    fn attempt(&mut self, session: &mut S) -> Result<()>;
    /// Hands a successful attempt's value to the caller.
    fn deliver(self: Box<Self>);
    fn fail(self: Box<Self>, error: HsmError);
    fn meta(&self) -> &JobMeta;
    /// The caller stopped waiting (timed out, or its request was dropped).
    fn abandoned(&self) -> bool;
}

struct JobMeta {
    op: &'static str,
    mechanism: Option<u64>,
    idempotent: bool,
    enqueued: Instant,
    deadline: Instant,
}

struct TypedTask<S, T, F>
where
    F: FnMut(&mut S) -> Result<T> + Send,
{
    work: F,
    value: Option<T>,
    reply: Option<oneshot::Sender<Result<T>>>,
    meta: JobMeta,
    _session: std::marker::PhantomData<fn(&mut S)>,
}

impl<S, T, F> Task<S> for TypedTask<S, T, F>
where
    T: Send,
    F: FnMut(&mut S) -> Result<T> + Send,
{
    fn attempt(&mut self, session: &mut S) -> Result<()> {
        self.value = Some((self.work)(session)?);
        Ok(())
    }

    fn deliver(mut self: Box<Self>) {
        if let (Some(reply), Some(value)) = (self.reply.take(), self.value.take()) {
            // The caller may have timed out and gone: nothing to do then.
            let _ = reply.send(Ok(value));
        }
    }

    fn fail(mut self: Box<Self>, error: HsmError) {
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(Err(error));
        }
    }

    fn meta(&self) -> &JobMeta {
        &self.meta
    }

    fn abandoned(&self) -> bool {
        self.reply.as_ref().is_none_or(|r| r.is_closed())
    }
}

type Job<S> = Box<dyn Task<S>>;

#[derive(Default)]
struct HealthRecord {
    sessions_open: Vec<bool>,
    busy_since: Vec<Option<Instant>>,
    last_success: Option<SystemTime>,
    last_error: Option<String>,
    last_error_at: Option<SystemTime>,
    last_was_error: bool,
}

struct Shared {
    health: Mutex<HealthRecord>,
    in_use: AtomicUsize,
    metrics: Arc<dyn HsmMetrics>,
    config: PoolConfig,
}

impl Shared {
    fn record<R>(&self, f: impl FnOnce(&mut HealthRecord) -> R) -> R {
        f(&mut self.health.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The worker pool. Dropping it stops the workers once their current job ends.
pub struct SessionPool<F: SessionFactory> {
    queue: Arc<FairQueue<Job<F::Session>>>,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl<F: SessionFactory> std::fmt::Debug for SessionPool<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionPool")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl<F: SessionFactory> SessionPool<F> {
    /// Starts `config.size` workers; each opens its session right away.
    pub fn start(
        factory: Arc<F>,
        config: PoolConfig,
        metrics: Arc<dyn HsmMetrics>,
    ) -> Result<SessionPool<F>> {
        if config.size == 0 || config.queue_depth == 0 {
            return Err(HsmError::Config(
                "pool size and queue depth must be at least 1".into(),
            ));
        }
        let queue = Arc::new(FairQueue::new(config.queue_depth));
        let shared = Arc::new(Shared {
            health: Mutex::new(HealthRecord {
                sessions_open: vec![false; config.size],
                busy_since: vec![None; config.size],
                ..Default::default()
            }),
            in_use: AtomicUsize::new(0),
            metrics,
            config: config.clone(),
        });
        let mut workers = Vec::with_capacity(config.size);
        for index in 0..config.size {
            let worker = Worker {
                index,
                factory: factory.clone(),
                shared: shared.clone(),
                queue: queue.clone(),
                session: None,
                backoff: Backoff::new(&config),
                last_probe: Instant::now(),
                reopen: false,
                held: HeldReplies::new(),
            };
            let handle = std::thread::Builder::new()
                .name(format!("hsm-worker-{index}"))
                .spawn(move || worker.run())
                .map_err(|e| HsmError::Config(format!("cannot start worker thread: {e}")))?;
            workers.push(handle);
        }
        Ok(SessionPool {
            queue,
            shared,
            workers,
        })
    }

    /// Runs `work` on a worker's session and awaits its result.
    ///
    /// `idempotent` work is retried once on a fresh session after a session-
    /// or token-level failure; other work fails with the error.
    pub async fn run<T, W>(
        &self,
        op: &'static str,
        mechanism: Option<u64>,
        idempotent: bool,
        work: W,
    ) -> Result<T>
    where
        T: Send + 'static,
        W: FnMut(&mut F::Session) -> Result<T> + Send + 'static,
    {
        self.submit(Lane::SHARED, op, mechanism, idempotent, work)
            .await
    }

    /// Queues `work` now in `lane` and returns the future of its result, so
    /// a caller can have several jobs queued (for different workers) at
    /// once. As [`SessionPool::run`] otherwise; the deadline runs from now.
    pub fn submit<T, W>(
        &self,
        lane: Lane,
        op: &'static str,
        mechanism: Option<u64>,
        idempotent: bool,
        work: W,
    ) -> impl Future<Output = Result<T>> + Send + 'static
    where
        T: Send + 'static,
        W: FnMut(&mut F::Session) -> Result<T> + Send + 'static,
    {
        let timeout = Duration::from_millis(self.shared.config.op_timeout_ms);
        // The caller's deadline is fixed now, like the worker's, not when
        // the future is first polled: a caller awaiting several jobs one
        // after another must not wait for each in turn.
        let deadline = tokio::time::Instant::now() + timeout;
        let queued = self.enqueue(lane, op, mechanism, idempotent, timeout, work);
        let shared = self.shared.clone();
        async move {
            match tokio::time::timeout_at(deadline, queued?).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(HsmError::Shutdown),
                Err(_) => {
                    shared.metrics.error("timeout");
                    Err(HsmError::Timeout(timeout))
                }
            }
        }
    }

    fn enqueue<T, W>(
        &self,
        lane: Lane,
        op: &'static str,
        mechanism: Option<u64>,
        idempotent: bool,
        timeout: Duration,
        work: W,
    ) -> Result<oneshot::Receiver<Result<T>>>
    where
        T: Send + 'static,
        W: FnMut(&mut F::Session) -> Result<T> + Send + 'static,
    {
        let now = Instant::now();
        let (reply, rx) = oneshot::channel();
        let job: Job<F::Session> = Box::new(TypedTask {
            work,
            value: None,
            reply: Some(reply),
            meta: JobMeta {
                op,
                mechanism,
                idempotent,
                enqueued: now,
                deadline: now + timeout,
            },
            _session: std::marker::PhantomData,
        });
        match self.queue.push(lane, job) {
            Ok(()) => {}
            Err(PushError::Full(_)) => {
                self.shared.metrics.error("busy");
                return Err(HsmError::Busy {
                    retry_after: self.retry_after(),
                });
            }
            Err(PushError::Closed(_)) => return Err(HsmError::Shutdown),
        }
        self.shared.metrics.queue_depth(self.queue.len());
        Ok(rx)
    }

    fn retry_after(&self) -> Duration {
        // Roughly the time to drain a full queue at one job per millisecond
        // per worker, but at least a second so clients do not hammer.
        let drain = self.shared.config.queue_depth as u64 / self.shared.config.size as u64;
        Duration::from_millis(drain.max(1000))
    }

    /// Current health.
    pub fn health(&self) -> Health {
        let timeout = Duration::from_millis(self.shared.config.op_timeout_ms);
        let queue_depth = self.queue.len();
        self.shared.record(|h| {
            let workers = h.sessions_open.len();
            let sessions_open = h.sessions_open.iter().filter(|o| **o).count();
            let workers_stuck = h
                .busy_since
                .iter()
                .flatten()
                .filter(|t| t.elapsed() > timeout)
                .count();
            let state = if sessions_open == 0 {
                HealthState::Down
            } else if sessions_open < workers || workers_stuck > 0 || h.last_was_error {
                HealthState::Degraded
            } else {
                HealthState::Up
            };
            Health {
                state,
                workers,
                sessions_open,
                workers_stuck,
                queue_depth,
                last_success: h.last_success,
                last_error: h.last_error.clone(),
                last_error_at: h.last_error_at,
            }
        })
    }

    /// Counts an error a job answered for one of its items rather than
    /// failed with (an item of a batch the token refused), as a failed job's
    /// error is counted.
    pub fn count_item_error(&self, e: &HsmError) {
        self.shared.metrics.error(e.metric_label());
    }

    /// Pool configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.shared.config
    }
}

impl<F: SessionFactory> Drop for SessionPool<F> {
    fn drop(&mut self) {
        self.queue.close();
        // Workers stuck in a stalled PKCS#11 call would block a join forever;
        // they exit on their own once the call returns.
        self.workers.clear();
    }
}

struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    next_try: Instant,
}

impl Backoff {
    fn new(config: &PoolConfig) -> Backoff {
        let initial = Duration::from_millis(config.backoff_initial_ms.max(1));
        Backoff {
            initial,
            max: Duration::from_millis(config.backoff_max_ms).max(initial),
            current: initial,
            next_try: Instant::now(),
        }
    }

    fn failed(&mut self) {
        self.next_try = Instant::now() + self.current;
        self.current = (self.current * 2).min(self.max);
    }

    fn reset(&mut self) {
        self.current = self.initial;
        self.next_try = Instant::now();
    }
}

struct Worker<F: SessionFactory> {
    index: usize,
    factory: Arc<F>,
    shared: Arc<Shared>,
    queue: Arc<FairQueue<Job<F::Session>>>,
    session: Option<F::Session>,
    backoff: Backoff,
    last_probe: Instant,
    /// A job's failure dropped the session for a reason a new session may
    /// cure (not a token gone): reopen once the job is answered.
    reopen: bool,
    /// Finished jobs whose answers wait for [`HeldReplies::deliver`].
    held: HeldReplies<F::Session>,
}

/// Answers a busy worker holds back to hand over several per wake-up.
///
/// Each answer wakes the caller's runtime thread, and waking a parked
/// thread costs a futex call and an inter-processor interrupt — under a
/// hypervisor a VM exit, measured at about 12 µs of the worker's time per
/// job, a fifth of a soft-token signature. Once one answer has woken the
/// runtime, the next ones find it awake and cost nothing. So while more
/// jobs are already queued (their callers are waiting anyway), a worker
/// holds answers for at most [`HOLD_WINDOW`] or [`HOLD_MAX`] jobs; with
/// fewer than [`HOLD_MIN_QUEUED`] jobs waiting it answers at once, so a pool
/// that is not saturated adds no latency.
struct HeldReplies<S> {
    jobs: Vec<Job<S>>,
    since: Option<Instant>,
}

/// Longest time a finished answer waits for company: about four soft-token
/// signatures. 100 µs left the pool at 10–11% overhead (the target is 10%),
/// 200 µs at 7–9%; the extra wait falls only on callers that were queued.
const HOLD_WINDOW: Duration = Duration::from_micros(200);
/// Most answers held at once.
const HOLD_MAX: usize = 8;
/// The one operation whose answers are held: a single signature. A held
/// answer waits for the next job only when that job is one too, so its
/// delay is bounded by one signature past [`HOLD_WINDOW`] — unless that
/// signature itself stalls in the token, which the callers' deadline covers.
const HOLD_OP: &str = "sign";
/// Answers are held only while at least this many jobs wait: a queue this
/// deep means the pool is saturated and its callers' latency is queueing
/// anyway; below it (e.g. svsd at half of its peak) answers go at once.
const HOLD_MIN_QUEUED: usize = 4;

impl<S> HeldReplies<S> {
    fn new() -> Self {
        HeldReplies {
            jobs: Vec::with_capacity(HOLD_MAX),
            since: None,
        }
    }

    fn hold(&mut self, job: Job<S>) {
        self.since.get_or_insert_with(Instant::now);
        self.jobs.push(job);
    }

    fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    fn due(&self) -> bool {
        self.jobs.len() >= HOLD_MAX || self.since.is_some_and(|t| t.elapsed() >= HOLD_WINDOW)
    }

    fn deliver(&mut self) {
        self.since = None;
        for job in self.jobs.drain(..) {
            job.deliver();
        }
    }
}

impl<F: SessionFactory> Worker<F> {
    fn run(mut self) {
        let probe_every = Duration::from_millis(self.shared.config.probe_interval_ms.max(10));
        let _ = self.ensure_session(None);
        loop {
            // Jobs are guarded in `handle`; this guards the rest (module
            // calls while opening or probing, the daemon's metrics hooks),
            // so a panic costs a session, never the worker.
            let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                // Held answers go out before the worker could block.
                let next = if self.held.is_empty() {
                    self.queue.pop_timeout(probe_every)
                } else {
                    match self.queue.try_pop() {
                        Some(job) => {
                            // Held answers wait only for quick signatures,
                            // never for a batch chunk, a key generation or
                            // anything else that may take long.
                            if job.meta().op != HOLD_OP || self.held.due() {
                                self.held.deliver();
                            }
                            Ok(job)
                        }
                        None => {
                            self.held.deliver();
                            return true;
                        }
                    }
                };
                match next {
                    Ok(job) => {
                        self.shared.metrics.queue_depth(self.queue.len());
                        self.handle(job);
                        if self.held.due() || self.queue.len() < HOLD_MIN_QUEUED {
                            self.held.deliver();
                        }
                        true
                    }
                    Err(PopError::Timeout) => {
                        self.idle();
                        true
                    }
                    Err(PopError::Closed) => false,
                }
            }));
            match step {
                Ok(true) => {}
                Ok(false) => break,
                Err(_) => {
                    // Held answers are finished work: they still go out.
                    self.held.deliver();
                    tracing::error!(
                        worker = self.index,
                        "HSM worker panicked; reopening its session"
                    );
                    self.shared.metrics.error("worker_panic");
                    self.session = None;
                    self.set_open(false);
                }
            }
        }
    }

    // Idle time is used to notice a dead session (or bring one back) before
    // a caller's job has to pay for it.
    fn idle(&mut self) {
        let probe_every = Duration::from_millis(self.shared.config.probe_interval_ms);
        if self.last_probe.elapsed() < probe_every {
            return;
        }
        self.last_probe = Instant::now();
        let Some(session) = self.session.as_mut() else {
            let _ = self.ensure_session(None);
            return;
        };
        let Err(e) = self.factory.probe(session) else {
            return;
        };
        self.note_error(&e);
        match e.rv_class() {
            Some(RvClass::CallerError) => {}
            Some(RvClass::Relogin) => {
                self.shared.metrics.recovery(RvClass::Relogin);
                let relogged = self.session.as_mut().map(|s| self.factory.relogin(s));
                if !matches!(relogged, Some(Ok(()))) {
                    self.drop_session(RvClass::RetrySession);
                }
            }
            class => self.drop_session(class.unwrap_or(RvClass::Fatal)),
        }
    }

    fn set_open(&self, open: bool) {
        let index = self.index;
        self.shared.record(|h| h.sessions_open[index] = open);
    }

    fn drop_session(&mut self, class: RvClass) {
        self.reopen = class != RvClass::TokenGone;
        self.shared.metrics.recovery(class);
        // Dropping closes it; a close on a dead session fails harmlessly.
        self.session = None;
        self.set_open(false);
    }

    fn note_error(&self, e: &HsmError) {
        self.shared.metrics.error(e.metric_label());
        let text = e.to_string();
        self.shared.record(|h| {
            h.last_error = Some(text);
            h.last_error_at = Some(SystemTime::now());
            h.last_was_error = true;
        });
    }

    /// Opens a session unless one is open, waiting out the backoff but never
    /// past `deadline`.
    fn ensure_session(&mut self, deadline: Option<Instant>) -> Result<()> {
        loop {
            if self.session.is_some() {
                return Ok(());
            }
            // Opening may wait out a backoff: finished answers go out first.
            self.held.deliver();
            let now = Instant::now();
            if self.backoff.next_try > now {
                match deadline {
                    Some(d) if self.backoff.next_try < d => {
                        std::thread::sleep(self.backoff.next_try - now)
                    }
                    _ => {
                        let last = self
                            .shared
                            .record(|h| h.last_error.clone())
                            .unwrap_or_default();
                        return Err(HsmError::Unavailable(format!(
                            "token session is being recovered: {last}"
                        )));
                    }
                }
            }
            match self.factory.open() {
                Ok(s) => {
                    self.session = Some(s);
                    self.backoff.reset();
                    self.set_open(true);
                    tracing::info!(worker = self.index, "HSM session open");
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(worker = self.index, error = %e, "cannot open HSM session");
                    self.note_error(&e);
                    self.backoff.failed();
                    if deadline.is_none() {
                        return Err(e);
                    }
                }
            }
        }
    }

    fn handle(&mut self, job: Job<F::Session>) {
        self.run_job(job);
        // A session dropped by the job's failure comes back now (backoff
        // permitting), not at the next job or idle probe: until then the
        // pool counts this worker down, and a pool whose every worker hit
        // one transient error would refuse work for a probe interval. Not
        // for a token gone: opening would fail too and only lengthen the
        // backoff that the next job's open waits out.
        if std::mem::take(&mut self.reopen) && self.session.is_none() {
            let _ = self.ensure_session(None);
        }
    }

    fn run_job(&mut self, mut job: Job<F::Session>) {
        let meta = job.meta();
        let (deadline, idempotent, op, mechanism) =
            (meta.deadline, meta.idempotent, meta.op, meta.mechanism);
        let budget = meta.deadline - meta.enqueued;
        self.shared.metrics.queue_wait(meta.enqueued.elapsed());
        let mut retried = false;
        loop {
            if job.abandoned() {
                // Nobody would receive the result; a key generation or an
                // import done now would surprise the caller's retry.
                return;
            }
            if Instant::now() >= deadline {
                job.fail(HsmError::Timeout(budget));
                return;
            }
            let opening = self.session.is_none();
            if let Err(e) = self.ensure_session(Some(deadline)) {
                job.fail(e);
                return;
            }
            let Some(session) = self.session.as_mut() else {
                continue;
            };
            if opening {
                // Opening and logging in (on a slow HSM) may have outlasted
                // the caller: the checks above again, before the job runs
                // for nobody (an anchor replaced after its caller gave up
                // could undo a newer one).
                continue;
            }
            let in_use = self.shared.in_use.fetch_add(1, Ordering::Relaxed) + 1;
            self.shared.metrics.sessions_in_use(in_use);
            let index = self.index;
            let started = Instant::now();
            self.shared.record(|h| h.busy_since[index] = Some(started));
            // A panic inside a job must not take the worker (and its share
            // of the pool) down with it.
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.attempt(session)))
                    .unwrap_or(Err(HsmError::WorkerPanic(op)));
            self.shared.record(|h| h.busy_since[index] = None);
            let in_use = self.shared.in_use.fetch_sub(1, Ordering::Relaxed) - 1;
            self.shared.metrics.sessions_in_use(in_use);
            let took = started.elapsed();
            self.shared
                .metrics
                .operation(op, mechanism, took, result.is_ok());
            let error = match result {
                Ok(()) => {
                    self.shared.record(|h| {
                        h.last_success = Some(SystemTime::now());
                        h.last_was_error = false;
                    });
                    self.held.hold(job);
                    // Only quick signatures are worth coalescing: a slower
                    // token (a network HSM) makes the wake-up cost nothing.
                    if op != HOLD_OP || took >= HOLD_WINDOW {
                        self.held.deliver();
                    }
                    return;
                }
                Err(e) => e,
            };
            // Recovery may sleep: finished answers must not wait for it.
            self.held.deliver();
            let class = error.rv_class();
            match class {
                // A bad request says nothing about the token's health.
                None | Some(RvClass::CallerError) => {
                    self.shared.metrics.error(error.metric_label());
                    job.fail(error);
                    return;
                }
                Some(RvClass::Relogin) => {
                    self.note_error(&error);
                    self.shared.metrics.recovery(RvClass::Relogin);
                    let relogged = self.session.as_mut().map(|s| self.factory.relogin(s));
                    if !matches!(relogged, Some(Ok(()))) {
                        self.drop_session(RvClass::RetrySession);
                    }
                }
                Some(c @ (RvClass::RetrySession | RvClass::TokenGone)) => {
                    self.note_error(&error);
                    self.drop_session(c);
                }
                Some(RvClass::Fatal) => {
                    self.note_error(&error);
                    self.drop_session(RvClass::Fatal);
                    job.fail(error);
                    return;
                }
            }
            if !idempotent || retried {
                job.fail(error);
                return;
            }
            tracing::info!(worker = self.index, error = %error, "retrying once on a recovered session");
            retried = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    /// Sessions are numbers; `fail_next` makes the next attempt fail with a code.
    struct FakeFactory {
        opened: AtomicU64,
        refuse_open: Mutex<u32>,
    }

    impl SessionFactory for FakeFactory {
        type Session = u64;
        fn open(&self) -> Result<u64> {
            let mut refuse = self.refuse_open.lock().unwrap();
            if *refuse > 0 {
                *refuse -= 1;
                return Err(rv_error(0xE0));
            }
            Ok(self.opened.fetch_add(1, Ordering::SeqCst) + 1)
        }
        fn relogin(&self, _: &mut u64) -> Result<()> {
            Ok(())
        }
        fn probe(&self, _: &mut u64) -> Result<()> {
            Ok(())
        }
    }

    fn rv_error(code: u64) -> HsmError {
        HsmError::Pkcs11 {
            rv: crate::error::rv_info_from_code(code).unwrap(),
            function: "Test".into(),
        }
    }

    fn pool(
        size: usize,
        queue: usize,
        timeout_ms: u64,
    ) -> (Arc<FakeFactory>, SessionPool<FakeFactory>) {
        pool_with(PoolConfig {
            size,
            queue_depth: queue,
            op_timeout_ms: timeout_ms,
            backoff_initial_ms: 5,
            backoff_max_ms: 20,
            probe_interval_ms: 50,
        })
    }

    fn pool_with(cfg: PoolConfig) -> (Arc<FakeFactory>, SessionPool<FakeFactory>) {
        let f = Arc::new(FakeFactory {
            opened: AtomicU64::new(0),
            refuse_open: Mutex::new(0),
        });
        (
            f.clone(),
            SessionPool::start(f, cfg, Arc::new(NoMetrics)).unwrap(),
        )
    }

    #[tokio::test]
    async fn retries_idempotent_work_once_on_a_new_session() {
        let (f, pool) = pool(1, 4, 2000);
        let mut first = true;
        let session = pool
            .run("t", None, true, move |s: &mut u64| {
                if std::mem::take(&mut first) {
                    return Err(rv_error(0xB3)); // SESSION_HANDLE_INVALID
                }
                Ok(*s)
            })
            .await
            .unwrap();
        assert_eq!(session, 2, "second attempt ran on a reopened session");
        assert_eq!(f.opened.load(Ordering::SeqCst), 2);

        // Non-idempotent work is not retried.
        let e = pool
            .run("t", None, false, |_: &mut u64| -> Result<()> {
                Err(rv_error(0x30))
            })
            .await;
        assert_eq!(e.unwrap_err().ck_rv(), Some(0x30));
        // Caller errors keep the session.
        pool.run("t", None, true, |_: &mut u64| Ok(()))
            .await
            .unwrap();
        let before = f.opened.load(Ordering::SeqCst);
        let e = pool
            .run("t", None, true, |_: &mut u64| -> Result<()> {
                Err(rv_error(0x70))
            })
            .await;
        assert_eq!(e.unwrap_err().ck_rv(), Some(0x70));
        assert_eq!(f.opened.load(Ordering::SeqCst), before);
    }

    #[tokio::test]
    async fn a_session_lost_with_a_failed_job_is_reopened_at_once() {
        let (f, pool) = pool_with(PoolConfig {
            size: 1,
            queue_depth: 4,
            op_timeout_ms: 2000,
            backoff_initial_ms: 5,
            backoff_max_ms: 20,
            // No idle probe within the test: only the fix can reopen.
            probe_interval_ms: 600_000,
        });
        pool.run("t", None, true, |_: &mut u64| Ok(()))
            .await
            .unwrap();
        // DEVICE_ERROR, not retried (not idempotent): the session is gone.
        let e = pool
            .run("t", None, false, |_: &mut u64| -> Result<()> {
                Err(rv_error(0x30))
            })
            .await;
        assert_eq!(e.unwrap_err().ck_rv(), Some(0x30));
        let deadline = Instant::now() + Duration::from_secs(5);
        while pool.health().sessions_open == 0 {
            assert!(Instant::now() < deadline, "{:?}", pool.health());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(f.opened.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_panicking_job_fails_alone_and_caller_errors_keep_health() {
        let (f, pool) = pool(1, 4, 2000);
        let e = pool
            .run("boom", None, true, |_: &mut u64| -> Result<()> {
                panic!("test panic")
            })
            .await;
        assert!(matches!(e, Err(HsmError::WorkerPanic("boom"))), "{e:?}");
        assert_eq!(
            pool.run("t", None, true, |s: &mut u64| Ok(*s))
                .await
                .unwrap(),
            2
        );
        assert_eq!(
            f.opened.load(Ordering::SeqCst),
            2,
            "session replaced after the panic"
        );
        let e = pool
            .run("t", None, true, |_: &mut u64| -> Result<()> {
                Err(rv_error(0x21))
            })
            .await;
        assert_eq!(e.unwrap_err().ck_rv(), Some(0x21));
        assert_eq!(pool.health().state, HealthState::Up);
    }

    #[tokio::test]
    async fn work_whose_caller_left_is_not_run() {
        let (_f, pool) = pool(1, 4, 5000);
        let pool = Arc::new(pool);
        let ran = Arc::new(AtomicU64::new(0));
        let p = pool.clone();
        let slow = tokio::spawn(async move {
            p.run("slow", None, true, |_: &mut u64| {
                std::thread::sleep(Duration::from_millis(300));
                Ok(())
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let r = ran.clone();
        let gave_up = tokio::time::timeout(
            Duration::from_millis(50),
            pool.run("generate", None, false, move |_: &mut u64| {
                r.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }),
        )
        .await;
        assert!(gave_up.is_err(), "the caller gave up waiting");
        slow.await.unwrap().unwrap();
        // The worker is free again; the abandoned job must not have run.
        pool.run("after", None, true, |_: &mut u64| Ok(()))
            .await
            .unwrap();
        assert_eq!(ran.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn busy_and_timeout() {
        let (_f, pool) = pool(1, 1, 300);
        let pool = Arc::new(pool);
        let p = pool.clone();
        let slow = tokio::spawn(async move {
            p.run("slow", None, true, |_: &mut u64| {
                std::thread::sleep(Duration::from_millis(500));
                Ok(())
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let p = pool.clone();
        let queued =
            tokio::spawn(async move { p.run("q", None, true, |_: &mut u64| Ok(())).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let busy = pool.run("b", None, true, |_: &mut u64| Ok(())).await;
        assert!(matches!(busy, Err(HsmError::Busy { .. })), "{busy:?}");
        assert!(matches!(slow.await.unwrap(), Err(HsmError::Timeout(_))));
        assert!(matches!(queued.await.unwrap(), Err(HsmError::Timeout(_))));
        tokio::time::sleep(Duration::from_millis(400)).await;
        pool.run("after", None, true, |_: &mut u64| Ok(()))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn token_gone_recovers_with_backoff() {
        let (f, pool) = pool(2, 8, 2000);
        *f.refuse_open.lock().unwrap() = 3;
        let mut first = true;
        let r = pool
            .run("t", None, true, move |s: &mut u64| {
                if std::mem::take(&mut first) {
                    return Err(rv_error(0xE0)); // TOKEN_NOT_PRESENT
                }
                Ok(*s)
            })
            .await;
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(
            pool.health()
                .last_error
                .as_deref()
                .map(|e| e.contains("CKR_TOKEN_NOT_PRESENT")),
            Some(true)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let h = pool.health();
        assert_eq!(h.state, HealthState::Up, "{h:?}");
        assert_eq!(h.sessions_open, 2);
    }

    #[tokio::test]
    async fn held_answers_reach_their_own_callers() {
        // One worker, many callers: answers are held while jobs queue up,
        // and each must reach the caller that asked, none left behind.
        let (_f, pool) = pool(1, 256, 5000);
        let pool = Arc::new(pool);
        let mut tasks = Vec::new();
        for i in 0..200u64 {
            let p = pool.clone();
            tasks.push(tokio::spawn(async move {
                p.run(HOLD_OP, None, true, move |_: &mut u64| {
                    std::thread::sleep(Duration::from_micros(50));
                    Ok(i)
                })
                .await
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap().unwrap(), i as u64);
        }
    }

    #[tokio::test]
    async fn a_lane_with_a_backlog_does_not_stand_before_another_lanes_job() {
        let (_f, pool) = pool(1, 64, 5000);
        let order = Arc::new(Mutex::new(Vec::new()));
        let job = |tag: &'static str| {
            let order = order.clone();
            move |_: &mut u64| {
                order.lock().unwrap().push(tag);
                Ok(())
            }
        };
        // The worker is busy while the backlog builds up.
        let blocker = pool.submit(Lane(1), "blocker", None, true, |_: &mut u64| {
            std::thread::sleep(Duration::from_millis(50));
            Ok(())
        });
        let backlog: Vec<_> = (0..20)
            .map(|_| pool.submit(Lane(1), "sign", None, true, job("bulk")))
            .collect();
        let other = pool.submit(Lane(2), "sign", None, true, job("other"));
        blocker.await.unwrap();
        other.await.unwrap();
        for b in backlog {
            b.await.unwrap();
        }
        let order = order.lock().unwrap();
        assert_eq!(order.len(), 21);
        // At most one of the backlog went first (depending on whether the
        // worker had taken the blocker before the backlog came), not 20.
        let at = order.iter().position(|t| *t == "other");
        assert!(at.is_some_and(|i| i <= 1), "{order:?}");
    }

    #[tokio::test]
    async fn held_answers_do_not_wait_for_a_recovery() {
        let (f, pool) = pool_with(PoolConfig {
            size: 1,
            queue_depth: 16,
            op_timeout_ms: 5000,
            backoff_initial_ms: 1500,
            backoff_max_ms: 1500,
            probe_interval_ms: 10_000,
        });
        // The worker's first session is open before opening is refused.
        pool.run("warm", None, true, |_: &mut u64| Ok(()))
            .await
            .unwrap();
        let start = Instant::now();
        // A slow job keeps the worker while the rest queues up behind it.
        let blocker = pool.submit(Lane::SHARED, "blocker", None, true, |_: &mut u64| {
            std::thread::sleep(Duration::from_millis(100));
            Ok(())
        });
        // A is a quick signature with a saturated queue behind it: held …
        let a = pool.submit(Lane::SHARED, HOLD_OP, None, true, |_: &mut u64| Ok(()));
        // … and B fails, sending the worker into a 1.5 s reopen backoff.
        *f.refuse_open.lock().unwrap() = 1;
        let mut first = true;
        let b = pool.submit(Lane::SHARED, HOLD_OP, None, true, move |_: &mut u64| {
            if std::mem::take(&mut first) {
                return Err(rv_error(0xB3)); // SESSION_HANDLE_INVALID
            }
            Ok(())
        });
        let behind: Vec<_> = (0..HOLD_MIN_QUEUED)
            .map(|_| pool.submit(Lane::SHARED, HOLD_OP, None, true, |_: &mut u64| Ok(())))
            .collect();
        let a = tokio::spawn(async move { a.await.map(|()| start.elapsed()) });
        let b = tokio::spawn(async move { b.await.map(|()| start.elapsed()) });
        blocker.await.unwrap();
        for c in behind {
            c.await.unwrap();
        }
        let (a, b) = (a.await.unwrap().unwrap(), b.await.unwrap().unwrap());
        assert!(
            b >= Duration::from_millis(1500),
            "B waited out the backoff: {b:?}"
        );
        assert!(
            a < Duration::from_millis(1000),
            "A was answered before it: {a:?}"
        );
    }

    #[tokio::test]
    async fn held_answers_do_not_wait_for_a_long_job() {
        let (_f, pool) = pool(1, 16, 5000);
        let start = Instant::now();
        let blocker = pool.submit(Lane::SHARED, "blocker", None, true, |_: &mut u64| {
            std::thread::sleep(Duration::from_millis(100));
            Ok(())
        });
        // A quick signature, held while the queue is deep …
        let a = pool.submit(Lane::SHARED, HOLD_OP, None, true, |_: &mut u64| Ok(()));
        // … must not wait for the key generation behind it.
        let long = pool.submit(Lane::SHARED, "generate", None, false, |_: &mut u64| {
            std::thread::sleep(Duration::from_millis(1000));
            Ok(())
        });
        let behind: Vec<_> = (0..HOLD_MIN_QUEUED)
            .map(|_| pool.submit(Lane::SHARED, HOLD_OP, None, true, |_: &mut u64| Ok(())))
            .collect();
        let a = tokio::spawn(async move { a.await.map(|()| start.elapsed()) });
        blocker.await.unwrap();
        long.await.unwrap();
        for c in behind {
            c.await.unwrap();
        }
        let a = a.await.unwrap().unwrap();
        assert!(
            a < Duration::from_millis(800),
            "A waited for the long job: {a:?}"
        );
    }

    #[tokio::test]
    async fn a_submitted_jobs_deadline_runs_from_submission() {
        let (_f, pool) = pool(1, 4, 300);
        let slow = |_: &mut u64| {
            std::thread::sleep(Duration::from_millis(250));
            Ok(())
        };
        let first = pool.submit(Lane::SHARED, "a", None, true, slow);
        let second = pool.submit(Lane::SHARED, "b", None, true, slow);
        first.await.unwrap();
        // Polled only now, 250 ms in: its 300 ms ran out at 300 ms, not 550.
        let r = second.await;
        assert!(matches!(r, Err(HsmError::Timeout(_))), "{r:?}");
    }
}
