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
/// load the module.
const EXEMPT_FROM_WILDCARD: &[&str] = &[
    "C_Initialize",
    "C_Finalize",
    "C_GetFunctionList",
    "C_GetInterfaceList",
    "C_GetInterface",
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
    /// Whether the latest matching call fired (token presence for rules
    /// that fire at a rate).
    last_fired: AtomicBool,
}

impl Rule {
    fn spent(&self) -> bool {
        self.count
            .is_some_and(|c| self.fired.load(Ordering::Relaxed) >= c)
    }

    /// A removal rule keeps the token out from its first firing until it is
    /// spent (or, at a rate below 1, while its latest call fired).
    fn holds_token_out(&self) -> bool {
        self.action == Action::TokenNotPresent
            && self.fired.load(Ordering::Relaxed) > 0
            && !self.spent()
            && (self.rate >= 1.0 || self.last_fired.load(Ordering::Relaxed))
    }
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
                last_fired: AtomicBool::new(false),
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

    /// Applies the plan to one call: stalls inline, and returns what the
    /// first firing failure rule asks for.
    fn apply(&self, function: &str) -> Option<Fired> {
        for rule in &self.rules {
            let matches = match &rule.function {
                Some(f) => f == function,
                None => !EXEMPT_FROM_WILDCARD.contains(&function),
            };
            if !matches {
                continue;
            }
            let seen = rule.seen.fetch_add(1, Ordering::Relaxed) + 1;
            let fire = seen > rule.after
                && !rule.spent()
                && (rule.rate >= 1.0 || next_unit_random() < rule.rate);
            rule.last_fired.store(fire, Ordering::Relaxed);
            if !fire {
                continue;
            }
            rule.fired.fetch_add(1, Ordering::Relaxed);
            match rule.action {
                Action::Stall(d) => std::thread::sleep(d),
                Action::Fail(rv) => return Some(Fired::Fail(rv)),
                Action::TokenNotPresent => return Some(Fired::TokenRemoved),
            }
        }
        None
    }

    fn holds_token_out(&self) -> bool {
        self.rules.iter().any(Rule::holds_token_out)
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

fn plans() -> [Option<Arc<FaultPlan>>; 2] {
    [PLAN.read().ok().and_then(|p| p.clone()), watched_plan()]
}

/// Consults every rule for one call of `function`.
pub(crate) fn check(function: &str) -> Option<Fired> {
    if !ACTIVE.load(Ordering::Acquire) {
        return None;
    }
    plans()
        .iter()
        .flatten()
        .find_map(|plan| plan.apply(function))
}

/// Whether a token-removal rule keeps the token out right now.
pub(crate) fn token_removed() -> bool {
    ACTIVE.load(Ordering::Acquire) && plans().iter().flatten().any(|p| p.holds_token_out())
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
        let fired: Vec<bool> = (0..6).map(|_| plan.apply("C_Sign").is_some()).collect();
        assert_eq!(fired, [false, false, true, true, false, false]);
        assert_eq!(plan.apply("C_Verify"), None);
    }

    #[test]
    fn wildcard_spares_only_loading_functions() {
        let plan = FaultPlan::parse("*:device_error").unwrap();
        assert_eq!(plan.apply("C_GetFunctionList"), None);
        assert_eq!(
            plan.apply("C_GetSlotList"),
            Some(Fired::Fail(CKR_DEVICE_ERROR))
        );
        assert_eq!(plan.apply("C_Sign"), Some(Fired::Fail(CKR_DEVICE_ERROR)));
    }

    #[test]
    fn removal_holds_until_spent() {
        let plan = FaultPlan::parse("C_Sign:token_not_present:count=2").unwrap();
        assert!(!plan.holds_token_out());
        assert_eq!(plan.apply("C_Sign"), Some(Fired::TokenRemoved));
        assert!(plan.holds_token_out());
        assert_eq!(plan.apply("C_Sign"), Some(Fired::TokenRemoved));
        assert!(!plan.holds_token_out());
        assert_eq!(plan.apply("C_Sign"), None);
    }
}
