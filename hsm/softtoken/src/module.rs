//! The module's process-wide state and the safe implementation of every
//! PKCS#11 function; `abi` only converts C arguments and results.
//!
//! Locking: the module is an `Arc` taken under a short read lock per call.
//! Each slot's [`Token`] has its own `RwLock`; each session its own `Mutex`.
//! Locks are taken in the order sessions map → token → session, and no lock
//! but the calling session's own is held during a private-key operation, so
//! sessions sign in parallel.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::faults::{self, Fired};
use crate::mechanism::{self, SignMechanism, SignOperation, VerifyOperation};
use crate::object::{Material, Template};
use crate::token::{Login, Token};
use pkcs11_sys::*;
use sm3::{Digest, Sm3};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Output of a function that follows PKCS#11's two-call convention.
#[derive(Debug, PartialEq, Eq)]
pub enum Output {
    /// Length query: this many bytes would do.
    Length(usize),
    /// The caller's buffer is too small; this many bytes are needed.
    TooSmall(usize),
    /// The result.
    Data(Vec<u8>),
}

/// What one session is doing.
#[derive(Debug, Default)]
struct SessionState {
    find: Option<Vec<CK_OBJECT_HANDLE>>,
    sign: Option<SignOperation>,
    verify: Option<VerifyOperation>,
    digest: Option<Sm3>,
}

#[derive(Debug)]
struct Session {
    slot: usize,
    rw: bool,
    state: Mutex<SessionState>,
}

#[derive(Debug)]
struct Module {
    config: Arc<Config>,
    tokens: Vec<RwLock<Token>>,
    sessions: RwLock<HashMap<CK_SESSION_HANDLE, Arc<Session>>>,
}

static MODULE: RwLock<Option<Arc<Module>>> = RwLock::new(None);
static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

fn module() -> Result<Arc<Module>> {
    MODULE
        .read()
        .map_err(|_| Error::GeneralError)?
        .clone()
        .ok_or(Error::CryptokiNotInitialized)
}

fn read<T>(l: &RwLock<T>) -> Result<std::sync::RwLockReadGuard<'_, T>> {
    l.read().map_err(|_| Error::GeneralError)
}

fn write<T>(l: &RwLock<T>) -> Result<std::sync::RwLockWriteGuard<'_, T>> {
    l.write().map_err(|_| Error::GeneralError)
}

fn lock<T>(l: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    l.lock().map_err(|_| Error::GeneralError)
}

thread_local! {
    /// Set when a removal rule fired on this thread's current call, so that
    /// slot queries made by that very call report the token absent.
    static PULLED_NOW: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The functions whose failure ends the session's active operation
/// (PKCS#11: every error but CKR_BUFFER_TOO_SMALL does).
fn operation_ended_by(function: &str) -> Option<fn(&mut SessionState)> {
    match function {
        "C_Sign" | "C_SignUpdate" | "C_SignFinal" => Some(|st| st.sign = None),
        "C_Verify" | "C_VerifyUpdate" | "C_VerifyFinal" => Some(|st| st.verify = None),
        "C_Digest" | "C_DigestUpdate" | "C_DigestFinal" => Some(|st| st.digest = None),
        _ => None,
    }
}

/// Applies fault injection to one call. A removal rule pulls the token; an
/// injected failure of a crypto call ends that session's operation, as a
/// real token's failure would. Slot queries are not failed by a removal:
/// they report the token absent instead.
pub fn gate(function: &str, session: Option<CK_SESSION_HANDLE>) -> Result<()> {
    PULLED_NOW.with(|p| p.set(false));
    match faults::check(function) {
        None => Ok(()),
        Some(Fired::Fail(rv)) => {
            if let (Some(h), Some(end)) = (session, operation_ended_by(function))
                && let Ok(s) = module().and_then(|m| m.session(h))
                && let Ok(mut st) = s.state.lock()
            {
                end(&mut st);
            }
            Err(Error::Injected(rv))
        }
        Some(Fired::TokenRemoved) => {
            if let Ok(m) = module() {
                m.pull_tokens();
            }
            match function {
                "C_GetInfo" | "C_GetSlotList" | "C_GetSlotInfo" => {
                    PULLED_NOW.with(|p| p.set(true));
                    Ok(())
                }
                _ => Err(Error::TokenNotPresent),
            }
        }
    }
}

fn token_absent() -> bool {
    faults::token_removed() || PULLED_NOW.with(|p| p.get())
}

impl Module {
    fn token(&self, slot: CK_SLOT_ID) -> Result<&RwLock<Token>> {
        usize::try_from(slot)
            .ok()
            .and_then(|s| self.tokens.get(s))
            .ok_or(Error::SlotIdInvalid)
    }

    fn session(&self, h: CK_SESSION_HANDLE) -> Result<Arc<Session>> {
        read(&self.sessions)?
            .get(&h)
            .cloned()
            .ok_or(Error::SessionHandleInvalid)
    }

    /// What a pulled token does: every session gone, nobody logged in.
    fn pull_tokens(&self) {
        if let Ok(mut sessions) = self.sessions.write() {
            sessions.clear();
        }
        for t in &self.tokens {
            if let Ok(mut t) = t.write() {
                t.drop_login();
                t.close_all_session_objects();
            }
        }
    }

    fn sessions_of(&self, slot: usize) -> Result<Vec<(CK_SESSION_HANDLE, Arc<Session>)>> {
        Ok(read(&self.sessions)?
            .iter()
            .filter(|(_, s)| s.slot == slot)
            .map(|(h, s)| (*h, s.clone()))
            .collect())
    }
}

// --- general ---------------------------------------------------------------

pub fn initialize() -> Result<()> {
    let mut guard = write(&MODULE)?;
    if guard.is_some() {
        return Err(Error::CryptokiAlreadyInitialized);
    }
    let config = Config::discover().map_err(|e| {
        eprintln!("svs-softtoken: configuration error: {e}");
        Error::GeneralError
    })?;
    faults::initialise(&config.faults).map_err(|e| {
        eprintln!("svs-softtoken: fault rules: {e}");
        Error::GeneralError
    })?;
    let config = Arc::new(config);
    let mut tokens = Vec::with_capacity(config.slots);
    for slot in 0..config.slots {
        let token = Token::load(config.clone(), slot).inspect_err(|e| {
            eprintln!(
                "svs-softtoken: cannot load slot {slot} from {}: {e:?}",
                config.store_dir.display()
            );
        })?;
        tokens.push(RwLock::new(token));
    }
    *guard = Some(Arc::new(Module {
        config,
        tokens,
        sessions: RwLock::new(HashMap::new()),
    }));
    Ok(())
}

/// Drops all state; decrypted keys are zeroized as their last `Arc` goes.
pub fn finalize() -> Result<()> {
    let mut guard = write(&MODULE)?;
    guard.take().ok_or(Error::CryptokiNotInitialized)?;
    faults::clear();
    Ok(())
}

pub fn ensure_initialized() -> Result<()> {
    module().map(|_| ())
}

pub fn slot_list(token_present: bool) -> Result<Vec<CK_SLOT_ID>> {
    let m = module()?;
    if token_present && token_absent() {
        return Ok(Vec::new());
    }
    Ok((0..m.tokens.len() as CK_SLOT_ID).collect())
}

/// Slot count and whether its token is present.
pub fn slot_present(slot: CK_SLOT_ID) -> Result<bool> {
    let m = module()?;
    m.token(slot)?;
    Ok(!token_absent())
}

/// Everything `C_GetTokenInfo` reports.
#[derive(Debug)]
pub struct TokenInfo {
    pub label: [u8; 32],
    pub serial: [u8; 16],
    pub flags: CK_FLAGS,
    pub sessions: usize,
    pub rw_sessions: usize,
    pub pin_min: usize,
    pub pin_max: usize,
}

pub fn token_info(slot: CK_SLOT_ID) -> Result<TokenInfo> {
    let m = module()?;
    if token_absent() {
        return Err(Error::TokenNotPresent);
    }
    let summary = {
        let mut t = write(m.token(slot)?)?;
        t.refresh()?;
        t.summary()
    };
    let sessions = m.sessions_of(slot as usize)?;
    Ok(TokenInfo {
        label: summary.label,
        serial: summary.serial,
        flags: summary.flags,
        sessions: sessions.len(),
        rw_sessions: sessions.iter().filter(|(_, s)| s.rw).count(),
        pin_min: m.config.pin_min_len,
        pin_max: m.config.pin_max_len,
    })
}

pub fn mechanism_list(slot: CK_SLOT_ID) -> Result<Vec<CK_MECHANISM_TYPE>> {
    module()?.token(slot)?;
    Ok(mechanism::MECHANISMS.to_vec())
}

pub fn mechanism_info(slot: CK_SLOT_ID, mech: CK_MECHANISM_TYPE) -> Result<CK_MECHANISM_INFO> {
    module()?.token(slot)?;
    mechanism::info(mech)
}

// --- tokens and PINs -------------------------------------------------------

pub fn init_token(slot: CK_SLOT_ID, so_pin: &[u8], label: [u8; 32]) -> Result<()> {
    let m = module()?;
    let token = m.token(slot)?;
    if !m.sessions_of(slot as usize)?.is_empty() {
        return Err(Error::SessionExists);
    }
    write(token)?.init(so_pin, label)
}

pub fn init_pin(h: CK_SESSION_HANDLE, pin: &[u8]) -> Result<()> {
    let m = module()?;
    let s = m.session(h)?;
    if !s.rw {
        return Err(Error::SessionReadOnly);
    }
    write(&m.tokens[s.slot])?.init_pin(pin)
}

pub fn set_pin(h: CK_SESSION_HANDLE, old: &[u8], new: &[u8]) -> Result<()> {
    let m = module()?;
    let s = m.session(h)?;
    if !s.rw {
        return Err(Error::SessionReadOnly);
    }
    write(&m.tokens[s.slot])?.set_pin(old, new)
}

// --- sessions ----------------------------------------------------------------

pub fn open_session(slot: CK_SLOT_ID, flags: CK_FLAGS) -> Result<CK_SESSION_HANDLE> {
    let m = module()?;
    let token = m.token(slot)?;
    if flags & CKF_SERIAL_SESSION == 0 {
        return Err(Error::SessionParallelNotSupported);
    }
    if token_absent() {
        return Err(Error::TokenNotPresent);
    }
    let rw = flags & CKF_RW_SESSION != 0;
    {
        let mut t = write(token)?;
        t.refresh()?;
        if !t.is_initialized() {
            return Err(Error::TokenNotRecognized);
        }
        if !rw && t.login_state() == Some(Login::So) {
            return Err(Error::SessionReadWriteSoExists);
        }
    }
    let h = NEXT_SESSION.fetch_add(1, Ordering::Relaxed) as CK_SESSION_HANDLE;
    write(&m.sessions)?.insert(
        h,
        Arc::new(Session {
            slot: slot as usize,
            rw,
            state: Mutex::new(SessionState::default()),
        }),
    );
    Ok(h)
}

fn close(m: &Module, h: CK_SESSION_HANDLE) -> Result<()> {
    let s = write(&m.sessions)?
        .remove(&h)
        .ok_or(Error::SessionHandleInvalid)?;
    let last = m.sessions_of(s.slot)?.is_empty();
    let mut t = write(&m.tokens[s.slot])?;
    t.close_session(h);
    if last {
        // PKCS#11: closing the last session logs the application out.
        t.drop_login();
    }
    Ok(())
}

pub fn close_session(h: CK_SESSION_HANDLE) -> Result<()> {
    close(&*module()?, h)
}

pub fn close_all_sessions(slot: CK_SLOT_ID) -> Result<()> {
    let m = module()?;
    m.token(slot)?;
    for (h, _) in m.sessions_of(slot as usize)? {
        // A session closed meanwhile by another thread is fine.
        let _ = close(&m, h);
    }
    Ok(())
}

/// (slot, state, flags) for `C_GetSessionInfo`.
pub fn session_info(h: CK_SESSION_HANDLE) -> Result<(CK_SLOT_ID, CK_STATE, CK_FLAGS)> {
    let m = module()?;
    let s = m.session(h)?;
    let login = read(&m.tokens[s.slot])?.login_state();
    let state = match (login, s.rw) {
        (Some(Login::So), _) => CKS_RW_SO_FUNCTIONS,
        (Some(Login::User), true) => CKS_RW_USER_FUNCTIONS,
        (Some(Login::User), false) => CKS_RO_USER_FUNCTIONS,
        (None, true) => CKS_RW_PUBLIC_SESSION,
        (None, false) => CKS_RO_PUBLIC_SESSION,
    };
    let flags = CKF_SERIAL_SESSION | if s.rw { CKF_RW_SESSION } else { 0 };
    Ok((s.slot as CK_SLOT_ID, state, flags))
}

pub fn login(h: CK_SESSION_HANDLE, user: CK_USER_TYPE, pin: &[u8]) -> Result<()> {
    let m = module()?;
    let s = m.session(h)?;
    let who = match user {
        CKU_SO => Login::So,
        CKU_USER => Login::User,
        // No key here demands CKA_ALWAYS_AUTHENTICATE.
        CKU_CONTEXT_SPECIFIC => return Err(Error::OperationNotInitialized),
        _ => return Err(Error::UserTypeInvalid),
    };
    if who == Login::So && m.sessions_of(s.slot)?.iter().any(|(_, s)| !s.rw) {
        return Err(Error::SessionReadOnlyExists);
    }
    let token = &m.tokens[s.slot];
    let record = write(token)?.login_begin(who)?;
    // The slow PIN key derivation runs without the slot lock.
    let unwrapped = record.unwrap_key(pin, crate::token::role(who));
    write(token)?.login_finish(who, &record, pin, unwrapped)
}

pub fn logout(h: CK_SESSION_HANDLE) -> Result<()> {
    let m = module()?;
    let s = m.session(h)?;
    let sessions = m.sessions_of(s.slot)?;
    let mut t = write(&m.tokens[s.slot])?;
    t.logout()?;
    // Under the slot lock, so no C_SignInit can slip an operation in
    // between the logout and this reset.
    for (_, s) in sessions {
        let mut st = lock(&s.state)?;
        st.sign = None;
        st.verify = None;
    }
    Ok(())
}

// --- objects -------------------------------------------------------------------

pub fn create_object(h: CK_SESSION_HANDLE, template: &Template) -> Result<CK_OBJECT_HANDLE> {
    let m = module()?;
    let s = m.session(h)?;
    write(&m.tokens[s.slot])?.create(template, s.rw, h)
}

pub fn destroy_object(h: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE) -> Result<()> {
    let m = module()?;
    let s = m.session(h)?;
    write(&m.tokens[s.slot])?.destroy(object, s.rw)
}

pub fn object_size(h: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE) -> Result<usize> {
    let m = module()?;
    let s = m.session(h)?;
    Ok(read(&m.tokens[s.slot])?.object(object)?.size())
}

/// Values (or the per-attribute error) of each requested attribute.
pub fn attribute_values(
    h: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    types: &[CK_ATTRIBUTE_TYPE],
) -> Result<Vec<Result<zeroize::Zeroizing<Vec<u8>>>>> {
    let m = module()?;
    let s = m.session(h)?;
    let t = read(&m.tokens[s.slot])?;
    let o = t.object(object)?;
    Ok(types.iter().map(|ty| o.get(*ty)).collect())
}

pub fn set_attribute_values(
    h: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    template: &Template,
) -> Result<()> {
    let m = module()?;
    let s = m.session(h)?;
    write(&m.tokens[s.slot])?.set_attributes(object, template, s.rw)
}

pub fn find_init(h: CK_SESSION_HANDLE, template: &Template) -> Result<()> {
    let m = module()?;
    let s = m.session(h)?;
    let found = {
        let mut t = write(&m.tokens[s.slot])?;
        t.refresh()?;
        t.find(template)
    };
    let mut st = lock(&s.state)?;
    if st.find.is_some() {
        return Err(Error::OperationActive);
    }
    st.find = Some(found);
    Ok(())
}

pub fn find(h: CK_SESSION_HANDLE, max: usize) -> Result<Vec<CK_OBJECT_HANDLE>> {
    let m = module()?;
    let s = m.session(h)?;
    let mut st = lock(&s.state)?;
    let pending = st.find.as_mut().ok_or(Error::OperationNotInitialized)?;
    let n = max.min(pending.len());
    Ok(pending.drain(..n).collect())
}

pub fn find_final(h: CK_SESSION_HANDLE) -> Result<()> {
    let m = module()?;
    let s = m.session(h)?;
    let mut st = lock(&s.state)?;
    st.find.take().ok_or(Error::OperationNotInitialized)?;
    Ok(())
}

pub fn generate_key_pair(
    h: CK_SESSION_HANDLE,
    mech: CK_MECHANISM_TYPE,
    param: &[u8],
    public_template: &Template,
    private_template: &Template,
) -> Result<(CK_OBJECT_HANDLE, CK_OBJECT_HANDLE)> {
    let m = module()?;
    let s = m.session(h)?;
    if mech != crate::vendor::CKM_SM2_KEY_PAIR_GEN {
        return Err(Error::MechanismInvalid);
    }
    if !param.is_empty() {
        return Err(Error::MechanismParamInvalid);
    }
    write(&m.tokens[s.slot])?.generate_pair(public_template, private_template, s.rw, h)
}

// --- signing and verification ------------------------------------------------

pub fn sign_init(
    h: CK_SESSION_HANDLE,
    mech: CK_MECHANISM_TYPE,
    param: &[u8],
    key: CK_OBJECT_HANDLE,
) -> Result<()> {
    let m = module()?;
    let s = m.session(h)?;
    let mechanism = SignMechanism::new(mech, param)?;
    // The slot lock is held until the operation is installed, so a logout
    // cannot come in between (lock order: token → session).
    let mut t = read(&m.tokens[s.slot])?;
    // A key deleted by another process (svs-provision) stops signing here,
    // as on an HSM, not at this process's next search.
    if t.changed_elsewhere() {
        drop(t);
        write(&m.tokens[s.slot])?.refresh()?;
        t = read(&m.tokens[s.slot])?;
    }
    let secret = {
        let o = t.object(key).map_err(|_| Error::KeyHandleInvalid)?;
        if o.class() != CKO_PRIVATE_KEY || o.ulong(CKA_KEY_TYPE) != Some(crate::vendor::CKK_SM2) {
            return Err(Error::KeyTypeInconsistent);
        }
        if !o.bool(CKA_SIGN) {
            return Err(Error::KeyFunctionNotPermitted);
        }
        match &o.material {
            Material::Private {
                secret: Some(secret),
                ..
            } => secret.clone(),
            _ => return Err(Error::UserNotLoggedIn),
        }
    };
    let mut st = lock(&s.state)?;
    if st.sign.is_some() {
        return Err(Error::OperationActive);
    }
    st.sign = Some(SignOperation::new(mechanism, secret)?);
    drop(t);
    Ok(())
}

fn finish_sign(
    st: &mut SessionState,
    capacity: Option<usize>,
    data: Option<&[u8]>,
) -> Result<Output> {
    let op = st.sign.as_mut().ok_or(Error::OperationNotInitialized)?;
    let Some(capacity) = capacity else {
        return Ok(Output::Length(op.max_len()));
    };
    let result = op.signature(data);
    match result {
        Ok(sig) if sig.len() > capacity => Ok(Output::TooSmall(sig.len())),
        Ok(sig) => {
            st.sign = None;
            Ok(Output::Data(sig))
        }
        Err(e) => {
            st.sign = None;
            Err(e)
        }
    }
}

/// `C_Sign`; `capacity` is `None` for a length query.
pub fn sign(h: CK_SESSION_HANDLE, data: &[u8], capacity: Option<usize>) -> Result<Output> {
    let s = module()?.session(h)?;
    let mut st = lock(&s.state)?;
    finish_sign(&mut st, capacity, Some(data))
}

pub fn sign_update(h: CK_SESSION_HANDLE, data: &[u8]) -> Result<()> {
    let s = module()?.session(h)?;
    let mut st = lock(&s.state)?;
    let op = st.sign.as_mut().ok_or(Error::OperationNotInitialized)?;
    let r = op.update(data);
    if r.is_err() {
        st.sign = None;
    }
    r
}

pub fn sign_final(h: CK_SESSION_HANDLE, capacity: Option<usize>) -> Result<Output> {
    let s = module()?.session(h)?;
    let mut st = lock(&s.state)?;
    finish_sign(&mut st, capacity, None)
}

pub fn verify_init(
    h: CK_SESSION_HANDLE,
    mech: CK_MECHANISM_TYPE,
    param: &[u8],
    key: CK_OBJECT_HANDLE,
) -> Result<()> {
    let m = module()?;
    let s = m.session(h)?;
    let public = {
        let t = read(&m.tokens[s.slot])?;
        let o = t.object(key).map_err(|_| Error::KeyHandleInvalid)?;
        if o.class() != CKO_PUBLIC_KEY || o.ulong(CKA_KEY_TYPE) != Some(crate::vendor::CKK_SM2) {
            return Err(Error::KeyTypeInconsistent);
        }
        if !o.bool(CKA_VERIFY) {
            return Err(Error::KeyFunctionNotPermitted);
        }
        match &o.material {
            Material::Public(p) => p.clone(),
            _ => return Err(Error::KeyTypeInconsistent),
        }
    };
    let mechanism = SignMechanism::new(mech, param)?;
    let mut st = lock(&s.state)?;
    if st.verify.is_some() {
        return Err(Error::OperationActive);
    }
    st.verify = Some(VerifyOperation::new(mechanism, public)?);
    Ok(())
}

pub fn verify(h: CK_SESSION_HANDLE, data: &[u8], signature: &[u8]) -> Result<()> {
    let s = module()?.session(h)?;
    let op = lock(&s.state)?
        .verify
        .take()
        .ok_or(Error::OperationNotInitialized)?;
    op.verify(Some(data), signature)
}

pub fn verify_update(h: CK_SESSION_HANDLE, data: &[u8]) -> Result<()> {
    let s = module()?.session(h)?;
    let mut st = lock(&s.state)?;
    let op = st.verify.as_mut().ok_or(Error::OperationNotInitialized)?;
    let r = op.update(data);
    if r.is_err() {
        st.verify = None;
    }
    r
}

pub fn verify_final(h: CK_SESSION_HANDLE, signature: &[u8]) -> Result<()> {
    let s = module()?.session(h)?;
    let op = lock(&s.state)?
        .verify
        .take()
        .ok_or(Error::OperationNotInitialized)?;
    op.verify(None, signature)
}

// --- digests and random --------------------------------------------------------

pub fn digest_init(h: CK_SESSION_HANDLE, mech: CK_MECHANISM_TYPE, param: &[u8]) -> Result<()> {
    let s = module()?.session(h)?;
    let hasher = mechanism::digest_init(mech, param)?;
    let mut st = lock(&s.state)?;
    if st.digest.is_some() {
        return Err(Error::OperationActive);
    }
    st.digest = Some(hasher);
    Ok(())
}

fn finish_digest(st: &mut SessionState, capacity: Option<usize>, data: &[u8]) -> Result<Output> {
    let hasher = st.digest.as_ref().ok_or(Error::OperationNotInitialized)?;
    match capacity {
        None => Ok(Output::Length(32)),
        Some(c) if c < 32 => Ok(Output::TooSmall(32)),
        Some(_) => {
            let mut h = hasher.clone();
            h.update(data);
            st.digest = None;
            Ok(Output::Data(h.finalize().to_vec()))
        }
    }
}

pub fn digest(h: CK_SESSION_HANDLE, data: &[u8], capacity: Option<usize>) -> Result<Output> {
    let s = module()?.session(h)?;
    let mut st = lock(&s.state)?;
    finish_digest(&mut st, capacity, data)
}

pub fn digest_update(h: CK_SESSION_HANDLE, data: &[u8]) -> Result<()> {
    let s = module()?.session(h)?;
    let mut st = lock(&s.state)?;
    st.digest
        .as_mut()
        .ok_or(Error::OperationNotInitialized)?
        .update(data);
    Ok(())
}

pub fn digest_final(h: CK_SESSION_HANDLE, capacity: Option<usize>) -> Result<Output> {
    let s = module()?.session(h)?;
    let mut st = lock(&s.state)?;
    finish_digest(&mut st, capacity, &[])
}

pub fn generate_random(h: CK_SESSION_HANDLE, out: &mut [u8]) -> Result<()> {
    module()?.session(h)?;
    getrandom::fill(out).map_err(|_| Error::DeviceError)
}

/// Checks the session handle for functions this token does not offer, so
/// that a bad handle is still reported as such.
pub fn unsupported_in_session(h: CK_SESSION_HANDLE) -> Result<()> {
    module()?.session(h)?;
    Err(Error::FunctionNotSupported)
}
