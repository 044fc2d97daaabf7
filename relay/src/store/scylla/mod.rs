//! The ScyllaDB backend (also runs against Apache Cassandra): the store of a relay cluster.
//!
//! **Invariant:** this folder is the only code that speaks CQL. `schema/*.cql` is the source of truth
//! for the tables; `relay migrate` applies those files.
//!
//! Appends go through one writer task per node, like the embedded backend, so sequence numbers
//! follow call order and fan-out follows commit order. A batch of appends is written in phases,
//! each phase's statements concurrently, and several batches at once (`writer.rs`):
//!
//! 1. read `message_ids` for every message id;
//! 2. write `message_ids` rows (`complete = false`) for new ids, reserving their seq;
//! 3. write the inbox rows (one per recipient device) and the archive row;
//! 4. mark `message_ids` complete, then fan out and answer `accepted`.
//!
//! A message whose phase fails is answered `unavailable` (retryable). A retry that finds an
//! incomplete `message_ids` row rewrites the same rows under the same seq, so a timed-out write
//! is neither lost nor duplicated; a complete row answers `duplicate`, and the rows still in the
//! recipients' inboxes are read back and fanned out again (the node that wrote them may have
//! died before its fan-out). All statements are
//! idempotent (same keys, same values), so the driver may retry them on timeouts.
//!
//! Inbox rows live in one partition per device and week. A page read asks every week of the
//! retention at once (100 weeks per request) for its first row after the cursor, then reads on
//! only in the weeks that have one; an ack deletes each partition's acknowledged seqs in one request. The driver's
//! request counters are exported as `relay_store_cql_*` metrics.
//!
//! Layout: `connection.rs` (reaching the cluster), `schema.rs` (migrations; `pseudonyms.rs` the
//! one that moved rows to pseudonymous keys), `lease.rs` (node ids and announced keys),
//! `writer.rs` (the writer task), `domains.rs` (the domain traits' reads and writes); this file
//! holds the options, the prepared statements, the shared state and opening the store.
//!
//! Known limit: two nodes handling the same message id at the same instant (a client retrying on
//! another node while the first attempt is still in flight) can both store it; devices dedupe
//! by id, as at-least-once delivery requires anyway.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt as _;
use futures_util::TryStreamExt as _;
use futures_util::future::{BoxFuture, join_all};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::frame::types::Consistency;
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::statement::batch::{Batch as CqlBatch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use serde::Deserialize;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::pseudonym::{self, Pseudonyms};
use super::queue::{self, Batch, Batches, Op, WriterQueue};
use super::record::{self, Record};
use super::rows;
use super::{
    Accepted, AccessRows, AppendTicket, AuditLog, Backup, DeliverySink, DeviceRef, Devices,
    Expired, InboxEntry, MAX_NODES, MessageStore, Messages, NewMessage, Retention, SeqClock,
    StoreError, add_recipients, now_ms, recipient_users, seq_floor, seq_span, seq_time_ms,
};
use crate::access::model::{AccessRow, Change, Confirmation, Lock, Revocation};
use crate::audit::model as audit;
use crate::ids::Dur;
use crate::seal::Keyring;

mod connection;
mod domains;
mod lease;
mod pseudonyms;
mod schema;
mod writer;

pub use connection::connect;
pub use schema::{MIGRATIONS, SCHEMA_VERSION, SchemaError, migrate, migrate_to, statements};

use lease::*;
use schema::applied_versions;
use writer::Writer;

/// ScyllaDB / Cassandra connection: the store's own options (`[storage.scylla]` in the
/// configuration embeds them).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScyllaConfig {
    /// Contact points, `host:port`.
    pub nodes: Vec<String>,
    /// Keyspace.
    pub keyspace: String,
    /// Data centre to prefer (token-aware, DC-aware routing); none = all.
    pub local_dc: Option<String>,
    /// `one`, `local_quorum`, `quorum`, `all`, …
    pub consistency: String,
    /// Per-request timeout.
    pub request_timeout: Dur,
    /// Replication used by `relay migrate` when it creates the keyspace: data centre → factor
    /// (NetworkTopologyStrategy).
    pub replication: std::collections::BTreeMap<String, u32>,
    /// Username (PasswordAuthenticator).
    pub username: Option<String>,
    /// Password.
    pub password: Option<String>,
    /// CA certificate (PEM) to verify the cluster; enables TLS.
    pub tls_ca_file: Option<PathBuf>,
    /// Archive partitions per hour (spreads writes; see schema/0001_initial.cql).
    pub archive_shards: u16,
}

impl Default for ScyllaConfig {
    fn default() -> Self {
        ScyllaConfig {
            nodes: vec!["127.0.0.1:9042".into()],
            keyspace: "relay".into(),
            local_dc: None,
            consistency: "local_quorum".into(),
            request_timeout: Dur::secs(5),
            replication: [("datacenter1".to_string(), 3)].into(),
            username: None,
            password: None,
            tls_ca_file: None,
            archive_shards: 32,
        }
    }
}

const MAX_BATCH: usize = 512;

const QUEUE_DEPTH: usize = 65_536;

/// How long a node trusts its cached device list of a user (devices register on other nodes).
const DEVICE_CACHE_TTL: Duration = Duration::from_secs(5);

const WEEK_MS: u64 = 7 * 86_400_000;
/// Values in one `IN` list: ScyllaDB refuses more than 100 clustering or partition key
/// restrictions per query by default (`max_clustering_key_restrictions_per_query`,
/// `max_partition_key_restrictions_per_query`); an inbox kept two years spans more weeks.
const MAX_IN_VALUES: usize = 100;
/// What one batch of audit records may carry, roughly (sealed entries and their columns):
/// well under Cassandra's default `batch_size_fail_threshold` (50 KiB) and ScyllaDB's.
const MAX_BATCH_BYTES: usize = 16 * 1024;

const HOUR_MS: u64 = 3_600_000;

/// How far ahead of what it issues a node reserves sequence numbers, and the headroom left when
/// it reserves again. A restart resumes above the reservation, so a crash loop runs the clock
/// ahead by at most this much per restart.
const RESERVE_AHEAD_MS: u64 = 10_000;

const RESERVE_HEADROOM_MS: u64 = 5_000;

/// Parses a consistency level name (`local_quorum`, `QUORUM`, …).
pub fn parse_consistency(s: &str) -> Option<Consistency> {
    Some(match s.to_ascii_lowercase().as_str() {
        "any" => Consistency::Any,
        "one" => Consistency::One,
        "two" => Consistency::Two,
        "three" => Consistency::Three,
        "quorum" => Consistency::Quorum,
        "all" => Consistency::All,
        "local_quorum" => Consistency::LocalQuorum,
        "each_quorum" => Consistency::EachQuorum,
        "local_one" => Consistency::LocalOne,
        _ => return None,
    })
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Columns of an access row, in the order [`AccessColumns`] reads them.
macro_rules! access_columns {
    () => {
        "device_p, device_sealed, org_sealed, WRITETIME(org_sealed), locked_at, lock_reason, revoked_at, revoke_reason, signal, except_sealed, confirmed_signal, confirmed_at, last_seen, fresh_from, registered"
    };
}

type AccessColumns = (
    Vec<u8>,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Option<i64>,
    Option<i64>,
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<Uuid>,
    Option<Vec<u8>>,
    Option<Uuid>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<bool>,
);

struct Statements {
    insert_inbox: PreparedStatement,
    select_inbox: PreparedStatement,
    select_inbox_firsts: PreparedStatement,
    delete_inbox: PreparedStatement,
    insert_archive: PreparedStatement,
    select_archive: PreparedStatement,
    select_msg_id: PreparedStatement,
    insert_msg_id: PreparedStatement,
    complete_msg_id: PreparedStatement,
    insert_device: PreparedStatement,
    select_devices: PreparedStatement,
    insert_push: PreparedStatement,
    select_push: PreparedStatement,
    delete_push: PreparedStatement,
    select_access_user: PreparedStatement,
    select_access_device: PreparedStatement,
    revoke: PreparedStatement,
    lock: PreparedStatement,
    confirm: PreparedStatement,
    seen: PreparedStatement,
    set_org: PreparedStatement,
    fresh: PreparedStatement,
    insert_org_user: PreparedStatement,
    /// `set_org`, `insert_org_user` and `seen` in one unlogged batch: a connect's last-seen
    /// time with its token's organisation.
    seen_with_org: CqlBatch,
    select_org_users: PreparedStatement,
    insert_pending: PreparedStatement,
    delete_pending: PreparedStatement,
    select_pending: PreparedStatement,
    insert_audit: PreparedStatement,
    select_audit_tail: PreparedStatement,
    select_audit: PreparedStatement,
    select_audit_partitions: PreparedStatement,
    select_audit_first: PreparedStatement,
    select_reserved: PreparedStatement,
    reserve: PreparedStatement,
}

impl Statements {
    /// Table names are qualified with the keyspace: `USE` with prepared statements is ambiguous.
    async fn prepare(s: &Session, ks: &str) -> Result<Self, StoreError> {
        let p = |cql: &'static str| async move {
            let cql = cql.replace("{ks}", ks);
            let mut st = s.prepare(cql).await.map_err(unavailable)?;
            st.set_is_idempotent(true);
            Ok::<_, StoreError>(st)
        };
        let mut st = Statements {
            insert_inbox: p("INSERT INTO {ks}.inbox2 (user_p, device_p, week, seq, sealed) VALUES (?, ?, ?, ?, ?) USING TTL ?").await?,
            select_inbox: p("SELECT seq, sealed FROM {ks}.inbox2 WHERE user_p = ? AND device_p = ? AND week = ? AND seq > ? LIMIT ?").await?,
            select_inbox_firsts: p("SELECT week, seq, sealed FROM {ks}.inbox2 WHERE user_p = ? AND device_p = ? AND week IN ? AND seq > ? PER PARTITION LIMIT 1").await?,
            delete_inbox: p("DELETE FROM {ks}.inbox2 WHERE user_p = ? AND device_p = ? AND week = ? AND seq IN ?").await?,
            insert_archive: p("INSERT INTO {ks}.archive (hour, shard, seq, msg_id, sealed) VALUES (?, ?, ?, ?, ?) USING TTL ?").await?,
            select_archive: p("SELECT sealed FROM {ks}.archive WHERE hour = ? AND shard = ? AND seq = ? AND msg_id = ?").await?,
            select_msg_id: p("SELECT seq, ts, complete FROM {ks}.message_ids2 WHERE sender_p = ? AND msg_p = ?").await?,
            insert_msg_id: p("INSERT INTO {ks}.message_ids2 (sender_p, msg_p, seq, ts, complete) VALUES (?, ?, ?, ?, false) USING TTL ?").await?,
            complete_msg_id: p("UPDATE {ks}.message_ids2 USING TTL ? SET complete = true WHERE sender_p = ? AND msg_p = ?").await?,
            insert_device: p("INSERT INTO {ks}.devices2 (user_p, device_p, registered_at, sealed) VALUES (?, ?, ?, ?)").await?,
            select_devices: p("SELECT device_p, sealed FROM {ks}.devices2 WHERE user_p = ?").await?,
            insert_push: p("INSERT INTO {ks}.push_tokens2 (user_p, device_p, sealed) VALUES (?, ?, ?)").await?,
            select_push: p("SELECT sealed FROM {ks}.push_tokens2 WHERE user_p = ? AND device_p = ?").await?,
            delete_push: p("DELETE FROM {ks}.push_tokens2 WHERE user_p = ? AND device_p = ?").await?,
            select_access_user: p(concat!("SELECT ", access_columns!(), " FROM {ks}.access2 WHERE user_p = ?")).await?,
            select_access_device: p(concat!("SELECT ", access_columns!(), " FROM {ks}.access2 WHERE user_p = ? AND device_p IN (?, ?)")).await?,
            revoke: p("UPDATE {ks}.access2 SET revoked_at = ?, revoke_reason = ?, signal = ?, except_sealed = ?, device_sealed = ? WHERE user_p = ? AND device_p = ?").await?,
            lock: p("UPDATE {ks}.access2 SET locked_at = ?, lock_reason = ?, device_sealed = ? WHERE user_p = ? AND device_p = ?").await?,
            confirm: p("UPDATE {ks}.access2 SET confirmed_signal = ?, confirmed_at = ?, device_sealed = ? WHERE user_p = ? AND device_p = ?").await?,
            seen: p("UPDATE {ks}.access2 SET last_seen = ?, device_sealed = ?, registered = true WHERE user_p = ? AND device_p = ?").await?,
            set_org: p("UPDATE {ks}.access2 USING TIMESTAMP ? SET org_sealed = ?, device_sealed = ? WHERE user_p = ? AND device_p = ?").await?,
            fresh: p("UPDATE {ks}.access2 SET fresh_from = ?, device_sealed = ? WHERE user_p = ? AND device_p = ?").await?,
            insert_org_user: p("INSERT INTO {ks}.org_users2 (org_p, user_p, sealed) VALUES (?, ?, ?)").await?,
            select_org_users: p("SELECT user_p, sealed FROM {ks}.org_users2 WHERE org_p = ?").await?,
            insert_pending: p("INSERT INTO {ks}.pending_logouts2 (bucket, user_p, device_p, requested_at, sealed) VALUES (0, ?, ?, ?, ?)").await?,
            delete_pending: p("DELETE FROM {ks}.pending_logouts2 WHERE bucket = 0 AND user_p = ? AND device_p = ?").await?,
            select_pending: p("SELECT user_p, device_p, requested_at, sealed FROM {ks}.pending_logouts2 WHERE bucket = 0").await?,
            insert_audit: p("INSERT INTO {ks}.audit2 (subject_p, month, node, n, ts, prev, hash, key_id, sealed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) USING TTL ?").await?,
            select_audit_tail: p("SELECT n, hash FROM {ks}.audit2 WHERE subject_p = ? AND month = ? AND node = ? ORDER BY node DESC, n DESC LIMIT 1").await?,
            select_audit: p("SELECT node, n, ts, prev, hash, key_id, sealed FROM {ks}.audit2 WHERE subject_p = ? AND month = ?").await?,
            select_audit_partitions: p("SELECT DISTINCT subject_p, month FROM {ks}.audit2").await?,
            select_audit_first: p("SELECT node, n, sealed FROM {ks}.audit2 WHERE subject_p = ? AND month = ? LIMIT 1").await?,
            select_reserved: p("SELECT reserved FROM {ks}.node_seq WHERE node_id = ?").await?,
            reserve: p("UPDATE {ks}.node_seq USING TIMESTAMP ? SET reserved = ? WHERE node_id = ?").await?,
            seen_with_org: CqlBatch::new(BatchType::Unlogged),
        };
        for part in [&st.set_org, &st.insert_org_user, &st.seen] {
            st.seen_with_org.append_statement(part.clone());
        }
        Ok(st)
    }
}

fn week_of(seq: u64) -> i32 {
    (seq_time_ms(seq) / WEEK_MS) as i32
}

fn archive_hour(seq: u64) -> i32 {
    (seq_time_ms(seq) / HOUR_MS) as i32
}

fn archive_shard(id: &Uuid, shards: u16) -> i16 {
    (id.as_u128() % u128::from(shards)) as i16
}

fn ttl_secs(ms: u64) -> i32 {
    // Both ScyllaDB and Cassandra cap a TTL at 20 years.
    (ms / 1000).clamp(1, 630_720_000) as i32
}

struct Shared {
    session: Session,
    st: Statements,
    keyring: Arc<Keyring>,
    ids: Pseudonyms,
    retention: Retention,
    archive_shards: u16,
    healthy: AtomicBool,
    /// Until when (ms) this node may issue sequence numbers under its node id: a leased id
    /// that lapsed may already be another node's.
    lease_until: AtomicU64,
    /// Devices an access read found registered, until their registration takes them.
    found_registered: Mutex<HashSet<DeviceRef>>,
}

/// ScyllaDB-backed [`MessageStore`].
pub struct ScyllaStore {
    shared: Arc<Shared>,
    ops: WriterQueue,
    pinger: tokio::task::JoinHandle<()>,
    /// The lease renewal task and this node's holder id, when the node id is leased.
    lease: Option<(tokio::task::JoinHandle<()>, String)>,
    /// The task renewing this node's row of `node_keys`.
    announcer: tokio::task::JoinHandle<()>,
    node_id: u8,
}

/// `(P(user), P(user, device))`, the two key columns of a device's rows.
fn dev_p(ids: &Pseudonyms, d: &DeviceRef) -> (Vec<u8>, Vec<u8>) {
    let k = ids.device(d);
    (k[..pseudonym::LEN].to_vec(), k[pseudonym::LEN..].to_vec())
}

/// A row of `devices2`: the pseudonyms, the registration time and the sealed ids.
fn device_row(ids: &Pseudonyms, d: &DeviceRef, now: i64) -> (Vec<u8>, Vec<u8>, i64, Vec<u8>) {
    let (u, dp) = dev_p(ids, d);
    let key = [u.as_slice(), dp.as_slice()].concat();
    let sealed = rows::seal_ids(ids, b"devices", &key, &[&d.user, &d.device]);
    (u, dp, now, sealed)
}

/// `(P(sender), P(sender, message id))`, the key of a message's idempotency row.
fn msg_p(ids: &Pseudonyms, m: &NewMessage) -> (Vec<u8>, Vec<u8>) {
    (
        ids.user(&m.from.user).to_vec(),
        ids.message(&m.from.user, &m.id).to_vec(),
    )
}

/// The devices of `user`, their sealed ids opened.
async fn load_devices(s: &Shared, user: &str) -> Result<Vec<DeviceRef>, StoreError> {
    let user_p = s.ids.user(user).to_vec();
    let rows = s
        .session
        .execute_unpaged(&s.st.select_devices, (&user_p,))
        .await
        .map_err(unavailable)?
        .into_rows_result()
        .map_err(unavailable)?;
    let mut out = Vec::new();
    for row in rows
        .rows::<(Vec<u8>, Option<Vec<u8>>)>()
        .map_err(unavailable)?
    {
        let (device_p, sealed) = row.map_err(unavailable)?;
        let key = [user_p.as_slice(), device_p.as_slice()].concat();
        match sealed
            .and_then(|v| rows::open_ids(&s.ids, b"devices", &key, &v))
            .as_deref()
        {
            Some([u, d]) if u == user => out.push(DeviceRef::new(u, d)),
            _ => metrics::counter!("relay_store_corrupt_rows_total").increment(1),
        }
    }
    Ok(out)
}

/// Reads the keyspace's ids key, or makes it (the first node to get there wins, by a
/// lightweight transaction); re-seals it with the active at-rest key when another sealed it.
async fn ids_key(session: &Session, keyring: &Keyring) -> Result<Pseudonyms, StoreError> {
    let read = || async {
        let rows = session
            .query_unpaged("SELECT sealed FROM store_keys WHERE name = 'ids'", ())
            .await
            .map_err(unavailable)?
            .into_rows_result()
            .map_err(unavailable)?;
        Ok::<_, StoreError>(
            rows.maybe_first_row::<(Vec<u8>,)>()
                .map_err(unavailable)?
                .map(|(v,)| v),
        )
    };
    let sealed = match read().await? {
        Some(sealed) => sealed,
        None => {
            let keyed_rows = session
                .query_unpaged("SELECT user_p FROM devices2 LIMIT 1", ())
                .await
                .map_err(unavailable)?
                .into_rows_result()
                .map_err(unavailable)?;
            if keyed_rows.rows_num() > 0 {
                return Err(Pseudonyms::refusal(
                    "is missing from a keyspace keyed by it",
                ));
            }
            let (_, fresh) = Pseudonyms::generate(keyring).map_err(unavailable)?;
            session
                .query_unpaged(
                    "INSERT INTO store_keys (name, sealed) VALUES ('ids', ?) IF NOT EXISTS",
                    (fresh,),
                )
                .await
                .map_err(unavailable)?;
            read()
                .await?
                .ok_or_else(|| StoreError::Unavailable("the ids key was not stored".into()))?
        }
    };
    let (ids, resealed) = Pseudonyms::unwrap(keyring, &sealed)
        .map_err(|e| Pseudonyms::refusal(&format!("does not open ({e})")))?;
    if let Some(resealed) = resealed {
        session
            .query_unpaged(
                "UPDATE store_keys SET sealed = ? WHERE name = 'ids'",
                (resealed,),
            )
            .await
            .map_err(unavailable)?;
    }
    Ok(ids)
}

impl ScyllaStore {
    /// Connects, checks the schema version, prepares statements and starts the writer task.
    pub async fn open(
        cfg: &ScyllaConfig,
        node_id: Option<u8>,
        keyring: Arc<Keyring>,
        retention: Retention,
        sink: Arc<dyn DeliverySink>,
    ) -> Result<Self, StoreError> {
        let session = connect(cfg).await?;
        session
            .use_keyspace(&cfg.keyspace, false)
            .await
            .map_err(|e| {
                StoreError::Unavailable(SchemaError::Unreadable(e.to_string()).to_string())
            })?;
        let found = applied_versions(&session)
            .await
            .map_err(|e| {
                StoreError::Unavailable(SchemaError::Unreadable(e.to_string()).to_string())
            })?
            .into_iter()
            .max()
            .unwrap_or(0);
        if found < SCHEMA_VERSION {
            return Err(StoreError::Unavailable(
                SchemaError::TooOld {
                    found,
                    needed: SCHEMA_VERSION,
                }
                .to_string(),
            ));
        }
        let st = Statements::prepare(&session, &cfg.keyspace).await?;
        // Before claiming anything, so that a refused start leaves nothing behind.
        check_keys_against_live_nodes(&session, &keyring, node_id).await?;
        let ids = ids_key(&session, &keyring).await?;
        let holder = format!("{:016x}", fastrand::u64(..));
        let (node_id, leased) = match node_id {
            Some(id) => (id, false),
            None => {
                let id = claim_node_id(&session, &holder).await?;
                tracing::info!(node_id = id, "leased a node id");
                (id, true)
            }
        };
        announce_keys(&session, node_id, &keyring).await?;
        let shared = Arc::new(Shared {
            session,
            st,
            keyring,
            ids,
            retention,
            archive_shards: cfg.archive_shards.max(1),
            healthy: AtomicBool::new(true),
            lease_until: AtomicU64::new(if leased {
                now_ms() + LEASE_TTL.as_millis() as u64 - 2 * LEASE_RENEW.as_millis() as u64
            } else {
                u64::MAX
            }),
            found_registered: Mutex::default(),
        });
        // Sequence numbers carry the node id, so nodes never collide; a restarted node (or the
        // next holder of a leased id) continues above everything issued under that id before.
        let reserved = read_reservation(&shared, node_id).await?;
        let (tx, rx) = queue::channel(QUEUE_DEPTH, MAX_BATCH);
        let writer = Writer::new(shared.clone(), sink, node_id, reserved);
        tokio::spawn(writer.run(rx));
        let pinger = tokio::spawn(ping(shared.clone()));
        let lease = leased.then(|| {
            let task = tokio::spawn(keep_lease(shared.clone(), node_id, holder.clone()));
            (task, holder)
        });
        let announcer = tokio::spawn(keep_announcing(shared.clone(), node_id));
        Ok(ScyllaStore {
            shared,
            ops: tx,
            pinger,
            lease,
            announcer,
            node_id,
        })
    }

    /// This node's id (configured or leased).
    pub fn node_id(&self) -> u8 {
        self.node_id
    }

    /// CQL requests this store has sent so far, as the driver counts them (retries apart).
    pub fn cql_requests(&self) -> u64 {
        CqlCounts::of(&self.shared.session).requests
    }

    /// The first row after `after` in each of `weeks` that has one, as (week, seq, sealed).
    async fn first_rows(
        s: &Shared,
        user_p: &[u8],
        device_p: &[u8],
        weeks: &[i32],
        after: u64,
    ) -> Result<Vec<(i32, i64, Vec<u8>)>, StoreError> {
        s.session
            .execute_unpaged(
                &s.st.select_inbox_firsts,
                (user_p, device_p, weeks, after as i64),
            )
            .await
            .map_err(unavailable)?
            .into_rows_result()
            .map_err(unavailable)?
            .rows::<(i32, i64, Vec<u8>)>()
            .map_err(unavailable)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(unavailable)
    }

    async fn read_page(
        s: &Shared,
        device: &DeviceRef,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<InboxEntry>, StoreError> {
        let now = now_ms();
        let oldest = seq_floor(now.saturating_sub(s.retention.inbox_ms));
        let from = week_of(after.saturating_add(1).max(oldest));
        // One week ahead: another node's clock may run slightly ahead of ours.
        let to = week_of(seq_floor(now + WEEK_MS));
        let mut out = Vec::with_capacity(limit.min(256));
        let (mut cursor, mut bytes) = (after, 0usize);
        let (user_p, device_p) = dev_p(&s.ids, device);
        // One request finds the weeks holding rows after the cursor, with the first row of
        // each: an empty inbox (most connects) costs one round trip, not one per week, and the
        // first row sizes the next request. A cursor past next week asks nothing.
        let weeks: Vec<i32> = (from..=to).collect();
        let mut firsts = Vec::new();
        for weeks in weeks.chunks(MAX_IN_VALUES) {
            firsts.extend(Self::first_rows(s, &user_p, &device_p, weeks, after).await?);
        }
        firsts.sort_unstable_by_key(|&(week, _, _)| week);
        let keep = |out: &mut Vec<InboxEntry>, cursor: &mut u64, seq: i64, sealed: &[u8]| {
            *cursor = (*cursor).max(seq as u64);
            let key = record::inbox_key(device, seq as u64);
            super::keep_inbox_row(out, device, record::open_inbox(&s.keyring, &key, sealed))
        };
        'weeks: for (week, seq, sealed) in firsts {
            if out.len() >= limit || bytes >= max_bytes {
                break;
            }
            bytes += keep(&mut out, &mut cursor, seq, &sealed);
            loop {
                if out.len() >= limit || bytes >= max_bytes {
                    break 'weeks;
                }
                // A response holds every row it asks for: sized by the rows read so far.
                let average = (bytes / out.len().max(1)).max(1);
                let want = (max_bytes.saturating_sub(bytes) / average).clamp(1, limit - out.len());
                let rows = s
                    .session
                    .execute_unpaged(
                        &s.st.select_inbox,
                        (&user_p, &device_p, week, cursor as i64, want as i32),
                    )
                    .await
                    .map_err(unavailable)?
                    .into_rows_result()
                    .map_err(unavailable)?;
                let mut n = 0;
                for row in rows.rows::<(i64, Vec<u8>)>().map_err(unavailable)? {
                    if bytes >= max_bytes {
                        break 'weeks; // the rest of this response is read again next page
                    }
                    let (seq, sealed) = row.map_err(unavailable)?;
                    n += 1;
                    bytes += keep(&mut out, &mut cursor, seq, &sealed);
                }
                if n < want {
                    continue 'weeks; // this week has no more
                }
            }
        }
        Ok(out)
    }
}

impl Drop for ScyllaStore {
    fn drop(&mut self) {
        self.pinger.abort();
        self.announcer.abort();
        if let Some((task, _)) = &self.lease {
            task.abort();
        }
    }
}

/// The driver's request counters, exported with each health ping.
struct CqlCounts {
    requests: u64,
    errors: u64,
    retries: u64,
}

impl CqlCounts {
    fn of(session: &Session) -> Self {
        let m = session.get_metrics();
        CqlCounts {
            requests: m.get_requests_unpaged_num()
                + m.get_requests_manually_paged_num()
                + m.get_requests_automatically_paged_num(),
            errors: m.get_errors_unpaged_num()
                + m.get_errors_manually_paged_num()
                + m.get_errors_automatically_paged_num(),
            retries: m.get_retries_num(),
        }
    }

    fn export(&self) {
        metrics::counter!("relay_store_cql_requests_total").absolute(self.requests);
        metrics::counter!("relay_store_cql_errors_total").absolute(self.errors);
        metrics::counter!("relay_store_cql_retries_total").absolute(self.retries);
    }
}

/// Keeps `ready()` truthful while no traffic flows, and notices recovery on its own; exports
/// the driver's request counters once a second.
async fn ping(s: Arc<Shared>) {
    loop {
        CqlCounts::of(&s.session).export();
        let ok = s
            .session
            .query_unpaged("SELECT release_version FROM system.local", ())
            .await
            .is_ok();
        if s.healthy.swap(ok, Ordering::Relaxed) != ok {
            if ok {
                tracing::info!("database reachable again");
            } else {
                tracing::warn!("database unreachable");
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

impl MessageStore for ScyllaStore {
    fn record_backup(&self, backup: Backup) -> BoxFuture<'_, Result<(), StoreError>> {
        async move {
            let taken_at = i64::try_from(backup.taken_at).map_err(unavailable)?;
            self.shared
                .session
                .query_unpaged(
                    "INSERT INTO backups (kind, taken_at, tag) VALUES ('snapshot', ?, ?)",
                    (taken_at, backup.tag),
                )
                .await
                .map_err(unavailable)?;
            Ok(())
        }
        .boxed()
    }

    fn last_backup(&self) -> BoxFuture<'_, Result<Option<Backup>, StoreError>> {
        async move {
            let rows = self
                .shared
                .session
                .query_unpaged(
                    "SELECT taken_at, tag FROM backups WHERE kind = 'snapshot' LIMIT 1",
                    (),
                )
                .await
                .map_err(unavailable)?
                .into_rows_result()
                .map_err(unavailable)?;
            Ok(rows
                .maybe_first_row::<(i64, String)>()
                .map_err(unavailable)?
                .map(|(at, tag)| Backup {
                    taken_at: at.max(0) as u64,
                    tag,
                }))
        }
        .boxed()
    }

    fn ready(&self) -> bool {
        self.shared.healthy.load(Ordering::Relaxed) && !self.ops.is_closed()
    }

    fn close(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        async move {
            let closed = self.ops.close().await;
            self.announcer.abort();
            let _ = self
                .shared
                .session
                .query_unpaged(
                    "DELETE FROM node_keys WHERE node_id = ?",
                    (i32::from(self.node_id),),
                )
                .await;
            if let Some((lease, holder)) = &self.lease {
                // Free the node id for the next node at once instead of after the TTL.
                lease.abort();
                let _ = lwt(
                    &self.shared.session,
                    "DELETE FROM node_leases WHERE node_id = ? IF holder = ?",
                    (i32::from(self.node_id), holder),
                )
                .await;
            }
            closed
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consistency_names() {
        assert_eq!(
            parse_consistency("LOCAL_QUORUM"),
            Some(Consistency::LocalQuorum)
        );
        assert_eq!(parse_consistency("mostly"), None);
    }

    #[test]
    fn ttls_fit_both_databases() {
        assert_eq!(ttl_secs(6 * 365 * 86_400_000), 189_216_000);
        assert_eq!(ttl_secs(u64::MAX), 630_720_000);
    }
}
