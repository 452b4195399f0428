//! svs-provision: the tool with which a using unit's security officers set
//! up SVS (token, PINs, keys, certificate requests, certificates, entities)
//! and with which auditors check the audit trail. The binary is a thin
//! wrapper around [`cli::run`].
//!
//! Rules kept throughout: PINs never come from the command line (files,
//! a prompt without echo, or standard input) and live in `Zeroizing`
//! buffers only; a refused request changes nothing (all checks before the
//! first write; the entities file is replaced atomically); every failure is
//! a sentence for a person and a distinct exit code (see
//! [`error::ProvisionError::exit_code`]).

#![forbid(unsafe_code)]

pub mod audit;
pub mod cert;
pub mod cli;
pub mod csr;
pub mod entities;
pub mod error;
pub mod keys;
pub mod pin;
pub mod replace;
pub mod selftest;
pub mod token;

pub use error::{ProvisionError, Result};

/// What a command produced: text for people, JSON for scripts (`--json`).
#[derive(Debug, Clone)]
pub struct Report {
    /// Human-readable, ends with a newline.
    pub text: String,
    /// Machine-readable.
    pub json: serde_json::Value,
}

/// A progress note for a person watching (stderr, only on a terminal, so
/// scripts and `--json` consumers never see it).
pub fn progress(message: &str) {
    if pin::stderr_is_tty() {
        eprintln!("{message}");
    }
}
