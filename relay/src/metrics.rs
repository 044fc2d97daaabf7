//! Prometheus metrics: the catalogue (names, types, help, buckets) and the recorder.
//!
//! Metric names are recorded where events happen; this file is the one list of them
//! ([`CATALOGUE`]), documented in `dashboards/METRICS.md`. Every series is registered at start
//! (counters at zero, with their known label values), so `rate()` works from the first scrape
//! and dashboards never point at a series that does not exist yet. No label ever carries a user
//! or device id.

use std::sync::atomic::{AtomicBool, Ordering};

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

/// Label names of a metric, each with its known values.
pub type Labels = &'static [(&'static str, &'static [&'static str])];

/// One metric: name, kind, labels, help.
pub type Entry = (&'static str, Kind, Labels, &'static str);

const HANDSHAKE_OUTCOMES: &[&str] = &[
    "ok",
    "missing_token",
    "malformed_token",
    "token_expired",
    "token_not_yet_valid",
    "bad_signature",
    "wrong_audience",
    "bad_claims",
    "forbidden_origin",
    "bad_request",
    "over_capacity",
    "source_over_capacity",
    "timeout",
    "draining",
    "tls_failed",
    "upgrade_failed",
    "throttled",
    "store_unavailable",
    "account_locked",
    "revoked",
    "logged_out",
];
const REJECT_CODES: &[&str] = &[
    "too_large",
    "bad_recipients",
    "rate_limited",
    "urgent_not_allowed",
    "quota_exceeded",
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
    "invalid_utf8",
    "protocol_error",
];
const PATHS: &[&str] = &["live", "replay"];
const PROVIDERS: &[&str] = &["apns", "fcm"];
const PUSH_KINDS: &[&str] = &["wake", "urgent", "logout"];
const PUSH_OUTCOMES: &[&str] = &["delivered", "token_removed", "retried", "failed", "gave_up"];
const PUSH_DROPS: &[&str] = &["queue_full", "no_provider", "pager_backlog", "shutdown"];
const WAKEUP_RESULTS: &[&str] = &[
    "queued",
    "coalesced",
    "no_token",
    "no_provider",
    "store_error",
    "closed",
];
const ESCALATION_RESULTS: &[&str] = &["repaged", "acknowledged", "exhausted"];
const STORE_OPS: &[&str] = &["commit", "write", "ack"];
const TABLES: &[&str] = &["archive", "inbox", "idempotency", "audit"];
/// The audit event kinds (`audit::model::EventKind`, whose test holds them together).
pub(crate) const AUDIT_EVENTS: &[&str] = &[
    "connect",
    "disconnect",
    "idle_logoff",
    "auth_failed",
    "auth_throttled",
    "logout_requested",
    "logout_delivered",
    "logout_confirmed",
    "lock",
    "unlock",
    "admin_request",
];
const LOGOUT_REASONS: &[&str] = &[
    "password_changed",
    "lost_device",
    "admin",
    "locked",
    "security",
];

/// Every metric the relay exports.
pub const CATALOGUE: &[Entry] = &[
    (
        "relay_build_info",
        Kind::Gauge,
        &[("version", &[])],
        "Always 1; the label carries the relay version.",
    ),
    (
        "relay_connections",
        Kind::Gauge,
        &[],
        "Open WebSocket sessions on this node.",
    ),
    (
        "relay_devices_online",
        Kind::Gauge,
        &[],
        "Devices with a live session on this node.",
    ),
    (
        "relay_handshakes_total",
        Kind::Counter,
        &[("outcome", HANDSHAKE_OUTCOMES)],
        "Upgrade attempts by outcome; every outcome but ok is a refusal before the upgrade.",
    ),
    (
        "relay_connections_displaced_total",
        Kind::Counter,
        &[],
        "Sessions closed because the same device connected again.",
    ),
    (
        "relay_messages_accepted_total",
        Kind::Counter,
        &[],
        "Messages durably stored and answered accepted.",
    ),
    (
        "relay_messages_duplicate_total",
        Kind::Counter,
        &[],
        "Sends of an already accepted message id (answered accepted, duplicate).",
    ),
    (
        "relay_messages_rejected_total",
        Kind::Counter,
        &[("code", REJECT_CODES)],
        "Sends answered rejected, by code.",
    ),
    (
        "relay_messages_delivered_total",
        Kind::Counter,
        &[("path", PATHS)],
        "deliver frames written to devices, live or during inbox replay.",
    ),
    (
        "relay_messages_acked_total",
        Kind::Counter,
        &[],
        "Inbox entries acknowledged by devices.",
    ),
    (
        "relay_accept_duration_seconds",
        Kind::Histogram,
        &[],
        "Send received to accepted answered (includes the durable commit).",
    ),
    (
        "relay_delivery_duration_seconds",
        Kind::Histogram,
        &[("path", PATHS)],
        "Accepted to acknowledged by a device; live: delivered on an open session.",
    ),
    (
        "relay_frames_rejected_total",
        Kind::Counter,
        &[("reason", FRAME_REASONS)],
        "Client frames answered with an error, or closed as too big.",
    ),
    (
        "relay_idle_logoffs_total",
        Kind::Counter,
        &[],
        "Sessions ended by the inactivity logoff.",
    ),
    (
        "relay_process_resident_bytes",
        Kind::Gauge,
        &[],
        "Resident memory of the relay process (VmRSS), sampled at each scrape.",
    ),
    (
        "relay_allocator_allocated_bytes",
        Kind::Gauge,
        &[],
        "Bytes the relay's live objects hold (jemalloc stats.allocated), sampled at each scrape.",
    ),
    (
        "relay_allocator_resident_bytes",
        Kind::Gauge,
        &[],
        "Bytes of memory the allocator holds resident (jemalloc stats.resident): live objects, \
         free pages not yet returned, and its metadata.",
    ),
    (
        "relay_process_memory_limit_bytes",
        Kind::Gauge,
        &[],
        "Memory the process may use: the cgroup limit, or the machine's memory when there is none.",
    ),
    (
        "relay_process_open_fds",
        Kind::Gauge,
        &[],
        "Open file descriptors of the relay process (sockets included), sampled at each scrape.",
    ),
    (
        "relay_store_write_buffer_bytes",
        Kind::Gauge,
        &[],
        "Embedded store: bytes its tables hold in memory before writing them to disk.",
    ),
    (
        "relay_store_cache_bytes",
        Kind::Gauge,
        &[],
        "Embedded store: bytes in its block cache (at most storage.embedded.cache_bytes).",
    ),
    (
        "relay_replay_memory_bytes",
        Kind::Gauge,
        &[],
        "Memory inbox replays on this node hold now (bounded by limits.replay_memory).",
    ),
    (
        "relay_sender_quota_untracked_total",
        Kind::Counter,
        &[],
        "Sends not counted against a daily quota because the node tracked 200,000 accounts already.",
    ),
    (
        "relay_device_cache_users",
        Kind::Gauge,
        &[],
        "Users whose device lists the store's writer holds in memory (bounded).",
    ),
    (
        "relay_inbound_paused_total",
        Kind::Counter,
        &[],
        "Times the relay paused reading from a device that sent more than its byte budget.",
    ),
    (
        "relay_slow_consumer_disconnects_total",
        Kind::Counter,
        &[],
        "Sessions closed because the device did not read fast enough.",
    ),
    (
        "relay_outbound_overflows_total",
        Kind::Counter,
        &[],
        "Live deliveries that found a session's queue full (the message stays in the inbox).",
    ),
    (
        "relay_replay_duration_seconds",
        Kind::Histogram,
        &[],
        "Inbox replay time at session start.",
    ),
    (
        "relay_replay_messages",
        Kind::Histogram,
        &[],
        "Messages delivered by one inbox replay.",
    ),
    (
        "relay_store_disk_full",
        Kind::Gauge,
        &[],
        "Embedded store: 1 while writes fail and the data directory has less free space than it needs to reopen the store (the larger of 32 MiB and two write buffers); the store reopens by itself once there is room.",
    ),
    (
        "relay_store_reopens_total",
        Kind::Counter,
        &[],
        "Embedded store: times the store was reopened from disk after a failed write (a full disk, an I/O error) made it refuse writes.",
    ),
    (
        "relay_store_ready",
        Kind::Gauge,
        &[],
        "1 when the store takes writes, 0 when not.",
    ),
    (
        "relay_store_commit_duration_seconds",
        Kind::Histogram,
        &[],
        "One writer batch: durable commit (embedded) or all its CQL phases (ScyllaDB).",
    ),
    (
        "relay_store_commit_batch_size",
        Kind::Histogram,
        &[],
        "Appends per writer batch.",
    ),
    (
        "relay_store_errors_total",
        Kind::Counter,
        &[("op", STORE_OPS)],
        "Store operations that failed.",
    ),
    (
        "relay_store_corrupt_rows_total",
        Kind::Counter,
        &[],
        "Stored rows that failed authentication (tampering); never delivered.",
    ),
    (
        "relay_last_seen_dropped_total",
        Kind::Counter,
        &[],
        "Last-seen times not written because 100,000 devices were already waiting for a stalled store; each is rewritten at the device's next connect.",
    ),
    (
        "relay_store_unknown_key_rows_total",
        Kind::Counter,
        &[],
        "Stored rows sealed with an at-rest key this node does not hold; kept and read again at every replay.",
    ),
    (
        "relay_store_cql_requests_total",
        Kind::Counter,
        &[],
        "CQL requests sent to ScyllaDB, as the driver counts them, sampled once a second (stays 0 on the embedded store).",
    ),
    (
        "relay_store_cql_errors_total",
        Kind::Counter,
        &[],
        "CQL requests that failed after the driver's retries, sampled once a second (ScyllaDB).",
    ),
    (
        "relay_store_cql_retries_total",
        Kind::Counter,
        &[],
        "CQL requests the driver's retry policy sent again, sampled once a second (ScyllaDB).",
    ),
    (
        "relay_store_redelivered_total",
        Kind::Counter,
        &[],
        "Resent messages another node had stored, delivered again from the store (ScyllaDB; that node may have died before its fan-out).",
    ),
    (
        "relay_retention_expired_rows_total",
        Kind::Counter,
        &[("table", TABLES)],
        "Rows removed by retention expiry (embedded store; ScyllaDB expires by TTL).",
    ),
    (
        push::metric::PUSHES,
        Kind::Counter,
        &[
            ("provider", PROVIDERS),
            ("kind", PUSH_KINDS),
            ("outcome", PUSH_OUTCOMES),
        ],
        "Provider answers to pushes: delivered, token_removed (dead token), retried (429/5xx/transport), failed (permanent), gave_up (retries exhausted).",
    ),
    (
        push::metric::DURATION,
        Kind::Histogram,
        &[("provider", PROVIDERS)],
        "Push request round trip to APNs or FCM.",
    ),
    (
        push::metric::QUEUE_DEPTH,
        Kind::Gauge,
        &[],
        "Pushes waiting for a worker (non-urgent ones are bounded by push.queue_capacity).",
    ),
    (
        push::metric::TOKENS_REMOVED,
        Kind::Counter,
        &[("provider", PROVIDERS)],
        "Push tokens deleted because the provider reported them dead (410, BadDeviceToken, UNREGISTERED, ...).",
    ),
    (
        push::metric::DROPPED,
        Kind::Counter,
        &[("reason", PUSH_DROPS)],
        "Wake-ups dropped before reaching a provider (never urgent pages).",
    ),
    (
        "relay_bus_connected",
        Kind::Gauge,
        &[],
        "Cluster mode: 1 while this node is connected to NATS.",
    ),
    (
        "relay_bus_published_total",
        Kind::Counter,
        &[],
        "Publications sent to NATS (deliveries and control messages).",
    ),
    (
        "relay_bus_publish_dropped_total",
        Kind::Counter,
        &[],
        "Publications dropped (queue full or NATS away); sessions catch up from the inbox.",
    ),
    (
        "relay_bus_publish_duration_seconds",
        Kind::Histogram,
        &[],
        "Time to hand one publication to the NATS connection.",
    ),
    (
        "relay_bus_received_total",
        Kind::Counter,
        &[],
        "Deliveries received from other nodes over NATS.",
    ),
    (
        "relay_bus_rejected_total",
        Kind::Counter,
        &[],
        "Bus messages that did not open with the keyring or did not parse (dropped).",
    ),
    (
        "relay_bus_delivery_duration_seconds",
        Kind::Histogram,
        &[],
        "Cross-node delivery: publication on the storing node to hand-off to this node's hub.",
    ),
    (
        "relay_bus_disconnects_total",
        Kind::Counter,
        &[],
        "Times the NATS connection was lost.",
    ),
    (
        "relay_bus_resyncs_total",
        Kind::Counter,
        &[],
        "Resync requests from other nodes after their bus trouble (sessions re-read inboxes).",
    ),
    (
        "relay_bus_inbox_checks_total",
        Kind::Counter,
        &[],
        "Periodic inbox re-reads while the bus is down.",
    ),
    (
        "relay_bus_slow_consumer_total",
        Kind::Counter,
        &[],
        "NATS dropped deliveries for this node because it fell behind (sessions re-read inboxes).",
    ),
    (
        "relay_presence_remote_devices",
        Kind::Gauge,
        &[],
        "Devices connected to other nodes, as this node knows them.",
    ),
    (
        "relay_cluster_nodes",
        Kind::Gauge,
        &[],
        "Live nodes this node knows of, itself included.",
    ),
    (
        "relay_cluster_nodes_lost_total",
        Kind::Counter,
        &[],
        "Nodes declared dead after cluster.node_timeout without a heartbeat.",
    ),
    (
        "relay_cluster_node_id_conflicts_total",
        Kind::Counter,
        &[],
        "Heartbeats from another live node with this node's node_id (a misconfiguration).",
    ),
    (
        "relay_auth_throttled_total",
        Kind::Counter,
        &[("scope", &["ip", "account"])],
        "Upgrades refused with 429 after too many failed logins, by the limit that applied.",
    ),
    (
        "relay_logouts_requested_total",
        Kind::Counter,
        &[("reason", LOGOUT_REASONS)],
        "Devices logged out remotely (admin API), by reason.",
    ),
    (
        "relay_logouts_delivered_total",
        Kind::Counter,
        &[("via", &["live", "reconnect"])],
        "`logout` frames sent: to a live session, or at the reconnect of revoked credentials.",
    ),
    (
        "relay_logouts_confirmed_total",
        Kind::Counter,
        &[],
        "Logouts the device confirmed with `logout_ack` (it wiped its data).",
    ),
    (
        "relay_logouts_pending",
        Kind::Gauge,
        &[],
        "Logouts requested and not confirmed yet (cluster-wide, read from the store).",
    ),
    (
        "relay_logouts_overdue",
        Kind::Gauge,
        &[],
        "Pending logouts older than access.logout_confirm_within: a lost device that has not confirmed its wipe.",
    ),
    (
        "relay_audit_events_total",
        Kind::Counter,
        &[("event", AUDIT_EVENTS)],
        "Access events recorded in the audit trail, by kind.",
    ),
    (
        "relay_audit_records_written_total",
        Kind::Counter,
        &[],
        "Audit records stored (chained).",
    ),
    (
        "relay_audit_dropped_total",
        Kind::Counter,
        &[],
        "Audit events dropped because the audit queue was full (the store was away too long).",
    ),
    (
        "relay_audit_store_errors_total",
        Kind::Counter,
        &[],
        "Failed audit writes (retried until they succeed).",
    ),
    (
        "relay_audit_checkpoints_total",
        Kind::Counter,
        &[],
        "Audit checkpoints written (MAC'd chain heads, to the checkpoint file and the log).",
    ),
    (
        "relay_audit_checkpoint_errors_total",
        Kind::Counter,
        &[],
        "Checkpoints the checkpoint file did not take (the log has them; the heads go into the next one).",
    ),
    (
        "relay_audit_last_checkpoint_timestamp_seconds",
        Kind::Gauge,
        &[],
        "When this node last wrote an audit checkpoint (0 until its first).",
    ),
    (
        "relay_last_backup_timestamp_seconds",
        Kind::Gauge,
        &[],
        "Backup point of the newest backup recorded in the store (`relay backup`), re-read every minute; 0 if none.",
    ),
    (
        "relay_backup_failures_total",
        Kind::Counter,
        &[],
        "Embedded-store backups that failed (`relay backup` through this relay).",
    ),
    (
        "relay_admin_requests_total",
        Kind::Counter,
        &[("status", &["2xx", "401", "403", "4xx", "5xx"])],
        "Admin API calls by status class.",
    ),
    (
        push::metric::AUTH_REFRESHES,
        Kind::Counter,
        &[("provider", PROVIDERS)],
        "Provider credentials issued: APNs provider JWTs signed, FCM OAuth tokens fetched.",
    ),
    (
        "relay_push_wakeups_total",
        Kind::Counter,
        &[("result", WAKEUP_RESULTS)],
        "Wake-up decisions for offline recipient devices: queued for a provider, coalesced into an earlier push, or skipped.",
    ),
    (
        "relay_push_escalations_total",
        Kind::Counter,
        &[("result", ESCALATION_RESULTS)],
        "Urgent-page escalation steps: paged again, stopped by an ack, or repeats exhausted.",
    ),
    (
        "relay_push_registrations_total",
        Kind::Counter,
        &[("platform", PROVIDERS)],
        "push_token frames stored (registrations and refreshes).",
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

/// Set by the binary, which links jemalloc as its global allocator: only then do jemalloc's
/// statistics describe the process (a test binary using the system allocator has none).
static JEMALLOC_IS_GLOBAL: AtomicBool = AtomicBool::new(false);

/// Declares that jemalloc is the process's global allocator, so scrapes report its statistics.
pub fn report_jemalloc() {
    JEMALLOC_IS_GLOBAL.store(true, Ordering::Relaxed);
}

/// Samples the process's memory, its limit and its open files (Linux `/proc`, cgroup v2) for
/// the scrape about to be rendered. What cannot be read is left as it was.
pub fn sample_process() {
    if JEMALLOC_IS_GLOBAL.load(Ordering::Relaxed) {
        use tikv_jemalloc_ctl::{epoch, stats};
        // The statistics are a snapshot taken when the epoch advances.
        if epoch::advance().is_ok() {
            if let Ok(b) = stats::allocated::read() {
                metrics::gauge!("relay_allocator_allocated_bytes").set(b as f64);
            }
            if let Ok(b) = stats::resident::read() {
                metrics::gauge!("relay_allocator_resident_bytes").set(b as f64);
            }
        }
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if let Some(kb) = kb_field(&status, "VmRSS:") {
        metrics::gauge!("relay_process_resident_bytes").set((kb * 1024) as f64);
    }
    let machine = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| kb_field(&m, "MemTotal:"))
        .map(|kb| kb * 1024);
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok()); // "max": no limit
    if let Some(limit) = [machine, cgroup].into_iter().flatten().min() {
        metrics::gauge!("relay_process_memory_limit_bytes").set(limit as f64);
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        metrics::gauge!("relay_process_open_fds").set(fds.count() as f64);
    }
}

/// The number after `name` on its line of a `/proc` file ("VmRSS:   1234 kB").
fn kb_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    line[name.len()..].split_whitespace().next()?.parse().ok()
}

/// Every combination of the known label values.
fn label_sets(labels: Labels) -> Vec<Vec<metrics::Label>> {
    let mut sets = vec![Vec::new()];
    for &(name, values) in labels {
        sets = sets
            .into_iter()
            .flat_map(|set| {
                values.iter().map(move |&v| {
                    let mut set = set.clone();
                    set.push(metrics::Label::new(name, v));
                    set
                })
            })
            .collect();
    }
    sets
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
            for set in label_sets(labels) {
                metrics::counter!(name, set).absolute(0);
            }
        }
    }
    metrics::gauge!("relay_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    metrics::gauge!("relay_connections").set(0.0);
    metrics::gauge!("relay_devices_online").set(0.0);
    metrics::gauge!("relay_store_ready").set(1.0);
    metrics::gauge!("relay_store_disk_full").set(0.0); // stays 0 on ScyllaDB
    metrics::gauge!("relay_store_write_buffer_bytes").set(0.0); // stays 0 on ScyllaDB
    metrics::gauge!("relay_store_cache_bytes").set(0.0);
    metrics::gauge!(push::metric::QUEUE_DEPTH).set(0.0);
}
