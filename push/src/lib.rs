//! Push notifications for the relay: APNs and FCM wake-ups that carry **no patient
//! information**.
//!
//! Layout:
//! - [`payload`]: what a push may say, built only from types that cannot hold free text.
//! - [`origin`]: a set of pooled HTTP/2 connections over TLS to one provider host.
//! - [`apns`] and [`fcm`]: thin provider clients (auth tokens, request shape, outcome mapping).
//! - [`dispatch`]: the bounded queue and worker tasks in front of the clients, with retries.
//!
//! `a2` and `fcm` were the first candidates and do not fit (`fcm` targets Google's retired legacy
//! API; `a2` cannot be pointed at a test server, pulls a second TLS stack and lacks
//! `interruption-level`): see ARCHITECTURE.md before adding either.

#![warn(missing_docs)]

pub mod apns;
pub mod dispatch;
pub mod fcm;
pub mod origin;
pub mod payload;

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

pub use dispatch::{Dispatcher, DispatcherConfig};
pub use payload::Push;

/// Push provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    /// Apple Push Notification service.
    Apns,
    /// Firebase Cloud Messaging.
    Fcm,
}

impl Platform {
    /// Name used in metric labels and logs.
    pub fn name(self) -> &'static str {
        match self {
            Platform::Apns => "apns",
            Platform::Fcm => "fcm",
        }
    }
}

/// Which provider environment issued the token (APNs distinguishes sandbox and production).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    /// Development builds (APNs sandbox).
    Sandbox,
    /// App Store / TestFlight / Play builds.
    Production,
}

/// A device's push registration, as the app reports it.
///
/// `Debug` never prints the token: logs name a registration by [`DeviceToken::fingerprint`].
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeviceToken {
    /// Provider.
    pub platform: Platform,
    /// The provider's device token (APNs: hex; FCM: registration token).
    pub token: String,
    /// Provider environment.
    pub environment: Environment,
    /// Bundle id (APNs `apns-topic`) or Android package name.
    pub app_id: String,
}

impl fmt::Debug for DeviceToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceToken")
            .field("platform", &self.platform)
            .field("token", &self.fingerprint())
            .field("environment", &self.environment)
            .field("app_id", &self.app_id)
            .finish()
    }
}

/// Why a registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The token does not have the provider's shape.
    #[error("push token is not a valid {0} token")]
    BadToken(&'static str),
    /// The app id is not a bundle id / package name.
    #[error("app_id must be 1-255 characters of [A-Za-z0-9._-]")]
    BadAppId,
}

impl DeviceToken {
    /// Checks the token's shape for its provider, so garbage never reaches Apple or Google.
    pub fn validate(&self) -> Result<(), TokenError> {
        let ok = match self.platform {
            // Apple documents a hex string; today 64 characters, longer ones are announced.
            Platform::Apns => {
                (64..=200).contains(&self.token.len())
                    && self.token.bytes().all(|b| b.is_ascii_hexdigit())
            }
            Platform::Fcm => {
                (1..=4096).contains(&self.token.len())
                    && self.token.bytes().all(|b| b.is_ascii_graphic())
            }
        };
        if !ok {
            return Err(TokenError::BadToken(self.platform.name()));
        }
        let app_ok = (1..=255).contains(&self.app_id.len())
            && self
                .app_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !app_ok {
            return Err(TokenError::BadAppId);
        }
        Ok(())
    }

    /// A short, stable, non-reversible name for logs: never log the token itself.
    pub fn fingerprint(&self) -> String {
        let digest = sha2::Sha256::digest(self.token.as_bytes());
        digest[..6].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// What a provider said about one push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted by the provider.
    Delivered,
    /// The token is no longer valid: delete it and stop pushing to it.
    TokenGone(&'static str),
    /// Transient: try again after `after` (the provider's `Retry-After`) or a backoff.
    Retry {
        /// The provider's `Retry-After`, when it sent one.
        after: Option<Duration>,
        /// Provider reason or transport error class (bounded set, safe for logs).
        reason: String,
    },
    /// Permanent for this push (payload too large, bad topic, …): logged and counted.
    Failed(String),
}

/// Configuration or credential problems found when building a client.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A URL that is not `https://host[:port]`.
    #[error("bad provider URL {0}: {1}")]
    Url(String, &'static str),
    /// Trust roots that could not be read.
    #[error("bad trust roots: {0}")]
    Roots(String),
    /// A key that could not be parsed.
    #[error("bad key: {0}")]
    Key(String),
    /// A service-account file that could not be used.
    #[error("bad service account: {0}")]
    ServiceAccount(String),
}

/// Metric names emitted by this crate (the relay's catalogue documents them).
pub mod metric {
    /// Counter `{provider, kind, outcome}`.
    pub const PUSHES: &str = "relay_push_total";
    /// Histogram `{provider}`: provider round trip, seconds.
    pub const DURATION: &str = "relay_push_duration_seconds";
    /// Gauge: pushes waiting in the queue.
    pub const QUEUE_DEPTH: &str = "relay_push_queue_depth";
    /// Counter `{provider}`: tokens deleted after the provider rejected them.
    pub const TOKENS_REMOVED: &str = "relay_push_tokens_removed_total";
    /// Counter `{reason}`: pushes dropped before reaching a provider.
    pub const DROPPED: &str = "relay_push_dropped_total";
    /// Counter `{provider}`: provider auth tokens (APNs JWT, FCM OAuth) issued.
    pub const AUTH_REFRESHES: &str = "relay_push_auth_refreshes_total";
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(platform: Platform, token: &str) -> DeviceToken {
        DeviceToken {
            platform,
            token: token.into(),
            environment: Environment::Sandbox,
            app_id: "com.example.relay".into(),
        }
    }

    #[test]
    fn tokens_are_validated_per_provider_and_never_debug_printed() {
        let hex = "ab".repeat(32);
        assert!(token(Platform::Apns, &hex).validate().is_ok());
        assert!(token(Platform::Apns, "zz").validate().is_err());
        assert!(token(Platform::Fcm, "abc:DEF_123-x").validate().is_ok());
        assert!(token(Platform::Fcm, "has space").validate().is_err());
        let mut t = token(Platform::Fcm, "x");
        t.app_id = "bad/app".into();
        assert_eq!(t.validate(), Err(TokenError::BadAppId));

        let t = token(Platform::Apns, &hex);
        let printed = format!("{t:?}");
        assert!(!printed.contains(&hex), "{printed}");
        assert!(printed.contains(&t.fingerprint()));
    }
}
