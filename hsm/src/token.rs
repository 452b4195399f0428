//! Opening a PKCS#11 module, choosing the token, logging in, and checking
//! that the token speaks the chosen vendor profile.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::object::ObjectHandle;
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::{Limit, Slot};
use cryptoki::types::AuthPin;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::{HsmError, Result, RvInfo, rv_info};
use crate::keys;
use crate::pool::SessionFactory;
use crate::profile::{ModuleIdentity, ProfileTable, VendorProfile};
use crate::uri::Pkcs11Uri;

/// Which PKCS#11 module to load.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModuleSource {
    /// The soft token linked into the running executable
    /// (`Pkcs11::new_from_self`). The executable must export
    /// `C_GetFunctionList` and `C_GetInterface*` dynamically: link it with
    /// `-Wl,--export-dynamic-symbol=C_GetFunctionList` (and the same for
    /// `C_GetInterfaceList` and `C_GetInterface`), and make sure the
    /// svs-softtoken rlib is referenced so the linker keeps it.
    #[default]
    Embedded,
    /// A PKCS#11 shared library by path.
    Path(PathBuf),
}

impl ModuleSource {
    fn describe(&self) -> String {
        match self {
            ModuleSource::Embedded => "embedded".into(),
            ModuleSource::Path(p) => p.display().to_string(),
        }
    }
}

/// Loads (once per process) and initialises a module.
///
/// A module is initialised once and never finalised: every user in the
/// process shares it, and C_Finalize from one would close the sessions of all.
pub fn load_module(source: &ModuleSource) -> Result<Pkcs11> {
    static MODULES: OnceLock<Mutex<HashMap<ModuleSource, Pkcs11>>> = OnceLock::new();
    let mut modules = MODULES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(m) = modules.get(source) {
        return Ok(m.clone());
    }
    let load_err = |e: CryptokiError| HsmError::ModuleLoad {
        module: source.describe(),
        reason: e.to_string(),
    };
    let pkcs11 = match source {
        ModuleSource::Embedded => Pkcs11::new_from_self(),
        ModuleSource::Path(p) => Pkcs11::new(p),
    }
    .map_err(load_err)?;
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CryptokiError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(HsmError::from(e)),
    }
    modules.insert(source.clone(), pkcs11.clone());
    Ok(pkcs11)
}

/// Which token to use: every given criterion must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenSelector {
    /// CK_TOKEN_INFO.label.
    pub label: Option<String>,
    /// CK_TOKEN_INFO.serialNumber.
    pub serial: Option<String>,
    /// A PKCS#11 URI (its token, manufacturer, model, serial, slot-id and
    /// library attributes are all checked).
    pub uri: Option<Pkcs11Uri>,
}

impl TokenSelector {
    /// Whether the token in `slot` meets every criterion given (trailing
    /// padding of the fixed-width CK_TOKEN_INFO fields ignored).
    pub fn matches(
        &self,
        slot: Slot,
        info: &cryptoki::slot::TokenInfo,
        lib: &cryptoki::context::Info,
    ) -> bool {
        let eq = |want: &Option<String>, have: &str| {
            want.as_deref()
                .is_none_or(|w| w.trim_end() == have.trim_end())
        };
        let uri_ok = self.uri.as_ref().is_none_or(|u| {
            eq(&u.token, info.label())
                && eq(&u.serial, info.serial_number())
                && eq(&u.manufacturer, info.manufacturer_id())
                && eq(&u.model, info.model())
                && eq(&u.library_manufacturer, lib.manufacturer_id())
                && eq(&u.library_description, lib.library_description())
                && u.slot_id.is_none_or(|id| id == slot.id())
        });
        eq(&self.label, info.label()) && eq(&self.serial, info.serial_number()) && uri_ok
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(l) = &self.label {
            parts.push(format!("label={l:?}"));
        }
        if let Some(s) = &self.serial {
            parts.push(format!("serial={s:?}"));
        }
        if let Some(u) = &self.uri {
            parts.push(u.describe());
        }
        if parts.is_empty() {
            "(the only initialised token)".into()
        } else {
            parts.join(" ")
        }
    }

    fn is_empty(&self) -> bool {
        self.label.is_none()
            && self.serial.is_none()
            && self.uri.as_ref().is_none_or(|u| !u.selects_token())
    }
}

/// The user PIN's state from the token's flags. Sessions logged in before
/// stay logged in when the PIN locks, so a running daemon keeps signing;
/// but no new login (a restart, a session recovered after an HSM error)
/// succeeds until a security officer unlocks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UserPinState {
    /// A wrong PIN was entered since the last good login (CKF_USER_PIN_COUNT_LOW).
    pub count_low: bool,
    /// One more wrong PIN locks it (CKF_USER_PIN_FINAL_TRY).
    pub final_try: bool,
    /// Locked (CKF_USER_PIN_LOCKED).
    pub locked: bool,
}

/// An opened module with a chosen token, the user PIN and the profile in use.
/// It is the pool's [`SessionFactory`]: every worker's session comes from here.
pub struct Token {
    pkcs11: Pkcs11,
    module: String,
    selector: TokenSelector,
    slot: Mutex<Slot>,
    pin: Zeroizing<String>,
    profile: VendorProfile,
    identity: ModuleIdentity,
    max_sessions: Option<u64>,
    /// Set once the token refused the PIN. Every further `C_Login` with the
    /// same PIN would count another failure and soon lock the PIN for every
    /// application, so none is attempted until the process restarts.
    pin_refused: Mutex<Option<RvInfo>>,
}

impl std::fmt::Debug for Token {
    // Hand-written so that the PIN can never reach a log through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("module", &self.module)
            .field("selector", &self.selector)
            .field("profile", &self.profile.name)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl Token {
    /// Loads the module, finds the token, picks the profile (by name, or
    /// `"auto"` to recognise it), checks the profile's mechanisms and logs in.
    pub fn open(
        source: &ModuleSource,
        selector: TokenSelector,
        pin: Zeroizing<String>,
        profiles: &ProfileTable,
        profile_name: &str,
    ) -> Result<Token> {
        let pkcs11 = load_module(source)?;
        let slot = find_slot(&pkcs11, &selector)?;
        let lib = pkcs11.get_library_info()?;
        let info = pkcs11.get_token_info(slot)?;
        let identity = ModuleIdentity {
            library_manufacturer: lib.manufacturer_id().trim_end().to_owned(),
            library_description: lib.library_description().trim_end().to_owned(),
            token_manufacturer: info.manufacturer_id().trim_end().to_owned(),
            token_model: info.model().trim_end().to_owned(),
        };
        let profile = if profile_name == "auto" {
            profiles.recognise(&identity).cloned().ok_or_else(|| {
                HsmError::Config(format!(
                    "cannot recognise the vendor of {identity:?}: set `profile` to one of {:?}",
                    profiles
                        .profiles()
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                ))
            })?
        } else {
            profiles
                .get(profile_name)
                .cloned()
                .ok_or_else(|| HsmError::Config(format!("unknown profile {profile_name:?}")))?
        };
        probe_mechanisms(&pkcs11, slot, &profile)?;
        let max_sessions = match info.max_session_count() {
            Limit::Max(n) => Some(n),
            Limit::Unavailable | Limit::Infinite => None,
        };
        let token = Token {
            pkcs11,
            module: source.describe(),
            selector,
            slot: Mutex::new(slot),
            pin,
            profile,
            identity,
            max_sessions,
            pin_refused: Mutex::new(None),
        };
        // Logging in once here turns a wrong PIN into a start-up error
        // instead of a pool that keeps failing.
        drop(token.open_session()?);
        tracing::info!(module = %token.module, profile = %token.profile.name, slot = slot.id(), "token opened");
        Ok(token)
    }

    /// The vendor profile in use.
    pub fn profile(&self) -> &VendorProfile {
        &self.profile
    }

    /// What the module and token say about themselves.
    pub fn identity(&self) -> &ModuleIdentity {
        &self.identity
    }

    /// The token's CK_TOKEN_INFO.ulMaxSessionCount, when it states one.
    pub fn max_sessions(&self) -> Option<u64> {
        self.max_sessions
    }

    /// The loaded module (shared with every other user in the process).
    pub fn pkcs11(&self) -> &Pkcs11 {
        &self.pkcs11
    }

    /// The slot currently holding the token.
    pub fn slot(&self) -> Slot {
        *self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The user PIN's state as the token reports it (CK_TOKEN_INFO
    /// flags). Blocking: one C_GetTokenInfo, no session needed.
    pub fn user_pin_state(&self) -> Result<UserPinState> {
        let info = self.pkcs11.get_token_info(self.slot())?;
        Ok(UserPinState {
            count_low: info.user_pin_count_low(),
            final_try: info.user_pin_final_try(),
            locked: info.user_pin_locked(),
        })
    }

    fn open_session(&self) -> Result<Session> {
        let slot = self.slot();
        let session = self.pkcs11.open_rw_session(slot)?;
        self.login(&session)?;
        Ok(session)
    }

    fn login(&self, session: &Session) -> Result<()> {
        let mut refused = self.pin_refused.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rv) = *refused {
            return Err(HsmError::Pkcs11 {
                rv,
                function: "C_Login (not tried again: the token refused this PIN earlier; \
                           fix the PIN source and restart)"
                    .into(),
            });
        }
        let pin = AuthPin::from(self.pin.as_str());
        match session.login(UserType::User, Some(&pin)) {
            // Login is per application and token: another worker did it.
            Ok(()) | Err(CryptokiError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
            Err(CryptokiError::Pkcs11(rv, f)) if rv_info(&rv).is_pin_refusal() => {
                *refused = Some(rv_info(&rv));
                Err(CryptokiError::Pkcs11(rv, f).into())
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// A worker's session with the private-key handles it has looked up; handles
/// are per session here, so a new session re-finds them.
#[derive(Debug)]
pub struct TokenSession {
    /// The logged-in session.
    pub session: Session,
    /// CKA_ID → the public point it was found for, its private-key handle,
    /// and whether the token stated its public key (see
    /// [`keys::find_private_key`]). An entry serves only its point: a key
    /// re-created under the same ID and installed by a reload is looked up
    /// and checked afresh, never served the old key's handle (a number the
    /// HSM may have reused).
    handles: HashMap<Vec<u8>, (Vec<u8>, ObjectHandle, bool)>,
}

impl TokenSession {
    /// The private-key handle for a CKA_ID, found once per session, and
    /// whether the token confirmed it is the key of `point` (when not, its
    /// signatures must be verified in software).
    pub fn private_key(
        &mut self,
        profile: &VendorProfile,
        id: &[u8],
        point: &[u8],
    ) -> Result<(ObjectHandle, bool)> {
        if let Some((cached, h, confirmed)) = self.handles.get(id)
            && cached == point
        {
            return Ok((*h, *confirmed));
        }
        let h = match keys::find_private_key(&self.session, profile, id, point) {
            // Private objects vanish from searches when the login is lost:
            // that is a login problem, not a missing key. Logged in, a key
            // discovered earlier is gone from the token: the token changed,
            // which is not the caller's doing.
            Err(HsmError::UnknownKey(k)) => {
                require_user(&self.session)?;
                return Err(HsmError::KeyChanged(k));
            }
            other => other?,
        };
        self.handles.insert(id.to_vec(), (point.to_vec(), h.0, h.1));
        Ok(h)
    }

    /// Forgets cached handles (after keys were added or removed).
    pub fn forget_handles(&mut self) {
        self.handles.clear();
    }
}

impl SessionFactory for Token {
    type Session = TokenSession;

    fn open(&self) -> Result<TokenSession> {
        let mut opened = self.open_session();
        // Someone in the process finalised the module: initialise it again
        // rather than stay down until a restart.
        if let Err(HsmError::Pkcs11 { rv, .. }) = &opened
            && rv.code == 0x190
        {
            tracing::warn!(module = %self.module, "module was finalised under the pool: initialising again");
            match self
                .pkcs11
                .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            {
                Ok(()) | Err(CryptokiError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
                Err(e) => return Err(e.into()),
            }
            opened = self.open_session();
        }
        match opened {
            Ok(session) => Ok(TokenSession {
                session,
                handles: HashMap::new(),
            }),
            Err(e) => {
                // The token may have come back in another slot.
                if let Ok(slot) = find_slot(&self.pkcs11, &self.selector) {
                    *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = slot;
                }
                Err(e)
            }
        }
    }

    fn relogin(&self, s: &mut TokenSession) -> Result<()> {
        s.handles.clear();
        self.login(&s.session)
    }

    fn probe(&self, s: &mut TokenSession) -> Result<()> {
        require_user(&s.session)
    }
}

/// Fails with a `CKR_USER_NOT_LOGGED_IN`-classed error when the session is
/// not (or no longer) in a user state, e.g. after another application
/// logged out: searches would silently miss every private object.
pub(crate) fn require_user(session: &Session) -> Result<()> {
    match session.get_session_info()?.session_state() {
        SessionState::RoUser | SessionState::RwUser => Ok(()),
        _ => Err(HsmError::Pkcs11 {
            rv: crate::error::rv_info(&RvError::UserNotLoggedIn),
            function: "GetSessionInfo (session is not logged in)".into(),
        }),
    }
}

fn find_slot(pkcs11: &Pkcs11, selector: &TokenSelector) -> Result<Slot> {
    let lib = pkcs11.get_library_info()?;
    let slots = pkcs11.get_slots_with_token()?;
    if slots.is_empty() {
        // Not "no token matches": that sends an officer to provision an
        // HSM that is only unplugged or unreachable.
        return Err(HsmError::Unavailable(
            "no slot holds a token (HSM disconnected, or token removed)".into(),
        ));
    }
    let mut found = Vec::new();
    // A token whose description cannot be read may be the one wanted.
    let mut unreadable = None;
    for slot in slots {
        let info = match pkcs11.get_token_info(slot) {
            Ok(info) => info,
            Err(e) => {
                unreadable.get_or_insert(e);
                continue;
            }
        };
        if selector.is_empty() && !info.token_initialized() {
            continue;
        }
        if selector.matches(slot, &info, &lib) {
            found.push(slot);
        }
    }
    match found.as_slice() {
        [slot] => Ok(*slot),
        [] => Err(match unreadable {
            Some(e) => HsmError::from(e),
            None => HsmError::TokenNotFound(selector.describe()),
        }),
        _ => Err(HsmError::Config(format!(
            "{} tokens match {}: select one by label, serial or URI",
            found.len(),
            selector.describe()
        ))),
    }
}

fn probe_mechanisms(pkcs11: &Pkcs11, slot: Slot, profile: &VendorProfile) -> Result<()> {
    // get_mechanism_list in cryptoki 0.12.1 drops vendor-defined numbers, so
    // each mechanism is asked about directly.
    for (role, code, need_sign) in [
        ("sign_digest_mechanism", profile.sign_digest_mechanism, true),
        ("keygen_mechanism", profile.keygen_mechanism, false),
    ] {
        let missing = || HsmError::MissingMechanism {
            profile: profile.name.clone(),
            name: role,
            code,
        };
        let info = pkcs11
            .get_mechanism_info(slot, keys::mechanism_type(code)?)
            .map_err(|e| match e {
                CryptokiError::Pkcs11(RvError::MechanismInvalid, _) => missing(),
                other => other.into(),
            })?;
        if need_sign && !info.sign() {
            return Err(missing());
        }
    }
    Ok(())
}
