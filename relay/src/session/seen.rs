//! Last-seen times, written in batches. Every connect and disconnect records when the device
//! was seen (and, on connect, the organisation its token names); one write per session event
//! cost each handshake a trip to the store. Here the events wait in a map while a write is in
//! flight and the next write takes them all: no delay when the node is quiet, and one store
//! call for a whole reconnect storm's worth of devices when it is not (group commit).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::task::TaskTracker;

use crate::access::Change;
use crate::store::{DeviceRef, MessageStore, now_ms};

/// Devices waiting for their write, at most: past it, a stalled store drops the newest
/// times (a last-seen time is rewritten at the device's next connect) rather than growing.
const MAX_PENDING: usize = 100_000;

/// Devices per store call: one call holds the embedded store's access lock throughout.
const MAX_BATCH: usize = 1_024;

/// The node's last-seen writer. Clones share it.
#[derive(Clone)]
pub struct LastSeen {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn MessageStore>,
    tasks: TaskTracker,
    pending: Mutex<Pending>,
    /// Store calls made so far.
    calls: AtomicU64,
}

#[derive(Default)]
struct Pending {
    seen: HashMap<DeviceRef, Seen>,
    /// A write task is running: it takes what is here before it ends.
    writing: bool,
}

struct Seen {
    at: u64,
    org: Option<(String, u64)>,
}

impl LastSeen {
    /// Writes go to `store` from tasks on `tasks`, which the drain waits for before the store
    /// closes.
    pub fn new(store: Arc<dyn MessageStore>, tasks: TaskTracker) -> Self {
        let inner = Inner {
            store,
            tasks,
            pending: Mutex::default(),
            calls: AtomicU64::new(0),
        };
        LastSeen {
            inner: Arc::new(inner),
        }
    }

    /// `device` was seen now; `org` is its token's organisation with the token's `iat`.
    pub fn record(&self, device: &DeviceRef, org: Option<(String, u64)>) {
        let at = now_ms();
        let start = {
            let mut p = self.inner.pending.lock().unwrap_or_else(|e| e.into_inner());
            let full = p.seen.len() >= MAX_PENDING;
            match p.seen.get_mut(device) {
                Some(s) => {
                    s.at = s.at.max(at);
                    // The newest token's organisation wins, as in the store.
                    if org
                        .as_ref()
                        .is_some_and(|(_, new)| s.org.as_ref().is_none_or(|(_, old)| old <= new))
                    {
                        s.org = org;
                    }
                }
                None if full => {
                    metrics::counter!("relay_last_seen_dropped_total").increment(1);
                }
                None => {
                    p.seen.insert(device.clone(), Seen { at, org });
                }
            }
            !std::mem::replace(&mut p.writing, true)
        };
        if start {
            let inner = self.inner.clone();
            self.inner.tasks.spawn(async move { inner.write().await });
        }
    }
}

impl Inner {
    /// Writes what is pending until nothing is.
    async fn write(&self) {
        loop {
            let batch: Vec<(DeviceRef, Change)> = {
                let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                if p.seen.is_empty() {
                    p.writing = false;
                    return;
                }
                let take: Vec<DeviceRef> = p.seen.keys().take(MAX_BATCH).cloned().collect();
                take.into_iter()
                    .filter_map(|d| p.seen.remove_entry(&d))
                    .map(|(d, s)| {
                        (
                            d,
                            Change::Seen {
                                at: s.at,
                                org: s.org,
                            },
                        )
                    })
                    .collect()
            };
            self.calls.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.store.update_access_many(batch).await {
                tracing::debug!(error = %e, "last-seen times not recorded");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::open_for_tests;

    fn devices(n: usize) -> Vec<DeviceRef> {
        (0..n)
            .map(|i| DeviceRef::new(&format!("u{i}"), "phone"))
            .collect()
    }

    /// A storm's worth of sessions starting at once make a couple of store calls, not one each,
    /// and every time and organisation reaches the store.
    #[tokio::test(flavor = "current_thread")]
    async fn a_storm_of_connects_is_written_in_a_few_calls() {
        let dir = tempfile::tempdir().expect("dir");
        let store = open_for_tests(dir.path());
        let tasks = TaskTracker::new();
        let seen = LastSeen::new(store.clone(), tasks.clone());
        let all = devices(3_000);
        let before = now_ms();
        for d in &all {
            seen.record(d, Some(("clinic-a".into(), 1)));
        }
        // The second session of a device: its time and the newer token's organisation win.
        seen.record(&all[0], Some(("clinic-b".into(), 2)));
        seen.record(&all[0], Some(("clinic-c".into(), 1)));
        tasks.close();
        tasks.wait().await;
        // 3,000 devices in batches of 1,024 (the first call may leave with the first device).
        let calls = seen.inner.calls.load(Ordering::Relaxed);
        assert!(calls <= 4, "{calls} store calls for 3,000 devices");

        for d in &all {
            let rows = store
                .access(d.user.to_string(), Some(d.device.to_string()))
                .await
                .expect("read");
            let (user, dev): (Vec<_>, Vec<_>) = rows.into_iter().partition(|(id, _)| id.is_empty());
            assert!(dev[0].1.last_seen.is_some_and(|t| t >= before), "{d:?}");
            let want = if *d == all[0] { "clinic-b" } else { "clinic-a" };
            assert_eq!(user[0].1.org.as_deref(), Some(want), "{d:?}");
        }
        assert_eq!(seen.inner.pending.lock().expect("lock").seen.len(), 0);
        assert!(!seen.inner.pending.lock().expect("lock").writing);
    }
}
