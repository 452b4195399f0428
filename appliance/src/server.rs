//! The HTTPS listener: TLS handshake with a deadline, the client's identity
//! taken once per connection, HTTP/1.1 or HTTP/2 by ALPN, bodies read with
//! a size cap and a deadline, graceful drain on shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::app::{App, Reply, Route};
use crate::error::SvsError;
use crate::policy::ClientIdentity;

/// The TLS configuration in use; replaced on reload, read per connection,
/// so established connections keep theirs.
pub type TlsSlot = Arc<RwLock<TlsAcceptor>>;

fn response(reply: Reply, head_only: bool) -> Response<Full<Bytes>> {
    let body = if head_only {
        Bytes::new()
    } else {
        let mut b = serde_json::to_vec(&reply.body).unwrap_or_default();
        b.push(b'\n');
        Bytes::from(b)
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = hyper::StatusCode::from_u16(reply.status)
        .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(s) = reply.retry_after {
        resp.headers_mut().insert(RETRY_AFTER, HeaderValue::from(s));
    }
    resp
}

async fn read_body(
    body: Incoming,
    declared: Option<u64>,
    max: usize,
    deadline: Duration,
) -> Result<Bytes, SvsError> {
    if declared.is_some_and(|n| n > max as u64) {
        return Err(SvsError::BodyTooLarge(max));
    }
    let collected = tokio::time::timeout(deadline, Limited::new(body, max).collect())
        .await
        .map_err(|_| SvsError::BodyTimeout(deadline))?;
    match collected {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(SvsError::BodyTooLarge(max)),
        Err(_) => Err(SvsError::MalformedRequest(
            "request body could not be read".into(),
        )),
    }
}

/// Handles one HTTP request.
pub async fn handle(
    app: Arc<App>,
    client: Arc<Option<ClientIdentity>>,
    probes_only: bool,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let start = Instant::now();
    let head_only = req.method() == hyper::Method::HEAD;
    let operation =
        Route::parse(req.method().as_str(), req.uri().path()).map_or("other", |r| r.metric_name());
    let reply = handle_inner(&app, client.as_ref().as_ref(), probes_only, req).await;
    let reply = reply.unwrap_or_else(Reply::from);
    let elapsed = start.elapsed();
    app.metrics().http(operation, reply.status, elapsed);
    tracing::debug!(
        status = reply.status,
        latency_us = elapsed.as_micros() as u64,
        "request"
    );
    Ok(response(reply, head_only))
}

async fn handle_inner(
    app: &Arc<App>,
    client: Option<&ClientIdentity>,
    probes_only: bool,
    req: Request<Incoming>,
) -> Result<Reply, SvsError> {
    let route = Route::parse(req.method().as_str(), req.uri().path())?;
    if probes_only && !route.is_probe() {
        return Err(SvsError::NotFound);
    }
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    app.precheck(&route, client, content_type.as_deref())?;
    let limits = app.runtime().limits.clone();
    let body = if route.has_body() {
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        read_body(
            req.into_body(),
            declared,
            limits.max_body_bytes,
            limits.body_timeout,
        )
        .await?
    } else {
        Bytes::new()
    };
    tokio::time::timeout(limits.request_timeout, app.handle(route, client, &body))
        .await
        .map_err(|_| SvsError::HsmTimeout)
}

fn builder(app: &App) -> auto::Builder<TokioExecutor> {
    let limits = app.runtime().limits.clone();
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    b
}

/// Accepts HTTPS connections on `listener` until `stop` turns true.
pub async fn serve_tls(
    app: Arc<App>,
    listener: TcpListener,
    tls: TlsSlot,
    connections: Arc<Semaphore>,
    graceful: Arc<GracefulShutdown>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        // Backpressure: beyond the connection cap, clients wait in the backlog.
        let permit = tokio::select! {
            p = connections.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stop.changed() => return,
        };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = tls.read().unwrap_or_else(|p| p.into_inner()).clone();
        let app = app.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let handshake = app.runtime().limits.handshake_timeout;
            let stream = match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::info!(%peer, error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::info!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let client = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| ClientIdentity::from_der(c).ok());
            let client = Arc::new(client);
            let svc_app = app.clone();
            let svc = hyper::service::service_fn(move |req| {
                handle(svc_app.clone(), client.clone(), false, req)
            });
            let b = builder(&app);
            let conn = b.serve_connection(TokioIo::new(stream), svc).into_owned();
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

/// Plain-HTTP listener for /healthz and /readyz only.
pub async fn serve_probes(app: Arc<App>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
            _ = stop.changed() => return,
        };
        let app = app.clone();
        tokio::spawn(async move {
            let svc_app = app.clone();
            let svc = hyper::service::service_fn(move |req| {
                handle(svc_app.clone(), Arc::new(None), true, req)
            });
            let _ = builder(&app).serve_connection(TokioIo::new(tcp), svc).await;
        });
    }
}

/// Connections the metrics listener serves at once; more wait in the backlog.
const METRICS_CONNECTIONS: usize = 16;

async fn metrics_request(
    app: Arc<App>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, ctype, body) = match (req.method(), req.uri().path()) {
        (&hyper::Method::GET | &hyper::Method::HEAD, "/metrics") => {
            // Gathering and encoding is CPU work proportional to the series
            // count: it runs on a blocking thread, never a runtime worker.
            let a = app.clone();
            match tokio::task::spawn_blocking(move || a.metrics().render(&a)).await {
                Ok(text) => (200, prometheus::TEXT_FORMAT, Bytes::from(text)),
                Err(_) => (500, "text/plain", Bytes::from_static(b"render failed\n")),
            }
        }
        (_, "/metrics") => (405, "text/plain", Bytes::from_static(b"GET /metrics\n")),
        _ => (
            404,
            "text/plain",
            Bytes::from_static(b"not found: try /metrics\n"),
        ),
    };
    let body = if req.method() == hyper::Method::HEAD {
        Bytes::new()
    } else {
        body
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    Ok(resp)
}

/// Serves `/metrics` (plain HTTP, or TLS when `tls` is set) until `stop`.
/// Separate from the API listeners and their connection cap: scrapers can
/// neither take the API's connections nor be starved by API clients.
pub async fn serve_metrics(
    app: Arc<App>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    mut stop: watch::Receiver<bool>,
) {
    let connections = Arc::new(Semaphore::new(METRICS_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = connections.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stop.changed() => return,
        };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let app = app.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc_app = app.clone();
            let svc = hyper::service::service_fn(move |req| metrics_request(svc_app.clone(), req));
            let b = builder(&app);
            let result = match tls {
                None => b.serve_connection(TokioIo::new(tcp), svc).await,
                Some(acceptor) => {
                    let handshake = app.runtime().limits.handshake_timeout;
                    match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => b.serve_connection(TokioIo::new(s), svc).await,
                        Ok(Err(e)) => {
                            tracing::info!(%peer, error = %e, "metrics TLS handshake refused");
                            return;
                        }
                        Err(_) => return,
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "metrics connection ended with an error");
            }
        });
    }
}

/// Binds every address (before dropping privileges or declaring ready).
pub async fn bind(addrs: &[SocketAddr]) -> Result<Vec<TcpListener>, SvsError> {
    let mut out = Vec::new();
    for a in addrs {
        out.push(
            TcpListener::bind(a)
                .await
                .map_err(|e| SvsError::Io(format!("cannot listen on {a}: {e}")))?,
        );
    }
    Ok(out)
}
