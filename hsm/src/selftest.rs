//! The self-tests' checks, defined once: svsd runs them before it serves and
//! periodically, svs-provision's `selftest` runs them for the officer, and
//! both must mean the same thing by "passed".

use sm3::{Digest, Sm3};

use crate::profile::Algorithm;
use crate::signature::SoftwareVerifier;

/// The message the pairwise test signs with each key.
pub const PAIRWISE_MESSAGE: &[u8] = b"SVS self-test: SM2 pairwise consistency";

/// GB/T 32905 example 1: SM3("abc").
const SM3_ABC: [u8; 32] = [
    0x66, 0xc7, 0xf0, 0xf4, 0x62, 0xee, 0xed, 0xd9, 0xd1, 0xf2, 0xd4, 0x6b, 0xdc, 0x10, 0xe4, 0xe2,
    0x41, 0x67, 0xc4, 0x87, 0x5c, 0xf2, 0xf7, 0xa2, 0x29, 0x7d, 0xa0, 0x2b, 0x8f, 0x4b, 0xa8, 0xe0,
];

/// The SM3 known-answer test.
pub fn sm3_known_answer() -> Result<(), String> {
    if <[u8; 32]>::from(Sm3::digest(b"abc")) == SM3_ABC {
        Ok(())
    } else {
        Err("SM3 known-answer test failed".into())
    }
}

/// The pairwise test's check of the signature `raw` the token made over
/// `digest`: it verifies in software, and the same signature over a digest
/// one bit off does not (a verifier that accepts anything would pass the
/// first half alone).
pub fn check_pairwise(
    verifier: &SoftwareVerifier,
    algorithm: Algorithm,
    point: &[u8],
    digest: &[u8; 32],
    raw: &[u8; 64],
) -> Result<(), String> {
    if verifier
        .verify_digest(algorithm, point, digest, raw)
        .is_err()
    {
        return Err("pairwise test signature does not verify".into());
    }
    let mut wrong = *digest;
    wrong[0] ^= 1;
    if verifier
        .verify_digest(algorithm, point, &wrong, raw)
        .is_ok()
    {
        return Err("verification accepts a wrong digest".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sm2::dsa::signature::hazmat::PrehashSigner;

    #[test]
    fn sm3_answers_the_standard() {
        assert_eq!(sm3_known_answer(), Ok(()));
    }

    #[test]
    fn pairwise_passes_a_good_signature_and_names_a_bad_one() {
        let sk = sm2::dsa::SigningKey::from_bytes("1234567812345678", &[7u8; 32].into()).unwrap();
        let point = sk.verifying_key().to_sec1_bytes();
        let digest = [0x42u8; 32];
        let sig: sm2::dsa::Signature = sk.sign_prehash(&digest).unwrap();
        let raw: [u8; 64] = sig.to_bytes().into();
        let v = SoftwareVerifier::new();
        assert_eq!(
            check_pairwise(&v, Algorithm::Sm2, &point, &digest, &raw),
            Ok(())
        );
        let mut bad = raw;
        bad[63] ^= 1;
        assert_eq!(
            check_pairwise(&v, Algorithm::Sm2, &point, &digest, &bad),
            Err("pairwise test signature does not verify".into())
        );
    }
}
