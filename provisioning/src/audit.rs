//! `audit verify` and `audit show`: the auditor's commands. Neither needs a
//! PIN: the trail is read from disk and the audit key's public half is a
//! public token object (or a file). `audit anchor`: the security officer's
//! view of the trail's head kept on the token (a private object: PIN).

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use std::time::{Duration, SystemTime};

use svs_appliance::audit::{
    BreakKind, CHECKPOINT_SLACK, ChainBreak, ChainReport, VerifyOptions, trail_files,
    verify_dir_with,
};

use crate::Report;
use crate::error::{ProvisionError, Result};
use crate::pin::PinReader;
use crate::token::Opened;

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
        BreakKind::BadCheckpoint => {
            "a checkpoint does not check out (its signature, or the head it signs against the record it names): records before it were altered and the chain recomputed, or the checkpoint itself was altered".into()
        }
        BreakKind::TimeWentBack => {
            "the record is dated earlier than the one before it, which svsd never writes: records were rewritten or moved".into()
        }
        // svsd completes and syncs a file before it starts the next, and
        // crash recovery only ever cuts the newest: a torn line elsewhere
        // was made after the fact.
        BreakKind::TornTail => {
            "the last line of a file that is not the newest is incomplete: svsd completed that file before it started the next, so it was cut or altered afterwards".into()
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
        BreakKind::TimeWentBack => "time_went_back",
        BreakKind::TornTail => "torn_tail",
        BreakKind::BadFileName => "bad_file_name",
        BreakKind::MissingStart { .. } => "missing_start",
        BreakKind::Unsigned { .. } => "unsigned_tail",
    }
}

/// What the records before a break are worth: a chain that holds proves
/// nothing against someone able to rewrite the files (they recompute it),
/// so only what a verified checkpoint signed is proven; the damage may lie
/// anywhere after that.
fn proven(b: &ChainBreak) -> String {
    let chained = if matches!(b.kind, BreakKind::Unsigned { .. }) {
        "the whole chain holds together"
    } else {
        "the records before this line hold together as a chain"
    };
    match (b.signatures_checked, b.signed_through) {
        (false, _) => format!(
            "Without the audit key nothing is proven: {chained}, which someone able to rewrite the files can recompute"
        ),
        (true, None) => format!(
            "No record is proven: no checkpoint verified before this point, and {chained} only as far as a recomputed chain would"
        ),
        (true, Some(seq)) => format!(
            "Records up to seq {seq} are proven (signed by the last checkpoint that verified); after seq {seq}, {chained} only as far as a recomputed chain would, so the damage may lie anywhere from seq {} on",
            seq + 1
        ),
    }
}

/// The message for a break: where, what, and what to do.
pub fn break_message(b: &ChainBreak) -> String {
    let before = proven(b);
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

/// What the checkpoints prove about the trail's extent in time. Record
/// times are signed by nothing; only a v2 checkpoint's own time is.
fn coverage_text(report: &ChainReport) -> String {
    let allowed = report
        .interval
        .map(|i| {
            format!(
                " (checkpoint interval {}s + {}s)",
                i.as_secs(),
                CHECKPOINT_SLACK.as_secs()
            )
        })
        .unwrap_or_default();
    let span = report
        .uncovered_span
        .map(|s| format!(" {}s", s.as_secs()))
        .unwrap_or_default();
    let mut text = match (
        report.signed_through,
        &report.signed_at,
        report.time_signed_through,
    ) {
        (Some(seq), Some(at), Some(timed)) => {
            let mut t = format!("signed through seq {seq}");
            if timed != seq {
                t.push_str(&format!(
                    " (the newest checkpoint with a signed time covers seq {timed})"
                ));
            }
            t.push_str(&format!(
                "; that checkpoint was signed at {at} (the time is inside the signature); the {} records after seq {timed} are dated{span} after it by their own (unsigned) times, within the allowance{allowed}\n",
                report.last_seq - timed
            ));
            if let Some(age) = report.signed_age {
                t.push_str(&format!(
                    "live: that checkpoint was signed {}s ago by this machine's clock\n",
                    age.as_secs()
                ));
            }
            t
        }
        (Some(seq), _, _) => format!(
            "signed through seq {seq}, by checkpoints of format v1 that do not sign their time: when the {} records after seq {seq} were written rests on their own unsigned times ({span} after the checkpoint's record), so coverage is NOT proven: records rewritten or removed after seq {seq} cannot be excluded. An svsd of this version signs its checkpoints' times (v2): verify again once one is written\n",
            report.last_seq - seq,
            span = if span.is_empty() {
                "an unmeasured time"
            } else {
                span.trim()
            }
        ),
        _ => format!(
            "no signed checkpoint: by the records' own (unsigned) times the trail spans{span}, within the allowance{allowed}, but nothing proves it: every record could have been rewritten\n"
        ),
    };
    if report.v1_checkpoints > 0 {
        text.push_str(&format!(
            "note: {} checkpoints are of format v1 (written by an older svsd): their signatures cover the chain up to their heads, not the time\n",
            report.v1_checkpoints
        ));
    }
    text
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
            "audit directory {} does not exist",
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
            text.push_str(&coverage_text(&report));
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
            "time_signed_through": report.time_signed_through,
            "v1_checkpoints": report.v1_checkpoints,
            "interval_s": report.interval.map(|i| i.as_secs()),
            "uncovered_span_s": report.uncovered_span.map(|s| s.as_secs()),
            "signed_age_s": report.signed_age.map(|s| s.as_secs()),
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
    /// What svsd's configuration names, when it was given.
    pub configured: Option<Configured>,
}

/// The entity and key names svsd's configuration knows: a filter naming
/// neither one of them nor anything in the trail is most likely mistyped.
/// Not an error: records outlive the entities and keys they name.
#[derive(Debug, Clone, Default)]
pub struct Configured {
    /// Entity names (svsd.toml and the entities file).
    pub entities: Vec<String>,
    /// Exposed key names, and the audit key's label (checkpoints name it).
    pub keys: Vec<String>,
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

/// `audit anchor`: shows the token's audit anchor; with `reset`, deletes it
/// (after the operator typed its label, unless `yes`).
pub fn anchor(
    opened: &Opened,
    pins: &mut PinReader,
    label: &str,
    reset: bool,
    yes: bool,
) -> Result<Report> {
    let session = opened.user_session(pins)?;
    let values = svs_hsm::data::read(&session, label)?;
    let head = svs_appliance::audit::anchor_head(&values)
        .map_err(|e| ProvisionError::AuditBroken(format!("the audit anchor '{label}' holds {e}")));
    let shown = match &head {
        Ok(Some(c)) => format!(
            "audit anchor '{label}' on token '{}': the trail reached seq {} (hash {}) at {}",
            opened.label,
            c.head_seq,
            svs_hsm::keys::hex(&c.head),
            c.signed_at
        ),
        Ok(None) => format!("token '{}' holds no audit anchor '{label}'", opened.label),
        Err(e) => e.to_string(),
    };
    if !reset {
        let c = head?;
        return Ok(Report {
            text: format!("{shown}\n"),
            json: match c {
                Some(c) => json!({
                    "label": label,
                    "seq": c.head_seq,
                    "head": svs_hsm::keys::hex(&c.head),
                    "time": c.signed_at,
                }),
                None => json!({"label": label, "seq": null}),
            },
        });
    }
    if values.is_empty() {
        return Err(ProvisionError::NotFound(format!(
            "{shown}; nothing to reset"
        )));
    }
    if !yes {
        crate::pin::confirm(
            &format!(
                "{shown}. Deleting it lets svsd start a new trail without the old one: do this only once that trail is archived or ended on purpose."
            ),
            label,
        )?;
    }
    // Not before the confirmation (an officer at its prompt would hold up
    // every other run). The anchor shown is not checked again: svsd moves
    // it on as its trail grows, and takes no lock of ours.
    let _changing = crate::token::lock_changes()?;
    let removed = svs_hsm::data::remove(&session, label)?;
    Ok(Report {
        text: format!(
            "{shown}\ndeleted ({removed} object(s)); svsd's next start begins the anchor anew\n"
        ),
        json: json!({"label": label, "objects_deleted": removed}),
    })
}

/// `audit show`: records matching the filter, oldest first, and a note
/// for standard error on an `--entity` or `--key` that looks mistyped.
pub fn show(dir: &Path, f: &ShowFilter) -> Result<(Report, Option<String>)> {
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
    let (mut entity_seen, mut key_seen) = (false, false);
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
            entity_seen |= f.entity.is_some() && field("entity") == f.entity.as_deref();
            key_seen |= f.key.is_some() && field("key") == f.key.as_deref();
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
            "note: {unreadable} lines were not readable records; run `{}` to locate damage\n",
            crate::cli::command(&format!(
                "audit verify --dir {}",
                crate::cli::shell_word(&dir.to_string_lossy())
            ))
        ));
    }
    text.push_str("(this listing does not check the hash chain: `audit verify` does)\n");
    let mut note = String::new();
    if let Some(c) = &f.configured {
        for (what, wanted, seen, known) in [
            ("entity", &f.entity, entity_seen, &c.entities),
            ("key", &f.key, key_seen, &c.keys),
        ] {
            if let Some(name) = wanted
                && !seen
                && !known.contains(name)
            {
                note.push_str(&format!(
                    "note: no {what} named '{name}' is configured; configured: {}. No record names it either: check the spelling\n",
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                ));
            }
        }
    }
    Ok((
        Report {
            text,
            json: json!({"records": out, "unreadable_lines": unreadable}),
        },
        (!note.is_empty()).then_some(note),
    ))
}

/// The audit directory: `--dir`, else svsd's `[audit] dir`; refused,
/// naming where it came from, when it is no directory.
pub fn dir_from(
    dir: Option<PathBuf>,
    config: Option<&svs_appliance::config::Config>,
) -> Result<PathBuf> {
    let (dir, source) = match (dir, config) {
        (Some(d), _) => (d, "--dir".to_owned()),
        (None, Some(c)) => (
            c.audit.dir.clone(),
            format!("svsd's [audit] dir in {}", c.path.display()),
        ),
        (None, None) => {
            return Err(ProvisionError::Usage(
                "which audit trail? give --dir DIR, or --config /etc/svs/svsd.toml to use svsd's [audit] dir".into(),
            ));
        }
    };
    match std::fs::metadata(&dir) {
        Ok(m) if m.is_dir() => Ok(dir),
        Ok(_) => Err(ProvisionError::Usage(format!(
            "{} is not a directory ({source}): give the audit directory",
            dir.display()
        ))),
        Err(_) => Err(ProvisionError::NotFound(format!(
            "audit directory {} does not exist ({source})",
            dir.display()
        ))),
    }
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

    /// A new trail in `dir` (files of `max_file_bytes`) and a runtime to write it with.
    fn open_trail(
        dir: &Path,
        max_file_bytes: u64,
    ) -> (svs_appliance::audit::AuditTrail, tokio::runtime::Runtime) {
        let trail = svs_appliance::audit::AuditTrail::open(
            &svs_appliance::config::AuditConfig::without_token(dir.to_path_buf(), max_file_bytes),
            None,
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        (trail, rt)
    }

    fn trail(dir: &Path, notes: usize) {
        let (trail, rt) = open_trail(dir, 1024);
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
        let (trail, rt) = open_trail(dir.path(), 1 << 20);
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
        let (shown, _) = show(
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
    fn a_filter_naming_nothing_configured_or_recorded_gets_a_note() {
        let dir = tempfile::tempdir().unwrap();
        let (trail, rt) = open_trail(dir.path(), 1 << 20);
        let op = |entity: &str, key: &str| svs_appliance::audit::AuditEvent {
            entity: entity.into(),
            op: "sign",
            key: Some(key.into()),
            input_sm3: None,
            output_sm3: None,
            outcome: "ok".into(),
            latency_us: 1,
        };
        rt.block_on(trail.append(vec![op("bank-a", "sign"), op("retired", "old-key")]))
            .unwrap();
        trail.close();
        let configured = Configured {
            entities: vec!["bank-a".into(), "bank-b".into()],
            keys: vec!["sign".into()],
        };
        let shown = |entity: &str, key: Option<&str>, configured: Option<Configured>| {
            show(
                dir.path(),
                &ShowFilter {
                    entity: Some(entity.into()),
                    key: key.map(str::to_owned),
                    configured,
                    ..Default::default()
                },
            )
            .unwrap()
        };
        let (r, note) = shown("bank_a", Some("sgn"), Some(configured.clone()));
        assert!(r.text.contains("no matching records"), "{}", r.text);
        let note = note.expect("a typo gets a note");
        assert!(
            note.contains("no entity named 'bank_a' is configured; configured: bank-a, bank-b"),
            "{note}"
        );
        assert!(
            note.contains("no key named 'sgn' is configured; configured: sign"),
            "{note}"
        );
        // Configured but idle, or named by old records only: no note.
        assert_eq!(shown("bank-b", None, Some(configured.clone())).1, None);
        let (r, note) = shown("retired", Some("old-key"), Some(configured));
        assert_eq!(
            (r.json["records"].as_array().unwrap().len(), note),
            (1, None)
        );
        // Without svsd's configuration nothing is known to compare with.
        assert_eq!(shown("bank_a", None, None).1, None);
    }

    #[test]
    fn break_messages_locate_the_damage() {
        let b = ChainBreak {
            file: PathBuf::from("/a/audit-00000000000000000001.jsonl"),
            line: 7,
            seq: Some(7),
            kind: BreakKind::Deleted { from: 5, to: 6 },
            detail: "expected seq 5, found 7".into(),
            signatures_checked: false,
            signed_through: None,
        };
        let m = break_message(&b);
        assert!(
            m.contains("audit-00000000000000000001.jsonl:7 (seq 7)"),
            "{m}"
        );
        assert!(m.contains("records 5 to 6 are missing"), "{m}");
        assert!(m.contains("Without the audit key nothing is proven"), "{m}");
    }

    #[test]
    fn coverage_is_claimed_only_from_a_signed_time() {
        let v1 = ChainReport {
            records: 20,
            last_seq: 20,
            signed_through: Some(10),
            v1_checkpoints: 1,
            interval: Some(Duration::from_secs(300)),
            uncovered_span: Some(Duration::from_secs(5)),
            ..Default::default()
        };
        let t = coverage_text(&v1);
        assert!(t.contains("coverage is NOT proven"), "{t}");
        assert!(!t.contains("within the allowance"), "{t}");
        assert!(t.contains("1 checkpoints are of format v1"), "{t}");
        let none = ChainReport {
            signed_through: None,
            v1_checkpoints: 0,
            ..v1.clone()
        };
        assert!(coverage_text(&none).contains("nothing proves it"));
        let v2 = ChainReport {
            signed_at: Some("2027-01-15T08:00:01.000000Z".into()),
            time_signed_through: Some(10),
            v1_checkpoints: 0,
            signed_age: Some(Duration::from_secs(7)),
            ..v1
        };
        let t = coverage_text(&v2);
        assert!(
            t.contains("signed at 2027-01-15T08:00:01.000000Z (the time is inside the signature)"),
            "{t}"
        );
        assert!(t.contains("signed 7s ago"), "{t}");
    }

    #[test]
    fn a_break_names_the_records_proven_not_those_before_the_line() {
        // A record before seq 4450 altered and the chain recomputed: the
        // checkpoint notices, and only what the previous one signed holds.
        let b = ChainBreak {
            file: PathBuf::from("/a/audit-00000000000000004450.jsonl"),
            line: 1,
            seq: Some(4450),
            kind: BreakKind::BadCheckpoint,
            detail: "head does not match the hash of seq 4449".into(),
            signatures_checked: true,
            signed_through: Some(16),
        };
        let m = break_message(&b);
        assert!(!m.contains("Records before this line check out"), "{m}");
        assert!(m.contains("Records up to seq 16 are proven"), "{m}");
        assert!(m.contains("anywhere from seq 17 on"), "{m}");
        let none = ChainBreak {
            signed_through: None,
            ..b.clone()
        };
        assert!(break_message(&none).contains("No record is proven"));
        // A torn line in an older file is no crash of an unacknowledged write.
        let torn = ChainBreak {
            kind: BreakKind::TornTail,
            ..b
        };
        let m = break_message(&torn);
        assert!(!m.contains("never acknowledged"), "{m}");
        assert!(m.contains("not the newest"), "{m}");
    }
}
