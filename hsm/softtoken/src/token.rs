//! One token: its persisted state, login state, and objects.
//!
//! Every change to persisted state runs through [`Token::commit`]: take the
//! store's inter-process lock, pick up another process's writes, apply the
//! change to a copy, write the copy atomically, and only then make it the
//! in-memory state. A failed write therefore changes nothing.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::object::{self, Material, Object, Template};
use crate::sm2key::Sm2PrivateKey;
use crate::store::{self, FileStamp, PinRecord, SlotStore, StoredObject, SymKey, TokenFile};
use pkcs11_sys::*;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

static NEXT_OBJECT_HANDLE: AtomicU64 = AtomicU64::new(1);

fn new_object_handle() -> CK_OBJECT_HANDLE {
    NEXT_OBJECT_HANDLE.fetch_add(1, Ordering::Relaxed) as CK_OBJECT_HANDLE
}

const SO_ROLE: &str = "svs-softtoken so pin";
const USER_ROLE: &str = "svs-softtoken user pin";

/// The associated data that binds a wrapped token key to its role.
pub fn role(who: Login) -> &'static str {
    match who {
        Login::So => SO_ROLE,
        Login::User => USER_ROLE,
    }
}

/// Who is logged in to a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Login {
    So,
    User,
}

/// A token object's entry: the live object and, for private keys, the
/// sealed value that goes back to disk unchanged.
#[derive(Clone, Debug)]
struct Entry {
    object: Object,
    sealed: Option<Vec<u8>>,
    /// `Some(session)` for a session object.
    owner: Option<CK_SESSION_HANDLE>,
}

/// The in-memory state of one slot's token.
pub struct Token {
    store: SlotStore,
    stamp: Option<FileStamp>,
    file: Option<TokenFile>,
    entries: HashMap<CK_OBJECT_HANDLE, Entry>,
    handle_of_uid: HashMap<u64, CK_OBJECT_HANDLE>,
    login: Option<Login>,
    token_key: Option<SymKey>,
    config: Arc<Config>,
    /// When signing last looked at the store (ms since `Token::load`).
    checked_ms: AtomicU64,
    loaded: Instant,
}

/// How long a key another process deleted (or replaced) may still sign:
/// signing checks the store's stamp at most this often, not at every call,
/// because a stat costs 1–2% of a signature.
pub const SIGNING_STALENESS: Duration = Duration::from_millis(100);

fn aad(uid: u64) -> Vec<u8> {
    format!("svs-softtoken object {uid}").into_bytes()
}

fn to_stored(e: &Entry) -> StoredObject {
    StoredObject {
        uid: e.object.uid,
        attrs: e
            .object
            .attrs
            .iter()
            .map(|(t, v)| (format!("{t:x}"), store::to_hex(v)))
            .collect(),
        sealed: e.sealed.clone(),
    }
}

pub(crate) fn from_stored(
    s: &StoredObject,
    token_key: Option<&SymKey>,
) -> Result<(Object, Option<Vec<u8>>)> {
    let mut attrs = BTreeMap::new();
    for (t, v) in &s.attrs {
        let t = CK_ATTRIBUTE_TYPE::from_str_radix(t, 16).map_err(|_| Error::DeviceError)?;
        attrs.insert(t, store::from_hex(v).ok_or(Error::DeviceError)?);
    }
    let mut object = Object {
        uid: s.uid,
        attrs,
        material: Material::None,
    };
    let point = || -> Result<Arc<crate::sm2key::Sm2PublicKey>> {
        let der = object.attrs.get(&CKA_EC_POINT).ok_or(Error::DeviceError)?;
        let raw = der.get(2..).ok_or(Error::DeviceError)?;
        Ok(Arc::new(
            crate::sm2key::Sm2PublicKey::from_uncompressed(raw).map_err(|_| Error::DeviceError)?,
        ))
    };
    object.material = match object.class() {
        CKO_PUBLIC_KEY => Material::Public(point()?),
        CKO_PRIVATE_KEY => {
            let sealed = s.sealed.as_ref().ok_or(Error::DeviceError)?;
            match token_key {
                Some(k) => {
                    let value = store::open(k, &aad(s.uid), sealed).ok_or(Error::DeviceError)?;
                    let secret = Arc::new(Sm2PrivateKey::from_bytes(&value)?);
                    Material::Private {
                        public: Arc::new(secret.public().clone()),
                        secret: Some(secret),
                    }
                }
                None => Material::Private {
                    public: point()?,
                    secret: None,
                },
            }
        }
        _ => Material::None,
    };
    Ok((object, s.sealed.clone()))
}

/// PKCS#11 PINs are printable; control characters are a caller's mistake.
fn check_pin(config: &Config, pin: &[u8]) -> Result<()> {
    if pin.len() < config.pin_min_len || pin.len() > config.pin_max_len {
        return Err(Error::PinLenRange);
    }
    if pin.iter().any(|b| *b < 0x20 || *b == 0x7f) {
        return Err(Error::PinInvalid);
    }
    Ok(())
}

/// Flags for one PIN's failure count.
fn pin_flags(failures: u32, max: u32, low: CK_FLAGS, last: CK_FLAGS, locked: CK_FLAGS) -> CK_FLAGS {
    if failures >= max {
        locked
    } else if failures + 1 == max {
        last | low
    } else if failures > 0 {
        low
    } else {
        0
    }
}

impl std::fmt::Debug for Token {
    // Hand-written so that the token key can never be printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("store", &self.store)
            .field("initialized", &self.file.is_some())
            .field("objects", &self.entries.len())
            .field("login", &self.login)
            .finish_non_exhaustive()
    }
}

/// What `C_GetTokenInfo` needs of the token.
#[derive(Debug)]
pub struct TokenSummary {
    pub label: [u8; 32],
    pub serial: [u8; 16],
    pub flags: CK_FLAGS,
}

impl Token {
    /// Loads a slot's token; a missing file is an empty slot.
    pub fn load(config: Arc<Config>, slot: usize) -> Result<Token> {
        let mut t = Token {
            store: SlotStore::new(&config.store_dir, slot),
            stamp: None,
            file: None,
            entries: HashMap::new(),
            handle_of_uid: HashMap::new(),
            login: None,
            token_key: None,
            config,
            checked_ms: AtomicU64::new(0),
            loaded: Instant::now(),
        };
        t.reload()?;
        Ok(t)
    }

    /// Whether another process changed the store, looked at no more than
    /// once per [`SIGNING_STALENESS`] (under the read lock signing holds;
    /// the caller refreshes under the write lock).
    pub fn changed_elsewhere(&self) -> bool {
        let now = self.loaded.elapsed().as_millis() as u64;
        let last = self.checked_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < SIGNING_STALENESS.as_millis() as u64
            || self
                .checked_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return false;
        }
        self.store.stamp() != self.stamp
    }

    /// Re-reads the file if another process changed it.
    pub fn refresh(&mut self) -> Result<()> {
        if self.store.stamp() != self.stamp {
            self.reload()?;
        }
        Ok(())
    }

    fn reload(&mut self) -> Result<()> {
        let (file, stamp) = match self.store.read()? {
            Some((f, s)) => (Some(f), s),
            None => (None, None),
        };
        self.adopt(file, stamp)
    }

    /// Makes `file` the in-memory state: token objects are rebuilt from it
    /// (keeping their handles), session objects stay.
    fn adopt(&mut self, file: Option<TokenFile>, stamp: Option<FileStamp>) -> Result<()> {
        let same_token = match (&self.file, &file) {
            (Some(a), Some(b)) => a.serial == b.serial,
            _ => false,
        };
        if !same_token {
            // Another process re-initialised the token: our login, keys,
            // handles and session objects belonged to the old one.
            self.login = None;
            self.token_key = None;
            self.handle_of_uid.clear();
            if self.file.is_some() {
                self.entries.clear();
            }
        }
        let mut entries: HashMap<_, _> = HashMap::new();
        // Decrypted keys whose sealed value did not change are kept, so a
        // reload costs no unsealing and no scalar multiplication.
        let mut unlocked: HashMap<u64, (Vec<u8>, Material)> = HashMap::new();
        for (h, e) in self.entries.drain() {
            if e.owner.is_some() {
                entries.insert(h, e);
            } else if let (
                Some(sealed),
                Material::Private {
                    secret: Some(_), ..
                },
            ) = (&e.sealed, &e.object.material)
            {
                unlocked.insert(e.object.uid, (sealed.clone(), e.object.material.clone()));
            }
        }
        // Only a user's login opens private keys; the SO holds the token key
        // to set PINs, never to use keys.
        let key = match self.login {
            Some(Login::User) => self.token_key.as_ref(),
            _ => None,
        };
        if let Some(f) = &file {
            for s in &f.objects {
                let reuse = unlocked
                    .remove(&s.uid)
                    .filter(|(sealed, _)| Some(sealed) == s.sealed.as_ref());
                let (object, sealed) = match reuse {
                    Some((_, material)) => {
                        let (mut object, sealed) = from_stored(s, None)?;
                        object.material = material;
                        (object, sealed)
                    }
                    None => from_stored(s, key)?,
                };
                let handle = *self
                    .handle_of_uid
                    .entry(s.uid)
                    .or_insert_with(new_object_handle);
                entries.insert(
                    handle,
                    Entry {
                        object,
                        sealed,
                        owner: None,
                    },
                );
            }
            let live: HashSet<u64> = f.objects.iter().map(|o| o.uid).collect();
            self.handle_of_uid.retain(|uid, _| live.contains(uid));
        }
        self.entries = entries;
        self.file = file;
        self.stamp = stamp;
        Ok(())
    }

    /// Runs a change of persisted state all-or-nothing (see the module doc).
    /// The change sees the file as it is on disk now, so two processes
    /// sharing a store never overwrite each other's objects.
    fn commit<R>(&mut self, change: impl FnOnce(&mut TokenFile) -> Result<R>) -> Result<R> {
        let lock = self.store.lock()?;
        // Re-read unconditionally: a file stamp (mtime, size, inode) can
        // repeat across quick writes, and the change must see the real file.
        self.reload()?;
        let current = self.file.clone().ok_or(Error::TokenNotRecognized)?;
        let mut next = current.clone();
        let result = change(&mut next);
        // A failed PIN check still has to record its failure count.
        if next != current {
            let stamp = self.store.write(&lock, &next)?;
            self.adopt(Some(next), stamp)?;
        }
        result
    }

    pub fn is_initialized(&self) -> bool {
        self.file.is_some()
    }

    pub fn login_state(&self) -> Option<Login> {
        self.login
    }

    pub fn summary(&self) -> TokenSummary {
        let max = self.config.max_login_failures;
        let mut flags = CKF_RNG | CKF_LOGIN_REQUIRED;
        let mut label = [b' '; 32];
        let mut serial = [b' '; 16];
        if let Some(f) = &self.file {
            flags |= CKF_TOKEN_INITIALIZED;
            label.copy_from_slice(&f.label);
            let s = f.serial.as_bytes();
            serial[..s.len().min(16)].copy_from_slice(&s[..s.len().min(16)]);
            if f.user.is_some() {
                flags |= CKF_USER_PIN_INITIALIZED;
            }
            flags |= pin_flags(
                f.user_failures,
                max,
                CKF_USER_PIN_COUNT_LOW,
                CKF_USER_PIN_FINAL_TRY,
                CKF_USER_PIN_LOCKED,
            );
            flags |= pin_flags(
                f.so_failures,
                max,
                CKF_SO_PIN_COUNT_LOW,
                CKF_SO_PIN_FINAL_TRY,
                CKF_SO_PIN_LOCKED,
            );
        }
        TokenSummary {
            label,
            serial,
            flags,
        }
    }

    /// `C_InitToken`: a new token in an empty slot, or a wiped one when the
    /// SO PIN of the current token is given.
    pub fn init(&mut self, so_pin: &[u8], label: [u8; 32]) -> Result<()> {
        check_pin(&self.config, so_pin)?;
        // One lock for the whole: the SO PIN check and the new token must
        // not interleave with another process's writes.
        let lock = self.store.lock()?;
        self.refresh()?;
        if let Some(current) = self.file.clone() {
            // Re-initialising proves the current SO PIN, with its counter.
            let mut counted = current.clone();
            let verified = verify_pin(&mut counted, &current.so, so_pin, Login::So, &self.config);
            if counted != current {
                let stamp = self.store.write(&lock, &counted)?;
                self.adopt(Some(counted), stamp)?;
            }
            verified?;
        }
        let token_key = store::random_key()?;
        let so = PinRecord::new(so_pin, SO_ROLE, &token_key, self.config.kdf_iterations)?;
        let mut serial_bytes = [0u8; 8];
        getrandom::fill(&mut serial_bytes).map_err(|_| Error::DeviceError)?;
        let file = TokenFile::new(label, store::to_hex(&serial_bytes), so);
        let stamp = self.store.write(&lock, &file)?;
        // A new serial: `adopt` drops the old token's login, keys and objects.
        self.adopt(Some(file), stamp)
    }

    /// First half of `C_Login`, under the slot lock: the PIN record to
    /// check. The slow key derivation then runs without the lock (see
    /// `module::login`), so signers on this slot are not held up by it.
    pub fn login_begin(&mut self, who: Login) -> Result<PinRecord> {
        if let Some(current) = self.login {
            return Err(if current == who {
                Error::UserAlreadyLoggedIn
            } else {
                Error::UserAnotherAlreadyLoggedIn
            });
        }
        self.refresh()?;
        let f = self.file.as_ref().ok_or(Error::TokenNotRecognized)?;
        let (record, failures) = match who {
            Login::So => (f.so.clone(), f.so_failures),
            Login::User => (
                f.user.clone().ok_or(Error::UserPinNotInitialized)?,
                f.user_failures,
            ),
        };
        if failures >= self.config.max_login_failures {
            return Err(Error::PinLocked);
        }
        Ok(record)
    }

    /// Second half of `C_Login`: records the outcome of the check made on
    /// `record` and, on success, logs in. All or nothing: a failure leaves
    /// nobody logged in.
    pub fn login_finish(
        &mut self,
        who: Login,
        record: &PinRecord,
        pin: &[u8],
        unwrapped: Option<SymKey>,
    ) -> Result<()> {
        if self.login.is_some() {
            // Another thread of this application logged in meanwhile.
            return Err(Error::UserAlreadyLoggedIn);
        }
        let config = self.config.clone();
        let key = self.commit(|f| {
            let current = match who {
                Login::So => f.so.clone(),
                Login::User => f.user.clone().ok_or(Error::UserPinNotInitialized)?,
            };
            if current != *record {
                // The PIN changed while we derived: check against the new one.
                return verify_pin(f, &current, pin, who, &config);
            }
            record_outcome(f, who, unwrapped, pin, &config)
        })?;
        let materials = match who {
            Login::User => self.unseal_all(&key)?,
            Login::So => Vec::new(),
        };
        for (handle, material) in materials {
            if let Some(e) = self.entries.get_mut(&handle) {
                e.object.material = material;
            }
        }
        self.token_key = Some(key);
        self.login = Some(who);
        Ok(())
    }

    /// Every private key of the token, decrypted, or an error if any fails.
    fn unseal_all(&self, key: &SymKey) -> Result<Vec<(CK_OBJECT_HANDLE, Material)>> {
        let mut out = Vec::new();
        for (h, e) in &self.entries {
            if let (Some(sealed), Material::Private { .. }) = (&e.sealed, &e.object.material) {
                let value =
                    store::open(key, &aad(e.object.uid), sealed).ok_or(Error::DeviceError)?;
                let secret = Arc::new(Sm2PrivateKey::from_bytes(&value)?);
                out.push((
                    *h,
                    Material::Private {
                        public: Arc::new(secret.public().clone()),
                        secret: Some(secret),
                    },
                ));
            }
        }
        Ok(out)
    }

    /// `C_Logout`: forget the token key and every decrypted private key, and
    /// destroy private session objects.
    pub fn logout(&mut self) -> Result<()> {
        if self.login.take().is_none() {
            return Err(Error::UserNotLoggedIn);
        }
        self.token_key = None;
        self.entries
            .retain(|_, e| !(e.owner.is_some() && e.object.is_private()));
        for e in self.entries.values_mut() {
            if let Material::Private { public, .. } = &e.object.material {
                e.object.material = Material::Private {
                    public: public.clone(),
                    secret: None,
                };
            }
        }
        Ok(())
    }

    /// What happens when the last session closes or the token is pulled.
    pub fn drop_login(&mut self) {
        let _ = self.logout();
    }

    /// `C_InitPIN` (the SO sets the user PIN; clears a user lock).
    pub fn init_pin(&mut self, pin: &[u8]) -> Result<()> {
        if self.login != Some(Login::So) {
            return Err(Error::UserNotLoggedIn);
        }
        check_pin(&self.config, pin)?;
        let key = self.token_key.clone().ok_or(Error::UserNotLoggedIn)?;
        let serial = self.file.as_ref().map(|f| f.serial.clone());
        let record = PinRecord::new(pin, USER_ROLE, &key, self.config.kdf_iterations)?;
        self.commit(|f| {
            // Re-initialised by another process: our token key is not its.
            if Some(&f.serial) != serial.as_ref() {
                return Err(Error::UserNotLoggedIn);
            }
            f.user = Some(record);
            f.user_failures = 0;
            Ok(())
        })
    }

    /// `C_SetPIN`: the SO's PIN when the SO is logged in, else the user's.
    pub fn set_pin(&mut self, old: &[u8], new: &[u8]) -> Result<()> {
        check_pin(&self.config, new)?;
        let who = if self.login == Some(Login::So) {
            Login::So
        } else {
            Login::User
        };
        let config = self.config.clone();
        self.commit(|f| {
            let record = match who {
                Login::So => f.so.clone(),
                Login::User => f.user.clone().ok_or(Error::UserPinNotInitialized)?,
            };
            let key = verify_pin(f, &record, old, who, &config)?;
            let rec = PinRecord::new(new, role(who), &key, config.kdf_iterations)?;
            match who {
                Login::So => f.so = rec,
                Login::User => f.user = Some(rec),
            }
            Ok(())
        })
    }

    /// Whether a session in this login state may see the object.
    fn visible(&self, e: &Entry) -> bool {
        !e.object.is_private() || self.login == Some(Login::User)
    }

    /// An object the caller may see.
    pub fn object(&self, handle: CK_OBJECT_HANDLE) -> Result<&Object> {
        let e = self
            .entries
            .get(&handle)
            .ok_or(Error::ObjectHandleInvalid)?;
        if !self.visible(e) {
            return Err(Error::ObjectHandleInvalid);
        }
        Ok(&e.object)
    }

    /// Handles of visible objects matching a template, in a stable order.
    pub fn find(&self, template: &Template) -> Vec<CK_OBJECT_HANDLE> {
        let mut v: Vec<_> = self
            .entries
            .iter()
            .filter(|(_, e)| self.visible(e) && e.object.matches(template))
            .map(|(h, _)| *h)
            .collect();
        v.sort_unstable();
        v
    }

    fn check_may_create(&self, object: &Object, rw: bool) -> Result<()> {
        if object.is_token() && !rw {
            return Err(Error::SessionReadOnly);
        }
        if object.is_private() && self.login != Some(Login::User) {
            return Err(Error::UserNotLoggedIn);
        }
        Ok(())
    }

    /// Adds new objects: token objects through one commit (sealing private
    /// values under the token key), session objects in memory.
    fn insert_all(
        &mut self,
        objects: Vec<Object>,
        rw: bool,
        session: CK_SESSION_HANDLE,
    ) -> Result<Vec<CK_OBJECT_HANDLE>> {
        for o in &objects {
            self.check_may_create(o, rw)?;
        }
        let mut stored = Vec::new();
        let mut placed = Vec::new();
        for mut object in objects {
            // Random ids need no coordination between processes.
            object.uid = getrandom::u64().map_err(|_| Error::DeviceError)?;
            if object.is_token() {
                let sealed = match &object.material {
                    Material::Private {
                        secret: Some(secret),
                        ..
                    } => {
                        let key = self.token_key.as_ref().ok_or(Error::UserNotLoggedIn)?;
                        Some(store::seal(
                            key,
                            &aad(object.uid),
                            secret.to_bytes().as_ref(),
                        )?)
                    }
                    _ => None,
                };
                placed.push((object.uid, None));
                stored.push(to_stored(&Entry {
                    object,
                    sealed,
                    owner: None,
                }));
            } else {
                let handle = new_object_handle();
                placed.push((object.uid, Some(handle)));
                self.entries.insert(
                    handle,
                    Entry {
                        object,
                        sealed: None,
                        owner: Some(session),
                    },
                );
            }
        }
        if !stored.is_empty() {
            let committed = self.commit(|f| {
                f.objects.extend(stored);
                Ok(())
            });
            if let Err(e) = committed {
                for h in placed.iter().filter_map(|(_, h)| *h) {
                    self.entries.remove(&h);
                }
                return Err(e);
            }
        }
        placed
            .into_iter()
            .map(|(uid, h)| match h {
                Some(h) => Ok(h),
                None => self
                    .handle_of_uid
                    .get(&uid)
                    .copied()
                    .ok_or(Error::GeneralError),
            })
            .collect()
    }

    /// `C_CreateObject`.
    pub fn create(
        &mut self,
        template: &Template,
        rw: bool,
        session: CK_SESSION_HANDLE,
    ) -> Result<CK_OBJECT_HANDLE> {
        self.require_initialized()?;
        let object = object::create(0, template)?;
        Ok(self.insert_all(vec![object], rw, session)?[0])
    }

    /// `C_GenerateKeyPair`: (public, private) handles.
    pub fn generate_pair(
        &mut self,
        public_template: &Template,
        private_template: &Template,
        rw: bool,
        session: CK_SESSION_HANDLE,
    ) -> Result<(CK_OBJECT_HANDLE, CK_OBJECT_HANDLE)> {
        self.require_initialized()?;
        if self.login != Some(Login::User) {
            // A private key needs the token key, which only the user's PIN
            // opens.
            return Err(Error::UserNotLoggedIn);
        }
        let (public, private) = object::generate_pair(0, 0, public_template, private_template)?;
        let h = self.insert_all(vec![public, private], rw, session)?;
        Ok((h[0], h[1]))
    }

    /// `C_DestroyObject`.
    pub fn destroy(&mut self, handle: CK_OBJECT_HANDLE, rw: bool) -> Result<()> {
        let object = self.object(handle)?;
        if object.is_token() && !rw {
            return Err(Error::SessionReadOnly);
        }
        if !object.bool(CKA_DESTROYABLE) {
            return Err(Error::ActionProhibited);
        }
        if object.is_token() {
            let uid = object.uid;
            self.commit(|f| {
                f.objects.retain(|o| o.uid != uid);
                Ok(())
            })
        } else {
            self.entries.remove(&handle);
            Ok(())
        }
    }

    /// `C_SetAttributeValue`.
    pub fn set_attributes(
        &mut self,
        handle: CK_OBJECT_HANDLE,
        template: &Template,
        rw: bool,
    ) -> Result<()> {
        let object = self.object(handle)?;
        if object.is_token() && !rw {
            return Err(Error::SessionReadOnly);
        }
        if !object.is_token() {
            let mut changed = object.clone();
            changed.set(template)?;
            if let Some(entry) = self.entries.get_mut(&handle) {
                entry.object = changed;
            }
            return Ok(());
        }
        let uid = object.uid;
        // Applied to the object as stored now, so another process's change
        // (say CKA_SENSITIVE false → true) is neither lost nor undone.
        self.commit(|f| {
            let stored = f
                .objects
                .iter_mut()
                .find(|o| o.uid == uid)
                .ok_or(Error::ObjectHandleInvalid)?;
            let (mut fresh, sealed) = from_stored(stored, None)?;
            fresh.set(template)?;
            *stored = to_stored(&Entry {
                object: fresh,
                sealed,
                owner: None,
            });
            Ok(())
        })
    }

    /// Drops every session object (the token was pulled).
    pub fn close_all_session_objects(&mut self) {
        self.entries.retain(|_, e| e.owner.is_none());
    }

    /// Drops the session objects a closing session owned.
    pub fn close_session(&mut self, session: CK_SESSION_HANDLE) {
        self.entries.retain(|_, e| e.owner != Some(session));
    }

    fn require_initialized(&self) -> Result<()> {
        if self.file.is_none() {
            return Err(Error::TokenNotRecognized);
        }
        Ok(())
    }
}

/// Checks a PIN against its record, counting failures in `f` (which the
/// caller persists either way) and refusing a locked PIN.
fn verify_pin(
    f: &mut TokenFile,
    record: &PinRecord,
    pin: &[u8],
    who: Login,
    config: &Config,
) -> Result<SymKey> {
    let failures = match who {
        Login::So => &mut f.so_failures,
        Login::User => &mut f.user_failures,
    };
    if *failures >= config.max_login_failures {
        return Err(Error::PinLocked);
    }
    if pin.len() < config.pin_min_len || pin.len() > config.pin_max_len {
        *failures += 1;
        return Err(Error::PinIncorrect);
    }
    match record.unwrap_key(pin, role(who)) {
        Some(key) => {
            *failures = 0;
            Ok(key)
        }
        None => {
            *failures += 1;
            Err(Error::PinIncorrect)
        }
    }
}

/// Records the result of a PIN check made outside the lock (see
/// [`Token::login_begin`]), with the same counting as [`verify_pin`].
fn record_outcome(
    f: &mut TokenFile,
    who: Login,
    unwrapped: Option<SymKey>,
    pin: &[u8],
    config: &Config,
) -> Result<SymKey> {
    let failures = match who {
        Login::So => &mut f.so_failures,
        Login::User => &mut f.user_failures,
    };
    if *failures >= config.max_login_failures {
        return Err(Error::PinLocked);
    }
    let in_range = pin.len() >= config.pin_min_len && pin.len() <= config.pin_max_len;
    match unwrapped {
        Some(key) if in_range => {
            *failures = 0;
            Ok(key)
        }
        _ => {
            *failures += 1;
            Err(Error::PinIncorrect)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::object::{bool_, ulong};

    fn config(dir: &std::path::Path) -> Arc<Config> {
        Arc::new(Config {
            store_dir: dir.to_path_buf(),
            kdf_iterations: 1000,
            ..Config::default()
        })
    }

    fn login(t: &mut Token, who: Login, pin: &[u8]) -> Result<()> {
        let record = t.login_begin(who)?;
        let unwrapped = record.unwrap_key(pin, role(who));
        t.login_finish(who, &record, pin, unwrapped)
    }

    fn has_secret(t: &Token, h: CK_OBJECT_HANDLE) -> bool {
        matches!(
            t.entries[&h].object.material,
            Material::Private {
                secret: Some(_),
                ..
            }
        )
    }

    /// A token with a user PIN and one token key pair; (public, private).
    fn token_with_key(t: &mut Token) -> (CK_OBJECT_HANDLE, CK_OBJECT_HANDLE) {
        t.init(b"so-pin", [b' '; 32]).unwrap();
        login(t, Login::So, b"so-pin").unwrap();
        t.init_pin(b"user-pin").unwrap();
        t.logout().unwrap();
        login(t, Login::User, b"user-pin").unwrap();
        let token = vec![(CKA_TOKEN, bool_(true))];
        let private = vec![
            (CKA_TOKEN, bool_(true)),
            (CKA_SENSITIVE, bool_(false)),
            (CKA_EXTRACTABLE, bool_(true)),
            (CKA_PRIVATE, bool_(false)),
        ];
        t.generate_pair(&token, &private, true, 1).unwrap()
    }

    #[test]
    fn only_a_user_login_opens_private_keys() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Token::load(config(dir.path()), 0).unwrap();
        let (_, private) = token_with_key(&mut t);
        assert!(has_secret(&t, private));
        t.logout().unwrap();
        assert!(!has_secret(&t, private));
        login(&mut t, Login::So, b"so-pin").unwrap();
        // The SO's own commit re-reads the token: keys must stay sealed.
        t.init_pin(b"user-pin-2").unwrap();
        assert!(!has_secret(&t, private));
        assert_eq!(
            t.object(private).unwrap().get(CKA_VALUE),
            Err(Error::AttributeSensitive)
        );
    }

    #[test]
    fn wrong_pins_count_and_lock_without_logging_in() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Token::load(config(dir.path()), 0).unwrap();
        token_with_key(&mut t);
        t.logout().unwrap();
        for _ in 0..4 {
            assert_eq!(
                login(&mut t, Login::User, b"nope"),
                Err(Error::PinIncorrect)
            );
            assert_eq!(t.login_state(), None);
        }
        assert_eq!(
            login(&mut t, Login::User, b"nope"),
            Err(Error::PinIncorrect)
        );
        assert_eq!(
            login(&mut t, Login::User, b"user-pin"),
            Err(Error::PinLocked)
        );
        assert!(t.summary().flags & CKF_USER_PIN_LOCKED != 0);
    }

    #[test]
    fn a_stale_copy_cannot_undo_another_process_change() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Token::load(config(dir.path()), 0).unwrap();
        let (_, private) = token_with_key(&mut a);
        // A second "process" on the same store makes the key sensitive.
        let mut b = Token::load(config(dir.path()), 0).unwrap();
        login(&mut b, Login::User, b"user-pin").unwrap();
        let hb = b.find(&vec![(CKA_CLASS, ulong(CKO_PRIVATE_KEY))])[0];
        b.set_attributes(hb, &vec![(CKA_SENSITIVE, bool_(true))], true)
            .unwrap();
        // The first, without refreshing, renames it: sensitivity must stay.
        a.set_attributes(private, &vec![(CKA_LABEL, b"renamed".to_vec())], true)
            .unwrap();
        let o = a.object(private).unwrap();
        assert!(o.bool(CKA_SENSITIVE));
        assert_eq!(o.get(CKA_LABEL).unwrap().as_slice(), b"renamed");
        b.refresh().unwrap();
        assert!(b.object(hb).unwrap().bool(CKA_SENSITIVE));
        // And the reverse change is refused on the fresh value.
        assert_eq!(
            a.set_attributes(private, &vec![(CKA_SENSITIVE, bool_(false))], true),
            Err(Error::AttributeReadOnly)
        );
    }

    #[test]
    fn signing_notices_a_key_another_process_deleted_within_the_staleness_bound() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Token::load(config(dir.path()), 0).unwrap();
        let (_, private) = token_with_key(&mut a);
        std::thread::sleep(SIGNING_STALENESS);
        assert!(!a.changed_elsewhere(), "nothing changed");
        let mut b = Token::load(config(dir.path()), 0).unwrap();
        login(&mut b, Login::User, b"user-pin").unwrap();
        let hb = b.find(&vec![(CKA_CLASS, ulong(CKO_PRIVATE_KEY))])[0];
        b.destroy(hb, true).unwrap();
        // Looked at a moment ago: not again until the bound has passed.
        assert!(!a.changed_elsewhere());
        std::thread::sleep(SIGNING_STALENESS);
        assert!(a.changed_elsewhere());
        a.refresh().unwrap();
        assert!(a.object(private).is_err(), "the deleted key is gone");
    }

    #[test]
    fn objects_created_by_two_processes_are_both_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Token::load(config(dir.path()), 0).unwrap();
        token_with_key(&mut a);
        let mut b = Token::load(config(dir.path()), 0).unwrap();
        login(&mut b, Login::User, b"user-pin").unwrap();
        let data = |label: &[u8]| {
            vec![
                (CKA_CLASS, ulong(CKO_DATA)),
                (CKA_TOKEN, bool_(true)),
                (CKA_LABEL, label.to_vec()),
            ]
        };
        a.create(&data(b"from-a"), true, 1).unwrap();
        b.create(&data(b"from-b"), true, 2).unwrap();
        a.refresh().unwrap();
        assert_eq!(a.find(&vec![(CKA_CLASS, ulong(CKO_DATA))]).len(), 2);
    }
}
