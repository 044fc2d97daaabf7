//! The cluster's view of which devices are connected to which other node.
//!
//! Fed by the bus: `Online`/`Offline` events as devices come and go, a snapshot from each node
//! when this node (re)joins or notices it missed something, and heartbeats. A node not heard from
//! for `node_timeout` is dead and its devices count as offline; a heartbeat whose device count
//! disagrees with ours twice in a row asks for a fresh snapshot, so lost events heal by
//! themselves. This node's own devices are not here: its hub is authoritative for them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::store::DeviceRef;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    instance: u64,
    since: u64,
}

#[derive(Debug)]
struct Peer {
    node_id: u8,
    last_heard: Instant,
    devices: usize,
    mismatches: u8,
    /// A snapshot of it arrived since we first heard of it.
    synced: bool,
    /// The oldest sequence number it was storing or publishing at its last heartbeat.
    unpublished: Option<u64>,
}

/// A node found dead: what the surviving nodes need to recover its unpublished deliveries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    /// Its node id (`u8::MAX` if only heard of through device events).
    pub node_id: u8,
    /// Its devices, now offline.
    pub devices: usize,
    /// How long it has been silent.
    pub silent: Duration,
    /// The oldest sequence number it may have stored without publishing, as of its last
    /// heartbeat (a batch's retried messages keep their first, older, numbers).
    pub unpublished: Option<u64>,
}

impl Peer {
    fn new(node_id: u8, now: Instant) -> Self {
        Peer {
            node_id,
            last_heard: now,
            devices: 0,
            mismatches: 0,
            synced: false,
            unpublished: None,
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    devices: HashMap<DeviceRef, Seen>,
    peers: HashMap<u64, Peer>,
}

/// What a heartbeat tells this node to do.
#[derive(Debug, PartialEq, Eq)]
pub enum HeartbeatOutcome {
    /// Nothing.
    Fine,
    /// A node we did not know, or whose device list we lost track of: ask for a snapshot.
    NeedSnapshot,
}

/// Devices online on other nodes.
#[derive(Debug, Default)]
pub struct Directory {
    inner: Mutex<Inner>,
}

impl Inner {
    fn remove_instance(&mut self, instance: u64) -> usize {
        let before = self.devices.len();
        self.devices.retain(|_, s| s.instance != instance);
        before - self.devices.len()
    }

    fn count(&self, instance: u64) -> usize {
        self.devices
            .values()
            .filter(|s| s.instance == instance)
            .count()
    }
}

impl Directory {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `device` connected to `instance` at `since`; the newest connection wins.
    pub fn online(&self, device: DeviceRef, instance: u64, since: u64, now: Instant) {
        let mut inner = self.lock();
        let seen = Seen { instance, since };
        match inner.devices.get(&device) {
            Some(old) if (old.since, old.instance) > (since, instance) => {}
            _ => {
                inner.devices.insert(device, seen);
            }
        }
        // A node heard of only through an event still expires if it falls silent.
        inner
            .peers
            .entry(instance)
            .or_insert_with(|| Peer::new(u8::MAX, now))
            .last_heard = now;
    }

    /// The connection of `device` that began at `since` on `instance` ended.
    pub fn offline(&self, device: &DeviceRef, instance: u64, since: u64) {
        let mut inner = self.lock();
        if inner.devices.get(device) == Some(&Seen { instance, since }) {
            inner.devices.remove(device);
        }
    }

    /// Whether `device` is connected to another node.
    pub fn is_online(&self, device: &DeviceRef) -> bool {
        self.lock().devices.contains_key(device)
    }

    /// Devices online on other nodes, with the node id holding each.
    pub fn len(&self) -> usize {
        self.lock().devices.len()
    }

    /// Whether no device is known online elsewhere.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records a heartbeat; `leaving` forgets the node at once.
    pub fn heartbeat(
        &self,
        instance: u64,
        node_id: u8,
        devices: usize,
        leaving: bool,
        unpublished: Option<u64>,
        now: Instant,
    ) -> HeartbeatOutcome {
        let mut inner = self.lock();
        if leaving {
            inner.peers.remove(&instance);
            inner.remove_instance(instance);
            return HeartbeatOutcome::Fine;
        }
        let known = inner.count(instance);
        let p = inner
            .peers
            .entry(instance)
            .or_insert_with(|| Peer::new(node_id, now));
        p.node_id = node_id;
        p.last_heard = now;
        p.devices = devices;
        p.unpublished = unpublished;
        p.mismatches = if known == devices {
            0
        } else {
            p.mismatches + 1
        };
        if !p.synced || p.mismatches >= 2 {
            p.mismatches = 0;
            HeartbeatOutcome::NeedSnapshot
        } else {
            HeartbeatOutcome::Fine
        }
    }

    /// Applies part of a node's snapshot; part 0 replaces what was known of it.
    pub fn snapshot(
        &self,
        instance: u64,
        node_id: u8,
        part: u32,
        devices: Vec<(String, String, u64)>,
        now: Instant,
    ) {
        let mut inner = self.lock();
        if part == 0 {
            inner.remove_instance(instance);
        }
        let peer = inner
            .peers
            .entry(instance)
            .or_insert_with(|| Peer::new(node_id, now));
        peer.node_id = node_id;
        peer.last_heard = now;
        peer.mismatches = 0;
        peer.synced = true;
        for (user, device, since) in devices {
            let d = DeviceRef::new(&user, &device);
            match inner.devices.get(&d) {
                Some(old) if old.since > since => {}
                _ => {
                    inner.devices.insert(d, Seen { instance, since });
                }
            }
        }
    }

    /// Forgets nodes silent for longer than `timeout`.
    pub fn expire(&self, now: Instant, timeout: Duration) -> Vec<Lost> {
        let mut inner = self.lock();
        let dead: Vec<u64> = inner
            .peers
            .iter()
            .filter(|(_, p)| now.duration_since(p.last_heard) > timeout)
            .map(|(&i, _)| i)
            .collect();
        dead.into_iter()
            .filter_map(|instance| {
                let p = inner.peers.remove(&instance)?;
                Some(Lost {
                    node_id: p.node_id,
                    devices: inner.remove_instance(instance),
                    silent: now.duration_since(p.last_heard),
                    unpublished: p.unpublished,
                })
            })
            .collect()
    }

    /// Other nodes alive now: (instance, node id).
    pub fn peers(&self) -> Vec<(u64, u8)> {
        self.lock()
            .peers
            .iter()
            .map(|(&i, p)| (i, p.node_id))
            .collect()
    }

    /// Forgets everything (this node lost the bus; a snapshot follows on reconnect).
    pub fn clear(&self) {
        let mut inner = self.lock();
        inner.devices.clear();
        inner.peers.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(x: &str) -> DeviceRef {
        DeviceRef::new("u", x)
    }

    #[test]
    fn newest_connection_wins_and_stale_offline_is_ignored() {
        let dir = Directory::default();
        let now = Instant::now();
        dir.online(d("a"), 1, 100, now);
        dir.online(d("a"), 2, 200, now);
        dir.online(d("a"), 1, 150, now); // late event of an older connection
        dir.offline(&d("a"), 1, 100);
        assert!(dir.is_online(&d("a")));
        dir.offline(&d("a"), 2, 200);
        assert!(!dir.is_online(&d("a")));
    }

    #[test]
    fn silent_node_expires_with_its_devices() {
        let dir = Directory::default();
        let t0 = Instant::now();
        assert_eq!(
            dir.heartbeat(1, 3, 0, false, None, t0),
            HeartbeatOutcome::NeedSnapshot
        );
        dir.online(d("a"), 1, 1, t0);
        dir.online(d("b"), 2, 1, t0);
        assert!(
            dir.expire(t0 + Duration::from_secs(2), Duration::from_secs(3))
                .is_empty()
        );
        let mut dead: Vec<(u8, usize)> = dir
            .expire(t0 + Duration::from_secs(4), Duration::from_secs(3))
            .iter()
            .map(|l| (l.node_id, l.devices))
            .collect();
        dead.sort();
        // Node 2 was only heard of through an event: it expires too, node id unknown.
        assert_eq!(dead, vec![(3, 1), (u8::MAX, 1)]);
        assert!(!dir.is_online(&d("a")) && !dir.is_online(&d("b")));
    }

    #[test]
    fn a_dead_node_is_reported_with_the_oldest_message_it_had_not_published() {
        let dir = Directory::default();
        let t0 = Instant::now();
        let timeout = Duration::from_secs(3);
        // Instance 1 died while a batch from seq 500 on was being written.
        dir.heartbeat(1, 3, 0, false, Some(900), t0);
        dir.heartbeat(1, 3, 0, false, Some(500), t0 + Duration::from_secs(1));
        // Instance 2 had published everything at its last heartbeat.
        dir.heartbeat(2, 4, 0, false, Some(700), t0);
        dir.heartbeat(2, 4, 0, false, None, t0 + Duration::from_secs(1));
        let mut lost = dir.expire(t0 + Duration::from_secs(5), timeout);
        lost.sort_by_key(|l| l.node_id);
        let seen: Vec<_> = lost
            .iter()
            .map(|l| (l.node_id, l.unpublished, l.silent))
            .collect();
        assert_eq!(
            seen,
            vec![
                (3, Some(500), Duration::from_secs(4)),
                (4, None, Duration::from_secs(4))
            ]
        );
    }

    #[test]
    fn count_mismatch_twice_asks_for_a_snapshot_which_heals() {
        let dir = Directory::default();
        let t = Instant::now();
        assert_eq!(
            dir.heartbeat(1, 0, 0, false, None, t),
            HeartbeatOutcome::NeedSnapshot
        );
        dir.snapshot(1, 0, 0, vec![], t);
        assert_eq!(
            dir.heartbeat(1, 0, 0, false, None, t),
            HeartbeatOutcome::Fine
        );
        assert_eq!(
            dir.heartbeat(1, 0, 2, false, None, t),
            HeartbeatOutcome::Fine
        );
        assert_eq!(
            dir.heartbeat(1, 0, 2, false, None, t),
            HeartbeatOutcome::NeedSnapshot
        );
        dir.snapshot(
            1,
            0,
            0,
            vec![("u".into(), "a".into(), 5), ("u".into(), "b".into(), 6)],
            t,
        );
        assert_eq!(
            dir.heartbeat(1, 0, 2, false, None, t),
            HeartbeatOutcome::Fine
        );
        assert_eq!(dir.len(), 2);
        dir.heartbeat(1, 0, 0, true, None, t);
        assert!(dir.is_empty());
    }
}
