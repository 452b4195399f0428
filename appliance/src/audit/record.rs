//! The record format: how a record is serialised and hashed into the
//! chain, the checkpoint text a checkpoint signs, and the time and hex
//! encodings records use. Shared by the writer, recovery and `verify`.

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use svs_hsm::keys::hex;

use super::{Entry, sm3};

/// A record without its hash: what is serialised and hashed. Fields borrow
/// when a record is written (no allocation per record on the commit path)
/// and own when one is read back.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Body<'a> {
    pub(super) seq: u64,
    pub(super) time: Cow<'a, str>,
    #[serde(rename = "type")]
    pub(super) kind: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) entity: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) op: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) key: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) input_sm3: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) output_sm3: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) outcome: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) latency_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) head_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) head: Option<Cow<'a, str>>,
    // Present on v2 checkpoints only: see [`Checkpoint`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) signed_at: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) interval_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) signature: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) detail: Option<Cow<'a, str>>,
    pub(super) prev: Cow<'a, str>,
}

const HASH_SUFFIX_LEN: usize = r#","hash":""}"#.len() + 64;
pub(super) const GENESIS: [u8; 32] = [0; 32];

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

/// Lower-case hex of a 32-byte value into `buf`, without allocating.
fn hex32<'b>(bytes: &[u8; 32], buf: &'b mut [u8; 64]) -> &'b str {
    // 64 output bytes for 32 input bytes: the length always fits.
    base16ct::lower::encode_str(bytes, buf).unwrap_or_default()
}

/// Appends the record line for `entry` to `out` and returns its hash.
/// `time` is the group's commit time, rendered once per group.
pub(super) fn render(
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
pub(super) fn write_body(body: &Body, out: &mut Vec<u8>) -> Result<[u8; 32], serde_json::Error> {
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

/// Splits a line into its hashed body (with `}` restored) and its hash.
pub(super) fn split_line(line: &[u8]) -> Option<(Vec<u8>, [u8; 32])> {
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

/// Exactly 64 lower-case hex digits, as the trail writes its hashes.
pub(super) fn unhex32(s: &[u8]) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    let decoded = base16ct::lower::decode(s, &mut out).ok()?.len();
    (decoded == 32).then_some(out)
}

/// Parses the trail's own time format (`YYYY-MM-DDTHH:MM:SS.ffffffZ`) into
/// time since the epoch.
pub(super) fn parse_rfc3339(s: &str) -> Option<Duration> {
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

pub(super) fn unhex(s: &str) -> Option<Vec<u8>> {
    base16ct::mixed::decode_vec(s).ok()
}
