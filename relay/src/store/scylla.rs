//! The ScyllaDB backend (also runs against Apache Cassandra): the store of a relay cluster.
//!
//! **Invariant:** this is the only file that speaks CQL. `schema/*.cql` is the source of truth
//! for the tables; `relay migrate` applies those files.
//!
//! Appends go through one writer task per node, like the embedded backend, so sequence numbers
//! follow call order and fan-out follows commit order. A batch of appends is written in phases,
//! each phase's statements concurrently:
//!
//! 1. read `message_ids` for every message id;
//! 2. write `message_ids` rows (`complete = false`) for new ids, reserving their seq;
//! 3. write the inbox rows (one per recipient device) and the archive row;
//! 4. mark `message_ids` complete, then fan out and answer `accepted`.
//!
//! A message whose phase fails is answered `unavailable` (retryable). A retry that finds an
//! incomplete `message_ids` row rewrites the same rows under the same seq, so a timed-out write
//! is neither lost nor duplicated; a complete row answers `duplicate`. All statements are
//! idempotent (same keys, same values), so the driver may retry them on timeouts.
//!
//! Known limit: two nodes handling the same message id at the same instant (a client retrying on
//! another node while the first attempt is still in flight) can both store it; devices dedupe
//! by id, as at-least-once delivery requires anyway.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::FutureExt as _;
use futures_util::TryStreamExt as _;
use futures_util::future::{BoxFuture, join_all};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::frame::types::Consistency;
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::statement::prepared::PreparedStatement;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::pseudonym::{self, Pseudonyms};
use super::queue::{self, Batch, Batches, Op, WriterQueue};
use super::record::{self, Record};
use super::rows;
use super::{
    Accepted, AppendTicket, Backup, DeliverySink, DeviceRef, Expired, InboxEntry, MAX_NODES,
    MessageStore, NewMessage, Retention, SeqClock, StoreError, now_ms, seq_floor, seq_span,
    seq_time_ms,
};
use crate::access::{AccessRow, Change, Confirmation, Lock, Revocation};
use crate::audit;
use crate::config::ScyllaConfig;
use crate::seal::Keyring;

/// Schema version this relay needs.
pub const SCHEMA_VERSION: i32 = 10;

/// Migrations, in order: (version, name, CQL).
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "initial",
        include_str!("../../../schema/0001_initial.cql"),
    ),
    (
        2,
        "push_tokens",
        include_str!("../../../schema/0002_push_tokens.cql"),
    ),
    (
        3,
        "node_leases",
        include_str!("../../../schema/0003_node_leases.cql"),
    ),
    (
        4,
        "access_audit",
        include_str!("../../../schema/0004_access_audit.cql"),
    ),
    (
        5,
        "fresh_login",
        include_str!("../../../schema/0005_fresh_login.cql"),
    ),
    (
        6,
        "sequence_reservations",
        include_str!("../../../schema/0006_sequence_reservations.cql"),
    ),
    (
        7,
        "audit_keys",
        include_str!("../../../schema/0007_audit_keys.cql"),
    ),
    (
        8,
        "node_keys",
        include_str!("../../../schema/0008_node_keys.cql"),
    ),
    (
        9,
        "pseudonyms",
        include_str!("../../../schema/0009_pseudonyms.cql"),
    ),
    (
        10,
        "backups",
        include_str!("../../../schema/0010_backups.cql"),
    ),
];

const MAX_BATCH: usize = 512;
const QUEUE_DEPTH: usize = 65_536;
/// How long a node trusts its cached device list of a user (devices register on other nodes).
const DEVICE_CACHE_TTL: Duration = Duration::from_secs(5);
const WEEK_MS: u64 = 7 * 86_400_000;
/// Inbox rows asked for first when reading a page; later requests are sized by what came back.
/// One: a page of large messages then reads nothing it does not use (a page of small ones costs
/// a second round trip).
const FIRST_INBOX_CHUNK: usize = 1;
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

/// Opens a driver session (without selecting a keyspace).
pub async fn connect(cfg: &ScyllaConfig) -> Result<Session, StoreError> {
    let mut policy = DefaultPolicy::builder().token_aware(true);
    if let Some(dc) = &cfg.local_dc {
        policy = policy.prefer_datacenter(dc.clone());
    }
    let profile = ExecutionProfile::builder()
        .consistency(parse_consistency(&cfg.consistency).unwrap_or(Consistency::LocalQuorum))
        .request_timeout(Some(cfg.request_timeout.0))
        .load_balancing_policy(policy.build())
        .build();
    let mut builder = SessionBuilder::new()
        .known_nodes(&cfg.nodes)
        .connection_timeout(cfg.request_timeout.0)
        .default_execution_profile_handle(profile.into_handle());
    if let (Some(user), Some(pass)) = (&cfg.username, &cfg.password) {
        builder = builder.user(user, pass);
    }
    if let Some(ca) = &cfg.tls_ca_file {
        builder = builder.tls_context(Some(tls_config(ca)?));
    }
    builder.build().await.map_err(unavailable)
}

fn tls_config(ca: &std::path::Path) -> Result<Arc<rustls::ClientConfig>, StoreError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)
        .map_err(|e| unavailable(format!("{}: {e}", ca.display())))?
    {
        roots
            .add(cert.map_err(|e| unavailable(format!("{}: {e}", ca.display())))?)
            .map_err(unavailable)?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(unavailable)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The statements of a migration file, in order (comments dropped).
pub fn statements(cql: &str) -> Vec<String> {
    let text: String = cql
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    text.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// `(table, column)` of an `ALTER TABLE t ADD column type` statement.
fn added_column(stmt: &str) -> Option<(&str, &str)> {
    let words: Vec<&str> = stmt.split_whitespace().collect();
    match words.as_slice() {
        [alter, table_kw, table, add, column, _type]
            if alter.eq_ignore_ascii_case("alter")
                && table_kw.eq_ignore_ascii_case("table")
                && add.eq_ignore_ascii_case("add") =>
        {
            Some((table, column))
        }
        _ => None,
    }
}

/// The table a `CREATE TABLE IF NOT EXISTS` or `ALTER TABLE` statement is about.
fn target_table(stmt: &str) -> Option<&str> {
    let words: Vec<&str> = stmt.split_whitespace().take(6).collect();
    let name = match words.as_slice() {
        [create, table_kw, _if, _not, _exists, name, ..]
            if create.eq_ignore_ascii_case("create") && table_kw.eq_ignore_ascii_case("table") =>
        {
            name
        }
        [alter, table_kw, name, ..]
            if alter.eq_ignore_ascii_case("alter") && table_kw.eq_ignore_ascii_case("table") =>
        {
            name
        }
        _ => return None,
    };
    Some(name.trim_end_matches('('))
}

async fn column_exists(
    session: &Session,
    ks: &str,
    table: &str,
    column: &str,
) -> Result<bool, StoreError> {
    let rows = session
        .query_unpaged(
            "SELECT column_name FROM system_schema.columns WHERE keyspace_name = ? AND table_name = ? AND column_name = ?",
            (ks, table, column),
        )
        .await
        .map_err(unavailable)?
        .into_rows_result()
        .map_err(unavailable)?;
    Ok(rows.rows_num() > 0)
}

/// Creates the keyspace if missing and applies missing migrations. Returns the versions applied.
/// Migration 9 moves existing rows to pseudonymous keys, which needs the relays' at-rest
/// keyring (`None` is enough for a keyspace without rows) and every relay stopped.
pub async fn migrate(
    cfg: &ScyllaConfig,
    keyring: Option<&Keyring>,
) -> Result<Vec<i32>, StoreError> {
    migrate_to(cfg, keyring, SCHEMA_VERSION).await
}

/// [`migrate`], stopping after version `up_to` (tests of a migration start below it).
pub async fn migrate_to(
    cfg: &ScyllaConfig,
    keyring: Option<&Keyring>,
    up_to: i32,
) -> Result<Vec<i32>, StoreError> {
    let session = connect(cfg).await?;
    let replication: Vec<String> = cfg
        .replication
        .iter()
        .map(|(dc, rf)| format!("'{}': {rf}", dc.replace('\'', "")))
        .collect();
    let ks = &cfg.keyspace;
    session
        .query_unpaged(
            format!(
                "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {{'class': 'NetworkTopologyStrategy', {}}}",
                replication.join(", ")
            ),
            (),
        )
        .await
        .map_err(unavailable)?;
    session
        .await_schema_agreement()
        .await
        .map_err(unavailable)?;
    session.use_keyspace(ks, false).await.map_err(unavailable)?;
    session
        .query_unpaged(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version int PRIMARY KEY, name text, applied_at timestamp)",
            (),
        )
        .await
        .map_err(unavailable)?;
    let have = applied_versions(&session).await?;
    // A new keyspace that goes up to migration 9 never creates the tables it replaces (creating
    // and dropping a table costs a schema agreement each).
    let superseded: &[&str] = if have.is_empty() && up_to >= 9 {
        &super::scylla_pseudonyms::OLD_TABLES
    } else {
        &[]
    };
    let mut applied = Vec::new();
    for (version, name, cql) in MIGRATIONS {
        if have.contains(version) || *version > up_to {
            continue;
        }
        if *version == 9 {
            super::scylla_pseudonyms::refuse_while_nodes_run(&session).await?;
        }
        for stmt in statements(cql) {
            if target_table(&stmt).is_some_and(|t| superseded.contains(&t)) {
                continue;
            }
            // CQL has no portable `ADD IF NOT EXISTS`: a column that exists was added by an
            // earlier run of this migration that stopped before it was recorded.
            if let Some((table, column)) = added_column(&stmt)
                && column_exists(&session, ks, table, column).await?
            {
                continue;
            }
            session.query_unpaged(stmt, ()).await.map_err(unavailable)?;
        }
        session
            .await_schema_agreement()
            .await
            .map_err(unavailable)?;
        if *version == 9 {
            let moved = super::scylla_pseudonyms::move_rows(&session, ks, keyring, async |k| {
                ids_key(&session, k).await
            })
            .await?;
            tracing::info!(rows = moved, "moved rows to pseudonymous keys");
            session
                .await_schema_agreement()
                .await
                .map_err(unavailable)?;
        }
        session
            .query_unpaged(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, toTimestamp(now()))",
                (version, name),
            )
            .await
            .map_err(unavailable)?;
        applied.push(*version);
    }
    Ok(applied)
}

async fn applied_versions(session: &Session) -> Result<Vec<i32>, StoreError> {
    let rows = session
        .query_unpaged("SELECT version FROM schema_migrations", ())
        .await
        .map_err(unavailable)?
        .into_rows_result()
        .map_err(unavailable)?;
    rows.rows::<(i32,)>()
        .map_err(unavailable)?
        .map(|r| r.map(|(v,)| v).map_err(unavailable))
        .collect()
}

/// Why `relay serve` will not use a keyspace.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The keyspace or its migration table is missing, or the database is unreachable.
    #[error("cannot read the schema version ({0}); run `relay migrate`")]
    Unreadable(String),
    /// Older than this relay needs.
    #[error(
        "schema version {found} is older than the {needed} this relay needs; run `relay migrate`"
    )]
    TooOld {
        /// Applied version.
        found: i32,
        /// Needed version.
        needed: i32,
    },
}

/// Columns of an access row, in the order [`AccessColumns`] reads them.
macro_rules! access_columns {
    () => {
        "device_p, device_sealed, org_sealed, WRITETIME(org_sealed), locked_at, lock_reason, revoked_at, revoke_reason, signal, except_sealed, confirmed_signal, confirmed_at, last_seen, fresh_from"
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
);

/// The key an access row's sealed columns are bound to: `P(user, device)`.
fn access_key(user_p: &[u8], device_p: &[u8]) -> Vec<u8> {
    [user_p, device_p].concat()
}

/// An access row, its sealed ids opened. A row whose ids do not open fails the read: a
/// revocation is never mistaken for its absence.
fn access_row(
    ids: &Pseudonyms,
    user: &str,
    c: AccessColumns,
) -> Result<(String, AccessRow), StoreError> {
    let (
        device_p,
        device,
        org,
        org_written,
        locked_at,
        lock_reason,
        revoked_at,
        reason,
        signal,
        except,
        csig,
        cat,
        seen,
        fresh_from,
    ) = c;
    let key = access_key(&ids.user(user), &device_p);
    let open_one = |table: &[u8], sealed: Option<Vec<u8>>| -> Result<Option<String>, StoreError> {
        match sealed {
            None => Ok(None),
            Some(v) => rows::open_ids(ids, table, &key, &v)
                .and_then(|mut list| list.pop())
                .map(Some)
                .ok_or_else(|| {
                    metrics::counter!("relay_store_corrupt_rows_total").increment(1);
                    StoreError::Corrupt("access row does not open".into())
                }),
        }
    };
    let device = open_one(b"access", device)?.unwrap_or_default();
    let org = open_one(b"access.org", org)?;
    let except = open_one(b"access.except", except)?;
    let ms = |v: Option<i64>| v.map(|v| v.max(0) as u64);
    let row = AccessRow {
        org,
        // `org` is written with the token's `iat` (seconds) as its write time (microseconds).
        org_since: ms(org_written).map(|us| us / 1_000_000),
        fresh_from: ms(fresh_from),
        locked: ms(locked_at).map(|at| Lock {
            at,
            reason: lock_reason.unwrap_or_default(),
        }),
        revoked: ms(revoked_at).zip(signal).map(|(at, signal)| Revocation {
            at,
            reason: reason.unwrap_or_default(),
            signal,
            except,
        }),
        confirmed: csig
            .zip(ms(cat))
            .map(|(signal, at)| Confirmation { signal, at }),
        last_seen: ms(seen),
    };
    Ok((device, row))
}

struct Statements {
    insert_inbox: PreparedStatement,
    select_inbox: PreparedStatement,
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
        Ok(Statements {
            insert_inbox: p("INSERT INTO {ks}.inbox2 (user_p, device_p, week, seq, sealed) VALUES (?, ?, ?, ?, ?) USING TTL ?").await?,
            select_inbox: p("SELECT seq, sealed FROM {ks}.inbox2 WHERE user_p = ? AND device_p = ? AND week = ? AND seq > ? LIMIT ?").await?,
            delete_inbox: p("DELETE FROM {ks}.inbox2 WHERE user_p = ? AND device_p = ? AND week = ? AND seq = ?").await?,
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
            seen: p("UPDATE {ks}.access2 SET last_seen = ?, device_sealed = ? WHERE user_p = ? AND device_p = ?").await?,
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
        })
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

/// How long a leased node id stays reserved without renewal, and how often it is renewed.
const LEASE_TTL: Duration = Duration::from_secs(30);
const LEASE_RENEW: Duration = Duration::from_secs(5);

/// Runs a lightweight transaction; whether it was applied.
async fn lwt(
    session: &Session,
    cql: &str,
    values: impl scylla::serialize::row::SerializeRow,
) -> Result<bool, StoreError> {
    let rows = session
        .query_unpaged(cql, values)
        .await
        .map_err(unavailable)?
        .into_rows_result()
        .map_err(unavailable)?;
    let row = rows
        .maybe_first_row::<scylla::value::Row>()
        .map_err(unavailable)?;
    Ok(matches!(
        row.and_then(|r| r.columns.into_iter().next()).flatten(),
        Some(scylla::value::CqlValue::Boolean(true))
    ))
}

async fn claim_id(session: &Session, id: u8, holder: &str) -> Result<bool, StoreError> {
    lwt(
        session,
        "INSERT INTO node_leases (node_id, holder) VALUES (?, ?) IF NOT EXISTS USING TTL 30",
        (i32::from(id), holder),
    )
    .await
}

/// Where the sequence numbers of node id `id` may resume: above everything it issued.
async fn read_reservation(s: &Shared, id: u8) -> Result<u64, StoreError> {
    let rows = s
        .session
        .execute_unpaged(&s.st.select_reserved, (i32::from(id),))
        .await
        .map_err(unavailable)?
        .into_rows_result()
        .map_err(unavailable)?;
    let row = rows
        .maybe_first_row::<(Option<i64>,)>()
        .map_err(unavailable)?;
    Ok(row.and_then(|(r,)| r).map_or(0, |r| r.max(0) as u64))
}

/// Claims the lowest node id no live node holds.
async fn claim_node_id(session: &Session, holder: &str) -> Result<u8, StoreError> {
    for id in 0..MAX_NODES {
        if claim_id(session, id, holder).await? {
            return Ok(id);
        }
    }
    Err(StoreError::Unavailable(format!(
        "all {MAX_NODES} node ids are leased by live nodes"
    )))
}

/// Renews the lease on `id`. If another node holds it (ours lapsed and was taken), sequence
/// numbers could collide: the process exits so that a restart claims a free id.
async fn keep_lease(s: Arc<Shared>, id: u8, holder: String) {
    loop {
        tokio::time::sleep(LEASE_RENEW).await;
        let renewed = lwt(
            &s.session,
            "UPDATE node_leases USING TTL 30 SET holder = ? WHERE node_id = ? IF holder = ?",
            (&holder, i32::from(id), &holder),
        )
        .await;
        let renewed = match renewed {
            // Not applied: the row expired (then claim it again) or is someone else's.
            Ok(false) => claim_id(&s.session, id, &holder).await,
            other => other,
        };
        match renewed {
            Ok(true) => {
                let until =
                    now_ms() + LEASE_TTL.as_millis() as u64 - 2 * LEASE_RENEW.as_millis() as u64;
                s.lease_until.store(until, Ordering::Relaxed);
            }
            Ok(false) => {
                tracing::error!(
                    node_id = id,
                    "node id lease taken by another node; exiting so a restart claims a free id"
                );
                std::process::exit(75);
            }
            Err(e) => {
                tracing::warn!(node_id = id, error = %e, "node id lease renewal failed; retrying")
            }
        }
    }
}

/// Refuses a keyring that would break a live node: sealing with a key some live node cannot
/// open, or lacking the key some live node seals with. Either means an at-rest key rotation was
/// done in one rolling deploy instead of two (DEPLOY.md, "Rotating the at-rest key").
/// `fixed_id` is this node's configured id, whose row is its own previous run's (a leased id is
/// claimed afterwards and is never one a live node announces under).
async fn check_keys_against_live_nodes(
    session: &Session,
    keyring: &Keyring,
    fixed_id: Option<u8>,
) -> Result<(), StoreError> {
    let rows = session
        .query_unpaged("SELECT node_id, key_ids, active FROM node_keys", ())
        .await
        .map_err(unavailable)?
        .into_rows_result()
        .map_err(unavailable)?;
    let active = keyring.active_id();
    let (mut lacking, mut unknown) = (0, std::collections::BTreeSet::new());
    for row in rows
        .rows::<(i32, Option<Vec<String>>, Option<String>)>()
        .map_err(unavailable)?
    {
        let (id, held, theirs) = row.map_err(unavailable)?;
        if fixed_id.is_some_and(|own| id == i32::from(own)) {
            continue; // this node's previous run, replaced when it announces
        }
        if !held.unwrap_or_default().iter().any(|k| k == active) {
            lacking += 1;
        }
        if let Some(theirs) = theirs.filter(|k| !keyring.holds(k)) {
            unknown.insert(theirs);
        }
    }
    if lacking > 0 {
        return Err(StoreError::Refused(format!(
            "at-rest key `{active}` is not held by {lacking} live node(s) yet: give every node \
             the key while it still seals with the old one, then activate it (another node \
             that stopped without a clean shutdown counts as live for 30 s)"
        )));
    }
    if !unknown.is_empty() {
        return Err(StoreError::Refused(format!(
            "live nodes seal with at-rest key(s) {unknown:?} that this node does not hold"
        )));
    }
    Ok(())
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

/// Writes this node's row of `node_keys`: the at-rest key ids it can open and the one it seals
/// with. It expires unless renewed, so a node that died stops counting after 30 s.
async fn announce_keys(
    session: &Session,
    node_id: u8,
    keyring: &Keyring,
) -> Result<(), StoreError> {
    let ids: Vec<&str> = keyring.key_ids().collect();
    session
        .query_unpaged(
            "INSERT INTO node_keys (node_id, key_ids, active) VALUES (?, ?, ?) USING TTL 30",
            (i32::from(node_id), ids, keyring.active_id()),
        )
        .await
        .map_err(unavailable)?;
    Ok(())
}

async fn keep_announcing(s: Arc<Shared>, node_id: u8) {
    loop {
        tokio::time::sleep(LEASE_RENEW).await;
        if let Err(e) = announce_keys(&s.session, node_id, &s.keyring).await {
            tracing::warn!(error = %e, "announcing the at-rest keys failed; retrying");
        }
    }
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
        });
        // Sequence numbers carry the node id, so nodes never collide; a restarted node (or the
        // next holder of a leased id) continues above everything issued under that id before.
        let reserved = read_reservation(&shared, node_id).await?;
        let (tx, rx) = queue::channel(QUEUE_DEPTH, MAX_BATCH);
        let writer = Writer {
            s: shared.clone(),
            sink,
            clock: SeqClock::new(node_id, reserved.max(seq_floor(now_ms()))),
            node_id,
            reserved,
            devices: HashMap::new(),
        };
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
        // A response holds every row it asks for: ask for one until the rows' size is known.
        let mut chunk = FIRST_INBOX_CHUNK.min(limit);
        let (user_p, device_p) = dev_p(&s.ids, device);
        'weeks: for week in from..=to {
            loop {
                if out.len() >= limit || bytes >= max_bytes {
                    break 'weeks;
                }
                let want = (limit - out.len()).min(chunk);
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
                    cursor = cursor.max(seq as u64);
                    let key = record::inbox_key(device, seq as u64);
                    let opened = record::open_inbox(&s.keyring, &key, &sealed);
                    bytes += super::keep_inbox_row(&mut out, device, opened);
                }
                if n < want {
                    continue 'weeks; // this week has no more
                }
                let average = (bytes / out.len().max(1)).max(1);
                chunk = (max_bytes.saturating_sub(bytes) / average).clamp(1, limit);
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

/// Keeps `ready()` truthful while no traffic flows, and notices recovery on its own.
async fn ping(s: Arc<Shared>) {
    loop {
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
    fn append(&self, msg: NewMessage) -> AppendTicket {
        self.ops.append(msg)
    }

    fn register_device(&self, device: DeviceRef) -> BoxFuture<'_, Result<(), StoreError>> {
        self.ops.register(device).boxed()
    }

    fn device_seen(&self, device: DeviceRef) {
        self.ops.seen(device);
    }

    fn push_token(
        &self,
        device: DeviceRef,
    ) -> BoxFuture<'_, Result<Option<push::DeviceToken>, StoreError>> {
        async move {
            let s = &self.shared;
            let rows = s
                .session
                .execute_unpaged(&s.st.select_push, dev_p(&s.ids, &device))
                .await
                .map_err(unavailable)?
                .into_rows_result()
                .map_err(unavailable)?;
            match rows.maybe_first_row::<(Vec<u8>,)>().map_err(unavailable)? {
                Some((sealed,)) => {
                    record::open_push_token(&s.keyring, &record::device_key(&device), &sealed)
                        .map(Some)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))
                }
                None => Ok(None),
            }
        }
        .boxed()
    }

    fn set_push_token(
        &self,
        device: DeviceRef,
        token: Option<push::DeviceToken>,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        async move {
            let s = &self.shared;
            let (u, d) = dev_p(&s.ids, &device);
            match token {
                Some(token) => {
                    let sealed =
                        record::seal_push_token(&s.keyring, &record::device_key(&device), &token);
                    s.session
                        .execute_unpaged(&s.st.insert_push, (u, d, sealed))
                        .await
                }
                None => s.session.execute_unpaged(&s.st.delete_push, (u, d)).await,
            }
            .map(|_| ())
            .map_err(unavailable)
        }
        .boxed()
    }

    fn inbox_page(
        &self,
        device: DeviceRef,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> BoxFuture<'_, Result<Vec<InboxEntry>, StoreError>> {
        async move { Self::read_page(&self.shared, &device, after, limit, max_bytes).await }.boxed()
    }

    fn ack(&self, device: DeviceRef, seqs: Vec<u64>) -> BoxFuture<'_, Result<(), StoreError>> {
        self.ops.ack(device, seqs).boxed()
    }

    fn archived(
        &self,
        seq: u64,
        id: Uuid,
    ) -> BoxFuture<'_, Result<Option<record::ArchivedMessage>, StoreError>> {
        async move {
            let s = &self.shared;
            let rows = s
                .session
                .execute_unpaged(
                    &s.st.select_archive,
                    (
                        archive_hour(seq),
                        archive_shard(&id, s.archive_shards),
                        seq as i64,
                        id,
                    ),
                )
                .await
                .map_err(unavailable)?
                .into_rows_result()
                .map_err(unavailable)?;
            match rows.maybe_first_row::<(Vec<u8>,)>().map_err(unavailable)? {
                Some((sealed,)) => {
                    record::open_archive(&s.keyring, &record::archive_key(seq, &id), &sealed)
                        .map(Some)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))
                }
                None => Ok(None),
            }
        }
        .boxed()
    }

    fn expire(
        &self,
        _now_ms: u64,
        _retention: Retention,
    ) -> BoxFuture<'_, Result<Expired, StoreError>> {
        // Every row is written with a TTL: the database expires them itself.
        async { Ok(Expired::default()) }.boxed()
    }

    fn access(
        &self,
        user: String,
        device: Option<String>,
    ) -> BoxFuture<'_, Result<Vec<(String, AccessRow)>, StoreError>> {
        async move {
            let s = &self.shared;
            let user_p = s.ids.user(&user).to_vec();
            let result = match &device {
                Some(d) => {
                    let (_, user_row) = dev_p(&s.ids, &DeviceRef::new(&user, ""));
                    let (_, device_row) = dev_p(&s.ids, &DeviceRef::new(&user, d));
                    s.session
                        .execute_unpaged(
                            &s.st.select_access_device,
                            (&user_p, user_row, device_row),
                        )
                        .await
                }
                None => {
                    s.session
                        .execute_unpaged(&s.st.select_access_user, (&user_p,))
                        .await
                }
            }
            .map_err(unavailable)?
            .into_rows_result()
            .map_err(unavailable)?;
            let rows = result
                .rows::<AccessColumns>()
                .map_err(unavailable)?
                .map(|r| {
                    r.map_err(unavailable)
                        .and_then(|c| access_row(&s.ids, &user, c))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        }
        .boxed()
    }

    fn update_access(
        &self,
        user: String,
        device: String,
        change: Change,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        async move {
            let s = &self.shared;
            let (u, d) = dev_p(&s.ids, &DeviceRef::new(&user, &device));
            let key = access_key(&u, &d);
            let sealed_device = rows::seal_ids(&s.ids, b"access", &key, &[&device]);
            let ms = |v: u64| v as i64;
            match change {
                Change::Revoke(r) => {
                    let except = r
                        .except
                        .as_deref()
                        .map(|e| rows::seal_ids(&s.ids, b"access.except", &key, &[e]));
                    s.session
                        .execute_unpaged(
                            &s.st.revoke,
                            (ms(r.at), &r.reason, r.signal, except, sealed_device, &u, &d),
                        )
                        .await
                }
                Change::Lock(l) => {
                    let (at, reason) = l.map(|l| (ms(l.at), l.reason)).unzip();
                    s.session
                        .execute_unpaged(&s.st.lock, (at, reason, sealed_device, &u, &d))
                        .await
                }
                Change::Confirm(c) => {
                    s.session
                        .execute_unpaged(&s.st.confirm, (c.signal, ms(c.at), sealed_device, &u, &d))
                        .await
                }
                Change::Fresh(at) => {
                    s.session
                        .execute_unpaged(&s.st.fresh, (ms(at), sealed_device, &u, &d))
                        .await
                }
                Change::Seen { at, org } => {
                    if let Some((org, since)) = org {
                        // Last write wins by write time: the newest token's organisation.
                        let written_us =
                            since.saturating_mul(1_000_000).min(i64::MAX as u64) as i64;
                        let (_, user_row) = dev_p(&s.ids, &DeviceRef::new(&user, ""));
                        let user_key = access_key(&u, &user_row);
                        let sealed_org = rows::seal_ids(&s.ids, b"access.org", &user_key, &[&org]);
                        let sealed_none = rows::seal_ids(&s.ids, b"access", &user_key, &[""]);
                        s.session
                            .execute_unpaged(
                                &s.st.set_org,
                                (written_us, sealed_org, sealed_none, &u, user_row),
                            )
                            .await
                            .map_err(unavailable)?;
                        let org_p = s.ids.org(&org).to_vec();
                        let org_key = [org_p.as_slice(), u.as_slice()].concat();
                        let sealed_user = rows::seal_ids(&s.ids, b"org_users", &org_key, &[&user]);
                        s.session
                            .execute_unpaged(&s.st.insert_org_user, (org_p, &u, sealed_user))
                            .await
                            .map_err(unavailable)?;
                    }
                    s.session
                        .execute_unpaged(&s.st.seen, (ms(at), sealed_device, &u, &d))
                        .await
                }
            }
            .map(|_| ())
            .map_err(unavailable)
        }
        .boxed()
    }

    fn devices(&self, user: String) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        async move {
            let s = &self.shared;
            Ok(load_devices(s, &user)
                .await?
                .into_iter()
                .map(|d| d.device.to_string())
                .collect())
        }
        .boxed()
    }

    fn org_users(&self, org: String) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        async move {
            let s = &self.shared;
            let org_p = s.ids.org(&org).to_vec();
            let rows = s
                .session
                .execute_unpaged(&s.st.select_org_users, (&org_p,))
                .await
                .map_err(unavailable)?
                .into_rows_result()
                .map_err(unavailable)?;
            let mut out = Vec::new();
            for row in rows.rows::<(Vec<u8>, Vec<u8>)>().map_err(unavailable)? {
                let (user_p, sealed) = row.map_err(unavailable)?;
                let key = [org_p.as_slice(), user_p.as_slice()].concat();
                match rows::open_ids(&s.ids, b"org_users", &key, &sealed).and_then(|mut l| l.pop())
                {
                    Some(user) => out.push(user),
                    None => metrics::counter!("relay_store_corrupt_rows_total").increment(1),
                }
            }
            Ok(out)
        }
        .boxed()
    }

    fn pending_logouts(&self) -> BoxFuture<'_, Result<Vec<(DeviceRef, u64)>, StoreError>> {
        async move {
            let s = &self.shared;
            let mut rows = s
                .session
                .execute_iter(s.st.select_pending.clone(), ())
                .await
                .map_err(unavailable)?
                .rows_stream::<(Vec<u8>, Vec<u8>, i64, Option<Vec<u8>>)>()
                .map_err(unavailable)?;
            let mut out = Vec::new();
            while let Some((u, d, at, sealed)) = rows.try_next().await.map_err(unavailable)? {
                let key = [u.as_slice(), d.as_slice()].concat();
                match sealed
                    .and_then(|v| rows::open_ids(&s.ids, b"pending_logouts", &key, &v))
                    .as_deref()
                {
                    Some([user, device]) => {
                        out.push((DeviceRef::new(user, device), at.max(0) as u64))
                    }
                    _ => metrics::counter!("relay_store_corrupt_rows_total").increment(1),
                }
            }
            Ok(out)
        }
        .boxed()
    }

    fn set_pending_logout(
        &self,
        device: DeviceRef,
        requested_at: Option<u64>,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        async move {
            let s = &self.shared;
            let (u, d) = dev_p(&s.ids, &device);
            match requested_at {
                Some(at) => {
                    let key = [u.as_slice(), d.as_slice()].concat();
                    let sealed = rows::seal_ids(
                        &s.ids,
                        b"pending_logouts",
                        &key,
                        &[&device.user, &device.device],
                    );
                    s.session
                        .execute_unpaged(&s.st.insert_pending, (&u, &d, at as i64, sealed))
                        .await
                }
                None => {
                    s.session
                        .execute_unpaged(&s.st.delete_pending, (u, d))
                        .await
                }
            }
            .map(|_| ())
            .map_err(unavailable)
        }
        .boxed()
    }

    fn audit_append(&self, records: Vec<audit::Record>) -> BoxFuture<'_, Result<(), StoreError>> {
        async move {
            let s = &self.shared;
            let ttl = ttl_secs(s.retention.audit_ms);
            let writes = records.iter().map(|r| {
                let key = rows::audit_key(&s.ids, &r.chain, r.n);
                let sealed = rows::seal_audit(&s.ids, &key, &r.chain.subject, &r.entry);
                s.session.execute_unpaged(
                    &s.st.insert_audit,
                    (
                        s.ids.subject(&r.chain.subject).to_vec(),
                        r.chain.month as i32,
                        i32::from(r.chain.node),
                        r.n as i64,
                        r.ts as i64,
                        r.prev.to_vec(),
                        r.hash.to_vec(),
                        r.key_id.clone(),
                        sealed,
                        ttl,
                    ),
                )
            });
            for result in join_all(writes).await {
                result.map_err(unavailable)?;
            }
            Ok(())
        }
        .boxed()
    }

    fn audit_tail(
        &self,
        chain: audit::Chain,
    ) -> BoxFuture<'_, Result<Option<audit::Head>, StoreError>> {
        async move {
            let s = &self.shared;
            let rows = s
                .session
                .execute_unpaged(
                    &s.st.select_audit_tail,
                    (
                        s.ids.subject(&chain.subject).to_vec(),
                        chain.month as i32,
                        i32::from(chain.node),
                    ),
                )
                .await
                .map_err(unavailable)?
                .into_rows_result()
                .map_err(unavailable)?;
            Ok(rows
                .maybe_first_row::<(i64, Vec<u8>)>()
                .map_err(unavailable)?
                .and_then(|(n, hash)| Some((n as u64, hash.try_into().ok()?))))
        }
        .boxed()
    }

    fn audit_read(
        &self,
        subject: String,
        month: u32,
    ) -> BoxFuture<'_, Result<Vec<audit::Record>, StoreError>> {
        async move {
            let s = &self.shared;
            let mut rows = s
                .session
                .execute_iter(
                    s.st.select_audit.clone(),
                    (s.ids.subject(&subject).to_vec(), month as i32),
                )
                .await
                .map_err(unavailable)?
                .rows_stream::<(
                    i32,
                    i64,
                    i64,
                    Vec<u8>,
                    Vec<u8>,
                    Option<String>,
                    Option<Vec<u8>>,
                )>()
                .map_err(unavailable)?;
            let mut out = Vec::new();
            while let Some((node, n, ts, prev, hash, key_id, sealed)) =
                rows.try_next().await.map_err(unavailable)?
            {
                let chain = audit::Chain {
                    subject: subject.clone(),
                    month,
                    node: node as u8,
                };
                // A record that does not open reads as an empty entry: verification reports it.
                let key = rows::audit_key(&s.ids, &chain, n as u64);
                let entry = sealed
                    .and_then(|v| rows::open_audit(&s.ids, &key, &v))
                    .filter(|(sub, _)| *sub == subject)
                    .map(|(_, entry)| entry)
                    .unwrap_or_default();
                // A mangled hash column is itself tampering: verification reports it.
                let digest = |v: Vec<u8>| v.try_into().unwrap_or([0xff; 32]);
                out.push(audit::Record {
                    chain,
                    n: n as u64,
                    ts: ts as u64,
                    entry,
                    prev: digest(prev),
                    hash: digest(hash),
                    key_id: key_id.unwrap_or_default(),
                });
            }
            Ok(out)
        }
        .boxed()
    }

    fn audit_partitions(&self) -> BoxFuture<'_, Result<Vec<(String, u32)>, StoreError>> {
        async move {
            let s = &self.shared;
            let mut rows = s
                .session
                .execute_iter(s.st.select_audit_partitions.clone(), ())
                .await
                .map_err(unavailable)?
                .rows_stream::<(Vec<u8>, i32)>()
                .map_err(unavailable)?;
            let mut partitions = Vec::new();
            while let Some(p) = rows.try_next().await.map_err(unavailable)? {
                partitions.push(p);
            }
            // Keys hold the subject's pseudonym: one record of each partition names it.
            let mut out = Vec::new();
            for (subject_p, month) in partitions {
                let first = s
                    .session
                    .execute_unpaged(&s.st.select_audit_first, (&subject_p, month))
                    .await
                    .map_err(unavailable)?
                    .into_rows_result()
                    .map_err(unavailable)?;
                let Some((node, n, sealed)) = first
                    .maybe_first_row::<(i32, i64, Option<Vec<u8>>)>()
                    .map_err(unavailable)?
                else {
                    continue;
                };
                let mut key = subject_p.clone();
                key.extend_from_slice(&(month as u32).to_be_bytes());
                key.push(node as u8);
                key.extend_from_slice(&(n as u64).to_be_bytes());
                let subject = sealed
                    .and_then(|v| rows::open_audit(&s.ids, &key, &v))
                    .map(|(subject, _)| subject)
                    .unwrap_or_else(|| {
                        let hex: String = subject_p.iter().map(|b| format!("{b:02x}")).collect();
                        format!("#unreadable/{hex}")
                    });
                out.push((subject, month.max(0) as u32));
            }
            out.sort();
            Ok(out)
        }
        .boxed()
    }

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

struct Writer {
    s: Arc<Shared>,
    sink: Arc<dyn DeliverySink>,
    clock: SeqClock,
    node_id: u8,
    /// Above every sequence number this node id has issued, and durable (`node_seq`).
    reserved: u64,
    devices: HashMap<Arc<str>, (Vec<DeviceRef>, Instant)>,
}

/// One append in flight through the phases.
struct Pending {
    msg: NewMessage,
    reply: oneshot::Sender<Result<Accepted, StoreError>>,
    /// Index of an earlier append in this batch with the same id.
    same_as: Option<usize>,
    seq: u64,
    ts: u64,
    /// Already complete in the database: answer `duplicate`.
    duplicate: bool,
    /// Needs its `message_ids` row written (a new id).
    reserve: bool,
    targets: Vec<DeviceRef>,
    failed: Option<StoreError>,
}

impl Writer {
    async fn run(mut self, mut batches: Batches) {
        while let Some(batch) = batches.next().await {
            let started = Instant::now();
            let close = self.commit(batch).await;
            metrics::histogram!("relay_store_commit_duration_seconds")
                .record(started.elapsed().as_secs_f64());
            if let Some(reply) = close {
                let _ = reply.send(Ok(()));
                return;
            }
        }
    }

    fn mark(&self, ok: bool) {
        self.s.healthy.store(ok, Ordering::Relaxed);
        if !ok {
            metrics::counter!("relay_store_errors_total", "op" => "write").increment(1);
        }
    }

    async fn commit(
        &mut self,
        Batch { ops, acks }: Batch,
    ) -> Option<oneshot::Sender<Result<(), StoreError>>> {
        let mut appends = Vec::new();
        let mut registers = Vec::new();
        let mut close = None;
        for op in ops {
            match op {
                Op::Append(m, r) => appends.push((m, r)),
                Op::Register(d, r) => registers.push((d, r)),
                Op::Seen(d) => {
                    // A device registered on another node: re-read the user's devices.
                    if self
                        .devices
                        .get(&d.user)
                        .is_some_and(|(list, _)| !list.contains(&d))
                    {
                        self.devices.remove(&d.user);
                    }
                }
                Op::Close(r) => close = Some(r),
            }
        }
        // Acks first: a later answer in this batch then implies they are applied. The ack lane
        // bounds them per batch (`queue::MAX_BATCH_ACKS`), so appends never wait behind a flood.
        let deletes: Vec<_> = acks
            .iter()
            .flat_map(|a| a.seqs.iter().map(move |&seq| (&a.device, seq)))
            .map(|(d, seq)| {
                let (u, dp) = dev_p(&self.s.ids, d);
                self.s
                    .session
                    .execute_unpaged(&self.s.st.delete_inbox, (u, dp, week_of(seq), seq as i64))
            })
            .collect();
        for r in join_all(deletes).await {
            if let Err(e) = r {
                // A lost ack only means a redelivery.
                metrics::counter!("relay_store_errors_total", "op" => "ack").increment(1);
                tracing::warn!(error = %e, "ack delete failed");
            }
        }
        for ack in acks {
            let _ = ack.done.send(Ok(()));
        }
        // Registrations before appends, so appends in the same batch reach the new devices.
        let now = now_ms() as i64;
        let results = join_all(registers.iter().map(|(d, _)| {
            self.s
                .session
                .execute_unpaged(&self.s.st.insert_device, device_row(&self.s.ids, d, now))
        }))
        .await;
        for ((device, reply), result) in registers.into_iter().zip(results) {
            self.mark(result.is_ok());
            if result.is_ok()
                && let Some((list, _)) = self.devices.get_mut(&device.user)
                && !list.contains(&device)
            {
                list.push(device.clone());
            }
            let _ = reply.send(result.map(|_| ()).map_err(unavailable));
        }
        if !appends.is_empty() {
            metrics::histogram!("relay_store_commit_batch_size").record(appends.len() as f64);
            self.appends(appends).await;
        }
        close
    }

    async fn devices_of(&mut self, users: &[String]) -> Result<(), StoreError> {
        // Make room first: what this call loads must stay until the batch has used it.
        if self.devices.len() + users.len() > super::DEVICE_CACHE_USERS {
            self.devices
                .retain(|_, (_, at)| at.elapsed() <= DEVICE_CACHE_TTL);
            if self.devices.len() + users.len() > super::DEVICE_CACHE_USERS {
                self.devices.clear();
            }
        }
        let stale: Vec<&str> = users
            .iter()
            .map(String::as_str)
            .filter(|u| {
                self.devices
                    .get(*u)
                    .is_none_or(|(_, at)| at.elapsed() > DEVICE_CACHE_TTL)
            })
            .collect();
        let reads = join_all(stale.iter().map(|u| load_devices(&self.s, u))).await;
        for (user, result) in stale.into_iter().zip(reads) {
            self.devices.insert(user.into(), (result?, Instant::now()));
        }
        metrics::gauge!("relay_device_cache_users").set(self.devices.len() as f64);
        Ok(())
    }

    /// Makes sure `n` new sequence numbers at `now` stay below a durable reservation.
    async fn reserve_for(&mut self, now: u64, n: usize) -> Result<(), StoreError> {
        let bound = self.clock.bound_after(now, n);
        if bound.saturating_add(seq_span(RESERVE_HEADROOM_MS)) <= self.reserved {
            return Ok(());
        }
        let reserved = bound + seq_span(RESERVE_AHEAD_MS);
        let s = &self.s;
        s.session
            .execute_unpaged(
                &s.st.reserve,
                (reserved as i64, reserved as i64, i32::from(self.node_id)),
            )
            .await
            .map_err(unavailable)?;
        self.reserved = reserved;
        Ok(())
    }

    async fn appends(
        &mut self,
        batch: Vec<(NewMessage, oneshot::Sender<Result<Accepted, StoreError>>)>,
    ) {
        let s = self.s.clone();
        if now_ms() >= s.lease_until.load(Ordering::Relaxed) {
            // The node id may be another node's by now: issue no sequence numbers.
            for (_, reply) in batch {
                let _ = reply.send(Err(StoreError::Unavailable("node id lease lapsed".into())));
            }
            return;
        }
        let idem_ttl = ttl_secs(s.retention.idempotency_ms);
        let mut first: HashMap<(Arc<str>, Uuid), usize> = HashMap::new();
        let mut p: Vec<Pending> = Vec::with_capacity(batch.len());
        for (msg, reply) in batch {
            let key = (msg.from.user.clone(), msg.id);
            let same_as = first.get(&key).copied();
            if same_as.is_none() {
                first.insert(key, p.len());
            }
            p.push(Pending {
                msg,
                reply,
                same_as,
                seq: 0,
                ts: 0,
                duplicate: false,
                reserve: false,
                targets: Vec::new(),
                failed: None,
            });
        }

        // Phase 1: what the database knows of these ids.
        let firsts: Vec<usize> = (0..p.len()).filter(|&i| p[i].same_as.is_none()).collect();
        let reads = join_all(firsts.iter().map(|&i| {
            s.session
                .execute_unpaged(&s.st.select_msg_id, msg_p(&s.ids, &p[i].msg))
        }))
        .await;
        let now = now_ms();
        if let Err(e) = self.reserve_for(now, firsts.len()).await {
            for i in firsts.iter().copied() {
                p[i].failed = Some(StoreError::Unavailable(e.to_string()));
            }
        }
        for (&i, read) in firsts.iter().zip(reads) {
            if p[i].failed.is_some() {
                continue;
            }
            let known = read
                .map_err(unavailable)
                .and_then(|r| r.into_rows_result().map_err(unavailable))
                .and_then(|rows| {
                    rows.maybe_first_row::<(i64, i64, Option<bool>)>()
                        .map_err(unavailable)
                });
            match known {
                Err(e) => p[i].failed = Some(e),
                Ok(Some((seq, ts, complete))) => {
                    (p[i].seq, p[i].ts) = (seq as u64, ts as u64);
                    p[i].duplicate = complete.unwrap_or(false);
                }
                Ok(None) => {
                    (p[i].seq, p[i].ts) = (self.clock.next(now), now);
                    p[i].reserve = true;
                }
            }
        }

        // Phase 2: reserve new ids.
        let reserving: Vec<usize> = firsts
            .iter()
            .copied()
            .filter(|&i| p[i].reserve && p[i].failed.is_none())
            .collect();
        let writes = join_all(reserving.iter().map(|&i| {
            let (sender_p, msg_p) = msg_p(&s.ids, &p[i].msg);
            s.session.execute_unpaged(
                &s.st.insert_msg_id,
                (sender_p, msg_p, p[i].seq as i64, p[i].ts as i64, idem_ttl),
            )
        }))
        .await;
        for (&i, w) in reserving.iter().zip(writes) {
            if let Err(e) = w {
                p[i].failed = Some(unavailable(e));
            }
        }

        // Phase 3: inbox and archive rows.
        let writing: Vec<usize> = firsts
            .iter()
            .copied()
            .filter(|&i| !p[i].duplicate && p[i].failed.is_none())
            .collect();
        let mut users: Vec<String> = Vec::new();
        for &i in &writing {
            users.push(p[i].msg.from.user.to_string());
            users.extend(p[i].msg.to.iter().cloned());
        }
        users.sort_unstable();
        users.dedup();
        if let Err(e) = self.devices_of(&users).await {
            for &i in &writing {
                p[i].failed = Some(unavailable(&e));
            }
        }
        let inbox_ttl = ttl_secs(s.retention.inbox_ms);
        let archive_ttl = ttl_secs(s.retention.archive_ms);
        let mut statements = Vec::new();
        let ready: Vec<usize> = writing
            .iter()
            .copied()
            .filter(|&i| p[i].failed.is_none())
            .collect();
        for i in ready {
            let m = &p[i].msg;
            let mut targets = Vec::new();
            for user in std::iter::once(&*m.from.user).chain(m.to.iter().map(String::as_str)) {
                for d in self
                    .devices
                    .get(user)
                    .map_or(&[][..], |(l, _)| l.as_slice())
                {
                    if *d != m.from && !targets.contains(d) {
                        targets.push(d.clone());
                    }
                }
            }
            let (seq, ts) = (p[i].seq, p[i].ts);
            let rec = Record {
                ts,
                urgent: m.urgent,
                from: &m.from,
                to: &[],
                body: &m.body,
            };
            for d in &targets {
                let key = record::inbox_key(d, seq);
                let value = record::seal_inbox(&s.keyring, &key, &m.id, &rec);
                statements.push((
                    i,
                    s.session
                        .execute_unpaged(&s.st.insert_inbox, {
                            let (u, dp) = dev_p(&s.ids, d);
                            (u, dp, week_of(seq), seq as i64, value, inbox_ttl)
                        })
                        .boxed(),
                ));
            }
            let akey = record::archive_key(seq, &m.id);
            let avalue = record::seal_archive(&s.keyring, &akey, &Record { to: &m.to, ..rec });
            let shard = (m.id.as_u128() % u128::from(s.archive_shards)) as i16;
            let hour = (seq_time_ms(seq) / HOUR_MS) as i32;
            statements.push((
                i,
                s.session
                    .execute_unpaged(
                        &s.st.insert_archive,
                        (hour, shard, seq as i64, m.id, avalue, archive_ttl),
                    )
                    .boxed(),
            ));
            p[i].targets = targets;
        }
        let (owners, futures): (Vec<usize>, Vec<_>) = statements.into_iter().unzip();
        for (i, r) in owners.into_iter().zip(join_all(futures).await) {
            if let Err(e) = r {
                p[i].failed.get_or_insert(unavailable(e));
            }
        }

        // Phase 4: mark complete.
        let completing: Vec<usize> = writing
            .iter()
            .copied()
            .filter(|&i| p[i].failed.is_none())
            .collect();
        let marks = join_all(completing.iter().map(|&i| {
            let (sender_p, msg_p) = msg_p(&s.ids, &p[i].msg);
            s.session
                .execute_unpaged(&s.st.complete_msg_id, (idem_ttl, sender_p, msg_p))
        }))
        .await;
        for (&i, r) in completing.iter().zip(marks) {
            if let Err(e) = r {
                p[i].failed = Some(unavailable(e));
            }
        }

        let any_failed = p.iter().any(|x| x.failed.is_some());
        self.mark(!any_failed);
        if any_failed {
            tracing::warn!(
                failed = p.iter().filter(|x| x.failed.is_some()).count(),
                "appends failed; senders told to retry"
            );
        }

        // Fan out in sequence order, then answer.
        let mut order: Vec<usize> = (0..p.len()).filter(|&i| p[i].same_as.is_none()).collect();
        order.sort_by_key(|&i| p[i].seq);
        for &i in &order {
            let x = &p[i];
            if x.failed.is_none() && !x.duplicate && !x.targets.is_empty() {
                let entry = InboxEntry {
                    seq: x.seq,
                    ts: x.ts,
                    id: x.msg.id,
                    from: x.msg.from.clone(),
                    urgent: x.msg.urgent,
                    body: x.msg.body.clone(),
                };
                self.sink.deliver(&x.targets, &entry);
            }
        }
        let outcomes: Vec<Result<Accepted, String>> = p
            .iter()
            .map(|x| match &x.failed {
                Some(e) => Err(e.to_string()),
                None => Ok(Accepted {
                    seq: x.seq,
                    ts: x.ts,
                    duplicate: x.duplicate,
                }),
            })
            .collect();
        for (i, x) in p.into_iter().enumerate() {
            let outcome = match x.same_as {
                None => outcomes[i].clone(),
                Some(j) => outcomes[j].clone().map(|a| Accepted {
                    duplicate: true,
                    ..a
                }),
            };
            let _ = x.reply.send(outcome.map_err(StoreError::Unavailable));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_split_into_statements() {
        assert!(statements(MIGRATIONS[0].2).len() >= 4);
        assert_eq!(
            added_column("ALTER TABLE access ADD fresh_from bigint"),
            Some(("access", "fresh_from"))
        );
        // Every statement names its table, so a new keyspace can skip the replaced ones.
        assert_eq!(
            target_table("ALTER TABLE access ADD fresh_from bigint"),
            Some("access")
        );
        assert_eq!(
            target_table("CREATE TABLE IF NOT EXISTS inbox (\n user_id text"),
            Some("inbox")
        );
        for (_, _, cql) in MIGRATIONS {
            assert!(statements(cql).iter().all(|s| target_table(s).is_some()));
        }
        for (_, _, cql) in MIGRATIONS {
            let stmts = statements(cql);
            assert!(!stmts.is_empty());
            // Every statement can run again after an interrupted migration.
            assert!(
                stmts
                    .iter()
                    .all(|s| s.starts_with("CREATE TABLE IF NOT EXISTS")
                        || added_column(s).is_some()),
                "{stmts:?}"
            );
        }
    }

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
