//! Which module and token to act on, and the token-level commands:
//! `token init`, `token info`, `pin init`, `pin change`.
//!
//! svs-hsm's `Token`/`Hsm` are built for the daemon (a user session pool);
//! the security officer's operations (C_InitToken, C_InitPIN, C_SetPIN) and
//! one-shot sessions are done here directly on cryptoki, with svs-hsm's
//! module loader so that module handling is the same in both programs.

use std::path::{Path, PathBuf};

use cryptoki::context::Pkcs11;
use cryptoki::session::{Session, UserType};
use cryptoki::slot::{Limit, Slot, TokenInfo};
use cryptoki::types::AuthPin;
use serde_json::{Value, json};
use svs_hsm::profile::{ModuleIdentity, ProfileOverride, ProfileTable};
use svs_hsm::{ModuleSource, Pkcs11Uri, TokenSelector, VendorProfile};
use zeroize::Zeroizing;

use crate::Report;
use crate::error::{ProvisionError, Result, TriesLeft};
use crate::pin::{PinReader, Role};

/// Where to find the token: from the command line, else from svsd's config.
#[derive(Debug, Clone, Default)]
pub struct Target {
    /// The PKCS#11 module.
    pub module: ModuleSource,
    /// Token label.
    pub label: Option<String>,
    /// Token serial number.
    pub serial: Option<String>,
    /// A PKCS#11 URI selecting the token.
    pub uri: Option<Pkcs11Uri>,
    /// Vendor profile name, or "auto".
    pub profile: String,
    /// Profile overrides from svsd's config.
    pub profiles: Vec<ProfileOverride>,
    /// The soft token's config file (svsd's `[embedded_token] config`).
    pub embedded_config: Option<PathBuf>,
}

/// Held while svs-provision changes a module's tokens; dropping it (or
/// the process ending) releases the lock. A lock taken from
/// [`lock_changes`] while this process holds one already shares it.
#[derive(Debug)]
pub struct ChangeLock(Option<std::fs::File>);

impl Drop for ChangeLock {
    fn drop(&mut self) {
        if self.0.is_none() {
            let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
            held.1 = held.1.saturating_sub(1);
            if held.1 == 0 {
                held.0 = None;
            }
        }
    }
}

/// The change lock this process holds through [`lock_changes`], and how
/// many [`ChangeLock`]s share it. svs-provision is one thread: this is
/// where a prompt finds the lock to give up while it waits.
static HELD: std::sync::Mutex<(Option<std::fs::File>, usize)> = std::sync::Mutex::new((None, 0));

/// Runs `wait_for_officer` (a prompt on the terminal) without the change
/// lock, when this process holds it, and takes the lock again after: an
/// officer at a prompt must not hold up every other run on the host.
/// What the command checked on the token before is checked again once it
/// has the lock back (its check-then-create step takes the lock itself).
pub fn released_while<T>(wait_for_officer: impl FnOnce() -> T) -> Result<T> {
    use rustix::fs::{FlockOperation, flock};
    let file = {
        let held = HELD.lock().unwrap_or_else(|p| p.into_inner());
        match held.0.as_ref().map(std::fs::File::try_clone) {
            None => None,
            Some(Ok(f)) => Some(f),
            Some(Err(e)) => {
                return Err(ProvisionError::Io(format!(
                    "cannot hand over the change lock during a prompt: {e}"
                )));
            }
        }
    };
    let Some(file) = file else {
        return Ok(wait_for_officer());
    };
    let _ = flock(&file, FlockOperation::Unlock);
    let answer = wait_for_officer();
    take_flock(&file).map_err(|e| {
        ProvisionError::Io(format!(
            "cannot take the change lock again after the prompt: {e}; nothing was changed"
        ))
    })?;
    Ok(answer)
}

/// Waits for the flock on `file`, saying so on a terminal.
fn take_flock(file: &std::fs::File) -> rustix::io::Result<()> {
    use rustix::fs::{FlockOperation, flock};
    if flock(file, FlockOperation::NonBlockingLockExclusive).is_err() {
        // Otherwise a wait looks like a hang.
        crate::progress("waiting for another svs-provision run that is changing a token…");
        flock(file, FlockOperation::LockExclusive)?;
    }
    Ok(())
}

impl Target {
    fn selects(&self) -> bool {
        self.label.is_some()
            || self.serial.is_some()
            || self.uri.as_ref().is_some_and(Pkcs11Uri::selects_token)
    }

    /// The same criteria as svs-hsm's, so both pick a token alike.
    fn selector(&self) -> TokenSelector {
        TokenSelector {
            label: self.label.clone(),
            serial: self.serial.clone(),
            uri: self.uri.clone(),
        }
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(l) = &self.label {
            parts.push(format!("'{l}'"));
        }
        if let Some(s) = &self.serial {
            parts.push(format!("serial {s:?}"));
        }
        if let Some(u) = &self.uri {
            parts.push(u.describe());
        }
        parts.join(" ")
    }

    fn module_name(&self) -> String {
        match &self.module {
            ModuleSource::Embedded => "the built-in soft token".into(),
            ModuleSource::Path(p) => p.display().to_string(),
        }
    }

    /// Loads (once per process) and initialises the module.
    pub fn load(&self) -> Result<Pkcs11> {
        if let (ModuleSource::Embedded, Some(conf)) = (&self.module, &self.embedded_config) {
            svs_softtoken::set_config_path(Some(conf.clone()));
        }
        svs_hsm::token::load_module(&self.module).map_err(|e| match e {
            svs_hsm::HsmError::Pkcs11 { rv, .. } if self.module == ModuleSource::Embedded => {
                ProvisionError::Config(format!(
                    "the built-in soft token did not start ({}): check its configuration file (SVS_SOFTTOKEN_CONF or svsd's [embedded_token] config); the token printed the reason above",
                    rv.name
                ))
            }
            other => other.into(),
        })
    }
}

/// Serialises svs-provision's check-then-create steps (is the label
/// taken? then create) among its processes on this host: PKCS#11 has no
/// "create unless the label is taken", and two officers, or a script run
/// twice, generating one label at once both passed the check and left two
/// keys under it (seen on SoftHSMv2), of which svsd serves only one by that
/// name. One lock for the whole host, not per module or token: the same
/// token is reached by several routes (the built-in soft token or its .so,
/// a configuration path, relative or through a link), which a lock keyed on
/// the route did not serialise; the changes are few and short, so waiting
/// for an unrelated one costs little. Processes on other hosts sharing a
/// network HSM are not covered (docs/operations.md: provision from one
/// place).
///
/// Taken by each command that changes a token (`token init`, `pin init`
/// and `pin change`, `key generate` and `key delete`, `cert import`,
/// `audit anchor --reset`) once it has every PIN and confirmation it needs
/// and just before it looks at the token to change it: held across a
/// prompt, one officer at a prompt held up every other run on the host,
/// scripted ones included, for as long as he took.
pub fn lock_changes() -> Result<ChangeLock> {
    {
        let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
        if held.0.is_some() {
            held.1 += 1;
            return Ok(ChangeLock(None));
        }
    }
    let euid = rustix::process::geteuid().as_raw();
    let file = lock_file(&lock_path(euid), euid)?;
    let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
    *held = (Some(file), 1);
    Ok(ChangeLock(None))
}

/// The change lock's file for a process of effective user `euid`.
///
/// Root's is in /run, which only root may write: in the world-writable
/// /run/lock any local user could create the file first, or open it and
/// hold its flock, and so stop every provisioning run (a file there that
/// is not root's would only turn the hang into a refusal). Other users
/// (tests, a module driven from an unprivileged account) get a file of
/// their own in /run/lock, or the temporary directory, which [`lock_at`]
/// checks is theirs; their runs are not serialised with root's, whose
/// token files they cannot change anyway.
pub fn lock_path(euid: u32) -> PathBuf {
    let run = Path::new("/run");
    if euid == 0 && run.is_dir() {
        return run.join("svs-provision.lock");
    }
    let dir = Path::new("/run/lock");
    let dir = if dir.is_dir() {
        dir.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    dir.join(format!("svs-provision-{euid}.lock"))
}

/// Takes the change lock on `path` for a process of effective user
/// `euid`, waiting for the run that holds it.
pub fn lock_at(path: &Path, euid: u32) -> Result<ChangeLock> {
    lock_file(path, euid).map(|file| ChangeLock(Some(file)))
}

/// [`lock_at`]'s file, locked.
fn lock_file(path: &Path, euid: u32) -> Result<std::fs::File> {
    use rustix::fs::{FileType, Mode, OFlags};
    let cannot = |why: String| {
        ProvisionError::Io(format!(
            "cannot take the lock {} that keeps two svs-provision runs from changing tokens at once: {why}",
            path.display()
        ))
    };
    // Not followed: a link planted there would have us create or lock a
    // file of its maker's choosing.
    let fd = rustix::fs::open(
        path,
        OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| match e {
        rustix::io::Errno::LOOP => cannot(format!(
            "it is a symbolic link; nothing was changed. Remove it (`rm {}`) and run again",
            crate::cli::shell_word(&path.to_string_lossy())
        )),
        e => cannot(format!("{e}; nothing was changed")),
    })?;
    let st = rustix::fs::fstat(&fd).map_err(|e| cannot(format!("{e}; nothing was changed")))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile || st.st_uid != euid {
        // Whoever made it could hold its flock for ever (or, for a
        // device or pipe, worse): a refusal names it, a wait would not.
        return Err(cannot(format!(
            "it is not a regular file of user {euid} (its owner is user {}); nothing was changed. Remove it (`rm {}`) and run again",
            st.st_uid,
            crate::cli::shell_word(&path.to_string_lossy())
        )));
    }
    // One made by an older version (0644) could be opened, and so locked,
    // by any user.
    if st.st_mode & 0o077 != 0 {
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o600))
            .map_err(|e| cannot(format!("{e}; nothing was changed")))?;
    }
    let file = std::fs::File::from(fd);
    take_flock(&file).map_err(|e| cannot(format!("{e}; nothing was changed")))?;
    Ok(file)
}

/// Every slot with a token, with what the token says about itself.
pub fn tokens(pkcs11: &Pkcs11) -> Result<Vec<(Slot, TokenInfo)>> {
    let slots = pkcs11
        .get_slots_with_token()
        .map_err(|e| ProvisionError::pkcs11(e, "listing slots", "user"))?;
    let mut out = Vec::new();
    for slot in slots {
        if let Ok(info) = pkcs11.get_token_info(slot) {
            out.push((slot, info));
        }
    }
    Ok(out)
}

fn present(list: &[(Slot, TokenInfo)]) -> String {
    let names: Vec<String> = list
        .iter()
        .map(|(s, i)| {
            if i.token_initialized() {
                format!("'{}' (slot {})", i.label().trim_end(), s.id())
            } else {
                format!("an empty token (slot {})", s.id())
            }
        })
        .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// The chosen token: every criterion given must match exactly one slot;
/// with none, the only initialised token.
pub fn select(pkcs11: &Pkcs11, target: &Target) -> Result<(Slot, TokenInfo)> {
    let lib = pkcs11
        .get_library_info()
        .map_err(|e| ProvisionError::pkcs11(e, "reading the module's information", "user"))?;
    let all = tokens(pkcs11)?;
    let selector = target.selector();
    let found: Vec<&(Slot, TokenInfo)> = all
        .iter()
        .filter(|(slot, info)| {
            if target.selects() {
                selector.matches(*slot, info, &lib)
            } else {
                info.token_initialized()
            }
        })
        .collect();
    match found.as_slice() {
        [one] => Ok((one.0, one.1.clone())),
        [] if target.selects() => Err(ProvisionError::NotFound(format!(
            "token {} not found in {}; tokens present: {}",
            target.describe(),
            target.module_name(),
            present(&all)
        ))),
        [] => Err(ProvisionError::NotFound(format!(
            "no initialised token in {}; tokens present: {}. Create one with `{}`",
            target.module_name(),
            present(&all),
            crate::cli::command_for_token(None, "token init --label NAME")
        ))),
        many => Err(ProvisionError::Usage(format!(
            "{} tokens match in {}: {}; choose one with --token LABEL",
            many.len(),
            target.module_name(),
            present(&many.iter().map(|t| (*t).clone()).collect::<Vec<_>>())
        ))),
    }
}

/// A token opened for key work: the module, the slot and the vendor profile.
#[derive(Debug)]
pub struct Opened {
    /// The module.
    pub pkcs11: Pkcs11,
    /// The token's slot.
    pub slot: Slot,
    /// The token's label (trimmed).
    pub label: String,
    /// The vendor profile in use.
    pub profile: VendorProfile,
}

impl Opened {
    /// Loads the module, selects the token, picks the profile.
    pub fn open(target: &Target) -> Result<Opened> {
        let pkcs11 = target.load()?;
        let (slot, info) = select(&pkcs11, target)?;
        let profile = profile_for(&pkcs11, &info, target)?;
        Ok(Opened {
            label: info.label().trim_end().to_owned(),
            pkcs11,
            slot,
            profile,
        })
    }

    /// A read-write session without login: public objects only.
    pub fn public_session(&self) -> Result<Session> {
        self.pkcs11
            .open_rw_session(self.slot)
            .or_else(|_| self.pkcs11.open_ro_session(self.slot))
            .map_err(|e| ProvisionError::pkcs11(e, "opening a session", "user"))
    }

    /// A read-write session logged in as the user.
    pub fn user_session(&self, pins: &mut PinReader) -> Result<Session> {
        let session = self
            .pkcs11
            .open_rw_session(self.slot)
            .map_err(|e| ProvisionError::pkcs11(e, "opening a session", "user"))?;
        let info = self
            .pkcs11
            .get_token_info(self.slot)
            .map_err(|e| ProvisionError::pkcs11(e, "reading the token's information", "user"))?;
        let pin = pins.current(Role::User, info.min_pin_length(), info.max_pin_length())?;
        login(
            &self.pkcs11,
            self.slot,
            &session,
            Role::User,
            &pin,
            &self.label,
        )?;
        Ok(session)
    }
}

fn login(
    pkcs11: &Pkcs11,
    slot: Slot,
    session: &Session,
    role: Role,
    pin: &Zeroizing<String>,
    label: &str,
) -> Result<()> {
    let who = match role {
        Role::User => UserType::User,
        Role::So => UserType::So,
    };
    match session.login(who, Some(&AuthPin::new(pin.as_str().into()))) {
        Ok(()) => Ok(()),
        // Login is per application: a session of ours is already logged in.
        Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {
            Ok(())
        }
        Err(e) => Err(pin_refused(
            pkcs11,
            slot,
            e,
            &format!("logging in to token '{label}' as {}", role.name()),
            role,
        )),
    }
}

/// A failed PIN check of `role`, told with what the token's flags say
/// about the tries left once it counted this one.
fn pin_refused(
    pkcs11: &Pkcs11,
    slot: Slot,
    e: cryptoki::error::Error,
    what: &str,
    role: Role,
) -> ProvisionError {
    let left = match pkcs11.get_token_info(slot) {
        Ok(info) => {
            let (locked, last) = match role {
                Role::User => (info.user_pin_locked(), info.user_pin_final_try()),
                Role::So => (info.so_pin_locked(), info.so_pin_final_try()),
            };
            if locked {
                TriesLeft::None
            } else if last {
                TriesLeft::One
            } else {
                TriesLeft::Unknown
            }
        }
        Err(_) => TriesLeft::Unknown,
    };
    ProvisionError::pin_refused(e, what, role.name(), left)
}

/// The vendor profile: by name, or recognised from what the module says.
pub fn profile_for(pkcs11: &Pkcs11, info: &TokenInfo, target: &Target) -> Result<VendorProfile> {
    let table = ProfileTable::with_overrides(&target.profiles)?;
    let names = || {
        table
            .profiles()
            .iter()
            .map(|p| p.name.clone())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if target.profile != "auto" {
        return table.get(&target.profile).cloned().ok_or_else(|| {
            ProvisionError::Usage(format!(
                "unknown profile {:?}; profiles: {}",
                target.profile,
                names()
            ))
        });
    }
    let lib = pkcs11
        .get_library_info()
        .map_err(|e| ProvisionError::pkcs11(e, "reading the module's information", "user"))?;
    let identity = ModuleIdentity {
        library_manufacturer: lib.manufacturer_id().trim_end().to_owned(),
        library_description: lib.library_description().trim_end().to_owned(),
        token_manufacturer: info.manufacturer_id().trim_end().to_owned(),
        token_model: info.model().trim_end().to_owned(),
    };
    table.recognise(&identity).cloned().ok_or_else(|| {
        ProvisionError::Usage(format!(
            "cannot tell which vendor profile this module speaks (manufacturer {:?}, model {:?}); pass --profile with one of: {}",
            identity.token_manufacturer,
            identity.token_model,
            names()
        ))
    })
}

fn limit(l: Limit) -> Value {
    match l {
        Limit::Max(n) => json!(n),
        Limit::Infinite => json!("unlimited"),
        Limit::Unavailable => Value::Null,
    }
}

fn token_json(slot: Slot, info: &TokenInfo) -> Value {
    json!({
        "slot": slot.id(),
        "initialized": info.token_initialized(),
        "label": info.label().trim_end(),
        "manufacturer": info.manufacturer_id().trim_end(),
        "model": info.model().trim_end(),
        "serial": info.serial_number().trim_end(),
        "user_pin_initialized": info.user_pin_initialized(),
        "user_pin_count_low": info.user_pin_count_low(),
        "user_pin_final_try": info.user_pin_final_try(),
        "user_pin_locked": info.user_pin_locked(),
        "so_pin_count_low": info.so_pin_count_low(),
        "so_pin_final_try": info.so_pin_final_try(),
        "so_pin_locked": info.so_pin_locked(),
        "pin_min_len": info.min_pin_length(),
        "pin_max_len": info.max_pin_length(),
        "max_sessions": limit(info.max_session_count()),
        "rng": info.rng(),
    })
}

fn pin_state(info: &TokenInfo) -> String {
    let mut s = Vec::new();
    if !info.user_pin_initialized() {
        s.push("user PIN not set");
    } else if info.user_pin_locked() {
        s.push("user PIN LOCKED");
    } else if info.user_pin_final_try() {
        s.push("user PIN: one try left");
    } else if info.user_pin_count_low() {
        s.push("user PIN: wrong PINs entered recently");
    } else {
        s.push("user PIN set");
    }
    if info.so_pin_locked() {
        s.push("SO PIN LOCKED");
    } else if info.so_pin_final_try() {
        s.push("SO PIN: one try left");
    } else if info.so_pin_count_low() {
        s.push("SO PIN: wrong PINs entered recently");
    }
    s.join(", ")
}

/// `token info`: the selected token, or every token when none is selected.
pub fn info(target: &Target) -> Result<Report> {
    let pkcs11 = target.load()?;
    let lib = pkcs11
        .get_library_info()
        .map_err(|e| ProvisionError::pkcs11(e, "reading the module's information", "user"))?;
    let list = if target.selects() {
        vec![select(&pkcs11, target)?]
    } else {
        tokens(&pkcs11)?
    };
    let mut text = format!(
        "module: {} ({} {})\n",
        target.module_name(),
        lib.manufacturer_id().trim_end(),
        lib.library_description().trim_end()
    );
    let mut items = Vec::new();
    for (slot, info) in &list {
        let mut j = token_json(*slot, info);
        if info.token_initialized() {
            text.push_str(&format!(
                "slot {}: token '{}'  manufacturer {:?}  model {:?}  serial {:?}\n  {}; PIN length {}..{}\n",
                slot.id(),
                info.label().trim_end(),
                info.manufacturer_id().trim_end(),
                info.model().trim_end(),
                info.serial_number().trim_end(),
                pin_state(info),
                info.min_pin_length(),
                info.max_pin_length(),
            ));
            match profile_for(&pkcs11, info, target) {
                Ok(p) => {
                    let missing = missing_mechanisms(&pkcs11, *slot, &p);
                    text.push_str(&format!("  profile {} ({:?})", p.name, p.algorithm));
                    if missing.is_empty() {
                        text.push_str(", mechanisms present\n");
                    } else {
                        text.push_str(&format!(", MISSING mechanisms: {}\n", missing.join(", ")));
                    }
                    j["profile"] = json!(p.name);
                    j["missing_mechanisms"] = json!(missing);
                }
                Err(e) => {
                    text.push_str(&format!("  profile: {e}\n"));
                    j["profile"] = Value::Null;
                }
            }
        } else {
            text.push_str(&format!(
                "slot {}: empty token (create one with `{}`)\n",
                slot.id(),
                crate::cli::command_for_token(None, "token init --label NAME")
            ));
        }
        items.push(j);
    }
    Ok(Report {
        json: json!({
            "module": target.module_name(),
            "library": lib.library_description().trim_end(),
            "tokens": items,
        }),
        text,
    })
}

fn missing_mechanisms(pkcs11: &Pkcs11, slot: Slot, p: &VendorProfile) -> Vec<String> {
    let mut out = Vec::new();
    for (role, code) in [
        ("keygen", p.keygen_mechanism),
        ("sign_digest", p.sign_digest_mechanism),
    ] {
        let ok = svs_hsm::keys::mechanism_type(code)
            .ok()
            .and_then(|t| pkcs11.get_mechanism_info(slot, t).ok())
            .is_some();
        if !ok {
            out.push(format!("{role} {code:#x}"));
        }
    }
    out
}

/// The slot `token init` is to initialise, after checking that `label`
/// stays unique and that an initialised token is only wiped with
/// `reinit`.
fn choose_for_init(
    pkcs11: &Pkcs11,
    target: &Target,
    label: &str,
    slot_id: Option<u64>,
    reinit: bool,
) -> Result<(Slot, TokenInfo)> {
    let all = tokens(pkcs11)?;
    let labelled: Vec<u64> = all
        .iter()
        .filter(|(_, i)| i.token_initialized() && i.label().trim_end() == label)
        .map(|(s, _)| s.id())
        .collect();
    // Wiping a token for a fresh start usually keeps its label (svsd's
    // configuration names it): with --reinit and no --slot, the token
    // holding the label is the one meant.
    let slot_id = match (slot_id, labelled.as_slice()) {
        (None, [one]) if reinit => Some(*one),
        (None, [_, _, ..]) if reinit => {
            return Err(ProvisionError::Usage(format!(
                "{} tokens are labelled '{label}'; name the one to re-initialise with --slot N. Tokens present: {}",
                labelled.len(),
                present(&all)
            )));
        }
        _ => slot_id,
    };
    if let Some(taken) = labelled.iter().find(|s| Some(**s) != slot_id) {
        let how = match slot_id {
            Some(id) => format!(
                "give slot {id} another label, or re-initialise slot {taken} itself with --slot {taken} --reinit"
            ),
            None => format!(
                "choose another label, or re-initialise that token with --reinit (or --slot {taken} --reinit)"
            ),
        };
        return Err(ProvisionError::AlreadyExists(format!(
            "a token labelled '{label}' exists already (slot {taken}); labels must be unique: {how}, which destroys every key on it. Tokens present: {}",
            present(&all)
        )));
    }
    let chosen = match slot_id {
        Some(id) => all.iter().find(|(s, _)| s.id() == id).ok_or_else(|| {
            ProvisionError::NotFound(format!(
                "slot {id} has no token; tokens present: {}",
                present(&all)
            ))
        })?,
        None => all
            .iter()
            .find(|(_, i)| !i.token_initialized())
            .ok_or_else(|| {
                ProvisionError::NotFound(format!(
                    "no empty token to initialise in {}; tokens present: {}. To wipe one, name it with --slot N --reinit",
                    target.module_name(),
                    present(&all)
                ))
            })?,
    };
    let (slot, info) = chosen;
    if info.token_initialized() && !reinit {
        return Err(ProvisionError::AlreadyExists(format!(
            "slot {} already holds token '{}'; re-initialising it destroys every key on it. If that is really wanted, add --reinit (the current SO PIN is needed)",
            slot.id(),
            info.label().trim_end()
        )));
    }
    Ok((*slot, info.clone()))
}

/// `token init`: gives an empty token (or, with `reinit`, an existing one
/// whose SO PIN is known, losing every object) a label and an SO PIN.
pub fn init(
    target: &Target,
    label: &str,
    slot_id: Option<u64>,
    reinit: bool,
    yes: bool,
    pins: &mut PinReader,
) -> Result<Report> {
    if label.is_empty() || label.len() > 32 {
        return Err(ProvisionError::Usage(
            "a token label must be 1 to 32 bytes long (PKCS#11 pads it to 32)".into(),
        ));
    }
    // PKCS#11 pads labels with spaces: "svs " would read back as "svs",
    // pass the uniqueness check below and make `--token svs` ambiguous.
    if label.ends_with(' ') {
        return Err(ProvisionError::Usage(format!(
            "a token label must not end in a space ('{label}'): PKCS#11 pads labels with spaces, so it could not be told from '{}'",
            label.trim_end()
        )));
    }
    let pkcs11 = target.load()?;
    let (slot, info) = choose_for_init(&pkcs11, target, label, slot_id, reinit)?;
    if info.token_initialized() && !yes {
        crate::pin::confirm(
            &format!(
                "Re-initialising token '{}' in slot {} DESTROYS EVERY KEY AND CERTIFICATE ON IT.",
                info.label().trim_end(),
                slot.id()
            ),
            info.label().trim_end(),
        )?;
    }
    let so_pin = if info.token_initialized() {
        // C_InitToken of an initialised token checks the current SO PIN and
        // keeps it.
        pins.current(Role::So, info.min_pin_length(), info.max_pin_length())?
    } else {
        pins.new_pin(Role::So, true, info.min_pin_length(), info.max_pin_length())?
    };
    let _changing = lock_changes()?;
    // Chosen again under the lock: while this run waited for its officer
    // (or for the lock), another may have initialised or labelled a token.
    let (again, now) = choose_for_init(&pkcs11, target, label, slot_id, reinit)?;
    if again.id() != slot.id()
        || now.token_initialized() != info.token_initialized()
        || now.label() != info.label()
    {
        return Err(ProvisionError::Cancelled(format!(
            "the tokens changed while this run waited (another run initialised one): slot {} is no longer what was chosen; nothing was changed. Run the command again",
            slot.id()
        )));
    }
    crate::progress(&format!(
        "initialising token '{label}' in slot {}…",
        slot.id()
    ));
    pkcs11
        .init_token(slot, &AuthPin::new(so_pin.as_str().into()), label)
        .map_err(|e| {
            pin_refused(
                &pkcs11,
                slot,
                e,
                &format!("initialising slot {}", slot.id()),
                Role::So,
            )
        })?;
    Ok(Report {
        text: format!(
            "token '{label}' initialised in slot {}. Next: set the user PIN with `{}`\n",
            slot.id(),
            crate::cli::command_for_token(Some(label), "pin init")
        ),
        json: json!({"token": label, "slot": slot.id(), "initialized": true}),
    })
}

/// `pin init`: the SO sets (or resets, clearing a lock) the user PIN.
pub fn pin_init(target: &Target, pins: &mut PinReader) -> Result<Report> {
    let pkcs11 = target.load()?;
    let (slot, info) = select(&pkcs11, target)?;
    let label = info.label().trim_end().to_owned();
    let session = pkcs11
        .open_rw_session(slot)
        .map_err(|e| ProvisionError::pkcs11(e, "opening a session", "SO"))?;
    let so = pins.current(Role::So, info.min_pin_length(), info.max_pin_length())?;
    login(&pkcs11, slot, &session, Role::So, &so, &label)?;
    let new = pins.new_pin(
        Role::User,
        false,
        info.min_pin_length(),
        info.max_pin_length(),
    );
    let result = new.and_then(|new| {
        // Only now: both PINs were asked for without it.
        let _changing = lock_changes()?;
        session
            .init_pin(&AuthPin::new(new.as_str().into()))
            .map_err(|e| ProvisionError::pkcs11(e, "setting the user PIN", "user"))
    });
    let _ = session.logout();
    result?;
    Ok(Report {
        text: format!("user PIN of token '{label}' set\n"),
        json: json!({"token": label, "user_pin_initialized": true}),
    })
}

/// `pin change`: the user (or, with `so`, the SO) changes their own PIN.
pub fn pin_change(target: &Target, so: bool, pins: &mut PinReader) -> Result<Report> {
    let pkcs11 = target.load()?;
    let (slot, info) = select(&pkcs11, target)?;
    let label = info.label().trim_end().to_owned();
    let role = if so { Role::So } else { Role::User };
    let session = pkcs11
        .open_rw_session(slot)
        .map_err(|e| ProvisionError::pkcs11(e, "opening a session", role.name()))?;
    let old = pins.current(role, info.min_pin_length(), info.max_pin_length())?;
    login(&pkcs11, slot, &session, role, &old, &label)?;
    let result = pins
        .new_pin(role, false, info.min_pin_length(), info.max_pin_length())
        .and_then(|new| {
            // Only now: both PINs were asked for without it.
            let _changing = lock_changes()?;
            session
                .set_pin(
                    &AuthPin::new(old.as_str().into()),
                    &AuthPin::new(new.as_str().into()),
                )
                .map_err(|e| {
                    ProvisionError::pkcs11(
                        e,
                        &format!("changing the {} PIN", role.name()),
                        role.name(),
                    )
                })
        });
    let _ = session.logout();
    result?;
    Ok(Report {
        text: format!("{} PIN of token '{label}' changed\n", role.name()),
        json: json!({"token": label, "changed": role.name()}),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn a_prompt_gives_the_change_lock_up_while_it_waits_and_takes_it_back() {
        use rustix::fs::{FlockOperation, flock};
        let euid = rustix::process::geteuid().as_raw();
        let path = lock_path(euid);
        let other = || std::fs::File::options().read(true).open(&path).unwrap();
        let held = lock_changes().unwrap();
        // Shared by a second taker in the process (a command's own step).
        let again = lock_changes().unwrap();
        drop(again);
        assert!(flock(other(), FlockOperation::NonBlockingLockExclusive).is_err());
        let free_meanwhile = released_while(|| {
            let f = other();
            let free = flock(&f, FlockOperation::NonBlockingLockExclusive).is_ok();
            let _ = flock(&f, FlockOperation::Unlock);
            free
        })
        .unwrap();
        assert!(
            free_meanwhile,
            "another run can change tokens while this one prompts"
        );
        assert!(
            flock(other(), FlockOperation::NonBlockingLockExclusive).is_err(),
            "held again after the prompt"
        );
        drop(held);
        let f = other();
        assert!(flock(&f, FlockOperation::NonBlockingLockExclusive).is_ok());
        // Without the lock, a prompt just runs.
        drop(f);
        assert_eq!(released_while(|| 7).unwrap(), 7);
    }

    #[test]
    fn the_change_lock_is_a_private_regular_file_of_the_user_running() {
        let dir = tempfile::tempdir().unwrap();
        let euid = rustix::process::geteuid().as_raw();
        let path = dir.path().join("svs-provision.lock");
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().mode() & 0o7777;

        let held = lock_at(&path, euid).unwrap();
        assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
        assert_eq!(mode(&path), 0o600);
        let other = std::fs::File::open(&path).unwrap();
        assert!(
            rustix::fs::flock(&other, rustix::fs::FlockOperation::NonBlockingLockExclusive)
                .is_err(),
            "the lock is not held"
        );
        drop(held);

        // Made by someone else (here: as if the user running were another):
        // whoever made it could hold it for ever, so it is refused by name.
        let e = lock_at(&path, euid.wrapping_add(1)).unwrap_err();
        assert_eq!(e.exit_code(), 12, "{e}");
        let e = e.to_string();
        assert!(e.contains(path.to_str().unwrap()), "{e}");
        assert!(e.contains(&format!("its owner is user {euid}")), "{e}");

        // One an older version left readable by all is made private.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(lock_at(&path, euid).unwrap());
        assert_eq!(mode(&path), 0o600);

        // A link is not followed; a directory or a pipe is no lock file.
        let link = dir.path().join("link.lock");
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), &link).unwrap();
        let e = lock_at(&link, euid).unwrap_err().to_string();
        assert!(
            e.contains("symbolic link") && e.contains("link.lock"),
            "{e}"
        );
        assert!(!dir.path().join("elsewhere").exists());
        let sub = dir.path().join("dir.lock");
        std::fs::create_dir(&sub).unwrap();
        assert!(lock_at(&sub, euid).is_err());
        let fifo = dir.path().join("fifo.lock");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let e = lock_at(&fifo, euid).unwrap_err().to_string();
        assert!(
            e.contains("not a regular file") && e.contains("fifo.lock"),
            "{e}"
        );

        // Root's is where only root can make files; another user's is
        // named by its uid.
        if Path::new("/run").is_dir() {
            assert_eq!(lock_path(0), Path::new("/run/svs-provision.lock"));
        }
        assert!(lock_path(1000).ends_with("svs-provision-1000.lock"));
    }
}
