//! The `[hsm]` configuration section.

use serde::{Deserialize, Serialize};

use crate::error::{HsmError, Result};
use crate::pin::PinSource;
use crate::pool::PoolConfig;
use crate::profile::ProfileOverride;
use crate::token::ModuleSource;

/// Everything needed to open the HSM layer.
///
/// ```toml
/// module = { path = "/usr/lib/softhsm/libsofthsm2.so" }   # or "embedded"
/// uri = "pkcs11:token=svs"                                # or token_label / token_serial
/// pin = { credential = "svs-hsm-pin" }                    # or { file = "/etc/svs/pin" }
/// profile = "auto"                                        # or a profile name
/// verify_after_sign = false
/// [pool]
/// size = 2
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HsmConfig {
    /// PKCS#11 module; the embedded soft token when absent.
    #[serde(default)]
    pub module: ModuleSource,
    /// CK_TOKEN_INFO.label of the token.
    #[serde(default)]
    pub token_label: Option<String>,
    /// CK_TOKEN_INFO.serialNumber of the token.
    #[serde(default)]
    pub token_serial: Option<String>,
    /// RFC 7512 URI selecting the token (and optionally module and PIN source).
    #[serde(default)]
    pub uri: Option<String>,
    /// Where the user PIN comes from; the URI's `pin-source` otherwise.
    #[serde(default)]
    pub pin: Option<PinSource>,
    /// Profile name, or `"auto"` to recognise the vendor.
    #[serde(default = "auto")]
    pub profile: String,
    /// Profile overrides and additions, applied in order.
    #[serde(default)]
    pub profiles: Vec<ProfileOverride>,
    /// Session pool.
    #[serde(default)]
    pub pool: PoolConfig,
    /// Verify each HSM signature in software before returning it. Catches
    /// faulty hardware, but software SM2 verification is slower than
    /// signing (it cuts throughput to about a third), hence off by default.
    #[serde(default)]
    pub verify_after_sign: bool,
    /// SM2 distinguishing ID used when a caller gives none.
    #[serde(default = "default_id")]
    pub default_sm2_id: String,
}

fn auto() -> String {
    "auto".into()
}
fn default_id() -> String {
    "1234567812345678".into()
}

impl Default for HsmConfig {
    fn default() -> Self {
        HsmConfig {
            module: ModuleSource::Embedded,
            token_label: None,
            token_serial: None,
            uri: None,
            pin: None,
            profile: auto(),
            profiles: Vec::new(),
            pool: PoolConfig::default(),
            verify_after_sign: false,
            default_sm2_id: default_id(),
        }
    }
}

impl HsmConfig {
    /// Parses the TOML of the section.
    pub fn from_toml(text: &str) -> Result<HsmConfig> {
        // The message only: toml's Display quotes the offending line, which
        // may be a `pin = "<the PIN>"` an officer wrote by mistake.
        toml::from_str(text).map_err(|e: toml::de::Error| HsmError::Config(e.message().to_owned()))
    }

    /// Everything wrong with the section that can be told without loading
    /// the module, reading the PIN or logging in, each as one line: what
    /// [`crate::Hsm::open`] would otherwise find only at start-up.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let uri = match self
            .uri
            .as_deref()
            .map(crate::uri::Pkcs11Uri::parse)
            .transpose()
        {
            Ok(uri) => uri,
            Err(e) => {
                out.push(format!("uri: {e}"));
                None
            }
        };
        if uri.as_ref().is_some_and(|u| u.has_pin_value) {
            out.push("uri carries pin-value: use pin-source or `pin` instead".into());
        }
        if self.pin.is_none() && uri.as_ref().is_none_or(|u| u.pin_source.is_none()) {
            out.push("no PIN source: set `pin` or the URI's pin-source".into());
        }
        match crate::profile::ProfileTable::with_overrides(&self.profiles) {
            Ok(table) => {
                if self.profile != "auto" && table.get(&self.profile).is_none() {
                    out.push(format!("profile {:?} is not known", self.profile));
                }
            }
            Err(e) => out.push(format!("profiles: {e}")),
        }
        if self.pool.size == 0 || self.pool.queue_depth == 0 {
            out.push("pool size and queue_depth must be at least 1".into());
        }
        if self.pool.op_timeout_ms == 0 {
            out.push("pool op_timeout_ms must be > 0".into());
        }
        if self.default_sm2_id.is_empty() || self.default_sm2_id.len() > 8191 {
            out.push("default_sm2_id must be 1-8191 bytes".into());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_are_found_without_the_module() {
        assert!(
            HsmConfig {
                pin: Some(PinSource::File("/run/pin".into())),
                ..HsmConfig::default()
            }
            .problems()
            .is_empty()
        );
        let bad = HsmConfig::from_toml(
            "uri = \"pkcs11:token=x;pin-value=1234\"\nprofile = \"nonesuch\"\n[pool]\nsize = 0\n",
        )
        .unwrap();
        let all = bad.problems().join("\n");
        for needle in [
            "pin-value",
            "no PIN source",
            "\"nonesuch\" is not known",
            "pool size",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in {all}");
        }
        assert!(
            !all.contains("1234"),
            "the PIN itself is never echoed: {all}"
        );
    }

    #[test]
    fn a_pin_written_into_the_configuration_is_refused_without_repeating_it() {
        for pin in [
            "\"s3cret-9876\"",
            "98769876",
            "{ file = 98769876 }",
            "{ value = \"s3cret-9876\" }",
            "[\"s3cret-9876\"]",
        ] {
            let text = format!("module = \"embedded\"\npin = {pin}\n");
            let e = HsmConfig::from_toml(&text).unwrap_err().to_string();
            assert!(e.contains("`pin` must say where the PIN is"), "{pin}: {e}");
            assert!(!e.contains("9876"), "{pin}: the value is echoed: {e}");
        }
    }

    #[test]
    fn parses_every_form() {
        let c = HsmConfig::from_toml(
            r#"
            module = { path = "/usr/lib/softhsm/libsofthsm2.so" }
            uri = "pkcs11:token=svs"
            pin = { credential = "svs-pin" }
            profile = "ecdsa-p256"
            [pool]
            size = 4
            [[profiles]]
            base = "sansec"
            signature_encoding = "der"
            "#,
        )
        .unwrap();
        assert_eq!(
            c.module,
            ModuleSource::Path("/usr/lib/softhsm/libsofthsm2.so".into())
        );
        assert_eq!(c.pin, Some(PinSource::Credential("svs-pin".into())));
        assert_eq!(c.pool.size, 4);
        assert_eq!(c.pool.queue_depth, PoolConfig::default().queue_depth);
        assert!(!c.verify_after_sign);
        let c =
            HsmConfig::from_toml("module = \"embedded\"\npin = { file = \"/run/pin\" }").unwrap();
        assert_eq!(c.module, ModuleSource::Embedded);
        assert_eq!(c.profile, "auto");
        assert!(HsmConfig::from_toml("bogus = 1").is_err());
    }
}
