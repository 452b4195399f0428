//! Throughput of SM2 signing through the session pool on the embedded soft
//! token, against the same token called directly and the `sm2` crate signing
//! in-process, at 1 and 2 threads; and software verification against
//! `openssl speed sm2`. Prints ratios measured side by side in one run.
//!
//! `cargo bench -p svs-hsm --bench pool_throughput` (SVS_BENCH_SECONDS to
//! change the 3 s per measurement; SVS_BENCH_ONLY=direct1|pool1 to run one
//! configuration alone, for a profiler).

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use sm2::dsa::signature::Signer;
use svs_hsm::keys::KeyInfo;
use svs_hsm::token::load_module;
use svs_hsm::{Hsm, HsmConfig, ModuleSource, NoMetrics, PinSource, SignatureEncoding};

const MSG: [u8; 64] = [0x5a; 64];

fn seconds() -> Duration {
    let s = std::env::var("SVS_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    Duration::from_secs_f64(s)
}

/// Runs `work` on `threads` threads for the measurement time; ops/s.
fn threaded(threads: usize, work: impl Fn(usize) + Sync) -> f64 {
    let stop = AtomicBool::new(false);
    let count = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let (stop, count, work) = (&stop, &count, &work);
            s.spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    work(t);
                    n += 1;
                }
                count.fetch_add(n, Ordering::Relaxed);
            });
        }
        std::thread::sleep(seconds());
        stop.store(true, Ordering::Relaxed);
    });
    count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// Signs through the pool with `in_flight` concurrent requests from one
/// async thread; ops/s.
fn through_pool(hsm: Arc<Hsm>, in_flight: usize) -> f64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let until = Instant::now() + seconds();
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..in_flight {
            let hsm = hsm.clone();
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < until {
                    hsm.sign("bench", None, &MSG, SignatureEncoding::Der)
                        .await
                        .unwrap();
                    n += 1;
                }
                n
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        total as f64 / start.elapsed().as_secs_f64()
    })
}

fn open_hsm(dir: &std::path::Path, workers: usize, verify_after_sign: bool) -> Arc<Hsm> {
    let mut c = HsmConfig {
        module: ModuleSource::Embedded,
        token_label: Some("bench".into()),
        pin: Some(PinSource::File(dir.join("pin"))),
        verify_after_sign,
        ..HsmConfig::default()
    };
    c.pool.size = workers;
    let hsm = Arc::new(Hsm::open(&c, Arc::new(NoMetrics)).unwrap());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(hsm.refresh_keys()).unwrap();
    hsm
}

fn openssl_sm2_verify_per_s() -> Option<(f64, f64)> {
    let out = std::process::Command::new("openssl")
        .args(["speed", "-seconds", "3", "sm2"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().rev().find(|l| l.contains("SM2"))?;
    let nums: Vec<f64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    // "... 256 bits SM2 (CurveSM2) 0.0003s 0.0003s 3065.0 3480.0"
    let n = nums.len();
    (n >= 2).then(|| (nums[n - 2], nums[n - 1]))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("store")).unwrap();
    let conf = dir.path().join("softtoken.toml");
    std::fs::write(
        &conf,
        format!(
            "store_dir = \"{}\"\nslots = 1\nkdf_iterations = 1000\n",
            dir.path().join("store").display()
        ),
    )
    .unwrap();
    std::fs::write(dir.path().join("pin"), "bench-pin").unwrap();
    svs_softtoken::set_config_path(Some(conf));
    let pkcs11 = load_module(&ModuleSource::Embedded).unwrap();
    let slot = pkcs11.get_all_slots().unwrap()[0];
    pkcs11
        .init_token(slot, &AuthPin::from("bench-so"), "bench")
        .unwrap();
    {
        let s = pkcs11.open_rw_session(slot).unwrap();
        s.login(UserType::So, Some(&AuthPin::from("bench-so")))
            .unwrap();
        s.init_pin(&AuthPin::from("bench-pin")).unwrap();
        s.logout().unwrap();
    }
    let hsm = open_hsm(dir.path(), 1, false);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let key: Arc<KeyInfo> = rt.block_on(hsm.generate_key("bench", None)).unwrap();
    let profile = hsm.profile().clone();

    // The token called directly: one session per thread, e on the host.
    let direct = |threads: usize| {
        let sessions: Vec<_> = (0..threads)
            .map(|_| {
                let s = pkcs11.open_rw_session(slot).unwrap();
                let _ = s.login(UserType::User, Some(&AuthPin::from("bench-pin")));
                std::sync::Mutex::new(s)
            })
            .collect();
        let handle = {
            let s = sessions[0].lock().unwrap();
            s.find_objects(&[
                cryptoki::object::Attribute::Class(cryptoki::object::ObjectClass::PRIVATE_KEY),
                cryptoki::object::Attribute::Id(key.id.clone()),
            ])
            .unwrap()[0]
        };
        let mech = profile.sign_digest_mechanism;
        threaded(threads, |i| {
            let e = hsm.digest_for(&key, None, &MSG).unwrap();
            let s = sessions[i].lock().unwrap();
            s.sign(&svs_hsm::keys::mechanism(mech).unwrap(), handle, &e)
                .unwrap();
        })
    };

    // The sm2 crate in-process: key object reused, Z precomputed, e per message.
    let sk = sm2::SecretKey::from_slice(&[0x42; 32]).unwrap();
    let signer = sm2::dsa::SigningKey::new("1234567812345678", &sk).unwrap();
    let crate_sign = |threads: usize| {
        threaded(threads, |_| {
            let _: sm2::dsa::Signature = signer.sign(&MSG);
        })
    };

    // For profiling one configuration alone (e.g. under `perf record`).
    match std::env::var("SVS_BENCH_ONLY").as_deref() {
        Ok("direct1") => return println!("direct, 1 thread: {:.0} ops/s", direct(1)),
        Ok("pool1") => return println!("pool, 1 worker: {:.0} ops/s", through_pool(hsm, 16)),
        _ => {}
    }
    let hsm2 = open_hsm(dir.path(), 2, false);
    let hsm1v = open_hsm(dir.path(), 1, true);
    let hsm2v = open_hsm(dir.path(), 2, true);

    // Interleaved rounds, median of each: the machine is shared and noisy,
    // so only ratios measured side by side mean anything.
    const ROUNDS: usize = 3;
    let mut r: [Vec<f64>; 8] = Default::default();
    for _ in 0..ROUNDS {
        r[0].push(crate_sign(1));
        r[1].push(direct(1));
        r[2].push(through_pool(hsm.clone(), 16));
        r[3].push(through_pool(hsm1v.clone(), 16));
        r[4].push(crate_sign(2));
        r[5].push(direct(2));
        r[6].push(through_pool(hsm2.clone(), 32));
        r[7].push(through_pool(hsm2v.clone(), 32));
    }
    let m: Vec<f64> = r
        .iter_mut()
        .map(|v| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        })
        .collect();
    println!(
        "SM2 sign, 64-byte message, median of {ROUNDS} interleaved runs of {:?}",
        seconds()
    );
    println!("{:<44} {:>10} {:>10}", "", "1 thread", "2 threads");
    let row = |name: &str, a: f64, b: f64| println!("{name:<44} {a:>10.0} {b:>10.0}");
    row("sm2 crate in-process (ops/s)", m[0], m[4]);
    row("soft token via cryptoki, no pool (ops/s)", m[1], m[5]);
    row("soft token through the pool (ops/s)", m[2], m[6]);
    row("  … with verify-after-sign (ops/s)", m[3], m[7]);
    println!(
        "{:<44} {:>9.1}% {:>9.1}%",
        "pool overhead vs token direct (target ≤ 10%)",
        100.0 * (1.0 - m[2] / m[1]),
        100.0 * (1.0 - m[6] / m[5])
    );
    println!(
        "{:<44} {:>10.2} {:>10.2}",
        "pool / sm2 crate",
        m[2] / m[0],
        m[6] / m[4]
    );

    // Software verification with a cached key and cached Z.
    let verifier = hsm2v.verifier();
    let sig = rt
        .block_on(hsm2v.sign("bench", None, &MSG, SignatureEncoding::Der))
        .unwrap();
    let point = key.public_point.clone();
    let ver = threaded(1, |_| {
        verifier
            .verify_message(
                svs_hsm::Algorithm::Sm2,
                &point,
                b"1234567812345678",
                &MSG,
                &sig,
            )
            .unwrap();
    });
    println!();
    println!("SM2 software verify, 1 thread: {ver:.0} ops/s");
    match openssl_sm2_verify_per_s() {
        Some((sign, verify)) => println!(
            "openssl speed sm2: sign {sign:.0}/s verify {verify:.0}/s; svs-hsm verify / openssl verify = {:.2}",
            ver / verify
        ),
        None => println!("openssl speed sm2: not available"),
    }
}
