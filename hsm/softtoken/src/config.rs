//! Token configuration: raw TOML → validated [`Config`].

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Where the configuration is looked for when nothing names a file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/svs/softtoken.toml";
/// The environment variable naming the configuration file.
pub const CONFIG_ENV: &str = "SVS_SOFTTOKEN_CONF";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    store_dir: Option<PathBuf>,
    slots: Option<u64>,
    pin_min_len: Option<u64>,
    pin_max_len: Option<u64>,
    max_login_failures: Option<u64>,
    kdf_iterations: Option<u64>,
    faults: Option<String>,
}

/// A validated token configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub store_dir: PathBuf,
    pub slots: usize,
    pub pin_min_len: usize,
    pub pin_max_len: usize,
    pub max_login_failures: u32,
    pub kdf_iterations: u32,
    pub faults: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            store_dir: PathBuf::from("/var/lib/svs/softtoken"),
            slots: 4,
            pin_min_len: 4,
            pin_max_len: 64,
            max_login_failures: 5,
            kdf_iterations: 200_000,
            faults: String::new(),
        }
    }
}

fn in_range(
    errors: &mut Vec<String>,
    name: &str,
    value: Option<u64>,
    range: std::ops::RangeInclusive<u64>,
    default: u64,
) -> u64 {
    match value {
        None => default,
        Some(v) if range.contains(&v) => v,
        Some(v) => {
            errors.push(format!(
                "{name} = {v} is out of range {}..={}",
                range.start(),
                range.end()
            ));
            default
        }
    }
}

impl Config {
    /// Parses and validates a configuration text; every problem is reported
    /// at once, one per line.
    pub fn parse(text: &str) -> Result<Config, String> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        let d = Config::default();
        let mut errors = Vec::new();
        let slots = in_range(&mut errors, "slots", raw.slots, 1..=64, d.slots as u64);
        let pin_max_len = in_range(
            &mut errors,
            "pin_max_len",
            raw.pin_max_len,
            1..=255,
            d.pin_max_len as u64,
        );
        let pin_min_len = in_range(
            &mut errors,
            "pin_min_len",
            raw.pin_min_len,
            1..=255,
            d.pin_min_len as u64,
        );
        if pin_min_len > pin_max_len {
            errors.push(format!(
                "pin_min_len = {pin_min_len} is greater than pin_max_len = {pin_max_len}"
            ));
        }
        let max_login_failures = in_range(
            &mut errors,
            "max_login_failures",
            raw.max_login_failures,
            1..=100,
            d.max_login_failures.into(),
        );
        let kdf_iterations = in_range(
            &mut errors,
            "kdf_iterations",
            raw.kdf_iterations,
            1000..=10_000_000,
            d.kdf_iterations.into(),
        );
        let store_dir = raw.store_dir.unwrap_or(d.store_dir);
        if store_dir.as_os_str().is_empty() {
            errors.push("store_dir is empty".to_string());
        }
        let faults = raw.faults.unwrap_or_default();
        if let Err(e) = crate::faults::FaultPlan::parse(&faults) {
            errors.push(format!("faults: {e}"));
        }
        if !errors.is_empty() {
            return Err(errors.join("; "));
        }
        Ok(Config {
            store_dir,
            slots: slots as usize,
            pin_min_len: pin_min_len as usize,
            pin_max_len: pin_max_len as usize,
            max_login_failures: max_login_failures as u32,
            kdf_iterations: kdf_iterations as u32,
            faults,
        })
    }

    /// Reads a configuration file.
    pub fn load(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Config::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The configuration `C_Initialize` uses: the in-process override, else
    /// `$SVS_SOFTTOKEN_CONF`, else the default path if it exists, else the
    /// defaults.
    pub fn discover() -> Result<Config, String> {
        let overridden = CONFIG_OVERRIDE
            .lock()
            .map_err(|_| "config override lock poisoned".to_string())?
            .clone();
        if let Some(path) = overridden {
            return Config::load(&path);
        }
        if let Some(path) = std::env::var_os(CONFIG_ENV) {
            return Config::load(Path::new(&path));
        }
        let default = Path::new(DEFAULT_CONFIG_PATH);
        if default.exists() {
            return Config::load(default);
        }
        Ok(Config::default())
    }
}

static CONFIG_OVERRIDE: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Names the configuration file the next `C_Initialize` of this process
/// reads, ahead of `$SVS_SOFTTOKEN_CONF`. For programs that link the token
/// in (the embedded default), where setting the environment is not an option.
pub fn set_config_path(path: Option<PathBuf>) {
    if let Ok(mut guard) = CONFIG_OVERRIDE.lock() {
        *guard = path;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let err = Config::parse("slots = 0\npin_min_len = 9\npin_max_len = 8\nkdf_iterations = 5")
            .unwrap_err();
        assert!(err.contains("slots = 0"), "{err}");
        assert!(err.contains("pin_min_len = 9 is greater"), "{err}");
        assert!(err.contains("kdf_iterations = 5"), "{err}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Config::parse("slot = 3").unwrap_err();
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn bad_fault_rules_are_rejected() {
        let err = Config::parse("faults = \"C_Sign:explode\"").unwrap_err();
        assert!(err.contains("faults"), "{err}");
    }
}
