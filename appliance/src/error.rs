//! The crate's one error type and the one place that decides what each
//! error looks like on the wire (HTTP status, snake_case code, Retry-After).
//!
//! Messages never contain request payloads, PINs or key material: they name
//! fields, sizes and key names only.

use std::time::Duration;

use svs_hsm::HsmError;

use crate::refusals::LogLimits;

/// The 5xx detail lines of the whole process, one limiter per code of a
/// 5xx answer whose details are logged (a fixed set of codes). Clients can
/// cause some 5xx at will (every signing request while the audit trail is
/// broken or the HSM is down), so each code gets at most one line a second.
static FAILURE_LINES: LogLimits<&'static str> = LogLimits::new(Duration::from_secs(1));

/// Logs, per code, the server-side failures held back since that code's
/// last line, once its second is over, so that the tail of a burst is
/// reported even when no failure follows it. Called once a second.
pub fn log_held_back_failures() {
    for (code, held_back) in FAILURE_LINES.held_back() {
        tracing::warn!(
            code,
            held_back,
            "request failures left out of the log since its last line"
        );
    }
}

/// Every error svsd produces, from configuration to a single batch item.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvsError {
    /// The request body is not JSON, or not the JSON this endpoint takes
    /// (unknown or missing fields, wrong types).
    #[error("malformed request: {0}")]
    MalformedRequest(String),
    /// The JSON is well-formed but the fields contradict each other.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A binary field is not valid base64.
    #[error("field {0:?} is not valid base64")]
    InvalidBase64(&'static str),
    /// A digest that is not 32 bytes.
    #[error("digest must be 32 bytes, got {0}")]
    InvalidDigest(usize),
    /// A signature that is not in the declared encoding.
    #[error("invalid signature encoding: {0}")]
    InvalidSignature(String),
    /// A public key that does not parse or is not a valid SM2 point.
    #[error("invalid public key: {0}")]
    InvalidPublicKey(String),
    /// A certificate that does not parse or carries no SM2 key.
    #[error("invalid certificate: {0}")]
    InvalidCertificate(String),
    /// A distinguishing ID that is empty or too long.
    #[error("invalid distinguishing ID: {0}")]
    InvalidId(String),
    /// The request body is larger than the configured maximum.
    #[error("request body exceeds {0} bytes")]
    BodyTooLarge(usize),
    /// A batch with more items than the configured maximum (counting
    /// stops at the first item over it).
    #[error("batch exceeds the maximum of {max} items")]
    BatchTooLarge {
        /// Configured maximum.
        max: usize,
    },
    /// The body did not arrive in time.
    #[error("request body not received within {0:?}")]
    BodyTimeout(Duration),
    /// A POST whose Content-Type is not JSON.
    #[error("content type must be application/json")]
    UnsupportedMediaType,
    /// No such route.
    #[error("no such resource")]
    NotFound,
    /// The route exists with another method.
    #[error("method not allowed")]
    MethodNotAllowed {
        /// The methods the route takes, for the `Allow` header.
        allow: &'static str,
    },
    /// The client certificate was verified by TLS but matches no entity.
    #[error("client certificate matches no application entity")]
    Unauthenticated,
    /// The connection's client certificate passed its handshake but no
    /// longer passes: expired since, or no longer issued by a CA of the
    /// client CA bundle a reload installed.
    #[error("client certificate {0}")]
    ClientCertificateRefused(&'static str),
    /// The entity is suspended.
    #[error("application entity {0:?} is suspended")]
    EntitySuspended(String),
    /// No exposed key has this name.
    #[error("unknown key {}", ClientText(.0))]
    UnknownKey(String),
    /// The key exists but this entity may not use it.
    #[error("key {0:?} is not allowed for this application entity")]
    KeyNotAllowed(String),
    /// The entity may not perform this operation.
    #[error("operation {0:?} is not allowed for this application entity")]
    OperationNotAllowed(&'static str),
    /// The entity's token bucket is empty.
    #[error("rate limit exceeded")]
    RateLimited {
        /// When a retry can succeed.
        retry_after: Duration,
    },
    /// The entity's traffic is judged abnormal and it is throttled to its
    /// usual rate (`[anomaly] enforce`), whatever its own rate limit. Same
    /// wire code as [`SvsError::RateLimited`]: clients back off the same way.
    #[error("abnormal traffic: throttled to this entity's usual rate")]
    Throttled {
        /// When a retry can succeed.
        retry_after: Duration,
    },
    /// The entity already has its maximum of requests in flight.
    #[error("too many concurrent requests")]
    TooManyConcurrent,
    /// The HSM's job queue is full.
    #[error("HSM busy")]
    HsmBusy {
        /// Suggested delay.
        retry_after: Duration,
    },
    /// The HSM did not answer in time.
    #[error("HSM operation timed out")]
    HsmTimeout,
    /// The whole handling of a request (after its body arrived) took longer
    /// than `request_timeout_ms`: queues anywhere, not only the HSM's.
    #[error("request not handled within {0:?}")]
    RequestTimeout(Duration),
    /// The server's budget of request bodies held in memory is spent.
    #[error("server busy")]
    ServerBusy {
        /// Suggested delay.
        retry_after: Duration,
    },
    /// The HSM is down or failed (details go to the log, not to clients).
    #[error("HSM unavailable: {0}")]
    HsmUnavailable(String),
    /// The audit trail cannot be written: nothing is signed unaudited.
    #[error("audit trail unavailable: {0}")]
    AuditUnavailable(String),
    /// Not ready to sign: the category is what clients see, the detail
    /// (paths, the HSM's last error, self-test output) only the log.
    #[error("not ready: {0}: {1}")]
    NotReady(NotReady, String),
    /// The token refused the PIN at start-up: fatal, because every retry is
    /// another failed login on the way to locking the PIN.
    #[error("the token refused the PIN: {0}")]
    PinRefused(String),
    /// The daemon is draining for shutdown.
    #[error("shutting down")]
    ShuttingDown,
    /// Configuration errors, all of them.
    #[error("configuration:\n  {}", .0.join("\n  "))]
    Config(Vec<String>),
    /// Start-up or runtime I/O failure (files, sockets).
    #[error("{0}")]
    Io(String),
    /// A bug or an unexpected state.
    #[error("internal error: {0}")]
    Internal(String),
}

/// What an unprovisioned installation lacks, in the words clients and
/// operators see (no paths: those are in the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Missing {
    /// The API's (or the metrics listener's) certificate, key or client CA.
    Tls,
    /// The HSM user PIN (file or systemd credential).
    Pin,
    /// No token with the configured label/serial.
    Token,
    /// Configured keys (or the audit checkpoint key) not on the token.
    Keys,
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Missing::Tls => "TLS files",
            Missing::Pin => "HSM PIN",
            Missing::Token => "token",
            Missing::Keys => "keys",
        })
    }
}

/// Why svsd is not ready, as a fixed category: the one text /readyz, API
/// clients and systemd's STATUS= show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotReady {
    /// Start-up found parts of the installation missing (sorted, no duplicates).
    NotProvisioned(Vec<Missing>),
    /// The first start attempt is still running (files, HSM login, keys,
    /// audit trail): nothing has failed yet.
    Starting,
    /// The HSM cannot be reached, or its sessions are not logged in.
    HsmUnavailable,
    /// The start-up self-tests have not finished.
    SelftestsPending,
    /// A self-test failed (at start or periodically).
    SelftestsFailed,
}

impl NotReady {
    /// Not provisioned: `missing`, in a stable order.
    pub fn not_provisioned(mut missing: Vec<Missing>) -> NotReady {
        missing.sort();
        missing.dedup();
        NotReady::NotProvisioned(missing)
    }
}

/// A name the client made up, as an error message repeats it: quoted and
/// escaped, and cut at [`ClientText::MAX_CHARS`], so a message never
/// carries kilobytes of whatever a client sent (the name's length says
/// enough).
struct ClientText<'a>(&'a str);

impl ClientText<'_> {
    const MAX_CHARS: usize = 64;
}

impl std::fmt::Display for ClientText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.char_indices().nth(Self::MAX_CHARS) {
            None => write!(f, "{:?}", self.0),
            Some((cut, _)) => write!(
                f,
                "{:?}\u{2026} ({} characters)",
                &self.0[..cut],
                self.0.chars().count()
            ),
        }
    }
}

/// Every reason label of `svs_not_ready_reason` (docs/monitoring.md).
pub const NOT_READY_REASONS: &[&str] = &[
    "starting",
    "not_provisioned",
    "hsm_unavailable",
    "selftests_pending",
    "selftests_failed",
    "audit_unavailable",
    "shutting_down",
    "other",
];

/// The fixed reason label of a readiness failure, one of
/// [`NOT_READY_REASONS`]: what an alert can route on without parsing text.
pub fn not_ready_reason(e: &SvsError) -> &'static str {
    match e {
        SvsError::NotReady(NotReady::Starting, _) => "starting",
        SvsError::NotReady(NotReady::NotProvisioned(_), _) => "not_provisioned",
        SvsError::NotReady(NotReady::HsmUnavailable, _) => "hsm_unavailable",
        SvsError::NotReady(NotReady::SelftestsPending, _) => "selftests_pending",
        SvsError::NotReady(NotReady::SelftestsFailed, _) => "selftests_failed",
        SvsError::AuditUnavailable(_) => "audit_unavailable",
        SvsError::ShuttingDown => "shutting_down",
        _ => "other",
    }
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotReady::NotProvisioned(missing) => {
                let list: Vec<String> = missing.iter().map(ToString::to_string).collect();
                write!(
                    f,
                    "not provisioned: {} missing \u{2014} provision the appliance (docs/operations.md §3)",
                    list.join(", ")
                )
            }
            NotReady::Starting => f.write_str("starting"),
            NotReady::HsmUnavailable => f.write_str("HSM unavailable or not logged in"),
            NotReady::SelftestsPending => f.write_str("self-tests pending"),
            NotReady::SelftestsFailed => f.write_str("self-tests failed"),
        }
    }
}

/// Every code [`SvsError::wire`] can produce (the OpenAPI document lists them).
pub const ALL_CODES: &[&str] = &[
    "malformed_request",
    "invalid_request",
    "invalid_base64",
    "invalid_digest",
    "invalid_signature",
    "invalid_public_key",
    "invalid_certificate",
    "invalid_id",
    "body_too_large",
    "batch_too_large",
    "request_timeout",
    "unsupported_media_type",
    "not_found",
    "method_not_allowed",
    "unauthenticated",
    "entity_suspended",
    "unknown_key",
    "key_not_allowed",
    "operation_not_allowed",
    "rate_limited",
    "too_many_concurrent_requests",
    "hsm_busy",
    "hsm_timeout",
    "server_busy",
    "hsm_unavailable",
    "audit_unavailable",
    "not_ready",
    "shutting_down",
    "configuration_error",
    "internal_error",
];

/// How an error is sent to a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wire {
    /// HTTP status code.
    pub status: u16,
    /// Stable snake_case code for programs.
    pub code: &'static str,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
    /// An `Allow` header (a 405 must list the methods the route takes).
    pub allow: Option<&'static str>,
}

fn secs_up(d: Duration) -> u64 {
    // Retry-After has one-second resolution; never tell a client "0".
    d.as_secs() + u64::from(d.subsec_nanos() > 0).max(u64::from(d.as_secs() == 0))
}

/// [`SvsError::ClientCertificateRefused`]: past its notAfter.
pub const CERTIFICATE_EXPIRED: &str = "expired";
/// [`SvsError::ClientCertificateRefused`]: its chain fails the current
/// client CA bundle.
pub const CERTIFICATE_NOT_TRUSTED: &str = "no longer issued by a CA of client_ca";

impl SvsError {
    /// The one mapping to the wire. Exhaustive on purpose: a new variant must
    /// be given its status and code here.
    pub fn wire(&self) -> Wire {
        let (status, code, retry_after) = match self {
            SvsError::MalformedRequest(_) => (400, "malformed_request", None),
            SvsError::InvalidRequest(_) => (400, "invalid_request", None),
            SvsError::InvalidBase64(_) => (400, "invalid_base64", None),
            SvsError::InvalidDigest(_) => (400, "invalid_digest", None),
            SvsError::InvalidSignature(_) => (400, "invalid_signature", None),
            SvsError::InvalidPublicKey(_) => (400, "invalid_public_key", None),
            SvsError::InvalidCertificate(_) => (400, "invalid_certificate", None),
            SvsError::InvalidId(_) => (400, "invalid_id", None),
            SvsError::BodyTooLarge(_) => (413, "body_too_large", None),
            SvsError::BatchTooLarge { .. } => (413, "batch_too_large", None),
            SvsError::BodyTimeout(_) => (408, "request_timeout", None),
            SvsError::UnsupportedMediaType => (415, "unsupported_media_type", None),
            SvsError::NotFound => (404, "not_found", None),
            SvsError::MethodNotAllowed { .. } => (405, "method_not_allowed", None),
            SvsError::Unauthenticated | SvsError::ClientCertificateRefused(_) => {
                (401, "unauthenticated", None)
            }
            SvsError::EntitySuspended(_) => (403, "entity_suspended", None),
            SvsError::UnknownKey(_) => (404, "unknown_key", None),
            SvsError::KeyNotAllowed(_) => (403, "key_not_allowed", None),
            SvsError::OperationNotAllowed(_) => (403, "operation_not_allowed", None),
            SvsError::RateLimited { retry_after } => {
                (429, "rate_limited", Some(secs_up(*retry_after)))
            }
            SvsError::Throttled { retry_after } => {
                (429, "rate_limited", Some(secs_up(*retry_after)))
            }
            SvsError::TooManyConcurrent => (429, "too_many_concurrent_requests", Some(1)),
            SvsError::HsmBusy { retry_after } => (503, "hsm_busy", Some(secs_up(*retry_after))),
            SvsError::HsmTimeout => (504, "hsm_timeout", None),
            SvsError::RequestTimeout(_) => (504, "request_timeout", None),
            SvsError::ServerBusy { retry_after } => {
                (503, "server_busy", Some(secs_up(*retry_after)))
            }
            SvsError::HsmUnavailable(_) => (503, "hsm_unavailable", Some(1)),
            SvsError::AuditUnavailable(_) => (503, "audit_unavailable", None),
            SvsError::NotReady(..) => (503, "not_ready", Some(1)),
            SvsError::PinRefused(_) => (503, "hsm_unavailable", None),
            SvsError::ShuttingDown => (503, "shutting_down", Some(1)),
            SvsError::Config(_) => (500, "configuration_error", None),
            SvsError::Io(_) => (500, "internal_error", None),
            SvsError::Internal(_) => (500, "internal_error", None),
        };
        let allow = match self {
            SvsError::MethodNotAllowed { allow } => Some(*allow),
            _ => None,
        };
        Wire {
            status,
            code,
            retry_after,
            allow,
        }
    }

    /// The message sent to clients: internal details (OS errors, paths, the
    /// HSM's last error, self-test output) stay in the log.
    pub fn client_message(&self) -> String {
        match self {
            SvsError::HsmUnavailable(_) => "HSM unavailable".into(),
            SvsError::PinRefused(_) => "HSM unavailable or not logged in".into(),
            SvsError::AuditUnavailable(_) => {
                "audit trail not writable: nothing is signed unaudited (details in the svsd log)"
                    .into()
            }
            SvsError::NotReady(reason, _) => reason.to_string(),
            SvsError::Io(_) | SvsError::Internal(_) | SvsError::Config(_) => {
                "internal error".into()
            }
            other => other.to_string(),
        }
    }

    /// Whether the client caused this refusal or failure, so that it counts
    /// as an error of its entity in abnormal-traffic detection: any 4xx.
    /// A 5xx is the server's state (HSM, audit trail, body budget, drain),
    /// which every tenant meets alike; counted against the entity, one
    /// tenant holding the body budget got the others flagged abnormal.
    pub fn is_clients_doing(&self) -> bool {
        self.wire().status < 500
    }

    /// Logs the details of a server-side failure (5xx) that its client
    /// message leaves out, at most once a second per code (`held_back`:
    /// the failures of that code left out since its last line). Client
    /// errors are not logged: they would let clients fill the log.
    pub fn log_details(&self) {
        let w = self.wire();
        if w.status >= 500
            && let Some(held_back) = FAILURE_LINES.hit(w.code)
        {
            tracing::warn!(code = w.code, error = %self, held_back, "request failed");
        }
    }

    /// The process exit status when this error ends svsd: 78 (EX_CONFIG,
    /// sysexits.h) when restarting cannot help: the configuration is
    /// invalid, or the token refused the PIN (a restart would be one more
    /// failed login towards locking it; the unit's
    /// RestartPreventExitStatus=78 stops systemd from retrying); 1 otherwise.
    /// Exhaustive on purpose, like [`SvsError::wire`].
    pub fn exit_code(&self) -> u8 {
        match self {
            SvsError::Config(_) | SvsError::PinRefused(_) => 78,
            SvsError::MalformedRequest(_)
            | SvsError::InvalidRequest(_)
            | SvsError::InvalidBase64(_)
            | SvsError::InvalidDigest(_)
            | SvsError::InvalidSignature(_)
            | SvsError::InvalidPublicKey(_)
            | SvsError::InvalidCertificate(_)
            | SvsError::InvalidId(_)
            | SvsError::BodyTooLarge(_)
            | SvsError::BatchTooLarge { .. }
            | SvsError::BodyTimeout(_)
            | SvsError::UnsupportedMediaType
            | SvsError::NotFound
            | SvsError::MethodNotAllowed { .. }
            | SvsError::Unauthenticated
            | SvsError::ClientCertificateRefused(_)
            | SvsError::EntitySuspended(_)
            | SvsError::UnknownKey(_)
            | SvsError::KeyNotAllowed(_)
            | SvsError::OperationNotAllowed(_)
            | SvsError::RateLimited { .. }
            | SvsError::Throttled { .. }
            | SvsError::TooManyConcurrent
            | SvsError::HsmBusy { .. }
            | SvsError::HsmTimeout
            | SvsError::RequestTimeout(_)
            | SvsError::ServerBusy { .. }
            | SvsError::HsmUnavailable(_)
            | SvsError::AuditUnavailable(_)
            | SvsError::NotReady(..)
            | SvsError::ShuttingDown
            | SvsError::Io(_)
            | SvsError::Internal(_) => 1,
        }
    }

    /// `{"error":{"code":…,"message":…}}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"error": {"code": self.wire().code, "message": self.client_message()}})
    }
}

impl From<HsmError> for SvsError {
    fn from(e: HsmError) -> Self {
        match e {
            HsmError::UnknownKey(k) => SvsError::UnknownKey(k),
            HsmError::InvalidInput(m) => SvsError::InvalidRequest(m),
            HsmError::Busy { retry_after } => SvsError::HsmBusy { retry_after },
            HsmError::Timeout(_) => SvsError::HsmTimeout,
            HsmError::Config(m) => SvsError::Config(vec![format!("hsm: {m}")]),
            HsmError::Pkcs11 { rv, function } if rv.is_pin_refusal() => {
                SvsError::PinRefused(format!("{function}: {}", rv.name))
            }
            // Everything else is a token-side failure; the CK_RV name is in
            // the message for the log, clients see only "HSM unavailable".
            other => SvsError::HsmUnavailable(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One value of every variant; the `match` in `wire` guarantees the
    /// mapping is total, this list checks what it maps to.
    fn one_of_each() -> Vec<(SvsError, u16, &'static str)> {
        let d = Duration::from_millis(1500);
        vec![
            (
                SvsError::MalformedRequest("x".into()),
                400,
                "malformed_request",
            ),
            (SvsError::InvalidRequest("x".into()), 400, "invalid_request"),
            (SvsError::InvalidBase64("data"), 400, "invalid_base64"),
            (SvsError::InvalidDigest(31), 400, "invalid_digest"),
            (
                SvsError::InvalidSignature("x".into()),
                400,
                "invalid_signature",
            ),
            (
                SvsError::InvalidPublicKey("x".into()),
                400,
                "invalid_public_key",
            ),
            (
                SvsError::InvalidCertificate("x".into()),
                400,
                "invalid_certificate",
            ),
            (SvsError::InvalidId("x".into()), 400, "invalid_id"),
            (SvsError::BodyTooLarge(10), 413, "body_too_large"),
            (SvsError::BatchTooLarge { max: 2 }, 413, "batch_too_large"),
            (SvsError::BodyTimeout(d), 408, "request_timeout"),
            (
                SvsError::UnsupportedMediaType,
                415,
                "unsupported_media_type",
            ),
            (SvsError::NotFound, 404, "not_found"),
            (
                SvsError::MethodNotAllowed { allow: "POST" },
                405,
                "method_not_allowed",
            ),
            (SvsError::Unauthenticated, 401, "unauthenticated"),
            (
                SvsError::ClientCertificateRefused(CERTIFICATE_EXPIRED),
                401,
                "unauthenticated",
            ),
            (
                SvsError::EntitySuspended("e".into()),
                403,
                "entity_suspended",
            ),
            (SvsError::UnknownKey("k".into()), 404, "unknown_key"),
            (SvsError::KeyNotAllowed("k".into()), 403, "key_not_allowed"),
            (
                SvsError::OperationNotAllowed("sign"),
                403,
                "operation_not_allowed",
            ),
            (
                SvsError::RateLimited { retry_after: d },
                429,
                "rate_limited",
            ),
            (SvsError::Throttled { retry_after: d }, 429, "rate_limited"),
            (
                SvsError::TooManyConcurrent,
                429,
                "too_many_concurrent_requests",
            ),
            (SvsError::HsmBusy { retry_after: d }, 503, "hsm_busy"),
            (SvsError::HsmTimeout, 504, "hsm_timeout"),
            (SvsError::RequestTimeout(d), 504, "request_timeout"),
            (SvsError::ServerBusy { retry_after: d }, 503, "server_busy"),
            (SvsError::HsmUnavailable("x".into()), 503, "hsm_unavailable"),
            (
                SvsError::AuditUnavailable("x".into()),
                503,
                "audit_unavailable",
            ),
            (
                SvsError::NotReady(NotReady::SelftestsPending, "x".into()),
                503,
                "not_ready",
            ),
            (SvsError::PinRefused("x".into()), 503, "hsm_unavailable"),
            (SvsError::ShuttingDown, 503, "shutting_down"),
            (
                SvsError::Config(vec!["x".into()]),
                500,
                "configuration_error",
            ),
            (SvsError::Io("x".into()), 500, "internal_error"),
            (SvsError::Internal("x".into()), 500, "internal_error"),
        ]
    }

    #[test]
    fn a_made_up_key_name_is_repeated_escaped_and_cut() {
        let short = SvsError::UnknownKey("bank\n\0x".into());
        assert_eq!(short.to_string(), r#"unknown key "bank\n\0x""#);
        let long = SvsError::UnknownKey("<script>".repeat(625));
        let text = long.to_string();
        assert!(text.starts_with(r#"unknown key "<script>"#), "{text}");
        assert!(text.ends_with("\u{2026} (5000 characters)"), "{text}");
        assert!(text.len() < 120, "{text}");
        // Cut on a character, not inside one.
        let wide = SvsError::UnknownKey("密".repeat(100)).to_string();
        assert!(wide.contains(&"密".repeat(64)), "{wide}");
        assert!(!wide.contains(&"密".repeat(65)), "{wide}");
    }

    #[test]
    fn every_readiness_failure_has_a_listed_reason_label() {
        let cases = [
            (
                SvsError::NotReady(NotReady::Starting, String::new()),
                "starting",
            ),
            (
                SvsError::NotReady(
                    NotReady::not_provisioned(vec![Missing::Keys]),
                    String::new(),
                ),
                "not_provisioned",
            ),
            (
                SvsError::NotReady(NotReady::HsmUnavailable, String::new()),
                "hsm_unavailable",
            ),
            (
                SvsError::NotReady(NotReady::SelftestsPending, String::new()),
                "selftests_pending",
            ),
            (
                SvsError::NotReady(NotReady::SelftestsFailed, String::new()),
                "selftests_failed",
            ),
            (
                SvsError::AuditUnavailable("disk full".into()),
                "audit_unavailable",
            ),
            (SvsError::ShuttingDown, "shutting_down"),
            (SvsError::Internal("x".into()), "other"),
        ];
        for (e, want) in &cases {
            assert_eq!(not_ready_reason(e), *want, "{e}");
        }
        let labels: Vec<&str> = cases.iter().map(|(_, r)| *r).collect();
        assert_eq!(labels, NOT_READY_REASONS);
    }

    #[test]
    fn failure_details_are_logged_once_a_second_per_code() {
        let lines = LogLimits::new(Duration::from_secs(1));
        let t0 = std::time::Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(lines.hit_at("audit_unavailable", t0), Some(0));
        for ms in 0..500 {
            assert_eq!(lines.hit_at("audit_unavailable", at(ms)), None);
        }
        // Another code has its own line.
        assert_eq!(lines.hit_at("hsm_timeout", at(500)), Some(0));
        assert_eq!(lines.hit_at("audit_unavailable", at(1000)), Some(500));
    }

    #[test]
    fn every_variant_has_its_status_and_a_snake_case_code() {
        for (err, status, code) in one_of_each() {
            let w = err.wire();
            assert_eq!((w.status, w.code), (status, code), "{err:?}");
            assert!(ALL_CODES.contains(&w.code), "{code} missing from ALL_CODES");
            assert!(
                w.code
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{code}"
            );
            let json = err.to_json();
            assert_eq!(json["error"]["code"], code);
            assert!(
                json["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty())
            );
        }
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_and_never_zero() {
        let rl = |ms| SvsError::RateLimited {
            retry_after: Duration::from_millis(ms),
        };
        assert_eq!(rl(1500).wire().retry_after, Some(2));
        assert_eq!(rl(1).wire().retry_after, Some(1));
        assert_eq!(rl(0).wire().retry_after, Some(1));
        assert_eq!(rl(2000).wire().retry_after, Some(2));
        assert_eq!(SvsError::TooManyConcurrent.wire().retry_after, Some(1));
    }

    #[test]
    fn internal_details_stay_out_of_client_messages() {
        let e = SvsError::from(HsmError::Unavailable("CKR_DEVICE_ERROR at slot 3".into()));
        assert_eq!(e.wire().code, "hsm_unavailable");
        assert!(!e.client_message().contains("CKR"));
        assert_eq!(
            SvsError::from(HsmError::UnknownKey("k".into())),
            SvsError::UnknownKey("k".into())
        );
        let audit = SvsError::AuditUnavailable(
            "/var/lib/svs/audit: Permission denied (os error 13)".into(),
        );
        let m = audit.client_message();
        assert!(!m.contains("/var") && !m.contains("os error"), "{m}");
        let nr = SvsError::NotReady(
            NotReady::HsmUnavailable,
            "HSM pool down, last error: CKR_PIN_LOCKED at /dev/x".into(),
        );
        let m = nr.client_message();
        assert!(!m.contains("CKR") && !m.contains("/dev"), "{m}");
        assert_eq!(nr.to_json()["error"]["message"], m.as_str());
    }

    #[test]
    fn not_ready_clients_see_only_the_fixed_category() {
        let cases = [
            (
                NotReady::not_provisioned(vec![Missing::Pin, Missing::Tls, Missing::Pin]),
                "not provisioned: TLS files, HSM PIN missing \u{2014} provision the appliance (docs/operations.md §3)",
            ),
            (
                NotReady::not_provisioned(vec![Missing::Keys, Missing::Token]),
                "not provisioned: token, keys missing \u{2014} provision the appliance (docs/operations.md §3)",
            ),
            (NotReady::Starting, "starting"),
            (NotReady::HsmUnavailable, "HSM unavailable or not logged in"),
            (NotReady::SelftestsPending, "self-tests pending"),
            (NotReady::SelftestsFailed, "self-tests failed"),
        ];
        for (reason, text) in cases {
            let e = SvsError::NotReady(reason, "cannot read /etc/svs/tls/server.pem".into());
            assert_eq!(e.client_message(), text);
            assert_eq!(e.to_json()["error"]["message"], text);
            // The detail is for the log.
            assert!(e.to_string().contains("/etc/svs/tls/server.pem"));
        }
        assert_eq!(SvsError::ShuttingDown.client_message(), "shutting down");
        assert!(
            SvsError::AuditUnavailable("/var/lib/svs/audit: EROFS".into())
                .client_message()
                .starts_with("audit trail not writable")
        );
    }

    #[test]
    fn exit_code_is_78_only_where_a_restart_cannot_help() {
        for (err, _, _) in one_of_each() {
            let want = match err {
                SvsError::Config(_) | SvsError::PinRefused(_) => 78,
                _ => 1,
            };
            assert_eq!(err.exit_code(), want, "{err:?}");
        }
        for (code, name) in [
            (0xa0, "CKR_PIN_INCORRECT"),
            (0xa1, "CKR_PIN_INVALID"),
            (0xa2, "CKR_PIN_LEN_RANGE"),
            (0xa3, "CKR_PIN_EXPIRED"),
            (0xa4, "CKR_PIN_LOCKED"),
        ] {
            let rv = svs_hsm::error::rv_info_from_code(code).unwrap();
            assert_eq!(rv.name, name);
            let e = SvsError::from(HsmError::Pkcs11 {
                rv,
                function: "C_Login".into(),
            });
            assert_eq!(e.exit_code(), 78, "{name}");
            assert_eq!(e.wire().code, "hsm_unavailable");
        }
        // A token that is merely gone is worth waiting for, not fatal.
        let gone = svs_hsm::error::rv_info_from_code(0xe0).unwrap();
        let e = SvsError::from(HsmError::Pkcs11 {
            rv: gone,
            function: "C_OpenSession".into(),
        });
        assert_eq!(e.exit_code(), 1);
    }

    #[test]
    fn a_whole_request_timeout_is_not_an_hsm_timeout() {
        let e = SvsError::RequestTimeout(Duration::from_secs(30));
        assert_eq!(e.wire().code, "request_timeout");
        assert_ne!(e.wire().code, SvsError::HsmTimeout.wire().code);
    }
}
