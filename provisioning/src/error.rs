//! The crate's one error type and its one mapping to exit codes.
//!
//! Every message is written for the person at the console: what was wrong
//! and what to do. None ever contains a PIN (PINs only live in `Zeroizing`
//! buffers that nothing here formats).

use cryptoki::error::{Error as CryptokiError, RvError};
use svs_hsm::HsmError;

/// Everything that can go wrong, grouped by what the caller should do next.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// Bad arguments or input the operator can correct (subject, SANs, rate…).
    #[error("{0}")]
    Usage(String),
    /// A token, key, entity or file named by the operator does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The label or name is taken (duplicate key label, entity, token label).
    #[error("{0}")]
    AlreadyExists(String),
    /// The PIN was wrong; the token counts the failure.
    #[error("{0}")]
    PinIncorrect(String),
    /// The PIN is locked (too many wrong PINs).
    #[error("{0}")]
    PinLocked(String),
    /// A certificate (or PEM) is malformed, expired, not yet valid, or not the key's.
    #[error("{0}")]
    Certificate(String),
    /// svsd's configuration or the entities file is invalid or missing.
    #[error("{0}")]
    Config(String),
    /// The token or module failed (CK_RV named in the message).
    #[error("{0}")]
    Token(String),
    /// The audit trail is broken (altered, deleted, reordered, bad checkpoint).
    #[error("{0}")]
    AuditBroken(String),
    /// A self-test failed.
    #[error("{0}")]
    SelftestFailed(String),
    /// Reading or writing a file failed.
    #[error("{0}")]
    Io(String),
    /// The operator declined a confirmation, or none could be asked.
    #[error("{0}")]
    Cancelled(String),
    /// A file svsd reads was changed, but svsd did not confirm that it
    /// took the change (no svsd to ask, signal failed, or reload refused).
    #[error("{0}")]
    NotReloaded(String),
}

/// Result with the crate's error.
pub type Result<T, E = ProvisionError> = std::result::Result<T, E>;

/// What a token's flags say about a PIN it has just refused. The flags
/// are read after the refusal, so CKF_*_PIN_COUNT_LOW ("a wrong PIN was
/// entered since the last good one") is always set by then and tells
/// nothing more: only the last try and the lock are worth saying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TriesLeft {
    /// The flags say no more, or could not be read.
    Unknown,
    /// CKF_*_PIN_FINAL_TRY: the next wrong PIN locks it.
    One,
    /// CKF_*_PIN_LOCKED: this wrong PIN locked it.
    None,
}

impl ProvisionError {
    /// The process exit code for this error. Exhaustive on purpose: a new
    /// variant must be given its code here deliberately. 0 is success and 2
    /// is also what clap uses for a malformed command line.
    pub fn exit_code(&self) -> u8 {
        match self {
            ProvisionError::Usage(_) => 2,
            ProvisionError::NotFound(_) => 3,
            ProvisionError::AlreadyExists(_) => 4,
            ProvisionError::PinIncorrect(_) => 5,
            ProvisionError::PinLocked(_) => 6,
            ProvisionError::Certificate(_) => 7,
            ProvisionError::Config(_) => 8,
            ProvisionError::Token(_) => 9,
            ProvisionError::AuditBroken(_) => 10,
            ProvisionError::SelftestFailed(_) => 11,
            ProvisionError::Io(_) => 12,
            ProvisionError::Cancelled(_) => 13,
            ProvisionError::NotReloaded(_) => 14,
        }
    }

    /// A stable snake_case name for `--json` output and scripts.
    pub fn kind(&self) -> &'static str {
        match self {
            ProvisionError::Usage(_) => "usage",
            ProvisionError::NotFound(_) => "not_found",
            ProvisionError::AlreadyExists(_) => "already_exists",
            ProvisionError::PinIncorrect(_) => "pin_incorrect",
            ProvisionError::PinLocked(_) => "pin_locked",
            ProvisionError::Certificate(_) => "certificate",
            ProvisionError::Config(_) => "config",
            ProvisionError::Token(_) => "token",
            ProvisionError::AuditBroken(_) => "audit_broken",
            ProvisionError::SelftestFailed(_) => "selftest_failed",
            ProvisionError::Io(_) => "io",
            ProvisionError::Cancelled(_) => "cancelled",
            ProvisionError::NotReloaded(_) => "not_reloaded",
        }
    }

    /// Turns a failed PKCS#11 call into a message for people. `what` says
    /// what was being done ("logging in as the SO"), `who` whose PIN it was.
    pub fn pkcs11(e: CryptokiError, what: &str, who: &str) -> ProvisionError {
        match e {
            CryptokiError::Pkcs11(RvError::PinIncorrect, _) => {
                ProvisionError::PinIncorrect(format!(
                    "{what}: the {who} PIN is wrong (the token counts failed attempts and locks the PIN after too many); nothing was changed"
                ))
            }
            CryptokiError::Pkcs11(RvError::PinLocked, _) => ProvisionError::PinLocked(format!(
                "{what}: the {who} PIN is locked after too many wrong PINs; {}",
                unlock_advice()
            )),
            CryptokiError::Pkcs11(RvError::PinLenRange, _) => ProvisionError::Usage(format!(
                "{what}: the {who} PIN has a length the token does not accept (see `{}` for the limits)",
                crate::cli::command("token info")
            )),
            CryptokiError::Pkcs11(RvError::PinInvalid, _) => ProvisionError::Usage(format!(
                "{what}: the token refuses the characters of the new {who} PIN"
            )),
            CryptokiError::Pkcs11(RvError::UserPinNotInitialized, _) => {
                ProvisionError::NotFound(format!(
                    "{what}: the user PIN has not been set on this token yet; the security officer sets it with `{}`",
                    crate::cli::command("pin init")
                ))
            }
            CryptokiError::Pkcs11(RvError::TokenWriteProtected, _) => ProvisionError::Token(
                format!("{what}: the token is write-protected; nothing was changed"),
            ),
            CryptokiError::Pkcs11(RvError::DeviceMemory, _) => ProvisionError::Token(format!(
                "{what}: the token's storage is full (CKR_DEVICE_MEMORY; for the soft token, the file system of its store_dir); nothing was changed"
            )),
            CryptokiError::Pkcs11(rv, function) => {
                let info = svs_hsm::rv_info(&rv);
                ProvisionError::Token(format!(
                    "{what}: the token answered {} ({:#x}) to {function:?}",
                    info.name, info.code
                ))
            }
            other => ProvisionError::Token(format!("{what}: {other}")),
        }
    }
}

/// What to do about a locked PIN.
fn unlock_advice() -> String {
    format!(
        "the security officer must reset it with `{}` (a locked SO PIN means the token must be re-initialised)",
        crate::cli::command("pin init")
    )
}

impl ProvisionError {
    /// Like [`ProvisionError::pkcs11`], for a refused PIN whose token said
    /// afterwards how many tries are `left`: the officer about to try
    /// again must know that the next wrong PIN locks it, or that this one
    /// did (then the error is [`ProvisionError::PinLocked`]).
    pub fn pin_refused(e: CryptokiError, what: &str, who: &str, left: TriesLeft) -> ProvisionError {
        if !matches!(e, CryptokiError::Pkcs11(RvError::PinIncorrect, _)) {
            return ProvisionError::pkcs11(e, what, who);
        }
        match left {
            TriesLeft::Unknown => ProvisionError::pkcs11(e, what, who),
            TriesLeft::One => ProvisionError::PinIncorrect(format!(
                "{what}: the {who} PIN is wrong, and one try is left before the PIN locks; nothing was changed. Make sure of the PIN before trying again"
            )),
            TriesLeft::None => ProvisionError::PinLocked(format!(
                "{what}: the {who} PIN is wrong, and that was the last try: the {who} PIN is now locked; {}",
                unlock_advice()
            )),
        }
    }
}

impl From<HsmError> for ProvisionError {
    fn from(e: HsmError) -> Self {
        match e {
            HsmError::PinSource(m) => ProvisionError::Usage(format!("PIN file: {m}")),
            HsmError::Config(m) => ProvisionError::Usage(m),
            HsmError::TokenNotFound(m) => ProvisionError::NotFound(format!("no token matches {m}")),
            HsmError::UnknownKey(m) => ProvisionError::NotFound(format!("no key named {m:?}")),
            HsmError::InvalidInput(m) => ProvisionError::Usage(m),
            HsmError::ModuleLoad { module, reason } => ProvisionError::Token(format!(
                "cannot load the PKCS#11 module {module}: {reason} (check --module)"
            )),
            other => ProvisionError::Token(other.to_string()),
        }
    }
}

impl From<der::pem::Error> for ProvisionError {
    fn from(e: der::pem::Error) -> Self {
        ProvisionError::Usage(format!("PEM encoding: {e}"))
    }
}

impl From<der::Error> for ProvisionError {
    fn from(e: der::Error) -> Self {
        ProvisionError::Usage(format!("ASN.1 encoding: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_has_a_distinct_nonzero_code_and_kind() {
        let all = [
            ProvisionError::Usage(String::new()),
            ProvisionError::NotFound(String::new()),
            ProvisionError::AlreadyExists(String::new()),
            ProvisionError::PinIncorrect(String::new()),
            ProvisionError::PinLocked(String::new()),
            ProvisionError::Certificate(String::new()),
            ProvisionError::Config(String::new()),
            ProvisionError::Token(String::new()),
            ProvisionError::AuditBroken(String::new()),
            ProvisionError::SelftestFailed(String::new()),
            ProvisionError::Io(String::new()),
            ProvisionError::Cancelled(String::new()),
            ProvisionError::NotReloaded(String::new()),
        ];
        let mut codes: Vec<u8> = all.iter().map(ProvisionError::exit_code).collect();
        let mut kinds: Vec<&str> = all.iter().map(ProvisionError::kind).collect();
        assert!(codes.iter().all(|c| *c != 0 && *c != 1));
        codes.sort_unstable();
        codes.dedup();
        kinds.sort_unstable();
        kinds.dedup();
        assert_eq!(codes.len(), all.len());
        assert_eq!(kinds.len(), all.len());
        // The documented table in --help names these numbers.
        assert_eq!(ProvisionError::PinIncorrect(String::new()).exit_code(), 5);
        assert_eq!(ProvisionError::AuditBroken(String::new()).exit_code(), 10);
    }

    #[test]
    fn pkcs11_errors_become_sentences() {
        let e = ProvisionError::pkcs11(
            CryptokiError::Pkcs11(RvError::PinIncorrect, cryptoki::context::Function::Login),
            "logging in",
            "user",
        );
        assert_eq!(e.exit_code(), 5);
        assert!(e.to_string().contains("user PIN is wrong"), "{e}");
        let e = ProvisionError::pkcs11(
            CryptokiError::Pkcs11(RvError::PinLocked, cryptoki::context::Function::Login),
            "logging in",
            "user",
        );
        assert_eq!(e.exit_code(), 6);
        let wrong =
            || CryptokiError::Pkcs11(RvError::PinIncorrect, cryptoki::context::Function::Login);
        let e = ProvisionError::pin_refused(wrong(), "logging in", "user", TriesLeft::One);
        assert_eq!(e.exit_code(), 5);
        assert!(e.to_string().contains("one try is left"), "{e}");
        let e = ProvisionError::pin_refused(wrong(), "logging in", "SO", TriesLeft::None);
        assert_eq!(e.exit_code(), 6);
        assert!(e.to_string().contains("SO PIN is now locked"), "{e}");
        let e = ProvisionError::pin_refused(wrong(), "logging in", "user", TriesLeft::Unknown);
        assert!(e.to_string().contains("user PIN is wrong ("), "{e}");
        let e = ProvisionError::pkcs11(
            CryptokiError::Pkcs11(RvError::DeviceError, cryptoki::context::Function::Sign),
            "signing",
            "user",
        );
        assert!(e.to_string().contains("CKR_DEVICE_ERROR"), "{e}");
    }
}
