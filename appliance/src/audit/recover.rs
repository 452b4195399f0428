//! Start-up recovery: finds the chain head, cuts what a crash can leave
//! (an unfinished last group, unwritten sectors) and keeps everything else
//! as evidence; checks the head against the anchor in the HSM.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::SvsError;
use svs_hsm::keys::hex;

use super::files::{
    file_name, open_existing, read_trail_file, sync_dir, trail_files, without_zero_tail,
};
use super::record::{Body, Checkpoint, GENESIS, parse_rfc3339, split_line};
use super::sm3;

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
pub(super) fn check_anchor(
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
pub(super) fn record_hash(path: &Path, seq: u64) -> Option<[u8; 32]> {
    let bytes = read_trail_file(path).ok()?;
    bytes
        .split(|b| *b == b'\n')
        .filter_map(split_line)
        .find(|(body, _)| body_seq(body) == Some(seq))
        .map(|(_, hash)| hash)
}

/// What start-up recovery does with the newest file.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Cut {
    /// Every line is a valid record in sequence.
    Nothing,
    /// Cut here: from this byte on lies what a crash left.
    At(usize),
    /// Invalid, but not as a crash leaves it: left in place. A crash
    /// remnant after the damage (svsd went on writing after an earlier
    /// ALARM, then crashed) is still cut, at the offset given.
    Evidence(String, Option<usize>),
}

pub(super) fn crash_cut(bytes: &[u8], first_seq: u64) -> Cut {
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
pub(super) fn valid_record(line: &[u8]) -> Option<(Body<'static>, [u8; 32])> {
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
pub(super) const SECTOR: usize = 512;

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
pub(super) fn unwritten_remnant(
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

/// The time of the last record in `path` (empty if it cannot be read: the
/// floor for the next record's time is then the clock alone).
pub(super) fn last_record_time(path: &Path) -> String {
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
