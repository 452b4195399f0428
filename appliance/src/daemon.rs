//! The daemon's life: start (HSM login, audit, self-tests, listeners,
//! READY), background duties (self-tests, checkpoints, watchdog), SIGHUP
//! reload and SIGTERM drain.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use hyper_util::server::graceful::GracefulShutdown;
use sd_notify::NotifyState;
use svs_hsm::{Hsm, HsmError, HsmMetrics, ModuleSource, NoMetrics};
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
use crate::server;

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
    /// svsd's own timestamp: left out under journald, which stamps every line.
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
        let b = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new("info,cryptoki::mechanism=off")
                }),
            )
            .with_ansi(self.ansi)
            .with_writer(std::io::stderr);
        if self.timestamp {
            b.init();
        } else {
            b.without_time().init();
        }
    }
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
/// CA bundles parse and belong together, and the PIN can be read. Files not
/// there yet (an appliance not yet provisioned, where svsd waits for them)
/// are not an error: they come back as a note. Blocking.
pub fn check_files(config: &Config) -> Result<Option<String>, SvsError> {
    if let Err(e) = missing_files(config) {
        return match e {
            SvsError::NotReady(_, details) => Ok(Some(format!("not provisioned yet: {details}"))),
            other => Err(other),
        };
    }
    let mut errors = Vec::new();
    if let Some(t) = &config.metrics.tls
        && let Err(e) = crate::tls::metrics_server_config(t)
    {
        errors.push(format!("[metrics.tls]: {e}"));
    }
    match api_tls(config) {
        Ok(_) => {}
        // Every entity whose issuer is not in the client CA bundle, one line each.
        Err(SvsError::Config(list)) => errors.extend(list.iter().map(|m| format!("[tls]: {m}"))),
        Err(e) => errors.push(format!("[tls]: {e}")),
    }
    if errors.is_empty() {
        Ok(None)
    } else {
        Err(SvsError::Config(errors))
    }
}

/// Opens the HSM of `config` and discovers its keys. Blocking.
pub fn open_hsm(config: &Config) -> Result<Hsm, SvsError> {
    open_hsm_with(config, Arc::new(NoMetrics))
}

/// [`open_hsm`], reporting the pool's metrics to `metrics`. Blocking.
pub fn open_hsm_with(config: &Config, metrics: Arc<dyn HsmMetrics>) -> Result<Hsm, SvsError> {
    open_hsm_raw(config, metrics).map_err(SvsError::from)
}

/// [`open_hsm_with`], keeping the HSM's own error for [`start_error`]. Blocking.
fn open_hsm_raw(config: &Config, metrics: Arc<dyn HsmMetrics>) -> Result<Hsm, HsmError> {
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
/// Slowest retry of a waiting start: a network HSM that comes back, or
/// files put in place without a reload, are noticed within this.
const RETRY_MAX: Duration = Duration::from_secs(10);

/// SIGHUP, SIGTERM and SIGINT, installed once before the first start
/// attempt, so that a signal during start-up is neither lost nor fatal.
struct Signals {
    hup: Signal,
    term: Signal,
    int: Signal,
}

impl Signals {
    fn new() -> Result<Signals, SvsError> {
        let sig = |k| signal(k).map_err(|e| SvsError::Io(e.to_string()));
        Ok(Signals {
            hup: sig(SignalKind::hangup())?,
            term: sig(SignalKind::terminate())?,
            int: sig(SignalKind::interrupt())?,
        })
    }
}

/// What ends a wait.
enum Wake {
    Retry,
    Reload,
    Stop,
}

/// The probe listener, bound once and kept across start attempts.
type ProbeSocket = Option<(SocketAddr, TcpListener)>;

/// Runs svsd until SIGTERM/SIGINT. Returns after the drain.
///
/// Two phases. *Waiting*: a start attempt found the installation not
/// provisioned (TLS files, PIN, token or keys missing) or the HSM
/// unreachable; svsd reports READY=1 with a not-ready STATUS, answers the
/// probe listener with the reason, and tries the whole start again on
/// SIGHUP (configuration re-read) and periodically. *Running*: a start
/// succeeded. Any other start error (invalid configuration, a refused PIN,
/// an unwritable audit trail) ends svsd: waiting could not fix it.
pub async fn run(config: Config, opts: RunOptions) -> Result<(), SvsError> {
    let started = Instant::now();
    check_user(&config, &opts)?;
    let mut signals = Signals::new()?;
    let mut config = config;
    let mut probe: ProbeSocket = None;
    let mut last_reason: Option<NotReady> = None;
    let mut retry = RETRY_INITIAL;
    // While waiting (and while a start attempt runs) the watchdog must still
    // be pinged: an unprovisioned appliance is alive, and systemd would
    // otherwise kill it after WatchdogSec. The running phase pings on its own.
    let waiting_pings = sd_notify::watchdog_enabled().map(|period| {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period / 2);
            loop {
                tick.tick().await;
                notify(&[NotifyState::Watchdog]);
            }
        })
    });
    loop {
        let error = match start(&config, &mut probe).await {
            Ok(running) => {
                if last_reason.is_some() {
                    tracing::info!("provisioned: starting");
                }
                if let Some(pings) = &waiting_pings {
                    pings.abort();
                }
                return running.serve(config, signals, started).await;
            }
            Err(e) => e,
        };
        let SvsError::NotReady(reason, detail) = &error else {
            return Err(error);
        };
        // Logged once per reason: a retry every few seconds must not fill
        // the journal.
        if last_reason.as_ref() != Some(reason) {
            tracing::warn!(%detail, "not ready: {reason}; waiting (retrying every {}s and on SIGHUP)", RETRY_MAX.as_secs());
            let status = format!("not ready: {reason}");
            notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
            last_reason = Some(reason.clone());
        } else {
            tracing::debug!(%detail, "still not ready: {reason}");
        }
        if probe.as_ref().map(|(a, _)| *a) != config.health_listen {
            probe = None;
            if let Some(a) = config.health_listen {
                probe = server::bind(&[a]).await?.pop().map(|l| (a, l));
                tracing::info!(addr = %a, "listening (plain HTTP, /healthz and /readyz only; not ready)");
            }
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let (_reason_tx, reason_rx) = watch::channel(error.clone());
        let server = probe.take().map(|(a, l)| {
            let limits = config.limits.clone();
            (
                a,
                tokio::spawn(server::serve_waiting_probes(l, reason_rx, limits, stop_rx)),
            )
        });
        let wake = tokio::select! {
            _ = tokio::time::sleep(retry) => Wake::Retry,
            _ = signals.hup.recv() => Wake::Reload,
            _ = signals.term.recv() => Wake::Stop,
            _ = signals.int.recv() => Wake::Stop,
        };
        let _ = stop_tx.send(true);
        if let Some((a, task)) = server {
            let l = task.await.map_err(|e| SvsError::Internal(e.to_string()))?;
            probe = Some((a, l));
        }
        match wake {
            Wake::Retry => retry = (retry * 2).min(RETRY_MAX),
            Wake::Reload => {
                retry = RETRY_INITIAL;
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
            }
            Wake::Stop => {
                notify(&[NotifyState::Stopping]);
                tracing::info!("stopped (was not ready)");
                return Ok(());
            }
        }
    }
}

/// What an installation lacks on disk: the TLS files and the PIN. Checked
/// before anything is parsed and before the HSM is touched, so one report
/// names all of it and no login is attempted without a PIN. Blocking.
fn missing_files(config: &Config) -> Result<(), SvsError> {
    let mut missing = Vec::new();
    let mut details = Vec::new();
    let mut tls = vec![
        &config.tls.certificate,
        &config.tls.private_key,
        &config.tls.client_ca,
    ];
    if let Some(t) = &config.metrics.tls {
        tls.extend([&t.certificate, &t.private_key]);
        tls.extend(&t.client_ca);
    }
    for f in tls {
        if !f.exists() {
            missing.push(Missing::Tls);
            details.push(format!("{} does not exist", f.display()));
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

/// A started svsd: listeners up, not yet READY.
struct Running {
    app: Arc<App>,
    audit: Arc<AuditTrail>,
    tls: server::TlsSlot,
    stop_tx: watch::Sender<bool>,
    stop_rx: watch::Receiver<bool>,
    accept_tasks: Vec<tokio::task::JoinHandle<()>>,
    graceful: Arc<GracefulShutdown>,
}

/// One full start attempt: files, TLS, HSM login and keys, audit trail,
/// listeners. Takes the probe listener from `probe` (if its address still
/// matches) only once nothing that leads to waiting can fail any more.
async fn start(config: &Config, probe: &mut ProbeSocket) -> Result<Running, SvsError> {
    // Everything that can be wrong with the files is found before the HSM is touched.
    let c = config.clone();
    let (api, metrics_tls) = tokio::task::spawn_blocking(move || {
        missing_files(&c)?;
        let metrics_tls = match &c.metrics.tls {
            Some(t) => Some(TlsAcceptor::from(crate::tls::metrics_server_config(t)?)),
            None => None,
        };
        Ok::<_, SvsError>((api_tls(&c)?, metrics_tls))
    })
    .await
    .map_err(|e| SvsError::Internal(e.to_string()))??;

    let metrics = Arc::new(Metrics::new());
    let hsm_config = config.clone();
    let hsm_metrics = metrics.clone();
    let hsm = tokio::task::spawn_blocking(move || open_hsm_raw(&hsm_config, hsm_metrics))
        .await
        .map_err(|e| SvsError::Internal(e.to_string()))?
        .map_err(start_error)?;
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

    let audit_config = config.audit.clone();
    let audit = tokio::task::spawn_blocking(move || AuditTrail::open(&audit_config))
        .await
        .map_err(|e| SvsError::Internal(e.to_string()))??;
    let audit = Arc::new(audit);
    let app = Arc::new(App::with_metrics(config, backend, audit.clone(), metrics));
    audit
        .note(
            "start",
            format!("svsd {} started", env!("CARGO_PKG_VERSION")),
        )
        .await?;

    let listeners = server::bind(&config.listen).await?;
    let probe_listener = match (config.health_listen, probe.take()) {
        (Some(a), Some((was, l))) if a == was => Some(l),
        (Some(a), _) => server::bind(&[a]).await?.pop(),
        (None, _) => None,
    };
    let metrics_listener = match config.metrics.listen {
        Some(a) => server::bind(&[a]).await?.pop(),
        None => None,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let tls: server::TlsSlot = Arc::new(RwLock::new(Arc::new(server::TlsGeneration::new(0, api))));
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
    if let Some(l) = probe_listener {
        tracing::info!(addr = ?config.health_listen, "listening (plain HTTP, /healthz and /readyz only)");
        tokio::spawn(server::serve_probes(app.clone(), l, stop_rx.clone()));
    }
    if let Some(l) = metrics_listener {
        tracing::info!(
            addr = ?config.metrics.listen,
            tls = metrics_tls.is_some(),
            "listening (metrics: /metrics)"
        );
        tokio::spawn(server::serve_metrics(
            app.clone(),
            l,
            metrics_tls,
            stop_rx.clone(),
        ));
    }
    Ok(Running {
        app,
        audit,
        tls,
        stop_tx,
        stop_rx,
        accept_tasks,
        graceful,
    })
}

impl Running {
    /// Self-tests, READY, background duties, SIGHUP reloads until
    /// SIGTERM/SIGINT, then the drain.
    async fn serve(
        self,
        config: Config,
        mut signals: Signals,
        started: Instant,
    ) -> Result<(), SvsError> {
        let Running {
            app,
            audit,
            tls,
            stop_tx,
            stop_rx,
            accept_tasks,
            graceful,
        } = self;
        // Ready only after login and self-tests.
        match app.run_selftests().await {
            Ok(()) => {
                tracing::info!(
                    ms = started.elapsed().as_millis() as u64,
                    "self-tests passed: ready"
                );
                notify(&[NotifyState::Ready, NotifyState::Status("ready")]);
            }
            Err(e) => {
                // Keep running: /readyz explains, the periodic run may recover.
                let status = format!("not ready: {}", NotReady::SelftestsFailed);
                notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
                tracing::error!(error = %e, "self-tests failed at start");
            }
        }

        spawn_duties(&app, &config, stop_rx.clone());

        let mut config = config;
        loop {
            tokio::select! {
                _ = signals.hup.recv() => {
                    let mono = NotifyState::monotonic_usec_now().ok();
                    let mut states = vec![NotifyState::Reloading];
                    states.extend(mono);
                    notify(&states);
                    match reload(&app, &tls, &config).await {
                        Ok(new) => {
                            tracing::info!(entities = new.entities.len(), "configuration reloaded");
                            config = new;
                            notify(&[NotifyState::Ready, NotifyState::Status("ready (reloaded)")]);
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "reload refused: the previous configuration keeps serving");
                            notify(&[NotifyState::Ready, NotifyState::Status("reload refused")]);
                        }
                    }
                }
                _ = signals.term.recv() => break,
                _ = signals.int.recv() => break,
            }
        }

        notify(&[NotifyState::Stopping]);
        tracing::info!(
            grace_ms = config.grace_period.as_millis() as u64,
            "stopping: draining connections"
        );
        app.start_draining();
        let _ = stop_tx.send(true);
        for t in accept_tasks {
            let _ = t.await;
        }
        let graceful = Arc::try_unwrap(graceful).ok();
        if let Some(g) = graceful
            && tokio::time::timeout(config.grace_period, g.shutdown())
                .await
                .is_err()
        {
            tracing::warn!("grace period over: closing the remaining connections");
        }
        // Refusals counted since the last tick are in the trail before it ends.
        app.flush_refusals().await;
        if let Err(e) = audit.note("stop", "svsd stopped".into()).await {
            tracing::error!(error = %e, "cannot record the stop in the audit trail");
        }
        let audit_for_close = audit.clone();
        let _ = tokio::task::spawn_blocking(move || audit_for_close.close()).await;
        tracing::info!("stopped");
        Ok(())
    }
}

async fn reload(app: &Arc<App>, tls: &server::TlsSlot, old: &Config) -> Result<Config, SvsError> {
    let p = old.path.clone();
    let config = tokio::task::spawn_blocking(move || Config::load(&p))
        .await
        .map_err(|e| SvsError::Internal(e.to_string()))??;
    let c = config.clone();
    let api = tokio::task::spawn_blocking(move || api_tls(&c))
        .await
        .map_err(|e| SvsError::Internal(e.to_string()))??;
    // (App::reload refuses a max_body_bytes the body budget cannot hold.)
    let (was, now) = (&old.limits, &config.limits);
    if (
        was.max_connections,
        was.max_handshakes,
        was.max_inflight_body_bytes,
    ) != (
        now.max_connections,
        now.max_handshakes,
        now.max_inflight_body_bytes,
    ) {
        tracing::warn!(
            "[limits] max_connections, max_handshakes and max_inflight_body_bytes change only on restart"
        );
    }
    // Self-tests of newly exposed keys run here; a failure refuses the reload.
    app.reload(&config).await?;
    {
        // A new generation: requests on older connections re-check their
        // client certificate against this configuration's client CA.
        let mut slot = tls.write().unwrap_or_else(|p| p.into_inner());
        let generation = slot.generation + 1;
        *slot = Arc::new(server::TlsGeneration::new(generation, api));
    }
    if let Err(e) = app
        .audit()
        .note("reload", format!("{} entities", config.entities.len()))
        .await
    {
        tracing::error!(error = %e, "cannot record the reload in the audit trail");
    }
    Ok(config)
}

/// How soon a periodic self-test the HSM was too busy for runs again.
const SELFTEST_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

fn spawn_duties(app: &Arc<App>, config: &Config, stop: watch::Receiver<bool>) {
    // Periodic self-tests.
    let a = app.clone();
    let every = config.selftest_interval;
    let mut s = stop.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let _ = a.run_periodic_selftests(SELFTEST_RETRY_AFTER).await;
                }
                _ = s.changed() => return,
            }
        }
    });
    // Abnormal-traffic detection: windows move once a second; refusals
    // held back from the audit trail are counted in it as often.
    let a = app.clone();
    let mut s = stop.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    a.anomaly_tick().await;
                    a.flush_refusals().await;
                }
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
        let mut s = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = tick.tick() => match a.checkpoint(&key).await {
                        Ok(seq) => tracing::debug!(seq, "audit checkpoint signed"),
                        Err(e) => tracing::error!(error = %e, "ALARM audit checkpoint failed"),
                    },
                    _ = s.changed() => return,
                }
            }
        });
    }
    // systemd watchdog: pinged from the runtime at half the period, so a
    // wedged runtime gets the daemon restarted. A down HSM does not stop the
    // pings: it shows in /readyz and recovers in the pool.
    if let Some(period) = sd_notify::watchdog_enabled() {
        let mut s = stop;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period / 2);
            loop {
                tokio::select! {
                    _ = tick.tick() => notify(&[NotifyState::Watchdog]),
                    _ = s.changed() => return,
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::*;

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
