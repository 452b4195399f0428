//! Abnormal-traffic detection per entity (docs/monitoring.md).
//!
//! The regulations let the operator warn, suspend or cut off a using unit
//! whose access traffic is abnormal, so each entity's traffic is compared
//! with its own history: the request rate over a short window against a
//! slowly moving baseline (an exponentially weighted mean over the long
//! window), and the share of refused (answered 4xx) requests in the short
//! window. A flip in either verdict is logged and written to the audit
//! trail; with `enforce`, an entity whose rate is abnormal is throttled to
//! its baseline until the verdict clears.
//!
//! Rates count operations (each batch item one), but a verdict needs
//! evidence spread over time: `min_requests` HTTP requests in the short
//! window, arriving in at least `min_active_s` distinct seconds of it. One
//! request, however large its batch, is never a verdict on its own.
//!
//! The request path only bumps three atomics ([`Traffic::record`], once per
//! HTTP request) and, while a throttle is set, takes a token
//! ([`Traffic::admit`]). A background task
//! calls [`Traffic::tick`] once a second for every entity; that is where
//! windows move and verdicts change.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::error::SvsError;

/// The smallest `min_rate` accepted: one request in about 17 minutes. The
/// throttle's rate derives from it, and its Retry-After with it.
pub const MIN_RATE_FLOOR: f64 = 0.001;

/// The detector's parameters, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct AnomalyConfig {
    /// Whether the detector runs at all.
    pub enabled: bool,
    /// Seconds in the short window (the "now" rate and error ratio).
    pub short_window_s: u32,
    /// Time constant of the baseline, in seconds.
    pub long_window_s: u32,
    /// Seconds an entity is only observed (baseline = mean of the seconds,
    /// each capped, see [`Traffic::tick`]) before verdicts start; also after
    /// a restart, as the baseline is not persisted.
    pub warmup_s: u32,
    /// The short rate is abnormal above `rate_factor` × max(baseline, `min_rate`).
    pub rate_factor: f64,
    /// Requests per second below which no rate is abnormal (quiet entities
    /// have a baseline near zero).
    pub min_rate: f64,
    /// HTTP requests in the short window below which neither check gives a
    /// verdict (a batch is one request here, however many items it has).
    pub min_requests: u64,
    /// Seconds of the short window with at least one request below which
    /// neither check gives a verdict: the evidence must be spread over time.
    pub min_active_s: u32,
    /// Refused/failed share of the short window's requests that is abnormal.
    pub error_ratio: f64,
    /// Throttle an entity with an abnormal rate to its baseline.
    pub enforce: bool,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        AnomalyConfig {
            enabled: true,
            short_window_s: 60,
            long_window_s: 3600,
            warmup_s: 300,
            rate_factor: 3.0,
            min_rate: 1.0,
            min_requests: 30,
            min_active_s: default_min_active_s(60),
            error_ratio: 0.5,
            enforce: false,
        }
    }
}

/// `min_active_s` when not given: a quarter of the short window (15 of 60
/// seconds), so that a verdict takes traffic that lasted, not one burst,
/// while a flood still shows well before the window has filled.
fn default_min_active_s(short_window_s: u32) -> u32 {
    short_window_s.div_ceil(4).max(1)
}

/// `[anomaly]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAnomaly {
    enabled: Option<bool>,
    short_window_s: Option<u32>,
    long_window_s: Option<u32>,
    warmup_s: Option<u32>,
    rate_factor: Option<f64>,
    min_rate: Option<f64>,
    min_requests: Option<u64>,
    min_active_s: Option<u32>,
    error_ratio: Option<f64>,
    enforce: Option<bool>,
}

impl AnomalyConfig {
    /// Stage two of `[anomaly]`: defaults and checks; problems go to `errors`.
    pub(crate) fn from_raw(raw: RawAnomaly, errors: &mut Vec<String>) -> AnomalyConfig {
        let d = AnomalyConfig::default();
        let short_window_s = raw.short_window_s.unwrap_or(d.short_window_s);
        let c = AnomalyConfig {
            enabled: raw.enabled.unwrap_or(d.enabled),
            short_window_s,
            long_window_s: raw.long_window_s.unwrap_or(d.long_window_s),
            warmup_s: raw.warmup_s.unwrap_or(d.warmup_s),
            rate_factor: raw.rate_factor.unwrap_or(d.rate_factor),
            min_rate: raw.min_rate.unwrap_or(d.min_rate),
            min_requests: raw.min_requests.unwrap_or(d.min_requests),
            min_active_s: raw
                .min_active_s
                .unwrap_or_else(|| default_min_active_s(short_window_s)),
            error_ratio: raw.error_ratio.unwrap_or(d.error_ratio),
            enforce: raw.enforce.unwrap_or(d.enforce),
        };
        if !(1..=3600).contains(&c.short_window_s) {
            errors.push("[anomaly] short_window_s must be 1-3600".into());
        }
        if c.long_window_s < c.short_window_s.saturating_mul(2) {
            errors.push("[anomaly] long_window_s must be at least twice short_window_s".into());
        }
        if !(c.rate_factor.is_finite() && c.rate_factor > 1.0) {
            errors.push("[anomaly] rate_factor must be > 1".into());
        }
        if !(c.min_rate.is_finite() && c.min_rate >= MIN_RATE_FLOOR) {
            errors.push(format!(
                "[anomaly] min_rate must be at least {MIN_RATE_FLOOR}"
            ));
        }
        if c.min_requests == 0 {
            errors.push("[anomaly] min_requests must be > 0".into());
        }
        if c.min_active_s == 0 || c.min_active_s > c.short_window_s {
            errors.push("[anomaly] min_active_s must be 1-short_window_s".into());
        }
        if !(c.error_ratio > 0.0 && c.error_ratio <= 1.0) {
            errors.push("[anomaly] error_ratio must be in (0, 1]".into());
        }
        c
    }
}

/// Which check a verdict is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Short-window rate against the baseline.
    Rate,
    /// Share of refused (answered 4xx) requests.
    Errors,
}

impl Check {
    /// Label value and audit text.
    pub fn as_str(self) -> &'static str {
        match self {
            Check::Rate => "rate",
            Check::Errors => "errors",
        }
    }
}

/// A verdict that changed at a tick.
#[derive(Debug, Clone, PartialEq)]
pub struct Flip {
    /// The check.
    pub check: Check,
    /// The new verdict.
    pub abnormal: bool,
    /// The figures behind it.
    pub view: View,
}

/// What the detector currently thinks of one entity.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct View {
    /// Requests per second over the short window.
    pub short_rate: f64,
    /// Baseline requests per second.
    pub baseline: f64,
    /// Refused (answered 4xx) share of the short window (0 when empty).
    pub error_ratio: f64,
    /// Still in warm-up: no verdicts yet.
    pub learning: bool,
    /// Rate verdict.
    pub rate_abnormal: bool,
    /// Error-ratio verdict.
    pub errors_abnormal: bool,
    /// Requests are being throttled to the baseline.
    pub throttled: bool,
}

/// One second's counts.
#[derive(Debug, Default, Clone, Copy)]
struct Second {
    /// HTTP requests.
    requests: u64,
    /// Operations (each batch item one; a request refused before its items
    /// is one).
    ops: u64,
    /// Operations refused (answered 4xx).
    errors: u64,
}

#[derive(Debug, Default)]
struct State {
    /// Per-tick counts, newest last, at most the short window.
    ring: VecDeque<Second>,
    /// The ring's sums.
    sum: Second,
    /// Seconds in the ring with at least one request.
    active: u32,
    ticks: u64,
    /// Sum of the warm-up's (capped) seconds.
    learned: f64,
    baseline: f64,
    view: View,
}

#[derive(Debug)]
struct Throttle {
    per_second: f64,
    tokens: f64,
    last: Instant,
}

/// One entity's traffic record; kept across reloads with its limiter.
#[derive(Debug, Default)]
pub struct Traffic {
    requests: AtomicU64,
    ops: AtomicU64,
    errors: AtomicU64,
    state: Mutex<State>,
    throttled: AtomicBool,
    throttle: Mutex<Option<Throttle>>,
}

impl Traffic {
    /// Counts one HTTP request of `ops` operations (each batch item one),
    /// `errors` of them refused (answered 4xx). Called once per request: three
    /// relaxed atomics.
    pub fn record(&self, ops: u64, errors: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.ops.fetch_add(ops, Ordering::Relaxed);
        if errors > 0 {
            self.errors.fetch_add(errors, Ordering::Relaxed);
        }
    }

    /// The (requests, errors) recorded since the last tick.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> (u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }

    /// Admits `n` operations against the throttle, when one is set.
    pub fn admit(&self, n: usize, now: Instant) -> Result<(), SvsError> {
        // The common case (no throttle) costs one load.
        if !self.throttled.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut slot = self.throttle.lock().unwrap_or_else(|p| p.into_inner());
        let Some(t) = slot.as_mut() else {
            return Ok(());
        };
        let burst = t.per_second.max(1.0);
        let elapsed = now.saturating_duration_since(t.last).as_secs_f64();
        t.tokens = (t.tokens + elapsed * t.per_second).min(burst);
        t.last = now;
        // Every item costs a token. A batch larger than the bucket passes only
        // on a full bucket and leaves it in debt, so that batching cannot
        // exceed the throttle's rate.
        let need = (n as f64).min(burst);
        if t.tokens >= need {
            t.tokens -= n as f64;
            Ok(())
        } else {
            // A tiny rate makes a wait beyond what Duration holds, which
            // from_secs_f64 would panic on.
            let wait = Duration::try_from_secs_f64((need - t.tokens) / t.per_second)
                .unwrap_or(Duration::from_secs(u64::from(u32::MAX)));
            Err(SvsError::Throttled { retry_after: wait })
        }
    }

    /// The current view.
    pub fn view(&self) -> View {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).view
    }

    /// Moves the windows by one second and re-evaluates; returns the
    /// verdicts that changed.
    pub fn tick(&self, cfg: &AnomalyConfig, now: Instant) -> Vec<Flip> {
        let ops = self.ops.swap(0, Ordering::Relaxed);
        let second = Second {
            requests: self.requests.swap(0, Ordering::Relaxed),
            ops,
            errors: self.errors.swap(0, Ordering::Relaxed).min(ops),
        };
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let short = u64::from(cfg.short_window_s.max(1));
        // The short window's rate before this second, over its full length
        // even while it is still filling (see the warm-up below).
        let recent_rate = s.sum.ops as f64 / short as f64;
        s.ring.push_back(second);
        s.sum.requests += second.requests;
        s.sum.ops += second.ops;
        s.sum.errors += second.errors;
        s.active += u32::from(second.requests > 0);
        while s.ring.len() as u64 > short {
            if let Some(old) = s.ring.pop_front() {
                s.sum.requests -= old.requests;
                s.sum.ops -= old.ops;
                s.sum.errors -= old.errors;
                s.active -= u32::from(old.requests > 0);
            }
        }
        s.ticks += 1;
        let window = s.ring.len().max(1) as f64;
        let short_rate = s.sum.ops as f64 / window;
        let error_ratio = if s.sum.ops == 0 {
            0.0
        } else {
            s.sum.errors as f64 / s.sum.ops as f64
        };
        let before = s.view;
        if s.ticks <= u64::from(cfg.warmup_s) {
            // Learning: the baseline is the mean of the seconds so far, but
            // a second counts at most `rate_factor` × the recent rate (or
            // `min_rate`), the threshold a rate is judged by: a burst in the
            // warm-up, one big batch say, cannot set a high baseline. Traffic
            // that lasts raises the recent rate, and with it the cap, within
            // short_window_s / rate_factor seconds.
            let cap = cfg.rate_factor * recent_rate.max(cfg.min_rate);
            s.learned += (ops as f64).min(cap);
            s.baseline = s.learned / s.ticks as f64;
            s.view = View {
                short_rate,
                baseline: s.baseline,
                error_ratio,
                learning: true,
                ..View::default()
            };
            drop(s);
            self.set_throttle(None, now);
            return Vec::new();
        }
        let floor = s.baseline.max(cfg.min_rate);
        let limit = cfg.rate_factor * floor;
        // Evidence spread over time: enough requests, in enough distinct
        // seconds. One request, however many items, is never enough.
        let enough = s.sum.requests >= cfg.min_requests && s.active >= cfg.min_active_s;
        // 10% hysteresis, so a rate hovering at the threshold does not flap.
        let rate_abnormal = if before.rate_abnormal {
            enough && short_rate > 0.9 * limit
        } else {
            enough && short_rate > limit
        };
        let errors_abnormal = if before.errors_abnormal {
            enough && error_ratio > 0.9 * cfg.error_ratio
        } else {
            enough && error_ratio > cfg.error_ratio
        };
        // The baseline learns from the traffic, but an abnormal second counts
        // at most at the threshold, so a flood cannot teach itself normal
        // quickly (it still can, slowly: a lasting change of load is real).
        let x = if rate_abnormal {
            (ops as f64).min(limit)
        } else {
            ops as f64
        };
        let alpha = 1.0 - (-1.0 / f64::from(cfg.long_window_s.max(1))).exp();
        s.baseline += alpha * (x - s.baseline);
        let throttle = (cfg.enforce && rate_abnormal).then_some(floor);
        s.view = View {
            short_rate,
            baseline: s.baseline,
            error_ratio,
            learning: false,
            rate_abnormal,
            errors_abnormal,
            throttled: throttle.is_some(),
        };
        let view = s.view;
        drop(s);
        self.set_throttle(throttle, now);
        let mut flips = Vec::new();
        if rate_abnormal != before.rate_abnormal {
            flips.push(Flip {
                check: Check::Rate,
                abnormal: rate_abnormal,
                view,
            });
        }
        if errors_abnormal != before.errors_abnormal {
            flips.push(Flip {
                check: Check::Errors,
                abnormal: errors_abnormal,
                view,
            });
        }
        flips
    }

    /// Forgets verdicts and throttle (detection switched off by a reload).
    pub fn disable(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.view != View::default() || s.ticks != 0 {
            *s = State::default();
        }
        drop(s);
        self.set_throttle(None, Instant::now());
    }

    fn set_throttle(&self, per_second: Option<f64>, now: Instant) {
        let mut slot = self.throttle.lock().unwrap_or_else(|p| p.into_inner());
        match (per_second, slot.as_mut()) {
            (None, _) => *slot = None,
            // The rate follows the baseline; the bucket's fill carries on.
            (Some(r), Some(t)) => t.per_second = r,
            (Some(r), None) => {
                *slot = Some(Throttle {
                    per_second: r,
                    tokens: r.max(1.0),
                    last: now,
                })
            }
        }
        self.throttled.store(slot.is_some(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AnomalyConfig {
        AnomalyConfig {
            enabled: true,
            short_window_s: 10,
            long_window_s: 100,
            warmup_s: 20,
            rate_factor: 3.0,
            min_rate: 1.0,
            min_requests: 20,
            min_active_s: 3,
            error_ratio: 0.5,
            enforce: false,
        }
    }

    /// Runs `seconds` ticks at `rate` single-item requests per second,
    /// `errors` of them failed.
    fn run(t: &Traffic, c: &AnomalyConfig, seconds: u32, rate: u64, errors: u64) -> Vec<Flip> {
        let mut flips = Vec::new();
        for _ in 0..seconds {
            for i in 0..rate {
                t.record(1, u64::from(i < errors));
            }
            flips.extend(t.tick(c, Instant::now()));
        }
        flips
    }

    /// Runs `seconds` ticks with `requests` batches of `items` each per
    /// second, `errors` items of each batch failed.
    fn run_batches(
        t: &Traffic,
        c: &AnomalyConfig,
        seconds: u32,
        requests: u64,
        items: u64,
        errors: u64,
    ) -> Vec<Flip> {
        let mut flips = Vec::new();
        for _ in 0..seconds {
            for _ in 0..requests {
                t.record(items, errors);
            }
            flips.extend(t.tick(c, Instant::now()));
        }
        flips
    }

    #[test]
    fn a_burst_against_the_baseline_flips_and_clears() {
        let (t, c) = (Traffic::default(), cfg());
        // Warm-up at 5/s: no verdicts, baseline = mean, less what the cap
        // held back while the short window filled (its first 4 s counted
        // 3, 3, 3, 4.5: 4.675).
        assert!(run(&t, &c, 20, 5, 0).is_empty());
        assert!(t.view().learning);
        assert!((t.view().baseline - 4.675).abs() < 1e-9, "{:?}", t.view());
        // Steady traffic stays normal, even with noise up to 2×.
        assert!(run(&t, &c, 30, 10, 0).is_empty());
        assert!(!t.view().rate_abnormal);
        // A burst: 10 s at 100/s takes the short rate far over 3 × baseline.
        let flips = run(&t, &c, 10, 100, 0);
        assert_eq!(flips.len(), 1, "{flips:?}");
        assert_eq!(flips[0].check, Check::Rate);
        assert!(flips[0].abnormal);
        let v = t.view();
        assert!(v.rate_abnormal && !v.errors_abnormal);
        // The baseline was fed clipped values: it moved, but not far.
        assert!(v.baseline < 12.0, "baseline {}", v.baseline);
        // Back to normal: once the burst leaves the short window it clears.
        let flips = run(&t, &c, 20, 5, 0);
        assert_eq!(flips.len(), 1);
        assert!(!flips[0].abnormal);
        assert!(!t.view().rate_abnormal);
    }

    #[test]
    fn quiet_entities_need_min_rate_and_min_requests() {
        let (t, c) = (Traffic::default(), cfg());
        run(&t, &c, 20, 0, 0);
        // Baseline 0: 2/s is below 3 × min_rate (1/s).
        assert!(run(&t, &c, 10, 2, 0).is_empty());
        // 4/s is above it, with 40 requests in the window ≥ min_requests.
        let flips = run(&t, &c, 10, 4, 0);
        assert!(flips.iter().any(|f| f.check == Check::Rate && f.abnormal));
        // A handful of failures among few requests is no verdict.
        let t2 = Traffic::default();
        run(&t2, &c, 20, 1, 0);
        assert!(run(&t2, &c, 10, 1, 1).is_empty());
    }

    #[test]
    fn error_ratio_flips_on_its_own() {
        let (t, c) = (Traffic::default(), cfg());
        run(&t, &c, 30, 5, 0);
        let flips = run(&t, &c, 10, 5, 4);
        assert_eq!(flips.len(), 1);
        assert_eq!(flips[0].check, Check::Errors);
        assert!(t.view().errors_abnormal && !t.view().rate_abnormal);
        assert!(t.view().error_ratio > 0.5);
    }

    #[test]
    fn enforcement_throttles_to_the_baseline_until_it_clears() {
        let mut c = cfg();
        c.enforce = true;
        let t = Traffic::default();
        run(&t, &c, 30, 5, 0);
        let t0 = Instant::now();
        assert!(t.admit(1000, t0).is_ok(), "no throttle while normal");
        run(&t, &c, 10, 100, 0);
        assert!(t.view().throttled);
        let now = Instant::now();
        // The bucket holds about one second of the baseline (~5).
        let admitted = (0..50).filter(|_| t.admit(1, now).is_ok()).count();
        assert!((4..=8).contains(&admitted), "admitted {admitted}");
        let Err(SvsError::Throttled { retry_after }) = t.admit(1, now) else {
            panic!("expected a refusal")
        };
        assert!(retry_after > Duration::ZERO && retry_after < Duration::from_secs(1));
        // It refills at the baseline rate.
        assert!(t.admit(1, now + Duration::from_secs(1)).is_ok());
        run(&t, &c, 20, 5, 0);
        assert!(!t.view().throttled);
        assert!(t.admit(1000, Instant::now()).is_ok());
    }

    #[test]
    fn a_throttled_batch_costs_one_token_per_item() {
        let t = Traffic::default();
        let now = Instant::now();
        t.set_throttle(Some(2.0), now);
        t.throttled.store(true, Ordering::Relaxed);
        // A full bucket (2) lets a batch of 20 through, 18 tokens in debt...
        assert!(t.admit(20, now).is_ok());
        // ...so nothing passes until the debt is paid at 2/s: 9.5 s for one.
        let Err(SvsError::Throttled { retry_after }) = t.admit(1, now + Duration::from_secs(9))
        else {
            panic!("the debt must be paid first")
        };
        assert!(retry_after > Duration::from_millis(400), "{retry_after:?}");
        assert!(t.admit(1, now + Duration::from_millis(9500)).is_ok());
    }

    #[test]
    fn a_throttle_too_slow_for_a_duration_refuses_without_panicking() {
        let t = Traffic::default();
        let now = Instant::now();
        t.set_throttle(Some(1e-20), now);
        assert!(t.admit(1, now).is_ok());
        // The next token is 1e20 s away: more than a Duration holds.
        let Err(SvsError::Throttled { retry_after }) = t.admit(1, now) else {
            panic!("expected a refusal")
        };
        assert_eq!(retry_after, Duration::from_secs(u64::from(u32::MAX)));
        // And the configuration does not allow such rates in the first place.
        let mut errors = Vec::new();
        let raw: RawAnomaly = toml::from_str("min_rate = 1e-20\n").unwrap();
        AnomalyConfig::from_raw(raw, &mut errors);
        assert_eq!(errors, ["[anomaly] min_rate must be at least 0.001"]);
    }

    #[test]
    fn one_big_batch_is_no_verdict_and_no_throttle() {
        let mut c = cfg();
        c.enforce = true;
        // A quiet entity, past its warm-up.
        let t = Traffic::default();
        run(&t, &c, 20, 0, 0);
        // One verify batch of 256 items: 25.6/s over the 10 s window, far
        // over 3 × min_rate, but one request in one second.
        let mut flips = run_batches(&t, &c, 1, 1, 256, 0);
        flips.extend(run(&t, &c, 10, 0, 0));
        assert!(flips.is_empty(), "{flips:?}");
        // Nor do 20 such batches sent in the same second (min_requests met,
        // min_active_s not): a burst the rate limit is for, not a trend.
        flips = run_batches(&t, &c, 1, 20, 256, 0);
        flips.extend(run(&t, &c, 10, 0, 0));
        assert!(flips.is_empty(), "{flips:?}");
        assert!(!t.view().throttled);
        assert!(t.admit(1, Instant::now()).is_ok());
        // One batch of 40 items all naming a key the entity may not use.
        let t2 = Traffic::default();
        run(&t2, &c, 20, 0, 0);
        flips = run_batches(&t2, &c, 1, 1, 40, 40);
        flips.extend(run(&t2, &c, 5, 0, 0));
        assert!(flips.is_empty(), "{flips:?}");
    }

    #[test]
    fn sustained_abuse_is_still_flagged_and_throttled() {
        let mut c = cfg();
        c.enforce = true;
        let t = Traffic::default();
        run(&t, &c, 20, 0, 0);
        // Three batches of 100 items every second: the requests are spread
        // over the window, so the verdict comes once min_requests (20) and
        // min_active_s (3) are both met, at the 7th second.
        let mut seen = None;
        for second in 1..=10 {
            if run_batches(&t, &c, 1, 3, 100, 0)
                .iter()
                .any(|f| f.check == Check::Rate && f.abnormal)
            {
                seen.get_or_insert(second);
            }
        }
        assert_eq!(seen, Some(7), "{:?}", t.view());
        assert!(t.view().throttled);
        // Failing batches spread over time are an errors verdict too.
        let t2 = Traffic::default();
        run(&t2, &c, 20, 3, 0);
        let flips = run_batches(&t2, &c, 10, 3, 1, 1);
        assert!(
            flips.iter().any(|f| f.check == Check::Errors && f.abnormal),
            "{flips:?}"
        );
    }

    #[test]
    fn a_flood_in_the_warm_up_does_not_set_the_baseline() {
        let t = Traffic::default();
        let c = cfg();
        // A quiet warm-up with one second of 10000 operations in it: the
        // plain mean would be 500/s.
        run(&t, &c, 5, 0, 0);
        run_batches(&t, &c, 1, 10, 1000, 0);
        run(&t, &c, 14, 0, 0);
        assert!(t.view().learning);
        assert!(t.view().baseline < 0.2, "{:?}", t.view());
        // So 10/s, sustained, is abnormal after it.
        let flips = run(&t, &c, 10, 10, 0);
        assert!(
            flips.iter().any(|f| f.check == Check::Rate && f.abnormal),
            "{:?}",
            t.view()
        );
        // Traffic that lasts is learned: 100/s from the start of the
        // warm-up ends it with a baseline near 100.
        let t2 = Traffic::default();
        run(&t2, &c, 20, 100, 0);
        assert!(t2.view().baseline > 80.0, "{:?}", t2.view());
        assert!(run(&t2, &c, 20, 100, 0).is_empty());
    }

    #[test]
    fn config_defaults_and_every_error_at_once() {
        let mut errors = Vec::new();
        let c = AnomalyConfig::from_raw(RawAnomaly::default(), &mut errors);
        assert!(errors.is_empty());
        assert_eq!(c, AnomalyConfig::default());
        let raw: RawAnomaly = toml::from_str(
            "short_window_s = 5000\nlong_window_s = 1\nrate_factor = 0.5\nmin_rate = -1.0\nmin_requests = 0\nmin_active_s = 6000\nerror_ratio = 2.0\n",
        )
        .unwrap();
        AnomalyConfig::from_raw(raw, &mut errors);
        assert_eq!(errors.len(), 7, "{errors:?}");
        // min_active_s follows a shorter window unless given.
        let mut errors = Vec::new();
        let raw: RawAnomaly = toml::from_str("short_window_s = 3\n").unwrap();
        let c = AnomalyConfig::from_raw(raw, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(c.min_active_s, 1);
        assert_eq!(AnomalyConfig::default().min_active_s, 15);
        assert!(toml::from_str::<RawAnomaly>("surprise = 1").is_err());
    }
}
