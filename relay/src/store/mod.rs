//! Durable storage of messages, in relay terms: append a message for its recipients' devices, read
//! a device's inbox after a cursor, acknowledge, expire.
//!
//! [`MessageStore`] is the one trait; `embedded.rs` implements it on fjall. Payloads are sealed
//! with the [`Keyring`](crate::seal::Keyring) before they reach a backend, and `record.rs` is the
//! one binary layout both use.
//!
//! **Invariant:** `append` resolves `Ok` only once the message is durable, and a backend hands
//! every appended message to the [`DeliverySink`] after it is durable, in sequence order per
//! device. A live delivery therefore never overtakes the store.

pub mod backup;
pub mod embedded;
mod migrate;
pub mod pseudonym;
mod queue;
pub mod record;
pub mod rows;
pub mod scylla;
mod scylla_pseudonyms;

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::access::{AccessRow, Change};
use crate::audit;

/// A device of a user. Device ids are unique within a user.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceRef {
    /// User id.
    pub user: Arc<str>,
    /// Device id.
    pub device: Arc<str>,
}

impl DeviceRef {
    /// Builds a reference from ids already validated by the caller.
    pub fn new(user: &str, device: &str) -> Self {
        DeviceRef {
            user: user.into(),
            device: device.into(),
        }
    }
}

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
    /// `devices` are all the devices whose inbox received `entry`.
    fn deliver(&self, devices: &[DeviceRef], entry: &InboxEntry);
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

/// Durable message storage shared by every session.
pub trait MessageStore: Send + Sync + 'static {
    /// Queues `msg` for a durable append. Appends from one caller are applied in call order, so
    /// a device's pipelined sends keep their order. Never blocks.
    fn append(&self, msg: NewMessage) -> AppendTicket;

    /// Records that a device exists for its user, so messages to the user reach it.
    fn register_device(&self, device: DeviceRef) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Another node reports that `device` connected: a backend that caches users' device lists
    /// makes sure the next append to the user includes it.
    fn device_seen(&self, device: DeviceRef) {
        let _ = device;
    }

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

    // Access state and the audit trail: see `crate::access` and `crate::audit`.

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

    /// Device ids registered for `user`.
    fn devices(&self, user: String) -> BoxFuture<'_, Result<Vec<String>, StoreError>>;

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

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Sequence numbers: `ms since 2025-01-01 (41 bits) | node id (5 bits) | counter (7 bits)`.
///
/// They increase per node, read as a time (so expiry is a key-range scan and partitions can be
/// bucketed by time), are unique across up to 32 nodes writing the same inbox, and stay below
/// 2^53, the largest integer a JavaScript client parses exactly from JSON (until the year 2094).
/// Bursts above 128 messages per millisecond on one node borrow from the next millisecond.
const SEQ_EPOCH_MS: u64 = 1_735_689_600_000;
const NODE_BITS: u32 = 5;
const COUNTER_BITS: u32 = 7;
const TIME_SHIFT: u32 = NODE_BITS + COUNTER_BITS;

/// Most relay nodes that can write to one store.
pub const MAX_NODES: u8 = 1 << NODE_BITS;

/// Users whose device lists a store's writer keeps in memory. Recipient ids come from clients
/// and may name nobody, so past this the cache starts over instead of growing.
pub const DEVICE_CACHE_USERS: usize = 100_000;

/// Largest integer JSON clients in JavaScript read exactly.
pub const MAX_SAFE_SEQ: u64 = (1 << 53) - 1;

/// First sequence number at or after `ms`, for any node.
pub fn seq_floor(ms: u64) -> u64 {
    ms.saturating_sub(SEQ_EPOCH_MS) << TIME_SHIFT
}

/// How far sequence numbers advance in `ms` milliseconds.
pub fn seq_span(ms: u64) -> u64 {
    ms << TIME_SHIFT
}

/// Accept time encoded in a sequence number.
pub fn seq_time_ms(seq: u64) -> u64 {
    (seq >> TIME_SHIFT) + SEQ_EPOCH_MS
}

/// Issues increasing sequence numbers for one node.
#[derive(Debug)]
pub struct SeqClock {
    node: u64,
    last: u64,
}

impl SeqClock {
    /// A clock for node `node` (below [`MAX_NODES`]) that continues after `last`.
    pub fn new(node: u8, last: u64) -> Self {
        SeqClock {
            node: u64::from(node % MAX_NODES),
            last,
        }
    }

    /// The next sequence number at wall-clock time `now_ms`.
    pub fn next(&mut self, now_ms: u64) -> u64 {
        let mask = (1u64 << COUNTER_BITS) - 1;
        let now = now_ms.saturating_sub(SEQ_EPOCH_MS);
        let (last_ms, last_ctr) = (self.last >> TIME_SHIFT, self.last & mask);
        let (ms, ctr) = if now > last_ms {
            (now, 0)
        } else if last_ctr < mask {
            (last_ms, last_ctr + 1)
        } else {
            (last_ms + 1, 0)
        };
        self.last = ms << TIME_SHIFT | self.node << COUNTER_BITS | ctr;
        self.last
    }

    /// A bound above every sequence number `n` more calls of [`next`](Self::next) at `now_ms`
    /// (or earlier) can return: what a store must have reserved before issuing them.
    pub fn bound_after(&self, now_ms: u64, n: usize) -> u64 {
        let now = now_ms.saturating_sub(SEQ_EPOCH_MS);
        let ms = now.max(self.last >> TIME_SHIFT) + (n as u64 >> COUNTER_BITS) + 1;
        (ms + 1) << TIME_SHIFT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_stay_exact_in_javascript_until_2094() {
        let year_2094_ms = 3_928_000_000_000u64;
        assert!(seq_floor(year_2094_ms) | ((1 << TIME_SHIFT) - 1) < MAX_SAFE_SEQ);
        let t = 1_767_225_600_123;
        assert_eq!(seq_time_ms(seq_floor(t) + 100), t);
    }

    #[test]
    fn clock_increases_and_nodes_never_collide() {
        let now = 1_767_225_600_000;
        let mut a = SeqClock::new(1, 0);
        let mut b = SeqClock::new(2, 0);
        let mut seen = std::collections::HashSet::new();
        let mut last = 0;
        for i in 0..1000 {
            let s = a.next(now + i / 500); // bursts well above 128 per ms
            assert!(s > last);
            last = s;
            assert!(seen.insert(s));
            assert!(seen.insert(b.next(now + i / 500)));
        }
        // Time never runs backwards even if the wall clock does.
        assert!(a.next(now - 10_000) > last);
    }

    #[test]
    fn a_bound_covers_every_sequence_a_burst_can_issue() {
        let now = 1_767_225_600_000;
        for (start, n) in [(0, 1), (0, 1000), (seq_floor(now + 5_000), 300), (0, 128)] {
            let mut c = SeqClock::new(3, start);
            let bound = c.bound_after(now, n);
            let last = (0..n).map(|_| c.next(now)).max().expect("n > 0");
            assert!(last < bound, "{n} from {start}: {last} >= {bound}");
        }
        // A clock restarted at a reservation issues only above it.
        let reserved = seq_floor(now + 10_000);
        assert!(SeqClock::new(3, reserved).next(now) > reserved);
    }
}
