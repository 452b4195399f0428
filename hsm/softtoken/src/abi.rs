//! The C ABI: the only `unsafe` code of the project.
//!
//! Each function checks and copies its C arguments into safe values, calls
//! the matching function of [`crate::module`], and writes results back. A
//! panic never crosses the boundary: it becomes `CKR_GENERAL_ERROR`. Only
//! `C_GetFunctionList`, `C_GetInterfaceList` and `C_GetInterface` are
//! exported by name; every other function is reached through the function
//! lists, so a program that links this crate and loads the `.so` as well
//! cannot have one copy's table point into the other.
#![allow(unsafe_code)]
#![allow(non_snake_case)]

use crate::error::{Error, Result};
use crate::module::{self, Output};
use crate::object::Template;
use pkcs11_sys::*;
use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr;

const MANUFACTURER: &str = "SVS project";
const LIBRARY_VERSION: CK_VERSION = CK_VERSION { major: 0, minor: 1 };

/// Runs one call: fault gate, panic guard, error mapping.
fn entry(function: &str, body: impl FnOnce() -> Result<()>) -> CK_RV {
    run(function, None, body)
}

/// [`entry`] for a call on a session's active operation.
fn entry_in(
    function: &str,
    session: CK_SESSION_HANDLE,
    body: impl FnOnce() -> Result<()>,
) -> CK_RV {
    run(function, Some(session), body)
}

fn run(
    function: &str,
    session: Option<CK_SESSION_HANDLE>,
    body: impl FnOnce() -> Result<()>,
) -> CK_RV {
    match catch_unwind(AssertUnwindSafe(|| {
        module::gate(function, session)?;
        body()
    })) {
        Ok(Ok(())) => CKR_OK,
        Ok(Err(e)) => e.rv(),
        Err(_) => CKR_GENERAL_ERROR,
    }
}

fn pad<const N: usize>(text: &str) -> [u8; N] {
    let mut out = [b' '; N];
    let bytes = text.as_bytes();
    let n = bytes.len().min(N);
    out[..n].copy_from_slice(&bytes[..n]);
    out
}

/// A caller's length; anything a slice cannot have (over `isize::MAX`,
/// e.g. `CK_UNAVAILABLE_INFORMATION`) is a bad argument.
fn len(v: CK_ULONG) -> Result<usize> {
    usize::try_from(v)
        .ok()
        .filter(|n| isize::try_from(*n).is_ok())
        .ok_or(Error::ArgumentsBad)
}

/// A caller's input buffer; NULL is allowed only for length 0.
///
/// # Safety
/// `p` must be NULL or valid for reads of `n` bytes for `'a`.
unsafe fn input<'a>(p: *const u8, n: CK_ULONG) -> Result<&'a [u8]> {
    let n = len(n)?;
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Error::ArgumentsBad);
    }
    // SAFETY: non-null, and the caller promises `n` readable bytes.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// Writes a required out-parameter.
///
/// # Safety
/// `p` must be NULL or valid for a write of `T`.
unsafe fn put<T>(p: *mut T, value: T) -> Result<()> {
    if p.is_null() {
        return Err(Error::ArgumentsBad);
    }
    // SAFETY: non-null and, by the caller's contract, writable.
    unsafe { p.write(value) };
    Ok(())
}

/// Copies a template out of C memory.
///
/// # Safety
/// `p` must be NULL or point to `n` attributes whose values are readable.
unsafe fn template(p: *const CK_ATTRIBUTE, n: CK_ULONG) -> Result<Template> {
    let n = len(n)?;
    if n == 0 {
        return Ok(Vec::new());
    }
    if p.is_null() {
        return Err(Error::ArgumentsBad);
    }
    // SAFETY: non-null, `n` attributes by the caller's contract.
    let attrs = unsafe { std::slice::from_raw_parts(p, n) };
    attrs
        .iter()
        .map(|a| {
            // SAFETY: each attribute's value is readable for its length.
            let v = unsafe { input(a.pValue as *const u8, a.ulValueLen) }?;
            Ok((a.type_, v.to_vec()))
        })
        .collect()
}

/// The mechanism type and a copy of its parameter.
///
/// # Safety
/// `p` must be NULL or point to a mechanism whose parameter is readable.
unsafe fn mechanism(p: *const CK_MECHANISM) -> Result<(CK_MECHANISM_TYPE, Vec<u8>)> {
    if p.is_null() {
        return Err(Error::ArgumentsBad);
    }
    // SAFETY: non-null and readable by the caller's contract.
    let m = unsafe { &*p };
    // SAFETY: the parameter is readable for its stated length.
    let param = unsafe { input(m.pParameter as *const u8, m.ulParameterLen) }?;
    Ok((m.mechanism, param.to_vec()))
}

/// The capacity of an output buffer: `None` for a length query.
///
/// # Safety
/// `plen` must be NULL or readable.
unsafe fn capacity(p: *const u8, plen: *const CK_ULONG) -> Result<Option<usize>> {
    if plen.is_null() {
        return Err(Error::ArgumentsBad);
    }
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: non-null and readable.
    Ok(Some(len(unsafe { *plen })?))
}

/// Writes an [`Output`] by the two-call convention.
///
/// # Safety
/// `plen` must be writable; `p`, when the output is data, writable for the
/// capacity the caller stated.
unsafe fn output(out: Output, p: *mut u8, plen: *mut CK_ULONG) -> Result<()> {
    match out {
        // SAFETY: `plen` checked by `capacity` before the operation ran.
        Output::Length(n) => unsafe { put(plen, n as CK_ULONG) },
        Output::TooSmall(n) => {
            // SAFETY: as above.
            unsafe { put(plen, n as CK_ULONG) }?;
            Err(Error::BufferTooSmall)
        }
        Output::Data(v) => {
            // SAFETY: `p` is non-null (else this would have been a length
            // query) and holds at least `v.len()` bytes (checked against the
            // stated capacity).
            unsafe {
                ptr::copy_nonoverlapping(v.as_ptr(), p, v.len());
                put(plen, v.len() as CK_ULONG)
            }
        }
    }
}

/// Fills an array of `CK_ULONG`-sized items by the two-call convention.
///
/// # Safety
/// `pcount` must be NULL or writable; `p` NULL or writable for `*pcount` items.
unsafe fn list<T: Copy>(items: &[T], p: *mut T, pcount: *mut CK_ULONG) -> Result<()> {
    if pcount.is_null() {
        return Err(Error::ArgumentsBad);
    }
    if p.is_null() {
        // SAFETY: non-null, writable.
        unsafe { *pcount = items.len() as CK_ULONG };
        return Ok(());
    }
    // SAFETY: non-null, readable.
    let room = len(unsafe { *pcount })?;
    // SAFETY: non-null, writable.
    unsafe { *pcount = items.len() as CK_ULONG };
    if room < items.len() {
        return Err(Error::BufferTooSmall);
    }
    // SAFETY: `p` has room for `room >= items.len()` items.
    unsafe { ptr::copy_nonoverlapping(items.as_ptr(), p, items.len()) };
    Ok(())
}

// --- general-purpose ---------------------------------------------------------

unsafe extern "C" fn C_Initialize(pInitArgs: CK_VOID_PTR) -> CK_RV {
    entry("C_Initialize", || {
        if !pInitArgs.is_null() {
            // SAFETY: a non-null argument points to CK_C_INITIALIZE_ARGS.
            let args = unsafe { &*(pInitArgs as *const CK_C_INITIALIZE_ARGS) };
            if !args.pReserved.is_null() {
                return Err(Error::ArgumentsBad);
            }
            let given = [
                args.CreateMutex.is_some(),
                args.DestroyMutex.is_some(),
                args.LockMutex.is_some(),
                args.UnlockMutex.is_some(),
            ];
            let all = given.iter().all(|g| *g);
            if given.iter().any(|g| *g) && !all {
                return Err(Error::ArgumentsBad);
            }
            // The token locks with the OS's primitives only.
            if all && args.flags & CKF_OS_LOCKING_OK == 0 {
                return Err(Error::CantLock);
            }
        }
        module::initialize()
    })
}

unsafe extern "C" fn C_Finalize(pReserved: CK_VOID_PTR) -> CK_RV {
    entry("C_Finalize", || {
        if !pReserved.is_null() {
            return Err(Error::ArgumentsBad);
        }
        module::finalize()
    })
}

unsafe extern "C" fn C_GetInfo(pInfo: CK_INFO_PTR) -> CK_RV {
    entry("C_GetInfo", || {
        module::ensure_initialized()?;
        let info = CK_INFO {
            cryptokiVersion: CK_VERSION { major: 3, minor: 0 },
            manufacturerID: pad(MANUFACTURER),
            flags: 0,
            libraryDescription: pad("SVS SM2 soft token"),
            libraryVersion: LIBRARY_VERSION,
        };
        // SAFETY: out-parameter, checked for NULL by `put`.
        unsafe { put(pInfo, info) }
    })
}

unsafe extern "C" fn get_function_list(ppFunctionList: CK_FUNCTION_LIST_PTR_PTR) -> CK_RV {
    entry("C_GetFunctionList", || {
        // SAFETY: out-parameter; the list is immutable and lives forever
        // (PKCS#11 types the pointer mutable, callers never write through it).
        unsafe { put(ppFunctionList, &FUNCTION_LIST as *const _ as *mut _) }
    })
}

/// PKCS#11 2.40 entry point.
///
/// # Safety
/// `ppFunctionList` must be NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn C_GetFunctionList(ppFunctionList: CK_FUNCTION_LIST_PTR_PTR) -> CK_RV {
    // SAFETY: same contract.
    unsafe { get_function_list(ppFunctionList) }
}

unsafe extern "C" fn get_interface_list(pList: CK_INTERFACE_PTR, pulCount: CK_ULONG_PTR) -> CK_RV {
    entry("C_GetInterfaceList", || {
        // SAFETY: two-call convention on caller-provided memory.
        unsafe { list(&INTERFACES.0, pList, pulCount) }
    })
}

/// PKCS#11 3.0: the interfaces offered ("PKCS 11" 3.0 and 2.40).
///
/// # Safety
/// `pulCount` must be NULL or writable, `pList` NULL or writable for
/// `*pulCount` interfaces.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn C_GetInterfaceList(
    pInterfacesList: CK_INTERFACE_PTR,
    pulCount: CK_ULONG_PTR,
) -> CK_RV {
    // SAFETY: same contract.
    unsafe { get_interface_list(pInterfacesList, pulCount) }
}

unsafe extern "C" fn get_interface(
    pInterfaceName: CK_UTF8CHAR_PTR,
    pVersion: CK_VERSION_PTR,
    ppInterface: CK_INTERFACE_PTR_PTR,
    flags: CK_FLAGS,
) -> CK_RV {
    entry("C_GetInterface", || {
        if ppInterface.is_null() {
            return Err(Error::ArgumentsBad);
        }
        let name_ok = pInterfaceName.is_null() || {
            // SAFETY: a non-null name is a NUL-terminated string.
            let name = unsafe { std::ffi::CStr::from_ptr(pInterfaceName as *const _) };
            name.to_bytes() == b"PKCS 11"
        };
        let version = if pVersion.is_null() {
            None
        } else {
            // SAFETY: non-null, readable.
            Some(unsafe { *pVersion })
        };
        let found = INTERFACES.0.iter().zip(INTERFACE_VERSIONS).find(|(i, v)| {
            name_ok
                && i.flags & flags == flags
                && version.is_none_or(|w| w.major == v.major && w.minor == v.minor)
        });
        match found {
            Some((i, _)) => {
                // SAFETY: non-null out-parameter; the interface is static.
                unsafe { put(ppInterface, i as *const _ as *mut _) }
            }
            None => Err(Error::ArgumentsBad),
        }
    })
}

/// PKCS#11 3.0: one interface by name and version (NULL: the newest).
///
/// # Safety
/// Pointers must be NULL or valid as PKCS#11 3.0 describes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn C_GetInterface(
    pInterfaceName: CK_UTF8CHAR_PTR,
    pVersion: CK_VERSION_PTR,
    ppInterface: CK_INTERFACE_PTR_PTR,
    flags: CK_FLAGS,
) -> CK_RV {
    // SAFETY: same contract.
    unsafe { get_interface(pInterfaceName, pVersion, ppInterface, flags) }
}

// --- slots and tokens ------------------------------------------------------------

unsafe extern "C" fn C_GetSlotList(
    tokenPresent: CK_BBOOL,
    pSlotList: CK_SLOT_ID_PTR,
    pulCount: CK_ULONG_PTR,
) -> CK_RV {
    entry("C_GetSlotList", || {
        let slots = module::slot_list(tokenPresent != 0)?;
        // SAFETY: two-call convention on caller memory.
        unsafe { list(&slots, pSlotList, pulCount) }
    })
}

unsafe extern "C" fn C_GetSlotInfo(slotID: CK_SLOT_ID, pInfo: CK_SLOT_INFO_PTR) -> CK_RV {
    entry("C_GetSlotInfo", || {
        let present = module::slot_present(slotID)?;
        let info = CK_SLOT_INFO {
            slotDescription: pad(&format!("SVS soft token slot {slotID}")),
            manufacturerID: pad(MANUFACTURER),
            flags: if present { CKF_TOKEN_PRESENT } else { 0 },
            hardwareVersion: LIBRARY_VERSION,
            firmwareVersion: LIBRARY_VERSION,
        };
        // SAFETY: out-parameter.
        unsafe { put(pInfo, info) }
    })
}

unsafe extern "C" fn C_GetTokenInfo(slotID: CK_SLOT_ID, pInfo: CK_TOKEN_INFO_PTR) -> CK_RV {
    entry("C_GetTokenInfo", || {
        let t = module::token_info(slotID)?;
        let info = CK_TOKEN_INFO {
            label: t.label,
            manufacturerID: pad(MANUFACTURER),
            model: pad("svs-softtoken"),
            serialNumber: t.serial,
            flags: t.flags,
            ulMaxSessionCount: CK_EFFECTIVELY_INFINITE,
            ulSessionCount: t.sessions as CK_ULONG,
            ulMaxRwSessionCount: CK_EFFECTIVELY_INFINITE,
            ulRwSessionCount: t.rw_sessions as CK_ULONG,
            ulMaxPinLen: t.pin_max as CK_ULONG,
            ulMinPinLen: t.pin_min as CK_ULONG,
            ulTotalPublicMemory: CK_UNAVAILABLE_INFORMATION,
            ulFreePublicMemory: CK_UNAVAILABLE_INFORMATION,
            ulTotalPrivateMemory: CK_UNAVAILABLE_INFORMATION,
            ulFreePrivateMemory: CK_UNAVAILABLE_INFORMATION,
            hardwareVersion: LIBRARY_VERSION,
            firmwareVersion: LIBRARY_VERSION,
            utcTime: [b' '; 16],
        };
        // SAFETY: out-parameter.
        unsafe { put(pInfo, info) }
    })
}

unsafe extern "C" fn C_GetMechanismList(
    slotID: CK_SLOT_ID,
    pMechanismList: CK_MECHANISM_TYPE_PTR,
    pulCount: CK_ULONG_PTR,
) -> CK_RV {
    entry("C_GetMechanismList", || {
        let mechs = module::mechanism_list(slotID)?;
        // SAFETY: two-call convention on caller memory.
        unsafe { list(&mechs, pMechanismList, pulCount) }
    })
}

unsafe extern "C" fn C_GetMechanismInfo(
    slotID: CK_SLOT_ID,
    type_: CK_MECHANISM_TYPE,
    pInfo: CK_MECHANISM_INFO_PTR,
) -> CK_RV {
    entry("C_GetMechanismInfo", || {
        let info = module::mechanism_info(slotID, type_)?;
        // SAFETY: out-parameter.
        unsafe { put(pInfo, info) }
    })
}

unsafe extern "C" fn C_InitToken(
    slotID: CK_SLOT_ID,
    pPin: CK_UTF8CHAR_PTR,
    ulPinLen: CK_ULONG,
    pLabel: CK_UTF8CHAR_PTR,
) -> CK_RV {
    entry("C_InitToken", || {
        // SAFETY: caller-provided PIN of the stated length.
        let pin = zeroize::Zeroizing::new(unsafe { input(pPin, ulPinLen) }?.to_vec());
        // SAFETY: the label is 32 bytes, blank-padded, by the standard.
        let label = unsafe { input(pLabel, 32) }?;
        let label: [u8; 32] = label.try_into().map_err(|_| Error::ArgumentsBad)?;
        module::init_token(slotID, &pin, label)
    })
}

unsafe extern "C" fn C_InitPIN(
    hSession: CK_SESSION_HANDLE,
    pPin: CK_UTF8CHAR_PTR,
    ulPinLen: CK_ULONG,
) -> CK_RV {
    entry("C_InitPIN", || {
        // SAFETY: caller-provided PIN of the stated length.
        let pin = zeroize::Zeroizing::new(unsafe { input(pPin, ulPinLen) }?.to_vec());
        module::init_pin(hSession, &pin)
    })
}

unsafe extern "C" fn C_SetPIN(
    hSession: CK_SESSION_HANDLE,
    pOldPin: CK_UTF8CHAR_PTR,
    ulOldLen: CK_ULONG,
    pNewPin: CK_UTF8CHAR_PTR,
    ulNewLen: CK_ULONG,
) -> CK_RV {
    entry("C_SetPIN", || {
        // SAFETY: caller-provided PINs of the stated lengths.
        let old = zeroize::Zeroizing::new(unsafe { input(pOldPin, ulOldLen) }?.to_vec());
        // SAFETY: as above.
        let new = zeroize::Zeroizing::new(unsafe { input(pNewPin, ulNewLen) }?.to_vec());
        module::set_pin(hSession, &old, &new)
    })
}

// --- sessions ----------------------------------------------------------------------

unsafe extern "C" fn C_OpenSession(
    slotID: CK_SLOT_ID,
    flags: CK_FLAGS,
    _pApplication: CK_VOID_PTR,
    _Notify: CK_NOTIFY,
    phSession: CK_SESSION_HANDLE_PTR,
) -> CK_RV {
    entry("C_OpenSession", || {
        if phSession.is_null() {
            return Err(Error::ArgumentsBad);
        }
        let h = module::open_session(slotID, flags)?;
        // SAFETY: non-null out-parameter.
        unsafe { put(phSession, h) }
    })
}

unsafe extern "C" fn C_CloseSession(hSession: CK_SESSION_HANDLE) -> CK_RV {
    entry("C_CloseSession", || module::close_session(hSession))
}

unsafe extern "C" fn C_CloseAllSessions(slotID: CK_SLOT_ID) -> CK_RV {
    entry("C_CloseAllSessions", || module::close_all_sessions(slotID))
}

unsafe extern "C" fn C_GetSessionInfo(
    hSession: CK_SESSION_HANDLE,
    pInfo: CK_SESSION_INFO_PTR,
) -> CK_RV {
    entry("C_GetSessionInfo", || {
        let (slot, state, flags) = module::session_info(hSession)?;
        let info = CK_SESSION_INFO {
            slotID: slot,
            state,
            flags,
            ulDeviceError: 0,
        };
        // SAFETY: out-parameter.
        unsafe { put(pInfo, info) }
    })
}

unsafe extern "C" fn C_GetOperationState(
    hSession: CK_SESSION_HANDLE,
    _p: CK_BYTE_PTR,
    _plen: CK_ULONG_PTR,
) -> CK_RV {
    entry("C_GetOperationState", || {
        module::unsupported_in_session(hSession)
    })
}

unsafe extern "C" fn C_SetOperationState(
    hSession: CK_SESSION_HANDLE,
    _p: CK_BYTE_PTR,
    _len: CK_ULONG,
    _e: CK_OBJECT_HANDLE,
    _a: CK_OBJECT_HANDLE,
) -> CK_RV {
    entry("C_SetOperationState", || {
        module::unsupported_in_session(hSession)
    })
}

unsafe extern "C" fn C_Login(
    hSession: CK_SESSION_HANDLE,
    userType: CK_USER_TYPE,
    pPin: CK_UTF8CHAR_PTR,
    ulPinLen: CK_ULONG,
) -> CK_RV {
    entry("C_Login", || {
        // SAFETY: caller-provided PIN of the stated length.
        let pin = zeroize::Zeroizing::new(unsafe { input(pPin, ulPinLen) }?.to_vec());
        module::login(hSession, userType, &pin)
    })
}

unsafe extern "C" fn C_LoginUser(
    hSession: CK_SESSION_HANDLE,
    userType: CK_USER_TYPE,
    pPin: CK_UTF8CHAR_PTR,
    ulPinLen: CK_ULONG,
    _pUsername: CK_UTF8CHAR_PTR,
    ulUsernameLen: CK_ULONG,
) -> CK_RV {
    entry("C_LoginUser", || {
        // Tokens without user names must ignore them (PKCS#11 3.0 §5.6).
        let _ = ulUsernameLen;
        // SAFETY: caller-provided PIN of the stated length.
        let pin = zeroize::Zeroizing::new(unsafe { input(pPin, ulPinLen) }?.to_vec());
        module::login(hSession, userType, &pin)
    })
}

unsafe extern "C" fn C_Logout(hSession: CK_SESSION_HANDLE) -> CK_RV {
    entry("C_Logout", || module::logout(hSession))
}

// --- objects ---------------------------------------------------------------------------

unsafe extern "C" fn C_CreateObject(
    hSession: CK_SESSION_HANDLE,
    pTemplate: CK_ATTRIBUTE_PTR,
    ulCount: CK_ULONG,
    phObject: CK_OBJECT_HANDLE_PTR,
) -> CK_RV {
    entry("C_CreateObject", || {
        if phObject.is_null() {
            return Err(Error::ArgumentsBad);
        }
        // SAFETY: caller-provided template.
        let t = unsafe { template(pTemplate, ulCount) }?;
        let h = module::create_object(hSession, &t)?;
        // SAFETY: non-null out-parameter.
        unsafe { put(phObject, h) }
    })
}

unsafe extern "C" fn C_CopyObject(
    hSession: CK_SESSION_HANDLE,
    _hObject: CK_OBJECT_HANDLE,
    _pTemplate: CK_ATTRIBUTE_PTR,
    _ulCount: CK_ULONG,
    _phNewObject: CK_OBJECT_HANDLE_PTR,
) -> CK_RV {
    // Objects here are not copyable (CKA_COPYABLE is false).
    entry("C_CopyObject", || module::unsupported_in_session(hSession))
}

unsafe extern "C" fn C_DestroyObject(
    hSession: CK_SESSION_HANDLE,
    hObject: CK_OBJECT_HANDLE,
) -> CK_RV {
    entry("C_DestroyObject", || {
        module::destroy_object(hSession, hObject)
    })
}

unsafe extern "C" fn C_GetObjectSize(
    hSession: CK_SESSION_HANDLE,
    hObject: CK_OBJECT_HANDLE,
    pulSize: CK_ULONG_PTR,
) -> CK_RV {
    entry("C_GetObjectSize", || {
        let size = module::object_size(hSession, hObject)?;
        // SAFETY: out-parameter.
        unsafe { put(pulSize, size as CK_ULONG) }
    })
}

unsafe extern "C" fn C_GetAttributeValue(
    hSession: CK_SESSION_HANDLE,
    hObject: CK_OBJECT_HANDLE,
    pTemplate: CK_ATTRIBUTE_PTR,
    ulCount: CK_ULONG,
) -> CK_RV {
    entry("C_GetAttributeValue", || {
        let n = len(ulCount)?;
        if n > 0 && pTemplate.is_null() {
            return Err(Error::ArgumentsBad);
        }
        let attrs: &mut [CK_ATTRIBUTE] = if n == 0 {
            &mut []
        } else {
            // SAFETY: non-null, `n` writable attributes by contract.
            unsafe { std::slice::from_raw_parts_mut(pTemplate, n) }
        };
        let types: Vec<_> = attrs.iter().map(|a| a.type_).collect();
        let values = module::attribute_values(hSession, hObject, &types)?;
        let mut result = Ok(());
        let mut note = |e: Error| {
            // Sensitive wins over unknown, unknown over too small.
            let rank = |e: &Error| match e {
                Error::AttributeSensitive => 3,
                Error::AttributeTypeInvalid => 2,
                _ => 1,
            };
            match &result {
                Err(old) if rank(old) >= rank(&e) => {}
                _ => result = Err(e),
            }
        };
        for (a, v) in attrs.iter_mut().zip(values) {
            match v {
                Err(e) => {
                    a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                    note(e);
                }
                Ok(v) if a.pValue.is_null() => a.ulValueLen = v.len() as CK_ULONG,
                Ok(v) if len(a.ulValueLen)? < v.len() => {
                    a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                    note(Error::BufferTooSmall);
                }
                Ok(v) => {
                    // SAFETY: the caller's buffer holds `ulValueLen >= v.len()`.
                    unsafe { ptr::copy_nonoverlapping(v.as_ptr(), a.pValue as *mut u8, v.len()) };
                    a.ulValueLen = v.len() as CK_ULONG;
                }
            }
        }
        result
    })
}

unsafe extern "C" fn C_SetAttributeValue(
    hSession: CK_SESSION_HANDLE,
    hObject: CK_OBJECT_HANDLE,
    pTemplate: CK_ATTRIBUTE_PTR,
    ulCount: CK_ULONG,
) -> CK_RV {
    entry("C_SetAttributeValue", || {
        // SAFETY: caller-provided template.
        let t = unsafe { template(pTemplate, ulCount) }?;
        module::set_attribute_values(hSession, hObject, &t)
    })
}

unsafe extern "C" fn C_FindObjectsInit(
    hSession: CK_SESSION_HANDLE,
    pTemplate: CK_ATTRIBUTE_PTR,
    ulCount: CK_ULONG,
) -> CK_RV {
    entry("C_FindObjectsInit", || {
        // SAFETY: caller-provided template.
        let t = unsafe { template(pTemplate, ulCount) }?;
        module::find_init(hSession, &t)
    })
}

unsafe extern "C" fn C_FindObjects(
    hSession: CK_SESSION_HANDLE,
    phObject: CK_OBJECT_HANDLE_PTR,
    ulMaxObjectCount: CK_ULONG,
    pulObjectCount: CK_ULONG_PTR,
) -> CK_RV {
    entry("C_FindObjects", || {
        let max = len(ulMaxObjectCount)?;
        if pulObjectCount.is_null() || (phObject.is_null() && max > 0) {
            return Err(Error::ArgumentsBad);
        }
        let found = module::find(hSession, max)?;
        if !found.is_empty() {
            // SAFETY: room for `max >= found.len()` handles.
            unsafe { ptr::copy_nonoverlapping(found.as_ptr(), phObject, found.len()) };
        }
        // SAFETY: non-null out-parameter.
        unsafe { put(pulObjectCount, found.len() as CK_ULONG) }
    })
}

unsafe extern "C" fn C_FindObjectsFinal(hSession: CK_SESSION_HANDLE) -> CK_RV {
    entry("C_FindObjectsFinal", || module::find_final(hSession))
}

// --- signing, verification, digests -------------------------------------------------

unsafe extern "C" fn C_SignInit(
    hSession: CK_SESSION_HANDLE,
    pMechanism: CK_MECHANISM_PTR,
    hKey: CK_OBJECT_HANDLE,
) -> CK_RV {
    entry("C_SignInit", || {
        // SAFETY: caller-provided mechanism.
        let (m, param) = unsafe { mechanism(pMechanism) }?;
        module::sign_init(hSession, m, &param, hKey)
    })
}

unsafe extern "C" fn C_Sign(
    hSession: CK_SESSION_HANDLE,
    pData: CK_BYTE_PTR,
    ulDataLen: CK_ULONG,
    pSignature: CK_BYTE_PTR,
    pulSignatureLen: CK_ULONG_PTR,
) -> CK_RV {
    entry_in("C_Sign", hSession, || {
        // SAFETY: caller-provided buffers.
        let data = unsafe { input(pData, ulDataLen) }?;
        // SAFETY: as above.
        let cap = unsafe { capacity(pSignature, pulSignatureLen) }?;
        let out = module::sign(hSession, data, cap)?;
        // SAFETY: as above.
        unsafe { output(out, pSignature, pulSignatureLen) }
    })
}

unsafe extern "C" fn C_SignUpdate(
    hSession: CK_SESSION_HANDLE,
    pPart: CK_BYTE_PTR,
    ulPartLen: CK_ULONG,
) -> CK_RV {
    entry_in("C_SignUpdate", hSession, || {
        // SAFETY: caller-provided buffer.
        let data = unsafe { input(pPart, ulPartLen) }?;
        module::sign_update(hSession, data)
    })
}

unsafe extern "C" fn C_SignFinal(
    hSession: CK_SESSION_HANDLE,
    pSignature: CK_BYTE_PTR,
    pulSignatureLen: CK_ULONG_PTR,
) -> CK_RV {
    entry_in("C_SignFinal", hSession, || {
        // SAFETY: caller-provided buffers.
        let cap = unsafe { capacity(pSignature, pulSignatureLen) }?;
        let out = module::sign_final(hSession, cap)?;
        // SAFETY: as above.
        unsafe { output(out, pSignature, pulSignatureLen) }
    })
}

unsafe extern "C" fn C_VerifyInit(
    hSession: CK_SESSION_HANDLE,
    pMechanism: CK_MECHANISM_PTR,
    hKey: CK_OBJECT_HANDLE,
) -> CK_RV {
    entry("C_VerifyInit", || {
        // SAFETY: caller-provided mechanism.
        let (m, param) = unsafe { mechanism(pMechanism) }?;
        module::verify_init(hSession, m, &param, hKey)
    })
}

unsafe extern "C" fn C_Verify(
    hSession: CK_SESSION_HANDLE,
    pData: CK_BYTE_PTR,
    ulDataLen: CK_ULONG,
    pSignature: CK_BYTE_PTR,
    ulSignatureLen: CK_ULONG,
) -> CK_RV {
    entry_in("C_Verify", hSession, || {
        // SAFETY: caller-provided buffers.
        let data = unsafe { input(pData, ulDataLen) }?;
        // SAFETY: as above.
        let sig = unsafe { input(pSignature, ulSignatureLen) }?;
        module::verify(hSession, data, sig)
    })
}

unsafe extern "C" fn C_VerifyUpdate(
    hSession: CK_SESSION_HANDLE,
    pPart: CK_BYTE_PTR,
    ulPartLen: CK_ULONG,
) -> CK_RV {
    entry_in("C_VerifyUpdate", hSession, || {
        // SAFETY: caller-provided buffer.
        let data = unsafe { input(pPart, ulPartLen) }?;
        module::verify_update(hSession, data)
    })
}

unsafe extern "C" fn C_VerifyFinal(
    hSession: CK_SESSION_HANDLE,
    pSignature: CK_BYTE_PTR,
    ulSignatureLen: CK_ULONG,
) -> CK_RV {
    entry_in("C_VerifyFinal", hSession, || {
        // SAFETY: caller-provided buffer.
        let sig = unsafe { input(pSignature, ulSignatureLen) }?;
        module::verify_final(hSession, sig)
    })
}

unsafe extern "C" fn C_DigestInit(
    hSession: CK_SESSION_HANDLE,
    pMechanism: CK_MECHANISM_PTR,
) -> CK_RV {
    entry("C_DigestInit", || {
        // SAFETY: caller-provided mechanism.
        let (m, param) = unsafe { mechanism(pMechanism) }?;
        module::digest_init(hSession, m, &param)
    })
}

unsafe extern "C" fn C_Digest(
    hSession: CK_SESSION_HANDLE,
    pData: CK_BYTE_PTR,
    ulDataLen: CK_ULONG,
    pDigest: CK_BYTE_PTR,
    pulDigestLen: CK_ULONG_PTR,
) -> CK_RV {
    entry_in("C_Digest", hSession, || {
        // SAFETY: caller-provided buffers.
        let data = unsafe { input(pData, ulDataLen) }?;
        // SAFETY: as above.
        let cap = unsafe { capacity(pDigest, pulDigestLen) }?;
        let out = module::digest(hSession, data, cap)?;
        // SAFETY: as above.
        unsafe { output(out, pDigest, pulDigestLen) }
    })
}

unsafe extern "C" fn C_DigestUpdate(
    hSession: CK_SESSION_HANDLE,
    pPart: CK_BYTE_PTR,
    ulPartLen: CK_ULONG,
) -> CK_RV {
    entry_in("C_DigestUpdate", hSession, || {
        // SAFETY: caller-provided buffer.
        let data = unsafe { input(pPart, ulPartLen) }?;
        module::digest_update(hSession, data)
    })
}

unsafe extern "C" fn C_DigestKey(hSession: CK_SESSION_HANDLE, _hKey: CK_OBJECT_HANDLE) -> CK_RV {
    entry("C_DigestKey", || module::unsupported_in_session(hSession))
}

unsafe extern "C" fn C_DigestFinal(
    hSession: CK_SESSION_HANDLE,
    pDigest: CK_BYTE_PTR,
    pulDigestLen: CK_ULONG_PTR,
) -> CK_RV {
    entry_in("C_DigestFinal", hSession, || {
        // SAFETY: caller-provided buffers.
        let cap = unsafe { capacity(pDigest, pulDigestLen) }?;
        let out = module::digest_final(hSession, cap)?;
        // SAFETY: as above.
        unsafe { output(out, pDigest, pulDigestLen) }
    })
}

// --- keys and random ---------------------------------------------------------------

unsafe extern "C" fn C_GenerateKeyPair(
    hSession: CK_SESSION_HANDLE,
    pMechanism: CK_MECHANISM_PTR,
    pPublicKeyTemplate: CK_ATTRIBUTE_PTR,
    ulPublicKeyAttributeCount: CK_ULONG,
    pPrivateKeyTemplate: CK_ATTRIBUTE_PTR,
    ulPrivateKeyAttributeCount: CK_ULONG,
    phPublicKey: CK_OBJECT_HANDLE_PTR,
    phPrivateKey: CK_OBJECT_HANDLE_PTR,
) -> CK_RV {
    entry("C_GenerateKeyPair", || {
        if phPublicKey.is_null() || phPrivateKey.is_null() {
            return Err(Error::ArgumentsBad);
        }
        // SAFETY: caller-provided mechanism and templates.
        let (m, param) = unsafe { mechanism(pMechanism) }?;
        // SAFETY: as above.
        let public = unsafe { template(pPublicKeyTemplate, ulPublicKeyAttributeCount) }?;
        // SAFETY: as above.
        let private = unsafe { template(pPrivateKeyTemplate, ulPrivateKeyAttributeCount) }?;
        let (hpub, hpriv) = module::generate_key_pair(hSession, m, &param, &public, &private)?;
        // SAFETY: non-null out-parameters.
        unsafe {
            put(phPublicKey, hpub)?;
            put(phPrivateKey, hpriv)
        }
    })
}

unsafe extern "C" fn C_SeedRandom(
    hSession: CK_SESSION_HANDLE,
    _pSeed: CK_BYTE_PTR,
    _ulSeedLen: CK_ULONG,
) -> CK_RV {
    entry("C_SeedRandom", || {
        module::unsupported_in_session(hSession).map_err(|_| Error::RandomSeedNotSupported)
    })
}

unsafe extern "C" fn C_GenerateRandom(
    hSession: CK_SESSION_HANDLE,
    RandomData: CK_BYTE_PTR,
    ulRandomLen: CK_ULONG,
) -> CK_RV {
    entry("C_GenerateRandom", || {
        let n = len(ulRandomLen)?;
        if n == 0 {
            return module::generate_random(hSession, &mut []);
        }
        if RandomData.is_null() {
            return Err(Error::ArgumentsBad);
        }
        // SAFETY: non-null, `n` writable bytes by contract.
        let out = unsafe { std::slice::from_raw_parts_mut(RandomData, n) };
        module::generate_random(hSession, out)
    })
}

unsafe extern "C" fn C_GetFunctionStatus(_hSession: CK_SESSION_HANDLE) -> CK_RV {
    CKR_FUNCTION_NOT_PARALLEL
}

unsafe extern "C" fn C_CancelFunction(_hSession: CK_SESSION_HANDLE) -> CK_RV {
    CKR_FUNCTION_NOT_PARALLEL
}

unsafe extern "C" fn C_WaitForSlotEvent(
    _flags: CK_FLAGS,
    _pSlot: CK_SLOT_ID_PTR,
    _pReserved: CK_VOID_PTR,
) -> CK_RV {
    entry("C_WaitForSlotEvent", || {
        module::ensure_initialized()?;
        Err(Error::FunctionNotSupported)
    })
}

/// Functions of operations this token does not offer (encryption, wrapping,
/// derivation, recovery, message-based APIs): they check the session, then
/// say "not supported".
macro_rules! unsupported {
    ($($name:ident($($arg:ident: $ty:ty),*);)*) => {$(
        unsafe extern "C" fn $name(hSession: CK_SESSION_HANDLE, $($arg: $ty),*) -> CK_RV {
            $(let _ = $arg;)*
            entry(stringify!($name), || module::unsupported_in_session(hSession))
        }
    )*};
}

unsupported! {
    C_EncryptInit(m: CK_MECHANISM_PTR, k: CK_OBJECT_HANDLE);
    C_Encrypt(a: CK_BYTE_PTR, b: CK_ULONG, c: CK_BYTE_PTR, d: CK_ULONG_PTR);
    C_EncryptUpdate(a: CK_BYTE_PTR, b: CK_ULONG, c: CK_BYTE_PTR, d: CK_ULONG_PTR);
    C_EncryptFinal(a: CK_BYTE_PTR, b: CK_ULONG_PTR);
    C_DecryptInit(m: CK_MECHANISM_PTR, k: CK_OBJECT_HANDLE);
    C_Decrypt(a: CK_BYTE_PTR, b: CK_ULONG, c: CK_BYTE_PTR, d: CK_ULONG_PTR);
    C_DecryptUpdate(a: CK_BYTE_PTR, b: CK_ULONG, c: CK_BYTE_PTR, d: CK_ULONG_PTR);
    C_DecryptFinal(a: CK_BYTE_PTR, b: CK_ULONG_PTR);
    C_SignRecoverInit(m: CK_MECHANISM_PTR, k: CK_OBJECT_HANDLE);
    C_SignRecover(a: CK_BYTE_PTR, b: CK_ULONG, c: CK_BYTE_PTR, d: CK_ULONG_PTR);
    C_VerifyRecoverInit(m: CK_MECHANISM_PTR, k: CK_OBJECT_HANDLE);
    C_VerifyRecover(a: CK_BYTE_PTR, b: CK_ULONG, c: CK_BYTE_PTR, d: CK_ULONG_PTR);
    C_DigestEncryptUpdate(a: CK_BYTE_PTR, b: CK_ULONG, c: CK_BYTE_PTR, d: CK_ULONG_PTR);
    C_DecryptDigestUpdate(a: CK_BYTE_PTR, b: CK_ULONG, c: CK_BYTE_PTR, d: CK_ULONG_PTR);
    C_SignEncryptUpdate(a: CK_BYTE_PTR, b: CK_ULONG, c: CK_BYTE_PTR, d: CK_ULONG_PTR);
    C_DecryptVerifyUpdate(a: CK_BYTE_PTR, b: CK_ULONG, c: CK_BYTE_PTR, d: CK_ULONG_PTR);
    C_GenerateKey(m: CK_MECHANISM_PTR, t: CK_ATTRIBUTE_PTR, n: CK_ULONG, k: CK_OBJECT_HANDLE_PTR);
    C_WrapKey(m: CK_MECHANISM_PTR, w: CK_OBJECT_HANDLE, k: CK_OBJECT_HANDLE, p: CK_BYTE_PTR, l: CK_ULONG_PTR);
    C_UnwrapKey(m: CK_MECHANISM_PTR, u: CK_OBJECT_HANDLE, p: CK_BYTE_PTR, l: CK_ULONG, t: CK_ATTRIBUTE_PTR, n: CK_ULONG, k: CK_OBJECT_HANDLE_PTR);
    C_DeriveKey(m: CK_MECHANISM_PTR, b: CK_OBJECT_HANDLE, t: CK_ATTRIBUTE_PTR, n: CK_ULONG, k: CK_OBJECT_HANDLE_PTR);
    C_SessionCancel(f: CK_FLAGS);
    C_MessageEncryptInit(m: CK_MECHANISM_PTR, k: CK_OBJECT_HANDLE);
    C_EncryptMessage(p: CK_VOID_PTR, pl: CK_ULONG, a: CK_BYTE_PTR, al: CK_ULONG, x: CK_BYTE_PTR, xl: CK_ULONG, c: CK_BYTE_PTR, cl: CK_ULONG_PTR);
    C_EncryptMessageBegin(p: CK_VOID_PTR, pl: CK_ULONG, a: CK_BYTE_PTR, al: CK_ULONG);
    C_EncryptMessageNext(p: CK_VOID_PTR, pl: CK_ULONG, x: CK_BYTE_PTR, xl: CK_ULONG, c: CK_BYTE_PTR, cl: CK_ULONG_PTR, f: CK_FLAGS);
    C_MessageEncryptFinal();
    C_MessageDecryptInit(m: CK_MECHANISM_PTR, k: CK_OBJECT_HANDLE);
    C_DecryptMessage(p: CK_VOID_PTR, pl: CK_ULONG, a: CK_BYTE_PTR, al: CK_ULONG, c: CK_BYTE_PTR, cl: CK_ULONG, x: CK_BYTE_PTR, xl: CK_ULONG_PTR);
    C_DecryptMessageBegin(p: CK_VOID_PTR, pl: CK_ULONG, a: CK_BYTE_PTR, al: CK_ULONG);
    C_DecryptMessageNext(p: CK_VOID_PTR, pl: CK_ULONG, c: CK_BYTE_PTR, cl: CK_ULONG, x: CK_BYTE_PTR, xl: CK_ULONG_PTR, f: CK_FLAGS);
    C_MessageDecryptFinal();
    C_MessageSignInit(m: CK_MECHANISM_PTR, k: CK_OBJECT_HANDLE);
    C_SignMessage(p: CK_VOID_PTR, pl: CK_ULONG, d: CK_BYTE_PTR, dl: CK_ULONG, s: CK_BYTE_PTR, sl: CK_ULONG_PTR);
    C_SignMessageBegin(p: CK_VOID_PTR, pl: CK_ULONG);
    C_SignMessageNext(p: CK_VOID_PTR, pl: CK_ULONG, d: CK_BYTE_PTR, dl: CK_ULONG, s: CK_BYTE_PTR, sl: CK_ULONG_PTR);
    C_MessageSignFinal();
    C_MessageVerifyInit(m: CK_MECHANISM_PTR, k: CK_OBJECT_HANDLE);
    C_VerifyMessage(p: CK_VOID_PTR, pl: CK_ULONG, d: CK_BYTE_PTR, dl: CK_ULONG, s: CK_BYTE_PTR, sl: CK_ULONG);
    C_VerifyMessageBegin(p: CK_VOID_PTR, pl: CK_ULONG);
    C_VerifyMessageNext(p: CK_VOID_PTR, pl: CK_ULONG, d: CK_BYTE_PTR, dl: CK_ULONG, s: CK_BYTE_PTR, sl: CK_ULONG);
    C_MessageVerifyFinal();
}

// --- function lists and interfaces ---------------------------------------------------

macro_rules! function_list {
    ($ty:ident, $major:expr, $minor:expr, { $($extra:ident: $f:expr),* $(,)? }) => {
        $ty {
            version: CK_VERSION { major: $major, minor: $minor },
            C_Initialize: Some(C_Initialize),
            C_Finalize: Some(C_Finalize),
            C_GetInfo: Some(C_GetInfo),
            C_GetFunctionList: Some(get_function_list),
            C_GetSlotList: Some(C_GetSlotList),
            C_GetSlotInfo: Some(C_GetSlotInfo),
            C_GetTokenInfo: Some(C_GetTokenInfo),
            C_GetMechanismList: Some(C_GetMechanismList),
            C_GetMechanismInfo: Some(C_GetMechanismInfo),
            C_InitToken: Some(C_InitToken),
            C_InitPIN: Some(C_InitPIN),
            C_SetPIN: Some(C_SetPIN),
            C_OpenSession: Some(C_OpenSession),
            C_CloseSession: Some(C_CloseSession),
            C_CloseAllSessions: Some(C_CloseAllSessions),
            C_GetSessionInfo: Some(C_GetSessionInfo),
            C_GetOperationState: Some(C_GetOperationState),
            C_SetOperationState: Some(C_SetOperationState),
            C_Login: Some(C_Login),
            C_Logout: Some(C_Logout),
            C_CreateObject: Some(C_CreateObject),
            C_CopyObject: Some(C_CopyObject),
            C_DestroyObject: Some(C_DestroyObject),
            C_GetObjectSize: Some(C_GetObjectSize),
            C_GetAttributeValue: Some(C_GetAttributeValue),
            C_SetAttributeValue: Some(C_SetAttributeValue),
            C_FindObjectsInit: Some(C_FindObjectsInit),
            C_FindObjects: Some(C_FindObjects),
            C_FindObjectsFinal: Some(C_FindObjectsFinal),
            C_EncryptInit: Some(C_EncryptInit),
            C_Encrypt: Some(C_Encrypt),
            C_EncryptUpdate: Some(C_EncryptUpdate),
            C_EncryptFinal: Some(C_EncryptFinal),
            C_DecryptInit: Some(C_DecryptInit),
            C_Decrypt: Some(C_Decrypt),
            C_DecryptUpdate: Some(C_DecryptUpdate),
            C_DecryptFinal: Some(C_DecryptFinal),
            C_DigestInit: Some(C_DigestInit),
            C_Digest: Some(C_Digest),
            C_DigestUpdate: Some(C_DigestUpdate),
            C_DigestKey: Some(C_DigestKey),
            C_DigestFinal: Some(C_DigestFinal),
            C_SignInit: Some(C_SignInit),
            C_Sign: Some(C_Sign),
            C_SignUpdate: Some(C_SignUpdate),
            C_SignFinal: Some(C_SignFinal),
            C_SignRecoverInit: Some(C_SignRecoverInit),
            C_SignRecover: Some(C_SignRecover),
            C_VerifyInit: Some(C_VerifyInit),
            C_Verify: Some(C_Verify),
            C_VerifyUpdate: Some(C_VerifyUpdate),
            C_VerifyFinal: Some(C_VerifyFinal),
            C_VerifyRecoverInit: Some(C_VerifyRecoverInit),
            C_VerifyRecover: Some(C_VerifyRecover),
            C_DigestEncryptUpdate: Some(C_DigestEncryptUpdate),
            C_DecryptDigestUpdate: Some(C_DecryptDigestUpdate),
            C_SignEncryptUpdate: Some(C_SignEncryptUpdate),
            C_DecryptVerifyUpdate: Some(C_DecryptVerifyUpdate),
            C_GenerateKey: Some(C_GenerateKey),
            C_GenerateKeyPair: Some(C_GenerateKeyPair),
            C_WrapKey: Some(C_WrapKey),
            C_UnwrapKey: Some(C_UnwrapKey),
            C_DeriveKey: Some(C_DeriveKey),
            C_SeedRandom: Some(C_SeedRandom),
            C_GenerateRandom: Some(C_GenerateRandom),
            C_GetFunctionStatus: Some(C_GetFunctionStatus),
            C_CancelFunction: Some(C_CancelFunction),
            C_WaitForSlotEvent: Some(C_WaitForSlotEvent),
            $($extra: Some($f),)*
        }
    };
}

static FUNCTION_LIST: CK_FUNCTION_LIST = function_list!(CK_FUNCTION_LIST, 2, 40, {});

static FUNCTION_LIST_3_0: CK_FUNCTION_LIST_3_0 = function_list!(CK_FUNCTION_LIST_3_0, 3, 0, {
    C_GetInterfaceList: get_interface_list,
    C_GetInterface: get_interface,
    C_LoginUser: C_LoginUser,
    C_SessionCancel: C_SessionCancel,
    C_MessageEncryptInit: C_MessageEncryptInit,
    C_EncryptMessage: C_EncryptMessage,
    C_EncryptMessageBegin: C_EncryptMessageBegin,
    C_EncryptMessageNext: C_EncryptMessageNext,
    C_MessageEncryptFinal: C_MessageEncryptFinal,
    C_MessageDecryptInit: C_MessageDecryptInit,
    C_DecryptMessage: C_DecryptMessage,
    C_DecryptMessageBegin: C_DecryptMessageBegin,
    C_DecryptMessageNext: C_DecryptMessageNext,
    C_MessageDecryptFinal: C_MessageDecryptFinal,
    C_MessageSignInit: C_MessageSignInit,
    C_SignMessage: C_SignMessage,
    C_SignMessageBegin: C_SignMessageBegin,
    C_SignMessageNext: C_SignMessageNext,
    C_MessageSignFinal: C_MessageSignFinal,
    C_MessageVerifyInit: C_MessageVerifyInit,
    C_VerifyMessage: C_VerifyMessage,
    C_VerifyMessageBegin: C_VerifyMessageBegin,
    C_VerifyMessageNext: C_VerifyMessageNext,
    C_MessageVerifyFinal: C_MessageVerifyFinal,
});

static INTERFACE_NAME: &[u8] = b"PKCS 11\0";

/// The interface table holds raw pointers, which are not `Sync`.
struct Interfaces([CK_INTERFACE; 2]);

// SAFETY: the table and everything it points to are immutable statics.
unsafe impl Sync for Interfaces {}

static INTERFACES: Interfaces = Interfaces([
    CK_INTERFACE {
        pInterfaceName: INTERFACE_NAME.as_ptr() as *mut CK_CHAR,
        pFunctionList: &FUNCTION_LIST_3_0 as *const CK_FUNCTION_LIST_3_0 as *mut c_void,
        flags: 0,
    },
    CK_INTERFACE {
        pInterfaceName: INTERFACE_NAME.as_ptr() as *mut CK_CHAR,
        pFunctionList: &FUNCTION_LIST as *const CK_FUNCTION_LIST as *mut c_void,
        flags: 0,
    },
]);

const INTERFACE_VERSIONS: [CK_VERSION; 2] = [
    CK_VERSION { major: 3, minor: 0 },
    CK_VERSION {
        major: 2,
        minor: 40,
    },
];
