//! SM2 sign/verify throughput on ONE thread: through PKCS#11 (cryptoki loading
//! the built libsvs_softtoken.so, a token key) versus the `sm2` crate called
//! directly in-process. Prints ops/s (median of 3 runs of >= 3 s each) and the
//! PKCS#11 overhead. Not a timed test: it only prints.
//!
//! `sm2::dsa::SigningKey::sign_prehash` derives k by RFC 6979 (HMAC-SM3) and
//! inverts (1 + d) per signature; the token draws k from the OS and keeps
//! (1 + d)^-1. So signing also gets a second in-process baseline with the
//! token's algorithm (GB/T 32918.2 A3-A7, k from getrandom): the gap to that
//! one is the PKCS#11 layer's own cost.
//!
//! `cargo bench -p svs-softtoken --bench throughput`; SVS_BENCH_SECS shortens
//! the runs for a smoke check.
#![allow(clippy::print_stdout, reason = "a benchmark's output is its report")]

use std::path::PathBuf;
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
use sm2::elliptic_curve::PrimeField;
use sm2::elliptic_curve::group::Group as _;
use sm2::elliptic_curve::ops::Reduce;
use sm2::elliptic_curve::point::AffineCoordinates;
use sm2::{FieldBytes, ProjectivePoint, Scalar};
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

/// SM2 signature of a ready e, GB/T 32918.2 A3-A7, k from the OS CSPRNG,
/// `dinv` = (1 + d)^-1 precomputed: the token's algorithm, in-process.
fn sign_e_same_algorithm(d: &Scalar, dinv: &Scalar, e: &[u8; 32]) -> sm2::dsa::Signature {
    let e = <Scalar as Reduce<FieldBytes>>::reduce(&FieldBytes::from(*e));
    loop {
        let mut kb = [0u8; 32];
        getrandom::fill(&mut kb).expect("getrandom");
        let Some(k) = Option::<Scalar>::from(Scalar::from_repr(FieldBytes::from(kb))) else {
            continue;
        };
        if bool::from(k.is_zero()) {
            continue;
        }
        let x1 = ProjectivePoint::mul_by_generator(&k).to_affine().x();
        let r = e + <Scalar as Reduce<FieldBytes>>::reduce(&x1);
        if bool::from(r.is_zero() | (r + k).is_zero()) {
            continue;
        }
        let s = *dinv * (k - r * *d);
        if let Ok(sig) = sm2::dsa::Signature::from_scalars(r, s) {
            return sig;
        }
    }
}

/// Ops per second of each of `ops`: RUNS runs, in each of which every op runs
/// for at least `secs` in total, in interleaved 100 ms slices (so that the
/// load of a shared machine hits all of them alike); the median run per op.
fn measure(secs: f64, ops: &mut [&mut dyn FnMut()]) -> Vec<f64> {
    for op in ops.iter_mut() {
        for _ in 0..50 {
            op();
        }
    }
    let slice = Duration::from_millis(100);
    let mut rates = vec![Vec::new(); ops.len()];
    for _ in 0..RUNS {
        let mut counts = vec![0u64; ops.len()];
        let mut times = vec![Duration::ZERO; ops.len()];
        while times.iter().any(|t| t.as_secs_f64() < secs) {
            for (i, op) in ops.iter_mut().enumerate() {
                let start = Instant::now();
                while start.elapsed() < slice {
                    for _ in 0..8 {
                        op();
                    }
                    counts[i] += 8;
                }
                times[i] += start.elapsed();
            }
        }
        for (i, r) in rates.iter_mut().enumerate() {
            r.push(counts[i] as f64 / times[i].as_secs_f64());
        }
    }
    rates
        .into_iter()
        .map(|mut r| {
            r.sort_by(|a, b| a.total_cmp(b));
            r[RUNS / 2]
        })
        .collect()
}

/// ENTL ‖ ID ‖ a ‖ b ‖ xG ‖ yG ‖ xA ‖ yA, whose SM3 is Z (default ID).
fn sm2_z_prefix(point: &[u8]) -> Vec<u8> {
    const CURVE: &str = "FFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFC\
                         28E9FA9E9D9F5E344D5A9E4BCF6509A7F39789F515AB8F92DDBCBD414D940E93\
                         32C4AE2C1F1981195F9904466A39C9948FE30BBFF2660BE1715A4589334C74C7\
                         BC3736A2F4F6779C59BDCEE36B692153D0A9877CC62A474002DF32E52139F0A0";
    let mut v = vec![0x00, 0x80];
    v.extend_from_slice(DIST_ID.as_bytes());
    v.extend(
        (0..CURVE.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&CURVE[i..i + 2], 16).expect("hex")),
    );
    v.extend_from_slice(&point[1..]);
    v
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
    let d: Scalar = *sk.as_nonzero_scalar().as_ref();
    let dinv: Scalar = Option::from((d + Scalar::ONE).invert()).expect("(1 + d) invertible");
    let check = sign_e_same_algorithm(&d, &dinv, &[7u8; 32]);
    vk.verify_prehash(&[7u8; 32], &check)
        .expect("same-algorithm baseline makes valid signatures");

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
        "{:<44} {:>11} {:>11} {:>9} {:>11} {:>9}",
        "operation", "PKCS#11/s", "sm2 crate/s", "overhead", "same-alg/s", "overhead"
    );
    let row = |name: &str, tok: f64, dir: f64, same: Option<f64>| {
        let same = same
            .map(|x| format!("{x:>11.0} {:>8.1}%", (x / tok - 1.0) * 100.0))
            .unwrap_or_default();
        println!(
            "{name:<44} {tok:>11.0} {dir:>11.0} {:>8.1}% {same}",
            (dir / tok - 1.0) * 100.0
        );
    };

    let r = measure(
        secs,
        &mut [
            &mut || {
                std::hint::black_box(s.sign(&mech(CKM_SM2_SIGN), privk, &e).expect("sign"));
            },
            &mut || {
                let sig: sm2::dsa::Signature = sk.sign_prehash(&e).expect("sign");
                std::hint::black_box(sig.to_der());
            },
            &mut || {
                let sig = sign_e_same_algorithm(&d, &dinv, &e);
                std::hint::black_box(sig.to_der());
            },
        ],
    );
    row(
        "sign ready e (0x80008104 / sign_prehash)",
        r[0],
        r[1],
        Some(r[2]),
    );

    let z = {
        // Z is fixed per key; the token may cache it, so the baseline does too.
        let mut h = Sm3::new();
        h.update(sm2_z_prefix(vk.to_sec1_bytes().as_ref()));
        h.finalize()
    };
    let e_of = |m: &[u8]| -> [u8; 32] {
        let mut h = Sm3::new();
        h.update(z);
        h.update(m);
        h.finalize().into()
    };
    vk.verify(&msg, &sign_e_same_algorithm(&d, &dinv, &e_of(&msg)))
        .expect("baseline Z is right");
    let r = measure(
        secs,
        &mut [
            &mut || {
                let sig = s.sign(&mech(CKM_SM3_SM2_Z_DER), privk, &msg).expect("sign");
                std::hint::black_box(sig);
            },
            &mut || {
                let sig: sm2::dsa::Signature = sk.sign(&msg);
                std::hint::black_box(sig.to_der());
            },
            &mut || {
                let sig = sign_e_same_algorithm(&d, &dinv, &e_of(&msg));
                std::hint::black_box(sig.to_der());
            },
        ],
    );
    row(
        "sign 64-byte msg (0x80008103 / Signer)",
        r[0],
        r[1],
        Some(r[2]),
    );

    let r = measure(
        secs,
        &mut [
            &mut || {
                s.verify(&mech(CKM_SM2_SIGN), pubk, &e, &tok_sig_e)
                    .expect("verify");
            },
            &mut || {
                vk.verify_prehash(&e, &dir_sig_e).expect("verify");
            },
        ],
    );
    row(
        "verify ready e (0x80008104 / verify_prehash)",
        r[0],
        r[1],
        None,
    );

    let r = measure(
        secs,
        &mut [
            &mut || {
                s.verify(&mech(CKM_SM3_SM2_Z_DER), pubk, &msg, &tok_sig_m)
                    .expect("verify");
            },
            &mut || {
                vk.verify(&msg, &dir_sig_m).expect("verify");
            },
        ],
    );
    row(
        "verify 64-byte msg (0x80008103 / Verifier)",
        r[0],
        r[1],
        None,
    );
    println!("overhead = in-process ops/s / PKCS#11 ops/s - 1 (target <= 10%);");
    println!("same-alg = the token's signing algorithm run in-process (k from getrandom).");
}
