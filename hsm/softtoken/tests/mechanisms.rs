//! SM2 sign/verify with every vendor mechanism, SM3 digest, mechanism
//! information, random numbers, argument errors and concurrency
//! (docs/softtoken.md "Mechanisms"). Every signature is cross-checked with the
//! RustCrypto `sm2` crate on an e computed here.

mod common;

use common::*;
use cryptoki::error::RvError;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::session::Session;

/// What e a message mechanism signs, computed independently.
fn expected_e(m: u64, point: &[u8], id: &[u8], msg: &[u8]) -> [u8; 32] {
    match m {
        CKM_SM3_SM2 | CKM_SM3_SM2_DER => sm3(msg),
        CKM_SM3_SM2_Z | CKM_SM3_SM2_Z_DER => e_value(id, point, msg),
        _ => panic!("not a message mechanism: {m:#x}"),
    }
}

fn is_der(m: u64) -> bool {
    matches!(m, CKM_SM3_SM2_DER | CKM_SM3_SM2_Z_DER | CKM_SM2_SIGN)
}

fn check_encoding(m: u64, sig: &[u8]) {
    if is_der(m) {
        assert_der_signature(sig);
    } else {
        assert_eq!(sig.len(), 64, "raw r||s for {m:#x}");
    }
}

/// A signature of the other encoding, with the same (r, s).
fn other_encoding(sig: &[u8]) -> Vec<u8> {
    if sig.len() == 64 {
        raw_to_der(sig)
    } else {
        sig_to_raw(sig)
    }
}

/// Flips one bit inside s, keeping a well-formed encoding.
fn tamper(sig: &[u8]) -> Vec<u8> {
    let mut t = sig.to_vec();
    let last = t.len() - 1;
    t[last] ^= 0x01;
    t
}

fn message_mechanism_roundtrip(s: &Session, kp: &KeyPair, m: u64) {
    let msg: Vec<u8> = (0..300u32).map(|i| (i * 7 % 251) as u8).collect();
    let e = expected_e(m, &kp.point, DEFAULT_ID, &msg);

    // Single-part.
    let sig1 = s.sign(&mech(m), kp.private, &msg).expect("C_Sign");
    check_encoding(m, &sig1);
    assert!(
        sm2_verify_prehash(&kp.point, &e, &sig1),
        "{m:#x}: single-part signature does not verify on the independent e"
    );
    // Multi-part, uneven chunks including an empty one.
    s.sign_init(&mech(m), kp.private).expect("C_SignInit");
    for chunk in [&msg[..1], &msg[1..1], &msg[1..100], &msg[100..]] {
        s.sign_update(chunk).expect("C_SignUpdate");
    }
    let sig2 = s.sign_final().expect("C_SignFinal");
    check_encoding(m, &sig2);
    assert!(
        sm2_verify_prehash(&kp.point, &e, &sig2),
        "{m:#x}: multi-part signature does not verify"
    );
    assert_ne!(sig1, sig2, "fresh nonce per signature");

    // Verify, single- and multi-part, with the public key object.
    for sig in [&sig1, &sig2] {
        s.verify(&mech(m), kp.public, &msg, sig).expect("C_Verify");
        s.verify_init(&mech(m), kp.public).expect("C_VerifyInit");
        s.verify_update(&msg[..150]).expect("C_VerifyUpdate");
        s.verify_update(&msg[150..]).expect("C_VerifyUpdate");
        s.verify_final(sig).expect("C_VerifyFinal");
    }
    // A signature made here with the sm2 crate is not possible (no private key),
    // but a wrong one must fail: tampered signature, other message.
    assert_rv(
        s.verify(&mech(m), kp.public, &msg, &tamper(&sig1)),
        RvError::SignatureInvalid,
    );
    assert_rv(
        s.verify(&mech(m), kp.public, b"another message", &sig1),
        RvError::SignatureInvalid,
    );
    s.verify_init(&mech(m), kp.public).expect("C_VerifyInit");
    s.verify_update(&msg[..10]).expect("update");
    assert_rv(s.verify_final(&sig1), RvError::SignatureInvalid);
    // Wrong encoding for the mechanism.
    assert_rv_in(
        s.verify(&mech(m), kp.public, &msg, &other_encoding(&sig1)),
        &[RvError::SignatureLenRange, RvError::SignatureInvalid],
    );
    // Wrong lengths.
    assert_rv_in(
        s.verify(&mech(m), kp.public, &msg, &sig1[..sig1.len() - 1]),
        &[RvError::SignatureLenRange, RvError::SignatureInvalid],
    );
    if !is_der(m) {
        assert_rv(
            s.verify(&mech(m), kp.public, &msg, &[0u8; 63]),
            RvError::SignatureLenRange,
        );
        assert_rv(
            s.verify(&mech(m), kp.public, &msg, &[0u8; 65]),
            RvError::SignatureLenRange,
        );
    }
    // Another key's public key.
    let other = gen_keypair(s, false, "other");
    assert_rv(
        s.verify(&mech(m), other.public, &msg, &sig1),
        RvError::SignatureInvalid,
    );
    s.destroy_object(other.public).expect("destroy");
    s.destroy_object(other.private).expect("destroy");
}

#[test]
fn sign_verify_message_mechanisms() {
    run_in_child("sign_verify_message_mechanisms", || {
        let (p, slot) = setup();
        let s = user_session(&p, slot);
        let kp = gen_keypair(&s, true, "signer");
        for m in [
            CKM_SM3_SM2,
            CKM_SM3_SM2_DER,
            CKM_SM3_SM2_Z,
            CKM_SM3_SM2_Z_DER,
        ] {
            message_mechanism_roundtrip(&s, &kp, m);
        }
        // Empty message.
        for m in [CKM_SM3_SM2_Z, CKM_SM3_SM2_Z_DER] {
            let sig = s.sign(&mech(m), kp.private, b"").expect("sign empty");
            assert!(sm2_verify_prehash(
                &kp.point,
                &e_value(DEFAULT_ID, &kp.point, b""),
                &sig
            ));
        }
        // CKM_SM3_SM2 with the caller's own Z in front = CKM_SM3_SM2_Z.
        let msg = b"caller prepends Z";
        let mut zm = z_value(DEFAULT_ID, &kp.point).to_vec();
        zm.extend_from_slice(msg);
        let sig = s
            .sign(&mech(CKM_SM3_SM2), kp.private, &zm)
            .expect("sign Z||M");
        s.verify(&mech(CKM_SM3_SM2_Z), kp.public, msg, &sig)
            .expect("SM3_SM2 over Z||M verifies as SM3_SM2_Z over M");
    });
}

#[test]
fn sign_verify_ready_digest_mechanisms() {
    run_in_child("sign_verify_ready_digest_mechanisms", || {
        let (p, slot) = setup();
        let s = user_session(&p, slot);
        let kp = gen_keypair(&s, false, "digest-signer");
        let e = e_value(DEFAULT_ID, &kp.point, b"the message");
        for m in [CKM_SM2_SIGN, CKM_SM2_SIGN_NO_DER] {
            let sig = s.sign(&mech(m), kp.private, &e).expect("C_Sign on e");
            check_encoding(m, &sig);
            assert!(
                sm2_verify_prehash(&kp.point, &e, &sig),
                "{m:#x} signs e as given"
            );
            s.verify(&mech(m), kp.public, &e, &sig)
                .expect("C_Verify on e");
            assert_rv(
                s.verify(&mech(m), kp.public, &e, &tamper(&sig)),
                RvError::SignatureInvalid,
            );
            let mut e2 = e;
            e2[0] ^= 0x80;
            assert_rv(
                s.verify(&mech(m), kp.public, &e2, &sig),
                RvError::SignatureInvalid,
            );
            assert_rv_in(
                s.verify(&mech(m), kp.public, &e, &other_encoding(&sig)),
                &[RvError::SignatureLenRange, RvError::SignatureInvalid],
            );

            // Single-part only.
            s.sign_init(&mech(m), kp.private).expect("C_SignInit");
            assert_rv(s.sign_update(&e), RvError::FunctionNotSupported);
            // The operation may or may not survive the failed update; finish it
            // by a C_Sign if it is still active.
            let _ = s.sign(&mech(m), kp.private, &e);
            s.verify_init(&mech(m), kp.public).expect("C_VerifyInit");
            assert_rv(s.verify_update(&e), RvError::FunctionNotSupported);
            let _ = s.verify(&mech(m), kp.public, &e, &sig);

            // e must be 32 bytes.
            assert_rv(
                s.sign(&mech(m), kp.private, &e[..31]),
                RvError::DataLenRange,
            );
            assert_rv(
                s.sign(&mech(m), kp.private, &[0u8; 33]),
                RvError::DataLenRange,
            );
            assert_rv(s.sign(&mech(m), kp.private, &[]), RvError::DataLenRange);
            assert_rv_in(
                s.verify(&mech(m), kp.public, &e[..31], &sig),
                &[RvError::DataLenRange, RvError::SignatureInvalid],
            );
        }
        // The ready-digest mechanisms and the message mechanisms agree.
        let msg = b"portable way";
        let sig = s
            .sign(
                &mech(CKM_SM2_SIGN),
                kp.private,
                &e_value(DEFAULT_ID, &kp.point, msg),
            )
            .expect("sign e");
        s.verify(&mech(CKM_SM3_SM2_Z_DER), kp.public, msg, &sig)
            .expect("CKM_SM2_SIGN(e) verifies as CKM_SM3_SM2_Z_DER(M)");
    });
}

#[test]
fn distinguishing_id_parameter() {
    run_in_child("distinguishing_id_parameter", || {
        let (p, slot) = setup();
        let s = user_session(&p, slot);
        let kp = gen_keypair(&s, false, "ids");
        let alice: &[u8; 13] = b"alice@example";
        let msg = b"signed with a non-default ID";
        let e_alice = e_value(alice, &kp.point, msg);
        let e_default = e_value(DEFAULT_ID, &kp.point, msg);
        for m in [CKM_SM3_SM2_Z, CKM_SM3_SM2_Z_DER] {
            let sig = s
                .sign(&mech_param(m, alice), kp.private, msg)
                .expect("sign with ID");
            check_encoding(m, &sig);
            assert!(
                sm2_verify_prehash(&kp.point, &e_alice, &sig),
                "{m:#x}: e = SM3(Z_alice || M)"
            );
            assert!(!sm2_verify_prehash(&kp.point, &e_default, &sig));
            s.verify(&mech_param(m, alice), kp.public, msg, &sig)
                .expect("verify with the same ID");
            assert_rv(
                s.verify(&mech(m), kp.public, msg, &sig),
                RvError::SignatureInvalid,
            );
            assert_rv(
                s.verify(&mech_param(m, b"bob@example"), kp.public, msg, &sig),
                RvError::SignatureInvalid,
            );
            // Multi-part with the ID.
            s.sign_init(&mech_param(m, alice), kp.private)
                .expect("init");
            s.sign_update(&msg[..5]).expect("update");
            s.sign_update(&msg[5..]).expect("update");
            let sig2 = s.sign_final().expect("final");
            assert!(sm2_verify_prehash(&kp.point, &e_alice, &sig2));

            // The default ID given explicitly = no parameter.
            let sig3 = s
                .sign(&mech_param(m, DEFAULT_ID), kp.private, msg)
                .expect("sign");
            s.verify(&mech(m), kp.public, msg, &sig3)
                .expect("explicit default ID");
            assert!(sm2_verify_prehash(&kp.point, &e_default, &sig3));
        }
        // Mechanisms that take no parameter reject one.
        for m in [
            CKM_SM3_SM2,
            CKM_SM3_SM2_DER,
            CKM_SM2_SIGN,
            CKM_SM2_SIGN_NO_DER,
        ] {
            assert_rv(
                s.sign_init(&mech_param(m, alice), kp.private),
                RvError::MechanismParamInvalid,
            );
        }
    });
}

#[test]
fn sm3_digest() {
    run_in_child("sm3_digest", || {
        let (p, slot) = setup();
        // Digesting needs no login.
        let s = p.open_ro_session(slot).expect("session");
        let d = s.digest(&mech(CKM_SM3), b"abc").expect("C_Digest");
        assert_eq!(
            hex(&d),
            "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0",
            "SM3(\"abc\") known answer (GB/T 32905 example 1)"
        );
        let abcd = b"abcd".repeat(16);
        let d = s.digest(&mech(CKM_SM3), &abcd).expect("C_Digest");
        assert_eq!(
            hex(&d),
            "debe9ff92275b8a138604889c18e5a4d6fdb70e5387e5765293dcba39c0c5732",
            "SM3(\"abcd\" x 16) known answer (GB/T 32905 example 2)"
        );
        assert_eq!(
            s.digest(&mech(CKM_SM3), b"").expect("empty").as_slice(),
            sm3(b"")
        );
        // Multi-part over 1 MiB equals the sm3 crate.
        let big: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
        s.digest_init(&mech(CKM_SM3)).expect("C_DigestInit");
        for c in big.chunks(65_537) {
            s.digest_update(c).expect("C_DigestUpdate");
        }
        assert_eq!(
            s.digest_final().expect("C_DigestFinal").as_slice(),
            sm3(&big)
        );
        // State errors.
        assert_rv(s.digest_update(b"x"), RvError::OperationNotInitialized);
        assert_rv(s.digest_final(), RvError::OperationNotInitialized);
        s.digest_init(&mech(CKM_SM3)).expect("init");
        assert_rv(s.digest_init(&mech(CKM_SM3)), RvError::OperationActive);
        s.digest_update(b"abc").expect("update");
        assert_eq!(hex(&s.digest_final().expect("final"))[..8], *"66c7f0f4");
        // Not a digest mechanism.
        assert_rv(
            s.digest(&mech(CKM_SM3_SM2), b"abc"),
            RvError::MechanismInvalid,
        );
        assert_rv(
            s.digest(&Mechanism::Sha256, b"abc"),
            RvError::MechanismInvalid,
        );
    });
}

#[test]
fn mechanism_list_and_info() {
    run_in_child("mechanism_list_and_info", || {
        let p = open();
        let slot = slot0(&p);
        // cryptoki 0.12.1 drops vendor mechanisms from the list: it must not fail.
        p.get_mechanism_list(slot).expect("C_GetMechanismList");
        for m in ALL_MECHANISMS {
            let info = p
                .get_mechanism_info(slot, mech_type(m))
                .unwrap_or_else(|e| panic!("C_GetMechanismInfo({m:#x}): {e}"));
            match m {
                CKM_SM2_KEY_PAIR_GEN => {
                    assert!(info.generate_key_pair(), "{m:#x} GENERATE_KEY_PAIR");
                    assert!(!info.sign() && !info.verify() && !info.digest());
                }
                CKM_SM3 => {
                    assert!(info.digest(), "{m:#x} DIGEST");
                    assert!(!info.sign() && !info.generate_key_pair());
                }
                _ => {
                    assert!(info.sign() && info.verify(), "{m:#x} SIGN|VERIFY");
                    assert!(!info.digest() && !info.generate_key_pair());
                    assert!(!info.encrypt() && !info.decrypt() && !info.sign_recover());
                }
            }
            if m != CKM_SM3 {
                assert!(
                    info.min_key_size() <= 256 && info.max_key_size() >= 256,
                    "{m:#x}: key sizes {}..{} should include 256 bits",
                    info.min_key_size(),
                    info.max_key_size()
                );
            }
        }
        for bad in [CKM_SM2_ENCRYPT_UNSUPPORTED, 0x8000_0000, 0x8000_8106] {
            assert_rv(
                p.get_mechanism_info(slot, mech_type(bad)),
                RvError::MechanismInvalid,
            );
        }
        assert_rv(
            p.get_mechanism_info(slot, MechanismType::ECDSA),
            RvError::MechanismInvalid,
        );
        let bogus = cryptoki::slot::Slot::try_from(99u64).expect("slot");
        assert_rv(p.get_mechanism_list(bogus), RvError::SlotIdInvalid);
        assert_rv(
            p.get_mechanism_info(bogus, mech_type(CKM_SM3)),
            RvError::SlotIdInvalid,
        );
    });
}

#[test]
fn random_and_unsupported_functions() {
    run_in_child("random_and_unsupported_functions", || {
        let (p, slot) = setup();
        let s = p.open_ro_session(slot).expect("session");
        let a = s.generate_random_vec(32).expect("C_GenerateRandom");
        let b = s.generate_random_vec(32).expect("C_GenerateRandom");
        assert_eq!(a.len(), 32);
        assert_ne!(a, b, "two random draws differ");
        assert_ne!(a, vec![0u8; 32]);
        let big = s.generate_random_vec(65_536).expect("64 KiB random");
        // Crude sanity: every byte value appears.
        let mut seen = [false; 256];
        for x in &big {
            seen[usize::from(*x)] = true;
        }
        assert!(
            seen.iter().all(|x| *x),
            "64 KiB of random covers every byte value"
        );
        let mut buf = [0u8; 0];
        s.generate_random_slice(&mut buf)
            .expect("zero-length random");
        assert_rv(s.seed_random(b"seed"), RvError::RandomSeedNotSupported);

        // Encryption, wrapping, derivation: CKR_FUNCTION_NOT_SUPPORTED.
        let s = user_session(&p, slot);
        let kp = gen_keypair(&s, false, "k");
        assert_rv(
            s.encrypt(&mech(CKM_SM2_ENCRYPT_UNSUPPORTED), kp.public, b"x"),
            RvError::FunctionNotSupported,
        );
        assert_rv(
            s.decrypt(&mech(CKM_SM2_ENCRYPT_UNSUPPORTED), kp.private, b"x"),
            RvError::FunctionNotSupported,
        );
        assert_rv(
            s.wrap_key(&mech(CKM_SM2_ENCRYPT_UNSUPPORTED), kp.public, kp.private),
            RvError::FunctionNotSupported,
        );
        assert_rv(
            s.derive_key(&mech(CKM_SM2_ENCRYPT_UNSUPPORTED), kp.private, &[]),
            RvError::FunctionNotSupported,
        );
    });
}

#[test]
fn sign_argument_errors_never_crash() {
    run_in_child("sign_argument_errors_never_crash", || {
        let (p, slot) = setup();
        let s = user_session(&p, slot);
        let kp = gen_keypair(&s, false, "args");
        let m = mech(CKM_SM3_SM2_Z_DER);

        // Operation state.
        assert_rv(s.sign_update(b"x"), RvError::OperationNotInitialized);
        assert_rv(s.sign_final(), RvError::OperationNotInitialized);
        assert_rv(s.verify_update(b"x"), RvError::OperationNotInitialized);
        assert_rv(s.verify_final(&[0u8; 70]), RvError::OperationNotInitialized);
        s.sign_init(&m, kp.private).expect("C_SignInit");
        assert_rv(s.sign_init(&m, kp.private), RvError::OperationActive);
        s.sign_update(b"abc")
            .expect("the first operation is still active");
        let sig = s.sign_final().expect("final");
        assert!(sm2_verify_prehash(
            &kp.point,
            &e_value(DEFAULT_ID, &kp.point, b"abc"),
            &sig
        ));
        s.verify_init(&m, kp.public).expect("C_VerifyInit");
        assert_rv(s.verify_init(&m, kp.public), RvError::OperationActive);
        s.verify_update(b"abc").expect("update");
        s.verify_final(&sig).expect("final");

        // Mechanisms.
        assert_rv(
            s.sign_init(&Mechanism::Ecdsa, kp.private),
            RvError::MechanismInvalid,
        );
        assert_rv(
            s.sign_init(&mech(CKM_SM2_KEY_PAIR_GEN), kp.private),
            RvError::MechanismInvalid,
        );
        assert_rv(
            s.sign_init(&mech(CKM_SM3), kp.private),
            RvError::MechanismInvalid,
        );
        assert_rv(
            s.sign_init(&mech(CKM_SM2_ENCRYPT_UNSUPPORTED), kp.private),
            RvError::MechanismInvalid,
        );
        assert_rv(
            s.verify_init(&Mechanism::Ecdsa, kp.public),
            RvError::MechanismInvalid,
        );

        // Keys.
        let no_sign = gen_keypair_with(
            &s,
            false,
            "nosign",
            &[Attribute::Verify(false)],
            &[Attribute::Sign(false)],
        );
        assert_rv(
            s.sign_init(&m, no_sign.private),
            RvError::KeyFunctionNotPermitted,
        );
        assert_rv(
            s.verify_init(&m, no_sign.public),
            RvError::KeyFunctionNotPermitted,
        );
        // A public key cannot sign, a private key is not for C_Verify here.
        assert_rv_in(
            s.sign_init(&m, kp.public),
            &[
                RvError::KeyTypeInconsistent,
                RvError::KeyFunctionNotPermitted,
            ],
        );
        assert_rv_in(
            s.verify_init(&m, kp.private),
            &[
                RvError::KeyTypeInconsistent,
                RvError::KeyFunctionNotPermitted,
            ],
        );
        // Not a key at all / no such handle.
        let data = s
            .create_object(&[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Value(b"x".to_vec()),
            ])
            .expect("data object");
        assert_rv_in(
            s.sign_init(&m, data),
            &[RvError::KeyHandleInvalid, RvError::KeyTypeInconsistent],
        );
        let gone = gen_keypair(&s, false, "gone");
        s.destroy_object(gone.private).expect("destroy");
        assert_rv(s.sign_init(&m, gone.private), RvError::KeyHandleInvalid);

        // Data lengths of the ready-digest mechanisms.
        assert_rv(
            s.sign(&mech(CKM_SM2_SIGN), kp.private, &[0u8; 31]),
            RvError::DataLenRange,
        );
        assert_rv(
            s.sign(&mech(CKM_SM2_SIGN_NO_DER), kp.private, &[0u8; 31]),
            RvError::DataLenRange,
        );
        // A garbage DER signature.
        assert_rv_in(
            s.verify(&m, kp.public, b"abc", &[0x30, 0x03, 0x02, 0x01, 0x00]),
            &[RvError::SignatureInvalid, RvError::SignatureLenRange],
        );
        assert_rv_in(
            s.verify(&m, kp.public, b"abc", &[0u8; 73]),
            &[RvError::SignatureLenRange, RvError::SignatureInvalid],
        );
        // r = 0 / s = 0 in a raw signature.
        assert_rv(
            s.verify(&mech(CKM_SM3_SM2_Z), kp.public, b"abc", &[0u8; 64]),
            RvError::SignatureInvalid,
        );
        // Still alive and signing.
        let sig = s.sign(&m, kp.private, b"after errors").expect("sign");
        s.verify(&m, kp.public, b"after errors", &sig)
            .expect("verify");
    });
}

/// (message, signature, mechanism)
type Signed = (Vec<u8>, Vec<u8>, u64);

#[test]
fn concurrent_signing_sessions() {
    const THREADS: usize = 8;
    const PER_THREAD: usize = 6;
    run_in_child("concurrent_signing_sessions", || {
        let (p, slot) = setup();
        let s0 = user_session(&p, slot);
        let kp = gen_keypair(&s0, true, "shared");
        let results: Vec<Vec<Signed>> = std::thread::scope(|sc| {
            let handles: Vec<_> = (0..THREADS)
                .map(|t| {
                    let p = p.clone();
                    let kp = kp.clone();
                    sc.spawn(move || {
                        // Own session per thread; the login is application-wide.
                        let s = p.open_rw_session(slot).expect("session");
                        let mut out = Vec::new();
                        for i in 0..PER_THREAD {
                            let msg = format!("thread {t} message {i}").into_bytes();
                            let m = [CKM_SM3_SM2_Z_DER, CKM_SM3_SM2_Z, CKM_SM3_SM2_DER][i % 3];
                            let sig = if i % 2 == 0 {
                                s.sign(&mech(m), kp.private, &msg).expect("sign")
                            } else {
                                s.sign_init(&mech(m), kp.private).expect("init");
                                s.sign_update(&msg[..3]).expect("update");
                                s.sign_update(&msg[3..]).expect("update");
                                s.sign_final().expect("final")
                            };
                            s.verify(&mech(m), kp.public, &msg, &sig)
                                .expect("verify in thread");
                            out.push((msg, sig, m));
                        }
                        out
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect()
        });
        let mut n = 0;
        for (msg, sig, m) in results.into_iter().flatten() {
            let e = if m == CKM_SM3_SM2_DER {
                sm3(&msg)
            } else {
                e_value(DEFAULT_ID, &kp.point, &msg)
            };
            assert!(
                sm2_verify_prehash(&kp.point, &e, &sig),
                "concurrent signature verifies"
            );
            n += 1;
        }
        assert_eq!(n, THREADS * PER_THREAD);
    });
}
