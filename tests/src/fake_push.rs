//! Fake APNs and FCM servers: HTTP/2 over TLS with generated certificates, checking requests the
//! way Apple ("Sending notification requests to APNs") and Google (FCM HTTP v1, OAuth2 service
//! accounts) document them, and answering scripted errors.
//!
//! A plain HTTP/1.1 control port on loopback lets tests read what arrived and script answers:
//! - `GET /requests`: every request seen, as JSON (provider, path, headers, body, status, and
//!   `violation` when the request broke the provider's rules).
//! - `POST /script` `{"provider":"apns","status":410,"reason":"Unregistered","times":1,
//!   "retry_after":2,"token":"…"}`: the next matching requests get this answer instead.
//! - `POST /reset`: forget requests and scripts.
//! - `GET /stats`: counts and the most concurrent streams seen.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// Team id the fake APNs expects in provider tokens.
pub const TEAM_ID: &str = "TEAM123456";
/// Key id of the generated `.p8` key.
pub const KEY_ID: &str = "KEY1234567";
/// Firebase project of the generated service account.
pub const PROJECT: &str = "relay-test";
/// Service account e-mail.
pub const CLIENT_EMAIL: &str = "relay@relay-test.iam.gserviceaccount.com";
/// FCM's scope.
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

/// A scripted answer.
#[derive(Debug, Clone, Deserialize)]
pub struct Scripted {
    /// `apns` or `fcm`.
    pub provider: String,
    /// Only requests for this device token (any when absent).
    #[serde(default)]
    pub token: Option<String>,
    /// HTTP status.
    pub status: u16,
    /// APNs `reason` / FCM `errorCode`.
    #[serde(default)]
    pub reason: String,
    /// `Retry-After` seconds.
    #[serde(default)]
    pub retry_after: Option<u64>,
    /// How many requests get it (default 1).
    #[serde(default = "one")]
    pub times: u32,
}

fn one() -> u32 {
    1
}

#[derive(Default)]
struct State {
    requests: Mutex<Vec<Value>>,
    script: Mutex<VecDeque<Scripted>>,
    access_tokens: Mutex<HashSet<String>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    served: AtomicU64,
    record: bool,
}

struct Keys {
    apns: DecodingKey,
    fcm: DecodingKey,
    token_uri: String,
}

/// A running fake: ports and the credential files it generated for the relay.
pub struct FakePush {
    /// APNs endpoint (serves both the production and sandbox paths).
    pub apns_url: String,
    /// FCM base URL; the OAuth token endpoint is `{fcm_url}/token`.
    pub fcm_url: String,
    /// Control port.
    pub control: SocketAddr,
    /// Directory with `ca.pem`, `apns-key.p8` and `service-account.json`.
    pub dir: PathBuf,
    state: Arc<State>,
}

impl FakePush {
    /// Requests served so far.
    pub fn served(&self) -> u64 {
        self.state.served.load(Ordering::Relaxed)
    }

    /// Most requests in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::Relaxed)
    }

    /// Recorded requests.
    pub fn requests(&self) -> Vec<Value> {
        lock(&self.state.requests).clone()
    }

    /// Scripts an answer.
    pub fn script(&self, s: Scripted) {
        lock(&self.state.script).push_back(s);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Generates credentials into `dir`, binds loopback ports and serves until the runtime stops.
/// `max_streams` is the `SETTINGS_MAX_CONCURRENT_STREAMS` announced to clients; `record` keeps
/// every request for `/requests` (off for benchmarks).
pub async fn start(dir: &Path, max_streams: u32, record: bool) -> anyhow::Result<FakePush> {
    std::fs::create_dir_all(dir)?;
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "fake push CA");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate()?;
    let leaf = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])?
        .signed_by(&leaf_key, &issuer)?;
    std::fs::write(dir.join("ca.pem"), ca_cert.pem())?;

    let apns_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    std::fs::write(dir.join("apns-key.p8"), apns_key.serialize_pem())?;
    let fcm_key =
        rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)?;

    let apns_listener = TcpListener::bind("127.0.0.1:0").await?;
    let fcm_listener = TcpListener::bind("127.0.0.1:0").await?;
    let control_listener = TcpListener::bind("127.0.0.1:0").await?;
    let apns_url = format!("https://127.0.0.1:{}", apns_listener.local_addr()?.port());
    let fcm_url = format!("https://127.0.0.1:{}", fcm_listener.local_addr()?.port());
    let token_uri = format!("{fcm_url}/token");
    let account = json!({
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": "fcmkey1",
        "private_key": fcm_key.serialize_pem(),
        "client_email": CLIENT_EMAIL,
        "token_uri": token_uri,
    });
    std::fs::write(
        dir.join("service-account.json"),
        serde_json::to_vec_pretty(&account)?,
    )?;

    let keys = Arc::new(Keys {
        apns: DecodingKey::from_ec_pem(apns_key.public_key_pem().as_bytes())
            .context("APNs public key")?,
        fcm: DecodingKey::from_rsa_pem(fcm_key.public_key_pem().as_bytes())
            .context("FCM public key")?,
        token_uri,
    });
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls_pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der())
                .map_err(|e| anyhow::anyhow!(e))?,
        )?;
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let state = Arc::new(State {
        record,
        ..Default::default()
    });

    for (listener, provider) in [(apns_listener, "apns"), (fcm_listener, "fcm")] {
        let (acceptor, state, keys) = (acceptor.clone(), state.clone(), keys.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, state, keys) = (acceptor.clone(), state.clone(), keys.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| {
                        let (state, keys) = (state.clone(), keys.clone());
                        async move { Ok::<_, hyper::Error>(handle(provider, req, &state, &keys).await) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .max_concurrent_streams(max_streams)
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
    }

    let control = control_listener.local_addr()?;
    let st = state.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = control_listener.accept().await else {
                continue;
            };
            let st = st.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let st = st.clone();
                    async move { Ok::<_, hyper::Error>(control_request(req, &st).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });

    Ok(FakePush {
        apns_url,
        fcm_url,
        control,
        dir: dir.to_path_buf(),
        state,
    })
}

fn json_response(status: u16, body: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

async fn control_request(req: Request<Incoming>, st: &State) -> Response<Full<Bytes>> {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    match (method.as_str(), path.as_str()) {
        ("GET", "/requests") => json_response(200, &Value::Array(lock(&st.requests).clone())),
        ("GET", "/stats") => json_response(
            200,
            &json!({
                "served": st.served.load(Ordering::Relaxed),
                "max_in_flight": st.max_in_flight.load(Ordering::Relaxed),
            }),
        ),
        ("POST", "/script") => match serde_json::from_slice::<Scripted>(&body) {
            Ok(s) => {
                lock(&st.script).push_back(s);
                json_response(200, &json!({"ok": true}))
            }
            Err(e) => json_response(400, &json!({"error": e.to_string()})),
        },
        ("POST", "/reset") => {
            lock(&st.requests).clear();
            lock(&st.script).clear();
            json_response(200, &json!({"ok": true}))
        }
        _ => json_response(404, &json!({"error": "no such control route"})),
    }
}

/// Takes the first scripted answer matching this request, if any.
fn scripted(st: &State, provider: &str, token: &str) -> Option<Scripted> {
    let mut script = lock(&st.script);
    let i = script
        .iter()
        .position(|s| s.provider == provider && s.token.as_deref().is_none_or(|t| t == token))?;
    let s = script[i].clone();
    if script[i].times <= 1 {
        script.remove(i);
    } else {
        script[i].times -= 1;
    }
    Some(s)
}

/// What a handler decided, before it becomes a response.
struct Verdict {
    status: u16,
    body: Value,
    retry_after: Option<u64>,
    violation: Option<String>,
    token: String,
}

impl Verdict {
    fn ok(status: u16, body: Value, token: String) -> Self {
        Verdict {
            status,
            body,
            retry_after: None,
            violation: None,
            token,
        }
    }
    fn broken(status: u16, body: Value, violation: String, token: String) -> Self {
        Verdict {
            status,
            body,
            retry_after: None,
            violation: Some(violation),
            token,
        }
    }
}

async fn handle(
    provider: &'static str,
    req: Request<Incoming>,
    st: &State,
    keys: &Keys,
) -> Response<Full<Bytes>> {
    let now = st.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
    st.max_in_flight.fetch_max(now, Ordering::Relaxed);
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let path = parts.uri.path().to_string();
    let verdict = match (provider, path.as_str()) {
        ("fcm", "/token") => oauth(&parts, &body, st, keys),
        ("fcm", _) => fcm(&parts, &path, &body, st),
        _ => apns(&parts, &path, &body, st, keys),
    };
    st.in_flight.fetch_sub(1, Ordering::Relaxed);
    st.served.fetch_add(1, Ordering::Relaxed);
    if st.record {
        let headers: serde_json::Map<String, Value> = parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    Value::String(v.to_str().unwrap_or("").to_string()),
                )
            })
            .collect();
        lock(&st.requests).push(json!({
            "provider": if path == "/token" { "oauth" } else { provider },
            "method": parts.method.as_str(),
            "path": path,
            "headers": headers,
            "body": serde_json::from_slice::<Value>(&body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into())),
            "token": verdict.token,
            "status": verdict.status,
            "violation": verdict.violation,
            "at_ms": SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        }));
    }
    let mut resp = json_response(verdict.status, &verdict.body);
    if let Some(s) = verdict.retry_after {
        resp.headers_mut().insert("retry-after", s.into());
    }
    if verdict.status == 200 && provider == "apns" {
        let id = uuid::Uuid::new_v4().to_string();
        if let Ok(v) = id.parse() {
            resp.headers_mut().insert("apns-id", v);
        }
    }
    resp
}

fn header<'a>(parts: &'a hyper::http::request::Parts, name: &str) -> Option<&'a str> {
    parts.headers.get(name).and_then(|v| v.to_str().ok())
}

fn apns(
    parts: &hyper::http::request::Parts,
    path: &str,
    body: &[u8],
    st: &State,
    keys: &Keys,
) -> Verdict {
    let token = path.strip_prefix("/3/device/").unwrap_or("").to_string();
    let bad = |status: u16, reason: &str, why: String| {
        Verdict::broken(status, json!({ "reason": reason }), why, token.clone())
    };
    if parts.method != hyper::Method::POST {
        return bad(405, "MethodNotAllowed", "method must be POST".into());
    }
    if token.len() < 64 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return bad(400, "BadDeviceToken", format!("bad path {path}"));
    }
    // Provider token: ES256, kid = key id, iss = team id, iat within the last hour.
    let Some(jwt) = header(parts, "authorization").and_then(|a| a.strip_prefix("bearer ")) else {
        return bad(
            403,
            "MissingProviderToken",
            "no bearer provider token".into(),
        );
    };
    let mut v = Validation::new(Algorithm::ES256);
    v.required_spec_claims = HashSet::from(["iss".to_string()]);
    v.validate_exp = false;
    v.set_issuer(&[TEAM_ID]);
    match (
        jsonwebtoken::decode_header(jwt),
        jsonwebtoken::decode::<Value>(jwt, &keys.apns, &v),
    ) {
        (Ok(h), Ok(data)) => {
            if h.kid.as_deref() != Some(KEY_ID) {
                return bad(403, "InvalidProviderToken", "kid is not the key id".into());
            }
            let iat = data.claims["iat"].as_u64().unwrap_or(0);
            if iat + 3600 < now_s() {
                return bad(
                    403,
                    "ExpiredProviderToken",
                    "provider token older than 1 h".into(),
                );
            }
            if iat > now_s() + 60 {
                return bad(403, "InvalidProviderToken", "iat in the future".into());
            }
        }
        _ => {
            return bad(
                403,
                "InvalidProviderToken",
                "signature or claims invalid".into(),
            );
        }
    }
    let Some(topic) = header(parts, "apns-topic") else {
        return bad(400, "MissingTopic", "no apns-topic".into());
    };
    if topic.is_empty() {
        return bad(400, "MissingTopic", "empty apns-topic".into());
    }
    let push_type = header(parts, "apns-push-type").unwrap_or("");
    if !["alert", "background"].contains(&push_type) {
        return bad(
            400,
            "InvalidPushType",
            format!("apns-push-type {push_type:?}"),
        );
    }
    let priority = header(parts, "apns-priority").unwrap_or("10");
    if !["5", "10"].contains(&priority) || (push_type == "background" && priority != "5") {
        return bad(
            400,
            "BadPriority",
            format!("priority {priority} for {push_type}"),
        );
    }
    if header(parts, "apns-expiration").is_some_and(|e| e.parse::<u64>().is_err()) {
        return bad(
            400,
            "BadExpirationDate",
            "apns-expiration not an integer".into(),
        );
    }
    if header(parts, "apns-collapse-id").is_some_and(|c| c.len() > 64) {
        return bad(400, "BadCollapseId", "collapse id over 64 bytes".into());
    }
    if body.len() > 4096 {
        return bad(413, "PayloadTooLarge", format!("{} bytes", body.len()));
    }
    let Ok(payload) = serde_json::from_slice::<Value>(body) else {
        return bad(400, "PayloadEmpty", "payload is not JSON".into());
    };
    let Some(aps) = payload.get("aps").and_then(Value::as_object) else {
        return bad(400, "PayloadEmpty", "no aps dictionary".into());
    };
    if push_type == "background" && (aps.contains_key("alert") || aps.contains_key("sound")) {
        return bad(
            400,
            "BadPayload",
            "background push with alert or sound".into(),
        );
    }
    if let Some(s) = scripted(st, "apns", &token) {
        let mut body = json!({ "reason": s.reason });
        if s.status == 410 {
            body["timestamp"] = json!(now_s() * 1000);
        }
        let mut v = Verdict::ok(s.status, body, token);
        v.retry_after = s.retry_after;
        return v;
    }
    Verdict::ok(200, json!({}), token)
}

fn form_value<'a>(form: &'a str, key: &str) -> Option<&'a str> {
    form.split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

fn oauth(parts: &hyper::http::request::Parts, body: &[u8], st: &State, keys: &Keys) -> Verdict {
    let bad = |why: &str| {
        Verdict::broken(
            400,
            json!({"error": "invalid_grant", "error_description": why}),
            why.into(),
            String::new(),
        )
    };
    if parts.method != hyper::Method::POST
        || header(parts, "content-type") != Some("application/x-www-form-urlencoded")
    {
        return bad("token request must be a form POST");
    }
    let form = String::from_utf8_lossy(body);
    if form_value(&form, "grant_type")
        != Some("urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer")
    {
        return bad("grant_type must be jwt-bearer");
    }
    let Some(assertion) = form_value(&form, "assertion") else {
        return bad("no assertion");
    };
    let mut v = Validation::new(Algorithm::RS256);
    v.set_issuer(&[CLIENT_EMAIL]);
    v.set_audience(&[keys.token_uri.as_str()]);
    v.set_required_spec_claims(&["iss", "aud", "exp"]);
    let claims = match jsonwebtoken::decode::<Value>(assertion, &keys.fcm, &v) {
        Ok(d) => d.claims,
        Err(e) => return bad(&format!("assertion invalid: {e}")),
    };
    let (iat, exp) = (
        claims["iat"].as_u64().unwrap_or(0),
        claims["exp"].as_u64().unwrap_or(0),
    );
    if exp <= iat || exp - iat > 3600 {
        return bad("assertion lifetime must be at most one hour");
    }
    if !claims["scope"]
        .as_str()
        .is_some_and(|s| s.split(' ').any(|s| s == SCOPE))
    {
        return bad("scope lacks firebase.messaging");
    }
    let access = format!("ya29.fake-{}", uuid::Uuid::new_v4().simple());
    lock(&st.access_tokens).insert(access.clone());
    Verdict::ok(
        200,
        json!({"access_token": access, "expires_in": 3599, "token_type": "Bearer"}),
        String::new(),
    )
}

fn fcm_error(status: u16, code: &str, why: String, token: String) -> Verdict {
    let status_name = match status {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        404 => "NOT_FOUND",
        429 => "RESOURCE_EXHAUSTED",
        503 => "UNAVAILABLE",
        _ => "INTERNAL",
    };
    Verdict::broken(
        status,
        json!({"error": {"code": status, "message": why, "status": status_name, "details": [
            {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}
        ]}}),
        why,
        token,
    )
}

fn fcm(parts: &hyper::http::request::Parts, path: &str, body: &[u8], st: &State) -> Verdict {
    if parts.method != hyper::Method::POST
        || path != format!("/v1/projects/{PROJECT}/messages:send")
    {
        return fcm_error(
            404,
            "",
            format!("no route {} {path}", parts.method),
            String::new(),
        );
    }
    let bearer = header(parts, "authorization").and_then(|a| a.strip_prefix("Bearer "));
    if !bearer.is_some_and(|t| lock(&st.access_tokens).contains(t)) {
        return fcm_error(
            401,
            "",
            "missing or unknown access token".into(),
            String::new(),
        );
    }
    let Ok(req) = serde_json::from_slice::<Value>(body) else {
        return fcm_error(
            400,
            "INVALID_ARGUMENT",
            "body is not JSON".into(),
            String::new(),
        );
    };
    let m = &req["message"];
    let token = m["token"].as_str().unwrap_or("").to_string();
    let targets = ["token", "topic", "condition"]
        .iter()
        .filter(|k| m.get(**k).is_some())
        .count();
    if targets != 1 || token.is_empty() {
        return fcm_error(
            400,
            "INVALID_ARGUMENT",
            "exactly one target, a token".into(),
            token,
        );
    }
    if let Some(data) = m.get("data") {
        let all_strings = data
            .as_object()
            .is_some_and(|d| d.values().all(Value::is_string));
        if !all_strings {
            return fcm_error(
                400,
                "INVALID_ARGUMENT",
                "data values must be strings".into(),
                token,
            );
        }
    }
    let android = &m["android"];
    if let Some(p) = android.get("priority")
        && !["NORMAL", "HIGH"].contains(&p.as_str().unwrap_or(""))
    {
        return fcm_error(
            400,
            "INVALID_ARGUMENT",
            format!("android.priority {p}"),
            token,
        );
    }
    if let Some(ttl) = android.get("ttl") {
        let ok = ttl
            .as_str()
            .and_then(|t| t.strip_suffix('s'))
            .is_some_and(|n| n.parse::<f64>().is_ok());
        if !ok {
            return fcm_error(400, "INVALID_ARGUMENT", format!("android.ttl {ttl}"), token);
        }
    }
    if body.len() > 4096 {
        return fcm_error(400, "INVALID_ARGUMENT", "message over 4 KB".into(), token);
    }
    if let Some(s) = scripted(st, "fcm", &token) {
        let mut v = fcm_error(s.status, &s.reason, "scripted".into(), token);
        v.violation = None;
        v.retry_after = s.retry_after;
        return v;
    }
    Verdict::ok(
        200,
        json!({"name": format!("projects/{PROJECT}/messages/{}", uuid::Uuid::new_v4().simple())}),
        token,
    )
}
