//! The middle layer of tests: a whole relay started inside the test process (embedded store in a
//! temporary directory, listeners on `127.0.0.1:0`), a small WebSocket client that speaks
//! PROTOCOL.md, and an admin API client. Tests drive the driver, hub, pager, listener and admin
//! paths through the real sockets without building or spawning the binary.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use base64::Engine as _;
use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http_body_util::{BodyExt as _, Full};
use hyper::Request;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use metrics_exporter_prometheus::PrometheusHandle;
use relay::auth::{Claims, Minter};
use relay::config::{AdminCredential, AdminRole, Config};
use relay::server::{self, Server};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for any one frame or answer before it fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// An admin bearer token of [`TestRelay`] with the role `account_service`.
pub const ACCOUNT_SERVICE: Option<&str> = Some("rla_in_process_account_service");
/// An admin bearer token of [`TestRelay`] with the role `support`.
pub const SUPPORT: Option<&str> = Some("rla_in_process_support");

/// The process-wide metrics recorder: installed once, shared by every relay of the process.
fn metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| relay::metrics::install().expect("metrics recorder"))
        .clone()
}

/// A relay running inside the test.
pub struct TestRelay {
    server: Option<Server>,
    config: Config,
    minter: Minter,
    /// The public listener.
    pub public: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
    dir: tempfile::TempDir,
}

/// A default test configuration: dev mode, loopback on ephemeral ports, a fresh data directory,
/// two admin credentials ([`ACCOUNT_SERVICE`], [`SUPPORT`]) and a short shutdown grace.
fn test_config(dir: &std::path::Path) -> Config {
    let mut c = Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: dir.to_path_buf(),
        shutdown_grace: relay::config::Dur::secs(2),
        ..Config::default()
    };
    c.admin.credentials = [
        (AdminRole::AccountService, ACCOUNT_SERVICE),
        (AdminRole::Support, SUPPORT),
    ]
    .into_iter()
    .map(|(role, token)| AdminCredential {
        name: format!("in-process {}", role.name()),
        role,
        org: None,
        token_sha256: hex(&Sha256::digest(token.unwrap_or_default().as_bytes())),
    })
    .collect();
    c
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl TestRelay {
    /// Starts a relay with the test configuration.
    pub async fn start() -> TestRelay {
        Self::start_with(|_| {}).await
    }

    /// Starts a relay with the test configuration changed by `tweak`.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestRelay {
        Self::start_at(tempfile::tempdir().expect("temp dir"), tweak).await
    }

    /// Starts a relay on the ScyllaDB keyspace `cfg` names (a test Cassandra's [`crate::Place`]).
    pub async fn start_on_scylla(cfg: &relay::config::ScyllaConfig) -> TestRelay {
        Self::start_with(|c| {
            c.storage.backend = relay::config::Backend::Scylla;
            c.storage.scylla = cfg.clone();
        })
        .await
    }

    /// Starts a relay on the data directory a stopped one left ([`TestRelay::stop_keeping_data`]).
    pub async fn start_in(dir: tempfile::TempDir) -> TestRelay {
        Self::start_at(dir, |_| {}).await
    }

    async fn start_at(dir: tempfile::TempDir, tweak: impl FnOnce(&mut Config)) -> TestRelay {
        let mut config = test_config(dir.path());
        tweak(&mut config);
        let server = server::start(config.clone(), metrics())
            .await
            .expect("relay starts");
        let pem = std::fs::read_to_string(server::dev_signing_key_path(&config.data_dir))
            .expect("dev signing key");
        TestRelay {
            public: server.public_addr,
            admin: server.admin_addr,
            server: Some(server),
            config,
            minter: Minter::from_pem(&pem).expect("minter"),
            dir,
        }
    }

    /// The configuration the relay runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// A token for `user`'s `device`, issued now.
    pub fn token(&self, user: &str, device: &str) -> String {
        self.token_with(user, device, |_| {})
    }

    /// A token for `user`'s `device`, its claims changed by `tweak`.
    pub fn token_with(&self, user: &str, device: &str, tweak: impl FnOnce(&mut Claims)) -> String {
        let now = relay::ids::now_ms() / 1000;
        let mut claims = Claims {
            sub: user.into(),
            dev: device.into(),
            org: None,
            iat: now,
            exp: now + 3600,
            nbf: None,
            sep: 0,
            urgent: false,
            aud: self.config.auth.audience.clone(),
        };
        tweak(&mut claims);
        self.minter.mint(&claims).expect("mint")
    }

    /// Connects `user`'s `device` with a fresh token and reads `hello`.
    pub async fn connect(&self, user: &str, device: &str) -> Client {
        let token = self.token(user, device);
        self.connect_with(&token).await.expect("upgrade accepted")
    }

    /// Connects with `token` (in the `Authorization` header) and reads `hello`; a refused
    /// upgrade is an error carrying the status and body.
    pub async fn connect_with(&self, token: &str) -> Result<Client, Refused> {
        let mut client = self.upgrade(token).await?;
        let hello = client.frame().await;
        assert_eq!(hello["type"], "hello", "first frame: {hello}");
        Ok(client)
    }

    /// Upgrades with `token` and reads nothing; a refused upgrade is an error carrying the
    /// status and body.
    pub async fn upgrade(&self, token: &str) -> Result<Client, Refused> {
        let mut req = format!("ws://{}/v1/ws", self.public)
            .into_client_request()
            .expect("request");
        req.headers_mut().insert(
            AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
        );
        match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req)).await {
            Err(_) => panic!("the upgrade did not finish within {WAIT:?}"),
            Ok(Err(WsError::Http(resp))) => {
                let body = resp
                    .body()
                    .as_ref()
                    .and_then(|b| serde_json::from_slice(b).ok())
                    .unwrap_or(Value::Null);
                Err(Refused {
                    status: resp.status().as_u16(),
                    body,
                })
            }
            Ok(Err(e)) => panic!("upgrade failed: {e}"),
            Ok(Ok((ws, _))) => Ok(Client { ws }),
        }
    }

    /// Sends an HTTP/1.1 request to the admin listener with the bearer token `credential`
    /// ([`ACCOUNT_SERVICE`], [`SUPPORT`] or none) and returns the status and the body (JSON
    /// when it parses, a string otherwise).
    pub async fn admin_call(
        &self,
        credential: Option<&str>,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        http(self.admin, method, path, body, credential)
            .await
            .expect("admin listener answers")
    }

    /// An HTTP request to the public listener (no upgrade).
    pub async fn public_call(&self, method: &str, path: &str) -> (u16, Value) {
        http(self.public, method, path, None, None)
            .await
            .expect("public listener answers")
    }

    /// Drains and stops the relay (as SIGTERM does).
    pub async fn stop(self) {
        self.stop_keeping_data().await;
    }

    /// Drains and stops the relay, handing back its data directory for a restart.
    pub async fn stop_keeping_data(mut self) -> tempfile::TempDir {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
        self.dir
    }
}

/// A refused upgrade.
#[derive(Debug)]
pub struct Refused {
    /// HTTP status.
    pub status: u16,
    /// The JSON body (`{"error": …}`), or null.
    pub body: Value,
}

async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> anyhow::Result<(u16, Value)> {
    let stream = TcpStream::connect(addr).await?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    if let Some(t) = token {
        req = req.header(AUTHORIZATION, format!("Bearer {t}"));
    }
    let bytes = match body {
        Some(v) => {
            req = req.header(CONTENT_TYPE, "application/json");
            Bytes::from(v.to_string())
        }
        None => Bytes::new(),
    };
    let resp = tokio::time::timeout(WAIT, send.send_request(req.body(Full::new(bytes))?))
        .await
        .context("no answer in time")??;
    let status = resp.status().as_u16();
    let raw = resp.into_body().collect().await?.to_bytes();
    let value = serde_json::from_slice(&raw)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&raw).into_owned()));
    Ok((status, value))
}

/// What the relay sent next.
#[derive(Debug)]
pub enum Next {
    /// A JSON frame.
    Frame(Value),
    /// A close frame with its code.
    Closed(u16),
}

/// One device's WebSocket session.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Client {
    /// Sends one JSON frame.
    pub async fn put(&mut self, frame: Value) {
        self.ws
            .send(Message::text(frame.to_string()))
            .await
            .expect("frame sent");
    }

    /// Sends a raw WebSocket message.
    pub async fn put_raw(&mut self, msg: Message) {
        self.ws.send(msg).await.expect("message sent");
    }

    /// The next frame or close, within [`WAIT`].
    pub async fn next(&mut self) -> Next {
        self.next_within(WAIT)
            .await
            .unwrap_or_else(|| panic!("nothing from the relay within {WAIT:?}"))
    }

    /// The next frame or close, if one comes within `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Option<Next> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?;
            match msg {
                Some(Ok(Message::Text(t))) => {
                    return Some(Next::Frame(serde_json::from_str(&t).expect("JSON frame")));
                }
                Some(Ok(Message::Close(c))) => {
                    return Some(Next::Closed(c.map_or(1005, |c| u16::from(c.code))));
                }
                Some(Ok(_)) => continue, // pings are answered by the library
                Some(Err(e)) => panic!("socket error: {e}"),
                None => return Some(Next::Closed(1006)),
            }
        }
    }

    /// The next frame; fails on a close.
    pub async fn frame(&mut self) -> Value {
        match self.next().await {
            Next::Frame(v) => v,
            Next::Closed(code) => panic!("closed with {code} while a frame was expected"),
        }
    }

    /// The next frame, which must be of `kind`.
    pub async fn expect(&mut self, kind: &str) -> Value {
        let f = self.frame().await;
        assert_eq!(f["type"], kind, "expected `{kind}`, got {f}");
        f
    }

    /// The close code that ends the session, skipping frames of the kinds in `skipping`.
    pub async fn closed(&mut self, skipping: &[&str]) -> u16 {
        loop {
            match self.next().await {
                Next::Closed(code) => return code,
                Next::Frame(f) if skipping.iter().any(|k| f["type"] == *k) => continue,
                Next::Frame(f) => panic!("expected the close, got {f}"),
            }
        }
    }

    /// Sends `body` to `to` under a new id; returns the id.
    pub async fn send(&mut self, to: &[&str], body: &[u8]) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        self.send_as(&id, to, body).await;
        id
    }

    /// Sends `body` to `to` under `id`.
    pub async fn send_as(&mut self, id: &str, to: &[&str], body: &[u8]) {
        self.put(json!({
            "type": "send",
            "id": id,
            "to": to,
            "body": base64::engine::general_purpose::STANDARD.encode(body),
        }))
        .await;
    }

    /// Acknowledges `seqs`.
    pub async fn ack(&mut self, seqs: &[u64]) {
        self.put(json!({ "type": "ack", "seqs": seqs })).await;
    }

    /// Reads `deliver` frames until `synced`; returns them.
    pub async fn replay(&mut self) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let f = self.frame().await;
            match f["type"].as_str() {
                Some("deliver") => out.push(f),
                Some("synced") => return out,
                _ => panic!("unexpected during replay: {f}"),
            }
        }
    }

    /// Closes the session normally.
    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            }))
            .await;
    }
}

/// The body of a `deliver` frame, decoded.
pub fn body_of(deliver: &Value) -> anyhow::Result<Vec<u8>> {
    let b = deliver["body"]
        .as_str()
        .ok_or_else(|| anyhow!("no body in {deliver}"))?;
    Ok(base64::engine::general_purpose::STANDARD.decode(b)?)
}
