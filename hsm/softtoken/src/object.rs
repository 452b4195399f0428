//! Objects, their attributes, and the rules for creating and changing them.

use crate::error::{Error, Result};
use crate::sm2key::{Sm2PrivateKey, Sm2PublicKey};
use crate::vendor::{CKK_SM2, CKM_SM2_KEY_PAIR_GEN, SM2_EC_PARAMS};
use pkcs11_sys::*;
use std::collections::BTreeMap;
use std::sync::Arc;
use zeroize::Zeroizing;

/// Attribute values in the byte layout the C ABI uses (`CK_BBOOL` one byte,
/// `CK_ULONG` native).
pub type Attrs = BTreeMap<CK_ATTRIBUTE_TYPE, Vec<u8>>;

/// One attribute of a caller's template.
pub type Attribute = (CK_ATTRIBUTE_TYPE, Vec<u8>);

/// A caller's template, already copied out of C memory.
pub type Template = Vec<Attribute>;

pub fn ulong(v: CK_ULONG) -> Vec<u8> {
    v.to_ne_bytes().to_vec()
}

pub fn bool_(v: bool) -> Vec<u8> {
    vec![CK_BBOOL::from(v)]
}

fn as_ulong(v: &[u8]) -> Option<CK_ULONG> {
    Some(CK_ULONG::from_ne_bytes(v.try_into().ok()?))
}

fn as_bool(v: &[u8]) -> Option<bool> {
    match v {
        [0] => Some(false),
        [1] => Some(true),
        _ => None,
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Bool,
    Ulong,
    Bytes,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Access {
    /// Set by the caller at creation only.
    Create,
    /// Set at creation and changed later with `C_SetAttributeValue`.
    Modify,
    /// Set by the token only.
    ReadOnly,
}

use Access::*;
use Kind::*;

const COMMON: &[(CK_ATTRIBUTE_TYPE, Kind, Access)] = &[
    (CKA_CLASS, Ulong, Create),
    (CKA_TOKEN, Bool, Create),
    (CKA_PRIVATE, Bool, Create),
    (CKA_MODIFIABLE, Bool, Create),
    (CKA_LABEL, Bytes, Modify),
    (CKA_COPYABLE, Bool, ReadOnly),
    (CKA_DESTROYABLE, Bool, Create),
];

const KEY: &[(CK_ATTRIBUTE_TYPE, Kind, Access)] = &[
    (CKA_KEY_TYPE, Ulong, Create),
    (CKA_ID, Bytes, Modify),
    (CKA_START_DATE, Bytes, Modify),
    (CKA_END_DATE, Bytes, Modify),
    (CKA_DERIVE, Bool, Create),
    (CKA_LOCAL, Bool, ReadOnly),
    (CKA_KEY_GEN_MECHANISM, Ulong, ReadOnly),
    (CKA_SUBJECT, Bytes, Modify),
    (CKA_EC_PARAMS, Bytes, Create),
    (CKA_EC_POINT, Bytes, Create),
    (CKA_PUBLIC_KEY_INFO, Bytes, ReadOnly),
];

const PUBLIC_KEY: &[(CK_ATTRIBUTE_TYPE, Kind, Access)] = &[
    (CKA_ENCRYPT, Bool, Create),
    (CKA_VERIFY, Bool, Modify),
    (CKA_VERIFY_RECOVER, Bool, Create),
    (CKA_WRAP, Bool, Create),
    (CKA_TRUSTED, Bool, ReadOnly),
];

const PRIVATE_KEY: &[(CK_ATTRIBUTE_TYPE, Kind, Access)] = &[
    (CKA_SENSITIVE, Bool, Modify),
    (CKA_DECRYPT, Bool, Create),
    (CKA_SIGN, Bool, Modify),
    (CKA_SIGN_RECOVER, Bool, Create),
    (CKA_UNWRAP, Bool, Create),
    (CKA_EXTRACTABLE, Bool, Modify),
    (CKA_ALWAYS_SENSITIVE, Bool, ReadOnly),
    (CKA_NEVER_EXTRACTABLE, Bool, ReadOnly),
    (CKA_WRAP_WITH_TRUSTED, Bool, Create),
    (CKA_ALWAYS_AUTHENTICATE, Bool, Create),
];

const CERTIFICATE: &[(CK_ATTRIBUTE_TYPE, Kind, Access)] = &[
    (CKA_CERTIFICATE_TYPE, Ulong, Create),
    (CKA_TRUSTED, Bool, ReadOnly),
    (CKA_CERTIFICATE_CATEGORY, Ulong, Create),
    (CKA_START_DATE, Bytes, Modify),
    (CKA_END_DATE, Bytes, Modify),
    (CKA_SUBJECT, Bytes, Create),
    (CKA_ID, Bytes, Modify),
    (CKA_ISSUER, Bytes, Create),
    (CKA_SERIAL_NUMBER, Bytes, Create),
    (CKA_VALUE, Bytes, Create),
];

const DATA: &[(CK_ATTRIBUTE_TYPE, Kind, Access)] = &[
    (CKA_APPLICATION, Bytes, Modify),
    (CKA_OBJECT_ID, Bytes, Create),
    (CKA_VALUE, Bytes, Modify),
];

fn class_schema(class: CK_OBJECT_CLASS) -> &'static [&'static [(CK_ATTRIBUTE_TYPE, Kind, Access)]] {
    match class {
        CKO_PUBLIC_KEY => &[COMMON, KEY, PUBLIC_KEY],
        CKO_PRIVATE_KEY => &[COMMON, KEY, PRIVATE_KEY],
        CKO_CERTIFICATE => &[COMMON, CERTIFICATE],
        CKO_DATA => &[COMMON, DATA],
        _ => &[],
    }
}

fn spec(class: CK_OBJECT_CLASS, t: CK_ATTRIBUTE_TYPE) -> Option<(Kind, Access)> {
    class_schema(class)
        .iter()
        .flat_map(|s| s.iter())
        .find(|(a, _, _)| *a == t)
        .map(|(_, k, a)| (*k, *a))
}

fn check_value(kind: Kind, v: &[u8]) -> Result<()> {
    let ok = match kind {
        Bool => as_bool(v).is_some(),
        Ulong => as_ulong(v).is_some(),
        Bytes => true,
    };
    if ok {
        Ok(())
    } else {
        Err(Error::AttributeValueInvalid)
    }
}

/// The key material an object carries beside its attributes.
#[derive(Clone, Debug)]
pub enum Material {
    None,
    Public(Arc<Sm2PublicKey>),
    /// A private key; `secret` is absent while the token is locked.
    Private {
        public: Arc<Sm2PublicKey>,
        secret: Option<Arc<Sm2PrivateKey>>,
    },
}

/// One PKCS#11 object.
#[derive(Clone, Debug)]
pub struct Object {
    /// Stable identity: persisted for token objects, and the associated data
    /// that binds a sealed private value to its object.
    pub uid: u64,
    pub attrs: Attrs,
    pub material: Material,
}

impl Object {
    pub fn class(&self) -> CK_OBJECT_CLASS {
        self.ulong(CKA_CLASS).unwrap_or(CK_UNAVAILABLE_INFORMATION)
    }
    pub fn bool(&self, t: CK_ATTRIBUTE_TYPE) -> bool {
        self.attrs.get(&t).and_then(|v| as_bool(v)).unwrap_or(false)
    }
    pub fn ulong(&self, t: CK_ATTRIBUTE_TYPE) -> Option<CK_ULONG> {
        self.attrs.get(&t).and_then(|v| as_ulong(v))
    }
    pub fn is_token(&self) -> bool {
        self.bool(CKA_TOKEN)
    }
    pub fn is_private(&self) -> bool {
        self.bool(CKA_PRIVATE)
    }

    /// Whether every attribute of the template is present with that value.
    pub fn matches(&self, template: &[Attribute]) -> bool {
        template
            .iter()
            .all(|(t, v)| self.attrs.get(t).is_some_and(|mine| mine == v))
    }

    /// The value `C_GetAttributeValue` returns for one attribute (wiped
    /// when dropped: it may be an exported private value).
    pub fn get(&self, t: CK_ATTRIBUTE_TYPE) -> Result<Zeroizing<Vec<u8>>> {
        if t == CKA_VALUE && self.class() == CKO_PRIVATE_KEY {
            if self.bool(CKA_SENSITIVE) || !self.bool(CKA_EXTRACTABLE) {
                return Err(Error::AttributeSensitive);
            }
            return match &self.material {
                Material::Private {
                    secret: Some(secret),
                    ..
                } => Ok(Zeroizing::new(secret.to_bytes().to_vec())),
                _ => Err(Error::AttributeSensitive),
            };
        }
        self.attrs
            .get(&t)
            .cloned()
            .map(Zeroizing::new)
            .ok_or(Error::AttributeTypeInvalid)
    }

    /// Rough size in bytes, for `C_GetObjectSize`.
    pub fn size(&self) -> usize {
        self.attrs.values().map(|v| v.len() + 16).sum::<usize>()
            + match self.material {
                Material::Private { .. } => 32,
                _ => 0,
            }
    }

    /// Applies `C_SetAttributeValue`; all or nothing.
    pub fn set(&mut self, template: &[Attribute]) -> Result<()> {
        if !self.bool(CKA_MODIFIABLE) {
            return Err(Error::ActionProhibited);
        }
        let class = self.class();
        let mut next = self.attrs.clone();
        for (t, v) in template {
            let (kind, access) = spec(class, *t).ok_or(Error::AttributeTypeInvalid)?;
            check_value(kind, v)?;
            if access != Modify {
                return Err(Error::AttributeReadOnly);
            }
            let now = self.bool(*t);
            match *t {
                CKA_SENSITIVE if now && v[0] == 0 => return Err(Error::AttributeReadOnly),
                CKA_EXTRACTABLE if !now && v[0] == 1 => return Err(Error::AttributeReadOnly),
                _ => {}
            }
            next.insert(*t, v.clone());
        }
        self.attrs = next;
        Ok(())
    }
}

/// Copies the template into a class's attributes, refusing what the class
/// does not have, values of the wrong shape, and attributes only the token
/// sets.
fn apply_template(class: CK_OBJECT_CLASS, attrs: &mut Attrs, template: &[Attribute]) -> Result<()> {
    for (t, v) in template {
        let (kind, access) = spec(class, *t).ok_or(Error::AttributeTypeInvalid)?;
        check_value(kind, v)?;
        if *t == CKA_CLASS {
            if as_ulong(v) != Some(class) {
                return Err(Error::TemplateInconsistent);
            }
            continue;
        }
        if access == ReadOnly {
            return Err(Error::AttributeReadOnly);
        }
        attrs.insert(*t, v.clone());
    }
    Ok(())
}

fn base_attrs(class: CK_OBJECT_CLASS, private: bool) -> Attrs {
    let mut a = Attrs::new();
    a.insert(CKA_CLASS, ulong(class));
    a.insert(CKA_TOKEN, bool_(false));
    a.insert(CKA_PRIVATE, bool_(private));
    a.insert(CKA_MODIFIABLE, bool_(true));
    a.insert(CKA_LABEL, Vec::new());
    a.insert(CKA_COPYABLE, bool_(false));
    a.insert(CKA_DESTROYABLE, bool_(true));
    a
}

fn key_attrs(a: &mut Attrs, public: &Sm2PublicKey, local: bool) {
    a.insert(CKA_KEY_TYPE, ulong(CKK_SM2));
    a.insert(CKA_ID, Vec::new());
    a.insert(CKA_START_DATE, Vec::new());
    a.insert(CKA_END_DATE, Vec::new());
    a.insert(CKA_DERIVE, bool_(false));
    a.insert(CKA_LOCAL, bool_(local));
    a.insert(
        CKA_KEY_GEN_MECHANISM,
        ulong(if local {
            CKM_SM2_KEY_PAIR_GEN
        } else {
            CK_UNAVAILABLE_INFORMATION
        }),
    );
    a.insert(CKA_SUBJECT, Vec::new());
    a.insert(CKA_EC_PARAMS, SM2_EC_PARAMS.to_vec());
    a.insert(CKA_EC_POINT, public.ec_point_der());
    a.insert(CKA_PUBLIC_KEY_INFO, public.spki_der());
}

fn require_sm2(template: &[Attribute]) -> Result<()> {
    for (t, v) in template {
        match *t {
            CKA_KEY_TYPE if as_ulong(v) != Some(CKK_SM2) => {
                return Err(Error::TemplateInconsistent);
            }
            CKA_EC_PARAMS if v.as_slice() != SM2_EC_PARAMS => {
                return Err(Error::TemplateInconsistent);
            }
            _ => {}
        }
    }
    Ok(())
}

fn public_key_object(
    uid: u64,
    public: Arc<Sm2PublicKey>,
    template: &[Attribute],
    local: bool,
) -> Result<Object> {
    require_sm2(template)?;
    let mut a = base_attrs(CKO_PUBLIC_KEY, false);
    key_attrs(&mut a, &public, local);
    for (t, v) in [
        (CKA_ENCRYPT, false),
        (CKA_VERIFY, true),
        (CKA_VERIFY_RECOVER, false),
        (CKA_WRAP, false),
        (CKA_TRUSTED, false),
    ] {
        a.insert(t, bool_(v));
    }
    let point = a.get(&CKA_EC_POINT).cloned();
    apply_template(CKO_PUBLIC_KEY, &mut a, template)?;
    // The point is the key: generated keys keep the token's, imported ones
    // were parsed from the template before we got here.
    if let Some(point) = point {
        a.insert(CKA_EC_POINT, point);
    }
    Ok(Object {
        uid,
        attrs: a,
        material: Material::Public(public),
    })
}

/// Builds the two objects of `C_GenerateKeyPair`.
pub fn generate_pair(
    public_uid: u64,
    private_uid: u64,
    public_template: &[Attribute],
    private_template: &[Attribute],
) -> Result<(Object, Object)> {
    for (t, _) in private_template {
        if *t == CKA_EC_POINT || *t == CKA_VALUE {
            return Err(Error::TemplateInconsistent);
        }
    }
    if public_template.iter().any(|(t, _)| *t == CKA_EC_POINT) {
        return Err(Error::TemplateInconsistent);
    }
    require_sm2(private_template)?;
    let secret = Arc::new(Sm2PrivateKey::generate()?);
    let public = Arc::new(secret.public().clone());
    let public_obj = public_key_object(public_uid, public.clone(), public_template, true)?;

    let mut a = base_attrs(CKO_PRIVATE_KEY, true);
    key_attrs(&mut a, &public, true);
    for (t, v) in [
        (CKA_SENSITIVE, true),
        (CKA_DECRYPT, false),
        (CKA_SIGN, true),
        (CKA_SIGN_RECOVER, false),
        (CKA_UNWRAP, false),
        (CKA_EXTRACTABLE, false),
        (CKA_WRAP_WITH_TRUSTED, false),
        (CKA_ALWAYS_AUTHENTICATE, false),
    ] {
        a.insert(t, bool_(v));
    }
    apply_template(CKO_PRIVATE_KEY, &mut a, private_template)?;
    let sensitive = a.get(&CKA_SENSITIVE).is_some_and(|v| v == &[1]);
    let extractable = a.get(&CKA_EXTRACTABLE).is_some_and(|v| v == &[1]);
    a.insert(CKA_ALWAYS_SENSITIVE, bool_(sensitive));
    a.insert(CKA_NEVER_EXTRACTABLE, bool_(!extractable));
    if a.get(&CKA_ALWAYS_AUTHENTICATE).is_some_and(|v| v == &[1]) {
        // Context-specific login is not offered; a key that demanded it
        // could never be used.
        return Err(Error::TemplateInconsistent);
    }
    let private_obj = Object {
        uid: private_uid,
        attrs: a,
        material: Material::Private {
            public,
            secret: Some(secret),
        },
    };
    Ok((public_obj, private_obj))
}

/// Builds the object of `C_CreateObject`: SM2 public keys, X.509
/// certificates and data objects. Private keys are only ever generated here.
pub fn create(uid: u64, template: &[Attribute]) -> Result<Object> {
    let class = template
        .iter()
        .find(|(t, _)| *t == CKA_CLASS)
        .and_then(|(_, v)| as_ulong(v))
        .ok_or(Error::TemplateIncomplete)?;
    match class {
        CKO_PUBLIC_KEY => {
            let point = template
                .iter()
                .find(|(t, _)| *t == CKA_EC_POINT)
                .map(|(_, v)| v.as_slice())
                .ok_or(Error::TemplateIncomplete)?;
            if !template.iter().any(|(t, _)| *t == CKA_KEY_TYPE) {
                return Err(Error::TemplateIncomplete);
            }
            let raw = match point {
                [0x04, 0x41, rest @ ..] if rest.len() == 65 => rest,
                _ => point,
            };
            let public = Arc::new(Sm2PublicKey::from_uncompressed(raw)?);
            let rest: Template = template
                .iter()
                .filter(|(t, _)| *t != CKA_EC_POINT)
                .cloned()
                .collect();
            public_key_object(uid, public, &rest, false)
        }
        CKO_CERTIFICATE => {
            let mut a = base_attrs(CKO_CERTIFICATE, false);
            a.insert(CKA_TRUSTED, bool_(false));
            a.insert(CKA_CERTIFICATE_CATEGORY, ulong(0));
            a.insert(CKA_ID, Vec::new());
            a.insert(CKA_START_DATE, Vec::new());
            a.insert(CKA_END_DATE, Vec::new());
            apply_template(CKO_CERTIFICATE, &mut a, template)?;
            if a.get(&CKA_CERTIFICATE_TYPE).and_then(|v| as_ulong(v)) != Some(CKC_X_509) {
                return Err(if a.contains_key(&CKA_CERTIFICATE_TYPE) {
                    Error::TemplateInconsistent
                } else {
                    Error::TemplateIncomplete
                });
            }
            let der = a.get(&CKA_VALUE).ok_or(Error::TemplateIncomplete)?;
            let fields = crate::certificate::parse(der)?;
            a.entry(CKA_SUBJECT).or_insert(fields.subject);
            a.entry(CKA_ISSUER).or_insert(fields.issuer);
            a.entry(CKA_SERIAL_NUMBER).or_insert(fields.serial);
            Ok(Object {
                uid,
                attrs: a,
                material: Material::None,
            })
        }
        CKO_DATA => {
            let mut a = base_attrs(CKO_DATA, false);
            a.insert(CKA_APPLICATION, Vec::new());
            a.insert(CKA_OBJECT_ID, Vec::new());
            a.insert(CKA_VALUE, Vec::new());
            apply_template(CKO_DATA, &mut a, template)?;
            Ok(Object {
                uid,
                attrs: a,
                material: Material::None,
            })
        }
        CKO_PRIVATE_KEY | CKO_SECRET_KEY => Err(Error::TemplateInconsistent),
        _ => Err(Error::AttributeValueInvalid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(pairs: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)]) -> Template {
        pairs.to_vec()
    }

    #[test]
    fn generated_pair_has_the_expected_attributes() {
        let (public, private) = generate_pair(
            1,
            2,
            &t(&[(CKA_TOKEN, bool_(true)), (CKA_LABEL, b"k".to_vec())]),
            &t(&[(CKA_TOKEN, bool_(true)), (CKA_ID, vec![1, 2])]),
        )
        .unwrap();
        assert_eq!(public.class(), CKO_PUBLIC_KEY);
        assert!(public.bool(CKA_VERIFY) && !public.is_private());
        assert_eq!(private.ulong(CKA_KEY_TYPE), Some(CKK_SM2));
        assert!(private.bool(CKA_SENSITIVE) && private.bool(CKA_ALWAYS_SENSITIVE));
        assert!(private.is_private() && private.bool(CKA_LOCAL));
        assert_eq!(private.get(CKA_VALUE), Err(Error::AttributeSensitive));
        assert_eq!(
            public.get(CKA_EC_POINT).unwrap(),
            private.get(CKA_EC_POINT).unwrap()
        );
    }

    #[test]
    fn templates_are_checked() {
        let err = generate_pair(1, 2, &t(&[(CKA_KEY_TYPE, ulong(CKK_EC))]), &[]).unwrap_err();
        assert_eq!(err, Error::TemplateInconsistent);
        let err = generate_pair(1, 2, &t(&[(CKA_LOCAL, bool_(true))]), &[]).unwrap_err();
        assert_eq!(err, Error::AttributeReadOnly);
        let err = generate_pair(1, 2, &t(&[(CKA_TOKEN, vec![2])]), &[]).unwrap_err();
        assert_eq!(err, Error::AttributeValueInvalid);
        let err = generate_pair(1, 2, &t(&[(CKA_SIGN, bool_(true))]), &[]).unwrap_err();
        assert_eq!(err, Error::AttributeTypeInvalid);
        let err = create(3, &t(&[(CKA_CLASS, ulong(CKO_PRIVATE_KEY))])).unwrap_err();
        assert_eq!(err, Error::TemplateInconsistent);
    }

    #[test]
    fn set_attribute_rules() {
        let (_, mut private) = generate_pair(1, 2, &[], &[]).unwrap();
        private.set(&t(&[(CKA_LABEL, b"new".to_vec())])).unwrap();
        assert_eq!(private.get(CKA_LABEL).unwrap().as_slice(), b"new");
        assert_eq!(
            private.set(&t(&[(CKA_SENSITIVE, bool_(false))])),
            Err(Error::AttributeReadOnly)
        );
        assert_eq!(
            private.set(&t(&[(CKA_KEY_TYPE, ulong(0))])),
            Err(Error::AttributeReadOnly)
        );
        // All or nothing: the label is not changed by a failing template.
        assert!(
            private
                .set(&t(&[(CKA_LABEL, b"x".to_vec()), (CKA_LOCAL, bool_(false))]))
                .is_err()
        );
        assert_eq!(private.get(CKA_LABEL).unwrap().as_slice(), b"new");
    }

    #[test]
    fn public_key_import_accepts_both_point_forms() {
        let key = Sm2PrivateKey::generate().unwrap();
        let p = key.public();
        for point in [p.ec_point_der(), p.point().to_vec()] {
            let o = create(
                9,
                &t(&[
                    (CKA_CLASS, ulong(CKO_PUBLIC_KEY)),
                    (CKA_KEY_TYPE, ulong(CKK_SM2)),
                    (CKA_EC_POINT, point),
                ]),
            )
            .unwrap();
            assert_eq!(*o.get(CKA_EC_POINT).unwrap(), p.ec_point_der());
        }
        let mut bad = p.point().to_vec();
        bad[10] ^= 0x55;
        assert!(
            create(
                9,
                &t(&[
                    (CKA_CLASS, ulong(CKO_PUBLIC_KEY)),
                    (CKA_KEY_TYPE, ulong(CKK_SM2)),
                    (CKA_EC_POINT, bad),
                ]),
            )
            .is_err()
        );
    }
}
