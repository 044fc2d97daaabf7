//! One device's WebSocket session: `state.rs` holds the protocol logic (no IO, no clocks),
//! `driver.rs` owns the socket and feeds it, `socket.rs` reads and writes its WebSocket frames.

pub mod budget;
pub mod driver;
pub mod seen;
pub mod socket;
pub mod state;

use std::sync::Arc;
use std::time::Duration;

use crate::fanout::Hub;
use crate::store::MessageStore;

/// What every session on this node shares.
pub struct SessionContext {
    /// Durable storage.
    pub store: Arc<dyn MessageStore>,
    /// Live connections of this node.
    pub hub: Arc<Hub>,
    /// Per-session limits.
    pub limits: Arc<state::Limits>,
    /// Deliveries queued per connection.
    pub outbound_queue: usize,
    /// Time a write may take before the device counts as a slow consumer.
    pub write_timeout: Duration,
    /// App ids devices may register push tokens for (empty: any).
    pub push_apps: Vec<String>,
    /// Wake-ups and urgent pages, when push is configured.
    pub pager: Option<Arc<crate::pager::Pager>>,
    /// Cluster membership, in cluster mode.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Remote logout (and, through it, the audit trail).
    pub access: Arc<crate::access::Access>,
    /// Memory all replays on this node may hold.
    pub replay_memory: budget::ReplayMemory,
    /// What each account may store per day.
    pub quota: budget::SenderQuota,
    /// Tracks every session task and what sessions leave behind (acks, last-seen writes), so
    /// the drain waits for them before the store closes.
    pub tasks: tokio_util::task::TaskTracker,
    /// Last-seen times, written in batches on `tasks`.
    pub last_seen: seen::LastSeen,
}
