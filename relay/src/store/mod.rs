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

pub mod embedded;
pub mod record;

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio::sync::oneshot;
use uuid::Uuid;

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

    /// Up to `limit` inbox entries of `device` with `seq > after`, in order.
    fn inbox_page(
        &self,
        device: DeviceRef,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<InboxEntry>, StoreError>>;

    /// Removes acknowledged entries from the device's inbox. Losing an ack to a crash only causes
    /// a redelivery, so this need not be durable before it returns.
    fn ack(&self, device: DeviceRef, seqs: Vec<u64>) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Deletes what is past retention as of `now_ms`.
    fn expire(
        &self,
        now_ms: u64,
        retention: Retention,
    ) -> BoxFuture<'_, Result<Expired, StoreError>>;

    /// Whether the store can take writes now.
    fn ready(&self) -> bool;

    /// Finishes queued writes, makes everything durable and stops.
    fn close(&self) -> BoxFuture<'_, Result<(), StoreError>>;
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Sequence numbers are `unix_ms << 10 | counter`: increasing, and readable as a time, which
/// makes time-based expiry a key-range scan. They must stay below 2^53, the largest integer a
/// JavaScript client parses exactly from JSON (true until the year 2248). Bursts above 1,024
/// messages in a millisecond borrow from the next millisecond; order is unaffected.
pub const SEQ_COUNTER_BITS: u32 = 10;

/// Largest integer JSON clients in JavaScript read exactly.
pub const MAX_SAFE_SEQ: u64 = (1 << 53) - 1;

/// First sequence number at or after `ms`.
pub fn seq_floor(ms: u64) -> u64 {
    ms << SEQ_COUNTER_BITS
}

/// Accept time encoded in a sequence number.
pub fn seq_time_ms(seq: u64) -> u64 {
    seq >> SEQ_COUNTER_BITS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_stay_exact_in_javascript_for_centuries() {
        let year_2200_ms = 7_258_118_400_000u64;
        assert!(seq_floor(year_2200_ms) | ((1 << SEQ_COUNTER_BITS) - 1) < MAX_SAFE_SEQ);
        let t = 1_767_225_600_123;
        assert_eq!(seq_time_ms(seq_floor(t) + 1000), t);
    }
}
