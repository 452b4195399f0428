//! Key generation, object attributes, object creation and search, private
//! object visibility and persistence (docs/softtoken.md "Objects", "Storage").

mod common;

use common::*;
use cryptoki::error::RvError;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{
    Attribute, AttributeInfo, AttributeType, CertificateType, KeyType, ObjectClass,
};
use cryptoki::session::UserType;
use sm2::elliptic_curve::sec1::ToSec1Point;

#[test]
fn generate_key_pair_attributes() {
    run_in_child("generate_key_pair_attributes", || {
        let (p, slot) = setup();
        let s = user_session(&p, slot);
        let kp = gen_keypair(&s, true, "k1");
        assert_ne!(kp.public, kp.private);

        let pubattrs = s
            .get_attributes(
                kp.public,
                &[
                    AttributeType::Class,
                    AttributeType::KeyType,
                    AttributeType::Token,
                    AttributeType::Label,
                    AttributeType::Id,
                    AttributeType::Verify,
                    AttributeType::EcParams,
                    AttributeType::PublicKeyInfo,
                    AttributeType::Local,
                ],
            )
            .expect("public key attributes");
        assert!(pubattrs.contains(&Attribute::Class(ObjectClass::PUBLIC_KEY)));
        assert!(pubattrs.contains(&Attribute::KeyType(sm2_key_type())));
        assert!(pubattrs.contains(&Attribute::Token(true)));
        assert!(pubattrs.contains(&Attribute::Label(b"k1".to_vec())));
        assert!(pubattrs.contains(&Attribute::Id(b"k1".to_vec())));
        assert!(pubattrs.contains(&Attribute::Verify(true)));
        assert!(pubattrs.contains(&Attribute::EcParams(SM2_EC_PARAMS.to_vec())));
        assert!(
            pubattrs.contains(&Attribute::PublicKeyInfo(spki_der(&kp.point))),
            "CKA_PUBLIC_KEY_INFO must be the SPKI of CKA_EC_POINT: {pubattrs:?}"
        );
        assert!(
            pubattrs.contains(&Attribute::Local(true)),
            "generated keys are CKA_LOCAL"
        );
        // The point is on the curve.
        sm2::PublicKey::from_sec1_bytes(&kp.point).expect("CKA_EC_POINT is a valid SM2 point");

        let privattrs = s
            .get_attributes(
                kp.private,
                &[
                    AttributeType::Class,
                    AttributeType::KeyType,
                    AttributeType::Private,
                    AttributeType::Sensitive,
                    AttributeType::Sign,
                    AttributeType::EcParams,
                    AttributeType::EcPoint,
                    AttributeType::PublicKeyInfo,
                    AttributeType::Local,
                    AttributeType::AlwaysSensitive,
                ],
            )
            .expect("private key attributes");
        assert!(privattrs.contains(&Attribute::Class(ObjectClass::PRIVATE_KEY)));
        assert!(privattrs.contains(&Attribute::KeyType(sm2_key_type())));
        assert!(privattrs.contains(&Attribute::Private(true)));
        assert!(privattrs.contains(&Attribute::Sensitive(true)));
        assert!(privattrs.contains(&Attribute::Sign(true)));
        assert!(privattrs.contains(&Attribute::EcParams(SM2_EC_PARAMS.to_vec())));
        assert!(
            privattrs.contains(&Attribute::EcPoint(wrap_ec_point(&kp.point))),
            "private key carries the same CKA_EC_POINT"
        );
        assert!(privattrs.contains(&Attribute::PublicKeyInfo(spki_der(&kp.point))));
        assert!(privattrs.contains(&Attribute::Local(true)));
        assert!(privattrs.contains(&Attribute::AlwaysSensitive(true)));

        // Sensitive CKA_VALUE, unknown attributes.
        let info = s
            .get_attribute_info(
                kp.private,
                &[
                    AttributeType::Value,
                    AttributeType::Modulus,
                    AttributeType::VendorDefined(0x8FFF_FFF0),
                    AttributeType::Label,
                ],
            )
            .expect("C_GetAttributeValue infos");
        assert!(
            matches!(info[0], AttributeInfo::Sensitive),
            "sensitive CKA_VALUE: {info:?}"
        );
        assert!(
            matches!(info[1], AttributeInfo::TypeInvalid),
            "CKA_MODULUS on an SM2 key: {info:?}"
        );
        assert!(
            matches!(info[2], AttributeInfo::TypeInvalid),
            "unknown vendor attribute: {info:?}"
        );
        assert!(
            matches!(info[3], AttributeInfo::Available(2)),
            "label length: {info:?}"
        );

        // Two key pairs differ.
        let kp2 = gen_keypair(&s, false, "k2");
        assert_ne!(kp.point, kp2.point);
    });
}

#[test]
fn extractable_private_value_matches_public_point() {
    run_in_child("extractable_private_value_matches_public_point", || {
        let (p, slot) = setup();
        let s = user_session(&p, slot);
        let kp = gen_keypair_with(
            &s,
            false,
            "plain",
            &[],
            &[Attribute::Sensitive(false), Attribute::Extractable(true)],
        );
        let v = s
            .get_attributes(kp.private, &[AttributeType::Value])
            .expect("CKA_VALUE of a non-sensitive extractable key");
        let Some(Attribute::Value(d)) = v.first() else {
            panic!("no CKA_VALUE: {v:?}")
        };
        assert_eq!(d.len(), 32, "SM2 private value is 32 bytes");
        let sk = sm2::SecretKey::from_slice(d).expect("valid scalar");
        let pk = sk.public_key().to_sec1_point(false);
        assert_eq!(pk.as_bytes(), kp.point.as_slice(), "d·G = CKA_EC_POINT");

        // Non-sensitive but unextractable: still refused.
        let kp2 = gen_keypair_with(
            &s,
            false,
            "unextr",
            &[],
            &[Attribute::Sensitive(false), Attribute::Extractable(false)],
        );
        assert!(matches!(
            s.get_attribute_info(kp2.private, &[AttributeType::Value])
                .expect("info")[0],
            AttributeInfo::Sensitive
        ));

        // Sensitive false -> true is allowed and then the value is hidden.
        s.update_attributes(kp.private, &[Attribute::Sensitive(true)])
            .expect("CKA_SENSITIVE false -> true");
        assert!(matches!(
            s.get_attribute_info(kp.private, &[AttributeType::Value])
                .expect("info")[0],
            AttributeInfo::Sensitive
        ));
        // ... and never back.
        assert_rv(
            s.update_attributes(kp.private, &[Attribute::Sensitive(false)]),
            RvError::AttributeReadOnly,
        );
        // Extractable true -> false allowed, false -> true refused.
        s.update_attributes(kp.private, &[Attribute::Extractable(false)])
            .expect("CKA_EXTRACTABLE true -> false");
        assert_rv(
            s.update_attributes(kp.private, &[Attribute::Extractable(true)]),
            RvError::AttributeReadOnly,
        );
    });
}

#[test]
fn keygen_argument_errors() {
    run_in_child("keygen_argument_errors", || {
        let (p, slot) = setup();
        let s = user_session(&p, slot);
        // A standard mechanism the token does not implement.
        assert_rv(
            s.generate_key_pair(
                &Mechanism::EccKeyPairGen,
                &[Attribute::EcParams(SM2_EC_PARAMS.to_vec())],
                &[Attribute::Sign(true)],
            ),
            RvError::MechanismInvalid,
        );
        // A sign mechanism is not a key-pair generation mechanism.
        assert_rv(
            s.generate_key_pair(&mech(CKM_SM3_SM2), &[], &[]),
            RvError::MechanismInvalid,
        );
        // Wrong key type in the template.
        assert_rv(
            s.generate_key_pair(
                &mech(CKM_SM2_KEY_PAIR_GEN),
                &[Attribute::KeyType(KeyType::RSA)],
                &[],
            ),
            RvError::TemplateInconsistent,
        );
        // Token key in a R/O session.
        let ro = p.open_ro_session(slot).expect("R/O session");
        assert_rv(
            ro.generate_key_pair(
                &mech(CKM_SM2_KEY_PAIR_GEN),
                &[Attribute::Token(true)],
                &[Attribute::Token(true), Attribute::Private(true)],
            ),
            RvError::SessionReadOnly,
        );
        // A private key needs a logged-in user.
        s.logout().expect("logout");
        assert_rv(
            s.generate_key_pair(
                &mech(CKM_SM2_KEY_PAIR_GEN),
                &[Attribute::Token(false)],
                &[Attribute::Token(false), Attribute::Private(true)],
            ),
            RvError::UserNotLoggedIn,
        );
    });
}

#[test]
fn set_attribute_value_rules() {
    run_in_child("set_attribute_value_rules", || {
        let (p, slot) = setup();
        let s = user_session(&p, slot);
        let kp = gen_keypair(&s, true, "mod");

        // Modifiable attributes.
        s.update_attributes(
            kp.public,
            &[
                Attribute::Label(b"renamed".to_vec()),
                Attribute::Id(vec![1, 2, 3]),
                Attribute::Subject(b"subj".to_vec()),
            ],
        )
        .expect("set label/id/subject");
        let a = s
            .get_attributes(
                kp.public,
                &[
                    AttributeType::Label,
                    AttributeType::Id,
                    AttributeType::Subject,
                ],
            )
            .expect("read back");
        assert_eq!(
            a,
            vec![
                Attribute::Label(b"renamed".to_vec()),
                Attribute::Id(vec![1, 2, 3]),
                Attribute::Subject(b"subj".to_vec())
            ]
        );
        s.update_attributes(kp.private, &[Attribute::Sign(false)])
            .expect("CKA_SIGN is modifiable");
        assert_eq!(
            s.get_attributes(kp.private, &[AttributeType::Sign])
                .expect("sign"),
            vec![Attribute::Sign(false)]
        );
        s.update_attributes(kp.private, &[Attribute::Sign(true)])
            .expect("CKA_SIGN back");

        // Read-only attributes.
        for attr in [
            Attribute::Class(ObjectClass::DATA),
            Attribute::KeyType(KeyType::EC),
            Attribute::EcPoint(wrap_ec_point(&kp.point)),
            Attribute::EcParams(SM2_EC_PARAMS.to_vec()),
            Attribute::Token(false),
            Attribute::Local(false),
        ] {
            assert_rv(
                s.update_attributes(kp.public, std::slice::from_ref(&attr)),
                RvError::AttributeReadOnly,
            );
        }
        // Unknown attribute type.
        assert_rv(
            s.update_attributes(
                kp.public,
                &[Attribute::VendorDefined((
                    AttributeType::VendorDefined(0x8FFF_FFF0),
                    vec![1],
                ))],
            ),
            RvError::AttributeTypeInvalid,
        );

        // A failed update changes nothing (atomic template).
        assert_rv(
            s.update_attributes(
                kp.public,
                &[
                    Attribute::Label(b"half".to_vec()),
                    Attribute::Class(ObjectClass::DATA),
                ],
            ),
            RvError::AttributeReadOnly,
        );
        assert_eq!(
            s.get_attributes(kp.public, &[AttributeType::Label])
                .expect("label"),
            vec![Attribute::Label(b"renamed".to_vec())]
        );

        // CKA_MODIFIABLE = false.
        let frozen = s
            .create_object(&[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Token(false),
                Attribute::Modifiable(false),
                Attribute::Label(b"frozen".to_vec()),
                Attribute::Value(b"v".to_vec()),
            ])
            .expect("create unmodifiable data object");
        assert_rv_in(
            s.update_attributes(frozen, &[Attribute::Label(b"thawed".to_vec())]),
            // 3.0: CKR_ACTION_PROHIBITED; 2.40: CKR_ATTRIBUTE_READ_ONLY.
            &[RvError::ActionProhibited, RvError::AttributeReadOnly],
        );

        // A token object in a R/O session cannot be modified.
        let ro = p.open_ro_session(slot).expect("R/O session");
        assert_rv(
            ro.update_attributes(kp.public, &[Attribute::Label(b"ro".to_vec())]),
            RvError::SessionReadOnly,
        );
    });
}

#[test]
fn create_public_key_certificate_and_data_objects() {
    run_in_child("create_public_key_certificate_and_data_objects", || {
        let (p, slot) = setup();
        let s = user_session(&p, slot);

        // SM2 public key, CKA_EC_POINT as DER OCTET STRING.
        let kp = gen_keypair(&s, false, "src");
        let imported = s
            .create_object(&[
                Attribute::Class(ObjectClass::PUBLIC_KEY),
                Attribute::KeyType(sm2_key_type()),
                Attribute::Token(false),
                Attribute::Verify(true),
                Attribute::EcParams(SM2_EC_PARAMS.to_vec()),
                Attribute::EcPoint(wrap_ec_point(&kp.point)),
                Attribute::Label(b"imported-der".to_vec()),
            ])
            .expect("create SM2 public key");
        assert_eq!(public_point(&s, imported), kp.point);
        assert_eq!(
            s.get_attributes(
                imported,
                &[AttributeType::PublicKeyInfo, AttributeType::Local]
            )
            .expect("attrs"),
            vec![
                Attribute::PublicKeyInfo(spki_der(&kp.point)),
                Attribute::Local(false)
            ]
        );
        // ... and the bare 65-byte point, without CKA_EC_PARAMS.
        let bare = s
            .create_object(&[
                Attribute::Class(ObjectClass::PUBLIC_KEY),
                Attribute::KeyType(sm2_key_type()),
                Attribute::Verify(true),
                Attribute::EcPoint(kp.point.clone()),
            ])
            .expect("create SM2 public key from the bare point");
        assert_eq!(
            public_point(&s, bare),
            kp.point,
            "stored as DER OCTET STRING"
        );
        // The imported key verifies the generated key's signatures.
        let msg = b"imported key verifies";
        let sig = s
            .sign(&mech(CKM_SM3_SM2_Z_DER), kp.private, msg)
            .expect("sign");
        s.verify(&mech(CKM_SM3_SM2_Z_DER), imported, msg, &sig)
            .expect("verify with imported key");
        s.verify(&mech(CKM_SM3_SM2_Z_DER), bare, msg, &sig)
            .expect("verify with bare-point key");

        // A point not on the curve.
        let mut bad = kp.point.clone();
        bad[64] ^= 1;
        assert_rv(
            s.create_object(&[
                Attribute::Class(ObjectClass::PUBLIC_KEY),
                Attribute::KeyType(sm2_key_type()),
                Attribute::EcPoint(wrap_ec_point(&bad)),
            ]),
            RvError::AttributeValueInvalid,
        );
        // Missing CKA_EC_POINT.
        assert_rv(
            s.create_object(&[
                Attribute::Class(ObjectClass::PUBLIC_KEY),
                Attribute::KeyType(sm2_key_type()),
            ]),
            RvError::TemplateIncomplete,
        );
        // No import of private keys.
        assert_rv_in(
            s.create_object(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::KeyType(sm2_key_type()),
                Attribute::Value(vec![7; 32]),
            ]),
            &[
                RvError::TemplateInconsistent,
                RvError::AttributeValueInvalid,
                RvError::KeyTypeInconsistent,
                RvError::FunctionNotSupported,
            ],
        );

        // X.509 certificate: subject, issuer, serial filled from the DER.
        let der = fixture("sm2-selfsigned.der");
        let parts = cert_parts(&der);
        let cert = s
            .create_object(&[
                Attribute::Class(ObjectClass::CERTIFICATE),
                Attribute::CertificateType(CertificateType::X_509),
                Attribute::Token(true),
                Attribute::Label(b"cert".to_vec()),
                Attribute::Value(der.clone()),
            ])
            .expect("create X.509 certificate");
        let a = s
            .get_attributes(
                cert,
                &[
                    AttributeType::Subject,
                    AttributeType::Issuer,
                    AttributeType::SerialNumber,
                    AttributeType::Value,
                    AttributeType::CertificateType,
                ],
            )
            .expect("certificate attributes");
        assert_eq!(
            a,
            vec![
                Attribute::Subject(parts.subject.clone()),
                Attribute::Issuer(parts.issuer.clone()),
                Attribute::SerialNumber(parts.serial_tlv.clone()),
                Attribute::Value(der.clone()),
                Attribute::CertificateType(CertificateType::X_509),
            ],
            "CKA_SERIAL_NUMBER is the DER INTEGER (tag, length, value)"
        );
        // Given attributes are kept as given.
        let cert2 = s
            .create_object(&[
                Attribute::Class(ObjectClass::CERTIFICATE),
                Attribute::CertificateType(CertificateType::X_509),
                Attribute::Subject(b"given".to_vec()),
                Attribute::Value(der.clone()),
            ])
            .expect("certificate with explicit subject");
        assert_eq!(
            s.get_attributes(cert2, &[AttributeType::Subject])
                .expect("subject"),
            vec![Attribute::Subject(b"given".to_vec())]
        );
        // DER that does not parse.
        let mut broken = der.clone();
        broken.truncate(100);
        assert_rv(
            s.create_object(&[
                Attribute::Class(ObjectClass::CERTIFICATE),
                Attribute::CertificateType(CertificateType::X_509),
                Attribute::Value(broken),
            ]),
            RvError::AttributeValueInvalid,
        );

        // The certificate's own signature (made by OpenSSL) verifies through the
        // token with the certificate's public key imported.
        let cert_point = parts.spki[parts.spki.len() - 65..].to_vec();
        let cert_key = s
            .create_object(&[
                Attribute::Class(ObjectClass::PUBLIC_KEY),
                Attribute::KeyType(sm2_key_type()),
                Attribute::Verify(true),
                Attribute::EcPoint(wrap_ec_point(&cert_point)),
            ])
            .expect("import certificate key");
        s.verify(
            &mech(CKM_SM3_SM2_Z_DER),
            cert_key,
            &parts.tbs,
            &parts.signature,
        )
        .expect("OpenSSL's SM2 certificate signature verifies through the token");

        // Data object.
        let data = s
            .create_object(&[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Token(true),
                Attribute::Application(b"svs".to_vec()),
                Attribute::Label(b"data".to_vec()),
                Attribute::Value(b"hello".to_vec()),
            ])
            .expect("create data object");
        s.update_attributes(data, &[Attribute::Value(b"world!".to_vec())])
            .expect("CKA_VALUE of a data object is modifiable");
        assert_eq!(
            s.get_attributes(data, &[AttributeType::Value, AttributeType::Application])
                .expect("data attrs"),
            vec![
                Attribute::Value(b"world!".to_vec()),
                Attribute::Application(b"svs".to_vec())
            ]
        );

        // Destroy.
        s.destroy_object(data).expect("C_DestroyObject");
        assert_rv(
            s.get_attributes(data, &[AttributeType::Label]),
            RvError::ObjectHandleInvalid,
        );
        assert_rv(s.destroy_object(data), RvError::ObjectHandleInvalid);
        s.destroy_object(cert).expect("destroy certificate");
        assert!(
            s.find_objects(&[Attribute::Class(ObjectClass::CERTIFICATE)])
                .expect("find")
                .len()
                == 1,
            "only cert2 left"
        );
    });
}

#[test]
fn find_objects_template_matching() {
    run_in_child("find_objects_template_matching", || {
        let (p, slot) = setup();
        let s = user_session(&p, slot);
        let a = gen_keypair(&s, true, "alpha");
        let b = gen_keypair(&s, false, "beta");
        let d = s
            .create_object(&[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Token(true),
                Attribute::Label(b"alpha".to_vec()),
                Attribute::Value(b"x".to_vec()),
            ])
            .expect("data");

        let mut all = s.find_objects(&[]).expect("find all");
        all.sort_by_key(|h| h.handle());
        let mut expect = vec![a.public, a.private, b.public, b.private, d];
        expect.sort_by_key(|h| h.handle());
        assert_eq!(all, expect, "empty template matches every visible object");

        assert_eq!(
            find_one(
                &s,
                &[
                    class(ObjectClass::PRIVATE_KEY),
                    Attribute::Label(b"alpha".to_vec())
                ]
            ),
            a.private
        );
        assert_eq!(
            find_one(
                &s,
                &[Attribute::Id(b"beta".to_vec()), Attribute::Verify(true)]
            ),
            b.public
        );
        assert_eq!(find_one(&s, &[class(ObjectClass::DATA)]), d);
        assert_eq!(
            find_one(
                &s,
                &[
                    Attribute::Label(b"beta".to_vec()),
                    Attribute::Token(false),
                    class(ObjectClass::PUBLIC_KEY)
                ]
            ),
            b.public
        );
        assert_eq!(
            s.find_objects(&[Attribute::Label(b"alpha".to_vec())])
                .expect("find")
                .len(),
            3
        );
        assert_eq!(
            s.find_objects(&[Attribute::KeyType(sm2_key_type())])
                .expect("find")
                .len(),
            4
        );
        assert_eq!(
            s.find_objects(&[Attribute::Token(true)])
                .expect("find")
                .len(),
            3
        );
        assert_eq!(
            s.find_objects(&[Attribute::EcPoint(wrap_ec_point(&a.point))])
                .expect("find")
                .len(),
            2,
            "public and private key share CKA_EC_POINT"
        );
        // No match: wrong value, or an attribute the object does not have.
        assert!(
            s.find_objects(&[Attribute::Label(b"gamma".to_vec())])
                .expect("find")
                .is_empty()
        );
        assert!(
            s.find_objects(&[Attribute::Label(b"alph".to_vec())])
                .expect("find")
                .is_empty()
        );
        assert!(
            s.find_objects(&[class(ObjectClass::DATA), Attribute::KeyType(sm2_key_type())])
                .expect("find")
                .is_empty()
        );
        // Paging through a small cache size returns the same set.
        let mut paged: Vec<_> = s
            .iter_objects_with_cache_size(&[], std::num::NonZeroUsize::new(2).expect("2"))
            .expect("iter")
            .collect::<Result<Vec<_>, _>>()
            .expect("paged find");
        paged.sort_by_key(|h| h.handle());
        assert_eq!(paged, expect);
        // A second FindObjectsInit while one is active.
        let it = s.iter_objects(&[]).expect("find init");
        assert_rv(s.find_objects(&[]), RvError::OperationActive);
        drop(it);
        assert_eq!(s.find_objects(&[]).expect("find after final").len(), 5);
    });
}

#[test]
fn private_objects_invisible_before_login() {
    run_in_child("private_objects_invisible_before_login", || {
        let (p, slot) = setup();
        let s = user_session(&p, slot);
        let kp = gen_keypair(&s, true, "hidden");
        let secret = s
            .create_object(&[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Label(b"secret-data".to_vec()),
                Attribute::Value(b"s".to_vec()),
            ])
            .expect("private data object");
        s.logout().expect("logout");

        let found = s.find_objects(&[]).expect("find");
        assert_eq!(found, vec![kp.public], "only the public key is visible");
        assert!(
            s.find_objects(&[class(ObjectClass::PRIVATE_KEY)])
                .expect("find")
                .is_empty()
        );
        assert_rv(
            s.get_attributes(secret, &[AttributeType::Value]),
            RvError::ObjectHandleInvalid,
        );
        assert_rv(
            s.get_attributes(kp.private, &[AttributeType::Label]),
            RvError::ObjectHandleInvalid,
        );
        assert_rv_in(
            s.sign(&mech(CKM_SM3_SM2_Z_DER), kp.private, b"m"),
            &[RvError::KeyHandleInvalid, RvError::UserNotLoggedIn],
        );
        // Creating a private object needs a login.
        assert_rv(
            s.create_object(&[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Private(true),
                Attribute::Value(b"s".to_vec()),
            ]),
            RvError::UserNotLoggedIn,
        );
        // Another session, another (fresh) application view: same result.
        let ro = p.open_ro_session(slot).expect("session");
        assert_eq!(ro.find_objects(&[]).expect("find"), vec![kp.public]);

        ro.login(UserType::User, Some(&pin(USER_PIN)))
            .expect("login");
        assert_eq!(s.find_objects(&[]).expect("find").len(), 3);
    });
}

#[test]
fn token_objects_persist_session_objects_do_not() {
    run_in_child("token_objects_persist_session_objects_do_not", || {
        let (p, slot) = setup();
        let s = user_session(&p, slot);
        let tk = gen_keypair(&s, true, "persist");
        let _sk = gen_keypair(&s, false, "ephemeral");
        s.create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Label(b"tdata".to_vec()),
            Attribute::Value(b"keep me".to_vec()),
        ])
        .expect("token data");
        s.create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(false),
            Attribute::Label(b"sdata".to_vec()),
            Attribute::Value(b"lose me".to_vec()),
        ])
        .expect("session data");
        s.create_object(&[
            Attribute::Class(ObjectClass::CERTIFICATE),
            Attribute::CertificateType(CertificateType::X_509),
            Attribute::Token(true),
            Attribute::Label(b"tcert".to_vec()),
            Attribute::Value(fixture("sm2-selfsigned.der")),
        ])
        .expect("token certificate");
        s.update_attributes(tk.public, &[Attribute::Label(b"persist-renamed".to_vec())])
            .expect("rename");
        drop(s);

        // Session objects disappear when their session closes.
        let s = user_session(&p, slot);
        assert!(
            s.find_objects(&[Attribute::Label(b"ephemeral".to_vec())])
                .expect("find")
                .is_empty(),
            "session objects die with their session"
        );
        drop(s);
        p.finalize().expect("C_Finalize");

        // Reload the module: token objects are back, session objects are not.
        let p = open();
        let s = user_session(&p, slot);
        let pubk = find_one(
            &s,
            &[
                class(ObjectClass::PUBLIC_KEY),
                Attribute::Label(b"persist-renamed".to_vec()),
            ],
        );
        let privk = find_one(
            &s,
            &[
                class(ObjectClass::PRIVATE_KEY),
                Attribute::Label(b"persist".to_vec()),
            ],
        );
        assert_eq!(public_point(&s, pubk), tk.point);
        assert_eq!(public_point(&s, privk), tk.point);
        assert_eq!(
            s.get_attributes(
                privk,
                &[
                    AttributeType::Sensitive,
                    AttributeType::Private,
                    AttributeType::KeyType
                ]
            )
            .expect("attrs"),
            vec![
                Attribute::Sensitive(true),
                Attribute::Private(true),
                Attribute::KeyType(sm2_key_type())
            ]
        );
        let d = find_one(&s, &[Attribute::Label(b"tdata".to_vec())]);
        assert_eq!(
            s.get_attributes(d, &[AttributeType::Value]).expect("value"),
            vec![Attribute::Value(b"keep me".to_vec())]
        );
        find_one(&s, &[Attribute::Label(b"tcert".to_vec())]);
        assert!(
            s.find_objects(&[Attribute::Label(b"ephemeral".to_vec())])
                .expect("find")
                .is_empty()
        );
        assert!(
            s.find_objects(&[Attribute::Label(b"sdata".to_vec())])
                .expect("find")
                .is_empty()
        );
        assert_eq!(s.find_objects(&[]).expect("all").len(), 4);

        // The persisted private key still signs, for the persisted public key.
        let msg = b"after reload";
        let sig = s
            .sign(&mech(CKM_SM3_SM2_Z), privk, msg)
            .expect("sign after reload");
        s.verify(&mech(CKM_SM3_SM2_Z), pubk, msg, &sig)
            .expect("verify after reload");
        assert!(sm2_verify_prehash(
            &tk.point,
            &e_value(DEFAULT_ID, &tk.point, msg),
            &sig
        ));

        // Nothing private is stored in clear, even for a non-sensitive key.
        let plain = gen_keypair_with(
            &s,
            true,
            "plain-token-key",
            &[],
            &[Attribute::Sensitive(false), Attribute::Extractable(true)],
        );
        let v = s
            .get_attributes(plain.private, &[AttributeType::Value])
            .expect("CKA_VALUE");
        let [Attribute::Value(d)] = v.as_slice() else {
            panic!("no CKA_VALUE: {v:?}")
        };
        let store = test_dir().join("store").join("slot-0").join("token.json");
        let json = std::fs::read(&store).expect("token.json exists where the spec says");
        let text = String::from_utf8_lossy(&json).to_lowercase();
        let as_json_array = format!("{d:?}").replace(' ', "");
        for needle in [hex(d), base64(d).to_lowercase(), as_json_array] {
            assert!(
                !text.contains(&needle),
                "private value in clear in token.json"
            );
        }
        assert!(
            !text.contains(&USER_PIN.to_lowercase()),
            "no PIN in the store"
        );
        assert!(
            !text.contains(&SO_PIN.to_lowercase()),
            "no PIN in the store"
        );
    });
}

/// Helper run as a separate process by `two_processes_share_one_store`.
#[test]
fn store_sharing_writer_helper() {
    run_in_child("store_sharing_writer_helper", || {
        let p = open();
        let slot = slot0(&p);
        if !p.get_token_info(slot).expect("info").token_initialized() {
            init_token(&p, slot);
        }
        let s = user_session(&p, slot);
        s.create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Label(b"from-other-process".to_vec()),
            Attribute::Value(b"hi".to_vec()),
        ])
        .expect("create in other process");
    });
}

#[test]
fn two_processes_share_one_store() {
    run_in_child("two_processes_share_one_store", || {
        let (p, slot) = setup();
        let s = user_session(&p, slot);
        gen_keypair(&s, true, "mine");
        assert!(
            s.find_objects(&[Attribute::Label(b"from-other-process".to_vec())])
                .expect("find")
                .is_empty()
        );

        // Another process (same SVS_SOFTTOKEN_CONF, inherited) writes to the store.
        let exe = std::env::current_exe().expect("exe");
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "store_sharing_writer_helper",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("SVS_TEST_CHILD", "store_sharing_writer_helper")
            .output()
            .expect("spawn writer");
        assert!(
            out.status.success(),
            "writer failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );

        // This process reloads the changed token file: both objects are there.
        let found = s
            .find_objects(&[Attribute::Label(b"from-other-process".to_vec())])
            .expect("find");
        assert_eq!(
            found.len(),
            1,
            "the other process's object is visible after reload"
        );
        assert_eq!(
            s.find_objects(&[Attribute::Label(b"mine".to_vec())])
                .expect("find")
                .len(),
            2
        );
        // And a write here keeps the other process's object.
        s.create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Label(b"second-write".to_vec()),
            Attribute::Value(b"x".to_vec()),
        ])
        .expect("create");
        drop(s);
        p.finalize().expect("finalize");
        let p = open();
        let s = user_session(&p, slot);
        assert_eq!(
            s.find_objects(&[Attribute::Label(b"from-other-process".to_vec())])
                .expect("find")
                .len(),
            1
        );
        assert_eq!(
            s.find_objects(&[Attribute::Label(b"second-write".to_vec())])
                .expect("find")
                .len(),
            1
        );
    });
}
