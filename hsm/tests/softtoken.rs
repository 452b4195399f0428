//! Against svs-softtoken: embedded (`Pkcs11::new_from_self`) and by path,
//! every path of the crate, and recovery under injected faults.
//!
//! Each test body runs in a child process: faults and token removal are
//! module-wide, and a module is loaded once per process.

// Test code: panicking on failure and printing progress is the point.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use sm2::dsa::signature::Verifier;
use svs_hsm::token::load_module;
use svs_hsm::{
    HealthState, Hsm, HsmConfig, HsmError, ModuleSource, NoMetrics, PinSource, SignatureEncoding,
};

const USER_PIN: &str = "user-pin-1";
const SO_PIN: &str = "so-pin-1";

fn write_conf(dir: &Path) -> PathBuf {
    let conf = dir.join("softtoken.toml");
    std::fs::create_dir_all(dir.join("store")).unwrap();
    std::fs::write(
        &conf,
        format!(
            "store_dir = \"{}\"\nslots = 2\nkdf_iterations = 1000\n",
            dir.join("store").display()
        ),
    )
    .unwrap();
    std::fs::write(dir.join("pin"), USER_PIN).unwrap();
    conf
}

/// Parent side: make a store and re-run `name` in a child.
fn spawn(name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let conf = write_conf(dir.path());
    common::run_child(
        name,
        &[
            ("SVS_SOFTTOKEN_CONF", conf.as_os_str()),
            ("SVS_TEST_DIR", dir.path().as_os_str()),
        ],
    );
}

fn test_dir() -> PathBuf {
    PathBuf::from(std::env::var_os("SVS_TEST_DIR").unwrap())
}

/// Child side: initialise slot 0 as token "svs" with a user PIN.
fn init_token(module: &ModuleSource) {
    let pkcs11 = load_module(module).unwrap();
    let slot = pkcs11.get_all_slots().unwrap()[0];
    pkcs11
        .init_token(slot, &AuthPin::from(SO_PIN), "svs")
        .unwrap();
    let s = pkcs11.open_rw_session(slot).unwrap();
    s.login(UserType::So, Some(&AuthPin::from(SO_PIN))).unwrap();
    s.init_pin(&AuthPin::from(USER_PIN)).unwrap();
    s.logout().unwrap();
}

fn embedded() -> ModuleSource {
    // Referencing the rlib keeps its exported C_GetFunctionList in this
    // executable, where `new_from_self` looks for it.
    svs_softtoken::set_config_path(Some(test_dir().join("softtoken.toml")));
    ModuleSource::Embedded
}

fn config(module: ModuleSource) -> HsmConfig {
    let mut c = HsmConfig {
        module,
        token_label: Some("svs".into()),
        pin: Some(PinSource::File(test_dir().join("pin"))),
        verify_after_sign: true,
        ..HsmConfig::default()
    };
    c.pool.size = 2;
    // Generous: debug-build SM2 arithmetic on a shared 2-core machine.
    c.pool.op_timeout_ms = 10_000;
    c.pool.backoff_initial_ms = 10;
    c.pool.backoff_max_ms = 200;
    c.pool.probe_interval_ms = 100;
    c
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Independent check with the sm2 crate (it computes Z itself).
fn sm2_verifies(point: &[u8], id: &str, msg: &[u8], sig: &[u8]) -> bool {
    let vk = sm2::dsa::VerifyingKey::from_sec1_bytes(id, point).unwrap();
    let sig = if sig.len() == 64 {
        sm2::dsa::Signature::from_slice(sig)
    } else {
        sm2::dsa::Signature::from_der(sig)
    };
    sig.is_ok_and(|s| vk.verify(msg, &s).is_ok())
}

#[test]
fn softtoken_end_to_end() {
    if !common::in_child() {
        return spawn("softtoken_end_to_end");
    }
    let module = embedded();
    init_token(&module);
    runtime().block_on(end_to_end(module));
}

async fn end_to_end(module: ModuleSource) {
    let dir = test_dir();
    let hsm = Arc::new(Hsm::open(&config(module.clone()), Arc::new(NoMetrics)).unwrap());
    assert_eq!(
        hsm.profile().name,
        "svs-softtoken",
        "recognised from CK_INFO"
    );
    assert_eq!(hsm.health().workers, 2);

    let key = hsm.generate_key("nia-auth", None).await.unwrap();
    hsm.generate_key("second", Some(b"k2".to_vec()))
        .await
        .unwrap();
    assert_eq!(key.public_point.len(), 65);
    assert!(key.certificate_chain.is_empty());

    // A data object (svsd's audit anchor): replaced, never duplicated;
    // not a key.
    hsm.replace_data("anchor", b"one".to_vec()).await.unwrap();
    hsm.replace_data("anchor", b"two".to_vec()).await.unwrap();
    assert_eq!(hsm.read_data("anchor").await.unwrap(), [b"two".to_vec()]);
    assert!(hsm.read_data("nia-auth").await.unwrap().is_empty());
    assert_eq!(hsm.refresh_keys().await.unwrap().len(), 2);
    // Re-read without installing (svsd's reload tests changed keys first).
    let found = hsm.discover_keys().await.unwrap();
    hsm.install_keys(Default::default());
    assert_eq!(hsm.discover_keys().await.unwrap().len(), 2);
    assert!(hsm.key("nia-auth").is_err(), "discovery installs nothing");
    hsm.install_keys(found);
    assert_eq!(hsm.key("nia-auth").unwrap().public_point, key.public_point);

    // Sign a message (Z and e on the host), both encodings.
    let msg = b"SVS SM2 message".to_vec();
    let der = hsm
        .sign("nia-auth", None, &msg, SignatureEncoding::Der)
        .await
        .unwrap();
    assert_eq!(der[0], 0x30);
    assert!(sm2_verifies(
        &key.public_point,
        "1234567812345678",
        &msg,
        &der
    ));
    hsm.verify("nia-auth", None, &msg, &der).unwrap();
    assert!(hsm.verify("second", None, &msg, &der).is_err());
    let raw = hsm
        .sign("nia-auth", None, &msg, SignatureEncoding::Raw)
        .await
        .unwrap();
    assert_eq!(raw.len(), 64);
    assert!(sm2_verifies(
        &key.public_point,
        "1234567812345678",
        &msg,
        &raw
    ));

    // Another distinguishing ID.
    let alice = hsm
        .sign(
            "nia-auth",
            Some(b"alice@example.cn"),
            &msg,
            SignatureEncoding::Der,
        )
        .await
        .unwrap();
    assert!(sm2_verifies(
        &key.public_point,
        "alice@example.cn",
        &msg,
        &alice
    ));
    assert!(!sm2_verifies(
        &key.public_point,
        "1234567812345678",
        &msg,
        &alice
    ));
    hsm.verify("nia-auth", Some(b"alice@example.cn"), &msg, &alice)
        .unwrap();

    // A caller's ready e.
    let e = hsm.digest_for(&key, None, &msg).unwrap();
    let by_e = hsm
        .sign_digest("nia-auth", &e, SignatureEncoding::Der)
        .await
        .unwrap();
    assert!(sm2_verifies(
        &key.public_point,
        "1234567812345678",
        &msg,
        &by_e
    ));

    // OpenSSL checks one signature independently.
    if common::have_tool("openssl", "version") {
        let pem = common::spki_to_pem(&key.spki_der, &dir, "nia-auth");
        std::fs::write(dir.join("msg.bin"), &msg).unwrap();
        std::fs::write(dir.join("sig.der"), &der).unwrap();
        let out = common::openssl(&[
            "pkeyutl",
            "-verify",
            "-pubin",
            "-inkey",
            pem.to_str().unwrap(),
            "-rawin",
            "-in",
            dir.join("msg.bin").to_str().unwrap(),
            "-sigfile",
            dir.join("sig.der").to_str().unwrap(),
            "-digest",
            "sm3",
            "-pkeyopt",
            "distid:1234567812345678",
        ]);
        assert!(out.contains("Signature Verified Successfully"), "{out}");

        // Certificates: a P-256 CA (OpenSSL 3.0 cannot sign with SM2 in
        // `x509`) issuing a certificate for the SM2 key.
        let ca_key = dir.join("ca.key");
        let ca_pem = dir.join("ca.pem");
        common::openssl(&[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            ca_key.to_str().unwrap(),
        ]);
        common::openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            ca_key.to_str().unwrap(),
            "-subj",
            "/CN=SVS CA",
            "-days",
            "2",
            "-out",
            ca_pem.to_str().unwrap(),
        ]);
        let leaf_pem = dir.join("leaf.pem");
        common::openssl(&[
            "x509",
            "-new",
            "-force_pubkey",
            pem.to_str().unwrap(),
            "-subj",
            "/CN=nia-auth",
            "-CA",
            ca_pem.to_str().unwrap(),
            "-CAkey",
            ca_key.to_str().unwrap(),
            "-days",
            "2",
            "-out",
            leaf_pem.to_str().unwrap(),
        ]);
        let to_der = |p: &Path| {
            let d = p.with_extension("der");
            common::openssl(&[
                "x509",
                "-in",
                p.to_str().unwrap(),
                "-outform",
                "DER",
                "-out",
                d.to_str().unwrap(),
            ]);
            std::fs::read(d).unwrap()
        };
        let (ca, leaf) = (to_der(&ca_pem), to_der(&leaf_pem));
        assert!(
            hsm.import_certificate(Some("second"), "x", &leaf)
                .await
                .is_err()
        );
        hsm.import_certificate(Some("nia-auth"), "nia-auth", &leaf)
            .await
            .unwrap();
        hsm.import_certificate(None, "svs-ca", &ca).await.unwrap();
        assert_eq!(
            hsm.key("nia-auth").unwrap().certificate_chain,
            vec![leaf, ca]
        );
    }

    // Many tasks at once: every signature verifies.
    let mut tasks = Vec::new();
    for i in 0..400u32 {
        let hsm = hsm.clone();
        tasks.push(tokio::spawn(async move {
            let m = format!("concurrent {i}").into_bytes();
            let name = if i % 3 == 0 { "second" } else { "nia-auth" };
            let enc = if i % 2 == 0 {
                SignatureEncoding::Der
            } else {
                SignatureEncoding::Raw
            };
            let s = hsm.sign(name, None, &m, enc).await.unwrap();
            (hsm.key(name).unwrap(), m, s)
        }));
    }
    for t in tasks {
        let (k, m, s) = t.await.unwrap();
        assert!(sm2_verifies(&k.public_point, "1234567812345678", &m, &s));
    }
    assert_eq!(hsm.health().state, HealthState::Up);
    drop(hsm);

    // A second Hsm in the process, selected by URI with a serial, sees the keys.
    let pkcs11 = load_module(&module).unwrap();
    let slot = pkcs11.get_slots_with_token().unwrap()[0];
    let serial = pkcs11
        .get_token_info(slot)
        .unwrap()
        .serial_number()
        .trim_end()
        .to_owned();
    let mut by_uri = config(module.clone());
    by_uri.token_label = None;
    by_uri.uri = Some(format!("pkcs11:token=svs;serial={serial};object=nia-auth"));
    let hsm2 = Hsm::open(&by_uri, Arc::new(NoMetrics)).unwrap();
    assert_eq!(hsm2.default_key(), Some("nia-auth"));
    let names: Vec<_> = hsm2
        .refresh_keys()
        .await
        .unwrap()
        .iter()
        .map(|k| k.name.clone())
        .collect();
    assert_eq!(names, ["nia-auth", "second"]);
    let s = hsm2
        .sign("nia-auth", None, &msg, SignatureEncoding::Der)
        .await
        .unwrap();
    assert!(sm2_verifies(
        &key.public_point,
        "1234567812345678",
        &msg,
        &s
    ));

    // Pool larger than the token allows, or zero.
    let mut zero = config(module.clone());
    zero.pool.size = 0;
    assert!(matches!(
        Hsm::open(&zero, Arc::new(NoMetrics)),
        Err(HsmError::Config(_))
    ));

    // A mechanism the token lacks fails at start-up, by number.
    let mut missing = config(module.clone());
    missing.profiles = vec![svs_hsm::profile::ProfileOverride {
        base: Some("svs-softtoken".into()),
        sign_digest_mechanism: Some(0x8000_8FFF),
        ..Default::default()
    }];
    let e = Hsm::open(&missing, Arc::new(NoMetrics)).unwrap_err();
    assert!(e.to_string().contains("0x80008fff"), "{e}");

    // Faulty hardware, simulated: a mechanism that hashes its input again
    // signs SM3(e) instead of e. Verify-after-sign stops it.
    let mut faulty = config(module.clone());
    faulty.profiles = vec![svs_hsm::profile::ProfileOverride {
        base: Some("svs-softtoken".into()),
        sign_digest_mechanism: Some(0x8000_8100),
        signature_encoding: Some(SignatureEncoding::Raw),
        ..Default::default()
    }];
    let bad = Hsm::open(&faulty, Arc::new(NoMetrics)).unwrap();
    bad.refresh_keys().await.unwrap();
    let e = bad
        .sign("nia-auth", None, &msg, SignatureEncoding::Der)
        .await
        .unwrap_err();
    assert!(matches!(e, HsmError::FaultySignature(_)), "{e}");
    drop(bad);
    faulty.verify_after_sign = false;
    let unchecked = Hsm::open(&faulty, Arc::new(NoMetrics)).unwrap();
    unchecked.refresh_keys().await.unwrap();
    let wrong = unchecked
        .sign("nia-auth", None, &msg, SignatureEncoding::Der)
        .await
        .unwrap();
    assert!(
        !sm2_verifies(&key.public_point, "1234567812345678", &msg, &wrong),
        "the check is what catches it"
    );

    // Wrong PIN: start-up error with the CK_RV, PIN not in the message.
    let mut wrong_pin = config(module);
    std::fs::write(dir.join("badpin"), "not-the-pin").unwrap();
    wrong_pin.pin = Some(PinSource::File(dir.join("badpin")));
    // The user is logged in already in this process (login is per
    // application), so log out first through a fresh session.
    drop(hsm2);
    drop(unchecked);
    let s = pkcs11.open_ro_session(slot).unwrap();
    let _ = s.logout();
    drop(s);
    let e = Hsm::open(&wrong_pin, Arc::new(NoMetrics)).unwrap_err();
    assert_eq!(e.ck_rv(), Some(0xA0), "{e}");
    assert!(!format!("{e} {e:?}").contains("not-the-pin"));
}

#[test]
fn softtoken_by_path() {
    if !common::in_child() {
        return spawn("softtoken_by_path");
    }
    // The module cargo built for this run is beside the test executable in
    // target/<profile>/deps/; the copy one level up is not always refreshed.
    let exe = std::env::current_exe().unwrap();
    let lib = exe.parent().unwrap().join("libsvs_softtoken.so");
    assert!(
        lib.exists(),
        "{} missing: build svs-softtoken first",
        lib.display()
    );
    let module = ModuleSource::Path(lib);
    init_token(&module);
    runtime().block_on(async {
        let hsm = Hsm::open(&config(module), Arc::new(NoMetrics)).unwrap();
        let key = hsm.generate_key("by-path", None).await.unwrap();
        let s = hsm
            .sign("by-path", None, b"m", SignatureEncoding::Der)
            .await
            .unwrap();
        assert!(sm2_verifies(
            &key.public_point,
            "1234567812345678",
            b"m",
            &s
        ));
    });
}

/// A PIN changed under a running pool: the pool logs in with its old PIN
/// once, is refused, and does not try again — retrying would lock the new
/// PIN for every application after a handful of attempts.
#[test]
fn changed_pin_is_not_retried_into_a_lockout() {
    if !common::in_child() {
        return spawn("changed_pin_is_not_retried_into_a_lockout");
    }
    let module = embedded();
    init_token(&module);
    runtime().block_on(async {
        let hsm = Hsm::open(&config(module.clone()), Arc::new(NoMetrics)).unwrap();
        hsm.generate_key("k", None).await.unwrap();
        hsm.sign("k", None, b"before", SignatureEncoding::Der)
            .await
            .unwrap();
        // Another application changes the PIN, and the login is lost.
        let pkcs11 = load_module(&module).unwrap();
        let slot = pkcs11.get_all_slots().unwrap()[0];
        let s = pkcs11.open_rw_session(slot).unwrap();
        s.set_pin(&AuthPin::from(USER_PIN), &AuthPin::from("new-user-pin"))
            .unwrap();
        s.logout().unwrap();
        // Work keeps arriving for a while, and idle probes keep running.
        let until = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < until {
            assert!(
                hsm.sign("k", None, b"after", SignatureEncoding::Der)
                    .await
                    .is_err()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let info = pkcs11.get_token_info(slot).unwrap();
        assert!(!info.user_pin_locked(), "the pool locked the PIN");
        assert!(
            !info.user_pin_final_try(),
            "the pool retried a refused PIN: {:?}",
            hsm.health()
        );
        // The new PIN still works for the officer who set it.
        s.login(UserType::User, Some(&AuthPin::from("new-user-pin")))
            .unwrap();
    });
}

/// A key deleted and re-created under the same CKA_ID after discovery
/// never signs a digest made for the old key; an ID in use is refused.
#[test]
fn a_replaced_key_does_not_sign_for_the_old_one() {
    if !common::in_child() {
        return spawn("a_replaced_key_does_not_sign_for_the_old_one");
    }
    let module = embedded();
    init_token(&module);
    runtime().block_on(async {
        let metrics = Arc::new(CountingMetrics::default());
        let hsm = Hsm::open(&config(module.clone()), metrics.clone()).unwrap();
        let old = hsm
            .generate_key("k", Some(b"key-1".to_vec()))
            .await
            .unwrap();
        let taken = hsm.generate_key("other", Some(b"key-1".to_vec())).await;
        assert!(matches!(taken, Err(HsmError::InvalidInput(_))), "{taken:?}");

        // Another application replaces the key behind the pool's back.
        replace_key(&module, b"key-1", "k");

        let r = hsm.sign("k", None, b"m", SignatureEncoding::Der).await;
        assert!(matches!(r, Err(HsmError::KeyChanged(_))), "{r:?}");
        // In a batch each item is refused alone, and counted like a
        // refused single signature.
        let digest = hsm.digest_for(&old, None, b"m").unwrap();
        let out = hsm.sign_digests(vec![(old.clone(), digest); 3]).await;
        assert!(
            out.iter()
                .all(|r| matches!(r, Err(HsmError::KeyChanged(_)))),
            "{out:?}"
        );
        assert_eq!(metrics.count("key_changed"), 4);
        // After a refresh the new key is served, with its own Z.
        hsm.refresh_keys().await.unwrap();
        let new = hsm.key("k").unwrap();
        assert_ne!(new.public_point, old.public_point);
        let sig = hsm
            .sign("k", None, b"m", SignatureEncoding::Der)
            .await
            .unwrap();
        assert!(sm2_verifies(
            &new.public_point,
            "1234567812345678",
            b"m",
            &sig
        ));
    });
}

/// Another application deletes the key pair under `id` and generates a new
/// one with the same CKA_ID and `label`.
fn replace_key(module: &ModuleSource, id: &[u8], label: &str) {
    use cryptoki::object::Attribute as A;
    let pkcs11 = load_module(module).unwrap();
    let slot = pkcs11.get_all_slots().unwrap()[0];
    let s = pkcs11.open_rw_session(slot).unwrap();
    for h in s.find_objects(&[A::Id(id.to_vec())]).unwrap() {
        s.destroy_object(h).unwrap();
    }
    let sm2 = cryptoki::object::KeyType::new_vendor_defined(0x8000_0004).unwrap();
    let keygen = cryptoki::mechanism::Mechanism::VendorDefined(
        cryptoki::mechanism::vendor_defined::VendorDefinedMechanism::new::<()>(
            cryptoki::mechanism::MechanismType::new_vendor_defined(0x8000_8001).unwrap(),
            None,
        ),
    );
    s.generate_key_pair(
        &keygen,
        &[A::Token(true), A::KeyType(sm2), A::Id(id.to_vec())],
        &[
            A::Token(true),
            A::KeyType(sm2),
            A::Id(id.to_vec()),
            A::Label(label.as_bytes().to_vec()),
            A::Sign(true),
        ],
    )
    .unwrap();
}

/// On a token that states no public key for its keys (modelled by every
/// C_GetAttributeValue answering "no such attribute"), a key replaced
/// under the same CKA_ID is not taken on trust: its signatures are checked
/// in software, so no signature for the old key's digest leaves.
#[test]
fn a_replaced_key_on_a_token_that_states_no_public_key_signs_nothing_wrong() {
    if !common::in_child() {
        return spawn("a_replaced_key_on_a_token_that_states_no_public_key_signs_nothing_wrong");
    }
    let module = embedded();
    init_token(&module);
    runtime().block_on(async {
        // As svsd runs by default: only unconfirmed keys are checked.
        let mut cfg = config(module.clone());
        cfg.verify_after_sign = false;
        let hsm = Hsm::open(&cfg, Arc::new(NoMetrics)).unwrap();
        let old = hsm
            .generate_key("k", Some(b"key-2".to_vec()))
            .await
            .unwrap();
        replace_key(&module, b"key-2", "k");
        svs_softtoken::faults::install("C_GetAttributeValue:rv=0x12").unwrap();
        let r = hsm.sign("k", None, b"m", SignatureEncoding::Der).await;
        assert!(matches!(r, Err(HsmError::FaultySignature(_))), "{r:?}");
        // The key not replaced, stated or not: its signatures go out.
        svs_softtoken::faults::clear();
        hsm.refresh_keys().await.unwrap();
        let new = hsm.key("k").unwrap();
        assert_ne!(new.public_point, old.public_point);
        svs_softtoken::faults::install("C_GetAttributeValue:rv=0x12").unwrap();
        let sig = hsm
            .sign("k", None, b"m", SignatureEncoding::Der)
            .await
            .unwrap();
        svs_softtoken::faults::clear();
        assert!(sm2_verifies(
            &new.public_point,
            "1234567812345678",
            b"m",
            &sig
        ));
    });
}

/// Signs `n` messages, sequentially; returns (ok, failed). Every returned
/// signature must verify.
async fn sign_many(hsm: &Hsm, point: &[u8], n: usize, tag: &str) -> (usize, usize) {
    let (mut ok, mut failed) = (0, 0);
    for i in 0..n {
        let m = format!("{tag} {i}").into_bytes();
        match hsm.sign("k", None, &m, SignatureEncoding::Der).await {
            Ok(s) => {
                assert!(
                    sm2_verifies(point, "1234567812345678", &m, &s),
                    "wrong signature returned"
                );
                ok += 1;
            }
            Err(e) => {
                println!("{tag}: {e}");
                failed += 1;
            }
        }
    }
    (ok, failed)
}

async fn wait_up(hsm: &Hsm, within: Duration) {
    let until = Instant::now() + within;
    while hsm.health().state != HealthState::Up {
        assert!(
            Instant::now() < until,
            "pool did not recover: {:?}",
            hsm.health()
        );
        // A job lets the health record a success after recovery.
        let _ = hsm.sign("k", None, b"probe", SignatureEncoding::Raw).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn softtoken_recovery() {
    if !common::in_child() {
        return spawn("softtoken_recovery");
    }
    let module = embedded();
    init_token(&module);
    runtime().block_on(recovery(module));
}

async fn recovery(module: ModuleSource) {
    let mut cfg = config(module);
    cfg.pool.op_timeout_ms = 1000;
    let metrics = Arc::new(CountingMetrics::default());
    let hsm = Arc::new(Hsm::open(&cfg, metrics.clone()).unwrap());
    let key = hsm.generate_key("k", None).await.unwrap();
    let point = key.public_point.clone();
    use svs_softtoken::faults;

    // Device errors: a failed C_Sign is retried once on a new session. Three
    // faults in a row: the first job fails twice (retried once, then the
    // error is returned), the next one succeeds on its retry.
    faults::install("C_Sign:device_error:after=5,count=3").unwrap();
    let (ok, failed) = sign_many(&hsm, &point, 30, "device_error").await;
    assert_eq!((ok, failed), (29, 1));
    faults::clear();
    faults::install("C_Sign:device_error:after=1,count=1").unwrap();
    assert_eq!(sign_many(&hsm, &point, 5, "one device_error").await, (5, 0));
    faults::clear();

    // Invalid session handles: same.
    faults::install("C_Sign:session_handle_invalid:after=2,count=3").unwrap();
    let (ok, failed) = sign_many(&hsm, &point, 30, "session_handle_invalid").await;
    assert_eq!((ok, failed), (29, 1));
    faults::clear();

    // General error is fatal for the one operation, not for the pool.
    faults::install("C_Sign:general_error:count=1").unwrap();
    let e = hsm
        .sign("k", None, b"x", SignatureEncoding::Der)
        .await
        .unwrap_err();
    assert_eq!(e.ck_rv(), Some(0x5));
    faults::clear();
    assert_eq!(
        sign_many(&hsm, &point, 5, "after general_error").await,
        (5, 0)
    );

    // Batches go as one job per worker. A session fault in the middle of a
    // job sends the whole job to recovery and its retry signs every item
    // again: each item gets a signature over its own digest, none is lost.
    let batch = |tag: &str| {
        (0..40)
            .map(|i| {
                let m = format!("{tag} {i}").into_bytes();
                (
                    m.clone(),
                    (key.clone(), hsm.digest_for(&key, None, &m).unwrap()),
                )
            })
            .unzip::<_, _, Vec<_>, Vec<_>>()
    };
    faults::install("C_Sign:session_handle_invalid:after=7,count=1").unwrap();
    let (messages, items) = batch("batch");
    let out = hsm.sign_digests(items).await;
    faults::clear();
    assert_eq!(out.len(), messages.len());
    for (m, r) in messages.iter().zip(&out) {
        let raw = r.as_ref().expect("retried on a new session");
        assert!(
            sm2_verifies(&point, "1234567812345678", m, raw),
            "wrong signature in batch"
        );
    }
    // A token that keeps failing: every item fails, none gets a result.
    faults::install("C_Sign:device_error").unwrap();
    let (_, items) = batch("failing batch");
    let out = hsm.sign_digests(items).await;
    faults::clear();
    assert_eq!(out.len(), 40);
    assert!(
        out.iter()
            .all(|r| r.as_ref().is_err_and(|e| e.ck_rv() == Some(0x30))),
        "{out:?}"
    );
    assert_eq!(
        sign_many(&hsm, &point, 5, "after failing batch").await,
        (5, 0)
    );

    // Token removed, then back: calls fail cleanly while it is gone, the
    // pool reopens sessions and logs in again without a restart.
    faults::install("*:token_not_present").unwrap();
    let (ok, failed) = sign_many(&hsm, &point, 5, "token removed").await;
    assert_eq!((ok, failed), (0, 5));
    // Opened while it is gone: the HSM is unavailable, not the token
    // unprovisioned (svsd waits for the HSM rather than sending the officer
    // to provision it).
    let e = Hsm::open(&cfg, Arc::new(NoMetrics)).unwrap_err();
    assert!(matches!(e, svs_hsm::HsmError::Unavailable(_)), "{e:?}");
    // Idle probes notice that no worker has a session any more.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let h = hsm.health();
    assert_eq!(h.state, HealthState::Down, "{h:?}");
    assert!(
        h.last_error
            .as_deref()
            .is_some_and(|e| e.contains("CKR_TOKEN_NOT_PRESENT")),
        "{h:?}"
    );
    faults::clear();
    wait_up(&hsm, Duration::from_secs(5)).await;
    assert_eq!(sign_many(&hsm, &point, 10, "token back").await, (10, 0));

    // A short removal (a bounded number of failing calls) is ridden out
    // inside the operation deadline by the backoff and the one retry.
    faults::install("*:token_not_present:count=40").unwrap();
    let (ok, failed) = sign_many(&hsm, &point, 40, "token blip").await;
    println!("token blip: ok {ok} failed {failed}");
    assert!(ok >= 35);
    faults::clear();
    wait_up(&hsm, Duration::from_secs(5)).await;
    assert!(metrics.count("CKR_TOKEN_NOT_PRESENT") > 0);

    // Rapid removal while signing concurrently.
    faults::install("*:token_not_present:after=50,count=10").unwrap();
    let mut tasks = Vec::new();
    for i in 0..100u32 {
        let hsm = hsm.clone();
        tasks.push(tokio::spawn(async move {
            let m = format!("race {i}").into_bytes();
            (
                m.clone(),
                hsm.sign("k", None, &m, SignatureEncoding::Raw).await,
            )
        }));
    }
    // Every signature handed out is right, and each failure is one of the
    // ten faulty calls' or the 1 s deadline's: how many wait out the
    // deadline depends on how fast re-login runs on a loaded machine (a
    // third with eight busy loops on two cores), so only the faults' share
    // is bounded.
    let (mut ok, mut timed_out, mut faulted) = (0, 0, Vec::new());
    for t in tasks {
        match t.await.unwrap() {
            (m, Ok(s)) => {
                assert!(sm2_verifies(&point, "1234567812345678", &m, &s));
                ok += 1;
            }
            (_, Err(HsmError::Timeout(_))) => timed_out += 1,
            (_, Err(e)) => faulted.push(e.to_string()),
        }
    }
    println!("rapid removal: ok {ok}, timed out {timed_out}, failed {faulted:?}");
    assert!(ok > 0 && faulted.len() <= 10, "ok {ok}, failed {faulted:?}");
    faults::clear();
    wait_up(&hsm, Duration::from_secs(5)).await;

    // A stall longer than the operation timeout: the caller gets Timeout,
    // the pool is degraded while the worker is stuck, then carries on.
    faults::install("C_Sign:stall=1800:count=1").unwrap();
    let stalled = {
        let hsm = hsm.clone();
        tokio::spawn(async move { hsm.sign("k", None, b"stall", SignatureEncoding::Der).await })
    };
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let h = hsm.health();
    assert_eq!(h.workers_stuck, 1, "{h:?}");
    assert_eq!(h.state, HealthState::Degraded);
    // The other worker still serves.
    assert_eq!(sign_many(&hsm, &point, 3, "during stall").await, (3, 0));
    assert!(matches!(stalled.await.unwrap(), Err(HsmError::Timeout(_))));
    faults::clear();
    tokio::time::sleep(Duration::from_millis(800)).await;
    wait_up(&hsm, Duration::from_secs(5)).await;

    // Queue full → Busy.
    let mut small = cfg.clone();
    small.pool.size = 1;
    small.pool.queue_depth = 1;
    let busy_hsm = Arc::new(Hsm::open(&small, Arc::new(NoMetrics)).unwrap());
    busy_hsm.refresh_keys().await.unwrap();
    // cryptoki calls C_Sign twice per signature (length, then data): 300 ms each.
    faults::install("C_Sign:stall=150").unwrap();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let h = busy_hsm.clone();
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let r = h.sign("k", None, b"b", SignatureEncoding::Der).await;
            println!(
                "busy test: {:?} after {:?}",
                r.as_ref().map(|_| ()),
                t0.elapsed()
            );
            r
        }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut busy = 0;
    for t in tasks {
        match t.await.unwrap() {
            Err(HsmError::Busy { retry_after }) => {
                assert!(retry_after >= Duration::from_secs(1));
                busy += 1;
            }
            Ok(s) => assert!(sm2_verifies(&point, "1234567812345678", b"b", &s)),
            Err(e) => panic!("{e}"),
        }
    }
    assert!(busy >= 1);
    faults::clear();
    assert_eq!(hsm.health().state, HealthState::Up);
    assert!(metrics.count("CKR_DEVICE_ERROR") >= 3);
    assert!(metrics.count("timeout") >= 1);
    assert!(metrics.recoveries.load(Ordering::Relaxed) > 0);
    assert!(metrics.ops.load(Ordering::Relaxed) > 100);
}

/// Counts what the metrics hooks report.
#[derive(Default)]
struct CountingMetrics {
    errors: Mutex<HashMap<&'static str, usize>>,
    recoveries: AtomicUsize,
    ops: AtomicUsize,
}

impl CountingMetrics {
    fn count(&self, label: &str) -> usize {
        self.errors.lock().unwrap().get(label).copied().unwrap_or(0)
    }
}

impl svs_hsm::HsmMetrics for CountingMetrics {
    fn error(&self, label: &'static str) {
        *self.errors.lock().unwrap().entry(label).or_default() += 1;
    }
    fn recovery(&self, _class: svs_hsm::RvClass) {
        self.recoveries.fetch_add(1, Ordering::Relaxed);
    }
    fn operation(&self, op: &'static str, mechanism: Option<u64>, _latency: Duration, _ok: bool) {
        if op == "sign" {
            assert_eq!(mechanism, Some(0x8000_8104));
        }
        self.ops.fetch_add(1, Ordering::Relaxed);
    }
}
