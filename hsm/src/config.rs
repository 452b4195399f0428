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
        toml::from_str(text).map_err(|e| HsmError::Config(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
