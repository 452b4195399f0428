//! The daemon's life: start (HSM login, audit, self-tests, listeners,
//! READY), background duties (self-tests, checkpoints, watchdog), SIGHUP
//! reload and SIGTERM drain.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use hyper_util::server::graceful::GracefulShutdown;
use sd_notify::NotifyState;
use svs_hsm::{Hsm, HsmMetrics, ModuleSource, NoMetrics};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::app::App;
use crate::audit::AuditTrail;
use crate::backend::SigningBackend;
use crate::config::Config;
use crate::error::SvsError;
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

/// Refuses root unless told otherwise.
pub fn check_user(config: &Config, opts: &RunOptions) -> Result<(), SvsError> {
    let uid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .map_err(|e| SvsError::Io(format!("cannot determine the user: {e}")))?;
    if uid == 0 && !(opts.allow_root || config.allow_root) {
        return Err(SvsError::Io(
            "refusing to run as root: run as the svs user, or pass --allow-root (or set [server] allow_root = true)"
                .into(),
        ));
    }
    Ok(())
}

/// Opens the HSM of `config` and discovers its keys. Blocking.
pub fn open_hsm(config: &Config) -> Result<Hsm, SvsError> {
    open_hsm_with(config, Arc::new(NoMetrics))
}

/// [`open_hsm`], reporting the pool's metrics to `metrics`. Blocking.
pub fn open_hsm_with(config: &Config, metrics: Arc<dyn HsmMetrics>) -> Result<Hsm, SvsError> {
    if config.hsm.module == ModuleSource::Embedded {
        // Keep the linker from dropping the soft token's entry points, which
        // `Pkcs11::new_from_self` looks up in this executable.
        std::hint::black_box(svs_softtoken::C_GetFunctionList as *const ());
        if let Some(path) = &config.embedded_token_config {
            svs_softtoken::set_config_path(Some(path.clone()));
        }
    }
    Hsm::open(&config.hsm, metrics).map_err(SvsError::from)
}

fn tls_acceptor(config: &Config) -> Result<TlsAcceptor, SvsError> {
    Ok(TlsAcceptor::from(crate::tls::server_config(&config.tls)?))
}

/// Runs svsd until SIGTERM/SIGINT. Returns after the drain.
pub async fn run(config: Config, opts: RunOptions) -> Result<(), SvsError> {
    let started = Instant::now();
    check_user(&config, &opts)?;
    // Everything that can be wrong with the files is found before the HSM is touched.
    let acceptor = tls_acceptor(&config)?;
    let metrics_tls = match &config.metrics.tls {
        Some(t) => Some(TlsAcceptor::from(crate::tls::metrics_server_config(t)?)),
        None => None,
    };

    let metrics = Arc::new(Metrics::new());
    let hsm_config = config.clone();
    let hsm_metrics = metrics.clone();
    let hsm = tokio::task::spawn_blocking(move || open_hsm_with(&hsm_config, hsm_metrics))
        .await
        .map_err(|e| SvsError::Internal(e.to_string()))??;
    let hsm = Arc::new(hsm);
    let found = hsm.refresh_keys().await?;
    tracing::info!(keys = found.len(), profile = %hsm.profile().name, "HSM open and logged in");
    let backend: Arc<dyn SigningBackend> = hsm.clone();

    let audit_config = config.audit.clone();
    let audit = tokio::task::spawn_blocking(move || AuditTrail::open(&audit_config))
        .await
        .map_err(|e| SvsError::Internal(e.to_string()))??;
    let audit = Arc::new(audit);
    let app = Arc::new(App::with_metrics(&config, backend, audit.clone(), metrics));
    app.check_keys(&config.keys)?;
    if let Some(k) = &config.audit.checkpoint_key
        && app.backend().key(k).is_none()
    {
        return Err(SvsError::Config(vec![format!(
            "[audit] checkpoint_key: token object {k:?} not found"
        )]));
    }
    audit
        .note(
            "start",
            format!("svsd {} started", env!("CARGO_PKG_VERSION")),
        )
        .await?;

    let listeners = server::bind(&config.listen).await?;
    let probe_listener = match config.health_listen {
        Some(a) => server::bind(&[a]).await?.pop(),
        None => None,
    };
    let metrics_listener = match config.metrics.listen {
        Some(a) => server::bind(&[a]).await?.pop(),
        None => None,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let tls: server::TlsSlot = Arc::new(RwLock::new(acceptor));
    let connections = Arc::new(Semaphore::new(config.limits.max_connections));
    let graceful = Arc::new(GracefulShutdown::new());
    let mut accept_tasks = Vec::new();
    for (l, addr) in listeners.into_iter().zip(&config.listen) {
        tracing::info!(%addr, "listening (HTTPS, client certificate required)");
        accept_tasks.push(tokio::spawn(server::serve_tls(
            app.clone(),
            l,
            tls.clone(),
            connections.clone(),
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
            notify(&[
                NotifyState::Ready,
                NotifyState::Status("self-tests failed: not ready"),
            ]);
            tracing::error!(error = %e, "self-tests failed at start");
        }
    }

    spawn_duties(&app, &config, stop_rx.clone());

    let mut config = config;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| SvsError::Io(e.to_string()))?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| SvsError::Io(e.to_string()))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| SvsError::Io(e.to_string()))?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                let mono = NotifyState::monotonic_usec_now().ok();
                let mut states = vec![NotifyState::Reloading];
                states.extend(mono);
                notify(&states);
                match reload(&app, &tls, &config.path).await {
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
            _ = term.recv() => break,
            _ = int.recv() => break,
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
    if let Err(e) = audit.note("stop", "svsd stopped".into()).await {
        tracing::error!(error = %e, "cannot record the stop in the audit trail");
    }
    let audit_for_close = audit.clone();
    let _ = tokio::task::spawn_blocking(move || audit_for_close.close()).await;
    tracing::info!("stopped");
    Ok(())
}

async fn reload(app: &Arc<App>, tls: &server::TlsSlot, path: &Path) -> Result<Config, SvsError> {
    let p = path.to_path_buf();
    let config = tokio::task::spawn_blocking(move || Config::load(&p))
        .await
        .map_err(|e| SvsError::Internal(e.to_string()))??;
    let c = config.clone();
    let acceptor = tokio::task::spawn_blocking(move || tls_acceptor(&c))
        .await
        .map_err(|e| SvsError::Internal(e.to_string()))??;
    app.reload(&config)?;
    *tls.write().unwrap_or_else(|p| p.into_inner()) = acceptor;
    if let Err(e) = app
        .audit()
        .note("reload", format!("{} entities", config.entities.len()))
        .await
    {
        tracing::error!(error = %e, "cannot record the reload in the audit trail");
    }
    Ok(config)
}

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
                _ = tick.tick() => { let _ = a.run_selftests().await; }
                _ = s.changed() => return,
            }
        }
    });
    // Abnormal-traffic detection: windows move once a second.
    let a = app.clone();
    let mut s = stop.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => { a.anomaly_tick().await; }
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
