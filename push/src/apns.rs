//! APNs provider API client: `POST /3/device/<token>` over HTTP/2 with an ES256 provider token.
//!
//! Apple rejects provider tokens older than an hour and throttles ones refreshed more often than
//! every 20 minutes, so a token is reused for [`TOKEN_LIFETIME`] and re-signed after that, or at
//! once when Apple answers `ExpiredProviderToken`.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Uri};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rustls::RootCertStore;

use crate::origin::Origin;
use crate::{ConfigError, DeviceToken, Environment, Outcome, Push, metric};

/// Apple's production endpoint.
pub const PRODUCTION_URL: &str = "https://api.push.apple.com";
/// Apple's development endpoint.
pub const SANDBOX_URL: &str = "https://api.sandbox.push.apple.com";
/// How long one provider token is used: well inside Apple's 60 minutes, beyond its 20.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(50 * 60);

/// APNs settings.
#[derive(Clone)]
pub struct ApnsConfig {
    /// Apple developer team id (the JWT `iss`).
    pub team_id: String,
    /// Key id of the `.p8` key (the JWT `kid`).
    pub key_id: String,
    /// The `.p8` key: a PKCS#8 PEM P-256 private key.
    pub key_pem: Vec<u8>,
    /// Production endpoint (override for tests).
    pub production_url: Uri,
    /// Sandbox endpoint (override for tests).
    pub sandbox_url: Uri,
    /// Connections per endpoint.
    pub connections: usize,
    /// Per-request timeout.
    pub timeout: Duration,
    /// The app holds Apple's critical-alerts entitlement: urgent pages use `critical`.
    pub critical_entitlement: bool,
    /// How long Apple keeps trying an undeliverable push (`apns-expiration`), seconds.
    pub expiration_secs: u64,
}

/// The signed provider token and when it was made.
struct ProviderToken {
    key: EncodingKey,
    header: Header,
    team_id: String,
    current: Mutex<Option<(String, Instant)>>,
}

impl ProviderToken {
    fn get(&self) -> Result<String, jsonwebtoken::errors::Error> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((jwt, made)) = current.as_ref()
            && made.elapsed() < TOKEN_LIFETIME
        {
            return Ok(jwt.clone());
        }
        let iat = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let claims = serde_json::json!({ "iss": self.team_id, "iat": iat });
        let jwt = jsonwebtoken::encode(&self.header, &claims, &self.key)?;
        metrics::counter!(metric::AUTH_REFRESHES, "provider" => "apns").increment(1);
        *current = Some((jwt.clone(), Instant::now()));
        Ok(jwt)
    }

    /// Drops `rejected` so the next request signs a fresh token.
    fn invalidate(&self, rejected: &str) {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if current.as_ref().is_some_and(|(jwt, _)| jwt == rejected) {
            *current = None;
        }
    }
}

/// APNs client: one connection set per environment, one provider token.
pub struct Apns {
    production: Origin,
    sandbox: Origin,
    token: ProviderToken,
    critical_entitlement: bool,
    expiration_secs: u64,
}

impl Apns {
    /// Builds the client; connects lazily.
    pub fn new(cfg: ApnsConfig, roots: RootCertStore) -> Result<Self, ConfigError> {
        let key = EncodingKey::from_ec_pem(&cfg.key_pem)
            .map_err(|e| ConfigError::Key(format!("APNs .p8 key: {e}")))?;
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(cfg.key_id.clone());
        let token = ProviderToken {
            key,
            header,
            team_id: cfg.team_id.clone(),
            current: Mutex::new(None),
        };
        token
            .get()
            .map_err(|e| ConfigError::Key(format!("APNs .p8 key cannot sign: {e}")))?;
        Ok(Apns {
            production: Origin::new(
                &cfg.production_url,
                roots.clone(),
                cfg.connections,
                cfg.timeout,
            )?,
            sandbox: Origin::new(&cfg.sandbox_url, roots, cfg.connections, cfg.timeout)?,
            token,
            critical_entitlement: cfg.critical_entitlement,
            expiration_secs: cfg.expiration_secs,
        })
    }

    /// Sends one push and maps Apple's answer.
    pub async fn send(&self, target: &DeviceToken, push: &Push) -> Outcome {
        let parts = push.apns(self.critical_entitlement);
        let body = match serde_json::to_vec(&parts.payload) {
            Ok(b) => b,
            Err(e) => return Outcome::Failed(format!("payload: {e}")),
        };
        let jwt = match self.token.get() {
            Ok(t) => t,
            Err(e) => return Outcome::Failed(format!("provider token: {e}")),
        };
        let expiration = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            + self.expiration_secs;
        let mut req = Request::post(format!("/3/device/{}", target.token))
            .header("authorization", format!("bearer {jwt}"))
            .header("apns-topic", &target.app_id)
            .header("apns-push-type", parts.push_type)
            .header("apns-priority", parts.priority.to_string())
            .header("apns-expiration", expiration.to_string())
            .header("content-type", "application/json");
        if let Some(id) = &parts.collapse_id {
            req = req.header("apns-collapse-id", id);
        }
        let req = match req.body(Full::new(Bytes::from(body))) {
            Ok(r) => r,
            Err(e) => return Outcome::Failed(format!("request: {e}")),
        };
        let origin = match target.environment {
            Environment::Production => &self.production,
            Environment::Sandbox => &self.sandbox,
        };
        let resp = match origin.send_timed(req, "apns").await {
            Ok(r) => r,
            Err(outcome) => return outcome,
        };
        let (outcome, reason) =
            response_outcome(resp.status().as_u16(), resp.headers(), resp.body());
        if matches!(
            reason.as_str(),
            "ExpiredProviderToken" | "InvalidProviderToken"
        ) {
            self.token.invalidate(&jwt);
        }
        outcome
    }
}

/// What to do after an APNs answer, and the answer's `reason` (empty if none).
pub fn response_outcome(status: u16, headers: &hyper::HeaderMap, body: &[u8]) -> (Outcome, String) {
    let reason = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("reason")?.as_str().map(str::to_owned))
        .unwrap_or_default();
    let retry_after = crate::origin::retry_after(headers);
    (classify(status, &reason, retry_after), reason)
}

/// Maps an APNs status and `reason` to what to do (Apple's "Handling notification responses").
pub fn classify(status: u16, reason: &str, retry_after: Option<Duration>) -> Outcome {
    match (status, reason) {
        (200, _) => Outcome::Delivered,
        (410, _) => Outcome::TokenGone("Unregistered"),
        (400, "BadDeviceToken") => Outcome::TokenGone("BadDeviceToken"),
        (400, "DeviceTokenNotForTopic") => Outcome::TokenGone("DeviceTokenNotForTopic"),
        // The provider token is re-signed before the retry.
        (403, "ExpiredProviderToken" | "InvalidProviderToken") => Outcome::Retry {
            after: Some(Duration::ZERO),
            reason: reason.into(),
        },
        (429 | 500 | 503, _) => Outcome::Retry {
            after: retry_after,
            reason: if reason.is_empty() {
                format!("http_{status}")
            } else {
                reason.into()
            },
        },
        _ => Outcome::Failed(format!("http_{status} {reason}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apple_answers_map_to_actions() {
        assert_eq!(classify(200, "", None), Outcome::Delivered);
        assert!(matches!(
            classify(410, "Unregistered", None),
            Outcome::TokenGone(_)
        ));
        assert!(matches!(
            classify(400, "BadDeviceToken", None),
            Outcome::TokenGone(_)
        ));
        assert!(matches!(
            classify(400, "DeviceTokenNotForTopic", None),
            Outcome::TokenGone(_)
        ));
        assert!(matches!(
            classify(400, "BadCollapseId", None),
            Outcome::Failed(_)
        ));
        assert!(matches!(
            classify(413, "PayloadTooLarge", None),
            Outcome::Failed(_)
        ));
        let after = Some(Duration::from_secs(3));
        assert_eq!(
            classify(429, "TooManyRequests", after),
            Outcome::Retry {
                after,
                reason: "TooManyRequests".into()
            }
        );
        assert!(matches!(
            classify(503, "", None),
            Outcome::Retry { after: None, .. }
        ));
        assert!(matches!(
            classify(403, "ExpiredProviderToken", None),
            Outcome::Retry { .. }
        ));
    }
}
