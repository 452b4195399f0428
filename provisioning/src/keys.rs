//! Signing keys on the token: generate, list, show, export the public key,
//! delete. Keys are found the way svs-hsm finds them (CKA_LABEL names the
//! key; private key, public key and certificate share a CKA_ID), so what
//! this tool makes is what svsd serves.

use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState};
use der::Decode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use svs_hsm::keys::{hex, key_pair_templates, key_type, mechanism, spki_for_point};
use svs_hsm::{Algorithm, VendorProfile};
use x509_cert::Certificate;

use crate::Report;
use crate::error::{ProvisionError, Result};
use crate::pin::PinReader;
use crate::token::Opened;

/// A key as found on the token.
#[derive(Debug, Clone)]
pub struct Key {
    /// CKA_LABEL.
    pub label: String,
    /// CKA_ID shared by its objects.
    pub id: Vec<u8>,
    /// The profile's algorithm.
    pub algorithm: Algorithm,
    /// Uncompressed public point.
    pub point: Vec<u8>,
    /// Whether the private key was seen (only known when logged in).
    pub private: Option<bool>,
    /// The key's certificate (DER), when one with its CKA_ID is stored.
    pub certificate: Option<Vec<u8>>,
}

impl Key {
    /// DER SubjectPublicKeyInfo.
    pub fn spki(&self) -> Vec<u8> {
        spki_for_point(self.algorithm, &self.point)
    }

    /// SHA-256 of the SPKI, hex: what svsd's `spki_sha256` matches and
    /// `openssl pkey -pubin -outform DER | sha256sum` prints.
    pub fn fingerprint(&self) -> String {
        hex(&Sha256::digest(self.spki()))
    }

    /// The public key as a PEM SubjectPublicKeyInfo.
    pub fn public_pem(&self) -> Result<String> {
        Ok(der::pem::encode_string(
            "PUBLIC KEY",
            der::pem::LineEnding::LF,
            &self.spki(),
        )?)
    }

    fn json(&self) -> Value {
        let cert = self.certificate.as_deref().and_then(cert_summary);
        json!({
            "label": self.label,
            "id": hex(&self.id),
            "algorithm": algorithm_name(self.algorithm),
            "spki_sha256": self.fingerprint(),
            "private_key_present": self.private,
            "certificate": cert,
        })
    }
}

/// "SM2" or "ECDSA-P256".
pub fn algorithm_name(a: Algorithm) -> &'static str {
    match a {
        Algorithm::Sm2 => "SM2",
        Algorithm::EcdsaP256 => "ECDSA-P256",
    }
}

/// Subject, issuer and validity of a DER certificate, for listings.
pub fn cert_summary(der: &[u8]) -> Option<Value> {
    let c = Certificate::from_der(der).ok()?;
    let tbs = c.tbs_certificate();
    let v = tbs.validity();
    Some(json!({
        "subject": tbs.subject().to_string(),
        "issuer": tbs.issuer().to_string(),
        "not_before": svs_appliance::audit::rfc3339(v.not_before.to_system_time()),
        "not_after": svs_appliance::audit::rfc3339(v.not_after.to_system_time()),
        "sha256": hex(&Sha256::digest(der)),
    }))
}

fn attr_bytes(attrs: &[Attribute], ty: AttributeType) -> Option<Vec<u8>> {
    attrs.iter().find_map(|a| match (a, ty) {
        (Attribute::Id(v), AttributeType::Id)
        | (Attribute::Label(v), AttributeType::Label)
        | (Attribute::EcPoint(v), AttributeType::EcPoint)
        | (Attribute::EcParams(v), AttributeType::EcParams)
        | (Attribute::PublicKeyInfo(v), AttributeType::PublicKeyInfo)
        | (Attribute::Value(v), AttributeType::Value) => Some(v.clone()),
        _ => None,
    })
}

// The SPKI/EC_POINT/certificate point parsers are svs-hsm's own, so the
// tool and the daemon read a key the same way.
pub use svs_hsm::keys::{cert_point, point_from_ec_point, point_from_spki};

fn logged_in(session: &Session) -> bool {
    matches!(
        session.get_session_info().map(|i| i.session_state()),
        Ok(SessionState::RoUser | SessionState::RwUser)
    )
}

fn ck(what: &str) -> impl Fn(cryptoki::error::Error) -> ProvisionError + '_ {
    move |e| ProvisionError::pkcs11(e, what, "user")
}

/// Every key of the profile's type: public keys (visible without login)
/// and, when logged in, private keys; paired by CKA_ID with certificates.
pub fn discover(session: &Session, profile: &VendorProfile) -> Result<Vec<Key>> {
    let ktype = key_type(profile.key_type)?;
    let login = logged_in(session);
    let mut keys: Vec<Key> = Vec::new();
    let certs = certificates(session)?;
    let want = [
        AttributeType::Id,
        AttributeType::Label,
        AttributeType::EcParams,
        AttributeType::EcPoint,
        AttributeType::PublicKeyInfo,
    ];
    let mut classes = vec![ObjectClass::PUBLIC_KEY];
    if login {
        classes.push(ObjectClass::PRIVATE_KEY);
    }
    for class in classes {
        let handles = session
            .find_objects(&[Attribute::Class(class), Attribute::KeyType(ktype)])
            .map_err(ck("searching keys"))?;
        for h in handles {
            // Attributes a module does not have come back absent, not as errors.
            let attrs = session
                .get_attributes(h, &want)
                .map_err(ck("reading a key"))?;
            if let Some(params) = attr_bytes(&attrs, AttributeType::EcParams)
                && !params.is_empty()
                && params != profile.algorithm.ec_params()
            {
                continue;
            }
            let id = attr_bytes(&attrs, AttributeType::Id).unwrap_or_default();
            let label = attr_bytes(&attrs, AttributeType::Label)
                .and_then(|l| String::from_utf8(l).ok())
                .filter(|l| !l.is_empty())
                .unwrap_or_else(|| format!("id:{}", hex(&id)));
            let point = attr_bytes(&attrs, AttributeType::EcPoint)
                .and_then(|p| point_from_ec_point(&p))
                .or_else(|| {
                    attr_bytes(&attrs, AttributeType::PublicKeyInfo)
                        .and_then(|s| point_from_spki(&s, profile.algorithm))
                })
                .or_else(|| {
                    certs
                        .iter()
                        .find(|(cid, _)| *cid == id)
                        .and_then(|(_, der)| cert_point(der, profile.algorithm))
                });
            let is_private = class == ObjectClass::PRIVATE_KEY;
            if let Some(k) = keys.iter_mut().find(|k| k.id == id && !id.is_empty()) {
                if is_private {
                    k.private = Some(true);
                }
                continue;
            }
            let Some(point) = point else { continue };
            keys.push(Key {
                certificate: certs
                    .iter()
                    .find(|(cid, _)| *cid == id && !id.is_empty())
                    .map(|(_, d)| d.clone()),
                label,
                id,
                algorithm: profile.algorithm,
                point,
                private: if login { Some(is_private) } else { None },
            });
        }
    }
    keys.sort_by(|a, b| a.label.cmp(&b.label));
    Ok(keys)
}

fn certificates(session: &Session) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let handles = session
        .find_objects(&[Attribute::Class(ObjectClass::CERTIFICATE)])
        .map_err(ck("searching certificates"))?;
    let mut out = Vec::new();
    for h in handles {
        let attrs = session
            .get_attributes(h, &[AttributeType::Id, AttributeType::Value])
            .map_err(ck("reading a certificate"))?;
        if let Some(v) = attr_bytes(&attrs, AttributeType::Value) {
            out.push((attr_bytes(&attrs, AttributeType::Id).unwrap_or_default(), v));
        }
    }
    Ok(out)
}

/// The key labelled `label`; the error lists the labels present.
pub fn find(session: &Session, profile: &VendorProfile, label: &str, token: &str) -> Result<Key> {
    let keys = discover(session, profile)?;
    let mut matching = keys.iter().filter(|k| k.label == label);
    match (matching.next(), matching.next()) {
        (Some(k), None) => Ok(k.clone()),
        (Some(_), Some(_)) => Err(ProvisionError::Usage(format!(
            "several keys on token '{token}' are labelled '{label}' (ids {}); svsd can use only one of them by name: delete the others with `{}`",
            keys.iter()
                .filter(|k| k.label == label)
                .map(|k| hex(&k.id))
                .collect::<Vec<_>>()
                .join(", "),
            crate::cli::command(&format!("key delete --label {label} --id ID"))
        ))),
        (None, _) => Err(ProvisionError::NotFound(format!(
            "no key labelled '{label}' on token '{token}'; keys present: {}",
            if keys.is_empty() {
                "none".to_string()
            } else {
                keys.iter()
                    .map(|k| format!("'{}'", k.label))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ))),
    }
}

/// The private key with this CKA_ID.
pub fn private_handle(
    session: &Session,
    profile: &VendorProfile,
    key: &Key,
) -> Result<ObjectHandle> {
    let handles = session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(key_type(profile.key_type)?),
            Attribute::Id(key.id.clone()),
        ])
        .map_err(ck("searching the private key"))?;
    match handles.as_slice() {
        [h] => Ok(*h),
        [] => Err(ProvisionError::NotFound(format!(
            "key '{}' has no private key on the token (only its public half is there)",
            key.label
        ))),
        _ => Err(ProvisionError::Usage(format!(
            "several private keys share the id {} of key '{}'",
            hex(&key.id),
            key.label
        ))),
    }
}

/// Signs a ready digest with the key through the profile's "sign a ready
/// digest" mechanism, normalises the vendor's encoding to raw r‖s, and
/// checks the signature in software before anyone relies on it.
pub fn sign_digest(
    session: &Session,
    profile: &VendorProfile,
    key: &Key,
    digest: &[u8; 32],
) -> Result<[u8; 64]> {
    let handle = private_handle(session, profile, key)?;
    let out = session
        .sign(&mechanism(profile.sign_digest_mechanism)?, handle, digest)
        .map_err(ck(&format!("signing with key '{}'", key.label)))?;
    let raw = svs_hsm::signature::normalise_signature(&out, profile.signature_encoding)?;
    svs_hsm::signature::SoftwareVerifier::new()
        .verify_digest(key.algorithm, &key.point, digest, &raw)
        .map_err(|_| {
            ProvisionError::Token(format!(
                "the token's signature with key '{}' does not verify with the key's public key; the token may be faulty",
                key.label
            ))
        })?;
    Ok(raw)
}

/// The digest the token signs for `message`: SM2 e = SM3(Z ‖ M) with the
/// default ID, or SHA-256(M) for ECDSA.
pub fn digest_for(key: &Key, message: &[u8]) -> Result<[u8; 32]> {
    Ok(svs_hsm::signature::SoftwareVerifier::new().digest(
        key.algorithm,
        &key.point,
        svs_hsm::signature::DEFAULT_SM2_ID,
        message,
    )?)
}

fn check_label(label: &str) -> Result<()> {
    // The same characters svsd allows in names, so the label can be used
    // in [keys] and in API paths as it is.
    let ok = !label.is_empty()
        && label.len() <= 128
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    if ok && !label.starts_with("id:") {
        Ok(())
    } else {
        Err(ProvisionError::Usage(format!(
            "invalid key label {label:?}: use 1-128 characters of A-Z a-z 0-9 - _ . : (not starting with \"id:\")"
        )))
    }
}

/// `key generate`: a key pair in the token; the private key is sensitive
/// and can never leave it.
pub fn generate(opened: &Opened, pins: &mut PinReader, label: &str) -> Result<Report> {
    check_label(label)?;
    let session = opened.user_session(pins)?;
    // Not before the PIN (an officer at its prompt would hold up every
    // other run), but before the check that the label is free.
    let _changing = crate::token::lock_changes()?;
    let existing = discover(&session, &opened.profile)?;
    if existing.iter().any(|k| k.label == label) {
        return Err(ProvisionError::AlreadyExists(format!(
            "a key labelled '{label}' exists already on token '{}'; choose another label (or delete it first with `{}`)",
            opened.label,
            crate::cli::command(&format!("key delete --label {label}"))
        )));
    }
    let id = session
        .generate_random_vec(16)
        .map_err(ck("drawing a key id from the token's RNG"))?;
    let (public, private) = key_pair_templates(&opened.profile, label, &id)?;
    crate::progress(&format!(
        "generating key '{label}' in token '{}'…",
        opened.label
    ));
    session
        .generate_key_pair(
            &mechanism(opened.profile.keygen_mechanism)?,
            &public,
            &private,
        )
        .map_err(ck(&format!("generating key '{label}'")))?;
    let key = discover(&session, &opened.profile)?
        .into_iter()
        .find(|k| k.id == id)
        .ok_or_else(|| {
            ProvisionError::Token("the generated key pair is not visible on the token".into())
        })?;
    let pem = key.public_pem()?;
    Ok(Report {
        text: format!(
            "generated {} key '{label}' in token '{}'\nid: {}\nspki_sha256: {}\n{pem}",
            algorithm_name(key.algorithm),
            opened.label,
            hex(&key.id),
            key.fingerprint()
        ),
        json: {
            let mut j = key.json();
            j["public_key"] = json!(pem);
            j
        },
    })
}

/// `key list`: every key; a PIN is only needed to see private-key presence.
pub fn list(opened: &Opened, pins: Option<&mut PinReader>) -> Result<Report> {
    let session = match pins {
        Some(p) => opened.user_session(p)?,
        None => opened.public_session()?,
    };
    let keys = discover(&session, &opened.profile)?;
    let mut text = String::new();
    if keys.is_empty() {
        text.push_str(&format!("no keys on token '{}'\n", opened.label));
    }
    for k in &keys {
        text.push_str(&format!(
            "{}  id {}  {}  spki_sha256 {}",
            k.label,
            hex(&k.id),
            algorithm_name(k.algorithm),
            k.fingerprint()
        ));
        if k.private == Some(false) {
            text.push_str("  (NO PRIVATE KEY)");
        }
        match k.certificate.as_deref().and_then(cert_summary) {
            Some(c) => text.push_str(&format!(
                "\n    certificate: {}  expires {}",
                c["subject"].as_str().unwrap_or(""),
                c["not_after"].as_str().unwrap_or("")
            )),
            None => text.push_str("\n    no certificate"),
        }
        text.push('\n');
    }
    Ok(Report {
        text,
        json: json!({"token": opened.label, "keys": keys.iter().map(Key::json).collect::<Vec<_>>()}),
    })
}

/// `key show`: one key with its public key.
pub fn show(opened: &Opened, label: &str) -> Result<Report> {
    let session = opened.public_session()?;
    let k = find(&session, &opened.profile, label, &opened.label)?;
    let pem = k.public_pem()?;
    let cert = k.certificate.as_deref().and_then(cert_summary);
    let mut text = format!(
        "key '{}' on token '{}'\nalgorithm: {}\nid: {}\nspki_sha256: {}\n",
        k.label,
        opened.label,
        algorithm_name(k.algorithm),
        hex(&k.id),
        k.fingerprint()
    );
    match &cert {
        Some(c) => text.push_str(&format!(
            "certificate: {}\n  issuer: {}\n  valid: {} .. {}\n",
            c["subject"].as_str().unwrap_or(""),
            c["issuer"].as_str().unwrap_or(""),
            c["not_before"].as_str().unwrap_or(""),
            c["not_after"].as_str().unwrap_or("")
        )),
        None => text.push_str("certificate: none\n"),
    }
    text.push_str(&pem);
    let mut json = k.json();
    json["public_key"] = json!(pem);
    Ok(Report { text, json })
}

/// `key export-public`: the SPKI PEM (to a file, or standard output).
pub fn export_public(opened: &Opened, label: &str) -> Result<(Key, String)> {
    let session = opened.public_session()?;
    let k = find(&session, &opened.profile, label, &opened.label)?;
    let pem = k.public_pem()?;
    Ok((k, pem))
}

/// `key delete`: destroys the private key, public key and certificates of
/// the key (everything sharing its CKA_ID).
pub fn delete(
    opened: &Opened,
    pins: &mut PinReader,
    label: &str,
    id: Option<&str>,
    yes: bool,
) -> Result<Report> {
    let session = opened.user_session(pins)?;
    let key = match id {
        None => find(&session, &opened.profile, label, &opened.label)?,
        Some(id) => discover(&session, &opened.profile)?
            .into_iter()
            .find(|k| k.label == label && hex(&k.id).eq_ignore_ascii_case(id.trim()))
            .ok_or_else(|| {
                ProvisionError::NotFound(format!(
                    "no key labelled '{label}' with id {id} on token '{}' (`key list` shows the ids)",
                    opened.label
                ))
            })?,
    };
    if key.id.is_empty() {
        return Err(ProvisionError::Usage(format!(
            "key '{label}' has no CKA_ID, so its objects cannot be told apart from others; delete it with the vendor's tool"
        )));
    }
    if !yes {
        crate::pin::confirm(
            &format!(
                "Deleting key '{label}' (id {}, spki_sha256 {}) from token '{}' cannot be undone: signatures with it will no longer be possible.",
                hex(&key.id),
                key.fingerprint(),
                opened.label
            ),
            label,
        )?;
    }
    // Not before the confirmation (an officer at its prompt would hold up
    // every other run). Then by id: exactly the key confirmed, unless
    // another run deleted it meanwhile.
    let _changing = crate::token::lock_changes()?;
    let handles = session
        .find_objects(&[Attribute::Id(key.id.clone())])
        .map_err(ck("searching the key's objects"))?;
    if handles.is_empty() {
        return Err(ProvisionError::NotFound(format!(
            "key '{label}' (id {}) is no longer on token '{}': another run deleted it meanwhile; nothing was deleted",
            hex(&key.id),
            opened.label
        )));
    }
    let mut deleted = 0;
    for h in handles {
        session
            .destroy_object(h)
            .map_err(ck(&format!("deleting an object of key '{label}'")))?;
        deleted += 1;
    }
    Ok(Report {
        text: format!(
            "deleted key '{label}' ({deleted} objects) from token '{}'\n",
            opened.label
        ),
        json: json!({"label": label, "id": hex(&key.id), "objects_deleted": deleted}),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_svsd_names() {
        assert!(check_label("nia-auth_1.v2:x").is_ok());
        for bad in ["", "a b", "id:01", "ä", &"x".repeat(129)] {
            assert!(check_label(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ec_points_from_both_encodings() {
        let mut point = vec![0x04];
        point.extend_from_slice(&[7; 64]);
        let mut octet = vec![0x04, 0x41];
        octet.extend_from_slice(&point);
        assert_eq!(point_from_ec_point(&octet), Some(point.clone()));
        assert_eq!(point_from_ec_point(&point), Some(point.clone()));
        let spki = spki_for_point(Algorithm::Sm2, &point);
        assert_eq!(point_from_spki(&spki, Algorithm::Sm2), Some(point.clone()));
        assert_eq!(point_from_spki(&spki, Algorithm::EcdsaP256), None);
    }
}
