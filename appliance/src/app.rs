//! The request handlers and the daemon's shared state: policy (swapped on
//! reload), the signing backend, the audit trail, readiness and self-tests.
//! Transport-free: [`crate::server`] feeds it parsed requests.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use serde_json::json;
use svs_hsm::KeyInfo;
use svs_hsm::signature::{DEFAULT_SM2_ID, SoftwareVerifier};

use crate::anomaly::{AnomalyConfig, Flip};
use crate::api::{
    self, BatchRequest, Encoding, Input, SignRequest, SignResponse, VerifyRequest, VerifyResponse,
};
use crate::audit::{AuditEvent, AuditTrail};
use crate::backend::SigningBackend;
use crate::config::{Config, KeyExposure, Limits, Operation};
use crate::error::SvsError;
use crate::metrics::{self, Metrics};
use crate::policy::{ClientIdentity, Entity, Policy};

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
    pub fn key_label<'a>(&'a self, key: Option<&'a str>) -> &'a str {
        match key {
            None => metrics::NONE,
            Some(k) if self.keys.contains_key(k) => k,
            Some(_) => metrics::UNKNOWN,
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
}

impl Reply {
    fn ok(body: serde_json::Value) -> Reply {
        Reply {
            status: 200,
            body,
            retry_after: None,
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
        }
    }
}

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

/// Every (method, path template) served; the OpenAPI test checks the
/// document against this list.
pub const ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/sign"),
    ("post", "/v1/sign/batch"),
    ("post", "/v1/verify"),
    ("post", "/v1/verify/batch"),
    ("get", "/v1/keys"),
    ("get", "/v1/keys/{name}"),
    ("get", "/healthz"),
    ("get", "/readyz"),
];

impl Route {
    /// Finds the route; 404 or 405 otherwise.
    pub fn parse(method: &str, path: &str) -> Result<Route, SvsError> {
        let (route, wants) = match path {
            "/v1/sign" => (Route::Sign, "POST"),
            "/v1/sign/batch" => (Route::SignBatch, "POST"),
            "/v1/verify" => (Route::Verify, "POST"),
            "/v1/verify/batch" => (Route::VerifyBatch, "POST"),
            "/v1/keys" => (Route::Keys, "GET"),
            "/healthz" => (Route::Healthz, "GET"),
            "/readyz" => (Route::Readyz, "GET"),
            p => match p.strip_prefix("/v1/keys/") {
                Some(name) if !name.is_empty() && !name.contains('/') => {
                    (Route::Key(name.to_owned()), "GET")
                }
                _ => return Err(SvsError::NotFound),
            },
        };
        if method == wants || (wants == "GET" && method == "HEAD") {
            Ok(route)
        } else {
            Err(SvsError::MethodNotAllowed)
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

/// Counters exported by `/metrics`-style logging and the benchmark.
#[derive(Debug, Default)]
pub struct Counters {
    /// Signatures handed out.
    pub signatures: AtomicU64,
    /// Verifications answered.
    pub verifications: AtomicU64,
    /// Operations refused or failed.
    pub errors: AtomicU64,
    /// Self-test runs that failed.
    pub selftest_failures: AtomicU64,
}

/// Shared state of the daemon.
pub struct App {
    backend: Arc<dyn SigningBackend>,
    verifier: SoftwareVerifier,
    runtime: RwLock<Arc<Runtime>>,
    audit: Arc<AuditTrail>,
    selftest: Mutex<Result<(), String>>,
    draining: AtomicBool,
    metrics: Arc<Metrics>,
    /// Counters.
    pub counters: Counters,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").finish_non_exhaustive()
    }
}

/// One batch item's outcome: its JSON and its audit record.
type ItemResult = (Result<serde_json::Value, SvsError>, AuditEvent);

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
        App {
            backend,
            verifier: SoftwareVerifier::new(),
            runtime: RwLock::new(Arc::new(Runtime {
                policy: Policy::new(&config.entities, None),
                keys: config.keys.clone(),
                limits: config.limits.clone(),
                anomaly: config.anomaly.clone(),
            })),
            audit,
            selftest: Mutex::new(Err("self-tests have not run yet".into())),
            draining: AtomicBool::new(false),
            metrics,
            counters: Counters::default(),
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

    /// Checks that every exposed key exists in the backend.
    pub fn check_keys(&self, keys: &BTreeMap<String, KeyExposure>) -> Result<(), SvsError> {
        let missing: Vec<String> = keys
            .iter()
            .filter(|(_, k)| self.backend.key(&k.object).is_none())
            .map(|(name, k)| format!("[keys] {name:?}: token object {:?} not found", k.object))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(SvsError::Config(missing))
        }
    }

    /// Installs the entities, keys and limits of a new, valid configuration.
    /// Limiter state carries over; requests in flight finish under the old.
    pub fn reload(&self, config: &Config) -> Result<(), SvsError> {
        self.check_keys(&config.keys)?;
        let mut slot = self.runtime.write().unwrap_or_else(|p| p.into_inner());
        let policy = Policy::new(&config.entities, Some(&slot.policy));
        *slot = Arc::new(Runtime {
            policy,
            keys: config.keys.clone(),
            limits: config.limits.clone(),
            anomaly: config.anomaly.clone(),
        });
        Ok(())
    }

    /// Marks the daemon as draining: /readyz fails so balancers move away.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Records a self-test result.
    pub fn set_selftest(&self, result: Result<(), String>) {
        self.metrics.selftest(result.is_ok());
        if let Err(why) = &result {
            self.counters
                .selftest_failures
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!(reason = %why, "ALARM self-test failed: not ready, signing refused");
        }
        *self.selftest.lock().unwrap_or_else(|p| p.into_inner()) = result;
    }

    /// Ready to sign: self-tests passed, HSM up, audit writable, not draining.
    pub fn readiness(&self) -> Result<(), SvsError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(SvsError::ShuttingDown);
        }
        self.selftest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .map_err(SvsError::NotReady)?;
        self.backend.health().map_err(SvsError::NotReady)?;
        self.audit.check()
    }

    /// Entity for a client, refused unless known and active.
    pub fn entity(&self, client: Option<&ClientIdentity>) -> Result<Arc<Entity>, SvsError> {
        let client = client.ok_or(SvsError::Unauthenticated)?;
        let e = self.runtime().policy.identify(client)?;
        e.check_active()?;
        Ok(e)
    }

    /// Checks done before the body is read: route, method, client.
    pub fn precheck(
        &self,
        route: &Route,
        client: Option<&ClientIdentity>,
        content_type: Option<&str>,
    ) -> Result<(), SvsError> {
        if route.is_probe() {
            return Ok(());
        }
        // Identified even when suspended, so the refusal counts for the entity.
        let found = client
            .ok_or(SvsError::Unauthenticated)
            .and_then(|c| self.runtime().policy.identify(c));
        let result = found.as_ref().map_err(Clone::clone).and_then(|e| {
            e.check_active()?;
            let json = content_type
                .and_then(|c| c.split(';').next())
                .is_some_and(|c| c.trim().eq_ignore_ascii_case("application/json"));
            if route.has_body() && !json {
                return Err(SvsError::UnsupportedMediaType);
            }
            Ok(())
        });
        if let (Err(e), Some(op)) = (&result, route.operation()) {
            self.refused(found.ok().as_deref(), op, e);
        }
        result
    }

    /// Counts a request refused before its items were looked at.
    fn refused(&self, entity: Option<&Entity>, op: Operation, e: &SvsError) {
        let name = entity.map_or(metrics::UNKNOWN, Entity::name);
        self.metrics
            .operation(op.as_str(), name, metrics::NONE, e.wire().code);
        if let Some(entity) = entity {
            entity.traffic().record(1, 1);
        }
    }

    /// Counts one finished item: metrics and the entity's traffic.
    fn observed(&self, entity: &Entity, rt: &Runtime, ev: &AuditEvent) {
        let key = rt.key_label(ev.key.as_deref());
        self.metrics
            .operation(ev.op, entity.name(), key, &ev.outcome);
        let failed = !matches!(ev.outcome.as_str(), "ok" | "valid" | "invalid");
        entity.traffic().record(1, u64::from(failed));
    }

    /// Handles one request whose body has been read.
    pub async fn handle(
        self: &Arc<Self>,
        route: Route,
        client: Option<&ClientIdentity>,
        body: &[u8],
    ) -> Reply {
        match self.dispatch(route, client, body).await {
            Ok(r) => r,
            Err(e) => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                Reply::from(e)
            }
        }
    }

    async fn dispatch(
        self: &Arc<Self>,
        route: Route,
        client: Option<&ClientIdentity>,
        body: &[u8],
    ) -> Result<Reply, SvsError> {
        match route {
            Route::Healthz => Ok(Reply::ok(json!({"status": "alive"}))),
            Route::Readyz => self
                .readiness()
                .map(|()| Reply::ok(json!({"status": "ready"}))),
            Route::Keys => {
                let e = self.entity(client)?;
                let rt = self.runtime();
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
                let e = self.entity(client)?;
                let rt = self.runtime();
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
                self.operation(route, client, body).await
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
        client: Option<&ClientIdentity>,
        body: &[u8],
    ) -> Result<Reply, SvsError> {
        let op = match route {
            Route::Sign | Route::SignBatch => Operation::Sign,
            _ => Operation::Verify,
        };
        let batch = matches!(route, Route::SignBatch | Route::VerifyBatch);
        let entity = self
            .entity(client)
            .inspect_err(|e| self.refused(None, op, e))?;
        let rt = self.runtime();
        let (items, _in_flight) = self
            .admit(&entity, &rt, batch, op, body)
            .inspect_err(|e| self.refused(Some(&entity), op, e))?;
        let results: Vec<ItemResult> = match op {
            Operation::Sign => self.sign_items(&entity, &rt, items).await,
            Operation::Verify => self.verify_items(&entity, &rt, items).await?,
        };
        for (_, ev) in &results {
            self.observed(&entity, &rt, ev);
        }
        let (values, events): (Vec<_>, Vec<_>) = results.into_iter().unzip();
        // The answer leaves only once its records are on disk.
        self.audit.append(events).await?;
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

    /// Everything between identification and the items: operation granted,
    /// body parsed, limits and anomaly throttle, readiness.
    fn admit(
        &self,
        entity: &Entity,
        rt: &Runtime,
        batch: bool,
        op: Operation,
        body: &[u8],
    ) -> Result<(Vec<serde_json::Value>, crate::policy::InFlight), SvsError> {
        entity.check_operation(op)?;
        // Parse first: the item count decides how many tokens to take.
        let items = if batch {
            let b: BatchRequest = api::from_json(body)?;
            if b.items.len() > rt.limits.max_batch_items {
                return Err(SvsError::BatchTooLarge {
                    got: b.items.len(),
                    max: rt.limits.max_batch_items,
                });
            }
            if b.items.is_empty() {
                return Err(SvsError::InvalidRequest("items must not be empty".into()));
            }
            b.items
        } else {
            vec![
                serde_json::from_slice(body)
                    .map_err(|_| SvsError::MalformedRequest("body is not valid JSON".into()))?,
            ]
        };
        let in_flight = entity.admit(items.len()).inspect_err(|e| {
            let reason = match e {
                SvsError::TooManyConcurrent => "concurrency",
                _ => "rate",
            };
            self.metrics.rate_limited(entity.name(), reason);
        })?;
        if rt.anomaly.enabled {
            entity
                .traffic()
                .admit(items.len(), Instant::now())
                .inspect_err(|_| self.metrics.rate_limited(entity.name(), "anomaly"))?;
        }
        // Nothing is signed unaudited, nor while self-tests fail.
        match op {
            Operation::Sign => self.readiness()?,
            Operation::Verify => self.audit.check()?,
        }
        Ok((items, in_flight))
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

    async fn sign_items(
        self: &Arc<Self>,
        entity: &Arc<Entity>,
        rt: &Arc<Runtime>,
        items: Vec<serde_json::Value>,
    ) -> Vec<ItemResult> {
        let mut set = tokio::task::JoinSet::new();
        let n = items.len();
        for (i, item) in items.into_iter().enumerate() {
            let app = self.clone();
            let entity = entity.clone();
            let rt = rt.clone();
            set.spawn(async move { (i, app.sign_one(&entity, &rt, item).await) });
        }
        let mut out: Vec<Option<ItemResult>> = (0..n).map(|_| None).collect();
        while let Some(joined) = set.join_next().await {
            if let Ok((i, r)) = joined {
                out[i] = Some(r);
            }
        }
        out.into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    let e = SvsError::Internal("sign task failed".into());
                    let mut ev = Self::event(entity, Operation::Sign, None);
                    ev.outcome = e.wire().code.into();
                    (Err(e), ev)
                })
            })
            .collect()
    }

    async fn sign_one(&self, entity: &Entity, rt: &Runtime, item: serde_json::Value) -> ItemResult {
        let start = Instant::now();
        let mut ev = Self::event(entity, Operation::Sign, None);
        let result = self.sign_inner(entity, rt, item, &mut ev).await;
        ev.latency_us = micros(start);
        match result {
            Ok(resp) => {
                self.counters.signatures.fetch_add(1, Ordering::Relaxed);
                ev.outcome = "ok".into();
                (Ok(serde_json::to_value(resp).unwrap_or_default()), ev)
            }
            Err(e) => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                ev.outcome = e.wire().code.into();
                (Err(e), ev)
            }
        }
    }

    async fn sign_inner(
        &self,
        entity: &Entity,
        rt: &Runtime,
        item: serde_json::Value,
        ev: &mut AuditEvent,
    ) -> Result<SignResponse, SvsError> {
        let req: SignRequest = api::from_value(item)?;
        ev.key = Some(req.key.clone());
        let (info, object) = self.resolve_key(entity, rt, &req.key, Operation::Sign)?;
        let input = Input::decode(
            req.data.as_deref(),
            req.digest.as_deref(),
            req.id.as_deref(),
            DEFAULT_SM2_ID,
        )?;
        ev.input_sm3 = Some(input.audit_digest());
        let digest = match &input {
            Input::Digest(d) => *d,
            Input::Data { data, id } => self
                .verifier
                .digest(info.algorithm, &info.public_point, id, data)
                .map_err(SvsError::from)?,
        };
        let raw = self.backend.sign_digest(&object, digest).await?;
        let encoding = req.encoding.unwrap_or_default();
        let sig = api::encode_signature(&raw, encoding);
        ev.output_sm3 = Some(crate::audit::sm3(&sig));
        Ok(SignResponse {
            key: req.key,
            signature: api::to_b64(&sig),
            encoding,
        })
    }

    fn resolve_key(
        &self,
        entity: &Entity,
        rt: &Runtime,
        name: &str,
        op: Operation,
    ) -> Result<(Arc<KeyInfo>, String), SvsError> {
        let exposure = rt
            .keys
            .get(name)
            .ok_or_else(|| SvsError::UnknownKey(name.to_owned()))?;
        entity.check_key(name, op)?;
        let info = self
            .backend
            .key(&exposure.object)
            .ok_or_else(|| SvsError::UnknownKey(name.to_owned()))?;
        Ok((info, exposure.object.clone()))
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
                self.counters.verifications.fetch_add(1, Ordering::Relaxed);
                ev.outcome = if valid { "valid" } else { "invalid" }.into();
                (
                    Ok(serde_json::to_value(VerifyResponse { valid }).unwrap_or_default()),
                    ev,
                )
            }
            Err(e) => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
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
        let point = match (&req.key, &req.public_key, &req.certificate) {
            (Some(k), None, None) => {
                ev.key = Some(k.clone());
                self.resolve_key(entity, rt, k, Operation::Verify)?
                    .0
                    .public_point
                    .clone()
            }
            (None, Some(pk), None) => api::public_key_field(pk)?,
            (None, None, Some(c)) => api::certificate_field(c)?,
            _ => {
                return Err(SvsError::InvalidRequest(
                    "give exactly one of key, public_key, certificate".into(),
                ));
            }
        };
        let input = Input::decode(
            req.data.as_deref(),
            req.digest.as_deref(),
            req.id.as_deref(),
            DEFAULT_SM2_ID,
        )?;
        ev.input_sm3 = Some(input.audit_digest());
        let raw = api::decode_signature(&req.signature, req.encoding.unwrap_or(Encoding::Der))?;
        let algorithm = svs_hsm::Algorithm::Sm2;
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
        let result = self.selftests().await;
        let detail = match &result {
            Ok(()) => "passed".to_string(),
            Err(e) => format!("failed: {e}"),
        };
        if let Err(e) = self.audit.note("selftest", detail).await {
            tracing::error!(error = %e, "cannot record the self-test in the audit trail");
        }
        self.set_selftest(result.clone());
        result
    }

    async fn selftests(&self) -> Result<(), String> {
        // GB/T 32905 example 1: SM3("abc").
        const SM3_ABC: [u8; 32] = [
            0x66, 0xc7, 0xf0, 0xf4, 0x62, 0xee, 0xed, 0xd9, 0xd1, 0xf2, 0xd4, 0x6b, 0xdc, 0x10,
            0xe4, 0xe2, 0x41, 0x67, 0xc4, 0x87, 0x5c, 0xf2, 0xf7, 0xa2, 0x29, 0x7d, 0xa0, 0x2b,
            0x8f, 0x4b, 0xa8, 0xe0,
        ];
        if crate::audit::sm3(b"abc") != SM3_ABC {
            return Err("SM3 known-answer test failed".into());
        }
        self.audit.check().map_err(|e| e.to_string())?;
        let rt = self.runtime();
        let message = b"SVS self-test: SM2 pairwise consistency";
        for (name, k) in &rt.keys {
            let info = self
                .backend
                .key(&k.object)
                .ok_or_else(|| format!("key {name:?}: token object {:?} not found", k.object))?;
            let digest = self
                .verifier
                .digest(info.algorithm, &info.public_point, DEFAULT_SM2_ID, message)
                .map_err(|e| format!("key {name:?}: {e}"))?;
            let raw = self
                .backend
                .sign_digest(&k.object, digest)
                .await
                .map_err(|e| format!("key {name:?}: sign: {e}"))?;
            if !crate::backend::verify_raw(&self.verifier, &info, &digest, &raw) {
                return Err(format!(
                    "key {name:?}: pairwise test signature does not verify"
                ));
            }
            let mut wrong = digest;
            wrong[0] ^= 1;
            if crate::backend::verify_raw(&self.verifier, &info, &wrong, &raw) {
                return Err(format!("key {name:?}: verification accepts a wrong digest"));
            }
        }
        Ok(())
    }

    /// Signs the audit chain head with the audit key and appends the checkpoint.
    pub async fn checkpoint(&self, audit_object: &str) -> Result<u64, SvsError> {
        let (seq, head) = self.audit.head().await?;
        let info = self
            .backend
            .key(audit_object)
            .ok_or_else(|| SvsError::UnknownKey(audit_object.to_owned()))?;
        let message = crate::audit::checkpoint_message(seq, &head);
        let digest = self
            .verifier
            .digest(info.algorithm, &info.public_point, DEFAULT_SM2_ID, &message)
            .map_err(SvsError::from)?;
        let raw = self.backend.sign_digest(audit_object, digest).await?;
        self.audit
            .checkpoint(
                seq,
                head,
                audit_object.to_owned(),
                svs_hsm::signature::raw_to_der(&raw),
            )
            .await?;
        Ok(seq)
    }
}
