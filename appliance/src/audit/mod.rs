//! The audit trail: JSON lines, one record per operation, hash-chained,
//! made durable by a writer thread that commits many records per fsync
//! before any of their answers may leave.
//!
//! Record layout (one line each; `prev` is the previous record's `hash`):
//!
//! ```text
//! {"seq":7,"time":"…","type":"op","entity":"app1","op":"sign","key":"demo",
//!  "input_sm3":"…","output_sm3":"…","outcome":"ok","latency_us":812,"prev":"…","hash":"…"}
//! ```
//!
//! `hash` = SM3 of the line's bytes up to (not including) `,"hash":`, with `}`
//! appended: i.e. of the record serialised without its own hash. So a record
//! is checked on its own (tampering shows at the record itself) and against
//! its predecessor (`prev`), and `seq` shows deletions and reordering.
//!
//! Files are `audit-<first seq, 20 digits>.jsonl` in one directory; a new
//! file is started once the current one reaches the configured size, and
//! the chain continues across files.
//!
//! With `preallocate` (the default) the file being written is zero-filled
//! to its rotation size when it is started, and records overwrite the
//! zeros: an fdatasync then flushes data blocks only, because neither the
//! file's size nor its block map changes (on ext4 an appending fdatasync
//! also commits the journal). The zeros after the last record are not part
//! of the trail: a file is cut to its records when it is retired or svsd
//! stops, and every reader goes through [`read_trail_file`].
//!
//! The parts: `record` (the line format and its hash), `files` (naming,
//! the directory lock, the live file and its spare), `writer` (group
//! commit), `recover` (start-up after a crash) and `verify`.

use sm3::{Digest, Sm3};

/// SM3 of `data`.
pub fn sm3(data: &[u8]) -> [u8; 32] {
    Sm3::digest(data).into()
}

/// One operation, as a handler reports it. Holds digests, never inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// Entity name.
    pub entity: String,
    /// `sign`, `verify`, …
    pub op: &'static str,
    /// Exposed key name, when one was named.
    pub key: Option<String>,
    /// SM3 of the input (the data, or the caller's digest).
    pub input_sm3: Option<[u8; 32]>,
    /// SM3 of the output (the signature handed out).
    pub output_sm3: Option<[u8; 32]>,
    /// `ok`, `valid`, `invalid`, or the error code.
    pub outcome: String,
    /// Time spent, in microseconds.
    pub latency_us: u64,
}

/// What the writer appends.
#[derive(Debug, Clone)]
enum Entry {
    Op(AuditEvent),
    Checkpoint {
        text: Checkpoint,
        key: String,
        signature: Vec<u8>,
    },
    Note {
        kind: &'static str,
        detail: String,
    },
}

mod files;
mod record;
mod recover;
mod verify;
mod writer;

#[cfg(test)]
mod tests;

pub(crate) use files::without_zero_tail;
pub use files::{read_trail_file, trail_files};
pub use record::{ChainHead, Checkpoint, anchor_head, checkpoint_message_v1, rfc3339};
pub(crate) use recover::recover;
pub(crate) use verify::newest_shape;
pub use verify::{
    BreakKind, CHECKPOINT_SLACK, ChainBreak, ChainReport, CheckpointKey, VerifyOptions, verify_dir,
    verify_dir_with,
};
pub use writer::{AuditStats, AuditTrail};
