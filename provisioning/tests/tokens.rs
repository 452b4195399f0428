//! Token, PIN and key lifecycle on the soft token (configured through
//! SVS_SOFTTOKEN_CONF, PINs piped on standard input as a script would), and
//! the enrollment steps on SoftHSMv2 with the ecdsa-p256 profile.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{Run, key_state, prov, sh};

/// A soft-token configuration in `dir` (a store there, a fast KDF, and
/// `settings`); its path, for `SVS_SOFTTOKEN_CONF`.
fn soft_token_conf(dir: &Path, settings: &str) -> String {
    let conf = dir.join("softtoken.toml");
    std::fs::write(
        &conf,
        format!(
            "store_dir = \"{}\"\nkdf_iterations = 1000\n{settings}",
            dir.join("store").display()
        ),
    )
    .unwrap();
    conf.to_str().unwrap().to_owned()
}

#[test]
fn token_pin_and_key_lifecycle_on_the_soft_token() {
    let tmp = tempfile::tempdir().unwrap();
    let conf = soft_token_conf(tmp.path(), "slots = 2\nmax_login_failures = 3\n");
    let env = [("SVS_SOFTTOKEN_CONF", conf.as_str())];
    let p = |args: &[&str], stdin: &str| prov(args, &env, stdin);

    let info = p(&["--json", "token", "info"], "").ok().json();
    assert_eq!(info["tokens"].as_array().unwrap().len(), 2);
    assert_eq!(info["tokens"][0]["initialized"], false);
    p(&["token", "init", "--label", "t1"], "so-pin-0001\n").ok();
    p(&["token", "init", "--label", "t1"], "so-pin-0002\n")
        .fails(4, "a token labelled 't1' exists already");
    p(&["token", "init", "--label", "t2", "--slot", "0"], "x\n").fails(4, "--reinit");
    p(&["token", "init", "--label", "t2"], "123\n").fails(2, "must be 4 to");
    // PKCS#11 pads labels with spaces: "t1 " would read back as "t1".
    p(&["token", "init", "--label", "t1 "], "so-pin-0002\n").fails(2, "end in a space");
    p(&["--token", "t1", "key", "list", "--login"], "anything\n").fails(3, "pin init");

    // The SO sets the user PIN; a wrong SO PIN changes nothing.
    p(
        &["--token", "t1", "pin", "init"],
        "wrong-so\nuser-pin-0001\n",
    )
    .fails(5, "SO PIN is wrong");
    p(
        &["--token", "t1", "pin", "init"],
        "so-pin-0001\nuser-pin-0001\n",
    )
    .ok();
    let gen_out = p(
        &["--token", "t1", "--json", "key", "generate", "--label", "a"],
        "user-pin-0001\n",
    )
    .ok()
    .json();
    assert_eq!(gen_out["private_key_present"], true);
    p(
        &["--token", "t1", "key", "generate", "--label", "bad label"],
        "",
    )
    .fails(2, "invalid key label");

    // The user changes the PIN; the old one no longer works; a too-short
    // new PIN is refused before the token is asked.
    p(
        &["--token", "t1", "pin", "change"],
        "user-pin-0001\nuser-pin-0002\n",
    )
    .ok();
    p(
        &["--token", "t1", "key", "list", "--login"],
        "user-pin-0001\n",
    )
    .fails(5, "user PIN is wrong");
    p(&["--token", "t1", "pin", "change"], "user-pin-0002\n12\n").fails(2, "4 to");
    p(
        &["--token", "t1", "key", "list", "--login"],
        "user-pin-0002\n",
    )
    .ok();

    // A PIN outside the token's length limits cannot be right: refused
    // without a login attempt (three would lock the PIN otherwise).
    let long = format!("{}\n", "7".repeat(300));
    for _ in 0..4 {
        p(&["--token", "t1", "key", "list", "--login"], &long).fails(2, "was not tried");
    }
    p(
        &["--token", "t1", "key", "list", "--login"],
        "user-pin-0002\n",
    )
    .ok();
    // A request's input and output file are checked before the PIN is
    // read: the wrong PIN after them is never tried.
    let csr = ["--token", "t1", "csr", "--label", "a", "--subject", "CN=a"];
    let nodir = tmp.path().join("nodir").join("a.csr");
    for (extra, code, says) in [
        (
            &["--key-usage", "digitalsignature"][..],
            2,
            "case-sensitive: digitalSignature",
        ),
        (&["--san", "a.example"], 2, "no type prefix"),
        (
            &["-o", nodir.to_str().unwrap()],
            3,
            "its directory does not exist",
        ),
        (&["-o", tmp.path().to_str().unwrap()], 2, "is a directory"),
    ] {
        let args: Vec<&str> = csr.iter().chain(extra).copied().collect();
        p(&args, "nope-0\n").fails(code, says);
    }
    // A PIN file of two lines is refused untried.
    let pin_file = tmp.path().join("pin");
    let pin_path = pin_file.to_str().unwrap();
    let login = [
        "--pin-file",
        pin_path,
        "--token",
        "t1",
        "key",
        "list",
        "--login",
    ];
    std::fs::write(&pin_file, "user-pin-0002\nuser-pin-0002\n").unwrap();
    std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    p(&login, "").fails(2, "holds more than one line");
    let tried = || {
        p(&["--token", "t1", "--json", "token", "info"], "")
            .ok()
            .json()["tokens"][0]["user_pin_count_low"]
            .as_bool()
            .unwrap()
    };
    assert!(!tried(), "a login attempt was used up");
    p(&["--token", "t1", "key", "list", "--login"], "nope-0\n").fails(5, "wrong");
    assert!(tried(), "the token shows a wrong PIN");
    // A PIN file others can read works, with a warning.
    std::fs::write(&pin_file, "user-pin-0002\n").unwrap();
    let quiet = p(&login, "").ok();
    assert!(!quiet.stderr.contains("warning"), "{}", quiet.stderr);
    std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o640)).unwrap();
    let warned = p(&login, "").ok();
    assert!(
        warned.stderr.contains(&format!(
            "PIN file {pin_path} can be read by its group; make it private with `chmod 600 {pin_path}`"
        )),
        "{}",
        warned.stderr
    );
    // Output that cannot be written is a failure, not a success.
    let full = std::process::Command::new(env!("CARGO_BIN_EXE_svs-provision"))
        .args(["--token", "t1", "--json", "token", "info"])
        .env("SVS_SOFTTOKEN_CONF", &conf)
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .output()
        .unwrap();
    assert_eq!(full.status.code(), Some(12), "{full:?}");
    assert!(String::from_utf8_lossy(&full.stderr).contains("cannot write the output"));
    // Usage errors come as JSON too when JSON is asked for.
    let usage = p(&["--json", "key", "generate"], "");
    assert_eq!(usage.code, 2);
    assert_eq!(usage.json()["error"]["kind"], "usage", "{usage:?}");
    assert!(
        usage.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--label")
    );

    // Wrong PINs lock the user PIN; the SO clears the lock with pin init.
    // The officer hears when one try is left, and when a PIN just locked.
    p(&["--token", "t1", "key", "list", "--login"], "nope-1\n").fails(5, "wrong");
    p(&["--token", "t1", "key", "list", "--login"], "nope-2\n").fails(
        5,
        "user PIN is wrong, and one try is left before the PIN locks",
    );
    p(&["--token", "t1", "key", "list", "--login"], "nope-3\n")
        .fails(6, "that was the last try: the user PIN is now locked");
    p(
        &["--token", "t1", "key", "list", "--login"],
        "user-pin-0002\n",
    )
    .fails(6, "locked");
    let info = p(&["--token", "t1", "--json", "token", "info"], "")
        .ok()
        .json();
    assert_eq!(info["tokens"][0]["user_pin_locked"], true);
    let before = key_state(&["--token", "t1"], &env);
    p(
        &["--token", "t1", "pin", "init"],
        "so-pin-0001\nuser-pin-0003\n",
    )
    .ok();
    assert_eq!(
        key_state(&["--token", "t1"], &env),
        before,
        "pin init must not touch keys"
    );

    // Delete needs confirmation: without a terminal and without --yes, nothing happens.
    p(
        &["--token", "t1", "key", "delete", "--label", "a"],
        "user-pin-0003\n",
    )
    .fails(13, "--yes");
    assert_eq!(key_state(&["--token", "t1"], &env), before);
    p(
        &[
            "--token", "t1", "key", "delete", "--label", "nosuch", "--yes",
        ],
        "user-pin-0003\n",
    )
    .fails(3, "keys present: 'a'");
    p(
        &["--token", "t1", "key", "delete", "--label", "a", "--yes"],
        "user-pin-0003\n",
    )
    .ok();
    assert!(
        key_state(&["--token", "t1"], &env)["keys"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    // The SO changes the SO PIN.
    p(
        &["--token", "t1", "pin", "change", "--so"],
        "so-pin-0001\nso-pin-0002\n",
    )
    .ok();
    p(
        &["--token", "t1", "pin", "init"],
        "so-pin-0001\nuser-pin-0004\n",
    )
    .fails(5, "SO PIN is wrong");
    p(
        &["--token", "t1", "pin", "init"],
        "so-pin-0001\nuser-pin-0004\n",
    )
    .fails(5, "SO PIN is wrong, and one try is left");
    p(
        &["--token", "t1", "pin", "init"],
        "so-pin-0002\nuser-pin-0004\n",
    )
    .ok();
    // Re-initialising wipes keys, so it needs --reinit and a confirmation.
    p(
        &["--token", "t1", "key", "generate", "--label", "b"],
        "user-pin-0004\n",
    )
    .ok();
    p(
        &["token", "init", "--label", "t1", "--slot", "0", "--reinit"],
        "so-pin-0002\n",
    )
    .fails(13, "--yes");
    // Without --slot, --reinit means the token that holds the label.
    p(
        &["token", "init", "--label", "t1", "--reinit"],
        "so-pin-0002\n",
    )
    .fails(13, "--yes");
    // Another slot may still not take a label that a token holds.
    p(
        &["token", "init", "--label", "t1", "--slot", "1", "--reinit"],
        "so-pin-0002\n",
    )
    .fails(4, "--slot 0 --reinit");
    assert_eq!(
        key_state(&["--token", "t1"], &env)["keys"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    p(
        &["token", "init", "--label", "t1", "--reinit", "--yes"],
        "wrong-so\n",
    )
    .fails(5, "SO PIN is wrong");
    p(
        &["token", "init", "--label", "t1", "--reinit", "--yes"],
        "so-pin-0002\n",
    )
    .ok();
    let info = p(&["--json", "token", "info"], "").ok().json();
    assert_eq!(info["tokens"][0]["label"], "t1");
    assert_eq!(info["tokens"][0]["user_pin_initialized"], false);
    assert_eq!(info["tokens"][1]["initialized"], false);
}

#[test]
fn a_missing_file_or_directory_is_named_with_the_option_that_gave_it() {
    prov(&["-c", "/nonexistent/svsd.toml", "token", "info"], &[], "")
        .fails(3, "no such file: /nonexistent/svsd.toml");
    let missing = "/nonexistent/audit";
    for args in [
        &["audit", "verify", "--dir", missing, "--skip-signatures"][..],
        &["audit", "show", "--dir", missing],
    ] {
        prov(args, &[], "").fails(
            3,
            "audit directory /nonexistent/audit does not exist (--dir)",
        );
    }
}

#[test]
fn audit_show_takes_only_record_types_that_exist() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    for typo in ["sig", "Op", "checkpoints"] {
        prov(&["audit", "show", "--dir", dir, "--type", typo], &[], "").fails(
            2,
            "possible values: op, start, stop, reload, selftest, anomaly, refusals_suppressed, checkpoint",
        );
    }
    prov(&["audit", "show", "--dir", dir, "--type", "op"], &[], "").ok();
}

const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";

#[test]
fn enrollment_steps_on_softhsm_with_ecdsa_p256() {
    if !Path::new(SOFTHSM).exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "softhsm2 is required under CI"
        );
        eprintln!("SKIP: {SOFTHSM} not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    std::fs::create_dir(work.join("tokens")).unwrap();
    std::fs::write(
        work.join("softhsm2.conf"),
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            work.join("tokens").display()
        ),
    )
    .unwrap();
    std::fs::write(work.join("so"), "so-pin-0001\n").unwrap();
    std::fs::write(work.join("user"), "user-pin-0001\n").unwrap();
    std::fs::write(work.join("wrong"), "wrong-pin\n").unwrap();
    let conf = work.join("softhsm2.conf").to_str().unwrap().to_owned();
    let env = [("SOFTHSM2_CONF", conf.as_str())];
    let f = |n: &str| work.join(n).to_str().unwrap().to_owned();
    let (so, user, wrong) = (f("so"), f("user"), f("wrong"));
    let common = [
        "--module",
        SOFTHSM,
        "--profile",
        "ecdsa-p256",
        "--token",
        "svs-hsm",
    ];
    let p = |extra: &[&str]| {
        let mut a: Vec<&str> = common.to_vec();
        a.extend_from_slice(extra);
        prov(&a, &env, "")
    };

    // Suggested commands repeat the module (and token, profile) given:
    // without them they would act on the built-in soft token.
    let made = prov(
        &[
            "--module",
            SOFTHSM,
            "--so-pin-file",
            &so,
            "token",
            "init",
            "--label",
            "svs-hsm",
        ],
        &env,
        "",
    )
    .ok();
    assert!(
        made.stdout.contains(&format!(
            "`svs-provision --module {SOFTHSM} --token svs-hsm pin init`"
        )),
        "{}",
        made.stdout
    );
    p(&["--so-pin-file", &so, "--new-pin-file", &user, "pin", "init"]).ok();
    let key = p(&[
        "--pin-file",
        &user,
        "--json",
        "key",
        "generate",
        "--label",
        "p256",
    ])
    .ok()
    .json();
    assert_eq!(key["algorithm"], "ECDSA-P256");
    p(&["--pin-file", &wrong, "key", "generate", "--label", "x"]).fails(5, "user PIN is wrong");
    p(&["--pin-file", &user, "key", "generate", "--label", "p256"]).fails(
        4,
        &format!(
            "`svs-provision --module {SOFTHSM} --token svs-hsm --profile ecdsa-p256 key delete --label p256`"
        ),
    );

    p(&[
        "--pin-file",
        &user,
        "csr",
        "--label",
        "p256",
        "--subject",
        "CN=p256,O=Test Unit,C=CN",
        "--out",
        &f("req.pem"),
    ])
    .ok();
    let text = sh(
        work,
        "openssl",
        &["req", "-in", "req.pem", "-verify", "-noout", "-text"],
    );
    assert!(text.contains("ecdsa-with-SHA256"), "{text}");
    sh(
        work,
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-sha256",
            "-subj",
            "/CN=P-256 CA",
            "-days",
            "30",
            "-out",
            "ca.pem",
        ],
    );
    sh(
        work,
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            "req.pem",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-sha256",
            "-days",
            "30",
            "-set_serial",
            "7",
            "-out",
            "cert.pem",
        ],
    );
    sh(
        work,
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            "req.pem",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-sha256",
            "-days",
            "-1",
            "-set_serial",
            "8",
            "-out",
            "expired.pem",
        ],
    );

    let before = key_state(&common, &env);
    p(&[
        "--pin-file",
        &user,
        "cert",
        "import",
        "--label",
        "p256",
        "--file",
        &f("ca.pem"),
    ])
    .fails(7, "is for another key");
    p(&[
        "--pin-file",
        &user,
        "cert",
        "import",
        "--label",
        "p256",
        "--file",
        &f("expired.pem"),
    ])
    .fails(7, "expired");
    assert_eq!(key_state(&common, &env), before);
    p(&[
        "--pin-file",
        &user,
        "cert",
        "import",
        "--label",
        "p256",
        "--file",
        &f("expired.pem"),
        "--force",
    ])
    .ok();
    p(&[
        "--pin-file",
        &user,
        "cert",
        "import",
        "--label",
        "p256",
        "--file",
        &f("cert.pem"),
        "--chain",
        &f("ca.pem"),
    ])
    .fails(4, "--replace");
    p(&[
        "--pin-file",
        &user,
        "cert",
        "import",
        "--label",
        "p256",
        "--file",
        &f("cert.pem"),
        "--chain",
        &f("ca.pem"),
        "--replace",
    ])
    .ok();
    let listed = key_state(&common, &env);
    assert_eq!(
        listed["keys"][0]["certificate"]["subject"],
        "CN=p256,O=Test Unit,C=CN"
    );
    let fingerprint = sh(
        work,
        "openssl",
        &[
            "x509",
            "-in",
            "cert.pem",
            "-noout",
            "-fingerprint",
            "-sha256",
        ],
    );
    assert!(
        fingerprint
            .to_lowercase()
            .replace(':', "")
            .contains(listed["keys"][0]["certificate"]["sha256"].as_str().unwrap()),
        "{fingerprint} {listed}"
    );

    let st = p(&["--pin-file", &user, "selftest"]).ok();
    assert!(
        st.stdout.contains("PASS  key 'p256' pairwise sign/verify"),
        "{}",
        st.stdout
    );
    p(&[
        "--pin-file",
        &user,
        "key",
        "delete",
        "--label",
        "p256",
        "--yes",
    ])
    .ok();
    assert!(
        key_state(&common, &env)["keys"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    // PKCS#11 has no "create unless the label is taken": officers (or a
    // script run twice) generating one label at once must still end with
    // one key under it, the others told it exists. SoftHSMv2 does not
    // refuse duplicate labels itself, unlike svs-softtoken.
    for round in 0..3 {
        let label = format!("race-{round}");
        let runs: Vec<Run> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..6)
                .map(|_| {
                    s.spawn(|| p(&["--pin-file", &user, "key", "generate", "--label", &label]))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let made = runs.iter().filter(|r| r.code == 0).count();
        assert_eq!(made, 1, "{runs:#?}");
        for r in runs.into_iter().filter(|r| r.code != 0) {
            r.fails(4, "exists already");
        }
        let keys = key_state(&common, &env);
        let named = keys["keys"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| k["label"] == label.as_str())
            .count();
        assert_eq!(named, 1, "{keys}");
    }

    // A second key under a label, made by another tool: svs-provision
    // names both ids and deletes the one given.
    let out = std::process::Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", &conf)
        .args(["--module", SOFTHSM, "--token-label", "svs-hsm", "--login"])
        .args(["--pin", "user-pin-0001", "--keypairgen", "--key-type"])
        .args(["EC:prime256v1", "--label", "race-0", "--id", "0badc0de"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let delete_race0 = |id: Option<&str>| {
        let mut args = vec![
            "--pin-file",
            &user,
            "key",
            "delete",
            "--label",
            "race-0",
            "--yes",
        ];
        if let Some(id) = id {
            args.extend(["--id", id]);
        }
        p(&args)
    };
    let r = delete_race0(None).fails(2, "several keys");
    assert!(r.stderr.contains("0badc0de"), "{}", r.stderr);
    assert!(r.stderr.contains("--id ID"), "{}", r.stderr);
    delete_race0(Some("0BADC0DE")).ok();
    delete_race0(Some("0badc0de")).fails(3, "with id 0badc0de");
    let keys = key_state(&common, &env);
    let left: Vec<&serde_json::Value> = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["label"] == "race-0")
        .collect();
    assert_eq!(left.len(), 1, "{keys}");
    assert_ne!(left[0]["id"], "0badc0de", "{keys}");
}

/// Whether process `pid` waits for a file lock, as /proc/locks tells (a
/// waiter's line has `->`).
fn waits_for_a_lock(pid: u32) -> bool {
    let pid = pid.to_string();
    std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .any(|l| l.contains("->") && l.split_whitespace().any(|f| f == pid))
}

/// Waits up to `secs` for `child` to end; kills it and panics otherwise.
fn ends_within(child: &mut std::process::Child, secs: u64, what: &str) -> Run {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {secs}s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut stdout = String::new();
    let mut stderr = String::new();
    use std::io::Read;
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    Run {
        code: child.wait().unwrap().code().unwrap_or(-1),
        stdout,
        stderr,
    }
}

#[test]
fn a_confirmation_that_cannot_be_asked_is_refused_at_once_and_scripted_runs_wait_their_turn() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let tmp = tempfile::tempdir().unwrap();
    let conf = soft_token_conf(tmp.path(), "slots = 1\n");
    let env = [("SVS_SOFTTOKEN_CONF", conf.as_str())];
    let p = |args: &[&str], stdin: &str| prov(args, &env, stdin);
    p(&["token", "init", "--label", "t"], "so-pin-0001\n").ok();
    p(&["pin", "init"], "so-pin-0001\nuser-pin-0001\n").ok();
    p(&["key", "generate", "--label", "a"], "user-pin-0001\n").ok();
    let spawn = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_svs-provision"))
            .args(args)
            .env("SVS_SOFTTOKEN_CONF", &conf)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };

    // Another run holds the lock (this test, standing in for an officer's
    // run that is changing a token).
    let held = svs_provision::token::lock_changes().unwrap();

    // A confirmation that cannot be asked is refused at once, not after
    // the lock: it was asked before the lock is taken.
    let mut delete = spawn(&["key", "delete", "--label", "a"]);
    // Refused before it reads its PIN, it may be gone already: a broken
    // pipe then says nothing about the command.
    if let Err(e) = delete.stdin.take().unwrap().write_all(b"user-pin-0001\n") {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    ends_within(&mut delete, 60, "key delete without a terminal")
        .fails(13, "cannot ask for confirmation");

    // A scripted run (its PIN on standard input, no prompt) waits for the
    // lock before it opens the module, and goes on once it is free. (On a
    // terminal the prompt gives the lock up: `token::released_while`.)
    let mut generate = spawn(&["--json", "key", "generate", "--label", "b"]);
    let mut stdin = generate.stdin.take().unwrap();
    stdin.write_all(b"user-pin-0001\n").unwrap();
    drop(stdin);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !waits_for_a_lock(generate.id()) {
        assert!(
            generate.try_wait().unwrap().is_none(),
            "key generate did not wait for the lock"
        );
        assert!(
            std::time::Instant::now() < until,
            "never waited for the lock"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    drop(held);
    let out = ends_within(&mut generate, 60, "key generate").ok().json();
    assert_eq!(out["label"], "b");
}
