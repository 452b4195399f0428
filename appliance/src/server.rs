//! The HTTPS listener: TLS handshakes bounded in number and time, a
//! connection slot only for a client that completed one and whose entity
//! (or the group of certificates no entity claims) is within its
//! connection cap, the client's
//! identity taken once per connection and re-checked per request (validity,
//! and the client CA after a reload), HTTP/1.1 or HTTP/2 by ALPN, bodies
//! read after the entity was admitted, with a size cap, a shared byte budget
//! and a deadline; idle and aged connections closed gracefully; graceful
//! drain on shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Bytes, Incoming};
use hyper::header::{
    ALLOW, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, RETRY_AFTER, TRANSFER_ENCODING,
};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulConnection, GracefulShutdown};
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::app::{App, BodyReservation, Reply, Route};
use crate::config::Limits;
use crate::error::SvsError;
use crate::metrics::Metrics;
use crate::policy::{ClientIdentity, VerifiedClient};
use crate::refusals::LogLimits;
use crate::source_share::{self, SourceShare, SourceSlot};
use crate::tls::ApiTls;

/// HTTP/2 streams per connection: with bodies read only after admission and
/// a shared body budget, 32 is plenty for one client and bounds what one
/// connection can make the server hold.
const H2_MAX_STREAMS: u32 = 32;

/// What a connection may make svsd hold that no budget counts: the
/// request data an HTTP/2 client may send ahead of what svsd reads, and an
/// HTTP/1.1 request head. hyper's defaults (1 MiB windows, a ~400 KB head
/// buffer) let 200 connections that sent and stalled take RSS from 74 to
/// 218 MB, and 400 unfinished heads from 34 to 190 MB; bodies are counted
/// in `max_inflight_body_bytes` only once svsd reads them. With these, a
/// connection holds at most 128 KiB that way. A large body takes a few more
/// round trips (flow control), which on a LAN costs milliseconds.
const H2_STREAM_WINDOW: u32 = 64 * 1024;
const H2_CONNECTION_WINDOW: u32 = 128 * 1024;
/// A request head over this gets 431.
const H1_MAX_BUF: usize = 64 * 1024;

/// A source address may hold 1/8 of `max_handshakes` (at least one) once
/// more than half are taken: 8 of the default 64.
const HANDSHAKE_SHARES: usize = 8;

/// Plain-HTTP probe connections served at once (see [`SideSlots`]).
const PROBE_CONNECTIONS: usize = 16;

/// The few connection slots of a side listener (probes, metrics): `size`
/// at once, more wait in the backlog; and once more than half are taken, a
/// source address holding a quarter of them has its next connection closed
/// on arrival, so that silent sockets from one host cannot keep the health
/// checks or the scrapers out.
struct SideSlots {
    connections: Arc<Semaphore>,
    by_source: Arc<SourceShare>,
    size: usize,
}

/// What [`SideSlots::accept`] got.
enum SideAccept {
    /// A connection and the slots it holds until it ends.
    Connection(TcpStream, SocketAddr, (OwnedSemaphorePermit, SourceSlot)),
    /// A connection closed at once: its source holds its share.
    SourceBusy(SocketAddr),
    /// `stop` fired.
    Stopped,
}

impl SideSlots {
    fn new(size: usize) -> SideSlots {
        SideSlots {
            connections: Arc::new(Semaphore::new(size)),
            by_source: SourceShare::new(size / 4),
            size,
        }
    }

    /// Waits for a free slot, then for the next connection. `name` names
    /// the listener in the log.
    async fn accept(
        &self,
        listener: &TcpListener,
        name: &str,
        stop: &mut watch::Receiver<bool>,
    ) -> SideAccept {
        let permit = tokio::select! {
            p = self.connections.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return SideAccept::Stopped,
            },
            _ = stop.changed() => return SideAccept::Stopped,
        };
        loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // E.g. out of file descriptors: do not spin.
                        tracing::warn!(error = %e, listener = name, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.changed() => return SideAccept::Stopped,
            };
            let contended =
                source_share::contended(self.size, self.connections.available_permits());
            return match self.by_source.take(peer.ip(), contended) {
                Some(slot) => SideAccept::Connection(tcp, peer, (permit, slot)),
                None => SideAccept::SourceBusy(peer),
            };
        }
    }
}

/// The longest a probe or metrics connection may sit idle or send its
/// request head. Those listeners have few slots, and their clients (a load
/// balancer's health check, a scraper) either send at once or come back
/// later on a new connection; with the API's 60 s, 16 silent connections
/// held every slot for a minute at a time.
const SIDE_LISTENER_IDLE: Duration = Duration::from_secs(5);

/// How a connection ended before it was served: the `reason` label of
/// `svs_tls_handshake_failures_total`, and a kind of log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum HandshakeFailure {
    /// The TLS handshake failed (not TLS, no or a refused certificate…).
    Refused,
    /// The handshake was not done within `handshake_timeout_ms`.
    Timeout,
    /// Handshake done, but no connection slot came free within
    /// `handshake_timeout_ms` (or `max_handshakes` clients were waiting
    /// for one already).
    NoSlot,
    /// Closed on arrival: more than half of the listener's slots were
    /// taken, and the client's address held its share of them already
    /// ([`crate::source_share`]).
    SourceBusy,
}

impl HandshakeFailure {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::Refused => "refused",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::NoSlot => "no_slot",
            HandshakeFailure::SourceBusy => "source_busy",
        }
    }
}

/// The `listener` label of the API listener's handshake failures.
pub const API_LISTENER: &str = "api";
/// The `listener` label of the metrics listener's handshake failures.
pub const METRICS_LISTENER: &str = "metrics";

/// Failed handshakes cost their peer one TCP connection and no
/// certificate: a loop of plain-TCP connections made 13,000 lines a second
/// when each was logged, and journald's per-service rate limit then drops
/// svsd's other lines, alarms included. So each listener and reason gets
/// at most one line a second; the counter counts them all.
static HANDSHAKE_LINES: LogLimits<(&'static str, HandshakeFailure)> =
    LogLimits::new(Duration::from_secs(1));

/// Counts a connection of `listener` that ended before it was served, and
/// logs it unless its kind had a line less than a second ago (`held_back`:
/// those of its kind left out since that line).
fn handshake_failed(
    metrics: &Metrics,
    listener: &'static str,
    why: HandshakeFailure,
    peer: SocketAddr,
    error: Option<&dyn std::fmt::Display>,
) {
    metrics.tls_handshake_failure(listener, why);
    let Some(held_back) = HANDSHAKE_LINES.hit((listener, why)) else {
        return;
    };
    let error = error.map(tracing::field::display);
    match why {
        HandshakeFailure::Refused => {
            tracing::info!(listener, %peer, error, held_back, "TLS handshake refused");
        }
        HandshakeFailure::Timeout => {
            tracing::info!(listener, %peer, held_back, "TLS handshake timed out");
        }
        HandshakeFailure::NoSlot => {
            tracing::info!(listener, %peer, held_back, "no connection slot free: closed");
        }
        HandshakeFailure::SourceBusy => {
            tracing::info!(
                listener,
                %peer,
                held_back,
                "the client's address holds its share of the listener's slots: closed"
            );
        }
    }
}

/// Connections closed for their entity's (or the unknown clients') cap: a
/// client can make them at will, so at most one line a second.
static OVER_CAP_LINES: LogLimits<()> = LogLimits::new(Duration::from_secs(1));

/// Counts and logs a connection closed after its handshake because its
/// entity (`None`: no entity claims the certificate) holds
/// `max_connections_per_entity` (`max_unknown_connections`) already.
fn connection_over_cap(app: &App, entity: Option<&crate::policy::Entity>, peer: SocketAddr) {
    let entity = entity.map_or(crate::metrics::UNKNOWN, crate::policy::Entity::name);
    app.metrics().connection_over_cap(entity);
    if let Some(held_back) = OVER_CAP_LINES.hit(()) {
        tracing::info!(
            listener = API_LISTENER,
            %peer,
            entity,
            held_back,
            "connection cap of the client's entity reached: closed"
        );
    }
}

/// Logs, per listener and reason, the failed handshakes held back since
/// that kind's last line, once its second is over, so that the tail of a
/// flood is reported even when nothing follows it. Called once a second.
pub fn log_held_back_handshake_failures() {
    for ((listener, why), held_back) in HANDSHAKE_LINES.held_back() {
        tracing::info!(
            listener,
            reason = why.as_str(),
            held_back,
            "failed TLS handshakes left out of the log since its last line"
        );
    }
    for ((), held_back) in OVER_CAP_LINES.held_back() {
        tracing::info!(
            listener = API_LISTENER,
            held_back,
            "connections closed at their entity's cap left out of the log since its last line"
        );
    }
}

/// The API's limits, with idle and header timeouts capped for a side
/// listener (probes, metrics).
fn side_listener_limits(api: &Limits) -> Limits {
    Limits {
        idle_timeout: api.idle_timeout.min(SIDE_LISTENER_IDLE),
        header_timeout: api.header_timeout.min(SIDE_LISTENER_IDLE),
        ..api.clone()
    }
}

/// One TLS configuration of the API listener and its generation number
/// (incremented by every reload).
pub struct TlsGeneration {
    /// Counts reloads; connections remember the one they were made under.
    pub generation: u64,
    /// Accepts new connections.
    pub acceptor: TlsAcceptor,
    /// Re-checks client certificates of connections made under an older
    /// generation.
    pub client_verifier: Arc<dyn ClientCertVerifier>,
    /// What its files held.
    pub digests: crate::tls::TlsDigests,
}

impl TlsGeneration {
    /// Generation `generation` of the API's TLS.
    pub fn new(generation: u64, tls: ApiTls) -> TlsGeneration {
        TlsGeneration {
            generation,
            acceptor: TlsAcceptor::from(tls.config),
            client_verifier: tls.client_verifier,
            digests: tls.digests,
        }
    }
}

impl std::fmt::Debug for TlsGeneration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsGeneration")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// The TLS configuration in use; replaced on reload, read at each accept
/// and by requests on connections of an older generation.
pub type TlsSlot = Arc<RwLock<Arc<TlsGeneration>>>;

/// The semaphores an HTTPS accept loop takes: handshakes in flight, and
/// established connections. Sized at start (restart-only).
#[derive(Debug, Clone)]
pub struct Gates {
    /// Established connections.
    pub connections: Arc<Semaphore>,
    /// TLS handshakes in flight.
    pub handshakes: Arc<Semaphore>,
    /// Each source address's share of `handshakes`.
    pub handshakes_by_source: Arc<SourceShare>,
    /// `max_handshakes`.
    pub max_handshakes: usize,
    /// Handshaken clients waiting for a connection slot (as many as
    /// handshakes): they no longer hold a handshake permit, and each is a
    /// TLS session in memory.
    pub waiting: Arc<Semaphore>,
}

impl Gates {
    /// Gates sized by `limits`.
    pub fn new(limits: &Limits) -> Gates {
        Gates {
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            handshakes: Arc::new(Semaphore::new(limits.max_handshakes)),
            handshakes_by_source: SourceShare::new(limits.max_handshakes / HANDSHAKE_SHARES),
            max_handshakes: limits.max_handshakes,
            waiting: Arc::new(Semaphore::new(limits.max_handshakes)),
        }
    }
}

/// What one TLS generation's client CA found of a connection's chain: it
/// accepts the chain, and whether the leaf is issued directly by one of its
/// certificates ([`VerifiedClient::issued_directly`]). Kept in one atomic
/// word, so that a request never sees one generation's flag with another's
/// number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Checked {
    generation: u64,
    issued_directly: bool,
}

impl Checked {
    fn pack(self) -> u64 {
        // 2^63 reloads are not going to happen.
        (self.generation << 1) | u64::from(self.issued_directly)
    }

    fn unpack(word: u64) -> Checked {
        Checked {
            generation: word >> 1,
            issued_directly: word & 1 == 1,
        }
    }
}

fn unix_time(now: SystemTime) -> Option<UnixTime> {
    Some(UnixTime::since_unix_epoch(
        now.duration_since(SystemTime::UNIX_EPOCH).ok()?,
    ))
}

/// Whether the leaf of `chain` is issued directly by a certificate of the
/// client CA bundle behind `verifier`, given that `verifier` accepts the
/// whole chain: the leaf alone then verifies. Without intermediates that is
/// the verification already made; with some, one more signature check
/// (webpki, no intermediates: only an anchor whose subject is the leaf's
/// issuer, byte for byte, and whose key verifies the leaf's signature).
fn issued_directly(
    chain: &[CertificateDer<'static>],
    verifier: &dyn ClientCertVerifier,
    at: UnixTime,
) -> bool {
    match chain {
        [] => false,
        [_leaf] => true,
        [leaf, ..] => verifier.verify_client_cert(leaf, &[], at).is_ok(),
    }
}

/// The client certificate of one TLS connection.
struct Peer {
    identity: Option<ClientIdentity>,
    chain: Vec<CertificateDer<'static>>,
    /// The newest TLS generation whose client CA accepted the chain, and
    /// what it found ([`Checked::pack`]).
    checked: AtomicU64,
}

impl Peer {
    /// A peer whose `chain` the handshake under `tls` just accepted.
    fn accepted(chain: Vec<CertificateDer<'static>>, tls: &TlsGeneration, now: SystemTime) -> Peer {
        let identity = chain.first().and_then(|c| ClientIdentity::from_der(c).ok());
        let issued_directly = unix_time(now)
            .is_some_and(|at| issued_directly(&chain, tls.client_verifier.as_ref(), at));
        let checked = Checked {
            generation: tls.generation,
            issued_directly,
        };
        Peer {
            identity,
            chain,
            checked: AtomicU64::new(checked.pack()),
        }
    }

    /// The client a request on this connection presents now: a certificate
    /// still within its validity, whose chain the current client CA
    /// accepts, and whether that CA issued it directly. Both are checked
    /// once per connection and reload (the connection may predate it), not
    /// per request. None answers 401 and closes the connection.
    fn current(
        &self,
        tls: &TlsGeneration,
        now: SystemTime,
    ) -> Result<VerifiedClient<'_>, SvsError> {
        let identity = self.identity.as_ref().ok_or(SvsError::Unauthenticated)?;
        identity.check_valid_at(now)?;
        let mut checked = Checked::unpack(self.checked.load(Ordering::Acquire));
        if checked.generation != tls.generation {
            let not_trusted =
                || SvsError::ClientCertificateRefused(crate::error::CERTIFICATE_NOT_TRUSTED);
            let (leaf, intermediates) = self.chain.split_first().ok_or_else(not_trusted)?;
            let at = unix_time(now).ok_or_else(not_trusted)?;
            let verifier = tls.client_verifier.as_ref();
            verifier
                .verify_client_cert(leaf, intermediates, at)
                .map_err(|_| not_trusted())?;
            checked = Checked {
                generation: tls.generation,
                issued_directly: issued_directly(&self.chain, verifier, at),
            };
            self.checked.store(checked.pack(), Ordering::Release);
        }
        Ok(VerifiedClient {
            identity,
            issued_directly: checked.issued_directly,
        })
    }
}

/// Activity of one connection, for the idle timer and early close.
struct Activity {
    in_flight: AtomicUsize,
    last_done: Mutex<Instant>,
    close: Notify,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            in_flight: AtomicUsize::new(0),
            last_done: Mutex::new(Instant::now()),
            close: Notify::new(),
        }
    }

    fn begin(&self) -> ActiveRequest<'_> {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        ActiveRequest(self)
    }

    /// When the connection becomes idle-expired, if nothing happens meanwhile.
    fn idle_deadline(&self, idle: Duration) -> Instant {
        self.quiet_deadline(None, idle)
    }

    /// When the connection will have had no request in flight for `quiet`
    /// (counted from `since` at the earliest), if nothing happens
    /// meanwhile. With a request in flight, `quiet` from now: checked again
    /// then.
    fn quiet_deadline(&self, since: Option<Instant>, quiet: Duration) -> Instant {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Instant::now() + quiet;
        }
        let last = *self.last_done.lock().unwrap_or_else(|p| p.into_inner());
        since.map_or(last, |s| s.max(last)) + quiet
    }

    /// Whether the connection has had no request in flight for `quiet`
    /// (counted from `since` at the earliest).
    fn quiet_for(&self, since: Option<Instant>, quiet: Duration) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
            && self.quiet_deadline(since, quiet) <= Instant::now()
    }
}

struct ActiveRequest<'a>(&'a Activity);

impl Drop for ActiveRequest<'_> {
    fn drop(&mut self) {
        self.0.end();
    }
}

impl Activity {
    fn end(&self) {
        *self.last_done.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A refused request's body being drained after its answer went out: in
/// flight for the connection's timers, so that a close (a 401 or a
/// suspended entity closes the connection) waits for it as for any request.
struct Draining(Arc<ConnCtx>);

impl std::fmt::Debug for Draining {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Draining")
    }
}

impl Draining {
    fn new(ctx: Arc<ConnCtx>) -> Draining {
        ctx.activity.in_flight.fetch_add(1, Ordering::AcqRel);
        Draining(ctx)
    }
}

impl Drop for Draining {
    fn drop(&mut self) {
        self.0.activity.end();
    }
}

/// Everything a request on one connection needs.
struct ConnCtx {
    app: Arc<App>,
    /// The API's TLS (None on the plain-HTTP probe listener).
    tls: Option<TlsSlot>,
    peer: Option<Peer>,
    probes_only: bool,
    activity: Activity,
}

/// An answer's body. Over HTTP/2 it also takes the request's body when the
/// answer was made before that was read (a refusal), and drains it once
/// the answer is out. Dropping an unread request body early resets the
/// stream (CANCEL) and the client gets a stream error instead of its 429;
/// dropping it after the answer resets it with NO_ERROR (RFC 9113 section
/// 8.1), which curl 7.88 (Debian 12) still reports as an error while it
/// uploads. Reading the rest lets the stream end as usual. The drain is
/// bounded by `max_body_bytes` and the body timeout (then NO_ERROR), and by
/// the stream limit, as a stream stays open while it drains. HTTP/1.1
/// needs none of this: hyper closes the connection after an answer whose
/// request was not read.
struct AnswerBody {
    data: Option<Bytes>,
    unread_request: Option<(Incoming, usize, Duration, Arc<ConnCtx>)>,
}

impl std::fmt::Debug for AnswerBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnswerBody")
            .field("data", &self.data.as_ref().map(Bytes::len))
            .field("unread_request", &self.unread_request.is_some())
            .finish()
    }
}

impl AnswerBody {
    fn new(data: Bytes) -> AnswerBody {
        AnswerBody {
            data: Some(data).filter(|d| !d.is_empty()),
            unread_request: None,
        }
    }
}

impl Drop for AnswerBody {
    fn drop(&mut self) {
        let Some((mut body, limit, deadline, ctx)) = self.unread_request.take() else {
            return;
        };
        // Counted from here, once the answer is out, not from when it was
        // made: an answer a client never takes (no flow-control window)
        // would otherwise count as work for ever, and the connection would
        // never be idle and closed.
        let in_flight = Draining::new(ctx);
        // hyper drops an answer on its connection's task, in the runtime.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let drain = async {
                let mut read = 0usize;
                while let Some(Ok(frame)) = body.frame().await {
                    read += frame.data_ref().map_or(0, Bytes::len);
                    if read > limit {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(deadline, drain).await;
            drop(in_flight);
        });
    }
}

impl hyper::body::Body for AnswerBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        std::task::Poll::Ready(self.data.take().map(|d| Ok(hyper::body::Frame::data(d))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

fn response(reply: Reply, head_only: bool) -> Response<AnswerBody> {
    let body = if head_only {
        Bytes::new()
    } else {
        let mut b = serde_json::to_vec(&reply.body).unwrap_or_default();
        b.push(b'\n');
        Bytes::from(b)
    };
    let mut resp = Response::new(AnswerBody::new(body));
    *resp.status_mut() = hyper::StatusCode::from_u16(reply.status)
        .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(s) = reply.retry_after {
        resp.headers_mut().insert(RETRY_AFTER, HeaderValue::from(s));
    }
    if let Some(methods) = reply.allow {
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static(methods));
    }
    resp
}

/// Reads a body of at most `max` bytes within `deadline`, counting each
/// chunk in `reservation` as it arrives: a client is charged for what it
/// sent, so a stalled upload holds nothing of the body budget. `declared`
/// is the Content-Length. `None`: the client went away before its body was
/// in, and there is no one to answer.
async fn read_body(
    body: &mut Incoming,
    max: usize,
    declared: Option<u64>,
    deadline: Duration,
    reservation: &mut BodyReservation<'_>,
) -> Result<Option<Bytes>, SvsError> {
    let read = async {
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut len = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = match frame {
                Ok(frame) => frame,
                Err(e) if client_went_away(&e) => return Ok(None),
                Err(_) => {
                    return Err(SvsError::MalformedRequest(
                        "request body could not be read".into(),
                    ));
                }
            };
            // Trailers carry no body bytes.
            let Ok(data) = frame.into_data() else {
                continue;
            };
            len = len.saturating_add(data.len());
            if len > max {
                return Err(SvsError::BodyTooLarge(max));
            }
            reservation.grow(data.len())?;
            chunks.push(data);
        }
        let bytes = match chunks.len() {
            0 => Bytes::new(),
            1 => chunks.swap_remove(0),
            _ => Bytes::from(chunks.concat()),
        };
        // An HTTP/2 stream the client resets with NO_ERROR ends its body
        // without an error (hyper follows RFC 9113 section 8.1), short of
        // its Content-Length, which a body that ends properly cannot be (h2
        // refuses it, as hyper does over HTTP/1.1). Without a
        // Content-Length such a body cannot be told from a whole one.
        Ok(Some(bytes).filter(|b| declared.is_none_or(|n| b.len() as u64 >= n)))
    };
    tokio::time::timeout(deadline, read)
        .await
        .map_err(|_| SvsError::BodyTimeout(deadline))?
}

/// Whether a body that could not be read broke off because its client went
/// away (reset its stream, closed or lost the connection) rather than
/// because it broke HTTP's framing: an HTTP/1.1 chunk that does not parse
/// (hyper reports it as invalid data or input), an HTTP/2 body longer or
/// shorter than its content-length (h2 resets the stream itself). Anything
/// else cut the body short: hyper's HTTP/1.1 "connection error", an EOF,
/// a reset or a GOAWAY from the client, a broken pipe.
fn client_went_away(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(err) = cause {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return !matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput
            );
        }
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return !h2.is_library();
        }
        cause = err.source();
    }
    true
}

/// Counts an API request in `svs_http_requests_total` and its duration
/// once it is done, or, when hyper drops its handler before (the client
/// reset the stream or closed the connection while it waited for the
/// body, a slot or the HSM), as [`crate::metrics::CLIENT_CLOSED_STATUS`]: every
/// request that reached the handler is counted once.
struct HttpCount<'a> {
    metrics: &'a crate::metrics::Metrics,
    operation: &'static str,
    start: Instant,
    status: u16,
}

impl HttpCount<'_> {
    /// Counts the request as answered with `status`; returns its duration.
    fn answered(mut self, status: u16) -> Duration {
        self.status = status;
        self.start.elapsed()
    }
}

impl Drop for HttpCount<'_> {
    fn drop(&mut self) {
        self.metrics
            .http(self.operation, self.status, self.start.elapsed());
    }
}

/// Whether an answer ends the connection: a client no entity claims (or
/// whose certificate no longer passes), or a suspended entity, is not kept
/// connected to retry at leisure.
fn closes_connection(reply: &Reply) -> bool {
    reply.status == 401 || reply.body["error"]["code"] == "entity_suspended"
}

/// Handles one HTTP request.
async fn handle(
    ctx: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Result<Response<AnswerBody>, Infallible> {
    let _active = ctx.activity.begin();
    let (req, body) = req.into_parts();
    let mut body = Some(body);
    let head_only = req.method == hyper::Method::HEAD;
    let http1 = req.version < hyper::Version::HTTP_2;
    let count = HttpCount {
        metrics: ctx.app.metrics(),
        operation: Route::parse(req.method.as_str(), req.uri.path())
            .map_or("other", |r| r.metric_name()),
        start: Instant::now(),
        status: crate::metrics::CLIENT_CLOSED_STATUS,
    };
    let reply = match handle_inner(&ctx, &req, &mut body).await {
        Ok(Some(reply)) => reply,
        Ok(None) => {
            // Nobody to answer; hyper throws this away.
            drop(count);
            let mut resp = Response::new(AnswerBody::new(Bytes::new()));
            *resp.status_mut() = hyper::StatusCode::from_u16(crate::metrics::CLIENT_CLOSED_STATUS)
                .unwrap_or(hyper::StatusCode::BAD_REQUEST);
            return Ok(resp);
        }
        Err(e) => {
            e.log_details();
            Reply::from(e)
        }
    };
    let elapsed = count.answered(reply.status);
    tracing::debug!(
        status = reply.status,
        latency_us = elapsed.as_micros() as u64,
        "request"
    );
    let close = closes_connection(&reply);
    let mut resp = response(reply, head_only);
    if let Some(body) = body.filter(|b| !http1 && !b.is_end_stream()) {
        let limits = &ctx.app.runtime().limits;
        let limits = (limits.max_body_bytes, limits.body_timeout);
        resp.body_mut().unread_request = Some((body, limits.0, limits.1, ctx.clone()));
    }
    if close {
        if http1 {
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        // HTTP/2: GOAWAY once this answer is out (the connection's driver
        // shuts it down gracefully).
        ctx.activity.close.notify_one();
    }
    Ok(resp)
}

/// Handles a request; its body is taken from `body` only when it is read.
/// `None`: the client went away while its body was on the way.
async fn handle_inner(
    ctx: &ConnCtx,
    req: &hyper::http::request::Parts,
    body: &mut Option<Incoming>,
) -> Result<Option<Reply>, SvsError> {
    let app = &ctx.app;
    let route = Route::parse(req.method.as_str(), req.uri.path())?;
    if ctx.probes_only && !route.is_probe() {
        return Err(SvsError::NotFound);
    }
    // hyper decodes only `chunked`: a body sent `gzip, chunked` would be
    // read, and signed, still gzip-coded (RFC 9112 section 6.1).
    let coded = req.headers.get_all(TRANSFER_ENCODING).iter().any(|v| {
        v.to_str()
            .map_or(true, |v| !v.trim().eq_ignore_ascii_case("chunked"))
    });
    if coded {
        return Err(SvsError::MalformedRequest(
            "Transfer-Encoding other than chunked is not supported".into(),
        ));
    }
    let content_type = req
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    // The client as the current TLS generation sees it (cached per
    // connection and generation).
    let client = || match (&ctx.peer, &ctx.tls) {
        (Some(peer), Some(tls)) => {
            let current = tls.read().unwrap_or_else(|p| p.into_inner()).clone();
            peer.current(&current, SystemTime::now())
        }
        _ => Err(SvsError::Unauthenticated),
    };
    // Identity, entity, operation, concurrency slot and rate: all before
    // a byte of the body is read.
    let adm = app
        .precheck(&route, client(), content_type.as_deref())
        .await?;
    let limits = adm.runtime().limits.clone();
    let (body, _budget) = if route.has_body() {
        let declared = req
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let max = limits.max_body_bytes;
        let mut reservation = app.body_reservation(adm.entity(), &limits);
        let read = match body.as_mut() {
            _ if declared.is_some_and(|n| n > max as u64) => Err(SvsError::BodyTooLarge(max)),
            None => Err(SvsError::Internal("body taken".into())),
            Some(incoming) => {
                let read = read_body(
                    incoming,
                    max,
                    declared,
                    limits.body_timeout,
                    &mut reservation,
                )
                .await;
                // A body refused for the budget part-way is drained after
                // the answer (HTTP/2) like one refused before it was read,
                // so that the client gets its 503 or 429; one found too
                // large, too slow or broken while read is reset.
                if let Err(e) = &read
                    && !matches!(e, SvsError::ServerBusy { .. } | SvsError::TooManyConcurrent)
                {
                    body.take();
                }
                read
            }
        };
        match read {
            Ok(Some(b)) => (b, Some(reservation)),
            // Not a refusal: no record, and no error against the entity.
            Ok(None) => {
                drop(reservation);
                app.client_closed(&route, adm.entity());
                return Ok(None);
            }
            Err(e) => {
                drop(reservation);
                app.refuse(&route, adm.entity(), &e).await;
                return Err(e);
            }
        }
    } else {
        (Bytes::new(), None)
    };
    // Again, as a reload may have come while the body arrived.
    let client = client();
    tokio::time::timeout(
        limits.request_timeout,
        app.handle(route, &adm, client, &body),
    )
    .await
    .map(Some)
    .map_err(|_| SvsError::RequestTimeout(limits.request_timeout))
}

fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(H1_MAX_BUF)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_concurrent_streams(H2_MAX_STREAMS)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    b
}

/// Drives one connection: closes it gracefully (requests in flight finish)
/// when it has been idle for `idle_timeout`, reaches `max_connection_age`,
/// answered a refused client, or the daemon stops. hyper has no idle timer
/// for HTTP/2 and a keep-alive one for HTTP/1.1 only between requests
/// whose headers time out, so one timer here serves both.
///
/// A graceful close needs the client: HTTP/2 waits for the PING sent with
/// the first GOAWAY to be acknowledged, and both protocols for the answers
/// already made to be written. A client that grants no flow-control window,
/// does not read its socket or ignores the PING would keep the connection
/// (and its answers) forever; so once no request is in flight the close
/// has `close_timeout` to finish, after which the connection is dropped.
async fn drive<C>(
    conn: C,
    activity: &Activity,
    limits: &Limits,
    mut stop: watch::Receiver<bool>,
) -> Result<(), C::Error>
where
    C: GracefulConnection,
{
    let mut conn = std::pin::pin!(conn);
    let age_deadline = tokio::time::Instant::now() + limits.max_connection_age;
    let mut stopping = *stop.borrow();
    let why = loop {
        if stopping {
            break "shutdown";
        }
        let idle_at = tokio::time::Instant::from_std(activity.idle_deadline(limits.idle_timeout));
        tokio::select! {
            r = conn.as_mut() => return r,
            _ = activity.close.notified() => break "refused client",
            _ = tokio::time::sleep_until(age_deadline) => break "maximum age",
            _ = tokio::time::sleep_until(idle_at) => {
                if activity.quiet_for(None, limits.idle_timeout) {
                    break "idle";
                }
            }
            r = stop.changed() => stopping = r.is_err() || *stop.borrow(),
        }
    };
    tracing::debug!(reason = why, "closing connection");
    conn.as_mut().graceful_shutdown();
    let closing = Instant::now();
    // Requests in flight finish; none can take longer than its body and
    // handling deadlines, and its answer then has `close_timeout` to go out.
    let hard = tokio::time::Instant::from_std(
        closing + limits.body_timeout + limits.request_timeout + limits.close_timeout,
    );
    loop {
        let drained_at = tokio::time::Instant::from_std(
            activity.quiet_deadline(Some(closing), limits.close_timeout),
        );
        tokio::select! {
            r = conn.as_mut() => return r,
            _ = tokio::time::sleep_until(drained_at.min(hard)) => {
                if tokio::time::Instant::now() >= hard
                    || activity.quiet_for(Some(closing), limits.close_timeout)
                {
                    break;
                }
            }
        }
    }
    tracing::debug!(
        reason = why,
        "connection not closed by its client in time: dropped"
    );
    Ok(())
}

/// Accepts HTTPS connections on `listener` until `stop` turns true.
pub async fn serve_tls(
    app: Arc<App>,
    listener: TcpListener,
    tls: TlsSlot,
    gates: Gates,
    graceful: Arc<GracefulShutdown>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        // Backpressure: beyond the handshake cap, clients wait in the backlog.
        let handshake_permit = tokio::select! {
            p = gates.handshakes.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stop.changed() => return,
        };
        let (tcp, peer_addr) = tokio::select! {
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
        let contended =
            source_share::contended(gates.max_handshakes, gates.handshakes.available_permits());
        let Some(source_slot) = gates.handshakes_by_source.take(peer_addr.ip(), contended) else {
            handshake_failed(
                app.metrics(),
                API_LISTENER,
                HandshakeFailure::SourceBusy,
                peer_addr,
                None,
            );
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let current = tls.read().unwrap_or_else(|p| p.into_inner()).clone();
        let app = app.clone();
        let tls = tls.clone();
        let connections = gates.connections.clone();
        let waiting = gates.waiting.clone();
        let watcher = graceful.watcher();
        let stop = stop.clone();
        tokio::spawn(async move {
            // Counts this connection in the drain until the task ends.
            let _watcher = watcher;
            let limits = app.runtime().limits.clone();
            let handshake = limits.handshake_timeout;
            // Pinned out here, not dropped inside the timeout: a stalled
            // handshake's connection closes only after its failure is
            // counted, so a client that sees the close finds the count.
            let accept = current.acceptor.accept(tcp);
            tokio::pin!(accept);
            let stream = match tokio::time::timeout(handshake, &mut accept).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    handshake_failed(
                        app.metrics(),
                        API_LISTENER,
                        HandshakeFailure::Refused,
                        peer_addr,
                        Some(&e),
                    );
                    return;
                }
                Err(_) => {
                    handshake_failed(
                        app.metrics(),
                        API_LISTENER,
                        HandshakeFailure::Timeout,
                        peer_addr,
                        None,
                    );
                    return;
                }
            };
            // The handshake's work is done: its permit goes back before any
            // wait, so that clients waiting for a slot do not stop others'
            // handshakes.
            drop((handshake_permit, source_slot));
            let chain: Vec<CertificateDer<'static>> = stream
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                .unwrap_or_default();
            let now = SystemTime::now();
            let peer = Peer::accepted(chain, &current, now);
            // Who the client is under the current policy decides whose cap
            // the connection counts in: its entity's, or that of all the
            // certificates no entity claims (which only ever get 401), so
            // that neither one tenant nor any holder of a client-CA
            // certificate can take every slot.
            let rt = app.runtime();
            let entity = peer
                .current(&current, now)
                .and_then(|client| rt.policy.identify(client))
                .ok();
            let Some(_group_slot) = app.connection_slot(entity.as_deref(), &rt.limits) else {
                connection_over_cap(&app, entity.as_deref(), peer_addr);
                return;
            };
            drop((entity, rt));
            // A connection slot only for a client that completed the
            // handshake and is within its cap. The clients waiting for one
            // are bounded on their own.
            let no_slot = || {
                handshake_failed(
                    app.metrics(),
                    API_LISTENER,
                    HandshakeFailure::NoSlot,
                    peer_addr,
                    None,
                );
            };
            let _permit = match connections.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    let Ok(_waiting_turn) = waiting.try_acquire_owned() else {
                        no_slot();
                        return;
                    };
                    match tokio::time::timeout(handshake, connections.acquire_owned()).await {
                        Ok(Ok(p)) => p,
                        _ => {
                            no_slot();
                            return;
                        }
                    }
                }
            };
            let ctx = Arc::new(ConnCtx {
                app,
                tls: Some(tls),
                peer: Some(peer),
                probes_only: false,
                activity: Activity::new(),
            });
            let svc_ctx = ctx.clone();
            let svc = hyper::service::service_fn(move |req| handle(svc_ctx.clone(), req));
            // A connection that settled on http/1.1 speaks only that, not
            // HTTP/2 after its preface. One that settled on h2 (or on
            // nothing) is left to hyper's detection: served HTTP/2 only,
            // hyper would send its SETTINGS at once and wait for a silent
            // client until the idle timeout, not the header timeout.
            let b = match stream.get_ref().1.alpn_protocol() {
                Some(b"http/1.1") => builder(&limits).http1_only(),
                _ => builder(&limits),
            };
            let conn = b.serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = drive(conn, &ctx.activity, &limits, stop).await {
                tracing::debug!(peer = %peer_addr, error = %e, "connection ended with an error");
            }
        });
    }
}

/// Plain-HTTP listener for /healthz and /readyz only.
pub async fn serve_probes(app: Arc<App>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    let slots = SideSlots::new(PROBE_CONNECTIONS);
    loop {
        // A source past its share is not counted: this listener has no
        // certificates to tell clients apart.
        let (tcp, slot) = match slots.accept(&listener, "probe", &mut stop).await {
            SideAccept::Connection(tcp, _, slot) => (tcp, slot),
            SideAccept::SourceBusy(_) => continue,
            SideAccept::Stopped => return,
        };
        let stop = stop.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let limits = side_listener_limits(&app.runtime().limits);
            let ctx = Arc::new(ConnCtx {
                app,
                tls: None,
                peer: None,
                probes_only: true,
                activity: Activity::new(),
            });
            let svc_ctx = ctx.clone();
            let svc = hyper::service::service_fn(move |req| handle(svc_ctx.clone(), req));
            let b = builder(&limits);
            let conn = b.serve_connection(TokioIo::new(tcp), svc);
            let _ = drive(conn, &ctx.activity, &limits, stop).await;
        });
    }
}

/// Serves the probe listener while svsd waits to be provisioned (or for its
/// HSM): /healthz 200, /readyz 503 with `reason`, nothing else. There is no
/// App yet, so this is not [`serve_probes`]. Returns the listener when `stop`
/// fires so that the full start serves on the same socket: the port never
/// closes between the two phases, and a probe never sees "connection refused".
pub async fn serve_waiting_probes(
    listener: TcpListener,
    reason: watch::Receiver<SvsError>,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) -> TcpListener {
    let slots = SideSlots::new(PROBE_CONNECTIONS);
    loop {
        let (tcp, slot) = match slots.accept(&listener, "probe", &mut stop).await {
            SideAccept::Connection(tcp, _, slot) => (tcp, slot),
            SideAccept::SourceBusy(_) => continue,
            SideAccept::Stopped => return listener,
        };
        let (stop, reason, limits) = (stop.clone(), reason.clone(), side_listener_limits(&limits));
        tokio::spawn(async move {
            let _slot = slot;
            let activity = Arc::new(Activity::new());
            let act = activity.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let _active = act.begin();
                let head_only = req.method() == hyper::Method::HEAD;
                let reply = match Route::parse(req.method().as_str(), req.uri().path()) {
                    Ok(Route::Healthz) => Reply::ok(serde_json::json!({"status": "alive"})),
                    Ok(Route::Readyz) => Reply::from(reason.borrow().clone()),
                    Ok(_) => Reply::from(SvsError::NotFound),
                    Err(e) => Reply::from(e),
                };
                std::future::ready(Ok::<_, Infallible>(response(reply, head_only)))
            });
            let b = builder(&limits);
            let conn = b.serve_connection(TokioIo::new(tcp), svc);
            let _ = drive(conn, &activity, &limits, stop).await;
        });
    }
}

/// Connections the metrics listener serves at once (see [`SideSlots`]).
const METRICS_CONNECTIONS: usize = 16;

/// What the metrics listener serves: the running daemon's metrics, or
/// while svsd waits to start, [`Metrics::render_waiting`] of why it waits.
#[derive(Clone)]
pub enum MetricsPage {
    /// Started: everything, refreshed from the App at each scrape.
    Running(Arc<App>),
    /// Waiting to start; there is no App yet.
    Waiting {
        /// The registry the App will take over, so counters carry on.
        metrics: Arc<Metrics>,
        /// Why svsd waits.
        why: watch::Receiver<SvsError>,
        /// The configured limits (its connections are driven by them).
        limits: Limits,
    },
}

impl std::fmt::Debug for MetricsPage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MetricsPage::Running(_) => "MetricsPage::Running",
            MetricsPage::Waiting { .. } => "MetricsPage::Waiting",
        })
    }
}

impl MetricsPage {
    fn metrics(&self) -> &Metrics {
        match self {
            MetricsPage::Running(app) => app.metrics(),
            MetricsPage::Waiting { metrics, .. } => metrics,
        }
    }

    fn limits(&self) -> Limits {
        match self {
            MetricsPage::Running(app) => side_listener_limits(&app.runtime().limits),
            MetricsPage::Waiting { limits, .. } => side_listener_limits(limits),
        }
    }

    /// Blocking: CPU work proportional to the series count.
    fn render(&self) -> Vec<u8> {
        match self {
            MetricsPage::Running(app) => app.metrics().render(app),
            MetricsPage::Waiting { metrics, why, .. } => {
                let why = why.borrow().clone();
                metrics.render_waiting(&why)
            }
        }
    }
}

async fn metrics_request(
    page: MetricsPage,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, ctype, body) = match (req.method(), req.uri().path()) {
        (&hyper::Method::GET | &hyper::Method::HEAD, "/metrics") => {
            // Gathering and encoding runs on a blocking thread, never a
            // runtime worker.
            match tokio::task::spawn_blocking(move || page.render()).await {
                Ok(text) => (200, prometheus::TEXT_FORMAT, Bytes::from(text)),
                Err(_) => (500, "text/plain", Bytes::from_static(b"render failed\n")),
            }
        }
        // RFC 9110: a 405 lists the methods the resource takes.
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
    if status == 405 {
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    Ok(resp)
}

/// The metrics listener's TLS (none: plain HTTP). A reload puts the
/// certificate and client CA read from the same files again in here, for
/// the connections that follow.
pub type MetricsTls = Arc<RwLock<Option<TlsAcceptor>>>;

/// Serves `/metrics` (plain HTTP, or TLS when `tls` holds one) until `stop`,
/// then returns the listener: the full start serves on the socket the
/// waiting phase used, so a scraper never meets "connection refused"
/// between the two. Separate from the API listeners and their connection
/// cap: scrapers can neither take the API's connections nor be starved by
/// API clients. Its connections are driven like the API's (idle timeout,
/// maximum age, close timeout), so that silent clients cannot hold its few
/// slots.
pub async fn serve_metrics(
    page: MetricsPage,
    listener: TcpListener,
    tls: MetricsTls,
    mut stop: watch::Receiver<bool>,
) -> TcpListener {
    let slots = SideSlots::new(METRICS_CONNECTIONS);
    loop {
        let (tcp, peer, slot) = match slots.accept(&listener, "metrics", &mut stop).await {
            SideAccept::Connection(tcp, peer, slot) => (tcp, peer, slot),
            SideAccept::SourceBusy(peer) => {
                handshake_failed(
                    page.metrics(),
                    METRICS_LISTENER,
                    HandshakeFailure::SourceBusy,
                    peer,
                    None,
                );
                continue;
            }
            SideAccept::Stopped => return listener,
        };
        let page = page.clone();
        let tls = tls.read().unwrap_or_else(|p| p.into_inner()).clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let limits = page.limits();
            let activity = Arc::new(Activity::new());
            let (svc_page, act) = (page.clone(), activity.clone());
            let svc = hyper::service::service_fn(move |req| {
                let (page, act) = (svc_page.clone(), act.clone());
                async move {
                    let _active = act.begin();
                    metrics_request(page, req).await
                }
            });
            let b = builder(&limits);
            let result = match tls {
                None => {
                    let conn = b.serve_connection(TokioIo::new(tcp), svc);
                    drive(conn, &activity, &limits, stop).await
                }
                Some(acceptor) => {
                    let handshake = limits.handshake_timeout;
                    // As on the API listener: counted before the close.
                    let accept = acceptor.accept(tcp);
                    tokio::pin!(accept);
                    match tokio::time::timeout(handshake, &mut accept).await {
                        Ok(Ok(s)) => {
                            let conn = b.serve_connection(TokioIo::new(s), svc);
                            drive(conn, &activity, &limits, stop).await
                        }
                        Ok(Err(e)) => {
                            handshake_failed(
                                page.metrics(),
                                METRICS_LISTENER,
                                HandshakeFailure::Refused,
                                peer,
                                Some(&e),
                            );
                            return;
                        }
                        Err(_) => {
                            handshake_failed(
                                page.metrics(),
                                METRICS_LISTENER,
                                HandshakeFailure::Timeout,
                                peer,
                                None,
                            );
                            return;
                        }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::config::TlsFiles;
    use crate::tls::devpki::{DevCa, save_issued};

    fn generation(dir: &std::path::Path, ca: &DevCa, generation: u64) -> TlsGeneration {
        ca.save(dir).unwrap();
        let server = ca.server(&["localhost"]).unwrap();
        let (certificate, private_key) = save_issued(dir, "server", &server).unwrap();
        let files = TlsFiles {
            certificate,
            private_key,
            client_ca: dir.join("ca.pem"),
        };
        TlsGeneration::new(generation, crate::tls::api_tls(&files, &[]).unwrap())
    }

    #[test]
    fn a_connection_is_rechecked_against_the_current_client_ca_and_validity() {
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let ca1 = DevCa::generate("CA one").unwrap();
        let ca2 = DevCa::generate("CA two").unwrap();
        let gen0 = generation(d1.path(), &ca1, 0);
        let issued = ca1.client("app1").unwrap();
        let der = CertificateDer::from(issued.cert_der.clone());
        let now = SystemTime::now();
        let peer = Peer::accepted(vec![der], &gen0, now);
        assert!(peer.current(&gen0, now).is_ok());
        // Reloaded with the same CA: still accepted (and checked once).
        let gen1 = generation(d1.path(), &ca1, 1);
        assert!(peer.current(&gen1, now).is_ok());
        assert_eq!(
            Checked::unpack(peer.checked.load(Ordering::Relaxed)),
            Checked {
                generation: 1,
                issued_directly: true
            }
        );
        // Reloaded with another client CA: the old connection loses its
        // client, and is told why (not "matches no entity").
        let gen2 = generation(d2.path(), &ca2, 2);
        let refused = peer.current(&gen2, now).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "client certificate no longer issued by a CA of client_ca"
        );
        // Past the certificate's notAfter, even under the CA that issued it.
        let not_after = peer.identity.as_ref().unwrap().not_after;
        let expired = peer
            .current(&gen1, not_after + Duration::from_secs(1))
            .unwrap_err();
        assert_eq!(expired.to_string(), "client certificate expired");
        assert_eq!(Reply::from(expired).status, 401);
    }

    fn der(pem: &str) -> CertificateDer<'static> {
        use rustls_pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    /// An entity `bank-a` matched by subject within `issuer`.
    fn by_subject(issuer: &str) -> crate::policy::Policy {
        use crate::config::{ClientMatch, EntityConfig, EntityStatus, Operation};
        crate::policy::Policy::new(
            &[EntityConfig {
                name: "bank-a".into(),
                status: EntityStatus::Active,
                client: ClientMatch::Subject {
                    subject: "CN=bank-a,O=SVS development".parse().unwrap(),
                    issuer: issuer.parse().unwrap(),
                },
                keys: ["k".to_string()].into(),
                operations: [Operation::Sign].into(),
                rate: None,
                max_concurrent: None,
            }],
            None,
        )
    }

    #[test]
    fn a_subject_matches_only_a_leaf_the_named_client_ca_issued_directly() {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::generate("Client CA").unwrap();
        let tls = generation(dir.path(), &ca, 0);
        let policy = by_subject("CN=Client CA,O=SVS development");
        let now = SystemTime::now();
        let at = unix_time(now).unwrap();

        // The genuine client: its leaf alone, or with the CA certificate.
        let genuine = der(&ca.client("bank-a").unwrap().cert_pem);
        for chain in [vec![genuine.clone()], vec![genuine, der(&ca.cert_pem)]] {
            let peer = Peer::accepted(chain, &tls, now);
            let client = peer.current(&tls, now).unwrap();
            assert!(client.issued_directly);
            assert_eq!(policy.identify(client).unwrap().name(), "bank-a");
        }

        // Another tenant's CA certificate under the same root (here the
        // root itself issues it) mints a sub-CA carrying the client CA's
        // name, and a leaf with bank-a's subject under it.
        let rogue_ca = ca.sub_ca("Client CA").unwrap();
        let rogue = der(&rogue_ca.client("bank-a").unwrap().cert_pem);
        let rogue_chain = vec![rogue.clone(), der(&rogue_ca.cert_pem)];
        // webpki accepts the chain, and the names are bank-a's...
        tls.client_verifier
            .verify_client_cert(&rogue, &rogue_chain[1..], at)
            .unwrap();
        let id = ClientIdentity::from_der(&rogue).unwrap();
        assert_eq!(
            (
                id.subject.to_string().as_str(),
                id.issuer.to_string().as_str()
            ),
            (
                "CN=bank-a,O=SVS development",
                "CN=Client CA,O=SVS development"
            )
        );
        // ...but the leaf's signature is not the client CA's: no subject
        // match, and as nothing else matches, 401 unauthenticated.
        let peer = Peer::accepted(rogue_chain, &tls, now);
        let client = peer.current(&tls, now).unwrap();
        assert!(!client.issued_directly);
        let refused = policy.identify(client).unwrap_err();
        assert_eq!(refused, SvsError::Unauthenticated);
        let reply = Reply::from(refused);
        assert_eq!(reply.status, 401);
        assert_eq!(reply.body["error"]["code"], "unauthenticated");
        // The same after a reload: the binding is found again, not kept.
        let tls1 = generation(dir.path(), &ca, 1);
        let client = peer.current(&tls1, now).unwrap();
        assert!(!client.issued_directly);
        assert!(policy.identify(client).is_err());
    }

    /// A client certificate verifier that counts its verifications.
    #[derive(Debug)]
    struct Counting {
        inner: Arc<dyn ClientCertVerifier>,
        verifications: AtomicUsize,
    }

    impl ClientCertVerifier for Counting {
        fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
            self.inner.root_hint_subjects()
        }
        fn verify_client_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            now: UnixTime,
        ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
            self.verifications.fetch_add(1, Ordering::Relaxed);
            self.inner
                .verify_client_cert(end_entity, intermediates, now)
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls12_signature(message, cert, dss)
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls13_signature(message, cert, dss)
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.inner.supported_verify_schemes()
        }
    }

    /// Generation `n` of `ca`'s TLS, its verifications counted.
    fn counted(dir: &std::path::Path, ca: &DevCa, n: u64) -> (TlsGeneration, Arc<Counting>) {
        let g = generation(dir, ca, n);
        let counting = Arc::new(Counting {
            inner: g.client_verifier.clone(),
            verifications: AtomicUsize::new(0),
        });
        let g = TlsGeneration {
            client_verifier: counting.clone(),
            ..g
        };
        (g, counting)
    }

    #[test]
    fn the_binding_costs_a_signature_check_per_connection_and_reload_not_per_request() {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::generate("Client CA").unwrap();
        let now = SystemTime::now();
        let leaf = der(&ca.client("bank-a").unwrap().cert_pem);
        let with_ca = vec![leaf.clone(), der(&ca.cert_pem)];
        let count = |c: &Counting| c.verifications.load(Ordering::Relaxed);

        let (g0, c0) = counted(dir.path(), &ca, 0);
        // A leaf alone: the handshake's verification was the proof.
        let alone = Peer::accepted(vec![leaf], &g0, now);
        assert_eq!(count(&c0), 0);
        // A leaf sent with intermediates: one check without them.
        let chained = Peer::accepted(with_ca, &g0, now);
        assert_eq!(count(&c0), 1);
        for _ in 0..100 {
            assert!(alone.current(&g0, now).unwrap().issued_directly);
            assert!(chained.current(&g0, now).unwrap().issued_directly);
        }
        assert_eq!(count(&c0), 1);

        // After a reload: the chain, and (with intermediates) the leaf
        // alone, once each, on the first request.
        let (g1, c1) = counted(dir.path(), &ca, 1);
        for _ in 0..100 {
            assert!(alone.current(&g1, now).unwrap().issued_directly);
        }
        assert_eq!(count(&c1), 1);
        for _ in 0..100 {
            assert!(chained.current(&g1, now).unwrap().issued_directly);
        }
        assert_eq!(count(&c1), 3);
    }

    /// A connection whose client sent the HTTP/2 preface and SETTINGS and
    /// then reads nothing (so never acknowledges the PING of the graceful
    /// close), driven by [`drive`] over an in-memory pipe, and the limits
    /// it runs with: its graceful close can never finish.
    async fn deaf_h2_client(
        activity: &Activity,
        limits: &Limits,
        hold: impl std::future::Future<Output = ()>,
    ) -> Duration {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = tokio::io::duplex(1 << 16);
        client
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .unwrap();
        let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        });
        let b = builder(limits);
        let conn = b.serve_connection(TokioIo::new(server), svc);
        let (_stop_tx, stop) = watch::channel(false);
        let start = Instant::now();
        tokio::select! {
            r = drive(conn, activity, limits, stop) => r.unwrap(),
            () = hold => unreachable!(),
        }
        drop(client);
        start.elapsed()
    }

    #[test]
    fn every_request_is_counted_once_answered_or_abandoned() {
        let m = crate::metrics::Metrics::new();
        let count = |m| HttpCount {
            metrics: m,
            operation: "sign",
            start: Instant::now(),
            status: crate::metrics::CLIENT_CLOSED_STATUS,
        };
        // Answered.
        count(&m).answered(200);
        // Dropped before an answer, as hyper drops a handler whose stream
        // the client reset.
        drop(count(&m));
        assert_eq!(m.http_requests("sign", "200"), 1);
        assert_eq!(m.http_requests("sign", "499"), 1);
    }

    #[test]
    fn a_body_cut_short_is_the_client_leaving_one_that_breaks_framing_is_malformed() {
        use std::io::{Error, ErrorKind};
        /// hyper's error around a cause, as its body errors come.
        #[derive(Debug)]
        struct Wrapped(Box<dyn std::error::Error + Send + Sync>);
        impl std::fmt::Display for Wrapped {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("error reading a body from connection")
            }
        }
        impl std::error::Error for Wrapped {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&*self.0)
            }
        }
        let gone = |e: Box<dyn std::error::Error + Send + Sync>| client_went_away(&Wrapped(e));
        for kind in [
            ErrorKind::UnexpectedEof,
            ErrorKind::ConnectionReset,
            ErrorKind::BrokenPipe,
        ] {
            assert!(gone(Box::new(Error::from(kind))), "{kind:?}");
        }
        assert!(gone(Box::new(h2::Error::from(h2::Reason::CANCEL))));
        assert!(gone("connection error".into()));
        // hyper's HTTP/1.1 chunk decoder reports bad framing as these.
        for kind in [ErrorKind::InvalidData, ErrorKind::InvalidInput] {
            assert!(
                !gone(Box::new(Error::new(kind, "invalid chunk size"))),
                "{kind:?}"
            );
        }
    }

    fn short_limits() -> Limits {
        Limits {
            idle_timeout: Duration::from_millis(100),
            close_timeout: Duration::from_millis(200),
            body_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            ..Limits::default()
        }
    }

    #[tokio::test]
    async fn a_close_the_client_does_not_complete_is_cut_after_close_timeout() {
        let limits = short_limits();
        let activity = Activity::new();
        let took = deaf_h2_client(&activity, &limits, std::future::pending()).await;
        // Idle, then close_timeout; not the 10 s that a request in flight
        // could take.
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
    }

    #[tokio::test]
    async fn a_request_in_flight_holds_a_closing_connection_until_it_ends() {
        let limits = short_limits();
        let activity = Activity::new();
        let request = activity.begin();
        // A refused client (once the connection is under way): closed at
        // once, but its request runs 600 ms in all.
        let hold = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            activity.close.notify_one();
            tokio::time::sleep(Duration::from_millis(550)).await;
            drop(request);
            std::future::pending::<()>().await;
        };
        let took = deaf_h2_client(&activity, &limits, hold).await;
        // Its answer then has close_timeout to go out.
        assert!(took >= Duration::from_millis(800), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
    }

    #[test]
    fn refused_clients_lose_their_connection() {
        let r = |e: SvsError| closes_connection(&Reply::from(e));
        assert!(r(SvsError::Unauthenticated));
        assert!(r(SvsError::EntitySuspended("a".into())));
        assert!(!r(SvsError::KeyNotAllowed("k".into())));
        assert!(!r(SvsError::TooManyConcurrent));
    }
}
