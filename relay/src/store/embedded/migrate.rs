//! Moves an embedded store written with ids in its keys (layout 1, before the relay 0.x that
//! added pseudonyms) to layout 2 (`rows.rs`), once, when the store opens.
//!
//! The copy goes into the layout-2 tables; only when it is complete and synced does a marker
//! say so, and only then are the layout-1 tables deleted (with their files). A crash during the
//! copy leaves the layout-1 tables whole: the next start clears the partial copy and begins
//! again. A crash during the deletion finds the marker and finishes it. Message records are
//! sealed under their rows' clear identities, which do not change, so their values move as
//! they are; values that now seal ids are sealed with the active at-rest key.

use fjall::{KeyspaceCreateOptions, PersistMode};
use uuid::Uuid;

use super::Tables;
use crate::access::model::AccessRow;
use crate::audit::model as audit;
use crate::store::record::{self, take_id, take_u64};
use crate::store::{DeviceRef, StoreError, rows};

/// The layout-1 tables, in the order they are copied.
const LAYOUT_1: [&str; 8] = [
    "inbox",
    "idempotency",
    "devices",
    "push_tokens",
    "access",
    "org_users",
    "pending_logouts",
    "audit",
];

/// Housekeeping key written once the copy is complete and synced.
const COPIED: &str = "layout-2-copied";

/// Rows written per batch.
const CHUNK: usize = 10_000;

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("migrating the store to layout 2: {e}"))
}

/// Migrates a layout-1 store, if this is one.
pub(super) fn embedded_layout_1(t: &Tables) -> Result<(), StoreError> {
    let legacy: Vec<&str> = LAYOUT_1
        .into_iter()
        .filter(|name| t.db.keyspace_exists(name))
        .collect();
    if legacy.is_empty() {
        return Ok(());
    }
    if t.housekeeping.get(COPIED).map_err(unavailable)?.is_none() {
        tracing::warn!(
            "store written by an older relay (ids in keys): migrating to pseudonymous keys"
        );
        for (_, new) in t.layout_2() {
            clear(t, new)?;
        }
        let mut moved = 0u64;
        for name in &legacy {
            moved += copy(t, name)?;
        }
        t.db.persist(PersistMode::SyncAll).map_err(unavailable)?;
        t.housekeeping.insert(COPIED, []).map_err(unavailable)?;
        t.db.persist(PersistMode::SyncAll).map_err(unavailable)?;
        tracing::warn!(rows = moved, "store migrated to pseudonymous keys");
    }
    for name in legacy {
        let old =
            t.db.keyspace(name, KeyspaceCreateOptions::default)
                .map_err(unavailable)?;
        t.db.delete_keyspace(old).map_err(unavailable)?;
    }
    // The journal still holds the layout-1 writes: write every table out so it can go.
    t.flush_all().map_err(unavailable)
}

fn clear(t: &Tables, ks: &fjall::Keyspace) -> Result<(), StoreError> {
    let mut batch = t.db.batch();
    for guard in ks.iter() {
        batch.remove(ks, guard.key().map_err(unavailable)?);
        if batch.len() >= CHUNK {
            std::mem::replace(&mut batch, t.db.batch())
                .commit()
                .map_err(unavailable)?;
        }
    }
    batch.commit().map_err(unavailable)
}

/// Copies one layout-1 table into its layout-2 table; returns the rows copied.
fn copy(t: &Tables, name: &str) -> Result<u64, StoreError> {
    let old =
        t.db.keyspace(name, KeyspaceCreateOptions::default)
            .map_err(unavailable)?;
    let new = t
        .layout_2()
        .into_iter()
        .find_map(|(n, ks)| (n == name).then(|| ks.clone()))
        .ok_or_else(|| unavailable(format!("no layout-2 table for {name}")))?;
    let ids = &t.ids;
    let mut batch = t.db.batch();
    let (mut copied, mut unreadable) = (0u64, 0u64);
    for guard in old.iter() {
        let (k, v) = guard.into_inner().map_err(unavailable)?;
        let device = || device_from_key(&k);
        let row: Option<(Vec<u8>, Vec<u8>)> = match name {
            "inbox" => device()
                .zip(record::inbox_key_seq(&k))
                .map(|(d, seq)| (rows::inbox_key(ids, &d, seq), v.to_vec())),
            "idempotency" => {
                let mut buf = &k[..];
                take_id(&mut buf)
                    .zip(Uuid::from_slice(buf).ok())
                    .map(|(user, id)| (rows::idempotency_key(ids, user, &id).to_vec(), v.to_vec()))
            }
            "devices" => device().map(|d| {
                let key = rows::device_key(ids, &d);
                let at = v.first_chunk::<8>().map_or(0, |b| u64::from_be_bytes(*b));
                (key.to_vec(), rows::device_value(ids, &key, &d, at))
            }),
            "push_tokens" => device().map(|d| (rows::device_key(ids, &d).to_vec(), v.to_vec())),
            "access" => device()
                .zip(serde_json::from_slice::<AccessRow>(&v).ok())
                .map(|(d, row)| {
                    let key = rows::device_key(ids, &d);
                    (key.to_vec(), rows::access_value(ids, &key, &d.device, &row))
                }),
            "org_users" => device().map(|d| {
                // Keyed `org | user`.
                let key = rows::org_user_key(ids, &d.user, &d.device);
                (key.to_vec(), rows::org_user_value(ids, &key, &d.device))
            }),
            "pending_logouts" => device()
                .zip(v.first_chunk::<8>().map(|b| u64::from_be_bytes(*b)))
                .map(|(d, at)| {
                    let key = rows::device_key(ids, &d);
                    (key.to_vec(), rows::pending_value(ids, &key, &d, at))
                }),
            "audit" => audit_record(&k, &v).map(|r| {
                let key = rows::audit_key(ids, &r.chain, r.n);
                let value = rows::audit_value(ids, &key, &r);
                (key, value)
            }),
            _ => None,
        };
        match row {
            Some((key, value)) => {
                batch.insert(&new, key, value);
                copied += 1;
            }
            None => unreadable += 1,
        }
        if batch.len() >= CHUNK {
            std::mem::replace(&mut batch, t.db.batch())
                .commit()
                .map_err(unavailable)?;
        }
    }
    batch.commit().map_err(unavailable)?;
    if unreadable > 0 {
        // Left behind with the layout-1 table; the count says how many.
        tracing::error!(
            table = name,
            rows = unreadable,
            "layout-1 rows that do not parse were not migrated"
        );
        metrics::counter!("relay_store_corrupt_rows_total").increment(unreadable);
    }
    Ok(copied)
}

/// `user | device` of a layout-1 key (also `org | user`), ignoring what follows.
fn device_from_key(key: &[u8]) -> Option<DeviceRef> {
    let mut buf = key;
    let user = take_id(&mut buf)?;
    let device = take_id(&mut buf)?;
    Some(DeviceRef::new(user, device))
}

/// A layout-1 audit row: key `subject | month | node | n`, value
/// `ts | prev | hash | entry [| 0 | key id]`.
fn audit_record(key: &[u8], value: &[u8]) -> Option<audit::Record> {
    let mut k = key;
    let subject = take_id(&mut k)?.to_string();
    let (month, k) = k.split_first_chunk::<4>()?;
    let (&node, mut k) = k.split_first()?;
    let n = take_u64(&mut k)?;
    let mut v = value;
    let ts = take_u64(&mut v)?;
    let (prev, v) = v.split_first_chunk::<32>()?;
    let (hash, v) = v.split_first_chunk::<32>()?;
    let (entry, key_id) = match v.iter().position(|&b| b == 0) {
        Some(at) => (&v[..at], &v[at + 1..]),
        None => (v, &[][..]),
    };
    Some(audit::Record {
        chain: audit::Chain {
            subject,
            month: u32::from_be_bytes(*month),
            node,
        },
        n,
        ts,
        entry: String::from_utf8(entry.to_vec()).ok()?,
        prev: *prev,
        hash: *hash,
        key_id: String::from_utf8(key_id.to_vec()).ok()?,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::access::model::Change;
    use crate::seal::Keyring;
    use crate::store::embedded::{EmbeddedStore, Memory};
    use crate::store::record::push_id;
    use crate::store::{
        AccessRows, AuditLog, DeliverySink, Devices, InboxEntry, MessageStore, Messages, NewMessage,
    };

    struct Nowhere;
    impl DeliverySink for Nowhere {
        fn deliver(&self, _: &[DeviceRef], _: &InboxEntry) {}
    }

    fn key(ids: &[&str]) -> Vec<u8> {
        let mut k = Vec::new();
        for id in ids {
            push_id(&mut k, id);
        }
        k
    }

    fn memory() -> Memory {
        Memory {
            cache_bytes: 1 << 20,
            memtable_bytes: 1 << 20,
            idle_flush: std::time::Duration::from_secs(30),
        }
    }

    /// A store as the relay wrote it before pseudonyms, with one row in every table.
    fn write_layout_1(path: &std::path::Path, ring: &Keyring, id: Uuid) {
        let db = fjall::Database::builder(path).open().expect("db");
        let ks = |name: &str| {
            db.keyspace(name, KeyspaceCreateOptions::default)
                .expect("ks")
        };
        let bob = DeviceRef::new("bob", "tablet");
        let alice = DeviceRef::new("alice", "phone");
        let rec = record::Record {
            ts: 5,
            urgent: true,
            from: &alice,
            to: &[],
            body: b"opaque",
        };
        let inbox_key = record::inbox_key(&bob, 7 << 12);
        let value = record::seal_inbox(ring, &inbox_key, &id, &rec);
        ks("inbox").insert(inbox_key, value).expect("inbox");
        let mut idem = key(&["alice"]);
        idem.extend_from_slice(id.as_bytes());
        ks("idempotency")
            .insert(idem, record::idempotency_value(7 << 12, 5))
            .expect("idempotency");
        for d in [&alice, &bob] {
            ks("devices")
                .insert(key(&[&d.user, &d.device]), 1u64.to_be_bytes())
                .expect("devices");
        }
        let token = push::DeviceToken {
            platform: push::Platform::Fcm,
            token: "fcm-token".into(),
            environment: push::Environment::Production,
            app_id: "app".into(),
        };
        let device_key = record::device_key(&bob);
        ks("push_tokens")
            .insert(
                &device_key,
                record::seal_push_token(ring, &device_key, &token),
            )
            .expect("push");
        let mut row = AccessRow::default();
        row.apply(Change::Seen { at: 9, org: None });
        ks("access")
            .insert(&device_key, serde_json::to_vec(&row).expect("json"))
            .expect("access");
        ks("org_users")
            .insert(key(&["clinic", "bob"]), [])
            .expect("org");
        ks("pending_logouts")
            .insert(&device_key, 11u64.to_be_bytes())
            .expect("pending");
        let mut akey = key(&["bob"]);
        akey.extend_from_slice(&24_300u32.to_be_bytes());
        akey.push(0);
        akey.extend_from_slice(&1u64.to_be_bytes());
        let mut avalue = 12u64.to_be_bytes().to_vec();
        avalue.extend_from_slice(&[1; 32]);
        avalue.extend_from_slice(&[2; 32]);
        avalue.extend_from_slice(br#"{"event":"connect"}"#);
        avalue.push(0);
        avalue.extend_from_slice(b"a1");
        ks("audit").insert(akey, avalue).expect("audit");
        db.persist(PersistMode::SyncAll).expect("persist");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_layout_1_store_opens_with_every_row_and_no_id_left_in_clear() {
        let dir = tempfile::tempdir().expect("dir");
        let ring = Arc::new(
            Keyring::parse(&format!("k:{}", Keyring::generate_key_b64()), "k").expect("ring"),
        );
        let id = Uuid::new_v4();
        write_layout_1(dir.path(), &ring, id);

        let store = EmbeddedStore::open(dir.path(), memory(), ring.clone(), Arc::new(Nowhere))
            .expect("open");
        let bob = DeviceRef::new("bob", "tablet");
        let page = store
            .inbox_page(bob.clone(), 0, 10, 1 << 20)
            .await
            .expect("inbox");
        assert_eq!(page.len(), 1);
        assert_eq!((page[0].id, &page[0].body[..]), (id, &b"opaque"[..]));
        let mut devices = store.devices("bob".into()).await.expect("devices");
        devices.extend(store.devices("alice".into()).await.expect("devices"));
        assert_eq!(devices, ["tablet", "phone"]);
        let token = store
            .push_token(bob.clone())
            .await
            .expect("push")
            .expect("token");
        assert_eq!(token.token, "fcm-token");
        let access = store.access("bob".into(), None).await.expect("access");
        assert_eq!(access.len(), 1);
        assert_eq!(
            (access[0].0.as_str(), access[0].1.last_seen),
            ("tablet", Some(9))
        );
        assert_eq!(
            store.org_users("clinic".into()).await.expect("org"),
            ["bob"]
        );
        assert_eq!(
            store.pending_logouts().await.expect("pending"),
            [(bob.clone(), 11)]
        );
        let audit = store.audit_read("bob".into(), 24_300).await.expect("audit");
        assert_eq!(audit.len(), 1);
        assert_eq!(
            (audit[0].entry.as_str(), audit[0].key_id.as_str()),
            (r#"{"event":"connect"}"#, "a1")
        );
        assert_eq!(
            store.audit_partitions().await.expect("partitions"),
            [("bob".to_string(), 24_300)]
        );
        // The sender's message id is still known: a resend is a duplicate.
        let again = store
            .append(NewMessage {
                id,
                from: DeviceRef::new("alice", "phone"),
                to: vec!["bob".into()],
                body: Bytes::from_static(b"opaque"),
                urgent: true,
            })
            .await
            .expect("reply")
            .expect("append");
        assert!(again.duplicate);
        assert_eq!(again.seq, 7 << 12);
        store.close().await.expect("close");
        drop(store);

        // The layout-1 tables are gone, and with them every id in clear from the table files.
        // (The journal keeps its last writes until it rotates, after 64 MB of writes: DEPLOY.md.)
        let db = fjall::Database::builder(dir.path()).open().expect("db");
        assert!(LAYOUT_1.iter().all(|name| !db.keyspace_exists(name)));
        drop(db);
        let mut files = Vec::new();
        let mut dirs = vec![dir.path().join("keyspaces")];
        while let Some(d) = dirs.pop() {
            for entry in std::fs::read_dir(d).expect("read dir").flatten() {
                let path = entry.path();
                if path.is_dir() {
                    dirs.push(path);
                } else {
                    files.extend(std::fs::read(path).unwrap_or_default());
                }
            }
        }
        assert!(files.len() > 1000, "the tables were written out");
        for id in [&b"tablet"[..], b"clinic", b"fcm-token"] {
            assert!(
                !files.windows(id.len()).any(|w| w == id),
                "{}",
                String::from_utf8_lossy(id)
            );
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_store_whose_ids_key_was_deleted_refuses_to_open() {
        let dir = tempfile::tempdir().expect("dir");
        let ring = Arc::new(
            Keyring::parse(&format!("k:{}", Keyring::generate_key_b64()), "k").expect("ring"),
        );
        let store = EmbeddedStore::open(dir.path(), memory(), ring.clone(), Arc::new(Nowhere))
            .expect("open");
        store
            .register_device(DeviceRef::new("bob", "tablet"))
            .await
            .expect("register");
        store.close().await.expect("close");
        drop(store);
        let db = fjall::Database::builder(dir.path()).open().expect("db");
        let housekeeping = db
            .keyspace("housekeeping", KeyspaceCreateOptions::default)
            .expect("ks");
        housekeeping.remove("ids-key").expect("remove");
        db.persist(PersistMode::SyncAll).expect("persist");
        drop(housekeeping);
        drop(db);
        // A fresh key would make every row, revocations included, look absent.
        let reopened = EmbeddedStore::open(dir.path(), memory(), ring, Arc::new(Nowhere));
        assert!(matches!(reopened, Err(StoreError::Refused(_))));
    }
}
