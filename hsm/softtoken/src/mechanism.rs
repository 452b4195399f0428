//! The mechanisms the token offers, what `C_GetMechanismInfo` says of them,
//! and the sign/verify/digest operations they drive.

use crate::error::{Error, Result};
use crate::sm2key::{self, MAX_DER_SIGNATURE_LEN, RAW_SIGNATURE_LEN, Sm2PrivateKey, Sm2PublicKey};
use crate::vendor::*;
use pkcs11_sys::*;
use sm3::{Digest, Sm3};
use std::sync::Arc;

/// Every mechanism, in the order `C_GetMechanismList` reports them.
pub const MECHANISMS: &[CK_MECHANISM_TYPE] = &[
    CKM_SM2_KEY_PAIR_GEN,
    CKM_SM3_SM2,
    CKM_SM3_SM2_DER,
    CKM_SM3_SM2_Z,
    CKM_SM3_SM2_Z_DER,
    CKM_SM2_SIGN,
    CKM_SM2_SIGN_NO_DER,
    CKM_SM3,
];

/// `C_GetMechanismInfo`: key sizes in bits, and flags that are true of this
/// software token (no `CKF_HW`).
pub fn info(mechanism: CK_MECHANISM_TYPE) -> Result<CK_MECHANISM_INFO> {
    let ec = CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS;
    let (min, max, flags) = match mechanism {
        CKM_SM2_KEY_PAIR_GEN => (256, 256, CKF_GENERATE_KEY_PAIR | ec),
        CKM_SM3_SM2 | CKM_SM3_SM2_DER | CKM_SM3_SM2_Z | CKM_SM3_SM2_Z_DER | CKM_SM2_SIGN
        | CKM_SM2_SIGN_NO_DER => (256, 256, CKF_SIGN | CKF_VERIFY | ec),
        CKM_SM3 => (0, 0, CKF_DIGEST),
        _ => return Err(Error::MechanismInvalid),
    };
    Ok(CK_MECHANISM_INFO {
        ulMinKeySize: min,
        ulMaxKeySize: max,
        flags,
    })
}

/// How a sign mechanism forms e and encodes the signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Input {
    /// e = SM3(M).
    Message,
    /// e = SM3(Z ‖ M).
    MessageWithZ,
    /// The caller's data is e.
    Digest,
}

/// A sign mechanism with its parameter resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignMechanism {
    input: Input,
    der: bool,
    id: Vec<u8>,
}

impl SignMechanism {
    /// Resolves a mechanism and its parameter. Only the `_Z` mechanisms take
    /// a parameter: the distinguishing ID (none or empty: the default).
    pub fn new(mechanism: CK_MECHANISM_TYPE, param: &[u8]) -> Result<Self> {
        let (input, der) = match mechanism {
            CKM_SM3_SM2 => (Input::Message, false),
            CKM_SM3_SM2_DER => (Input::Message, true),
            CKM_SM3_SM2_Z => (Input::MessageWithZ, false),
            CKM_SM3_SM2_Z_DER => (Input::MessageWithZ, true),
            CKM_SM2_SIGN => (Input::Digest, true),
            CKM_SM2_SIGN_NO_DER => (Input::Digest, false),
            _ => return Err(Error::MechanismInvalid),
        };
        let id = match input {
            Input::MessageWithZ if param.len() > sm2key::MAX_ID_LEN => {
                return Err(Error::MechanismParamInvalid);
            }
            Input::MessageWithZ if param.is_empty() => DEFAULT_SM2_ID.to_vec(),
            Input::MessageWithZ => param.to_vec(),
            _ if !param.is_empty() => return Err(Error::MechanismParamInvalid),
            _ => Vec::new(),
        };
        Ok(SignMechanism { input, der, id })
    }

    /// The length to answer a length query with.
    pub fn max_signature_len(&self) -> usize {
        if self.der {
            MAX_DER_SIGNATURE_LEN
        } else {
            RAW_SIGNATURE_LEN
        }
    }

    fn start(&self, public: &Sm2PublicKey) -> Result<Option<Sm3>> {
        Ok(match self.input {
            Input::Digest => None,
            Input::Message => Some(Sm3::new()),
            Input::MessageWithZ => {
                let mut h = Sm3::new();
                h.update(sm2key::z_digest(&self.id, public.point())?);
                Some(h)
            }
        })
    }
}

/// e from the data of a single-part call, or from a finished hash.
fn e_of(hasher: Option<Sm3>, data: &[u8]) -> Result<[u8; 32]> {
    match hasher {
        Some(mut h) => {
            h.update(data);
            Ok(h.finalize().into())
        }
        None => data.try_into().map_err(|_| Error::DataLenRange),
    }
}

/// An active signing operation in a session.
#[derive(Debug)]
pub struct SignOperation {
    mechanism: SignMechanism,
    key: Arc<Sm2PrivateKey>,
    hasher: Option<Sm3>,
    multi_part: bool,
    /// A signature made for a call whose buffer was too small, with the e
    /// it signs: a retry over the same input gets the signature it was
    /// sized for, a retry over other input gets a new one.
    pending: Option<([u8; 32], Vec<u8>)>,
}

impl SignOperation {
    pub fn new(mechanism: SignMechanism, key: Arc<Sm2PrivateKey>) -> Result<Self> {
        let hasher = mechanism.start(key.public())?;
        Ok(SignOperation {
            mechanism,
            key,
            hasher,
            multi_part: false,
            pending: None,
        })
    }

    pub fn max_len(&self) -> usize {
        self.mechanism.max_signature_len()
    }

    pub fn update(&mut self, data: &[u8]) -> Result<()> {
        match &mut self.hasher {
            Some(h) if self.pending.is_none() => {
                h.update(data);
                self.multi_part = true;
                Ok(())
            }
            Some(_) => Err(Error::OperationActive),
            None => Err(Error::FunctionNotSupported),
        }
    }

    /// The signature for `C_Sign` (data) or `C_SignFinal` (None).
    pub fn signature(&mut self, data: Option<&[u8]>) -> Result<Vec<u8>> {
        let e = match data {
            Some(_) if self.multi_part => return Err(Error::OperationActive),
            Some(d) => e_of(self.hasher.clone(), d)?,
            None if self.hasher.is_none() => return Err(Error::FunctionNotSupported),
            None => e_of(self.hasher.clone(), &[])?,
        };
        if let Some((pending_e, sig)) = &self.pending
            && *pending_e == e
        {
            return Ok(sig.clone());
        }
        let sig = self.key.sign_e(&e)?;
        let bytes = sm2key::encode_signature(&sig, self.mechanism.der);
        self.pending = Some((e, bytes.clone()));
        Ok(bytes)
    }
}

/// An active verification in a session.
#[derive(Debug)]
pub struct VerifyOperation {
    mechanism: SignMechanism,
    key: Arc<Sm2PublicKey>,
    hasher: Option<Sm3>,
    multi_part: bool,
}

impl VerifyOperation {
    pub fn new(mechanism: SignMechanism, key: Arc<Sm2PublicKey>) -> Result<Self> {
        let hasher = mechanism.start(&key)?;
        Ok(VerifyOperation {
            mechanism,
            key,
            hasher,
            multi_part: false,
        })
    }

    pub fn update(&mut self, data: &[u8]) -> Result<()> {
        match &mut self.hasher {
            Some(h) => {
                h.update(data);
                self.multi_part = true;
                Ok(())
            }
            None => Err(Error::FunctionNotSupported),
        }
    }

    /// `C_Verify` (data) or `C_VerifyFinal` (None).
    pub fn verify(self, data: Option<&[u8]>, signature: &[u8]) -> Result<()> {
        let e = match data {
            Some(_) if self.multi_part => return Err(Error::OperationActive),
            Some(d) => e_of(self.hasher, d)?,
            None if self.hasher.is_none() => return Err(Error::FunctionNotSupported),
            None => e_of(self.hasher, &[])?,
        };
        let sig = sm2key::decode_signature(signature, self.mechanism.der)?;
        if self.key.verify_e(&e, &sig) {
            Ok(())
        } else {
            Err(Error::SignatureInvalid)
        }
    }
}

/// Checks a digest mechanism and its (empty) parameter.
pub fn digest_init(mechanism: CK_MECHANISM_TYPE, param: &[u8]) -> Result<Sm3> {
    if mechanism != CKM_SM3 {
        return Err(Error::MechanismInvalid);
    }
    if !param.is_empty() {
        return Err(Error::MechanismParamInvalid);
    }
    Ok(Sm3::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mechanism_parameters() {
        let m = SignMechanism::new(CKM_SM3_SM2_Z_DER, b"").unwrap();
        assert_eq!(m.id, DEFAULT_SM2_ID);
        let m = SignMechanism::new(CKM_SM3_SM2_Z, b"alice").unwrap();
        assert_eq!(m.id, b"alice");
        assert_eq!(
            SignMechanism::new(CKM_SM2_SIGN, b"x"),
            Err(Error::MechanismParamInvalid)
        );
        assert_eq!(
            SignMechanism::new(0x1041, b""),
            Err(Error::MechanismInvalid)
        );
        assert!(info(CKM_SM3).unwrap().flags & CKF_HW == 0);
        assert_eq!(info(0x1041).unwrap_err(), Error::MechanismInvalid);
    }

    #[test]
    fn single_and_multi_part_agree() {
        let key = Arc::new(Sm2PrivateKey::generate().unwrap());
        let public = Arc::new(key.public().clone());
        for mech in [
            CKM_SM3_SM2,
            CKM_SM3_SM2_DER,
            CKM_SM3_SM2_Z,
            CKM_SM3_SM2_Z_DER,
        ] {
            let m = SignMechanism::new(mech, b"").unwrap();
            let mut op = SignOperation::new(m.clone(), key.clone()).unwrap();
            op.update(b"hello ").unwrap();
            op.update(b"world").unwrap();
            let sig = op.signature(None).unwrap();
            VerifyOperation::new(m.clone(), public.clone())
                .unwrap()
                .verify(Some(b"hello world"), &sig)
                .unwrap();
            let err = VerifyOperation::new(m.clone(), public.clone())
                .unwrap()
                .verify(Some(b"hello world!"), &sig)
                .unwrap_err();
            assert_eq!(err, Error::SignatureInvalid);
        }
    }

    #[test]
    fn digest_mechanisms_take_exactly_32_bytes() {
        let key = Arc::new(Sm2PrivateKey::generate().unwrap());
        let m = SignMechanism::new(CKM_SM2_SIGN_NO_DER, b"").unwrap();
        let mut op = SignOperation::new(m.clone(), key.clone()).unwrap();
        assert_eq!(op.update(b"x"), Err(Error::FunctionNotSupported));
        assert_eq!(op.signature(Some(&[0u8; 31])), Err(Error::DataLenRange));
        let sig = op.signature(Some(&[1u8; 32])).unwrap();
        assert_eq!(sig.len(), 64);
        // A retry after "buffer too small" gets the same signature; a
        // retry over another digest gets a signature over that digest.
        assert_eq!(op.signature(Some(&[1u8; 32])).unwrap(), sig);
        let other = op.signature(Some(&[2u8; 32])).unwrap();
        let parsed = sm2key::decode_signature(&other, false).unwrap();
        assert!(key.public().verify_e(&[2u8; 32], &parsed));
        assert!(!key.public().verify_e(&[1u8; 32], &parsed));
    }
}
