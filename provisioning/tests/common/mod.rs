//! Running the real `svs-provision` binary and the OpenSSL CLI from tests.

#![allow(clippy::unwrap_used, dead_code)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// What a run of the binary produced.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.stdout, self.stderr))
    }
    #[track_caller]
    pub fn ok(self) -> Run {
        assert_eq!(
            self.code, 0,
            "stdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }
    #[track_caller]
    pub fn fails(self, code: i32, needle: &str) -> Run {
        assert_eq!(
            self.code, code,
            "stdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        assert!(
            self.stderr.contains(needle),
            "expected {needle:?} in stderr: {}",
            self.stderr
        );
        // Errors are sentences, never Rust debug dumps.
        assert!(!self.stderr.contains("Error {"), "{}", self.stderr);
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
        self
    }
}

/// Runs svs-provision with `args`, extra environment, and `stdin` piped in.
pub fn prov(args: &[&str], env: &[(&str, &str)], stdin: &str) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_svs-provision"));
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    // A command that needs no input may exit before reading it: a broken
    // pipe then says nothing about the command.
    if let Err(e) = child.stdin.take().unwrap().write_all(stdin.as_bytes()) {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs a command in `dir`; panics with its output on failure.
#[track_caller]
pub fn sh(dir: &Path, program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

pub const DISTID: &str = "distid:1234567812345678";

/// An SM2 CA made with the OpenSSL CLI (SM3 signatures, default ID).
pub fn sm2_ca(dir: &Path) {
    sh(
        dir,
        "openssl",
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:SM2",
            "-out",
            "ca.key",
        ],
    );
    sh(
        dir,
        "openssl",
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-sm3",
            "-sigopt",
            DISTID,
            "-subj",
            "/CN=Unit SM2 CA/O=Test Unit/C=CN",
            "-days",
            "30",
            "-out",
            "ca.pem",
        ],
    );
}

/// The CA issues a certificate for `req` valid for `days` (negative: expired).
pub fn sm2_issue(dir: &Path, req: &str, out: &str, days: &str) {
    sh(
        dir,
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            req,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-sm3",
            "-sigopt",
            DISTID,
            "-vfyopt",
            DISTID,
            "-days",
            days,
            "-copy_extensions",
            "copy",
            "-set_serial",
            "0x0a0b0c",
            "-out",
            out,
        ],
    );
}

/// The token's state as `key list --json` shows it (to prove "unchanged").
pub fn key_state(base: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
    let mut args = base.to_vec();
    args.extend(["--json", "key", "list"]);
    prov(&args, env, "").ok().json()
}
