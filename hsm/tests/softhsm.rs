//! Against Debian's SoftHSMv2 with the `ecdsa-p256` profile: a third-party
//! PKCS#11 module with standard mechanisms only.

// Test code: panicking on failure and printing progress is the point.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use cryptoki::context::{CInitializeArgs, CInitializeFlags};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use svs_hsm::token::load_module;
use svs_hsm::{Hsm, HsmConfig, HsmError, ModuleSource, NoMetrics, SignatureEncoding};

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const PIN: &str = "4321-user";

/// OpenSC's pkcs11-tool on the test token with `args`: its output, or
/// None where it is not installed.
fn pkcs11_tool(args: &[&str]) -> Option<String> {
    if !common::have_tool("pkcs11-tool", "--version") {
        return None;
    }
    let out = Command::new("pkcs11-tool")
        .args(["--module", MODULE, "--token-label", "svs-test"])
        .args(args)
        .env("SOFTHSM2_CONF", std::env::var_os("SOFTHSM2_CONF").unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn setup(dir: &Path) -> PathBuf {
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .unwrap();
    let out = Command::new("softhsm2-util")
        .args([
            "--init-token",
            "--free",
            "--label",
            "svs-test",
            "--so-pin",
            "1234-so",
            "--pin",
            PIN,
        ])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .expect("softhsm2-util");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(dir.join("pin"), format!("{PIN}\n")).unwrap();
    conf
}

#[test]
fn softhsm_p256_end_to_end() {
    if !common::in_child() {
        if !common::have_tool("softhsm2-util", "--version")
            || !common::have_tool("openssl", "version")
        {
            return;
        }
        if !Path::new(MODULE).exists() {
            assert!(
                std::env::var_os("CI").is_none(),
                "{MODULE} missing under CI"
            );
            println!("SKIP: {MODULE} missing");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let conf = setup(dir.path());
        common::run_child(
            "softhsm_p256_end_to_end",
            &[
                ("SOFTHSM2_CONF", conf.as_os_str()),
                ("SVS_TEST_DIR", dir.path().as_os_str()),
            ],
        );
        return;
    }
    let dir = PathBuf::from(std::env::var_os("SVS_TEST_DIR").unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(body(&dir));
}

async fn body(dir: &Path) {
    let pin_path = dir.join("pin");

    // Vendor recognition cannot know SoftHSM; a clear start-up error.
    let auto = HsmConfig::from_toml(&format!(
        "module = {{ path = \"{MODULE}\" }}\ntoken_label = \"svs-test\"\npin = {{ file = \"{}\" }}",
        pin_path.display()
    ))
    .unwrap();
    let e = Hsm::open(&auto, Arc::new(NoMetrics)).unwrap_err();
    assert!(
        matches!(e, HsmError::Config(ref m) if m.contains("recognise")),
        "{e}"
    );

    // An SM2 profile on SoftHSM: the vendor mechanism is missing.
    let mut sm2 = auto.clone();
    sm2.profile = "svs-softtoken".into();
    let e = Hsm::open(&sm2, Arc::new(NoMetrics)).unwrap_err();
    assert!(
        matches!(
            e,
            HsmError::MissingMechanism {
                code: 0x8000_8104,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("0x80008104"), "{e}");

    // Wrong token.
    let mut wrong = auto.clone();
    wrong.token_label = Some("nope".into());
    wrong.profile = "ecdsa-p256".into();
    assert!(matches!(
        Hsm::open(&wrong, Arc::new(NoMetrics)),
        Err(HsmError::TokenNotFound(_))
    ));

    // Wrong PIN: a start-up error carrying CKR_PIN_INCORRECT.
    std::fs::write(dir.join("badpin"), "0000").unwrap();
    let mut bad_pin = auto.clone();
    bad_pin.profile = "ecdsa-p256".into();
    bad_pin.pin = Some(svs_hsm::PinSource::File(dir.join("badpin")));
    let e = Hsm::open(&bad_pin, Arc::new(NoMetrics)).unwrap_err();
    assert_eq!(e.ck_rv(), Some(0xA0), "{e}");
    assert!(!format!("{e:?}").contains("0000"));

    // The real thing, selected by URI with pin-source and module-path.
    let mut config = HsmConfig::from_toml(&format!(
        "uri = \"pkcs11:token=svs-test?module-path={MODULE}&pin-source=file:{}\"\nprofile = \"ecdsa-p256\"",
        pin_path.display()
    ))
    .unwrap();
    config.pool.size = 2;
    config.pool.op_timeout_ms = 3000;
    config.pool.backoff_initial_ms = 10;
    config.pool.backoff_max_ms = 200;
    let hsm = Arc::new(Hsm::open(&config, Arc::new(NoMetrics)).unwrap());
    assert!(hsm.refresh_keys().await.unwrap().is_empty());

    let key = hsm.generate_key("p256-a", None).await.unwrap();
    assert_eq!(key.public_point.len(), 65);
    assert!(
        hsm.generate_key("p256-a", None).await.is_err(),
        "duplicate label"
    );
    hsm.generate_key("p256-b", Some(vec![0xb])).await.unwrap();
    let names: Vec<_> = hsm
        .refresh_keys()
        .await
        .unwrap()
        .iter()
        .map(|k| k.name.clone())
        .collect();
    assert_eq!(names, ["p256-a", "p256-b"]);
    // Signing keys only: SoftHSM's defaults would also allow decrypt,
    // unwrap and derive on the private half, encrypt and wrap on the
    // public.
    if let Some(text) = pkcs11_tool(&["--login", "--pin", PIN, "-O"]) {
        let usages: Vec<&str> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Usage:"))
            .map(str::trim)
            .collect();
        assert!(
            usages.contains(&"sign")
                && usages.contains(&"verify")
                && usages.iter().all(|u| ["sign", "verify"].contains(u)),
            "{text}"
        );
    }

    // Data objects (svsd's audit anchor) on an HSM we did not write:
    // replaced, never duplicated, and private (not seen without login).
    assert!(hsm.read_data("anchor").await.unwrap().is_empty());
    hsm.replace_data("anchor", b"one".to_vec()).await.unwrap();
    hsm.replace_data("anchor", b"two".to_vec()).await.unwrap();
    assert_eq!(hsm.read_data("anchor").await.unwrap(), [b"two".to_vec()]);
    if let Some(text) = pkcs11_tool(&["-O", "--type", "data"]) {
        assert!(
            !text.contains("anchor"),
            "private, yet listed without login:\n{text}"
        );
    }

    // Sign; verify in software and with OpenSSL.
    let msg = b"hello from svs over softhsm".repeat(3);
    let der = hsm
        .sign("p256-a", None, &msg, SignatureEncoding::Der)
        .await
        .unwrap();
    hsm.verify("p256-a", None, &msg, &der).unwrap();
    assert!(hsm.verify("p256-b", None, &msg, &der).is_err());
    let pem = common::spki_to_pem(&key.spki_der, dir, "p256a");
    std::fs::write(dir.join("msg.bin"), &msg).unwrap();
    std::fs::write(dir.join("sig.der"), &der).unwrap();
    let out = common::openssl(&[
        "dgst",
        "-sha256",
        "-verify",
        pem.to_str().unwrap(),
        "-signature",
        dir.join("sig.der").to_str().unwrap(),
        dir.join("msg.bin").to_str().unwrap(),
    ]);
    assert!(out.contains("Verified OK"), "{out}");

    let raw = hsm
        .sign("p256-a", None, &msg, SignatureEncoding::Raw)
        .await
        .unwrap();
    assert_eq!(raw.len(), 64);
    hsm.verify("p256-a", None, &msg, &raw).unwrap();
    let digest = svs_hsm::signature::sha256(&msg);
    let by_digest = hsm
        .sign_digest("p256-a", &digest, SignatureEncoding::Der)
        .await
        .unwrap();
    hsm.verify("p256-a", None, &msg, &by_digest).unwrap();
    assert!(matches!(
        hsm.sign_digest("p256-a", &[0; 31], SignatureEncoding::Der)
            .await,
        Err(HsmError::InvalidInput(_))
    ));
    assert!(matches!(
        hsm.sign("nope", None, &msg, SignatureEncoding::Der).await,
        Err(HsmError::UnknownKey(_))
    ));

    // Many concurrent signers; every signature verifies.
    let mut tasks = Vec::new();
    for i in 0..64u32 {
        let hsm = hsm.clone();
        tasks.push(tokio::spawn(async move {
            let m = format!("message {i}").into_bytes();
            let s = hsm
                .sign(
                    if i % 2 == 0 { "p256-a" } else { "p256-b" },
                    None,
                    &m,
                    SignatureEncoding::Der,
                )
                .await?;
            Ok::<_, HsmError>((i, m, s))
        }));
    }
    for t in tasks {
        let (i, m, s) = t.await.unwrap().unwrap();
        hsm.verify(if i % 2 == 0 { "p256-a" } else { "p256-b" }, None, &m, &s)
            .unwrap();
    }

    // Certificates: a CA and a leaf for p256-a, made by OpenSSL.
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
        "/CN=SVS Test CA",
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
        "/CN=p256-a",
        "-CA",
        ca_pem.to_str().unwrap(),
        "-CAkey",
        ca_key.to_str().unwrap(),
        "-days",
        "2",
        "-out",
        leaf_pem.to_str().unwrap(),
    ]);
    let to_der = |pem: &Path| {
        let der = pem.with_extension("der");
        common::openssl(&[
            "x509",
            "-in",
            pem.to_str().unwrap(),
            "-outform",
            "DER",
            "-out",
            der.to_str().unwrap(),
        ]);
        std::fs::read(der).unwrap()
    };
    let (ca_der, leaf_der) = (to_der(&ca_pem), to_der(&leaf_pem));
    assert!(
        hsm.import_certificate(Some("p256-b"), "wrong", &leaf_der)
            .await
            .is_err(),
        "key mismatch"
    );
    hsm.import_certificate(Some("p256-a"), "p256-a", &leaf_der)
        .await
        .unwrap();
    hsm.import_certificate(None, "svs-test-ca", &ca_der)
        .await
        .unwrap();
    let a = hsm.key("p256-a").unwrap();
    assert_eq!(a.certificate_chain, vec![leaf_der, ca_der]);

    // Recovery 1: the login is dropped under the pool (another session logs out).
    let pkcs11 = load_module(&ModuleSource::Path(MODULE.into())).unwrap();
    let slot = hsm.token().slot();
    let other = pkcs11.open_ro_session(slot).unwrap();
    other.logout().unwrap();
    drop(other);
    let s = hsm
        .sign("p256-a", None, &msg, SignatureEncoding::Der)
        .await
        .unwrap();
    hsm.verify("p256-a", None, &msg, &s).unwrap();

    // Recovery 2: every session of the application is closed under the pool
    // (C_Finalize + C_Initialize from a second handle on the same module).
    pkcs11.clone().finalize().unwrap();
    pkcs11
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let mut ok = 0;
    let mut failed = 0;
    for i in 0..20 {
        let m = format!("after reset {i}").into_bytes();
        match hsm.sign("p256-a", None, &m, SignatureEncoding::Der).await {
            Ok(s) => {
                hsm.verify("p256-a", None, &m, &s)
                    .expect("a returned signature always verifies");
                ok += 1;
            }
            Err(e) => {
                println!("during recovery: {e}");
                failed += 1;
            }
        }
    }
    assert!(ok >= 18 && failed <= 2, "ok {ok} failed {failed}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let h = hsm.health();
    assert_eq!(h.sessions_open, 2, "{h:?}");
    assert!(h.last_success.is_some());

    // Recovery 3: the module is finalised and nobody initialises it again:
    // the pool does (CKR_CRYPTOKI_NOT_INITIALIZED on reopen).
    pkcs11.clone().finalize().unwrap();
    let mut ok = 0;
    for i in 0..10 {
        let m = format!("after finalize {i}").into_bytes();
        match hsm.sign("p256-a", None, &m, SignatureEncoding::Der).await {
            Ok(s) => {
                hsm.verify("p256-a", None, &m, &s)
                    .expect("a returned signature always verifies");
                ok += 1;
            }
            Err(e) => println!("after finalize: {e}"),
        }
    }
    assert_eq!(
        ok, 10,
        "retried once after the module was initialised again"
    );

    // The login was lost with the sessions; a second Login from here must
    // not confuse the pool.
    let s2 = pkcs11.open_ro_session(slot).unwrap();
    let _ = s2.login(UserType::User, Some(&AuthPin::from(PIN)));
    drop(s2);
    let s = hsm
        .sign("p256-b", None, &msg, SignatureEncoding::Raw)
        .await
        .unwrap();
    hsm.verify("p256-b", None, &msg, &s).unwrap();
}
