//! Fault injection, so that the layers above can be tested against the
//! failures a real HSM produces (device errors, lost sessions, a pulled
//! token, stalls). The grammar is in docs/softtoken.md.
//!
//! Rules come from three places that are all consulted: the plan installed at
//! `C_Initialize` (config `faults` + `$SVS_SOFTTOKEN_FAULTS`) or by
//! [`install`], and the file named by `$SVS_SOFTTOKEN_FAULTS_FILE`, re-read
//! when its modification time changes. With no rules the cost per call is one
//! atomic load.

use pkcs11_sys::*;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

/// Environment variable holding fault rules, read at `C_Initialize`.
pub const FAULTS_ENV: &str = "SVS_SOFTTOKEN_FAULTS";
/// Environment variable naming a file of fault rules, watched while running.
pub const FAULTS_FILE_ENV: &str = "SVS_SOFTTOKEN_FAULTS_FILE";

/// Functions a `*` rule leaves alone: without them a client could not even
/// find the module or see that the token is gone.
const EXEMPT_FROM_WILDCARD: &[&str] = &[
    "C_Initialize",
    "C_Finalize",
    "C_GetFunctionList",
    "C_GetInterfaceList",
    "C_GetInterface",
    "C_GetInfo",
    "C_GetSlotList",
    "C_GetSlotInfo",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Fail(CK_RV),
    TokenNotPresent,
    Stall(Duration),
}

#[derive(Debug)]
struct Rule {
    function: Option<String>,
    action: Action,
    rate: f64,
    after: u64,
    count: Option<u64>,
    seen: AtomicU64,
    fired: AtomicU64,
}

/// What a fired rule asks of the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fired {
    /// Return this code without doing anything.
    Fail(CK_RV),
    /// Behave as if the token had been pulled out.
    TokenRemoved,
}

/// A parsed set of rules.
#[derive(Debug, Default)]
pub struct FaultPlan {
    rules: Vec<Rule>,
}

fn parse_action(s: &str) -> Result<Action, String> {
    let action = match s {
        "device_error" => Action::Fail(CKR_DEVICE_ERROR),
        "general_error" => Action::Fail(CKR_GENERAL_ERROR),
        "session_handle_invalid" => Action::Fail(CKR_SESSION_HANDLE_INVALID),
        "device_removed" => Action::Fail(CKR_DEVICE_REMOVED),
        "token_not_present" => Action::TokenNotPresent,
        _ => {
            if let Some(hex) = s.strip_prefix("rv=0x").or_else(|| s.strip_prefix("rv=0X")) {
                let rv = CK_RV::from_str_radix(hex, 16).map_err(|_| format!("bad rv in {s:?}"))?;
                if rv == CKR_OK {
                    return Err("rv=0x0 is not a fault".into());
                }
                Action::Fail(rv)
            } else if let Some(ms) = s.strip_prefix("stall=") {
                let ms: u64 = ms.parse().map_err(|_| format!("bad stall in {s:?}"))?;
                Action::Stall(Duration::from_millis(ms))
            } else {
                return Err(format!("unknown fault action {s:?}"));
            }
        }
    };
    Ok(action)
}

impl FaultPlan {
    /// Parses rules; an empty or blank spec is an empty plan.
    pub fn parse(spec: &str) -> Result<FaultPlan, String> {
        let mut rules = Vec::new();
        for text in spec.split(';').map(str::trim).filter(|r| !r.is_empty()) {
            let mut parts = text.splitn(3, ':');
            let function = parts.next().unwrap_or_default().trim();
            let action = parts
                .next()
                .ok_or_else(|| format!("rule {text:?} has no action"))?;
            if function.is_empty() || !(function == "*" || function.starts_with("C_")) {
                return Err(format!("rule {text:?}: function must be C_... or *"));
            }
            let mut rule = Rule {
                function: (function != "*").then(|| function.to_string()),
                action: parse_action(action.trim())?,
                rate: 1.0,
                after: 0,
                count: None,
                seen: AtomicU64::new(0),
                fired: AtomicU64::new(0),
            };
            for trigger in parts
                .next()
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
            {
                let (key, value) = trigger
                    .split_once('=')
                    .ok_or_else(|| format!("trigger {trigger:?} is not key=value"))?;
                let bad = || format!("bad value in trigger {trigger:?}");
                match key {
                    "rate" => {
                        rule.rate = value.parse().map_err(|_| bad())?;
                        if !(0.0..=1.0).contains(&rule.rate) {
                            return Err(bad());
                        }
                    }
                    "after" => rule.after = value.parse().map_err(|_| bad())?,
                    "count" => rule.count = Some(value.parse().map_err(|_| bad())?),
                    _ => return Err(format!("unknown trigger {key:?}")),
                }
            }
            rules.push(rule);
        }
        Ok(FaultPlan { rules })
    }

    fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Applies the plan to one call: stalls inline, returns a failure to
    /// report, and tells whether a token-removal rule matched at all.
    fn apply(&self, function: &str) -> (Option<Fired>, bool) {
        let mut removal_matched = false;
        for rule in &self.rules {
            let matches = match &rule.function {
                Some(f) => f == function,
                None => !EXEMPT_FROM_WILDCARD.contains(&function),
            };
            if !matches {
                continue;
            }
            let seen = rule.seen.fetch_add(1, Ordering::Relaxed) + 1;
            if seen <= rule.after {
                continue;
            }
            if let Some(count) = rule.count {
                if rule.fired.load(Ordering::Relaxed) >= count {
                    continue;
                }
            }
            if rule.rate < 1.0 && next_unit_random() >= rule.rate {
                continue;
            }
            rule.fired.fetch_add(1, Ordering::Relaxed);
            match rule.action {
                Action::Stall(d) => std::thread::sleep(d),
                Action::Fail(rv) => return (Some(Fired::Fail(rv)), removal_matched),
                Action::TokenNotPresent => {
                    removal_matched = true;
                    return (Some(Fired::TokenRemoved), removal_matched);
                }
            }
        }
        (None, removal_matched)
    }
}

/// A cheap, non-cryptographic generator for fault rates; seeded once from
/// the OS so that runs differ.
fn next_unit_random() -> f64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let mut x = STATE.load(Ordering::Relaxed);
    if x == 0 {
        x = getrandom::u64().unwrap_or(0x9E37_79B9_7F4A_7C15) | 1;
    }
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    STATE.store(x, Ordering::Relaxed);
    (x >> 11) as f64 / (1u64 << 53) as f64
}

struct WatchedFile {
    path: PathBuf,
    modified: Option<SystemTime>,
    last_check: Instant,
    plan: Arc<FaultPlan>,
}

static ACTIVE: AtomicBool = AtomicBool::new(false);
static PLAN: RwLock<Option<Arc<FaultPlan>>> = RwLock::new(None);
static WATCHED: Mutex<Option<WatchedFile>> = Mutex::new(None);
static TOKEN_REMOVED: AtomicBool = AtomicBool::new(false);

/// How often the watched file's modification time is looked at.
const FILE_POLL: Duration = Duration::from_millis(20);

fn refresh_active() {
    let plan = PLAN.read().map(|p| p.is_some()).unwrap_or(false);
    let file = WATCHED.lock().map(|w| w.is_some()).unwrap_or(false);
    ACTIVE.store(plan || file, Ordering::Release);
}

/// Replaces the in-process plan (the rlib's API for tests).
pub fn install(spec: &str) -> Result<(), String> {
    let plan = FaultPlan::parse(spec)?;
    if let Ok(mut guard) = PLAN.write() {
        *guard = (!plan.is_empty()).then(|| Arc::new(plan));
    }
    refresh_active();
    Ok(())
}

/// Removes the in-process plan.
pub fn clear() {
    if let Ok(mut guard) = PLAN.write() {
        *guard = None;
    }
    TOKEN_REMOVED.store(false, Ordering::Release);
    refresh_active();
}

/// Sets up the plan at `C_Initialize` from the config and the environment.
pub(crate) fn initialise(config_rules: &str) -> Result<(), String> {
    let env_rules = std::env::var(FAULTS_ENV).unwrap_or_default();
    install(&format!("{config_rules};{env_rules}"))?;
    let watched = std::env::var_os(FAULTS_FILE_ENV).map(|path| WatchedFile {
        path: PathBuf::from(path),
        modified: None,
        last_check: Instant::now() - FILE_POLL * 2,
        plan: Arc::new(FaultPlan::default()),
    });
    if let Ok(mut guard) = WATCHED.lock() {
        *guard = watched;
    }
    TOKEN_REMOVED.store(false, Ordering::Release);
    refresh_active();
    Ok(())
}

fn watched_plan() -> Option<Arc<FaultPlan>> {
    let mut guard = WATCHED.lock().ok()?;
    let watched = guard.as_mut()?;
    if watched.last_check.elapsed() >= FILE_POLL {
        watched.last_check = Instant::now();
        let modified = std::fs::metadata(&watched.path)
            .and_then(|m| m.modified())
            .ok();
        if modified != watched.modified {
            watched.modified = modified;
            let text = std::fs::read_to_string(&watched.path).unwrap_or_default();
            // A half-written or invalid file means "no faults", never a crash.
            watched.plan = Arc::new(FaultPlan::parse(&text).unwrap_or_default());
        }
    }
    Some(watched.plan.clone())
}

/// Consults every rule for one call of `function`.
pub(crate) fn check(function: &str) -> Option<Fired> {
    if !ACTIVE.load(Ordering::Acquire) {
        return None;
    }
    let mut removal_matched = false;
    let mut result = None;
    let plans = [PLAN.read().ok().and_then(|p| p.clone()), watched_plan()];
    for plan in plans.iter().flatten() {
        let (fired, removal) = plan.apply(function);
        removal_matched |= removal;
        if fired.is_some() {
            result = fired;
            break;
        }
    }
    let counts_for_presence = !EXEMPT_FROM_WILDCARD.contains(&function);
    if counts_for_presence {
        TOKEN_REMOVED.store(removal_matched, Ordering::Release);
    }
    result
}

/// Whether a token-removal rule fired on the latest call it saw.
pub(crate) fn token_removed() -> bool {
    ACTIVE.load(Ordering::Acquire) && TOKEN_REMOVED.load(Ordering::Acquire)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let plan = FaultPlan::parse("C_Sign:device_error:after=100,count=3;*:stall=200:rate=0.01")
            .unwrap();
        assert_eq!(plan.rules.len(), 2);
        assert_eq!(plan.rules[0].action, Action::Fail(CKR_DEVICE_ERROR));
        assert_eq!(plan.rules[0].after, 100);
        assert_eq!(plan.rules[0].count, Some(3));
        assert_eq!(plan.rules[1].function, None);
        assert_eq!(
            plan.rules[1].action,
            Action::Stall(Duration::from_millis(200))
        );
    }

    #[test]
    fn rejects_nonsense() {
        for bad in [
            "C_Sign",
            "C_Sign:explode",
            "Sign:device_error",
            "C_Sign:device_error:rate=2",
            "C_Sign:device_error:often=1",
            "C_Sign:rv=0x0",
        ] {
            assert!(FaultPlan::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn after_and_count_bound_the_firing() {
        let plan = FaultPlan::parse("C_Sign:rv=0x30:after=2,count=2").unwrap();
        let fired: Vec<bool> = (0..6).map(|_| plan.apply("C_Sign").0.is_some()).collect();
        assert_eq!(fired, [false, false, true, true, false, false]);
        assert_eq!(plan.apply("C_Verify").0, None);
    }

    #[test]
    fn wildcard_spares_discovery_functions() {
        let plan = FaultPlan::parse("*:device_error").unwrap();
        assert_eq!(plan.apply("C_GetSlotList").0, None);
        assert_eq!(plan.apply("C_Sign").0, Some(Fired::Fail(CKR_DEVICE_ERROR)));
    }
}
