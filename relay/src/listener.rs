//! The public listener (WebSocket upgrades, health) and the admin listener (metrics, health).
//!
//! **Invariant:** a device is authenticated, and its Origin checked, before any `101`: refused
//! upgrades get a plain HTTP status (400, 401, 403, 503) and never reach a session.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access::{Checked, Revocation, Verdict};
use crate::audit::{Event, EventKind};
use crate::auth::{self, FailureLimits, Identity, TokenSource, Verifier};
use crate::config::Config;
use crate::protocol;
use crate::session::SessionContext;
use crate::session::driver::{self, Admission};
use crate::session::socket::Socket;

/// Pause after a failed accept (out of file descriptors and similar) instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// How long an admin connection has to finish its request once the relay stops.
const ADMIN_GRACEFUL_CLOSE: Duration = Duration::from_secs(1);

/// Largest request head read (request line and headers), bytes.
const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// Path of the WebSocket endpoint.
pub const WS_PATH: &str = "/v1/ws";

/// Everything the listeners need.
pub struct App {
    /// Configuration.
    pub config: Config,
    /// Token verification.
    pub verifier: Verifier,
    /// Shared session context.
    pub sessions: Arc<SessionContext>,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// Caps open connections.
    pub connections: Arc<Semaphore>,
    /// Caps open connections per client address.
    pub sources: SourceCounts,
    /// Largest WebSocket message a device may send.
    pub max_message_bytes: usize,
    /// Cancelled when the relay starts draining: no new devices.
    pub draining: CancellationToken,
    /// Cancelled when the remaining sessions must close.
    pub shutdown: CancellationToken,
    /// Tracks every connection task, for the drain.
    pub tracker: TaskTracker,
    /// Failed-login limits.
    pub failures: FailureLimits,
    /// This node's id (audit records).
    pub node_id: u8,
    /// The admin API (`/v1/…` on the admin listener).
    pub admin: crate::admin::Admin,
}

type Body = Full<Bytes>;

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r
}

pub(crate) fn json_error(status: StatusCode, code: &str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(format!(r#"{{"error":"{code}"}}"#))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Open connections per client address (an IPv6 /64 counts as one), each at most `max`: one
/// address cannot take every slot of the listener.
pub struct SourceCounts {
    max: usize,
    open: Arc<DashMap<IpAddr, usize>>,
}

/// One counted connection; dropping it frees the slot.
pub struct SourceSlot {
    open: Arc<DashMap<IpAddr, usize>>,
    key: IpAddr,
}

impl SourceCounts {
    /// At most `max` connections per address.
    pub fn new(max: usize) -> Self {
        SourceCounts {
            max,
            open: Arc::default(),
        }
    }

    /// A slot for a connection from `ip`, unless the address holds `max` already.
    pub fn acquire(&self, ip: IpAddr) -> Option<SourceSlot> {
        let key = auth::source_key(ip);
        let mut n = self.open.entry(key).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            open: self.open.clone(),
            key,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        self.open.remove_if_mut(&self.key, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }
}

/// What a public connection holds while it is open: its slot of the listener and, unless it
/// comes through a trusted proxy, its slot of its source address.
struct Slot {
    _listener: OwnedSemaphorePermit,
    _source: Option<SourceSlot>,
}

/// Which listener a connection arrived on.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Devices.
    Public,
    /// Operators and Prometheus.
    Admin,
}

/// Accepts connections until shutdown.
pub async fn serve(listener: TcpListener, app: Arc<App>, tls: Option<TlsAcceptor>, role: Side) {
    // The public side stops first; the admin side keeps answering metrics and health.
    let stop = match role {
        Side::Public => app.draining.clone(),
        Side::Admin => app.shutdown.clone(),
    };
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and similar: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let permit = match role {
            Side::Admin => None,
            Side::Public => match admit(&app, peer.ip()) {
                Ok(slot) => Some(Arc::new(slot)),
                Err(outcome) => {
                    metrics::counter!("relay_handshakes_total", "outcome" => outcome).increment(1);
                    continue; // dropping the socket refuses it
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let app2 = app.clone();
        let tls = tls.clone();
        app.tracker.spawn(async move {
            match tls {
                Some(acceptor) => {
                    let limit = app2.config.limits.handshake_timeout.0;
                    match tokio::time::timeout(limit, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => serve_conn(stream, peer, app2, permit, role).await,
                        _ => metrics::counter!("relay_handshakes_total", "outcome" => "tls_failed")
                            .increment(1),
                    }
                }
                None => serve_conn(tcp, peer, app2, permit, role).await,
            }
        });
    }
}

/// A slot for a new public connection from `peer`, or the outcome that refuses it. Behind a
/// trusted proxy every client shares the proxy's address: those connections are counted per
/// client at the upgrade instead.
fn admit(app: &App, peer: IpAddr) -> Result<Slot, &'static str> {
    let listener = app
        .connections
        .clone()
        .try_acquire_owned()
        .map_err(|_| "over_capacity")?;
    let source = if app.trusted_proxy(peer) {
        None
    } else {
        Some(app.sources.acquire(peer).ok_or("source_over_capacity")?)
    };
    Ok(Slot {
        _listener: listener,
        _source: source,
    })
}

impl App {
    fn trusted_proxy(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.config
            .access
            .trusted_proxies
            .iter()
            .any(|net| net.contains(&ip))
    }

    /// The client's address: the TCP peer, or, on a connection from a trusted proxy, the
    /// right-most address in `client_ip_header` that is not itself a trusted proxy (each
    /// proxy appends the address it heard from; everything left of that is the client's say).
    fn client_ip(&self, req: &Request<Incoming>, peer: SocketAddr) -> IpAddr {
        let peer = peer.ip().to_canonical();
        let Some(name) = self.config.access.client_ip_header.as_deref() else {
            return peer;
        };
        if !self.trusted_proxy(peer) {
            return peer;
        }
        let hops: Vec<&str> = req
            .headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        let mut client = peer;
        for hop in hops.iter().rev() {
            let Ok(ip) = hop.parse::<IpAddr>() else {
                break; // not an address: nothing further left can be believed
            };
            client = ip.to_canonical();
            if !self.trusted_proxy(client) {
                break;
            }
        }
        client
    }
}

async fn serve_conn<IO>(
    io: IO,
    peer: SocketAddr,
    app: Arc<App>,
    permit: Option<Arc<Slot>>,
    role: Side,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let app = app.clone();
        service_fn(move |req| {
            let app = app.clone();
            let permit = permit.clone();
            async move {
                Ok::<_, Infallible>(match role {
                    Side::Public => public(req, peer, app, permit).await,
                    Side::Admin => admin(req, peer, &app).await,
                })
            }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        // An upgrade request is a few hundred bytes of headers and a token; a larger head is
        // refused (431) instead of buffered, so a pending handshake holds at most this much.
        .max_buf_size(MAX_REQUEST_HEAD)
        .header_read_timeout(app.config.limits.handshake_timeout.0)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    // A public connection must upgrade within the handshake timeout, 101 written included:
    // keep-alive requests do not extend it, and a client that stops reading cannot hold an
    // accepted upgrade open. (The future ends when the connection is handed to the session.)
    let limit = match role {
        Side::Public => app.config.limits.handshake_timeout.0,
        Side::Admin => Duration::MAX,
    };
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = tokio::time::sleep(limit), if role == Side::Public => {
            metrics::counter!("relay_handshakes_total", "outcome" => "timeout").increment(1);
        }
        _ = app.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(ADMIN_GRACEFUL_CLOSE, conn).await;
        }
    }
}

fn health(req: &Request<Incoming>, app: &App) -> Option<Response<Body>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => Some(text(StatusCode::OK, "ok\n")),
        (&Method::GET, "/readyz") => Some(if app.draining.is_cancelled() {
            text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
        } else if app.sessions.store.disk_full() {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "store unavailable: disk full\n",
            )
        } else if !app.sessions.store.ready() {
            text(StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n")
        } else if app
            .sessions
            .cluster
            .as_ref()
            .is_some_and(|c| !c.bus_connected())
        {
            // Still serving: messages are stored and reach other nodes' devices by inbox
            // checks. Failing readiness here would take every node out at once.
            text(StatusCode::OK, "degraded: bus unreachable\n")
        } else {
            text(StatusCode::OK, "ready\n")
        }),
        _ => None,
    }
}

async fn admin(req: Request<Incoming>, peer: SocketAddr, app: &App) -> Response<Body> {
    if let Some(r) = health(&req, app) {
        return r;
    }
    if req.uri().path().starts_with("/v1/") {
        return crate::admin::handle(req, peer, &app.admin).await;
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            crate::metrics::sample_process();
            let mut r = Response::new(Full::new(Bytes::from(app.metrics.render())));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

async fn public(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    app: Arc<App>,
    permit: Option<Arc<Slot>>,
) -> Response<Body> {
    if let Some(r) = health(&req, &app) {
        return r;
    }
    if req.uri().path() != WS_PATH {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    let key = match upgrade_key(&req, &app, peer) {
        Ok(key) => key,
        Err(refused) => return refused,
    };
    let h = req.headers();
    let ip = app.client_ip(&req, peer);
    let token = auth::token_from_headers(h);
    let claimed = token.map(|(t, _)| auth::claimed(t)).unwrap_or_default();
    let identity = match token.and_then(|(t, src)| Ok((app.verifier.verify(t)?, src))) {
        Ok(ok) => ok,
        Err(e) => {
            tracing::info!(peer = %ip, reason = e.code(), "authentication failed");
            return failed_login(&app, ip, claimed, e.code(), false).await;
        }
    };
    let (identity, source) = identity;
    let offers = auth::offers_subprotocol(h);
    if source == TokenSource::Subprotocol && !offers {
        outcome("bad_request");
        return json_error(StatusCode::BAD_REQUEST, "offer_subprotocol_relay.v1");
    }
    if app.draining.is_cancelled() {
        outcome("draining");
        return json_error(StatusCode::SERVICE_UNAVAILABLE, "draining");
    }
    // Behind a trusted proxy, the per-address cap applies to the client it names.
    let client_slot = if app.trusted_proxy(peer.ip()) {
        match app.sources.acquire(ip) {
            Some(slot) => Some(slot),
            None => {
                outcome("source_over_capacity");
                return json_error(StatusCode::TOO_MANY_REQUESTS, "too_many_connections");
            }
        }
    } else {
        None
    };
    let (revocation, checked) = match check_access(&app, &identity, ip).await {
        Ok(admitted) => admitted,
        Err(refused) => return refused,
    };
    let upgrade = hyper::upgrade::on(&mut req);
    // Everything the session logs names its device and node.
    let span = tracing::info_span!("session", user = %identity.device.user, device = %identity.device.device, node = app.node_id);
    let admitted = Admitted {
        admission: Admission {
            identity,
            opening: checked.opening,
            seen_lately: checked.seen_lately,
        },
        revocation,
        user_org: checked.org.map(String::into_boxed_str),
        ip,
        held: (permit, client_slot),
    };
    app.tracker.spawn(tracing::Instrument::instrument(
        session(app.clone(), upgrade, admitted),
        span,
    ));
    switching_protocols(&key, offers)
}

/// Counts a handshake's outcome.
fn outcome(o: &'static str) {
    metrics::counter!("relay_handshakes_total", "outcome" => o).increment(1);
}

/// Checks that the request is a WebSocket upgrade this relay accepts (version 13, an allowed
/// browser origin); its `Sec-WebSocket-Key`, or the refusal.
#[allow(clippy::result_large_err)] // the refusal is the response itself
fn upgrade_key(
    req: &Request<Incoming>,
    app: &App,
    peer: SocketAddr,
) -> Result<HeaderValue, Response<Body>> {
    let h = req.headers();
    let header_has = |name: header::HeaderName, token: &str| {
        h.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case(token)))
        })
    };
    let key = h.get(header::SEC_WEBSOCKET_KEY).cloned();
    let Some(key) = key.filter(|_| {
        req.method() == Method::GET
            && header_has(header::UPGRADE, "websocket")
            && header_has(header::CONNECTION, "upgrade")
    }) else {
        outcome("bad_request");
        return Err(json_error(
            StatusCode::BAD_REQUEST,
            "websocket_upgrade_required",
        ));
    };
    if h.get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        outcome("bad_request");
        let mut r = json_error(
            StatusCode::UPGRADE_REQUIRED,
            "unsupported_websocket_version",
        );
        r.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return Err(r);
    }
    if let Some(origin) = h.get(header::ORIGIN)
        && !origin.to_str().is_ok_and(|o| app.config.origin_allowed(o))
    {
        outcome("forbidden_origin");
        tracing::info!(peer = %peer.ip(), "upgrade refused: origin not allowed");
        return Err(json_error(StatusCode::FORBIDDEN, "origin_not_allowed"));
    }
    Ok(key)
}

/// A device past authentication and the access check, on its way to a session.
struct Admitted {
    admission: Admission,
    /// Revoked credentials whose device has not confirmed its wipe: a session that only sends
    /// `logout`. Boxed: rare, and every session's task would hold its room.
    revocation: Option<Box<Revocation>>,
    /// The user's organisation now (for a token that names none); boxed, as every open
    /// connection's task holds it.
    user_org: Option<Box<str>>,
    ip: IpAddr,
    /// The connection's slots, given back when the session ends.
    held: (Option<Arc<Slot>>, Option<SourceSlot>),
}

impl Admitted {
    /// The organisation a session counts for: the one its token names, or (a token without
    /// one) the user's current one. Asked again at the end rather than kept: a local would be
    /// held across the session, in every connection's memory.
    fn org(&self) -> Option<String> {
        let org = self.admission.identity.org.as_deref();
        org.or(self.user_org.as_deref()).map(str::to_string)
    }
}

/// The stored access state's verdict on a genuine token: admitted (with the revocation to
/// deliver, if any, and what the check read), or the refusal.
async fn check_access(
    app: &App,
    identity: &Identity,
    ip: IpAddr,
) -> Result<(Option<Box<Revocation>>, Checked), Response<Body>> {
    let audit = &app.sessions.access.audit;
    let checked = match app
        .sessions
        .access
        .check(
            &identity.device,
            identity.issued_at,
            identity.org.as_deref(),
        )
        .await
    {
        Ok(c) => c,
        Err(e) => {
            outcome("store_unavailable");
            tracing::warn!(error = %e, "access check failed");
            return Err(json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
            ));
        }
    };
    let revocation = match &checked.verdict {
        Verdict::Allowed => None,
        Verdict::Locked => {
            outcome("account_locked");
            audit.record(Event {
                ip: Some(ip.to_string()),
                reason: Some("account_locked".into()),
                org: checked.org.clone(),
                org_known: true,
                ..Event::new(EventKind::AuthFailed).device(&identity.device)
            });
            return Err(json_error(StatusCode::FORBIDDEN, "account_locked"));
        }
        Verdict::LoggedOut {
            confirmed: true, ..
        } => {
            let claimed = (
                Some(identity.device.user.to_string()),
                Some(identity.device.device.to_string()),
            );
            return Err(failed_login(app, ip, claimed, "revoked", true).await);
        }
        // Not confirmed yet: upgrade only to deliver the `logout` frame.
        Verdict::LoggedOut { revocation, .. } => Some(Box::new(revocation.clone())),
    };
    Ok((revocation, checked))
}

/// Once the `101` is out: the session, recorded in the audit trail from connect to its end.
///
/// Its future is what each open connection holds (its task): an `async` block, not an
/// `async fn`, and fields used in place, since an `async fn` keeps its arguments twice (as
/// captured and as locals) and destructuring copies them again.
#[allow(clippy::manual_async_fn)] // deliberately not an `async fn`: see above
fn session(
    app: Arc<App>,
    upgrade: hyper::upgrade::OnUpgrade,
    admitted: Admitted,
) -> impl Future<Output = ()> {
    async move {
        // Named so that the block captures it: an async block captures only the fields it
        // uses, and the connection's slots would go back the moment the session was spawned.
        let _slots = &admitted.held;
        let Ok(upgraded) = upgrade.await else {
            outcome("upgrade_failed");
            return;
        };
        let mut ws = Socket::new(TokioIo::new(upgraded), app.max_message_bytes);
        let identity = &admitted.admission.identity;
        let (device, ip) = (&identity.device, &admitted.ip);
        if let Some(revocation) = &admitted.revocation {
            outcome("logged_out");
            tracing::info!(user = %device.user, device = %device.device, peer = %ip, "revoked credentials: sending logout");
            driver::logged_out(&mut ws, &app.sessions, identity, revocation).await;
            return;
        }
        outcome("ok");
        let audit = &app.sessions.access.audit;
        audit.record(Event {
            ip: Some(ip.to_string()),
            org: admitted.org(),
            org_known: true,
            ..Event::new(EventKind::Connect).device(device)
        });
        tracing::info!(user = %device.user, device = %device.device, peer = %ip, "session started");
        let _gauge = ConnectionGauge::up();
        let ended = driver::run(&mut ws, &app.sessions, &admitted.admission).await;
        let kind = if ended.code == Some(protocol::close::SESSION_EXPIRED) {
            EventKind::IdleLogoff
        } else {
            EventKind::Disconnect
        };
        audit.record(Event {
            ip: Some(ip.to_string()),
            org: admitted.org(),
            org_known: true,
            ..Event::new(kind).device(device).reason(ended.reason)
        });
        tracing::info!(user = %device.user, device = %device.device, code = ended.code, reason = ended.reason, "session ended");
    }
}

/// The `101 Switching Protocols` answer (`relay.v1` when the client offered it).
fn switching_protocols(key: &HeaderValue, offers: bool) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let hm = r.headers_mut();
    hm.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    hm.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        hm.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if offers {
        hm.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(protocol::SUBPROTOCOL),
        );
    }
    r
}

/// Counts a failed login and answers it: `401` with `code`, or `429` once the source or the
/// claimed account is over its failure limit. Audited per claimed account (each failure, then
/// one `auth_throttled` per window) when the token was genuine or names a user the relay knows;
/// a forged token naming nobody is audited with the anonymous failures, its claim kept aside,
/// so made-up names cannot create audit chains at will.
async fn failed_login(
    app: &App,
    ip: IpAddr,
    (user, device): (Option<String>, Option<String>),
    code: &'static str,
    verified: bool,
) -> Response<Body> {
    let throttled = app.failures.failed(ip, user.as_deref());
    let known = match &user {
        Some(u) if !verified && throttled.as_ref().is_none_or(|t| t.first) => app
            .sessions
            .store
            .devices(u.clone())
            .await
            .is_ok_and(|d| !d.is_empty()),
        _ => verified,
    };
    let (user, device, claimed) = match known {
        true => (user, device, None),
        false => (None, None, user.map(|u| (u, device))),
    };
    let event = |kind: EventKind, reason: &str| Event {
        ip: Some(ip.to_string()),
        user: user.clone(),
        device: device.clone(),
        claimed_user: claimed.as_ref().map(|c| c.0.clone()),
        claimed_device: claimed.as_ref().and_then(|c| c.1.clone()),
        reason: Some(reason.into()),
        ..Event::new(kind)
    };
    let audit = &app.sessions.access.audit;
    if let Some(t) = throttled {
        metrics::counter!("relay_handshakes_total", "outcome" => "throttled").increment(1);
        metrics::counter!("relay_auth_throttled_total", "scope" => t.scope.name()).increment(1);
        if t.first {
            tracing::warn!(peer = %ip, scope = t.scope.name(), "too many failed logins: answering 429");
            audit.record(event(EventKind::AuthThrottled, t.scope.name()));
        }
        let mut r = json_error(StatusCode::TOO_MANY_REQUESTS, "too_many_failed_logins");
        if let Ok(v) = HeaderValue::from_str(&t.retry_after_s.to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return r;
    }
    metrics::counter!("relay_handshakes_total", "outcome" => code).increment(1);
    audit.record(event(EventKind::AuthFailed, code));
    let mut r = json_error(StatusCode::UNAUTHORIZED, code);
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"relay\", error=\"invalid_token\""),
    );
    r
}

/// `relay_connections` up while it lives: a session that ends any way, a panic included,
/// takes itself off the gauge.
struct ConnectionGauge;

impl ConnectionGauge {
    fn up() -> Self {
        metrics::gauge!("relay_connections").increment(1.0);
        ConnectionGauge
    }
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        metrics::gauge!("relay_connections").decrement(1.0);
    }
}

/// Why the public listener's TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file that is unreadable or not PEM.
    #[error("{path}: {source}")]
    Pem {
        /// The file.
        path: std::path::PathBuf,
        /// What went wrong.
        source: rustls_pki_types::pem::Error,
    },
    /// A certificate and key rustls refuses.
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
}

/// Builds the TLS acceptor for the public listener: TLS 1.2+, ALPN `http/1.1` only.
pub fn tls_acceptor(
    cert_file: &std::path::Path,
    key_file: &std::path::Path,
) -> Result<TlsAcceptor, TlsError> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let pem = |path: &std::path::Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Pem { path, source }
    };
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(pem(cert_file))?;
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(pem(key_file))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future a function returns, without calling it.
    fn output_size<A, B, C, F: Future>(_: &impl FnOnce(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every connection holds its session's task for as long as it is open, idle or not: the
    /// task's future is most of what an idle connection costs (BENCHMARKS.md, "Idle
    /// connections"). It was 3,952 bytes (in test and release builds alike) while nested
    /// futures kept their arguments twice and the rare, large awaits sized the idle one.
    ///
    /// The bound is jemalloc's 1,792-byte size class: Tokio puts the future in a cell with
    /// 80 bytes of header and trailer, 16 of scheduler and task id, and aligns it to 128;
    /// the span and the tracker add 48 and the stage's tag 8. At 2,144 bytes the cell was
    /// 2,304, allocated as 2,560.
    #[test]
    fn a_session_task_holds_no_copies_of_its_arguments() {
        let size = output_size(&session);
        assert!(
            size + 48 + 8 + 16 + 80 <= 1_792,
            "the session future is {size} bytes"
        );
    }
}
