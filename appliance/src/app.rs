//! The request handlers and the daemon's shared state: policy (swapped on
//! reload), the signing backend, the audit trail, readiness and self-tests.
//! Transport-free: [`crate::server`] feeds it parsed requests.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hyper::body::Bytes;
use serde_json::json;
use svs_hsm::signature::{DEFAULT_SM2_ID, SoftwareVerifier};
use svs_hsm::{KeyInfo, KeySet};

use crate::anomaly::{AnomalyConfig, Flip};
use crate::api::{self, Encoding, Input, SignRequest, SignResponse, VerifyRequest, VerifyResponse};
use crate::audit::{AuditEvent, AuditTrail};
use crate::backend::SigningBackend;
use crate::config::{Config, KeyExposure, Limits, Operation};
use crate::error::{NotReady, SvsError};
use crate::metrics::{self, LimitReason, Metrics};
use crate::policy::{ConnectionSlot, Entity, InFlight, Policy, VerifiedClient, take_up_to};
use crate::refusals::{LogLimit, RefusalRecords};
use crate::reload::ReloadChanges;

/// How a reload's changes and self-test name the audit checkpoint key.
const CHECKPOINT_KEY: &str = "checkpoint key";

/// The parts of the configuration a reload may change.
#[derive(Debug)]
pub struct Runtime {
    /// Entities.
    pub policy: Policy,
    /// Exposed keys.
    pub keys: BTreeMap<String, KeyExposure>,
    /// Limits.
    pub limits: Limits,
    /// Abnormal-traffic detection.
    pub anomaly: AnomalyConfig,
}

impl Runtime {
    /// The `key` metric label for a key name a client gave: configured
    /// names as they are, anything else one bucket.
    pub fn key_label(&self, key: Option<&str>) -> &str {
        match key {
            None => metrics::NONE,
            // The runtime's own copy of the name: a label that outlives the
            // request (counted after its audit record is written).
            Some(k) => self
                .keys
                .get_key_value(k)
                .map_or(metrics::UNKNOWN, |(name, _)| name.as_str()),
        }
    }
}

/// An answer, ready for any transport.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// JSON body.
    pub body: serde_json::Value,
    /// Seconds for Retry-After.
    pub retry_after: Option<u64>,
    /// Allow (on a 405).
    pub allow: Option<&'static str>,
}

impl Reply {
    pub(crate) fn ok(body: serde_json::Value) -> Reply {
        Reply {
            status: 200,
            body,
            retry_after: None,
            allow: None,
        }
    }
}

impl From<SvsError> for Reply {
    fn from(e: SvsError) -> Reply {
        let w = e.wire();
        Reply {
            status: w.status,
            body: e.to_json(),
            retry_after: w.retry_after,
            allow: w.allow,
        }
    }
}

/// What the checks made before a body is read decided, held for the whole
/// request: the runtime snapshot every later step uses (one policy, one key
/// set, one set of limits), the entity, and its concurrency slot (released
/// on drop, on every path).
#[derive(Debug)]
pub struct Admission {
    rt: Arc<Runtime>,
    entity: Option<Arc<Entity>>,
    _in_flight: Option<InFlight>,
}

impl Admission {
    /// The runtime snapshot of this request.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.rt
    }

    /// The entity, for routes other than the probes.
    pub fn entity(&self) -> Option<&Entity> {
        self.entity.as_deref()
    }
}

/// The part of the in-memory body budget one request body holds: what has
/// arrived of it, counted in the whole budget and in its entity's share
/// ([`Limits::entity_body_bytes`]); given back on drop.
#[derive(Debug)]
pub struct BodyReservation<'a> {
    app: &'a App,
    entity: Option<&'a Entity>,
    /// The entity's share, from the limits the request was admitted under.
    share: usize,
    held: usize,
}

impl BodyReservation<'_> {
    /// Counts `n` more bytes of the body. Past the entity's share: 429
    /// `too_many_concurrent_requests` (its own requests hold too much);
    /// past the whole budget: 503 `server_busy`.
    pub fn grow(&mut self, n: usize) -> Result<(), SvsError> {
        if let Some(e) = self.entity
            && !e.take_body_bytes(n, self.share)
        {
            self.app
                .metrics
                .rate_limited(e.name(), LimitReason::Concurrency);
            return Err(SvsError::TooManyConcurrent);
        }
        if !take_up_to(&self.app.body_held, n, self.app.body_budget_bytes) {
            if let Some(e) = self.entity {
                e.release_body_bytes(n);
            }
            return Err(SvsError::ServerBusy {
                retry_after: Duration::from_secs(1),
            });
        }
        self.held += n;
        Ok(())
    }
}

impl Drop for BodyReservation<'_> {
    fn drop(&mut self) {
        if self.held > 0 {
            self.app.body_held.fetch_sub(self.held, Ordering::AcqRel);
            if let Some(e) = self.entity {
                e.release_body_bytes(self.held);
            }
        }
    }
}

/// The audit trail's entity for a refused client no entity claims.
pub const UNKNOWN_ENTITY: &str = "_unknown";

/// Longest a refused request waits for its audit record to be durable: a
/// hung disk must not hold refusals (and their connections) for ever, and
/// nothing was handed out that the record would have to vouch for. The
/// record stays queued and is written if the disk comes back.
pub const REFUSAL_AUDIT_WAIT: Duration = Duration::from_secs(2);

/// The routes of API v1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// POST /v1/sign
    Sign,
    /// POST /v1/sign/batch
    SignBatch,
    /// POST /v1/verify
    Verify,
    /// POST /v1/verify/batch
    VerifyBatch,
    /// GET /v1/keys
    Keys,
    /// GET /v1/keys/{name}
    Key(String),
    /// GET /healthz
    Healthz,
    /// GET /readyz
    Readyz,
}

/// One served route: method, path template (`{name}` stands for one
/// non-empty path segment) and the [`Route`] it makes.
#[derive(Debug, Clone, Copy)]
pub struct RouteSpec {
    /// HTTP method (a GET route also answers HEAD).
    pub method: &'static str,
    /// Path template, as in docs/openapi.json.
    pub template: &'static str,
    make: fn(&str) -> Route,
}

impl RouteSpec {
    const fn new(method: &'static str, template: &'static str, make: fn(&str) -> Route) -> Self {
        RouteSpec {
            method,
            template,
            make,
        }
    }

    /// The path parameter if `path` matches the template (`""` when it has none).
    fn matches<'p>(&self, path: &'p str) -> Option<&'p str> {
        match self.template.split_once("{name}") {
            None => (path == self.template).then_some(""),
            Some((head, tail)) => path
                .strip_prefix(head)?
                .strip_suffix(tail)
                .filter(|name| !name.is_empty() && !name.contains('/')),
        }
    }

    /// The `Allow` header of a 405 on this route.
    fn allow(&self) -> &'static str {
        if self.method == "GET" {
            "GET, HEAD"
        } else {
            self.method
        }
    }
}

/// Every route served, the one table [`Route::parse`] reads; the OpenAPI
/// test checks the document against it. One method per path.
pub const ROUTES: &[RouteSpec] = &[
    RouteSpec::new("POST", "/v1/sign", |_| Route::Sign),
    RouteSpec::new("POST", "/v1/sign/batch", |_| Route::SignBatch),
    RouteSpec::new("POST", "/v1/verify", |_| Route::Verify),
    RouteSpec::new("POST", "/v1/verify/batch", |_| Route::VerifyBatch),
    RouteSpec::new("GET", "/v1/keys", |_| Route::Keys),
    RouteSpec::new("GET", "/v1/keys/{name}", |n| Route::Key(n.to_owned())),
    RouteSpec::new("GET", "/healthz", |_| Route::Healthz),
    RouteSpec::new("GET", "/readyz", |_| Route::Readyz),
];

impl Route {
    /// Finds the route; 404, or 405 with the methods the path takes.
    pub fn parse(method: &str, path: &str) -> Result<Route, SvsError> {
        let (spec, param) = ROUTES
            .iter()
            .find_map(|r| Some((r, r.matches(path)?)))
            .ok_or(SvsError::NotFound)?;
        if method == spec.method || (spec.method == "GET" && method == "HEAD") {
            Ok((spec.make)(param))
        } else {
            Err(SvsError::MethodNotAllowed {
                allow: spec.allow(),
            })
        }
    }

    /// Whether the route takes a JSON body.
    pub fn has_body(&self) -> bool {
        matches!(
            self,
            Route::Sign | Route::SignBatch | Route::Verify | Route::VerifyBatch
        )
    }

    /// Whether the route is served to a client no entity claims.
    pub fn is_probe(&self) -> bool {
        matches!(self, Route::Healthz | Route::Readyz)
    }

    /// The signing-API operation of the route, if it is one.
    pub fn operation(&self) -> Option<Operation> {
        match self {
            Route::Sign | Route::SignBatch => Some(Operation::Sign),
            Route::Verify | Route::VerifyBatch => Some(Operation::Verify),
            _ => None,
        }
    }

    /// The `operation` label of HTTP metrics (never the key name in the path).
    pub fn metric_name(&self) -> &'static str {
        match self {
            Route::Sign => "sign",
            Route::SignBatch => "sign_batch",
            Route::Verify => "verify",
            Route::VerifyBatch => "verify_batch",
            Route::Keys => "keys",
            Route::Key(_) => "key",
            Route::Healthz => "healthz",
            Route::Readyz => "readyz",
        }
    }
}

/// A reload [`App::check_reload`] accepted, not yet installed.
#[derive(Debug)]
pub struct ReloadPlan {
    changes: ReloadChanges,
    keys: KeySet,
    next: Arc<Runtime>,
}

/// Shared state of the daemon.
pub struct App {
    backend: Arc<dyn SigningBackend>,
    verifier: SoftwareVerifier,
    runtime: RwLock<Arc<Runtime>>,
    audit: Arc<AuditTrail>,
    /// `None` until the first self-test run finishes.
    selftest: Mutex<Option<Result<(), String>>>,
    /// Self-test runs started, and the number of the run whose verdict
    /// `selftest` holds: a run that ends after a later one has recorded
    /// (a periodic run still waiting on the HSM while a reload's re-run
    /// passes) is too old to overwrite it.
    selftest_runs: AtomicU64,
    selftest_recorded: AtomicU64,
    /// The token's user PIN state as last read, to log its changes once.
    user_pin: Mutex<Option<svs_hsm::UserPinState>>,
    draining: AtomicBool,
    metrics: Arc<Metrics>,
    /// Request bodies held in memory, in bytes, all connections together
    /// (what has arrived of each, not what it may grow to).
    body_held: AtomicUsize,
    /// Its size (`max_inflight_body_bytes` at start; fixed until restart).
    body_budget_bytes: usize,
    /// Connections of clients no entity claims, all together.
    unknown_connections: Arc<AtomicUsize>,
    /// The token object that signs checkpoints, as at start (`[audit]`
    /// changes need a restart): never to be exposed to clients.
    checkpoint_key: Option<String>,
    /// The audit anchor's data object on the token, as at start.
    anchor_object: Option<String>,
    /// The head seq this svsd last wrote to the anchor. Held while the
    /// anchor is updated: a checkpoint and the stop's update can meet, and
    /// two replacing the same object would each destroy the old one (and
    /// the later head must win).
    anchor_written: Arc<tokio::sync::Mutex<u64>>,
    /// Which refusals get an audit record of their own.
    refusals: RefusalRecords,
    /// Refusal-audit failures logged at most once a second (clients can
    /// cause them at will once the trail is broken).
    refusal_log: LogLimit,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").finish_non_exhaustive()
    }
}

/// A body from which size on parsing it, and decoding and hashing its
/// inputs, go to a blocking thread: a 1 MiB sign request held a runtime
/// thread for 16 ms (measured), and the runtime has one thread per CPU.
/// Below it the hand-off would cost more than the work.
const LARGE_BODY: usize = 64 << 10;

/// One batch item's outcome: its JSON and its audit record.
type ItemResult = (Result<serde_json::Value, SvsError>, AuditEvent);

/// A sign item checked and hashed, waiting for its private-key operation.
struct PreparedSign {
    /// The exposed key name, echoed in the answer.
    key: String,
    /// The key the digest was made for (its Z), which must also sign it:
    /// looked up again, a reload in between could swap the key.
    info: Arc<KeyInfo>,
    digest: [u8; 32],
    encoding: api::Encoding,
}

fn micros(since: Instant) -> u64 {
    since.elapsed().as_micros().min(u128::from(u64::MAX)) as u64
}

impl App {
    /// State for `config`, with `backend` and an opened audit trail.
    pub fn new(config: &Config, backend: Arc<dyn SigningBackend>, audit: Arc<AuditTrail>) -> App {
        App::with_metrics(config, backend, audit, Arc::new(Metrics::new()))
    }

    /// Like [`App::new`], counting into `metrics` (which the HSM pool may
    /// already be feeding).
    pub fn with_metrics(
        config: &Config,
        backend: Arc<dyn SigningBackend>,
        audit: Arc<AuditTrail>,
        metrics: Arc<Metrics>,
    ) -> App {
        metrics.register_audit(audit.stats());
        let runtime = Runtime {
            policy: Policy::new(&config.entities, None),
            keys: config.keys.clone(),
            limits: config.limits.clone(),
            anomaly: config.anomaly.clone(),
        };
        metrics.configured(&runtime);
        App {
            backend,
            verifier: SoftwareVerifier::new(),
            runtime: RwLock::new(Arc::new(runtime)),
            audit,
            selftest: Mutex::new(None),
            selftest_runs: AtomicU64::new(0),
            selftest_recorded: AtomicU64::new(0),
            user_pin: Mutex::new(None),
            draining: AtomicBool::new(false),
            metrics,
            body_held: AtomicUsize::new(0),
            unknown_connections: Arc::new(AtomicUsize::new(0)),
            body_budget_bytes: config.limits.max_inflight_body_bytes,
            checkpoint_key: config.audit.checkpoint_key.clone(),
            anchor_object: config.audit.anchor_object.clone(),
            anchor_written: Arc::new(tokio::sync::Mutex::new(0)),
            refusals: RefusalRecords::new(config.audit.refusal_records),
            refusal_log: LogLimit::new(Duration::from_secs(1)),
        }
    }

    /// The current runtime configuration.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The audit trail.
    pub fn audit(&self) -> &Arc<AuditTrail> {
        &self.audit
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn SigningBackend> {
        &self.backend
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Checks that every exposed key, and the checkpoint key svsd signs
    /// with, is among the token's keys `found`.
    fn check_keys(
        &self,
        keys: &BTreeMap<String, KeyExposure>,
        found: &KeySet,
    ) -> Result<(), SvsError> {
        let mut missing: Vec<String> = keys
            .iter()
            .filter(|(_, k)| !found.contains_key(&k.object))
            .map(|(name, k)| format!("[keys] {name:?}: token object {:?} not found", k.object))
            .collect();
        // Installed without it, checkpoints would fail until a restart.
        if let Some(object) = &self.checkpoint_key
            && !found.contains_key(object)
        {
            missing.push(format!(
                "token object {object:?}, which svsd signs audit checkpoints with, not found"
            ));
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(SvsError::Config(missing))
        }
    }

    /// Installs the entities, keys and limits of a new, valid configuration,
    /// and the token's keys as they are now; returns what changed, for the
    /// `reload` audit record. Limiter state carries over; requests in
    /// flight finish under the old configuration.
    ///
    /// The token's keys are re-read but installed only once the reload is
    /// accepted: a key svsd would sign with that is not the one it signs
    /// with now (newly exposed, moved to another token object, or deleted
    /// and created again under the same label) must first pass the pairwise
    /// self-test, as every key did before READY, signed with the re-read
    /// key itself. Any failure refuses the reload and changes nothing: the
    /// old configuration and the old keys keep serving (a key deleted from
    /// the token can no longer sign, whatever svsd knew of it).
    pub async fn reload(&self, config: &Config) -> Result<ReloadChanges, SvsError> {
        let mut changes = self.install_reload(self.check_reload(config).await?);
        self.retest_after_reload(&mut changes).await;
        Ok(changes)
    }

    /// Everything [`App::reload`] checks and tests before it installs
    /// anything; changes nothing, so it may be cut short.
    pub async fn check_reload(&self, config: &Config) -> Result<ReloadPlan, SvsError> {
        // The new file's own check compares with its own checkpoint_key,
        // which may differ from (or drop) the one still signing: a client
        // given that key could sign checkpoint texts.
        if let Some(audit) = &self.checkpoint_key
            && let Some(name) = config
                .keys
                .iter()
                .find_map(|(name, k)| (&k.object == audit).then_some(name))
        {
            return Err(SvsError::Config(vec![format!(
                "[keys] {name:?} exposes {audit:?}, the token object svsd signs audit checkpoints with"
            )]));
        }
        // A body larger than the whole budget could never be admitted: every
        // such request would get 503 `server_busy` until a restart.
        if config.limits.max_body_bytes > self.body_budget_bytes {
            return Err(SvsError::Config(vec![format!(
                "[limits] max_body_bytes = {} is more than the body budget svsd started with (max_inflight_body_bytes = {}), which changes only on restart",
                config.limits.max_body_bytes, self.body_budget_bytes
            )]));
        }
        let found = self.backend.discover_keys().await.map_err(|e| {
            let why = match e {
                SvsError::HsmUnavailable(why) => why,
                other => other.to_string(),
            };
            SvsError::HsmUnavailable(format!("re-reading the token's keys: {why}"))
        })?;
        self.check_keys(&config.keys, &found)?;
        let current = self.runtime();
        let mut changes = ReloadChanges::between(&current.policy, &current.keys, config);
        for (section, changed) in [
            ("[limits]", current.limits.reload_differs(&config.limits)),
            ("[anomaly]", current.anomaly != config.anomaly),
        ] {
            if changed {
                changes.settings_changed.push(section.to_owned());
            }
        }
        // Only what the new configuration uses is installed, each key tested
        // if it changed: a key svsd has not tested never signs, not even
        // for a request admitted under the old configuration.
        let mut install = KeySet::new();
        let exposed = config.keys.iter().map(|(name, k)| {
            let remapped = current.keys.get(name) != Some(k);
            (Some(name.as_str()), &k.object, remapped)
        });
        let checkpoint = self
            .checkpoint_key
            .iter()
            .map(|object| (None, object, false));
        for (exposure, object, remapped) in exposed.chain(checkpoint) {
            let Some(info) = found.get(object) else {
                continue;
            };
            let installed = self.backend.key(object);
            let rekeyed = !installed
                .as_ref()
                .is_some_and(|k| k.id == info.id && k.public_point == info.public_point);
            if rekeyed && !remapped {
                match exposure {
                    Some(name) => changes.keys_rekeyed.push(name.to_owned()),
                    None => changes.checkpoint_key_rekeyed = true,
                }
            }
            if let (Some(name), Some(k), false, false) = (exposure, &installed, rekeyed, remapped)
                && k.certificate_chain != info.certificate_chain
            {
                changes.certificates_changed.push(name.to_owned());
            }
            if remapped || rekeyed {
                let name = exposure.unwrap_or(CHECKPOINT_KEY);
                self.pairwise(name, info.clone()).await.map_err(|e| {
                    SvsError::Config(vec![format!(
                        "self-test of a newly exposed or re-created key failed: {}",
                        e.into_reason()
                    )])
                })?;
                changes.pairwise_passed.push(name.to_owned());
            }
            install.insert(object.clone(), info.clone());
        }
        // Built before the write lock, which every request's `runtime()`
        // waits on. Reloads come one at a time (the daemon's signal loop),
        // so `current` is still the runtime being replaced.
        let next = Arc::new(Runtime {
            policy: Policy::new(&config.entities, Some(&current.policy)),
            keys: config.keys.clone(),
            limits: config.limits.clone(),
            anomaly: config.anomaly.clone(),
        });
        Ok(ReloadPlan {
            changes,
            keys: install,
            next,
        })
    }

    /// Installs what [`App::check_reload`] accepted: one step, with no
    /// await, so the `reload` record that follows it is never cut off from
    /// it.
    pub fn install_reload(&self, plan: ReloadPlan) -> ReloadChanges {
        self.backend.install_keys(plan.keys);
        self.metrics.configured(&plan.next);
        *self.runtime.write().unwrap_or_else(|p| p.into_inner()) = plan.next;
        plan.changes
    }

    /// A failed self-test stands until the next periodic run (up to
    /// `[selftest] interval_s`), and keeps every key and tenant from
    /// signing. An accepted reload may have removed its cause (the key
    /// re-created and tested above, or no longer exposed), so the tests run
    /// again at once: before, svsd stayed not ready for minutes after the
    /// reload that fixed it. A run the HSM is too busy for leaves the
    /// verdict to the periodic one.
    pub async fn retest_after_reload(&self, changes: &mut ReloadChanges) {
        if !self.selftest_failed() {
            return;
        }
        let run = self.next_selftest_run();
        match self.selftests().await {
            Err(SelftestFailure::Inconclusive(_)) => {}
            result => {
                let result = result.map_err(SelftestFailure::into_reason);
                let passed = result.is_ok();
                let _ = self.record_selftest(run, result).await;
                // Only once applied: a re-run given up for a stop is not
                // claimed in the reload record.
                changes.selftests_rerun = Some(passed);
            }
        }
    }

    /// Reads the token's user PIN state into the metrics, and logs each
    /// change once. A PIN locked (an officer's wrong PINs, or someone
    /// guessing) leaves svsd signing on the sessions it has, so readiness
    /// stays; but the next restart, or a session recovered after an HSM
    /// error, cannot log in. Unnoticed, that is an outage at the next
    /// reboot: hence an alarm and `svs_hsm_user_pin{state="locked"}` now.
    pub async fn check_user_pin(&self) {
        let state = match self.backend.user_pin_state().await {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the token's user PIN state");
                return;
            }
        };
        self.metrics.user_pin(&state);
        let before = self
            .user_pin
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(state)
            .unwrap_or_default();
        if state.locked && !before.locked {
            tracing::error!(
                "ALARM the token's user PIN is locked: svsd keeps signing on its open sessions, but a restart or a session recovered after an HSM error cannot log in until a security officer unlocks it (`svs-provision pin init`, docs/operations.md)"
            );
        } else if state.final_try && !before.final_try && !state.locked {
            tracing::warn!(
                "the token's user PIN has one try left: one more wrong PIN (from svs-provision or anyone) locks it"
            );
        } else if before.locked && !state.locked {
            tracing::info!("the token's user PIN is no longer locked");
        } else if before.final_try && !state.final_try {
            tracing::info!("the token's user PIN is no longer one wrong try from locking");
        }
    }

    /// Marks the daemon as draining: /readyz fails so balancers move away.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Records a self-test result.
    pub fn set_selftest(&self, result: Result<(), String>) {
        let run = self.next_selftest_run();
        self.set_selftest_of(run, result);
    }

    /// Records run `run`'s verdict unless a later run's is there already;
    /// returns whether it did.
    fn set_selftest_of(&self, run: u64, result: Result<(), String>) -> bool {
        let mut verdict = self.selftest.lock().unwrap_or_else(|p| p.into_inner());
        if run < self.selftest_recorded.load(Ordering::SeqCst) {
            return false;
        }
        self.selftest_recorded.store(run, Ordering::SeqCst);
        self.metrics.selftest(result.is_ok());
        if let Err(why) = &result {
            tracing::error!(reason = %why, "ALARM self-test failed: not ready, signing refused");
        }
        *verdict = Some(result);
        true
    }

    fn next_selftest_run(&self) -> u64 {
        self.selftest_runs.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Whether the last recorded self-test failed.
    pub fn selftest_failed(&self) -> bool {
        matches!(
            *self.selftest.lock().unwrap_or_else(|p| p.into_inner()),
            Some(Err(_))
        )
    }

    /// Ready to sign: self-tests passed, HSM up, audit writable, not draining.
    pub fn readiness(&self) -> Result<(), SvsError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(SvsError::ShuttingDown);
        }
        self.can_sign()
    }

    /// What signing needs: readiness without the drain. Every request that
    /// reaches the handler while draining was already in flight (the
    /// listeners are closed, HTTP/1.1 keep-alive is off and HTTP/2 has sent
    /// GOAWAY), and the drain exists to let exactly those finish.
    fn can_sign(&self) -> Result<(), SvsError> {
        // The HSM first: while it is down, a self-test run then fails too,
        // and the reason must name the HSM, not send operators after the
        // self-tests.
        self.backend
            .health()
            .map_err(|why| SvsError::NotReady(NotReady::HsmUnavailable, why))?;
        match self
            .selftest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            None => {
                return Err(SvsError::NotReady(
                    NotReady::SelftestsPending,
                    "self-tests have not run yet".into(),
                ));
            }
            Some(Err(why)) => return Err(SvsError::NotReady(NotReady::SelftestsFailed, why)),
            Some(Ok(())) => {}
        }
        self.audit.check()
    }

    /// An empty reservation of the in-memory body budget for one request
    /// body of `entity`, grown by [`BodyReservation::grow`] as its bytes
    /// arrive. A body is charged only for what it sent: one reserved whole
    /// up front (its Content-Length, or `max_body_bytes` without one) let a
    /// few dozen stalled uploads of one entity hold the whole budget and
    /// every other tenant get 503 `server_busy`.
    pub fn body_reservation<'a>(
        &'a self,
        entity: Option<&'a Entity>,
        limits: &Limits,
    ) -> BodyReservation<'a> {
        BodyReservation {
            app: self,
            entity,
            share: limits.entity_body_bytes(self.body_budget_bytes),
            held: 0,
        }
    }

    /// Bytes of request bodies held now, all requests together.
    pub fn body_bytes_held(&self) -> usize {
        self.body_held.load(Ordering::Acquire)
    }

    /// A connection slot for a client of `entity` (None: a certificate no
    /// entity claims), within `max_connections_per_entity` for an entity
    /// and `max_unknown_connections` for all unknown clients together;
    /// None when that cap is reached. Counted across reloads.
    pub fn connection_slot(
        &self,
        entity: Option<&Entity>,
        limits: &Limits,
    ) -> Option<ConnectionSlot> {
        match entity {
            Some(e) => ConnectionSlot::take(e.connections(), limits.max_connections_per_entity),
            None => ConnectionSlot::take(&self.unknown_connections, limits.max_unknown_connections),
        }
    }

    /// Connections held now by clients no entity claims.
    pub fn unknown_connections(&self) -> usize {
        self.unknown_connections.load(Ordering::Acquire)
    }

    /// Checks done before the body is read: client, entity status, content
    /// type, a concurrency slot and a non-empty token bucket (a key lookup
    /// takes its one token here), and for signing-API routes the operation
    /// grant, so that a refused client never gets its body read. A refusal
    /// is counted and audited.
    pub async fn precheck(
        &self,
        route: &Route,
        client: Result<VerifiedClient<'_>, SvsError>,
        content_type: Option<&str>,
    ) -> Result<Admission, SvsError> {
        // One snapshot for identification and everything after it.
        let rt = self.runtime();
        if route.is_probe() {
            return Ok(Admission {
                rt,
                entity: None,
                _in_flight: None,
            });
        }
        // Identified even when suspended, so the refusal counts for the entity.
        let found = client.and_then(|c| rt.policy.identify(c));
        let result = found.as_ref().map_err(Clone::clone).and_then(|e| {
            e.check_active()?;
            let json = content_type
                .and_then(|c| c.split(';').next())
                .is_some_and(|c| c.trim().eq_ignore_ascii_case("application/json"));
            if route.has_body() && !json {
                return Err(SvsError::UnsupportedMediaType);
            }
            if let Some(op) = route.operation() {
                e.check_operation(op)?;
            }
            // A key lookup needs no grant of its own but counts against the
            // entity's limits like its other requests (one token): none of
            // an entity's routes is there to be flooded at will.
            e.reserve(rt.limits.default_max_concurrent)
                .and_then(|slot| {
                    if route.operation().is_none() {
                        e.charge(1)?;
                    }
                    Ok(Some(slot))
                })
                .inspect_err(|err| {
                    self.metrics.rate_limited(e.name(), limit_reason(err));
                })
        });
        match result {
            Ok(in_flight) => Ok(Admission {
                rt,
                entity: found.ok(),
                _in_flight: in_flight,
            }),
            Err(e) => {
                self.refuse(route, found.ok().as_deref(), &e).await;
                Err(e)
            }
        }
    }

    /// Counts and audits a request refused before its items were looked at:
    /// one `op` record with the entity (or `_unknown`), the route's
    /// operation and the error code; no key name, no payload. Past the
    /// source's refusal-record bucket (`[audit] refusal_records`) the
    /// refusal is only counted, for the `refusals_suppressed` note that
    /// [`App::flush_refusals`] writes, and answered without waiting; a
    /// record written is waited for at most [`REFUSAL_AUDIT_WAIT`].
    pub async fn refuse(&self, route: &Route, entity: Option<&Entity>, e: &SvsError) {
        let name = entity.map_or(metrics::UNKNOWN, Entity::name);
        let code = e.wire().code;
        if let Some(op) = route.operation() {
            self.metrics
                .operation(op.as_str(), name, metrics::NONE, code);
        }
        if let Some(entity) = entity {
            // svsd's own throttle of an abnormal entity is no error of the
            // entity's: counted, its 429s raised a second anomaly (errors)
            // for the flood the first (rate) had already reported.
            let error = e.is_clients_doing() && !matches!(e, SvsError::Throttled { .. });
            entity.traffic().record(1, u64::from(error));
        }
        let source = entity.map_or(UNKNOWN_ENTITY, Entity::name);
        let op = route
            .operation()
            .map_or(route.metric_name(), Operation::as_str);
        if !self.refusals.admit(source, op, code) {
            self.metrics.refusal_suppressed(name, code);
            return;
        }
        let ev = AuditEvent {
            entity: source.to_owned(),
            op,
            key: None,
            input_sm3: None,
            output_sm3: None,
            outcome: code.into(),
            latency_us: 0,
        };
        let wait = REFUSAL_AUDIT_WAIT.min(self.runtime().limits.request_timeout);
        let failed = match tokio::time::timeout(wait, self.audit.append(vec![ev])).await {
            Ok(Ok(())) => return,
            Ok(Err(err)) => err.to_string(),
            Err(_) => format!(
                "not on disk within {} ms: answered without it (the record stays queued)",
                wait.as_millis()
            ),
        };
        if let Some(held_back) = self.refusal_log.hit() {
            tracing::error!(
                error = %failed,
                held_back,
                "cannot record a refused request in the audit trail (logged at most once a second; held_back: failures since the last line)"
            );
        }
    }

    /// Writes one `refusals_suppressed` note per source (entity, or
    /// `_unknown`) whose refusals were counted instead of recorded since
    /// the last call: `entity=NAME suppressed=TOTAL OP:CODE=N …`, in one
    /// group commit. The daemon calls it every second and before its
    /// `stop` record. Also reports refusal-audit failures, 5xx failures and
    /// failed TLS handshakes the log held back. Returns the refusals the
    /// notes account for.
    pub async fn flush_refusals(&self) -> u64 {
        crate::error::log_held_back_failures();
        crate::server::log_held_back_handshake_failures();
        if let Some(held_back) = self.refusal_log.held_back() {
            tracing::error!(
                held_back,
                "cannot record refused requests in the audit trail: lines left out since the last"
            );
        }
        let summaries = self.refusals.take();
        let total = summaries.iter().map(|s| s.total()).sum();
        if summaries.is_empty() {
            return total;
        }
        let details = summaries.iter().map(|s| s.detail()).collect();
        if let Err(e) = self
            .audit
            .notes(crate::refusals::SUMMARY_KIND, details)
            .await
        {
            tracing::error!(
                error = %e,
                refusals = total,
                "cannot record the count of suppressed refusal records in the audit trail"
            );
            return 0;
        }
        total
    }

    /// The `key` label of a finished item in `svs_requests_total`.
    fn key_label<'r>(rt: &'r Runtime, ev: &AuditEvent) -> &'r str {
        // A made-up key name is not in the record: it counts as `_unknown`.
        match ev.key.as_deref() {
            None if ev.outcome == "unknown_key" => metrics::UNKNOWN,
            k => rt.key_label(k),
        }
    }

    /// Counts a request whose client went away while its body was on the
    /// way (reset stream, closed connection): `client_closed` in
    /// `svs_requests_total`, and one operation of the entity's traffic that
    /// is not an error. Nothing was refused, so no audit record: no
    /// operation was asked for, as its body never arrived.
    pub fn client_closed(&self, route: &Route, entity: Option<&Entity>) {
        let name = entity.map_or(metrics::UNKNOWN, Entity::name);
        if let Some(op) = route.operation() {
            self.metrics
                .operation(op.as_str(), name, metrics::NONE, metrics::CLIENT_CLOSED);
        }
        if let Some(entity) = entity {
            entity.traffic().record(1, 0);
        }
    }

    /// Handles one request admitted by [`App::precheck`] whose body has
    /// been read.
    ///
    /// `client` is the connection's client as it stands now (checked
    /// against the current client CA): a reload since admission judges the
    /// request again with it.
    pub async fn handle(
        self: &Arc<Self>,
        route: Route,
        adm: &Admission,
        client: Result<VerifiedClient<'_>, SvsError>,
        body: &Bytes,
    ) -> Reply {
        let probe = route == Route::Readyz;
        match self.dispatch(route, adm, client, body).await {
            Ok(r) => r,
            Err(e) => {
                // A 503 is what /readyz is for, not a failed request: once
                // a probe per few seconds, it filled the journal through an
                // outage that the alarm, STATUS= and the metrics already
                // report.
                if !probe {
                    e.log_details();
                }
                Reply::from(e)
            }
        }
    }

    async fn dispatch(
        self: &Arc<Self>,
        route: Route,
        adm: &Admission,
        client: Result<VerifiedClient<'_>, SvsError>,
        body: &Bytes,
    ) -> Result<Reply, SvsError> {
        let rt = &adm.rt;
        match route {
            Route::Healthz => Ok(Reply::ok(json!({"status": "alive"}))),
            Route::Readyz => self
                .readiness()
                .map(|()| Reply::ok(json!({"status": "ready"}))),
            Route::Keys => {
                let e = adm.entity().ok_or(SvsError::Unauthenticated)?;
                let keys: Vec<_> = rt
                    .keys
                    .iter()
                    .filter(|(name, _)| e.keys().contains(*name))
                    .map(|(name, k)| {
                        let ops: Vec<_> = e.config.operations.iter().map(|o| o.as_str()).collect();
                        json!({"name": name, "algorithm": self.algorithm(&k.object), "operations": ops})
                    })
                    .collect();
                Ok(Reply::ok(json!({ "keys": keys })))
            }
            Route::Key(name) => {
                let e = adm.entity().ok_or(SvsError::Unauthenticated)?;
                let exposure = rt
                    .keys
                    .get(&name)
                    .ok_or(SvsError::UnknownKey(name.clone()))?;
                if !e.keys().contains(&name) {
                    return Err(SvsError::KeyNotAllowed(name));
                }
                let info = self
                    .backend
                    .key(&exposure.object)
                    .ok_or(SvsError::UnknownKey(name.clone()))?;
                let chain = (!info.certificate_chain.is_empty()).then(|| {
                    info.certificate_chain
                        .iter()
                        .map(|c| api::pem("CERTIFICATE", c))
                        .collect::<String>()
                });
                Ok(Reply::ok(json!({
                    "name": name,
                    "algorithm": self.algorithm(&exposure.object),
                    "public_key": api::pem("PUBLIC KEY", &info.spki_der),
                    "certificate_chain": chain,
                })))
            }
            Route::Sign | Route::SignBatch | Route::Verify | Route::VerifyBatch => {
                self.operation(route, adm, client, body).await
            }
        }
    }

    fn algorithm(&self, object: &str) -> &'static str {
        match self.backend.key(object).map(|k| k.algorithm) {
            Some(svs_hsm::Algorithm::EcdsaP256) => "ecdsa-p256",
            _ => "sm2",
        }
    }

    async fn operation(
        self: &Arc<Self>,
        route: Route,
        adm: &Admission,
        client: Result<VerifiedClient<'_>, SvsError>,
        body: &Bytes,
    ) -> Result<Reply, SvsError> {
        let op = match route {
            Route::Sign | Route::SignBatch => Operation::Sign,
            _ => Operation::Verify,
        };
        let batch = matches!(route, Route::SignBatch | Route::VerifyBatch);
        let entity = adm.entity.clone().ok_or(SvsError::Unauthenticated)?;
        let admitted = match self.readmit(entity.clone(), adm.rt.clone(), client, op) {
            Ok((entity, rt)) => match Self::parse_items(&rt, batch, body).await {
                Ok(items) => self
                    .admit(&entity, &rt, op, &items)
                    .map(|()| (entity, rt, items)),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        let (entity, rt, items) = match admitted {
            Ok(admitted) => admitted,
            Err(e) => {
                self.refuse(&route, Some(&entity), &e).await;
                return Err(e);
            }
        };
        let large = body.len() > LARGE_BODY;
        let results: Vec<ItemResult> = match op {
            Operation::Sign => self.sign_items(&entity, &rt, items, large).await?,
            Operation::Verify => self.verify_items(&entity, &rt, items).await?,
        };
        // An error of the entity's counts in its traffic once per request;
        // a failure of the server's own, such as the HSM's, does not.
        let mut failed = 0;
        let mut labels = Vec::with_capacity(results.len());
        for (result, ev) in &results {
            failed += u64::from(
                result
                    .as_ref()
                    .err()
                    .is_some_and(SvsError::is_clients_doing),
            );
            labels.push((ev.op, Self::key_label(&rt, ev), ev.outcome.clone()));
        }
        entity.traffic().record(results.len() as u64, failed);
        let (values, events): (Vec<_>, Vec<_>) = results.into_iter().unzip();
        // The answer leaves only once its records are on disk; if they
        // cannot be written, every item is answered (and counted) 503.
        let appended = self.audit.append(events).await;
        let unaudited = appended.as_ref().err().map(|e| e.wire().code);
        for (op, key, outcome) in &labels {
            self.metrics
                .operation(op, entity.name(), key, unaudited.unwrap_or(outcome));
        }
        appended?;
        if batch {
            let values: Vec<_> = values
                .into_iter()
                .map(|v| v.unwrap_or_else(|e| e.to_json()))
                .collect();
            Ok(Reply::ok(json!({ "results": values })))
        } else {
            // A single request answers an error with its own HTTP status.
            values
                .into_iter()
                .next()
                .unwrap_or_else(|| Err(SvsError::Internal("no result".into())))
                .map(Reply::ok)
        }
    }

    /// The entity and runtime that decide a request from its body on. A
    /// reload since admission (the body may take `body_timeout` to arrive)
    /// applies to it: the client is identified again under the new policy
    /// and must still be the entity it was admitted as (a certificate
    /// rebound or no longer trusted is refused), a suspended or removed
    /// entity is refused, and the entity's grants and keys are those now in
    /// force. One snapshot still decides everything after this point.
    fn readmit(
        &self,
        entity: Arc<Entity>,
        admitted: Arc<Runtime>,
        client: Result<VerifiedClient<'_>, SvsError>,
        op: Operation,
    ) -> Result<(Arc<Entity>, Arc<Runtime>), SvsError> {
        let rt = self.runtime();
        if Arc::ptr_eq(&rt, &admitted) {
            return Ok((entity, rt));
        }
        let current = client.and_then(|c| rt.policy.identify(c))?;
        if current.name() != entity.name() {
            return Err(SvsError::Unauthenticated);
        }
        current.check_active()?;
        current.check_operation(op)?;
        Ok((current, rt))
    }

    /// Everything between the body and the items: body parsed, readiness,
    /// one token per item, anomaly throttle. (Operation grant and the
    /// concurrency slot were taken before the body was read.) A refusal
    /// takes no token: readiness is checked before the bucket is charged,
    /// and a throttle refusal gives the tokens back.
    fn admit(
        &self,
        entity: &Entity,
        rt: &Runtime,
        op: Operation,
        items: &[serde_json::Value],
    ) -> Result<(), SvsError> {
        // Nothing is signed unaudited, nor while self-tests fail.
        match op {
            Operation::Sign => self.can_sign()?,
            Operation::Verify => self.audit.check()?,
        }
        entity
            .charge(items.len())
            .inspect_err(|e| self.metrics.rate_limited(entity.name(), limit_reason(e)))?;
        // The throttle's own check comes after the bucket, so that a
        // rate-limited request takes none of its tokens either.
        if rt.anomaly.enabled
            && let Err(e) = entity.traffic().admit(items.len(), Instant::now())
        {
            entity.refund(items.len());
            self.metrics
                .rate_limited(entity.name(), LimitReason::Anomaly);
            return Err(e);
        }
        Ok(())
    }

    /// The body's items (one for a single request). Parsed first: the item
    /// count decides how many tokens to take. A large body is parsed off
    /// the runtime, like the decoding and hashing of its items after.
    async fn parse_items(
        rt: &Runtime,
        batch: bool,
        body: &Bytes,
    ) -> Result<Vec<serde_json::Value>, SvsError> {
        let max_items = rt.limits.max_batch_items;
        let parse = move |body: &[u8]| {
            if !batch {
                return Ok(vec![api::request_value(body)?]);
            }
            let items = api::batch_items(body, max_items)?;
            if items.is_empty() {
                return Err(SvsError::InvalidRequest("items must not be empty".into()));
            }
            Ok(items)
        };
        if body.len() <= LARGE_BODY {
            return parse(body);
        }
        // The same buffer (counted in the body budget), not a copy.
        let body = body.clone();
        tokio::task::spawn_blocking(move || parse(&body))
            .await
            .map_err(|_| SvsError::Internal("parse task failed".into()))?
    }

    /// One second of anomaly detection: moves every entity's windows and
    /// logs and audits each verdict that changed. Returns the changes.
    pub async fn anomaly_tick(&self) -> Vec<(String, Flip)> {
        let rt = self.runtime();
        let now = Instant::now();
        let mut changed = Vec::new();
        for e in rt.policy.entities() {
            if rt.anomaly.enabled {
                for flip in e.traffic().tick(&rt.anomaly, now) {
                    changed.push((e.name().to_owned(), flip));
                }
            } else {
                e.traffic().disable();
            }
        }
        for (entity, f) in &changed {
            let state = if f.abnormal { "abnormal" } else { "normal" };
            let v = &f.view;
            if f.abnormal {
                tracing::warn!(
                    entity = %entity,
                    check = f.check.as_str(),
                    short_rate = v.short_rate,
                    baseline = v.baseline,
                    error_ratio = v.error_ratio,
                    throttled = v.throttled,
                    "ALARM abnormal traffic from entity"
                );
            } else {
                tracing::info!(entity = %entity, check = f.check.as_str(), "entity traffic back to normal");
            }
            let detail = format!(
                "entity={entity} check={} state={state} short_rate={:.3} baseline={:.3} error_ratio={:.3} throttled={}",
                f.check.as_str(),
                v.short_rate,
                v.baseline,
                v.error_ratio,
                v.throttled
            );
            if let Err(e) = self.audit.note("anomaly", detail).await {
                tracing::error!(error = %e, "cannot record an anomaly verdict in the audit trail");
            }
        }
        changed
    }

    fn event(entity: &Entity, op: Operation, key: Option<&str>) -> AuditEvent {
        AuditEvent {
            entity: entity.name().to_owned(),
            op: op.as_str(),
            key: key.map(str::to_owned),
            input_sm3: None,
            output_sm3: None,
            outcome: String::new(),
            latency_us: 0,
        }
    }

    /// Signs every item: each is checked and hashed on its own, then all
    /// the digests go to the backend in one call (one pool job per worker,
    /// not per item), then each answer is encoded. `large`: the body was
    /// large enough that decoding and hashing its inputs (milliseconds for
    /// a MiB) go off the runtime.
    async fn sign_items(
        self: &Arc<Self>,
        entity: &Arc<Entity>,
        rt: &Arc<Runtime>,
        items: Vec<serde_json::Value>,
        large: bool,
    ) -> Result<Vec<ItemResult>, SvsError> {
        let start = Instant::now();
        let prepare = |app: &App, entity: &Entity, rt: &Runtime| {
            let prepared: Vec<(AuditEvent, Result<PreparedSign, SvsError>)> = items
                .into_iter()
                .map(|item| {
                    let mut ev = Self::event(entity, Operation::Sign, None);
                    let p = app.prepare_sign(entity, rt, item, &mut ev);
                    (ev, p)
                })
                .collect();
            prepared
        };
        let prepared = if large {
            let (app, entity, rt) = (self.clone(), entity.clone(), rt.clone());
            tokio::task::spawn_blocking(move || prepare(&app, &entity, &rt))
                .await
                .map_err(|_| SvsError::Internal("sign preparation failed".into()))?
        } else {
            prepare(self, entity, rt)
        };
        let digests = prepared
            .iter()
            .filter_map(|(_, p)| p.as_ref().ok().map(|p| (p.info.clone(), p.digest)))
            .collect();
        let mut signed = self
            .backend
            .sign_digests(entity.lane(), digests)
            .await
            .into_iter();
        Ok(prepared
            .into_iter()
            .map(|(mut ev, p)| {
                let result = p.and_then(|p| {
                    let raw = signed
                        .next()
                        .unwrap_or_else(|| Err(SvsError::Internal("no signature".into())))?;
                    let sig = api::encode_signature(&raw, p.encoding);
                    ev.output_sm3 = Some(crate::audit::sm3(&sig));
                    Ok(SignResponse {
                        key: p.key,
                        signature: api::to_b64(&sig),
                        encoding: p.encoding,
                    })
                });
                ev.latency_us = micros(start);
                match result {
                    Ok(resp) => {
                        ev.outcome = "ok".into();
                        (Ok(serde_json::to_value(resp).unwrap_or_default()), ev)
                    }
                    Err(e) => {
                        ev.outcome = e.wire().code.into();
                        (Err(e), ev)
                    }
                }
            })
            .collect())
    }

    /// Everything a sign item needs before the private-key operation:
    /// request parsed, key resolved and allowed, input decoded and hashed.
    fn prepare_sign(
        &self,
        entity: &Entity,
        rt: &Runtime,
        item: serde_json::Value,
        ev: &mut AuditEvent,
    ) -> Result<PreparedSign, SvsError> {
        let req: SignRequest = api::from_value(item)?;
        // The client's key name reaches the trail only when it names an
        // exposed key: anything else is client text (possibly personal data).
        ev.key = rt.keys.contains_key(&req.key).then(|| req.key.clone());
        let info = self.resolve_key(entity, rt, &req.key, Operation::Sign)?;
        let input = req.input()?;
        ev.input_sm3 = Some(input.audit_digest());
        let digest = match &input {
            Input::Digest(d) => *d,
            Input::Data { data, id } => self
                .verifier
                .digest(info.algorithm, &info.public_point, id, data)
                .map_err(SvsError::from)?,
        };
        Ok(PreparedSign {
            key: req.key,
            info,
            digest,
            encoding: req.encoding.unwrap_or_default(),
        })
    }

    fn resolve_key(
        &self,
        entity: &Entity,
        rt: &Runtime,
        name: &str,
        op: Operation,
    ) -> Result<Arc<KeyInfo>, SvsError> {
        let exposure = rt
            .keys
            .get(name)
            .ok_or_else(|| SvsError::UnknownKey(name.to_owned()))?;
        entity.check_key(name, op)?;
        self.backend
            .key(&exposure.object)
            .ok_or_else(|| SvsError::UnknownKey(name.to_owned()))
    }

    async fn verify_items(
        self: &Arc<Self>,
        entity: &Arc<Entity>,
        rt: &Arc<Runtime>,
        items: Vec<serde_json::Value>,
    ) -> Result<Vec<ItemResult>, SvsError> {
        let app = self.clone();
        let entity = entity.clone();
        let rt = rt.clone();
        // Curve arithmetic and hashing of large inputs stay off the runtime.
        tokio::task::spawn_blocking(move || {
            items
                .into_iter()
                .map(|item| app.verify_one(&entity, &rt, item))
                .collect()
        })
        .await
        .map_err(|_| SvsError::Internal("verify task failed".into()))
    }

    fn verify_one(&self, entity: &Entity, rt: &Runtime, item: serde_json::Value) -> ItemResult {
        let start = Instant::now();
        let mut ev = Self::event(entity, Operation::Verify, None);
        let result = self.verify_inner(entity, rt, item, &mut ev);
        ev.latency_us = micros(start);
        match result {
            Ok(valid) => {
                ev.outcome = if valid { "valid" } else { "invalid" }.into();
                (
                    Ok(serde_json::to_value(VerifyResponse { valid }).unwrap_or_default()),
                    ev,
                )
            }
            Err(e) => {
                ev.outcome = e.wire().code.into();
                (Err(e), ev)
            }
        }
    }

    fn verify_inner(
        &self,
        entity: &Entity,
        rt: &Runtime,
        item: serde_json::Value,
        ev: &mut AuditEvent,
    ) -> Result<bool, SvsError> {
        let req: VerifyRequest = api::from_value(item)?;
        let (point, algorithm) = match (&req.key, &req.public_key, &req.certificate) {
            (Some(k), None, None) => {
                // As for sign: only an exposed key's name is recorded.
                ev.key = rt.keys.contains_key(k).then(|| k.clone());
                let info = self.resolve_key(entity, rt, k, Operation::Verify)?;
                // The key's own algorithm: an exposed key may be ECDSA P-256.
                (info.public_point.clone(), info.algorithm)
            }
            // Public keys and certificates in the request are SM2 only (v1).
            (None, Some(pk), None) => (api::public_key_field(pk)?, svs_hsm::Algorithm::Sm2),
            (None, None, Some(c)) => (api::certificate_field(c)?, svs_hsm::Algorithm::Sm2),
            _ => {
                return Err(SvsError::InvalidRequest(
                    "give exactly one of key, public_key, certificate".into(),
                ));
            }
        };
        let input = req.input()?;
        ev.input_sm3 = Some(input.audit_digest());
        let raw = api::decode_signature(&req.signature, req.encoding.unwrap_or(Encoding::Der))?;
        let digest = match &input {
            Input::Digest(d) => *d,
            Input::Data { data, id } => self
                .verifier
                .digest(algorithm, &point, id, data)
                .map_err(SvsError::from)?,
        };
        match self
            .verifier
            .verify_digest(algorithm, &point, &digest, &raw)
        {
            Ok(()) => Ok(true),
            Err(svs_hsm::HsmError::VerifyFailed) => Ok(false),
            Err(e) => Err(SvsError::from(e)),
        }
    }

    /// Runs the self-tests: SM3 known answer, then a sign/verify pairwise
    /// test through the backend with every exposed key. Records the result.
    pub async fn run_selftests(&self) -> Result<(), String> {
        let run = self.next_selftest_run();
        let result = self.selftests().await.map_err(SelftestFailure::into_reason);
        self.record_selftest(run, result).await
    }

    /// The periodic self-test. A run the HSM was too busy for (its queue
    /// full, or the test's signature past its deadline under load) gives no
    /// verdict: the last one stands and the test is tried again
    /// `retry_after` later, up to [`SELFTEST_ATTEMPTS`] runs. Only a wrong
    /// answer, an HSM that fails, or a test the HSM never finds time for
    /// takes readiness away. Before, one busy moment under load stopped all
    /// signing for a whole interval (300 s by default).
    pub async fn run_periodic_selftests(&self, retry_after: Duration) -> Result<(), String> {
        let mut attempt = 1;
        let mut run;
        let result = loop {
            run = self.next_selftest_run();
            match self.selftests().await {
                Err(SelftestFailure::Inconclusive(why)) if attempt < SELFTEST_ATTEMPTS => {
                    tracing::warn!(
                        reason = %why,
                        attempt,
                        "self-test inconclusive: the HSM is busy; trying again"
                    );
                    attempt += 1;
                    tokio::time::sleep(retry_after).await;
                }
                other => break other.map_err(SelftestFailure::into_reason),
            }
        };
        self.record_selftest(run, result).await
    }

    /// Records run `run`'s verdict, in the trail and for readiness, unless
    /// a later run has recorded one meanwhile.
    async fn record_selftest(&self, run: u64, result: Result<(), String>) -> Result<(), String> {
        if run < self.selftest_recorded.load(Ordering::SeqCst) {
            return result;
        }
        let detail = match &result {
            Ok(()) => "passed".to_string(),
            Err(e) => format!("failed: {e}"),
        };
        if let Err(e) = self.audit.note("selftest", detail).await {
            tracing::error!(error = %e, "cannot record the self-test in the audit trail");
        }
        self.set_selftest_of(run, result.clone());
        result
    }

    async fn selftests(&self) -> Result<(), SelftestFailure> {
        // The audit trail is not a self-test: it is readiness's own check
        // (`audit_unavailable`). Counted here too, a full audit disk read
        // as "self-tests failed", which sends operators to take a healthy
        // HSM out of service.
        svs_hsm::selftest::sm3_known_answer().map_err(SelftestFailure::Failed)?;
        let rt = self.runtime();
        for (name, k) in &rt.keys {
            let Some(info) = self.backend.key(&k.object) else {
                // A reload since the run began withdrew or moved the key:
                // no verdict on a configuration no longer in force.
                if !Arc::ptr_eq(&rt, &self.runtime()) {
                    return Err(SelftestFailure::Inconclusive(
                        "the configuration was reloaded during the self-test".into(),
                    ));
                }
                return Err(SelftestFailure::Failed(format!(
                    "key {name:?}: token object {:?} not found",
                    k.object
                )));
            };
            self.pairwise(name, info).await?;
        }
        Ok(())
    }

    /// Sign/verify pairwise test of one key (installed or not), plus a
    /// negative check.
    async fn pairwise(&self, name: &str, info: Arc<KeyInfo>) -> Result<(), SelftestFailure> {
        let failed = SelftestFailure::Failed;
        let digest = self
            .verifier
            .digest(
                info.algorithm,
                &info.public_point,
                DEFAULT_SM2_ID,
                svs_hsm::selftest::PAIRWISE_MESSAGE,
            )
            .map_err(|e| failed(format!("key {name:?}: {e}")))?;
        let raw = self
            .backend
            .sign_digest_with(info.clone(), digest)
            .await
            .map_err(|e| {
                let why = format!("key {name:?}: sign: {e}");
                match e {
                    SvsError::HsmBusy { .. } | SvsError::HsmTimeout => {
                        SelftestFailure::Inconclusive(why)
                    }
                    _ => failed(why),
                }
            })?;
        svs_hsm::selftest::check_pairwise(
            &self.verifier,
            info.algorithm,
            &info.public_point,
            &digest,
            &raw,
        )
        .map_err(|e| failed(format!("key {name:?}: {e}")))
    }

    /// Signs the audit chain head with the audit key and appends the
    /// checkpoint; `interval` is the time until the next one (signed too).
    pub async fn checkpoint(
        &self,
        audit_object: &str,
        interval: Duration,
    ) -> Result<u64, SvsError> {
        let (seq, head, last_time) = self.audit.head().await?;
        let info = self
            .backend
            .key(audit_object)
            .ok_or_else(|| SvsError::UnknownKey(audit_object.to_owned()))?;
        // The time once the head is read: every record it covers is older.
        let text = crate::audit::Checkpoint::now(seq, head, interval, &last_time);
        let digest = self
            .verifier
            .digest(
                info.algorithm,
                &info.public_point,
                DEFAULT_SM2_ID,
                &text.message(),
            )
            .map_err(SvsError::from)?;
        let raw = self.backend.sign_digest_with(info.clone(), digest).await?;
        self.audit
            .checkpoint(
                text.clone(),
                audit_object.to_owned(),
                svs_hsm::signature::raw_to_der(&raw),
            )
            .await?;
        self.update_anchor(&text).await?;
        Ok(seq)
    }

    /// Records `head` (the `stop` record's) as the audit anchor at a clean
    /// stop, when no checkpoint covers the last records.
    pub async fn anchor_head(
        &self,
        (seq, head, last_time): crate::audit::ChainHead,
        interval: Duration,
    ) -> Result<(), SvsError> {
        if self.anchor_object.is_none() {
            return Ok(());
        }
        self.update_anchor(&crate::audit::Checkpoint::now(
            seq, head, interval, &last_time,
        ))
        .await
    }

    /// Makes `text`, of records already durable, the token's audit anchor;
    /// unless the anchor there is ahead of it: then another trail writes it
    /// (appliances sharing the token and the label) or this trail started
    /// over, and overwriting would hide either.
    async fn update_anchor(&self, text: &crate::audit::Checkpoint) -> Result<(), SvsError> {
        let Some(label) = self.anchor_object.clone() else {
            return Ok(());
        };
        let (backend, text) = (self.backend.clone(), text.clone());
        let mut written = self.anchor_written.clone().lock_owned().await;
        // A task of its own, holding the lock until the HSM has answered: a
        // caller cut short (a checkpoint ended at the stop) would otherwise
        // leave its replacement running in the pool while the stop's starts,
        // and each could destroy the other's new value.
        let update = tokio::spawn(async move {
            if text.head_seq <= *written {
                // A checkpoint overtaken by the stop's update: already covered.
                return Ok(());
            }
            let on_token = crate::audit::anchor_head(&backend.read_data(&label).await?)
                .map_err(|e| SvsError::AuditUnavailable(format!("audit anchor {label:?}: {e}")))?;
            if let Some(on_token) = on_token
                && on_token.head_seq > text.head_seq
            {
                return Err(SvsError::AuditUnavailable(format!(
                    "the token's audit anchor {label:?} is at seq {}, ahead of this trail's seq {}: another svsd writes the same anchor (set [audit] anchor_object apart), or this trail was started over; left unchanged",
                    on_token.head_seq, text.head_seq
                )));
            }
            backend.replace_data(&label, text.message()).await?;
            *written = text.head_seq;
            Ok(())
        });
        update
            .await
            .map_err(|e| SvsError::Internal(format!("audit anchor update: {e}")))?
    }
}

/// Runs of a periodic self-test, the first included, before an HSM that
/// stays too busy to take the test counts as a failure.
pub const SELFTEST_ATTEMPTS: u32 = 3;

/// Why a self-test did not pass.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SelftestFailure {
    /// A wrong answer, a missing key, an HSM error: not ready.
    Failed(String),
    /// No verdict: the HSM had no time for the test (queue full, deadline
    /// passed), or a reload changed the keys under test.
    Inconclusive(String),
}

impl SelftestFailure {
    fn into_reason(self) -> String {
        match self {
            SelftestFailure::Failed(why) => why,
            SelftestFailure::Inconclusive(why) => format!("{why} (no verdict)"),
        }
    }
}

/// The `reason` label of a limiter refusal.
fn limit_reason(e: &SvsError) -> LimitReason {
    match e {
        SvsError::TooManyConcurrent => LimitReason::Concurrency,
        _ => LimitReason::Rate,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::path::Path;

    use super::*;
    use crate::backend::{BoxFuture, SoftBackend};
    use crate::policy::ClientIdentity;

    /// SoftBackend plus, optionally, an ECDSA P-256 key `p256` (verify only).
    struct TestBackend {
        soft: SoftBackend,
        p256: Arc<KeyInfo>,
        /// Signatures to come that fail with `hsm_busy`.
        busy: std::sync::atomic::AtomicUsize,
        /// Whether signatures fail with `hsm_unavailable`.
        down: std::sync::atomic::AtomicBool,
        signs: std::sync::atomic::AtomicUsize,
    }

    impl SigningBackend for TestBackend {
        fn key(&self, object: &str) -> Option<Arc<KeyInfo>> {
            if object == "p256" {
                return Some(self.p256.clone());
            }
            self.soft.key(object)
        }
        fn discover_keys(&self) -> BoxFuture<'_, Result<KeySet, SvsError>> {
            let p256 = self.p256.clone();
            Box::pin(async move {
                let mut found = self.soft.discover_keys().await?;
                found.insert(p256.name.clone(), p256);
                Ok(found)
            })
        }
        fn install_keys(&self, keys: KeySet) {
            self.soft.install_keys(keys)
        }
        fn sign_digest_with(
            &self,
            key: Arc<KeyInfo>,
            digest: [u8; 32],
        ) -> BoxFuture<'_, Result<[u8; 64], SvsError>> {
            self.signs.fetch_add(1, Ordering::SeqCst);
            let busy = self
                .busy
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if busy {
                let retry_after = Duration::from_secs(1);
                return Box::pin(async move { Err(SvsError::HsmBusy { retry_after }) });
            }
            if self.down.load(Ordering::SeqCst) {
                return Box::pin(async { Err(SvsError::HsmUnavailable("test".into())) });
            }
            self.soft.sign_digest_with(key, digest)
        }
        fn read_data(&self, label: &str) -> BoxFuture<'_, Result<Vec<Vec<u8>>, SvsError>> {
            self.soft.read_data(label)
        }
        fn replace_data(&self, label: &str, value: Vec<u8>) -> BoxFuture<'_, Result<(), SvsError>> {
            self.soft.replace_data(label, value)
        }
        fn health(&self) -> Result<(), String> {
            self.soft.health()
        }
        fn user_pin_state(&self) -> BoxFuture<'_, Result<Option<svs_hsm::UserPinState>, SvsError>> {
            self.soft.user_pin_state()
        }
    }

    const FP: &str = "0101010101010101010101010101010101010101010101010101010101010101";

    fn client() -> ClientIdentity {
        ClientIdentity {
            certificate_sha256: [1; 32],
            spki_sha256: [0; 32],
            subject: "CN=app1".parse().unwrap(),
            issuer: "CN=CA".parse().unwrap(),
            not_after: std::time::SystemTime::now() + Duration::from_secs(3600),
        }
    }

    /// The client as a connection presents it (matched by fingerprint: how
    /// it was issued does not matter).
    fn verified(id: &ClientIdentity) -> VerifiedClient<'_> {
        VerifiedClient {
            identity: id,
            issued_directly: false,
        }
    }

    fn config(dir: &Path, keys: &str, entity_keys: &[&str], extra: &str) -> Config {
        let text = format!(
            r#"
[server]
listen = ["127.0.0.1:8443"]
[tls]
certificate = "s.pem"
private_key = "s.key"
client_ca = "ca.pem"
[hsm]
module = "embedded"
token_label = "svs"
pin = {{ file = "/run/pin" }}
[keys]
demo = {{ object = "demo" }}
{keys}
[audit]
dir = "audit"
checkpoint_interval_s = 0
[anomaly]
enabled = false
[[entity]]
name = "app1"
certificate_sha256 = "{FP}"
keys = {entity_keys:?}
operations = ["sign", "verify"]
{extra}
"#
        );
        Config::from_toml(&text, &dir.join("svsd.toml")).unwrap()
    }

    struct Fixture {
        _tmp: tempfile::TempDir,
        dir: std::path::PathBuf,
        app: Arc<App>,
        p256: rcgen::KeyPair,
        backend: Arc<TestBackend>,
    }

    fn fixture(keys: &str, entity_keys: &[&str], extra: &str) -> Fixture {
        fixture_with(keys, entity_keys, extra, |_| {})
    }

    /// [`fixture`] with the parsed configuration changed by `edit`.
    fn fixture_with(
        keys: &str,
        entity_keys: &[&str],
        extra: &str,
        edit: impl FnOnce(&mut Config),
    ) -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut cfg = config(&dir, keys, entity_keys, extra);
        edit(&mut cfg);
        let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let point = p256.public_key_raw().to_vec();
        let info = KeyInfo {
            name: "p256".into(),
            id: vec![9],
            algorithm: svs_hsm::Algorithm::EcdsaP256,
            spki_der: svs_hsm::keys::spki_for_point(svs_hsm::Algorithm::EcdsaP256, &point),
            public_point: point,
            certificate_chain: Vec::new(),
        };
        let backend = Arc::new(TestBackend {
            soft: SoftBackend::new(&["demo", "other"]),
            p256: Arc::new(info),
            busy: Default::default(),
            down: Default::default(),
            signs: Default::default(),
        });
        let audit = Arc::new(AuditTrail::open(&cfg.audit, None).unwrap());
        let app = Arc::new(App::new(&cfg, backend.clone(), audit));
        Fixture {
            _tmp: tmp,
            dir,
            app,
            p256,
            backend,
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    async fn call(app: &Arc<App>, route: Route, body: &serde_json::Value) -> Reply {
        call_raw(app, route, &serde_json::to_vec(body).unwrap()).await
    }

    /// [`call`] with a body `json!` cannot write (a name twice).
    async fn call_raw(app: &Arc<App>, route: Route, body: &[u8]) -> Reply {
        match app
            .precheck(&route, Ok(verified(&client())), Some("application/json"))
            .await
        {
            Ok(adm) => {
                app.handle(
                    route,
                    &adm,
                    Ok(verified(&client())),
                    &Bytes::copy_from_slice(body),
                )
                .await
            }
            Err(e) => Reply::from(e),
        }
    }

    /// The `op` records of the trail.
    fn records(dir: &Path) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        for (_, f) in crate::audit::trail_files(&dir.join("audit")).unwrap() {
            let bytes = crate::audit::read_trail_file(&f).unwrap();
            for line in std::str::from_utf8(&bytes).unwrap().lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                if v["type"] == "op" {
                    out.push(v);
                }
            }
        }
        out
    }

    #[test]
    fn large_bodies_are_parsed_decoded_and_hashed_off_the_runtime_alike() {
        let f = fixture("", &["demo"], "");
        let data = api::to_b64(&vec![0x5a; 3 * LARGE_BODY]);
        rt().block_on(async {
            f.app.run_selftests().await.unwrap();
            let signed = call(&f.app, Route::Sign, &json!({"key": "demo", "data": data})).await;
            assert_eq!(signed.status, 200, "{}", signed.body);
            let batch = json!({"items": [
                {"key": "demo", "data": data},
                {"key": "demo", "digest": "AA=="},
            ]});
            let r = call(&f.app, Route::SignBatch, &batch).await;
            assert_eq!(r.status, 200, "{}", r.body);
            assert!(r.body["results"][0]["signature"].is_string(), "{}", r.body);
            assert_eq!(r.body["results"][1]["error"]["code"], "invalid_digest");
            let verify =
                json!({"key": "demo", "data": data, "signature": signed.body["signature"]});
            let r = call(&f.app, Route::Verify, &verify).await;
            assert_eq!(r.body, json!({"valid": true}));
            let mut broken = serde_json::to_vec(&verify).unwrap();
            broken.truncate(broken.len() - 1);
            let r = call_raw(&f.app, Route::Sign, &broken).await;
            assert_eq!(r.body["error"]["code"], "malformed_request", "{}", r.body);
        });
        // The input's digest is in the trail, as for a small one.
        let input = crate::audit::sm3(&vec![0x5a; 3 * LARGE_BODY]);
        assert!(
            records(&f.dir)
                .iter()
                .any(|r| r["input_sm3"] == svs_hsm::keys::hex(&input) && r["outcome"] == "ok")
        );
    }

    #[test]
    fn checkpoints_and_the_stop_move_the_anchor_but_never_back() {
        let f = fixture_with("", &["demo"], "", |c| {
            c.audit.checkpoint_key = Some("other".into());
        });
        let anchor = |f: &Fixture| {
            rt().block_on(f.backend.read_data(crate::config::DEFAULT_ANCHOR_OBJECT))
                .map(|v| crate::audit::anchor_head(&v).unwrap())
                .unwrap()
        };
        assert_eq!(anchor(&f), None);
        rt().block_on(async {
            f.app.audit.note("start", "test".into()).await.unwrap();
            let seq = f
                .app
                .checkpoint("other", Duration::from_secs(300))
                .await
                .unwrap();
            assert_eq!(seq, 1);
        });
        let first = anchor(&f).unwrap();
        assert_eq!((first.head_seq, first.interval_s), (1, 300));
        rt().block_on(async {
            f.app.audit.note("stop", "test".into()).await.unwrap();
            let head = f.app.audit.head().await.unwrap();
            f.app
                .anchor_head(head, Duration::from_secs(300))
                .await
                .unwrap();
        });
        // The start, the checkpoint, the stop.
        let (seq, head, _) = rt().block_on(f.app.audit.head()).unwrap();
        let at_stop = anchor(&f).unwrap();
        assert_eq!((at_stop.head_seq, at_stop.head), (3, head));
        assert_eq!(seq, 3);
        // Another trail's anchor, ahead of this one: left as it is.
        let ahead = crate::audit::Checkpoint {
            head_seq: 1000,
            ..at_stop.clone()
        };
        rt().block_on(
            f.backend
                .replace_data(crate::config::DEFAULT_ANCHOR_OBJECT, ahead.message()),
        )
        .unwrap();
        // A head already recorded is not written again (a checkpoint
        // overtaken by the stop's update).
        rt().block_on(
            f.app
                .anchor_head((seq, head, String::new()), Duration::from_secs(300)),
        )
        .unwrap();
        rt().block_on(f.app.audit.note("start", "test".into()))
            .unwrap();
        let e = rt()
            .block_on(f.app.checkpoint("other", Duration::from_secs(300)))
            .unwrap_err();
        assert!(e.to_string().contains("ahead of this trail's seq 4"), "{e}");
        assert_eq!(anchor(&f), Some(ahead));
    }

    #[test]
    fn routes_parse_from_the_one_table_and_405_names_the_allowed_methods() {
        let ok = |m: &str, p: &str| Route::parse(m, p).unwrap();
        assert_eq!(ok("POST", "/v1/sign"), Route::Sign);
        assert_eq!(ok("POST", "/v1/verify/batch"), Route::VerifyBatch);
        assert_eq!(ok("GET", "/v1/keys"), Route::Keys);
        assert_eq!(ok("HEAD", "/v1/keys/demo"), Route::Key("demo".into()));
        assert_eq!(ok("GET", "/readyz"), Route::Readyz);
        for p in ["/v1/keys/", "/v1/keys/a/b", "/v1/signx", "/v1", "/"] {
            assert_eq!(Route::parse("GET", p), Err(SvsError::NotFound), "{p}");
        }
        let allow = |m: &str, p: &str| Reply::from(Route::parse(m, p).unwrap_err()).allow;
        assert_eq!(allow("GET", "/v1/sign"), Some("POST"));
        assert_eq!(allow("TRACE", "/v1/keys/demo"), Some("GET, HEAD"));
        assert_eq!(allow("POST", "/healthz"), Some("GET, HEAD"));
        // Every templated route resolves to itself, and paths are unique.
        let mut seen = std::collections::BTreeSet::new();
        for r in ROUTES {
            assert!(seen.insert(r.template), "{} twice", r.template);
            let path = r.template.replace("{name}", "k");
            assert!(Route::parse(r.method, &path).is_ok(), "{}", r.template);
        }
    }

    #[test]
    fn readyz_names_the_reason_category_and_keeps_details_out() {
        let f = fixture("", &["demo"], "");
        rt().block_on(async {
            let message = |r: Reply| (r.status, r.body["error"]["message"].clone());
            let r = call(&f.app, Route::Readyz, &json!({})).await;
            assert_eq!(message(r), (503, json!("self-tests pending")));
            f.app
                .set_selftest(Err("pairwise test of key demo: CKR_DEVICE_ERROR".into()));
            let r = call(&f.app, Route::Readyz, &json!({})).await;
            assert_eq!(message(r), (503, json!("self-tests failed")));
            f.app.run_selftests().await.unwrap();
            let r = call(&f.app, Route::Readyz, &json!({})).await;
            assert_eq!(r.status, 200);
            f.app.start_draining();
            let r = call(&f.app, Route::Readyz, &json!({})).await;
            assert_eq!(message(r), (503, json!("shutting down")));
        });
    }

    #[test]
    fn unknown_key_names_never_reach_the_trail() {
        let f = fixture("", &["demo"], "");
        let pii = "110101199003074512";
        rt().block_on(async {
            f.app.run_selftests().await.unwrap();
            let r = call(&f.app, Route::Sign, &json!({"key": pii, "data": "aGk="})).await;
            assert_eq!(r.status, 404);
            let r = call(
                &f.app,
                Route::Verify,
                &json!({"key": pii, "data": "aGk=", "signature": "AA=="}),
            )
            .await;
            assert_eq!(r.status, 404);
            let r = call(&f.app, Route::Sign, &json!({"key": "demo", "data": "aGk="})).await;
            assert_eq!(r.status, 200);
        });
        let recs = records(&f.dir);
        let text = serde_json::to_string(&recs).unwrap();
        assert!(!text.contains(pii), "{text}");
        assert_eq!(recs.len(), 3, "{text}");
        assert_eq!(recs[0]["outcome"], "unknown_key");
        assert!(recs[0].get("key").is_none());
        assert_eq!(recs[2]["key"], "demo");
    }

    #[test]
    fn a_name_given_twice_is_refused_before_anything_is_signed() {
        let f = fixture("", &["demo"], "");
        // "world", the value a last-wins parser would sign.
        let second = "d29ybGQ=";
        rt().block_on(async {
            f.app.run_selftests().await.unwrap();
            let signs = f.backend.signs.load(Ordering::SeqCst);
            for (route, body, field) in [
                (
                    Route::Sign,
                    format!(r#"{{"key":"demo","data":"aGVsbG8=","data":"{second}"}}"#),
                    "data",
                ),
                (
                    Route::Sign,
                    r#"{"key":"nope","key":"demo","data":"aGVsbG8="}"#.to_owned(),
                    "key",
                ),
                (
                    Route::SignBatch,
                    format!(r#"{{"items":[{{"key":"demo","data":"aGVsbG8=","data":"{second}"}}]}}"#),
                    "data",
                ),
                (
                    Route::Verify,
                    format!(r#"{{"key":"demo","data":"aGVsbG8=","signature":"AA==","encoding":"der","encoding":"raw","data":"{second}"}}"#),
                    "encoding",
                ),
            ] {
                let r = call_raw(&f.app, route, body.as_bytes()).await;
                assert_eq!(r.status, 400, "{body}");
                assert_eq!(r.body["error"]["code"], "malformed_request");
                assert_eq!(
                    r.body["error"]["message"],
                    format!("malformed request: duplicate field `{field}`")
                );
            }
            assert_eq!(f.backend.signs.load(Ordering::SeqCst), signs);
            // Non-string values: a request refused alone, a batch item alone.
            let r = call(
                &f.app,
                Route::Sign,
                &json!({"key": "demo", "data": "aGk=", "encoding": {"raw": null}}),
            )
            .await;
            assert_eq!(r.body["error"]["code"], "malformed_request");
            let r = call(
                &f.app,
                Route::SignBatch,
                &json!({"items": [{"key": "demo", "data": null}, {"key": "demo", "data": "aGk="}]}),
            )
            .await;
            assert_eq!(r.status, 200);
            assert_eq!(r.body["results"][0]["error"]["code"], "malformed_request");
            assert!(r.body["results"][1]["signature"].is_string());
        });
        let text = serde_json::to_string(&all_records(&f.dir)).unwrap();
        assert!(
            !text.contains(second) && !text.contains("aGVsbG8="),
            "{text}"
        );
        let outcomes: Vec<_> = records(&f.dir)
            .iter()
            .map(|r| r["outcome"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            outcomes,
            [
                "malformed_request",
                "malformed_request",
                "malformed_request",
                "malformed_request",
                "malformed_request",
                "malformed_request",
                "ok"
            ]
        );
    }

    #[test]
    fn verify_by_key_uses_the_keys_algorithm() {
        let f = fixture("p256 = { object = \"p256\" }", &["demo", "p256"], "");
        let msg = b"hello p256";
        let sig = rcgen::SigningKey::sign(&f.p256, msg).unwrap();
        rt().block_on(async {
            let r = call(
                &f.app,
                Route::Verify,
                &json!({"key": "p256", "data": api::to_b64(msg), "signature": api::to_b64(&sig)}),
            )
            .await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            assert_eq!(r.body["valid"], true, "{:?}", r.body);
            let r = call(
                &f.app,
                Route::Verify,
                &json!({"key": "p256", "data": api::to_b64(b"other"), "signature": api::to_b64(&sig)}),
            )
            .await;
            assert_eq!(r.body["valid"], false, "{:?}", r.body);
        });
    }

    #[test]
    fn refusals_leave_one_audit_record_each_without_key_or_payload() {
        let f = fixture("", &["demo"], "rate = { per_second = 0.001, burst = 1 }");
        rt().block_on(async {
            f.app.run_selftests().await.unwrap();
            // Unknown client.
            let adm = f
                .app
                .precheck(
                    &Route::Sign,
                    Err(SvsError::Unauthenticated),
                    Some("application/json"),
                )
                .await;
            assert_eq!(adm.unwrap_err(), SvsError::Unauthenticated);
            // Malformed body.
            let r = f
                .app
                .precheck(
                    &Route::Sign,
                    Ok(verified(&client())),
                    Some("application/json"),
                )
                .await
                .unwrap();
            let reply = f
                .app
                .handle(
                    Route::Sign,
                    &r,
                    Err(SvsError::Unauthenticated),
                    &Bytes::from_static(b"{\"key\":\"secret-key\""),
                )
                .await;
            assert_eq!(reply.status, 400);
            drop(r);
            // Batch too large.
            let items: Vec<_> = (0..300)
                .map(|_| json!({"key": "demo", "data": "aGk="}))
                .collect();
            let reply = call(&f.app, Route::SignBatch, &json!({ "items": items })).await;
            assert_eq!(reply.body["error"]["code"], "batch_too_large");
            // One request passes, then the bucket (burst 1) is empty: refused
            // before the body.
            let ok = call(&f.app, Route::Sign, &json!({"key": "demo", "data": "aGk="})).await;
            assert_eq!(ok.status, 200);
            let limited = call(&f.app, Route::Sign, &json!({"key": "demo", "data": "aGk="})).await;
            assert_eq!(limited.body["error"]["code"], "rate_limited");
        });
        let recs = records(&f.dir);
        let outcomes: Vec<_> = recs
            .iter()
            .map(|r| {
                (
                    r["entity"].as_str().unwrap(),
                    r["outcome"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            outcomes,
            [
                ("_unknown", "unauthenticated"),
                ("app1", "malformed_request"),
                ("app1", "batch_too_large"),
                ("app1", "ok"),
                ("app1", "rate_limited"),
            ]
        );
        for r in &recs[..3] {
            assert!(
                r.get("key").is_none() && r.get("input_sm3").is_none(),
                "{r}"
            );
            assert_eq!(r["op"], "sign");
        }
        assert!(!serde_json::to_string(&recs).unwrap().contains("secret-key"));
    }

    #[test]
    fn refusals_by_readiness_or_the_anomaly_throttle_take_no_rate_tokens() {
        let f = fixture_with(
            "",
            &["demo"],
            "rate = { per_second = 0.001, burst = 5 }",
            |c| {
                // No warm-up, and a floor so low that the throttle, once
                // its one token is used, refuses for the rest of the test.
                c.anomaly = AnomalyConfig {
                    enabled: true,
                    enforce: true,
                    short_window_s: 10,
                    long_window_s: 100,
                    warmup_s: 0,
                    min_rate: 0.001,
                    min_requests: 1,
                    min_active_s: 1,
                    ..AnomalyConfig::default()
                };
            },
        );
        let sign = json!({"key": "demo", "data": "aGk="});
        let code = |r: &Reply| r.body["error"]["code"].as_str().unwrap_or("ok").to_owned();
        let message = |r: &Reply| r.body["error"]["message"].as_str().unwrap_or("").to_owned();
        rt().block_on(async {
            // Self-tests pending: not ready.
            for _ in 0..3 {
                let r = call(&f.app, Route::Sign, &sign).await;
                assert_eq!(code(&r), "not_ready");
            }
            f.app.run_selftests().await.unwrap();
            // One second of 100 operations: the entity is throttled.
            let rt = f.app.runtime();
            let e = rt.policy.entities()[0].clone();
            e.traffic().record(100, 0);
            f.app.anomaly_tick().await;
            assert!(e.traffic().view().throttled, "{:?}", e.traffic().view());
            // The throttle's one token: served (the entity's bucket: 4 left).
            assert_eq!(code(&call(&f.app, Route::Sign, &sign).await), "ok");
            for _ in 0..10 {
                let r = call(&f.app, Route::Sign, &sign).await;
                assert_eq!((r.status, code(&r)), (429, "rate_limited".into()));
                assert!(message(&r).contains("abnormal traffic"), "{}", r.body);
            }
            // Those 429s are svsd's own doing: no error share of the
            // entity's, so no second anomaly for the same flood.
            f.app.anomaly_tick().await;
            assert_eq!(
                e.traffic().view().error_ratio,
                0.0,
                "{:?}",
                e.traffic().view()
            );
            // The throttle lifted, the entity's own bucket still holds the
            // 4 tokens none of those refusals took.
            e.traffic().disable();
            for _ in 0..4 {
                assert_eq!(code(&call(&f.app, Route::Sign, &sign).await), "ok");
            }
            let r = call(&f.app, Route::Sign, &sign).await;
            assert_eq!(code(&r), "rate_limited");
            assert_eq!(message(&r), "rate limit exceeded");
        });
    }

    #[test]
    fn key_lookups_take_tokens_from_the_entitys_bucket() {
        let f = fixture_with(
            "",
            &["demo"],
            "rate = { per_second = 0.001, burst = 3 }",
            |_| {},
        );
        let code = |r: &Reply| r.body["error"]["code"].as_str().unwrap_or("ok").to_owned();
        rt().block_on(async {
            f.app.run_selftests().await.unwrap();
            assert_eq!(code(&call(&f.app, Route::Keys, &json!({})).await), "ok");
            let key = Route::Key("demo".into());
            assert_eq!(code(&call(&f.app, key.clone(), &json!({})).await), "ok");
            assert_eq!(code(&call(&f.app, Route::Keys, &json!({})).await), "ok");
            for route in [Route::Keys, key] {
                let r = call(&f.app, route, &json!({})).await;
                assert_eq!((r.status, code(&r)), (429, "rate_limited".into()));
                assert!(r.retry_after.is_some());
            }
            // One bucket for all of the entity's requests.
            let sign = json!({"key": "demo", "data": "aGk="});
            assert_eq!(
                code(&call(&f.app, Route::Sign, &sign).await),
                "rate_limited"
            );
        });
    }

    /// Every record of the trail, any type.
    fn all_records(dir: &Path) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        for (_, f) in crate::audit::trail_files(&dir.join("audit")).unwrap() {
            let bytes = crate::audit::read_trail_file(&f).unwrap();
            for line in std::str::from_utf8(&bytes).unwrap().lines() {
                out.push(serde_json::from_str(line).unwrap());
            }
        }
        out
    }

    /// `(entity, suppressed total, OP:CODE → count)` of a
    /// `refusals_suppressed` detail.
    fn summary(detail: &str) -> (String, u64, BTreeMap<String, u64>) {
        let mut words = detail.split(' ');
        let entity = words.next().unwrap().strip_prefix("entity=").unwrap();
        let total = words.next().unwrap().strip_prefix("suppressed=").unwrap();
        let counts = words
            .map(|w| {
                let (k, n) = w.split_once('=').unwrap();
                (k.to_owned(), n.parse().unwrap())
            })
            .collect();
        (entity.to_owned(), total.parse().unwrap(), counts)
    }

    #[test]
    fn refusals_past_the_record_bucket_are_counted_in_one_summary_per_source() {
        let app2 = format!(
            "[[entity]]\nname = \"app2\"\ncertificate_sha256 = \"{}\"\nkeys = [\"demo\"]\noperations = [\"sign\"]\nrate = {{ per_second = 0.001, burst = 1 }}\n",
            "02".repeat(32)
        );
        let f = fixture_with("", &["demo"], &app2, |c| {
            c.audit.refusal_records = crate::config::RateLimit {
                per_second: 0.001,
                burst: 5,
            };
        });
        let client2 = ClientIdentity {
            certificate_sha256: [2; 32],
            ..client()
        };
        let sign = serde_json::to_vec(&json!({"key": "demo", "data": "aGk="})).unwrap();
        let mut signatures = Vec::new();
        let mut refused = (0u64, 0u64);
        rt().block_on(async {
            f.app.run_selftests().await.unwrap();
            // app1 floods with refusals checked before any bucket (wrong
            // media type), signing now and then.
            for i in 0..250 {
                let route = if i < 200 { Route::Sign } else { Route::Verify };
                let r = f
                    .app
                    .precheck(&route, Ok(verified(&client())), Some("text/plain"))
                    .await;
                assert_eq!(r.unwrap_err(), SvsError::UnsupportedMediaType);
                refused.0 += 1;
                if i % 10 == 0 {
                    let ok =
                        call(&f.app, Route::Sign, &json!({"key": "demo", "data": "aGk="})).await;
                    assert_eq!(ok.status, 200, "{:?}", ok.body);
                    signatures.push(ok.body["signature"].as_str().unwrap().to_owned());
                }
            }
            // app2, after that flood: its own bucket. One sign, then
            // refused by its rate limit (which costs it no token).
            for i in 0..301 {
                let adm = f
                    .app
                    .precheck(
                        &Route::Sign,
                        Ok(verified(&client2)),
                        Some("application/json"),
                    )
                    .await;
                match adm {
                    Ok(adm) => {
                        assert_eq!(i, 0);
                        let r = f
                            .app
                            .handle(
                                Route::Sign,
                                &adm,
                                Err(SvsError::Unauthenticated),
                                &Bytes::from(sign.clone()),
                            )
                            .await;
                        assert_eq!(r.status, 200);
                        signatures.push(r.body["signature"].as_str().unwrap().to_owned());
                    }
                    Err(e) => {
                        assert_eq!(e.wire().code, "rate_limited");
                        refused.1 += 1;
                    }
                }
            }
            // Unknown clients share one bucket of their own.
            for _ in 0..2 {
                let r = f
                    .app
                    .precheck(
                        &Route::Sign,
                        Err(SvsError::Unauthenticated),
                        Some("application/json"),
                    )
                    .await;
                assert_eq!(r.unwrap_err(), SvsError::Unauthenticated);
            }
            assert_eq!(f.app.flush_refusals().await, 245 + 295);
            // Counted once: nothing is left for the next second.
            assert_eq!(f.app.flush_refusals().await, 0);
        });
        let m = f.app.metrics();
        assert_eq!(m.refusals_suppressed("app1", "unsupported_media_type"), 245);
        assert_eq!(m.refusals_suppressed("app2", "rate_limited"), 295);
        assert_eq!(
            m.refusals_suppressed(metrics::UNKNOWN, "unauthenticated"),
            0
        );

        let all = all_records(&f.dir);
        let ops: Vec<_> = all.iter().filter(|r| r["type"] == "op").collect();
        let count = |entity: &str, outcome: &str| {
            ops.iter()
                .filter(|r| r["entity"] == entity && r["outcome"] == outcome)
                .count()
        };
        // At most the burst of refusals one by one, per source...
        assert_eq!(count("app1", "unsupported_media_type"), 5);
        assert_eq!(count("app2", "rate_limited"), 5);
        assert_eq!(count(UNKNOWN_ENTITY, "unauthenticated"), 2);
        // ...and every signature handed out, flood or not.
        assert_eq!(count("app1", "ok"), 25);
        assert_eq!(count("app2", "ok"), 1);
        let signed: std::collections::BTreeSet<_> = ops
            .iter()
            .filter_map(|r| r["output_sm3"].as_str())
            .collect();
        for sig in &signatures {
            let der = api::b64("signature", sig).unwrap();
            let h = svs_hsm::keys::hex(&crate::audit::sm3(&der));
            assert!(
                signed.contains(h.as_str()),
                "signature {sig} not in the trail"
            );
        }
        assert_eq!(ops.len(), 5 + 5 + 2 + 25 + 1);
        // One summary per source that had refusals held back, making up
        // the difference exactly.
        let summaries: Vec<_> = all
            .iter()
            .filter(|r| r["type"] == "refusals_suppressed")
            .map(|r| summary(r["detail"].as_str().unwrap()))
            .collect();
        let want = |pairs: &[(&str, u64)]| -> BTreeMap<String, u64> {
            pairs.iter().map(|(k, n)| ((*k).to_owned(), *n)).collect()
        };
        assert_eq!(
            summaries,
            [
                (
                    "app1".to_owned(),
                    245,
                    want(&[
                        ("sign:unsupported_media_type", 195),
                        ("verify:unsupported_media_type", 50)
                    ])
                ),
                ("app2".to_owned(), 295, want(&[("sign:rate_limited", 295)])),
            ]
        );
        // Records one by one plus the summary: every refusal answered.
        for (entity, outcome, refused) in [
            ("app1", "unsupported_media_type", refused.0),
            ("app2", "rate_limited", refused.1),
        ] {
            let summed = summaries.iter().find(|s| s.0 == entity).unwrap().1;
            assert_eq!(count(entity, outcome) as u64 + summed, refused, "{entity}");
        }
        // The chain holds with the notes in it.
        let report = crate::audit::verify_dir(&f.dir.join("audit"), None).unwrap();
        assert_eq!(report.records, all.len() as u64);
    }

    #[test]
    fn the_concurrency_slot_is_taken_before_the_body_and_released_on_every_path() {
        let f = fixture("", &["demo"], "max_concurrent = 1");
        rt().block_on(async {
            let first = f
                .app
                .precheck(
                    &Route::Sign,
                    Ok(verified(&client())),
                    Some("application/json"),
                )
                .await
                .unwrap();
            // A second request is refused before any body is read.
            let second = f
                .app
                .precheck(
                    &Route::Verify,
                    Ok(verified(&client())),
                    Some("application/json"),
                )
                .await;
            assert_eq!(second.unwrap_err(), SvsError::TooManyConcurrent);
            // The first ends in an error: its slot is back.
            let reply = f
                .app
                .handle(
                    Route::Sign,
                    &first,
                    Err(SvsError::Unauthenticated),
                    &Bytes::from_static(b"not json"),
                )
                .await;
            assert_eq!(reply.status, 400);
            drop(first);
            assert!(
                f.app
                    .precheck(
                        &Route::Sign,
                        Ok(verified(&client())),
                        Some("application/json")
                    )
                    .await
                    .is_ok()
            );
        });
    }

    #[test]
    fn a_periodic_self_test_the_hsm_is_too_busy_for_is_retried_not_failed() {
        let f = fixture("", &["demo"], "");
        let b = &f.backend;
        let signs = || b.signs.swap(0, Ordering::SeqCst);
        let failures = || f.app.metrics.selftest_failures();
        let retry = Duration::from_millis(5);
        rt().block_on(async {
            f.app.run_selftests().await.unwrap();
            signs();
            // Busy twice, then free: tried three times, ready throughout.
            b.busy.store(2, Ordering::SeqCst);
            f.app.run_periodic_selftests(retry).await.unwrap();
            assert_eq!((signs(), failures()), (3, 0));
            assert!(f.app.readiness().is_ok());
            // Busy every time: a failure after the last attempt.
            b.busy.store(SELFTEST_ATTEMPTS as usize, Ordering::SeqCst);
            let e = f.app.run_periodic_selftests(retry).await.unwrap_err();
            assert!(e.contains("(no verdict)"), "{e}");
            assert_eq!((signs(), failures()), (SELFTEST_ATTEMPTS as usize, 1));
            assert!(f.app.readiness().is_err());
            f.app.run_periodic_selftests(retry).await.unwrap();
            assert!(f.app.readiness().is_ok());
            signs();
            // An HSM error is a verdict: failed at once, not tried again.
            b.down.store(true, Ordering::SeqCst);
            let e = f.app.run_periodic_selftests(retry).await.unwrap_err();
            assert!(!e.contains("no verdict"), "{e}");
            assert_eq!((signs(), failures()), (1, 2));
            assert!(f.app.readiness().is_err());
            // The first self-test, before READY, does not wait for a busy HSM.
            b.down.store(false, Ordering::SeqCst);
            b.busy.store(1, Ordering::SeqCst);
            assert!(f.app.run_selftests().await.is_err());
        });
    }

    #[test]
    fn a_reload_between_admission_and_body_applies_to_the_request() {
        let f = fixture("", &["demo"], "");
        rt().block_on(async {
            f.app.run_selftests().await.unwrap();
            let body = serde_json::to_vec(&json!({"key": "demo", "data": "aGk="})).unwrap();
            let id = client();
            let base = || config(&f.dir, "", &["demo"], "");
            // Admitted under the base configuration; `next` (if any) is
            // loaded before the body is handled, and the client then is the
            // dev client, or none the current client CA still trusts.
            let request = async |next: Option<Config>, trusted: bool| {
                f.app.reload(&base()).await.unwrap();
                let adm = f
                    .app
                    .precheck(&Route::Sign, Ok(verified(&id)), Some("application/json"))
                    .await
                    .unwrap();
                if let Some(next) = next {
                    f.app.reload(&next).await.unwrap();
                }
                let client = trusted
                    .then(|| verified(&id))
                    .ok_or(SvsError::Unauthenticated);
                let reply = f
                    .app
                    .handle(Route::Sign, &adm, client, &Bytes::from(body.clone()))
                    .await;
                let code = reply.body["error"]["code"].as_str().map(str::to_owned);
                (reply.status, code)
            };
            let refused = |status: u16, code: &str| (status, Some(code.to_owned()));
            // A reload between admission and the body (which may take the
            // body timeout to arrive) applies to the request: a key taken
            // from the entity...
            let other = config(&f.dir, "other = { object = \"other\" }", &["other"], "");
            assert_eq!(
                request(Some(other), true).await,
                refused(403, "key_not_allowed")
            );
            // ...a suspension...
            let suspended = config(&f.dir, "", &["demo"], "status = \"suspended\"");
            assert_eq!(
                request(Some(suspended), true).await,
                refused(403, "entity_suspended")
            );
            // ...the operation withdrawn...
            let mut verify_only = base();
            verify_only.entities[0].operations = [Operation::Verify].into_iter().collect();
            assert_eq!(
                request(Some(verify_only), true).await,
                refused(403, "operation_not_allowed")
            );
            // ...the entity bound to another certificate...
            let mut rebound = base();
            rebound.entities[0].client = crate::config::ClientMatch::CertificateSha256([2; 32]);
            assert_eq!(request(Some(rebound), true).await.0, 401);
            // ...a client no longer trusted by the current client CA...
            assert_eq!(request(Some(base()), false).await.0, 401);
            // ...and an entity removed altogether.
            let mut none = base();
            none.entities.clear();
            assert_eq!(request(Some(none), true).await.0, 401);
            // Without a reload, the request goes through.
            assert_eq!(request(None, true).await, (200, None));
        });
    }

    #[test]
    fn a_reload_exposing_a_key_that_fails_its_self_test_is_refused() {
        let f = fixture("", &["demo"], "");
        rt().block_on(async {
            // "p256" cannot sign through this backend: its pairwise test fails.
            let cfg = config(
                &f.dir,
                "p256 = { object = \"p256\" }",
                &["demo", "p256"],
                "",
            );
            let err = f.app.reload(&cfg).await.unwrap_err();
            assert!(matches!(err, SvsError::Config(_)), "{err:?}");
            assert!(!f.app.runtime().keys.contains_key("p256"));
            // Another key that passes is installed.
            let cfg = config(
                &f.dir,
                "other = { object = \"other\" }",
                &["demo", "other"],
                "",
            );
            f.app.reload(&cfg).await.unwrap();
            assert!(f.app.runtime().keys.contains_key("other"));
        });
    }

    /// Whether `reply` (a 200 from /v1/sign over "hi") is a signature by `key`.
    fn signed_by(reply: &Reply, key: &KeyInfo) -> bool {
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        let sig = api::b64("signature", reply.body["signature"].as_str().unwrap()).unwrap();
        SoftwareVerifier::new()
            .verify_message(
                key.algorithm,
                &key.public_point,
                DEFAULT_SM2_ID,
                b"hi",
                &sig,
            )
            .is_ok()
    }

    #[test]
    fn a_key_re_created_on_the_token_signs_only_after_an_accepted_reload_tested_it() {
        let f = fixture("", &["demo"], "");
        let b = &f.backend;
        let sign = json!({"key": "demo", "data": "aGk="});
        let served = |app: &Arc<App>| app.backend().key("demo").unwrap();
        rt().block_on(async {
            f.app.run_selftests().await.unwrap();
            let old = served(&f.app);
            assert!(signed_by(&call(&f.app, Route::Sign, &sign).await, &old));
            // An officer deletes `demo` and generates it again.
            let new = b.soft.replace_key("demo").unwrap();
            assert_ne!(new.public_point, old.public_point);

            // Refused before any test: [keys] names an object not on the token.
            let ghost = config(&f.dir, "ghost = { object = \"ghost\" }", &["demo"], "");
            b.signs.store(0, Ordering::SeqCst);
            let e = f.app.reload(&ghost).await.unwrap_err();
            assert!(e.to_string().contains("\"ghost\" not found"), "{e}");
            assert_eq!(b.signs.load(Ordering::SeqCst), 0);
            // Refused after the re-created key passed its test: another
            // new key (p256 cannot sign here) fails its own.
            let p256 = config(
                &f.dir,
                "p256 = { object = \"p256\" }",
                &["demo", "p256"],
                "",
            );
            assert!(f.app.reload(&p256).await.is_err());
            assert_eq!(b.signs.load(Ordering::SeqCst), 2, "demo, then p256");
            // Refused: the re-created key's own test fails.
            b.down.store(true, Ordering::SeqCst);
            let base = config(&f.dir, "", &["demo"], "");
            let e = f.app.reload(&base).await.unwrap_err();
            assert!(e.to_string().contains("key \"demo\": sign"), "{e}");
            b.down.store(false, Ordering::SeqCst);
            // Nothing changed: the old key is the one served, and the one
            // signatures are asked of; gone from the token, it cannot sign.
            assert_eq!(served(&f.app), old);
            let key = call(&f.app, Route::Key("demo".into()), &json!({})).await;
            assert_eq!(
                key.body["public_key"],
                api::pem("PUBLIC KEY", &old.spki_der)
            );
            let r = call(&f.app, Route::Sign, &sign).await;
            assert_eq!(r.body["error"]["code"], "hsm_unavailable", "{:?}", r.body);

            // Then the periodic self-test fails on it: nothing signs, with
            // any key, and a refused reload changes nothing.
            assert!(f.app.run_selftests().await.is_err());
            assert!(f.app.reload(&ghost).await.is_err());
            assert!(matches!(
                f.app.readiness(),
                Err(SvsError::NotReady(NotReady::SelftestsFailed, _))
            ));

            // Accepted: tested, installed, named in the changes; the failed
            // self-tests run again at once and pass: ready again, without
            // waiting for the next periodic run.
            b.signs.store(0, Ordering::SeqCst);
            let changes = f.app.reload(&base).await.unwrap();
            assert_eq!(b.signs.load(Ordering::SeqCst), 2, "pairwise, then self-test");
            assert_eq!(changes.keys_rekeyed, ["demo"]);
            assert_eq!(changes.pairwise_passed, ["demo"]);
            assert_eq!(changes.selftests_rerun, Some(true));
            assert_eq!(
                changes.to_string(),
                "1 entities; keys re-keyed: demo; pairwise test passed: demo; failed self-tests run again: passed"
            );
            f.app.readiness().unwrap();
            assert_eq!(served(&f.app), new);
            assert!(signed_by(&call(&f.app, Route::Sign, &sign).await, &new));
            // The same key again: nothing to test, nothing changed.
            let changes = f.app.reload(&base).await.unwrap();
            assert_eq!(changes.to_string(), "1 entities; no changes");
            assert_eq!(
                b.signs.load(Ordering::SeqCst),
                3,
                "only the signature above"
            );
        });
    }

    #[test]
    fn a_locked_user_pin_shows_in_the_metrics_and_leaves_signing_alone() {
        let f = fixture("", &["demo"], "");
        let pin = |app: &Arc<App>, state: &str| {
            let page = String::from_utf8(app.metrics().render(app)).unwrap();
            let series = format!("svs_hsm_user_pin{{state=\"{state}\"}} ");
            page.lines()
                .find_map(|l| l.strip_prefix(&series))
                .map(str::to_owned)
        };
        rt().block_on(async {
            f.app.run_selftests().await.unwrap();
            // The series exist before the first read.
            assert_eq!(pin(&f.app, "locked").as_deref(), Some("0"));
            *f.backend.soft.pin_state.lock().unwrap() = svs_hsm::UserPinState {
                count_low: true,
                final_try: false,
                locked: true,
            };
            f.app.check_user_pin().await;
            assert_eq!(pin(&f.app, "locked").as_deref(), Some("1"));
            assert_eq!(pin(&f.app, "count_low").as_deref(), Some("1"));
            assert_eq!(pin(&f.app, "final_try").as_deref(), Some("0"));
            // Open sessions keep signing: readiness stays.
            f.app.readiness().unwrap();
            let r = call(&f.app, Route::Sign, &json!({"key": "demo", "data": "aGk="})).await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            // Unlocked by an officer.
            *f.backend.soft.pin_state.lock().unwrap() = svs_hsm::UserPinState::default();
            f.app.check_user_pin().await;
            assert_eq!(pin(&f.app, "locked").as_deref(), Some("0"));
        });
    }

    #[test]
    fn a_reload_names_what_changed_and_refuses_to_lose_the_checkpoint_key() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = config(tmp.path(), "", &["demo"], "");
        cfg.audit.checkpoint_key = Some("other".into());
        let backend = Arc::new(SoftBackend::new(&["demo", "other"]));
        let audit = Arc::new(AuditTrail::open(&cfg.audit, None).unwrap());
        let app = Arc::new(App::new(&cfg, backend.clone(), audit));
        rt().block_on(async {
            let mut next = cfg.clone();
            next.entities[0].status = crate::config::EntityStatus::Suspended;
            // The checkpoint key re-created: tested too, and said.
            backend.replace_key("other").unwrap();
            let changes = app.reload(&next).await.unwrap();
            assert_eq!(
                changes.to_string(),
                "1 entities; suspended: app1; checkpoint key re-keyed; pairwise test passed: checkpoint key"
            );
            // A certificate imported for a key, and limits changed.
            backend.set_certificate_chain("demo", vec![vec![0x30, 0x00]]);
            let mut limits = next.clone();
            limits.limits.max_batch_items += 1;
            let changes = app.reload(&limits).await.unwrap();
            assert_eq!(
                changes.to_string(),
                "1 entities; certificates changed: demo; settings changed: [limits]"
            );
            // Limits sized at start: not applied, so not claimed.
            let mut restart_only = limits.clone();
            restart_only.limits.max_handshakes += 1;
            restart_only.limits.max_inflight_body_bytes += 1;
            let changes = app.reload(&restart_only).await.unwrap();
            assert_eq!(changes.to_string(), "1 entities; no changes");
            // Deleted: checkpoints could not be signed any more.
            backend.delete_key("other");
            let e = app.reload(&cfg).await.unwrap_err();
            assert!(e.to_string().contains("audit checkpoints"), "{e}");
            assert_eq!(
                app.runtime().policy.entities()[0].config.status,
                crate::config::EntityStatus::Suspended,
                "the refused reload resumed no one"
            );
        });
    }

    #[test]
    fn the_entity_active_gauge_follows_suspension_and_removal() {
        let f = fixture("", &["demo"], "");
        let gauge = |app: &Arc<App>| {
            let page = String::from_utf8(app.metrics().render(app)).unwrap();
            page.lines()
                .find_map(|l| l.strip_prefix("svs_entity_active{entity=\"app1\"} "))
                .map(str::to_owned)
        };
        assert_eq!(gauge(&f.app).as_deref(), Some("1"));
        rt().block_on(async {
            let suspended = config(&f.dir, "", &["demo"], "status = \"suspended\"");
            f.app.reload(&suspended).await.unwrap();
            assert_eq!(gauge(&f.app).as_deref(), Some("0"));
            let mut none = config(&f.dir, "", &["demo"], "");
            none.entities.clear();
            let changes = f.app.reload(&none).await.unwrap();
            assert_eq!(changes.to_string(), "0 entities; removed: app1");
        });
        assert_eq!(gauge(&f.app), None, "a removed entity leaves the metric");
    }

    #[test]
    fn a_reload_cannot_expose_the_checkpoint_key_still_in_use() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = config(tmp.path(), "", &["demo"], "");
        cfg.audit.checkpoint_key = Some("other".into());
        let audit = Arc::new(AuditTrail::open(&cfg.audit, None).unwrap());
        let app = Arc::new(App::new(
            &cfg,
            Arc::new(SoftBackend::new(&["demo", "other"])),
            audit,
        ));
        rt().block_on(async {
            // The new file drops checkpoints and exposes the object: its own
            // check passes, the running key's does not.
            let next = config(tmp.path(), "a = { object = \"other\" }", &["demo", "a"], "");
            assert_eq!(next.audit.checkpoint_key, None);
            let e = app.reload(&next).await.unwrap_err();
            assert!(e.to_string().contains("audit checkpoints"), "{e}");
            assert!(!app.runtime().keys.contains_key("a"));
            app.reload(&config(tmp.path(), "", &["demo"], ""))
                .await
                .unwrap();
        });
    }

    #[test]
    fn a_reload_cannot_raise_max_body_bytes_past_the_budget() {
        let f = fixture("", &["demo"], "");
        let budget = f.app.runtime().limits.max_inflight_body_bytes;
        rt().block_on(async {
            let mut cfg = config(&f.dir, "", &["demo"], "");
            cfg.limits.max_inflight_body_bytes = budget * 2;
            cfg.limits.max_body_bytes = budget + 1;
            let e = f.app.reload(&cfg).await.unwrap_err();
            assert!(e.to_string().contains("changes only on restart"), "{e}");
            assert_eq!(
                f.app.runtime().limits.max_body_bytes,
                config(&f.dir, "", &["demo"], "").limits.max_body_bytes,
                "the old limits keep serving"
            );
            cfg.limits.max_body_bytes = budget;
            f.app.reload(&cfg).await.unwrap();
            assert_eq!(f.app.runtime().limits.max_body_bytes, budget);
        });
    }

    #[test]
    fn a_body_holds_what_arrived_within_its_entitys_half_of_the_budget() {
        let f = fixture("", &["demo"], "");
        let rt = f.app.runtime();
        let budget = rt.limits.max_inflight_body_bytes;
        let e = rt.policy.entities()[0].clone();
        // Nothing is held before a byte arrives.
        let mut stalled: Vec<_> = (0..1000)
            .map(|_| f.app.body_reservation(Some(&e), &rt.limits))
            .collect();
        assert_eq!(f.app.body_bytes_held(), 0);
        // One entity's bodies stop at half of the budget: its own refusal.
        stalled[0].grow(budget / 2 - 100).unwrap();
        assert_eq!(stalled[1].grow(200), Err(SvsError::TooManyConcurrent));
        stalled[1].grow(100).unwrap();
        assert_eq!(f.app.body_bytes_held(), budget / 2);
        // The rest of the budget is the others' (here a body of no
        // entity); past the whole budget, 503 server_busy.
        let mut others = f.app.body_reservation(None, &rt.limits);
        others.grow(budget / 2).unwrap();
        let Err(SvsError::ServerBusy { retry_after }) =
            f.app.body_reservation(None, &rt.limits).grow(1)
        else {
            panic!("over budget")
        };
        assert!(retry_after > Duration::ZERO);
        // A refused chunk is not counted; a dropped body gives all back.
        drop(others);
        assert_eq!(f.app.body_bytes_held(), budget / 2);
        stalled.clear();
        assert_eq!(f.app.body_bytes_held(), 0);
        let mut whole = f.app.body_reservation(Some(&e), &rt.limits);
        whole.grow(budget / 2).unwrap();
    }

    #[test]
    fn while_the_hsm_is_down_readiness_names_the_hsm_not_the_self_test_it_failed() {
        let f = fixture("", &["demo"], "");
        rt().block_on(async {
            f.app.run_selftests().await.unwrap();
            // The token pulled: signatures fail and so does the next run.
            f.backend.down.store(true, Ordering::SeqCst);
            f.backend.soft.fail.store(true, Ordering::SeqCst);
            assert!(f.app.run_selftests().await.is_err());
            assert!(matches!(
                f.app.readiness(),
                Err(SvsError::NotReady(NotReady::HsmUnavailable, _))
            ));
            // Back: the failed run is what stands until the next one.
            f.backend.down.store(false, Ordering::SeqCst);
            f.backend.soft.fail.store(false, Ordering::SeqCst);
            assert!(matches!(
                f.app.readiness(),
                Err(SvsError::NotReady(NotReady::SelftestsFailed, _))
            ));
            f.app.run_selftests().await.unwrap();
            f.app.readiness().unwrap();
        });
    }

    #[test]
    fn a_self_test_run_that_ends_after_a_later_one_recorded_does_not_overwrite_it() {
        let f = fixture("", &["demo"], "");
        // A periodic run starts (the HSM is slow), then a reload's re-run
        // starts, passes and records; then the periodic one fails late.
        let periodic = f.app.next_selftest_run();
        let rerun = f.app.next_selftest_run();
        assert!(f.app.set_selftest_of(rerun, Ok(())));
        assert!(!f.app.set_selftest_of(periodic, Err("late".into())));
        f.app.readiness().unwrap();
        // A later run's verdict does count.
        let next = f.app.next_selftest_run();
        assert!(f.app.set_selftest_of(next, Err("wrong answer".into())));
        assert!(f.app.selftest_failed());
    }

    #[test]
    fn an_unwritable_audit_trail_is_not_a_failed_self_test() {
        let f = fixture("", &["demo"], "");
        let sign = json!({"key": "demo", "data": "aGk="});
        rt().block_on(async {
            f.app.run_selftests().await.unwrap();
            std::fs::remove_dir_all(f.dir.join("audit")).unwrap();
            let r = call(&f.app, Route::Sign, &sign).await;
            assert_eq!(r.body["error"]["code"], "audit_unavailable", "{r:?}");
            // The token still computes right answers; readiness names the
            // trail, not the self-tests.
            f.app
                .run_periodic_selftests(Duration::from_millis(1))
                .await
                .unwrap();
            let e = f.app.readiness().unwrap_err();
            assert!(matches!(e, SvsError::AuditUnavailable(_)), "{e}");
            let r = call(&f.app, Route::Sign, &sign).await;
            assert_eq!(r.body["error"]["code"], "audit_unavailable", "{r:?}");
            // Both answered 503, both counted so: the first was signed, but
            // its record could not be written.
            let page = String::from_utf8(f.app.metrics().render(&f.app)).unwrap();
            let counted: Vec<_> = page
                .lines()
                .filter(|l| l.starts_with("svs_requests_total{") && !l.ends_with(" 0"))
                .collect();
            assert!(
                counted
                    .iter()
                    .all(|l| l.contains(r#"outcome="audit_unavailable""#)),
                "{counted:?}"
            );
            let total: f64 = counted
                .iter()
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            assert_eq!(total, 2.0, "{counted:?}");
        });
    }

    /// The series an alert takes `increase()` of exist at 0 before their
    /// first event, for the configuration at start and after a reload.
    #[test]
    fn counters_of_configured_entities_and_keys_start_at_zero() {
        let f = fixture("other = { object = \"other\" }", &["demo"], "");
        let page = |app: &App| String::from_utf8(app.metrics().render(app)).unwrap();
        let zero = |page: &str, series: &str| {
            assert!(
                page.lines().any(|l| l == format!("{series} 0")),
                "{series} in {page}"
            );
        };
        let absent = |page: &str, series: &str| {
            assert!(!page.contains(series), "{series} in {page}");
        };
        let text = page(&f.app);
        for series in [
            r#"svs_rate_limited_total{entity="app1",reason="rate"}"#,
            r#"svs_rate_limited_total{entity="app1",reason="concurrency"}"#,
            r#"svs_rate_limited_total{entity="app1",reason="anomaly"}"#,
            r#"svs_connections_refused_total{entity="app1"}"#,
            r#"svs_requests_total{entity="app1",key="demo",operation="sign",outcome="ok"}"#,
            r#"svs_requests_total{entity="app1",key="demo",operation="verify",outcome="valid"}"#,
            r#"svs_requests_total{entity="_unknown",key="_none",operation="sign",outcome="unauthenticated"}"#,
            r#"svs_key_operations_total{key="other",operation="sign"}"#,
            r#"svs_hsm_recoveries_total{class="relogin"}"#,
        ] {
            zero(&text, series);
        }
        // Error outcomes come with their first event.
        absent(&text, r#"outcome="invalid""#);
        // Only what the entity may do: not a key it is not granted.
        absent(&text, r#"entity="app1",key="other""#);

        let mut next = config(
            &f.dir,
            "other = { object = \"other\" }",
            &["demo", "other"],
            "",
        );
        next.entities[0].operations.remove(&Operation::Verify);
        rt().block_on(f.app.reload(&next)).unwrap();
        let text = page(&f.app);
        zero(
            &text,
            r#"svs_requests_total{entity="app1",key="other",operation="sign",outcome="ok"}"#,
        );
        absent(&text, r#"entity="app1",key="other",operation="verify""#);
    }

    #[test]
    fn server_side_failures_are_no_error_of_the_entity() {
        let f = fixture("", &["demo"], "");
        let e = f.app.runtime().policy.entities()[0].clone();
        rt().block_on(async {
            for server_side in [
                SvsError::ServerBusy {
                    retry_after: Duration::from_secs(1),
                },
                SvsError::HsmUnavailable("down".into()),
                SvsError::AuditUnavailable("full".into()),
            ] {
                f.app.refuse(&Route::Sign, Some(&e), &server_side).await;
            }
            assert_eq!(e.traffic().pending(), (3, 0));
            f.app
                .refuse(&Route::Sign, Some(&e), &SvsError::UnsupportedMediaType)
                .await;
            assert_eq!(e.traffic().pending(), (4, 1));
            // A sign item the HSM was too busy for: answered 503, counted
            // as a request, not as the entity's error.
            f.app.run_selftests().await.unwrap();
            f.backend.busy.store(1, Ordering::SeqCst);
            let reply = call(&f.app, Route::Sign, &json!({"key": "demo", "data": "aGk="})).await;
            assert_eq!(reply.body["error"]["code"], "hsm_busy", "{reply:?}");
            assert_eq!(e.traffic().pending(), (5, 1));
            let reply = call(&f.app, Route::Sign, &json!({"key": "nope", "data": "aGk="})).await;
            assert_eq!(reply.status, 404);
            assert_eq!(e.traffic().pending(), (6, 2));
        });
    }

    #[test]
    fn connections_count_per_entity_and_for_unknown_clients_together() {
        let f = fixture("", &["demo"], "");
        let mut limits = f.app.runtime().limits.clone();
        limits.max_connections_per_entity = 3;
        limits.max_unknown_connections = 2;
        let e = f.app.runtime().policy.entities()[0].clone();
        let mine: Vec<_> = (0..3)
            .map(|_| f.app.connection_slot(Some(&e), &limits).unwrap())
            .collect();
        assert!(f.app.connection_slot(Some(&e), &limits).is_none());
        // Unknown clients have their own group, whatever the entities hold.
        let unknown: Vec<_> = (0..2)
            .map(|_| f.app.connection_slot(None, &limits).unwrap())
            .collect();
        assert!(f.app.connection_slot(None, &limits).is_none());
        assert_eq!(f.app.unknown_connections(), 2);
        drop(unknown);
        assert_eq!(f.app.unknown_connections(), 0);
        drop(mine);
        assert!(f.app.connection_slot(Some(&e), &limits).is_some());
    }
}
