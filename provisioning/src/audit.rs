//! `audit verify` and `audit show`: the auditor's commands. Neither needs a
//! PIN: the trail is read from disk and the audit key's public half is a
//! public token object (or a file).

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use std::time::{Duration, SystemTime};

use svs_appliance::audit::{
    BreakKind, CHECKPOINT_SLACK, ChainBreak, VerifyOptions, trail_files, verify_dir_with,
};

use crate::Report;
use crate::error::{ProvisionError, Result};

/// Where the audit key's public key comes from.
#[derive(Debug, Clone)]
pub enum AuditKey {
    /// An uncompressed point already read (from a file or the token).
    Point {
        /// Its curve: SM2, or P-256 on an HSM profile without SM2.
        algorithm: svs_hsm::Algorithm,
        /// The point.
        point: Vec<u8>,
        /// Where it came from, for the report.
        source: String,
    },
    /// Checkpoint signatures are not checked (structure and hashes only).
    Skip,
}

fn describe(kind: &BreakKind) -> String {
    match kind {
        BreakKind::Malformed => "the line is not an audit record".into(),
        BreakKind::Tampered => {
            "the record was altered: its content does not match its own hash".into()
        }
        BreakKind::Deleted { from, to } if from == to => {
            format!("record {from} is missing (deleted)")
        }
        BreakKind::Deleted { from, to } => format!("records {from} to {to} are missing (deleted)"),
        BreakKind::Reordered { expected } => {
            format!("records are out of order (seq {expected} was expected here)")
        }
        BreakKind::ChainMismatch => {
            "the record does not chain to the one before it (replaced, or files mixed)".into()
        }
        BreakKind::BadCheckpoint => "a checkpoint's head or signature does not check out".into(),
        BreakKind::TornTail => {
            "the last line is incomplete (a crash while writing; it was never acknowledged)".into()
        }
        BreakKind::BadFileName => "the file's name does not match its first record".into(),
        BreakKind::MissingStart { first_seq } => format!(
            "the trail starts at seq {first_seq}, not 1: records 1 to {} are missing (oldest files deleted or archived) and nothing anchors the first record kept. If they were archived on purpose, verify with --from-seq {first_seq}",
            first_seq.saturating_sub(1)
        ),
        BreakKind::Unsigned { after } => format!(
            "records after seq {after} are covered by no signed checkpoint although svsd signs one every checkpoint interval: checkpoints were removed (and those records possibly rewritten), or svsd could not sign (see its log for ALARM)"
        ),
    }
}

fn kind_name(kind: &BreakKind) -> &'static str {
    match kind {
        BreakKind::Malformed => "malformed",
        BreakKind::Tampered => "tampered",
        BreakKind::Deleted { .. } => "deleted",
        BreakKind::Reordered { .. } => "reordered",
        BreakKind::ChainMismatch => "chain_mismatch",
        BreakKind::BadCheckpoint => "bad_checkpoint",
        BreakKind::TornTail => "torn_tail",
        BreakKind::BadFileName => "bad_file_name",
        BreakKind::MissingStart { .. } => "missing_start",
        BreakKind::Unsigned { .. } => "unsigned_tail",
    }
}

/// The message for a break: where, what, and what to do.
pub fn break_message(b: &ChainBreak) -> String {
    let before = match b.kind {
        // The chain itself held up to the end; the signatures did not.
        BreakKind::Unsigned { .. } => {
            "The chain is consistent, but that proves nothing against someone who can rewrite the files"
        }
        _ => "Records before this line check out",
    };
    format!(
        "audit trail BROKEN at {}:{}{}: {} ({}; {}). {before}. Keep the files unchanged as evidence and report it",
        b.file.display(),
        b.line,
        b.seq.map(|s| format!(" (seq {s})")).unwrap_or_default(),
        describe(&b.kind),
        kind_name(&b.kind),
        b.detail
    )
}

/// What `audit verify` demands beyond the chain.
#[derive(Debug, Clone, Default)]
pub struct VerifyArgs {
    /// svsd's checkpoint interval (from its config or the command line).
    pub checkpoint_interval: Option<Duration>,
    /// Records before this seq were pruned on purpose.
    pub from_seq: Option<u64>,
    /// svsd is running: the newest checkpoint must be recent.
    pub live: bool,
}

/// `audit verify`.
pub fn verify(dir: &Path, key: &AuditKey, args: &VerifyArgs) -> Result<Report> {
    if !dir.is_dir() {
        return Err(ProvisionError::NotFound(format!(
            "audit directory {} does not exist (svsd's [audit] dir)",
            dir.display()
        )));
    }
    let point = match key {
        AuditKey::Point {
            algorithm, point, ..
        } => Some(svs_appliance::audit::CheckpointKey {
            algorithm: *algorithm,
            point,
        }),
        AuditKey::Skip => None,
    };
    let opts = VerifyOptions {
        key: point,
        checkpoint_interval: args.checkpoint_interval,
        from_seq: args.from_seq,
        live_at: args.live.then(SystemTime::now),
    };
    let report =
        verify_dir_with(dir, &opts).map_err(|b| ProvisionError::AuditBroken(break_message(&b)))?;
    if report.records == 0 {
        return Err(ProvisionError::NotFound(format!(
            "no audit records in {} (files are named audit-<seq>.jsonl)",
            dir.display()
        )));
    }
    let mut text = format!(
        "audit trail in {} intact: {} records in {} files (seq {}..{}), {} checkpoints\n",
        dir.display(),
        report.records,
        report.files,
        report.first_seq,
        report.last_seq,
        report.checkpoints,
    );
    match key {
        AuditKey::Point { source, .. } => {
            text.push_str(&format!("checkpoint signatures verified with {source}\n"));
            match (report.signed_through, &report.signed_at) {
                (Some(seq), Some(at)) => text.push_str(&format!(
                    "signed through seq {seq} (checkpoint written {at}); the {} records after it are within the checkpoint interval{}\n",
                    report.last_seq - seq,
                    args.checkpoint_interval
                        .map(|i| format!(" ({}s + {}s)", i.as_secs(), CHECKPOINT_SLACK.as_secs()))
                        .unwrap_or_default()
                )),
                _ => text.push_str(
                    "no signed checkpoint yet: the trail is younger than the checkpoint interval\n",
                ),
            }
            for (cp, head) in &report.unchecked_heads {
                text.push_str(&format!(
                    "note: checkpoint seq {cp} signs head seq {head}, before the first record kept: its signature checks out, its head cannot be checked here\n"
                ));
            }
            if !args.live {
                text.push_str(
                    "note: newest records or files removed cannot be told from a trail that ends there; while svsd runs, add --live to compare the newest checkpoint with the clock\n",
                );
            }
        }
        AuditKey::Skip => text.push_str(
            "NOTE: checkpoint signatures NOT checked (--skip-signatures). The unkeyed SM3 chain proves order and integrity against accidents, NOT against someone who can rewrite the files: give the audit key for that\n",
        ),
    }
    if report.pruned {
        text.push_str(&format!(
            "note: records before seq {} were pruned (--from-seq): the first record kept is not anchored to the start of the trail\n",
            report.first_seq
        ));
    }
    for w in &report.warnings {
        text.push_str(&format!("warning: {w}\n"));
    }
    text.push_str(&format!("head: {}\n", report.head));
    Ok(Report {
        text,
        json: json!({
            "intact": true,
            "dir": dir,
            "files": report.files,
            "records": report.records,
            "first_seq": report.first_seq,
            "last_seq": report.last_seq,
            "checkpoints": report.checkpoints,
            "signatures_checked": matches!(key, AuditKey::Point { .. }),
            "signed_through": report.signed_through,
            "signed_at": report.signed_at,
            "unchecked_checkpoint_heads": report.unchecked_heads.iter().map(|(c, h)| json!({"seq": c, "head_seq": h})).collect::<Vec<_>>(),
            "pruned_before": report.pruned.then_some(report.first_seq),
            "live": args.live,
            "warnings": report.warnings,
            "head": report.head,
        }),
    })
}

/// Filters of `audit show`.
#[derive(Debug, Clone, Default)]
pub struct ShowFilter {
    /// Records at or after this time (RFC 3339 or a date, UTC).
    pub since: Option<String>,
    /// Records before this time.
    pub until: Option<String>,
    /// Only this entity.
    pub entity: Option<String>,
    /// Only this key.
    pub key: Option<String>,
    /// Only this record type (op, start, stop, reload, selftest, anomaly,
    /// refusals_suppressed, checkpoint).
    pub kind: Option<String>,
    /// Only the last N matching records.
    pub last: Option<usize>,
}

fn check_time(s: &str) -> Result<()> {
    // The trail's times are `YYYY-MM-DDTHH:MM:SS.ffffffZ`, which order as
    // text; a prefix of that form compares correctly against them.
    let ok = s.len() >= 4
        && s.bytes().enumerate().all(|(i, b)| match i {
            4 | 7 => b == b'-',
            10 => b == b'T',
            13 | 16 => b == b':',
            19 => b == b'.' || b == b'Z',
            _ => b.is_ascii_digit() || b == b'Z',
        });
    if ok {
        Ok(())
    } else {
        Err(ProvisionError::Usage(format!(
            "time {s:?}: use UTC as 2026-01-31 or 2026-01-31T08:00:00Z"
        )))
    }
}

/// `audit show`: records matching the filter, oldest first.
pub fn show(dir: &Path, f: &ShowFilter) -> Result<Report> {
    for t in [&f.since, &f.until].into_iter().flatten() {
        check_time(t)?;
    }
    let files = trail_files(dir).map_err(|e| {
        ProvisionError::NotFound(format!(
            "cannot list audit directory {}: {e}",
            dir.display()
        ))
    })?;
    let mut out: Vec<Value> = Vec::new();
    let mut unreadable = 0usize;
    for (_, path) in &files {
        let bytes = svs_appliance::audit::read_trail_file(path)
            .map_err(|e| ProvisionError::Io(format!("cannot read {}: {e}", path.display())))?;
        let text = String::from_utf8_lossy(&bytes);
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                unreadable += 1;
                continue;
            };
            let field = |k: &str| v.get(k).and_then(Value::as_str);
            let time = field("time").unwrap_or("");
            // A bound written to the second (…:00Z) must not sort after
            // records with fractions of that second (…:00.5Z): compare
            // without the bound's Z.
            if f.since
                .as_deref()
                .is_some_and(|s| time < s.trim_end_matches('Z'))
            {
                continue;
            }
            if f.until
                .as_deref()
                .is_some_and(|u| time >= u.trim_end_matches('Z'))
            {
                continue;
            }
            if f.entity
                .as_deref()
                .is_some_and(|e| field("entity") != Some(e))
            {
                continue;
            }
            if f.key.as_deref().is_some_and(|k| field("key") != Some(k)) {
                continue;
            }
            if f.kind.as_deref().is_some_and(|k| field("type") != Some(k)) {
                continue;
            }
            out.push(v);
        }
    }
    if let Some(n) = f.last
        && out.len() > n
    {
        out.drain(..out.len() - n);
    }
    let mut text = String::new();
    for v in &out {
        let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("-").to_owned();
        let seq = v.get("seq").and_then(Value::as_u64).unwrap_or(0);
        let extra = match v.get("type").and_then(Value::as_str) {
            Some("op") => format!(
                "{} {} key={} outcome={} {}us",
                s("entity"),
                s("op"),
                s("key"),
                s("outcome"),
                v.get("latency_us").and_then(Value::as_u64).unwrap_or(0)
            ),
            Some("checkpoint") => format!(
                "head_seq={} key={}",
                v.get("head_seq").and_then(Value::as_u64).unwrap_or(0),
                s("key")
            ),
            _ => s("detail"),
        };
        text.push_str(&format!(
            "{seq:>8} {} {:<10} {extra}\n",
            s("time"),
            s("type")
        ));
    }
    if out.is_empty() {
        text.push_str("no matching records\n");
    }
    if unreadable > 0 {
        text.push_str(&format!(
            "note: {unreadable} lines were not readable records; run `svs-provision audit verify` to locate damage\n"
        ));
    }
    text.push_str("(this listing does not check the hash chain: `audit verify` does)\n");
    Ok(Report {
        text,
        json: json!({"records": out, "unreadable_lines": unreadable}),
    })
}

/// The audit directory: `--dir`, else svsd's `[audit] dir`.
pub fn dir_from(
    dir: Option<PathBuf>,
    config: Option<&svs_appliance::config::Config>,
) -> Result<PathBuf> {
    dir.or_else(|| config.map(|c| c.audit.dir.clone())).ok_or_else(|| {
        ProvisionError::Usage(
            "which audit trail? give --dir DIR, or --config /etc/svs/svsd.toml to use svsd's [audit] dir".into(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_checked() {
        for ok in [
            "2026-01-31",
            "2026-01-31T08:00:00Z",
            "2026-01-31T08:00:00.000001Z",
            "2026",
        ] {
            assert!(check_time(ok).is_ok(), "{ok}");
        }
        for bad in ["yesterday", "31/01/2026", "2026-1-31"] {
            assert!(check_time(bad).is_err(), "{bad}");
        }
    }

    fn trail(dir: &Path, notes: usize) {
        let trail = svs_appliance::audit::AuditTrail::open(&svs_appliance::config::AuditConfig {
            dir: dir.to_path_buf(),
            max_file_bytes: 1024,
            preallocate: true,
            max_group_records: 64,
            checkpoint_interval: None,
            checkpoint_key: None,
            refusal_records: svs_appliance::config::DEFAULT_REFUSAL_RECORDS,
        })
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for _ in 0..notes {
            rt.block_on(trail.note("selftest", "ok".into())).unwrap();
        }
        trail.close();
    }

    #[test]
    fn unkeyed_verification_says_what_it_does_not_prove() {
        let dir = tempfile::tempdir().unwrap();
        trail(dir.path(), 3);
        let r = verify(dir.path(), &AuditKey::Skip, &VerifyArgs::default()).unwrap();
        assert!(
            r.text
                .contains("NOT against someone who can rewrite the files"),
            "{}",
            r.text
        );
    }

    #[test]
    fn a_trail_without_its_oldest_file_fails_unless_pruning_is_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        trail(dir.path(), 30);
        let files = trail_files(dir.path()).unwrap();
        std::fs::remove_file(&files[0].1).unwrap();
        let first = files[1].0;
        let e = verify(dir.path(), &AuditKey::Skip, &VerifyArgs::default()).unwrap_err();
        assert_eq!(e.exit_code(), 10);
        let m = e.to_string();
        assert!(m.contains(&format!("starts at seq {first}, not 1")), "{m}");
        assert!(m.contains(&format!("--from-seq {first}")), "{m}");
        let args = VerifyArgs {
            from_seq: Some(first),
            ..Default::default()
        };
        let r = verify(dir.path(), &AuditKey::Skip, &args).unwrap();
        assert!(r.text.contains("were pruned"), "{}", r.text);
        assert_eq!(r.json["pruned_before"], first);
    }

    #[test]
    fn summaries_of_suppressed_refusals_verify_and_show_like_any_note() {
        let dir = tempfile::tempdir().unwrap();
        let trail = svs_appliance::audit::AuditTrail::open(&svs_appliance::config::AuditConfig {
            dir: dir.path().to_path_buf(),
            max_file_bytes: 1 << 20,
            preallocate: true,
            max_group_records: 64,
            checkpoint_interval: None,
            checkpoint_key: None,
            refusal_records: svs_appliance::config::DEFAULT_REFUSAL_RECORDS,
        })
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            trail.note("start", "svsd started".into()).await.unwrap();
            trail
                .notes(
                    svs_appliance::refusals::SUMMARY_KIND,
                    vec![
                        "entity=app1 suppressed=1900 sign:rate_limited=1900".into(),
                        "entity=_unknown suppressed=7 sign:unauthenticated=7".into(),
                    ],
                )
                .await
                .unwrap();
            trail.note("stop", "svsd stopped".into()).await.unwrap();
        });
        trail.close();
        let r = verify(dir.path(), &AuditKey::Skip, &VerifyArgs::default()).unwrap();
        assert_eq!(r.json["records"], 4, "{}", r.json);
        let shown = show(
            dir.path(),
            &ShowFilter {
                kind: Some("refusals_suppressed".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(shown.json["records"].as_array().unwrap().len(), 2);
        assert!(
            shown
                .text
                .contains("refusals_suppressed entity=app1 suppressed=1900 sign:rate_limited=1900"),
            "{}",
            shown.text
        );
    }

    #[test]
    fn break_messages_locate_the_damage() {
        let b = ChainBreak {
            file: PathBuf::from("/a/audit-00000000000000000001.jsonl"),
            line: 7,
            seq: Some(7),
            kind: BreakKind::Deleted { from: 5, to: 6 },
            detail: "expected seq 5, found 7".into(),
        };
        let m = break_message(&b);
        assert!(
            m.contains("audit-00000000000000000001.jsonl:7 (seq 7)"),
            "{m}"
        );
        assert!(m.contains("records 5 to 6 are missing"), "{m}");
    }
}
