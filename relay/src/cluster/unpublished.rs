//! What this node has stored but may not have put on the bus yet, announced in heartbeats: if
//! the node dies, the others re-read their inboxes from the oldest of it.

use std::sync::atomic::{AtomicU64, Ordering};

const NONE: u64 = u64::MAX;

/// The store's batches in flight, as their oldest sequence numbers.
#[derive(Debug)]
pub struct Unpublished {
    /// The batch being written now.
    storing: AtomicU64,
    /// Every batch written since the last heartbeat: its publications may still be queued.
    since_beat: AtomicU64,
}

impl Default for Unpublished {
    fn default() -> Self {
        Unpublished {
            storing: AtomicU64::new(NONE),
            since_beat: AtomicU64::new(NONE),
        }
    }
}

impl Unpublished {
    /// The store is writing a batch whose oldest sequence number is `oldest`; `None` once
    /// the batch is fanned out.
    pub fn storing(&self, oldest: Option<u64>) {
        let oldest = oldest.unwrap_or(NONE);
        self.storing.store(oldest, Ordering::Relaxed);
        self.since_beat.fetch_min(oldest, Ordering::Relaxed);
    }

    /// For a heartbeat: the oldest sequence number of the batch being written and of those
    /// written since the previous heartbeat.
    pub fn announce(&self) -> Option<u64> {
        let now = self.storing.load(Ordering::Relaxed);
        let oldest = self.since_beat.swap(now, Ordering::Relaxed).min(now);
        (oldest != NONE).then_some(oldest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_announces_the_batch_in_progress_and_those_written_since_the_last() {
        let u = Unpublished::default();
        assert_eq!(u.announce(), None);
        u.storing(Some(10));
        u.storing(None); // written, its publications perhaps still queued
        u.storing(Some(20));
        assert_eq!(u.announce(), Some(10));
        assert_eq!(u.announce(), Some(20), "still being written");
        u.storing(None);
        assert_eq!(u.announce(), Some(20), "written since the last heartbeat");
        assert_eq!(u.announce(), None);
    }
}
