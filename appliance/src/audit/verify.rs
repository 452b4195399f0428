//! `audit verify`: walks every file and record, checks the chain, the
//! sequence, the checkpoints' signatures and their coverage, and reports
//! the first break with what kind of damage it is.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use svs_hsm::keys::hex;

use super::files::{records_end, trail_files, without_zero_tail};
use super::record::{
    Body, Checkpoint, GENESIS, checkpoint_message_v1, parse_rfc3339, split_line, unhex, unhex32,
};
use super::recover::{unwritten_remnant, valid_record};
use super::sm3;

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

pub(super) fn verify_files(
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
