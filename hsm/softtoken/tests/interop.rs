//! Interoperability with software no one here wrote: OpenSC's pkcs11-tool,
//! the OpenSSL 3 CLI, PyPI `gmssl`, and the raw C ABI through Python ctypes.
//!
//! A missing tool fails the test when the environment variable CI is set (CI
//! installs them: .ci/run); otherwise the test prints a loud SKIP and passes.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;
use cryptoki::error::RvError;
use cryptoki::object::{Attribute, AttributeType, ObjectClass};

/// Is `probe` runnable? If not: panic under CI, else print SKIP and return false.
fn have(tool: &str, probe: &[&str]) -> bool {
    // pkcs11-tool exits non-zero for --help: for it, being runnable is enough.
    let ok = Command::new(probe[0])
        .args(&probe[1..])
        .output()
        .map(|o| o.status.success() || probe[0] == "pkcs11-tool")
        .unwrap_or(false);
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!(
                "{tool} is required under CI but `{}` failed",
                probe.join(" ")
            );
        }
        eprintln!(
            "\n==================== SKIP: {tool} not available ({}) ====================\n",
            probe.join(" ")
        );
    }
    ok
}

fn have_pkcs11_tool() -> bool {
    have("OpenSC pkcs11-tool", &["pkcs11-tool", "--help"])
}
fn have_openssl() -> bool {
    have("openssl", &["openssl", "version"])
}
fn have_gmssl() -> bool {
    have(
        "python3 + PyPI gmssl",
        &["python3", "-c", "import gmssl.sm2"],
    )
}
fn have_python() -> bool {
    have("python3", &["python3", "-c", "import ctypes"])
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    eprintln!(
        "$ {cmd:?}\n[exit {}]\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Initialises the token, makes one token key pair labelled `label`, finalises.
fn provision_key(label: &str) -> Vec<u8> {
    let (p, slot) = setup();
    let s = user_session(&p, slot);
    let kp = gen_keypair(&s, true, label);
    drop(s);
    p.finalize().expect("C_Finalize");
    kp.point
}

#[test]
fn pkcs11_tool_lists_and_logs_in() {
    if !have_pkcs11_tool() {
        return;
    }
    run_in_child("pkcs11_tool_lists_and_logs_in", || {
        provision_key("tool-key");
        let so = module_path();
        let tool = |args: &[&str]| {
            run(Command::new("pkcs11-tool")
                .arg("--module")
                .arg(&so)
                .args(args))
        };

        let o = tool(&["-L"]);
        assert!(o.status.success());
        let t = text(&o);
        assert!(t.contains("Slot 0"), "slot listed");
        assert!(t.contains(TOKEN_LABEL), "token label listed");
        assert!(t.contains("token initialized"), "token flags listed");

        let o = tool(&["-T"]);
        assert!(o.status.success() && text(&o).contains(TOKEN_LABEL));

        let o = tool(&["-M"]);
        assert!(o.status.success());
        let t = text(&o).to_lowercase();
        for m in ALL_MECHANISMS {
            assert!(
                t.contains(&format!("{m:x}")),
                "mechanism {m:#x} listed by pkcs11-tool -M"
            );
        }

        let o = tool(&["-O"]);
        assert!(o.status.success());
        let t = text(&o);
        assert!(t.contains("Public Key Object") && t.contains("tool-key"));
        assert!(
            !t.contains("Private Key Object"),
            "private key hidden without login"
        );

        let o = tool(&["--login", "--pin", USER_PIN, "-O"]);
        assert!(o.status.success());
        let t = text(&o);
        assert!(
            t.contains("Private Key Object"),
            "private key listed after login"
        );
        assert!(t.contains("tool-key"));

        let o = tool(&["--login", "--pin", "wrong-pin-000", "-O"]);
        assert!(!o.status.success(), "a wrong PIN fails");
        assert!(text(&o).contains("CKR_PIN_INCORRECT"));

        // Random numbers through pkcs11-tool.
        let dir = test_dir();
        let rnd = dir.join("rnd.bin");
        let o = tool(&["--generate-random", "48", "-o", rnd.to_str().expect("utf8")]);
        assert!(o.status.success());
        assert_eq!(std::fs::read(&rnd).expect("random file").len(), 48);

        // SM3 via its numeric mechanism.
        let msg = dir.join("abc.bin");
        std::fs::write(&msg, b"abc").expect("write");
        let dig = dir.join("abc.sm3");
        let o = tool(&[
            "--hash",
            "-m",
            "0x80009001",
            "-i",
            msg.to_str().expect("utf8"),
            "-o",
            dig.to_str().expect("utf8"),
        ]);
        assert!(
            o.status.success(),
            "pkcs11-tool --hash -m 0x80009001 failed"
        );
        assert_eq!(std::fs::read(&dig).expect("digest").as_slice(), sm3(b"abc"));
    });
}

#[test]
fn pkcs11_tool_signs_with_vendor_mechanism() {
    if !have_pkcs11_tool() {
        return;
    }
    run_in_child("pkcs11_tool_signs_with_vendor_mechanism", || {
        let point = provision_key("tool-signer");
        let dir = test_dir();
        let msg = dir.join("msg.bin");
        let sig = dir.join("sig.bin");
        let message = b"signed through pkcs11-tool";
        std::fs::write(&msg, message).expect("write");
        let o = run(Command::new("pkcs11-tool")
            .arg("--module")
            .arg(module_path())
            .args(["--login", "--pin", USER_PIN, "--sign", "-m", "0x80008103"])
            .args(["--id", &hex(b"tool-signer")])
            .arg("-i")
            .arg(&msg)
            .arg("-o")
            .arg(&sig));
        assert!(
            o.status.success(),
            "pkcs11-tool --sign -m 0x80008103 failed"
        );
        let sig = std::fs::read(&sig).expect("signature");
        assert!(
            sm2_verify_prehash(&point, &e_value(DEFAULT_ID, &point, message), &sig),
            "pkcs11-tool's signature (0x80008103) verifies with the sm2 crate"
        );
    });
}

/// Writes `pub.pem`, `msg.bin`, `sig.der` and runs `openssl pkeyutl -verify`.
fn openssl_verify(dir: &Path, spki: &[u8], msg: &[u8], sig_der: &[u8], id: &str) -> bool {
    std::fs::write(dir.join("pub.pem"), spki_pem(spki)).expect("write pem");
    std::fs::write(dir.join("msg.bin"), msg).expect("write msg");
    std::fs::write(dir.join("sig.der"), sig_der).expect("write sig");
    let o = run(Command::new("openssl")
        .current_dir(dir)
        .args([
            "pkeyutl", "-verify", "-pubin", "-inkey", "pub.pem", "-rawin",
        ])
        .args(["-in", "msg.bin", "-sigfile", "sig.der", "-digest", "sm3"])
        .args(["-pkeyopt", &format!("distid:{id}")]));
    o.status.success() && text(&o).contains("Signature Verified Successfully")
}

#[test]
fn token_signature_verifies_with_openssl() {
    if !have_openssl() {
        return;
    }
    run_in_child("token_signature_verifies_with_openssl", || {
        let (p, slot) = setup();
        let s = user_session(&p, slot);
        let kp = gen_keypair(&s, false, "ossl");
        let attrs = s
            .get_attributes(kp.public, &[AttributeType::PublicKeyInfo])
            .expect("CKA_PUBLIC_KEY_INFO");
        let [Attribute::PublicKeyInfo(spki)] = attrs.as_slice() else {
            panic!("no CKA_PUBLIC_KEY_INFO: {attrs:?}")
        };
        assert_eq!(spki, &spki_der(&kp.point), "SPKI agrees with CKA_EC_POINT");
        let dir = test_dir();
        let msg: Vec<u8> = (0u8..64).collect();

        let sig = s
            .sign(&mech(CKM_SM3_SM2_Z_DER), kp.private, &msg)
            .expect("sign 0x80008103");
        assert!(
            openssl_verify(&dir, spki, &msg, &sig, "1234567812345678"),
            "openssl verifies the token's 0x80008103 signature"
        );
        // The check is meaningful: a changed message or another ID fails.
        let mut other = msg.clone();
        other[0] ^= 1;
        assert!(!openssl_verify(
            &dir,
            spki,
            &other,
            &sig,
            "1234567812345678"
        ));
        assert!(!openssl_verify(&dir, spki, &msg, &sig, "alice@example"));

        // Raw r||s (0x80008102) re-encoded, and the ID parameter.
        let raw = s
            .sign(&mech(CKM_SM3_SM2_Z), kp.private, &msg)
            .expect("sign raw");
        assert!(openssl_verify(
            &dir,
            spki,
            &msg,
            &raw_to_der(&raw),
            "1234567812345678"
        ));
        let alice = s
            .sign(
                &mech_param(CKM_SM3_SM2_Z_DER, b"alice@example"),
                kp.private,
                &msg,
            )
            .expect("sign with ID");
        assert!(openssl_verify(&dir, spki, &msg, &alice, "alice@example"));
        assert!(!openssl_verify(
            &dir,
            spki,
            &msg,
            &alice,
            "1234567812345678"
        ));
        // Ready-digest mechanism with e computed here.
        let e = e_value(DEFAULT_ID, &kp.point, &msg);
        let sig = s.sign(&mech(CKM_SM2_SIGN), kp.private, &e).expect("sign e");
        assert!(openssl_verify(&dir, spki, &msg, &sig, "1234567812345678"));
    });
}

#[test]
fn token_signature_verifies_with_gmssl() {
    if !have_gmssl() {
        return;
    }
    run_in_child("token_signature_verifies_with_gmssl", || {
        let (p, slot) = setup();
        let s = user_session(&p, slot);
        let kp = gen_keypair(&s, false, "gmssl");
        let msg = b"verified by PyPI gmssl, a pure-Python SM2".to_vec();
        let der = s
            .sign(&mech(CKM_SM3_SM2_Z_DER), kp.private, &msg)
            .expect("sign");
        let raw = s
            .sign(&mech(CKM_SM3_SM2_Z), kp.private, &msg)
            .expect("sign raw");
        // gmssl's constructor strips a leading "04" with str.lstrip, which also eats
        // leading '0'/'4' digits of x: set the attribute after construction instead.
        let script = r#"
import sys
from gmssl import sm2
pub, sig, msg = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
c = sm2.CryptSM2(private_key=None, public_key="00")
c.public_key = pub
print("VERIFY", bool(c.verify_with_sm3(sig, msg)))
"#;
        let verify = |sig_raw: &[u8], m: &[u8]| {
            let o = run(Command::new("python3").args([
                "-c",
                script,
                &hex(&kp.point[1..]),
                &hex(sig_raw),
                &hex(m),
            ]));
            assert!(o.status.success(), "gmssl script failed");
            let t = text(&o);
            assert!(t.contains("VERIFY"), "{t}");
            t.contains("VERIFY True")
        };
        assert!(
            verify(&sig_to_raw(&der), &msg),
            "gmssl verifies 0x80008103 (DER -> r||s)"
        );
        assert!(verify(&raw, &msg), "gmssl verifies 0x80008102 raw r||s");
        let mut other = msg.clone();
        other.push(b'!');
        assert!(!verify(&raw, &other), "gmssl rejects another message");
    });
}

#[test]
fn openssl_signature_verifies_through_token() {
    if !have_openssl() {
        return;
    }
    run_in_child("openssl_signature_verifies_through_token", || {
        let dir = test_dir();
        let o = run(Command::new("openssl").current_dir(&dir).args([
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:SM2",
            "-out",
            "key.pem",
        ]));
        assert!(o.status.success(), "openssl genpkey SM2");
        let o = run(Command::new("openssl").current_dir(&dir).args([
            "pkey", "-in", "key.pem", "-pubout", "-outform", "DER", "-out", "pub.der",
        ]));
        assert!(o.status.success());
        let spki = std::fs::read(dir.join("pub.der")).expect("pub.der");
        let point = spki[spki.len() - 65..].to_vec();
        assert_eq!(
            spki,
            spki_der(&point),
            "OpenSSL's SPKI is the one built here"
        );

        let msg = b"signed by OpenSSL, verified by the token".to_vec();
        std::fs::write(dir.join("msg.bin"), &msg).expect("write msg");
        let o = run(Command::new("openssl").current_dir(&dir).args([
            "pkeyutl",
            "-sign",
            "-inkey",
            "key.pem",
            "-rawin",
            "-in",
            "msg.bin",
            "-digest",
            "sm3",
            "-pkeyopt",
            "distid:1234567812345678",
            "-out",
            "sig.der",
        ]));
        assert!(o.status.success(), "openssl pkeyutl -sign");
        let sig = std::fs::read(dir.join("sig.der")).expect("sig.der");
        assert!(sm2_verify_prehash(
            &point,
            &e_value(DEFAULT_ID, &point, &msg),
            &sig
        ));

        let p = open();
        let slot = slot0(&p);
        init_token(&p, slot);
        // Public-key import and verification need no login.
        let s = p.open_rw_session(slot).expect("session");
        let key = s
            .create_object(&[
                Attribute::Class(ObjectClass::PUBLIC_KEY),
                Attribute::KeyType(sm2_key_type()),
                Attribute::Token(false),
                Attribute::Verify(true),
                Attribute::EcParams(SM2_EC_PARAMS.to_vec()),
                Attribute::EcPoint(wrap_ec_point(&point)),
            ])
            .expect("C_CreateObject SM2 public key");
        s.verify(&mech(CKM_SM3_SM2_Z_DER), key, &msg, &sig)
            .expect("token verifies OpenSSL's signature (0x80008103)");
        s.verify(&mech(CKM_SM3_SM2_Z), key, &msg, &sig_to_raw(&sig))
            .expect("token verifies it as raw r||s (0x80008102)");
        s.verify(
            &mech(CKM_SM2_SIGN),
            key,
            &e_value(DEFAULT_ID, &point, &msg),
            &sig,
        )
        .expect("token verifies it on a ready e (0x80008104)");
        s.verify_init(&mech(CKM_SM3_SM2_Z_DER), key).expect("init");
        s.verify_update(&msg[..7]).expect("update");
        s.verify_update(&msg[7..]).expect("update");
        s.verify_final(&sig)
            .expect("multi-part verify of OpenSSL's signature");
        let mut other = msg.clone();
        other[3] ^= 0x20;
        assert_rv(
            s.verify(&mech(CKM_SM3_SM2_Z_DER), key, &other, &sig),
            RvError::SignatureInvalid,
        );
        assert_rv(
            s.verify(
                &mech_param(CKM_SM3_SM2_Z_DER, b"alice@example"),
                key,
                &msg,
                &sig,
            ),
            RvError::SignatureInvalid,
        );
    });
}

#[test]
fn raw_c_abi_through_python_ctypes() {
    if !have_python() {
        return;
    }
    run_in_child("raw_c_abi_through_python_ctypes", || {
        provision_key("abi-key");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/raw_abi.py");
        let o = run(Command::new("python3")
            .arg(script)
            .arg(module_path())
            .arg(USER_PIN)
            .arg("abi-key"));
        let t = text(&o);
        assert!(o.status.success(), "raw ABI checks failed:\n{t}");
        let line = |tag: &str| {
            t.lines()
                .find_map(|l| l.strip_prefix(tag))
                .map(unhex)
                .unwrap_or_else(|| panic!("no {tag} line"))
        };
        let point = line("POINT ");
        let e = e_value(DEFAULT_ID, &point, b"raw ABI message");
        let ders: Vec<Vec<u8>> = t
            .lines()
            .filter_map(|l| l.strip_prefix("SIG "))
            .map(unhex)
            .collect();
        assert_eq!(ders.len(), 2, "C_Sign and C_SignFinal signatures");
        for der in &ders {
            assert_der_signature(der);
            assert!(
                sm2_verify_prehash(&point, &e, der),
                "ctypes DER signature verifies"
            );
        }
        let raw = line("RAWSIG ");
        assert_eq!(raw.len(), 64);
        assert!(
            sm2_verify_prehash(&point, &e, &raw),
            "ctypes raw signature verifies"
        );
    });
}
