//! What sessions on one node share and must not take more than their part of: the memory that
//! inbox replays hold, and what each account may add to the six-year archive per day.

use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Message bodies one replay page reads (at least one message, however large).
pub const REPLAY_PAGE_BYTES: usize = 256 * 1024;

/// Memory held by inbox replays on this node: each page read is paid for before it is read and
/// held until it is written to the device.
#[derive(Debug)]
pub struct ReplayMemory {
    permits: Arc<Semaphore>,
    total: usize,
}

/// Replay memory held for one page; given back when dropped.
pub struct Held {
    permit: Option<OwnedSemaphorePermit>,
    permits: Arc<Semaphore>,
    total: usize,
}

impl ReplayMemory {
    /// A budget of `total` bytes (below 4 GiB: permits are counted in `u32`).
    pub fn new(total: usize) -> Self {
        let total = total.clamp(1, u32::MAX as usize);
        ReplayMemory {
            permits: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// Waits for room for a page whose bodies are at most `bodies` bytes, as the frames that
    /// carry them (base64 plus the JSON around each of up to `entries` messages). A page larger
    /// than the whole budget waits for all of it.
    pub async fn reserve(&self, bodies: usize, entries: usize) -> Held {
        let n = self.permits_for(bodies, entries);
        // Never closed, so acquiring cannot fail; `None` would only mean holding nothing.
        let permit = self.permits.clone().acquire_many_owned(n).await.ok();
        self.held(permit)
    }

    /// As `reserve`, when there is room now.
    pub fn try_reserve(&self, bodies: usize, entries: usize) -> Option<Held> {
        let n = self.permits_for(bodies, entries);
        let permit = self.permits.clone().try_acquire_many_owned(n).ok()?;
        Some(self.held(Some(permit)))
    }

    fn permits_for(&self, bodies: usize, entries: usize) -> u32 {
        let frames = bodies.div_ceil(3) * 4 + entries * 512;
        frames.min(self.total) as u32
    }

    fn held(&self, permit: Option<OwnedSemaphorePermit>) -> Held {
        let held = Held {
            permit,
            permits: self.permits.clone(),
            total: self.total,
        };
        held.report();
        held
    }

    /// Bytes held now.
    pub fn in_use(&self) -> usize {
        self.total - self.permits.available_permits()
    }
}

impl Held {
    /// Gives back what the page turned out not to need: keeps `used` bytes (at least one).
    pub fn shrink(&mut self, used: usize) {
        if let Some(permit) = &mut self.permit {
            let held = permit.num_permits();
            if used < held {
                drop(permit.split(held - used.max(1)));
                self.report();
            }
        }
    }

    fn report(&self) {
        let in_use = self.total - self.permits.available_permits();
        metrics::gauge!("relay_replay_memory_bytes").set(in_use as f64);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        drop(self.permit.take());
        self.report();
    }
}

/// Message bytes each account stored today (UTC), on this node.
#[derive(Debug)]
pub struct SenderQuota {
    per_day: u64,
    used: DashMap<Arc<str>, (u64, u64)>,
}

/// Accounts a node tracks at once; past this, yesterday's entries go, then new senders go
/// untracked (counted) rather than growing the map.
const TRACKED_SENDERS: usize = 200_000;
const DAY_MS: u64 = 86_400_000;

impl SenderQuota {
    /// `per_day` bytes per account per UTC day.
    pub fn new(per_day: u64) -> Self {
        SenderQuota {
            per_day,
            used: DashMap::new(),
        }
    }

    /// Reserves `bytes` for `user` at `now_ms`; false when that would exceed today's quota.
    pub fn reserve(&self, user: &Arc<str>, bytes: u64, now_ms: u64) -> bool {
        let day = now_ms / DAY_MS;
        if !self.used.contains_key(user) && self.used.len() >= TRACKED_SENDERS {
            self.used.retain(|_, (d, _)| *d == day);
            if self.used.len() >= TRACKED_SENDERS {
                metrics::counter!("relay_sender_quota_untracked_total").increment(1);
                return bytes <= self.per_day;
            }
        }
        let mut entry = self.used.entry(user.clone()).or_insert((day, 0));
        let (d, used) = entry.value_mut();
        if *d != day {
            (*d, *used) = (day, 0);
        }
        if used.saturating_add(bytes) > self.per_day {
            return false;
        }
        *used += bytes;
        true
    }

    /// Gives back a reservation whose message was not stored (a duplicate, a failed write).
    pub fn refund(&self, user: &Arc<str>, bytes: u64, now_ms: u64) {
        if let Some(mut entry) = self.used.get_mut(user) {
            let (d, used) = entry.value_mut();
            if *d == now_ms / DAY_MS {
                *used = used.saturating_sub(bytes);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quota_is_per_account_and_per_utc_day_and_refunds_give_back() {
        let q = SenderQuota::new(100);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let t = 20_000 * DAY_MS + 5;
        assert!(q.reserve(&a, 60, t));
        assert!(!q.reserve(&a, 41, t));
        assert!(q.reserve(&b, 100, t));
        q.refund(&a, 60, t);
        assert!(q.reserve(&a, 100, t));
        assert!(!q.reserve(&a, 1, t + DAY_MS - 6));
        assert!(q.reserve(&a, 100, t + DAY_MS));
    }

    #[tokio::test]
    async fn replay_memory_is_held_until_released_and_shrinks_to_what_a_page_used() {
        let m = ReplayMemory::new(1 << 20);
        let mut held = m.reserve(300_000, 1).await;
        assert_eq!(m.in_use(), 400_000 + 512);
        held.shrink(1000);
        assert_eq!(m.in_use(), 1000);
        // A page larger than the whole budget takes all of it, and then waits for nobody.
        let big = m.reserve(10 << 20, 128);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), big)
                .await
                .is_err()
        );
        drop(held);
        let all = m.reserve(10 << 20, 128).await;
        assert_eq!(m.in_use(), 1 << 20);
        drop(all);
        assert_eq!(m.in_use(), 0);
    }
}
