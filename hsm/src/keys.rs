//! Signing keys on the token: discovery (private key + public key +
//! certificates paired by CKA_ID), generation and certificate import.

use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::MechanismType;
use cryptoki::mechanism::vendor_defined::VendorDefinedMechanism;
use cryptoki::object::{
    Attribute, AttributeType, CertificateType, KeyType, ObjectClass, ObjectHandle,
};
use cryptoki::session::Session;
use der::{Decode, Encode};
use x509_cert::Certificate;

use crate::error::{HsmError, Result};
use crate::profile::{Algorithm, VendorProfile};

/// A signing key as the rest of SVS sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// Name callers use: the CKA_LABEL, or `id:<hex>` for an unlabelled key.
    pub name: String,
    /// CKA_ID shared by the private key, public key and certificate.
    pub id: Vec<u8>,
    /// Algorithm of the key (from the profile).
    pub algorithm: Algorithm,
    /// Uncompressed public point (65 bytes).
    pub public_point: Vec<u8>,
    /// DER SubjectPublicKeyInfo.
    pub spki_der: Vec<u8>,
    /// DER certificates: the key's own first, then issuers found on the token.
    pub certificate_chain: Vec<Vec<u8>>,
}

/// Lower-case hex, for IDs in names and messages.
pub fn hex(bytes: &[u8]) -> String {
    base16ct::lower::encode_string(bytes)
}

pub fn key_type(code: u64) -> Result<KeyType> {
    KeyType::try_from(code as std::ffi::c_ulong)
        .or_else(|_| KeyType::new_vendor_defined(code as std::ffi::c_ulong))
        .map_err(|_| HsmError::Config(format!("unknown key type {code:#x}")))
}

pub fn mechanism_type(code: u64) -> Result<MechanismType> {
    MechanismType::try_from(code as std::ffi::c_ulong)
        .or_else(|_| MechanismType::new_vendor_defined(code as std::ffi::c_ulong))
        .map_err(|_| HsmError::Config(format!("unknown mechanism {code:#x}")))
}

/// The parameterless mechanism with this number.
pub fn mechanism(code: u64) -> Result<Mechanism<'static>> {
    Ok(match code {
        0x1040 => Mechanism::EccKeyPairGen,
        0x1041 => Mechanism::Ecdsa,
        c if c >= 0x8000_0000 => {
            Mechanism::VendorDefined(VendorDefinedMechanism::new::<()>(mechanism_type(c)?, None))
        }
        c => {
            return Err(HsmError::Config(format!(
                "mechanism {c:#x} is not supported by this crate"
            )));
        }
    })
}

/// DER SubjectPublicKeyInfo for an EC point on the profile's curve.
pub fn spki_for_point(algorithm: Algorithm, point: &[u8]) -> Vec<u8> {
    // id-ecPublicKey, then the curve OID.
    const EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x02, 0x01];
    let params = algorithm.ec_params();
    let alg_len = EC_PUBLIC_KEY.len() + params.len();
    let bits_len = point.len() + 1;
    let mut out = Vec::with_capacity(4 + alg_len + 2 + bits_len + 2);
    out.push(0x30);
    out.push((2 + alg_len + 2 + bits_len) as u8);
    out.push(0x30);
    out.push(alg_len as u8);
    out.extend_from_slice(EC_PUBLIC_KEY);
    out.extend_from_slice(params);
    out.push(0x03);
    out.push(bits_len as u8);
    out.push(0x00);
    out.extend_from_slice(point);
    out
}

/// The point inside a CKA_EC_POINT value (DER OCTET STRING or bare point).
pub fn point_from_ec_point(value: &[u8]) -> Option<Vec<u8>> {
    match value {
        [0x04, rest @ ..] if value.len() == 65 && rest.len() == 64 => Some(value.to_vec()),
        [0x04, 0x41, inner @ ..] if inner.len() == 65 && inner[0] == 0x04 => Some(inner.to_vec()),
        _ => None,
    }
}

/// The point and curve parameters of a DER SubjectPublicKeyInfo.
pub fn point_from_spki(der: &[u8], algorithm: Algorithm) -> Option<Vec<u8>> {
    let spki = spki::SubjectPublicKeyInfoRef::from_der(der).ok()?;
    let params = spki.algorithm.parameters.as_ref()?.to_der().ok()?;
    if params != algorithm.ec_params() {
        return None;
    }
    let bits = spki.subject_public_key.as_bytes()?;
    (bits.len() == 65 && bits[0] == 0x04).then(|| bits.to_vec())
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

fn key_name(label: &[u8], id: &[u8]) -> String {
    match std::str::from_utf8(label) {
        Ok(l) if !l.is_empty() => l.to_owned(),
        _ => format!("id:{}", hex(id)),
    }
}

/// The public and private templates of a signing key pair `label`/`id`:
/// kept on the token, the private half sensitive and never extractable,
/// and each half good for signing or verifying only (a module's defaults
/// may also allow decrypt, unwrap or derive, which a signing key must not).
pub fn key_pair_templates(
    profile: &VendorProfile,
    label: &str,
    id: &[u8],
) -> Result<(Vec<Attribute>, Vec<Attribute>)> {
    let ktype = key_type(profile.key_type)?;
    let public = vec![
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
        Attribute::Derive(false),
        Attribute::KeyType(ktype),
        Attribute::EcParams(profile.algorithm.ec_params().to_vec()),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id.to_vec()),
    ];
    let private = vec![
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::KeyType(ktype),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id.to_vec()),
    ];
    Ok((public, private))
}

/// Finds every private key usable for signing with the profile's key type
/// and pairs it with its public key and certificates.
pub(crate) fn discover(session: &Session, profile: &VendorProfile) -> Result<Vec<KeyInfo>> {
    let ktype = key_type(profile.key_type)?;
    let privates = session.find_objects(&[
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(ktype),
        Attribute::Sign(true),
    ])?;
    let certs = all_certificates(session)?;
    let mut keys = Vec::new();
    for handle in privates {
        let attrs = session.get_attributes(
            handle,
            &[
                AttributeType::Id,
                AttributeType::Label,
                AttributeType::EcParams,
                AttributeType::PublicKeyInfo,
            ],
        )?;
        let id = attr_bytes(&attrs, AttributeType::Id).unwrap_or_default();
        let label = attr_bytes(&attrs, AttributeType::Label).unwrap_or_default();
        // Keys are re-found by CKA_ID at signing time: a key without one, or
        // sharing one, could be confused with another and is not served.
        if id.is_empty() {
            tracing::warn!(key = %key_name(&label, &id), "private key without CKA_ID: skipped");
            continue;
        }
        // Some vendors omit CKA_EC_PARAMS on SM2 keys; when present it must
        // name the profile's curve, so a P-256 profile skips other EC curves.
        if let Some(params) = attr_bytes(&attrs, AttributeType::EcParams)
            && !params.is_empty()
            && params != profile.algorithm.ec_params()
        {
            continue;
        }
        let point = attr_bytes(&attrs, AttributeType::PublicKeyInfo)
            .and_then(|spki| point_from_spki(&spki, profile.algorithm))
            .or_else(|| public_point_by_id(session, &id).ok().flatten())
            .or_else(|| {
                certs
                    .iter()
                    .find(|(cid, _)| *cid == id)
                    .and_then(|(_, der)| cert_point(der, profile.algorithm))
            });
        let Some(point) = point else {
            tracing::warn!(key = %key_name(&label, &id), "private key without a usable public key: skipped");
            continue;
        };
        keys.push(KeyInfo {
            name: key_name(&label, &id),
            spki_der: spki_for_point(profile.algorithm, &point),
            public_point: point,
            certificate_chain: chain_for(&id, &certs),
            algorithm: profile.algorithm,
            id,
        });
    }
    let mut seen = std::collections::HashMap::new();
    for k in &keys {
        *seen.entry(k.id.clone()).or_insert(0usize) += 1;
    }
    keys.retain(|k| {
        let unique = seen[&k.id] == 1;
        if !unique {
            tracing::warn!(key = %k.name, id = %hex(&k.id), "several private keys share this CKA_ID: skipped");
        }
        unique
    });
    keys.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(keys)
}

fn public_point_by_id(session: &Session, id: &[u8]) -> Result<Option<Vec<u8>>> {
    let handles = session.find_objects(&[
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::Id(id.to_vec()),
    ])?;
    for h in handles {
        let attrs = session.get_attributes(h, &[AttributeType::EcPoint])?;
        if let Some(p) =
            attr_bytes(&attrs, AttributeType::EcPoint).and_then(|v| point_from_ec_point(&v))
        {
            return Ok(Some(p));
        }
    }
    Ok(None)
}

/// The public point of a certificate, if it is on `algorithm`'s curve.
pub fn cert_point(der: &[u8], algorithm: Algorithm) -> Option<Vec<u8>> {
    let cert = Certificate::from_der(der).ok()?;
    let spki = cert
        .tbs_certificate()
        .subject_public_key_info()
        .to_der()
        .ok()?;
    point_from_spki(&spki, algorithm)
}

fn all_certificates(session: &Session) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let handles = session.find_objects(&[Attribute::Class(ObjectClass::CERTIFICATE)])?;
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        let attrs = session.get_attributes(h, &[AttributeType::Id, AttributeType::Value])?;
        if let Some(value) = attr_bytes(&attrs, AttributeType::Value) {
            out.push((
                attr_bytes(&attrs, AttributeType::Id).unwrap_or_default(),
                value,
            ));
        }
    }
    Ok(out)
}

/// The key's certificate, then each issuer found among the token's certificates.
fn chain_for(id: &[u8], certs: &[(Vec<u8>, Vec<u8>)]) -> Vec<Vec<u8>> {
    // (DER, DER subject and issuer names when the certificate parses)
    type ParsedCert<'a> = (&'a [u8], Option<(Vec<u8>, Vec<u8>)>);
    let parsed: Vec<ParsedCert> = certs
        .iter()
        .map(|(_, der)| {
            let names = Certificate::from_der(der).ok().and_then(|c| {
                let tbs = c.tbs_certificate();
                Some((tbs.subject().to_der().ok()?, tbs.issuer().to_der().ok()?))
            });
            (der.as_slice(), names)
        })
        .collect();
    let Some(leaf) = certs
        .iter()
        .position(|(cid, _)| cid == id && !id.is_empty())
    else {
        return Vec::new();
    };
    let mut chain = vec![certs[leaf].1.clone()];
    let mut current = leaf;
    // Bounded walk: a loop in subject/issuer names must not hang discovery.
    for _ in 0..8 {
        let Some((subject, issuer)) = &parsed[current].1 else {
            break;
        };
        if subject == issuer {
            break;
        }
        match parsed
            .iter()
            .position(|(_, n)| n.as_ref().is_some_and(|(s, _)| s == issuer))
        {
            Some(next) if !chain.iter().any(|c| c.as_slice() == parsed[next].0) => {
                chain.push(parsed[next].0.to_vec());
                current = next;
            }
            _ => break,
        }
    }
    chain
}

/// The private-key handle for a key, re-found by CKA_ID (handles do not
/// survive a token coming back).
///
/// When the token states the key's public key (CKA_PUBLIC_KEY_INFO or
/// CKA_EC_POINT on the private key, else the public key object of the same
/// CKA_ID), it must be `expected_point`: a key deleted and re-created under
/// the same CKA_ID since discovery must not sign digests computed with the
/// old key's Z. The flag says whether it was stated; when not, each
/// signature must be checked in software before it leaves.
pub(crate) fn find_private_key(
    session: &Session,
    profile: &VendorProfile,
    id: &[u8],
    expected_point: &[u8],
) -> Result<(ObjectHandle, bool)> {
    let handles = session.find_objects(&[
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(key_type(profile.key_type)?),
        Attribute::Id(id.to_vec()),
    ])?;
    match handles.as_slice() {
        [h] => {
            // An error here fails the lookup: a key that cannot be checked
            // is not taken on trust.
            let attrs = session
                .get_attributes(*h, &[AttributeType::PublicKeyInfo, AttributeType::EcPoint])?;
            let stated = attr_bytes(&attrs, AttributeType::PublicKeyInfo)
                .and_then(|spki| point_from_spki(&spki, profile.algorithm))
                .or_else(|| {
                    attr_bytes(&attrs, AttributeType::EcPoint).and_then(|v| point_from_ec_point(&v))
                });
            // Many HSMs state no public key on the private object: the
            // public key of the same CKA_ID speaks for it.
            let stated = match stated {
                Some(point) => Some(point),
                None => public_point_by_id(session, id)?,
            };
            match stated {
                Some(point) if point != expected_point => {
                    Err(HsmError::KeyChanged(format!("id:{}", hex(id))))
                }
                confirmed => Ok((*h, confirmed.is_some())),
            }
        }
        [] => Err(HsmError::UnknownKey(format!("id:{}", hex(id)))),
        _ => Err(HsmError::Config(format!(
            "several private keys share CKA_ID {}",
            hex(id)
        ))),
    }
}

/// Generates a token key pair and returns it as discovered.
pub(crate) fn generate(
    session: &Session,
    profile: &VendorProfile,
    label: &str,
    id: Option<Vec<u8>>,
) -> Result<KeyInfo> {
    if label.is_empty() {
        return Err(HsmError::InvalidInput("a key needs a label".into()));
    }
    if !discover(session, profile)?.iter().all(|k| k.name != label) {
        return Err(HsmError::InvalidInput(format!(
            "a key named {label:?} exists already"
        )));
    }
    let id = match id {
        Some(id) if id.is_empty() => {
            return Err(HsmError::InvalidInput(
                "a key's CKA_ID must not be empty".into(),
            ));
        }
        Some(id) => {
            let taken = session.find_objects(&[Attribute::Id(id.clone())])?;
            if !taken.is_empty() {
                return Err(HsmError::InvalidInput(format!(
                    "CKA_ID {} is in use by another object",
                    hex(&id)
                )));
            }
            id
        }
        None => session.generate_random_vec(16)?,
    };
    let (public, private) = key_pair_templates(profile, label, &id)?;
    session.generate_key_pair(&mechanism(profile.keygen_mechanism)?, &public, &private)?;
    discover(session, profile)?
        .into_iter()
        .find(|k| k.id == id)
        .ok_or_else(|| {
            HsmError::Unavailable("generated key pair is not visible on the token".into())
        })
}

/// Stores a DER certificate on the token. With `id` it belongs to that key
/// (and its public key must match); without, it is a CA certificate for chains.
pub(crate) fn import_certificate(
    session: &Session,
    label: &str,
    id: Option<&KeyInfo>,
    der: &[u8],
) -> Result<()> {
    let cert = Certificate::from_der(der)?;
    let tbs = cert.tbs_certificate();
    if let Some(key) = id {
        let spki = tbs.subject_public_key_info().to_der()?;
        if point_from_spki(&spki, key.algorithm).as_deref() != Some(key.public_point.as_slice()) {
            return Err(HsmError::InvalidInput(format!(
                "certificate's public key does not match key {:?}",
                key.name
            )));
        }
    }
    let template = certificate_template(label, id.map(|k| k.id.as_slice()), der, &cert)?;
    session.create_object(&template)?;
    Ok(())
}

/// The attributes of a public X.509 certificate object: the fields
/// PKCS#11 mirrors from the certificate, and `CKA_ID` when it belongs to a key.
pub fn certificate_template(
    label: &str,
    id: Option<&[u8]>,
    der: &[u8],
    cert: &Certificate,
) -> Result<Vec<Attribute>> {
    let tbs = cert.tbs_certificate();
    let mut template = vec![
        Attribute::Class(ObjectClass::CERTIFICATE),
        Attribute::CertificateType(CertificateType::X_509),
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Subject(tbs.subject().to_der()?),
        Attribute::Issuer(tbs.issuer().to_der()?),
        Attribute::SerialNumber(tbs.serial_number().to_der()?),
        Attribute::Value(der.to_vec()),
    ];
    if let Some(id) = id {
        template.push(Attribute::Id(id.to_vec()));
    }
    Ok(template)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spki_round_trip() {
        let mut point = vec![0x04];
        point.extend_from_slice(&[0x11; 64]);
        for alg in [Algorithm::Sm2, Algorithm::EcdsaP256] {
            let spki = spki_for_point(alg, &point);
            assert_eq!(point_from_spki(&spki, alg), Some(point.clone()));
        }
        assert_eq!(
            point_from_spki(
                &spki_for_point(Algorithm::Sm2, &point),
                Algorithm::EcdsaP256
            ),
            None
        );
        let mut octet = vec![0x04, 0x41];
        octet.extend_from_slice(&point);
        assert_eq!(point_from_ec_point(&octet), Some(point.clone()));
        assert_eq!(point_from_ec_point(&point), Some(point.clone()));
        assert_eq!(point_from_ec_point(&point[..64]), None);
    }

    #[test]
    fn names() {
        assert_eq!(key_name(b"nia-auth", b"\x01"), "nia-auth");
        assert_eq!(key_name(b"", b"\x01\xab"), "id:01ab");
    }
}
