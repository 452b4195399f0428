#![no_main]
//! An audit trail file as `audit verify` and svsd's start-up read it, and
//! the audit anchor's values as read from the token.
use libfuzzer_sys::fuzz_target;

// In memory where there is a tmpfs: start-up recovery syncs what it cuts.
static DIR: std::sync::LazyLock<tempfile::TempDir> = std::sync::LazyLock::new(|| {
    tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("a temporary directory")
});

fuzz_target!(|data: &[u8]| {
    svs_appliance::fuzzing::audit_trail(DIR.path(), data);
});
