//! Durable storage of messages, in relay terms: append a message for its recipients' devices, read
//! a device's inbox after a cursor, acknowledge, expire.
//!
//! [`MessageStore`] is the one trait, implemented by two backends: `embedded/` on fjall (one
//! node, no services) and `scylla/` on ScyllaDB (a cluster of relays). Payloads are sealed with
//! the [`Keyring`](crate::seal::Keyring) before they reach a backend, and `record.rs` is the one
//! binary layout both use. The store knows nothing above it: the access and audit rows it keeps
//! are the models' types (`access::model`, `audit::model`), its options are its own
//! (`scylla::ScyllaConfig`), and it hands committed messages up through [`DeliverySink`].
//!
//! **Invariant:** `append` resolves `Ok` only once the message is durable, and a backend hands
//! every appended message to the [`DeliverySink`] after it is durable, in sequence order per
//! device. A live delivery therefore never overtakes the store.

pub mod backup;
pub mod embedded;
pub mod pseudonym;
mod queue;
pub mod record;
pub mod rows;
pub mod scylla;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::access::model::{AccessRow, Change};
use crate::audit::model as audit;
pub use crate::ids::{
    DeviceRef, MAX_NODES, MAX_SAFE_SEQ, SeqClock, now_ms, seq_floor, seq_span, seq_time_ms,
};

/// A message to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    /// Client-chosen id; `(sender user, id)` is the idempotency key.
    pub id: Uuid,
    /// Sending device.
    pub from: DeviceRef,
    /// Recipient user ids (deduplicated by the caller).
    pub to: Vec<String>,
    /// Opaque body.
    pub body: Bytes,
    /// Urgent flag.
    pub urgent: bool,
}

/// Outcome of a durable append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// Sequence assigned to the message.
    pub seq: u64,
    /// Accept time, ms since the Unix epoch.
    pub ts: u64,
    /// The id had been accepted before; nothing new was stored.
    pub duplicate: bool,
}

/// A message as it sits in a device's inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxEntry {
    /// Sequence (the inbox order).
    pub seq: u64,
    /// Accept time, ms since the Unix epoch.
    pub ts: u64,
    /// Message id.
    pub id: Uuid,
    /// Sender.
    pub from: DeviceRef,
    /// Urgent flag.
    pub urgent: bool,
    /// Opaque body.
    pub body: Bytes,
}

/// Receives every durably appended message, in sequence order, for live fan-out.
pub trait DeliverySink: Send + Sync + 'static {
    /// `devices` are all the devices whose inbox received `entry`, each once, grouped by user
    /// (as [`add_recipients`] builds them).
    fn deliver(&self, devices: &[DeviceRef], entry: &InboxEntry);

    /// A backend shared by nodes says which rows it is writing: `Some(oldest)` when a batch
    /// stores messages from sequence number `oldest` on, `None` once they are delivered
    /// here. Another node recovers them from the store if this one dies in between.
    fn storing(&self, _oldest: Option<u64>) {}
}

/// The users whose devices a message is stored for: the sender (for their other devices),
/// then the recipients. Both backends expand a message this way.
pub fn recipient_users(msg: &NewMessage) -> impl Iterator<Item = &str> {
    std::iter::once(&*msg.from.user).chain(msg.to.iter().map(String::as_str))
}

/// Adds the devices of one of [`recipient_users`] to `targets`: all but the sending device,
/// each once. Called user by user, it leaves `targets` grouped by user.
pub fn add_recipients(targets: &mut Vec<DeviceRef>, msg: &NewMessage, devices: &[DeviceRef]) {
    for d in devices {
        if *d != msg.from && !targets.contains(d) {
            targets.push(d.clone());
        }
    }
}

/// Rows removed by one expiry pass.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Expired {
    /// Archive rows past retention.
    pub archive: u64,
    /// Inbox rows never acknowledged within the inbox retention.
    pub inbox: u64,
    /// Idempotency records past their window.
    pub idempotency: u64,
    /// Audit records past retention (the embedded backend; ScyllaDB expires them by TTL).
    pub audit: u64,
}

/// Retention periods, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Ciphertext archive (regulatory retention; six years by default).
    pub archive_ms: u64,
    /// Unacknowledged inbox rows.
    pub inbox_ms: u64,
    /// How long a message id stays deduplicated.
    pub idempotency_ms: u64,
    /// The access audit trail, on its own clock: shortening the archive never shortens it.
    pub audit_ms: u64,
}

/// Store failures. None of them carries payload data.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend failed or is unreachable; the operation may be retried.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Stored data failed authentication (tampering, or a key that was removed).
    #[error("stored data is unreadable: {0}")]
    Corrupt(String),
    /// The store is shutting down.
    #[error("store is closed")]
    Closed,
    /// The store will not open as configured; an operator must act (the message says how).
    #[error("refused: {0}")]
    Refused(String),
}

/// A backup that finished: its point in time and a name to find it by.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Backup {
    /// The backup point, ms since the Unix epoch.
    pub taken_at: u64,
    /// Where it is (the embedded backup's directory) or its snapshot tag (ScyllaDB).
    pub tag: String,
}

/// A pending durable append; resolves when the message is durable (or failed).
pub type AppendTicket = oneshot::Receiver<Result<Accepted, StoreError>>;

/// A device's inbox and the archive: what every session uses.
pub trait Messages: Send + Sync + 'static {
    /// Queues `msg` for a durable append. Appends from one caller are applied in call order, so
    /// a device's pipelined sends keep their order. Never blocks.
    fn append(&self, msg: NewMessage) -> AppendTicket;

    /// Inbox entries of `device` with `seq > after`, in order: up to `limit` entries, and no
    /// more once their bodies reach `max_bytes` (the first entry is always included).
    fn inbox_page(
        &self,
        device: DeviceRef,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> BoxFuture<'_, Result<Vec<InboxEntry>, StoreError>>;

    /// Removes acknowledged entries from the device's inbox. Losing an ack to a crash only causes
    /// a redelivery, so this need not be durable before it returns.
    fn ack(&self, device: DeviceRef, seqs: Vec<u64>) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Reads one archived message by its sequence and id (support tooling, legal holds, tests).
    fn archived(
        &self,
        seq: u64,
        id: Uuid,
    ) -> BoxFuture<'_, Result<Option<record::ArchivedMessage>, StoreError>>;

    /// Deletes what is past retention as of `now_ms`.
    fn expire(
        &self,
        now_ms: u64,
        retention: Retention,
    ) -> BoxFuture<'_, Result<Expired, StoreError>>;
}

/// The devices of each user and their push registrations.
pub trait Devices: Send + Sync + 'static {
    /// Records that a device exists for its user, so messages to the user reach it.
    fn register_device(&self, device: DeviceRef) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Another node reports that `device` connected: a backend that caches users' device lists
    /// makes sure the next append to the user includes it.
    fn device_seen(&self, device: DeviceRef) {
        let _ = device;
    }

    /// Device ids registered for `user`.
    fn devices(&self, user: String) -> BoxFuture<'_, Result<Vec<String>, StoreError>>;

    /// The device's push registration, if it has one.
    fn push_token(
        &self,
        device: DeviceRef,
    ) -> BoxFuture<'_, Result<Option<push::DeviceToken>, StoreError>>;

    /// Saves (`Some`) or removes (`None`) the device's push registration; durable on return.
    fn set_push_token(
        &self,
        device: DeviceRef,
        token: Option<push::DeviceToken>,
    ) -> BoxFuture<'_, Result<(), StoreError>>;
}

/// Access state (`crate::access::model`): revocations, locks, confirmations, pending logouts and
/// the organisations users belong to.
pub trait AccessRows: Send + Sync + 'static {
    /// Access rows of `user`: the user row (id `""`) and the row of `device`, or every row
    /// when `device` is `None`. Rows never written are absent.
    fn access(
        &self,
        user: String,
        device: Option<String>,
    ) -> BoxFuture<'_, Result<Vec<(String, AccessRow)>, StoreError>>;

    /// Applies `change` to row `device` (`""`: the user row) of `user`; durable on return.
    fn update_access(
        &self,
        user: String,
        device: String,
        change: Change,
    ) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Applies each change as `update_access` would, in one call: the batch of last-seen times
    /// a node's connects and disconnects leave (`session::seen`). Durable on return unless
    /// every change is a `Change::Seen` (a last-seen time is rewritten at the next connect).
    fn update_access_many(
        &self,
        changes: Vec<(DeviceRef, Change)>,
    ) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Users whose tokens named `org`.
    fn org_users(&self, org: String) -> BoxFuture<'_, Result<Vec<String>, StoreError>>;

    /// Logouts not confirmed yet, with when each was requested (ms).
    fn pending_logouts(&self) -> BoxFuture<'_, Result<Vec<(DeviceRef, u64)>, StoreError>>;

    /// Marks (`Some(requested_at)`) or clears a device's unconfirmed logout.
    fn set_pending_logout(
        &self,
        device: DeviceRef,
        requested_at: Option<u64>,
    ) -> BoxFuture<'_, Result<(), StoreError>>;
}

/// The audit trail's chained records (`crate::audit::model`).
pub trait AuditLog: Send + Sync + 'static {
    /// Stores audit records (already chained); durable on return.
    fn audit_append(&self, records: Vec<audit::Record>) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Position and hash of the last record of `chain`.
    fn audit_tail(
        &self,
        chain: audit::Chain,
    ) -> BoxFuture<'_, Result<Option<audit::Head>, StoreError>>;

    /// Every record of one partition, any order.
    fn audit_read(
        &self,
        subject: String,
        month: u32,
    ) -> BoxFuture<'_, Result<Vec<audit::Record>, StoreError>>;

    /// Every audit partition `(subject, month)` (verification).
    fn audit_partitions(&self) -> BoxFuture<'_, Result<Vec<(String, u32)>, StoreError>>;
}

/// Durable storage shared by every session: messages, devices, access state and the audit trail,
/// each a trait of its own so that a part of the relay can be handed only the part it uses, and
/// the store's own life (readiness, backups, close). Both backends implement all of them.
pub trait MessageStore: Messages + Devices + AccessRows + AuditLog {
    /// Records a good backup, for `relay_last_backup_timestamp_seconds`.
    fn record_backup(&self, backup: Backup) -> BoxFuture<'_, Result<(), StoreError>>;

    /// The newest backup recorded.
    fn last_backup(&self) -> BoxFuture<'_, Result<Option<Backup>, StoreError>>;

    /// Whether the store can take writes now.
    fn ready(&self) -> bool;

    /// Whether writes fail for lack of disk space (the embedded store's own disk).
    fn disk_full(&self) -> bool {
        false
    }

    /// Finishes queued writes, makes everything durable and stops.
    fn close(&self) -> BoxFuture<'_, Result<(), StoreError>>;
}

/// Adds an opened inbox row to a page and returns its body's size. A row that does not open is
/// never delivered and never removed here: one sealed with a key this node does not hold (a key
/// removed too early, or a rollback) is read again at every replay, so it is delivered once the
/// key is configured again; one that failed authentication is counted as corrupt and left in
/// place for investigation.
pub(crate) fn keep_inbox_row(
    page: &mut Vec<InboxEntry>,
    device: &DeviceRef,
    opened: Result<InboxEntry, crate::seal::SealError>,
) -> usize {
    match opened {
        Ok(entry) => {
            let bytes = entry.body.len();
            page.push(entry);
            bytes
        }
        Err(crate::seal::SealError::UnknownKey) => {
            metrics::counter!("relay_store_unknown_key_rows_total").increment(1);
            tracing::error!(user = %device.user, device = %device.device,
                "inbox row sealed with an at-rest key this node does not hold; kept for the next replay");
            0
        }
        Err(e) => {
            metrics::counter!("relay_store_corrupt_rows_total").increment(1);
            tracing::error!(user = %device.user, device = %device.device, error = %e,
                "inbox row failed authentication; skipped");
            0
        }
    }
}

/// Users whose device lists a store's writer keeps in memory. Recipient ids come from clients
/// and may name nobody, so past this the cache starts over instead of growing.
pub const DEVICE_CACHE_USERS: usize = 100_000;
