//! Vendor profiles: which numbers a given PKCS#11 module uses for SM2 (or
//! ECDSA) keys, and what its "sign a ready digest" mechanism returns.
//!
//! PKCS#11 defines no SM2 identifiers, so every vendor picked its own; the
//! table below is the one place that knows them. Config can pick a profile by
//! name, override any field of it, or add a new one.

use serde::{Deserialize, Serialize};

use crate::error::{HsmError, Result};

/// Which signature algorithm a profile's keys implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    /// SM2 with SM3 (GB/T 32918, GM/T 0009): e = SM3(Z ‖ M).
    Sm2,
    /// ECDSA on P-256 with SHA-256: e = SHA-256(M).
    EcdsaP256,
}

impl Algorithm {
    /// DER `CKA_EC_PARAMS` (the named-curve OID) for keys of this algorithm.
    pub fn ec_params(self) -> &'static [u8] {
        match self {
            Algorithm::Sm2 => SM2_EC_PARAMS,
            Algorithm::EcdsaP256 => P256_EC_PARAMS,
        }
    }
}

/// How a signature is laid out on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SignatureEncoding {
    /// `r ‖ s`, 32 bytes each.
    Raw,
    /// DER `SEQUENCE { r INTEGER, s INTEGER }`.
    Der,
}

/// DER OID 1.2.156.10197.1.301 (SM2 curve).
pub const SM2_EC_PARAMS: &[u8] = &[0x06, 0x08, 0x2A, 0x81, 0x1C, 0xCF, 0x55, 0x01, 0x82, 0x2D];
/// DER OID 1.2.840.10045.3.1.7 (prime256v1).
pub const P256_EC_PARAMS: &[u8] = &[0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07];

/// One vendor's numbering.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VendorProfile {
    /// Name used in config and logs.
    pub name: String,
    /// Signature algorithm of the keys.
    pub algorithm: Algorithm,
    /// `CKA_KEY_TYPE` of the key pair.
    pub key_type: u64,
    /// Key-pair generation mechanism.
    pub keygen_mechanism: u64,
    /// Mechanism that signs a digest computed on the host.
    pub sign_digest_mechanism: u64,
    /// What that mechanism returns. Signatures are also recognised by shape,
    /// because vendors' documentation of this is unreliable.
    pub signature_encoding: SignatureEncoding,
    /// Case-insensitive substrings of CK_INFO manufacturer / library
    /// description or CK_TOKEN_INFO manufacturer / model that identify the vendor.
    #[serde(default)]
    pub recognise: Vec<String>,
}

/// Fields of a profile that config may override; absent fields keep the base.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileOverride {
    /// Profile to start from (built-in or earlier custom one).
    pub base: Option<String>,
    /// Name of the resulting profile; defaults to the base's name.
    pub name: Option<String>,
    /// See [`VendorProfile::algorithm`].
    pub algorithm: Option<Algorithm>,
    /// See [`VendorProfile::key_type`].
    pub key_type: Option<u64>,
    /// See [`VendorProfile::keygen_mechanism`].
    pub keygen_mechanism: Option<u64>,
    /// See [`VendorProfile::sign_digest_mechanism`].
    pub sign_digest_mechanism: Option<u64>,
    /// See [`VendorProfile::signature_encoding`].
    pub signature_encoding: Option<SignatureEncoding>,
    /// See [`VendorProfile::recognise`].
    pub recognise: Option<Vec<String>>,
}

/// CK_INFO / CK_TOKEN_INFO strings used to recognise a vendor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModuleIdentity {
    /// CK_INFO.manufacturerID.
    pub library_manufacturer: String,
    /// CK_INFO.libraryDescription.
    pub library_description: String,
    /// CK_TOKEN_INFO.manufacturerID.
    pub token_manufacturer: String,
    /// CK_TOKEN_INFO.model.
    pub token_model: String,
}

struct BuiltIn {
    name: &'static str,
    algorithm: Algorithm,
    key_type: u64,
    keygen: u64,
    sign_digest: u64,
    encoding: SignatureEncoding,
    recognise: &'static [&'static str],
}

// Numbers from shared/reference/pkcs11-sm2.md. Where the encoding is not
// documented by the vendor (Sansec, Luna, EP11) the guess is raw r‖s; shape
// recognition makes a wrong guess harmless.
const BUILT_IN: &[BuiltIn] = &[
    BuiltIn {
        name: "svs-softtoken",
        algorithm: Algorithm::Sm2,
        key_type: 0x8000_0004,
        keygen: 0x8000_8001,
        sign_digest: 0x8000_8104,
        encoding: SignatureEncoding::Der,
        recognise: &["svs"],
    },
    BuiltIn {
        name: "sansec",
        algorithm: Algorithm::Sm2,
        key_type: 0x8000_0004,
        keygen: 0x8000_8001,
        sign_digest: 0x8000_8104,
        encoding: SignatureEncoding::Raw,
        recognise: &["sansec", "三未"],
    },
    BuiltIn {
        name: "tass",
        algorithm: Algorithm::Sm2,
        key_type: 0x8000_0004,
        keygen: 0x8000_8001,
        sign_digest: 0x8000_8000,
        encoding: SignatureEncoding::Der,
        recognise: &["tass", "天安"],
    },
    BuiltIn {
        name: "thales-luna",
        algorithm: Algorithm::Sm2,
        key_type: 0x8000_0016,
        keygen: 0x8000_0B20,
        sign_digest: 0x8000_0B21,
        encoding: SignatureEncoding::Raw,
        recognise: &["safenet", "luna", "thales"],
    },
    BuiltIn {
        name: "ibm-ep11",
        algorithm: Algorithm::Sm2,
        key_type: 0x8005_0002,
        keygen: 0x8005_000A,
        sign_digest: 0x8005_000B,
        encoding: SignatureEncoding::Raw,
        recognise: &["ep11", "ibm"],
    },
    BuiltIn {
        name: "ecdsa-p256",
        algorithm: Algorithm::EcdsaP256,
        key_type: 0x3,       // CKK_EC
        keygen: 0x1040,      // CKM_EC_KEY_PAIR_GEN
        sign_digest: 0x1041, // CKM_ECDSA
        encoding: SignatureEncoding::Raw,
        recognise: &[],
    },
];

impl VendorProfile {
    /// Every built-in profile.
    pub fn built_in() -> Vec<VendorProfile> {
        BUILT_IN
            .iter()
            .map(|b| VendorProfile {
                name: b.name.to_owned(),
                algorithm: b.algorithm,
                key_type: b.key_type,
                keygen_mechanism: b.keygen,
                sign_digest_mechanism: b.sign_digest,
                signature_encoding: b.encoding,
                recognise: b.recognise.iter().map(|s| (*s).to_owned()).collect(),
            })
            .collect()
    }

    /// Length of the digest the sign mechanism takes.
    pub fn digest_len(&self) -> usize {
        32
    }
}

/// Built-in profiles plus config-defined ones, later entries shadowing earlier.
#[derive(Debug, Clone)]
pub struct ProfileTable {
    profiles: Vec<VendorProfile>,
}

impl Default for ProfileTable {
    fn default() -> Self {
        ProfileTable {
            profiles: VendorProfile::built_in(),
        }
    }
}

impl ProfileTable {
    /// Built-ins with `overrides` applied in order.
    pub fn with_overrides(overrides: &[ProfileOverride]) -> Result<ProfileTable> {
        let mut table = ProfileTable::default();
        for o in overrides {
            let base_name = o.base.as_deref().or(o.name.as_deref()).ok_or_else(|| {
                HsmError::Config("a profile override needs `base` or `name`".into())
            })?;
            let mut p = match table.get(base_name) {
                Some(p) => p.clone(),
                None => {
                    // A wholly new profile must give every number.
                    let missing = |f: &str| {
                        HsmError::Config(format!("new profile {base_name:?}: `{f}` is required"))
                    };
                    VendorProfile {
                        name: base_name.to_owned(),
                        algorithm: o.algorithm.ok_or_else(|| missing("algorithm"))?,
                        key_type: o.key_type.ok_or_else(|| missing("key_type"))?,
                        keygen_mechanism: o
                            .keygen_mechanism
                            .ok_or_else(|| missing("keygen_mechanism"))?,
                        sign_digest_mechanism: o
                            .sign_digest_mechanism
                            .ok_or_else(|| missing("sign_digest_mechanism"))?,
                        signature_encoding: o
                            .signature_encoding
                            .ok_or_else(|| missing("signature_encoding"))?,
                        recognise: Vec::new(),
                    }
                }
            };
            if let Some(v) = &o.name {
                p.name = v.clone();
            }
            if let Some(v) = o.algorithm {
                p.algorithm = v;
            }
            if let Some(v) = o.key_type {
                p.key_type = v;
            }
            if let Some(v) = o.keygen_mechanism {
                p.keygen_mechanism = v;
            }
            if let Some(v) = o.sign_digest_mechanism {
                p.sign_digest_mechanism = v;
            }
            if let Some(v) = o.signature_encoding {
                p.signature_encoding = v;
            }
            if let Some(v) = &o.recognise {
                p.recognise = v.clone();
            }
            table.profiles.retain(|q| q.name != p.name);
            table.profiles.push(p);
        }
        Ok(table)
    }

    /// The profile with this name.
    pub fn get(&self, name: &str) -> Option<&VendorProfile> {
        self.profiles.iter().rev().find(|p| p.name == name)
    }

    /// All profiles.
    pub fn profiles(&self) -> &[VendorProfile] {
        &self.profiles
    }

    /// The profile whose `recognise` strings match the module's identity.
    /// Custom (later) profiles win over built-ins.
    pub fn recognise(&self, id: &ModuleIdentity) -> Option<&VendorProfile> {
        let haystack = [
            &id.library_manufacturer,
            &id.library_description,
            &id.token_manufacturer,
            &id.token_model,
        ]
        .iter()
        .map(|s| s.to_lowercase())
        .collect::<Vec<_>>();
        self.profiles.iter().rev().find(|p| {
            p.recognise.iter().any(|needle| {
                let needle = needle.to_lowercase();
                haystack.iter().any(|h| h.contains(&needle))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_ins_match_the_reference_table() {
        let t = ProfileTable::default();
        let soft = t.get("svs-softtoken").unwrap();
        assert_eq!(
            (
                soft.key_type,
                soft.keygen_mechanism,
                soft.sign_digest_mechanism
            ),
            (0x8000_0004, 0x8000_8001, 0x8000_8104)
        );
        assert_eq!(t.get("tass").unwrap().sign_digest_mechanism, 0x8000_8000);
        assert_eq!(t.get("thales-luna").unwrap().key_type, 0x8000_0016);
        assert_eq!(t.get("ibm-ep11").unwrap().keygen_mechanism, 0x8005_000A);
        assert_eq!(t.get("ecdsa-p256").unwrap().algorithm, Algorithm::EcdsaP256);
        assert_eq!(t.profiles().len(), 6);
    }

    #[test]
    fn overrides_patch_and_add() {
        let o: Vec<ProfileOverride> = toml::from_str::<toml::Table>(
            r#"
            [[p]]
            base = "sansec"
            signature_encoding = "der"
            sign_digest_mechanism = 0x80008105
            [[p]]
            name = "acme"
            algorithm = "sm2"
            key_type = 1
            keygen_mechanism = 2
            sign_digest_mechanism = 3
            signature_encoding = "raw"
            recognise = ["ACME"]
            "#,
        )
        .unwrap()["p"]
            .clone()
            .try_into()
            .unwrap();
        let t = ProfileTable::with_overrides(&o).unwrap();
        let s = t.get("sansec").unwrap();
        assert_eq!(s.signature_encoding, SignatureEncoding::Der);
        assert_eq!(s.sign_digest_mechanism, 0x8000_8105);
        let id = ModuleIdentity {
            token_model: "Acme HSM 9".into(),
            ..Default::default()
        };
        assert_eq!(t.recognise(&id).unwrap().name, "acme");
        let bad = [ProfileOverride {
            name: Some("x".into()),
            ..Default::default()
        }];
        assert!(ProfileTable::with_overrides(&bad).is_err());
    }

    #[test]
    fn recognition_by_manufacturer() {
        let t = ProfileTable::default();
        let id = ModuleIdentity {
            library_manufacturer: "SafeNet, Inc.".into(),
            ..Default::default()
        };
        assert_eq!(t.recognise(&id).unwrap().name, "thales-luna");
        let none = ModuleIdentity {
            library_manufacturer: "SoftHSM".into(),
            ..Default::default()
        };
        assert!(t.recognise(&none).is_none());
    }
}
