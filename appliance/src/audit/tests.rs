//! Tests of the whole trail: writing, rotation, preallocation, crash cuts,
//! recovery, the anchor, and `verify` finding each kind of tampering.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::AuditConfig;
use crate::error::SvsError;
use svs_hsm::keys::hex;

use super::files::{LOCK_NAME, Sink, Spare, file_name, read_trail_file, trail_files};
use super::record::{
    Body, Checkpoint, GENESIS, anchor_head, checkpoint_message_v1, parse_rfc3339, render, rfc3339,
    split_line, unhex32, write_body,
};
use super::recover::{Cut, SECTOR, crash_cut, record_hash};
use super::verify::{
    BreakKind, ChainBreak, CheckpointKey, VerifyOptions, verify_dir, verify_dir_with, verify_files,
};
use super::writer::AuditTrail;
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
fn the_last_note_ends_the_trail_and_names_its_head() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), 3, 1 << 20);
    let trail = AuditTrail::open(&config(dir.path(), 1 << 20), None).unwrap();
    rt().block_on(async {
        trail.append(vec![event(3)]).await.unwrap();
        let (seq, head, time) = trail
            .last_note("stop", "svsd stopped".into())
            .await
            .unwrap();
        assert_eq!(seq, 5);
        assert!(!time.is_empty());
        // What a stopping svsd still does is refused, not recorded after it.
        for refused in [
            trail.append(vec![event(4)]).await,
            trail.note("selftest", "passed".into()).await,
            trail.last_note("stop", "again".into()).await.map(|_| ()),
        ] {
            let e = refused.unwrap_err();
            assert!(matches!(e, SvsError::AuditUnavailable(_)), "{e}");
        }
        trail.close();
        let files = trail_files(dir.path()).unwrap();
        assert_eq!(
            files.iter().find_map(|(_, p)| record_hash(p, 5)),
            Some(head)
        );
    });
    let r = verify_dir(dir.path(), None).unwrap();
    assert_eq!(r.last_seq, 5);
    let text = std::fs::read_to_string(only_file(dir.path())).unwrap();
    assert!(
        text.lines().last().unwrap().contains(r#""type":"stop""#),
        "{text}"
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
