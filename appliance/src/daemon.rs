//! The daemon's life: start (HSM login, audit, self-tests, listeners,
//! READY), background duties (self-tests, checkpoints, watchdog), SIGHUP
//! reload and SIGTERM drain.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hyper_util::server::graceful::GracefulShutdown;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sd_notify::NotifyState;
use svs_hsm::{Hsm, HsmError, HsmMetrics, ModuleSource, PinSource};
use tokio::net::TcpListener;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::app::App;
use crate::audit::AuditTrail;
use crate::backend::SigningBackend;
use crate::config::Config;
use crate::error::{Missing, NotReady, SvsError};
use crate::metrics::Metrics;
use crate::reload::ReloadChanges;
use crate::server::{self, MetricsPage};

/// Options from the command line.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Run as root even though the config does not say so.
    pub allow_root: bool,
}

fn notify(state: &[NotifyState]) {
    // Outside systemd there is no NOTIFY_SOCKET and this does nothing.
    if let Err(e) = sd_notify::notify(state) {
        tracing::debug!(error = %e, "sd_notify");
    }
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogFormat {
    /// ANSI colours: only for a terminal; in the journal or a file they are
    /// escape-code noise.
    pub ansi: bool,
    /// svsd's own timestamp: left out under journald, which stamps every
    /// line; there each line starts with its syslog priority instead
    /// (`PriorityLines`).
    pub timestamp: bool,
}

impl LogFormat {
    /// The format for a stderr that is (or is not) a terminal, given
    /// $JOURNAL_STREAM (set by systemd when stderr goes to the journal).
    pub fn detect(stderr_is_terminal: bool, journal_stream: Option<&std::ffi::OsStr>) -> LogFormat {
        LogFormat {
            ansi: stderr_is_terminal,
            timestamp: journal_stream.is_none_or(|v| v.is_empty()),
        }
    }

    /// Installs the global subscriber writing to stderr (`RUST_LOG` filters).
    pub fn init(self) {
        let rust_log = std::env::var("RUST_LOG").ok();
        let b = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_new(log_directives(rust_log.as_deref()))
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(log_directives(None))),
            )
            .with_ansi(self.ansi);
        if self.timestamp {
            b.with_writer(std::io::stderr).init();
        } else {
            b.without_time().with_writer(JournalStderr).init();
        }
    }
}

/// stderr for journald: every line of an event prefixed with its syslog
/// priority (sd-daemon(3)), so that `journalctl -p warning` and
/// priority-based forwarding see svsd's ERROR and ALARM lines; without it
/// journald files every line at `info`, and the continuation lines of a
/// multi-line error as lines of their own, at `info` too.
struct JournalStderr;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for JournalStderr {
    type Writer = PriorityLines<std::io::Stderr>;

    fn make_writer(&'a self) -> Self::Writer {
        PriorityLines::new(std::io::stderr(), &tracing::Level::INFO)
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        PriorityLines::new(std::io::stderr(), meta.level())
    }
}

/// A writer putting `<N>` (the syslog priority of a tracing level) before
/// every line written through it.
struct PriorityLines<W> {
    inner: W,
    prefix: &'static [u8],
    at_line_start: bool,
}

impl<W: std::io::Write> PriorityLines<W> {
    fn new(inner: W, level: &tracing::Level) -> PriorityLines<W> {
        let prefix: &'static [u8] = match *level {
            tracing::Level::ERROR => b"<3>",
            tracing::Level::WARN => b"<4>",
            tracing::Level::INFO => b"<6>",
            _ => b"<7>",
        };
        PriorityLines {
            inner,
            prefix,
            at_line_start: true,
        }
    }
}

impl<W: std::io::Write> std::io::Write for PriorityLines<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // One write of the whole event (as the fmt layer makes it), so that
        // lines from two threads do not interleave.
        let mut out = Vec::with_capacity(buf.len() + 4 * self.prefix.len());
        for &b in buf {
            if self.at_line_start {
                out.extend_from_slice(self.prefix);
            }
            out.push(b);
            self.at_line_start = b == b'\n';
        }
        self.inner.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The log filter: `RUST_LOG` (default `info`), with two libraries held
/// down unless `RUST_LOG` names them. cryptoki's mechanism module logs an
/// ERROR for every vendor-defined mechanism it does not know, which every
/// SM2 signature uses (two lines a signature at `info`). h2 logs a WARN for
/// each connection a client floods with stream resets, which the client can
/// repeat at will (410 lines a second from four of them): it closes those
/// connections itself, and the counters show them.
fn log_directives(rust_log: Option<&str>) -> String {
    let mut directives = rust_log
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or("info")
        .to_owned();
    if !directives.contains("cryptoki") {
        directives.push_str(",cryptoki::mechanism=off");
    }
    if !directives.contains("h2") {
        directives.push_str(",h2=error");
    }
    directives
}

/// Refuses root unless told otherwise.
pub fn check_user(config: &Config, opts: &RunOptions) -> Result<(), SvsError> {
    check_root(opts.allow_root || config.allow_root)
}

/// Refuses root unless `allowed`. `svsd --dev` asks before it makes its
/// directory, so that a refused run leaves no root-owned files behind.
pub fn check_root(allowed: bool) -> Result<(), SvsError> {
    // The effective uid, from the kernel (the owner of /proc/self is root
    // for a process that is not dumpable, and /proc may be absent).
    if rustix::process::geteuid().is_root() && !allowed {
        // A configuration error (exit 78): restarting cannot help.
        return Err(SvsError::Config(vec![
            "refusing to run as root: run as the svs user, or pass --allow-root (or set [server] allow_root = true)"
                .into(),
        ]));
    }
    Ok(())
}

/// `--check-config` beyond the file itself: the TLS certificates, keys and
/// CA bundles parse and belong together, and the PIN can be read. Every
/// file that is there is checked; what is not there yet (an appliance not
/// yet provisioned, where svsd waits for it), what cannot be read by the
/// user running the check, and a systemd credential (visible only to svsd
/// started by systemd) come back as notes, not errors. Blocking.
pub fn check_files(config: &Config) -> Result<Option<String>, SvsError> {
    let mut notes = Vec::new();
    let mut errors = Vec::new();
    let api = [
        (config.tls.certificate.as_path(), Pem::Certificates),
        (config.tls.private_key.as_path(), Pem::PrivateKey),
        (config.tls.client_ca.as_path(), Pem::Certificates),
    ];
    if check_each("[tls]", &api, &mut notes, &mut errors) {
        match api_tls(config) {
            Ok(_) => {}
            // Every entity whose issuer is not in the client CA bundle, one line each.
            Err(SvsError::Config(list)) => {
                errors.extend(list.iter().map(|m| format!("[tls]: {m}")))
            }
            Err(e) => errors.push(format!("[tls]: {e}")),
        }
    }
    // A disabled metrics listener needs no TLS files.
    if config.metrics.listen.is_some()
        && let Some(t) = &config.metrics.tls
    {
        let mut files = vec![
            (t.certificate.as_path(), Pem::Certificates),
            (t.private_key.as_path(), Pem::PrivateKey),
        ];
        files.extend(t.client_ca.as_deref().map(|p| (p, Pem::Certificates)));
        if check_each("[metrics.tls]", &files, &mut notes, &mut errors)
            && let Err(e) = crate::tls::metrics_server_config(t)
        {
            errors.push(format!("[metrics.tls]: {e}"));
        }
    }
    if let Some(pin) = &config.hsm.pin {
        notes.extend(pin_note(
            pin,
            std::env::var_os("CREDENTIALS_DIRECTORY").is_some(),
        ));
    }
    if !errors.is_empty() {
        // The notes too: what could not be checked is worth knowing when
        // fixing what was found.
        errors.extend(notes.into_iter().map(|n| format!("note: {n}")));
        Err(SvsError::Config(errors))
    } else if notes.is_empty() {
        Ok(None)
    } else {
        Ok(Some(notes.join("; ")))
    }
}

/// What a PEM file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pem {
    Certificates,
    PrivateKey,
}

/// Checks one listener's TLS files for `--check-config`: each file there
/// is parsed on its own; one that is not (yet) usable gives a note. True
/// when all are there, so that the caller can check them together.
fn check_each(
    section: &str,
    files: &[(&Path, Pem)],
    notes: &mut Vec<String>,
    errors: &mut Vec<String>,
) -> bool {
    let mut complete = true;
    for (path, kind) in files {
        match pem_file_problem(path) {
            Some(FileProblem::Unreadable(e)) => {
                complete = false;
                notes.push(format!(
                    "{section}: cannot read {}: {e} (not checked; svsd reads it as its own user)",
                    path.display()
                ));
            }
            Some(p) => {
                complete = false;
                notes.push(format!("not provisioned yet: {}", p.describe(path)));
            }
            None => {
                let parsed = match kind {
                    Pem::Certificates => CertificateDer::pem_file_iter(path)
                        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                        .map_err(|e| e.to_string())
                        .and_then(|c| {
                            if c.is_empty() {
                                Err("no certificate".into())
                            } else {
                                Ok(())
                            }
                        }),
                    Pem::PrivateKey => PrivateKeyDer::from_pem_file(path)
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                };
                if let Err(e) = parsed {
                    errors.push(format!("{section}: {}: {e}", path.display()));
                }
            }
        }
    }
    complete
}

/// `--check-config`'s note on the PIN, if any: a credential cannot be read
/// outside systemd, a PIN file may not be there yet. Never the PIN itself.
fn pin_note(pin: &PinSource, in_systemd: bool) -> Option<String> {
    if let PinSource::Credential(name) = pin
        && !in_systemd
    {
        return Some(format!(
            "the PIN (systemd credential {name:?}) cannot be checked here: only svsd started by systemd (LoadCredential=) sees $CREDENTIALS_DIRECTORY"
        ));
    }
    match pin.read() {
        Ok(_) => None,
        Err(e) => Some(format!("not provisioned yet: {e}")),
    }
}

/// Why a TLS file cannot be used yet, as far as waiting for provisioning
/// can fix it: not there, not readable, or not (completely) written.
#[derive(Debug)]
enum FileProblem {
    Absent,
    Unreadable(std::io::Error),
    Empty,
    /// A BEGIN line without its END line: half written.
    Incomplete,
}

impl FileProblem {
    fn describe(&self, path: &Path) -> String {
        let p = path.display();
        match self {
            FileProblem::Absent => format!("{p} does not exist"),
            FileProblem::Unreadable(e) => format!("cannot read {p}: {e}"),
            FileProblem::Empty => format!("{p} is empty"),
            FileProblem::Incomplete => {
                format!("{p} is incomplete (a BEGIN line without its END line)")
            }
        }
    }
}

/// The problem with the PEM file at `path`, if any. Blocking.
fn pem_file_problem(path: &Path) -> Option<FileProblem> {
    match std::fs::read(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(FileProblem::Absent),
        Err(e) => Some(FileProblem::Unreadable(e)),
        Ok(bytes) => pem_text_problem(&bytes),
    }
}

fn pem_text_problem(bytes: &[u8]) -> Option<FileProblem> {
    let text = String::from_utf8_lossy(bytes);
    if text.trim().is_empty() {
        Some(FileProblem::Empty)
    } else if text.matches("-----BEGIN ").count() > text.matches("-----END ").count() {
        Some(FileProblem::Incomplete)
    } else {
        None
    }
}

/// Why svsd would refuse the API's TLS files as they are now (a server key
/// that is not its certificate's, a bundle that does not parse), checked
/// as its reload does but without the entities (their issuers are the
/// entities file's business, and an edit may be what repairs them). None
/// while any file is absent, empty, half written or unreadable: that is
/// an appliance still being provisioned, which svsd waits for. Blocking.
pub fn api_tls_refusal(tls: &crate::config::TlsFiles) -> Option<String> {
    let files = [&tls.certificate, &tls.private_key, &tls.client_ca];
    if files.iter().any(|f| pem_file_problem(f).is_some()) {
        return None;
    }
    crate::tls::api_tls(tls, &[]).err().map(|e| e.to_string())
}

/// The TLS files svsd needs: the API's, and the metrics listener's when
/// it is enabled and uses TLS.
fn tls_files(config: &Config) -> Vec<&Path> {
    let mut files = vec![
        config.tls.certificate.as_path(),
        config.tls.private_key.as_path(),
        config.tls.client_ca.as_path(),
    ];
    if config.metrics.listen.is_some()
        && let Some(t) = &config.metrics.tls
    {
        files.extend([t.certificate.as_path(), t.private_key.as_path()]);
        files.extend(t.client_ca.as_deref());
    }
    files
}

/// Opens the HSM of `config`, reporting the pool's metrics to `metrics`;
/// the HSM's own error is kept for [`start_error`]. Blocking.
fn open_hsm(config: &Config, metrics: Arc<dyn HsmMetrics>) -> Result<Hsm, HsmError> {
    if config.hsm.module == ModuleSource::Embedded {
        // Keep the linker from dropping the soft token's entry points, which
        // `Pkcs11::new_from_self` looks up in this executable.
        std::hint::black_box(svs_softtoken::C_GetFunctionList as *const ());
        if let Some(path) = &config.embedded_token_config {
            svs_softtoken::set_config_path(Some(path.clone()));
        }
    }
    Hsm::open(&config.hsm, metrics)
}

/// The API's TLS for `config`, its entities' issuers checked against the
/// client CA bundle (at start, on SIGHUP and by `--check-config`).
fn api_tls(config: &Config) -> Result<crate::tls::ApiTls, SvsError> {
    crate::tls::api_tls(&config.tls, &config.entities)
}

/// First retry of a start that is waiting; doubled up to [`RETRY_MAX`].
const RETRY_INITIAL: Duration = Duration::from_secs(1);
/// How long the stop waits for the audit anchor to be set to its `stop`
/// record: with the longest grace period (40 s) it still ends within the
/// unit's TimeoutStopSec (45 s).
const ANCHOR_AT_STOP: Duration = Duration::from_secs(4);

/// Slowest retry of a waiting start: a network HSM that comes back, or
/// files put in place without a reload, are noticed within this.
const RETRY_MAX: Duration = Duration::from_secs(10);

/// SIGHUP, SIGTERM and SIGINT, installed once before the first start
/// attempt, so that a signal during start-up is neither lost nor fatal.
struct Signals {
    hup: Signal,
    stop: StopSignals,
}

/// SIGTERM and SIGINT: either stops svsd.
struct StopSignals {
    term: Signal,
    int: Signal,
}

impl Signals {
    fn new() -> Result<Signals, SvsError> {
        let sig = |k| signal(k).map_err(|e| SvsError::Io(e.to_string()));
        Ok(Signals {
            hup: sig(SignalKind::hangup())?,
            stop: StopSignals {
                term: sig(SignalKind::terminate())?,
                int: sig(SignalKind::interrupt())?,
            },
        })
    }

    /// RELOADING=1 for systemd, which then waits for READY=1.
    fn reloading() {
        let mut states = vec![NotifyState::Reloading];
        states.extend(NotifyState::monotonic_usec_now().ok());
        notify(&states);
    }
}

impl StopSignals {
    /// The next SIGTERM or SIGINT.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// What ends a wait.
enum Wake {
    Retry,
    Reload,
    Stop,
}

/// A plain side listener (probes, metrics) and its address, bound once
/// and kept across start attempts.
type SideSocket = Option<(SocketAddr, TcpListener)>;

/// The side listeners a waiting svsd serves, handed to the start that
/// succeeds: their ports stay open from the first wait on.
#[derive(Default)]
struct SideSockets {
    probe: SideSocket,
    metrics: SideSocket,
}

/// Binds `want` into `slot` unless the socket there has that address
/// already (a SIGHUP may have changed it). Returns whether it bound anew.
async fn keep_bound(slot: &mut SideSocket, want: Option<SocketAddr>) -> Result<bool, SvsError> {
    if slot.as_ref().map(|(a, _)| *a) == want {
        return Ok(false);
    }
    *slot = None;
    if let Some(a) = want {
        *slot = server::bind(&[a]).await?.pop().map(|l| (a, l));
    }
    Ok(slot.is_some())
}

/// The listener for `want`: the one in `slot` when its address matches,
/// else a new one.
async fn take_or_bind(
    slot: &mut SideSocket,
    want: Option<SocketAddr>,
) -> Result<Option<TcpListener>, SvsError> {
    match (want, slot.take()) {
        (Some(a), Some((was, l))) if a == was => Ok(Some(l)),
        (Some(a), old) => {
            // Closed first: 0.0.0.0:P still open refuses 127.0.0.1:P.
            drop(old);
            Ok(server::bind(&[a]).await?.pop())
        }
        (None, _) => Ok(None),
    }
}

/// The metrics listener's TLS, if it is enabled and has any: `Err` while
/// its files are not there yet or are wrong. Blocking (reads the files).
fn metrics_tls(config: &Config) -> Result<Option<TlsAcceptor>, SvsError> {
    match (&config.metrics.listen, &config.metrics.tls) {
        (Some(_), Some(t)) => Ok(Some(TlsAcceptor::from(crate::tls::metrics_server_config(
            t,
        )?))),
        _ => Ok(None),
    }
}

/// How long one start attempt (files, HSM login, key discovery, audit
/// trail, listeners, self-tests) may take. One that takes longer is taken
/// for wedged (a C_Initialize or C_Login that never returns, as a network
/// HSM's module can): the watchdog pings stop, so that systemd's watchdog
/// restarts svsd.
const START_ATTEMPT_DEADLINE: Duration = Duration::from_secs(60);

/// When the start attempt under way began; none between attempts and once
/// running.
#[derive(Debug, Clone, Default)]
struct AttemptClock(Arc<Mutex<Option<Instant>>>);

impl AttemptClock {
    fn begin(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    fn end(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn started(&self) -> Option<Instant> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether the watchdog is pinged now: always, except while a start
/// attempt has been running for `deadline` or longer.
fn pings_due(attempt_started: Option<Instant>, now: Instant, deadline: Duration) -> bool {
    attempt_started.is_none_or(|t| now.saturating_duration_since(t) < deadline)
}

/// The systemd watchdog's pinger, for svsd's whole life (waiting, start
/// attempts, running, drain): pinged from the async runtime at half the
/// period, so a wedged runtime, or a start attempt past
/// [`START_ATTEMPT_DEADLINE`], gets svsd restarted. A down HSM while running
/// does not stop the pings: the pool times its calls out, /readyz says not
/// ready and the pool recovers by itself.
fn spawn_watchdog(clock: AttemptClock) {
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period / 2);
        let mut withheld = false;
        loop {
            tick.tick().await;
            let started = clock.started();
            if pings_due(started, Instant::now(), START_ATTEMPT_DEADLINE) {
                if withheld {
                    tracing::warn!("the start attempt ended after all: watchdog pings resume");
                    withheld = false;
                }
                notify(&[NotifyState::Watchdog]);
            } else if !withheld {
                withheld = true;
                tracing::error!(
                    "ALARM a start attempt has not finished in {} s (HSM module hanging in C_Initialize or C_Login?): watchdog pings stop, so that systemd restarts svsd",
                    START_ATTEMPT_DEADLINE.as_secs()
                );
            }
        }
    });
}

/// Runs svsd until SIGTERM/SIGINT. Returns after the drain.
///
/// Two phases. *Waiting*: a start attempt found the installation not
/// provisioned (TLS files, PIN, token or keys missing) or the HSM
/// unreachable; svsd reports READY=1 with a not-ready STATUS, answers the
/// probe listener with the reason (`starting` during the first attempt),
/// serves the metrics page, and tries the whole start again on SIGHUP
/// (configuration re-read) and periodically; both side listeners answer
/// during every attempt as well. *Running*: a start
/// succeeded. Any other start error (invalid configuration, a refused PIN,
/// an unwritable audit trail) ends svsd: waiting could not fix it.
/// SIGTERM/SIGINT during a start attempt ends svsd at once, however long
/// the attempt would still take.
pub async fn run(config: Config, opts: RunOptions) -> Result<(), SvsError> {
    let started = Instant::now();
    check_user(&config, &opts)?;
    let mut signals = Signals::new()?;
    let mut config = config;
    let mut side = SideSockets::default();
    // One registry for the whole run: what the waiting phase counted (the
    // metrics listener's refusals, HSM errors of failed attempts) carries on.
    let metrics = Arc::new(Metrics::new());
    let mut last_reason: Option<NotReady> = None;
    let mut retry = RETRY_INITIAL;
    // What /readyz and the metrics page say until a start succeeds.
    let (why_tx, why) = watch::channel(SvsError::NotReady(
        NotReady::Starting,
        "the first start attempt is running".into(),
    ));
    // While waiting and while a start attempt runs the watchdog must still
    // be pinged: an unprovisioned appliance is alive, and systemd would
    // otherwise kill it after WatchdogSec. One that hangs is not.
    let clock = AttemptClock::default();
    spawn_watchdog(clock.clone());
    // The probe and metrics ports answer during start attempts too: one
    // that hangs on the HSM for minutes is "not ready" to monitoring, not
    // down. Served on across retries: a restart would drop connections
    // accepted and not yet answered.
    let mut serving: Option<WaitingPages> = None;
    loop {
        let mut pages = match serving.take() {
            Some(pages) => pages,
            None => WaitingPages::serve(&mut side, &config, &metrics, &why).await?,
        };
        clock.begin();
        // A SIGHUP during the attempt stays pending for the wait (or the
        // running phase) after it.
        let attempt = tokio::select! {
            r = start(&config, metrics.clone()) => Some(r),
            _ = signals.stop.recv() => None,
        };
        let error = match attempt {
            None => {
                pages.stop(&mut side).await?;
                notify(&[NotifyState::Stopping]);
                tracing::info!("stopped during a start attempt");
                return Ok(());
            }
            Some(Ok(prepared)) => {
                if last_reason.is_some() {
                    tracing::info!("provisioned: starting");
                }
                pages.stop(&mut side).await?;
                // Not raced with SIGTERM (see `Prepared::open`); one that
                // comes meanwhile is taken by `serve`, which records the stop.
                let running = prepared.open(&config, &mut side, metrics).await?;
                // The attempt (and the watchdog's deadline) ends after the
                // self-tests, in `serve`.
                return running.serve(config, signals, started, clock).await;
            }
            Some(Err(e)) => e,
        };
        clock.end();
        let SvsError::NotReady(reason, detail) = &error else {
            pages.stop(&mut side).await?;
            return Err(error);
        };
        let status = format!("not ready: {reason}");
        // Logged once per reason: a retry every few seconds must not fill
        // the journal.
        if last_reason.as_ref() != Some(reason) {
            tracing::warn!(
                %detail,
                "not ready: {reason}; waiting (retrying after {}s, twice as long each time up to every {}s, and at once on SIGHUP)",
                RETRY_INITIAL.as_secs(),
                RETRY_MAX.as_secs()
            );
            notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
            last_reason = Some(reason.clone());
        } else {
            tracing::debug!(%detail, "still not ready: {reason}");
        }
        why_tx.send_replace(error.clone());
        let wake = tokio::select! {
            _ = tokio::time::sleep(retry) => Wake::Retry,
            _ = signals.hup.recv() => Wake::Reload,
            _ = signals.stop.recv() => Wake::Stop,
        };
        match wake {
            Wake::Retry => {
                retry = (retry * 2).min(RETRY_MAX);
                pages
                    .serve_metrics(&mut side, &config, &metrics, &why)
                    .await?;
                serving = Some(pages);
            }
            Wake::Reload => {
                retry = RETRY_INITIAL;
                // A reload may move the side listeners.
                pages.stop(&mut side).await?;
                Signals::reloading();
                // A configuration that does not load is refused, as a reload
                // of a running svsd is: the wait goes on with the old one.
                let path = config.path.clone();
                match tokio::task::spawn_blocking(move || Config::load(&path))
                    .await
                    .map_err(|e| SvsError::Internal(e.to_string()))?
                {
                    Ok(c) => {
                        tracing::info!("SIGHUP: configuration re-read, starting again");
                        config = c;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "reload refused: still waiting with the previous configuration")
                    }
                }
                // The reload is done (systemd waits for READY=1 after
                // RELOADING=1); the attempt it leads to may still fail.
                notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
            }
            Wake::Stop => {
                pages.stop(&mut side).await?;
                notify(&[NotifyState::Stopping]);
                tracing::info!("stopped (was not ready)");
                return Ok(());
            }
        }
    }
}

/// The probe and metrics listeners of an svsd that is not started: /readyz
/// answers 503 with why, the metrics page says it too.
struct WaitingPages {
    stop: watch::Sender<bool>,
    probe: Option<(SocketAddr, tokio::task::JoinHandle<TcpListener>)>,
    metrics: Option<(SocketAddr, tokio::task::JoinHandle<TcpListener>)>,
}

impl WaitingPages {
    /// Serves the side listeners of `config`, bound once and kept in `side`.
    async fn serve(
        side: &mut SideSockets,
        config: &Config,
        metrics: &Arc<Metrics>,
        why: &watch::Receiver<SvsError>,
    ) -> Result<WaitingPages, SvsError> {
        let (stop, stop_rx) = watch::channel(false);
        // Every socket whose address changed is let go before any is bound:
        // a reload may swap the two ports.
        for (slot, want) in [
            (&mut side.probe, config.health_listen),
            (&mut side.metrics, config.metrics.listen),
        ] {
            if slot.as_ref().map(|(a, _)| *a) != want {
                *slot = None;
            }
        }
        if keep_bound(&mut side.probe, config.health_listen).await? {
            tracing::info!(addr = ?config.health_listen, "listening (plain HTTP, /healthz and /readyz only; not ready)");
        }
        let probe = side.probe.take().map(|(a, l)| {
            let limits = config.limits.clone();
            let task = server::serve_waiting_probes(l, why.clone(), limits, stop_rx);
            (a, tokio::spawn(task))
        });
        let mut pages = WaitingPages {
            stop,
            probe,
            metrics: None,
        };
        pages.serve_metrics(side, config, metrics, why).await?;
        Ok(pages)
    }

    /// Serves the metrics listener of `config` unless it is served already.
    /// While waiting, TLS files not there yet mean no metrics listener until
    /// they are (the start attempt names them): called again at each retry.
    async fn serve_metrics(
        &mut self,
        side: &mut SideSockets,
        config: &Config,
        metrics: &Arc<Metrics>,
        why: &watch::Receiver<SvsError>,
    ) -> Result<(), SvsError> {
        if self.metrics.is_some() || config.metrics.listen.is_none() {
            return Ok(());
        }
        let c = config.clone();
        let tls = tokio::task::spawn_blocking(move || metrics_tls(&c))
            .await
            .map_err(|e| SvsError::Internal(e.to_string()))?;
        match tls {
            Ok(tls) => {
                if keep_bound(&mut side.metrics, config.metrics.listen).await? {
                    tracing::info!(addr = ?config.metrics.listen, tls = tls.is_some(), "listening (metrics: /metrics; not ready)");
                }
                self.metrics = side.metrics.take().map(|(a, l)| {
                    let page = MetricsPage::Waiting {
                        metrics: metrics.clone(),
                        why: why.clone(),
                        limits: config.limits.clone(),
                    };
                    let tls = Arc::new(RwLock::new(tls));
                    let task = server::serve_metrics(page, l, tls, self.stop.subscribe());
                    (a, tokio::spawn(task))
                });
            }
            // Its files are among what the wait is for.
            Err(_) => side.metrics = None,
        }
        Ok(())
    }

    /// Stops serving; the listeners go back into `side`, still bound.
    async fn stop(self, side: &mut SideSockets) -> Result<(), SvsError> {
        let _ = self.stop.send(true);
        for (slot, task) in [
            (&mut side.probe, self.probe),
            (&mut side.metrics, self.metrics),
        ] {
            if let Some((a, task)) = task {
                let l = task.await.map_err(|e| SvsError::Internal(e.to_string()))?;
                *slot = Some((a, l));
            }
        }
        Ok(())
    }
}

/// What an installation lacks on disk: the TLS files and the PIN. Checked
/// before anything is parsed and before the HSM is touched, so one report
/// names all of it and no login is attempted without a PIN. A TLS file
/// that is there but cannot be read, is empty or is half written counts as
/// not there yet (svs-provision may be writing it, or fixing its mode):
/// waiting can fix it, exiting 78 would keep systemd from restarting svsd.
/// Blocking.
fn unprovisioned_files(config: &Config) -> Result<(), SvsError> {
    let mut missing = Vec::new();
    let mut details = Vec::new();
    for f in tls_files(config) {
        if let Some(p) = pem_file_problem(f) {
            missing.push(Missing::Tls);
            details.push(p.describe(f));
        }
    }
    if let Some(pin) = &config.hsm.pin
        && let Err(e) = pin.read()
    {
        missing.push(Missing::Pin);
        details.push(e.to_string());
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(SvsError::NotReady(
            NotReady::not_provisioned(missing),
            details.join("; "),
        ))
    }
}

/// Sorts an HSM error at start-up into "wait" (not provisioned, HSM not
/// reachable yet) and "fail" (everything else, a refused PIN above all).
fn start_error(e: HsmError) -> SvsError {
    match e {
        HsmError::PinSource(d) => {
            SvsError::NotReady(NotReady::not_provisioned(vec![Missing::Pin]), d)
        }
        e @ HsmError::TokenNotFound(_) => SvsError::NotReady(
            NotReady::not_provisioned(vec![Missing::Token]),
            e.to_string(),
        ),
        e @ (HsmError::Pkcs11 { .. }
        | HsmError::Unavailable(_)
        | HsmError::Timeout(_)
        | HsmError::Busy { .. }) => match SvsError::from(e) {
            refused @ SvsError::PinRefused(_) => refused,
            other => SvsError::NotReady(NotReady::HsmUnavailable, other.to_string()),
        },
        other => SvsError::from(other),
    }
}

/// A PIN refused at start ends svsd (status 78): the message must say
/// where the PIN came from and what to do, since the CK_RV alone ("Login:
/// CKR_PIN_INCORRECT") leaves the operator to guess, and every guess
/// costs one of the token's tries.
fn pin_refusal_hint(e: SvsError, pin: Option<&PinSource>) -> SvsError {
    let SvsError::PinRefused(what) = e else {
        return e;
    };
    let source = match pin {
        Some(PinSource::Credential(name)) => format!("the systemd credential {name:?}"),
        Some(PinSource::File(path)) => format!("the file {}", path.display()),
        None => "the configured PIN source".into(),
    };
    let hint = if what.contains("CKR_PIN_LOCKED") {
        "the user PIN is locked: a security officer sets a new one with `svs-provision pin init` (which clears the lock), then puts it in ".to_owned() + &source + " (docs/operations.md §4)"
    } else {
        format!(
            "the PIN in {source} is not the token's user PIN (changed with `svs-provision pin change`, or the token restored from an older backup than the credential): put the right one there (docs/operations.md §4) and start svsd again; each wrong try counts towards the token's lockout"
        )
    };
    SvsError::PinRefused(format!("{what} \u{2014} {hint}"))
}

/// A started svsd: listeners up, not yet READY.
struct Running {
    app: Arc<App>,
    audit: Arc<AuditTrail>,
    tls: server::TlsSlot,
    metrics_tls: server::MetricsTls,
    probe_listener: Option<TcpListener>,
    metrics_listener: Option<TcpListener>,
    stop_tx: watch::Sender<bool>,
    stop_rx: watch::Receiver<bool>,
    accept_tasks: Vec<tokio::task::JoinHandle<()>>,
    graceful: Arc<GracefulShutdown>,
}

/// One full start attempt: files, TLS, HSM login and keys, API listeners,
/// audit trail. The side listeners are the caller's: they answer while
/// this runs.
async fn start(config: &Config, metrics: Arc<Metrics>) -> Result<Prepared, SvsError> {
    // Everything that can be wrong with the files is found before the HSM is touched.
    let c = config.clone();
    let (api, metrics_tls) = tokio::task::spawn_blocking(move || {
        let waiting = unprovisioned_files(&c);
        // TLS files that are all there are checked even while the PIN is
        // still missing: one that is complete but wrong (a key that is not
        // the certificate's) is an invalid configuration, which waiting
        // would report only once the PIN came, at the officer's last step.
        if let Err(e @ SvsError::NotReady(NotReady::NotProvisioned(missing), _)) = &waiting
            && missing.contains(&Missing::Tls)
        {
            return Err(e.clone());
        }
        let metrics_tls = metrics_tls(&c)?;
        let api = api_tls(&c)?;
        waiting?;
        Ok::<_, SvsError>((api, metrics_tls))
    })
    .await
    .map_err(|e| SvsError::Internal(e.to_string()))??;

    let hsm_config = config.clone();
    let hsm_metrics = metrics.clone();
    let hsm = tokio::task::spawn_blocking(move || open_hsm(&hsm_config, hsm_metrics))
        .await
        .map_err(|e| SvsError::Internal(e.to_string()))?
        .map_err(|e| pin_refusal_hint(start_error(e), config.hsm.pin.as_ref()))?;
    let hsm = Arc::new(hsm);
    let found = hsm.refresh_keys().await.map_err(start_error)?;
    tracing::info!(keys = found.len(), profile = %hsm.profile().name, "HSM open and logged in");
    let backend: Arc<dyn SigningBackend> = hsm.clone();
    // Keys are checked before the audit trail is opened, so a start that
    // waits for them leaves no trace there.
    let absent: Vec<String> = config
        .keys
        .values()
        .map(|k| &k.object)
        .chain(&config.audit.checkpoint_key)
        .filter(|object| backend.key(object).is_none())
        .map(|object| format!("token object {object:?} not found"))
        .collect();
    if !absent.is_empty() {
        return Err(SvsError::NotReady(
            NotReady::not_provisioned(vec![Missing::Keys]),
            absent.join("; "),
        ));
    }

    let anchor = match &config.audit.anchor_object {
        Some(label) => crate::audit::anchor_head(&hsm.read_data(label).await.map_err(start_error)?)
            .map_err(|e| {
                SvsError::AuditUnavailable(format!(
                    "the token's audit anchor {label:?} holds {e}: a security officer can reset it (`svs-provision audit anchor --reset`)"
                ))
            })?,
        None => None,
    };
    // Bound before the trail is opened: a port that is taken ends svsd
    // without a `start` record that no `stop` would follow.
    let listeners = server::bind(&config.listen).await?;
    Ok(Prepared {
        api,
        metrics_tls,
        backend,
        anchor,
        listeners,
    })
}

/// A start attempt that has found everything it needs: the trail is next.
struct Prepared {
    api: crate::tls::ApiTls,
    metrics_tls: Option<TlsAcceptor>,
    backend: Arc<dyn SigningBackend>,
    anchor: Option<crate::audit::Checkpoint>,
    listeners: Vec<TcpListener>,
}

impl Prepared {
    /// Takes the side listeners, opens the trail with its `start` record,
    /// and serves the API. Must not be cut short (raced with SIGTERM): a
    /// `start` record already queued would stay without its `stop`.
    async fn open(
        self,
        config: &Config,
        side: &mut SideSockets,
        metrics: Arc<Metrics>,
    ) -> Result<Running, SvsError> {
        let Prepared {
            api,
            metrics_tls,
            backend,
            anchor,
            listeners,
        } = self;
        // Before the trail too: one that was not bound while waiting (its TLS
        // files came since) may find its port taken.
        let probe_listener = take_or_bind(&mut side.probe, config.health_listen).await?;
        let metrics_listener = take_or_bind(&mut side.metrics, config.metrics.listen).await?;
        let audit_config = config.audit.clone();
        let audit =
            tokio::task::spawn_blocking(move || AuditTrail::open(&audit_config, anchor.as_ref()))
                .await
                .map_err(|e| SvsError::Internal(e.to_string()))??;
        let audit = Arc::new(audit);
        let app = Arc::new(App::with_metrics(config, backend, audit.clone(), metrics));
        audit
            .note(
                "start",
                crate::reload::record_detail(
                    &format_args!("svsd {} started", env!("CARGO_PKG_VERSION")),
                    config.entities_sha256.as_ref(),
                ),
            )
            .await?;

        let (stop_tx, stop_rx) = watch::channel(false);
        let tls: server::TlsSlot =
            Arc::new(RwLock::new(Arc::new(server::TlsGeneration::new(0, api))));
        let gates = server::Gates::new(&config.limits);
        let graceful = Arc::new(GracefulShutdown::new());
        let mut accept_tasks = Vec::new();
        for (l, addr) in listeners.into_iter().zip(&config.listen) {
            tracing::info!(%addr, "listening (HTTPS, client certificate required)");
            accept_tasks.push(tokio::spawn(server::serve_tls(
                app.clone(),
                l,
                tls.clone(),
                gates.clone(),
                graceful.clone(),
                stop_rx.clone(),
            )));
        }
        Ok(Running {
            app,
            audit,
            tls,
            metrics_tls: Arc::new(RwLock::new(metrics_tls)),
            probe_listener,
            metrics_listener,
            stop_tx,
            stop_rx,
            accept_tasks,
            graceful,
        })
    }
}

impl Running {
    /// Side listeners, self-tests, READY, background duties, SIGHUP
    /// reloads until SIGTERM/SIGINT, then the drain. The start attempt
    /// timed by `clock` ends with the self-tests.
    async fn serve(
        self,
        config: Config,
        mut signals: Signals,
        started: Instant,
        clock: AttemptClock,
    ) -> Result<(), SvsError> {
        let Running {
            app,
            audit,
            tls,
            metrics_tls,
            probe_listener,
            metrics_listener,
            stop_tx,
            stop_rx,
            accept_tasks,
            graceful,
        } = self;
        // Before the self-tests: the probes say "self-tests pending" while
        // they run.
        if let Some(l) = probe_listener {
            tracing::info!(addr = ?config.health_listen, "listening (plain HTTP, /healthz and /readyz only)");
            tokio::spawn(server::serve_probes(app.clone(), l, stop_rx.clone()));
        }
        if let Some(l) = metrics_listener {
            tracing::info!(
                addr = ?config.metrics.listen,
                tls = metrics_tls.read().is_ok_and(|t| t.is_some()),
                "listening (metrics: /metrics)"
            );
            tokio::spawn(server::serve_metrics(
                MetricsPage::Running(app.clone()),
                l,
                metrics_tls.clone(),
                stop_rx.clone(),
            ));
        }
        // Ready only after login and self-tests.
        let tests = tokio::select! {
            r = app.run_selftests() => Some(r),
            _ = signals.stop.recv() => None,
        };
        clock.end();
        let status = Arc::new(StatusLine::default());
        match &tests {
            Some(Ok(())) => tracing::info!(
                ms = started.elapsed().as_millis() as u64,
                "self-tests passed: ready"
            ),
            // Keep running: /readyz explains, the periodic run may recover.
            Some(Err(e)) => tracing::error!(error = %e, "self-tests failed at start"),
            None => tracing::info!("stop requested during the start self-tests"),
        }

        // What svsd started with: settings that change only on restart are
        // compared with these at every reload.
        let running_config = config.clone();
        read_tls_expiry(&app, &config, Some(&config.metrics)).await;
        let mut config = config;
        let mut duties = tokio::task::JoinSet::new();
        if tests.is_some() {
            status.ready(&app);
            duties = spawn_duties(&app, &config, stop_rx.clone(), status.clone());
            loop {
                tokio::select! {
                    _ = signals.hup.recv() => {
                        Signals::reloading();
                        let (reloaded, stop) = reload(&app, (&tls, &metrics_tls), &running_config, &mut signals.stop).await;
                        match reloaded {
                            Some(Ok((new, changes))) => {
                                tracing::info!(entities = new.entities.len(), %changes, "configuration reloaded");
                                config = new;
                                status.set_reload_refused(false);
                                app.metrics().reload(true);
                            }
                            Some(Err(e)) => {
                                tracing::error!(error = %e, "reload refused: the previous configuration keeps serving");
                                status.set_reload_refused(true);
                                // A refusal otherwise shows only in the log and
                                // STATUS, which alerting does not read.
                                app.metrics().reload(false);
                            }
                            None => tracing::info!("reload given up for the stop"),
                        }
                        if stop {
                            break;
                        }
                        status.ready(&app);
                    }
                    _ = signals.stop.recv() => break,
                }
            }
        }

        notify(&[NotifyState::Stopping]);
        tracing::info!(
            grace_ms = config.grace_period.as_millis() as u64,
            "stopping: draining connections"
        );
        app.start_draining();
        let _ = stop_tx.send(true);
        // Idle duties end at once. One in the middle of a run (a periodic
        // self-test or a checkpoint on a slow HSM) finishes within the grace
        // period, or is ended after it: its record must not follow `stop`.
        let drain = async {
            for t in accept_tasks {
                let _ = t.await;
            }
            if let Ok(g) = Arc::try_unwrap(graceful) {
                g.shutdown().await;
            }
            while duties.join_next().await.is_some() {}
        };
        if tokio::time::timeout(config.grace_period, drain)
            .await
            .is_err()
        {
            tracing::warn!(
                "grace period over: requests still in flight are refused (503, the audit trail is closed) and their connections closed at exit"
            );
        }
        duties.shutdown().await;
        // Refusals counted since the last tick are in the trail before it ends.
        app.flush_refusals().await;
        match audit.last_note("stop", "svsd stopped".into()).await {
            Err(e) => tracing::error!(error = %e, "cannot record the stop in the audit trail"),
            Ok(head) => {
                let interval = config.audit.checkpoint_interval.unwrap_or_default();
                // Bounded: a stuck HSM (a checkpoint's replacement ahead of
                // this one) must not hold the exit past systemd's stop
                // timeout, whose kill would skip the trail's close.
                match tokio::time::timeout(ANCHOR_AT_STOP, app.anchor_head(head, interval)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "ALARM cannot record the trail's end in the audit anchor")
                    }
                    Err(_) => tracing::error!(
                        "ALARM the trail's end is not in the audit anchor: the HSM did not answer within {} s; the anchor stays at the last checkpoint",
                        ANCHOR_AT_STOP.as_secs()
                    ),
                }
            }
        }
        let audit_for_close = audit.clone();
        let _ = tokio::task::spawn_blocking(move || audit_for_close.close()).await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// systemd's STATUS= while running: what /readyz says, sent when it changes.
#[derive(Debug, Default)]
struct StatusLine {
    /// The text last sent.
    sent: Mutex<String>,
    /// The last SIGHUP was refused (said until a reload is accepted).
    reload_refused: std::sync::atomic::AtomicBool,
}

impl StatusLine {
    fn set_reload_refused(&self, refused: bool) {
        self.reload_refused
            .store(refused, std::sync::atomic::Ordering::Relaxed);
    }

    fn text(&self, app: &App) -> String {
        status_text(
            &app.readiness(),
            self.reload_refused
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// READY=1 with the current STATUS (after the start and every SIGHUP).
    fn ready(&self, app: &App) {
        let text = self.text(app);
        notify(&[NotifyState::Ready, NotifyState::Status(&text)]);
        *self.sent.lock().unwrap_or_else(|p| p.into_inner()) = text;
    }

    /// STATUS, if readiness changed since it was last sent.
    fn update(&self, app: &App) {
        let text = self.text(app);
        let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        if *sent != text {
            notify(&[NotifyState::Status(&text)]);
            *sent = text;
        }
    }
}

/// STATUS= for a readiness: `ready`, or `not ready: ` and /readyz's
/// message (a fixed category: details stay in the log).
fn status_text(readiness: &Result<(), SvsError>, reload_refused: bool) -> String {
    let mut text = match readiness {
        Ok(()) => "ready".to_owned(),
        Err(SvsError::ShuttingDown) => "stopping".to_owned(),
        Err(e) => format!("not ready: {}", e.client_message()),
    };
    if reload_refused {
        text.push_str("; last reload refused (see the journal)");
    }
    text
}

/// The settings read only at start that differ between the configuration
/// svsd runs with (`running`, as it started) and a reloaded one (`new`).
fn restart_only_changes(running: &Config, new: &Config) -> Vec<&'static str> {
    let (was, now) = (&running.limits, &new.limits);
    [
        (running.listen != new.listen, "[server] listen"),
        (
            running.health_listen != new.health_listen,
            "[server] health_listen",
        ),
        (running.allow_root != new.allow_root, "[server] allow_root"),
        (running.hsm != new.hsm, "[hsm]"),
        (
            running.embedded_token_config != new.embedded_token_config,
            "[embedded_token]",
        ),
        (running.audit != new.audit, "[audit]"),
        (running.metrics != new.metrics, "[metrics]"),
        (
            running.selftest_interval != new.selftest_interval,
            "[selftest] interval_s",
        ),
        (
            was.max_connections != now.max_connections,
            "[limits] max_connections",
        ),
        (
            was.max_handshakes != now.max_handshakes,
            "[limits] max_handshakes",
        ),
        (
            was.max_inflight_body_bytes != now.max_inflight_body_bytes,
            "[limits] max_inflight_body_bytes",
        ),
    ]
    .into_iter()
    .filter_map(|(changed, name)| changed.then_some(name))
    .collect()
}

/// One SIGHUP: the configuration re-read, the token's keys re-read (keys
/// and certificates provisioned since start become visible), then the new
/// configuration and those keys installed, and a `reload` record naming
/// what changed. Any failure refuses it: the old configuration and keys
/// serve on. `None` and `true`: a SIGTERM/SIGINT ended it before anything
/// was installed. `true` with a result: one came after.
///
/// A stop does not wait for a reload: one that waits on a slow HSM would
/// outlast systemd's stop timeout, and the kill would leave the trail
/// without its `stop`. Only the parts that change nothing (and the re-run
/// of failed self-tests, which records itself) are given up for it: what
/// is installed always gets its `reload` record.
async fn reload(
    app: &Arc<App>,
    (tls, metrics_tls): (&server::TlsSlot, &server::MetricsTls),
    running: &Config,
    stop: &mut StopSignals,
) -> (Option<Result<(Config, ReloadChanges), SvsError>>, bool) {
    let checked = tokio::select! {
        r = check_reload(app, running) => r,
        () = stop.recv() => return (None, true),
    };
    let (config, api, metrics, plan) = match checked {
        Ok(checked) => checked,
        Err(e) => return (Some(Err(e)), false),
    };
    let mut changes = app.install_reload(plan);
    {
        // A new generation: requests on older connections re-check their
        // client certificate against this configuration's client CA.
        let mut slot = tls.write().unwrap_or_else(|p| p.into_inner());
        let generation = slot.generation + 1;
        changes.tls_changed = api.digests.changes_from(&slot.digests);
        *slot = Arc::new(server::TlsGeneration::new(generation, api));
    }
    let metrics_replaced = metrics.is_some();
    if let Some(metrics) = metrics {
        *metrics_tls.write().unwrap_or_else(|p| p.into_inner()) = Some(metrics);
    }
    let stopped = tokio::select! {
        () = app.retest_after_reload(&mut changes) => false,
        () = stop.recv() => true,
    };
    let detail = crate::reload::record_detail(&changes, config.entities_sha256.as_ref());
    if let Err(e) = app.audit().note("reload", detail).await {
        tracing::error!(error = %e, "cannot record the reload in the audit trail");
    }
    // After the record: reading files may wait, the record may not.
    read_tls_expiry(app, &config, metrics_replaced.then_some(&running.metrics)).await;
    (Some(Ok((config, changes))), stopped)
}

/// What a reload reads and checks before it installs anything: the
/// configuration, the API's TLS files, the metrics listener's (when
/// `[metrics]` is as svsd started with it: renewed in place, they are used
/// from the reload on; unusable, they are kept as they were, with an
/// alarm), and [`App::check_reload`] (the token's keys
/// re-read, keys newly exposed or re-created self-tested, the
/// max_body_bytes check). Changes nothing.
async fn check_reload(
    app: &Arc<App>,
    running: &Config,
) -> Result<
    (
        Config,
        crate::tls::ApiTls,
        Option<TlsAcceptor>,
        crate::app::ReloadPlan,
    ),
    SvsError,
> {
    let p = running.path.clone();
    let config = tokio::task::spawn_blocking(move || Config::load(&p))
        .await
        .map_err(|e| SvsError::Internal(e.to_string()))??;
    let c = config.clone();
    let same_metrics = running.metrics == config.metrics;
    let (api, metrics) = tokio::task::spawn_blocking(move || {
        let metrics = if same_metrics {
            metrics_tls(&c)
        } else {
            Ok(None)
        };
        Ok::<_, SvsError>((api_tls(&c)?, metrics))
    })
    .await
    .map_err(|e| SvsError::Internal(e.to_string()))??;
    // Not a reason to refuse the reload: monitoring files that are half
    // renewed must not hold up an entity's suspension.
    let metrics = metrics.unwrap_or_else(|e| {
        tracing::error!(
            error = %e,
            "ALARM the [metrics.tls] files cannot be used: the metrics listener keeps the certificate it has"
        );
        None
    });
    // Said at every reload while the file differs from what runs.
    for setting in restart_only_changes(running, &config) {
        tracing::warn!(
            "{setting} changed: it takes effect only on restart (svsd keeps the value it started with)"
        );
    }
    let plan = app.check_reload(&config).await?;
    Ok((config, api, metrics, plan))
}

/// The TLS certificates' expiry for the metrics: the API's files as
/// `config` names them; the metrics listener's from `metrics` when its TLS
/// was just (re)loaded from them.
async fn read_tls_expiry(
    app: &Arc<App>,
    config: &Config,
    metrics: Option<&crate::metrics::MetricsConfig>,
) {
    let (app, api, metrics) = (app.clone(), config.tls.clone(), metrics.cloned());
    let _ =
        tokio::task::spawn_blocking(move || app.metrics().tls_files(&api, metrics.as_ref())).await;
}

/// How often the token's user PIN state is read (one C_GetTokenInfo).
const USER_PIN_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// How soon a periodic self-test the HSM was too busy for runs again.
const SELFTEST_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// The wait before the next periodic self-test while the tests fail, after
/// a run that passed or not (`retry`: the wait while they were failing):
/// none after a pass (the interval); after failures
/// [`SELFTEST_RETRY_AFTER`], then twice as long each time up to the
/// interval.
fn selftest_retry(
    retry: Option<std::time::Duration>,
    every: std::time::Duration,
    passed: bool,
) -> Option<std::time::Duration> {
    if passed {
        return None;
    }
    Some(retry.map_or(SELFTEST_RETRY_AFTER, |r| r * 2).min(every))
}

/// Starts the periodic duties; their handles, for the stop to end them.
fn spawn_duties(
    app: &Arc<App>,
    config: &Config,
    stop: watch::Receiver<bool>,
    status: Arc<StatusLine>,
) -> tokio::task::JoinSet<()> {
    let mut duties = tokio::task::JoinSet::new();
    // Periodic self-tests. After a failure the next run comes sooner, at
    // 5 s and then twice as long each time up to the interval: a test that
    // failed while the HSM was pulled for a moment (or a key was being
    // re-created) otherwise kept every tenant refused for the rest of the
    // interval (300 s by default) after the cause was gone.
    let a = app.clone();
    let every = config.selftest_interval;
    let mut s = stop.clone();
    duties.spawn(async move {
        let mut retry = selftest_retry(None, every, !a.selftest_failed());
        loop {
            tokio::select! {
                _ = tokio::time::sleep(retry.unwrap_or(every)) => {
                    let passed = a.run_periodic_selftests(SELFTEST_RETRY_AFTER).await.is_ok();
                    retry = selftest_retry(retry, every, passed);
                }
                _ = s.changed() => return,
            }
        }
    });
    // Once a second: systemd's STATUS follows readiness (self-tests, HSM,
    // audit trail); abnormal-traffic windows move; refusals held back from
    // the audit trail are counted in it.
    let a = app.clone();
    let mut s = stop.clone();
    duties.spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    status.update(&a);
                    a.anomaly_tick().await;
                    a.flush_refusals().await;
                }
                _ = s.changed() => return,
            }
        }
    });
    // The user PIN's state: a lock does not stop signing, so only this
    // shows it before the next restart fails.
    let a = app.clone();
    let mut s = stop.clone();
    duties.spawn(async move {
        let mut tick = tokio::time::interval(USER_PIN_CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => a.check_user_pin().await,
                _ = s.changed() => return,
            }
        }
    });
    // Audit checkpoints.
    if let (Some(every), Some(key)) = (
        config.audit.checkpoint_interval,
        config.audit.checkpoint_key.clone(),
    ) {
        let a = app.clone();
        let mut s = stop;
        duties.spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = tick.tick() => match a.checkpoint(&key, every).await {
                        Ok(seq) => tracing::debug!(seq, "audit checkpoint signed"),
                        Err(e) => tracing::error!(error = %e, "ALARM audit checkpoint failed"),
                    },
                    _ = s.changed() => return,
                }
            }
        });
    }
    duties
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::*;

    #[test]
    fn cryptoki_and_h2_noise_stays_off_unless_asked_for() {
        let quiet = "info,cryptoki::mechanism=off,h2=error";
        assert_eq!(log_directives(None), quiet);
        assert_eq!(log_directives(Some(" ")), quiet);
        assert_eq!(
            log_directives(Some("debug,svs=trace")),
            "debug,svs=trace,cryptoki::mechanism=off,h2=error"
        );
        assert_eq!(
            log_directives(Some("cryptoki=debug")),
            "cryptoki=debug,h2=error"
        );
        assert_eq!(
            log_directives(Some("info,h2=debug")),
            "info,h2=debug,cryptoki::mechanism=off"
        );
    }

    #[test]
    fn a_side_listener_moved_to_an_overlapping_address_is_bound_again() {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let wild: SocketAddr = "0.0.0.0:0".parse().unwrap();
                let mut slot: SideSocket = None;
                keep_bound(&mut slot, Some(wild)).await.unwrap();
                let port = slot.as_ref().unwrap().1.local_addr().unwrap().port();
                let wild = SocketAddr::from(([0, 0, 0, 0], port));
                let local = SocketAddr::from(([127, 0, 0, 1], port));
                slot = None;
                keep_bound(&mut slot, Some(wild)).await.unwrap();
                let l = take_or_bind(&mut slot, Some(local)).await.unwrap().unwrap();
                assert_eq!(l.local_addr().unwrap(), local);
                assert!(slot.is_none());
            });
    }

    #[test]
    fn a_failed_self_test_is_retried_sooner_and_sooner_no_later_than_the_interval() {
        let s = std::time::Duration::from_secs;
        let every = s(300);
        let mut retry = None;
        let mut waits = Vec::new();
        for _ in 0..9 {
            retry = selftest_retry(retry, every, false);
            waits.push(retry.unwrap_or(every).as_secs());
        }
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(selftest_retry(Some(s(20)), every, true), None);
        // An interval shorter than the first retry is kept.
        assert_eq!(selftest_retry(None, s(2), false), Some(s(2)));
    }

    #[test]
    fn every_journald_line_carries_its_priority() {
        use std::io::Write;
        let mut w = PriorityLines::new(Vec::new(), &tracing::Level::ERROR);
        w.write_all(b"ERROR svsd: configuration:\n  [limits]: bad\n")
            .unwrap();
        assert_eq!(
            String::from_utf8(w.inner).unwrap(),
            "<3>ERROR svsd: configuration:\n<3>  [limits]: bad\n"
        );
        let mut w = PriorityLines::new(Vec::new(), &tracing::Level::WARN);
        w.write_all(b"WARN a").unwrap();
        w.write_all(b"larm\n").unwrap();
        assert_eq!(String::from_utf8(w.inner).unwrap(), "<4>WARN alarm\n");
    }

    #[test]
    fn no_colours_off_a_terminal_and_no_timestamp_under_journald() {
        let f = LogFormat::detect;
        assert_eq!(
            f(true, None),
            LogFormat {
                ansi: true,
                timestamp: true
            }
        );
        assert_eq!(
            f(false, None),
            LogFormat {
                ansi: false,
                timestamp: true
            }
        );
        assert_eq!(
            f(false, Some(OsStr::new("8:12345"))),
            LogFormat {
                ansi: false,
                timestamp: false
            }
        );
        assert!(f(false, Some(OsStr::new(""))).timestamp);
    }

    /// A configuration in `dir` (TLS files, PIN file there), with `extra`
    /// TOML appended.
    fn config_in(dir: &Path, extra: &str) -> Config {
        let text = format!(
            r#"
[server]
listen = ["127.0.0.1:8443"]
[tls]
certificate = "server.pem"
private_key = "server-key.pem"
client_ca = "ca.pem"
[hsm]
module = "embedded"
token_label = "svs"
pin = {{ file = "{pin}" }}
[keys]
demo = {{ object = "demo" }}
[audit]
dir = "audit"
checkpoint_key = "svs-audit"
{extra}
"#,
            pin = dir.join("pin").display()
        );
        Config::from_toml(&text, &dir.join("svsd.toml")).unwrap()
    }

    #[test]
    fn every_restart_only_setting_that_differs_from_what_runs_is_named() {
        let dir = Path::new("/etc/svs");
        let running = config_in(dir, "");
        assert_eq!(restart_only_changes(&running, &running), Vec::<&str>::new());
        // Settings a reload applies are not named.
        let reloadable = config_in(
            dir,
            "[limits]\nmax_body_bytes = 4096\nmax_batch_items = 8\n[anomaly]\nenabled = false\n",
        );
        assert_eq!(
            restart_only_changes(&running, &reloadable),
            Vec::<&str>::new()
        );
        let mut new = config_in(
            dir,
            "[limits]\nmax_connections = 7\nmax_inflight_body_bytes = 1048576\n[selftest]\ninterval_s = 60\n[metrics]\nenabled = false\n",
        );
        new.listen = vec!["127.0.0.1:9443".parse().unwrap()];
        new.health_listen = Some("127.0.0.1:8080".parse().unwrap());
        new.hsm.token_label = Some("other".into());
        new.audit.max_group_records += 1;
        assert_eq!(
            restart_only_changes(&running, &new),
            [
                "[server] listen",
                "[server] health_listen",
                "[hsm]",
                "[audit]",
                "[metrics]",
                "[selftest] interval_s",
                "[limits] max_connections",
                "[limits] max_inflight_body_bytes",
            ]
        );
        let mut handshakes = running.clone();
        handshakes.limits.max_handshakes += 1;
        handshakes.embedded_token_config = Some("/etc/svs/softtoken.toml".into());
        assert_eq!(
            restart_only_changes(&running, &handshakes),
            ["[embedded_token]", "[limits] max_handshakes"]
        );
    }

    #[test]
    fn status_says_what_readyz_says_without_details() {
        assert_eq!(status_text(&Ok(()), false), "ready");
        assert_eq!(
            status_text(
                &Err(SvsError::NotReady(
                    NotReady::SelftestsFailed,
                    "C_Sign: CKR_DEVICE_ERROR".into()
                )),
                false
            ),
            "not ready: self-tests failed"
        );
        let audit = status_text(
            &Err(SvsError::AuditUnavailable(
                "/var/log/svs/audit: No space left on device".into(),
            )),
            false,
        );
        assert!(
            audit.starts_with("not ready: audit trail not writable"),
            "{audit}"
        );
        assert!(!audit.contains("/var/log"), "{audit}");
        let hsm = status_text(
            &Err(SvsError::NotReady(
                NotReady::HsmUnavailable,
                "HSM Down: 0 of 4 sessions open".into(),
            )),
            true,
        );
        assert_eq!(
            hsm,
            "not ready: HSM unavailable or not logged in; last reload refused (see the journal)"
        );
        assert_eq!(status_text(&Err(SvsError::ShuttingDown), false), "stopping");
    }

    #[test]
    fn watchdog_pings_stop_only_while_a_start_attempt_overruns() {
        let now = Instant::now();
        let deadline = Duration::from_secs(60);
        assert!(pings_due(None, now, deadline));
        assert!(pings_due(Some(now), now, deadline));
        assert!(pings_due(
            Some(now),
            now + Duration::from_secs(59),
            deadline
        ));
        assert!(!pings_due(Some(now), now + deadline, deadline));
        assert!(!pings_due(
            Some(now),
            now + Duration::from_secs(600),
            deadline
        ));
        let clock = AttemptClock::default();
        assert_eq!(clock.started(), None);
        clock.begin();
        let began = clock.started().unwrap();
        assert!(pings_due(clock.started(), began, deadline));
        assert!(!pings_due(clock.started(), began + deadline, deadline));
        clock.end();
        assert!(pings_due(clock.started(), began + deadline, deadline));
    }

    #[test]
    fn empty_and_half_written_pem_files_are_not_provisioned_yet() {
        let cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        assert!(pem_text_problem(cert.as_bytes()).is_none());
        assert!(matches!(pem_text_problem(b""), Some(FileProblem::Empty)));
        assert!(matches!(
            pem_text_problem(b" \n\n"),
            Some(FileProblem::Empty)
        ));
        assert!(matches!(
            pem_text_problem(b"-----BEGIN CERTIFICATE-----\nMII"),
            Some(FileProblem::Incomplete)
        ));
        let chain_cut = format!("{cert}-----BEGIN CERTIFICATE-----\nMIIB");
        assert!(matches!(
            pem_text_problem(chain_cut.as_bytes()),
            Some(FileProblem::Incomplete)
        ));
        // Complete but not PEM: a configuration error, for the parser to report.
        assert!(pem_text_problem(b"garbage").is_none());
    }

    #[test]
    fn unreadable_tls_files_wait_and_disabled_metrics_need_none() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        for f in ["server.pem", "server-key.pem", "ca.pem"] {
            std::fs::write(dir.join(f), pem).unwrap();
        }
        std::fs::write(dir.join("pin"), "12345678\n").unwrap();
        let metrics_tls = "[metrics.tls]\ncertificate = \"m.pem\"\nprivate_key = \"m-key.pem\"\n";
        // Metrics off: its TLS files are not waited for.
        let off = config_in(dir, &format!("[metrics]\nenabled = false\n{metrics_tls}"));
        assert!(unprovisioned_files(&off).is_ok());
        assert!(tls_files(&off).iter().all(|f| !f.ends_with("m.pem")));
        let on = config_in(dir, metrics_tls);
        let Err(SvsError::NotReady(reason, detail)) = unprovisioned_files(&on) else {
            panic!("metrics TLS files not required");
        };
        assert_eq!(reason, NotReady::not_provisioned(vec![Missing::Tls]));
        assert!(detail.contains("m.pem does not exist"), "{detail}");
        // A directory where a file belongs: cannot be read, still waits.
        std::fs::remove_file(dir.join("ca.pem")).unwrap();
        std::fs::create_dir(dir.join("ca.pem")).unwrap();
        std::fs::write(dir.join("server-key.pem"), "").unwrap();
        let Err(SvsError::NotReady(reason, detail)) = unprovisioned_files(&off) else {
            panic!("an unreadable file is not waited for");
        };
        assert_eq!(reason, NotReady::not_provisioned(vec![Missing::Tls]));
        assert!(
            detail.contains("cannot read") && detail.contains("ca.pem"),
            "{detail}"
        );
        assert!(detail.contains("server-key.pem is empty"), "{detail}");
    }

    #[test]
    fn a_credential_pin_outside_systemd_is_noted_as_not_checkable() {
        let cred = PinSource::Credential("svs-hsm-pin".into());
        let note = pin_note(&cred, false).unwrap();
        assert!(note.contains("cannot be checked here"), "{note}");
        assert!(!note.contains("not provisioned"), "{note}");
        let tmp = tempfile::tempdir().unwrap();
        let file = PinSource::File(tmp.path().join("pin"));
        let note = pin_note(&file, false).unwrap();
        assert!(note.starts_with("not provisioned yet: "), "{note}");
        std::fs::write(tmp.path().join("pin"), "12345678\n").unwrap();
        assert_eq!(pin_note(&file, false), None);
    }

    #[test]
    fn start_errors_wait_for_provisioning_or_the_hsm_and_a_refused_pin_does_not() {
        let rv = |code| svs_hsm::error::rv_info_from_code(code).unwrap();
        let reason = |e| match start_error(e) {
            SvsError::NotReady(r, _) => Some(r),
            _ => None,
        };
        assert_eq!(
            reason(HsmError::PinSource("cannot read /etc/svs/pin".into())),
            Some(NotReady::not_provisioned(vec![Missing::Pin]))
        );
        assert_eq!(
            reason(HsmError::TokenNotFound("label \"svs\"".into())),
            Some(NotReady::not_provisioned(vec![Missing::Token]))
        );
        for code in [0xe0, 0x30, 0x32] {
            let e = HsmError::Pkcs11 {
                rv: rv(code),
                function: "C_OpenSession".into(),
            };
            assert_eq!(reason(e), Some(NotReady::HsmUnavailable), "{code:#x}");
        }
        assert_eq!(
            reason(HsmError::Unavailable("pool down".into())),
            Some(NotReady::HsmUnavailable)
        );
        for code in 0xa0..=0xa4 {
            let e = start_error(HsmError::Pkcs11 {
                rv: rv(code),
                function: "C_Login".into(),
            });
            assert!(matches!(e, SvsError::PinRefused(_)), "{e:?}");
            assert_eq!(e.exit_code(), 78);
        }
        let e = start_error(HsmError::Config("unknown profile".into()));
        assert_eq!(e.exit_code(), 78);
    }
}
