//! SM2 sign/verify throughput on ONE thread: through PKCS#11 (cryptoki loading
//! the built libsvs_softtoken.so, a token key) versus the `sm2` crate called
//! directly in-process. Prints ops/s (median of 3 runs of >= 3 s each) and the
//! PKCS#11 overhead. Not a timed test: it only prints.
//!
//! `cargo bench -p svs-softtoken --bench throughput`; SVS_BENCH_SECS shortens
//! the runs for a smoke check.
#![allow(clippy::print_stdout, reason = "a benchmark's output is its report")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::vendor_defined::VendorDefinedMechanism;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::Attribute;
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use sm2::dsa::signature::hazmat::{PrehashSigner, PrehashVerifier};
use sm2::dsa::signature::{Signer, Verifier};
use sm3::{Digest, Sm3};

const CKM_SM2_KEY_PAIR_GEN: u64 = 0x8000_8001;
const CKM_SM3_SM2_Z_DER: u64 = 0x8000_8103;
const CKM_SM2_SIGN: u64 = 0x8000_8104;
const DIST_ID: &str = "1234567812345678";
const RUNS: usize = 3;

fn mech(m: u64) -> Mechanism<'static> {
    let t = MechanismType::new_vendor_defined(m).expect("vendor mechanism");
    Mechanism::VendorDefined(VendorDefinedMechanism::new::<()>(t, None))
}

fn module_path() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // The module cargo built for this run sits beside the bench executable
    // in deps/; the copy one level up is not always refreshed.
    let dir = exe.parent().expect("target/<profile>/deps/<bench>");
    dir.join("libsvs_softtoken.so")
}

/// Ops per second of `op`, median of RUNS runs of at least `secs` each.
fn measure(secs: f64, mut op: impl FnMut()) -> f64 {
    // Warm-up.
    for _ in 0..50 {
        op();
    }
    let mut rates: Vec<f64> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            let min = Duration::from_secs_f64(secs);
            let mut n = 0u64;
            while start.elapsed() < min {
                for _ in 0..32 {
                    op();
                }
                n += 32;
            }
            n as f64 / start.elapsed().as_secs_f64()
        })
        .collect();
    rates.sort_by(|a, b| a.total_cmp(b));
    rates[RUNS / 2]
}

fn main() {
    if std::env::var_os("SVS_BENCH_CHILD").is_none() {
        // The module reads SVS_SOFTTOKEN_CONF at C_Initialize: run in a child
        // process that has it, with a throw-away store.
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("softtoken.toml");
        std::fs::write(
            &conf,
            format!(
                "store_dir = {:?}\nslots = 1\nkdf_iterations = 1000\n",
                dir.path().join("store")
            ),
        )
        .expect("write config");
        let status = Command::new(std::env::current_exe().expect("exe"))
            .env("SVS_BENCH_CHILD", "1")
            .env("SVS_SOFTTOKEN_CONF", &conf)
            .status()
            .expect("spawn benchmark child");
        assert!(status.success(), "benchmark child failed: {status}");
        return;
    }
    let secs: f64 = std::env::var("SVS_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);

    // Token set-up: a token key pair, one R/W session, user logged in.
    let p = Pkcs11::new(module_path()).expect("load libsvs_softtoken.so");
    p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize");
    let slot = p.get_all_slots().expect("slots")[0];
    p.init_token(slot, &AuthPin::new("bench-so-pin".into()), "bench")
        .expect("C_InitToken");
    let s = p.open_rw_session(slot).expect("session");
    s.login(UserType::So, Some(&AuthPin::new("bench-so-pin".into())))
        .expect("SO login");
    s.init_pin(&AuthPin::new("bench-user-pin".into()))
        .expect("InitPIN");
    s.logout().expect("logout");
    s.login(UserType::User, Some(&AuthPin::new("bench-user-pin".into())))
        .expect("user login");
    let (pubk, privk) = s
        .generate_key_pair(
            &mech(CKM_SM2_KEY_PAIR_GEN),
            &[Attribute::Token(true), Attribute::Verify(true)],
            &[
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Sign(true),
            ],
        )
        .expect("C_GenerateKeyPair");

    // In-process key.
    let seed: [u8; 32] = Sm3::digest(b"svs bench key").into();
    let sk = sm2::dsa::SigningKey::from_slice(DIST_ID, &seed).expect("signing key");
    let vk = sk.verifying_key().clone();

    let msg = [0x5Au8; 64];
    let e: [u8; 32] = Sm3::digest(msg).into(); // any 32 bytes will do as a ready e
    let tok_sig_e = s.sign(&mech(CKM_SM2_SIGN), privk, &e).expect("sign e");
    let tok_sig_m = s
        .sign(&mech(CKM_SM3_SM2_Z_DER), privk, &msg)
        .expect("sign msg");
    let dir_sig_e: sm2::dsa::Signature = sk.sign_prehash(&e).expect("sign_prehash");
    let dir_sig_m: sm2::dsa::Signature = sk.sign(&msg);

    println!("SM2 single-thread throughput, median of {RUNS} runs of >= {secs} s");
    println!(
        "{:<44} {:>12} {:>12} {:>10}",
        "operation", "PKCS#11/s", "in-proc/s", "overhead"
    );
    let row = |name: &str, tok: f64, dir: f64| {
        println!(
            "{name:<44} {tok:>12.0} {dir:>12.0} {:>9.1}%",
            (dir / tok - 1.0) * 100.0
        );
    };

    let tok = measure(secs, || {
        std::hint::black_box(s.sign(&mech(CKM_SM2_SIGN), privk, &e).expect("sign"));
    });
    let dir = measure(secs, || {
        let sig: sm2::dsa::Signature = sk.sign_prehash(&e).expect("sign");
        std::hint::black_box(sig.to_der());
    });
    row("sign ready e (0x80008104 / sign_prehash)", tok, dir);

    let tok = measure(secs, || {
        std::hint::black_box(s.sign(&mech(CKM_SM3_SM2_Z_DER), privk, &msg).expect("sign"));
    });
    let dir = measure(secs, || {
        let sig: sm2::dsa::Signature = sk.sign(&msg);
        std::hint::black_box(sig.to_der());
    });
    row("sign 64-byte msg (0x80008103 / Signer)", tok, dir);

    let tok = measure(secs, || {
        s.verify(&mech(CKM_SM2_SIGN), pubk, &e, &tok_sig_e)
            .expect("verify");
    });
    let dir = measure(secs, || {
        vk.verify_prehash(&e, &dir_sig_e).expect("verify");
    });
    row("verify ready e (0x80008104 / verify_prehash)", tok, dir);

    let tok = measure(secs, || {
        s.verify(&mech(CKM_SM3_SM2_Z_DER), pubk, &msg, &tok_sig_m)
            .expect("verify");
    });
    let dir = measure(secs, || {
        vk.verify(&msg, &dir_sig_m).expect("verify");
    });
    row("verify 64-byte msg (0x80008103 / Verifier)", tok, dir);
    println!("overhead = in-process ops/s / PKCS#11 ops/s - 1 (target <= 10%)");
}
