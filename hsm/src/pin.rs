//! Where the user PIN comes from. The PIN itself only ever lives in
//! `Zeroizing` buffers; nothing here formats it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::{HsmError, Result};

/// A source of the user PIN.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PinSource {
    /// A file holding the PIN (one trailing newline is ignored).
    File(PathBuf),
    /// A systemd credential: `$CREDENTIALS_DIRECTORY/<name>`
    /// (`LoadCredential=` / `LoadCredentialEncrypted=` in the unit).
    Credential(String),
}

/// Every way `pin` can be wrong gets this one message. serde's own errors
/// repeat the value (`unknown variant \`1234\``, `invalid type: integer
/// \`1234\``), and the one value an officer is likely to put there by
/// mistake is the PIN itself.
const PIN_SHAPE: &str = "`pin` must say where the PIN is: { file = \"/path\" } or { credential = \"name\" }; the PIN itself never goes into the configuration (the value given is not repeated here)";

impl<'de> Deserialize<'de> for PinSource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename_all = "kebab-case")]
        enum Tagged {
            File(PathBuf),
            Credential(String),
        }
        // Through a toml value, whatever the deserializer: no error of
        // the inner parse can carry the value out.
        let value = toml::Value::deserialize(d).map_err(|_| serde::de::Error::custom(PIN_SHAPE))?;
        match Tagged::deserialize(value) {
            Ok(Tagged::File(p)) => Ok(PinSource::File(p)),
            Ok(Tagged::Credential(c)) => Ok(PinSource::Credential(c)),
            Err(_) => Err(serde::de::Error::custom(PIN_SHAPE)),
        }
    }
}

impl PinSource {
    /// Interprets an RFC 7512 `pin-source` value: a `file:` URI or a path.
    pub fn from_uri_value(value: &str) -> PinSource {
        let path = value
            .strip_prefix("file://")
            .or_else(|| value.strip_prefix("file:"))
            .unwrap_or(value);
        PinSource::File(PathBuf::from(path))
    }

    /// Reads the PIN.
    pub fn read(&self) -> Result<Zeroizing<String>> {
        match self {
            PinSource::File(path) => read_pin_file(path),
            PinSource::Credential(name) => {
                let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
                    HsmError::PinSource(format!(
                        "credential {name:?}: $CREDENTIALS_DIRECTORY is not set (is the service started with LoadCredential=?)"
                    ))
                })?;
                read_credential(Path::new(&dir), name)
            }
        }
    }
}

/// Reads credential `name` from a credentials directory.
pub fn read_credential(dir: &Path, name: &str) -> Result<Zeroizing<String>> {
    // A name with a separator would let config reach outside the directory.
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(HsmError::PinSource(format!(
            "invalid credential name {name:?}"
        )));
    }
    read_pin_file(&dir.join(name))
}

fn read_pin_file(path: &Path) -> Result<Zeroizing<String>> {
    let bytes = Zeroizing::new(
        std::fs::read(path)
            .map_err(|e| HsmError::PinSource(format!("cannot read {}: {e}", path.display())))?,
    );
    let mut text = Zeroizing::new(
        std::str::from_utf8(&bytes)
            .map_err(|_| HsmError::PinSource(format!("{} is not UTF-8", path.display())))?
            .to_owned(),
    );
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    if text.is_empty() {
        return Err(HsmError::PinSource(format!("{} is empty", path.display())));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_file_and_credential_without_leaking() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pin"), "s3cret-pin\n").unwrap();
        let pin = PinSource::File(dir.path().join("pin")).read().unwrap();
        assert_eq!(pin.as_str(), "s3cret-pin");
        let pin = read_credential(dir.path(), "pin").unwrap();
        assert_eq!(pin.as_str(), "s3cret-pin");
        assert!(read_credential(dir.path(), "../pin").is_err());

        std::fs::write(dir.path().join("bad"), [0xff, 0xfe]).unwrap();
        let e = PinSource::File(dir.path().join("bad")).read().unwrap_err();
        assert!(!format!("{e} {e:?}").contains('\u{fffd}'));
        std::fs::write(dir.path().join("empty"), "\n").unwrap();
        assert!(PinSource::File(dir.path().join("empty")).read().is_err());
        let missing = PinSource::File(dir.path().join("nope")).read().unwrap_err();
        assert!(missing.to_string().contains("nope"));
    }

    #[test]
    fn uri_pin_source() {
        assert_eq!(
            PinSource::from_uri_value("file:/run/pin"),
            PinSource::File("/run/pin".into())
        );
        assert_eq!(
            PinSource::from_uri_value("/run/pin"),
            PinSource::File("/run/pin".into())
        );
    }
}
