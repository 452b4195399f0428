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

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
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
use crate::policy::hex;

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
        head_seq: u64,
        head: [u8; 32],
        key: String,
        signature: Vec<u8>,
    },
    Note {
        kind: &'static str,
        detail: String,
    },
}

/// A record without its hash: what is serialised and hashed.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    seq: u64,
    time: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    entity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    op: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    input_sm3: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    output_sm3: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    outcome: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    latency_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    head_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    head: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signature: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
    prev: String,
}

const HASH_SUFFIX_LEN: usize = r#","hash":""}"#.len() + 64;
const GENESIS: [u8; 32] = [0; 32];

/// The message a checkpoint signs: domain-separated text naming the record
/// and the chain head, so it can be checked with any SM2 tool.
pub fn checkpoint_message(head_seq: u64, head: &[u8; 32]) -> Vec<u8> {
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

fn render(seq: u64, prev: &[u8; 32], entry: &Entry, now: SystemTime) -> (String, [u8; 32]) {
    let mut body = Body {
        seq,
        time: rfc3339(now),
        kind: String::new(),
        entity: None,
        op: None,
        key: None,
        input_sm3: None,
        output_sm3: None,
        outcome: None,
        latency_us: None,
        head_seq: None,
        head: None,
        signature: None,
        detail: None,
        prev: hex(prev),
    };
    match entry {
        Entry::Op(e) => {
            body.kind = "op".into();
            body.entity = Some(e.entity.clone());
            body.op = Some(e.op.into());
            body.key = e.key.clone();
            body.input_sm3 = e.input_sm3.as_ref().map(|d| hex(d));
            body.output_sm3 = e.output_sm3.as_ref().map(|d| hex(d));
            body.outcome = Some(e.outcome.clone());
            body.latency_us = Some(e.latency_us);
        }
        Entry::Checkpoint {
            head_seq,
            head,
            key,
            signature,
        } => {
            body.kind = "checkpoint".into();
            body.head_seq = Some(*head_seq);
            body.head = Some(hex(head));
            body.key = Some(key.clone());
            body.signature = Some(hex(signature));
        }
        Entry::Note { kind, detail } => {
            body.kind = (*kind).into();
            body.detail = Some(detail.clone());
        }
    }
    // Serialising plain strings and integers cannot fail.
    let json = serde_json::to_string(&body).unwrap_or_default();
    let hash = sm3(json.as_bytes());
    let mut line = String::with_capacity(json.len() + HASH_SUFFIX_LEN + 1);
    line.push_str(&json[..json.len() - 1]);
    line.push_str(",\"hash\":\"");
    line.push_str(&hex(&hash));
    line.push_str("\"}\n");
    (line, hash)
}

/// Where the writer puts bytes; a trait so tests can make it fail.
trait Sink: Send {
    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()>;
    fn sync(&mut self) -> std::io::Result<()>;
    fn len(&self) -> u64;
    fn rotate(&mut self, first_seq: u64) -> std::io::Result<()>;
}

struct FileSink {
    dir: PathBuf,
    file: File,
    len: u64,
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl FileSink {
    fn create(dir: &Path, first_seq: u64) -> std::io::Result<FileSink> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(file_name(first_seq)))?;
        sync_dir(dir)?;
        let len = file.metadata()?.len();
        Ok(FileSink {
            dir: dir.to_path_buf(),
            file,
            len,
        })
    }
}

impl Sink for FileSink {
    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all(bytes)?;
        self.len += bytes.len() as u64;
        Ok(())
    }
    fn sync(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn rotate(&mut self, first_seq: u64) -> std::io::Result<()> {
        *self = FileSink::create(&self.dir, first_seq)?;
        Ok(())
    }
}

/// Reads where the chain stands (last seq and hash), cutting off a torn
/// last line left by a crash in the middle of a write. Such a line was
/// never acknowledged: its answer was held back until the fsync.
fn recover(dir: &Path) -> Result<(u64, [u8; 32], Option<u64>), SvsError> {
    let io = |e: std::io::Error| SvsError::AuditUnavailable(format!("{}: {e}", dir.display()));
    let files = trail_files(dir).map_err(io)?;
    for (first_seq, path) in files.iter().rev() {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io)?;
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).map_err(io)?;
        let keep = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        if keep != bytes.len() {
            tracing::warn!(
                file = %path.display(),
                bytes = bytes.len() - keep,
                "audit: cutting off a torn last record (unacknowledged, written during a crash)"
            );
            f.set_len(keep as u64).map_err(io)?;
            f.seek(SeekFrom::End(0)).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        let text = &bytes[..keep];
        let Some(last) = text.split(|b| *b == b'\n').rev().find(|l| !l.is_empty()) else {
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
        return Ok((seq, hash, Some(*first_seq)));
    }
    Ok((0, GENESIS, None))
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

fn body_seq(body: &[u8]) -> Option<u64> {
    serde_json::from_slice::<Body>(body).ok().map(|b| b.seq)
}

enum Job {
    Append {
        entries: Vec<Entry>,
        ack: oneshot::Sender<Result<u64, SvsError>>,
    },
    Head {
        ack: oneshot::Sender<Result<(u64, [u8; 32]), SvsError>>,
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
    max_file_bytes: u64,
    max_group: usize,
    broken: Arc<Mutex<Option<String>>>,
    stats: Arc<AuditStats>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Job>) {
        let mut buf = Vec::with_capacity(1 << 16);
        while let Ok(first) = rx.recv() {
            let mut jobs = vec![first];
            let mut records = 0;
            while records < self.max_group {
                match rx.try_recv() {
                    Ok(job) => {
                        if let Job::Append { entries, .. } = &job {
                            records += entries.len();
                        }
                        jobs.push(job);
                    }
                    Err(_) => break,
                }
            }
            self.commit(jobs, &mut buf);
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
        let now = SystemTime::now();
        let mut acks = Vec::with_capacity(jobs.len());
        let mut heads = Vec::new();
        let mut count = 0u64;
        for job in jobs {
            match job {
                Job::Append { entries, ack } => {
                    for entry in &entries {
                        self.seq += 1;
                        let (line, hash) = render(self.seq, &self.head, entry, now);
                        buf.extend_from_slice(line.as_bytes());
                        self.head = hash;
                        count += 1;
                    }
                    acks.push((ack, self.seq));
                }
                Job::Head { ack } => heads.push(ack),
            }
        }
        let result = if buf.is_empty() {
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
                }
                for (ack, seq) in acks {
                    let _ = ack.send(Ok(seq));
                }
                for ack in heads {
                    let _ = ack.send(Ok((self.seq, self.head)));
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
    pub fn open(config: &AuditConfig) -> Result<AuditTrail, SvsError> {
        let io = |e: std::io::Error| {
            SvsError::AuditUnavailable(format!("{}: {e}", config.dir.display()))
        };
        std::fs::create_dir_all(&config.dir).map_err(io)?;
        let (seq, head, current) = recover(&config.dir)?;
        let sink = FileSink::create(&config.dir, current.unwrap_or(seq + 1)).map_err(io)?;
        let trail = AuditTrail::with_sink(Box::new(sink), seq, head, config);
        Ok(trail)
    }

    fn with_sink(
        sink: Box<dyn Sink>,
        seq: u64,
        head: [u8; 32],
        config: &AuditConfig,
    ) -> AuditTrail {
        let (tx, rx) = crossbeam_channel::unbounded();
        let broken = Arc::new(Mutex::new(None));
        let stats = Arc::new(AuditStats::default());
        let writer = Writer {
            sink,
            seq,
            head,
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

    /// The last durable record's seq and hash.
    pub async fn head(&self) -> Result<(u64, [u8; 32]), SvsError> {
        self.check()?;
        let (ack, rx) = oneshot::channel();
        self.submit(Job::Head { ack })?;
        rx.await
            .map_err(|_| SvsError::AuditUnavailable("audit writer stopped".into()))?
    }

    /// Appends a signed checkpoint of record `head_seq` with hash `head`.
    pub async fn checkpoint(
        &self,
        head_seq: u64,
        head: [u8; 32],
        key: String,
        signature: Vec<u8>,
    ) -> Result<(), SvsError> {
        self.append_entries(vec![Entry::Checkpoint {
            head_seq,
            head,
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
    /// A checkpoint's head or signature does not check out.
    BadCheckpoint,
    /// The last line is incomplete (a crash during a write; never acknowledged).
    TornTail,
    /// A file's name does not match its first record.
    BadFileName,
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
    /// Checkpoints found; their signatures were checked when a key was given.
    pub checkpoints: u64,
}

/// Verifies every file of the trail in `dir`, in order, as one chain.
/// With `checkpoint_key` (the audit key's uncompressed SM2 point), checkpoint
/// signatures are verified too. Returns the first break, located precisely.
pub fn verify_dir(dir: &Path, checkpoint_key: Option<&[u8]>) -> Result<ChainReport, ChainBreak> {
    let files = trail_files(dir).map_err(|e| ChainBreak {
        file: dir.to_path_buf(),
        line: 0,
        seq: None,
        kind: BreakKind::Malformed,
        detail: format!("cannot list: {e}"),
    })?;
    let mut v = Verifier::new(checkpoint_key);
    for (first_seq, path) in &files {
        let bytes = std::fs::read(path).map_err(|e| ChainBreak {
            file: path.clone(),
            line: 0,
            seq: None,
            kind: BreakKind::Malformed,
            detail: format!("cannot read: {e}"),
        })?;
        v.file(path, *first_seq, &bytes)?;
    }
    v.report.files = files.len();
    Ok(v.report)
}

struct Verifier<'k> {
    key: Option<&'k [u8]>,
    verifier: svs_hsm::signature::SoftwareVerifier,
    prev: Option<(u64, [u8; 32])>,
    // Recent hashes by seq, to check checkpoint heads (bounded).
    recent: std::collections::VecDeque<(u64, [u8; 32])>,
    report: ChainReport,
}

impl<'k> Verifier<'k> {
    fn new(key: Option<&'k [u8]>) -> Self {
        Verifier {
            key,
            verifier: svs_hsm::signature::SoftwareVerifier::new(),
            prev: None,
            recent: Default::default(),
            report: ChainReport::default(),
        }
    }

    fn file(&mut self, path: &Path, first_seq: u64, bytes: &[u8]) -> Result<(), ChainBreak> {
        let lines: Vec<&[u8]> = bytes.split_inclusive(|b| *b == b'\n').collect();
        for (i, raw) in lines.iter().enumerate() {
            let brk = |seq, kind, detail: String| ChainBreak {
                file: path.to_path_buf(),
                line: i + 1,
                seq,
                kind,
                detail,
            };
            let Some(line) = raw.strip_suffix(b"\n") else {
                return Err(brk(
                    None,
                    BreakKind::TornTail,
                    "incomplete last line".into(),
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
            if i == 0 && b.seq != first_seq {
                return Err(brk(
                    seq,
                    BreakKind::BadFileName,
                    format!("file is named for seq {first_seq} but starts at {}", b.seq),
                ));
            }
            match self.prev {
                None => {
                    if b.seq == 1 && b.prev != hex(&GENESIS) {
                        return Err(brk(
                            seq,
                            BreakKind::ChainMismatch,
                            "first record's prev is not zero".into(),
                        ));
                    }
                    self.report.first_seq = b.seq;
                }
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
            if b.kind == "checkpoint" {
                self.checkpoint(&b)
                    .map_err(|d| brk(seq, BreakKind::BadCheckpoint, d))?;
                self.report.checkpoints += 1;
            }
            self.prev = Some((b.seq, hash));
            self.recent.push_back((b.seq, hash));
            if self.recent.len() > 1 << 16 {
                self.recent.pop_front();
            }
            self.report.records += 1;
            self.report.last_seq = b.seq;
            self.report.head = hex(&hash);
        }
        Ok(())
    }

    fn checkpoint(&self, b: &Body) -> Result<(), String> {
        let (Some(head_seq), Some(head), Some(sig)) = (b.head_seq, &b.head, &b.signature) else {
            return Err("checkpoint lacks head_seq, head or signature".into());
        };
        let head_bytes = unhex32(head.as_bytes()).ok_or("head is not 64 hex digits")?;
        match self.recent.iter().find(|(s, _)| *s == head_seq) {
            Some((_, h)) if *h == head_bytes => {}
            Some(_) => return Err(format!("head does not match the hash of seq {head_seq}")),
            None if head_seq >= b.seq => return Err("checkpoint names a later record".into()),
            // Too old to be in the window (or archived): cannot be checked here.
            None => {}
        }
        if let Some(point) = self.key {
            let sig = unhex(sig).ok_or("signature is not hex")?;
            self.verifier
                .verify_message(
                    svs_hsm::Algorithm::Sm2,
                    point,
                    svs_hsm::signature::DEFAULT_SM2_ID,
                    &checkpoint_message(head_seq, &head_bytes),
                    &sig,
                )
                .map_err(|_| "checkpoint signature does not verify".to_string())?;
        }
        Ok(())
    }
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

    fn config(dir: &Path, max_file_bytes: u64) -> AuditConfig {
        AuditConfig {
            dir: dir.to_path_buf(),
            max_file_bytes,
            max_group_records: 64,
            checkpoint_interval: None,
            checkpoint_key: None,
        }
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

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn write(dir: &Path, n: usize, max_file_bytes: u64) {
        let trail = AuditTrail::open(&config(dir, max_file_bytes)).unwrap();
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
            let (line, _) = render(12, &[9; 32], &Entry::Op(event(999)), SystemTime::now());
            l[11] = line.trim_end().to_string();
        });
        assert_eq!((b.line, b.kind), (12, BreakKind::ChainMismatch));
    }

    #[test]
    fn a_torn_tail_is_reported_and_cut_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 5, 1 << 20);
        let path = only_file(dir.path());
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":6,\"time\":\"2").unwrap();
        drop(f);
        assert_eq!(
            verify_dir(dir.path(), None).unwrap_err().kind,
            BreakKind::TornTail
        );
        write(dir.path(), 3, 1 << 20);
        let r = verify_dir(dir.path(), None).unwrap();
        assert_eq!(r.last_seq, 8);
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
    }

    #[test]
    fn an_unwritable_trail_refuses_and_stays_refused() {
        let dir = tempfile::tempdir().unwrap();
        let trail =
            AuditTrail::with_sink(Box::new(FailingSink), 0, GENESIS, &config(dir.path(), 4096));
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
        let trail = AuditTrail::open(&config(dir.path(), 1 << 20)).unwrap();
        rt().block_on(async {
            trail.append(vec![event(1), event(2)]).await.unwrap();
            let (seq, head) = trail.head().await.unwrap();
            let sig: sm2::dsa::Signature = signer.sign(&checkpoint_message(seq, &head));
            trail
                .checkpoint(
                    seq,
                    head,
                    "svs-audit".into(),
                    svs_hsm::signature::raw_to_der(&sig.to_bytes().as_slice().try_into().unwrap()),
                )
                .await
                .unwrap();
            trail.append(vec![event(3)]).await.unwrap();
            let (seq, head) = trail.head().await.unwrap();
            trail
                .checkpoint(
                    seq,
                    head,
                    "svs-audit".into(),
                    vec![0x30, 0x06, 2, 1, 1, 2, 1, 1],
                )
                .await
                .unwrap();
        });
        trail.close();
        let b = verify_dir(dir.path(), Some(&point)).unwrap_err();
        assert_eq!((b.seq, b.kind), (Some(5), BreakKind::BadCheckpoint));
        // Without the key, only the chain and the heads are checked.
        assert_eq!(verify_dir(dir.path(), None).unwrap().checkpoints, 2);
    }
}
