//! The public listener (WebSocket upgrades, health) and the admin listener (metrics, health).
//!
//! **Invariant:** a device is authenticated, and its Origin checked, before any `101`: refused
//! upgrades get a plain HTTP status (400, 401, 403, 503) and never reach a session.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
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
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access::Verdict;
use crate::audit::Event;
use crate::auth::{self, FailureLimits, TokenSource, Verifier};
use crate::config::Config;
use crate::protocol;
use crate::session::{SessionContext, driver};

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
    /// WebSocket buffer sizes and message limit.
    pub ws_config: WebSocketConfig,
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
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let permit = match role {
            Side::Admin => None,
            Side::Public => match app.connections.clone().try_acquire_owned() {
                Ok(p) => Some(Arc::new(p)),
                Err(_) => {
                    metrics::counter!("relay_handshakes_total", "outcome" => "over_capacity")
                        .increment(1);
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

async fn serve_conn<IO>(
    io: IO,
    peer: SocketAddr,
    app: Arc<App>,
    permit: Option<Arc<OwnedSemaphorePermit>>,
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
        .header_read_timeout(app.config.limits.handshake_timeout.0)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = app.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
        }
    }
}

fn health(req: &Request<Incoming>, app: &App) -> Option<Response<Body>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => Some(text(StatusCode::OK, "ok\n")),
        (&Method::GET, "/readyz") => Some(if app.draining.is_cancelled() {
            text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
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
        return crate::admin::handle(req, peer, app).await;
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
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

/// The client's address: the TCP peer, or the header a trusted proxy sets.
fn client_ip(req: &Request<Incoming>, peer: SocketAddr, app: &App) -> std::net::IpAddr {
    app.config
        .access
        .client_ip_header
        .as_deref()
        .and_then(|name| req.headers().get(name))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(peer.ip())
}

async fn public(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    app: Arc<App>,
    permit: Option<Arc<OwnedSemaphorePermit>>,
) -> Response<Body> {
    if let Some(r) = health(&req, &app) {
        return r;
    }
    if req.uri().path() != WS_PATH {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    let outcome =
        |o: &'static str| metrics::counter!("relay_handshakes_total", "outcome" => o).increment(1);
    let h = req.headers();
    let header_has = |name: header::HeaderName, token: &str| {
        h.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case(token)))
        })
    };
    let key = h.get(header::SEC_WEBSOCKET_KEY).cloned();
    if req.method() != Method::GET
        || !header_has(header::UPGRADE, "websocket")
        || !header_has(header::CONNECTION, "upgrade")
        || key.is_none()
    {
        outcome("bad_request");
        return json_error(StatusCode::BAD_REQUEST, "websocket_upgrade_required");
    }
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
        return r;
    }
    if let Some(origin) = h.get(header::ORIGIN)
        && !origin.to_str().is_ok_and(|o| app.config.origin_allowed(o))
    {
        outcome("forbidden_origin");
        tracing::info!(peer = %peer.ip(), "upgrade refused: origin not allowed");
        return json_error(StatusCode::FORBIDDEN, "origin_not_allowed");
    }
    let ip = client_ip(&req, peer, &app);
    let token = auth::token_from_headers(h);
    let (claimed_user, claimed_device) = token.map(|(t, _)| auth::claimed(t)).unwrap_or_default();
    let audit = &app.sessions.access.audit;
    let failed = |code: &str| Event {
        ip: Some(ip.to_string()),
        user: claimed_user.clone(),
        device: claimed_device.clone(),
        reason: Some(code.into()),
        ..Event::new("auth_failed")
    };
    if let Some(t) = app.failures.check(ip, claimed_user.as_deref()) {
        outcome("throttled");
        metrics::counter!("relay_auth_throttled_total", "scope" => t.scope.name()).increment(1);
        if t.first {
            tracing::warn!(peer = %ip, scope = t.scope.name(), "too many failed logins: refusing upgrades");
            audit.record(Event {
                event: "auth_throttled".into(),
                reason: Some(t.scope.name().into()),
                ..failed("")
            });
        }
        let mut r = json_error(StatusCode::TOO_MANY_REQUESTS, "too_many_failed_logins");
        if let Ok(v) = HeaderValue::from_str(&t.retry_after_s.to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return r;
    }
    let identity = match token.and_then(|(t, src)| Ok((app.verifier.verify(t)?, src))) {
        Ok(ok) => ok,
        Err(e) => {
            outcome(e.code());
            app.failures.failed(ip, claimed_user.as_deref());
            audit.record(failed(e.code()));
            tracing::info!(peer = %ip, reason = e.code(), "authentication failed");
            let mut r = json_error(StatusCode::UNAUTHORIZED, e.code());
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"relay\", error=\"invalid_token\""),
            );
            return r;
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
    let verdict = match app
        .sessions
        .access
        .check(&identity.device, identity.issued_at)
        .await
    {
        Ok(v) => v,
        Err(e) => {
            outcome("store_unavailable");
            tracing::warn!(error = %e, "access check failed");
            return json_error(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable");
        }
    };
    let revocation = match verdict {
        Verdict::Allowed => None,
        Verdict::Locked => {
            outcome("account_locked");
            audit.record(failed("account_locked"));
            return json_error(StatusCode::FORBIDDEN, "account_locked");
        }
        Verdict::LoggedOut {
            confirmed: true, ..
        } => {
            outcome("revoked");
            app.failures.failed(ip, claimed_user.as_deref());
            audit.record(failed("revoked"));
            return json_error(StatusCode::UNAUTHORIZED, "revoked");
        }
        // Not confirmed yet: upgrade only to deliver the `logout` frame.
        Verdict::LoggedOut { revocation, .. } => Some(revocation),
    };
    let Some(key) = key else {
        return json_error(StatusCode::BAD_REQUEST, "websocket_upgrade_required");
    };

    let upgrade = hyper::upgrade::on(&mut req);
    let app2 = app.clone();
    app.tracker.spawn(async move {
        let Ok(upgraded) = upgrade.await else {
            outcome("upgrade_failed");
            return;
        };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(app2.ws_config)).await;
        let device = identity.device.clone();
        if let Some(revocation) = revocation {
            outcome("logged_out");
            tracing::info!(user = %device.user, device = %device.device, peer = %ip, "revoked credentials: sending logout");
            driver::logged_out(ws, app2.sessions.clone(), identity, revocation).await;
            drop(permit);
            return;
        }
        outcome("ok");
        let audit = &app2.sessions.access.audit;
        audit.record(Event { ip: Some(ip.to_string()), ..Event::new("connect").device(&device) });
        tracing::info!(user = %device.user, device = %device.device, peer = %ip, "session started");
        metrics::gauge!("relay_connections").increment(1.0);
        let ended = driver::run(ws, app2.sessions.clone(), identity, app2.shutdown.clone()).await;
        metrics::gauge!("relay_connections").decrement(1.0);
        let kind = if ended.code == Some(protocol::close::SESSION_EXPIRED) { "idle_logoff" } else { "disconnect" };
        audit.record(Event { ip: Some(ip.to_string()), ..Event::new(kind).device(&device).reason(ended.reason) });
        tracing::info!(user = %device.user, device = %device.device, code = ended.code, reason = ended.reason, "session ended");
        drop(permit);
    });

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

/// Builds the TLS acceptor for the public listener: TLS 1.2+, ALPN `http/1.1` only.
pub fn tls_acceptor(
    cert_file: &std::path::Path,
    key_file: &std::path::Path,
) -> Result<TlsAcceptor, String> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", cert_file.display()))?;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("{}: {e}", key_file.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
