//! The schema: the migrations from `schema/*.cql`, applied in order by `relay migrate`, and the
//! version a relay needs.

use super::*;

/// Schema version this relay needs.
pub const SCHEMA_VERSION: i32 = 11;

/// Migrations, in order: (version, name, CQL).
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "initial",
        include_str!("../../../../schema/0001_initial.cql"),
    ),
    (
        2,
        "push_tokens",
        include_str!("../../../../schema/0002_push_tokens.cql"),
    ),
    (
        3,
        "node_leases",
        include_str!("../../../../schema/0003_node_leases.cql"),
    ),
    (
        4,
        "access_audit",
        include_str!("../../../../schema/0004_access_audit.cql"),
    ),
    (
        5,
        "fresh_login",
        include_str!("../../../../schema/0005_fresh_login.cql"),
    ),
    (
        6,
        "sequence_reservations",
        include_str!("../../../../schema/0006_sequence_reservations.cql"),
    ),
    (
        7,
        "audit_keys",
        include_str!("../../../../schema/0007_audit_keys.cql"),
    ),
    (
        8,
        "node_keys",
        include_str!("../../../../schema/0008_node_keys.cql"),
    ),
    (
        9,
        "pseudonyms",
        include_str!("../../../../schema/0009_pseudonyms.cql"),
    ),
    (
        10,
        "backups",
        include_str!("../../../../schema/0010_backups.cql"),
    ),
    (
        11,
        "registered",
        include_str!("../../../../schema/0011_registered.cql"),
    ),
];

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
pub(super) fn added_column(stmt: &str) -> Option<(&str, &str)> {
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
pub(super) fn target_table(stmt: &str) -> Option<&str> {
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

pub(super) async fn column_exists(
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

/// The least request timeout of a migration's session.
const MIGRATION_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// [`migrate`], stopping after version `up_to` (tests of a migration start below it).
pub async fn migrate_to(
    cfg: &ScyllaConfig,
    keyring: Option<&Keyring>,
    up_to: i32,
) -> Result<Vec<i32>, StoreError> {
    // Schema changes and a migration's row copies outlast a message-path request on a busy
    // cluster (Cassandra flushes and snapshots a table it drops): the configured timeout, but
    // never under a minute.
    let cfg = &ScyllaConfig {
        request_timeout: Dur(cfg.request_timeout.0.max(MIGRATION_REQUEST_TIMEOUT)),
        ..cfg.clone()
    };
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
        &super::pseudonyms::OLD_TABLES
    } else {
        &[]
    };
    let mut applied = Vec::new();
    for (version, name, cql) in MIGRATIONS {
        if have.contains(version) || *version > up_to {
            continue;
        }
        if *version == 9 {
            super::pseudonyms::refuse_while_nodes_run(&session).await?;
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
            let moved = super::pseudonyms::move_rows(&session, ks, keyring, async |k| {
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

pub(super) async fn applied_versions(session: &Session) -> Result<Vec<i32>, StoreError> {
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
}
