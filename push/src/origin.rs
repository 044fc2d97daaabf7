//! A small set of HTTP/2 connections over TLS to one provider host.
//!
//! Requests are spread round-robin over `connections` multiplexed connections. Each connection
//! honours the server's `SETTINGS_MAX_CONCURRENT_STREAMS`: streams above the limit wait in h2's
//! queue instead of being refused, so a burst never turns into `REFUSED_STREAM` errors. A broken
//! connection is replaced on the next request that lands on its slot.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http2::{self, SendRequest};
use hyper::{HeaderMap, Request, Response, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::sync::Mutex;
use tokio_rustls::TlsConnector;

use crate::ConfigError;

/// Largest provider response body read (APNs and FCM answer with small JSON).
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Where a request failed before a provider answered it.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// TCP connect, TLS or HTTP/2 handshake failed.
    #[error("connect: {0}")]
    Connect(String),
    /// The request or its response failed mid-way.
    #[error("request: {0}")]
    Request(String),
    /// No answer within the request timeout.
    #[error("timed out")]
    Timeout,
}

impl TransportError {
    /// A bounded label for logs and metrics.
    pub fn class(&self) -> &'static str {
        match self {
            TransportError::Connect(_) => "connect_error",
            TransportError::Request(_) => "request_error",
            TransportError::Timeout => "timeout",
        }
    }
}

/// Trust roots for provider TLS: a PEM bundle, or the Mozilla roots shipped with the relay.
pub fn roots(ca_pem: Option<&[u8]>) -> Result<RootCertStore, ConfigError> {
    let mut store = RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| ConfigError::Roots(e.to_string()))?;
                store
                    .add(cert)
                    .map_err(|e| ConfigError::Roots(e.to_string()))?;
            }
            if store.is_empty() {
                return Err(ConfigError::Roots(
                    "no certificate in the PEM bundle".into(),
                ));
            }
        }
        None => store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(store)
}

/// Connections to one `https://host[:port]` origin.
pub struct Origin {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    slots: Vec<Mutex<Option<SendRequest<Full<Bytes>>>>>,
    next: AtomicUsize,
    timeout: Duration,
}

impl Origin {
    /// Connections to the origin of `base` (connected lazily, on first use).
    pub fn new(
        base: &Uri,
        roots: RootCertStore,
        connections: usize,
        timeout: Duration,
    ) -> Result<Self, ConfigError> {
        let url = base.to_string();
        if base.scheme_str() != Some("https") {
            return Err(ConfigError::Url(url, "must be https"));
        }
        let host = base
            .host()
            .ok_or_else(|| ConfigError::Url(url.clone(), "no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let server_name = ServerName::try_from(host.clone())
            .map_err(|_| ConfigError::Url(url.clone(), "bad host name"))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ConfigError::Roots(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Origin {
            port: base.port_u16().unwrap_or(443),
            host,
            server_name,
            tls: TlsConnector::from(Arc::new(tls)),
            slots: (0..connections.max(1)).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
            timeout,
        })
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, TransportError> {
        let connect = async {
            let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| TransportError::Connect(e.to_string()))?;
            let _ = tcp.set_nodelay(true);
            let tls = self
                .tls
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|e| TransportError::Connect(e.to_string()))?;
            if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                return Err(TransportError::Connect("server did not agree to h2".into()));
            }
            let (send, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(60))
                .keep_alive_timeout(Duration::from_secs(20))
                .handshake(TokioIo::new(tls))
                .await
                .map_err(|e| TransportError::Connect(e.to_string()))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "provider connection ended");
                }
            });
            Ok(send)
        };
        tokio::time::timeout(self.timeout, connect)
            .await
            .map_err(|_| TransportError::Timeout)?
    }

    /// A live connection for the next request, connecting its slot if needed.
    async fn sender(&self) -> Result<SendRequest<Full<Bytes>>, TransportError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let mut slot = self.slots[i].lock().await;
        if let Some(s) = slot.as_ref().filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        *slot = None;
        let s = self.connect().await?;
        *slot = Some(s.clone());
        Ok(s)
    }

    /// [`Origin::send`], timed into the provider's latency histogram; a transport failure is a
    /// retry.
    pub(crate) async fn send_timed(
        &self,
        req: Request<Full<Bytes>>,
        provider: &'static str,
    ) -> Result<Response<Bytes>, crate::Outcome> {
        let started = std::time::Instant::now();
        let resp = self.send(req).await;
        metrics::histogram!(crate::metric::DURATION, "provider" => provider)
            .record(started.elapsed().as_secs_f64());
        resp.map_err(|e| crate::Outcome::Retry {
            after: None,
            reason: e.class().into(),
        })
    }

    /// Sends `req` (its URI is a path; scheme and authority are filled in) and reads the whole
    /// response.
    pub async fn send(
        &self,
        mut req: Request<Full<Bytes>>,
    ) -> Result<Response<Bytes>, TransportError> {
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        *req.uri_mut() = Uri::builder()
            .scheme("https")
            .authority(self.authority())
            .path_and_query(path)
            .build()
            .map_err(|e| TransportError::Request(e.to_string()))?;
        let exchange = async {
            let mut sender = self.sender().await?;
            sender
                .ready()
                .await
                .map_err(|e| TransportError::Request(e.to_string()))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| TransportError::Request(e.to_string()))?;
            let (parts, body) = resp.into_parts();
            let body = http_body_util::Limited::new(body, MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| TransportError::Request(e.to_string()))?
                .to_bytes();
            Ok(Response::from_parts(parts, body))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| TransportError::Timeout)?
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Reads `Retry-After` as delay-seconds (the form Apple and Google send).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get("retry-after")?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_delay_seconds_only() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", "7".parse().expect("header"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert(
            "retry-after",
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().expect("header"),
        );
        assert_eq!(retry_after(&h), None);
    }
}
