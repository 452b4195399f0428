//! Prometheus metrics (docs/monitoring.md): the registry, what the request
//! path and the HSM pool count, and what a scrape reads from the daemon's
//! state.
//!
//! Cardinality stays bounded: an `entity` label is a configured entity name
//! or [`UNKNOWN`]; a `key` label is a configured key name, [`UNKNOWN`] for a
//! name the client made up, or [`NONE`]; `outcome` and `code` come from the
//! fixed error table; HSM labels are `&'static str`s of svs-hsm or one of a
//! capped set of mechanism numbers. Nothing a client sends verbatim, and no
//! personal data (certificate subjects, addresses), becomes a label.
//!
//! The request path only touches atomics and the metric vectors' read
//! locks. A scrape refreshes gauges and encodes the text on a blocking
//! thread, serialised by its own lock, so a slow or busy scraper never
//! holds anything the signing path waits for.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use der::Decode;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use serde::Deserialize;
use svs_hsm::{HealthState, HsmMetrics, RvClass};

use crate::app::App;
use crate::config::{EntityStatus, Operation};
use crate::error::SvsError;

/// Label value for an entity or key that is not configured.
pub const UNKNOWN: &str = "_unknown";
/// Label value where there is no key (verification with a given public key,
/// or a request refused before its key was read).
pub const NONE: &str = "_none";
/// Outcome of a request whose client went away before its body was in: no
/// error code, as no answer was made (docs/monitoring.md).
pub const CLIENT_CLOSED: &str = "client_closed";
/// The status `svs_http_requests_total` counts for a request that got no
/// answer because its client went away (nginx's "client closed request";
/// never sent).
pub const CLIENT_CLOSED_STATUS: u16 = 499;

/// Why an entity's request was refused by its limits: the `reason` of
/// `svs_rate_limited_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitReason {
    /// Its token bucket is empty.
    Rate,
    /// Its requests in flight, or the body bytes they hold, are at its cap.
    Concurrency,
    /// The anomaly throttle holds it to its baseline.
    Anomaly,
}

impl LimitReason {
    const ALL: [LimitReason; 3] = [
        LimitReason::Rate,
        LimitReason::Concurrency,
        LimitReason::Anomaly,
    ];

    fn as_str(self) -> &'static str {
        match self {
            LimitReason::Rate => "rate",
            LimitReason::Concurrency => "concurrency",
            LimitReason::Anomaly => "anomaly",
        }
    }
}

/// Default metrics address: loopback, Prometheus' exporter port range.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9464";

/// Families [`Metrics::render_waiting`] shows (besides `process_*`).
const WAITING_FAMILIES: &[&str] = &[
    "svs_build_info",
    "svs_ready",
    "svs_not_ready_reason",
    "svs_tls_handshake_failures_total",
];

/// Most distinct mechanism numbers given their own label value.
const MAX_MECHANISMS: usize = 16;

/// `[metrics]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Where /metrics is served; none when disabled.
    pub listen: Option<SocketAddr>,
    /// TLS for the metrics listener; plain HTTP when none.
    pub tls: Option<MetricsTls>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: DEFAULT_LISTEN.parse().ok(),
            tls: None,
        }
    }
}

/// TLS files of the metrics listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsTls {
    /// Server certificate chain, PEM.
    pub certificate: PathBuf,
    /// Its private key, PEM.
    pub private_key: PathBuf,
    /// When set, scrapers must present a certificate chaining to this bundle.
    pub client_ca: Option<PathBuf>,
}

/// `[metrics]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMetrics {
    enabled: Option<bool>,
    listen: Option<String>,
    tls: Option<RawMetricsTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetricsTls {
    certificate: PathBuf,
    private_key: PathBuf,
    client_ca: Option<PathBuf>,
}

impl MetricsConfig {
    /// Stage two of `[metrics]`; relative paths are relative to `base`.
    pub(crate) fn from_raw(raw: RawMetrics, base: &Path, errors: &mut Vec<String>) -> Self {
        let at = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let listen_text = raw.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen = match listen_text.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                errors.push(format!("[metrics] listen: {listen_text:?} is not ip:port"));
                None
            }
        };
        MetricsConfig {
            listen: if raw.enabled.unwrap_or(true) {
                listen
            } else {
                None
            },
            tls: raw.tls.map(|t| MetricsTls {
                certificate: at(t.certificate),
                private_key: at(t.private_key),
                client_ca: t.client_ca.map(at),
            }),
        }
    }
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let v = IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| bug(name, e));
    register(r, v.clone());
    v
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let v = GaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| bug(name, e));
    register(r, v.clone());
    v
}

fn int_gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let v = IntGaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| bug(name, e));
    register(r, v.clone());
    v
}

fn int_gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let v = IntGauge::new(name, help).unwrap_or_else(|e| bug(name, e));
    register(r, v.clone());
    v
}

fn gauge(r: &Registry, name: &str, help: &str) -> Gauge {
    let v = Gauge::new(name, help).unwrap_or_else(|e| bug(name, e));
    register(r, v.clone());
    v
}

fn histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let v = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .unwrap_or_else(|e| bug(name, e));
    register(r, v.clone());
    v
}

/// Names and label sets are constants of this file, so a failure to build
/// or register one is a programming error that every test run would show.
fn bug<T>(name: &str, e: prometheus::Error) -> T {
    panic!("metric {name}: {e}")
}

/// The text exposition format of `families`.
fn encode(families: &[prometheus::proto::MetricFamily]) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 << 10);
    if let Err(e) = TextEncoder::new().encode(families, &mut out) {
        tracing::error!(error = %e, "cannot encode metrics");
    }
    out
}

fn register<C: prometheus::core::Collector + 'static>(r: &Registry, c: C) {
    if let Err(e) = r.register(Box::new(c)) {
        bug::<()>("registration", e);
    }
}

/// Latency buckets for requests and HSM calls, in seconds: 0.5 ms to 10 s.
/// 0.1 s is a bucket boundary because the shipped SLO alert is defined on it,
/// 2 ms because it is the p99 svsd is benchmarked against at half of peak.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// fsync and queue-wait buckets: 50 µs to 5 s.
const SHORT_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
];

/// A histogram for the audit writer's fsyncs, made before the registry
/// exists (the trail is opened on its own) and registered later.
pub fn fsync_histogram() -> Histogram {
    Histogram::with_opts(
        HistogramOpts::new(
            "svs_audit_fsync_duration_seconds",
            "Duration of one audit group commit (write and fsync).",
        )
        .buckets(SHORT_BUCKETS.to_vec()),
    )
    .unwrap_or_else(|e| bug("svs_audit_fsync_duration_seconds", e))
}

/// The daemon's metrics.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    http_requests: IntCounterVec,
    request_seconds: HistogramVec,
    rate_limited: IntCounterVec,
    refusals_suppressed: IntCounterVec,
    tls_handshake_failures: IntCounterVec,
    connections_over_cap: IntCounterVec,
    entity_connections: IntGaugeVec,
    config_reloads: IntCounterVec,
    config_reload_ok: IntGauge,
    key_usage: IntCounterVec,
    hsm_seconds: HistogramVec,
    hsm_errors: IntCounterVec,
    hsm_recoveries: IntCounterVec,
    hsm_queue_depth: IntGauge,
    hsm_queue_wait: Histogram,
    hsm_in_use: AtomicUsize,
    hsm_sessions: IntGaugeVec,
    hsm_health: IntGaugeVec,
    hsm_logged_in: IntGauge,
    hsm_stuck: IntGauge,
    hsm_user_pin: IntGaugeVec,
    hsm_last_success: Gauge,
    selftest_ok: IntGauge,
    selftest_failures: IntCounter,
    selftest_last: Gauge,
    ready: IntGauge,
    not_ready_reason: IntGaugeVec,
    audit_writable: IntGauge,
    cert_expiry: GaugeVec,
    tls_expiry: GaugeVec,
    entity_anomaly: IntGaugeVec,
    entity_rate: GaugeVec,
    entity_error_ratio: GaugeVec,
    entity_throttled: IntGaugeVec,
    entity_active: IntGaugeVec,
    entities: IntGauge,
    mechanisms: Mutex<Vec<u64>>,
    render: Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
}

/// notAfter of a DER certificate, in Unix seconds.
pub fn certificate_not_after(der: &[u8]) -> Option<f64> {
    let cert = x509_cert::Certificate::from_der(der).ok()?;
    Some(
        cert.tbs_certificate()
            .validity()
            .not_after
            .to_unix_duration()
            .as_secs_f64(),
    )
}

/// The earliest notAfter of the PEM certificates in `path`.
fn earliest_not_after(path: &Path) -> Option<f64> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    CertificateDer::pem_file_iter(path)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|c| certificate_not_after(&c))
        .min_by(f64::total_cmp)
}

/// The prometheus crate's process metrics, with `process_cpu_seconds_total`
/// to the clock tick: the crate (0.14) keeps it in an integer counter, so
/// the CPU panel of a lightly loaded svsd showed steps, or nothing.
#[cfg(target_os = "linux")]
struct ProcessMetrics(prometheus::process_collector::ProcessCollector);

#[cfg(target_os = "linux")]
impl prometheus::core::Collector for ProcessMetrics {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let mut families = self.0.collect();
        if let Some(seconds) = cpu_seconds() {
            for f in &mut families {
                if f.name() == "process_cpu_seconds_total" {
                    for m in f.mut_metric() {
                        let mut counter = prometheus::proto::Counter::default();
                        counter.set_value(seconds);
                        m.set_counter(counter);
                    }
                }
            }
        }
        families
    }
}

/// This process's user and system CPU time, from `/proc/self/stat`.
#[cfg(target_os = "linux")]
fn cpu_seconds() -> Option<f64> {
    cpu_seconds_of(
        &std::fs::read_to_string("/proc/self/stat").ok()?,
        rustix::param::clock_ticks_per_second(),
    )
}

/// `utime + stime` of a `/proc/<pid>/stat` line, in seconds. The fields
/// are counted after the command name, which may hold spaces and `)`.
fn cpu_seconds_of(stat: &str, ticks_per_second: u64) -> Option<f64> {
    let after_name = stat.get(stat.rfind(')')? + 2..)?;
    let mut fields = after_name.split(' ');
    // utime and stime are fields 14 and 15 of the line, the name field 2.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / ticks_per_second.max(1) as f64)
}

impl Metrics {
    /// A registry with every metric (process metrics included on Linux).
    pub fn new() -> Metrics {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        register(
            &r,
            ProcessMetrics(prometheus::process_collector::ProcessCollector::for_self()),
        );
        let build = IntGaugeVec::new(
            Opts::new("svs_build_info", "Build of svsd (value is always 1)."),
            &["version"],
        )
        .unwrap_or_else(|e| bug("svs_build_info", e));
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        register(&r, build);
        let hsm_sessions = int_gauge_vec(
            &r,
            "svs_hsm_sessions",
            "HSM pool sessions by state (in_use: running a job; idle: open, waiting).",
            &["state"],
        );
        let tls_handshake_failures = counter_vec(
            &r,
            "svs_tls_handshake_failures_total",
            "Connections closed before they were served, by listener (api, metrics) and reason: refused (TLS handshake failed), timeout (handshake not done in time), no_slot (no connection slot came free in time), source_busy (the client's address held its share of a contended listener's slots).",
            &["listener", "reason"],
        );
        // Every series exists from the start, so that rate() and increase()
        // see the first failure instead of a series appearing at 1.
        {
            use crate::server::{API_LISTENER, HandshakeFailure as F, METRICS_LISTENER};
            for (listener, reason) in [
                (API_LISTENER, F::Refused),
                (API_LISTENER, F::Timeout),
                (API_LISTENER, F::NoSlot),
                (API_LISTENER, F::SourceBusy),
                // Its connection slot is taken before the handshake.
                (METRICS_LISTENER, F::Refused),
                (METRICS_LISTENER, F::Timeout),
                (METRICS_LISTENER, F::SourceBusy),
            ] {
                tls_handshake_failures.with_label_values(&[listener, reason.as_str()]);
            }
        }
        let config_reloads = counter_vec(
            &r,
            "svs_config_reloads_total",
            "SIGHUP reloads by result: applied, or refused (the previous configuration keeps serving).",
            &["result"],
        );
        for result in ["applied", "refused"] {
            config_reloads.with_label_values(&[result]);
        }
        let config_reload_ok = int_gauge(
            &r,
            "svs_config_last_reload_successful",
            "0 while the last SIGHUP reload was refused; 1 after a reload was applied, and from start.",
        );
        config_reload_ok.set(1);
        let connections_over_cap = counter_vec(
            &r,
            "svs_connections_refused_total",
            "API connections closed after their TLS handshake because the client's entity held max_connections_per_entity connections already, by entity (_unknown: certificates no entity claims, max_unknown_connections together).",
            &["entity"],
        );
        connections_over_cap.with_label_values(&[UNKNOWN]);
        let requests = counter_vec(
            &r,
            "svs_requests_total",
            "Signing API operations (a batch item counts as one) by operation, entity, key and outcome (ok, valid, invalid or the error code).",
            &["operation", "entity", "key", "outcome"],
        );
        // Clients no entity claims: what SvsUnknownClients counts.
        for op in [Operation::Sign, Operation::Verify] {
            requests.with_label_values(&[op.as_str(), UNKNOWN, NONE, "unauthenticated"]);
        }
        Metrics {
            tls_handshake_failures,
            connections_over_cap,
            entity_connections: int_gauge_vec(
                &r,
                "svs_entity_connections",
                "API connections held now, by entity (_unknown: certificates no entity claims, together).",
                &["entity"],
            ),
            config_reloads,
            config_reload_ok,
            requests,
            http_requests: counter_vec(
                &r,
                "svs_http_requests_total",
                "HTTP requests on the API listeners by operation (route) and status code.",
                &["operation", "code"],
            ),
            request_seconds: histogram_vec(
                &r,
                "svs_request_duration_seconds",
                "Time from request headers to the answer of requests answered 2xx, by operation (route).",
                &["operation"],
                LATENCY_BUCKETS,
            ),
            rate_limited: counter_vec(
                &r,
                "svs_rate_limited_total",
                "Requests refused by an entity's limits (rate, concurrency, or anomaly throttle).",
                &["entity", "reason"],
            ),
            refusals_suppressed: counter_vec(
                &r,
                "svs_audit_refusals_suppressed_total",
                "Refused requests past their source's refusal-record bucket: counted in a refusals_suppressed audit note instead of a record each, by entity and error code.",
                &["entity", "code"],
            ),
            key_usage: counter_vec(
                &r,
                "svs_key_operations_total",
                "Completed operations per exposed key.",
                &["key", "operation"],
            ),
            hsm_seconds: histogram_vec(
                &r,
                "svs_hsm_operation_duration_seconds",
                "Duration of one attempt of an HSM operation, by operation and PKCS#11 mechanism.",
                &["operation", "mechanism"],
                LATENCY_BUCKETS,
            ),
            hsm_errors: counter_vec(
                &r,
                "svs_hsm_errors_total",
                "HSM errors by CK_RV name or error kind.",
                &["rv"],
            ),
            hsm_recoveries: {
                let v = counter_vec(
                    &r,
                    "svs_hsm_recoveries_total",
                    "Recovery steps taken by HSM pool workers, by class.",
                    &["class"],
                );
                for class in RvClass::ALL {
                    v.with_label_values(&[recovery_label(class)]);
                }
                v
            },
            hsm_queue_depth: int_gauge(
                &r,
                "svs_hsm_queue_depth",
                "Jobs waiting for an HSM session.",
            ),
            hsm_queue_wait: {
                let h = Histogram::with_opts(
                    HistogramOpts::new(
                        "svs_hsm_queue_wait_seconds",
                        "Time a job waited for an HSM session.",
                    )
                    .buckets(SHORT_BUCKETS.to_vec()),
                )
                .unwrap_or_else(|e| bug("svs_hsm_queue_wait_seconds", e));
                register(&r, h.clone());
                h
            },
            hsm_in_use: AtomicUsize::new(0),
            hsm_sessions,
            hsm_health: int_gauge_vec(
                &r,
                "svs_hsm_health",
                "HSM pool health: 1 for the current state (up, degraded, down), 0 for the others.",
                &["state"],
            ),
            hsm_logged_in: int_gauge(
                &r,
                "svs_hsm_logged_in",
                "1 while at least one pool session is open and logged in.",
            ),
            hsm_stuck: int_gauge(
                &r,
                "svs_hsm_workers_stuck",
                "Pool workers running one job for longer than the operation timeout.",
            ),
            hsm_last_success: gauge(
                &r,
                "svs_hsm_last_success_timestamp_seconds",
                "When an HSM job last succeeded (Unix time; 0 = never).",
            ),
            selftest_ok: int_gauge(
                &r,
                "svs_selftest_ok",
                "1 while the last self-test run passed.",
            ),
            selftest_failures: {
                let c =
                    IntCounter::new("svs_selftest_failures_total", "Self-test runs that failed.")
                        .unwrap_or_else(|e| bug("svs_selftest_failures_total", e));
                register(&r, c.clone());
                c
            },
            selftest_last: gauge(
                &r,
                "svs_selftest_last_run_timestamp_seconds",
                "When self-tests last ran (Unix time; 0 = not yet).",
            ),
            hsm_user_pin: {
                let v = int_gauge_vec(
                    &r,
                    "svs_hsm_user_pin",
                    "1 while the token reports the user PIN in this state: count_low (a wrong PIN since the last good login), final_try (one more locks it), locked (no new login until a security officer unlocks it; open sessions keep signing).",
                    &["state"],
                );
                for state in ["count_low", "final_try", "locked"] {
                    v.with_label_values(&[state]);
                }
                v
            },
            ready: int_gauge(
                &r,
                "svs_ready",
                "1 while /readyz is 200: self-tests passed, HSM usable, audit trail writable, not draining.",
            ),
            not_ready_reason: {
                let v = int_gauge_vec(
                    &r,
                    "svs_not_ready_reason",
                    "1 for the reason /readyz is 503 (starting, not_provisioned, hsm_unavailable, selftests_pending, selftests_failed, audit_unavailable, shutting_down, other); all 0 while ready.",
                    &["reason"],
                );
                for reason in crate::error::NOT_READY_REASONS {
                    v.with_label_values(&[reason]);
                }
                v
            },
            audit_writable: int_gauge(
                &r,
                "svs_audit_writable",
                "1 while the audit trail can be written; 0 once a write or fsync failed (signing stops).",
            ),
            cert_expiry: gauge_vec(
                &r,
                "svs_key_certificate_expiry_timestamp_seconds",
                "notAfter of each exposed key's certificate (Unix time); absent for keys without one.",
                &["key"],
            ),
            tls_expiry: gauge_vec(
                &r,
                "svs_tls_certificate_expiry_timestamp_seconds",
                "Earliest notAfter (Unix time) of the certificates in each TLS file svsd serves or trusts: api_server (the chain it sends), api_client_ca, metrics_server, metrics_client_ca; read at start and at each reload.",
                &["certificate"],
            ),
            entity_anomaly: int_gauge_vec(
                &r,
                "svs_entity_anomaly",
                "1 while an entity's traffic is judged abnormal by the check (rate, errors).",
                &["entity", "check"],
            ),
            entity_rate: gauge_vec(
                &r,
                "svs_entity_request_rate",
                "An entity's operations per second (each batch item one): over the short window, and its baseline.",
                &["entity", "window"],
            ),
            entity_error_ratio: gauge_vec(
                &r,
                "svs_entity_error_ratio",
                "Share of an entity's operations in the short window answered with a 4xx (refused, or the client's mistake); the server's own 5xx do not count.",
                &["entity"],
            ),
            entity_throttled: int_gauge_vec(
                &r,
                "svs_entity_throttled",
                "1 while an entity is throttled to its baseline (anomaly enforcement).",
                &["entity"],
            ),
            entity_active: int_gauge_vec(
                &r,
                "svs_entity_active",
                "1 while an entity is active, 0 while suspended (its configured status).",
                &["entity"],
            ),
            entities: int_gauge(&r, "svs_entities", "Configured entities."),
            mechanisms: Mutex::new(Vec::new()),
            render: Mutex::new(()),
            registry: r,
        }
    }

    /// Reads the certificates of the TLS files in use into
    /// `svs_tls_certificate_expiry_timestamp_seconds`: an expired server
    /// certificate is an outage that no other metric shows (every
    /// handshake fails on the client's side). The metrics listener's
    /// series only when `metrics` is given: when its TLS was (re)loaded
    /// from those files, so that they show what it serves. Blocking (reads
    /// the files).
    pub fn tls_files(&self, api: &crate::config::TlsFiles, metrics: Option<&MetricsConfig>) {
        let mut files = vec![
            ("api_server", Some(api.certificate.as_path())),
            ("api_client_ca", Some(api.client_ca.as_path())),
        ];
        if let Some(m) = metrics {
            let tls = m.listen.and(m.tls.as_ref());
            files.push(("metrics_server", tls.map(|t| t.certificate.as_path())));
            files.push((
                "metrics_client_ca",
                tls.and_then(|t| t.client_ca.as_deref()),
            ));
        }
        for (name, path) in files {
            match path.and_then(earliest_not_after) {
                Some(t) => self.tls_expiry.with_label_values(&[name]).set(t),
                None => {
                    let _ = self.tls_expiry.remove_label_values(&[name]);
                }
            }
        }
    }

    /// The token's user PIN state, as last read.
    pub fn user_pin(&self, state: &svs_hsm::UserPinState) {
        for (name, on) in [
            ("count_low", state.count_low),
            ("final_try", state.final_try),
            ("locked", state.locked),
        ] {
            self.hsm_user_pin
                .with_label_values(&[name])
                .set(i64::from(on));
        }
    }

    /// Registers the audit trail's own counters.
    pub fn register_audit(&self, stats: &crate::audit::AuditStats) {
        register(&self.registry, stats.records.clone());
        register(&self.registry, stats.fsyncs.clone());
        register(&self.registry, stats.write_errors.clone());
        register(&self.registry, stats.fsync_seconds.clone());
    }

    /// One API operation (or a refused request) and its outcome.
    pub fn operation(&self, operation: &str, entity: &str, key: &str, outcome: &str) {
        self.requests
            .with_label_values(&[operation, entity, key, outcome])
            .inc();
        if matches!(outcome, "ok" | "valid" | "invalid") && key != NONE && key != UNKNOWN {
            self.key_usage.with_label_values(&[key, operation]).inc();
        }
    }

    /// One HTTP request on an API listener.
    pub fn http(&self, operation: &str, status: u16, elapsed: Duration) {
        let mut code = [0u8; 3];
        let code = status_text(status, &mut code);
        self.http_requests
            .with_label_values(&[operation, code])
            .inc();
        // The latency of requests served: counted, instant refusals (a
        // flood of 429s) and an outage's quick 503s made the latency SLO
        // look healthy. Failures are SvsErrorsRising's.
        if status < 400 {
            self.request_seconds
                .with_label_values(&[operation])
                .observe(elapsed.as_secs_f64());
        }
    }

    /// A request refused by an entity's limits.
    pub fn rate_limited(&self, entity: &str, reason: LimitReason) {
        self.rate_limited
            .with_label_values(&[entity, reason.as_str()])
            .inc();
    }

    /// Creates at 0 the counter series `rt` makes possible that an alert or
    /// a dashboard divides or takes `increase()` of: an entity's limits and
    /// connection cap, the successful answers of each operation it may run
    /// with each key it may use, each exposed key's use. A series born at
    /// its first event is read by `rate()` and `increase()` as starting
    /// there, so the burst that created it went uncounted (a first flood of
    /// 429s, an entity's first minute of signing). At most 4 + 2 × keys
    /// series an entity (each scrape encodes them all); error outcomes
    /// still appear with their first event. Series of entities or keys a
    /// reload removed keep their counts until restart, as counters should.
    pub fn configured(&self, rt: &crate::app::Runtime) {
        for e in rt.policy.entities() {
            for reason in LimitReason::ALL {
                self.rate_limited
                    .with_label_values(&[e.name(), reason.as_str()]);
            }
            self.connections_over_cap.with_label_values(&[e.name()]);
            for op in &e.config.operations {
                let success = match op {
                    Operation::Sign => "ok",
                    Operation::Verify => "valid",
                };
                for key in e.keys().iter().filter(|k| rt.keys.contains_key(*k)) {
                    self.requests
                        .with_label_values(&[op.as_str(), e.name(), key, success]);
                }
            }
        }
        for key in rt.keys.keys() {
            for op in [Operation::Sign, Operation::Verify] {
                self.key_usage.with_label_values(&[key, op.as_str()]);
            }
        }
    }

    /// A refused request counted in a summary note instead of its own
    /// audit record.
    pub fn refusal_suppressed(&self, entity: &str, code: &'static str) {
        self.refusals_suppressed
            .with_label_values(&[entity, code])
            .inc();
    }

    /// A connection of `listener` closed before it was served.
    pub fn tls_handshake_failure(
        &self,
        listener: &'static str,
        why: crate::server::HandshakeFailure,
    ) {
        self.tls_handshake_failures
            .with_label_values(&[listener, why.as_str()])
            .inc();
    }

    /// An API connection closed at its entity's connection cap.
    pub fn connection_over_cap(&self, entity: &str) {
        self.connections_over_cap.with_label_values(&[entity]).inc();
    }

    /// A SIGHUP reload was applied, or refused.
    pub fn reload(&self, applied: bool) {
        let result = if applied { "applied" } else { "refused" };
        self.config_reloads.with_label_values(&[result]).inc();
        self.config_reload_ok.set(i64::from(applied));
    }

    /// The count of [`Metrics::refusal_suppressed`] for one series.
    #[cfg(test)]
    pub(crate) fn refusals_suppressed(&self, entity: &str, code: &str) -> u64 {
        self.refusals_suppressed
            .with_label_values(&[entity, code])
            .get()
    }

    /// The count of [`Metrics::http`] for one series.
    #[cfg(test)]
    pub(crate) fn http_requests(&self, operation: &str, code: &str) -> u64 {
        self.http_requests
            .with_label_values(&[operation, code])
            .get()
    }

    /// Self-test runs that failed so far.
    #[cfg(test)]
    pub(crate) fn selftest_failures(&self) -> u64 {
        self.selftest_failures.get()
    }

    /// A self-test run ended.
    pub fn selftest(&self, ok: bool) {
        if !ok {
            self.selftest_failures.inc();
        }
        self.selftest_ok.set(i64::from(ok));
        self.selftest_last.set(unix_seconds(SystemTime::now()));
    }

    fn mechanism_label(&self, mechanism: Option<u64>) -> String {
        let Some(m) = mechanism else {
            return NONE.to_owned();
        };
        let mut seen = self.mechanisms.lock().unwrap_or_else(|p| p.into_inner());
        if seen.contains(&m) || seen.len() < MAX_MECHANISMS {
            if !seen.contains(&m) {
                seen.push(m);
            }
            format!("0x{m:08x}")
        } else {
            "other".to_owned()
        }
    }

    /// Reads the daemon's state into the gauges, then encodes every metric
    /// in the Prometheus text format. Blocking (call off the runtime).
    pub fn render(&self, app: &App) -> Vec<u8> {
        let _one_at_a_time = self.render.lock().unwrap_or_else(|p| p.into_inner());
        self.refresh(app);
        encode(&self.registry.gather())
    }

    /// The scrape while svsd waits to start (not provisioned, HSM not
    /// reachable): readiness and `why`, the build, the process and the
    /// metrics listener's own handshake failures. Every other family
    /// describes a part that does not run yet; shown at its initial 0 it
    /// would say what is false (`svs_audit_writable 0` fires
    /// SvsAuditWriteFailing for a trail that was never opened), so it is
    /// left out. A scraper thus sees SvsNotReady with its reason instead
    /// of a target that is down. Blocking, like [`Metrics::render`].
    pub fn render_waiting(&self, why: &SvsError) -> Vec<u8> {
        let _one_at_a_time = self.render.lock().unwrap_or_else(|p| p.into_inner());
        self.set_readiness(Err(why));
        let mut families = self.registry.gather();
        families.retain(|f| {
            let name = f.name();
            WAITING_FAMILIES.contains(&name) || name.starts_with("process_")
        });
        // The API listener does not exist yet: its zero series would say
        // it does.
        for f in &mut families {
            f.mut_metric().retain(|m| {
                !m.get_label()
                    .iter()
                    .any(|l| l.name() == "listener" && l.value() != "metrics")
            });
        }
        encode(&families)
    }

    fn set_readiness(&self, readiness: Result<(), &SvsError>) {
        self.ready.set(i64::from(readiness.is_ok()));
        let reason = readiness.err().map(crate::error::not_ready_reason);
        for r in crate::error::NOT_READY_REASONS {
            self.not_ready_reason
                .with_label_values(&[r])
                .set(i64::from(reason == Some(*r)));
        }
    }

    fn refresh(&self, app: &App) {
        self.set_readiness(app.readiness().as_ref().map(|_| ()));
        self.audit_writable
            .set(i64::from(app.audit().check().is_ok()));
        let (state, open, stuck, last_success) = match app.backend().pool_health() {
            Some(h) => (h.state, h.sessions_open, h.workers_stuck, h.last_success),
            None => match app.backend().health() {
                Ok(()) => (HealthState::Up, 1, 0, None),
                Err(_) => (HealthState::Down, 0, 0, None),
            },
        };
        for (s, name) in [
            (HealthState::Up, "up"),
            (HealthState::Degraded, "degraded"),
            (HealthState::Down, "down"),
        ] {
            self.hsm_health
                .with_label_values(&[name])
                .set(i64::from(s == state));
        }
        self.hsm_logged_in.set(i64::from(open > 0));
        self.hsm_stuck.set(stuck as i64);
        self.hsm_last_success
            .set(last_success.map_or(0.0, unix_seconds));
        let in_use = self.hsm_in_use.load(Ordering::Relaxed);
        self.hsm_sessions
            .with_label_values(&["in_use"])
            .set(in_use as i64);
        self.hsm_sessions
            .with_label_values(&["idle"])
            .set(open.saturating_sub(in_use) as i64);

        let rt = app.runtime();
        // Rebuilt each scrape so entities and keys removed by a reload vanish.
        self.cert_expiry.reset();
        for (name, exposure) in &rt.keys {
            if let Some(t) = app.backend().key(&exposure.object).and_then(|k| {
                k.certificate_chain
                    .first()
                    .and_then(|c| certificate_not_after(c))
            }) {
                self.cert_expiry.with_label_values(&[name]).set(t);
            }
        }
        self.entity_anomaly.reset();
        self.entity_rate.reset();
        self.entity_error_ratio.reset();
        self.entity_throttled.reset();
        self.entity_connections.reset();
        self.entity_connections
            .with_label_values(&[UNKNOWN])
            .set(app.unknown_connections() as i64);
        self.entity_active.reset();
        self.entities.set(rt.policy.len() as i64);
        for e in rt.policy.entities() {
            let v = e.traffic().view();
            let name = e.name();
            self.entity_connections
                .with_label_values(&[name])
                .set(e.connections().load(Ordering::Relaxed) as i64);
            self.entity_anomaly
                .with_label_values(&[name, "rate"])
                .set(i64::from(v.rate_abnormal));
            self.entity_anomaly
                .with_label_values(&[name, "errors"])
                .set(i64::from(v.errors_abnormal));
            self.entity_rate
                .with_label_values(&[name, "short"])
                .set(v.short_rate);
            self.entity_rate
                .with_label_values(&[name, "baseline"])
                .set(v.baseline);
            self.entity_error_ratio
                .with_label_values(&[name])
                .set(v.error_ratio);
            self.entity_throttled
                .with_label_values(&[name])
                .set(i64::from(v.throttled));
            self.entity_active
                .with_label_values(&[name])
                .set(i64::from(e.config.status == EntityStatus::Active));
        }
    }
}

/// The three digits of an HTTP status without allocating.
fn status_text(status: u16, buf: &mut [u8; 3]) -> &str {
    let s = status.clamp(100, 999);
    buf[0] = b'0' + (s / 100) as u8;
    buf[1] = b'0' + (s / 10 % 10) as u8;
    buf[2] = b'0' + (s % 10) as u8;
    std::str::from_utf8(buf).unwrap_or("500")
}

impl HsmMetrics for Metrics {
    fn queue_depth(&self, depth: usize) {
        self.hsm_queue_depth.set(depth as i64);
    }

    fn sessions_in_use(&self, in_use: usize) {
        self.hsm_in_use.store(in_use, Ordering::Relaxed);
    }

    fn queue_wait(&self, wait: Duration) {
        self.hsm_queue_wait.observe(wait.as_secs_f64());
    }

    fn operation(&self, op: &'static str, mechanism: Option<u64>, latency: Duration, _ok: bool) {
        let m = self.mechanism_label(mechanism);
        self.hsm_seconds
            .with_label_values(&[op, &m])
            .observe(latency.as_secs_f64());
    }

    fn error(&self, label: &'static str) {
        self.hsm_errors.with_label_values(&[label]).inc();
    }

    fn recovery(&self, class: RvClass) {
        self.hsm_recoveries
            .with_label_values(&[recovery_label(class)])
            .inc();
    }
}

fn recovery_label(class: RvClass) -> &'static str {
    match class {
        RvClass::CallerError => "caller_error",
        RvClass::RetrySession => "retry_session",
        RvClass::Relogin => "relogin",
        RvClass::TokenGone => "token_gone",
        RvClass::Fatal => "fatal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_render_without_allocation() {
        let mut b = [0u8; 3];
        assert_eq!(status_text(200, &mut b), "200");
        assert_eq!(status_text(429, &mut b), "429");
        assert_eq!(status_text(5, &mut b), "100");
    }

    #[test]
    fn process_cpu_seconds_are_read_to_the_clock_tick() {
        let stat = "4242 (svsd) odd) name) S 1 4242 4242 0 -1 4194560 900 0 0 0 68 27 0 0 20 0 9 0 1000 1 2";
        assert_eq!(cpu_seconds_of(stat, 100), Some(0.95));
        assert_eq!(cpu_seconds_of("4242 (svsd", 100), None);
        #[cfg(target_os = "linux")]
        {
            let m = Metrics::new();
            // Some CPU time of its own for the process to show.
            let start = std::time::Instant::now();
            while start.elapsed() < Duration::from_millis(30) {
                std::hint::black_box(crate::audit::sm3(b"busy"));
            }
            let before = cpu_seconds().unwrap();
            let mut text = Vec::new();
            TextEncoder::new()
                .encode(&m.registry.gather(), &mut text)
                .unwrap();
            let text = String::from_utf8(text).unwrap();
            let line = text
                .lines()
                .find(|l| l.starts_with("process_cpu_seconds_total "))
                .unwrap();
            let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            let after = cpu_seconds().unwrap();
            assert!(
                before > 0.0 && before <= value && value <= after,
                "{before} {line} {after}"
            );
        }
    }

    #[test]
    fn request_latency_is_that_of_requests_served() {
        let m = Metrics::new();
        let ms = Duration::from_millis(1);
        m.http("sign", 200, ms);
        m.http("sign", 429, ms);
        m.http("sign", 503, ms);
        let count = m
            .request_seconds
            .with_label_values(&["sign"])
            .get_sample_count();
        assert_eq!(count, 1);
        let counted = m.http_requests.with_label_values(&["sign", "429"]).get();
        assert_eq!(counted, 1);
    }

    #[test]
    fn mechanism_labels_are_capped() {
        let m = Metrics::new();
        assert_eq!(m.mechanism_label(None), NONE);
        assert_eq!(m.mechanism_label(Some(0x8000_8104)), "0x80008104");
        for i in 0..40 {
            m.mechanism_label(Some(i));
        }
        assert_eq!(m.mechanism_label(Some(1000)), "other");
        // A number seen early keeps its own label.
        assert_eq!(m.mechanism_label(Some(0x8000_8104)), "0x80008104");
    }

    #[test]
    fn key_usage_counts_only_completed_operations_on_configured_keys() {
        let m = Metrics::new();
        m.operation("sign", "a", "demo", "ok");
        m.operation("sign", "a", "demo", "rate_limited");
        m.operation("verify", "a", NONE, "valid");
        m.operation("sign", UNKNOWN, UNKNOWN, "unknown_key");
        assert_eq!(m.key_usage.with_label_values(&["demo", "sign"]).get(), 1);
        assert_eq!(
            m.requests
                .with_label_values(&["sign", "a", "demo", "rate_limited"])
                .get(),
            1
        );
        let families = m.registry.gather();
        let usage = families
            .iter()
            .find(|f| f.name() == "svs_key_operations_total")
            .map(|f| f.get_metric().len());
        assert_eq!(usage, Some(1));
    }

    #[test]
    fn reloads_and_handshake_failures_have_their_series_from_the_start() {
        let m = Metrics::new();
        let mut text = Vec::new();
        TextEncoder::new()
            .encode(&m.registry.gather(), &mut text)
            .unwrap();
        let text = String::from_utf8(text).unwrap();
        for series in [
            r#"svs_config_reloads_total{result="applied"} 0"#,
            r#"svs_config_reloads_total{result="refused"} 0"#,
            "svs_config_last_reload_successful 1",
            r#"svs_tls_handshake_failures_total{listener="api",reason="no_slot"} 0"#,
            r#"svs_tls_handshake_failures_total{listener="metrics",reason="timeout"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == series), "{series} in\n{text}");
        }
        m.reload(false);
        assert_eq!(m.config_reload_ok.get(), 0);
        m.reload(false);
        m.reload(true);
        assert_eq!(m.config_reload_ok.get(), 1);
        let reloads = |r: &str| m.config_reloads.with_label_values(&[r]).get();
        assert_eq!((reloads("applied"), reloads("refused")), (1, 2));
        m.tls_handshake_failure("api", crate::server::HandshakeFailure::Refused);
        assert_eq!(
            m.tls_handshake_failures
                .with_label_values(&["api", "refused"])
                .get(),
            1
        );
    }

    #[test]
    fn a_waiting_scrape_shows_why_and_nothing_that_does_not_run_yet() {
        use crate::error::{Missing, NotReady};
        let m = Metrics::new();
        m.tls_handshake_failure("metrics", crate::server::HandshakeFailure::Refused);
        let why = SvsError::NotReady(NotReady::HsmUnavailable, "slot 0 gone".into());
        let text = String::from_utf8(m.render_waiting(&why)).unwrap();
        for series in [
            "svs_ready 0",
            r#"svs_not_ready_reason{reason="hsm_unavailable"} 1"#,
            r#"svs_not_ready_reason{reason="not_provisioned"} 0"#,
            r#"svs_tls_handshake_failures_total{listener="metrics",reason="refused"} 1"#,
            &format!(
                r#"svs_build_info{{version="{}"}} 1"#,
                env!("CARGO_PKG_VERSION")
            ),
        ] {
            assert!(text.lines().any(|l| l == series), "{series} in\n{text}");
        }
        #[cfg(target_os = "linux")]
        assert!(text.contains("\nprocess_start_time_seconds "), "{text}");
        // No detail text becomes a label, and no part that is not running is shown.
        assert!(!text.contains("slot 0"), "{text}");
        for absent in [
            r#"listener="api""#,
            "svs_audit_writable",
            "svs_hsm_health",
            "svs_selftest_ok",
            "svs_requests_total",
        ] {
            assert!(!text.contains(absent), "{absent} in\n{text}");
        }
        // The reason follows the error, and exactly one is 1.
        let why = SvsError::NotReady(NotReady::not_provisioned(vec![Missing::Pin]), String::new());
        let text = String::from_utf8(m.render_waiting(&why)).unwrap();
        let ones: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("svs_not_ready_reason{") && l.ends_with(" 1"))
            .collect();
        assert_eq!(
            ones,
            [r#"svs_not_ready_reason{reason="not_provisioned"} 1"#]
        );
        // Ready: every reason 0.
        m.set_readiness(Ok(()));
        for r in crate::error::NOT_READY_REASONS {
            assert_eq!(m.not_ready_reason.with_label_values(&[r]).get(), 0, "{r}");
        }
        assert_eq!(m.ready.get(), 1);
    }

    #[test]
    fn config_defaults_disable_and_errors() {
        let mut errors = Vec::new();
        let c = MetricsConfig::from_raw(RawMetrics::default(), Path::new("/etc/svs"), &mut errors);
        assert_eq!(c, MetricsConfig::default());
        assert_eq!(c.listen, Some("127.0.0.1:9464".parse().unwrap()));
        let raw: RawMetrics = toml::from_str(
            "enabled = false\n[tls]\ncertificate = \"m.pem\"\nprivate_key = \"/k.pem\"\n",
        )
        .unwrap();
        let c = MetricsConfig::from_raw(raw, Path::new("/etc/svs"), &mut errors);
        assert!(errors.is_empty());
        assert_eq!(c.listen, None);
        let tls = c.tls.unwrap();
        assert_eq!(tls.certificate, PathBuf::from("/etc/svs/m.pem"));
        assert_eq!(tls.private_key, PathBuf::from("/k.pem"));
        let raw: RawMetrics = toml::from_str("listen = \"nowhere\"").unwrap();
        MetricsConfig::from_raw(raw, Path::new("/"), &mut errors);
        assert_eq!(errors.len(), 1);
        assert!(toml::from_str::<RawMetrics>("port = 1").is_err());
    }
}
