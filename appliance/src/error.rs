//! The crate's one error type and the one place that decides what each
//! error looks like on the wire (HTTP status, snake_case code, Retry-After).
//!
//! Messages never contain request payloads, PINs or key material: they name
//! fields, sizes and key names only.

use std::time::Duration;

use svs_hsm::HsmError;

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
    /// A batch with more items than the configured maximum.
    #[error("batch of {got} items exceeds the maximum of {max}")]
    BatchTooLarge {
        /// Items sent.
        got: usize,
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
    MethodNotAllowed,
    /// The client certificate was verified by TLS but matches no entity.
    #[error("client certificate matches no application entity")]
    Unauthenticated,
    /// The entity is suspended.
    #[error("application entity {0:?} is suspended")]
    EntitySuspended(String),
    /// No exposed key has this name.
    #[error("unknown key {0:?}")]
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
    /// The HSM is down or failed (details go to the log, not to clients).
    #[error("HSM unavailable: {0}")]
    HsmUnavailable(String),
    /// The audit trail cannot be written: nothing is signed unaudited.
    #[error("audit trail unavailable: {0}")]
    AuditUnavailable(String),
    /// Self-tests have not passed (or failed since).
    #[error("not ready: {0}")]
    NotReady(String),
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
}

fn secs_up(d: Duration) -> u64 {
    // Retry-After has one-second resolution; never tell a client "0".
    d.as_secs() + u64::from(d.subsec_nanos() > 0).max(u64::from(d.as_secs() == 0))
}

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
            SvsError::MethodNotAllowed => (405, "method_not_allowed", None),
            SvsError::Unauthenticated => (401, "unauthenticated", None),
            SvsError::EntitySuspended(_) => (403, "entity_suspended", None),
            SvsError::UnknownKey(_) => (404, "unknown_key", None),
            SvsError::KeyNotAllowed(_) => (403, "key_not_allowed", None),
            SvsError::OperationNotAllowed(_) => (403, "operation_not_allowed", None),
            SvsError::RateLimited { retry_after } => {
                (429, "rate_limited", Some(secs_up(*retry_after)))
            }
            SvsError::TooManyConcurrent => (429, "too_many_concurrent_requests", Some(1)),
            SvsError::HsmBusy { retry_after } => (503, "hsm_busy", Some(secs_up(*retry_after))),
            SvsError::HsmTimeout => (504, "hsm_timeout", None),
            SvsError::HsmUnavailable(_) => (503, "hsm_unavailable", Some(1)),
            SvsError::AuditUnavailable(_) => (503, "audit_unavailable", None),
            SvsError::NotReady(_) => (503, "not_ready", Some(1)),
            SvsError::ShuttingDown => (503, "shutting_down", Some(1)),
            SvsError::Config(_) => (500, "configuration_error", None),
            SvsError::Io(_) => (500, "internal_error", None),
            SvsError::Internal(_) => (500, "internal_error", None),
        };
        Wire {
            status,
            code,
            retry_after,
        }
    }

    /// The message sent to clients: internal details stay in the log.
    pub fn client_message(&self) -> String {
        match self {
            SvsError::HsmUnavailable(_) => "HSM unavailable".into(),
            SvsError::Io(_) | SvsError::Internal(_) | SvsError::Config(_) => {
                "internal error".into()
            }
            other => other.to_string(),
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
            (
                SvsError::BatchTooLarge { got: 3, max: 2 },
                413,
                "batch_too_large",
            ),
            (SvsError::BodyTimeout(d), 408, "request_timeout"),
            (
                SvsError::UnsupportedMediaType,
                415,
                "unsupported_media_type",
            ),
            (SvsError::NotFound, 404, "not_found"),
            (SvsError::MethodNotAllowed, 405, "method_not_allowed"),
            (SvsError::Unauthenticated, 401, "unauthenticated"),
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
            (
                SvsError::TooManyConcurrent,
                429,
                "too_many_concurrent_requests",
            ),
            (SvsError::HsmBusy { retry_after: d }, 503, "hsm_busy"),
            (SvsError::HsmTimeout, 504, "hsm_timeout"),
            (SvsError::HsmUnavailable("x".into()), 503, "hsm_unavailable"),
            (
                SvsError::AuditUnavailable("x".into()),
                503,
                "audit_unavailable",
            ),
            (SvsError::NotReady("x".into()), 503, "not_ready"),
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
    }
}
