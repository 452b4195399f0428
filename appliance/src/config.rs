//! svsd's configuration: one TOML file (plus an optional entities file that
//! svs-provision edits), read in two stages. Stage one deserialises each
//! section on its own into raw structs that reject unknown keys; stage two
//! checks values and cross-references and produces [`Config`] with real
//! defaults. Every problem found in either stage is reported at once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use svs_hsm::HsmConfig;
use svs_hsm::signature::DEFAULT_SM2_ID;

use crate::dn::DistinguishedName;
use crate::error::SvsError;

/// The operations an entity can be granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// Signing with a token key.
    Sign,
    /// Verifying a signature.
    Verify,
}

impl Operation {
    /// The name used in config, audit records and errors.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Sign => "sign",
            Operation::Verify => "verify",
        }
    }
}

/// Whether an entity may currently use the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntityStatus {
    /// Served.
    #[default]
    Active,
    /// Refused with 403 `entity_suspended`.
    Suspended,
}

/// How an entity's client certificate is recognised.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientMatch {
    /// SHA-256 of the whole DER certificate.
    CertificateSha256([u8; 32]),
    /// SHA-256 of the DER SubjectPublicKeyInfo (survives re-issuing with the same key).
    SpkiSha256([u8; 32]),
    /// Subject DN issued by the CA whose subject DN is `issuer` (both
    /// compared by meaning, see [`crate::dn`]), and
    /// issued directly by it: `issuer` must be the subject of a certificate
    /// in the client CA bundle, whose key verifies the client certificate
    /// (see [`crate::policy::VerifiedClient`]).
    Subject {
        /// Subject DN of the client certificate.
        subject: DistinguishedName,
        /// Subject DN of the issuing CA (one of the client CA bundle).
        issuer: DistinguishedName,
    },
}

/// Token-bucket parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Sustained operations per second.
    pub per_second: f64,
    /// Bucket size: operations allowed in a burst.
    pub burst: u32,
}

/// One application entity, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct EntityConfig {
    /// Unique name (appears in audit records and logs).
    pub name: String,
    /// Active or suspended.
    pub status: EntityStatus,
    /// How its client certificate is recognised.
    pub client: ClientMatch,
    /// Exposed key names it may use.
    pub keys: BTreeSet<String>,
    /// Operations it may perform.
    pub operations: BTreeSet<Operation>,
    /// Token bucket; none means unlimited.
    pub rate: Option<RateLimit>,
    /// Requests in flight at once; none means `[limits]
    /// default_max_concurrent`.
    pub max_concurrent: Option<usize>,
}

/// A key the API exposes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyExposure {
    /// The token object's name as svs-hsm reports it (CKA_LABEL).
    pub object: String,
}

/// TLS files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Server certificate chain, PEM (leaf first).
    pub certificate: PathBuf,
    /// Server private key, PEM (PKCS#8, SEC1 or PKCS#1).
    pub private_key: PathBuf,
    /// CA bundle that client certificates must chain to, PEM.
    pub client_ca: PathBuf,
}

/// Request limits and timeouts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Most items in one batch.
    pub max_batch_items: usize,
    /// TLS handshake deadline.
    pub handshake_timeout: Duration,
    /// Deadline for a request's headers (HTTP/1.1). hyper's timer also runs
    /// while a keep-alive connection waits for its next request, so an idle
    /// HTTP/1.1 connection is closed after this if shorter than
    /// `idle_timeout`.
    pub header_timeout: Duration,
    /// Deadline for a request's body once headers arrived.
    pub body_timeout: Duration,
    /// Deadline for the whole handling of one request.
    pub request_timeout: Duration,
    /// Established (handshaken) connections at once. Restart-only: the
    /// semaphore is sized at start.
    pub max_connections: usize,
    /// TLS handshakes in flight at once; further clients wait in the listen
    /// backlog. Restart-only.
    pub max_handshakes: usize,
    /// A connection with no request in flight for this long is closed
    /// (HTTP/2, and HTTP/1.1 up to `header_timeout`, see there).
    pub idle_timeout: Duration,
    /// A connection is closed gracefully (in-flight requests finish) once
    /// this old: bounds how long a connection outlives a reload.
    pub max_connection_age: Duration,
    /// A connection being closed (idle, at its maximum age, after a refused
    /// client, on shutdown) is dropped once it has had no request in flight
    /// for this long without finishing its close: its client has not taken
    /// its answers (HTTP/2 flow-control window, unread socket) or not
    /// acknowledged the GOAWAY's PING.
    pub close_timeout: Duration,
    /// Request bodies held in memory at once, all connections together;
    /// beyond it requests get 503 `server_busy`. Restart-only. One entity's
    /// bodies may hold at most half of it (see [`Limits::entity_body_bytes`]).
    pub max_inflight_body_bytes: usize,
    /// Requests in flight at once for an entity that sets no
    /// `max_concurrent` of its own: every entity's admitted requests are
    /// bounded, whatever its configuration.
    pub default_max_concurrent: usize,
    /// Connections one entity may hold at once (default: half of
    /// `max_connections`), so that no tenant takes every slot.
    pub max_connections_per_entity: usize,
    /// Connections held at once by all clients whose certificate no entity
    /// claims, together (default: 1/16 of `max_connections`): they are only
    /// ever answered 401, and any certificate of the client CA can make one.
    pub max_unknown_connections: usize,
}

/// `default_max_concurrent` unless configured.
pub const DEFAULT_MAX_CONCURRENT: usize = 256;

impl Limits {
    /// Whether `other` differs from these in a limit a reload applies: any
    /// but `max_connections`, `max_handshakes` and
    /// `max_inflight_body_bytes`, which are sized at start (a change of
    /// those alone is no change the `reload` record may claim).
    pub fn reload_differs(&self, other: &Limits) -> bool {
        let restart_only_kept = Limits {
            max_connections: self.max_connections,
            max_handshakes: self.max_handshakes,
            max_inflight_body_bytes: self.max_inflight_body_bytes,
            ..other.clone()
        };
        *self != restart_only_kept
    }

    /// The most bytes of request bodies one entity may hold at once: half
    /// of `max_inflight_body_bytes` (at least one whole body), so that one
    /// tenant's uploads, stalled or not, leave the others room.
    pub fn entity_body_bytes(&self, budget: usize) -> usize {
        (budget / 2).max(self.max_body_bytes)
    }

    /// `max_connections_per_entity` unless configured.
    fn default_connections_per_entity(max_connections: usize) -> usize {
        (max_connections / 2).max(1)
    }

    /// `max_unknown_connections` unless configured.
    fn default_unknown_connections(max_connections: usize) -> usize {
        (max_connections / 16).max(1)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 1 << 20,
            max_batch_items: 256,
            handshake_timeout: Duration::from_secs(5),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_connections: 4096,
            max_handshakes: 64,
            idle_timeout: Duration::from_secs(60),
            max_connection_age: Duration::from_secs(600),
            close_timeout: Duration::from_secs(5),
            max_inflight_body_bytes: 64 << 20,
            default_max_concurrent: DEFAULT_MAX_CONCURRENT,
            max_connections_per_entity: Limits::default_connections_per_entity(4096),
            max_unknown_connections: Limits::default_unknown_connections(4096),
        }
    }
}

/// The audit anchor's label on the token unless `[audit] anchor_object`
/// says otherwise (appliances sharing one token need one each).
pub const DEFAULT_ANCHOR_OBJECT: &str = "svs-audit-anchor";

/// Default of `[audit] refusal_records`: per source, a refused request gets
/// its own record at 20 a second after a burst of 100; past that refusals
/// are counted in one summary record a second (see [`crate::refusals`]).
pub const DEFAULT_REFUSAL_RECORDS: RateLimit = RateLimit {
    per_second: 20.0,
    burst: 100,
};

/// The audit trail's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditConfig {
    /// Directory of the trail files.
    pub dir: PathBuf,
    /// A file is rotated once it reaches this size.
    pub max_file_bytes: u64,
    /// Zero-fill each file to `max_file_bytes` when it is started, so that
    /// a group commit's fdatasync flushes data only (see `audit`).
    pub preallocate: bool,
    /// Most records committed by one fsync.
    pub max_group_records: usize,
    /// How often the chain head is signed; none disables checkpoints.
    pub checkpoint_interval: Option<Duration>,
    /// Token object (CKA_LABEL) of the audit key; required for checkpoints.
    pub checkpoint_key: Option<String>,
    /// Label of the token data object holding the audit anchor (the last
    /// checkpointed head, see `audit::anchor_head`); none disables it.
    pub anchor_object: Option<String>,
    /// Token bucket of refusal records per source (an entity, or all
    /// unknown clients together); a burst of 0 records refusals only in
    /// the summaries.
    pub refusal_records: RateLimit,
}

impl AuditConfig {
    /// A trail in `dir` without checkpoints or anchor (nothing on a token),
    /// rotated at `max_file_bytes`: what tests and tools write.
    pub fn without_token(dir: PathBuf, max_file_bytes: u64) -> AuditConfig {
        AuditConfig {
            dir,
            max_file_bytes,
            preallocate: true,
            max_group_records: 64,
            checkpoint_interval: None,
            checkpoint_key: None,
            anchor_object: None,
            refusal_records: DEFAULT_REFUSAL_RECORDS,
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from (reloaded on SIGHUP).
    pub path: PathBuf,
    /// HTTPS listeners.
    pub listen: Vec<SocketAddr>,
    /// Plain-HTTP listener serving only /healthz and /readyz (for probes
    /// that hold no client certificate); none when not configured.
    pub health_listen: Option<SocketAddr>,
    /// TLS files.
    pub tls: TlsFiles,
    /// How long SIGTERM waits for in-flight requests.
    pub grace_period: Duration,
    /// Run as root anyway.
    pub allow_root: bool,
    /// svs-hsm's section, as is.
    pub hsm: HsmConfig,
    /// The soft token's own config file, for the embedded module.
    pub embedded_token_config: Option<PathBuf>,
    /// API key name → token object.
    pub keys: BTreeMap<String, KeyExposure>,
    /// Limits.
    pub limits: Limits,
    /// Audit trail.
    pub audit: AuditConfig,
    /// Period of the background self-tests.
    pub selftest_interval: Duration,
    /// The separate entities file, if any.
    pub entities_file: Option<PathBuf>,
    /// SHA-256 of the entities file's bytes as read: the `reload` record
    /// names it, so that svs-provision can tell the reload that read its
    /// edit from one that read the file before.
    pub entities_sha256: Option<[u8; 32]>,
    /// All entities (inline and from the file).
    pub entities: Vec<EntityConfig>,
    /// The metrics listener (docs/monitoring.md).
    pub metrics: crate::metrics::MetricsConfig,
    /// Abnormal-traffic detection (docs/monitoring.md).
    pub anomaly: crate::anomaly::AnomalyConfig,
}

// ---------------------------------------------------------------- stage one

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Vec<String>,
    #[serde(default)]
    health_listen: Option<String>,
    #[serde(default)]
    grace_period_ms: Option<u64>,
    #[serde(default)]
    allow_root: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    certificate: PathBuf,
    private_key: PathBuf,
    client_ca: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEmbeddedToken {
    config: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    object: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_body_bytes: Option<usize>,
    max_batch_items: Option<usize>,
    handshake_timeout_ms: Option<u64>,
    header_timeout_ms: Option<u64>,
    body_timeout_ms: Option<u64>,
    request_timeout_ms: Option<u64>,
    max_connections: Option<usize>,
    max_handshakes: Option<usize>,
    idle_timeout_ms: Option<u64>,
    max_connection_age_ms: Option<u64>,
    close_timeout_ms: Option<u64>,
    max_inflight_body_bytes: Option<usize>,
    default_max_concurrent: Option<usize>,
    max_connections_per_entity: Option<usize>,
    max_unknown_connections: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    dir: PathBuf,
    max_file_bytes: Option<u64>,
    preallocate: Option<bool>,
    max_group_records: Option<usize>,
    checkpoint_interval_s: Option<u64>,
    checkpoint_key: Option<String>,
    anchor: Option<bool>,
    anchor_object: Option<String>,
    refusal_records: Option<RawRate>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSelftest {
    interval_s: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRate {
    per_second: f64,
    burst: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntity {
    name: String,
    #[serde(default)]
    status: EntityStatus,
    #[serde(default)]
    certificate_sha256: Option<String>,
    #[serde(default)]
    spki_sha256: Option<String>,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    issuer: Option<String>,
    #[serde(default)]
    keys: Vec<String>,
    operations: Vec<Operation>,
    #[serde(default)]
    rate: Option<RawRate>,
    #[serde(default)]
    max_concurrent: Option<usize>,
}

const SECTIONS: &[&str] = &[
    "server",
    "tls",
    "hsm",
    "embedded_token",
    "keys",
    "limits",
    "audit",
    "selftest",
    "entities_file",
    "entity",
    "metrics",
    "anomaly",
];

/// Collects errors instead of stopping at the first.
#[derive(Debug, Default)]
struct Errors(Vec<String>);

impl Errors {
    fn push(&mut self, e: impl Into<String>) {
        self.0.push(e.into());
    }
    fn section<T: serde::de::DeserializeOwned>(
        &mut self,
        table: &toml::Table,
        name: &str,
    ) -> Option<T> {
        self.deserialize(table.get(name)?, &format!("[{name}]"))
    }
    /// Deserialises one section or entity into its raw struct (or map).
    /// serde stops at the first error, so one unknown key or bad value
    /// would hide every other in the section, and drop the section, with
    /// false errors following from its absence. So a table that does not
    /// deserialise whole is tried key by key: each key alone (a complaint
    /// that some other field is missing means the key itself passed), each
    /// bad one reported and left out, and the rest deserialised, for stage
    /// two to check as usual.
    fn deserialize<T: serde::de::DeserializeOwned>(
        &mut self,
        value: &toml::Value,
        label: &str,
    ) -> Option<T> {
        let whole = match T::deserialize(value.clone()) {
            Ok(v) => return Some(v),
            Err(e) => e,
        };
        let Some(table) = value.as_table() else {
            self.push(format!("{label}: {}", describe(&whole)));
            return None;
        };
        let mut rest = table.clone();
        let mut bad = Vec::new();
        for (key, v) in table {
            let alone = toml::Table::from_iter([(key.clone(), v.clone())]);
            if let Err(e) = T::deserialize(toml::Value::Table(alone))
                && missing_field(&e).is_none()
            {
                self.push(format!("{label}: {}", describe(&e)));
                rest.remove(key);
                bad.push(key.as_str());
            }
        }
        match T::deserialize(toml::Value::Table(rest)) {
            Ok(v) if !bad.is_empty() => Some(v),
            // Only together are the keys wrong (or the whole error is not
            // about any one key): the first error is all serde can say.
            Ok(_) => {
                self.push(format!("{label}: {}", describe(&whole)));
                None
            }
            Err(e) => {
                // A required key reported bad above is not missing as well.
                if !missing_field(&e).is_some_and(|f| bad.contains(&f)) {
                    self.push(format!("{label}: {}", describe(&e)));
                }
                None
            }
        }
    }
    fn required<T: serde::de::DeserializeOwned>(
        &mut self,
        table: &toml::Table,
        name: &str,
    ) -> Option<T> {
        if !table.contains_key(name) {
            self.push(format!("[{name}] is missing"));
            return None;
        }
        self.section(table, name)
    }
}

/// The field a "missing field" error names.
fn missing_field(e: &toml::de::Error) -> Option<&str> {
    e.message()
        .strip_prefix("missing field `")?
        .split('`')
        .next()
}

/// A deserialisation error on one line. Errors from a `toml::Value` carry
/// no position, but their Display names the key (as "in `pin`"), which
/// `message()` leaves out.
fn describe(e: &toml::de::Error) -> String {
    e.to_string().trim().replace('\n', " ")
}

/// A TOML syntax error as one line: the file, line and column (1-based),
/// and what is wrong. Not the toml crate's own rendering, which quotes the
/// offending line: a typo on a line holding a secret would put it in the
/// journal.
pub fn syntax_error(
    path: &Path,
    text: &str,
    span: Option<std::ops::Range<usize>>,
    message: &str,
) -> String {
    let message = message.trim();
    match span.and_then(|s| text.get(..s.start)) {
        Some(before) => {
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
            format!(
                "{}: line {line}, column {column}: {message}",
                path.display()
            )
        }
        None => format!("{}: {message}", path.display()),
    }
}

fn parse_table(text: &str, what: &Path) -> Result<toml::Table, SvsError> {
    text.parse::<toml::Table>()
        .map_err(|e| SvsError::Config(vec![syntax_error(what, text, e.span(), e.message())]))
}

/// Largest configuration or entities file read: far above any real one
/// (a thousand entities take about 300 KiB).
const MAX_FILE_BYTES: u64 = 16 << 20;

/// Reads a configuration file. A FIFO or device named by mistake (or an
/// entities file on `/dev/zero`) is refused rather than read until it ends
/// or memory runs out.
fn read(path: &Path) -> Result<String, SvsError> {
    use std::io::Read;
    let error =
        |why: String| SvsError::Config(vec![format!("cannot read {}: {why}", path.display())]);
    let file = std::fs::File::open(path).map_err(|e| error(e.to_string()))?;
    let meta = file.metadata().map_err(|e| error(e.to_string()))?;
    if !meta.is_file() {
        return Err(error("not a regular file".into()));
    }
    let mut text = String::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| error(e.to_string()))?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(error(format!("larger than {} MiB", MAX_FILE_BYTES >> 20)));
    }
    Ok(text)
}

fn resolve(base: &Path, p: PathBuf) -> PathBuf {
    if p.is_absolute() { p } else { base.join(p) }
}

fn ms(v: Option<u64>, default: Duration, name: &str, errors: &mut Errors) -> Duration {
    match v {
        None => default,
        Some(0) => {
            errors.push(format!("[limits] {name} must be > 0"));
            default
        }
        Some(v) => Duration::from_millis(v),
    }
}

/// Parses a SHA-256 fingerprint: 64 hex digits, optionally colon-separated
/// (as `openssl x509 -fingerprint -sha256` prints it).
pub fn parse_fingerprint(s: &str) -> Option<[u8; 32]> {
    let hex: String = s.chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The most connections (or handshakes) svsd is configured for.
const MAX_CONNECTIONS: usize = 1_000_000;

/// The longest self-test or checkpoint interval: a week.
const MAX_INTERVAL_S: u64 = 7 * 24 * 3600;

/// The longest SIGTERM drain: under the unit's TimeoutStopSec (45 s), after
/// which systemd kills svsd before its `stop` record.
const MAX_GRACE_PERIOD_MS: u64 = 40_000;

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

fn entity(
    raw: RawEntity,
    where_: &str,
    keys: &BTreeMap<String, KeyExposure>,
    errors: &mut Errors,
) -> Option<EntityConfig> {
    let before = errors.0.len();
    let label = format!("{where_} entity {:?}", raw.name);
    if !valid_name(&raw.name) {
        errors.push(format!(
            "{label}: name must be 1-128 characters of A-Z a-z 0-9 - _ . :"
        ));
    } else if raw.name.starts_with('_') {
        // The audit trail and metrics name clients no entity claims
        // `_unknown`; an entity of that name would share their refusal
        // budget and be indistinguishable from them.
        errors.push(format!(
            "{label}: names starting with _ are reserved for svsd (_unknown: clients no entity claims)"
        ));
    }
    let methods = usize::from(raw.certificate_sha256.is_some())
        + usize::from(raw.spki_sha256.is_some())
        + usize::from(raw.subject.is_some() || raw.issuer.is_some());
    let client = if methods != 1 {
        errors.push(format!(
            "{label}: set exactly one of certificate_sha256, spki_sha256, or subject + issuer"
        ));
        None
    } else if let Some(fp) = &raw.certificate_sha256 {
        let parsed = parse_fingerprint(fp).map(ClientMatch::CertificateSha256);
        if parsed.is_none() {
            errors.push(format!("{label}: certificate_sha256 must be 64 hex digits"));
        }
        parsed
    } else if let Some(fp) = &raw.spki_sha256 {
        let parsed = parse_fingerprint(fp).map(ClientMatch::SpkiSha256);
        if parsed.is_none() {
            errors.push(format!("{label}: spki_sha256 must be 64 hex digits"));
        }
        parsed
    } else {
        match (&raw.subject, &raw.issuer) {
            (Some(s), Some(i)) if !s.trim().is_empty() && !i.trim().is_empty() => {
                let mut dn = |field: &str, written: &str| {
                    DistinguishedName::parse(written)
                        .map_err(|e| {
                            errors.push(format!(
                                "{label}: {field} {} is not an RFC 4514 distinguished name: {e}",
                                crate::dn::quote(written.trim())
                            ))
                        })
                        .ok()
                };
                let (subject, issuer) = (dn("subject", s), dn("issuer", i));
                subject
                    .zip(issuer)
                    .map(|(subject, issuer)| ClientMatch::Subject { subject, issuer })
            }
            _ => {
                errors.push(format!(
                    "{label}: subject matching needs both a non-empty subject and issuer"
                ));
                None
            }
        }
    };
    for k in &raw.keys {
        if !keys.contains_key(k) {
            errors.push(format!("{label}: key {k:?} is not in [keys]"));
        }
    }
    if raw.operations.is_empty() {
        errors.push(format!("{label}: operations must not be empty"));
    }
    if raw.operations.contains(&Operation::Sign) && raw.keys.is_empty() {
        errors.push(format!("{label}: may sign but has no keys"));
    }
    let rate = raw.rate.and_then(|r| {
        if !(r.per_second.is_finite() && r.per_second > 0.0) {
            errors.push(format!("{label}: rate.per_second must be > 0"));
            return None;
        }
        let burst = r
            .burst
            .unwrap_or_else(|| r.per_second.ceil().max(1.0) as u32);
        if burst == 0 {
            errors.push(format!("{label}: rate.burst must be > 0"));
            return None;
        }
        Some(RateLimit {
            per_second: r.per_second,
            burst,
        })
    });
    if raw.max_concurrent == Some(0) {
        errors.push(format!("{label}: max_concurrent must be > 0"));
    }
    if errors.0.len() != before {
        return None;
    }
    Some(EntityConfig {
        name: raw.name,
        status: raw.status,
        client: client?,
        keys: raw.keys.into_iter().collect(),
        operations: raw.operations.into_iter().collect(),
        rate,
        max_concurrent: raw.max_concurrent,
    })
}

fn entities_from(
    value: Option<&toml::Value>,
    where_: &str,
    keys: &BTreeMap<String, KeyExposure>,
    errors: &mut Errors,
) -> Vec<EntityConfig> {
    let Some(value) = value else {
        return Vec::new();
    };
    let Some(list) = value.as_array() else {
        errors.push(format!(
            "{where_}: `entity` must be an array of tables ([[entity]])"
        ));
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in list.iter().enumerate() {
        // Named as stage two names it, so that all of one entity's errors
        // read alike; by position only when it has no usable name.
        let label = match item.get("name").and_then(toml::Value::as_str) {
            Some(name) => format!("{where_} entity {name:?}"),
            None => format!("{where_} entity #{}", i + 1),
        };
        if let Some(raw) = errors.deserialize::<RawEntity>(item, &label)
            && let Some(e) = entity(raw, where_, keys, errors)
        {
            out.push(e);
        }
    }
    out
}

/// Checks entities-file text as if read from `path`: svs-provision checks
/// its edit, written to a temporary file, under the name of the file it
/// will replace, which is the one the officer knows.
pub fn entities_from_toml(
    text: &str,
    path: &Path,
    keys: &BTreeMap<String, KeyExposure>,
) -> Result<Vec<EntityConfig>, SvsError> {
    let table = parse_table(text, path)?;
    let mut errors = Errors::default();
    for k in table.keys() {
        if k != "entity" {
            errors.push(format!("{}: unknown key {k:?}", path.display()));
        }
    }
    let list = entities_from(
        table.get("entity"),
        &path.display().to_string(),
        keys,
        &mut errors,
    );
    if errors.0.is_empty() {
        Ok(list)
    } else {
        Err(SvsError::Config(errors.0))
    }
}

impl Config {
    /// Reads and validates the file; relative paths are relative to its directory.
    pub fn load(path: &Path) -> Result<Config, SvsError> {
        let text = read(path)?;
        Config::from_toml(&text, path)
    }

    /// Validates TOML text as if read from `path`.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, SvsError> {
        Config::from_toml_with(text, path, None)
    }

    /// Reads and validates the file as [`Config::load`] does, but with
    /// `entities` as its entities file's text, not the file on disk (which
    /// errors still name): svs-provision judges an edit of that file by the
    /// whole configuration svsd would load with it, before writing it.
    /// Without `entities_file` in the file, `entities` is not used.
    pub fn load_with_entities(path: &Path, entities: &str) -> Result<Config, SvsError> {
        let text = read(path)?;
        Config::from_toml_with(&text, path, Some(entities))
    }

    /// [`Config::from_toml`], with the entities file's text given or read.
    fn from_toml_with(
        text: &str,
        path: &Path,
        entities_text: Option<&str>,
    ) -> Result<Config, SvsError> {
        let table = parse_table(text, path)?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let mut errors = Errors::default();
        for k in table.keys() {
            if !SECTIONS.contains(&k.as_str()) {
                errors.push(format!("unknown top-level key {k:?}"));
            }
        }
        let server: Option<RawServer> = errors.required(&table, "server");
        let tls: Option<RawTls> = errors.required(&table, "tls");
        let hsm: Option<HsmConfig> = errors.required(&table, "hsm");
        for p in hsm.iter().flat_map(HsmConfig::problems) {
            errors.push(format!("[hsm] {p}"));
        }
        // svs-hsm applies default_sm2_id only in its message-level calls,
        // which svsd does not make: svsd computes Z itself with the API's
        // documented default. Accepting another value would be a setting
        // that silently does nothing.
        if hsm
            .as_ref()
            .is_some_and(|h| h.default_sm2_id.as_bytes() != DEFAULT_SM2_ID)
        {
            errors.push(format!(
                "[hsm] default_sm2_id: svsd's default ID is fixed at {} (GM/T 0009, as its API documents); remove the setting: clients pass \"id\" for another",
                String::from_utf8_lossy(DEFAULT_SM2_ID)
            ));
        }
        let embedded: Option<RawEmbeddedToken> = errors.section(&table, "embedded_token");
        let raw_keys: Option<BTreeMap<String, RawKey>> = errors.section(&table, "keys");
        let limits: Option<RawLimits> = errors.section(&table, "limits");
        let audit: Option<RawAudit> = errors.required(&table, "audit");
        let selftest: Option<RawSelftest> = errors.section(&table, "selftest");
        let entities_file: Option<PathBuf> = errors.section(&table, "entities_file");
        let raw_metrics: Option<crate::metrics::RawMetrics> = errors.section(&table, "metrics");
        let raw_anomaly: Option<crate::anomaly::RawAnomaly> = errors.section(&table, "anomaly");
        let metrics = crate::metrics::MetricsConfig::from_raw(
            raw_metrics.unwrap_or_default(),
            &base,
            &mut errors.0,
        );
        let anomaly =
            crate::anomaly::AnomalyConfig::from_raw(raw_anomaly.unwrap_or_default(), &mut errors.0);

        // [server]
        let mut listen = Vec::new();
        let mut health_listen = None;
        if let Some(s) = &server {
            if s.grace_period_ms.is_some_and(|g| g > MAX_GRACE_PERIOD_MS) {
                errors.push(format!(
                    "[server] grace_period_ms must be at most {MAX_GRACE_PERIOD_MS} (the unit's TimeoutStopSec is 45 s)"
                ));
            }
            if s.listen.is_empty() {
                errors.push("[server] listen must name at least one address");
            }
            for a in &s.listen {
                match a.parse::<SocketAddr>() {
                    Ok(a) => listen.push(a),
                    Err(_) => errors.push(format!("[server] listen: {a:?} is not ip:port")),
                }
            }
            if let Some(h) = &s.health_listen {
                match h.parse::<SocketAddr>() {
                    Ok(a) => health_listen = Some(a),
                    Err(_) => errors.push(format!("[server] health_listen: {h:?} is not ip:port")),
                }
            }
        }

        // [keys]
        let mut keys = BTreeMap::new();
        for (name, k) in raw_keys.unwrap_or_default() {
            if !valid_name(&name) {
                errors.push(format!(
                    "[keys] {name:?}: name must be 1-128 characters of A-Z a-z 0-9 - _ . :"
                ));
            } else if name.starts_with('_') {
                // Metrics label key names the client made up `_unknown` and
                // operations without a key `_none`.
                errors.push(format!(
                    "[keys] {name:?}: names starting with _ are reserved for svsd"
                ));
            }
            if k.object.is_empty() {
                errors.push(format!("[keys] {name:?}: object must not be empty"));
            }
            keys.insert(name, KeyExposure { object: k.object });
        }
        if keys.is_empty() && table.contains_key("keys") {
            errors.push("[keys] exposes no key");
        }

        // [limits]
        let defaults = Limits::default();
        let l = limits.unwrap_or_default();
        let limits = Limits {
            max_body_bytes: l.max_body_bytes.unwrap_or(defaults.max_body_bytes),
            max_batch_items: l.max_batch_items.unwrap_or(defaults.max_batch_items),
            handshake_timeout: ms(
                l.handshake_timeout_ms,
                defaults.handshake_timeout,
                "handshake_timeout_ms",
                &mut errors,
            ),
            header_timeout: ms(
                l.header_timeout_ms,
                defaults.header_timeout,
                "header_timeout_ms",
                &mut errors,
            ),
            body_timeout: ms(
                l.body_timeout_ms,
                defaults.body_timeout,
                "body_timeout_ms",
                &mut errors,
            ),
            request_timeout: ms(
                l.request_timeout_ms,
                defaults.request_timeout,
                "request_timeout_ms",
                &mut errors,
            ),
            max_connections: l.max_connections.unwrap_or(defaults.max_connections),
            max_handshakes: l.max_handshakes.unwrap_or(defaults.max_handshakes),
            idle_timeout: ms(
                l.idle_timeout_ms,
                defaults.idle_timeout,
                "idle_timeout_ms",
                &mut errors,
            ),
            max_connection_age: ms(
                l.max_connection_age_ms,
                defaults.max_connection_age,
                "max_connection_age_ms",
                &mut errors,
            ),
            close_timeout: ms(
                l.close_timeout_ms,
                defaults.close_timeout,
                "close_timeout_ms",
                &mut errors,
            ),
            max_inflight_body_bytes: l
                .max_inflight_body_bytes
                .unwrap_or(defaults.max_inflight_body_bytes),
            default_max_concurrent: l
                .default_max_concurrent
                .unwrap_or(defaults.default_max_concurrent),
            max_connections_per_entity: l.max_connections_per_entity.unwrap_or_else(|| {
                Limits::default_connections_per_entity(
                    l.max_connections.unwrap_or(defaults.max_connections),
                )
            }),
            max_unknown_connections: l.max_unknown_connections.unwrap_or_else(|| {
                Limits::default_unknown_connections(
                    l.max_connections.unwrap_or(defaults.max_connections),
                )
            }),
        };
        if limits.max_body_bytes < 256 {
            errors.push("[limits] max_body_bytes must be at least 256");
        }
        if limits.max_batch_items == 0 {
            errors.push("[limits] max_batch_items must be > 0");
        }
        // Upper bounds: both are semaphore sizes (tokio panics above
        // usize::MAX >> 3), and neither means anything past the process's
        // file descriptors.
        if !(1..=MAX_CONNECTIONS).contains(&limits.max_connections) {
            errors.push(format!(
                "[limits] max_connections must be 1-{MAX_CONNECTIONS}"
            ));
        }
        if !(1..=MAX_CONNECTIONS).contains(&limits.max_handshakes) {
            errors.push(format!(
                "[limits] max_handshakes must be 1-{MAX_CONNECTIONS}"
            ));
        }
        if limits.default_max_concurrent == 0 {
            errors.push("[limits] default_max_concurrent must be > 0");
        }
        // A cap above max_connections would mean nothing; zero would shut
        // every entity (or every unknown client, and so its 401) out.
        for (name, cap) in [
            (
                "max_connections_per_entity",
                limits.max_connections_per_entity,
            ),
            ("max_unknown_connections", limits.max_unknown_connections),
        ] {
            if cap == 0 || cap > limits.max_connections {
                errors.push(format!(
                    "[limits] {name} must be 1-max_connections ({})",
                    limits.max_connections
                ));
            }
        }
        if limits.max_inflight_body_bytes < limits.max_body_bytes {
            errors.push("[limits] max_inflight_body_bytes must be at least max_body_bytes");
        }
        // The budget is a semaphore of bytes and a request reserves its
        // bytes in one u32 call.
        if limits.max_body_bytes > u32::MAX as usize {
            errors.push("[limits] max_body_bytes must be below 4 GiB");
        }
        if limits.max_inflight_body_bytes > (1 << 40) {
            errors.push("[limits] max_inflight_body_bytes must be at most 1 TiB");
        }

        // [audit]
        let audit = audit.map(|a| {
            let max_file_bytes = a.max_file_bytes.unwrap_or(64 << 20);
            // Start-up reads the newest file whole (and zero-fills it).
            if !(4096..=1 << 30).contains(&max_file_bytes) {
                errors.push("[audit] max_file_bytes must be between 4096 and 1073741824 (1 GiB)");
            }
            let max_group_records = a.max_group_records.unwrap_or(4096);
            if max_group_records == 0 {
                errors.push("[audit] max_group_records must be > 0");
            }
            let checkpoint_interval = match a.checkpoint_interval_s.unwrap_or(300) {
                0 => None,
                s if s > MAX_INTERVAL_S => {
                    errors.push(format!(
                        "[audit] checkpoint_interval_s must be at most {MAX_INTERVAL_S} (a week)"
                    ));
                    None
                }
                s => Some(Duration::from_secs(s)),
            };
            if checkpoint_interval.is_some() && a.checkpoint_key.is_none() {
                errors.push(
                    "[audit] checkpoints need checkpoint_key (set checkpoint_interval_s = 0 to disable them)",
                );
            }
            if let Some(k) = &a.checkpoint_key
                && keys.values().any(|e| &e.object == k)
            {
                errors.push(format!(
                    "[audit] checkpoint_key {k:?} must not also be exposed in [keys]"
                ));
            }
            let anchor_object = match (a.anchor.unwrap_or(true), a.anchor_object) {
                (false, Some(_)) => {
                    errors.push("[audit] anchor_object is set but anchor = false");
                    None
                }
                (false, None) => None,
                (true, None) => Some(DEFAULT_ANCHOR_OBJECT.to_owned()),
                (true, Some(label)) => {
                    if label.is_empty() {
                        errors.push("[audit] anchor_object must not be empty");
                    }
                    Some(label)
                }
            };
            let refusal_records = match a.refusal_records {
                None => DEFAULT_REFUSAL_RECORDS,
                Some(r) => {
                    if !(r.per_second.is_finite() && r.per_second > 0.0) {
                        errors.push("[audit] refusal_records.per_second must be > 0");
                    }
                    RateLimit {
                        per_second: r.per_second,
                        burst: r
                            .burst
                            .unwrap_or_else(|| r.per_second.ceil().clamp(1.0, 1e9) as u32),
                    }
                }
            };
            AuditConfig {
                dir: resolve(&base, a.dir),
                max_file_bytes,
                preallocate: a.preallocate.unwrap_or(true),
                max_group_records,
                checkpoint_interval,
                checkpoint_key: a.checkpoint_key,
                anchor_object,
                refusal_records,
            }
        });

        let selftest_interval = match selftest.and_then(|s| s.interval_s) {
            None => Duration::from_secs(300),
            Some(s) if s == 0 || s > MAX_INTERVAL_S => {
                errors.push(format!(
                    "[selftest] interval_s must be 1-{MAX_INTERVAL_S} (a week)"
                ));
                Duration::from_secs(300)
            }
            Some(s) => Duration::from_secs(s),
        };

        // Two listeners on one port fail only at bind, after the HSM login
        // and the trail's `start` record: refuse them here. An unspecified
        // address (0.0.0.0, ::) takes the port on every address.
        let side = health_listen
            .map(|a| ("[server] health_listen", a))
            .into_iter()
            .chain(metrics.listen.map(|a| ("[metrics] listen", a)));
        let mut bound: Vec<(&str, SocketAddr)> = Vec::new();
        for (what, addr) in listen.iter().map(|a| ("[server] listen", *a)).chain(side) {
            if let Some((other, _)) = bound.iter().find(|(_, b)| {
                b.port() == addr.port()
                    && (b.ip() == addr.ip()
                        || b.ip().is_unspecified()
                        || addr.ip().is_unspecified())
            }) {
                errors.push(format!("{what}: {addr} takes the port of {other}"));
            }
            bound.push((what, addr));
        }

        // Entities: inline, then the separate file.
        let mut entities = entities_from(table.get("entity"), "inline", &keys, &mut errors);
        let entities_file = entities_file.map(|p| resolve(&base, p));
        let mut entities_sha256 = None;
        if let Some(file) = &entities_file {
            let text = match entities_text {
                Some(t) => Ok(std::borrow::Cow::Borrowed(t)),
                None => read(file).map(std::borrow::Cow::Owned),
            };
            let loaded = text.and_then(|text| {
                entities_sha256 =
                    Some(<sha2::Sha256 as sha2::Digest>::digest(text.as_bytes()).into());
                entities_from_toml(&text, file, &keys)
            });
            match loaded {
                Ok(list) => entities.extend(list),
                Err(SvsError::Config(list)) => errors.0.extend(list),
                Err(other) => errors.push(other.to_string()),
            }
        }
        let mut names = BTreeSet::new();
        // Keyed by the match itself: subject + issuer written two ways that
        // mean the same names are the same client.
        let mut matchers = std::collections::HashMap::new();
        for e in &entities {
            if !names.insert(e.name.clone()) {
                errors.push(format!("entity {:?} is defined twice", e.name));
            }
            if let Some(other) = matchers.insert(e.client.clone(), e.name.clone()) {
                errors.push(format!(
                    "entities {other:?} and {:?} match the same client certificate",
                    e.name
                ));
            }
        }

        if !errors.0.is_empty() {
            // Two files may be involved: each error names its own (the
            // entities file's errors name it already).
            let own = entities_file.as_ref().map(|f| f.display().to_string());
            let named = errors
                .0
                .into_iter()
                .map(|e| match &own {
                    Some(f) if e.starts_with(f.as_str()) => e,
                    _ => format!("{}: {e}", path.display()),
                })
                .collect();
            return Err(SvsError::Config(named));
        }
        let (Some(server), Some(tls), Some(hsm), Some(audit)) = (server, tls, hsm, audit) else {
            return Err(SvsError::Internal("a required section vanished".into()));
        };
        Ok(Config {
            path: path.to_path_buf(),
            listen,
            health_listen,
            tls: TlsFiles {
                certificate: resolve(&base, tls.certificate),
                private_key: resolve(&base, tls.private_key),
                client_ca: resolve(&base, tls.client_ca),
            },
            grace_period: Duration::from_millis(server.grace_period_ms.unwrap_or(10_000)),
            allow_root: server.allow_root,
            hsm,
            embedded_token_config: embedded.map(|e| resolve(&base, e.config)),
            keys,
            limits,
            audit,
            selftest_interval,
            entities_file,
            entities_sha256,
            entities,
            metrics,
            anomaly,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    fn good() -> String {
        format!(
            r#"
[server]
listen = ["127.0.0.1:8443"]
[tls]
certificate = "server.pem"
private_key = "server.key"
client_ca = "/etc/svs/ca.pem"
[hsm]
module = "embedded"
token_label = "svs"
pin = {{ file = "/run/pin" }}
[keys]
demo = {{ object = "demo" }}
[audit]
dir = "audit"
checkpoint_key = "svs-audit"
[[entity]]
name = "app1"
certificate_sha256 = "{FP}"
keys = ["demo"]
operations = ["sign", "verify"]
rate = {{ per_second = 10.0, burst = 20 }}
max_concurrent = 4
[[entity]]
name = "app2"
status = "suspended"
subject = "CN = app2, o=Example"
issuer = "CN=SVS CA"
operations = ["verify"]
"#
        )
    }

    #[test]
    fn a_good_file_gets_defaults_and_resolved_paths() {
        let c = Config::from_toml(&good(), Path::new("/etc/svs/svsd.toml")).unwrap();
        assert_eq!(c.listen, vec!["127.0.0.1:8443".parse().unwrap()]);
        assert_eq!(c.tls.certificate, PathBuf::from("/etc/svs/server.pem"));
        assert_eq!(c.tls.client_ca, PathBuf::from("/etc/svs/ca.pem"));
        assert_eq!(c.audit.dir, PathBuf::from("/etc/svs/audit"));
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.audit.checkpoint_interval, Some(Duration::from_secs(300)));
        assert_eq!(c.entities.len(), 2);
        assert_eq!(
            c.entities[0].client,
            ClientMatch::CertificateSha256([
                0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
                0xee, 0xff, 0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb,
                0xcc, 0xdd, 0xee, 0xff
            ])
        );
        assert_eq!(
            c.entities[1].client,
            ClientMatch::Subject {
                subject: "CN=app2,O=Example".parse().unwrap(),
                issuer: "CN=SVS CA".parse().unwrap()
            }
        );
        assert_eq!(c.entities[1].status, EntityStatus::Suspended);
        assert_eq!(c.entities[0].rate.unwrap().burst, 20);
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let text = r#"
bogus = 1
[server]
listen = ["nonsense"]
colour = "blue"
[tls]
certificate = "a"
private_key = "b"
[hsm]
modul = "embedded"
[keys]
demo = { object = "" }
[limits]
max_batch_items = 0
body_timeout_ms = 0
close_timeout_ms = 0
max_connections = 9999999999
[selftest]
interval_s = 99999999999
[[entity]]
name = "bad name!"
operations = ["sign"]
keys = ["nope"]
[[entity]]
name = "x"
operations = ["dance"]
"#;
        let Err(SvsError::Config(errs)) = Config::from_toml(text, Path::new("/x/svsd.toml")) else {
            panic!("expected errors")
        };
        let all = errs.join("\n");
        for needle in [
            "unknown top-level key \"bogus\"",
            "[server]",
            "colour",
            "[tls]",
            "client_ca",
            "[hsm]",
            "modul",
            "object must not be empty",
            "max_batch_items",
            "body_timeout_ms",
            "close_timeout_ms",
            "max_connections must be 1-1000000",
            "[selftest] interval_s must be 1-",
            "[audit] is missing",
            "name must be",
            "exactly one of",
            "\"nope\" is not in [keys]",
            "inline entity \"x\": unknown variant `dance`",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn connection_caps_default_to_shares_of_max_connections() {
        let d = Limits::default();
        assert_eq!(
            (d.max_connections_per_entity, d.max_unknown_connections),
            (2048, 256)
        );
        assert_eq!(d.default_max_concurrent, DEFAULT_MAX_CONCURRENT);
        let with = |limits: &str| {
            let text = good().replace("[audit]", &format!("[limits]\n{limits}\n[audit]"));
            Config::from_toml(&text, Path::new("/etc/svs/svsd.toml"))
        };
        // Derived from the max_connections in the file...
        let l = with("max_connections = 40").unwrap().limits;
        assert_eq!(
            (l.max_connections_per_entity, l.max_unknown_connections),
            (20, 2)
        );
        let l = with("max_connections = 1").unwrap().limits;
        assert_eq!(
            (l.max_connections_per_entity, l.max_unknown_connections),
            (1, 1)
        );
        // ...unless set.
        let l = with(
            "max_connections = 40\nmax_connections_per_entity = 40\nmax_unknown_connections = 1",
        )
        .unwrap()
        .limits;
        assert_eq!(
            (l.max_connections_per_entity, l.max_unknown_connections),
            (40, 1)
        );
        let Err(SvsError::Config(errs)) = with(
            "max_connections = 40\nmax_connections_per_entity = 41\nmax_unknown_connections = 0\ndefault_max_concurrent = 0",
        ) else {
            panic!("caps out of range accepted")
        };
        let all = errs.join("\n");
        for needle in [
            "max_connections_per_entity must be 1-max_connections (40)",
            "max_unknown_connections must be 1-max_connections (40)",
            "default_max_concurrent must be > 0",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    fn errors_of(text: &str) -> String {
        match Config::from_toml(text, Path::new("/etc/svs/svsd.toml")) {
            Err(SvsError::Config(errs)) => errs.join("\n"),
            other => panic!("expected configuration errors, got {other:?}"),
        }
    }

    #[test]
    fn a_syntax_error_says_where() {
        let text = good().replace("token_label = \"svs\"", "token_label \"svs\"");
        let Err(SvsError::Config(errs)) = Config::from_toml(&text, Path::new("/etc/svs/svsd.toml"))
        else {
            panic!("expected a syntax error")
        };
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("/etc/svs/svsd.toml: line 10, column 13: "),
            "{errs:?}"
        );
        assert!(!errs[0].contains('\n'), "one line: {errs:?}");
        // The offending line is not quoted: it could hold a secret.
        assert!(!errs[0].contains("\"svs\""), "{errs:?}");
        // The same for the entities file, in its own name.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("entities.toml");
        std::fs::write(&file, "[[entity]]\nname \"bank-a\"\n").unwrap();
        let Err(SvsError::Config(errs)) = entities_from_toml(
            &std::fs::read_to_string(&file).unwrap(),
            &file,
            &BTreeMap::new(),
        ) else {
            panic!("expected a syntax error")
        };
        assert!(
            errs[0].starts_with(&format!("{}: line 2, column 6: ", file.display())),
            "{errs:?}"
        );
        assert_eq!(
            syntax_error(Path::new("f.toml"), "a\nb =", Some(5..6), "x"),
            "f.toml: line 2, column 4: x"
        );
        assert_eq!(
            syntax_error(Path::new("f.toml"), "", None, "x"),
            "f.toml: x"
        );
    }

    #[test]
    fn a_section_reports_its_unknown_keys_and_bad_values_together() {
        let text = good().replace(
            "[audit]\n",
            "[limits]\nmax_batch_items = 0\nmax_body_bytes = 10\nidle_timout_ms = 5\nmax_conections = 1\n[audit]\n",
        );
        let all = errors_of(&text);
        for needle in [
            "[limits]: unknown field `idle_timout_ms`, expected one of",
            "[limits]: unknown field `max_conections`",
            "[limits] max_batch_items must be > 0",
            "[limits] max_body_bytes must be at least 256",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        // A wrong type is reported with its key, beside the unknown one.
        let text = good().replace(
            "[audit]\n",
            "[audit]\nmax_group_records = \"many\"\nrotate = true\n",
        );
        let all = errors_of(&text);
        assert!(all.contains("[audit]: unknown field `rotate`"), "{all}");
        assert!(all.contains("in `max_group_records`"), "{all}");
        // A bad value, or an unknown key inside an inline table, hides
        // neither the section's other errors nor the rest of the section.
        let text = good().replace(
            "[audit]
",
            "[limits]
max_body_bytes = \"x\"\nmax_batch_items = 0\n[audit]\nrefusal_records = { per_second = 1.0, brust = 3 }\ncheckpoint_interval_s = 999999999\n",
        );
        let all = errors_of(&text);
        for needle in [
            "[limits]: invalid type: string \"x\", expected usize in `max_body_bytes`",
            "[limits] max_batch_items must be > 0",
            "[audit]: unknown field `brust`, expected `per_second` or `burst` in `refusal_records`",
            "[audit] checkpoint_interval_s must be at most",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        // Neither a consequence of a left-out key ("missing") nor of a
        // dropped section ([audit] is required) is reported.
        assert!(!all.contains("missing"), "{all}");
        // Each error names its file.
        assert!(
            all.lines().all(|l| l.starts_with("/etc/svs/svsd.toml: [")),
            "{all}"
        );
    }

    #[test]
    fn an_entity_reports_all_its_errors_under_its_name() {
        let entity = "[[entity]]\nname = \"bank-a\"\ncertificate_sha256 = \"zz\"\noperations = [\"verify\"]\nmax_concurent = 3\nowner = \"ops\"\n";
        let all = errors_of(&format!("{}{entity}", good()));
        for needle in [
            "inline entity \"bank-a\": unknown field `max_concurent`",
            "inline entity \"bank-a\": unknown field `owner`",
            "inline entity \"bank-a\": certificate_sha256 must be 64 hex digits",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        // Without a usable name, by position.
        let all = errors_of(&format!(
            "{}[[entity]]\nname = 7\noperations = [\"verify\"]\n",
            good()
        ));
        assert!(all.contains("inline entity #3: invalid type"), "{all}");
        // The entities file is read the same way.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("entities.toml");
        std::fs::write(&file, entity).unwrap();
        let Err(SvsError::Config(errs)) = entities_from_toml(
            &std::fs::read_to_string(&file).unwrap(),
            &file,
            &BTreeMap::new(),
        ) else {
            panic!("expected errors")
        };
        let all = errs.join("\n");
        let label = format!("{} entity \"bank-a\"", file.display());
        for needle in [
            format!("{label}: unknown field `max_concurent`"),
            format!("{label}: unknown field `owner`"),
            format!("{label}: certificate_sha256 must be 64 hex digits"),
        ] {
            assert!(all.contains(&needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn only_the_standard_default_sm2_id_is_accepted() {
        let with = |id: &str| {
            good().replace(
                "token_label = \"svs\"\n",
                &format!("token_label = \"svs\"\ndefault_sm2_id = \"{id}\"\n"),
            )
        };
        let c = Config::from_toml(&with("1234567812345678"), Path::new("/x.toml")).unwrap();
        assert_eq!(c.hsm.default_sm2_id.as_bytes(), DEFAULT_SM2_ID);
        let all = errors_of(&with("ALICE123@YAHOO.COM"));
        assert!(
            all.contains("[hsm] default_sm2_id: svsd's default ID is fixed at 1234567812345678"),
            "{all}"
        );
    }

    #[test]
    fn the_audit_anchor_is_on_by_default_and_can_be_named_or_turned_off() {
        let parse = |extra: &str| {
            let text = good().replace("[audit]\n", &format!("[audit]\n{extra}"));
            Config::from_toml(&text, Path::new("/x.toml")).map(|c| c.audit.anchor_object)
        };
        assert_eq!(parse("").unwrap().as_deref(), Some(DEFAULT_ANCHOR_OBJECT));
        assert_eq!(
            parse("anchor_object = \"svs-b\"\n").unwrap().as_deref(),
            Some("svs-b")
        );
        assert_eq!(parse("anchor = false\n").unwrap(), None);
        for (bad, needle) in [
            (
                "anchor = false\nanchor_object = \"x\"\n",
                "anchor_object is set but anchor = false",
            ),
            ("anchor_object = \"\"\n", "anchor_object must not be empty"),
        ] {
            let Err(SvsError::Config(errs)) = parse(bad) else {
                panic!("{bad}")
            };
            assert!(errs.join("\n").contains(needle), "{errs:?}");
        }
    }

    #[test]
    fn an_unreadable_subject_or_issuer_is_reported_with_the_other_errors() {
        let all = errors_of(&format!(
            "{}[[entity]]\nname = \"dn-bad\"\nsubject = 'CN=bank\\q,O=Bank'\nissuer = 'CN=CA;O=\\E4\\B8'\noperations = []\n",
            good()
        ));
        for needle in [
            r#"inline entity "dn-bad": subject "CN=bank\q,O=Bank" is not an RFC 4514 distinguished name: CN: \q is no escape"#,
            r#"inline entity "dn-bad": issuer "CN=CA;O=\E4\B8" is not an RFC 4514 distinguished name: CN: ; must be escaped"#,
            r#"inline entity "dn-bad": operations must not be empty"#,
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn a_subject_written_another_way_is_the_same_client() {
        // app2 of good() again, as openssl prints it.
        let all = errors_of(&format!(
            "{}[[entity]]\nname = \"app2-again\"\nsubject = 'cn=app2 , O=\\45xample'\nissuer = 'CN=SVS CA'\noperations = [\"verify\"]\n",
            good()
        ));
        assert!(
            all.contains(r#"entities "app2" and "app2-again" match the same client certificate"#),
            "{all}"
        );
    }

    #[test]
    fn duplicates_and_shared_certificates_are_refused() {
        let mut text = good();
        text.push_str(&format!(
            "[[entity]]\nname = \"app1\"\ncertificate_sha256 = \"{FP}\"\noperations = [\"verify\"]\n"
        ));
        let Err(SvsError::Config(errs)) = Config::from_toml(&text, Path::new("/x.toml")) else {
            panic!()
        };
        let all = errs.join("\n");
        assert!(all.contains("defined twice"), "{all}");
        assert!(all.contains("match the same client certificate"), "{all}");
        // Listeners sharing a port, a drain longer than systemd waits, a
        // checkpoint interval past a week, a reserved key name.
        let text = good()
            .replace(
                "[server]\n",
                "[server]\nhealth_listen = \"0.0.0.0:8443\"\ngrace_period_ms = 60000\n",
            )
            .replace(
                "checkpoint_key = \"svs-audit\"\n",
                "checkpoint_key = \"svs-audit\"\ncheckpoint_interval_s = 99999999\n",
            )
            .replace("[keys]\n", "[keys]\n_none = { object = \"x\" }\n")
            .replace(
                "token_label = \"svs\"\n",
                "token_label = \"svs\"\nprofile = \"nonesuch\"\n",
            )
            .replace(
                "[audit]\n",
                "[metrics]\nlisten = \"127.0.0.1:8443\"\n[audit]\n",
            );
        let Err(SvsError::Config(errs)) = Config::from_toml(&text, Path::new("/x.toml")) else {
            panic!()
        };
        let all = errs.join("\n");
        for needle in [
            "[server] health_listen: 0.0.0.0:8443 takes the port of [server] listen",
            "[metrics] listen: 127.0.0.1:8443 takes the port of [server] listen",
            "grace_period_ms must be at most 40000",
            "checkpoint_interval_s must be at most",
            "[keys] \"_none\": names starting with _ are reserved",
            "[hsm] profile \"nonesuch\" is not known",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        // The name svsd gives clients no entity claims is not an entity's.
        let text = good().replace("name = \"app1\"", "name = \"_unknown\"");
        let Err(SvsError::Config(errs)) = Config::from_toml(&text, Path::new("/x.toml")) else {
            panic!()
        };
        assert!(errs.join("\n").contains("reserved"), "{errs:?}");
    }

    #[test]
    fn entities_file_is_merged_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("entities.toml");
        std::fs::write(
            &file,
            format!(
                "[[entity]]\nname = \"ext\"\nspki_sha256 = \"{}\"\nkeys = [\"demo\"]\noperations = [\"sign\"]\n",
                FP.replace("00", "01")
            ),
        )
        .unwrap();
        let text = good().replacen("[server]", "entities_file = \"entities.toml\"\n[server]", 1);
        let c = Config::from_toml(&text, &dir.path().join("svsd.toml")).unwrap();
        assert_eq!(c.entities.len(), 3);
        assert_eq!(c.entities[2].name, "ext");
        std::fs::write(&file, "[[entity]]\nname = \"ext\"\nsurprise = 1\n").unwrap();
        let Err(SvsError::Config(errs)) = Config::from_toml(&text, &dir.path().join("svsd.toml"))
        else {
            panic!()
        };
        assert!(errs.join("\n").contains("surprise"));
    }

    #[test]
    fn entities_text_given_instead_of_the_file_is_judged_with_the_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let (config, file) = (
            dir.path().join("svsd.toml"),
            dir.path().join("entities.toml"),
        );
        let text = good().replacen("[server]", "entities_file = \"entities.toml\"\n[server]", 1);
        std::fs::write(&config, text).unwrap();
        let entity = |key: &str| {
            format!(
                "[[entity]]\nname = \"ext\"\nspki_sha256 = \"{}\"\nkeys = [\"{key}\"]\noperations = [\"sign\"]\n",
                FP.replace("00", "01")
            )
        };
        // The file on disk names a key svsd.toml no longer exposes.
        std::fs::write(&file, entity("retired")).unwrap();
        assert!(Config::load(&config).is_err());
        let fixed = entity("demo");
        let c = Config::load_with_entities(&config, &fixed).unwrap();
        assert_eq!(c.entities.last().unwrap().name, "ext");
        let digest: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(fixed.as_bytes()).into();
        assert_eq!(c.entities_sha256, Some(digest));
        // The text given is checked against the inline entities too, and
        // its errors name the file it stands for.
        let inline_client = entity("demo")
            .replace("spki_sha256", "certificate_sha256")
            .replace(&FP.replace("00", "01"), FP);
        let Err(SvsError::Config(errs)) = Config::load_with_entities(&config, &inline_client)
        else {
            panic!()
        };
        assert!(
            errs.join("\n").contains("match the same client"),
            "{errs:?}"
        );
        let Err(SvsError::Config(errs)) = Config::load_with_entities(&config, &entity("retired"))
        else {
            panic!()
        };
        let named = format!("{} entity \"ext\": key \"retired\"", file.display());
        assert!(errs.iter().any(|e| e.starts_with(&named)), "{errs:?}");
    }

    #[test]
    fn fingerprints_and_dns_normalise() {
        let colons = FP
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap().to_uppercase())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(parse_fingerprint(&colons), parse_fingerprint(FP));
        assert!(parse_fingerprint("abc").is_none());
        assert!(parse_fingerprint(&"zz".repeat(32)).is_none());
    }

    #[test]
    fn refusal_records_default_and_are_checked_with_the_other_errors() {
        let c = Config::from_toml(&good(), Path::new("/x.toml")).unwrap();
        assert_eq!(c.audit.refusal_records, DEFAULT_REFUSAL_RECORDS);
        let with = |line: &str| {
            Config::from_toml(
                &good().replacen("[audit]\n", &format!("[audit]\n{line}\n"), 1),
                Path::new("/x.toml"),
            )
        };
        let c = with("refusal_records = { per_second = 5.0, burst = 0 }").unwrap();
        let want = RateLimit {
            per_second: 5.0,
            burst: 0,
        };
        assert_eq!(c.audit.refusal_records, want, "0: summaries only");
        let c = with("refusal_records = { per_second = 2.5 }").unwrap();
        assert_eq!(c.audit.refusal_records.burst, 3, "as an entity's rate");
        for bad in [
            "refusal_records = { per_second = 0.0 }",
            "refusal_records = { per_second = -1.0, burst = 5 }",
        ] {
            let Err(SvsError::Config(errs)) = with(&format!("{bad}\nmax_group_records = 0")) else {
                panic!("{bad} accepted")
            };
            let all = errs.join("\n");
            assert!(
                all.contains("refusal_records.per_second must be > 0"),
                "{all}"
            );
            assert!(all.contains("max_group_records"), "{all}");
        }
        let Err(SvsError::Config(errs)) = with("refusal_records = { per_second = 1.0, brust = 2 }")
        else {
            panic!("a misspelt field is an error")
        };
        assert!(errs.join("\n").contains("brust"), "{errs:?}");
    }
}
