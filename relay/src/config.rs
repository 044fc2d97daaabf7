//! Configuration: one typed [`Config`], loaded once at start from (lowest to highest precedence)
//! defaults, a TOML file, `RELAY_*` environment variables and command-line overrides, then
//! validated as a whole. Every problem is reported at once, before anything binds.
//!
//! Environment variables map onto keys with `__` between sections:
//! `RELAY_LIMITS__MAX_BODY_BYTES=65536` sets `[limits] max_body_bytes`. Values are read as TOML
//! scalars when they parse as such (numbers, booleans, arrays), as strings otherwise.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

pub use crate::ids::{Dur, YEAR_S, parse_duration};
pub use crate::store::scylla::ScyllaConfig;

/// A configuration problem; the process exits with code 64 (EX_USAGE).
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigError(pub Vec<String>);

/// Dev mode generates its own keys and stays on loopback; production requires real keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Zero-setup local mode.
    Dev,
    /// Refuses to start without configured keys.
    Production,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The relay's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Problems that did not stop the start (unknown `RELAY_*` variables), for the log.
    #[serde(skip)]
    pub warnings: Vec<String>,
    /// `dev` or `production`.
    pub mode: Mode,
    /// Public WebSocket + HTTP listener.
    pub listen: SocketAddr,
    /// Admin listener (metrics, health); keep it private.
    pub admin_listen: SocketAddr,
    /// Where the embedded store (and dev-mode keys) live.
    pub data_dir: PathBuf,
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// `tracing` filter, e.g. `info` or `relay=debug`.
    pub log_level: String,
    /// How long a drain may take on SIGTERM/SIGINT before remaining sessions are dropped.
    pub shutdown_grace: Dur,
    /// TLS for the public listener.
    pub tls: TlsConfig,
    /// Device authentication.
    pub auth: AuthConfig,
    /// Encryption at rest.
    pub at_rest: AtRestConfig,
    /// Sizes, rates and caps.
    pub limits: LimitsConfig,
    /// Connection liveness and logoff.
    pub session: SessionConfig,
    /// How long data is kept.
    pub retention: RetentionConfig,
    /// Which store, and how to reach it.
    pub storage: StorageConfig,
    /// This node's id (0-31), unique among nodes sharing a store; part of every sequence number.
    /// `"auto"` (ScyllaDB backend) leases a free one from the database at start.
    pub node_id: NodeId,
    /// APNs / FCM wake-ups and urgent pages (off unless a provider is configured).
    pub push: PushConfig,
    /// Cluster mode: many nodes on a NATS bus (off unless `cluster.nats` lists a server).
    pub cluster: ClusterConfig,
    /// Remote logout and failed-login limits.
    pub access: AccessConfig,
    /// Admin API credentials.
    pub admin: AdminConfig,
    /// The audit trail's keys and checkpoints.
    pub audit: AuditConfig,
}

/// The audit trail: the keys that make it evidence, and where its checkpoints go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// `kid:base64key` entries, comma-separated (HMAC-SHA256 keys, 32 bytes, held outside the
    /// database and apart from the at-rest keys).
    pub keys: Option<String>,
    /// The same, from a file.
    pub keys_file: Option<PathBuf>,
    /// Key id that keys new records and checkpoints.
    pub active: Option<String>,
    /// How often a checkpoint of the chain heads is written.
    pub checkpoint_interval: Dur,
    /// Append-only file the checkpoints go to (besides the log); default
    /// `<data_dir>/audit-checkpoints.jsonl`.
    pub checkpoint_file: Option<PathBuf>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            keys: None,
            keys_file: None,
            active: None,
            checkpoint_interval: Dur::secs(300),
            checkpoint_file: None,
        }
    }
}

/// Remote logout and failed-login protection.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// How long a logged-out session waits for `logout_ack` before it closes.
    pub logout_ack_wait: Dur,
    /// A logout not confirmed within this time counts as overdue (devices view, metric).
    pub logout_confirm_within: Dur,
    /// Failed upgrades per client IP within `failed_auth_window` before `429`.
    pub failed_auth_per_ip: u32,
    /// Failed upgrades per claimed user within `failed_auth_window` before `429`.
    pub failed_auth_per_account: u32,
    /// The window of the failed-login limits.
    pub failed_auth_window: Dur,
    /// Header a trusted proxy sets to the client's IP (`Fly-Client-IP` on Fly.io, or
    /// `X-Forwarded-For`); read only on connections from `trusted_proxies`.
    pub client_ip_header: Option<String>,
    /// Proxies (CIDRs) whose `client_ip_header` is believed. Of a comma-separated list, the
    /// right-most address that is not itself a trusted proxy is the client.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

impl Default for AccessConfig {
    fn default() -> Self {
        AccessConfig {
            logout_ack_wait: Dur::secs(10),
            logout_confirm_within: Dur::secs(24 * 3600),
            failed_auth_per_ip: 30,
            failed_auth_per_account: 10,
            failed_auth_window: Dur::secs(300),
            client_ip_header: None,
            trusted_proxies: Vec::new(),
        }
    }
}

/// Admin API credentials.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Who may call the admin API; see `relay admin-credential`.
    pub credentials: Vec<AdminCredential>,
}

/// One admin API credential: a bearer token, stored here only as its SHA-256.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminCredential {
    /// Name, recorded as the actor in the audit trail.
    pub name: String,
    /// `support`, `org_admin` or `account_service`.
    pub role: AdminRole,
    /// `org_admin` only: the organisation they administer.
    #[serde(default)]
    pub org: Option<String>,
    /// Hex SHA-256 of the bearer token.
    pub token_sha256: String,
}

/// What an admin credential may do (see README, "Admin API").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminRole {
    /// Support staff: devices, logout, presence and audit queries; no lock.
    Support,
    /// An organisation's admin: everything, for users of their organisation only.
    OrgAdmin,
    /// The platform's account service: logout (password change), lock, unlock, devices.
    AccountService,
}

impl AdminRole {
    /// Name as configured.
    pub fn name(self) -> &'static str {
        match self {
            AdminRole::Support => "support",
            AdminRole::OrgAdmin => "org_admin",
            AdminRole::AccountService => "account_service",
        }
    }
}

/// How a node gets its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeId {
    /// Configured (0-31).
    Fixed(u8),
    /// Leased from the shared database at start, renewed while the node runs.
    Auto,
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u8),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) => Ok(NodeId::Fixed(n)),
            Raw::Text(t) if t == "auto" => Ok(NodeId::Auto),
            Raw::Text(t) => t.parse().map(NodeId::Fixed).map_err(|_| {
                serde::de::Error::custom(format!("node_id `{t}` is not 0-31 or \"auto\""))
            }),
        }
    }
}

/// Cluster mode. See ARCHITECTURE.md, "Cluster".
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// NATS server URLs (`nats://host:4222`); empty = single node, no bus.
    pub nats: Vec<String>,
    /// Subject prefix, so several relay deployments can share one NATS.
    pub subject_prefix: String,
    /// How often a node announces itself.
    pub heartbeat: Dur,
    /// A node not heard from for this long counts as dead: its devices are offline.
    pub node_timeout: Dur,
    /// While the bus is down, how often sessions re-read their inbox for messages that
    /// other nodes stored.
    pub inbox_check: Dur,
    /// Bus publications that may wait while NATS is slow or away; beyond this they are dropped
    /// (the messages are stored; sessions catch up from the inbox when the bus is back).
    pub publish_queue: usize,
    /// On SIGTERM, connected devices are told to reconnect spread over this time.
    pub drain_spread: Dur,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            nats: Vec::new(),
            subject_prefix: "relay".into(),
            heartbeat: Dur::secs(1),
            node_timeout: Dur::secs(3),
            inbox_check: Dur::secs(2),
            publish_queue: 65_536,
            drain_spread: Dur::secs(2),
        }
    }
}

impl ClusterConfig {
    /// Whether cluster mode is on.
    pub fn enabled(&self) -> bool {
        !self.nats.is_empty()
    }
}

/// Wake-ups, urgent pages and the provider credentials.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushConfig {
    /// Wake-ups for one device within this window coalesce into one push.
    pub coalesce_window: Dur,
    /// An urgent message not acknowledged within this time is pushed again.
    pub urgent_ack_timeout: Dur,
    /// How many times an unacknowledged urgent message is pushed again.
    pub urgent_repeats: u32,
    /// Non-urgent wake-ups that may wait for a worker; the oldest are dropped beyond this.
    pub queue_capacity: usize,
    /// Pushes in flight at once.
    pub workers: usize,
    /// Tries per push (429/5xx/timeouts are retried with backoff).
    pub max_attempts: u32,
    /// Provider request timeout.
    pub request_timeout: Dur,
    /// Bundle ids / package names devices may register (empty: any).
    pub app_ids: Vec<String>,
    /// Apple Push Notification service.
    pub apns: Option<ApnsSettings>,
    /// Firebase Cloud Messaging (HTTP v1).
    pub fcm: Option<FcmSettings>,
}

/// APNs token-based authentication and endpoints.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApnsSettings {
    /// The `.p8` signing key from Apple's developer portal.
    pub key_file: PathBuf,
    /// Its key id.
    pub key_id: String,
    /// Apple developer team id.
    pub team_id: String,
    /// Production endpoint.
    #[serde(default = "apns_production")]
    pub production_url: String,
    /// Sandbox endpoint (development builds).
    #[serde(default = "apns_sandbox")]
    pub sandbox_url: String,
    /// PEM trust roots instead of the bundled Mozilla roots (tests, TLS-inspecting proxies).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// HTTP/2 connections per endpoint.
    #[serde(default = "two")]
    pub connections: usize,
    /// The app holds Apple's critical-alerts entitlement (urgent pages use `critical`).
    #[serde(default)]
    pub critical_entitlement: bool,
    /// How long Apple keeps an undeliverable push (`apns-expiration`).
    #[serde(default = "one_hour")]
    pub expiration: Dur,
}

/// How FCM messages are built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FcmStyleSetting {
    /// Data messages only; the app shows what it decrypts.
    #[default]
    Data,
    /// Data plus a fixed, localizable notification.
    Notification,
}

/// FCM HTTP v1 with a service account.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FcmSettings {
    /// Google service-account JSON key (its `token_uri` is the OAuth endpoint).
    pub service_account_file: PathBuf,
    /// FCM endpoint.
    #[serde(default = "fcm_base")]
    pub base_url: String,
    /// PEM trust roots instead of the bundled Mozilla roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// HTTP/2 connections.
    #[serde(default = "two")]
    pub connections: usize,
    /// How long FCM keeps an undeliverable message.
    #[serde(default = "one_hour")]
    pub ttl: Dur,
    /// `data` or `notification`.
    #[serde(default)]
    pub style: FcmStyleSetting,
}

fn apns_production() -> String {
    push::apns::PRODUCTION_URL.into()
}
fn apns_sandbox() -> String {
    push::apns::SANDBOX_URL.into()
}
fn fcm_base() -> String {
    push::fcm::BASE_URL.into()
}
fn two() -> usize {
    2
}
fn one_hour() -> Dur {
    Dur::secs(3600)
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            coalesce_window: Dur::secs(30),
            urgent_ack_timeout: Dur::secs(30),
            urgent_repeats: 3,
            queue_capacity: 10_000,
            workers: 256,
            max_attempts: 5,
            request_timeout: Dur::secs(10),
            app_ids: Vec::new(),
            apns: None,
            fcm: None,
        }
    }
}

impl PushConfig {
    /// Whether any provider is configured.
    pub fn enabled(&self) -> bool {
        self.apns.is_some() || self.fcm.is_some()
    }
}

/// Storage backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// fjall under `data_dir` (one node).
    Embedded,
    /// A ScyllaDB (or Cassandra) cluster.
    Scylla,
}

/// Store selection.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `embedded` or `scylla`.
    pub backend: Backend,
    /// Embedded store settings, used when `backend = "embedded"`.
    pub embedded: EmbeddedConfig,
    /// ScyllaDB settings, used when `backend = "scylla"`.
    pub scylla: ScyllaConfig,
}

/// The embedded store's memory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedConfig {
    /// Block cache for reads, shared by every table.
    pub cache_bytes: u64,
    /// Write buffer (memtable) of each of the nine tables; fixed when a table is created.
    pub memtable_bytes: u64,
    /// Time without writes after which the write buffers are written out, and once more after
    /// which their memory is released.
    pub idle_flush: Dur,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        EmbeddedConfig {
            cache_bytes: 32 << 20,
            memtable_bytes: 8 << 20,
            idle_flush: Dur::secs(30),
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: Backend::Embedded,
            embedded: EmbeddedConfig::default(),
            scylla: ScyllaConfig::default(),
        }
    }
}

/// TLS certificate and key (PEM). Both or neither.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Certificate chain.
    pub cert_file: Option<PathBuf>,
    /// Private key.
    pub key_file: Option<PathBuf>,
}

/// Token verification.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Public keys (SPKI PEM, Ed25519 or P-256), inline. Several keys allow rotation.
    pub public_keys: Option<String>,
    /// Public keys from a file.
    pub public_keys_file: Option<PathBuf>,
    /// Required `aud` claim.
    pub audience: String,
    /// Clock skew tolerated on `exp` and `nbf` (`iat`: `access::ISSUER_SKEW_S`).
    pub leeway: Dur,
    /// Longest token lifetime (`exp - iat`) accepted.
    pub max_token_lifetime: Dur,
    /// Browser origins allowed to connect. `scheme://host:*` allows any port.
    pub allowed_origins: Vec<String>,
}

/// At-rest keyring.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AtRestConfig {
    /// `kid:base64key` entries, comma-separated.
    pub keys: Option<String>,
    /// The same, from a file.
    pub keys_file: Option<PathBuf>,
    /// Key id that seals new data.
    pub active: Option<String>,
}

/// Limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest decoded message body.
    pub max_body_bytes: usize,
    /// Most recipient users per message.
    pub max_recipients: usize,
    /// Most simultaneous connections (TCP) on the public listener.
    pub max_connections: usize,
    /// Most simultaneous connections from one client address (an IPv6 /64 counts as one).
    pub max_connections_per_ip: usize,
    /// Sustained sends per second per device.
    pub send_rate_per_s: f64,
    /// Sends a device may burst above its rate.
    pub send_burst: u32,
    /// Deliveries queued per connection before it counts as a slow consumer.
    pub outbound_queue: usize,
    /// Sends per connection awaiting durability before the relay stops reading from it.
    pub max_pipelined_sends: usize,
    /// Time allowed for TLS, HTTP request and upgrade.
    pub handshake_timeout: Dur,
    /// Time a write to a device may take before it counts as a slow consumer.
    pub write_timeout: Dur,
    /// Protocol errors tolerated per minute before closing with 1008.
    pub max_errors_per_minute: u32,
    /// Urgent messages per device per minute (tokens with the `urgent` claim only).
    pub urgent_per_minute: u32,
    /// Refused sends tolerated per minute before closing with 1008.
    pub max_refused_per_minute: u32,
    /// Bytes per second read from one connection; beyond, the relay reads slower.
    pub inbound_bytes_per_s: usize,
    /// Memory all inbox replays of this node may hold at once (pages read, not yet written).
    pub replay_memory: usize,
    /// Message bytes one account may store per UTC day, counted on each node.
    pub sender_bytes_per_day: u64,
}

/// Session liveness.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// Server ping interval; a connection silent for two intervals is closed.
    pub ping_interval: Dur,
    /// Inactivity logoff (HIPAA automatic logoff).
    pub idle_timeout: Dur,
}

/// Retention.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Ciphertext archive.
    pub archive: Dur,
    /// Unacknowledged inbox entries.
    pub inbox: Dur,
    /// Message-id deduplication window.
    pub idempotency: Dur,
    /// The access audit trail (HIPAA: six years; production mode refuses less).
    pub audit: Dur,
    /// How often expiry runs.
    pub sweep_interval: Dur,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            warnings: Vec::new(),
            mode: Mode::Dev,
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            data_dir: PathBuf::from("relay-data"),
            log_format: LogFormat::Text,
            log_level: "info,fjall=warn,lsm_tree=warn,scylla=warn".into(),
            shutdown_grace: Dur::secs(20),
            tls: TlsConfig::default(),
            auth: AuthConfig::default(),
            at_rest: AtRestConfig::default(),
            limits: LimitsConfig::default(),
            session: SessionConfig::default(),
            retention: RetentionConfig::default(),
            storage: StorageConfig::default(),
            node_id: NodeId::Fixed(0),
            push: PushConfig::default(),
            cluster: ClusterConfig::default(),
            access: AccessConfig::default(),
            admin: AdminConfig::default(),
            audit: AuditConfig::default(),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            public_keys: None,
            public_keys_file: None,
            audience: "relay".into(),
            leeway: Dur::secs(30),
            max_token_lifetime: Dur::secs(30 * 86_400),
            allowed_origins: Vec::new(),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_body_bytes: 256 * 1024,
            max_recipients: 100,
            max_connections: 50_000,
            max_connections_per_ip: 1_000,
            send_rate_per_s: 50.0,
            send_burst: 200,
            outbound_queue: 256,
            max_pipelined_sends: 64,
            handshake_timeout: Dur::secs(10),
            write_timeout: Dur::secs(10),
            max_errors_per_minute: 10,
            max_refused_per_minute: 100,
            urgent_per_minute: 10,
            inbound_bytes_per_s: 4 * 1024 * 1024,
            replay_memory: 64 * 1024 * 1024,
            sender_bytes_per_day: 1024 * 1024 * 1024,
        }
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            ping_interval: Dur::secs(25),
            idle_timeout: Dur::secs(2 * 3600),
        }
    }
}

/// The shortest audit retention production mode accepts: six years.
pub const AUDIT_RETENTION_MIN_S: u64 = 6 * YEAR_S;

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            archive: Dur::secs(6 * YEAR_S),
            inbox: Dur::secs(30 * 86_400),
            idempotency: Dur::secs(7 * 86_400),
            audit: Dur::secs(AUDIT_RETENTION_MIN_S),
            sweep_interval: Dur::secs(3600),
        }
    }
}

fn env_value(raw: &str) -> toml::Value {
    // Parse as the right-hand side of a TOML assignment; fall back to a plain string.
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

/// `Some(hint)` when `path` names no setting: the hint names the closest setting, if any.
fn unknown_key(path: &[String], value: toml::Value) -> Option<String> {
    let mut probe = toml::Table::new();
    set_path(&mut probe, path, value).ok()?;
    let err = Config::deserialize(toml::Value::Table(probe))
        .err()?
        .to_string();
    let rest = err.split("unknown field `").nth(1)?;
    let expected = rest.split("expected").nth(1).unwrap_or_default();
    let name = path.last()?;
    let closest = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|k| (edit_distance(name, k), k))
        .filter(|(d, k)| *d <= (k.len() / 3).max(2))
        .min();
    Some(match closest {
        Some((_, k)) => {
            let parents: Vec<&str> = path[..path.len() - 1].iter().map(String::as_str).collect();
            let key = parents
                .iter()
                .copied()
                .chain([k])
                .collect::<Vec<_>>()
                .join("__");
            format!(" (did you mean RELAY_{}?)", key.to_ascii_uppercase())
        }
        None => String::new(),
    })
}

/// Levenshtein distance, for "did you mean".
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty key")?;
    let mut t = table;
    for p in parents {
        let entry = t
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{p}` is not a section"))?;
    }
    t.insert(last.clone(), value);
    Ok(())
}

impl Config {
    /// Loads the configuration. `overrides` are `section.key=value` pairs from flags.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let mut errors = Vec::new();
        let file = file.and_then(|path| match std::fs::read_to_string(path) {
            Ok(text) => Some((path.display().to_string(), text)),
            Err(e) => {
                errors.push(format!("cannot read {}: {e}", path.display()));
                None
            }
        });
        let file = file
            .as_ref()
            .map(|(name, text)| (name.as_str(), text.as_str()));
        Self::parse(file, env, overrides, errors)
    }

    /// [`Config::load`] with the file's name and text given (the fuzz target `config` drives
    /// it), after `errors` found so far.
    #[doc(hidden)]
    pub fn parse(
        file: Option<(&str, &str)>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &[(String, String)],
        mut errors: Vec<String>,
    ) -> Result<Config, ConfigError> {
        let mut table = match file {
            Some((name, text)) => text.parse::<toml::Table>().unwrap_or_else(|e| {
                errors.push(format!("{name}: {e}"));
                toml::Table::new()
            }),
            None => toml::Table::new(),
        };
        let mut env: Vec<_> = env
            .into_iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("RELAY_")?.to_ascii_lowercase(), v)))
            .collect();
        env.sort();
        let mut warnings = Vec::new();
        for (key, raw) in env {
            let path: Vec<String> = key.split("__").map(str::to_string).collect();
            // Wrappers set RELAY_BIN, RELAY_HOME and the like: the environment is shared, so
            // a name the relay does not know is a warning; the file and flags stay strict.
            if let Some(hint) = unknown_key(&path, env_value(&raw)) {
                warnings.push(format!(
                    "RELAY_{} is not a relay setting and was ignored{hint}",
                    key.to_ascii_uppercase()
                ));
                continue;
            }
            if let Err(e) = set_path(&mut table, &path, env_value(&raw)) {
                errors.push(format!("RELAY_{}: {e}", key.to_ascii_uppercase()));
            }
        }
        for (key, raw) in overrides {
            let path: Vec<String> = key.split('.').map(str::to_string).collect();
            if let Err(e) = set_path(&mut table, &path, env_value(raw)) {
                errors.push(format!("{key}: {e}"));
            }
        }
        let config = match Config::deserialize(toml::Value::Table(table)) {
            Ok(c) => Some(c),
            Err(e) => {
                errors.push(e.to_string().trim().to_string());
                None
            }
        };
        match config {
            Some(mut c) if errors.is_empty() => {
                c.warnings = warnings;
                c.validate().map(|()| c)
            }
            _ => Err(ConfigError(errors)),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let mut e = Vec::new();
        self.check_deployment(&mut e);
        self.check_limits(&mut e);
        self.check_retention(&mut e);
        self.check_access(&mut e);
        self.check_push(&mut e);
        self.check_cluster(&mut e);
        self.check_storage(&mut e);
        if e.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(e))
        }
    }

    /// The mode and its keys, TLS, the listeners.
    fn check_deployment(&self, e: &mut Vec<String>) {
        if self.mode == Mode::Dev
            && !(self.listen.ip().is_loopback() && self.admin_listen.ip().is_loopback())
        {
            e.push("dev mode listens on loopback only; set mode = \"production\" with real keys to listen elsewhere".into());
        }
        if self.mode == Mode::Production {
            if self.auth.public_keys.is_none() && self.auth.public_keys_file.is_none() {
                e.push("production mode needs auth.public_keys or auth.public_keys_file".into());
            }
            if self.at_rest.keys.is_none() && self.at_rest.keys_file.is_none() {
                e.push("production mode needs at_rest.keys or at_rest.keys_file".into());
            }
            if self.at_rest.active.is_none() {
                e.push("production mode needs at_rest.active".into());
            }
            if self.audit.keys.is_none() && self.audit.keys_file.is_none() {
                e.push("production mode needs audit.keys or audit.keys_file".into());
            }
            if self.audit.active.is_none() {
                e.push("production mode needs audit.active".into());
            }
            if self.retention.audit.0 < Duration::from_secs(AUDIT_RETENTION_MIN_S) {
                e.push("production mode keeps the audit trail at least six years (retention.audit >= 6y)".into());
            }
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            e.push("tls.cert_file and tls.key_file go together".into());
        }
        if self.listen == self.admin_listen && self.listen.port() != 0 {
            e.push("listen and admin_listen must differ".into());
        }
    }

    /// Sizes, rates, caps and the periods that must be positive.
    fn check_limits(&self, e: &mut Vec<String>) {
        let l = &self.limits;
        if l.max_body_bytes == 0 || l.max_body_bytes > 16 * 1024 * 1024 {
            e.push("limits.max_body_bytes must be between 1 and 16 MiB".into());
        }
        // A replay page holds up to twice the largest body, base64-encoded.
        if l.replay_memory < 4 * l.max_body_bytes || l.replay_memory > u32::MAX as usize {
            e.push(
                "limits.replay_memory must be at least 4 x limits.max_body_bytes and below 4 GiB"
                    .into(),
            );
        }
        let m = &self.storage.embedded;
        if m.memtable_bytes < 1 << 20 || m.cache_bytes < 1 << 20 {
            e.push("storage.embedded.memtable_bytes and storage.embedded.cache_bytes must be at least 1 MiB".into());
        }
        if l.sender_bytes_per_day == 0 {
            e.push("limits.sender_bytes_per_day must be positive".into());
        }
        if l.max_recipients == 0 || l.max_recipients > 10_000 {
            e.push("limits.max_recipients must be between 1 and 10000".into());
        }
        if l.send_rate_per_s.is_nan() || l.send_rate_per_s <= 0.0 || l.send_burst == 0 {
            e.push("limits.send_rate_per_s and limits.send_burst must be positive".into());
        }
        for (name, v) in [
            ("limits.max_connections", l.max_connections),
            ("limits.max_connections_per_ip", l.max_connections_per_ip),
            ("limits.outbound_queue", l.outbound_queue),
            ("limits.max_pipelined_sends", l.max_pipelined_sends),
            ("limits.inbound_bytes_per_s", l.inbound_bytes_per_s),
        ] {
            if v == 0 {
                e.push(format!("{name} must be positive"));
            }
        }
        for (name, d) in [
            ("session.ping_interval", self.session.ping_interval),
            ("session.idle_timeout", self.session.idle_timeout),
            ("limits.handshake_timeout", l.handshake_timeout),
            ("limits.write_timeout", l.write_timeout),
            ("auth.max_token_lifetime", self.auth.max_token_lifetime),
            ("retention.sweep_interval", self.retention.sweep_interval),
            ("audit.checkpoint_interval", self.audit.checkpoint_interval),
            ("storage.embedded.idle_flush", m.idle_flush),
        ] {
            if d.0.is_zero() {
                e.push(format!("{name} must be positive"));
            }
        }
    }

    /// Retention: nothing that names a sequence number outlives the archive.
    fn check_retention(&self, e: &mut Vec<String>) {
        // The archive holds every accepted message, so it is where a restarted embedded store
        // finds the highest sequence number issued; nothing that names one may outlive it.
        let r = &self.retention;
        if r.archive.0 < r.inbox.0 || r.archive.0 < r.idempotency.0 {
            e.push(
                "retention.archive must be at least retention.inbox and retention.idempotency"
                    .into(),
            );
        }
    }

    /// Sign-in limits, logout waits and the admin credentials.
    fn check_access(&self, e: &mut Vec<String>) {
        let a = &self.access;
        for (name, d) in [
            ("access.logout_ack_wait", a.logout_ack_wait),
            ("access.logout_confirm_within", a.logout_confirm_within),
            ("access.failed_auth_window", a.failed_auth_window),
        ] {
            if d.0.is_zero() {
                e.push(format!("{name} must be positive"));
            }
        }
        if a.failed_auth_per_ip == 0 || a.failed_auth_per_account == 0 {
            e.push(
                "access.failed_auth_per_ip and access.failed_auth_per_account must be positive"
                    .into(),
            );
        }
        for c in &self.admin.credentials {
            let hex =
                c.token_sha256.len() == 64 && c.token_sha256.bytes().all(|b| b.is_ascii_hexdigit());
            if !hex {
                e.push(format!("admin credential `{}`: token_sha256 must be 64 hex digits (see `relay admin-credential`)", c.name));
            }
            if (c.role == AdminRole::OrgAdmin) != c.org.is_some() {
                e.push(format!(
                    "admin credential `{}`: `org` is required for org_admin and only for it",
                    c.name
                ));
            }
        }
    }

    /// Push providers and the pager.
    fn check_push(&self, e: &mut Vec<String>) {
        let p = &self.push;
        for (name, d) in [
            ("push.coalesce_window", p.coalesce_window),
            ("push.urgent_ack_timeout", p.urgent_ack_timeout),
            ("push.request_timeout", p.request_timeout),
        ] {
            if d.0.is_zero() {
                e.push(format!("{name} must be positive"));
            }
        }
        if p.queue_capacity == 0 || p.workers == 0 || p.max_attempts == 0 {
            e.push(
                "push.queue_capacity, push.workers and push.max_attempts must be positive".into(),
            );
        }
        if let Some(a) = &p.apns {
            if a.key_id.is_empty() || a.team_id.is_empty() {
                e.push("push.apns.key_id and push.apns.team_id are required".into());
            }
            if a.connections == 0 {
                e.push("push.apns.connections must be positive".into());
            }
        }
        if p.fcm.as_ref().is_some_and(|f| f.connections == 0) {
            e.push("push.fcm.connections must be positive".into());
        }
    }

    /// Cluster mode and node ids.
    fn check_cluster(&self, e: &mut Vec<String>) {
        let c = &self.cluster;
        if c.enabled() {
            if self.storage.backend != Backend::Scylla {
                e.push("cluster mode needs a shared store: storage.backend = \"scylla\"".into());
            }
            if c.subject_prefix.is_empty()
                || !c
                    .subject_prefix
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
            {
                e.push("cluster.subject_prefix must be letters, digits, '_' or '-'".into());
            }
            if c.heartbeat.0.is_zero() || c.node_timeout.0 <= c.heartbeat.0 {
                e.push("cluster.node_timeout must exceed a positive cluster.heartbeat".into());
            }
            if c.inbox_check.0.is_zero() || c.publish_queue == 0 {
                e.push("cluster.inbox_check and cluster.publish_queue must be positive".into());
            }
        }
        match self.node_id {
            NodeId::Fixed(n) if n >= crate::store::MAX_NODES => {
                e.push(format!("node_id must be below {}", crate::store::MAX_NODES));
            }
            NodeId::Auto if self.storage.backend != Backend::Scylla => {
                e.push("node_id = \"auto\" leases ids from the shared store: storage.backend = \"scylla\"".into());
            }
            _ => {}
        }
    }

    /// The ScyllaDB options and the browser origins.
    fn check_storage(&self, e: &mut Vec<String>) {
        if self.storage.backend == Backend::Scylla {
            let sc = &self.storage.scylla;
            if sc.nodes.is_empty() {
                e.push("storage.scylla.nodes must list at least one contact point".into());
            }
            if !sc
                .keyspace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
                || sc.keyspace.is_empty()
            {
                e.push("storage.scylla.keyspace must be letters, digits and underscores".into());
            }
            if crate::store::scylla::parse_consistency(&sc.consistency).is_none() {
                e.push(format!(
                    "storage.scylla.consistency `{}` is not a consistency level",
                    sc.consistency
                ));
            }
            if sc.replication.is_empty() || sc.replication.values().any(|&rf| rf == 0) {
                e.push("storage.scylla.replication needs at least one data centre with a factor above 0".into());
            }
            if sc.archive_shards == 0 {
                e.push("storage.scylla.archive_shards must be positive".into());
            }
            if sc.username.is_some() != sc.password.is_some() {
                e.push("storage.scylla.username and password go together".into());
            }
        }
        for origin in &self.auth.allowed_origins {
            if !(origin.starts_with("http://") || origin.starts_with("https://")) {
                e.push(format!(
                    "allowed origin `{origin}` must start with http:// or https://"
                ));
            }
        }
    }

    /// Where audit checkpoints are appended.
    pub fn checkpoint_file(&self) -> PathBuf {
        self.audit
            .checkpoint_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("audit-checkpoints.jsonl"))
    }

    /// Retention periods in the store's terms.
    pub fn retention(&self) -> crate::store::Retention {
        let r = &self.retention;
        crate::store::Retention {
            archive_ms: r.archive.0.as_millis() as u64,
            inbox_ms: r.inbox.0.as_millis() as u64,
            idempotency_ms: r.idempotency.0.as_millis() as u64,
            audit_ms: r.audit.0.as_millis() as u64,
        }
    }

    /// Largest WebSocket message the relay reads: a `send` frame carrying a maximal body
    /// (base64 grows it by 4/3) plus room for the envelope and recipients.
    pub fn max_frame_bytes(&self) -> usize {
        self.limits.max_body_bytes.div_ceil(3) * 4 + 1024 + self.limits.max_recipients * 140
    }

    /// Whether a browser `Origin` may connect.
    pub fn origin_allowed(&self, origin: &str) -> bool {
        let dev_defaults = ["http://localhost:*", "http://127.0.0.1:*", "http://[::1]:*"];
        let extra: &[&str] = if self.mode == Mode::Dev {
            &dev_defaults
        } else {
            &[]
        };
        self.auth
            .allowed_origins
            .iter()
            .map(String::as_str)
            .chain(extra.iter().copied())
            .any(|allowed| match allowed.strip_suffix(":*") {
                Some(base) => {
                    origin == base
                        || origin
                            .strip_prefix(base)
                            .and_then(|rest| rest.strip_prefix(':'))
                            .is_some_and(|port| port.bytes().all(|b| b.is_ascii_digit()))
                }
                None => origin == allowed,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(env: &[(&str, &str)], file: Option<&str>) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("relay.toml");
        if let Some(text) = file {
            std::fs::write(&path, text).expect("write");
        }
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::load(file.map(|_| path.as_path()), env, &[])
    }

    #[test]
    fn defaults_are_dev_on_loopback() {
        let c = load(&[], None).expect("defaults");
        assert_eq!(c.mode, Mode::Dev);
        assert!(c.listen.ip().is_loopback());
        assert_eq!(c.session.idle_timeout.0, Duration::from_secs(7200));
        assert_eq!(c.limits.max_body_bytes, 262_144);
    }

    #[test]
    fn env_overrides_file() {
        let c = load(
            &[
                ("RELAY_LIMITS__MAX_BODY_BYTES", "1000"),
                ("RELAY_SESSION__IDLE_TIMEOUT", "3s"),
                ("PATH", "/bin"),
            ],
            Some("[limits]\nmax_body_bytes = 5\nmax_recipients = 7\n"),
        )
        .expect("config");
        assert_eq!(c.limits.max_body_bytes, 1000);
        assert_eq!(c.limits.max_recipients, 7);
        assert_eq!(c.session.idle_timeout.0, Duration::from_secs(3));
    }

    #[test]
    fn reports_every_problem() {
        let err = load(
            &[("RELAY_MODE", "production"), ("RELAY_LISTEN", "0.0.0.0:80")],
            None,
        )
        .expect_err("incomplete production config");
        let text = err.to_string();
        assert!(text.contains("auth.public_keys"), "{text}");
        assert!(text.contains("at_rest.keys"), "{text}");
        assert!(load(&[("RELAY_LISTEN", "0.0.0.0:8080")], None).is_err());
        let c = load(
            &[
                ("RELAY_NO_SUCH_KEY", "1"),
                ("RELAY_LIMITS__MAX_BODY_BYTE", "9"),
            ],
            None,
        )
        .expect("unknown environment variables only warn");
        assert_eq!(c.limits.max_body_bytes, 256 * 1024);
        assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("did you mean RELAY_LIMITS__MAX_BODY_BYTES"))
        );
        assert!(
            load(&[], Some("no_such_key = 1")).is_err(),
            "the file stays strict"
        );
        assert!(load(&[("RELAY_LIMITS__MAX_BODY_BYTES", "lots")], None).is_err());
        assert!(load(&[("RELAY_SESSION__PING_INTERVAL", "soon")], None).is_err());
        // Replay memory must hold a page of the largest messages; a zero quota is a typo.
        let small = load(&[("RELAY_LIMITS__REPLAY_MEMORY", "1000000")], None)
            .expect_err("below 4 x max_body_bytes");
        assert!(
            small.to_string().contains("limits.replay_memory"),
            "{small}"
        );
        assert!(load(&[("RELAY_LIMITS__SENDER_BYTES_PER_DAY", "0")], None).is_err());
        let c = load(
            &[("RELAY_STORAGE__EMBEDDED__MEMTABLE_BYTES", "2097152")],
            None,
        )
        .expect("embedded store memory");
        assert_eq!(c.storage.embedded.memtable_bytes, 2 << 20);
        assert_eq!(c.storage.embedded.cache_bytes, 32 << 20);
        assert!(load(&[("RELAY_STORAGE__EMBEDDED__CACHE_BYTES", "1000")], None).is_err());
        assert_eq!(c.storage.embedded.idle_flush.0, Duration::from_secs(30));
        assert!(load(&[("RELAY_STORAGE__EMBEDDED__IDLE_FLUSH", "0s")], None).is_err());
    }

    #[test]
    fn node_ids_are_fixed_or_leased_and_cluster_mode_needs_the_shared_store() {
        let scylla = ("RELAY_STORAGE__BACKEND", "scylla");
        let c = load(&[("RELAY_NODE_ID", "7")], None).expect("fixed id");
        assert_eq!(c.node_id, NodeId::Fixed(7));
        let c = load(&[("RELAY_NODE_ID", "auto"), scylla], None).expect("leased id");
        assert_eq!(c.node_id, NodeId::Auto);
        assert!(load(&[("RELAY_NODE_ID", "auto")], None).is_err());
        assert!(load(&[("RELAY_NODE_ID", "32")], None).is_err());
        let nats = ("RELAY_CLUSTER__NATS", r#"["nats://127.0.0.1:4222"]"#);
        let err = load(&[nats], None).expect_err("cluster on the embedded store");
        assert!(err.to_string().contains("shared store"), "{err}");
        assert!(
            load(&[nats, scylla], None)
                .expect("cluster")
                .cluster
                .enabled()
        );
    }

    #[test]
    fn nothing_that_names_a_sequence_number_outlives_the_archive() {
        let err = load(&[("RELAY_RETENTION__ARCHIVE", "7d")], None).expect_err("archive < inbox");
        assert!(err.to_string().contains("retention.archive"), "{err}");
        load(
            &[
                ("RELAY_RETENTION__ARCHIVE", "6d"),
                ("RELAY_RETENTION__INBOX", "6d"),
            ],
            None,
        )
        .expect_err("archive < idempotency");
        load(&[("RELAY_RETENTION__ARCHIVE", "400d")], None).expect("archive ≥ both");
    }

    #[test]
    fn production_keeps_the_audit_trail_six_years_whatever_the_archive() {
        let c = load(&[("RELAY_RETENTION__ARCHIVE", "400d")], None).expect("dev");
        assert_eq!(c.retention().audit_ms, 6 * YEAR_S * 1000);
        let prod = |audit| {
            load(
                &[
                    ("RELAY_MODE", "production"),
                    ("RELAY_RETENTION__AUDIT", audit),
                ],
                None,
            )
            .expect_err("incomplete production config")
            .to_string()
        };
        assert!(prod("2191d").contains("retention.audit"));
        assert!(!prod("6y").contains("retention.audit"));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("6y"), Some(Duration::from_secs(6 * YEAR_S)));
        assert_eq!(parse_duration("2 weeks"), None);
    }

    #[test]
    fn origins_match_exactly_or_by_port_wildcard() {
        let mut c = Config::default();
        c.auth.allowed_origins = vec!["https://app.example.org".into()];
        assert!(c.origin_allowed("https://app.example.org"));
        assert!(!c.origin_allowed("https://app.example.org.evil.com"));
        assert!(c.origin_allowed("http://localhost:5173"));
        assert!(!c.origin_allowed("http://localhost.evil.com"));
        c.mode = Mode::Production;
        assert!(!c.origin_allowed("http://localhost:5173"));
    }
}
