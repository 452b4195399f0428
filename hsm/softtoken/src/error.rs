//! The token's one error type and its mapping to `CK_RV`.

use pkcs11_sys::*;

/// Everything a token function can fail with. Each variant is one `CK_RV`;
/// [`Error::rv`] is the only place that maps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    ActionProhibited,
    ArgumentsBad,
    AttributeReadOnly,
    AttributeSensitive,
    AttributeTypeInvalid,
    AttributeValueInvalid,
    BufferTooSmall,
    CantLock,
    CryptokiAlreadyInitialized,
    CryptokiNotInitialized,
    DataInvalid,
    DataLenRange,
    DeviceError,
    /// The store's disk is full (CKR_DEVICE_MEMORY).
    DeviceMemory,
    DeviceRemoved,
    FunctionNotSupported,
    GeneralError,
    HostMemory,
    KeyFunctionNotPermitted,
    KeyHandleInvalid,
    KeyTypeInconsistent,
    MechanismInvalid,
    MechanismParamInvalid,
    ObjectHandleInvalid,
    OperationActive,
    OperationNotInitialized,
    PinIncorrect,
    PinInvalid,
    PinLenRange,
    PinLocked,
    RandomSeedNotSupported,
    SessionExists,
    SessionHandleInvalid,
    SessionParallelNotSupported,
    SessionReadOnly,
    SessionReadOnlyExists,
    SessionReadWriteSoExists,
    SignatureInvalid,
    SignatureLenRange,
    SlotIdInvalid,
    TemplateIncomplete,
    TemplateInconsistent,
    TokenNotPresent,
    TokenNotRecognized,
    UserAlreadyLoggedIn,
    UserAnotherAlreadyLoggedIn,
    UserNotLoggedIn,
    UserPinNotInitialized,
    UserTypeInvalid,
    /// A return value chosen by a fault-injection rule.
    Injected(CK_RV),
}

/// Shorthand for the token's results.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The `CK_RV` the C ABI returns for this error.
    pub fn rv(self) -> CK_RV {
        match self {
            Error::ActionProhibited => CKR_ACTION_PROHIBITED,
            Error::ArgumentsBad => CKR_ARGUMENTS_BAD,
            Error::AttributeReadOnly => CKR_ATTRIBUTE_READ_ONLY,
            Error::AttributeSensitive => CKR_ATTRIBUTE_SENSITIVE,
            Error::AttributeTypeInvalid => CKR_ATTRIBUTE_TYPE_INVALID,
            Error::AttributeValueInvalid => CKR_ATTRIBUTE_VALUE_INVALID,
            Error::BufferTooSmall => CKR_BUFFER_TOO_SMALL,
            Error::CantLock => CKR_CANT_LOCK,
            Error::CryptokiAlreadyInitialized => CKR_CRYPTOKI_ALREADY_INITIALIZED,
            Error::CryptokiNotInitialized => CKR_CRYPTOKI_NOT_INITIALIZED,
            Error::DataInvalid => CKR_DATA_INVALID,
            Error::DataLenRange => CKR_DATA_LEN_RANGE,
            Error::DeviceError => CKR_DEVICE_ERROR,
            Error::DeviceMemory => CKR_DEVICE_MEMORY,
            Error::DeviceRemoved => CKR_DEVICE_REMOVED,
            Error::FunctionNotSupported => CKR_FUNCTION_NOT_SUPPORTED,
            Error::GeneralError => CKR_GENERAL_ERROR,
            Error::HostMemory => CKR_HOST_MEMORY,
            Error::KeyFunctionNotPermitted => CKR_KEY_FUNCTION_NOT_PERMITTED,
            Error::KeyHandleInvalid => CKR_KEY_HANDLE_INVALID,
            Error::KeyTypeInconsistent => CKR_KEY_TYPE_INCONSISTENT,
            Error::MechanismInvalid => CKR_MECHANISM_INVALID,
            Error::MechanismParamInvalid => CKR_MECHANISM_PARAM_INVALID,
            Error::ObjectHandleInvalid => CKR_OBJECT_HANDLE_INVALID,
            Error::OperationActive => CKR_OPERATION_ACTIVE,
            Error::OperationNotInitialized => CKR_OPERATION_NOT_INITIALIZED,
            Error::PinIncorrect => CKR_PIN_INCORRECT,
            Error::PinInvalid => CKR_PIN_INVALID,
            Error::PinLenRange => CKR_PIN_LEN_RANGE,
            Error::PinLocked => CKR_PIN_LOCKED,
            Error::RandomSeedNotSupported => CKR_RANDOM_SEED_NOT_SUPPORTED,
            Error::SessionExists => CKR_SESSION_EXISTS,
            Error::SessionHandleInvalid => CKR_SESSION_HANDLE_INVALID,
            Error::SessionParallelNotSupported => CKR_SESSION_PARALLEL_NOT_SUPPORTED,
            Error::SessionReadOnly => CKR_SESSION_READ_ONLY,
            Error::SessionReadOnlyExists => CKR_SESSION_READ_ONLY_EXISTS,
            Error::SessionReadWriteSoExists => CKR_SESSION_READ_WRITE_SO_EXISTS,
            Error::SignatureInvalid => CKR_SIGNATURE_INVALID,
            Error::SignatureLenRange => CKR_SIGNATURE_LEN_RANGE,
            Error::SlotIdInvalid => CKR_SLOT_ID_INVALID,
            Error::TemplateIncomplete => CKR_TEMPLATE_INCOMPLETE,
            Error::TemplateInconsistent => CKR_TEMPLATE_INCONSISTENT,
            Error::TokenNotPresent => CKR_TOKEN_NOT_PRESENT,
            Error::TokenNotRecognized => CKR_TOKEN_NOT_RECOGNIZED,
            Error::UserAlreadyLoggedIn => CKR_USER_ALREADY_LOGGED_IN,
            Error::UserAnotherAlreadyLoggedIn => CKR_USER_ANOTHER_ALREADY_LOGGED_IN,
            Error::UserNotLoggedIn => CKR_USER_NOT_LOGGED_IN,
            Error::UserPinNotInitialized => CKR_USER_PIN_NOT_INITIALIZED,
            Error::UserTypeInvalid => CKR_USER_TYPE_INVALID,
            Error::Injected(rv) => rv,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_maps_to_a_failure_code() {
        let all = [
            Error::ActionProhibited,
            Error::ArgumentsBad,
            Error::BufferTooSmall,
            Error::PinLocked,
            Error::SignatureInvalid,
            Error::UserNotLoggedIn,
            Error::Injected(CKR_DEVICE_ERROR),
        ];
        for e in all {
            assert_ne!(e.rv(), CKR_OK, "{e:?}");
        }
        assert_eq!(Error::Injected(0x42).rv(), 0x42);
        assert_eq!(Error::PinLocked.rv(), 0xA4);
        assert_eq!(Error::BufferTooSmall.rv(), 0x150);
    }
}
