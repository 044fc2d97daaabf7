//! What each live node holds in the database: its leased node id (lightweight transactions,
//! renewed while it runs) and the at-rest key ids it announces.

use super::*;

/// How long a leased node id stays reserved without renewal, and how often it is renewed.
pub(super) const LEASE_TTL: Duration = Duration::from_secs(30);

pub(super) const LEASE_RENEW: Duration = Duration::from_secs(5);

/// Runs a lightweight transaction; whether it was applied.
pub(super) async fn lwt(
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

pub(super) async fn claim_id(session: &Session, id: u8, holder: &str) -> Result<bool, StoreError> {
    lwt(
        session,
        "INSERT INTO node_leases (node_id, holder) VALUES (?, ?) IF NOT EXISTS USING TTL 30",
        (i32::from(id), holder),
    )
    .await
}

/// Where the sequence numbers of node id `id` may resume: above everything it issued.
pub(super) async fn read_reservation(s: &Shared, id: u8) -> Result<u64, StoreError> {
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
pub(super) async fn claim_node_id(session: &Session, holder: &str) -> Result<u8, StoreError> {
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
pub(super) async fn keep_lease(s: Arc<Shared>, id: u8, holder: String) {
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
pub(super) async fn check_keys_against_live_nodes(
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

/// Writes this node's row of `node_keys`: the at-rest key ids it can open and the one it seals
/// with. It expires unless renewed, so a node that died stops counting after 30 s.
pub(super) async fn announce_keys(
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

pub(super) async fn keep_announcing(s: Arc<Shared>, node_id: u8) {
    loop {
        tokio::time::sleep(LEASE_RENEW).await;
        if let Err(e) = announce_keys(&s.session, node_id, &s.keyring).await {
            tracing::warn!(error = %e, "announcing the at-rest keys failed; retrying");
        }
    }
}
