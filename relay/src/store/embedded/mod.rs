//! The embedded backend: fjall (an LSM-tree) in the relay's data directory, for one node with no
//! services to run.
//!
//! One writer thread owns every write. It takes whatever requests queued up while the previous
//! commit was syncing, writes them as one batch, syncs the journal once (group commit), then fans
//! the messages out and answers the senders. That gives durable `accepted` at a cost of one
//! fsync per batch instead of per message, and a single total order of sequence numbers. Reads
//! (inbox replay) and expiry run on blocking threads beside it. Its behaviour is tested by the
//! store conformance suite in `tests/`, which runs against both backends.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use futures_util::FutureExt as _;
use futures_util::future::BoxFuture;
use tokio::sync::oneshot;

use super::pseudonym::Pseudonyms;
use super::queue::{self, Batch, Batches, Op, WriterQueue};
use super::record::{self, Record};
use super::rows;
use super::{
    Accepted, AccessRows, AppendTicket, AuditLog, Backup, DeliverySink, DeviceRef, Devices,
    Expired, InboxEntry, MessageStore, Messages, NewMessage, Retention, SeqClock, StoreError,
    add_recipients, now_ms, recipient_users, seq_floor,
};
use crate::access::model::{AccessRow, Change};
use crate::audit::model as audit;
use crate::seal::Keyring;

mod migrate;
mod readers;

/// Most requests committed in one batch.
const MAX_BATCH: usize = 2048;
/// Requests that may wait for the writer before senders get `unavailable`.
const QUEUE_DEPTH: usize = 65_536;
/// Rows deleted per batch during expiry.
const EXPIRY_CHUNK: usize = 10_000;
/// Free space below which a store whose writes failed is not reopened yet (and the disk counts
/// as full): room for the journal and for writing out write buffers.
const MIN_FREE_TO_REOPEN: u64 = 32 << 20;

#[derive(Clone)]
pub(super) struct Tables {
    pub(super) db: Database,
    pub(super) keyring: Arc<Keyring>,
    pub(super) ids: Arc<Pseudonyms>,
    inbox: Keyspace,
    archive: Keyspace,
    idempotency: Keyspace,
    devices: Keyspace,
    push_tokens: Keyspace,
    access: Keyspace,
    org_users: Keyspace,
    pending_logouts: Keyspace,
    audit: Keyspace,
    /// Small keys of the store itself: the sealed ids key, the layout marker, and one key
    /// rewritten when the store goes quiet (see `Writer::release_flushed_buffers`).
    pub(super) housekeeping: Keyspace,
}

impl Tables {
    /// Opens (or creates) the database under `path` and its tables.
    fn open(path: &Path, memory: Memory, keyring: Arc<Keyring>) -> Result<Tables, StoreError> {
        let db = Database::builder(path)
            .cache_size(memory.cache_bytes)
            .open()
            .map_err(unavailable)?;
        let ks = |name: &str| {
            db.keyspace(name, || {
                KeyspaceCreateOptions::default().max_memtable_size(memory.memtable_bytes)
            })
            .map_err(unavailable)
        };
        let housekeeping = ks("housekeeping")?;
        let ids = Arc::new(ids_key(&db, &housekeeping, &keyring)?);
        Ok(Tables {
            inbox: ks("inbox.2")?,
            archive: ks("archive")?,
            idempotency: ks("idempotency.2")?,
            devices: ks("devices.2")?,
            push_tokens: ks("push_tokens.2")?,
            access: ks("access.2")?,
            org_users: ks("org_users.2")?,
            pending_logouts: ks("pending_logouts.2")?,
            audit: ks("audit.2")?,
            housekeeping,
            keyring,
            ids,
            db: db.clone(),
        })
    }

    fn all(&self) -> [&Keyspace; 9] {
        [
            &self.inbox,
            &self.archive,
            &self.idempotency,
            &self.devices,
            &self.push_tokens,
            &self.access,
            &self.org_users,
            &self.pending_logouts,
            &self.audit,
        ]
    }

    /// Writes every table's buffer out and waits for it, so that older journal files, which
    /// fjall deletes once every table has been written past them, can go.
    pub(super) fn flush_all(&self) -> Result<(), fjall::Error> {
        let tables: Vec<&Keyspace> = self.all().into_iter().chain([&self.housekeeping]).collect();
        for table in &tables {
            table.rotate_memtable()?;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while tables.iter().any(|t| t.sealed_memtable_count() > 0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Every table, by its name in the database.
    pub(super) fn named(&self) -> [(&'static str, &Keyspace); 10] {
        [
            ("inbox.2", &self.inbox),
            ("archive", &self.archive),
            ("idempotency.2", &self.idempotency),
            ("devices.2", &self.devices),
            ("push_tokens.2", &self.push_tokens),
            ("access.2", &self.access),
            ("org_users.2", &self.org_users),
            ("pending_logouts.2", &self.pending_logouts),
            ("audit.2", &self.audit),
            ("housekeeping", &self.housekeeping),
        ]
    }

    /// The tables whose keys hold pseudonyms (layout 2), by their layout-1 names.
    pub(super) fn layout_2(&self) -> [(&'static str, &Keyspace); 8] {
        [
            ("inbox", &self.inbox),
            ("idempotency", &self.idempotency),
            ("devices", &self.devices),
            ("push_tokens", &self.push_tokens),
            ("access", &self.access),
            ("org_users", &self.org_users),
            ("pending_logouts", &self.pending_logouts),
            ("audit", &self.audit),
        ]
    }
}

/// Housekeeping key of the newest backup recorded.
const LAST_BACKUP: &str = "last-backup";

/// fjall-backed [`MessageStore`].
pub struct EmbeddedStore {
    slot: Arc<Slot>,
    ops: WriterQueue,
    status: Arc<Status>,
    /// Serializes read-modify-writes of access rows.
    access_lock: Arc<std::sync::Mutex<()>>,
    /// Inbox pages are read here, not on Tokio's blocking pool.
    readers: readers::Readers,
}

/// The open tables, shared by readers and the writer; empty while the writer reopens the
/// database (see [`Reopen`]).
struct Slot(RwLock<Option<Tables>>);

impl Slot {
    fn get(&self) -> Result<Tables, StoreError> {
        let tables = self.0.read().unwrap_or_else(|e| e.into_inner()).clone();
        tables.ok_or_else(|| StoreError::Unavailable("store reopening".into()))
    }

    fn set(&self, tables: Option<Tables>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = tables;
    }
}

/// What `/readyz` and the metrics say about the store.
struct Status {
    /// The last commit succeeded.
    healthy: AtomicBool,
    /// Writes failed and the data directory's file system is (still) short of space.
    disk_full: AtomicBool,
}

impl Status {
    fn set_disk_full(&self, full: bool) {
        self.disk_full.store(full, Ordering::Relaxed);
        metrics::gauge!("relay_store_disk_full").set(if full { 1.0 } else { 0.0 });
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// The memory the storage engine may use, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// Block cache shared by every table (reads).
    pub cache_bytes: u64,
    /// Largest in-memory write buffer (memtable) of each of the store's nine tables before it is
    /// written to disk. Applies to tables created with it: a store keeps the size it was created
    /// with.
    pub memtable_bytes: u64,
    /// Time without writes after which the write buffers are written out.
    pub idle_flush: Duration,
}

impl EmbeddedStore {
    /// Opens (or creates) the store under `path` and starts its writer thread.
    pub fn open(
        path: &Path,
        memory: Memory,
        keyring: Arc<Keyring>,
        sink: Arc<dyn DeliverySink>,
    ) -> Result<Self, StoreError> {
        let tables = Tables::open(path, memory, keyring.clone())?;
        migrate::embedded_layout_1(&tables)?;
        let last_seq = match tables.archive.last_key_value() {
            Some(guard) => {
                let key = guard.key().map_err(unavailable)?;
                key.first_chunk::<8>().map_or(0, |b| u64::from_be_bytes(*b))
            }
            None => 0,
        };
        let (tx, rx) = queue::channel(QUEUE_DEPTH, MAX_BATCH);
        // The writer thread waits on its queues through the runtime that opened the store.
        let runtime = tokio::runtime::Handle::try_current().map_err(unavailable)?;
        let slot = Arc::new(Slot(RwLock::new(Some(tables.clone()))));
        let status = Arc::new(Status {
            healthy: AtomicBool::new(true),
            disk_full: AtomicBool::new(false),
        });
        let writer = Writer {
            t: tables,
            sink,
            clock: SeqClock::new(0, last_seq),
            devices: HashMap::new(),
            keys: HashMap::new(),
            status: status.clone(),
            idle_flush: memory.idle_flush,
            reopen: Reopen {
                path: path.to_owned(),
                memory,
                keyring,
                slot: slot.clone(),
            },
        };
        let readers = readers::Readers::start().map_err(unavailable)?;
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || write_loop(writer, rx, &runtime))
            .map_err(unavailable)?;
        Ok(EmbeddedStore {
            slot,
            ops: tx,
            status,
            access_lock: Arc::default(),
            readers,
        })
    }

    /// The open tables; `Unavailable` while the writer reopens the database.
    pub(super) fn tables(&self) -> Result<Tables, StoreError> {
        self.slot.get()
    }

    fn read_page(
        t: &Tables,
        device: &DeviceRef,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<InboxEntry>, StoreError> {
        // A bounded range: an open end would walk past this device's rows over other devices'
        // ack tombstones until it found a live key.
        let start = rows::inbox_key(&t.ids, device, after.saturating_add(1));
        let end = rows::inbox_key(&t.ids, device, u64::MAX);
        let mut out = Vec::with_capacity(limit.min(256));
        let mut bytes = 0usize;
        for guard in t.inbox.range(start..=end) {
            if out.len() >= limit || bytes >= max_bytes {
                break;
            }
            let (key, value) = guard.into_inner().map_err(unavailable)?;
            let Some(seq) = record::inbox_key_seq(&key) else {
                continue;
            };
            // Sealed under the row's clear identity, which the reader knows.
            let opened = record::open_inbox(&t.keyring, &record::inbox_key(device, seq), &value);
            bytes += super::keep_inbox_row(&mut out, device, opened);
        }
        Ok(out)
    }

    fn expire_blocking(t: &Tables, now: u64, r: Retention) -> Result<Expired, StoreError> {
        let mut expired = Expired::default();
        let archive_end = seq_floor(now.saturating_sub(r.archive_ms)).to_be_bytes();
        expired.archive = delete_where(
            t,
            &t.archive,
            t.archive.range(..archive_end.as_slice()),
            |_, _| true,
        )?;
        let inbox_floor = seq_floor(now.saturating_sub(r.inbox_ms));
        expired.inbox = delete_where(t, &t.inbox, t.inbox.iter(), |k, _| {
            record::inbox_key_seq(k).is_some_and(|s| s < inbox_floor)
        })?;
        let audit_floor = now.saturating_sub(r.audit_ms);
        expired.audit = delete_where(t, &t.audit, t.audit.iter(), |_, v| {
            v.first_chunk::<8>()
                .is_some_and(|ts| u64::from_be_bytes(*ts) < audit_floor)
        })?;
        let idem_floor = now.saturating_sub(r.idempotency_ms);
        expired.idempotency = delete_where(t, &t.idempotency, t.idempotency.iter(), |_, v| {
            record::parse_idempotency_value(v).is_some_and(|(_, ts)| ts < idem_floor)
        })?;
        Ok(expired)
    }
}

/// Reads the ids key sealed in the store, or makes one for a new store; stores it sealed with
/// the active at-rest key either way (see `pseudonym.rs`).
fn ids_key(
    db: &Database,
    housekeeping: &Keyspace,
    keyring: &Keyring,
) -> Result<Pseudonyms, StoreError> {
    const KEY: &str = "ids-key";
    let (ids, store) = match housekeeping.get(KEY).map_err(unavailable)? {
        Some(sealed) => Pseudonyms::unwrap(keyring, &sealed)
            .map_err(|e| Pseudonyms::refusal(&format!("does not open ({e})")))?,
        None if db.keyspace_exists("devices.2") => {
            return Err(Pseudonyms::refusal("is missing from a store keyed by it"));
        }
        None => {
            let (ids, sealed) = Pseudonyms::generate(keyring).map_err(unavailable)?;
            (ids, Some(sealed))
        }
    };
    if let Some(sealed) = store {
        housekeeping.insert(KEY, sealed).map_err(unavailable)?;
        db.persist(PersistMode::SyncAll).map_err(unavailable)?;
    }
    Ok(ids)
}

/// Applies one access change: a read-modify-write of the device's row (and, for a last-seen
/// time naming an organisation, of the user row and the organisation's index). The caller holds
/// the access lock, so concurrent changes never undo each other.
fn apply_access(t: &Tables, device: &DeviceRef, change: Change) -> Result<(), StoreError> {
    let read = |id: &str| -> Result<(Vec<u8>, AccessRow), StoreError> {
        let key = rows::device_key(&t.ids, &DeviceRef::new(&device.user, id)).to_vec();
        let row = match t.access.get(&key).map_err(unavailable)? {
            Some(v) => {
                rows::open_access_value(&t.ids, &key, &v)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?
                    .1
            }
            None => AccessRow::default(),
        };
        Ok((key, row))
    };
    let (key, mut row) = read(&device.device)?;
    if let Change::Seen {
        at,
        org: Some((org, since)),
    } = &change
    {
        // The organisation belongs to the user row.
        let (user_key, mut user_row) = read("")?;
        let before = user_row.clone();
        user_row.set_org(org.clone(), *since);
        if user_row != before {
            let value = rows::access_value(&t.ids, &user_key, "", &user_row);
            t.access.insert(&user_key, value).map_err(unavailable)?;
        }
        let org_key = rows::org_user_key(&t.ids, org, &device.user);
        if !t.org_users.contains_key(org_key).map_err(unavailable)? {
            let value = rows::org_user_value(&t.ids, &org_key, &device.user);
            t.org_users.insert(org_key, value).map_err(unavailable)?;
        }
        row.apply(Change::Seen { at: *at, org: None });
    } else {
        row.apply(change);
    }
    let value = rows::access_value(&t.ids, &key, &device.device, &row);
    t.access.insert(&key, value).map_err(unavailable)
}

/// The devices of `user`.
fn list_devices(t: &Tables, user: &str) -> Result<Vec<DeviceRef>, StoreError> {
    let mut out = Vec::new();
    for guard in t.devices.prefix(rows::user_prefix(&t.ids, user)) {
        let (k, v) = guard.into_inner().map_err(unavailable)?;
        match rows::open_device_value(&t.ids, &k, &v) {
            Some(d) => out.push(d),
            None => metrics::counter!("relay_store_corrupt_rows_total").increment(1),
        }
    }
    Ok(out)
}

/// A store for unit tests elsewhere in the crate: a fresh key, 1 MiB of memory, no sink.
#[cfg(test)]
pub(crate) fn open_for_tests(dir: &Path) -> Arc<dyn MessageStore> {
    struct Nowhere;
    impl DeliverySink for Nowhere {
        fn deliver(&self, _: &[DeviceRef], _: &InboxEntry) {}
    }
    let ring = Keyring::parse(&format!("k:{}", Keyring::generate_key_b64()), "k").expect("ring");
    let memory = Memory {
        cache_bytes: 1 << 20,
        memtable_bytes: 1 << 20,
        idle_flush: Duration::from_secs(30),
    };
    Arc::new(EmbeddedStore::open(dir, memory, Arc::new(ring), Arc::new(Nowhere)).expect("open"))
}

impl EmbeddedStore {
    /// Runs `f` on the caller's thread with the tables: for a few point reads, microseconds on
    /// cached data, where a trip to the blocking pool costs two context switches (the handshake
    /// storm's profile). Reads only: a write takes fjall's journal lock, which the writer thread
    /// holds through its fsync, and may sleep in a write stall.
    fn inline<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Tables) -> Result<T, StoreError> + Send + 'static,
    ) -> BoxFuture<'_, Result<T, StoreError>> {
        std::future::ready(self.tables().and_then(|t| f(&t))).boxed()
    }

    /// Runs `f` on a blocking thread with the tables.
    fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Tables) -> Result<T, StoreError> + Send + 'static,
    ) -> BoxFuture<'_, Result<T, StoreError>> {
        let t = self.tables();
        async move {
            let t = t?;
            tokio::task::spawn_blocking(move || f(&t))
                .await
                .map_err(unavailable)?
        }
        .boxed()
    }
}

fn delete_where(
    t: &Tables,
    ks: &Keyspace,
    rows: fjall::Iter,
    pred: impl Fn(&[u8], &[u8]) -> bool,
) -> Result<u64, StoreError> {
    let mut deleted = 0u64;
    let mut batch = t.db.batch();
    for guard in rows {
        let (k, v) = guard.into_inner().map_err(unavailable)?;
        if pred(&k, &v) {
            batch.remove(ks, k);
            deleted += 1;
            if batch.len() >= EXPIRY_CHUNK {
                std::mem::replace(&mut batch, t.db.batch())
                    .commit()
                    .map_err(unavailable)?;
            }
        }
    }
    batch
        .durability(Some(PersistMode::SyncAll))
        .commit()
        .map_err(unavailable)?;
    Ok(deleted)
}

impl Messages for EmbeddedStore {
    fn append(&self, msg: NewMessage) -> AppendTicket {
        self.ops.append(msg)
    }

    fn inbox_page(
        &self,
        device: DeviceRef,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> BoxFuture<'_, Result<Vec<InboxEntry>, StoreError>> {
        let t = match self.tables() {
            Ok(t) => t,
            Err(e) => return std::future::ready(Err(e)).boxed(),
        };
        let read = self
            .readers
            .run(move || Self::read_page(&t, &device, after, limit, max_bytes));
        async move {
            read.await
                .unwrap_or_else(|| Err(unavailable("inbox read failed")))
        }
        .boxed()
    }

    fn ack(&self, device: DeviceRef, seqs: Vec<u64>) -> BoxFuture<'_, Result<(), StoreError>> {
        self.ops.ack(device, seqs).boxed()
    }

    fn archived(
        &self,
        seq: u64,
        id: uuid::Uuid,
    ) -> BoxFuture<'_, Result<Option<record::ArchivedMessage>, StoreError>> {
        self.blocking(move |t| {
            let key = record::archive_key(seq, &id);
            match t.archive.get(&key).map_err(unavailable)? {
                Some(v) => record::open_archive(&t.keyring, &key, &v)
                    .map(Some)
                    .map_err(|e| StoreError::Corrupt(e.to_string())),
                None => Ok(None),
            }
        })
    }

    fn expire(
        &self,
        now_ms: u64,
        retention: Retention,
    ) -> BoxFuture<'_, Result<Expired, StoreError>> {
        self.blocking(move |t| Self::expire_blocking(t, now_ms, retention))
    }
}

impl Devices for EmbeddedStore {
    fn register_device(&self, device: DeviceRef) -> BoxFuture<'_, Result<(), StoreError>> {
        // A device row is visible only once the writer's commit of it synced: a device found
        // here is registered, and only a new one waits for the writer.
        let known = self.tables().is_ok_and(|t| {
            t.devices
                .contains_key(rows::device_key(&t.ids, &device))
                .unwrap_or(false)
        });
        if known {
            return std::future::ready(Ok(())).boxed();
        }
        self.ops.register(device).boxed()
    }

    fn push_token(
        &self,
        device: DeviceRef,
    ) -> BoxFuture<'_, Result<Option<push::DeviceToken>, StoreError>> {
        self.blocking(move |t| {
            let aad = record::device_key(&device);
            match t
                .push_tokens
                .get(rows::device_key(&t.ids, &device))
                .map_err(unavailable)?
            {
                Some(v) => record::open_push_token(&t.keyring, &aad, &v)
                    .map(Some)
                    .map_err(|e| StoreError::Corrupt(e.to_string())),
                None => Ok(None),
            }
        })
    }

    fn set_push_token(
        &self,
        device: DeviceRef,
        token: Option<push::DeviceToken>,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        self.blocking(move |t| {
            let key = rows::device_key(&t.ids, &device);
            let aad = record::device_key(&device);
            match token {
                Some(token) => t
                    .push_tokens
                    .insert(key, record::seal_push_token(&t.keyring, &aad, &token)),
                None => t.push_tokens.remove(key),
            }
            .map_err(unavailable)?;
            t.db.persist(PersistMode::SyncAll).map_err(unavailable)
        })
    }

    fn devices(&self, user: String) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        self.blocking(move |t| {
            Ok(list_devices(t, &user)?
                .into_iter()
                .map(|d| d.device.to_string())
                .collect())
        })
    }
}

impl AccessRows for EmbeddedStore {
    fn access(
        &self,
        user: String,
        device: Option<String>,
    ) -> BoxFuture<'_, Result<Vec<(String, AccessRow)>, StoreError>> {
        // One device: two point reads, on every connect (twice). A whole user: a scan.
        let one = device.is_some();
        let read = move |t: &Tables| {
            let mut out = Vec::new();
            // An access row that does not open fails the read: a revocation is never
            // mistaken for its absence.
            let mut push = |key: &[u8], value: &[u8]| -> Result<(), StoreError> {
                let row = rows::open_access_value(&t.ids, key, value).map_err(|e| {
                    metrics::counter!("relay_store_corrupt_rows_total").increment(1);
                    StoreError::Corrupt(format!("access row: {e}"))
                })?;
                out.push(row);
                Ok(())
            };
            match device {
                Some(device) => {
                    for id in ["", device.as_str()] {
                        let key = rows::device_key(&t.ids, &DeviceRef::new(&user, id));
                        if let Some(v) = t.access.get(key).map_err(unavailable)? {
                            push(&key, &v)?;
                        }
                    }
                }
                None => {
                    for guard in t.access.prefix(rows::user_prefix(&t.ids, &user)) {
                        let (k, v) = guard.into_inner().map_err(unavailable)?;
                        push(&k, &v)?;
                    }
                }
            }
            Ok(out)
        };
        if one {
            self.inline(read)
        } else {
            self.blocking(read)
        }
    }

    fn update_access(
        &self,
        user: String,
        device: String,
        change: Change,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        self.update_access_many(vec![(DeviceRef::new(&user, &device), change)])
    }

    fn update_access_many(
        &self,
        changes: Vec<(DeviceRef, Change)>,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let lock = self.access_lock.clone();
        let sync = changes
            .iter()
            .any(|(_, c)| !matches!(c, Change::Seen { .. }));
        // Not inline even for last-seen times: a write takes fjall's journal lock, which the
        // writer thread holds through its fsync, and may sleep in a write stall.
        self.blocking(move |t: &Tables| {
            let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
            for (device, change) in changes {
                apply_access(t, &device, change)?;
            }
            // The rows are written: the sync below need not hold up the other updates.
            drop(guard);
            // Last-seen times ride on the next journal sync; revocations are durable now.
            if sync {
                t.db.persist(PersistMode::SyncAll).map_err(unavailable)?;
            }
            Ok(())
        })
    }

    fn org_users(&self, org: String) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        self.blocking(move |t| {
            let mut out = Vec::new();
            for guard in t.org_users.prefix(rows::org_prefix(&t.ids, &org)) {
                let (k, v) = guard.into_inner().map_err(unavailable)?;
                match rows::open_org_user_value(&t.ids, &k, &v) {
                    Some(user) => out.push(user),
                    None => metrics::counter!("relay_store_corrupt_rows_total").increment(1),
                }
            }
            Ok(out)
        })
    }

    fn pending_logouts(&self) -> BoxFuture<'_, Result<Vec<(DeviceRef, u64)>, StoreError>> {
        self.blocking(move |t| {
            let mut out = Vec::new();
            for guard in t.pending_logouts.iter() {
                let (k, v) = guard.into_inner().map_err(unavailable)?;
                match rows::open_pending_value(&t.ids, &k, &v) {
                    Some(pending) => out.push(pending),
                    None => metrics::counter!("relay_store_corrupt_rows_total").increment(1),
                }
            }
            Ok(out)
        })
    }

    fn set_pending_logout(
        &self,
        device: DeviceRef,
        requested_at: Option<u64>,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        self.blocking(move |t| {
            let key = rows::device_key(&t.ids, &device);
            match requested_at {
                Some(at) => t
                    .pending_logouts
                    .insert(key, rows::pending_value(&t.ids, &key, &device, at)),
                None => t.pending_logouts.remove(key),
            }
            .map_err(unavailable)?;
            t.db.persist(PersistMode::SyncAll).map_err(unavailable)
        })
    }
}

impl AuditLog for EmbeddedStore {
    fn audit_append(&self, records: Vec<audit::Record>) -> BoxFuture<'_, Result<(), StoreError>> {
        self.blocking(move |t| {
            let mut batch = t.db.batch();
            for r in &records {
                let key = rows::audit_key(&t.ids, &r.chain, r.n);
                let value = rows::audit_value(&t.ids, &key, r);
                batch.insert(&t.audit, key, value);
            }
            batch
                .durability(Some(PersistMode::SyncAll))
                .commit()
                .map_err(unavailable)
        })
    }

    fn audit_tail(
        &self,
        chain: audit::Chain,
    ) -> BoxFuture<'_, Result<Option<audit::Head>, StoreError>> {
        self.blocking(move |t| {
            let Some(guard) = t
                .audit
                .prefix(rows::audit_chain_prefix(&t.ids, &chain))
                .next_back()
            else {
                return Ok(None);
            };
            let (k, v) = guard.into_inner().map_err(unavailable)?;
            Ok(rows::audit_head(&k, &v))
        })
    }

    fn audit_read(
        &self,
        subject: String,
        month: u32,
    ) -> BoxFuture<'_, Result<Vec<audit::Record>, StoreError>> {
        self.blocking(move |t| {
            let mut out = Vec::new();
            for guard in t
                .audit
                .prefix(rows::audit_partition_prefix(&t.ids, &subject, month))
            {
                let (k, v) = guard.into_inner().map_err(unavailable)?;
                out.extend(rows::audit_record(&t.ids, &k, &v));
            }
            Ok(out)
        })
    }

    fn audit_partitions(&self) -> BoxFuture<'_, Result<Vec<(String, u32)>, StoreError>> {
        self.blocking(move |t| {
            // One record per partition names its subject (keys hold only its pseudonym).
            let mut out: Vec<(String, u32)> = Vec::new();
            let mut last: Option<Vec<u8>> = None;
            for guard in t.audit.iter() {
                let (k, v) = guard.into_inner().map_err(unavailable)?;
                let Some(partition) = k.get(..rows::AUDIT_PARTITION_LEN) else {
                    continue;
                };
                if last.as_deref() == Some(partition) {
                    continue;
                }
                last = Some(partition.to_vec());
                if let Some(r) = rows::audit_record(&t.ids, &k, &v) {
                    out.push((r.chain.subject, r.chain.month));
                }
            }
            out.sort();
            Ok(out)
        })
    }
}

impl MessageStore for EmbeddedStore {
    fn record_backup(&self, backup: Backup) -> BoxFuture<'_, Result<(), StoreError>> {
        self.blocking(move |t| {
            // The newest backup point wins, whatever the order they are recorded in.
            let current: Option<Backup> = t
                .housekeeping
                .get(LAST_BACKUP)
                .map_err(unavailable)?
                .and_then(|v| serde_json::from_slice(&v).ok());
            if current.is_some_and(|c| c.taken_at > backup.taken_at) {
                return Ok(());
            }
            let value = serde_json::to_vec(&backup).map_err(unavailable)?;
            t.housekeeping
                .insert(LAST_BACKUP, value)
                .map_err(unavailable)?;
            t.db.persist(PersistMode::SyncAll).map_err(unavailable)
        })
    }

    fn last_backup(&self) -> BoxFuture<'_, Result<Option<Backup>, StoreError>> {
        self.blocking(move |t| {
            Ok(t.housekeeping
                .get(LAST_BACKUP)
                .map_err(unavailable)?
                .and_then(|v| serde_json::from_slice(&v).ok()))
        })
    }

    fn ready(&self) -> bool {
        self.status.healthy.load(Ordering::Relaxed) && !self.ops.is_closed()
    }

    fn disk_full(&self) -> bool {
        self.status.disk_full.load(Ordering::Relaxed)
    }

    fn close(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        self.ops.close().boxed()
    }
}

/// State owned by the writer thread.
struct Writer {
    t: Tables,
    sink: Arc<dyn DeliverySink>,
    clock: SeqClock,
    /// Devices per user, loaded on first use. Only this thread adds devices, so it stays exact.
    devices: HashMap<Arc<str>, Vec<DeviceRef>>,
    /// Devices' pseudonyms (two HMACs each), for the inbox keys of every message to them.
    keys: HashMap<DeviceRef, [u8; 2 * super::pseudonym::LEN]>,
    status: Arc<Status>,
    idle_flush: Duration,
    reopen: Reopen,
}

/// Why the writer stopped.
enum Stop {
    Closed,
    /// A write failed and fjall refuses every later one ("poisoned": after a failed journal
    /// write or fsync, what is in memory can no longer be trusted to match the disk).
    Poisoned,
}

/// Runs the writer; when the database is poisoned (a full disk, an I/O error), reopens it from
/// disk as a restart would, once there is room, and goes on with the same sequence clock.
fn write_loop(mut writer: Writer, mut batches: Batches, runtime: &tokio::runtime::Handle) {
    while let Stop::Poisoned = writer.run(&mut batches, runtime) {
        let Writer {
            t,
            sink,
            clock,
            status,
            idle_flush,
            reopen,
            ..
        } = writer;
        let Some(t) = reopen.wait(t, &mut batches, runtime, &status) else {
            return;
        };
        writer = Writer {
            t,
            sink,
            clock,
            devices: HashMap::new(),
            keys: HashMap::new(),
            status,
            idle_flush,
            reopen,
        };
    }
}

/// What reopening the database needs.
struct Reopen {
    path: PathBuf,
    memory: Memory,
    keyring: Arc<Keyring>,
    slot: Arc<Slot>,
}

impl Reopen {
    /// Whether the data directory's file system lacks the room to reopen (unknown: no).
    fn disk_full(&self) -> bool {
        let need = (2 * self.memory.memtable_bytes).max(MIN_FREE_TO_REOPEN);
        rustix::fs::statvfs(&self.path).is_ok_and(|s| s.f_bavail.saturating_mul(s.f_frsize) < need)
    }

    /// Refuses writes (retryable) until there is room and the poisoned database `old` opens
    /// again; `None` when the store is closed meanwhile. Reads go on from `old` until then.
    fn wait(
        &self,
        old: Tables,
        batches: &mut Batches,
        runtime: &tokio::runtime::Handle,
        status: &Status,
    ) -> Option<Tables> {
        let mut old = Some(old);
        let mut backoff = Duration::from_secs(1);
        let mut next_try = Instant::now();
        loop {
            let full = self.disk_full();
            status.set_disk_full(full);
            if !full && Instant::now() >= next_try {
                // fjall locks its directory until the last handle goes: readers get
                // `Unavailable` from now, and the ones reading finish with the old handles.
                if old.take().is_some() {
                    self.slot.set(None);
                }
                match Tables::open(&self.path, self.memory, self.keyring.clone()) {
                    Ok(t) => {
                        self.slot.set(Some(t.clone()));
                        status.healthy.store(true, Ordering::Relaxed);
                        metrics::counter!("relay_store_reopens_total").increment(1);
                        tracing::warn!("store reopened after failed writes");
                        return Some(t);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "reopening the store failed");
                        next_try = Instant::now() + backoff;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
            }
            let why = if full { "disk full" } else { "store reopening" };
            let tick = Duration::from_millis(if full { 1000 } else { 200 });
            match runtime.block_on(async { tokio::time::timeout(tick, batches.next()).await }) {
                Ok(Some(batch)) => {
                    if refuse(batch, why, old.as_ref()) {
                        return None;
                    }
                }
                Ok(None) => return None,
                Err(_tick) => {}
            }
        }
    }
}

/// Answers a batch taken while the database refuses writes: refused, retryable, except that a
/// device already registered is (its session starts; nothing to write). True when it asked the
/// store to close (what was committed before is on disk already).
fn refuse(Batch { ops, acks }: Batch, why: &str, old: Option<&Tables>) -> bool {
    let err = || StoreError::Unavailable(why.into());
    for ack in acks {
        let _ = ack.done.send(Err(err()));
    }
    for op in ops {
        match op {
            Op::Append(_, reply) => {
                let _ = reply.send(Err(err()));
            }
            Op::Register(device, reply) => {
                let known = old.and_then(|t| list_devices(t, &device.user).ok());
                let known = known.is_some_and(|list| list.contains(&device));
                let _ = reply.send(if known { Ok(()) } else { Err(err()) });
            }
            Op::Seen(_) => {}
            Op::Close(reply) => {
                let _ = reply.send(Ok(()));
                return true;
            }
        }
    }
    false
}

/// The devices an appended message goes to, and the message.
type Fanout = (Vec<DeviceRef>, InboxEntry);

/// What one appended message needs after its batch commits.
struct Done {
    reply: oneshot::Sender<Result<Accepted, StoreError>>,
    accepted: Accepted,
    fanout: Option<Fanout>,
}

impl Writer {
    fn run(&mut self, batches: &mut Batches, runtime: &tokio::runtime::Handle) -> Stop {
        // Write buffers written out by the last idle flush whose memory is not released yet.
        let mut unreleased = false;
        let mut gauges_at = Instant::now();
        loop {
            let next = runtime
                .block_on(async { tokio::time::timeout(self.idle_flush, batches.next()).await });
            let idle = next.is_err();
            match next {
                Ok(Some(batch)) => {
                    unreleased = false;
                    if let Some(stop) = self.commit(batch) {
                        return stop;
                    }
                }
                Ok(None) => return Stop::Closed,
                // Another writer (access rows, audit) may have met the failure.
                Err(_idle) if self.poisoned() => return Stop::Poisoned,
                Err(_idle) if unreleased => unreleased = !self.release_flushed_buffers(),
                Err(_idle) => unreleased = self.flush_write_buffers(),
            }
            // Once a second at most: reading the cache's size locks each of its shards.
            if idle || gauges_at.elapsed() >= Duration::from_secs(1) {
                gauges_at = Instant::now();
                metrics::gauge!("relay_store_write_buffer_bytes")
                    .set(self.t.db.write_buffer_size() as f64);
                metrics::gauge!("relay_store_cache_bytes").set(self.t.db.cache_size() as f64);
            }
        }
    }

    /// Whether fjall refuses writes for good (see [`Stop::Poisoned`]).
    fn poisoned(&self) -> bool {
        matches!(
            self.t.db.persist(PersistMode::Buffer),
            Err(fjall::Error::Poisoned)
        )
    }

    /// A quiet store writes its buffers out (in the background) instead of holding up to
    /// `memtable_bytes` per table in memory until the next burst fills them. (`rotate_memtable`
    /// is what fjall's own size-triggered flush calls; fjall keeps it out of its docs.) Returns
    /// whether anything was written out.
    fn flush_write_buffers(&self) -> bool {
        if self.t.db.write_buffer_size() == 0 {
            return false;
        }
        for table in self.t.all() {
            if let Err(e) = table.rotate_memtable() {
                tracing::warn!(error = %e, "idle write-buffer flush failed");
            }
        }
        true
    }

    /// Frees the buffers the last idle flush wrote out. fjall keeps each table's version from
    /// before a flush, and with it the written buffer, until its next rotation collects old
    /// versions, which a quiet store never has. Rotating a one-key table does that for every
    /// table, at the cost of one tiny table file per quiet period. Returns false while the
    /// flush is still running (it is tried again at the next idle tick).
    fn release_flushed_buffers(&self) -> bool {
        if self.t.all().iter().any(|t| t.sealed_memtable_count() > 0) {
            return false;
        }
        let stamp = super::now_ms().to_be_bytes();
        let rotated = self
            .t
            .housekeeping
            .insert("idle", stamp)
            .and_then(|()| self.t.housekeeping.rotate_memtable());
        if let Err(e) = rotated {
            tracing::warn!(error = %e, "releasing flushed write buffers failed");
        }
        true
    }

    fn devices_of(&mut self, user: &str) -> Result<&[DeviceRef], StoreError> {
        if !self.devices.contains_key(user) {
            if self.devices.len() >= super::DEVICE_CACHE_USERS {
                self.devices.clear();
            }
            let list = list_devices(&self.t, user)?;
            self.devices.insert(user.into(), list);
            metrics::gauge!("relay_device_cache_users").set(self.devices.len() as f64);
        }
        Ok(self.devices.get(user).map_or(&[], Vec::as_slice))
    }

    fn device_key(&mut self, d: &DeviceRef) -> [u8; 2 * super::pseudonym::LEN] {
        if let Some(key) = self.keys.get(d) {
            return *key;
        }
        if self.keys.len() >= super::DEVICE_CACHE_USERS {
            self.keys.clear();
        }
        let key = rows::device_key(&self.t.ids, d);
        self.keys.insert(d.clone(), key);
        key
    }

    /// Commits one batch of requests. Returns why to stop, if the writer must.
    fn commit(&mut self, Batch { ops, acks }: Batch) -> Option<Stop> {
        let started = Instant::now();
        let mut batch = self.t.db.batch();
        let mut done: Vec<Done> = Vec::new();
        let mut registered: Vec<(DeviceRef, oneshot::Sender<Result<(), StoreError>>)> = Vec::new();
        let mut close = None;
        let mut durable = false;
        let mut in_batch: HashMap<Vec<u8>, Accepted> = HashMap::new();
        let now = now_ms();
        let mut failed: Option<StoreError> = None;

        for ack in &acks {
            let device = self.device_key(&ack.device);
            for &seq in &ack.seqs {
                batch.remove(&self.t.inbox, rows::inbox_key_under(&device, seq));
            }
        }
        for op in ops {
            match op {
                Op::Append(msg, reply) => {
                    match self.stage_append(&mut batch, &mut in_batch, msg, now) {
                        Ok((accepted, fanout)) => {
                            durable |= !accepted.duplicate;
                            done.push(Done {
                                reply,
                                accepted,
                                fanout,
                            });
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                Op::Register(device, reply) => {
                    match self.devices_of(&device.user).map(|d| d.contains(&device)) {
                        Ok(true) => {
                            let _ = reply.send(Ok(()));
                        }
                        Ok(false) => {
                            self.stage_register(&mut batch, &device, now);
                            durable = true;
                            registered.push((device, reply));
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                Op::Seen(_) => {} // one node: every device list is current
                Op::Close(reply) => {
                    close = Some(reply);
                    durable = true;
                    break; // later requests (there are none once closing) are dropped
                }
            }
        }

        let mode = durable.then_some(PersistMode::SyncAll);
        if !batch.is_empty() || close.is_some() {
            let result = batch.durability(mode).commit().and_then(|()| match close {
                Some(_) => self.t.db.persist(PersistMode::SyncAll),
                None => Ok(()),
            });
            if let Err(e) = result {
                failed = Some(unavailable(e));
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        metrics::histogram!("relay_store_commit_duration_seconds").record(elapsed);
        metrics::histogram!("relay_store_commit_batch_size").record(done.len() as f64);

        self.answer(failed, done, registered, acks);
        if let Some(reply) = close {
            let _ = reply.send(Ok(()));
            return Some(Stop::Closed);
        }
        (!self.status.healthy.load(Ordering::Relaxed) && self.poisoned()).then_some(Stop::Poisoned)
    }

    /// Adds a device unknown to its user's list to the batch (and the cached list).
    fn stage_register(&mut self, batch: &mut fjall::OwnedWriteBatch, device: &DeviceRef, now: u64) {
        let key = rows::device_key(&self.t.ids, device);
        let value = rows::device_value(&self.t.ids, &key, device, now);
        batch.insert(&self.t.devices, key, value);
        if let Some(list) = self.devices.get_mut(&device.user) {
            list.push(device.clone());
        }
    }

    /// After the commit: fan out and answer everyone, or tell everyone it failed.
    fn answer(
        &mut self,
        failed: Option<StoreError>,
        done: Vec<Done>,
        registered: Vec<(DeviceRef, oneshot::Sender<Result<(), StoreError>>)>,
        acks: Vec<queue::Ack>,
    ) {
        match failed {
            None => {
                self.status.healthy.store(true, Ordering::Relaxed);
                for d in done {
                    if let Some((devices, entry)) = &d.fanout {
                        self.sink.deliver(devices, entry);
                    }
                    let _ = d.reply.send(Ok(d.accepted));
                }
                for (_, reply) in registered {
                    let _ = reply.send(Ok(()));
                }
                for ack in acks {
                    let _ = ack.done.send(Ok(()));
                }
            }
            Some(e) => {
                self.status.healthy.store(false, Ordering::Relaxed);
                self.status.set_disk_full(self.reopen.disk_full());
                metrics::counter!("relay_store_errors_total", "op" => "commit").increment(1);
                tracing::error!(error = %e, "store commit failed");
                // The cache may now list devices that were never written: reload on next use.
                self.devices.clear();
                for d in done {
                    let _ = d
                        .reply
                        .send(Err(StoreError::Unavailable("commit failed".into())));
                }
                for (_, reply) in registered {
                    let _ = reply.send(Err(StoreError::Unavailable("commit failed".into())));
                }
                for ack in acks {
                    let _ = ack
                        .done
                        .send(Err(StoreError::Unavailable("commit failed".into())));
                }
            }
        }
    }

    fn stage_append(
        &mut self,
        batch: &mut fjall::OwnedWriteBatch,
        in_batch: &mut HashMap<Vec<u8>, Accepted>,
        msg: NewMessage,
        now: u64,
    ) -> Result<(Accepted, Option<Fanout>), StoreError> {
        let idem_key = rows::idempotency_key(&self.t.ids, &msg.from.user, &msg.id).to_vec();
        if let Some(prev) = in_batch.get(&idem_key) {
            return Ok((
                Accepted {
                    duplicate: true,
                    ..*prev
                },
                None,
            ));
        }
        if let Some(v) = self.t.idempotency.get(&idem_key).map_err(unavailable)?
            && let Some((seq, ts)) = record::parse_idempotency_value(&v)
        {
            return Ok((
                Accepted {
                    seq,
                    ts,
                    duplicate: true,
                },
                None,
            ));
        }
        let seq = self.clock.next(now);
        let accepted = Accepted {
            seq,
            ts: now,
            duplicate: false,
        };

        let mut targets = Vec::new();
        for user in recipient_users(&msg) {
            add_recipients(&mut targets, &msg, self.devices_of(user)?);
        }
        let inbox_rec = Record {
            ts: now,
            urgent: msg.urgent,
            from: &msg.from,
            to: &[],
            body: &msg.body,
        };
        for d in &targets {
            let value = record::seal_inbox(
                &self.t.keyring,
                &record::inbox_key(d, seq),
                &msg.id,
                &inbox_rec,
            );
            let key = rows::inbox_key_under(&self.device_key(d), seq);
            batch.insert(&self.t.inbox, key, value);
        }
        let akey = record::archive_key(seq, &msg.id);
        let archive_rec = Record {
            to: &msg.to,
            ..inbox_rec
        };
        let avalue = record::seal_archive(&self.t.keyring, &akey, &archive_rec);
        batch.insert(&self.t.archive, akey, avalue);
        batch.insert(
            &self.t.idempotency,
            idem_key.clone(),
            record::idempotency_value(seq, now).to_vec(),
        );
        in_batch.insert(idem_key, accepted);

        let entry = InboxEntry {
            seq,
            ts: now,
            id: msg.id,
            from: msg.from,
            urgent: msg.urgent,
            body: msg.body,
        };
        Ok((accepted, (!targets.is_empty()).then_some((targets, entry))))
    }
}
