//! The crate's one error type and the one place where PKCS#11 return values
//! are named and classified for recovery.

use std::time::Duration;

use cryptoki::error::{Error as CryptokiError, Rv, RvError};

/// What the pool should do after a PKCS#11 call failed with a given CK_RV.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RvClass {
    /// The request itself is wrong (bad key, bad data, missing mechanism):
    /// retrying cannot help and the session is still good.
    CallerError,
    /// The session (or a handle in it) is no longer usable: open a new
    /// session, re-find object handles and retry an idempotent operation once.
    RetrySession,
    /// The session lost its login: log in again, then retry once.
    Relogin,
    /// The token is gone (removed, not present, slot vanished, module
    /// finalised): reopen everything with backoff.
    TokenGone,
    /// Nothing automatic is safe (wrong PIN, library state, general error):
    /// fail the operation and discard the session so the next job starts clean.
    Fatal,
}

impl RvClass {
    /// Every class, for metrics that list them all from the start.
    pub const ALL: [RvClass; 5] = [
        RvClass::CallerError,
        RvClass::RetrySession,
        RvClass::Relogin,
        RvClass::TokenGone,
        RvClass::Fatal,
    ];
}

/// A PKCS#11 return value with its standard name and recovery class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RvInfo {
    /// The numeric CK_RV.
    pub code: u64,
    /// `CKR_…` name; vendor and unknown codes are `CKR_VENDOR_DEFINED` / `CKR_UNKNOWN`.
    pub name: &'static str,
    /// What recovery this code calls for.
    pub class: RvClass,
}

impl RvInfo {
    /// The token refused the PIN itself: logging in again with the same
    /// PIN cannot succeed and counts towards the lockout.
    pub fn is_pin_refusal(&self) -> bool {
        matches!(
            self.name,
            "CKR_PIN_INCORRECT"
                | "CKR_PIN_INVALID"
                | "CKR_PIN_LEN_RANGE"
                | "CKR_PIN_EXPIRED"
                | "CKR_PIN_LOCKED"
        )
    }
}

/// Names and classifies every `RvError` cryptoki 0.12.1 knows. This match
/// must stay exhaustive: a new cryptoki variant has to be classified here
/// deliberately rather than fall into a default.
pub fn rv_info(rv: &RvError) -> RvInfo {
    let (code, name, class) = match rv {
        RvError::Cancel => (0x1, "CKR_CANCEL", RvClass::RetrySession),
        RvError::HostMemory => (0x2, "CKR_HOST_MEMORY", RvClass::Fatal),
        RvError::SlotIdInvalid => (0x3, "CKR_SLOT_ID_INVALID", RvClass::TokenGone),
        RvError::GeneralError => (0x5, "CKR_GENERAL_ERROR", RvClass::Fatal),
        RvError::FunctionFailed => (0x6, "CKR_FUNCTION_FAILED", RvClass::RetrySession),
        RvError::ArgumentsBad => (0x7, "CKR_ARGUMENTS_BAD", RvClass::CallerError),
        RvError::NoEvent => (0x8, "CKR_NO_EVENT", RvClass::Fatal),
        RvError::NeedToCreateThreads => (0x9, "CKR_NEED_TO_CREATE_THREADS", RvClass::Fatal),
        RvError::CantLock => (0xa, "CKR_CANT_LOCK", RvClass::Fatal),
        RvError::AttributeReadOnly => (0x10, "CKR_ATTRIBUTE_READ_ONLY", RvClass::CallerError),
        RvError::AttributeSensitive => (0x11, "CKR_ATTRIBUTE_SENSITIVE", RvClass::CallerError),
        RvError::AttributeTypeInvalid => (0x12, "CKR_ATTRIBUTE_TYPE_INVALID", RvClass::CallerError),
        RvError::AttributeValueInvalid => {
            (0x13, "CKR_ATTRIBUTE_VALUE_INVALID", RvClass::CallerError)
        }
        RvError::ActionProhibited => (0x1b, "CKR_ACTION_PROHIBITED", RvClass::CallerError),
        RvError::DataInvalid => (0x20, "CKR_DATA_INVALID", RvClass::CallerError),
        RvError::DataLenRange => (0x21, "CKR_DATA_LEN_RANGE", RvClass::CallerError),
        RvError::DeviceError => (0x30, "CKR_DEVICE_ERROR", RvClass::RetrySession),
        RvError::DeviceMemory => (0x31, "CKR_DEVICE_MEMORY", RvClass::Fatal),
        RvError::DeviceRemoved => (0x32, "CKR_DEVICE_REMOVED", RvClass::TokenGone),
        RvError::EncryptedDataInvalid => (0x40, "CKR_ENCRYPTED_DATA_INVALID", RvClass::CallerError),
        RvError::EncryptedDataLenRange => {
            (0x41, "CKR_ENCRYPTED_DATA_LEN_RANGE", RvClass::CallerError)
        }
        RvError::FunctionCanceled => (0x50, "CKR_FUNCTION_CANCELED", RvClass::RetrySession),
        RvError::FunctionNotParallel => (0x51, "CKR_FUNCTION_NOT_PARALLEL", RvClass::Fatal),
        RvError::FunctionNotSupported => (0x54, "CKR_FUNCTION_NOT_SUPPORTED", RvClass::CallerError),
        RvError::CurveNotSupported => (0x140, "CKR_CURVE_NOT_SUPPORTED", RvClass::CallerError),
        RvError::KeyHandleInvalid => (0x60, "CKR_KEY_HANDLE_INVALID", RvClass::RetrySession),
        RvError::KeySizeRange => (0x62, "CKR_KEY_SIZE_RANGE", RvClass::CallerError),
        RvError::KeyTypeInconsistent => (0x63, "CKR_KEY_TYPE_INCONSISTENT", RvClass::CallerError),
        RvError::KeyNotNeeded => (0x64, "CKR_KEY_NOT_NEEDED", RvClass::CallerError),
        RvError::KeyChanged => (0x65, "CKR_KEY_CHANGED", RvClass::RetrySession),
        RvError::KeyNeeded => (0x66, "CKR_KEY_NEEDED", RvClass::CallerError),
        RvError::KeyIndigestible => (0x67, "CKR_KEY_INDIGESTIBLE", RvClass::CallerError),
        RvError::KeyFunctionNotPermitted => {
            (0x68, "CKR_KEY_FUNCTION_NOT_PERMITTED", RvClass::CallerError)
        }
        RvError::KeyNotWrappable => (0x69, "CKR_KEY_NOT_WRAPPABLE", RvClass::CallerError),
        RvError::KeyUnextractable => (0x6a, "CKR_KEY_UNEXTRACTABLE", RvClass::CallerError),
        RvError::MechanismInvalid => (0x70, "CKR_MECHANISM_INVALID", RvClass::CallerError),
        RvError::MechanismParamInvalid => {
            (0x71, "CKR_MECHANISM_PARAM_INVALID", RvClass::CallerError)
        }
        RvError::ObjectHandleInvalid => (0x82, "CKR_OBJECT_HANDLE_INVALID", RvClass::RetrySession),
        RvError::OperationActive => (0x90, "CKR_OPERATION_ACTIVE", RvClass::RetrySession),
        RvError::OperationNotInitialized => {
            (0x91, "CKR_OPERATION_NOT_INITIALIZED", RvClass::RetrySession)
        }
        RvError::PinIncorrect => (0xa0, "CKR_PIN_INCORRECT", RvClass::Fatal),
        RvError::PinInvalid => (0xa1, "CKR_PIN_INVALID", RvClass::Fatal),
        RvError::PinLenRange => (0xa2, "CKR_PIN_LEN_RANGE", RvClass::Fatal),
        RvError::PinExpired => (0xa3, "CKR_PIN_EXPIRED", RvClass::Fatal),
        RvError::PinLocked => (0xa4, "CKR_PIN_LOCKED", RvClass::Fatal),
        RvError::SessionClosed => (0xb0, "CKR_SESSION_CLOSED", RvClass::RetrySession),
        RvError::SessionCount => (0xb1, "CKR_SESSION_COUNT", RvClass::Fatal),
        RvError::SessionHandleInvalid => {
            (0xb3, "CKR_SESSION_HANDLE_INVALID", RvClass::RetrySession)
        }
        RvError::SessionParallelNotSupported => {
            (0xb4, "CKR_SESSION_PARALLEL_NOT_SUPPORTED", RvClass::Fatal)
        }
        RvError::SessionReadOnly => (0xb5, "CKR_SESSION_READ_ONLY", RvClass::Fatal),
        RvError::SessionExists => (0xb6, "CKR_SESSION_EXISTS", RvClass::Fatal),
        RvError::SessionReadOnlyExists => (0xb7, "CKR_SESSION_READ_ONLY_EXISTS", RvClass::Fatal),
        RvError::SessionReadWriteSoExists => {
            (0xb8, "CKR_SESSION_READ_WRITE_SO_EXISTS", RvClass::Fatal)
        }
        RvError::SignatureInvalid => (0xc0, "CKR_SIGNATURE_INVALID", RvClass::CallerError),
        RvError::SignatureLenRange => (0xc1, "CKR_SIGNATURE_LEN_RANGE", RvClass::CallerError),
        RvError::TemplateIncomplete => (0xd0, "CKR_TEMPLATE_INCOMPLETE", RvClass::CallerError),
        RvError::TemplateInconsistent => (0xd1, "CKR_TEMPLATE_INCONSISTENT", RvClass::CallerError),
        RvError::TokenNotPresent => (0xe0, "CKR_TOKEN_NOT_PRESENT", RvClass::TokenGone),
        RvError::TokenNotRecognized => (0xe1, "CKR_TOKEN_NOT_RECOGNIZED", RvClass::TokenGone),
        RvError::TokenWriteProtected => (0xe2, "CKR_TOKEN_WRITE_PROTECTED", RvClass::Fatal),
        RvError::UnwrappingKeyHandleInvalid => (
            0xf0,
            "CKR_UNWRAPPING_KEY_HANDLE_INVALID",
            RvClass::CallerError,
        ),
        RvError::UnwrappingKeySizeRange => {
            (0xf1, "CKR_UNWRAPPING_KEY_SIZE_RANGE", RvClass::CallerError)
        }
        RvError::UserAlreadyLoggedIn => (0x100, "CKR_USER_ALREADY_LOGGED_IN", RvClass::Fatal),
        RvError::UserNotLoggedIn => (0x101, "CKR_USER_NOT_LOGGED_IN", RvClass::Relogin),
        RvError::UserPinNotInitialized => (0x102, "CKR_USER_PIN_NOT_INITIALIZED", RvClass::Fatal),
        RvError::UserTypeInvalid => (0x103, "CKR_USER_TYPE_INVALID", RvClass::Fatal),
        RvError::UserAnotherAlreadyLoggedIn => {
            (0x104, "CKR_USER_ANOTHER_ALREADY_LOGGED_IN", RvClass::Fatal)
        }
        RvError::UserTooManyTypes => (0x105, "CKR_USER_TOO_MANY_TYPES", RvClass::Fatal),
        RvError::WrappedKeyInvalid => (0x110, "CKR_WRAPPED_KEY_INVALID", RvClass::CallerError),
        RvError::WrappedKeyLenRange => (0x112, "CKR_WRAPPED_KEY_LEN_RANGE", RvClass::CallerError),
        RvError::WrappingKeyHandleInvalid => (
            0x113,
            "CKR_WRAPPING_KEY_HANDLE_INVALID",
            RvClass::CallerError,
        ),
        RvError::WrappingKeySizeRange => {
            (0x114, "CKR_WRAPPING_KEY_SIZE_RANGE", RvClass::CallerError)
        }
        RvError::WrappingKeyTypeInconsistent => (
            0x115,
            "CKR_WRAPPING_KEY_TYPE_INCONSISTENT",
            RvClass::CallerError,
        ),
        RvError::RandomSeedNotSupported => {
            (0x120, "CKR_RANDOM_SEED_NOT_SUPPORTED", RvClass::CallerError)
        }
        RvError::RandomNoRng => (0x121, "CKR_RANDOM_NO_RNG", RvClass::Fatal),
        RvError::DomainParamsInvalid => (0x130, "CKR_DOMAIN_PARAMS_INVALID", RvClass::CallerError),
        RvError::BufferTooSmall => (0x150, "CKR_BUFFER_TOO_SMALL", RvClass::Fatal),
        RvError::SavedStateInvalid => (0x160, "CKR_SAVED_STATE_INVALID", RvClass::Fatal),
        RvError::InformationSensitive => (0x170, "CKR_INFORMATION_SENSITIVE", RvClass::CallerError),
        RvError::StateUnsaveable => (0x180, "CKR_STATE_UNSAVEABLE", RvClass::Fatal),
        RvError::CryptokiNotInitialized => {
            (0x190, "CKR_CRYPTOKI_NOT_INITIALIZED", RvClass::TokenGone)
        }
        RvError::CryptokiAlreadyInitialized => {
            (0x191, "CKR_CRYPTOKI_ALREADY_INITIALIZED", RvClass::Fatal)
        }
        RvError::MutexBad => (0x1a0, "CKR_MUTEX_BAD", RvClass::Fatal),
        RvError::MutexNotLocked => (0x1a1, "CKR_MUTEX_NOT_LOCKED", RvClass::Fatal),
        RvError::NewPinMode => (0x1b0, "CKR_NEW_PIN_MODE", RvClass::Fatal),
        RvError::NextOtp => (0x1b1, "CKR_NEXT_OTP", RvClass::Fatal),
        RvError::ExceededMaxIterations => (0x1b5, "CKR_EXCEEDED_MAX_ITERATIONS", RvClass::Fatal),
        RvError::FipsSelfTestFailed => (0x1b6, "CKR_FIPS_SELF_TEST_FAILED", RvClass::Fatal),
        RvError::LibraryLoadFailed => (0x1b7, "CKR_LIBRARY_LOAD_FAILED", RvClass::Fatal),
        RvError::PinTooWeak => (0x1b8, "CKR_PIN_TOO_WEAK", RvClass::CallerError),
        RvError::PublicKeyInvalid => (0x1b9, "CKR_PUBLIC_KEY_INVALID", RvClass::CallerError),
        RvError::FunctionRejected => (0x200, "CKR_FUNCTION_REJECTED", RvClass::CallerError),
        RvError::UnwrappingKeyTypeInconsistent => (
            0xf2,
            "CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT",
            RvClass::CallerError,
        ),
        RvError::VendorDefined(code) => (*code, "CKR_VENDOR_DEFINED", RvClass::Fatal),
        RvError::UnknownErrorCode(code) => (*code, "CKR_UNKNOWN", RvClass::Fatal),
    };
    RvInfo { code, name, class }
}

/// Classifies a numeric CK_RV (for metrics and tests that hold only a number).
pub fn rv_info_from_code(code: u64) -> Option<RvInfo> {
    match Rv::from(code as std::ffi::c_ulong) {
        Rv::Ok => None,
        Rv::Error(e) => Some(rv_info(&e)),
    }
}

/// Every error this crate returns.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HsmError {
    /// A PKCS#11 function failed; the CK_RV is kept.
    #[error("{function}: {} ({:#x})", rv.name, rv.code)]
    Pkcs11 {
        /// The return value, named and classified.
        rv: RvInfo,
        /// The PKCS#11 function that returned it.
        function: String,
    },
    /// The module could not be loaded or is not a usable PKCS#11 library.
    #[error("cannot load PKCS#11 module {module}: {reason}")]
    ModuleLoad {
        /// Path of the module, or "embedded".
        module: String,
        /// Why.
        reason: String,
    },
    /// Configuration is invalid or inconsistent with the token.
    #[error("configuration: {0}")]
    Config(String),
    /// The PIN could not be read (the message never contains the PIN).
    #[error("PIN source: {0}")]
    PinSource(String),
    /// No slot holds a token matching the selector.
    #[error("no token matches {0}")]
    TokenNotFound(String),
    /// The token lacks a mechanism the profile needs.
    #[error("token lacks mechanism {name} ({code:#x}) required by profile {profile}")]
    MissingMechanism {
        /// The profile that needs it.
        profile: String,
        /// Mechanism role in the profile.
        name: &'static str,
        /// Mechanism number.
        code: u64,
    },
    /// No signing key of that name.
    #[error("unknown key {0:?}")]
    UnknownKey(String),
    /// The token's key under this CKA_ID is not the one discovered (deleted,
    /// or deleted and re-created, meanwhile); keys must be refreshed before
    /// it signs.
    #[error(
        "key {0} is no longer the one read from the token (deleted, or deleted and created again): the keys must be read again (svsd: `systemctl reload svsd`, which tests a re-created key first)"
    )]
    KeyChanged(String),
    /// The request is malformed (wrong digest length, bad signature encoding…).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The job queue is full; try again later.
    #[error("HSM busy: job queue full")]
    Busy {
        /// Suggested delay before retrying.
        retry_after: Duration,
    },
    /// The operation did not finish in time.
    #[error("HSM operation timed out after {0:?}")]
    Timeout(Duration),
    /// The token is down and recovery has not succeeded yet.
    #[error("HSM unavailable: {0}")]
    Unavailable(String),
    /// The HSM returned a signature that is malformed or does not verify.
    #[error("HSM returned a bad signature: {0}")]
    FaultySignature(String),
    /// A signature checked in software does not verify.
    #[error("signature does not verify")]
    VerifyFailed,
    /// A DER/SPKI/certificate structure could not be parsed or built.
    #[error("encoding: {0}")]
    Encoding(String),
    /// The pool has been shut down.
    #[error("HSM pool shut down")]
    Shutdown,
    /// A job panicked on a worker (a bug); the worker replaced its session.
    #[error("HSM job {0} panicked")]
    WorkerPanic(&'static str),
    /// cryptoki failed outside of a PKCS#11 call (conversion, missing symbol…).
    #[error("cryptoki: {0}")]
    Cryptoki(String),
}

impl HsmError {
    /// The recovery class, when the error came from the token.
    pub fn rv_class(&self) -> Option<RvClass> {
        match self {
            HsmError::Pkcs11 { rv, .. } => Some(rv.class),
            // A signature that fails the host check is treated like a session
            // fault: retry once elsewhere rather than hand it out.
            HsmError::FaultySignature(_) => Some(RvClass::RetrySession),
            // The session may be mid-operation: replace it, do not retry.
            HsmError::WorkerPanic(_) => Some(RvClass::Fatal),
            _ => None,
        }
    }

    /// The CK_RV, if this error carries one.
    pub fn ck_rv(&self) -> Option<u64> {
        match self {
            HsmError::Pkcs11 { rv, .. } => Some(rv.code),
            _ => None,
        }
    }

    /// A short stable label for metrics: the CKR name, or the variant.
    pub fn metric_label(&self) -> &'static str {
        match self {
            HsmError::Pkcs11 { rv, .. } => rv.name,
            HsmError::ModuleLoad { .. } => "module_load",
            HsmError::Config(_) => "config",
            HsmError::PinSource(_) => "pin_source",
            HsmError::TokenNotFound(_) => "token_not_found",
            HsmError::MissingMechanism { .. } => "missing_mechanism",
            HsmError::UnknownKey(_) => "unknown_key",
            HsmError::KeyChanged(_) => "key_changed",
            HsmError::InvalidInput(_) => "invalid_input",
            HsmError::Busy { .. } => "busy",
            HsmError::Timeout(_) => "timeout",
            HsmError::Unavailable(_) => "unavailable",
            HsmError::FaultySignature(_) => "faulty_signature",
            HsmError::VerifyFailed => "verify_failed",
            HsmError::Encoding(_) => "encoding",
            HsmError::Shutdown => "shutdown",
            HsmError::WorkerPanic(_) => "worker_panic",
            HsmError::Cryptoki(_) => "cryptoki",
        }
    }
}

impl From<CryptokiError> for HsmError {
    fn from(e: CryptokiError) -> Self {
        match e {
            CryptokiError::Pkcs11(rv, function) => HsmError::Pkcs11 {
                rv: rv_info(&rv),
                function: format!("{function:?}"),
            },
            other => HsmError::Cryptoki(other.to_string()),
        }
    }
}

impl From<der::Error> for HsmError {
    fn from(e: der::Error) -> Self {
        HsmError::Encoding(e.to_string())
    }
}

/// Result with the crate's error.
pub type Result<T, E = HsmError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_refusals_are_the_five_pin_codes() {
        let refusals: Vec<u64> = KNOWN_CODES
            .iter()
            .copied()
            .filter(|c| rv_info_from_code(*c).is_some_and(|i| i.is_pin_refusal()))
            .collect();
        // INCORRECT, INVALID, LEN_RANGE, EXPIRED, LOCKED.
        assert_eq!(refusals, [0xa0, 0xa1, 0xa2, 0xa3, 0xa4]);
    }

    const KNOWN_CODES: &[u64] = &[
        0xf2, 0x1, 0x2, 0x3, 0x5, 0x6, 0x7, 0x8, 0x9, 0xa, 0x10, 0x11, 0x12, 0x13, 0x1b, 0x20,
        0x21, 0x30, 0x31, 0x32, 0x40, 0x41, 0x50, 0x51, 0x54, 0x140, 0x60, 0x62, 0x63, 0x64, 0x65,
        0x66, 0x67, 0x68, 0x69, 0x6a, 0x70, 0x71, 0x82, 0x90, 0x91, 0xa0, 0xa1, 0xa2, 0xa3, 0xa4,
        0xb0, 0xb1, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7, 0xb8, 0xc0, 0xc1, 0xd0, 0xd1, 0xe0, 0xe1, 0xe2,
        0xf0, 0xf1, 0x100, 0x101, 0x102, 0x103, 0x104, 0x105, 0x110, 0x112, 0x113, 0x114, 0x115,
        0x120, 0x121, 0x130, 0x150, 0x160, 0x170, 0x180, 0x190, 0x191, 0x1a0, 0x1a1, 0x1b0, 0x1b1,
        0x1b5, 0x1b6, 0x1b7, 0x1b8, 0x1b9, 0x200,
    ];

    #[test]
    fn every_known_code_round_trips_with_its_name() {
        for &code in KNOWN_CODES {
            let info = rv_info_from_code(code).expect("non-zero code");
            assert_eq!(info.code, code, "{}", info.name);
            assert!(info.name.starts_with("CKR_"));
        }
    }

    #[test]
    fn recovery_classes() {
        let class = |code: u64| rv_info_from_code(code).map(|i| i.class);
        assert_eq!(class(0xB3), Some(RvClass::RetrySession)); // SESSION_HANDLE_INVALID
        assert_eq!(class(0xB0), Some(RvClass::RetrySession)); // SESSION_CLOSED
        assert_eq!(class(0x30), Some(RvClass::RetrySession)); // DEVICE_ERROR
        assert_eq!(class(0x82), Some(RvClass::RetrySession)); // OBJECT_HANDLE_INVALID
        assert_eq!(class(0x101), Some(RvClass::Relogin)); // USER_NOT_LOGGED_IN
        assert_eq!(class(0xE0), Some(RvClass::TokenGone)); // TOKEN_NOT_PRESENT
        assert_eq!(class(0x32), Some(RvClass::TokenGone)); // DEVICE_REMOVED
        assert_eq!(class(0x190), Some(RvClass::TokenGone)); // CRYPTOKI_NOT_INITIALIZED: reopen re-initialises
        assert_eq!(class(0x05), Some(RvClass::Fatal)); // GENERAL_ERROR
        assert_eq!(class(0xA0), Some(RvClass::Fatal)); // PIN_INCORRECT: never retry a login
        assert_eq!(class(0xA4), Some(RvClass::Fatal)); // PIN_LOCKED
        assert_eq!(class(0x70), Some(RvClass::CallerError)); // MECHANISM_INVALID
        assert_eq!(class(0x21), Some(RvClass::CallerError)); // DATA_LEN_RANGE
        assert_eq!(class(0x8000_0001), Some(RvClass::Fatal)); // vendor-defined
        assert_eq!(class(0), None);
    }

    #[test]
    fn pkcs11_error_keeps_code_and_name() {
        let e: HsmError =
            CryptokiError::Pkcs11(RvError::DeviceError, cryptoki::context::Function::Sign).into();
        assert_eq!(e.ck_rv(), Some(0x30));
        assert_eq!(e.metric_label(), "CKR_DEVICE_ERROR");
        assert_eq!(e.rv_class(), Some(RvClass::RetrySession));
        assert!(e.to_string().contains("CKR_DEVICE_ERROR"));
    }
}
