//! Entry points for the fuzz targets in `hsm/softtoken/fuzz/` (and the unit
//! test that runs them over fixed inputs): every parser of outside input,
//! reachable without the C ABI. None of these may panic.

use crate::object::{self, Template};
use pkcs11_sys::*;

/// A token file as read from disk.
pub fn token_file(data: &[u8]) {
    if let Ok(file) = serde_json::from_slice::<crate::store::TokenFile>(data) {
        for stored in &file.objects {
            let _ = crate::token::from_stored(stored, None);
        }
        let key = zeroize::Zeroizing::new([7u8; 16]);
        for stored in &file.objects {
            let _ = crate::token::from_stored(stored, Some(&key));
        }
        let _ = file.so.unwrap_key(b"1234", "so");
    }
}

const TYPES: [CK_ATTRIBUTE_TYPE; 16] = [
    CKA_CLASS,
    CKA_TOKEN,
    CKA_PRIVATE,
    CKA_LABEL,
    CKA_VALUE,
    CKA_CERTIFICATE_TYPE,
    CKA_KEY_TYPE,
    CKA_ID,
    CKA_SENSITIVE,
    CKA_SIGN,
    CKA_VERIFY,
    CKA_EXTRACTABLE,
    CKA_EC_PARAMS,
    CKA_EC_POINT,
    CKA_SUBJECT,
    CKA_MODIFIABLE,
];

/// Turns bytes into a template: per attribute one byte selecting the type
/// (or, above the table, any type), one length byte, then the value.
fn template(mut data: &[u8]) -> (Template, &[u8]) {
    let mut t = Vec::new();
    while let [sel, len, rest @ ..] = data {
        if *sel == 0xFF {
            return (t, rest);
        }
        let ty = TYPES
            .get(usize::from(*sel))
            .copied()
            .unwrap_or(CK_ATTRIBUTE_TYPE::from(*sel) << 4);
        let n = usize::from(*len).min(rest.len());
        let mut value = rest[..n].to_vec();
        // Small values stand for CK_ULONG/CK_BBOOL-shaped ones too.
        if n == 1 && *sel < 2 {
            value = (CK_ULONG::from(rest[0])).to_ne_bytes().to_vec();
        }
        t.push((ty, value));
        data = &rest[n..];
    }
    (t, data)
}

/// Templates for C_CreateObject, C_GenerateKeyPair and C_SetAttributeValue.
pub fn object_template(data: &[u8]) {
    let (first, rest) = template(data);
    let (second, _) = template(rest);
    let _ = object::create(1, &first);
    if let Ok((mut public, mut private)) = object::generate_pair(1, 2, &first, &second) {
        let _ = public.set(&second);
        let _ = private.set(&first);
        let _ = private.get(CKA_VALUE);
    }
}

/// Signatures, points and certificates.
pub fn signature_and_point(data: &[u8]) {
    let _ = crate::sm2key::decode_signature(data, true);
    let _ = crate::sm2key::decode_signature(data, false);
    let _ = crate::certificate::parse(data);
    if let Ok(p) = crate::sm2key::Sm2PublicKey::from_uncompressed(data.get(..65).unwrap_or(data))
        && let (Some(e), Some(sig)) = (data.get(65..97), data.get(97..))
        && let (Ok(e), Ok(sig)) = (
            <[u8; 32]>::try_from(e),
            crate::sm2key::decode_signature(sig, true),
        )
    {
        let _ = p.verify_e(&e, &sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fuzz entry points over a fixed spread of inputs, so every test
    /// run exercises them (the fuzzer explores far more in `.ci/fuzz`).
    #[test]
    fn entry_points_survive_hostile_inputs() {
        let mut inputs: Vec<Vec<u8>> = vec![
            vec![],
            b"{}".to_vec(),
            br#"{"version":1,"label":"zz","serial":"x","so":{"salt":"","iterations":0,"wrapped_key":""},"user":null,"so_failures":0,"user_failures":0,"objects":[{"uid":1,"attrs":{"0":"00"}}]}"#.to_vec(),
            vec![0x30, 0x80, 0x02, 0x01],
            vec![0x04; 200],
            vec![0, 1, 3, 1, 1, 4, 0xFF, 0, 1, 2],
        ];
        let mut x: u32 = 0x1234_5678;
        for len in [1usize, 7, 64, 65, 97, 160, 300] {
            let v = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            inputs.push(v);
        }
        for input in &inputs {
            token_file(input);
            object_template(input);
            signature_and_point(input);
        }
    }
}
