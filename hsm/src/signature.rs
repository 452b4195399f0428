//! Host-side signature work: SM2 Z and e, SHA-256 digests, signature
//! encodings, and software verification with a cache of parsed public keys.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sha2::Sha256;
use sm2::dsa::signature::hazmat::PrehashVerifier;
use sm3::{Digest, Sm3};

use crate::error::{HsmError, Result};
use crate::profile::{Algorithm, SignatureEncoding};

/// GM/T 0009 default distinguishing identifier.
pub const DEFAULT_SM2_ID: &[u8] = b"1234567812345678";

const fn hex32(s: &str) -> [u8; 32] {
    let b = s.as_bytes();
    let mut out = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        out[i] = (nibble(b[2 * i]) << 4) | nibble(b[2 * i + 1]);
        i += 1;
    }
    out
}

const fn nibble(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'A'..=b'F' => c - b'A' + 10,
        _ => panic!("bad hex"),
    }
}

// GB/T 32918.5 curve parameters, needed for Z.
const SM2_A: [u8; 32] = hex32("FFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFC");
const SM2_B: [u8; 32] = hex32("28E9FA9E9D9F5E344D5A9E4BCF6509A7F39789F515AB8F92DDBCBD414D940E93");
const SM2_GX: [u8; 32] = hex32("32C4AE2C1F1981195F9904466A39C9948FE30BBFF2660BE1715A4589334C74C7");
const SM2_GY: [u8; 32] = hex32("BC3736A2F4F6779C59BDCEE36B692153D0A9877CC62A474002DF32E52139F0A0");

/// Z = SM3(ENTL ‖ ID ‖ a ‖ b ‖ xG ‖ yG ‖ xA ‖ yA) for an uncompressed point.
pub fn sm2_z(id: &[u8], point: &[u8]) -> Result<[u8; 32]> {
    if point.len() != 65 || point[0] != 0x04 {
        return Err(HsmError::InvalidInput(
            "SM2 public key must be an uncompressed point".into(),
        ));
    }
    let entl = u16::try_from(id.len() * 8)
        .map_err(|_| HsmError::InvalidInput("distinguishing ID longer than 8191 bytes".into()))?;
    let mut h = Sm3::new();
    h.update(entl.to_be_bytes());
    h.update(id);
    h.update(SM2_A);
    h.update(SM2_B);
    h.update(SM2_GX);
    h.update(SM2_GY);
    h.update(&point[1..]);
    Ok(h.finalize().into())
}

/// e = SM3(Z ‖ M).
pub fn sm2_e(z: &[u8; 32], message: &[u8]) -> [u8; 32] {
    let mut h = Sm3::new();
    h.update(z);
    h.update(message);
    h.finalize().into()
}

/// SHA-256(M), the digest CKM_ECDSA signs in the `ecdsa-p256` profile.
pub fn sha256(message: &[u8]) -> [u8; 32] {
    Sha256::digest(message).into()
}

/// DER `SEQUENCE { r INTEGER, s INTEGER }` from raw r‖s.
pub fn raw_to_der(raw: &[u8; 64]) -> Vec<u8> {
    fn integer(out: &mut Vec<u8>, mut v: &[u8]) {
        while v.len() > 1 && v[0] == 0 {
            v = &v[1..];
        }
        let pad = v[0] & 0x80 != 0;
        out.push(0x02);
        out.push((v.len() + usize::from(pad)) as u8);
        if pad {
            out.push(0);
        }
        out.extend_from_slice(v);
    }
    let mut body = Vec::with_capacity(70);
    integer(&mut body, &raw[..32]);
    integer(&mut body, &raw[32..]);
    let mut out = Vec::with_capacity(body.len() + 2);
    out.push(0x30);
    out.push(body.len() as u8);
    out.extend_from_slice(&body);
    out
}

/// Raw r‖s from a strict DER signature over a 256-bit curve.
pub fn der_to_raw(der: &[u8]) -> Result<[u8; 64]> {
    let bad = |why: &str| HsmError::InvalidInput(format!("DER signature: {why}"));
    if der.len() < 8 || der[0] != 0x30 || usize::from(der[1]) != der.len() - 2 || der[1] >= 0x80 {
        return Err(bad("not a SEQUENCE of the right length"));
    }
    let mut out = [0u8; 64];
    let mut rest = &der[2..];
    for half in out.chunks_mut(32) {
        if rest.len() < 2 || rest[0] != 0x02 {
            return Err(bad("expected INTEGER"));
        }
        let len = usize::from(rest[1]);
        if len == 0 || len > 33 || rest.len() < 2 + len {
            return Err(bad("bad INTEGER length"));
        }
        let v = &rest[2..2 + len];
        if v[0] & 0x80 != 0 {
            return Err(bad("negative INTEGER"));
        }
        if len > 1 && v[0] == 0 && v[1] & 0x80 == 0 {
            return Err(bad("non-minimal INTEGER"));
        }
        let v = if v[0] == 0 && len > 1 { &v[1..] } else { v };
        if v.len() > 32 {
            return Err(bad("INTEGER wider than 256 bits"));
        }
        half[32 - v.len()..].copy_from_slice(v);
        rest = &rest[2 + len..];
    }
    if !rest.is_empty() {
        return Err(bad("trailing bytes"));
    }
    Ok(out)
}

/// Turns whatever the HSM returned into raw r‖s. The profile's encoding is
/// tried first; the other one is accepted too, because vendors' numbers do
/// not reliably tell the encoding.
pub fn normalise_signature(bytes: &[u8], expected: SignatureEncoding) -> Result<[u8; 64]> {
    let as_raw = || <[u8; 64]>::try_from(bytes).ok();
    let parsed = match expected {
        SignatureEncoding::Raw => as_raw().or_else(|| der_to_raw(bytes).ok()),
        SignatureEncoding::Der => der_to_raw(bytes).ok().or_else(as_raw),
    };
    parsed.ok_or_else(|| {
        HsmError::FaultySignature(format!(
            "{} bytes that are neither raw r‖s nor DER",
            bytes.len()
        ))
    })
}

/// Encodes raw r‖s as requested.
pub fn encode_signature(raw: &[u8; 64], encoding: SignatureEncoding) -> Vec<u8> {
    match encoding {
        SignatureEncoding::Raw => raw.to_vec(),
        SignatureEncoding::Der => raw_to_der(raw),
    }
}

/// A parsed public key ready to verify.
#[derive(Debug)]
enum ParsedKey {
    Sm2(Box<sm2::dsa::VerifyingKey>),
    P256(Box<p256::ecdsa::VerifyingKey>),
}

/// Verifies signatures in software, keeping parsed keys so the per-call cost
/// is the curve arithmetic only.
#[derive(Debug, Default)]
pub struct SoftwareVerifier {
    keys: Mutex<HashMap<KeyCacheId, Arc<ParsedKey>>>,
    z: Mutex<HashMap<ZCacheId, [u8; 32]>>,
}

/// (algorithm, public point)
type KeyCacheId = (Algorithm, Vec<u8>);
/// (public point, distinguishing ID)
type ZCacheId = (Vec<u8>, Vec<u8>);

// Bounded so that callers verifying against many one-off keys cannot grow
// memory without limit; clearing is crude but keeps hot keys warm again fast.
const CACHE_LIMIT: usize = 4096;

impl SoftwareVerifier {
    /// An empty verifier.
    pub fn new() -> SoftwareVerifier {
        SoftwareVerifier::default()
    }

    fn parsed(&self, algorithm: Algorithm, point: &[u8]) -> Result<Arc<ParsedKey>> {
        let key = (algorithm, point.to_vec());
        if let Some(k) = lock(&self.keys).get(&key) {
            return Ok(k.clone());
        }
        let bad = || HsmError::InvalidInput("public key is not a valid curve point".into());
        let parsed = Arc::new(match algorithm {
            // The ID given here only feeds the crate's own Z, which prehash
            // verification never uses: Z is ours, per call.
            Algorithm::Sm2 => ParsedKey::Sm2(Box::new(
                sm2::dsa::VerifyingKey::from_sec1_bytes("1234567812345678", point)
                    .map_err(|_| bad())?,
            )),
            Algorithm::EcdsaP256 => ParsedKey::P256(Box::new(
                p256::ecdsa::VerifyingKey::from_sec1_bytes(point).map_err(|_| bad())?,
            )),
        });
        let mut map = lock(&self.keys);
        if map.len() >= CACHE_LIMIT {
            map.clear();
        }
        map.insert(key, parsed.clone());
        Ok(parsed)
    }

    /// Z for a key and ID, cached.
    pub fn z(&self, point: &[u8], id: &[u8]) -> Result<[u8; 32]> {
        let key = (point.to_vec(), id.to_vec());
        if let Some(z) = lock(&self.z).get(&key) {
            return Ok(*z);
        }
        let z = sm2_z(id, point)?;
        let mut map = lock(&self.z);
        if map.len() >= CACHE_LIMIT {
            map.clear();
        }
        map.insert(key, z);
        Ok(z)
    }

    /// The digest the HSM signs for `message`: SM3(Z ‖ M) or SHA-256(M).
    pub fn digest(
        &self,
        algorithm: Algorithm,
        point: &[u8],
        id: &[u8],
        message: &[u8],
    ) -> Result<[u8; 32]> {
        Ok(match algorithm {
            Algorithm::Sm2 => sm2_e(&self.z(point, id)?, message),
            Algorithm::EcdsaP256 => sha256(message),
        })
    }

    /// Verifies raw r‖s over a ready digest.
    pub fn verify_digest(
        &self,
        algorithm: Algorithm,
        point: &[u8],
        digest: &[u8],
        raw: &[u8; 64],
    ) -> Result<()> {
        if digest.len() != 32 {
            return Err(HsmError::InvalidInput(format!(
                "digest must be 32 bytes, got {}",
                digest.len()
            )));
        }
        let ok = match &*self.parsed(algorithm, point)? {
            ParsedKey::Sm2(k) => sm2::dsa::Signature::from_slice(raw)
                .map(|s| k.verify_prehash(digest, &s).is_ok())
                .unwrap_or(false),
            ParsedKey::P256(k) => p256::ecdsa::Signature::from_slice(raw)
                .map(|s| k.verify_prehash(digest, &s).is_ok())
                .unwrap_or(false),
        };
        if ok {
            Ok(())
        } else {
            Err(HsmError::VerifyFailed)
        }
    }

    /// Verifies a signature (raw or DER, recognised by shape) over a message.
    pub fn verify_message(
        &self,
        algorithm: Algorithm,
        point: &[u8],
        id: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<()> {
        let raw = normalise_signature(signature, SignatureEncoding::Der)
            .map_err(|_| HsmError::InvalidInput("signature is neither raw r‖s nor DER".into()))?;
        let digest = self.digest(algorithm, point, id, message)?;
        self.verify_digest(algorithm, point, &digest, &raw)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere cannot leave a cache map inconsistent: keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sm2::dsa::signature::Signer;

    #[test]
    fn z_and_e_agree_with_the_sm2_crate() {
        let sk = sm2::SecretKey::from_slice(&[7u8; 32]).unwrap();
        let signer = sm2::dsa::SigningKey::new("1234567812345678", &sk).unwrap();
        let point = sk.public_key().to_sec1_bytes();
        let msg = b"message digest";
        let sig: sm2::dsa::Signature = signer.sign(msg);
        let raw: [u8; 64] = sig.to_bytes().into();
        let v = SoftwareVerifier::new();
        v.verify_message(Algorithm::Sm2, &point, DEFAULT_SM2_ID, msg, &raw)
            .unwrap();
        v.verify_message(
            Algorithm::Sm2,
            &point,
            DEFAULT_SM2_ID,
            msg,
            &raw_to_der(&raw),
        )
        .unwrap();
        assert!(
            v.verify_message(Algorithm::Sm2, &point, b"other-id", msg, &raw)
                .is_err()
        );
        assert!(
            v.verify_message(Algorithm::Sm2, &point, DEFAULT_SM2_ID, b"x", &raw)
                .is_err()
        );
    }

    #[test]
    fn der_round_trip_and_strictness() {
        let mut raw = [0u8; 64];
        raw[0] = 0x80;
        raw[31] = 1;
        raw[63] = 5;
        let der = raw_to_der(&raw);
        assert_eq!(der[3], 33); // r padded with a zero byte
        assert_eq!(der_to_raw(&der).unwrap(), raw);
        assert_eq!(
            normalise_signature(&der, SignatureEncoding::Raw).unwrap(),
            raw
        );
        assert_eq!(
            normalise_signature(&raw, SignatureEncoding::Der).unwrap(),
            raw
        );
        let mut trailing = der.clone();
        trailing.push(0);
        assert!(der_to_raw(&trailing).is_err());
        assert!(normalise_signature(&der[..der.len() - 1], SignatureEncoding::Der).is_err());
        // Non-minimal encoding of s = 5.
        let nonmin = [0x30, 0x07, 0x02, 0x01, 0x01, 0x02, 0x02, 0x00, 0x05];
        assert!(der_to_raw(&nonmin).is_err());
    }

    #[test]
    fn p256_verification() {
        use p256::ecdsa::signature::hazmat::PrehashSigner;
        let sk = p256::ecdsa::SigningKey::from_slice(&[9u8; 32]).unwrap();
        let point = sk.verifying_key().to_sec1_point(false);
        let msg = b"hello";
        let d = sha256(msg);
        let sig: p256::ecdsa::Signature = sk.sign_prehash(&d).unwrap();
        let raw: [u8; 64] = sig.to_bytes().into();
        let v = SoftwareVerifier::new();
        v.verify_message(Algorithm::EcdsaP256, point.as_bytes(), b"", msg, &raw)
            .unwrap();
        assert!(
            v.verify_message(Algorithm::EcdsaP256, point.as_bytes(), b"", b"bye", &raw)
                .is_err()
        );
    }
}
