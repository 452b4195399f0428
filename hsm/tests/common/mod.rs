//! Helpers shared by the integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::print_stdout)]

use std::path::Path;
use std::process::Command;

/// Whether a test body should run here: in the child process that the
/// parent test spawned with the right environment.
pub fn in_child() -> bool {
    std::env::var_os("SVS_HSM_TEST_CHILD").is_some()
}

/// True when `tool` runs; otherwise fails under CI and prints SKIP elsewhere.
pub fn have_tool(tool: &str, probe_arg: &str) -> bool {
    let ok = Command::new(tool).arg(probe_arg).output().is_ok();
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("{tool} is required under CI (apt-get install -y softhsm2 openssl)");
        }
        println!("SKIP: {tool} not installed");
    }
    ok
}

/// Re-runs test `name` of this test binary in a child process with `envs`,
/// so that module-wide state (environment read at C_Initialize, faults,
/// token removal) is private to it.
pub fn run_child(name: &str, envs: &[(&str, &std::ffi::OsStr)]) {
    let exe = std::env::current_exe().expect("test executable");
    let out = Command::new(exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env("SVS_HSM_TEST_CHILD", "1")
        .envs(envs.iter().map(|(k, v)| (*k, *v)))
        .output()
        .expect("spawn child test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("--- child {name} stdout ---\n{stdout}\n--- stderr ---\n{stderr}");
    assert!(out.status.success(), "child test {name} failed");
    assert!(stdout.contains("1 passed"), "child test {name} did not run");
}

/// Runs openssl; panics with its output on failure.
pub fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "openssl {args:?} failed: {text}");
    text
}

/// Writes a DER SPKI as PEM via openssl.
pub fn spki_to_pem(spki_der: &[u8], dir: &Path, name: &str) -> std::path::PathBuf {
    let der = dir.join(format!("{name}.der"));
    let pem = dir.join(format!("{name}.pem"));
    std::fs::write(&der, spki_der).unwrap();
    openssl(&[
        "pkey",
        "-pubin",
        "-inform",
        "DER",
        "-in",
        der.to_str().unwrap(),
        "-out",
        pem.to_str().unwrap(),
    ]);
    pem
}
