//! Migration 9 of the ScyllaDB backend, its data half: moves every row of the tables keyed by
//! ids into their successors keyed by pseudonyms (`schema/0009_pseudonyms.cql`), keeping TTLs and
//! the organisation's write time, then drops the old tables, so a relay older than the migration
//! cannot start against the keyspace and write ids in clear again.
//!
//! It runs only while no relay is running (the nodes' key announcements are checked): a node
//! still writing the old tables during the copy would lose those writes. Every write is an
//! upsert, so an interrupted run is simply run again.

use futures_util::TryStreamExt as _;
use scylla::client::session::Session;
use uuid::Uuid;

use crate::seal::Keyring;
use crate::store::pseudonym::Pseudonyms;
use crate::store::{DeviceRef, StoreError, rows};

/// The tables migration 9 replaces.
pub(super) const OLD_TABLES: [&str; 8] = [
    "inbox",
    "message_ids",
    "devices",
    "push_tokens",
    "access",
    "org_users",
    "pending_logouts",
    "audit",
];

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("migration 9 (pseudonyms): {e}"))
}

async fn table_exists(session: &Session, ks: &str, table: &str) -> Result<bool, StoreError> {
    let rows = session
        .query_unpaged(
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = ? AND table_name = ?",
            (ks, table),
        )
        .await
        .map_err(unavailable)?
        .into_rows_result()
        .map_err(unavailable)?;
    Ok(rows.rows_num() > 0)
}

async fn has_rows(session: &Session, table: &str) -> Result<bool, StoreError> {
    let rows = session
        .query_unpaged(format!("SELECT * FROM {table} LIMIT 1"), ())
        .await
        .map_err(unavailable)?
        .into_rows_result()
        .map_err(unavailable)?;
    Ok(rows.rows_num() > 0)
}

/// Refuses while any relay announces its keys (a running node would keep writing old tables).
pub(super) async fn refuse_while_nodes_run(session: &Session) -> Result<(), StoreError> {
    let rows = session
        .query_unpaged("SELECT node_id FROM node_keys", ())
        .await
        .map_err(unavailable)?
        .into_rows_result()
        .map_err(unavailable)?;
    if rows.rows_num() > 0 {
        return Err(StoreError::Refused(format!(
            "migration 9 moves every row to pseudonymous keys and needs every relay stopped; {} node(s) are running",
            rows.rows_num()
        )));
    }
    Ok(())
}

/// Copies the old tables into their successors and drops them.
pub(super) async fn move_rows(
    session: &Session,
    ks: &str,
    keyring: Option<&Keyring>,
    ids_key: impl AsyncFnOnce(&Keyring) -> Result<Pseudonyms, StoreError>,
) -> Result<u64, StoreError> {
    let mut existing = Vec::new();
    for table in OLD_TABLES {
        if table_exists(session, ks, table).await? {
            existing.push(table);
        }
    }
    let mut moved = 0;
    let mut with_rows = Vec::new();
    for &table in &existing {
        if has_rows(session, table).await? {
            with_rows.push(table);
        }
    }
    if !with_rows.is_empty() {
        let keyring = keyring.ok_or_else(|| {
            StoreError::Refused(format!(
                "tables {with_rows:?} hold rows: run `relay migrate` with the at-rest keys the relays use"
            ))
        })?;
        let ids = ids_key(keyring).await?;
        for table in with_rows {
            moved += copy(session, &ids, table).await?;
        }
    }
    for table in existing {
        session
            .query_unpaged(format!("DROP TABLE IF EXISTS {table}"), ())
            .await
            .map_err(unavailable)?;
    }
    Ok(moved)
}

/// Reads every row of `cql` as `T`.
async fn scan<T>(session: &Session, cql: &str) -> Result<Vec<T>, StoreError>
where
    T: for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm> + Send + 'static,
{
    let st = session.prepare(cql).await.map_err(unavailable)?;
    session
        .execute_iter(st, ())
        .await
        .map_err(unavailable)?
        .rows_stream::<T>()
        .map_err(unavailable)?
        .try_collect()
        .await
        .map_err(unavailable)
}

async fn write(
    session: &Session,
    cql: &str,
    values: impl scylla::serialize::row::SerializeRow,
) -> Result<(), StoreError> {
    session
        .query_unpaged(cql, values)
        .await
        .map(|_| ())
        .map_err(unavailable)
}

fn dev(ids: &Pseudonyms, user: &str, device: &str) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let k = ids.device(&DeviceRef::new(user, device));
    let (u, d) = k.split_at(super::pseudonym::LEN);
    (u.to_vec(), d.to_vec(), k.to_vec())
}

fn ttl(t: Option<i32>) -> i32 {
    t.unwrap_or(0).max(0)
}

/// Copies one table; returns the rows copied.
async fn copy(session: &Session, ids: &Pseudonyms, table: &str) -> Result<u64, StoreError> {
    let mut n = 0u64;
    match table {
        "inbox" => {
            type Row = (String, String, i32, i64, Vec<u8>, Option<i32>);
            for (u, d, week, seq, sealed, t) in scan::<Row>(
                session,
                "SELECT user_id, device_id, week, seq, sealed, TTL(sealed) FROM inbox",
            )
            .await?
            {
                let (up, dp, _) = dev(ids, &u, &d);
                write(session, "INSERT INTO inbox2 (user_p, device_p, week, seq, sealed) VALUES (?, ?, ?, ?, ?) USING TTL ?",
                    (up, dp, week, seq, sealed, ttl(t))).await?;
                n += 1;
            }
        }
        "message_ids" => {
            type Row = (
                String,
                Uuid,
                Option<i64>,
                Option<i64>,
                Option<bool>,
                Option<i32>,
            );
            for (sender, id, seq, ts, complete, t) in scan::<Row>(
                session,
                "SELECT sender, msg_id, seq, ts, complete, TTL(seq) FROM message_ids",
            )
            .await?
            {
                write(session, "INSERT INTO message_ids2 (sender_p, msg_p, seq, ts, complete) VALUES (?, ?, ?, ?, ?) USING TTL ?",
                    (ids.user(&sender).to_vec(), ids.message(&sender, &id).to_vec(), seq, ts, complete, ttl(t))).await?;
                n += 1;
            }
        }
        "devices" => {
            type Row = (String, String, Option<i64>);
            for (u, d, at) in scan::<Row>(
                session,
                "SELECT user_id, device_id, registered_at FROM devices",
            )
            .await?
            {
                let (up, dp, key) = dev(ids, &u, &d);
                let sealed = rows::seal_ids(ids, b"devices", &key, &[&u, &d]);
                write(session, "INSERT INTO devices2 (user_p, device_p, registered_at, sealed) VALUES (?, ?, ?, ?)",
                    (up, dp, at, sealed)).await?;
                n += 1;
            }
        }
        "push_tokens" => {
            type Row = (String, String, Vec<u8>);
            for (u, d, sealed) in scan::<Row>(
                session,
                "SELECT user_id, device_id, sealed FROM push_tokens",
            )
            .await?
            {
                let (up, dp, _) = dev(ids, &u, &d);
                write(
                    session,
                    "INSERT INTO push_tokens2 (user_p, device_p, sealed) VALUES (?, ?, ?)",
                    (up, dp, sealed),
                )
                .await?;
                n += 1;
            }
        }
        "access" => {
            type Row = (
                String,
                String,
                Option<String>,
                Option<i64>,
                Option<i64>,
                Option<String>,
                Option<i64>,
                Option<String>,
                Option<Uuid>,
                Option<String>,
                Option<Uuid>,
                Option<i64>,
                Option<i64>,
                Option<i64>,
            );
            for r in scan::<Row>(session, "SELECT user_id, device_id, org, WRITETIME(org), locked_at, lock_reason, revoked_at, revoke_reason, signal, except_device, confirmed_signal, confirmed_at, last_seen, fresh_from FROM access").await? {
                let (u, d, org, org_written, locked_at, lock_reason, revoked_at, revoke_reason, signal, except, csig, cat, seen, fresh) = r;
                let (up, dp, key) = dev(ids, &u, &d);
                let sealed_device = rows::seal_ids(ids, b"access", &key, &[&d]);
                let except = except.map(|e| rows::seal_ids(ids, b"access.except", &key, &[&e]));
                write(session, "UPDATE access2 SET device_sealed = ?, locked_at = ?, lock_reason = ?, revoked_at = ?, revoke_reason = ?, signal = ?, except_sealed = ?, confirmed_signal = ?, confirmed_at = ?, last_seen = ?, fresh_from = ? WHERE user_p = ? AND device_p = ?",
                    (sealed_device, locked_at, lock_reason, revoked_at, revoke_reason, signal, except, csig, cat, seen, fresh, &up, &dp)).await?;
                if let (Some(org), Some(at)) = (org, org_written) {
                    let sealed = rows::seal_ids(ids, b"access.org", &key, &[&org]);
                    write(session, "UPDATE access2 USING TIMESTAMP ? SET org_sealed = ? WHERE user_p = ? AND device_p = ?",
                        (at, sealed, &up, &dp)).await?;
                }
                n += 1;
            }
        }
        "org_users" => {
            type Row = (String, String);
            for (org, user) in scan::<Row>(session, "SELECT org, user_id FROM org_users").await? {
                let (op, up) = (ids.org(&org).to_vec(), ids.user(&user).to_vec());
                let key = [op.as_slice(), up.as_slice()].concat();
                let sealed = rows::seal_ids(ids, b"org_users", &key, &[&user]);
                write(
                    session,
                    "INSERT INTO org_users2 (org_p, user_p, sealed) VALUES (?, ?, ?)",
                    (op, up, sealed),
                )
                .await?;
                n += 1;
            }
        }
        "pending_logouts" => {
            type Row = (String, String, Option<i64>);
            for (u, d, at) in scan::<Row>(
                session,
                "SELECT user_id, device_id, requested_at FROM pending_logouts",
            )
            .await?
            {
                let (up, dp, key) = dev(ids, &u, &d);
                let sealed = rows::seal_ids(ids, b"pending_logouts", &key, &[&u, &d]);
                write(session, "INSERT INTO pending_logouts2 (bucket, user_p, device_p, requested_at, sealed) VALUES (0, ?, ?, ?, ?)",
                    (up, dp, at, sealed)).await?;
                n += 1;
            }
        }
        "audit" => {
            type Row = (
                String,
                i32,
                i32,
                i64,
                i64,
                String,
                Vec<u8>,
                Vec<u8>,
                Option<String>,
                Option<i32>,
            );
            for (subject, month, node, seq, ts, entry, prev, hash, key_id, t) in scan::<Row>(
                session,
                "SELECT subject, month, node, n, ts, entry, prev, hash, key_id, TTL(ts) FROM audit",
            )
            .await?
            {
                let chain = crate::audit::model::Chain {
                    subject: subject.clone(),
                    month: month as u32,
                    node: node as u8,
                };
                let key = rows::audit_key(ids, &chain, seq as u64);
                let sealed = rows::seal_audit(ids, &key, &subject, &entry);
                write(session, "INSERT INTO audit2 (subject_p, month, node, n, ts, prev, hash, key_id, sealed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) USING TTL ?",
                    (ids.subject(&subject).to_vec(), month, node, seq, ts, prev, hash, key_id, sealed, ttl(t))).await?;
                n += 1;
            }
        }
        _ => {}
    }
    Ok(n)
}
