//! Configuration from a file's text, `RELAY_*` variables and `--set` overrides: a clear error
//! or a configuration that passed validation, never a panic.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use relay::config::Config;

#[derive(Arbitrary, Debug)]
struct Input {
    file: Option<String>,
    env: Vec<(Key, String)>,
    overrides: Vec<(String, String)>,
}

/// Variable names: mostly ones the relay knows, so values get past the name check.
#[derive(Arbitrary, Debug)]
enum Key {
    Known(u8),
    Any(String),
}

const KNOWN: &[&str] = &[
    "MODE",
    "LISTEN",
    "ADMIN_LISTEN",
    "DATA_DIR",
    "SHUTDOWN_GRACE",
    "PUBLIC_URL",
    "LIMITS__MAX_BODY_BYTES",
    "LIMITS__SEND_RATE_PER_S",
    "LIMITS__SEND_BURST",
    "LIMITS__MAX_RECIPIENTS",
    "LIMITS__IDLE_TIMEOUT",
    "LIMITS__PING_INTERVAL",
    "LIMITS__INBOUND_BYTES_PER_S",
    "LIMITS__SENDER_BYTES_PER_DAY",
    "LIMITS__MAX_CONNECTIONS",
    "RETENTION__INBOX",
    "RETENTION__ARCHIVE",
    "RETENTION__AUDIT",
    "RETENTION__IDEMPOTENCY",
    "STORAGE__BACKEND",
    "STORAGE__EMBEDDED__MEMTABLE_BYTES",
    "STORAGE__EMBEDDED__CACHE_BYTES",
    "STORAGE__SCYLLA__NODES",
    "STORAGE__SCYLLA__REPLICATION",
    "CLUSTER__NODE_ID",
    "CLUSTER__NATS_URL",
    "AUTH__AUDIENCE",
    "AUTH__LEEWAY",
    "AUTH__MAX_TOKEN_LIFETIME",
    "AT_REST__KEYS",
    "AT_REST__ACTIVE",
    "ADMIN__CREDENTIALS",
    "PUSH__APNS__TEAM_ID",
    "ACCESS__LOGOUT_CONFIRM_WITHIN",
    "TLS__CERT_FILE",
];

fuzz_target!(|input: Input| {
    let env = input.env.into_iter().take(16).map(|(k, v)| {
        let k = match k {
            Key::Known(i) => KNOWN[i as usize % KNOWN.len()].to_string(),
            Key::Any(k) => k,
        };
        (format!("RELAY_{k}"), v)
    });
    let overrides: Vec<_> = input.overrides.into_iter().take(8).collect();
    let file = input.file.as_deref().map(|text| ("relay.toml", text));
    if let Ok(config) = Config::parse(file, env, &overrides, Vec::new()) {
        let _ = config.retention();
        let _ = config.max_frame_bytes();
        let _ = config.origin_allowed("https://example.org");
    }
});
