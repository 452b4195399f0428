//! Load generator for svsd: compares HTTPS sign throughput (single and
//! batched, HTTP/1.1 and HTTP/2 keep-alive) with the in-process token
//! throughput on the same cores, measures latency at half of peak, RSS with
//! many connections, time from start to ready, and one entity's latency
//! next to another's batch load.
//!
//! `cargo run --release -p svs-e2e --bin svs-bench -- [--clients N] [--seconds S] [--cpus split|shared]`
//!
//! By default (`--cpus split`) svsd and the in-process measurement share the
//! upper half of the CPUs and the load generator runs on the lower half: the
//! targets compare svsd with the token "on the same cores", and a client on
//! those cores would charge svsd with TLS and HTTP work that is not its own.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;
use svs_e2e::{ClientCert, Install, b64};

#[derive(Debug, Parser)]
struct Args {
    /// Concurrent clients (connections). Each single request waits for its
    /// audit group commit, so too few clients leave the server idle between
    /// fsyncs and measure the disk's latency instead of the peak (16 did).
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Seconds per throughput measurement.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Seconds of the latency measurement at half of peak: a p99 needs many
    /// samples, and a rare stall of the machine moves a short run's p99.
    #[arg(long, default_value_t = 10)]
    latency_seconds: u64,
    /// Items per batch.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Connections for the RSS measurement.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Run one measurement alone, e.g. under `perf record`: `token`, `h1`
    /// (single requests over HTTP/1.1), `h2`, `half` (HTTP/1.1 latency at
    /// half of the HTTP/1.1 peak), `batch` (HTTP/1.1 batches) or
    /// `neighbours` (one entity's latency next to another's batch load).
    #[arg(long, value_parser = ["token", "h1", "h2", "half", "batch", "neighbours"])]
    only: Option<String>,
    /// `[audit] preallocate` for the daemon under test (its default: true),
    /// to see what zero-filled trail files are worth on this disk.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    audit_preallocate: bool,
    /// `split`: svsd and the in-process token measurement run on the upper
    /// half of the CPUs, this load generator on the lower half, so the
    /// server's throughput is not charged with the client's work.
    /// `shared`: everything on all CPUs.
    #[arg(long, default_value = "split", value_parser = ["split", "shared"])]
    cpus: String,
    /// Measure the latency at this rate (requests a second) rather than at
    /// half of the peak just measured: two builds compared at one load,
    /// since the peak itself moves with the machine's other tenants.
    #[arg(long)]
    latency_rate: Option<f64>,
    /// HSM sessions (`[hsm.pool] size`) for svsd and the in-process token.
    #[arg(long, default_value_t = 2)]
    pool_size: usize,
}

/// CPU lists for `taskset`: (server, client), when there are at least two.
fn split_cpus() -> Option<(String, String)> {
    let n = std::thread::available_parallelism().ok()?.get();
    (n >= 2).then(|| {
        let list = |a: usize, b: usize| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        };
        (list(n / 2, n - 1), list(0, n / 2 - 1))
    })
}

/// Confines every thread of this process to `cpus`.
fn pin_self(cpus: &str) {
    let st = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &std::process::id().to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "taskset failed");
}

/// The in-process token measurement in a child process confined to `cpus`.
fn in_process_on(cpus: &str, args: &Args) -> f64 {
    let out = std::process::Command::new("taskset")
        .args(["-c", cpus])
        .arg(std::env::current_exe().unwrap())
        .args(["--only", "token", "--cpus", "shared"])
        .args(["--clients", &args.clients.to_string()])
        .args(["--seconds", &args.seconds.to_string()])
        .args(["--pool-size", &args.pool_size.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "in-process measurement failed");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Signatures per second through svs-hsm in this process, `workers` callers.
async fn in_process(install: &Install, seconds: u64, workers: usize, pool_size: usize) -> f64 {
    let hsm = install.open_token(pool_size).await;
    let hsm = Arc::new(hsm);
    hsm.refresh_keys().await.unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (hsm, count, stop) = (hsm.clone(), count.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                hsm.sign(
                    "demo",
                    None,
                    b"benchmark message of 64 bytes ......................",
                    svs_hsm::SignatureEncoding::Der,
                )
                .await
                .unwrap();
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// Signatures/s over HTTPS with `clients` connections; `batch` items per
/// request; and each request's start (its due time when paced) and latency.
async fn http(
    d: &svs_e2e::Daemon,
    clients: usize,
    h2: bool,
    batch: usize,
    seconds: u64,
    rate: Option<f64>,
) -> (f64, Vec<(Instant, Duration)>) {
    let count = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    // Connections first: TLS handshakes are not part of what is measured.
    let mut clients_connected = Vec::with_capacity(clients);
    for _ in 0..clients {
        clients_connected.push(d.client(h2).await);
    }
    // An open-loop arrival schedule, evenly spaced at `rate` per second,
    // with latency counted from each request's due time (as wrk2 does), so
    // a late send counts against the result instead of hiding it. A thread
    // paces, not tokio timers: their 1 ms ticks would send in bursts.
    let schedule = rate.map(|rate| {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let t0 = Instant::now();
            for i in 0u64.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let due = t0 + Duration::from_secs_f64(i as f64 / rate);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                if tx.send(due).is_err() {
                    break;
                }
            }
        });
        Arc::new(tokio::sync::Mutex::new(rx))
    });
    let item =
        json!({"key":"demo","data":b64(b"benchmark message of 64 bytes ......................")});
    for mut c in clients_connected {
        let (count, failed, stop, item, schedule) = (
            count.clone(),
            failed.clone(),
            stop.clone(),
            item.clone(),
            schedule.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = match &schedule {
                    Some(due) => match due.lock().await.recv().await {
                        Some(due) => due,
                        None => break,
                    },
                    None => Instant::now(),
                };
                // Only signatures handed back count: a batch answers 200
                // even when some of its items failed (e.g. `busy`).
                let signed = if batch > 1 {
                    let (s, _, v) = c
                        .post(
                            "/v1/sign/batch",
                            &json!({"items": vec![item.clone(); batch]}),
                        )
                        .await
                        .unwrap();
                    assert_eq!(s, 200);
                    let results = v["results"].as_array().unwrap();
                    let ok = results
                        .iter()
                        .filter(|r| r["signature"].is_string())
                        .count();
                    if ok < results.len() {
                        failed.fetch_add((results.len() - ok) as u64, Ordering::Relaxed);
                    }
                    ok
                } else {
                    let (s, _, v) = c.post("/v1/sign", &item).await.unwrap();
                    assert_eq!(s, 200, "{v}");
                    1
                };
                lat.push((t, t.elapsed()));
                count.fetch_add(signed as u64, Ordering::Relaxed);
            }
            lat
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let failed = failed.load(Ordering::Relaxed);
    if failed > 0 {
        println!("  ({failed} batch items failed, not counted)");
    }
    (
        count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64(),
        lat,
    )
}

fn pct(l: &[Duration], p: f64) -> Duration {
    l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

/// A sample's value, by its series name with labels exactly as exported;
/// `None` if the page has no such series.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Per cent of a histogram's observations between two scrapes that took
/// longer than the bucket bound `le`. The series may be missing before
/// (nothing observed yet), not after: a renamed metric or label must fail
/// the benchmark, not read as 0%.
fn share_over(before: &str, after: &str, histogram: &str, labels: &str, le: &str) -> f64 {
    let sep = if labels.is_empty() { "" } else { "," };
    let bucket = format!("{histogram}_bucket{{{labels}{sep}le=\"{le}\"}}");
    let count = if labels.is_empty() {
        format!("{histogram}_count")
    } else {
        format!("{histogram}_count{{{labels}}}")
    };
    let after_of = |series: &str| {
        sample(after, series).unwrap_or_else(|| panic!("svsd's metrics have no {series}"))
    };
    let n = after_of(&count) - sample(before, &count).unwrap_or(0.0);
    let within = after_of(&bucket) - sample(before, &bucket).unwrap_or(0.0);
    if n > 0.0 {
        100.0 * (n - within) / n
    } else {
        0.0
    }
}

/// Notes when the load generator's CPUs stopped running its threads: a
/// thread asks to sleep 1 ms at a time and records each wake-up more than
/// 1 ms late, as (when it went to sleep, when it woke).
///
/// On the 2-vCPU Firecracker VM this was tuned on, the whole VM stops for
/// milliseconds about once a second while the guest is busy in its kernel:
/// a busy loop that makes no system calls, alone on one vCPU, is never late
/// by 1 ms in 10 s, but is late by 3-5 ms about once a second while the
/// other vCPU runs a pipe ping-pong. A late wake-up here may also be this
/// CPU's own run queue (the load generator's work), which is not svsd's
/// doing either; a stall of svsd's CPU alone is not seen, and stays counted
/// against svsd. (A second detector on svsd's CPU, to count only pauses
/// seen on both, was tried: its wake-ups made svsd's own tail worse.)
struct LateWakeups {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Instant, Instant)>>,
}

impl LateWakeups {
    const TICK: Duration = Duration::from_millis(1);
    const LATE: Duration = Duration::from_millis(1);

    fn start() -> LateWakeups {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut late = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let before = Instant::now();
                std::thread::sleep(Self::TICK);
                let after = Instant::now();
                if after - before > Self::TICK + Self::LATE {
                    late.push((before, after));
                }
            }
            late
        });
        LateWakeups { stop, thread }
    }

    fn finish(self) -> Vec<(Instant, Instant)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Latencies of the requests no window touches: in flight during it, or
/// due while its backlog drained (at half of peak the server clears a
/// backlog at the arrival rate, so in as long again as the window).
fn untouched(timed: &[(Instant, Duration)], windows: &[(Instant, Instant)]) -> Vec<Duration> {
    let mut clear: Vec<Duration> = timed
        .iter()
        .filter(|(due, l)| {
            let done = *due + *l;
            !windows
                .iter()
                .any(|(b, e)| *due < *e + (*e - *b) && done > *b)
        })
        .map(|(_, l)| *l)
        .collect();
    clear.sort();
    clear
}

/// HTTP/1.1 latency at half of the single-request `peak`: requests due at
/// evenly spaced times, sent on whichever client connection is free.
///
/// Two views separate the server's tail from the machine's: svsd's own
/// histograms over the same interval (from request headers to answer, and
/// the audit disk's commits), and the p99 without the requests a late
/// wake-up of the load generator's CPU touched (see [`LateWakeups`]). As a
/// control, the same windows half a second later are left out instead: if
/// the pauses did not explain the tail, leaving out requests at other
/// times would lower the p99 as much.
async fn half_peak(install: &Install, d: &svs_e2e::Daemon, args: &Args, peak: f64) {
    let before = svs_e2e::scrape_metrics(install.metrics_addr).await;
    let detector = LateWakeups::start();
    let (rate, timed) = http(
        d,
        args.clients,
        false,
        1,
        args.latency_seconds,
        Some(args.latency_rate.unwrap_or(peak / 2.0)),
    )
    .await;
    let pauses = detector.finish();
    let after = svs_e2e::scrape_metrics(install.metrics_addr).await;
    let mut lat: Vec<Duration> = timed.iter().map(|(_, l)| *l).collect();
    lat.sort();
    let clear = untouched(&timed, &pauses);
    let (first, last) = (
        timed.iter().map(|(t, _)| *t).min(),
        timed.iter().map(|(t, _)| *t).max(),
    );
    let half_second = Duration::from_millis(500);
    let shifted: Vec<(Instant, Instant)> = pauses
        .iter()
        .map(|(b, e)| match (first, last) {
            (_, Some(last)) if *e + half_second <= last => (*b + half_second, *e + half_second),
            (Some(first), _) if *b >= first + half_second => (*b - half_second, *e - half_second),
            _ => (*b, *e),
        })
        .collect();
    let control = untouched(&timed, &shifted);
    println!(
        "HTTP/1.1 at {} ({rate:.0}/s): p50 {:?}, p99 {:?} (target p99 ≤ 2 ms); p90 {:?}, p99.9 {:?}, max {:?}",
        if args.latency_rate.is_some() {
            "the given rate"
        } else {
            "half peak"
        },
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        pct(&lat, 0.9),
        pct(&lat, 0.999),
        lat.last().copied().unwrap_or_default()
    );
    // The window includes the 1 ms asked for.
    let lengths = || pauses.iter().map(|(b, e)| *e - *b - LateWakeups::TICK);
    let share =
        |kept: &[Duration]| 100.0 * (lat.len() - kept.len()) as f64 / lat.len().max(1) as f64;
    println!(
        "  pauses (wake-ups over 1 ms late on the load generator's CPUs): {} ({:?} in all, longest {:?})",
        pauses.len(),
        lengths().sum::<Duration>(),
        lengths().max().unwrap_or_default(),
    );
    println!(
        "  without the {:.2}% of requests a pause touched: p99 {:?}, p99.9 {:?}; control, without the {:.2}% the same windows 0.5 s later touched: p99 {:?}, p99.9 {:?}",
        share(&clear),
        pct(&clear, 0.99),
        pct(&clear, 0.999),
        share(&control),
        pct(&control, 0.99),
        pct(&control, 0.999),
    );
    let delta = |series: &str| {
        sample(&after, series).unwrap_or(0.0) - sample(&before, series).unwrap_or(0.0)
    };
    let commits = delta("svs_audit_fsync_duration_seconds_count");
    println!(
        "  audit: {commits:.0} commits of {:.1} records on average, {:.3} ms each on average",
        delta("svs_audit_records_total") / commits.max(1.0),
        1e3 * delta("svs_audit_fsync_duration_seconds_sum") / commits.max(1.0),
    );
    println!(
        "  svsd's view: {:.2}% of sign requests over 2 ms; {:.2}% of audit commits over 1 ms, {:.2}% over 2.5 ms",
        share_over(
            &before,
            &after,
            "svs_request_duration_seconds",
            "operation=\"sign\"",
            "0.002"
        ),
        share_over(
            &before,
            &after,
            "svs_audit_fsync_duration_seconds",
            "",
            "0.001"
        ),
        share_over(
            &before,
            &after,
            "svs_audit_fsync_duration_seconds",
            "",
            "0.0025"
        ),
    );
    // Where a slow request waited inside svsd: for an HSM session, in the
    // HSM call itself, or for a commit (one slow fdatasync holds up every
    // request in flight, and the requests due meanwhile queue behind them).
    let over = |histogram: &str, le: &str| {
        delta(&format!("{histogram}_count")) - delta(&format!("{histogram}_bucket{{le=\"{le}\"}}"))
    };
    println!(
        "  audit commits over 25 ms: {:.0}, over 100 ms: {:.0}, over 1 s: {:.0}",
        over("svs_audit_fsync_duration_seconds", "0.025"),
        over("svs_audit_fsync_duration_seconds", "0.1"),
        over("svs_audit_fsync_duration_seconds", "1"),
    );
    println!(
        "  svsd's view: {:.2}% of sign requests over 100 ms; HSM queue waits over 1 ms {:.2}%, over 100 ms {:.2}%; HSM signs over 1 ms {:.2}%",
        share_over(
            &before,
            &after,
            "svs_request_duration_seconds",
            "operation=\"sign\"",
            "0.1"
        ),
        share_over(&before, &after, "svs_hsm_queue_wait_seconds", "", "0.001"),
        share_over(&before, &after, "svs_hsm_queue_wait_seconds", "", "0.1"),
        share_over(
            &before,
            &after,
            "svs_hsm_operation_duration_seconds",
            "mechanism=\"0x80008104\",operation=\"sign\"",
            "0.001"
        ),
    );
}

/// Single signatures a second of the quiet entity in [`neighbours`].
const QUIET_RATE: f64 = 100.0;

/// One entity (the dev client) keeps `--clients` batch requests in flight
/// while another, `quiet`, sends single signatures at a steady
/// [`QUIET_RATE`] over one connection: the second's latency (from each
/// request's due time) is what a tenant meets next to a heavy one.
async fn neighbours(d: &svs_e2e::Daemon, quiet: &ClientCert, args: &Args) {
    let seconds = args.latency_seconds;
    let (addr, ca, cert) = (d.addr, d.ca.clone(), quiet.clone());
    let quiet_task = tokio::spawn(async move {
        let mut c = svs_e2e::Client::connect(addr, &ca, &cert, false)
            .await
            .unwrap();
        let item = json!({"key": "demo", "data": b64(b"a quiet tenant's request")});
        // Let the bulk load build up first.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let start = Instant::now();
        let mut lat = Vec::new();
        for i in 0u64.. {
            let due = start + Duration::from_secs_f64(i as f64 / QUIET_RATE);
            if due.duration_since(start) >= Duration::from_secs(seconds.saturating_sub(1)) {
                break;
            }
            tokio::time::sleep_until(due.into()).await;
            let (s, _, v) = c.post("/v1/sign", &item).await.unwrap();
            assert_eq!(s, 200, "{v}");
            lat.push(due.elapsed());
        }
        lat
    });
    let (bulk, _) = http(d, args.clients, false, args.batch, seconds, None).await;
    let mut lat = quiet_task.await.unwrap();
    lat.sort();
    println!(
        "next to an entity signing {bulk:.0}/s in batches of {} on {} connections, another's single signatures at {QUIET_RATE}/s: p50 {:?}, p99 {:?}, max {:?} ({} requests)",
        args.batch,
        args.clients,
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        lat.last().copied().unwrap_or_default(),
        lat.len()
    );
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let install = Install::new();
    install.edit_config(|t| {
        assert!(
            t.contains("[audit]\n"),
            "the dev config has no [audit] table"
        );
        t.replace("checkpoint_interval_s = 60", "checkpoint_interval_s = 0")
            .replace("checkpoint_key = \"svs-audit\"\n", "")
            .replace(
                "[audit]\n",
                &format!("[audit]\npreallocate = {}\n", args.audit_preallocate),
            )
            .replace(
                "[hsm.pool]\nsize = 2\n",
                &format!("[hsm.pool]\nsize = {}\n", args.pool_size),
            )
    });
    // The bench measures throughput, not policy: lift the dev entities'
    // rate limit, which a batched run at full speed would otherwise hit.
    let entities = install.dir.join("entities.toml");
    let text = std::fs::read_to_string(&entities).unwrap();
    let quiet = install.issue_client("quiet");
    std::fs::write(
        &entities,
        text.replace(
            "per_second = 10000.0, burst = 20000",
            "per_second = 100000000.0, burst = 100000000",
        ) + &format!(
            "\n[[entity]]\nname = \"quiet\"\ncertificate_sha256 = \"{}\"\nkeys = [\"demo\"]\noperations = [\"sign\"]\n",
            quiet.sha256
        ),
    )
    .unwrap();
    let split = if args.cpus == "split" {
        split_cpus()
    } else {
        None
    };
    let server_cpus = split.as_ref().map(|(server, _)| server.as_str());
    if let Some((server, client)) = &split {
        pin_self(client);
        println!(
            "svsd and the in-process token on CPUs {server}, this load generator on CPUs {client}"
        );
    } else {
        println!("svsd, the in-process token and this load generator share all CPUs");
    }
    match args.only.as_deref() {
        Some("token") => {
            let token = match server_cpus {
                Some(cpus) => in_process_on(cpus, &args),
                None => in_process(&install, args.seconds, args.clients, args.pool_size).await,
            };
            return println!("in-process token: {token:.0} sign/s");
        }
        Some("batch") => {
            let d = install.start_with(&[], server_cpus).await;
            let (batched, _) = http(&d, args.clients, false, args.batch, args.seconds, None).await;
            return println!("batch of {}: {batched:.0}/s", args.batch);
        }
        Some("neighbours") => {
            let d = install.start_with(&[], server_cpus).await;
            return neighbours(&d, &quiet, &args).await;
        }
        Some(proto) => {
            let d = install.start_with(&[], server_cpus).await;
            let (single, _) = http(&d, args.clients, proto == "h2", 1, args.seconds, None).await;
            println!("{proto}: single {single:.0}/s");
            if proto == "half" {
                half_peak(&install, &d, &args, single).await;
            }
            return;
        }
        None => {}
    }
    let token = match server_cpus {
        Some(cpus) => in_process_on(cpus, &args),
        None => in_process(&install, args.seconds, args.clients, args.pool_size).await,
    };
    println!(
        "in-process token (svs-hsm pool, {} callers): {token:.0} sign/s",
        args.clients
    );

    let t0 = Instant::now();
    let d = install.start_with(&[], server_cpus).await;
    println!("start to ready: {} ms", t0.elapsed().as_millis());
    for h2 in [false, true] {
        let proto = if h2 { "HTTP/2" } else { "HTTP/1.1" };
        let (single, _) = http(&d, args.clients, h2, 1, args.seconds, None).await;
        let (batched, _) = http(&d, args.clients, h2, args.batch, args.seconds, None).await;
        println!(
            "{proto}: single {single:.0}/s ({:.2} × token, target ≥ 0.6); batch of {} {batched:.0}/s ({:.2} × token, target ≥ 0.85)",
            single / token,
            args.batch,
            batched / token
        );
        if !h2 {
            half_peak(&install, &d, &args, single).await;
        }
    }
    neighbours(&d, &quiet, &args).await;
    let mut conns = Vec::new();
    for _ in 0..args.connections {
        let mut c = d.client(false).await;
        c.get("/healthz").await.unwrap();
        conns.push(c);
    }
    println!(
        "RSS with {} open connections: {} MiB (target ≤ 64)",
        conns.len(),
        rss_kib(d.child.id()) / 1024
    );
}
