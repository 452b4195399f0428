//! Vendor-defined PKCS#11 numbers for SM2/SM3.
//!
//! PKCS#11 up to 3.2 defines no SM2, SM3 or SM4 identifiers. These are the
//! Sansec (三未信安) values, which TASS shares for key types and key generation
//! and ChainMaker and Koal SDKs use for signing: being numbered like the HSMs
//! the appliance meets in the field is what lets the layers above treat this
//! token as one more vendor profile. The semantics of each sign mechanism are
//! in docs/softtoken.md.

use pkcs11_sys::{CK_KEY_TYPE, CK_MECHANISM_TYPE};

/// `CKK_SM2` (Sansec, TASS).
pub const CKK_SM2: CK_KEY_TYPE = 0x8000_0004;

/// SM2 key-pair generation.
pub const CKM_SM2_KEY_PAIR_GEN: CK_MECHANISM_TYPE = 0x8000_8001;
/// SM3withSM2 over a message: e = SM3(M) (the caller prepends Z), raw r‖s.
pub const CKM_SM3_SM2: CK_MECHANISM_TYPE = 0x8000_8100;
/// As [`CKM_SM3_SM2`], DER signature.
pub const CKM_SM3_SM2_DER: CK_MECHANISM_TYPE = 0x8000_8101;
/// SM3withSM2 over a message with Z: e = SM3(Z ‖ M), raw r‖s.
pub const CKM_SM3_SM2_Z: CK_MECHANISM_TYPE = 0x8000_8102;
/// As [`CKM_SM3_SM2_Z`], DER signature.
pub const CKM_SM3_SM2_Z_DER: CK_MECHANISM_TYPE = 0x8000_8103;
/// SM2 signature of a ready 32-byte e, DER signature.
pub const CKM_SM2_SIGN: CK_MECHANISM_TYPE = 0x8000_8104;
/// SM2 signature of a ready 32-byte e, raw r‖s.
pub const CKM_SM2_SIGN_NO_DER: CK_MECHANISM_TYPE = 0x8000_8105;
/// SM3 digest.
pub const CKM_SM3: CK_MECHANISM_TYPE = 0x8000_9001;

/// DER encoding of the SM2 curve OID 1.2.156.10197.1.301 (`CKA_EC_PARAMS`).
pub const SM2_EC_PARAMS: &[u8] = &[0x06, 0x08, 0x2A, 0x81, 0x1C, 0xCF, 0x55, 0x01, 0x82, 0x2D];

/// The default distinguishing identifier of GM/T 0009.
pub const DEFAULT_SM2_ID: &[u8] = b"1234567812345678";
