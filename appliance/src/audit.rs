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

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender};
use serde::{Deserialize, Serialize};
use sm3::{Digest, Sm3};
use tokio::sync::oneshot;

use crate::config::AuditConfig;
use crate::error::SvsError;
use svs_hsm::keys::hex;

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

/// A record without its hash: what is serialised and hashed. Fields borrow
/// when a record is written (no allocation per record on the commit path)
/// and own when one is read back.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body<'a> {
    seq: u64,
    time: Cow<'a, str>,
    #[serde(rename = "type")]
    kind: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    entity: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    op: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    input_sm3: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    output_sm3: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    outcome: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    latency_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    head_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    head: Option<Cow<'a, str>>,
    // Present on v2 checkpoints only: see [`Checkpoint`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signed_at: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    interval_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signature: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    detail: Option<Cow<'a, str>>,
    prev: Cow<'a, str>,
}

const HASH_SUFFIX_LEN: usize = r#","hash":""}"#.len() + 64;
const GENESIS: [u8; 32] = [0; 32];

/// What a checkpoint signs (format v2): the chain head, and the time and
/// interval that `audit verify` measures coverage with. A record's own
/// `time` is not signed by anything: anyone able to rewrite the files can
/// recompute the chain with other times, so the signing time must be inside
/// the signature for a checkpoint to say how old the records after it are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Seq of the record signed (the chain head when svsd read it).
    pub head_seq: u64,
    /// That record's hash.
    pub head: [u8; 32],
    /// svsd's clock when it read the head, in the trail's time format.
    pub signed_at: String,
    /// svsd's checkpoint interval: the next checkpoint is due this long
    /// after this one.
    pub interval_s: u64,
}

impl Checkpoint {
    /// The head `head_seq`/`head`, signed now by an svsd that checkpoints
    /// every `interval`. Never before `not_before`, the time of the records
    /// it covers: while the clock is behind them (stepped back), records
    /// keep their last time, and a checkpoint signed with the clock's would
    /// make an honest trail's records look younger-than-signed by the step,
    /// an `Unsigned` break in `audit verify`. The text order of the format
    /// is its time order.
    pub fn now(head_seq: u64, head: [u8; 32], interval: Duration, not_before: &str) -> Checkpoint {
        let now = rfc3339(SystemTime::now());
        Checkpoint {
            head_seq,
            head,
            signed_at: if now.as_str() < not_before {
                not_before.to_owned()
            } else {
                now
            },
            interval_s: interval.as_secs(),
        }
    }

    /// The signed text: domain-separated lines, so it can be rebuilt from
    /// the record's fields and checked with any SM2 tool (docs/svsd.md).
    pub fn message(&self) -> Vec<u8> {
        format!(
            "SVS audit checkpoint v2\nseq={}\nhead={}\ntime={}\ninterval_s={}\n",
            self.head_seq,
            hex(&self.head),
            self.signed_at,
            self.interval_s
        )
        .into_bytes()
    }

    /// Reads back a [`Checkpoint::message`]: the value of the audit anchor.
    pub fn parse_message(bytes: &[u8]) -> Option<Checkpoint> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut lines = text
            .strip_prefix("SVS audit checkpoint v2\n")?
            .strip_suffix('\n')?
            .split('\n');
        let mut field = |name: &str| lines.next()?.strip_prefix(name)?.strip_prefix('=');
        let checkpoint = Checkpoint {
            head_seq: field("seq")?.parse().ok()?,
            head: unhex32(field("head")?.as_bytes())?,
            signed_at: field("time")?.to_owned(),
            interval_s: field("interval_s")?.parse().ok()?,
        };
        lines.next().is_none().then_some(checkpoint)
    }
}

/// The audit anchor: the text of the trail's last checkpoint (or of its
/// clean stop), kept on the token as a data object, so that a trail
/// deleted or rolled back while the token kept its state is found at start.
/// Of several values (a crash while it was replaced leaves two) the newest
/// counts. `Err` names a value that is not an anchor.
pub fn anchor_head(values: &[Vec<u8>]) -> Result<Option<Checkpoint>, String> {
    let mut newest: Option<Checkpoint> = None;
    for v in values {
        let c = Checkpoint::parse_message(v).ok_or_else(|| {
            format!(
                "a value of {} bytes that is not an audit checkpoint text",
                v.len()
            )
        })?;
        if newest.as_ref().is_none_or(|n| c.head_seq > n.head_seq) {
            newest = Some(c);
        }
    }
    Ok(newest)
}

/// The chain head a checkpoint signs: the last record's seq, hash and time.
pub type ChainHead = (u64, [u8; 32], String);

/// What a v1 checkpoint (written by svsd before format v2) signed: the head
/// only. Its record's `time` is unsigned, so it proves which records came
/// before it, never when.
pub fn checkpoint_message_v1(head_seq: u64, head: &[u8; 32]) -> Vec<u8> {
    format!(
        "SVS audit checkpoint v1\nseq={head_seq}\nhead={}\n",
        hex(head)
    )
    .into_bytes()
}

/// RFC 3339 UTC time with microseconds.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = d.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_micros()
    )
}

fn file_name(first_seq: u64) -> String {
    format!("audit-{first_seq:020}.jsonl")
}

fn file_seq(name: &str) -> Option<u64> {
    name.strip_prefix("audit-")?
        .strip_suffix(".jsonl")
        .filter(|s| s.len() == 20)?
        .parse()
        .ok()
}

/// A trail file's records as written so far: its bytes up to the first NUL
/// byte. No record holds a NUL; the file being written (when records are
/// preallocated) is zero-filled after its last record, and a reader copying
/// it while a group is written may see that group's later pages before its
/// earlier ones, i.e. zeros and then data: the data is not yet committed.
pub fn read_trail_file(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut bytes = std::fs::read(path)?;
    bytes.truncate(records_end(&bytes));
    Ok(bytes)
}

fn records_end(bytes: &[u8]) -> usize {
    bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len())
}

/// `bytes` without the zeros at its end.
pub(crate) fn without_zero_tail(bytes: &[u8]) -> &[u8] {
    &bytes[..bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1)]
}

/// The name of the lock file in the audit directory.
const LOCK_NAME: &str = ".svsd.lock";

/// One writer per trail: a second svsd started by hand beside the service
/// would chain its own records into the same files, and its start-up
/// recovery and exit would cut records the first has answered for.
fn lock_dir(dir: &Path) -> Result<File, SvsError> {
    let path = dir.join(LOCK_NAME);
    let io = |e: std::io::Error| SvsError::AuditUnavailable(format!("{}: {e}", path.display()));
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&path)
        .map_err(io)?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(SvsError::AuditUnavailable(format!(
            "{} is in use by another process (is svsd already running?)",
            dir.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
    }
}

/// The trail's files, oldest first.
pub fn trail_files(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(seq) = entry.file_name().to_str().and_then(file_seq) {
            files.push((seq, entry.path()));
        }
    }
    files.sort();
    Ok(files)
}

/// Lower-case hex of a 32-byte value into `buf`, without allocating.
fn hex32<'b>(bytes: &[u8; 32], buf: &'b mut [u8; 64]) -> &'b str {
    // 64 output bytes for 32 input bytes: the length always fits.
    base16ct::lower::encode_str(bytes, buf).unwrap_or_default()
}

/// Appends the record line for `entry` to `out` and returns its hash.
/// `time` is the group's commit time, rendered once per group.
fn render(
    seq: u64,
    prev: &[u8; 32],
    entry: &Entry,
    time: &str,
    out: &mut Vec<u8>,
) -> Result<[u8; 32], serde_json::Error> {
    let (mut prev_hex, mut in_hex, mut out_hex) = ([0u8; 64], [0u8; 64], [0u8; 64]);
    let mut body = Body {
        seq,
        time: time.into(),
        kind: "".into(),
        entity: None,
        op: None,
        key: None,
        input_sm3: None,
        output_sm3: None,
        outcome: None,
        latency_us: None,
        head_seq: None,
        head: None,
        signed_at: None,
        interval_s: None,
        signature: None,
        detail: None,
        prev: hex32(prev, &mut prev_hex).into(),
    };
    match entry {
        Entry::Op(e) => {
            body.kind = "op".into();
            body.entity = Some(e.entity.as_str().into());
            body.op = Some(e.op.into());
            body.key = e.key.as_deref().map(Cow::from);
            body.input_sm3 = e.input_sm3.as_ref().map(|d| hex32(d, &mut in_hex).into());
            body.output_sm3 = e.output_sm3.as_ref().map(|d| hex32(d, &mut out_hex).into());
            body.outcome = Some(e.outcome.as_str().into());
            body.latency_us = Some(e.latency_us);
        }
        Entry::Checkpoint {
            text,
            key,
            signature,
        } => {
            body.kind = "checkpoint".into();
            body.head_seq = Some(text.head_seq);
            body.head = Some(hex(&text.head).into());
            body.signed_at = Some(text.signed_at.as_str().into());
            body.interval_s = Some(text.interval_s);
            body.key = Some(key.as_str().into());
            body.signature = Some(hex(signature).into());
        }
        Entry::Note { kind, detail } => {
            body.kind = (*kind).into();
            body.detail = Some(detail.as_str().into());
        }
    }
    write_body(&body, out)
}

/// Appends `body` as a record line (with its hash) to `out`; returns the hash.
fn write_body(body: &Body, out: &mut Vec<u8>) -> Result<[u8; 32], serde_json::Error> {
    let start = out.len();
    // Serialising strings and integers into a Vec does not fail; were it
    // to, `out` is left as it was and the caller fails the whole group.
    if let Err(e) = serde_json::to_writer(&mut *out, body) {
        out.truncate(start);
        return Err(e);
    }
    let hash = sm3(&out[start..]);
    // The hash goes inside the object: replace its closing brace.
    out.pop();
    let mut hash_hex = [0u8; 64];
    out.extend_from_slice(b",\"hash\":\"");
    out.extend_from_slice(hex32(&hash, &mut hash_hex).as_bytes());
    out.extend_from_slice(b"\"}\n");
    Ok(hash)
}

/// Where the writer puts bytes; a trait so tests can make it fail.
trait Sink: Send {
    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()>;
    fn sync(&mut self) -> std::io::Result<()>;
    fn len(&self) -> u64;
    fn rotate(&mut self, first_seq: u64) -> std::io::Result<()>;
    /// Leaves the file holding its records only (the writer stops).
    fn finish(&mut self) -> std::io::Result<()>;
}

struct FileSink {
    dir: PathBuf,
    /// The name `file` was created or opened under.
    path: PathBuf,
    file: File,
    /// Bytes of records; the file may be longer (zero-filled).
    len: u64,
    /// Zero-fill each file to this size.
    preallocate: Option<u64>,
    /// The next file, being zero-filled in the background.
    spare: Option<Spare>,
    /// Held while this sink may write: see [`lock_dir`].
    _lock: File,
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A new trail file, never one that exists: a name already taken (a file
/// or a planted symbolic link) is refused, not overwritten or followed.
fn new_file(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
}

/// Whether `path` (not followed if a link) names the open `file`.
fn names_file(path: &Path, file: &File) -> bool {
    match (rustix::fs::lstat(path), rustix::fs::fstat(file)) {
        (Ok(named), Ok(open)) => named.st_dev == open.st_dev && named.st_ino == open.st_ino,
        _ => false,
    }
}

/// An existing trail file, not through a symbolic link.
fn open_existing(path: &Path, read: bool) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .read(read)
        .write(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    Ok(file)
}

/// Renames `from` to `to` unless `to` exists: a plain rename would replace
/// whatever holds the name (records, or a link planted there).
fn rename_new(from: &Path, to: &Path) -> std::io::Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        // A file system without RENAME_NOREPLACE: a hard link refuses an
        // existing name too.
        Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOSYS => {
            std::fs::hard_link(from, to)?;
            std::fs::remove_file(from)
        }
        Err(e) => Err(e.into()),
    }
}

/// Writes `size - from` zero bytes at `from`, `chunk` bytes at a time, each
/// chunk followed by `between()` (which may stop the fill with an error).
///
/// Real zeros, not fallocate: ext4 keeps fallocated space as unwritten
/// extents, and converting them is a journal commit again on the first
/// fdatasync after each write.
fn zero_fill(
    file: &File,
    from: u64,
    size: u64,
    chunk: usize,
    mut between: impl FnMut() -> std::io::Result<()>,
) -> std::io::Result<()> {
    let zeros = vec![0u8; chunk];
    let mut at = from;
    while at < size {
        let n = (size - at).min(zeros.len() as u64);
        file.write_all_at(&zeros[..n as usize], at)?;
        at += n;
        between()?;
    }
    Ok(())
}

/// The next trail file, zero-filled by a thread of its own while the current
/// one fills, so that rotation is a rename: filling 64 MiB in the writer
/// stalled every answer for 40 ms at each rotation (measured).
struct Spare {
    path: PathBuf,
    /// Dropped to stop the fill: wakes the thread from its pause at once.
    stop: Option<Sender<()>>,
    /// The filled file, kept open: rotation writes to the file this thread
    /// created, whatever is done to its name meanwhile.
    thread: JoinHandle<std::io::Result<File>>,
}

impl Spare {
    /// Hidden name: not a trail file until renamed.
    const NAME: &'static str = ".audit-spare.tmp";
    /// Bytes written and flushed per step of the fill.
    const CHUNK: u64 = 256 << 10;

    fn start(dir: &Path, size: u64) -> Option<Spare> {
        let path = dir.join(Self::NAME);
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let p = path.clone();
        let thread = std::thread::Builder::new()
            .name("svs-audit-spare".into())
            .spawn(move || {
                // A spare of an earlier run, or a link planted under the
                // name: the name goes (a link's target is not touched) and
                // the spare is a new file.
                match std::fs::remove_file(&p) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
                let file = new_file(&p)?;
                // Paced: 256 KiB and a flush every 20 ms (12.5 MiB/s; 64
                // MiB in about 5 s, while the fastest batch load measured
                // fills a file in 7 s). The group commits' p99 on the
                // benchmark VM did not move with this running all along;
                // at 1 MiB per 10 ms it went from 1.1-1.4 to 2.4-3.4 ms.
                // Pacing by the trail's write rate instead (slower fills
                // at lower rates) was tried and made the half-peak tail
                // worse, not better: a longer, thinner disturbance.
                let mut at = 0;
                let filled = zero_fill(&file, 0, size, Self::CHUNK as usize, || {
                    file.sync_data()?;
                    at += Self::CHUNK;
                    if at >= size {
                        return Ok(());
                    }
                    match stopped.recv_timeout(Duration::from_millis(20)) {
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) => Ok(()),
                        _ => Err(std::io::Error::other("stopped")),
                    }
                })
                .and_then(|()| file.sync_all());
                if filled.is_err() {
                    // At once, not at the next rotation: on a nearly full
                    // disk the trail needs this space now.
                    let _ = std::fs::remove_file(&p);
                }
                filled.map(|()| file)
            })
            .map_err(|e| tracing::warn!(error = %e, "audit: cannot start the spare file's thread"))
            .ok()?;
        Some(Spare {
            path,
            stop: Some(stop),
            thread,
        })
    }

    /// The zero-filled file, if it is ready; the caller renames it.
    fn take_ready(spare: &mut Option<Spare>) -> Option<(PathBuf, File)> {
        if !spare.as_ref()?.thread.is_finished() {
            return None;
        }
        let s = spare.take()?;
        match s.thread.join() {
            Ok(Ok(file)) => Some((s.path, file)),
            Ok(Err(e)) => {
                // Not left holding the disk space a plain file now needs.
                let _ = std::fs::remove_file(&s.path);
                tracing::warn!(error = %e, "audit: the spare file could not be zero-filled");
                None
            }
            Err(_) => None,
        }
    }

    fn discard(mut self) {
        drop(self.stop.take());
        let _ = self.thread.join();
        let _ = std::fs::remove_file(&self.path);
    }
}

impl FileSink {
    /// Opens the file that starts at `first_seq`, creating it or continuing
    /// it after its records (start-up recovery has cut off anything else),
    /// and starts zero-filling the next one.
    fn create(
        dir: &Path,
        first_seq: u64,
        preallocate: Option<u64>,
        lock: File,
    ) -> std::io::Result<FileSink> {
        let path = dir.join(file_name(first_seq));
        // Not append mode: records overwrite the zero-filled space. The
        // file exists when the chain goes on in it (recovery checked it).
        let file = match new_file(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => open_existing(&path, false)?,
            r => r?,
        };
        let len = file.metadata()?.len();
        if let Some(size) = preallocate.filter(|size| *size > len) {
            // Before the daemon is ready, so the writer may take the time.
            // Preallocation only makes commits cheaper: a disk too full for
            // it must not keep the trail (and signing) from starting.
            if let Err(e) =
                zero_fill(&file, len, size, 1 << 20, || Ok(())).and_then(|()| file.sync_all())
            {
                tracing::warn!(
                    file = %path.display(),
                    error = %e,
                    "audit: cannot zero-fill the trail file; writing it unfilled"
                );
                file.set_len(len)?;
                file.sync_all()?;
            }
        }
        // A spare of an earlier run (also one with preallocate = true).
        if preallocate.is_none() {
            match std::fs::remove_file(dir.join(Spare::NAME)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        sync_dir(dir)?;
        Ok(FileSink {
            dir: dir.to_path_buf(),
            path,
            file,
            len,
            preallocate,
            spare: preallocate.and_then(|size| Spare::start(dir, size)),
            _lock: lock,
        })
    }

    /// Whether records written to `file` are in the trail. A file removed
    /// while open (`rm -rf` of the directory, `mv` to another file system)
    /// stays writable and its fdatasync succeeds, so without this signing
    /// would go on with records no one can ever read. A rename (or a hard
    /// link and an unlink) keeps a link, so the name is checked too, at
    /// every commit: checked less often, a file renamed away just before a
    /// rotation was retired unnoticed with its acknowledged records. One
    /// fstat and one lstat per group commit, about 2 µs against the
    /// commit's 0.8 ms fdatasync.
    fn still_in_trail(&mut self) -> std::io::Result<()> {
        let open = rustix::fs::fstat(&self.file)?;
        if open.st_nlink == 0 {
            return Err(std::io::Error::other(format!(
                "{} was deleted while being written: records after it are in no trail",
                self.path.display()
            )));
        }
        match rustix::fs::lstat(&self.path) {
            Ok(named) if named.st_dev == open.st_dev && named.st_ino == open.st_ino => Ok(()),
            Ok(_) => Err(std::io::Error::other(format!(
                "{} no longer names the file being written (moved away or replaced): records after it are in no trail",
                self.path.display()
            ))),
            Err(e) => Err(std::io::Error::other(format!(
                "{}: {e}: the file being written was moved away: records after it are in no trail",
                self.path.display()
            ))),
        }
    }

    /// Cuts the file to its records (drops the zero-filled space), durably.
    fn finish_file(&mut self) -> std::io::Result<()> {
        if self.file.metadata()?.len() != self.len {
            self.file.set_len(self.len)?;
            self.file.sync_all()?;
        }
        Ok(())
    }
}

impl Sink for FileSink {
    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self.file.write_all_at(bytes, self.len) {
            // The spare's zeros are only there to make commits cheaper:
            // the records get the space first. Written again whole, at the
            // same place, over whatever part of it got in.
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => {
                let Some(spare) = self.spare.take() else {
                    return Err(e);
                };
                spare.discard();
                tracing::warn!("audit: disk full; the spare file is deleted to make room");
                self.file.write_all_at(bytes, self.len)?;
            }
            r => r?,
        }
        self.len += bytes.len() as u64;
        Ok(())
    }
    fn sync(&mut self) -> std::io::Result<()> {
        self.file.sync_data()?;
        self.still_in_trail()
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn rotate(&mut self, first_seq: u64) -> std::io::Result<()> {
        // The retired file is cut to its records, durably, before the next
        // one exists: only the newest file can ever hold zero-filled space.
        self.finish_file()?;
        let path = self.dir.join(file_name(first_seq));
        // Not ready (rotations faster than a fill): a plain file, appended
        // to, rather than a stall; the next rotation gets a spare again.
        // Either way the name must be free: whatever holds it was not made
        // by this writer and is refused rather than overwritten.
        let file = match Spare::take_ready(&mut self.spare) {
            Some((spare, file)) if names_file(&spare, &file) => {
                rename_new(&spare, &path).map(|()| file)
            }
            Some((spare, _)) => {
                // Swapped under svsd (a link, another file): renaming it
                // would put what someone else made into the trail.
                tracing::error!(
                    spare = %spare.display(),
                    "ALARM audit: the spare file was replaced by something svsd did not make; left alone, a new file is used"
                );
                new_file(&path)
            }
            None => new_file(&path),
        }
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        sync_dir(&self.dir)?;
        self.file = file;
        self.path = path;
        self.len = 0;
        if self.spare.is_none() {
            self.spare = self
                .preallocate
                .and_then(|size| Spare::start(&self.dir, size));
        }
        Ok(())
    }
    fn finish(&mut self) -> std::io::Result<()> {
        if let Some(spare) = self.spare.take() {
            spare.discard();
        }
        self.finish_file()
    }
}

/// Reads where the chain stands (last seq and hash) after cutting off what
/// a crash left at the end of the newest file.
///
/// A crash during a group commit leaves that group's bytes partly
/// unwritten: a torn last line, zero-filled sectors, even complete lines of
/// the same group after them (the file system may persist later blocks
/// before earlier ones). None of it was acknowledged: answers wait for the
/// fsync. So the newest file is checked from its start and, when the
/// damage from the first invalid record on has that shape (see
/// [`unwritten_remnant`]), cut there; otherwise the next records would
/// chain onto the damage and leave a permanent break that looks like
/// tampering. The cut bytes are kept beside the trail (`….jsonl.cut-<unix
/// time>`, not part of it) rather than destroyed.
///
/// Damage a crash cannot cause (an altered or garbled complete line, a NUL
/// that is not whole unwritten sectors, records of several commits or of an
/// earlier one after the damage, a complete record out of sequence) is not
/// cut: it stays in place as evidence for `audit verify`, and the chain
/// goes on after it.
///
/// A trail file that is a symbolic link (or anything but a regular file) is
/// refused before anything is touched: it is not svsd's, and writing or
/// cutting it would change whatever it points to.
pub(crate) fn recover(dir: &Path) -> Result<(u64, [u8; 32], Option<u64>), SvsError> {
    let io = |e: std::io::Error| SvsError::AuditUnavailable(format!("{}: {e}", dir.display()));
    let files = trail_files(dir).map_err(io)?;
    for (_, path) in &files {
        let kind = std::fs::symlink_metadata(path).map_err(io)?.file_type();
        if !kind.is_file() {
            return Err(SvsError::AuditUnavailable(format!(
                "{} is {}, not a regular file: svsd writes only files it created itself; nothing was changed (put the real file in its place)",
                path.display(),
                if kind.is_symlink() {
                    "a symbolic link"
                } else {
                    "not a file"
                }
            )));
        }
    }
    let mut empty_newest = None;
    for (n, (first_seq, path)) in files.iter().rev().enumerate() {
        let mut f = open_existing(path, true).map_err(io)?;
        let mut raw = Vec::new();
        f.read_to_end(&mut raw).map_err(io)?;
        let on_disk = raw.len() as u64;
        // All of it, not only up to the first NUL: what follows a hole may
        // be crash debris to keep aside, or evidence to leave in place.
        let bytes = without_zero_tail(&raw);
        let last_newline = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        // Older files were complete and fsync'd before the next one began:
        // a line cut short there is no crash's doing.
        let keep = if n > 0 {
            if last_newline != bytes.len() {
                tracing::error!(
                    file = %path.display(),
                    "ALARM audit: a trail file before the newest ends in an incomplete line, which no crash leaves (each file is complete before the next begins); left in place for `svs-provision audit verify`"
                );
            }
            bytes.len()
        } else {
            match crash_cut(bytes, *first_seq) {
                Cut::Nothing => bytes.len(),
                Cut::At(p) => p,
                Cut::Evidence(why, cut) => {
                    tracing::error!(
                        file = %path.display(),
                        reason = %why,
                        "ALARM audit: the newest file is damaged in a way a crash cannot cause; left in place for `svs-provision audit verify`"
                    );
                    cut.unwrap_or(last_newline)
                }
            }
        };
        if keep != bytes.len() {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
                .as_secs();
            // Two recoveries in one second must not overwrite what the
            // first kept aside.
            let (aside, mut a) = (0..)
                .map(|n| {
                    let suffix = if n == 0 {
                        String::new()
                    } else {
                        format!(".{n}")
                    };
                    let aside =
                        path.with_file_name(format!("{}.cut-{now}{suffix}", file_name(*first_seq)));
                    (
                        OpenOptions::new().write(true).create_new(true).open(&aside),
                        aside,
                    )
                })
                .find_map(|(f, aside)| match f {
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => None,
                    f => Some(f.map(|f| (aside, f))),
                })
                .unwrap_or_else(|| Err(std::io::Error::other("no free name")))
                .map_err(io)?;
            a.write_all(&bytes[keep..]).map_err(io)?;
            a.sync_all().map_err(io)?;
            // The kept-aside name is durable before the file is cut.
            sync_dir(dir).map_err(io)?;
            tracing::warn!(
                file = %path.display(),
                bytes = bytes.len() - keep,
                kept_in = %aside.display(),
                "audit: cutting off an incomplete last write (unacknowledged, left by a crash)"
            );
        }
        // Also drops zero-filled space: the writer fills afresh what it uses.
        if keep as u64 != on_disk {
            f.set_len(keep as u64).map_err(io)?;
            f.sync_all().map_err(io)?;
            sync_dir(dir).map_err(io)?;
        }
        // An older file's records end at its last complete line.
        let text = if n > 0 {
            &bytes[..last_newline]
        } else {
            &bytes[..keep]
        };
        let Some(last) = text.split(|b| *b == b'\n').rev().find(|l| !l.is_empty()) else {
            if n == 0 && files.len() > 1 {
                empty_newest = Some((*first_seq, path.clone()));
            }
            continue;
        };
        let (body, hash) = split_line(last).ok_or_else(|| {
            SvsError::AuditUnavailable(format!(
                "{}: last record is malformed; run `svs-provision audit verify`",
                path.display()
            ))
        })?;
        let seq = body_seq(&body).ok_or_else(|| {
            SvsError::AuditUnavailable(format!("{}: last record has no seq", path.display()))
        })?;
        if let Some((next_seq, empty)) = empty_newest {
            // A crash (or a stop) between starting a file and committing
            // to it: the chain goes on in the file before, and a name the
            // chain skipped would stay inside the trail. Only when nothing
            // lies between: otherwise the empty file is the last trace of
            // records removed from the file before it.
            if next_seq != seq + 1 {
                return Err(SvsError::AuditUnavailable(format!(
                    "{} is empty and {} ends at seq {seq}: records are missing; run `svs-provision audit verify`",
                    empty.display(),
                    path.display()
                )));
            }
            std::fs::remove_file(&empty).map_err(io)?;
            sync_dir(dir).map_err(io)?;
        }
        return Ok((seq, hash, Some(*first_seq)));
    }
    // No record in any file. A file named for a later seq means the records
    // before it existed (their files archived or removed after a rotation
    // that a crash cut short): starting again at seq 1 would fork the chain
    // and reuse the archived files' names.
    if let Some((first_seq, path)) = files.iter().rev().find(|(s, _)| *s > 1) {
        return Err(SvsError::AuditUnavailable(format!(
            "{} is empty and no file before it is in {}: the chain's head (seq {}) is in a file taken away (archived?); put the newest such file back (svsd only reads it) and start again",
            path.display(),
            dir.display(),
            first_seq - 1
        )));
    }
    Ok((0, GENESIS, None))
}

/// Compares the recovered chain end `(seq, head)` with the anchor: the
/// record at the anchor's seq must be the one anchored, in whichever file
/// holds it. A file archived away (every file left starts after the
/// anchor) is not compared; `audit verify` checks the chain between.
fn check_anchor(
    dir: &Path,
    anchor: &Checkpoint,
    (seq, head): (u64, [u8; 32]),
) -> Result<(), SvsError> {
    let advice = "put the trail's files back (`svs-provision audit verify` checks them); a new trail on purpose needs the anchor reset by a security officer (`svs-provision audit anchor --reset`). no record was written";
    if seq < anchor.head_seq {
        return Err(SvsError::AuditUnavailable(format!(
            "the trail in {} ends at seq {seq}, but the token's audit anchor shows it reached seq {} (at {}): records were removed or an older copy put back (or another svsd writes this anchor: give each its own `[audit] anchor_object`); {advice}",
            dir.display(),
            anchor.head_seq,
            anchor.signed_at
        )));
    }
    let at_anchor = if seq == anchor.head_seq {
        Some(head)
    } else {
        // The last file to start at or before the anchor holds it.
        let holder = trail_files(dir)
            .map_err(|e| SvsError::AuditUnavailable(format!("cannot list {}: {e}", dir.display())))?
            .into_iter()
            .rev()
            .find(|(first, _)| *first <= anchor.head_seq)
            .map(|(_, path)| path);
        match holder {
            Some(path) => record_hash(&path, anchor.head_seq),
            // Archived away.
            None => return Ok(()),
        }
    };
    if at_anchor != Some(anchor.head) {
        return Err(SvsError::AuditUnavailable(format!(
            "record {} of the trail in {} is not the one the token's audit anchor recorded (at {}): the trail was rewritten or replaced; {advice}",
            anchor.head_seq,
            dir.display(),
            anchor.signed_at
        )));
    }
    Ok(())
}

/// The hash of record `seq` in the trail file `path`, if it is there.
fn record_hash(path: &Path, seq: u64) -> Option<[u8; 32]> {
    let bytes = read_trail_file(path).ok()?;
    bytes
        .split(|b| *b == b'\n')
        .filter_map(split_line)
        .find(|(body, _)| body_seq(body) == Some(seq))
        .map(|(_, hash)| hash)
}

/// What start-up recovery does with the newest file.
#[derive(Debug, PartialEq, Eq)]
enum Cut {
    /// Every line is a valid record in sequence.
    Nothing,
    /// Cut here: from this byte on lies what a crash left.
    At(usize),
    /// Invalid, but not as a crash leaves it: left in place. A crash
    /// remnant after the damage (svsd went on writing after an earlier
    /// ALARM, then crashed) is still cut, at the offset given.
    Evidence(String, Option<usize>),
}

fn crash_cut(bytes: &[u8], first_seq: u64) -> Cut {
    // The last valid record read (the chain resumes after damage from it).
    let mut expected: Option<(u64, [u8; 32])> = None;
    let mut last_time: Option<String> = None;
    let mut evidence: Option<String> = None;
    // The first line holding zeros or cut short since the last damage a
    // crash cannot cause, with the record before it: where a crash remnant
    // would begin. Records after it may be out of sequence (they chain to
    // lines the hole swallowed), so only a complete, altered line ends it.
    let mut candidate: Option<(usize, usize, u64, Option<String>)> = None;
    let mut offset = 0;
    for (i, raw) in bytes.split_inclusive(|b| *b == b'\n').enumerate() {
        let at = offset;
        offset += raw.len();
        let Some((b, hash)) = raw.strip_suffix(b"\n").and_then(valid_record) else {
            if raw.ends_with(b"\n") && !raw.contains(&0) {
                evidence.get_or_insert(format!(
                    "line {}: a complete line that is not a valid record (a crash leaves bytes unwritten, never altered)",
                    i + 1
                ));
                candidate = None;
            } else if candidate.is_none() {
                let after_seq = expected.map_or(first_seq.saturating_sub(1), |(s, _)| s);
                candidate = Some((at, i + 1, after_seq, last_time.clone()));
            }
            continue;
        };
        // A complete record that checks out by itself but not in sequence
        // was deleted, moved or replaced: never what a crash writes, unless
        // a hole before it (the candidate) swallowed its predecessors.
        let in_sequence = match expected {
            None => b.seq == first_seq,
            Some((seq, h)) => b.seq == seq + 1 && b.prev == hex(&h),
        };
        if !in_sequence && candidate.is_none() {
            evidence.get_or_insert(format!("line {}: seq {} out of sequence", i + 1, b.seq));
        }
        expected = Some((b.seq, hash));
        last_time = Some(b.time.into_owned());
    }
    let cut = match candidate {
        None => None,
        Some((at, line, after_seq, after_time)) => {
            match unwritten_remnant(bytes, at, after_seq, after_time.as_deref(), false) {
                Ok(()) => Some(at),
                Err(why) => {
                    evidence.get_or_insert(format!("line {line}: {why}"));
                    None
                }
            }
        }
    };
    match (evidence, cut) {
        (None, None) => Cut::Nothing,
        (None, Some(at)) => Cut::At(at),
        (Some(why), cut) => Cut::Evidence(why, cut),
    }
}

/// A line (without its newline) that is a record matching its own hash.
fn valid_record(line: &[u8]) -> Option<(Body<'static>, [u8; 32])> {
    let (body, hash) = split_line(line)?;
    if sm3(&body) != hash {
        return None;
    }
    // Cow fields without `#[serde(borrow)]` deserialise owned.
    let b: Body<'static> = serde_json::from_slice(&body).ok()?;
    Some((b, hash))
}

/// The unit a disk writes whole: a crash leaves a write's bytes unwritten
/// in whole sectors (4 KiB pages are whole sectors too).
const SECTOR: usize = 512;

/// `{"seq":N,"time":"T"` at the start of a line cut short.
fn line_head(piece: &[u8]) -> Option<(u64, &str)> {
    let rest = piece.strip_prefix(b"{\"seq\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let seq = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    let time = rest[digits..].strip_prefix(b",\"time\":\"")?.get(..27)?;
    std::str::from_utf8(time).ok().map(|t| (seq, t))
}

/// Whether `bytes[from..]` (to the end of the newest file, its zero tail
/// removed) is what is left of one group commit that never completed: the
/// reason when it is not.
///
/// Answers wait for the group's fdatasync, so a crash can damage only the
/// last group, and only by leaving bytes unwritten: zero-filled sectors
/// (preallocated space, or blocks persisted out of order) and a file that
/// ends inside a line. Written bytes are never altered, and records of
/// earlier groups are never touched. So here every zero run must be whole
/// sectors, and every complete line must be a record of one group (all of
/// a group's records carry its commit time) committed after `after_seq`
/// and not before `after_time`, the last intact record's. Anything else
/// was done to the file afterwards: evidence, never to be cut away.
///
/// `live`: a reader racing the writer sees the page being copied partly
/// written, so a zero run may then start anywhere (it still ends at a page
/// boundary, where the next page was copied before this one was read).
fn unwritten_remnant(
    bytes: &[u8],
    from: usize,
    after_seq: u64,
    after_time: Option<&str>,
    live: bool,
) -> Result<(), String> {
    let after_time = match after_time {
        Some(t) => Some(parse_rfc3339(t).ok_or("the last intact record's time cannot be read")?),
        None => None,
    };
    // Time and seq of the last record seen, with its hash and end offset
    // when it was complete (for the next one's `prev`).
    type Seen = (String, u64, Option<([u8; 32], usize)>);
    let mut group: Option<Seen> = None;
    let mut at = from;
    while at < bytes.len() {
        if bytes[at] == 0 {
            let end = bytes[at..]
                .iter()
                .position(|b| *b != 0)
                .map_or(bytes.len(), |n| at + n);
            if !(live || at == from || at.is_multiple_of(SECTOR)) || !end.is_multiple_of(SECTOR) {
                return Err(format!(
                    "zero bytes at {at}..{end} are not unwritten sectors"
                ));
            }
            at = end;
            continue;
        }
        let end = bytes[at..]
            .iter()
            .position(|b| *b == 0)
            .map_or(bytes.len(), |n| at + n);
        let mut offset = at;
        for (k, piece) in bytes[at..end].split_inclusive(|b| *b == b'\n').enumerate() {
            let start = offset;
            offset += piece.len();
            // The rest of a line whose start is unwritten: nothing to read.
            if k == 0 && at > from {
                continue;
            }
            let (seq, time, chain, prev) = match piece.strip_suffix(b"\n") {
                Some(line) => {
                    let Some((b, hash)) = valid_record(line) else {
                        return Err(format!(
                            "the complete line at byte {start} is not a valid record: written bytes were altered"
                        ));
                    };
                    (
                        b.seq,
                        b.time.into_owned(),
                        Some((hash, offset)),
                        Some(b.prev),
                    )
                }
                // The start of a line whose rest is unwritten: its seq and
                // time, when they got written, still say which commit.
                None => match line_head(piece) {
                    Some((seq, time)) => (seq, time.to_owned(), None, None),
                    None => continue,
                },
            };
            match &group {
                None => {
                    let t = parse_rfc3339(&time)
                        .ok_or_else(|| format!("seq {seq}: its time cannot be read"))?;
                    if seq <= after_seq || after_time.is_some_and(|a| t < a) {
                        return Err(format!(
                            "seq {seq} after the damage is not of a commit later than the last intact record (seq {after_seq})"
                        ));
                    }
                }
                Some((group_time, last, last_chain)) => {
                    if time != *group_time {
                        return Err(format!(
                            "seq {last} and seq {seq} after the damage were committed separately: the earlier commit was acknowledged, so this is no crash"
                        ));
                    }
                    let chained = match (last_chain, &prev) {
                        (Some((h, e)), Some(p)) if *e == start => seq == last + 1 && *p == hex(h),
                        _ => true,
                    };
                    if seq <= *last || !chained {
                        return Err(format!("seq {seq} after the damage is out of sequence"));
                    }
                }
            }
            group = Some((time, seq, chain));
        }
        at = end;
    }
    Ok(())
}

/// Splits a line into its hashed body (with `}` restored) and its hash.
fn split_line(line: &[u8]) -> Option<(Vec<u8>, [u8; 32])> {
    if line.len() < HASH_SUFFIX_LEN + 2 {
        return None;
    }
    let (prefix, suffix) = line.split_at(line.len() - HASH_SUFFIX_LEN);
    let hex_part = suffix
        .strip_prefix(br#","hash":""#)?
        .strip_suffix(br#""}"#)?;
    let hash = unhex32(hex_part)?;
    let mut body = prefix.to_vec();
    body.push(b'}');
    Some((body, hash))
}

fn unhex32(s: &[u8]) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        let pair = std::str::from_utf8(&s[2 * i..2 * i + 2]).ok()?;
        if !pair
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        {
            return None;
        }
        *b = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

/// The time of the last record in `path` (empty if it cannot be read: the
/// floor for the next record's time is then the clock alone).
fn last_record_time(path: &Path) -> String {
    let Ok(bytes) = read_trail_file(path) else {
        return String::new();
    };
    bytes
        .split(|b| *b == b'\n')
        .rev()
        .find(|l| !l.is_empty())
        .and_then(split_line)
        .and_then(|(body, _)| serde_json::from_slice::<Body>(&body).ok())
        .map(|b| b.time.into_owned())
        .unwrap_or_default()
}

fn body_seq(body: &[u8]) -> Option<u64> {
    serde_json::from_slice::<Body>(body).ok().map(|b| b.seq)
}

enum Job {
    Append {
        entries: Vec<Entry>,
        ack: oneshot::Sender<Result<u64, SvsError>>,
    },
    Head {
        ack: oneshot::Sender<Result<ChainHead, SvsError>>,
    },
}

/// Counters for metrics and the benchmark. Prometheus handles, created
/// unregistered with the trail and registered by [`crate::metrics::Metrics`].
#[derive(Debug)]
pub struct AuditStats {
    /// Records made durable.
    pub records: prometheus::IntCounter,
    /// Group commits (one fsync each).
    pub fsyncs: prometheus::IntCounter,
    /// Writes or fsyncs that failed (each breaks the trail).
    pub write_errors: prometheus::IntCounter,
    /// Duration of a group commit: write plus fsync.
    pub fsync_seconds: prometheus::Histogram,
}

impl Default for AuditStats {
    fn default() -> Self {
        let counter = |name: &str, help: &str| {
            prometheus::IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"))
        };
        AuditStats {
            records: counter("svs_audit_records_total", "Audit records made durable."),
            fsyncs: counter(
                "svs_audit_fsyncs_total",
                "Audit group commits (one fsync each).",
            ),
            write_errors: counter(
                "svs_audit_write_errors_total",
                "Audit writes or fsyncs that failed (each stops signing).",
            ),
            fsync_seconds: crate::metrics::fsync_histogram(),
        }
    }
}

/// Handle to the trail; cheap to share.
pub struct AuditTrail {
    tx: Mutex<Option<Sender<Job>>>,
    broken: Arc<Mutex<Option<String>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    stats: Arc<AuditStats>,
}

impl std::fmt::Debug for AuditTrail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditTrail")
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

struct Writer {
    sink: Box<dyn Sink>,
    seq: u64,
    head: [u8; 32],
    /// The last record's time: the floor for the next one's.
    last_time: String,
    /// The clock was behind `last_time` at the last commit (warned once).
    clock_behind: bool,
    max_file_bytes: u64,
    max_group: usize,
    broken: Arc<Mutex<Option<String>>>,
    stats: Arc<AuditStats>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Job>) {
        let mut buf = Vec::with_capacity(1 << 16);
        let records_of = |job: &Job| match job {
            Job::Append { entries, .. } => entries.len(),
            Job::Head { .. } => 0,
        };
        // A job that would take a group past `max_group` starts the next
        // one; a job larger than `max_group` (a big batch) is a group alone.
        let mut next = None;
        while let Some(first) = next.take().or_else(|| rx.recv().ok()) {
            let mut records = records_of(&first);
            let mut jobs = vec![first];
            while records < self.max_group {
                let Ok(job) = rx.try_recv() else { break };
                let n = records_of(&job);
                if records + n > self.max_group {
                    next = Some(job);
                    break;
                }
                records += n;
                jobs.push(job);
            }
            self.commit(jobs, &mut buf);
        }
        if let Err(e) = self.sink.finish() {
            // Everything acknowledged is durable; only zero-filled space
            // may stay behind, which readers skip and the next start cuts.
            tracing::warn!(error = %e, "audit: cannot cut the last file to its records");
        }
    }

    fn fail(&self, why: String) {
        tracing::error!(reason = %why, "ALARM audit trail cannot be written: signing stops");
        *self.broken.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    fn commit(&mut self, jobs: Vec<Job>, buf: &mut Vec<u8>) {
        let broken = self
            .broken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(why) = broken {
            for job in jobs {
                match job {
                    Job::Append { ack, .. } => {
                        let _ = ack.send(Err(SvsError::AuditUnavailable(why.clone())));
                    }
                    Job::Head { ack } => {
                        let _ = ack.send(Err(SvsError::AuditUnavailable(why.clone())));
                    }
                }
            }
            return;
        }
        buf.clear();
        let now = rfc3339(SystemTime::now());
        // `audit verify` takes a record older than its predecessor for
        // damage: a clock stepped back (NTP, by hand) must not cause one.
        // The format's text order is its time order.
        let time = if now < self.last_time {
            if !self.clock_behind {
                tracing::warn!(
                    clock = %now,
                    last_record = %self.last_time,
                    "audit: the clock is behind the last record's time; records keep that time until it catches up"
                );
            }
            self.clock_behind = true;
            self.last_time.clone()
        } else {
            self.clock_behind = false;
            now
        };
        let mut acks = Vec::with_capacity(jobs.len());
        let mut heads = Vec::new();
        let mut count = 0u64;
        let mut unrenderable = None;
        for job in jobs {
            match job {
                Job::Append { entries, ack } => {
                    for entry in &entries {
                        if unrenderable.is_some() {
                            break;
                        }
                        match render(self.seq + 1, &self.head, entry, &time, buf) {
                            Ok(hash) => {
                                self.seq += 1;
                                self.head = hash;
                                count += 1;
                            }
                            Err(e) => unrenderable = Some(e),
                        }
                    }
                    acks.push((ack, self.seq));
                }
                Job::Head { ack } => heads.push(ack),
            }
        }
        // Nothing of a group is written unless all of it can be.
        let result = if let Some(e) = unrenderable {
            Err(std::io::Error::other(format!(
                "cannot serialise a record: {e}"
            )))
        } else if buf.is_empty() {
            Ok(())
        } else {
            let started = std::time::Instant::now();
            let r = self.sink.append(buf).and_then(|()| self.sink.sync());
            self.stats
                .fsync_seconds
                .observe(started.elapsed().as_secs_f64());
            r
        };
        match result {
            Ok(()) => {
                self.stats.records.inc_by(count);
                if count > 0 {
                    self.stats.fsyncs.inc();
                    self.last_time = time;
                }
                for (ack, seq) in acks {
                    let _ = ack.send(Ok(seq));
                }
                for ack in heads {
                    let _ = ack.send(Ok((self.seq, self.head, self.last_time.clone())));
                }
                if self.sink.len() >= self.max_file_bytes
                    && let Err(e) = self.sink.rotate(self.seq + 1)
                {
                    self.stats.write_errors.inc();
                    self.fail(format!("cannot start a new audit file: {e}"));
                }
            }
            Err(e) => {
                self.stats.write_errors.inc();
                let why = format!("write/fsync failed: {e}");
                self.fail(why.clone());
                for (ack, _) in acks {
                    let _ = ack.send(Err(SvsError::AuditUnavailable(why.clone())));
                }
                for ack in heads {
                    let _ = ack.send(Err(SvsError::AuditUnavailable(why.clone())));
                }
            }
        }
    }
}

impl AuditTrail {
    /// Opens (or creates) the trail in `config.dir` and continues its chain.
    /// Blocking: call at start-up.
    /// `anchor` is the audit anchor read from the token: a trail that ends
    /// before it, or holds another record at its seq, is refused before
    /// anything is written.
    pub fn open(config: &AuditConfig, anchor: Option<&Checkpoint>) -> Result<AuditTrail, SvsError> {
        let io = |e: std::io::Error| {
            SvsError::AuditUnavailable(format!("{}: {e}", config.dir.display()))
        };
        std::fs::create_dir_all(&config.dir).map_err(io)?;
        let lock = lock_dir(&config.dir)?;
        let (seq, head, current) = recover(&config.dir)?;
        if let Some(anchor) = anchor {
            check_anchor(&config.dir, anchor, (seq, head))?;
        }
        let preallocate = config.preallocate.then_some(config.max_file_bytes);
        let sink = FileSink::create(&config.dir, current.unwrap_or(seq + 1), preallocate, lock)
            .map_err(io)?;
        let last_time = current
            .map(|first| last_record_time(&config.dir.join(file_name(first))))
            .unwrap_or_default();
        let trail = AuditTrail::with_sink(Box::new(sink), seq, head, last_time, config);
        Ok(trail)
    }

    fn with_sink(
        sink: Box<dyn Sink>,
        seq: u64,
        head: [u8; 32],
        last_time: String,
        config: &AuditConfig,
    ) -> AuditTrail {
        let (tx, rx) = crossbeam_channel::unbounded();
        let broken = Arc::new(Mutex::new(None));
        let stats = Arc::new(AuditStats::default());
        let writer = Writer {
            sink,
            seq,
            head,
            last_time,
            clock_behind: false,
            max_file_bytes: config.max_file_bytes,
            max_group: config.max_group_records,
            broken: broken.clone(),
            stats: stats.clone(),
        };
        // fsync blocks: it gets its own thread, never a runtime worker.
        let thread = std::thread::Builder::new()
            .name("svs-audit".into())
            .spawn(move || writer.run(rx))
            .ok();
        AuditTrail {
            tx: Mutex::new(Some(tx)),
            broken,
            thread: Mutex::new(thread),
            stats,
        }
    }

    fn submit(&self, job: Job) -> Result<(), SvsError> {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        match tx.as_ref() {
            Some(tx) => tx
                .send(job)
                .map_err(|_| SvsError::AuditUnavailable("audit writer stopped".into())),
            None => Err(SvsError::AuditUnavailable("audit trail closed".into())),
        }
    }

    async fn append_entries(&self, entries: Vec<Entry>) -> Result<u64, SvsError> {
        self.check()?;
        let (ack, rx) = oneshot::channel();
        self.submit(Job::Append { entries, ack })?;
        rx.await
            .map_err(|_| SvsError::AuditUnavailable("audit writer stopped".into()))?
    }

    /// Appends records; returns once they are on disk (fsync'd).
    pub async fn append(&self, events: Vec<AuditEvent>) -> Result<(), SvsError> {
        if events.is_empty() {
            return Ok(());
        }
        self.append_entries(events.into_iter().map(Entry::Op).collect())
            .await
            .map(|_| ())
    }

    /// Appends a note (`start`, `selftest`, `reload`, `stop`).
    pub async fn note(&self, kind: &'static str, detail: String) -> Result<(), SvsError> {
        self.append_entries(vec![Entry::Note { kind, detail }])
            .await
            .map(|_| ())
    }

    /// Appends notes of one kind together (one group commit); returns once
    /// they are on disk.
    pub async fn notes(&self, kind: &'static str, details: Vec<String>) -> Result<(), SvsError> {
        if details.is_empty() {
            return Ok(());
        }
        let entries = details
            .into_iter()
            .map(|detail| Entry::Note { kind, detail })
            .collect();
        self.append_entries(entries).await.map(|_| ())
    }

    /// The last durable record's seq and hash.
    pub async fn head(&self) -> Result<ChainHead, SvsError> {
        self.check()?;
        let (ack, rx) = oneshot::channel();
        self.submit(Job::Head { ack })?;
        rx.await
            .map_err(|_| SvsError::AuditUnavailable("audit writer stopped".into()))?
    }

    /// Appends a checkpoint: `signature` by the audit key `key` over
    /// `text.message()`.
    pub async fn checkpoint(
        &self,
        text: Checkpoint,
        key: String,
        signature: Vec<u8>,
    ) -> Result<(), SvsError> {
        self.append_entries(vec![Entry::Checkpoint {
            text,
            key,
            signature,
        }])
        .await
        .map(|_| ())
    }

    /// Ok while the trail can be written; the reason otherwise.
    pub fn check(&self) -> Result<(), SvsError> {
        match &*self.broken.lock().unwrap_or_else(|p| p.into_inner()) {
            None => Ok(()),
            Some(why) => Err(SvsError::AuditUnavailable(why.clone())),
        }
    }

    /// Counters.
    pub fn stats(&self) -> &AuditStats {
        &self.stats
    }

    /// Stops the writer after it has committed everything queued. Blocking.
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Drop for AuditTrail {
    fn drop(&mut self) {
        self.close();
    }
}

// ------------------------------------------------------------ verification

/// What kind of damage a break is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BreakKind {
    /// The line is not a record (not JSON, no hash, unknown fields).
    Malformed,
    /// The record's bytes do not match its own hash: it was altered.
    Tampered,
    /// Records `from..=to` are missing before this one.
    Deleted {
        /// First missing seq.
        from: u64,
        /// Last missing seq.
        to: u64,
    },
    /// Records are out of order (this seq was expected later or earlier).
    Reordered {
        /// The seq expected here.
        expected: u64,
    },
    /// `prev` does not name the previous record's hash (a record was
    /// replaced with a consistent but foreign one, or files were mixed).
    ChainMismatch,
    /// A checkpoint's head or signature does not check out, or its head
    /// cannot be checked against the chain.
    BadCheckpoint,
    /// A record's time is earlier than its predecessor's. svsd never
    /// writes one (while its clock is behind, records keep the last time),
    /// so records were rewritten or moved.
    TimeWentBack,
    /// An incomplete line that is not the end of the newest file (the end
    /// of the newest file is a write in progress: a warning, not a break).
    TornTail,
    /// A file's name does not match its first record.
    BadFileName,
    /// The trail does not start at seq 1: records `1..first_seq` are gone
    /// (oldest files deleted or archived) and nothing anchors the first
    /// record's `prev`. Accepted only with [`VerifyOptions::from_seq`].
    MissingStart {
        /// Seq of the first record present.
        first_seq: u64,
    },
    /// With the audit key: records after `after` are covered by no signed
    /// checkpoint for longer than the checkpoint interval allows; they (and
    /// whatever should follow them) could have been rewritten.
    Unsigned {
        /// The last seq a verified checkpoint covers (0: none).
        after: u64,
    },
}

/// The first place where the trail is broken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    /// File holding the broken record.
    pub file: PathBuf,
    /// 1-based line number in that file.
    pub line: usize,
    /// The record's seq, when it could be read.
    pub seq: Option<u64>,
    /// What is wrong.
    pub kind: BreakKind,
    /// Human-readable detail.
    pub detail: String,
    /// Whether checkpoint signatures were checked (a key was given).
    pub signatures_checked: bool,
    /// With a key: the highest seq covered by a checkpoint that verified
    /// before the break. Only records up to it are proven; those after it
    /// merely chain up to the break, and a rewrite recomputes a chain.
    pub signed_through: Option<u64>,
}

impl std::fmt::Display for ChainBreak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)?;
        if let Some(seq) = self.seq {
            write!(f, " (seq {seq})")?;
        }
        write!(f, ": {:?}: {}", self.kind, self.detail)
    }
}

/// A trail that checks out.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChainReport {
    /// Files read.
    pub files: usize,
    /// Records read.
    pub records: u64,
    /// Seq of the first record (1 unless old files were archived away).
    pub first_seq: u64,
    /// Seq of the last record.
    pub last_seq: u64,
    /// Hash of the last record (hex).
    pub head: String,
    /// Time of the last record.
    pub last_time: String,
    /// Checkpoints found; their signatures were checked when a key was given.
    pub checkpoints: u64,
    /// With a key: the highest seq a signature-verified checkpoint covers,
    /// its head checked against the chain.
    pub signed_through: Option<u64>,
    /// With a key: the time signed inside the newest verified checkpoint
    /// of format v2. `None` when only v1 checkpoints verified: they do not
    /// sign a time, and a record's own `time` is not signed by anything.
    pub signed_at: Option<String>,
    /// The head seq of the checkpoint giving `signed_at`.
    pub time_signed_through: Option<u64>,
    /// Checkpoints of format v1 (written before svsd signed their time).
    pub v1_checkpoints: u64,
    /// With a key: the checkpoint interval coverage was measured with (the
    /// one signed in the checkpoint giving `signed_at`, else the one given).
    pub interval: Option<Duration>,
    /// With a key and an interval: from the newest verified checkpoint's
    /// time (signed if `signed_at` is set, else the records' own) to the
    /// last record's time. The last record's time is never signed.
    pub uncovered_span: Option<Duration>,
    /// With `live_at`: the age of `signed_at` by that clock.
    pub signed_age: Option<Duration>,
    /// Checkpoints (seq, head_seq) whose head lies before the first record
    /// kept (a pruned trail): their signature was checked, their head
    /// could not be, and they cover nothing here.
    pub unchecked_heads: Vec<(u64, u64)>,
    /// Records `1..first_seq` were acknowledged as pruned (`from_seq`).
    pub pruned: bool,
    /// Things that are not breaks but deserve a look (a write in progress).
    pub warnings: Vec<String>,
}

/// How strictly [`verify_dir_with`] checks.
#[derive(Debug, Clone, Copy, Default)]
pub struct VerifyOptions<'k> {
    /// The audit key: checkpoint signatures are verified and the trail must
    /// be covered by them (see `checkpoint_interval`).
    pub key: Option<CheckpointKey<'k>>,
    /// svsd's `[audit] checkpoint_interval_s`. With a key, the records
    /// after the newest verified checkpoint may span at most this plus
    /// [`CHECKPOINT_SLACK`]; `None` with a key: any uncovered record beyond
    /// the newest checkpoint's own is a break.
    pub checkpoint_interval: Option<Duration>,
    /// The officer acknowledges that records before this seq were pruned:
    /// a trail starting exactly here is accepted (its first `prev` cannot be
    /// checked). Without it a trail must start at seq 1 with a zero `prev`.
    pub from_seq: Option<u64>,
    /// svsd is running: with a key and an interval, the newest verified
    /// checkpoint must also be recent at this time (catches a cut tail,
    /// e.g. deleted newest files, which the trail alone cannot show).
    pub live_at: Option<SystemTime>,
}

/// The public half of the audit key that signs checkpoints.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointKey<'k> {
    /// SM2, or ECDSA P-256 on an HSM profile without SM2: svsd signs the
    /// checkpoint message as it signs any message with that key.
    pub algorithm: svs_hsm::Algorithm,
    /// The uncompressed point.
    pub point: &'k [u8],
}

impl<'k> CheckpointKey<'k> {
    /// An SM2 audit key.
    pub fn sm2(point: &'k [u8]) -> CheckpointKey<'k> {
        CheckpointKey {
            algorithm: svs_hsm::Algorithm::Sm2,
            point,
        }
    }
}

/// Allowance on top of the checkpoint interval: the checkpoint record is
/// written after the HSM signed (bounded by the HSM timeout) and the timer
/// may fire late under load.
pub const CHECKPOINT_SLACK: Duration = Duration::from_secs(60);

/// How many of the most recent record hashes are kept to check checkpoint
/// heads. svsd signs the head it just read, so only records committed while
/// the HSM signed lie between a head and its checkpoint; a head further
/// back than this cannot be checked and is refused (32 MiB at most).
const HEAD_WINDOW: usize = 1 << 20;

/// Verifies every file of the trail in `dir`, in order, as one chain.
/// With `checkpoint_key` (the audit key's uncompressed SM2 point), checkpoint
/// signatures are verified too. Returns the first break, located precisely.
/// Same as [`verify_dir_with`] with only the key set.
pub fn verify_dir(
    dir: &Path,
    checkpoint_key: Option<CheckpointKey<'_>>,
) -> Result<ChainReport, ChainBreak> {
    verify_dir_with(
        dir,
        &VerifyOptions {
            key: checkpoint_key,
            ..VerifyOptions::default()
        },
    )
}

/// Verifies every file of the trail in `dir`, in order, as one chain, and
/// with a key that signed checkpoints cover it. Returns the first break,
/// located precisely.
pub fn verify_dir_with(dir: &Path, opts: &VerifyOptions<'_>) -> Result<ChainReport, ChainBreak> {
    let files = trail_files(dir).map_err(|e| ChainBreak {
        file: dir.to_path_buf(),
        line: 0,
        seq: None,
        kind: BreakKind::Malformed,
        detail: format!("cannot list: {e}"),
        signatures_checked: opts.key.is_some(),
        signed_through: None,
    })?;
    verify_files(&files, opts, HEAD_WINDOW)
}

/// Where the newest file's records end (before zeros followed by data, if
/// that data has the shape of a group being written, or of what a crash
/// left of one, which svsd cuts at its next start); else the start of the
/// line holding the zeros and why they are damage: zeros with acknowledged
/// records after them.
pub(crate) fn newest_shape(bytes: &[u8], first_seq: u64) -> Result<usize, (usize, String)> {
    let end = records_end(bytes);
    if end == bytes.len() {
        return Ok(end);
    }
    let from = bytes[..end]
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |i| i + 1);
    let last = bytes[..from]
        .strip_suffix(b"\n")
        .and_then(|b| b.split(|c| *c == b'\n').next_back())
        .and_then(valid_record);
    let (after_seq, after_time) = match &last {
        Some((b, _)) => (b.seq, Some(b.time.as_ref())),
        None => (first_seq.saturating_sub(1), None),
    };
    unwritten_remnant(bytes, from, after_seq, after_time, true)
        .map(|()| end)
        .map_err(|why| (from, why))
}

fn verify_files(
    files: &[(u64, PathBuf)],
    opts: &VerifyOptions<'_>,
    window_cap: usize,
) -> Result<ChainReport, ChainBreak> {
    let mut v = Verifier::new(opts, window_cap);
    for (n, (first_seq, path)) in files.iter().enumerate() {
        let read = |v: &Verifier<'_>| {
            std::fs::read(path).map_err(|e| ChainBreak {
                file: path.clone(),
                line: 0,
                seq: None,
                kind: BreakKind::Malformed,
                detail: format!("cannot read: {e}"),
                signatures_checked: opts.key.is_some(),
                signed_through: v.report.signed_through,
            })
        };
        let mut raw = read(&v)?;
        let newest = n + 1 == files.len();
        let bytes = if newest {
            let mut shape = newest_shape(without_zero_tail(&raw), *first_seq);
            // A reader racing the writer can copy one page before a commit
            // and the next after two more: zeros, then records of two
            // commits. Such a torn copy does not repeat; damage on disk does.
            for _ in 0..2 {
                if shape.is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
                raw = read(&v)?;
                shape = newest_shape(without_zero_tail(&raw), *first_seq);
            }
            let bytes = without_zero_tail(&raw);
            match shape {
                Ok(end) if end < bytes.len() => {
                    v.report.warnings.push(format!(
                        "{}: data after zero-filled space at byte {end}: a write in progress, or what a crash left of an unacknowledged group commit (svsd cuts it at its next start); not counted",
                        path.display()
                    ));
                    &bytes[..end]
                }
                Ok(_) => bytes,
                Err((from, why)) => {
                    // The records after the zeros are read too: the break
                    // is the damaged line, or else the zeros themselves.
                    v.file(path, *first_seq, bytes, newest)?;
                    return Err(ChainBreak {
                        file: path.clone(),
                        line: bytes[..from].iter().filter(|b| **b == b'\n').count() + 1,
                        seq: None,
                        kind: BreakKind::Malformed,
                        detail: format!("zero bytes inside the records: {why}"),
                        signatures_checked: v.opts.key.is_some(),
                        signed_through: v.report.signed_through,
                    });
                }
            }
        } else {
            // Older files were cut to their records before the next began:
            // a hole in one is damage, to be shown.
            without_zero_tail(&raw)
        };
        v.file(path, *first_seq, bytes, newest)?;
    }
    v.report.files = files.len();
    if let Some(path) = files.last().map(|(_, p)| p) {
        v.coverage(path)?;
    }
    Ok(v.report)
}

struct Verifier<'k> {
    opts: VerifyOptions<'k>,
    verifier: svs_hsm::signature::SoftwareVerifier,
    prev: Option<(u64, [u8; 32])>,
    // Hashes of the most recent records (`window_first` is the seq of the
    // front), to check checkpoint heads.
    window: std::collections::VecDeque<[u8; 32]>,
    window_first: u64,
    window_cap: usize,
    // (checkpoint record's seq, its record time) giving `signed_through`.
    newest_signed: Option<(u64, Duration)>,
    // (checkpoint record's seq, signed time, signed interval) giving
    // `signed_at`.
    newest_timed: Option<(u64, Duration, Duration)>,
    // Line of the last record (for coverage breaks).
    last_line: usize,
    first_time: Duration,
    last_time: Duration,
    // A v2 checkpoint has been read: its writer keeps record times from
    // going back (earlier writers did not, so older stretches may).
    floored_writer: bool,
    report: ChainReport,
}

impl<'k> Verifier<'k> {
    fn new(opts: &VerifyOptions<'k>, window_cap: usize) -> Self {
        Verifier {
            opts: *opts,
            verifier: svs_hsm::signature::SoftwareVerifier::new(),
            prev: None,
            window: Default::default(),
            window_first: 0,
            window_cap,
            newest_signed: None,
            newest_timed: None,
            last_line: 0,
            first_time: Duration::ZERO,
            last_time: Duration::ZERO,
            floored_writer: false,
            report: ChainReport::default(),
        }
    }

    fn remember(&mut self, seq: u64, hash: [u8; 32]) {
        if self.window.is_empty() {
            self.window_first = seq;
        }
        self.window.push_back(hash);
        if self.window.len() > self.window_cap {
            self.window.pop_front();
            self.window_first += 1;
        }
    }

    fn file(
        &mut self,
        path: &Path,
        first_seq: u64,
        bytes: &[u8],
        newest: bool,
    ) -> Result<(), ChainBreak> {
        let lines: Vec<&[u8]> = bytes.split_inclusive(|b| *b == b'\n').collect();
        for (i, raw) in lines.iter().enumerate() {
            let signed_through = self.report.signed_through;
            let signatures_checked = self.opts.key.is_some();
            let brk = |seq, kind, detail: String| ChainBreak {
                file: path.to_path_buf(),
                line: i + 1,
                seq,
                kind,
                detail,
                signatures_checked,
                signed_through,
            };
            let Some(line) = raw.strip_suffix(b"\n") else {
                // Only the end of the newest file can be a write in
                // progress (or a crash svsd cuts at its next start); a
                // record is acknowledged only once it is complete and
                // fsync'd, so this line holds nothing acknowledged.
                if newest {
                    self.report.warnings.push(format!(
                        "{}:{}: incomplete last line ({} bytes): a write in progress, or a crash svsd cuts at its next start; not counted",
                        path.display(),
                        i + 1,
                        raw.len()
                    ));
                    return Ok(());
                }
                return Err(brk(
                    None,
                    BreakKind::TornTail,
                    "incomplete last line in a file that is not the newest".into(),
                ));
            };
            let Some((body, hash)) = split_line(line) else {
                return Err(brk(
                    None,
                    BreakKind::Malformed,
                    "no trailing hash field".into(),
                ));
            };
            let parsed: Option<Body> = serde_json::from_slice(&body).ok();
            let seq = parsed.as_ref().map(|b| b.seq);
            if sm3(&body) != hash {
                return Err(brk(
                    seq,
                    BreakKind::Tampered,
                    "record does not match its own hash".into(),
                ));
            }
            let Some(b) = parsed else {
                return Err(brk(
                    None,
                    BreakKind::Malformed,
                    "record is not valid JSON of the audit schema".into(),
                ));
            };
            match self.prev {
                None => self
                    .first_record(&b, first_seq, i == 0)
                    .map_err(|(kind, detail)| brk(seq, kind, detail))?,
                Some((pseq, phash)) => {
                    let expected = pseq + 1;
                    if b.seq > expected {
                        // Missing here: deleted, or moved further down?
                        let needle = format!("{{\"seq\":{expected},");
                        let later = lines[i + 1..]
                            .iter()
                            .any(|l| l.starts_with(needle.as_bytes()));
                        let kind = if later {
                            BreakKind::Reordered { expected }
                        } else {
                            BreakKind::Deleted {
                                from: expected,
                                to: b.seq - 1,
                            }
                        };
                        return Err(brk(
                            seq,
                            kind,
                            format!("expected seq {expected}, found {}", b.seq),
                        ));
                    }
                    if b.seq < expected {
                        return Err(brk(
                            seq,
                            BreakKind::Reordered { expected },
                            format!("expected seq {expected}, found {}", b.seq),
                        ));
                    }
                    if b.prev != hex(&phash) {
                        return Err(brk(
                            seq,
                            BreakKind::ChainMismatch,
                            format!("prev does not match the hash of seq {pseq}"),
                        ));
                    }
                }
            }
            // Checked after the chain: records deleted at the start of a
            // file show as Deleted, not as a misnamed file.
            if i == 0 && b.seq != first_seq {
                return Err(brk(
                    seq,
                    BreakKind::BadFileName,
                    format!("file is named for seq {first_seq} but starts at {}", b.seq),
                ));
            }
            let Some(time) = parse_rfc3339(&b.time) else {
                return Err(brk(
                    seq,
                    BreakKind::Malformed,
                    "time is not in the trail's format (YYYY-MM-DDTHH:MM:SS.ffffffZ)".into(),
                ));
            };
            if self.prev.is_none() {
                self.first_time = time;
            } else if time < self.last_time && !self.floored_writer {
                // Written before svsd kept times from going back: a clock
                // stepped back then, not proof of a rewrite.
                self.report.warnings.push(format!(
                    "{}:{} (seq {}): time {} is earlier than seq {}'s {} (a clock stepped back; this stretch predates v2 checkpoints, whose writer prevents it)",
                    path.display(),
                    i + 1,
                    b.seq,
                    b.time,
                    self.report.last_seq,
                    self.report.last_time
                ));
            } else if time < self.last_time {
                return Err(brk(
                    seq,
                    BreakKind::TimeWentBack,
                    format!(
                        "time {} is earlier than seq {}'s {}",
                        b.time, self.report.last_seq, self.report.last_time
                    ),
                ));
            }
            if b.kind == "checkpoint" {
                self.checkpoint(&b, time)
                    .map_err(|d| brk(seq, BreakKind::BadCheckpoint, d))?;
                self.report.checkpoints += 1;
                self.floored_writer |= b.signed_at.is_some();
            }
            self.prev = Some((b.seq, hash));
            self.remember(b.seq, hash);
            self.report.records += 1;
            self.report.last_seq = b.seq;
            self.report.head = hex(&hash);
            self.report.last_time = b.time.into_owned();
            self.last_time = time;
            self.last_line = i + 1;
        }
        Ok(())
    }

    /// The trail's first record: it must be seq 1 with a zero `prev`, or
    /// the officer must have acknowledged the pruning (`from_seq`).
    fn first_record(
        &mut self,
        b: &Body,
        file_seq: u64,
        first_line: bool,
    ) -> Result<(), (BreakKind, String)> {
        if b.seq == 0 {
            return Err((BreakKind::Malformed, "seq 0 does not exist".into()));
        }
        if first_line && b.seq > file_seq {
            // The file's first records are gone (its name says where it began).
            return Err((
                BreakKind::Deleted {
                    from: file_seq,
                    to: b.seq - 1,
                },
                format!("file is named for seq {file_seq} but starts at {}", b.seq),
            ));
        }
        match self.opts.from_seq {
            Some(n) if n != b.seq => {
                return Err((
                    BreakKind::MissingStart { first_seq: b.seq },
                    format!(
                        "--from-seq {n} was given, but the trail starts at seq {}",
                        b.seq
                    ),
                ));
            }
            Some(_) if b.seq > 1 => self.report.pruned = true,
            _ if b.seq == 1 => {
                if b.prev != hex(&GENESIS) {
                    return Err((
                        BreakKind::ChainMismatch,
                        "first record's prev is not zero".into(),
                    ));
                }
            }
            _ => {
                return Err((
                    BreakKind::MissingStart { first_seq: b.seq },
                    format!(
                        "the trail starts at seq {}, not 1: records 1..{} are missing and nothing anchors this record's prev",
                        b.seq,
                        b.seq - 1
                    ),
                ));
            }
        }
        // A checkpoint of the record just before the first one kept can
        // still be checked: its hash is this record's prev.
        if let Some(p) = unhex32(b.prev.as_bytes()) {
            self.remember(b.seq - 1, p);
        }
        self.report.first_seq = b.seq;
        Ok(())
    }

    /// Checks a checkpoint record written at (unsigned) `time`.
    fn checkpoint(&mut self, b: &Body, time: Duration) -> Result<(), String> {
        let (Some(head_seq), Some(head), Some(sig)) = (b.head_seq, &b.head, &b.signature) else {
            return Err("checkpoint lacks head_seq, head or signature".into());
        };
        let head_bytes = unhex32(head.as_bytes()).ok_or("head is not 64 hex digits")?;
        if head_seq >= b.seq {
            return Err("checkpoint names a later record".into());
        }
        // Every head must be checked against the chain: a signature alone
        // says nothing about the records here. Only a head before the
        // first record kept (a pruned trail) cannot be, and is reported.
        let checked = if head_seq >= self.window_first && !self.window.is_empty() {
            let h = self.window[(head_seq - self.window_first) as usize];
            if h != head_bytes {
                return Err(format!("head does not match the hash of seq {head_seq}"));
            }
            true
        } else if head_seq < self.report.first_seq {
            false
        } else {
            return Err(format!(
                "head seq {head_seq} is more than {} records before its checkpoint and cannot be checked",
                self.window_cap
            ));
        };
        // v2 signs its time and interval; v1 (older trails) signs the head
        // only, and its record's time is as unsigned as any record's.
        let text = match (&b.signed_at, b.interval_s) {
            (Some(at), Some(interval_s)) => Some(Checkpoint {
                head_seq,
                head: head_bytes,
                signed_at: at.to_string(),
                interval_s,
            }),
            (None, None) => None,
            _ => return Err("checkpoint has only one of signed_at and interval_s".into()),
        };
        let signed_time = match &text {
            Some(t) => Some(
                parse_rfc3339(&t.signed_at).ok_or("signed_at is not in the trail's time format")?,
            ),
            None => {
                self.report.v1_checkpoints += 1;
                None
            }
        };
        if let Some(key) = self.opts.key {
            let sig = unhex(sig).ok_or("signature is not hex")?;
            let message = match &text {
                Some(t) => t.message(),
                None => checkpoint_message_v1(head_seq, &head_bytes),
            };
            self.verifier
                .verify_message(
                    key.algorithm,
                    key.point,
                    svs_hsm::signature::DEFAULT_SM2_ID,
                    &message,
                    &sig,
                )
                .map_err(|_| {
                    // The head matched the chain: a first checkpoint whose
                    // signature fails is as likely the wrong key given.
                    if self.report.checkpoints == 0 && checked {
                        "checkpoint signature does not verify (the trail's first checkpoint, its head matching the records: if the public key was given by hand, check it is the audit key's)".to_string()
                    } else {
                        "checkpoint signature does not verify".to_string()
                    }
                })?;
            if checked {
                self.report.signed_through = Some(head_seq);
                self.newest_signed = Some((b.seq, time));
                if let (Some(t), Some(at)) = (text, signed_time) {
                    self.report.time_signed_through = Some(head_seq);
                    self.newest_timed = Some((b.seq, at, Duration::from_secs(t.interval_s)));
                    self.report.signed_at = Some(t.signed_at);
                }
            } else {
                self.report.unchecked_heads.push((b.seq, head_seq));
            }
        }
        Ok(())
    }

    /// With a key: the records after the newest verified checkpoint must
    /// not span more than the checkpoint interval allows. svsd signs the
    /// head every interval even when idle, so a longer unsigned tail means
    /// checkpoints were dropped (or never written: an HSM fault).
    ///
    /// Only a time inside a signature (v2) shows how old the newest
    /// checkpoint is: measured from record times, which anyone able to
    /// rewrite the files sets at will, the span can only find clumsy
    /// damage and never prove coverage, and `live_at` refuses it.
    fn coverage(&mut self, newest_file: &Path) -> Result<(), ChainBreak> {
        if self.opts.key.is_none() || self.report.records == 0 {
            return Ok(());
        }
        let after = self.report.signed_through.unwrap_or(0);
        let brk = |detail: String| ChainBreak {
            file: newest_file.to_path_buf(),
            line: self.last_line,
            seq: Some(self.report.last_seq),
            kind: BreakKind::Unsigned { after },
            detail,
            signatures_checked: true,
            signed_through: self.report.signed_through,
        };
        let cp_seq = self.newest_signed.map_or(0, |(s, _)| s);
        // The stricter of the two: a kept checkpoint signed with a longer
        // interval (an older configuration) must not widen the allowance,
        // nor must a configuration edited by whoever edited the files.
        let interval = match (self.newest_timed, self.opts.checkpoint_interval) {
            (Some((_, _, signed)), Some(given)) => {
                if given != signed {
                    self.report.warnings.push(format!(
                        "the newest signed checkpoint says svsd checkpoints every {}s, not the {}s expected (--checkpoint-interval, else svsd's configuration, else its default of 300s): coverage is measured with the shorter",
                        signed.as_secs(),
                        given.as_secs()
                    ));
                }
                Some(signed.min(given))
            }
            (Some((_, _, signed)), None) => Some(signed),
            (None, given) => given,
        };
        self.report.interval = interval;
        let Some(interval) = interval else {
            // Unknown interval: nothing may follow the newest checkpoint.
            if self.report.last_seq > cp_seq {
                return Err(brk(format!(
                    "records after seq {after} are covered by no signed checkpoint"
                )));
            }
            return Ok(());
        };
        let allowed = interval + CHECKPOINT_SLACK;
        // With no checkpoint at all, the uncovered span starts at the first record.
        let (from_seq, from, whose) = match (self.newest_timed, self.newest_signed) {
            (Some((s, t, _)), _) => (s, t, "from the time signed in the newest checkpoint"),
            (None, Some((s, t))) => (
                s,
                t,
                "by the records' own times (unsigned: the checkpoints are v1)",
            ),
            (None, None) => (0, self.first_time, "by the records' own times (unsigned)"),
        };
        let span = self.last_time.saturating_sub(from);
        self.report.uncovered_span = Some(span);
        if self.report.last_seq > from_seq && span > allowed {
            return Err(brk(format!(
                "records after seq {after} are covered by no signed checkpoint: they span {}s {whose}, the checkpoint interval allows {}s",
                span.as_secs(),
                allowed.as_secs()
            )));
        }
        if let Some(now) = self.opts.live_at {
            let now = now.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
            let Some((_, signed, _)) = self.newest_timed else {
                return Err(brk(format!(
                    "svsd is said to be running, but no verified checkpoint signs its time (none is of format v2; svsd signs one at start and every {}s): nothing shows that the newest records are recent, or that later ones were not removed",
                    interval.as_secs()
                )));
            };
            let age = now.saturating_sub(signed);
            self.report.signed_age = Some(age);
            if age > allowed {
                return Err(brk(format!(
                    "svsd is said to be running, but the newest signed checkpoint (covering seq {}) was signed {}s ago and the checkpoint interval allows {}s: later records are missing or unsigned",
                    self.report.time_signed_through.unwrap_or(0),
                    age.as_secs(),
                    allowed.as_secs()
                )));
            }
        }
        Ok(())
    }
}

/// Parses the trail's own time format (`YYYY-MM-DDTHH:MM:SS.ffffffZ`) into
/// time since the epoch.
fn parse_rfc3339(s: &str) -> Option<Duration> {
    let b = s.as_bytes();
    if b.len() != 27 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[26] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss, us) = (num(11..13)?, num(14..16)?, num(17..19)?, num(20..26)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    // Howard Hinnant's days-from-civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    Some(Duration::from_secs(u64::try_from(secs).ok()?) + Duration::from_micros(us as u64))
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One record line as a `String`, for tests that build trails by hand.
    fn render_line(seq: u64, prev: &[u8; 32], entry: &Entry, at: SystemTime) -> (String, [u8; 32]) {
        let mut out = Vec::new();
        let hash = render(seq, prev, entry, &rfc3339(at), &mut out).unwrap();
        (String::from_utf8(out).unwrap(), hash)
    }

    fn config(dir: &Path, max_file_bytes: u64) -> AuditConfig {
        AuditConfig::without_token(dir.to_path_buf(), max_file_bytes)
    }

    fn event(i: usize) -> AuditEvent {
        AuditEvent {
            entity: "app1".into(),
            op: "sign",
            key: Some("demo".into()),
            input_sm3: Some(sm3(format!("message {i}").as_bytes())),
            output_sm3: Some([i as u8; 32]),
            outcome: "ok".into(),
            latency_us: 100,
        }
    }

    #[test]
    fn a_record_line_is_exactly_the_documented_layout() {
        let at = UNIX_EPOCH + Duration::from_micros(1_790_000_000_123_456);
        let (line, hash) = render_line(7, &[0xab; 32], &Entry::Op(event(1)), at);
        let body = format!(
            r#"{{"seq":7,"time":"2026-09-21T14:13:20.123456Z","type":"op","entity":"app1","op":"sign","key":"demo","input_sm3":"{}","output_sm3":"{}","outcome":"ok","latency_us":100,"prev":"{}"}}"#,
            hex(&sm3(b"message 1")),
            "01".repeat(32),
            "ab".repeat(32)
        );
        assert_eq!(hash, sm3(body.as_bytes()));
        let expected = format!(
            "{},\"hash\":\"{}\"}}\n",
            &body[..body.len() - 1],
            hex(&hash)
        );
        assert_eq!(line, expected);
        // What is written reads back as the same record.
        let parsed: Body = serde_json::from_str(&body).unwrap();
        assert_eq!(serde_json::to_string(&parsed).unwrap(), body);
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn write(dir: &Path, n: usize, max_file_bytes: u64) {
        let trail = AuditTrail::open(&config(dir, max_file_bytes), None).unwrap();
        rt().block_on(async {
            let mut tasks = Vec::new();
            let trail = Arc::new(trail);
            for i in 0..n {
                let t = trail.clone();
                tasks.push(tokio::spawn(async move { t.append(vec![event(i)]).await }));
            }
            for t in tasks {
                t.await.unwrap().unwrap();
            }
            trail.close();
        });
    }

    fn only_file(dir: &Path) -> PathBuf {
        let files = trail_files(dir).unwrap();
        assert_eq!(files.len(), 1);
        files[0].1.clone()
    }

    #[test]
    fn time_is_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        let t = UNIX_EPOCH + Duration::from_micros(1_709_251_199_123_456);
        assert_eq!(rfc3339(t), "2024-02-29T23:59:59.123456Z");
    }

    #[test]
    fn a_written_trail_verifies_and_continues_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 50, 1 << 20);
        write(dir.path(), 10, 1 << 20);
        let r = verify_dir(dir.path(), None).unwrap();
        assert_eq!(r.records, 60);
        assert_eq!((r.first_seq, r.last_seq), (1, 60));
        let text = std::fs::read_to_string(only_file(dir.path())).unwrap();
        assert!(text.lines().all(|l| l.starts_with("{\"seq\":")));
        assert!(
            !text.contains("message 1"),
            "inputs never appear, only digests"
        );
    }

    #[test]
    fn rotation_by_size_keeps_one_chain() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 200, 4096);
        let files = trail_files(dir.path()).unwrap();
        assert!(files.len() > 3, "{files:?}");
        let r = verify_dir(dir.path(), None).unwrap();
        assert_eq!((r.records, r.files), (200, files.len()));
    }

    /// An anchor as svsd writes it, for record `seq` of the trail in `dir`
    /// (`hash` instead of the record's, if given).
    fn anchor_at(dir: &Path, seq: u64, hash: Option<[u8; 32]>) -> Checkpoint {
        let files = trail_files(dir).unwrap();
        let real = files.iter().find_map(|(_, p)| record_hash(p, seq));
        Checkpoint {
            head_seq: seq,
            head: hash.or(real).unwrap_or([7; 32]),
            signed_at: "2026-11-27T19:00:00.000000Z".into(),
            interval_s: 300,
        }
    }

    fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut all: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name() != Some(LOCK_NAME.as_ref()))
            .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
            .collect();
        all.sort();
        all
    }

    #[test]
    fn a_trail_behind_its_anchor_or_unlike_it_is_refused_before_a_record_is_written() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 200, 4096);
        let files = trail_files(dir.path()).unwrap();
        assert!(files.len() > 2, "{files:?}");
        // The file holding the last record (an empty newest file aside).
        let newest_first = files.iter().rev().map(|f| f.0).find(|s| *s <= 200).unwrap();
        let cfg = AuditConfig {
            preallocate: false,
            ..config(dir.path(), 4096)
        };
        // The anchor at the end, inside the newest file, or in an older
        // file.
        for anchor in [
            anchor_at(dir.path(), 200, None),
            anchor_at(dir.path(), newest_first, None),
            anchor_at(dir.path(), 2, None),
        ] {
            AuditTrail::open(&cfg, Some(&anchor)).unwrap().close();
        }
        let before = snapshot(dir.path());
        let refused = |anchor: Checkpoint, dir: &Path| {
            let cfg = AuditConfig {
                dir: dir.to_path_buf(),
                ..cfg.clone()
            };
            let e = AuditTrail::open(&cfg, Some(&anchor)).err().unwrap();
            assert!(matches!(e, SvsError::AuditUnavailable(_)), "{e}");
            e.to_string()
        };
        let e = refused(anchor_at(dir.path(), 205, None), dir.path());
        assert!(
            e.contains("ends at seq 200") && e.contains("reached seq 205"),
            "{e}"
        );
        assert!(e.contains("svs-provision audit anchor --reset"), "{e}");
        for anchor in [
            anchor_at(dir.path(), 200, Some([9; 32])),
            anchor_at(dir.path(), newest_first, Some([9; 32])),
            anchor_at(dir.path(), 2, Some([9; 32])),
        ] {
            let e = refused(anchor, dir.path());
            assert!(e.contains("rewritten or replaced"), "{e}");
        }
        assert_eq!(
            snapshot(dir.path()),
            before,
            "a refused start changes nothing"
        );
        // The first file archived away: its records are not compared.
        let archived = tempfile::tempdir().unwrap();
        for (first, path) in &trail_files(dir.path()).unwrap()[1..] {
            std::fs::copy(path, archived.path().join(file_name(*first))).unwrap();
        }
        let cfg_archived = AuditConfig {
            dir: archived.path().to_path_buf(),
            ..cfg.clone()
        };
        AuditTrail::open(
            &cfg_archived,
            Some(&anchor_at(dir.path(), 2, Some([9; 32]))),
        )
        .unwrap()
        .close();
        // An emptied directory (or one holding an older copy).
        let empty = tempfile::tempdir().unwrap();
        let e = refused(anchor_at(dir.path(), 200, None), empty.path());
        assert!(e.contains("ends at seq 0"), "{e}");
        assert_eq!(snapshot(empty.path()), vec![], "no trail file begun");
    }

    #[test]
    fn the_anchor_reads_back_and_the_newest_of_two_counts() {
        let a = Checkpoint::now(7, [3; 32], Duration::from_secs(300), "");
        assert_eq!(Checkpoint::parse_message(&a.message()), Some(a.clone()));
        let b = Checkpoint {
            head_seq: 9,
            ..a.clone()
        };
        assert_eq!(
            anchor_head(&[b.message(), a.message()]),
            Ok(Some(b.clone()))
        );
        assert_eq!(anchor_head(&[a.message(), b.message()]), Ok(Some(b)));
        assert_eq!(anchor_head(&[]), Ok(None));
        let mut extra = a.message();
        extra.extend_from_slice(b"more=1\n");
        for bad in [
            b"".to_vec(),
            b"hello".to_vec(),
            extra,
            checkpoint_message_v1(7, &[3; 32]),
        ] {
            assert!(Checkpoint::parse_message(&bad).is_none(), "{bad:?}");
            assert!(anchor_head(&[a.message(), bad]).is_err());
        }
    }

    fn damaged(edit: impl Fn(&mut Vec<String>)) -> ChainBreak {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 20, 1 << 20);
        let path = only_file(dir.path());
        let mut lines: Vec<String> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        edit(&mut lines);
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        verify_dir(dir.path(), None).unwrap_err()
    }

    #[test]
    fn a_tampered_byte_is_found_at_its_record() {
        let b = damaged(|l| l[7] = l[7].replacen("\"ok\"", "\"ko\"", 1));
        assert_eq!((b.line, b.seq, b.kind), (8, Some(8), BreakKind::Tampered));
        // Tampering inside the hash field itself shows at the same record.
        let b = damaged(|l| {
            let n = l[3].len();
            let c = if l[3].as_bytes()[n - 3] == b'0' {
                "1"
            } else {
                "0"
            };
            l[3].replace_range(n - 3..n - 2, c);
        });
        assert_eq!((b.line, b.kind), (4, BreakKind::Tampered));
    }

    #[test]
    fn a_deleted_record_is_named() {
        let b = damaged(|l| {
            l.remove(5);
        });
        assert_eq!(b.line, 6);
        assert_eq!(b.kind, BreakKind::Deleted { from: 6, to: 6 });
        // The last record deleted: the chain is still consistent; only a
        // checkpoint or the seq known elsewhere can show that.
    }

    #[test]
    fn reordered_records_are_named() {
        let b = damaged(|l| l.swap(9, 10));
        assert_eq!(b.line, 10);
        assert_eq!(b.kind, BreakKind::Reordered { expected: 10 });
    }

    #[test]
    fn a_forged_record_with_its_own_hash_breaks_the_chain() {
        let b = damaged(|l| {
            // Re-render record 12 with different content but a correct self-hash.
            let (line, _) = render_line(12, &[9; 32], &Entry::Op(event(999)), SystemTime::now());
            l[11] = line.trim_end().to_string();
        });
        assert_eq!((b.line, b.kind), (12, BreakKind::ChainMismatch));
    }

    #[test]
    fn a_torn_tail_of_the_newest_file_is_a_warning_and_cut_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 5, 1 << 20);
        let path = only_file(dir.path());
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":6,\"time\":\"2").unwrap();
        drop(f);
        // The live trail: a write in progress, not a break.
        let r = verify_dir(dir.path(), None).unwrap();
        assert_eq!(r.last_seq, 5);
        assert!(r.warnings[0].contains("write in progress"), "{r:?}");
        write(dir.path(), 3, 1 << 20);
        let r = verify_dir(dir.path(), None).unwrap();
        assert_eq!(r.last_seq, 8);
        assert!(r.warnings.is_empty(), "{r:?}");
    }

    /// A trail kept open: the file being written, as a crash would leave it.
    fn open_with(dir: &Path, n: usize, preallocate: bool) -> AuditTrail {
        let trail = AuditTrail::open(
            &AuditConfig {
                preallocate,
                ..config(dir, 1 << 20)
            },
            None,
        )
        .unwrap();
        rt().block_on(async {
            for i in 0..n {
                trail.append(vec![event(i)]).await.unwrap();
            }
        });
        trail
    }

    #[test]
    fn the_file_being_written_is_zero_filled_and_cut_to_its_records_on_close() {
        let dir = tempfile::tempdir().unwrap();
        let trail = open_with(dir.path(), 5, true);
        let path = only_file(dir.path());
        let records = read_trail_file(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
        assert!(
            std::fs::read(&path).unwrap()[records.len()..]
                .iter()
                .all(|b| *b == 0)
        );
        assert_eq!(records.iter().filter(|b| **b == b'\n').count(), 5);
        assert!(records.ends_with(b"\"}\n"));
        // The zeros are not a torn line: a live trail verifies cleanly.
        let r = verify_dir(dir.path(), None).unwrap();
        assert_eq!((r.last_seq, r.warnings.len()), (5, 0), "{r:?}");
        trail.close();
        assert_eq!(std::fs::read(&path).unwrap(), records);
        // Without preallocation the file holds records only, also while open.
        let trail = open_with(dir.path(), 2, false);
        let len = std::fs::metadata(&path).unwrap().len();
        assert_eq!(len, read_trail_file(&path).unwrap().len() as u64);
        drop(trail);
        assert_eq!(verify_dir(dir.path(), None).unwrap().last_seq, 7);
    }

    #[test]
    fn rotation_takes_a_zero_filled_spare_and_cuts_the_retired_file() {
        let dir = tempfile::tempdir().unwrap();
        let size = 16 << 10;
        let trail = AuditTrail::open(&config(dir.path(), size), None).unwrap();
        let spare = dir.path().join(Spare::NAME);
        let mut i = 0;
        for files in 2..5 {
            // The spare's thread needs a moment for 16 KiB; a rotation
            // before it is done would start a plain file.
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(std::fs::metadata(&spare).unwrap().len(), size);
            while trail_files(dir.path()).unwrap().len() < files {
                rt().block_on(trail.append(vec![event(i)])).unwrap();
                i += 1;
            }
            let all = trail_files(dir.path()).unwrap();
            let (newest, retired) = all.split_last().unwrap();
            assert_eq!(std::fs::metadata(&newest.1).unwrap().len(), size);
            for (_, f) in retired {
                let records = read_trail_file(f).unwrap().len() as u64;
                assert!(records >= size, "rotated at its size");
                assert_eq!(std::fs::metadata(f).unwrap().len(), records);
            }
        }
        trail.close();
        assert!(!spare.exists(), "the spare goes with the writer");
        let r = verify_dir(dir.path(), None).unwrap();
        assert_eq!(
            (r.records, r.files, r.warnings.len()),
            (i as u64, 4, 0),
            "{r:?}"
        );
    }

    #[test]
    fn an_empty_newest_file_left_by_a_crash_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 100, 4096);
        // (A clean stop right after a rotation leaves the same.)
        let files: Vec<_> = trail_files(dir.path())
            .unwrap()
            .into_iter()
            .filter(|(_, f)| !read_trail_file(f).unwrap().is_empty())
            .collect();
        let last_seq = verify_dir(dir.path(), None).unwrap().last_seq;
        // The crash: the next file renamed into place, nothing in it yet.
        let next = dir.path().join(file_name(last_seq + 1));
        std::fs::write(&next, vec![0u8; 4096]).unwrap();
        write(dir.path(), 3, 1 << 20);
        let r = verify_dir(dir.path(), None).unwrap();
        assert_eq!((r.last_seq, r.warnings.len()), (last_seq + 3, 0), "{r:?}");
        assert_eq!(trail_files(dir.path()).unwrap(), files, "{r:?}");
    }

    #[test]
    fn a_line_cut_short_in_an_older_file_stays_in_place_for_verify() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 5, 1 << 20);
        let older = only_file(dir.path());
        // Edited while svsd was stopped: the last record cut short, and an
        // empty newest file after it, as a rotation leaves one.
        let mut bytes = std::fs::read(&older).unwrap();
        bytes.truncate(bytes.len() - 20);
        std::fs::write(&older, &bytes).unwrap();
        std::fs::write(dir.path().join(file_name(6)), b"").unwrap();
        let before: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().starts_with("audit-"))
            .collect();
        let _ = AuditTrail::open(&config(dir.path(), 1 << 20), None).map(|t| t.close());
        // Nothing kept aside as a crash's remnant: the damage is where it was.
        assert!(
            std::fs::read(&older).unwrap().starts_with(&bytes),
            "the cut-short line is still in the file"
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !names.iter().any(|n| n.contains(".cut-")),
            "{names:?} (was {before:?})"
        );
        assert!(verify_dir(dir.path(), None).is_err());
    }

    #[test]
    fn a_second_writer_is_refused_while_the_first_holds_the_trail() {
        let dir = tempfile::tempdir().unwrap();
        let first = open_with(dir.path(), 3, true);
        let err = AuditTrail::open(&config(dir.path(), 1 << 20), None).unwrap_err();
        assert!(
            err.to_string().contains("in use by another process"),
            "{err}"
        );
        // The refused open changed nothing: the first writer goes on.
        rt().block_on(first.append(vec![event(3)])).unwrap();
        drop(first);
        write(dir.path(), 2, 1 << 20);
        let r = verify_dir(dir.path(), None).unwrap();
        assert_eq!((r.last_seq, r.warnings.len()), (6, 0), "{r:?}");
    }

    #[test]
    fn zeros_then_data_in_the_newest_file_is_a_write_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let trail = open_with(dir.path(), 4, true);
        let path = only_file(dir.path());
        let end = read_trail_file(&path).unwrap().len() as u64;
        // A reader's copy while a group is written: its second page has
        // reached the page cache, its first not yet.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"\"outcome\":\"ok\"}\n", (end / 4096 + 1) * 4096)
            .unwrap();
        let r = verify_dir(dir.path(), None).unwrap();
        assert_eq!(r.last_seq, 4, "{r:?}");
        assert!(
            r.warnings[0].contains("data after zero-filled space"),
            "{r:?}"
        );
        assert_eq!(read_trail_file(&path).unwrap().len() as u64, end);
        drop(trail);
    }

    #[test]
    fn an_empty_newest_file_after_a_gap_is_refused_not_removed() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 5, 1 << 20);
        // Records 6..=9 removed with the file that held them.
        let empty = dir.path().join(file_name(10));
        std::fs::write(&empty, b"").unwrap();
        let err = AuditTrail::open(&config(dir.path(), 1 << 20), None).unwrap_err();
        assert!(err.to_string().contains("records are missing"), "{err}");
        assert!(empty.exists());
    }

    #[test]
    fn an_empty_newest_file_alone_does_not_restart_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 5, 1 << 20);
        // A rotation began file 6 and crashed; file 1 was archived since.
        let first = only_file(dir.path());
        let archived = std::fs::read(&first).unwrap();
        std::fs::remove_file(&first).unwrap();
        let empty = dir.path().join(file_name(6));
        std::fs::write(&empty, b"").unwrap();
        let err = AuditTrail::open(&config(dir.path(), 1 << 20), None).unwrap_err();
        assert!(err.to_string().contains("seq 5"), "{err}");
        assert!(empty.exists());
        assert!(!first.exists(), "no new file 1 made");
        // With the archived file back, the chain goes on from seq 5.
        std::fs::write(&first, archived).unwrap();
        write(dir.path(), 2, 1 << 20);
        let r = verify_dir(dir.path(), None).unwrap();
        assert_eq!((r.first_seq, r.last_seq), (1, 7), "{r:?}");
    }

    #[test]
    fn a_crash_in_zero_filled_space_is_cut_and_the_chain_continues() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 5, 1 << 20);
        let path = only_file(dir.path());
        let end = std::fs::metadata(&path).unwrap().len();
        // What a crash leaves: the zero-filled file, not cut at a stop,
        // with a torn record in the zeros.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(b"{\"seq\":6,\"time\":\"2", end).unwrap();
        let r = verify_dir(dir.path(), None).unwrap();
        assert!(r.warnings[0].contains("write in progress"), "{r:?}");
        write(dir.path(), 3, 1 << 20);
        let r = verify_dir(dir.path(), None).unwrap();
        assert_eq!((r.last_seq, r.warnings.len()), (8, 0), "{r:?}");
        // Only the torn record is kept aside, not the zeros after it.
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains(".cut-"))
            .collect();
        assert_eq!(aside.len(), 1);
        assert_eq!(
            std::fs::read(&aside[0]).unwrap(),
            b"{\"seq\":6,\"time\":\"2"
        );
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            read_trail_file(&path).unwrap().len() as u64
        );
    }

    #[test]
    fn a_torn_line_in_an_older_file_is_a_break() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 100, 4096);
        let files = trail_files(dir.path()).unwrap();
        let path = &files[0].1;
        let mut bytes = std::fs::read(path).unwrap();
        bytes.truncate(bytes.len() - 10);
        std::fs::write(path, bytes).unwrap();
        assert_eq!(
            verify_dir(dir.path(), None).unwrap_err().kind,
            BreakKind::TornTail
        );
    }

    #[test]
    fn records_deleted_at_the_start_of_a_file_are_named() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 100, 4096);
        let files = trail_files(dir.path()).unwrap();
        let cut = |path: &Path, n: usize| {
            let text = std::fs::read_to_string(path).unwrap();
            let rest: Vec<&str> = text.lines().skip(n).collect();
            std::fs::write(path, rest.join("\n") + "\n").unwrap();
        };
        let second = files[1].0;
        cut(&files[1].1, 2);
        let b = verify_dir(dir.path(), None).unwrap_err();
        assert_eq!(
            (b.kind, b.line),
            (
                BreakKind::Deleted {
                    from: second,
                    to: second + 1
                },
                1
            )
        );
        // The same at the very first file.
        cut(&files[0].1, 3);
        let b = verify_dir(dir.path(), None).unwrap_err();
        assert_eq!(b.kind, BreakKind::Deleted { from: 1, to: 3 });
    }

    #[test]
    fn a_trail_not_starting_at_seq_1_is_refused_unless_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 100, 4096);
        let files = trail_files(dir.path()).unwrap();
        std::fs::remove_file(&files[0].1).unwrap();
        let first = files[1].0;
        let b = verify_dir(dir.path(), None).unwrap_err();
        assert_eq!(b.kind, BreakKind::MissingStart { first_seq: first });
        assert!(b.detail.contains("not 1"), "{b}");
        let with = |from_seq| {
            verify_dir_with(
                dir.path(),
                &VerifyOptions {
                    from_seq: Some(from_seq),
                    ..Default::default()
                },
            )
        };
        let r = with(first).unwrap();
        assert!(r.pruned);
        assert_eq!((r.first_seq, r.last_seq), (first, 100));
        assert_eq!(
            with(first - 1).unwrap_err().kind,
            BreakKind::MissingStart { first_seq: first }
        );
    }

    /// Builds trails with chosen times and checkpoints signed by a test key.
    struct Forge {
        seq: u64,
        head: [u8; 32],
        lines: Vec<String>,
        signer: ForgeSigner,
        t0: SystemTime,
    }

    enum ForgeSigner {
        Sm2(sm2::dsa::SigningKey),
        P256(p256::ecdsa::SigningKey),
    }

    impl Forge {
        fn new() -> (Forge, Vec<u8>) {
            let sk = sm2::SecretKey::from_slice(&[5u8; 32]).unwrap();
            let point = sk.public_key().to_sec1_bytes().to_vec();
            let signer = sm2::dsa::SigningKey::new("1234567812345678", &sk).unwrap();
            (Forge::with(ForgeSigner::Sm2(signer)), point)
        }
        fn new_p256() -> (Forge, Vec<u8>) {
            let sk = p256::ecdsa::SigningKey::from_slice(&[5u8; 32]).unwrap();
            let point = sk.verifying_key().to_sec1_point(false).as_bytes().to_vec();
            (Forge::with(ForgeSigner::P256(sk)), point)
        }
        fn with(signer: ForgeSigner) -> Forge {
            Forge {
                seq: 0,
                head: GENESIS,
                lines: Vec::new(),
                signer,
                t0: UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            }
        }
        fn push(&mut self, entry: &Entry, at_s: u64) {
            self.seq += 1;
            let (line, hash) = render_line(
                self.seq,
                &self.head,
                entry,
                self.t0 + Duration::from_secs(at_s),
            );
            self.lines.push(line);
            self.head = hash;
        }
        fn ops(&mut self, n: usize, at_s: u64) {
            for i in 0..n {
                self.push(&Entry::Op(event(i)), at_s);
            }
        }
        fn sign(&self, message: &[u8]) -> Vec<u8> {
            use sm2::dsa::signature::Signer;
            let raw: [u8; 64] = match &self.signer {
                ForgeSigner::Sm2(k) => {
                    let sig: sm2::dsa::Signature = k.sign(message);
                    sig.to_bytes().as_slice().try_into().unwrap()
                }
                ForgeSigner::P256(k) => {
                    let sig: p256::ecdsa::Signature = k.sign(message);
                    sig.to_bytes().as_slice().try_into().unwrap()
                }
            };
            svs_hsm::signature::raw_to_der(&raw)
        }
        /// A v2 checkpoint of the head, signed at `at_s` by an svsd with a
        /// 300 s interval.
        fn checkpoint(&mut self, at_s: u64) {
            let (seq, head) = (self.seq, self.head);
            self.checkpoint_of(seq, head, at_s);
        }
        fn checkpoint_of(&mut self, head_seq: u64, head: [u8; 32], at_s: u64) {
            let text = Checkpoint {
                head_seq,
                head,
                signed_at: rfc3339(self.t0 + Duration::from_secs(at_s)),
                interval_s: 300,
            };
            let signature = self.sign(&text.message());
            self.push(
                &Entry::Checkpoint {
                    text,
                    key: "svs-audit".into(),
                    signature,
                },
                at_s,
            );
        }
        /// A checkpoint of the head as svsd wrote them before v2.
        fn checkpoint_v1(&mut self, at_s: u64) {
            let (head_seq, head) = (self.seq, self.head);
            let signature = hex(&self.sign(&checkpoint_message_v1(head_seq, &head)));
            self.seq += 1;
            let time = rfc3339(self.t0 + Duration::from_secs(at_s));
            let prev = hex(&self.head);
            let head_hex = hex(&head);
            let body = Body {
                seq: self.seq,
                time: time.into(),
                kind: "checkpoint".into(),
                entity: None,
                op: None,
                key: Some("svs-audit".into()),
                input_sm3: None,
                output_sm3: None,
                outcome: None,
                latency_us: None,
                head_seq: Some(head_seq),
                head: Some(head_hex.into()),
                signed_at: None,
                interval_s: None,
                signature: Some(signature.into()),
                detail: None,
                prev: prev.into(),
            };
            let mut out = Vec::new();
            self.head = write_body(&body, &mut out).unwrap();
            self.lines.push(String::from_utf8(out).unwrap());
        }
        fn write(&self, dir: &Path, first_seq: u64) {
            let from = (first_seq - 1) as usize;
            std::fs::write(dir.join(file_name(first_seq)), self.lines[from..].concat()).unwrap();
        }
    }

    fn keyed(point: &[u8], interval_s: u64) -> VerifyOptions<'_> {
        VerifyOptions {
            key: Some(CheckpointKey::sm2(point)),
            checkpoint_interval: Some(Duration::from_secs(interval_s)),
            ..Default::default()
        }
    }

    #[test]
    fn p256_checkpoints_verify_with_the_key_s_own_algorithm() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, point) = Forge::new_p256();
        f.ops(10, 0);
        f.checkpoint(1);
        f.ops(5, 100);
        f.checkpoint(101);
        f.write(dir.path(), 1);
        let key = |algorithm| VerifyOptions {
            key: Some(CheckpointKey {
                algorithm,
                point: &point,
            }),
            checkpoint_interval: Some(Duration::from_secs(300)),
            ..Default::default()
        };
        let r = verify_dir_with(dir.path(), &key(svs_hsm::Algorithm::EcdsaP256)).unwrap();
        assert_eq!((r.checkpoints, r.signed_through), (2, Some(16)), "{r:?}");
        // Taken for an SM2 key, the same signatures do not verify.
        let b = verify_dir_with(dir.path(), &key(svs_hsm::Algorithm::Sm2)).unwrap_err();
        assert_eq!((b.seq, &b.kind), (Some(11), &BreakKind::BadCheckpoint));
        // The first checkpoint failing says the key may be the wrong one.
        assert!(b.detail.contains("check it is the audit key's"), "{b:?}");
    }

    #[test]
    fn an_honest_trail_is_covered_by_its_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, point) = Forge::new();
        for k in 0..5 {
            f.ops(10, k * 300);
            f.checkpoint(k * 300 + 1);
        }
        // Idle for a while, then stopped: svsd still signed every interval.
        f.checkpoint(1500);
        f.checkpoint(1800);
        f.push(
            &Entry::Note {
                kind: "stop",
                detail: "svsd stopped".into(),
            },
            1900,
        );
        f.write(dir.path(), 1);
        let r = verify_dir_with(dir.path(), &keyed(&point, 300)).unwrap();
        assert_eq!(r.checkpoints, 7);
        assert_eq!(r.signed_through, Some(56));
        assert!(r.signed_at.is_some());
    }

    #[test]
    fn a_rewritten_tail_with_its_checkpoints_dropped_is_refused_with_the_key() {
        let (mut f, point) = Forge::new();
        f.ops(10, 0);
        f.checkpoint(1);
        // From here on the attacker rewrote everything and recomputed the
        // chain; later checkpoints could not be forged, so none are left.
        f.ops(20, 100);
        f.ops(20, 5000);
        let dir = tempfile::tempdir().unwrap();
        f.write(dir.path(), 1);
        let b = verify_dir_with(dir.path(), &keyed(&point, 300)).unwrap_err();
        assert_eq!(b.kind, BreakKind::Unsigned { after: 10 });
        assert!(b.detail.contains("covered by no signed checkpoint"), "{b}");
        assert_eq!(b.seq, Some(51));
        // With an unknown interval nothing may follow the newest checkpoint.
        let opts = VerifyOptions {
            key: Some(CheckpointKey::sm2(&point)),
            ..Default::default()
        };
        assert_eq!(
            verify_dir_with(dir.path(), &opts).unwrap_err().kind,
            BreakKind::Unsigned { after: 10 }
        );
        // A trail without any checkpoint at all, older than an interval.
        let (mut g, _) = Forge::new();
        g.ops(5, 0);
        g.ops(5, 1000);
        let dir = tempfile::tempdir().unwrap();
        g.write(dir.path(), 1);
        assert_eq!(
            verify_dir_with(dir.path(), &keyed(&point, 300))
                .unwrap_err()
                .kind,
            BreakKind::Unsigned { after: 0 }
        );
        // Without the key only the chain is checked, and it holds.
        assert!(verify_dir(dir.path(), None).is_ok());
    }

    #[test]
    fn a_cut_tail_shows_against_the_clock_when_svsd_is_running() {
        let (mut f, point) = Forge::new();
        f.ops(10, 0);
        f.checkpoint(1);
        f.ops(2, 10);
        let dir = tempfile::tempdir().unwrap();
        f.write(dir.path(), 1);
        let mut opts = keyed(&point, 300);
        assert!(verify_dir_with(dir.path(), &opts).is_ok());
        opts.live_at = Some(f.t0 + Duration::from_secs(200));
        assert!(verify_dir_with(dir.path(), &opts).is_ok());
        opts.live_at = Some(f.t0 + Duration::from_secs(3600));
        let b = verify_dir_with(dir.path(), &opts).unwrap_err();
        assert_eq!(b.kind, BreakKind::Unsigned { after: 10 });
    }

    #[test]
    fn checkpoint_heads_must_be_checked_against_the_chain() {
        let (mut f, point) = Forge::new();
        f.ops(10, 0);
        let h5 = {
            let l = &f.lines[4];
            unhex32(&l.as_bytes()[l.len() - 67..l.len() - 3]).unwrap()
        };
        // Head 5, signed, but 6 records later: outside a window of 4.
        f.checkpoint_of(5, h5, 1);
        let dir = tempfile::tempdir().unwrap();
        f.write(dir.path(), 1);
        let files = trail_files(dir.path()).unwrap();
        let opts = keyed(&point, 300);
        let b = verify_files(&files, &opts, 4).unwrap_err();
        assert_eq!((&b.kind, b.seq), (&BreakKind::BadCheckpoint, Some(11)));
        assert!(b.detail.contains("cannot be checked"), "{b}");
        assert_eq!(
            verify_files(&files, &opts, 16).unwrap().signed_through,
            Some(5)
        );
        // A wrong head inside the window.
        let (mut g, _) = Forge::new();
        g.ops(3, 0);
        g.checkpoint_of(2, [7; 32], 1);
        let dir = tempfile::tempdir().unwrap();
        g.write(dir.path(), 1);
        let b = verify_dir_with(dir.path(), &opts).unwrap_err();
        assert_eq!(b.kind, BreakKind::BadCheckpoint);
    }

    #[test]
    fn a_pruned_trail_reports_checkpoints_it_cannot_check() {
        let (mut f, point) = Forge::new();
        f.ops(10, 0);
        f.checkpoint(1); // seq 11, head 10
        f.ops(5, 2);
        f.checkpoint_of(3, [1; 32], 3); // seq 17: head before the pruned start
        f.checkpoint(4); // seq 18, head 17
        let dir = tempfile::tempdir().unwrap();
        f.write(dir.path(), 10);
        let mut opts = keyed(&point, 300);
        opts.from_seq = Some(10);
        let r = verify_dir_with(dir.path(), &opts).unwrap();
        assert_eq!(r.unchecked_heads, vec![(17, 3)]);
        assert_eq!(r.signed_through, Some(17));
        // Head 9 lies just before the first record kept: checked via its prev.
        let (mut g, _) = Forge::new();
        g.ops(10, 0);
        let h9 = {
            let l = &g.lines[8];
            unhex32(&l.as_bytes()[l.len() - 67..l.len() - 3]).unwrap()
        };
        g.checkpoint_of(9, h9, 1);
        let dir = tempfile::tempdir().unwrap();
        g.write(dir.path(), 10);
        let r = verify_dir_with(dir.path(), &opts).unwrap();
        assert_eq!(r.signed_through, Some(9));
        assert!(r.unchecked_heads.is_empty());
    }

    /// What someone with write access but no key can do: edit the records,
    /// then renumber them and recompute the chain.
    fn rechain(lines: &[String], edit: impl FnOnce(&mut Vec<Body<'static>>)) -> String {
        let mut bodies: Vec<Body<'static>> = lines
            .iter()
            .map(|l| {
                let (body, _) = split_line(l.trim_end().as_bytes()).unwrap();
                serde_json::from_slice(&body).unwrap()
            })
            .collect();
        edit(&mut bodies);
        let (mut prev, mut out) = (GENESIS, Vec::new());
        for (n, b) in bodies.iter_mut().enumerate() {
            b.seq = n as u64 + 1;
            b.prev = hex(&prev).into();
            prev = write_body(b, &mut out).unwrap();
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_rechained_trail_with_fresh_times_fails_against_the_signed_time() {
        let (mut f, point) = Forge::new();
        for k in 0..10 {
            f.ops(10, k * 300);
            f.checkpoint(k * 300 + 1); // seq 11, 22, …, 110
        }
        let t0 = f.t0;
        let now = t0 + Duration::from_secs(3000);
        // The review's attack: ten acknowledged records deleted, every
        // checkpoint but the first dropped, every record from that one on
        // dated now, the chain recomputed.
        let attack = |move_signed_time: bool| {
            rechain(&f.lines, |b| {
                b.retain(|r| !(30..40).contains(&r.seq));
                b.retain(|r| r.kind != "checkpoint" || r.seq == 11);
                for r in b.iter_mut().filter(|r| r.seq >= 11) {
                    r.time = rfc3339(now).into();
                    if move_signed_time && r.signed_at.is_some() {
                        r.signed_at = Some(rfc3339(now).into());
                    }
                }
            })
        };
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(file_name(1)), attack(false)).unwrap();
        let mut opts = keyed(&point, 300);
        opts.live_at = Some(now + Duration::from_secs(10));
        let b = verify_dir_with(dir.path(), &opts).unwrap_err();
        assert_eq!(b.kind, BreakKind::Unsigned { after: 10 }, "{b}");
        assert!(b.detail.contains("span 2999s from the time signed"), "{b}");
        // The span is measured from the signed time, offline too; live, the
        // signed time is compared with the clock.
        let mut f2 = Forge::new().0;
        f2.ops(10, 0);
        f2.checkpoint(1);
        f2.ops(5, 200);
        std::fs::write(
            dir.path().join(file_name(1)),
            rechain(&f2.lines, |b| {
                for r in b.iter_mut().filter(|r| r.seq >= 11) {
                    r.time = rfc3339(now).into();
                }
            }),
        )
        .unwrap();
        opts.live_at = None;
        let b = verify_dir_with(dir.path(), &opts).unwrap_err();
        assert!(b.detail.contains("span 2999s from the time signed"), "{b}");
        // Records dated close to the signed time pass offline (a cut tail
        // cannot be told from the trail alone), never live.
        std::fs::write(
            dir.path().join(file_name(1)),
            rechain(&f2.lines, |b| {
                for r in b.iter_mut().filter(|r| r.seq >= 11) {
                    r.time = rfc3339(t0 + Duration::from_secs(2)).into();
                }
            }),
        )
        .unwrap();
        let r = verify_dir_with(dir.path(), &opts).unwrap();
        assert_eq!(r.signed_at.as_deref(), Some("2027-01-15T08:00:01.000000Z"));
        assert_eq!(r.uncovered_span, Some(Duration::from_secs(1)));
        opts.live_at = Some(now);
        let b = verify_dir_with(dir.path(), &opts).unwrap_err();
        assert!(b.detail.contains("was signed 2999s ago"), "{b}");
        // Moving the signed time along breaks the checkpoint's signature.
        std::fs::write(dir.path().join(file_name(1)), attack(true)).unwrap();
        let b = verify_dir_with(dir.path(), &opts).unwrap_err();
        assert_eq!((b.kind, b.seq), (BreakKind::BadCheckpoint, Some(11)));
    }

    #[test]
    fn v1_checkpoints_verify_but_their_times_prove_nothing() {
        let (mut f, point) = Forge::new();
        f.ops(10, 0);
        f.checkpoint_v1(1);
        f.ops(5, 100);
        f.checkpoint_v1(101);
        f.ops(2, 150);
        let dir = tempfile::tempdir().unwrap();
        f.write(dir.path(), 1);
        let mut opts = keyed(&point, 300);
        let r = verify_dir_with(dir.path(), &opts).unwrap();
        assert_eq!((r.signed_through, r.v1_checkpoints), (Some(16), 2));
        assert_eq!((r.signed_at, r.time_signed_through), (None, None));
        assert_eq!(r.uncovered_span, Some(Duration::from_secs(49)));
        // Unsigned times still show clumsy damage.
        let mut g = Forge::new().0;
        g.ops(3, 0);
        g.checkpoint_v1(1);
        g.ops(3, 5000);
        let other = tempfile::tempdir().unwrap();
        g.write(other.path(), 1);
        let b = verify_dir_with(other.path(), &opts).unwrap_err();
        assert!(b.detail.contains("unsigned: the checkpoints are v1"), "{b}");
        // Live needs a signed time, whatever the records say.
        opts.live_at = Some(f.t0 + Duration::from_secs(160));
        let b = verify_dir_with(dir.path(), &opts).unwrap_err();
        assert_eq!(b.kind, BreakKind::Unsigned { after: 16 });
        assert!(
            b.detail.contains("no verified checkpoint signs its time"),
            "{b}"
        );
        // An upgraded svsd's first checkpoint signs its time.
        f.checkpoint(155);
        f.write(dir.path(), 1);
        let r = verify_dir_with(dir.path(), &opts).unwrap();
        assert_eq!(
            (r.signed_through, r.time_signed_through),
            (Some(19), Some(19))
        );
        assert_eq!(r.signed_age, Some(Duration::from_secs(5)));
    }

    #[test]
    fn coverage_is_measured_with_the_shorter_of_the_signed_and_given_interval() {
        let (mut f, point) = Forge::new();
        f.ops(10, 0);
        f.checkpoint(1); // signs interval_s = 300
        f.ops(2, 200);
        let dir = tempfile::tempdir().unwrap();
        f.write(dir.path(), 1);
        let r = verify_dir_with(dir.path(), &keyed(&point, 3000)).unwrap();
        assert_eq!(r.interval, Some(Duration::from_secs(300)));
        assert!(r.warnings[0].contains("not the 3000s expected"), "{r:?}");
        let b = verify_dir_with(dir.path(), &keyed(&point, 30)).unwrap_err();
        assert_eq!(b.kind, BreakKind::Unsigned { after: 10 });
        // An unknown interval given: the signed one applies.
        let opts = VerifyOptions {
            key: Some(CheckpointKey::sm2(&point)),
            ..Default::default()
        };
        assert!(verify_dir_with(dir.path(), &opts).is_ok());
    }

    #[test]
    fn a_record_older_than_its_predecessor_is_reported() {
        // After a v2 checkpoint (seq 5), whose writer never goes back.
        let mut f = Forge::new().0;
        f.ops(4, 100);
        f.checkpoint(100);
        f.ops(1, 50);
        f.ops(2, 100);
        let dir = tempfile::tempdir().unwrap();
        f.write(dir.path(), 1);
        let b = verify_dir(dir.path(), None).unwrap_err();
        assert_eq!(
            (&b.kind, b.seq, b.line),
            (&BreakKind::TimeWentBack, Some(6), 6)
        );
        assert!(b.detail.contains("earlier than seq 5's"), "{b}");
        // Before any: an older svsd wrote the clock as it was, so an
        // honest trail from then may step back; a warning, not a break.
        let mut old = Forge::new().0;
        old.ops(5, 100);
        old.ops(1, 50);
        old.ops(2, 100);
        old.write(dir.path(), 1);
        let r = verify_dir(dir.path(), None).unwrap();
        assert_eq!(r.last_seq, 8);
        assert!(
            r.warnings
                .iter()
                .any(|w| w.contains("(seq 6)") && w.contains("predates v2")),
            "{r:?}"
        );
        let mut g = Forge::new().0;
        g.ops(3, 0);
        std::fs::write(
            dir.path().join(file_name(1)),
            rechain(&g.lines, |b| b[1].time = "yesterday".into()),
        )
        .unwrap();
        let b = verify_dir(dir.path(), None).unwrap_err();
        assert_eq!((b.kind, b.seq), (BreakKind::Malformed, Some(2)));
    }

    #[test]
    fn records_keep_the_last_time_while_the_clock_is_behind_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = Forge::new().0;
        let ahead = 400 * 86_400 * 365;
        f.ops(3, ahead);
        f.write(dir.path(), 1);
        write(dir.path(), 2, 1 << 20);
        let r = verify_dir(dir.path(), None).unwrap();
        assert_eq!(r.last_seq, 5);
        assert_eq!(
            r.last_time,
            rfc3339(f.t0 + Duration::from_secs(ahead)),
            "{r:?}"
        );
    }

    #[test]
    fn a_checkpoint_is_never_dated_before_the_records_it_covers() {
        let future = rfc3339(SystemTime::now() + Duration::from_secs(86_400));
        let c = Checkpoint::now(5, GENESIS, Duration::from_secs(60), &future);
        assert_eq!(c.signed_at, future);
        let past = rfc3339(SystemTime::now() - Duration::from_secs(86_400));
        let c = Checkpoint::now(5, GENESIS, Duration::from_secs(60), &past);
        assert!(c.signed_at > past && c.signed_at < future, "{c:?}");
        // Through the writer: after records made while the clock is behind,
        // the head carries their time for the checkpoint to start from.
        let dir = tempfile::tempdir().unwrap();
        let mut f = Forge::new().0;
        let ahead = 400 * 86_400 * 365;
        f.ops(3, ahead);
        f.write(dir.path(), 1);
        let trail = AuditTrail::open(&config(dir.path(), 1 << 20), None).unwrap();
        rt().block_on(async {
            trail.append(vec![event(4)]).await.unwrap();
            let (seq, _, last) = trail.head().await.unwrap();
            assert_eq!((seq, last), (4, rfc3339(f.t0 + Duration::from_secs(ahead))));
        });
    }

    #[test]
    fn a_break_says_which_records_a_verified_checkpoint_proves() {
        let (mut f, point) = Forge::new();
        for k in 0..3 {
            f.ops(10, k * 300);
            f.checkpoint(k * 300 + 1); // seq 11 (head 10), 22 (21), 33 (32)
        }
        // Seq 25 altered and the chain recomputed: only the checkpoint
        // after it notices, and only what the one before it signed holds.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(file_name(1)),
            rechain(&f.lines, |b| b[24].latency_us = Some(1)),
        )
        .unwrap();
        let b = verify_dir_with(dir.path(), &keyed(&point, 300)).unwrap_err();
        assert_eq!((b.kind, b.seq), (BreakKind::BadCheckpoint, Some(33)));
        assert_eq!((b.signatures_checked, b.signed_through), (true, Some(21)));
        let b = verify_dir(dir.path(), None).unwrap_err();
        assert_eq!((b.signatures_checked, b.signed_through), (false, None));
    }

    #[test]
    fn time_parses_back() {
        let t = UNIX_EPOCH + Duration::from_micros(1_709_251_199_123_456);
        assert_eq!(
            parse_rfc3339(&rfc3339(t)),
            Some(Duration::from_micros(1_709_251_199_123_456))
        );
        assert_eq!(parse_rfc3339("2024-02-29T23:59:59Z"), None);
    }

    /// A newest file as the writer leaves it: one commit per entry of
    /// `groups` (that many op records, or a checkpoint for 0), each commit
    /// with a time of its own. Returns the bytes and each line's start.
    fn commits(groups: &[usize]) -> (Vec<u8>, Vec<usize>) {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let (mut seq, mut head, mut bytes, mut starts) = (0, GENESIS, Vec::new(), Vec::new());
        for (g, n) in groups.iter().enumerate() {
            let time = rfc3339(t0 + Duration::from_millis(g as u64 + 1));
            let entries: Vec<Entry> = if *n == 0 {
                vec![Entry::Checkpoint {
                    text: Checkpoint {
                        head_seq: seq,
                        head,
                        signed_at: time.clone(),
                        interval_s: 60,
                    },
                    key: "svs-audit".into(),
                    signature: vec![0x30; 70],
                }]
            } else {
                (0..*n).map(|i| Entry::Op(event(i))).collect()
            };
            for e in &entries {
                seq += 1;
                starts.push(bytes.len());
                head = render(seq, &head, e, &time, &mut bytes).unwrap();
            }
        }
        starts.push(bytes.len());
        (bytes, starts)
    }

    /// The line holding byte `at`.
    fn line_at(starts: &[usize], at: usize) -> usize {
        starts.iter().rposition(|s| *s <= at).unwrap()
    }

    fn zero(bytes: &mut [u8], r: std::ops::Range<usize>) {
        bytes[r].fill(0);
    }

    fn sector_after(at: usize) -> usize {
        (at / SECTOR + 1) * SECTOR
    }

    #[test]
    fn crash_cut_cuts_what_a_crash_leaves_of_the_last_commit() {
        let (clean, starts) = commits(&[3, 4, 8]);
        let last_group = starts[7];
        assert_eq!(crash_cut(&clean, 1), Cut::Nothing);
        // A sector in the middle of the last commit never reached the disk.
        let mut b = clean.clone();
        let s = sector_after(last_group + 200);
        zero(&mut b, s..s + SECTOR);
        assert!(s + SECTOR < clean.len() - 400, "complete records follow");
        assert_eq!(crash_cut(&b, 1), Cut::At(starts[line_at(&starts, s)]));
        // Its first sector did not: zeros from where the commit began.
        let mut b = clean.clone();
        zero(&mut b, last_group..sector_after(last_group));
        assert_eq!(crash_cut(&b, 1), Cut::At(last_group));
        // Its end did not (zero-filled space after a line cut short).
        let s = sector_after(last_group + 600);
        assert_eq!(
            crash_cut(&clean[..s], 1),
            Cut::At(starts[line_at(&starts, s)])
        );
        // Appended, not preallocated: the file ends inside a line.
        assert_eq!(crash_cut(&clean[..last_group + 77], 1), Cut::At(last_group));
        // Several holes, all in the last commit.
        let mut b = clean.clone();
        let s = sector_after(last_group);
        zero(&mut b, last_group..s);
        zero(&mut b, s + SECTOR..s + 2 * SECTOR);
        assert_eq!(crash_cut(&b, 1), Cut::At(last_group));
    }

    #[test]
    fn a_crash_after_earlier_evidence_is_still_cut_and_the_evidence_kept() {
        // Line 2 altered (svsd raised its ALARM at a start and went on),
        // then a crash in the last commit: a middle sector unwritten, or the
        // file ending inside a line.
        let (clean, starts) = commits(&[3, 4, 8]);
        let last_group = starts[7];
        let mut b = clean.clone();
        let d = starts[2] - 4;
        b[d] = if b[d] == b'0' { b'1' } else { b'0' };
        let altered = b.clone();
        let s = sector_after(last_group + 200);
        zero(&mut b, s..s + SECTOR);
        match crash_cut(&b, 1) {
            Cut::Evidence(why, Some(at)) => {
                assert!(why.starts_with("line 2:"), "{why}");
                assert_eq!(at, starts[line_at(&starts, s)]);
            }
            other => panic!("{other:?}"),
        }
        match crash_cut(&altered[..last_group + 77], 1) {
            Cut::Evidence(_, Some(at)) => assert_eq!(at, last_group),
            other => panic!("{other:?}"),
        }
        // No crash: the evidence alone, nothing cut.
        assert!(matches!(crash_cut(&altered, 1), Cut::Evidence(_, None)));
        // A hole in an acknowledged commit before a later one is never a
        // crash remnant, evidence before it or not.
        let mut b = altered.clone();
        let s = sector_after(starts[3] + 10);
        assert!(
            s + SECTOR < last_group,
            "the hole lies before the last commit"
        );
        zero(&mut b, s..s + SECTOR);
        assert!(matches!(crash_cut(&b, 1), Cut::Evidence(_, None)));
    }

    #[test]
    fn crash_cut_keeps_tampering_as_evidence() {
        let (clean, starts) = commits(&[2, 2, 0, 1]);
        let evidence = |b: &[u8]| match crash_cut(b, 1) {
            Cut::Evidence(why, None) => why,
            other => panic!("{other:?}"),
        };
        let line3 = starts[2]..starts[3];
        // One hex digit of line 3's hash field.
        let mut b = clean.clone();
        let d = line3.end - 4;
        b[d] = if b[d] == b'0' { b'1' } else { b'0' };
        assert!(evidence(&b).starts_with("line 3:"));
        // A broken quote: line 3 is no longer JSON.
        let mut b = clean.clone();
        b[line3.start + 1] = b'x';
        assert!(evidence(&b).contains("line 3"));
        // A single NUL byte in line 3.
        let mut b = clean.clone();
        b[line3.start + 30] = 0;
        assert!(evidence(&b).contains("not unwritten sectors"));
        // Whole sectors zeroed in an acknowledged commit, with a signed
        // checkpoint and a later commit after them.
        let mut b = clean.clone();
        let s = sector_after(starts[1]);
        assert!(
            s + SECTOR < starts[4],
            "the hole ends before the checkpoint"
        );
        zero(&mut b, s..s + SECTOR);
        assert!(evidence(&b).contains("committed separately"), "{b:?}");
        // Zeros from inside a record to a sector's end, then only the next
        // commit (a checkpoint): the damaged line's own time names the
        // earlier, acknowledged commit.
        let (clean, starts, hole) = (1..12)
            .map(|n| commits(&[2, n, 0]))
            .find_map(|(c, st)| {
                let line = st[st.len() - 4]..st[st.len() - 3];
                let s = sector_after(line.start + 50);
                let hole = s..s + SECTOR;
                (hole.start < line.end && hole.end < st[st.len() - 2]).then_some((c, st, hole))
            })
            .unwrap();
        let mut b = clean.clone();
        zero(&mut b, hole.clone());
        assert!(
            evidence(&b).contains("committed separately"),
            "{hole:?} {starts:?}"
        );
        // Garbage in place of the last record's bytes: a crash never
        // writes bytes that were not in the commit.
        let (clean, starts) = commits(&[2, 2]);
        let mut b = clean[..starts[3]].to_vec();
        b.extend_from_slice(b"{\"seq\":4,\"ti\x07\xff garbage\n");
        assert!(evidence(&b).contains("line 4"));
        // A copy of an older commit's record after a hole.
        let mut b = clean.clone();
        b.extend_from_slice(&[0; SECTOR]);
        let pad = sector_after(b.len()) - b.len();
        b.extend(std::iter::repeat_n(0, pad));
        b.extend_from_slice(b"x\n");
        b.extend_from_slice(&clean[starts[0]..starts[1]]);
        let cut = crash_cut(&b, 1);
        assert!(matches!(cut, Cut::Evidence(_, None)), "{cut:?}");
    }

    #[test]
    fn start_up_cuts_a_crashed_commit_but_not_tampering() {
        // The reviewer's case: svsd stopped cleanly, one hex digit of line
        // 3's hash changed; the restart must not cut acknowledged records.
        let dir = tempfile::tempdir().unwrap();
        for i in 0..4 {
            write(dir.path(), i + 1, 1 << 20);
        }
        let path = only_file(dir.path());
        let before = std::fs::read(&path).unwrap();
        let mut bytes = before.clone();
        let line3 = bytes
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .nth(2)
            .unwrap()
            .0;
        let d = line3 - 4;
        bytes[d] = if bytes[d] == b'0' { b'1' } else { b'0' };
        std::fs::write(&path, &bytes).unwrap();
        write(dir.path(), 1, 1 << 20);
        let after = std::fs::read(&path).unwrap();
        assert_eq!(&after[..bytes.len()], &bytes[..], "nothing cut");
        assert_eq!(
            after[bytes.len()..].iter().filter(|b| **b == b'\n').count(),
            1
        );
        let b = verify_dir(dir.path(), None).unwrap_err();
        assert_eq!((b.line, b.kind), (3, BreakKind::Tampered));
        let aside = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains(".cut-")
            })
            .count();
        assert_eq!(aside, 0);

        // A crash: the last commit's first sector unwritten, its later
        // records on disk. Cut, kept aside, and the chain goes on.
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 5, 1 << 20);
        let path = only_file(dir.path());
        let good = std::fs::read(&path).unwrap();
        let prev = unhex32(&good[good.len() - 67..good.len() - 3]).unwrap();
        let time = rfc3339(SystemTime::now());
        let mut group = Vec::new();
        let mut head = prev;
        for seq in 6..=15 {
            head = render(
                seq,
                &head,
                &Entry::Op(event(seq as usize)),
                &time,
                &mut group,
            )
            .unwrap();
        }
        let mut file = good.clone();
        file.extend_from_slice(&group);
        file.resize(64 << 10, 0);
        let s = sector_after(good.len());
        file[good.len()..s].fill(0);
        std::fs::write(&path, &file).unwrap();
        let r = verify_dir(dir.path(), None).unwrap();
        assert_eq!(r.last_seq, 5);
        assert!(r.warnings[0].contains("crash"), "{r:?}");
        write(dir.path(), 3, 1 << 20);
        let r = verify_dir(dir.path(), None).unwrap();
        assert_eq!(
            (r.records, r.last_seq, r.warnings.len()),
            (8, 8, 0),
            "{r:?}"
        );
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains(".jsonl.cut-"))
            .collect();
        assert_eq!(aside.len(), 1);
        assert!(
            std::fs::read(&aside[0])
                .unwrap()
                .ends_with(&group[s - good.len()..])
        );
    }

    #[test]
    fn verify_reads_past_zeros_and_reports_records_after_them() {
        // svsd stopped cleanly; a sector in an early record zeroed: a
        // checkpoint and the stop record lie after it.
        let (clean, starts) = commits(&[3, 3, 0, 1]);
        let dir = tempfile::tempdir().unwrap();
        let mut b = clean.clone();
        let s = sector_after(starts[0]);
        b[s..s + SECTOR].fill(0);
        std::fs::write(dir.path().join(file_name(1)), &b).unwrap();
        let brk = verify_dir(dir.path(), None).unwrap_err();
        assert_eq!(brk.line, line_at(&starts, s) + 1, "{brk}");
        assert!(
            matches!(brk.kind, BreakKind::Tampered | BreakKind::Malformed),
            "{brk}"
        );
        // Also when the zeros end inside the last line: no line after them
        // is complete, yet they are no unwritten sector.
        let mut b = clean.clone();
        let n = b.len();
        b[n - 20] = 0;
        std::fs::write(dir.path().join(file_name(1)), &b).unwrap();
        let brk = verify_dir(dir.path(), None).unwrap_err();
        assert_eq!(brk.line, starts.len() - 1, "{brk}");
    }

    #[test]
    fn start_up_leaves_damage_no_crash_causes_in_place() {
        // An altered record followed by its chained successor: evidence.
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 5, 1 << 20);
        let path = only_file(dir.path());
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replacen("\"ok\"", "\"ko\"", 3)).unwrap();
        write(dir.path(), 2, 1 << 20);
        let b = verify_dir(dir.path(), None).unwrap_err();
        assert_eq!((b.kind, b.line), (BreakKind::Tampered, 1));
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 7);
        // A deleted record: complete lines out of sequence.
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 5, 1 << 20);
        let path = only_file(dir.path());
        let lines: Vec<String> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        let kept = [&lines[..2], &lines[3..]].concat();
        std::fs::write(&path, kept.join("\n") + "\n").unwrap();
        write(dir.path(), 1, 1 << 20);
        let b = verify_dir(dir.path(), None).unwrap_err();
        assert_eq!(b.kind, BreakKind::Deleted { from: 3, to: 3 });
    }

    #[test]
    fn a_trail_removed_while_written_stops_signing() {
        let dir = tempfile::tempdir().unwrap();
        let audit = dir.path().join("audit");
        let trail = open_with(&audit, 3, true);
        std::fs::remove_dir_all(&audit).unwrap();
        // The group written to the unlinked file is not answered as done.
        let e = rt().block_on(trail.append(vec![event(3)])).unwrap_err();
        assert!(e.to_string().contains("deleted while being written"), "{e}");
        assert!(trail.check().unwrap_err().to_string().contains("deleted"));
        assert!(rt().block_on(trail.append(vec![event(4)])).is_err());
    }

    #[test]
    fn a_trail_file_moved_away_stops_signing_at_the_next_commit() {
        let dir = tempfile::tempdir().unwrap();
        let trail = open_with(dir.path(), 2, true);
        let path = only_file(dir.path());
        std::fs::rename(&path, dir.path().join("elsewhere")).unwrap();
        let e = rt().block_on(trail.append(vec![event(2)])).unwrap_err();
        assert!(e.to_string().contains("moved away"), "{e}");
        assert!(trail.check().is_err());
        // A link put back under the name is not the file either.
        let dir = tempfile::tempdir().unwrap();
        let trail = open_with(dir.path(), 2, true);
        let path = only_file(dir.path());
        let moved = dir.path().join("elsewhere");
        std::fs::rename(&path, &moved).unwrap();
        std::os::unix::fs::symlink(&moved, &path).unwrap();
        let e = rt().block_on(trail.append(vec![event(2)])).unwrap_err();
        assert!(e.to_string().contains("no longer names"), "{e}");
        // A hard link elsewhere, then the name removed: the file keeps a
        // link, but not in the trail.
        let dir = tempfile::tempdir().unwrap();
        let trail = open_with(dir.path(), 2, true);
        let path = only_file(dir.path());
        std::fs::hard_link(&path, dir.path().join("elsewhere")).unwrap();
        std::fs::remove_file(&path).unwrap();
        let e = rt().block_on(trail.append(vec![event(2)])).unwrap_err();
        assert!(e.to_string().contains("moved away"), "{e}");
    }

    fn victim() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious, not svsd's").unwrap();
        (dir, victim)
    }

    #[test]
    fn a_link_planted_as_the_spare_is_removed_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let (_v, victim) = victim();
        let spare = dir.path().join(Spare::NAME);
        std::os::unix::fs::symlink(&victim, &spare).unwrap();
        let size = 16 << 10;
        let trail = AuditTrail::open(&config(dir.path(), size), None).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious, not svsd's");
        let meta = std::fs::symlink_metadata(&spare).unwrap();
        assert!(meta.file_type().is_file() && meta.len() == size);
        let mut i = 0;
        while trail_files(dir.path()).unwrap().len() < 2 {
            rt().block_on(trail.append(vec![event(i)])).unwrap();
            i += 1;
        }
        drop(trail);
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious, not svsd's");
        assert_eq!(verify_dir(dir.path(), None).unwrap().records, i as u64);
    }

    #[test]
    fn a_spare_swapped_for_a_link_while_running_is_left_out_of_the_trail() {
        let dir = tempfile::tempdir().unwrap();
        let (_v, victim) = victim();
        let size = 16 << 10;
        let trail = AuditTrail::open(&config(dir.path(), size), None).unwrap();
        // The spare zero-filled and ready, then swapped under svsd.
        std::thread::sleep(Duration::from_millis(300));
        let spare = dir.path().join(Spare::NAME);
        std::fs::remove_file(&spare).unwrap();
        std::os::unix::fs::symlink(&victim, &spare).unwrap();
        let mut i = 0;
        while trail_files(dir.path()).unwrap().len() < 2 {
            rt().block_on(trail.append(vec![event(i)])).unwrap();
            i += 1;
        }
        // Rotation made a file of its own and signing went on.
        rt().block_on(trail.append(vec![event(i)])).unwrap();
        drop(trail);
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious, not svsd's");
        for (_, f) in trail_files(dir.path()).unwrap() {
            assert!(std::fs::symlink_metadata(&f).unwrap().file_type().is_file());
        }
        assert_eq!(verify_dir(dir.path(), None).unwrap().records, i as u64 + 1);
    }

    #[test]
    fn rotation_refuses_a_name_that_is_taken() {
        for preallocate in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let (_v, victim) = victim();
            let trail = AuditTrail::open(
                &AuditConfig {
                    preallocate,
                    ..config(dir.path(), 4096)
                },
                None,
            )
            .unwrap();
            // With a spare ready, rotation is a rename (the other path).
            std::thread::sleep(Duration::from_millis(200));
            for seq in 2..40 {
                std::os::unix::fs::symlink(&victim, dir.path().join(file_name(seq))).unwrap();
            }
            let mut i = 0;
            while rt().block_on(trail.append(vec![event(i)])).is_ok() {
                i += 1;
                assert!(i < 40, "rotation did not happen");
            }
            let e = trail.check().unwrap_err().to_string();
            assert!(e.contains("File exists"), "{preallocate}: {e}");
            assert_eq!(std::fs::read(&victim).unwrap(), b"precious, not svsd's");
            for seq in 2..40 {
                let path = dir.path().join(file_name(seq));
                assert!(std::fs::symlink_metadata(path).unwrap().is_symlink());
            }
            drop(trail);
            // A plain file under the next name is not overwritten either.
            let dir = tempfile::tempdir().unwrap();
            let trail = AuditTrail::open(
                &AuditConfig {
                    preallocate,
                    ..config(dir.path(), 4096)
                },
                None,
            )
            .unwrap();
            std::thread::sleep(Duration::from_millis(200));
            for seq in 2..40 {
                std::fs::write(dir.path().join(file_name(seq)), b"records").unwrap();
            }
            while rt().block_on(trail.append(vec![event(0)])).is_ok() {}
            assert!(
                trail
                    .check()
                    .unwrap_err()
                    .to_string()
                    .contains("File exists")
            );
            for seq in 2..40 {
                assert_eq!(
                    std::fs::read(dir.path().join(file_name(seq))).unwrap(),
                    b"records"
                );
            }
        }
    }

    #[test]
    fn a_symlinked_trail_file_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 5, 1 << 20);
        let path = only_file(dir.path());
        let (_v, victim) = victim();
        // What recovery would cut, were the file its own: a torn line.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(b"{\"seq\":6,\"ti");
        std::fs::write(&victim, &bytes).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let e = AuditTrail::open(&config(dir.path(), 1 << 20), None).unwrap_err();
        assert!(e.to_string().contains("is a symbolic link"), "{e}");
        assert_eq!(std::fs::read(&victim).unwrap(), bytes);
        assert!(std::fs::symlink_metadata(&path).unwrap().is_symlink());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "only the link and the lock: {names:?}");
    }

    struct FailingSink;
    impl Sink for FailingSink {
        fn append(&mut self, _: &[u8]) -> std::io::Result<()> {
            Err(std::io::Error::other("disk on fire"))
        }
        fn sync(&mut self) -> std::io::Result<()> {
            Ok(())
        }
        fn len(&self) -> u64 {
            0
        }
        fn rotate(&mut self, _: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn finish(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Counts the records (lines) of each fdatasync; each sync is slow, so
    /// that appends queue up behind it.
    struct GroupSink(Arc<Mutex<Vec<usize>>>, usize, u64);
    impl Sink for GroupSink {
        fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
            self.1 += bytes.iter().filter(|b| **b == b'\n').count();
            self.2 += bytes.len() as u64;
            Ok(())
        }
        fn sync(&mut self) -> std::io::Result<()> {
            std::thread::sleep(Duration::from_millis(20));
            self.0.lock().unwrap().push(std::mem::take(&mut self.1));
            Ok(())
        }
        fn len(&self) -> u64 {
            self.2
        }
        fn rotate(&mut self, _: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn finish(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_group_commit_holds_at_most_max_group_records_unless_one_job_is_larger() {
        let dir = tempfile::tempdir().unwrap();
        let groups = Arc::new(Mutex::new(Vec::new()));
        let trail = Arc::new(AuditTrail::with_sink(
            Box::new(GroupSink(groups.clone(), 0, 0)),
            0,
            GENESIS,
            String::new(),
            &AuditConfig {
                max_group_records: 5,
                ..config(dir.path(), 1 << 30)
            },
        ));
        rt().block_on(async {
            let mut tasks = Vec::new();
            for i in 0..40 {
                let t = trail.clone();
                let n = if i == 20 { 9 } else { 2 };
                tasks.push(tokio::spawn(async move {
                    t.append((0..n).map(event).collect()).await
                }));
            }
            for t in tasks {
                t.await.unwrap().unwrap();
            }
        });
        let groups = groups.lock().unwrap().clone();
        assert_eq!(groups.iter().sum::<usize>(), 39 * 2 + 9, "{groups:?}");
        assert!(groups.iter().all(|g| *g <= 5 || *g == 9), "{groups:?}");
        assert!(groups.len() < 40, "appends were grouped: {groups:?}");
    }

    #[test]
    fn an_unwritable_trail_refuses_and_stays_refused() {
        let dir = tempfile::tempdir().unwrap();
        let trail = AuditTrail::with_sink(
            Box::new(FailingSink),
            0,
            GENESIS,
            String::new(),
            &config(dir.path(), 4096),
        );
        rt().block_on(async {
            assert!(matches!(
                trail.append(vec![event(1)]).await,
                Err(SvsError::AuditUnavailable(_))
            ));
            assert!(trail.check().is_err());
            assert!(trail.append(vec![event(2)]).await.is_err());
        });
    }

    #[test]
    fn checkpoints_are_verified_with_the_audit_key() {
        use sm2::dsa::signature::Signer;
        let dir = tempfile::tempdir().unwrap();
        let sk = sm2::SecretKey::from_slice(&[5u8; 32]).unwrap();
        let signer = sm2::dsa::SigningKey::new("1234567812345678", &sk).unwrap();
        let point = sk.public_key().to_sec1_bytes();
        let trail = AuditTrail::open(&config(dir.path(), 1 << 20), None).unwrap();
        rt().block_on(async {
            trail.append(vec![event(1), event(2)]).await.unwrap();
            let (seq, head, last) = trail.head().await.unwrap();
            let text = Checkpoint::now(seq, head, Duration::from_secs(300), &last);
            let sig: sm2::dsa::Signature = signer.sign(&text.message());
            trail
                .checkpoint(
                    text,
                    "svs-audit".into(),
                    svs_hsm::signature::raw_to_der(&sig.to_bytes().as_slice().try_into().unwrap()),
                )
                .await
                .unwrap();
            trail.append(vec![event(3)]).await.unwrap();
            let (seq, head, last) = trail.head().await.unwrap();
            trail
                .checkpoint(
                    Checkpoint::now(seq, head, Duration::from_secs(300), &last),
                    "svs-audit".into(),
                    vec![0x30, 0x06, 2, 1, 1, 2, 1, 1],
                )
                .await
                .unwrap();
        });
        trail.close();
        let b = verify_dir(dir.path(), Some(CheckpointKey::sm2(&point))).unwrap_err();
        assert_eq!((b.seq, b.kind), (Some(5), BreakKind::BadCheckpoint));
        // Without the key, only the chain and the heads are checked.
        assert_eq!(verify_dir(dir.path(), None).unwrap().checkpoints, 2);
    }
}
