//! Prometheus metrics: the catalogue (names, types, help, buckets) and the recorder.
//!
//! Metric names are recorded where events happen; this file is the one list of them
//! ([`CATALOGUE`]), documented in `dashboards/METRICS.md`. Every series is registered at start
//! (counters at zero, with their known label values), so `rate()` works from the first scrape
//! and dashboards never point at a series that does not exist yet. No label ever carries a user
//! or device id.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Kind of a catalogued metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Monotonic count.
    Counter,
    /// Current value.
    Gauge,
    /// Distribution with buckets.
    Histogram,
}

/// One metric: name, kind, label name and known label values, help.
pub type Entry = (
    &'static str,
    Kind,
    Option<(&'static str, &'static [&'static str])>,
    &'static str,
);

const HANDSHAKE_OUTCOMES: &[&str] = &[
    "ok",
    "missing_token",
    "malformed_token",
    "token_expired",
    "bad_signature",
    "wrong_audience",
    "bad_claims",
    "forbidden_origin",
    "bad_request",
    "over_capacity",
    "draining",
    "tls_failed",
    "upgrade_failed",
];
const REJECT_CODES: &[&str] = &[
    "too_large",
    "bad_recipients",
    "rate_limited",
    "unavailable",
    "shutting_down",
];
const FRAME_REASONS: &[&str] = &[
    "bad_json",
    "unknown_type",
    "bad_request",
    "bad_base64",
    "binary_not_supported",
    "too_big",
];
const PATHS: &[&str] = &["live", "replay"];
const STORE_OPS: &[&str] = &["commit", "write", "ack"];
const TABLES: &[&str] = &["archive", "inbox", "idempotency"];

/// Every metric the relay exports.
pub const CATALOGUE: &[Entry] = &[
    (
        "relay_build_info",
        Kind::Gauge,
        Some(("version", &[])),
        "Always 1; the label carries the relay version.",
    ),
    (
        "relay_connections",
        Kind::Gauge,
        None,
        "Open WebSocket sessions on this node.",
    ),
    (
        "relay_devices_online",
        Kind::Gauge,
        None,
        "Devices with a live session on this node.",
    ),
    (
        "relay_handshakes_total",
        Kind::Counter,
        Some(("outcome", HANDSHAKE_OUTCOMES)),
        "Upgrade attempts by outcome; every outcome but ok is a refusal before the upgrade.",
    ),
    (
        "relay_connections_displaced_total",
        Kind::Counter,
        None,
        "Sessions closed because the same device connected again.",
    ),
    (
        "relay_messages_accepted_total",
        Kind::Counter,
        None,
        "Messages durably stored and answered accepted.",
    ),
    (
        "relay_messages_duplicate_total",
        Kind::Counter,
        None,
        "Sends of an already accepted message id (answered accepted, duplicate).",
    ),
    (
        "relay_messages_rejected_total",
        Kind::Counter,
        Some(("code", REJECT_CODES)),
        "Sends answered rejected, by code.",
    ),
    (
        "relay_messages_delivered_total",
        Kind::Counter,
        Some(("path", PATHS)),
        "deliver frames written to devices, live or during inbox replay.",
    ),
    (
        "relay_messages_acked_total",
        Kind::Counter,
        None,
        "Inbox entries acknowledged by devices.",
    ),
    (
        "relay_accept_duration_seconds",
        Kind::Histogram,
        None,
        "Send received to accepted answered (includes the durable commit).",
    ),
    (
        "relay_delivery_duration_seconds",
        Kind::Histogram,
        Some(("path", PATHS)),
        "Accepted to acknowledged by a device; live: delivered on an open session.",
    ),
    (
        "relay_frames_rejected_total",
        Kind::Counter,
        Some(("reason", FRAME_REASONS)),
        "Client frames answered with an error, or closed as too big.",
    ),
    (
        "relay_idle_logoffs_total",
        Kind::Counter,
        None,
        "Sessions ended by the inactivity logoff.",
    ),
    (
        "relay_slow_consumer_disconnects_total",
        Kind::Counter,
        None,
        "Sessions closed because the device did not read fast enough.",
    ),
    (
        "relay_outbound_overflows_total",
        Kind::Counter,
        None,
        "Live deliveries that found a session's queue full (the message stays in the inbox).",
    ),
    (
        "relay_replay_duration_seconds",
        Kind::Histogram,
        None,
        "Inbox replay time at session start.",
    ),
    (
        "relay_replay_messages",
        Kind::Histogram,
        None,
        "Messages delivered by one inbox replay.",
    ),
    (
        "relay_store_ready",
        Kind::Gauge,
        None,
        "1 when the store takes writes, 0 when not.",
    ),
    (
        "relay_store_commit_duration_seconds",
        Kind::Histogram,
        None,
        "One writer batch: durable commit (embedded) or all its CQL phases (ScyllaDB).",
    ),
    (
        "relay_store_commit_batch_size",
        Kind::Histogram,
        None,
        "Appends per writer batch.",
    ),
    (
        "relay_store_errors_total",
        Kind::Counter,
        Some(("op", STORE_OPS)),
        "Store operations that failed.",
    ),
    (
        "relay_store_corrupt_rows_total",
        Kind::Counter,
        None,
        "Stored rows that failed authentication (tampering or a removed key); never delivered.",
    ),
    (
        "relay_retention_expired_rows_total",
        Kind::Counter,
        Some(("table", TABLES)),
        "Rows removed by retention expiry (embedded store; ScyllaDB expires by TTL).",
    ),
];

/// Installs the global recorder, registers the catalogue, and returns the `/metrics` renderer.
pub fn install() -> Result<PrometheusHandle, String> {
    // Accept and replay: sub-millisecond to seconds (a commit is an fsync or a CQL round trip).
    let latency = [
        0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0,
    ];
    // Delivery includes time a device spends offline: milliseconds to a day.
    let delivery = [
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0,
        86_400.0,
    ];
    let counts = [
        1.0, 2.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 2000.0, 10_000.0, 100_000.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("relay_delivery_duration_seconds".into()),
                &delivery,
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("relay_store_commit_batch_size".into()),
                &counts,
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full("relay_replay_messages".into()), &counts)
        })
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    register();
    Ok(handle)
}

fn register() {
    for &(name, kind, labels, help) in CATALOGUE {
        match kind {
            Kind::Counter => metrics::describe_counter!(name, help),
            Kind::Gauge => metrics::describe_gauge!(name, help),
            Kind::Histogram => metrics::describe_histogram!(name, help),
        }
        // Counters start at zero with every known label value; histograms appear with their
        // first sample, gauges are set below or by their owner.
        if kind == Kind::Counter {
            match labels {
                Some((label, values)) => {
                    for &v in values {
                        metrics::counter!(name, label => v).absolute(0);
                    }
                }
                None => metrics::counter!(name).absolute(0),
            }
        }
    }
    metrics::gauge!("relay_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    metrics::gauge!("relay_connections").set(0.0);
    metrics::gauge!("relay_devices_online").set(0.0);
    metrics::gauge!("relay_store_ready").set(1.0);
}
