//! FCM HTTP v1 client: `POST {base}/v1/projects/{project}/messages:send` with an OAuth2 access
//! token obtained from a service account (JWT bearer grant, RFC 7523), over HTTP/2.
//!
//! Written here rather than taken from `gcp_auth`/`google-fcm1`: one token exchange and one
//! request shape do not justify a second HTTP/TLS stack, and both endpoints must be pointable at
//! the test suite's fake server (the service account's own `token_uri` already is).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Uri};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rustls::RootCertStore;
use serde::Deserialize;
use serde_json::Value;

use crate::origin::Origin;
use crate::payload::FcmStyle;
use crate::{ConfigError, DeviceToken, Outcome, Push, metric};

/// Google's FCM endpoint.
pub const BASE_URL: &str = "https://fcm.googleapis.com";
/// OAuth2 scope for sending.
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// An access token is replaced this long before it expires.
const REFRESH_MARGIN: Duration = Duration::from_secs(300);

/// The fields of a Google service-account JSON key file the client uses.
#[derive(Clone, Deserialize)]
pub struct ServiceAccount {
    /// Firebase project id.
    pub project_id: String,
    /// Key id (JWT `kid`).
    #[serde(default)]
    pub private_key_id: String,
    /// PKCS#8 PEM RSA key.
    pub private_key: String,
    /// Service account e-mail (JWT `iss`).
    pub client_email: String,
    /// OAuth2 token endpoint.
    pub token_uri: String,
}

impl ServiceAccount {
    /// Parses a service-account JSON key file.
    pub fn from_json(json: &[u8]) -> Result<Self, ConfigError> {
        serde_json::from_slice(json).map_err(|e| ConfigError::ServiceAccount(e.to_string()))
    }
}

/// FCM settings.
#[derive(Clone)]
pub struct FcmConfig {
    /// Service account.
    pub account: ServiceAccount,
    /// FCM base URL (override for tests).
    pub base_url: Uri,
    /// Connections to FCM.
    pub connections: usize,
    /// Per-request timeout.
    pub timeout: Duration,
    /// How long FCM keeps an undeliverable message, seconds.
    pub ttl_secs: u32,
    /// Data-only messages (the app decides what to show) or notification messages.
    pub style: FcmStyle,
}

/// FCM client.
pub struct Fcm {
    fcm: Origin,
    oauth: Origin,
    token_path: String,
    token_uri: String,
    send_path: String,
    key: EncodingKey,
    header: Header,
    client_email: String,
    ttl_secs: u32,
    style: FcmStyle,
    access: tokio::sync::Mutex<Option<(String, Instant)>>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: u64,
}

impl Fcm {
    /// Builds the client; connects and fetches an access token lazily.
    pub fn new(cfg: FcmConfig, roots: RootCertStore) -> Result<Self, ConfigError> {
        let a = &cfg.account;
        let key = EncodingKey::from_rsa_pem(a.private_key.as_bytes())
            .map_err(|e| ConfigError::ServiceAccount(format!("private_key: {e}")))?;
        let mut header = Header::new(Algorithm::RS256);
        header.kid = (!a.private_key_id.is_empty()).then(|| a.private_key_id.clone());
        let token_uri: Uri = a
            .token_uri
            .parse()
            .map_err(|_| ConfigError::Url(a.token_uri.clone(), "not a URL"))?;
        let valid_project = !a.project_id.is_empty()
            && a.project_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
        if !valid_project {
            return Err(ConfigError::ServiceAccount("bad project_id".into()));
        }
        Ok(Fcm {
            fcm: Origin::new(&cfg.base_url, roots.clone(), cfg.connections, cfg.timeout)?,
            oauth: Origin::new(&token_uri, roots, 1, cfg.timeout)?,
            token_path: token_uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .into(),
            token_uri: a.token_uri.clone(),
            send_path: format!("/v1/projects/{}/messages:send", a.project_id),
            key,
            header,
            client_email: a.client_email.clone(),
            ttl_secs: cfg.ttl_secs,
            style: cfg.style,
            access: tokio::sync::Mutex::new(None),
        })
    }

    /// A valid access token, exchanging a fresh assertion when the cached one is near expiry.
    async fn access_token(&self) -> Result<String, String> {
        let mut access = self.access.lock().await;
        if let Some((token, expires)) = access.as_ref()
            && Instant::now() + REFRESH_MARGIN < *expires
        {
            return Ok(token.clone());
        }
        let iat = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let claims = serde_json::json!({
            "iss": self.client_email, "scope": SCOPE, "aud": self.token_uri,
            "iat": iat, "exp": iat + 3600,
        });
        let assertion = jsonwebtoken::encode(&self.header, &claims, &self.key)
            .map_err(|e| format!("assertion: {e}"))?;
        let form = format!(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={assertion}"
        );
        let req = Request::post(self.token_path.as_str())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(form)))
            .map_err(|e| e.to_string())?;
        let resp = self.oauth.send(req).await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("token endpoint answered {}", resp.status()));
        }
        let (token, expires) = parse_token_response(resp.body(), Instant::now())?;
        metrics::counter!(metric::AUTH_REFRESHES, "provider" => "fcm").increment(1);
        *access = Some((token.clone(), expires));
        Ok(token)
    }

    async fn forget_token(&self, rejected: &str) {
        let mut access = self.access.lock().await;
        if access.as_ref().is_some_and(|(t, _)| t == rejected) {
            *access = None;
        }
    }

    /// Sends one push and maps Google's answer.
    pub async fn send(&self, target: &DeviceToken, push: &Push) -> Outcome {
        let mut message = push.fcm(self.ttl_secs, self.style).message;
        message["token"] = Value::String(target.token.clone());
        let body = serde_json::json!({ "message": message }).to_string();
        let token = match self.access_token().await {
            Ok(t) => t,
            Err(reason) => {
                tracing::warn!(%reason, "FCM access token unavailable");
                return Outcome::Retry {
                    after: None,
                    reason: "oauth_unavailable".into(),
                };
            }
        };
        let req = Request::post(self.send_path.as_str())
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json; charset=UTF-8")
            .body(Full::new(Bytes::from(body)));
        let req = match req {
            Ok(r) => r,
            Err(e) => return Outcome::Failed(format!("request: {e}")),
        };
        let resp = match self.fcm.send_timed(req, "fcm").await {
            Ok(r) => r,
            Err(outcome) => return outcome,
        };
        let status = resp.status().as_u16();
        let outcome = response_outcome(status, resp.headers(), resp.body());
        if status == 401 {
            self.forget_token(&token).await;
        }
        outcome
    }
}

/// What to do after an FCM answer.
pub fn response_outcome(status: u16, headers: &hyper::HeaderMap, body: &[u8]) -> Outcome {
    let error = serde_json::from_slice::<Value>(body).unwrap_or(Value::Null);
    classify(status, &error, crate::origin::retry_after(headers))
}

/// The access token in a token endpoint's answer, and when it expires: at most an hour on (the
/// assertion's own lifetime; Google's tokens last 3,599 s), so no answer can overflow the clock
/// or keep a token past what Google grants.
pub fn parse_token_response(body: &[u8], now: Instant) -> Result<(String, Instant), String> {
    let t: TokenResponse =
        serde_json::from_slice(body).map_err(|e| format!("token response: {e}"))?;
    Ok((
        t.access_token,
        now + Duration::from_secs(t.expires_in.min(3600)),
    ))
}

/// The `errorCode` of an FCM error body (`error.details[].errorCode`), if any.
fn error_code(error: &Value) -> Option<&str> {
    error["error"]["details"]
        .as_array()?
        .iter()
        .find_map(|d| d.get("errorCode")?.as_str())
}

/// Whether a 400 blames the registration token (`google.rpc.BadRequest` on `message.token`).
fn blames_token(error: &Value) -> bool {
    error["error"]["details"].as_array().is_some_and(|details| {
        details.iter().any(|d| {
            d["fieldViolations"].as_array().is_some_and(|v| {
                v.iter()
                    .any(|f| f["field"].as_str() == Some("message.token"))
            })
        })
    })
}

/// Maps an FCM v1 status and error body to what to do (Firebase's `ErrorCode` reference).
pub fn classify(status: u16, error: &Value, retry_after: Option<Duration>) -> Outcome {
    let code = error_code(error).unwrap_or("");
    match status {
        200 => Outcome::Delivered,
        404 if code == "UNREGISTERED" || code.is_empty() => Outcome::TokenGone("UNREGISTERED"),
        403 if code == "SENDER_ID_MISMATCH" => Outcome::TokenGone("SENDER_ID_MISMATCH"),
        400 if blames_token(error) => Outcome::TokenGone("INVALID_ARGUMENT token"),
        // The access token is exchanged again before the retry.
        401 => Outcome::Retry {
            after: Some(Duration::ZERO),
            reason: "UNAUTHENTICATED".into(),
        },
        429 | 500 | 503 => Outcome::Retry {
            after: retry_after,
            reason: if code.is_empty() {
                format!("http_{status}")
            } else {
                code.into()
            },
        },
        _ => Outcome::Failed(format!("http_{status} {code}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_response_cannot_overflow_the_clock() {
        let now = Instant::now();
        let body = br#"{"access_token":"ya29.x","expires_in":18446744073709551615}"#;
        let (token, expires) = parse_token_response(body, now).expect("parses");
        assert_eq!(token, "ya29.x");
        assert!(expires <= now + Duration::from_secs(3600));
        let body = br#"{"access_token":"ya29.y","expires_in":3599}"#;
        assert_eq!(
            parse_token_response(body, now).expect("parses").1,
            now + Duration::from_secs(3599)
        );
        assert!(parse_token_response(br#"{"access_token":1}"#, now).is_err());
    }
    use serde_json::json;

    fn err(code: &str) -> Value {
        json!({"error": {"details": [
            {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}
        ]}})
    }

    #[test]
    fn google_answers_map_to_actions() {
        assert_eq!(classify(200, &Value::Null, None), Outcome::Delivered);
        assert!(matches!(
            classify(404, &err("UNREGISTERED"), None),
            Outcome::TokenGone(_)
        ));
        assert!(matches!(
            classify(403, &err("SENDER_ID_MISMATCH"), None),
            Outcome::TokenGone(_)
        ));
        let bad_token = json!({"error": {"details": [
            {"@type": "type.googleapis.com/google.rpc.BadRequest",
             "fieldViolations": [{"field": "message.token", "description": "invalid"}]}
        ]}});
        assert!(matches!(
            classify(400, &bad_token, None),
            Outcome::TokenGone(_)
        ));
        assert!(matches!(
            classify(400, &err("INVALID_ARGUMENT"), None),
            Outcome::Failed(_)
        ));
        let after = Some(Duration::from_secs(10));
        assert!(matches!(
            classify(429, &err("QUOTA_EXCEEDED"), after),
            Outcome::Retry { after: a, .. } if a == after
        ));
        assert!(matches!(
            classify(503, &err("UNAVAILABLE"), None),
            Outcome::Retry { .. }
        ));
        assert!(matches!(
            classify(401, &Value::Null, None),
            Outcome::Retry { .. }
        ));
    }
}
