//! PKCS#11 URIs (RFC 7512), e.g. `pkcs11:token=svs;object=nia-auth?pin-source=file:/run/pin`.

use crate::error::{HsmError, Result};

/// The attributes of a PKCS#11 URI this crate acts on. Values are
/// percent-decoded bytes where the RFC allows binary (id) and strings elsewhere.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Pkcs11Uri {
    /// `token` (CK_TOKEN_INFO.label).
    pub token: Option<String>,
    /// `manufacturer` (CK_TOKEN_INFO.manufacturerID).
    pub manufacturer: Option<String>,
    /// `serial` (CK_TOKEN_INFO.serialNumber).
    pub serial: Option<String>,
    /// `model` (CK_TOKEN_INFO.model).
    pub model: Option<String>,
    /// `slot-id`.
    pub slot_id: Option<u64>,
    /// `library-manufacturer` (CK_INFO.manufacturerID).
    pub library_manufacturer: Option<String>,
    /// `library-description` (CK_INFO.libraryDescription).
    pub library_description: Option<String>,
    /// `object` (CKA_LABEL).
    pub object: Option<String>,
    /// `id` (CKA_ID).
    pub id: Option<Vec<u8>>,
    /// `type` (private, public, cert …).
    pub object_type: Option<String>,
    /// `module-path` query attribute.
    pub module_path: Option<String>,
    /// `pin-source` query attribute (a file path or `file:` URI).
    pub pin_source: Option<String>,
    /// Whether the URI carried `pin-value`, which this crate refuses to use:
    /// a PIN in a URI ends up in config files and logs.
    pub has_pin_value: bool,
}

// A URI can carry pin-source paths and object names but never a PIN value
// (only the flag is kept), so Debug may show everything it holds.
impl std::fmt::Debug for Pkcs11Uri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Pkcs11Uri {
    /// Parses a `pkcs11:` URI.
    pub fn parse(uri: &str) -> Result<Pkcs11Uri> {
        let bad = |why: String| HsmError::Config(format!("PKCS#11 URI: {why}"));
        let rest = uri
            .strip_prefix("pkcs11:")
            .ok_or_else(|| bad("must start with `pkcs11:`".into()))?;
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        let mut out = Pkcs11Uri::default();
        let mut seen = Vec::new();
        for attr in path.split(';').filter(|a| !a.is_empty()) {
            let (name, value) = attr
                .split_once('=')
                .ok_or_else(|| bad(format!("attribute {attr:?} has no value")))?;
            if seen.contains(&name) {
                return Err(bad(format!("attribute {name:?} repeated")));
            }
            seen.push(name);
            let bytes = percent_decode(value).map_err(&bad)?;
            let text = || {
                String::from_utf8(bytes.clone()).map_err(|_| bad(format!("{name} is not UTF-8")))
            };
            match name {
                "token" => out.token = Some(text()?),
                "manufacturer" => out.manufacturer = Some(text()?),
                "serial" => out.serial = Some(text()?),
                "model" => out.model = Some(text()?),
                "library-manufacturer" => out.library_manufacturer = Some(text()?),
                "library-description" => out.library_description = Some(text()?),
                "object" => out.object = Some(text()?),
                "type" => out.object_type = Some(text()?),
                "id" => out.id = Some(bytes),
                "slot-id" => {
                    out.slot_id = Some(
                        text()?
                            .parse()
                            .map_err(|_| bad(format!("slot-id {value:?} is not a number")))?,
                    )
                }
                // Attributes that narrow nothing this crate can check are accepted and ignored.
                "library-version" | "slot-description" | "slot-manufacturer" => {}
                n if n.starts_with("x-") => {}
                n => return Err(bad(format!("unknown path attribute {n:?}"))),
            }
        }
        for attr in query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|a| !a.is_empty())
        {
            let (name, value) = attr
                .split_once('=')
                .ok_or_else(|| bad("query attribute without value".into()))?;
            let decoded = || {
                percent_decode(value).map_err(&bad).and_then(|b| {
                    String::from_utf8(b).map_err(|_| bad(format!("{name} is not UTF-8")))
                })
            };
            match name {
                "module-path" => out.module_path = Some(decoded()?),
                "pin-source" => out.pin_source = Some(decoded()?),
                "pin-value" => out.has_pin_value = true,
                "module-name" => {}
                n if n.starts_with("x-") => {}
                n => return Err(bad(format!("unknown query attribute {n:?}"))),
            }
        }
        Ok(out)
    }

    /// Whether the URI says anything about which token to use.
    pub fn selects_token(&self) -> bool {
        self.token.is_some()
            || self.serial.is_some()
            || self.manufacturer.is_some()
            || self.model.is_some()
            || self.slot_id.is_some()
    }

    /// A description for error messages and logs.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        let mut push = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                parts.push(format!("{k}={v}"));
            }
        };
        push("token", &self.token);
        push("manufacturer", &self.manufacturer);
        push("serial", &self.serial);
        push("model", &self.model);
        push("object", &self.object);
        push("type", &self.object_type);
        push("module-path", &self.module_path);
        push("pin-source", &self.pin_source);
        if let Some(s) = self.slot_id {
            parts.push(format!("slot-id={s}"));
        }
        if let Some(id) = &self.id {
            parts.push(format!("id={}", crate::keys::hex(id)));
        }
        format!("pkcs11:{}", parts.join(";"))
    }
}

fn percent_decode(s: &str) -> std::result::Result<Vec<u8>, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .ok_or_else(|| format!("truncated escape in {s:?}"))?;
            let hex = std::str::from_utf8(hex).map_err(|_| format!("bad escape in {s:?}"))?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("bad escape in {s:?}"))?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rfc7512_examples() {
        let u = Pkcs11Uri::parse("pkcs11:token=svs;object=nia-auth").unwrap();
        assert_eq!(u.token.as_deref(), Some("svs"));
        assert_eq!(u.object.as_deref(), Some("nia-auth"));
        assert!(u.selects_token());

        let u = Pkcs11Uri::parse(
            "pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;manufacturer=Snake%20Oil,%20Inc.;\
             model=1.0;object=my-certificate;type=cert;id=%69%95%3E%5C%F4%BD%EC%91;serial=\
             ?pin-source=file:/etc/token_pin&module-path=/usr/lib/libfoo.so",
        )
        .unwrap();
        assert_eq!(u.token.as_deref(), Some("The Software PKCS#11 Softtoken"));
        assert_eq!(u.manufacturer.as_deref(), Some("Snake Oil, Inc."));
        assert_eq!(
            u.id.as_deref(),
            Some(&[0x69, 0x95, 0x3e, 0x5c, 0xf4, 0xbd, 0xec, 0x91][..])
        );
        assert_eq!(u.serial.as_deref(), Some(""));
        assert_eq!(u.pin_source.as_deref(), Some("file:/etc/token_pin"));
        assert_eq!(u.module_path.as_deref(), Some("/usr/lib/libfoo.so"));
        assert_eq!(u.object_type.as_deref(), Some("cert"));

        let u = Pkcs11Uri::parse("pkcs11:slot-id=3;x-vendor=1?pin-value=1234").unwrap();
        assert_eq!(u.slot_id, Some(3));
        assert!(u.has_pin_value);
        assert!(!u.describe().contains("1234"));
        assert!(Pkcs11Uri::parse("pkcs11:").unwrap() == Pkcs11Uri::default());
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "pkcs:token=a",
            "pkcs11:token",
            "pkcs11:token=a;token=b",
            "pkcs11:tokn=a",
            "pkcs11:token=%4",
            "pkcs11:token=%zz",
            "pkcs11:slot-id=x",
            "pkcs11:token=a?bogus=1",
            "pkcs11:token=%ff",
        ] {
            assert!(Pkcs11Uri::parse(bad).is_err(), "{bad}");
        }
    }
}
