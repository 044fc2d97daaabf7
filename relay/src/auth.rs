//! Device authentication: JWTs (EdDSA or ES256) checked before the WebSocket upgrade.
//!
//! Mobile apps send `Authorization: Bearer <jwt>`. Browsers cannot set headers on a WebSocket, so
//! they offer the subprotocols `relay.v1, bearer.<jwt>`; the relay answers with `relay.v1` only.
//! Tokens in the URL are never read (they end up in proxy and access logs).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv6Addr};

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hyper::HeaderMap;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};

use crate::access::model::ISSUER_SKEW_S;
use crate::protocol::{self, valid_id};
use crate::store::DeviceRef;

/// Claims of a device token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// User id.
    pub sub: String,
    /// Device id.
    pub dev: String,
    /// Organisation (practice) id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org: Option<String>,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Not before, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Session epoch: tokens minted before a revocation carry an older epoch.
    #[serde(default)]
    pub sep: u64,
    /// The device may send urgent messages (pages); the account service grants it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub urgent: bool,
    /// Audience.
    pub aud: String,
}

/// An authenticated device.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The device and its user.
    pub device: DeviceRef,
    /// Organisation, when the token names one (boxed: every open connection holds it).
    pub org: Option<Box<str>>,
    /// Token expiry, Unix seconds.
    pub expires_at: u64,
    /// Token issue time, Unix seconds: revocations refuse tokens issued before them.
    pub issued_at: u64,
    /// Session epoch of the token.
    pub epoch: u64,
    /// Whether the device may send urgent messages (the token's `urgent` claim).
    pub may_page: bool,
}

/// Why a token was refused. Codes are logged and counted, never the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token in the request.
    #[error("missing token")]
    Missing,
    /// Not a well-formed JWT, or an unsupported algorithm.
    #[error("malformed token")]
    Malformed,
    /// Past its expiry.
    #[error("token expired")]
    Expired,
    /// Before its `nbf`.
    #[error("token not yet valid")]
    NotYetValid,
    /// Signed by no configured key.
    #[error("bad signature")]
    BadSignature,
    /// Issued for another audience or issuer.
    #[error("wrong audience")]
    WrongAudience,
    /// Claims missing or invalid: ids, `iat` in the future, a lifetime over the maximum.
    #[error("invalid claims")]
    BadClaims,
}

impl AuthError {
    /// Stable code for metrics, logs and the 401 body.
    pub fn code(self) -> &'static str {
        match self {
            AuthError::Missing => "missing_token",
            AuthError::Malformed => "malformed_token",
            AuthError::Expired => "token_expired",
            AuthError::NotYetValid => "token_not_yet_valid",
            AuthError::BadSignature => "bad_signature",
            AuthError::WrongAudience => "wrong_audience",
            AuthError::BadClaims => "bad_claims",
        }
    }
}

/// Errors loading keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// No usable key in the PEM text.
    #[error("{0}")]
    Invalid(String),
}

/// Verifies device tokens against the configured public keys.
pub struct Verifier {
    keys: Vec<(Algorithm, DecodingKey)>,
    audience: String,
    leeway_s: u64,
    max_lifetime_s: u64,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("keys", &self.keys.len())
            .field("audience", &self.audience)
            .finish()
    }
}

/// Splits PEM text into its `-----BEGIN … END …-----` blocks.
fn pem_blocks(pem: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in pem.lines().map(str::trim) {
        if line.starts_with("-----BEGIN") {
            current = Some(String::new());
        }
        if let Some(block) = current.as_mut() {
            block.push_str(line);
            block.push('\n');
        }
        if line.starts_with("-----END") {
            blocks.extend(current.take());
        }
    }
    blocks
}

impl Verifier {
    /// Loads every public key (Ed25519 or P-256, SPKI PEM) from `pem`. Tokens may live at most
    /// `max_lifetime_s` (`exp - iat`); `leeway_s` is the clock skew allowed on `exp` and `nbf`.
    pub fn new(
        pem: &str,
        audience: &str,
        leeway_s: u64,
        max_lifetime_s: u64,
    ) -> Result<Self, KeyError> {
        let mut keys = Vec::new();
        for block in pem_blocks(pem) {
            if let Ok(key) = DecodingKey::from_ed_pem(block.as_bytes()) {
                keys.push((Algorithm::EdDSA, key));
            } else if let Ok(key) = DecodingKey::from_ec_pem(block.as_bytes()) {
                keys.push((Algorithm::ES256, key));
            } else {
                return Err(KeyError::Invalid(
                    "a PEM block is neither an Ed25519 nor a P-256 public key".into(),
                ));
            }
        }
        if keys.is_empty() {
            return Err(KeyError::Invalid("no public key found in PEM text".into()));
        }
        Ok(Verifier {
            keys,
            audience: audience.to_string(),
            leeway_s,
            max_lifetime_s,
        })
    }

    /// Checks a token and returns the identity it proves.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        self.verify_at(token, crate::store::now_ms() / 1000)
    }

    /// [`Verifier::verify`] at `now` (Unix seconds) for the checks of our own: a token issued
    /// in the future would outlive a revocation made before that time, and one that lives
    /// longer than the maximum would outlive its purpose.
    fn verify_at(&self, token: &str, now: u64) -> Result<Identity, AuthError> {
        let id = self.verify_signed(token)?;
        if id.issued_at > now.saturating_add(ISSUER_SKEW_S)
            || id.expires_at.saturating_sub(id.issued_at) > self.max_lifetime_s
        {
            return Err(AuthError::BadClaims);
        }
        Ok(id)
    }

    fn verify_signed(&self, token: &str) -> Result<Identity, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        if !matches!(header.alg, Algorithm::EdDSA | Algorithm::ES256) {
            return Err(AuthError::Malformed);
        }
        let mut validation = Validation::new(header.alg);
        validation.set_audience(&[&self.audience]);
        validation.leeway = self.leeway_s;
        validation.validate_nbf = true;
        validation.required_spec_claims = HashSet::from(["exp", "aud", "sub"].map(String::from));
        let mut last = AuthError::BadSignature;
        for (alg, key) in self.keys.iter().filter(|(alg, _)| *alg == header.alg) {
            debug_assert_eq!(*alg, header.alg);
            match jsonwebtoken::decode::<Claims>(token, key, &validation) {
                Ok(data) => return identity(data.claims),
                Err(e) => {
                    last = match e.kind() {
                        ErrorKind::InvalidSignature => AuthError::BadSignature,
                        ErrorKind::ExpiredSignature => AuthError::Expired,
                        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                        ErrorKind::InvalidAudience | ErrorKind::InvalidIssuer => {
                            AuthError::WrongAudience
                        }
                        ErrorKind::Json(_)
                        | ErrorKind::MissingRequiredClaim(_)
                        | ErrorKind::InvalidClaimFormat(_) => AuthError::BadClaims,
                        _ => AuthError::Malformed,
                    };
                    // Only a signature mismatch means another key might fit.
                    if last != AuthError::BadSignature {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }
}

fn identity(c: Claims) -> Result<Identity, AuthError> {
    if !valid_id(&c.sub) || !valid_id(&c.dev) || c.org.as_deref().is_some_and(|o| !valid_id(o)) {
        return Err(AuthError::BadClaims);
    }
    Ok(Identity {
        device: DeviceRef::new(&c.sub, &c.dev),
        org: c.org.map(String::into_boxed_str),
        expires_at: c.exp,
        issued_at: c.iat,
        epoch: c.sep,
        may_page: c.urgent,
    })
}

/// The user and device a token *claims*, read without verifying it: for failed-login limits
/// and the audit trail only, never for access. Ids that are not valid identifiers are dropped.
pub fn claimed(token: &str) -> (Option<String>, Option<String>) {
    #[derive(Deserialize)]
    struct Claimed {
        sub: Option<String>,
        dev: Option<String>,
    }
    let payload = token.split('.').nth(1).unwrap_or_default();
    let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok();
    let Some(c) = decoded.and_then(|b| serde_json::from_slice::<Claimed>(&b).ok()) else {
        return (None, None);
    };
    let ok = |id: Option<String>| id.filter(|i| valid_id(i));
    (ok(c.sub), ok(c.dev))
}

/// What a failed-login limit applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One client IP.
    Ip,
    /// One claimed user.
    Account,
}

impl Scope {
    /// Label for metrics and the audit trail.
    pub fn name(self) -> &'static str {
        match self {
            Scope::Ip => "ip",
            Scope::Account => "account",
        }
    }
}

struct Window {
    start: std::time::Instant,
    failures: u32,
    throttled: bool,
}

impl Window {
    fn new() -> Self {
        Window {
            start: std::time::Instant::now(),
            failures: 0,
            throttled: false,
        }
    }
}

/// The address limits count under: an IPv4 address, or an IPv6 /64 (what one subscriber
/// gets, so rotating through it gains nothing).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// Most keys a failure map tracks. Claimed accounts come from unverified tokens, so an
/// attacker can name endless ones; past this, new keys go uncounted until the next prune.
const MAX_TRACKED: usize = 100_000;

/// Counts failed upgrades per source address and per claimed account (fixed windows, this
/// node only). Only failures are ever refused: a correctly signed, valid token never consults
/// these limits, so nobody can lock a user out by failing in their name.
pub struct FailureLimits {
    per_ip: u32,
    per_account: u32,
    window: std::time::Duration,
    ips: dashmap::DashMap<IpAddr, Window>,
    accounts: dashmap::DashMap<String, Window>,
}

/// A refusal for too many failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttled {
    /// Which limit.
    pub scope: Scope,
    /// Seconds until the window ends.
    pub retry_after_s: u64,
    /// First refusal in this window (audited once per window, counted always).
    pub first: bool,
}

impl FailureLimits {
    /// Limits of `per_ip` and `per_account` failures per `window`.
    pub fn new(per_ip: u32, per_account: u32, window: std::time::Duration) -> Self {
        FailureLimits {
            per_ip,
            per_account,
            window,
            ips: Default::default(),
            accounts: Default::default(),
        }
    }

    fn bump<K: std::hash::Hash + Eq>(
        &self,
        map: &dashmap::DashMap<K, Window>,
        key: K,
        limit: u32,
        scope: Scope,
    ) -> Option<Throttled> {
        if map.len() >= MAX_TRACKED && !map.contains_key(&key) {
            return None;
        }
        let mut w = map.entry(key).or_insert_with(Window::new);
        if w.start.elapsed() >= self.window {
            *w = Window::new();
        }
        w.failures = w.failures.saturating_add(1);
        if w.failures <= limit {
            return None;
        }
        let first = !w.throttled;
        w.throttled = true;
        Some(Throttled {
            scope,
            retry_after_s: self
                .window
                .saturating_sub(w.start.elapsed())
                .as_secs()
                .max(1),
            first,
        })
    }

    /// Counts a failed upgrade from `ip` claiming `account`. `Some` when the source or the
    /// account is over its limit: the failure is then answered `429` and audited once per
    /// window instead of each time.
    pub fn failed(&self, ip: IpAddr, account: Option<&str>) -> Option<Throttled> {
        let by_ip = self.bump(&self.ips, source_key(ip), self.per_ip, Scope::Ip);
        let by_account = account.and_then(|a| {
            self.bump(
                &self.accounts,
                a.to_string(),
                self.per_account,
                Scope::Account,
            )
        });
        by_ip.or(by_account)
    }

    /// Forgets windows that ended (called periodically).
    pub fn prune(&self) {
        self.ips.retain(|_, w| w.start.elapsed() < self.window);
        self.accounts.retain(|_, w| w.start.elapsed() < self.window);
    }
}

/// Where the token came from; a browser must be answered with the subprotocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    /// `Authorization: Bearer`.
    Header,
    /// `Sec-WebSocket-Protocol: relay.v1, bearer.<jwt>`.
    Subprotocol,
}

/// Finds the token in an upgrade request.
pub fn token_from_headers(headers: &HeaderMap) -> Result<(&str, TokenSource), AuthError> {
    if let Some(value) = headers.get(hyper::header::AUTHORIZATION) {
        let value = value.to_str().map_err(|_| AuthError::Malformed)?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or(AuthError::Malformed)?;
        return Ok((token.trim(), TokenSource::Header));
    }
    for value in headers.get_all(hyper::header::SEC_WEBSOCKET_PROTOCOL) {
        let value = value.to_str().map_err(|_| AuthError::Malformed)?;
        for proto in value.split(',').map(str::trim) {
            if let Some(token) = proto.strip_prefix("bearer.") {
                return Ok((token, TokenSource::Subprotocol));
            }
        }
    }
    Err(AuthError::Missing)
}

/// Whether the request offers the `relay.v1` subprotocol.
pub fn offers_subprotocol(headers: &HeaderMap) -> bool {
    headers
        .get_all(hyper::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == protocol::SUBPROTOCOL)
}

/// A freshly generated Ed25519 key pair, PEM-encoded.
pub struct GeneratedKey {
    /// PKCS#8 v1 private key.
    pub private_pem: String,
    /// SPKI public key.
    pub public_pem: String,
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = B64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Generates an Ed25519 signing key for tokens.
pub fn generate_ed25519() -> Result<GeneratedKey, KeyError> {
    // PKCS#8 v1 (RFC 5208): OpenSSL 3, Python `cryptography` and Node refuse the v2 form.
    let doc = Ed25519KeyPair::generate_pkcs8v1(&aws_lc_rs::rand::SystemRandom::new())
        .map_err(|_| KeyError::Invalid("key generation failed".into()))?;
    let pair = Ed25519KeyPair::from_pkcs8(doc.as_ref())
        .map_err(|_| KeyError::Invalid("generated key unreadable".into()))?;
    // SubjectPublicKeyInfo for Ed25519 (RFC 8410): fixed prefix, then the 32-byte key.
    let mut spki = vec![
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    spki.extend_from_slice(pair.public_key().as_ref());
    Ok(GeneratedKey {
        private_pem: pem("PRIVATE KEY", doc.as_ref()),
        public_pem: pem("PUBLIC KEY", &spki),
    })
}

/// Signs device tokens (dev mode, tests, and operators' tooling).
pub struct Minter {
    key: EncodingKey,
    alg: Algorithm,
}

impl Minter {
    /// Loads an Ed25519 or P-256 PKCS#8 private key.
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        if let Ok(key) = EncodingKey::from_ed_pem(pem.as_bytes()) {
            // Reject keys that only parse as PEM but do not sign.
            let minter = Minter {
                key,
                alg: Algorithm::EdDSA,
            };
            if minter.sign_probe() {
                return Ok(minter);
            }
        }
        if let Ok(key) = EncodingKey::from_ec_pem(pem.as_bytes()) {
            let minter = Minter {
                key,
                alg: Algorithm::ES256,
            };
            if minter.sign_probe() {
                return Ok(minter);
            }
        }
        Err(KeyError::Invalid(
            "not an Ed25519 or P-256 PKCS#8 private key".into(),
        ))
    }

    fn sign_probe(&self) -> bool {
        jsonwebtoken::encode(&Header::new(self.alg), &serde_json::json!({}), &self.key).is_ok()
    }

    /// Signs `claims`.
    pub fn mint(&self, claims: &Claims) -> Result<String, KeyError> {
        jsonwebtoken::encode(&Header::new(self.alg), claims, &self.key)
            .map_err(|e| KeyError::Invalid(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: u64, aud: &str) -> Claims {
        Claims {
            sub: "alice".into(),
            dev: "phone".into(),
            org: Some("clinic".into()),
            iat: now() - 60,
            exp,
            nbf: None,
            urgent: false,
            sep: 3,
            aud: aud.into(),
        }
    }

    fn now() -> u64 {
        crate::store::now_ms() / 1000
    }

    #[test]
    fn verifies_own_tokens_and_rejects_the_rest() {
        let key = generate_ed25519().expect("key");
        let other = generate_ed25519().expect("key");
        let minter = Minter::from_pem(&key.private_pem).expect("minter");
        let forger = Minter::from_pem(&other.private_pem).expect("minter");
        let v = Verifier::new(&key.public_pem, "relay", 0, 86_400).expect("verifier");

        let id = v
            .verify(&minter.mint(&claims(now() + 60, "relay")).expect("mint"))
            .expect("valid");
        assert_eq!(id.device, DeviceRef::new("alice", "phone"));
        assert_eq!(id.epoch, 3);

        let check = |token: String| v.verify(&token).expect_err("must fail");
        assert_eq!(
            check(forger.mint(&claims(now() + 60, "relay")).expect("mint")),
            AuthError::BadSignature
        );
        assert_eq!(
            check(minter.mint(&claims(now() - 10, "relay")).expect("mint")),
            AuthError::Expired
        );
        assert_eq!(
            check(minter.mint(&claims(now() + 60, "other")).expect("mint")),
            AuthError::WrongAudience
        );
        assert_eq!(check("not.a.jwt".into()), AuthError::Malformed);
        let mut bad_id = claims(now() + 60, "relay");
        bad_id.sub = "has space".into();
        assert_eq!(
            check(minter.mint(&bad_id).expect("mint")),
            AuthError::BadClaims
        );
    }

    #[test]
    fn claimed_ids_are_read_without_trusting_them() {
        let key = generate_ed25519().expect("key");
        let t = Minter::from_pem(&key.private_pem)
            .expect("minter")
            .mint(&claims(now() - 10, "other"))
            .expect("mint");
        assert_eq!(claimed(&t), (Some("alice".into()), Some("phone".into())));
        assert_eq!(claimed("garbage"), (None, None));
    }

    #[test]
    fn failure_limits_throttle_per_ip_and_per_account() {
        let ip: IpAddr = [127, 0, 0, 9].into();
        let l = FailureLimits::new(3, 2, std::time::Duration::from_secs(60));
        for _ in 0..3 {
            assert_eq!(l.failed(ip, None), None);
        }
        let t = l.failed(ip, None).expect("throttled");
        assert_eq!((t.scope, t.first), (Scope::Ip, true));
        assert!(!l.failed(ip, None).expect("still").first);
        // An account attacked from many addresses.
        assert_eq!(l.failed([127, 0, 0, 10].into(), Some("bob")), None);
        assert_eq!(l.failed([127, 0, 0, 11].into(), Some("bob")), None);
        let t = l
            .failed([127, 0, 0, 12].into(), Some("bob"))
            .expect("throttled");
        assert_eq!(t.scope, Scope::Account);
        assert_eq!(l.failed([127, 0, 0, 13].into(), Some("carol")), None);
    }

    #[test]
    fn an_ipv6_subscriber_prefix_counts_as_one_source() {
        let l = FailureLimits::new(2, 100, std::time::Duration::from_secs(60));
        let a: IpAddr = "2001:db8:1:2::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("ip");
        assert_eq!(l.failed(a, None), None);
        assert_eq!(l.failed(b, None), None);
        assert!(l.failed(a, None).is_some());
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
        assert_eq!(source_key(mapped), IpAddr::from([10, 0, 0, 1]));
    }

    #[test]
    fn token_times_from_the_future_or_beyond_the_lifetime_are_refused() {
        let key = generate_ed25519().expect("key");
        let minter = Minter::from_pem(&key.private_pem).expect("minter");
        let v = Verifier::new(&key.public_pem, "relay", 30, 86_400).expect("verifier");
        let t = now();
        let mint = |iat: u64, exp: u64, nbf: Option<u64>| {
            let mut c = claims(exp, "relay");
            c.iat = iat;
            c.nbf = nbf;
            minter.mint(&c).expect("mint")
        };
        assert!(
            v.verify(&mint(t + ISSUER_SKEW_S, t + 3600, None)).is_ok(),
            "an issuer a little ahead"
        );
        // Further ahead would outlive a logout made before it (the leeway is for `exp`).
        assert_eq!(
            v.verify(&mint(t + ISSUER_SKEW_S + 2, t + 3600, None)).err(),
            Some(AuthError::BadClaims)
        );
        assert_eq!(
            v.verify(&mint(t + 120, t + 3600, None)).err(),
            Some(AuthError::BadClaims)
        );
        assert_eq!(
            v.verify(&mint(t, t + 2 * 86_400, None)).err(),
            Some(AuthError::BadClaims)
        );
        assert_eq!(
            v.verify(&mint(t, u64::MAX, None)).err(),
            Some(AuthError::BadClaims)
        );
        assert_eq!(
            v.verify(&mint(t, 10_000_000_000_000_000_000, None)).err(),
            Some(AuthError::BadClaims)
        );
        assert_eq!(
            v.verify(&mint(t, t + 3600, Some(t + 600))).err(),
            Some(AuthError::NotYetValid)
        );
        assert!(v.verify(&mint(t, t + 3600, Some(t - 1))).is_ok());
    }

    #[test]
    fn generated_keys_are_pkcs8_v1() {
        use base64::Engine as _;
        let key = generate_ed25519().expect("key");
        let b64: String = key
            .private_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        let der = B64.decode(b64).expect("base64");
        // SEQUENCE { INTEGER 0 (v1), AlgorithmIdentifier Ed25519, OCTET STRING { seed } }
        assert_eq!(der.len(), 48);
        assert_eq!(
            &der[..16],
            &[
                0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
                0x04, 0x20
            ]
        );
    }

    #[test]
    fn key_rotation_accepts_either_key() {
        let k1 = generate_ed25519().expect("key");
        let k2 = generate_ed25519().expect("key");
        let v = Verifier::new(
            &format!("{}{}", k1.public_pem, k2.public_pem),
            "relay",
            0,
            86_400,
        )
        .expect("verifier");
        for k in [&k1, &k2] {
            let t = Minter::from_pem(&k.private_pem)
                .expect("minter")
                .mint(&claims(now() + 60, "relay"))
                .expect("mint");
            v.verify(&t).expect("either key verifies");
        }
    }

    #[test]
    fn finds_token_in_header_or_subprotocol() {
        let mut h = HeaderMap::new();
        assert_eq!(token_from_headers(&h), Err(AuthError::Missing));
        h.insert(
            hyper::header::SEC_WEBSOCKET_PROTOCOL,
            "relay.v1, bearer.abc.def.ghi".parse().expect("header"),
        );
        assert_eq!(
            token_from_headers(&h),
            Ok(("abc.def.ghi", TokenSource::Subprotocol))
        );
        assert!(offers_subprotocol(&h));
        h.insert(
            hyper::header::AUTHORIZATION,
            "Bearer x.y.z".parse().expect("header"),
        );
        assert_eq!(token_from_headers(&h), Ok(("x.y.z", TokenSource::Header)));
    }
}
