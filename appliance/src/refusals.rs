//! How many refused requests get an audit record of their own.
//!
//! A refusal costs the client nothing (a 429 takes no token; a wrong media
//! type or a forbidden operation is checked before the bucket) but an
//! audit record costs a durable write. Unbounded, one client could write
//! refusal records as fast as it can send: fill the audit disk (the trail
//! breaks and signing stops for every tenant) and slow every group commit
//! meanwhile. So each source (an entity, or all unknown clients together)
//! has a token bucket of refusal records (`[audit] refusal_records`).
//! Refusals past it are not written one by one but counted per operation
//! and error code, and [`crate::app::App::flush_refusals`] writes one
//! `refusals_suppressed` note per source every second: the trail still
//! accounts for every refusal in number, and the chain stays whole.
//!
//! Successful operations never pass through here: every answered signature
//! is in the trail before its answer leaves.
//!
//! Memory is bounded: sources are configured entity names plus one label
//! for unknown clients, and the counts per source are keyed by fixed
//! operation names and error codes. A source whose bucket is full and that
//! has nothing to report is forgotten at the next flush (a new one starts
//! full: nothing changes), so entities removed by a reload do not linger.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::RateLimit;

/// The `type` of the audit note that counts suppressed refusals.
pub const SUMMARY_KIND: &str = "refusals_suppressed";

#[derive(Debug)]
struct Source {
    tokens: f64,
    last: Instant,
    /// Refusals counted instead of recorded since the last summary, by
    /// (operation, error code).
    suppressed: BTreeMap<(&'static str, &'static str), u64>,
}

impl Source {
    fn refill(&mut self, rate: RateLimit, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second).min(f64::from(rate.burst));
        self.last = now;
    }
}

/// Refusals of one source not recorded one by one since the last summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The entity, or [`crate::app::UNKNOWN_ENTITY`].
    pub source: String,
    /// Count by (operation, error code).
    pub counts: BTreeMap<(&'static str, &'static str), u64>,
}

impl Summary {
    /// All refusals it counts.
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    /// The note's `detail`: `entity=NAME suppressed=TOTAL OP:CODE=N …`.
    /// Configured names and fixed codes only: nothing the client sent.
    pub fn detail(&self) -> String {
        let mut s = format!("entity={} suppressed={}", self.source, self.total());
        for ((op, code), n) in &self.counts {
            s.push_str(&format!(" {op}:{code}={n}"));
        }
        s
    }
}

/// Per-source token buckets of refusal records, and what they held back.
#[derive(Debug)]
pub struct RefusalRecords {
    rate: RateLimit,
    sources: Mutex<HashMap<String, Source>>,
}

impl RefusalRecords {
    /// Buckets of `rate` (each source starts full).
    pub fn new(rate: RateLimit) -> RefusalRecords {
        RefusalRecords {
            rate,
            sources: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a refusal of `source` gets its own record now; if not, it
    /// is counted for the next summary.
    pub fn admit(&self, source: &str, op: &'static str, code: &'static str) -> bool {
        self.admit_at(source, op, code, Instant::now())
    }

    fn admit_at(&self, source: &str, op: &'static str, code: &'static str, now: Instant) -> bool {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let s = match sources.get_mut(source) {
            Some(s) => s,
            None => sources.entry(source.to_owned()).or_insert(Source {
                tokens: f64::from(self.rate.burst),
                last: now,
                suppressed: BTreeMap::new(),
            }),
        };
        s.refill(self.rate, now);
        if s.tokens >= 1.0 {
            s.tokens -= 1.0;
            true
        } else {
            *s.suppressed.entry((op, code)).or_insert(0) += 1;
            false
        }
    }

    /// Takes what every source held back since the last call, sources in
    /// name order, and forgets sources with nothing held back and a full
    /// bucket.
    pub fn take(&self) -> Vec<Summary> {
        self.take_at(Instant::now())
    }

    fn take_at(&self, now: Instant) -> Vec<Summary> {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        let rate = self.rate;
        sources.retain(|name, s| {
            if !s.suppressed.is_empty() {
                out.push(Summary {
                    source: name.clone(),
                    counts: std::mem::take(&mut s.suppressed),
                });
                return true;
            }
            s.refill(rate, now);
            s.tokens < f64::from(rate.burst)
        });
        out.sort_by(|a, b| a.source.cmp(&b.source));
        out
    }
}

/// Lets a log line that clients can trigger at will through at most once
/// per period, counting the ones held back.
#[derive(Debug)]
pub struct LogLimit {
    every: Duration,
    state: Mutex<LogState>,
}

#[derive(Debug, Default)]
struct LogState {
    last: Option<Instant>,
    held_back: u64,
}

impl LogLimit {
    /// At most one line per `every`.
    pub fn new(every: Duration) -> LogLimit {
        LogLimit {
            every,
            state: Mutex::new(LogState::default()),
        }
    }

    /// One occurrence: `Some(n)` when it is to be logged now, `n` being
    /// the occurrences held back since the last line; `None` to stay quiet.
    pub fn hit(&self) -> Option<u64> {
        self.hit_at(Instant::now())
    }

    /// [`LogLimit::hit`] at `now`.
    pub(crate) fn hit_at(&self, now: Instant) -> Option<u64> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match st.last {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                st.held_back += 1;
                None
            }
            _ => {
                st.last = Some(now);
                Some(std::mem::take(&mut st.held_back))
            }
        }
    }

    /// Occurrences held back and not reported by a later line, once the
    /// period since the last line is over (so that a burst's tail is
    /// reported even when nothing follows it).
    pub fn held_back(&self) -> Option<u64> {
        self.held_back_at(Instant::now())
    }

    fn held_back_at(&self, now: Instant) -> Option<u64> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let due = st
            .last
            .is_some_and(|last| now.saturating_duration_since(last) >= self.every);
        if due && st.held_back > 0 {
            st.last = Some(now);
            Some(std::mem::take(&mut st.held_back))
        } else {
            None
        }
    }
}

/// A [`LogLimit`] per kind of line, for lines of a fixed set of kinds (an
/// error code; a listener and a reason): a flood of one kind does not
/// silence the others, and each kind's held-back count is its own.
#[derive(Debug)]
pub struct LogLimits<K> {
    every: Duration,
    kinds: Mutex<BTreeMap<K, LogLimit>>,
}

impl<K: Ord + Copy> LogLimits<K> {
    /// At most one line per `every` of each kind. `const` for statics.
    pub const fn new(every: Duration) -> LogLimits<K> {
        LogLimits {
            every,
            kinds: Mutex::new(BTreeMap::new()),
        }
    }

    /// [`LogLimit::hit`] for `kind`.
    pub fn hit(&self, kind: K) -> Option<u64> {
        self.hit_at(kind, Instant::now())
    }

    /// [`LogLimits::hit`] at `now`.
    pub(crate) fn hit_at(&self, kind: K, now: Instant) -> Option<u64> {
        self.kinds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(kind)
            .or_insert_with(|| LogLimit::new(self.every))
            .hit_at(now)
    }

    /// [`LogLimit::held_back`] of every kind that has any, in kind order.
    pub fn held_back(&self) -> Vec<(K, u64)> {
        self.held_back_at(Instant::now())
    }

    fn held_back_at(&self, now: Instant) -> Vec<(K, u64)> {
        let kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        kinds
            .iter()
            .filter_map(|(k, l)| Some((*k, l.held_back_at(now)?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const RATE: RateLimit = RateLimit {
        per_second: 20.0,
        burst: 100,
    };

    #[test]
    fn a_source_records_its_burst_then_counts_and_refills_at_the_rate() {
        let r = RefusalRecords::new(RATE);
        let t0 = Instant::now();
        let recorded = (0..1000)
            .filter(|_| r.admit_at("a", "sign", "rate_limited", t0))
            .count();
        assert_eq!(recorded, 100);
        // Another source has its own bucket.
        assert!(r.admit_at(crate::app::UNKNOWN_ENTITY, "sign", "unauthenticated", t0));
        // 20/s: half a second later ten more are recorded.
        let t1 = t0 + Duration::from_millis(500);
        let later = (0..50)
            .filter(|_| r.admit_at("a", "verify", "unsupported_media_type", t1))
            .count();
        assert_eq!(later, 10);
        let s = r.take_at(t1);
        assert_eq!(s.len(), 1, "{s:?}");
        assert_eq!(s[0].source, "a");
        assert_eq!(s[0].total(), 900 + 40);
        assert_eq!(
            s[0].detail(),
            "entity=a suppressed=940 sign:rate_limited=900 verify:unsupported_media_type=40"
        );
        // Taken once: the next summary starts from zero.
        assert!(r.take_at(t1).is_empty());
    }

    #[test]
    fn idle_sources_with_a_full_bucket_are_forgotten() {
        let r = RefusalRecords::new(RATE);
        let t0 = Instant::now();
        for name in ["a", "b"] {
            assert!(r.admit_at(name, "sign", "key_not_allowed", t0));
        }
        assert!(r.take_at(t0).is_empty());
        assert_eq!(r.sources.lock().unwrap().len(), 2, "buckets not full yet");
        assert!(r.take_at(t0 + Duration::from_secs(1)).is_empty());
        assert!(r.sources.lock().unwrap().is_empty());
    }

    #[test]
    fn a_zero_burst_records_nothing_one_by_one() {
        let r = RefusalRecords::new(RateLimit {
            per_second: 5.0,
            burst: 0,
        });
        let t0 = Instant::now();
        for i in 0..10 {
            let at = t0 + Duration::from_secs(i);
            assert!(!r.admit_at("a", "sign", "rate_limited", at));
        }
        assert_eq!(r.take_at(t0 + Duration::from_secs(10))[0].total(), 10);
    }

    #[test]
    fn a_limited_log_line_goes_out_once_per_period_with_the_count_held_back() {
        let l = LogLimit::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(l.hit_at(t0), Some(0));
        for _ in 0..99 {
            assert_eq!(l.hit_at(t0 + Duration::from_millis(500)), None);
        }
        assert_eq!(l.held_back_at(t0 + Duration::from_millis(900)), None);
        assert_eq!(l.hit_at(t0 + Duration::from_secs(1)), Some(99));
        assert_eq!(l.hit_at(t0 + Duration::from_millis(1500)), None);
        // The tail of a burst with nothing after it.
        assert_eq!(l.held_back_at(t0 + Duration::from_secs(2)), Some(1));
        assert_eq!(l.held_back_at(t0 + Duration::from_secs(5)), None);
    }

    #[test]
    fn each_kind_of_line_has_its_own_period_and_count() {
        let l = LogLimits::new(Duration::from_secs(1));
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let (refused, timeout) = (("api", "refused"), ("api", "timeout"));
        // 13,000 a second of one kind (the reviewer's flood) give one line.
        assert_eq!(l.hit_at(refused, t0), Some(0));
        let lines = (1..13_000)
            .filter(|i| l.hit_at(refused, at(i * 999 / 13_000)).is_some())
            .count();
        assert_eq!(lines, 0);
        // Another kind is not silenced by the flood.
        assert_eq!(l.hit_at(timeout, at(10)), Some(0));
        assert_eq!(l.hit_at(timeout, at(20)), None);
        assert!(l.held_back_at(at(999)).is_empty());
        // The next line of a kind carries its own count.
        assert_eq!(l.hit_at(refused, at(1000)), Some(12_999));
        // Tails: only the kinds with something held back, in kind order.
        assert_eq!(l.hit_at(refused, at(1500)), None);
        assert_eq!(l.held_back_at(at(2500)), vec![(refused, 1), (timeout, 1)]);
        assert!(l.held_back_at(at(4000)).is_empty());
    }
}
